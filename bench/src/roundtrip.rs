//! The round-trip scenario: two-way traffic through the server. N
//! WebSocket clients connect with the `gateway.v1` subprotocol (client i on
//! `rt.{i}`), are welcomed with their address, and send messages
//! (`{"channel":"rt.{i}","ref":"…"}\n<payload>`) that the server hands to
//! its upstream PUSH socket (`--upstream-bind tcp://127.0.0.1:*`, the port
//! it picked read from its READY line) and acknowledges; the bench's hub
//! (see `hub`) publishes each one back to its sender (`[b"!" + address,
//! payload]` into the server's SUB), and the server delivers it to that one
//! connection. Each payload ends like a
//! fan-out payload: kind, the client's index, a per-phase sequence number
//! and the client's CLOCK_MONOTONIC send time, so the client that gets it
//! back knows its round-trip time and which message it was; the `ref` is
//! that same tail, so an acknowledgement says the same.
//!
//! Before anything is measured, every client sends probes until one comes
//! back (the hub's publisher also waits for the server's subscription):
//! the path works for each client, ZeroMQ's slow joiner is past, and no
//! sleep stands in for either. Then two phases, each a warm-up at its load
//! then a measured window:
//!
//! 1. latency: every client sends --rate-per-connection messages a second
//!    on a fixed schedule (open loop, the clients spread evenly over the
//!    interval) for --duration-s; round-trip and ack latency of the
//!    messages sent in the window, and sent / received / lost over the
//!    whole phase, where lost is what is not back --grace-s after the last
//!    send (the run never waits longer).
//! 2. saturation: --saturate-connections clients, spread over all, each
//!    keep --window messages on their way, sending the next as soon as a
//!    reply frees a place, for --saturate-s: the messages/s the hub
//!    receives and the round trips/s the clients get back, the server's CPU
//!    seconds over the window, and the hub's, so it shows when the hub and
//!    not the server was the limit. A slow server or hub lowers the rate;
//!    nothing piles up beyond the windows.
//!
//! Client threads each own a contiguous block of the clients and one
//! level-triggered epoll set, as in fanout; the main thread gives them
//! commands through a channel and an eventfd in that set. Replies are
//! accounted exactly: one bit per message sent, so loss, duplicates and
//! replies to messages never sent are counted, not estimated. The arrival
//! of what a socket's first read returns is when the epoll_wait that
//! reported it returned (see fanout).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::cli::{RoundtripArgs, Server, ServerKind, Transport};
use crate::fanout::{block_start, merge_histograms, new_histogram};
use crate::handshake::{DialConfig, Dialer, Outcome};
use crate::http;
use crate::hub::{is_address, Hub, HubSummary, ADDRESS_BYTES};
use crate::procfs;
use crate::report::{bytes, failures_json, rate, server_line, Health, Latency};
use crate::sys::{self, Epoll, EventFd};
use crate::target::Target;
use crate::util::{monotonic_ns, opt, thousands, Rng};
use crate::ws::{self, FrameHead, ReadEnd, Tail, TAIL_LEN};

/// The gateway's two-way subprotocol.
pub const SUBPROTOCOL: &str = "gateway.v1";
/// A probe (the path check; not measured).
pub const KIND_PROBE: u8 = b'p';
/// A message of the latency phase.
pub const KIND_LATENCY: u8 = b'l';
/// A message of the saturation phase.
pub const KIND_SATURATE: u8 = b's';
/// Send limits the spawned gateway gets unless `--gateway-arg` sets them:
/// high enough that its per-connection token buckets never refuse what a
/// saturating client sends (the gateway's maximum messages/s).
const GATEWAY_SEND_LIMITS: [(&str, &str); 2] = [
    ("--send-messages-per-s", "1000000"),
    ("--send-bytes-per-s", "1000000000"),
];
/// A client sends at most this many messages a phase (the saturation
/// phase is otherwise bounded by time only).
const MESSAGES_PER_CLIENT_MAX: u32 = 1 << 24;
/// A client without its probe back sends another this often.
const PROBE_INTERVAL_NS: u64 = 250_000_000;
/// Phases start this long after the main thread says so, so that every
/// client thread has the command by then.
const START_DELAY_NS: u64 = 100_000_000;
/// A scheduled send this far behind its time counts as late (the client
/// did not keep up with the offered rate).
const LATE_SEND_NS: u64 = 5_000_000;
/// The epoll token of the command eventfd (connections use their index).
const CMD_TOKEN: u64 = u64::MAX;
const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than their own deadlines the client threads get to
/// report before the run is declared stuck.
const REPORT_SLACK: Duration = Duration::from_secs(15);

/// Whether client `global` of `n` is one of the `s` that saturate: `s`
/// of them spread evenly (the last of each block of n/s), exactly `s`
/// when s ≤ n.
pub fn is_saturating(global: u64, s: u64, n: u64) -> bool {
    let (g, s, n) = (global as u128, s.min(n) as u128, n as u128);
    n > 0 && (g + 1) * s / n > g * s / n
}

/// The meta line and payload of one client message:
/// `{"channel":"rt.{global}","ref":"<tail>"}\n<payload>` (no ref: no ack).
pub fn message_content(out: &mut Vec<u8>, global: u64, payload: &[u8], with_ref: bool) {
    out.clear();
    let _ = write!(out, "{{\"channel\":\"rt.{global}\"");
    if with_ref {
        // The tail is plain hex after a letter: a JSON string as it is.
        out.extend_from_slice(b",\"ref\":\"");
        out.extend_from_slice(&payload[payload.len().saturating_sub(TAIL_LEN)..]);
        out.push(b'"');
    }
    out.extend_from_slice(b"}\n");
    out.extend_from_slice(payload);
}

/// What one data frame from the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `{"type":"welcome","address":"…"}`: the address (`None`: not 52
    /// lowercase hex digits).
    Welcome(Option<[u8; ADDRESS_BYTES]>),
    /// `{"type":"ack","ref":"…"}`: the tail the ref holds (`None`: not one
    /// of the bench's refs).
    Ack(Option<Tail>),
    /// `{"type":"error",…}`: the reason, and the tail of the ref if any.
    Error { reason: String, tail: Option<Tail> },
    /// `{"channel":"!ADDRESS"}\n<payload>`: a message for one connection,
    /// with the address it names (`None`: not an address) and the tail of
    /// its payload.
    Reply {
        address: Option<[u8; ADDRESS_BYTES]>,
        tail: Option<Tail>,
    },
    /// Anything else (a channel publication: the bench publishes none).
    Other,
}

fn address_of(text: &[u8]) -> Option<[u8; ADDRESS_BYTES]> {
    if is_address(text) {
        text.try_into().ok()
    } else {
        None
    }
}

/// A ref's tail: the bench's refs are the 33 characters of a payload tail.
fn ref_tail(text: &[u8]) -> Option<Tail> {
    (text.len() == TAIL_LEN)
        .then(|| ws::read_tail(text))
        .flatten()
}

/// Reads a data frame's content: a meta line, `\n`, a payload. The shapes
/// both servers write are recognised by their bytes (the per-message path:
/// replies and acks); anything else is parsed as JSON, whatever its field
/// order.
pub fn classify(content: &[u8]) -> Incoming {
    let (meta, payload) = match content.iter().position(|&b| b == b'\n') {
        Some(i) => (&content[..i], &content[i + 1..]),
        None => (content, &[][..]),
    };
    if let Some(address) = meta
        .strip_prefix(b"{\"channel\":\"!")
        .and_then(|rest| rest.strip_suffix(b"\"}"))
    {
        return Incoming::Reply {
            address: address_of(address),
            tail: ws::read_tail(payload),
        };
    }
    if let Some(reference) = meta
        .strip_prefix(b"{\"type\":\"ack\",\"ref\":\"")
        .and_then(|rest| rest.strip_suffix(b"\"}"))
    {
        return Incoming::Ack(ref_tail(reference));
    }
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(meta) else {
        return Incoming::Other;
    };
    let str_field = |name: &str| fields.get(name).and_then(Value::as_str);
    let ref_field = || str_field("ref").and_then(|r| ref_tail(r.as_bytes()));
    match str_field("type") {
        Some("welcome") => {
            Incoming::Welcome(str_field("address").and_then(|a| address_of(a.as_bytes())))
        }
        Some("ack") => Incoming::Ack(ref_field()),
        Some("error") => Incoming::Error {
            reason: str_field("reason").unwrap_or("(no reason)").to_string(),
            tail: ref_field(),
        },
        Some(_) => Incoming::Other,
        None => match str_field("channel") {
            Some(channel) if channel.starts_with('!') => Incoming::Reply {
                address: address_of(&channel.as_bytes()[1..]),
                tail: ws::read_tail(payload),
            },
            _ => Incoming::Other,
        },
    }
}

/// Which of the messages a client sent in a phase came back (or were
/// acknowledged), exactly: one bit per message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    bits: Vec<u64>,
    /// Distinct messages marked.
    pub distinct: u32,
    /// Marked again.
    pub duplicates: u32,
    /// Marked after one with a higher number.
    pub out_of_order: u32,
    /// One past the highest number marked.
    next: u32,
}

impl Seen {
    /// Marks message `seq`; whether it is the first time.
    pub fn mark(&mut self, seq: u32) -> bool {
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & bit != 0 {
            self.duplicates += 1;
            return false;
        }
        self.bits[word] |= bit;
        self.distinct += 1;
        if seq < self.next {
            self.out_of_order += 1;
        } else {
            self.next = seq + 1;
        }
        true
    }

    /// Forgets everything (a new phase), keeping the memory.
    pub fn clear(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = 0);
        self.distinct = 0;
        self.duplicates = 0;
        self.out_of_order = 0;
        self.next = 0;
    }
}

/// One client's messages in the current phase, numbered 0, 1, … as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flight {
    pub sent: u32,
    pub replies: Seen,
    pub acks: Seen,
    /// Replies and acks naming a number never sent in this phase.
    pub unknown: u32,
    /// Messages the server refused (an error frame with their ref).
    pub refused: u32,
}

/// What [`Flight::reply`] and [`Flight::ack`] made of a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    First,
    Duplicate,
    /// Never sent in this phase.
    Unknown,
}

impl Flight {
    /// Sent and neither back nor refused: what the window counts.
    pub fn in_flight(&self) -> u32 {
        self.sent
            .saturating_sub(self.replies.distinct)
            .saturating_sub(self.refused)
    }

    /// Sent and not back (refused ones included): lost, once the phase is over.
    pub fn lost(&self) -> u32 {
        self.sent.saturating_sub(self.replies.distinct)
    }

    fn mark(seen: &mut Seen, unknown: &mut u32, sent: u32, seq: u32) -> Mark {
        if seq >= sent {
            *unknown += 1;
            Mark::Unknown
        } else if seen.mark(seq) {
            Mark::First
        } else {
            Mark::Duplicate
        }
    }

    pub fn reply(&mut self, seq: u32) -> Mark {
        Flight::mark(&mut self.replies, &mut self.unknown, self.sent, seq)
    }

    pub fn ack(&mut self, seq: u32) -> Mark {
        Flight::mark(&mut self.acks, &mut self.unknown, self.sent, seq)
    }

    /// Starts a new phase.
    pub fn clear(&mut self) {
        self.sent = 0;
        self.replies.clear();
        self.acks.clear();
        self.unknown = 0;
        self.refused = 0;
    }
}

/// Sent / back / lost over the clients of a phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub clients: u64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub clients_with_loss: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub unknown: u64,
    pub refused: u64,
    pub acks: u64,
    pub acks_missing: u64,
    pub ack_duplicates: u64,
}

impl Tally {
    pub fn add_flight(&mut self, f: &Flight) {
        self.clients += 1;
        self.sent += f.sent as u64;
        self.received += f.replies.distinct as u64;
        self.lost += f.lost() as u64;
        self.clients_with_loss += (f.lost() > 0) as u64;
        self.duplicates += f.replies.duplicates as u64;
        self.out_of_order += f.replies.out_of_order as u64;
        self.unknown += f.unknown as u64;
        self.refused += f.refused as u64;
        self.acks += f.acks.distinct as u64;
        // A refused message is answered by its error, not an ack.
        self.acks_missing += f.sent.saturating_sub(f.acks.distinct + f.refused) as u64;
        self.ack_duplicates += f.acks.duplicates as u64;
    }

    pub fn add(&mut self, o: &Tally) {
        self.clients += o.clients;
        self.sent += o.sent;
        self.received += o.received;
        self.lost += o.lost;
        self.clients_with_loss += o.clients_with_loss;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.unknown += o.unknown;
        self.refused += o.refused;
        self.acks += o.acks;
        self.acks_missing += o.acks_missing;
        self.ack_duplicates += o.ack_duplicates;
    }
}

/// Where a spawned server binds its upstream socket: a port it picks and
/// says on its READY line (`upstream=`), so that no two runs race for one.
const UPSTREAM_BIND: &str = "tcp://127.0.0.1:*";

/// The arguments the spawned server gets for two-way traffic: its upstream
/// endpoint and, for the gateway, send limits that do not cap saturation
/// (unless `--gateway-arg` sets them; those come after, as given).
pub fn two_way_server(kind: ServerKind, server: &Server, upstream: &str) -> Server {
    let Server::Spawn {
        bin,
        cores,
        extra_args,
        stderr,
        ready_timeout,
    } = server
    else {
        return server.clone();
    };
    let mut args = vec!["--upstream-bind".to_string(), upstream.to_string()];
    if kind == ServerKind::Gateway {
        for (flag, value) in GATEWAY_SEND_LIMITS {
            let given = extra_args
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
            if !given {
                args.push(flag.to_string());
                args.push(value.to_string());
            }
        }
    }
    args.extend(extra_args.iter().cloned());
    Server::Spawn {
        bin: bin.clone(),
        cores: *cores,
        extra_args: args,
        stderr: stderr.clone(),
        ready_timeout: *ready_timeout,
    }
}

/// A number shared between one client thread and the main thread, on its
/// own cache line.
#[repr(align(64))]
#[derive(Default)]
struct Padded(AtomicU64);

/// What the client threads and the main thread share while running.
#[derive(Default)]
struct Shared {
    open: AtomicU64,
    gave_up: AtomicU64,
    welcomed: AtomicU64,
    probed: AtomicU64,
    closed: AtomicU64,
    /// First replies to phase messages, per client thread, cumulative.
    replies: Vec<Padded>,
}

impl Shared {
    fn replies(&self) -> u64 {
        self.replies.iter().map(|r| r.0.load(Relaxed)).sum()
    }
}

/// A phase, as the main thread orders it (monotonic ns).
#[derive(Debug, Clone, Copy)]
struct RunSpec {
    kind: u8,
    start_ns: u64,
    measure_ns: u64,
    end_ns: u64,
    grace_ns: u64,
    /// Latency: ns between one client's messages. Saturation: 0.
    period_ns: f64,
    /// Saturation: messages on their way per client, and which clients.
    window: u32,
    saturating: u64,
}

#[derive(Debug, Clone, Copy)]
enum Cmd {
    Probe { deadline_ns: u64 },
    Run(RunSpec),
    Finish,
}

struct Connected {
    opened: u64,
    failures: BTreeMap<String, (u64, String)>,
    connect_end: Option<Instant>,
}

struct Probed {
    welcomed: u64,
    probed: u64,
    probes_sent: u64,
}

/// One client thread's share of a phase.
struct PhaseResult {
    rtt: Histogram<u64>,
    ack: Histogram<u64>,
    tally: Tally,
    replies_in_window: u64,
    late_sends: u64,
    max_lag_ns: u64,
}

struct Finished {
    counters: Counters,
    server_errors: BTreeMap<String, (u64, String)>,
    unrecognized_example: Option<String>,
    closed: u64,
}

enum Reply {
    Connected(Connected),
    Probed(Probed),
    Ran(Box<PhaseResult>),
    Finished(Box<Finished>),
}

/// Per-thread counts of what arrived, besides the phases' replies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub frames: u64,
    pub reads: u64,
    pub bytes: u64,
    pub welcomes: u64,
    /// A second welcome on a connection.
    pub extra_welcomes: u64,
    /// Connections whose first frame was not the welcome.
    pub welcome_not_first: u64,
    /// Welcomes whose address is not 52 lowercase hex digits.
    pub bad_welcomes: u64,
    /// Replies (and acks) for another connection than the one they came on.
    pub misrouted: u64,
    /// Replies without a bench payload, acks without a bench ref.
    pub unreadable: u64,
    /// Data frames that are neither a welcome, an ack, an error nor a reply.
    pub unrecognized: u64,
    pub masked: u64,
    pub fragmented: u64,
    pub pings: u64,
    pub close_frames: u64,
    pub oversized: u64,
    pub eofs: u64,
    pub resets: u64,
    pub read_errors: u64,
    pub send_errors: u64,
    pub probe_replies: u64,
    pub probe_acks: u64,
    /// Replies and acks of a phase that had ended (counted lost there).
    pub late_replies: u64,
    pub late_acks: u64,
    pub error_frames: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.frames += o.frames;
        self.reads += o.reads;
        self.bytes += o.bytes;
        self.welcomes += o.welcomes;
        self.extra_welcomes += o.extra_welcomes;
        self.welcome_not_first += o.welcome_not_first;
        self.bad_welcomes += o.bad_welcomes;
        self.misrouted += o.misrouted;
        self.unreadable += o.unreadable;
        self.unrecognized += o.unrecognized;
        self.masked += o.masked;
        self.fragmented += o.fragmented;
        self.pings += o.pings;
        self.close_frames += o.close_frames;
        self.oversized += o.oversized;
        self.eofs += o.eofs;
        self.resets += o.resets;
        self.read_errors += o.read_errors;
        self.send_errors += o.send_errors;
        self.probe_replies += o.probe_replies;
        self.probe_acks += o.probe_acks;
        self.late_replies += o.late_replies;
        self.late_acks += o.late_acks;
        self.error_frames += o.error_frames;
    }
}

/// One client, as its client thread keeps it.
struct Conn {
    /// -1: not open (yet, any more, or never).
    fd: RawFd,
    global: u64,
    closed: bool,
    /// A data frame came (the first must be the welcome).
    greeted: bool,
    address: Option<[u8; ADDRESS_BYTES]>,
    probed: bool,
    probes_sent: u32,
    /// Takes part in the current phase.
    in_run: bool,
    flight: Flight,
    /// An unfinished frame from the previous read.
    carry: Vec<u8>,
    /// Frames the socket has not taken yet (from `out_off`).
    out: Vec<u8>,
    out_off: usize,
    /// EPOLLOUT is asked for (`out` is waiting).
    want_write: bool,
}

/// Builds the frames clients send.
struct Encoder {
    payload_bytes: usize,
    refs: bool,
    payload: Vec<u8>,
    content: Vec<u8>,
    rng: Rng,
}

impl Encoder {
    /// Appends to `conn.out` message `seq` of `kind`, stamped now.
    fn message(&mut self, conn: &mut Conn, kind: u8, seq: u32) {
        let tail = Tail {
            kind,
            channel: conn.global as u32,
            seq,
            sent_ns: monotonic_ns(),
        };
        ws::encode_payload(&mut self.payload, self.payload_bytes, &tail);
        message_content(&mut self.content, conn.global, &self.payload, self.refs);
        let mask = (self.rng.next_u64() as u32).to_ne_bytes();
        ws::append_client_frame(&mut conn.out, 1, &self.content, mask);
    }
}

/// The current phase of a client thread.
struct Run {
    spec: RunSpec,
    started: bool,
    sending_done: bool,
    /// Latency: (due ns, client) of each client's next message.
    schedule: BinaryHeap<Reverse<(u64, u32)>>,
    /// Messages sent and not yet back (nor refused), over the clients;
    /// acks not yet come.
    outstanding: i64,
    outstanding_acks: i64,
    rtt: Histogram<u64>,
    ack: Histogram<u64>,
    /// First replies so far (the progress line's count).
    replies: u64,
    replies_in_window: u64,
    late_sends: u64,
    max_lag_ns: u64,
}

impl Run {
    fn measured(&self, ns: u64) -> bool {
        (self.spec.measure_ns..self.spec.end_ns).contains(&ns)
    }
}

enum Phase {
    Idle,
    Probing {
        deadline_ns: u64,
        next_round_ns: u64,
    },
    Running(Box<Run>),
}

/// What frame handling needs besides the connection.
struct Ctx<'a> {
    counters: &'a mut Counters,
    server_errors: &'a mut BTreeMap<String, (u64, String)>,
    unrecognized_example: &'a mut Option<String>,
    run: Option<&'a mut Run>,
    shared: &'a Shared,
    refs: bool,
}

/// When a frame's read returned: the epoll_wait for the first read, the
/// clock for a further one; never before the send time it is compared with.
#[inline]
fn elapsed_since(at_ns: u64, sent_ns: u64) -> u64 {
    let at = if at_ns > sent_ns {
        at_ns
    } else {
        monotonic_ns()
    };
    at.saturating_sub(sent_ns).max(1)
}

fn handle_frame(ctx: &mut Ctx, conn: &mut Conn, h: &FrameHead, payload: &[u8], at_ns: u64) {
    ctx.counters.frames += 1;
    if h.masked {
        ctx.counters.masked += 1;
        return;
    }
    match h.opcode {
        1 | 2 if h.fin => handle_content(ctx, conn, payload, at_ns),
        0..=2 => ctx.counters.fragmented += 1,
        8 => {
            ctx.counters.close_frames += 1;
            conn.closed = true;
        }
        9 => {
            ctx.counters.pings += 1;
            let pong = ws::client_frame(10, payload, [0x5a, 0xa5, 0x3c, 0xc3]);
            conn.out.extend_from_slice(&pong);
        }
        10 => {}
        _ => ctx.counters.unrecognized += 1,
    }
}

fn handle_content(ctx: &mut Ctx, conn: &mut Conn, content: &[u8], at_ns: u64) {
    let first = !conn.greeted;
    conn.greeted = true;
    let incoming = classify(content);
    if first && !matches!(incoming, Incoming::Welcome(_)) {
        ctx.counters.welcome_not_first += 1;
    }
    match incoming {
        Incoming::Welcome(Some(address)) => {
            if conn.address.is_some() {
                ctx.counters.extra_welcomes += 1;
            } else {
                conn.address = Some(address);
                ctx.counters.welcomes += 1;
                ctx.shared.welcomed.fetch_add(1, Relaxed);
            }
        }
        Incoming::Welcome(None) => ctx.counters.bad_welcomes += 1,
        Incoming::Reply { address, tail } => {
            if address.is_none() || address != conn.address {
                ctx.counters.misrouted += 1;
                return;
            }
            match tail {
                Some(tail) if tail.channel as u64 == conn.global => {
                    on_reply(ctx, conn, tail, at_ns)
                }
                Some(_) => ctx.counters.misrouted += 1,
                None => ctx.counters.unreadable += 1,
            }
        }
        Incoming::Ack(tail) => match tail {
            Some(tail) if tail.channel as u64 == conn.global => on_ack(ctx, conn, tail, at_ns),
            Some(_) => ctx.counters.misrouted += 1,
            None => ctx.counters.unreadable += 1,
        },
        Incoming::Error { reason, tail } => {
            ctx.counters.error_frames += 1;
            let text = String::from_utf8_lossy(&content[..content.len().min(200)]).into_owned();
            ctx.server_errors.entry(reason).or_insert((0, text)).0 += 1;
            let Some(tail) = tail.filter(|t| t.channel as u64 == conn.global) else {
                return;
            };
            if let Some(run) = ctx.run.as_deref_mut() {
                if conn.in_run && tail.kind == run.spec.kind && tail.seq < conn.flight.sent {
                    // Never coming back, never acknowledged: stop waiting.
                    conn.flight.refused += 1;
                    run.outstanding -= 1;
                    if ctx.refs {
                        run.outstanding_acks -= 1;
                    }
                }
            }
        }
        Incoming::Other => {
            ctx.counters.unrecognized += 1;
            ctx.unrecognized_example.get_or_insert_with(|| {
                String::from_utf8_lossy(&content[..content.len().min(200)]).into_owned()
            });
        }
    }
}

fn on_reply(ctx: &mut Ctx, conn: &mut Conn, tail: Tail, at_ns: u64) {
    if tail.kind == KIND_PROBE {
        ctx.counters.probe_replies += 1;
        if !conn.probed {
            conn.probed = true;
            ctx.shared.probed.fetch_add(1, Relaxed);
        }
        return;
    }
    let Some(run) = ctx
        .run
        .as_deref_mut()
        .filter(|r| conn.in_run && r.spec.kind == tail.kind)
    else {
        ctx.counters.late_replies += 1;
        return;
    };
    if conn.flight.reply(tail.seq) != Mark::First {
        return;
    }
    run.replies += 1;
    run.outstanding -= 1;
    if run.measured(tail.sent_ns) {
        run.rtt
            .saturating_record(elapsed_since(at_ns, tail.sent_ns));
    }
    if run.measured(at_ns) {
        run.replies_in_window += 1;
    }
}

fn on_ack(ctx: &mut Ctx, conn: &mut Conn, tail: Tail, at_ns: u64) {
    if tail.kind == KIND_PROBE {
        ctx.counters.probe_acks += 1;
        return;
    }
    let Some(run) = ctx
        .run
        .as_deref_mut()
        .filter(|r| conn.in_run && r.spec.kind == tail.kind)
    else {
        ctx.counters.late_acks += 1;
        return;
    };
    if conn.flight.ack(tail.seq) != Mark::First {
        return;
    }
    run.outstanding_acks -= 1;
    if run.measured(tail.sent_ns) {
        run.ack
            .saturating_record(elapsed_since(at_ns, tail.sent_ns));
    }
}

/// Counts how a read ended; whether the connection is done for.
fn ends_connection(end: ReadEnd, closed: bool, c: &mut Counters) -> bool {
    match end {
        ReadEnd::Drained => closed,
        ReadEnd::Eof => {
            c.eofs += 1;
            true
        }
        ReadEnd::Error(e) => {
            if e.kind() == std::io::ErrorKind::ConnectionReset {
                c.resets += 1;
            } else {
                c.read_errors += 1;
            }
            true
        }
        ReadEnd::Oversized | ReadEnd::Malformed(_) => {
            c.oversized += 1;
            true
        }
    }
}

const READ_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;

/// Hands `conn.out` to the socket; asks for EPOLLOUT while some is left.
/// Returns false when the send failed (the connection is done for).
fn flush(ep: &Epoll, conn: &mut Conn, local: usize) -> bool {
    while conn.out_off < conn.out.len() {
        match sys::send(conn.fd, &conn.out[conn.out_off..]) {
            Ok(n) => conn.out_off += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !conn.want_write {
                    conn.want_write = true;
                    let events = READ_EVENTS | libc::EPOLLOUT as u32;
                    if ep.modify(conn.fd, events, local as u64).is_err() {
                        return false;
                    }
                }
                return true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    conn.out.clear();
    conn.out_off = 0;
    if conn.want_write {
        conn.want_write = false;
        if ep.modify(conn.fd, READ_EVENTS, local as u64).is_err() {
            return false;
        }
    }
    true
}

/// Sends saturation messages until the client has `window` on their way
/// (or the sending is over).
fn top_up(conn: &mut Conn, run: &mut Run, enc: &mut Encoder) {
    let now = monotonic_ns();
    if !conn.in_run || conn.fd < 0 || !run.started || now >= run.spec.end_ns {
        return;
    }
    while conn.flight.in_flight() < run.spec.window && conn.flight.sent < MESSAGES_PER_CLIENT_MAX {
        let seq = conn.flight.sent;
        enc.message(conn, run.spec.kind, seq);
        conn.flight.sent += 1;
        run.outstanding += 1;
        if enc.refs {
            run.outstanding_acks += 1;
        }
    }
}

struct Worker {
    index: usize,
    conns: Vec<Conn>,
    ep: Epoll,
    dialer: Dialer,
    connecting: bool,
    connect_deadline: Instant,
    shared: Arc<Shared>,
    cmds: mpsc::Receiver<Cmd>,
    wake: Arc<EventFd>,
    replies: mpsc::Sender<Reply>,
    enc: Encoder,
    /// Clients over all threads (the latency schedule spreads over them).
    connections: u64,
    phase: Phase,
    counters: Counters,
    server_errors: BTreeMap<String, (u64, String)>,
    unrecognized_example: Option<String>,
    scratch: Vec<u8>,
    opened: u64,
    closed: u64,
    connect_end: Option<Instant>,
    /// First replies of the phases before the current one.
    replies_before: u64,
    finished: bool,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    fn new(
        index: usize,
        base: u64,
        count: u64,
        args: &RoundtripArgs,
        cfg: DialConfig,
        connect_deadline: Instant,
        shared: Arc<Shared>,
        cmds: mpsc::Receiver<Cmd>,
        wake: Arc<EventFd>,
        replies: mpsc::Sender<Reply>,
    ) -> Result<Worker, String> {
        let conns = (0..count)
            .map(|local| Conn {
                fd: -1,
                global: base + local,
                closed: false,
                greeted: false,
                address: None,
                probed: false,
                probes_sent: 0,
                in_run: false,
                flight: Flight::default(),
                carry: Vec::new(),
                out: Vec::new(),
                out_off: 0,
                want_write: false,
            })
            .collect();
        Ok(Worker {
            index,
            conns,
            ep: Epoll::new().map_err(|e| format!("epoll_create1: {e}"))?,
            dialer: Dialer::new(cfg, base, 0x7007 ^ index as u64),
            connecting: true,
            connect_deadline,
            shared,
            cmds,
            wake,
            replies,
            enc: Encoder {
                payload_bytes: args.payload_bytes as usize,
                refs: !args.no_refs,
                payload: Vec::with_capacity(args.payload_bytes as usize),
                content: Vec::with_capacity(args.payload_bytes as usize + 128),
                rng: Rng::new(0x6d61_736b ^ index as u64),
            },
            connections: args.connections,
            phase: Phase::Idle,
            counters: Counters::default(),
            server_errors: BTreeMap::new(),
            unrecognized_example: None,
            scratch: vec![0u8; ws::READ_BUF_BYTES],
            opened: 0,
            closed: 0,
            connect_end: None,
            replies_before: 0,
            finished: false,
        })
    }

    fn ctx_parts(&mut self) -> (Ctx<'_>, &mut Vec<Conn>, &mut Vec<u8>, &Epoll, &mut Encoder) {
        let run = match &mut self.phase {
            Phase::Running(run) => Some(&mut **run),
            _ => None,
        };
        (
            Ctx {
                counters: &mut self.counters,
                server_errors: &mut self.server_errors,
                unrecognized_example: &mut self.unrecognized_example,
                run,
                shared: &self.shared,
                refs: self.enc.refs,
            },
            &mut self.conns,
            &mut self.scratch,
            &self.ep,
            &mut self.enc,
        )
    }

    fn on_outcome(&mut self, o: Outcome) {
        match o {
            Outcome::Opened(o) => {
                let local = o.local as usize;
                self.opened += 1;
                self.shared.open.fetch_add(1, Relaxed);
                self.connect_end = Some(Instant::now());
                let (mut ctx, conns, _, ep, _) = self.ctx_parts();
                let conn = &mut conns[local];
                conn.fd = o.fd;
                // The welcome, often, came with the response head.
                let at = monotonic_ns();
                let used =
                    ws::split_frames(&o.extra, |h, p| handle_frame(&mut ctx, conn, h, p, at));
                conn.carry.extend_from_slice(&o.extra[used..]);
                let ok = !conn.closed && flush(ep, conn, local);
                if !ok {
                    self.drop_connection(local);
                }
            }
            Outcome::GaveUp => {
                self.shared.gave_up.fetch_add(1, Relaxed);
            }
        }
    }

    /// Reads client `local`, reported readable by an epoll_wait that
    /// returned at `ready_ns`.
    fn on_readable(&mut self, local: usize, ready_ns: u64) {
        let (mut ctx, conns, scratch, ep, enc) = self.ctx_parts();
        let conn = &mut conns[local];
        if conn.fd < 0 {
            return;
        }
        let fd = conn.fd;
        let at = std::cell::Cell::new(ready_ns);
        let (mut reads, mut bytes, mut first) = (0u64, 0u64, true);
        let mut carry = std::mem::take(&mut conn.carry);
        let read = |buf: &mut [u8]| {
            let r = sys::recv(fd, buf, 0);
            if let Ok(n) = r {
                reads += 1;
                bytes += n as u64;
                // What the first read gets was in the socket when
                // epoll_wait returned; a further read takes the clock.
                if !first {
                    at.set(monotonic_ns());
                }
                first = false;
            }
            r
        };
        let end = ws::read_frames(&mut carry, scratch, read, |h, p| {
            handle_frame(&mut ctx, conn, h, p, at.get())
        });
        conn.carry = carry;
        ctx.counters.reads += reads;
        ctx.counters.bytes += bytes;
        let mut done = ends_connection(end, conn.closed, ctx.counters);
        if !done {
            if let Some(run) = ctx.run {
                if run.spec.window > 0 {
                    top_up(conn, run, enc);
                }
            }
            done = !flush(ep, conn, local);
        }
        if done {
            self.drop_connection(local);
        }
        if let Phase::Running(run) = &self.phase {
            self.shared.replies[self.index]
                .0
                .store(self.replies_before + run.replies, Relaxed);
        }
    }

    /// Closes client `local` (the server closed it, or it cannot be read
    /// or written on): what it has on its way will not come back.
    fn drop_connection(&mut self, local: usize) {
        let conn = &mut self.conns[local];
        if conn.fd < 0 {
            return;
        }
        conn.closed = true;
        conn.carry = Vec::new();
        conn.out = Vec::new();
        conn.out_off = 0;
        sys::close_abortive(conn.fd);
        conn.fd = -1;
        self.closed += 1;
        self.shared.closed.fetch_add(1, Relaxed);
        if let Phase::Running(run) = &mut self.phase {
            if conn.in_run {
                run.outstanding -= conn.flight.in_flight() as i64;
                if self.enc.refs {
                    let f = &conn.flight;
                    run.outstanding_acks -=
                        f.sent.saturating_sub(f.acks.distinct + f.refused) as i64;
                }
            }
        }
    }

    /// Sends what `local` has waiting; a failed send drops the client.
    fn flush_or_drop(&mut self, local: usize) {
        let conn = &mut self.conns[local];
        if conn.fd >= 0 && !flush(&self.ep, conn, local) {
            self.counters.send_errors += 1;
            self.drop_connection(local);
        }
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Probe { deadline_ns } => {
                self.phase = Phase::Probing {
                    deadline_ns,
                    next_round_ns: 0,
                };
            }
            Cmd::Run(spec) => {
                let mut run = Run {
                    spec,
                    started: false,
                    sending_done: false,
                    schedule: BinaryHeap::new(),
                    outstanding: 0,
                    outstanding_acks: 0,
                    rtt: new_histogram(),
                    ack: new_histogram(),
                    replies: 0,
                    replies_in_window: 0,
                    late_sends: 0,
                    max_lag_ns: 0,
                };
                for (local, conn) in self.conns.iter_mut().enumerate() {
                    conn.flight.clear();
                    conn.in_run = conn.fd >= 0
                        && conn.address.is_some()
                        && (spec.window == 0
                            || is_saturating(conn.global, spec.saturating, self.connections));
                    if conn.in_run && spec.window == 0 {
                        let first = due_ns(&spec, conn.global, self.connections, 0);
                        run.schedule.push(Reverse((first, local as u32)));
                    }
                }
                self.phase = Phase::Running(Box::new(run));
            }
            Cmd::Finish => self.finished = true,
        }
    }

    /// Probes every client that has no probe back yet, once a round; says
    /// so when all have one (or the deadline passed).
    fn on_time_probing(&mut self, now: u64) {
        let Phase::Probing {
            deadline_ns,
            next_round_ns,
        } = &mut self.phase
        else {
            return;
        };
        let waiting = self.conns.iter().any(|c| c.fd >= 0 && !c.probed);
        if !waiting || now >= *deadline_ns {
            self.phase = Phase::Idle;
            let _ = self.replies.send(Reply::Probed(Probed {
                welcomed: self.conns.iter().filter(|c| c.address.is_some()).count() as u64,
                probed: self.conns.iter().filter(|c| c.probed).count() as u64,
                probes_sent: self.conns.iter().map(|c| c.probes_sent as u64).sum(),
            }));
            return;
        }
        if now < *next_round_ns {
            return;
        }
        *next_round_ns = now + PROBE_INTERVAL_NS;
        for local in 0..self.conns.len() {
            let conn = &mut self.conns[local];
            // Without its welcome a client has no address to check replies
            // against: it is not probed (and counted).
            if conn.fd < 0 || conn.probed || conn.address.is_none() {
                continue;
            }
            let seq = conn.probes_sent;
            self.enc.message(conn, KIND_PROBE, seq);
            conn.probes_sent += 1;
            self.flush_or_drop(local);
        }
    }

    /// A phase's start, its scheduled sends, its end.
    fn on_time_running(&mut self, now: u64) {
        let Phase::Running(run) = &mut self.phase else {
            return;
        };
        if !run.started {
            if now < run.spec.start_ns {
                return;
            }
            run.started = true;
            if run.spec.window > 0 {
                for local in 0..self.conns.len() {
                    let Phase::Running(run) = &mut self.phase else {
                        return;
                    };
                    let conn = &mut self.conns[local];
                    if conn.in_run {
                        top_up(conn, run, &mut self.enc);
                        self.flush_or_drop(local);
                    }
                }
            }
        }
        // Latency: every message due by now, each client's next one queued.
        loop {
            let Phase::Running(run) = &mut self.phase else {
                return;
            };
            let Some(&Reverse((due, local))) = run.schedule.peek() else {
                break;
            };
            if due > now {
                break;
            }
            run.schedule.pop();
            let local = local as usize;
            let conn = &mut self.conns[local];
            if !conn.in_run || conn.fd < 0 {
                continue;
            }
            let lag = monotonic_ns().saturating_sub(due);
            run.max_lag_ns = run.max_lag_ns.max(lag);
            run.late_sends += (lag > LATE_SEND_NS) as u64;
            let seq = conn.flight.sent;
            self.enc.message(conn, run.spec.kind, seq);
            conn.flight.sent += 1;
            run.outstanding += 1;
            if self.enc.refs {
                run.outstanding_acks += 1;
            }
            let next = due_ns(&run.spec, conn.global, self.connections, conn.flight.sent);
            if next < run.spec.end_ns {
                run.schedule.push(Reverse((next, local as u32)));
            }
            self.flush_or_drop(local);
        }
        let Phase::Running(run) = &mut self.phase else {
            return;
        };
        if !run.sending_done
            && run.schedule.is_empty()
            && (run.spec.window == 0 || now >= run.spec.end_ns)
        {
            run.sending_done = true;
        }
        let all_back = run.outstanding <= 0 && run.outstanding_acks <= 0;
        if run.sending_done && (all_back || now >= run.spec.grace_ns) {
            self.end_run();
        }
    }

    /// Sums the phase up and reports it.
    fn end_run(&mut self) {
        let Phase::Running(run) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return;
        };
        let mut tally = Tally::default();
        for conn in self.conns.iter_mut().filter(|c| c.in_run) {
            tally.add_flight(&conn.flight);
            conn.in_run = false;
        }
        let run = *run;
        self.replies_before += run.replies;
        self.shared.replies[self.index]
            .0
            .store(self.replies_before, Relaxed);
        let _ = self.replies.send(Reply::Ran(Box::new(PhaseResult {
            rtt: run.rtt,
            ack: run.ack,
            tally,
            replies_in_window: run.replies_in_window,
            late_sends: run.late_sends,
            max_lag_ns: run.max_lag_ns,
        })));
    }

    /// How long epoll may sleep: until the next thing due (at most 100 ms,
    /// for the dialer's sake).
    fn wait_ms(&self, now: u64) -> i32 {
        let cap_ms = 100;
        let until = |t: u64| (t.saturating_sub(now).div_ceil(1_000_000) as i32).min(cap_ms);
        let mut ms = if self.connecting {
            self.dialer.wait_ms(Instant::now(), cap_ms)
        } else {
            cap_ms
        };
        match &self.phase {
            Phase::Idle => {}
            Phase::Probing {
                deadline_ns,
                next_round_ns,
            } => ms = ms.min(until(*next_round_ns)).min(until(*deadline_ns)),
            Phase::Running(run) => {
                let next = if !run.started {
                    run.spec.start_ns
                } else if let Some(Reverse((due, _))) = run.schedule.peek() {
                    *due
                } else if !run.sending_done {
                    run.spec.end_ns
                } else {
                    run.spec.grace_ns
                };
                ms = ms.min(until(next));
            }
        }
        ms
    }

    /// Connects this thread's share, then follows the main thread's
    /// commands until told to finish.
    fn serve(mut self) {
        let start = Instant::now();
        for local in 0..self.conns.len() as u32 {
            self.dialer.schedule(local, start);
        }
        if let Err(e) = self.ep.add(self.wake.fd(), libc::EPOLLIN as u32, CMD_TOKEN) {
            eprintln!("bench: epoll_ctl (eventfd): {e}");
            return;
        }
        let mut events: Vec<libc::epoll_event> = Vec::with_capacity(1024);
        let mut outcomes = Vec::new();
        while !self.finished {
            if self.connecting {
                let now = Instant::now();
                self.dialer.step(&self.ep, now, &mut outcomes);
                if now >= self.connect_deadline {
                    self.dialer
                        .abandon("unfinished at --connect-timeout-s", &mut outcomes);
                }
                for o in outcomes.drain(..) {
                    self.on_outcome(o);
                }
                if self.dialer.is_idle() {
                    self.connecting = false;
                    let _ = self.replies.send(Reply::Connected(Connected {
                        opened: self.opened,
                        failures: std::mem::take(&mut self.dialer.failures),
                        connect_end: self.connect_end,
                    }));
                }
            }
            let now = monotonic_ns();
            self.on_time_probing(now);
            self.on_time_running(now);
            let wait = self.wait_ms(monotonic_ns());
            if let Err(e) = self.ep.wait(&mut events, wait) {
                eprintln!("bench: epoll_wait: {e}");
                break;
            }
            let ready_ns = monotonic_ns();
            for ev in events.iter() {
                let (token, flags) = (ev.u64, ev.events);
                if token == CMD_TOKEN {
                    self.wake.drain();
                    while let Ok(cmd) = self.cmds.try_recv() {
                        self.on_cmd(cmd);
                    }
                } else if self.connecting && self.dialer.owns(token) {
                    self.dialer
                        .on_event(&self.ep, token, flags, Instant::now(), &mut outcomes);
                    for o in outcomes.drain(..) {
                        self.on_outcome(o);
                    }
                } else {
                    let local = token as usize;
                    if flags & libc::EPOLLOUT as u32 != 0 {
                        self.flush_or_drop(local);
                    }
                    if flags & !(libc::EPOLLOUT as u32) != 0 {
                        self.on_readable(local, ready_ns);
                    }
                }
            }
        }
        if self.connecting {
            self.dialer.abandon("stopped", &mut outcomes);
        }
        let _ = self.replies.send(Reply::Finished(Box::new(Finished {
            counters: self.counters,
            server_errors: std::mem::take(&mut self.server_errors),
            unrecognized_example: self.unrecognized_example.take(),
            closed: self.closed,
        })));
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

/// When message `k` of client `global` (of `n`) is due in a latency phase:
/// the client's offset (its share of one period, so the clients' sends
/// spread evenly) plus k periods.
fn due_ns(spec: &RunSpec, global: u64, n: u64, k: u32) -> u64 {
    let offset = spec.period_ns * global as f64 / n.max(1) as f64;
    spec.start_ns + (offset + spec.period_ns * k as f64) as u64
}

/// The client threads; dropping this tells them to finish and waits for
/// them (an early return must not leave them running).
struct Workers {
    cmd_txs: Vec<mpsc::Sender<Cmd>>,
    wakes: Vec<Arc<EventFd>>,
    handles: Vec<std::thread::JoinHandle<()>>,
    reply_rx: mpsc::Receiver<Reply>,
    shared: Arc<Shared>,
}

impl Workers {
    /// Gives every client thread `cmd` and wakes it.
    fn send(&self, cmd: Cmd) -> Result<(), String> {
        for (tx, wake) in self.cmd_txs.iter().zip(&self.wakes) {
            tx.send(cmd)
                .map_err(|_| "a client thread is gone".to_string())?;
            wake.notify();
        }
        Ok(())
    }

    /// One reply of each client thread, the kind `pick` takes, by
    /// `deadline`; `progress` runs about once a second meanwhile (and may
    /// end the wait with an error: the server died).
    fn collect<T>(
        &self,
        what: &str,
        deadline: Instant,
        mut pick: impl FnMut(Reply) -> Option<T>,
        mut progress: impl FnMut() -> Result<(), String>,
    ) -> Result<Vec<T>, String> {
        let mut got = Vec::with_capacity(self.cmd_txs.len());
        let mut next_progress = Instant::now() + Duration::from_secs(1);
        while got.len() < self.cmd_txs.len() {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("the client threads did not report {what} in time"));
            }
            let wait = deadline.min(next_progress).saturating_duration_since(now);
            match self.reply_rx.recv_timeout(wait) {
                Ok(r) => match pick(r) {
                    Some(t) => got.push(t),
                    None => return Err(format!("a client thread answered out of turn ({what})")),
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the client threads are gone".into())
                }
            }
            if Instant::now() >= next_progress {
                progress()?;
                next_progress = Instant::now() + Duration::from_secs(1);
            }
        }
        Ok(got)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let _ = self.send(Cmd::Finish);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Sleeps until `t_ns` (monotonic), running `progress` about once a
/// second: the phases' edges are times, not events.
fn wait_until(t_ns: u64, mut progress: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    loop {
        let now = monotonic_ns();
        if now >= t_ns {
            return Ok(());
        }
        std::thread::sleep(Duration::from_nanos((t_ns - now).min(1_000_000_000)));
        if monotonic_ns() < t_ns {
            progress()?;
        }
    }
}

/// One phase's figures (the latency phase or the saturation phase).
#[derive(Debug, Clone)]
pub struct PhaseReport {
    /// "latency" or "saturation".
    pub label: &'static str,
    pub clients: u64,
    /// Saturation: messages on their way per client (0: the latency phase).
    pub window: u32,
    /// Latency: messages per client per second.
    pub rate_per_connection: f64,
    pub warmup_s: f64,
    /// The measured window.
    pub measured_s: f64,
    /// From the phase's start until its last reply or the grace's end.
    pub elapsed_s: f64,
    pub tally: Tally,
    /// Messages sent in the measured window: round trip, and the ack.
    pub rtt: Latency,
    pub ack: Latency,
    /// Replies that arrived in the measured window.
    pub replies_in_window: u64,
    /// Messages the hub received in the measured window, and in each
    /// whole second of it.
    pub hub_in_window: u64,
    pub hub_by_second: Vec<u64>,
    /// CPU seconds over the measured window: the server, the hub threads,
    /// this whole process (hub included).
    pub server_cpu_s: Option<f64>,
    pub hub_cpu_s: Option<f64>,
    pub client_cpu_s: f64,
    /// Latency: scheduled sends more than 5 ms late, and the worst lag.
    pub late_sends: u64,
    pub max_lag_ns: u64,
}

impl PhaseReport {
    pub fn round_trips_per_s(&self) -> Option<f64> {
        rate(self.replies_in_window, self.measured_s)
    }

    pub fn hub_msgs_per_s(&self) -> Option<f64> {
        rate(self.hub_in_window, self.measured_s)
    }

    /// What the clients were asked to send a second (latency phase).
    pub fn offered_per_s(&self) -> Option<f64> {
        (self.window == 0).then_some(self.clients as f64 * self.rate_per_connection)
    }

    fn pct(&self, cpu_s: Option<f64>) -> Option<f64> {
        cpu_s.and_then(|c| (self.measured_s > 0.0).then(|| 100.0 * c / self.measured_s))
    }

    pub fn server_cpu_pct(&self) -> Option<f64> {
        self.pct(self.server_cpu_s)
    }

    pub fn hub_cpu_pct(&self) -> Option<f64> {
        self.pct(self.hub_cpu_s)
    }

    pub fn client_cpu_pct(&self) -> Option<f64> {
        self.pct(Some(self.client_cpu_s))
    }

    /// Server CPU per message the hub received, in µs.
    pub fn server_cpu_us_per_msg(&self) -> Option<f64> {
        self.server_cpu_s
            .and_then(|c| (self.hub_in_window > 0).then(|| c * 1e6 / self.hub_in_window as f64))
    }

    fn errors(&self, refs: bool, e: &mut Vec<String>) {
        let t = &self.tally;
        if t.lost > 0 {
            e.push(format!(
                "{}: {} of {} messages not back within --grace-s ({} clients; {} refused by the server)",
                self.label, t.lost, t.sent, t.clients_with_loss, t.refused
            ));
        }
        if t.duplicates > 0 {
            e.push(format!(
                "{}: {} duplicate replies",
                self.label, t.duplicates
            ));
        }
        if t.unknown > 0 {
            e.push(format!(
                "{}: {} replies or acks for messages never sent",
                self.label, t.unknown
            ));
        }
        if refs && t.acks_missing > 0 {
            e.push(format!(
                "{}: {} messages without an ack",
                self.label, t.acks_missing
            ));
        }
        if t.ack_duplicates > 0 {
            e.push(format!(
                "{}: {} duplicate acks",
                self.label, t.ack_duplicates
            ));
        }
    }

    fn table(&self, t: &mut String, refs: bool) {
        let row = |t: &mut String, k: &str, v: String| {
            let _ = writeln!(t, "    {k:<30} {v}");
        };
        let head = match self.offered_per_s() {
            Some(offered) => format!(
                "{} clients × {} msg/s = {} msg/s offered",
                thousands(self.clients),
                self.rate_per_connection,
                opt(Some(offered), 0)
            ),
            None => format!(
                "{} clients, window {} each",
                thousands(self.clients),
                self.window
            ),
        };
        let _ = writeln!(
            t,
            "  {:<32} {head}, {:.1} s warm-up + {:.1} s measured",
            format!("{} phase", self.label),
            self.warmup_s,
            self.measured_s
        );
        if self.window > 0 {
            let by_second = match (
                self.hub_by_second.iter().min(),
                self.hub_by_second.iter().max(),
            ) {
                (Some(lo), Some(hi)) => {
                    format!(" (whole seconds: {} to {})", thousands(*lo), thousands(*hi))
                }
                _ => String::new(),
            };
            row(
                t,
                "hub msgs/s",
                format!("{}{by_second}", opt(self.hub_msgs_per_s(), 0)),
            );
        }
        row(
            t,
            "round trips/s back",
            format!(
                "{} ({} replies in the window)",
                opt(self.round_trips_per_s(), 0),
                thousands(self.replies_in_window)
            ),
        );
        let tally = &self.tally;
        row(
            t,
            "sent / back / lost",
            format!(
                "{} / {} / {}   ({} clients with loss, {} duplicates, {} out of order, {} refused)",
                thousands(tally.sent),
                thousands(tally.received),
                thousands(tally.lost),
                tally.clients_with_loss,
                tally.duplicates,
                tally.out_of_order,
                tally.refused
            ),
        );
        let lat = |l: &Latency| {
            format!(
                "{} / {} / {} / {}   (mean {}, {} samples)",
                opt(l.p50_us, 0),
                opt(l.p99_us, 0),
                opt(l.p999_us, 0),
                opt(l.max_us, 0),
                opt(l.mean_us, 0),
                thousands(l.count)
            )
        };
        row(t, "round trip µs p50/p99/p999/max", lat(&self.rtt));
        if refs {
            row(t, "ack µs p50/p99/p999/max", lat(&self.ack));
            row(
                t,
                "acks",
                format!(
                    "{} ({} missing, {} duplicates)",
                    thousands(tally.acks),
                    tally.acks_missing,
                    tally.ack_duplicates
                ),
            );
        }
        row(
            t,
            "server CPU",
            format!(
                "{} s in {:.3} s ({} % of a core){}",
                opt(self.server_cpu_s, 3),
                self.measured_s,
                opt(self.server_cpu_pct(), 0),
                match self.server_cpu_us_per_msg() {
                    Some(us) => format!(", {us:.1} µs per message"),
                    None => String::new(),
                }
            ),
        );
        row(
            t,
            "hub / bench CPU, % of a core",
            format!(
                "{} % / {} % (the bench's figure includes the hub)",
                opt(self.hub_cpu_pct(), 0),
                opt(self.client_cpu_pct(), 0)
            ),
        );
        if self.window == 0 {
            row(
                t,
                "client schedule",
                format!(
                    "{} sends over 5 ms late, worst {:.1} ms",
                    self.late_sends,
                    self.max_lag_ns as f64 / 1e6
                ),
            );
        }
    }

    pub fn json(&self) -> Value {
        let t = &self.tally;
        let r1 = |x: Option<f64>| x.map(crate::report::round1);
        json!({
            "clients": self.clients,
            "window": (self.window > 0).then_some(self.window),
            "rate_per_connection": (self.window == 0).then_some(self.rate_per_connection),
            "offered_per_s": self.offered_per_s().map(f64::round),
            "warmup_s": self.warmup_s,
            "measured_s": self.measured_s,
            "elapsed_s": round3(self.elapsed_s),
            "sent": t.sent,
            "received": t.received,
            "lost": t.lost,
            "clients_with_loss": t.clients_with_loss,
            "duplicates": t.duplicates,
            "out_of_order": t.out_of_order,
            "unknown": t.unknown,
            "refused": t.refused,
            "acks_received": t.acks,
            "acks_missing": t.acks_missing,
            "ack_duplicates": t.ack_duplicates,
            "replies_in_window": self.replies_in_window,
            "round_trips_per_s": self.round_trips_per_s().map(f64::round),
            "hub_msgs_in_window": self.hub_in_window,
            "hub_msgs_per_s": self.hub_msgs_per_s().map(f64::round),
            "hub_msgs_by_second": self.hub_by_second,
            "rtt_us": self.rtt.json(),
            "ack_us": self.ack.json(),
            "server_cpu_s": self.server_cpu_s.map(round3),
            "server_cpu_pct": self.server_cpu_pct().map(f64::round),
            "server_cpu_us_per_msg": r1(self.server_cpu_us_per_msg()),
            "hub_cpu_s": self.hub_cpu_s.map(round3),
            "hub_cpu_pct": self.hub_cpu_pct().map(f64::round),
            "client_cpu_pct": self.client_cpu_pct().map(f64::round),
            "late_sends": (self.window == 0).then_some(self.late_sends),
            "send_lag_max_ms": (self.window == 0).then(|| round3(self.max_lag_ns as f64 / 1e6)),
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The figures of one roundtrip run against one server.
#[derive(Debug, Clone)]
pub struct RoundtripReport {
    pub kind: ServerKind,
    pub process: &'static str,
    pub pid: u32,
    pub target: String,
    pub cores: Option<u32>,
    /// The server's upstream endpoint, where the hub connected.
    pub upstream: String,
    pub requested: u64,
    pub open: u64,
    pub failures: Vec<(String, u64, String)>,
    pub threads: u32,
    pub hub_threads: u32,
    pub refs: bool,
    pub payload_bytes: u64,
    pub connect_s: f64,
    /// The path check: how long, who was welcomed, who had a probe back.
    pub probe_s: f64,
    pub welcomed: u64,
    pub probed: u64,
    pub probes_sent: u64,
    /// Hub threads whose publisher the server subscribed to.
    pub hubs_joined: u64,
    pub latency: PhaseReport,
    pub saturation: Option<PhaseReport>,
    pub counters: Counters,
    /// Error frames from the server: reason, count, first one.
    pub server_errors: Vec<(String, u64, String)>,
    pub unrecognized_example: Option<String>,
    pub closed_by_server: u64,
    pub health: Health,
    pub hub: HubSummary,
    pub rss_before: u64,
    pub rss_after: u64,
}

impl RoundtripReport {
    pub fn failed(&self) -> u64 {
        self.failures.iter().map(|(_, n, _)| n).sum()
    }

    fn phases(&self) -> impl Iterator<Item = &PhaseReport> {
        std::iter::once(&self.latency).chain(self.saturation.as_ref())
    }

    /// Everything that makes the figures suspect; empty means clean.
    pub fn errors(&self) -> Vec<String> {
        let mut e = Vec::new();
        if self.open < self.requested {
            e.push(format!(
                "{} of {} clients not open",
                self.requested - self.open,
                self.requested
            ));
        }
        for (reason, n, example) in &self.failures {
            e.push(format!("{n} × {reason} (e.g. {example})"));
        }
        if self.welcomed < self.open {
            e.push(format!(
                "{} open clients got no welcome with an address",
                self.open - self.welcomed
            ));
        }
        if self.probed < self.open {
            e.push(format!(
                "{} open clients never had a probe back within --probe-timeout-s",
                self.open - self.probed
            ));
        }
        if self.hubs_joined < self.hub_threads as u64 {
            e.push(format!(
                "{} of {} hub publishers never got the server's subscription",
                self.hub_threads as u64 - self.hubs_joined,
                self.hub_threads
            ));
        }
        for p in self.phases() {
            p.errors(self.refs, &mut e);
        }
        let c = &self.counters;
        for (n, what) in [
            (c.misrouted, "replies or acks for another client"),
            (
                c.unreadable,
                "replies without a bench payload, acks without a bench ref",
            ),
            (c.bad_welcomes, "welcomes without a 52-hex-digit address"),
            (c.extra_welcomes, "second welcomes"),
            (
                c.welcome_not_first,
                "clients whose first frame was not the welcome",
            ),
            (c.masked, "masked frames from the server"),
            (c.fragmented, "fragmented frames"),
            (c.close_frames, "close frames from the server"),
            (c.oversized, "frames too large for the read buffer"),
            (c.send_errors, "failed sends"),
        ] {
            if n > 0 {
                e.push(format!("{n} {what}"));
            }
        }
        if c.unrecognized > 0 {
            e.push(format!(
                "{} frames not recognised (e.g. {:?})",
                c.unrecognized,
                self.unrecognized_example.as_deref().unwrap_or("?")
            ));
        }
        for (reason, n, example) in &self.server_errors {
            e.push(format!("{n} × server error {reason:?} (e.g. {example:?})"));
        }
        if self.closed_by_server > 0 {
            e.push(format!(
                "{} clients closed during the run ({} EOF, {} reset, {} other read errors, {} after a close frame)",
                self.closed_by_server, c.eofs, c.resets, c.read_errors, c.close_frames
            ));
        }
        e.extend(self.health.error(self.open, "after connecting"));
        for (rule, n, example) in &self.hub.problems {
            e.push(format!("hub: {n} × {rule} (e.g. {example})"));
        }
        e.extend(self.hub.failed.iter().cloned());
        e
    }

    /// What is worth knowing to read the figures, not wrong in itself.
    pub fn notes(&self) -> Vec<String> {
        let mut n = Vec::new();
        if let Some(s) = &self.saturation {
            let per_thread = s.hub_cpu_pct().map(|p| p / self.hub_threads as f64);
            if per_thread.is_some_and(|p| p >= 90.0) {
                n.push(format!(
                    "the hub used {} % of a core per thread in the saturation phase: the hub, \
                     not the server, may be the limit (--hub-threads)",
                    opt(per_thread, 0)
                ));
            }
        }
        if self.latency.late_sends > 0 {
            n.push(format!(
                "{} latency-phase sends were over 5 ms behind the schedule (the clients did \
                 not keep up: more --threads, or fewer --connections)",
                self.latency.late_sends
            ));
        }
        let late = self.counters.late_replies + self.counters.late_acks;
        if late > 0 {
            n.push(format!(
                "{late} replies or acks came after their phase's grace (counted lost there)"
            ));
        }
        n
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let server = server_line(self.kind, self.pid, &self.target, self.cores);
        let _ = writeln!(t, "roundtrip ws: {server}");
        let row = |t: &mut String, k: &str, v: String| {
            let _ = writeln!(t, "  {k:<32} {v}");
        };
        row(
            &mut t,
            "clients",
            format!(
                "{} of {} open ({} failed), {} client thread(s), {} hub thread(s)",
                thousands(self.open),
                thousands(self.requested),
                self.failed(),
                self.threads,
                self.hub_threads
            ),
        );
        row(&mut t, "connect time", format!("{:.3} s", self.connect_s));
        row(
            &mut t,
            "path check",
            format!(
                "{:.3} s: {} welcomed, {} with a probe back ({} probes), {} of {} hub publishers joined",
                self.probe_s,
                thousands(self.welcomed),
                thousands(self.probed),
                thousands(self.probes_sent),
                self.hubs_joined,
                self.hub_threads
            ),
        );
        row(
            &mut t,
            "messages",
            format!(
                "{} B payloads, {}; upstream {}",
                self.payload_bytes,
                if self.refs {
                    "each with a ref (acknowledged)"
                } else {
                    "no refs (no acks)"
                },
                self.upstream
            ),
        );
        for p in self.phases() {
            p.table(&mut t, self.refs);
        }
        row(&mut t, "server RSS before", bytes(self.rss_before));
        row(&mut t, "server RSS after", bytes(self.rss_after));
        let c = &self.counters;
        row(
            &mut t,
            "client reads",
            format!(
                "{} recv, {} frames, {} (probe replies {}, pings {}, late {})",
                thousands(c.reads),
                thousands(c.frames),
                bytes(c.bytes),
                thousands(c.probe_replies),
                c.pings,
                c.late_replies + c.late_acks
            ),
        );
        row(
            &mut t,
            "hub",
            format!(
                "{} messages sent back, {} other kinds ignored, {} subscriptions seen",
                thousands(self.hub.messages),
                self.hub.other_kinds,
                self.hub.subscriptions
            ),
        );
        for n in self.notes() {
            let _ = writeln!(t, "  NOTE: {n}");
        }
        for e in self.errors() {
            let _ = writeln!(t, "  ERROR: {e}");
        }
        t
    }

    pub fn json(&self) -> Value {
        let errors = self.errors();
        let c = &self.counters;
        let server_errors: serde_json::Map<String, Value> = self
            .server_errors
            .iter()
            .map(|(reason, n, _)| (reason.clone(), json!(n)))
            .collect();
        json!({
            "scenario": "roundtrip",
            "transport": "ws",
            "server": self.kind.name(),
            "process": self.process,
            "pid": self.pid,
            "cores": self.cores,
            "upstream": self.upstream,
            "connections": self.requested,
            "connections_open": self.open,
            "connections_failed": self.failed(),
            "threads": self.threads,
            "hub_threads": self.hub_threads,
            "refs": self.refs,
            "payload_bytes": self.payload_bytes,
            "connect_s": round3(self.connect_s),
            "probe_s": round3(self.probe_s),
            "welcomed": self.welcomed,
            "probed": self.probed,
            "hubs_joined": self.hubs_joined,
            "latency": self.latency.json(),
            "saturation": self.saturation.as_ref().map(PhaseReport::json),
            "misrouted": c.misrouted,
            "unrecognized_frames": c.unrecognized,
            "late_replies": c.late_replies + c.late_acks,
            "server_errors": Value::Object(server_errors),
            "closed_by_server": self.closed_by_server,
            "hub": {
                "messages": self.hub.messages,
                "other_kinds": self.hub.other_kinds,
                "problems": failures_json(&self.hub.problems),
            },
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "failures": failures_json(&self.failures),
            "notes": self.notes(),
            "ok": errors.is_empty(),
            "errors": errors,
        })
    }
}

/// The figures `--server both` compares.
pub const COMPARED: &[(&str, &str)] = &[
    ("round trips/s (offered load)", "latency.round_trips_per_s"),
    ("round trip p50 (µs)", "latency.rtt_us.p50"),
    ("round trip p99 (µs)", "latency.rtt_us.p99"),
    ("round trip p99.9 (µs)", "latency.rtt_us.p999"),
    ("round trip max (µs)", "latency.rtt_us.max"),
    ("ack p50 (µs)", "latency.ack_us.p50"),
    ("ack p99 (µs)", "latency.ack_us.p99"),
    ("lost (offered load)", "latency.lost"),
    ("server CPU, offered load (%)", "latency.server_cpu_pct"),
    ("saturation: hub msgs/s", "saturation.hub_msgs_per_s"),
    ("saturation: round trips/s", "saturation.round_trips_per_s"),
    ("saturation: round trip p50 (µs)", "saturation.rtt_us.p50"),
    ("saturation: round trip p99 (µs)", "saturation.rtt_us.p99"),
    ("saturation: lost", "saturation.lost"),
    ("saturation: server CPU (s)", "saturation.server_cpu_s"),
    (
        "saturation: server µs CPU / msg",
        "saturation.server_cpu_us_per_msg",
    ),
    ("saturation: hub CPU (%)", "saturation.hub_cpu_pct"),
];

/// Runs roundtrip against one server.
pub fn run_one(
    args: &RoundtripArgs,
    kind: ServerKind,
    server: &Server,
) -> Result<RoundtripReport, String> {
    kind.check_two_way()?;
    sys::check_nofile_for(args.connections)?;
    let name = kind.name();
    if matches!(server, Server::Attach { .. }) && args.upstream.is_none() {
        return Err(
            "--pid: roundtrip needs --upstream ENDPOINT (the running server's --upstream-bind)"
                .into(),
        );
    }
    let mut target = Target::start(kind, &two_way_server(kind, server, UPSTREAM_BIND))?;
    let upstream = match (&args.upstream, &target.upstream) {
        (Some(given), _) => given.clone(),
        (None, Some(bound)) => bound.clone(),
        (None, None) => {
            return Err(format!(
                "the {name}'s READY line names no upstream endpoint (upstream=): \
                 does it take --upstream-bind?"
            ))
        }
    };
    let listen = target.listen;
    sys::check_sources(&args.client.sources, listen)?;
    let zmq = target.zmq.clone().ok_or_else(|| {
        format!("the {name} has no ZeroMQ endpoint for the hub's replies (READY zmq=-, or --zmq not given)")
    })?;
    let hub = Hub::start(args.hub_threads as usize, &upstream, &zmq)?;
    let healthz_before = http::healthz(listen, HEALTHZ_TIMEOUT)
        .ok()
        .map(|c| c.iter().sum::<u64>());
    let rss_before = target.rss_bytes()?;

    // The client threads, each with its block of clients.
    let threads = args.client.threads as u64;
    let shared = Arc::new(Shared {
        replies: (0..threads).map(|_| Padded::default()).collect(),
        ..Shared::default()
    });
    let in_flight = (args.client.in_flight / threads).max(1) as usize;
    let connect_start = Instant::now();
    let connect_deadline = connect_start + Duration::from_secs_f64(args.client.connect_timeout_s);
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>();
    let mut workers = Workers {
        cmd_txs: Vec::new(),
        wakes: Vec::new(),
        handles: Vec::new(),
        reply_rx,
        shared: shared.clone(),
    };
    for t in 0..threads {
        let base = block_start(args.connections, threads, t);
        let count = block_start(args.connections, threads, t + 1) - base;
        let cfg = DialConfig {
            target: listen,
            sources: args.client.sources.clone(),
            transport: Transport::Ws,
            channel_prefix: "rt.".into(),
            channels: args.connections,
            in_flight,
            handshake_timeout: Duration::from_secs_f64(args.client.handshake_timeout_s),
            max_attempts: 1,
            backoff: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            keep_in_epoll: true,
            subprotocol: Some(SUBPROTOCOL),
            tls: None,
            deflate: false,
        };
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new().map_err(|e| format!("eventfd: {e}"))?);
        let worker = Worker::new(
            t as usize,
            base,
            count,
            args,
            cfg,
            connect_deadline,
            shared.clone(),
            cmd_rx,
            wake.clone(),
            reply_tx.clone(),
        )?;
        workers.cmd_txs.push(cmd_tx);
        workers.wakes.push(wake);
        workers.handles.push(
            std::thread::Builder::new()
                .name(format!("roundtrip-client-{t}"))
                .spawn(move || worker.serve())
                .map_err(|e| format!("spawn client thread: {e}"))?,
        );
    }
    drop(reply_tx);

    // Connect.
    let connected = {
        let mut last_open = 0;
        workers.collect(
            "their connections",
            connect_deadline + REPORT_SLACK,
            |r| match r {
                Reply::Connected(c) => Some(c),
                _ => None,
            },
            || {
                let open = shared.open.load(Relaxed);
                eprintln!(
                    "bench: roundtrip {name}: {open}/{} open, {} failed, {} welcomed, {}/s now",
                    args.connections,
                    shared.gave_up.load(Relaxed),
                    shared.welcomed.load(Relaxed),
                    open - last_open
                );
                last_open = open;
                target.alive()
            },
        )?
    };
    let mut failures: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let (mut open, mut connect_end) = (0, None);
    for c in connected {
        open += c.opened;
        connect_end = connect_end.max(c.connect_end);
        for (k, (n, ex)) in c.failures {
            failures.entry(k).or_insert((0, ex)).0 += n;
        }
    }
    let connect_s = connect_end
        .map_or(connect_start.elapsed(), |e| e.duration_since(connect_start))
        .as_secs_f64();
    eprintln!(
        "bench: roundtrip {name}: {open} of {} open in {connect_s:.3} s; checking the path back",
        args.connections
    );

    // The path back: the hubs' publishers joined by the server's SUB, then
    // a probe back at every client.
    let probe_start = Instant::now();
    let probe_timeout = Duration::from_secs_f64(args.probe_timeout_s);
    let hubs_joined = hub.wait_joined(probe_start + probe_timeout) as u64;
    let left = (probe_start + probe_timeout).saturating_duration_since(Instant::now());
    workers.send(Cmd::Probe {
        deadline_ns: monotonic_ns() + left.as_nanos() as u64,
    })?;
    let probed = workers.collect(
        "the path check",
        probe_start + probe_timeout + REPORT_SLACK,
        |r| match r {
            Reply::Probed(p) => Some(p),
            _ => None,
        },
        || {
            eprintln!(
                "bench: roundtrip {name}: {}/{open} clients have a probe back",
                shared.probed.load(Relaxed)
            );
            target.alive()
        },
    )?;
    let probe_s = probe_start.elapsed().as_secs_f64();
    let welcomed: u64 = probed.iter().map(|p| p.welcomed).sum();
    let probes_sent: u64 = probed.iter().map(|p| p.probes_sent).sum();
    let probed: u64 = probed.iter().map(|p| p.probed).sum();
    let health = match healthz_before {
        Some(before) => Health::checked(before, http::healthz(listen, HEALTHZ_TIMEOUT)),
        None => Health::Unavailable("no /healthz before the run".into()),
    };
    eprintln!(
        "bench: roundtrip {name}: {probed} of {open} clients have a probe back after {probe_s:.3} s \
         ({hubs_joined} of {} hub publishers joined)",
        args.hub_threads
    );

    // The phases.
    let s = |secs: f64| (secs * 1e9) as u64;
    let mut phase = |label: &'static str, kind: u8, measured_s: f64, window: u32| {
        let start_ns = monotonic_ns() + START_DELAY_NS;
        let measure_ns = start_ns + s(args.warmup_s);
        let end_ns = measure_ns + s(measured_s);
        let spec = RunSpec {
            kind,
            start_ns,
            measure_ns,
            end_ns,
            grace_ns: end_ns + s(args.grace_s),
            period_ns: 1e9 / args.rate_per_connection,
            window,
            saturating: args.saturate_connections.min(args.connections),
        };
        run_phase(&workers, &mut target, &hub, name, label, spec, args)
    };
    let latency = phase("latency", KIND_LATENCY, args.duration_s, 0)?;
    let saturation = if args.saturate_s > 0.0 {
        Some(phase(
            "saturation",
            KIND_SATURATE,
            args.saturate_s,
            args.window,
        )?)
    } else {
        None
    };

    // Finish: the client threads' counts, then everything stops.
    workers.send(Cmd::Finish)?;
    let finished = workers.collect(
        "their counts",
        Instant::now() + REPORT_SLACK,
        |r| match r {
            Reply::Finished(f) => Some(f),
            _ => None,
        },
        || Ok(()),
    )?;
    drop(workers);
    let mut counters = Counters::default();
    let mut server_errors: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let (mut closed, mut unrecognized_example) = (0, None);
    for f in finished {
        counters.add(&f.counters);
        closed += f.closed;
        unrecognized_example = unrecognized_example.or(f.unrecognized_example);
        for (k, (n, ex)) in f.server_errors {
            server_errors.entry(k).or_insert((0, ex)).0 += n;
        }
    }
    let hub = hub.stop();
    target.alive()?;
    let rss_after = target.rss_bytes()?;
    let report = RoundtripReport {
        kind,
        process: target.how(),
        pid: target.pid,
        target: listen.to_string(),
        cores: target.cores,
        upstream,
        requested: args.connections,
        open,
        failures: failures.into_iter().map(|(k, (n, e))| (k, n, e)).collect(),
        threads: args.client.threads,
        hub_threads: args.hub_threads,
        refs: !args.no_refs,
        payload_bytes: args.payload_bytes,
        connect_s,
        probe_s,
        welcomed,
        probed,
        probes_sent,
        hubs_joined,
        latency,
        saturation,
        counters,
        server_errors: server_errors
            .into_iter()
            .map(|(k, (n, e))| (k, n, e))
            .collect(),
        unrecognized_example,
        closed_by_server: closed,
        health,
        hub,
        rss_before,
        rss_after,
    };
    target.stop();
    Ok(report)
}

/// Runs one phase: the command, the measured window's edges (hub count,
/// CPU times), then the client threads' figures once every reply is back
/// or the grace is over.
fn run_phase(
    workers: &Workers,
    target: &mut Target,
    hub: &Hub,
    name: &str,
    label: &'static str,
    spec: RunSpec,
    args: &RoundtripArgs,
) -> Result<PhaseReport, String> {
    let phase_start = Instant::now();
    let shared = &workers.shared;
    let replies_before = shared.replies();
    eprintln!(
        "bench: roundtrip {name} {label}: {:.1} s warm-up, {:.1} s measured",
        (spec.measure_ns - spec.start_ns) as f64 / 1e9,
        (spec.end_ns - spec.measure_ns) as f64 / 1e9
    );
    workers.send(Cmd::Run(spec))?;
    let mut last = (Instant::now(), replies_before, hub.messages());
    let mut progress = |target: &mut Target| -> Result<(), String> {
        let (now, replies, hub_n) = (Instant::now(), shared.replies(), hub.messages());
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-9);
        eprintln!(
            "bench: roundtrip {name} {label}: {:.1} s, {} back ({:.0}/s now), hub {:.0} msgs/s now, {} closed",
            phase_start.elapsed().as_secs_f64(),
            thousands(replies - replies_before),
            (replies - last.1) as f64 / secs,
            (hub_n - last.2) as f64 / secs,
            shared.closed.load(Relaxed)
        );
        last = (now, replies, hub_n);
        target.alive()
    };
    wait_until(spec.measure_ns, || progress(target))?;
    let hub_start = hub.messages();
    let hub_cpu_start = hub.cpu_seconds();
    let server_cpu_start = target.cpu_seconds().ok();
    let client_cpu_start = procfs::self_cpu_seconds();
    // The hub's count at each whole second of the window.
    let mut hub_by_second = Vec::new();
    let mut hub_at = hub_start;
    let mut second = spec.measure_ns + 1_000_000_000;
    while second <= spec.end_ns {
        wait_until(second, || progress(target))?;
        let n = hub.messages();
        hub_by_second.push(n - hub_at);
        hub_at = n;
        second += 1_000_000_000;
    }
    wait_until(spec.end_ns, || progress(target))?;
    let hub_in_window = hub.messages() - hub_start;
    let hub_cpu_s = match (hub_cpu_start, hub.cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let server_cpu_s = match (server_cpu_start, target.cpu_seconds().ok()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let client_cpu_s = procfs::self_cpu_seconds() - client_cpu_start;
    let grace_end =
        Instant::now() + Duration::from_nanos(spec.grace_ns.saturating_sub(monotonic_ns()));
    let results = workers.collect(
        label,
        grace_end + REPORT_SLACK,
        |r| match r {
            Reply::Ran(p) => Some(p),
            _ => None,
        },
        || progress(target),
    )?;
    let mut rtt = new_histogram();
    let mut ack = new_histogram();
    let mut tally = Tally::default();
    let (mut replies_in_window, mut late_sends, mut max_lag_ns) = (0, 0, 0);
    for r in results {
        merge_histograms(&mut rtt, &r.rtt);
        merge_histograms(&mut ack, &r.ack);
        tally.add(&r.tally);
        replies_in_window += r.replies_in_window;
        late_sends += r.late_sends;
        max_lag_ns = max_lag_ns.max(r.max_lag_ns);
    }
    let report = PhaseReport {
        label,
        clients: tally.clients,
        window: spec.window,
        rate_per_connection: args.rate_per_connection,
        warmup_s: (spec.measure_ns - spec.start_ns) as f64 / 1e9,
        measured_s: (spec.end_ns - spec.measure_ns) as f64 / 1e9,
        elapsed_s: phase_start.elapsed().as_secs_f64(),
        tally,
        rtt: Latency::from_ns(&rtt),
        ack: Latency::from_ns(&ack),
        replies_in_window,
        hub_in_window,
        hub_by_second,
        server_cpu_s,
        hub_cpu_s,
        client_cpu_s,
        late_sends,
        max_lag_ns,
    };
    eprintln!(
        "bench: roundtrip {name} {label}: {} sent, {} back, {} lost; {} round trips/s, p50 {} µs, p99 {} µs",
        report.tally.sent,
        report.tally.received,
        report.tally.lost,
        opt(report.round_trips_per_s(), 0),
        opt(report.rtt.p50_us, 0),
        opt(report.rtt.p99_us, 0)
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn address(n: u64) -> [u8; ADDRESS_BYTES] {
        format!("{:016x}{n:036x}", 0xfeed_u64)
            .into_bytes()
            .try_into()
            .unwrap()
    }

    fn tail(kind: u8, channel: u32, seq: u32) -> Tail {
        Tail {
            kind,
            channel,
            seq,
            sent_ns: 1_234_567_890,
        }
    }

    fn payload(t: &Tail, bytes: usize) -> Vec<u8> {
        let mut p = Vec::new();
        ws::encode_payload(&mut p, bytes, t);
        p
    }

    #[test]
    fn saturating_clients_are_spread_and_counted_exactly() {
        for (n, s) in [(1000u64, 50u64), (7, 3), (50, 50), (10, 1), (1, 1), (3, 10)] {
            let chosen: Vec<u64> = (0..n).filter(|&g| is_saturating(g, s, n)).collect();
            assert_eq!(chosen.len() as u64, s.min(n), "{n} {s}");
            // Spread: consecutive ones about n/s apart.
            for w in chosen.windows(2) {
                let gap = w[1] - w[0];
                assert!(
                    gap >= n / s.min(n) && gap <= n.div_ceil(s.min(n)),
                    "{n} {s} {w:?}"
                );
            }
        }
        assert!(!is_saturating(0, 5, 0));
    }

    #[test]
    fn a_message_is_a_meta_line_with_the_tail_as_ref_then_the_payload() {
        let t = tail(KIND_LATENCY, 17, 3);
        let p = payload(&t, 40);
        let mut out = Vec::new();
        message_content(&mut out, 17, &p, true);
        let newline = out.iter().position(|&b| b == b'\n').unwrap();
        let meta: Value = serde_json::from_slice(&out[..newline]).unwrap();
        assert_eq!(meta["channel"], "rt.17");
        let reference = meta["ref"].as_str().unwrap();
        assert_eq!(ref_tail(reference.as_bytes()), Some(t));
        assert_eq!(&out[newline + 1..], &p[..]);
        message_content(&mut out, 5, &p, false);
        assert!(out.starts_with(b"{\"channel\":\"rt.5\"}\n"));
        assert_eq!(out.len(), "{\"channel\":\"rt.5\"}\n".len() + p.len());
    }

    #[test]
    fn what_the_server_sends_is_told_apart() {
        let a = address(9);
        let a_text = std::str::from_utf8(&a).unwrap();
        let welcome = format!("{{\"type\":\"welcome\",\"address\":\"{a_text}\"}}\n");
        assert_eq!(classify(welcome.as_bytes()), Incoming::Welcome(Some(a)));
        // Any field order, via JSON.
        let welcome = format!("{{\"address\":\"{a_text}\",\"type\":\"welcome\"}}\n");
        assert_eq!(classify(welcome.as_bytes()), Incoming::Welcome(Some(a)));
        let short = "{\"type\":\"welcome\",\"address\":\"abc\"}\n";
        assert_eq!(classify(short.as_bytes()), Incoming::Welcome(None));

        let t = tail(KIND_SATURATE, 4, 99);
        let p = payload(&t, TAIL_LEN);
        let tail_text = std::str::from_utf8(&p).unwrap();
        let ack = format!("{{\"type\":\"ack\",\"ref\":\"{tail_text}\"}}\n");
        assert_eq!(classify(ack.as_bytes()), Incoming::Ack(Some(t)));
        let ack = format!("{{\"ref\":\"{tail_text}\",\"type\":\"ack\"}}");
        assert_eq!(classify(ack.as_bytes()), Incoming::Ack(Some(t)));
        assert_eq!(
            classify(b"{\"type\":\"ack\",\"ref\":17}\n"),
            Incoming::Ack(None),
            "not a ref the bench sends"
        );
        let error = format!(
            "{{\"type\":\"error\",\"ref\":\"{tail_text}\",\"reason\":\"rate limit: messages per second\"}}\n"
        );
        assert_eq!(
            classify(error.as_bytes()),
            Incoming::Error {
                reason: "rate limit: messages per second".into(),
                tail: Some(t)
            }
        );
        assert_eq!(
            classify(b"{\"type\":\"error\",\"reason\":\"bad meta\"}\n"),
            Incoming::Error {
                reason: "bad meta".into(),
                tail: None
            }
        );

        let mut reply = format!("{{\"channel\":\"!{a_text}\"}}\n").into_bytes();
        reply.extend_from_slice(&payload(&t, 64));
        assert_eq!(
            classify(&reply),
            Incoming::Reply {
                address: Some(a),
                tail: Some(t)
            }
        );
        // Another shape of the same: read as JSON.
        let mut reply = format!("{{ \"channel\": \"!{a_text}\" }}\n").into_bytes();
        reply.extend_from_slice(&p);
        assert_eq!(
            classify(&reply),
            Incoming::Reply {
                address: Some(a),
                tail: Some(t)
            }
        );
        let mut foreign = b"{\"channel\":\"!nobody\"}\n".to_vec();
        foreign.extend_from_slice(&p);
        assert_eq!(
            classify(&foreign),
            Incoming::Reply {
                address: None,
                tail: Some(t)
            }
        );
        assert_eq!(
            classify(
                &[
                    &format!("{{\"channel\":\"!{a_text}\"}}\n").into_bytes()[..],
                    b"short"
                ]
                .concat()
            ),
            Incoming::Reply {
                address: Some(a),
                tail: None
            }
        );
        // A channel publication, a future type, garbage.
        assert_eq!(
            classify(b"{\"channel\":\"rt.4\",\"id\":\"7\"}\nx"),
            Incoming::Other
        );
        assert_eq!(classify(b"{\"type\":\"pong\"}\n"), Incoming::Other);
        assert_eq!(classify(b"hello"), Incoming::Other);
        assert_eq!(classify(b""), Incoming::Other);
    }

    #[test]
    fn every_message_is_accounted_for_exactly() {
        let mut f = Flight {
            sent: 200,
            ..Flight::default()
        };
        for seq in [0, 1, 2, 5, 4, 100, 150] {
            assert_eq!(f.reply(seq), Mark::First);
        }
        assert_eq!(f.reply(4), Mark::Duplicate);
        // A duplicate far behind is still told apart (no window).
        assert_eq!(f.reply(0), Mark::Duplicate);
        assert_eq!(f.reply(200), Mark::Unknown);
        assert_eq!(f.reply(u32::MAX), Mark::Unknown);
        assert_eq!(f.replies.distinct, 7);
        assert_eq!(f.replies.duplicates, 2);
        assert_eq!(f.replies.out_of_order, 1, "4 after 5");
        assert_eq!(f.unknown, 2);
        assert_eq!(f.lost(), 193);
        f.refused = 3;
        assert_eq!(f.in_flight(), 190, "refused ones are not on their way");
        assert_eq!(f.lost(), 193, "but they are not back");
        for seq in 0..10 {
            assert_eq!(f.ack(seq), Mark::First);
        }
        assert_eq!(f.ack(3), Mark::Duplicate);
        let mut t = Tally::default();
        t.add_flight(&f);
        let mut clean = Flight {
            sent: 3,
            ..Flight::default()
        };
        for seq in 0..3 {
            clean.reply(seq);
            clean.ack(seq);
        }
        t.add_flight(&clean);
        assert_eq!(t.clients, 2);
        assert_eq!((t.sent, t.received, t.lost), (203, 10, 193));
        assert_eq!(t.clients_with_loss, 1);
        assert_eq!((t.duplicates, t.out_of_order, t.unknown), (2, 1, 2));
        assert_eq!((t.refused, t.acks, t.ack_duplicates), (3, 13, 1));
        assert_eq!(
            t.acks_missing,
            200 - 10 - 3,
            "refused ones get an error, not an ack"
        );
        let mut sum = Tally::default();
        sum.add(&t);
        sum.add(&t);
        assert_eq!((sum.clients, sum.lost), (4, 386));
        // A new phase starts from nothing, numbers reused.
        f.clear();
        assert_eq!(
            f,
            Flight {
                replies: f.replies.clone(),
                acks: f.acks.clone(),
                ..Flight::default()
            }
        );
        assert_eq!((f.replies.distinct, f.acks.distinct), (0, 0));
        f.sent = 1;
        assert_eq!(f.reply(0), Mark::First);
    }

    #[test]
    fn the_latency_schedule_spreads_the_clients_over_a_period() {
        let spec = RunSpec {
            kind: KIND_LATENCY,
            start_ns: 1_000,
            measure_ns: 0,
            end_ns: 0,
            grace_ns: 0,
            period_ns: 100_000_000.0, // 10 msg/s
            window: 0,
            saturating: 0,
        };
        assert_eq!(due_ns(&spec, 0, 1000, 0), 1_000);
        assert_eq!(due_ns(&spec, 500, 1000, 0), 1_000 + 50_000_000);
        assert_eq!(due_ns(&spec, 999, 1000, 0), 1_000 + 99_900_000);
        assert_eq!(due_ns(&spec, 500, 1000, 3), 1_000 + 350_000_000);
        // Over all clients, one period holds one message each, evenly.
        let mut dues: Vec<u64> = (0..1000).map(|g| due_ns(&spec, g, 1000, 0)).collect();
        dues.sort_unstable();
        assert!(dues.windows(2).all(|w| w[1] - w[0] == 100_000));
    }

    #[test]
    fn the_server_gets_an_upstream_and_the_gateway_room_to_send() {
        let spawn = |extra: &[&str]| Server::Spawn {
            bin: PathBuf::from("gw"),
            cores: 2,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            stderr: None,
            ready_timeout: Duration::from_secs(30),
        };
        let args = |s: Server| match s {
            Server::Spawn { extra_args, .. } => extra_args,
            other => panic!("{other:?}"),
        };
        let ep = "tcp://127.0.0.1:5999";
        assert_eq!(
            args(two_way_server(ServerKind::Gateway, &spawn(&["--x"]), ep)),
            [
                "--upstream-bind",
                ep,
                "--send-messages-per-s",
                "1000000",
                "--send-bytes-per-s",
                "1000000000",
                "--x"
            ]
        );
        // Set by the user: theirs, once.
        assert_eq!(
            args(two_way_server(
                ServerKind::Gateway,
                &spawn(&["--send-messages-per-s=500"]),
                ep
            )),
            [
                "--upstream-bind",
                ep,
                "--send-bytes-per-s",
                "1000000000",
                "--send-messages-per-s=500"
            ]
        );
        assert_eq!(
            args(two_way_server(ServerKind::Baseline, &spawn(&[]), ep)),
            ["--upstream-bind", ep]
        );
        let attached = Server::Attach {
            pid: 1,
            target: "127.0.0.1:1".parse().unwrap(),
            zmq: None,
        };
        assert_eq!(two_way_server(ServerKind::Gateway, &attached, ep), attached);
    }

    fn latency() -> Latency {
        Latency {
            count: 100_000,
            p50_us: Some(300.0),
            p90_us: Some(500.0),
            p99_us: Some(900.0),
            p999_us: Some(2000.0),
            max_us: Some(5000.0),
            mean_us: Some(350.0),
        }
    }

    fn phase(window: u32) -> PhaseReport {
        PhaseReport {
            label: if window == 0 { "latency" } else { "saturation" },
            clients: 1000,
            window,
            rate_per_connection: 10.0,
            warmup_s: 1.0,
            measured_s: 10.0,
            elapsed_s: 11.2,
            tally: Tally {
                clients: 1000,
                sent: 110_000,
                received: 110_000,
                acks: 110_000,
                ..Tally::default()
            },
            rtt: latency(),
            ack: latency(),
            replies_in_window: 100_000,
            hub_in_window: 100_000,
            hub_by_second: vec![9_000, 11_000],
            server_cpu_s: Some(2.5),
            hub_cpu_s: Some(1.0),
            client_cpu_s: 3.0,
            late_sends: 0,
            max_lag_ns: 1_500_000,
        }
    }

    fn report() -> RoundtripReport {
        RoundtripReport {
            kind: ServerKind::Baseline,
            process: "spawned",
            pid: 7,
            target: "127.0.0.1:1".into(),
            cores: Some(2),
            upstream: "tcp://127.0.0.1:2".into(),
            requested: 1000,
            open: 1000,
            failures: vec![],
            threads: 1,
            hub_threads: 1,
            refs: true,
            payload_bytes: 33,
            connect_s: 0.5,
            probe_s: 0.2,
            welcomed: 1000,
            probed: 1000,
            probes_sent: 1000,
            hubs_joined: 1,
            latency: phase(0),
            saturation: Some(phase(64)),
            counters: Counters::default(),
            server_errors: vec![],
            unrecognized_example: None,
            closed_by_server: 0,
            health: Health::Checked {
                baseline: 1,
                total: 1001,
                per_core: vec![1001],
            },
            hub: HubSummary::default(),
            rss_before: 1,
            rss_after: 2,
        }
    }

    #[test]
    fn figures_of_a_clean_run() {
        let r = report();
        assert!(r.errors().is_empty(), "{:?}", r.errors());
        assert!(r.notes().is_empty(), "{:?}", r.notes());
        let p = &r.latency;
        assert_eq!(p.round_trips_per_s(), Some(10_000.0));
        assert_eq!(p.offered_per_s(), Some(10_000.0));
        assert_eq!(p.server_cpu_pct(), Some(25.0));
        assert_eq!(p.server_cpu_us_per_msg(), Some(25.0));
        let s = r.saturation.as_ref().unwrap();
        assert_eq!(s.offered_per_s(), None);
        assert_eq!(s.hub_msgs_per_s(), Some(10_000.0));
        let j = r.json();
        assert_eq!(j["scenario"], "roundtrip");
        assert_eq!(j["ok"], true);
        assert_eq!(j["latency"]["round_trips_per_s"], 10_000.0);
        assert_eq!(j["latency"]["window"], Value::Null);
        assert_eq!(j["saturation"]["window"], 64);
        assert_eq!(j["saturation"]["hub_msgs_per_s"], 10_000.0);
        assert_eq!(j["saturation"]["server_cpu_s"], 2.5);
        assert!(!j.to_string().contains('\n'), "one line");
        // Every compared figure is in the JSON.
        for (label, path) in COMPARED {
            assert!(
                crate::report::number_at(&j, path).is_some(),
                "{label}: {path} missing"
            );
        }
        let t = r.table();
        assert!(
            t.contains("1,000 clients × 10 msg/s = 10000 msg/s offered"),
            "{t}"
        );
        assert!(t.contains("whole seconds: 9,000 to 11,000"), "{t}");
        assert!(!t.contains("ERROR"), "{t}");
        let mut no_sat = report();
        no_sat.saturation = None;
        assert_eq!(no_sat.json()["saturation"], Value::Null);
    }

    #[test]
    fn loss_and_broken_contracts_are_errors() {
        let mut r = report();
        r.latency.tally.lost = 5;
        r.latency.tally.clients_with_loss = 2;
        r.latency.tally.acks_missing = 5;
        r.probed = 990;
        r.counters.misrouted = 1;
        r.server_errors = vec![("rate limit: messages per second".into(), 3, "{…}".into())];
        r.hub.problems = vec![("not 5 frames".into(), 1, "2 frames".into())];
        r.saturation.as_mut().unwrap().hub_cpu_s = Some(9.9);
        let e = r.errors();
        assert_eq!(e.len(), 6, "{e:?}");
        assert!(
            e[1].starts_with("latency: 5 of 110000 messages not back"),
            "{e:?}"
        );
        assert!(e.iter().any(|e| e.contains("rate limit")));
        assert!(e.iter().any(|e| e.starts_with("hub: 1 × not 5 frames")));
        assert_eq!(r.json()["ok"], false);
        assert!(r.notes()[0].contains("the hub, not the server, may be the limit"));
        // Without refs, acks are not expected.
        r.refs = false;
        assert_eq!(r.errors().len(), 5);
    }
}
