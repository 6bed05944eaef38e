//! The connect-storm scenario: N clients connected, all dropped at once,
//! then all reconnecting — once all together (bounded handshakes in flight,
//! like idle) and once with each client waiting a uniform random delay in
//! [0, --jitter-ms) first. A failed attempt (refused, reset, a non-101
//! answer, a timeout) is retried after a backoff, up to --max-attempts.
//!
//! Client threads each own a contiguous block of the clients and an epoll
//! set; an open connection leaves the set (it is only closed later). Clients
//! are dropped with a RST (SO_LINGER 0, the default) or a FIN (`--close
//! fin`); between a drop and the next reconnect the bench waits for the
//! server's connection count to return to where it was before the run: its
//! /healthz, or for servers without one (nchan, Bun) its sockets in
//! /proc/net/tcp. The server's CPU time is taken over every phase. Over
//! TLS (`--tls`) every attempt is a full TLS 1.3 handshake (the clients
//! keep no sessions) before the HTTP one.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::cli::{CloseHow, Server, ServerKind, StormArgs, Transport};
use crate::fanout::{block_start, merge_histograms, new_histogram};
use crate::handshake::{DialConfig, Dialer, Outcome};
use crate::procfs;
use crate::report::{bytes, failures_json, server_line, Latency};
use crate::sys::{self, Epoll};
use crate::target::Target;
use crate::tls::TlsSetup;
use crate::util::{opt, thousands, Rng};

const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(5);
/// Workers start a phase together this long after the main thread says so.
const START_DELAY: Duration = Duration::from_millis(20);

enum Cmd {
    Connect {
        t0: Instant,
        jitter: Duration,
        deadline: Instant,
        seed: u64,
    },
    Drop(CloseHow),
    Finish,
}

enum Reply {
    Phase(PhaseResult),
    Dropped { closed: u64 },
}

struct PhaseResult {
    hist: Histogram<u64>,
    opened: u64,
    retried_ok: u64,
    gave_up: u64,
    attempts: u64,
    failed_attempts: u64,
    failures: BTreeMap<String, (u64, String)>,
    last_done: Option<Instant>,
    max_in_flight: usize,
    /// Over TLS: what the first completed handshake negotiated.
    negotiated: Option<String>,
}

#[derive(Default)]
struct Progress {
    opened: AtomicU64,
    failed_attempts: AtomicU64,
    gave_up: AtomicU64,
}

struct Worker {
    base: u64,
    fds: Vec<RawFd>,
    ep: Epoll,
    cfg: DialConfig,
    progress: Arc<Progress>,
}

impl Worker {
    fn connect(
        &mut self,
        t0: Instant,
        jitter: Duration,
        deadline: Instant,
        seed: u64,
    ) -> PhaseResult {
        let mut dialer = Dialer::new(self.cfg.clone(), self.base, seed);
        let mut rng = Rng::new(seed ^ 0x6a09_e667);
        let jitter_ns = jitter.as_nanos() as u64;
        for (local, fd) in self.fds.iter().enumerate() {
            if *fd < 0 {
                dialer.schedule(
                    local as u32,
                    t0 + Duration::from_nanos(rng.below(jitter_ns)),
                );
            }
        }
        let mut hist = new_histogram();
        let (mut opened, mut gave_up, mut last_done) = (0u64, 0u64, None);
        let mut retried_ok = 0u64;
        let mut events: Vec<libc::epoll_event> = Vec::with_capacity(1024);
        let mut outcomes = Vec::new();
        let mut failed_reported = 0;
        loop {
            let now = Instant::now();
            dialer.step(&self.ep, now, &mut outcomes);
            if now >= deadline {
                dialer.abandon("unfinished at --connect-timeout-s", &mut outcomes);
            }
            for o in outcomes.drain(..) {
                match o {
                    Outcome::Opened(o) => {
                        self.fds[o.local as usize] = o.fd;
                        hist.saturating_record((o.latency.as_nanos() as u64).max(1));
                        opened += 1;
                        retried_ok += (o.attempt > 1) as u64;
                        last_done = Some(Instant::now());
                        self.progress.opened.fetch_add(1, Relaxed);
                    }
                    Outcome::GaveUp => {
                        gave_up += 1;
                        self.progress.gave_up.fetch_add(1, Relaxed);
                    }
                }
            }
            if dialer.failed_attempts > failed_reported {
                self.progress
                    .failed_attempts
                    .fetch_add(dialer.failed_attempts - failed_reported, Relaxed);
                failed_reported = dialer.failed_attempts;
            }
            if dialer.is_idle() {
                break;
            }
            if let Err(e) = self.ep.wait(&mut events, dialer.wait_ms(now, 50)) {
                eprintln!("bench: epoll_wait: {e}");
                dialer.abandon("epoll_wait failed", &mut outcomes);
                continue;
            }
            for ev in events.iter() {
                let (token, flags) = (ev.u64, ev.events);
                dialer.on_event(&self.ep, token, flags, Instant::now(), &mut outcomes);
            }
        }
        PhaseResult {
            hist,
            opened,
            retried_ok,
            gave_up,
            attempts: dialer.attempts,
            failed_attempts: dialer.failed_attempts,
            failures: std::mem::take(&mut dialer.failures),
            last_done,
            max_in_flight: dialer.max_in_flight_seen,
            negotiated: dialer.negotiated.take(),
        }
    }

    fn drop_all(&mut self, how: CloseHow) -> u64 {
        let mut n = 0;
        for fd in self.fds.iter_mut() {
            if *fd >= 0 {
                match how {
                    CloseHow::Reset => sys::close_abortive(*fd),
                    CloseHow::Fin => sys::close(*fd),
                }
                *fd = -1;
                n += 1;
            }
        }
        n
    }

    fn serve(mut self, cmds: mpsc::Receiver<Cmd>, replies: mpsc::Sender<Reply>) {
        while let Ok(cmd) = cmds.recv() {
            let reply = match cmd {
                Cmd::Connect {
                    t0,
                    jitter,
                    deadline,
                    seed,
                } => Reply::Phase(self.connect(t0, jitter, deadline, seed)),
                Cmd::Drop(how) => Reply::Dropped {
                    closed: self.drop_all(how),
                },
                Cmd::Finish => break,
            };
            if replies.send(reply).is_err() {
                break;
            }
        }
        self.drop_all(CloseHow::Reset);
    }
}

/// One connect phase's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseReport {
    pub label: &'static str,
    pub jitter_ms: u64,
    pub clients: u64,
    pub opened: u64,
    /// Of `opened`: clients back only after a failed attempt.
    pub opened_after_retry: u64,
    pub gave_up: u64,
    /// From the phase's start to the last completed handshake.
    pub last_done_s: Option<f64>,
    pub attempts: u64,
    pub failed_attempts: u64,
    pub failures: Vec<(String, u64, String)>,
    pub latency: Latency,
    pub max_in_flight: usize,
    /// Machine-wide TcpExt counters over the phase (`procfs::TCP_COUNTERS`):
    /// SYNs or handshakes the listener dropped show here.
    pub tcp: Vec<(&'static str, u64)>,
    /// The phase's wall time (from telling the clients to connect until
    /// the last of them reported) and the server's CPU seconds over it.
    pub wall_s: f64,
    pub server_cpu_s: Option<f64>,
    /// The bench's own CPU seconds over the phase (all its threads): the
    /// clients' side of the handshakes, which bounds the rate when it
    /// nears the CPUs it has.
    pub client_cpu_s: f64,
    /// Over TLS: what the phase's first completed handshake negotiated.
    pub negotiated: Option<String>,
}

impl PhaseReport {
    /// Time until every client was back, `None` when some never were.
    pub fn time_to_all_s(&self) -> Option<f64> {
        if self.opened == self.clients {
            self.last_done_s
        } else {
            None
        }
    }

    pub fn handshakes_per_s(&self) -> Option<f64> {
        self.last_done_s
            .and_then(|s| crate::report::rate(self.opened, s))
    }

    /// The server's CPU use over the phase, in % of one core.
    pub fn server_cpu_pct(&self) -> Option<f64> {
        cpu_pct(self.server_cpu_s, self.wall_s)
    }

    /// The server's CPU time over the phase per client back, in µs.
    pub fn server_cpu_us_per_handshake(&self) -> Option<f64> {
        self.server_cpu_s
            .filter(|_| self.opened > 0)
            .map(|s| s * 1e6 / self.opened as f64)
    }

    fn json(&self) -> Value {
        json!({
            "jitter_ms": self.jitter_ms,
            "clients": self.clients,
            "opened": self.opened,
            "opened_after_retry": self.opened_after_retry,
            "gave_up": self.gave_up,
            "time_to_all_s": self.time_to_all_s().map(round3),
            "last_handshake_s": self.last_done_s.map(round3),
            "handshakes_per_s": self.handshakes_per_s().map(|r| r.round()),
            "attempts": self.attempts,
            "failed_attempts": self.failed_attempts,
            "failures": failures_json(&self.failures),
            "handshake_us": self.latency.json(),
            "max_in_flight": self.max_in_flight,
            "wall_s": round3(self.wall_s),
            "server_cpu_s": self.server_cpu_s.map(round3),
            "server_cpu_pct": self.server_cpu_pct().map(|p| p.round()),
            "server_cpu_us_per_handshake": self.server_cpu_us_per_handshake().map(|u| u.round()),
            "client_cpu_s": round3(self.client_cpu_s),
            "tcp": self.tcp.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        })
    }

    fn rows(&self, t: &mut String) {
        let what = if self.jitter_ms == 0 {
            format!("{} (no jitter)", self.label)
        } else {
            format!("{} (jitter {} ms)", self.label, self.jitter_ms)
        };
        let _ = writeln!(t, "  {what}");
        let _ = writeln!(
            t,
            "    {:<30} {} of {} ({} only after a retry, {} gave up)",
            "back",
            thousands(self.opened),
            thousands(self.clients),
            self.opened_after_retry,
            self.gave_up
        );
        let _ = writeln!(
            t,
            "    {:<30} {} s",
            "time until all back",
            opt(self.time_to_all_s(), 3)
        );
        let _ = writeln!(
            t,
            "    {:<30} {}",
            "handshakes/s",
            opt(self.handshakes_per_s(), 0)
        );
        let _ = writeln!(
            t,
            "    {:<30} {} attempts, {} failed",
            "attempts",
            thousands(self.attempts),
            self.failed_attempts
        );
        for (reason, n, example) in &self.failures {
            let _ = writeln!(t, "    {:<30} {n} × {reason} (e.g. {example})", "");
        }
        let l = &self.latency;
        let _ = writeln!(
            t,
            "    {:<30} {} / {} / {} / {}",
            "handshake µs p50/p99/p99.9/max",
            opt(l.p50_us, 0),
            opt(l.p99_us, 0),
            opt(l.p999_us, 0),
            opt(l.max_us, 0)
        );
        let _ = writeln!(t, "    {:<30} {}", "most in flight", self.max_in_flight);
        let _ = writeln!(
            t,
            "    {:<30} {}",
            "server CPU",
            cpu_row(self.server_cpu_s, self.wall_s)
        );
        let _ = writeln!(
            t,
            "    {:<30} {} µs",
            "server CPU / handshake",
            opt(self.server_cpu_us_per_handshake(), 0)
        );
        let _ = writeln!(
            t,
            "    {:<30} {}",
            "client CPU (the bench)",
            cpu_row(Some(self.client_cpu_s), self.wall_s)
        );
        let tcp: Vec<String> = self.tcp.iter().map(|(k, v)| format!("{k} +{v}")).collect();
        let _ = writeln!(
            t,
            "    {:<30} {}",
            "kernel TcpExt (machine)",
            tcp.join(", ")
        );
    }
}

/// One drop of every client.
#[derive(Debug, Clone, PartialEq)]
pub struct DropReport {
    pub closed: u64,
    /// How long closing every socket took.
    pub close_s: f64,
    /// From the drop until the server's /healthz count was back at its
    /// baseline (`None`: no /healthz, or not within --settle-s).
    pub settle_s: Option<f64>,
    /// What the count said last (when it answered).
    pub healthz_last: Option<u64>,
    pub healthz_baseline: Option<u64>,
    /// Where the count comes from: "/healthz" or "/proc/net/tcp".
    pub counted_by: &'static str,
    /// From the drop until the server settled (or --settle-s ran out), and
    /// the server's CPU seconds over it.
    pub wall_s: f64,
    pub server_cpu_s: Option<f64>,
}

impl DropReport {
    fn json(&self) -> Value {
        json!({
            "closed": self.closed,
            "close_s": round3(self.close_s),
            "settle_s": self.settle_s.map(round3),
            "healthz_last": self.healthz_last,
            "healthz_baseline": self.healthz_baseline,
            "counted_by": self.counted_by,
            "wall_s": round3(self.wall_s),
            "server_cpu_s": self.server_cpu_s.map(round3),
            "server_cpu_pct": cpu_pct(self.server_cpu_s, self.wall_s).map(|p| p.round()),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StormReport {
    pub kind: ServerKind,
    pub process: &'static str,
    pub pid: u32,
    pub target: String,
    pub cores: Option<u32>,
    pub transport: &'static str,
    /// Over TLS: what the handshakes negotiated and what the clients
    /// offered (`None`: cleartext).
    pub tls: Option<String>,
    pub clients: u64,
    pub threads: u32,
    pub in_flight: u64,
    pub close: CloseHow,
    pub initial: PhaseReport,
    pub drop_before_burst: DropReport,
    pub burst: PhaseReport,
    pub drop_before_jitter: DropReport,
    pub jitter: PhaseReport,
    pub rss_before: u64,
    pub rss_after: u64,
}

impl StormReport {
    pub fn errors(&self) -> Vec<String> {
        let mut e = Vec::new();
        for p in [&self.initial, &self.burst, &self.jitter] {
            if p.opened < p.clients {
                e.push(format!(
                    "{}: {} of {} clients not back ({} gave up after --max-attempts)",
                    p.label,
                    p.clients - p.opened,
                    p.clients,
                    p.gave_up
                ));
            }
        }
        for (label, d) in [
            ("before the burst", &self.drop_before_burst),
            ("before the jittered reconnect", &self.drop_before_jitter),
        ] {
            if d.healthz_baseline.is_some() && d.settle_s.is_none() {
                e.push(format!(
                    "{label}: {} still counted {:?} connections (baseline {:?}) after --settle-s",
                    d.counted_by, d.healthz_last, d.healthz_baseline
                ));
            }
        }
        e
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let server = server_line(self.kind, self.pid, &self.target, self.cores);
        let _ = writeln!(t, "storm {}: {server}", self.transport);
        if let Some(tls) = &self.tls {
            let _ = writeln!(t, "  TLS: {tls}");
        }
        let _ = writeln!(
            t,
            "  {} clients, {} client thread(s), {} handshakes in flight at most, dropped with {}",
            thousands(self.clients),
            self.threads,
            self.in_flight,
            match self.close {
                CloseHow::Reset => "a RST (SO_LINGER 0)",
                CloseHow::Fin => "a FIN (plain close)",
            }
        );
        self.initial.rows(&mut t);
        for (label, d, p) in [
            ("drop", &self.drop_before_burst, &self.burst),
            ("drop", &self.drop_before_jitter, &self.jitter),
        ] {
            let _ = writeln!(
                t,
                "  {label}: {} closed in {:.3} s; server back at its count ({}) after {} s; \
                 server CPU {}",
                thousands(d.closed),
                d.close_s,
                d.counted_by,
                opt(d.settle_s, 3),
                cpu_row(d.server_cpu_s, d.wall_s)
            );
            p.rows(&mut t);
        }
        let _ = writeln!(
            t,
            "  {:<32} {}",
            "server RSS before",
            bytes(self.rss_before)
        );
        let _ = writeln!(
            t,
            "  {:<32} {}",
            "server RSS after (all back)",
            bytes(self.rss_after)
        );
        for e in self.errors() {
            let _ = writeln!(t, "  ERROR: {e}");
        }
        t
    }

    pub fn json(&self) -> Value {
        let errors = self.errors();
        json!({
            "scenario": "storm",
            "transport": self.transport,
            "tls": self.tls,
            "server": self.kind.name(),
            "process": self.process,
            "pid": self.pid,
            "cores": self.cores,
            "clients": self.clients,
            "threads": self.threads,
            "in_flight": self.in_flight,
            "close": self.close.name(),
            "initial": self.initial.json(),
            "drop_before_burst": self.drop_before_burst.json(),
            "burst": self.burst.json(),
            "drop_before_jitter": self.drop_before_jitter.json(),
            "jitter": self.jitter.json(),
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "ok": errors.is_empty(),
            "errors": errors,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// CPU seconds over a wall time in % of one core.
fn cpu_pct(cpu_s: Option<f64>, wall_s: f64) -> Option<f64> {
    cpu_s.and_then(|c| (wall_s > 0.0).then(|| 100.0 * c / wall_s))
}

/// `0.412 s in 0.530 s wall (78 % of a core)`.
fn cpu_row(cpu_s: Option<f64>, wall_s: f64) -> String {
    format!(
        "{} s in {wall_s:.3} s wall ({} % of a core)",
        opt(cpu_s, 3),
        opt(cpu_pct(cpu_s, wall_s), 0)
    )
}

/// Runs storm against one server.
pub fn run_one(
    args: &StormArgs,
    kind: ServerKind,
    server: &Server,
    tls: Option<&TlsSetup>,
) -> Result<StormReport, String> {
    if args.transport == Transport::LongPoll {
        return Err("storm measures WebSocket and SSE handshakes (--transport ws|sse)".into());
    }
    kind.check_transport(args.transport)?;
    sys::check_nofile_for(args.connections)?;
    let mut target = Target::start_with_tls(kind, server, tls)?;
    let name = kind.name();
    let listen = target.listen;
    sys::check_sources(&args.client.sources, listen)?;
    let counted_by = target.connections_source();
    let count_now = |target: &Target| {
        target
            .connections(HEALTHZ_TIMEOUT)
            .ok()
            .map(|c| c.iter().sum::<u64>())
    };
    let healthz_baseline = count_now(&target);
    if healthz_baseline.is_none() {
        eprintln!("bench: storm {name}: no {counted_by}: waiting 1 s after each drop instead");
    }
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = target.rss_bytes()?;

    let threads = args.client.threads as u64;
    let in_flight = (args.client.in_flight / threads).max(1) as usize;
    let progress = Arc::new(Progress::default());
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
    let mut cmd_txs = Vec::new();
    let mut handles = Vec::new();
    for t in 0..threads {
        let base = block_start(args.connections, threads, t);
        let count = block_start(args.connections, threads, t + 1) - base;
        let worker = Worker {
            base,
            fds: vec![-1; count as usize],
            ep: Epoll::new().map_err(|e| format!("epoll_create1: {e}"))?,
            cfg: DialConfig {
                target: listen,
                sources: args.client.sources.clone(),
                transport: args.transport,
                channel_prefix: "storm-".into(),
                channels: args.channels,
                in_flight,
                handshake_timeout: Duration::from_secs_f64(args.client.handshake_timeout_s),
                max_attempts: args.max_attempts,
                backoff: Duration::from_millis(args.backoff_ms),
                backoff_max: Duration::from_secs(1).max(Duration::from_millis(args.backoff_ms)),
                keep_in_epoll: false,
                subprotocol: None,
                tls: target.tls.clone(),
                deflate: false,
            },
            progress: progress.clone(),
        };
        let (cmd_tx, cmd_rx) = mpsc::channel();
        cmd_txs.push(cmd_tx);
        let tx = reply_tx.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("storm-client-{t}"))
                .spawn(move || worker.serve(cmd_rx, tx))
                .map_err(|e| format!("spawn client thread: {e}"))?,
        );
    }
    drop(reply_tx);
    let finish = |cmd_txs: &[mpsc::Sender<Cmd>]| {
        for tx in cmd_txs {
            let _ = tx.send(Cmd::Finish);
        }
    };

    let mut phase_no = 0u64;
    let mut run_phase = |label: &'static str,
                         jitter_ms: u64,
                         target: &mut Target|
     -> Result<PhaseReport, String> {
        phase_no += 1;
        progress.opened.store(0, Relaxed);
        progress.failed_attempts.store(0, Relaxed);
        progress.gave_up.store(0, Relaxed);
        let jitter = Duration::from_millis(jitter_ms);
        let tcp_before = procfs::tcp_ext_counters(procfs::TCP_COUNTERS).ok();
        let cpu_before = target.cpu_seconds().ok();
        let client_cpu_before = procfs::self_cpu_seconds();
        let phase_start = Instant::now();
        let t0 = Instant::now() + START_DELAY;
        let deadline = t0 + jitter + Duration::from_secs_f64(args.client.connect_timeout_s);
        for (i, tx) in cmd_txs.iter().enumerate() {
            tx.send(Cmd::Connect {
                t0,
                jitter,
                deadline,
                seed: phase_no << 32 | i as u64,
            })
            .map_err(|_| "a client thread is gone".to_string())?;
        }
        let mut results = Vec::new();
        let mut last = Instant::now();
        let mut opened_at_last = 0;
        while results.len() < threads as usize {
            match reply_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Reply::Phase(r)) => results.push(r),
                Ok(Reply::Dropped { .. }) => return Err("unexpected reply".into()),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("client threads are gone".into())
                }
            }
            let now = Instant::now();
            if now.duration_since(last) >= Duration::from_secs(1) {
                let opened = progress.opened.load(Relaxed);
                eprintln!(
                    "bench: storm {name} {label}: {opened}/{} back, {} failed attempts, {} gave up, {:.0}/s now",
                    args.connections,
                    progress.failed_attempts.load(Relaxed),
                    progress.gave_up.load(Relaxed),
                    (opened - opened_at_last) as f64 / now.duration_since(last).as_secs_f64()
                );
                last = now;
                opened_at_last = opened;
                target.alive()?;
            }
        }
        let mut hist = new_histogram();
        let mut failures: BTreeMap<String, (u64, String)> = BTreeMap::new();
        let mut p = PhaseReport {
            label,
            jitter_ms,
            clients: args.connections,
            opened: 0,
            opened_after_retry: 0,
            gave_up: 0,
            last_done_s: None,
            attempts: 0,
            failed_attempts: 0,
            failures: Vec::new(),
            latency: Latency::default(),
            max_in_flight: 0,
            tcp: Vec::new(),
            wall_s: phase_start.elapsed().as_secs_f64(),
            server_cpu_s: match (cpu_before, target.cpu_seconds().ok()) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            },
            client_cpu_s: procfs::self_cpu_seconds() - client_cpu_before,
            negotiated: None,
        };
        if let (Some(a), Ok(b)) = (tcp_before, procfs::tcp_ext_counters(procfs::TCP_COUNTERS)) {
            p.tcp = procfs::TCP_COUNTERS
                .iter()
                .zip(a.iter().zip(&b))
                .map(|(k, (a, b))| (*k, b.saturating_sub(*a)))
                .collect();
        }
        let mut last_done: Option<Instant> = None;
        for r in results {
            merge_histograms(&mut hist, &r.hist);
            p.opened += r.opened;
            p.opened_after_retry += r.retried_ok;
            p.gave_up += r.gave_up;
            p.attempts += r.attempts;
            p.failed_attempts += r.failed_attempts;
            p.max_in_flight += r.max_in_flight;
            for (k, (n, ex)) in r.failures {
                failures.entry(k).or_insert((0, ex)).0 += n;
            }
            last_done = last_done.max(r.last_done);
            if p.negotiated.is_none() {
                p.negotiated = r.negotiated;
            }
        }
        p.last_done_s = last_done.map(|d| d.saturating_duration_since(t0).as_secs_f64());
        p.failures = failures.into_iter().map(|(k, (n, e))| (k, n, e)).collect();
        p.latency = Latency::from_ns(&hist);
        eprintln!(
            "bench: storm {name} {label}: {} of {} back in {} s, {} failed attempts",
            p.opened,
            p.clients,
            opt(p.last_done_s, 3),
            p.failed_attempts
        );
        Ok(p)
    };
    let drop_all = |target: &mut Target| -> Result<DropReport, String> {
        let cpu_before = target.cpu_seconds().ok();
        let start = Instant::now();
        for tx in &cmd_txs {
            tx.send(Cmd::Drop(args.close))
                .map_err(|_| "a client thread is gone".to_string())?;
        }
        let mut closed = 0;
        for _ in 0..threads {
            match reply_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(Reply::Dropped { closed: n }) => closed += n,
                _ => return Err("a client thread did not drop its clients".into()),
            }
        }
        let close_s = start.elapsed().as_secs_f64();
        let mut d = DropReport {
            closed,
            close_s,
            settle_s: None,
            healthz_last: None,
            healthz_baseline,
            counted_by,
            wall_s: 0.0,
            server_cpu_s: None,
        };
        match healthz_baseline {
            Some(baseline) => {
                let deadline = start + Duration::from_secs_f64(args.settle_s);
                loop {
                    d.healthz_last = count_now(target);
                    if d.healthz_last == Some(baseline) {
                        d.settle_s = Some(start.elapsed().as_secs_f64());
                        break;
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            None => std::thread::sleep(Duration::from_secs(1)),
        }
        d.wall_s = start.elapsed().as_secs_f64();
        d.server_cpu_s = match (cpu_before, target.cpu_seconds().ok()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        target.alive()?;
        eprintln!(
            "bench: storm {name}: dropped {closed} ({}) in {close_s:.3} s, server settled after {} s",
            args.close.name(),
            opt(d.settle_s, 3)
        );
        Ok(d)
    };

    let result = (|| {
        let initial = run_phase("initial connect", 0, &mut target)?;
        let drop_before_burst = drop_all(&mut target)?;
        let burst = run_phase("reconnect all at once", 0, &mut target)?;
        let drop_before_jitter = drop_all(&mut target)?;
        let jitter = run_phase("reconnect with jitter", args.jitter_ms, &mut target)?;
        std::thread::sleep(Duration::from_millis(100));
        let rss_after = target.rss_bytes()?;
        let tls = target.tls.as_ref().map(|client| {
            let negotiated = [&initial, &burst, &jitter]
                .iter()
                .find_map(|p| p.negotiated.clone())
                .unwrap_or_else(|| "no handshake completed".into());
            format!("{negotiated} (clients: {})", client.describe())
        });
        Ok(StormReport {
            kind,
            process: target.how(),
            pid: target.pid,
            target: listen.to_string(),
            cores: target.cores,
            transport: args.transport.name(),
            tls,
            clients: args.connections,
            threads: args.client.threads,
            in_flight: args.client.in_flight,
            close: args.close,
            initial,
            drop_before_burst,
            burst,
            drop_before_jitter,
            jitter,
            rss_before,
            rss_after,
        })
    })();
    finish(&cmd_txs);
    for h in handles {
        let _ = h.join();
    }
    target.stop();
    result
}

/// The figures `--server both` compares.
pub const COMPARED: &[(&str, &str)] = &[
    ("burst: time until all back (s)", "burst.time_to_all_s"),
    ("burst: handshakes/s", "burst.handshakes_per_s"),
    ("burst: handshake p50 (µs)", "burst.handshake_us.p50"),
    ("burst: handshake p99 (µs)", "burst.handshake_us.p99"),
    ("burst: failed attempts", "burst.failed_attempts"),
    ("jitter: time until all back (s)", "jitter.time_to_all_s"),
    ("jitter: handshakes/s", "jitter.handshakes_per_s"),
    ("jitter: handshake p99 (µs)", "jitter.handshake_us.p99"),
    ("jitter: failed attempts", "jitter.failed_attempts"),
    ("burst: server CPU (s)", "burst.server_cpu_s"),
    ("burst: server CPU (% of a core)", "burst.server_cpu_pct"),
    (
        "burst: server CPU / handshake (µs)",
        "burst.server_cpu_us_per_handshake",
    ),
    ("jitter: server CPU (s)", "jitter.server_cpu_s"),
    ("burst: client CPU (s)", "burst.client_cpu_s"),
    ("burst: listen drops (machine)", "burst.tcp.ListenDrops"),
    (
        "drop: server settled after (s)",
        "drop_before_burst.settle_s",
    ),
    ("drop: server CPU (s)", "drop_before_burst.server_cpu_s"),
    ("server RSS after (B)", "rss_after_bytes"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(opened: u64, last_done_s: Option<f64>) -> PhaseReport {
        PhaseReport {
            label: "reconnect all at once",
            jitter_ms: 0,
            clients: 5000,
            opened,
            opened_after_retry: 3,
            gave_up: 5000 - opened,
            last_done_s,
            attempts: 5100,
            failed_attempts: 100,
            failures: vec![("connect: Connection refused".into(), 100, "c 1".into())],
            latency: Latency {
                count: opened,
                p50_us: Some(300.0),
                p90_us: Some(900.0),
                p99_us: Some(2000.0),
                p999_us: Some(3000.0),
                max_us: Some(3100.0),
                mean_us: Some(450.0),
            },
            max_in_flight: 256,
            tcp: vec![("ListenOverflows", 0), ("ListenDrops", 2)],
            wall_s: 0.6,
            server_cpu_s: Some(0.3),
            client_cpu_s: 0.45,
            negotiated: None,
        }
    }

    #[test]
    fn time_until_all_back_only_when_all_are() {
        let p = phase(5000, Some(0.5));
        assert_eq!(p.time_to_all_s(), Some(0.5));
        assert_eq!(p.handshakes_per_s(), Some(10_000.0));
        let p = phase(4990, Some(0.5));
        assert_eq!(p.time_to_all_s(), None);
        assert_eq!(p.handshakes_per_s(), Some(9_980.0));
        let j = p.json();
        assert_eq!(j["time_to_all_s"], Value::Null);
        assert_eq!(j["gave_up"], 10);
        assert_eq!(j["failures"]["connect: Connection refused"], 100);
        assert_eq!(j["tcp"]["ListenDrops"], 2);
        assert_eq!(j["server_cpu_s"], 0.3);
        assert_eq!(j["server_cpu_pct"], 50.0);
        assert_eq!(j["server_cpu_us_per_handshake"], 60.0);
        assert_eq!(p.server_cpu_pct(), Some(50.0));
        assert!(cpu_row(None, 1.0).starts_with("- s in 1.000 s wall (- %"));
        assert_eq!(phase(0, None).handshakes_per_s(), None);
    }

    #[test]
    fn report_errors_and_json() {
        let d = DropReport {
            closed: 5000,
            close_s: 0.01,
            settle_s: Some(0.2),
            healthz_last: Some(1),
            healthz_baseline: Some(1),
            counted_by: "/healthz",
            wall_s: 0.25,
            server_cpu_s: Some(0.05),
        };
        let mut r = StormReport {
            kind: ServerKind::Baseline,
            process: "spawned",
            pid: 1,
            target: "127.0.0.1:1".into(),
            cores: Some(2),
            transport: "ws",
            tls: None,
            clients: 5000,
            threads: 1,
            in_flight: 256,
            close: CloseHow::Reset,
            initial: phase(5000, Some(0.4)),
            drop_before_burst: d.clone(),
            burst: phase(5000, Some(0.5)),
            drop_before_jitter: d.clone(),
            jitter: phase(5000, Some(1.1)),
            rss_before: 1,
            rss_after: 2,
        };
        assert!(r.errors().is_empty(), "{:?}", r.errors());
        let j = r.json();
        assert_eq!(j["server"], "baseline");
        assert_eq!(j["close"], "reset");
        assert_eq!(j["burst"]["handshakes_per_s"], 10_000.0);
        assert_eq!(
            crate::report::number_at(&j, "jitter.time_to_all_s"),
            Some(1.1)
        );
        for (_, path) in COMPARED {
            assert!(
                crate::report::number_at(&j, path).is_some(),
                "{path} is not a number in the report"
            );
        }
        r.burst = phase(4000, Some(3.0));
        r.drop_before_jitter.settle_s = None;
        let e = r.errors();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("1000 of 5000"));
        assert!(e[1].contains("/healthz still counted"));
        assert!(e[1].contains("after --settle-s"));
        let t = r.table();
        assert!(t.contains("server CPU"), "{t}");
        assert!(
            t.contains("0.300 s in 0.600 s wall (50 % of a core)"),
            "{t}"
        );
        assert!(r.table().contains("ERROR"));
    }
}
