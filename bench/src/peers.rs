//! The peer servers the gateway is compared with besides the baseline:
//! nginx with the nchan module, and Bun running a short pub/sub script.
//! Neither speaks the gateway's contract (no ZeroMQ, no /healthz), so the
//! bench writes each one's configuration or script into a fresh temporary
//! directory, serving the same request paths the bench's clients use, with
//! `POST /pub?channel=…` for the publisher.

use std::fs::{self, File};
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::gateway::Gateway;
use crate::procfs;
use crate::tls::TlsFiles;
use crate::util::TempDir;

/// A loopback port nothing listens on right now: bound to port 0, read,
/// released. Another process could take it before the server binds it;
/// nginx then fails with "Address already in use" and is started again.
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

/// The end of a log file, for an error message: its last `lines` lines.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .is_err()
    {
        return String::new();
    }
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// An nginx configuration string literal.
fn quoted(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

/// File descriptors and connections per nginx worker: enough for the idle
/// and storm runs of the README (one worker can end up with most of them).
pub const NGINX_CONNECTIONS_PER_WORKER: u32 = 20_000;

/// The nginx configuration for nchan: `workers` worker processes listening
/// on `listen`, every file it writes inside `dir`. The locations serve what
/// the bench's clients send (`http::subscribe_request`): `/ws` upgrades to
/// WebSocket, `/events` is EventSource when the request accepts
/// `text/event-stream` and a long-poll otherwise, and `POST /pub`
/// publishes; `?channel=` names the channel everywhere. With `tls` the
/// listener is `ssl` with that certificate and TLS 1.2 and 1.3, what the
/// gateway speaks (nginx before 1.23.4, Debian 12's 1.22 among them,
/// leaves 1.3 out by default); everything else at nginx's defaults (its
/// ciphers and curves, session tickets on, no session cache).
pub fn nginx_conf(
    module: &Path,
    workers: u32,
    dir: &Path,
    listen: SocketAddr,
    tls: Option<&TlsFiles>,
) -> String {
    let d = |name: &str| quoted(&dir.join(name));
    let listen = match tls {
        None => listen.to_string(),
        Some(files) => format!(
            "{listen} ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};\n        \
             ssl_protocols TLSv1.2 TLSv1.3",
            quoted(&files.cert),
            quoted(&files.key)
        ),
    };
    format!(
        "load_module {module};
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {conns};
pid {pid};
error_log {error_log} warn;
events {{
    worker_connections {conns};
}}
http {{
    access_log off;
    client_body_temp_path {body};
    proxy_temp_path {proxy};
    fastcgi_temp_path {fastcgi};
    uwsgi_temp_path {uwsgi};
    scgi_temp_path {scgi};
    # A publication (16 KiB at most, plus its meta line) stays in memory.
    client_body_buffer_size 64k;
    server {{
        listen {listen};
        # A new subscriber gets what is published after it subscribed, as
        # with the gateway (nchan's default would replay stored messages).
        nchan_subscriber_first_message newest;
        nchan_channel_id $arg_channel;
        location = /ws {{
            nchan_subscriber websocket;
        }}
        location = /events {{
            nchan_subscriber eventsource longpoll;
        }}
        location = /pub {{
            nchan_publisher http;
            # The bench pipelines its publications on one connection:
            # nginx's default of 1000 requests would cut it (and lose
            # what was in flight).
            keepalive_requests 1000000;
        }}
    }}
}}
",
        module = quoted(module),
        conns = NGINX_CONNECTIONS_PER_WORKER,
        pid = d("nginx.pid"),
        error_log = d("error.log"),
        body = d("client_body"),
        proxy = d("proxy"),
        fastcgi = d("fastcgi"),
        uwsgi = d("uwsgi"),
        scgi = d("scgi"),
    )
}

/// nginx + nchan, spawned in the foreground (the master is our child, its
/// workers are the master's); dropping it stops them all.
pub struct Nginx {
    child: Child,
    pub listen: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    /// Writes the configuration, starts nginx and waits until its port
    /// accepts a connection (and the master still runs), at most
    /// `ready_timeout`.
    pub fn spawn(
        nginx: &Path,
        module: &Path,
        workers: u32,
        tls: Option<&TlsFiles>,
        ready_timeout: Duration,
    ) -> Result<Nginx, String> {
        if !module.exists() {
            return Err(format!(
                "the nchan module {} does not exist: install libnginx-mod-nchan or give --nchan-module PATH",
                module.display()
            ));
        }
        let deadline = Instant::now() + ready_timeout;
        // The free port can be taken by someone else before nginx binds it:
        // try again (a few times) with another one.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Nginx::spawn_once(nginx, module, workers, tls, deadline) {
                Err(e) if attempt < 3 && e.contains("Address already in use") => continue,
                other => return other,
            }
        }
    }

    fn spawn_once(
        nginx: &Path,
        module: &Path,
        workers: u32,
        tls: Option<&TlsFiles>,
        deadline: Instant,
    ) -> Result<Nginx, String> {
        let dir = TempDir::new("nchan")?;
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let conf = dir.path().join("nginx.conf");
        fs::write(&conf, nginx_conf(module, workers, dir.path(), listen, tls))
            .map_err(|e| format!("write {}: {e}", conf.display()))?;
        let stderr_path = dir.path().join("stderr.log");
        let stderr =
            File::create(&stderr_path).map_err(|e| format!("{}: {e}", stderr_path.display()))?;
        // -e: nginx opens its compiled-in error log before it reads the
        // configuration; this keeps even that inside the directory.
        let mut cmd = Command::new(nginx);
        crate::sys::place_server(&mut cmd);
        let child = cmd
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", nginx.display()))?;
        // From here on, dropping `n` stops nginx.
        let mut n = Nginx { child, listen, dir };
        loop {
            if let Ok(Some(status)) = n.child.try_wait() {
                return Err(format!(
                    "nginx exited before accepting connections ({status}): {}",
                    n.logs()
                ));
            }
            if TcpStream::connect_timeout(&listen, Duration::from_millis(100)).is_ok() {
                // nginx binds before it forks the workers: the port answers
                // once the master is up. Checked once more, so that a
                // master that failed right after binding is not taken.
                if let Ok(Some(status)) = n.child.try_wait() {
                    return Err(format!(
                        "nginx exited right after start ({status}): {}",
                        n.logs()
                    ));
                }
                // Counts of its connections (from /proc/net/tcp) start
                // once nginx has let go of this probe: give it a moment.
                let settle = Instant::now() + Duration::from_secs(1);
                while procfs::server_connections(listen).is_ok_and(|c| c > 0)
                    && Instant::now() < settle
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Ok(n);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nginx did not accept connections on {listen} within --ready-timeout-s: {}",
                    n.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What nginx said on stderr and in its error log, shortened.
    fn logs(&self) -> String {
        let said: Vec<String> = ["stderr.log", "error.log"]
            .iter()
            .map(|f| log_tail(&self.dir.path().join(f), 5))
            .filter(|s| !s.is_empty())
            .collect();
        if said.is_empty() {
            "nothing in its logs".into()
        } else {
            said.join(" | ")
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the master still runs.
    pub fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("nginx exited ({status}): {}", self.logs())),
            Err(e) => Err(format!("waiting on nginx: {e}")),
        }
    }

    /// SIGTERM to the master (nginx's fast shutdown: the workers close
    /// their connections and exit, then the master), up to 3 s, then
    /// SIGKILL to the master and the workers it had.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id();
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The workers do not die with a killed master: kill them too. The
        // master goes first, so that it cannot start new ones.
        let workers = procfs::children(pid);
        let _ = self.child.kill();
        for w in workers {
            // SAFETY: kill(2) on a worker of the nginx we started, listed
            // just before.
            unsafe {
                libc::kill(w as libc::pid_t, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Bun server: the pub/sub a JavaScript developer would write with
/// `Bun.serve` (WebSocket topics for `/ws`, a set of SSE streams per channel
/// for `/events`). It prints the gateway's READY line so that the bench
/// reads its port the same way.
pub const BUN_SCRIPT: &str = r#"// Written by the bench: Bun's built-in pub/sub for WebSockets, and the
// controllers of the open SSE streams by channel.
const streams = new Map();
const encoder = new TextEncoder();
const server = Bun.serve({
  hostname: "127.0.0.1",
  port: 0,
  idleTimeout: 0, // SSE streams and held connections stay open
  async fetch(req, server) {
    const url = new URL(req.url);
    const channel = url.searchParams.get("channel");
    if (!channel) return new Response("no channel\n", { status: 400 });
    if (url.pathname === "/ws" && server.upgrade(req, { data: { channel } })) return;
    if (url.pathname === "/pub" && req.method === "POST") {
      const body = await req.text();
      server.publish(channel, body);
      const event = encoder.encode(`data: ${body.split("\n").join("\ndata: ")}\n\n`);
      for (const c of streams.get(channel) ?? []) c.enqueue(event);
      return new Response(null, { status: 202 });
    }
    if (url.pathname === "/events" && req.headers.get("accept")?.includes("text/event-stream")) {
      let controller;
      const body = new ReadableStream({
        start(c) {
          controller = c;
          if (!streams.has(channel)) streams.set(channel, new Set());
          streams.get(channel).add(c);
          // Bun sends the response head with the first chunk.
          c.enqueue(encoder.encode(": hi\n\n"));
        },
        cancel() {
          streams.get(channel)?.delete(controller);
        },
      });
      return new Response(body, {
        headers: { "Content-Type": "text/event-stream", "Cache-Control": "no-cache" },
      });
    }
    return new Response("not found\n", { status: 404 });
  },
  websocket: {
    open(ws) {
      ws.subscribe(ws.data.channel);
    },
    message() {},
  },
});
console.log(`READY listen=127.0.0.1:${server.port} zmq=-`);
"#;

/// Bun running [`BUN_SCRIPT`] from its own temporary directory (which
/// holds its stderr too); dropping it stops Bun, then removes the
/// directory.
pub struct Bun {
    pub process: Gateway,
    /// Removed after `process` has stopped (fields drop in this order).
    _dir: TempDir,
}

impl Bun {
    pub fn spawn(bin: &Path, ready_timeout: Duration) -> Result<Bun, String> {
        let dir = TempDir::new("bun")?;
        let script = dir.path().join("server.js");
        fs::write(&script, BUN_SCRIPT).map_err(|e| format!("write {}: {e}", script.display()))?;
        let stderr_path = dir.path().join("stderr.log");
        let stderr =
            File::create(&stderr_path).map_err(|e| format!("{}: {e}", stderr_path.display()))?;
        // Bun runs in its directory: a relative path to it (not a bare name,
        // which is looked up on PATH) is made absolute first.
        let bin = &if bin.components().count() > 1 {
            std::path::absolute(bin).map_err(|e| format!("{}: {e}", bin.display()))?
        } else {
            bin.to_path_buf()
        };
        let mut cmd = Command::new(bin);
        crate::sys::place_server(&mut cmd);
        cmd.arg(&script).current_dir(dir.path());
        let process = Gateway::spawn_command("bun", cmd, bin, stderr.into(), ready_timeout)
            .map_err(|e| match log_tail(&stderr_path, 5) {
                tail if tail.is_empty() => e,
                tail => format!("{e}: {tail}"),
            })?;
        Ok(Bun { process, _dir: dir })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_are_fresh_and_removed() {
        let a = TempDir::new("test").unwrap();
        let b = TempDir::new("test").unwrap();
        assert_ne!(a.path(), b.path());
        assert!(a.path().starts_with(std::env::temp_dir()));
        fs::create_dir(a.path().join("sub")).unwrap();
        fs::write(a.path().join("sub/f"), "x").unwrap();
        let kept = a.path().to_owned();
        drop(a);
        assert!(!kept.exists());
        assert!(b.path().is_dir());
    }

    #[test]
    fn the_nginx_configuration() {
        let dir = Path::new("/tmp/bench-nchan-1-0");
        let conf = nginx_conf(
            Path::new("/m/ngx_nchan_module.so"),
            3,
            dir,
            "127.0.0.1:4321".parse().unwrap(),
            None,
        );
        for want in [
            "load_module \"/m/ngx_nchan_module.so\";\n",
            "daemon off;\n",
            "master_process on;\n",
            "worker_processes 3;\n",
            "worker_rlimit_nofile 20000;\n",
            "worker_connections 20000;",
            "pid \"/tmp/bench-nchan-1-0/nginx.pid\";",
            "error_log \"/tmp/bench-nchan-1-0/error.log\" warn;",
            "client_body_temp_path \"/tmp/bench-nchan-1-0/client_body\";",
            "access_log off;",
            "listen 127.0.0.1:4321;",
            "nchan_channel_id $arg_channel;",
            "location = /ws {\n            nchan_subscriber websocket;",
            "location = /events {\n            nchan_subscriber eventsource longpoll;",
            "location = /pub {\n            nchan_publisher http;",
            "keepalive_requests 1000000;",
        ] {
            assert!(conf.contains(want), "no {want:?} in\n{conf}");
        }
        // Braces balance (a typo there is a config nginx refuses).
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
        // Every path written is inside the directory.
        for line in conf.lines().filter(|l| l.contains("\"/")) {
            assert!(
                line.contains("/tmp/bench-nchan-1-0/") || line.contains("load_module"),
                "{line}"
            );
        }
        assert!(!conf.contains("ssl"), "{conf}");
        // With TLS: the same listener, `ssl`, with the certificate.
        let files = TlsFiles {
            cert: "/tmp/bench-tls-1-0/cert.pem".into(),
            key: "/tmp/bench-tls-1-0/key.pem".into(),
        };
        let tls = nginx_conf(
            Path::new("/m/ngx_nchan_module.so"),
            3,
            dir,
            "127.0.0.1:4321".parse().unwrap(),
            Some(&files),
        );
        for want in [
            "listen 127.0.0.1:4321 ssl;\n",
            "ssl_certificate \"/tmp/bench-tls-1-0/cert.pem\";\n",
            "ssl_certificate_key \"/tmp/bench-tls-1-0/key.pem\";\n",
            "ssl_protocols TLSv1.2 TLSv1.3;\n",
            "location = /ws {\n            nchan_subscriber websocket;",
        ] {
            assert!(tls.contains(want), "no {want:?} in\n{tls}");
        }
        assert_eq!(tls.matches('{').count(), tls.matches('}').count());
    }

    #[test]
    fn the_bun_script_serves_the_bench_paths() {
        for want in [
            "Bun.serve(",
            "hostname: \"127.0.0.1\"",
            "port: 0",
            "url.pathname === \"/ws\" && server.upgrade(req, { data: { channel } })",
            "url.pathname === \"/pub\" && req.method === \"POST\"",
            "server.publish(channel, body)",
            "status: 202",
            "\"/events\"",
            "text/event-stream",
            "ws.subscribe(ws.data.channel)",
            "READY listen=127.0.0.1:${server.port} zmq=-",
        ] {
            assert!(BUN_SCRIPT.contains(want), "no {want:?}");
        }
    }

    #[test]
    fn spawn_failures_say_what_failed() {
        let err = Nginx::spawn(
            Path::new("/nonexistent/nginx"),
            Path::new("/nonexistent/ngx_nchan_module.so"),
            1,
            None,
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
        assert!(err.contains("libnginx-mod-nchan"), "{err}");
        // A module that exists (any file will do for this check) but an
        // nginx that does not.
        let module = TempDir::new("test").unwrap();
        let err = Nginx::spawn(
            Path::new("/nonexistent/nginx"),
            module.path(),
            1,
            None,
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
        assert!(err.starts_with("spawn /nonexistent/nginx"), "{err}");
        let err = Bun::spawn(Path::new("/nonexistent/bun"), Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(err.starts_with("spawn /nonexistent/bun"), "{err}");
        // `false` ignores the script and exits at once.
        let err = Bun::spawn(Path::new("false"), Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(err.contains("exited before READY"), "{err}");
    }

    #[test]
    fn log_tails() {
        let dir = TempDir::new("test").unwrap();
        let f = dir.path().join("log");
        fs::write(&f, "one\n\ntwo\nthree\n").unwrap();
        assert_eq!(log_tail(&f, 2), "two | three");
        assert_eq!(log_tail(&f, 10), "one | two | three");
        assert_eq!(log_tail(&dir.path().join("none"), 2), "");
    }
}
