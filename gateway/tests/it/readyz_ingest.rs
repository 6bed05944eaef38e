//! `/readyz` and the ZeroMQ ingest: with `--ready-requires-publisher` the
//! gateway is ready only while a publisher is connected to it.

use std::time::{Duration, Instant};

use crate::common::*;

fn readyz(gw: &Gateway) -> (u16, String) {
    let mut conn = gw.http();
    let resp = conn.get("/readyz", &[("Connection", "close")]);
    (
        resp.status,
        String::from_utf8_lossy(&resp.body).into_owned(),
    )
}

/// Polls `/readyz` (the gateway's own signal) until it answers `status`.
fn wait_readyz(gw: &Gateway, status: u16, context: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (got, body) = readyz(gw);
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: /readyz stayed {got} {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn readyz_follows_the_publisher_when_configured() {
    // A port nothing listens on yet: the gateway keeps trying to connect.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let gw = Gateway::start(&[
        "--zmq-bind",
        "",
        "--zmq-connect",
        &endpoint,
        "--ready-requires-publisher",
    ]);
    let (status, body) = readyz(&gw);
    assert_eq!((status, body.trim()), (503, r#"{"status":"no_publisher"}"#));
    assert_eq!(
        gw.http().get("/healthz", &[]).status,
        200,
        "alive all the same"
    );

    let ctx = zmq::Context::new();
    let publisher = ctx.socket(zmq::PUB).unwrap();
    publisher.bind(&endpoint).unwrap();
    let body = wait_readyz(&gw, 200, "after the publisher came");
    assert_eq!(body.trim(), r#"{"status":"ready"}"#);

    drop(publisher);
    let body = wait_readyz(&gw, 503, "after the publisher left");
    assert_eq!(body.trim(), r#"{"status":"no_publisher"}"#);
}

#[test]
fn readyz_ignores_the_publisher_by_default() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let gw = Gateway::start(&["--zmq-bind", "", "--zmq-connect", &endpoint]);
    let (status, body) = readyz(&gw);
    assert_eq!((status, body.trim()), (200, r#"{"status":"ready"}"#));
}
