//! Multi-host fan-out: two publishers and two gateways through one
//! `gateway forwarder`. The gateways subscribe on demand, so each receives
//! exactly the channels its clients subscribed to and nothing else, and
//! lets a channel go once its last client has left.
//!
//! The publishers use XPUB sockets (a PUB that also reads subscriptions):
//! the subscriptions they see are the test's signal that a gateway's
//! interest has travelled through the forwarder to them.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::common::*;

/// A publisher that sees the subscriptions sent to it.
struct XPublisher {
    sock: zmq::Socket,
    _ctx: zmq::Context,
    name: &'static str,
    /// Subscription changes seen: (true = subscribe, topic).
    seen: Vec<(bool, String)>,
}

impl XPublisher {
    fn connect(endpoint: &str, name: &'static str) -> XPublisher {
        let ctx = zmq::Context::new();
        let sock = ctx.socket(zmq::XPUB).unwrap();
        sock.set_linger(0).unwrap();
        sock.set_rcvtimeo(200).unwrap();
        sock.connect(endpoint).unwrap();
        XPublisher {
            sock,
            _ctx: ctx,
            name,
            seen: Vec::new(),
        }
    }

    /// Reads subscription messages until `(subscribe, topic)` is among
    /// them (at most 20 s).
    fn wait_for(&mut self, subscribe: bool, topic: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.seen.iter().any(|(s, t)| *s == subscribe && t == topic) {
            assert!(
                Instant::now() < deadline,
                "{}: no {} of {topic:?}; seen {:?}",
                self.name,
                if subscribe {
                    "subscription"
                } else {
                    "unsubscription"
                },
                self.seen
            );
            match self.sock.recv_bytes(0) {
                Ok(m) if !m.is_empty() => self
                    .seen
                    .push((m[0] == 1, String::from_utf8_lossy(&m[1..]).into_owned())),
                Ok(_) | Err(zmq::Error::EAGAIN) => {}
                Err(e) => panic!("{}: {e}", self.name),
            }
        }
    }

    fn publish(&self, channel: &str, payload: &str) {
        self.sock
            .send_multipart([channel.as_bytes(), payload.as_bytes()], 0)
            .unwrap();
    }
}

const CHANNELS: [&str; 4] = ["both", "a.only", "b.only", "nobody"];
const MESSAGES_PER_CHANNEL: usize = 3;

/// Reads `client`'s deliveries until each of `channels` has brought the
/// end marker of both publishers; returns what came before them, by
/// channel. Per publisher and channel, order is kept end to end.
fn collect(client: &mut Client, channels: &[&str]) -> HashMap<String, Vec<String>> {
    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    let mut ends: HashSet<(String, String)> = HashSet::new();
    while ends.len() < channels.len() * 2 {
        let d = client.next();
        let text = d.text();
        if let Some(publisher) = text.strip_suffix("-end") {
            assert!(
                ends.insert((d.channel.clone(), publisher.to_string())),
                "end twice: {text} on {}",
                d.channel
            );
        } else {
            got.entry(d.channel.clone()).or_default().push(text);
        }
    }
    got
}

enum Client {
    Ws(WsClient),
    Sse(SseClient),
}

impl Client {
    fn next(&mut self) -> Delivery {
        match self {
            Client::Ws(c) => c.next_delivery(),
            Client::Sse(c) => c.next_delivery(),
        }
    }
}

fn expected(channels: &[&str]) -> HashMap<String, Vec<String>> {
    channels
        .iter()
        .map(|ch| {
            let mut all = Vec::new();
            for p in ["p1", "p2"] {
                for i in 0..MESSAGES_PER_CHANNEL {
                    all.push(format!("{p}-{ch}-{i}"));
                }
            }
            (ch.to_string(), all)
        })
        .collect()
}

/// Orders each channel's messages by publisher (their interleaving across
/// publishers depends on the forwarder's fair queueing), keeping each
/// publisher's order.
fn by_publisher(mut got: HashMap<String, Vec<String>>) -> HashMap<String, Vec<String>> {
    for v in got.values_mut() {
        v.sort_by_key(|m| m.starts_with("p2"));
    }
    got
}

#[test]
fn two_gateways_and_two_publishers_through_one_forwarder_each_get_only_their_channels() {
    let fwd = Forwarder::start();
    let mut p1 = XPublisher::connect(&fwd.publishers, "p1");
    let mut p2 = XPublisher::connect(&fwd.publishers, "p2");
    let (admin_a, admin_b) = (free_addr(), free_addr());
    let a = Gateway::start_behind(&fwd, admin_a, &[]);
    let b = Gateway::start_behind(&fwd, admin_b, &[]);

    // Gateway A's clients want `both` and `a.only`, B's `both` and `b.only`;
    // nobody wants `nobody`.
    let mut a_ws = Client::Ws(a.ws("/ws?channel=both&channel=a.only"));
    let mut a_sse = Client::Sse(a.sse("/events?channel=a.only", None));
    let mut b_ws = Client::Ws(b.ws("/ws?channel=both&channel=b.only"));
    let mut b_sse = Client::Sse(b.sse("/events?channel=b.only", None));
    // Opened last on each gateway: once a publisher sees its subscription,
    // every earlier one of that gateway has passed the forwarder (one
    // ordered queue from the cores to ingest, one ZeroMQ connection on).
    let _sync_a = a.ws("/ws?channel=sync.a");
    let _sync_b = b.ws("/ws?channel=sync.b");
    for p in [&mut p1, &mut p2] {
        p.wait_for(true, "sync.a");
        p.wait_for(true, "sync.b");
        assert!(
            !p.seen.iter().any(|(_, t)| t.is_empty() || t == "nobody"),
            "no gateway subscribes to everything, nor to what nobody wants: {:?}",
            p.seen
        );
    }

    for (p, name) in [(&p1, "p1"), (&p2, "p2")] {
        for ch in CHANNELS {
            for i in 0..MESSAGES_PER_CHANNEL {
                p.publish(ch, &format!("{name}-{ch}-{i}"));
            }
        }
    }
    for (p, name) in [(&p1, "p1"), (&p2, "p2")] {
        for ch in CHANNELS {
            p.publish(ch, &format!("{name}-end"));
        }
    }

    assert_eq!(
        by_publisher(collect(&mut a_ws, &["both", "a.only"])),
        expected(&["both", "a.only"])
    );
    assert_eq!(
        by_publisher(collect(&mut a_sse, &["a.only"])),
        expected(&["a.only"])
    );
    assert_eq!(
        by_publisher(collect(&mut b_ws, &["both", "b.only"])),
        expected(&["both", "b.only"])
    );
    assert_eq!(
        by_publisher(collect(&mut b_sse, &["b.only"])),
        expected(&["b.only"])
    );

    // Each gateway received its two channels from both publishers, data
    // and end markers, and not one other publication (every one it got is
    // delivered above, so none is still on its way).
    let per_gateway = (2 * 2 * (MESSAGES_PER_CHANNEL + 1)) as f64;
    for (admin, name) in [(admin_a, "A"), (admin_b, "B")] {
        assert_eq!(
            metric(admin, "gateway_messages_in_total"),
            per_gateway,
            "publications gateway {name} received"
        );
        assert_eq!(
            metric(
                admin,
                "gateway_messages_dropped_total{reason=\"not_subscribed\"}"
            ),
            0.0,
            "gateway {name} received nothing it did not subscribe to"
        );
        // Its clients' channels and its sync channel.
        assert_eq!(metric(admin, "gateway_zmq_subscriptions"), 3.0);
    }
    // The forwarder's own view: both sides' peers, and every publication
    // that reached a gateway passed through it once (the XPUB side sends
    // each to every gateway subscribed, counted once).
    assert_eq!(
        metric(fwd.admin, "gateway_forwarder_peers{side=\"publishers\"}"),
        2.0
    );
    assert_eq!(
        metric(fwd.admin, "gateway_forwarder_peers{side=\"gateways\"}"),
        2.0
    );
    let through = metric(
        fwd.admin,
        "gateway_forwarder_publications_total{direction=\"out\"}",
    );
    assert!(
        through >= per_gateway,
        "{through} publications forwarded, {per_gateway} received by each gateway"
    );
    let ready = HttpConn::connect(fwd.admin).get("/readyz", &[]);
    assert_eq!(ready.status, 200, "{}", ready.describe());

    // A's clients leave: with no linger, A lets its channels go, and the
    // publishers hear of the one nobody else wants.
    drop((a_ws, a_sse, _sync_a));
    p1.wait_for(false, "a.only");
    // Back: a new client of a.only is subscribed again, end to end.
    let mut again = a.ws("/ws?channel=a.only");
    p1.seen.clear();
    p1.wait_for(true, "a.only");
    p1.publish("a.only", "p1-again");
    assert_eq!(again.next_delivery().text(), "p1-again");
}
