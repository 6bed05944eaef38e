//! permessage-deflate (RFC 7692), sans-IO: choosing what to answer to a
//! client's `Sec-WebSocket-Extensions` offers, and compressing and
//! decompressing one message with a context the caller keeps and reuses
//! (one per core, never one per connection).
//!
//! The gateway's choice is the one that lets a message be compressed once
//! and its bytes sent to every subscriber: it always answers
//! `server_no_context_takeover` (each message is compressed on its own, so
//! the same compressed bytes are right for every connection) and
//! `client_no_context_takeover` (§7.1.1.2 lets a server ask it whether or
//! not it was offered; each client message is then decompressed on its
//! own, so an idle connection keeps no inflate state).
//!
//! A client may limit the window the server compresses with
//! (`server_max_window_bits`, §7.1.2.1). The answer must then name a value
//! no larger than the offer's. Offers of 9 to 14 bits are answered with 9:
//! a message compressed with a 512-byte window is valid for every window
//! from 512 bytes up, so one compression per message serves all of those
//! clients ([`Window::Small`]) and every other client shares the 32 KiB
//! one ([`Window::Full`]). An offer of 8 is declined and the next one
//! considered: zlib cannot compress with a 256-byte window, and the answer
//! may not say more than 8. So is an offer that is malformed.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in the header.
pub const EXTENSION: &str = "permessage-deflate";
/// What every compressed message ends with before its last four bytes are
/// removed (RFC 7692 §7.2.1), and what the receiver appends again.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The LZ77 window the server compresses a connection's messages with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// 32 KiB (15 bits): every client that did not limit it.
    Full,
    /// 512 bytes (9 bits): clients that asked for 9 to 14 bits.
    Small,
}

impl Window {
    pub fn bits(self) -> u8 {
        match self {
            Window::Full => 15,
            Window::Small => 9,
        }
    }
}

/// What was agreed: both sides compress every message on its own, the
/// server with `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    pub window: Window,
    /// The offer named `server_max_window_bits`: the answer names it too
    /// (§7.1.2.1: that is how the server accepts it).
    name_window: bool,
}

impl Agreement {
    /// The response header line, CRLF included. `client_max_window_bits`
    /// is never named: the gateway decompresses any window, and naming it
    /// would only limit the client.
    pub fn response_line(&self) -> &'static str {
        match (self.name_window, self.window) {
            (false, _) => {
                "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
                 client_no_context_takeover\r\n"
            }
            (true, Window::Full) => {
                "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
                 client_no_context_takeover; server_max_window_bits=15\r\n"
            }
            (true, Window::Small) => {
                "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
                 client_no_context_takeover; server_max_window_bits=9\r\n"
            }
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
        window: Window::Full,
        name_window: false,
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
                agreement.name_window = true;
                agreement.window = match window_bits(v)? {
                    15 => Window::Full,
                    9..=14 => Window::Small,
                    _ => return None,
                };
            }
            // The client can take a limit on its own window (value: its
            // own largest). None is set: any window decompresses.
            ("client_max_window_bits", v) => {
                if let Some(v) = v {
                    window_bits(v)?;
                }
            }
            _ => return None,
        }
        seen.push(name);
    }
    Some(agreement)
}

/// A window size parameter: 8 to 15, digits only, without leading zeroes
/// (§7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty()
        || value.len() > 2
        || value.starts_with('0')
        || !value.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let n: u8 = value.parse().ok()?;
    (8..=15).contains(&n).then_some(n)
}

/// Compression contexts, one per window, made on first use and reset for
/// every message (a context is about 270 KiB with a 32 KiB window: one per
/// core, never one per connection).
#[derive(Default)]
pub struct Deflater {
    full: Option<Compress>,
    small: Option<Compress>,
}

impl Deflater {
    /// Appends `payload` compressed on its own (no context taken over)
    /// with `window` to `out`: raw DEFLATE ending in a sync flush, its last
    /// four bytes (`00 00 ff ff`) removed.
    pub fn compress(&mut self, payload: &[u8], window: Window, out: &mut Vec<u8>) {
        let slot = match window {
            Window::Full => &mut self.full,
            Window::Small => &mut self.small,
        };
        let deflate = slot.get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::default(), false, window.bits())
        });
        deflate.reset();
        let start = out.len();
        out.reserve(payload.len() / 2 + 64);
        loop {
            let read = deflate.total_in() as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(64));
            }
            // A Vec with room never makes the compressor fail.
            let _ = deflate.compress_vec(&payload[read..], out, FlushCompress::Sync);
            // zlib's rule: the flush is complete once all the input is in
            // and the output was not filled.
            if deflate.total_in() as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
        }
        debug_assert!(out[start..].ends_with(&TAIL));
        out.truncate(out.len() - TAIL.len());
    }
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater")
            .field("full", &self.full.is_some())
            .field("small", &self.small.is_some())
            .finish()
    }
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

/// What a decompressed message's buffer may keep between messages; a
/// larger one is freed after use, so one big message does not hold its
/// size on the core for good.
const INFLATED_KEEP_BYTES: usize = 64 * 1024;

/// A decompression context and the buffer messages are decompressed into,
/// both reused from message to message (one per core).
#[derive(Default)]
pub struct Inflater {
    inflate: Option<Decompress>,
    out: Vec<u8>,
}

impl Inflater {
    /// A client message decompressed on its own, refused past `max_bytes`
    /// (checked as it grows, so a small message cannot make the gateway
    /// allocate more than the limit). The bytes are valid until the next
    /// call.
    pub fn inflate(&mut self, compressed: &[u8], max_bytes: usize) -> Result<&[u8], InflateError> {
        if self.out.capacity() > INFLATED_KEEP_BYTES {
            self.out = Vec::new();
        }
        self.out.clear();
        let inflate = self.inflate.get_or_insert_with(|| Decompress::new(false));
        inflate.reset(false);
        let out = &mut self.out;
        for input in [compressed, &TAIL[..]] {
            let mut at = 0;
            loop {
                if out.len() == out.capacity() {
                    // Room for one byte past the limit, to see it crossed.
                    let room = (max_bytes.saturating_add(1) - out.len()).min(out.len().max(4096));
                    out.reserve_exact(room);
                }
                let (in_before, out_before) = (inflate.total_in(), out.len());
                let status = inflate
                    .decompress_vec(&input[at..], out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                let read = (inflate.total_in() - in_before) as usize;
                at += read;
                if out.len() > max_bytes {
                    return Err(InflateError::TooLarge);
                }
                if status == Status::StreamEnd {
                    return Ok(&self.out);
                }
                if at == input.len() && out.len() < out.capacity() {
                    break;
                }
                if read == 0 && out.len() == out_before {
                    return Err(InflateError::Corrupt);
                }
            }
        }
        Ok(&self.out)
    }
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("buffer_bytes", &self.out.capacity())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn compress(payload: &[u8], window: Window) -> Vec<u8> {
        let mut out = Vec::new();
        Deflater::default().compress(payload, window, &mut out);
        out
    }

    fn decompress(compressed: &[u8], max_bytes: usize) -> Result<Vec<u8>, InflateError> {
        Inflater::default()
            .inflate(compressed, max_bytes)
            .map(<[u8]>::to_vec)
    }

    const PLAIN: Agreement = Agreement {
        window: Window::Full,
        name_window: false,
    };

    #[test]
    fn the_first_offer_the_gateway_can_keep_is_taken() {
        assert_eq!(negotiate(["permessage-deflate"]), Some(PLAIN));
        // Chrome's and Firefox's offer: the client's own window is left
        // as it is.
        assert_eq!(
            negotiate(["permessage-deflate; client_max_window_bits"]),
            Some(PLAIN)
        );
        assert_eq!(
            negotiate(["permessage-deflate; client_max_window_bits=10"]),
            Some(PLAIN)
        );
        // 256 bytes cannot be kept: the next offer is.
        assert_eq!(
            negotiate([
                "permessage-deflate; server_max_window_bits=8, permessage-deflate; \
                 server_no_context_takeover"
            ]),
            Some(PLAIN)
        );
        assert_eq!(
            negotiate([
                "x-webkit-deflate-frame",
                "permessage-deflate; SERVER_MAX_WINDOW_BITS=\"15\""
            ]),
            Some(Agreement {
                window: Window::Full,
                name_window: true
            }),
            "names are case-insensitive, values may be quoted, headers are joined"
        );
        for bits in 9..=14 {
            let offer = format!("permessage-deflate; server_max_window_bits={bits}");
            assert_eq!(
                negotiate([offer.as_str()]),
                Some(Agreement {
                    window: Window::Small,
                    name_window: true
                }),
                "{offer}"
            );
        }
        for declined in [
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=09",
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
    fn the_answer_asks_for_no_context_on_either_side_and_names_a_window_asked_for() {
        assert_eq!(
            PLAIN.response_line(),
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
             client_no_context_takeover\r\n"
        );
        let small = negotiate(["permessage-deflate; server_max_window_bits=12"]).unwrap();
        assert!(small
            .response_line()
            .ends_with("client_no_context_takeover; server_max_window_bits=9\r\n"));
        let full = negotiate(["permessage-deflate; server_max_window_bits=15"]).unwrap();
        assert!(full
            .response_line()
            .ends_with("client_no_context_takeover; server_max_window_bits=15\r\n"));
    }

    #[test]
    fn rfc_7692_s7_2_3_1_hello_compresses_and_decompresses_as_the_rfc_shows() {
        // The RFC's example of a message compressed without context.
        let rfc = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(decompress(&rfc, 100), Ok(b"Hello".to_vec()));
        assert_eq!(
            decompress(&compress(b"Hello", Window::Full), 100),
            Ok(b"Hello".to_vec())
        );
        // §7.2.3.5: a message ending in a final block (BFINAL set) and
        // one whose block is stored (§7.2.3.3).
        let bfinal = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        assert_eq!(decompress(&bfinal, 100), Ok(b"Hello".to_vec()));
        let stored = [
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        assert_eq!(decompress(&stored, 100), Ok(b"Hello".to_vec()));
        assert_eq!(decompress(&compress(b"", Window::Full), 0), Ok(Vec::new()));
    }

    #[test]
    fn a_bomb_is_refused_at_the_limit_and_garbage_is_corrupt() {
        let big = vec![b'a'; 1 << 20];
        let small = compress(&big, Window::Full);
        assert!(small.len() < 4096, "{}", small.len());
        assert_eq!(decompress(&small, 64 * 1024), Err(InflateError::TooLarge));
        assert_eq!(decompress(&small, 1 << 20), Ok(big));
        assert_eq!(
            decompress(&[0xff, 0xff, 0xff], 1024),
            Err(InflateError::Corrupt)
        );
    }

    #[test]
    fn one_inflater_serves_message_after_message_and_lets_a_big_buffer_go() {
        let mut inflater = Inflater::default();
        let mut deflater = Deflater::default();
        let big = vec![b'x'; 1 << 20];
        for payload in [&b"first"[..], &big, b"third"] {
            let mut c = Vec::new();
            deflater.compress(payload, Window::Full, &mut c);
            assert_eq!(inflater.inflate(&c, 1 << 20), Ok(payload));
        }
        assert!(inflater.out.capacity() <= INFLATED_KEEP_BYTES);
        // What the client was told not to do: a message that refers to
        // the one before (context taken over) does not decompress alone.
        let mut stream = Compress::new(Compression::default(), false);
        let mut second = Vec::with_capacity(1024);
        for part in [&b"a sentence said twice. "[..], b"a sentence said twice. "] {
            second.clear();
            stream
                .compress_vec(part, &mut second, FlushCompress::Sync)
                .unwrap();
        }
        second.truncate(second.len() - TAIL.len());
        assert_eq!(inflater.inflate(&second, 1024), Err(InflateError::Corrupt));
    }

    #[test]
    fn a_small_window_never_reaches_further_back_than_it_may() {
        // Text that repeats with a period of 4,000 bytes: the 32 KiB window
        // finds the repeats, the 512-byte one cannot, and a decoder
        // limited to 512 bytes decompresses what it makes.
        let mut x = 1u32;
        let period: Vec<u8> = (0..4000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect();
        let text: Vec<u8> = period.iter().cycle().take(40_000).copied().collect();
        let full = compress(&text, Window::Full);
        let small = compress(&text, Window::Small);
        assert!(
            full.len() * 4 < small.len(),
            "{} {}",
            full.len(),
            small.len()
        );
        let mut narrow = Decompress::new_with_window_bits(false, 9);
        let mut out = Vec::with_capacity(text.len() + 1);
        let mut input = small.clone();
        input.extend_from_slice(&TAIL);
        narrow
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        assert!(out == text);
    }

    proptest! {
        #[test]
        fn every_message_comes_back_as_it_was(
            payload in proptest::collection::vec(any::<u8>(), 1..4096),
            small in any::<bool>(),
        ) {
            let window = if small { Window::Small } else { Window::Full };
            let c = compress(&payload, window);
            prop_assert_eq!(decompress(&c, payload.len()), Ok(payload.clone()));
            if payload.len() > 1 {
                prop_assert_eq!(decompress(&c, payload.len() - 1), Err(InflateError::TooLarge));
            }
        }
    }
}
