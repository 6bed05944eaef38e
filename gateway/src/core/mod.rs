//! One core: a monoio io_uring runtime pinned to a CPU, its own SO_REUSEPORT
//! listener, its connections, its channel registry and history, and the
//! fan-out of the messages ingest hands it. Nothing here is shared with other
//! cores except the inbound queue and the connection counter.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use protocol::deflate::Window;
use protocol::envelope;
use protocol::id::{Cursor, GATEWAY_ID_FLOOR};
use protocol::origin::PATTERN_SLOT;
use slab::Slab;
use tracing::{debug, info, warn};

pub mod events;

use crate::admission::{Admission, Refusal};
use crate::config::Config;
use crate::ingest::{InterestTx, Message, ToCore};

pub mod conn;
pub mod registry;
pub mod two_way;

pub use self::conn::{
    sse_bytes, Conn, Drain, PollAnswer, State, Transport, SSE_HEARTBEAT, SSE_HEARTBEAT_CHUNK,
    SSE_RETRY_MS_MAX, SSE_RETRY_MS_MIN, WS_PING,
};
pub use self::registry::{Registry, Resume};

/// Everything one core owns. Lives in an `Rc`: only this core's thread sees it.
pub struct Core {
    pub index: usize,
    pub cfg: &'static Config,
    conns: RefCell<Slab<Conn>>,
    registry: RefCell<Registry>,
    /// The receive buffer every connection of this core reads into, right
    /// after readiness: idle connections hold no read buffer of their own.
    pub scratch: RefCell<Box<[u8]>>,
    /// permessage-deflate's contexts, made on first use and reused for
    /// every message this core compresses (a message's shared frame, an
    /// echo) or decompresses (a client's message): connections keep none.
    pub deflater: RefCell<protocol::deflate::Deflater>,
    pub inflater: RefCell<protocol::deflate::Inflater>,
    /// Highest id ingest has assigned (all cores).
    pub published_through: Arc<AtomicU64>,
    pub conn_counts: Arc<[AtomicU64]>,
    /// Limits on new connections (see `admission`).
    pub admission: Admission,
    started: Instant,
    /// Connections with frames queued by the current pass, in the order
    /// the pass writes them.
    dirty: RefCell<Vec<u32>>,
    /// How far the pass under way has got in `dirty` (0: none under way).
    pass_at: Cell<usize>,
    /// The current delivery batch's frames, per connection (see
    /// `events::stage`); reused, never shrunk.
    stage: RefCell<events::Stage>,
    /// Sweeps since this core saw the drain start (see `drain_step`).
    drain_sweeps: Cell<u32>,
    /// This core's counters for `/metrics`, published by the sweep.
    pub stats: crate::ops::metrics::CoreStats,
    /// Encoding times of the current batch's delivered messages, for the
    /// publish→send latency (reused, never shrunk).
    batch_stamps: RefCell<Vec<Instant>>,
    /// Per CORS slot (index = slot - 1): the long-poll status line and that
    /// origin's CORS lines, written once.
    cors_poll_heads: Vec<Bytes>,
    /// The CORS lines of the connections whose origin an allowlist pattern
    /// allowed (`PATTERN_SLOT`: they echo the origin), while a long-poll or
    /// the opening of an SSE stream needs them; nothing for other
    /// connections.
    cors_by_conn: RefCell<HashMap<u32, Bytes>>,
    /// Held long-polls whose cursor this core could not place on some
    /// channels (they resumed here from a position this core never saw, or
    /// ingest let the channel go while they waited): the first message
    /// answers them with those gaps and itself, and its id as the cursor,
    /// never with a cursor of this gateway's own sequence, which another
    /// gateway could not place on a channel numbered by its publisher.
    poll_gaps: RefCell<HashMap<u32, Vec<Box<str>>>>,
    /// Every connection's readiness (see `events`).
    pub epoll: crate::sys::Epoll,
    /// This core's end of the path to the hubs (None: not configured).
    pub upstream: Option<crate::upstream::CoreUpstream>,
    /// Connections accepted so far: the next one's serial.
    serials: Cell<u32>,
    /// Send budgets of `POST /publish` senders (by `sub`, or by address
    /// without auth), forgotten once full again.
    pub post_budgets: RefCell<HashMap<Box<str>, protocol::upstream::SendBudget>>,
}

/// A core's ends of the other threads' queues: to ingest (demand mode),
/// to the hubs (two-way traffic).
#[derive(Default)]
pub struct Links {
    pub interest: Option<InterestTx>,
    pub upstream: Option<crate::upstream::CoreUpstream>,
}

/// Size of the per-core receive buffer.
const SCRATCH_BYTES: usize = 64 * 1024;
/// A dispatch batch ends after this many messages or this many deliveries,
/// whichever comes first; its frames are then written, one `sendmsg` per
/// connection, and the dispatcher yields to connection tasks. Behind by
/// many messages, a larger batch puts more frames in each `sendmsg` (the
/// send, not the frame, is what costs) but makes the batch's first
/// subscribers wait for the whole batch to be queued (1024 messages
/// measured better throughput when saturated and a worse p99 after a
/// hiccup at 100k deliveries/s, so 256). The delivery cap bounds what a
/// batch holds queued (a 32-byte queue slot per delivery: 8 MiB) and how
/// long the core goes without serving its connections, however many
/// subscribers a channel has.
const DISPATCH_BATCH_MESSAGES: usize = 256;
const DISPATCH_BATCH_DELIVERIES: u64 = 262_144;
/// Connections written between two looks at the inbox during a batch's
/// writes (see `dispatch`): a look at an empty channel costs a few
/// nanoseconds, a write microseconds.
const WRITES_BETWEEN_INTAKES: usize = 32;
/// From this many local subscribers on, a message's frames are copied into
/// the core before they are queued (see `dispatch`): a copy of a frame
/// costs about what a few dozen contended reference counts do.
const LOCAL_COPY_SUBSCRIBERS_MIN: usize = 32;

impl Core {
    pub fn new(
        index: usize,
        cfg: &'static Config,
        first_id: u64,
        published_through: Arc<AtomicU64>,
        conn_counts: Arc<[AtomicU64]>,
        admission: Admission,
        links: Links,
    ) -> std::io::Result<Core> {
        let Links { interest, upstream } = links;
        let epoll = crate::sys::Epoll::new()?;
        if let Some(up) = &upstream {
            let fd = up.fd().map_err(std::io::Error::other)?;
            epoll.add(fd, crate::upstream::UPSTREAM_KEY)?;
        }
        Ok(Core {
            index,
            cfg,
            conns: RefCell::new(Slab::new()),
            registry: RefCell::new(Registry::new(first_id, interest)),
            scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
            deflater: RefCell::default(),
            inflater: RefCell::default(),
            published_through,
            conn_counts,
            admission,
            started: Instant::now(),
            dirty: RefCell::new(Vec::new()),
            pass_at: Cell::new(0),
            stage: RefCell::new(Vec::new()),
            drain_sweeps: Cell::new(0),
            stats: crate::ops::metrics::CoreStats::default(),
            batch_stamps: RefCell::new(Vec::new()),
            cors_poll_heads: cfg
                .origins
                .all_cors_lines()
                .map(|lines| {
                    let mut head = envelope::LONGPOLL_STATUS_LINE.to_vec();
                    head.extend_from_slice(lines.as_bytes());
                    Bytes::from(head)
                })
                .collect(),
            cors_by_conn: RefCell::new(HashMap::new()),
            poll_gaps: RefCell::new(HashMap::new()),
            epoll,
            upstream,
            serials: Cell::new(0),
            post_budgets: RefCell::new(HashMap::new()),
        })
    }

    /// The CORS header lines a response to connection `key`, whose origin
    /// has CORS slot `cors`, carries ("" for none).
    pub fn cors_lines(&self, key: u32, cors: u8) -> std::borrow::Cow<'static, str> {
        match cors {
            PATTERN_SLOT => self
                .cors_by_conn
                .borrow()
                .get(&key)
                .map(|b| String::from_utf8_lossy(b).into_owned().into())
                .unwrap_or_default(),
            cors => self.cfg.origins.cors_lines(cors).into(),
        }
    }

    /// The frame of message `m` for a WebSocket that negotiated `deflate`
    /// (None: plain): the message's shared compressed frame, or its plain
    /// one under the threshold.
    pub fn ws_frame<'m>(&self, m: &'m Message, deflate: Option<Window>) -> &'m Bytes {
        match deflate {
            Some(window) => {
                m.ws_deflated(window, self.cfg.ws_deflate_threshold_bytes, &self.deflater)
            }
            None => &m.ws,
        }
    }

    /// Seconds since this core started: the coarse clock of deadlines.
    pub fn now_s(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    pub fn deadline_after_ms(&self, ms: u64) -> u32 {
        // The clock counts whole seconds, so "now" may be up to a second old:
        // +1 keeps a deadline from firing early. It fires at most two seconds
        // late (clock grain plus the once-a-second sweep).
        self.now_s().saturating_add(ms.div_ceil(1000) as u32 + 1)
    }

    /// Milliseconds since this core started, for the handshake rate.
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Admission control for a just-accepted connection from `peer`: its
    /// slab key, or why it is refused. Refused connections never enter the
    /// slab. A trusted proxy's connection is counted per address only once
    /// its PROXY header names the client (see [`Core::readdress`]).
    pub fn admit(&self, fd: RawFd, peer: SocketAddr) -> Result<u32, Refusal> {
        // Connections, not the entries of their gRPC streams.
        let open = self.conn_counts[self.index].load(Ordering::Relaxed) as usize;
        let peer = SocketAddr::new(crate::admission::client_ip(peer), peer.port());
        let proxied = self.cfg.expects_proxy_header(peer.ip());
        let counted = (!proxied).then_some(peer.ip());
        self.admission.admit(open, counted, self.now_ms())?;
        let key = self.register(fd, peer);
        let mut conns = self.conns.borrow_mut();
        let c = &mut conns[key as usize];
        c.counted_ip = counted.is_some() && self.admission.counts_addresses();
        c.expects_proxy_header = proxied;
        // Its first bytes are there already (the listener defers accepts
        // until they are, unless the client was silent past
        // `defer_accept_s`): its task reads at once rather than waiting
        // for the epoll set to say so.
        c.readable = true;
        Ok(key)
    }

    /// The client a trusted proxy's PROXY header named: its address
    /// replaces the proxy's, and takes its place in the per-address limit.
    pub fn readdress(&self, key: u32, client: SocketAddr) -> Result<(), Refusal> {
        let client = SocketAddr::new(crate::admission::client_ip(client), client.port());
        self.admission.admit_address(client.ip())?;
        let mut conns = self.conns.borrow_mut();
        let c = &mut conns[key as usize];
        c.client_ip = client.ip();
        c.client_port = client.port();
        c.counted_ip = self.admission.counts_addresses();
        Ok(())
    }

    /// Enters a connection in the slab, from `client` (holding no place in
    /// the per-address table yet).
    pub fn register(&self, fd: RawFd, client: SocketAddr) -> u32 {
        self.conn_counts[self.index].fetch_add(1, Ordering::Relaxed);
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let key = entry.key() as u32;
        let mut conn = Conn::new(fd, key, client);
        conn.serial = self.serials.get();
        self.serials.set(conn.serial.wrapping_add(1));
        entry.insert(conn);
        key
    }

    /// Enters a gRPC stream of a connection from `client`: an entry
    /// without a socket (see `Transport::GrpcStream`), not counted as a
    /// connection.
    pub fn register_stream(&self, client: SocketAddr) -> u32 {
        let mut conns = self.conns.borrow_mut();
        let entry = conns.vacant_entry();
        let key = entry.key() as u32;
        let mut conn = Conn::new(conn::SOCKETLESS, key, client);
        conn.serial = self.serials.get();
        conn.state = State::GrpcStream { two_way: None };
        self.serials.set(conn.serial.wrapping_add(1));
        entry.insert(conn);
        key
    }

    /// Removes a connection and closes its socket (which also takes it out
    /// of the epoll set).
    pub fn deregister(&self, key: u32) {
        let mut conn = self.conns.borrow_mut().remove(key as usize);
        conn.drop_tls();
        if conn.stream.is_some() {
            // Presence: what the hubs are told, before it leaves its
            // channels (its user channel says who it was).
            let back = conn.gone == conn::Gone::Drain;
            self.presence(
                protocol::upstream::Kind::Disconnect,
                &conn,
                key,
                "",
                Some((conn.gone.reason(), back)),
            );
        }
        // The entry owned the descriptor: closed once, here.
        if conn.fd != conn::SOCKETLESS {
            drop(crate::sys::own(conn.fd));
        }
        if conn.cors == PATTERN_SLOT {
            self.cors_by_conn.borrow_mut().remove(&key);
        }
        if conn.transport() == Transport::LongPoll {
            self.poll_gaps.borrow_mut().remove(&key);
        }
        self.registry.borrow_mut().unsubscribe(key, &conn.channels);
        if conn.counted_ip {
            self.admission.release(conn.client_ip);
        }
        // A stream's entry (a gRPC call, an HTTP/2 request) is not a
        // connection; an HTTP/2 connection's entry is, without its socket.
        if conn.fd != conn::SOCKETLESS || matches!(conn.state, State::Http2) {
            self.conn_counts[self.index].fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Subscribes connection `key` to `channels` as `transport` (its state
    /// set accordingly) and returns what it missed after `since`. Runs
    /// without yielding, so no message slips between the history replayed
    /// and the live messages that follow.
    pub fn subscribe(
        &self,
        key: u32,
        channels: &[String],
        since: Option<Cursor>,
        transport: Transport,
        replay_max: usize,
    ) -> Resume {
        let published = self.published_through.load(Ordering::Acquire);
        let (ids, resume) = self.registry.borrow_mut().subscribe(
            key,
            channels,
            since,
            published,
            self.cfg.channels_max,
            replay_max,
        );
        let mut conns = self.conns.borrow_mut();
        let c = &mut conns[key as usize];
        c.channels = ids;
        c.deadline_s = 0;
        match transport {
            Transport::WebSocket => {
                let state = State::websocket(self.cfg.ws_message_bytes_max, None);
                self.open_stream(c, key, state);
            }
            // HTTP/1.1; the request marks an HTTP/1.0 stream.
            Transport::Sse => self.open_stream(c, key, State::Sse { chunked: true }),
            Transport::GrpcStream => {
                let two_way = match &mut c.state {
                    State::GrpcStream { two_way } => two_way.take(),
                    _ => None,
                };
                self.open_stream(c, key, State::GrpcStream { two_way });
            }
            _ => {
                c.state = State::LongPoll {
                    answer: PollAnswer::Waiting,
                    cursor: 0,
                    keep_alive: true,
                }
            }
        }
        // Messages up to the cursor are the client's already; live ones
        // before it may still be in flight to this core.
        c.skip_through = if resume.reset { 0 } else { since.unwrap_or(0) };
        resume
    }

    /// Connection `key` leaves its channels and goes back to reading
    /// requests.
    pub fn unsubscribe(&self, key: u32) {
        let mut conns = self.conns.borrow_mut();
        let c = &mut conns[key as usize];
        c.state = State::Request;
        self.leave_channels(c, key);
    }

    fn leave_channels(&self, c: &mut Conn, key: u32) {
        self.registry
            .borrow_mut()
            .unsubscribe(key, &std::mem::take(&mut c.channels));
        self.poll_gaps.borrow_mut().remove(&key);
    }

    /// A long-poll answer with no message and `cursor`, for connection
    /// `key` of CORS slot `cors`.
    pub fn empty_poll_answer(
        &self,
        key: u32,
        cors: u8,
        cursor: Cursor,
        keep_alive: bool,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        envelope::longpoll_response(
            &[],
            cursor,
            &[],
            keep_alive,
            &self.cors_lines(key, cors),
            &mut out,
        );
        out
    }

    /// The CORS lines a connection allowed by an origin pattern needs for
    /// its answers (they echo its origin), kept while it needs them.
    pub fn keep_cors_lines(&self, key: u32, lines: Bytes) {
        self.cors_by_conn.borrow_mut().insert(key, lines);
    }

    pub fn forget_cors_lines(&self, key: u32) {
        self.cors_by_conn.borrow_mut().remove(&key);
    }

    /// The gaps a held long-poll is told with its next message.
    pub fn hold_gaps(&self, key: u32, gaps: Vec<Box<str>>) {
        self.poll_gaps.borrow_mut().insert(key, gaps);
    }

    /// A lone core (index 0 of 1) with no interest queue, at
    /// `published_through`, for unit tests.
    #[cfg(test)]
    pub fn lone(cfg: &'static Config, published_through: u64) -> Core {
        let counts: Arc<[AtomicU64]> = vec![AtomicU64::new(0)].into();
        let admission = Admission::new(cfg, 1, None, 0);
        let published = Arc::new(AtomicU64::new(published_through));
        Core::new(0, cfg, 1, published, counts, admission, Links::default()).expect("an epoll set")
    }

    /// Runs `f` on connection `key`'s slab entry (which must exist: its
    /// task or the event loop holds the key until it deregisters it).
    pub fn with_conn<T>(&self, key: u32, f: impl FnOnce(&mut Conn) -> T) -> T {
        f(&mut self.conns.borrow_mut()[key as usize])
    }

    /// Like [`Core::with_conn`], for an entry that may be gone.
    pub fn try_with_conn<T>(&self, key: u32, f: impl FnOnce(&mut Conn) -> T) -> Option<T> {
        self.conns.borrow_mut().get_mut(key as usize).map(f)
    }

    /// A held long-poll is over: it leaves its channels, and the
    /// connection waits for its next request (parked, `keep_alive`) or
    /// closes once its answer has left.
    pub fn end_poll(&self, c: &mut Conn, key: u32, keep_alive: bool) {
        self.leave_channels(c, key);
        if keep_alive {
            self.await_request(c);
        } else {
            c.state = State::Closing { shut_wr: false };
            c.deadline_s = 0;
        }
    }

    /// Between requests: the next head must come within the head timeout.
    pub fn await_request(&self, c: &mut Conn) {
        c.state = State::Request;
        c.deadline_s = self.deadline_after_ms(self.cfg.head_timeout_ms);
    }

    /// Opens a stream (`state`: a WebSocket or SSE): it was heard from just
    /// now, and its first heartbeat is due between half an interval and an
    /// interval from now, by its slab key, so that a burst of connections
    /// is not pinged in one burst forever after.
    pub fn open_stream(&self, c: &mut Conn, key: u32, state: State) {
        let now = self.now_s();
        c.state = state;
        c.stream = Some(c.transport());
        c.last_heard_s = now;
        c.deadline_s = match self.cfg.heartbeat_interval_s() {
            Some(interval) => now + interval - key % (interval / 2 + 1),
            None => 0,
        };
    }

    /// Takes one batch of messages from ingest, appends them to the history
    /// and queues them on every local subscriber, then writes each touched
    /// connection once.
    ///
    /// The writes are a rolling pass: every few connections, messages that
    /// came in meanwhile join it, queued behind what the connections not
    /// yet written have, and the connections already written go to the
    /// back of the pass again. Writing 2,500 subscribers of a hot channel
    /// takes tens of milliseconds; a message arriving just after a pass
    /// started would otherwise wait for that whole pass, then for its own.
    /// A call writes one round's worth and returns (the core's other tasks
    /// run); the next call goes on with the same pass.
    fn dispatch(&self, rx: &Receiver<ToCore>) -> usize {
        let cfg = self.cfg;
        let mut handled = 0;
        let mut registry = self.registry.borrow_mut();
        let mut conns = self.conns.borrow_mut();
        let mut dirty = self.dirty.borrow_mut();
        let mut stamps = self.batch_stamps.borrow_mut();
        let cors_by_conn = self.cors_by_conn.borrow();
        let mut poll_gaps = self.poll_gaps.borrow_mut();
        let mut stage = self.stage.borrow_mut();
        let (mut deliveries, mut delivered_bytes, mut deflate_saved) = (0u64, 0u64, 0u64);
        // How far the pass has got in `dirty`; it may have begun in an
        // earlier call.
        let mut written = self.pass_at.get();
        // This call's share of the pass: as many writes as connections
        // were waiting after its first intake (one round, as often as the
        // core yielded before the pass was rolling), then the core's other
        // tasks get their turn.
        let mut writes_left: Option<usize> = None;
        loop {
            while handled < DISPATCH_BATCH_MESSAGES && deliveries < DISPATCH_BATCH_DELIVERIES {
                let Ok(item) = rx.try_recv() else { break };
                handled += 1;
                let msg = match item {
                    ToCore::Message(msg) => msg,
                    ToCore::Direct { key, serial, msg } => {
                        let Some(conn) = conns
                            .get_mut(key as usize)
                            .filter(|c| c.serial == serial && !c.dead)
                        else {
                            crate::ops::metrics::note_direct_undelivered();
                            continue;
                        };
                        let Some(frame) = self.direct_frame(conn, key, &msg) else {
                            crate::ops::metrics::note_direct_undelivered();
                            continue;
                        };
                        if conn.state.ws_deflate().is_some() {
                            deflate_saved += (msg.ws.len() - frame.len()) as u64;
                        }
                        deliveries += 1;
                        delivered_bytes += frame.len() as u64;
                        stage_for_pass(conn, key, frame, &mut stage, &mut dirty, cfg);
                        continue;
                    }
                    ToCore::Unsubscribed(name) => {
                        let published = self.published_through.load(Ordering::Acquire);
                        if let Some(subscribers) = registry.forget(&name, published) {
                            // Subscribed while ingest let the channel go: they
                            // may miss what was published before it subscribes
                            // again, and are told so (each gap encoded once per
                            // transport, shared like a message).
                            let (mut ws_gap, mut sse_gap, mut grpc_gap) =
                                (None, None::<Bytes>, None);
                            for &key in subscribers {
                                let Some(conn) = conns.get_mut(key as usize) else {
                                    continue;
                                };
                                let gap = match conn.transport() {
                                    Transport::WebSocket => ws_gap
                                        .get_or_insert_with(|| {
                                            let mut out = Vec::new();
                                            envelope::encode_ws_gap(&name, &mut out);
                                            Bytes::from(out)
                                        })
                                        .clone(),
                                    Transport::Sse => sse_bytes(
                                        sse_gap.get_or_insert_with(|| {
                                            let mut event = Vec::new();
                                            envelope::encode_sse_gap(&name, &mut event);
                                            let mut out = Vec::new();
                                            protocol::sse::push_chunk(&mut out, &event);
                                            Bytes::from(out)
                                        }),
                                        conn.sse_chunked(),
                                    ),
                                    Transport::GrpcStream => grpc_gap
                                        .get_or_insert_with(|| {
                                            Bytes::from(protocol::grpc::gap_message(&name))
                                        })
                                        .clone(),
                                    // A held poll is told with its next message.
                                    Transport::LongPoll => {
                                        poll_gaps.entry(key).or_default().push(name.clone());
                                        continue;
                                    }
                                    _ => continue,
                                };
                                stage_for_pass(conn, key, gap, &mut stage, &mut dirty, cfg);
                            }
                        }
                        continue;
                    }
                };
                let (id, renumbered) =
                    registry.record(&msg, cfg.history_messages, cfg.channels_max);
                let ch = &registry.channels[id as usize];
                let delivered_before = deliveries;
                // This core's own handle of the frames, for a channel with many
                // subscribers here: the clones below then count references on
                // a cache line no other core touches, one copy per core instead
                // of an atomic shared by every core per delivery.
                let local = ch.subscribers.len() >= LOCAL_COPY_SUBSCRIBERS_MIN;
                let own = |shared: &Bytes| {
                    if local {
                        Bytes::copy_from_slice(shared)
                    } else {
                        shared.clone()
                    }
                };
                let (mut ws_frame, mut sse_frame, mut grpc_frame) = (None, None, None);
                // For connections that negotiated permessage-deflate, per
                // window: compressed once per message (shared by the cores).
                let mut ws_deflated: [Option<Bytes>; 2] = [None, None];
                for &key in &ch.subscribers {
                    let Some(conn) = conns.get_mut(key as usize) else {
                        continue;
                    };
                    if renumbered && conn.skip_through >= GATEWAY_ID_FLOOR {
                        // Waiting since before the channel's first message
                        // with a cursor of this gateway's sequence ("nothing
                        // yet"): the publisher's ids are below it.
                        conn.skip_through = 0;
                    }
                    if msg.id <= conn.skip_through || conn.dead {
                        continue;
                    }
                    let frame = match conn.transport() {
                        Transport::WebSocket => match conn.state.ws_deflate() {
                            None => ws_frame.get_or_insert_with(|| own(&msg.ws)).clone(),
                            Some(window) => {
                                let frame = ws_deflated[window as usize]
                                    .get_or_insert_with(|| own(self.ws_frame(&msg, Some(window))))
                                    .clone();
                                deflate_saved += (msg.ws.len() - frame.len()) as u64;
                                frame
                            }
                        },
                        Transport::Sse => sse_bytes(
                            sse_frame.get_or_insert_with(|| own(&msg.sse)),
                            conn.sse_chunked(),
                        ),
                        Transport::GrpcStream => {
                            grpc_frame.get_or_insert_with(|| own(msg.grpc())).clone()
                        }
                        Transport::LongPoll
                            if matches!(
                                conn.state,
                                State::LongPoll {
                                    answer: PollAnswer::Waiting,
                                    ..
                                }
                            ) =>
                        {
                            if let State::LongPoll { answer, .. } = &mut conn.state {
                                *answer = PollAnswer::Queued;
                            }
                            conn.wake();
                            let gaps = if poll_gaps.is_empty() {
                                None
                            } else {
                                poll_gaps.remove(&key)
                            };
                            if let Some(gaps) = gaps {
                                // Its own answer: the gaps, this message, and
                                // this message's id as the cursor.
                                let lines = self.cors_lines(key, conn.cors);
                                let gaps: Vec<&str> = gaps.iter().map(|g| &**g).collect();
                                let mut out = Vec::new();
                                envelope::longpoll_response(
                                    &[msg.poll_item()],
                                    msg.id,
                                    &gaps,
                                    true,
                                    &lines,
                                    &mut out,
                                );
                                Bytes::from(out)
                            } else {
                                let head: &[Bytes] = match conn.cors {
                                    0 => &[],
                                    PATTERN_SLOT => match cors_by_conn.get(&key) {
                                        Some(lines) => &[
                                            Bytes::from_static(envelope::LONGPOLL_STATUS_LINE),
                                            lines.clone(),
                                        ],
                                        None => &[],
                                    },
                                    n => self
                                        .cors_poll_heads
                                        .get(usize::from(n) - 1)
                                        .map_or(&[], std::slice::from_ref),
                                };
                                if head.is_empty() {
                                    msg.poll_response().clone()
                                } else {
                                    // This client's status line and CORS lines,
                                    // then the shared response after its own.
                                    for part in head {
                                        delivered_bytes += part.len() as u64;
                                        events::stage(
                                            conn,
                                            &mut stage,
                                            part.clone(),
                                            cfg.outbound_queue_bytes_max,
                                        );
                                    }
                                    msg.poll_response()
                                        .slice(envelope::LONGPOLL_STATUS_LINE.len()..)
                                }
                            }
                        }
                        Transport::LongPoll
                        | Transport::Http
                        | Transport::Closing
                        | Transport::Grpc => continue,
                    };
                    deliveries += 1;
                    delivered_bytes += frame.len() as u64;
                    stage_for_pass(conn, key, frame, &mut stage, &mut dirty, cfg);
                }
                if deliveries > delivered_before {
                    stamps.push(msg.stamped);
                }
            }
            let share =
                writes_left.get_or_insert((dirty.len() - written).max(WRITES_BETWEEN_INTAKES));
            let stretch = dirty
                .len()
                .min(written + WRITES_BETWEEN_INTAKES.min(*share));
            *share -= stretch - written;
            for &key in &dirty[written..stretch] {
                if let Some(conn) = conns.get_mut(key as usize) {
                    conn.dirty = false;
                    if conn.staged != conn::NOT_STAGED {
                        events::write_staged(conn, &stage);
                    } else if !conn.blocked {
                        events::write(conn);
                    }
                }
            }
            written = stretch;
            if written == dirty.len() || *share == 0 {
                break;
            }
        }
        if written == dirty.len() {
            dirty.clear();
            written = 0;
        } else {
            // The pass goes on in the next call. The stage is this call's:
            // what the connections not yet written have in it moves to
            // their queues, so that anything written to them meanwhile (a
            // heartbeat, a close) goes out behind it.
            for &key in &dirty[written..] {
                if let Some(conn) = conns.get_mut(key as usize) {
                    events::unstage(conn, &stage);
                }
            }
        }
        self.pass_at.set(written);
        stage.clear();
        // Once per message per batch, after its writes: never per delivery.
        if !stamps.is_empty() {
            let now = Instant::now();
            for stamp in stamps.drain(..) {
                let latency = now.saturating_duration_since(stamp);
                self.stats.observe_latency(latency);
            }
        }
        self.stats.delivered(deliveries, delivered_bytes);
        if deflate_saved > 0 {
            self.stats.deflate_saved(deflate_saved);
        }
        handled
    }

    /// What a message for one connection is on its transport: the shared
    /// frame on a stream, a whole answer (with the poll's own cursor, as
    /// the message has no id) for a held long-poll. None when it cannot
    /// take one now (between requests, closing).
    fn direct_frame(&self, conn: &mut Conn, key: u32, msg: &Message) -> Option<Bytes> {
        match conn.transport() {
            Transport::WebSocket => Some(self.ws_frame(msg, conn.state.ws_deflate()).clone()),
            Transport::Sse => Some(sse_bytes(&msg.sse, conn.sse_chunked())),
            Transport::GrpcStream => Some(msg.grpc().clone()),
            Transport::LongPoll => {
                let State::LongPoll {
                    answer: answer @ PollAnswer::Waiting,
                    cursor,
                    ..
                } = &mut conn.state
                else {
                    return None;
                };
                *answer = PollAnswer::Queued;
                let cursor = *cursor;
                conn.wake();
                let mut out = Vec::new();
                envelope::longpoll_response(
                    &[msg.poll_item()],
                    cursor,
                    &[],
                    true,
                    &self.cors_lines(key, conn.cors),
                    &mut out,
                );
                Some(Bytes::from(out))
            }
            Transport::Http | Transport::Closing | Transport::Grpc => None,
        }
    }

    /// Once a second: expire deadlines, send the heartbeats that are due
    /// and close WebSockets that stopped answering them. One pass over the
    /// slab instead of a timer per connection (a monoio timer costs more
    /// than the connection).
    fn sweep(&self) {
        let now = self.now_s();
        let cfg = self.cfg;
        let interval_s = cfg.heartbeat_interval_s();
        let silence_s_max = cfg.ws_silence_s_max();
        let mut silent = 0u64;
        let mut expired = 0u64;
        let mut by_transport = [0u64; crate::ops::metrics::TRANSPORTS.len()];
        let mut deflating = 0;
        for (_, conn) in self.conns.borrow_mut().iter_mut() {
            by_transport[conn.transport().metrics_slot()] += 1;
            deflating += u64::from(conn.state.ws_deflate().is_some());
            if conn.dead {
                continue;
            }
            if conn.auth_expires_s != 0
                && conn.auth_expires_s <= now
                && matches!(
                    conn.transport(),
                    Transport::WebSocket | Transport::Sse | Transport::GrpcStream
                )
            {
                debug!(fd = conn.fd, transport = ?conn.transport(), "token expired, closing");
                if let Some(farewell) = conn.token_expired() {
                    events::send(conn, farewell, cfg.outbound_queue_bytes_max);
                }
                expired += 1;
                continue;
            }
            let beat = match conn.transport() {
                Transport::WebSocket => WS_PING,
                Transport::Sse if conn.sse_chunked() => SSE_HEARTBEAT_CHUNK,
                Transport::Sse => SSE_HEARTBEAT,
                // Its connection's task sends HTTP/2 PINGs.
                Transport::Grpc | Transport::GrpcStream => continue,
                Transport::Closing => {
                    // Lingering past its deadline: closed now.
                    if conn.parked && conn.deadline_s != 0 && conn.deadline_s <= now {
                        conn.dead = true;
                        conn.wake();
                    }
                    continue;
                }
                Transport::Http | Transport::LongPoll => {
                    if conn.deadline_s == 0 || conn.deadline_s > now {
                        continue;
                    }
                    conn.deadline_s = 0;
                    match conn.state {
                        State::Request => {
                            if conn.with_tls(|t| t.is_handshaking()) == Some(true) {
                                crate::tls::Handshake::Timeout.count();
                                debug!(
                                    fd = conn.fd,
                                    "TLS handshake not done within the head timeout, closing"
                                );
                            } else {
                                debug!(fd = conn.fd, "request head deadline passed, closing");
                            }
                            conn.dead = true;
                        }
                        State::LongPoll { ref mut answer, .. }
                            if *answer == PollAnswer::Waiting =>
                        {
                            *answer = PollAnswer::TimedOut
                        }
                        _ => {}
                    }
                    conn.wake();
                    continue;
                }
            };
            if let State::WebSocket { session, .. } = &conn.state {
                if two_way::paused(session) {
                    // Not read while the hubs are behind: not silent.
                    conn.last_heard_s = now;
                }
            }
            if conn.transport() == Transport::WebSocket
                && silence_s_max.is_some_and(|max| now.wrapping_sub(conn.last_heard_s) > max)
            {
                conn.going(conn::Gone::DeadPeer);
                debug!(
                    fd = conn.fd,
                    "websocket silent past the pong timeout, closing"
                );
                silent += 1;
                conn.dead = true;
                conn.wake();
                continue;
            }
            let Some(interval_s) = interval_s else {
                continue;
            };
            if conn.deadline_s == 0 || conn.deadline_s > now {
                continue;
            }
            conn.deadline_s = now + interval_s;
            // Behind a full socket the heartbeat waits its turn: queued
            // bytes are traffic too, and the client answers the ping once it
            // has read what came before.
            events::send(conn, Bytes::from_static(beat), cfg.outbound_queue_bytes_max);
        }
        if expired > 0 {
            info!(
                core = self.index,
                closed = expired,
                "streams closed: token expired (websocket close 4001)"
            );
        }
        if silent > 0 {
            info!(
                core = self.index,
                closed = silent,
                "websockets closed as dead peers: nothing heard within heartbeat interval + pong timeout"
            );
        }
        for (refusal, count) in self.admission.take_refused() {
            warn!(
                core = self.index,
                refused = count,
                reason = refusal.reason(),
                "new connections refused in the last second (503; on a TLS listener closed unanswered)"
            );
        }
        // An edge of the upstream socket's descriptor is not seen again
        // once missed: look once a second.
        self.flush_upstream();
        let now_ms = self.clock_ms();
        self.post_budgets
            .borrow_mut()
            .retain(|_, budget| !budget.is_full(now_ms));
        let mut snapshot = self.stats.snapshot(by_transport);
        snapshot.history_evictions = self.registry.borrow().evictions;
        snapshot.ws_deflate_connections = deflating;
        crate::ops::metrics::publish(self.index, snapshot);
        if crate::ops::drain::draining() {
            self.drain_step();
        }
    }

    /// One second of a drain: asks this second's share of the connections
    /// not yet asked to go, so that the last are asked in the last second of
    /// the window (the n-th sweep of a window of w seconds asks 1/(w-n) of
    /// those left). Connections that go on their own, or arrive, only
    /// change the share. No timer per connection: this is the sweep.
    fn drain_step(&self) {
        let sweep = self.drain_sweeps.get();
        self.drain_sweeps.set(sweep + 1);
        let seconds_left = self.cfg.drain_window_s().saturating_sub(sweep).max(1);
        let mut conns = self.conns.borrow_mut();
        let candidate =
            |c: &Conn| !c.dead && c.drain == Drain::No && c.transport() != Transport::Closing;
        let open = conns.iter().filter(|(_, c)| candidate(c)).count();
        let share = open.div_ceil(seconds_left as usize);
        let mut asked = 0;
        for (_, conn) in conns.iter_mut() {
            if asked == share {
                break;
            }
            if candidate(conn) {
                if let Some(farewell) = conn.ask_to_go() {
                    events::send(conn, farewell, self.cfg.outbound_queue_bytes_max);
                }
                asked += 1;
            }
        }
        crate::ops::drain::note_asked(asked as u64);
        debug!(
            core = self.index,
            sweep,
            asked,
            not_asked_yet = open - asked,
            "drain: connections asked to go"
        );
    }
}

/// Stages a frame for `conn` (slab key `key`) and puts it in the pass's
/// list of connections to write, once.
fn stage_for_pass(
    conn: &mut Conn,
    key: u32,
    frame: Bytes,
    stage: &mut events::Stage,
    dirty: &mut Vec<u32>,
    cfg: &Config,
) {
    events::stage(conn, stage, frame, cfg.outbound_queue_bytes_max);
    if !conn.dirty {
        conn.dirty = true;
        dirty.push(key);
    }
}

/// The peer address of a socket, looked up only for a log line.
/// Reads the core's doorbell through io_uring and dispatches whatever ingest
/// queued. Yields between batches so connection tasks are not starved.
pub async fn doorbell_loop(
    core: Rc<Core>,
    rx: Receiver<ToCore>,
    rung: Arc<AtomicBool>,
    doorbell: Arc<OwnedFd>,
) {
    // The eventfd travels as a monoio File: a plain io_uring read on it
    // completes when ingest writes.
    let file = match crate::sys::monoio_file(&*doorbell) {
        Ok(f) => f,
        Err(e) => {
            warn!(core = core.index, error = %e, "doorbell unusable; this core will not deliver");
            return;
        }
    };
    let mut buf = vec![0u8; 8];
    loop {
        let (res, b) = file.read_at(buf, 0).await;
        buf = b;
        if let Err(e) = res {
            if e.kind() != std::io::ErrorKind::Interrupted
                && e.kind() != std::io::ErrorKind::WouldBlock
            {
                warn!(core = core.index, error = %e, "doorbell read failed");
                return;
            }
        }
        // Clear before draining: a message queued after this point rings again.
        rung.store(false, Ordering::Release);
        loop {
            core.dispatch(&rx);
            // Stopped at a batch limit with more waiting, or with the pass
            // under way: yield, then go on (nothing will ring for what is
            // already queued).
            if rx.is_empty() && core.pass_at.get() == 0 {
                break;
            }
            yield_now().await;
        }
    }
}

/// Runs the sweep once a second and counts it in `alive`, which the systemd
/// watchdog thread reads as this core's proof of life.
pub async fn sweep_loop(core: Rc<Core>, alive: Arc<AtomicU64>) {
    loop {
        monoio::time::sleep(Duration::from_secs(1)).await;
        core.sweep();
        alive.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lets every other ready task run once.
pub async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::conn::{WS_CLOSE_SERVICE_RESTART, WS_CLOSE_SLOW_CONSUMER};
    use super::*;
    use crate::ingest::{Interest, Message};
    use protocol::id::{first_gateway_id, ID_TAG_BITS};
    use std::os::fd::AsRawFd;

    fn msg(id: u64, channel: &str) -> Arc<Message> {
        Arc::new(Message::encode(id, channel, None, b"x"))
    }

    fn publish(reg: &mut Registry, m: Arc<Message>, history: usize) {
        reg.record(&m, history, 100);
    }

    #[test]
    fn a_cursor_from_another_process_is_a_gap_even_where_the_numbers_overlap() {
        // This process (tag 7) started a second before another (tag 9), and
        // has since issued more ids than that second's worth of counter: the
        // other process's ids fall inside this one's range.
        let first_id = first_gateway_id(1_800_000_000_000, 7);
        let mut reg = Registry::new(first_id, None);
        let mine: Vec<u64> = (1..=3)
            .map(|n| ((1_800_000_001_000 + n) << ID_TAG_BITS) | 7)
            .collect();
        for &id in &mine {
            publish(&mut reg, msg(id, "a"), 10);
        }
        let names = vec!["a".to_string()];
        let theirs = ((1_800_000_001_001) << ID_TAG_BITS) | 9;
        assert!(first_id < theirs && theirs < mine[2]);
        let (_, r) = reg.subscribe(1, &names, Some(theirs), mine[2], 100, 100);
        assert_eq!(r.gaps.len(), 1, "another process's cursor is a gap");
        assert!(r.reset);
        assert_eq!(r.messages.len(), 3, "then the whole history");
        // The same number with this process's tag is a position: no gap.
        let (_, r) = reg.subscribe(2, &names, Some(mine[0]), mine[2], 100, 100);
        assert!(r.gaps.is_empty() && !r.reset);
        assert_eq!(
            r.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            &mine[1..]
        );
    }

    #[test]
    fn a_cursor_of_the_gateways_own_sequence_on_a_publisher_channel_restarts_it() {
        let first_id = first_gateway_id(1_800_000_000_000, 7);
        let mut reg = Registry::new(first_id, None);
        let names = vec!["p".to_string()];
        // A long-poll on the channel before it had a message: its cursor
        // is this gateway's "nothing yet".
        let (_, r) = reg.subscribe(1, &names, None, first_id, 100, 100);
        assert_eq!(r.present, first_id);
        // The publisher numbers from 1: the first message says so.
        assert!(reg.record(&pmsg(1, "p"), 10, 100).1);
        assert!(!reg.record(&pmsg(2, "p"), 10, 100).1);
        // Coming back with that cursor: a gap, then everything there is.
        let (_, r) = reg.subscribe(2, &names, Some(first_id), first_id, 100, 100);
        assert_eq!(r.gaps.len(), 1);
        assert_eq!(ids(&r), [1, 2]);
        assert!(r.reset);
        // A publisher whose ids are microsecond timestamps is another
        // matter: such a cursor is a position in its sequence.
        let mut reg = Registry::new(first_id, None);
        let us = 1_700_000_000_000_000;
        publish(&mut reg, pmsg(us + 5, "p"), 10);
        let (_, r) = reg.subscribe(1, &names, Some(us + 9), first_id, 100, 100);
        assert!(r.gaps.is_empty() && r.messages.is_empty() && !r.reset);
    }

    #[test]
    fn a_cursor_from_the_future_is_a_gap_then_the_whole_history_and_no_skipping() {
        let mut reg = Registry::new(10, None);
        publish(&mut reg, msg(11, "a"), 10);
        publish(&mut reg, msg(12, "a"), 10);
        let names = vec!["a".to_string()];
        let (_, r) = reg.subscribe(1, &names, Some(99), 12, 100, 100);
        assert_eq!(r.gaps.len(), 1);
        assert_eq!(ids(&r), [11, 12]);
        assert!(r.reset);
        let (_, r) = reg.subscribe(2, &names, Some(11), 12, 100, 100);
        assert!(!r.reset && r.gaps.is_empty());
    }

    /// A message whose id the publisher gave.
    fn pmsg(id: u64, channel: &str) -> Arc<Message> {
        let mut m = Message::encode(id, channel, None, b"x");
        m.from_publisher = true;
        Arc::new(m)
    }

    fn ids(r: &Resume) -> Vec<u64> {
        r.messages.iter().map(|m| m.id).collect()
    }

    #[test]
    fn publisher_ids_are_known_from_the_first_message_this_core_saw() {
        // This process started at 1_000_000 (its own ids would follow that);
        // the publisher numbers its messages from 1.
        let mut reg = Registry::new(1_000_000, None);
        let names = vec!["p".to_string()];
        for id in 5..=8 {
            publish(&mut reg, pmsg(id, "p"), 10);
        }
        // From the message before the first one seen: complete.
        let (_, r) = reg.subscribe(1, &names, Some(4), 1_000_000, 100, 100);
        assert!(r.gaps.is_empty());
        assert_eq!(ids(&r), [5, 6, 7, 8]);
        assert_eq!(r.present, 8);
        let (_, r) = reg.subscribe(2, &names, Some(6), 1_000_000, 100, 100);
        assert!(r.gaps.is_empty());
        assert_eq!(ids(&r), [7, 8]);
        // From before it: what came between is unknown here.
        let (_, r) = reg.subscribe(3, &names, Some(3), 1_000_000, 100, 100);
        assert_eq!(r.gaps.len(), 1);
        assert_eq!(ids(&r), [5, 6, 7, 8]);
        // Ahead of this core (another gateway got it first): taken at its
        // word, not a gap, nothing to replay.
        let (_, r) = reg.subscribe(4, &names, Some(20), 8, 100, 100);
        assert!(r.gaps.is_empty() && r.messages.is_empty());
        // The history still bounds what can be replayed.
        for id in 9..=20 {
            publish(&mut reg, pmsg(id, "p"), 10);
        }
        let (_, r) = reg.subscribe(5, &names, Some(9), 1_000_000, 100, 100);
        assert_eq!(r.gaps.len(), 1, "10 was evicted");
        assert_eq!(ids(&r), (11..=20).collect::<Vec<_>>());
        let (_, r) = reg.subscribe(6, &names, Some(10), 1_000_000, 100, 100);
        assert!(r.gaps.is_empty());
    }

    #[test]
    fn a_channel_entered_by_a_subscriber_learns_the_publisher_sequence_from_its_first_message() {
        let mut reg = Registry::new(1_000_000, None);
        let names = vec!["p".to_string()];
        // No message yet: nothing is known, a small cursor is a gap.
        let (_, r) = reg.subscribe(1, &names, Some(41), 1_000_000, 100, 100);
        assert_eq!(r.gaps.len(), 1);
        assert_eq!(r.present, 1_000_000);
        publish(&mut reg, pmsg(42, "p"), 10);
        let (_, r) = reg.subscribe(2, &names, Some(41), 1_000_000, 100, 100);
        assert!(r.gaps.is_empty());
        assert_eq!(ids(&r), [42]);
        assert_eq!(r.present, 42);
    }

    #[test]
    fn present_is_where_the_subscribed_channels_stand() {
        let mut reg = Registry::new(10, None);
        publish(&mut reg, msg(11, "a"), 10);
        publish(&mut reg, msg(12, "b"), 10);
        let a = vec!["a".to_string()];
        assert_eq!(reg.subscribe(1, &a, None, 12, 100, 100).1.present, 11);
        let ab = vec!["a".to_string(), "b".to_string(), "new".to_string()];
        assert_eq!(reg.subscribe(2, &ab, None, 12, 100, 100).1.present, 12);
        let new = vec!["other".to_string()];
        assert_eq!(reg.subscribe(3, &new, None, 12, 100, 100).1.present, 10);
    }

    #[test]
    fn resume_replays_after_cursor_in_id_order_across_channels() {
        let mut reg = Registry::new(10, None);
        for (id, ch) in [(11, "a"), (12, "b"), (13, "a"), (14, "c"), (15, "b")] {
            publish(&mut reg, msg(id, ch), 10);
        }
        let names = vec!["a".to_string(), "b".to_string()];
        let (_, r) = reg.subscribe(1, &names, Some(11), 15, 100, 100);
        let ids: Vec<u64> = r.messages.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![12, 13, 15]);
        assert!(r.gaps.is_empty());
    }

    #[test]
    fn a_cursor_the_history_does_not_cover_is_a_gap() {
        let mut reg = Registry::new(10, None);
        for id in 11..=20 {
            publish(&mut reg, msg(id, "a"), 3);
        }
        let names = vec!["a".to_string()];
        let (_, r) = reg.subscribe(1, &names, Some(12), 20, 100, 100);
        assert_eq!(&*r.gaps, &["a".into()] as &[Box<str>]);
        assert_eq!(
            r.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![18, 19, 20]
        );
        // The cursor exactly at the eviction point is still covered.
        let (_, r) = reg.subscribe(2, &names, Some(17), 20, 100, 100);
        assert!(r.gaps.is_empty());
        // From before this process started, or from the future: a gap.
        let other = vec!["never".to_string()];
        assert_eq!(
            reg.subscribe(3, &other, Some(5), 20, 100, 100).1.gaps.len(),
            1
        );
        assert_eq!(
            reg.subscribe(4, &names, Some(21), 20, 100, 100)
                .1
                .gaps
                .len(),
            1
        );
        assert!(reg
            .subscribe(5, &other, Some(20), 20, 100, 100)
            .1
            .gaps
            .is_empty());
    }

    #[test]
    fn a_channel_let_go_upstream_cannot_be_resumed_from_before_and_reports_interest() {
        let (tx, rx) = crate::ingest::interest_channel().unwrap();
        let mut reg = Registry::new(10, Some(tx));
        let names = vec!["a".to_string()];
        // First subscriber on this core: ingest hears of it; the second
        // changes nothing; the last one leaving is news again.
        let (ids, _) = reg.subscribe(1, &names, None, 10, 100, 100);
        reg.subscribe(2, &names, None, 10, 100, 100);
        for id in 11..=13 {
            publish(&mut reg, msg(id, "a"), 10);
        }
        reg.unsubscribe(1, &ids);
        reg.unsubscribe(2, &ids);
        let news: Vec<Interest> = rx.rx_for_tests().try_iter().collect();
        assert_eq!(
            news,
            vec![Interest::On("a".into()), Interest::Off("a".into())]
        );
        // Within the linger, a resume is served from history.
        let (ids, r) = reg.subscribe(3, &names, Some(11), 13, 100, 100);
        assert!(r.gaps.is_empty());
        assert_eq!(ids_of(&r), vec![12, 13]);
        reg.unsubscribe(3, &ids);
        // Ingest let it go while messages up to 20 went elsewhere: a cursor
        // from before is a gap, though the numbers look close.
        assert!(reg.forget("a", 20).is_none());
        let (_, r) = reg.subscribe(4, &names, Some(13), 20, 100, 100);
        assert_eq!(r.gaps.len(), 1);
        assert!(r.messages.is_empty());
        // A channel with a subscriber when it is let go keeps it (ingest
        // subscribes again) but not its history.
        publish(&mut reg, msg(21, "a"), 10);
        let subscribers: Vec<u32> = reg.forget("a", 21).unwrap().iter().copied().collect();
        assert_eq!(subscribers, vec![4]);
        let (_, r) = reg.subscribe(5, &names, Some(20), 21, 100, 100);
        assert_eq!(r.gaps.len(), 1);
        assert!(r.messages.is_empty());
    }

    /// Wakes a flag, as a call's task would be woken.
    struct Flag(std::sync::atomic::AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_grpc_call_gets_each_message_once_encoded_and_its_task_is_woken() {
        let core = Core::lone(Box::leak(Box::default()), 7);
        let calls: Vec<u32> = (0..2)
            .map(|_| core.register_stream(([127, 0, 0, 1], 1).into()))
            .collect();
        let flags: Vec<Arc<Flag>> = calls
            .iter()
            .map(|&key| {
                let resume = core.subscribe(key, &["a".into()], None, Transport::GrpcStream, 10);
                assert!(resume.messages.is_empty() && resume.gaps.is_empty());
                let flag = Arc::new(Flag(AtomicBool::new(false)));
                core.with_conn(key, |c| c.waker = Some(flag.clone().into()));
                flag
            })
            .collect();
        // Calls are not connections (admission, /healthz).
        assert_eq!(core.conn_counts[0].load(Ordering::Relaxed), 0);
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(ToCore::Message(msg(8, "a"))).unwrap();
        tx.send(ToCore::Unsubscribed("a".into())).unwrap();
        core.dispatch(&rx);
        let mut fronts = Vec::new();
        for (&key, flag) in calls.iter().zip(&flags) {
            assert!(flag.0.load(Ordering::SeqCst), "the call's task is woken");
            let (message, gap) = core.with_conn(key, |c| {
                let message = c.take_front().expect("the message");
                let gap = c.take_front().expect("the gap");
                assert!(c.take_front().is_none());
                assert_eq!(c.queued_bytes, 0, "what the task took left the budget");
                (message, gap)
            });
            let (bytes, _) = protocol::grpc::next_message(&message, 1 << 20)
                .unwrap()
                .unwrap();
            let frame = protocol::grpc::decode_server_frame(bytes).unwrap();
            let Some(protocol::grpc::server_frame::Kind::Message(m)) = frame.kind else {
                panic!("{frame:?}");
            };
            assert_eq!(
                (m.channel.as_str(), m.id, &m.payload[..]),
                ("a", 8, &b"x"[..])
            );
            assert_eq!(&gap[..], &protocol::grpc::gap_message("a")[..]);
            fronts.push(message);
        }
        // Encoded once, the same bytes for both.
        assert_eq!(fronts[0].as_ptr(), fronts[1].as_ptr());
        for key in calls {
            core.deregister(key);
        }
        assert!(core.conns.borrow().is_empty());
    }

    #[test]
    fn a_grpc_call_over_its_budget_is_a_slow_consumer_and_drain_and_expiry_are_told() {
        let cfg: &'static Config = Box::leak(Box::new(Config {
            outbound_queue_bytes_max: 1024,
            ..Config::default()
        }));
        let core = Core::lone(cfg, 7);
        let key = core.register_stream(([127, 0, 0, 1], 1).into());
        core.with_conn(key, |c| {
            for _ in 0..4 {
                events::push(c, Bytes::from(vec![0u8; 300]), cfg.outbound_queue_bytes_max);
            }
            assert!(c.dead);
            assert_eq!(c.gone, conn::Gone::SlowConsumer);
            assert!(c.take_front().is_none(), "its queue is freed");
        });
        let key = core.register_stream(([127, 0, 0, 1], 1).into());
        core.with_conn(key, |c| {
            assert!(
                c.ask_to_go().is_none(),
                "the call's task says it (UNAVAILABLE)"
            );
            assert_eq!((c.drain, c.gone), (Drain::Asked, conn::Gone::Drain));
            assert_eq!(
                c.transport(),
                Transport::GrpcStream,
                "still a call until it ends"
            );
        });
        let key = core.register_stream(([127, 0, 0, 1], 1).into());
        core.with_conn(key, |c| {
            assert!(c.token_expired().is_none());
            assert_eq!((c.drain, c.gone), (Drain::Asked, conn::Gone::TokenExpired));
            assert_eq!(c.transport(), Transport::GrpcStream);
        });
    }

    #[test]
    fn subscribers_of_a_channel_let_go_upstream_are_told_of_the_gap() {
        use std::io::Read;
        let core = Core::lone(Box::leak(Box::default()), 7);
        let mut peers = Vec::new();
        for transport in [Transport::WebSocket, Transport::Sse, Transport::LongPoll] {
            let (_, a, b) = subscribed_to_a(&core, transport);
            b.set_nonblocking(true).unwrap();
            peers.push((a, b));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(ToCore::Unsubscribed("a".into())).unwrap();
        core.dispatch(&rx);
        let mut got = Vec::new();
        for (_, b) in &mut peers[..2] {
            let mut buf = vec![0u8; 4096];
            let n = b.read(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert!(
            got[0].ends_with("{\"channel\":\"a\",\"gap\":true}\n"),
            "{:?}",
            got[0]
        );
        // One chunk of the SSE stream's body.
        let event = got[1].split_once("\r\n").map_or("", |(_, e)| e);
        assert!(event.starts_with("event: gap\ndata: "), "{:?}", got[1]);
        assert!(event.ends_with("\n\n\r\n"), "{:?}", got[1]);
        // The held poll is told with the next message, whose id is its
        // cursor (an answer now could only carry this gateway's position).
        let mut buf = vec![0u8; 4096];
        let held = peers[2].1.read(&mut buf);
        assert!(
            matches!(&held, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{held:?}"
        );
        tx.send(ToCore::Message(msg(8, "a"))).unwrap();
        core.dispatch(&rx);
        let n = peers[2].1.read(&mut buf).unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(
            answer.ends_with(
                "{\"cursor\":\"8\",\"messages\":[{\"channel\":\"a\",\"id\":\"8\",\"data\":\"x\"}],\"gaps\":[\"a\"]}"
            ),
            "{answer:?}"
        );
        assert!(core.poll_gaps.borrow().is_empty());
    }

    #[test]
    fn a_message_is_compressed_once_for_every_subscriber_that_negotiated_deflate() {
        let core = Core::lone(Box::leak(Box::default()), 7);
        assert_eq!(core.cfg.ws_deflate_threshold_bytes, 256);
        // Three clients with the full window, one that limited it, one
        // without permessage-deflate; their sockets are full (blocked), so
        // what each is given stays in its queue to be looked at.
        let windows = [
            Some(Window::Full),
            Some(Window::Full),
            Some(Window::Full),
            Some(Window::Small),
            None,
        ];
        let mut keys = Vec::new();
        let mut peers = Vec::new();
        for window in windows {
            let (key, a, b) = subscribed_to_a(&core, Transport::WebSocket);
            let mut conns = core.conns.borrow_mut();
            let c = &mut conns[key as usize];
            if let Some(window) = window {
                c.state.negotiated_deflate(window);
            }
            c.blocked = true;
            keys.push(key);
            peers.push((a, b));
        }
        let json = br#"{"symbol":"ACME","bid":101.25,"ask":101.5,"size":300}"#.repeat(20);
        let big = Arc::new(Message::encode(8, "a", None, &json));
        let small = Arc::new(Message::encode(9, "a", None, b"{\"short\":true}"));
        let (tx, rx) = crossbeam_channel::unbounded();
        for m in [&big, &small] {
            tx.send(ToCore::Message(m.clone())).unwrap();
        }
        assert_eq!(core.dispatch(&rx), 2);
        let conns = core.conns.borrow();
        let queued =
            |i: usize| -> Vec<Bytes> { conns[keys[i] as usize].queue.iter().cloned().collect() };
        let full = big.ws_deflated(Window::Full, 256, &core.deflater).clone();
        let narrow = big.ws_deflated(Window::Small, 256, &core.deflater).clone();
        for i in 0..3 {
            let got = queued(i);
            // The same bytes, not a copy each: compressed once.
            assert_eq!(got[0].as_ptr(), full.as_ptr(), "subscriber {i}");
            assert_eq!(
                got[1].as_ptr(),
                small.ws.as_ptr(),
                "under the threshold: plain"
            );
        }
        assert_eq!(queued(3)[0].as_ptr(), narrow.as_ptr());
        assert_ne!(full, narrow);
        assert_eq!(queued(4)[0].as_ptr(), big.ws.as_ptr());
        // What the clients read: RSV1 on a text frame, and the message once
        // decompressed.
        let payload = |frame: &Bytes| {
            let head = match frame[1] {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            frame.slice(head..)
        };
        for frame in [&full, &narrow] {
            assert_eq!(frame[0], 0xC1, "FIN, RSV1, text");
            assert!(
                frame.len() * 4 < big.ws.len(),
                "{} of {}",
                frame.len(),
                big.ws.len()
            );
            let mut inflater = protocol::deflate::Inflater::default();
            let inflated = inflater
                .inflate(&payload(frame), 1 << 20)
                .map(Bytes::copy_from_slice);
            assert!(inflated == Ok(payload(&big.ws)), "{inflated:?}");
        }
        assert_eq!(
            core.stats
                .snapshot(Default::default())
                .ws_deflate_saved_bytes,
            (3 * (big.ws.len() - full.len()) + big.ws.len() - narrow.len()) as u64
        );
    }

    /// A connection's state for a kind of traffic, as tests set it.
    /// A connection on one end of a socket pair, subscribed to channel
    /// `a` as `transport`: its key and both ends.
    fn subscribed_to_a(
        core: &Core,
        transport: Transport,
    ) -> (
        u32,
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
    ) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let key = core.register(a.as_raw_fd(), ([127, 0, 0, 1], 1).into());
        let (ids, _) =
            core.registry
                .borrow_mut()
                .subscribe(key, &["a".to_string()], None, 7, 100, 10);
        let mut conns = core.conns.borrow_mut();
        conns[key as usize].channels = ids;
        conns[key as usize].state = state_of(transport);
        (key, a, b)
    }

    fn state_of(transport: Transport) -> State {
        match transport {
            Transport::Http => State::Request,
            Transport::WebSocket => State::websocket(1024, None),
            Transport::Sse => State::Sse { chunked: true },
            Transport::LongPoll => State::LongPoll {
                answer: PollAnswer::Waiting,
                cursor: 0,
                keep_alive: true,
            },
            Transport::Closing => State::Closing { shut_wr: false },
            Transport::Grpc => State::Http2,
            Transport::GrpcStream => State::GrpcStream { two_way: None },
        }
    }

    /// A lone core (index 0 of 1) with no interest queue, at
    /// `published_through`.
    fn ids_of(r: &Resume) -> Vec<u64> {
        r.messages.iter().map(|m| m.id).collect()
    }

    #[test]
    fn a_cursor_from_before_this_process_is_a_gap_even_on_a_channel_it_knows() {
        let mut reg = Registry::new(100, None);
        publish(&mut reg, msg(101, "a"), 10);
        let names = vec!["a".to_string()];
        let (_, r) = reg.subscribe(1, &names, Some(99), 101, 100, 100);
        assert_eq!(r.gaps.len(), 1);
        assert_eq!(r.messages.len(), 1);
        let (_, r) = reg.subscribe(2, &names, Some(100), 101, 100, 100);
        assert!(r.gaps.is_empty());
    }

    #[test]
    fn channel_table_is_bounded_and_remembers_what_it_forgot() {
        let mut reg = Registry::new(0, None);
        let keep = vec!["busy".to_string()];
        reg.subscribe(1, &keep, None, 0, 2, 100);
        publish(&mut reg, msg(1, "old"), 10);
        // "busy" has a subscriber, so "old" is the one evicted.
        let id = reg.id_of("new", 2);
        assert!(reg.ids.contains_key("busy") && !reg.ids.contains_key("old"));
        assert_eq!(reg.channels.len(), 2);
        assert!(id < 3);
        let old = vec!["old".to_string()];
        assert_eq!(reg.subscribe(2, &old, Some(0), 1, 3, 100).1.gaps.len(), 1);
    }

    #[test]
    fn unsubscribing_the_last_listener_of_an_unused_name_frees_it() {
        let mut reg = Registry::new(0, None);
        let names = vec!["made-up".to_string()];
        let (ids, _) = reg.subscribe(1, &names, None, 0, 10, 100);
        reg.unsubscribe(1, &ids);
        assert!(reg.ids.is_empty() && reg.channels.is_empty());
    }

    #[test]
    fn flush_writes_queued_frames_in_order_and_stops_at_a_full_socket() {
        use std::io::Read;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut conn = Conn::new(a.as_raw_fd(), 0, ([127, 0, 0, 1], 1).into());
        events::push(&mut conn, Bytes::from_static(b"one "), 1 << 30);
        events::push(&mut conn, Bytes::from_static(b"two"), 1 << 30);
        events::write(&mut conn);
        assert!(conn.queue.is_empty() && !conn.blocked && conn.queued_bytes == 0);
        assert_eq!(
            conn.queue.capacity(),
            0,
            "an idle connection keeps no queue buffer"
        );
        let mut got = [0u8; 7];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one two");
        // Nobody reads: the socket fills, the rest stays queued, in order.
        let big = Bytes::from(vec![7u8; 1 << 20]);
        for _ in 0..8 {
            events::push(&mut conn, big.clone(), 1 << 30);
        }
        events::write(&mut conn);
        assert!(conn.blocked && !conn.dead);
        assert!(conn.queued_bytes > 0 && (conn.queued_bytes as usize) < 8 << 20);
    }

    #[test]
    fn a_queue_over_its_budget_marks_the_connection_dead_and_frees_it() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut conn = Conn::new(a.as_raw_fd(), 0, ([127, 0, 0, 1], 1).into());
        conn.state = State::Sse { chunked: true };
        let max = 3 << 20;
        let big = Bytes::from(vec![7u8; 1 << 20]);
        // Nobody reads: the socket fills and the rest stays queued.
        events::push(&mut conn, big.clone(), max);
        events::write(&mut conn);
        assert!(conn.blocked);
        events::push(&mut conn, big.clone(), max);
        events::push(&mut conn, big.clone(), max);
        assert!(!conn.dead);
        // What the socket took of the first frame is less than a frame.
        events::push(&mut conn, big.clone(), max);
        assert!(conn.dead);
        assert_eq!(conn.queued_bytes, 0);
        assert_eq!(
            conn.queue.capacity(),
            0,
            "a dropped consumer's queue is freed at once"
        );
        events::push(&mut conn, Bytes::from_static(b"1"), max);
        assert!(
            conn.queue.is_empty(),
            "nothing is queued on a dead connection"
        );
    }

    #[test]
    fn a_batch_over_the_budget_is_written_before_the_client_is_called_slow() {
        use std::io::Read;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut conn = Conn::new(a.as_raw_fd(), 0, ([127, 0, 0, 1], 1).into());
        conn.state = state_of(Transport::WebSocket);
        // Ten frames of 100 bytes against a budget of 250: the dispatcher
        // has not flushed yet, but the socket has room for all of them.
        for _ in 0..10 {
            events::push(&mut conn, Bytes::from(vec![1u8; 100]), 250);
        }
        events::write(&mut conn);
        assert!(!conn.dead && conn.queue.is_empty());
        let mut got = vec![0u8; 1000];
        b.read_exact(&mut got).unwrap();
    }

    #[test]
    fn a_slow_websocket_gets_the_rest_of_its_started_frame_then_close_1008() {
        use std::io::Read;
        for started in [3, 0] {
            let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
            let mut conn = Conn::new(a.as_raw_fd(), 0, ([127, 0, 0, 1], 1).into());
            conn.state = state_of(Transport::WebSocket);
            events::push(&mut conn, Bytes::from_static(b"first frame"), 64);
            events::push(&mut conn, Bytes::from_static(b"second"), 64);
            // As if the kernel had taken the first bytes of the front frame
            // before the socket filled up.
            conn.sent_of_front = started;
            conn.queued_bytes -= started;
            conn.blocked = true;
            events::push(&mut conn, Bytes::from(vec![0u8; 64]), 64);
            assert!(conn.dead && conn.queue.capacity() == 0 && conn.queued_bytes == 0);
            drop(a);
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            // The started frame is finished (the stream is never cut inside
            // a frame), frames not started are dropped, close 1008 follows.
            let mut want = b"first frame"[started as usize..].to_vec();
            if started == 0 {
                want.clear();
            }
            want.extend_from_slice(WS_CLOSE_SLOW_CONSUMER);
            assert_eq!(got, want, "started {started}");
        }
    }

    #[test]
    fn static_frames_are_what_the_codecs_would_write() {
        let mut close = Vec::new();
        protocol::ws::encode_close(
            protocol::ws::close_code::POLICY_VIOLATION,
            "slow consumer",
            &mut close,
        );
        assert_eq!(close, WS_CLOSE_SLOW_CONSUMER);
        let mut close = Vec::new();
        protocol::ws::encode_close(
            protocol::ws::close_code::SERVICE_RESTART,
            "service restart",
            &mut close,
        );
        assert_eq!(close, WS_CLOSE_SERVICE_RESTART);
        let mut ping = Vec::new();
        protocol::ws::encode_frame(protocol::ws::OpCode::Ping, &[], &mut ping);
        assert_eq!(ping, WS_PING);
        let mut beat = Vec::new();
        protocol::sse::encode_comment(&mut beat, "heartbeat");
        beat.push(b'\n');
        assert_eq!(beat, SSE_HEARTBEAT);
    }

    #[test]
    fn a_shared_long_poll_answer_goes_out_behind_each_clients_cors_head() {
        use std::io::Read;
        let cfg: &'static Config = Box::leak(Box::new(Config {
            origins: protocol::origin::Origins::new(
                &[
                    "https://app.example".to_string(),
                    "https://*.app.example".to_string(),
                ],
                false,
            )
            .unwrap(),
            ..Config::default()
        }));
        let core = Core::lone(cfg, 1);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (plain, mut plain_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (sub, mut sub_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut keys = Vec::new();
        for (fd, cors) in [
            (a.as_raw_fd(), 1),
            (plain.as_raw_fd(), 0),
            (sub.as_raw_fd(), PATTERN_SLOT),
        ] {
            let key = core.register(fd, ([127, 0, 0, 1], 1).into());
            let (ids, _) = core.registry.borrow_mut().subscribe(
                key,
                &["news".to_string()],
                None,
                1,
                cfg.channels_max,
                10,
            );
            let mut conns = core.conns.borrow_mut();
            let c = &mut conns[key as usize];
            c.channels = ids;
            c.state = State::LongPoll {
                answer: PollAnswer::Waiting,
                cursor: 0,
                keep_alive: true,
            };
            c.cors = cors;
            if cors == PATTERN_SLOT {
                let lines = cfg
                    .origins
                    .cors_lines_for(cors, Some("https://x.app.example"))
                    .into_owned();
                core.cors_by_conn.borrow_mut().insert(key, lines.into());
            }
            keys.push(key);
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let m = msg(5, "news");
        tx.send(ToCore::Message(m.clone())).unwrap();
        assert_eq!(core.dispatch(&rx), 1);
        let len = envelope::LONGPOLL_STATUS_LINE.len();
        let head = "HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: https://app.example\r\n\
                    Vary: Origin\r\nAccess-Control-Expose-Headers: Retry-After\r\n";
        let mut got = vec![0u8; head.len() + m.poll_response().len() - len];
        b.read_exact(&mut got).unwrap();
        let mut want = head.as_bytes().to_vec();
        want.extend_from_slice(&m.poll_response()[len..]);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(want).unwrap()
        );
        // Without an origin: the shared response as it is.
        let mut got = vec![0u8; m.poll_response().len()];
        plain_peer.read_exact(&mut got).unwrap();
        assert_eq!(got, m.poll_response()[..]);
        // Allowed by a pattern: its own origin echoed.
        let head = "HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: https://x.app.example\r\n\
                    Vary: Origin\r\nAccess-Control-Expose-Headers: Retry-After\r\n";
        let mut got = vec![0u8; head.len() + m.poll_response().len() - len];
        sub_peer.read_exact(&mut got).unwrap();
        assert!(String::from_utf8(got).unwrap().starts_with(head));
        for key in keys {
            assert!(matches!(
                core.conns.borrow()[key as usize].state,
                State::LongPoll {
                    answer: PollAnswer::Queued,
                    ..
                }
            ));
        }
    }
}
