//! The client side of gRPC: HTTP/2 connections (cleartext, prior
//! knowledge, as gRPC clients speak it without TLS) and
//! `gateway.v1.Gateway/Subscribe` streams on them, with the h2 crate on
//! tokio (a tonic client would add a tower stack per connection, and idle
//! opens thousands), the length-prefixed messages of a stream's DATA frames
//! decoded into the protocol crate's `ServerFrame`s; and idle's gRPC
//! variant, [`IdleGrpc`]: N connections, each with one open Subscribe
//! stream, held until the server has been measured.
//!
//! Each connection's driver task answers the server's PINGs (the gateway's
//! heartbeat) for as long as it is held: unlike idle's other transports, the
//! sockets stay in the client's epoll set, which adds the client's epoll
//! entries to the machine's Slab figure.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::RecvStream;
use prost::Message as _;
use protocol::grpc::{server_frame, ServerFrame, SubscribeRequest};

use crate::cli::{Server, ServerKind};
use crate::sys;

/// The method the bench calls.
const SUBSCRIBE_PATH: &str = "/gateway.v1.Gateway/Subscribe";
/// A received message over this is an error: fan-out payloads are at most
/// 16 KiB.
const MESSAGE_BYTES_MAX: usize = 1 << 20;
/// The connection's receive window: with a thousand streams on one
/// connection, h2's default (64 KiB, the same as one stream's) would let
/// the connection's window, not the streams', set the pace.
const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// The gateway's `grpc_streams_per_connection_max` by default.
const GATEWAY_STREAMS_DEFAULT: u64 = 100;

/// `server` with its gRPC listener asked for (`--grpc-listen`, the READY
/// line's `grpc=`) and, for the gateway, room for `streams_per_connection`
/// streams on one connection (its default allows 100; tonic's, no limit).
/// An attached server is measured as it runs.
pub fn with_grpc_listener(
    server: &Server,
    kind: ServerKind,
    streams_per_connection: u64,
) -> Server {
    let mut server = server.clone();
    if let Server::Spawn { extra_args, .. } = &mut server {
        extra_args.push("--grpc-listen=127.0.0.1:0".into());
        if kind == ServerKind::Gateway && streams_per_connection > GATEWAY_STREAMS_DEFAULT {
            extra_args.push(format!(
                "--grpc-streams-per-connection-max={streams_per_connection}"
            ));
        }
    }
    server
}

/// Opens an HTTP/2 connection from `source` to `target`, whose driver runs
/// on a task of its own until the connection ends. Its socket is closed with
/// a reset when it is dropped (see `sys::close_abortive`).
pub async fn connect(source: IpAddr, target: SocketAddr) -> Result<SendRequest<Bytes>, String> {
    let fd = sys::start_connect(source, target).map_err(|e| connect_error(&e))?;
    // SAFETY: a connected (or connecting) TCP socket this process owns
    // alone, handed over to the TcpStream, which closes it.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let stream =
        tokio::net::TcpStream::from_std(std_stream).map_err(|e| format!("register: {e}"))?;
    stream
        .writable()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if let Some(e) = sys::socket_error(stream.as_raw_fd()) {
        return Err(format!("connect: {e}"));
    }
    sys::set_linger_zero(stream.as_raw_fd());
    let _ = stream.set_nodelay(true);
    let (send, connection) = h2::client::Builder::new()
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(async move {
        // Its end shows on the streams.
        let _ = connection.await;
    });
    Ok(send)
}

/// A connect error as a failure category: out of descriptors and out of
/// local ports say what to do.
fn connect_error(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) => format!("socket: {e}: out of descriptors"),
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => {
            format!("connect: {e}: local ports exhausted, add --sources")
        }
        _ => format!("connect: {e}"),
    }
}

/// Calls Subscribe on `channel` over `send`'s connection (waiting while the
/// server's concurrent-stream limit is reached), and returns the response
/// stream once its headers say it is open: a refusal (an HTTP status other
/// than 200, or a trailers-only response with its grpc-status) is an error.
pub async fn subscribe(
    send: SendRequest<Bytes>,
    authority: &str,
    channel: &str,
) -> Result<RecvStream, String> {
    let mut send = send.ready().await.map_err(|e| format!("HTTP/2: {e}"))?;
    let request = http::Request::post(format!("http://{authority}{SUBSCRIBE_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| format!("request: {e}"))?;
    let (response, mut body) = send
        .send_request(request, false)
        .map_err(|e| format!("send request: {e}"))?;
    let mut message = Vec::new();
    protocol::grpc::encode_message(
        &SubscribeRequest {
            channels: vec![channel.to_owned()],
            since: None,
        },
        &mut message,
    );
    body.send_data(message.into(), true)
        .map_err(|e| format!("send request message: {e}"))?;
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    if response.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", response.status().as_u16()));
    }
    if let Some(status) = grpc_status(response.headers()) {
        return Err(format!("refused: {status}"));
    }
    Ok(response.into_body())
}

/// `grpc-status N: message` of a trailers(-only) block, if it has one.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<String> {
    let code = headers.get("grpc-status")?;
    let code = String::from_utf8_lossy(code.as_bytes()).into_owned();
    let message = headers
        .get("grpc-message")
        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
        .unwrap_or_default();
    Some(format!("grpc-status {code}: {message:?}"))
}

/// How a response stream ended: its trailers' status, or the HTTP/2 error
/// (a reset, a GOAWAY, the connection lost).
pub async fn stream_end(body: &mut RecvStream) -> String {
    match body.trailers().await {
        Ok(Some(trailers)) => {
            grpc_status(&trailers).unwrap_or_else(|| "trailers without grpc-status".into())
        }
        Ok(None) => "ended without trailers".into(),
        Err(e) => h2_error(&e),
    }
}

/// An HTTP/2 error as a failure category.
pub fn h2_error(e: &h2::Error) -> String {
    match e.reason() {
        Some(reason) if e.is_go_away() => format!("GOAWAY {reason:?}"),
        Some(reason) => format!("RST_STREAM {reason:?}"),
        None => format!("HTTP/2: {e}"),
    }
}

/// Cuts a stream's DATA, in whatever pieces it arrives, into whole gRPC
/// messages and decodes each as a `ServerFrame`.
#[derive(Debug, Default)]
pub struct Messages {
    /// An unfinished message from the previous pieces.
    carry: Vec<u8>,
}

impl Messages {
    /// Feeds one piece; `on_frame` gets a message's payload, or `None` for
    /// a frame that is not a message (a gap, a welcome, …). An error ends
    /// the stream: a compressed, oversized or undecodable message.
    pub fn feed(
        &mut self,
        piece: &[u8],
        mut on_frame: impl FnMut(Option<&[u8]>),
    ) -> Result<(), String> {
        let joined;
        let data = if self.carry.is_empty() {
            piece
        } else {
            self.carry.extend_from_slice(piece);
            joined = std::mem::take(&mut self.carry);
            &joined[..]
        };
        let mut at = 0;
        while let Some((message, used)) =
            protocol::grpc::next_message(&data[at..], MESSAGE_BYTES_MAX)
                .map_err(|e| e.reason().to_string())?
        {
            at += used;
            let frame =
                ServerFrame::decode(message).map_err(|e| format!("bad ServerFrame: {e}"))?;
            match frame.kind {
                Some(server_frame::Kind::Message(m)) => on_frame(Some(&m.payload)),
                _ => on_frame(None),
            }
        }
        self.carry.extend_from_slice(&data[at..]);
        Ok(())
    }
}

/// Idle's gRPC connections: opened by [`IdleGrpc::open`], each with one
/// Subscribe stream whose task counts what arrives until the runtime is
/// dropped (which resets every connection).
pub struct IdleGrpc {
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<IdleShared>,
    pub open: u64,
    pub not_attempted: u64,
    /// Failure category → (count, first example).
    pub failures: BTreeMap<String, (u64, String)>,
    pub connect_time: Duration,
}

/// What the held streams' tasks count.
#[derive(Default)]
struct IdleShared {
    /// Connections started (a permit taken, the connect begun).
    started: AtomicU64,
    /// Streams that ended (the server closed or reset them).
    closed: AtomicU64,
    /// Streams that received a message (or any bytes of one).
    with_data: AtomicU64,
    bytes: AtomicU64,
}

/// What [`IdleGrpc::open`] needs.
pub struct IdleConfig<'a> {
    pub target: SocketAddr,
    pub sources: &'a [IpAddr],
    pub connections: u64,
    /// Connection i subscribes to `idle-{i % channels}`.
    pub channels: u64,
    pub in_flight: u64,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
}

impl IdleGrpc {
    /// Opens the connections, at most `in_flight` at a time; returns when
    /// all are open or failed, or at the connect timeout.
    pub fn open(cfg: &IdleConfig<'_>) -> Result<IdleGrpc, String> {
        // One thread: the connections are idle once open.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("idle-grpc")
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let shared = Arc::new(IdleShared::default());
        let limit = Arc::new(tokio::sync::Semaphore::new(cfg.in_flight as usize));
        let (tx, rx) = mpsc::channel::<Result<(), (String, String)>>();
        let start = Instant::now();
        let deadline = tokio::time::Instant::from_std(start + cfg.connect_timeout);
        let authority = cfg.target.to_string();
        for i in 0..cfg.connections {
            let (shared, limit, tx) = (shared.clone(), limit.clone(), tx.clone());
            let source = cfg.sources[(i % cfg.sources.len() as u64) as usize];
            let (target, authority) = (cfg.target, authority.clone());
            let channel = format!("idle-{}", i % cfg.channels);
            let handshake_timeout = cfg.handshake_timeout;
            runtime.spawn(async move {
                let opened = tokio::time::timeout_at(deadline, async {
                    let _permit = limit.acquire().await.expect("never closed");
                    shared.started.fetch_add(1, Relaxed);
                    tokio::time::timeout(handshake_timeout, async {
                        let send = connect(source, target).await?;
                        let body = subscribe(send.clone(), &authority, &channel).await?;
                        Ok::<_, String>((send, body))
                    })
                    .await
                })
                .await;
                let (send, body) = match opened {
                    Ok(Ok(Ok(held))) => held,
                    Ok(Ok(Err(e))) => {
                        let _ = tx.send(Err((e, format!("connection {i} from {source}"))));
                        return;
                    }
                    Ok(Err(_)) => {
                        let _ = tx.send(Err((
                            "no answer within --handshake-timeout-s".into(),
                            format!("connection {i}"),
                        )));
                        return;
                    }
                    Err(_) => {
                        let _ = tx.send(Err((
                            "unfinished at --connect-timeout-s".into(),
                            format!("connection {i}"),
                        )));
                        return;
                    }
                };
                let _ = tx.send(Ok(()));
                hold(send, body, &shared).await;
            });
        }
        drop(tx);
        let mut idle = IdleGrpc {
            runtime: Some(runtime),
            shared,
            open: 0,
            not_attempted: 0,
            failures: BTreeMap::new(),
            connect_time: Duration::ZERO,
        };
        let mut last_progress = start;
        let mut open_at_last_progress = 0;
        let mut done = 0;
        while done < cfg.connections {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(())) => {
                    idle.open += 1;
                    idle.connect_time = start.elapsed();
                    done += 1;
                }
                Ok(Err((category, example))) => {
                    idle.failures.entry(category).or_insert((0, example)).0 += 1;
                    done += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now.duration_since(last_progress) >= Duration::from_secs(1) {
                let since = now.duration_since(last_progress).as_secs_f64();
                eprintln!(
                    "bench: idle grpc: {}/{} open, {} failed, {:.0}/s now",
                    idle.open,
                    cfg.connections,
                    done - idle.open,
                    (idle.open - open_at_last_progress) as f64 / since
                );
                last_progress = now;
                open_at_last_progress = idle.open;
            }
        }
        // Those that never got a permit before the deadline were not
        // attempted: they are not failures of the server.
        idle.not_attempted = cfg.connections - idle.shared.started.load(Relaxed);
        if let Some((n, _)) = idle.failures.get_mut("unfinished at --connect-timeout-s") {
            *n -= idle.not_attempted.min(*n);
        }
        idle.failures.retain(|_, (n, _)| *n > 0);
        if idle.open == 0 {
            idle.connect_time = start.elapsed();
        }
        Ok(idle)
    }

    /// Streams the server ended during the hold, streams that received
    /// data, and the bytes they received.
    pub fn hold_counts(&self) -> (u64, u64, u64) {
        (
            self.shared.closed.load(Relaxed),
            self.shared.with_data.load(Relaxed),
            self.shared.bytes.load(Relaxed),
        )
    }

    /// Resets every connection (their sockets linger 0).
    pub fn close_all(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

impl Drop for IdleGrpc {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// Holds one idle stream: counts what arrives, and its end. `send` keeps
/// the connection's client side alive.
async fn hold(send: SendRequest<Bytes>, mut body: RecvStream, shared: &IdleShared) {
    let mut got_data = false;
    // Until the stream ends, in error or not.
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        shared.bytes.fetch_add(data.len() as u64, Relaxed);
        if !got_data {
            got_data = true;
            shared.with_data.fetch_add(1, Relaxed);
        }
    }
    shared.closed.fetch_add(1, Relaxed);
    drop(send);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: server_frame::Kind) -> Vec<u8> {
        let mut out = Vec::new();
        protocol::grpc::encode_message(&ServerFrame { kind: Some(kind) }, &mut out);
        out
    }

    fn message(payload: &[u8]) -> server_frame::Kind {
        server_frame::Kind::Message(protocol::grpc::Message {
            channel: "c".into(),
            id: 7,
            event: String::new(),
            payload: payload.to_vec(),
            binary: false,
        })
    }

    #[test]
    fn messages_in_any_pieces() {
        let mut stream = frame(message(b"one"));
        stream.extend(frame(server_frame::Kind::Gap(protocol::grpc::Gap {
            channel: "c".into(),
        })));
        stream.extend(frame(message(b"two")));
        for piece in [1, 2, 5, 7, stream.len()] {
            let mut m = Messages::default();
            let mut got: Vec<Option<Vec<u8>>> = Vec::new();
            for chunk in stream.chunks(piece) {
                m.feed(chunk, |p| got.push(p.map(<[u8]>::to_vec))).unwrap();
            }
            assert_eq!(
                got,
                [Some(b"one".to_vec()), None, Some(b"two".to_vec())],
                "pieces of {piece}"
            );
            assert!(m.carry.is_empty());
        }
        let mut compressed = frame(message(b"x"));
        compressed[0] = 1;
        assert!(Messages::default().feed(&compressed, |_| {}).is_err());
        let garbage = [0, 0, 0, 0, 2, 0xff, 0xff];
        assert!(Messages::default().feed(&garbage, |_| {}).is_err());
    }

    #[test]
    fn status_of_trailers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "8".parse().unwrap());
        h.insert("grpc-message", "slow consumer".parse().unwrap());
        assert_eq!(
            grpc_status(&h).as_deref(),
            Some("grpc-status 8: \"slow consumer\"")
        );
    }

    #[test]
    fn the_gateway_gets_room_for_its_streams() {
        let spawn = Server::Spawn {
            bin: "gw".into(),
            cores: 1,
            extra_args: vec!["--x".into()],
            stderr: None,
            ready_timeout: Duration::from_secs(1),
        };
        let Server::Spawn { extra_args, .. } =
            with_grpc_listener(&spawn, ServerKind::Gateway, 1000)
        else {
            panic!()
        };
        assert_eq!(
            extra_args,
            [
                "--x",
                "--grpc-listen=127.0.0.1:0",
                "--grpc-streams-per-connection-max=1000"
            ]
        );
        let Server::Spawn { extra_args, .. } =
            with_grpc_listener(&spawn, ServerKind::Baseline, 1000)
        else {
            panic!()
        };
        assert_eq!(extra_args, ["--x", "--grpc-listen=127.0.0.1:0"]);
        let Server::Spawn { extra_args, .. } = with_grpc_listener(&spawn, ServerKind::Gateway, 1)
        else {
            panic!()
        };
        assert_eq!(extra_args, ["--x", "--grpc-listen=127.0.0.1:0"]);
    }
}
