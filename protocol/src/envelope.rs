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

use crate::http::Cursor;

/// One message as published.
#[derive(Debug, Clone, Copy)]
pub struct Publication<'a> {
    pub channel: &'a str,
    pub id: Cursor,
    /// SSE event name chosen by the publisher (validated by the caller: no CR/LF).
    pub event: Option<&'a str>,
    pub payload: &'a [u8],
}

/// WebSocket: one unfragmented frame. Text frame when the payload is UTF-8,
/// binary frame otherwise; the frame payload is `meta JSON` + "\n" + payload.
pub fn encode_ws(p: &Publication, out: &mut Vec<u8>) { todo!() }

/// SSE: `id: <id>`, `event: <event>` when set, then `data:` lines: the meta
/// JSON first, then the payload's lines (base64 of the payload, one line, with
/// `"encoding":"base64"` in the meta, when it is not UTF-8).
pub fn encode_sse(p: &Publication, out: &mut Vec<u8>) { todo!() }

/// Long-poll: one JSON object `{"channel":…,"id":"…","event":…?,"data":"…"}`
/// with the payload as a JSON string (or base64 + `"encoding":"base64"`).
pub fn encode_longpoll_item(p: &Publication, out: &mut Vec<u8>) { todo!() }

/// The "history gap" signal for a channel: the client asked to resume from a
/// cursor that the history no longer covers, so messages may have been missed.
/// WebSocket: a text frame `{"channel":"news","gap":true}` + "\n".
pub fn encode_ws_gap(channel: &str, out: &mut Vec<u8>) { todo!() }
/// SSE: `event: gap` with `data: {"channel":"news","gap":true}` and no id line
/// (so the client's last event id is unchanged).
pub fn encode_sse_gap(channel: &str, out: &mut Vec<u8>) { todo!() }

/// A whole long-poll HTTP response: `200 OK`, `Content-Type: application/json`,
/// `Cache-Control: no-store`, `Content-Length`, `Connection: close` when
/// `!keep_alive`, and the body
/// `{"cursor":"<cursor>","messages":[<items joined by ",">],"gaps":["chan",…]}`.
/// `items` are outputs of [`encode_longpoll_item`].
pub fn longpoll_response(items: &[&[u8]], cursor: Cursor, gaps: &[&str], keep_alive: bool, out: &mut Vec<u8>) { todo!() }
