//! Resume from history: SSE `Last-Event-ID` / `since=`, WebSocket `since=`,
//! long-poll `since=`; and the explicit gap notice when the history no
//! longer reaches back to the cursor.

use crate::common::*;

fn payloads(ds: &[Delivery]) -> Vec<String> {
    ds.iter().map(Delivery::text).collect()
}

fn names(range: std::ops::RangeInclusive<usize>, prefix: &str) -> Vec<String> {
    range.map(|k| format!("{prefix}{k}")).collect()
}

#[test]
fn reconnecting_clients_get_exactly_what_they_missed_then_live() {
    let gw = Gateway::start(&["--cores", "2"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);

    // A second live subscriber that stays connected throughout: it proves
    // each message has reached the gateway.
    let mut witness = gw.ws("/ws?channel=scores");
    let mut sse = gw.sse("/events?channel=scores", None);

    for k in 1..=3 {
        publisher.publish("scores", format!("m{k}").as_bytes());
    }
    let first = sse.deliveries(3);
    assert_eq!(payloads(&first), names(1..=3, "m"), "{first:?}");
    assert!(first.iter().all(|d| d.channel == "scores"));
    let w1 = witness.deliveries(3);
    assert_eq!(ids(&w1), ids(&first), "witness and SSE see the same ids");
    let last_seen = ids(&first)[2];
    sse.disconnect();

    for k in 4..=6 {
        publisher.publish("scores", format!("m{k}").as_bytes());
    }
    let w2 = witness.deliveries(3);
    assert_eq!(payloads(&w2), names(4..=6, "m"), "{w2:?}");
    let missed_ids = ids(&w2);

    let check_missed = |got: &[Delivery], who: &str| {
        assert!(
            got.iter().all(|d| !d.gap),
            "{who}: unexpected gap notice: {got:?}"
        );
        assert!(got.iter().all(|d| d.channel == "scores"), "{who}: {got:?}");
        assert_eq!(
            payloads(got),
            names(4..=6, "m"),
            "{who}: must get exactly the missed ones: {got:?}"
        );
        assert_eq!(
            ids(got),
            missed_ids,
            "{who}: ids as first delivered: {got:?}"
        );
    };

    // SSE resume the way EventSource does it: the Last-Event-ID header.
    let last_str = last_seen.to_string();
    let mut sse_header = gw.sse("/events?channel=scores", Some(&last_str));
    check_missed(&sse_header.deliveries(3), "SSE with Last-Event-ID");
    // ... and with since= in the query.
    let mut sse_query = gw.sse(&format!("/events?channel=scores&since={last_seen}"), None);
    check_missed(&sse_query.deliveries(3), "SSE with since=");
    // WebSocket with since=.
    let mut ws_since = gw.ws(&format!("/ws?channel=scores&since={last_seen}"));
    check_missed(&ws_since.deliveries(3), "WebSocket with since=");
    // Long-poll with since=.
    let mut lp = gw.http();
    let (got_lp, cursor) = longpoll_collect(&mut lp, &["scores"], last_seen, 3);
    check_missed(&got_lp, "long-poll with since=");
    assert_eq!(cursor, missed_ids[2]);

    // Live ones continue, with nothing in between (so the resumes above
    // returned exactly three, no duplicates, nothing extra).
    publisher.publish("scores", b"m7");
    let m7 = witness.next_delivery();
    assert_eq!(m7.text(), "m7");
    for (who, d) in [
        ("SSE with Last-Event-ID", sse_header.next_delivery()),
        ("SSE with since=", sse_query.next_delivery()),
        ("WebSocket with since=", ws_since.next_delivery()),
    ] {
        assert_eq!(
            (d.text(), d.id),
            ("m7".to_string(), m7.id),
            "{who}: after the replay: {d:?}"
        );
    }
    let r = longpoll(&mut lp, &["scores"], Some(cursor));
    assert!(r.gaps.is_empty(), "{}", r.body);
    assert_eq!(
        payloads(&r.messages),
        ["m7"],
        "long-poll from the returned cursor: {}",
        r.body
    );
    assert_eq!(r.cursor, m7.id.unwrap(), "{}", r.body);

    drop(probe);
}

#[test]
fn resume_beyond_history_reports_a_gap_then_what_is_left() {
    // One core, so that "the witness has it" implies "the history has it"
    // whatever the gateway's history layout; the cross-core resume path is
    // covered by the test above.
    let gw = Gateway::start(&["--cores", "1", "--history-messages", "5"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let mut witness = gw.ws("/ws?channel=hist&channel=fresh");

    // h1, then two on another channel whose short history is still whole,
    // then h2..h20.
    publisher.publish("hist", b"h1");
    publisher.publish("fresh", b"f1");
    publisher.publish("fresh", b"f2");
    for k in 2..=20 {
        publisher.publish("hist", format!("h{k}").as_bytes());
    }
    let seen = witness.deliveries(22);
    let id_of = |p: &str| seen.iter().find(|d| d.text() == p).unwrap().id.unwrap();
    let id1 = id_of("h1");
    let last5: Vec<u64> = (16..=20).map(|k| id_of(&format!("h{k}"))).collect();

    let check_last5 = |got: &[Delivery], who: &str| {
        assert!(
            got.iter().all(|d| d.channel == "hist" && !d.gap),
            "{who}: {got:?}"
        );
        assert_eq!(
            payloads(got),
            names(16..=20, "h"),
            "{who}: the last 5 of the history: {got:?}"
        );
        assert_eq!(ids(got), last5, "{who}: {got:?}");
    };
    let check_gap = |d: &Delivery, who: &str| {
        assert!(
            d.gap,
            "{who}: first thing after resuming from {id1} must be the gap notice, got {d:?}"
        );
        assert_eq!(
            d.channel, "hist",
            "{who}: gap notice names the channel: {d:?}"
        );
        assert!(d.id.is_none(), "{who}: {d:?}");
    };

    // SSE with Last-Event-ID = the first id: gap, then h16..h20.
    let id1_str = id1.to_string();
    let mut sse = gw.sse("/events?channel=hist", Some(&id1_str));
    check_gap(&sse.next_delivery(), "SSE");
    check_last5(&sse.deliveries(5), "SSE");

    // WebSocket with since = the first id: gap frame, then h16..h20.
    let mut ws = gw.ws(&format!("/ws?channel=hist&since={id1}"));
    check_gap(&ws.next_delivery(), "WebSocket");
    check_last5(&ws.deliveries(5), "WebSocket");

    // Long-poll from the first id: gaps = ["hist"] and h16..h20.
    let mut lp = gw.http();
    let r = longpoll(&mut lp, &["hist"], Some(id1));
    assert_eq!(r.gaps, ["hist"], "{}", r.body);
    check_last5(&r.messages, "long-poll");
    assert_eq!(r.cursor, last5[4], "{}", r.body);

    // Two channels, only one of which lost messages: the gap names only it,
    // and the other's messages after the cursor are all there.
    let r = longpoll(&mut lp, &["hist", "fresh"], Some(id1));
    assert_eq!(r.gaps, ["hist"], "only `hist` lost messages: {}", r.body);
    let fresh: Vec<Delivery> = r
        .messages
        .iter()
        .filter(|d| d.channel == "fresh")
        .cloned()
        .collect();
    let hist: Vec<Delivery> = r
        .messages
        .iter()
        .filter(|d| d.channel == "hist")
        .cloned()
        .collect();
    assert_eq!(payloads(&fresh), ["f1", "f2"], "{}", r.body);
    check_last5(&hist, "long-poll on hist+fresh");
    assert_eq!(r.messages.len(), 7, "{}", r.body);
    assert_eq!(r.cursor, last5[4], "{}", r.body);

    // The gap is reported exactly when a message after the cursor was
    // evicted: from h15 the history lacks nothing... until h21 evicts h16.
    let r = longpoll(&mut lp, &["hist"], Some(id_of("h15")));
    assert!(
        r.gaps.is_empty(),
        "history still holds everything after h15: {}",
        r.body
    );
    check_last5(&r.messages, "long-poll since h15");

    publisher.publish("hist", b"h21");
    let h21 = witness.next_delivery();
    assert_eq!(h21.text(), "h21");
    // Live continues on the resumed streams, right after the replay.
    for (who, d) in [
        ("SSE", sse.next_delivery()),
        ("WebSocket", ws.next_delivery()),
    ] {
        assert_eq!(
            (d.text(), d.id),
            ("h21".to_string(), h21.id),
            "{who}: after the replay: {d:?}"
        );
    }

    let r = longpoll(&mut lp, &["hist"], Some(id_of("h15")));
    assert_eq!(r.gaps, ["hist"], "h16 has now been evicted: {}", r.body);
    assert_eq!(payloads(&r.messages), names(17..=21, "h"), "{}", r.body);
    let r = longpoll(&mut lp, &["hist"], Some(id_of("h16")));
    assert!(
        r.gaps.is_empty(),
        "nothing after h16 was evicted: {}",
        r.body
    );
    assert_eq!(payloads(&r.messages), names(17..=21, "h"), "{}", r.body);

    drop(probe);
}

/// A message is never silently skipped, not even across a gateway restart:
/// a cursor issued by a previous process cannot be covered by the new
/// process's history (what was published between that cursor and the
/// restart is gone), so resuming with it must report a gap on every
/// transport, whatever id scheme the gateway uses.
#[test]
fn resume_with_a_cursor_from_before_a_restart_reports_a_gap() {
    // The first run: the client sees n1, then misses n2.
    let (id_n1, id_n2) = {
        let gw = Gateway::start(&[]);
        let publisher = Publisher::connect(gw.zmq_endpoint());
        let _probe = wait_for_subscription(&publisher, &[&gw]);
        let mut witness = gw.ws("/ws?channel=news");
        publisher.publish("news", b"n1");
        publisher.publish("news", b"n2");
        let got = witness.deliveries(2);
        assert_eq!(payloads(&got), ["n1", "n2"]);
        (got[0].id.unwrap(), got[1].id.unwrap())
        // The gateway is killed here.
    };

    // The restarted gateway has seen traffic on the channel since.
    let gw = Gateway::start(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let mut witness = gw.ws("/ws?channel=news");
    publisher.publish("news", b"n3");
    let n3 = witness.next_delivery();
    assert_eq!(n3.text(), "n3");

    let ctx = format!(
        "resuming from n1 (id {id_n1}, issued by the previous process, which also published \
         n2 with id {id_n2}) on a restarted gateway whose first message n3 has id {:?}",
        n3.id
    );
    // Whatever follows the gap can only be n3.
    let check_rest = |rest: &[Delivery], who: &str| {
        assert!(
            rest.iter().all(|d| d.text() == "n3"),
            "{who}: {ctx}: {rest:?}"
        );
    };

    let mut lp = gw.http();
    let r = longpoll(&mut lp, &["news"], Some(id_n1));
    assert_eq!(
        r.gaps,
        ["news"],
        "long-poll, {ctx}: n2 was skipped without a gap: {}",
        r.body
    );
    check_rest(&r.messages, "long-poll");

    let id_n1_str = id_n1.to_string();
    let mut sse = gw.sse("/events?channel=news", Some(&id_n1_str));
    let first = sse.next_delivery();
    assert!(
        first.gap && first.channel == "news",
        "SSE, {ctx}: first event is {first:?}, not a gap"
    );

    let mut ws = gw.ws(&format!("/ws?channel=news&since={id_n1}"));
    let first = ws.next_delivery();
    assert!(
        first.gap && first.channel == "news",
        "WebSocket, {ctx}: first frame is {first:?}, not a gap"
    );

    drop(probe);
}
