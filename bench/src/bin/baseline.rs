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

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
use tokio::sync::broadcast;
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
}

/// One publication, encoded once for every subscriber of its channel.
struct Delivery {
    ws: Message,
    sse: Event,
}

#[derive(Default)]
struct AppState {
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<Delivery>>>>,
    connections: AtomicUsize,
}

impl AppState {
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
    let state = Arc::new(AppState::default());
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

    let app = Router::new()
        .route("/ws", get(ws_handler))
        .route("/events", get(sse_handler))
        .route("/healthz", get(healthz))
        .with_state(state);
    let zmq = zmq_endpoint.as_deref().unwrap_or("-");
    info!(%listen, zmq, zmq_connect = ?args.zmq_connect, "baseline ready");
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "READY listen={listen} zmq={zmq}");
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
    ws.on_upgrade(move |socket| serve_ws(socket, subs, state))
}

async fn serve_ws(mut socket: WebSocket, mut subs: Subscriptions, state: Arc<AppState>) {
    let _connected = Connected::new(state);
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
            // Pings are answered by tungstenite; anything else is ignored.
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
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
    Delivery {
        ws,
        sse: sse.data(data),
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
