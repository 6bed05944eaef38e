//! A log stream whose reader goes away (`gateway 2>&1 | head -n 2`, a log
//! shipper restarting) never stops serving, draining or exiting: the lines
//! are lost and counted in `/metrics`.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;

/// A pipe: (read end, write end), both close-on-exec in this process (the
/// child gets the write end as its stderr through `Stdio`).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills `fds` with two new descriptors on success, which
    // are then owned by the returned values only.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0, "pipe2");
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    }
}

fn lines_lost(admin: std::net::SocketAddr) -> u64 {
    let resp = HttpConn::connect(admin).get("/metrics", &[]);
    assert_eq!(resp.status, 200, "{}", resp.describe());
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("gateway_log_lines_lost_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no gateway_log_lines_lost_total in /metrics:\n{text}"))
}

#[test]
fn a_closed_log_stream_stops_neither_serving_nor_the_drain() {
    let (reader, writer) = pipe();
    let admin = free_addr();
    let admin_arg = admin.to_string();
    let mut gw = Gateway::start_with_stderr(
        &[
            "--cores",
            "2",
            "--admin-listen",
            &admin_arg,
            "--drain-window-ms",
            "200",
        ],
        Stdio::from(writer),
    );
    // The reader takes a line and goes, as `head -n 1` would.
    let mut first = String::new();
    BufReader::new(File::from(reader))
        .read_line(&mut first)
        .expect("read the gateway's first log line");
    assert!(!first.is_empty(), "the gateway logged nothing before READY");

    // Each refusal is logged; with SO_REUSEPORT they land on both cores.
    const REFUSALS: u64 = 20;
    for _ in 0..REFUSALS {
        let resp = gw.http().get("/no-such-path", &[]);
        assert_eq!(resp.status, 404, "{}", resp.describe());
    }
    // Serving goes on, on every core.
    for _ in 0..10 {
        gw.healthz();
    }
    let mut ws = gw.ws("/ws?channel=after-the-pipe-closed");
    assert!(
        lines_lost(admin) >= REFUSALS,
        "each refusal's log line is counted as lost"
    );

    // The drain logs as it goes; its lines are lost too, and it still ends.
    gw.signal(libc::SIGTERM);
    // The open WebSocket is asked to go (1012), and answers the close.
    loop {
        match ws.ws.read() {
            Ok(tungstenite::Message::Close(frame)) => {
                let code = frame.map(|f| u16::from(f.code));
                assert_eq!(code, Some(1012), "the drain's close code");
            }
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .expect("the gateway still runs 20 s after SIGTERM with a 200 ms drain window");
    assert!(status.success(), "drain exit status: {status}");
}
