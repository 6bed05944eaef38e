#!/usr/bin/env python3
"""The gateway as a cluster, on one machine: network namespaces as hosts
(cluster/bed), three gateway hosts behind HAProxy in TCP mode (PROXY
protocol v2, health checks on /readyz as an NLB does), two forwarders every
gateway and the publisher connect to, a hub host, a client host.

    python3 cluster/test_cluster.py                 # every scenario
    python3 cluster/test_cluster.py rollout hub_kill  # some
    python3 cluster/test_cluster.py --list

Runs as root (ip netns). Builds target/release/gateway (or uses
GATEWAY_BIN) and needs sdk/js built (`npm ci && npm run build` there).
Exits non-zero when a scenario fails. Logs of every process are kept in
target/cluster/PREFIX/. The namespaces are made with a prefix of this run
and removed on every way out (cluster/bed down PREFIX).

Gateway flags used when the binary has them (see `gateway --help`):
`--zmq-redundant` (two forwarders), `--drain-delay-ms` (1,500 ms: /readyz
says 503 that long before the drain, so HAProxy, checking every 500 ms and
needing two failures, takes a host out before its listener closes;
health_check and rollout), `--upstream-confirm-ms` (500 ms: hub_kill's
hubs are ROUTERs that confirm, and every accepted message must reach a
hub). The rollout's 3,000 clients run in three processes
(`--client-procs`), each reporting how late its event loop ran, so that
the reconnect times measure the gateways, not a starved client."""

import argparse
import csv
import ctypes
import http.client
import io
import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "cluster"
BED = HERE / "bed"
GATEWAY = Path(os.environ.get("GATEWAY_BIN", ROOT / "target" / "release" / "gateway"))

SUBNET = os.environ.get("CLUSTER_SUBNET", "10.213.0")
ADDR = {
    "gw1": f"{SUBNET}.11", "gw2": f"{SUBNET}.12", "gw3": f"{SUBNET}.13",
    "fwd1": f"{SUBNET}.21", "fwd2": f"{SUBNET}.22", "pub": f"{SUBNET}.31",
    "hub": f"{SUBNET}.41", "client": f"{SUBNET}.51", "lb": f"{SUBNET}.61",
}
GATEWAYS = ["gw1", "gw2", "gw3"]
PORT = 8080
ADMIN = 9090
UPSTREAM = 5570
DRAIN_WINDOW_S = 4
# A client comes back at most this long after being asked to go (the
# drain's 1012 and SSE's retry: are 1-5 s, the drained long-poll's wait too).
RETRY_MAX_S = 5
CHANNELS = 30
RATE = 30.0  # messages a second, all channels: one a second per channel

PREFIX = "cb%06x" % (os.getpid() & 0xFFFFFF)
LOGS = ROOT / "target" / "cluster" / PREFIX


# ---------------------------------------------------------------- plumbing

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_netns(ns, fn):
    """Runs fn() in a thread that has entered network namespace `ns` (the
    network namespace is per thread), returns its result."""
    box = {}

    def run():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            box["v"] = fn()
        except BaseException as e:  # handed to the caller
            box["e"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


def http_get(host, path, port=ADMIN, timeout=3.0):
    """GET from a host's address, from inside the client host's namespace."""

    def get():
        c = http.client.HTTPConnection(ADDR[host], port, timeout=timeout)
        try:
            c.request("GET", path, headers={"Host": host})
            r = c.getresponse()
            return r.status, r.read().decode()
        finally:
            c.close()

    return in_netns(f"{PREFIX}-client", get)


def metric(host, name, labels=None):
    """One value of a gateway's /metrics (summed over matching labels)."""
    _, body = http_get(host, "/metrics")
    total = None
    for line in body.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-z_]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        if labels and not all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            continue
        total = (total or 0) + float(m.group(3))
    return total or 0


def wait_until(what, cond, timeout, every=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


class Proc:
    """A process on a host: `ip netns exec` execs it, so the pid is its own.
    Every line of stdout and stderr goes to its log with a timestamp, and is
    kept (stdout in a queue for expect(), both searchable by when())."""

    def __init__(self, name, host, argv, stdin=False):
        self.name = name
        self.host = host
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = open(LOGS / f"{name}.log", "a", buffering=1)
        self.log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(map(str, argv))}\n")
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", f"{PREFIX}-{host}", *map(str, argv)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            start_new_session=True,
        )
        self.out = queue.Queue()
        self.lines = []  # (time, stream, line)
        self.lock = threading.Lock()
        for stream, tag in ((self.p.stdout, "out"), (self.p.stderr, "err")):
            threading.Thread(target=self._read, args=(stream, tag), daemon=True).start()
        PROCS.append(self)

    def _read(self, stream, tag):
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            t = time.time()
            with self.lock:
                self.lines.append((t, tag, line))
            self.log.write(f"{t:.3f} {tag} {line}\n")
            if tag == "out":
                self.out.put(line)
        if tag == "out":
            self.out.put(None)

    def expect(self, prefix, timeout):
        """The next stdout line starting with `prefix` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no '{prefix}' line within {timeout} s (see {self.log.name})")
            try:
                line = self.out.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"{self.name} exited ({self.p.wait()}) before '{prefix}' (see {self.log.name})")
            if line.startswith(prefix):
                return line

    def when(self, pattern, after=0.0):
        """Time of the first line matching `pattern` logged after `after`."""
        rx = re.compile(pattern)
        with self.lock:
            for t, _, line in self.lines:
                if t >= after and rx.search(line):
                    return t
        return None

    def send(self, line):
        self.p.stdin.write((line + "\n").encode())
        self.p.stdin.flush()

    def signal(self, sig):
        if self.p.poll() is None:
            os.kill(self.p.pid, sig)

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


PROCS = []


def stop_all():
    while PROCS:
        PROCS.pop().stop()


def bed(cmd):
    subprocess.run([str(BED), cmd, PREFIX], check=True, stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- the cluster

class Cluster:
    """Forwarders, gateways, the balancer and the publisher of one scenario."""

    def __init__(self, name, subscribe="all", upstream=False, extra=()):
        self.name = name
        self.extra = list(extra)
        self.subscribe = subscribe
        self.upstream = upstream
        self.gw = {}
        self.fwd = {}
        self.lb = None
        self.pub = None
        self.hubs = {}
        self.seen_from = {}

    # -- forwarders
    def start_forwarder(self, f):
        a = ADDR[f]
        p = Proc(f"{self.name}-{f}", f, [GATEWAY, "forwarder", "--publishers", f"tcp://{a}:5560",
                                         "--gateways", f"tcp://{a}:5561"])
        p.expect("READY", 10)
        self.fwd[f] = p
        return p

    # -- gateways
    def start_gateway(self, g):
        a = ADDR[g]
        argv = [
            GATEWAY, "--listen", f"{a}:{PORT}", "--admin-listen", f"{a}:{ADMIN}", "--cores", "1",
            "--zmq-bind", "", "--zmq-subscribe", self.subscribe,
            "--zmq-connect", f"tcp://{ADDR['fwd1']}:5561", "--zmq-connect", f"tcp://{ADDR['fwd2']}:5561",
            "--proxy-protocol-from", ADDR["lb"], "--drain-window-ms", str(DRAIN_WINDOW_S * 1000),
            "--ready-requires-publisher", "--connections-max", "20000",
        ]
        if REDUNDANT_FLAG:
            argv.append("--zmq-redundant")
        if DRAIN_DELAY_MS:
            argv += ["--drain-delay-ms", str(DRAIN_DELAY_MS)]
        if self.upstream:
            argv += ["--upstream-bind", f"tcp://{a}:{UPSTREAM}"]
        argv += self.extra + EXTRA_GATEWAY_ARGS
        p = Proc(f"{self.name}-{g}", g, argv)
        p.expect("READY", 15)
        self.gw[g] = p
        return p

    # -- balancer
    def start_balancer(self):
        cfg = LOGS / f"{self.name}-haproxy.cfg"
        self.sock = LOGS / f"{self.name}-haproxy.sock"
        servers = "\n".join(f"    server {g} {ADDR[g]}:{PORT}" for g in GATEWAYS)
        cfg.write_text(f"""global
    maxconn 9000
    stats socket {self.sock} mode 600 level admin
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    option log-health-checks
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch 1

frontend public
    bind {ADDR['lb']}:80
    maxconn 9000
    default_backend gateways

backend gateways
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host lb
    http-check expect status 200
    default-server send-proxy-v2 check port {ADMIN} inter 500ms fall 2 rise 2
{servers}
""")
        self.lb = Proc(f"{self.name}-haproxy", "lb", ["/usr/sbin/haproxy", "-db", "-f", cfg])
        wait_until("the stats socket", lambda: self.sock.exists(), 10)

    def stat(self):
        """{server: (status, field dict)} from HAProxy's `show stat`."""
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(2)
        s.connect(str(self.sock))
        s.sendall(b"show stat\n")
        buf = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            buf += d
        s.close()
        text = buf.decode().lstrip("# ")
        out = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] == "gateways" and row["svname"] in GATEWAYS:
                out[row["svname"]] = row
        return out

    def wait_status(self, g, status, timeout):
        """Waits until HAProxy says `status` (UP / DOWN) of gateway g;
        returns the time it was first seen."""
        after = time.time() - 60
        def seen():
            t = self.lb.when(rf"Server gateways/{g} is {status}", after=self.seen_from.get(g, after))
            if t is None and self.stat().get(g, {}).get("status", "") == status:
                t = time.time()  # HAProxy logs no "is UP" for a server up from the start
            if t is not None:
                self.seen_from[g] = t + 1e-6
            return t
        return wait_until(f"HAProxy to see {g} {status}", seen, timeout, every=0.05)

    # -- publisher, hubs
    def start_publisher(self):
        self.pub = Proc(f"{self.name}-publisher", "pub", [
            sys.executable, HERE / "publisher.py", "--connect", f"tcp://{ADDR['fwd1']}:5560",
            "--connect", f"tcp://{ADDR['fwd2']}:5560", "--channels", CHANNELS, "--rate", RATE], stdin=True)
        self.pub.expect("READY", 10)

    def stop_publisher(self):
        self.pub.send("stop")
        return json.loads(self.pub.expect("FINAL", 10)[len("FINAL "):])

    def start_hub(self, h, work_us=0, confirm=False):
        argv = [sys.executable, HERE / "hub.py", "--work-us", work_us] + (["--confirm"] if confirm else [])
        for g in GATEWAYS:
            argv += ["--connect", f"tcp://{ADDR[g]}:{UPSTREAM}"]
        p = Proc(f"{self.name}-{h}", "hub", argv)
        p.expect("READY", 10)
        self.hubs[h] = p
        return p

    def up(self):
        for f in ("fwd1", "fwd2"):
            self.start_forwarder(f)
        for g in GATEWAYS:
            self.start_gateway(g)
        self.start_balancer()
        self.start_publisher()
        for g in GATEWAYS:
            self.wait_status(g, "UP", 20)

    # -- clients
    def start_clients(self, timeout=90, procs=1, **counts):
        """Starts the clients, their counts split over `procs` processes (so
        that a reconnect storm is not timed by one starved process)."""
        self.clients = []
        self.clients_out = []
        for k in range(procs):
            out = LOGS / f"{self.name}-clients{k}.json"
            argv = [sys.executable, HERE / "clients.py", "--host", ADDR["lb"], "--port", 80,
                    "--channels", CHANNELS, "--out", out, "--seed", random.randrange(1 << 30),
                    "--tag", f"p{k}-" if procs > 1 else "", "--ramp", 500.0 / procs]
            for key, v in counts.items():
                share = v // procs + (1 if k < v % procs else 0)
                if key == "sdk":  # one Node process already
                    share = v if k == 0 else 0
                if key == "send_rate":
                    share = v
                argv += [f"--{key.replace('_', '-')}", share]
            self.clients.append(Proc(f"{self.name}-clients{k}", "client", argv, stdin=True))
            self.clients_out.append(out)
        for p in self.clients:
            line = p.expect("READY", timeout)
            print(f"  {p.name}: {line}")

    def clients_send(self, line, expect=None, timeout=10):
        for p in self.clients:
            p.send(line)
        return [p.expect(expect, timeout) for p in self.clients] if expect else None

    def finish_clients(self, finals, timeout=30):
        self.clients_send(f"finish {json.dumps(finals, separators=(',', ':'))} {timeout}", "FINISHED", timeout + 30)
        data = {"clients": [], "senders": [], "lag_max": 0.0}
        for out in self.clients_out:
            d = json.loads(out.read_text())
            data["clients"] += d["clients"]
            data["senders"] += d["senders"]
            data["lag_max"] = max(data["lag_max"], d.get("lag_max", 0.0))
        return data

    def clients_status(self):
        """(clients not connected now, the most any client process's loop
        has run late since it was ready)."""
        down, lag = 0, 0.0
        for line in self.clients_send("status", "STATUS"):
            f = dict(kv.split("=") for kv in line.split()[1:])
            down += int(f["down"])
            lag = max(lag, float(f.get("lag_max", 0)))
        return down, lag

    def clients_down(self):
        return self.clients_status()[0]


# ---------------------------------------------------------------- checks

def sequence_faults(rec, final):
    """(lost, duplicated, holes) of one client's ids against the published
    sequence of its channel from its first id to `final`; holes are
    (index in ids, how many missing)."""
    ids = rec["ids"]
    if not ids:
        return final, 0, [(0, final)]
    lost = 0
    dup = 0
    holes = []
    seen = set()
    prev = ids[0] - 1
    for k, i in enumerate(ids):
        if i in seen or i <= prev:
            dup += 1
            continue
        seen.add(i)
        if i != prev + 1:
            holes.append((k, i - prev - 1))
            lost += i - prev - 1
        prev = i
    if prev < final:
        holes.append((len(ids), final - prev))
        lost += final - prev
    return lost, dup, holes


def check_sequences(data, finals, allow_announced=False):
    """Per client: zero lost, zero duplicated (or, with allow_announced,
    every loss announced by a gap signal on the connection it came on)."""
    totals = {"clients": 0, "messages": 0, "lost": 0, "dup": 0, "gaps": 0, "silent": 0, "announced": 0}
    by_t = {}
    bad = []
    for r in data["clients"]:
        lost, dup, holes = sequence_faults(r, finals.get(r["ch"], 0))
        totals["clients"] += 1
        totals["messages"] += len(r["ids"])
        totals["lost"] += lost
        totals["dup"] += dup
        totals["gaps"] += len(r["gaps"])
        t = by_t.setdefault(r["t"], {"clients": 0, "lost": 0, "dup": 0, "gaps": 0})
        t["clients"] += 1
        t["lost"] += lost
        t["dup"] += dup
        t["gaps"] += len(r["gaps"])
        for k, n in holes:
            # Announced: a gap signal came after the message before the
            # hole and before the one after it.
            if any(k - 1 < g[1] <= k or (k == 0 and g[1] == 0) for g in r["gaps"]) or (
                    any(g[1] <= k for g in r["gaps"]) and k == len(r["ids"])):
                totals["announced"] += n
            else:
                totals["silent"] += n
        if dup or (lost and not allow_announced):
            bad.append(f"{r['name']} ({r['t']}, {r['ch']}): lost {lost}, duplicated {dup}, holes {holes[:5]}, "
                       f"gaps {len(r['gaps'])}, ids {r['ids'][:3]}..{r['ids'][-3:]} final {finals.get(r['ch'])}")
    return totals, by_t, bad


def histogram(times, t0, width=1.0):
    bins = {}
    for t in times:
        b = int((t - t0) // width)
        bins[b] = bins.get(b, 0) + 1
    if not bins:
        return bins, "  (none)"
    top = max(bins.values())
    lines = []
    for b in range(min(bins), max(bins) + 1):
        n = bins.get(b, 0)
        lines.append(f"  {b * width:5.1f}-{(b + 1) * width:4.1f} s {n:5d} {'*' * round(40 * n / top)}")
    return bins, "\n".join(lines)


# ---------------------------------------------------------------- scenarios

def scenario_forwarder_kill():
    """A forwarder SIGKILLed and restarted mid-stream, then the other one:
    every gateway is connected to both, so each message still arrives by
    the other path; zero lost, zero duplicated, no client disconnected."""
    c = Cluster("fwdkill", subscribe="demand")
    c.up()
    c.start_clients(ws=60, sse=60, lp=60, sdk=20)

    def dups():
        return {g: metric(g, "gateway_messages_dropped_total", {"reason": DUP_REASON}) for g in GATEWAYS}

    def both_paths_deliver():
        # Every gateway is connected to both forwarders again, and drops
        # second copies again: the restarted path delivers (the gateways'
        # subscriptions reached the publisher through it).
        wait_until("every gateway connected to both forwarders", lambda: all(
            metric(g, "gateway_zmq_peers") >= 2 for g in GATEWAYS), 15)
        start = dups()
        wait_until("second copies on every gateway", lambda: all(
            v - start[g] >= 5 for g, v in dups().items()), 15, every=0.2)

    time.sleep(2)
    before = dups()
    for f in ("fwd1", "fwd2"):
        t = time.time()
        c.fwd[f].signal(signal.SIGKILL)
        c.fwd[f].p.wait(5)
        print(f"  {f} SIGKILLed")
        time.sleep(2)  # two seconds of publishing on one path alone
        c.start_forwarder(f)
        both_paths_deliver()
        print(f"  {f} restarted after 2 s; both paths deliver again after {time.time() - t:.1f} s")
        time.sleep(1)
    finals = c.stop_publisher()
    data = c.finish_clients(finals)
    after = dups()
    totals, by_t, bad = check_sequences(data, finals)
    second = {g: int(after[g] - before[g]) for g in GATEWAYS}
    drops = sum(len(r["drops"]) for r in data["clients"])
    print(f"  {totals}\n  by transport {by_t}\n  second copies dropped ({DUP_REASON}) per gateway: {second}; "
          f"client disconnects: {drops}")
    assert not bad, "\n".join(bad[:10])
    assert totals["gaps"] == 0, f"gap signals: {totals['gaps']}"
    assert drops == 0, f"{drops} client disconnects"
    assert all(v > 0 for v in second.values()), f"no second copies dropped: {second} (not redundant?)"


class Prober:
    """New connections through the balancer all along (one every `every`
    seconds, each a `GET /healthz` with `Connection: close`), from the client
    host: every one that is not answered 200 is a client the balancer sent
    to a gateway that no longer takes connections."""

    def __init__(self, every=0.02):
        self.every = every
        self.results = []  # (time, ok, detail)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=lambda: in_netns(f"{PREFIX}-client", self._run), daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopped.is_set():
            t = time.time()
            try:
                conn = socket.create_connection((ADDR["lb"], 80), timeout=3)
                try:
                    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
                    head = b""
                    while b"\r\n" not in head:
                        d = conn.recv(4096)
                        if not d:
                            break
                        head += d
                finally:
                    conn.close()
                line = head.split(b"\r\n", 1)[0].decode(errors="replace")
                self.results.append((t, line.startswith("HTTP/1.1 200"), line or "closed without an answer"))
            except OSError as e:
                self.results.append((t, False, type(e).__name__))
            self.stopped.wait(max(0.0, t + self.every - time.time()))

    def stop(self):
        self.stopped.set()
        self.thread.join(10)
        return self.results


def scenario_health_check():
    """SIGTERM with a drain delay: the draining gateway's /readyz answers
    503 at once while it goes on serving, HAProxy takes it out of rotation
    (two failed checks 500 ms apart) before the drain closes its listener
    and its first connection, and no connection the balancer sends it
    meanwhile is refused, retried or redispatched."""
    c = Cluster("health")
    c.up()
    c.start_clients(ws=150, sse=75, lp=75)
    prober = Prober()
    wait_until("the prober to be answered", lambda: sum(ok for _, ok, _ in prober.results) >= 10, 10)
    g = "gw1"
    before = c.stat()[g]
    t0 = time.time()
    c.gw[g].signal(signal.SIGTERM)
    t_down = c.wait_status(g, "DOWN", 10)
    at_down = c.stat()[g]
    c.gw[g].p.wait(DRAIN_DELAY_MS / 1000 + DRAIN_WINDOW_S + 10)
    probes = prober.stop()
    after = c.stat()[g]
    t_drain = c.gw[g].when(r"draining: no new connections", after=t0)
    t_first_ask = c.gw[g].when(r"asked_to_go=[1-9]", after=t0)  # logged once a second: an upper bound
    finals = c.stop_publisher()
    data = c.finish_clients(finals)
    closes = sorted(d[0] for r in data["clients"] for d in r["drops"] if d[0] >= t0)
    first = {}
    for r in data["clients"]:
        for d in r["drops"]:
            if d[0] >= t0:
                first[r["t"]] = min(first.get(r["t"], d[0]), d[0])
                break

    def delta(a, b, k):
        return int(b.get(k) or 0) - int(a.get(k) or 0)

    in_delay = delta(before, at_down, "stot")
    failed = [(round(t - t0, 3), d) for t, ok, d in probes if not ok]
    early = [(r["name"], round(d[0] - t0, 3), d[1]) for r in data["clients"] for d in r["drops"]
             if t0 <= d[0] < (t_drain or t0 + DRAIN_DELAY_MS / 1000)]
    errors = {k: delta(before, after, k) for k in ("econ", "wretr", "wredis")}

    def rel(t):
        return f"{t - t0:.3f} s" if t else "never"

    print("  first connection closed by the drain, per transport: " + ", ".join(
        f"{k} {v - t0:.3f} s" for k, v in sorted(first.items())))
    print(f"  SIGTERM at 0 (drain delay {DRAIN_DELAY_MS} ms); HAProxy saw {g} DOWN at {rel(t_down)}; the drain "
          f"started (listener closed) at {rel(t_drain)}; its first connections asked to go by {rel(t_first_ask)}; "
          f"first client connection closed at {rel(closes[0] if closes else None)}; exit status "
          f"{c.gw[g].p.returncode}")
    print(f"  new connections HAProxy sent {g} between SIGTERM and DOWN: {in_delay}; on {g} since SIGTERM: "
          f"connection errors/retries/redispatches {errors['econ']}/{errors['wretr']}/{errors['wredis']}; "
          f"probes through the balancer {len(probes)}, failed {len(failed)} {failed[:5]}; client connections "
          f"ended before the drain: {len(early)} {early[:5]}")
    totals, _, bad = check_sequences(data, finals)
    print(f"  {totals}")
    assert not bad, "\n".join(bad[:10])
    assert c.gw[g].p.returncode == 0, f"drained gateway exited {c.gw[g].p.returncode}"
    assert closes, "no connection was closed by the drain"
    assert t_down < closes[0], (
        f"HAProxy took {g} out at {t_down - t0:.3f} s, after the drain closed its first connection "
        f"({closes[0] - t0:.3f} s)")
    if DRAIN_DELAY_MS:
        assert t_drain and t_down < t_drain, f"HAProxy took {g} out at {rel(t_down)}, the drain started at {rel(t_drain)}"
        assert not failed, f"{len(failed)} connections through the balancer failed: {failed[:10]}"
        assert not any(errors.values()), f"on {g} since SIGTERM: {errors}"
        assert not early, f"{len(early)} client connections ended during the drain delay: {early[:10]}"


def drain_reconnects(data, t0, t_end):
    """(client, transport, drop time, reconnect time) for the connections
    that ended between t0 and t_end."""
    out = []
    for r in data["clients"]:
        for d in r["drops"]:
            if t0 <= d[0] < t_end:
                back = next((t for t in r["connects"] if t > d[0]), None)
                out.append((r["name"], r["t"], d[0], back, d[1]))
                break
    return out


def scenario_rollout():
    """Every gateway host drained and restarted in turn, with 3,000 clients
    connected through the balancer and publishing going on: zero lost, zero
    duplicated, no gap; no connection ended before the drain (the delay);
    every client back within the drain delay and window plus its retry;
    reconnects per second spread, not a spike."""
    c = Cluster("rollout", subscribe=ROLLOUT_SUBSCRIBE)
    c.up()
    c.start_clients(ws=1000, sse=900, lp=900, sdk=200, timeout=120, procs=CLIENT_PROCS)
    time.sleep(2)
    drains = []
    for g in GATEWAYS:
        t0 = time.time()
        c.gw[g].signal(signal.SIGTERM)
        t_down = c.wait_status(g, "DOWN", 10)
        rc = c.gw[g].p.wait(DRAIN_DELAY_MS / 1000 + DRAIN_WINDOW_S + 10)
        t_exit = time.time()
        t_drain = c.gw[g].when(r"draining: no new connections", after=t0)
        if not RESTART_AT_ONCE:
            # Its clients are all back on the other hosts before it starts
            # again: a host that starts receives only what is published from
            # then on, and a client coming back to it from an older cursor
            # would be told of a gap (see --restart-at-once).
            wait_until("every client to be connected again", lambda: c.clients_down() == 0, RETRY_MAX_S + 20,
                       every=0.5)
        c.start_gateway(g)
        t_up = c.wait_status(g, "UP", 20)
        wait_until("every client to be connected again", lambda: c.clients_down() == 0, RETRY_MAX_S + 20, every=0.5)
        t_end = time.time()
        _, lag = c.clients_status()
        drains.append((g, t0, t_end, rc, t_down, t_drain))
        print(f"  {g}: SIGTERM; HAProxy DOWN at {t_down - t0:.2f} s; drain started at "
              f"{(t_drain - t0) if t_drain else float('nan'):.2f} s; exited {rc} at {t_exit - t0:.2f} s; "
              f"restarted, UP at {t_up - t0:.2f} s; all clients back at {t_end - t0:.2f} s; client loops "
              f"late by at most {lag:.3f} s so far")
        time.sleep(2)  # some traffic on the restarted host before the next
    finals = c.stop_publisher()
    data = c.finish_clients(finals, timeout=60)
    totals, by_t, bad = check_sequences(data, finals)
    print(f"  {totals}\n  by transport {by_t}")
    failures = []
    if bad:
        failures.append("lost or duplicated:\n    " + "\n    ".join(bad[:10]) + f"\n    ({len(bad)} clients)")
    if totals["gaps"]:
        failures.append(f"{totals['gaps']} gap signals")
    # The delay, the window (whole seconds, swept once a second), the retry,
    # 1 s slack.
    limit = DRAIN_DELAY_MS / 1000 + DRAIN_WINDOW_S + 1 + RETRY_MAX_S + 1
    print(f"  client processes: {CLIENT_PROCS}; their event loops ran late by at most {data['lag_max']:.3f} s "
          f"(the times they recorded are late by no more)")
    all_back = []
    for g, t0, t_end, rc, t_down, t_drain in drains:
        recs = drain_reconnects(data, t0, t_end)
        late = [x for x in recs if x[3] is None or x[3] - t0 > limit]
        asked = max((x[2] - t0 for x in recs), default=0)
        offline = max((x[3] - x[2] for x in recs if x[3]), default=0)
        print(f"  {g}: last connection closed {asked:.2f} s after SIGTERM (delay {DRAIN_DELAY_MS / 1000:g} s + window {DRAIN_WINDOW_S} s); "
              f"longest time offline {offline:.2f} s (retry at most {RETRY_MAX_S} s)")
        backs = [x[3] for x in recs if x[3] is not None]
        all_back += [b - t0 for b in backs]
        bins, text = histogram(backs, t0)
        by_kind = {}
        for x in recs:
            by_kind[x[1]] = by_kind.get(x[1], 0) + 1
        worst = max(bins.values()) if bins else 0
        print(f"  {g}: {len(recs)} clients moved {by_kind}; back after SIGTERM: max "
              f"{max(b - t0 for b in backs) if backs else 0:.2f} s (limit {limit} s); reconnects per second:\n{text}")
        if rc != 0:
            failures.append(f"{g} exited {rc} after its drain")
        if late:
            failures.append(f"{g}: {len(late)} clients not back within {limit} s: {late[:5]}")
        early = [x for x in recs if x[2] < (t_drain or t0)]
        if DRAIN_DELAY_MS and early:
            failures.append(f"{g}: {len(early)} connections ended before its drain started: {early[:5]}")
        if recs and worst > SPIKE_SHARE * len(recs):
            failures.append(f"{g}: {worst} of {len(recs)} reconnects in one second (over {SPIKE_SHARE:.0%}): a spike")
        for kind in sorted(by_kind):
            kb, ktext = histogram([x[3] for x in recs if x[1] == kind and x[3]], t0)
            print(f"    {kind}: " + " ".join(f"{kb.get(b, 0)}" for b in range(0, max(kb) + 1 if kb else 0)))
    assert not failures, "\n  ".join(failures)


def scenario_gateway_kill():
    """A gateway host SIGKILLed (no drain): its clients resume on the
    others; every message they miss is announced by the gap signal."""
    c = Cluster("gwkill", subscribe="demand")
    c.up()
    c.start_clients(ws=100, sse=100, lp=80, sdk=20)
    time.sleep(2)
    t0 = time.time()
    c.gw["gw2"].signal(signal.SIGKILL)
    t_down = c.wait_status("gw2", "DOWN", 10)
    wait_until("every client to be connected again", lambda: c.clients_down() == 0, 30, every=0.5)
    t_back = time.time()
    time.sleep(2)
    finals = c.stop_publisher()
    data = c.finish_clients(finals)
    totals, by_t, bad = check_sequences(data, finals, allow_announced=True)
    moved = drain_reconnects(data, t0, t_back)
    print(f"  gw2 SIGKILLed; HAProxy DOWN at {t_down - t0:.2f} s; {len(moved)} clients moved, all back at "
          f"{t_back - t0:.2f} s\n  {totals}\n  by transport {by_t}")
    assert moved, "no client was on the killed gateway"
    assert totals["dup"] == 0, "\n".join(bad[:10])
    assert totals["silent"] == 0, f"{totals['silent']} messages lost without a gap signal:\n" + "\n".join(bad[:10])


def scenario_hub_kill():
    """Two hub workers; one hangs (SIGSTOP) and is SIGKILLed while clients
    send: the other takes over. Counts what the gateways accepted (acked: handed to their upstream
    ZeroMQ socket) and what reached a hub. With upstream_confirm_ms (the
    gateways' upstream socket a DEALER, the hubs ROUTERs that confirm each
    message) every accepted message must reach a hub: what the killed hub
    had not confirmed is sent again to the survivor."""
    confirm = UPSTREAM_CONFIRM_MS > 0
    extra = ["--upstream-confirm-ms", str(UPSTREAM_CONFIRM_MS)] if confirm else []
    c = Cluster("hubkill", upstream=True, extra=extra)
    c.up()
    for h in ("hub1", "hub2"):
        c.start_hub(h, work_us=HUB_WORK_US, confirm=confirm)
    wait_until("both hubs on every gateway", lambda: all(
        metric(g, "gateway_upstream_peers") == 2 for g in GATEWAYS), 15)
    c.start_clients(senders=30, send_rate=10)

    def count(h):
        with c.hubs[h].lock:
            return sum(1 for _, t, line in c.hubs[h].lines if t == "out" and line.startswith("MSG message "))

    wait_until("both hubs to receive", lambda: count("hub1") >= 300 and count("hub2") >= 300, 15, every=0.1)
    # hub1 hangs (SIGSTOP) with messages coming to it, then is killed: it
    # dies holding messages it received and never handled or confirmed.
    c.hubs["hub1"].signal(signal.SIGSTOP)
    t_stop = time.time()
    if confirm:
        held = wait_until("the gateways to hold messages hub1 has not confirmed", lambda: sum(
            metric(g, "gateway_upstream_unconfirmed") for g in GATEWAYS) >= 20 and sum(
            metric(g, "gateway_upstream_unconfirmed") for g in GATEWAYS), 5, every=0.05)
    else:
        time.sleep(0.3)
        held = None
    t_kill = time.time()
    c.hubs["hub1"].signal(signal.SIGKILL)
    c.hubs["hub1"].p.wait(5)
    print(f"  hub1 stopped, then SIGKILLed {t_kill - t_stop:.2f} s later" + (
        f", the gateways holding {int(held)} messages unconfirmed" if confirm else ""))
    wait_until("the gateways to see one hub", lambda: all(
        metric(g, "gateway_upstream_peers") == 1 for g in GATEWAYS), 15)
    t_seen = time.time()
    on_hub2 = count("hub2")
    wait_until("hub2 to take over", lambda: count("hub2") >= on_hub2 + 600, 15, every=0.1)
    c.clients_send("stop_sending", "SENDING_STOPPED")
    finals = c.stop_publisher()
    data = c.finish_clients(finals, timeout=20)

    def lines(h, tag):
        with c.hubs[h].lock:
            return [line.split(" ") for _, t, line in c.hubs[h].lines if t == "out" and line.startswith(tag + " message ")]

    def received(h):
        return {x[2] for x in lines(h, "MSG")}

    acked = {}
    sent = 0
    for sd in data["senders"]:
        sent += len(sd["sent"])
        sent_at = dict((n, t) for n, t in sd["sent"])
        for ref, t in sd["acked"].items():
            acked[f"{sd['name']}:{ref}"] = (sent_at[int(ref)], t)
    want = len(acked)
    if confirm:
        # Every message handed to the hubs confirmed by one (the gateways
        # send again what is not): nothing more will come.
        wait_until("every gateway to have every message confirmed", lambda: all(
            metric(g, "gateway_upstream_unconfirmed") == 0 for g in GATEWAYS), 20, every=0.2)
    # Whatever is still missing is lost: hub2 going quiet for 2 s ends the wait.
    wait_until("hub2 to have everything acked, or to stop receiving", lambda: (
        len(acked.keys() - received("hub1") - received("hub2")) == 0 or _quiet(c.hubs["hub2"], 2.0)), 20, every=0.2)
    r1, r2 = received("hub1"), received("hub2")
    lost = sorted(acked.keys() - r1 - r2, key=lambda k: acked[k][1])
    after = [k for k in lost if acked[k][1] > t_seen]
    errors = sum(len(sd["errors"]) for sd in data["senders"])
    print(f"  upstream: {'DEALER, confirm within ' + str(UPSTREAM_CONFIRM_MS) + ' ms, ROUTER hubs' if confirm else 'PUSH, PULL hubs'}")
    print(f"  sent {sent}, accepted (acked: handed to the gateway's upstream socket) {want}, refused {errors}; "
          f"reached hub1 {len(r1)} (until its SIGKILL), hub2 {len(r2)}; accepted and never reached a hub: "
          f"{len(lost)}, of which acked after the gateways saw hub1 gone: {len(after)}; gateways saw it "
          f"gone {t_seen - t_kill:.2f} s after the kill")
    if confirm:
        per_hub = {}
        for h in ("hub1", "hub2"):
            first = lines(h, "MSG")
            again = lines(h, "DUP")
            per_hub[h] = (len({(x[3], x[4]) for x in first}), len(again))
        ids1 = {(x[3], x[4]) for x in lines("hub1", "MSG")}
        ids2 = {(x[3], x[4]) for x in lines("hub2", "MSG")}
        both = len(ids1 & ids2)
        print("  distinct (gateway, seq) per hub, and copies it got again: " + ", ".join(
            f"{h} {n} (+{d} again)" for h, (n, d) in per_hub.items()) + f"; on both hubs (confirmation lost "
            f"with hub1, sent again to hub2): {both}; gateways: {len({x[0] for x in ids1 | ids2})}")
        sent_again = {g: int(metric(g, "gateway_upstream_resent_total")) for g in GATEWAYS}
        print(f"  sent again (gateway_upstream_resent_total) per gateway: {sent_again}")
    if lost:
        print(f"  lost acked between {acked[lost[0]][1] - t_kill:+.3f} s and {acked[lost[-1]][1] - t_kill:+.3f} s "
              f"of the kill")
    assert want == sent, f"{sent - want} messages never acked"
    assert len(r2) > 0 and not after, f"{len(after)} messages acked after hub1 was gone did not reach hub2"
    if HUB_STRICT or confirm:
        assert not lost, f"{len(lost)} accepted messages lost with hub1: {lost[:10]}"
    if confirm:
        assert sum(sent_again.values()) > 0, "nothing was sent again: the kill did not test the confirmations"


def _quiet(p, s):
    with p.lock:
        last = p.lines[-1][0] if p.lines else 0
    return time.time() - last > s


SCENARIOS = {
    "forwarder_kill": scenario_forwarder_kill,
    "health_check": scenario_health_check,
    "rollout": scenario_rollout,
    "gateway_kill": scenario_gateway_kill,
    "hub_kill": scenario_hub_kill,
}

REDUNDANT_FLAG = False
# After SIGTERM the gateway keeps serving this long while /readyz says 503:
# HAProxy's checks (every 500 ms, two failures) take it out first.
DRAIN_DELAY_MS = 0
DUP_REASON = "not_after_last"
EXTRA_GATEWAY_ARGS = []
ROLLOUT_SUBSCRIBE = "all"
SPIKE_SHARE = 0.35
HUB_STRICT = False
CLIENT_PROCS = 3
# The gateways' upstream_confirm_ms in hub_kill (when they have the flag):
# hubs on ROUTER sockets confirm every message; one not confirmed within
# this long is sent again.
UPSTREAM_CONFIRM_MS = 0
HUB_WORK_US = 0
RESTART_AT_ONCE = False


def main():
    global RESTART_AT_ONCE, REDUNDANT_FLAG, DRAIN_DELAY_MS, UPSTREAM_CONFIRM_MS, CLIENT_PROCS, DUP_REASON, EXTRA_GATEWAY_ARGS, ROLLOUT_SUBSCRIBE, HUB_STRICT, HUB_WORK_US
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", help="default: all, in order")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--rollout-subscribe", default="all", choices=["all", "demand"],
                    help="zmq_subscribe of the gateways in the rollout")
    ap.add_argument("--restart-at-once", action="store_true",
                    help="rollout: restart a drained gateway as soon as it exits, not once its clients are back")
    ap.add_argument("--hub-strict", action="store_true", help="fail hub_kill on any accepted message lost")
    ap.add_argument("--hub-work-us", type=int, default=0, help="simulated work per message in the hubs")
    ap.add_argument("--drain-delay-ms", type=int, default=1500,
                    help="the gateways' drain_delay_ms (when they have the flag)")
    ap.add_argument("--upstream-confirm-ms", type=int, default=500,
                    help="hub_kill: the gateways' upstream_confirm_ms (when they have the flag)")
    ap.add_argument("--client-procs", type=int, default=3, help="rollout: client processes")
    ap.add_argument("--gateway-arg", action="append", default=[], help="extra gateway flag (repeatable)")
    a = ap.parse_args()
    if a.list:
        for n, f in SCENARIOS.items():
            print(f"{n}: {' '.join(f.__doc__.split())}")
        return 0
    names = a.scenarios or list(SCENARIOS)
    for n in names:
        if n not in SCENARIOS:
            ap.error(f"no scenario {n}")
    RESTART_AT_ONCE = a.restart_at_once
    ROLLOUT_SUBSCRIBE, HUB_STRICT, HUB_WORK_US = a.rollout_subscribe, a.hub_strict, a.hub_work_us
    EXTRA_GATEWAY_ARGS = a.gateway_arg
    CLIENT_PROCS = max(1, a.client_procs)
    if os.geteuid() != 0:
        print("needs root (ip netns)", file=sys.stderr)
        return 2
    if "GATEWAY_BIN" not in os.environ:
        subprocess.run(["cargo", "build", "--release", "-p", "gateway"], cwd=ROOT, check=True)
    if not (ROOT / "sdk" / "js" / "dist" / "index.js").exists():
        subprocess.run(["npm", "run", "build"], cwd=ROOT / "sdk" / "js", check=True)
    help_text = subprocess.run([GATEWAY, "--help"], capture_output=True, text=True).stdout
    REDUNDANT_FLAG = "--zmq-redundant" in help_text
    DRAIN_DELAY_MS = a.drain_delay_ms if "--drain-delay-ms" in help_text else 0
    UPSTREAM_CONFIRM_MS = a.upstream_confirm_ms if "--upstream-confirm-ms" in help_text else 0
    DUP_REASON = "duplicate" if REDUNDANT_FLAG else "not_after_last"

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")

    signal.signal(signal.SIGTERM, on_signal)
    failed = []
    print(f"bed {PREFIX}: logs in {LOGS.relative_to(ROOT)}; --zmq-redundant: {REDUNDANT_FLAG}; "
          f"--drain-delay-ms: {DRAIN_DELAY_MS or 'no'}; --upstream-confirm-ms: {UPSTREAM_CONFIRM_MS or 'no'}")
    try:
        bed("up")
        for n in names:
            print(f"--- {n}")
            t = time.monotonic()
            try:
                SCENARIOS[n]()
                print(f"ok {n} ({time.monotonic() - t:.0f} s)")
            except Exception as e:
                failed.append(n)
                print(f"FAIL {n} ({time.monotonic() - t:.0f} s): {e}")
                if not isinstance(e, AssertionError):
                    traceback.print_exc()
            finally:
                stop_all()
    finally:
        stop_all()
        bed("down")
    print(f"{len(names) - len(failed)} passed, {len(failed)} failed" + (f": {' '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
