"""The generated gRPC stubs of protocol/proto/gateway/v1/gateway.proto.

The integration tests generate them once per test process (grpcio-tools,
into a temporary folder named by GATEWAY_GRPC_STUBS); a script run by hand
generates its own. Nothing generated is committed: the stubs always match
the committed .proto.
"""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "..", "protocol", "proto"))
PROTO = "gateway/v1/gateway.proto"
INSTALL = "python3 -m pip install grpcio grpcio-tools h2"


def require_packages():
    """Exits with the install line when a package the tests need is missing."""
    try:
        import grpc  # noqa: F401
        import grpc_tools  # noqa: F401
        import h2  # noqa: F401
    except ImportError as e:
        sys.stderr.write(f"missing Python package ({e}); install them with: {INSTALL}\n")
        sys.exit(3)


def generate(out):
    """Runs grpcio-tools' protoc on the committed .proto into `out`."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ],
        check=True,
    )


def load():
    """(gateway_pb2, gateway_pb2_grpc), generated if need be."""
    require_packages()
    out = os.environ.get("GATEWAY_GRPC_STUBS")
    if not out or not os.path.exists(os.path.join(out, "gateway", "v1", "gateway_pb2.py")):
        out = tempfile.mkdtemp(prefix="gateway-grpc-stubs-")
        generate(out)
    sys.path.insert(0, out)
    from gateway.v1 import gateway_pb2, gateway_pb2_grpc

    return gateway_pb2, gateway_pb2_grpc
