//! `ws::parse_close_payload` against the RFC 6455 §7.4 rules, round-tripped
//! through `encode_close`; and `ws::Utf8Stream` over the input cut into pieces
//! (sizes drawn from the first byte) against `std::str::from_utf8` on the
//! whole: same verdict, and the failure comes with the piece holding the
//! first byte that cannot continue a valid sequence.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::ws::{encode_close, parse_close_payload, CloseError, Utf8Stream};

fuzz_target!(|data: &[u8]| {
    let parsed = parse_close_payload(data);
    let want = match data {
        [] => Ok(None),
        [_] => Err(CloseError::InvalidCloseCode),
        [hi, lo, reason @ ..] => match u16::from_be_bytes([*hi, *lo]) {
            c @ (1000..=1003 | 1007..=1014 | 3000..=4999) => match std::str::from_utf8(reason) {
                Ok(r) => Ok(Some((c, r))),
                Err(_) => Err(CloseError::InvalidReasonUtf8),
            },
            _ => Err(CloseError::InvalidCloseCode),
        },
    };
    assert_eq!(parsed, want);
    if let Ok(Some((code, reason))) = parsed {
        let mut out = Vec::new();
        encode_close(code, reason, &mut out);
        assert_eq!(usize::from(out[1]), out.len() - 2);
        let (c, r) = parse_close_payload(&out[2..]).unwrap().unwrap();
        assert!(out.len() <= 2 + 125 && c == code && reason.starts_with(r));
        assert!(
            reason.len() <= 123 || r.len() + 4 > 123,
            "truncated too much"
        );
        if reason.len() <= 123 {
            assert_eq!(r, reason);
        }
    }

    let Some((&seed, bytes)) = data.split_first() else {
        return;
    };
    // The byte at which std reports the first error: a byte that cannot lead
    // fails where it stands, otherwise the first one that cannot continue.
    let whole = std::str::from_utf8(bytes);
    let fails_at = whole.as_ref().err().and_then(|e| {
        let lead = bytes[e.valid_up_to()];
        e.error_len().map(|n| {
            if matches!(lead, 0xC2..=0xF4) {
                e.valid_up_to() + n
            } else {
                e.valid_up_to()
            }
        })
    });
    let mut stream = Utf8Stream::default();
    let (mut at, mut state, mut failed_in) = (0, u32::from(seed) | 1, None);
    while at < bytes.len() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let end = (at + (state >> 16) as usize % 9).min(bytes.len());
        if stream.feed(&bytes[at..end]).is_err() {
            failed_in = Some(at..end);
            break;
        }
        at = end;
    }
    match (fails_at, failed_in) {
        (None, None) => assert_eq!(stream.finish().is_ok(), whole.is_ok()),
        (Some(i), Some(piece)) => assert!(piece.contains(&i), "failed in {piece:?}, std at {i}"),
        (want, got) => panic!("std fails at {want:?}, stream in {got:?}"),
    }
});
