"""A ZeroMQ publisher driven by the end-to-end tests over stdin.

Node has no ZeroMQ binding it can count on, so the tests drive this process
instead: one JSON command per line on stdin, answers as JSON lines on
stdout. Its socket is an XPUB, not a PUB, because an XPUB hears the
gateways' subscriptions: `wait_subscribers` answers once that many gateways
have subscribed, so nothing is published into ZeroMQ's slow-joiner gap and
no test has to guess how long that takes.

Commands:
  {"op": "wait_subscribers", "n": 2}     answered {"op": "subscribers", "n": 2}
  {"op": "publish", "channel": "news", "text": "hi", "id": 7, "event": "e"}
  {"op": "publish", "channel": "news", "base64": "AP8Q"}   (binary payload)

argv: "bind" ENDPOINT (gateways connect to it; the endpoint it got is the
first line on stdout) or "connect" ENDPOINT (a gateway's zmq= address).
"""

import base64
import json
import os
import sys

import zmq


def main():
    mode, endpoint = sys.argv[1], sys.argv[2]
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    # Every gateway's subscription, not only the first of each prefix.
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)
    # No limit on what waits for a slow gateway: the tests count every message.
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 1000)
    if mode == "bind":
        pub.bind(endpoint)
    else:
        pub.connect(endpoint)
    say({"op": "ready", "endpoint": pub.getsockopt_string(zmq.LAST_ENDPOINT)})

    stdin = sys.stdin.fileno()
    poller = zmq.Poller()
    poller.register(pub, zmq.POLLIN)
    poller.register(stdin, zmq.POLLIN)
    subscribers = 0
    waiting_for = None
    pending = b""
    while True:
        for sock, _ in poller.poll():
            if sock is pub:
                frame = pub.recv()
                if frame[:1] == b"\x01":
                    subscribers += 1
            else:
                chunk = os.read(stdin, 65536)
                if not chunk:
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    cmd = json.loads(line)
                    if cmd["op"] == "wait_subscribers":
                        waiting_for = cmd["n"]
                    elif cmd["op"] == "publish":
                        publish(pub, cmd)
                    else:
                        raise ValueError(f"unknown command {cmd!r}")
        if waiting_for is not None and subscribers >= waiting_for:
            say({"op": "subscribers", "n": subscribers})
            waiting_for = None


def publish(pub, cmd):
    if "base64" in cmd:
        payload = base64.b64decode(cmd["base64"])
    else:
        payload = cmd["text"].encode()
    frames = [cmd["channel"].encode(), payload]
    meta = {k: cmd[k] for k in ("id", "event") if k in cmd}
    if meta:
        frames.append(json.dumps(meta).encode())
    pub.send_multipart(frames)


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
