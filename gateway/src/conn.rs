//! One client connection, from its first byte to its close: request heads
//! (keep-alive), then WebSocket, SSE or long-poll.
//!
//! An idle connection is a task parked on a one-shot readiness poll (no read
//! buffer of its own: it reads into the core's scratch buffer once readable)
//! and a slab entry in the core. Messages reach it without waking it: the
//! core's dispatcher writes them to the socket directly. The task runs only
//! when the client sends something, the socket is full, or a deadline passes.

use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use monoio::net::TcpStream;
use protocol::envelope;
use protocol::http::{self, Cursor, Parsed, Request};
use protocol::sse;
use protocol::ws::{self, close_code, FrameDecoder, FrameEvent, OpCode};
use tracing::{debug, info};

use crate::core::{Core, Transport};

/// How long a closing connection waits for its last bytes to leave and for
/// the peer to close its side, before the socket is dropped regardless.
const LINGER: Duration = Duration::from_secs(2);

/// Serves one accepted connection until it closes.
pub async fn serve(core: Rc<Core>, stream: TcpStream) {
    let fd = stream.as_raw_fd();
    let key = core.register(fd);
    let close = {
        let s = &stream;
        let mut io = Io {
            core: &core,
            key,
            stream: s,
            rd: pin!(None),
            wr: pin!(None),
            make_rd: move || s.readable(true),
            make_wr: move || s.writable(true),
        };
        io.run().await
    };
    if close == Close::Linger {
        linger(&core, key, &stream).await;
    }
    core.deregister(key);
}

#[derive(Debug, PartialEq, Eq)]
enum Close {
    /// Drop the socket now (peer gone, socket failed).
    Now,
    /// Let queued bytes (an error response, a close frame) reach the peer first.
    Linger,
}

/// What woke a waiting connection.
enum Wake {
    Readable,
    /// The connection must close (socket error, slow consumer, deadline).
    Dead,
    /// Long-poll: its answer has been written.
    PollAnswered,
    /// Long-poll: the poll timeout passed with nothing to say.
    PollTimedOut,
}

/// Result of one non-blocking read into the core's scratch buffer.
enum Read {
    Data,
    Eof,
    WouldBlock,
}

struct Io<'a, R, W, FR: Fn() -> R, FW: Fn() -> W> {
    core: &'a Core,
    key: u32,
    stream: &'a TcpStream,
    /// One readiness poll kept across wake-ups, re-armed after it fires.
    rd: Pin<&'a mut Option<R>>,
    /// A POLLOUT poll, armed only while the socket refuses bytes.
    wr: Pin<&'a mut Option<W>>,
    /// Make those polls: closures, because the futures' types cannot be named.
    make_rd: FR,
    make_wr: FW,
}

impl<'a, R, W, FR, FW> Io<'a, R, W, FR, FW>
where
    R: Future<Output = io::Result<()>>,
    W: Future<Output = io::Result<()>>,
    FR: Fn() -> R,
    FW: Fn() -> W,
{
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    async fn run(&mut self) -> Close {
        // Bytes of an incomplete request head, or of a request that arrived
        // before the previous one was answered. Empty — unallocated — for
        // nearly every connection, whose head arrives in one read.
        let mut pending: Vec<u8> = Vec::new();
        let limits = self.core.cfg.head_limits();
        loop {
            self.with_conn(|c, core| {
                c.transport = Transport::Http;
                c.deadline_s = core.deadline_after_ms(core.cfg.head_timeout_ms);
            });
            let (request, head_len) = loop {
                if !pending.is_empty() {
                    match http::parse_request(&pending, &limits) {
                        Ok(Parsed::Complete { request, head_len }) => break (request, head_len),
                        Ok(Parsed::Partial) => {}
                        Err(reject) => return self.refuse(&reject),
                    }
                }
                match self.next().await {
                    Wake::Readable => {}
                    _ => return Close::Now,
                }
                // Read at most what the head limit still allows, so a
                // flood of bytes is refused without being buffered.
                let room = limits.head_bytes_max + 1 - pending.len().min(limits.head_bytes_max);
                match self.read_into(|bytes| pending.extend_from_slice(bytes), room) {
                    Read::Data | Read::WouldBlock => {}
                    Read::Eof => return Close::Now,
                }
            };
            pending.drain(..head_len);
            let leftover = std::mem::take(&mut pending);
            match request {
                Request::Health { keep_alive } => {
                    let counts: Vec<u64> = self
                        .core
                        .conn_counts
                        .iter()
                        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
                        .collect();
                    if !self
                        .respond(http::health_response(&counts, keep_alive))
                        .await
                    {
                        return Close::Now;
                    }
                    if !keep_alive {
                        return Close::Linger;
                    }
                    pending = leftover;
                }
                Request::LongPoll {
                    channels,
                    since,
                    keep_alive,
                } => {
                    pending = leftover;
                    match self.long_poll(&channels, since, &mut pending).await {
                        Some(true) if keep_alive => {}
                        Some(_) => return Close::Linger,
                        None => return Close::Now,
                    }
                }
                // Streams live long: what the request allocated is handed
                // over and freed before they settle in.
                Request::Sse {
                    channels,
                    last_event_id,
                } => {
                    drop(leftover);
                    return self.sse(channels, last_event_id).await;
                }
                Request::WebSocket {
                    channels,
                    accept,
                    since,
                } => {
                    return self.websocket(channels, accept, since, leftover).await;
                }
            }
        }
    }

    fn refuse(&mut self, reject: &http::Reject) -> Close {
        info!(
            peer = %peer(self.fd()),
            status = reject.status(),
            reason = reject.reason(),
            "request refused"
        );
        self.queue(http::reject_response(reject).into());
        Close::Linger
    }

    /// Runs `f` on this connection's slab entry.
    fn with_conn<T>(&self, f: impl FnOnce(&mut crate::core::Conn, &Core) -> T) -> T {
        let mut conns = self.core.conns.borrow_mut();
        f(&mut conns[self.key as usize], self.core)
    }

    /// Queues bytes and writes what the socket takes now.
    fn queue(&self, bytes: Bytes) {
        let max = self.core.cfg.outbound_queue_bytes_max;
        self.with_conn(|c, _| {
            c.push(bytes, max);
            if !c.blocked {
                c.flush();
            }
        });
    }

    /// Queues a response and waits until the kernel has all of it.
    /// Returns false if the connection died meanwhile.
    async fn respond(&mut self, bytes: Vec<u8>) -> bool {
        self.queue(bytes.into());
        loop {
            if self.with_conn(|c, _| c.queue.is_empty() && !c.dead) {
                return true;
            }
            match self.next().await {
                Wake::Dead => return false,
                Wake::Readable => {
                    // Bytes of a pipelined request are not read yet; the
                    // readiness poll is re-armed when they are wanted.
                    if self.with_conn(|c, _| c.queue.is_empty()) {
                        return true;
                    }
                    self.readable_pause().await;
                }
                _ => {}
            }
        }
    }

    /// While only waiting for POLLOUT with readable input pending, wait for
    /// writability alone instead of spinning on the readiness poll.
    async fn readable_pause(&mut self) {
        let _ = (self.make_wr)().await;
        self.with_conn(|c, _| c.flush());
    }

    /// Waits for the next thing this connection must act on. Writes left
    /// over from a full socket are finished here, as POLLOUT arrives.
    async fn next(&mut self) -> Wake {
        let key = self.key as usize;
        let core = self.core;
        let make_rd = &self.make_rd;
        let make_wr = &self.make_wr;
        let rd = &mut self.rd;
        let wr = &mut self.wr;
        poll_fn(move |cx: &mut Context<'_>| loop {
            let blocked = {
                let mut conns = core.conns.borrow_mut();
                let c = &mut conns[key];
                if c.dead {
                    return Poll::Ready(Wake::Dead);
                }
                if c.transport == Transport::LongPoll {
                    if c.poll_timed_out {
                        return Poll::Ready(Wake::PollTimedOut);
                    }
                    if c.poll_answered && c.queue.is_empty() {
                        return Poll::Ready(Wake::PollAnswered);
                    }
                }
                if !c.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    c.waker = Some(cx.waker().clone());
                }
                c.blocked
            };
            if blocked {
                if wr.is_none() {
                    wr.set(Some(make_wr()));
                }
                if let Some(f) = wr.as_mut().as_pin_mut() {
                    if let Poll::Ready(res) = f.poll(cx) {
                        wr.set(None);
                        let mut conns = core.conns.borrow_mut();
                        let c = &mut conns[key];
                        if res.is_err() {
                            c.dead = true;
                        } else {
                            c.flush();
                        }
                        continue;
                    }
                }
            }
            if rd.is_none() {
                rd.set(Some(make_rd()));
            }
            if let Some(f) = rd.as_mut().as_pin_mut() {
                if let Poll::Ready(res) = f.poll(cx) {
                    rd.set(None);
                    return Poll::Ready(if res.is_ok() {
                        Wake::Readable
                    } else {
                        Wake::Dead
                    });
                }
            }
            return Poll::Pending;
        })
        .await
    }

    /// One non-blocking read of at most `max` bytes into the core's scratch
    /// buffer; `f` sees the bytes read.
    fn read_into(&self, f: impl FnOnce(&mut [u8]), max: usize) -> Read {
        let mut scratch = self.core.scratch.borrow_mut();
        let len = max.min(scratch.len());
        // SAFETY: reading into the first `len` bytes of a buffer we hold
        // mutably; accepted sockets are blocking under io_uring, hence
        // MSG_DONTWAIT.
        let n = unsafe {
            libc::recv(
                self.fd(),
                scratch.as_mut_ptr() as *mut libc::c_void,
                len,
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            f(&mut scratch[..n as usize]);
            Read::Data
        } else if n == 0 {
            Read::Eof
        } else {
            match io::Error::last_os_error().kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Read::WouldBlock,
                _ => Read::Eof,
            }
        }
    }

    /// Subscribes and returns what the client missed after `since`.
    fn subscribe(
        &self,
        channels: &[String],
        since: Option<Cursor>,
        transport: Transport,
        replay_max: usize,
    ) -> crate::core::Resume {
        let core = self.core;
        let published = core
            .published_through
            .load(std::sync::atomic::Ordering::Acquire);
        let (ids, resume) = core.registry.borrow_mut().subscribe(
            self.key,
            channels,
            since,
            published,
            core.cfg.channels_max,
            replay_max,
        );
        self.with_conn(|c, core| {
            c.channels = ids;
            c.transport = transport;
            c.deadline_s = 0;
            c.poll_answered = false;
            c.poll_timed_out = false;
            // Messages up to the cursor are the client's already; live ones
            // before it may still be in flight to this core.
            c.skip_through = since.unwrap_or(0).max(core.last_id.get());
        });
        resume
    }

    fn unsubscribe(&self) {
        let channels = self.with_conn(|c, _| {
            c.transport = Transport::Http;
            std::mem::take(&mut c.channels)
        });
        self.core
            .registry
            .borrow_mut()
            .unsubscribe(self.key, &channels);
    }

    /// Everything a resume may replay: the whole history of every channel.
    fn replay_all(&self) -> usize {
        self.core.cfg.history_messages * self.core.cfg.channels_per_connection_max
    }

    async fn sse(&mut self, channels: Vec<String>, since: Option<Cursor>) -> Close {
        let resume = self.subscribe(&channels, since, Transport::Sse, self.replay_all());
        let subscribed = channels.len();
        drop(channels);
        let mut out = sse::stream_response_head().to_vec();
        for gap in &resume.gaps {
            envelope::encode_sse_gap(gap, &mut out);
        }
        self.queue(out.into());
        for m in &resume.messages {
            self.queue(m.sse.clone());
        }
        debug!(
            fd = self.fd(),
            channels = subscribed,
            replayed = resume.messages.len(),
            "sse stream open"
        );
        drop(resume);
        loop {
            match self.next().await {
                Wake::Readable => {
                    // An SSE client has nothing to say; bytes are discarded,
                    // EOF ends the stream.
                    if let Read::Eof = self.read_into(|_| {}, usize::MAX) {
                        return Close::Now;
                    }
                }
                _ => return Close::Now,
            }
        }
    }

    /// Answers one long-poll request. Returns Some(true) when the response
    /// was written and the connection can take the next request, Some(false)
    /// when it must close after the response, None when it is gone.
    async fn long_poll(
        &mut self,
        channels: &[String],
        since: Option<Cursor>,
        pending: &mut Vec<u8>,
    ) -> Option<bool> {
        let resume = self.subscribe(
            channels,
            since,
            Transport::LongPoll,
            protocol::limits::LONGPOLL_MESSAGES_MAX,
        );
        if !resume.messages.is_empty() || !resume.gaps.is_empty() {
            self.unsubscribe();
            // After a gap with nothing left to send, the client continues
            // from this core's present rather than asking for the gap again.
            let cursor = resume
                .messages
                .last()
                .map_or(self.core.last_id.get(), |m| m.id);
            let items: Vec<&[u8]> = resume.messages.iter().map(|m| &m.poll_item[..]).collect();
            let gaps: Vec<&str> = resume.gaps.iter().map(|g| &**g).collect();
            let mut out = Vec::new();
            envelope::longpoll_response(&items, cursor, &gaps, true, &mut out);
            return self.respond(out).await.then_some(true);
        }
        let cursor = self.with_conn(|c, core| {
            c.deadline_s = core.deadline_after_ms(core.cfg.poll_timeout_ms);
            c.skip_through
        });
        let limit = self.core.cfg.head_bytes_max;
        loop {
            match self.next().await {
                Wake::PollAnswered => {
                    self.unsubscribe();
                    return Some(true);
                }
                Wake::PollTimedOut => {
                    self.unsubscribe();
                    let mut out = Vec::new();
                    envelope::longpoll_response(&[], cursor, &[], true, &mut out);
                    return self.respond(out).await.then_some(true);
                }
                Wake::Dead => return None,
                Wake::Readable => {
                    // A pipelined next request: kept for after the answer,
                    // within the head limit.
                    let room = (limit + 1).saturating_sub(pending.len());
                    match self.read_into(|b| pending.extend_from_slice(b), room) {
                        Read::Eof => return None,
                        _ if pending.len() > limit => return None,
                        _ => {}
                    }
                }
            }
        }
    }

    async fn websocket(
        &mut self,
        channels: Vec<String>,
        accept: String,
        since: Option<Cursor>,
        mut leftover: Vec<u8>,
    ) -> Close {
        self.queue(ws::switching_protocols_response(&accept).into());
        drop(accept);
        let resume = self.subscribe(&channels, since, Transport::WebSocket, self.replay_all());
        drop(channels);
        if !resume.gaps.is_empty() {
            let mut out = Vec::new();
            for gap in &resume.gaps {
                envelope::encode_ws_gap(gap, &mut out);
            }
            self.queue(out.into());
        }
        for m in &resume.messages {
            self.queue(m.ws.clone());
        }
        drop(resume);
        let mut session = WsSession::new(self.core.cfg.ws_message_bytes_max);
        if !leftover.is_empty() {
            let reply = session.input(&mut leftover);
            if let Some(close) = self.ws_reply(reply) {
                return close;
            }
        }
        drop(leftover);
        loop {
            match self.next().await {
                Wake::Readable => {
                    let mut reply = WsReply::default();
                    let read = self.read_into(|bytes| reply = session.input(bytes), usize::MAX);
                    if let Read::Eof = read {
                        return Close::Now;
                    }
                    if let Some(close) = self.ws_reply(reply) {
                        return close;
                    }
                }
                _ => return Close::Now,
            }
        }
    }

    fn ws_reply(&self, reply: WsReply) -> Option<Close> {
        if !reply.out.is_empty() {
            self.queue(reply.out.into());
        }
        if let Some(code) = reply.error_code {
            info!(peer = %peer(self.fd()), code, "websocket closed for a protocol violation");
        }
        reply.closing.then_some(Close::Linger)
    }
}

/// The client-facing half of a WebSocket after the handshake: decodes what
/// the client sends and says what to answer.
struct WsSession {
    decoder: FrameDecoder,
    opcode: OpCode,
    /// Payload of the control frame being received (≤ 125 bytes; allocated
    /// only while one is in flight).
    control: Vec<u8>,
}

#[derive(Default)]
struct WsReply {
    out: Vec<u8>,
    /// The connection is to close once `out` is written.
    closing: bool,
    /// The close code sent because the client broke a rule.
    error_code: Option<u16>,
}

impl WsSession {
    fn new(message_bytes_max: u64) -> WsSession {
        WsSession {
            decoder: FrameDecoder::new(message_bytes_max),
            opcode: OpCode::Binary,
            control: Vec::new(),
        }
    }

    /// Feeds bytes from the client (unmasked in place).
    fn input(&mut self, buf: &mut [u8]) -> WsReply {
        let mut reply = WsReply::default();
        let mut pos = 0;
        while !reply.closing {
            let (used, event) = match self.decoder.decode(&mut buf[pos..]) {
                Ok(step) => step,
                Err(e) => {
                    ws::encode_close(e.close_code(), "", &mut reply.out);
                    reply.error_code = Some(e.close_code());
                    reply.closing = true;
                    break;
                }
            };
            let base = pos;
            pos += used;
            match event {
                None if used == 0 => break,
                None => {}
                Some(FrameEvent::Header(h)) => {
                    self.opcode = h.opcode;
                    self.control.clear();
                }
                Some(FrameEvent::Payload(r)) => {
                    if is_control(self.opcode) {
                        self.control
                            .extend_from_slice(&buf[base + r.start..base + r.end]);
                    }
                    // Data messages from clients carry nothing the gateway
                    // acts on yet; they are decoded (and size-checked) only.
                }
                Some(FrameEvent::FrameEnd) => match self.opcode {
                    OpCode::Ping => {
                        ws::encode_frame(OpCode::Pong, &self.control, &mut reply.out);
                        self.control = Vec::new();
                    }
                    OpCode::Close => {
                        match ws::parse_close_payload(&self.control) {
                            Ok(None) => ws::encode_close(close_code::NORMAL, "", &mut reply.out),
                            Ok(Some((code, _))) => ws::encode_close(code, "", &mut reply.out),
                            Err(e) => {
                                let code = match e {
                                    ws::CloseError::InvalidCloseCode => close_code::PROTOCOL_ERROR,
                                    ws::CloseError::InvalidReasonUtf8 => {
                                        close_code::INVALID_PAYLOAD
                                    }
                                };
                                ws::encode_close(code, "", &mut reply.out);
                                reply.error_code = Some(code);
                            }
                        }
                        reply.closing = true;
                    }
                    OpCode::Pong => self.control = Vec::new(),
                    _ => {}
                },
            }
        }
        reply
    }
}

fn is_control(op: OpCode) -> bool {
    matches!(op, OpCode::Close | OpCode::Ping | OpCode::Pong)
}

/// Sends what is still queued, half-closes, and waits (bounded) for the
/// peer to close: closing a socket with unread input sends a reset that can
/// destroy the response the peer has not read yet.
async fn linger(core: &Core, key: u32, stream: &TcpStream) {
    let fd = stream.as_raw_fd();
    let work = async {
        loop {
            let blocked = {
                let mut conns = core.conns.borrow_mut();
                let c = &mut conns[key as usize];
                if c.dead {
                    return;
                }
                c.flush();
                c.blocked
            };
            if !blocked {
                break;
            }
            if stream.writable(true).await.is_err() {
                return;
            }
        }
        // SAFETY: shutdown on a descriptor this task owns.
        unsafe { libc::shutdown(fd, libc::SHUT_WR) };
        let mut discard = [0u8; 512];
        loop {
            if stream.readable(true).await.is_err() {
                return;
            }
            // SAFETY: reading into a local buffer of the given length.
            let n = unsafe {
                libc::recv(
                    fd,
                    discard.as_mut_ptr() as *mut libc::c_void,
                    discard.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n == 0 || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock) {
                return;
            }
        }
    };
    let _ = monoio::time::timeout(LINGER, work).await;
}

/// The peer address, looked up only for a log line.
fn peer(fd: RawFd) -> String {
    // SAFETY: the fd is a live socket; a borrowed std socket view does not
    // close it (ManuallyDrop).
    let s = std::mem::ManuallyDrop::new(unsafe {
        <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    s.peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: FIN set, masked with a fixed key.
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    fn session() -> WsSession {
        WsSession::new(1024)
    }

    #[test]
    fn ping_is_answered_with_a_pong_carrying_its_payload_even_split_bytewise() {
        let frame = client_frame(0x9, b"are you there");
        let mut expected = Vec::new();
        ws::encode_frame(OpCode::Pong, b"are you there", &mut expected);
        let mut s = session();
        let mut out = Vec::new();
        for b in frame {
            let r = s.input(&mut [b]);
            assert!(!r.closing);
            out.extend(r.out);
        }
        assert_eq!(out, expected);
    }

    #[test]
    fn close_is_echoed_with_the_clients_code() {
        let mut s = session();
        let mut input = client_frame(0x8, &[0x03, 0xe8, b'b', b'y', b'e']);
        let r = s.input(&mut input);
        assert!(r.closing && r.error_code.is_none());
        assert_eq!(r.out, vec![0x88, 0x02, 0x03, 0xe8]);
    }

    #[test]
    fn rule_breaking_input_is_closed_with_its_code() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            // Unmasked text frame.
            (vec![0x81, 0x02, b'h', b'i'], close_code::PROTOCOL_ERROR),
            // Close with a code that must not be sent (1005).
            (client_frame(0x8, &[0x03, 0xed]), close_code::PROTOCOL_ERROR),
            // Close reason that is not UTF-8.
            (
                client_frame(0x8, &[0x03, 0xe8, 0xff]),
                close_code::INVALID_PAYLOAD,
            ),
            // Reserved opcode.
            (client_frame(0x3, b""), close_code::PROTOCOL_ERROR),
        ];
        for (mut input, code) in cases {
            let r = session().input(&mut input);
            assert!(r.closing, "{input:?}");
            assert_eq!(r.error_code, Some(code), "{input:?}");
            assert_eq!(&r.out[2..4], &code.to_be_bytes());
        }
        // A message over the limit is refused from its header alone.
        let mut big = vec![0x82, 0xfe, 0x08, 0x00, 1, 2, 3, 4];
        let r = session().input(&mut big);
        assert_eq!(r.error_code, Some(close_code::MESSAGE_TOO_BIG));
    }

    #[test]
    fn data_frames_are_consumed_without_reply() {
        let mut s = session();
        let mut input = client_frame(0x1, b"hello");
        input.extend(client_frame(0x2, &[0, 1, 2]));
        let r = s.input(&mut input);
        assert!(r.out.is_empty() && !r.closing);
    }
}
