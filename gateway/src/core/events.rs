//! The core's IO: its one readiness source, the streams it serves without
//! a task, and every write to a connection (`Conn` itself does none).
//!
//! Every connection of a core is registered, once, at accept, in the core's
//! epoll set (edge-triggered, `EPOLLIN | EPOLLOUT | EPOLLRDHUP`, its slab
//! key as the token). monoio awaits that one descriptor (an io_uring poll on
//! the epoll fd), and [`event_loop`] takes the events in batches:
//!
//! - a connection served by a task (reading its request head, holding a
//!   long-poll) gets `readable` set in its slab entry and its task woken;
//! - a *parked* connection — an open WebSocket or SSE stream, or one
//!   lingering after its last bytes — has no task at all: it is data in the
//!   slab, and the loop reads it (WebSocket frames through the sans-IO
//!   session kept in the entry; SSE input discarded), writes what the
//!   socket refused earlier, and closes it.
//!
//! Why: an idle connection held as a suspended task cost ~400 bytes (the
//! future, the runtime's socket handle and its pending poll). Measured
//! alternatives are in the README ("How it works").
//!
//! Edge-triggered: an edge is never lost because the registration is made
//! before anything is read, and `readable` is cleared only by a read that
//! finds nothing (`EAGAIN`), so whoever serves the connection reads until
//! then, or keeps it on the attention list. `EPOLLOUT` edges come only
//! after a write was refused (the kernel sets `SOCK_NOSPACE`), so idle
//! connections cost no wake-ups.
//!
//! The attention list is how the rest of the core (fan-out, the sweep, the
//! drain) hands a parked connection to the loop: it died, was asked to
//! go, or has input left over from a bounded read. It is per thread (one
//! core per thread), so [`crate::core::Conn::wake`] reaches it without a
//! reference to the core.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::{Poll, Waker};

use bytes::Bytes;
use protocol::deflate::{Deflater, Window};
use protocol::ws::{self, Closing, MessagePart, OpCode};
use tracing::{debug, info, warn};

use crate::core::conn::{Gone, TwoWay, WsSession, NOT_STAGED, SOCKETLESS};
use crate::core::{yield_now, Conn, Core, Drain, PollAnswer, State, Transport};
use crate::sys;

/// Events taken per `epoll_wait`; a fuller batch is taken again after the
/// other tasks of the core have had a turn.
const EVENTS_PER_WAIT: usize = 512;
/// Reads handled per turn of one parked WebSocket (bounded, so one busy
/// client cannot hold the core); the rest waits on the attention list.
const WS_READS_PER_TURN: usize = 16;
/// How long a closing connection waits for its last bytes to leave and the
/// peer to close its side, before it is closed regardless (whole seconds:
/// the sweep's clock; closed one to two seconds after this).
pub const LINGER_S: u32 = 2;

struct Attention {
    keys: Vec<u32>,
    waker: Option<Waker>,
}

thread_local! {
    static ATTENTION: RefCell<Attention> = const {
        RefCell::new(Attention { keys: Vec::new(), waker: None })
    };
}

/// Puts a parked connection on this core's attention list (its entry's
/// `attention` flag keeps it there once) and wakes the loop.
pub fn attend(key: u32) {
    ATTENTION.with(|a| {
        let mut a = a.borrow_mut();
        a.keys.push(key);
        if let Some(w) = a.waker.take() {
            w.wake();
        }
    });
}

/// Result of one non-blocking read into the core's scratch buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    Data,
    Eof,
    WouldBlock,
}

/// One non-blocking read of at most `max` bytes of `fd` into the core's
/// scratch buffer; `f` sees the bytes read.
pub fn read_into(core: &Core, fd: RawFd, f: impl FnOnce(&mut [u8]), max: usize) -> Read {
    let mut scratch = core.scratch.borrow_mut();
    let len = max.min(scratch.len());
    match sys::recv(fd, &mut scratch[..len]) {
        Ok(0) => Read::Eof,
        Ok(n) => {
            f(&mut scratch[..n]);
            Read::Data
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Read::WouldBlock
        }
        Err(_) => Read::Eof,
    }
}

/// One non-blocking read of connection `c` (at most `max` bytes of the
/// socket): `f` sees what the client sent, decrypted on a TLS connection
/// (each record's data in turn; a read may bring none, only handshake
/// bytes or part of a record). The handshake's answers are sent from
/// here (see [`receive_tls`]). A TLS failure is the connection's end
/// (`Eof`), counted and logged.
pub fn read_conn(
    core: &Core,
    c: &mut Conn,
    max: usize,
    mut f: impl FnMut(&mut Conn, &mut [u8]),
) -> Read {
    let fd = c.fd;
    if fd == SOCKETLESS {
        // An HTTP/2 stream's request path: its bytes were all given.
        return Read::WouldBlock;
    }
    if c.expects_proxy_header || !c.tls {
        // A PROXY header comes before the TLS handshake, in clear.
        return read_into(core, fd, |bytes| f(c, bytes), max);
    }
    let mut result = Ok(());
    let read = read_into(core, fd, |raw| result = receive_tls(c, raw, &mut f), max);
    if read == Read::Eof && c.with_tls(|t| t.is_handshaking()) == Some(true) {
        crate::tls::Handshake::Closed.count();
    }
    match result {
        Ok(()) => read,
        Err(()) => Read::Eof,
    }
}

/// Feeds ciphertext read from `c` (or left after its PROXY header) to its
/// TLS session: `f` gets the plaintext. Err when the session failed (or
/// the client closed it): the connection ends; a failed handshake is
/// counted and logged, and its alert sent if the socket takes it.
pub fn receive_tls(
    c: &mut Conn,
    raw: &mut [u8],
    f: &mut dyn FnMut(&mut Conn, &mut [u8]),
) -> Result<(), ()> {
    let Some(mut tls) = c.take_tls() else {
        f(c, raw);
        return Ok(());
    };
    let handshaking = tls.is_handshaking();
    let result = tls.receive(raw, &mut |plain| f(c, plain));
    if handshaking && !tls.is_handshaking() {
        debug!(peer = %c.client(), "TLS handshake done");
    }
    let answer = !tls.pending().is_empty();
    c.put_tls(tls);
    match result {
        Ok(crate::tls::Received::Open) => {
            // The handshake's next flight, and anything queued while the
            // session was out of the side table (no write could seal it).
            if !c.blocked && (answer || !c.queue.is_empty()) {
                write(c);
            }
            Ok(())
        }
        Ok(crate::tls::Received::Closed) => Err(()),
        Err(failure) => {
            if failure.during_handshake {
                failure.kind.count();
                debug!(peer = %c.client(), reason = failure.kind.name(), error = %failure.error, "TLS handshake failed");
            } else {
                info!(peer = %c.client(), error = %failure.error, "TLS session broken by the client, closing");
            }
            c.with_tls(|tls| tls.alert_after_failure());
            write(c);
            Err(())
        }
    }
}

/// What one read of `c` tells about it, applied to it: bytes are a sign of
/// life (the pong check), finding none clears `readable` until the next
/// epoll event, the end makes it dead. Returns the read.
pub fn note_read(c: &mut Conn, read: Read, now_s: u32) -> Read {
    match read {
        Read::Data => c.last_heard_s = now_s,
        Read::WouldBlock => c.readable = false,
        Read::Eof => c.dead = true,
    }
    read
}

/// Serves this core's readiness events and parked connections, forever.
///
/// A parked connection that needs a task again (the next request of a
/// keep-alive connection has arrived) is handed to `spawn`.
pub async fn event_loop(core: Rc<Core>, spawn: fn(Rc<Core>, u32)) {
    let handle = match core.epoll.monoio_handle() {
        Ok(h) => h,
        Err(e) => {
            warn!(core = core.index, error = %e, "epoll handle unusable; this core serves no connection");
            return;
        }
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    let mut ready = Box::pin(handle.readable(true));
    let mut tasks = Vec::new();
    loop {
        let n = core.epoll.take(&mut events);
        for ev in &events[..n] {
            let (flags, key) = (ev.events, ev.u64 as u32);
            core.on_event(key, flags, &mut tasks);
        }
        let attended = core.attend_all(&mut tasks);
        for key in tasks.drain(..) {
            spawn(core.clone(), key);
        }
        if n == events.len() || attended {
            // More may be waiting: let the core's other tasks run first.
            yield_now().await;
            continue;
        }
        let fired = poll_fn(|cx| {
            if ready.as_mut().poll(cx).is_ready() {
                return Poll::Ready(true);
            }
            ATTENTION.with(|a| {
                let mut a = a.borrow_mut();
                if a.keys.is_empty() {
                    a.waker = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(false)
                }
            })
        })
        .await;
        if fired {
            ready = Box::pin(handle.readable(true));
        }
    }
}

impl Core {
    /// One epoll event for connection `key`.
    fn on_event(&self, key: u32, flags: u32, tasks: &mut Vec<u32>) {
        if key == crate::upstream::UPSTREAM_KEY {
            self.flush_upstream();
            return;
        }
        let readable = flags
            & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
            != 0;
        let writable = flags & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
        let parked = {
            let mut conns = self.conns.borrow_mut();
            // A key reused after its connection closed: an event from the
            // old socket at worst, and a read that finds nothing.
            let Some(c) = conns.get_mut(key as usize) else {
                return;
            };
            c.readable |= readable;
            if writable && c.blocked {
                write(c);
            }
            if !c.parked {
                c.wake();
                return;
            }
            true
        };
        if parked && self.serve_parked(key) {
            tasks.push(key);
        }
    }

    /// Serves the parked connections on the attention list. Returns
    /// whether there were any.
    fn attend_all(&self, tasks: &mut Vec<u32>) -> bool {
        let keys = ATTENTION.with(|a| std::mem::take(&mut a.borrow_mut().keys));
        if keys.is_empty() {
            return false;
        }
        for &key in &keys {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(key as usize) else {
                continue;
            };
            c.attention = false;
            if !c.parked {
                continue;
            }
            drop(conns);
            if self.serve_parked(key) {
                tasks.push(key);
            }
        }
        // Give the list's buffer back for the next round.
        ATTENTION.with(|a| {
            let mut a = a.borrow_mut();
            if a.keys.is_empty() {
                let mut keys = keys;
                keys.clear();
                a.keys = keys;
            }
        });
        true
    }

    /// Does what a parked connection needs now: reads what it sent, ends a
    /// held long-poll, lets a closing one linger, closes a dead one. True
    /// when it needs a task again: between requests, the next one arrived.
    pub fn serve_parked(&self, key: u32) -> bool {
        let (close, needs_task) = {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(key as usize) else {
                return false;
            };
            if !c.dead {
                match c.transport() {
                    Transport::WebSocket if c.readable => self.read_websocket(c, key),
                    Transport::Sse | Transport::Closing if c.readable => discard_input(self, c),
                    Transport::LongPoll => self.serve_held_poll(c, key),
                    _ => {}
                }
            }
            let mut needs_task = false;
            if !c.dead && c.transport() == Transport::Http {
                if c.drain == Drain::Asked {
                    // Between requests when the gateway drains: gone.
                    c.drain = Drain::Seen;
                    c.state = State::Closing { shut_wr: false };
                    c.deadline_s = 0;
                } else if c.readable {
                    c.parked = false;
                    needs_task = true;
                }
            }
            if !c.dead && c.transport() == Transport::Closing {
                self.linger(c);
            }
            (c.dead, needs_task)
        };
        if close {
            self.deregister(key);
        }
        needs_task
    }

    /// A held long-poll without a task: the client going away is seen (a
    /// next request it pipelined is left in the socket until the answer
    /// has gone); once answered, timed out or asked to go by the drain, it
    /// leaves its channels and waits for the next request, or closes.
    pub(crate) fn serve_held_poll(&self, c: &mut Conn, key: u32) {
        let State::LongPoll {
            answer,
            cursor,
            keep_alive,
        } = c.state
        else {
            return;
        };
        if c.readable {
            match sys::peek(c.fd) {
                Ok(0) => c.dead = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.readable = false,
                Err(_) => c.dead = true,
            }
            if c.dead {
                return;
            }
        }
        let keep_alive = keep_alive && !crate::ops::drain::draining();
        match answer {
            PollAnswer::Queued if c.all_sent() => self.end_poll(c, key, keep_alive),
            PollAnswer::Queued => {}
            PollAnswer::TimedOut => {
                self.answer_poll_empty(c, key, cursor, keep_alive);
                self.end_poll(c, key, keep_alive);
            }
            PollAnswer::Waiting if c.drain == Drain::Asked => {
                c.drain = Drain::Seen;
                self.answer_poll_empty(c, key, cursor, false);
                self.end_poll(c, key, false);
            }
            PollAnswer::Waiting => {}
        }
    }

    /// Queues a long-poll answer with no message and `cursor`.
    fn answer_poll_empty(&self, c: &mut Conn, key: u32, cursor: u64, keep_alive: bool) {
        let answer = self.empty_poll_answer(key, c.cors, cursor, keep_alive);
        send(c, Bytes::from(answer), self.cfg.outbound_queue_bytes_max);
    }

    /// Reads an open WebSocket's frames through its session, queues the
    /// replies, hands a two-way client's whole messages on, and turns it to
    /// `Closing` when the session ends. A two-way client whose messages
    /// wait for room upstream is not read (its input stays in the socket).
    fn read_websocket(&self, c: &mut Conn, key: u32) {
        let max = self.cfg.outbound_queue_bytes_max;
        for _ in 0..WS_READS_PER_TURN {
            match &c.state {
                State::WebSocket { session, .. } if !crate::core::two_way::paused(session) => {}
                _ => return,
            }
            let mut fed: Option<(Vec<u8>, bool)> = None;
            let read = read_conn(self, c, usize::MAX, |c, bytes| match &mut fed {
                // Records after the close: nothing more is read.
                Some((_, true)) => {}
                Some((answers, ended)) => {
                    let (more, end) = self.websocket_input(c, key, bytes);
                    answers.extend_from_slice(&more);
                    *ended = end;
                }
                None => fed = Some(self.websocket_input(c, key, bytes)),
            });
            if let Some((answers, ended)) = fed {
                if !answers.is_empty() {
                    send(c, Bytes::from(answers), max);
                }
                if ended {
                    c.state = State::Closing { shut_wr: false };
                    c.deadline_s = 0;
                    return;
                }
            }
            if note_read(c, read, self.now_s()) != Read::Data || c.dead {
                return;
            }
        }
        if c.readable {
            // Input left after this turn's reads: another turn later.
            c.wake();
        }
    }

    /// Feeds what a WebSocket client sent (`c`, slab key `key`) to its
    /// session and acts on it: pings and the close answered, a conformance
    /// echo, a two-way client's whole messages handed on. Returns the bytes
    /// to send, the answers to the messages then the session's replies (a
    /// close frame, if the client closed after them, must be last), and
    /// whether the session ended (logged, and noted for presence).
    pub fn websocket_input(&self, c: &mut Conn, key: u32, bytes: &mut [u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut complete: Vec<(Vec<u8>, bool)> = Vec::new();
        let deflate = c.state.ws_deflate();
        let State::WebSocket { session, .. } = &mut c.state else {
            return (out, false);
        };
        let WsSession {
            frames,
            echo,
            two_way,
        } = &mut **session;
        let mut inflater = self.inflater.borrow_mut();
        let end = frames.input(bytes, &mut out, &mut inflater, &mut |part, out| {
            if let Some(state) = echo.as_mut() {
                echo_part(state, part, out, deflate.map(|w| (w, &self.deflater)));
            } else if let Some(t) = two_way.as_deref_mut() {
                collect(t, part, &mut complete);
            }
        });
        drop(inflater);
        let mut answers = Vec::new();
        for (message, binary) in complete {
            self.client_message(c, key, &message, binary, &mut answers);
        }
        answers.extend_from_slice(&out);
        if let Some(end) = end {
            log_session_end(c, end);
            if matches!(end, Closing::Violation { .. }) {
                c.going(Gone::ProtocolError);
            }
        }
        (answers, end.is_some())
    }

    /// A closing connection: once its last bytes have left it half-closes
    /// and waits (until the sweep's deadline) for the peer to close its
    /// side, reading and dropping what still comes: closing a socket with
    /// unread input sends a reset that can destroy what the peer has not
    /// read yet.
    fn linger(&self, c: &mut Conn) {
        if c.deadline_s == 0 {
            c.deadline_s = self.now_s() + LINGER_S;
        }
        if matches!(c.state, State::Closing { shut_wr: true }) || c.blocked || !c.queue.is_empty() {
            return;
        }
        if c.with_tls(|t| t.close_notify()) == Some(true) {
            write(c);
            if c.blocked {
                return;
            }
        }
        let _ = sys::shutdown(c.fd, std::net::Shutdown::Write);
        c.state = State::Closing { shut_wr: true };
        if c.readable {
            discard_input(self, c);
        }
    }
}

/// Queues a frame on `c`: when over its outbound budget, what is queued
/// is written first (the dispatcher queues a whole batch before it
/// writes), and a client still over it is dropped as a slow consumer.
pub fn push(c: &mut Conn, frame: Bytes, bytes_max: usize) {
    let Err(frame) = c.enqueue(frame, bytes_max) else {
        return;
    };
    if !c.blocked {
        write(c);
    }
    if let Err(frame) = c.enqueue(frame, bytes_max) {
        let wanted_bytes = c.queued_bytes as usize + frame.len();
        crate::ops::metrics::note_slow_consumer();
        warn!(
            peer = %c.client(),
            transport = ?c.transport(),
            queued_bytes = c.queued_bytes,
            wanted_bytes,
            "slow consumer: outbound queue over its limit, closing"
        );
        c.slow_consumer_farewell();
        // One attempt: the farewell leaves if the socket has room.
        write(c);
        c.close_now();
    }
}

/// Queues a frame and writes what the socket takes now.
pub fn send(c: &mut Conn, frame: Bytes, bytes_max: usize) {
    push(c, frame, bytes_max);
    if !c.blocked {
        write(c);
    }
}

/// Writes as much of `c`'s queue as the socket takes now, one `sendmsg`
/// per `sys::IOV_MAX` frames. Never blocks.
pub fn write(c: &mut Conn) {
    if c.fd == SOCKETLESS {
        // A gRPC stream: its task takes the queue.
        if !c.queue.is_empty() {
            c.wake();
        }
        return;
    }
    if c.tls {
        write_tls(c);
        return;
    }
    while !c.dead {
        if c.queue.is_empty() {
            c.wrote(0, 0);
            return;
        }
        let offered: usize = c.unsent().map(<[u8]>::len).sum();
        match sys::sendmsg(c.fd, c.unsent()) {
            Ok(sent) => {
                c.wrote(sent, offered);
                if sent < offered {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let would_block = e.kind() == io::ErrorKind::WouldBlock;
                if !would_block {
                    debug!(fd = c.fd, error = %e, "send failed");
                }
                c.write_refused(would_block);
                return;
            }
        }
    }
}

thread_local! {
    /// A TLS connection's next record: its plaintext, gathered from the
    /// queued frames, and the record as sealed. Per thread (one core), so
    /// no connection keeps a buffer for them.
    static SEALING: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// [`write`] for a TLS connection: what the session holds goes first (a
/// handshake flight, the rest of a record), then the queue, sealed a
/// record at a time; what the socket does not take of a record stays in
/// the session, and the connection is `blocked` until it has left.
fn write_tls(c: &mut Conn) {
    let Some(mut tls) = c.take_tls() else { return };
    SEALING.with(|sealing| {
        let (plain, sealed) = &mut *sealing.borrow_mut();
        while !c.dead {
            if !tls.pending().is_empty() {
                match sys::sendmsg(c.fd, [tls.pending()]) {
                    Ok(sent) => tls.sent(sent),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let would_block = e.kind() == io::ErrorKind::WouldBlock;
                        if !would_block {
                            debug!(fd = c.fd, error = %e, "send failed");
                        }
                        c.write_refused(would_block);
                        break;
                    }
                }
                if !tls.pending().is_empty() {
                    c.write_refused(true);
                    break;
                }
            }
            if c.queue.is_empty() || tls.is_handshaking() {
                c.wrote(0, 0);
                break;
            }
            plain.clear();
            for frame in c.unsent() {
                let room = crate::tls::RECORD_PLAINTEXT_BYTES - plain.len();
                plain.extend_from_slice(&frame[..frame.len().min(room)]);
                if frame.len() >= room {
                    break;
                }
            }
            sealed.clear();
            if let Err(e) = tls.seal(plain, sealed) {
                warn!(peer = %c.client(), error = %e, "TLS: could not seal a record, closing");
                c.write_refused(false);
                break;
            }
            c.advance(plain.len());
            match sys::sendmsg(c.fd, [&sealed[..]]) {
                Ok(sent) => tls.unsent(&sealed[sent..]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
                {
                    tls.unsent(sealed)
                }
                Err(e) => {
                    debug!(fd = c.fd, error = %e, "send failed");
                    c.write_refused(false);
                    break;
                }
            }
        }
        // A large burst's buffers are not kept.
        if plain.capacity() > crate::tls::RECORD_PLAINTEXT_BYTES {
            *plain = Vec::new();
        }
        if sealed.capacity() > 2 * crate::tls::RECORD_PLAINTEXT_BYTES {
            *sealed = Vec::new();
        }
    });
    c.put_tls(tls);
}

/// One delivery batch's frames, staged per core: each entry is a frame and
/// the index of the same connection's next one.
pub type Stage = Vec<(Bytes, u32)>;

/// Queues a frame of the current delivery batch on `c`: staged in the
/// core's batch buffer while its queue is empty and the socket open (most
/// connections: nothing of theirs is allocated), queued otherwise, within
/// the outbound budget either way.
pub fn stage(c: &mut Conn, stage: &mut Stage, frame: Bytes, bytes_max: usize) {
    if c.dead {
        return;
    }
    let staging = c.staged != NOT_STAGED || (c.queue.is_empty() && !c.blocked);
    if !staging {
        push(c, frame, bytes_max);
        return;
    }
    let total = c.queued_bytes as usize + frame.len();
    if total > bytes_max {
        // Over the budget: what is staged goes to the socket first, then
        // the queue decides (it may be a slow consumer).
        write_staged(c, stage);
        push(c, frame, bytes_max);
        return;
    }
    c.queued_bytes = total as u32;
    let index = stage.len() as u32;
    stage.push((frame, NOT_STAGED));
    if c.staged == NOT_STAGED {
        c.staged = index;
    } else {
        stage[c.staged_last as usize].1 = index;
    }
    c.staged_last = index;
}

/// Moves `c`'s staged frames (see [`stage`]) to its queue, in order, when
/// the pass that staged them is not going to write it before the stage is
/// reused.
pub fn unstage(c: &mut Conn, stage: &Stage) {
    let mut next = std::mem::replace(&mut c.staged, NOT_STAGED);
    while next != NOT_STAGED && !c.dead {
        let (frame, after) = &stage[next as usize];
        c.requeue(frame.clone());
        next = *after;
    }
}

/// Writes `c`'s staged frames (see [`stage`]): what the socket does not
/// take goes to its queue, to be written at the next `EPOLLOUT`.
pub fn write_staged(c: &mut Conn, stage: &Stage) {
    if c.fd == SOCKETLESS {
        unstage(c, stage);
        c.wake();
        return;
    }
    if c.tls {
        // Sealed from the queue, a record at a time.
        unstage(c, stage);
        write(c);
        return;
    }
    let mut next = std::mem::replace(&mut c.staged, NOT_STAGED);
    let after = |i: u32| stage[i as usize].1;
    while next != NOT_STAGED && !c.dead {
        let chain = || {
            std::iter::successors(Some(next), |&i| Some(after(i)).filter(|&n| n != NOT_STAGED))
                .take(sys::IOV_MAX)
                .map(|i| &stage[i as usize].0[..])
        };
        let offered: usize = chain().map(<[u8]>::len).sum();
        let sent = match sys::sendmsg(c.fd, chain()) {
            Ok(sent) => sent,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                debug!(fd = c.fd, error = %e, "send failed");
                c.write_refused(false);
                return;
            }
        };
        c.queued_bytes -= sent as u32;
        // Past the frames the kernel took whole.
        let mut left = sent;
        while next != NOT_STAGED && left >= stage[next as usize].0.len() {
            left -= stage[next as usize].0.len();
            next = after(next);
        }
        if sent < offered {
            // The socket is full: the rest, the first frame from where the
            // kernel stopped, is queued.
            let mut skip = left;
            while next != NOT_STAGED {
                c.requeue(stage[next as usize].0.slice(skip..));
                skip = 0;
                next = after(next);
            }
            c.write_refused(true);
            return;
        }
    }
}

/// Logs why a WebSocket session ended.
pub fn log_session_end(c: &Conn, end: Closing) {
    match end {
        Closing::Violation { code, rule } => {
            info!(peer = %c.client(), code, rule, "websocket closed: client broke a rule");
        }
        Closing::PeerClosed { code } => debug!(fd = c.fd, ?code, "websocket closed by client"),
    }
}

/// Reads and drops what a client that has nothing to say sent (an SSE
/// client, a closing one); its end closes the connection.
fn discard_input(core: &Core, c: &mut Conn) {
    for _ in 0..WS_READS_PER_TURN {
        let read = read_into(core, c.fd, |_| {}, usize::MAX);
        if note_read(c, read, core.now_s()) != Read::Data {
            return;
        }
    }
    c.wake();
}

/// Gathers a two-way client's message part by part (the session bounds
/// its size); a whole one goes to `complete`.
fn collect(t: &mut TwoWay, part: MessagePart<'_>, complete: &mut Vec<(Vec<u8>, bool)>) {
    match part {
        MessagePart::Start { opcode, .. } => {
            t.binary = opcode == OpCode::Binary;
            t.message.clear();
        }
        MessagePart::Chunk(bytes) => t.message.extend_from_slice(bytes),
        MessagePart::End => complete.push((std::mem::take(&mut t.message), t.binary)),
    }
}

/// What the conformance endpoint's echo has sent of the message in
/// progress.
#[derive(Debug, Clone, Copy)]
pub struct Echo {
    opcode: OpCode,
    first: bool,
    /// The message came compressed: it is echoed whole, in one frame.
    compressed: bool,
}

impl Echo {
    pub fn new() -> Echo {
        Echo {
            opcode: OpCode::Binary,
            first: true,
            compressed: false,
        }
    }
}

/// Echoes a message part as it arrives: a plain message fragment by
/// fragment, as it came; a compressed one (it arrives whole) in one frame,
/// compressed again with the connection's window and the core's
/// compressor (`deflate`), whatever its size: an echo mirrors. (The
/// conformance suite's client reads an uncompressed echo of a compressed
/// message as a message of another type.)
pub fn echo_part(
    state: &mut Echo,
    part: MessagePart<'_>,
    out: &mut Vec<u8>,
    deflate: Option<(Window, &RefCell<Deflater>)>,
) {
    match part {
        MessagePart::Start { opcode, compressed } => {
            state.opcode = opcode;
            state.first = true;
            state.compressed = compressed;
        }
        MessagePart::Chunk(bytes) if state.compressed => {
            match deflate {
                Some((window, deflater)) => ws::encode_compressed(
                    state.opcode,
                    bytes,
                    &mut deflater.borrow_mut(),
                    window,
                    out,
                ),
                None => ws::encode_frame(state.opcode, bytes, out),
            }
            state.first = false;
        }
        MessagePart::Chunk(bytes) => {
            if !bytes.is_empty() {
                ws::encode_fragment(state.first, state.opcode, false, bytes, out);
                state.first = false;
            }
        }
        // A compressed message went out whole with its chunk.
        MessagePart::End if state.compressed && !state.first => {}
        // An empty one: no chunk came.
        MessagePart::End if state.compressed => {
            echo_part(state, MessagePart::Chunk(&[]), out, deflate)
        }
        MessagePart::End => ws::encode_fragment(state.first, state.opcode, true, &[], out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;

    fn core() -> Core {
        Core::lone(Box::leak(Box::default()), 1)
    }

    /// A connection parked as `transport` on one end of a socket pair; the
    /// other end is the client.
    fn parked(core: &Core, transport: Transport) -> (u32, UnixStream) {
        let (ours, client) = UnixStream::pair().unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let key = core.register(ours.into_raw_fd(), ([127, 0, 0, 1], 1).into());
        let mut conns = core.conns.borrow_mut();
        let c = &mut conns[key as usize];
        c.state = match transport {
            Transport::WebSocket => State::websocket(1024, None),
            _ => State::Sse { chunked: true },
        };
        c.parked = true;
        (key, client)
    }

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut f = vec![first, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn readable(core: &Core, key: u32) {
        core.conns.borrow_mut()[key as usize].readable = true;
        core.serve_parked(key);
    }

    #[test]
    fn a_parked_websocket_is_answered_and_closed_by_the_loop_without_a_task() {
        let core = core();
        let (key, mut client) = parked(&core, Transport::WebSocket);
        client.write_all(&masked(0x89, b"hi")).unwrap();
        readable(&core, key);
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, &[0x8a, 2, b'h', b'i']);
        assert!(
            !core.conns.borrow()[key as usize].readable,
            "read until EAGAIN"
        );

        // The client closes (1000): the close is answered, the write side
        // shut down, and the connection lingers for the peer's end.
        client.write_all(&masked(0x88, &[0x03, 0xe8])).unwrap();
        readable(&core, key);
        let mut close = Vec::new();
        client.read_to_end(&mut close).unwrap();
        assert_eq!(close, [0x88, 2, 0x03, 0xe8]);
        {
            let conns = core.conns.borrow();
            let c = &conns[key as usize];
            assert!(matches!(c.state, State::Closing { shut_wr: true }) && c.deadline_s > 0);
        }
        drop(client);
        readable(&core, key);
        assert!(
            core.conns.borrow().get(key as usize).is_none(),
            "closed at the peer's end"
        );
    }

    #[test]
    fn the_echo_sends_a_compressed_message_back_compressed_and_a_plain_one_plain() {
        let core = core();
        let (key, mut client) = parked(&core, Transport::WebSocket);
        {
            let mut conns = core.conns.borrow_mut();
            let c = &mut conns[key as usize];
            c.state = State::websocket(1024, Some(Echo::new()));
            c.state.negotiated_deflate(Window::Full);
        }
        let compress = |payload: &[u8]| {
            let mut out = Vec::new();
            Deflater::default().compress(payload, Window::Full, &mut out);
            out
        };
        let text = "ab".repeat(300);
        for message in [text.as_bytes(), b"hi", b""] {
            client.write_all(&masked(0xC1, &compress(message))).unwrap();
        }
        client.write_all(&masked(0x81, b"plain")).unwrap();
        readable(&core, key);
        let mut frame = || {
            let mut head = [0u8; 2];
            client.read_exact(&mut head).unwrap();
            let mut payload = vec![0u8; usize::from(head[1])];
            client.read_exact(&mut payload).unwrap();
            (head[0], payload)
        };
        // Each compressed one back compressed, whole, whatever its size.
        let mut inflater = protocol::deflate::Inflater::default();
        for message in [text.as_bytes(), b"hi", b""] {
            let (b0, payload) = frame();
            assert_eq!(b0, 0xC1, "FIN, RSV1, text");
            assert_eq!(inflater.inflate(&payload, 1024), Ok(message));
        }
        // A plain message is echoed as it arrives, fragment by fragment.
        assert_eq!(frame(), (0x01, b"plain".to_vec()));
        assert_eq!(frame(), (0x80, Vec::new()));
    }

    #[test]
    fn a_parked_sse_stream_drops_input_and_closes_at_eof() {
        let core = core();
        let (key, mut client) = parked(&core, Transport::Sse);
        client.write_all(b"nobody listens to this").unwrap();
        readable(&core, key);
        assert!(core.conns.borrow().get(key as usize).is_some());
        drop(client);
        readable(&core, key);
        assert!(core.conns.borrow().get(key as usize).is_none());
    }

    #[test]
    fn a_rule_breaking_websocket_is_closed_with_its_code() {
        let core = core();
        let (key, mut client) = parked(&core, Transport::WebSocket);
        // Unmasked: 1002.
        client.write_all(&[0x81, 1, b'x']).unwrap();
        readable(&core, key);
        let mut close = [0u8; 4];
        client.read_exact(&mut close).unwrap();
        assert_eq!(close[0], 0x88, "a close frame");
        assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1002);
        assert_eq!(
            core.conns.borrow()[key as usize].transport(),
            Transport::Closing
        );
    }

    #[test]
    fn a_wake_while_parked_puts_the_connection_on_the_attention_list_once() {
        let core = core();
        let (key, _client) = parked(&core, Transport::Sse);
        {
            let mut conns = core.conns.borrow_mut();
            conns[key as usize].dead = true;
            conns[key as usize].wake();
            conns[key as usize].wake();
        }
        assert_eq!(ATTENTION.with(|a| a.borrow().keys.clone()), vec![key]);
        assert!(core.attend_all(&mut Vec::new()));
        assert!(
            core.conns.borrow().get(key as usize).is_none(),
            "dead: closed"
        );
        assert!(!core.attend_all(&mut Vec::new()));
    }

    #[test]
    fn a_staged_batch_is_written_at_once_and_only_its_tail_queued() {
        let core = core();
        let (key, mut client) = parked(&core, Transport::Sse);
        // 1 MB in 100 frames: more than a socket pair's buffer.
        let frames: Vec<Bytes> = (0..100u8).map(|i| Bytes::from(vec![i; 10_000])).collect();
        let mut batch = Stage::new();
        {
            let mut conns = core.conns.borrow_mut();
            let c = &mut conns[key as usize];
            for f in &frames {
                stage(c, &mut batch, f.clone(), 1 << 30);
            }
            assert_eq!(c.queue.capacity(), 0, "staged, not queued");
            assert_eq!(c.queued_bytes, 1_000_000);
            write_staged(c, &batch);
            assert!(c.blocked && !c.queue.is_empty(), "the tail is queued");
            assert_eq!(c.staged, NOT_STAGED);
            assert!(c.queued_bytes < 1_000_000);
        }
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 1_000_000];
            client.read_exact(&mut got).unwrap();
            got
        });
        while !core.conns.borrow()[key as usize].queue.is_empty() {
            let mut conns = core.conns.borrow_mut();
            write(&mut conns[key as usize]);
            drop(conns);
            std::thread::yield_now();
        }
        let got = reader.join().unwrap();
        let want: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        assert!(got == want, "every byte once, in order");
        assert_eq!(core.conns.borrow()[key as usize].queued_bytes, 0);
    }

    #[test]
    fn frames_left_staged_by_an_unfinished_pass_go_out_before_anything_sent_later() {
        let core = core();
        let (key, mut client) = parked(&core, Transport::Sse);
        let mut batch = Stage::new();
        {
            let mut conns = core.conns.borrow_mut();
            let c = &mut conns[key as usize];
            for f in [&b"one "[..], b"two "] {
                stage(c, &mut batch, Bytes::from_static(f), 1 << 20);
            }
            // The pass stops before this connection: its frames leave the
            // stage (reused by the next call) for its queue, in order,
            // still counted.
            unstage(c, &batch);
            assert_eq!(c.staged, NOT_STAGED);
            assert_eq!(c.queued_bytes, 8);
            batch.clear();
            // A heartbeat meanwhile goes out behind them.
            send(c, Bytes::from_static(b"beat"), 1 << 20);
            assert!(c.queue.is_empty() && c.queued_bytes == 0);
        }
        let mut got = [0u8; 12];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one two beat");
    }
}
