//! The gRPC scenario (`bench grpc`): S Subscribe streams over C channels
//! (stream i on `grpc-{i % C}`), laid over HTTP/2 connections one of two
//! ways (`--layout`): all on one connection, or each on a connection of its
//! own. Each layout runs against a freshly started server: a ZeroMQ
//! publisher first publishes probes to every channel until every stream has
//! one (which also gets past ZeroMQ's slow joiner), then publishes R
//! messages/s for D seconds, round robin over the channels, each payload
//! ending with its kind, channel, sequence number and CLOCK_MONOTONIC send
//! time as in fanout (see `ws`). A stream's task takes the clock once per
//! DATA piece it gets from h2 and records `arrival - send time` for each
//! message in it: the latency includes the client's HTTP/2 and protobuf
//! decoding, on the same footing for every server. The server's and the
//! client's CPU over the publish window are reported, to tell whether the
//! client kept up.
//!
//! The client is the h2 crate on a tokio runtime of `--threads` worker
//! threads (see `grpc`); the publisher is this thread.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::RecvStream;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::cli::{GrpcArgs, Layout, Server, ServerKind};
use crate::fanout::{due_by, merge_histograms, new_histogram};
use crate::grpc::{self, Messages};
use crate::http;
use crate::procfs;
use crate::publish::Publisher;
use crate::report::{bytes, failures_json, per_conn, round1, server_line, Health, Latency};
use crate::sys;
use crate::target::Target;
use crate::util::{monotonic_ns, opt, thousands};
use crate::ws::{self, SeqTally, Tail, KIND_MEASURED, KIND_PROBE};

const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/healthz` may take to count the connections (the gateway
/// updates some counts once a second).
const HEALTH_SETTLE: Duration = Duration::from_secs(3);
/// Probe rounds: at most this often.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Latency histograms the streams record into (stream i into i % this):
/// one per stream would take hundreds of MB at a thousand streams.
const HIST_SHARDS: usize = 16;

/// What the streams' tasks and the main thread share while running.
struct Shared {
    /// Streams that have received at least one probe.
    probed: AtomicU64,
    /// Measured deliveries so far.
    delivered: AtomicU64,
    /// Streams that ended (the server ended or reset them).
    ended: AtomicU64,
    hists: Vec<Mutex<Histogram<u64>>>,
}

/// What arrived on one stream, besides its tally.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    /// gRPC messages (server frames) of every kind.
    pub frames: u64,
    /// Server frames that are not messages (gaps and the like).
    pub other_frames: u64,
    /// Messages whose payload does not end like a fan-out payload.
    pub unrecognized: u64,
    /// Measured messages for another channel than the stream's.
    pub misrouted: u64,
    /// DATA pieces, and their bytes.
    pub pieces: u64,
    pub bytes: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.frames += o.frames;
        self.other_frames += o.other_frames;
        self.unrecognized += o.unrecognized;
        self.misrouted += o.misrouted;
        self.pieces += o.pieces;
        self.bytes += o.bytes;
    }
}

/// What a stream's task hands back once told to stop.
struct StreamResult {
    channel: u32,
    tally: SeqTally,
    counts: Counts,
    /// How the server ended it, if it did.
    end: Option<String>,
    /// The stream (and a per-connection stream's connection), kept open
    /// until the server has been measured.
    _keep: Option<(SendRequest<Bytes>, RecvStream)>,
}

/// The figures of one layout against one server.
#[derive(Debug, Clone)]
pub struct LayoutReport {
    pub layout: Layout,
    pub process: &'static str,
    pub pid: u32,
    pub target: String,
    pub cores: Option<u32>,
    pub requested: u64,
    pub open: u64,
    /// HTTP/2 connections the open streams are on.
    pub connections: u64,
    pub failures: Vec<(String, u64, String)>,
    pub channels: u64,
    pub threads: u32,
    pub rate: f64,
    pub payload_bytes: u64,
    pub connect_s: f64,
    pub subscribe_s: f64,
    pub probe_rounds: u64,
    pub unprobed: u64,
    pub published: u64,
    pub publish_s: f64,
    pub delivered_in_window: u64,
    pub drain_s: f64,
    pub loss: ws::LossSummary,
    pub counts: Counts,
    /// Streams the server ended during the run, by how.
    pub ended: Vec<(String, u64, String)>,
    pub latency: Latency,
    pub rss_before: u64,
    pub rss_subscribed: u64,
    pub rss_after: u64,
    pub health: Health,
    pub server_cpu_s: Option<f64>,
    pub client_cpu_s: f64,
    pub publish_failures: Vec<(String, u64, String)>,
}

impl LayoutReport {
    pub fn failed(&self) -> u64 {
        self.failures.iter().map(|(_, n, _)| n).sum()
    }

    pub fn deliveries_per_s(&self) -> Option<f64> {
        crate::report::rate(self.delivered_in_window, self.publish_s)
    }

    pub fn publish_rate(&self) -> Option<f64> {
        crate::report::rate(self.published, self.publish_s)
    }

    /// Server memory per open stream, subscribed and idle (before any
    /// publication).
    pub fn rss_per_stream(&self) -> Option<f64> {
        per_conn(self.rss_before, self.rss_subscribed, self.open)
    }

    pub fn server_cpu_pct(&self) -> Option<f64> {
        self.server_cpu_s
            .and_then(|c| (self.publish_s > 0.0).then(|| 100.0 * c / self.publish_s))
    }

    pub fn client_cpu_pct(&self) -> Option<f64> {
        (self.publish_s > 0.0).then(|| 100.0 * self.client_cpu_s / self.publish_s)
    }

    pub fn errors(&self) -> Vec<String> {
        let mut e = Vec::new();
        let layout = self.layout.name();
        if self.open < self.requested {
            e.push(format!(
                "{layout}: {} of {} streams not open",
                self.requested - self.open,
                self.requested
            ));
        }
        for (reason, n, example) in &self.failures {
            e.push(format!("{layout}: {n} × {reason} (e.g. {example})"));
        }
        if self.unprobed > 0 {
            e.push(format!(
                "{layout}: {} streams never received a probe within --subscribe-timeout-s",
                self.unprobed
            ));
        }
        e.extend(
            self.loss
                .errors("streams")
                .into_iter()
                .map(|line| format!("{layout}: {line}")),
        );
        let c = &self.counts;
        for (n, what) in [
            (
                c.misrouted,
                "deliveries for another channel than subscribed",
            ),
            (
                c.unrecognized,
                "messages not recognised as fan-out payloads",
            ),
            (c.other_frames, "server frames that are not messages"),
        ] {
            if n > 0 {
                e.push(format!("{layout}: {n} {what}"));
            }
        }
        for (how, n, example) in &self.ended {
            e.push(format!(
                "{layout}: {n} streams ended by the server during the run: {how} (e.g. {example})"
            ));
        }
        if let Some(h) = self.health.error(self.connections, "after subscribing") {
            e.push(format!("{layout}: {h}"));
        }
        for (reason, n, example) in &self.publish_failures {
            e.push(format!(
                "{layout}: {n} publications failed: {reason} (e.g. {example})"
            ));
        }
        e
    }

    fn table(&self, t: &mut String) {
        let row = |t: &mut String, k: &str, v: String| {
            let _ = writeln!(t, "  {k:<28} {v}");
        };
        let _ = writeln!(
            t,
            " {}: pid {} on {}",
            self.layout.name(),
            self.pid,
            self.target
        );
        row(
            t,
            "streams",
            format!(
                "{} of {} open ({} failed) on {} HTTP/2 connection(s), {} channel(s), {} client thread(s)",
                thousands(self.open),
                thousands(self.requested),
                self.failed(),
                thousands(self.connections),
                self.channels,
                self.threads
            ),
        );
        row(t, "connect time", format!("{:.3} s", self.connect_s));
        row(
            t,
            "subscription check",
            format!(
                "{:.3} s, {} probe round(s), {} without a probe",
                self.subscribe_s, self.probe_rounds, self.unprobed
            ),
        );
        row(
            t,
            "published",
            format!(
                "{} messages in {:.3} s ({} msg/s, asked {}), {} B payloads",
                thousands(self.published),
                self.publish_s,
                opt(self.publish_rate(), 1),
                self.rate,
                self.payload_bytes
            ),
        );
        row(
            t,
            "deliveries received",
            format!(
                "{} of {} ({} within the publish window, rest in {:.3} s of drain)",
                thousands(self.loss.received),
                thousands(self.loss.expected),
                thousands(self.delivered_in_window),
                self.drain_s
            ),
        );
        row(t, "deliveries/s", opt(self.deliveries_per_s(), 0));
        row(
            t,
            "missing",
            format!(
                "{} ({} in gaps, {} at the end) on {} streams",
                self.loss.missing,
                self.loss.missing_in_gaps,
                self.loss.missing_at_end,
                self.loss.connections_with_loss
            ),
        );
        row(
            t,
            "out of order / duplicates",
            format!("{} / {}", self.loss.out_of_order, self.loss.duplicates),
        );
        let l = &self.latency;
        row(
            t,
            "latency µs p50/p99/p99.9/max",
            format!(
                "{} / {} / {} / {}   (mean {}, {} samples)",
                opt(l.p50_us, 0),
                opt(l.p99_us, 0),
                opt(l.p999_us, 0),
                opt(l.max_us, 0),
                opt(l.mean_us, 0),
                thousands(l.count)
            ),
        );
        row(
            t,
            "CPU, % of one core",
            format!(
                "server {} %, bench {} % ({} client thread(s) + publisher)",
                opt(self.server_cpu_pct(), 0),
                opt(self.client_cpu_pct(), 0),
                self.threads
            ),
        );
        row(t, "server RSS before", bytes(self.rss_before));
        row(
            t,
            "server RSS subscribed",
            format!(
                "{} ({} B / stream)",
                bytes(self.rss_subscribed),
                opt(self.rss_per_stream(), 0)
            ),
        );
        row(t, "server RSS after", bytes(self.rss_after));
        let c = &self.counts;
        row(
            t,
            "client reads",
            format!(
                "{} DATA pieces, {} messages, {}",
                thousands(c.pieces),
                thousands(c.frames),
                bytes(c.bytes)
            ),
        );
    }

    pub fn json(&self) -> Value {
        let l = &self.loss;
        json!({
            "layout": self.layout.name(),
            "process": self.process,
            "pid": self.pid,
            "streams": self.requested,
            "streams_open": self.open,
            "streams_failed": self.failed(),
            "connections": self.connections,
            "connect_s": round3(self.connect_s),
            "subscribe_s": round3(self.subscribe_s),
            "probe_rounds": self.probe_rounds,
            "published": self.published,
            "publish_s": round3(self.publish_s),
            "publish_rate": self.publish_rate().map(round1),
            "deliveries_expected": l.expected,
            "deliveries_received": l.received,
            "deliveries_in_window": self.delivered_in_window,
            "deliveries_per_s": self.deliveries_per_s().map(|r| r.round()),
            "drain_s": round3(self.drain_s),
            "missing": l.missing,
            "missing_in_gaps": l.missing_in_gaps,
            "missing_at_end": l.missing_at_end,
            "out_of_order": l.out_of_order,
            "duplicates": l.duplicates,
            "misrouted": self.counts.misrouted,
            "unrecognized_messages": self.counts.unrecognized,
            "streams_ended_by_server": self.ended.iter().map(|(_, n, _)| n).sum::<u64>(),
            "latency_us": self.latency.json(),
            "rss_before_bytes": self.rss_before,
            "rss_subscribed_bytes": self.rss_subscribed,
            "rss_after_bytes": self.rss_after,
            "rss_bytes_per_stream": self.rss_per_stream().map(round1),
            "server_cpu_pct": self.server_cpu_pct().map(|p| p.round()),
            "client_cpu_pct": self.client_cpu_pct().map(|p| p.round()),
            "healthz_connections": match &self.health {
                Health::Checked { total, .. } => json!(total),
                _ => Value::Null,
            },
            "healthz_expected": self.health.expected(self.connections),
            "failures": failures_json(&self.failures),
            "ended": failures_json(&self.ended),
            "publish_failures": failures_json(&self.publish_failures),
        })
    }
}

/// Every layout's figures against one server.
#[derive(Debug, Clone)]
pub struct GrpcReport {
    pub kind: ServerKind,
    pub layouts: Vec<LayoutReport>,
}

impl GrpcReport {
    pub fn errors(&self) -> Vec<String> {
        self.layouts.iter().flat_map(LayoutReport::errors).collect()
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let first = self.layouts.first();
        let server = server_line(
            self.kind,
            first.map_or(0, |l| l.pid),
            first.map_or("", |l| l.target.as_str()),
            first.and_then(|l| l.cores),
        );
        let _ = writeln!(t, "grpc: {server}");
        for l in &self.layouts {
            l.table(&mut t);
        }
        for e in self.errors() {
            let _ = writeln!(t, "  ERROR: {e}");
        }
        t
    }

    pub fn json(&self) -> Value {
        let errors = self.errors();
        let first = self.layouts.first();
        let mut v = json!({
            "scenario": "grpc",
            "server": self.kind.name(),
            "cores": first.and_then(|l| l.cores),
            "channels": first.map(|l| l.channels),
            "threads": first.map(|l| l.threads),
            "rate": first.map(|l| l.rate),
            "payload_bytes": first.map(|l| l.payload_bytes),
        });
        for l in &self.layouts {
            v[l.layout.key()] = l.json();
        }
        v["ok"] = json!(errors.is_empty());
        v["errors"] = json!(errors);
        v
    }
}

/// The figures `--server both` compares, per layout.
pub const COMPARED: &[(&str, &str)] = &[
    ("1 conn: deliveries/s", "one_connection.deliveries_per_s"),
    ("1 conn: latency p50 µs", "one_connection.latency_us.p50"),
    ("1 conn: latency p99 µs", "one_connection.latency_us.p99"),
    ("1 conn: latency p99.9 µs", "one_connection.latency_us.p999"),
    ("1 conn: missing", "one_connection.missing"),
    ("1 conn: server CPU %", "one_connection.server_cpu_pct"),
    (
        "1 conn: RSS / stream (B)",
        "one_connection.rss_bytes_per_stream",
    ),
    ("N conns: deliveries/s", "per_connection.deliveries_per_s"),
    ("N conns: latency p50 µs", "per_connection.latency_us.p50"),
    ("N conns: latency p99 µs", "per_connection.latency_us.p99"),
    (
        "N conns: latency p99.9 µs",
        "per_connection.latency_us.p999",
    ),
    ("N conns: missing", "per_connection.missing"),
    ("N conns: server CPU %", "per_connection.server_cpu_pct"),
    (
        "N conns: RSS / stream (B)",
        "per_connection.rss_bytes_per_stream",
    ),
];

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs every layout of `args` against one server, each against a
/// freshly started one.
pub fn run_one(args: &GrpcArgs, kind: ServerKind, server: &Server) -> Result<GrpcReport, String> {
    let mut layouts = Vec::new();
    for layout in &args.layout {
        if layouts.iter().any(|l: &LayoutReport| l.layout == *layout) {
            continue;
        }
        layouts.push(run_layout(args, kind, server, *layout)?);
    }
    Ok(GrpcReport { kind, layouts })
}

/// Reads one open stream until told to stop or the server ends it.
async fn read_stream(
    index: u64,
    channel: u32,
    send: SendRequest<Bytes>,
    mut body: RecvStream,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> StreamResult {
    let mut tally = SeqTally::default();
    let mut counts = Counts::default();
    let mut probed = false;
    let mut messages = Messages::default();
    let mut latencies: Vec<u64> = Vec::new();
    let hist = &shared.hists[index as usize % HIST_SHARDS];
    let end = loop {
        let data = tokio::select! {
            biased;
            _ = stop.changed() => break None,
            data = body.data() => data,
        };
        let piece = match data {
            None => break Some(grpc::stream_end(&mut body).await),
            Some(Err(e)) => break Some(grpc::h2_error(&e)),
            Some(Ok(piece)) => piece,
        };
        let arrival = monotonic_ns();
        let _ = body.flow_control().release_capacity(piece.len());
        counts.pieces += 1;
        counts.bytes += piece.len() as u64;
        let fed = messages.feed(&piece, |payload| {
            counts.frames += 1;
            let Some(payload) = payload else {
                counts.other_frames += 1;
                return;
            };
            match ws::read_tail(payload) {
                Some(Tail {
                    kind: KIND_MEASURED,
                    channel: c,
                    seq,
                    sent_ns,
                }) if c == channel => {
                    tally.observe(seq);
                    latencies.push(arrival.saturating_sub(sent_ns).max(1));
                }
                Some(Tail {
                    kind: KIND_MEASURED,
                    ..
                }) => counts.misrouted += 1,
                Some(Tail {
                    kind: KIND_PROBE, ..
                }) => {
                    if !probed {
                        probed = true;
                        shared.probed.fetch_add(1, Relaxed);
                    }
                }
                _ => counts.unrecognized += 1,
            }
        });
        if !latencies.is_empty() {
            let mut h = hist.lock().expect("histogram lock");
            for &ns in &latencies {
                h.saturating_record(ns);
            }
            drop(h);
            shared.delivered.fetch_add(latencies.len() as u64, Relaxed);
            latencies.clear();
        }
        if let Err(e) = fed {
            break Some(e);
        }
    };
    if end.is_some() {
        shared.ended.fetch_add(1, Relaxed);
    }
    StreamResult {
        channel,
        tally,
        counts,
        _keep: end.is_none().then_some((send, body)),
        end,
    }
}

/// `/healthz`'s count, asked until it is `baseline + open` or
/// [`HEALTH_SETTLE`] has passed.
fn settled_health(listen: SocketAddr, baseline: Option<u64>, open: u64) -> Health {
    let Some(baseline) = baseline else {
        return Health::Unavailable("no /healthz before the run".into());
    };
    let deadline = Instant::now() + HEALTH_SETTLE;
    loop {
        let health = Health::checked(baseline, http::healthz(listen, HEALTHZ_TIMEOUT));
        if health.error(open, "").is_none() || Instant::now() >= deadline {
            return health;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_layout(
    args: &GrpcArgs,
    kind: ServerKind,
    server: &Server,
    layout: Layout,
) -> Result<LayoutReport, String> {
    let per_connection = layout == Layout::PerConnection;
    let streams = args.streams;
    sys::check_nofile_for(if per_connection { streams } else { 1 })?;
    let server = grpc::with_grpc_listener(server, kind, if per_connection { 1 } else { streams });
    let mut target = Target::start(kind, &server)?;
    let label = format!("grpc {} {}", kind.name(), layout.name());
    let mut publisher = Publisher::connect(kind, target.zmq.as_deref(), target.listen)?;
    let (listen, grpc_addr) = (target.listen, target.grpc);
    let authority = grpc_addr.to_string();
    let sources = args.client.sources.clone();
    sys::check_sources(&sources, grpc_addr)?;
    let healthz_before = http::healthz(listen, HEALTHZ_TIMEOUT)
        .ok()
        .map(|c| c.iter().sum::<u64>());
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = target.rss_bytes()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client.threads as usize)
        .thread_name("grpc-client")
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let shared = Arc::new(Shared {
        probed: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        ended: AtomicU64::new(0),
        hists: (0..HIST_SHARDS)
            .map(|_| Mutex::new(new_histogram()))
            .collect(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let handshake_timeout = Duration::from_secs_f64(args.client.handshake_timeout_s);
    let connect_start = Instant::now();
    let deadline = tokio::time::Instant::from_std(
        connect_start + Duration::from_secs_f64(args.client.connect_timeout_s),
    );

    // Connect: the one connection first, if that is the layout.
    let one = if per_connection {
        None
    } else {
        let opened = runtime.block_on(async {
            tokio::time::timeout(handshake_timeout, grpc::connect(sources[0], grpc_addr)).await
        });
        Some(match opened {
            Ok(Ok(send)) => send,
            Ok(Err(e)) => return Err(format!("the one connection: {e}")),
            Err(_) => {
                return Err("the one connection: no answer within --handshake-timeout-s".into())
            }
        })
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(args.client.in_flight as usize));
    let (tx, rx) = mpsc::channel::<Result<u32, (String, String)>>();
    let mut handles = Vec::with_capacity(streams as usize);
    for i in 0..streams {
        let channel = (i % args.channels) as u32;
        let name = format!("grpc-{channel}");
        let (shared, limit, tx, stop) =
            (shared.clone(), limit.clone(), tx.clone(), stop_rx.clone());
        let (one, authority) = (one.clone(), authority.clone());
        let source = sources[(i % sources.len() as u64) as usize];
        handles.push(runtime.spawn(async move {
            let opened = tokio::time::timeout_at(deadline, async {
                let _permit = limit.acquire().await.expect("never closed");
                tokio::time::timeout(handshake_timeout, async {
                    let send = match one {
                        Some(send) => send,
                        None => grpc::connect(source, grpc_addr).await?,
                    };
                    let body = grpc::subscribe(send.clone(), &authority, &name).await?;
                    Ok::<_, String>((send, body))
                })
                .await
            })
            .await;
            let failed = |why: String| {
                let _ = tx.send(Err((why, format!("stream {i} from {source}"))));
                None
            };
            let (send, body) = match opened {
                Ok(Ok(Ok(held))) => held,
                Ok(Ok(Err(e))) => return failed(e),
                Ok(Err(_)) => return failed("no answer within --handshake-timeout-s".into()),
                Err(_) => return failed("unfinished at --connect-timeout-s".into()),
            };
            let _ = tx.send(Ok(channel));
            Some(read_stream(i, channel, send, body, shared, stop).await)
        }));
    }
    drop(tx);
    let mut open = 0u64;
    let mut failures: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut open_per_channel = vec![0u64; args.channels as usize];
    let mut last = Instant::now();
    let mut done = 0;
    while done < streams {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(channel)) => {
                open += 1;
                open_per_channel[channel as usize] += 1;
                done += 1;
            }
            Ok(Err((why, example))) => {
                failures.entry(why).or_insert((0, example)).0 += 1;
                done += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => target.alive()?,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if last.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "bench: {label}: {open}/{streams} open, {} failed",
                done - open
            );
            last = Instant::now();
        }
    }
    let connect_s = connect_start.elapsed().as_secs_f64();
    eprintln!(
        "bench: {label}: {open} of {streams} open in {connect_s:.3} s; checking subscriptions"
    );

    // Subscription check.
    let channel_names: Vec<Vec<u8>> = (0..args.channels)
        .map(|c| format!("grpc-{c}").into_bytes())
        .collect();
    let subscribe_start = Instant::now();
    let subscribe_deadline = subscribe_start + Duration::from_secs_f64(args.subscribe_timeout_s);
    let mut payload = Vec::with_capacity(args.payload_bytes as usize);
    let mut probe_rounds = 0u64;
    let mut last = Instant::now();
    while shared.probed.load(Relaxed) < open && Instant::now() < subscribe_deadline {
        for (c, name) in channel_names.iter().enumerate() {
            if open_per_channel[c] == 0 {
                continue;
            }
            let tail = Tail {
                kind: KIND_PROBE,
                channel: c as u32,
                seq: probe_rounds as u32,
                sent_ns: monotonic_ns(),
            };
            ws::encode_payload(&mut payload, args.payload_bytes as usize, &tail);
            publisher.publish(name, &payload)?;
        }
        probe_rounds += 1;
        let round_end = Instant::now() + PROBE_INTERVAL;
        while Instant::now() < round_end && shared.probed.load(Relaxed) < open {
            std::thread::sleep(Duration::from_millis(5));
        }
        if last.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "bench: {label}: {}/{open} streams have a probe after {probe_rounds} round(s)",
                shared.probed.load(Relaxed)
            );
            last = Instant::now();
            target.alive()?;
        }
    }
    let subscribe_s = subscribe_start.elapsed().as_secs_f64();
    let unprobed = open.saturating_sub(shared.probed.load(Relaxed));
    let connections = if per_connection { open } else { 1 };
    let health = settled_health(listen, healthz_before, connections);
    // Let the last probes drain before measuring.
    std::thread::sleep(Duration::from_millis(200));
    let rss_subscribed = target.rss_bytes()?;
    eprintln!(
        "bench: {label}: subscribed in {subscribe_s:.3} s ({unprobed} without a probe); \
         publishing {} msg/s for {} s",
        args.rate, args.duration_s
    );

    // Publish.
    let channels = args.channels;
    let total = (args.rate * args.duration_s).round() as u64;
    let mut sent_per_channel = vec![0u32; channels as usize];
    let delivered_start = shared.delivered.load(Relaxed);
    let server_cpu_start = target.cpu_seconds().ok();
    let client_cpu_start = procfs::self_cpu_seconds();
    let publish_start = Instant::now();
    let mut k = 0u64;
    let mut last = publish_start;
    while k < total {
        let now = Instant::now();
        let due = due_by(now.duration_since(publish_start), args.rate, total);
        while k < due {
            let c = (k % channels) as usize;
            let tail = Tail {
                kind: KIND_MEASURED,
                channel: c as u32,
                seq: (k / channels) as u32,
                sent_ns: monotonic_ns(),
            };
            ws::encode_payload(&mut payload, args.payload_bytes as usize, &tail);
            publisher.publish(&channel_names[c], &payload)?;
            sent_per_channel[c] += 1;
            k += 1;
        }
        if now.duration_since(last) >= Duration::from_secs(1) {
            eprintln!(
                "bench: {label}: {:.1} s, {k}/{total} published, {} deliveries, {} streams ended",
                now.duration_since(publish_start).as_secs_f64(),
                shared.delivered.load(Relaxed) - delivered_start,
                shared.ended.load(Relaxed)
            );
            last = now;
            target.alive()?;
        }
        if k < total {
            let next_due = publish_start + Duration::from_secs_f64(k as f64 / args.rate);
            let wait = next_due.saturating_duration_since(Instant::now());
            if wait > Duration::from_micros(50) {
                std::thread::sleep(wait.min(Duration::from_millis(100)));
            }
        }
    }
    // The publish window is the schedule's, as in fanout.
    let window_end = publish_start + Duration::from_secs_f64(total as f64 / args.rate);
    std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
    let publish_end = Instant::now();
    let publish_s = publish_end.duration_since(publish_start).as_secs_f64();
    let client_cpu_s = procfs::self_cpu_seconds() - client_cpu_start;
    let server_cpu_s = match (server_cpu_start, target.cpu_seconds().ok()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let delivered_in_window = shared.delivered.load(Relaxed) - delivered_start;

    // Drain: until every open stream has everything its channel got (an
    // ended stream's share never comes, and the deadline ends the wait).
    let expected: u64 = sent_per_channel
        .iter()
        .zip(&open_per_channel)
        .map(|(&s, &n)| s as u64 * n)
        .sum();
    let drain_deadline = publish_end + Duration::from_secs_f64(args.drain_s);
    while shared.delivered.load(Relaxed) - delivered_start < expected
        && Instant::now() < drain_deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    let drain_s = publish_end.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let results: Vec<StreamResult> = runtime.block_on(async {
        let mut results = Vec::with_capacity(handles.len());
        for h in handles {
            if let Ok(Some(r)) = h.await {
                results.push(r);
            }
        }
        results
    });
    target.alive()?;
    let rss_after = target.rss_bytes()?;
    let mut counts = Counts::default();
    let mut ended: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        counts.add(&r.counts);
        if let Some(how) = &r.end {
            ended
                .entry(how.clone())
                .or_insert((0, format!("stream {i} of the open ones")))
                .0 += 1;
        }
    }
    let loss = ws::summarize(
        results.iter().map(|r| (r.channel, &r.tally)),
        &sent_per_channel,
    );
    let mut hist = new_histogram();
    for h in &shared.hists {
        merge_histograms(&mut hist, &h.lock().expect("histogram lock"));
    }
    // Closing: every stream and connection, then the server.
    drop(results);
    drop(one);
    runtime.shutdown_timeout(Duration::from_secs(1));
    let publish_failures = publisher.failures();
    let report = LayoutReport {
        layout,
        process: target.how(),
        pid: target.pid,
        target: grpc_addr.to_string(),
        cores: target.cores,
        requested: streams,
        open,
        connections,
        failures: flatten(failures),
        channels,
        threads: args.client.threads,
        rate: args.rate,
        payload_bytes: args.payload_bytes,
        connect_s,
        subscribe_s,
        probe_rounds,
        unprobed,
        published: k,
        publish_s,
        delivered_in_window,
        drain_s,
        loss,
        counts,
        ended: flatten(ended),
        latency: Latency::from_ns(&hist),
        rss_before,
        rss_subscribed,
        rss_after,
        health,
        server_cpu_s,
        client_cpu_s,
        publish_failures,
    };
    target.stop();
    Ok(report)
}

/// Category → (count, example) as report rows.
fn flatten(m: BTreeMap<String, (u64, String)>) -> Vec<(String, u64, String)> {
    m.into_iter().map(|(k, (n, e))| (k, n, e)).collect()
}
