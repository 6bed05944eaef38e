//! gRPC on a core: HTTP/2 connections (the `h2` crate on monoio's poll-io
//! sockets) and the calls of `proto/gateway/v1/gateway.proto`.
//!
//! A connection that opened with the HTTP/2 preface leaves the request
//! path (see `request`) for a task of its own here, which owns its socket
//! and drives HTTP/2: it accepts calls, answers PINGs, sends its own PINGs
//! as heartbeats, and sends GOAWAY when the gateway drains. Its slab entry
//! stays (counted as a `grpc` connection; the drain and a dead peer are
//! told through it).
//!
//! Each call is a slab entry too, without a socket
//! (`Transport::GrpcStream`): fan-out queues a message's gRPC bytes on it
//! like on any other subscriber (encoded once per message, shared), within
//! the same outbound byte budget, and wakes the call's task, which moves
//! them into DATA frames as the client's HTTP/2 window allows. A client
//! that stops reading closes its window; what fan-out queues then grows
//! until the budget ends the call with RESOURCE_EXHAUSTED. h2 itself
//! never holds more than the window (capacity is reserved before each
//! send).

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Request, Response};
use protocol::grpc::{self, Code, Method};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info};

use crate::core::conn::{Gone, SOCKETLESS};
use crate::core::{events, Core, Drain, State, Transport, SSE_RETRY_MS_MAX, SSE_RETRY_MS_MIN};
use crate::ops::drain::draining;
use crate::ops::metrics::note_grpc_end;

/// DATA h2 may hold for one call beyond what was written: what a call's
/// task hands over in one go (its capacity is asked for first).
const SEND_BUFFER_BYTES: usize = 64 * 1024;
/// Streams a client may reset before h2 has them accepted (its defence
/// against rapid reset, CVE-2023-44487: over it, GOAWAY ENHANCE_YOUR_CALM),
/// and streams the gateway may reset for errors of the client's making.
const PENDING_RESET_STREAMS_MAX: usize = 20;
const LOCAL_ERROR_RESETS_MAX: usize = 1024;

/// Serves connection `key` of `core` as HTTP/2: `first_bytes` were read
/// from it already (the preface, and what came with it). gRPC calls are
/// served here, other requests by `http` (see `http2`).
pub async fn serve<H, F>(core: Rc<Core>, key: u32, first_bytes: Vec<u8>, http: H)
where
    H: Fn(Rc<Core>, u32, Request<RecvStream>, SendResponse<Bytes>) -> F + Copy + 'static,
    F: Future<Output = ()> + 'static,
{
    let tls = core.with_conn(key, |c| {
        let session = c.take_tls();
        c.tls = false;
        session
    });
    let Some((tcp, serial)) = take_socket(&core, key) else {
        core.deregister(key);
        return;
    };
    core.stats.handshake("grpc");
    let cfg = core.cfg;
    let io = Prefixed {
        first: Bytes::from(first_bytes),
        inner: tcp,
        tls,
    };
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(cfg.grpc_streams_per_connection_max)
        .max_header_list_size(cfg.grpc_header_list_bytes_max)
        .initial_window_size(cfg.grpc_stream_window_bytes)
        .initial_connection_window_size(cfg.grpc_connection_window_bytes)
        .max_send_buffer_size(SEND_BUFFER_BYTES)
        .max_pending_accept_reset_streams(PENDING_RESET_STREAMS_MAX)
        .max_local_error_reset_streams(Some(LOCAL_ERROR_RESETS_MAX));
    let head_timeout = Duration::from_millis(cfg.head_timeout_ms);
    let mut conn =
        match monoio::time::timeout(head_timeout, builder.handshake::<_, Bytes>(io)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                debug!(key, error = %e, "http/2 handshake failed");
                core.deregister(key);
                return;
            }
            Err(_) => {
                debug!(
                    key,
                    "http/2 handshake not done within the head timeout, closing"
                );
                core.deregister(key);
                return;
            }
        };
    if let (Some(interval_s), Some(mut pings)) = (cfg.heartbeat_interval_s(), conn.ping_pong()) {
        let core = core.clone();
        let pong_timeout = Duration::from_millis(cfg.pong_timeout_ms);
        drop(monoio::spawn(async move {
            loop {
                monoio::time::sleep(Duration::from_secs(u64::from(interval_s))).await;
                if !still(&core, key, serial) {
                    return;
                }
                match monoio::time::timeout(pong_timeout, pings.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    // The connection is gone.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        if still(&core, key, serial) {
                            core.with_conn(key, |c| {
                                c.going(Gone::DeadPeer);
                                c.dead = true;
                                c.wake();
                            });
                        }
                        return;
                    }
                }
            }
        }));
    }
    let mut shutting_down = false;
    loop {
        let step = poll_fn(|cx| {
            let (dead, asked) = core.with_conn(key, |c| {
                c.waker = Some(cx.waker().clone());
                (
                    c.dead,
                    c.drain == Drain::Asked || (draining() && c.drain == Drain::No),
                )
            });
            if dead {
                return Poll::Ready(Step::Dead);
            }
            if asked && !shutting_down {
                return Poll::Ready(Step::Drain);
            }
            conn.poll_accept(cx).map(Step::Call)
        })
        .await;
        match step {
            Step::Dead => {
                let peer = core.with_conn(key, |c| c.client());
                info!(%peer, "http/2 connection closed: no PING answer within the pong timeout");
                break;
            }
            Step::Drain => {
                core.with_conn(key, |c| c.drain = Drain::Seen);
                // GOAWAY: no new call here; the open ones are ended by the
                // drain one by one (UNAVAILABLE), then the connection.
                conn.graceful_shutdown();
                shutting_down = true;
            }
            Step::Call(Some(Ok((request, respond)))) => {
                drop(monoio::spawn(call(
                    core.clone(),
                    key,
                    request,
                    respond,
                    http,
                )));
            }
            Step::Call(Some(Err(e))) => {
                let peer = core.with_conn(key, |c| c.client());
                let closed_by_peer = e.get_io().is_some_and(|io| {
                    use std::io::ErrorKind::*;
                    matches!(
                        io.kind(),
                        NotConnected | BrokenPipe | ConnectionReset | UnexpectedEof
                    )
                });
                if closed_by_peer {
                    // A browser or client going away without GOAWAY.
                    debug!(%peer, error = %e, "http/2 connection closed by the peer");
                } else {
                    // Flood defences (rapid reset, CONTINUATION, SETTINGS)
                    // and protocol errors end up here, after h2 sent GOAWAY.
                    info!(%peer, error = %e, "http/2 connection ended by an error");
                }
                break;
            }
            Step::Call(None) => {
                let _ = poll_fn(|cx| conn.poll_closed(cx)).await;
                break;
            }
        }
    }
    drop(conn);
    core.deregister(key);
}

/// A call h2 accepted: its request, and where its response goes.
type Accepted = (Request<RecvStream>, SendResponse<Bytes>);

/// What woke a connection's task. Lives on the stack for a moment: its
/// size does not matter.
#[allow(clippy::large_enum_variant)]
enum Step {
    Dead,
    Drain,
    Call(Option<Result<Accepted, h2::Error>>),
}

/// Whether slab entry `key` still holds the connection it had (`serial`).
fn still(core: &Core, key: u32, serial: u32) -> bool {
    core.try_with_conn(key, |c| c.serial == serial)
        .unwrap_or(false)
}

/// Takes the socket of connection `key` out of the core's hands (the
/// event loop's epoll set, the slab entry's ownership) for its HTTP/2
/// task. Returns it and the entry's serial.
///
/// The socket is driven by readiness (monoio's poll-io: the ring polls
/// it), not by io_uring reads and writes: h2 reads into and writes from
/// buffers of its own, and a completion-based socket would need a second
/// pair, owned by the ring while an operation is in flight (a read always
/// is), for every connection.
fn take_socket(
    core: &Core,
    key: u32,
) -> Option<(monoio::net::tcp::stream_poll::TcpStreamPoll, u32)> {
    let (fd, serial) = core.with_conn(key, |c| {
        let fd = c.fd;
        c.fd = SOCKETLESS;
        c.state = State::Http2;
        c.deadline_s = 0;
        c.readable = false;
        (fd, c.serial)
    });
    // Closing the descriptor would take it out of the set; it stays open.
    let _ = core.epoll.remove(fd);
    // The slab entry owned `fd` and has just given it up.
    let std = std::net::TcpStream::from(crate::sys::own(fd));
    let tcp = match monoio::net::TcpStream::from_std(std) {
        Ok(tcp) => tcp,
        Err(e) => {
            debug!(key, error = %e, "socket not usable by the runtime");
            return None;
        }
    };
    match tcp.try_into_poll_io() {
        Ok(tcp) => Some((tcp, serial)),
        Err((e, _)) => {
            debug!(key, error = %e, "socket not usable by readiness");
            None
        }
    }
}

/// One call, from its request headers to its trailers.
async fn call<F: Future<Output = ()>>(
    core: Rc<Core>,
    conn_key: u32,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    http: impl Fn(Rc<Core>, u32, Request<RecvStream>, SendResponse<Bytes>) -> F,
) {
    let content_type = request.headers().get("content-type");
    if !content_type.is_some_and(|t| grpc::is_grpc_content_type(t.as_bytes())) {
        // SSE, long-poll, publish, health: HTTP on HTTP/2.
        http(core, conn_key, request, respond).await;
        return;
    }
    let client = core.with_conn(conn_key, |c| c.client());
    let (head, mut body) = request.into_parts();
    let opened = match open(&core, client, &head, &mut body).await {
        Ok(opened) => opened,
        Err(refusal) => {
            refusal.log(client, head.uri.path());
            core.stats.handshake(refusal.reason);
            note_grpc_end(refusal.code);
            let response = match refusal.http_status {
                Some(status) => Response::builder().status(status).body(()),
                None => trailers_only(refusal.code, refusal.reason),
            };
            if let Ok(response) = response {
                let _ = respond.send_response(response, true);
            }
            return;
        }
    };
    // Not kept for the life of the call.
    drop(head);
    let response = Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(());
    let Ok(send) = response
        .map_err(drop)
        .and_then(|r| respond.send_response(r, false).map_err(drop))
    else {
        core.deregister(opened.key);
        note_grpc_end(Code::Cancelled);
        return;
    };
    let mut stream = CallStream {
        core: core.clone(),
        key: opened.key,
        send,
        body: opened.reads.then_some(body),
        client_done: false,
        input: Vec::new(),
        sending: Bytes::new(),
        deadline: opened.deadline.map(|d| Box::pin(monoio::time::sleep(d))),
    };
    let end = poll_fn(|cx| stream.poll_end(cx)).await;
    stream.finish(end);
}

/// A call that got past its checks: its slab entry, whether the client's
/// frames are read (`Connect`), and its deadline (`grpc-timeout`).
struct Opened {
    key: u32,
    reads: bool,
    deadline: Option<Duration>,
}

/// A call refused before it opened.
struct Refusal {
    code: Code,
    reason: &'static str,
    /// Answered with an HTTP status instead of a gRPC one (what the gRPC
    /// spec asks for a request that is not gRPC at all).
    http_status: Option<u16>,
}

impl Refusal {
    fn new(code: Code, reason: &'static str) -> Refusal {
        Refusal {
            code,
            reason,
            http_status: None,
        }
    }

    fn log(&self, peer: SocketAddr, path: &str) {
        info!(%peer, path, code = self.code.name(), reason = self.reason, "grpc call refused");
    }
}

/// Checks a call and opens it: its method, content type, token, request
/// message (`Subscribe`), channels; enters it in the slab, subscribed,
/// with what it missed queued.
async fn open(
    core: &Rc<Core>,
    client: SocketAddr,
    head: &http::request::Parts,
    body: &mut RecvStream,
) -> Result<Opened, Refusal> {
    let cfg = core.cfg;
    if head.method != http::Method::POST {
        return Err(Refusal {
            http_status: Some(405),
            ..Refusal::new(Code::Unimplemented, "method not allowed")
        });
    }
    let Some(method) = Method::from_path(head.uri.path()) else {
        return Err(Refusal::new(Code::Unimplemented, "unknown method"));
    };
    if head
        .headers
        .get("grpc-encoding")
        .is_some_and(|e| e.as_bytes() != b"identity")
    {
        return Err(Refusal::new(
            Code::Unimplemented,
            "compression not supported",
        ));
    }
    if draining() {
        return Err(Refusal::new(Code::Unavailable, "draining"));
    }
    let deadline = head
        .headers
        .get("grpc-timeout")
        .and_then(|t| grpc::grpc_timeout(t.as_bytes()));
    let token = head
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let (mut channels, since) = match method {
        Method::Subscribe => {
            let message = read_message(body, cfg.grpc_message_bytes_max as usize, cfg).await?;
            let request = grpc::decode_subscribe_request(&message)
                .map_err(|_| Refusal::new(Code::InvalidArgument, "bad request message"))?;
            if request.channels.is_empty() {
                return Err(Refusal::new(Code::InvalidArgument, "no channel"));
            }
            if request.channels.len() > cfg.channels_per_connection_max {
                return Err(Refusal::new(Code::InvalidArgument, "too many channels"));
            }
            let max = cfg.channel_name_bytes_max;
            if request
                .channels
                .iter()
                .any(|c| !protocol::channel::valid_channel_name(c.as_bytes(), max))
            {
                return Err(Refusal::new(Code::InvalidArgument, "bad channel name"));
            }
            (request.channels, request.since)
        }
        // Its channels come with its frames.
        Method::Connect => (Vec::new(), None),
    };
    let (grant, expires_in_s) = if cfg.auth {
        match crate::auth::check(cfg, token, &channels) {
            Ok((seconds_left, grant)) => (Some(grant), Some(seconds_left)),
            Err(crate::auth::Denied::Token(e)) => {
                return Err(Refusal::new(Code::Unauthenticated, e.reason()))
            }
            Err(crate::auth::Denied::Channel(_)) => {
                return Err(Refusal::new(Code::PermissionDenied, "channel not allowed"))
            }
        }
    } else {
        (None, None)
    };
    core.add_user_channel(&mut channels, grant.as_ref());
    let two_way = (method == Method::Connect).then(|| core.new_two_way(grant.map(Box::new)));
    let key = core.register_stream(client);
    core.with_conn(key, |c| {
        c.state = State::GrpcStream { two_way };
        if let Some(seconds_left) = expires_in_s {
            // +1: the core clock is whole seconds (see `request`).
            let seconds_left = seconds_left.min(u64::from(u32::MAX / 2)) as u32 + 1;
            c.auth_expires_s = core.now_s().saturating_add(seconds_left);
        }
    });
    let replay_max = cfg.history_messages * channels.len().max(1);
    let resume = core.subscribe(key, &channels, since, Transport::GrpcStream, replay_max);
    core.stats.handshake(match method {
        Method::Subscribe => "grpc_subscribe",
        Method::Connect => "grpc_connect",
    });
    let mut out = Vec::new();
    if method == Method::Connect {
        let address = core.with_conn(key, |c| core.address_of(key, c).encode());
        grpc::encode_welcome(&address, &mut out);
    }
    for gap in &resume.gaps {
        out.extend_from_slice(&grpc::gap_message(gap));
    }
    let max = cfg.outbound_queue_bytes_max;
    core.with_conn(key, |c| {
        if !out.is_empty() {
            events::push(c, Bytes::from(out), max);
        }
        for m in &resume.messages {
            events::push(c, m.grpc().clone(), max);
        }
    });
    core.presence_open(key);
    debug!(
        %client,
        ?method,
        channels = channels.len(),
        replayed = resume.messages.len(),
        "grpc call open"
    );
    Ok(Opened {
        key,
        reads: method == Method::Connect,
        deadline,
    })
}

/// Reads a call's first message (`Subscribe`'s request), within the head
/// timeout.
async fn read_message(
    body: &mut RecvStream,
    max_bytes: usize,
    cfg: &crate::config::Config,
) -> Result<Vec<u8>, Refusal> {
    let read = async {
        let mut buf = Vec::new();
        loop {
            match grpc::next_message(&buf, max_bytes) {
                Ok(Some((message, _))) => return Ok(message.to_vec()),
                Ok(None) => {}
                Err(e) => return Err(Refusal::new(e.code(), e.reason())),
            }
            match body.data().await {
                Some(Ok(data)) => {
                    let _ = body.flow_control().release_capacity(data.len());
                    buf.extend_from_slice(&data);
                }
                None => return Err(Refusal::new(Code::InvalidArgument, "no request message")),
                Some(Err(_)) => return Err(Refusal::new(Code::Cancelled, "client went away")),
            }
        }
    };
    let limit = Duration::from_millis(cfg.head_timeout_ms);
    monoio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| {
            Err(Refusal::new(
                Code::DeadlineExceeded,
                "request message not sent within the head timeout",
            ))
        })
}

/// An open call's task state.
struct CallStream {
    core: Rc<Core>,
    key: u32,
    send: SendStream<Bytes>,
    /// The client's frames (`Connect`), until it half-closes.
    body: Option<RecvStream>,
    /// The client half-closed a `Connect`: the call ends (OK) once what
    /// is queued for it has gone.
    client_done: bool,
    /// A client frame's bytes so far.
    input: Vec<u8>,
    /// What is left of the frame being sent.
    sending: Bytes,
    deadline: Option<Pin<Box<monoio::time::Sleep>>>,
}

/// How a call ends.
enum End {
    /// With a status in its trailers.
    Status(Code, &'static str),
    /// The client reset it, or its connection is gone: nothing to send.
    Gone,
}

impl CallStream {
    /// Serves the call until it ends: reads the client's frames, moves
    /// what fan-out queued into DATA frames as the window allows, and
    /// watches for what ends it.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let core = self.core.clone();
        loop {
            let told = core.with_conn(self.key, |c| {
                if c.dead {
                    return Some(match c.gone {
                        Gone::SlowConsumer => End::Status(Code::ResourceExhausted, "slow consumer"),
                        _ => End::Gone,
                    });
                }
                if c.drain == Drain::Asked {
                    c.drain = Drain::Seen;
                    return Some(match c.gone {
                        Gone::TokenExpired => End::Status(Code::Unauthenticated, "token expired"),
                        _ => End::Status(Code::Unavailable, "draining"),
                    });
                }
                None
            });
            if let Some(end) = told {
                return Poll::Ready(end);
            }
            if self.send.poll_reset(cx).is_ready() {
                return Poll::Ready(End::Gone);
            }
            if let Some(deadline) = &mut self.deadline {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(End::Status(Code::DeadlineExceeded, "deadline exceeded"));
                }
            }
            if let Some(end) = self.poll_input(cx) {
                return Poll::Ready(end);
            }
            if self.sending.is_empty() {
                self.sending = core
                    .with_conn(self.key, |c| c.take_front())
                    .unwrap_or_default();
            }
            if !self.sending.is_empty() {
                self.send.reserve_capacity(self.sending.len());
                let capacity = self.send.capacity();
                if capacity > 0 {
                    let chunk = self.sending.split_to(capacity.min(self.sending.len()));
                    if self.send.send_data(chunk, false).is_err() {
                        return Poll::Ready(End::Gone);
                    }
                    continue;
                }
                match self.send.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(_) => return Poll::Ready(End::Gone),
                    // The window is closed: the client reads slowly, or not
                    // at all; fan-out goes on queueing, within the budget.
                    Poll::Pending => {}
                }
            }
            if self.client_done && self.sending.is_empty() {
                return Poll::Ready(End::Status(Code::Ok, ""));
            }
            core.with_conn(self.key, |c| c.waker = Some(cx.waker().clone()));
            return Poll::Pending;
        }
    }

    /// Reads and acts on what the client sent (`Connect`), unless the
    /// hubs are behind (then it is not read, and its window closes).
    fn poll_input(&mut self, cx: &mut Context<'_>) -> Option<End> {
        let core = self.core.clone();
        let max = core.cfg.grpc_message_bytes_max as usize;
        loop {
            let paused = core.with_conn(self.key, |c| {
                crate::core::two_way::two_way_of(c).is_some_and(|t| t.paused)
            });
            let body = self.body.as_mut().filter(|_| !paused)?;
            let data = match body.poll_data(cx) {
                Poll::Pending => return None,
                Poll::Ready(Some(Ok(data))) => data,
                Poll::Ready(Some(Err(_))) => return Some(End::Gone),
                // The client is done: so is the call, once its answers
                // have gone.
                Poll::Ready(None) => {
                    self.body = None;
                    self.client_done = true;
                    return None;
                }
            };
            let _ = body.flow_control().release_capacity(data.len());
            self.input.extend_from_slice(&data);
            let mut answers = Vec::new();
            let mut used = 0;
            let ended = loop {
                match grpc::next_message(&self.input[used..], max) {
                    Ok(Some((message, len))) => {
                        let Ok(frame) = grpc::decode_client_frame(message) else {
                            break Some(End::Status(Code::InvalidArgument, "bad client frame"));
                        };
                        used += len;
                        core.with_conn(self.key, |c| {
                            core.grpc_client_frame(c, self.key, frame, &mut answers)
                        });
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(End::Status(e.code(), e.reason())),
                }
            };
            self.input.drain(..used);
            if self.input.is_empty() {
                // Nothing kept between frames.
                self.input = Vec::new();
            }
            if !answers.is_empty() {
                let bytes_max = core.cfg.outbound_queue_bytes_max;
                core.with_conn(self.key, |c| {
                    events::push(c, Bytes::from(answers), bytes_max)
                });
            }
            if ended.is_some() {
                return ended;
            }
        }
    }

    /// Ends the call: its trailers (a drain's say when to come back), its
    /// count, and its slab entry (the hubs are told it left).
    fn finish(mut self, end: End) {
        let code = match end {
            End::Gone => {
                note_grpc_end(Code::Cancelled);
                Code::Cancelled
            }
            End::Status(code, reason) => {
                let _ = self.send.send_trailers(status_headers(code, reason));
                note_grpc_end(code);
                code
            }
        };
        let peer = self.core.with_conn(self.key, |c| {
            if code == Code::Unavailable {
                c.going(Gone::Drain);
            }
            c.client()
        });
        debug!(%peer, code = code.name(), "grpc call ended");
        self.core.deregister(self.key);
    }
}

/// `grpc-status` and, with a reason, `grpc-message`; UNAVAILABLE (the
/// drain) says when to come back (`grpc-retry-pushback-ms`), at a random
/// point of the same window an SSE client is given, so that the clients of
/// a drained gateway do not all come back at once.
fn status_headers(code: Code, reason: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("grpc-status", HeaderValue::from(code as u16));
    if !reason.is_empty() {
        if let Ok(message) = HeaderValue::from_str(&grpc::status_message(reason)) {
            headers.insert("grpc-message", message);
        }
    }
    if code == Code::Unavailable {
        let ms = rand::thread_rng().gen_range(SSE_RETRY_MS_MIN..=SSE_RETRY_MS_MAX);
        headers.insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
    }
    headers
}

/// A response that is only a status (gRPC's "Trailers-Only"): one HEADERS
/// frame that ends the stream.
fn trailers_only(code: Code, reason: &str) -> http::Result<Response<()>> {
    let mut response = Response::builder()
        .status(200)
        .header("content-type", "application/grpc");
    for (name, value) in &status_headers(code, reason) {
        response = response.header(name, value);
    }
    response.body(())
}

/// The socket, with the bytes the request path read before it knew the
/// client speaks HTTP/2 served first; through the connection's TLS
/// session when it came over TLS (h2 reads and writes plaintext).
struct Prefixed<T> {
    first: Bytes,
    inner: T,
    tls: Option<Box<crate::tls::Session>>,
}

/// Ciphertext read from the socket at a time, on a TLS connection.
const TLS_READ_BYTES: usize = 16 * 1024;

thread_local! {
    /// The ciphertext of one read of a TLS HTTP/2 connection, decrypted
    /// in place: per thread (one core), not per connection.
    static TLS_READ: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<T: AsyncWrite + Unpin> Prefixed<T> {
    /// Sends what the TLS session holds (a record, a handshake answer).
    fn flush_sealed(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let Some(tls) = self.tls.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while !tls.pending().is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, tls.pending()) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => tls.sent(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.first.is_empty() {
            let n = this.first.len().min(buf.remaining());
            let chunk = this.first.split_to(n);
            buf.put_slice(&chunk);
            if this.first.is_empty() {
                this.first = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        if this.tls.is_none() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        loop {
            let mut plain = Vec::new();
            let received = TLS_READ.with(|raw| {
                let mut raw = raw.borrow_mut();
                raw.resize(TLS_READ_BYTES, 0);
                let mut read = ReadBuf::new(&mut raw);
                match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
                let n = read.filled().len();
                let tls = this.tls.as_mut().expect("checked above");
                Poll::Ready(Ok((n > 0).then(|| {
                    tls.receive(&mut raw[..n], &mut |p| plain.extend_from_slice(p))
                })))
            });
            let received = match received {
                Poll::Ready(Ok(Some(received))) => received,
                // The end of the stream.
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            match received {
                Ok(crate::tls::Received::Open) => {}
                // close_notify: the end of the stream.
                Ok(crate::tls::Received::Closed) => return Poll::Ready(Ok(())),
                Err(failure) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        failure.error,
                    )))
                }
            }
            // A handshake message after the handshake (a key update) may
            // want an answer; it goes with the next write at the latest.
            let _ = this.flush_sealed(cx);
            if !plain.is_empty() {
                let k = plain.len().min(buf.remaining());
                buf.put_slice(&plain[..k]);
                this.first = Bytes::from(plain).slice(k..);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.tls.is_none() {
            return Pin::new(&mut this.inner).poll_write(cx, bytes);
        }
        // At most one record waits in the session: the next is sealed
        // once it has left.
        match this.flush_sealed(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let n = bytes.len().min(crate::tls::RECORD_PLAINTEXT_BYTES);
        let mut sealed = Vec::new();
        let tls = this.tls.as_mut().expect("checked above");
        if let Err(e) = tls.seal(&bytes[..n], &mut sealed) {
            return Poll::Ready(Err(std::io::Error::other(e)));
        }
        tls.unsent(&sealed);
        // Sent now if the socket takes it; otherwise by the next write or
        // the flush.
        let _ = this.flush_sealed(cx);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match this.flush_sealed(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(tls) = this.tls.as_mut() {
            tls.close_notify();
        }
        match this.flush_sealed(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        }
    }
}
