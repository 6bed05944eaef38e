//! Two-way traffic: what clients send, what goes up to the backend's hubs,
//! and how a reply finds its way back.
//!
//! - **Client → gateway.** A WebSocket that negotiated [`SUBPROTOCOL`]
//!   sends messages shaped like the ones it receives: a JSON meta line,
//!   `\n`, then the payload, untouched (`{"channel":"room"}\nhello`), or a
//!   meta line alone that is a control message (`{"type":"subscribe",
//!   "channels":["a"],"since":"42"}`, `{"type":"unsubscribe",…}`). Any of
//!   them may carry a `"ref"` (a string of up to [`REF_BYTES_MAX`] bytes or
//!   an integer), echoed in the acknowledgement or the error it gets.
//!   [`parse_client_message`] checks one.
//! - **Gateway → client**, besides messages: [`encode_welcome`] (the
//!   connection's address, first), [`encode_ack`] and [`encode_error`], each
//!   a JSON object with a `"type"`, followed by `\n` like a meta line with
//!   an empty payload (messages have no `"type"`).
//! - **Gateway → hubs**: five ZeroMQ frames, `[kind, address, channel,
//!   meta, payload]` ([`Kind`], [`UpstreamMeta`]).
//! - **Hubs → clients**: a publication whose first frame is `!` and a
//!   connection's [`Address`] reaches that connection only; one whose first
//!   frame is a user channel (`#` and a token's `sub`, [`user_channel`])
//!   reaches every connection of that user (see [`Destination`]).

use std::fmt::Write as _;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::channel::valid_channel_name;
use crate::id::Cursor;
use crate::ws::{self, OpCode};

/// The gateway's WebSocket subprotocol (`Sec-WebSocket-Protocol`): a client
/// that offers it may send messages and control messages, and is told its
/// address and acknowledgements. A client that offers none keeps the
/// receive-only behaviour (what it sends is checked and dropped).
pub const SUBPROTOCOL: &str = "gateway.v1";
/// A client message's meta line is at most this long (bytes, without the
/// `\n`); the whole message is bounded by the WebSocket message limit.
pub const CLIENT_META_BYTES_MAX: usize = 1024;
/// A `"ref"` string is at most this long.
pub const REF_BYTES_MAX: usize = 64;

/// A client's `"ref"`, as the JSON text it is echoed as (`"7"` or `7`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref(Box<str>);

impl Ref {
    /// Its JSON text.
    pub fn json(&self) -> &str {
        &self.0
    }

    /// A `ref` a gRPC client gave (a protobuf string); None for the empty
    /// string (proto3's "not set") or one over [`REF_BYTES_MAX`].
    pub fn of_text(text: &str) -> Option<Ref> {
        if text.is_empty() || text.len() > REF_BYTES_MAX {
            return None;
        }
        Some(Ref(serde_json::to_string(text).ok()?.into()))
    }

    /// It as text, for a gRPC answer: a string without its quotes, a
    /// number as written.
    pub fn text(&self) -> String {
        serde_json::from_str::<String>(&self.0).unwrap_or_else(|_| self.0.to_string())
    }
}

/// One message from a client, checked.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// A message for the hubs, on `channel`.
    Send {
        channel: &'a str,
        reference: Option<Ref>,
        payload: &'a [u8],
    },
    /// Subscribe to more channels, resuming after `since` if given.
    Subscribe {
        channels: Vec<String>,
        since: Option<Cursor>,
        reference: Option<Ref>,
    },
    Unsubscribe {
        channels: Vec<String>,
        reference: Option<Ref>,
    },
}

/// Why a client message is refused (the connection stays open: the client
/// gets an error frame naming the rule, with its `ref` when it could be
/// read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub reference: Option<Ref>,
    pub rule: ClientRule,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRule {
    /// The meta line is not a JSON object of known fields, or over
    /// [`CLIENT_META_BYTES_MAX`].
    BadMeta,
    /// A channel name is empty, too long or outside the charset.
    BadChannelName,
    /// `since` is not a decimal id.
    BadCursor,
    /// A control message has a payload.
    UnexpectedPayload,
}

impl ClientRule {
    /// What the client is told.
    pub fn reason(self) -> &'static str {
        match self {
            ClientRule::BadMeta => "bad meta",
            ClientRule::BadChannelName => "bad channel name",
            ClientRule::BadCursor => "bad cursor",
            ClientRule::UnexpectedPayload => "control message with a payload",
        }
    }
}

/// A client message's meta line as it is read: borrowed from the message
/// (no allocation on the hot path), every field optional, no other field.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta<'a> {
    // Borrowed strings: one the JSON escaped (which no valid name, kind or
    // cursor needs) cannot be read this way and is refused.
    #[serde(rename = "type", borrow, default)]
    kind: Option<&'a str>,
    #[serde(borrow, default)]
    channel: Option<&'a str>,
    #[serde(borrow, default)]
    channels: Option<Vec<&'a str>>,
    #[serde(borrow, default)]
    since: Option<&'a str>,
    #[serde(rename = "ref", borrow, default)]
    reference: Option<&'a RawValue>,
}

/// Checks one whole client message (the WebSocket message's bytes).
pub fn parse_client_message(
    message: &[u8],
    channel_name_bytes_max: usize,
) -> Result<ClientMessage<'_>, ClientError> {
    let (meta, payload) = match message.iter().position(|&b| b == b'\n') {
        Some(i) => (&message[..i], Some(&message[i + 1..])),
        None => (message, None),
    };
    if meta.len() > CLIENT_META_BYTES_MAX {
        return Err(ClientError {
            reference: None,
            rule: ClientRule::BadMeta,
        });
    }
    let fields: Meta = match serde_json::from_slice(meta) {
        Ok(fields) => fields,
        // Refused whatever else it says; its ref, if it can be read,
        // goes with the refusal.
        Err(_) => {
            return Err(ClientError {
                reference: reference_of(meta),
                rule: ClientRule::BadMeta,
            })
        }
    };
    let reference = match fields.reference {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => Some(reference(raw).ok_or(ClientError {
            reference: None,
            rule: ClientRule::BadMeta,
        })?),
    };
    let bad = |rule| {
        Err(ClientError {
            reference: reference.clone(),
            rule,
        })
    };
    let valid = |name: &str| valid_channel_name(name.as_bytes(), channel_name_bytes_max);
    match fields.kind.unwrap_or("message") {
        "message" => {
            if fields.channels.is_some() || fields.since.is_some() {
                return bad(ClientRule::BadMeta);
            }
            let channel = match fields.channel {
                None => return bad(ClientRule::BadMeta),
                Some(name) if valid(name) => name,
                Some(_) => return bad(ClientRule::BadChannelName),
            };
            Ok(ClientMessage::Send {
                channel,
                reference,
                payload: payload.unwrap_or(&[]),
            })
        }
        kind @ ("subscribe" | "unsubscribe") => {
            if payload.is_some_and(|p| !p.is_empty()) {
                return bad(ClientRule::UnexpectedPayload);
            }
            if fields.channel.is_some() {
                return bad(ClientRule::BadMeta);
            }
            let Some(list) = fields.channels.filter(|l| !l.is_empty()) else {
                return bad(ClientRule::BadMeta);
            };
            if list.iter().any(|name| !valid(name)) {
                return bad(ClientRule::BadChannelName);
            }
            let channels = list.into_iter().map(str::to_string).collect();
            let since = match fields.since {
                None => None,
                Some(s) if kind == "subscribe" => match crate::id::parse_cursor(s.as_bytes()) {
                    Some(c) => Some(c),
                    None => return bad(ClientRule::BadCursor),
                },
                Some(_) => return bad(ClientRule::BadCursor),
            };
            Ok(if kind == "subscribe" {
                ClientMessage::Subscribe {
                    channels,
                    since,
                    reference,
                }
            } else {
                ClientMessage::Unsubscribe {
                    channels,
                    reference,
                }
            })
        }
        _ => bad(ClientRule::BadMeta),
    }
}

/// A `"ref"`: a short string or a non-negative integer, kept as JSON text.
fn reference(raw: &RawValue) -> Option<Ref> {
    match serde_json::from_str::<Value>(raw.get()).ok()? {
        Value::String(s) if s.len() <= REF_BYTES_MAX => Some(Ref(raw.get().into())),
        Value::Number(n) if n.is_u64() => Some(Ref(n.to_string().into())),
        _ => None,
    }
}

/// The `ref` of a meta line that is refused for another reason, if it is
/// a JSON object with a readable one (the slow path: errors only).
fn reference_of(meta: &[u8]) -> Option<Ref> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(meta) else {
        return None;
    };
    let raw = serde_json::value::to_raw_value(fields.get("ref")?).ok()?;
    reference(&raw)
}

/// The first frame to the client on the subprotocol: its address
/// (`{"type":"welcome","address":"…"}` + `\n`), as a WebSocket text frame.
pub fn encode_welcome(address: &str, out: &mut Vec<u8>) {
    let mut text = String::with_capacity(96);
    let _ = writeln!(text, "{{\"type\":\"welcome\",\"address\":\"{address}\"}}");
    ws::encode_frame(OpCode::Text, text.as_bytes(), out);
}

/// The same for an SSE stream (when two-way traffic is on): an event named
/// `welcome` whose data is that JSON object.
pub fn encode_sse_welcome(address: &str, out: &mut Vec<u8>) {
    crate::sse::push_field(out, "event", b"welcome");
    let data = format!("{{\"type\":\"welcome\",\"address\":\"{address}\"}}");
    crate::sse::push_field(out, "data", data.as_bytes());
    out.push(b'\n');
}

/// An acknowledgement: the message with this `ref` was handed to the hubs'
/// socket, or the subscribe or unsubscribe was done.
pub fn encode_ack(reference: &Ref, out: &mut Vec<u8>) {
    let mut text = String::with_capacity(32 + reference.json().len());
    let _ = writeln!(text, "{{\"type\":\"ack\",\"ref\":{}}}", reference.json());
    ws::encode_frame(OpCode::Text, text.as_bytes(), out);
}

/// A refused client message: `{"type":"error","ref":…,"reason":"…"}`, with
/// the channel the refusal is about when there is one.
pub fn encode_error(
    reference: Option<&Ref>,
    reason: &str,
    channel: Option<&str>,
    out: &mut Vec<u8>,
) {
    let mut text = String::with_capacity(64);
    text.push_str("{\"type\":\"error\"");
    if let Some(r) = reference {
        // Valid JSON: it was read from the client's message.
        let _ = write!(text, ",\"ref\":{}", r.json());
    }
    let _ = write!(text, ",\"reason\":{}", Value::from(reason));
    if let Some(channel) = channel {
        let _ = write!(text, ",\"channel\":{}", Value::from(channel));
    }
    text.push_str("}\n");
    ws::encode_frame(OpCode::Text, text.as_bytes(), out);
}

/// What an upstream message is about (its first frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A client's message; the payload is what it sent.
    Message,
    /// A stream opened (presence).
    Connect,
    /// A stream ended; the meta says why (presence).
    Disconnect,
    /// The connection subscribed to the channel (presence).
    Subscribe,
    /// The connection left the channel, on its own request (presence; a
    /// disconnect leaves every channel without one of these).
    Unsubscribe,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::Connect => "connect",
            Kind::Disconnect => "disconnect",
            Kind::Subscribe => "subscribe",
            Kind::Unsubscribe => "unsubscribe",
        }
    }
}

/// The fourth frame of an upstream message, a JSON object: who the
/// connection is and how it is connected.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamMeta<'a> {
    /// `websocket`, `sse`, `longpoll` or `http` (a POST not tied to a stream).
    pub transport: &'a str,
    /// The token's `sub` (auth on, and the token has one).
    pub sub: Option<&'a str>,
    /// The token's claims the hubs are given (`upstream_claims`), as a JSON
    /// object's text.
    pub claims: Option<&'a str>,
    /// A message: whether the client sent it as binary (a WebSocket binary
    /// message; a POST whose body is not UTF-8).
    pub binary: Option<bool>,
    /// A disconnect: why.
    pub reason: Option<&'a str>,
    /// A disconnect: the gateway asked the client to come back (a drain),
    /// probably to another gateway.
    pub reconnect: bool,
}

/// Writes the meta frame.
pub fn encode_upstream_meta(meta: &UpstreamMeta, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"transport\":\"");
    out.extend_from_slice(meta.transport.as_bytes());
    out.push(b'"');
    if let Some(sub) = meta.sub {
        out.extend_from_slice(b",\"sub\":");
        out.extend_from_slice(Value::from(sub).to_string().as_bytes());
    }
    if let Some(claims) = meta.claims {
        out.extend_from_slice(b",\"claims\":");
        out.extend_from_slice(claims.as_bytes());
    }
    if let Some(binary) = meta.binary {
        out.extend_from_slice(if binary {
            b",\"binary\":true"
        } else {
            b",\"binary\":false"
        });
    }
    if let Some(reason) = meta.reason {
        out.extend_from_slice(b",\"reason\":\"");
        out.extend_from_slice(reason.as_bytes());
        out.push(b'"');
    }
    if meta.reconnect {
        out.extend_from_slice(b",\"reconnect\":true");
    }
    out.push(b'}');
}

/// Where one connection is: which gateway process (`instance`, drawn at
/// random at start), which core, which slab entry, which of the
/// connections that entry has held (`serial`), and a `tag` the gateway
/// computes from the rest with a key of its own (see the gateway), so that
/// an address cannot be guessed from another. Written as
/// [`ADDRESS_BYTES`] lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub instance: u64,
    pub core: u16,
    pub key: u32,
    pub serial: u32,
    pub tag: u64,
}

/// Hex digits of an address: instance 16, core 4, key 8, serial 8, tag 16.
pub const ADDRESS_BYTES: usize = 52;
/// A publication's first frame names one connection with this, then its
/// address.
pub const CONNECTION_PREFIX: u8 = b'!';
/// A user channel is this, then the user's `sub`.
pub const USER_PREFIX: u8 = b'#';

impl Address {
    pub fn encode(&self) -> String {
        format!(
            "{:016x}{:04x}{:08x}{:08x}{:016x}",
            self.instance, self.core, self.key, self.serial, self.tag
        )
    }

    pub fn parse(text: &[u8]) -> Option<Address> {
        if text.len() != ADDRESS_BYTES
            || !text
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return None;
        }
        let text = std::str::from_utf8(text).ok()?;
        let hex = |range: std::ops::Range<usize>| u64::from_str_radix(&text[range], 16).ok();
        Some(Address {
            instance: hex(0..16)?,
            core: hex(16..20)? as u16,
            key: hex(20..28)? as u32,
            serial: hex(28..36)? as u32,
            tag: hex(36..52)?,
        })
    }

    /// What a gateway subscribes to upstream to receive the messages for
    /// all of its connections: `!` and its instance.
    pub fn instance_prefix(instance: u64) -> String {
        format!("!{instance:016x}")
    }
}

/// Whom a publication is for, from its first frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    /// Every subscriber of a channel: a channel name, or a user channel
    /// (`#` and a `sub`, to which the user's connections are subscribed).
    Channel(&'a str),
    /// One connection (`!` and its address): no id, no history.
    Connection(Address),
}

/// Reads a publication's first frame.
pub fn destination(frame: &[u8], channel_name_bytes_max: usize) -> Option<Destination<'_>> {
    match frame.first() {
        Some(&CONNECTION_PREFIX) => Address::parse(&frame[1..]).map(Destination::Connection),
        Some(&USER_PREFIX) if valid_user_channel(frame, channel_name_bytes_max) => {
            std::str::from_utf8(frame).ok().map(Destination::Channel)
        }
        _ if valid_channel_name(frame, channel_name_bytes_max) => {
            std::str::from_utf8(frame).ok().map(Destination::Channel)
        }
        _ => None,
    }
}

/// The user channel of a token's `sub`: `#` and the sub, when it is 1 to
/// `channel_name_bytes_max - 1` bytes of printable ASCII other than space,
/// `"` and `\` (which every transport writes as they are). None for any
/// other sub: that user has no user channel (logged by the caller).
pub fn user_channel(sub: &str, channel_name_bytes_max: usize) -> Option<String> {
    let name = format!("#{sub}");
    valid_user_channel(name.as_bytes(), channel_name_bytes_max).then_some(name)
}

fn valid_user_channel(name: &[u8], channel_name_bytes_max: usize) -> bool {
    name.len() >= 2
        && name.len() <= channel_name_bytes_max
        && name[0] == USER_PREFIX
        && name[1..]
            .iter()
            .all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// Per-connection send limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendLimits {
    /// Messages a second, on average; a burst of one second's worth passes.
    pub messages_per_s: u32,
    /// Payload bytes a second, the same way.
    pub bytes_per_s: u32,
}

/// Which send limit a message crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateExceeded {
    MessagesPerSecond,
    BytesPerSecond,
}

impl RateExceeded {
    pub fn reason(self) -> &'static str {
        match self {
            RateExceeded::MessagesPerSecond => "rate limit: messages per second",
            RateExceeded::BytesPerSecond => "rate limit: bytes per second",
        }
    }
}

/// A connection's two token buckets (messages and bytes), each holding
/// up to one second's worth; time is milliseconds of the caller's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendBudget {
    /// Thousandths of a message.
    messages_milli: u64,
    bytes: u64,
    at_ms: u64,
}

impl SendBudget {
    /// A full budget at `now_ms`.
    pub fn new(limits: &SendLimits, now_ms: u64) -> SendBudget {
        SendBudget {
            messages_milli: u64::from(limits.messages_per_s) * 1000,
            bytes: u64::from(limits.bytes_per_s),
            at_ms: now_ms,
        }
    }

    /// Whether a second has passed since the last message: both buckets
    /// are full again (the budget can be forgotten).
    pub fn is_full(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.at_ms) >= 1000
    }

    /// Takes one message of `bytes` at `now_ms`, or says which limit it
    /// crosses (and takes nothing). A message larger than a whole second's
    /// bytes never passes.
    pub fn take(
        &mut self,
        limits: &SendLimits,
        now_ms: u64,
        bytes: usize,
    ) -> Result<(), RateExceeded> {
        let elapsed = now_ms.saturating_sub(self.at_ms);
        self.at_ms = self.at_ms.max(now_ms);
        let messages_max = u64::from(limits.messages_per_s) * 1000;
        let bytes_max = u64::from(limits.bytes_per_s);
        self.messages_milli = (self.messages_milli
            + elapsed.saturating_mul(u64::from(limits.messages_per_s)))
        .min(messages_max);
        self.bytes = (self.bytes + elapsed.saturating_mul(bytes_max) / 1000).min(bytes_max);
        if self.messages_milli < 1000 {
            return Err(RateExceeded::MessagesPerSecond);
        }
        if (bytes as u64) > self.bytes {
            return Err(RateExceeded::BytesPerSecond);
        }
        self.messages_milli -= 1000;
        self.bytes -= bytes as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(m: &str) -> Result<ClientMessage<'_>, ClientError> {
        parse_client_message(m.as_bytes(), 128)
    }

    fn rule(m: &str) -> ClientRule {
        parse(m).unwrap_err().rule
    }

    #[test]
    fn a_grpc_ref_is_kept_as_a_json_string_and_given_back_as_text() {
        let r = Ref::of_text("a\"1").unwrap();
        assert_eq!(r.json(), "\"a\\\"1\"");
        assert_eq!(r.text(), "a\"1");
        assert_eq!(
            Ref("7".into()).text(),
            "7",
            "a WebSocket's number, as written"
        );
        assert!(Ref::of_text("").is_none(), "proto3's unset string");
        assert!(Ref::of_text(&"x".repeat(REF_BYTES_MAX + 1)).is_none());
    }

    #[test]
    fn a_message_names_its_channel_and_keeps_its_payload_untouched() {
        assert_eq!(
            parse("{\"channel\":\"room\",\"ref\":\"a1\"}\nhello\nworld").unwrap(),
            ClientMessage::Send {
                channel: "room",
                reference: Some(Ref("\"a1\"".into())),
                payload: b"hello\nworld",
            }
        );
        assert_eq!(
            parse("{\"type\":\"message\",\"channel\":\"room\",\"ref\":7}").unwrap(),
            ClientMessage::Send {
                channel: "room",
                reference: Some(Ref("7".into())),
                payload: b"",
            }
        );
        let binary = [&b"{\"channel\":\"r\"}\n"[..], &[0xff, 0x00]].concat();
        assert!(matches!(
            parse_client_message(&binary, 128),
            Ok(ClientMessage::Send {
                payload: [0xff, 0x00],
                ..
            })
        ));
    }

    #[test]
    fn control_messages_subscribe_and_unsubscribe() {
        assert_eq!(
            parse("{\"type\":\"subscribe\",\"channels\":[\"a\",\"b\"],\"since\":\"42\",\"ref\":1}")
                .unwrap(),
            ClientMessage::Subscribe {
                channels: vec!["a".into(), "b".into()],
                since: Some(42),
                reference: Some(Ref("1".into())),
            }
        );
        assert_eq!(
            parse("{\"type\":\"unsubscribe\",\"channels\":[\"a\"]}\n").unwrap(),
            ClientMessage::Unsubscribe {
                channels: vec!["a".into()],
                reference: None,
            }
        );
    }

    #[test]
    fn each_broken_rule_is_named_and_the_ref_kept_when_it_could_be_read() {
        assert_eq!(rule("not json\nx"), ClientRule::BadMeta);
        assert_eq!(rule("[1]"), ClientRule::BadMeta);
        assert_eq!(rule("{\"channel\":\"a\",\"extra\":1}"), ClientRule::BadMeta);
        assert_eq!(
            rule("{\"type\":\"dance\",\"channel\":\"a\"}"),
            ClientRule::BadMeta
        );
        assert_eq!(rule("{}"), ClientRule::BadMeta);
        assert_eq!(rule("{\"channel\":\"a b\"}"), ClientRule::BadChannelName);
        assert_eq!(rule("{\"channel\":\"#alice\"}"), ClientRule::BadChannelName);
        assert_eq!(
            rule("{\"type\":\"subscribe\",\"channels\":[\"a\"],\"since\":\"x\"}"),
            ClientRule::BadCursor
        );
        assert_eq!(
            rule("{\"type\":\"subscribe\",\"channels\":[]}"),
            ClientRule::BadMeta
        );
        assert_eq!(
            rule("{\"type\":\"subscribe\",\"channels\":[\"a\"]}\npayload"),
            ClientRule::UnexpectedPayload
        );
        assert_eq!(rule("{\"channel\":\"a\",\"ref\":-1}"), ClientRule::BadMeta);
        let long_ref = format!("{{\"channel\":\"a\",\"ref\":\"{}\"}}", "r".repeat(65));
        assert_eq!(rule(&long_ref), ClientRule::BadMeta);
        let long_meta = format!("{{\"channel\":\"a\",\"x\":\"{}\"}}", "r".repeat(1100));
        assert_eq!(rule(&long_meta), ClientRule::BadMeta);
        let e = parse("{\"channel\":\"a b\",\"ref\":\"q\"}").unwrap_err();
        assert_eq!(e.reference, Some(Ref("\"q\"".into())));
    }

    #[test]
    fn server_frames_are_json_lines_in_text_frames() {
        let text = |f: &[u8]| {
            assert_eq!(f[0], 0x81);
            String::from_utf8(f[2..].to_vec()).unwrap()
        };
        let mut out = Vec::new();
        encode_welcome("abc", &mut out);
        assert_eq!(text(&out), "{\"type\":\"welcome\",\"address\":\"abc\"}\n");
        out.clear();
        encode_sse_welcome("abc", &mut out);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "event: welcome\ndata: {\"type\":\"welcome\",\"address\":\"abc\"}\n\n"
        );
        out.clear();
        encode_ack(&Ref("\"x\\\"y\"".into()), &mut out);
        assert_eq!(text(&out), "{\"type\":\"ack\",\"ref\":\"x\\\"y\"}\n");
        out.clear();
        encode_error(
            Some(&Ref("3".into())),
            "channel not allowed",
            Some("a"),
            &mut out,
        );
        assert_eq!(
            text(&out),
            "{\"type\":\"error\",\"ref\":3,\"reason\":\"channel not allowed\",\"channel\":\"a\"}\n"
        );
    }

    #[test]
    fn upstream_meta_is_a_json_object() {
        let mut out = Vec::new();
        encode_upstream_meta(
            &UpstreamMeta {
                transport: "websocket",
                sub: Some("al\"ice"),
                claims: Some("{\"role\":\"admin\"}"),
                binary: Some(true),
                reason: Some("drain"),
                reconnect: true,
            },
            &mut out,
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"transport":"websocket","sub":"al\"ice","claims":{"role":"admin"},
                "binary":true,"reason":"drain","reconnect":true})
        );
    }

    #[test]
    fn addresses_round_trip_and_name_their_destination() {
        let a = Address {
            instance: 0x0123_4567_89ab_cdef,
            core: 3,
            key: 77,
            serial: 9,
            tag: u64::MAX,
        };
        let text = a.encode();
        assert_eq!(text.len(), ADDRESS_BYTES);
        assert_eq!(Address::parse(text.as_bytes()), Some(a));
        assert!(text.starts_with(&Address::instance_prefix(a.instance)[1..]));
        assert_eq!(Address::parse(text.to_uppercase().as_bytes()), None);
        assert_eq!(Address::parse(&text.as_bytes()[1..]), None);
        let frame = format!("!{text}");
        assert_eq!(
            destination(frame.as_bytes(), 128),
            Some(Destination::Connection(a))
        );
        assert_eq!(destination(b"!nope", 128), None);
        assert_eq!(
            destination(b"#auth0|42", 128),
            Some(Destination::Channel("#auth0|42"))
        );
        assert_eq!(destination(b"#", 128), None);
        assert_eq!(destination(b"#a b", 128), None);
        assert_eq!(
            destination(b"news", 128),
            Some(Destination::Channel("news"))
        );
        assert_eq!(destination(b"ne ws", 128), None);
        assert_eq!(user_channel("alice", 128).as_deref(), Some("#alice"));
        assert_eq!(user_channel("al\"ice", 128), None);
        assert_eq!(user_channel(&"x".repeat(128), 128), None);
    }

    #[test]
    fn the_send_budget_refills_over_a_second_and_names_the_limit_crossed() {
        let limits = SendLimits {
            messages_per_s: 2,
            bytes_per_s: 100,
        };
        let mut b = SendBudget::new(&limits, 1000);
        assert_eq!(b.take(&limits, 1000, 10), Ok(()));
        assert_eq!(b.take(&limits, 1000, 10), Ok(()));
        assert_eq!(
            b.take(&limits, 1000, 10),
            Err(RateExceeded::MessagesPerSecond)
        );
        // Half a second: one message back.
        assert_eq!(b.take(&limits, 1500, 10), Ok(()));
        assert_eq!(
            b.take(&limits, 3000, 101),
            Err(RateExceeded::BytesPerSecond)
        );
        assert_eq!(b.take(&limits, 3000, 100), Ok(()));
        assert_eq!(b.take(&limits, 3000, 1), Err(RateExceeded::BytesPerSecond));
        // A clock that goes back takes nothing away.
        assert_eq!(b.take(&limits, 2000, 0), Ok(()));
    }

    proptest! {
        #[test]
        fn any_bytes_are_a_message_or_a_named_refusal(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_client_message(&bytes, 128);
        }

        #[test]
        fn a_sent_payload_comes_back_as_it_was(
            channel in "[a-z0-9.:_-]{1,20}",
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut m = format!("{{\"channel\":\"{channel}\"}}\n").into_bytes();
            m.extend_from_slice(&payload);
            match parse_client_message(&m, 128) {
                Ok(ClientMessage::Send { channel: c, payload: p, reference: None }) => {
                    prop_assert_eq!(c, channel.as_str());
                    prop_assert_eq!(p, &payload[..]);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
