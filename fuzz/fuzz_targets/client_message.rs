//! `upstream::parse_client_message` (a two-way client's WebSocket message)
//! and `upstream::destination` (a publication's first frame), on any bytes
//! (byte 0: small or default channel name limit).
//!
//! Asserts: a message keeps its payload untouched (everything after the
//! first `\n`) and names a valid channel that appears in its meta line; a
//! control message has no payload and at least one valid channel; a meta
//! line over the limit is always refused; a `ref`, kept or not, is a short
//! string or an integer and is echoed as valid JSON in the error and ack
//! frames; a destination is the frame itself (a channel) or an address
//! that writes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::channel::valid_channel_name;
use protocol::upstream::{
    destination, encode_ack, encode_error, parse_client_message, ClientMessage, Destination,
    CLIENT_META_BYTES_MAX, REF_BYTES_MAX,
};
use serde_json::Value;

/// The JSON text a frame from the gateway carries (unmasked, one frame).
fn frame_json(frame: &[u8]) -> Value {
    let (len, at) = match frame[1] {
        126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
        n => (usize::from(n), 2),
    };
    assert_eq!(frame[0], 0x81, "a text frame");
    assert_eq!(frame.len(), at + len);
    let text = &frame[at..];
    assert_eq!(text.last(), Some(&b'\n'));
    serde_json::from_slice(&text[..text.len() - 1]).expect("valid JSON")
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, message)) = data.split_first() else {
        return;
    };
    let names_max = if knob & 1 == 0 { 128 } else { 8 };
    let (meta, payload) = match message.iter().position(|&b| b == b'\n') {
        Some(i) => (&message[..i], Some(&message[i + 1..])),
        None => (message, None),
    };
    let reference = match parse_client_message(message, names_max) {
        Ok(ClientMessage::Send {
            channel,
            reference,
            payload: p,
        }) => {
            assert!(valid_channel_name(channel.as_bytes(), names_max));
            assert_eq!(p, payload.unwrap_or(&[]), "the payload untouched");
            let quoted = format!("\"{channel}\"");
            assert!(meta.windows(quoted.len()).any(|w| w == quoted.as_bytes()));
            assert!(meta.len() <= CLIENT_META_BYTES_MAX);
            reference
        }
        Ok(ClientMessage::Subscribe {
            channels,
            reference,
            ..
        })
        | Ok(ClientMessage::Unsubscribe {
            channels,
            reference,
        }) => {
            assert!(payload.is_none_or(<[u8]>::is_empty), "a control message has no payload");
            assert!(!channels.is_empty());
            assert!(channels
                .iter()
                .all(|c| valid_channel_name(c.as_bytes(), names_max)));
            assert!(meta.len() <= CLIENT_META_BYTES_MAX);
            reference
        }
        Err(e) => {
            let mut out = Vec::new();
            encode_error(e.reference.as_ref(), e.rule.reason(), Some("a"), &mut out);
            let v = frame_json(&out);
            assert_eq!(v["reason"], e.rule.reason());
            e.reference
        }
    };
    if let Some(r) = reference {
        let v: Value = serde_json::from_str(r.json()).expect("a ref is JSON");
        match &v {
            Value::String(s) => assert!(s.len() <= REF_BYTES_MAX),
            Value::Number(n) => assert!(n.is_u64()),
            other => panic!("ref {other}"),
        }
        let mut out = Vec::new();
        encode_ack(&r, &mut out);
        assert_eq!(frame_json(&out)["ref"], v);
    }

    match destination(message, names_max) {
        None => {}
        Some(Destination::Channel(name)) => {
            assert_eq!(name.as_bytes(), message);
            assert!(message.len() <= names_max);
        }
        Some(Destination::Connection(address)) => {
            assert_eq!(message[0], b'!');
            assert_eq!(address.encode().as_bytes(), &message[1..]);
        }
    }
});
