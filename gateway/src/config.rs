//! Configuration: built-in defaults, then a TOML file, then command-line flags,
//! each layer overriding the one before. Every limit has its unit in its name.

use std::net::SocketAddr;
use std::path::PathBuf;

use protocol::limits;
use serde::{Deserialize, Serialize};

/// The whole configuration, written once: each setting is a TOML key (its
/// name) and a flag (its name with dashes), with its default in its flag's
/// attribute, which `Default` reads. The file's keys override the
/// defaults and the flags given override the file (see `cli`).
#[derive(Debug, Clone, Deserialize, Serialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Public listener for WebSocket, SSE, long-poll and /healthz.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Runtimes (one per core, each with its own SO_REUSEPORT listener);
    /// 0 means one per available CPU.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub cores: usize,
    /// Pins each core's thread to one CPU. Off by default: a pinned thread
    /// cannot be moved off a CPU that something else is busy on (the
    /// ingest thread, ZeroMQ's IO thread, a sidecar), and in a reconnect
    /// storm on a shared host the unpinned gateway accepted faster (see the
    /// README's performance section). On a host given to the gateway alone,
    /// with interrupts steered away from its CPUs, pinning keeps each core's
    /// connections in one CPU's caches.
    #[arg(long)]
    pub pin_cores: bool,
    /// Connections the kernel queues per listener before its core accepts
    /// them (capped by net.core.somaxconn): reconnect storms arrive faster
    /// than one accept loop drains.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub listen_backlog: i32,
    /// How long the kernel keeps a new connection that has sent nothing
    /// before handing it to a core (TCP_DEFER_ACCEPT), in seconds. Every
    /// client of the gateway speaks first (a request head or a PROXY
    /// header), so a connection arrives with its first bytes and is
    /// answered in one go, without a wake-up of its core to read them: in a
    /// reconnect storm that is a third of a core's wake-ups. A client
    /// silent for longer is accepted then and meets `head_timeout_ms`.
    /// 0 accepts every connection at once.
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub defer_accept_s: u32,
    /// io_uring submission queue entries per core (the accepts, the epoll
    /// set's poll, the doorbell and the timers go through it).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub ring_entries: u32,
    /// Endpoint the ZeroMQ SUB socket binds for publishers to connect to;
    /// empty means do not bind.
    #[arg(long, value_name = "ENDPOINT", default_value = "tcp://127.0.0.1:5560")]
    pub zmq_bind: String,
    /// Publisher or forwarder endpoints the SUB socket connects to.
    #[arg(long, value_name = "ENDPOINT")]
    pub zmq_connect: Vec<String>,
    /// The endpoints carry the same publications (two or more forwarders
    /// fed by the same publishers, so that none is a single point of
    /// failure): every publication must carry its publisher's id, the
    /// copies after the first are dropped as duplicates, and a publication
    /// without an id is dropped (`no_publisher_id`): its copies could not
    /// be told apart, and each would be delivered.
    #[arg(long)]
    pub zmq_redundant: bool,
    /// ZeroMQ receive high-water mark (messages queued in libzmq before it drops).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub zmq_rcvhwm_messages: i32,
    /// What the SUB socket subscribes to: `all` (every channel: history for
    /// every channel, for a gateway fed directly by its publishers) or
    /// `demand` (only the channels its clients subscribe to, so that a
    /// publisher or a forwarder sends this gateway only what its clients
    /// want; for many gateways behind one forwarder).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SubscribeMode::All)]
    pub zmq_subscribe: SubscribeMode,
    /// With `zmq_subscribe = demand`: how long a channel stays subscribed
    /// upstream after its last local subscriber left, so that long-poll
    /// clients between polls and clients reconnecting after a blip resume
    /// from history. When it is dropped, its history here is forgotten
    /// (a resume from before is a gap).
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    pub zmq_unsubscribe_linger_ms: u64,
    /// Messages kept per channel for resume (SSE Last-Event-ID, long-poll
    /// `since`, WebSocket `since`). Each costs one pointer per core; the
    /// message bytes are shared.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub history_messages: usize,
    /// Channels whose history is kept; past this the oldest channel without
    /// subscribers loses its history (resumes from it get the gap signal).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub channels_max: usize,
    /// How long a long-poll request is held before it is answered empty.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub poll_timeout_ms: u64,
    /// A request head must be complete within this time (slowloris).
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub head_timeout_ms: u64,
    /// A request head larger than this is answered 431.
    #[arg(long, value_name = "BYTES", default_value_t = limits::HEAD_BYTES_MAX)]
    pub head_bytes_max: usize,
    /// More headers than this is answered 431.
    #[arg(long, value_name = "N", default_value_t = limits::HEADERS_MAX)]
    pub headers_max: usize,
    /// A request target longer than this is answered 414.
    #[arg(long, value_name = "BYTES", default_value_t = limits::URL_BYTES_MAX)]
    pub url_bytes_max: usize,
    /// Longest channel name, for clients and publishers.
    #[arg(long, value_name = "BYTES", default_value_t = limits::CHANNEL_NAME_BYTES_MAX)]
    pub channel_name_bytes_max: usize,
    /// Channels one connection may subscribe to.
    #[arg(long, value_name = "N", default_value_t = limits::CHANNELS_PER_CONNECTION_MAX)]
    pub channels_per_connection_max: usize,
    /// A WebSocket message from a client larger than this is closed with 1009.
    #[arg(long, value_name = "BYTES", default_value_t = limits::WS_MESSAGE_BYTES_MAX)]
    pub ws_message_bytes_max: u64,
    /// A published payload larger than this is dropped at ingest (and logged).
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    pub publish_payload_bytes_max: usize,
    /// Bytes queued for one connection that its socket has not taken yet;
    /// a client that lets more pile up is disconnected as a slow consumer.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    pub outbound_queue_bytes_max: usize,
    /// Messages in flight from the ingest thread to one core. When a core is
    /// this far behind, ingest waits for it (and libzmq buffers, then drops).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub core_queue_messages_max: usize,
    /// How often an open stream gets a heartbeat: a WebSocket ping, an SSE
    /// comment. Well under the idle timeout of the L4 balancers in front
    /// (60 s on strict ones, 350 s on AWS NLB), so they never cut a quiet
    /// stream. Sent by each core's once-a-second sweep, spread over the
    /// interval; no timer per connection. 0 turns heartbeats (and the pong
    /// check) off. Whole seconds; rounded up.
    #[arg(long, value_name = "MS", default_value_t = 25_000)]
    pub heartbeat_interval_ms: u64,
    /// A WebSocket from which nothing at all (a pong or any other frame) has
    /// been read for `heartbeat_interval_ms` plus this is a dead peer and is
    /// closed. Whole seconds; rounded up.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub pong_timeout_ms: u64,
    /// Connections this process serves at once, all cores together; each
    /// core takes its share (rounded up). Past it a new connection is
    /// answered 503 with `Retry-After` and closed. Each idle connection
    /// costs about 350 bytes of userspace and 4.5 KB of kernel memory.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub connections_max: usize,
    /// Connections one client IP address may hold at once, all cores
    /// together (one table shared by the cores, touched only at accept and
    /// close); 0 = no limit. Past it: 503 with `Retry-After`. Counts the TCP
    /// peer's address: behind a proxy that does not preserve client
    /// addresses, every client is the proxy.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub connections_per_ip_max: usize,
    /// New connections one core accepts per second (a token bucket holding
    /// one second's worth, so bursts up to this size pass); 0 = no limit.
    /// Past it: 503 with `Retry-After`. A reconnect storm is spread out
    /// instead of costing every client a slow handshake.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub handshakes_per_s_per_core: u32,
    /// On SIGTERM or SIGINT the gateway drains: it stops accepting, answers
    /// `/readyz` with 503, and closes its open connections spread evenly
    /// over this window (WebSocket with close 1012, SSE with a jittered
    /// `retry:`, held long-polls answered empty); it exits once they are
    /// gone, or at the window plus 5 s at the latest. Whole seconds;
    /// rounded up; 0 closes them all at once.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub drain_window_ms: u64,
    /// Before the drain: how long after SIGTERM the gateway goes on
    /// serving and accepting as usual while `/readyz` already answers 503,
    /// so that the balancer's health checks take it out (their interval
    /// times the failures they need, plus a margin) before its listener
    /// closes and its connections are asked to go. 0: the drain starts at
    /// once.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub drain_delay_ms: u64,
    /// Path of a WebSocket endpoint that echoes every message, for
    /// conformance testing (the Autobahn cases); empty (the default) means
    /// none. It runs the same connection code as `/ws`.
    #[arg(long, value_name = "PATH", default_value = "")]
    pub ws_echo_path: String,
    /// WebSocket subprotocols the gateway accepts (`Sec-WebSocket-Protocol`),
    /// each a token: a client offering several gets the first it offered
    /// that this list holds; one offering none of them gets no
    /// `Sec-WebSocket-Protocol` (a browser then fails the connection, as
    /// RFC 6455 asks). Whatever is chosen, the gateway speaks the same
    /// frames. Empty (the default): the header is never answered.
    #[arg(long = "ws-subprotocol", value_name = "NAME")]
    pub ws_subprotocols: Vec<String>,
    /// permessage-deflate (RFC 7692) for WebSocket clients that offer it
    /// (browsers do): a message is compressed once, by the first core that
    /// has such a subscriber, and the same bytes go to all of them; the
    /// gateway asks for no context on either side, so an idle connection
    /// keeps no compression state. Costs the compression of each message
    /// (once) and its compressed frame (kept as long as the message is).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub ws_deflate: bool,
    /// Messages (the frame's payload: meta line and payload) under this
    /// size go uncompressed even where permessage-deflate was negotiated:
    /// a few hundred bytes of JSON shrink by a few dozen at best, and the
    /// client still pays for a decompression. Acks and errors of the
    /// gateway's subprotocol, gap signals and control frames are never
    /// compressed.
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub ws_deflate_threshold_bytes: usize,
    /// ZeroMQ endpoints the upstream socket (PUSH) binds, where hub workers
    /// connect a PULL socket to receive what clients send (repeatable).
    /// With neither this nor `upstream_connect`, clients cannot send: a
    /// message gets the error `upstream not configured`.
    #[arg(long = "upstream-bind", value_name = "ENDPOINT")]
    pub upstream_bind: Vec<String>,
    /// ZeroMQ endpoints of hub workers (a bound PULL socket) the upstream
    /// socket connects to (repeatable). Messages are spread over the hubs
    /// connected at the time, round-robin.
    #[arg(long = "upstream-connect", value_name = "ENDPOINT")]
    pub upstream_connect: Vec<String>,
    /// Messages the upstream socket holds per hub before the gateway stops
    /// reading from the clients that send (its ZeroMQ send high-water mark).
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub upstream_hwm_messages: i32,
    /// Hubs confirm what they receive, and what a hub has not confirmed
    /// within this long is sent again (to whichever hub is there: after a
    /// hub dies, another). The upstream socket is then a DEALER: hubs
    /// read on a ROUTER `[identity, seq, kind, address, channel, meta,
    /// payload]`, `seq` 8 bytes big-endian, and answer `[identity, seq]`.
    /// At least once: a hub may see a message twice (a late confirmation),
    /// and tells them apart by the address's instance and `seq`. 0: off
    /// (a PUSH socket, no confirmations; see the README).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub upstream_confirm_ms: u64,
    /// Send connect, disconnect (with the reason), subscribe and
    /// unsubscribe events of WebSocket and SSE streams upstream, so a hub
    /// can keep presence and membership.
    #[arg(long)]
    pub upstream_presence: bool,
    /// Token claims given to the hubs with every upstream message (besides
    /// `sub`), by name (repeatable); absent claims are left out.
    #[arg(long = "upstream-claim", value_name = "NAME")]
    pub upstream_claims: Vec<String>,
    /// With auth on, a connection whose token has a `sub` also reads its
    /// user channel, `#<sub>`, so that hubs can address every connection
    /// of a user. Each distinct user a core holds costs a channel entry
    /// there (about 320 bytes, measured); off when hubs never address users.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub user_channels: bool,
    /// Messages a second one connection may send (a token bucket holding a
    /// second's worth); over it a message is refused with
    /// `rate limit: messages per second`.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub send_messages_per_s: u32,
    /// Payload bytes a second one connection may send, the same way
    /// (`rate limit: bytes per second`).
    #[arg(long, value_name = "BYTES", default_value_t = 262_144)]
    pub send_bytes_per_s: u32,
    /// How long a `POST /publish` waits for room upstream while the hubs
    /// are slow or gone, before it is answered 503.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub publish_wait_ms: u64,
    /// A listener for gRPC alone (HTTP/2 cleartext with prior knowledge),
    /// besides the public one, which serves gRPC too (told from HTTP/1.1
    /// by the connection preface). Empty: none.
    #[arg(long, value_name = "ADDR", default_value = "")]
    pub grpc_listen: String,
    /// Calls open at once on one HTTP/2 connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS); a client opening more has them
    /// refused (RST_STREAM REFUSED_STREAM).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub grpc_streams_per_connection_max: u32,
    /// Request headers of one call, HPACK-decoded, as HTTP/2 counts them
    /// (SETTINGS_MAX_HEADER_LIST_SIZE); more is refused.
    #[arg(long, value_name = "BYTES", default_value_t = 16_384)]
    pub grpc_header_list_bytes_max: u32,
    /// One message a client sends (`SubscribeRequest`, a `Connect` frame);
    /// a longer one ends the call with RESOURCE_EXHAUSTED.
    #[arg(long, value_name = "BYTES", default_value_t = 65_536)]
    pub grpc_message_bytes_max: u32,
    /// What a client may send on one call before the gateway has read it
    /// (the HTTP/2 stream window it is given).
    #[arg(long, value_name = "BYTES", default_value_t = 65_535)]
    pub grpc_stream_window_bytes: u32,
    /// The same for all the calls of one connection together.
    #[arg(long, value_name = "BYTES", default_value_t = 262_144)]
    pub grpc_connection_window_bytes: u32,
    /// Certificate chains (PEM, the server's certificate first) the public
    /// listener serves TLS with, each paired with the key at the same place
    /// in `tls_key`. Several: the one whose names match the client's SNI
    /// is chosen; the first serves clients naming no host it has. Empty
    /// (the default): cleartext. Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Vec<PathBuf>,
    /// The private keys (PEM: PKCS#8, PKCS#1 or SEC1) of `tls_cert`, in
    /// the same order.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Vec<PathBuf>,
    /// The gRPC listener (`grpc_listen`) speaks TLS too, with the same
    /// certificates. Off: it stays cleartext (HTTP/2 with prior knowledge,
    /// for services on a private network), while the public listener
    /// serves gRPC over TLS to clients that offer ALPN `h2` alone.
    #[arg(long)]
    pub grpc_listen_tls: bool,
    /// `tls_cert` and `tls_key` came from the command line (a SIGHUP
    /// re-reads those files rather than the configuration file's).
    #[serde(skip)]
    #[arg(skip)]
    pub tls_from_cli: bool,
    /// `/readyz` answers 503 `no_publisher` while the ZeroMQ socket has no
    /// peer (no publisher or forwarder connected), so a load balancer sends
    /// clients only to gateways that can deliver. Off by default: with a
    /// bound endpoint, publishers may connect only when they have something
    /// to say.
    #[arg(long)]
    pub ready_requires_publisher: bool,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_level: String,
    /// `text` (one line per event, `key=value` fields) or `json` (one JSON
    /// object per line, for log pipelines). Both on stderr.
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`), served by a plain
    /// thread apart from the cores; empty disables it.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    pub admin_listen: String,
    /// Every WebSocket, SSE and long-poll request must present a valid
    /// token (JWT) signed with one of `auth_keys`, allowing the channels it
    /// asks for. Off by default (a zero-setup development gateway).
    #[arg(long)]
    pub auth: bool,
    /// The keys tokens may be signed with. Re-read from the file on SIGHUP.
    #[arg(skip)]
    pub auth_keys: Vec<AuthKey>,
    /// Clock skew tolerated on a token's `exp` and `nbf`, in seconds.
    #[arg(long, value_name = "S", default_value_t = 30)]
    pub auth_leeway_s: u64,
    /// The audiences this gateway answers to (RFC 7519 `aud`): a token
    /// must name one of them. Empty (the default): a token that carries
    /// `aud` at all is refused, since it was meant for someone else.
    /// Re-read from the file on SIGHUP, unless given on the command line.
    #[arg(long = "auth-audience", value_name = "AUD")]
    pub auth_audience: Vec<String>,
    /// `auth_audience` came from the command line (a SIGHUP keeps it).
    #[serde(skip)]
    #[arg(skip)]
    pub auth_audience_from_cli: bool,
    /// HS256 keys given on the command line (`--auth-hs256-secret
    /// KID=SECRET`, development only): kept across SIGHUP reloads.
    #[serde(skip)]
    #[arg(skip)]
    pub auth_cli_keys: Vec<AuthKey>,
    /// Browser origins (`https://app.example.com`, exact; subdomain
    /// patterns, `https://*.example.com`; or `*` for any) allowed to open
    /// WebSocket, SSE and long-poll streams. A request
    /// whose `Origin` is not listed is refused 403 before the upgrade
    /// (cross-site WebSocket hijacking); a listed origin's SSE and long-poll
    /// responses carry the CORS headers, and its preflights are answered.
    /// Requests without `Origin` (same-origin pages, non-browser clients)
    /// pass. Empty (the default): no check, and no CORS headers.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// CORS responses allow credentials (cookies) for the listed origins
    /// (`Access-Control-Allow-Credentials: true`); not with `*`.
    #[arg(long)]
    pub cors_allow_credentials: bool,
    /// Source ranges (CIDR, or single addresses) of the proxies in front:
    /// a connection from one of them must open with a PROXY protocol
    /// header (v1 or v2), whose client address is then the one used for
    /// `connections_per_ip_max` and in logs. Connections from anywhere
    /// else are clients themselves and may not send one (a PROXY header
    /// from them is a malformed request, 400). Empty (the default): no
    /// PROXY protocol.
    #[arg(long = "proxy-protocol-from", value_name = "CIDR")]
    pub proxy_protocol_from: Vec<String>,
    /// `proxy_protocol_from`, parsed.
    #[serde(skip)]
    #[arg(skip)]
    pub proxy_trusted: Vec<ipnet::IpNet>,
    /// `ws_subprotocols` and the gateway's own ([`protocol::upstream::SUBPROTOCOL`]),
    /// which it always speaks.
    #[serde(skip)]
    #[arg(skip)]
    pub ws_subprotocols_spoken: Vec<String>,
    /// `allowed_origins`, checked and with its header lines written once.
    #[serde(skip)]
    #[arg(skip)]
    pub origins: protocol::origin::Origins,
    /// The file the configuration came from, re-read on SIGHUP.
    #[serde(skip)]
    #[arg(skip)]
    pub config_path: Option<PathBuf>,
}

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// What the ingest SUB socket subscribes to (see `Config::zmq_subscribe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SubscribeMode {
    All,
    Demand,
}

/// One token verification key (`[[auth_keys]]` in the file).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthKey {
    /// The `kid` tokens name it by.
    pub kid: String,
    /// "HS256", "RS256" or "ES256".
    pub alg: String,
    /// HS256: the shared secret (at least 32 bytes).
    #[serde(default)]
    pub secret: Option<String>,
    /// RS256 / ES256: a PEM public key file.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

impl AuthKey {
    /// Adds this key to `set`, reading its file if it has one.
    fn add_to(&self, set: &mut protocol::token::KeySet) -> Result<(), String> {
        use protocol::token::KeyAlgorithm;
        let kid = &self.kid;
        let alg = KeyAlgorithm::from_name(&self.alg)
            .ok_or_else(|| format!("auth key {kid:?}: alg must be HS256, RS256 or ES256"))?;
        let material = match (alg, &self.secret, &self.key_file) {
            (KeyAlgorithm::Hs256, Some(secret), None) => secret.clone().into_bytes(),
            (KeyAlgorithm::Hs256, _, _) => {
                return Err(format!(
                    "auth key {kid:?}: HS256 takes a secret (and no key_file)"
                ))
            }
            (_, None, Some(path)) => std::fs::read(path)
                .map_err(|e| format!("auth key {kid:?}: reading {}: {e}", path.display()))?,
            (_, _, _) => {
                return Err(format!(
                    "auth key {kid:?}: {alg} takes a key_file (and no secret)"
                ))
            }
        };
        set.add(kid, alg, &material).map_err(|e| e.to_string())
    }
}

impl Default for Config {
    /// The defaults of the flags: an empty command line.
    fn default() -> Self {
        use clap::{Args, FromArgMatches};
        let command = Config::augment_args(clap::Command::new("gateway"));
        let matches = command
            .try_get_matches_from(["gateway"])
            .expect("an empty command line parses");
        Config::from_arg_matches(&matches).expect("every default is a valid value")
    }
}

/// A CIDR range (`10.0.0.0/8`, `fd00::/8`) or a single address.
pub(crate) fn parse_range(s: &str) -> Result<ipnet::IpNet, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(ipnet::IpNet::from(ip));
    }
    let net: ipnet::IpNet = s.parse().map_err(|_| {
        format!("proxy_protocol_from: {s:?} is not an address or a CIDR range like 10.0.0.0/8")
    })?;
    // 10.1.2.3/8 is probably a typo for 10.0.0.0/8 or 10.1.2.3/32.
    if net.trunc() != net {
        return Err(format!(
            "proxy_protocol_from: {s:?} has host bits set (did you mean {}?)",
            net.trunc()
        ));
    }
    Ok(net)
}

impl Config {
    /// Does a connection from `ip` open with a PROXY protocol header?
    pub fn expects_proxy_header(&self, ip: std::net::IpAddr) -> bool {
        self.proxy_trusted.iter().any(|net| net.contains(&ip))
    }

    /// The defaults overridden by the TOML file at `path`, if any.
    pub fn from_file(path: Option<&std::path::Path>) -> Result<Config, String> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        toml::from_str::<Config>(&text).map_err(|e| format!("parsing {}: {e}", path.display()))
    }

    /// The key set of this configuration: `auth_keys` (files read now) and
    /// the command line's. Also how SIGHUP rebuilds it from a re-read file.
    pub fn key_set(&self) -> Result<protocol::token::KeySet, String> {
        let mut set = protocol::token::KeySet::new();
        for key in self.auth_keys.iter().chain(&self.auth_cli_keys) {
            key.add_to(&mut set)?;
        }
        if let Some(bad) = self.auth_audience.iter().find(|a| a.is_empty()) {
            return Err(format!("auth_audience: {bad:?} is not an audience"));
        }
        set.set_audiences(&self.auth_audience);
        Ok(set)
    }

    /// The `auth_keys` of the configuration file as it is now, with the
    /// command line's keys: the key set a SIGHUP swaps in.
    pub fn reload_key_set(&self) -> Result<protocol::token::KeySet, String> {
        let mut fresh = Config::from_file(self.config_path.as_deref())?;
        fresh.auth_cli_keys = self.auth_cli_keys.clone();
        if self.auth_audience_from_cli {
            fresh.auth_audience = self.auth_audience.clone();
        }
        fresh.key_set()
    }

    /// Does the public listener speak TLS?
    pub fn tls_enabled(&self) -> bool {
        !self.tls_cert.is_empty()
    }

    /// The configuration whose `tls_cert` and `tls_key` a SIGHUP loads:
    /// the file as it is now, or this one when they came from the command
    /// line (the same files, re-read).
    pub fn reload_tls_files(&self) -> Result<Config, String> {
        if self.tls_from_cli {
            return Ok(self.clone());
        }
        let fresh = Config::from_file(self.config_path.as_deref())?;
        fresh.check_tls_pairs()?;
        Ok(fresh)
    }

    fn check_tls_pairs(&self) -> Result<(), String> {
        if self.tls_cert.len() != self.tls_key.len() {
            return Err(format!(
                "tls_cert names {} files and tls_key {}: each certificate needs its key",
                self.tls_cert.len(),
                self.tls_key.len()
            ));
        }
        Ok(())
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        self.check_tls_pairs()?;
        if self.grpc_listen_tls && (!self.tls_enabled() || self.grpc_listen.is_empty()) {
            return Err("grpc_listen_tls needs grpc_listen and tls_cert".into());
        }
        if let Some(bad) = self
            .ws_subprotocols
            .iter()
            .find(|p| !protocol::ws::valid_subprotocol(p))
        {
            return Err(format!(
                "ws_subprotocols: {bad:?} is not a token (letters, digits, !#$%&'*+-.^_`|~)"
            ));
        }
        if !self.grpc_listen.is_empty() && self.grpc_listen.parse::<SocketAddr>().is_err() {
            return Err("grpc_listen must be an address like 127.0.0.1:9090, or empty".into());
        }
        if self.grpc_streams_per_connection_max == 0 {
            return Err("grpc_streams_per_connection_max must be at least 1".into());
        }
        // HTTP/2's own bounds on a window (RFC 9113 §6.9.1).
        if !(65_535..=(1 << 31) - 1).contains(&self.grpc_connection_window_bytes)
            || self.grpc_stream_window_bytes > (1 << 31) - 1
        {
            return Err("grpc_stream_window_bytes must be at most 2^31-1, \
                 grpc_connection_window_bytes between 65535 and 2^31-1"
                .into());
        }
        if self.upstream_hwm_messages < 1 {
            return Err("upstream_hwm_messages must be at least 1".into());
        }
        if self.send_messages_per_s == 0 || self.send_bytes_per_s == 0 {
            return Err("send_messages_per_s and send_bytes_per_s must be greater than 0".into());
        }
        if self.send_messages_per_s > 1_000_000 {
            return Err("send_messages_per_s must be at most 1000000".into());
        }
        if self.zmq_bind.is_empty() && self.zmq_connect.is_empty() {
            return Err("no ZeroMQ endpoint: set zmq_bind or at least one zmq_connect".into());
        }
        let positive = [
            ("history_messages", self.history_messages),
            ("channels_max", self.channels_max),
            ("head_bytes_max", self.head_bytes_max),
            ("headers_max", self.headers_max),
            ("url_bytes_max", self.url_bytes_max),
            ("channel_name_bytes_max", self.channel_name_bytes_max),
            (
                "channels_per_connection_max",
                self.channels_per_connection_max,
            ),
            ("outbound_queue_bytes_max", self.outbound_queue_bytes_max),
            ("core_queue_messages_max", self.core_queue_messages_max),
            ("connections_max", self.connections_max),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.headers_max > limits::HEADERS_MAX {
            // Header slots are a fixed array on the parser's stack.
            return Err(format!(
                "headers_max must be at most {}",
                limits::HEADERS_MAX
            ));
        }
        if !self.admin_listen.is_empty()
            && self.admin_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err("admin_listen must be an address like 127.0.0.1:9090, or empty".into());
        }
        if !self.ws_echo_path.is_empty() && !self.ws_echo_path.starts_with('/') {
            return Err("ws_echo_path must start with /".into());
        }
        if self.listen_backlog < 1 {
            return Err("listen_backlog must be at least 1".into());
        }
        if self.ring_entries < 256 {
            return Err("ring_entries must be at least 256".into());
        }
        if self.poll_timeout_ms == 0 || self.head_timeout_ms == 0 {
            return Err("poll_timeout_ms and head_timeout_ms must be greater than 0".into());
        }
        if self.heartbeat_interval_ms > 0 && self.pong_timeout_ms == 0 {
            return Err("pong_timeout_ms must be greater than 0 while heartbeats are on".into());
        }
        if self.auth {
            let keys = self.key_set()?;
            if keys.is_empty() {
                return Err(
                    "auth is on but there is no key: set auth_keys in the config file or \
                     --auth-hs256-secret"
                        .into(),
                );
            }
        }
        // The core clock and the outbound counters are u32 seconds and bytes.
        if self.heartbeat_interval_ms > u64::from(u32::MAX) / 2
            || self.pong_timeout_ms > u64::from(u32::MAX) / 2
            || self.connections_max > u32::MAX as usize
            || self.connections_per_ip_max > u32::MAX as usize
            || self.outbound_queue_bytes_max > u32::MAX as usize / 2
            || self.drain_window_ms > u64::from(u32::MAX) / 2
            || self.auth_leeway_s > u64::from(u32::MAX) / 2
        {
            return Err("a limit is out of range".into());
        }
        Ok(())
    }

    /// Heartbeat period in whole seconds (rounded up); None when off.
    pub fn heartbeat_interval_s(&self) -> Option<u32> {
        (self.heartbeat_interval_ms > 0).then(|| self.heartbeat_interval_ms.div_ceil(1000) as u32)
    }

    /// Seconds of silence after which a WebSocket is a dead peer (heartbeat
    /// interval plus pong timeout, each rounded up); None when heartbeats
    /// are off.
    pub fn ws_silence_s_max(&self) -> Option<u32> {
        let interval = self.heartbeat_interval_s()?;
        Some(interval + self.pong_timeout_ms.div_ceil(1000) as u32)
    }

    /// The drain window in whole seconds (rounded up).
    pub fn drain_window_s(&self) -> u32 {
        self.drain_window_ms.div_ceil(1000) as u32
    }

    /// The parser's limits; `'static` because the echo path is borrowed
    /// from the configuration, which lives as long as the process.
    pub fn head_limits(&'static self) -> protocol::http::HeadLimits {
        protocol::http::HeadLimits {
            head_bytes_max: self.head_bytes_max,
            headers_max: self.headers_max,
            url_bytes_max: self.url_bytes_max,
            channel_name_bytes_max: self.channel_name_bytes_max,
            channels_per_connection_max: self.channels_per_connection_max,
            echo_path: (!self.ws_echo_path.is_empty()).then_some(self.ws_echo_path.as_str()),
            ws_subprotocols: &self.ws_subprotocols_spoken,
            ws_deflate: self.ws_deflate,
            // A POSTed message is bounded like a WebSocket one.
            publish_body_bytes_max: self.ws_message_bytes_max as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;

    /// A command line, parsed, with which of its settings were given.
    struct Parsed(Cli, clap::ArgMatches);

    impl Parsed {
        fn resolve(self) -> Result<Config, String> {
            self.0.resolve(&self.1)
        }
    }

    fn cli(args: &[&str]) -> Parsed {
        let (cli, matches) =
            Cli::from_args(std::iter::once("gateway").chain(args.iter().copied())).unwrap();
        Parsed(cli, matches)
    }

    #[test]
    fn the_shipped_production_config_parses() {
        let cfg: Config = toml::from_str(include_str!("../../systemd/gateway.toml")).unwrap();
        assert_eq!(cfg.zmq_subscribe, SubscribeMode::Demand);
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert!(cfg.zmq_bind.is_empty() && !cfg.zmq_connect.is_empty());
    }

    #[test]
    fn defaults_make_a_single_host_gateway() {
        let cfg = cli(&[]).resolve().unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(cfg.zmq_bind, "tcp://127.0.0.1:5560");
        assert!(cfg.zmq_connect.is_empty());
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("gateway-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(
            &path,
            "history_messages = 7\npoll_timeout_ms = 1234\nzmq_connect = [\"tcp://127.0.0.1:1\"]\n\
             ready_requires_publisher = true\nzmq_subscribe = \"demand\"\n\
             auth_audience = [\"from-file\"]\n",
        )
        .unwrap();
        let file = path.to_str().unwrap();
        let cfg = cli(&["-c", file, "--poll-timeout-ms", "99"])
            .resolve()
            .unwrap();
        assert_eq!(cfg.history_messages, 7);
        assert_eq!(cfg.poll_timeout_ms, 99);
        assert_eq!(cfg.zmq_connect, vec!["tcp://127.0.0.1:1".to_string()]);
        // What the flags leave alone is the file's, whatever its type; a
        // default the file does not set stays the default.
        assert!(cfg.ready_requires_publisher);
        assert_eq!(cfg.zmq_subscribe, SubscribeMode::Demand);
        assert_eq!(cfg.auth_audience, vec!["from-file".to_string()]);
        assert!(!cfg.auth_audience_from_cli);
        assert_eq!(cfg.heartbeat_interval_ms, 25_000);
        // Lists, enums and switches given as flags replace the file's.
        let cfg = cli(&[
            "-c",
            file,
            "--zmq-connect",
            "tcp://127.0.0.1:2",
            "--zmq-connect",
            "tcp://127.0.0.1:3",
            "--zmq-subscribe",
            "all",
            "--auth-audience",
            "from-flag",
            "--log-format",
            "json",
        ])
        .resolve()
        .unwrap();
        assert_eq!(cfg.zmq_connect, ["tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]);
        assert_eq!(cfg.zmq_subscribe, SubscribeMode::All);
        assert_eq!(cfg.auth_audience, vec!["from-flag".to_string()]);
        assert!(cfg.auth_audience_from_cli);
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.history_messages, 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("no_such_key = 1").is_err());
        assert!(cli(&["--zmq-bind", ""]).resolve().is_err());
        assert!(cli(&["--history-messages", "0"]).resolve().is_err());
        // An allowed origin no browser would send could never match.
        let err = cli(&["--allowed-origin", "https://app.example/"])
            .resolve()
            .unwrap_err();
        assert!(err.contains("scheme://host"), "{err}");
        assert!(cli(&["--allowed-origin", "*", "--cors-allow-credentials"])
            .resolve()
            .is_err());
        let cfg = cli(&["--allowed-origin", "https://app.example"])
            .resolve()
            .unwrap();
        assert!(cfg.origins.is_on());
        for bad in ["10.0.0.0/33", "10.1.2.3/8", "localhost", ""] {
            assert!(
                cli(&["--proxy-protocol-from", bad]).resolve().is_err(),
                "{bad}"
            );
        }
        let cfg = cli(&[
            "--proxy-protocol-from",
            "10.0.0.0/8",
            "--proxy-protocol-from",
            "::1",
        ])
        .resolve()
        .unwrap();
        for (ip, trusted) in [
            ("10.200.0.1", true),
            ("11.0.0.1", false),
            ("::1", true),
            ("127.0.0.1", false),
        ] {
            assert_eq!(
                cfg.expects_proxy_header(ip.parse().unwrap()),
                trusted,
                "{ip}"
            );
        }
        assert!(cli(&["--headers-max", "1000"]).resolve().is_err());
        assert!(cli(&["--connections-max", "0"]).resolve().is_err());
        assert!(cli(&["--pong-timeout-ms", "0"]).resolve().is_err());
        assert!(cli(&["--outbound-queue-bytes-max", "4294967295"])
            .resolve()
            .is_err());
    }

    #[test]
    fn heartbeat_settings_round_up_to_seconds_and_zero_is_off() {
        let cfg = cli(&[]).resolve().unwrap();
        assert_eq!(cfg.heartbeat_interval_s(), Some(25));
        assert_eq!(cfg.ws_silence_s_max(), Some(35));
        let cfg = cli(&["--heartbeat-interval-ms", "1500", "--pong-timeout-ms", "1"])
            .resolve()
            .unwrap();
        assert_eq!(cfg.ws_silence_s_max(), Some(3));
        let cfg = cli(&["--heartbeat-interval-ms", "0", "--pong-timeout-ms", "0"])
            .resolve()
            .unwrap();
        assert_eq!(cfg.heartbeat_interval_s(), None);
        assert_eq!(cfg.ws_silence_s_max(), None);
    }

    #[test]
    fn auth_is_off_by_default_and_needs_a_key_when_on() {
        let cfg = cli(&[]).resolve().unwrap();
        assert!(!cfg.auth);
        assert_eq!(cfg.auth_leeway_s, 30);
        assert!(cli(&["--auth"]).resolve().unwrap_err().contains("no key"));
        let secret = "k1=0123456789abcdef0123456789abcdef";
        let cfg = cli(&[
            "--auth",
            "--auth-hs256-secret",
            secret,
            "--auth-leeway-s",
            "0",
        ])
        .resolve()
        .unwrap();
        assert!(cfg.auth);
        assert_eq!(cfg.auth_leeway_s, 0);
        assert_eq!(cfg.key_set().unwrap().len(), 1);
        // Too short a secret, a bad alg, a missing key file: config errors.
        assert!(cli(&["--auth", "--auth-hs256-secret", "k1=short"])
            .resolve()
            .is_err());
        assert!(cli(&["--auth-hs256-secret", "no-equals"])
            .resolve()
            .is_err());
        let file = |text: &str| {
            let mut cfg = toml::from_str::<Config>(text).unwrap();
            cfg.auth = true;
            cfg.validate()
        };
        assert!(file("[[auth_keys]]\nkid = \"a\"\nalg = \"HS256\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n").is_ok());
        assert!(file("[[auth_keys]]\nkid = \"a\"\nalg = \"none\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n").is_err());
        assert!(file(
            "[[auth_keys]]\nkid = \"a\"\nalg = \"RS256\"\nkey_file = \"/nonexistent.pem\"\n"
        )
        .is_err());
        assert!(file("[[auth_keys]]\nkid = \"a\"\nalg = \"RS256\"\nsecret = \"x\"\n").is_err());
    }

    #[test]
    fn drain_window_defaults_to_ten_seconds_and_rounds_up() {
        assert_eq!(cli(&[]).resolve().unwrap().drain_window_s(), 10);
        let cfg = cli(&["--drain-window-ms", "1500"]).resolve().unwrap();
        assert_eq!(cfg.drain_window_s(), 2);
        let cfg = cli(&["--drain-window-ms", "0"]).resolve().unwrap();
        assert_eq!(cfg.drain_window_s(), 0);
        assert!(toml::from_str::<Config>("drain_window_ms = 2000").is_ok());
    }
}
