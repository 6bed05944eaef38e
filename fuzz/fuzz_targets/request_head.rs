//! `http::parse_request` on any bytes, with the default limits and with small
//! ones (so the limit checks are reached with short inputs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::channel::valid_channel_name;
use protocol::http::{parse_request, reject_response, HeadLimits, Parsed, Request};

/// Small limits, the echo path, two subprotocols and permessage-deflate
/// off (the default limits have it on).
fn small() -> HeadLimits {
    static SUBPROTOCOLS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    HeadLimits {
        head_bytes_max: 256,
        headers_max: 4,
        url_bytes_max: 64,
        channel_name_bytes_max: 8,
        channels_per_connection_max: 2,
        echo_path: Some("/echo"),
        ws_subprotocols: SUBPROTOCOLS.get_or_init(|| vec!["chat".into(), "gateway.v1".into()]),
        ws_deflate: false,
        publish_body_bytes_max: 64,
    }
}

fn check(data: &[u8], limits: &HeadLimits) {
    match parse_request(data, limits) {
        Ok(Parsed::Partial) => assert!(data.len() < limits.head_bytes_max),
        Ok(Parsed::Complete {
            request,
            head_len,
            origin,
        }) => {
            // An origin is printable ASCII, never empty.
            if let Some(o) = &origin {
                assert!(!o.is_empty() && o.bytes().all(|b| b.is_ascii_graphic()));
            }
            assert!(head_len <= data.len() && head_len <= limits.head_bytes_max);
            // httparse also accepts bare LF line ends (RFC 9112 §2.2), so the
            // head ends with an empty line: "\n\n" or "\n\r\n".
            let head = &data[..head_len];
            assert!(
                head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"),
                "{head:?}"
            );
            // The head alone gives the same answer; one byte less is not complete.
            assert_eq!(
                parse_request(head, limits),
                Ok(Parsed::Complete {
                    request: request.clone(),
                    head_len,
                    origin: origin.clone(),
                })
            );
            assert!(!matches!(
                parse_request(&head[..head_len - 1], limits),
                Ok(Parsed::Complete { .. })
            ));
            let channels = match &request {
                Request::WebSocket {
                    channels,
                    accept,
                    protocol,
                    deflate,
                    ..
                } => {
                    assert_eq!(accept.len(), 28);
                    assert!(limits.ws_deflate || deflate.is_none());
                    // A subprotocol is answered only from the configured list.
                    if let Some(p) = protocol {
                        assert!(limits.ws_subprotocols.iter().any(|o| o == p));
                    }
                    channels.as_slice()
                }
                Request::Echo {
                    accept, deflate, ..
                } => {
                    assert_eq!(accept.len(), 28);
                    assert!(limits.ws_deflate || deflate.is_none());
                    &[]
                }
                Request::Publish { channel, .. } => std::slice::from_ref(channel),
                Request::PublishPreflight { .. } => &[],
                Request::Sse { channels, .. } | Request::LongPoll { channels, .. } => channels,
                Request::Health { .. } | Request::Ready { .. } | Request::Preflight { .. } => &[],
            };
            if !matches!(
                request,
                Request::Health { .. }
                    | Request::Ready { .. }
                    | Request::Echo { .. }
                    | Request::Preflight { .. }
                    | Request::PublishPreflight { .. }
            ) {
                assert!(
                    !channels.is_empty() && channels.len() <= limits.channels_per_connection_max
                );
            }
            for (i, c) in channels.iter().enumerate() {
                assert!(valid_channel_name(
                    c.as_bytes(),
                    limits.channel_name_bytes_max
                ));
                assert!(!channels[..i].contains(c), "duplicate channel");
            }
        }
        Err(reject) => {
            assert!(reject_response(&reject)
                .starts_with(format!("HTTP/1.1 {} ", reject.status()).as_bytes()));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, &HeadLimits::default());
    check(data, &small());
});
