//! `id::parse_cursor` and `channel::valid_channel_name` against simple
//! oracles, and both as they arrive through a request's query string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::channel::valid_channel_name;
use protocol::http::{parse_request, HeadLimits, Parsed, Reject, Request};
use protocol::id::parse_cursor;

/// Every byte as %XX, so any input can travel in a query.
fn percent_encoded(data: &[u8]) -> String {
    data.iter().map(|b| format!("%{b:02X}")).collect()
}

fn long_poll(query: &str) -> Result<Request, Reject> {
    let head = format!("GET /events?{query} HTTP/1.1\r\nHost: h\r\n\r\n");
    match parse_request(head.as_bytes(), &HeadLimits::default())? {
        Parsed::Complete {
            request, head_len, ..
        } => {
            assert_eq!(head_len, head.len());
            Ok(request)
        }
        Parsed::Partial => panic!("partial: {head:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // Cursor: exactly the 1–20 ASCII digit strings that fit a u64.
    let cursor = parse_cursor(data);
    let oracle = std::str::from_utf8(data)
        .ok()
        .filter(|s| (1..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok());
    assert_eq!(cursor, oracle);
    if let Some(n) = cursor {
        assert_eq!(parse_cursor(n.to_string().as_bytes()), Some(n));
        let trimmed = data
            .iter()
            .position(|&b| b != b'0')
            .map_or(&b"0"[..], |i| &data[i..]);
        assert_eq!(n.to_string().as_bytes(), trimmed);
    }

    // Channel name: length and charset.
    let valid = valid_channel_name(data, 128);
    let oracle = (1..=128).contains(&data.len())
        && data
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"_-.:@/".contains(&b));
    assert_eq!(valid, oracle);
    if data.len() > 1000 {
        return; // keeps the query under the URL limit
    }

    // Through a query: percent-decoded, then validated.
    let name = percent_encoded(data);
    let got = long_poll(&format!("channel={name}"));
    match std::str::from_utf8(data) {
        Ok(s) if valid => assert_eq!(
            got,
            Ok(Request::LongPoll {
                channels: vec![s.to_string()],
                since: None,
                keep_alive: true,
                token: None,
            })
        ),
        Ok(_) => assert_eq!(got, Err(Reject::BadChannelName)),
        Err(_) => assert_eq!(got, Err(Reject::BadQuery)),
    }
    if valid {
        // Valid names need no encoding (httparse accepts the charset as is).
        let raw = std::str::from_utf8(data).unwrap();
        assert_eq!(long_poll(&format!("channel={raw}")), got);
    }
    let got = long_poll(&format!("channel=a&since={name}"));
    match (std::str::from_utf8(data), cursor) {
        (_, Some(n)) => assert_eq!(
            got,
            Ok(Request::LongPoll {
                channels: vec!["a".into()],
                since: Some(n),
                keep_alive: true,
                token: None,
            })
        ),
        (Ok(_), None) => assert_eq!(got, Err(Reject::BadCursor)),
        (Err(_), None) => assert_eq!(got, Err(Reject::BadQuery)),
    }
});
