//! The admin listener: `/metrics` in Prometheus text format moves with the
//! traffic; `/healthz` and `/readyz` answer there as on the public port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;

/// Samples of a scrape: `name{labels}` (as written) → value.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = HashMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            samples.insert(series.to_string(), value);
        }
        Scrape(samples)
    }

    /// Sum of the samples of `name` whose labels include every `want` pair.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (n, labels) = series.split_once('{').unwrap_or((series.as_str(), ""));
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

fn admin_get(addr: SocketAddr, path: &str) -> HttpResponse {
    let mut conn = HttpConn::connect(addr);
    let resp = conn.get(path, &[]);
    assert_eq!(
        resp.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close"),
        "{path}: one request per admin connection"
    );
    resp
}

fn scrape(addr: SocketAddr) -> Scrape {
    let resp = admin_get(addr, "/metrics");
    assert_eq!(resp.status, 200, "{}", resp.describe());
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{}",
        resp.describe()
    );
    Scrape::parse(&String::from_utf8(resp.body).unwrap())
}

/// Scrapes until `done` holds (the cores publish once a second), bounded.
fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(addr);
        if done(&s) {
            return s;
        }
        if Instant::now() > deadline {
            panic!("metrics never showed {what}: {:?}", s.0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_move_with_the_traffic() {
    let admin = free_addr();
    let admin_arg = admin.to_string();
    let gw = Gateway::start(&["--cores", "2", "--admin-listen", &admin_arg]);
    assert!(gw.log().contains("admin listener"), "{}", gw.log());

    assert_eq!(admin_get(admin, "/healthz").status, 200);
    assert_eq!(admin_get(admin, "/readyz").status, 200);
    assert_eq!(admin_get(admin, "/nope").status, 404);

    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    drop(probe);
    // Let the probe's messages and connection settle into the snapshots.
    let s = scrape_until(admin, "no open websocket", |s| {
        s.sum("gateway_connections", &[("transport", "websocket")]) == 0.0
    });
    std::thread::sleep(Duration::from_millis(2200));
    let base = scrape(admin);
    assert!(s.sum("gateway_zmq_peers", &[]) >= 1.0);
    let base_in = base.sum("gateway_messages_in_total", &[]);
    let base_deliveries = base.sum("gateway_deliveries_total", &[]);
    let base_not_found = base.sum("gateway_handshakes_total", &[("result", "not found")]);
    let base_ws = base.sum("gateway_handshakes_total", &[("result", "ws")]);

    let mut ws: Vec<WsClient> = (0..3).map(|_| gw.ws("/ws?channel=m")).collect();
    let mut sse = gw.sse("/events?channel=m", None);
    scrape_until(admin, "3 websockets and 1 sse stream", |s| {
        s.sum("gateway_connections", &[("transport", "websocket")]) == 3.0
            && s.sum("gateway_connections", &[("transport", "sse")]) == 1.0
    });

    for i in 0..5 {
        publisher.publish("m", format!("message {i}").as_bytes());
    }
    for client in &mut ws {
        assert_eq!(client.deliveries(5).len(), 5);
    }
    assert_eq!(sse.deliveries(5).len(), 5);

    let resp = HttpConn::connect(gw.listen).get("/no-such-path", &[]);
    assert_eq!(resp.status, 404);

    let s = scrape_until(admin, "20 more deliveries and a 404", |s| {
        s.sum("gateway_deliveries_total", &[]) >= base_deliveries + 20.0
            && s.sum("gateway_handshakes_total", &[("result", "not found")]) >= base_not_found + 1.0
    });
    assert_eq!(s.sum("gateway_messages_in_total", &[]), base_in + 5.0);
    assert_eq!(
        s.sum("gateway_deliveries_total", &[]),
        base_deliveries + 20.0
    );
    assert_eq!(
        s.sum("gateway_handshakes_total", &[("result", "not found")]),
        base_not_found + 1.0
    );
    assert_eq!(
        s.sum("gateway_handshakes_total", &[("result", "ws")]),
        base_ws + 3.0
    );
    assert!(s.sum("gateway_handshakes_total", &[("result", "sse")]) >= 1.0);
    assert!(s.sum("gateway_delivered_bytes_total", &[]) > 0.0);
    assert!(s.sum("gateway_publish_to_send_seconds_count", &[]) > 0.0);
    assert_eq!(
        s.sum("gateway_publish_to_send_seconds_bucket", &[("le", "+Inf")]),
        s.sum("gateway_publish_to_send_seconds_count", &[])
    );
    assert_eq!(s.sum("gateway_messages_dropped_total", &[]), 0.0);

    // A publication ingest refuses is counted by its reason.
    publisher.publish_meta("m", b"x", "not json");
    scrape_until(admin, "a dropped publication", |s| {
        s.sum("gateway_messages_dropped_total", &[("reason", "bad_meta")]) == 1.0
    });
}
