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
//! SIGTERM or SIGINT stops it through its control socket.

use std::io::Write;

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
    /// Log level or tracing filter directive.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_level: String,
    /// Log lines as text or as one JSON object each.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: crate::config::LogFormat,
}

const CONTROL_ENDPOINT: &str = "inproc://forwarder-control";

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

    let mut control = ctx
        .socket(zmq::PAIR)
        .map_err(|e| zmq_err("control socket", e))?;
    control
        .bind(CONTROL_ENDPOINT)
        .map_err(|e| zmq_err("control bind", e))?;
    let stopper = ctx
        .socket(zmq::PAIR)
        .map_err(|e| zmq_err("control socket", e))?;
    stopper
        .connect(CONTROL_ENDPOINT)
        .map_err(|e| zmq_err("control connect", e))?;
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::ops::drain::unblock_terminate_signals();
            if let Some(sig) = signals.forever().next() {
                info!(signal = sig, "stopping the forwarder");
                crate::ops::service::stopping("stopping");
                let _ = stopper.send("TERMINATE", 0);
            }
        })
        .map_err(|e| format!("spawn signal thread: {e}"))?;

    info!(publishers = ?publishers, gateways = ?gateways, "forwarder ready");
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "READY forwarder publishers={} gateways={}",
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
