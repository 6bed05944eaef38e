//! systemd's notify protocol, with a test socket standing in for systemd:
//! READY=1 arrives once the gateway serves, then WATCHDOG=1 pings while its
//! cores run, with STATUS= lines; SIGTERM sends STOPPING=1.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::common::*;

/// Reads datagrams until one contains `wanted`, within a safety net.
fn wait_for(sock: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = msg.lines().any(|l| l == wanted);
                seen.push(msg);
                if hit {
                    return;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    panic!("no {wanted} on the notify socket; got {seen:?}");
}

#[test]
fn ready_watchdog_and_stopping_reach_the_notify_socket() {
    let dir = std::env::temp_dir().join(format!("gateway-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();

    let gw = Gateway::start_with_env(
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let mut seen = Vec::new();
    wait_for(&sock, "READY=1", &mut seen);
    assert!(
        seen[0].lines().any(|l| l.starts_with("STATUS=serving")),
        "{seen:?}"
    );
    wait_for(&sock, "WATCHDOG=1", &mut seen);
    assert!(
        seen.last()
            .unwrap()
            .lines()
            .any(|l| l.starts_with("STATUS=serving ")),
        "watchdog pings carry the status: {seen:?}"
    );

    // SIGTERM starts the drain, which systemd hears about.
    gw.signal(libc::SIGTERM);
    wait_for(&sock, "STOPPING=1", &mut seen);
    drop(gw);
    std::fs::remove_dir_all(&dir).unwrap();
}
