//! Counters for `/metrics` on the admin listener (see `admin`).
//!
//! Nothing here is shared on the delivery path: each core counts in plain
//! `Cell`s of its own ([`CoreStats`]), touched once per batch or per rare
//! event (a handshake, a slow consumer), and its once-a-second sweep copies
//! them into this core's slot of a shared table ([`publish`]). A scrape reads
//! that table, so per-core values are up to a second old. The ingest thread
//! (a single writer) counts in relaxed atomics, once per publication.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

/// Upper bounds (seconds) of the publish→send latency histogram.
pub const LATENCY_BUCKETS_S: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Transports as the connections gauge labels them, in `Transport` order;
/// the last, gRPC streams, have a gauge of their own (they are calls on
/// the `grpc` connections, not connections).
pub const TRANSPORTS: [&str; 7] = [
    "http",
    "websocket",
    "sse",
    "longpoll",
    "closing",
    "grpc",
    "grpc_stream",
];
const GRPC_STREAM_SLOT: usize = 6;

/// What one core has counted, as of its last sweep.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Open connections per transport ([`TRANSPORTS`] order).
    pub connections: [u64; TRANSPORTS.len()],
    /// Handshake results: a stream opened (`ws`, `sse`, `longpoll`) or why
    /// a request or connection was refused.
    pub handshakes: Vec<(&'static str, u64)>,
    pub deliveries: u64,
    pub delivered_bytes: u64,
    pub slow_consumer_disconnects: u64,
    pub history_evictions: u64,
    /// Open WebSockets that negotiated permessage-deflate.
    pub ws_deflate_connections: u64,
    /// Bytes compression kept off the wire: per delivery of a compressed
    /// frame, the plain frame's size less its own.
    pub ws_deflate_saved_bytes: u64,
    /// Non-cumulative counts per bucket of [`LATENCY_BUCKETS_S`], plus +Inf.
    pub latency_buckets: [u64; 15],
    pub latency_sum_ns: u64,
    pub latency_count: u64,
}

/// One core's counters: plain cells, only its own thread touches them.
#[derive(Default)]
pub struct CoreStats {
    handshakes: RefCell<Vec<(&'static str, u64)>>,
    deliveries: Cell<u64>,
    delivered_bytes: Cell<u64>,
    ws_deflate_saved_bytes: Cell<u64>,
    latency_buckets: [Cell<u64>; 15],
    latency_sum_ns: Cell<u64>,
    latency_count: Cell<u64>,
}

thread_local! {
    /// Slow consumers dropped by this thread (a core): counted where the
    /// connection is dropped, which does not know its core.
    static SLOW_CONSUMERS: Cell<u64> = const { Cell::new(0) };
}

/// Messages compressed for permessage-deflate (once per message and
/// window, by whichever core did it).
static WS_DEFLATED: AtomicU64 = AtomicU64::new(0);

/// Counts a message compressed for permessage-deflate.
pub fn note_ws_deflated() {
    WS_DEFLATED.fetch_add(1, Ordering::Relaxed);
}

/// gRPC calls ended, by status code.
static GRPC_ENDS: [AtomicU64; 17] = [const { AtomicU64::new(0) }; 17];

/// Counts a gRPC call that ended with `code`.
pub fn note_grpc_end(code: protocol::grpc::Code) {
    GRPC_ENDS[code as usize].fetch_add(1, Ordering::Relaxed);
}

/// Counts a slow consumer dropped on the calling core.
pub fn note_slow_consumer() {
    SLOW_CONSUMERS.with(|c| c.set(c.get() + 1));
}

impl CoreStats {
    /// Counts one handshake result (`ws`, `sse`, `longpoll`, or a refusal
    /// reason).
    pub fn handshake(&self, result: &'static str) {
        let mut all = self.handshakes.borrow_mut();
        match all.iter_mut().find(|(r, _)| *r == result) {
            Some((_, n)) => *n += 1,
            None => all.push((result, 1)),
        }
    }

    /// Counts one dispatch batch: frames queued and their bytes.
    pub fn delivered(&self, deliveries: u64, bytes: u64) {
        self.deliveries.set(self.deliveries.get() + deliveries);
        self.delivered_bytes.set(self.delivered_bytes.get() + bytes);
    }

    /// Counts bytes a dispatch batch kept off the wire by compressing.
    pub fn deflate_saved(&self, bytes: u64) {
        self.ws_deflate_saved_bytes
            .set(self.ws_deflate_saved_bytes.get() + bytes);
    }

    /// One publish→send latency observation.
    pub fn observe_latency(&self, latency: Duration) {
        let s = latency.as_secs_f64();
        let i = LATENCY_BUCKETS_S
            .iter()
            .position(|&le| s <= le)
            .unwrap_or(LATENCY_BUCKETS_S.len());
        let b = &self.latency_buckets[i];
        b.set(b.get() + 1);
        self.latency_sum_ns
            .set(self.latency_sum_ns.get() + latency.as_nanos() as u64);
        self.latency_count.set(self.latency_count.get() + 1);
    }

    /// What this core counted so far, with its connection counts.
    pub fn snapshot(&self, connections: [u64; TRANSPORTS.len()]) -> Snapshot {
        Snapshot {
            connections,
            handshakes: self.handshakes.borrow().clone(),
            deliveries: self.deliveries.get(),
            delivered_bytes: self.delivered_bytes.get(),
            slow_consumer_disconnects: SLOW_CONSUMERS.with(Cell::get),
            // The core's registry counts these, its connections those; the
            // sweep fills them in.
            history_evictions: 0,
            ws_deflate_connections: 0,
            ws_deflate_saved_bytes: self.ws_deflate_saved_bytes.get(),
            latency_buckets: std::array::from_fn(|i| self.latency_buckets[i].get()),
            latency_sum_ns: self.latency_sum_ns.get(),
            latency_count: self.latency_count.get(),
        }
    }
}

/// Each core's last published snapshot, by core index.
static CORES: Mutex<Vec<Snapshot>> = Mutex::new(Vec::new());

/// Publishes a core's snapshot (once a second, from its sweep).
pub fn publish(core: usize, snapshot: Snapshot) {
    let mut cores = CORES.lock().unwrap_or_else(|e| e.into_inner());
    if cores.len() <= core {
        cores.resize_with(core + 1, Snapshot::default);
    }
    cores[core] = snapshot;
}

/// ZeroMQ publishers or forwarders connected to the SUB socket (counted
/// by ingest from the socket's monitor events).
static ZMQ_PEERS: AtomicI64 = AtomicI64::new(0);
/// Channels the SUB socket subscribes to upstream (set by ingest).
static ZMQ_SUBSCRIPTIONS: AtomicU64 = AtomicU64::new(0);

/// A peer connected (+1) or went away (-1); returns how many there are.
pub fn add_zmq_peers(delta: i64) -> i64 {
    ZMQ_PEERS.fetch_add(delta, Ordering::Relaxed) + delta
}

/// ZeroMQ peers connected now (readiness with `ready_requires_publisher`).
pub fn zmq_peers() -> i64 {
    ZMQ_PEERS.load(Ordering::Relaxed)
}

pub fn set_zmq_subscriptions(n: u64) {
    ZMQ_SUBSCRIPTIONS.store(n, Ordering::Relaxed);
}

/// Publications received from ZeroMQ (accepted or dropped).
static MESSAGES_IN: AtomicU64 = AtomicU64::new(0);

/// Why ingest dropped a publication, as the `reason` label says it.
pub const DROP_REASONS: [&str; 11] = [
    "wrong_frame_count",
    "bad_channel_name",
    "payload_too_large",
    "bad_meta",
    "bad_event_name",
    "bad_id",
    // Not after the channel's last id: the second copy of a publication
    // (redundant forwarders), or one that came out of order.
    "duplicate",
    "ids_exhausted",
    "not_subscribed",
    "not_here",
    // Without a publisher id where the endpoints are redundant
    // (`zmq_redundant`): its copies could not be told apart.
    "no_publisher_id",
];
static DROPPED: [AtomicU64; DROP_REASONS.len()] = [const { AtomicU64::new(0) }; DROP_REASONS.len()];

/// Upstream message kinds, as the `kind` label says them
/// (`protocol::upstream::Kind` order).
pub const UPSTREAM_KINDS: [&str; 5] = [
    "message",
    "connect",
    "disconnect",
    "subscribe",
    "unsubscribe",
];
static UPSTREAM_MESSAGES: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
static UPSTREAM_BYTES: AtomicU64 = AtomicU64::new(0);
static UPSTREAM_BLOCKED_NS: AtomicU64 = AtomicU64::new(0);
static UPSTREAM_PEERS: AtomicI64 = AtomicI64::new(0);
/// Confirm mode (`upstream_confirm_ms`): messages a hub has not confirmed
/// yet, and those sent again.
static UPSTREAM_UNCONFIRMED: AtomicI64 = AtomicI64::new(0);
static UPSTREAM_RESENT: AtomicU64 = AtomicU64::new(0);

/// The relay's count of messages no hub has confirmed yet.
pub fn set_upstream_unconfirmed(n: usize) {
    UPSTREAM_UNCONFIRMED.store(n as i64, Ordering::Relaxed);
}

/// Counts messages sent again for want of a confirmation.
pub fn note_upstream_resent(n: u64) {
    UPSTREAM_RESENT.fetch_add(n, Ordering::Relaxed);
}
/// Why a client's message (or a presence event) did not go upstream, as
/// the `reason` label says it.
pub const UPSTREAM_REFUSALS: [&str; 8] = [
    "bad_message",
    "channel_not_allowed",
    "rate_messages",
    "rate_bytes",
    "not_configured",
    "publish_timeout",
    "presence_overflow",
    "too_many_channels",
];
static UPSTREAM_REFUSED: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
/// Messages for one connection that found it gone.
static DIRECT_UNDELIVERED: AtomicU64 = AtomicU64::new(0);

/// Counts one message handed to the hubs' socket (by the relay thread),
/// by its kind's [`UPSTREAM_KINDS`] index, and its payload bytes.
pub fn note_upstream(kind: usize, payload_bytes: usize) {
    UPSTREAM_MESSAGES[kind].fetch_add(1, Ordering::Relaxed);
    UPSTREAM_BYTES.fetch_add(payload_bytes as u64, Ordering::Relaxed);
}

/// Time the relay waited for room at the hubs.
pub fn note_upstream_blocked(d: Duration) {
    UPSTREAM_BLOCKED_NS.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
}

/// A hub connected (+1) or went away (-1).
pub fn add_upstream_peers(delta: i64) -> i64 {
    UPSTREAM_PEERS.fetch_add(delta, Ordering::Relaxed) + delta
}

/// Counts a refusal by its [`UPSTREAM_REFUSALS`] index.
pub fn note_upstream_refused(reason: usize) {
    UPSTREAM_REFUSED[reason].fetch_add(1, Ordering::Relaxed);
}

pub fn note_direct_undelivered() {
    DIRECT_UNDELIVERED.fetch_add(1, Ordering::Relaxed);
}

/// Counts the peers of a ZeroMQ socket (publishers or forwarders of the
/// SUB socket, hubs of the upstream one) from its monitor events, on a
/// thread of its own (`<name>-monitor`), so the socket's owner keeps its
/// single blocking loop; `add` takes +1 or -1 and returns the count.
pub fn watch_zmq_peers(
    ctx: &zmq::Context,
    socket: &zmq::Socket,
    name: &'static str,
    add: fn(i64) -> i64,
) -> Result<(), String> {
    let endpoint = format!("inproc://gateway-{name}-monitor");
    let events = zmq::SocketEvent::CONNECTED as i32
        | zmq::SocketEvent::ACCEPTED as i32
        | zmq::SocketEvent::DISCONNECTED as i32;
    socket
        .monitor(&endpoint, events)
        .map_err(|e| format!("{name} monitor: {e}"))?;
    let pair = ctx
        .socket(zmq::PAIR)
        .map_err(|e| format!("{name} monitor socket: {e}"))?;
    pair.connect(&endpoint)
        .map_err(|e| format!("{name} monitor connect: {e}"))?;
    std::thread::Builder::new()
        .name(format!("{name}-monitor"))
        .spawn(move || loop {
            // An event is two frames: 2 bytes of event number and 4 of
            // value (little-endian), then the peer's endpoint.
            let Ok(frames) = pair.recv_multipart(0) else {
                return;
            };
            let Some(head) = frames.first().filter(|f| f.len() >= 2) else {
                continue;
            };
            let event = zmq::SocketEvent::from_raw(u16::from_le_bytes([head[0], head[1]]));
            let delta = match event {
                zmq::SocketEvent::CONNECTED | zmq::SocketEvent::ACCEPTED => 1,
                zmq::SocketEvent::DISCONNECTED => -1,
                _ => continue,
            };
            let peers = add(delta);
            let endpoint = frames
                .get(1)
                .map(|f| String::from_utf8_lossy(f).into_owned());
            tracing::info!(
                socket = name,
                ?event,
                endpoint = endpoint.as_deref().unwrap_or("?"),
                peers,
                "zmq peer"
            );
        })
        .map_err(|e| format!("spawn {name} monitor thread: {e}"))?;
    Ok(())
}

/// Counts a publication received by ingest.
pub fn note_message_in() {
    MESSAGES_IN.fetch_add(1, Ordering::Relaxed);
}

/// Counts a publication dropped by ingest, by its [`DROP_REASONS`] index.
pub fn note_dropped(reason: usize) {
    DROPPED[reason].fetch_add(1, Ordering::Relaxed);
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

fn counter(labels: Vec<LabelPair>, v: u64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v as f64);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

fn gauge(labels: Vec<LabelPair>, v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

/// The whole `/metrics` body, Prometheus text format 0.0.4.
pub fn render() -> String {
    let cores = CORES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut families = Vec::new();

    let mut conns = Vec::new();
    let mut streams = Vec::new();
    for (i, s) in cores.iter().enumerate() {
        for (slot, (t, &n)) in TRANSPORTS.iter().zip(&s.connections).enumerate() {
            if slot == GRPC_STREAM_SLOT {
                streams.push(gauge(vec![label("core", &i.to_string())], n as f64));
                continue;
            }
            let labels = vec![label("core", &i.to_string()), label("transport", t)];
            conns.push(gauge(labels, n as f64));
        }
    }
    families.push(family(
        "gateway_connections",
        "Open connections by transport and core (as of each core's last once-a-second sweep).",
        MetricType::GAUGE,
        conns,
    ));
    families.push(family(
        "gateway_grpc_streams",
        "Open gRPC calls (Subscribe, Connect) by core, on the grpc connections.",
        MetricType::GAUGE,
        streams,
    ));
    let ends: Vec<Metric> = protocol::grpc::Code::ALL
        .iter()
        .filter_map(|&code| {
            let n = GRPC_ENDS[code as usize].load(Ordering::Relaxed);
            (n > 0).then(|| counter(vec![label("code", code.name())], n))
        })
        .collect();
    families.push(family(
        "gateway_grpc_stream_ends_total",
        "gRPC calls ended, by the status they ended with.",
        MetricType::COUNTER,
        ends,
    ));

    let mut handshakes: Vec<(&'static str, u64)> = Vec::new();
    for s in &cores {
        for &(r, n) in &s.handshakes {
            match handshakes.iter_mut().find(|(h, _)| *h == r) {
                Some((_, total)) => *total += n,
                None => handshakes.push((r, n)),
            }
        }
    }
    handshakes.sort();
    families.push(family(
        "gateway_handshakes_total",
        "Requests by result: a stream opened (ws, sse, longpoll) or why it was refused (up to 1 s old).",
        MetricType::COUNTER,
        handshakes
            .iter()
            .map(|&(r, n)| counter(vec![label("result", r)], n))
            .collect(),
    ));

    if crate::tls::enabled() {
        families.push(family(
            "gateway_tls_handshakes_total",
            "TLS handshakes on the public listener, by result: ok, or why it failed.",
            MetricType::COUNTER,
            crate::tls::handshake_counts()
                .into_iter()
                .map(|(r, n)| counter(vec![label("result", r)], n))
                .collect(),
        ));
        families.push(family(
            "gateway_tls_certificate_not_after_seconds",
            "When each TLS certificate in use expires (notAfter, Unix seconds).",
            MetricType::GAUGE,
            crate::tls::expiries()
                .into_iter()
                .map(|(file, at)| gauge(vec![label("file", &file)], at as f64))
                .collect(),
        ));
    }

    families.push(family(
        "gateway_messages_in_total",
        "Publications received from ZeroMQ, accepted or dropped.",
        MetricType::COUNTER,
        vec![counter(vec![], MESSAGES_IN.load(Ordering::Relaxed))],
    ));
    families.push(family(
        "gateway_messages_dropped_total",
        "Publications dropped at ingest, by reason.",
        MetricType::COUNTER,
        DROP_REASONS
            .iter()
            .zip(&DROPPED)
            .map(|(r, n)| counter(vec![label("reason", r)], n.load(Ordering::Relaxed)))
            .collect(),
    ));

    let sum = |f: fn(&Snapshot) -> u64| cores.iter().map(f).sum::<u64>();
    for (name, help, v) in [
        (
            "gateway_deliveries_total",
            "Messages queued to a subscriber (one per subscriber per message; up to 1 s old).",
            sum(|s| s.deliveries),
        ),
        (
            "gateway_delivered_bytes_total",
            "Bytes of those messages (up to 1 s old).",
            sum(|s| s.delivered_bytes),
        ),
        (
            "gateway_slow_consumer_disconnects_total",
            "Connections dropped for letting their outbound queue overflow (up to 1 s old).",
            sum(|s| s.slow_consumer_disconnects),
        ),
        (
            "gateway_history_evictions_total",
            "Messages pushed out of a channel's history by history_messages, per core (up to 1 s old).",
            sum(|s| s.history_evictions),
        ),
        (
            "gateway_ws_deflate_saved_bytes_total",
            "Bytes permessage-deflate kept off the wire: per compressed delivery, the plain frame's \
             size less the compressed one's (up to 1 s old).",
            sum(|s| s.ws_deflate_saved_bytes),
        ),
        (
            "gateway_ws_deflate_messages_total",
            "Messages compressed for permessage-deflate: once per message and window, whatever \
             the number of subscribers.",
            WS_DEFLATED.load(Ordering::Relaxed),
        ),
    ] {
        families.push(family(name, help, MetricType::COUNTER, vec![counter(vec![], v)]));
    }
    families.push(family(
        "gateway_ws_deflate_connections",
        "Open WebSockets that negotiated permessage-deflate (up to 1 s old).",
        MetricType::GAUGE,
        vec![gauge(vec![], sum(|s| s.ws_deflate_connections) as f64)],
    ));

    families.push(family(
        "gateway_zmq_peers",
        "ZeroMQ publishers or forwarders connected to the SUB socket.",
        MetricType::GAUGE,
        vec![gauge(vec![], zmq_peers() as f64)],
    ));
    families.push(family(
        "gateway_zmq_subscriptions",
        "Channels the SUB socket subscribes to upstream (zmq_subscribe = demand: channels with \
         local subscribers, or left within the linger); 1 with zmq_subscribe = all.",
        MetricType::GAUGE,
        vec![gauge(
            vec![],
            ZMQ_SUBSCRIPTIONS.load(Ordering::Relaxed) as f64,
        )],
    ));

    families.push(family(
        "gateway_upstream_messages_total",
        "Messages handed to the hubs' socket, by kind (client messages and presence events).",
        MetricType::COUNTER,
        UPSTREAM_KINDS
            .iter()
            .zip(&UPSTREAM_MESSAGES)
            .map(|(k, n)| counter(vec![label("kind", k)], n.load(Ordering::Relaxed)))
            .collect(),
    ));
    families.push(family(
        "gateway_upstream_bytes_total",
        "Payload bytes of the messages handed to the hubs' socket.",
        MetricType::COUNTER,
        vec![counter(vec![], UPSTREAM_BYTES.load(Ordering::Relaxed))],
    ));
    families.push(family(
        "gateway_upstream_refused_total",
        "Client messages refused (the client is told why) and presence events dropped, by reason.",
        MetricType::COUNTER,
        UPSTREAM_REFUSALS
            .iter()
            .zip(&UPSTREAM_REFUSED)
            .map(|(r, n)| counter(vec![label("reason", r)], n.load(Ordering::Relaxed)))
            .collect(),
    ));
    let mut blocked = Counter::default();
    blocked.set_value(UPSTREAM_BLOCKED_NS.load(Ordering::Relaxed) as f64 / 1e9);
    let mut blocked_metric = Metric::default();
    blocked_metric.set_counter(blocked);
    families.push(family(
        "gateway_upstream_blocked_seconds_total",
        "Time the upstream socket was full (hubs slow or gone) and senders waited.",
        MetricType::COUNTER,
        vec![blocked_metric],
    ));
    families.push(family(
        "gateway_upstream_peers",
        "Hub workers connected to the upstream socket.",
        MetricType::GAUGE,
        vec![gauge(vec![], UPSTREAM_PEERS.load(Ordering::Relaxed) as f64)],
    ));
    families.push(family(
        "gateway_upstream_unconfirmed",
        "Messages handed to the hubs that no hub has confirmed yet (upstream_confirm_ms).",
        MetricType::GAUGE,
        vec![gauge(
            vec![],
            UPSTREAM_UNCONFIRMED.load(Ordering::Relaxed) as f64,
        )],
    ));
    families.push(family(
        "gateway_upstream_resent_total",
        "Messages sent to the hubs again, unconfirmed past upstream_confirm_ms.",
        MetricType::COUNTER,
        vec![counter(vec![], UPSTREAM_RESENT.load(Ordering::Relaxed))],
    ));
    families.push(family(
        "gateway_direct_undelivered_total",
        "Messages for one connection that found it gone.",
        MetricType::COUNTER,
        vec![counter(vec![], DIRECT_UNDELIVERED.load(Ordering::Relaxed))],
    ));

    families.push(family(
        "gateway_log_lines_lost_total",
        "Log lines that could not be written to stderr (its reader gone); serving goes on.",
        MetricType::COUNTER,
        vec![counter(vec![], super::logs::lines_lost())],
    ));

    let mut buckets = [0u64; 15];
    for s in &cores {
        for (b, n) in buckets.iter_mut().zip(&s.latency_buckets) {
            *b += n;
        }
    }
    let mut cumulative = 0;
    let bucket_list = LATENCY_BUCKETS_S
        .iter()
        .zip(&buckets)
        .map(|(&le, &n)| {
            cumulative += n;
            let mut b = Bucket::default();
            b.set_upper_bound(le);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut h = Histogram::default();
    h.set_sample_count(sum(|s| s.latency_count));
    h.set_sample_sum(sum(|s| s.latency_sum_ns) as f64 / 1e9);
    h.set_bucket(bucket_list);
    let mut m = Metric::default();
    m.set_histogram(h);
    families.push(family(
        "gateway_publish_to_send_seconds",
        "From a publication's encoding at ingest to its batch being written, once per message per core that delivered it (up to 1 s old).",
        MetricType::HISTOGRAM,
        vec![m],
    ));

    encode(families)
}

fn encode(mut families: Vec<MetricFamily>) -> String {
    families.retain(|f| !f.get_metric().is_empty());
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
        tracing::warn!(error = %e, "metrics encoding failed");
    }
    out
}

/// What `gateway forwarder` reports: its peers on each side, and what its
/// proxy moved (libzmq's counts, None when the proxy did not answer).
pub struct ForwarderStats {
    pub publishers: i64,
    pub gateways: i64,
    /// libzmq's `STATISTICS`: messages and bytes received and sent on the
    /// publishers' side, then on the gateways' side.
    pub proxy: Option<[u64; 8]>,
}

/// The forwarder's `/metrics` body.
pub fn render_forwarder(stats: &ForwarderStats) -> String {
    let mut families = vec![family(
        "gateway_forwarder_peers",
        "Peers connected, by side: publishers (and hubs) on the XSUB side, gateways on the XPUB side.",
        MetricType::GAUGE,
        vec![
            gauge(vec![label("side", "publishers")], stats.publishers as f64),
            gauge(vec![label("side", "gateways")], stats.gateways as f64),
        ],
    )];
    // The publishers' side: in, bytes in, out, bytes out; then the
    // gateways' side the same (subscriptions carry no bytes worth counting).
    if let Some([pub_in, pub_in_bytes, pub_out, _, gw_in, _, gw_out, gw_out_bytes]) = stats.proxy {
        families.push(family(
            "gateway_forwarder_publications_total",
            "Publications received from publishers, and sent on to the gateways (each once: the XPUB socket sends it to every gateway subscribed).",
            MetricType::COUNTER,
            vec![
                counter(vec![label("direction", "in")], pub_in),
                counter(vec![label("direction", "out")], gw_out),
            ],
        ));
        families.push(family(
            "gateway_forwarder_publication_bytes_total",
            "Bytes of those publications.",
            MetricType::COUNTER,
            vec![
                counter(vec![label("direction", "in")], pub_in_bytes),
                counter(vec![label("direction", "out")], gw_out_bytes),
            ],
        ));
        families.push(family(
            "gateway_forwarder_subscriptions_total",
            "Subscription messages from the gateways, and passed on to the publishers.",
            MetricType::COUNTER,
            vec![
                counter(vec![label("direction", "in")], gw_in),
                counter(vec![label("direction", "out")], pub_out),
            ],
        ));
    }
    encode(families)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_its_bucket_and_renders_cumulatively() {
        let stats = CoreStats::default();
        stats.observe_latency(Duration::from_micros(50));
        stats.observe_latency(Duration::from_millis(3));
        stats.observe_latency(Duration::from_secs(10));
        stats.handshake("ws");
        stats.handshake("ws");
        let snap = stats.snapshot([0, 2, 0, 0, 0, 1, 3]);
        assert_eq!(snap.latency_buckets[0], 1);
        assert_eq!(snap.latency_buckets[5], 1);
        assert_eq!(snap.latency_buckets[14], 1);
        assert_eq!(snap.handshakes, vec![("ws", 2)]);
        publish(0, snap);
        let text = render();
        assert!(
            text.contains("gateway_publish_to_send_seconds_count 3"),
            "{text}"
        );
        assert!(text.contains("gateway_publish_to_send_seconds_bucket{le=\"0.005\"} 2"));
        assert!(text.contains("gateway_handshakes_total{result=\"ws\"} 2"));
        assert!(text.contains("gateway_connections{core=\"0\",transport=\"websocket\"} 2"));
        // gRPC calls are not connections: a gauge of their own.
        assert!(text.contains("gateway_connections{core=\"0\",transport=\"grpc\"} 1"));
        assert!(!text.contains("transport=\"grpc_stream\""), "{text}");
        assert!(
            text.contains("gateway_grpc_streams{core=\"0\"} 3"),
            "{text}"
        );
    }
}
