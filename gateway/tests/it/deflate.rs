//! permessage-deflate (RFC 7692): what the 101 answers, fan-out messages
//! compressed once and read by a real client (Python's `websockets`, which
//! offers the extension by default), compressed messages sent on the
//! gateway's subprotocol, and what a client that abuses compression gets.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use protocol::deflate::{Deflater, Inflater, Window};
use serde_json::{json, Value};

use crate::common::*;
use crate::ws_rules::{expect_close, frame, read_frame};

const INSTALL: &str = "python3 -m pip install websockets";

/// What the gateway answers an offer it takes, when the client did not
/// limit the server's window.
const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A JSON payload of about 2 KiB: over the 256-byte threshold, and
/// compressible like the traffic the extension is for.
fn json_payload() -> Vec<u8> {
    let rows: Vec<Value> = (0..30)
        .map(|i| json!({"symbol": format!("SYM{i}"), "bid": 100 + i, "ask": 101 + i, "size": 300}))
        .collect();
    serde_json::to_vec(&rows).unwrap()
}

/// A Python `websockets` client running `script` with `args`; it prints
/// one JSON object per line.
struct PythonClient {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl PythonClient {
    fn start(script: &str, args: &[&str]) -> PythonClient {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn python3 ({e}); the tests need {INSTALL}"));
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        PythonClient { child, lines }
    }

    /// The next line it printed, as JSON.
    fn next(&mut self) -> Value {
        let line = self
            .lines
            .next()
            .unwrap_or_else(|| {
                panic!("the Python client ended early (is websockets installed? {INSTALL})")
            })
            .expect("read the Python client's output");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn finish(mut self) {
        let status = self.child.wait().expect("wait for the Python client");
        assert!(status.success(), "the Python client failed: {status}");
    }
}

impl Drop for PythonClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Subscribes with `websockets`' defaults (permessage-deflate offered),
/// prints the extension it got, then each message it receives.
const SUBSCRIBER: &str = r#"
import asyncio, json, sys, websockets
async def main(url, n):
    async with websockets.connect(url, max_size=None) as ws:
        print(json.dumps({"extensions": ws.response.headers.get("Sec-WebSocket-Extensions")}), flush=True)
        for _ in range(n):
            m = await asyncio.wait_for(ws.recv(), 10)
            print(json.dumps({"text": m} if isinstance(m, str) else {"binary": m.hex()}), flush=True)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"#;

/// Splits a message into its meta line and payload.
fn split_message(m: &[u8]) -> (Value, Vec<u8>) {
    let nl = m.iter().position(|&b| b == b'\n').expect("a meta line");
    (
        serde_json::from_slice(&m[..nl]).unwrap(),
        m[nl + 1..].to_vec(),
    )
}

/// What the Python client printed for one message: text or binary, and
/// its bytes.
fn python_message(v: &Value) -> (bool, Vec<u8>) {
    match (v["text"].as_str(), v["binary"].as_str()) {
        (Some(t), _) => (false, t.as_bytes().to_vec()),
        (_, Some(hex)) => {
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (true, bytes)
        }
        _ => panic!("not a message: {v}"),
    }
}

/// Polls `/metrics` until `series` reads `want` (the cores publish their
/// counts once a second).
fn wait_for_metric(admin: std::net::SocketAddr, series: &str, want: f64) {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let got = metric(admin, series);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {got}, not {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn python_websockets_reads_compressed_and_plain_messages_of_the_fan_out() {
    let admin = free_addr();
    let gw = Gateway::start(&["--admin-listen", &admin.to_string()]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let _probe = wait_for_subscription(&publisher, &[&gw]);
    let url = format!("ws://{}/ws?channel=prices", gw.listen);
    let mut client = PythonClient::start(SUBSCRIBER, &[&url, "3"]);
    assert_eq!(client.next()["extensions"], ANSWER);
    wait_for_metric(admin, "gateway_ws_deflate_connections", 1.0);

    // Over the threshold (text, and binary that is not UTF-8), and under.
    let json = json_payload();
    let binary: Vec<u8> = (0..3000u32).map(|i| (i % 7) as u8 | 0x80).collect();
    let small = br#"{"symbol":"ACME"}"#.to_vec();
    for payload in [&json, &binary, &small] {
        publisher.publish("prices", payload);
    }
    for (want, want_binary) in [(&json, false), (&binary, true), (&small, false)] {
        let (binary, message) = python_message(&client.next());
        let (meta, payload) = split_message(&message);
        assert_eq!(meta["channel"], "prices");
        assert_eq!((binary, &payload), (want_binary, want));
    }
    client.finish();
    // The two large ones were compressed, once each.
    assert_eq!(metric(admin, "gateway_ws_deflate_messages_total"), 2.0);
}

/// A raw WebSocket on `path` offering `extensions` (none when empty): the
/// connection after the 101, and the extension the 101 answered.
fn upgrade_offering(gw: &Gateway, path: &str, extensions: &str) -> (HttpConn, Option<String>) {
    let mut conn = gw.http();
    let offer = if extensions.is_empty() {
        String::new()
    } else {
        format!("Sec-WebSocket-Extensions: {extensions}\r\n")
    };
    conn.send(
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             {offer}\r\n"
        )
        .as_bytes(),
    );
    let head = conn.read_head();
    assert_eq!(head.status, 101, "{head:?}");
    let answer = head.header("sec-websocket-extensions").map(str::to_string);
    (conn, answer)
}

fn compress(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Deflater::default().compress(payload, Window::Full, &mut out);
    out
}

#[test]
fn every_subscriber_of_a_window_gets_the_same_compressed_bytes_and_small_messages_go_plain() {
    let gw = Gateway::start(&[]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let _probe = wait_for_subscription(&publisher, &[&gw]);
    let path = "/ws?channel=book";
    // Chrome's offer, twice; one that limits the server's window (answered
    // with the 512-byte window, which fits any limit from 9 bits up); none.
    let (mut a, answer_a) =
        upgrade_offering(&gw, path, "permessage-deflate; client_max_window_bits");
    let (mut b, _) = upgrade_offering(&gw, path, "permessage-deflate; client_max_window_bits");
    let (mut narrow, answer_narrow) =
        upgrade_offering(&gw, path, "permessage-deflate; server_max_window_bits=10");
    let (mut plain, answer_plain) = upgrade_offering(&gw, path, "");
    assert_eq!(answer_a.as_deref(), Some(ANSWER));
    assert_eq!(
        answer_narrow.as_deref(),
        Some(&*format!("{ANSWER}; server_max_window_bits=9"))
    );
    assert_eq!(answer_plain, None);

    let json = json_payload();
    publisher.publish("book", &json);
    publisher.publish("book", b"tiny");
    let (first_a, frame_a) = read_frame(&mut a);
    let (first_b, frame_b) = read_frame(&mut b);
    let (first_n, frame_n) = read_frame(&mut narrow);
    let (first_p, frame_p) = read_frame(&mut plain);
    assert_eq!([first_a, first_b, first_n], [0xC1; 3], "FIN, RSV1, text");
    assert_eq!(frame_a, frame_b, "one compression, the same bytes");
    assert_ne!(frame_a, frame_n, "another window, another compression");
    assert_eq!(first_p, 0x81);
    let mut inflater = Inflater::default();
    for compressed in [&frame_a, &frame_n] {
        assert!(
            compressed.len() * 3 < frame_p.len(),
            "{} of {}",
            compressed.len(),
            frame_p.len()
        );
        let message = inflater.inflate(compressed, 1 << 20).unwrap().to_vec();
        assert_eq!(message, frame_p, "the same message once decompressed");
    }
    assert_eq!(split_message(&frame_p).1, json);
    // Under the threshold: plain for everybody.
    for conn in [&mut a, &mut b, &mut narrow, &mut plain] {
        let (first, message) = read_frame(conn);
        assert_eq!(first, 0x81);
        assert_eq!(split_message(&message).1, b"tiny");
    }
}

/// On `gateway.v1`, with `websockets` compressing what it sends (every
/// message, whatever its size): each message is acknowledged and reaches
/// the hub as it was sent.
const SENDER: &str = r#"
import asyncio, json, sys, websockets
async def main(url):
    async with websockets.connect(url, subprotocols=["gateway.v1"]) as ws:
        print(json.dumps({"extensions": ws.response.headers.get("Sec-WebSocket-Extensions"),
                          "welcome": json.loads(await ws.recv())}), flush=True)
        big = json.dumps([{"row": i, "text": "compressible " * 4} for i in range(40)])
        for ref, body in [("1", '{"channel":"room.1","ref":"1"}\n' + big),
                          ("2", b'{"channel":"room.1","ref":"2"}\n' + bytes(range(256)) * 8),
                          ("3", '{"channel":"room.1","ref":"3"}\nhi')]:
            await ws.send(body)
            print(json.dumps({"answer": json.loads(await asyncio.wait_for(ws.recv(), 10))}), flush=True)
        print(json.dumps({"big": big}), flush=True)
asyncio.run(main(sys.argv[1]))
"#;

#[test]
fn a_gateway_v1_client_sends_compressed_messages_and_the_hub_gets_them_whole() {
    let gw = Gateway::start(&["--upstream-bind", "tcp://127.0.0.1:*"]);
    let hub = gw.hub();
    let url = format!("ws://{}/ws?channel=room.1", gw.listen);
    let mut client = PythonClient::start(SENDER, &[&url]);
    let opened = client.next();
    assert_eq!(opened["extensions"], ANSWER);
    assert_eq!(opened["welcome"]["type"], "welcome");
    for reference in ["1", "2", "3"] {
        assert_eq!(
            client.next()["answer"],
            json!({"type": "ack", "ref": reference})
        );
    }
    let big = client.next()["big"].as_str().unwrap().to_string();
    let binary: Vec<u8> = (0..=255u8).cycle().take(256 * 8).collect();
    for want in [big.as_bytes(), &binary, b"hi"] {
        let m = hub.next_of("message");
        assert_eq!(m.channel, "room.1");
        assert!(m.payload == want, "{} bytes upstream", m.payload.len());
    }
    client.finish();
}

#[test]
fn a_compression_bomb_is_closed_with_1009_and_garbage_with_1007() {
    let gw = Gateway::start(&["--ws-message-bytes-max", "65536"]);
    let offer = "permessage-deflate";
    // 1 MiB of zeros in about a kilobyte: refused at 64 KiB decompressed.
    let bomb = compress(&vec![0u8; 1 << 20]);
    assert!(bomb.len() < 2048, "{}", bomb.len());
    let cases: [(&str, Vec<u8>, u16); 4] = [
        ("bomb", frame(0xC2, &bomb, true), 1009),
        (
            "not DEFLATE",
            frame(0xC2, &[0xff, 0xff, 0xff, 0xff], true),
            1007,
        ),
        (
            "compressed text that is not UTF-8",
            frame(0xC1, &compress(&[b'a', 0xC3, 0x28]), true),
            1007,
        ),
        (
            "RSV1 on a continuation",
            [
                frame(0x42, &compress(b"first half"), true),
                frame(0xC0, b"", true),
            ]
            .concat(),
            1002,
        ),
    ];
    for (what, bytes, code) in cases {
        let (mut conn, answer) = upgrade_offering(&gw, "/ws?channel=bombs", offer);
        assert_eq!(answer.as_deref(), Some(ANSWER));
        conn.send(&bytes);
        expect_close(&mut conn, code, what);
    }
    let log = gw.log();
    for rule in [
        "message too big once decompressed",
        "compressed message does not decompress",
        "compressed control frame or continuation",
    ] {
        assert!(log.contains(rule), "no {rule:?} in the log:\n{log}");
    }
    // The gateway is fine, and so are its other clients.
    gw.healthz();
}

#[test]
fn rsv1_without_the_extension_is_1002_and_ws_deflate_false_offers_none() {
    for (args, offer) in [
        // The client did not offer it.
        (&[][..], ""),
        // The gateway does not take it.
        (
            &["--ws-deflate", "false"][..],
            "permessage-deflate; client_max_window_bits",
        ),
    ] {
        let gw = Gateway::start(args);
        let (mut conn, answer) = upgrade_offering(&gw, "/ws?channel=x", offer);
        assert_eq!(answer, None, "{args:?}");
        conn.send(&frame(0xC1, &compress(b"hello"), true));
        expect_close(&mut conn, 1002, "RSV1 without permessage-deflate");
    }
    // A client that offers it goes on without it.
    let gw = Gateway::start(&["--ws-deflate", "false"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let _probe = wait_for_subscription(&publisher, &[&gw]);
    let url = format!("ws://{}/ws?channel=off", gw.listen);
    let mut client = PythonClient::start(SUBSCRIBER, &[&url, "1"]);
    assert_eq!(client.next()["extensions"], Value::Null);
    let json = json_payload();
    publisher.publish("off", &json);
    let (_, message) = python_message(&client.next());
    assert_eq!(split_message(&message).1, json);
    client.finish();
}
