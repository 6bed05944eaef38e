//! Spawning a server that prints the gateway's READY line (the gateway and
//! the baseline, with the same flags; Bun's script prints it too), waiting
//! for that line, and making sure the process is gone when the bench is.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What the gateway's `READY listen=ADDR zmq=ENDPOINT [upstream=ENDPOINT,…]
/// [grpc=ADDR]` line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub listen: SocketAddr,
    /// The bound ZeroMQ endpoint, `None` when the line says `zmq=-`.
    pub zmq: Option<String>,
    /// The first upstream endpoint bound (`--upstream-bind`, port `*`
    /// resolved), `None` when the line has no `upstream=`.
    pub upstream: Option<String>,
    /// The separate gRPC listener (`--grpc-listen`), `None` when the line
    /// has no `grpc=`.
    pub grpc: Option<SocketAddr>,
}

/// Parses the READY line (trailing newline and unknown extra `key=value`
/// fields allowed, so the gateway can add some later).
pub fn parse_ready(line: &str) -> Result<Ready, String> {
    let mut words = line.split_whitespace();
    if words.next() != Some("READY") {
        return Err(format!("not a READY line: {line:?}"));
    }
    let mut listen = None;
    let mut zmq = None;
    let mut upstream = None;
    let mut grpc = None;
    for word in words {
        match word.split_once('=') {
            Some(("listen", v)) => {
                listen = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("READY listen={v:?}: {e}"))?,
                )
            }
            Some(("zmq", "-")) => zmq = Some(None),
            Some(("zmq", v)) => zmq = Some(Some(v.to_string())),
            Some(("upstream", v)) => {
                upstream = v
                    .split(',')
                    .next()
                    .filter(|e| !e.is_empty())
                    .map(String::from)
            }
            Some(("grpc", v)) => {
                grpc = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("READY grpc={v:?}: {e}"))?,
                )
            }
            Some(_) => {}
            None => return Err(format!("READY line: {word:?} is not key=value")),
        }
    }
    Ok(Ready {
        listen: listen.ok_or_else(|| format!("READY line without listen=: {line:?}"))?,
        zmq: zmq.unwrap_or(None),
        upstream,
        grpc,
    })
}

/// A spawned server; dropping it stops the process (SIGTERM, then SIGKILL).
pub struct Gateway {
    child: Child,
    /// "gateway", "baseline" or "bun", for messages.
    name: &'static str,
    pub ready: Ready,
}

impl Gateway {
    /// Spawns a gateway or baseline binary with their common flags.
    pub fn spawn(
        name: &'static str,
        bin: &Path,
        cores: u32,
        extra_args: &[String],
        stderr: Option<&Path>,
        ready_timeout: Duration,
    ) -> Result<Gateway, String> {
        let stderr = match stderr {
            Some(path) => {
                Stdio::from(File::create(path).map_err(|e| format!("{}: {e}", path.display()))?)
            }
            None => Stdio::null(),
        };
        let mut cmd = Command::new(bin);
        crate::sys::place_server(&mut cmd);
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--zmq-bind",
            "tcp://127.0.0.1:*",
            "--cores",
        ])
        .arg(cores.to_string())
        .args(extra_args);
        Gateway::spawn_command(name, cmd, bin, stderr, ready_timeout)
    }

    /// Spawns `cmd` (the program `bin`, for messages) and waits for the
    /// READY line on its stdout.
    pub fn spawn_command(
        name: &'static str,
        mut cmd: Command,
        bin: &Path,
        stderr: Stdio,
        ready_timeout: Duration,
    ) -> Result<Gateway, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        // Reads up to the READY line (skipping anything the server prints
        // before it), then keeps draining stdout so the server never blocks
        // on (or dies of) a full or closed pipe.
        std::thread::Builder::new()
            .name("server-stdout".into())
            .spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let ready = lines
                    .by_ref()
                    .find(|l| l.as_ref().map_or(true, |l| l.starts_with("READY")));
                let _ = tx.send(ready);
                for _ in lines {}
            })
            .map_err(|e| format!("spawn reader thread: {e}"))?;
        // From here on, dropping `gateway` kills the process.
        let mut gateway = Gateway {
            child,
            name,
            ready: Ready {
                listen: ([0, 0, 0, 0], 0).into(),
                zmq: None,
                upstream: None,
                grpc: None,
            },
        };
        let deadline = Instant::now() + ready_timeout;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Some(Ok(line))) => {
                    gateway.ready = parse_ready(&line)?;
                    return Ok(gateway);
                }
                Ok(Some(Err(e))) => return Err(format!("reading the {name}'s stdout: {e}")),
                Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = gateway.child.wait().map_err(|e| e.to_string())?;
                    return Err(format!("the {name} exited before READY ({status})"));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = gateway.child.try_wait() {
                        return Err(format!("the {name} exited before READY ({status})"));
                    }
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "no READY line from the {name} within {ready_timeout:?}"
                        ));
                    }
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (false if it exited or crashed).
    pub fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the {} exited ({status})", self.name)),
            Err(e) => Err(format!("waiting on the {}: {e}", self.name)),
        }
    }

    /// SIGTERM, up to 3 s to exit, then SIGKILL.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line() {
        assert_eq!(
            parse_ready("READY listen=127.0.0.1:40123 zmq=tcp://127.0.0.1:35001\n").unwrap(),
            Ready {
                listen: "127.0.0.1:40123".parse().unwrap(),
                zmq: Some("tcp://127.0.0.1:35001".into()),
                upstream: None,
                grpc: None,
            }
        );
        assert_eq!(
            parse_ready("READY listen=[::1]:80 zmq=- extra=1").unwrap(),
            Ready {
                listen: "[::1]:80".parse().unwrap(),
                zmq: None,
                upstream: None,
                grpc: None,
            }
        );
        // Two-way: the upstream endpoints bound, the first one kept.
        let r = parse_ready(
            "READY listen=127.0.0.1:1 zmq=tcp://127.0.0.1:2 upstream=tcp://127.0.0.1:3,ipc:///x\n",
        )
        .unwrap();
        assert_eq!(r.upstream.as_deref(), Some("tcp://127.0.0.1:3"));
        let r = parse_ready("READY listen=127.0.0.1:1 zmq=- grpc=127.0.0.1:4").unwrap();
        assert_eq!(r.grpc, Some("127.0.0.1:4".parse().unwrap()));
        assert!(parse_ready("READY listen=127.0.0.1:1 grpc=x").is_err());
        assert_eq!(parse_ready("READY listen=127.0.0.1:1").unwrap().zmq, None);
    }

    #[test]
    fn not_a_ready_line() {
        assert!(parse_ready("").is_err());
        assert!(parse_ready("2025-01-01 INFO gateway ready").is_err());
        assert!(
            parse_ready("READY zmq=tcp://127.0.0.1:1").is_err(),
            "no listen"
        );
        assert!(parse_ready("READY listen=127.0.0.1").is_err(), "no port");
        assert!(parse_ready("READY listen=127.0.0.1:1 junk").is_err());
    }

    #[test]
    fn spawn_reports_a_binary_that_never_gets_ready() {
        // `true` ignores its arguments and exits without printing.
        let err = Gateway::spawn(
            "gateway",
            Path::new("true"),
            1,
            &[],
            None,
            Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(err.contains("exited before READY"), "{err}");
        let err = Gateway::spawn(
            "baseline",
            Path::new("/nonexistent/gw"),
            1,
            &[],
            None,
            Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(err.contains("spawn"), "{err}");
    }
}
