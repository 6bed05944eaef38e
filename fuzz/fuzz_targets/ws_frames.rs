//! `ws::FrameDecoder::decode` on any bytes: the first byte picks the message
//! size limit and a chunk size, the rest is the stream. Checks the calling
//! contract (consumed ≤ input, payload ranges inside the slice, event order,
//! payload total = header length, control/continuation/size rules, payload =
//! the wire bytes unmasked with the key before them) and that the whole stream
//! and the chunked stream decode to the same frames and the same error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::ws::{FrameDecoder, FrameError, FrameEvent, FrameHeader, OpCode};

const LIMITS: [u64; 8] = [0, 1, 10, 125, 126, 65_535, 65_536, u64::MAX];

type Frames = Vec<(FrameHeader, Vec<u8>)>;

/// The header as the decoder reported it matches the wire bytes: FIN, opcode,
/// MASK set, a 7/16/64-bit length, then the 4-byte key.
fn check_header(head: &[u8], h: FrameHeader) {
    let opcode = match h.opcode {
        OpCode::Continuation => 0x0,
        OpCode::Text => 0x1,
        OpCode::Binary => 0x2,
        OpCode::Close => 0x8,
        OpCode::Ping => 0x9,
        OpCode::Pong => 0xA,
    };
    assert_eq!(head[0], u8::from(h.fin) << 7 | opcode, "{head:02x?}");
    assert!(head[1] & 0x80 != 0, "unmasked");
    let (len, size) = match head[1] & 0x7F {
        126 => (u64::from(u16::from_be_bytes([head[2], head[3]])), 8),
        127 => (u64::from_be_bytes(head[2..10].try_into().unwrap()), 14),
        n => (u64::from(n), 6),
    };
    assert_eq!((head.len(), len), (size, h.payload_len), "{head:02x?}");
}

fn decode(max: u64, stream: &[u8], chunk: usize) -> (Frames, Option<FrameError>) {
    let mut dec = FrameDecoder::new(max);
    let mut input = stream.to_vec();
    let mut frames = Vec::new();
    // The frame being received and where its payload starts in `stream`.
    let mut current: Option<(FrameHeader, usize, Vec<u8>)> = None;
    let mut in_message = false;
    let mut message_bytes = 0u64;
    let mut pos = 0; // offset in `stream` of piece[at]
    let mut frame_start = 0; // offset in `stream` of the current frame's header
    for piece in input.chunks_mut(chunk) {
        let mut at = 0;
        loop {
            let len = piece.len() - at;
            let (n, event) = match dec.decode(&mut piece[at..]) {
                Ok(step) => step,
                Err(e) => return (frames, Some(e)),
            };
            assert!(n <= len, "consumed {n} of {len}");
            match event {
                None if n == 0 => break,
                None => {}
                Some(FrameEvent::Header(h)) => {
                    assert!(current.is_none(), "header inside a frame");
                    assert!(h.payload_len >> 63 == 0);
                    match h.opcode {
                        OpCode::Close | OpCode::Ping | OpCode::Pong => {
                            assert!(h.fin && h.payload_len <= 125)
                        }
                        OpCode::Continuation => {
                            assert!(in_message);
                            message_bytes = message_bytes.saturating_add(h.payload_len);
                        }
                        OpCode::Text | OpCode::Binary => {
                            assert!(!in_message);
                            message_bytes = h.payload_len;
                        }
                    }
                    assert!(message_bytes <= max);
                    check_header(&stream[frame_start..pos + n], h);
                    current = Some((h, pos + n, Vec::new()));
                }
                Some(FrameEvent::Payload(r)) => {
                    assert!(r.start <= r.end && r.end <= n, "{r:?} of {n}/{len}");
                    let (h, start, payload) = current.as_mut().expect("payload outside a frame");
                    // Contiguous with the header and what came before.
                    assert_eq!(*start + payload.len(), pos + r.start);
                    payload.extend_from_slice(&piece[at..][r]);
                    assert!(payload.len() as u64 <= h.payload_len);
                }
                Some(FrameEvent::FrameEnd) => {
                    assert_eq!(n, 0);
                    let (h, start, payload) = current.take().expect("frame end outside a frame");
                    assert_eq!(payload.len() as u64, h.payload_len);
                    let key = &stream[start - 4..start];
                    for (i, b) in payload.iter().enumerate() {
                        assert_eq!(*b, stream[start + i] ^ key[i % 4], "unmasking at {i}");
                    }
                    if !matches!(h.opcode, OpCode::Close | OpCode::Ping | OpCode::Pong) {
                        in_message = !h.fin;
                    }
                    frame_start = start + payload.len();
                    frames.push((h, payload));
                }
            }
            at += n;
            pos += n;
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&b0, stream)) = data.split_first() else {
        return;
    };
    let max = LIMITS[usize::from(b0 & 7)];
    let chunk = 1 + usize::from(b0 >> 3);
    let whole = decode(max, stream, stream.len().max(1));
    let chunked = decode(max, stream, chunk);
    assert_eq!(whole, chunked, "chunk {chunk}");
});
