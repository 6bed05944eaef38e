//! Token authentication (`auth = true`): the real binary with a TOML file
//! holding an HS256 secret and an ES256 public key; tokens minted here with
//! jsonwebtoken and the private keys.

use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{Message, Role};
use tungstenite::WebSocket;

const HS_SECRET: &str = "0123456789abcdef0123456789abcdef";
const HS_SECRET_2: &str = "fedcba9876543210fedcba9876543210";
// The P-256 test pair of protocol/src/token.rs.
const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJ8CBH0sYjLsUCN63
wE0x+JkicWqD+WPA1R19ktzjQxihRANCAAS2x5LPyl1sz9y5stHrut+A8Dr5V7/Z
y+zI8j01bSNSBdMmHwZg2M9R2OlKURnWzw+Svl0x3E1K8xD8SiyFV1xI
-----END PRIVATE KEY-----
";
const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEtseSz8pdbM/cubLR67rfgPA6+Ve/
2cvsyPI9NW0jUgXTJh8GYNjPUdjpSlEZ1s8Pkr5dMdxNSvMQ/EoshVdcSA==
-----END PUBLIC KEY-----
";

/// A scratch directory for one test's configuration and key files.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("auth-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("es.pem"), EC_PUBLIC).unwrap();
    dir
}

/// The configuration file: the `hs` secret kid named `hs_kid`, and the
/// ES256 key `es` from `es_file`.
fn write_config(dir: &std::path::Path, hs_kid: &str, hs_secret: &str, es_file: &str) -> PathBuf {
    write_config_with(dir, hs_kid, hs_secret, es_file, "")
}

/// `write_config` with more top-level settings (`extra`, whole lines).
fn write_config_with(
    dir: &std::path::Path,
    hs_kid: &str,
    hs_secret: &str,
    es_file: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join("gateway.toml");
    let text = format!(
        "auth = true\nauth_leeway_s = 0\n{extra}\n\
         [[auth_keys]]\nkid = \"{hs_kid}\"\nalg = \"HS256\"\nsecret = \"{hs_secret}\"\n\n\
         [[auth_keys]]\nkid = \"es\"\nalg = \"ES256\"\nkey_file = \"{}\"\n",
        dir.join(es_file).display()
    );
    // Written whole, then renamed: a reload never sees half a file.
    let tmp = dir.join("gateway.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn start(name: &str) -> (Gateway, PathBuf) {
    let dir = scratch(name);
    let config = write_config(&dir, "hs", HS_SECRET, "es.pem");
    let gw = Gateway::start(&["--config", config.to_str().unwrap()]);
    (gw, dir)
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(channels: &[&str], exp: u64) -> Value {
    json!({ "sub": "test", "exp": exp, "channels": channels })
}

fn hs_token(kid: &str, secret: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_string());
    encode(
        &header,
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn es_token(claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("es".to_string());
    let key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
    encode(&header, claims, &key).unwrap()
}

/// An hour-long HS256 token for `channels`.
fn valid_hs(channels: &[&str]) -> String {
    hs_token("hs", HS_SECRET, &claims(channels, now_s() + 3600))
}

fn upgrade(gw: &Gateway, path: &str, extra: &str) -> (HttpResponse, TcpStream) {
    upgrade_with(gw.listen, path, extra)
}

fn assert_refused(resp: &HttpResponse, status: u16, reason: &str, context: &str) {
    assert_eq!(resp.status, status, "{context}: {}", resp.describe());
    assert_eq!(
        String::from_utf8_lossy(&resp.body),
        format!("{reason}\n"),
        "{context}"
    );
    if status == 401 {
        let www = resp
            .header("www-authenticate")
            .unwrap_or_else(|| panic!("{context}: no WWW-Authenticate: {}", resp.describe()));
        assert!(www.starts_with("Bearer"), "{context}: {www}");
    }
}

#[test]
fn valid_tokens_in_the_query_and_the_header_are_let_through() {
    let (gw, _dir) = start("valid");
    let publisher = Publisher::connect(gw.zmq_endpoint());
    // Query form (what a browser's WebSocket can do), HS256; it delivers.
    let token = valid_hs(&["news", PROBE_CHANNEL]);
    let probe = WsClient::connect(
        gw.listen,
        &format!("/ws?channel={PROBE_CHANNEL}&token={token}"),
    );
    let mut news = WsClient::connect(gw.listen, &format!("/ws?channel=news&token={token}"));
    wait_for_subscription_of(&publisher, vec![probe]);
    publisher.publish("news", b"hello");
    assert_eq!(news.next_delivery().text(), "hello");

    // Header form, ES256, with a prefix pattern.
    let es = es_token(&claims(&["sport.*"], now_s() + 3600));
    let (resp, _ws) = upgrade(
        &gw,
        "/ws?channel=sport.uk",
        &format!("Authorization: Bearer {es}\r\n"),
    );
    assert_eq!(resp.status, 101, "{}", resp.describe());

    // SSE, header and query forms.
    for (path, extra) in [
        (
            "/events?channel=news".to_string(),
            vec![("Authorization", format!("Bearer {token}"))],
        ),
        (
            format!("/events?channel=news&token={es}&channel=sport.x"),
            vec![],
        ),
    ] {
        let mut conn = gw.http();
        let mut headers = vec![("Accept", "text/event-stream".to_string())];
        headers.extend(extra);
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\n");
        for (n, v) in &headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        conn.send(req.as_bytes());
        let head = conn.read_head();
        if path.contains("sport.x") {
            // The ES256 token allows sport.* only.
            assert_eq!(head.status, 403, "{path}: {head:?}");
        } else {
            assert_eq!(head.status, 200, "{path}: {head:?}");
        }
    }
}

#[test]
fn missing_expired_forged_and_unknown_tokens_get_401_and_other_channels_403() {
    let (gw, _dir) = start("refused");
    let ws = "/ws?channel=news";

    let (resp, _) = upgrade(&gw, ws, "");
    assert_refused(&resp, 401, "missing token", "no token");
    assert_eq!(resp.header("www-authenticate"), Some("Bearer"));

    let expired = hs_token("hs", HS_SECRET, &claims(&["news"], now_s() - 60));
    let (resp, _) = upgrade(&gw, &format!("{ws}&token={expired}"), "");
    assert_refused(&resp, 401, "token expired", "expired");
    assert_eq!(
        resp.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );

    let forged = hs_token("hs", HS_SECRET_2, &claims(&["news"], now_s() + 3600));
    let (resp, _) = upgrade(&gw, ws, &format!("Authorization: Bearer {forged}\r\n"));
    assert_refused(&resp, 401, "bad signature", "bad signature");

    let unknown = hs_token("nope", HS_SECRET, &claims(&["news"], now_s() + 3600));
    let (resp, _) = upgrade(&gw, &format!("{ws}&token={unknown}"), "");
    assert_refused(&resp, 401, "unknown kid", "unknown kid");

    // Valid, but one of the channels is not granted.
    let token = valid_hs(&["news"]);
    let (resp, _) = upgrade(&gw, &format!("{ws}&channel=sport&token={token}"), "");
    assert_refused(&resp, 403, "channel not allowed", "channel not allowed");

    // Long-poll needs one too.
    let resp = gw.http().get("/events?channel=news", &[]);
    assert_refused(&resp, 401, "missing token", "long-poll without token");
    let resp = gw
        .http()
        .get(&format!("/events?channel=other&token={token}"), &[]);
    assert_refused(
        &resp,
        403,
        "channel not allowed",
        "long-poll, other channel",
    );

    // Health checks do not.
    gw.healthz();
    assert!(gw.log().contains("request refused"), "refusals are logged");
}

#[test]
fn tokens_must_name_a_configured_audience_and_carry_none_without_one() {
    let with_aud = |aud: Value| {
        let mut c = claims(&["news"], now_s() + 3600);
        c["aud"] = aud;
        hs_token("hs", HS_SECRET, &c)
    };
    let ws = "/ws?channel=news";

    // No audience configured: a token meant for someone is refused.
    let (gw, _dir) = start("no-audience");
    let (resp, _) = upgrade(
        &gw,
        &format!("{ws}&token={}", with_aud(json!("gateway"))),
        "",
    );
    assert_refused(&resp, 401, "audience mismatch", "aud without auth_audience");
    drop(gw);

    // Two audiences in the file (as an identity provider and a rename
    // would have it): a token naming either is let through, on every
    // transport; one naming another audience, or none, is refused.
    let dir = scratch("audience");
    let config = write_config_with(
        &dir,
        "hs",
        HS_SECRET,
        "es.pem",
        "auth_audience = [\"https://rt.example.com\", \"gateway\"]\n",
    );
    let gw = Gateway::start(&["--config", config.to_str().unwrap()]);
    for aud in [
        json!("gateway"),
        json!("https://rt.example.com"),
        json!(["billing", "gateway"]),
    ] {
        let token = with_aud(aud.clone());
        let (resp, _ws) = upgrade(&gw, &format!("{ws}&token={token}"), "");
        assert_eq!(resp.status, 101, "aud {aud}: {}", resp.describe());
        let mut conn = gw.http();
        conn.send(
            format!(
                "GET /events?channel=news HTTP/1.1\r\nHost: gateway\r\n\
                 Accept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n"
            )
            .as_bytes(),
        );
        let head = conn.read_head();
        assert_eq!(head.status, 200, "SSE, aud {aud}: {head:?}");
    }
    for (token, context) in [
        (with_aud(json!("billing")), "another audience"),
        (
            with_aud(json!(["billing", "Gateway"])),
            "audiences differing in case",
        ),
        (valid_hs(&["news"]), "no aud"),
    ] {
        let (resp, _) = upgrade(&gw, &format!("{ws}&token={token}"), "");
        assert_refused(&resp, 401, "audience mismatch", context);
        let resp = gw
            .http()
            .get(&format!("/events?channel=news&since=0&token={token}"), &[]);
        assert_refused(&resp, 401, "audience mismatch", context);
    }

    // The flag works as the file does.
    let secret = format!("hs={HS_SECRET}");
    let gw = Gateway::start(&[
        "--auth",
        "--auth-hs256-secret",
        &secret,
        "--auth-audience",
        "gateway",
    ]);
    let (resp, _ws) = upgrade(
        &gw,
        &format!("{ws}&token={}", with_aud(json!("gateway"))),
        "",
    );
    assert_eq!(resp.status, 101, "--auth-audience: {}", resp.describe());
}

/// Waits (safety net only) for the gateway to log `line` a `count`-th time.
fn wait_for_log(gw: &Gateway, line: &str, count: usize) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while gw.log().matches(line).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {line:?} logged within {IO_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sighup_rotates_keys_without_touching_open_connections() {
    let (gw, dir) = start("rotate");
    let ws = "/ws?channel=news";
    let old = valid_hs(&["news"]);
    let (resp, open_stream) = upgrade(&gw, &format!("{ws}&token={old}"), "");
    assert_eq!(resp.status, 101, "{}", resp.describe());

    // The old kid out, a new one in.
    write_config(&dir, "hs2", HS_SECRET_2, "es.pem");
    gw.signal(libc::SIGHUP);
    wait_for_log(&gw, "auth keys reloaded", 1);
    let new = hs_token("hs2", HS_SECRET_2, &claims(&["news"], now_s() + 3600));
    let (resp, _) = upgrade(&gw, &format!("{ws}&token={new}"), "");
    assert_eq!(resp.status, 101, "new kid: {}", resp.describe());
    let (resp, _) = upgrade(&gw, &format!("{ws}&token={old}"), "");
    assert_refused(&resp, 401, "unknown kid", "old kid after the rotation");

    // A bad key file: the old (current) keys stay, and it is logged.
    std::fs::write(dir.join("bad.pem"), "not a key").unwrap();
    write_config(&dir, "hs3", HS_SECRET, "bad.pem");
    gw.signal(libc::SIGHUP);
    wait_for_log(&gw, "auth keys not reloaded", 1);
    let (resp, _) = upgrade(&gw, &format!("{ws}&token={new}"), "");
    assert_eq!(resp.status, 101, "kept keys: {}", resp.describe());

    // The connection opened with the old kid was never touched.
    let mut client = WebSocket::from_raw_socket(open_stream, Role::Client, None);
    client.send(Message::Ping(b"still here".to_vec())).unwrap();
    loop {
        match client.read().unwrap() {
            Message::Pong(p) => {
                assert_eq!(p, b"still here");
                break;
            }
            Message::Ping(_) => {}
            other => panic!("old-kid connection got {other:?}"),
        }
    }
}

#[test]
fn a_stream_whose_token_expires_is_closed() {
    let (gw, _dir) = start("expiry");
    let soon = now_s() + 2;
    let token = hs_token("hs", HS_SECRET, &claims(&["news"], soon));
    let (resp, stream) = upgrade(&gw, &format!("/ws?channel=news&token={token}"), "");
    assert_eq!(resp.status, 101, "{}", resp.describe());
    // SSE with the same token: its stream just ends.
    let mut sse = gw.http();
    sse.send(
        format!(
            "GET /events?channel=news&token={token} HTTP/1.1\r\nHost: gateway\r\n\
             Accept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(sse.read_head().status, 200);

    let mut ws = WebSocket::from_raw_socket(stream, Role::Client, None);
    let close = loop {
        match ws.read() {
            Ok(Message::Close(frame)) => break frame.expect("a close code"),
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            other => panic!("expected close 4001, got {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::from(4001));
    assert_eq!(close.reason, "token expired");
    assert!(now_s() >= soon, "closed before the token expired");

    let mut rest = Vec::new();
    let _ = sse.reader.read_to_end(&mut rest);
    assert!(gw.log().contains("token expired"), "expiry is logged");
}
