//! Redundant paths from publishers (`zmq_redundant`): a gateway connected
//! to two forwarders fed by the same publishers gets every publication
//! twice. With the publishers' ids it delivers the first copy and drops the
//! others as duplicates (counted, not an error), so either path may die or
//! restart without loss; a publication without an id is refused, as its
//! copies could not be told apart. Two bound PUB sockets sending the same
//! publications stand in for the two forwarders.

use crate::common::*;

fn both(a: &Publisher, b: &Publisher, channel: &str, payload: &str, id: u64) {
    a.publish_with_id(channel, payload.as_bytes(), id);
    b.publish_with_id(channel, payload.as_bytes(), id);
}

#[test]
fn two_paths_deliver_each_publication_once_and_either_may_go() {
    let a = Publisher::bind();
    let b = Publisher::bind();
    let admin = free_addr();
    let admin_s = admin.to_string();
    let gw = Gateway::start(&[
        "--zmq-bind",
        "",
        "--zmq-connect",
        &a.endpoint,
        "--zmq-connect",
        &b.endpoint,
        "--zmq-redundant",
        "--admin-listen",
        &admin_s,
    ]);
    let mut ws = gw.ws("/ws?channel=orders");
    // The slow joiner: both paths carry numbered probes until one arrives;
    // from then on both are subscribed (each probe goes through both).
    let mut id = 0;
    let first = loop {
        id += 1;
        both(&a, &b, "orders", "probe", id);
        assert!(id < 500, "no probe arrived through either path");
        if let Some(d) = ws.try_next_delivery(PROBE_INTERVAL) {
            break d;
        }
    };
    let first_id = first.id.expect("an id");
    // Probes already sent may still arrive: read up to the last one.
    let mut seen = vec![first_id];
    while *seen.last().unwrap() < id {
        seen.push(ws.next_delivery().id.expect("an id"));
    }
    assert_eq!(
        seen,
        (first_id..=id).collect::<Vec<_>>(),
        "each probe once, in order"
    );

    for k in 1..=5 {
        both(&a, &b, "orders", &format!("m{k}"), id + k);
    }
    let got = ws.deliveries(5);
    assert_eq!(ids(&got), (id + 1..=id + 5).collect::<Vec<_>>(), "{got:?}");

    // Without an id the two copies could not be told apart: refused.
    a.publish("orders", b"no id");
    b.publish("orders", b"no id");
    // Path A goes (a forwarder killed); B carries on alone.
    drop(a);
    for k in 6..=8 {
        b.publish_with_id("orders", format!("m{k}").as_bytes(), id + k);
    }
    let got = ws.deliveries(3);
    assert_eq!(
        got.iter().map(Delivery::text).collect::<Vec<_>>(),
        ["m6", "m7", "m8"],
        "the publication without an id was not delivered, and B alone loses nothing"
    );
    assert_eq!(ids(&got), (id + 6..=id + 8).collect::<Vec<_>>());

    let metric_of = |reason: &str| {
        metric(
            admin,
            &format!("gateway_messages_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(metric_of("no_publisher_id"), 2.0, "both copies refused");
    // At least the second copy of each of m1..m5 (and of the probes that
    // came through both).
    assert!(metric_of("duplicate") >= 5.0);
}
