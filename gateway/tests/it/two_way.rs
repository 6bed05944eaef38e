//! Two-way traffic: clients on the `gateway.v1` subprotocol send through
//! the gateway to hub workers (a ZeroMQ PULL socket here), which answer by
//! publishing to a channel, to one connection (`!address`) or to one user
//! (`#sub`); presence events; who may send and how fast; backpressure
//! when the hubs stop reading.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use testkit::two_way::{Frame, Hub, TwoWayClient, Upstream};
use tungstenite::Message;

use crate::common::*;

const SECRET: &str = "two-way-tests-hs256-secret-32-bytes-or-more";

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token for `sub`, reading `channels` and sending on `send`,
/// with `extra` claims, valid for `ttl_s`.
fn token(sub: &str, channels: &[&str], send: &[&str], extra: Value, ttl_s: u64) -> String {
    let mut claims =
        json!({"sub": sub, "exp": now_s() + ttl_s, "channels": channels, "send": send});
    if let (Value::Object(c), Value::Object(e)) = (&mut claims, extra) {
        c.extend(e);
    }
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("hs".into());
    encode(
        &header,
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A gateway with auth on and an upstream socket bound on a free port,
/// plus `extra` flags.
fn gateway(extra: &[&str]) -> Gateway {
    let secret = format!("hs={SECRET}");
    let mut args = vec![
        "--auth",
        "--auth-hs256-secret",
        &secret,
        "--upstream-bind",
        "tcp://127.0.0.1:*",
    ];
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

/// Publishes `probe` to `to` until `client` receives one: the publisher's
/// subscription has arrived (ZeroMQ's slow joiner). Later probes may
/// still come: [`next_real`] skips them.
fn join(publisher: &Publisher, to: &str, client: &mut TwoWayClient) {
    let deadline = Instant::now() + PROBE_BUDGET;
    loop {
        assert!(
            Instant::now() < deadline,
            "{to}: no probe within {PROBE_BUDGET:?}"
        );
        publisher.publish(to, b"probe");
        if let Some(f) = client.try_next_frame(PROBE_INTERVAL) {
            assert_eq!(f.message().1, "probe", "{to}: {f:?}");
            return;
        }
    }
}

/// The next frame that is not a probe.
fn next_real(client: &mut TwoWayClient) -> Frame {
    loop {
        let f = client.next_frame();
        if !matches!(&f, Frame::Message { payload, .. } if payload == b"probe") {
            return f;
        }
    }
}

#[test]
fn two_websocket_clients_chat_through_a_hub_that_republishes_to_the_room() {
    let gw = gateway(&["--upstream-claim", "name"]);
    let hub = gw.hub();
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let alice_token = token(
        "alice",
        &["room.*"],
        &["room.*"],
        json!({"name": "Alice"}),
        3600,
    );
    let bob_token = token(
        "bob",
        &["room.*"],
        &["room.*"],
        json!({"name": "Bob"}),
        3600,
    );
    let mut alice = gw.two_way("/ws?channel=room.1", Some(&alice_token));
    let mut bob = gw.two_way("/ws?channel=room.1", Some(&bob_token));
    assert_ne!(alice.address, bob.address);
    join(&publisher, &format!("!{}", alice.address), &mut alice);

    for (from, sub, name, line) in [
        (0, "alice", "Alice", "hi bob"),
        (1, "bob", "Bob", "hi alice"),
    ] {
        let sender = if from == 0 { &mut alice } else { &mut bob };
        let address = sender.address.clone();
        sender.send("room.1", Some("r1"), line);
        let (ack, _) = sender.next_control();
        assert_eq!(ack, json!({"type": "ack", "ref": "r1"}));
        // The hub gets the line with who sent it, untouched.
        let m = hub.next_of("message");
        assert_eq!(
            (m.address.as_str(), m.channel.as_str(), m.text()),
            (address.as_str(), "room.1", line.to_string())
        );
        assert_eq!(
            m.meta,
            json!({"transport": "websocket", "sub": sub, "claims": {"name": name}, "binary": false})
        );
        // It republishes to the room, naming the sender: both see it.
        publisher.publish(
            &m.channel,
            format!("{}: {}", m.meta["sub"].as_str().unwrap(), m.text()).as_bytes(),
        );
        for client in [&mut alice, &mut bob] {
            let (channel, text) = next_real(client).message();
            assert_eq!(
                (channel.as_str(), text),
                ("room.1", format!("{sub}: {line}"))
            );
        }
    }
}

#[test]
fn a_plain_websocket_still_only_listens() {
    let gw = gateway(&[]);
    let hub = gw.hub();
    let t = token("erin", &["news"], &["news"], json!({}), 3600);
    // No subprotocol offered: no welcome, and what it sends goes nowhere.
    let mut plain = gw.ws(&format!("/ws?channel=news&token={t}"));
    plain
        .ws
        .send(Message::Text("{\"channel\":\"news\"}\nfrom plain".into()))
        .unwrap();
    let mut two_way = gw.two_way("/ws?channel=news", Some(&t));
    two_way.send("news", None, "from two-way");
    assert_eq!(hub.next_of("message").text(), "from two-way");
    assert!(hub.next_within(Duration::from_millis(300)).is_none());
}

#[test]
fn sending_where_the_token_does_not_allow_or_over_a_limit_gets_an_error_naming_it() {
    let admin = free_addr().to_string();
    let gw = gateway(&[
        "--send-messages-per-s",
        "2",
        "--send-bytes-per-s",
        "1000",
        "--admin-listen",
        &admin,
    ]);
    let admin: SocketAddr = admin.parse().unwrap();
    let hub = gw.hub();
    let t = token("carol", &["news"], &["chat.*"], json!({}), 3600);
    let mut c = gw.two_way("/ws?channel=news", Some(&t));

    // Readable is not sendable.
    c.send("news", Some("1"), "x");
    assert_eq!(
        c.next_control().0,
        json!({"type": "error", "ref": "1", "reason": "channel not allowed", "channel": "news"})
    );
    // Larger than a second's bytes: never passes.
    c.send("chat.a", Some("2"), &"x".repeat(1001));
    assert_eq!(
        c.next_control().0,
        json!({"type": "error", "ref": "2", "reason": "rate limit: bytes per second", "channel": "chat.a"})
    );
    // A burst over the message rate: each message acked or refused, in
    // order, and only the acked ones reach the hub.
    for i in 0..20 {
        c.send("chat.a", Some(&format!("m{i}")), &format!("burst {i}"));
    }
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..20 {
        let (frame, _) = c.next_control();
        assert_eq!(frame["ref"], format!("m{i}"), "{frame}");
        match frame["type"].as_str() {
            Some("ack") => acked.push(format!("burst {i}")),
            Some("error") => {
                assert_eq!(
                    frame["reason"], "rate limit: messages per second",
                    "{frame}"
                );
                refused += 1;
            }
            _ => panic!("{frame}"),
        }
    }
    assert!(
        refused > 0 && !acked.is_empty(),
        "acked {acked:?}, refused {refused}"
    );
    for want in &acked {
        assert_eq!(&hub.next_of("message").text(), want);
    }
    // A malformed message is refused, and the connection goes on.
    c.send_raw(Message::Text("not json\npayload".into()));
    assert_eq!(
        c.next_control().0,
        json!({"type": "error", "reason": "bad meta"})
    );
    // Control messages need the read grant.
    c.control(&json!({"type": "subscribe", "channels": ["secret"], "ref": 9}));
    assert_eq!(
        c.next_control().0,
        json!({"type": "error", "ref": 9, "reason": "channel not allowed", "channel": "secret"})
    );
    // Counted (refusals are counted as they happen).
    let refusals = |reason: &str| {
        metric(
            admin,
            &format!("gateway_upstream_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(refusals("channel_not_allowed"), 2.0);
    assert_eq!(refusals("rate_bytes"), 1.0);
    assert_eq!(refusals("rate_messages"), refused as f64);
    assert_eq!(refusals("bad_message"), 1.0);
}

#[test]
fn control_messages_subscribe_with_a_cursor_and_unsubscribe() {
    let gw = gateway(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let t = token("frank", &["a", "b"], &[], json!({}), 3600);
    let mut c = gw.two_way("/ws?channel=a", Some(&t));
    join(&publisher, "a", &mut c);
    publisher.publish("b", b"b1");
    publisher.publish("a", b"a-marker");
    assert_eq!(next_real(&mut c).message().1, "a-marker");
    // Subscribing to b from the start of its history replays b1.
    c.control(&json!({"type": "subscribe", "channels": ["b"], "since": "0", "ref": "s"}));
    let (ack, before) = c.next_control();
    assert!(
        before.iter().all(|f| f.message().1 == "probe"),
        "{before:?}"
    );
    assert_eq!(ack, json!({"type": "ack", "ref": "s"}));
    // The gap (this gateway started after 0), then the history.
    let gap = next_real(&mut c);
    assert!(
        matches!(&gap, Frame::Message { meta, .. } if meta["gap"] == true),
        "{gap:?}"
    );
    assert_eq!(next_real(&mut c).message(), ("b".into(), "b1".into()));
    publisher.publish("b", b"b2");
    assert_eq!(next_real(&mut c).message(), ("b".into(), "b2".into()));
    c.control(&json!({"type": "unsubscribe", "channels": ["b"], "ref": "u"}));
    assert_eq!(c.next_control().0, json!({"type": "ack", "ref": "u"}));
    publisher.publish("b", b"b3");
    publisher.publish("a", b"a2");
    assert_eq!(
        next_real(&mut c).message(),
        ("a".into(), "a2".into()),
        "b3 not delivered"
    );
}

/// A gateway behind `fwd` in demand mode, with auth, its upstream socket
/// and its admin listener on `admin`.
fn gateway_behind(fwd: &Forwarder, admin: SocketAddr) -> Gateway {
    let secret = format!("hs={SECRET}");
    let extra = [
        "--auth",
        "--auth-hs256-secret",
        &secret,
        "--upstream-bind",
        "tcp://127.0.0.1:*",
    ];
    Gateway::start_behind(fwd, admin, &extra)
}

#[test]
fn a_reply_to_one_connection_and_a_message_to_one_user_reach_exactly_those_across_gateways() {
    let fwd = Forwarder::start();
    let (admin_a, admin_b) = (free_addr(), free_addr());
    let gw_a = gateway_behind(&fwd, admin_a);
    let gw_b = gateway_behind(&fwd, admin_b);
    let publisher = Publisher::connect(&fwd.publishers);
    let tok = |sub: &str| token(sub, &["lobby"], &[], json!({}), 3600);
    let mut alice_a = gw_a.two_way("/ws?channel=lobby", Some(&tok("alice")));
    let mut alice_b = gw_b.two_way("/ws?channel=lobby", Some(&tok("alice")));
    let mut carol_a = gw_a.two_way("/ws?channel=lobby", Some(&tok("carol")));
    let mut bob_b = gw_b.two_way("/ws?channel=lobby", Some(&tok("bob")));
    // Every subscription this test relies on has reached the publisher.
    join(&publisher, &format!("!{}", alice_a.address), &mut alice_a);
    join(&publisher, &format!("!{}", bob_b.address), &mut bob_b);
    for (c, sub) in [
        (&mut alice_a, "alice"),
        (&mut alice_b, "alice"),
        (&mut carol_a, "carol"),
        (&mut bob_b, "bob"),
    ] {
        join(&publisher, &format!("#{sub}"), c);
    }

    let dropped = |admin, reason: &str| {
        metric(
            admin,
            &format!("gateway_messages_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    let before = [admin_a, admin_b].map(|a| (dropped(a, "not_here"), dropped(a, "not_subscribed")));
    let to_alice_a = format!("!{}", alice_a.address);
    publisher.publish(&to_alice_a, b"just you");
    publisher.publish("#alice", b"every alice");
    publisher.publish("#carol", b"for carol");
    publisher.publish("#bob", b"for bob");

    let frame = next_real(&mut alice_a);
    assert_eq!(frame.message(), (to_alice_a.clone(), "just you".into()));
    assert!(
        matches!(&frame, Frame::Message { meta, .. } if meta.get("id").is_none()),
        "a message to one connection has no id: {frame:?}"
    );
    // Each user channel message carries an id, like any channel's.
    for (c, want) in [
        (&mut alice_a, ("#alice", "every alice")),
        (&mut alice_b, ("#alice", "every alice")),
        (&mut carol_a, ("#carol", "for carol")),
        (&mut bob_b, ("#bob", "for bob")),
    ] {
        let frame = next_real(c);
        assert_eq!(
            frame.message(),
            (want.0.to_string(), want.1.to_string()),
            "{}",
            c.address
        );
        assert!(matches!(&frame, Frame::Message { meta, .. } if meta["id"].is_string()));
    }
    // Neither gateway received what was for the other's connections and
    // users: the forwarder sent each only what it subscribed to.
    let after = [admin_a, admin_b].map(|a| (dropped(a, "not_here"), dropped(a, "not_subscribed")));
    assert_eq!(
        before, after,
        "dropped (not_here, not_subscribed) on A and B"
    );
}

/// Reads presence events until `n` have come for `address`.
fn presence_of(hub: &Hub, seen: &mut Vec<Upstream>, address: &str, n: usize) -> Vec<Upstream> {
    while seen.iter().filter(|m| m.address == address).count() < n {
        seen.push(hub.next());
    }
    seen.iter()
        .filter(|m| m.address == address)
        .cloned()
        .collect()
}

fn kinds(events: &[Upstream]) -> Vec<(String, String, Option<String>)> {
    events
        .iter()
        .map(|m| {
            (
                m.kind.clone(),
                m.channel.clone(),
                m.meta
                    .get("reason")
                    .and_then(|r| r.as_str())
                    .map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn presence_events_arrive_in_order_with_their_reasons() {
    let gw = gateway(&[
        "--upstream-presence",
        "--ws-message-bytes-max",
        "1024",
        "--auth-leeway-s",
        "0",
        "--drain-window-ms",
        "0",
    ]);
    let hub = gw.hub();
    let mut seen = Vec::new();
    let t = |sub: &str, ttl| token(sub, &["a", "b", "c"], &["a"], json!({}), ttl);
    let own = |kind: &str, channel: &str, reason: Option<&str>| {
        (
            kind.to_string(),
            channel.to_string(),
            reason.map(str::to_string),
        )
    };

    // Connect, subscribe, control messages, close.
    let mut dave = gw.two_way("/ws?channel=a", Some(&t("dave", 3600)));
    dave.control(&json!({"type": "subscribe", "channels": ["b"], "ref": 1}));
    dave.next_control();
    dave.control(&json!({"type": "unsubscribe", "channels": ["a"], "ref": 2}));
    dave.next_control();
    dave.ws.close(None).unwrap();
    while dave.ws.read().is_ok() {}
    let events = presence_of(&hub, &mut seen, &dave.address, 5);
    assert_eq!(
        kinds(&events),
        [
            own("connect", "", None),
            own("subscribe", "a", None),
            own("subscribe", "b", None),
            own("unsubscribe", "a", None),
            own("disconnect", "", Some("client closed")),
        ]
    );
    assert!(events
        .iter()
        .all(|m| m.meta["sub"] == "dave" && m.meta["transport"] == "websocket"));
    assert!(events[4].meta.get("reconnect").is_none());

    // Broken rule: a message over the size limit (1009).
    let mut big = gw.two_way("/ws?channel=c", Some(&t("erin", 3600)));
    big.send_raw(Message::Binary(vec![0; 2000]));
    while big.ws.read().is_ok() {}
    let events = presence_of(&hub, &mut seen, &big.address, 3);
    assert_eq!(
        kinds(&events)[2],
        own("disconnect", "", Some("protocol error"))
    );

    // A token that runs out.
    let mut brief = gw.two_way("/ws?channel=c", Some(&t("gail", 3)));
    let events = presence_of(&hub, &mut seen, &brief.address, 3);
    assert_eq!(
        kinds(&events)[2],
        own("disconnect", "", Some("token expired"))
    );
    while brief.ws.read().is_ok() {}

    // An SSE stream learns its address, and is in presence too; the
    // drain says the client will be back.
    let sse_token = t("hank", 3600);
    let mut sse = gw.sse(&format!("/events?channel=c&token={sse_token}"), None);
    let welcome = sse.next_event();
    assert_eq!(welcome.event.as_deref(), Some("welcome"), "{welcome:?}");
    let data: Value = serde_json::from_str(&welcome.data.join("\n")).unwrap();
    let sse_address = data["address"].as_str().unwrap().to_string();
    let events = presence_of(&hub, &mut seen, &sse_address, 2);
    assert_eq!(
        kinds(&events),
        [own("connect", "", None), own("subscribe", "c", None)]
    );
    assert_eq!(events[0].meta, json!({"transport": "sse", "sub": "hank"}));
    let ws = gw.two_way("/ws?channel=c", Some(&t("ivan", 3600)));
    presence_of(&hub, &mut seen, &ws.address, 2);
    gw.signal(libc::SIGTERM);
    for address in [&sse_address, &ws.address] {
        let events = presence_of(&hub, &mut seen, address, 3);
        assert_eq!(kinds(&events)[2], own("disconnect", "", Some("drain")));
        assert_eq!(events[2].meta["reconnect"], true, "{:?}", events[2]);
    }
}

#[test]
fn hubs_stopped_for_5_s_while_50_clients_send_lose_nothing_and_hold_up_no_delivery() {
    const CLIENTS: usize = 50;
    const MESSAGES: usize = 40;
    const PAYLOAD_BYTES: usize = 16 * 1024;
    let admin = free_addr();
    let admin_flag = admin.to_string();
    let gw = Gateway::start(&[
        "--upstream-bind",
        "tcp://127.0.0.1:*",
        "--upstream-hwm-messages",
        "10",
        "--send-bytes-per-s",
        "100000000",
        "--send-messages-per-s",
        "1000",
        "--admin-listen",
        &admin_flag,
    ]);
    let hub = gw.hub();
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let mut listener = gw.ws("/ws?channel=news");

    // The hub reads nothing while every client sends everything (each
    // from its own thread: a client the gateway stops reading blocks).
    let done = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let mut c = gw.two_way("/ws?channel=up", None);
            let done = done.clone();
            std::thread::spawn(move || {
                for i in 0..MESSAGES {
                    let mut payload = format!("{n}:{i}:").into_bytes();
                    payload.resize(PAYLOAD_BYTES, b'.');
                    let meta = format!("{{\"channel\":\"up\",\"ref\":\"{i}\"}}\n");
                    let mut bytes = meta.into_bytes();
                    bytes.extend_from_slice(&payload);
                    c.send_raw(Message::Binary(bytes));
                }
                done.fetch_add(1, Ordering::Relaxed);
                // Every message acknowledged, in order.
                for i in 0..MESSAGES {
                    let (ack, _) = c.next_control();
                    assert_eq!(
                        ack,
                        json!({"type": "ack", "ref": i.to_string()}),
                        "client {n}"
                    );
                }
                c.address.clone()
            })
        })
        .collect();
    // Meanwhile, deliveries go on.
    let stalled = Instant::now();
    for k in 0..100 {
        publisher.publish("news", format!("news {k}").as_bytes());
    }
    for k in 0..100 {
        assert_eq!(listener.next_delivery().text(), format!("news {k}"));
    }
    let upstream = || metric(admin, "gateway_upstream_messages_total{kind=\"message\"}");
    // The hubs are stopped for 5 s: that is the scenario, not a wait for
    // something.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(stalled.elapsed()));
    let handed_over = upstream();
    assert!(
        handed_over < (CLIENTS * MESSAGES) as f64,
        "with the hub stopped, only what its pipe holds left the gateway: {handed_over}"
    );

    // The hub returns: everything once, in order per client.
    let mut next_seq: HashMap<String, usize> = HashMap::new();
    for _ in 0..CLIENTS * MESSAGES {
        let m = hub.next_of("message");
        let text = String::from_utf8_lossy(&m.payload[..16]).into_owned();
        let mut parts = text.split(':');
        let (_n, i) = (
            parts.next().unwrap(),
            parts.next().unwrap().parse::<usize>().unwrap(),
        );
        let want = next_seq.entry(m.address.clone()).or_insert(0);
        assert_eq!(i, *want, "{}: in order, once", m.address);
        *want += 1;
        assert_eq!(m.meta["binary"], true);
        assert_eq!(m.payload.len(), PAYLOAD_BYTES);
    }
    let addresses: Vec<String> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    for a in &addresses {
        assert_eq!(next_seq.get(a), Some(&MESSAGES), "{a}");
    }
    assert_eq!(done.load(Ordering::Relaxed), CLIENTS);
    assert!(
        hub.next_within(Duration::from_millis(200)).is_none(),
        "nothing twice"
    );
    assert!(metric(admin, "gateway_upstream_blocked_seconds_total") > 0.0);
    drop(probe);
}

#[test]
fn an_sse_and_a_long_poll_client_take_part_through_post() {
    let origin = "https://app.example";
    let gw = gateway(&["--allowed-origin", origin, "--upstream-claim", "name"]);
    let hub = gw.hub();
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let sam = token("sam", &["room"], &["room"], json!({"name": "Sam"}), 3600);
    let lena = token("lena", &["room"], &["room"], json!({}), 3600);

    // The SSE client learns its stream's address…
    let mut sse = gw.sse(&format!("/events?channel=room&token={sam}"), None);
    let welcome = sse.next_event();
    assert_eq!(welcome.event.as_deref(), Some("welcome"));
    let welcome: Value = serde_json::from_str(&welcome.data.join("\n")).unwrap();
    let address = welcome["address"].as_str().unwrap().to_string();
    // … and names it in its POSTs, from a page of an allowed origin.
    let mut http = gw.http();
    let preflight = {
        let mut conn = gw.http();
        conn.send(
            format!(
                "OPTIONS /publish HTTP/1.1\r\nHost: g\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: POST\r\n\r\n"
            )
            .as_bytes(),
        );
        conn.read_response()
    };
    assert_eq!(preflight.status, 204, "{}", preflight.describe());
    assert_eq!(
        preflight.header("access-control-allow-methods"),
        Some("POST")
    );
    let auth = format!("Bearer {sam}");
    let headers = [("Authorization", auth.as_str()), ("Origin", origin)];
    let resp = http.post(
        &format!("/publish?channel=room&address={address}"),
        &headers,
        b"hello from sse",
    );
    assert_eq!(resp.status, 202, "{}", resp.describe());
    assert_eq!(resp.header("access-control-allow-origin"), Some(origin));
    let m = hub.next_of("message");
    assert_eq!(
        (m.address.as_str(), m.channel.as_str(), m.text().as_str()),
        (address.as_str(), "room", "hello from sse")
    );
    assert_eq!(
        m.meta,
        json!({"transport": "http", "sub": "sam", "claims": {"name": "Sam"}, "binary": false})
    );
    // The hub's reply to that address reaches the stream, without an id
    // (once the publisher has joined: probed through a WebSocket).
    let mut probe = gw.two_way("/ws?channel=room", Some(&sam));
    join(&publisher, &format!("!{}", probe.address), &mut probe);
    let to = format!("!{address}");
    publisher.publish(&to, b"reply");
    let reply = loop {
        let d = sse.next_event();
        if d.data.join("\n").ends_with("\nreply") {
            break d;
        }
    };
    assert_eq!(reply.id, None);
    let meta: Value = serde_json::from_str(&reply.data[0]).unwrap();
    assert_eq!(meta, json!({"channel": to}));

    // A long-poll client POSTs on the same keep-alive connection as it
    // polls; the hub answers it on its user channel, which its polls read.
    let lena_auth = format!("Bearer {lena}");
    let mut lp = gw.http();
    let resp = lp.post(
        "/publish?channel=room",
        &[("Authorization", lena_auth.as_str())],
        &[0xff, 0x00],
    );
    assert_eq!(resp.status, 202, "{}", resp.describe());
    let m = hub.next_of("message");
    assert_eq!(m.meta["sub"], "lena");
    assert_eq!(m.meta["binary"], true);
    assert_eq!(m.payload, [0xff, 0x00]);
    publisher.publish("#lena", b"for lena");
    let resp = lp.get(
        "/events?channel=room&since=0",
        &[("Authorization", lena_auth.as_str())],
    );
    assert_eq!(resp.status, 200, "{}", resp.describe());
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    let poll = parse_longpoll_body(&body, "lena's poll");
    assert!(
        poll.messages
            .iter()
            .any(|d| d.channel == "#lena" && d.text() == "for lena"),
        "{body}"
    );
}

#[test]
fn a_post_is_refused_with_a_status_naming_the_rule() {
    let gw = gateway(&[
        "--send-bytes-per-s",
        "1000",
        "--ws-message-bytes-max",
        "4096",
    ]);
    let _hub = gw.hub();
    let t = token("olga", &["news"], &["chat"], json!({}), 3600);
    let auth = format!("Bearer {t}");
    let post =
        |path: &str, headers: &[(&str, &str)], body: &[u8]| gw.http().post(path, headers, body);
    let with_token = [("Authorization", auth.as_str())];
    let reason = |r: &HttpResponse| String::from_utf8_lossy(&r.body).trim_end().to_string();

    let r = post("/publish?channel=chat", &[], b"x");
    assert_eq!(
        (r.status, reason(&r)),
        (401, "missing token".into()),
        "{}",
        r.describe()
    );
    let r = post("/publish?channel=news", &with_token, b"x");
    assert_eq!((r.status, reason(&r)), (403, "channel not allowed".into()));
    let r = post("/publish?channel=chat", &with_token, &[b'x'; 1001]);
    assert_eq!(
        (r.status, reason(&r)),
        (429, "rate limit: bytes per second".into())
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    let r = post("/publish?channel=chat", &with_token, &[b'x'; 4097]);
    assert_eq!((r.status, reason(&r)), (413, "payload too large".into()));
    let r = gw.http().get("/publish?channel=chat", &[]);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST, OPTIONS"));

    // No hub is there: what the gateway's own ZeroMQ queues hold is
    // accepted (it goes to the first hub that connects), then a POST waits
    // for room and is answered 503 after the wait.
    let lonely = Gateway::start(&[
        "--upstream-connect",
        "tcp://127.0.0.1:9",
        "--publish-wait-ms",
        "300",
        "--send-messages-per-s",
        "1000000",
    ]);
    let mut conn = lonely.http();
    let mut accepted = 0;
    let r = loop {
        let r = conn.post("/publish?channel=chat", &[], b"x");
        if r.status != 202 || accepted == 1000 {
            break r;
        }
        accepted += 1;
    };
    assert_eq!(
        (r.status, reason(&r)),
        (503, "upstream busy".into()),
        "after {accepted}"
    );
    assert!((1..1000).contains(&accepted), "{accepted}");
    assert!(r.header("retry-after").is_some());
    // Without an upstream socket, clients cannot send.
    let r = Gateway::start(&[])
        .http()
        .post("/publish?channel=chat", &[], b"x");
    assert_eq!(
        (r.status, reason(&r)),
        (503, "upstream not configured".into())
    );
}

/// Opens a WebSocket that never reads again (from a socket with a small
/// receive buffer) and returns it with the address its `connect` event
/// names.
fn silent_websocket(gw: &Gateway, hub: &Hub, path: &str) -> (std::net::TcpStream, String) {
    let mut stream = tcp_connect(gw.listen, None, Some(16 * 1024));
    let (head, _) = send_upgrade(&mut stream, path);
    assert_eq!(head.status, 101, "{head:?}");
    let connect = hub.next_of("connect");
    (stream, connect.address)
}

/// The disconnect event of `address`, other events skipped.
fn disconnect_of(hub: &Hub, address: &str) -> Upstream {
    loop {
        let m = hub.next_of("disconnect");
        if m.address == address {
            return m;
        }
    }
}

#[test]
fn presence_names_a_dead_peer_and_a_slow_consumer() {
    // Pings every second, a second to answer: silent for two, it is dead.
    let gw = Gateway::start(&[
        "--upstream-bind",
        "tcp://127.0.0.1:*",
        "--upstream-presence",
        "--heartbeat-interval-ms",
        "1000",
        "--pong-timeout-ms",
        "1000",
    ]);
    let hub = gw.hub();
    let (_dead, address) = silent_websocket(&gw, &hub, "/ws?channel=quiet");
    let gone = disconnect_of(&hub, &address);
    assert_eq!(gone.meta["reason"], "dead peer", "{:?}", gone.meta);

    // More than its outbound queue may hold, and it does not read.
    let gw = Gateway::start(&[
        "--upstream-bind",
        "tcp://127.0.0.1:*",
        "--upstream-presence",
        "--outbound-queue-bytes-max",
        "100000",
    ]);
    let hub = gw.hub();
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    // The probe client's connect came first.
    hub.next_of("connect");
    let (_slow, address) = silent_websocket(&gw, &hub, "/ws?channel=bulk");
    // 16 MB: more than its queue and both kernels' buffers can hold.
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..1000 {
        publisher.publish("bulk", &chunk);
    }
    let gone = disconnect_of(&hub, &address);
    assert_eq!(gone.meta["reason"], "slow consumer", "{:?}", gone.meta);
    drop(probe);
}

/// A hub on a ROUTER socket (confirm mode): its upstream messages as
/// `(identity, seq, payload)`.
fn router_next(sock: &zmq::Socket, limit: Duration) -> Option<(Vec<u8>, [u8; 8], Vec<u8>)> {
    let mut items = [sock.as_poll_item(zmq::POLLIN)];
    if zmq::poll(&mut items, limit.as_millis() as i64).ok()? == 0 {
        return None;
    }
    let frames = sock.recv_multipart(0).ok()?;
    assert_eq!(
        frames.len(),
        7,
        "[identity, seq, kind, address, channel, meta, payload]"
    );
    let seq: [u8; 8] = frames[1][..].try_into().expect("an 8-byte seq");
    Some((frames[0].clone(), seq, frames[6].clone()))
}

#[test]
fn with_confirmations_what_a_killed_hub_had_not_confirmed_reaches_the_other() {
    let admin = free_addr();
    let admin_s = admin.to_string();
    let gw = Gateway::start(&[
        "--cores",
        "1",
        "--upstream-bind",
        "tcp://127.0.0.1:*",
        "--upstream-confirm-ms",
        "300",
        "--admin-listen",
        &admin_s,
    ]);
    let endpoint = gw.upstream.clone().expect("an upstream endpoint");
    let ctx = zmq::Context::new();
    let hub = |name: &str| {
        let s = ctx.socket(zmq::ROUTER).unwrap();
        s.set_linger(0).unwrap();
        s.connect(&endpoint)
            .unwrap_or_else(|e| panic!("hub {name}: {e}"));
        s
    };
    // A takes messages and never confirms them, then dies; B confirms.
    let a = hub("a");
    let b = hub("b");
    let deadline = Instant::now() + IO_TIMEOUT;
    while metric(admin, "gateway_upstream_peers") < 2.0 {
        assert!(Instant::now() < deadline, "the hubs did not connect");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut client = gw.two_way("/ws?channel=room", None);
    const N: usize = 40;
    for k in 0..N {
        client.send("room", Some(&format!("r{k}")), &format!("m{k}"));
    }
    // Every one accepted: acknowledged by the gateway.
    let mut acked = 0;
    while acked < N {
        let (control, _) = client.next_control();
        if control["type"] == "ack" {
            acked += 1;
        }
    }
    let mut taken_by_a = 0;
    while router_next(&a, Duration::from_millis(200)).is_some() {
        taken_by_a += 1;
    }
    assert!(taken_by_a > 0, "round robin gave hub A its share");
    drop(a);
    let mut at_b: HashSet<Vec<u8>> = HashSet::new();
    let mut copies = 0;
    while at_b.len() < N {
        let (identity, seq, payload) = router_next(&b, IO_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "hub B has {} of {N} after A died holding {taken_by_a} unconfirmed",
                at_b.len()
            )
        });
        b.send_multipart([identity, seq.to_vec()], 0).unwrap();
        copies += 1;
        at_b.insert(payload);
    }
    let want: HashSet<Vec<u8>> = (0..N).map(|k| format!("m{k}").into_bytes()).collect();
    assert_eq!(at_b, want, "every accepted message reached the hub left");
    assert!(copies >= N);
    assert!(
        metric(admin, "gateway_upstream_resent_total") >= taken_by_a as f64,
        "what A held was sent again"
    );
    // Confirmed: nothing left waiting (the gauge follows the relay's loop).
    let deadline = Instant::now() + IO_TIMEOUT;
    while metric(admin, "gateway_upstream_unconfirmed") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "confirmed messages still waiting"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_channel_added_with_its_own_cursor_is_not_held_back_by_the_connections_first_one() {
    let gw = gateway(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let t = token("gina", &["a", "c", "p"], &[], json!({}), 3600);
    let mut witness = gw.two_way("/ws?channel=p", Some(&t));
    join(&publisher, "p", &mut witness);
    // Channel a is numbered by its publisher far above channel c: the
    // connection's cursor (1000, for a) is not a position on c.
    let mut c = gw.two_way("/ws?channel=a&since=1000", Some(&t));
    c.control(&json!({"type": "subscribe", "channels": ["c"], "since": "5", "ref": "s"}));
    assert_eq!(c.next_control().0, json!({"type": "ack", "ref": "s"}));
    publisher.publish_with_id("c", b"c6", 6);
    publisher.publish_with_id("a", b"a1001", 1001);
    let mut got = Vec::new();
    while got.len() < 2 {
        let f = next_real(&mut c);
        // The gaps of both cursors (this gateway never saw either channel).
        if matches!(&f, Frame::Message { meta, .. } if meta["gap"] == true) {
            continue;
        }
        got.push(f.message());
    }
    assert_eq!(
        got,
        [("c".into(), "c6".into()), ("a".into(), "a1001".into())],
        "c's 6 is after c's cursor, whatever the URL's cursor was"
    );
}
