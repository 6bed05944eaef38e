//! A held long-poll has no task: the core's event loop answers it (a
//! message, the timeout, the drain), notices its client leaving, and hands
//! the connection back to a task when its next request arrives.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::common::*;

fn gateway(extra: &[&str]) -> (Gateway, std::net::SocketAddr) {
    let admin = free_addr();
    let admin_arg = admin.to_string();
    let mut args = vec!["--cores", "1", "--admin-listen", &admin_arg];
    args.extend_from_slice(extra);
    (Gateway::start(&args), admin)
}

fn poll_request(query: &str) -> Vec<u8> {
    format!("GET /events?{query} HTTP/1.1\r\nHost: gw\r\n\r\n").into_bytes()
}

#[test]
fn a_request_sent_behind_a_held_poll_is_answered_after_it() {
    let (gw, admin) = gateway(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let mut conn = gw.http();
    conn.set_read_timeout(LONGPOLL_IO_TIMEOUT);
    conn.send(&poll_request("channel=held"));
    wait_for_held_polls(admin, 1);
    // The next request arrives while the poll is held.
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n");
    publisher.publish("held", b"the answer");
    let answer = conn.read_response();
    assert_eq!(answer.status, 200, "{}", answer.describe());
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    let poll = parse_longpoll_body(&body, "held poll");
    assert_eq!(poll.messages.len(), 1, "{body}");
    assert_eq!(poll.messages[0].payload, b"the answer");
    let health = conn.read_response();
    assert_eq!(health.status, 200, "{}", health.describe());
    assert!(String::from_utf8_lossy(&health.body).contains("connections_per_core"));
    // And the connection takes a poll again.
    conn.send(&poll_request(&format!(
        "channel=held&since={}",
        poll.cursor
    )));
    wait_for_held_polls(admin, 1);
    publisher.publish("held", b"again");
    let body: serde_json::Value = serde_json::from_slice(&conn.read_response().body).unwrap();
    assert_eq!(
        parse_longpoll_body(&body, "second").messages[0].payload,
        b"again"
    );
    drop(probe);
}

#[test]
fn a_held_poll_times_out_with_its_cursor_and_a_client_leaving_is_noticed() {
    let (gw, _admin) = gateway(&["--poll-timeout-ms", "1000"]);
    let mut conn = gw.http();
    conn.set_read_timeout(LONGPOLL_IO_TIMEOUT);
    conn.send(&poll_request("channel=quiet&since=42"));
    let started = Instant::now();
    let answer = conn.read_response();
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    let poll = parse_longpoll_body(&body, "timed out");
    assert!(poll.messages.is_empty() && poll.gaps.is_empty(), "{body}");
    assert_eq!(poll.cursor, 42);
    assert!(started.elapsed() >= Duration::from_millis(900), "not held");
    // Keep-alive: the next request on the same connection.
    conn.send(b"GET /readyz HTTP/1.1\r\nHost: gw\r\n\r\n");
    assert_eq!(conn.read_response().status, 200);

    // A client that leaves while its poll is held is closed at once, not
    // at the timeout.
    let (gw, admin) = gateway(&["--poll-timeout-ms", "60000"]);
    let baseline: u64 = gw.connections_per_core().iter().sum();
    let mut leaving = std::net::TcpStream::connect(gw.listen).unwrap();
    leaving.write_all(&poll_request("channel=quiet")).unwrap();
    wait_for_held_polls(admin, 1);
    drop(leaving);
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.connections_per_core().iter().sum::<u64>() > baseline {
        assert!(
            Instant::now() < deadline,
            "the gone client's poll is still held"
        );
        std::thread::sleep(PROBE_INTERVAL);
    }
}
