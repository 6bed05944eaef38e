#!/usr/bin/env python3
"""Runs the README's hub (the Python block after `<!-- hub.py`) against the
release gateway with two WebSocket clients on the gateway.v1 subprotocol
(the `websockets` package, a client nobody here wrote): a line one client
sends reaches the other through the hub, the sender gets the hub's private
receipt, and the hub sees the sender leave. Exits non-zero on any failure;
every wait is bounded."""

import asyncio
import json
import pathlib
import re
import selectors
import subprocess
import sys
import tempfile

import websockets

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIMIT_S = 20


def hub_source() -> str:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- hub\.py[^>]*-->\s*```python\n(.*?)```", readme, re.S)
    if not m:
        sys.exit("README: no ```python block after <!-- hub.py -->")
    return m.group(1)


async def frames_until(ws, want, what):
    """Reads frames until `want(frame_text)` holds."""
    async def read():
        while True:
            text = await ws.recv()
            if want(text):
                return text
    try:
        return await asyncio.wait_for(read(), LIMIT_S)
    except asyncio.TimeoutError:
        sys.exit(f"no {what} within {LIMIT_S} s")


async def chat(listen: str):
    url = f"ws://{listen}/ws?channel=room"
    async with websockets.connect(url, subprotocols=["gateway.v1"]) as alice, \
            websockets.connect(url, subprotocols=["gateway.v1"]) as bob:
        assert alice.subprotocol == "gateway.v1", alice.subprotocol
        welcome = json.loads(await alice.recv())
        await bob.recv()
        address = welcome["address"]
        # The hub's PUB may join the gateway after the first line: send
        # until one comes back through the room.
        async def keep_sending():
            n = 0
            while True:
                n += 1
                await alice.send(json.dumps({"channel": "room", "ref": n}) + "\nhello")
                await asyncio.sleep(0.2)
        sender = asyncio.ensure_future(keep_sending())
        line = await frames_until(bob, lambda t: t.endswith(": hello"), "room line at bob")
        meta, payload = line.split("\n", 1)
        assert json.loads(meta)["channel"] == "room", line
        assert payload == f"{address[:8]}: hello", payload
        receipt = await frames_until(
            alice, lambda t: t.startswith('{"channel":"!'), "receipt at alice")
        meta, payload = receipt.split("\n", 1)
        assert json.loads(meta) == {"channel": "!" + address}, receipt
        assert payload == "delivered to room", payload
        sender.cancel()
    return address


def main():
    gateway = ROOT / "target" / "release" / "gateway"
    with tempfile.TemporaryDirectory() as tmp:
        hub_py = pathlib.Path(tmp) / "hub.py"
        hub_py.write_text(hub_source())
        gw = subprocess.Popen(
            [str(gateway), "--listen", "127.0.0.1:0", "--admin-listen", "",
             "--zmq-bind", "tcp://127.0.0.1:5560",
             "--upstream-bind", "tcp://127.0.0.1:5570", "--upstream-presence"],
            stdout=subprocess.PIPE, text=True)
        hub = subprocess.Popen([sys.executable, "-u", str(hub_py)],
                               stdout=subprocess.PIPE, text=True)
        try:
            ready = gw.stdout.readline()
            listen = re.search(r"listen=(\S+)", ready)
            if not listen:
                sys.exit(f"gateway READY line: {ready!r}")
            address = asyncio.run(chat(listen.group(1)))
            # Both clients closed: the hub says who left and why.
            who = address[:8]
            seen = []
            sel = selectors.DefaultSelector()
            sel.register(hub.stdout, selectors.EVENT_READ)
            while not any(l.startswith(f"{who} left: client closed") for l in seen):
                if not sel.select(LIMIT_S):
                    sys.exit(f"the hub printed no departure of {who}: {seen}")
                seen.append(hub.stdout.readline())
        finally:
            hub.kill()
            gw.terminate()
            gw.wait(15)
    print("README hub: chat, receipt and departure OK")


if __name__ == "__main__":
    main()
