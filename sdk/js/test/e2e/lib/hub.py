"""The README's chat hub, with the signals the end-to-end tests wait on.

It takes what clients send from the gateway's upstream endpoint (PULL) and
publishes it back to the same channel, prefixed with who sent it. Like the
publisher it publishes on an XPUB, so it can say `ready` once the gateway
has subscribed (nothing it answers is lost to ZeroMQ's slow joiner), and it
reports every upstream message on stdout so a test sees what reached it.

argv: UPSTREAM (the gateway's upstream= address) ZMQ (its zmq= address).
"""

import base64
import json
import sys

import zmq


def main():
    upstream, zmq_endpoint = sys.argv[1], sys.argv[2]
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(upstream)
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 1000)
    pub.connect(zmq_endpoint)
    while pub.recv()[:1] != b"\x01":
        pass
    say({"op": "ready"})

    while True:
        kind, address, channel, meta, payload = pull.recv_multipart()
        meta = json.loads(meta)
        say({
            "op": "upstream",
            "kind": kind.decode(),
            "channel": channel.decode(),
            "transport": meta.get("transport"),
            "base64": base64.b64encode(payload).decode(),
        })
        if kind == b"message":
            who = meta.get("sub") or address.decode()[:8]
            pub.send_multipart([channel, who.encode() + b": " + payload])


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
