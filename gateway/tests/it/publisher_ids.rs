//! Publisher-assigned ids: a publication whose meta frame carries `"id"` has
//! that id on every transport and every gateway, so two gateways fed by the
//! same publisher give the same ids and a client resumes on either with the
//! id it got from the other. An id that does not advance its channel (a
//! duplicate, a reordered publication) is dropped, never delivered out of
//! order.

use crate::common::*;

fn texts(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(Delivery::text).collect()
}

fn names(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|k| format!("m{k}")).collect()
}

/// The publisher's ids for m1, m2, ...: not the gateway's (which are at or
/// above 2^56 and carry the process's tag), and not consecutive.
fn id_of(k: u64) -> u64 {
    1_000 + 10 * k
}

#[test]
fn two_gateways_give_the_publishers_ids_and_a_client_resumes_on_the_other() {
    let publisher = Publisher::bind();
    let gw_a = Gateway::start_connected_to(&publisher);
    let gw_b = Gateway::start_connected_to(&publisher);
    let probe = wait_for_subscription(&publisher, &[&gw_a, &gw_b]);

    let mut ws_a = gw_a.ws("/ws?channel=orders");
    let mut sse_a = gw_a.sse("/events?channel=orders", None);
    // B's witness stays connected throughout: it proves what reached B.
    let mut ws_b = gw_b.ws("/ws?channel=orders");

    for k in 1..=5 {
        publisher.publish_with_id("orders", format!("m{k}").as_bytes(), id_of(k));
    }
    let want: Vec<u64> = (1..=5).map(id_of).collect();
    let got_ws_a = ws_a.deliveries(5);
    let got_sse_a = sse_a.deliveries(5);
    let got_ws_b = ws_b.deliveries(5);
    for (who, got) in [
        ("WebSocket on A", &got_ws_a),
        ("SSE on A", &got_sse_a),
        ("WebSocket on B", &got_ws_b),
    ] {
        assert_eq!(texts(got), names(1..=5), "{who}: {got:?}");
        assert_eq!(ids(got), want, "{who}: the publisher's ids: {got:?}");
    }

    // The SSE client leaves A having seen m5 and misses m6..m8.
    let last_on_a = ids(&got_sse_a)[4].to_string();
    sse_a.disconnect();
    for k in 6..=8 {
        publisher.publish_with_id("orders", format!("m{k}").as_bytes(), id_of(k));
    }
    let missed = ws_b.deliveries(3);
    assert_eq!(texts(&missed), names(6..=8), "{missed:?}");
    assert_eq!(ids(&ws_a.deliveries(3)), ids(&missed), "A and B agree");

    // It resumes on B, the way EventSource would: exactly what it missed.
    let mut sse_b = gw_b.sse("/events?channel=orders", Some(&last_on_a));
    let resumed = sse_b.deliveries(3);
    assert!(resumed.iter().all(|d| !d.gap), "{resumed:?}");
    assert_eq!(texts(&resumed), names(6..=8), "{resumed:?}");
    assert_eq!(ids(&resumed), ids(&missed), "{resumed:?}");
    // WebSocket and long-poll resume on B from A's id the same way.
    let mut ws_since = gw_b.ws(&format!("/ws?channel=orders&since={last_on_a}"));
    assert_eq!(texts(&ws_since.deliveries(3)), names(6..=8));
    let mut lp = gw_b.http();
    let (got_lp, cursor) = longpoll_collect(&mut lp, &["orders"], id_of(5), 3);
    assert_eq!(texts(&got_lp), names(6..=8));
    assert_eq!(cursor, id_of(8));

    // Live continues right after the replay, with nothing in between.
    publisher.publish_with_id("orders", b"m9", id_of(9));
    for (who, d) in [
        ("SSE resumed on B", sse_b.next_delivery()),
        ("WebSocket resumed on B", ws_since.next_delivery()),
        ("WebSocket on B", ws_b.next_delivery()),
        ("WebSocket on A", ws_a.next_delivery()),
    ] {
        assert_eq!(
            (d.text(), d.id),
            ("m9".to_string(), Some(id_of(9))),
            "{who}: {d:?}"
        );
    }
    drop(probe);
}

#[test]
fn an_id_that_does_not_advance_its_channel_is_dropped_on_every_transport() {
    let admin = free_addr();
    let admin_s = admin.to_string();
    let gw = Gateway::start(&["--admin-listen", &admin_s]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let mut ws = gw.ws("/ws?channel=a&channel=b");
    let mut sse = gw.sse("/events?channel=a&channel=b", None);

    publisher.publish_with_id("a", b"a1", 50);
    publisher.publish_with_id("a", b"dup", 50); // a duplicate
    publisher.publish_with_id("a", b"old", 49); // reordered
    publisher.publish_meta("a", b"a2", r#"{"id":51}"#); // a JSON number works too
    publisher.publish_with_id("b", b"b1", 7); // another channel: its own sequence
    publisher.publish_with_id("a", b"bad", 0); // not an id
    publisher.publish_meta("a", b"bad", r#"{"id":"5x"}"#);
    publisher.publish("a", b"a3"); // no id: the gateway gives one
    publisher.publish_with_id("a", b"late", 52); // below the one just given
    publisher.publish_with_id("b", b"b2", 8);

    for (who, got) in [("WebSocket", ws.deliveries(5)), ("SSE", sse.deliveries(5))] {
        assert_eq!(
            texts(&got),
            ["a1", "a2", "b1", "a3", "b2"],
            "{who}: duplicates, reordered and bad ids dropped: {got:?}"
        );
        let got_ids = ids(&got);
        assert_eq!(&got_ids[..3], [50, 51, 7], "{who}: {got:?}");
        assert_eq!(got_ids[4], 8, "{who}: {got:?}");
        assert!(
            got_ids[3] > probe.last_id,
            "{who}: a gateway id continues the gateway's sequence: {got:?}"
        );
    }
    // Nothing else was queued behind them.
    publisher.publish_with_id("b", b"end", 9);
    assert_eq!(ws.next_delivery().text(), "end");
    assert_eq!(sse.next_delivery().text(), "end");

    // A bad id is an error, logged; an id not after the channel's last is
    // the design of redundant forwarders (the second copy): counted as a
    // duplicate, not logged as an error.
    let log = gw.log();
    assert_eq!(
        log.matches("publication dropped").count(),
        2,
        "each bad id is logged:\n{log}"
    );
    assert!(log.contains("BadId"), "{log}");
    let dropped = |reason: &str| {
        metric(
            admin,
            &format!("gateway_messages_dropped_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(dropped("duplicate"), 3.0, "dup, old and late");
    assert_eq!(dropped("bad_id"), 2.0);
}

/// A long-poll on a channel that has had no message yet gets a cursor of
/// the gateway's own sequence; the channel's first message may then carry
/// a (much smaller) publisher id. That cursor must not make the gateway
/// skip the publisher's messages.
#[test]
fn a_cursor_handed_out_before_a_channels_first_message_does_not_skip_publisher_ids() {
    let gw = Gateway::start(&["--poll-timeout-ms", "1000"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);

    let mut lp = gw.http();
    let r = longpoll(&mut lp, &["quiet"], None);
    assert!(r.messages.is_empty() && r.gaps.is_empty(), "{}", r.body);
    let nothing_yet = r.cursor;

    // Waiting with it when the first message comes: delivered.
    let mut ws = gw.ws(&format!("/ws?channel=quiet&since={nothing_yet}"));
    publisher.publish_with_id("quiet", b"q1", 7);
    let d = ws.next_delivery();
    assert_eq!((d.text(), d.id), ("q1".to_string(), Some(7)), "{d:?}");

    // Coming back with it afterwards: the gateway cannot place it in the
    // publisher's sequence, so it says so and gives what it has.
    let r = longpoll(&mut lp, &["quiet"], Some(nothing_yet));
    assert_eq!(r.gaps, ["quiet"], "{}", r.body);
    assert_eq!(texts(&r.messages), ["q1"], "{}", r.body);
    assert_eq!(r.cursor, 7, "{}", r.body);

    // From there on, the publisher's ids.
    publisher.publish_with_id("quiet", b"q2", 8);
    let d = ws.next_delivery();
    assert_eq!((d.text(), d.id), ("q2".to_string(), Some(8)), "{d:?}");
    let r = longpoll(&mut lp, &["quiet"], Some(7));
    assert!(r.gaps.is_empty(), "{}", r.body);
    assert_eq!(texts(&r.messages), ["q2"], "{}", r.body);
    drop(probe);
}

/// Without publisher ids each gateway numbers messages itself, from its
/// start time, with its own tag: a client moving from a gateway started later
/// to one started earlier brings a cursor from the other's future. It is told of the gap,
/// gets the history, and then every live message (the cursor does not make
/// the gateway skip its own, smaller, ids).
#[test]
fn a_cursor_from_a_gateway_started_later_is_a_gap_then_everything() {
    let publisher = Publisher::bind();
    let older = Gateway::start_connected_to(&publisher);
    let newer = Gateway::start_connected_to(&publisher);
    let probe = wait_for_subscription(&publisher, &[&older, &newer]);
    let mut on_newer = newer.ws("/ws?channel=feed");
    let mut witness = older.ws("/ws?channel=feed");
    publisher.publish("feed", b"m1");
    let from_newer = on_newer.next_delivery().id.unwrap();
    let m1 = witness.next_delivery();
    assert!(
        from_newer > m1.id.unwrap(),
        "the newer gateway's ids are larger: {from_newer} vs {m1:?}"
    );

    let mut moved = older.ws(&format!("/ws?channel=feed&since={from_newer}"));
    let gap = moved.next_delivery();
    assert!(gap.gap && gap.channel == "feed", "{gap:?}");
    let replayed = moved.next_delivery();
    assert_eq!((replayed.text(), replayed.id), ("m1".to_string(), m1.id));
    publisher.publish("feed", b"m2");
    let m2 = witness.next_delivery();
    let d = moved.next_delivery();
    assert_eq!((d.text(), d.id), ("m2".to_string(), m2.id), "{d:?}");
    drop(probe);
}

/// One long-poll on `feed` at `gw` from `since`, publishing `next` once the
/// gateway holds the poll (or has answered it without waiting), so that the
/// message arrives while the poll waits.
fn poll_then_publish(
    gw: &Gateway,
    admin: std::net::SocketAddr,
    since: Option<u64>,
    publisher: &Publisher,
    next: u64,
) -> LongPoll {
    let mut conn = gw.http();
    let (tx, rx) = std::sync::mpsc::channel();
    let poller = std::thread::spawn(move || {
        let _ = tx.send(longpoll(&mut conn, &["feed"], since));
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let early = loop {
        match rx.recv_timeout(std::time::Duration::from_millis(20)) {
            Ok(answer) => break Some(answer),
            Err(_) if held_polls(admin) > 0 => break None,
            Err(_) => assert!(
                std::time::Instant::now() < deadline,
                "the poll from {since:?} was neither held nor answered"
            ),
        }
    };
    publisher.publish_with_id("feed", format!("m{next}").as_bytes(), id_of(next));
    let answer = early.unwrap_or_else(|| {
        rx.recv_timeout(LONGPOLL_IO_TIMEOUT)
            .expect("the held poll was answered")
    });
    poller.join().unwrap();
    answer
}

/// Behind a balancer that is not sticky, a long-poll client's polls land on
/// one gateway, then another, and one of them restarts: every message comes
/// exactly once and in order, and what the restarted gateway could not have
/// (published while it was down) is announced as a gap with the message
/// after it, whose id is the cursor that the other gateway can place.
#[test]
fn a_long_poll_alternating_between_gateways_across_a_restart_loses_nothing_silently() {
    let publisher = Publisher::bind();
    let start = |admin: std::net::SocketAddr| {
        let admin = admin.to_string();
        Gateway::start(&[
            "--zmq-bind",
            "",
            "--zmq-connect",
            publisher.endpoint.as_str(),
            "--admin-listen",
            &admin,
        ])
    };
    let (admin_a, admin_b) = (free_addr(), free_addr());
    let a = start(admin_a);
    let b = start(admin_b);
    let probe = wait_for_subscription(&publisher, &[&a, &b]);

    let mut answers = Vec::new();
    let r = poll_then_publish(&a, admin_a, None, &publisher, 1);
    answers.push(r);
    let cursor = answers.last().unwrap().cursor;
    answers.push(poll_then_publish(&b, admin_b, Some(cursor), &publisher, 2));

    // B restarts; m3 and m4 are published while it is down, so only A has
    // them.
    drop(b);
    drop(probe);
    publisher.publish_with_id("feed", b"m3", id_of(3));
    publisher.publish_with_id("feed", b"m4", id_of(4));
    let admin_b2 = free_addr();
    let b2 = start(admin_b2);
    let probe = wait_for_subscription(&publisher, &[&a, &b2]);

    // The client's next poll lands on the new B, which has never seen the
    // channel: the gap, then m5, with m5's id as the cursor.
    let cursor = answers.last().unwrap().cursor;
    let after_restart = poll_then_publish(&b2, admin_b2, Some(cursor), &publisher, 5);
    assert_eq!(
        after_restart.gaps,
        vec!["feed".to_string()],
        "{}",
        after_restart.body
    );
    assert_eq!(
        texts(&after_restart.messages),
        ["m5"],
        "{}",
        after_restart.body
    );
    assert_eq!(after_restart.cursor, id_of(5), "{}", after_restart.body);
    answers.push(after_restart);
    // Back and forth: A places B's cursor, and B A's.
    for (k, (gw, admin)) in [(6, (&a, admin_a)), (7, (&b2, admin_b2)), (8, (&a, admin_a))] {
        let cursor = answers.last().unwrap().cursor;
        answers.push(poll_then_publish(gw, admin, Some(cursor), &publisher, k));
    }

    // Every message once, in order; each one missing is behind an
    // announced gap.
    let mut last = 0;
    let mut got = Vec::new();
    for answer in &answers {
        let ids: Vec<u64> = answer.messages.iter().map(|m| m.id.unwrap()).collect();
        assert!(
            !ids.is_empty(),
            "an answer without messages: {}",
            answer.body
        );
        let missed = (1..=8)
            .filter(|&k| id_of(k) > last && id_of(k) < ids[0])
            .count();
        assert!(
            missed == 0 || answer.gaps == ["feed"],
            "{missed} messages skipped without a gap: {}",
            answer.body
        );
        assert!(
            missed > 0 || answer.gaps.is_empty(),
            "a gap where nothing was missed: {}",
            answer.body
        );
        assert_strictly_increasing(&ids, "one answer");
        assert!(ids[0] > last, "a duplicate or a step back: {}", answer.body);
        assert_eq!(answer.cursor, *ids.last().unwrap(), "{}", answer.body);
        last = *ids.last().unwrap();
        got.extend(texts(&answer.messages));
    }
    assert_eq!(got, ["m1", "m2", "m5", "m6", "m7", "m8"]);
    drop(probe);
}
