#!/usr/bin/env python3
"""A gRPC client of the gateway (grpcio, as a service would use it), driven
by the integration tests in tests/it/grpc.rs.

Every frame received is printed as one JSON line on stdout, flushed at once,
so that the test reads the stream as it comes:

  {"call": 0, "type": "message", "channel": ..., "id": ..., "event": ...,
   "payload": <base64>, "binary": ...}
  {"call": 0, "type": "gap", "channel": ...}
  {"call": 0, "type": "welcome", "address": ...}
  {"call": 0, "type": "ack", "ref": ...}
  {"call": 0, "type": "error", "ref": ..., "reason": ..., "channel": ...}
  {"call": 0, "type": "status", "code": "UNAVAILABLE", "details": ...,
   "trailers": {...}}            (the call's end: the last line of a call)

subscribe: one or more Subscribe calls on ONE channel (so one HTTP/2
connection); each --call gives a call's channels. Closing stdin cancels them.

connect: one Connect call; each stdin line is a client frame as JSON
({"subscribe": {...}}, {"send": {...}}, {"unsubscribe": {...}}); closing
stdin half-closes the call, {"cancel": true} cancels it.
"""

import argparse
import base64
import json
import sys
import threading

import stubs

pb, pb_grpc = stubs.load()
import grpc  # noqa: E402  (after the package check of stubs.load)

_print_lock = threading.Lock()


def emit(obj):
    line = json.dumps(obj)
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def frame_json(call, f):
    kind = f.WhichOneof("kind")
    if kind == "message":
        m = f.message
        return {
            "call": call,
            "type": "message",
            "channel": m.channel,
            "id": m.id,
            "event": m.event,
            "payload": base64.b64encode(m.payload).decode(),
            "binary": m.binary,
        }
    if kind == "gap":
        return {"call": call, "type": "gap", "channel": f.gap.channel}
    if kind == "welcome":
        return {"call": call, "type": "welcome", "address": f.welcome.address}
    if kind == "ack":
        return {"call": call, "type": "ack", "ref": f.ack.ref}
    if kind == "error":
        e = f.error
        return {"call": call, "type": "error", "ref": e.ref, "reason": e.reason, "channel": e.channel}
    return {"call": call, "type": "empty-frame"}


def metadata_json(md):
    out = {}
    for key, value in md or ():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        out[key] = value
    return out


def status(call, rpc):
    """The call's end as the client sees it: code, message, trailers."""
    code = rpc.code()
    emit(
        {
            "call": call,
            "type": "status",
            "code": code.name if code is not None else None,
            "details": rpc.details() or "",
            "trailers": metadata_json(rpc.trailing_metadata()),
        }
    )


def read_frames(call_no, call):
    try:
        for f in call:
            emit(frame_json(call_no, f))
    except grpc.RpcError:
        pass
    status(call_no, call)


def channel_for(target, args=None):
    options = [
        # The tests resume by hand, from the last id: no transparent
        # retry may hide an end of stream.
        ("grpc.enable_retries", 0),
        ("grpc.enable_http_proxy", 0),
        ("grpc.max_receive_message_length", -1),
        ("grpc.max_send_message_length", -1),
    ]
    if args is not None and args.tls_ca:
        # TLS, trusting the test CA; ALPN h2 as every gRPC client offers.
        with open(args.tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        if args.tls_name:
            options.append(("grpc.ssl_target_name_override", args.tls_name))
        return grpc.secure_channel(target, creds, options=options)
    return grpc.insecure_channel(target, options=options)


def call_metadata(args):
    md = []
    if args.token:
        md.append(("authorization", f"Bearer {args.token}"))
    for kv in args.metadata:
        k, _, v = kv.partition("=")
        md.append((k, v))
    return md


def compression(args):
    return grpc.Compression.Gzip if args.gzip else None


def subscribe(args):
    channel = channel_for(args.target, args)
    call_channels = [c.split(",") for c in args.call] or [args.channel]
    calls = []
    threads = []
    for i, channels in enumerate(call_channels):
        req = pb.SubscribeRequest(channels=channels)
        if args.since is not None:
            req.since = args.since
        if args.pad_bytes:
            # Valid channel names, as many as make the request this long.
            k = 0
            while req.ByteSize() <= args.pad_bytes:
                req.channels.append(f"pad.{k}." + "x" * 100)
                k += 1
        if args.method:
            rpc = channel.unary_stream(
                args.method,
                request_serializer=pb.SubscribeRequest.SerializeToString,
                response_deserializer=pb.ServerFrame.FromString,
            )
        else:
            rpc = pb_grpc.GatewayStub(channel).Subscribe
        call = rpc(req, metadata=call_metadata(args), compression=compression(args))
        calls.append(call)
        t = threading.Thread(target=read_frames, args=(i, call), daemon=True)
        t.start()
        threads.append(t)

    def cancel_on_eof():
        sys.stdin.read()
        for c in calls:
            c.cancel()

    threading.Thread(target=cancel_on_eof, daemon=True).start()
    for t in threads:
        t.join()
    channel.close()


def client_frame(cmd):
    if "send" in cmd:
        s = cmd["send"]
        if "payload_b64" in s:
            payload = base64.b64decode(s["payload_b64"])
        elif "pad" in s:
            payload = b"x" * s["pad"]
        else:
            payload = s.get("payload", "").encode()
        return pb.ClientFrame(
            send=pb.Send(
                channel=s.get("channel", ""),
                ref=s.get("ref", ""),
                payload=payload,
                binary=s.get("binary", False),
            )
        )
    if "subscribe" in cmd:
        s = cmd["subscribe"]
        more = pb.SubscribeMore(channels=s.get("channels", []), ref=s.get("ref", ""))
        if s.get("since") is not None:
            more.since = s["since"]
        return pb.ClientFrame(subscribe=more)
    if "unsubscribe" in cmd:
        u = cmd["unsubscribe"]
        return pb.ClientFrame(
            unsubscribe=pb.Unsubscribe(channels=u.get("channels", []), ref=u.get("ref", ""))
        )
    raise ValueError(f"unknown command {cmd}")


def connect(args):
    channel = channel_for(args.target, args)
    holder = {}

    def requests():
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            cmd = json.loads(line)
            if cmd.get("cancel"):
                holder["call"].cancel()
                return
            yield client_frame(cmd)

    call = pb_grpc.GatewayStub(channel).Connect(
        requests(), metadata=call_metadata(args), compression=compression(args)
    )
    holder["call"] = call
    read_frames(0, call)
    channel.close()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("subscribe", "connect"):
        s = sub.add_parser(name)
        s.add_argument("target")
        s.add_argument("--token")
        s.add_argument("--metadata", action="append", default=[])
        s.add_argument("--gzip", action="store_true")
        s.add_argument("--tls-ca", help="connect over TLS, trusting this CA (PEM)")
        s.add_argument("--tls-name", help="the name the certificate is checked against")
        if name == "subscribe":
            s.add_argument("--channel", action="append", default=[])
            s.add_argument("--call", action="append", default=[])
            s.add_argument("--since", type=int)
            s.add_argument("--pad-bytes", type=int, default=0)
            s.add_argument("--method")
    args = p.parse_args()
    if args.cmd == "subscribe":
        subscribe(args)
    else:
        connect(args)


if __name__ == "__main__":
    main()
