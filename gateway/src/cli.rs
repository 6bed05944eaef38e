//! The command line: the gateway's flags (each a setting of `Config`,
//! overriding the file's), and the other things the binary can be.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::config::{parse_range, AuthKey, Config, LogFormat, SubscribeMode};

/// Real-time connection gateway: messages published over ZeroMQ are delivered
/// to WebSocket, Server-Sent Events and long-poll clients.
///
/// Settings come from built-in defaults, then the TOML file given with
/// --config (keys named like the flags, with underscores), then these flags.
/// With no arguments it serves 127.0.0.1:8080 and binds tcp://127.0.0.1:5560
/// for publishers.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML configuration file.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Public listener address (WebSocket /ws, SSE and long-poll /events,
    /// /healthz). Port 0 picks a free port, shared by every core. [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Number of runtimes, one pinned per core; 0 = every available CPU. [default: 0]
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,
    /// Pending connections queued per listener (capped by net.core.somaxconn). [default: 4096]
    #[arg(long, value_name = "N")]
    pub listen_backlog: Option<i32>,
    /// io_uring submission queue entries per core. [default: 4096]
    #[arg(long, value_name = "N")]
    pub ring_entries: Option<u32>,
    /// ZeroMQ endpoint to bind for publishers (PUB sockets connect to it);
    /// "" disables binding. A port of * picks a free one. [default: tcp://127.0.0.1:5560]
    #[arg(long, value_name = "ENDPOINT")]
    pub zmq_bind: Option<String>,
    /// ZeroMQ publisher or forwarder endpoint to connect to; repeatable.
    #[arg(long, value_name = "ENDPOINT")]
    pub zmq_connect: Vec<String>,
    /// ZeroMQ receive high-water mark, in messages. [default: 100000]
    #[arg(long, value_name = "N")]
    pub zmq_rcvhwm_messages: Option<i32>,
    /// Subscribe upstream to every channel ("all"), or only to channels
    /// with local subscribers ("demand", behind a forwarder). [default: all]
    #[arg(long, value_name = "MODE")]
    pub zmq_subscribe: Option<SubscribeMode>,
    /// zmq_subscribe = demand: a channel stays subscribed this long after
    /// its last local subscriber left, in milliseconds. [default: 60000]
    #[arg(long, value_name = "MS")]
    pub zmq_unsubscribe_linger_ms: Option<u64>,
    /// Messages kept per channel for resuming clients. [default: 100]
    #[arg(long, value_name = "N")]
    pub history_messages: Option<usize>,
    /// Channels whose history is kept. [default: 100000]
    #[arg(long, value_name = "N")]
    pub channels_max: Option<usize>,
    /// How long a long-poll request is held open, in milliseconds. [default: 30000]
    #[arg(long, value_name = "MS")]
    pub poll_timeout_ms: Option<u64>,
    /// Time allowed for a request head to arrive, in milliseconds. [default: 10000]
    #[arg(long, value_name = "MS")]
    pub head_timeout_ms: Option<u64>,
    /// Largest request head, in bytes (431 above). [default: 8192]
    #[arg(long, value_name = "BYTES")]
    pub head_bytes_max: Option<usize>,
    /// Most request headers (431 above). [default: 48]
    #[arg(long, value_name = "N")]
    pub headers_max: Option<usize>,
    /// Longest request target, in bytes (414 above). [default: 4096]
    #[arg(long, value_name = "BYTES")]
    pub url_bytes_max: Option<usize>,
    /// Longest channel name, in bytes. [default: 128]
    #[arg(long, value_name = "BYTES")]
    pub channel_name_bytes_max: Option<usize>,
    /// Most channels one connection subscribes to. [default: 16]
    #[arg(long, value_name = "N")]
    pub channels_per_connection_max: Option<usize>,
    /// Largest WebSocket message a client may send, in bytes (closed 1009 above). [default: 65536]
    #[arg(long, value_name = "BYTES")]
    pub ws_message_bytes_max: Option<u64>,
    /// Largest published payload, in bytes (dropped and logged above). [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub publish_payload_bytes_max: Option<usize>,
    /// Unsent bytes one connection may have queued before it is dropped as a
    /// slow consumer. [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    pub outbound_queue_bytes_max: Option<usize>,
    /// Messages in flight from ingest to one core. [default: 65536]
    #[arg(long, value_name = "N")]
    pub core_queue_messages_max: Option<usize>,
    /// Heartbeat period of open streams (a WebSocket ping, an SSE
    /// ": heartbeat" comment), in milliseconds, rounded up to whole seconds;
    /// 0 = no heartbeats and no pong check. [default: 25000]
    #[arg(long, value_name = "MS")]
    pub heartbeat_interval_ms: Option<u64>,
    /// A WebSocket silent (no pong, no frame) for the heartbeat interval
    /// plus this many milliseconds is closed as a dead peer. [default: 10000]
    #[arg(long, value_name = "MS")]
    pub pong_timeout_ms: Option<u64>,
    /// Connections served at once, all cores together (each core takes its
    /// share, rounded up); more get 503 + Retry-After. [default: 1000000]
    #[arg(long, value_name = "N")]
    pub connections_max: Option<usize>,
    /// Connections one client IP may hold at once, all cores together; more
    /// get 503 + Retry-After; 0 = no limit. [default: 0]
    #[arg(long, value_name = "N")]
    pub connections_per_ip_max: Option<usize>,
    /// New connections one core accepts per second (bursts up to this
    /// size); more get 503 + Retry-After; 0 = no limit. [default: 0]
    #[arg(long, value_name = "N")]
    pub handshakes_per_s_per_core: Option<u32>,
    /// On SIGTERM/SIGINT, close the open connections spread over this many
    /// milliseconds (rounded up to whole seconds), then exit; a second
    /// signal exits at once. [default: 10000]
    #[arg(long, value_name = "MS")]
    pub drain_window_ms: Option<u64>,
    /// Serve a WebSocket echo endpoint at this path (e.g. "/"), for
    /// conformance testing; it runs the same connection code as /ws. [default: none]
    #[arg(long, value_name = "PATH")]
    pub ws_echo_path: Option<String>,
    /// A WebSocket subprotocol the gateway accepts (a token, e.g. "chat");
    /// repeatable. A client gets the first it offered that is listed, or
    /// no Sec-WebSocket-Protocol. [default: none]
    #[arg(long = "ws-subprotocol", value_name = "NAME")]
    pub ws_subprotocols: Vec<String>,
    /// /readyz answers 503 "no_publisher" while no ZeroMQ publisher or
    /// forwarder is connected. [default: off]
    #[arg(long)]
    pub ready_requires_publisher: bool,
    /// Log level or tracing filter directive, e.g. "info" or "gateway=debug". [default: info]
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log lines on stderr as "text" or one JSON object each ("json"). [default: text]
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Admin listener address: Prometheus /metrics, /healthz, /readyz; ""
    /// disables it. Keep it off the public network. [default: 127.0.0.1:9090]
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Require a valid token (JWT) on every WebSocket, SSE and long-poll
    /// request. Keys come from `auth_keys` in the --config file (re-read on
    /// SIGHUP) or --auth-hs256-secret. [default: off]
    #[arg(long)]
    pub auth: bool,
    /// An HS256 key, KID=SECRET (at least 32 bytes); repeatable. For
    /// development: the secret shows in the process list. [default: none]
    #[arg(long, value_name = "KID=SECRET")]
    pub auth_hs256_secret: Vec<String>,
    /// Clock skew tolerated on a token's exp and nbf, in seconds. [default: 30]
    #[arg(long, value_name = "S")]
    pub auth_leeway_s: Option<u64>,
    /// An audience this gateway answers to: tokens must name one in `aud`;
    /// repeatable. [default: none: tokens with `aud` are refused]
    #[arg(long = "auth-audience", value_name = "AUD")]
    pub auth_audience: Vec<String>,
    /// A browser origin allowed to open streams (scheme://host[:port],
    /// scheme://*.domain[:port] for its subdomains, or "*"); repeatable.
    /// Other origins are refused 403; listed ones get CORS headers on SSE
    /// and long-poll. [default: none: no check, no CORS]
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// Allow credentials (cookies) on CORS responses to the allowed origins. [default: off]
    #[arg(long)]
    pub cors_allow_credentials: bool,
    /// A proxy's source range (CIDR like 10.0.0.0/8, or one address) whose
    /// connections open with a PROXY protocol v1/v2 header naming the
    /// client; repeatable. [default: none]
    #[arg(long = "proxy-protocol-from", value_name = "CIDR")]
    pub proxy_protocol_from: Vec<String>,
}

/// The other things the binary can be.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// A ZeroMQ forwarder (XSUB ↔ XPUB) between many publishers and many
    /// gateways: publishers connect to --publishers, gateways (with
    /// zmq_subscribe = demand) to --gateways, and each gateway receives
    /// only the channels its clients subscribe to.
    Forwarder(crate::forwarder::ForwarderArgs),
}

impl Cli {
    /// Defaults, overridden by the file, overridden by the flags.
    pub fn resolve(self) -> Result<Config, String> {
        let mut cfg = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                toml::from_str::<Config>(&text)
                    .map_err(|e| format!("parsing {}: {e}", path.display()))?
            }
            None => Config::default(),
        };
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { cfg.$field = v; } )* };
        }
        take!(
            listen,
            cores,
            listen_backlog,
            ring_entries,
            zmq_bind,
            zmq_rcvhwm_messages,
            zmq_subscribe,
            zmq_unsubscribe_linger_ms,
            history_messages,
            channels_max,
            poll_timeout_ms,
            head_timeout_ms,
            head_bytes_max,
            headers_max,
            url_bytes_max,
            channel_name_bytes_max,
            channels_per_connection_max,
            ws_message_bytes_max,
            publish_payload_bytes_max,
            outbound_queue_bytes_max,
            core_queue_messages_max,
            heartbeat_interval_ms,
            pong_timeout_ms,
            connections_max,
            connections_per_ip_max,
            handshakes_per_s_per_core,
            drain_window_ms,
            ws_echo_path,
            log_level,
            log_format,
            admin_listen,
            auth_leeway_s
        );
        if self.auth {
            cfg.auth = true;
        }
        for arg in &self.auth_hs256_secret {
            let (kid, secret) = arg
                .split_once('=')
                .ok_or("--auth-hs256-secret takes KID=SECRET")?;
            cfg.auth_cli_keys.push(AuthKey {
                kid: kid.to_string(),
                alg: "HS256".to_string(),
                secret: Some(secret.to_string()),
                key_file: None,
            });
        }
        cfg.config_path = self.config.clone();
        if self.ready_requires_publisher {
            cfg.ready_requires_publisher = true;
        }
        if !self.zmq_connect.is_empty() {
            cfg.zmq_connect = self.zmq_connect;
        }
        if !self.allowed_origins.is_empty() {
            cfg.allowed_origins = self.allowed_origins;
        }
        if !self.ws_subprotocols.is_empty() {
            cfg.ws_subprotocols = self.ws_subprotocols;
        }
        if !self.auth_audience.is_empty() {
            cfg.auth_audience = self.auth_audience;
            cfg.auth_audience_from_cli = true;
        }
        if self.cors_allow_credentials {
            cfg.cors_allow_credentials = true;
        }
        if !self.proxy_protocol_from.is_empty() {
            cfg.proxy_protocol_from = self.proxy_protocol_from;
        }
        cfg.proxy_trusted = cfg
            .proxy_protocol_from
            .iter()
            .map(|s| parse_range(s))
            .collect::<Result<_, _>>()?;
        cfg.origins =
            protocol::origin::Origins::new(&cfg.allowed_origins, cfg.cors_allow_credentials)
                .map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }
}
