//! The `Origin` allowlist and CORS: a page of a listed origin opens
//! WebSocket, SSE and long-poll streams and can read them (CORS headers); a
//! page of another origin is refused before any upgrade, and its preflight
//! gets no `Access-Control-*` header.

use crate::common::*;

const APP: &str = "https://app.example";
const ADMIN: &str = "https://admin.example:8443";
const EVIL: &str = "https://evil.example";

fn start(extra: &[&str]) -> Gateway {
    let mut args = vec!["--allowed-origin", APP, "--allowed-origin", ADMIN];
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

fn upgrade(gw: &Gateway, path: &str, extra: &str) -> HttpResponse {
    upgrade_with(gw.listen, path, extra).0
}

fn no_cors_headers(resp: &HttpResponse, context: &str) {
    assert!(
        !resp
            .head
            .headers
            .iter()
            .any(|(n, _)| n.starts_with("access-control-")),
        "{context}: {}",
        resp.describe()
    );
}

fn assert_origin_refused(resp: &HttpResponse, context: &str) {
    assert_eq!(resp.status, 403, "{context}: {}", resp.describe());
    assert_eq!(resp.body, b"origin not allowed\n", "{context}");
    no_cors_headers(resp, context);
}

#[test]
fn a_websocket_from_an_origin_off_the_list_is_refused_before_the_upgrade() {
    let gw = start(&[]);
    let refused = upgrade(&gw, "/ws?channel=news", &format!("Origin: {EVIL}\r\n"));
    assert_origin_refused(&refused, "evil origin");
    // A look-alike is another origin.
    let refused = upgrade(
        &gw,
        "/ws?channel=news",
        "Origin: https://app.example.evil.example\r\n",
    );
    assert_origin_refused(&refused, "look-alike origin");
    // Listed origins (case as browsers send it), and a client without
    // Origin (no browser), are upgraded.
    for extra in [
        format!("Origin: {APP}\r\n"),
        format!("Origin: {ADMIN}\r\n"),
        String::new(),
    ] {
        let ok = upgrade(&gw, "/ws?channel=news", &extra);
        assert_eq!(ok.status, 101, "{extra:?}: {}", ok.describe());
    }
    let log = gw.log();
    assert!(
        log.contains("origin not allowed") && log.contains(EVIL),
        "the refusal is logged with its origin:\n{log}"
    );
}

#[test]
fn a_cross_origin_event_source_is_allowed_by_cors_and_another_refused() {
    let gw = start(&["--cors-allow-credentials"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    wait_for_subscription(&publisher, &[&gw]);

    // The browser's preflight (an EventSource polyfill sending
    // Authorization), then the stream itself.
    let preflight = format!(
        "OPTIONS /events?channel=news HTTP/1.1\r\nHost: gateway\r\nOrigin: {APP}\r\n\
         Access-Control-Request-Method: GET\r\n\
         Access-Control-Request-Headers: authorization, last-event-id\r\n\r\n"
    );
    let (resp, mut conn) = raw_request(gw.listen, preflight.as_bytes());
    assert_eq!(resp.status, 204, "{}", resp.describe());
    assert_eq!(resp.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        resp.header("access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(resp.header("access-control-allow-methods"), Some("GET"));
    let allowed_headers = resp
        .header("access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed_headers.contains("authorization") && allowed_headers.contains("last-event-id"),
        "{allowed_headers}"
    );
    assert_eq!(resp.header("vary"), Some("Origin"));
    // Keep-alive: the same connection serves the next request.
    assert_eq!(conn.get("/healthz", &[]).status, 200);

    let mut sse = SseClient::connect_with(gw.listen, "/events?channel=news", &[("Origin", APP)]);
    assert_eq!(sse.head.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        sse.head.header("access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(sse.head.header("vary"), Some("Origin"));
    // The probe saw the ingest subscription; this stream is registered once
    // its head arrived.
    publisher.publish("news", b"hello");
    assert_eq!(sse.next_delivery().text(), "hello");

    // Another origin: its preflight and its stream are refused, with no
    // Access-Control-* header for the browser to act on.
    let preflight = preflight.replace(APP, EVIL);
    let (resp, mut conn) = raw_request(gw.listen, preflight.as_bytes());
    assert_origin_refused(&resp, "preflight from another origin");
    conn.expect_eof("a refused preflight closes the connection");
    let mut conn = gw.http();
    let resp = conn.get(
        "/events?channel=news",
        &[("Accept", "text/event-stream"), ("Origin", EVIL)],
    );
    assert_origin_refused(&resp, "event stream from another origin");
}

#[test]
fn long_poll_answers_carry_the_cors_headers_of_their_own_origin() {
    let gw = start(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);
    let since = probe.last_id.to_string();
    let path = format!("/events?channel=feed&since={since}");

    // Two pages of two origins wait on the same channel; one message
    // answers both, each with its own Access-Control-Allow-Origin.
    let mut app = gw.http();
    let mut admin = gw.http();
    let mut same_site = gw.http();
    for (conn, origin) in [
        (&mut app, Some(APP)),
        (&mut admin, Some(ADMIN)),
        (&mut same_site, None),
    ] {
        let origin_line = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        conn.set_read_timeout(std::time::Duration::from_secs(30));
        conn.send(format!("GET {path} HTTP/1.1\r\nHost: gateway\r\n{origin_line}\r\n").as_bytes());
    }
    publisher.publish("feed", b"tick");
    for (conn, origin) in [
        (&mut app, Some(APP)),
        (&mut admin, Some(ADMIN)),
        (&mut same_site, None),
    ] {
        let resp = conn.read_response();
        assert_eq!(resp.status, 200, "{}", resp.describe());
        assert_eq!(
            resp.header("access-control-allow-origin"),
            origin,
            "{}",
            resp.describe()
        );
        assert_eq!(
            resp.header("access-control-allow-credentials"),
            None,
            "credentials are off by default"
        );
        let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(body["messages"][0]["data"], "tick", "{body}");
        // A keep-alive answer: the next poll (a resume from history) on
        // the same connection carries the headers too.
        let origin_line = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        conn.send(format!("GET {path} HTTP/1.1\r\nHost: gateway\r\n{origin_line}\r\n").as_bytes());
        let again = conn.read_response();
        assert_eq!(again.status, 200, "{}", again.describe());
        assert_eq!(again.header("access-control-allow-origin"), origin);
    }

    let mut evil = gw.http();
    let resp = evil.get(&path, &[("Origin", EVIL)]);
    assert_origin_refused(&resp, "long-poll from another origin");
}

#[test]
fn without_an_allowlist_any_origin_passes_and_no_cors_header_is_sent() {
    let gw = Gateway::start(&[]);
    let ok = upgrade(&gw, "/ws?channel=news", &format!("Origin: {EVIL}\r\n"));
    assert_eq!(ok.status, 101, "{}", ok.describe());
    let sse = SseClient::connect_with(gw.listen, "/events?channel=news", &[("Origin", EVIL)]);
    assert_eq!(sse.head.header("access-control-allow-origin"), None);
    let preflight = format!(
        "OPTIONS /events?channel=news HTTP/1.1\r\nHost: gateway\r\nOrigin: {EVIL}\r\n\
         Access-Control-Request-Method: GET\r\n\r\n"
    );
    let (resp, _conn) = raw_request(gw.listen, preflight.as_bytes());
    assert_origin_refused(&resp, "preflight without an allowlist");
}

#[test]
fn a_subdomain_pattern_allows_each_subdomain_with_its_own_origin_echoed() {
    let gw = Gateway::start(&["--allowed-origin", "https://*.example.com"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let probe = wait_for_subscription(&publisher, &[&gw]);

    // The domain itself and look-alikes are not subdomains.
    for refused in [
        "https://example.com",
        "https://evil-example.com",
        "http://app.example.com",
    ] {
        let resp = upgrade(&gw, "/ws?channel=news", &format!("Origin: {refused}\r\n"));
        assert_origin_refused(&resp, refused);
    }
    let ok = upgrade(
        &gw,
        "/ws?channel=news",
        "Origin: https://chat.example.com\r\n",
    );
    assert_eq!(ok.status, 101, "{}", ok.describe());

    let sse = SseClient::connect_with(
        gw.listen,
        "/events?channel=news",
        &[("Origin", "https://app.example.com")],
    );
    assert_eq!(
        sse.head.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(sse.head.header("vary"), Some("Origin"));

    // Two held long-polls from two subdomains, answered by one message.
    let path = format!("/events?channel=feed&since={}", probe.last_id);
    let origins = ["https://a.example.com", "https://b.c.example.com"];
    let mut conns: Vec<HttpConn> = origins.iter().map(|_| gw.http()).collect();
    for (conn, origin) in conns.iter_mut().zip(origins) {
        conn.set_read_timeout(std::time::Duration::from_secs(30));
        conn.send(
            format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nOrigin: {origin}\r\n\r\n").as_bytes(),
        );
    }
    publisher.publish("feed", b"tick");
    for (conn, origin) in conns.iter_mut().zip(origins) {
        let resp = conn.read_response();
        assert_eq!(resp.status, 200, "{}", resp.describe());
        assert_eq!(resp.header("access-control-allow-origin"), Some(origin));
        let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(body["messages"][0]["data"], "tick", "{body}");
    }

    let preflight = "OPTIONS /events?channel=news HTTP/1.1\r\nHost: gateway\r\n\
                     Origin: https://app.example.com\r\nAccess-Control-Request-Method: GET\r\n\r\n";
    let (resp, _conn) = raw_request(gw.listen, preflight.as_bytes());
    assert_eq!(resp.status, 204, "{}", resp.describe());
    assert_eq!(
        resp.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
}
