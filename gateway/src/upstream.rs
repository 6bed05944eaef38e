//! Two-way traffic: what clients send, on its way to the backend's hubs.
//!
//! ```text
//! core 0 ─PUSH─┐                            ┌─▶ hub worker (PULL)
//! core 1 ─PUSH─┼─inproc─▶ relay thread ─PUSH┼─▶ hub worker (PULL)
//! …            ┘  (PULL)                    └─▶ …
//! ```
//!
//! Each core owns a PUSH socket on an in-process endpoint, written from
//! its own thread without blocking; one relay thread moves messages to the
//! PUSH socket the hubs connect to (`upstream_bind`) or that connects to
//! them (`upstream_connect`) — a DEALER to the hubs' ROUTERs when they
//! confirm (see **Accepted** below). Why PUSH: ZeroMQ spreads the messages over
//! the hubs connected at the time, round-robin, and a hub that stops
//! reading fills its own pipe and is skipped; the gateway needs no reply
//! on the same socket (hubs answer by publishing, which reaches whichever
//! gateway holds the connection, see `ingest`), so DEALER/ROUTER's
//! envelopes would buy nothing. Why a relay: a socket belongs to one
//! thread and an endpoint can be bound once, while every core sends.
//!
//! **Backpressure.** When every hub's pipe is at `upstream_hwm_messages`,
//! the relay waits (the time is counted), the in-process pipes fill, and a
//! core's non-blocking send is refused. The core then keeps the message in
//! its outbox and stops reading that client until the outbox is empty
//! again (the kernel's buffers fill and TCP pushes back on the client),
//! while deliveries to everyone go on. Nothing a client sent is dropped:
//! it is either sent, or refused with a reason the client sees, or still
//! in the client's socket. Presence events (no sender to push back on)
//! wait in the outbox up to a bound, past which they are dropped and
//! counted.
//!
//! **Accepted** means handed to the core's ZeroMQ socket: that is when a
//! client's `ref` is acknowledged and a `POST /publish` answered 202. What
//! ZeroMQ holds for a hub that then dies is lost with it (ZeroMQ has no
//! acknowledgements) — unless hubs confirm (`upstream_confirm_ms`): the
//! relay then speaks DEALER to the hubs' ROUTER, numbers each message,
//! keeps it until a hub confirms its number, and sends it again when none
//! has within the time: an accepted message reaches a hub as long as one
//! is there and the gateway lives (at least once; hubs drop a second copy
//! by its number).

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::task::Waker;
use std::time::Instant;

use protocol::upstream::{Address, Kind, Ref};
use tracing::warn;

use crate::config::Config;

/// Where the cores' sockets meet the relay.
const RELAY_ENDPOINT: &str = "inproc://gateway-upstream";
/// Messages a core's socket (and the relay's end of it) holds before the
/// core's sends are refused: small, so that a stall upstream reaches the
/// senders quickly rather than piling up in the gateway.
const CORE_HWM_MESSAGES: i32 = 64;
/// Bytes of presence events a core keeps waiting for room upstream; past
/// this they are dropped (and counted).
const PRESENCE_WAITING_BYTES_MAX: usize = 4 << 20;
/// The key of a core's upstream socket in its epoll set: slab keys never
/// get there.
pub const UPSTREAM_KEY: u32 = u32::MAX;

/// How this process names its connections: a random instance, and a key
/// for their tags (SipHash with random keys, so that an address cannot be
/// derived from another one).
pub struct Addresses {
    instance: u64,
    keys: RandomState,
}

/// This process's addresses.
pub fn addresses() -> &'static Addresses {
    static ADDRESSES: OnceLock<Addresses> = OnceLock::new();
    ADDRESSES.get_or_init(|| Addresses {
        instance: rand::random(),
        keys: RandomState::new(),
    })
}

impl Addresses {
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The address of the connection `serial` in slab entry `key` of `core`.
    pub fn of(&self, core: usize, key: u32, serial: u32) -> Address {
        Address {
            instance: self.instance,
            core: core as u16,
            key,
            serial,
            tag: self.tag(core as u16, key, serial),
        }
    }

    fn tag(&self, core: u16, key: u32, serial: u32) -> u64 {
        self.keys.hash_one((self.instance, core, key, serial))
    }

    /// Whether `a` is one this process gave out (it may have closed since).
    pub fn is_ours(&self, a: &Address) -> bool {
        a.instance == self.instance && a.tag == self.tag(a.core, a.key, a.serial)
    }
}

/// Opens the hubs' socket and starts the relay. None when no upstream
/// endpoint is configured (clients then cannot send).
pub fn start(ctx: &zmq::Context, cfg: &Config) -> Result<Option<Vec<String>>, String> {
    if cfg.upstream_bind.is_empty() && cfg.upstream_connect.is_empty() {
        return Ok(None);
    }
    let confirm = (cfg.upstream_confirm_ms > 0)
        .then(|| std::time::Duration::from_millis(cfg.upstream_confirm_ms));
    let kind = if confirm.is_some() {
        zmq::DEALER
    } else {
        zmq::PUSH
    };
    let push = ctx
        .socket(kind)
        .map_err(|e| format!("upstream socket: {e}"))?;
    push.set_sndhwm(cfg.upstream_hwm_messages)
        .map_err(|e| format!("upstream sndhwm: {e}"))?;
    // Messages go only to hubs whose connection is complete: a configured
    // hub that is not there holds nothing.
    push.set_immediate(true)
        .map_err(|e| format!("upstream immediate: {e}"))?;
    // Nothing waits for the hubs when the process exits.
    push.set_linger(0)
        .map_err(|e| format!("upstream linger: {e}"))?;
    crate::ops::metrics::watch_zmq_peers(
        ctx,
        &push,
        "upstream",
        crate::ops::metrics::add_upstream_peers,
    )?;
    let mut bound = Vec::new();
    for endpoint in &cfg.upstream_bind {
        push.bind(endpoint)
            .map_err(|e| format!("upstream bind {endpoint}: {e}"))?;
        bound.push(
            push.get_last_endpoint()
                .map_err(|e| format!("upstream endpoint: {e}"))?
                .unwrap_or_else(|raw| String::from_utf8_lossy(&raw).into_owned()),
        );
    }
    for endpoint in &cfg.upstream_connect {
        push.connect(endpoint)
            .map_err(|e| format!("upstream connect {endpoint}: {e}"))?;
    }
    let pull = ctx
        .socket(zmq::PULL)
        .map_err(|e| format!("upstream relay socket: {e}"))?;
    pull.set_rcvhwm(CORE_HWM_MESSAGES)
        .map_err(|e| format!("upstream relay rcvhwm: {e}"))?;
    pull.bind(RELAY_ENDPOINT)
        .map_err(|e| format!("upstream relay bind: {e}"))?;
    // Confirm mode keeps at most this many messages unconfirmed, then
    // stops taking the cores' (which then push back on their clients).
    let window = cfg.upstream_hwm_messages as usize;
    std::thread::Builder::new()
        .name("upstream".into())
        .spawn(move || match confirm {
            Some(after) => relay_confirmed(&pull, &push, after, window),
            None => relay(&pull, &push),
        })
        .map_err(|e| format!("spawn upstream thread: {e}"))?;
    Ok(Some(bound))
}

/// Moves every message from the cores to the hubs, waiting (and counting
/// the wait) while the hubs have no room. The frames move as ZeroMQ
/// messages, never copied.
fn relay(pull: &zmq::Socket, push: &zmq::Socket) {
    let mut frames: Vec<zmq::Message> = Vec::with_capacity(5);
    loop {
        frames.clear();
        loop {
            match pull.recv_msg(0) {
                Ok(frame) => {
                    let more = frame.get_more();
                    frames.push(frame);
                    if !more {
                        break;
                    }
                }
                Err(zmq::Error::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "upstream relay receive failed; clients can no longer send");
                    return;
                }
            }
        }
        let kind = kind_slot(frames.first().map(|f| &f[..]));
        let payload_bytes = frames.last().map_or(0, |f| f.len());
        let last = frames.len() - 1;
        let more = |i| if i < last { zmq::SNDMORE } else { 0 };
        // The first frame (the kind, a few bytes) is sent as a copy: a
        // refused ZeroMQ message is gone, and a refusal is how the relay
        // learns that no hub has room, and then waits (the wait counted).
        let mut waited_since = None;
        let first = loop {
            let flags = if waited_since.is_none() {
                zmq::DONTWAIT
            } else {
                0
            };
            match push.send(&frames[0][..], flags | more(0)) {
                Err(zmq::Error::EAGAIN) => waited_since = Some(Instant::now()),
                Err(zmq::Error::EINTR) => {}
                other => break other,
            }
        };
        let sent = first.and_then(|()| {
            frames
                .drain(..)
                .enumerate()
                .skip(1)
                .try_for_each(|(i, frame)| push.send(frame, more(i)))
        });
        if let Err(e) = sent {
            warn!(error = %e, "upstream send failed; clients can no longer send");
            return;
        }
        if let Some(t) = waited_since {
            crate::ops::metrics::note_upstream_blocked(t.elapsed());
        }
        crate::ops::metrics::note_upstream(kind, payload_bytes);
    }
}

/// A message's place in the metrics' kinds, by its first frame.
fn kind_slot(first: Option<&[u8]>) -> usize {
    match first {
        Some(b"message") => 0,
        Some(b"connect") => 1,
        Some(b"disconnect") => 2,
        Some(b"subscribe") => 3,
        _ => 4,
    }
}

/// A message handed to the hubs and not confirmed yet.
struct Unconfirmed {
    /// `[seq, kind, address, channel, meta, payload]`.
    frames: Vec<Vec<u8>>,
    /// When it was last sent; None: no hub had room yet.
    sent_at: Option<Instant>,
}

/// The relay of confirm mode: numbers each message, sends it, keeps it
/// until a hub confirms its number, and sends it again when no hub has
/// within `after`. Takes the cores' messages only while fewer than
/// `window` wait for a confirmation.
fn relay_confirmed(
    pull: &zmq::Socket,
    dealer: &zmq::Socket,
    after: std::time::Duration,
    window: usize,
) {
    use std::collections::BTreeMap;
    let mut next_seq: u64 = 1;
    let mut waiting: BTreeMap<u64, Unconfirmed> = BTreeMap::new();
    // Since when no hub has had room (for the blocked-time metric).
    let mut blocked_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        // Wake for the next resend, or at least every second.
        let next_due = waiting
            .values()
            .filter_map(|u| u.sent_at)
            .map(|t| (t + after).saturating_duration_since(now))
            .min();
        let unsent = waiting.values().any(|u| u.sent_at.is_none());
        let timeout_ms = match (unsent, next_due) {
            (true, _) => 10,
            (false, Some(d)) => d.as_millis().clamp(1, 1000) as i64,
            (false, None) => 1000,
        };
        let take = waiting.len() < window;
        let mut items = [
            dealer.as_poll_item(zmq::POLLIN),
            pull.as_poll_item(if take {
                zmq::POLLIN
            } else {
                zmq::PollEvents::empty()
            }),
        ];
        if let Err(e) = zmq::poll(&mut items, timeout_ms) {
            if e != zmq::Error::EINTR {
                warn!(error = %e, "upstream relay poll failed; clients can no longer send");
                return;
            }
        }
        // Confirmations: a sequence number each.
        while let Ok(frames) = dealer.recv_multipart(zmq::DONTWAIT) {
            if let Some(seq) = frames
                .first()
                .and_then(|f| <[u8; 8]>::try_from(&f[..]).ok())
            {
                waiting.remove(&u64::from_be_bytes(seq));
            }
        }
        if take && items[1].is_readable() {
            while waiting.len() < window {
                let Ok(mut frames) = pull.recv_multipart(zmq::DONTWAIT) else {
                    break;
                };
                let kind = kind_slot(frames.first().map(Vec::as_slice));
                crate::ops::metrics::note_upstream(kind, frames.last().map_or(0, Vec::len));
                frames.insert(0, next_seq.to_be_bytes().to_vec());
                waiting.insert(
                    next_seq,
                    Unconfirmed {
                        frames,
                        sent_at: None,
                    },
                );
                next_seq += 1;
            }
        }
        // Send what was never sent, then what is due again, oldest first,
        // while a hub has room.
        let now = Instant::now();
        let mut resent = 0;
        let mut full = false;
        for u in waiting.values_mut() {
            let due = match u.sent_at {
                None => true,
                Some(t) => now.duration_since(t) >= after,
            };
            if !due {
                continue;
            }
            match send_frames(dealer, &u.frames, zmq::DONTWAIT) {
                Ok(()) => {
                    if u.sent_at.is_some() {
                        resent += 1;
                    }
                    u.sent_at = Some(now);
                }
                Err(zmq::Error::EAGAIN) => {
                    full = true;
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "upstream send failed; clients can no longer send");
                    return;
                }
            }
        }
        match (full, blocked_since) {
            (true, None) => blocked_since = Some(now),
            (false, Some(t)) => {
                crate::ops::metrics::note_upstream_blocked(t.elapsed());
                blocked_since = None;
            }
            _ => {}
        }
        if resent > 0 {
            crate::ops::metrics::note_upstream_resent(resent);
        }
        crate::ops::metrics::set_upstream_unconfirmed(waiting.len());
    }
}

/// Sends one multipart message; `EAGAIN` can only come with the first
/// frame (ZeroMQ takes a message whole or not at all).
fn send_frames<F: AsRef<[u8]>>(socket: &zmq::Socket, frames: &[F], flags: i32) -> zmq::Result<()> {
    let last = frames.len().saturating_sub(1);
    for (i, frame) in frames.iter().enumerate() {
        let more = if i < last { zmq::SNDMORE } else { 0 };
        socket.send(frame.as_ref(), flags | more)?;
    }
    Ok(())
}

/// One upstream message: `[kind, address, channel, meta, payload]`, and
/// whom to acknowledge once it is handed over.
pub struct Outgoing {
    pub frames: [Vec<u8>; 5],
    pub ack: Option<Ack>,
}

impl Outgoing {
    pub fn new(
        kind: Kind,
        address: &Address,
        channel: &str,
        meta: Vec<u8>,
        payload: &[u8],
    ) -> Outgoing {
        Outgoing {
            frames: [
                kind.as_str().as_bytes().to_vec(),
                address.encode().into_bytes(),
                channel.as_bytes().to_vec(),
                meta,
                payload.to_vec(),
            ],
            ack: None,
        }
    }

    fn is_presence(&self) -> bool {
        self.frames[0] != Kind::Message.as_str().as_bytes()
    }

    fn bytes(&self) -> usize {
        self.frames.iter().map(Vec::len).sum()
    }
}

/// A client's `ref` to acknowledge once its message is handed over: the
/// connection (slab key and serial: the entry may hold another one by then).
pub struct Ack {
    pub key: u32,
    pub serial: u32,
    pub reference: Ref,
}

/// What became of an offered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Handed to ZeroMQ.
    Sent,
    /// Kept in the outbox behind others: stop reading the sender.
    Waiting,
}

/// A core's end of the upstream path: its socket, the messages waiting for
/// room, the senders not read meanwhile, and the `POST`s waiting for room.
pub struct CoreUpstream {
    socket: zmq::Socket,
    outbox: RefCell<VecDeque<Outgoing>>,
    presence_waiting_bytes: Cell<usize>,
    /// Connections (key, serial) not read until the outbox is empty.
    paused: RefCell<Vec<(u32, u32)>>,
    /// Tasks of `POST /publish` requests waiting for room.
    waiters: RefCell<Vec<Waker>>,
}

/// What emptying the outbox did, for the core to act on.
#[derive(Default)]
pub struct Flushed {
    pub acks: Vec<Ack>,
    /// The outbox is empty: these connections may be read again.
    pub resumed: Vec<(u32, u32)>,
}

impl CoreUpstream {
    /// Connects a core's socket to the relay. Call on the core's thread
    /// once the relay has bound its endpoint.
    pub fn open(ctx: &zmq::Context) -> Result<CoreUpstream, String> {
        let socket = ctx
            .socket(zmq::PUSH)
            .map_err(|e| format!("core upstream socket: {e}"))?;
        socket
            .set_sndhwm(CORE_HWM_MESSAGES)
            .map_err(|e| format!("core upstream sndhwm: {e}"))?;
        socket
            .set_linger(0)
            .map_err(|e| format!("core upstream linger: {e}"))?;
        socket
            .connect(RELAY_ENDPOINT)
            .map_err(|e| format!("core upstream connect: {e}"))?;
        Ok(CoreUpstream {
            socket,
            outbox: RefCell::new(VecDeque::new()),
            presence_waiting_bytes: Cell::new(0),
            paused: RefCell::new(Vec::new()),
            waiters: RefCell::new(Vec::new()),
        })
    }

    /// The descriptor ZeroMQ signals on when the socket's state may have
    /// changed (for the core's epoll set).
    pub fn fd(&self) -> Result<RawFd, String> {
        self.socket
            .get_fd()
            .map_err(|e| format!("core upstream fd: {e}"))
    }

    /// Sends a message now, or keeps it in order behind those waiting.
    pub fn offer(&self, out: Outgoing) -> Offered {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.is_empty() && self.send_now(&out.frames) {
            return Offered::Sent;
        }
        if out.is_presence() {
            let bytes = self.presence_waiting_bytes.get() + out.bytes();
            if bytes > PRESENCE_WAITING_BYTES_MAX {
                crate::ops::metrics::note_upstream_refused(6);
                return Offered::Waiting;
            }
            self.presence_waiting_bytes.set(bytes);
        }
        outbox.push_back(out);
        Offered::Waiting
    }

    /// One non-blocking send. Refused, it reads the socket's events: that
    /// processes the commands waiting in its mailbox (a pipe saying it has
    /// room again may be among them: then it sends again, as no edge of
    /// the descriptor would say so), and leaves the mailbox empty, so that
    /// the next command makes a new edge. False: no room now; the edge
    /// comes when there is.
    fn send_now(&self, frames: &[Vec<u8>; 5]) -> bool {
        for _ in 0..2 {
            match send_frames(&self.socket, frames, zmq::DONTWAIT) {
                Ok(()) => return true,
                Err(zmq::Error::EAGAIN) => {}
                Err(e) => {
                    warn!(error = %e, "core upstream send failed; kept for a retry");
                    return false;
                }
            }
            match self.socket.get_events() {
                Ok(events) if events.contains(zmq::POLLOUT) => {}
                _ => return false,
            }
        }
        false
    }

    /// Keeps a connection unread until the outbox is empty.
    pub fn pause(&self, key: u32, serial: u32) {
        self.paused.borrow_mut().push((key, serial));
    }

    /// Sends a `POST`'s message if nothing waits before it and the socket
    /// takes it now; otherwise its task waits ([`CoreUpstream::wait`]).
    pub fn try_send(&self, frames: &[Vec<u8>; 5]) -> bool {
        self.outbox.borrow().is_empty() && self.send_now(frames)
    }

    /// Wakes `waker` when the outbox next empties or the socket has room.
    pub fn wait(&self, waker: &Waker) {
        let mut waiters = self.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
    }

    /// Sends what waits, as far as the socket takes it. Called when the
    /// socket's descriptor fires, and once a second by the sweep (a
    /// safety net: see [`CoreUpstream::send_now`] for why no edge is
    /// missed).
    pub fn flush(&self) -> Flushed {
        let mut flushed = Flushed::default();
        let mut outbox = self.outbox.borrow_mut();
        while let Some(out) = outbox.front() {
            if !self.send_now(&out.frames) {
                break;
            }
            let out = outbox.pop_front().expect("the front was there");
            if out.is_presence() {
                self.presence_waiting_bytes
                    .set(self.presence_waiting_bytes.get() - out.bytes());
            }
            flushed.acks.extend(out.ack);
        }
        if outbox.is_empty() {
            flushed.resumed = std::mem::take(&mut *self.paused.borrow_mut());
            // Empty the mailbox (the edge that brought us here may have
            // come with more commands): the next one makes a new edge.
            let _ = self.socket.get_events();
            // The POSTs waiting may try now.
            for w in self.waiters.borrow_mut().drain(..) {
                w.wake();
            }
        }
        flushed
    }
}
