#!/usr/bin/env python3
"""TLS clients of the gateway (Python's ssl module, and the `websockets`
package over it), driven by the integration tests in tests/it/tls.rs.

Each prints one JSON line per thing it learns, flushed at once, so that the
test reads them as they come:

hello HOST PORT: one TLS connection; optionally a PROXY header sent in
clear before the handshake (--proxy-hex) and one request after it
(--request PATH, with `Connection: close`, read to the end).

  {"type": "handshake", "version": "TLSv1.3", "cipher": ..., "alpn": ...,
   "der": <base64 of the server's certificate>, "san": [...]}
  {"type": "refused", "error": "SSLCertVerificationError",
   "verify_message": ..., "reason": ..., "message": ...}
  {"type": "response", "head": ..., "body": ..., "close_notify": true}

ws URL: a WebSocket over TLS (websockets' sync client) on a socket
connected to --connect HOST:PORT.

  {"type": "open", "version": ..., "subprotocol": ..., "der": ...}
  {"type": "frame", "binary": false, "data": <base64>}
  {"type": "closed", "code": ..., "reason": ...}

Each stdin line of a ws client is a command: {"send": "text"} sends a text
frame, {"close": true} closes with 1000. Closing stdin closes too.
"""

import argparse
import base64
import json
import socket
import ssl
import sys
import threading
import time

SAFETY_NET_S = 10
INSTALL = "python3 -m pip install websockets"

_print_lock = threading.Lock()


def emit(obj):
    line = json.dumps(obj)
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def context(args):
    """A client context: verifying against --ca (hostname checked when
    there is an SNI name), or not verifying at all with --no-verify;
    --max-tls12 keeps it to TLS 1.2, --ciphers to those suites."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if args.no_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=args.ca)
        ctx.check_hostname = args.sni is not None
        ctx.verify_mode = ssl.CERT_REQUIRED
    if args.max_tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if args.ciphers:
        ctx.set_ciphers(args.ciphers)
    return ctx


def session_json(tls):
    cert = tls.getpeercert() or {}
    san = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    return {
        "version": tls.version(),
        "cipher": tls.cipher()[0],
        "alpn": tls.selected_alpn_protocol(),
        "der": base64.b64encode(tls.getpeercert(binary_form=True)).decode(),
        "san": san,
    }


def refused_json(e):
    return {
        "type": "refused",
        "error": type(e).__name__,
        "verify_message": getattr(e, "verify_message", None),
        "reason": getattr(e, "reason", None),
        "message": str(e),
    }


def hello(args):
    raw = socket.create_connection((args.host, args.port), timeout=SAFETY_NET_S)
    if args.proxy_hex:
        # The proxy's header goes first, in clear.
        raw.sendall(bytes.fromhex(args.proxy_hex))
    ctx = context(args)
    try:
        # An EOF without close_notify raises instead of reading as the end.
        tls = ctx.wrap_socket(raw, server_hostname=args.sni, suppress_ragged_eofs=False)
    except (ssl.SSLError, OSError) as e:
        emit(refused_json(e))
        return
    emit({"type": "handshake", **session_json(tls)})
    if args.request is None:
        tls.close()
        return
    request = (
        f"GET {args.request} HTTP/1.1\r\nHost: {args.sni or args.host}\r\n"
        "Connection: close\r\n\r\n"
    )
    tls.sendall(request.encode())
    data = b""
    close_notify = True
    while True:
        try:
            chunk = tls.recv(65536)
        except ssl.SSLEOFError:
            # The TCP connection ended without close_notify.
            close_notify = False
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    emit(
        {
            "type": "response",
            "head": head.decode("latin-1"),
            "body": body.decode("utf-8", "replace"),
            "close_notify": close_notify,
        }
    )
    tls.close()


def ws(args):
    try:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect
    except ImportError as e:
        sys.stderr.write(f"missing Python package ({e}); install it with: {INSTALL}\n")
        sys.exit(3)
    started = time.monotonic()

    def stage(what):
        # On stderr, which a failing test shows: where a stalled client got.
        sys.stderr.write(f"{time.monotonic() - started:.3f}s {what}\n")
        sys.stderr.flush()

    host, _, port = args.connect.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=SAFETY_NET_S)
    stage("connected")
    # The TLS handshake is done here rather than inside websockets' connect,
    # so that a stall is told apart from one in the WebSocket handshake;
    # websockets then speaks over the TLS socket as given (a ws:// URL, so
    # that it does not wrap it again). The bytes on the wire are the same.
    tls = context(args).wrap_socket(sock, server_hostname=args.sni)
    stage(f"TLS handshake done ({tls.version()})")
    tls.settimeout(None)
    headers = [("Authorization", f"Bearer {args.token}")] if args.token else None
    conn = connect(
        "ws://" + args.url.removeprefix("wss://"),
        sock=tls,
        subprotocols=[args.subprotocol] if args.subprotocol else None,
        additional_headers=headers,
        compression=None,
        proxy=None,
        open_timeout=SAFETY_NET_S,
        ping_interval=None,
        close_timeout=SAFETY_NET_S,
    )
    stage("WebSocket open")
    emit({"type": "open", "subprotocol": conn.subprotocol, **session_json(tls)})

    def read():
        try:
            for message in conn:
                binary = isinstance(message, bytes)
                data = message if binary else message.encode()
                emit({"type": "frame", "binary": binary, "data": base64.b64encode(data).decode()})
        except ConnectionClosed:
            pass
        rcvd = conn.protocol.close_rcvd
        emit(
            {
                "type": "closed",
                "code": rcvd.code if rcvd else None,
                "reason": rcvd.reason if rcvd else None,
            }
        )

    reader = threading.Thread(target=read)
    reader.start()
    for line in sys.stdin:
        cmd = json.loads(line)
        if "send" in cmd:
            conn.send(cmd["send"])
        if cmd.get("close"):
            break
    conn.close()
    reader.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--ca", help="the CA file to verify the server with")
        p.add_argument("--no-verify", action="store_true")
        p.add_argument("--sni", help="server_hostname (none: no SNI, no hostname check)")
        p.add_argument("--max-tls12", action="store_true")
        p.add_argument("--ciphers")

    p = sub.add_parser("hello")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--proxy-hex", help="bytes sent in clear before the handshake")
    p.add_argument("--request", help="a path to GET after the handshake")
    common(p)

    p = sub.add_parser("ws")
    p.add_argument("url")
    p.add_argument("--connect", required=True, help="HOST:PORT to connect to")
    p.add_argument("--subprotocol")
    p.add_argument("--token")
    common(p)

    args = parser.parse_args()
    {"hello": hello, "ws": ws}[args.command](args)


if __name__ == "__main__":
    main()
