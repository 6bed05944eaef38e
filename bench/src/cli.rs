//! Command-line arguments: one subcommand per scenario.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::tls::TlsFiles;

/// Load generator for the gateway and the baseline server it is compared with.
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
    /// Fan-out: N WebSocket or SSE subscribers over C channels, one ZeroMQ
    /// publisher (HTTP POSTs for nchan and Bun) at R messages/s for D
    /// seconds; report deliveries/s, loss, reordering and publish→receive
    /// latency.
    Fanout(FanoutArgs),
    /// Connect storm: N WebSocket clients connected, all dropped at once,
    /// then all reconnecting, once all together and once with jitter; report
    /// the time until all are back and handshakes/s.
    Storm(StormArgs),
    /// Two-way round trips: N WebSocket clients on the `gateway.v1`
    /// subprotocol each send R messages/s on their own channel, which the
    /// bench's hub (ZeroMQ PULL from the server's `--upstream-bind`) sends
    /// straight back to the sender (`!ADDRESS`); report round-trip latency
    /// and loss, then, with a few clients sending as fast as they are
    /// answered (a bounded window each), the messages/s the server carries
    /// upstream and back, and its CPU.
    Roundtrip(RoundtripArgs),
    /// gRPC fan-out: S `gateway.v1.Gateway/Subscribe` streams over C
    /// channels, all on one HTTP/2 connection or each on a connection of its
    /// own (`--layout`, both by default, each against a freshly started
    /// server), one ZeroMQ publisher at R messages/s for D seconds; report
    /// deliveries/s, loss, publish→receive latency and the server's CPU.
    Grpc(GrpcArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// WebSocket: `GET /ws?channel=…` upgrade, answered `101`.
    Ws,
    /// Server-Sent Events: `GET /events?channel=…` with
    /// `Accept: text/event-stream`, answered `200`.
    Sse,
    /// Long-poll: `GET /events?channel=…` without a cursor, held by the
    /// server until the next message (idle only: open once sent).
    #[value(name = "longpoll")]
    LongPoll,
    /// gRPC: an HTTP/2 connection (cleartext, prior knowledge) with one
    /// `gateway.v1.Gateway/Subscribe` stream, on the server's gRPC listener
    /// (idle only: `bench grpc` measures delivery).
    Grpc,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::LongPoll => "longpoll",
            Transport::Grpc => "grpc",
        }
    }
}

/// What `--server` can name (a comma-separated list of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServerChoice {
    /// The gateway (`--gateway BIN`).
    Gateway,
    /// The baseline server (`--baseline BIN`).
    Baseline,
    /// nginx with the nchan module (`--nginx BIN`, `--nchan-module PATH`).
    Nchan,
    /// Bun running a small pub/sub script (`--bun BIN`).
    Bun,
    /// The gateway, then the baseline (`gateway,baseline`).
    Both,
    /// The gateway, the baseline, nchan and Bun, in that order.
    All,
}

impl ServerChoice {
    /// The servers this name stands for, in order.
    fn kinds(self) -> &'static [ServerKind] {
        match self {
            ServerChoice::Gateway => &[ServerKind::Gateway],
            ServerChoice::Baseline => &[ServerKind::Baseline],
            ServerChoice::Nchan => &[ServerKind::Nchan],
            ServerChoice::Bun => &[ServerKind::Bun],
            ServerChoice::Both => &[ServerKind::Gateway, ServerKind::Baseline],
            ServerChoice::All => &[
                ServerKind::Gateway,
                ServerKind::Baseline,
                ServerKind::Nchan,
                ServerKind::Bun,
            ],
        }
    }
}

/// One of the servers the bench measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Gateway,
    Baseline,
    Nchan,
    Bun,
}

impl ServerKind {
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Gateway => "gateway",
            ServerKind::Baseline => "baseline",
            ServerKind::Nchan => "nchan",
            ServerKind::Bun => "bun",
        }
    }

    /// Whether it answers `GET /healthz` with its connection count (the
    /// gateway's contract); the others are counted from /proc/net/tcp.
    pub fn has_healthz(self) -> bool {
        matches!(self, ServerKind::Gateway | ServerKind::Baseline)
    }

    /// Why it cannot carry what clients send (roundtrip), if it cannot:
    /// nginx + nchan and the Bun script only deliver.
    pub fn check_two_way(self) -> Result<(), String> {
        match self {
            ServerKind::Gateway | ServerKind::Baseline => Ok(()),
            ServerKind::Nchan | ServerKind::Bun => Err(format!(
                "{} has no two-way contract (the gateway.v1 subprotocol, --upstream-bind): \
                 roundtrip measures the gateway and the baseline",
                if self == ServerKind::Bun {
                    "the Bun script (bun)"
                } else {
                    "nchan"
                }
            )),
        }
    }

    /// Why it cannot be measured over TLS (`--tls`), if it cannot: the
    /// bench gives a certificate to the gateway and to nginx only.
    pub fn check_tls(self) -> Result<(), String> {
        match self {
            ServerKind::Gateway | ServerKind::Nchan => Ok(()),
            ServerKind::Baseline | ServerKind::Bun => Err(format!(
                "--tls: the bench runs {} without TLS: --tls measures the gateway and nchan",
                if self == ServerKind::Bun {
                    "the Bun script (bun)"
                } else {
                    "the baseline"
                }
            )),
        }
    }

    /// Why it cannot serve `transport`, if it cannot: the baseline and the
    /// Bun script leave long-poll out; nchan and the Bun script have no gRPC.
    pub fn check_transport(self, transport: Transport) -> Result<(), String> {
        match (self, transport) {
            (ServerKind::Nchan | ServerKind::Bun, Transport::Grpc) => Err(format!(
                "{} has no gRPC service: gRPC measures the gateway and the baseline",
                if self == ServerKind::Bun {
                    "the Bun script (bun)"
                } else {
                    "nchan"
                }
            )),
            (ServerKind::Baseline | ServerKind::Bun, Transport::LongPoll) => Err(format!(
                "{} serves WebSocket and SSE, not long-poll (--transport ws|sse)",
                if self == ServerKind::Bun {
                    "the Bun script (bun)"
                } else {
                    "the baseline"
                }
            )),
            _ => Ok(()),
        }
    }
}

/// Debian's path of the nchan module (package libnginx-mod-nchan).
pub const NCHAN_MODULE_DEBIAN: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

/// Which servers are measured: each one this run spawns, one after the
/// other, or one already running.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Servers to measure, one after the other, comma-separated: gateway,
    /// baseline, nchan, bun; `both` is gateway,baseline and `all` is all
    /// four. With more than one, every figure is also given as the ratio
    /// first server / each other one.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "gateway",
        value_name = "SERVER,…"
    )]
    pub server: Vec<ServerChoice>,
    /// Gateway binary to spawn (with `--listen 127.0.0.1:0 --zmq-bind
    /// tcp://127.0.0.1:* --cores N`); it must print `READY listen=ADDR …`.
    #[arg(long, value_name = "BIN", conflicts_with = "pid")]
    pub gateway: Option<PathBuf>,
    /// Baseline binary to spawn, with the same arguments as the gateway (it
    /// has the same contract and READY line).
    #[arg(long, value_name = "BIN", conflicts_with = "pid")]
    pub baseline: Option<PathBuf>,
    /// nginx binary for `--server nchan` (default: `nginx` on PATH). The
    /// bench writes its configuration into a temporary directory and runs
    /// it in the foreground with `--cores` worker processes.
    #[arg(long, value_name = "BIN", conflicts_with = "pid")]
    pub nginx: Option<PathBuf>,
    /// The nchan module nginx loads (default: Debian's
    /// /usr/lib/nginx/modules/ngx_nchan_module.so).
    #[arg(long, value_name = "PATH", conflicts_with = "pid")]
    pub nchan_module: Option<PathBuf>,
    /// Bun binary for `--server bun` (default: `bun` on PATH), e.g. the
    /// `bin/bun` of the npm package @oven/bun-linux-x64. It runs a script
    /// the bench writes; one JavaScript thread, so `--cores` does not apply.
    #[arg(long, value_name = "BIN", conflicts_with = "pid")]
    pub bun: Option<PathBuf>,
    /// Cores the spawned server runs on: the gateway's and baseline's
    /// `--cores N`, nginx's worker processes (not Bun's).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub cores: u32,
    /// CPUs the spawned server may run on (`0,1`, `0-3`, `0-1,6`): with
    /// `--client-cpus`, the server and the load generator stop competing
    /// for the same CPUs, and what is measured is the server's own rate.
    /// Default: wherever the scheduler puts it.
    #[arg(long, value_name = "CPUS", value_parser = cpu_list)]
    pub server_cpus: Option<CpuList>,
    /// CPUs the bench itself (its client threads and publisher) runs on.
    #[arg(long, value_name = "CPUS", value_parser = cpu_list)]
    pub client_cpus: Option<CpuList>,
    /// Extra argument for the spawned gateway (repeatable), e.g.
    /// `--gateway-arg=--ring-entries=8192`.
    #[arg(long = "gateway-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub gateway_args: Vec<String>,
    /// Extra argument for the spawned baseline (repeatable).
    #[arg(long = "baseline-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub baseline_args: Vec<String>,
    /// File the spawned gateway's stderr goes to (default: discarded).
    #[arg(long, value_name = "FILE")]
    pub gateway_stderr: Option<PathBuf>,
    /// File the spawned baseline's stderr goes to (default: discarded).
    #[arg(long, value_name = "FILE")]
    pub baseline_stderr: Option<PathBuf>,
    /// How long to wait for the spawned server's READY line (nginx: for its
    /// port to accept a connection).
    #[arg(long, default_value_t = 30.0, value_parser = seconds)]
    pub ready_timeout_s: f64,
    /// Measure this already running server process instead of spawning one
    /// (its VmRSS is read from /proc/PID/status; nchan: the nginx master's
    /// pid, its workers are added); needs --target. `--server` then only
    /// names it (one server).
    #[arg(long, requires = "target", conflicts_with_all = ["gateway", "baseline", "gateway_args", "baseline_args", "gateway_stderr", "baseline_stderr"])]
    pub pid: Option<u32>,
    /// Address of the already running server (with --pid).
    #[arg(long, value_name = "ADDR", requires = "pid")]
    pub target: Option<SocketAddr>,
    /// ZeroMQ endpoint the already running server subscribes on (with
    /// --pid; fanout needs it, except for nchan and Bun, which get
    /// `POST /pub?channel=…` on --target), e.g. `tcp://127.0.0.1:5560`.
    #[arg(long = "zmq", value_name = "ENDPOINT", requires = "pid")]
    pub zmq: Option<String>,
}

/// A server, resolved from [`ServerArgs`].
#[derive(Debug, Clone, PartialEq)]
pub enum Server {
    /// The gateway or the baseline: a binary with their flags and READY line.
    Spawn {
        bin: PathBuf,
        cores: u32,
        extra_args: Vec<String>,
        stderr: Option<PathBuf>,
        ready_timeout: Duration,
    },
    /// nginx + nchan with `workers` worker processes; `listen … ssl` with
    /// `tls`'s certificate when given.
    Nchan {
        nginx: PathBuf,
        module: PathBuf,
        workers: u32,
        tls: Option<TlsFiles>,
        ready_timeout: Duration,
    },
    /// Bun running the bench's script.
    Bun {
        bin: PathBuf,
        ready_timeout: Duration,
    },
    Attach {
        pid: u32,
        target: SocketAddr,
        zmq: Option<String>,
    },
}

impl Server {
    /// The same server, spawned with TLS on its listener with `files`: the
    /// gateway's `--tls-cert FILE --tls-key FILE`, nginx's `listen … ssl`.
    /// An attached server or Bun cannot be given one.
    pub fn with_tls(&self, files: &TlsFiles) -> Result<Server, String> {
        let mut server = self.clone();
        match &mut server {
            Server::Spawn { extra_args, .. } => {
                for (flag, path) in [("--tls-cert", &files.cert), ("--tls-key", &files.key)] {
                    extra_args.push(flag.into());
                    extra_args.push(path.display().to_string());
                }
            }
            Server::Nchan { tls, .. } => *tls = Some(files.clone()),
            Server::Bun { .. } => {
                return Err("--tls: the Bun script is run without TLS".into());
            }
            Server::Attach { .. } => return Err(
                "--tls gives the servers the bench spawns a certificate it makes: not with --pid"
                    .into(),
            ),
        }
        Ok(server)
    }
}

impl ServerArgs {
    /// The servers `--server` names, in order, each once.
    pub fn kinds(&self) -> Result<Vec<ServerKind>, String> {
        let mut kinds: Vec<ServerKind> = Vec::new();
        for kind in self.server.iter().flat_map(|c| c.kinds()) {
            if kinds.contains(kind) {
                return Err(format!("--server names the {} twice", kind.name()));
            }
            kinds.push(*kind);
        }
        if kinds.is_empty() {
            return Err("--server names no server".into());
        }
        Ok(kinds)
    }

    /// The servers to measure, in order, or why the arguments do not name
    /// them.
    pub fn servers(&self) -> Result<Vec<(ServerKind, Server)>, String> {
        let kinds = self.kinds()?;
        if let (Some(pid), Some(target)) = (self.pid, self.target) {
            let [kind] = kinds[..] else {
                return Err("--pid attaches to one server: name one with --server".into());
            };
            return Ok(vec![(
                kind,
                Server::Attach {
                    pid,
                    target,
                    zmq: self.zmq.clone(),
                },
            )]);
        }
        let ready_timeout = Duration::from_secs_f64(self.ready_timeout_s);
        kinds
            .iter()
            .map(|&kind| {
                let (bin, extra, stderr) = match kind {
                    ServerKind::Gateway => {
                        (&self.gateway, &self.gateway_args, &self.gateway_stderr)
                    }
                    ServerKind::Baseline => {
                        (&self.baseline, &self.baseline_args, &self.baseline_stderr)
                    }
                    ServerKind::Nchan => {
                        let server = Server::Nchan {
                            nginx: self.nginx.clone().unwrap_or_else(|| "nginx".into()),
                            module: self
                                .nchan_module
                                .clone()
                                .unwrap_or_else(|| NCHAN_MODULE_DEBIAN.into()),
                            workers: self.cores,
                            tls: None,
                            ready_timeout,
                        };
                        return Ok((kind, server));
                    }
                    ServerKind::Bun => {
                        let server = Server::Bun {
                            bin: self.bun.clone().unwrap_or_else(|| "bun".into()),
                            ready_timeout,
                        };
                        return Ok((kind, server));
                    }
                };
                let bin = bin.as_ref().ok_or_else(|| {
                    format!(
                        "--server {} needs --{} BIN (or --pid and --target)",
                        self.server_names(),
                        kind.name()
                    )
                })?;
                Ok((
                    kind,
                    Server::Spawn {
                        bin: bin.clone(),
                        cores: self.cores,
                        extra_args: extra.clone(),
                        stderr: stderr.clone(),
                        ready_timeout,
                    },
                ))
            })
            .collect()
    }

    /// `--server` as given, for messages.
    fn server_names(&self) -> String {
        self.server
            .iter()
            .map(|c| {
                c.to_possible_value()
                    .expect("no skipped values")
                    .get_name()
                    .to_owned()
            })
            .collect::<Vec<_>>()
            .join(",")
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
    /// WebSocket only: offer this subprotocol (`gateway.v1`: a two-way
    /// client that never sends), which the 101 must choose; the gateway's
    /// welcome frame that follows is expected, not counted as data.
    #[arg(long, value_name = "NAME")]
    pub subprotocol: Option<String>,
    /// WebSocket only: offer permessage-deflate as browsers do; the report
    /// says how many 101s agreed (a server may decline and go on without
    /// it).
    #[arg(long)]
    pub deflate: bool,
    /// Present a token with each connection, signed HS256 with this secret
    /// under kid `idle` (give the gateway `--auth --auth-hs256-secret
    /// idle=SECRET`): connection i is user `idle-{i}`, reading and sending
    /// on `idle-*`, so each has a user channel of its own.
    #[arg(long, value_name = "SECRET")]
    pub token_hs256: Option<String>,
    /// Over TLS: the bench makes a certificate (ECDSA P-256, self-signed,
    /// for localhost), starts the gateway with it (`--tls-cert`,
    /// `--tls-key`) and nginx with `listen … ssl` on it, and the clients
    /// connect with TLS 1.3, trusting it, each a full handshake (no
    /// session resumption). The gateway and nchan only; WebSocket, SSE and
    /// long-poll.
    #[arg(long, conflicts_with = "pid")]
    pub tls: bool,
}

/// What the client side of fanout and storm share: how many sockets, from
/// where, on how many threads, how fast they connect.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Local addresses client sockets bind to, round robin (comma-separated);
    /// add more (127.0.0.2, …) when local ports run short.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1",
        value_name = "IP,IP,…"
    )]
    pub sources: Vec<IpAddr>,
    /// Client threads, each with its own epoll loop over its share of the
    /// connections (a contiguous block).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,
    /// Handshakes in flight at once, over all threads (each thread gets its
    /// share, at least 1): keeps the listen backlog from overflowing.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub in_flight: u64,
    /// One handshake attempt (connect, request, response head) fails after this long.
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    pub handshake_timeout_s: f64,
    /// Each connect phase stops after this long, whatever is left.
    #[arg(long, default_value_t = 60.0, value_parser = seconds)]
    pub connect_timeout_s: f64,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// How the subscribers subscribe: each SSE event's data holds what a
    /// WebSocket message would.
    #[arg(long, default_value = "ws", value_parser = transports_but(&[Transport::LongPoll, Transport::Grpc]))]
    pub transport: Transport,
    /// Subscribers; subscriber i is on channel "fanout-{i % C}".
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub connections: u64,
    /// Channels (1: one hot channel every subscriber is on).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub channels: u64,
    /// Messages published per second, in total, round robin over the channels.
    #[arg(long, default_value_t = 100.0, value_parser = positive)]
    pub rate: f64,
    /// How long the publisher publishes.
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    pub duration_s: f64,
    /// Payload size in bytes (at least 33: kind, channel, sequence number and
    /// send time in hex; more is filler before them).
    #[arg(long, default_value_t = crate::ws::TAIL_LEN as u64,
          value_parser = clap::value_parser!(u64).range(crate::ws::TAIL_LEN as u64..=crate::ws::PAYLOAD_BYTES_MAX as u64))]
    pub payload_bytes: u64,
    /// What fills the payload before its tail: `filler` (dots), or `json`
    /// (price-like records with varying numbers, as a busy JSON channel
    /// carries: what permessage-deflate is for).
    #[arg(long, value_enum, default_value_t = PayloadKind::Filler)]
    pub payload_kind: PayloadKind,
    /// WebSocket only: offer permessage-deflate as browsers do, and
    /// decompress compressed messages before checking them (a server may
    /// decline the offer; the report says how many agreed).
    #[arg(long)]
    pub deflate: bool,
    /// The subscription check (probes published to every channel until every
    /// subscriber has one) gives up after this long.
    #[arg(long, default_value_t = 30.0, value_parser = seconds)]
    pub subscribe_timeout_s: f64,
    /// After the last publication, wait at most this long for what is still
    /// on its way (stops early once everything expected has arrived).
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    pub drain_s: f64,
    /// Handshake attempts per subscriber (1: no retry).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
}

/// What fills a fan-out payload before its tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PayloadKind {
    Filler,
    Json,
}

impl PayloadKind {
    pub fn name(self) -> &'static str {
        match self {
            PayloadKind::Filler => "filler",
            PayloadKind::Json => "json",
        }
    }
}

/// How the storm drops its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CloseHow {
    /// SO_LINGER 0 then close: a RST, no TIME_WAIT left on the client.
    Reset,
    /// Plain close: a FIN; the client's sockets go through TIME_WAIT.
    Fin,
}

impl CloseHow {
    pub fn name(self) -> &'static str {
        match self {
            CloseHow::Reset => "reset",
            CloseHow::Fin => "fin",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Clients.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub connections: u64,
    #[arg(long, default_value = "ws", value_parser = transports_but(&[Transport::Grpc]))]
    pub transport: Transport,
    /// Distinct channels; client i subscribes to "storm-{i % C}".
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub channels: u64,
    /// In the jittered reconnect, each client waits a uniform random delay
    /// in [0, this) before its first attempt.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub jitter_ms: u64,
    /// How every client is dropped.
    #[arg(long, value_enum, default_value_t = CloseHow::Reset)]
    pub close: CloseHow,
    /// Handshake attempts per client and phase; a failed one is retried
    /// after a backoff.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
    /// First retry after about this long (±50 % random), doubling up to 1 s.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub backoff_ms: u64,
    /// After a drop, wait at most this long for the server to count the
    /// connections out (its /healthz; nchan's and Bun's sockets in
    /// /proc/net/tcp) before reconnecting.
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    pub settle_s: f64,
    /// Over TLS (see `bench idle --tls`): every handshake a full TLS 1.3
    /// one (no session resumption) before the HTTP one.
    #[arg(long, conflicts_with = "pid")]
    pub tls: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RoundtripArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Clients; client i subscribes to channel "rt.{i}" and sends on it.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub connections: u64,
    /// Messages each client sends a second in the latency phase, on a
    /// fixed schedule (the clients' schedules spread evenly over the
    /// interval): the offered load is connections × this.
    #[arg(long, default_value_t = 10.0, value_parser = positive)]
    pub rate_per_connection: f64,
    /// The latency phase's measured window (after --warmup-s).
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    pub duration_s: f64,
    /// Each phase first runs this long at its load unmeasured (connections
    /// and buffers settle).
    #[arg(long, default_value_t = 1.0, value_parser = seconds)]
    pub warmup_s: f64,
    /// After a phase's last send, wait at most this long for the replies
    /// still on their way (stops early once all are back): a message not
    /// back by then is lost.
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    pub grace_s: f64,
    /// The saturation phase's measured window (after --warmup-s); 0 leaves
    /// the phase out.
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    pub saturate_s: f64,
    /// Clients that send in the saturation phase, spread over all of them
    /// (at most --connections).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub saturate_connections: u64,
    /// In the saturation phase, messages each client has on their way
    /// (sent, reply not back) at most: it sends the next as soon as a
    /// reply frees a place, so a slow server or hub lowers the rate, never
    /// piles up.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub window: u32,
    /// Payload size in bytes (at least 33: kind, connection, sequence
    /// number and send time in hex; more is filler before them).
    #[arg(long, default_value_t = crate::ws::TAIL_LEN as u64,
          value_parser = clap::value_parser!(u64).range(crate::ws::TAIL_LEN as u64..=crate::ws::PAYLOAD_BYTES_MAX as u64))]
    pub payload_bytes: u64,
    /// Send messages without a "ref": the server then sends no
    /// acknowledgements (by default every message has one, and the ack's
    /// latency is reported too).
    #[arg(long)]
    pub no_refs: bool,
    /// Hub threads, each with its own PULL and publisher (the server
    /// spreads its messages over them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub hub_threads: u32,
    /// The path check (every client sends probes until one comes back)
    /// gives up after this long.
    #[arg(long, default_value_t = 30.0, value_parser = seconds)]
    pub probe_timeout_s: f64,
    /// The already running server's upstream endpoint (its
    /// --upstream-bind), where the hub connects (with --pid).
    #[arg(long, value_name = "ENDPOINT", requires = "pid")]
    pub upstream: Option<String>,
}

/// How `bench grpc` lays its streams over connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// Every stream on one HTTP/2 connection.
    OneConnection,
    /// Each stream on an HTTP/2 connection of its own.
    PerConnection,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::OneConnection => "one-connection",
            Layout::PerConnection => "per-connection",
        }
    }

    /// Its key in the JSON report.
    pub fn key(self) -> &'static str {
        match self {
            Layout::OneConnection => "one_connection",
            Layout::PerConnection => "per_connection",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct GrpcArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Client side: `--threads` are the tokio runtime's worker threads;
    /// `--in-flight` bounds the connections being opened at once.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Subscribe streams; stream i is on channel "grpc-{i % C}".
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub streams: u64,
    /// How the streams are laid over connections, comma-separated; each
    /// layout is measured against a freshly started server.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "one-connection,per-connection",
        value_name = "LAYOUT,…"
    )]
    pub layout: Vec<Layout>,
    /// Channels (1: one hot channel every stream is on).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub channels: u64,
    /// Messages published per second, in total, round robin over the channels.
    #[arg(long, default_value_t = 100.0, value_parser = positive)]
    pub rate: f64,
    /// How long the publisher publishes.
    #[arg(long, default_value_t = 10.0, value_parser = seconds)]
    pub duration_s: f64,
    /// Payload size in bytes (at least 33: kind, channel, sequence number and
    /// send time in hex; more is filler before them).
    #[arg(long, default_value_t = crate::ws::TAIL_LEN as u64,
          value_parser = clap::value_parser!(u64).range(crate::ws::TAIL_LEN as u64..=crate::ws::PAYLOAD_BYTES_MAX as u64))]
    pub payload_bytes: u64,
    /// The subscription check (probes published to every channel until every
    /// stream has one) gives up after this long.
    #[arg(long, default_value_t = 30.0, value_parser = seconds)]
    pub subscribe_timeout_s: f64,
    /// After the last publication, wait at most this long for what is still
    /// on its way (stops early once everything expected has arrived).
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    pub drain_s: f64,
}

/// CPUs, in order, each once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// A CPU list as `taskset -c` takes it: numbers and ranges, comma-separated.
fn cpu_list(s: &str) -> Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let parse = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?}: {part:?} is not a CPU number or range"))
        };
        let (first, last) = (parse(first)?, parse(last)?);
        if first > last || last >= 1024 {
            return Err(format!("{s:?}: bad CPU range {part:?}"));
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(CpuList(cpus))
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

/// A `--transport` that takes every transport but `left_out`, with their
/// help texts: fanout's leaves out long-poll (it answers one message per
/// request) and gRPC (`bench grpc`), storm's gRPC.
fn transports_but(
    left_out: &'static [Transport],
) -> impl clap::builder::TypedValueParser<Value = Transport> {
    let streams = Transport::value_variants()
        .iter()
        .filter(|t| !left_out.contains(t))
        .filter_map(|t| t.to_possible_value());
    clap::builder::TypedValueParser::map(
        clap::builder::PossibleValuesParser::new(streams),
        |name: String| Transport::from_str(&name, false).expect("one of the possible values"),
    )
}

/// A positive, finite number (a rate).
fn positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && v > 0.0 && v <= 1e9 {
        Ok(v)
    } else {
        Err(format!("{s:?}: must be above 0 and at most 1e9"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses like `main` does: clap, then the server check.
    fn parse(args: &[&str]) -> Result<IdleArgs, String> {
        let mut all = vec!["bench", "idle"];
        all.extend_from_slice(args);
        let a = match Cli::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .scenario
        {
            Scenario::Idle(a) => a,
            other => panic!("{other:?}"),
        };
        a.server.servers()?;
        Ok(a)
    }

    fn parse_scenario(args: &[&str]) -> Result<Scenario, String> {
        let mut all = vec!["bench"];
        all.extend_from_slice(args);
        let s = Cli::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .scenario;
        match &s {
            Scenario::Idle(a) => a.server.servers()?,
            Scenario::Fanout(a) => a.server.servers()?,
            Scenario::Storm(a) => a.server.servers()?,
            Scenario::Roundtrip(a) => a.server.servers()?,
            Scenario::Grpc(a) => a.server.servers()?,
        };
        Ok(s)
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
            a.server.servers().unwrap(),
            vec![(
                ServerKind::Gateway,
                Server::Spawn {
                    bin: "target/release/gateway".into(),
                    cores: 2,
                    extra_args: vec![],
                    stderr: None,
                    ready_timeout: Duration::from_secs(30),
                }
            )]
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
        match &a.server.servers().unwrap()[0].1 {
            Server::Spawn {
                cores, extra_args, ..
            } => {
                assert_eq!(*cores, 4);
                assert_eq!(*extra_args, vec!["--ring-entries=8192", "--log-level=warn"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn attach_to_a_running_server() {
        let a = parse(&["--pid", "1234", "--target", "127.0.0.1:8080"]).unwrap();
        assert_eq!(
            a.server.servers().unwrap(),
            vec![(
                ServerKind::Gateway,
                Server::Attach {
                    pid: 1234,
                    target: "127.0.0.1:8080".parse().unwrap(),
                    zmq: None,
                }
            )]
        );
        let a = parse(&[
            "--server",
            "baseline",
            "--pid",
            "1",
            "--target",
            "127.0.0.1:1",
            "--zmq",
            "tcp://127.0.0.1:5560",
        ])
        .unwrap();
        assert_eq!(
            a.server.servers().unwrap(),
            vec![(
                ServerKind::Baseline,
                Server::Attach {
                    pid: 1,
                    target: "127.0.0.1:1".parse().unwrap(),
                    zmq: Some("tcp://127.0.0.1:5560".into()),
                }
            )]
        );
        // One running process cannot be both servers.
        assert!(parse(&["--server", "both", "--pid", "1", "--target", "127.0.0.1:1"]).is_err());
    }

    #[test]
    fn server_choice_needs_its_binaries() {
        let both = parse(&[
            "--server",
            "both",
            "--gateway",
            "gw",
            "--baseline",
            "bl",
            "--baseline-arg=--x",
            "--baseline-stderr",
            "b.log",
        ])
        .unwrap();
        let servers = both.server.servers().unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].0, ServerKind::Gateway);
        assert_eq!(servers[1].0, ServerKind::Baseline);
        match &servers[1].1 {
            Server::Spawn {
                bin,
                extra_args,
                stderr,
                ..
            } => {
                assert_eq!(bin, &PathBuf::from("bl"));
                assert_eq!(extra_args, &vec!["--x".to_string()]);
                assert_eq!(stderr, &Some(PathBuf::from("b.log")));
            }
            other => panic!("{other:?}"),
        }
        let only_baseline = parse(&["--server", "baseline", "--baseline", "bl"]).unwrap();
        assert_eq!(
            only_baseline.server.servers().unwrap()[0].0,
            ServerKind::Baseline
        );
        // A binary given but not the one the choice needs.
        let err = parse(&["--server", "both", "--gateway", "gw"]).unwrap_err();
        assert!(err.contains("--baseline BIN"), "{err}");
        assert!(parse(&["--server", "baseline", "--gateway", "gw"]).is_err());
        assert!(parse(&["--server", "gateway", "--baseline", "bl"]).is_err());
        // `all` needs the baseline's binary too.
        assert!(parse(&["--server", "all", "--gateway", "gw"]).is_err());
    }

    #[test]
    fn server_lists_and_the_peers() {
        let a = parse(&["--server", "gateway,nchan,bun", "--gateway", "gw"]).unwrap();
        let servers = a.server.servers().unwrap();
        let kinds: Vec<ServerKind> = servers.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            [ServerKind::Gateway, ServerKind::Nchan, ServerKind::Bun]
        );
        // nginx and bun from PATH, the module at Debian's path, nginx's
        // workers from --cores.
        assert_eq!(
            servers[1].1,
            Server::Nchan {
                nginx: "nginx".into(),
                module: NCHAN_MODULE_DEBIAN.into(),
                workers: 2,
                tls: None,
                ready_timeout: Duration::from_secs(30),
            }
        );
        assert_eq!(
            servers[2].1,
            Server::Bun {
                bin: "bun".into(),
                ready_timeout: Duration::from_secs(30),
            }
        );
        let a = parse(&[
            "--server",
            "bun,nchan",
            "--nginx",
            "/opt/nginx",
            "--nchan-module",
            "/opt/nchan.so",
            "--bun",
            "/opt/bun",
            "--cores",
            "3",
        ])
        .unwrap();
        let servers = a.server.servers().unwrap();
        assert_eq!(
            servers[0].1,
            Server::Bun {
                bin: "/opt/bun".into(),
                ready_timeout: Duration::from_secs(30),
            }
        );
        assert_eq!(
            servers[1].1,
            Server::Nchan {
                nginx: "/opt/nginx".into(),
                module: "/opt/nchan.so".into(),
                workers: 3,
                tls: None,
                ready_timeout: Duration::from_secs(30),
            }
        );
        let all = parse(&["--server", "all", "--gateway", "gw", "--baseline", "bl"]).unwrap();
        assert_eq!(all.server.kinds().unwrap().len(), 4);
        // `both` keeps its meaning; a server named twice is refused.
        let both = parse(&[
            "--server",
            "both,bun",
            "--gateway",
            "gw",
            "--baseline",
            "bl",
        ])
        .unwrap();
        assert_eq!(
            both.server.kinds().unwrap(),
            [ServerKind::Gateway, ServerKind::Baseline, ServerKind::Bun]
        );
        let err = parse(&[
            "--server",
            "both,gateway",
            "--gateway",
            "gw",
            "--baseline",
            "bl",
        ])
        .unwrap_err();
        assert!(err.contains("twice"), "{err}");
        assert!(parse(&["--server", "nginx"]).is_err());
        assert!(parse(&["--server", ""]).is_err());
        // Attached: one server of any kind.
        let a = parse(&[
            "--server",
            "nchan",
            "--pid",
            "7",
            "--target",
            "127.0.0.1:80",
        ])
        .unwrap();
        assert_eq!(a.server.servers().unwrap()[0].0, ServerKind::Nchan);
        assert!(parse(&[
            "--server",
            "nchan,bun",
            "--pid",
            "7",
            "--target",
            "127.0.0.1:80"
        ])
        .is_err());
        assert!(parse(&["--bun", "b", "--pid", "7", "--target", "127.0.0.1:80"]).is_err());
        assert!(parse(&["--nginx", "n", "--pid", "7", "--target", "127.0.0.1:80"]).is_err());
        // Long-poll: nchan serves it, the baseline and Bun do not.
        assert!(ServerKind::Nchan
            .check_transport(Transport::LongPoll)
            .is_ok());
        assert!(ServerKind::Gateway
            .check_transport(Transport::LongPoll)
            .is_ok());
        let err = ServerKind::Bun
            .check_transport(Transport::LongPoll)
            .unwrap_err();
        assert!(
            err.contains("Bun script (bun) serves WebSocket and SSE"),
            "{err}"
        );
        assert!(ServerKind::Baseline
            .check_transport(Transport::LongPoll)
            .is_err());
        assert!(ServerKind::Bun.check_transport(Transport::Sse).is_ok());
        // gRPC: idle's, for the gateway and the baseline.
        let a = parse(&["--transport", "grpc", "--gateway", "gw"]).unwrap();
        assert_eq!(a.transport, Transport::Grpc);
        assert!(ServerKind::Baseline
            .check_transport(Transport::Grpc)
            .is_ok());
        let err = ServerKind::Nchan
            .check_transport(Transport::Grpc)
            .unwrap_err();
        assert!(err.starts_with("nchan has no gRPC service"), "{err}");
        assert!(ServerKind::Bun.check_transport(Transport::Grpc).is_err());
    }

    #[test]
    fn grpc_defaults_and_flags() {
        let Scenario::Grpc(a) = parse_scenario(&["grpc", "--gateway", "gw"]).unwrap() else {
            panic!()
        };
        assert_eq!(a.streams, 1_000);
        assert_eq!(a.layout, [Layout::OneConnection, Layout::PerConnection]);
        assert_eq!(a.channels, 1);
        assert_eq!((a.rate, a.duration_s, a.drain_s), (100.0, 10.0, 5.0));
        assert_eq!(a.payload_bytes, 33);
        assert_eq!(a.client.threads, 1);
        let Scenario::Grpc(a) = parse_scenario(&[
            "grpc",
            "--server",
            "both",
            "--gateway",
            "gw",
            "--baseline",
            "bl",
            "--layout",
            "per-connection",
            "--streams",
            "19000",
            "--threads",
            "2",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(a.layout, [Layout::PerConnection]);
        assert_eq!(a.streams, 19_000);
        assert_eq!(a.server.servers().unwrap().len(), 2);
        assert_eq!(
            (Layout::OneConnection.name(), Layout::PerConnection.key()),
            ("one-connection", "per_connection")
        );
        for bad in [
            &["--layout", "pipelined"][..],
            &["--streams", "0"],
            &["--rate", "0"],
            &["--payload-bytes", "32"],
            &["--transport", "grpc"],
        ] {
            let mut args = vec!["grpc", "--gateway", "gw"];
            args.extend_from_slice(bad);
            assert!(parse_scenario(&args).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tls_flags_and_servers() {
        let Scenario::Idle(a) = parse_scenario(&[
            "idle",
            "--gateway",
            "gw",
            "--tls",
            "--server",
            "gateway,nchan",
        ])
        .unwrap() else {
            panic!()
        };
        assert!(a.tls);
        let Scenario::Storm(s) = parse_scenario(&["storm", "--gateway", "gw", "--tls"]).unwrap()
        else {
            panic!()
        };
        assert!(s.tls);
        let Scenario::Storm(s) = parse_scenario(&["storm", "--gateway", "gw"]).unwrap() else {
            panic!()
        };
        assert!(!s.tls);
        // The certificate is the bench's: not for a running server.
        for scenario in ["idle", "storm"] {
            assert!(
                parse_scenario(&[scenario, "--tls", "--pid", "7", "--target", "127.0.0.1:80"])
                    .is_err()
            );
        }
        // Servers given the files: the gateway by its flags, nginx by its
        // configuration; not Bun, not an attached one.
        let files = TlsFiles {
            cert: "/d/cert.pem".into(),
            key: "/d/key.pem".into(),
        };
        let servers = a.server.servers().unwrap();
        let Server::Spawn { extra_args, .. } = servers[0].1.with_tls(&files).unwrap() else {
            panic!()
        };
        assert_eq!(
            extra_args,
            ["--tls-cert", "/d/cert.pem", "--tls-key", "/d/key.pem"]
        );
        let Server::Nchan { tls, .. } = servers[1].1.with_tls(&files).unwrap() else {
            panic!()
        };
        assert_eq!(tls, Some(files.clone()));
        let bun = Server::Bun {
            bin: "bun".into(),
            ready_timeout: Duration::from_secs(1),
        };
        assert!(bun.with_tls(&files).is_err());
        let attached = Server::Attach {
            pid: 1,
            target: "127.0.0.1:1".parse().unwrap(),
            zmq: None,
        };
        assert!(attached.with_tls(&files).is_err());
        assert!(ServerKind::Gateway.check_tls().is_ok());
        assert!(ServerKind::Nchan.check_tls().is_ok());
        let err = ServerKind::Baseline.check_tls().unwrap_err();
        assert!(err.contains("measures the gateway and nchan"), "{err}");
        assert!(ServerKind::Bun.check_tls().is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list("0,1"), Ok(CpuList(vec![0, 1])));
        assert_eq!(cpu_list("2-4,0"), Ok(CpuList(vec![0, 2, 3, 4])));
        assert_eq!(cpu_list("3,3-4"), Ok(CpuList(vec![3, 4])));
        for bad in ["", "x", "1-", "4-2", "0,,1", "-1", "0-5000"] {
            assert!(cpu_list(bad).is_err(), "{bad:?} accepted");
        }
        let Scenario::Storm(a) = parse_scenario(&[
            "storm",
            "--gateway",
            "gw",
            "--server-cpus",
            "0-1",
            "--client-cpus",
            "2-7",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(a.server.server_cpus, Some(CpuList(vec![0, 1])));
        assert_eq!(a.server.client_cpus, Some(CpuList((2..=7).collect())));
    }

    #[test]
    fn refuses_bad_combinations_and_values() {
        // Neither server given.
        assert!(parse(&[]).is_err());
        // --pid needs --target and the other way round.
        assert!(parse(&["--pid", "1"]).is_err());
        assert!(parse(&["--target", "127.0.0.1:1"]).is_err());
        assert!(parse(&["--gateway", "gw", "--zmq", "tcp://127.0.0.1:1"]).is_err());
        // Both a binary to spawn and a running server.
        assert!(parse(&["--gateway", "gw", "--pid", "1", "--target", "127.0.0.1:1"]).is_err());
        assert!(parse(&["--baseline", "b", "--pid", "1", "--target", "127.0.0.1:1"]).is_err());
        for bad in [
            &["--connections", "0"][..],
            &["--channels", "0"],
            &["--cores", "0"],
            &["--in-flight", "0"],
            &["--transport", "h3"],
            &["--sources", "localhost"],
            &["--hold-s", "-1"],
            &["--connect-timeout-s", "nan"],
        ] {
            let mut args = vec!["--gateway", "gw"];
            args.extend_from_slice(bad);
            assert!(parse(&args).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fanout_defaults_and_flags() {
        let Scenario::Fanout(a) = parse_scenario(&["fanout", "--gateway", "gw"]).unwrap() else {
            panic!()
        };
        assert_eq!(a.connections, 10_000);
        assert_eq!(a.channels, 1);
        assert_eq!(a.rate, 100.0);
        assert_eq!(a.duration_s, 10.0);
        assert_eq!(a.payload_bytes, 33);
        assert_eq!(a.max_attempts, 1);
        assert_eq!(a.client.threads, 1);
        assert_eq!(a.client.in_flight, 256);
        assert_eq!(a.server.server, [ServerChoice::Gateway]);
        assert_eq!(a.transport, Transport::Ws);
        let Scenario::Fanout(a) = parse_scenario(&[
            "fanout",
            "--transport",
            "sse",
            "--server",
            "both",
            "--gateway",
            "gw",
            "--baseline",
            "bl",
            "--connections",
            "1000000",
            "--channels",
            "100",
            "--threads",
            "8",
            "--sources",
            "127.0.0.1,127.0.0.2",
            "--rate",
            "12.5",
            "--duration-s",
            "3",
            "--payload-bytes",
            "200",
            "--drain-s",
            "1",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(a.connections, 1_000_000);
        assert_eq!(a.channels, 100);
        assert_eq!(a.client.threads, 8);
        assert_eq!(a.client.sources.len(), 2);
        assert_eq!(a.rate, 12.5);
        assert_eq!(a.payload_bytes, 200);
        assert_eq!(a.transport, Transport::Sse);
        assert_eq!(a.server.servers().unwrap().len(), 2);
        let Scenario::Fanout(a) =
            parse_scenario(&["fanout", "--gateway", "gw", "--transport", "ws"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(a.transport, Transport::Ws);
        for bad in [
            &["--rate", "0"][..],
            &["--rate", "-3"],
            &["--rate", "inf"],
            &["--threads", "0"],
            &["--payload-bytes", "32"],
            &["--payload-bytes", "100000"],
            &["--channels", "0"],
            &["--duration-s", "x"],
            // A long-poll answers once: nothing to fan a stream out on.
            &["--transport", "longpoll"],
            &["--transport", "grpc"],
        ] {
            let mut args = vec!["fanout", "--gateway", "gw"];
            args.extend_from_slice(bad);
            assert!(parse_scenario(&args).is_err(), "{bad:?} accepted");
        }
        assert!(parse_scenario(&["fanout", "--server", "both", "--gateway", "gw"]).is_err());
    }

    #[test]
    fn storm_defaults_and_flags() {
        let Scenario::Storm(a) = parse_scenario(&["storm", "--gateway", "gw"]).unwrap() else {
            panic!()
        };
        assert_eq!(a.connections, 5_000);
        assert_eq!(a.jitter_ms, 1000);
        assert_eq!(a.close, CloseHow::Reset);
        assert_eq!(a.max_attempts, 5);
        assert_eq!(a.backoff_ms, 50);
        assert_eq!(a.transport, Transport::Ws);
        let Scenario::Storm(a) = parse_scenario(&[
            "storm",
            "--server",
            "baseline",
            "--baseline",
            "bl",
            "--close",
            "fin",
            "--jitter-ms",
            "250",
            "--threads",
            "2",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(a.close, CloseHow::Fin);
        assert_eq!(a.jitter_ms, 250);
        assert_eq!(a.client.threads, 2);
        for bad in [
            &["--jitter-ms", "0"][..],
            &["--close", "shutdown"],
            &["--max-attempts", "0"],
            &["--connections", "0"],
            // A storm of gRPC connections is not measured.
            &["--transport", "grpc"],
        ] {
            let mut args = vec!["storm", "--gateway", "gw"];
            args.extend_from_slice(bad);
            assert!(parse_scenario(&args).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn roundtrip_defaults_and_flags() {
        let Scenario::Roundtrip(a) = parse_scenario(&["roundtrip", "--gateway", "gw"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(a.connections, 1_000);
        assert_eq!(a.rate_per_connection, 10.0);
        assert_eq!(a.duration_s, 10.0);
        assert_eq!(a.warmup_s, 1.0);
        assert_eq!(a.grace_s, 5.0);
        assert_eq!(a.saturate_s, 5.0);
        assert_eq!(a.saturate_connections, 50);
        assert_eq!(a.window, 64);
        assert_eq!(a.payload_bytes, 33);
        assert!(!a.no_refs);
        assert_eq!(a.hub_threads, 1);
        assert_eq!(a.upstream, None);
        let Scenario::Roundtrip(a) = parse_scenario(&[
            "roundtrip",
            "--server",
            "both",
            "--gateway",
            "gw",
            "--baseline",
            "bl",
            "--connections",
            "200",
            "--rate-per-connection",
            "2.5",
            "--duration-s",
            "3",
            "--saturate-s",
            "0",
            "--saturate-connections",
            "7",
            "--window",
            "8",
            "--no-refs",
            "--hub-threads",
            "2",
            "--threads",
            "2",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(a.connections, 200);
        assert_eq!(a.rate_per_connection, 2.5);
        assert_eq!(a.saturate_s, 0.0);
        assert_eq!((a.saturate_connections, a.window), (7, 8));
        assert!(a.no_refs);
        assert_eq!((a.hub_threads, a.client.threads), (2, 2));
        assert_eq!(a.server.servers().unwrap().len(), 2);
        let Scenario::Roundtrip(a) = parse_scenario(&[
            "roundtrip",
            "--server",
            "baseline",
            "--pid",
            "9",
            "--target",
            "127.0.0.1:1",
            "--zmq",
            "tcp://127.0.0.1:2",
            "--upstream",
            "tcp://127.0.0.1:3",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(a.upstream.as_deref(), Some("tcp://127.0.0.1:3"));
        for bad in [
            &["--rate-per-connection", "0"][..],
            &["--window", "0"],
            &["--window", "5000"],
            &["--payload-bytes", "32"],
            &["--saturate-connections", "0"],
            &["--hub-threads", "0"],
            // The upstream endpoint of a running server, not of a spawned one.
            &["--upstream", "tcp://127.0.0.1:3"],
        ] {
            let mut args = vec!["roundtrip", "--gateway", "gw"];
            args.extend_from_slice(bad);
            assert!(parse_scenario(&args).is_err(), "{bad:?} accepted");
        }
        // Only the gateway and the baseline carry what clients send.
        assert!(ServerKind::Gateway.check_two_way().is_ok());
        assert!(ServerKind::Baseline.check_two_way().is_ok());
        let err = ServerKind::Nchan.check_two_way().unwrap_err();
        assert!(err.starts_with("nchan has no two-way contract"), "{err}");
        assert!(ServerKind::Bun.check_two_way().is_err());
    }
}
