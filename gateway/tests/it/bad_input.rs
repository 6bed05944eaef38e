//! Bad input is answered with an HTTP status, `Connection: close` and a short
//! text body; and the gateway goes on serving afterwards.

use tungstenite::Message;

use crate::common::*;

/// Sends `request` on a fresh connection and checks the error response: the
/// status, `Connection: close`, a non-empty body, the connection closed by
/// the gateway; then that a fresh `/healthz` still works. Returns the
/// response for further checks.
fn expect_error(gw: &Gateway, what: &str, request: &[u8], status: u16) -> HttpResponse {
    let (resp, mut conn) = raw_request(gw.listen, request);
    assert_eq!(
        resp.status,
        status,
        "{what}: want {status}, got {}",
        resp.describe()
    );
    let connection = resp.header("connection").unwrap_or("");
    assert!(
        connection.eq_ignore_ascii_case("close"),
        "{what}: error responses carry `Connection: close`, got {connection:?}: {}",
        resp.describe()
    );
    assert!(
        !resp.body.is_empty(),
        "{what}: a short text body is expected: {}",
        resp.describe()
    );
    conn.expect_eof(what);
    gw.healthz();
    resp
}

fn upgrade_request(version: Option<&str>, key: Option<&str>) -> Vec<u8> {
    let mut r = String::from(
        "GET /ws?channel=news HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    if let Some(k) = key {
        r.push_str(&format!("Sec-WebSocket-Key: {k}\r\n"));
    }
    if let Some(v) = version {
        r.push_str(&format!("Sec-WebSocket-Version: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// A WebSocket still opens and answers a ping.
fn websocket_still_works(gw: &Gateway, after: &str) {
    let mut ws = gw.ws("/ws?channel=news");
    ws.ws.send(Message::Ping(b"still there?".to_vec())).unwrap();
    loop {
        match ws.next_message() {
            Message::Pong(p) => {
                assert_eq!(p, b"still there?", "after {after}");
                break;
            }
            Message::Ping(_) => continue,
            other => panic!("after {after}: expected a pong, got {other:?}"),
        }
    }
}

#[test]
fn errors_are_answered_and_the_gateway_keeps_serving() {
    let gw = Gateway::start(&[]);
    gw.healthz();

    expect_error(
        &gw,
        "request line that is not HTTP",
        b"HELLO THERE\r\n\r\n",
        400,
    );
    expect_error(
        &gw,
        "header line without a colon",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nthis is not a header\r\n\r\n",
        400,
    );
    expect_error(
        &gw,
        "binary garbage",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        400,
    );
    websocket_still_works(&gw, "malformed heads");

    let resp = expect_error(
        &gw,
        "WebSocket version 8",
        &upgrade_request(Some("8"), Some("dGhlIHNhbXBsZSBub25jZQ==")),
        426,
    );
    assert_eq!(
        resp.header("sec-websocket-version"),
        Some("13"),
        "426 names the supported version: {}",
        resp.describe()
    );
    expect_error(
        &gw,
        "missing Sec-WebSocket-Key",
        &upgrade_request(Some("13"), None),
        400,
    );
    websocket_still_works(&gw, "bad upgrades");

    // One header that takes the head past 8 KiB (the URL stays short, so this
    // is the head limit, not the URL limit).
    let mut big = String::from("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ");
    big.push_str(&"a".repeat(9 * 1024));
    big.push_str("\r\n\r\n");
    expect_error(&gw, "head over 8 KiB", big.as_bytes(), 431);

    expect_error(
        &gw,
        "unknown path",
        b"GET /no/such/path HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        404,
    );
    expect_error(
        &gw,
        "POST",
        b"POST /events?channel=news HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
        405,
    );
    expect_error(
        &gw,
        "long-poll with a non-numeric since",
        b"GET /events?channel=news&since=abc HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        400,
    );
    websocket_still_works(&gw, "all the bad requests");
}

#[test]
fn refusals_are_logged_as_json_objects_with_their_fields() {
    let gw = Gateway::start(&["--log-format", "json"]);
    expect_error(
        &gw,
        "unknown path",
        b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        404,
    );
    let log = gw.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let refused = lines
        .iter()
        .find(|l| l["fields"]["message"] == "request refused")
        .unwrap_or_else(|| panic!("no refusal in\n{log}"));
    assert_eq!(refused["level"], "INFO");
    assert_eq!(refused["fields"]["status"], 404);
    assert_eq!(refused["fields"]["reason"], "not found");
    assert!(refused["fields"]["peer"]
        .as_str()
        .is_some_and(|p| p.starts_with("127.0.0.1:")));
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "gateway ready"));
}

#[test]
fn http_1_1_needs_one_host_and_absolute_targets_and_head_are_served() {
    let gw = Gateway::start(&[]);
    // RFC 9112 §3.2: no Host in HTTP/1.1, or two anywhere, is a 400.
    for (what, request) in [
        ("no Host", &b"GET /healthz HTTP/1.1\r\n\r\n"[..]),
        (
            "two Hosts",
            b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        ),
        (
            "a Host that is no host",
            b"GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n",
        ),
        (
            "an upgrade without Host",
            b"GET /ws?channel=news HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
        (
            "a long-poll without Host",
            b"GET /events?channel=news HTTP/1.1\r\n\r\n",
        ),
    ] {
        let resp = expect_error(&gw, what, request, 400);
        assert_eq!(resp.body, b"bad host\n", "{what}");
    }
    // HTTP/1.0 has no such rule.
    let (resp, _) = raw_request(gw.listen, b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(
        resp.status,
        200,
        "HTTP/1.0 without Host: {}",
        resp.describe()
    );

    // An absolute-form target is served by its path (RFC 9112 §3.2.2).
    let addr = gw.listen;
    let (resp, _) = raw_request(
        addr,
        format!("GET http://{addr}/healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    );
    assert_eq!(
        resp.status,
        200,
        "absolute-form /healthz: {}",
        resp.describe()
    );
    let (resp, _ws) = upgrade_with(addr, &format!("http://{addr}/ws?channel=news"), "");
    assert_eq!(
        resp.status,
        101,
        "absolute-form upgrade: {}",
        resp.describe()
    );

    // HEAD on the health checks: the GET's head, no body. Pipelined, so a
    // body where there should be none would be read as the next response.
    let mut conn = gw.http();
    conn.send(
        b"HEAD /healthz HTTP/1.1\r\nHost: gw\r\n\r\n\
          HEAD /readyz HTTP/1.1\r\nHost: gw\r\n\r\n\
          GET /readyz HTTP/1.1\r\nHost: gw\r\n\r\n",
    );
    for path in ["/healthz", "/readyz"] {
        let head = conn.read_head();
        assert_eq!(head.status, 200, "HEAD {path}: {head:?}");
        let length: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("HEAD {path}: no Content-Length: {head:?}"));
        assert!(length > 0, "HEAD {path} gives the GET's length: {head:?}");
    }
    let resp = conn.read_response();
    assert_eq!(resp.status, 200, "GET after the HEADs: {}", resp.describe());
    assert_eq!(resp.body, b"{\"status\":\"ready\"}\n");
    // HEAD elsewhere is still not served.
    expect_error(
        &gw,
        "HEAD on a stream",
        b"HEAD /events?channel=news HTTP/1.1\r\nHost: gw\r\n\r\n",
        405,
    );
}
