//! Graceful drain: the first SIGTERM or SIGINT stops new connections and
//! closes the open ones spread over `drain_window_ms`; the process exits 0
//! once none is left, or at the window plus [`DRAIN_MARGIN`] at the latest.
//! A second signal exits at once.
//!
//! Who does what:
//!
//! - with `drain_delay_ms`, `/readyz` answers 503 `draining` at once
//!   ([`leaving`]) while everything else goes on as usual for that long,
//!   so that the balancer stops sending clients here before they would be
//!   refused;
//! - this module's drain thread then sets [`draining`], shuts down every
//!   core's listener (`shutdown(SHUT_RD)` on a duplicate of its descriptor):
//!   the kernel stops routing new connections to it (the other listeners of
//!   the `SO_REUSEPORT` group, another gateway process on the same port,
//!   get them; with `net.ipv4.tcp_migrate_req=1` also the connections it had
//!   queued), and the pending io_uring accept completes with an error, on
//!   which the core's accept loop ends. No accept future is dropped;
//! - `/readyz` answers 503 `draining`;
//! - each core's once-a-second sweep asks its share of the open connections
//!   to go (see `Core::drain_step`): no timer per connection;
//! - a timeline thread logs the connections left every second and exits
//!   the process when there are none, or at the deadline.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{info, warn};

/// How long past the drain window the process waits for its last
/// connections (a close handshake, a lingering slow client) before it exits
/// regardless.
pub const DRAIN_MARGIN: Duration = Duration::from_secs(5);

/// How often the timeline thread looks at the connection counts (it exits
/// the process as soon as they are all zero).
const CHECK_EVERY: Duration = Duration::from_millis(20);

static DRAINING: AtomicBool = AtomicBool::new(false);
/// SIGTERM came: not ready any more, though (during `drain_delay_ms`) not
/// draining yet.
static LEAVING: AtomicBool = AtomicBool::new(false);
/// Connections the cores have asked to go so far, all cores together (for
/// the timeline).
static ASKED: AtomicU64 = AtomicU64::new(0);

/// Whether the process is draining: no new streams, every response closes
/// its connection, `/readyz` says `draining`.
pub fn draining() -> bool {
    DRAINING.load(Ordering::Acquire)
}

/// Whether a signal asked the process to go: `/readyz` answers 503 from
/// then on, before the drain itself starts.
pub fn leaving() -> bool {
    LEAVING.load(Ordering::Acquire)
}

/// Counts connections a core has just asked to go.
pub fn note_asked(n: u64) {
    ASKED.fetch_add(n, Ordering::Relaxed);
}

/// Blocks SIGTERM and SIGINT in the calling thread and in every thread it
/// starts afterwards, so that they reach only the signal thread (which
/// unblocks them): a core's `io_uring_enter` or the ingest's `recv` is
/// never interrupted. SIGHUP too: it reaches only the reload thread (auth
/// keys and TLS certificates), and is ignored (left pending) when that
/// thread does not run.
/// Call first thing in `main`, before any thread exists.
pub fn block_signals() {
    set_mask(libc::SIG_BLOCK);
    sighup_mask(libc::SIG_BLOCK);
}

/// Lets SIGTERM and SIGINT reach the calling thread (a signal thread).
pub fn unblock_terminate_signals() {
    set_mask(libc::SIG_UNBLOCK);
}

/// Lets SIGHUP reach the calling thread (the reload thread).
pub fn unblock_sighup() {
    sighup_mask(libc::SIG_UNBLOCK);
}

fn sighup_mask(how: libc::c_int) {
    crate::sys::signal_mask(how, &[libc::SIGHUP]);
}

fn set_mask(how: libc::c_int) {
    crate::sys::signal_mask(how, &[SIGTERM, SIGINT]);
}

/// Starts the signal thread. `listeners` are duplicates of the cores'
/// listening sockets (shut down when the drain starts; as duplicates they
/// stay valid whatever the cores do with theirs); `conn_counts` the cores'
/// connection counters.
pub fn spawn(
    listeners: Vec<OwnedFd>,
    conn_counts: Arc<[AtomicU64]>,
    window: Duration,
    delay: Duration,
) -> Result<(), String> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            set_mask(libc::SIG_UNBLOCK);
            let mut signals = signals.forever();
            let Some(first) = signals.next() else { return };
            start(first, listeners, conn_counts.clone(), window, delay);
            if let Some(sig) = signals.next() {
                warn!(
                    signal = name(sig),
                    connections_left = total(&conn_counts),
                    "second signal during the drain: exiting now"
                );
                exit_now();
            }
        })
        .map_err(|e| format!("spawn signal thread: {e}"))?;
    Ok(())
}

/// Starts the drain on its own thread (the signal thread goes on waiting
/// for a second signal, which exits at once, during the delay too).
fn start(
    sig: libc::c_int,
    listeners: Vec<OwnedFd>,
    counts: Arc<[AtomicU64]>,
    window: Duration,
    delay: Duration,
) {
    super::service::stopping("draining");
    if delay.is_zero() {
        // Draining before /readyz says so: whoever sees the 503 sees a
        // draining gateway (its answers close their connections).
        drain(sig, &listeners, &counts, window);
    } else {
        info!(
            signal = name(sig),
            drain_delay_ms = delay.as_millis() as u64,
            "leaving: /readyz answers 503; serving as usual until the drain starts"
        );
    }
    LEAVING.store(true, Ordering::Release);
    let spawned = std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || {
            if !delay.is_zero() {
                std::thread::sleep(delay);
                drain(sig, &listeners, &counts, window);
            }
            timeline(&counts, window);
        });
    if let Err(e) = spawned {
        warn!(error = %e, "no drain timeline thread; exiting now");
        exit_now();
    }
}

/// No new connections; the open ones are asked to go over the window.
fn drain(sig: libc::c_int, listeners: &[OwnedFd], counts: &[AtomicU64], window: Duration) {
    info!(
        signal = name(sig),
        connections = total(counts),
        drain_window_ms = window.as_millis() as u64,
        "draining: no new connections; open ones are closed over the drain window"
    );
    DRAINING.store(true, Ordering::Release);
    for fd in listeners {
        // A duplicate of a core's listener, which this thread owns.
        if let Err(e) = crate::sys::shutdown(fd.as_raw_fd(), std::net::Shutdown::Read) {
            warn!(error = %e, "shutting down a listener failed");
        }
    }
}

/// Logs the connections left once a second and exits the process when none
/// is left, or at the window plus the margin.
fn timeline(counts: &[AtomicU64], window: Duration) {
    let started = Instant::now();
    let deadline = started + window + DRAIN_MARGIN;
    let mut next_log = started;
    loop {
        let left = total(counts);
        let now = Instant::now();
        let elapsed_ms = now.duration_since(started).as_millis() as u64;
        if left == 0 {
            info!(elapsed_ms, "drained: no connection left; exiting");
            exit_now();
        }
        if now >= deadline {
            warn!(
                elapsed_ms,
                connections_left = left,
                "drain window and margin passed; exiting with connections still open"
            );
            exit_now();
        }
        if now >= next_log {
            let per_core: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            info!(
                elapsed_ms,
                asked_to_go = ASKED.load(Ordering::Relaxed),
                connections_left = left,
                ?per_core,
                "draining"
            );
            next_log += Duration::from_secs(1);
        }
        std::thread::sleep(CHECK_EVERY);
    }
}

fn total(counts: &[AtomicU64]) -> u64 {
    counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
}

fn name(sig: libc::c_int) -> &'static str {
    match sig {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "signal",
    }
}

/// Exits 0 without running destructors: the core, ingest and ZeroMQ threads
/// are still running, and nothing is left to flush (logs go to stderr
/// unbuffered, stdout was flushed after the READY line).
fn exit_now() -> ! {
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    crate::sys::exit_now(0)
}
