//! permessage-deflate (RFC 7692), sans-IO: choosing what to answer to a
//! client's `Sec-WebSocket-Extensions` offers, and compressing and
//! decompressing one message.
//!
//! The gateway's choice is the one that lets a message be compressed once
//! and its bytes sent to every subscriber: it always answers
//! `server_no_context_takeover` (each message is compressed on its own, so
//! the same compressed bytes are right for every connection) and
//! `client_no_context_takeover` (RFC 7692 §7.1.1.1 lets a server ask it
//! whether or not it was offered; each client message is then decompressed
//! on its own, so an idle connection keeps no inflate state). An offer the
//! gateway cannot keep is declined and the next one considered: one that
//! limits the server's window below 15 bits (the compressor here always
//! uses 32 KiB), or that is malformed.
//!
//! Not wired into the gateway yet: the WebSocket session (RSV1 on a
//! compressed message) and fan-out (the compressed frame, once per message)
//! come next.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in the header.
pub const EXTENSION: &str = "permessage-deflate";
/// What every compressed message ends with before its last four bytes are
/// removed (RFC 7692 §7.2.1), and what the receiver appends again.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// The window the compressor uses (bits): offers that allow the server less
/// are declined.
const SERVER_WINDOW_BITS: u8 = 15;

/// What was agreed: the response line's parameters. Both sides compress
/// every message on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The client offered `client_max_window_bits`: the answer may name it
    /// (the gateway decompresses any window, so it names 15, which changes
    /// nothing for the client and tells a strict client it was understood).
    pub client_max_window_bits: bool,
}

impl Agreement {
    /// The response header line, CRLF included.
    pub fn response_line(&self) -> &'static str {
        if self.client_max_window_bits {
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
             client_no_context_takeover; client_max_window_bits=15\r\n"
        } else {
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
             client_no_context_takeover\r\n"
        }
    }
}

/// The first acceptable permessage-deflate offer among the values of a
/// request's `Sec-WebSocket-Extensions` headers (each a comma-separated
/// list of offers), in the client's order of preference; None when there
/// is none (no compression: the connection goes on without it).
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Agreement> {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .find_map(accept_offer)
}

/// One offer: `permessage-deflate; param[=value]; ...`. None when it is
/// another extension, malformed, or one the gateway cannot keep.
fn accept_offer(offer: &str) -> Option<Agreement> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut agreement = Agreement {
        client_max_window_bits: false,
    };
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        // §7: a parameter given twice makes the offer invalid.
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            // The client lets the server use at most 2^n bytes of window.
            ("server_max_window_bits", Some(v)) => {
                if window_bits(v)? < SERVER_WINDOW_BITS {
                    return None;
                }
            }
            // The client can take a limit on its own window (value: its
            // own largest).
            ("client_max_window_bits", v) => {
                if let Some(v) = v {
                    window_bits(v)?;
                }
                agreement.client_max_window_bits = true;
            }
            _ => return None,
        }
        seen.push(name);
    }
    Some(agreement)
}

/// A window size parameter: 8 to 15, digits only (§7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.len() > 2 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u8 = value.parse().ok()?;
    (8..=15).contains(&n).then_some(n)
}

/// One message compressed on its own (no context taken over): raw DEFLATE
/// ending in a sync flush, its last four bytes (`00 00 ff ff`) removed.
pub fn compress(payload: &[u8]) -> Vec<u8> {
    let mut deflate = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    loop {
        let read = deflate.total_in() as usize;
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(64));
        }
        // A Vec with room never makes the compressor fail.
        let _ = deflate.compress_vec(&payload[read..], &mut out, FlushCompress::Sync);
        if deflate.total_in() as usize == payload.len() && out.ends_with(&TAIL) {
            break;
        }
    }
    out.truncate(out.len() - TAIL.len());
    out
}

/// Why a compressed client message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It decompresses to more than the message limit (1009).
    TooLarge,
    /// It is not valid DEFLATE data (1007: the payload does not decode as
    /// the extension says).
    Corrupt,
}

/// A client message decompressed on its own, refused past `max_bytes`
/// (checked as it grows, so a small message cannot make the gateway
/// allocate more than the limit).
pub fn decompress(compressed: &[u8], max_bytes: usize) -> Result<Vec<u8>, InflateError> {
    let mut inflate = Decompress::new(false);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    for input in [compressed, &TAIL[..]] {
        let mut at = 0;
        loop {
            let (in_before, out_before) = (inflate.total_in(), inflate.total_out());
            let status = inflate
                .decompress(&input[at..], &mut buf, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            let read = (inflate.total_in() - in_before) as usize;
            let written = (inflate.total_out() - out_before) as usize;
            at += read;
            if out.len() + written > max_bytes {
                return Err(InflateError::TooLarge);
            }
            out.extend_from_slice(&buf[..written]);
            if status == Status::StreamEnd {
                return Ok(out);
            }
            if at == input.len() && written < buf.len() {
                break;
            }
            if read == 0 && written == 0 {
                return Err(InflateError::Corrupt);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_first_offer_the_gateway_can_keep_is_taken() {
        let plain = Agreement {
            client_max_window_bits: false,
        };
        assert_eq!(negotiate(["permessage-deflate"]), Some(plain));
        // Chrome's and Firefox's offer.
        assert_eq!(
            negotiate(["permessage-deflate; client_max_window_bits"]),
            Some(Agreement {
                client_max_window_bits: true
            })
        );
        // A smaller server window cannot be kept: the next offer is.
        assert_eq!(
            negotiate([
                "permessage-deflate; server_max_window_bits=10, permessage-deflate; \
                 server_no_context_takeover"
            ]),
            Some(plain)
        );
        assert_eq!(
            negotiate([
                "x-webkit-deflate-frame",
                "permessage-deflate; SERVER_MAX_WINDOW_BITS=\"15\""
            ]),
            Some(plain),
            "names are case-insensitive, values may be quoted, headers are joined"
        );
        for declined in [
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown",
            "deflate-stream",
            "",
        ] {
            assert_eq!(negotiate([declined]), None, "{declined:?}");
        }
        assert_eq!(negotiate(std::iter::empty()), None);
    }

    #[test]
    fn the_answer_asks_for_no_context_on_either_side() {
        let line = Agreement {
            client_max_window_bits: false,
        }
        .response_line();
        assert_eq!(
            line,
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
             client_no_context_takeover\r\n"
        );
    }

    #[test]
    fn rfc_7692_s7_2_3_1_hello_compresses_and_decompresses_as_the_rfc_shows() {
        // The RFC's example of a message compressed without context.
        let rfc = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(decompress(&rfc, 100), Ok(b"Hello".to_vec()));
        assert_eq!(decompress(&compress(b"Hello"), 100), Ok(b"Hello".to_vec()));
    }

    #[test]
    fn a_bomb_is_refused_at_the_limit_and_garbage_is_corrupt() {
        let big = vec![b'a'; 1 << 20];
        let small = compress(&big);
        assert!(small.len() < 4096, "{}", small.len());
        assert_eq!(decompress(&small, 64 * 1024), Err(InflateError::TooLarge));
        assert_eq!(decompress(&small, 1 << 20), Ok(big));
        assert_eq!(
            decompress(&[0xff, 0xff, 0xff], 1024),
            Err(InflateError::Corrupt)
        );
    }

    proptest! {
        #[test]
        fn every_message_comes_back_as_it_was(payload in proptest::collection::vec(any::<u8>(), 1..4096)) {
            let c = compress(&payload);
            prop_assert!(!c.ends_with(&TAIL));
            prop_assert_eq!(decompress(&c, payload.len()), Ok(payload.clone()));
            if payload.len() > 1 {
                prop_assert_eq!(decompress(&c, payload.len() - 1), Err(InflateError::TooLarge));
            }
        }
    }
}
