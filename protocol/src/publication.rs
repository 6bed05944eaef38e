//! The publisher contract: one publication is a multipart ZeroMQ message of
//! two or three frames — the channel name, the payload (any bytes, kept
//! untouched), and an optional JSON meta object with an SSE `event` name
//! and a publisher `id`. [`check_frames`] decides whether the gateway can
//! deliver it faithfully; what it refuses is named after the rule it broke.

use serde_json::Value;

use crate::id::GATEWAY_ID_FLOOR;
use crate::limits::EVENT_NAME_BYTES_MAX;

/// The limits a publication is checked against.
#[derive(Debug, Clone, Copy)]
pub struct PublicationLimits {
    pub channel_name_bytes_max: usize,
    pub payload_bytes_max: usize,
}

/// Why a publication cannot be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationError {
    /// Not two or three frames.
    WrongFrameCount(usize),
    /// The channel name is empty, too long or outside the charset.
    BadChannelName,
    PayloadTooLarge {
        size: usize,
        max_size: usize,
    },
    /// The meta frame is not a JSON object of `event` and `id` (the
    /// parser's or the rule's words).
    BadMeta(String),
    /// `event` is empty, over [`EVENT_NAME_BYTES_MAX`] or not printable
    /// ASCII (it becomes an SSE `event:` line).
    BadEventName,
    /// `id` is not a decimal u64 from 1 to [`GATEWAY_ID_FLOOR`] - 1 (as a
    /// JSON string or number).
    BadId,
}

/// A publication that passed the checks.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked<'a> {
    /// The channel (a user channel included), or, for a message to one
    /// connection, `!` and its address as the publisher wrote it.
    pub channel: &'a str,
    /// A message to one connection (the first frame was `!` and an
    /// address): it has no id and is not kept.
    pub connection: Option<crate::upstream::Address>,
    pub event: Option<String>,
    /// The publisher's id for the message, if it gave one.
    pub id: Option<u64>,
    pub payload: &'a [u8],
}

/// Checks a publication's frames.
pub fn check_frames<'a, F: AsRef<[u8]>>(
    frames: &'a [F],
    limits: &PublicationLimits,
) -> Result<Checked<'a>, PublicationError> {
    if frames.len() != 2 && frames.len() != 3 {
        return Err(PublicationError::WrongFrameCount(frames.len()));
    }
    let first = frames[0].as_ref();
    let connection = match crate::upstream::destination(first, limits.channel_name_bytes_max) {
        None => return Err(PublicationError::BadChannelName),
        Some(crate::upstream::Destination::Connection(a)) => Some(a),
        Some(crate::upstream::Destination::Channel(_)) => None,
    };
    // Valid destinations are ASCII, so this cannot fail.
    let channel = std::str::from_utf8(first).map_err(|_| PublicationError::BadChannelName)?;
    let payload = frames[1].as_ref();
    if payload.len() > limits.payload_bytes_max {
        return Err(PublicationError::PayloadTooLarge {
            size: payload.len(),
            max_size: limits.payload_bytes_max,
        });
    }
    let (event, id) = match frames.get(2) {
        Some(meta) => parse_meta(meta.as_ref())?,
        None => (None, None),
    };
    if connection.is_some() && id.is_some() {
        // A message to one connection is not kept, so it has no position
        // anyone could resume from.
        return Err(PublicationError::BadId);
    }
    Ok(Checked {
        channel,
        connection,
        event,
        id,
        payload,
    })
}

/// The meta frame: a JSON object with nothing but `event` (a string) and
/// `id` (see [`publisher_id`]), either of which may be null or absent.
fn parse_meta(meta: &[u8]) -> Result<(Option<String>, Option<u64>), PublicationError> {
    let value: Value =
        serde_json::from_slice(meta).map_err(|e| PublicationError::BadMeta(e.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(PublicationError::BadMeta("not a JSON object".into()));
    };
    let (mut event, mut id) = (None, None);
    for (key, value) in fields {
        match (key.as_str(), value) {
            (_, Value::Null) if key == "event" || key == "id" => {}
            ("event", Value::String(name)) => {
                let ok = !name.is_empty()
                    && name.len() <= EVENT_NAME_BYTES_MAX
                    && name.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err(PublicationError::BadEventName);
                }
                event = Some(name);
            }
            ("event", _) => return Err(PublicationError::BadMeta("event is not a string".into())),
            ("id", value) => id = Some(publisher_id(&value)?),
            (other, _) => {
                return Err(PublicationError::BadMeta(format!(
                    "unknown field `{other}`, expected `event` or `id`"
                )))
            }
        }
    }
    Ok((event, id))
}

/// The meta frame's `"id"`: a decimal u64 as a JSON string (`"42"`) or
/// number (`42`). 0 is refused: a cursor of 0 means "before everything",
/// so a message with id 0 could never be resumed to. Ids from
/// [`GATEWAY_ID_FLOOR`] up are the gateways' own (they carry a process
/// tag); a publisher's there could pass for one.
fn publisher_id(v: &Value) -> Result<u64, PublicationError> {
    let id = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().ok()
        }
        _ => None,
    };
    id.filter(|&id| id > 0 && id < GATEWAY_ID_FLOOR)
        .ok_or(PublicationError::BadId)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: PublicationLimits = PublicationLimits {
        channel_name_bytes_max: 128,
        payload_bytes_max: 1024 * 1024,
    };

    #[test]
    fn accepts_two_or_three_frames() {
        let two: [&[u8]; 2] = [b"news", b"hello"];
        assert_eq!(
            check_frames(&two, &LIMITS).unwrap(),
            Checked {
                channel: "news",
                connection: None,
                event: None,
                id: None,
                payload: &b"hello"[..]
            }
        );
        let three: [&[u8]; 3] = [b"news", b"hello", br#"{"event":"price"}"#];
        let checked = check_frames(&three, &LIMITS).unwrap();
        assert_eq!(checked.event.as_deref(), Some("price"));
        assert_eq!(checked.id, None);
        let nulls: [&[u8]; 3] = [b"news", b"", br#"{"event":null,"id":null}"#];
        let checked = check_frames(&nulls, &LIMITS).unwrap();
        assert_eq!((checked.event, checked.id), (None, None));
    }

    #[test]
    fn a_reply_names_a_user_channel_or_one_connection_which_takes_no_id() {
        let user: [&[u8]; 2] = [b"#auth0|42", b"hi"];
        let checked = check_frames(&user, &LIMITS).unwrap();
        assert_eq!((checked.channel, checked.connection), ("#auth0|42", None));
        let address = crate::upstream::Address {
            instance: 1,
            core: 0,
            key: 2,
            serial: 3,
            tag: 4,
        };
        let to = format!("!{}", address.encode());
        let direct: [&[u8]; 2] = [to.as_bytes(), b"hi"];
        let checked = check_frames(&direct, &LIMITS).unwrap();
        assert_eq!(checked.connection, Some(address));
        assert_eq!(checked.channel, to);
        let with_id: [&[u8]; 3] = [to.as_bytes(), b"hi", br#"{"id":5}"#];
        assert_eq!(
            check_frames(&with_id, &LIMITS),
            Err(PublicationError::BadId)
        );
        let with_event: [&[u8]; 3] = [to.as_bytes(), b"hi", br#"{"event":"reply"}"#];
        assert!(check_frames(&with_event, &LIMITS).is_ok());
        for bad in [&b"!0123"[..], b"#", b"#a b", b"!"] {
            let f: [&[u8]; 2] = [bad, b"x"];
            assert_eq!(
                check_frames(&f, &LIMITS),
                Err(PublicationError::BadChannelName)
            );
        }
    }

    #[test]
    fn a_publisher_id_is_a_decimal_u64_as_a_string_or_a_number() {
        let id_of = |meta: &[u8]| {
            let f: [&[u8]; 3] = [b"news", b"x", meta];
            check_frames(&f, &LIMITS).map(|c| c.id)
        };
        assert_eq!(id_of(br#"{"id":"42"}"#), Ok(Some(42)));
        assert_eq!(id_of(br#"{"id":42}"#), Ok(Some(42)));
        // Up to just below the gateways' own range (2^56).
        assert_eq!(
            id_of(br#"{"id":"72057594037927935","event":"e"}"#),
            Ok(Some(GATEWAY_ID_FLOOR - 1))
        );
        assert_eq!(
            id_of(br#"{"id":1700000000000000}"#),
            Ok(Some(1_700_000_000_000_000))
        );
        assert_eq!(id_of(br#"{"id":null}"#), Ok(None));
        for bad in [
            &br#"{"id":"0"}"#[..],
            br#"{"id":0}"#,
            br#"{"id":-1}"#,
            br#"{"id":72057594037927936}"#,
            br#"{"id":"18446744073709551615"}"#,
            br#"{"id":1.5}"#,
            br#"{"id":"1.5"}"#,
            br#"{"id":""}"#,
            br#"{"id":" 1"}"#,
            br#"{"id":"-1"}"#,
            br#"{"id":"+1"}"#,
            br#"{"id":"0x10"}"#,
            br#"{"id":"18446744073709551616"}"#,
            br#"{"id":18446744073709551616}"#,
            br#"{"id":true}"#,
            br#"{"id":[1]}"#,
        ] {
            assert_eq!(
                id_of(bad),
                Err(PublicationError::BadId),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn refuses_what_it_cannot_deliver_faithfully() {
        let limits = PublicationLimits {
            payload_bytes_max: 4,
            ..LIMITS
        };
        type Case = (Vec<&'static [u8]>, fn(&PublicationError) -> bool);
        let cases: Vec<Case> = vec![
            (vec![b"news"], |e| {
                matches!(e, PublicationError::WrongFrameCount(1))
            }),
            (vec![b"news", b"a", b"{}", b"x"], |e| {
                matches!(e, PublicationError::WrongFrameCount(4))
            }),
            (vec![b"bad channel", b"a"], |e| {
                *e == PublicationError::BadChannelName
            }),
            (vec![b"", b"a"], |e| *e == PublicationError::BadChannelName),
            (vec![b"news", b"hello"], |e| {
                *e == PublicationError::PayloadTooLarge {
                    size: 5,
                    max_size: 4,
                }
            }),
            (vec![b"news", b"a", b"not json"], |e| {
                matches!(e, PublicationError::BadMeta(_))
            }),
            (vec![b"news", b"a", b"[1]"], |e| {
                matches!(e, PublicationError::BadMeta(_))
            }),
            (vec![b"news", b"a", br#"{"evnt":"x"}"#], |e| {
                matches!(e, PublicationError::BadMeta(_))
            }),
            (vec![b"news", b"a", br#"{"event":7}"#], |e| {
                matches!(e, PublicationError::BadMeta(_))
            }),
            (vec![b"news", b"a", br#"{"event":"a\nb"}"#], |e| {
                *e == PublicationError::BadEventName
            }),
            (vec![b"news", b"a", br#"{"event":""}"#], |e| {
                *e == PublicationError::BadEventName
            }),
        ];
        for (input, expected) in cases {
            let err = check_frames(&input, &limits).unwrap_err();
            assert!(expected(&err), "{input:?} gave {err:?}");
        }
    }
}
