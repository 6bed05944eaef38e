//! Multi-core: connections spread over both cores, and every connection gets
//! every message of its channels, in id order, none missing, none extra.

use std::collections::HashMap;
use std::thread;

use crate::common::*;

const CONNECTIONS: usize = 200;
const CHANNELS: [&str; 4] = ["alpha", "beta", "gamma", "delta"];
const PER_CHANNEL: usize = 50;
const READER_THREADS: usize = 4;

/// Channels of connection `i`: one each, and every fifth also the next one.
fn channels_of(i: usize) -> Vec<&'static str> {
    let mut v = vec![CHANNELS[i % 4]];
    if matches!(i % 5, 0) {
        v.push(CHANNELS[(i + 1) % 4]);
    }
    v
}

#[test]
fn two_cores_share_connections_and_deliver_everything_in_order() {
    let gw = Gateway::start(&["--cores", "2"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);

    let mut clients: Vec<(usize, WsClient)> = (0..CONNECTIONS)
        .map(|i| {
            let q: Vec<String> = channels_of(i)
                .iter()
                .map(|c| format!("channel={c}"))
                .collect();
            (i, gw.ws(&format!("/ws?{}", q.join("&"))))
        })
        .collect();

    // Open client connections now: the 200, the probe, and possibly the
    // /healthz request's own connection (the contract does not say whether a
    // request counts itself).
    let per_core = gw.connections_per_core();
    assert_eq!(
        per_core.len(),
        2,
        "--cores 2 must report two cores: {per_core:?}"
    );
    assert!(
        per_core.iter().all(|&n| n > 0),
        "both cores must hold connections (SO_REUSEPORT spread): {per_core:?}"
    );
    let sum: u64 = per_core.iter().sum();
    let websockets = (CONNECTIONS + probe.clients.len()) as u64;
    assert!(
        sum == websockets || sum == websockets + 1,
        "connections_per_core {per_core:?} sums to {sum}; {websockets} WebSockets are open \
         (plus, perhaps, the /healthz request itself)"
    );

    // Interleaved: alpha 0, beta 0, gamma 0, delta 0, alpha 1, ...
    let mut published: Vec<(String, Vec<u8>)> = Vec::new();
    for k in 0..PER_CHANNEL {
        for c in CHANNELS {
            let payload = format!("{c}:{k}").into_bytes();
            publisher.publish(c, &payload);
            published.push((c.to_string(), payload));
        }
    }

    // Read the sockets with a few threads, each owning a share of them.
    let mut shares: Vec<Vec<(usize, WsClient)>> = (0..READER_THREADS).map(|_| Vec::new()).collect();
    for (n, c) in clients.drain(..).enumerate() {
        shares[n % READER_THREADS].push(c);
    }
    let handles: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let published = published.clone();
            thread::spawn(move || {
                let mut results = Vec::new();
                for (i, mut ws) in share {
                    let mine = channels_of(i);
                    let want: Vec<(String, Vec<u8>)> = published
                        .iter()
                        .filter(|(c, _)| mine.contains(&c.as_str()))
                        .cloned()
                        .collect();
                    let got = ws.deliveries(want.len());
                    let ctx = format!("connection {i} on {mine:?}");
                    assert!(got.iter().all(|d| !d.gap), "{ctx}: unexpected gap notice");
                    assert_strictly_increasing(&ids(&got), &ctx);
                    let got_content = content(&got);
                    if got_content != want {
                        let first_bad = got_content.iter().zip(&want).position(|(a, b)| a != b);
                        panic!(
                            "{ctx}: wrong messages; first difference at index {first_bad:?}: \
                             got {:?}, want {:?}",
                            first_bad.map(|k| &got[k]),
                            first_bad.map(|k| String::from_utf8_lossy(&want[k].1).into_owned())
                        );
                    }
                    results.push((i, ws, got));
                }
                results
            })
        })
        .collect();

    let mut all = Vec::new();
    for h in handles {
        all.extend(
            h.join()
                .expect("reader thread failed (see its panic above)"),
        );
    }
    assert_eq!(all.len(), CONNECTIONS);

    // One message, one id, on every connection.
    let mut id_of: HashMap<Vec<u8>, u64> = HashMap::new();
    for (i, _, got) in &all {
        for d in got {
            let id = d.id.unwrap();
            let prev = *id_of.entry(d.payload.clone()).or_insert(id);
            assert_eq!(
                prev,
                id,
                "connection {i}: {:?} has id {id}, elsewhere {prev}",
                d.text()
            );
        }
    }
    assert_eq!(id_of.len(), CHANNELS.len() * PER_CHANNEL);

    // None extra: a sentinel on each channel must be the next thing each
    // connection sees (nothing was left queued behind the expected ones).
    for c in CHANNELS {
        publisher.publish(c, format!("{c}:end").as_bytes());
    }
    for (i, ws, _) in &mut all {
        let d = ws.next_delivery();
        let mine = channels_of(*i);
        // The first sentinel published on one of its channels.
        let first = CHANNELS.iter().find(|c| mine.contains(c)).unwrap();
        assert_eq!(
            d.text(),
            format!("{first}:end"),
            "connection {i} on {mine:?}: after the expected messages, got {d:?}"
        );
    }
    drop(probe);
}
