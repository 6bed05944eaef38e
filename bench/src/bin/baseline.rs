//! `baseline`: the server a Rust engineer would write instead of the gateway,
//! which the load generator measures side by side with it.
//!
//! It is deliberately the straightforward design, neither crippled nor tuned:
//! a tokio multi-thread runtime, axum for HTTP, axum's WebSocket support
//! (tokio-tungstenite underneath) and its SSE support, one task per
//! connection, one `tokio::sync::broadcast` channel per channel name, and a
//! ZeroMQ SUB socket read on a plain thread. Each publication is encoded once
//! (a WebSocket message whose bytes are shared by reference count, an SSE
//! event that axum copies per subscriber) and sent into its channel's
//! broadcast; a subscriber that lags behind the broadcast's capacity is
//! disconnected, which is what `RecvError::Lagged` invites.
//!
//! It speaks the gateway's contract (see the README): the same ZeroMQ frames,
//! the same `READY` line, WebSocket and SSE messages with the same meta line
//! and payload, and `/healthz`. What it leaves out on purpose: resume
//! (`Last-Event-ID`, `since=`), history and long-poll. The baseline measures
//! delivery, not resume.
//!
//! Two-way, the gateway's `gateway.v1` contract, the same straightforward
//! way: a WebSocket that offers the subprotocol (axum's
//! `WebSocketUpgrade::protocols`) is welcomed with an address of its own
//! (`{"type":"welcome","address":"…"}`: a random instance id and a
//! connection counter, 52 hex digits), and may send messages
//! (`{"channel":"room","ref":"7"}\n<payload>`). Its task checks each one and
//! hands it to the upstream thread through a bounded tokio channel, waiting
//! when the channel is full (so a slow hub stops the reading of the clients
//! that send, and nothing is dropped), then acknowledges a `ref`
//! (`{"type":"ack","ref":"7"}`) or answers an error. The upstream thread
//! sends each as five ZeroMQ frames, `[b"message", address, channel, meta,
//! payload]`, on a PUSH socket bound at each `--upstream-bind`, blocking
//! when the hubs do not keep up. A publication whose first frame is `!` and
//! an address goes, through a map of address → the connection's bounded
//! channel, to that one connection (`{"channel":"!ADDRESS"}\n<payload>`); a
//! connection whose channel is full is dropped from the map and closed as a
//! slow consumer, like a lagging subscriber. Left out: subscribe and
//! unsubscribe control messages, send rate limits, tokens, presence events.
//!
//! gRPC (`--grpc-listen`): the gateway's `gateway.v1.Gateway` service
//! (`protocol/proto/gateway/v1/gateway.proto`), its `Subscribe` method, on
//! tonic's own server (hyper's HTTP/2 with tonic's defaults), fed by the same
//! broadcasts: each publication's `ServerFrame` is built once and cloned
//! into each subscriber's stream, which tonic encodes. A subscriber that
//! lags ends with `RESOURCE_EXHAUSTED` "slow consumer". The service is
//! written out as tonic-build would generate it (a `Service` that routes by
//! path to `tonic::server::Grpc::server_streaming`), over the prost structs
//! the protocol crate derives, so no `protoc` is needed to build it. Left
//! out: `since` (history), `Connect`, tokens. `/healthz` counts the HTTP/2
//! connections with the others.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{BuildHasher as _, Hasher as _};
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use clap::Parser;
use protocol::grpc::{server_frame, ServerFrame, SubscribeRequest};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{StreamExt as _, StreamMap};
use tracing::{error, info, warn};

/// Messages a channel's broadcast holds for its slowest receiver.
const BROADCAST_CAPACITY: usize = 1024;
/// The gateway's default limits, so both refuse the same input.
const CHANNEL_NAME_BYTES_MAX: usize = 128;
const CHANNELS_PER_CONNECTION_MAX: usize = 16;
const PAYLOAD_BYTES_MAX: usize = 1 << 20;
const EVENT_NAME_BYTES_MAX: usize = 64;
const ZMQ_RCVHWM_MESSAGES: i32 = 100_000;
/// The two-way subprotocol, and the gateway's limits on what clients send.
const SUBPROTOCOL: &str = "gateway.v1";
const CLIENT_META_BYTES_MAX: usize = 1024;
const REF_BYTES_MAX: usize = 64;
/// Hex digits of a connection's address (the gateway's length).
const ADDRESS_BYTES: usize = 52;
/// Client messages waiting for the upstream thread, over all connections:
/// past this, the connections that send wait.
const UPSTREAM_QUEUE: usize = 1024;
/// Messages for one connection waiting for its task; past this it is a
/// slow consumer.
const DIRECT_QUEUE: usize = 1024;

/// The baseline server: tokio + axum + broadcast channels, ZeroMQ in.
#[derive(Parser)]
#[command(name = "baseline")]
struct Args {
    /// Address for WebSocket, SSE and /healthz (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Runtime worker threads; 0 means one per CPU.
    #[arg(long, default_value_t = 0)]
    cores: usize,
    /// ZeroMQ endpoint the SUB socket binds (`*` port allowed; "" binds none).
    #[arg(long, default_value = "tcp://127.0.0.1:5561")]
    zmq_bind: String,
    /// ZeroMQ endpoint the SUB socket connects to (repeatable).
    #[arg(long)]
    zmq_connect: Vec<String>,
    /// ZeroMQ endpoint the upstream PUSH socket binds, where hubs connect a
    /// PULL to receive what clients send (repeatable; `*` port allowed).
    /// None: a client's message is answered `upstream not configured`.
    #[arg(long = "upstream-bind", value_name = "ENDPOINT")]
    upstream_bind: Vec<String>,
    /// Address for gRPC (HTTP/2 cleartext, prior knowledge), the READY
    /// line's `grpc=` (port 0 picks one). None: no gRPC.
    #[arg(long, value_name = "ADDR")]
    grpc_listen: Option<SocketAddr>,
}

/// One publication, encoded once for every subscriber of its channel.
struct Delivery {
    ws: Message,
    sse: Event,
    grpc: ServerFrame,
}

/// A connection's address: 52 lowercase hex digits.
type Address = [u8; ADDRESS_BYTES];

/// One client message on its way to the hubs.
struct Upstream {
    address: Address,
    channel: String,
    binary: bool,
    payload: Vec<u8>,
}

struct AppState {
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<Delivery>>>>,
    connections: AtomicUsize,
    /// Two-way connections by address: where a message for one of them goes.
    direct: Mutex<HashMap<Address, mpsc::Sender<Message>>>,
    /// To the upstream thread (`None`: no `--upstream-bind`).
    upstream: Option<mpsc::Sender<Upstream>>,
    /// This process's part of every address, drawn at start.
    instance: u64,
    next_connection: AtomicU64,
}

impl AppState {
    fn new(upstream: Option<mpsc::Sender<Upstream>>) -> AppState {
        AppState {
            channels: Mutex::default(),
            connections: AtomicUsize::new(0),
            direct: Mutex::default(),
            upstream,
            // Random enough to tell runs apart: std's per-process hash keys.
            instance: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
            next_connection: AtomicU64::new(0),
        }
    }

    /// A new connection's address, and the channel its messages come on.
    fn register(&self) -> (Address, mpsc::Receiver<Message>) {
        let n = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let address = make_address(self.instance, n);
        let (tx, rx) = mpsc::channel(DIRECT_QUEUE);
        self.direct.lock().unwrap().insert(address, tx);
        (address, rx)
    }

    /// Hands a publication for one connection to its task. A connection
    /// whose queue is full loses its entry: its task closes it as a slow
    /// consumer once it has sent what is queued.
    fn deliver_direct(&self, address: &Address, message: Message) {
        let mut direct = self.direct.lock().unwrap();
        let Some(tx) = direct.get(address) else {
            return; // gone, or never here: dropped, as the gateway does
        };
        match tx.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(address = %String::from_utf8_lossy(address), "connection lagged; closing");
                direct.remove(address);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                direct.remove(address);
            }
        }
    }

    fn subscribe(&self, channel: &str) -> broadcast::Receiver<Arc<Delivery>> {
        let mut channels = self.channels.lock().unwrap();
        channels
            .entry(channel.to_owned())
            .or_insert_with(|| broadcast::channel(BROADCAST_CAPACITY).0)
            .subscribe()
    }

    fn publish(&self, channel: &str, delivery: Arc<Delivery>) {
        let mut channels = self.channels.lock().unwrap();
        if let Some(tx) = channels.get(channel) {
            if tx.send(delivery).is_err() {
                // Every subscriber has gone: forget the channel.
                channels.remove(channel);
            }
        }
    }
}

/// Counts a live connection for /healthz while it exists.
struct Connected(Arc<AppState>);

impl Connected {
    fn new(state: Arc<AppState>) -> Self {
        state.connections.fetch_add(1, Ordering::Relaxed);
        Connected(state)
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's receivers, one per channel, merged. Order is kept per
/// channel (the contract); across channels StreamMap may interleave.
type Subscriptions = StreamMap<String, BroadcastStream<Arc<Delivery>>>;

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    raise_nofile_limit();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.cores > 0 {
        runtime.worker_threads(args.cores);
    }
    let runtime = runtime.enable_all().build().expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        error!("{e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let (upstream_tx, upstream_bound) = open_upstream(&args.upstream_bind)?;
    let state = Arc::new(AppState::new(upstream_tx));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("listen {}: {e}", args.listen))?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;

    let (sub, zmq_endpoint) = open_zmq(&args)?;
    let ingest_state = state.clone();
    std::thread::Builder::new()
        .name("ingest".into())
        .spawn(move || {
            ingest(sub, &ingest_state);
            error!("ZeroMQ ingest stopped");
            std::process::exit(1);
        })
        .map_err(|e| format!("spawn ingest thread: {e}"))?;

    let grpc_field = match args.grpc_listen {
        Some(addr) => format!(" grpc={}", serve_grpc(addr, state.clone()).await?),
        None => String::new(),
    };
    let app = Router::new()
        .route("/ws", get(ws_handler))
        .route("/events", get(sse_handler))
        .route("/healthz", get(healthz))
        .with_state(state);
    let zmq = zmq_endpoint.as_deref().unwrap_or("-");
    info!(%listen, zmq, zmq_connect = ?args.zmq_connect, upstream = ?upstream_bound, grpc = ?args.grpc_listen, "baseline ready");
    // The upstream endpoints bound, like the gateway's line (port `*` resolved).
    let upstream_field = if upstream_bound.is_empty() {
        String::new()
    } else {
        format!(" upstream={}", upstream_bound.join(","))
    };
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "READY listen={listen} zmq={zmq}{upstream_field}{grpc_field}"
    );
    let _ = stdout.flush();
    axum::serve(listener, app)
        .await
        .map_err(|e| format!("serve: {e}"))
}

async fn healthz(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let connections = state.connections.load(Ordering::Relaxed);
    Json(serde_json::json!({ "status": "ok", "connections": connections }))
}

async fn ws_handler(
    ws: WebSocketUpgrade,
    RawQuery(query): RawQuery,
    State(state): State<Arc<AppState>>,
) -> Response {
    let subs = match parse_channels(query.as_deref()) {
        Ok(channels) => subscribe_all(&state, channels),
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    // Chosen when the client offers it: the connection is then two-way.
    let ws = ws.protocols([SUBPROTOCOL]);
    let two_way = ws.selected_protocol().is_some();
    ws.on_upgrade(move |socket| serve_ws(socket, subs, state, two_way))
}

/// Takes a two-way connection's address out of the map when it ends.
struct Registered(Arc<AppState>, Address);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.direct.lock().unwrap().remove(&self.1);
    }
}

/// The next message for this one connection (never, on a receive-only one).
async fn next_direct(direct: &mut Option<mpsc::Receiver<Message>>) -> Option<Message> {
    match direct {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn serve_ws(
    mut socket: WebSocket,
    mut subs: Subscriptions,
    state: Arc<AppState>,
    two_way: bool,
) {
    let _connected = Connected::new(state.clone());
    let mut direct = None;
    let mut registered = None;
    if two_way {
        let (address, rx) = state.register();
        registered = Some(Registered(state.clone(), address));
        direct = Some(rx);
        let welcome = format!(
            "{{\"type\":\"welcome\",\"address\":\"{}\"}}\n",
            String::from_utf8_lossy(&address)
        );
        if socket.send(Message::Text(welcome.into())).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            item = subs.next() => match item {
                Some((_, Ok(delivery))) => {
                    if socket.send(delivery.ws.clone()).await.is_err() {
                        break;
                    }
                }
                Some((channel, Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                    warn!(channel, missed, "WebSocket subscriber lagged; closing");
                    let close = CloseFrame { code: close_code::POLICY, reason: "slow consumer".into() };
                    let _ = socket.send(Message::Close(Some(close))).await;
                    break;
                }
                None => break,
            },
            message = next_direct(&mut direct) => match message {
                Some(message) => {
                    if socket.send(message).await.is_err() {
                        break;
                    }
                }
                // Dropped from the map: it lagged behind its messages.
                None => {
                    let close = CloseFrame { code: close_code::POLICY, reason: "slow consumer".into() };
                    let _ = socket.send(Message::Close(Some(close))).await;
                    break;
                }
            },
            // Pings are answered by tungstenite. A receive-only connection's
            // messages are ignored; a two-way one's go upstream.
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(Message::Text(text))) if two_way => {
                    let address = registered.as_ref().map(|r| r.1).expect("two-way");
                    if !from_client(&state, &mut socket, &address, text.as_bytes(), false).await {
                        break;
                    }
                }
                Some(Ok(Message::Binary(bytes))) if two_way => {
                    let address = registered.as_ref().map(|r| r.1).expect("two-way");
                    if !from_client(&state, &mut socket, &address, &bytes, true).await {
                        break;
                    }
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

/// One message from a two-way client: checked, handed to the upstream
/// thread (waiting while its queue is full), then acknowledged if it has a
/// ref; refused with an error frame otherwise. False when the socket failed.
async fn from_client(
    state: &AppState,
    socket: &mut WebSocket,
    address: &Address,
    message: &[u8],
    binary: bool,
) -> bool {
    let answer = match parse_client_message(message) {
        Err((reference, reason)) => error_frame(reference.as_deref(), reason),
        Ok(sent) => match &state.upstream {
            None => error_frame(sent.reference.as_deref(), "upstream not configured"),
            Some(upstream) => {
                let up = Upstream {
                    address: *address,
                    channel: sent.channel.to_owned(),
                    binary,
                    payload: sent.payload.to_vec(),
                };
                match (upstream.send(up).await, sent.reference) {
                    (Err(_), reference) => {
                        error_frame(reference.as_deref(), "upstream unavailable")
                    }
                    (Ok(()), Some(reference)) => {
                        format!("{{\"type\":\"ack\",\"ref\":{reference}}}\n")
                    }
                    (Ok(()), None) => return true,
                }
            }
        },
    };
    socket.send(Message::Text(answer.into())).await.is_ok()
}

async fn sse_handler(
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    State(state): State<Arc<AppState>>,
) -> Response {
    let accepts_sse = headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("text/event-stream")));
    if !accepts_sse {
        let reason = "the baseline serves only SSE here (Accept: text/event-stream)";
        return (StatusCode::BAD_REQUEST, reason).into_response();
    }
    let subs = match parse_channels(query.as_deref()) {
        Ok(channels) => subscribe_all(&state, channels),
        Err(reason) => return (StatusCode::BAD_REQUEST, reason).into_response(),
    };
    let connected = Connected::new(state);
    // The stream ends (and the response with it) when the client lags.
    let events = subs.map_while(move |(channel, item)| {
        let _ = &connected; // counted while the stream lives
        match item {
            Ok(delivery) => Some(Ok::<_, Infallible>(delivery.sse.clone())),
            Err(BroadcastStreamRecvError::Lagged(missed)) => {
                warn!(channel, missed, "SSE subscriber lagged; closing");
                None
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn subscribe_all(state: &AppState, channels: Vec<String>) -> Subscriptions {
    let mut subs = StreamMap::with_capacity(channels.len());
    for channel in channels {
        let rx = state.subscribe(&channel);
        subs.insert(channel, BroadcastStream::new(rx));
    }
    subs
}

/// The `channel=` parameters of a query, deduplicated and checked like the
/// gateway checks them. Other parameters (`since`) are ignored.
fn parse_channels(query: Option<&str>) -> Result<Vec<String>, &'static str> {
    let mut channels: Vec<String> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if key != "channel" {
            continue;
        }
        if !valid_channel_name(value.as_bytes()) {
            return Err("bad channel name");
        }
        if !channels.iter().any(|c| *c == value) {
            channels.push(value.into_owned());
        }
    }
    match channels.len() {
        0 => Err("no channel"),
        n if n > CHANNELS_PER_CONNECTION_MAX => Err("too many channels"),
        _ => Ok(channels),
    }
}

fn valid_channel_name(name: &[u8]) -> bool {
    (1..=CHANNEL_NAME_BYTES_MAX).contains(&name.len())
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"_-.:@/".contains(&b))
}

fn open_zmq(args: &Args) -> Result<(zmq::Socket, Option<String>), String> {
    let ctx = zmq::Context::new();
    let sub = ctx
        .socket(zmq::SUB)
        .map_err(|e| format!("zmq socket: {e}"))?;
    sub.set_rcvhwm(ZMQ_RCVHWM_MESSAGES)
        .map_err(|e| format!("zmq rcvhwm: {e}"))?;
    // Everything: channel names are matched exactly by the registry, not by
    // ZeroMQ's byte-prefix subscriptions.
    sub.set_subscribe(b"")
        .map_err(|e| format!("zmq subscribe: {e}"))?;
    let mut bound = None;
    if !args.zmq_bind.is_empty() {
        sub.bind(&args.zmq_bind)
            .map_err(|e| format!("zmq bind {}: {e}", args.zmq_bind))?;
        let endpoint = sub.get_last_endpoint().map_err(|e| e.to_string())?;
        bound = Some(endpoint.unwrap_or_else(|raw| String::from_utf8_lossy(&raw).into_owned()));
    }
    for endpoint in &args.zmq_connect {
        sub.connect(endpoint)
            .map_err(|e| format!("zmq connect {endpoint}: {e}"))?;
    }
    if bound.is_none() && args.zmq_connect.is_empty() {
        return Err("no ZeroMQ endpoint: give --zmq-bind or --zmq-connect".into());
    }
    Ok((sub, bound))
}

/// The ingest loop: check, number, encode once, broadcast.
fn ingest(sub: zmq::Socket, state: &AppState) {
    // Ids start at the start time in microseconds, like the gateway's.
    let mut next_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    loop {
        let frames = match sub.recv_multipart(0) {
            Ok(frames) => frames,
            Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                error!("zmq recv: {e}");
                return;
            }
        };
        if frames.first().is_some_and(|f| f.first() == Some(&b'!')) {
            match check_direct(&frames) {
                Ok((address, message)) => state.deliver_direct(&address, message),
                Err(reason) => warn!(reason, "publication dropped"),
            }
            continue;
        }
        let (channel, event, payload) = match check_frames(&frames) {
            Ok(checked) => checked,
            Err(reason) => {
                warn!(reason, "publication dropped");
                continue;
            }
        };
        next_id += 1;
        let delivery = encode(next_id, channel, event.as_deref(), payload);
        state.publish(channel, Arc::new(delivery));
    }
}

/// `[b"!" + address, payload]`: a message for one connection, as that
/// connection gets it (`{"channel":"!ADDRESS"}\n<payload>`, a text frame
/// when the payload is UTF-8). No id: it is nobody's history.
fn check_direct(frames: &[Vec<u8>]) -> Result<(Address, Message), String> {
    let [first, payload] = frames else {
        return Err(format!("{} frames for one connection", frames.len()));
    };
    let address = parse_address(&first[1..]).ok_or("bad connection address")?;
    if payload.len() > PAYLOAD_BYTES_MAX {
        return Err(format!("payload of {} bytes", payload.len()));
    }
    let mut bytes = Vec::with_capacity(16 + ADDRESS_BYTES + payload.len());
    bytes.extend_from_slice(b"{\"channel\":\"!");
    bytes.extend_from_slice(&address);
    bytes.extend_from_slice(b"\"}\n");
    bytes.extend_from_slice(payload);
    let message = match String::from_utf8(bytes) {
        Ok(text) => Message::Text(text.into()),
        Err(e) => Message::Binary(e.into_bytes().into()),
    };
    Ok((address, message))
}

/// An address as this server writes them: 52 lowercase hex digits.
fn parse_address(text: &[u8]) -> Option<Address> {
    let hex = text.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if hex {
        text.try_into().ok()
    } else {
        None
    }
}

/// Connection `n`'s address: the instance (16 hex digits), then `n` (36).
fn make_address(instance: u64, n: u64) -> Address {
    format!("{instance:016x}{n:036x}")
        .into_bytes()
        .try_into()
        .expect("16 + 36 digits")
}

/// A client message, checked: its channel, its `ref` as the JSON text the
/// ack echoes, its payload.
#[derive(Debug, PartialEq)]
struct ClientSend<'a> {
    channel: String,
    reference: Option<String>,
    payload: &'a [u8],
}

/// Checks a client message (meta line, `\n`, payload) like the gateway
/// does; a refusal says why, with the ref when it could be read.
fn parse_client_message(message: &[u8]) -> Result<ClientSend<'_>, (Option<String>, &'static str)> {
    use serde_json::Value;
    let (meta, payload) = match message.iter().position(|&b| b == b'\n') {
        Some(i) => (&message[..i], &message[i + 1..]),
        None => (message, &[][..]),
    };
    if meta.len() > CLIENT_META_BYTES_MAX {
        return Err((None, "bad meta"));
    }
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(meta) else {
        return Err((None, "bad meta"));
    };
    let reference = match fields.remove("ref") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if r.len() <= REF_BYTES_MAX => Some(Value::String(r).to_string()),
        Some(Value::Number(n)) if n.is_u64() => Some(n.to_string()),
        Some(_) => return Err((None, "bad meta")),
    };
    match fields.remove("type") {
        None => {}
        Some(Value::String(kind)) if kind == "message" => {}
        Some(Value::String(kind)) if kind == "subscribe" || kind == "unsubscribe" => {
            return Err((
                reference,
                "control messages are not supported by the baseline",
            ))
        }
        Some(_) => return Err((reference, "bad meta")),
    }
    let Some(Value::String(channel)) = fields.remove("channel") else {
        return Err((reference, "bad meta"));
    };
    if !fields.is_empty() {
        return Err((reference, "bad meta"));
    }
    if !valid_channel_name(channel.as_bytes()) {
        return Err((reference, "bad channel name"));
    }
    if payload.len() > PAYLOAD_BYTES_MAX {
        return Err((reference, "payload too large"));
    }
    Ok(ClientSend {
        channel,
        reference,
        payload,
    })
}

/// `{"type":"error","ref":…,"reason":"…"}` and `\n`, the ref as the client
/// sent it (left out when it could not be read).
fn error_frame(reference: Option<&str>, reason: &str) -> String {
    use serde_json::Value;
    let mut fields = serde_json::Map::new();
    fields.insert("type".into(), "error".into());
    if let Some(r) = reference.and_then(|r| serde_json::from_str::<Value>(r).ok()) {
        fields.insert("ref".into(), r);
    }
    fields.insert("reason".into(), reason.into());
    format!("{}\n", Value::Object(fields))
}

/// The upstream PUSH socket, bound at each endpoint, fed by a plain thread
/// from a bounded channel; `None` without endpoints. Returns the channel
/// and the endpoints bound (port `*` resolved).
fn open_upstream(
    endpoints: &[String],
) -> Result<(Option<mpsc::Sender<Upstream>>, Vec<String>), String> {
    if endpoints.is_empty() {
        return Ok((None, Vec::new()));
    }
    let ctx = zmq::Context::new();
    let push = ctx
        .socket(zmq::PUSH)
        .map_err(|e| format!("zmq socket: {e}"))?;
    let mut bound = Vec::new();
    for endpoint in endpoints {
        push.bind(endpoint)
            .map_err(|e| format!("zmq bind {endpoint}: {e}"))?;
        let last = push.get_last_endpoint().map_err(|e| e.to_string())?;
        bound.push(last.unwrap_or_else(|raw| String::from_utf8_lossy(&raw).into_owned()));
    }
    let (tx, rx) = mpsc::channel(UPSTREAM_QUEUE);
    std::thread::Builder::new()
        .name("upstream".into())
        .spawn(move || {
            forward_upstream(push, rx);
            error!("ZeroMQ upstream stopped");
            std::process::exit(1);
        })
        .map_err(|e| format!("spawn upstream thread: {e}"))?;
    Ok((Some(tx), bound))
}

/// The upstream loop: each client message as five frames. The send blocks
/// while no hub is connected or the hubs are behind (ZeroMQ's high-water
/// mark): the channel then fills and the senders' tasks wait.
fn forward_upstream(push: zmq::Socket, mut rx: mpsc::Receiver<Upstream>) {
    while let Some(m) = rx.blocking_recv() {
        let meta: &[u8] = if m.binary {
            br#"{"transport":"websocket","binary":true}"#
        } else {
            br#"{"transport":"websocket","binary":false}"#
        };
        let frames: [&[u8]; 5] = [
            b"message",
            &m.address,
            m.channel.as_bytes(),
            meta,
            &m.payload,
        ];
        if let Err(e) = push.send_multipart(frames, 0) {
            error!("zmq send (upstream): {e}");
            return;
        }
    }
}

/// `[channel, payload]` or `[channel, payload, {"event": "name"}]`, checked
/// like the gateway checks them; returns (channel, event, payload).
fn check_frames(frames: &[Vec<u8>]) -> Result<(&str, Option<String>, &[u8]), String> {
    let [channel, payload, rest @ ..] = frames else {
        return Err(format!("{} frames", frames.len()));
    };
    if rest.len() > 1 {
        return Err(format!("{} frames", frames.len()));
    }
    if !valid_channel_name(channel) {
        return Err("bad channel name".into());
    }
    let channel = std::str::from_utf8(channel).map_err(|e| e.to_string())?;
    if payload.len() > PAYLOAD_BYTES_MAX {
        return Err(format!("payload of {} bytes", payload.len()));
    }
    let mut event = None;
    if let Some(meta) = rest.first() {
        let meta: serde_json::Value = serde_json::from_slice(meta).map_err(|e| e.to_string())?;
        let meta = meta.as_object().ok_or("meta is not a JSON object")?;
        for (key, value) in meta {
            let name = match (key.as_str(), value.as_str()) {
                ("event", Some(name)) => name,
                _ => return Err(format!("meta key {key:?} not understood")),
            };
            let ok = !name.is_empty()
                && name.len() <= EVENT_NAME_BYTES_MAX
                && name.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err("bad event name".into());
            }
            event = Some(name.to_owned());
        }
    }
    Ok((channel, event, payload))
}

/// The meta line: `{"channel":"news","id":"42"[,"event":…][,"encoding":"base64"]}`.
fn meta_line(channel: &str, id: u64, event: Option<&str>, base64: bool) -> String {
    let json_str = |s: &str| serde_json::Value::from(s).to_string();
    // The id is a string: JSON numbers lose precision above 2^53 in JavaScript.
    let mut meta = format!(r#"{{"channel":{},"id":"{id}""#, json_str(channel));
    if let Some(event) = event {
        meta += &format!(r#","event":{}"#, json_str(event));
    }
    if base64 {
        meta += r#","encoding":"base64""#;
    }
    meta + "}"
}

/// Encodes one publication for both transports.
fn encode(id: u64, channel: &str, event: Option<&str>, payload: &[u8]) -> Delivery {
    let text = std::str::from_utf8(payload).ok();
    // WebSocket: meta line, "\n", payload untouched; text frame if UTF-8.
    let mut ws = meta_line(channel, id, event, false).into_bytes();
    ws.push(b'\n');
    ws.extend_from_slice(payload);
    let ws = match String::from_utf8(ws) {
        Ok(text) => Message::Text(text.into()),
        Err(e) => Message::Binary(e.into_bytes().into()),
    };
    // SSE: the payload's lines (any of CRLF, CR, LF) or one base64 line.
    let data = match text {
        Some(text) => {
            let lines = text.replace("\r\n", "\n").replace('\r', "\n");
            format!("{}\n{lines}", meta_line(channel, id, event, false))
        }
        None => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
            format!("{}\n{b64}", meta_line(channel, id, event, true))
        }
    };
    let mut sse = Event::default().id(id.to_string());
    if let Some(event) = event {
        sse = sse.event(event);
    }
    let grpc = ServerFrame {
        kind: Some(server_frame::Kind::Message(protocol::grpc::Message {
            channel: channel.to_owned(),
            id,
            event: event.unwrap_or_default().to_owned(),
            payload: payload.to_vec(),
            binary: text.is_none(),
        })),
    };
    Delivery {
        ws,
        sse: sse.data(data),
        grpc,
    }
}

/// Binds `addr` and serves the gRPC service there on a task of its own;
/// returns the address bound.
async fn serve_grpc(addr: SocketAddr, state: Arc<AppState>) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("grpc listen {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let counted = state.clone();
    // tonic's `serve(addr)` with each connection counted for /healthz
    // while it lives; accept errors (EMFILE) end nothing, as in `serve`.
    let incoming =
        tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |accepted| {
            match accepted {
                Ok(io) => {
                    let _ = io.set_nodelay(true);
                    Some(Ok::<_, std::io::Error>(CountedIo {
                        io,
                        _connected: Connected::new(counted.clone()),
                    }))
                }
                Err(e) => {
                    warn!("grpc accept: {e}");
                    None
                }
            }
        });
    let service = GatewayService { state };
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
        {
            error!("grpc serve: {e}");
            std::process::exit(1);
        }
    });
    Ok(bound)
}

/// An accepted gRPC connection, counted while it exists.
struct CountedIo {
    io: tokio::net::TcpStream,
    _connected: Connected,
}

impl tonic::transport::server::Connected for CountedIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for CountedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A subscriber's stream of server frames.
type FrameStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ServerFrame, tonic::Status>> + Send>>;

/// The `gateway.v1.Gateway` service, as tonic-build writes a service's
/// server: routed by path, each method a `tonic::server::Grpc` call.
#[derive(Clone)]
struct GatewayService {
    state: Arc<AppState>,
}

impl tonic::server::NamedService for GatewayService {
    const NAME: &'static str = "gateway.v1.Gateway";
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<B> tonic::codegen::Service<axum::http::Request<B>> for GatewayService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        match req.uri().path() {
            "/gateway.v1.Gateway/Subscribe" => {
                let method = SubscribeMethod(self.state.clone());
                Box::pin(async move {
                    let codec = tonic_prost::ProstCodec::<ServerFrame, SubscribeRequest>::default();
                    Ok(tonic::server::Grpc::new(codec)
                        .server_streaming(method, req)
                        .await)
                })
            }
            _ => Box::pin(async move {
                Ok(tonic::Status::unimplemented("the baseline serves Subscribe only").into_http())
            }),
        }
    }
}

/// `Subscribe`: the channels' broadcasts, merged, as server frames.
struct SubscribeMethod(Arc<AppState>);

impl tonic::server::ServerStreamingService<SubscribeRequest> for SubscribeMethod {
    type Response = ServerFrame;
    type ResponseStream = FrameStream;
    type Future = BoxFuture<Result<tonic::Response<FrameStream>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<SubscribeRequest>) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let channels = check_grpc_channels(request.into_inner().channels)
                .map_err(tonic::Status::invalid_argument)?;
            let mut lagged = false;
            // After a lag the stream ends with its status (tonic sends it as
            // the trailers).
            let frames = subscribe_all(&state, channels).map_while(move |(channel, item)| {
                if lagged {
                    return None;
                }
                Some(match item {
                    Ok(delivery) => Ok(delivery.grpc.clone()),
                    Err(BroadcastStreamRecvError::Lagged(missed)) => {
                        warn!(channel, missed, "gRPC subscriber lagged; closing");
                        lagged = true;
                        Err(tonic::Status::resource_exhausted("slow consumer"))
                    }
                })
            });
            Ok(tonic::Response::new(Box::pin(frames) as FrameStream))
        })
    }
}

/// A Subscribe request's channels, deduplicated and checked like
/// `channel=` parameters.
fn check_grpc_channels(requested: Vec<String>) -> Result<Vec<String>, &'static str> {
    let mut channels: Vec<String> = Vec::new();
    for channel in requested {
        if !valid_channel_name(channel.as_bytes()) {
            return Err("bad channel name");
        }
        if !channels.contains(&channel) {
            channels.push(channel);
        }
    }
    match channels.len() {
        0 => Err("no channel"),
        n if n > CHANNELS_PER_CONNECTION_MAX => Err("too many channels"),
        _ => Ok(channels),
    }
}

/// Servers expecting many connections lift the soft open-files limit to the hard one.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                warn!("could not raise RLIMIT_NOFILE");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    async fn sse_bytes(event: Event) -> String {
        let body = Sse::new(tokio_stream::iter([Ok::<_, Infallible>(event)]))
            .into_response()
            .into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn frames_are_checked_like_the_gateway() {
        let ok = frames(&[b"news", b"hi", br#"{"event":"price"}"#]);
        let (channel, event, payload) = check_frames(&ok).unwrap();
        assert_eq!(
            (channel, event.as_deref(), payload),
            ("news", Some("price"), &b"hi"[..])
        );
        assert!(check_frames(&frames(&[b"news"])).is_err());
        assert!(check_frames(&frames(&[b"a", b"b", b"{}", b"d"])).is_err());
        assert!(check_frames(&frames(&[b"bad name", b"x"])).is_err());
        assert!(check_frames(&frames(&[b"news", b"x", br#"{"other":1}"#])).is_err());
        assert!(check_frames(&frames(&[b"news", b"x", br#"{"event":"a b"}"#])).is_err());
        assert!(check_frames(&frames(&[b"news", b"x", b"[]"])).is_err());
        assert_eq!(
            parse_channels(Some("channel=a&channel=b&channel=a")).unwrap(),
            ["a", "b"]
        );
        assert!(parse_channels(Some("since=1")).is_err());
    }

    #[test]
    fn websocket_message_is_meta_line_then_payload() {
        assert_eq!(
            meta_line("news", 42, Some("price"), true),
            r#"{"channel":"news","id":"42","event":"price","encoding":"base64"}"#
        );
        let text = encode(42, "news", None, b"hello\r\nworld").ws;
        assert_eq!(
            text,
            Message::Text("{\"channel\":\"news\",\"id\":\"42\"}\nhello\r\nworld".into())
        );
        let binary = encode(7, "raw", None, &[0, 0xff]).ws;
        let mut expected = b"{\"channel\":\"raw\",\"id\":\"7\"}\n".to_vec();
        expected.extend_from_slice(&[0, 0xff]);
        assert_eq!(binary, Message::Binary(expected.into()));
    }

    #[test]
    fn client_messages_are_checked_like_the_gateway() {
        let ok =
            parse_client_message(b"{\"channel\":\"rt.5\",\"ref\":\"17\"}\nhello\nworld").unwrap();
        assert_eq!(
            ok,
            ClientSend {
                channel: "rt.5".into(),
                reference: Some("\"17\"".into()),
                payload: b"hello\nworld",
            }
        );
        let numbered =
            parse_client_message(b"{\"type\":\"message\",\"ref\":7,\"channel\":\"a\"}").unwrap();
        assert_eq!(
            (numbered.reference.as_deref(), numbered.payload),
            (Some("7"), &b""[..])
        );
        let refused = |m: &[u8]| parse_client_message(m).unwrap_err();
        assert_eq!(refused(b"not json\nx"), (None, "bad meta"));
        assert_eq!(
            refused(b"{\"channel\":\"a\",\"ref\":-1}"),
            (None, "bad meta")
        );
        let long_ref = format!("{{\"channel\":\"a\",\"ref\":\"{}\"}}", "x".repeat(65));
        assert_eq!(refused(long_ref.as_bytes()), (None, "bad meta"));
        let r = Some("1".to_string());
        assert_eq!(refused(b"{\"ref\":1}"), (r.clone(), "bad meta"));
        assert_eq!(
            refused(b"{\"ref\":1,\"channel\":\"a b\"}"),
            (r.clone(), "bad channel name")
        );
        assert_eq!(
            refused(b"{\"ref\":1,\"channel\":\"a\",\"x\":0}"),
            (r.clone(), "bad meta")
        );
        assert_eq!(
            refused(b"{\"ref\":1,\"type\":\"dance\",\"channel\":\"a\"}"),
            (r.clone(), "bad meta")
        );
        assert!(refused(b"{\"type\":\"subscribe\",\"channels\":[\"a\"]}")
            .1
            .contains("not supported"));
        let meta = format!("{{\"channel\":\"{}\"}}", "a".repeat(CLIENT_META_BYTES_MAX));
        assert_eq!(refused(meta.as_bytes()), (None, "bad meta"));
        // Errors echo the ref as it came, in the gateway's field order.
        assert_eq!(
            error_frame(Some("\"17\""), "upstream not configured"),
            "{\"type\":\"error\",\"ref\":\"17\",\"reason\":\"upstream not configured\"}\n"
        );
        assert_eq!(
            error_frame(None, "bad meta"),
            "{\"type\":\"error\",\"reason\":\"bad meta\"}\n"
        );
    }

    #[test]
    fn addresses_and_messages_for_one_connection() {
        let a = make_address(0x0123_4567_89ab_cdef, 42);
        assert_eq!(&a[..16], b"0123456789abcdef");
        assert_eq!(&a[16..], format!("{:036x}", 42).as_bytes());
        assert_eq!(parse_address(&a), Some(a));
        assert_eq!(parse_address(&a[1..]), None);
        assert_eq!(parse_address(&a.to_ascii_uppercase()), None);
        let mut to = b"!".to_vec();
        to.extend_from_slice(&a);
        let (address, message) = check_direct(&[to.clone(), b"pong".to_vec()]).unwrap();
        assert_eq!(address, a);
        let text = format!("{{\"channel\":\"!{}\"}}\npong", String::from_utf8_lossy(&a));
        assert_eq!(message, Message::Text(text.into()));
        let (_, binary) = check_direct(&[to.clone(), vec![0xff, 0]]).unwrap();
        assert!(matches!(binary, Message::Binary(_)));
        assert!(check_direct(&[to.clone()]).is_err());
        assert!(check_direct(&[to, b"p".to_vec(), b"{}".to_vec()]).is_err());
        assert!(check_direct(&[b"!nobody".to_vec(), b"p".to_vec()]).is_err());
        // Registered connections get their messages; a full queue drops
        // the connection from the map; an unknown address is ignored.
        let state = AppState::new(None);
        let (address, mut rx) = state.register();
        let (other, _rx2) = state.register();
        assert_ne!(address, other);
        assert_eq!(&address[..16], &other[..16], "one instance");
        state.deliver_direct(&address, Message::Text("x".into()));
        assert_eq!(rx.try_recv().unwrap(), Message::Text("x".into()));
        for _ in 0..=DIRECT_QUEUE {
            state.deliver_direct(&address, Message::Text("y".into()));
        }
        assert!(!state.direct.lock().unwrap().contains_key(&address));
        assert!(state.direct.lock().unwrap().contains_key(&other));
        state.deliver_direct(&make_address(1, 1), Message::Text("z".into()));
    }

    #[tokio::test]
    async fn sse_event_matches_the_gateway_bytes() {
        let event = encode(42, "news", Some("headline"), b"line one\r\nline two").sse;
        assert_eq!(
            sse_bytes(event).await,
            "id: 42\nevent: headline\n\
             data: {\"channel\":\"news\",\"id\":\"42\",\"event\":\"headline\"}\n\
             data: line one\ndata: line two\n\n"
        );
        let empty = encode(1, "news", None, b"").sse;
        assert_eq!(
            sse_bytes(empty).await,
            "id: 1\ndata: {\"channel\":\"news\",\"id\":\"1\"}\ndata: \n\n"
        );
        let binary = encode(2, "raw", None, &[0, 0xff, 0x10]).sse;
        assert_eq!(
            sse_bytes(binary).await,
            "id: 2\ndata: {\"channel\":\"raw\",\"id\":\"2\",\"encoding\":\"base64\"}\ndata: AP8Q\n\n"
        );
    }
}
