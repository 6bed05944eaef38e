//! Connection lifecycle over time: heartbeats keep quiet streams alive (a
//! WebSocket ping, an SSE comment, sent by each core's once-a-second
//! sweep), a WebSocket that stops answering them is closed as a dead peer,
//! an SSE stream starts with a jittered `retry:` (HTTP/1.1: as a chunked
//! body; HTTP/1.0: as is), and a request head that
//! never completes is closed at the head timeout (slowloris).
//!
//! Nothing here sleeps: every wait is a read of something the gateway sends
//! (a ping, a comment, EOF), under the usual safety-net read timeout.

use std::io::{BufRead, BufReader, Read, Write};

use tungstenite::Message;

use crate::common::*;

/// Heartbeats every second and a one-second pong timeout: a WebSocket silent
/// for more than two seconds is dead.
const FAST_HEARTBEATS: &[&str] = &[
    "--heartbeat-interval-ms",
    "1000",
    "--pong-timeout-ms",
    "1000",
];

#[test]
fn an_idle_websocket_that_answers_pings_stays_open() {
    let mut args = FAST_HEARTBEATS.to_vec();
    args.extend(["--cores", "1"]);
    let gw = Gateway::start(&args);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let _probe = wait_for_subscription(&publisher, &[&gw]);

    let mut ws = gw.ws("/ws?channel=quiet");
    // tungstenite answers each ping with a pong on its next read: this is a
    // live client that says nothing else. Five pings span four intervals,
    // twice the silence after which an unanswering client is closed.
    let mut pings = 0;
    while pings < 5 {
        match ws.next_message() {
            Message::Ping(payload) => {
                assert!(payload.is_empty(), "heartbeat pings carry no payload");
                pings += 1;
            }
            other => panic!("an idle subscriber got {other:?} instead of a ping"),
        }
    }
    publisher.publish("quiet", b"still here");
    let d = ws.next_delivery();
    assert_eq!(
        (d.channel.as_str(), d.text().as_str()),
        ("quiet", "still here")
    );
}

#[test]
fn a_websocket_that_never_answers_pings_is_closed_as_a_dead_peer() {
    let gw = Gateway::start(FAST_HEARTBEATS);
    let mut stream = tcp_connect(gw.listen, None, None);
    let (head, _) = send_upgrade(&mut stream, "/ws?channel=quiet");
    assert_eq!(head.status, 101, "{head:?}");

    // Read, never write: the gateway pings, hears nothing, and closes.
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the gateway did not close a WebSocket that never answered its pings \
                 (read: {e}; got {got:?})"
            ),
        }
    }
    assert!(
        !got.is_empty() && got.len() % 2 == 0,
        "expected one or more empty pings before the close, got {got:?}"
    );
    assert!(
        got.chunks(2).all(|f| f == [0x89, 0x00]),
        "only empty pings were due, got {got:?}"
    );
    // A dead peer gets no close frame: nobody would read it.
    gw.healthz();
}

#[test]
fn an_sse_stream_starts_with_a_jittered_retry_then_gets_heartbeats() {
    let gw = Gateway::start(FAST_HEARTBEATS);
    let mut stream = tcp_connect(gw.listen, None, None);
    stream
        .write_all(
            b"GET /events?channel=quiet HTTP/1.1\r\nHost: gateway\r\n\
              Accept: text/event-stream\r\n\r\n",
        )
        .unwrap();
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader);
    assert_eq!(head.status, 200, "{head:?}");
    // HTTP/1.1: a chunked body, each write whole events in one chunk, so
    // that clients reading chunk by chunk get every event as it comes.
    assert_eq!(
        head.header("transfer-encoding"),
        Some("chunked"),
        "{head:?}"
    );
    let first = next_chunk(&mut reader);
    let retry: u32 = first
        .strip_prefix("retry: ")
        .and_then(|v| v.strip_suffix("\n\n"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the stream starts with a retry: field, got {first:?}"));
    assert!((1000..=5000).contains(&retry), "retry: {retry}");
    // An idle stream: heartbeat comments, each followed by a blank line,
    // and nothing else.
    for _ in 0..3 {
        assert_eq!(next_chunk(&mut reader), ": heartbeat\n\n");
    }
}

/// Reads one chunk of a chunked body: its size line, its bytes and the
/// CRLF after them, each checked.
fn next_chunk(reader: &mut impl BufRead) -> String {
    let mut size_line = String::new();
    reader.read_line(&mut size_line).unwrap();
    let size = size_line
        .strip_suffix("\r\n")
        .and_then(|s| usize::from_str_radix(s, 16).ok())
        .unwrap_or_else(|| panic!("not a chunk size line: {size_line:?}"));
    assert!(size > 0, "the stream ended");
    let mut body = vec![0u8; size + 2];
    reader.read_exact(&mut body).unwrap();
    assert!(
        body.ends_with(b"\r\n"),
        "chunk not followed by CRLF: {body:?}"
    );
    body.truncate(size);
    String::from_utf8(body).unwrap()
}

#[test]
fn an_http_1_0_sse_stream_is_sent_as_is_and_ends_with_the_connection() {
    let gw = Gateway::start(FAST_HEARTBEATS);
    let mut stream = tcp_connect(gw.listen, None, None);
    stream
        .write_all(b"GET /events?channel=quiet HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader);
    assert_eq!(head.status, 200, "{head:?}");
    // HTTP/1.0 has no chunked coding: the events themselves, and the body
    // ends with the connection.
    assert_eq!(head.header("transfer-encoding"), None, "{head:?}");
    assert_eq!(head.header("connection"), Some("close"), "{head:?}");
    let mut line = || {
        let mut l = String::new();
        reader.read_line(&mut l).unwrap();
        l
    };
    assert!(line().starts_with("retry: "));
    assert_eq!(line(), "\n");
    assert_eq!(line(), ": heartbeat\n");
    assert_eq!(line(), "\n");
}

#[test]
fn sse_retry_values_vary_between_streams() {
    let gw = Gateway::start(&[]);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let mut stream = tcp_connect(gw.listen, None, None);
        stream
            .write_all(
                b"GET /events?channel=a HTTP/1.1\r\nHost: gateway\r\n\
                  Accept: text/event-stream\r\n\r\n",
            )
            .unwrap();
        let mut reader = BufReader::new(stream);
        assert_eq!(read_head(&mut reader).status, 200);
        seen.insert(next_chunk(&mut reader));
    }
    assert!(
        seen.len() > 1,
        "every stream got the same retry, so reconnects would come in one wave: {seen:?}"
    );
}

#[test]
fn a_request_head_that_never_completes_is_closed_while_others_are_served() {
    let gw = Gateway::start(&["--head-timeout-ms", "1000", "--cores", "1"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());

    // Slowloris: half a head, then nothing.
    let mut slow = tcp_connect(gw.listen, None, None);
    slow.write_all(b"GET /ws?channel=news HTTP/1.1\r\nHost: gateway\r\n")
        .unwrap();

    // Meanwhile the same core serves everyone else.
    for _ in 0..3 {
        gw.healthz();
    }
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let mut sse = gw.sse("/events?channel=news", None);
    publisher.publish("news", b"served");
    assert_eq!(sse.next_delivery().text(), "served");
    drop(probe);

    closed_unanswered(&mut slow, "an incomplete head");
    // A connection that completes its head in time is not affected.
    gw.healthz();
}

#[test]
fn a_connection_that_never_speaks_is_closed_too() {
    // The listener defers accepts until a connection's first bytes arrive
    // (`defer_accept_s`, 1 s by default): one that sends nothing is
    // accepted at that timeout, then closed at the head timeout, rather
    // than left in the kernel or held for good.
    let gw = Gateway::start(&["--head-timeout-ms", "1000", "--cores", "1"]);
    let mut silent = tcp_connect(gw.listen, None, None);
    closed_unanswered(&mut silent, "a silent connection");
    gw.healthz();
}

/// Waits (under the read timeout) for the gateway to close `stream`
/// without having answered anything on it; `what` names it in failures.
fn closed_unanswered(stream: &mut std::net::TcpStream, what: &str) {
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "{what} got an answer instead of a close: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("{what} was never closed: {e}"),
    }
}
