//! `gateway forwarder`: one ZeroMQ hop between N publishers and M
//! gateways, so that each side knows only the forwarder's address.
//!
//! Publishers connect their PUB sockets to the XSUB side; gateways connect
//! their SUB sockets to the XPUB side. Subscriptions flow the other way:
//! a gateway with `zmq_subscribe = demand` subscribes to the channels its
//! clients want, the XPUB side passes them to the XSUB side, which passes
//! them to every publisher, whose PUB socket then sends only what some
//! gateway wants, and the XPUB side sends each gateway only what it
//! subscribed to. The loop is libzmq's own proxy (`zmq_proxy_steerable`);
//! SIGTERM or SIGINT stops it through its control socket, and the admin
//! listener asks it for its counts there (`STATISTICS`).

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::info;

/// `gateway forwarder` flags.
#[derive(Debug, clap::Args)]
pub struct ForwarderArgs {
    /// Endpoint to bind for publishers (their PUB sockets connect here;
    /// the gateway's own default, so publishers need no change); repeatable.
    /// A port of * picks a free one.
    #[arg(long = "publishers", value_name = "ENDPOINT", default_values_t = [String::from("tcp://127.0.0.1:5560")])]
    pub publishers: Vec<String>,
    /// Endpoint to bind for gateways (`zmq_connect` of each gateway);
    /// repeatable. A port of * picks a free one.
    #[arg(long = "gateways", value_name = "ENDPOINT", default_values_t = [String::from("tcp://127.0.0.1:5561")])]
    pub gateways: Vec<String>,
    /// Messages queued per peer before ZeroMQ drops (a slow gateway loses
    /// messages rather than stalling the others).
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub hwm_messages: i32,
    /// Admin listener: `/metrics` (peers on each side, publications and
    /// subscriptions moved), `/readyz` (200 while forwarding, 503 once
    /// stopping), `/healthz`. Empty: none.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9091")]
    pub admin_listen: String,
    /// Log level or tracing filter directive.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_level: String,
    /// Log lines as text or as one JSON object each.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: crate::config::LogFormat,
}

const CONTROL_ENDPOINT: &str = "inproc://forwarder-control";
/// How long the admin thread waits for the proxy's counts.
const STATISTICS_TIMEOUT_MS: i32 = 1000;

static PUBLISHER_PEERS: AtomicI64 = AtomicI64::new(0);
static GATEWAY_PEERS: AtomicI64 = AtomicI64::new(0);
/// SIGTERM or SIGINT came: `/readyz` says so while the proxy stops.
static STOPPING: AtomicBool = AtomicBool::new(false);

fn add_publisher_peers(delta: i64) -> i64 {
    PUBLISHER_PEERS.fetch_add(delta, Ordering::Relaxed) + delta
}

fn add_gateway_peers(delta: i64) -> i64 {
    GATEWAY_PEERS.fetch_add(delta, Ordering::Relaxed) + delta
}

/// Binds both sides, prints `READY forwarder publishers=… gateways=…` and
/// forwards until SIGTERM or SIGINT.
pub fn run(args: &ForwarderArgs) -> Result<(), String> {
    let ctx = zmq::Context::new();
    let zmq_err = |what: &str, e: zmq::Error| format!("{what}: {e}");
    let mut xsub = ctx
        .socket(zmq::XSUB)
        .map_err(|e| zmq_err("xsub socket", e))?;
    xsub.set_rcvhwm(args.hwm_messages)
        .map_err(|e| zmq_err("xsub rcvhwm", e))?;
    let mut xpub = ctx
        .socket(zmq::XPUB)
        .map_err(|e| zmq_err("xpub socket", e))?;
    xpub.set_sndhwm(args.hwm_messages)
        .map_err(|e| zmq_err("xpub sndhwm", e))?;
    // Every gateway's subscription goes upstream, not only a topic's
    // first: a publisher using XPUB sees each gateway's interest.
    xpub.set_xpub_verbose(true)
        .map_err(|e| zmq_err("xpub verbose", e))?;
    let publishers = bind_all(&xsub, &args.publishers)?;
    let gateways = bind_all(&xpub, &args.gateways)?;
    crate::ops::metrics::watch_zmq_peers(&ctx, &xsub, "publishers", add_publisher_peers)?;
    crate::ops::metrics::watch_zmq_peers(&ctx, &xpub, "gateways", add_gateway_peers)?;

    // A REP socket: the proxy answers `STATISTICS` on it, to whichever of
    // the two REQ sockets below asked (the admin thread, the signals'),
    // and stops on `TERMINATE`.
    let mut control = ctx
        .socket(zmq::REP)
        .map_err(|e| zmq_err("control socket", e))?;
    control
        .bind(CONTROL_ENDPOINT)
        .map_err(|e| zmq_err("control bind", e))?;
    let requester = || -> Result<zmq::Socket, String> {
        let req = ctx
            .socket(zmq::REQ)
            .map_err(|e| zmq_err("control socket", e))?;
        // A request the proxy never answers (it stopped) must not leave the
        // socket unable to ask again.
        req.set_req_relaxed(true)
            .and_then(|_| req.set_req_correlate(true))
            .and_then(|_| req.set_rcvtimeo(STATISTICS_TIMEOUT_MS))
            .and_then(|_| req.set_sndtimeo(STATISTICS_TIMEOUT_MS))
            .and_then(|_| req.set_linger(0))
            .map_err(|e| zmq_err("control options", e))?;
        req.connect(CONTROL_ENDPOINT)
            .map_err(|e| zmq_err("control connect", e))?;
        Ok(req)
    };
    let stopper = requester()?;
    let asker = Mutex::new(requester()?);
    let admin = crate::ops::admin::serve_on(&args.admin_listen, move |path| match path {
        "/metrics" => {
            let stats = crate::ops::metrics::ForwarderStats {
                publishers: PUBLISHER_PEERS.load(Ordering::Relaxed),
                gateways: GATEWAY_PEERS.load(Ordering::Relaxed),
                proxy: statistics(&asker.lock().unwrap_or_else(|e| e.into_inner())),
            };
            crate::ops::admin::metrics_response(&crate::ops::metrics::render_forwarder(&stats))
        }
        "/readyz" if STOPPING.load(Ordering::Relaxed) => {
            protocol::http::ready_response(false, "stopping", false)
        }
        "/readyz" => protocol::http::ready_response(true, "forwarding", false),
        "/healthz" => crate::ops::admin::plain(200, "OK", "ok\n"),
        _ => crate::ops::admin::plain(404, "Not Found", "not found\n"),
    })?;
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::ops::drain::unblock_terminate_signals();
            if let Some(sig) = signals.forever().next() {
                info!(signal = sig, "stopping the forwarder");
                STOPPING.store(true, Ordering::Relaxed);
                crate::ops::service::stopping("stopping");
                let _ = stopper.send("TERMINATE", 0);
            }
        })
        .map_err(|e| format!("spawn signal thread: {e}"))?;

    info!(publishers = ?publishers, gateways = ?gateways, admin = ?admin, "forwarder ready");
    let mut stdout = std::io::stdout();
    let admin_field = admin.map_or_else(String::new, |a| format!(" admin={a}"));
    let _ = writeln!(
        stdout,
        "READY forwarder publishers={} gateways={}{admin_field}",
        publishers.join(","),
        gateways.join(",")
    );
    let _ = stdout.flush();
    crate::ops::service::ready("forwarding");
    zmq::proxy_steerable(&mut xsub, &mut xpub, &mut control)
        .map_err(|e| zmq_err("zmq proxy", e))?;
    info!("forwarder stopped");
    Ok(())
}

/// The proxy's counts (libzmq's `STATISTICS`: eight numbers), or None when
/// it did not answer in time.
fn statistics(asker: &zmq::Socket) -> Option<[u64; 8]> {
    asker.send("STATISTICS", 0).ok()?;
    let frames = asker.recv_multipart(0).ok()?;
    let mut out = [0u64; 8];
    if frames.len() != out.len() {
        return None;
    }
    for (n, frame) in out.iter_mut().zip(&frames) {
        *n = u64::from_ne_bytes(frame.as_slice().try_into().ok()?);
    }
    Some(out)
}

/// Binds every endpoint; returns them as bound (a `*` port resolved).
fn bind_all(socket: &zmq::Socket, endpoints: &[String]) -> Result<Vec<String>, String> {
    let mut bound = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        socket
            .bind(endpoint)
            .map_err(|e| format!("zmq bind {endpoint}: {e}"))?;
        let last = socket
            .get_last_endpoint()
            .map_err(|e| format!("zmq endpoint: {e}"))?
            .unwrap_or_else(|raw| String::from_utf8_lossy(&raw).into_owned());
        bound.push(last);
    }
    Ok(bound)
}
