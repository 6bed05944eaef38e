//! How one published message looks on each transport. The gateway encodes a
//! message once per transport at ingest and shares those bytes with every
//! subscriber.
//!
//! Every message carries a small JSON "meta" object naming its channel and id:
//! `{"channel":"news","id":"42"}` (plus `"event":"name"` when the publisher
//! gave one, plus `"encoding":"base64"` where a binary payload had to become
//! text). On WebSocket and SSE the meta is the first line and the payload
//! follows after one "\n"; long-poll carries it as one JSON object with a
//! `data` field.

use std::io::{self, Write};

use base64::Engine as _;

use crate::id::Cursor;
use crate::sse;
use crate::ws::{self, OpCode};

/// One message as published.
#[derive(Debug, Clone, Copy)]
pub struct Publication<'a> {
    pub channel: &'a str,
    /// 0 for a message sent to one connection: it has no id (it is not
    /// kept, so nothing resumes to it) and moves no cursor.
    pub id: Cursor,
    /// SSE event name chosen by the publisher (validated by the caller: no CR/LF).
    pub event: Option<&'a str>,
    pub payload: &'a [u8],
}

/// WebSocket: one unfragmented frame. Text frame when the payload is UTF-8,
/// binary frame otherwise; the frame payload is `meta JSON` + "\n" + payload.
pub fn encode_ws(p: &Publication, out: &mut Vec<u8>) {
    // A binary frame carries any bytes, so WebSocket never needs base64.
    let opcode = if std::str::from_utf8(p.payload).is_ok() {
        OpCode::Text
    } else {
        OpCode::Binary
    };
    // The frame header needs the payload length first: measure the meta
    // rather than building it in a temporary buffer.
    let meta_len = measure(|w| write_meta(w, p, false));
    let frame_len = meta_len + 1 + p.payload.len();
    let mut head = [0; crate::limits::WS_SERVER_HEAD_BYTES_MAX];
    let head_len = ws::encode_frame_head(true, opcode, frame_len as u64, &mut head);
    out.reserve(head_len + frame_len);
    out.extend_from_slice(&head[..head_len]);
    infallible(write_meta(out, p, false));
    out.push(b'\n');
    out.extend_from_slice(p.payload);
}

/// SSE: `id: <id>`, `event: <event>` when set, then `data:` lines: the meta
/// JSON first, then the payload's lines (base64 of the payload, one line, with
/// `"encoding":"base64"` in the meta, when it is not UTF-8).
///
/// An empty payload still gives one empty `data:` line, so the client's
/// `event.data` is always meta + "\n" + payload.
pub fn encode_sse(p: &Publication, out: &mut Vec<u8>) {
    let text = std::str::from_utf8(p.payload).ok();
    if p.id != 0 {
        push_field_with(out, "id", |out| push_u64(out, p.id));
    }
    if let Some(event) = p.event {
        debug_assert!(!event.contains(['\r', '\n']), "event name with CR/LF");
        sse::push_field(out, "event", event.as_bytes());
    }
    push_field_with(out, "data", |out| {
        infallible(write_meta(out, p, text.is_none()))
    });
    match text {
        Some(text) => sse::push_data_lines(out, text.as_bytes()),
        None => push_field_with(out, "data", |out| push_base64(out, p.payload)),
    }
    out.push(b'\n');
}

/// Long-poll: one JSON object `{"channel":…,"id":"…","event":…?,"data":"…"}`
/// with the payload as a JSON string (or base64 + `"encoding":"base64"`).
pub fn encode_longpoll_item(p: &Publication, out: &mut Vec<u8>) {
    let text = std::str::from_utf8(p.payload).ok();
    infallible(write_meta_fields(out, p));
    out.extend_from_slice(b",\"data\":");
    match text {
        Some(text) => infallible(write_json_str(out, text)),
        None => {
            // The base64 alphabet needs no JSON escaping.
            out.push(b'"');
            push_base64(out, p.payload);
            out.extend_from_slice(b"\",\"encoding\":\"base64\"");
        }
    }
    out.push(b'}');
}

/// The "history gap" signal for a channel: the client asked to resume from a
/// cursor that the history no longer covers, so messages may have been missed.
/// WebSocket: a text frame `{"channel":"news","gap":true}` + "\n".
///
/// The "\n" is inside the frame, as it is after the meta of a message.
pub fn encode_ws_gap(channel: &str, out: &mut Vec<u8>) {
    let len = measure(|w| write_gap(w, channel)) + 1;
    let mut head = [0; crate::limits::WS_SERVER_HEAD_BYTES_MAX];
    let head_len = ws::encode_frame_head(true, OpCode::Text, len as u64, &mut head);
    out.reserve(head_len + len);
    out.extend_from_slice(&head[..head_len]);
    infallible(write_gap(out, channel));
    out.push(b'\n');
}

/// SSE: `event: gap` with `data: {"channel":"news","gap":true}` and no id line
/// (so the client's last event id is unchanged).
pub fn encode_sse_gap(channel: &str, out: &mut Vec<u8>) {
    sse::push_field(out, "event", b"gap");
    push_field_with(out, "data", |out| infallible(write_gap(out, channel)));
    out.push(b'\n');
}

/// The status line every long-poll response starts with: a response
/// shared by many clients can be sent from behind it, after a status line
/// with one client's own headers (CORS).
pub const LONGPOLL_STATUS_LINE: &[u8] = b"HTTP/1.1 200 OK\r\n";

/// A whole long-poll HTTP response: `200 OK`, `Content-Type: application/json`,
/// `Cache-Control: no-store`, `Content-Length`, `Connection: close` when
/// `!keep_alive`, the `extra` header lines (each ending in CRLF: CORS, or ""),
/// and the body
/// `{"cursor":"<cursor>","messages":[<items joined by ",">],"gaps":["chan",…]}`.
/// `items` are outputs of [`encode_longpoll_item`].
pub fn longpoll_response(
    items: &[&[u8]],
    cursor: Cursor,
    gaps: &[&str],
    keep_alive: bool,
    extra: &str,
    out: &mut Vec<u8>,
) {
    let body_len = measure(|w| write_longpoll_body(w, items, cursor, gaps));
    let connection = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    let head = format!(
        "Content-Type: application/json\r\n\
         Cache-Control: no-store\r\n\
         Content-Length: {body_len}\r\n\
         {connection}{extra}\r\n"
    );
    out.reserve(LONGPOLL_STATUS_LINE.len() + head.len() + body_len);
    out.extend_from_slice(LONGPOLL_STATUS_LINE);
    out.extend_from_slice(head.as_bytes());
    infallible(write_longpoll_body(out, items, cursor, gaps));
}

/// Writes the meta object: `{"channel":…,"id":"…"[,"event":…][,"encoding":"base64"]}`.
fn write_meta<W: Write>(w: &mut W, p: &Publication, base64: bool) -> io::Result<()> {
    write_meta_fields(w, p)?;
    if base64 {
        w.write_all(b",\"encoding\":\"base64\"")?;
    }
    w.write_all(b"}")
}

/// The meta object's opening brace and its channel, id and event fields, left
/// open so long-poll can add `data` before `encoding`.
fn write_meta_fields<W: Write>(w: &mut W, p: &Publication) -> io::Result<()> {
    w.write_all(b"{\"channel\":")?;
    write_json_str(w, p.channel)?;
    // The id is a string: JSON numbers lose precision above 2^53 in JavaScript.
    if p.id != 0 {
        w.write_all(b",\"id\":\"")?;
        write_u64(w, p.id)?;
        w.write_all(b"\"")?;
    }
    if let Some(event) = p.event {
        w.write_all(b",\"event\":")?;
        write_json_str(w, event)?;
    }
    Ok(())
}

fn write_gap<W: Write>(w: &mut W, channel: &str) -> io::Result<()> {
    w.write_all(b"{\"channel\":")?;
    write_json_str(w, channel)?;
    w.write_all(b",\"gap\":true}")
}

fn write_longpoll_body<W: Write>(
    w: &mut W,
    items: &[&[u8]],
    cursor: Cursor,
    gaps: &[&str],
) -> io::Result<()> {
    w.write_all(b"{\"cursor\":\"")?;
    write_u64(w, cursor)?;
    w.write_all(b"\",\"messages\":[")?;
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        w.write_all(item)?;
    }
    w.write_all(b"],\"gaps\":[")?;
    for (i, gap) in gaps.iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        write_json_str(w, gap)?;
    }
    w.write_all(b"]}")
}

/// `s` as a JSON string literal, quoted and escaped by serde_json.
fn write_json_str<W: Write>(w: &mut W, s: &str) -> io::Result<()> {
    serde_json::to_writer(w, s).map_err(io::Error::from)
}

fn write_u64<W: Write>(w: &mut W, n: u64) -> io::Result<()> {
    // u64::MAX has 20 digits. Filled from the end.
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut n = n;
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.write_all(&digits[start..])
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    infallible(write_u64(out, n));
}

/// Appends standard base64 (with padding) of `bytes`, encoding in place.
fn push_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    // `encoded_len` is None only if the length overflows usize, which no
    // slice in memory can cause.
    let len = base64::encoded_len(bytes.len(), true).unwrap_or(0);
    out.resize(start + len, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, &mut out[start..])
        .unwrap_or(0);
    // Written == len always; the truncate only matters if that ever broke.
    out.truncate(start + written);
}

/// Appends `name: ` + whatever `value` writes + "\n" (an SSE field).
fn push_field_with(out: &mut Vec<u8>, name: &str, value: impl FnOnce(&mut Vec<u8>)) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    value(out);
    out.push(b'\n');
}

/// Writes into a `Vec<u8>` cannot fail (`Vec`'s `Write` never errors, and
/// serde_json only fails on writer errors when serialising a `&str`), so the
/// results of the writers above are dropped here, in one place, after a
/// debug-build check.
fn infallible(result: io::Result<()>) {
    debug_assert!(result.is_ok(), "writing to a Vec failed: {result:?}");
}

/// Counts the bytes a writer function produces, without storing them.
fn measure(write: impl FnOnce(&mut ByteCount) -> io::Result<()>) -> usize {
    let mut count = ByteCount(0);
    infallible(write(&mut count));
    count.0
}

struct ByteCount(usize);

impl Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication<'a>(event: Option<&'a str>, payload: &'a [u8]) -> Publication<'a> {
        Publication {
            channel: "news",
            id: 42,
            event,
            payload,
        }
    }

    fn ws(p: &Publication) -> Vec<u8> {
        let mut out = Vec::new();
        encode_ws(p, &mut out);
        out
    }

    fn sse(p: &Publication) -> String {
        let mut out = Vec::new();
        encode_sse(p, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn longpoll(p: &Publication) -> String {
        let mut out = Vec::new();
        encode_longpoll_item(p, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// Splits a server frame into (first byte, payload), checking the length.
    fn frame(bytes: &[u8]) -> (u8, &[u8]) {
        let (len, start) = match bytes[1] {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        assert_eq!(bytes.len(), start + len, "frame length");
        (bytes[0], &bytes[start..])
    }

    #[test]
    fn ws_text_or_binary() {
        let out = ws(&publication(None, b"hello"));
        assert_eq!(
            frame(&out),
            (0x81, &b"{\"channel\":\"news\",\"id\":\"42\"}\nhello"[..])
        );

        let out = ws(&publication(Some("up\"date"), "héllo".as_bytes()));
        assert_eq!(
            frame(&out),
            (
                0x81,
                "{\"channel\":\"news\",\"id\":\"42\",\"event\":\"up\\\"date\"}\nhéllo".as_bytes()
            )
        );

        // Not UTF-8: a binary frame, raw bytes, no base64.
        let out = ws(&publication(None, &[0xff, 0x00, 0x80]));
        assert_eq!(
            frame(&out),
            (
                0x82,
                &b"{\"channel\":\"news\",\"id\":\"42\"}\n\xff\x00\x80"[..]
            )
        );

        let out = ws(&publication(None, b""));
        assert_eq!(
            frame(&out),
            (0x81, &b"{\"channel\":\"news\",\"id\":\"42\"}\n"[..])
        );

        // Over 125 and over 65535 bytes: extended lengths.
        for len in [200, 70_000] {
            let payload = vec![b'x'; len];
            let out = ws(&publication(None, &payload));
            let (b0, body) = frame(&out);
            assert_eq!(b0, 0x81);
            assert!(body.ends_with(&payload));
        }
    }

    #[test]
    fn ws_appends_to_existing_output() {
        let mut out = b"prev".to_vec();
        encode_ws(&publication(None, b"a"), &mut out);
        assert_eq!(&out[..4], b"prev");
        assert_eq!(frame(&out[4..]).0, 0x81);
    }

    #[test]
    fn sse_events() {
        assert_eq!(
            sse(&publication(None, b"hello")),
            "id: 42\ndata: {\"channel\":\"news\",\"id\":\"42\"}\ndata: hello\n\n"
        );
        assert_eq!(
            sse(&publication(Some("score"), b"line 1\nline 2\r\nline 3")),
            "id: 42\nevent: score\ndata: {\"channel\":\"news\",\"id\":\"42\",\"event\":\"score\"}\n\
             data: line 1\ndata: line 2\ndata: line 3\n\n"
        );
        assert_eq!(
            sse(&publication(None, b"")),
            "id: 42\ndata: {\"channel\":\"news\",\"id\":\"42\"}\ndata: \n\n"
        );
        assert_eq!(
            sse(&publication(None, &[0xff, 0xfe, 0x00, b'\n'])),
            "id: 42\ndata: {\"channel\":\"news\",\"id\":\"42\",\"encoding\":\"base64\"}\n\
             data: //4ACg==\n\n"
        );
    }

    #[test]
    fn longpoll_items() {
        assert_eq!(
            longpoll(&publication(None, b"say \"hi\"\n")),
            r#"{"channel":"news","id":"42","data":"say \"hi\"\n"}"#
        );
        assert_eq!(
            longpoll(&publication(Some("e"), &[0xff, 0xfe, 0x00, b'\n'])),
            r#"{"channel":"news","id":"42","event":"e","data":"//4ACg==","encoding":"base64"}"#
        );
        let p = Publication {
            channel: "a/b",
            id: u64::MAX,
            event: Some("x"),
            payload: b"",
        };
        let v: serde_json::Value = serde_json::from_str(&longpoll(&p)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"channel":"a/b","id":"18446744073709551615","event":"x","data":""})
        );
    }

    #[test]
    fn gaps() {
        let mut out = Vec::new();
        encode_ws_gap("news", &mut out);
        assert_eq!(
            frame(&out),
            (0x81, &b"{\"channel\":\"news\",\"gap\":true}\n"[..])
        );

        let mut out = Vec::new();
        encode_sse_gap("news", &mut out);
        assert_eq!(
            out,
            b"event: gap\ndata: {\"channel\":\"news\",\"gap\":true}\n\n"
        );
    }

    #[test]
    fn longpoll_responses() {
        let a = longpoll(&publication(None, b"one"));
        let b = longpoll(&publication(Some("e"), &[0xff]));
        let items: [&[u8]; 2] = [a.as_bytes(), b.as_bytes()];
        for keep_alive in [true, false] {
            let mut out = Vec::new();
            longpoll_response(&items, 43, &["news", "sp\"ort"], keep_alive, "", &mut out);
            let text = String::from_utf8(out).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
            assert!(head.contains("\r\nContent-Type: application/json"));
            assert!(head.contains("\r\nCache-Control: no-store"));
            assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
            assert_eq!(head.contains("\r\nConnection: close"), !keep_alive);
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                v,
                serde_json::json!({
                    "cursor": "43",
                    "messages": [
                        {"channel":"news","id":"42","data":"one"},
                        {"channel":"news","id":"42","event":"e","data":"/w==","encoding":"base64"},
                    ],
                    "gaps": ["news", "sp\"ort"],
                })
            );
        }

        let mut out = Vec::new();
        longpoll_response(&[], 0, &[], true, "", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text
            .ends_with("Content-Length: 38\r\n\r\n{\"cursor\":\"0\",\"messages\":[],\"gaps\":[]}"));

        let mut out = Vec::new();
        longpoll_response(&[], 0, &[], false, "Vary: Origin\r\n", &mut out);
        assert!(out.starts_with(LONGPOLL_STATUS_LINE));
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\r\nConnection: close\r\nVary: Origin\r\n\r\n{"));
    }

    mod properties {
        use super::*;
        use crate::sse::tests::{normalise_line_ends, parse_stream};
        use proptest::prelude::*;

        fn payload() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                any::<String>().prop_map(String::into_bytes),
                prop::collection::vec(any::<u8>(), 0..200),
            ]
        }

        proptest! {
            /// Each transport's encoding of a publication gives back its
            /// channel, id, event and payload: WebSocket raw (text frame iff
            /// UTF-8), SSE and long-poll as text or base64 + `"encoding"`.
            #[test]
            fn every_transport_round_trips(
                channel in any::<String>(),
                id in any::<u64>(),
                event in prop::option::of("[ -~]{1,16}"),
                payload in payload(),
            ) {
                let p = Publication { channel: &channel, id, event: event.as_deref(), payload: &payload };
                let text = std::str::from_utf8(&payload).ok();
                let meta = |base64: bool| {
                    let mut m = serde_json::json!({"channel": channel, "id": id.to_string()});
                    if let Some(e) = &event {
                        m["event"] = e.as_str().into();
                    }
                    if base64 {
                        m["encoding"] = "base64".into();
                    }
                    m
                };
                let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).unwrap();

                // WebSocket: meta line, then the payload as is.
                let out = ws(&p);
                let (b0, body) = frame(&out);
                prop_assert_eq!(b0, if text.is_some() { 0x81 } else { 0x82 });
                let nl = body.iter().position(|&b| b == b'\n').unwrap();
                prop_assert_eq!(serde_json::from_slice::<serde_json::Value>(&body[..nl]).unwrap(), meta(false));
                prop_assert_eq!(&body[nl + 1..], &payload[..]);

                // SSE: one event; its data is meta + "\n" + payload.
                let events = parse_stream(&sse(&p));
                prop_assert_eq!(events.len(), 1);
                let e = &events[0];
                prop_assert_eq!(e.id.clone(), Some(id.to_string()));
                prop_assert_eq!(e.event.clone(), event.clone());
                let (m, data) = e.data.split_once('\n').unwrap();
                prop_assert_eq!(serde_json::from_str::<serde_json::Value>(m).unwrap(), meta(text.is_none()));
                match text {
                    Some(t) => prop_assert_eq!(data, normalise_line_ends(t)),
                    None => prop_assert_eq!(b64(data), payload.clone()),
                }

                // Long-poll: one JSON object.
                let v: serde_json::Value = serde_json::from_str(&longpoll(&p)).unwrap();
                let mut want = meta(text.is_none());
                want["data"] = match text {
                    Some(t) => t.into(),
                    None => v["data"].clone(),
                };
                prop_assert_eq!(&v, &want);
                if text.is_none() {
                    prop_assert_eq!(b64(v["data"].as_str().unwrap()), payload.clone());
                }
            }
        }
    }
}
