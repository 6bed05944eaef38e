//! RFC 6455 rules over a raw socket, byte for byte: what a broken or hostile
//! client gets (its close code), and that the gateway closes the connection
//! by itself after its close frame even when the client never answers.

use std::io::Read;

use crate::common::*;

const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

pub(crate) fn frame(first_byte: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![first_byte];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n <= 125 => f.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        f.extend_from_slice(&MASK);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Opens a WebSocket by hand and returns the raw connection after the 101.
fn upgrade(gw: &Gateway, path: &str) -> HttpConn {
    let mut conn = gw.http();
    conn.send(
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    );
    let head = conn.read_head();
    assert_eq!(head.status, 101, "{head:?}");
    assert_eq!(
        head.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    conn
}

/// Reads one unmasked server frame: (first byte, payload).
pub(crate) fn read_frame(conn: &mut HttpConn) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    conn.reader.read_exact(&mut head).expect("frame head");
    assert_eq!(head[1] & 0x80, 0, "server frames are never masked");
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            conn.reader.read_exact(&mut b).unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            conn.reader.read_exact(&mut b).unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    conn.reader.read_exact(&mut payload).unwrap();
    (head[0], payload)
}

pub(crate) fn expect_close(conn: &mut HttpConn, code: u16, context: &str) {
    let (first, payload) = read_frame(conn);
    assert_eq!(
        first, 0x88,
        "{context}: expected a close frame, got {first:#x} {payload:?}"
    );
    assert_eq!(&payload[..2], &code.to_be_bytes(), "{context}");
    // The client never answers the close: the gateway must still close the
    // connection (within its linger bound; the read timeout is only a
    // safety net).
    conn.expect_eof(context);
}

#[test]
fn rule_breaking_clients_get_their_close_code_and_are_disconnected() {
    let gw = Gateway::start(&["--ws-message-bytes-max", "1000"]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked frame", frame(0x81, b"hi", false), 1002),
        ("reserved bit", frame(0xC1, b"hi", true), 1002),
        ("reserved opcode", frame(0x83, b"", true), 1002),
        ("fragmented ping", frame(0x09, b"", true), 1002),
        ("ping over 125 bytes", frame(0x89, &[0u8; 126], true), 1002),
        (
            "continuation without a message",
            frame(0x80, b"x", true),
            1002,
        ),
        (
            "close code that must not be sent",
            frame(0x88, &1005u16.to_be_bytes(), true),
            1002,
        ),
        (
            "text that is not UTF-8",
            frame(0x81, &[b'a', 0xC3, 0x28], true),
            1007,
        ),
        (
            "close reason that is not UTF-8",
            frame(0x88, &[0x03, 0xE8, 0xFF], true),
            1007,
        ),
        (
            "message over the limit",
            frame(0x82, &[0u8; 1001], true),
            1009,
        ),
        (
            "fragments adding up over the limit",
            [
                frame(0x02, &[0u8; 600], true),
                frame(0x80, &[0u8; 600], true),
            ]
            .concat(),
            1009,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut conn = upgrade(&gw, "/ws?channel=rules");
        conn.send(&bytes);
        expect_close(&mut conn, code, what);
    }
    // None of it hurt anybody else.
    let mut ws = gw.ws("/ws?channel=rules");
    ws.ws
        .send(tungstenite::Message::Ping(b"still here".to_vec()))
        .unwrap();
    assert!(matches!(ws.next_message(), tungstenite::Message::Pong(p) if p == b"still here"));
}

#[test]
fn invalid_utf8_fails_fast_before_the_message_ends() {
    let gw = Gateway::start(&[]);
    let mut conn = upgrade(&gw, "/ws?channel=rules");
    // First fragment valid, second breaks UTF-8; the final fragment is never
    // sent, so only a fail-fast check can answer.
    conn.send(&frame(0x01, "κό".as_bytes(), true));
    conn.send(&frame(0x00, &[0xF4, 0x90, 0x80], true));
    expect_close(&mut conn, 1007, "invalid UTF-8 inside a fragmented message");
}

#[test]
fn control_frames_inside_a_fragmented_message_are_answered() {
    let gw = Gateway::start(&[]);
    let mut conn = upgrade(&gw, "/ws?channel=rules");
    conn.send(&frame(0x01, b"frag", true));
    conn.send(&frame(0x89, b"mid-message", true));
    let (first, payload) = read_frame(&mut conn);
    assert_eq!((first, payload.as_slice()), (0x8A, &b"mid-message"[..]));
    conn.send(&frame(0x8A, b"unsolicited pong", true));
    conn.send(&frame(0x80, b"ment", true));
    conn.send(&frame(0x88, &1000u16.to_be_bytes(), true));
    let (first, payload) = read_frame(&mut conn);
    assert_eq!(
        (first, payload.as_slice()),
        (0x88, &1000u16.to_be_bytes()[..])
    );
    conn.expect_eof("after the close handshake");
}

#[test]
fn echo_endpoint_is_off_unless_configured_and_echoes_when_on() {
    let off = Gateway::start(&[]);
    let mut conn = off.http();
    let resp = conn.get("/", &[("Upgrade", "websocket"), ("Connection", "Upgrade")]);
    assert_eq!(resp.status, 404, "{}", resp.describe());

    let on = Gateway::start(&["--ws-echo-path", "/echo"]);
    let mut conn = upgrade(&on, "/echo");
    conn.send(&frame(0x01, "héllo ".as_bytes(), true));
    conn.send(&frame(0x80, "wörld".as_bytes(), true));
    conn.send(&frame(0x82, &[0, 1, 2, 255], true));
    // Echoes come back fragment by fragment; reassemble.
    let mut messages = Vec::new();
    let mut current = Vec::new();
    let mut opcode = 0;
    while messages.len() < 2 {
        let (first, payload) = read_frame(&mut conn);
        if first & 0x0F != 0 {
            opcode = first & 0x0F;
        }
        current.extend_from_slice(&payload);
        if first & 0x80 != 0 {
            messages.push((opcode, std::mem::take(&mut current)));
        }
    }
    assert_eq!(messages[0], (1, "héllo wörld".as_bytes().to_vec()));
    assert_eq!(messages[1], (2, vec![0, 1, 2, 255]));
}

#[test]
fn a_subprotocol_is_the_first_offered_that_is_configured_or_none() {
    let gw = Gateway::start(&["--ws-subprotocol", "gateway.v1", "--ws-subprotocol", "chat"]);
    let chosen = |offer: &str| {
        let extra = if offer.is_empty() {
            String::new()
        } else {
            format!("Sec-WebSocket-Protocol: {offer}\r\n")
        };
        let (resp, _stream) = upgrade_with(gw.listen, "/ws?channel=news", &extra);
        assert_eq!(resp.status, 101, "offer {offer:?}: {}", resp.describe());
        resp.header("sec-websocket-protocol").map(str::to_string)
    };
    // The client's order of preference decides among those configured.
    assert_eq!(chosen("superchat, chat").as_deref(), Some("chat"));
    assert_eq!(chosen("chat, gateway.v1").as_deref(), Some("chat"));
    assert_eq!(chosen("gateway.v1, chat").as_deref(), Some("gateway.v1"));
    // Nothing in common, or nothing offered: no header.
    assert_eq!(chosen("superchat"), None);
    assert_eq!(chosen(""), None);

    // A real client that asks for one, as `new WebSocket(url, ["chat"])`
    // does, opens and gets messages.
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let stream = std::net::TcpStream::connect(gw.listen).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/ws?channel={PROBE_CHANNEL}",
        gw.listen
    ))
    .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "chat".parse().unwrap());
    let (ws, resp) = tungstenite::client::client(request, stream)
        .unwrap_or_else(|e| panic!("a client offering \"chat\" was refused: {e:?}"));
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("chat")
    );
    wait_for_subscription_of(
        &publisher,
        vec![WsClient {
            ws,
            path: format!("/ws?channel={PROBE_CHANNEL}"),
        }],
    );

    // A gateway with no list never answers the header.
    let plain = Gateway::start(&[]);
    let (resp, _stream) = upgrade_with(
        plain.listen,
        "/ws?channel=news",
        "Sec-WebSocket-Protocol: chat\r\n",
    );
    assert_eq!(resp.status, 101, "{}", resp.describe());
    assert_eq!(resp.header("sec-websocket-protocol"), None);
}

#[test]
fn a_subprotocol_that_is_no_token_stops_start_up() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--ws-subprotocol", "two words", "--listen", "127.0.0.1:0"])
        .output()
        .expect("run the gateway");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ws_subprotocols"), "{stderr}");
}
