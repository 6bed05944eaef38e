//! What the gateway's integration tests and its load generator share: the
//! client side of the gateway's contract.
//!
//! [`http`] reads response heads and `/healthz` (the bench's non-blocking
//! clients and the tests' blocking ones both use it). The rest is for the
//! integration tests: every test starts the real binary (found next to the
//! test executable, or `GATEWAY_BIN`) on loopback, waits for its `READY`
//! line, publishes over ZeroMQ and talks to it with real clients
//! (tungstenite for WebSocket, plain TCP for SSE and long-poll). Nothing
//! here sleeps to synchronise: the only waits are for something the gateway
//! sends. Socket read timeouts exist only as a safety net, so that a broken
//! gateway fails a test instead of hanging it.

pub mod http;
pub mod two_way;

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::Message;
use tungstenite::WebSocket;

/// How long a gateway may take to print its `READY` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Safety net on every client socket: a read that blocks this long means the
/// gateway is broken, so the test fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Long-polls may legitimately be held by the gateway; give them more slack.
pub const LONGPOLL_IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound on the slow-joiner probe loop.
pub const PROBE_BUDGET: Duration = Duration::from_secs(10);
/// Pace of the probe publishes while waiting for the subscription to land.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// The channel the slow-joiner probe uses; tests never use it otherwise.
pub const PROBE_CHANNEL: &str = "probe";

// ---------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------

/// The build's target profile folder (`target/release`): the test
/// executable is in its `deps/`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.ancestors()
        .find(|dir| dir.file_name().is_some_and(|n| n == "deps"))
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// The gateway binary: `GATEWAY_BIN`, or the one cargo built next to the
/// tests (`cargo test` builds it for the gateway's integration tests).
pub fn gateway_bin() -> PathBuf {
    match std::env::var_os("GATEWAY_BIN") {
        Some(path) => PathBuf::from(path),
        None => target_dir().join("gateway"),
    }
}

static GATEWAY_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A running gateway; killed (and reaped) when dropped. Its stderr goes to a
/// log file whose tail is printed when the owning test is failing.
pub struct Gateway {
    child: Child,
    /// The public listener, from the READY line.
    pub listen: SocketAddr,
    /// The bound ZeroMQ SUB endpoint, from the READY line (`None` for `zmq=-`).
    pub zmq: Option<String>,
    /// The bound upstream endpoint (`upstream=` on the READY line), if any.
    pub upstream: Option<String>,
    /// The separate gRPC listener (`grpc=` on the READY line), if any.
    pub grpc: Option<SocketAddr>,
    /// The whole READY line, as printed.
    pub ready_line: String,
    pub log_path: PathBuf,
}

impl Gateway {
    /// Starts the gateway with `args`. Unless the caller gives them, adds
    /// `--listen 127.0.0.1:0`, `--zmq-bind tcp://127.0.0.1:*` and
    /// `--admin-listen ""` so that tests running in parallel never share a
    /// port.
    pub fn start(args: &[&str]) -> Gateway {
        Self::start_with_env(args, &[])
    }

    /// A gateway that binds nothing and connects its SUB socket to the
    /// test's bound publisher.
    pub fn start_connected_to(publisher: &Publisher) -> Gateway {
        Self::start(&[
            "--zmq-bind",
            "",
            "--zmq-connect",
            publisher.endpoint.as_str(),
        ])
    }

    /// Like `start`, with extra environment variables for the gateway.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Gateway {
        Self::start_full(args, env, None)
    }

    /// Like `start`, with the gateway's stderr going to `stderr` (a pipe
    /// the test controls) instead of the log file.
    pub fn start_with_stderr(args: &[&str], stderr: Stdio) -> Gateway {
        Self::start_full(args, &[], Some(stderr))
    }

    fn start_full(args: &[&str], env: &[(&str, &str)], stderr: Option<Stdio>) -> Gateway {
        let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !args.contains(&"--listen") {
            argv.push("--listen".into());
            argv.push("127.0.0.1:0".into());
        }
        if !args.contains(&"--zmq-bind") {
            argv.push("--zmq-bind".into());
            argv.push("tcp://127.0.0.1:*".into());
        }
        // The admin listener's default port would collide between gateways
        // running in parallel: off unless the test picks a port.
        if !args.contains(&"--admin-listen") {
            argv.push("--admin-listen".into());
            argv.push(String::new());
        }

        let (mut gw_for_cleanup, ready) = spawn_until_ready(&argv, env, stderr);
        let log_path = gw_for_cleanup.log_path.clone();

        let mut listen = None;
        let mut zmq = None;
        let mut zmq_seen = false;
        let mut upstream = None;
        let mut grpc = None;
        for tok in ready.split_whitespace().skip(1) {
            if let Some(v) = tok.strip_prefix("upstream=") {
                upstream = v.split(',').next().map(str::to_string);
            }
            if let Some(v) = tok.strip_prefix("grpc=") {
                grpc = v.parse::<SocketAddr>().ok();
            }
            if let Some(v) = tok.strip_prefix("listen=") {
                listen = v.parse::<SocketAddr>().ok();
            } else if let Some(v) = tok.strip_prefix("zmq=") {
                zmq_seen = true;
                if v != "-" {
                    zmq = Some(v.to_string());
                }
            }
        }
        let listen = match listen {
            Some(a) => a,
            None => gw_for_cleanup.fail(&format!("READY line has no usable listen=: {ready:?}")),
        };
        if !zmq_seen {
            gw_for_cleanup.fail(&format!("READY line has no zmq= field: {ready:?}"));
        }
        let child = gw_for_cleanup.child.take().unwrap();
        Gateway {
            child,
            listen,
            zmq,
            upstream,
            grpc,
            ready_line: ready,
            log_path,
        }
    }

    /// A gateway behind `fwd` (`zmq_subscribe = demand`, no linger), with
    /// its admin listener on `admin`, and `extra` flags.
    pub fn start_behind(fwd: &Forwarder, admin: SocketAddr, extra: &[&str]) -> Gateway {
        let admin = admin.to_string();
        let mut args = vec![
            "--zmq-bind",
            "",
            "--zmq-connect",
            &fwd.gateways,
            "--zmq-subscribe",
            "demand",
            "--zmq-unsubscribe-linger-ms",
            "0",
            "--admin-listen",
            &admin,
        ];
        args.extend_from_slice(extra);
        Gateway::start(&args)
    }

    /// A WebSocket on the gateway's subprotocol, with `token` as a bearer.
    pub fn two_way(&self, path: &str, token: Option<&str>) -> two_way::TwoWayClient {
        two_way::TwoWayClient::connect(self.listen, path, token)
    }

    /// A hub connected to the gateway's bound upstream endpoint.
    pub fn hub(&self) -> two_way::Hub {
        two_way::Hub::connect(
            self.upstream
                .as_deref()
                .expect("no upstream= on the READY line"),
        )
    }

    /// The bound ZeroMQ endpoint; panics if the gateway is not binding one.
    pub fn zmq_endpoint(&self) -> &str {
        self.zmq
            .as_deref()
            .expect("gateway has no bound zmq endpoint (zmq=-)")
    }

    /// A WebSocket client on `path` (e.g. `/ws?channel=news`).
    pub fn ws(&self, path: &str) -> WsClient {
        WsClient::connect(self.listen, path)
    }

    /// An SSE client on `path`, optionally resuming with `Last-Event-ID`.
    pub fn sse(&self, path: &str, last_event_id: Option<&str>) -> SseClient {
        SseClient::connect(self.listen, path, last_event_id)
    }

    /// A fresh keep-alive HTTP connection (for long-polls).
    pub fn http(&self) -> HttpConn {
        HttpConn::connect(self.listen)
    }

    /// `GET /healthz` on a fresh connection; asserts 200 + JSON status ok.
    pub fn healthz(&self) -> Value {
        let mut conn = self.http();
        let resp = conn.get("/healthz", &[]);
        assert_eq!(resp.status, 200, "GET /healthz: {}", resp.describe());
        let v: Value = serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("/healthz body is not JSON ({e}): {}", resp.describe()));
        assert_eq!(v["status"], "ok", "/healthz: {v}");
        v
    }

    /// `connections_per_core` from /healthz.
    pub fn connections_per_core(&self) -> Vec<u64> {
        let v = self.healthz();
        v["connections_per_core"]
            .as_array()
            .unwrap_or_else(|| panic!("/healthz has no connections_per_core array: {v}"))
            .iter()
            .map(|n| {
                n.as_u64()
                    .unwrap_or_else(|| panic!("non-integer count in {v}"))
            })
            .collect()
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log_path)
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gateway's resident memory (`VmRSS` of /proc/PID/status), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status of the gateway");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS line in /proc/PID/status:\n{status}"));
        kb * 1024
    }

    /// Everything the gateway has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the gateway process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid(),
            io::Error::last_os_error()
        );
    }

    /// Waits for the gateway to exit, for at most `limit` (a safety net);
    /// `None` if it is still running then. Polls the child's state (there is
    /// no blocking wait with a timeout in std).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on the gateway") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `GET /readyz` on a fresh connection.
    pub fn readyz(&self) -> HttpResponse {
        self.http().get("/readyz", &[])
    }
}

// ---------------------------------------------------------------------------
// Which process holds a connection (several gateways on one port)
// ---------------------------------------------------------------------------

/// A free loopback port (bound, read, let go), for a listener the gateway
/// must be told the address of (the admin listener).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Open long-polls the gateway behind `admin` holds (its cores' connection
/// gauges in `/metrics`, refreshed once a second).
pub fn held_polls(admin: SocketAddr) -> u64 {
    let resp = HttpConn::connect(admin).get("/metrics", &[]);
    assert_eq!(resp.status, 200, "{}", resp.describe());
    String::from_utf8_lossy(&resp.body)
        .lines()
        .filter(|l| l.starts_with("gateway_connections{") && l.contains("transport=\"longpoll\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits (a safety net of 10 s) until the gateway behind `admin` holds
/// `n` long-polls.
pub fn wait_for_held_polls(admin: SocketAddr, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while held_polls(admin) != n {
        assert!(
            Instant::now() < deadline,
            "{n} held long-polls never showed"
        );
        thread::sleep(PROBE_INTERVAL);
    }
}

/// The pid, among `pids`, of the process that holds the server side of the
/// client connection `stream` (found through /proc/net/tcp and the
/// processes' descriptors). For gateways sharing a port with SO_REUSEPORT,
/// where the kernel decides who accepts. Call it once the connection has
/// been answered (so it has been accepted).
pub fn owner_pid(stream: &TcpStream, pids: &[u32]) -> Option<u32> {
    let local = stream.local_addr().ok()?;
    let peer = stream.peer_addr().ok()?;
    // The server's socket: local = the gateway's address, remote = ours.
    let want = |addr: &str, port: u16| -> Option<bool> {
        let (_, p) = addr.split_once(':')?;
        Some(u16::from_str_radix(p, 16).ok()? == port)
    };
    let mut inode = None;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            if want(f[1], peer.port()) == Some(true) && want(f[2], local.port()) == Some(true) {
                inode = Some(f[9].to_string());
            }
        }
    }
    let link = format!("socket:[{}]", inode?);
    pids.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|dir| {
            dir.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == link.as_str()))
        })
    })
}

/// How many times a client may reconnect to land on a given gateway of a
/// shared port before the test gives up (each try is a coin toss or so).
pub const LAND_TRIES: usize = 200;

/// A WebSocket on `path` that the gateway `want` (one of the processes
/// `pids` sharing `addr`) accepted: connects until the kernel hands one to it.
pub fn ws_on(addr: SocketAddr, path: &str, want: u32, pids: &[u32]) -> WsClient {
    for _ in 0..LAND_TRIES {
        let ws = WsClient::connect(addr, path);
        if owner_pid(ws.ws.get_ref(), pids) == Some(want) {
            return ws;
        }
    }
    panic!("no WebSocket landed on gateway {want} in {LAND_TRIES} tries");
}

/// `GET /healthz` answered by the gateway `want` among the processes `pids`
/// sharing `addr`; asserts 200 and returns the body.
pub fn healthz_of(addr: SocketAddr, want: u32, pids: &[u32]) -> Value {
    for _ in 0..LAND_TRIES {
        let mut conn = HttpConn::connect(addr);
        let resp = conn.get("/healthz", &[]);
        if owner_pid(conn.reader.get_ref(), pids) != Some(want) {
            continue;
        }
        assert_eq!(resp.status, 200, "GET /healthz: {}", resp.describe());
        return serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("/healthz body is not JSON ({e}): {}", resp.describe()));
    }
    panic!("no /healthz landed on gateway {want} in {LAND_TRIES} tries");
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "---- gateway log ({}), last lines ----\n{}\n---- end of gateway log ----",
                self.log_path.display(),
                self.log_tail()
            );
        } else {
            // Nothing went wrong while this gateway lived: its log is noise.
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

/// Spawns the gateway binary with `argv` (stderr to a log file) and waits
/// for the `READY …` line it prints first on stdout; the rest of its stdout
/// is drained. Panics (with the log) if it does not come.
fn spawn_until_ready(
    argv: &[String],
    env: &[(&str, &str)],
    stderr: Option<Stdio>,
) -> (PartialGateway, String) {
    let log_dir = target_dir().join("tmp").join("gateway-logs");
    std::fs::create_dir_all(&log_dir).expect("create log dir");
    let test_name: String = thread::current()
        .name()
        .unwrap_or("test")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let log_path = log_dir.join(format!(
        "{}-{}-{}.log",
        test_name,
        std::process::id(),
        GATEWAY_SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let log = File::create(&log_path).expect("create gateway log file");

    let mut child = Command::new(gateway_bin())
        .args(argv)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr.unwrap_or_else(|| Stdio::from(log)))
        .spawn()
        .expect("spawn gateway binary");

    // Read stdout on a thread: the first line must be READY; everything
    // after it is drained so the gateway can never block on its stdout.
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<Result<String, String>>();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut first = true;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    if first {
                        let _ = tx.send(Err("stdout closed before any line".into()));
                    }
                    return;
                }
                Ok(_) => {
                    if first {
                        first = false;
                        let line = line.trim_end().to_string();
                        if line.starts_with("READY ") {
                            let _ = tx.send(Ok(line));
                        } else {
                            let _ =
                                tx.send(Err(format!("first stdout line is not READY: {line:?}")));
                        }
                    }
                }
            }
        }
    });

    let mut gw_for_cleanup = PartialGateway {
        child: Some(child),
        log_path: log_path.clone(),
    };
    let ready = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(line)) => line,
        Ok(Err(why)) => gw_for_cleanup.fail(&format!("gateway did not become ready: {why}")),
        Err(mpsc::RecvTimeoutError::Timeout) => gw_for_cleanup.fail(&format!(
            "gateway printed no READY line within {READY_TIMEOUT:?}"
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            gw_for_cleanup.fail("gateway stdout reader ended without READY")
        }
    };

    (gw_for_cleanup, ready)
}

/// Holds the child while READY is awaited, so a failure kills it.
struct PartialGateway {
    child: Option<Child>,
    log_path: PathBuf,
}

impl PartialGateway {
    fn fail(&mut self, why: &str) -> ! {
        let status = match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(st))) => format!("exited: {st}"),
            _ => "still running (killed now)".to_string(),
        };
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        panic!(
            "{why}\ngateway process {status}\n---- gateway log ({}) ----\n{}",
            self.log_path.display(),
            log_tail(&self.log_path)
        );
    }
}

impl Drop for PartialGateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(60);
    lines[start..].join("\n")
}

/// A running `gateway forwarder` on free loopback ports; killed when dropped.
pub struct Forwarder {
    child: Child,
    /// Where publishers connect (its XSUB side).
    pub publishers: String,
    /// Where gateways connect (its XPUB side).
    pub gateways: String,
    /// Its admin listener (`/metrics`, `/readyz`), on a free port.
    pub admin: SocketAddr,
    pub log_path: PathBuf,
}

impl Forwarder {
    pub fn start() -> Forwarder {
        let argv: Vec<String> = [
            "forwarder",
            "--publishers",
            "tcp://127.0.0.1:*",
            "--gateways",
            "tcp://127.0.0.1:*",
            "--admin-listen",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (mut partial, ready) = spawn_until_ready(&argv, &[], None);
        let field = |name: &str| {
            ready
                .split_whitespace()
                .find_map(|t| t.strip_prefix(name))
                .map(str::to_string)
        };
        let admin = field("admin=").and_then(|a| a.parse().ok());
        let (Some(publishers), Some(gateways), Some(admin)) =
            (field("publishers="), field("gateways="), admin)
        else {
            partial.fail(&format!("READY line of the forwarder: {ready:?}"))
        };
        Forwarder {
            child: partial.child.take().unwrap(),
            publishers,
            gateways,
            admin,
            log_path: partial.log_path.clone(),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "---- forwarder log ({}) ----\n{}",
                self.log_path.display(),
                log_tail(&self.log_path)
            );
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

// ---------------------------------------------------------------------------
// The ZeroMQ publisher
// ---------------------------------------------------------------------------

/// A ZeroMQ PUB socket that either connects to a gateway's bound SUB or binds
/// for gateways to connect to.
pub struct Publisher {
    sock: zmq::Socket,
    _ctx: zmq::Context,
    pub endpoint: String,
}

impl Publisher {
    fn new_socket() -> (zmq::Context, zmq::Socket) {
        let ctx = zmq::Context::new();
        let sock = ctx.socket(zmq::PUB).expect("zmq PUB socket");
        // Never block test teardown on undelivered messages.
        sock.set_linger(0).expect("set linger");
        (ctx, sock)
    }

    /// PUB that connects to the gateway's bound SUB endpoint.
    pub fn connect(endpoint: &str) -> Publisher {
        let (ctx, sock) = Self::new_socket();
        sock.connect(endpoint)
            .unwrap_or_else(|e| panic!("zmq connect {endpoint}: {e}"));
        Publisher {
            sock,
            _ctx: ctx,
            endpoint: endpoint.to_string(),
        }
    }

    /// PUB bound on a free loopback port; gateways connect to `endpoint`.
    pub fn bind() -> Publisher {
        Self::bind_at("tcp://127.0.0.1:*")
    }

    /// PUB bound on `endpoint` (e.g. the endpoint of a publisher that went
    /// away, to play the same publisher coming back).
    pub fn bind_at(endpoint: &str) -> Publisher {
        let (ctx, sock) = Self::new_socket();
        sock.bind(endpoint)
            .unwrap_or_else(|e| panic!("zmq bind {endpoint}: {e}"));
        let endpoint = sock
            .get_last_endpoint()
            .expect("get_last_endpoint")
            .expect("endpoint is UTF-8");
        Publisher {
            sock,
            _ctx: ctx,
            endpoint,
        }
    }

    /// Two frames: [channel, payload].
    pub fn publish(&self, channel: &str, payload: &[u8]) {
        self.sock
            .send_multipart([channel.as_bytes(), payload], 0)
            .expect("zmq send");
    }

    /// Three frames: [channel, payload, {"id": "<id>"}]: the publisher
    /// assigns the message's id.
    pub fn publish_with_id(&self, channel: &str, payload: &[u8], id: u64) {
        let meta = serde_json::json!({ "id": id.to_string() }).to_string();
        self.publish_meta(channel, payload, &meta);
    }

    /// Three frames: [channel, payload, meta] with the meta as given.
    pub fn publish_meta(&self, channel: &str, payload: &[u8], meta: &str) {
        self.sock
            .send_multipart([channel.as_bytes(), payload, meta.as_bytes()], 0)
            .expect("zmq send");
    }

    /// Three frames: [channel, payload, {"event": event}].
    pub fn publish_event(&self, channel: &str, payload: &[u8], event: &str) {
        let meta = serde_json::json!({ "event": event }).to_string();
        self.sock
            .send_multipart([channel.as_bytes(), payload, meta.as_bytes()], 0)
            .expect("zmq send");
    }
}

/// Result of the slow-joiner probe: the probe clients (kept open so that they
/// stay counted as connections) and the id of the first probe message seen.
pub struct Probe {
    pub clients: Vec<WsClient>,
    /// The largest id among the probe messages the probe clients received.
    /// Any message the test publishes afterwards has a larger id.
    pub last_id: u64,
}

/// One sample of the `/metrics` on `admin`: `series` is the name with its
/// labels as the text shows them (`gateway_x_total{reason="y"}`).
pub fn metric(admin: SocketAddr, series: &str) -> f64 {
    let resp = HttpConn::connect(admin).get("/metrics", &[]);
    assert_eq!(resp.status, 200, "{}", resp.describe());
    let text = String::from_utf8(resp.body).expect("metrics are UTF-8");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .unwrap_or_else(|| panic!("no {series:?} in\n{text}"))
        .parse()
        .expect("a number")
}

/// Waits until each gateway's ingest has a working subscription to
/// `publisher`: opens one WebSocket on channel `probe` per gateway, then
/// publishes to `probe` every 20 ms (for at most 10 s) until every probe
/// client has received one. Only after this may a test publish for real.
pub fn wait_for_subscription(publisher: &Publisher, gateways: &[&Gateway]) -> Probe {
    let clients = gateways
        .iter()
        .map(|gw| gw.ws(&format!("/ws?channel={PROBE_CHANNEL}")))
        .collect();
    wait_for_subscription_of(publisher, clients)
}

/// [`wait_for_subscription`] with probe clients the caller opened on
/// `/ws?channel=probe` (one per gateway, e.g. with [`ws_on`] when gateways
/// share a port).
pub fn wait_for_subscription_of(publisher: &Publisher, probes: Vec<WsClient>) -> Probe {
    let (tx, rx) = mpsc::channel::<u64>();
    let mut handles = Vec::new();
    let gateways = probes.len();
    for mut ws in probes {
        let tx = tx.clone();
        handles.push(thread::spawn(move || {
            let msg = ws.next_delivery();
            assert_eq!(msg.channel, PROBE_CHANNEL, "probe client got {msg:?}");
            let id = msg.id.expect("probe message has an id");
            let _ = tx.send(id);
            ws
        }));
    }
    drop(tx);

    let deadline = Instant::now() + PROBE_BUDGET;
    let mut got = 0;
    let mut last_id = 0;
    let mut sent = 0u64;
    while got < gateways {
        if Instant::now() > deadline {
            panic!(
                "slow-joiner probe: only {got} of {gateways} gateways delivered a probe message \
                 after {sent} publishes over {PROBE_BUDGET:?}"
            );
        }
        publisher.publish(PROBE_CHANNEL, b"probe");
        sent += 1;
        match rx.recv_timeout(PROBE_INTERVAL) {
            Ok(id) => {
                got += 1;
                last_id = last_id.max(id);
                while let Ok(id) = rx.try_recv() {
                    got += 1;
                    last_id = last_id.max(id);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("a probe client thread died before receiving a probe message")
            }
        }
    }
    let clients = handles
        .into_iter()
        .map(|h| h.join().expect("probe client thread panicked"))
        .collect();
    Probe { clients, last_id }
}

// ---------------------------------------------------------------------------
// One delivered message, whatever the transport
// ---------------------------------------------------------------------------

/// A message (or a gap notice) as a client saw it, normalised across
/// WebSocket, SSE and long-poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub channel: String,
    /// `None` for a gap notice.
    pub id: Option<u64>,
    pub event: Option<String>,
    pub gap: bool,
    /// The payload after decoding (base64 undone where the meta says so).
    pub payload: Vec<u8>,
    /// WebSocket: the frame was binary. SSE/long-poll: the meta said base64.
    pub binary: bool,
}

impl Delivery {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// Parses a meta object: `channel` must be a string, `id` (if present) a
/// decimal u64 carried as a JSON string, `event` a string, `gap` a bool.
pub fn parse_meta(meta: &Value, context: &str) -> (String, Option<u64>, Option<String>, bool) {
    let obj = meta
        .as_object()
        .unwrap_or_else(|| panic!("{context}: meta is not a JSON object: {meta}"));
    let channel = obj
        .get("channel")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{context}: meta has no string \"channel\": {meta}"))
        .to_string();
    let id = obj.get("id").map(|v| parse_id(v, context));
    let event = obj.get("event").map(|v| {
        v.as_str()
            .unwrap_or_else(|| panic!("{context}: \"event\" is not a string: {meta}"))
            .to_string()
    });
    let gap = match obj.get("gap") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => panic!("{context}: \"gap\" is not a bool: {other}"),
    };
    (channel, id, event, gap)
}

/// An id: a JSON string holding a decimal u64.
pub fn parse_id(v: &Value, context: &str) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{context}: id must be a JSON string, got {v}"));
    parse_id_str(s, context)
}

pub fn parse_id_str(s: &str, context: &str) -> u64 {
    assert!(
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()),
        "{context}: id {s:?} is not a decimal number"
    );
    s.parse::<u64>()
        .unwrap_or_else(|e| panic!("{context}: id {s:?} is not a u64: {e}"))
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

pub struct WsClient {
    pub ws: WebSocket<TcpStream>,
    pub path: String,
}

impl WsClient {
    pub fn connect(addr: SocketAddr, path: &str) -> WsClient {
        let stream = TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("connect {addr} for ws {path}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let url = format!("ws://{addr}{path}");
        let (ws, _resp) = match tungstenite::client::client(url.as_str(), stream) {
            Ok(ok) => ok,
            Err(tungstenite::HandshakeError::Failure(e)) => {
                panic!("WebSocket handshake for {path} failed: {e:?}")
            }
            Err(tungstenite::HandshakeError::Interrupted(_)) => {
                panic!("WebSocket handshake for {path} timed out (safety net {IO_TIMEOUT:?})")
            }
        };
        WsClient {
            ws,
            path: path.to_string(),
        }
    }

    /// The next message of any kind (control frames included), as
    /// tungstenite hands it over. Panics on error or timeout.
    pub fn next_message(&mut self) -> Message {
        match self.ws.read() {
            Ok(m) => m,
            Err(tungstenite::Error::Io(e)) if is_read_timeout(&e) => {
                panic!(
                    "ws {}: nothing received within the {IO_TIMEOUT:?} safety net",
                    self.path
                )
            }
            Err(e) => panic!("ws {}: read failed: {e:?}", self.path),
        }
    }

    /// The next data frame (pings/pongs from the gateway are skipped),
    /// parsed as meta line + "\n" + payload.
    pub fn next_delivery(&mut self) -> Delivery {
        loop {
            let (bytes, binary) = match self.next_message() {
                Message::Text(t) => (t.into_bytes(), false),
                Message::Binary(b) => (b, true),
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(c) => {
                    panic!("ws {}: gateway closed the connection: {c:?}", self.path)
                }
                Message::Frame(_) => unreachable!("raw frames are not returned by read()"),
            };
            return parse_ws_payload(&bytes, binary, &self.path);
        }
    }

    /// The next data frame if one comes within `wait`, else None: for a
    /// test that publishes until something arrives (the safety net is set
    /// back after).
    pub fn try_next_delivery(&mut self, wait: Duration) -> Option<Delivery> {
        self.ws.get_ref().set_read_timeout(Some(wait)).unwrap();
        let got = loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => break Some((t.into_bytes(), false)),
                Ok(Message::Binary(b)) => break Some((b, true)),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => panic!("ws {}: {other:?}", self.path),
                Err(tungstenite::Error::Io(e)) if is_read_timeout(&e) => break None,
                Err(e) => panic!("ws {}: read failed: {e:?}", self.path),
            }
        };
        self.ws
            .get_ref()
            .set_read_timeout(Some(IO_TIMEOUT))
            .unwrap();
        got.map(|(bytes, binary)| parse_ws_payload(&bytes, binary, &self.path))
    }

    /// Reads `n` data frames.
    pub fn deliveries(&mut self, n: usize) -> Vec<Delivery> {
        (0..n).map(|_| self.next_delivery()).collect()
    }
}

/// Whether a read failed because the socket's read timeout (the tests'
/// safety net) passed: Linux reports it as `WouldBlock`, others as
/// `TimedOut`.
pub fn is_read_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A client socket connected to `addr` from `source` (any loopback address
/// works as a source on Linux: 127.0.0.2 is another client), with the
/// safety-net timeouts; `rcvbuf_bytes` sets a small receive buffer (which
/// also stops the kernel from growing it), for clients meant to fall behind.
pub fn tcp_connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    rcvbuf_bytes: Option<usize>,
) -> TcpStream {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .expect("client socket");
    if let Some(ip) = source {
        sock.bind(&SocketAddr::new(ip, 0).into())
            .unwrap_or_else(|e| panic!("bind client socket to {ip}: {e}"));
    }
    if let Some(n) = rcvbuf_bytes {
        sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
    }
    sock.connect(&addr.into())
        .unwrap_or_else(|e| panic!("connect {addr} from {source:?}: {e}"));
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Sends a WebSocket upgrade for `path` on `stream` and reads the response
/// head byte by byte (so nothing after it is consumed). Returns the head
/// and, when it is not `101`, the body (by Content-Length).
pub fn send_upgrade(stream: &mut TcpStream, path: &str) -> (HttpHead, Vec<u8>) {
    send_upgrade_with(stream, path, "")
}

/// [`send_upgrade`] with extra header lines (each ending in CRLF).
pub fn send_upgrade_with(stream: &mut TcpStream, path: &str, extra: &str) -> (HttpHead, Vec<u8>) {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .unwrap_or_else(|e| panic!("send upgrade for {path}: {e}"));
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => raw.push(byte[0]),
            Ok(_) => panic!(
                "upgrade for {path}: connection closed after {:?}",
                String::from_utf8_lossy(&raw)
            ),
            Err(e) => panic!("upgrade for {path}: reading the response head: {e}"),
        }
    }
    let head = read_head(&mut &raw[..]);
    let mut body = Vec::new();
    if head.status != 101 {
        let len: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("upgrade for {path}: no Content-Length in {head:?}"));
        body.resize(len, 0);
        stream
            .read_exact(&mut body)
            .unwrap_or_else(|e| panic!("upgrade for {path}: body of {head:?}: {e}"));
    }
    (head, body)
}

/// A WebSocket upgrade for `path` with extra header lines on a fresh
/// connection to `addr`: the response (with the body of a refusal) and the
/// stream, upgraded or not.
pub fn upgrade_with(addr: SocketAddr, path: &str, extra: &str) -> (HttpResponse, TcpStream) {
    let mut stream = tcp_connect(addr, None, None);
    let (head, body) = send_upgrade_with(&mut stream, path, extra);
    let resp = HttpResponse {
        status: head.status,
        head,
        body,
    };
    (resp, stream)
}

/// A WebSocket on `stream` for `path`, or the HTTP response that refused it.
pub fn ws_or_refusal(mut stream: TcpStream, path: &str) -> Result<WsClient, HttpResponse> {
    let (head, body) = send_upgrade(&mut stream, path);
    if head.status != 101 {
        return Err(HttpResponse {
            status: head.status,
            head,
            body,
        });
    }
    let ws = WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Client, None);
    Ok(WsClient {
        ws,
        path: path.to_string(),
    })
}

/// Checks a `503` refusal: `Retry-After` of 1 to 5 seconds, `Connection:
/// close`, the expected one-line reason as the body. Returns Retry-After.
pub fn assert_unavailable(resp: &HttpResponse, reason: &str, context: &str) -> u32 {
    assert_eq!(resp.status, 503, "{context}: {}", resp.describe());
    let retry: u32 = resp
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{context}: no numeric Retry-After: {}", resp.describe()));
    assert!((1..=5).contains(&retry), "{context}: Retry-After {retry}");
    assert!(
        resp.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "{context}: {}",
        resp.describe()
    );
    assert_eq!(
        String::from_utf8_lossy(&resp.body),
        format!("{reason}\n"),
        "{context}"
    );
    retry
}

/// A WebSocket frame payload: meta JSON, "\n", raw payload.
pub fn parse_ws_payload(bytes: &[u8], binary: bool, context: &str) -> Delivery {
    let nl = bytes.iter().position(|&b| b == b'\n').unwrap_or_else(|| {
        panic!(
            "ws {context}: frame has no meta line: {:?}",
            String::from_utf8_lossy(bytes)
        )
    });
    let meta: Value = serde_json::from_slice(&bytes[..nl]).unwrap_or_else(|e| {
        panic!(
            "ws {context}: meta line is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes[..nl])
        )
    });
    let (channel, id, event, gap) = parse_meta(&meta, &format!("ws {context}"));
    assert!(
        meta.get("encoding").is_none(),
        "ws {context}: WebSocket carries raw payloads, yet meta names an encoding: {meta}"
    );
    if !gap {
        assert!(id.is_some(), "ws {context}: message without id: {meta}");
    }
    Delivery {
        channel,
        id,
        event,
        gap,
        payload: bytes[nl + 1..].to_vec(),
        binary,
    }
}

// ---------------------------------------------------------------------------
// Plain HTTP/1.1 client (keep-alive capable)
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpHead {
    pub status: u16,
    pub status_line: String,
    /// Header names lower-cased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
}

impl HttpHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub head: HttpHead,
    pub status: u16,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }
    pub fn describe(&self) -> String {
        format!(
            "{} {:?} body={:?}",
            self.head.status_line,
            self.head.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

pub struct HttpConn {
    pub reader: BufReader<TcpStream>,
    pub addr: SocketAddr,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> HttpConn {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        HttpConn {
            reader: BufReader::new(stream),
            addr,
        }
    }

    pub fn set_read_timeout(&mut self, t: Duration) {
        self.reader.get_ref().set_read_timeout(Some(t)).unwrap();
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.reader
            .get_mut()
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write request: {e}"));
    }

    /// Sends `POST path` with `Host`, the extra headers and `body`
    /// (Content-Length), and reads the response.
    pub fn post(&mut self, path: &str, extra: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        let mut req = format!("POST {path} HTTP/1.1\r\nHost: gateway.test\r\n");
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send(&bytes);
        self.read_response()
    }

    /// Sends `GET path` with `Host` and the extra headers (keep-alive).
    pub fn get(&mut self, path: &str, extra: &[(&str, &str)]) -> HttpResponse {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (n, v) in extra {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.send(req.as_bytes());
        self.read_response()
    }

    pub fn read_head(&mut self) -> HttpHead {
        read_head(&mut self.reader)
    }

    /// Reads one response: body by Content-Length, chunked, or to EOF.
    pub fn read_response(&mut self) -> HttpResponse {
        let head = self.read_head();
        // RFC 9112 §6.3: these never have a body, whatever the headers say.
        let body = if head.status == 204 || head.status == 304 || head.status < 200 {
            Vec::new()
        } else if let Some(len) = head.header("content-length") {
            let len: usize = len
                .parse()
                .unwrap_or_else(|_| panic!("bad Content-Length {len:?} in {head:?}"));
            let mut body = vec![0; len];
            self.reader
                .read_exact(&mut body)
                .unwrap_or_else(|e| panic!("reading {len}-byte body after {head:?}: {e}"));
            body
        } else if head
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            let mut body = Vec::new();
            ChunkedReader::new(&mut self.reader)
                .read_to_end(&mut body)
                .unwrap_or_else(|e| panic!("reading chunked body after {head:?}: {e}"));
            body
        } else {
            let mut body = Vec::new();
            self.reader
                .read_to_end(&mut body)
                .unwrap_or_else(|e| panic!("reading body to EOF after {head:?}: {e}"));
            body
        };
        HttpResponse {
            status: head.status,
            head,
            body,
        }
    }

    /// True once the server has closed the connection (reads EOF). Panics if
    /// data arrives instead, or if nothing happens within the safety net.
    pub fn expect_eof(&mut self, context: &str) {
        let mut buf = [0u8; 256];
        match self.reader.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!(
                "{context}: expected the gateway to close the connection, got more bytes: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                // The gateway closed; a reset after the full response is fine.
            }
            Err(e) => panic!(
                "{context}: expected the gateway to close the connection (Connection: close), \
                 but reading gave: {e}"
            ),
        }
    }
}

/// Reads a response head (status line + headers + blank line).
pub fn read_head<R: BufRead>(r: &mut R) -> HttpHead {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        match r.read_until(b'\n', &mut head) {
            Ok(0) => panic!("connection closed while reading a response head: {head:?}"),
            Ok(_) => {}
            Err(e) => panic!("reading a response head: {e}"),
        }
        let line = &head[start..];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let status_line = http::first_line(&head);
    let status =
        http::status_code(&head).unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = http::header_lines(&head)
        .map(|h| {
            let (n, v) = h.unwrap_or_else(|| panic!("malformed response header in {head:?}"));
            (n.to_ascii_lowercase(), v.to_string())
        })
        .collect();
    HttpHead {
        status,
        status_line,
        headers,
    }
}

/// De-chunks a `Transfer-Encoding: chunked` body.
pub struct ChunkedReader<R: BufRead> {
    inner: R,
    remaining: usize,
    done: bool,
}

impl<R: BufRead> ChunkedReader<R> {
    pub fn new(inner: R) -> Self {
        ChunkedReader {
            inner,
            remaining: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Read for ChunkedReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        if self.remaining == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Ok(0);
            }
            let size_str = line
                .trim()
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            let size = usize::from_str_radix(&size_str, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if size == 0 {
                // Trailers until the blank line.
                loop {
                    let mut t = String::new();
                    if self.inner.read_line(&mut t)? == 0 || t.trim().is_empty() {
                        break;
                    }
                }
                self.done = true;
                return Ok(0);
            }
            self.remaining = size;
        }
        let n = out.len().min(self.remaining);
        let n = self.inner.read(&mut out[..n])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "EOF inside a chunk",
            ));
        }
        self.remaining -= n;
        if self.remaining == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

/// Sends raw bytes on a fresh connection and reads the one response (to EOF
/// when there is no Content-Length).
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> (HttpResponse, HttpConn) {
    let mut conn = HttpConn::connect(addr);
    conn.send(bytes);
    let resp = conn.read_response();
    (resp, conn)
}

// ---------------------------------------------------------------------------
// SSE client
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    /// One entry per `data:` line, in order.
    pub data: Vec<String>,
}

pub struct SseClient {
    reader: Box<dyn BufRead + Send>,
    stream: TcpStream,
    pub head: HttpHead,
    pub path: String,
    /// Every `retry:` value received, in order.
    pub retries: Vec<u32>,
}

impl SseClient {
    /// Opens `GET path` with `Accept: text/event-stream` (and
    /// `Last-Event-ID` when given); asserts `200` + `text/event-stream`.
    pub fn connect(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> SseClient {
        let extra: Vec<(&str, &str)> = last_event_id
            .map(|id| ("Last-Event-ID", id))
            .into_iter()
            .collect();
        SseClient::connect_with(addr, path, &extra)
    }

    /// [`SseClient::connect`] with extra request headers (`Origin`,
    /// `Last-Event-ID`, ...).
    pub fn connect_with(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> SseClient {
        let mut conn = HttpConn::connect(addr);
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
        );
        for (name, value) in extra {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        conn.send(req.as_bytes());
        let head = conn.read_head();
        assert_eq!(head.status, 200, "SSE {path}: {head:?}");
        let ct = head.header("content-type").unwrap_or("");
        assert!(
            ct.to_ascii_lowercase().starts_with("text/event-stream"),
            "SSE {path}: Content-Type is {ct:?}, want text/event-stream ({head:?})"
        );
        let stream = conn.reader.get_ref().try_clone().unwrap();
        let chunked = head
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let reader: Box<dyn BufRead + Send> = if chunked {
            Box::new(BufReader::new(ChunkedReader::new(conn.reader)))
        } else {
            Box::new(conn.reader)
        };
        SseClient {
            reader,
            stream,
            head,
            path: path.to_string(),
            retries: Vec::new(),
        }
    }

    /// The next dispatched event. Comment lines (heartbeats) and blocks with
    /// no id, event or data (e.g. a lone `retry:`) are skipped.
    pub fn next_event(&mut self) -> SseEvent {
        match self.next_event_or_end() {
            Some(ev) => ev,
            None => panic!("SSE {}: stream ended (gateway closed it)", self.path),
        }
    }

    /// The next dispatched event, or `None` when the gateway ended the
    /// stream between events (a reset counts as an end too).
    pub fn next_event_or_end(&mut self) -> Option<SseEvent> {
        let mut ev = SseEvent {
            id: None,
            event: None,
            data: Vec::new(),
        };
        let mut any = false;
        loop {
            let mut buf = Vec::new();
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) if !any => return None,
                Ok(0) => panic!("SSE {}: stream ended inside an event", self.path),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !any => return None,
                Err(e) if is_read_timeout(&e) => {
                    panic!(
                        "SSE {}: nothing received within the {IO_TIMEOUT:?} safety net",
                        self.path
                    )
                }
                Err(e) => panic!("SSE {}: read failed: {e}", self.path),
            }
            assert!(
                buf.ends_with(b"\n"),
                "SSE {}: stream ended mid-line",
                self.path
            );
            buf.pop();
            if buf.ends_with(b"\r") {
                buf.pop();
            }
            let line = String::from_utf8(buf)
                .unwrap_or_else(|e| panic!("SSE {}: non-UTF-8 line: {e}", self.path));
            if line.is_empty() {
                if any {
                    return Some(ev);
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
                "id" => {
                    ev.id = Some(value.to_string());
                    any = true;
                }
                "event" => {
                    ev.event = Some(value.to_string());
                    any = true;
                }
                "data" => {
                    ev.data.push(value.to_string());
                    any = true;
                }
                "retry" => self.retries.push(value.parse().unwrap_or_else(|_| {
                    panic!("SSE {}: retry is not a number: {line:?}", self.path)
                })),
                other => panic!(
                    "SSE {}: unknown field {other:?} in line {line:?}",
                    self.path
                ),
            }
        }
    }

    /// The next event as a [`Delivery`], checking the SSE framing rules of
    /// the contract: first data line is the meta, `id:` equals meta id, the
    /// `event:` line equals meta event, a gap is `event: gap` without `id:`.
    pub fn next_delivery(&mut self) -> Delivery {
        let ev = self.next_event();
        sse_event_to_delivery(&ev, &self.path)
    }

    pub fn deliveries(&mut self, n: usize) -> Vec<Delivery> {
        (0..n).map(|_| self.next_delivery()).collect()
    }

    /// Closes the client side of the connection.
    pub fn disconnect(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The client's socket.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

pub fn sse_event_to_delivery(ev: &SseEvent, context: &str) -> Delivery {
    let ctx = format!("SSE {context}");
    assert!(
        !ev.data.is_empty(),
        "{ctx}: event without data lines: {ev:?}"
    );
    let meta: Value = serde_json::from_str(&ev.data[0])
        .unwrap_or_else(|e| panic!("{ctx}: first data line is not the JSON meta ({e}): {ev:?}"));
    let (channel, id, event, gap) = parse_meta(&meta, &ctx);
    if gap {
        assert_eq!(
            ev.event.as_deref(),
            Some("gap"),
            "{ctx}: gap notice must be `event: gap`: {ev:?}"
        );
        assert!(
            ev.id.is_none(),
            "{ctx}: gap notice must not carry an id line: {ev:?}"
        );
        assert_eq!(
            ev.data.len(),
            1,
            "{ctx}: gap notice has extra data lines: {ev:?}"
        );
        return Delivery {
            channel,
            id: None,
            event: Some("gap".into()),
            gap,
            payload: Vec::new(),
            binary: false,
        };
    }
    let id = id.unwrap_or_else(|| panic!("{ctx}: message meta without id: {ev:?}"));
    let line_id = ev
        .id
        .as_deref()
        .unwrap_or_else(|| panic!("{ctx}: message without an `id:` line: {ev:?}"));
    assert_eq!(
        parse_id_str(line_id, &ctx),
        id,
        "{ctx}: id line and meta id differ: {ev:?}"
    );
    assert_eq!(
        ev.event, event,
        "{ctx}: `event:` line and meta event differ: {ev:?}"
    );
    let binary = match meta.get("encoding") {
        None => false,
        Some(v) if v == "base64" => true,
        Some(v) => panic!("{ctx}: unknown encoding {v}: {ev:?}"),
    };
    let payload = if binary {
        assert_eq!(
            ev.data.len(),
            2,
            "{ctx}: a base64 payload must be one data line: {ev:?}"
        );
        base64_decode(&ev.data[1]).unwrap_or_else(|| panic!("{ctx}: invalid base64: {ev:?}"))
    } else {
        ev.data[1..].join("\n").into_bytes()
    };
    Delivery {
        channel,
        id: Some(id),
        event,
        gap: false,
        payload,
        binary,
    }
}

// ---------------------------------------------------------------------------
// Long-poll
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct LongPoll {
    pub cursor: u64,
    pub messages: Vec<Delivery>,
    pub gaps: Vec<String>,
    pub body: Value,
}

/// One long-poll on a keep-alive connection: `GET /events?channel=…[&since=N]`
/// without `Accept: text/event-stream`. Asserts 200, JSON, Content-Length.
pub fn longpoll(conn: &mut HttpConn, channels: &[&str], since: Option<u64>) -> LongPoll {
    let mut path = String::from("/events?");
    let mut first = true;
    for c in channels {
        if !first {
            path.push('&');
        }
        first = false;
        path.push_str(&format!("channel={c}"));
    }
    if let Some(s) = since {
        path.push_str(&format!("&since={s}"));
    }
    conn.set_read_timeout(LONGPOLL_IO_TIMEOUT);
    let resp = conn.get(&path, &[]);
    assert_eq!(resp.status, 200, "long-poll {path}: {}", resp.describe());
    let ct = resp.header("content-type").unwrap_or("");
    assert!(
        ct.to_ascii_lowercase().starts_with("application/json"),
        "long-poll {path}: Content-Type {ct:?}: {}",
        resp.describe()
    );
    assert!(
        resp.header("content-length").is_some(),
        "long-poll {path}: no Content-Length: {}",
        resp.describe()
    );
    let body: Value = serde_json::from_slice(&resp.body).unwrap_or_else(|e| {
        panic!(
            "long-poll {path}: body is not JSON ({e}): {}",
            resp.describe()
        )
    });
    parse_longpoll_body(&body, &path)
}

pub fn parse_longpoll_body(body: &Value, context: &str) -> LongPoll {
    let ctx = format!("long-poll {context}");
    let cursor = parse_id(
        body.get("cursor")
            .unwrap_or_else(|| panic!("{ctx}: no cursor: {body}")),
        &format!("{ctx} cursor"),
    );
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{ctx}: no messages array: {body}"))
        .iter()
        .map(|m| {
            let (channel, id, event, gap) = parse_meta(m, &ctx);
            assert!(!gap, "{ctx}: a gap inside messages: {m}");
            let id = id.unwrap_or_else(|| panic!("{ctx}: message without id: {m}"));
            let data = m
                .get("data")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{ctx}: message without string data: {m}"));
            let binary = match m.get("encoding") {
                None => false,
                Some(v) if v == "base64" => true,
                Some(v) => panic!("{ctx}: unknown encoding {v}: {m}"),
            };
            let payload = if binary {
                base64_decode(data).unwrap_or_else(|| panic!("{ctx}: invalid base64 in {m}"))
            } else {
                data.as_bytes().to_vec()
            };
            Delivery {
                channel,
                id: Some(id),
                event,
                gap: false,
                payload,
                binary,
            }
        })
        .collect();
    let gaps = body
        .get("gaps")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{ctx}: no gaps array: {body}"))
        .iter()
        .map(|g| {
            g.as_str()
                .unwrap_or_else(|| panic!("{ctx}: non-string gap {g}"))
                .to_string()
        })
        .collect();
    LongPoll {
        cursor,
        messages,
        gaps,
        body: body.clone(),
    }
}

/// Long-polls (re-polling with the returned cursor) until `n` messages have
/// arrived; asserts no response is empty and none reports a gap. Returns the
/// messages and the last cursor.
pub fn longpoll_collect(
    conn: &mut HttpConn,
    channels: &[&str],
    since: u64,
    n: usize,
) -> (Vec<Delivery>, u64) {
    let mut cursor = since;
    let mut out = Vec::new();
    while out.len() < n {
        let r = longpoll(conn, channels, Some(cursor));
        assert!(
            !r.messages.is_empty(),
            "long-poll since={cursor} returned no messages while {} of {n} are still expected \
             (they exist): {}",
            n - out.len(),
            r.body
        );
        assert!(
            r.gaps.is_empty(),
            "long-poll since={cursor}: unexpected gaps: {}",
            r.body
        );
        let last = r.messages.last().unwrap().id.unwrap();
        assert_eq!(
            r.cursor, last,
            "long-poll cursor must be the last message's id: {}",
            r.body
        );
        cursor = r.cursor;
        out.extend(r.messages);
    }
    assert_eq!(
        out.len(),
        n,
        "long-poll returned more messages than were published: {out:?}"
    );
    (out, cursor)
}

// ---------------------------------------------------------------------------
// Assertions and small utilities
// ---------------------------------------------------------------------------

/// Ids of deliveries, panicking on gap notices.
pub fn ids(ds: &[Delivery]) -> Vec<u64> {
    ds.iter()
        .map(|d| d.id.expect("a message, not a gap notice"))
        .collect()
}

pub fn assert_strictly_increasing(ids: &[u64], context: &str) {
    for w in ids.windows(2) {
        assert!(
            w[0] < w[1],
            "{context}: ids not strictly increasing: {ids:?}"
        );
    }
}

/// Channel + payload of each delivery, for comparing with what was sent.
pub fn content(ds: &[Delivery]) -> Vec<(String, Vec<u8>)> {
    ds.iter()
        .map(|d| (d.channel.clone(), d.payload.clone()))
        .collect()
}

/// Standard base64, as the gateway writes binary payloads on SSE and
/// long-poll (the `base64` crate, not the gateway's code).
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Standard base64, padded. `None` if invalid.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// A client process of a test (a Python script, curl): its stdout read a
/// line at a time as it comes (by a thread, into `lines`), its stderr
/// gathered whole (joined once it has exited), its stdin kept for
/// commands.
pub struct LineChild {
    pub child: Child,
    pub stdin: Option<std::process::ChildStdin>,
    pub lines: mpsc::Receiver<String>,
    pub stderr: Option<thread::JoinHandle<String>>,
}

impl LineChild {
    /// Ends the process now: how it ended, and its stderr, whole.
    pub fn end(&mut self) -> (Option<std::process::ExitStatus>, String) {
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        let stderr = match self.stderr.take().map(thread::JoinHandle::join) {
            Some(Ok(text)) => text,
            _ => String::new(),
        };
        (status, stderr)
    }
}

/// Killed when dropped: no client outlives its test.
impl Drop for LineChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` with its three streams piped (see [`LineChild`]).
pub fn spawn_lines(command: &mut Command) -> io::Result<LineChild> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut err_pipe = child.stderr.take().expect("piped");
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = err_pipe.read_to_string(&mut text);
        text
    });
    Ok(LineChild {
        stdin: child.stdin.take(),
        child,
        lines,
        stderr: Some(stderr),
    })
}
