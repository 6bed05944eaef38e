//! One connection as its core keeps it: the slab entry fan-out writes to,
//! the event loop serves, and the request task (while there is one) works
//! on; its outbound queue and how it is written; its byte budget.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::task::Waker;

use bytes::Bytes;
use protocol::deflate::Window;
use protocol::token::ChannelPattern;
use protocol::ws;
use rand::Rng;

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
    /// An HTTP/2 connection (gRPC): its task owns the socket, its streams
    /// are entries of their own.
    Grpc,
    /// One gRPC call on an HTTP/2 connection: no socket of its own; its
    /// task moves what fan-out queues here into HTTP/2 DATA frames.
    GrpcStream,
}

impl Transport {
    /// Its place in [`crate::ops::metrics::TRANSPORTS`].
    pub fn metrics_slot(self) -> usize {
        match self {
            Transport::Http => 0,
            Transport::WebSocket => 1,
            Transport::Sse => 2,
            Transport::LongPoll => 3,
            Transport::Closing => 4,
            Transport::Grpc => 5,
            Transport::GrpcStream => 6,
        }
    }
}

/// Where a connection is in its life, with what that stage needs and
/// nothing else: a long-poll's answer cannot be set on a WebSocket, a
/// WebSocket cannot be without its session.
#[derive(Debug)]
pub enum State {
    /// Reading a request head (a task), or between requests (parked until
    /// the next one arrives).
    Request,
    /// A held long-poll (parked, or its task's while it has read bytes of
    /// the next request): its answer so far, the cursor an empty answer
    /// carries, and whether the connection goes on after the answer.
    LongPoll {
        answer: PollAnswer,
        cursor: u64,
        keep_alive: bool,
    },
    /// An open WebSocket (parked): its session, boxed as no other state
    /// has one, and the window its messages are compressed with when it
    /// negotiated permessage-deflate (here, not in the session: fan-out
    /// reads it for every delivery, and the slab entry is in hand).
    WebSocket {
        session: Box<WsSession>,
        deflate: Option<Window>,
    },
    /// An open SSE stream (parked); `chunked` for an HTTP/1.1 request (see
    /// [`sse_bytes`]).
    Sse { chunked: bool },
    /// Its last bytes (an error response, a close frame) are leaving: no
    /// message, heartbeat or deadline touches it any more. Once they have
    /// left it is half-closed (`shut_wr`) and waits for the peer's end.
    Closing { shut_wr: bool },
    /// An HTTP/2 connection, served by its task (see `grpc.rs`).
    Http2,
    /// A gRPC call (`Connect` sends: its two-way state).
    GrpcStream { two_way: Option<Box<TwoWay>> },
}

/// What an open WebSocket keeps, in one heap block: the frame session
/// (decoder, UTF-8 and close state), and what its kind of endpoint needs
/// besides. Fits the block the session alone needed (see the budget).
#[derive(Debug)]
pub struct WsSession {
    pub frames: ws::ServerSession,
    /// On the conformance endpoint, the echo's progress through the message.
    pub echo: Option<crate::core::events::Echo>,
    /// A client speaking the gateway's subprotocol: it sends messages.
    pub two_way: Option<Box<TwoWay>>,
}

/// A WebSocket on the gateway's subprotocol ([`protocol::upstream`]).
#[derive(Debug)]
pub struct TwoWay {
    /// The message being received, its parts so far (unallocated between
    /// messages).
    pub message: Vec<u8>,
    pub binary: bool,
    /// Not read until the core's upstream outbox is empty (backpressure).
    pub paused: bool,
    pub budget: protocol::upstream::SendBudget,
    /// Who it is (auth on): what it may read and send, and what the hubs
    /// are told.
    pub identity: Option<Identity>,
}

/// What a token said that a two-way connection needs after its handshake,
/// in one heap block: its `sub`, the patterns of what it may read and
/// send (each list space-separated, as a token writes them: patterns have
/// no spaces) and the `upstream_claims` it has (a JSON object's text).
/// Kept as text because it lives as long as the connection: a parsed
/// grant is seven allocations, about 270 bytes for a short token.
#[derive(Debug)]
pub struct Identity {
    text: Box<str>,
    sub_end: u16,
    read_end: u16,
    send_end: u16,
    has_sub: bool,
}

impl Identity {
    pub fn new(
        sub: Option<&str>,
        read: &[ChannelPattern],
        send: &[ChannelPattern],
        claims: Option<&str>,
    ) -> Identity {
        use std::fmt::Write as _;
        let mut text = String::from(sub.unwrap_or(""));
        let sub_end = text.len();
        for p in read {
            let _ = write!(text, "{p} ");
        }
        let read_end = text.len();
        for p in send {
            let _ = write!(text, "{p} ");
        }
        let send_end = text.len();
        text.push_str(claims.unwrap_or(""));
        // A token is at most TOKEN_BYTES_MAX (4 KiB): the offsets fit.
        Identity {
            text: text.into_boxed_str(),
            sub_end: sub_end as u16,
            read_end: read_end as u16,
            send_end: send_end as u16,
            has_sub: sub.is_some(),
        }
    }

    pub fn sub(&self) -> Option<&str> {
        self.has_sub
            .then(|| &self.text[..usize::from(self.sub_end)])
    }

    /// The claims the hubs are given, if the token had any of them.
    pub fn claims(&self) -> Option<&str> {
        Some(&self.text[usize::from(self.send_end)..]).filter(|c| !c.is_empty())
    }

    pub fn may_read(&self, channel: &str) -> bool {
        let read = &self.text[usize::from(self.sub_end)..usize::from(self.read_end)];
        read.split_terminator(' ')
            .any(|p| ChannelPattern::text_matches(p, channel))
    }

    pub fn may_send(&self, channel: &str) -> bool {
        let send = &self.text[usize::from(self.read_end)..usize::from(self.send_end)];
        send.split_terminator(' ')
            .any(|p| ChannelPattern::text_matches(p, channel))
    }
}

/// Why an open stream ended, for the hubs' presence (`upstream_presence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Not a stream (a request, a long-poll), or still open: the client
    /// closed it, or its connection broke.
    ClientClosed,
    /// It broke a rule of RFC 6455 (closed with 1002, 1007, 1009).
    ProtocolError,
    SlowConsumer,
    TokenExpired,
    /// The gateway drains: the client comes back, probably elsewhere.
    Drain,
    /// Nothing heard within the heartbeat interval and the pong timeout.
    DeadPeer,
}

impl Gone {
    pub fn reason(self) -> &'static str {
        match self {
            Gone::ClientClosed => "client closed",
            Gone::ProtocolError => "protocol error",
            Gone::SlowConsumer => "slow consumer",
            Gone::TokenExpired => "token expired",
            Gone::Drain => "drain",
            Gone::DeadPeer => "dead peer",
        }
    }
}

/// A held long-poll's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollAnswer {
    /// Nothing yet: the next message answers it.
    Waiting,
    /// Its answer is queued; no further message is added.
    Queued,
    /// The poll timeout passed before any message came.
    TimedOut,
}

impl State {
    /// The kind of traffic, for fan-out and the metrics.
    pub fn transport(&self) -> Transport {
        match self {
            State::Request => Transport::Http,
            State::LongPoll { .. } => Transport::LongPoll,
            State::WebSocket { .. } => Transport::WebSocket,
            State::Sse { .. } => Transport::Sse,
            State::Closing { .. } => Transport::Closing,
            State::Http2 => Transport::Grpc,
            State::GrpcStream { .. } => Transport::GrpcStream,
        }
    }

    /// A new WebSocket session for messages up to `message_bytes_max`.
    pub fn websocket(message_bytes_max: u64, echo: Option<crate::core::events::Echo>) -> State {
        State::WebSocket {
            session: Box::new(WsSession {
                frames: ws::ServerSession::new(message_bytes_max),
                echo,
                two_way: None,
            }),
            deflate: None,
        }
    }

    /// The window an open WebSocket's messages are compressed with, when
    /// it negotiated permessage-deflate.
    pub fn ws_deflate(&self) -> Option<Window> {
        match self {
            State::WebSocket { deflate, .. } => *deflate,
            _ => None,
        }
    }

    /// An open WebSocket negotiated permessage-deflate: compressed
    /// messages are sent to it with `window`, and it may send some.
    pub fn negotiated_deflate(&mut self, window: Window) {
        if let State::WebSocket { session, deflate } = self {
            session.frames.accept_compressed();
            *deflate = Some(window);
        }
    }
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
/// [`SSE_HEARTBEAT`] as one chunk, for a chunked stream.
pub const SSE_HEARTBEAT_CHUNK: &[u8] = b"d\r\n: heartbeat\n\n\r\n";

/// What an SSE stream is sent of `chunk`, events as one HTTP/1.1 chunk
/// (encoded once and shared by every stream): all of it on a chunked
/// stream, the events alone on an HTTP/1.0 one (the same bytes, sliced).
pub fn sse_bytes(chunk: &Bytes, chunked: bool) -> Bytes {
    if chunked {
        chunk.clone()
    } else {
        chunk.slice(protocol::sse::chunk_body(chunk))
    }
}
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
    pub(super) key: u32,
    pub state: State,
    /// Set when the socket failed, the client is too slow, or a deadline
    /// passed: whoever serves it (its task, or the event loop) closes it.
    pub dead: bool,
    /// The kernel refused part of the queue; the event loop writes the rest
    /// at the next `EPOLLOUT`.
    pub blocked: bool,
    /// Already on this core's to-flush list for the current batch.
    pub(super) dirty: bool,
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
    /// Its frames of the current delivery batch, staged in the core's
    /// batch buffer (first and last index, [`NOT_STAGED`] when none): they
    /// are written from there at the end of the batch and only what the
    /// socket does not take is queued here. Always `NOT_STAGED` outside a
    /// batch.
    pub staged: u32,
    pub staged_last: u32,
    /// Bytes of `queue.front()` the kernel has already taken.
    pub(super) sent_of_front: u32,
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
    /// Input may be waiting: set by an epoll event, cleared by a read that
    /// finds none.
    pub readable: bool,
    /// No task serves it: the core's event loop does (an open stream, or
    /// a connection lingering before its close).
    pub parked: bool,
    /// On the core's attention list (see `events`).
    pub attention: bool,
    /// Registry ids of the channels it is subscribed to.
    pub channels: Box<[u32]>,
    /// The client's address: the TCP peer, or what its proxy's PROXY
    /// header said. Logged, and counted by `connections_per_ip_max`.
    pub(super) client_ip: IpAddr,
    pub(super) client_port: u16,
    /// It holds a place under `client_ip` in the shared per-address table
    /// (given back when it closes).
    pub(super) counted_ip: bool,
    /// It comes from a trusted proxy: its first bytes are a PROXY header.
    pub expects_proxy_header: bool,
    /// Its origin's CORS slot (see `protocol::origin`; 0 = no CORS
    /// headers): a long-poll answer shared by many clients goes out behind
    /// this client's own status line and CORS headers.
    pub cors: u8,
    /// Which of the connections its slab entry has held this is (the
    /// core's count at accept): part of its address, so that a reply to a
    /// connection that closed never reaches the next one in its entry.
    pub serial: u32,
    /// The stream it opened (WebSocket or SSE), for the hubs' presence;
    /// None before one opens, and for long-polls.
    pub stream: Option<Transport>,
    /// Why the stream ended (the first reason found).
    pub gone: Gone,
    /// It came through a TLS listener: its session (see `crate::tls`) is
    /// in this core's side table ([`Conn::take_tls`]), not in the entry,
    /// so a cleartext connection pays nothing for it.
    pub tls: bool,
}

/// `Conn::fd` of an entry without a socket of its own: a gRPC stream, or
/// an HTTP/2 connection whose socket its task owns.
pub const SOCKETLESS: RawFd = -1;

/// `Conn::staged` when nothing of the batch is staged.
pub const NOT_STAGED: u32 = u32::MAX;

/// Outbound queue buffers between uses, per core: taken by a connection
/// when a batch queues its first frame, given back when it has sent them.
/// Only small ones are kept (a queue that grew behind a slow client, or
/// for a burst, is freed), and a bounded number: at most 1,024 × 16
/// frames × 32 bytes = 512 KiB per core.
const POOLED_QUEUES_MAX: usize = 1024;
const POOLED_QUEUE_FRAMES_MAX: usize = 16;

thread_local! {
    /// The TLS sessions of this core's connections, by slab key (see
    /// [`Conn::take_tls`]): 8 bytes per slab entry of a TLS listener's
    /// core, none in a cleartext gateway's entries.
    static TLS_SESSIONS: RefCell<Vec<Option<Box<crate::tls::Session>>>> = const { RefCell::new(Vec::new()) };
    static QUEUE_POOL: RefCell<Vec<VecDeque<Bytes>>> = const { RefCell::new(Vec::new()) };
}

/// The userspace bytes one idle WebSocket or SSE connection may cost, all
/// its parts together: its slab entry, its WebSocket session, its channel
/// list and its entry in a channel's subscriber set. `bench idle` measures
/// the process's RSS per connection against it (see the README).
pub const IDLE_CONNECTION_BYTES_MAX: usize = 384;
/// An open WebSocket's heap block: the frame session and what its kind
/// of endpoint needs besides (a pointer). Two-way traffic added that
/// pointer within the block the session alone took before.
const WS_SESSION_BLOCK_BYTES_MAX: usize = 112;
const _: () =
    assert!(heap_block_bytes(std::mem::size_of::<WsSession>()) <= WS_SESSION_BLOCK_BYTES_MAX);
/// The slab entry (a `Conn` and the slab's tag). Raising it costs memory
/// on every connection of the host; say why in the commit.
const CONN_BYTES_MAX: usize = 168;
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
        + heap_block_bytes(std::mem::size_of::<WsSession>())
        + heap_block_bytes(std::mem::size_of::<u32>())
        + SUBSCRIPTION_BYTES_MAX
        <= IDLE_CONNECTION_BYTES_MAX
);

impl Conn {
    pub(super) fn new(fd: RawFd, key: u32, client: SocketAddr) -> Conn {
        Conn {
            fd,
            key,
            state: State::Request,
            dead: false,
            blocked: false,
            dirty: false,
            drain: Drain::No,
            deadline_s: 0,
            last_heard_s: 0,
            auth_expires_s: 0,
            sent_of_front: 0,
            queued_bytes: 0,
            skip_through: 0,
            queue: VecDeque::new(),
            waker: None,
            staged: NOT_STAGED,
            staged_last: NOT_STAGED,
            readable: false,
            parked: false,
            attention: false,
            channels: Box::new([]),
            client_ip: client.ip(),
            client_port: client.port(),
            counted_ip: false,
            expects_proxy_header: false,
            cors: 0,
            serial: 0,
            stream: None,
            gone: Gone::ClientClosed,
            tls: false,
        }
    }

    /// Notes why the stream is ending, unless a reason was found already.
    pub fn going(&mut self, why: Gone) {
        if self.gone == Gone::ClientClosed {
            self.gone = why;
        }
    }

    /// The kind of traffic it carries now.
    pub fn transport(&self) -> Transport {
        self.state.transport()
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
                crate::core::events::attend(self.key);
            }
        } else if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Asks the connection to go, because the gateway drains. A stream is
    /// told, behind what is already queued, and takes no message after it:
    /// a WebSocket gets close 1012 (service restart), an SSE stream a
    /// jittered `retry:` before it ends. A held long-poll or a connection
    /// between requests is left to its task (which knows the cursor, or
    /// whether a response is under way).
    ///
    /// Returns the farewell to queue (the caller writes it).
    pub fn ask_to_go(&mut self) -> Option<Bytes> {
        let farewell = match self.transport() {
            Transport::WebSocket => Some(Bytes::from_static(WS_CLOSE_SERVICE_RESTART)),
            Transport::Sse => {
                let ms = rand::thread_rng().gen_range(SSE_RETRY_MS_MIN..=SSE_RETRY_MS_MAX);
                let mut retry = Vec::with_capacity(16);
                protocol::sse::encode_retry(&mut retry, ms);
                if self.sse_chunked() {
                    // The hint, then the body's end.
                    let mut out = Vec::with_capacity(32);
                    protocol::sse::push_chunk(&mut out, &retry);
                    out.extend_from_slice(protocol::sse::LAST_CHUNK);
                    Some(Bytes::from(out))
                } else {
                    Some(Bytes::from(retry))
                }
            }
            // A gRPC stream's task ends it with UNAVAILABLE, an HTTP/2
            // connection's sends GOAWAY (see `grpc.rs`).
            Transport::GrpcStream => {
                self.going(Gone::Drain);
                None
            }
            Transport::Http | Transport::LongPoll | Transport::Closing | Transport::Grpc => None,
        };
        if farewell.is_some() {
            self.going(Gone::Drain);
            self.state = State::Closing { shut_wr: false };
            // The linger's deadline starts when the event loop sees it.
            self.deadline_s = 0;
        }
        self.drain = Drain::Asked;
        self.wake();
        farewell
    }

    /// Gives the connection its TLS session (see [`Conn::take_tls`]).
    pub fn put_tls(&mut self, session: Box<crate::tls::Session>) {
        self.tls = true;
        TLS_SESSIONS.with(|t| {
            let mut t = t.borrow_mut();
            let key = self.key as usize;
            if t.len() <= key {
                t.resize_with(key + 1, || None);
            }
            t[key] = Some(session);
        });
    }

    /// Takes its TLS session out of the core's side table, to work on it
    /// together with the entry; [`Conn::put_tls`] puts it back. None for
    /// a cleartext connection.
    pub fn take_tls(&mut self) -> Option<Box<crate::tls::Session>> {
        if !self.tls {
            return None;
        }
        TLS_SESSIONS.with(|t| t.borrow_mut().get_mut(self.key as usize)?.take())
    }

    /// `f` on its TLS session, if it has one.
    pub fn with_tls<T>(&self, f: impl FnOnce(&mut crate::tls::Session) -> T) -> Option<T> {
        if !self.tls {
            return None;
        }
        TLS_SESSIONS.with(|t| {
            t.borrow_mut()
                .get_mut(self.key as usize)?
                .as_deref_mut()
                .map(f)
        })
    }

    /// Frees its TLS session (the entry is being removed).
    pub(super) fn drop_tls(&mut self) {
        drop(self.take_tls());
        self.tls = false;
    }

    /// Everything queued has reached the kernel (on a TLS connection, the
    /// records sealed from it too: a blocked connection has bytes left).
    pub fn all_sent(&self) -> bool {
        self.queue.is_empty() && !self.blocked
    }

    /// Whether this is an SSE stream sent as a chunked body.
    pub fn sse_chunked(&self) -> bool {
        matches!(self.state, State::Sse { chunked: true })
    }

    /// Ends a stream whose token expired, behind what is already queued: a
    /// WebSocket gets close 4001 "token expired" (returned, for the caller
    /// to queue), an SSE stream just ends (a chunked one with the body's
    /// last chunk). Seen as asked to go (`Drain::Asked`); it closes once
    /// the bytes have left.
    pub fn token_expired(&mut self) -> Option<Bytes> {
        self.going(Gone::TokenExpired);
        if self.transport() == Transport::GrpcStream {
            // Its task ends it with UNAUTHENTICATED.
            self.drain = Drain::Asked;
            self.wake();
            return None;
        }
        let farewell = match self.transport() {
            Transport::WebSocket => Some(Bytes::from_static(WS_CLOSE_TOKEN_EXPIRED)),
            Transport::Sse if self.sse_chunked() => {
                Some(Bytes::from_static(protocol::sse::LAST_CHUNK))
            }
            _ => None,
        };
        self.state = State::Closing { shut_wr: false };
        self.deadline_s = 0;
        self.drain = Drain::Asked;
        self.wake();
        farewell
    }

    /// Queues a frame within the outbound budget; over it, the frame comes
    /// back (the caller writes what is queued and tries again, or drops the
    /// client as slow). A dead connection takes nothing.
    pub fn enqueue(&mut self, frame: Bytes, bytes_max: usize) -> Result<(), Bytes> {
        if self.dead {
            return Ok(());
        }
        let total = self.queued_bytes as usize + frame.len();
        if total > bytes_max {
            return Err(frame);
        }
        self.queued_bytes = total as u32;
        if self.queue.capacity() == 0 {
            self.queue = QUEUE_POOL
                .with(|p| p.borrow_mut().pop())
                .unwrap_or_default();
        }
        self.queue.push_back(frame);
        Ok(())
    }

    /// Queues what a staged write left (its bytes are already counted in
    /// `queued_bytes`).
    pub fn requeue(&mut self, frame: Bytes) {
        if self.queue.capacity() == 0 {
            self.queue = QUEUE_POOL
                .with(|p| p.borrow_mut().pop())
                .unwrap_or_default();
        }
        self.queue.push_back(frame);
    }

    /// Takes the first queued frame, for a gRPC stream's task, which sends
    /// it as the client's window allows: it leaves the budget here.
    pub fn take_front(&mut self) -> Option<Bytes> {
        let frame = self.queue.pop_front()?;
        self.queued_bytes -= frame.len() as u32;
        if self.queue.is_empty() {
            self.release_queue();
        }
        Some(frame)
    }

    /// Gives the (empty) queue's buffer back to this core's pool: a
    /// connection does not keep one while idle, and the next batch does
    /// not allocate one.
    pub(super) fn release_queue(&mut self) {
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

    /// A client that let its queue overflow: what is left to send it
    /// before it is closed. A WebSocket is told why if its socket has room:
    /// frames not yet started are dropped, a frame the kernel already has
    /// part of is finished (the stream would be corrupt otherwise), then
    /// close 1008 "slow consumer". An SSE stream or a response just ends:
    /// there is no way to say why that a client would see. The caller
    /// writes once, then [`Conn::close_now`].
    pub fn slow_consumer_farewell(&mut self) {
        self.going(Gone::SlowConsumer);
        let started = if self.sent_of_front > 0 {
            self.queue.pop_front()
        } else {
            None
        };
        self.queue = VecDeque::new();
        self.queued_bytes = 0;
        if self.transport() != Transport::WebSocket {
            self.sent_of_front = 0;
            return;
        }
        if let Some(front) = started {
            self.queued_bytes = (front.len() - self.sent_of_front as usize) as u32;
            self.queue.push_back(front);
        } else {
            self.sent_of_front = 0;
        }
        self.queued_bytes += WS_CLOSE_SLOW_CONSUMER.len() as u32;
        self.queue
            .push_back(Bytes::from_static(WS_CLOSE_SLOW_CONSUMER));
    }

    /// Gives up on the connection: its queue is freed, whoever serves it
    /// closes it.
    pub fn close_now(&mut self) {
        self.queue = VecDeque::new();
        self.queued_bytes = 0;
        self.sent_of_front = 0;
        self.dead = true;
        self.wake();
    }

    /// The bytes to write next: up to `sys::IOV_MAX` frames, the first from
    /// where the kernel stopped.
    pub fn unsent(&self) -> impl Iterator<Item = &[u8]> {
        let skip = self.sent_of_front as usize;
        self.queue
            .iter()
            .take(crate::sys::IOV_MAX)
            .enumerate()
            .map(move |(i, f)| if i == 0 { &f[skip..] } else { &f[..] })
    }

    /// The kernel took `sent` of the `offered` bytes of [`Conn::unsent`].
    /// Less than offered: the socket is full, and the rest waits for the
    /// next `EPOLLOUT`.
    pub fn wrote(&mut self, sent: usize, offered: usize) {
        self.advance(sent);
        if self.queue.is_empty() {
            self.release_queue();
            self.blocked = false;
        } else if sent < offered {
            self.blocked = true;
            self.wake();
        }
    }

    /// A write was refused: the socket is full (`would_block`), or broken.
    pub fn write_refused(&mut self, would_block: bool) {
        if would_block {
            self.blocked = true;
        } else {
            self.dead = true;
        }
        self.wake();
    }

    pub(super) fn advance(&mut self, mut sent: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection as values: no socket behind its descriptor number.
    fn conn(state: State) -> Conn {
        let mut c = Conn::new(-1, 0, ([127, 0, 0, 1], 1).into());
        c.state = state;
        c
    }

    fn unsent(c: &Conn) -> Vec<Vec<u8>> {
        c.unsent().map(<[u8]>::to_vec).collect()
    }

    #[test]
    fn an_identity_kept_as_text_says_what_its_grant_said() {
        let p = |s| ChannelPattern::parse(s).unwrap();
        let id = Identity::new(
            Some("al ice"),
            &[p("news"), p("room.*")],
            &[p("room.*")],
            Some("{\"role\":\"admin\"}"),
        );
        assert_eq!(id.sub(), Some("al ice"));
        assert_eq!(id.claims(), Some("{\"role\":\"admin\"}"));
        assert!(id.may_read("news") && id.may_read("room.1") && !id.may_read("news2"));
        assert!(id.may_send("room.1") && !id.may_send("news") && !id.may_send("room"));
        let everything = Identity::new(None, &[p("*")], &[], None);
        assert_eq!((everything.sub(), everything.claims()), (None, None));
        assert!(everything.may_read("x") && !everything.may_send("x"));
    }

    #[test]
    fn sse_bytes_are_the_chunk_or_its_events() {
        let mut chunk = Vec::new();
        protocol::sse::push_chunk(&mut chunk, SSE_HEARTBEAT);
        assert_eq!(chunk, SSE_HEARTBEAT_CHUNK);
        let chunk = Bytes::from(chunk);
        assert_eq!(sse_bytes(&chunk, true), chunk);
        assert_eq!(&sse_bytes(&chunk, false)[..], SSE_HEARTBEAT);
    }

    #[test]
    fn the_queue_is_written_from_where_the_kernel_stopped() {
        let mut c = conn(State::Sse { chunked: true });
        c.enqueue(Bytes::from_static(b"abc"), 100).unwrap();
        c.enqueue(Bytes::from_static(b"defg"), 100).unwrap();
        assert_eq!(c.queued_bytes, 7);
        // A short write: the rest waits for the socket.
        c.wrote(4, 7);
        assert!(c.blocked);
        assert_eq!(unsent(&c), [b"efg".to_vec()]);
        c.wrote(3, 3);
        assert!(!c.blocked && c.queue.is_empty() && c.queued_bytes == 0);
        assert_eq!(c.queue.capacity(), 0, "an idle connection keeps no buffer");
    }

    #[test]
    fn over_its_budget_a_frame_comes_back_and_a_dead_connection_takes_nothing() {
        let mut c = conn(State::Sse { chunked: true });
        c.enqueue(Bytes::from_static(b"12345678"), 10).unwrap();
        let back = c.enqueue(Bytes::from_static(b"abc"), 10).unwrap_err();
        assert_eq!(&back[..], b"abc");
        assert_eq!(c.queued_bytes, 8);
        c.dead = true;
        assert!(c.enqueue(Bytes::from_static(b"x"), 10).is_ok());
        assert_eq!(c.queued_bytes, 8);
    }

    #[test]
    fn a_slow_websocket_finishes_its_started_frame_then_gets_1008() {
        let mut c = conn(State::websocket(1024, None));
        for frame in [&b"first"[..], b"second", b"third"] {
            c.enqueue(Bytes::copy_from_slice(frame), 100).unwrap();
        }
        c.wrote(2, 16);
        c.slow_consumer_farewell();
        assert_eq!(
            unsent(&c),
            [b"rst".to_vec(), WS_CLOSE_SLOW_CONSUMER.to_vec()]
        );
        assert_eq!(c.queued_bytes as usize, 3 + WS_CLOSE_SLOW_CONSUMER.len());
        c.close_now();
        assert!(c.dead && c.queue.is_empty());
        // An SSE stream just ends.
        let mut c = conn(State::Sse { chunked: true });
        c.enqueue(Bytes::from_static(b"data: x\n\n"), 100).unwrap();
        c.slow_consumer_farewell();
        assert_eq!(c.unsent().count(), 0);
    }

    #[test]
    fn asked_to_go_a_stream_closes_behind_its_farewell_and_a_request_is_left_to_its_task() {
        let mut c = conn(State::websocket(1024, None));
        assert_eq!(c.ask_to_go().as_deref(), Some(WS_CLOSE_SERVICE_RESTART));
        assert!(matches!(c.state, State::Closing { shut_wr: false }));
        assert_eq!(c.drain, Drain::Asked);
        // An SSE stream: a retry hint, then (chunked) the body's end.
        let mut c = conn(State::Sse { chunked: false });
        let retry = c.ask_to_go().unwrap();
        assert!(retry.starts_with(b"retry: "), "{retry:?}");
        let mut c = conn(State::Sse { chunked: true });
        let farewell = c.ask_to_go().unwrap();
        let chunk = &farewell[..farewell.len() - protocol::sse::LAST_CHUNK.len()];
        assert!(
            farewell.ends_with(protocol::sse::LAST_CHUNK),
            "{farewell:?}"
        );
        assert!(
            chunk[protocol::sse::chunk_body(chunk)].starts_with(b"retry: "),
            "{farewell:?}"
        );
        let mut c = conn(State::Request);
        assert_eq!(c.ask_to_go(), None);
        assert!(matches!(c.state, State::Request) && c.drain == Drain::Asked);
        let mut c = conn(State::websocket(1024, None));
        assert_eq!(c.token_expired().as_deref(), Some(WS_CLOSE_TOKEN_EXPIRED));
        assert_eq!(conn(State::Sse { chunked: false }).token_expired(), None);
        assert_eq!(
            conn(State::Sse { chunked: true })
                .token_expired()
                .as_deref(),
            Some(protocol::sse::LAST_CHUNK)
        );
    }
}
