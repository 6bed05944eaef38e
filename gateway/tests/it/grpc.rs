//! The gRPC service (`gateway.v1.Gateway`: HTTP/2 cleartext with prior
//! knowledge, on the public listener and on `--grpc-listen`) from the
//! outside, with the clients a service would use: grpcio for Subscribe and
//! Connect, with stubs generated from the committed .proto by grpcio-tools
//! when the tests start; and python h2 as a raw HTTP/2 client for what
//! grpcio will not do (stop granting window, never ack a PING, ignore the
//! stream limit, the known floods). The scripts are in `tests/grpc/`; each
//! prints one JSON line per frame it receives, and the tests read those
//! lines as they come, so every wait is for something the gateway sent,
//! under the usual safety net.
//!
//! Python 3 with grpcio, grpcio-tools and h2 is a requirement of these
//! tests: without it they fail, saying what to install.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use testkit::two_way::{Frame as WsFrame, TwoWayClient};

use crate::common::*;

const INSTALL: &str = "python3 -m pip install grpcio grpcio-tools h2";

// ---------------------------------------------------------------------------
// The Python clients
// ---------------------------------------------------------------------------

fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("grpc")
}

/// The Python stubs of the committed .proto, generated once per test
/// process (after checking the Python packages are there).
fn stubs() -> &'static Path {
    static STUBS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match STUBS.get_or_init(generate_stubs) {
        Ok(dir) => dir,
        Err(why) => panic!("{why}"),
    }
}

fn generate_stubs() -> Result<PathBuf, String> {
    let check = Command::new("python3")
        .args([
            "-c",
            "import grpc, grpc_tools.protoc, h2, hpack, hyperframe",
        ])
        .output()
        .map_err(|e| {
            format!("the gRPC tests need python3 with grpcio, grpcio-tools and h2 ({e}): {INSTALL}")
        })?;
    if !check.status.success() {
        return Err(format!(
            "the gRPC tests need the Python packages grpcio, grpcio-tools and h2; install them \
             with: {INSTALL}\n{}",
            String::from_utf8_lossy(&check.stderr).trim()
        ));
    }
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("grpc-stubs-{}", std::process::id()));
    std::fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../protocol/proto");
    let gen = Command::new("python3")
        .arg("-m")
        .arg("grpc_tools.protoc")
        .arg(format!("-I{}", proto_root.display()))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("gateway/v1/gateway.proto")
        .output()
        .map_err(|e| format!("run grpc_tools.protoc: {e}"))?;
    if !gen.status.success() {
        return Err(format!(
            "grpc_tools.protoc failed on gateway/v1/gateway.proto:\n{}",
            String::from_utf8_lossy(&gen.stderr)
        ));
    }
    Ok(out)
}

/// A Python client process: its stdout lines (JSON) as they come, its
/// stdin for commands. Killed when dropped.
struct Py {
    /// The process, its stdin, stdout lines and stderr (whole once it
    /// has exited).
    io: LineChild,
    what: String,
    /// The last lines read, for failure messages.
    recent: Vec<String>,
}

impl Py {
    fn spawn(script: &str, args: &[String]) -> Py {
        let what = format!(
            "{script} {}",
            args.first().map(String::as_str).unwrap_or("")
        );
        let io = spawn_lines(
            Command::new("python3")
                .arg(scripts_dir().join(script))
                .args(args)
                .env("GATEWAY_GRPC_STUBS", stubs())
                // No __pycache__ next to the scripts.
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .env("GRPC_VERBOSITY", "ERROR"),
        )
        .unwrap_or_else(|e| panic!("spawn python3 {script}: {e}; {INSTALL}"));
        Py {
            io,
            what,
            recent: Vec::new(),
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

    /// The next line, if one comes within `limit`.
    fn next_within(&mut self, limit: Duration) -> Option<Value> {
        match self.io.lines.recv_timeout(limit) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| self.fail(&format!("not a JSON line ({e}): {line}")));
                self.recent.push(line);
                if self.recent.len() > 8 {
                    self.recent.remove(0);
                }
                Some(v)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Ok(Some(st)) = self.io.child.try_wait() {
                    if st.code() == Some(3) {
                        self.fail(&format!("Python packages missing: {INSTALL}"));
                    }
                }
                self.fail("exited without another line")
            }
        }
    }

    /// A line already printed, if any (None too once the process is gone:
    /// the caller reads on with [`Py::next`] to learn how it ended).
    fn poll(&mut self) -> Option<Value> {
        let line = self.io.lines.try_recv().ok()?;
        self.recent.push(line.clone());
        if self.recent.len() > 8 {
            self.recent.remove(0);
        }
        Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|e| self.fail(&format!("not a JSON line ({e}): {line}"))),
        )
    }

    /// The next line; fails after the safety net.
    fn next(&mut self) -> Value {
        self.next_within(IO_TIMEOUT)
            .unwrap_or_else(|| self.fail(&format!("nothing within {IO_TIMEOUT:?}")))
    }

    /// Sends a command line on stdin.
    fn send(&mut self, cmd: Value) {
        let stdin = self.io.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{cmd}")
            .and_then(|_| stdin.flush())
            .unwrap();
    }

    /// Closes stdin: a subscribe client cancels its calls, a connect
    /// client half-closes its call.
    fn close_stdin(&mut self) {
        self.io.stdin = None;
    }

    /// Waits (safety net only) for the process to exit.
    fn wait_exit(&mut self) {
        let deadline = Instant::now() + IO_TIMEOUT;
        while self.io.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                self.fail("still running");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// grpcio Subscribe calls on one channel to `target`; `args` as client.py
/// takes them (`--channel`, `--call a,b`, `--since`, `--token`, ...).
fn grpc_subscribe(target: SocketAddr, args: &[&str]) -> Py {
    let mut argv = vec!["subscribe".to_string(), target.to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    Py::spawn("client.py", &argv)
}

/// One grpcio Subscribe call for `channels`.
fn subscribe(target: SocketAddr, channels: &[&str]) -> Py {
    let args: Vec<&str> = channels.iter().flat_map(|c| ["--channel", c]).collect();
    grpc_subscribe(target, &args)
}

/// A grpcio Connect call, with `token` as a bearer if given.
fn grpc_connect(target: SocketAddr, token: Option<&str>) -> Py {
    let mut argv = vec!["connect".to_string(), target.to_string()];
    if let Some(t) = token {
        argv.extend(["--token".to_string(), t.to_string()]);
    }
    Py::spawn("client.py", &argv)
}

/// The raw HTTP/2 client, `cmd` one of h2_abuse.py's subcommands.
fn h2_abuse(cmd: &str, target: SocketAddr, args: &[&str]) -> Py {
    let mut argv = vec![cmd.to_string(), target.to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    Py::spawn("h2_abuse.py", &argv)
}

// ---------------------------------------------------------------------------
// Frames as the scripts print them
// ---------------------------------------------------------------------------

fn kind(v: &Value) -> &str {
    v["type"].as_str().unwrap_or("")
}

fn payload(v: &Value) -> Vec<u8> {
    base64_decode(
        v["payload"]
            .as_str()
            .unwrap_or_else(|| panic!("no payload: {v}")),
    )
    .unwrap_or_else(|| panic!("payload is not base64: {v}"))
}

fn text(v: &Value) -> String {
    String::from_utf8_lossy(&payload(v)).into_owned()
}

fn id(v: &Value) -> u64 {
    v["id"].as_u64().unwrap_or_else(|| panic!("no id: {v}"))
}

/// (channel, payload as text) of a message frame.
fn message(v: &Value) -> (String, String) {
    assert_eq!(kind(v), "message", "a message frame: {v}");
    (v["channel"].as_str().unwrap().to_string(), text(v))
}

fn is_probe(v: &Value) -> bool {
    kind(v) == "message" && payload(v) == b"probe"
}

/// Publishes `probe` to `to` until `client` prints a message carrying it:
/// the publisher's subscription has arrived (ZeroMQ's slow joiner) and the
/// gateway has the stream. Later probes may still come: [`next_real`]
/// skips them.
fn join(publisher: &Publisher, to: &str, client: &mut Py) {
    join_all(publisher, to, client, "call", 1);
}

/// [`join`] for `streams` streams of one client (told apart by `key`:
/// `call` for grpcio, `stream` for the raw client), until each has one.
fn join_all(publisher: &Publisher, to: &str, client: &mut Py, key: &str, streams: usize) {
    let deadline = Instant::now() + PROBE_BUDGET;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < streams {
        if Instant::now() > deadline {
            client.fail(&format!(
                "{to}: {} of {streams} streams had a probe within {PROBE_BUDGET:?}",
                seen.len()
            ));
        }
        publisher.publish(to, b"probe");
        while let Some(v) = client.next_within(PROBE_INTERVAL) {
            if is_probe(&v) {
                seen.insert(v[key].to_string());
            } else if matches!(kind(&v), "message" | "gap" | "status" | "reset" | "closed") {
                client.fail(&format!("{v} while waiting for a probe"));
            }
        }
    }
}

/// The next line that is not a probe message.
fn next_real(client: &mut Py) -> Value {
    loop {
        let v = client.next();
        if !is_probe(&v) {
            return v;
        }
    }
}

/// The next non-message frame (ack, error, welcome, status), and the
/// messages before it (probes left out).
fn next_control(client: &mut Py) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let v = next_real(client);
        if kind(&v) == "message" {
            before.push(v);
        } else {
            return (v, before);
        }
    }
}

/// The raw client's next line that ends its stream: trailers, a response
/// that is only a status (gRPC's Trailers-Only), a reset, the connection's
/// end. Messages, SETTINGS, PINGs and the response head are passed over.
fn raw_stream_end(client: &mut Py) -> Value {
    loop {
        let v = client.next();
        match kind(&v) {
            "message" | "settings" | "ping" => {}
            "response" if v["headers"].get("grpc-status").is_none() => {}
            _ => return v,
        }
    }
}

/// Reads to the call's end (whatever came before it: a welcome, messages)
/// and checks its status and that its message contains `details`;
/// returns the status line.
fn expect_status(client: &mut Py, code: &str, details: &str) -> Value {
    let mut before = Vec::new();
    let status = loop {
        let v = next_real(client);
        if kind(&v) == "status" {
            break v;
        }
        before.push(v);
    };
    assert_eq!(
        status["code"], code,
        "{}: the call's end: {status} (after {before:?})",
        client.what
    );
    let got = status["details"].as_str().unwrap_or("");
    assert!(
        got.contains(details),
        "{}: the status message says why ({details:?}): {status}",
        client.what
    );
    status
}

// ---------------------------------------------------------------------------
// Tokens and metrics
// ---------------------------------------------------------------------------

const SECRET: &str = "grpc-tests-hs256-secret-of-32-bytes-or-more";

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token for `sub` reading `channels` and sending on `send`,
/// with `extra` claims, expiring at `exp`, signed with `secret`.
fn token_with(
    secret: &str,
    sub: &str,
    channels: &[&str],
    send: &[&str],
    extra: Value,
    exp: u64,
) -> String {
    let mut claims = json!({"sub": sub, "exp": exp, "channels": channels, "send": send});
    if let (Value::Object(c), Value::Object(e)) = (&mut claims, extra) {
        c.extend(e);
    }
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("hs".into());
    encode(
        &header,
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn token(sub: &str, channels: &[&str], send: &[&str], extra: Value) -> String {
    token_with(SECRET, sub, channels, send, extra, now_s() + 3600)
}

/// A gateway with auth on (no leeway, so that an expired token is one),
/// an upstream socket bound on a free port, and `extra` flags.
fn auth_gateway(extra: &[&str]) -> Gateway {
    let secret = format!("hs={SECRET}");
    let mut args = vec![
        "--cores",
        "1",
        "--auth",
        "--auth-hs256-secret",
        &secret,
        "--auth-leeway-s",
        "0",
        "--upstream-bind",
        "tcp://127.0.0.1:*",
    ];
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

/// The sum of the samples of `name` on `admin` whose labels include
/// `label` (all of them for ""); 0 when there is none.
fn metric_sum(admin: SocketAddr, name: &str, label: &str) -> f64 {
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
        .sum()
}

/// Scrapes until `done` holds for the sum (the cores publish their gauges
/// once a second; there is nothing else to wait for), for at most 10 s.
fn wait_metric(admin: SocketAddr, name: &str, label: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric_sum(admin, name, label);
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

// ---------------------------------------------------------------------------
// Subscribe
// ---------------------------------------------------------------------------

#[test]
fn subscribe_delivers_text_and_binary_payloads_in_order_with_the_ids_a_websocket_gets() {
    let gw = Gateway::start(&["--cores", "1"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let mut client = subscribe(gw.listen, &["news", "sport", PROBE_CHANNEL]);
    join(&publisher, PROBE_CHANNEL, &mut client);
    // A WebSocket on the same channels: the same messages, the same ids.
    let mut witness = gw.ws("/ws?channel=news&channel=sport");

    let large: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let sent: Vec<(&str, Vec<u8>, &str, bool)> = vec![
        ("news", b"hello".to_vec(), "", false),
        // Not UTF-8: flagged binary, bytes untouched.
        ("sport", vec![0xff, 0x00, 0xfe, 0x80, b'\n'], "", true),
        ("news", "ünïcödé ✓".as_bytes().to_vec(), "", false),
        ("sport", b"scored".to_vec(), "goal", false),
        // Larger than an HTTP/2 frame and than the default stream window.
        ("news", large.clone(), "", false),
        ("news", b"last".to_vec(), "", false),
    ];
    for (channel, payload, event, _) in &sent {
        if event.is_empty() {
            publisher.publish(channel, payload);
        } else {
            publisher.publish_event(channel, payload, event);
        }
    }
    let got: Vec<Value> = (0..sent.len()).map(|_| next_real(&mut client)).collect();
    let seen = witness.deliveries(sent.len());
    for (i, ((channel, bytes, event, binary), (g, w))) in
        sent.iter().zip(got.iter().zip(&seen)).enumerate()
    {
        assert_eq!(kind(g), "message", "frame {i}: {g}");
        assert_eq!(g["channel"], *channel, "frame {i}: {g}");
        assert!(payload(g) == *bytes, "frame {i}: payload altered: {g}");
        assert_eq!(g["binary"], *binary, "frame {i}: the binary flag: {g}");
        assert_eq!(g["event"], *event, "frame {i}: the event name: {g}");
        assert_eq!(Some(id(g)), w.id, "frame {i}: the WebSocket's id: {w:?}");
        assert_eq!(w.binary, *binary, "frame {i}: the WebSocket frame type");
    }
    let got_ids: Vec<u64> = got.iter().map(id).collect();
    assert_strictly_increasing(&got_ids, "gRPC ids");
}

#[test]
fn subscribe_with_since_replays_the_history_and_a_gap_where_it_does_not_reach_back() {
    // One core, so that "the witness has it" implies "the history has it"
    // (as in the WebSocket resume tests).
    let gw = Gateway::start(&["--cores", "1", "--history-messages", "5"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let mut witness = gw.ws("/ws?channel=hist&channel=fresh");
    publisher.publish("hist", b"h1");
    publisher.publish("fresh", b"f1");
    publisher.publish("fresh", b"f2");
    for k in 2..=20 {
        publisher.publish("hist", format!("h{k}").as_bytes());
    }
    let seen = witness.deliveries(22);
    let id_of = |p: &str| seen.iter().find(|d| d.text() == p).unwrap().id.unwrap();
    let id1 = id_of("h1").to_string();
    let id15 = id_of("h15").to_string();
    let last5: Vec<(String, String)> = (16..=20)
        .map(|k| ("hist".to_string(), format!("h{k}")))
        .collect();

    // From h1: the history keeps h16..h20 only, so a gap first.
    let mut from_h1 = grpc_subscribe(gw.listen, &["--channel", "hist", "--since", &id1]);
    let gap = from_h1.next();
    assert_eq!(
        (kind(&gap), gap["channel"].as_str()),
        ("gap", Some("hist")),
        "the first frame after an evicted cursor is the gap: {gap}"
    );
    let replay: Vec<Value> = (0..5).map(|_| from_h1.next()).collect();
    assert_eq!(replay.iter().map(message).collect::<Vec<_>>(), last5);
    let want_ids: Vec<u64> = (16..=20).map(|k| id_of(&format!("h{k}"))).collect();
    assert_eq!(replay.iter().map(id).collect::<Vec<_>>(), want_ids);

    // Two channels, one of which lost messages: the gap names only it, and
    // the other's history after the cursor is all there.
    let mut both = grpc_subscribe(
        gw.listen,
        &["--channel", "hist", "--channel", "fresh", "--since", &id1],
    );
    let gap = both.next();
    assert_eq!(
        (kind(&gap), gap["channel"].as_str()),
        ("gap", Some("hist")),
        "{gap}"
    );
    let replay: Vec<(String, String)> = (0..7).map(|_| message(&both.next())).collect();
    let of = |c: &str| -> Vec<(String, String)> {
        replay.iter().filter(|(ch, _)| ch == c).cloned().collect()
    };
    assert_eq!(of("hist"), last5, "{replay:?}");
    assert_eq!(
        of("fresh"),
        [("fresh".into(), "f1".into()), ("fresh".into(), "f2".into())],
        "{replay:?}"
    );

    // From h15 the history lacks nothing: no gap, h16..h20.
    let mut from_h15 = grpc_subscribe(gw.listen, &["--channel", "hist", "--since", &id15]);
    let replay: Vec<(String, String)> = (0..5).map(|_| message(&from_h15.next())).collect();
    assert_eq!(replay, last5);

    // Live right after the replay, nothing in between.
    publisher.publish("hist", b"h21");
    let h21 = witness.next_delivery();
    for (who, client) in [("from h1", &mut from_h1), ("from h15", &mut from_h15)] {
        let v = client.next();
        assert_eq!(message(&v), ("hist".into(), "h21".into()), "{who}: {v}");
        assert_eq!(Some(id(&v)), h21.id, "{who}: {v}");
    }
    let v = both.next();
    assert_eq!(message(&v), ("hist".into(), "h21".into()), "{v}");
    drop(probe);
}

#[test]
fn several_calls_share_one_http2_connection_and_are_counted_as_grpc() {
    let admin = free_addr();
    let admin_arg = admin.to_string();
    let gw = Gateway::start(&["--cores", "1", "--admin-listen", &admin_arg]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    // Three calls on one grpcio channel: one connection, three streams.
    let mut client = grpc_subscribe(
        gw.listen,
        &[
            "--call",
            "a,b,probe",
            "--call",
            "b,probe",
            "--call",
            "c,probe",
        ],
    );
    join_all(&publisher, PROBE_CHANNEL, &mut client, "call", 3);

    for (channel, p) in [("a", "a1"), ("b", "b1"), ("c", "c1"), ("a", "a2")] {
        publisher.publish(channel, p.as_bytes());
    }
    // The end of each channel, so that nothing more can be on its way.
    for channel in ["a", "b", "c"] {
        publisher.publish(channel, b"end");
    }
    let mut per_call: Vec<Vec<(String, String)>> = vec![Vec::new(); 3];
    let ends_wanted = [2, 1, 1];
    let mut ends = [0; 3];
    while ends != ends_wanted {
        let v = next_real(&mut client);
        let call = v["call"].as_u64().unwrap() as usize;
        let m = message(&v);
        if m.1 == "end" {
            ends[call] += 1;
            assert!(ends[call] <= ends_wanted[call], "call {call}: {v}");
        } else {
            per_call[call].push(m);
        }
    }
    let m = |c: &str, p: &str| (c.to_string(), p.to_string());
    assert_eq!(per_call[0], [m("a", "a1"), m("b", "b1"), m("a", "a2")]);
    assert_eq!(per_call[1], [m("b", "b1")]);
    assert_eq!(per_call[2], [m("c", "c1")]);

    // One HTTP/2 connection, counted as gRPC, carrying three streams.
    let grpc = r#"transport="grpc""#;
    wait_metric(admin, "gateway_connections", grpc, |v| v == 1.0);
    wait_metric(admin, "gateway_grpc_streams", "", |v| v == 3.0);
    assert_eq!(
        metric_sum(admin, "gateway_connections", r#"transport="websocket""#),
        0.0,
        "a gRPC connection is not counted as a WebSocket"
    );

    // The client goes: its streams end, and so does the connection.
    client.close_stdin();
    for _ in 0..3 {
        let v = client.next();
        assert_eq!(kind(&v), "status", "{v}");
    }
    client.wait_exit();
    wait_metric(admin, "gateway_connections", grpc, |v| v == 0.0);
    wait_metric(admin, "gateway_grpc_streams", "", |v| v == 0.0);
    // Ended by the client: counted as CANCELLED, each of the three.
    wait_metric(
        admin,
        "gateway_grpc_stream_ends_total",
        r#"code="CANCELLED""#,
        |v| v == 3.0,
    );
}

#[test]
fn tokens_are_checked_with_the_grpc_status_codes_naming_the_reason() {
    let gw = auth_gateway(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let expired = token_with(SECRET, "eve", &["news"], &[], json!({}), now_s() - 60);
    let forged = token_with(
        "another-secret-of-thirty-two-bytes-or-more",
        "eve",
        &["news"],
        &[],
        json!({}),
        now_s() + 3600,
    );
    let news_only = token("eve", &["news"], &[], json!({}));
    // All at once: each is its own connection.
    let mut refused: Vec<(Py, &str, &str)> = vec![
        (
            subscribe(gw.listen, &["news"]),
            "UNAUTHENTICATED",
            "missing token",
        ),
        (
            grpc_subscribe(gw.listen, &["--channel", "news", "--token", &forged]),
            "UNAUTHENTICATED",
            "bad signature",
        ),
        (
            grpc_subscribe(gw.listen, &["--channel", "news", "--token", &expired]),
            "UNAUTHENTICATED",
            "token expired",
        ),
        (
            grpc_subscribe(
                gw.listen,
                &[
                    "--channel",
                    "news",
                    "--channel",
                    "sport",
                    "--token",
                    &news_only,
                ],
            ),
            "PERMISSION_DENIED",
            "channel not allowed",
        ),
        (
            grpc_subscribe(
                gw.listen,
                &[
                    "--channel",
                    "news",
                    "--metadata",
                    "authorization=Basic ZXZlOmV2ZQ==",
                ],
            ),
            "UNAUTHENTICATED",
            "",
        ),
        (
            grpc_connect(gw.listen, None),
            "UNAUTHENTICATED",
            "missing token",
        ),
    ];
    for (client, code, why) in &mut refused {
        // Nothing before the status: no message, no welcome.
        let v = client.next();
        assert_eq!(kind(&v), "status", "{}: {v}", client.what);
        assert_eq!(v["code"], *code, "{}: {v}", client.what);
        assert!(
            v["details"].as_str().unwrap_or("").contains(*why),
            "{}: the status message says {why:?}: {v}",
            client.what
        );
    }

    // A valid token is let through, and delivers.
    let t = token("eve", &["news", PROBE_CHANNEL], &[], json!({}));
    let mut ok = grpc_subscribe(
        gw.listen,
        &[
            "--channel",
            "news",
            "--channel",
            PROBE_CHANNEL,
            "--token",
            &t,
        ],
    );
    join(&publisher, PROBE_CHANNEL, &mut ok);
    publisher.publish("news", b"for eve");
    assert_eq!(
        message(&next_real(&mut ok)),
        ("news".into(), "for eve".into())
    );
}

#[test]
fn a_stream_whose_token_expires_ends_unauthenticated() {
    let gw = auth_gateway(&[]);
    let soon = now_s() + 2;
    let t = token_with(SECRET, "eve", &["news"], &[], json!({}), soon);
    let mut client = grpc_subscribe(gw.listen, &["--channel", "news", "--token", &t]);
    expect_status(&mut client, "UNAUTHENTICATED", "token expired");
    assert!(now_s() >= soon, "ended before the token expired");
}

// ---------------------------------------------------------------------------
// Ends of a stream
// ---------------------------------------------------------------------------

const SLOW_MESSAGES: usize = 300;
const SLOW_PAYLOAD_BYTES: usize = 10_000;
/// Published at a time; the next batch waits until the fast client has the
/// previous one (so the test measures the gateway, not ZeroMQ's queue).
const SLOW_BATCH: usize = 50;

fn bulk(i: usize) -> Vec<u8> {
    let mut p = format!("{i:06}:").into_bytes();
    p.resize(SLOW_PAYLOAD_BYTES, b'x');
    p
}

#[test]
fn a_stream_that_stops_reading_ends_resource_exhausted_while_a_fast_one_gets_everything() {
    let admin = free_addr();
    let admin_arg = admin.to_string();
    let gw = Gateway::start(&[
        "--cores",
        "1",
        "--outbound-queue-bytes-max",
        "1000000",
        "--admin-listen",
        &admin_arg,
    ]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let mut fast = subscribe(gw.listen, &["bulk", PROBE_CHANNEL]);
    // The slow one grants a 4 KiB stream window and never a byte more (no
    // WINDOW_UPDATE): the gateway can send it a probe or two, then nothing.
    let mut slow = h2_abuse(
        "slow",
        gw.listen,
        &[
            "--window",
            "4096",
            "--channel",
            "bulk",
            "--channel",
            PROBE_CHANNEL,
        ],
    );
    join(&publisher, PROBE_CHANNEL, &mut fast);
    join_all(&publisher, PROBE_CHANNEL, &mut slow, "stream", 1);

    let rss_start = gw.rss_bytes();
    let mut slow_lines = Vec::new();
    for batch in 0..SLOW_MESSAGES / SLOW_BATCH {
        for i in batch * SLOW_BATCH..(batch + 1) * SLOW_BATCH {
            publisher.publish("bulk", &bulk(i));
        }
        for i in batch * SLOW_BATCH..(batch + 1) * SLOW_BATCH {
            let v = next_real(&mut fast);
            assert_eq!(kind(&v), "message", "the fast client, message {i}: {v}");
            assert!(
                payload(&v) == bulk(i),
                "the fast client: message {i} out of order or altered: {}",
                &text(&v)[..8]
            );
        }
        while let Some(v) = slow.poll() {
            slow_lines.push(v);
        }
    }
    let rss = gw.rss_bytes();
    assert!(
        rss < rss_start + (64 << 20),
        "gateway RSS grew from {rss_start} to {rss} bytes"
    );

    // The slow stream was ended with its status, in trailers (HEADERS are
    // not flow-controlled: the closed window does not hold them back).
    let ended = slow_lines
        .iter()
        .position(|v| !matches!(kind(v), "message" | "response" | "settings" | "ping"));
    let end = match ended {
        Some(i) => slow_lines.swap_remove(i),
        None => raw_stream_end(&mut slow),
    };
    assert_eq!(
        kind(&end),
        "trailers",
        "the slow stream ends with grpc-status trailers, not {end}"
    );
    assert_eq!(
        end["headers"]["grpc-status"], "8",
        "RESOURCE_EXHAUSTED: {end}"
    );
    assert_eq!(end["headers"]["grpc-message"], "slow consumer", "{end}");
    wait_metric(
        admin,
        "gateway_grpc_stream_ends_total",
        r#"code="RESOURCE_EXHAUSTED""#,
        |v| v == 1.0,
    );
    // The fast one is still served.
    publisher.publish("bulk", b"after");
    assert_eq!(
        message(&next_real(&mut fast)),
        ("bulk".into(), "after".into())
    );
}

const DRAIN_CHANNEL: &str = "drain";
/// The publisher numbers its messages BASE_ID + 1, BASE_ID + 2, ...: the
/// same ids on both gateways, so a cursor from one is good on the other.
const BASE_ID: u64 = 7_000_000;
const DRAIN_WINDOW_MS: u64 = 1_000;

#[test]
fn a_drain_ends_streams_unavailable_with_a_pushback_and_the_client_resumes_on_another_gateway() {
    let publisher = Publisher::bind();
    let endpoint = publisher.endpoint.clone();
    let window = DRAIN_WINDOW_MS.to_string();
    let start = |extra: &[&str]| {
        let mut args = vec![
            "--cores",
            "1",
            "--zmq-bind",
            "",
            "--zmq-connect",
            endpoint.as_str(),
            // Ample history: the resume never depends on how fast the
            // client came back.
            "--history-messages",
            "5000",
        ];
        args.extend_from_slice(extra);
        Gateway::start(&args)
    };
    let mut a = start(&["--drain-window-ms", &window]);
    let b = start(&[]);
    let probe = wait_for_subscription(&publisher, &[&a, &b]);
    let mut on_a = subscribe(a.listen, &[DRAIN_CHANNEL]);

    // Continuous traffic through the drain, with the publisher's ids,
    // until told to stop; then `end`.
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut k = 0;
            loop {
                k += 1;
                if stop.load(Ordering::Acquire) {
                    publisher.publish_with_id(DRAIN_CHANNEL, b"end", BASE_ID + k);
                    return BASE_ID + k;
                }
                publisher.publish_with_id(DRAIN_CHANNEL, format!("m{k}").as_bytes(), BASE_ID + k);
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut ids_got = Vec::new();
    let first = on_a.next();
    assert_eq!(kind(&first), "message", "{first}");
    ids_got.push(id(&first));

    a.signal(libc::SIGTERM);
    let status = loop {
        let v = on_a.next();
        match kind(&v) {
            "message" => ids_got.push(id(&v)),
            _ => break v,
        }
    };
    assert_eq!(
        (kind(&status), status["code"].as_str()),
        ("status", Some("UNAVAILABLE")),
        "the drain ends the stream: {status}"
    );
    assert!(
        status["details"]
            .as_str()
            .unwrap_or("")
            .contains("draining"),
        "{status}"
    );
    // When to come back; checked last, once the resume is.
    let pushback: u64 = status["trailers"]["grpc-retry-pushback-ms"]
        .as_str()
        .unwrap_or_else(|| panic!("no grpc-retry-pushback-ms trailer: {status}"))
        .parse()
        .unwrap_or_else(|e| panic!("grpc-retry-pushback-ms is not a number ({e}): {status}"));

    // Resume on B from the last id A gave.
    let last = ids_got.last().unwrap().to_string();
    let mut on_b = grpc_subscribe(b.listen, &["--channel", DRAIN_CHANNEL, "--since", &last]);
    let v = on_b.next();
    assert_eq!(kind(&v), "message", "no gap: B has the history: {v}");
    ids_got.push(id(&v));
    stop.store(true, Ordering::Release);
    let end_id = publishing.join().expect("publisher thread");
    loop {
        let v = on_b.next();
        assert_eq!(kind(&v), "message", "{v}");
        ids_got.push(id(&v));
        if text(&v) == "end" {
            break;
        }
    }
    // Every message from the first to the end, once each, in order.
    let want: Vec<u64> = (ids_got[0]..=end_id).collect();
    if ids_got != want {
        let missing: Vec<u64> = want
            .iter()
            .filter(|i| !ids_got.contains(i))
            .copied()
            .collect();
        panic!(
            "got {} messages, want {}; missing {missing:?}; ids {ids_got:?}",
            ids_got.len(),
            want.len()
        );
    }
    let exit = a
        .wait_exit(Duration::from_secs(15))
        .expect("the drained gateway still running");
    assert!(exit.success(), "the drained gateway exited with {exit}");
    // Asked to go one by one over the drain window, the clients come back
    // at a random point of the window an SSE client's `retry:` names.
    assert!(
        (1_000..=5_000).contains(&pushback),
        "grpc-retry-pushback-ms {pushback} is not between 1 and 5 s: {status}"
    );
    drop(probe);
}

#[test]
fn a_peer_that_never_acks_pings_is_closed_while_one_that_does_stays() {
    let gw = Gateway::start(&[
        "--cores",
        "1",
        "--heartbeat-interval-ms",
        "1000",
        "--pong-timeout-ms",
        "1000",
    ]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    // grpcio acks every PING: a live client that says nothing else.
    let mut alive = subscribe(gw.listen, &["quiet", PROBE_CHANNEL]);
    join(&publisher, PROBE_CHANNEL, &mut alive);
    // Opens its call, then never writes a byte: no PING ack.
    let mut dead = h2_abuse("deadpeer", gw.listen, &["--channel", "quiet"]);
    let mut pings = 0;
    let end = loop {
        let v = dead.next();
        match kind(&v) {
            "ping" => pings += 1,
            "settings" | "response" | "goaway" => {}
            _ => break v,
        }
    };
    assert_eq!(
        kind(&end),
        "closed",
        "the dead peer's connection is closed: {end}"
    );
    assert!(pings >= 1, "the gateway PINGed before closing: {pings}");
    // The live one was as quiet for as long, and is still there.
    publisher.publish("quiet", b"still here");
    assert_eq!(
        message(&next_real(&mut alive)),
        ("quiet".into(), "still here".into())
    );
}

// ---------------------------------------------------------------------------
// Connect, the second listener, other methods
// ---------------------------------------------------------------------------

#[test]
fn a_connect_stream_chats_with_a_websocket_client_through_a_hub() {
    let gw = auth_gateway(&["--upstream-claim", "name"]);
    let hub = gw.hub();
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let alice_token = token("alice", &["room.*"], &["room.*"], json!({"name": "Alice"}));
    let bob_token = token("bob", &["room.*"], &["room.*"], json!({"name": "Bob"}));
    let mut alice = gw.two_way("/ws?channel=room.1", Some(&alice_token));
    let mut bob = grpc_connect(gw.listen, Some(&bob_token));
    bob.send(json!({"subscribe": {"channels": ["room.1"], "ref": "s"}}));
    let welcome = bob.next();
    assert_eq!(kind(&welcome), "welcome", "the first frame: {welcome}");
    let bob_address = welcome["address"].as_str().unwrap().to_string();
    assert_eq!(bob_address.len(), alice.address.len(), "{welcome}");
    assert_ne!(bob_address, alice.address);
    let ack = bob.next();
    assert_eq!(
        (kind(&ack), ack["ref"].as_str()),
        ("ack", Some("s")),
        "{ack}"
    );
    // A reply to one connection reaches the gRPC stream as it does a
    // WebSocket.
    ws_join(&publisher, &format!("!{}", alice.address), &mut alice);
    join(&publisher, &format!("!{bob_address}"), &mut bob);

    // Alice speaks: the hub republishes to the room, both hear it.
    alice.send("room.1", Some("r1"), "hi bob");
    assert_eq!(alice.next_control().0, json!({"type": "ack", "ref": "r1"}));
    let m = hub.next_of("message");
    assert_eq!(m.meta["transport"], "websocket", "{:?}", m.meta);
    publisher.publish("room.1", format!("alice: {}", m.text()).as_bytes());
    assert_eq!(ws_next_real(&mut alice).message().1, "alice: hi bob");
    assert_eq!(
        message(&next_real(&mut bob)),
        ("room.1".into(), "alice: hi bob".into())
    );

    // Bob speaks over gRPC: acked, handed to the hub with who sent it.
    bob.send(json!({"send": {"channel": "room.1", "ref": "r2", "payload": "hi alice"}}));
    let (ack, before) = next_control(&mut bob);
    assert_eq!(
        (kind(&ack), ack["ref"].as_str()),
        ("ack", Some("r2")),
        "{ack} after {before:?}"
    );
    let m = hub.next_of("message");
    assert_eq!(
        (m.address.as_str(), m.channel.as_str(), m.text().as_str()),
        (bob_address.as_str(), "room.1", "hi alice")
    );
    assert_eq!(m.meta["transport"], "grpc", "{}", m.meta);
    assert_eq!(m.meta["sub"], "bob", "{}", m.meta);
    assert_eq!(m.meta["claims"], json!({"name": "Bob"}), "{}", m.meta);
    assert_eq!(m.meta["binary"], false, "{}", m.meta);
    publisher.publish("room.1", format!("bob: {}", m.text()).as_bytes());
    assert_eq!(ws_next_real(&mut alice).message().1, "bob: hi alice");
    assert_eq!(
        message(&next_real(&mut bob)),
        ("room.1".into(), "bob: hi alice".into())
    );

    // Binary payloads reach the hub as bytes, flagged.
    let bytes = [0xffu8, 0x00, 0x10];
    bob.send(json!({"send": {"channel": "room.1", "ref": "r3",
        "payload_b64": base64_encode(&bytes), "binary": true}}));
    assert_eq!(next_control(&mut bob).0["ref"], "r3");
    let m = hub.next_of("message");
    assert_eq!(
        (m.payload.as_slice(), &m.meta["binary"]),
        (&bytes[..], &json!(true))
    );

    // Refusals name the rule and the stream goes on.
    bob.send(json!({"send": {"channel": "news", "ref": "r4", "payload": "x"}}));
    let (err, _) = next_control(&mut bob);
    assert_eq!(
        (
            kind(&err),
            err["ref"].as_str(),
            err["reason"].as_str(),
            err["channel"].as_str()
        ),
        (
            "error",
            Some("r4"),
            Some("channel not allowed"),
            Some("news")
        ),
        "{err}"
    );
    bob.send(json!({"subscribe": {"channels": ["secret"], "ref": "r5"}}));
    let (err, _) = next_control(&mut bob);
    assert_eq!(
        (kind(&err), err["ref"].as_str(), err["reason"].as_str()),
        ("error", Some("r5"), Some("channel not allowed")),
        "{err}"
    );

    // Unsubscribed, the room's messages stop; replies to the stream do not.
    bob.send(json!({"unsubscribe": {"channels": ["room.1"], "ref": "u"}}));
    assert_eq!(next_control(&mut bob).0["ref"], "u");
    publisher.publish("room.1", b"not for bob");
    publisher.publish(&format!("!{bob_address}"), b"for bob");
    assert_eq!(text(&next_real(&mut bob)), "for bob");

    // Closing its side ends the call cleanly.
    bob.close_stdin();
    let end = next_real(&mut bob);
    assert_eq!(
        (kind(&end), end["code"].as_str()),
        ("status", Some("OK")),
        "{end}"
    );
}

/// Publishes `probe` to `to` until the WebSocket client gets one.
fn ws_join(publisher: &Publisher, to: &str, client: &mut TwoWayClient) {
    let deadline = Instant::now() + PROBE_BUDGET;
    loop {
        assert!(
            Instant::now() < deadline,
            "{to}: no probe within {PROBE_BUDGET:?}"
        );
        publisher.publish(to, b"probe");
        if let Some(f) = client.try_next_frame(PROBE_INTERVAL) {
            assert_eq!(f.message().1, "probe", "{to}: {f:?}");
            return;
        }
    }
}

fn ws_next_real(client: &mut TwoWayClient) -> WsFrame {
    loop {
        let f = client.next_frame();
        if !matches!(&f, WsFrame::Message { payload, .. } if payload == b"probe") {
            return f;
        }
    }
}

#[test]
fn the_grpc_listener_serves_the_service_and_unknown_methods_are_unimplemented() {
    let gw = Gateway::start(&["--cores", "1", "--grpc-listen", "127.0.0.1:0"]);
    let grpc_addr = gw
        .grpc
        .unwrap_or_else(|| panic!("no grpc= on the READY line: {}", gw.ready_line));
    assert_ne!(grpc_addr, gw.listen);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    // The public listener serves gRPC too.
    let mut on_grpc = subscribe(grpc_addr, &["news", PROBE_CHANNEL]);
    let mut on_public = subscribe(gw.listen, &["news", PROBE_CHANNEL]);
    join(&publisher, PROBE_CHANNEL, &mut on_grpc);
    join(&publisher, PROBE_CHANNEL, &mut on_public);
    publisher.publish("news", b"both");
    let a = next_real(&mut on_grpc);
    let b = next_real(&mut on_public);
    assert_eq!(message(&a), ("news".into(), "both".into()));
    assert_eq!((message(&b), id(&b)), (message(&a), id(&a)));

    let mut unknown = grpc_subscribe(
        grpc_addr,
        &[
            "--channel",
            "news",
            "--method",
            "/gateway.v1.Gateway/Publish",
        ],
    );
    expect_status(&mut unknown, "UNIMPLEMENTED", "");

    // Connect without upstream: it subscribes, but what it sends has
    // nowhere to go.
    let mut c = grpc_connect(grpc_addr, None);
    c.send(json!({"subscribe": {"channels": ["news"], "ref": "s"}}));
    assert_eq!(kind(&c.next()), "welcome");
    assert_eq!(
        next_control(&mut c).0,
        json!({"call": 0, "type": "ack", "ref": "s"})
    );
    c.send(json!({"send": {"channel": "news", "ref": "m", "payload": "hello"}}));
    let (err, _) = next_control(&mut c);
    assert_eq!(
        (kind(&err), err["ref"].as_str(), err["reason"].as_str()),
        ("error", Some("m"), Some("upstream not configured")),
        "{err}"
    );
    publisher.publish("news", b"to connect");
    assert_eq!(
        message(&next_real(&mut c)),
        ("news".into(), "to connect".into())
    );
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// HTTP/2 SETTINGS and error codes (RFC 9113).
const SETTINGS_MAX_CONCURRENT_STREAMS: &str = "3";
const SETTINGS_MAX_HEADER_LIST_SIZE: &str = "6";
const REFUSED_STREAM: u64 = 7;
const ENHANCE_YOUR_CALM: u64 = 11;

#[test]
fn streams_over_the_limit_are_refused_and_the_others_carry_on() {
    let gw = Gateway::start(&["--cores", "1", "--grpc-streams-per-connection-max", "4"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    // Five calls at once on one connection, the gateway's limit ignored.
    let mut raw = h2_abuse(
        "streams",
        gw.listen,
        &["--count", "5", "--channel", PROBE_CHANNEL],
    );
    let settings = raw.next();
    assert_eq!(kind(&settings), "settings", "{settings}");
    assert_eq!(
        settings["settings"][SETTINGS_MAX_CONCURRENT_STREAMS], 4,
        "the limit is announced: {settings}"
    );
    // Streams 1, 3, 5, 7 are served; 9 is refused.
    let deadline = Instant::now() + PROBE_BUDGET;
    let mut served = std::collections::BTreeSet::new();
    let mut refused = None;
    while served.len() < 4 || refused.is_none() {
        assert!(
            Instant::now() < deadline,
            "served {served:?}, refused {refused:?}"
        );
        publisher.publish(PROBE_CHANNEL, b"probe");
        while let Some(v) = raw.next_within(PROBE_INTERVAL) {
            let stream = v["stream"].as_u64();
            match kind(&v) {
                "message" => {
                    assert_ne!(stream, Some(9), "the fifth stream is served: {v}");
                    served.insert(stream.unwrap());
                }
                "reset" => {
                    assert_eq!(
                        (stream, v["code"].as_u64()),
                        (Some(9), Some(REFUSED_STREAM)),
                        "only the fifth stream is reset, REFUSED_STREAM: {v}"
                    );
                    refused = stream;
                }
                "response" => {}
                _ => raw.fail(&format!("{v}")),
            }
        }
    }
    assert_eq!(served.into_iter().collect::<Vec<_>>(), [1, 3, 5, 7]);
}

#[test]
fn a_header_list_over_the_limit_is_refused_and_one_under_it_is_not() {
    let gw = Gateway::start(&["--cores", "1", "--grpc-header-list-bytes-max", "4096"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let mut raw = h2_abuse(
        "bigheaders",
        gw.listen,
        &["--bytes", "8000", "--channel", PROBE_CHANNEL],
    );
    let settings = raw.next();
    assert_eq!(
        settings["settings"][SETTINGS_MAX_HEADER_LIST_SIZE], 4096,
        "the limit is announced: {settings}"
    );
    // Refused: a 431 answer, a reset of the stream, or the connection's
    // end; never a gRPC answer or a message.
    let refusal = loop {
        let v = raw.next();
        match kind(&v) {
            "settings" | "ping" => {}
            _ => break v,
        }
    };
    match kind(&refusal) {
        "response" => {
            assert_ne!(
                refusal["headers"][":status"], "200",
                "a header list over the limit was accepted: {refusal}"
            );
            assert_eq!(refusal["stream"], 1, "{refusal}");
        }
        "reset" => assert_eq!(refusal["stream"], 1, "{refusal}"),
        "goaway" | "closed" => {}
        _ => panic!("a header list over the limit was not refused: {refusal}"),
    }

    // Under the limit (grpcio's own headers and 2000 bytes more): served.
    let pad = format!("x-pad={}", "p".repeat(2000));
    let mut ok = grpc_subscribe(gw.listen, &["--channel", PROBE_CHANNEL, "--metadata", &pad]);
    join(&publisher, PROBE_CHANNEL, &mut ok);
}

#[test]
fn client_messages_over_the_limit_are_resource_exhausted_and_compressed_ones_refused() {
    let gw = Gateway::start(&["--cores", "1", "--grpc-message-bytes-max", "1024"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    // A SubscribeRequest of more than 2000 bytes (valid channel names).
    let mut big = grpc_subscribe(gw.listen, &["--channel", "news", "--pad-bytes", "2000"]);
    // A Connect frame of more than 2000 bytes.
    let mut big_frame = grpc_connect(gw.listen, None);
    big_frame.send(json!({"send": {"channel": "news", "ref": "big", "pad": 2000}}));
    // grpcio compressing with gzip, which the gateway does not speak: gRPC
    // answers an encoding it does not support with UNIMPLEMENTED.
    let mut gzip = grpc_subscribe(
        gw.listen,
        &["--channel", "news", "--pad-bytes", "400", "--gzip"],
    );
    // A message flagged compressed with no encoding named: INTERNAL.
    let mut flagged = h2_abuse("flagged", gw.listen, &["--channel", "news"]);
    // Just under the limit: served.
    let mut under = grpc_subscribe(
        gw.listen,
        &["--channel", PROBE_CHANNEL, "--pad-bytes", "900"],
    );

    expect_status(&mut big, "RESOURCE_EXHAUSTED", "message too large");
    expect_status(&mut big_frame, "RESOURCE_EXHAUSTED", "message too large");
    expect_status(&mut gzip, "UNIMPLEMENTED", "");
    let end = raw_stream_end(&mut flagged);
    assert_eq!(end["headers"]["grpc-status"], "13", "INTERNAL: {end}");
    join(&publisher, PROBE_CHANNEL, &mut under);
}

// ---------------------------------------------------------------------------
// HTTP/2 abuse
// ---------------------------------------------------------------------------

/// What a flood may add to the gateway's RSS: generous (allocator slack,
/// per-connection buffers), far below what an unbounded one would take.
const FLOOD_RSS_GROWTH_MAX: u64 = 64 << 20;

/// Runs the raw client's `attack` against a one-core gateway whose
/// WebSocket and gRPC subscribers must keep receiving, and `/healthz`
/// answering, while it floods and after. Returns its summary line.
fn under_attack(attack: &str, args: &[&str]) -> Value {
    let gw = Gateway::start(&["--cores", "1"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let mut grpc = subscribe(gw.listen, &["live", PROBE_CHANNEL]);
    join(&publisher, PROBE_CHANNEL, &mut grpc);
    let mut ws = gw.ws("/ws?channel=live");
    let rss_start = gw.rss_bytes();
    let mut rss_max = rss_start;

    let mut attacker = h2_abuse(attack, gw.listen, args);
    let started = loop {
        let v = attacker.next();
        if kind(&v) != "settings" {
            break v;
        }
    };
    assert_eq!(kind(&started), "started", "{started}");
    // One round trip at a time, each a publication both subscribers must
    // get, until the attacker reports; then one more.
    let mut summary = None;
    let mut round = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut worst = Duration::ZERO;
    loop {
        round += 1;
        let sent_at = Instant::now();
        let p = format!("round {round}");
        publisher.publish("live", p.as_bytes());
        assert_eq!(ws.next_delivery().text(), p, "the WebSocket subscriber");
        assert_eq!(
            message(&next_real(&mut grpc)),
            ("live".into(), p.clone()),
            "the gRPC subscriber"
        );
        gw.healthz();
        worst = worst.max(sent_at.elapsed());
        rss_max = rss_max.max(gw.rss_bytes());
        if summary.is_some() {
            break;
        }
        while let Some(v) = attacker.poll() {
            if kind(&v) == "summary" {
                summary = Some(v);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{attack}: the attacker did not finish within 30 s"
        );
    }
    assert!(
        rss_max < rss_start + FLOOD_RSS_GROWTH_MAX,
        "{attack}: gateway RSS grew from {rss_start} to {rss_max} bytes"
    );
    let summary = summary.unwrap();
    eprintln!(
        "{attack}: {summary}; {round} round trips, the slowest {worst:?}; RSS {} -> {} MB",
        rss_start >> 20,
        rss_max >> 20
    );
    summary
}

#[test]
fn rapid_reset_gets_enhance_your_calm_and_the_core_goes_on() {
    let summary = under_attack("rapid-reset", &["--count", "20000"]);
    assert_eq!(
        summary["goaway"]["code"], ENHANCE_YOUR_CALM,
        "rapid reset is answered with GOAWAY ENHANCE_YOUR_CALM: {summary}"
    );
    assert!(
        summary["ended"].is_string(),
        "the attacker's connection is closed: {summary}"
    );
}

#[test]
fn a_continuation_flood_ends_the_connection_and_the_core_goes_on() {
    let summary = under_attack("continuation", &["--max-bytes", "67108864"]);
    assert!(
        summary["goaway"].is_object() || summary["ended"].is_string(),
        "an endless header block ends the connection (GOAWAY or close): {summary}"
    );
    assert!(
        summary["bytes_sent"].as_u64().unwrap() < 64 << 20,
        "the gateway read all of an endless header block: {summary}"
    );
}

/// SETTINGS frames written far faster than their ACKs are read: the
/// gateway answers each, and once its answers pile up unread it stops
/// reading the connection (the flood is held back by the attacker's own
/// receive window), or ends it. Either way what it keeps is bounded.
#[test]
fn a_settings_flood_is_bounded_and_the_core_goes_on() {
    // 18 MB of SETTINGS asking for 18 MB of ACKs: more than loopback's
    // socket buffers hold, so an unread answer must hold the flood back.
    let summary = under_attack(
        "settings-flood",
        &[
            "--count",
            "2000000",
            "--write-timeout",
            "1",
            "--end-within",
            "10",
        ],
    );
    let ended = summary["goaway"].is_object() || summary["ended"].is_string();
    let held_back = summary["write_error"] == "blocked";
    assert!(
        ended || held_back,
        "the gateway read a SETTINGS flood whose ACKs were never read to its end, \
         without ending the connection: {summary}"
    );
}
