//! The publisher goes away and comes back (a deploy, a crash): the gateway,
//! connecting to it, keeps every client connected meanwhile, reconnects on
//! its own, and delivery resumes, with the publisher's ids going on where
//! they were.

use crate::common::*;

#[test]
fn clients_stay_connected_while_the_publisher_is_gone_and_delivery_resumes_when_it_is_back() {
    let first = Publisher::bind();
    let endpoint = first.endpoint.clone();
    let admin = free_addr();
    let admin_s = admin.to_string();
    let mut gw = Gateway::start(&[
        "--zmq-bind",
        "",
        "--zmq-connect",
        endpoint.as_str(),
        "--admin-listen",
        &admin_s,
    ]);
    drop(wait_for_subscription(&first, &[&gw]));

    let mut ws = gw.ws("/ws?channel=news");
    let mut sse = gw.sse("/events?channel=news", None);

    first.publish_with_id("news", b"before", 1);
    for d in [ws.next_delivery(), sse.next_delivery()] {
        assert_eq!((d.text(), d.id), ("before".to_string(), Some(1)), "{d:?}");
    }

    // The publisher goes away (its socket and context closed), and a new
    // one binds the same endpoint.
    drop(first);
    let resp = gw.readyz();
    assert_eq!(
        resp.status, 200,
        "no publisher is no reason to send clients away"
    );
    let second = Publisher::bind_at(&endpoint);
    // Delivery is back once a probe gets through (the gateway reconnects on
    // its own, ZeroMQ's reconnect interval).
    let probe = wait_for_subscription(&second, &[&gw]);

    // A publisher that starts over at an id it already used is ignored on
    // that channel until it passes the last one.
    second.publish_with_id("news", b"replayed", 1);
    second.publish_with_id("news", b"after", 2);
    for d in [ws.next_delivery(), sse.next_delivery()] {
        assert_eq!((d.text(), d.id), ("after".to_string(), Some(2)), "{d:?}");
    }
    // Nobody was disconnected: these are the clients of before the
    // restart (a closed one fails its read above instead).
    assert_eq!(
        metric(
            admin,
            "gateway_messages_dropped_total{reason=\"duplicate\"}"
        ),
        1.0,
        "the replayed id is counted as a duplicate"
    );
    drop(probe);
    assert!(
        gw.wait_exit(std::time::Duration::ZERO).is_none(),
        "gateway still running"
    );
}
