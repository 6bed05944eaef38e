//! Fan-out across transports: one publish reaches WebSocket, SSE and
//! long-poll subscribers of exactly that channel, and nobody else.

use crate::common::*;

/// What the test publishes on `sports`: (payload, SSE event name).
fn sports_messages() -> Vec<(Vec<u8>, Option<&'static str>)> {
    vec![
        (b"goal!".to_vec(), None),
        // Multi-line: SSE must show it as several data: lines.
        (b"first line\nsecond line\nthird line".to_vec(), None),
        // Not UTF-8 (and holding a newline byte): WebSocket binary frame,
        // SSE/long-poll base64.
        (vec![0xff, 0x00, 0xfe, 0x80, 0x0a, 0x01, 0xc3], None),
        // Publisher-given event name (third ZeroMQ frame).
        (br#"{"home":1,"away":0}"#.to_vec(), Some("score")),
    ]
}

fn check_sports(got: &[Delivery], transport: &str) {
    let want = sports_messages();
    assert_eq!(got.len(), want.len(), "{transport}: {got:?}");
    for (i, (d, (payload, event))) in got.iter().zip(want.iter()).enumerate() {
        assert!(!d.gap, "{transport} #{i}: unexpected gap notice {d:?}");
        assert_eq!(d.channel, "sports", "{transport} #{i}: {d:?}");
        assert_eq!(
            &d.payload, payload,
            "{transport} #{i}: payload differs: {d:?}"
        );
        assert_eq!(
            d.event.as_deref(),
            *event,
            "{transport} #{i}: event differs: {d:?}"
        );
        let is_binary = std::str::from_utf8(payload).is_err();
        assert_eq!(
            d.binary, is_binary,
            "{transport} #{i}: binary payloads must be binary frames (WS) / base64 (SSE, long-poll), \
             text ones not: {d:?}"
        );
    }
    assert_strictly_increasing(&ids(got), transport);
}

#[test]
fn one_publish_reaches_every_transport_and_only_exact_subscribers() {
    let gw = Gateway::start(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    // Long-polls carry this cursor, so what they get does not depend on when
    // the gateway registered them: everything on their channel after it.
    let since = probe.last_id;

    // Subscribers of `sports`, one per transport, plus one WebSocket on two
    // channels.
    let mut ws = gw.ws("/ws?channel=sports");
    let mut ws_multi = gw.ws("/ws?channel=sports&channel=other");
    let mut sse = gw.sse("/events?channel=sports", None);
    let mut lp = gw.http();

    // Subscribers of a prefix of it, of a longer name, and of another channel.
    let mut ws_prefix = gw.ws("/ws?channel=sport");
    let mut ws_longer = gw.ws("/ws?channel=sports2");
    let mut sse_prefix = gw.sse("/events?channel=sport", None);
    let mut sse_other = gw.sse("/events?channel=other", None);
    let mut lp_longer = gw.http();
    let mut lp_other = gw.http();

    for (payload, event) in sports_messages() {
        match event {
            Some(e) => publisher.publish_event("sports", &payload, e),
            None => publisher.publish("sports", &payload),
        }
    }

    let got_ws = ws.deliveries(4);
    check_sports(&got_ws, "WebSocket");
    let sports_ids = ids(&got_ws);
    assert!(
        sports_ids[0] > since,
        "ids must grow gateway-wide: probe {since}, sports {sports_ids:?}"
    );

    let got_multi = ws_multi.deliveries(4);
    check_sports(&got_multi, "WebSocket on sports+other");
    assert_eq!(
        ids(&got_multi),
        sports_ids,
        "one message, one id, on every connection"
    );

    // SSE: check the raw event shape of the multi-line and binary ones too.
    let raw: Vec<SseEvent> = (0..4).map(|_| sse.next_event()).collect();
    let got_sse: Vec<Delivery> = raw
        .iter()
        .map(|e| sse_event_to_delivery(e, "sports"))
        .collect();
    check_sports(&got_sse, "SSE");
    assert_eq!(ids(&got_sse), sports_ids, "SSE ids equal WebSocket ids");
    assert_eq!(
        &raw[1].data[1..],
        &["first line", "second line", "third line"],
        "multi-line payload must be one data: line per payload line: {:?}",
        raw[1]
    );
    assert_eq!(raw[1].event, None, "{:?}", raw[1]);
    assert_eq!(
        raw[2].data[1],
        base64_encode(&sports_messages()[2].0),
        "binary payload as standard base64: {:?}",
        raw[2]
    );
    assert_eq!(raw[3].event.as_deref(), Some("score"), "{:?}", raw[3]);

    let (got_lp, cursor) = longpoll_collect(&mut lp, &["sports"], since, 4);
    check_sports(&got_lp, "long-poll");
    assert_eq!(
        ids(&got_lp),
        sports_ids,
        "long-poll ids equal WebSocket ids"
    );
    assert_eq!(cursor, sports_ids[3]);

    // Now prove the others got nothing: publish a sentinel on each of their
    // own channels. Publishes are ordered, so had a sports message leaked to
    // them it would arrive before the sentinel.
    publisher.publish("sport", b"sentinel sport");
    publisher.publish("sports2", b"sentinel sports2");
    publisher.publish("other", b"sentinel other");

    let expect_sentinel = |d: &Delivery, chan: &str, who: &str| {
        assert!(!d.gap, "{who}: {d:?}");
        assert_eq!(
            d.channel, chan,
            "{who}: first delivery is not its sentinel: {d:?}"
        );
        assert_eq!(d.text(), format!("sentinel {chan}"), "{who}: {d:?}");
        assert!(
            d.id.unwrap() > sports_ids[3],
            "{who}: sentinel id must follow: {d:?}"
        );
    };
    expect_sentinel(&ws_prefix.next_delivery(), "sport", "WebSocket on `sport`");
    expect_sentinel(
        &ws_longer.next_delivery(),
        "sports2",
        "WebSocket on `sports2`",
    );
    expect_sentinel(&sse_prefix.next_delivery(), "sport", "SSE on `sport`");
    expect_sentinel(&sse_other.next_delivery(), "other", "SSE on `other`");
    // The two-channel client tells the channels apart.
    expect_sentinel(
        &ws_multi.next_delivery(),
        "other",
        "WebSocket on sports+other",
    );

    for (conn, chan) in [(&mut lp_longer, "sports2"), (&mut lp_other, "other")] {
        let r = longpoll(conn, &[chan], Some(since));
        assert!(r.gaps.is_empty(), "long-poll on {chan}: {}", r.body);
        assert_eq!(
            r.messages.len(),
            1,
            "long-poll on {chan} must hold only its sentinel: {}",
            r.body
        );
        expect_sentinel(&r.messages[0], chan, &format!("long-poll on `{chan}`"));
        assert_eq!(r.cursor, r.messages[0].id.unwrap(), "{}", r.body);
    }

    drop(probe);
}

#[test]
fn longpoll_without_messages_times_out_empty_and_keeps_the_connection() {
    let gw = Gateway::start(&["--poll-timeout-ms", "300"]);
    // A cursor this gateway has issued (ids need not start at 0, and a cursor
    // from before the gateway's first id may rightly be reported as a gap).
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let since = probe.last_id;

    let mut conn = gw.http();
    let r = longpoll(&mut conn, &["quiet"], Some(since));
    assert!(r.messages.is_empty(), "{}", r.body);
    assert!(r.gaps.is_empty(), "{}", r.body);
    assert_eq!(
        r.cursor, since,
        "on timeout the cursor is the one given: {}",
        r.body
    );
    assert_eq!(
        r.body["cursor"],
        since.to_string(),
        "cursor is a string: {}",
        r.body
    );

    // Keep-alive: the same connection serves another request.
    let again = conn.get("/healthz", &[]);
    assert_eq!(again.status, 200, "{}", again.describe());
}
