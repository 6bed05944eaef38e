#!/usr/bin/env python3
"""One HTTP/2 connection (cleartext, prior knowledge) driven line by line,
for tests/it/http2.rs: python h2 over a plain socket, so that the test
decides every frame the client sends and sees every frame it gets.

Commands, one JSON object per line on stdin:

  {"op": "request", "method": "GET", "path": "/events?channel=a",
   "headers": [["accept", "text/event-stream"]],
   "body": <base64> | null,       a body, sent as the window allows
   "read": true,                  false: its DATA is never acknowledged
   "window": 0}                   WINDOW_UPDATE for the stream at once
  {"op": "grpc-subscribe", "channels": ["a"], "since": null}
  {"op": "reset", "stream": 1}    RST_STREAM CANCEL
  {"op": "close"}                 GOAWAY, then the socket is closed
  (end of stdin)                  the socket is closed

Streams get the ids 1, 3, 5, ... in the order of the commands that open
them. Events, one JSON line each, flushed at once:

  {"type": "opened", "stream": 1}
  {"type": "response", "stream": 1, "headers": [[name, value], ...]}
  {"type": "data", "stream": 1, "data": <base64>}           not gRPC
  {"type": "message", "stream": 1, "channel": ..., "id": ..., "event": ...,
   "payload": <base64>}                                      gRPC
  {"type": "gap", "stream": 1, "channel": ...}              gRPC
  {"type": "trailers", "stream": 1, "headers": [[name, value], ...]}
  {"type": "end", "stream": 1}                              END_STREAM
  {"type": "reset", "stream": 1, "code": 8}                 RST_STREAM
  {"type": "goaway", "code": 0, "last_stream": 1}
  {"type": "closed", "how": "eof" | "reset"}                the connection

Headers come as the gateway sent them (inbound validation is off, so that
a connection-specific header is seen by the test, not refused here).
"""

import argparse
import base64
import json
import os
import selectors
import socket
import struct
import sys

try:
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings
    from h2.errors import ErrorCodes
    from h2.settings import SettingCodes
except ImportError as e:
    sys.stderr.write(f"missing Python package ({e}); install it with: python3 -m pip install h2\n")
    sys.exit(3)

SUBSCRIBE = "/gateway.v1.Gateway/Subscribe"
# A gateway that says nothing for this long while a command waits is
# broken: the client gives up rather than hang (the test has its own net).
READ_TIMEOUT_S = 30.0


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def headers_list(headers):
    out = []
    for k, v in headers:
        k = k.decode() if isinstance(k, bytes) else k
        v = v.decode(errors="replace") if isinstance(v, bytes) else v
        out.append([k, v])
    return out


# ---------------------------------------------------------------------------
# The few protobuf fields of gateway.v1 this client needs, by hand (no
# generated stubs: only h2 is required).
# ---------------------------------------------------------------------------


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def fields(buf):
    """(field number, value) of a message: ints for varints, bytes for
    length-delimited fields."""
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = read_varint(buf, i)
        elif wire == 2:
            n, i = read_varint(buf, i)
            value, i = bytes(buf[i : i + n]), i + n
        else:
            raise ValueError(f"wire type {wire} in a gateway.v1 message")
        yield number, value


def subscribe_request(channels, since):
    """gateway.v1.SubscribeRequest: channels = 1, since = 2."""
    out = b""
    for c in channels:
        c = c.encode()
        out += b"\x0a" + varint(len(c)) + c
    if since is not None:
        out += b"\x10" + varint(since)
    return out


def server_frame(stream, body):
    """A gateway.v1.ServerFrame as an event line."""
    for number, value in fields(body):
        if number == 1:
            m = {"channel": "", "id": 0, "event": "", "payload": b""}
            for n, v in fields(value):
                if n == 1:
                    m["channel"] = v.decode()
                elif n == 2:
                    m["id"] = v
                elif n == 3:
                    m["event"] = v.decode()
                elif n == 4:
                    m["payload"] = v
            m["payload"] = base64.b64encode(m["payload"]).decode()
            return {"type": "message", "stream": stream, **m}
        if number == 2:
            channel = dict(fields(value)).get(1, b"").decode()
            return {"type": "gap", "stream": stream, "channel": channel}
        return {"type": "frame", "stream": stream, "field": number}
    return {"type": "empty-frame", "stream": stream}


# ---------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------


class Client:
    def __init__(self, target, window):
        host, port = target.rsplit(":", 1)
        self.target = target
        self.sock = socket.create_connection((host, int(port)), timeout=READ_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding="utf-8",
                validate_inbound_headers=False,
            )
        )
        settings = {SettingCodes.ENABLE_PUSH: 0}
        if window is not None:
            settings[SettingCodes.INITIAL_WINDOW_SIZE] = window
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.conn.initiate_connection()
        # Stream id -> {"read": bool, "grpc": bool, "buf": bytearray}.
        self.streams = {}
        # Stream id -> body bytes not sent yet (the window was short).
        self.pending = {}
        self.out = bytearray()
        # Received bytes not yet a whole frame.
        self.inbuf = bytearray()
        self.flush()

    def flush(self):
        self.out.extend(self.conn.data_to_send())
        while self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                return
            del self.out[:n]

    def send_pending(self):
        for sid in list(self.pending):
            body = self.pending[sid]
            while body:
                n = min(
                    len(body),
                    self.conn.local_flow_control_window(sid),
                    self.conn.max_outbound_frame_size,
                )
                if n <= 0:
                    break
                self.conn.send_data(sid, body[:n])
                body = body[n:]
            if body:
                self.pending[sid] = body
            else:
                del self.pending[sid]
                self.conn.end_stream(sid)

    def open(self, headers, body, read, grpc, window):
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = {"read": read, "grpc": grpc, "buf": bytearray()}
        self.conn.send_headers(sid, headers, end_stream=body is None)
        if window:
            self.conn.increment_flow_control_window(window, stream_id=sid)
        if body is not None:
            self.pending[sid] = body
            self.send_pending()
        emit({"type": "opened", "stream": sid})

    def command(self, cmd):
        op = cmd["op"]
        if op == "request":
            headers = [
                (":method", cmd.get("method", "GET")),
                (":scheme", "http"),
                (":authority", self.target),
                (":path", cmd["path"]),
            ] + [tuple(h) for h in cmd.get("headers", [])]
            body = cmd.get("body")
            body = None if body is None else base64.b64decode(body)
            self.open(headers, body, cmd.get("read", True), False, cmd.get("window", 0))
        elif op == "grpc-subscribe":
            headers = [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", self.target),
                (":path", SUBSCRIBE),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ] + [tuple(h) for h in cmd.get("headers", [])]
            msg = subscribe_request(cmd["channels"], cmd.get("since"))
            body = b"\x00" + struct.pack(">I", len(msg)) + msg
            self.open(headers, body, True, True, 0)
        elif op == "reset":
            self.conn.reset_stream(cmd["stream"], ErrorCodes.CANCEL)
        elif op == "close":
            self.conn.close_connection()
            self.flush()
            return False
        else:
            raise ValueError(f"unknown command {op!r}")
        self.flush()
        return True

    def receive(self):
        """Reads what came; False once the connection is over."""
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return True
        except ConnectionResetError:
            emit({"type": "closed", "how": "reset"})
            return False
        if not data:
            emit({"type": "closed", "how": "eof"})
            return False
        self.inbuf.extend(data)
        # Frame by frame, for the GOAWAY: python h2 takes one for the end of
        # the connection and refuses every frame after it, while in a
        # graceful shutdown (RFC 9113 §6.8) the streams up to its last
        # stream id go on to their end. After a GOAWAY NO_ERROR the
        # connection's state is put back, so that they are seen.
        while len(self.inbuf) >= 9:
            n = int.from_bytes(self.inbuf[:3], "big")
            if len(self.inbuf) < 9 + n:
                break
            frame = bytes(self.inbuf[: 9 + n])
            del self.inbuf[: 9 + n]
            state = self.conn.state_machine.state
            for ev in self.conn.receive_data(frame):
                self.report(ev)
                if isinstance(ev, h2.events.ConnectionTerminated) and ev.error_code == 0:
                    self.conn.state_machine.state = state
            # Before the next frame: a GOAWAY drops what h2 has not sent.
            self.out.extend(self.conn.data_to_send())
        self.send_pending()
        self.flush()
        return True

    def report(self, ev):
        sid = getattr(ev, "stream_id", None)
        if isinstance(ev, h2.events.ResponseReceived):
            emit({"type": "response", "stream": sid, "headers": headers_list(ev.headers)})
        elif isinstance(ev, h2.events.TrailersReceived):
            emit({"type": "trailers", "stream": sid, "headers": headers_list(ev.headers)})
        elif isinstance(ev, h2.events.DataReceived):
            stream = self.streams.get(sid, {"read": True, "grpc": False, "buf": bytearray()})
            if stream["read"]:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            if not stream["grpc"]:
                if ev.data:
                    emit({"type": "data", "stream": sid, "data": base64.b64encode(ev.data).decode()})
                return
            buf = stream["buf"]
            buf.extend(ev.data)
            while len(buf) >= 5:
                n = struct.unpack(">I", bytes(buf[1:5]))[0]
                if len(buf) < 5 + n:
                    break
                emit(server_frame(sid, bytes(buf[5 : 5 + n])))
                del buf[: 5 + n]
        elif isinstance(ev, h2.events.StreamEnded):
            emit({"type": "end", "stream": sid})
        elif isinstance(ev, h2.events.StreamReset):
            emit({"type": "reset", "stream": sid, "code": int(ev.error_code)})
        elif isinstance(ev, h2.events.ConnectionTerminated):
            emit({"type": "goaway", "code": int(ev.error_code), "last_stream": ev.last_stream_id})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("--window", type=int, default=None, help="SETTINGS_INITIAL_WINDOW_SIZE")
    args = p.parse_args()
    c = Client(args.target, args.window)
    sel = selectors.DefaultSelector()
    sel.register(c.sock, selectors.EVENT_READ, "socket")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    pending = b""
    while True:
        # Written bytes the socket did not take wait for it to have room.
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        sel.modify(c.sock, want, "socket")
        for key, mask in sel.select():
            if key.data == "socket":
                if mask & selectors.EVENT_WRITE:
                    c.flush()
                if mask & selectors.EVENT_READ and not c.receive():
                    c.sock.close()
                    return
                continue
            chunk = os.read(sys.stdin.fileno(), 1 << 16)
            if not chunk:
                c.sock.close()
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip() and not c.command(json.loads(line)):
                    c.sock.close()
                    return


if __name__ == "__main__":
    main()
