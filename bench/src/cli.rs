//! Command-line arguments: one subcommand per scenario.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Load generator for the gateway (and, later, the baseline server it is
/// compared with).
#[derive(Debug, Parser)]
#[command(name = "bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Memory per idle connection: open N connections that each subscribe to
    /// a channel and then stay silent; report the server's RSS delta / N
    /// (userspace) and the machine's Slab delta / N (kernel).
    Idle(IdleArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// WebSocket: `GET /ws?channel=…` upgrade, answered `101`.
    Ws,
    /// Server-Sent Events: `GET /events?channel=…` with
    /// `Accept: text/event-stream`, answered `200`.
    Sse,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// Which server is measured: one this run spawns, or one already running.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Gateway binary to spawn (with `--listen 127.0.0.1:0 --zmq-bind
    /// tcp://127.0.0.1:* --cores N`); it must print `READY listen=ADDR …`.
    #[arg(
        long,
        value_name = "BIN",
        required_unless_present = "pid",
        conflicts_with = "pid"
    )]
    pub gateway: Option<PathBuf>,
    /// Cores the spawned gateway runs on.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub cores: u32,
    /// Extra argument for the spawned gateway (repeatable), e.g.
    /// `--gateway-arg=--ring-entries=8192`.
    #[arg(long = "gateway-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// File the spawned gateway's stderr goes to (default: discarded).
    #[arg(long, value_name = "FILE")]
    pub gateway_stderr: Option<PathBuf>,
    /// How long to wait for the spawned gateway's READY line.
    #[arg(long, default_value_t = 30.0, value_parser = seconds)]
    pub ready_timeout_s: f64,
    /// Measure this already running server process instead of spawning one
    /// (its VmRSS is read from /proc/PID/status); needs --target.
    #[arg(long, requires = "target", conflicts_with_all = ["gateway", "gateway_args", "gateway_stderr"])]
    pub pid: Option<u32>,
    /// Address of the already running server (with --pid).
    #[arg(long, value_name = "ADDR", requires = "pid")]
    pub target: Option<SocketAddr>,
}

/// The server, resolved from [`ServerArgs`].
#[derive(Debug, Clone, PartialEq)]
pub enum Server {
    Spawn {
        bin: PathBuf,
        cores: u32,
        extra_args: Vec<String>,
        stderr: Option<PathBuf>,
        ready_timeout: Duration,
    },
    Attach {
        pid: u32,
        target: SocketAddr,
    },
}

impl ServerArgs {
    pub fn server(&self) -> Server {
        match (&self.gateway, self.pid, self.target) {
            (_, Some(pid), Some(target)) => Server::Attach { pid, target },
            (Some(bin), _, _) => Server::Spawn {
                bin: bin.clone(),
                cores: self.cores,
                extra_args: self.gateway_args.clone(),
                stderr: self.gateway_stderr.clone(),
                ready_timeout: Duration::from_secs_f64(self.ready_timeout_s),
            },
            // clap's required_unless_present / requires rule these out.
            _ => unreachable!("either --gateway or --pid with --target"),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub connections: u64,
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    /// Distinct channels; connection i subscribes to "idle-{i % C}".
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub channels: u64,
    /// Local addresses client sockets bind to, round robin (comma-separated).
    /// Each gives about one ephemeral port range of connections to the
    /// target; add more (127.0.0.2, …) when local ports run short.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1",
        value_name = "IP,IP,…"
    )]
    pub sources: Vec<IpAddr>,
    /// Handshakes in flight at once (keeps the listen backlog from overflowing).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub in_flight: u64,
    /// The whole connect phase stops after this long, whatever is left.
    #[arg(long, default_value_t = 60.0, value_parser = seconds)]
    pub connect_timeout_s: f64,
    /// One handshake (connect, request, response head) fails after this long.
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    pub handshake_timeout_s: f64,
    /// How long the connections are held idle before the server is measured.
    #[arg(long, default_value_t = 2.0, value_parser = seconds)]
    pub hold_s: f64,
}

/// A non-negative, finite number of seconds.
fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if v.is_finite() && (0.0..=1e9).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s:?}: seconds must be between 0 and 1e9"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<IdleArgs, clap::Error> {
        let mut all = vec!["bench", "idle"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|cli| match cli.scenario {
            Scenario::Idle(a) => a,
        })
    }

    #[test]
    fn defaults() {
        let a = parse(&["--gateway", "target/release/gateway"]).unwrap();
        assert_eq!(a.connections, 10_000);
        assert_eq!(a.transport, Transport::Ws);
        assert_eq!(a.channels, 100);
        assert_eq!(a.sources, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(a.in_flight, 256);
        assert_eq!(a.connect_timeout_s, 60.0);
        assert_eq!(a.hold_s, 2.0);
        assert_eq!(
            a.server.server(),
            Server::Spawn {
                bin: "target/release/gateway".into(),
                cores: 2,
                extra_args: vec![],
                stderr: None,
                ready_timeout: Duration::from_secs(30),
            }
        );
    }

    #[test]
    fn every_flag() {
        let a = parse(&[
            "--gateway",
            "gw",
            "--cores",
            "4",
            "--connections",
            "19000",
            "--transport",
            "sse",
            "--channels",
            "7",
            "--sources",
            "127.0.0.1,127.0.0.2,::1",
            "--connect-timeout-s",
            "5",
            "--hold-s",
            "0.5",
            "--gateway-arg=--ring-entries=8192",
            "--gateway-arg",
            "--log-level=warn",
        ])
        .unwrap();
        assert_eq!(a.connections, 19_000);
        assert_eq!(a.transport, Transport::Sse);
        assert_eq!(a.channels, 7);
        assert_eq!(a.sources.len(), 3);
        assert_eq!(a.sources[1], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(a.connect_timeout_s, 5.0);
        assert_eq!(a.hold_s, 0.5);
        match a.server.server() {
            Server::Spawn {
                cores, extra_args, ..
            } => {
                assert_eq!(cores, 4);
                assert_eq!(extra_args, vec!["--ring-entries=8192", "--log-level=warn"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn attach_to_a_running_server() {
        let a = parse(&["--pid", "1234", "--target", "127.0.0.1:8080"]).unwrap();
        assert_eq!(
            a.server.server(),
            Server::Attach {
                pid: 1234,
                target: "127.0.0.1:8080".parse().unwrap()
            }
        );
    }

    #[test]
    fn refuses_bad_combinations_and_values() {
        // Neither server given.
        assert!(parse(&[]).is_err());
        // --pid needs --target and the other way round.
        assert!(parse(&["--pid", "1"]).is_err());
        assert!(parse(&["--target", "127.0.0.1:1"]).is_err());
        // Both a binary to spawn and a running server.
        assert!(parse(&["--gateway", "gw", "--pid", "1", "--target", "127.0.0.1:1"]).is_err());
        for bad in [
            &["--connections", "0"][..],
            &["--channels", "0"],
            &["--cores", "0"],
            &["--in-flight", "0"],
            &["--transport", "grpc"],
            &["--sources", "localhost"],
            &["--hold-s", "-1"],
            &["--connect-timeout-s", "nan"],
        ] {
            let mut args = vec!["--gateway", "gw"];
            args.extend_from_slice(bad);
            assert!(parse(&args).is_err(), "{bad:?} accepted");
        }
    }
}
