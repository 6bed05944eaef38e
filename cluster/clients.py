#!/usr/bin/env python3
"""The cluster bed's clients, run on the client host against the balancer:
WebSocket (the websockets package, resuming with `since=`), SSE (raw
asyncio streams reading `id:` lines, resuming with `Last-Event-ID`),
long-poll (raw HTTP/1.1 with `since=`), and the SDK in Node
(cluster/sdk_clients.mjs, started here, its JSON lines read here). Each
client follows one channel and records every id it receives, every gap
signal, and when its connections ended and came back.

Senders (`--senders N`) are WebSocket clients on `gateway.v1` that send
`sender:seq` on channel `up` and record which refs the gateway acked.

Protocol with the driver: prints `READY ...` once every client has had a
message (senders: its welcome); then on a stdin line
`finish FINALS_JSON TIMEOUT_S` it waits (at most TIMEOUT_S) until every
client has the last id of its channel, stops them all, writes the records
as JSON to --out and prints `FINISHED`; on `status` it prints
`STATUS down=N lag_max=S` (clients not connected now; how late its event
loop has run since READY, at most: the times it records are late by no
more). Also prints `STAT ...` every few seconds on stderr.

The driver may start several of these (`--tag` keeps the names apart), so
that one process's CPU is not what a reconnect storm measures."""

import argparse
import asyncio
import json
import os
import random
import sys
import time

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

HERE = os.path.dirname(os.path.abspath(__file__))


class Rec:
    """What one client saw."""

    __slots__ = ("name", "t", "ch", "ids", "gaps", "connects", "drops", "last", "up")

    def __init__(self, name, transport, channel):
        self.name = name
        self.t = transport
        self.ch = channel
        self.ids = []
        self.gaps = []  # [time, len(ids) when told]
        self.connects = []  # times a connection was (re)established
        self.drops = []  # [time, reason]
        self.last = 0
        self.up = False

    def got(self, i):
        self.ids.append(i)
        if i > self.last:
            self.last = i

    def gap(self):
        self.gaps.append([time.time(), len(self.ids)])

    def connected(self):
        self.connects.append(time.time())
        self.up = True

    def dropped(self, reason):
        self.drops.append([time.time(), str(reason)])
        self.up = False

    def dump(self):
        return {
            "name": self.name,
            "t": self.t,
            "ch": self.ch,
            "ids": self.ids,
            "gaps": self.gaps,
            "connects": self.connects,
            "drops": self.drops,
        }


class Pacer:
    """Spreads the first connections over time (`rate` a second)."""

    def __init__(self, rate):
        self.gap = 1.0 / rate
        self.next = time.monotonic()

    async def turn(self):
        now = time.monotonic()
        at = max(now, self.next)
        self.next = at + self.gap
        if at > now:
            await asyncio.sleep(at - now)


async def sleep_or_stop(stop, s):
    try:
        await asyncio.wait_for(stop.wait(), s)
    except asyncio.TimeoutError:
        pass


def retry_after(headers, default):
    try:
        return max(0.2, float(headers.get("retry-after")))
    except (TypeError, ValueError):
        return default


async def ws_client(rec, host, port, pacer):
    await pacer.turn()
    while True:
        url = f"ws://{host}:{port}/ws?channel={rec.ch}"
        if rec.last:
            url += f"&since={rec.last}"
        delay = random.uniform(0.5, 3.0)
        try:
            async with ws_connect(
                url, ping_interval=None, open_timeout=15, compression=None, max_queue=None,
                close_timeout=2,
            ) as ws:
                rec.connected()
                try:
                    while True:
                        msg = await ws.recv()
                        meta, _, _payload = msg.partition("\n")
                        m = json.loads(meta)
                        if m.get("gap"):
                            rec.gap()
                        elif "id" in m:
                            rec.got(int(m["id"]))
                except ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd else 1006
                    rec.dropped(f"ws {code}")
                    if code == 1012:  # drain: come back after 1-5 s
                        delay = random.uniform(1.0, 5.0)
        except InvalidStatus as e:
            rec.dropped(f"ws status {e.response.status_code}")
            delay = retry_after(e.response.headers, delay)
        except (OSError, asyncio.TimeoutError, ConnectionClosed) as e:
            rec.dropped(f"ws {type(e).__name__}")
        await asyncio.sleep(delay)


async def read_head(reader):
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("closed before the status line")
    parts = line.decode("latin-1").split(" ", 2)
    status = int(parts[1])
    headers = {}
    while True:
        h = await reader.readline()
        if not h:
            raise ConnectionResetError("closed in the head")
        if h in (b"\r\n", b"\n"):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def read_body(reader, headers):
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return out
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    n = int(headers.get("content-length", "0"))
    return await reader.readexactly(n) if n else b""


async def close_writer(writer):
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2)
    except Exception:
        pass


async def sse_client(rec, host, port, pacer):
    await pacer.turn()
    while True:
        delay = random.uniform(0.5, 3.0)
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 15)
            head = f"GET /events?channel={rec.ch} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            if rec.last:
                head += f"Last-Event-ID: {rec.last}\r\n"
            writer.write((head + "\r\n").encode())
            status, headers = await asyncio.wait_for(read_head(reader), 15)
            if status != 200:
                await read_body(reader, headers)
                rec.dropped(f"sse status {status}")
                delay = retry_after(headers, delay)
            else:
                rec.connected()
                retry_ms = None
                buf = b""
                chunked = headers.get("transfer-encoding", "").lower() == "chunked"
                reason = "sse end"
                while True:
                    if chunked:
                        data = await reader.readline()
                        if not data:
                            reason = "sse eof"
                            break
                        size = int(data.split(b";")[0], 16)
                        if size == 0:
                            break
                        data = await reader.readexactly(size)
                        await reader.readexactly(2)
                    else:
                        data = await reader.read(65536)
                        if not data:
                            break
                    buf += data
                    while b"\n\n" in buf:
                        ev, buf = buf.split(b"\n\n", 1)
                        eid = None
                        name = None
                        for line in ev.split(b"\n"):
                            if line.startswith(b"id:"):
                                eid = int(line[3:].strip())
                            elif line.startswith(b"event:"):
                                name = line[6:].strip()
                            elif line.startswith(b"retry:"):
                                retry_ms = int(line[6:].strip())
                        if name == b"gap":
                            rec.gap()
                        elif eid is not None:
                            rec.got(eid)
                rec.dropped(reason)
                if retry_ms is not None:
                    delay = retry_ms / 1000.0
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            rec.dropped(f"sse {type(e).__name__}")
        finally:
            if writer is not None:
                await close_writer(writer)
        await asyncio.sleep(delay)


async def lp_client(rec, host, port, pacer):
    await pacer.turn()
    cursor = None
    while True:
        delay = random.uniform(0.5, 3.0)
        writer = None
        first = True
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 15)
            while True:
                q = f"/events?channel={rec.ch}" + (f"&since={cursor}" if cursor else "")
                writer.write(f"GET {q} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                status, headers = await read_head(reader)
                body = await asyncio.wait_for(read_body(reader, headers), 15)
                closing = headers.get("connection", "").lower() == "close"
                if status != 200:
                    rec.dropped(f"lp status {status}")
                    delay = retry_after(headers, delay)
                    break
                if first:
                    rec.connected()
                    first = False
                r = json.loads(body)
                if r.get("gaps"):
                    rec.gap()
                for m in r.get("messages", []):
                    rec.got(int(m["id"]))
                cursor = r.get("cursor") or cursor
                if closing:
                    rec.dropped("lp close" + (" empty" if not r.get("messages") else ""))
                    # An empty answer that closes: a draining gateway, come
                    # back after 1-5 s (as the SDK does); a closing answer
                    # with messages: the first backoff step.
                    delay = random.uniform(1.0, 5.0) if not r.get("messages") else random.uniform(0, 0.5)
                    break
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            rec.dropped(f"lp {type(e).__name__}")
        finally:
            if writer is not None:
                await close_writer(writer)
        await asyncio.sleep(delay)


class Sender:
    __slots__ = ("name", "sent", "acked", "errors", "drops", "seq")

    def __init__(self, name):
        self.name = name
        self.sent = []  # [seq, time]
        self.acked = {}  # seq -> time
        self.errors = []
        self.drops = []
        self.seq = 0

    def dump(self):
        return {"name": self.name, "sent": self.sent, "acked": self.acked, "errors": self.errors, "drops": self.drops}


async def sender(s, host, port, stop, sending, rate, pacer):
    await pacer.turn()
    while not stop.is_set():
        try:
            async with ws_connect(
                f"ws://{host}:{port}/ws?channel=down", subprotocols=["gateway.v1"],
                ping_interval=None, open_timeout=15, compression=None, close_timeout=2,
            ) as ws:
                welcome = json.loads(await ws.recv())
                assert welcome.get("type") == "welcome", welcome

                async def reader():
                    async for msg in ws:
                        if isinstance(msg, str) and msg.startswith("{\"type\""):
                            m = json.loads(msg.split("\n", 1)[0])
                            if m["type"] == "ack":
                                s.acked[int(m["ref"])] = time.time()
                            elif m["type"] == "error":
                                s.errors.append(m)

                rd = asyncio.ensure_future(reader())
                try:
                    await sending.wait()
                    while not stop.is_set() and sending.is_set() and not rd.done():
                        s.seq += 1
                        n = s.seq
                        s.sent.append([n, time.time()])
                        await ws.send(f'{{"channel":"up","ref":"{n}"}}\n{s.name}:{n}')
                        await asyncio.sleep(random.uniform(0.5, 1.5) / rate)
                    # Wait for the last acks.
                    await sleep_or_stop(stop, 3600)
                finally:
                    rd.cancel()
        except (OSError, asyncio.TimeoutError, ConnectionClosed, InvalidStatus) as e:
            s.drops.append([time.time(), type(e).__name__])
        await sleep_or_stop(stop, 1.0)


async def sdk_clients(recs, host, port, stop, channels):
    """The SDK in Node: one process, many clients; its lines fill `recs`."""
    spec = ",".join(r.ch for r in recs)
    proc = await asyncio.create_subprocess_exec(
        "node", os.path.join(HERE, "sdk_clients.mjs"), f"http://{host}:{port}", spec,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 20,
    )

    async def read():
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            try:
                e = json.loads(line)
            except ValueError:
                continue
            r = recs[e["i"]]
            k = e["k"]
            if k == "m":
                r.got(int(e["id"]))
            elif k == "gap":
                r.gap()
            elif k == "s":
                if e["s"] == "connected":
                    r.connected()
                elif e["s"] == "disconnected" and e.get("r") != "closed" and r.connects and (not r.drops or r.drops[-1][0] < r.connects[-1]):
                    r.dropped(f"sdk {e.get('r')}")

    rd = asyncio.ensure_future(read())
    await stop.wait()
    try:
        proc.stdin.write(b"stop\n")
        await proc.stdin.drain()
        await asyncio.wait_for(proc.wait(), 10)
    except Exception:
        proc.kill()
    rd.cancel()


async def amain(a):
    random.seed(a.seed)
    stop = asyncio.Event()
    sending = asyncio.Event()
    pacer = Pacer(a.ramp)
    channels = [f"c{i:02d}" for i in range(a.channels)]
    recs = []
    clients = []  # tasks cancelled at the end (they loop until then)
    tasks = []  # tasks that end by themselves once `stop` is set
    for kind, n, fn in (("ws", a.ws, ws_client), ("sse", a.sse, sse_client), ("lp", a.lp, lp_client)):
        for i in range(n):
            r = Rec(f"{a.tag}{kind}{i}", kind, random.choice(channels))
            recs.append(r)
            clients.append(asyncio.ensure_future(fn(r, a.host, a.port, pacer)))
    sdk = [Rec(f"{a.tag}sdk{i}", "sdk", random.choice(channels)) for i in range(a.sdk)]
    recs.extend(sdk)
    if sdk:
        tasks.append(asyncio.ensure_future(sdk_clients(sdk, a.host, a.port, stop, channels)))
    senders = [Sender(f"{a.tag}s{i}") for i in range(a.senders)]
    for s in senders:
        tasks.append(asyncio.ensure_future(sender(s, a.host, a.port, stop, sending, a.send_rate, pacer)))

    loop = asyncio.get_running_loop()
    lines = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline()))

    # How late this process's event loop runs (a 100 ms tick that comes
    # late): the times it records are that late at most.
    lag = {"max": 0.0, "window": 0.0}

    async def ticker():
        while True:
            t = loop.time()
            await asyncio.sleep(0.1)
            late = loop.time() - t - 0.1
            lag["max"] = max(lag["max"], late)
            lag["window"] = max(lag["window"], late)

    clients.append(asyncio.ensure_future(ticker()))

    started = time.monotonic()
    while True:
        ready = sum(1 for r in recs if r.ids)
        if ready == len(recs) and all(s.seq >= 0 for s in senders):
            break
        if time.monotonic() - started > a.ready_timeout:
            print(f"NOTREADY {ready}/{len(recs)}", flush=True)
            break
        await asyncio.sleep(0.1)
    sending.set()
    lag["max"] = 0.0
    print(f"READY clients={len(recs)} in_s={time.monotonic() - started:.1f}", flush=True)

    async def stats():
        while not stop.is_set():
            await sleep_or_stop(stop, 5)
            print(f"STAT t={time.time():.1f} msgs={sum(len(r.ids) for r in recs)} "
                  f"sent={sum(len(s.sent) for s in senders)} acked={sum(len(s.acked) for s in senders)} "
                  f"down={sum(1 for r in recs if not r.up)} lag_max_5s={lag['window']:.3f}",
                  file=sys.stderr, flush=True)
            lag["window"] = 0.0

    tasks.append(asyncio.ensure_future(stats()))
    while True:
        line = await lines.get()
        if not line:
            finals, timeout = {}, 0
            break
        parts = line.split()
        if parts and parts[0] == "finish":
            finals, timeout = json.loads(parts[1]), float(parts[2])
            break
        if parts and parts[0] == "status":
            print(f"STATUS down={sum(1 for r in recs if not r.up)} lag_max={lag['max']:.3f}", flush=True)
        if parts and parts[0] == "stop_sending":
            sending.clear()
            print("SENDING_STOPPED", flush=True)
    sending.clear()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        behind = [r for r in recs if r.last < finals.get(r.ch, 0)]
        unacked = sum(len(s.sent) - len(s.acked) for s in senders)
        if not behind and not unacked:
            break
        await asyncio.sleep(0.2)
    stop.set()
    for t in clients:
        t.cancel()
    await asyncio.wait(tasks + clients, timeout=15)
    with open(a.out, "w") as f:
        json.dump({"clients": [r.dump() for r in recs], "senders": [s.dump() for s in senders],
                   "lag_max": lag["max"]}, f)
    print("FINISHED", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--ws", type=int, default=0)
    ap.add_argument("--sse", type=int, default=0)
    ap.add_argument("--lp", type=int, default=0)
    ap.add_argument("--sdk", type=int, default=0)
    ap.add_argument("--senders", type=int, default=0)
    ap.add_argument("--send-rate", type=float, default=10.0)
    ap.add_argument("--channels", type=int, default=30)
    ap.add_argument("--ramp", type=float, default=500.0, help="first connections a second")
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tag", default="", help="prefix of the clients' names (several processes)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    asyncio.run(amain(a))


if __name__ == "__main__":
    main()
