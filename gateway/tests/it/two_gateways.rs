//! Many gateway hosts fed by the same publisher: two gateway processes, each
//! connecting its SUB socket to the test's bound PUB, each with its own
//! clients; every client receives every message, in order.

use std::collections::HashMap;

use crate::common::*;

const MESSAGES: usize = 100;

#[test]
fn two_gateways_fed_by_one_publisher_each_deliver_everything() {
    let publisher = Publisher::bind();
    let gw_a = Gateway::start_connected_to(&publisher);
    let gw_b = Gateway::start_connected_to(&publisher);
    for gw in [&gw_a, &gw_b] {
        assert!(
            gw.ready_line.ends_with(" zmq=-") && gw.zmq.is_none(),
            "--zmq-bind \"\" must print zmq=-: {:?}",
            gw.ready_line
        );
    }
    let probe = wait_for_subscription(&publisher, &[&gw_a, &gw_b]);

    let mut clients: Vec<(&str, WsClient)> = Vec::new();
    for (name, gw) in [("A", &gw_a), ("B", &gw_b)] {
        for _ in 0..3 {
            clients.push((name, gw.ws("/ws?channel=ticker")));
        }
        clients.push((name, gw.ws("/ws?channel=ticker&channel=unrelated")));
    }

    let want: Vec<String> = (0..MESSAGES).map(|k| format!("tick {k}")).collect();
    for p in &want {
        publisher.publish("ticker", p.as_bytes());
    }

    // Ids are per gateway; within one gateway a message has one id.
    let mut ids_by_gateway: HashMap<&str, Vec<u64>> = HashMap::new();
    for (n, (name, ws)) in clients.iter_mut().enumerate() {
        let got = ws.deliveries(MESSAGES);
        let ctx = format!("gateway {name}, client {n}");
        assert!(
            got.iter().all(|d| d.channel == "ticker" && !d.gap),
            "{ctx}: {got:?}"
        );
        let texts: Vec<String> = got.iter().map(Delivery::text).collect();
        assert_eq!(texts, want, "{ctx}: every message, in order");
        let got_ids = ids(&got);
        assert_strictly_increasing(&got_ids, &ctx);
        let first = ids_by_gateway
            .entry(name)
            .or_insert_with(|| got_ids.clone());
        assert_eq!(
            *first, got_ids,
            "{ctx}: same ids as the other clients of this gateway"
        );
    }

    // Nothing extra queued behind them.
    publisher.publish("ticker", b"end");
    for (n, (name, ws)) in clients.iter_mut().enumerate() {
        let d = ws.next_delivery();
        assert_eq!(d.text(), "end", "gateway {name}, client {n}: {d:?}");
    }
    drop(probe);
}
