//! HTTP requests on an HTTP/2 connection that are not gRPC: SSE streams,
//! long-polls, `POST /publish`, health checks, CORS preflights. A browser
//! that gets `h2` by ALPN sends them all on one connection, so a page
//! with many tabs is not held to six EventSource connections per origin.
//!
//! Each such stream is served by the same request path as an HTTP/1.1
//! connection (`request::Io`): its request is written as an HTTP/1.0
//! request (no chunked coding, no keep-alive: one request per stream)
//! into a slab entry without a socket, and what that path queues for the
//! entry, an HTTP/1.x response, is turned back into the stream's
//! response headers and DATA frames here. So every rule of a request
//! (channels, tokens, origins, limits, resume, gaps, drain, heartbeats,
//! token expiry) holds on HTTP/2 as written once; fan-out stages an SSE
//! stream's bytes on the entry like on any subscriber and wakes this
//! task, which sends them as the client's window allows (a slow reader
//! meets the outbound budget, as on a socket).

use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use tracing::debug;

use crate::core::{Core, State, Transport};
use crate::request::{Close, Io, Phase};

/// Response headers a translated HTTP/1.x head may carry at most (the
/// gateway writes a dozen).
const RESPONSE_HEADERS_MAX: usize = 32;

/// Hands connection `key`, which opened with the HTTP/2 preface (in
/// `first_bytes`, with what came after it), to a task of its own: gRPC
/// calls and these requests. Passed to the request path (which does not
/// know HTTP/2) as a function of no size.
pub fn start(core: Rc<Core>, key: u32, first_bytes: Vec<u8>) {
    drop(monoio::spawn(crate::grpc::serve(
        core,
        key,
        first_bytes,
        serve,
    )));
}

/// Serves one non-gRPC request of HTTP/2 connection `conn_key`.
pub async fn serve(
    core: Rc<Core>,
    conn_key: u32,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let client = core.with_conn(conn_key, |c| c.client());
    let (head, mut body) = request.into_parts();
    // A body (`POST /publish`) is read whole first: the request path takes
    // it with its head. Over the publish limit it is refused here.
    let max = core.cfg.publish_payload_bytes_max;
    let mut payload = Vec::new();
    while let Some(data) = poll_fn(|cx| body.poll_data(cx)).await {
        let Ok(data) = data else { return };
        let _ = body.flow_control().release_capacity(data.len());
        if payload.len() + data.len() > max {
            core.stats.handshake("payload too large");
            answer_status(&mut respond, StatusCode::PAYLOAD_TOO_LARGE);
            return;
        }
        payload.extend_from_slice(&data);
    }
    let Some(mut bytes) = http1_request(&head, payload.len()) else {
        core.stats.handshake("bad request");
        answer_status(&mut respond, StatusCode::BAD_REQUEST);
        return;
    };
    drop(head);
    bytes.extend_from_slice(&payload);
    drop(payload);
    let key = core.register_stream(client);
    core.with_conn(key, |c| {
        c.state = State::Request;
        // Between its connection's PINGs: the head timeout does not apply
        // to a request that came whole.
        c.deadline_s = 0;
    });
    let mut io = Io::new(&core, key);
    let mut http = std::pin::pin!(io.http(move |pending| *pending = bytes));
    let mut stream = Translation {
        core: core.clone(),
        key,
        respond: Some(respond),
        head: BytesMut::new(),
        send: None,
        sending: Bytes::new(),
    };
    let mut phase: Option<Phase> = None;
    poll_fn(|cx| {
        if phase.is_none() {
            if let Poll::Ready(p) = http.as_mut().poll(cx) {
                phase = Some(p);
            }
        }
        stream.poll_done(cx, phase.as_ref())
    })
    .await;
    core.deregister(key);
}

/// Answers a stream with a bare status.
fn answer_status(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    if let Ok(response) = Response::builder().status(status).body(()) {
        let _ = respond.send_response(response, true);
    }
}

/// The HTTP/2 request as the HTTP/1.0 request the request path reads:
/// request line, `Host` from `:authority`, the headers (HTTP/2 has no
/// connection-specific ones), the body's length. None when a header
/// cannot be written so (h2 has refused such bytes already).
fn http1_request(head: &http::request::Parts, body_len: usize) -> Option<Vec<u8>> {
    let target = head.uri.path_and_query()?.as_str();
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.0\r\n");
    if let Some(authority) = head.uri.authority() {
        if !head.headers.contains_key(http::header::HOST) {
            out.extend_from_slice(b"Host: ");
            out.extend_from_slice(authority.as_str().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    for (name, value) in &head.headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::TE {
            continue;
        }
        let value = value.as_bytes();
        if value.iter().any(|&b| b == b'\r' || b == b'\n') {
            return None;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if body_len > 0 || head.method == http::Method::POST {
        out.extend_from_slice(format!("Content-Length: {body_len}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

/// An HTTP/1.x response queued on the stream's entry, on its way to the
/// HTTP/2 stream: its head until it is whole, then its body.
struct Translation {
    core: Rc<Core>,
    key: u32,
    respond: Option<SendResponse<Bytes>>,
    /// The response head so far (until its blank line).
    head: BytesMut,
    /// The stream's body, once the head is sent.
    send: Option<SendStream<Bytes>>,
    /// What is left of the bytes being sent.
    sending: Bytes,
}

impl Translation {
    /// Moves what is queued to the stream; ready when the stream is over
    /// (answered, ended by the gateway, or reset by the client).
    fn poll_done(&mut self, cx: &mut Context<'_>, phase: Option<&Phase>) -> Poll<()> {
        let core = self.core.clone();
        let key = self.key;
        // Bytes taken off the queue: the request path may be waiting for
        // them to have left (`respond`), and nothing else would wake it.
        let mut took = false;
        loop {
            let dead = core.with_conn(key, |c| {
                if !c.dead && phase.is_some() && c.transport() == Transport::LongPoll {
                    // A held poll: what the event loop does for one parked.
                    core.serve_held_poll(c, key);
                }
                c.dead
            });
            if dead || matches!(phase, Some(Phase::Close(Close::Now) | Phase::Http2(_))) {
                self.reset();
                return Poll::Ready(());
            }
            if let Some(send) = &mut self.send {
                if send.poll_reset(cx).is_ready() {
                    return Poll::Ready(());
                }
            } else if let Some(respond) = &mut self.respond {
                if respond.poll_reset(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            if self.sending.is_empty() {
                let front = core.with_conn(key, |c| c.take_front());
                took |= front.is_some();
                match front {
                    Some(bytes) if self.send.is_none() => {
                        if !self.take_head(bytes) {
                            return Poll::Ready(());
                        }
                        continue;
                    }
                    Some(bytes) => self.sending = bytes,
                    None => {}
                }
            }
            if let (false, Some(send)) = (self.sending.is_empty(), &mut self.send) {
                send.reserve_capacity(self.sending.len());
                let capacity = send.capacity();
                if capacity > 0 {
                    let chunk = self.sending.split_to(capacity.min(self.sending.len()));
                    if send.send_data(chunk, false).is_err() {
                        return Poll::Ready(());
                    }
                    continue;
                }
                match send.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(_) => return Poll::Ready(()),
                    // The window is closed: fan-out goes on queueing,
                    // within the outbound budget.
                    Poll::Pending => {}
                }
            }
            let finished = core.with_conn(key, |c| {
                let answered = matches!(phase, Some(Phase::Close(Close::Linger) | Phase::Idle))
                    || (phase.is_some() && c.transport() == Transport::Closing);
                answered && c.queue.is_empty()
            });
            if finished && self.sending.is_empty() {
                match &mut self.send {
                    Some(send) => {
                        let _ = send.send_data(Bytes::new(), true);
                    }
                    // Nothing was written: no response at all.
                    None => self.reset(),
                }
                return Poll::Ready(());
            }
            core.with_conn(key, |c| c.waker = Some(cx.waker().clone()));
            if took && phase.is_none() {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
    }

    /// Takes bytes of the response head; once it is whole, sends it as the
    /// stream's headers and keeps the rest as body. False when the head is
    /// not an HTTP response (the stream is reset).
    fn take_head(&mut self, bytes: Bytes) -> bool {
        self.head.extend_from_slice(&bytes);
        let mut headers = [httparse::EMPTY_HEADER; RESPONSE_HEADERS_MAX];
        let mut parsed = httparse::Response::new(&mut headers);
        let len = match parsed.parse(&self.head) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return true,
            Err(e) => {
                debug!(error = %e, "http/2 stream: response head not translatable");
                self.reset();
                return false;
            }
        };
        let mut response = Response::builder()
            .status(parsed.code.unwrap_or(500))
            .body(())
            .expect("a status and no header");
        for h in parsed.headers.iter() {
            // Connection-specific headers have no place in HTTP/2 (RFC
            // 9113 §8.2.2).
            let name = h.name.to_ascii_lowercase();
            if matches!(
                name.as_str(),
                "connection" | "keep-alive" | "transfer-encoding" | "proxy-connection" | "upgrade"
            ) {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) {
                response.headers_mut().append(name, value);
            }
        }
        let body = self.head.split_off(len).freeze();
        self.head = BytesMut::new();
        let Some(mut respond) = self.respond.take() else {
            return false;
        };
        match respond.send_response(response, false) {
            Ok(send) => {
                self.send = Some(send);
                self.sending = body;
                true
            }
            Err(_) => false,
        }
    }

    fn reset(&mut self) {
        if let Some(send) = &mut self.send {
            send.send_reset(h2::Reason::CANCEL);
        } else if let Some(respond) = &mut self.respond {
            respond.send_reset(h2::Reason::CANCEL);
        }
    }
}
