//! One client connection's task: request heads (keep-alive), long-polls,
//! and the opening of a WebSocket or SSE stream.
//!
//! A task runs only while a connection is doing request work: reading a
//! head and answering it. Once a stream is open, a long-poll is held, or a
//! keep-alive connection waits for its next request, the task ends and the
//! connection is *parked*: data in the core's slab, served by
//! the core's event loop (see `events`), and written to by fan-out. A task
//! waits on flags of its slab entry that the event loop sets (input may be
//! waiting, the socket took what was queued) and is woken by it: it holds
//! no socket handle and no pending IO of its own.

use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use protocol::deflate::Window;
use protocol::envelope;
use protocol::http::{self, Parsed, Request};
use protocol::id::Cursor;
use protocol::origin::{Verdict, PATTERN_SLOT};
use protocol::proxy::{self, ProxyParsed};
use protocol::sse;
use protocol::token::Grant;
use protocol::upstream;
use protocol::ws;
use rand::Rng;
use tracing::{debug, info, warn};

use crate::core::conn::TwoWay;
use crate::core::events::{Echo, Read};
use crate::core::{Core, Drain, PollAnswer, State, Transport, SSE_RETRY_MS_MAX, SSE_RETRY_MS_MIN};
use crate::ops::drain::draining;

/// How long a connection refused at accept (503) waits for its response to
/// leave and for the peer to close, before it is dropped regardless.
const LINGER: Duration = Duration::from_secs(crate::core::events::LINGER_S as u64);

/// Serves one accepted connection, already entered in the core's slab
/// under `key` (see [`Core::admit`]) and in its epoll set, until it opens a
/// stream (parked: the event loop serves it from then on) or closes.
///
/// Its layout is watched (see the byte budget test below), as many may run
/// at once in a reconnect storm: the arguments are captured by an `async
/// move` block rather than taken by an `async fn`, which would keep a
/// second copy.
#[allow(clippy::manual_async_fn)] // deliberate, see above
pub fn serve(
    core: Rc<Core>,
    key: u32,
    http2: impl FnOnce(Rc<Core>, u32, Vec<u8>) + 'static,
) -> impl Future<Output = ()> {
    async move {
        let mut io = Io { core: &core, key };
        match io.http(|_| {}).await {
            Phase::Parked => {}
            // Between requests, nothing read yet: the event loop starts a
            // task again when the next one arrives.
            Phase::Idle => io.park(),
            // No message, heartbeat or deadline may follow what was queued
            // last (a close frame, an error response): the event loop lets
            // it leave, then closes.
            Phase::Close(Close::Linger) => io.park_closing(),
            Phase::Close(Close::Now) => core.deregister(key),
            // Its own task from here: the connection's HTTP/2 state is two
            // orders larger than a request's.
            Phase::Http2(first_bytes) => http2(core, key, first_bytes),
        }
    }
}

/// What the request phase of a connection turned into.
pub(crate) enum Phase {
    Close(Close),
    /// A stream is open, or a long-poll held, and the event loop serves it.
    Parked,
    /// Waiting for the next request, with nothing of it read.
    Idle,
    /// The client speaks HTTP/2 (gRPC): these bytes, the preface and
    /// whatever came with it, are its first.
    Http2(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// Drop the socket now (peer gone, socket failed).
    Now,
    /// Let queued bytes (an error response, a close frame) reach the peer first.
    Linger,
}

/// How a long-poll request ended.
enum PollEnd {
    /// Its answer was written; the connection goes on to its next request
    /// (true) or closes (false).
    Answered(bool),
    /// The connection is gone.
    Gone,
    /// It is held, parked: the event loop answers it.
    Held,
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
    /// The gateway drains and asked this connection to go (reported once).
    Drain,
}

/// The request path of one connection: a socket's, or an HTTP/2
/// stream's (see `http2`), which has no socket and is never parked.
pub(crate) struct Io<'a> {
    core: &'a Core,
    key: u32,
}

impl<'a> Io<'a> {
    pub(crate) fn new(core: &'a Core, key: u32) -> Io<'a> {
        Io { core, key }
    }

    fn fd(&self) -> RawFd {
        self.with_conn(|c, _| c.fd)
    }

    /// Ends the task and leaves the connection, an open stream, to the
    /// event loop. The loop looks at it once now: input that came with the
    /// upgrade, a write the socket refused, a drain.
    fn park(&mut self) {
        self.with_conn(|c, _| {
            if c.fd == crate::core::conn::SOCKETLESS {
                // An HTTP/2 stream: its task serves it from here too.
                return;
            }
            c.waker = None;
            c.parked = true;
            c.wake();
        });
    }

    /// Ends the task and leaves the connection to the event loop as
    /// closing: what is queued leaves, then it is closed.
    fn park_closing(&mut self) {
        self.with_conn(|c, _| {
            c.state = State::Closing { shut_wr: false };
            c.deadline_s = 0;
        });
        self.park();
    }

    /// Reads and answers requests (keep-alive) until one opens a stream or
    /// the connection must close.
    ///
    /// `given` fills in what was read already: nothing for a socket (a
    /// closure of no size, so a connection's task does not grow), an
    /// HTTP/2 stream's whole request.
    pub(crate) async fn http(&mut self, given: impl FnOnce(&mut Vec<u8>)) -> Phase {
        // Bytes of an incomplete request head, or of a request that arrived
        // before the previous one was answered. Empty — unallocated — for
        // nearly every connection, whose head arrives in one read.
        let mut pending: Vec<u8> = Vec::new();
        given(&mut pending);
        let limits = self.core.cfg.head_limits();
        if self.with_conn(|c, _| c.expects_proxy_header) {
            self.with_conn(|c, core| {
                c.deadline_s = core.deadline_after_ms(core.cfg.head_timeout_ms);
            });
            if let Err(close) = self.proxy_header(&mut pending).await {
                return Phase::Close(close);
            }
            // Read once: a task started again for the next request does not
            // look for it.
            self.with_conn(|c, _| c.expects_proxy_header = false);
            // On a TLS listener what came after the header is the start of
            // the handshake.
            if !pending.is_empty() && self.with_conn(|c, _| c.tls) {
                let mut raw = std::mem::take(&mut pending);
                let received = self.with_conn(|c, _| {
                    crate::core::events::receive_tls(c, &mut raw, &mut |_, plain| {
                        pending.extend_from_slice(plain)
                    })
                });
                if received.is_err() {
                    return Phase::Close(Close::Now);
                }
            }
        }
        // A task started again halfway through a TLS handshake or record
        // (the connection parked between the client's flights) keeps the
        // deadline it had: a client trickling bytes gets no more time.
        let mut midway = self.with_conn(|c, _| {
            c.deadline_s != 0 && c.with_tls(|t| t.is_handshaking() || t.holds_input()) == Some(true)
        });
        loop {
            self.with_conn(|c, core| {
                c.state = State::Request;
                if !std::mem::take(&mut midway) {
                    c.deadline_s = core.deadline_after_ms(core.cfg.head_timeout_ms);
                }
            });
            let (request, head_len, origin) = loop {
                let opening = protocol::grpc::opening(&pending);
                if opening == protocol::grpc::Opening::Http2 {
                    return Phase::Http2(pending);
                }
                if !pending.is_empty() && opening == protocol::grpc::Opening::Http1 {
                    match http::parse_request(&pending, &limits) {
                        Ok(Parsed::Complete {
                            request,
                            head_len,
                            origin,
                        }) => break (request, head_len, origin),
                        Ok(Parsed::Partial) => {}
                        Err(reject) => return Phase::Close(self.refuse(&reject)),
                    }
                }
                if pending.is_empty()
                    && self.with_conn(|c, _| !c.readable && !c.dead && c.drain == Drain::No)
                {
                    return Phase::Idle;
                }
                match self.next().await {
                    Wake::Readable => {}
                    // Between requests: gone now. Within one: it is
                    // answered first (and the connection closed after).
                    Wake::Drain if pending.is_empty() => return Phase::Close(Close::Linger),
                    Wake::Drain => continue,
                    _ => return Phase::Close(Close::Now),
                }
                // Read at most what the head limit still allows, so a
                // flood of bytes is refused without being buffered.
                let room = limits.head_bytes_max + 1 - pending.len().min(limits.head_bytes_max);
                match self.read_into(|bytes| pending.extend_from_slice(bytes), room) {
                    Read::Data | Read::WouldBlock => {}
                    Read::Eof => return Phase::Close(Close::Now),
                }
            };
            pending.drain(..head_len);
            let leftover = std::mem::take(&mut pending);
            // A draining gateway opens no new stream: the client is sent
            // elsewhere (the balancer's other targets, or the other
            // processes on this port).
            if draining()
                && matches!(
                    request,
                    Request::Sse { .. } | Request::WebSocket { .. } | Request::Echo { .. }
                )
            {
                return Phase::Close(self.refuse_draining());
            }
            if let Err(close) = self.check_origin(&request, origin.as_deref()) {
                return Phase::Close(close);
            }
            // Boxed: a task is as large as what it holds across an await.
            let grant = match self.authorize(&request) {
                Ok(grant) => grant.map(Box::new),
                Err(close) => return Phase::Close(close),
            };
            match request {
                Request::Ready { keep_alive, head } => {
                    // While draining, every response is the connection's last.
                    let keep_alive = keep_alive && !draining();
                    let (ready, status) = crate::ops::service::readiness(self.core.cfg);
                    let response = http::ready_response(ready, status, keep_alive);
                    // Transient branches are boxed: a task is as large as
                    // its largest await point.
                    if let Some(end) = Box::pin(self.answer_check(response, head, keep_alive)).await
                    {
                        return end;
                    }
                    pending = leftover;
                }
                Request::Health { keep_alive, head } => {
                    let keep_alive = keep_alive && !draining();
                    let counts: Vec<u64> = self
                        .core
                        .conn_counts
                        .iter()
                        .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
                        .collect();
                    let response = http::health_response(&counts, keep_alive);
                    if let Some(end) = Box::pin(self.answer_check(response, head, keep_alive)).await
                    {
                        return end;
                    }
                    pending = leftover;
                }
                Request::LongPoll {
                    mut channels,
                    since,
                    keep_alive,
                    ..
                } => {
                    self.core.add_user_channel(&mut channels, grant.as_deref());
                    pending = leftover;
                    match Box::pin(self.long_poll(&channels, since, keep_alive, &mut pending)).await
                    {
                        PollEnd::Answered(true) if keep_alive && !draining() => {}
                        PollEnd::Answered(_) => return Phase::Close(Close::Linger),
                        PollEnd::Gone => return Phase::Close(Close::Now),
                        PollEnd::Held => {
                            self.park();
                            return Phase::Parked;
                        }
                    }
                }
                // Streams live long: what the request allocated is handed
                // over and freed before they settle in.
                Request::Sse {
                    mut channels,
                    last_event_id,
                    chunked,
                    ..
                } => {
                    drop(leftover);
                    self.core.add_user_channel(&mut channels, grant.as_deref());
                    self.start_sse(channels, last_event_id, chunked);
                    self.park();
                    return Phase::Parked;
                }
                Request::WebSocket {
                    mut channels,
                    accept,
                    protocol,
                    deflate,
                    since,
                    ..
                } => {
                    let response = ws::switching_protocols_response(&accept, protocol, deflate);
                    self.core.add_user_channel(&mut channels, grant.as_deref());
                    let two_way = (protocol == Some(upstream::SUBPROTOCOL))
                        .then(|| self.core.new_two_way(grant));
                    let deflate = deflate.map(|a| a.window);
                    return match self
                        .start_websocket(channels, response, since, leftover, two_way, deflate)
                    {
                        Ok(()) => {
                            self.park();
                            Phase::Parked
                        }
                        Err(close) => Phase::Close(close),
                    };
                }
                Request::Echo {
                    accept,
                    protocol,
                    deflate,
                } => {
                    let response = ws::switching_protocols_response(&accept, protocol, deflate);
                    return self.echo(response, leftover, deflate.map(|a| a.window));
                }
                Request::Publish {
                    channel,
                    address,
                    body_bytes,
                    keep_alive,
                    ..
                } => {
                    let message = PostedMessage {
                        channel,
                        address,
                        body_bytes,
                        keep_alive: keep_alive && !draining(),
                    };
                    match Box::pin(self.publish(message, grant, leftover)).await {
                        Ok((rest, true)) => pending = rest,
                        Ok((_, false)) => return Phase::Close(Close::Linger),
                        Err(close) => return Phase::Close(close),
                    }
                }
                // A CORS preflight: its answer depends on the origin only.
                Request::Preflight { keep_alive } | Request::PublishPreflight { keep_alive } => {
                    let origins = &self.core.cfg.origins;
                    let allowed = matches!(
                        origins.check(origin.as_deref()),
                        Verdict::Allowed { cors } if cors != 0
                    );
                    let keep_alive = keep_alive && allowed && !draining();
                    let response = if matches!(request, Request::Preflight { .. }) {
                        origins.preflight_response(origin.as_deref(), keep_alive)
                    } else {
                        origins.publish_preflight_response(origin.as_deref(), keep_alive)
                    };
                    if !Box::pin(self.respond(response)).await {
                        return Phase::Close(Close::Now);
                    }
                    if !keep_alive {
                        return Phase::Close(Close::Linger);
                    }
                    pending = leftover;
                }
            }
        }
    }

    /// Answers a health or readiness check (`head`: its head only). None
    /// when the connection goes on to its next request.
    async fn answer_check(
        &mut self,
        response: Vec<u8>,
        head: bool,
        keep_alive: bool,
    ) -> Option<Phase> {
        let response = if head {
            http::without_body(response)
        } else {
            response
        };
        if !self.respond(response).await {
            return Some(Phase::Close(Close::Now));
        }
        (!keep_alive).then_some(Phase::Close(Close::Linger))
    }

    /// A browser page may open a stream only from an allowed origin
    /// (checked before the upgrade: a WebSocket is not protected by CORS).
    /// An allowed one's CORS slot is kept for the responses that follow;
    /// for an origin allowed by a pattern, the lines echoing it are kept in
    /// the core (SSE and long-poll only: a WebSocket answer has none).
    fn check_origin(&mut self, request: &Request, origin: Option<&str>) -> Result<(), Close> {
        if matches!(
            request,
            Request::Health { .. }
                | Request::Ready { .. }
                | Request::Preflight { .. }
                | Request::PublishPreflight { .. }
        ) {
            return Ok(());
        }
        let origins = &self.core.cfg.origins;
        match origins.check(origin) {
            Verdict::Allowed { cors } => {
                self.with_conn(|c, _| c.cors = cors);
                if cors == PATTERN_SLOT
                    && matches!(
                        request,
                        Request::Sse { .. } | Request::LongPoll { .. } | Request::Publish { .. }
                    )
                {
                    let lines = origins.cors_lines_for(cors, origin).into_owned();
                    self.core.keep_cors_lines(self.key, Bytes::from(lines));
                }
                Ok(())
            }
            Verdict::Refused => {
                const REASON: &str = "origin not allowed";
                info!(
                    peer = %self.client(),
                    origin = origin.unwrap_or(""),
                    status = 403,
                    reason = REASON,
                    "request refused"
                );
                self.core.stats.handshake(REASON);
                self.queue(http::forbidden_response(REASON, "").into());
                Err(Close::Linger)
            }
        }
    }

    /// This connection's CORS header lines ("" without CORS).
    fn cors_lines(&self) -> std::borrow::Cow<'static, str> {
        self.core
            .cors_lines(self.key, self.with_conn(|c, _| c.cors))
    }

    /// A trusted proxy's connection opens with a PROXY header (v1 or v2)
    /// naming the client: read it, within the head deadline and
    /// `PROXY_V2_BYTES_MAX`, and keep what follows it for the request
    /// parser. The client it names replaces the proxy as the connection's
    /// address and takes its place in the per-address limit (503 when
    /// over). A missing or broken header closes the connection without an
    /// answer, as the spec asks: the proxy, not a client, is at fault.
    async fn proxy_header(&mut self, pending: &mut Vec<u8>) -> Result<(), Close> {
        const BYTES_MAX: usize = protocol::limits::PROXY_V2_BYTES_MAX;
        loop {
            if !pending.is_empty() {
                match proxy::parse_proxy_header(pending) {
                    Ok(ProxyParsed::Partial) => {}
                    Ok(ProxyParsed::Complete {
                        header_len, source, ..
                    }) => {
                        pending.drain(..header_len);
                        // LOCAL (the proxy's own health check) and UNKNOWN
                        // name no client: the connection stays the proxy's,
                        // outside the per-address limit.
                        let Some(client) = source else { return Ok(()) };
                        let proxy_addr = self.client();
                        if let Err(refusal) = self.core.readdress(self.key, client) {
                            self.core.stats.handshake(refusal.reason());
                            debug!(peer = %client, proxy = %proxy_addr, reason = refusal.reason(), "connection refused");
                            self.queue(crate::admission::refusal_response(refusal).into());
                            return Err(Close::Linger);
                        }
                        debug!(peer = %client, proxy = %proxy_addr, "client named by PROXY header");
                        return Ok(());
                    }
                    Err(e) => {
                        warn!(
                            proxy = %self.client(),
                            reason = e.reason(),
                            "PROXY header refused, closing (a connection from a trusted proxy \
                             range must open with one)"
                        );
                        self.core.stats.handshake("bad proxy header");
                        return Err(Close::Now);
                    }
                }
            }
            match self.next().await {
                Wake::Readable => {}
                Wake::Drain if pending.is_empty() => return Err(Close::Linger),
                Wake::Drain => continue,
                _ => return Err(Close::Now),
            }
            let room = BYTES_MAX + 1 - pending.len().min(BYTES_MAX);
            match self.read_into(|bytes| pending.extend_from_slice(bytes), room) {
                Read::Data | Read::WouldBlock => {}
                Read::Eof => return Err(Close::Now),
            }
        }
    }

    /// The client's address (its proxy's PROXY header's, if any), for logs.
    fn client(&self) -> std::net::SocketAddr {
        self.with_conn(|c, _| c.client())
    }

    fn refuse(&mut self, reject: &http::Reject) -> Close {
        self.core.stats.handshake(reject.reason());
        info!(
            peer = %self.client(),
            status = reject.status(),
            reason = reject.reason(),
            "request refused"
        );
        self.queue(http::reject_response(reject).into());
        Close::Linger
    }

    /// With `auth` on, a subscribing request needs a valid token allowing
    /// every channel it asks for: 401 (with `WWW-Authenticate`) or 403
    /// otherwise. A granted connection keeps its expiry in its slab entry,
    /// where the sweep finds it (no timer per connection).
    fn authorize(&mut self, request: &Request) -> Result<Option<Grant>, Close> {
        if !self.core.cfg.auth {
            return Ok(None);
        }
        let (channels, send) = match request {
            Request::WebSocket { channels, .. }
            | Request::Sse { channels, .. }
            | Request::LongPoll { channels, .. } => (&channels[..], None),
            Request::Publish { channel, .. } => (&[][..], Some(channel.as_str())),
            _ => return Ok(None),
        };
        let (status, reason, response) =
            match crate::auth::check(self.core.cfg, request.token(), channels) {
                Ok((_, grant)) if send.is_some_and(|ch| !grant.allows_send(ch)) => {
                    debug!(
                        fd = self.fd(),
                        channel = send,
                        "sending not allowed by the token"
                    );
                    (
                        403,
                        "channel not allowed",
                        http::forbidden_response("channel not allowed", &self.cors_lines()),
                    )
                }
                Ok((seconds_left, grant)) => {
                    // +1: the core clock is whole seconds, so "now" may be up
                    // to a second old; expiry never comes early.
                    let seconds_left = seconds_left.min(u64::from(u32::MAX / 2)) as u32 + 1;
                    self.with_conn(|c, core| {
                        c.auth_expires_s = core.now_s().saturating_add(seconds_left)
                    });
                    return Ok(Some(grant));
                }
                Err(crate::auth::Denied::Token(e)) => (
                    e.status(),
                    e.reason(),
                    http::unauthorized_response(
                        e.www_authenticate(),
                        e.reason(),
                        &self.cors_lines(),
                    ),
                ),
                Err(crate::auth::Denied::Channel(channel)) => {
                    debug!(fd = self.fd(), channel, "channel not allowed by the token");
                    (
                        403,
                        "channel not allowed",
                        http::forbidden_response("channel not allowed", &self.cors_lines()),
                    )
                }
            };
        info!(peer = %self.client(), status, reason, "request refused");
        self.core.stats.handshake(reason);
        self.queue(response.into());
        Err(Close::Linger)
    }

    /// A stream asked for while draining: `503` with a jittered
    /// `Retry-After`, then close.
    fn refuse_draining(&mut self) -> Close {
        self.core.stats.handshake("draining");
        let retry_after_s = rand::thread_rng()
            .gen_range(crate::admission::RETRY_AFTER_S_MIN..=crate::admission::RETRY_AFTER_S_MAX);
        self.queue(http::unavailable_response("draining", retry_after_s).into());
        Close::Linger
    }

    /// Runs `f` on this connection's slab entry.
    fn with_conn<T>(&self, f: impl FnOnce(&mut crate::core::Conn, &Core) -> T) -> T {
        let core = self.core;
        core.with_conn(self.key, |c| f(c, core))
    }

    /// Queues bytes and writes what the socket takes now.
    fn queue(&self, bytes: Bytes) {
        let max = self.core.cfg.outbound_queue_bytes_max;
        self.with_conn(|c, _| crate::core::events::send(c, bytes, max));
    }

    /// Queues a response and waits until the kernel has all of it (the
    /// event loop writes the rest as the socket takes it). Returns false if
    /// the connection died meanwhile.
    async fn respond(&mut self, bytes: Vec<u8>) -> bool {
        self.queue(bytes.into());
        poll_fn(|cx| {
            self.with_conn(|c, _| {
                if c.dead {
                    Poll::Ready(false)
                } else if c.all_sent() {
                    Poll::Ready(true)
                } else {
                    register(c, cx);
                    Poll::Pending
                }
            })
        })
        .await
    }

    /// Waits for the next thing this connection must act on.
    fn next(&mut self) -> impl Future<Output = Wake> + use<'_, 'a> {
        poll_fn(move |cx| self.with_conn(|c, _| poll_wake(c, cx)))
    }

    /// One non-blocking read of at most `max` bytes into the core's scratch
    /// buffer; `f` sees the bytes read, and the connection what the read
    /// tells (`events::note_read`).
    fn read_into(&self, mut f: impl FnMut(&mut [u8]), max: usize) -> Read {
        self.with_conn(|c, core| {
            let read = crate::core::events::read_conn(core, c, max, |_, bytes| f(bytes));
            crate::core::events::note_read(c, read, core.now_s())
        })
    }

    /// Subscribes and returns what the client missed after `since`.
    fn subscribe(
        &self,
        channels: &[String],
        since: Option<Cursor>,
        transport: Transport,
        replay_max: usize,
    ) -> crate::core::Resume {
        self.core
            .subscribe(self.key, channels, since, transport, replay_max)
    }

    fn unsubscribe(&self) {
        self.core.unsubscribe(self.key);
    }

    /// Everything a resume may replay: the whole history of every channel.
    fn replay_all(&self) -> usize {
        self.core.cfg.history_messages * self.core.cfg.channels_per_connection_max
    }

    /// A `POST /publish`: reads the body (`body` holds what came with the
    /// head), checks the sender's budget, and hands the message to the
    /// hubs' socket, waiting up to `publish_wait_ms` for room: 202 once it
    /// is there, 429 over a send limit, 503 when the hubs have no room or
    /// there are none configured. Returns what followed the body, and
    /// whether the connection goes on.
    async fn publish(
        &mut self,
        message: PostedMessage,
        grant: Option<Box<Grant>>,
        mut body: Vec<u8>,
    ) -> Result<(Vec<u8>, bool), Close> {
        while body.len() < message.body_bytes {
            match self.next().await {
                Wake::Readable => {}
                // It is answered first.
                Wake::Drain => continue,
                _ => return Err(Close::Now),
            }
            let room = message.body_bytes - body.len();
            if self.read_into(|b| body.extend_from_slice(b), room) == Read::Eof {
                return Err(Close::Now);
            }
        }
        let rest = body.split_off(message.body_bytes);
        let core = self.core;
        let cfg = core.cfg;
        let cors = self.cors_lines();
        let refuse = |io: &mut Self, index, status, extra: &str, reason: &str| {
            crate::ops::metrics::note_upstream_refused(index);
            info!(peer = %io.client(), status, reason, "message refused");
            io.queue(http::publish_refusal(status, &format!("{extra}{cors}"), reason).into());
            Err(Close::Linger)
        };
        let Some(up) = &core.upstream else {
            return refuse(self, 4, 503, "", "upstream not configured");
        };
        // The sender's budget: its user, or its address without auth.
        let sender: Box<str> = match grant.as_ref().and_then(|g| g.sub.as_deref()) {
            Some(sub) => sub.into(),
            None => self.client().ip().to_string().into(),
        };
        let limits = core.send_limits();
        let now_ms = core.clock_ms();
        let taken = core
            .post_budgets
            .borrow_mut()
            .entry(sender)
            .or_insert_with(|| upstream::SendBudget::new(&limits, now_ms))
            .take(&limits, now_ms, body.len());
        if let Err(over) = taken {
            let index = match over {
                upstream::RateExceeded::MessagesPerSecond => 2,
                upstream::RateExceeded::BytesPerSecond => 3,
            };
            return refuse(self, index, 429, "Retry-After: 1\r\n", over.reason());
        }
        let address = message
            .address
            .unwrap_or_else(|| self.with_conn(|c, core| core.address_of(self.key, c)));
        let claims = grant
            .as_deref()
            .map(|g| crate::core::two_way::claims_for(cfg, g));
        let mut meta = Vec::with_capacity(64);
        upstream::encode_upstream_meta(
            &upstream::UpstreamMeta {
                transport: "http",
                sub: grant.as_ref().and_then(|g| g.sub.as_deref()),
                claims: claims.as_ref().and_then(|c| c.as_deref()),
                binary: Some(std::str::from_utf8(&body).is_err()),
                ..upstream::UpstreamMeta::default()
            },
            &mut meta,
        );
        let out = crate::upstream::Outgoing::new(
            upstream::Kind::Message,
            &address,
            &message.channel,
            meta,
            &body,
        );
        drop(body);
        // Waiting for room holds the connection past its head deadline.
        self.with_conn(|c, core| c.deadline_s = core.deadline_after_ms(cfg.publish_wait_ms));
        let room = poll_fn(|cx| {
            if up.try_send(&out.frames) {
                Poll::Ready(())
            } else {
                up.wait(cx.waker());
                Poll::Pending
            }
        });
        let wait = Duration::from_millis(cfg.publish_wait_ms);
        if monoio::time::timeout(wait, room).await.is_err() {
            let retry_after_s = rand::thread_rng().gen_range(
                crate::admission::RETRY_AFTER_S_MIN..=crate::admission::RETRY_AFTER_S_MAX,
            );
            let extra = format!("Retry-After: {retry_after_s}\r\n");
            return refuse(self, 5, 503, &extra, "upstream busy");
        }
        if !self
            .respond(http::accepted_response(&cors, message.keep_alive))
            .await
        {
            return Err(Close::Now);
        }
        Ok((rest, message.keep_alive))
    }

    /// Subscribes an SSE client and queues the head and what it missed;
    /// `chunked` (HTTP/1.1) sends the stream as a chunked body.
    fn start_sse(&mut self, channels: Vec<String>, since: Option<Cursor>, chunked: bool) {
        self.core.stats.handshake("sse");
        let resume = self.subscribe(&channels, since, Transport::Sse, self.replay_all());
        self.with_conn(|c, _| c.state = State::Sse { chunked });
        let subscribed = channels.len();
        drop(channels);
        let mut out = Vec::with_capacity(256);
        sse::stream_response_head(&self.cors_lines(), chunked, &mut out);
        // The stream needs its lines no more.
        self.core.forget_cors_lines(self.key);
        let mut events = Vec::with_capacity(64);
        let retry_ms = rand::thread_rng().gen_range(SSE_RETRY_MS_MIN..=SSE_RETRY_MS_MAX);
        sse::encode_retry(&mut events, retry_ms);
        if self.core.upstream.is_some() {
            // Two-way is on: the client's POSTs name this stream, and the
            // hubs' replies to it come here.
            let address = self.with_conn(|c, core| core.address_of(self.key, c).encode());
            upstream::encode_sse_welcome(&address, &mut events);
        }
        self.core.presence_open(self.key);
        for gap in &resume.gaps {
            envelope::encode_sse_gap(gap, &mut events);
        }
        if chunked {
            sse::push_chunk(&mut out, &events);
        } else {
            out.extend_from_slice(&events);
        }
        self.queue(out.into());
        for m in &resume.messages {
            self.queue(crate::core::sse_bytes(&m.sse, chunked));
        }
        debug!(
            fd = self.fd(),
            channels = subscribed,
            replayed = resume.messages.len(),
            "sse stream open"
        );
    }

    /// Answers one long-poll request, or leaves it held (parked: the event
    /// loop answers it, see `core::events`) when nothing of the next
    /// request has been read.
    async fn long_poll(
        &mut self,
        channels: &[String],
        since: Option<Cursor>,
        keep_alive: bool,
        pending: &mut Vec<u8>,
    ) -> PollEnd {
        self.core.stats.handshake("longpoll");
        let resume = self.subscribe(
            channels,
            since,
            Transport::LongPoll,
            protocol::limits::LONGPOLL_MESSAGES_MAX,
        );
        if !resume.messages.is_empty() {
            self.unsubscribe();
            let cursor = resume.messages.last().map_or(resume.present, |m| m.id);
            let items: Vec<&[u8]> = resume.messages.iter().map(|m| &m.poll_item()[..]).collect();
            let gaps: Vec<&str> = resume.gaps.iter().map(|g| &**g).collect();
            let keep_alive = !draining();
            let mut out = Vec::new();
            envelope::longpoll_response(
                &items,
                cursor,
                &gaps,
                keep_alive,
                &self.cors_lines(),
                &mut out,
            );
            let written = self.respond(out).await;
            return self.answered(written, keep_alive);
        }
        // A gap with nothing after it yet is told with the next message,
        // whose id is then the cursor. Answered at once, the cursor could
        // only be this gateway's own position, which another gateway behind
        // the same balancer cannot place on a channel its publisher numbers
        // (the client would get that gateway's whole history again). Should
        // the poll time out first, it is answered empty with its own cursor
        // and the next poll finds the same gap.
        if !resume.gaps.is_empty() {
            self.core.hold_gaps(self.key, resume.gaps);
        }
        // Answered empty, the client polls again from where it was, or
        // from where its channels stand.
        let cursor = since.unwrap_or(resume.present);
        if draining() {
            // A gateway that is going away holds no poll.
            self.unsubscribe();
            let written = self.answer_empty(cursor, false).await;
            return self.answered(written, false);
        }
        self.with_conn(|c, core| {
            c.deadline_s = core.deadline_after_ms(core.cfg.poll_timeout_ms);
            c.state = State::LongPoll {
                answer: PollAnswer::Waiting,
                cursor,
                keep_alive,
            };
        });
        if pending.is_empty() {
            // Held with no task; answered by the event loop.
            return PollEnd::Held;
        }
        let limit = self.core.cfg.head_bytes_max;
        loop {
            match self.next().await {
                Wake::PollAnswered => {
                    self.unsubscribe();
                    return PollEnd::Answered(true);
                }
                Wake::PollTimedOut => {
                    self.unsubscribe();
                    let keep_alive = !draining();
                    let written = self.answer_empty(cursor, keep_alive).await;
                    return self.answered(written, keep_alive);
                }
                // An answer already queued leaves first (PollAnswered
                // follows; the connection is closed after it).
                Wake::Drain
                    if self.with_conn(|c, _| {
                        matches!(
                            c.state,
                            State::LongPoll {
                                answer: PollAnswer::Queued,
                                ..
                            }
                        )
                    }) => {}
                Wake::Drain => {
                    self.unsubscribe();
                    let written = self.answer_empty(cursor, false).await;
                    return self.answered(written, false);
                }
                Wake::Dead => return PollEnd::Gone,
                Wake::Readable => {
                    // A pipelined next request: kept for after the answer,
                    // within the head limit.
                    let room = (limit + 1).saturating_sub(pending.len());
                    match self.read_into(|b| pending.extend_from_slice(b), room) {
                        Read::Eof => return PollEnd::Gone,
                        _ if pending.len() > limit => return PollEnd::Gone,
                        _ => {}
                    }
                }
            }
        }
    }

    /// Answers a long-poll with no message and `cursor`: whether the
    /// answer was written.
    async fn answer_empty(&mut self, cursor: Cursor, keep_alive: bool) -> bool {
        let cors = self.with_conn(|c, _| c.cors);
        let answer = self
            .core
            .empty_poll_answer(self.key, cors, cursor, keep_alive);
        self.respond(answer).await
    }

    /// How a long-poll ended once its answer was (`written`) or was not
    /// written.
    fn answered(&self, written: bool, keep_alive: bool) -> PollEnd {
        if written {
            PollEnd::Answered(keep_alive)
        } else {
            PollEnd::Gone
        }
    }

    /// Answers the upgrade (`response`, the 101), subscribes, queues what
    /// the client missed (compressed with `deflate`'s window if it
    /// negotiated permessage-deflate) and handles bytes that came with the
    /// head. Err: close right away.
    fn start_websocket(
        &mut self,
        channels: Vec<String>,
        response: Vec<u8>,
        since: Option<Cursor>,
        leftover: Vec<u8>,
        two_way: Option<Box<TwoWay>>,
        deflate: Option<Window>,
    ) -> Result<(), Close> {
        self.core.stats.handshake("ws");
        self.queue(response.into());
        let resume = self.subscribe(&channels, since, Transport::WebSocket, self.replay_all());
        if let Some(window) = deflate {
            self.with_conn(|c, _| c.state.negotiated_deflate(window));
        }
        if let Some(two_way) = two_way {
            // The subprotocol: the client learns its address first.
            let address = self.with_conn(|c, core| {
                if let State::WebSocket { session, .. } = &mut c.state {
                    session.two_way = Some(two_way);
                }
                core.address_of(self.key, c).encode()
            });
            let mut welcome = Vec::with_capacity(96);
            upstream::encode_welcome(&address, &mut welcome);
            self.queue(welcome.into());
        }
        self.core.presence_open(self.key);
        if !resume.gaps.is_empty() {
            let mut out = Vec::new();
            for gap in &resume.gaps {
                envelope::encode_ws_gap(gap, &mut out);
            }
            self.queue(out.into());
        }
        for m in &resume.messages {
            self.queue(self.core.ws_frame(m, deflate).clone());
        }
        self.start_session(leftover)
    }

    /// Feeds the open WebSocket's session whatever arrived right behind
    /// the handshake.
    fn start_session(&mut self, mut leftover: Vec<u8>) -> Result<(), Close> {
        if leftover.is_empty() {
            return Ok(());
        }
        let key = self.key;
        let (answers, ended) =
            self.with_conn(|c, core| core.websocket_input(c, key, &mut leftover));
        if !answers.is_empty() {
            self.queue(answers.into());
        }
        if ended {
            return Err(Close::Linger);
        }
        Ok(())
    }

    /// The conformance endpoint: every message is sent back as it arrives,
    /// fragment by fragment, by the event loop once parked. Reading goes on
    /// while the client is not reading its echoes (a client may send a
    /// whole message before it reads): the echoes queue up to
    /// `outbound_queue_bytes_max`, past which it is a slow consumer like
    /// any other.
    fn echo(&mut self, response: Vec<u8>, leftover: Vec<u8>, deflate: Option<Window>) -> Phase {
        self.queue(response.into());
        let key = self.key;
        self.with_conn(|c, core| {
            let state = State::websocket(core.cfg.ws_message_bytes_max, Some(Echo::new()));
            core.open_stream(c, key, state);
            if let Some(window) = deflate {
                c.state.negotiated_deflate(window);
            }
        });
        match self.start_session(leftover) {
            Ok(()) => {
                self.park();
                Phase::Parked
            }
            Err(close) => Phase::Close(close),
        }
    }
}

/// A `POST /publish` as its head described it.
struct PostedMessage {
    channel: String,
    address: Option<upstream::Address>,
    body_bytes: usize,
    keep_alive: bool,
}

/// Where a waiting task stands: what its connection needs it for, or
/// pending with its waker registered.
fn poll_wake(c: &mut crate::core::Conn, cx: &mut Context<'_>) -> Poll<Wake> {
    if c.dead {
        return Poll::Ready(Wake::Dead);
    }
    match c.state {
        State::LongPoll {
            answer: PollAnswer::TimedOut,
            ..
        } => return Poll::Ready(Wake::PollTimedOut),
        State::LongPoll {
            answer: PollAnswer::Queued,
            ..
        } if c.all_sent() => return Poll::Ready(Wake::PollAnswered),
        _ => {}
    }
    if c.drain == Drain::Asked {
        c.drain = Drain::Seen;
        return Poll::Ready(Wake::Drain);
    }
    if c.readable {
        return Poll::Ready(Wake::Readable);
    }
    register(c, cx);
    Poll::Pending
}

/// Keeps the task's waker in its slab entry (once).
fn register(c: &mut crate::core::Conn, cx: &mut Context<'_>) {
    if !c.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        c.waker = Some(cx.waker().clone());
    }
}

/// Half-closes (the peer reads EOF after what was sent) and discards what
/// the peer still sends until it closes too: closing a socket with unread
/// input sends a reset, which can destroy a response not yet read.
async fn half_close_and_drain(stream: &TcpStream) {
    let fd = stream.as_raw_fd();
    let _ = crate::sys::shutdown(fd, std::net::Shutdown::Write);
    let mut discard = [0u8; 512];
    loop {
        if stream.readable(true).await.is_err() {
            return;
        }
        match crate::sys::recv(fd, &mut discard) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Answers a connection that admission control turned away (`503` with
/// `Retry-After`) and closes it, without reading its request: the response
/// first, then a half-close and the linger. It never enters the core's slab.
pub async fn refuse(mut stream: TcpStream, response: Vec<u8>) {
    let work = async {
        let (sent, _) = stream.write_all(response).await;
        if sent.is_ok() {
            half_close_and_drain(&stream).await;
        }
    };
    let _ = monoio::time::timeout(LINGER, work).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's task while it reads and answers a request; this keeps
    /// its size from drifting. Its type cannot be named, so the budget is
    /// checked here rather than at compile time. (Open streams, held
    /// long-polls and idle keep-alive connections have no task.)
    const SERVE_TASK_BYTES_MAX: usize = 384;

    #[test]
    fn connection_task_stays_within_its_byte_budget() {
        let core = Rc::new(Core::lone(Box::leak(Box::default()), 1));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let key = core.register(
            std::os::fd::IntoRawFd::into_raw_fd(a),
            ([127, 0, 0, 1], 1).into(),
        );
        let task = serve(core, key, crate::http2::start);
        let size = std::mem::size_of_val(&task);
        eprintln!(
            "SIZE serve task = {size} bytes, Conn = {} bytes",
            std::mem::size_of::<crate::core::Conn>()
        );
        assert!(
            size <= SERVE_TASK_BYTES_MAX,
            "serve() future is {size} bytes"
        );
    }
}
