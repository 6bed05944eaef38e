//! TLS on the public listener, from the outside: a test CA and its
//! certificates are made when the tests run (rcgen), and real TLS clients
//! talk to the gateway: Python's ssl module and the `websockets` package
//! (the script in `tests/tls/`), and curl for SSE and long-poll. Each
//! client prints what it sees as it comes, and the tests read it as it
//! comes: every wait is for something the gateway sent or counted, under
//! the usual safety net.
//!
//! Python 3 with `websockets`, and curl, are requirements of these tests:
//! without them they fail, saying what to install.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use serde_json::{json, Value};

use crate::common::*;

const INSTALL: &str = "python3 -m pip install websockets; apt-get install curl";

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// One certificate the gateway may serve, written out as PEM files.
struct Leaf {
    /// The end-entity certificate, as the client receives it.
    der: Vec<u8>,
    /// Its chain (the certificate, then its issuer's when it has one).
    cert: PathBuf,
    key: PathBuf,
    /// Its `notAfter`, Unix seconds.
    not_after_s: i64,
}

impl Leaf {
    fn cert_path(&self) -> &str {
        self.cert.to_str().expect("a UTF-8 path")
    }

    fn key_path(&self) -> &str {
        self.key.to_str().expect("a UTF-8 path")
    }
}

/// A test CA and the folder its certificates are written to.
struct Pki {
    dir: PathBuf,
    /// The CA's certificate, which the verifying clients trust.
    ca: PathBuf,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A new CA, in a scratch folder of its own for the test `name`.
    fn new(name: &str) -> Pki {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "gateway tests CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = date_time_ymd(2000, 1, 1);
        params.not_after = date_time_ymd(2100, 1, 1);
        let key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &ca_pem).unwrap();
        Pki {
            dir,
            ca,
            ca_pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses) signed
    /// by the CA, valid from 2020 until `until` (year, month, day), written
    /// to `file.pem` (with the CA's certificate after it) and `file.key`.
    fn leaf(&self, file: &str, names: &[&str], serial: u64, until: (i32, u8, u8)) -> Leaf {
        self.make(file, names, serial, (2020, 1, 1), until, true)
    }

    /// [`Pki::leaf`] that expired in 2001.
    fn expired(&self, file: &str, names: &[&str]) -> Leaf {
        self.make(file, names, 3, (2000, 1, 1), (2001, 1, 1), true)
    }

    /// A certificate for `names` that signs itself: no CA the clients
    /// know of vouches for it.
    fn self_signed(&self, file: &str, names: &[&str]) -> Leaf {
        self.make(file, names, 4, (2020, 1, 1), (2099, 1, 1), false)
    }

    fn make(
        &self,
        file: &str,
        names: &[&str],
        serial: u64,
        from: (i32, u8, u8),
        until: (i32, u8, u8),
        by_ca: bool,
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        params.not_before = date_time_ymd(from.0, from.1, from.2);
        params.not_after = date_time_ymd(until.0, until.1, until.2);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let (cert, chain) = if by_ca {
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let chain = format!("{}{}", cert.pem(), self.ca_pem);
            (cert, chain)
        } else {
            let cert = params.self_signed(&key).unwrap();
            let chain = cert.pem();
            (cert, chain)
        };
        let cert_path = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_path, chain).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Leaf {
            der: cert.der().to_vec(),
            cert: cert_path,
            key: key_path,
            not_after_s: params.not_after.unix_timestamp(),
        }
    }

    fn ca_path(&self) -> &str {
        self.ca.to_str().expect("a UTF-8 path")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        // Kept for a look when the test failed.
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A gateway serving `certs` (the first for clients naming no host it
/// has) on its public listener, with `extra` flags.
fn gateway(certs: &[&Leaf], extra: &[&str]) -> Gateway {
    let mut args: Vec<&str> = Vec::new();
    for leaf in certs {
        args.extend(["--tls-cert", leaf.cert_path(), "--tls-key", leaf.key_path()]);
    }
    // Each connection's accept and handshake in the log, which a failing
    // test prints.
    args.extend(["--log-level", "info,gateway=debug"]);
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

/// [`gateway`] with its admin listener on a free port, returned too.
fn gateway_with_admin(certs: &[&Leaf], extra: &[&str]) -> (Gateway, SocketAddr) {
    let admin = free_addr();
    let admin_arg = admin.to_string();
    let mut args = vec!["--admin-listen", admin_arg.as_str()];
    args.extend_from_slice(extra);
    (gateway(certs, &args), admin)
}

// ---------------------------------------------------------------------------
// Client processes
// ---------------------------------------------------------------------------

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("tls")
        .join("client.py")
}

/// A client process: its stdout lines as they come, its stdin for
/// commands. Killed when dropped.
struct Proc {
    /// The process, its stdin, stdout lines and stderr (whole once it
    /// has exited).
    io: LineChild,
    what: String,
    /// The last lines read, for failure messages.
    recent: Vec<String>,
}

impl Proc {
    fn spawn(program: &str, args: &[String]) -> Proc {
        let what = format!("{program} {}", args.join(" "));
        let io = spawn_lines(
            Command::new(program)
                .args(args)
                // No __pycache__ next to the script.
                .env("PYTHONDONTWRITEBYTECODE", "1"),
        )
        .unwrap_or_else(|e| panic!("spawn {what}: {e}; these tests need: {INSTALL}"));
        Proc {
            io,
            what,
            recent: Vec::new(),
        }
    }

    /// `client.py` with `args`.
    fn python(args: &[&str]) -> Proc {
        let mut argv = vec![script().display().to_string()];
        argv.extend(args.iter().map(|s| s.to_string()));
        Proc::spawn("python3", &argv)
    }

    fn fail(&mut self, why: &str) -> ! {
        // Ended here, so that its stderr is whole.
        let (status, stderr) = self.io.end();
        let missing = if status.and_then(|s| s.code()) == Some(3) {
            format!(" (a package is missing: {INSTALL})")
        } else {
            String::new()
        };
        panic!(
            "{}: {why}{missing}\nlast lines: {:#?}\nstderr:\n{stderr}",
            self.what, self.recent
        );
    }

    fn keep(&mut self, line: &str) {
        self.recent.push(line.to_string());
        if self.recent.len() > 8 {
            self.recent.remove(0);
        }
    }

    /// The next line if one comes within `limit`; `Err` once stdout has
    /// ended.
    fn line_within(&mut self, limit: Duration) -> Result<Option<String>, ()> {
        match self.io.lines.recv_timeout(limit) {
            Ok(line) => {
                self.keep(&line);
                Ok(Some(line))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(()),
        }
    }

    /// The next line; fails when the process ends first or after the
    /// safety net.
    fn line(&mut self) -> String {
        match self.line_within(IO_TIMEOUT) {
            Ok(Some(line)) => line,
            Ok(None) => self.fail(&format!("nothing within {IO_TIMEOUT:?}")),
            Err(()) => self.fail("exited without another line"),
        }
    }

    fn json(&mut self, line: &str) -> Value {
        serde_json::from_str(line)
            .unwrap_or_else(|e| self.fail(&format!("not a JSON line ({e}): {line}")))
    }

    /// The next line, as JSON.
    fn next(&mut self) -> Value {
        let line = self.line();
        self.json(&line)
    }

    /// Every line to the end of its output; fails unless it then exits
    /// with success (safety net on both).
    fn lines_to_exit(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match self.line_within(IO_TIMEOUT) {
                Ok(Some(line)) => out.push(line),
                Ok(None) => self.fail(&format!("still printing after {IO_TIMEOUT:?}")),
                Err(()) => break,
            }
        }
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            match self.io.child.try_wait().unwrap() {
                Some(status) if status.success() => return out,
                Some(status) => self.fail(&format!("exited with {status}")),
                None if Instant::now() > deadline => self.fail("still running"),
                None => thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Sends a command line on stdin.
    fn send(&mut self, cmd: Value) {
        let stdin = self.io.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{cmd}")
            .and_then(|_| stdin.flush())
            .unwrap();
    }
}

/// One TLS connection by client.py (`hello`) to the gateway's port on
/// 127.0.0.1, with `args` (`--sni`, `--ca` or `--no-verify`, `--request`,
/// ...): every line it printed.
fn hello(gw: &Gateway, args: &[&str]) -> Vec<Value> {
    let port = gw.listen.port().to_string();
    let mut argv = vec!["hello", "127.0.0.1", port.as_str()];
    argv.extend_from_slice(args);
    let mut p = Proc::python(&argv);
    let lines = p.lines_to_exit();
    lines.iter().map(|l| p.json(l)).collect()
}

/// The handshake a verifying client (trusting the test CA) makes with
/// `sni` as its server name: its line, after checking it succeeded.
fn handshake(gw: &Gateway, pki: &Pki, sni: &str) -> Value {
    let lines = hello(gw, &["--ca", pki.ca_path(), "--sni", sni]);
    assert_eq!(lines[0]["type"], "handshake", "SNI {sni}: {lines:?}");
    lines[0].clone()
}

/// The server certificate a handshake line names.
fn der(line: &Value) -> Vec<u8> {
    base64_decode(
        line["der"]
            .as_str()
            .unwrap_or_else(|| panic!("no der: {line}")),
    )
    .unwrap_or_else(|| panic!("der is not base64: {line}"))
}

/// Which of `leaves` (by name) the handshake line's certificate is.
fn which<'a>(line: &Value, leaves: &[(&'a str, &Leaf)]) -> &'a str {
    let got = der(line);
    leaves
        .iter()
        .find(|(_, leaf)| leaf.der == got)
        .map(|(name, _)| *name)
        .unwrap_or_else(|| panic!("a certificate none of the test's: {line}"))
}

/// A `wss://` client (client.py `ws`) on `path`, trusting the test CA and
/// naming `localhost`, with `args` (`--subprotocol`, `--max-tls12`);
/// returns it and its `open` line.
fn wss(gw: &Gateway, pki: &Pki, path: &str, args: &[&str]) -> (Proc, Value) {
    let url = format!("wss://localhost:{}{path}", gw.listen.port());
    let connect = gw.listen.to_string();
    let mut argv = vec![
        "ws",
        url.as_str(),
        "--connect",
        connect.as_str(),
        "--ca",
        pki.ca_path(),
        "--sni",
        "localhost",
    ];
    argv.extend_from_slice(args);
    let mut p = Proc::python(&argv);
    let open = p.next();
    if open["type"] != "open" {
        p.fail(&format!("first line: {open}"));
    }
    (p, open)
}

/// A frame a ws client printed: its meta (a control frame has a `type`)
/// and payload.
fn frame(v: &Value) -> (Value, Vec<u8>) {
    assert_eq!(v["type"], "frame", "a frame: {v}");
    let data = base64_decode(v["data"].as_str().unwrap_or_default())
        .unwrap_or_else(|| panic!("data is not base64: {v}"));
    let nl = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let meta: Value =
        serde_json::from_slice(&data[..nl]).unwrap_or_else(|e| panic!("no meta line ({e}): {v}"));
    let payload = data.get(nl + 1..).unwrap_or_default().to_vec();
    (meta, payload)
}

fn is_probe(v: &Value) -> bool {
    v["type"] == "frame" && frame(v).1 == b"probe"
}

/// Publishes `probe` to `channel` until the ws client `client` receives
/// one: the publisher's subscription has arrived (ZeroMQ's slow joiner)
/// and the client's stream is in place. Later probes may still come:
/// [`next_real`] skips them.
fn join(publisher: &Publisher, channel: &str, client: &mut Proc) {
    let deadline = Instant::now() + PROBE_BUDGET;
    loop {
        if Instant::now() > deadline {
            client.fail(&format!("{channel}: no probe within {PROBE_BUDGET:?}"));
        }
        publisher.publish(channel, b"probe");
        match client.line_within(PROBE_INTERVAL) {
            Ok(Some(line)) => {
                let v = client.json(&line);
                if is_probe(&v) {
                    return;
                }
                client.fail(&format!("{v} while waiting for a probe"));
            }
            Ok(None) => {}
            Err(()) => client.fail("exited while waiting for a probe"),
        }
    }
}

/// The ws client's next line that is not a probe.
fn next_real(client: &mut Proc) -> Value {
    loop {
        let v = client.next();
        if !is_probe(&v) {
            return v;
        }
    }
}

/// The next message frame (not a probe): channel and payload.
fn next_message(client: &mut Proc) -> (String, Vec<u8>) {
    let (meta, payload) = frame(&next_real(client));
    assert!(meta.get("type").is_none(), "a message, not {meta}");
    (meta["channel"].as_str().unwrap_or_default().into(), payload)
}

/// curl over TLS to the gateway, as `localhost` (resolved to the
/// gateway's address), trusting the test CA, on HTTP/1.1.
fn curl(gw: &Gateway, pki: &Pki, args: &[&str]) -> Proc {
    let port = gw.listen.port();
    let mut argv: Vec<String> = [
        "--silent",
        "--show-error",
        "--http1.1",
        "--cacert",
        pki.ca_path(),
        "--resolve",
        &format!("localhost:{port}:{}", gw.listen.ip()),
        // A safety net only: a stream is read while the test runs.
        "--max-time",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(args.iter().map(|s| s.to_string()));
    Proc::spawn("curl", &argv)
}

fn url(gw: &Gateway, path: &str) -> String {
    format!("https://localhost:{}{path}", gw.listen.port())
}

/// The SSE events curl prints, a line at a time.
struct CurlSse {
    curl: Proc,
    event: SseEvent,
}

impl CurlSse {
    fn open(gw: &Gateway, pki: &Pki, path: &str) -> CurlSse {
        let url = url(gw, path);
        let curl = curl(
            gw,
            pki,
            &["--no-buffer", "-H", "Accept: text/event-stream", &url],
        );
        CurlSse {
            curl,
            event: SseEvent {
                id: None,
                event: None,
                data: Vec::new(),
            },
        }
    }

    /// The next whole event if it comes within `limit` (comments and
    /// `retry:` skipped).
    fn event_within(&mut self, limit: Duration) -> Option<Delivery> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.curl.line_within(left) {
                Ok(Some(line)) => line,
                Ok(None) => return None,
                Err(()) => self.curl.fail("the stream ended"),
            };
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if self.event.data.is_empty() {
                    continue;
                }
                let ev = std::mem::replace(
                    &mut self.event,
                    SseEvent {
                        id: None,
                        event: None,
                        data: Vec::new(),
                    },
                );
                return Some(sse_event_to_delivery(&ev, "curl"));
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_string();
            match field {
                "id" => self.event.id = Some(value),
                "event" => self.event.event = Some(value),
                "data" => self.event.data.push(value),
                _ => {}
            }
        }
    }

    fn next(&mut self) -> Delivery {
        self.event_within(IO_TIMEOUT)
            .unwrap_or_else(|| self.curl.fail(&format!("no event within {IO_TIMEOUT:?}")))
    }

    /// The next event that is not a probe.
    fn next_real(&mut self) -> Delivery {
        loop {
            let d = self.next();
            if d.payload != b"probe" {
                return d;
            }
        }
    }

    /// [`join`] for the SSE stream.
    fn join(&mut self, publisher: &Publisher, channel: &str) {
        let deadline = Instant::now() + PROBE_BUDGET;
        loop {
            if Instant::now() > deadline {
                self.curl
                    .fail(&format!("{channel}: no probe within {PROBE_BUDGET:?}"));
            }
            publisher.publish(channel, b"probe");
            if let Some(d) = self.event_within(PROBE_INTERVAL) {
                assert_eq!(d.payload, b"probe", "{d:?} while waiting for a probe");
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Metrics and logs
// ---------------------------------------------------------------------------

/// The TLS handshakes counted with `result`.
fn tls_handshakes(admin: SocketAddr, result: &str) -> f64 {
    metric(
        admin,
        &format!("gateway_tls_handshakes_total{{result=\"{result}\"}}"),
    )
}

/// Waits (safety net only) until the gateway behind `admin` has counted
/// `want` TLS handshakes with `result`: it counts when it reads what the
/// client sent, which may be after the client is done.
fn wait_for_handshakes(admin: SocketAddr, result: &str, want: f64) {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let got = tls_handshakes(admin, result);
        if got == want {
            return;
        }
        assert!(
            got < want && Instant::now() < deadline,
            "gateway_tls_handshakes_total{{result=\"{result}\"}} is {got}, want {want}"
        );
        thread::sleep(PROBE_INTERVAL);
    }
}

/// `gateway_tls_certificate_not_after_seconds` of the certificate file
/// `file`.
fn not_after(admin: SocketAddr, file: &Path) -> i64 {
    metric(
        admin,
        &format!(
            "gateway_tls_certificate_not_after_seconds{{file=\"{}\"}}",
            file.display()
        ),
    ) as i64
}

/// A sample of `/metrics` that may not be there yet (counters of
/// refusals appear with the first one).
fn metric_or_zero(admin: SocketAddr, series: &str) -> f64 {
    let resp = HttpConn::connect(admin).get("/metrics", &[]);
    assert_eq!(resp.status, 200, "{}", resp.describe());
    String::from_utf8_lossy(&resp.body)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

/// Waits (safety net only) for the gateway to log `line` a `count`-th time.
fn wait_for_log(gw: &Gateway, line: &str, count: usize) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while gw.log().matches(line).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {line:?} logged within {IO_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Reads `stream` until the gateway closes it (a reset counts as a
/// close); fails if the safety net passes first. Returns what came.
fn read_until_closed(stream: &mut TcpStream, context: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) if is_read_timeout(&e) => {
                panic!("{context}: not closed within the {IO_TIMEOUT:?} safety net")
            }
            Err(e) => panic!("{context}: {e}"),
        }
    }
}

/// The start of a ClientHello: a handshake record of 512 bytes of which
/// only the first few come.
const HALF_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, // handshake record, 512 bytes
    0x01, 0x00, 0x01, 0xfc, // ClientHello, 508 bytes
    0x03, 0x03, // legacy_version TLS 1.2
    0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, // random: 8 bytes of 32
];

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

#[test]
fn wss_delivers_publications_and_carries_two_way_on_tls_1_3_and_1_2() {
    let pki = Pki::new("wss");
    let local = pki.leaf("localhost", &["localhost", "127.0.0.1"], 1, (2099, 1, 1));
    let gw = gateway(&[&local], &["--upstream-bind", "tcp://127.0.0.1:*"]);
    let hub = gw.hub();
    let publisher = Publisher::connect(gw.zmq_endpoint());

    let (mut client, open) = wss(
        &gw,
        &pki,
        "/ws?channel=news",
        &["--subprotocol", "gateway.v1"],
    );
    assert_eq!(open["version"], "TLSv1.3", "{open}");
    assert_eq!(open["subprotocol"], "gateway.v1", "{open}");
    assert_eq!(der(&open), local.der, "{open}");
    let (welcome, _) = frame(&client.next());
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let address = welcome["address"].as_str().unwrap().to_string();

    join(&publisher, "news", &mut client);
    publisher.publish("news", b"over tls");
    assert_eq!(
        next_message(&mut client),
        ("news".into(), b"over tls".to_vec())
    );
    // Larger than a record: sealed into several, read back whole.
    let big: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    publisher.publish("news", &big);
    let (channel, payload) = next_message(&mut client);
    assert_eq!(channel, "news");
    assert!(
        payload == big,
        "a {} byte payload came back different",
        big.len()
    );

    // Two-way: a line up to the hub, its answer back to this connection.
    client.send(json!({"send": "{\"channel\":\"room\",\"ref\":\"r1\"}\nhi from tls"}));
    let (ack, _) = frame(&next_real(&mut client));
    assert_eq!(ack, json!({"type": "ack", "ref": "r1"}));
    let up = hub.next_of("message");
    assert_eq!(
        (up.address.as_str(), up.channel.as_str(), up.text().as_str()),
        (address.as_str(), "room", "hi from tls")
    );
    publisher.publish(&format!("!{address}"), b"hello back");
    assert_eq!(next_message(&mut client).1, b"hello back");

    // A client held to TLS 1.2 is served the same way.
    let (mut old, open) = wss(&gw, &pki, "/ws?channel=news", &["--max-tls12"]);
    assert_eq!(open["version"], "TLSv1.2", "{open}");
    join(&publisher, "news", &mut old);
    publisher.publish("news", b"to both");
    assert_eq!(next_message(&mut old).1, b"to both");
    assert_eq!(next_message(&mut client).1, b"to both");

    // A clean close both ways, over TLS.
    old.send(json!({"close": true}));
    let closed = next_real(&mut old);
    assert_eq!(closed["type"], "closed", "{closed}");
    assert_eq!(closed["code"], 1000, "{closed}");
    old.lines_to_exit();
}

#[test]
fn curl_streams_sse_and_long_polls_over_tls() {
    let pki = Pki::new("curl");
    let local = pki.leaf("localhost", &["localhost", "127.0.0.1"], 1, (2099, 1, 1));
    let (gw, admin) = gateway_with_admin(&[&local], &[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());

    let mut sse = CurlSse::open(&gw, &pki, "/events?channel=news");
    sse.join(&publisher, "news");
    publisher.publish("news", b"one");
    publisher.publish_event("news", b"two", "headline");
    let one = sse.next_real();
    let two = sse.next_real();
    assert_eq!((one.channel.as_str(), one.text().as_str()), ("news", "one"));
    assert_eq!(
        (two.text().as_str(), two.event.as_deref()),
        ("two", Some("headline"))
    );

    // A long-poll behind the first message: answered at once from the
    // history, over its own TLS connection.
    let since = url(
        &gw,
        &format!("/events?channel=news&since={}", one.id.unwrap()),
    );
    let mut poll = curl(&gw, &pki, &["--write-out", "\n%{http_code}\n", &since]);
    let lines = poll.lines_to_exit();
    assert_eq!(lines.last().map(String::as_str), Some("200"), "{lines:?}");
    let body: Value = serde_json::from_str(&lines[0]).unwrap();
    let answer = parse_longpoll_body(&body, "since one");
    assert_eq!(
        content(&answer.messages),
        [("news".into(), b"two".to_vec())]
    );

    // A held long-poll, answered when the next message comes.
    let next = url(&gw, "/events?channel=news");
    let mut held = curl(&gw, &pki, &["--write-out", "\n%{http_code}\n", &next]);
    wait_for_held_polls(admin, 1);
    publisher.publish("news", b"three");
    let lines = held.lines_to_exit();
    assert_eq!(lines.last().map(String::as_str), Some("200"), "{lines:?}");
    let body: Value = serde_json::from_str(&lines[0]).unwrap();
    let answer = parse_longpoll_body(&body, "held");
    assert_eq!(
        content(&answer.messages),
        [("news".into(), b"three".to_vec())]
    );
    assert_eq!(sse.next_real().text(), "three");
}

#[test]
fn the_certificate_is_chosen_by_the_clients_sni() {
    let pki = Pki::new("sni");
    let local = pki.leaf("localhost", &["localhost", "127.0.0.1"], 1, (2099, 1, 1));
    let b = pki.leaf("b", &["b.test"], 2, (2099, 1, 1));
    let wild = pki.leaf("wild", &["*.wild.test"], 3, (2099, 1, 1));
    let gw = gateway(&[&local, &b, &wild], &[]);
    let leaves = [
        ("localhost", &local),
        ("b.test", &b),
        ("*.wild.test", &wild),
    ];

    for (sni, want) in [
        ("localhost", "localhost"),
        ("b.test", "b.test"),
        // Names are matched without regard to case.
        ("B.Test", "b.test"),
        ("x.wild.test", "*.wild.test"),
    ] {
        let line = handshake(&gw, &pki, sni);
        assert_eq!(which(&line, &leaves), want, "SNI {sni}: {line}");
    }
    let line = handshake(&gw, &pki, "b.test");
    assert_eq!(line["san"], json!(["b.test"]), "{line}");

    // A name no certificate has, a wildcard one label too deep, and no
    // name at all (a client connecting by address sends none): the first.
    for sni in ["other.test", "a.x.wild.test"] {
        let lines = hello(&gw, &["--no-verify", "--sni", sni]);
        assert_eq!(lines[0]["type"], "handshake", "{lines:?}");
        assert_eq!(which(&lines[0], &leaves), "localhost", "SNI {sni}");
    }
    // Verified against the CA, the hostname left unchecked: the first
    // certificate, and the application data after the handshake works.
    let lines = hello(&gw, &["--ca", pki.ca_path(), "--request", "/healthz"]);
    assert_eq!(lines[0]["type"], "handshake", "{lines:?}");
    assert_eq!(which(&lines[0], &leaves), "localhost");
    let response = &lines[1];
    let head = response["head"].as_str().unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 200 "), "{response}");
    assert!(response["body"]
        .as_str()
        .unwrap_or_default()
        .contains("\"ok\""));
    // The gateway ended the connection with close_notify, not a bare FIN.
    assert_eq!(response["close_notify"], true, "{response}");
}

#[test]
fn sighup_swaps_certificates_for_new_connections_and_keeps_them_on_a_bad_file() {
    let pki = Pki::new("reload");
    let live = pki.leaf("live", &["localhost", "127.0.0.1"], 1, (2099, 1, 1));
    let next = pki.leaf("next", &["localhost", "127.0.0.1"], 2, (2098, 6, 1));
    let (gw, admin) = gateway_with_admin(&[&live], &[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let leaves = [("first", &live), ("second", &next)];

    let (mut client, open) = wss(&gw, &pki, "/ws?channel=news", &[]);
    assert_eq!(which(&open, &leaves), "first");
    join(&publisher, "news", &mut client);
    assert_eq!(not_after(admin, &live.cert), live.not_after_s);

    // The files the gateway was started with now hold the second
    // certificate and its key.
    std::fs::copy(&next.cert, &live.cert).unwrap();
    std::fs::copy(&next.key, &live.key).unwrap();
    gw.signal(libc::SIGHUP);
    wait_for_log(&gw, "SIGHUP: TLS certificates reloaded", 1);
    let line = handshake(&gw, &pki, "localhost");
    assert_eq!(which(&line, &leaves), "second", "a new connection");
    assert_eq!(not_after(admin, &live.cert), next.not_after_s);
    // The connection made before goes on with its session.
    publisher.publish("news", b"after the reload");
    assert_eq!(next_message(&mut client).1, b"after the reload");

    // A file that does not load: the certificates in use stay, and it is
    // logged as an error.
    std::fs::write(&live.cert, "not a certificate\n").unwrap();
    gw.signal(libc::SIGHUP);
    wait_for_log(
        &gw,
        "SIGHUP: TLS certificates not reloaded; keeping the old ones",
        1,
    );
    let line = handshake(&gw, &pki, "localhost");
    assert_eq!(which(&line, &leaves), "second", "after a bad file");
    assert_eq!(not_after(admin, &live.cert), next.not_after_s);
    publisher.publish("news", b"after the bad file");
    assert_eq!(next_message(&mut client).1, b"after the bad file");
    let log = gw.log();
    let error = log
        .lines()
        .find(|l| l.contains("TLS certificates not reloaded"))
        .unwrap();
    assert!(error.contains("ERROR"), "logged as an error: {error}");
}

#[test]
fn sighup_reads_the_configuration_file_again_when_the_certificates_came_from_it() {
    let pki = Pki::new("reload-config");
    let first = pki.leaf("first", &["localhost"], 1, (2099, 1, 1));
    let second = pki.leaf("second", &["localhost"], 2, (2099, 1, 1));
    let leaves = [("first", &first), ("second", &second)];
    let config = pki.dir.join("gateway.toml");
    let write_config = |leaf: &Leaf| {
        let text = format!(
            "tls_cert = [{:?}]\ntls_key = [{:?}]\n",
            leaf.cert_path(),
            leaf.key_path()
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config(&first);
    let gw = Gateway::start(&["--config", config.to_str().unwrap()]);
    assert_eq!(which(&handshake(&gw, &pki, "localhost"), &leaves), "first");

    // The file now names other files: they are the ones read.
    write_config(&second);
    gw.signal(libc::SIGHUP);
    wait_for_log(&gw, "SIGHUP: TLS certificates reloaded", 1);
    assert_eq!(which(&handshake(&gw, &pki, "localhost"), &leaves), "second");
}

#[test]
fn clients_refuse_an_expired_certificate_and_an_unknown_ca_and_are_counted() {
    let pki = Pki::new("refused");
    let local = pki.leaf("localhost", &["localhost", "127.0.0.1"], 1, (2099, 1, 1));
    let expired = pki.expired("expired", &["expired.test"]);
    let rogue = pki.self_signed("rogue", &["rogue.test"]);
    let (gw, admin) = gateway_with_admin(&[&local, &expired, &rogue], &[]);
    assert!(
        gw.log().contains("TLS certificate has expired"),
        "the expired certificate is noted at start:\n{}",
        gw.log()
    );
    assert_eq!(not_after(admin, &expired.cert), expired.not_after_s);
    assert!(not_after(admin, &expired.cert) < now_s());
    assert_eq!(not_after(admin, &local.cert), local.not_after_s);

    handshake(&gw, &pki, "localhost");
    wait_for_handshakes(admin, "ok", 1.0);

    // (OpenSSL 1.1 writes "self signed", 3.0 "self-signed".)
    for (sni, why) in [("expired.test", "expired"), ("rogue.test", "self signed")] {
        let lines = hello(&gw, &["--ca", pki.ca_path(), "--sni", sni]);
        let refused = &lines[0];
        assert_eq!(refused["type"], "refused", "{sni}: {lines:?}");
        assert_eq!(refused["error"], "SSLCertVerificationError", "{refused}");
        let message = refused["verify_message"].as_str().unwrap_or_default();
        assert!(message.replace('-', " ").contains(why), "{sni}: {refused}");
    }
    // Each client said why in an alert, and the gateway counted it.
    wait_for_handshakes(admin, "certificate_rejected", 2.0);
    assert_eq!(tls_handshakes(admin, "ok"), 1.0);
}

#[test]
fn a_handshake_not_done_within_the_head_timeout_is_closed_and_counted() {
    let pki = Pki::new("timeout");
    let local = pki.leaf("localhost", &["localhost", "127.0.0.1"], 1, (2099, 1, 1));
    // No TCP_DEFER_ACCEPT: a silent client reaches the gateway at once.
    let (gw, admin) = gateway_with_admin(
        &[&local],
        &["--head-timeout-ms", "500", "--defer-accept-s", "0"],
    );

    let mut silent = tcp_connect(gw.listen, None, None);
    let mut half = tcp_connect(gw.listen, None, None);
    half.write_all(HALF_CLIENT_HELLO).unwrap();
    for (what, stream) in [("silent", &mut silent), ("half a ClientHello", &mut half)] {
        let got = read_until_closed(stream, what);
        assert!(got.is_empty(), "{what}: the gateway sent {got:?}");
    }
    wait_for_handshakes(admin, "timeout", 2.0);

    // One that trickles its ClientHello a byte at a time gets no more
    // time: each byte starts the connection's work again, not its clock.
    let mut trickle = tcp_connect(gw.listen, None, None);
    trickle.write_all(HALF_CLIENT_HELLO).unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut byte = [0u8; 1];
    loop {
        assert!(
            Instant::now() < deadline,
            "a client sending a byte every 100 ms was not closed within {IO_TIMEOUT:?}"
        );
        match trickle.read(&mut byte) {
            Ok(0) => break,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) if is_read_timeout(&e) => {}
            other => panic!("trickling client: {other:?}"),
        }
        if trickle.write_all(&[0x5a]).is_err() {
            break;
        }
    }
    wait_for_handshakes(admin, "timeout", 3.0);

    // One that gives up halfway is counted apart.
    let mut gone = tcp_connect(gw.listen, None, None);
    gone.write_all(HALF_CLIENT_HELLO).unwrap();
    gone.shutdown(Shutdown::Write).unwrap();
    read_until_closed(&mut gone, "gave up");
    wait_for_handshakes(admin, "closed", 1.0);
    assert_eq!(tls_handshakes(admin, "timeout"), 3.0);
    assert_eq!(tls_handshakes(admin, "ok"), 0.0);
}

#[test]
fn a_proxy_header_comes_in_clear_before_the_handshake() {
    let pki = Pki::new("proxy");
    let local = pki.leaf("localhost", &["localhost", "127.0.0.1"], 1, (2099, 1, 1));
    let gw = gateway(&[&local], &["--proxy-protocol-from", "127.0.0.1/32"]);
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();

    // v1, then TLS: the request is answered, and logged with the client
    // the header named.
    let v1 = hex(b"PROXY TCP4 203.0.113.9 10.0.0.1 52000 443\r\n");
    let lines = hello(
        &gw,
        &[
            "--proxy-hex",
            &v1,
            "--ca",
            pki.ca_path(),
            "--sni",
            "localhost",
            "--request",
            "/nowhere",
        ],
    );
    assert_eq!(lines[0]["type"], "handshake", "{lines:?}");
    let head = lines[1]["head"].as_str().unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 404 "), "{lines:?}");
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("request refused") && l.contains("404"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(line.contains("203.0.113.9:52000"), "{line}");

    // v2 (binary), then TLS.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    v2.extend_from_slice(&[198, 51, 100, 7, 10, 0, 0, 1]);
    v2.extend_from_slice(&40000u16.to_be_bytes());
    v2.extend_from_slice(&443u16.to_be_bytes());
    let lines = hello(
        &gw,
        &[
            "--proxy-hex",
            &hex(&v2),
            "--ca",
            pki.ca_path(),
            "--sni",
            "localhost",
            "--request",
            "/healthz",
        ],
    );
    assert_eq!(lines[0]["type"], "handshake", "{lines:?}");
    let head = lines[1]["head"].as_str().unwrap_or_default();
    assert!(head.starts_with("HTTP/1.1 200 "), "{lines:?}");

    // From the trusted proxy without a header: no session.
    let lines = hello(&gw, &["--ca", pki.ca_path(), "--sni", "localhost"]);
    assert_eq!(lines[0]["type"], "refused", "{lines:?}");
}

#[test]
fn cleartext_http_and_a_client_with_no_common_cipher_fail_the_handshake() {
    let pki = Pki::new("not-tls");
    let local = pki.leaf("localhost", &["localhost", "127.0.0.1"], 1, (2099, 1, 1));
    let (gw, admin) = gateway_with_admin(&[&local], &[]);

    let mut stream = tcp_connect(gw.listen, None, None);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .unwrap();
    let got = read_until_closed(&mut stream, "cleartext request");
    assert!(!got.starts_with(b"HTTP/"), "answered in clear: {got:?}");
    // Nothing, or a TLS alert record.
    assert!(got.is_empty() || got[0] == 0x15, "{got:?}");
    wait_for_handshakes(admin, "not_tls", 1.0);

    // TLS 1.2 with only a key exchange the gateway does not offer (RSA).
    let lines = hello(
        &gw,
        &[
            "--no-verify",
            "--sni",
            "localhost",
            "--max-tls12",
            "--ciphers",
            "AES128-SHA",
        ],
    );
    assert_eq!(lines[0]["type"], "refused", "{lines:?}");
    wait_for_handshakes(admin, "incompatible", 1.0);
    assert_eq!(tls_handshakes(admin, "ok"), 0.0);
}

#[test]
fn a_connection_refused_at_accept_is_closed_without_an_answer() {
    let pki = Pki::new("admission");
    let local = pki.leaf("localhost", &["localhost", "127.0.0.1"], 1, (2099, 1, 1));
    let (gw, admin) = gateway_with_admin(
        &[&local],
        &["--connections-per-ip-max", "1", "--defer-accept-s", "0"],
    );
    let (_first, _) = wss(&gw, &pki, "/ws?channel=news", &[]);

    // The same address again: over its limit. A cleartext 503 would mean
    // nothing to a TLS client: the connection just ends.
    let mut second = tcp_connect(gw.listen, None, None);
    second.write_all(HALF_CLIENT_HELLO).unwrap();
    let got = read_until_closed(&mut second, "over the limit");
    assert!(got.is_empty(), "the gateway sent {got:?}");
    let series = "gateway_handshakes_total{result=\"too many connections from this address\"}";
    let deadline = Instant::now() + IO_TIMEOUT;
    while metric_or_zero(admin, series) < 1.0 {
        assert!(Instant::now() < deadline, "{series} never counted");
        thread::sleep(PROBE_INTERVAL);
    }
}

/// The gRPC test client (`tests/grpc/client.py`, grpcio).
fn grpc_client(args: &[&str]) -> Proc {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("grpc")
        .join("client.py");
    let mut argv = vec![script.display().to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    Proc::spawn("python3", &argv)
}

#[test]
fn curl_gets_sse_and_long_poll_over_http2_and_grpcio_the_service_on_the_same_port() {
    let pki = Pki::new("h2");
    let local = pki.leaf("localhost", &["localhost", "127.0.0.1"], 1, (2099, 1, 1));
    let (gw, admin) = gateway_with_admin(&[&local], &[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());

    // curl offers h2 and http/1.1 by ALPN: the gateway picks h2. The head
    // (`--include`) says so before the stream's events.
    let mut proc = curl(
        &gw,
        &pki,
        &[
            "--http2",
            "--include",
            "--no-buffer",
            "-H",
            "Accept: text/event-stream",
            &url(&gw, "/events?channel=news"),
        ],
    );
    let status = proc.line();
    assert_eq!(
        status.trim_end(),
        "HTTP/2 200",
        "the SSE response's status line"
    );
    let mut head = Vec::new();
    loop {
        let line = proc.line();
        if line.trim_end().is_empty() {
            break;
        }
        head.push(line.trim_end().to_ascii_lowercase());
    }
    assert!(
        head.contains(&"content-type: text/event-stream".to_string()),
        "{head:?}"
    );
    assert!(
        !head
            .iter()
            .any(|h| h.starts_with("connection:") || h.starts_with("transfer-encoding:")),
        "no connection-specific header on HTTP/2: {head:?}"
    );
    let mut sse = CurlSse {
        curl: proc,
        event: SseEvent {
            id: None,
            event: None,
            data: Vec::new(),
        },
    };
    sse.join(&publisher, "news");

    // gRPC over TLS on the same port: grpcio offers h2 alone.
    let addr = format!("localhost:{}", gw.listen.port());
    let mut grpc = grpc_client(&[
        "subscribe",
        &addr,
        "--channel",
        "news",
        "--tls-ca",
        pki.ca_path(),
        "--tls-name",
        "localhost",
    ]);
    let deadline = Instant::now() + PROBE_BUDGET;
    loop {
        if Instant::now() > deadline {
            grpc.fail("no probe over gRPC within the budget");
        }
        publisher.publish("news", b"probe");
        match grpc.line_within(PROBE_INTERVAL) {
            Ok(Some(line)) => {
                let v = grpc.json(&line);
                assert_eq!(v["type"], "message", "{v}");
                break;
            }
            Ok(None) => {}
            Err(()) => grpc.fail("exited while waiting for a probe"),
        }
    }
    publisher.publish("news", b"both");
    assert_eq!(sse.next_real().text(), "both");
    let got = loop {
        let v = grpc.next();
        assert_eq!(v["type"], "message", "{v}");
        let payload = v["payload"].as_str().unwrap_or_default().to_string();
        if payload != "cHJvYmU=" {
            break payload;
        }
    };
    assert_eq!(got, "Ym90aA==", "base64 of \"both\"");

    // A held long-poll over HTTP/2, answered by the next publication.
    let mut held = curl(
        &gw,
        &pki,
        &[
            "--http2",
            "--write-out",
            "\n%{http_version} %{http_code}\n",
            &url(&gw, "/events?channel=news"),
        ],
    );
    wait_for_held_polls(admin, 1);
    publisher.publish("news", b"later");
    let lines = held.lines_to_exit();
    assert_eq!(lines.last().map(String::as_str), Some("2 200"), "{lines:?}");
    let body: Value = serde_json::from_str(&lines[0]).unwrap();
    let answer = parse_longpoll_body(&body, "held over h2");
    assert_eq!(
        content(&answer.messages),
        [("news".into(), b"later".to_vec())]
    );
    assert_eq!(sse.next_real().text(), "later");
    assert!(tls_handshakes(admin, "ok") >= 3.0);
}
