//! HTTP requests on an HTTP/2 connection that are not gRPC (cleartext,
//! prior knowledge, on the public listener): SSE streams, long-polls,
//! `POST /publish`, health checks and CORS preflights, each a stream of
//! the connection, served by the same rules as on HTTP/1.1. The client is
//! python h2 over a plain socket (`tests/http2/client.py`), so that a test
//! decides every frame it sends (a window that never opens, a reset) and
//! sees every frame it gets (RST_STREAM apart from END_STREAM); one test
//! uses curl, the client people reach for. What an HTTP/1.1 client gets
//! on the same gateway is the reference wherever there is one.
//!
//! Python 3 with h2, and curl built with HTTP/2, are requirements of these
//! tests: without them they fail, saying what to install.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::common::*;

const INSTALL: &str = "python3 -m pip install h2";

/// The response headers that are connection-specific in HTTP/1.1 and have
/// no place in HTTP/2 (RFC 9113 §8.2.2).
const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "proxy-connection",
    "upgrade",
];

// ---------------------------------------------------------------------------
// The HTTP/2 client
// ---------------------------------------------------------------------------

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// END_STREAM: the response is complete.
    Ended,
    /// RST_STREAM with this error code.
    Reset(u64),
}

/// What one stream of the connection received so far.
#[derive(Debug, Default)]
struct Stream {
    head: Option<HttpHead>,
    /// DATA not read by the test yet.
    body: Vec<u8>,
    /// The SSE event being read from `body`, once a field of it came.
    event: Option<SseEvent>,
    /// Every SSE `retry:` value, in order.
    retries: Vec<u32>,
    /// gRPC frames (`message`, `gap`) not read by the test yet.
    frames: VecDeque<Value>,
    trailers: Option<Vec<(String, String)>>,
    end: Option<End>,
}

/// One HTTP/2 connection of `client.py`, its streams as they are told.
/// The process is killed (and the connection with it) when dropped.
struct H2 {
    /// The process, its stdin, stdout lines and stderr (whole once it
    /// has exited).
    io: LineChild,
    what: String,
    /// The last lines read, for failure messages.
    recent: VecDeque<String>,
    /// The id the next stream opened gets (the client counts the same).
    next_id: u32,
    streams: HashMap<u32, Stream>,
    goaway: Option<Value>,
    closed: Option<String>,
}

impl H2 {
    /// A connection to `target`; `window` is the SETTINGS_INITIAL_WINDOW_SIZE
    /// it grants each stream (h2's 65,535 when None).
    fn connect(target: SocketAddr, window: Option<u32>) -> H2 {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join("http2")
            .join("client.py");
        let mut args = vec![target.to_string()];
        if let Some(w) = window {
            args.extend(["--window".to_string(), w.to_string()]);
        }
        let io = spawn_lines(
            Command::new("python3")
                .arg(&script)
                .args(&args)
                .env("PYTHONDONTWRITEBYTECODE", "1"),
        )
        .unwrap_or_else(|e| panic!("spawn python3 {}: {e}; {INSTALL}", script.display()));
        H2 {
            io,
            what: format!("http/2 client of {target} (stream window {window:?})"),
            recent: VecDeque::new(),
            next_id: 1,
            streams: HashMap::new(),
            goaway: None,
            closed: None,
        }
    }

    fn fail(&mut self, why: &str) -> ! {
        // Ended here, so that its stderr is whole.
        let (_, stderr) = self.io.end();
        panic!(
            "{}: {why}\nlast lines: {:#?}\nstderr:\n{stderr}",
            self.what, self.recent
        );
    }

    fn send(&mut self, cmd: Value) {
        let Some(stdin) = self.io.stdin.as_mut() else {
            self.fail("a command after stdin was closed");
        };
        if let Err(e) = writeln!(stdin, "{cmd}").and_then(|_| stdin.flush()) {
            self.fail(&format!("writing {cmd}: {e}"));
        }
    }

    /// Opens a stream; returns its id.
    fn open(&mut self, cmd: Value) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        self.streams.insert(id, Stream::default());
        self.send(cmd);
        id
    }

    /// A request without a body, its DATA read (and the window given back)
    /// as it comes.
    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> u32 {
        self.request("GET", path, headers, None, true, 0)
    }

    /// `GET path` with `accept: text/event-stream`, and `headers`.
    fn sse(&mut self, path: &str, headers: &[(&str, &str)]) -> u32 {
        let mut all = vec![("accept", "text/event-stream")];
        all.extend_from_slice(headers);
        self.get(path, &all)
    }

    /// A request: `body` sent as the gateway's window allows; `read`
    /// false: its DATA is never acknowledged (no WINDOW_UPDATE);
    /// `window`: bytes of stream window granted at once, on top of the
    /// connection's SETTINGS_INITIAL_WINDOW_SIZE.
    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        read: bool,
        window: u32,
    ) -> u32 {
        let headers: Vec<[&str; 2]> = headers.iter().map(|&(n, v)| [n, v]).collect();
        self.open(json!({
            "op": "request",
            "method": method,
            "path": path,
            "headers": headers,
            "body": body.map(base64_encode),
            "read": read,
            "window": window,
        }))
    }

    /// A gRPC Subscribe call for `channels`.
    fn grpc_subscribe(&mut self, channels: &[&str]) -> u32 {
        self.open(json!({"op": "grpc-subscribe", "channels": channels}))
    }

    /// RST_STREAM CANCEL on `id`.
    fn reset(&mut self, id: u32) {
        self.send(json!({"op": "reset", "stream": id}));
    }

    /// Closes stdin: the client closes its socket and exits.
    fn close(&mut self) {
        self.io.stdin = None;
    }

    /// Takes the next line the client prints; fails after the safety net
    /// (a long-poll's: a held poll is silent for a while).
    fn pump(&mut self) {
        if !self.pump_within(LONGPOLL_IO_TIMEOUT) {
            self.fail(&format!("nothing within {LONGPOLL_IO_TIMEOUT:?}"));
        }
    }

    /// Takes the next line the client prints, if one comes within `limit`.
    fn pump_within(&mut self, limit: Duration) -> bool {
        let line = match self.io.lines.recv_timeout(limit) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => return false,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Ok(st) = self.io.child.wait() {
                    if st.code() == Some(3) {
                        self.fail(&format!("the Python package h2 is missing: {INSTALL}"));
                    }
                }
                self.fail("the client exited (its connection is over)")
            }
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| self.fail(&format!("not a JSON line ({e}): {line}")));
        self.recent.push_back(line);
        if self.recent.len() > 12 {
            self.recent.pop_front();
        }
        let id = v["stream"].as_u64().map(|n| n as u32);
        let kind = v["type"].as_str().unwrap_or("").to_string();
        if let Some(id) = id {
            // Ids are counted here as the client counts them.
            if !self.streams.contains_key(&id) {
                self.fail(&format!("a stream the client never opened: {v}"));
            }
        }
        match (kind.as_str(), id) {
            ("opened", Some(_)) => {}
            ("response", Some(id)) => {
                let head = h2_head(&v["headers"]);
                let s = self.streams.get_mut(&id).unwrap();
                if s.head.is_some() {
                    self.fail(&format!("a second response head: {v}"));
                }
                s.head = Some(head);
            }
            ("data", Some(id)) => {
                let data = v["data"].as_str().and_then(base64_decode);
                let Some(data) = data else {
                    self.fail(&format!("DATA not in base64: {v}"))
                };
                self.streams.get_mut(&id).unwrap().body.extend(data);
            }
            ("message" | "gap", Some(id)) => {
                self.streams.get_mut(&id).unwrap().frames.push_back(v);
            }
            ("trailers", Some(id)) => {
                self.streams.get_mut(&id).unwrap().trailers = Some(pairs(&v["headers"]));
            }
            ("end", Some(id)) => self.ended(id, End::Ended, &v),
            ("reset", Some(id)) => {
                let code = v["code"].as_u64().unwrap_or(u64::MAX);
                self.ended(id, End::Reset(code), &v);
            }
            ("goaway", None) => self.goaway = Some(v),
            ("closed", None) => self.closed = Some(v["how"].as_str().unwrap_or("").to_string()),
            _ => self.fail(&format!("an unexpected line: {v}")),
        }
        true
    }

    /// Whether stream `id` has had a probe message (taken); anything else
    /// first fails.
    fn probed(&mut self, id: u32) -> bool {
        let s = self.streams.get_mut(&id).unwrap();
        if let Some(v) = s.frames.pop_front() {
            if v["type"] != "message" || v["channel"] != PROBE_CHANNEL {
                self.fail(&format!("call {id}: {v} while waiting for a probe"));
            }
            return true;
        }
        match take_event(self.streams.get_mut(&id).unwrap()) {
            Ok(Some(ev)) => {
                let d = sse_event_to_delivery(&ev, "a probe");
                if !is_probe(&d) {
                    self.fail(&format!("stream {id}: {d:?} while waiting for a probe"));
                }
                return true;
            }
            Ok(None) => {}
            Err(why) => self.fail(&format!("stream {id}: {why}")),
        }
        if let Some(end) = self.stream(id).end {
            self.fail(&format!("stream {id}: {end:?} while waiting for a probe"));
        }
        false
    }

    fn ended(&mut self, id: u32, end: End, v: &Value) {
        let s = self.streams.get_mut(&id).unwrap();
        if let Some(first) = s.end {
            self.fail(&format!("ended twice ({first:?}, then {v})"));
        }
        s.end = Some(end);
    }

    fn stream(&self, id: u32) -> &Stream {
        &self.streams[&id]
    }

    /// The response head of stream `id`.
    fn head(&mut self, id: u32) -> HttpHead {
        loop {
            let s = self.stream(id);
            if let Some(head) = &s.head {
                // testkit's head is not Clone.
                return HttpHead {
                    status: head.status,
                    status_line: head.status_line.clone(),
                    headers: head.headers.clone(),
                };
            }
            if let Some(end) = s.end {
                self.fail(&format!("stream {id}: {end:?} before a response head"));
            }
            self.pump();
        }
    }

    /// How stream `id` ended.
    fn end(&mut self, id: u32) -> End {
        loop {
            if let Some(end) = self.stream(id).end {
                return end;
            }
            self.pump();
        }
    }

    /// The whole response of stream `id`, which must end with END_STREAM.
    fn response(&mut self, id: u32) -> HttpResponse {
        let head = self.head(id);
        let end = self.end(id);
        let body = std::mem::take(&mut self.streams.get_mut(&id).unwrap().body);
        let resp = HttpResponse {
            status: head.status,
            head,
            body,
        };
        if end != End::Ended {
            self.fail(&format!(
                "stream {id}: {end:?} instead of END_STREAM: {}",
                resp.describe()
            ));
        }
        resp
    }

    /// The next SSE event of stream `id` (comments and a lone `retry:`
    /// skipped, retries kept), or None when the stream ended between
    /// events; a reset is told as `Err`.
    fn sse_event_or_end(&mut self, id: u32) -> Result<Option<SseEvent>, u64> {
        loop {
            let s = self.streams.get_mut(&id).unwrap();
            match take_event(s) {
                Ok(Some(ev)) => return Ok(Some(ev)),
                Ok(None) => {}
                Err(why) => self.fail(&format!("stream {id}: {why}")),
            }
            let s = self.stream(id);
            match s.end {
                Some(End::Reset(code)) => return Err(code),
                Some(End::Ended) if s.body.is_empty() && s.event.is_none() => return Ok(None),
                Some(End::Ended) => {
                    let rest = String::from_utf8_lossy(&s.body).into_owned();
                    self.fail(&format!("stream {id} ended inside an event: {rest:?}"));
                }
                None => self.pump(),
            }
        }
    }

    /// The next SSE event of stream `id`.
    fn next_event(&mut self, id: u32) -> SseEvent {
        match self.sse_event_or_end(id) {
            Ok(Some(ev)) => ev,
            Ok(None) => self.fail(&format!("stream {id} ended instead of an event")),
            Err(code) => self.fail(&format!(
                "stream {id} was reset ({code}) instead of an event"
            )),
        }
    }

    /// The next SSE event of stream `id` as a delivery (the contract's
    /// framing rules checked).
    fn next_delivery(&mut self, id: u32) -> Delivery {
        let ev = self.next_event(id);
        sse_event_to_delivery(&ev, &format!("http/2 stream {id}"))
    }

    /// The next gRPC frame of call `id`.
    fn next_frame(&mut self, id: u32) -> Value {
        loop {
            let s = self.streams.get_mut(&id).unwrap();
            if let Some(v) = s.frames.pop_front() {
                return v;
            }
            if let Some(end) = s.end {
                let trailers = s.trailers.clone();
                self.fail(&format!(
                    "call {id}: {end:?} (trailers {trailers:?}) instead of a frame"
                ));
            }
            self.pump();
        }
    }

    /// Reads until the connection is closed; returns how.
    fn wait_closed(&mut self) -> String {
        loop {
            if let Some(how) = &self.closed {
                return how.clone();
            }
            self.pump();
        }
    }
}

/// `[[name, value], ...]` as pairs.
fn pairs(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .unwrap_or_else(|| panic!("headers are not a list: {v}"))
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap_or("").to_string(),
                p[1].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// An HTTP/2 response head in testkit's shape: `:status` as the status,
/// the other headers in order (HTTP/2 names are lower case already).
fn h2_head(v: &Value) -> HttpHead {
    let all = pairs(v);
    let status = all
        .iter()
        .find(|(n, _)| n == ":status")
        .and_then(|(_, s)| s.parse().ok())
        .unwrap_or_else(|| panic!("a response without a :status: {v}"));
    HttpHead {
        status,
        status_line: format!("HTTP/2 {status}"),
        headers: all
            .into_iter()
            .filter(|(n, _)| !n.starts_with(':'))
            .collect(),
    }
}

/// Reads what it can of the next SSE event from a stream's DATA, as
/// testkit's SSE client reads a socket: Ok(Some) once an event is whole,
/// Ok(None) while it is not (what was read is kept on the stream).
fn take_event(s: &mut Stream) -> Result<Option<SseEvent>, String> {
    while let Some(nl) = s.body.iter().position(|&b| b == b'\n') {
        let mut line: Vec<u8> = s.body.drain(..=nl).collect();
        line.pop();
        if line.ends_with(b"\r") {
            line.pop();
        }
        let line = String::from_utf8(line).map_err(|e| format!("a line not UTF-8: {e}"))?;
        if line.is_empty() {
            if let Some(ev) = s.event.take() {
                return Ok(Some(ev));
            }
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_str(), ""),
        };
        match field {
            "id" => started(&mut s.event).id = Some(value.to_string()),
            "event" => started(&mut s.event).event = Some(value.to_string()),
            "data" => started(&mut s.event).data.push(value.to_string()),
            "retry" => s.retries.push(
                value
                    .parse()
                    .map_err(|_| format!("retry is not a number: {line:?}"))?,
            ),
            other => return Err(format!("unknown field {other:?} in line {line:?}")),
        }
    }
    Ok(None)
}

/// The event a field line belongs to, begun by its first field.
fn started(event: &mut Option<SseEvent>) -> &mut SseEvent {
    event.get_or_insert(SseEvent {
        id: None,
        event: None,
        data: Vec::new(),
    })
}

/// Asserts that an HTTP/2 response head carries none of HTTP/1.1's
/// connection-specific headers.
fn assert_no_connection_headers(head: &HttpHead, context: &str) {
    for (name, value) in &head.headers {
        assert!(
            !CONNECTION_SPECIFIC.contains(&name.as_str()),
            "{context}: `{name}: {value}` has no place in an HTTP/2 response: {head:?}"
        );
    }
}

/// The headers of an HTTP/1.1 head that an HTTP/2 one must carry the
/// same: all but the connection-specific ones.
fn end_to_end(head: &HttpHead) -> Vec<(String, String)> {
    head.headers
        .iter()
        .filter(|(n, _)| !CONNECTION_SPECIFIC.contains(&n.as_str()))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------
// Metrics, tokens
// ---------------------------------------------------------------------------

/// A gateway with its admin listener on a free port, and `extra` flags.
fn gateway_with_admin(extra: &[&str]) -> (Gateway, SocketAddr) {
    let admin = free_addr();
    let admin_arg = admin.to_string();
    let mut args = vec!["--cores", "1", "--admin-listen", &admin_arg];
    args.extend_from_slice(extra);
    (Gateway::start(&args), admin)
}

/// The samples of `name` on `admin` whose labels include `label` (all of
/// them for "").
fn samples(admin: SocketAddr, name: &str, label: &str) -> Vec<f64> {
    let resp = HttpConn::connect(admin).get("/metrics", &[]);
    assert_eq!(resp.status, 200, "{}", resp.describe());
    String::from_utf8_lossy(&resp.body)
        .lines()
        .filter(|l| {
            let series = l.rsplit_once(' ').map_or("", |(s, _)| s);
            let bare = series.split('{').next().unwrap_or("");
            bare == name && series.contains(label)
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .collect()
}

/// Scrapes until `done` holds for the sum of [`samples`] (the cores
/// publish their gauges once a second; there is nothing else to wait
/// for), for at most 10 s. Every sample must be a count: a gauge that went
/// below zero would show as a negative or a wrapped, absurd, number.
fn wait_metric(admin: SocketAddr, name: &str, label: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = samples(admin, name, label);
        for v in &all {
            assert!(
                (0.0..1e6).contains(v),
                "{name}{{{label}}}: a sample of {v} is not a count of open things: {all:?}"
            );
        }
        let v = all.iter().sum();
        if done(v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{{{label}}} is {v}, never what the test waits for"
        );
        thread::sleep(PROBE_INTERVAL);
    }
}

/// The connection gauges a test checks, waited for until they read
/// (`sse`, `longpoll`, `grpc` connections, gRPC calls).
fn wait_gauges(admin: SocketAddr, sse: f64, longpoll: f64, grpc: f64, calls: f64) {
    wait_metric(admin, "gateway_connections", r#"transport="sse""#, |v| {
        v == sse
    });
    wait_metric(
        admin,
        "gateway_connections",
        r#"transport="longpoll""#,
        |v| v == longpoll,
    );
    wait_metric(admin, "gateway_connections", r#"transport="grpc""#, |v| {
        v == grpc
    });
    wait_metric(admin, "gateway_grpc_streams", "", |v| v == calls);
}

/// Every connection the gateway counts (`/healthz`), this check's own
/// included.
fn connections(gw: &Gateway) -> u64 {
    gw.connections_per_core().iter().sum()
}

const SECRET: &str = "http2-tests-hs256-secret-of-32-bytes-or-more";

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token (kid `hs`) for `channels`, expiring at `exp`.
fn token(channels: &[&str], exp: u64) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("hs".into());
    let claims = json!({"sub": "h2", "exp": exp, "channels": channels});
    encode(
        &header,
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn is_probe(d: &Delivery) -> bool {
    d.channel == PROBE_CHANNEL
}

/// The next SSE delivery of stream `id` that is not a probe.
fn next_real(h2: &mut H2, id: u32) -> Delivery {
    loop {
        let d = h2.next_delivery(id);
        if !is_probe(&d) {
            return d;
        }
    }
}

/// The next gRPC frame of call `id` that is not a probe message.
fn next_real_frame(h2: &mut H2, id: u32) -> Value {
    loop {
        let v = h2.next_frame(id);
        if v["channel"] != PROBE_CHANNEL || v["type"] != "message" {
            return v;
        }
    }
}

/// Publishes `probe` until stream `id` of `h2` (an SSE stream or a gRPC
/// call on channel `probe`) has one: the publisher's subscription has
/// arrived (ZeroMQ's slow joiner) and the gateway has the stream. Later
/// probes may still come: [`next_real`] and [`next_real_frame`] skip them.
fn join(publisher: &Publisher, h2: &mut H2, id: u32) {
    let deadline = Instant::now() + PROBE_BUDGET;
    loop {
        assert!(
            Instant::now() < deadline,
            "no probe reached stream {id} within {PROBE_BUDGET:?}"
        );
        publisher.publish(PROBE_CHANNEL, b"probe");
        let sent = Instant::now();
        // What comes for a moment, then another probe.
        while let Some(left) = PROBE_INTERVAL.checked_sub(sent.elapsed()) {
            if !h2.pump_within(left) {
                break;
            }
            if h2.probed(id) {
                return;
            }
        }
    }
}

/// A long-poll answer: 200, JSON, a Content-Length that is the body's,
/// no connection-specific header; its body parsed.
fn poll_answer(resp: &HttpResponse, context: &str) -> LongPoll {
    assert_eq!(resp.status, 200, "{context}: {}", resp.describe());
    assert_no_connection_headers(&resp.head, context);
    let ct = resp.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{context}: content-type {ct:?}: {}",
        resp.describe()
    );
    assert_eq!(
        resp.header("content-length"),
        Some(resp.body.len().to_string().as_str()),
        "{context}: content-length is the body's: {}",
        resp.describe()
    );
    let body: Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("{context}: not JSON ({e}): {}", resp.describe()));
    parse_longpoll_body(&body, context)
}

fn texts(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(Delivery::text).collect()
}

/// The body of a refusal, its reason.
fn reason(resp: &HttpResponse) -> String {
    String::from_utf8_lossy(&resp.body).trim_end().to_string()
}

// ---------------------------------------------------------------------------
// SSE
// ---------------------------------------------------------------------------

/// SSE streams on one connection in the first test.
const STREAMS: usize = 8;

#[test]
fn sse_streams_sharing_one_connection_get_the_events_an_http1_stream_gets() {
    let (gw, admin) = gateway_with_admin(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let path = "/events?channel=news&channel=sport";
    let mut witness = gw.sse(path, None);
    let mut h2 = H2::connect(gw.listen, None);
    let streams: Vec<u32> = (0..STREAMS).map(|_| h2.sse(path, &[])).collect();
    for &id in &streams {
        // A stream is subscribed once its head is sent, as on HTTP/1.1.
        let head = h2.head(id);
        let ctx = format!("stream {id}");
        assert_eq!(head.status, 200, "{ctx}: {head:?}");
        let ct = head.header("content-type").unwrap_or("");
        assert!(ct.starts_with("text/event-stream"), "{ctx}: {head:?}");
        assert_no_connection_headers(&head, &ctx);
        assert_eq!(
            head.headers,
            end_to_end(&witness.head),
            "{ctx}: the HTTP/1.1 stream's headers, less the connection-specific ones"
        );
    }
    // One connection, counted once; each stream an SSE subscriber.
    wait_gauges(admin, (STREAMS + 1) as f64, 0.0, 1.0, 0.0);

    let large: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let sent: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("news", b"hello".to_vec(), None),
        // Not UTF-8: base64.
        ("sport", vec![0xff, 0x00, 0xfe, 0x80], None),
        // Two data lines.
        ("news", b"line one\nline two".to_vec(), None),
        ("sport", b"scored".to_vec(), Some("goal")),
        // Larger than a DATA frame and than the client's window.
        ("news", large, None),
        ("news", b"last".to_vec(), None),
    ];
    for (channel, payload, event) in &sent {
        match event {
            Some(e) => publisher.publish_event(channel, payload, e),
            None => publisher.publish(channel, payload),
        }
    }
    let want: Vec<SseEvent> = sent.iter().map(|_| witness.next_event()).collect();
    let delivered: Vec<Delivery> = want
        .iter()
        .map(|ev| sse_event_to_delivery(ev, path))
        .collect();
    let expected: Vec<(String, Vec<u8>)> = sent
        .iter()
        .map(|(c, p, _)| (c.to_string(), p.clone()))
        .collect();
    assert_eq!(content(&delivered), expected, "the HTTP/1.1 stream");
    assert_strictly_increasing(&ids(&delivered), "the HTTP/1.1 stream");
    for &id in &streams {
        let got: Vec<SseEvent> = sent.iter().map(|_| h2.next_event(id)).collect();
        assert!(
            got == want,
            "stream {id}: the events of the HTTP/1.1 stream, line for line: {:?}",
            got.iter().map(|e| (&e.id, &e.event)).collect::<Vec<_>>()
        );
        // Its opening `retry:`, as on HTTP/1.1.
        let retries = &h2.stream(id).retries;
        assert_eq!(retries.len(), witness.retries.len(), "stream {id}");
        assert!(
            retries.iter().all(|ms| (1_000..=5_000).contains(ms)),
            "stream {id}: {retries:?}"
        );
    }

    // A stream the client resets is gone; its neighbours go on.
    let (gone, rest) = streams.split_first().unwrap();
    h2.reset(*gone);
    wait_gauges(admin, STREAMS as f64, 0.0, 1.0, 0.0);
    publisher.publish("news", b"after a reset");
    let want = witness.next_event();
    for &id in rest {
        assert_eq!(h2.next_event(id), want, "stream {id}");
    }
    drop(probe);
}

// ---------------------------------------------------------------------------
// Long-poll
// ---------------------------------------------------------------------------

#[test]
fn a_long_poll_is_held_until_a_message_and_resumes_from_its_cursor_out_of_the_history() {
    let (gw, admin) = gateway_with_admin(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let mut h2 = H2::connect(gw.listen, None);

    // Nothing to say: held, then answered by the next message, and the
    // stream ends (END_STREAM).
    let held = h2.get("/events?channel=lp", &[]);
    wait_for_held_polls(admin, 1);
    assert!(h2.stream(held).head.is_none(), "a held poll has no answer");
    publisher.publish("lp", b"first");
    let first = poll_answer(&h2.response(held), "held poll");
    assert_eq!(texts(&first.messages), ["first"], "{}", first.body);
    assert_eq!(first.cursor, first.messages[0].id.unwrap());

    // Two more, in the history once a WebSocket has them.
    let mut ws = gw.ws("/ws?channel=lp");
    publisher.publish("lp", b"second");
    publisher.publish("lp", b"third");
    let seen = ws.deliveries(2);
    // Resumed from the cursor: answered from the history, without
    // another message.
    let resumed = h2.get(&format!("/events?channel=lp&since={}", first.cursor), &[]);
    let r = poll_answer(&h2.response(resumed), "resumed poll");
    assert_eq!(texts(&r.messages), ["second", "third"], "{}", r.body);
    assert_eq!(ids(&r.messages), ids(&seen), "the ids a WebSocket got");
    assert_eq!(Some(r.cursor), r.messages[1].id);
    assert!(r.gaps.is_empty(), "{}", r.body);
    // From before the first: all of it, in order.
    let all = h2.get(&format!("/events?channel=lp&since={}", probe.last_id), &[]);
    let all = poll_answer(&h2.response(all), "poll from before the first");
    assert_eq!(texts(&all.messages), ["first", "second", "third"]);
    assert_eq!(all.cursor, r.cursor);

    // Two polls held at once on the one connection: each answered by its
    // own channel's message, the other still held meanwhile.
    let a = h2.get(&format!("/events?channel=lp-a&since={}", r.cursor), &[]);
    let b = h2.get(&format!("/events?channel=lp-b&since={}", r.cursor), &[]);
    wait_for_held_polls(admin, 2);
    publisher.publish("lp-b", b"for b");
    let got_b = poll_answer(&h2.response(b), "poll b");
    assert_eq!(texts(&got_b.messages), ["for b"]);
    assert!(
        h2.stream(a).head.is_none(),
        "poll a answered by b's message"
    );
    wait_for_held_polls(admin, 1);
    publisher.publish("lp-a", b"for a");
    let got_a = poll_answer(&h2.response(a), "poll a");
    assert_eq!(texts(&got_a.messages), ["for a"]);
    wait_for_held_polls(admin, 0);
    drop(probe);
}

// ---------------------------------------------------------------------------
// gRPC beside
// ---------------------------------------------------------------------------

#[test]
fn a_grpc_call_and_an_sse_stream_share_one_connection_which_counts_once() {
    let (gw, admin) = gateway_with_admin(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let before = connections(&gw);
    let mut h2 = H2::connect(gw.listen, None);
    let call = h2.grpc_subscribe(&["mixed", PROBE_CHANNEL]);
    let sse = h2.sse("/events?channel=mixed", &[]);
    let head = h2.head(call);
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("content-type"), Some("application/grpc"));
    let head = h2.head(sse);
    assert_eq!(head.status, 200, "{head:?}");
    assert!(head
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("text/event-stream")));
    join(&publisher, &mut h2, call);

    for p in ["one", "two", "three"] {
        publisher.publish("mixed", p.as_bytes());
    }
    for p in ["one", "two", "three"] {
        let frame = next_real_frame(&mut h2, call);
        assert_eq!(frame["type"], "message", "{frame}");
        assert_eq!(frame["channel"], "mixed", "{frame}");
        let payload = frame["payload"].as_str().and_then(base64_decode);
        assert_eq!(payload.as_deref(), Some(p.as_bytes()), "{frame}");
        let d = h2.next_delivery(sse);
        assert_eq!((d.channel.as_str(), d.text().as_str()), ("mixed", p));
        assert_eq!(frame["id"].as_u64(), d.id, "the same id on both: {frame}");
    }
    // One connection (gRPC's gauge), one call, one SSE stream.
    wait_gauges(admin, 1.0, 0.0, 1.0, 1.0);
    assert_eq!(
        connections(&gw),
        before + 1,
        "the HTTP/2 connection counts once, whatever its streams"
    );

    // The client goes: the stream, the call and the connection are gone,
    // and no gauge goes below zero.
    h2.close();
    wait_gauges(admin, 0.0, 0.0, 0.0, 0.0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while connections(&gw) != before {
        assert!(
            Instant::now() < deadline,
            "connections: {} after the HTTP/2 connection closed, {before} before it opened",
            connections(&gw)
        );
        thread::sleep(PROBE_INTERVAL);
    }
    wait_gauges(admin, 0.0, 0.0, 0.0, 0.0);
    drop(probe);
}

// ---------------------------------------------------------------------------
// Drain
// ---------------------------------------------------------------------------

#[test]
fn a_drain_ends_an_sse_stream_with_retry_and_end_stream_then_the_connection_with_goaway() {
    let (mut gw, admin) = gateway_with_admin(&["--drain-window-ms", "1000"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let mut h2 = H2::connect(gw.listen, None);
    let sse = h2.sse("/events?channel=news", &[]);
    let call = h2.grpc_subscribe(&["news"]);
    assert_eq!(h2.head(sse).status, 200);
    assert_eq!(h2.head(call).status, 200);
    publisher.publish("news", b"before");
    assert_eq!(h2.next_delivery(sse).text(), "before");
    wait_gauges(admin, 1.0, 0.0, 1.0, 1.0);
    // The probe's WebSocket leaves first: the drain waits for this one.
    drop(probe);

    gw.signal(libc::SIGTERM);
    // SSE: a `retry:` with a jittered delay, then END_STREAM (a stream
    // told to go, not one cut).
    match h2.sse_event_or_end(sse) {
        Ok(None) => {}
        Ok(Some(ev)) => panic!("SSE: {ev:?} instead of the end"),
        Err(code) => panic!("SSE: RST_STREAM {code} instead of END_STREAM"),
    }
    let retries = h2.stream(sse).retries.clone();
    assert_eq!(retries.len(), 2, "its opening retry and the drain's");
    assert!((1_000..=5_000).contains(&retries[1]), "{retries:?}");
    // The call beside it: UNAVAILABLE, in trailers.
    assert_eq!(h2.end(call), End::Ended);
    let trailers = h2.stream(call).trailers.clone().unwrap_or_default();
    let field = |n: &str| {
        trailers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(field("grpc-status"), Some("14"), "{trailers:?}");
    assert_eq!(field("grpc-message"), Some("draining"), "{trailers:?}");
    // The connection: GOAWAY (NO_ERROR), then closed by the gateway.
    let how = h2.wait_closed();
    let goaway = h2.goaway.clone();
    assert_eq!(
        goaway.as_ref().map(|g| g["code"].clone()),
        Some(json!(0)),
        "GOAWAY NO_ERROR before the close ({how})"
    );
    // No connection left to wait for: the count went back to zero.
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .expect("the gateway still runs after its drain");
    assert!(status.success(), "exit status {status}");
    let log = gw.log();
    assert!(log.contains("drained: no connection left"), "{log}");
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

#[test]
fn each_stream_is_checked_for_a_token_with_the_http1_statuses() {
    let secret = format!("hs={SECRET}");
    let gw = Gateway::start(&[
        "--cores",
        "1",
        "--auth",
        "--auth-hs256-secret",
        &secret,
        "--auth-leeway-s",
        "0",
    ]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let mut h2 = H2::connect(gw.listen, None);

    let refused = h2.sse("/events?channel=news", &[]);
    let resp = h2.response(refused);
    assert_eq!(
        (resp.status, reason(&resp).as_str()),
        (401, "missing token"),
        "{}",
        resp.describe()
    );
    assert_eq!(resp.header("www-authenticate"), Some("Bearer"));
    assert_no_connection_headers(&resp.head, "401");
    let h1 = gw
        .http()
        .get("/events?channel=news", &[("Accept", "text/event-stream")]);
    assert_eq!(
        (resp.status, &resp.head.headers, &resp.body),
        (h1.status, &end_to_end(&h1.head), &h1.body),
        "the HTTP/1.1 refusal"
    );

    let good = token(&["news", PROBE_CHANNEL], now_s() + 3600);
    let bearer = format!("Bearer {good}");
    let path = format!("/events?channel=news&channel={PROBE_CHANNEL}");
    let ok = h2.sse(&path, &[("authorization", &bearer)]);
    assert_eq!(h2.head(ok).status, 200);
    let other = h2.sse("/events?channel=sport", &[("authorization", &bearer)]);
    let resp = h2.response(other);
    assert_eq!(
        (resp.status, reason(&resp).as_str()),
        (403, "channel not allowed")
    );
    let expired = token(&["news"], now_s() - 60);
    let late = h2.sse(&format!("/events?channel=news&token={expired}"), &[]);
    let resp = h2.response(late);
    assert_eq!(
        (resp.status, reason(&resp).as_str()),
        (401, "token expired")
    );

    join(&publisher, &mut h2, ok);
    publisher.publish("news", b"hello");
    assert_eq!(next_real(&mut h2, ok).text(), "hello");

    // A token that expires while its stream is open: the stream ends, as
    // an HTTP/1.1 one does; the others on the connection go on.
    let exp = now_s() + 2;
    let short = token(&["news"], exp);
    let expiring = h2.sse(&format!("/events?channel=news&token={short}"), &[]);
    assert_eq!(h2.head(expiring).status, 200);
    match h2.sse_event_or_end(expiring) {
        Ok(None) => {}
        Ok(Some(ev)) => panic!("an event while the token runs out: {ev:?}"),
        Err(code) => panic!("RST_STREAM {code} instead of END_STREAM"),
    }
    assert!(now_s() >= exp, "ended before its token expired");
    publisher.publish("news", b"still here");
    assert_eq!(next_real(&mut h2, ok).text(), "still here");
}

// ---------------------------------------------------------------------------
// A reader that stops
// ---------------------------------------------------------------------------

const BULK_BYTES: usize = 4096;
/// Enough to pass the 64 KiB budget twice over on a stream that takes
/// nothing.
const BULK_MESSAGES: usize = 40;
/// Published together, then read by the fast clients before the next
/// batch: well under the budget, so that only the stuck stream meets it.
const BULK_BATCH: usize = 8;

fn bulk(i: usize) -> Vec<u8> {
    let mut p = format!("{i:04}:").into_bytes();
    p.resize(BULK_BYTES, b'x');
    p
}

#[test]
fn a_stream_whose_window_stays_closed_is_reset_while_the_others_get_every_message() {
    let (gw, admin) = gateway_with_admin(&["--outbound-queue-bytes-max", "65536"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let path = "/events?channel=bulk";
    let accept = [("accept", "text/event-stream")];
    // Streams of 1 KiB windows. The stuck one never gives a byte back (no
    // WINDOW_UPDATE); its neighbour on the same connection is granted a
    // window of its own and gives back what it reads.
    let mut slow = H2::connect(gw.listen, Some(1024));
    let stuck = slow.request("GET", path, &accept, None, false, 0);
    let neighbour = slow.request("GET", path, &accept, None, true, 1 << 20);
    let mut fast = H2::connect(gw.listen, None);
    let other = fast.sse(path, &[]);
    let mut witness = gw.sse(path, None);
    for id in [stuck, neighbour] {
        assert_eq!(slow.head(id).status, 200, "stream {id}");
    }
    assert_eq!(fast.head(other).status, 200);

    for batch in 0..BULK_MESSAGES / BULK_BATCH {
        let range = batch * BULK_BATCH..(batch + 1) * BULK_BATCH;
        for i in range.clone() {
            publisher.publish("bulk", &bulk(i));
        }
        for i in range {
            for (h2, id, who) in [
                (&mut slow, neighbour, "the stuck stream's neighbour"),
                (&mut fast, other, "a stream of another connection"),
            ] {
                let d = h2.next_delivery(id);
                assert!(
                    d.payload == bulk(i),
                    "{who}: message {i} missing, out of order or altered: {:?}",
                    &d.text()[..5.min(d.payload.len())]
                );
            }
            assert_eq!(witness.next_delivery().payload, bulk(i), "HTTP/1.1");
        }
    }
    // The stuck stream: reset (CANCEL), after at most its window of DATA.
    assert_eq!(slow.end(stuck), End::Reset(8), "RST_STREAM CANCEL");
    let got = slow.stream(stuck).body.len();
    assert!(got <= 1024, "{got} bytes through a 1 KiB window");
    wait_metric(admin, "gateway_slow_consumer_disconnects_total", "", |v| {
        v == 1.0
    });
    // The others are still served, the neighbour's connection included.
    publisher.publish("bulk", b"after");
    assert_eq!(slow.next_delivery(neighbour).text(), "after");
    assert_eq!(fast.next_delivery(other).text(), "after");
    assert_eq!(witness.next_delivery().text(), "after");
    wait_gauges(admin, 3.0, 0.0, 2.0, 0.0);
    drop(probe);
}

// ---------------------------------------------------------------------------
// POST /publish
// ---------------------------------------------------------------------------

#[test]
fn a_post_reaches_the_hubs_and_a_refusal_keeps_its_status_and_reason() {
    let gw = Gateway::start(&[
        "--cores",
        "1",
        "--upstream-bind",
        "tcp://127.0.0.1:*",
        "--ws-message-bytes-max",
        "32768",
    ]);
    let hub = gw.hub();
    let mut h2 = H2::connect(gw.listen, None);
    // More than one DATA frame (16 KiB).
    let body: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let text = [("content-type", "text/plain")];
    let post = h2.request("POST", "/publish?channel=room", &text, Some(&body), true, 0);
    let resp = h2.response(post);
    assert_eq!(resp.status, 202, "{}", resp.describe());
    assert_no_connection_headers(&resp.head, "202");
    let m = hub.next_of("message");
    assert_eq!(m.channel, "room");
    assert!(
        m.payload == body,
        "the body, whole: {} bytes",
        m.payload.len()
    );
    assert_eq!(m.meta["transport"], "http", "{}", m.meta);
    assert_eq!(m.meta["binary"], false, "{}", m.meta);
    // Not UTF-8: flagged binary, bytes untouched.
    let post = h2.request(
        "POST",
        "/publish?channel=room",
        &[],
        Some(&[0xff, 0x00]),
        true,
        0,
    );
    assert_eq!(h2.response(post).status, 202);
    let m = hub.next_of("message");
    assert_eq!(
        (m.payload.as_slice(), &m.meta["binary"]),
        (&[0xff, 0x00][..], &json!(true))
    );

    // Over the client message limit: 413 with its reason, as on HTTP/1.1.
    let big = vec![b'x'; 32_769];
    let post = h2.request("POST", "/publish?channel=room", &text, Some(&big), true, 0);
    let resp = h2.response(post);
    let h1 = gw.http().post(
        "/publish?channel=room",
        &[("Content-Type", "text/plain")],
        &big,
    );
    assert_eq!(
        (resp.status, reason(&resp)),
        (413, "payload too large".to_string())
    );
    assert_eq!(
        (resp.status, &resp.head.headers, &resp.body),
        (h1.status, &end_to_end(&h1.head), &h1.body),
        "the HTTP/1.1 refusal"
    );
    // Another method: 405 and what is allowed.
    let get = h2.get("/publish?channel=room", &[]);
    let resp = h2.response(get);
    assert_eq!(resp.status, 405, "{}", resp.describe());
    assert_eq!(resp.header("allow"), Some("POST, OPTIONS"));

    // Without an upstream socket, clients cannot send.
    let plain = Gateway::start(&["--cores", "1"]);
    let mut h2 = H2::connect(plain.listen, None);
    let post = h2.request("POST", "/publish?channel=room", &text, Some(b"x"), true, 0);
    let resp = h2.response(post);
    assert_eq!(
        (resp.status, reason(&resp)),
        (503, "upstream not configured".to_string()),
        "{}",
        resp.describe()
    );
}

// ---------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------

const APP: &str = "https://app.example";
const EVIL: &str = "https://evil.example";

#[test]
fn a_preflight_from_an_allowed_origin_gets_the_cors_headers_and_another_none() {
    let gw = Gateway::start(&[
        "--cores",
        "1",
        "--allowed-origin",
        APP,
        "--cors-allow-credentials",
    ]);
    let mut h2 = H2::connect(gw.listen, None);
    let preflight = |origin| {
        [
            ("origin", origin),
            ("access-control-request-method", "GET"),
            (
                "access-control-request-headers",
                "authorization, last-event-id",
            ),
        ]
    };
    let path = "/events?channel=news";
    let id = h2.request("OPTIONS", path, &preflight(APP), None, true, 0);
    let resp = h2.response(id);
    assert_eq!(resp.status, 204, "{}", resp.describe());
    assert_eq!(resp.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        resp.header("access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(resp.header("access-control-allow-methods"), Some("GET"));
    let allowed = resp
        .header("access-control-allow-headers")
        .unwrap_or("")
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("last-event-id"),
        "{}",
        resp.describe()
    );
    assert_eq!(resp.header("vary"), Some("Origin"));
    assert!(resp.body.is_empty(), "{}", resp.describe());
    assert_no_connection_headers(&resp.head, "preflight");
    let (h1, _conn) = raw_request(
        gw.listen,
        format!(
            "OPTIONS {path} HTTP/1.1\r\nHost: gateway\r\nOrigin: {APP}\r\n\
             Access-Control-Request-Method: GET\r\n\
             Access-Control-Request-Headers: authorization, last-event-id\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(
        (resp.status, &resp.head.headers),
        (h1.status, &end_to_end(&h1.head)),
        "the HTTP/1.1 answer"
    );

    // Another origin: refused, and nothing that would let it read.
    let id = h2.request("OPTIONS", path, &preflight(EVIL), None, true, 0);
    let resp = h2.response(id);
    assert_eq!(
        (resp.status, reason(&resp).as_str()),
        (403, "origin not allowed"),
        "{}",
        resp.describe()
    );
    assert!(
        !resp
            .head
            .headers
            .iter()
            .any(|(n, _)| n.starts_with("access-control-")),
        "{}",
        resp.describe()
    );

    // The stream itself, from the allowed origin: readable by its page.
    let sse = h2.sse(path, &[("origin", APP)]);
    let head = h2.head(sse);
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        head.header("access-control-allow-credentials"),
        Some("true")
    );
}

// ---------------------------------------------------------------------------
// Health checks
// ---------------------------------------------------------------------------

#[test]
fn health_checks_are_answered_as_on_http1_and_a_head_request_ends_without_a_body() {
    let gw = Gateway::start(&["--cores", "1"]);
    let mut h2 = H2::connect(gw.listen, None);
    for path in ["/healthz", "/readyz"] {
        let id = h2.get(path, &[]);
        let resp = h2.response(id);
        assert_eq!(resp.status, 200, "{path}: {}", resp.describe());
        assert_no_connection_headers(&resp.head, path);
        let body: Value = serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {}", resp.describe()));
        assert!(body.get("status").is_some(), "{path}: {body}");
        assert_eq!(
            resp.header("content-length"),
            Some(resp.body.len().to_string().as_str()),
            "{path}: {}",
            resp.describe()
        );
    }
    // HEAD, as a balancer's check sends it: the head, and END_STREAM
    // without DATA.
    for path in ["/healthz", "/readyz"] {
        let id = h2.request("HEAD", path, &[], None, true, 0);
        let resp = h2.response(id);
        assert_eq!(resp.status, 200, "HEAD {path}: {}", resp.describe());
        assert!(resp.body.is_empty(), "HEAD {path}: {}", resp.describe());
    }
}

// ---------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------

/// curl speaking HTTP/2 with prior knowledge, with a safety net; fails,
/// saying what to install, without curl or without its HTTP/2.
fn curl() -> Command {
    let found = Command::new("sh")
        .args(["-c", "command -v curl"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "this test needs curl, built with HTTP/2 (nghttp2): apt-get install curl"
    );
    let version = Command::new("curl").arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version
            .lines()
            .any(|l| l.starts_with("Features:") && l.contains("HTTP2")),
        "this test needs a curl built with HTTP/2 (nghttp2); this one:\n{version}"
    );
    let mut cmd = Command::new("curl");
    cmd.args([
        "--silent",
        "--show-error",
        "--http2-prior-knowledge",
        "--include",
        "--max-time",
        "30",
    ]);
    cmd
}

/// curl's output of a whole response: the status line, and the body.
fn curl_get(url: &str, headers: &[&str]) -> (String, Vec<u8>) {
    let mut cmd = curl();
    for h in headers {
        cmd.args(["--header", h]);
    }
    let out = cmd.arg(url).output().expect("run curl");
    assert!(
        out.status.success(),
        "curl {url}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "curl {url}: no head: {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
    let head = String::from_utf8_lossy(&out.stdout[..split]).into_owned();
    let status = head.lines().next().unwrap_or("").trim().to_string();
    (status, out.stdout[split + 4..].to_vec())
}

#[test]
fn curl_reads_health_checks_a_long_poll_and_an_sse_stream_over_http2() {
    let gw = Gateway::start(&["--cores", "1"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let base = format!("http://{}", gw.listen);

    let (status, body) = curl_get(&format!("{base}/healthz"), &[]);
    assert_eq!(status, "HTTP/2 200");
    let health: Value = serde_json::from_slice(&body).expect("/healthz is JSON");
    assert_eq!(health["status"], "ok", "{health}");
    let (status, _) = curl_get(&format!("{base}/readyz"), &[]);
    assert_eq!(status, "HTTP/2 200");

    // A long-poll the history answers: curl returns once the stream ends.
    let mut ws = gw.ws("/ws?channel=curl");
    publisher.publish("curl", b"from the history");
    let seen = ws.next_delivery();
    let url = format!("{base}/events?channel=curl&since={}", probe.last_id);
    let (status, body) = curl_get(&url, &[]);
    assert_eq!(status, "HTTP/2 200");
    let body: Value = serde_json::from_slice(&body).expect("a long-poll answer is JSON");
    let poll = parse_longpoll_body(&body, "curl");
    assert_eq!(texts(&poll.messages), ["from the history"]);
    assert_eq!(poll.cursor, seen.id.unwrap());

    // An SSE stream, printed as it comes.
    let curl = spawn_lines(
        curl()
            .args(["--no-buffer", "--header", "accept: text/event-stream"])
            .arg(format!("{base}/events?channel=curl")),
    )
    .expect("run curl");
    let next = || {
        let line = curl
            .lines
            .recv_timeout(IO_TIMEOUT)
            .unwrap_or_else(|_| panic!("curl printed nothing more within {IO_TIMEOUT:?}"));
        // curl ends its status line with a space.
        line.trim_end().to_string()
    };
    assert_eq!(next(), "HTTP/2 200");
    let mut head = Vec::new();
    loop {
        let line = next();
        if line.is_empty() {
            break;
        }
        head.push(line.to_ascii_lowercase());
    }
    assert!(
        head.iter()
            .any(|h| h.starts_with("content-type: text/event-stream")),
        "{head:?}"
    );
    publisher.publish("curl", b"live");
    let mut event = Vec::new();
    loop {
        let line = next();
        if line.is_empty() && event.iter().any(|l: &String| l.starts_with("data:")) {
            break;
        }
        if !line.is_empty() && !line.starts_with("retry:") && !line.starts_with(':') {
            event.push(line);
        }
    }
    let ev = SseEvent {
        id: event
            .iter()
            .find_map(|l| l.strip_prefix("id: "))
            .map(str::to_string),
        event: None,
        data: event
            .iter()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect(),
    };
    let d = sse_event_to_delivery(&ev, "curl");
    assert_eq!((d.channel.as_str(), d.text().as_str()), ("curl", "live"));
    assert!(d.id > seen.id, "{ev:?} after {seen:?}");
}
