#!/usr/bin/env python3
"""The cluster bed's publisher: one PUB socket connected to every forwarder
given, publishing CHANNELS channels round-robin at RATE messages a second in
all, each channel numbered by the publisher from 1 up (the meta frame's
"id"), so that every gateway fed by any forwarder gives a message the same
id and drops a second copy of it.

Prints `READY` once connected, then publishes until a line `stop` arrives on
stdin; then prints `FINAL {"channel": last_id, ...}` and exits."""

import argparse
import json
import sys
import threading
import time

import zmq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", action="append", required=True)
    ap.add_argument("--channels", type=int, default=30)
    ap.add_argument("--rate", type=float, default=30.0, help="messages a second, all channels")
    ap.add_argument("--no-ids", action="store_true", help="publish without ids")
    a = ap.parse_args()

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 1_000_000)
    pub.setsockopt(zmq.RECONNECT_IVL, 100)
    pub.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
    for e in a.connect:
        pub.connect(e)
    names = [f"c{i:02d}" for i in range(a.channels)]
    last = {n: 0 for n in names}
    stop = threading.Event()

    def stdin_reader():
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=stdin_reader, daemon=True).start()
    print("READY", flush=True)
    period = 1.0 / a.rate
    nxt = time.monotonic()
    i = 0
    while not stop.is_set():
        name = names[i % len(names)]
        i += 1
        last[name] += 1
        n = last[name]
        frames = [name.encode(), f"{name}:{n}:{time.time():.3f}".encode()]
        if not a.no_ids:
            frames.append(json.dumps({"id": str(n)}).encode())
        pub.send_multipart(frames)
        nxt += period
        d = nxt - time.monotonic()
        if d > 0:
            stop.wait(d)
        elif d < -1.0:
            nxt = time.monotonic()  # fell behind: no burst to catch up
    print("FINAL " + json.dumps(last), flush=True)
    pub.close(linger=2000)
    ctx.term()


if __name__ == "__main__":
    main()
