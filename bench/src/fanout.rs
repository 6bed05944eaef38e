//! The fan-out scenario: N subscribers (WebSocket, or SSE with
//! `--transport sse`) over C channels, a ZeroMQ publisher at R messages/s for
//! D seconds; deliveries/s, loss, reordering and publish→receive latency.
//! nchan and Bun have no ZeroMQ: they get the same publications as
//! pipelined `POST /pub?channel=…` requests (see `publish`).
//!
//! Client threads each own a contiguous block of the connections and one
//! level-triggered epoll set; connection i subscribes to `fanout-{i % C}`.
//! The publisher (this thread) first publishes probes to every channel until
//! every connection has received one (which also gets past ZeroMQ's slow
//! joiner), then publishes the measured messages round robin over the
//! channels: message k goes to channel k % C with sequence number k / C. Each
//! payload ends with its kind, channel, sequence number and the publisher's
//! CLOCK_MONOTONIC send time (taken just before the ZeroMQ send). A receiver
//! records `arrival - send time` in its own histogram (merged at the end),
//! where the arrival of what a socket's first read returns is when the
//! epoll_wait that reported it returned (it was in the socket by then; a
//! frame sent later than that, and any further read, takes the clock again):
//! the latency does not include the client working through a batch of
//! ready sockets. A second histogram takes the arrival from the kernel's
//! receive timestamp of the read (`SO_TIMESTAMPNS`, the last segment the
//! read took): publish→socket, which leaves out how long the client thread
//! took to be scheduled and woken, the load generator's share of a shared
//! machine. The client's and the server's CPU use over the publish
//! window are reported, to tell whether the client kept up.
//!
//! Per frame the receiver parses the header, reads 33 bytes at the end of
//! the payload and updates a 24-byte tally: no allocation, no copy unless a
//! frame is split across reads. With `--deflate` a compressed message is
//! decompressed first (into the thread's one buffer), as a browser would,
//! so its check costs the client what it costs a real one. An SSE event's data (its `data:` lines
//! joined, de-chunked first where the server uses chunked coding) is the
//! same content as a WebSocket message and is measured the same way; see
//! `sse.rs` for how it is cut out of the stream without allocating.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use protocol::deflate::Inflater;
use serde_json::{json, Value};

use crate::cli::{FanoutArgs, PayloadKind, Server, ServerKind, Transport};
use crate::handshake::{DialConfig, Dialer, Outcome};
use crate::http;
use crate::procfs;
use crate::publish::Publisher;
use crate::report::{bytes, failures_json, server_line, Health, Latency};
use crate::sse::{self, Item, SseState};
use crate::sys::{self, Epoll};
use crate::target::Target;
use crate::util::{monotonic_ns, opt, realtime_minus_monotonic_ns, thousands};
use crate::ws::{self, FrameHead, ReadEnd, SeqTally, Tail, KIND_MEASURED, KIND_PROBE};

const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(10);
/// Probe rounds: at most this often, and at most this many probes a second.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
const PROBES_PER_S_MAX: f64 = 20_000.0;
/// Latency histogram: 1 ns to 1 h, 3 significant digits.
const HIST_MAX_NS: u64 = 3_600_000_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds")
}

/// A number shared between one client thread and the main thread, on its
/// own cache line.
#[repr(align(64))]
#[derive(Default)]
struct Padded(AtomicU64);

/// What the client threads and the main thread share while running.
struct Shared {
    stop: AtomicBool,
    open: AtomicU64,
    gave_up: AtomicU64,
    /// Client threads done with their connect phase.
    connected_threads: AtomicU64,
    /// Connections that have received at least one probe.
    probed: AtomicU64,
    /// Connections the server closed (EOF, reset, close frame).
    closed: AtomicU64,
    /// Measured deliveries per client thread.
    delivered: Vec<Padded>,
    /// Open connections per channel (added by each thread after connecting).
    open_per_channel: Mutex<Vec<u64>>,
}

impl Shared {
    fn delivered(&self) -> u64 {
        self.delivered.iter().map(|d| d.0.load(Relaxed)).sum()
    }
}

/// One subscriber, as its client thread keeps it.
struct Conn {
    /// -1: not open (yet, any more, or never).
    fd: RawFd,
    channel: u32,
    tally: SeqTally,
    probed: bool,
    closed: bool,
    opened: bool,
    /// An unfinished frame (SSE: the unfinished event's data, then an
    /// unfinished line) from the previous read.
    carry: Vec<u8>,
    /// SSE only: where the stream stands between reads.
    sse: SseState,
}

/// Per-thread counts of what arrived, besides measured deliveries. With SSE
/// a "frame" is an event and "oversized" an event too large for the read
/// buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub frames: u64,
    pub measured: u64,
    pub probes: u64,
    /// Data frames whose content does not end like a fan-out payload.
    pub unrecognized: u64,
    /// Measured messages for another channel than the connection's.
    pub misrouted: u64,
    /// Frames with the mask bit set (servers must not mask).
    pub masked: u64,
    /// Data frames without FIN, and continuation frames.
    pub fragmented: u64,
    pub pings: u64,
    pub close_frames: u64,
    /// Frames too large for the read buffer (the connection is dropped).
    pub oversized: u64,
    /// SSE comment lines (heartbeats).
    pub comments: u64,
    /// SSE streams whose chunked coding broke (the connection is dropped),
    /// and how the first one broke.
    pub malformed: u64,
    pub malformed_why: Option<&'static str>,
    /// Connections that ended with an EOF / a reset / another read error.
    pub eofs: u64,
    pub resets: u64,
    pub read_errors: u64,
    /// Reads (recv calls that returned data).
    pub reads: u64,
    pub bytes: u64,
    /// Sockets the kernel would not stamp (SO_TIMESTAMPNS refused): their
    /// deliveries are missing from the socket latency.
    pub unstamped_sockets: u64,
    /// Connections whose 101 agreed to permessage-deflate.
    pub deflate_agreed: u64,
    /// Data frames that came compressed (RSV1), and those of them that did
    /// not decompress.
    pub compressed: u64,
    pub inflate_failed: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.frames += o.frames;
        self.measured += o.measured;
        self.probes += o.probes;
        self.unrecognized += o.unrecognized;
        self.misrouted += o.misrouted;
        self.masked += o.masked;
        self.fragmented += o.fragmented;
        self.pings += o.pings;
        self.close_frames += o.close_frames;
        self.oversized += o.oversized;
        self.comments += o.comments;
        self.malformed += o.malformed;
        self.malformed_why = self.malformed_why.or(o.malformed_why);
        self.eofs += o.eofs;
        self.resets += o.resets;
        self.read_errors += o.read_errors;
        self.reads += o.reads;
        self.bytes += o.bytes;
        self.unstamped_sockets += o.unstamped_sockets;
        self.deflate_agreed += o.deflate_agreed;
        self.compressed += o.compressed;
        self.inflate_failed += o.inflate_failed;
    }
}

/// What a client thread hands back at the end.
struct WorkerResult {
    hist: Histogram<u64>,
    socket_hist: Histogram<u64>,
    /// (channel, tally) of every connection that opened.
    tallies: Vec<(u32, SeqTally)>,
    counters: Counters,
    failures: BTreeMap<String, (u64, String)>,
    opened: u64,
    closed: u64,
    connect_end: Option<Instant>,
}

/// When a frame arrived: when its read returned (the `epoll_wait` that
/// reported it, or the clock at a further read), and when the kernel
/// received its data (monotonic ns), if it said.
#[derive(Clone, Copy)]
struct Arrival {
    read_ns: u64,
    socket_ns: Option<u64>,
}

/// The histograms one client thread fills.
struct Hists {
    read: Histogram<u64>,
    socket: Histogram<u64>,
}

/// Handles one message's content (a WebSocket data frame's payload, an SSE
/// event's data) for connection `conn`, read at `at`: both transports are
/// measured by this one function.
#[inline]
fn on_message(
    conn: &mut Conn,
    content: &[u8],
    at: Arrival,
    hists: &mut Hists,
    c: &mut Counters,
    shared: &Shared,
) {
    match ws::decode_tail(content) {
        Some(Tail {
            kind: KIND_MEASURED,
            channel,
            seq,
            sent_ns,
        }) => {
            if channel != conn.channel {
                c.misrouted += 1;
            } else {
                c.measured += 1;
                conn.tally.observe(seq);
                // Arrived after epoll_wait returned: take the clock now.
                let latency = if at.read_ns > sent_ns {
                    at.read_ns - sent_ns
                } else {
                    monotonic_ns().saturating_sub(sent_ns)
                };
                hists.read.saturating_record(latency.max(1));
                if let Some(socket_ns) = at.socket_ns {
                    hists
                        .socket
                        .saturating_record(socket_ns.saturating_sub(sent_ns).max(1));
                }
            }
        }
        Some(Tail {
            kind: KIND_PROBE, ..
        }) => {
            c.probes += 1;
            if !conn.probed {
                conn.probed = true;
                shared.probed.fetch_add(1, Relaxed);
            }
        }
        _ => c.unrecognized += 1,
    }
}

/// Handles one SSE item for connection `conn`, read at `at`.
#[inline]
fn on_sse_item(
    conn: &mut Conn,
    item: Item<'_>,
    at: Arrival,
    hists: &mut Hists,
    c: &mut Counters,
    shared: &Shared,
) {
    match item {
        Item::Event(data) => {
            c.frames += 1;
            on_message(conn, data, at, hists, c, shared);
        }
        Item::Comment => c.comments += 1,
    }
}

/// What a client thread reads frames with: its histograms, counters, the
/// state all threads share, and its decompressor.
struct FrameCtx<'a> {
    hists: &'a mut Hists,
    c: &'a mut Counters,
    shared: &'a Shared,
    inflater: &'a mut Inflater,
}

/// Handles one frame for connection `conn`, read at `at`.
#[inline]
fn on_frame(conn: &mut Conn, h: &FrameHead, payload: &[u8], at: Arrival, x: &mut FrameCtx<'_>) {
    let FrameCtx {
        hists,
        c,
        shared,
        inflater,
    } = x;
    c.frames += 1;
    if h.masked {
        c.masked += 1;
        return;
    }
    match h.opcode {
        1 | 2 if h.fin && h.compressed => {
            c.compressed += 1;
            match inflater.inflate(payload, ws::READ_BUF_BYTES) {
                Ok(message) => on_message(conn, message, at, hists, c, shared),
                Err(_) => c.inflate_failed += 1,
            }
        }
        1 | 2 if h.fin => on_message(conn, payload, at, hists, c, shared),
        0..=2 => c.fragmented += 1,
        8 => {
            c.close_frames += 1;
            conn.closed = true;
        }
        9 => {
            c.pings += 1;
            let pong = ws::client_frame(10, payload, [0x5a, 0xa5, 0x3c, 0xc3]);
            let _ = sys::send(conn.fd, &pong);
        }
        10 => {}
        _ => c.unrecognized += 1,
    }
}

/// Counts how a read ended; whether the connection is done for (`closed`:
/// the server sent a close frame).
fn ends_connection(end: ReadEnd, closed: bool, counters: &mut Counters) -> bool {
    match end {
        ReadEnd::Drained => closed,
        ReadEnd::Eof => {
            counters.eofs += 1;
            true
        }
        ReadEnd::Error(e) => {
            if e.kind() == std::io::ErrorKind::ConnectionReset {
                counters.resets += 1;
            } else {
                counters.read_errors += 1;
            }
            true
        }
        ReadEnd::Oversized => {
            counters.oversized += 1;
            true
        }
        ReadEnd::Malformed(why) => {
            counters.malformed += 1;
            counters.malformed_why.get_or_insert(why);
            true
        }
    }
}

struct Worker {
    index: usize,
    conns: Vec<Conn>,
    ep: Epoll,
    dialer: Dialer,
    shared: Arc<Shared>,
    hists: Hists,
    /// WebSocket frames or an SSE stream on every connection.
    transport: Transport,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, for the kernel's timestamps.
    clock_offset_ns: i64,
    counters: Counters,
    scratch: Vec<u8>,
    /// Decompresses what came compressed (one buffer for the thread).
    inflater: Inflater,
    opened: u64,
    closed: u64,
    connect_end: Option<Instant>,
}

impl Worker {
    fn new(
        index: usize,
        base: u64,
        count: u32,
        channels: u64,
        cfg: DialConfig,
        shared: Arc<Shared>,
    ) -> Result<Worker, String> {
        let conns = (0..count)
            .map(|local| Conn {
                fd: -1,
                channel: ((base + local as u64) % channels) as u32,
                tally: SeqTally::default(),
                probed: false,
                closed: false,
                opened: false,
                carry: Vec::new(),
                sse: SseState::new(false),
            })
            .collect();
        Ok(Worker {
            index,
            conns,
            transport: cfg.transport,
            ep: Epoll::new().map_err(|e| format!("epoll_create1: {e}"))?,
            dialer: Dialer::new(cfg, base, 0x5eed ^ index as u64),
            shared,
            hists: Hists {
                read: new_histogram(),
                socket: new_histogram(),
            },
            clock_offset_ns: realtime_minus_monotonic_ns(),
            counters: Counters::default(),
            scratch: vec![0u8; ws::READ_BUF_BYTES],
            inflater: Inflater::default(),
            opened: 0,
            closed: 0,
            connect_end: None,
        })
    }

    fn on_outcome(&mut self, o: Outcome) {
        match o {
            Outcome::Opened(o) => {
                let conn = &mut self.conns[o.local as usize];
                conn.fd = o.fd;
                if sys::enable_receive_timestamps(o.fd).is_err() {
                    self.counters.unstamped_sockets += 1;
                }
                conn.opened = true;
                self.counters.deflate_agreed += u64::from(o.deflate);
                self.opened += 1;
                self.shared.open.fetch_add(1, Relaxed);
                self.connect_end = Some(Instant::now());
                conn.sse = SseState::new(o.chunked);
                if !o.extra.is_empty() {
                    // Frames (or SSE bytes) that came with the response head.
                    let at = Arrival {
                        read_ns: monotonic_ns(),
                        socket_ns: None,
                    };
                    let (hists, counters, shared) =
                        (&mut self.hists, &mut self.counters, &*self.shared);
                    if self.transport == Transport::Sse {
                        let mut state = conn.sse;
                        let mut carry = std::mem::take(&mut conn.carry);
                        let end = sse::feed_events(
                            &mut state,
                            &mut carry,
                            &mut self.scratch,
                            &o.extra,
                            |item| on_sse_item(conn, item, at, hists, counters, shared),
                        );
                        conn.sse = state;
                        conn.carry = carry;
                        if ends_connection(end, conn.closed, counters) {
                            self.drop_connection(o.local as usize);
                        }
                    } else {
                        let mut x = FrameCtx {
                            hists,
                            c: counters,
                            shared,
                            inflater: &mut self.inflater,
                        };
                        let used =
                            ws::split_frames(&o.extra, |h, p| on_frame(conn, h, p, at, &mut x));
                        conn.carry.extend_from_slice(&o.extra[used..]);
                    }
                }
            }
            Outcome::GaveUp => {
                self.shared.gave_up.fetch_add(1, Relaxed);
            }
        }
    }

    /// Reads connection `local`, reported readable by an epoll_wait that
    /// returned at `ready_ns`.
    fn on_readable(&mut self, local: usize, ready_ns: u64) {
        let conn = &mut self.conns[local];
        if conn.fd < 0 {
            return;
        }
        let fd = conn.fd;
        let (hists, counters, shared) = (&mut self.hists, &mut self.counters, &*self.shared);
        let offset = self.clock_offset_ns;
        let at = std::cell::Cell::new(Arrival {
            read_ns: 0,
            socket_ns: None,
        });
        let mut first = true;
        let mut reads = 0u64;
        let mut bytes = 0u64;
        let mut carry = std::mem::take(&mut conn.carry);
        let read = |buf: &mut [u8]| {
            let r = sys::recv_stamped(fd, buf);
            if let Ok((n, stamp)) = r {
                reads += 1;
                bytes += n as u64;
                // What the first read gets was in the socket when
                // epoll_wait returned; a further read (after a full
                // buffer) takes the clock again.
                at.set(Arrival {
                    read_ns: if first { ready_ns } else { monotonic_ns() },
                    socket_ns: stamp.map(|real| (real as i64 - offset).max(0) as u64),
                });
                first = false;
            }
            r.map(|(n, _)| n)
        };
        let end = if self.transport == Transport::Sse {
            // A copy: the closure below holds `conn`.
            let mut state = conn.sse;
            let end = sse::read_events(&mut state, &mut carry, &mut self.scratch, read, |item| {
                on_sse_item(conn, item, at.get(), hists, counters, shared)
            });
            conn.sse = state;
            end
        } else {
            let mut x = FrameCtx {
                hists,
                c: counters,
                shared,
                inflater: &mut self.inflater,
            };
            ws::read_frames(&mut carry, &mut self.scratch, read, |h, p| {
                on_frame(conn, h, p, at.get(), &mut x)
            })
        };
        conn.carry = carry;
        counters.reads += reads;
        counters.bytes += bytes;
        if ends_connection(end, conn.closed, counters) {
            self.drop_connection(local);
        }
        self.shared.delivered[self.index]
            .0
            .store(self.counters.measured, Relaxed);
    }

    /// Closes connection `local` (the server closed it, or what it sent
    /// cannot be read on).
    fn drop_connection(&mut self, local: usize) {
        let conn = &mut self.conns[local];
        conn.closed = true;
        conn.carry = Vec::new();
        sys::close_abortive(conn.fd);
        conn.fd = -1;
        self.closed += 1;
        self.shared.closed.fetch_add(1, Relaxed);
    }

    /// Connects this thread's share, then reads until told to stop.
    fn run(&mut self, connect_deadline: Instant) -> WorkerResult {
        let start = Instant::now();
        for local in 0..self.conns.len() as u32 {
            self.dialer.schedule(local, start);
        }
        let mut events: Vec<libc::epoll_event> = Vec::with_capacity(1024);
        let mut outcomes = Vec::new();
        let mut connecting = true;
        loop {
            if self.shared.stop.load(Relaxed) {
                break;
            }
            let now = Instant::now();
            if connecting {
                self.dialer.step(&self.ep, now, &mut outcomes);
                if now >= connect_deadline {
                    self.dialer
                        .abandon("unfinished at --connect-timeout-s", &mut outcomes);
                }
                for o in outcomes.drain(..) {
                    self.on_outcome(o);
                }
                if self.dialer.is_idle() {
                    connecting = false;
                    let mut per_channel = self.shared.open_per_channel.lock().expect("lock");
                    for c in self.conns.iter().filter(|c| c.opened) {
                        per_channel[c.channel as usize] += 1;
                    }
                    drop(per_channel);
                    self.shared.connected_threads.fetch_add(1, Relaxed);
                }
            }
            let wait = if connecting {
                self.dialer.wait_ms(now, 50)
            } else {
                50
            };
            if let Err(e) = self.ep.wait(&mut events, wait) {
                eprintln!("bench: epoll_wait: {e}");
                break;
            }
            let ready_ns = monotonic_ns();
            for ev in events.iter() {
                let (token, flags) = (ev.u64, ev.events);
                if connecting && self.dialer.owns(token) {
                    self.dialer
                        .on_event(&self.ep, token, flags, Instant::now(), &mut outcomes);
                    for o in outcomes.drain(..) {
                        self.on_outcome(o);
                    }
                } else {
                    self.on_readable(token as usize, ready_ns);
                }
            }
        }
        if connecting {
            self.dialer.abandon("stopped", &mut outcomes);
            for o in outcomes.drain(..) {
                self.on_outcome(o);
            }
        }
        WorkerResult {
            hist: std::mem::replace(&mut self.hists.read, new_histogram()),
            socket_hist: std::mem::replace(&mut self.hists.socket, new_histogram()),
            tallies: self
                .conns
                .iter()
                .filter(|c| c.opened)
                .map(|c| (c.channel, c.tally))
                .collect(),
            counters: self.counters,
            failures: std::mem::take(&mut self.dialer.failures),
            opened: self.opened,
            closed: self.closed,
            connect_end: self.connect_end,
        }
        // The sockets stay open (in `self`) until the main thread has
        // measured the server: see `run_one`.
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        for c in self.conns.iter_mut() {
            if c.fd >= 0 {
                sys::close_abortive(c.fd);
                c.fd = -1;
            }
        }
    }
}

/// The figures of one fan-out run against one server.
#[derive(Debug, Clone)]
pub struct FanoutReport {
    pub kind: ServerKind,
    pub transport: Transport,
    pub process: &'static str,
    pub pid: u32,
    pub target: String,
    pub cores: Option<u32>,
    pub requested: u64,
    pub open: u64,
    pub failures: Vec<(String, u64, String)>,
    pub channels: u64,
    pub threads: u32,
    pub rate: f64,
    pub duration_s: f64,
    pub payload_bytes: u64,
    pub payload_kind: PayloadKind,
    /// The subscribers offered permessage-deflate.
    pub deflate: bool,
    pub connect_s: f64,
    /// From the first probe until every open connection had one (or the
    /// timeout), and how many never got one.
    pub subscribe_s: f64,
    pub probe_rounds: u64,
    pub unprobed: u64,
    pub published: u64,
    /// The publish window, first to last publication.
    pub publish_s: f64,
    /// Measured deliveries received within the publish window.
    pub delivered_in_window: u64,
    /// From the end of publishing until everything expected had arrived (or
    /// --drain-s ran out).
    pub drain_s: f64,
    pub loss: ws::LossSummary,
    pub counters: Counters,
    pub closed_by_server: u64,
    pub latency: Latency,
    /// Publish→socket: by the kernel's receive timestamps.
    pub socket_latency: Latency,
    pub rss_before: u64,
    pub rss_subscribed: u64,
    pub rss_after: u64,
    pub health: Health,
    /// CPU seconds used during the publish window by the server and by
    /// this bench (all its threads, the publisher included).
    pub server_cpu_s: Option<f64>,
    pub client_cpu_s: f64,
    /// How the messages were published (ZeroMQ, or HTTP POSTs for nchan
    /// and Bun), and the POSTs that failed, by reason.
    pub publisher: String,
    pub publish_failures: Vec<(String, u64, String)>,
}

impl FanoutReport {
    pub fn failed(&self) -> u64 {
        self.failures.iter().map(|(_, n, _)| n).sum()
    }

    pub fn deliveries_per_s(&self) -> Option<f64> {
        crate::report::rate(self.delivered_in_window, self.publish_s)
    }

    pub fn publish_rate(&self) -> Option<f64> {
        crate::report::rate(self.published, self.publish_s)
    }

    /// CPU use over the publish window in % of one core.
    pub fn server_cpu_pct(&self) -> Option<f64> {
        self.server_cpu_s
            .and_then(|c| (self.publish_s > 0.0).then(|| 100.0 * c / self.publish_s))
    }

    pub fn client_cpu_pct(&self) -> Option<f64> {
        (self.publish_s > 0.0).then(|| 100.0 * self.client_cpu_s / self.publish_s)
    }

    pub fn errors(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.open < self.requested {
            e.push(format!(
                "{} of {} subscribers not open",
                self.requested - self.open,
                self.requested
            ));
        }
        for (reason, n, example) in &self.failures {
            e.push(format!("{n} × {reason} (e.g. {example})"));
        }
        if self.unprobed > 0 {
            e.push(format!(
                "{} subscribers never received a probe within --subscribe-timeout-s",
                self.unprobed
            ));
        }
        let l = &self.loss;
        e.extend(l.errors("connections"));
        if l.beyond_published > 0 {
            e.push(format!(
                "{} sequence numbers past what was published",
                l.beyond_published
            ));
        }
        let c = &self.counters;
        let (unrecognized, oversized) = match self.transport {
            Transport::Sse => (
                "events not recognised as fan-out payloads",
                "events too large for the read buffer",
            ),
            _ => (
                "frames not recognised as fan-out payloads",
                "frames too large for the read buffer",
            ),
        };
        for (n, what) in [
            (
                c.misrouted,
                "deliveries for another channel than subscribed",
            ),
            (c.unrecognized, unrecognized),
            (c.masked, "masked frames from the server"),
            (c.fragmented, "fragmented frames"),
            (c.close_frames, "close frames from the server"),
            (c.oversized, oversized),
            (
                c.inflate_failed,
                "compressed frames that did not decompress",
            ),
        ] {
            if n > 0 {
                e.push(format!("{n} {what}"));
            }
        }
        if c.malformed > 0 {
            e.push(format!(
                "{} SSE streams with broken chunked coding (e.g. {})",
                c.malformed,
                c.malformed_why.unwrap_or("?")
            ));
        }
        if self.closed_by_server > 0 {
            e.push(format!(
                "{} connections closed by the server during the run ({} EOF, {} reset, {} other read errors, {} after a close frame)",
                self.closed_by_server, c.eofs, c.resets, c.read_errors, c.close_frames
            ));
        }
        e.extend(self.health.error(self.open, "after subscribing"));
        for (reason, n, example) in &self.publish_failures {
            e.push(format!(
                "{n} publications failed: {reason} (e.g. {example})"
            ));
        }
        e
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let server = server_line(self.kind, self.pid, &self.target, self.cores);
        let _ = writeln!(t, "fanout {}: {server}", self.transport.name());
        let row = |t: &mut String, k: &str, v: String| {
            let _ = writeln!(t, "  {k:<28} {v}");
        };
        row(
            &mut t,
            "subscribers",
            format!(
                "{} of {} open ({} failed), {} channel(s), {} client thread(s)",
                thousands(self.open),
                thousands(self.requested),
                self.failed(),
                self.channels,
                self.threads
            ),
        );
        row(&mut t, "connect time", format!("{:.3} s", self.connect_s));
        row(
            &mut t,
            "subscription check",
            format!(
                "{:.3} s, {} probe round(s), {} without a probe",
                self.subscribe_s, self.probe_rounds, self.unprobed
            ),
        );
        row(
            &mut t,
            "published",
            format!(
                "{} messages in {:.3} s ({} msg/s, asked {}), {} B payloads ({})",
                thousands(self.published),
                self.publish_s,
                opt(self.publish_rate(), 1),
                self.rate,
                self.payload_bytes,
                self.payload_kind.name()
            ),
        );
        row(&mut t, "published by", self.publisher.clone());
        row(&mut t, "deliveries expected", thousands(self.loss.expected));
        row(
            &mut t,
            "deliveries received",
            format!(
                "{} ({} within the publish window, rest in {:.3} s of drain)",
                thousands(self.loss.received),
                thousands(self.delivered_in_window),
                self.drain_s
            ),
        );
        row(&mut t, "deliveries/s", opt(self.deliveries_per_s(), 0));
        row(
            &mut t,
            "missing",
            format!(
                "{} ({} in gaps, {} at the end) on {} connections",
                self.loss.missing,
                self.loss.missing_in_gaps,
                self.loss.missing_at_end,
                self.loss.connections_with_loss
            ),
        );
        row(
            &mut t,
            "out of order / duplicates",
            format!("{} / {}", self.loss.out_of_order, self.loss.duplicates),
        );
        for (name, l) in [
            ("latency µs p50/p99/p99.9/max", &self.latency),
            ("  at the socket (kernel stamp)", &self.socket_latency),
        ] {
            row(
                &mut t,
                name,
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
        }
        row(
            &mut t,
            "CPU, % of one core",
            format!(
                "server {} %, bench {} % ({} client thread(s) + publisher)",
                opt(self.server_cpu_pct(), 0),
                opt(self.client_cpu_pct(), 0),
                self.threads
            ),
        );
        row(&mut t, "server RSS before", bytes(self.rss_before));
        row(&mut t, "server RSS subscribed", bytes(self.rss_subscribed));
        row(&mut t, "server RSS after", bytes(self.rss_after));
        let c = &self.counters;
        row(
            &mut t,
            "client reads",
            match self.transport {
                Transport::Sse => format!(
                    "{} recv, {} events, {} (probes {}, comments {})",
                    thousands(c.reads),
                    thousands(c.frames),
                    bytes(c.bytes),
                    thousands(c.probes),
                    c.comments
                ),
                _ => format!(
                    "{} recv, {} frames, {} (probes {}, pings {})",
                    thousands(c.reads),
                    thousands(c.frames),
                    bytes(c.bytes),
                    thousands(c.probes),
                    c.pings
                ),
            },
        );
        if self.deflate {
            row(
                &mut t,
                "permessage-deflate",
                format!(
                    "agreed on {} of {} open, {} of {} frames compressed, {} B read per frame",
                    thousands(c.deflate_agreed),
                    thousands(self.open),
                    thousands(c.compressed),
                    thousands(c.frames),
                    opt(self.bytes_per_frame(), 1)
                ),
            );
        } else if self.transport == Transport::Ws {
            row(
                &mut t,
                "bytes read per frame",
                opt(self.bytes_per_frame(), 1),
            );
        }
        for e in self.errors() {
            let _ = writeln!(t, "  ERROR: {e}");
        }
        t
    }

    /// What the client read per frame (SSE: per event), on average: the
    /// bandwidth a delivery costs, headers and compression included.
    pub fn bytes_per_frame(&self) -> Option<f64> {
        let c = &self.counters;
        (c.frames > 0).then(|| c.bytes as f64 / c.frames as f64)
    }

    pub fn json(&self) -> Value {
        let errors = self.errors();
        let l = &self.loss;
        let c = &self.counters;
        json!({
            "scenario": "fanout",
            "transport": self.transport.name(),
            "server": self.kind.name(),
            "process": self.process,
            "pid": self.pid,
            "cores": self.cores,
            "connections": self.requested,
            "connections_open": self.open,
            "connections_failed": self.failed(),
            "channels": self.channels,
            "threads": self.threads,
            "rate": self.rate,
            "duration_s": self.duration_s,
            "payload_bytes": self.payload_bytes,
            "payload_kind": self.payload_kind.name(),
            "deflate_offered": self.deflate,
            "deflate_agreed": c.deflate_agreed,
            "compressed_frames": c.compressed,
            "bytes_per_frame": self.bytes_per_frame().map(|b| (b * 10.0).round() / 10.0),
            "connect_s": round3(self.connect_s),
            "subscribe_s": round3(self.subscribe_s),
            "probe_rounds": self.probe_rounds,
            "published": self.published,
            "publish_s": round3(self.publish_s),
            "publish_rate": self.publish_rate().map(|r| (r * 10.0).round() / 10.0),
            "deliveries_expected": l.expected,
            "deliveries_received": l.received,
            "deliveries_in_window": self.delivered_in_window,
            "deliveries_per_s": self.deliveries_per_s().map(|r| r.round()),
            "drain_s": round3(self.drain_s),
            "missing": l.missing,
            "missing_in_gaps": l.missing_in_gaps,
            "missing_at_end": l.missing_at_end,
            "connections_with_loss": l.connections_with_loss,
            "out_of_order": l.out_of_order,
            "connections_reordered": l.connections_reordered,
            "duplicates": l.duplicates,
            "misrouted": c.misrouted,
            "unrecognized_frames": c.unrecognized,
            "closed_by_server": self.closed_by_server,
            "latency_us": self.latency.json(),
            "socket_latency_us": self.socket_latency.json(),
            "rss_before_bytes": self.rss_before,
            "rss_subscribed_bytes": self.rss_subscribed,
            "rss_after_bytes": self.rss_after,
            "server_cpu_pct": self.server_cpu_pct().map(|p| p.round()),
            "client_cpu_pct": self.client_cpu_pct().map(|p| p.round()),
            "publisher": self.publisher,
            "publish_failures": failures_json(&self.publish_failures),
            "client_reads": c.reads,
            // SSE: events, and comment lines (heartbeats).
            "client_frames": c.frames,
            "client_comments": c.comments,
            "failures": failures_json(&self.failures),
            "ok": errors.is_empty(),
            "errors": errors,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The first connection index of thread `t` of `threads` over `n`
/// connections (contiguous blocks, sizes differing by at most one).
pub fn block_start(n: u64, threads: u64, t: u64) -> u64 {
    (n as u128 * t as u128 / threads as u128) as u64
}

/// Publications still due at `elapsed` into the window, at `rate`/s, of
/// `total`: message k is due at k / rate.
pub fn due_by(elapsed: Duration, rate: f64, total: u64) -> u64 {
    ((elapsed.as_secs_f64() * rate).floor() as u64 + 1).min(total)
}

/// Runs fanout against one server.
pub fn run_one(
    args: &FanoutArgs,
    kind: ServerKind,
    server: &Server,
) -> Result<FanoutReport, String> {
    sys::check_nofile_for(args.connections)?;
    let mut target = Target::start(kind, server)?;
    let name = kind.name();
    // ZeroMQ, or POST /pub for nchan and Bun.
    let mut publisher = Publisher::connect(kind, target.zmq.as_deref(), target.listen)?;
    let listen = target.listen;
    sys::check_sources(&args.client.sources, listen)?;
    let healthz_before = http::healthz(listen, HEALTHZ_TIMEOUT)
        .ok()
        .map(|c| c.iter().sum::<u64>());
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = target.rss_bytes()?;

    let threads = args.client.threads as u64;
    let channels = args.channels;
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        open: AtomicU64::new(0),
        gave_up: AtomicU64::new(0),
        connected_threads: AtomicU64::new(0),
        probed: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        delivered: (0..threads).map(|_| Padded::default()).collect(),
        open_per_channel: Mutex::new(vec![0; channels as usize]),
    });
    let in_flight = (args.client.in_flight / threads).max(1) as usize;
    let connect_start = Instant::now();
    let connect_deadline = connect_start + Duration::from_secs_f64(args.client.connect_timeout_s);
    let (result_tx, result_rx) = mpsc::channel::<WorkerResult>();
    let mut close_txs = Vec::new();
    let mut handles = Vec::new();
    for t in 0..threads {
        let base = block_start(args.connections, threads, t);
        let count = (block_start(args.connections, threads, t + 1) - base) as u32;
        let cfg = DialConfig {
            target: listen,
            sources: args.client.sources.clone(),
            transport: args.transport,
            channel_prefix: "fanout-".into(),
            channels,
            in_flight,
            handshake_timeout: Duration::from_secs_f64(args.client.handshake_timeout_s),
            max_attempts: args.max_attempts,
            backoff: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            keep_in_epoll: true,
            subprotocol: None,
            tls: None,
            deflate: args.deflate,
        };
        let worker = Worker::new(t as usize, base, count, channels, cfg, shared.clone())?;
        let tx = result_tx.clone();
        let (close_tx, close_rx) = mpsc::channel::<()>();
        close_txs.push(close_tx);
        handles.push(
            std::thread::Builder::new()
                .name(format!("fanout-client-{t}"))
                .spawn(move || {
                    let mut worker = worker;
                    let result = worker.run(connect_deadline);
                    let _ = tx.send(result);
                    // Keep the sockets open until the server is measured.
                    let _ = close_rx.recv();
                    drop(worker);
                })
                .map_err(|e| format!("spawn client thread: {e}"))?,
        );
    }
    drop(result_tx);
    let stop_all = |shared: &Shared| shared.stop.store(true, Relaxed);

    // Connect.
    let mut last = Instant::now();
    let mut open_at_last = 0;
    while shared.connected_threads.load(Relaxed) < threads {
        std::thread::sleep(Duration::from_millis(20));
        if let Err(e) = target.alive() {
            stop_all(&shared);
            return Err(e);
        }
        let now = Instant::now();
        if now.duration_since(last) >= Duration::from_secs(1) {
            let open = shared.open.load(Relaxed);
            eprintln!(
                "bench: fanout {name}: {open}/{} open, {} failed, {:.0}/s now",
                args.connections,
                shared.gave_up.load(Relaxed),
                (open - open_at_last) as f64 / now.duration_since(last).as_secs_f64()
            );
            last = now;
            open_at_last = open;
        }
        if now > connect_deadline + Duration::from_secs(10) {
            stop_all(&shared);
            return Err("client threads did not finish connecting".into());
        }
    }
    let connect_s = connect_start.elapsed().as_secs_f64();
    let open = shared.open.load(Relaxed);
    eprintln!(
        "bench: fanout {name}: {open} of {} open in {connect_s:.3} s; checking subscriptions",
        args.connections
    );
    let open_per_channel = shared.open_per_channel.lock().expect("lock").clone();

    // Subscription check: probes to every channel until each open
    // connection has one.
    let channel_names: Vec<Vec<u8>> = (0..channels)
        .map(|c| format!("fanout-{c}").into_bytes())
        .collect();
    let probe_interval =
        PROBE_INTERVAL.max(Duration::from_secs_f64(channels as f64 / PROBES_PER_S_MAX));
    let subscribe_start = Instant::now();
    let subscribe_deadline = subscribe_start + Duration::from_secs_f64(args.subscribe_timeout_s);
    let mut payload = Vec::with_capacity(args.payload_bytes as usize);
    let payload_bytes = args.payload_bytes as usize;
    let encode = |out: &mut Vec<u8>, tail: &Tail| match args.payload_kind {
        PayloadKind::Filler => ws::encode_payload(out, payload_bytes, tail),
        PayloadKind::Json => ws::encode_json_payload(out, payload_bytes, tail),
    };
    let mut probe_rounds = 0u64;
    let mut last = Instant::now();
    loop {
        let probed = shared.probed.load(Relaxed);
        if probed >= open || Instant::now() >= subscribe_deadline {
            break;
        }
        for (c, ch) in channel_names.iter().enumerate() {
            if open_per_channel[c] == 0 {
                continue;
            }
            let tail = Tail {
                kind: KIND_PROBE,
                channel: c as u32,
                seq: probe_rounds as u32,
                sent_ns: monotonic_ns(),
            };
            encode(&mut payload, &tail);
            publisher.publish(ch, &payload)?;
        }
        probe_rounds += 1;
        let round_end = Instant::now() + probe_interval;
        while Instant::now() < round_end && shared.probed.load(Relaxed) < open {
            std::thread::sleep(Duration::from_millis(5));
        }
        if last.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "bench: fanout {name}: {}/{open} subscribers have a probe after {probe_rounds} round(s)",
                shared.probed.load(Relaxed)
            );
            last = Instant::now();
        }
        if let Err(e) = target.alive() {
            stop_all(&shared);
            return Err(e);
        }
    }
    let subscribe_s = subscribe_start.elapsed().as_secs_f64();
    let unprobed = open.saturating_sub(shared.probed.load(Relaxed));
    let health = match healthz_before {
        Some(baseline) => Health::checked(baseline, http::healthz(listen, HEALTHZ_TIMEOUT)),
        None => Health::Unavailable("no /healthz before the run".into()),
    };
    // Let the last probes drain before measuring.
    std::thread::sleep(Duration::from_millis(200));
    let rss_subscribed = target.rss_bytes()?;
    eprintln!(
        "bench: fanout {name}: subscribed in {subscribe_s:.3} s ({unprobed} without a probe); \
         publishing {} msg/s for {} s",
        args.rate, args.duration_s
    );

    // Publish.
    let total = (args.rate * args.duration_s).round() as u64;
    let mut sent_per_channel = vec![0u32; channels as usize];
    let delivered_start = shared.delivered();
    let server_cpu_start = target.cpu_seconds().ok();
    let client_cpu_start = procfs::self_cpu_seconds();
    let publish_start = Instant::now();
    let mut k = 0u64;
    let mut last = publish_start;
    let mut delivered_at_last = delivered_start;
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
            encode(&mut payload, &tail);
            publisher.publish(&channel_names[c], &payload)?;
            sent_per_channel[c] += 1;
            k += 1;
        }
        if now.duration_since(last) >= Duration::from_secs(1) {
            let d = shared.delivered();
            eprintln!(
                "bench: fanout {name}: {:.1} s, {k}/{total} published, {} deliveries ({:.0}/s now), {} closed",
                now.duration_since(publish_start).as_secs_f64(),
                d - delivered_start,
                (d - delivered_at_last) as f64 / now.duration_since(last).as_secs_f64(),
                shared.closed.load(Relaxed)
            );
            last = now;
            delivered_at_last = d;
            if let Err(e) = target.alive() {
                stop_all(&shared);
                return Err(e);
            }
        }
        if k < total {
            // Sleep until message k is due (at least a little).
            let next_due = publish_start + Duration::from_secs_f64(k as f64 / args.rate);
            let wait = next_due.saturating_duration_since(Instant::now());
            if wait > Duration::from_micros(50) {
                std::thread::sleep(wait.min(Duration::from_millis(100)));
            }
        }
    }
    // The publish window is the schedule's: `total / rate` from the first
    // publication (the last one gets its 1/rate like every other).
    let window_end = publish_start + Duration::from_secs_f64(total as f64 / args.rate);
    std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
    let publish_end = Instant::now();
    let publish_s = publish_end.duration_since(publish_start).as_secs_f64();
    let client_cpu_s = procfs::self_cpu_seconds() - client_cpu_start;
    let server_cpu_s = match (server_cpu_start, target.cpu_seconds().ok()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let delivered_in_window = shared.delivered() - delivered_start;

    // Drain: until every open connection has everything its channel got.
    let expected: u64 = sent_per_channel
        .iter()
        .zip(&open_per_channel)
        .map(|(&s, &n)| s as u64 * n)
        .sum();
    let drain_deadline = publish_end + Duration::from_secs_f64(args.drain_s);
    let mut last = Instant::now();
    while shared.delivered() - delivered_start < expected && Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_millis(2));
        if last.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "bench: fanout {name}: draining, {}/{expected} deliveries",
                shared.delivered() - delivered_start
            );
            last = Instant::now();
        }
    }
    let drain_s = publish_end.elapsed().as_secs_f64();
    stop_all(&shared);

    let mut hist = new_histogram();
    let mut socket_hist = new_histogram();
    let mut tallies: Vec<(u32, SeqTally)> = Vec::with_capacity(open as usize);
    let mut counters = Counters::default();
    let mut failures: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut closed = 0;
    let mut opened = 0;
    let mut connect_end: Option<Instant> = None;
    for _ in 0..threads {
        let r = result_rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| "a client thread did not report".to_string())?;
        merge_histograms(&mut hist, &r.hist);
        merge_histograms(&mut socket_hist, &r.socket_hist);
        tallies.extend(r.tallies);
        counters.add(&r.counters);
        for (k, (n, ex)) in r.failures {
            failures.entry(k).or_insert((0, ex)).0 += n;
        }
        closed += r.closed;
        opened += r.opened;
        connect_end = connect_end.max(r.connect_end);
    }
    target.alive()?;
    let rss_after = target.rss_bytes()?;
    for tx in &close_txs {
        let _ = tx.send(());
    }
    for h in handles {
        let _ = h.join();
    }
    let loss = ws::summarize(tallies.iter().map(|(c, t)| (*c, t)), &sent_per_channel);
    let report = FanoutReport {
        kind,
        transport: args.transport,
        process: target.how(),
        pid: target.pid,
        target: listen.to_string(),
        cores: target.cores,
        requested: args.connections,
        open: opened,
        failures: failures.into_iter().map(|(k, (n, e))| (k, n, e)).collect(),
        channels,
        threads: args.client.threads,
        rate: args.rate,
        duration_s: args.duration_s,
        payload_bytes: args.payload_bytes,
        payload_kind: args.payload_kind,
        deflate: args.deflate,
        connect_s: connect_end
            .map(|e| e.duration_since(connect_start).as_secs_f64())
            .unwrap_or(connect_s),
        subscribe_s,
        probe_rounds,
        unprobed,
        published: k,
        publish_s,
        delivered_in_window,
        drain_s,
        loss,
        counters,
        closed_by_server: closed,
        latency: Latency::from_ns(&hist),
        socket_latency: Latency::from_ns(&socket_hist),
        rss_before,
        rss_subscribed,
        rss_after,
        health,
        server_cpu_s,
        client_cpu_s,
        publisher: publisher.describe(),
        publish_failures: publisher.failures(),
    };
    target.stop();
    Ok(report)
}

/// Adds one thread's histogram into the total (same bounds: never fails).
pub fn merge_histograms(total: &mut Histogram<u64>, part: &Histogram<u64>) {
    total.add(part).expect("histograms with the same bounds");
}

/// The figures `--server both` compares.
pub const COMPARED: &[(&str, &str)] = &[
    ("deliveries/s", "deliveries_per_s"),
    ("deliveries received", "deliveries_received"),
    ("missing", "missing"),
    ("out of order", "out_of_order"),
    ("latency p50 (µs)", "latency_us.p50"),
    ("latency p99 (µs)", "latency_us.p99"),
    ("latency p99.9 (µs)", "latency_us.p999"),
    ("latency max (µs)", "latency_us.max"),
    ("socket latency p50 (µs)", "socket_latency_us.p50"),
    ("socket latency p99 (µs)", "socket_latency_us.p99"),
    ("server CPU (% of a core)", "server_cpu_pct"),
    ("bench CPU (% of a core)", "client_cpu_pct"),
    ("bytes read per frame", "bytes_per_frame"),
    ("server RSS subscribed (B)", "rss_subscribed_bytes"),
    ("server RSS after (B)", "rss_after_bytes"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_merge_across_threads() {
        // Three "threads" record disjoint ranges; the merge has every sample.
        let mut parts = Vec::new();
        for t in 0..3u64 {
            let mut h = new_histogram();
            for v in 1..=1000u64 {
                h.record(t * 1_000_000 + v * 1000).unwrap();
            }
            parts.push(h);
        }
        let mut total = new_histogram();
        for p in &parts {
            merge_histograms(&mut total, p);
        }
        assert_eq!(total.len(), 3000);
        assert_eq!(total.min(), parts[0].min());
        assert!(total.equivalent(total.max(), parts[2].max()));
        // The median is in the middle thread's range, p99 in the last.
        let p50 = total.value_at_quantile(0.5);
        assert!((1_000_000..2_001_000).contains(&p50), "{p50}");
        let p99 = total.value_at_quantile(0.99);
        assert!(p99 >= 2_000_000, "{p99}");
        let lat = Latency::from_ns(&total);
        assert_eq!(lat.count, 3000);
        assert!(
            (lat.max_us.unwrap() - 3000.0).abs() < 5.0,
            "{:?}",
            lat.max_us
        );
        // Merging an empty histogram changes nothing.
        merge_histograms(&mut total, &new_histogram());
        assert_eq!(total.len(), 3000);
    }

    #[test]
    fn blocks_cover_every_connection_once() {
        for (n, threads) in [(10_000u64, 1u64), (10_000, 3), (7, 8), (1_000_000, 16)] {
            let mut covered = 0;
            for t in 0..threads {
                let (a, b) = (block_start(n, threads, t), block_start(n, threads, t + 1));
                assert!(b >= a);
                assert!(b - a <= n / threads + 1);
                covered += b - a;
            }
            assert_eq!(block_start(n, threads, 0), 0);
            assert_eq!(block_start(n, threads, threads), n);
            assert_eq!(covered, n);
        }
    }

    #[test]
    fn publication_schedule() {
        // 100/s: message 0 is due at once, message 10 at 100 ms.
        assert_eq!(due_by(Duration::ZERO, 100.0, 1000), 1);
        assert_eq!(due_by(Duration::from_millis(99), 100.0, 1000), 10);
        assert_eq!(due_by(Duration::from_millis(100), 100.0, 1000), 11);
        assert_eq!(due_by(Duration::from_secs(100), 100.0, 1000), 1000);
        assert_eq!(due_by(Duration::from_millis(1), 1e9, 5), 5);
    }
}
