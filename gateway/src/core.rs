//! One core: a monoio io_uring runtime pinned to a CPU, its own SO_REUSEPORT
//! listener, its connections, its channel registry and history, and the
//! fan-out of the messages ingest hands it. Nothing here is shared with other
//! cores except the inbound queue and the connection counter.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use indexmap::IndexSet;
use protocol::envelope;
use protocol::id::{GATEWAY_ID_FLOOR, ID_TAG_MASK};
use protocol::origin::PATTERN_SLOT;
use protocol::ws;
use rand::Rng;
use slab::Slab;
use tracing::{debug, info, warn};

use crate::admission::{Admission, Refusal};
use crate::config::Config;
use crate::ingest::{Interest, InterestTx, Message, ToCore};

/// What a connection is doing, as far as fan-out is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Reading a request head; not subscribed to anything.
    Http,
    WebSocket,
    Sse,
    /// A held long-poll request: the first message after its cursor answers it.
    LongPoll,
    /// Its last bytes (an error response, a close frame) are leaving: no
    /// message, heartbeat or deadline touches it any more.
    Closing,
}

/// Where a connection stands in a drain (see `Core::drain_step`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Not asked to go (yet).
    No,
    /// Asked to go (the drain, or its token expired); its task has not seen
    /// it yet.
    Asked,
    /// Its task has seen it (and closes the connection when it can).
    Seen,
}

/// An empty WebSocket ping (FIN + opcode 0x9, no payload): the heartbeat of
/// every WebSocket, one static buffer shared by all of them.
pub const WS_PING: &[u8] = &[0x89, 0x00];
/// The heartbeat of an SSE stream: a comment line, which EventSource
/// ignores, and a blank line.
pub const SSE_HEARTBEAT: &[u8] = b": heartbeat\n\n";
/// Close frame 1008 (policy violation), reason "slow consumer": sent, if the
/// socket takes it, to a WebSocket dropped for letting its queue overflow.
pub const WS_CLOSE_SLOW_CONSUMER: &[u8] = &[
    0x88, 15, 0x03, 0xf0, b's', b'l', b'o', b'w', b' ', b'c', b'o', b'n', b's', b'u', b'm', b'e',
    b'r',
];
/// Close frame 1012 (service restart), reason "service restart": sent to
/// every WebSocket when the gateway drains. Reconnect (elsewhere) with
/// `since=` the last id.
pub const WS_CLOSE_SERVICE_RESTART: &[u8] = &[
    0x88, 17, 0x03, 0xf4, b's', b'e', b'r', b'v', b'i', b'c', b'e', b' ', b'r', b'e', b's', b't',
    b'a', b'r', b't',
];
/// Close frame 4001 (application range), reason "token expired": sent to a
/// WebSocket whose token's `exp` (plus the leeway) has passed. Fetch a new
/// token and reconnect.
pub const WS_CLOSE_TOKEN_EXPIRED: &[u8] = &[
    0x88, 15, 0x0f, 0xa1, b't', b'o', b'k', b'e', b'n', b' ', b'e', b'x', b'p', b'i', b'r', b'e',
    b'd',
];
/// The `retry:` an SSE stream starts with, and the one it ends with when the
/// gateway drains (milliseconds, EventSource's reconnection delay), is drawn
/// from this range, uniformly, so that the clients of a gateway that goes
/// away do not all come back at once.
pub const SSE_RETRY_MS_MIN: u32 = 1_000;
pub const SSE_RETRY_MS_MAX: u32 = 5_000;

/// Per-connection state the core keeps in its slab: for an open stream, all
/// of it. Fan-out writes to it; the core's event loop (see `events`) reads
/// it; a task exists only while it reads a request or holds a long-poll.
/// It owns the socket (closed when the entry is removed).
pub struct Conn {
    pub fd: RawFd,
    /// Its own slab key (for the attention list, see `events`).
    key: u32,
    pub transport: Transport,
    /// Set when the socket failed, the client is too slow, or a deadline
    /// passed: whoever serves it (its task, or the event loop) closes it.
    pub dead: bool,
    /// The kernel refused part of the queue; the event loop writes the rest
    /// at the next `EPOLLOUT`.
    pub blocked: bool,
    /// Already on this core's to-flush list for the current batch.
    dirty: bool,
    /// Long-poll: the answer is queued; no further messages are added.
    pub poll_answered: bool,
    /// Long-poll: the poll timeout passed before any message came.
    pub poll_timed_out: bool,
    /// The gateway is draining and asked this connection to go.
    pub drain: Drain,
    /// Core clock second after which the sweep acts (0 = no deadline): the
    /// head timeout, the long-poll timeout, or a stream's next heartbeat.
    pub deadline_s: u32,
    /// Core clock second at which bytes were last read from the client: a
    /// WebSocket silent for longer than the heartbeat interval plus the pong
    /// timeout is a dead peer.
    pub last_heard_s: u32,
    /// Core clock second at which the token this stream was opened with
    /// expires (0 = no token, auth off): the sweep closes it then.
    pub auth_expires_s: u32,
    /// Bytes of `queue.front()` the kernel has already taken.
    sent_of_front: u32,
    /// Bytes queued and not yet sent.
    pub queued_bytes: u32,
    /// Messages with an id at or below this are not delivered: the client
    /// already has them (it resumed from this cursor, which may be ahead of
    /// this core by a message still in flight from ingest).
    pub skip_through: u64,
    /// Frames waiting for the socket. Shared `Bytes`, never copies. Empty
    /// (and unallocated) for an idle connection.
    pub queue: VecDeque<Bytes>,
    /// The task serving it, while one does.
    pub waker: Option<Waker>,
    /// An open WebSocket's session (frame decoder, UTF-8 and close state);
    /// boxed, as SSE streams and requests have none.
    pub session: Option<Box<ws::ServerSession>>,
    /// The conformance echo endpoint's state, for a WebSocket that echoes.
    pub echo: Option<crate::events::Echo>,
    /// Input may be waiting: set by an epoll event, cleared by a read that
    /// finds none.
    pub readable: bool,
    /// No task serves it: the core's event loop does (an open stream, or
    /// a connection lingering before its close).
    pub parked: bool,
    /// On the core's attention list (see `events`).
    pub attention: bool,
    /// Closing: its write side is shut down, it waits for the peer's end.
    pub shut_wr: bool,
    /// Registry ids of the channels it is subscribed to.
    pub channels: Box<[u32]>,
    /// The client's address: the TCP peer, or what its proxy's PROXY
    /// header said. Logged, and counted by `connections_per_ip_max`.
    client_ip: IpAddr,
    client_port: u16,
    /// It holds a place under `client_ip` in the shared per-address table
    /// (given back when it closes).
    counted_ip: bool,
    /// It comes from a trusted proxy: its first bytes are a PROXY header.
    pub expects_proxy_header: bool,
    /// Its origin's CORS slot (see `protocol::origin`; 0 = no CORS
    /// headers): a long-poll answer shared by many clients goes out behind
    /// this client's own status line and CORS headers.
    pub cors: u8,
}

/// Outbound queue buffers between uses, per core: taken by a connection
/// when a batch queues its first frame, given back when it has sent them.
/// Only small ones are kept (a queue that grew behind a slow client, or
/// for a burst, is freed), and a bounded number: at most 1,024 × 16
/// frames × 32 bytes = 512 KiB per core.
const POOLED_QUEUES_MAX: usize = 1024;
const POOLED_QUEUE_FRAMES_MAX: usize = 16;

thread_local! {
    static QUEUE_POOL: RefCell<Vec<VecDeque<Bytes>>> = const { RefCell::new(Vec::new()) };
}

/// The userspace bytes one idle WebSocket or SSE connection may cost, all
/// its parts together: its slab entry, its WebSocket session, its channel
/// list and its entry in a channel's subscriber set. `bench idle` measures
/// the process's RSS per connection against it (see the README).
pub const IDLE_CONNECTION_BYTES_MAX: usize = 384;
/// The slab entry (a `Conn` and the slab's tag). Raising it costs memory
/// on every connection of the host; say why in the commit.
const CONN_BYTES_MAX: usize = 160;
const _: () = assert!(std::mem::size_of::<Conn>() + 8 <= CONN_BYTES_MAX);
/// A heap block of `n` bytes as glibc's malloc lays it out: an 8-byte
/// header, 16-byte steps, 32 bytes at least.
const fn heap_block_bytes(n: usize) -> usize {
    let with_header = (n + 8).div_ceil(16) * 16;
    if with_header < 32 {
        32
    } else {
        with_header
    }
}
/// One subscription: its place in the channel's `IndexSet` (hash and key,
/// 16 bytes, and a 9-byte slot of the index table), both grown by doubling
/// (so up to twice that).
const SUBSCRIPTION_BYTES_MAX: usize = 2 * (16 + 9);
/// An idle WebSocket subscribed to one channel; an SSE stream is the same
/// without the session.
const _: () = assert!(
    CONN_BYTES_MAX
        + heap_block_bytes(std::mem::size_of::<ws::ServerSession>())
        + heap_block_bytes(std::mem::size_of::<u32>())
        + SUBSCRIPTION_BYTES_MAX
        <= IDLE_CONNECTION_BYTES_MAX
);

impl Conn {
    fn new(fd: RawFd, key: u32, client: SocketAddr) -> Conn {
        Conn {
            fd,
            key,
            transport: Transport::Http,
            dead: false,
            blocked: false,
            dirty: false,
            poll_answered: false,
            poll_timed_out: false,
            drain: Drain::No,
            deadline_s: 0,
            last_heard_s: 0,
            auth_expires_s: 0,
            sent_of_front: 0,
            queued_bytes: 0,
            skip_through: 0,
            queue: VecDeque::new(),
            waker: None,
            session: None,
            echo: None,
            readable: false,
            parked: false,
            attention: false,
            shut_wr: false,
            channels: Box::new([]),
            client_ip: client.ip(),
            client_port: client.port(),
            counted_ip: false,
            expects_proxy_header: false,
            cors: 0,
        }
    }

    /// The client's address, for logs.
    pub fn client(&self) -> SocketAddr {
        SocketAddr::new(self.client_ip, self.client_port)
    }

    /// Hands the connection to whoever serves it: its task, or, parked,
    /// the core's event loop (through the attention list).
    pub fn wake(&mut self) {
        if self.parked {
            if !self.attention {
                self.attention = true;
                crate::events::attend(self.key);
            }
        } else if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Asks the connection to go, because the gateway drains. A stream is
    /// told here, behind what is already queued, and takes no message
    /// after it: a WebSocket gets close 1012 (service restart), an SSE
    /// stream a jittered `retry:` before it ends. A held long-poll or a
    /// connection between requests is left to its task (which knows the
    /// cursor, or whether a response is under way).
    fn ask_to_go(&mut self, bytes_max: usize) {
        let farewell = match self.transport {
            Transport::WebSocket => Some(Bytes::from_static(WS_CLOSE_SERVICE_RESTART)),
            Transport::Sse => {
                let ms = rand::thread_rng().gen_range(SSE_RETRY_MS_MIN..=SSE_RETRY_MS_MAX);
                let mut out = Vec::with_capacity(16);
                protocol::sse::encode_retry(&mut out, ms);
                Some(Bytes::from(out))
            }
            Transport::Http | Transport::LongPoll | Transport::Closing => None,
        };
        if let Some(bytes) = farewell {
            self.transport = Transport::Closing;
            // The linger's deadline starts when the event loop sees it.
            self.deadline_s = 0;
            self.push(bytes, bytes_max);
            if !self.blocked {
                self.flush();
            }
        }
        self.drain = Drain::Asked;
        self.wake();
    }

    /// Ends a stream whose token expired, behind what is already queued: a
    /// WebSocket gets close 4001 "token expired", an SSE stream just ends.
    /// Its task sees it as asked to go (`Drain::Asked`) and closes after
    /// the bytes leave.
    fn token_expired(&mut self, bytes_max: usize) {
        if self.transport == Transport::WebSocket {
            self.push(Bytes::from_static(WS_CLOSE_TOKEN_EXPIRED), bytes_max);
            if !self.blocked {
                self.flush();
            }
        }
        self.transport = Transport::Closing;
        self.deadline_s = 0;
        self.drain = Drain::Asked;
        self.wake();
    }

    /// Queues bytes; a connection over its outbound budget is dropped as a
    /// slow consumer.
    pub fn push(&mut self, frame: Bytes, bytes_max: usize) {
        if self.dead {
            return;
        }
        let mut total = self.queued_bytes as usize + frame.len();
        if total > bytes_max && !self.blocked {
            // The dispatcher queues a whole batch before it writes: what is
            // queued goes to the socket before the client is called slow.
            self.flush();
            if self.dead {
                return;
            }
            total = self.queued_bytes as usize + frame.len();
        }
        if total > bytes_max {
            self.drop_slow_consumer(total);
            return;
        }
        self.queued_bytes = total as u32;
        if self.queue.capacity() == 0 {
            self.queue = QUEUE_POOL
                .with(|p| p.borrow_mut().pop())
                .unwrap_or_default();
        }
        self.queue.push_back(frame);
    }

    /// Gives the (empty) queue's buffer back to this core's pool: a
    /// connection does not keep one while idle, and the next batch does
    /// not allocate one.
    fn release_queue(&mut self) {
        let queue = std::mem::take(&mut self.queue);
        if queue.capacity() > 0 && queue.capacity() <= POOLED_QUEUE_FRAMES_MAX {
            QUEUE_POOL.with(|p| {
                let mut pool = p.borrow_mut();
                if pool.len() < POOLED_QUEUES_MAX {
                    pool.push(queue);
                }
            });
        }
    }

    /// A client that lets its queue overflow is closed, and its queue freed
    /// at once. A WebSocket is told why if its socket has room: frames not
    /// yet started are dropped, a frame the kernel already has part of is
    /// finished (the stream would be corrupt otherwise), then close 1008
    /// "slow consumer", in one write attempt. An SSE stream or a response
    /// just ends: there is no way to say why that a client would see.
    fn drop_slow_consumer(&mut self, wanted_bytes: usize) {
        crate::metrics::note_slow_consumer();
        warn!(
            peer = %self.client(),
            transport = ?self.transport,
            queued_bytes = self.queued_bytes,
            wanted_bytes,
            "slow consumer: outbound queue over its limit, closing"
        );
        let started = if self.sent_of_front > 0 {
            self.queue.pop_front()
        } else {
            None
        };
        self.queue = VecDeque::new();
        self.queued_bytes = 0;
        if self.transport == Transport::WebSocket {
            if let Some(front) = started {
                self.queued_bytes = (front.len() - self.sent_of_front as usize) as u32;
                self.queue.push_back(front);
            } else {
                self.sent_of_front = 0;
            }
            self.queued_bytes += WS_CLOSE_SLOW_CONSUMER.len() as u32;
            self.queue
                .push_back(Bytes::from_static(WS_CLOSE_SLOW_CONSUMER));
            self.flush();
        }
        self.queue = VecDeque::new();
        self.queued_bytes = 0;
        self.sent_of_front = 0;
        self.dead = true;
        self.wake();
    }

    /// Writes as much of the queue as the socket takes now, in one `sendmsg`
    /// per 64 frames. Never blocks: the accepted socket is in blocking mode
    /// (io_uring), so every call passes MSG_DONTWAIT.
    pub fn flush(&mut self) {
        const IOV_MAX: usize = 64;
        while !self.dead {
            if self.queue.is_empty() {
                self.release_queue();
                self.blocked = false;
                return;
            }
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; IOV_MAX];
            let mut n = 0;
            let mut total = 0;
            for (i, frame) in self.queue.iter().take(IOV_MAX).enumerate() {
                let skip = if i == 0 {
                    self.sent_of_front as usize
                } else {
                    0
                };
                iov[i] = libc::iovec {
                    iov_base: frame[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: frame.len() - skip,
                };
                total += frame.len() - skip;
                n += 1;
            }
            // SAFETY: msghdr is plain data; zeroed is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n;
            // SAFETY: the iovecs point into `Bytes` held by `self.queue`,
            // which is not touched until the call returns.
            let sent =
                unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            if sent < 0 {
                let err = std::io::Error::last_os_error();
                match err.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => self.blocked = true,
                    _ => {
                        debug!(fd = self.fd, error = %err, "send failed");
                        self.dead = true;
                    }
                }
                self.wake();
                return;
            }
            self.advance(sent as usize);
            if (sent as usize) < total {
                // A short write: the socket buffer is full. The event
                // loop calls flush again at the next EPOLLOUT.
                self.blocked = true;
                self.wake();
                return;
            }
        }
    }

    fn advance(&mut self, mut sent: usize) {
        self.queued_bytes -= sent as u32;
        while sent > 0 {
            let front_left = self.queue[0].len() - self.sent_of_front as usize;
            if sent >= front_left {
                sent -= front_left;
                self.queue.pop_front();
                self.sent_of_front = 0;
            } else {
                self.sent_of_front += sent as u32;
                sent = 0;
            }
        }
    }
}

/// A channel as one core sees it: its local subscribers and its history.
struct Channel {
    name: Box<str>,
    subscribers: IndexSet<u32>,
    history: VecDeque<Arc<Message>>,
    /// Highest id this channel's history has let go of: a cursor below it
    /// cannot be served completely.
    evicted_through: u64,
}

/// Channel name → local subscribers and history, for one core.
pub struct Registry {
    ids: HashMap<Box<str>, u32>,
    channels: Slab<Channel>,
    /// Channel ids in creation order, for evicting whole channels past
    /// `channels_max`.
    age: VecDeque<u32>,
    /// Highest id of any message whose channel was evicted from the table, or
    /// that was published before this process started: a cursor at or below
    /// it on an unknown channel cannot be trusted.
    forgotten_through: u64,
    /// This process's tag, the low bits of every id it assigns.
    own_tag: u64,
    /// Messages pushed out of a channel's history by `history_messages`
    /// (for `/metrics`).
    pub evictions: u64,
    /// Demand mode: where this core reports a channel's first local
    /// subscriber and its last one leaving.
    interest: Option<InterestTx>,
}

/// What a resuming client gets: messages after its cursor, and the channels
/// whose history no longer reaches back to it.
pub struct Resume {
    pub messages: Vec<Arc<Message>>,
    pub gaps: Vec<Box<str>>,
    /// Where the subscribed channels stand on this core: the highest id
    /// among their last messages (or, for a channel without one, the id
    /// below which it knows nothing). A client without a cursor, or one told
    /// of a gap, continues from here.
    pub present: u64,
    /// The cursor could not be used on some channel (it is not a position
    /// this core can place: from the future, or from this gateway's own
    /// sequence on a channel numbered by its publisher): that channel's
    /// whole history was replayed after its gap, and the connection must
    /// not skip live messages by that cursor.
    pub reset: bool,
}

impl Registry {
    fn new(first_id: u64, interest: Option<InterestTx>) -> Registry {
        Registry {
            ids: HashMap::new(),
            channels: Slab::new(),
            age: VecDeque::new(),
            forgotten_through: first_id,
            own_tag: first_id & ID_TAG_MASK,
            evictions: 0,
            interest,
        }
    }

    /// Ingest no longer subscribes to `name` (demand mode): what is
    /// published on it from now on may never reach this core, so nothing
    /// before now can be resumed completely here. A channel without
    /// subscribers is forgotten; one that got a subscriber meanwhile (ingest
    /// subscribes again when it hears of it) loses its history, and its
    /// subscribers are returned to be told of the gap.
    fn forget(&mut self, name: &str, published_through: u64) -> Option<&IndexSet<u32>> {
        self.forgotten_through = self.forgotten_through.max(published_through);
        let id = *self.ids.get(name)?;
        let ch = &mut self.channels[id as usize];
        if ch.subscribers.is_empty() {
            self.remove(id);
            return None;
        }
        ch.history.clear();
        ch.evicted_through = ch.evicted_through.max(published_through);
        Some(&self.channels[id as usize].subscribers)
    }

    fn id_of(&mut self, name: &str, channels_max: usize) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        if self.channels.len() >= channels_max {
            self.evict_one();
        }
        let id = self.channels.insert(Channel {
            name: name.into(),
            subscribers: IndexSet::new(),
            history: VecDeque::new(),
            // Whatever this channel had before it entered the table (before
            // this process started, or before it was evicted) is unknown.
            evicted_through: self.forgotten_through,
        }) as u32;
        self.ids.insert(name.into(), id);
        self.age.push_back(id);
        id
    }

    /// Drops the oldest channel that has no subscribers. Bounded: looks at
    /// each channel at most once.
    fn evict_one(&mut self) {
        for _ in 0..self.age.len() {
            let Some(id) = self.age.pop_front() else {
                return;
            };
            let Some(ch) = self.channels.get(id as usize) else {
                continue;
            };
            if ch.subscribers.is_empty() {
                self.remove(id);
                return;
            }
            self.age.push_back(id);
        }
    }

    fn remove(&mut self, id: u32) {
        let ch = self.channels.remove(id as usize);
        let last = ch.history.back().map_or(ch.evicted_through, |m| m.id);
        self.forgotten_through = self.forgotten_through.max(last);
        self.ids.remove(&ch.name);
        self.age.retain(|&a| a != id);
    }

    /// Appends a message to its channel's history (entering the channel
    /// if need be) and returns the channel's id, and whether this message
    /// showed that the channel is numbered by its publisher below this
    /// gateway's own ids (subscribers waiting with a cursor of this
    /// gateway's sequence must then not skip by it).
    fn record(
        &mut self,
        msg: &Arc<Message>,
        history_max: usize,
        channels_max: usize,
    ) -> (u32, bool) {
        let id = self.id_of(&msg.channel, channels_max);
        let ch = &mut self.channels[id as usize];
        let mut renumbered = false;
        if ch.history.is_empty() && msg.from_publisher {
            // The first message of a channel whose ids are the publisher's:
            // what it published before is unknown here, and its sequence
            // says where that ends (ids increase per channel).
            ch.evicted_through = msg.id - 1;
            renumbered = msg.id < GATEWAY_ID_FLOOR;
        }
        if ch.history.len() >= history_max {
            if let Some(old) = ch.history.pop_front() {
                ch.evicted_through = old.id;
                self.evictions += 1;
            }
        }
        ch.history.push_back(msg.clone());
        (id, renumbered)
    }

    /// Subscribes `conn` to `names` and returns what it missed after `since`.
    /// Runs without yielding, so no message can slip between the history it
    /// replays and the live messages that follow.
    pub fn subscribe(
        &mut self,
        conn: u32,
        names: &[String],
        since: Option<u64>,
        published_through: u64,
        channels_max: usize,
        replay_max: usize,
    ) -> (Box<[u32]>, Resume) {
        let mut ids = Vec::with_capacity(names.len());
        let own_tag = self.own_tag;
        let mut resume = Resume {
            messages: Vec::new(),
            gaps: Vec::new(),
            present: 0,
            reset: false,
        };
        for name in names {
            let id = self.id_of(name, channels_max);
            let ch = &mut self.channels[id as usize];
            if ch.subscribers.is_empty() {
                if let Some(interest) = &self.interest {
                    interest.send(Interest::On(name.as_str().into()));
                }
            }
            ch.subscribers.insert(conn);
            ids.push(id);
            let last = ch.history.back();
            resume.present = resume
                .present
                .max(last.map_or(ch.evicted_through, |m| m.id));
            let Some(since) = since else { continue };
            // A cursor this core cannot place is a gap, then the whole
            // history: one from the future (another process) on a channel
            // whose ids this process issues, or one of this gateway's own
            // sequence (a "nothing yet" handed out before the channel had a
            // message) on a channel numbered by its publisher below it. A
            // publisher's cursor merely ahead of this core comes from a
            // gateway that got the message a moment earlier: taken at its
            // word.
            let unusable = match last {
                Some(m) if m.from_publisher => {
                    since > m.id && since >= GATEWAY_ID_FLOOR && m.id < GATEWAY_ID_FLOOR
                }
                // On a channel this gateway numbers: from the future, or
                // another process's id (another tag), however close its
                // number.
                _ => {
                    since > published_through
                        || (since >= GATEWAY_ID_FLOOR && since & ID_TAG_MASK != own_tag)
                }
            };
            // A cursor from before what this core remembers is a gap too,
            // never a guess.
            if unusable || ch.evicted_through > since {
                resume.gaps.push(name.as_str().into());
            }
            let after = if unusable { 0 } else { since };
            resume.reset |= unusable;
            resume
                .messages
                .extend(ch.history.iter().filter(|m| m.id > after).cloned());
        }
        // Several channels: deliver in id order, as live delivery would.
        resume.messages.sort_by_key(|m| m.id);
        resume.messages.truncate(replay_max);
        (ids.into_boxed_slice(), resume)
    }

    pub fn unsubscribe(&mut self, conn: u32, channels: &[u32]) {
        for &id in channels {
            let Some(ch) = self.channels.get_mut(id as usize) else {
                continue;
            };
            if ch.subscribers.swap_remove(&conn) && ch.subscribers.is_empty() {
                if let Some(interest) = &self.interest {
                    interest.send(Interest::Off(ch.name.clone()));
                }
            }
            // A channel nobody listens to and nothing was published on would
            // otherwise let clients grow the table with made-up names.
            if ch.subscribers.is_empty() && ch.history.is_empty() {
                self.remove(id);
            }
        }
    }
}

/// Everything one core owns. Lives in an `Rc`: only this core's thread sees it.
pub struct Core {
    pub index: usize,
    pub cfg: &'static Config,
    pub conns: RefCell<Slab<Conn>>,
    pub registry: RefCell<Registry>,
    /// The receive buffer every connection of this core reads into, right
    /// after readiness: idle connections hold no read buffer of their own.
    pub scratch: RefCell<Box<[u8]>>,
    /// Highest id ingest has assigned (all cores).
    pub published_through: Arc<AtomicU64>,
    pub conn_counts: Arc<[AtomicU64]>,
    /// Limits on new connections (see `admission`).
    pub admission: Admission,
    started: Instant,
    /// Connections with frames queued by the current batch.
    dirty: RefCell<Vec<u32>>,
    /// Sweeps since this core saw the drain start (see `drain_step`).
    drain_sweeps: Cell<u32>,
    /// This core's counters for `/metrics`, published by the sweep.
    pub stats: crate::metrics::CoreStats,
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
    pub cors_by_conn: RefCell<HashMap<u32, Bytes>>,
    /// Held long-polls whose cursor this core could not place on some
    /// channels (they resumed here from a position this core never saw, or
    /// ingest let the channel go while they waited): the first message
    /// answers them with those gaps and itself, and its id as the cursor,
    /// never with a cursor of this gateway's own sequence, which another
    /// gateway could not place on a channel numbered by its publisher.
    pub poll_gaps: RefCell<HashMap<u32, Vec<Box<str>>>>,
    /// Every connection's readiness (see `events`).
    pub epoll: crate::events::Epoll,
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
/// From this many local subscribers on, a message's frames are copied into
/// the core before they are queued (see `dispatch`): a copy of a frame
/// costs about what a few dozen contended reference counts do.
const LOCAL_COPY_SUBSCRIBERS_MIN: usize = 32;
const DISPATCH_BATCH_DELIVERIES: u64 = 262_144;

impl Core {
    pub fn new(
        index: usize,
        cfg: &'static Config,
        first_id: u64,
        published_through: Arc<AtomicU64>,
        conn_counts: Arc<[AtomicU64]>,
        admission: Admission,
        interest: Option<InterestTx>,
    ) -> std::io::Result<Core> {
        Ok(Core {
            index,
            cfg,
            conns: RefCell::new(Slab::new()),
            registry: RefCell::new(Registry::new(first_id, interest)),
            scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
            published_through,
            conn_counts,
            admission,
            started: Instant::now(),
            dirty: RefCell::new(Vec::new()),
            drain_sweeps: Cell::new(0),
            stats: crate::metrics::CoreStats::default(),
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
            epoll: crate::events::Epoll::new()?,
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
        let open = self.conns.borrow().len();
        let peer = SocketAddr::new(crate::admission::client_ip(peer), peer.port());
        let proxied = self.cfg.expects_proxy_header(peer.ip());
        let counted = (!proxied).then_some(peer.ip());
        self.admission.admit(open, counted, self.now_ms())?;
        let key = self.register(fd, peer);
        let mut conns = self.conns.borrow_mut();
        let c = &mut conns[key as usize];
        c.counted_ip = counted.is_some() && self.admission.counts_addresses();
        c.expects_proxy_header = proxied;
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
        entry.insert(Conn::new(fd, key, client));
        key
    }

    /// Removes a connection and closes its socket (which also takes it out
    /// of the epoll set).
    pub fn deregister(&self, key: u32) {
        let conn = self.conns.borrow_mut().remove(key as usize);
        // SAFETY: the entry owned the descriptor; it is closed once, here.
        unsafe { libc::close(conn.fd) };
        if conn.cors == PATTERN_SLOT {
            self.cors_by_conn.borrow_mut().remove(&key);
        }
        if conn.transport == Transport::LongPoll {
            self.poll_gaps.borrow_mut().remove(&key);
        }
        self.registry.borrow_mut().unsubscribe(key, &conn.channels);
        if conn.counted_ip {
            self.admission.release(conn.client_ip);
        }
        self.conn_counts[self.index].fetch_sub(1, Ordering::Relaxed);
    }

    /// Marks a connection as open for streaming (WebSocket or SSE): it was
    /// heard from just now, and its first heartbeat is due between half an
    /// interval and an interval from now, by its slab key, so that a burst
    /// of connections is not pinged in one burst forever after.
    pub fn open_stream(&self, c: &mut Conn, key: u32, transport: Transport) {
        let now = self.now_s();
        c.transport = transport;
        c.last_heard_s = now;
        c.deadline_s = match self.cfg.heartbeat_interval_s() {
            Some(interval) => now + interval - key % (interval / 2 + 1),
            None => 0,
        };
    }

    /// Takes one batch of messages from ingest, appends them to the history
    /// and queues them on every local subscriber, then writes each touched
    /// connection once.
    fn dispatch(&self, rx: &Receiver<ToCore>) -> usize {
        let cfg = self.cfg;
        let mut handled = 0;
        let mut registry = self.registry.borrow_mut();
        let mut conns = self.conns.borrow_mut();
        let mut dirty = self.dirty.borrow_mut();
        let mut stamps = self.batch_stamps.borrow_mut();
        let cors_by_conn = self.cors_by_conn.borrow();
        let mut poll_gaps = self.poll_gaps.borrow_mut();
        let (mut deliveries, mut delivered_bytes) = (0u64, 0u64);
        while handled < DISPATCH_BATCH_MESSAGES && deliveries < DISPATCH_BATCH_DELIVERIES {
            let Ok(item) = rx.try_recv() else { break };
            handled += 1;
            let msg = match item {
                ToCore::Message(msg) => msg,
                ToCore::Unsubscribed(name) => {
                    let published = self.published_through.load(Ordering::Acquire);
                    if let Some(subscribers) = registry.forget(&name, published) {
                        // Subscribed while ingest let the channel go: they
                        // may miss what was published before it subscribes
                        // again, and are told so (each gap encoded once per
                        // transport, shared like a message).
                        let (mut ws_gap, mut sse_gap) = (None, None);
                        for &key in subscribers {
                            let Some(conn) = conns.get_mut(key as usize) else {
                                continue;
                            };
                            let gap = match conn.transport {
                                Transport::WebSocket => ws_gap
                                    .get_or_insert_with(|| {
                                        let mut out = Vec::new();
                                        envelope::encode_ws_gap(&name, &mut out);
                                        Bytes::from(out)
                                    })
                                    .clone(),
                                Transport::Sse => sse_gap
                                    .get_or_insert_with(|| {
                                        let mut out = Vec::new();
                                        envelope::encode_sse_gap(&name, &mut out);
                                        Bytes::from(out)
                                    })
                                    .clone(),
                                // A held poll is told with its next message.
                                Transport::LongPoll => {
                                    poll_gaps.entry(key).or_default().push(name.clone());
                                    continue;
                                }
                                _ => continue,
                            };
                            conn.push(gap, cfg.outbound_queue_bytes_max);
                            if !conn.dirty {
                                conn.dirty = true;
                                dirty.push(key);
                            }
                        }
                    }
                    continue;
                }
            };
            let (id, renumbered) = registry.record(&msg, cfg.history_messages, cfg.channels_max);
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
            let (mut ws_frame, mut sse_frame) = (None, None);
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
                let frame = match conn.transport {
                    Transport::WebSocket => ws_frame.get_or_insert_with(|| own(&msg.ws)).clone(),
                    Transport::Sse => sse_frame.get_or_insert_with(|| own(&msg.sse)).clone(),
                    Transport::LongPoll if !conn.poll_answered && !conn.poll_timed_out => {
                        conn.poll_answered = true;
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
                                    conn.push(part.clone(), cfg.outbound_queue_bytes_max);
                                }
                                msg.poll_response()
                                    .slice(envelope::LONGPOLL_STATUS_LINE.len()..)
                            }
                        }
                    }
                    Transport::LongPoll | Transport::Http | Transport::Closing => continue,
                };
                deliveries += 1;
                delivered_bytes += frame.len() as u64;
                conn.push(frame, cfg.outbound_queue_bytes_max);
                if !conn.dirty {
                    conn.dirty = true;
                    dirty.push(key);
                }
            }
            if deliveries > delivered_before {
                stamps.push(msg.stamped);
            }
        }
        for key in dirty.drain(..) {
            if let Some(conn) = conns.get_mut(key as usize) {
                conn.dirty = false;
                if !conn.blocked {
                    conn.flush();
                }
            }
        }
        // Once per message per batch, after its writes: never per delivery.
        if !stamps.is_empty() {
            let now = Instant::now();
            for stamp in stamps.drain(..) {
                let latency = now.saturating_duration_since(stamp);
                self.stats.observe_latency(latency);
            }
        }
        self.stats.delivered(deliveries, delivered_bytes);
        handled
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
        let mut by_transport = [0u64; 5];
        for (_, conn) in self.conns.borrow_mut().iter_mut() {
            by_transport[crate::metrics::transport_slot(conn.transport)] += 1;
            if conn.dead {
                continue;
            }
            if conn.auth_expires_s != 0
                && conn.auth_expires_s <= now
                && matches!(conn.transport, Transport::WebSocket | Transport::Sse)
            {
                debug!(fd = conn.fd, transport = ?conn.transport, "token expired, closing");
                conn.token_expired(cfg.outbound_queue_bytes_max);
                expired += 1;
                continue;
            }
            let beat = match conn.transport {
                Transport::WebSocket => WS_PING,
                Transport::Sse => SSE_HEARTBEAT,
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
                    if conn.transport == Transport::Http {
                        debug!(fd = conn.fd, "request head deadline passed, closing");
                        conn.dead = true;
                    } else if !conn.poll_answered {
                        conn.poll_timed_out = true;
                    }
                    conn.wake();
                    continue;
                }
            };
            if conn.transport == Transport::WebSocket
                && silence_s_max.is_some_and(|max| now.wrapping_sub(conn.last_heard_s) > max)
            {
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
            conn.push(Bytes::from_static(beat), cfg.outbound_queue_bytes_max);
            if !conn.blocked {
                conn.flush();
            }
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
                "new connections refused with 503 in the last second"
            );
        }
        let mut snapshot = self.stats.snapshot(by_transport);
        snapshot.history_evictions = self.registry.borrow().evictions;
        crate::metrics::publish(self.index, snapshot);
        if crate::drain::draining() {
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
            |c: &Conn| !c.dead && c.drain == Drain::No && c.transport != Transport::Closing;
        let open = conns.iter().filter(|(_, c)| candidate(c)).count();
        let share = open.div_ceil(seconds_left as usize);
        let mut asked = 0;
        for (_, conn) in conns.iter_mut() {
            if asked == share {
                break;
            }
            if candidate(conn) {
                conn.ask_to_go(self.cfg.outbound_queue_bytes_max);
                asked += 1;
            }
        }
        crate::drain::note_asked(asked as u64);
        debug!(
            core = self.index,
            sweep,
            asked,
            not_asked_yet = open - asked,
            "drain: connections asked to go"
        );
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
    let fd = doorbell.as_raw_fd();
    // SAFETY: `dup` gives this File its own descriptor, closed when it drops.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        warn!(
            core = core.index,
            "dup of doorbell failed; this core will not deliver"
        );
        return;
    }
    // SAFETY: `dup` is a fresh descriptor that nothing else owns.
    let std_file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(dup) };
    let file = match monoio::fs::File::from_std(std_file) {
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
            // Stopped at a batch limit with more waiting: yield, then go
            // on (nothing will ring for what is already queued).
            if rx.is_empty() {
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
    use super::*;
    use protocol::id::{first_gateway_id, ID_TAG_BITS};

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

    #[test]
    fn subscribers_of_a_channel_let_go_upstream_are_told_of_the_gap() {
        use std::io::Read;
        let core = test_core(Box::leak(Box::default()), 7);
        let mut peers = Vec::new();
        for transport in [Transport::WebSocket, Transport::Sse, Transport::LongPoll] {
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let key = core.register(a.as_raw_fd(), ([127, 0, 0, 1], 1).into());
            let (ids, _) =
                core.registry
                    .borrow_mut()
                    .subscribe(key, &["a".to_string()], None, 7, 100, 10);
            let mut conns = core.conns.borrow_mut();
            conns[key as usize].channels = ids;
            conns[key as usize].transport = transport;
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
        assert!(got[1].starts_with("event: gap\ndata: "), "{:?}", got[1]);
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

    /// A lone core (index 0 of 1) with no interest queue, at
    /// `published_through`.
    fn test_core(cfg: &'static Config, published_through: u64) -> Core {
        let counts: Arc<[AtomicU64]> = vec![AtomicU64::new(0)].into();
        let admission = Admission::new(cfg, 1, None, 0);
        let published = Arc::new(AtomicU64::new(published_through));
        Core::new(0, cfg, 1, published, counts, admission, None).expect("an epoll set")
    }

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
        conn.push(Bytes::from_static(b"one "), 1 << 30);
        conn.push(Bytes::from_static(b"two"), 1 << 30);
        conn.flush();
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
            conn.push(big.clone(), 1 << 30);
        }
        conn.flush();
        assert!(conn.blocked && !conn.dead);
        assert!(conn.queued_bytes > 0 && (conn.queued_bytes as usize) < 8 << 20);
    }

    #[test]
    fn a_queue_over_its_budget_marks_the_connection_dead_and_frees_it() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut conn = Conn::new(a.as_raw_fd(), 0, ([127, 0, 0, 1], 1).into());
        conn.transport = Transport::Sse;
        let max = 3 << 20;
        let big = Bytes::from(vec![7u8; 1 << 20]);
        // Nobody reads: the socket fills and the rest stays queued.
        conn.push(big.clone(), max);
        conn.flush();
        assert!(conn.blocked);
        conn.push(big.clone(), max);
        conn.push(big.clone(), max);
        assert!(!conn.dead);
        // What the socket took of the first frame is less than a frame.
        conn.push(big.clone(), max);
        assert!(conn.dead);
        assert_eq!(conn.queued_bytes, 0);
        assert_eq!(
            conn.queue.capacity(),
            0,
            "a dropped consumer's queue is freed at once"
        );
        conn.push(Bytes::from_static(b"1"), max);
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
        conn.transport = Transport::WebSocket;
        // Ten frames of 100 bytes against a budget of 250: the dispatcher
        // has not flushed yet, but the socket has room for all of them.
        for _ in 0..10 {
            conn.push(Bytes::from(vec![1u8; 100]), 250);
        }
        conn.flush();
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
            conn.transport = Transport::WebSocket;
            conn.push(Bytes::from_static(b"first frame"), 64);
            conn.push(Bytes::from_static(b"second"), 64);
            // As if the kernel had taken the first bytes of the front frame
            // before the socket filled up.
            conn.sent_of_front = started;
            conn.queued_bytes -= started;
            conn.blocked = true;
            conn.push(Bytes::from(vec![0u8; 64]), 64);
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
        let core = test_core(cfg, 1);
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
            c.transport = Transport::LongPoll;
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
                    Vary: Origin\r\n";
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
                    Vary: Origin\r\n";
        let mut got = vec![0u8; head.len() + m.poll_response().len() - len];
        sub_peer.read_exact(&mut got).unwrap();
        assert!(String::from_utf8(got).unwrap().starts_with(head));
        for key in keys {
            assert!(core.conns.borrow()[key as usize].poll_answered);
        }
    }
}
