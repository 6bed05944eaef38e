//! The gateway binary: reads its configuration, opens one SO_REUSEPORT
//! listener per core, starts one monoio io_uring runtime per core (pinned with `pin_cores`) and
//! the ZeroMQ ingest thread, then prints one `READY …` line on stdout.
//! SIGTERM or SIGINT drains it (see `drain`).

#![deny(unsafe_code)]

mod admission;
mod auth;
mod cli;
mod config;
mod core;
mod forwarder;
mod grpc;
mod http2;
mod ingest;
mod ops;
mod request;
#[allow(unsafe_code)]
mod sys;
mod tls;
mod upstream;

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, error, info, warn};

use crate::admission::{Admission, IpCounts};
use crate::config::Config;
use crate::core::Core;
use crate::ingest::{CoreInbox, ToCore};
use crate::ops::{admin, drain, logs, service};

fn main() {
    // Before any thread exists, so that every thread inherits the mask.
    drain::block_signals();
    // clap's own exit panics when it cannot print (a closed stdout or
    // stderr); a failed print here still exits with its code.
    let (cli, matches) = cli::Cli::parse_args().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(e.exit_code());
    });
    if let Some(cli::Command::Forwarder(args)) = &cli.command {
        logs::init(&args.log_level, args.log_format);
        if let Err(e) = forwarder::run(args) {
            error!("{e}");
            std::process::exit(1);
        }
        return;
    }
    let cfg = match cli.resolve(&matches) {
        Ok(cfg) => cfg,
        Err(e) => {
            logs::print_stderr(&format!("gateway: {e}"));
            std::process::exit(2);
        }
    };
    logs::init(&cfg.log_level, cfg.log_format);
    if let Err(e) = run(Box::leak(Box::new(cfg))) {
        error!("{e}");
        std::process::exit(1);
    }
}

fn run(cfg: &'static Config) -> Result<(), String> {
    raise_open_files_limit();
    if cfg.zmq_connect.len() > 1 && !cfg.zmq_redundant {
        // Allowed (publishers of their own on each endpoint), but two
        // forwarders fed by the same publishers would deliver twice.
        warn!(
            endpoints = ?cfg.zmq_connect,
            "several zmq_connect endpoints without zmq_redundant: if they carry the same \
             publications (redundant forwarders), set zmq_redundant = true, or each \
             publication is delivered once per endpoint"
        );
    }
    // Keys in place (and the SIGHUP reload thread started) before any
    // core serves a request.
    auth::start(cfg)?;
    tls::start(cfg)?;
    spawn_reload(cfg)?;
    let cores = if cfg.cores == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        cfg.cores
    };
    let listeners = listeners_at(cfg.listen, cores, cfg.listen_backlog, cfg.defer_accept_s)
        .map_err(|e| format!("listen on {}: {e}", cfg.listen))?;
    let listen_addr = listeners[0].local_addr().map_err(|e| e.to_string())?;
    // The gRPC-only listener, one per core like the public one.
    let mut grpc_listeners: Vec<Option<std::net::TcpListener>> = match cfg.grpc_listen.parse() {
        Ok(addr) => listeners_at(addr, cores, cfg.listen_backlog, cfg.defer_accept_s)
            .map_err(|e| format!("listen on {}: {e}", cfg.grpc_listen))?
            .into_iter()
            .map(Some)
            .collect(),
        Err(_) => (0..cores).map(|_| None).collect(),
    };
    let grpc_addr = match grpc_listeners.first() {
        Some(Some(l)) => Some(l.local_addr().map_err(|e| e.to_string())?),
        _ => None,
    };
    // Duplicates for the drain, which shuts the listeners down from its own
    // thread: valid whenever that happens, whatever a core did with its copy.
    let listener_dups = listeners
        .iter()
        .chain(grpc_listeners.iter().flatten())
        .map(|l| l.try_clone().map(OwnedFd::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("duplicate a listener: {e}"))?;

    let ctx = zmq::Context::new();
    let (sub, bound) = ingest::open(&ctx, cfg)?;
    // Before the cores, which connect to its relay.
    let upstream_bound = upstream::start(&ctx, cfg)?;

    // This process's ids: a counter from the start time in milliseconds (so
    // ids grow across restarts) with a random tag in the low bits (the
    // epoch: a cursor from another process or an earlier run is recognised
    // as such, a gap, never mistaken for a position in this run).
    let start_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let first_id = protocol::id::first_gateway_id(start_ms, rand::random::<u16>());
    let published_through = Arc::new(AtomicU64::new(first_id));
    let conn_counts: Arc<[AtomicU64]> = (0..cores).map(|_| AtomicU64::new(0)).collect();
    let conn_counts_for_watchdog = conn_counts.clone();
    // Bumped by each core's sweep once a second: the watchdog's proof of life.
    let mut sweeps: Vec<Arc<AtomicU64>> = Vec::with_capacity(cores);
    // One table for all cores: a client's connections land on any core.
    let per_ip = (cfg.connections_per_ip_max > 0)
        .then(|| Arc::new(IpCounts::new(cfg.connections_per_ip_max as u32)));
    let cpu_ids = core_affinity::get_core_ids().unwrap_or_default();

    // Demand mode: the cores tell ingest which channels they have
    // subscribers for.
    let (interest_tx, interest_rx) = match cfg.zmq_subscribe {
        config::SubscribeMode::Demand => {
            let (tx, rx) = ingest::interest_channel()
                .map_err(|e| format!("eventfd for subscriptions: {e}"))?;
            (Some(tx), Some(rx))
        }
        config::SubscribeMode::All => (None, None),
    };
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut inboxes = Vec::with_capacity(cores);
    let mut threads = Vec::with_capacity(cores);
    for (index, listener) in listeners.into_iter().enumerate() {
        let (tx, rx) = crossbeam_channel::bounded::<ToCore>(cfg.core_queue_messages_max);
        let doorbell = Arc::new(sys::eventfd().map_err(|e| format!("eventfd: {e}"))?);
        let rung = Arc::new(AtomicBool::new(false));
        inboxes.push(CoreInbox {
            tx,
            rung: rung.clone(),
            doorbell: doorbell.clone(),
        });
        let cpu = cpu_ids.get(index % cpu_ids.len().max(1)).copied();
        let ready = ready_tx.clone();
        let published = published_through.clone();
        let counts = conn_counts.clone();
        let alive = Arc::new(AtomicU64::new(0));
        sweeps.push(alive.clone());
        let per_ip = per_ip.clone();
        let interest = interest_tx.clone();
        let ctx = upstream_bound.as_ref().map(|_| ctx.clone());
        let grpc_listener = grpc_listeners[index].take();
        let thread = std::thread::Builder::new()
            .name(format!("core-{index}"))
            .spawn(move || {
                if let Some(cpu) = cpu.filter(|_| cfg.pin_cores) {
                    if !core_affinity::set_for_current(cpu) {
                        warn!(core = index, "could not pin thread to its CPU");
                    }
                }
                let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(cfg.ring_entries)
                    .enable_timer()
                    .build();
                let mut rt = match built {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(format!("core {index}: io_uring runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let admission = Admission::new(cfg, cores, per_ip, 0);
                    let upstream = match ctx.as_ref().map(upstream::CoreUpstream::open) {
                        None => None,
                        Some(Ok(up)) => Some(up),
                        Some(Err(e)) => {
                            let _ = ready.send(Err(format!("core {index}: {e}")));
                            return;
                        }
                    };
                    let links = core::Links { interest, upstream };
                    let core = match Core::new(
                        index, cfg, first_id, published, counts, admission, links,
                    ) {
                        Ok(core) => Rc::new(core),
                        Err(e) => {
                            let _ = ready.send(Err(format!("core {index}: epoll: {e}")));
                            return;
                        }
                    };
                    // monoio's listener must be made inside the runtime.
                    let listener = match monoio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready.send(Err(format!("core {index}: listener: {e}")));
                            return;
                        }
                    };
                    monoio::spawn(core::events::event_loop(core.clone(), |core, key| {
                        monoio::spawn(request::serve(core, key, http2::start));
                    }));
                    monoio::spawn(core::doorbell_loop(core.clone(), rx, rung, doorbell));
                    monoio::spawn(core::sweep_loop(core.clone(), alive));
                    if let Some(grpc) = grpc_listener {
                        match monoio::net::TcpListener::from_std(grpc) {
                            // The same path as the public listener's: the
                            // preface tells HTTP/2 there too.
                            Ok(l) => drop(monoio::spawn(accept_loop(
                                core.clone(),
                                l,
                                cfg.grpc_listen_tls,
                            ))),
                            Err(e) => {
                                let _ =
                                    ready.send(Err(format!("core {index}: grpc listener: {e}")));
                                return;
                            }
                        }
                    }
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    accept_loop(core, listener, cfg.tls_enabled()).await;
                    // Draining: the connections, the doorbell and the sweep
                    // go on until the process exits.
                    std::future::pending::<()>().await;
                });
            })
            .map_err(|e| format!("spawn core thread: {e}"))?;
        threads.push(thread);
    }
    drop(ready_tx);
    for _ in 0..cores {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a core thread died during start-up".into()),
        }
    }

    let ingest_thread = std::thread::Builder::new()
        .name("ingest".into())
        .spawn(move || {
            let _ctx = ctx;
            ingest::run(sub, cfg, inboxes, published_through, interest_rx)
        })
        .map_err(|e| format!("spawn ingest thread: {e}"))?;
    drain::spawn(
        listener_dups,
        conn_counts,
        std::time::Duration::from_millis(cfg.drain_window_ms),
        std::time::Duration::from_millis(cfg.drain_delay_ms),
    )?;

    let admin_addr = admin::spawn(cfg, conn_counts_for_watchdog.clone())?;
    info!(
        listen = %listen_addr,
        admin = %admin_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
        cores,
        zmq_bind = bound.endpoint.as_deref().unwrap_or("-"),
        zmq_connect = ?cfg.zmq_connect,
        upstream_bind = ?upstream_bound,
        upstream_connect = ?cfg.upstream_connect,
        grpc = %grpc_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
        "gateway ready"
    );
    let mut stdout = std::io::stdout();
    // The upstream endpoint(s) bound, when there are any (port `*` picks one).
    let upstream_field = match upstream_bound.as_deref() {
        Some(bound) if !bound.is_empty() => format!(" upstream={}", bound.join(",")),
        _ => String::new(),
    };
    let grpc_field = grpc_addr.map_or_else(String::new, |a| format!(" grpc={a}"));
    let _ = writeln!(
        stdout,
        "READY listen={listen_addr} zmq={}{upstream_field}{grpc_field}",
        bound.endpoint.as_deref().unwrap_or("-")
    );
    let _ = stdout.flush();
    service::ready(&format!("serving on {listen_addr}"));
    service::spawn_watchdog(sweeps, conn_counts_for_watchdog);

    let _ = ingest_thread.join();
    for t in threads {
        let _ = t.join();
    }
    Err("a core or the ingest thread stopped".into())
}

/// Starts the thread that a SIGHUP wakes to re-read the auth keys and the
/// TLS certificates (when either is in use; otherwise SIGHUP stays blocked
/// and is ignored).
fn spawn_reload(cfg: &'static config::Config) -> Result<(), String> {
    use signal_hook::consts::SIGHUP;
    if !cfg.auth && !cfg.tls_enabled() {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP])
        .map_err(|e| format!("SIGHUP handler: {e}"))?;
    std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            drain::unblock_sighup();
            for _ in signals.forever() {
                auth::reload(cfg);
                tls::reload(cfg);
            }
        })
        .map_err(|e| format!("spawn the reload thread: {e}"))?;
    Ok(())
}

/// Accepts until the drain shuts the listener down, admitting each
/// connection or answering it 503. The one `accept()` future is always
/// awaited to completion: dropping a pending accept loses the connection the
/// kernel has already handed to it. The drain ends it from outside with
/// `shutdown(SHUT_RD)` on the listener, which completes the pending accept
/// with an error.
async fn accept_loop(core: Rc<Core>, listener: monoio::net::TcpListener, tls: bool) {
    use std::os::fd::{AsRawFd, IntoRawFd};
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                match core.admit(stream.as_raw_fd(), peer) {
                    Ok(key) => {
                        // The slab entry owns the socket from here; nothing
                        // of monoio's is kept per connection. A fresh
                        // stream has no operation in flight, so it gives
                        // its descriptor up.
                        let fd = stream.into_raw_fd();
                        if let Err(e) = core.epoll.add(fd, key) {
                            // Out of epoll watches (fs.epoll.max_user_watches)
                            // or memory: closed unanswered, like a full
                            // listen queue would.
                            warn!(core = core.index, error = %e, "epoll refused a connection; closing it");
                            core.deregister(key);
                            continue;
                        }
                        debug!(core = core.index, %peer, tls, "connection accepted");
                        if tls {
                            if let Some(session) = tls::Session::new() {
                                core.with_conn(key, |c| c.put_tls(session));
                            }
                        }
                        monoio::spawn(request::serve(core.clone(), key, http2::start));
                    }
                    Err(refusal) => {
                        core.stats.handshake(refusal.reason());
                        // Counted here, logged by the sweep once a second.
                        debug!(core = core.index, %peer, reason = refusal.reason(), "connection refused");
                        if tls {
                            // A cleartext 503 means nothing to a TLS
                            // client; the handshake is what admission
                            // spares the core. Closed unanswered.
                            drop(stream);
                            continue;
                        }
                        monoio::spawn(request::refuse(
                            stream,
                            admission::refusal_response(refusal),
                        ));
                    }
                }
            }
            // The drain's shutdown(SHUT_RD) completes the pending accept
            // with EINVAL: that is the listener closing as asked, not an
            // error.
            Err(_) if drain::draining() => {
                info!(
                    core = core.index,
                    "stopped accepting: the drain closed this core's listener"
                );
                return;
            }
            Err(e) => {
                // Out of descriptors or memory: back off briefly rather than
                // spin; the kernel keeps the queue meanwhile.
                warn!(core = core.index, error = %e, "accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// One listener per core on the same address (SO_REUSEPORT: the kernel
/// spreads connections over them). Port 0 is resolved by the first bind and
/// reused by the others.
fn listeners_at(
    addr: SocketAddr,
    count: usize,
    backlog: i32,
    defer_accept_s: u32,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nodelay(true)?;
        if defer_accept_s > 0 {
            sys::defer_accept(&socket, defer_accept_s)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// Lifts the soft open-files limit to the hard one: each connection is a
/// descriptor, and the soft default (often 1024) is far below what the host
/// was tuned for.
fn raise_open_files_limit() {
    if !sys::raise_open_files_limit() {
        warn!("could not raise the open files limit");
    }
}
