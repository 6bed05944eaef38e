#!/usr/bin/env python3
"""A hub worker of the cluster bed, connected to the upstream endpoint of
every gateway given. Prints one line per message it receives, flushed at
once, so that what it got is known even after a SIGKILL. Prints `READY`
once connected.

Two modes, as the gateways' upstream socket is:

- PUSH (the default): a PULL socket; the gateways spread messages
  round-robin over the hubs connected. Lines: `MSG <kind> <payload>`.
- DEALER (`--confirm`, the gateways run with `upstream_confirm_ms`): a
  ROUTER socket; every message comes as `[identity, seq, kind, address,
  channel, meta, payload]`, seq 8 bytes big-endian, numbered per gateway
  process, and is confirmed with `[identity, seq]` once it is printed (so a
  message this hub confirmed is in its output, even if it is killed right
  after). A message not confirmed in time is sent again, maybe to this hub
  again: copies are told apart by (the address's first 16 hex digits, which
  name the gateway process, seq). Lines: `MSG <kind> <payload> <gateway>
  <seq>` for the first copy, `DUP <kind> <payload> <gateway> <seq>` for
  another one (confirmed too, and not handled again)."""

import argparse
import os
import time

import zmq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", action="append", required=True)
    ap.add_argument("--work-us", type=int, default=0, help="simulated work per message")
    ap.add_argument("--confirm", action="store_true", help="ROUTER: confirm every message (see above)")
    a = ap.parse_args()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER if a.confirm else zmq.PULL)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    for e in a.connect:
        sock.connect(e)
    print("READY", flush=True)
    spin = a.work_us / 1e6
    seen = set()

    def work():
        if spin:
            end = time.perf_counter() + spin
            while time.perf_counter() < end:
                pass

    # Unbuffered writes: a line is out before the confirmation that
    # follows it.
    out = 1
    while True:
        if not a.confirm:
            kind, _address, _channel, _meta, payload = sock.recv_multipart()
            work()
            os.write(out, f"MSG {kind.decode()} {payload.decode(errors='replace')}\n".encode())
            continue
        ident, seq, kind, address, _channel, _meta, payload = sock.recv_multipart()
        key = (address[:16], seq)
        tag = "DUP" if key in seen else "MSG"
        if tag == "MSG":
            seen.add(key)
            work()
        os.write(out, f"{tag} {kind.decode()} {payload.decode(errors='replace')} {address[:16].decode()} "
                      f"{int.from_bytes(seq, 'big')}\n".encode())
        sock.send_multipart([ident, seq])


if __name__ == "__main__":
    main()
