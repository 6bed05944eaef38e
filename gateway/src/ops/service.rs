//! systemd integration (`Type=notify`): `READY=1` once every core listens and
//! ingest is set up, `STATUS=` lines with the connection count, `WATCHDOG=1`
//! while every core's sweep keeps running, `STOPPING=1` when the drain
//! starts. Without `$NOTIFY_SOCKET` (not under systemd) every call is a no-op.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{info, warn};

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// What `/readyz` answers, on the public and the admin listener alike:
/// not ready while draining, nor (when configured) while no ZeroMQ
/// publisher is connected.
pub fn readiness(cfg: &crate::config::Config) -> (bool, &'static str) {
    // Draining implies leaving; both are read because the drain without a
    // delay sets `draining` a moment before `leaving`, and an answer in
    // between must not say "ready" while it closes its connection.
    if super::drain::leaving() || super::drain::draining() {
        (false, "draining")
    } else if cfg.ready_requires_publisher && super::metrics::zmq_peers() <= 0 {
        (false, "no_publisher")
    } else {
        (true, "ready")
    }
}

pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// The watchdog period systemd asked for: `$WATCHDOG_USEC`, for this
/// process if `$WATCHDOG_PID` names one (libsystemd's rule: unset means us).
fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Starts the watchdog thread if systemd asked for one. It pings at half
/// the period, and only when every core's sweep counter (`alive`, bumped
/// once a second by each core) has moved since the last ping: a core stuck
/// in a loop or a dead runtime thread stops the pings, and systemd restarts
/// the service. Each ping also refreshes the `STATUS=` line.
pub fn spawn_watchdog(alive: Vec<Arc<AtomicU64>>, conn_counts: Arc<[AtomicU64]>) {
    let Some(period) = watchdog_period() else {
        return;
    };
    // The sweep ticks once a second; a shorter check would see stuck cores
    // where there are none.
    let every = (period / 2).max(Duration::from_millis(1100));
    info!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let spawned = std::thread::Builder::new().name("watchdog".into()).spawn(move || {
        let mut last: Vec<u64> = alive.iter().map(|a| a.load(Ordering::Relaxed)).collect();
        loop {
            std::thread::sleep(every);
            let now: Vec<u64> = alive.iter().map(|a| a.load(Ordering::Relaxed)).collect();
            let stuck: Vec<usize> = (0..now.len()).filter(|&i| now[i] == last[i]).collect();
            last = now;
            if !stuck.is_empty() {
                warn!(cores = ?stuck, "a core's sweep did not run: withholding the watchdog ping");
                continue;
            }
            let connections: u64 = conn_counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
            let status = if super::drain::draining() {
                format!("draining, {connections} connections left")
            } else {
                format!("serving {connections} connections")
            };
            notify(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "could not start the watchdog thread");
    }
}
