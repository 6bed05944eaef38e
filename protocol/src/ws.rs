//! RFC 6455 on the server side: the opening handshake, a streaming frame
//! decoder and a frame encoder that writes into the caller's buffer; with
//! permessage-deflate (RFC 7692, see [`crate::deflate`]) negotiated, the
//! compressed messages of either direction.

use base64::Engine as _;
use sha1::{Digest, Sha1};

use crate::deflate::{Agreement, Deflater, InflateError, Inflater, Window};
use crate::limits::{WS_CONTROL_PAYLOAD_BYTES_MAX, WS_SERVER_HEAD_BYTES_MAX};

/// RSV1 of a frame's first byte: with permessage-deflate, set on the first
/// frame of a compressed message (RFC 7692 §6).
const RSV1: u8 = 0x40;

/// Opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// The opcode nibble of the first header byte.
    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    fn from_bits(bits: u8) -> Option<OpCode> {
        match bits {
            0x0 => Some(OpCode::Continuation),
            0x1 => Some(OpCode::Text),
            0x2 => Some(OpCode::Binary),
            0x8 => Some(OpCode::Close),
            0x9 => Some(OpCode::Ping),
            0xA => Some(OpCode::Pong),
            _ => None,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Close codes the gateway sends (RFC 6455 §7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const SERVICE_RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// RFC 6455 §1.3: appended to the client's key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(sha1(key + GUID)).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

/// The `101 Switching Protocols` response head for an accept value, the
/// chosen subprotocol, if any, and the permessage-deflate agreement, if
/// one was reached.
pub fn switching_protocols_response(
    accept: &str,
    protocol: Option<&str>,
    deflate: Option<Agreement>,
) -> Vec<u8> {
    let protocol = match protocol {
        Some(p) => format!("Sec-WebSocket-Protocol: {p}\r\n"),
        None => String::new(),
    };
    let extension = deflate.map_or("", |a| a.response_line());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\
         {protocol}{extension}\r\n"
    )
    .into_bytes()
}

/// RFC 6455 §4.2.2: the subprotocol a server answers with, from the
/// client's `Sec-WebSocket-Protocol` values (each a comma-separated list,
/// in the client's order of preference): the first offered that `ours`
/// holds, compared exactly (names are case-sensitive). `None` when none
/// matches or none was offered: the response then carries no
/// `Sec-WebSocket-Protocol`, and a client that insists on one closes.
pub fn choose_subprotocol<'v>(
    offered: impl Iterator<Item = &'v [u8]>,
    ours: &'static [String],
) -> Option<&'static str> {
    if ours.is_empty() {
        return None;
    }
    offered
        .flat_map(|value| value.split(|&b| b == b','))
        .map(|name| name.trim_ascii())
        .find_map(|name| ours.iter().find(|o| o.as_bytes() == name))
        .map(String::as_str)
}

/// Whether `name` can be a subprotocol: an RFC 9110 token (what the header
/// can carry).
pub fn valid_subprotocol(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A frame header as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1: the first frame of a compressed message (only ever set when
    /// permessage-deflate was negotiated; refused otherwise).
    pub compressed: bool,
    pub opcode: OpCode,
    pub payload_len: u64,
}

/// What the decoder found in the input it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEvent {
    /// A complete, valid frame header.
    Header(FrameHeader),
    /// Payload bytes of the current frame, already unmasked in place, at
    /// `input[range]` of the slice passed to [`FrameDecoder::decode`].
    Payload(core::ops::Range<usize>),
    /// The current frame's payload is complete (emitted for empty payloads too).
    FrameEnd,
}

/// Why a client's frames were refused; each maps to a close code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// RSV1–3 set without an extension that defines them. 1002
    ReservedBitsSet,
    /// RSV1 (compressed) on a control frame or a continuation: with
    /// permessage-deflate it marks a data message's first frame only
    /// (RFC 7692 §6.1). 1002
    CompressedControlOrContinuation,
    /// Opcode 3–7 or 0xB–0xF. 1002
    ReservedOpcode,
    /// Client frames must be masked (§5.1). 1002
    UnmaskedFrameFromClient,
    /// Control frame payload over 125 bytes. 1002
    ControlFrameTooLong,
    /// Control frame with FIN clear. 1002
    FragmentedControlFrame,
    /// 64-bit length with the most significant bit set. 1002
    InvalidLength,
    /// Continuation frame without a message in progress. 1002
    UnexpectedContinuation,
    /// Text/binary frame while a fragmented message is in progress. 1002
    ExpectedContinuation,
    /// The message (all fragments) is over the limit. 1009
    MessageTooBig { size: u64, max_size: u64 },
}

impl FrameError {
    /// The close code to send for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::MessageTooBig { .. } => close_code::MESSAGE_TOO_BIG,
            FrameError::ReservedBitsSet
            | FrameError::CompressedControlOrContinuation
            | FrameError::ReservedOpcode
            | FrameError::UnmaskedFrameFromClient
            | FrameError::ControlFrameTooLong
            | FrameError::FragmentedControlFrame
            | FrameError::InvalidLength
            | FrameError::UnexpectedContinuation
            | FrameError::ExpectedContinuation => close_code::PROTOCOL_ERROR,
        }
    }
}

/// Longest client frame header: 2 + 8 (64-bit length) + 4 (mask key).
const CLIENT_HEAD_BYTES_MAX: usize = 14;

/// Where the decoder is within the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting header bytes into `head`.
    Head,
    /// Inside the payload: `remaining` bytes to go.
    Payload,
    /// The payload is complete; `FrameEnd` is still to be reported.
    End,
}

/// Streaming decoder of client frames. Feed it any chunking of the byte
/// stream, down to one byte at a time. It keeps at most a partial frame header
/// (≤ 14 bytes) and the unmasking position; payload is never buffered here —
/// it is unmasked in place in the caller's buffer and reported by range.
/// It also tracks fragmentation (continuation rules) and the message size.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    message_bytes_max: u64,
    /// Payload bytes of the current frame not yet reported.
    remaining: u64,
    /// Bytes of the fragmented message in progress received so far (announced
    /// by headers), for the size limit across fragments.
    message_bytes: u64,
    /// The header being collected; only `head[..head_len]` is meaningful.
    head: [u8; CLIENT_HEAD_BYTES_MAX],
    head_len: u8,
    /// The current frame's masking key, and the position in it of the next
    /// payload byte (0..4) — kept so a payload split across calls unmasks right.
    mask: [u8; 4],
    mask_pos: u8,
    state: State,
    /// A Text/Binary frame without FIN was received and its final
    /// continuation has not been yet.
    in_message: bool,
    /// permessage-deflate was negotiated: RSV1 may start a message.
    deflate: bool,
}

const _: () = assert!(core::mem::size_of::<FrameDecoder>() <= 48);

impl FrameDecoder {
    pub fn new(message_bytes_max: u64) -> Self {
        FrameDecoder {
            message_bytes_max,
            remaining: 0,
            message_bytes: 0,
            head: [0; CLIENT_HEAD_BYTES_MAX],
            head_len: 0,
            mask: [0; 4],
            mask_pos: 0,
            state: State::Head,
            in_message: false,
            deflate: false,
        }
    }

    /// permessage-deflate was negotiated: a data message's first frame may
    /// have RSV1 set.
    pub fn accept_compressed(&mut self) {
        self.deflate = true;
    }

    /// Decodes from the start of `input`. Returns how many bytes were consumed
    /// and at most one event; call again with `&mut input[consumed..]` until it
    /// consumes nothing and returns no event. Payload ranges refer to the slice
    /// passed in this call. After an error the decoder must not be used again.
    pub fn decode(&mut self, input: &mut [u8]) -> Result<(usize, Option<FrameEvent>), FrameError> {
        match self.state {
            State::Head => self.decode_head(input),
            State::Payload => Ok(self.decode_payload(input)),
            State::End => {
                self.state = State::Head;
                Ok((0, Some(FrameEvent::FrameEnd)))
            }
        }
    }

    /// Collects header bytes; validates each part as soon as it is in, so a
    /// bad frame is refused without waiting for the rest of its header.
    fn decode_head(&mut self, input: &[u8]) -> Result<(usize, Option<FrameEvent>), FrameError> {
        let mut consumed = 0;
        loop {
            let have = usize::from(self.head_len);
            // Until the first two bytes are in, the header's length is unknown.
            let need = if have < 2 { 2 } else { self.head_size() };
            if have >= need {
                break;
            }
            let rest = input.get(consumed..).unwrap_or_default();
            let take = (need - have).min(rest.len());
            if take == 0 {
                // Out of input: keep what we have, ask for more.
                return Ok((consumed, None));
            }
            self.head[have..have + take].copy_from_slice(&rest[..take]);
            // `have + take <= need <= 14`, so this fits a u8.
            self.head_len = (have + take) as u8;
            consumed += take;
            self.validate_head()?;
        }

        let header = self.complete_head();
        Ok((consumed, Some(FrameEvent::Header(header))))
    }

    /// Header size once the first two bytes are known: 2, + 2 or 8 for an
    /// extended length, + 4 for the mask (always present: unmasked frames are
    /// refused as soon as the second byte is in).
    fn head_size(&self) -> usize {
        let ext = match self.head[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + 4
    }

    /// Offset of the mask key in the header (after the extended length).
    fn mask_offset(&self) -> usize {
        self.head_size() - 4
    }

    /// The payload length, once the extended length bytes (if any) are in.
    fn payload_len(&self) -> Option<u64> {
        let head = self.head.get(..usize::from(self.head_len))?;
        let len7 = *head.get(1)? & 0x7F;
        match (len7, head) {
            (0..=125, _) => Some(u64::from(len7)),
            (126, [_, _, a, b, ..]) => Some(u64::from(u16::from_be_bytes([*a, *b]))),
            (127, [_, _, a, b, c, d, e, f, g, h, ..]) => {
                Some(u64::from_be_bytes([*a, *b, *c, *d, *e, *f, *g, *h]))
            }
            _ => None,
        }
    }

    /// Checks everything the header bytes received so far can tell. Idempotent:
    /// it runs after every chunk of header bytes.
    fn validate_head(&self) -> Result<(), FrameError> {
        let [b0, b1, ..] = self.head;
        if self.head_len < 2 {
            return Ok(());
        }
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & RSV1 != 0;
        if b0 & 0x30 != 0 || (rsv1 && !self.deflate) {
            return Err(FrameError::ReservedBitsSet);
        }
        let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::ReservedOpcode)?;
        if rsv1 && !matches!(opcode, OpCode::Text | OpCode::Binary) {
            return Err(FrameError::CompressedControlOrContinuation);
        }
        if b1 & 0x80 == 0 {
            return Err(FrameError::UnmaskedFrameFromClient);
        }
        if opcode.is_control() {
            if !fin {
                return Err(FrameError::FragmentedControlFrame);
            }
            // 126 and 127 announce extended lengths, which are over 125 anyway.
            if usize::from(b1 & 0x7F) > WS_CONTROL_PAYLOAD_BYTES_MAX {
                return Err(FrameError::ControlFrameTooLong);
            }
        }
        match opcode {
            OpCode::Continuation if !self.in_message => {
                return Err(FrameError::UnexpectedContinuation)
            }
            OpCode::Text | OpCode::Binary if self.in_message => {
                return Err(FrameError::ExpectedContinuation)
            }
            _ => {}
        }

        let Some(len) = self.payload_len() else {
            return Ok(());
        };
        if len >> 63 != 0 {
            return Err(FrameError::InvalidLength);
        }
        // Control frames are bounded by their own 125-byte rule and do not
        // belong to the message they may interrupt.
        let size = match opcode {
            OpCode::Continuation => self.message_bytes.saturating_add(len),
            OpCode::Text | OpCode::Binary => len,
            OpCode::Close | OpCode::Ping | OpCode::Pong => return Ok(()),
        };
        if size > self.message_bytes_max {
            return Err(FrameError::MessageTooBig {
                size,
                max_size: self.message_bytes_max,
            });
        }
        Ok(())
    }

    /// Turns a complete, validated header into the frame state and resets the
    /// header buffer.
    fn complete_head(&mut self) -> FrameHeader {
        let fin = self.head[0] & 0x80 != 0;
        let compressed = self.head[0] & RSV1 != 0;
        // Both were validated in `validate_head`; the fallbacks are unreachable.
        let opcode = OpCode::from_bits(self.head[0] & 0x0F).unwrap_or(OpCode::Binary);
        let payload_len = self.payload_len().unwrap_or(0);
        let m = self.mask_offset();
        self.mask = [
            self.head[m],
            self.head[m + 1],
            self.head[m + 2],
            self.head[m + 3],
        ];
        self.mask_pos = 0;
        self.head_len = 0;

        match opcode {
            OpCode::Text | OpCode::Binary => {
                self.in_message = !fin;
                self.message_bytes = if fin { 0 } else { payload_len };
            }
            OpCode::Continuation => {
                self.in_message = !fin;
                self.message_bytes = if fin {
                    0
                } else {
                    self.message_bytes.saturating_add(payload_len)
                };
            }
            OpCode::Close | OpCode::Ping | OpCode::Pong => {}
        }

        self.remaining = payload_len;
        self.state = if payload_len == 0 {
            State::End
        } else {
            State::Payload
        };
        FrameHeader {
            fin,
            compressed,
            opcode,
            payload_len,
        }
    }

    /// Unmasks the next run of the current payload in place.
    fn decode_payload(&mut self, input: &mut [u8]) -> (usize, Option<FrameEvent>) {
        // `remaining` may exceed usize on 32-bit targets; then the input is the limit.
        let take = usize::try_from(self.remaining).map_or(input.len(), |r| r.min(input.len()));
        if take == 0 {
            return (0, None);
        }
        let payload = &mut input[..take];
        // Rotate the key so that index 0 lines up with the next payload byte.
        let mut mask = self.mask;
        mask.rotate_left(usize::from(self.mask_pos));
        let mut chunks = payload.chunks_exact_mut(4);
        for chunk in &mut chunks {
            for (byte, m) in chunk.iter_mut().zip(mask) {
                *byte ^= m;
            }
        }
        for (byte, m) in chunks.into_remainder().iter_mut().zip(mask) {
            *byte ^= m;
        }
        self.mask_pos = ((usize::from(self.mask_pos) + take) % 4) as u8;
        // `take <= remaining`, so this does not underflow.
        self.remaining -= take as u64;
        if self.remaining == 0 {
            self.state = State::End;
        }
        (take, Some(FrameEvent::Payload(0..take)))
    }
}

/// Writes a server frame header (never masked) into `head` and returns its
/// length (2, 4 or 10 bytes).
pub fn encode_frame_head(
    fin: bool,
    opcode: OpCode,
    payload_len: u64,
    head: &mut [u8; WS_SERVER_HEAD_BYTES_MAX],
) -> usize {
    head[0] = if fin { 0x80 } else { 0 } | opcode.bits();
    if payload_len <= 125 {
        head[1] = payload_len as u8;
        2
    } else if let Ok(len) = u16::try_from(payload_len) {
        head[1] = 126;
        head[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&payload_len.to_be_bytes());
        10
    }
}

/// Appends a whole unfragmented server frame to `out`.
pub fn encode_frame(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    let mut head = [0; WS_SERVER_HEAD_BYTES_MAX];
    let head_len = encode_frame_head(true, opcode, payload.len() as u64, &mut head);
    out.reserve(head_len + payload.len());
    out.extend_from_slice(&head[..head_len]);
    out.extend_from_slice(payload);
}

/// Appends a whole message as one frame compressed on its own with
/// `window` (RFC 7692: RSV1 set), even where that does not make it
/// smaller.
pub fn encode_compressed(
    opcode: OpCode,
    payload: &[u8],
    deflater: &mut Deflater,
    window: Window,
    out: &mut Vec<u8>,
) {
    let mut compressed = Vec::new();
    deflater.compress(payload, window, &mut compressed);
    encode_compressed_frame(opcode, &compressed, out);
}

/// Appends a frame of an already compressed message: RSV1 set.
fn encode_compressed_frame(opcode: OpCode, compressed: &[u8], out: &mut Vec<u8>) {
    let mut head = [0; WS_SERVER_HEAD_BYTES_MAX];
    let head_len = encode_frame_head(true, opcode, compressed.len() as u64, &mut head);
    head[0] |= RSV1;
    out.reserve(head_len + compressed.len());
    out.extend_from_slice(&head[..head_len]);
    out.extend_from_slice(compressed);
}

/// The opcode and payload of a whole unfragmented server frame as
/// [`encode_frame`] writes it; None for anything else.
fn server_frame(frame: &[u8]) -> Option<(OpCode, &[u8])> {
    let (&b0, &b1) = (frame.first()?, frame.get(1)?);
    if b0 & 0xF0 != 0x80 || b1 & 0x80 != 0 {
        return None;
    }
    let opcode = OpCode::from_bits(b0 & 0x0F)?;
    let head_len = match b1 {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    Some((opcode, frame.get(head_len..)?))
}

/// The message of `frame` (a whole unfragmented data frame, as
/// [`encode_frame`] writes it) as a connection that negotiated
/// permessage-deflate with `window` gets it: compressed on its own, RSV1
/// set. None when its payload is under `payload_bytes_min` (not worth the
/// work), when compressing would not make it smaller, or for a frame that
/// is not a whole data frame: the plain frame is the one to send then.
pub fn compress_frame(
    frame: &[u8],
    deflater: &mut Deflater,
    window: Window,
    payload_bytes_min: usize,
) -> Option<Vec<u8>> {
    let (opcode, payload) = server_frame(frame)?;
    if payload.len() < payload_bytes_min || !matches!(opcode, OpCode::Text | OpCode::Binary) {
        return None;
    }
    let mut compressed = Vec::with_capacity(payload.len() / 2 + 64);
    deflater.compress(payload, window, &mut compressed);
    if compressed.len() >= payload.len() {
        return None;
    }
    let mut out = Vec::with_capacity(compressed.len() + WS_SERVER_HEAD_BYTES_MAX);
    encode_compressed_frame(opcode, &compressed, &mut out);
    Some(out)
}

/// Appends a close frame with `code` and `reason` (reason truncated on a
/// char boundary so the payload stays ≤ 125 bytes).
pub fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    // 2 bytes of the 125 go to the code.
    let mut end = reason.len().min(WS_CONTROL_PAYLOAD_BYTES_MAX - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut head = [0; WS_SERVER_HEAD_BYTES_MAX];
    let head_len = encode_frame_head(true, OpCode::Close, 2 + reason.len() as u64, &mut head);
    out.reserve(head_len + 2 + reason.len());
    out.extend_from_slice(&head[..head_len]);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}

/// Parses a received close payload: empty → Ok(None); 1 byte → Err; code
/// outside the codes an endpoint may send (RFC 6455 §7.4: 1000–1003,
/// 1007–1011, plus the IANA-registered 1012–1014, and 3000–4999) → Err;
/// reason not UTF-8 → Err(1007 case). Returns (code, reason).
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<(u16, &str)>, CloseError> {
    let (code, reason) = match payload {
        [] => return Ok(None),
        [hi, lo, reason @ ..] => (u16::from_be_bytes([*hi, *lo]), reason),
        [_] => return Err(CloseError::InvalidCloseCode),
    };
    // 1004 is reserved; 1005, 1006 and 1015 must never be sent on the wire.
    if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
        return Err(CloseError::InvalidCloseCode);
    }
    let reason = core::str::from_utf8(reason).map_err(|_| CloseError::InvalidReasonUtf8)?;
    Ok(Some((code, reason)))
}

/// Why a close payload is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseError {
    /// One byte only, or a code that must not be sent. 1002
    InvalidCloseCode,
    /// Reason not UTF-8. 1007
    InvalidReasonUtf8,
}

/// A validator of UTF-8 that arrives in pieces: it fails on the first byte
/// that cannot start or continue a valid sequence (RFC 6455 §8.1 "fail
/// fast"), and keeps at most 3 bytes of a sequence split across pieces.
#[derive(Debug, Clone, Default)]
pub struct Utf8Stream {
    pending: [u8; 3],
    pending_len: u8,
}

/// The bytes are not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

impl Utf8Stream {
    /// Checks the next piece.
    pub fn feed(&mut self, mut piece: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            // Finish the split sequence first, from at most 3 more bytes.
            let have = self.pending_len as usize;
            let width = utf8_sequence_width(self.pending[0]);
            let take = (width - have).min(piece.len());
            let mut seq = [0u8; 4];
            seq[..have].copy_from_slice(&self.pending[..have]);
            seq[have..have + take].copy_from_slice(&piece[..take]);
            piece = &piece[take..];
            self.pending_len = 0;
            self.check_tail(&seq[..have + take])?;
            if self.pending_len > 0 {
                return Ok(());
            }
        }
        self.check_tail(piece)
    }

    /// Validates `bytes`, keeping an incomplete (but so far valid) last
    /// sequence for the next piece.
    fn check_tail(&mut self, bytes: &[u8]) -> Result<(), InvalidUtf8> {
        match core::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            // `error_len() == None`: the input ended inside a sequence that
            // is valid so far.
            Err(e) if e.error_len().is_none() => {
                let tail = &bytes[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// The message ended: a sequence still open is invalid.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let open = self.pending_len > 0;
        self.pending_len = 0;
        if open {
            Err(InvalidUtf8)
        } else {
            Ok(())
        }
    }
}

/// Length of the UTF-8 sequence a lead byte announces (1 for bytes that
/// cannot lead; the validator rejects those anyway).
fn utf8_sequence_width(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF7 => 4,
        _ => 1,
    }
}

/// A client's data message as the session hands it to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessagePart<'a> {
    /// A Text or Binary message begins; `compressed`: it came compressed
    /// (permessage-deflate), and its payload follows as one `Chunk`, whole
    /// and decompressed, once its last frame is in.
    Start { opcode: OpCode, compressed: bool },
    /// Payload bytes, in order (for Text, valid UTF-8 so far).
    Chunk(&'a [u8]),
    /// The message is complete (and, for Text, valid UTF-8 as a whole).
    End,
}

/// Why the session is ending. Once it is, the close frame is in the output
/// and the connection should close as soon as that is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// The client sent a close frame; the reply echoes its code.
    PeerClosed { code: Option<u16> },
    /// The client broke a rule of RFC 6455 or a limit; `code` was sent.
    Violation { code: u16, rule: &'static str },
}

/// The server side of an open WebSocket: frames in, message parts and
/// replies (pongs, close frames) out. Sans-IO: the caller reads and writes.
///
/// It enforces what the frame decoder cannot see: UTF-8 of text messages,
/// incrementally across fragments, and the rules of the close handshake.
/// With permessage-deflate negotiated it gathers a compressed message and
/// decompresses it once whole, with the caller's [`Inflater`] (no context
/// is kept between messages: the client was told
/// `client_no_context_takeover`), bounded by the message limit.
#[derive(Debug, Clone)]
pub struct ServerSession {
    decoder: FrameDecoder,
    /// Opcode and FIN of the frame being received.
    opcode: OpCode,
    fin: bool,
    /// The data message in progress is Text (its UTF-8 is being checked).
    text: bool,
    /// The data message in progress came compressed.
    compressed: bool,
    utf8: Utf8Stream,
    /// What a frame or message in flight keeps across reads (a control
    /// frame's payload, a compressed message's bytes). Allocated only
    /// while one is in flight, and one pointer otherwise.
    side: Option<Box<Side>>,
    closing: Option<Closing>,
}

/// Bytes of session state per WebSocket connection.
pub const SERVER_SESSION_BYTES_MAX: usize = 96;
const _: () = assert!(core::mem::size_of::<ServerSession>() <= SERVER_SESSION_BYTES_MAX);

impl ServerSession {
    pub fn new(message_bytes_max: u64) -> Self {
        ServerSession {
            decoder: FrameDecoder::new(message_bytes_max),
            opcode: OpCode::Binary,
            fin: true,
            text: false,
            compressed: false,
            utf8: Utf8Stream::default(),
            side: None,
            closing: None,
        }
    }

    /// permessage-deflate was negotiated: the client may send compressed
    /// messages.
    pub fn accept_compressed(&mut self) {
        self.decoder.accept_compressed();
    }

    /// Set once the session ends; further input is ignored.
    pub fn closing(&self) -> Option<Closing> {
        self.closing
    }

    /// Consumes bytes from the client (unmasking them in place). Replies
    /// are appended to `out`; message parts go to `on_message`; compressed
    /// messages are decompressed with `inflater` (only touched for one).
    /// Returns `Some` when the session has ended with this input.
    pub fn input(
        &mut self,
        buf: &mut [u8],
        out: &mut Vec<u8>,
        inflater: &mut Inflater,
        on_message: &mut impl FnMut(MessagePart<'_>, &mut Vec<u8>),
    ) -> Option<Closing> {
        let mut pos = 0;
        while self.closing.is_none() {
            let (used, event) = match self.decoder.decode(&mut buf[pos..]) {
                Ok(step) => step,
                Err(e) => {
                    let rule = match e {
                        FrameError::ReservedBitsSet => "reserved bits set",
                        FrameError::CompressedControlOrContinuation => {
                            "compressed control frame or continuation"
                        }
                        FrameError::ReservedOpcode => "reserved opcode",
                        FrameError::UnmaskedFrameFromClient => "unmasked frame from client",
                        FrameError::ControlFrameTooLong => "control frame too long",
                        FrameError::FragmentedControlFrame => "fragmented control frame",
                        FrameError::InvalidLength => "invalid length",
                        FrameError::UnexpectedContinuation => "unexpected continuation",
                        FrameError::ExpectedContinuation => "expected continuation",
                        FrameError::MessageTooBig { .. } => "message too big",
                    };
                    self.violation(e.close_code(), rule, out);
                    break;
                }
            };
            let base = pos;
            pos += used;
            match event {
                None if used == 0 => break,
                None => {}
                Some(FrameEvent::Header(h)) => {
                    self.opcode = h.opcode;
                    self.fin = h.fin;
                    match h.opcode {
                        OpCode::Text | OpCode::Binary => {
                            self.text = h.opcode == OpCode::Text;
                            self.compressed = h.compressed;
                            self.utf8 = Utf8Stream::default();
                            on_message(
                                MessagePart::Start {
                                    opcode: h.opcode,
                                    compressed: h.compressed,
                                },
                                out,
                            );
                        }
                        OpCode::Continuation => {}
                        OpCode::Close | OpCode::Ping | OpCode::Pong => {
                            self.take_control();
                        }
                    }
                }
                Some(FrameEvent::Payload(r)) => {
                    let bytes = &buf[base + r.start..base + r.end];
                    if is_control(self.opcode) {
                        // The decoder bounds a control payload to 125 bytes.
                        if !bytes.is_empty() {
                            self.side_mut().control.push(bytes);
                        }
                    } else if self.compressed {
                        // The decoder bounds the message's bytes.
                        self.side_mut().compressed.extend_from_slice(bytes);
                    } else if self.text && self.utf8.feed(bytes).is_err() {
                        self.violation(
                            close_code::INVALID_PAYLOAD,
                            "text message is not UTF-8",
                            out,
                        );
                    } else {
                        on_message(MessagePart::Chunk(bytes), out);
                    }
                }
                Some(FrameEvent::FrameEnd) => self.frame_end(out, inflater, on_message),
            }
        }
        self.closing
    }

    fn frame_end(
        &mut self,
        out: &mut Vec<u8>,
        inflater: &mut Inflater,
        on_message: &mut impl FnMut(MessagePart<'_>, &mut Vec<u8>),
    ) {
        match self.opcode {
            OpCode::Ping => {
                let payload = self.take_control();
                encode_frame(OpCode::Pong, payload.bytes(), out);
            }
            // Unsolicited pongs are allowed and mean nothing (§5.5.3).
            OpCode::Pong => {
                self.take_control();
            }
            OpCode::Close => {
                let payload = self.take_control();
                match parse_close_payload(payload.bytes()) {
                    Ok(None) => {
                        // No code received: reply with an empty close.
                        encode_frame(OpCode::Close, &[], out);
                        self.closing = Some(Closing::PeerClosed { code: None });
                    }
                    Ok(Some((code, _))) => {
                        encode_close(code, "", out);
                        self.closing = Some(Closing::PeerClosed { code: Some(code) });
                    }
                    Err(CloseError::InvalidCloseCode) => {
                        self.violation(close_code::PROTOCOL_ERROR, "invalid close code", out)
                    }
                    Err(CloseError::InvalidReasonUtf8) => self.violation(
                        close_code::INVALID_PAYLOAD,
                        "close reason is not UTF-8",
                        out,
                    ),
                }
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                if !self.fin {
                    return;
                }
                if self.compressed {
                    self.inflate_message(out, inflater, on_message);
                    return;
                }
                if self.text && self.utf8.finish().is_err() {
                    self.violation(
                        close_code::INVALID_PAYLOAD,
                        "text message is not UTF-8",
                        out,
                    );
                    return;
                }
                on_message(MessagePart::End, out);
            }
        }
    }

    /// A compressed message is whole: decompressed (RFC 7692 §7.2.2, no
    /// context from the messages before), checked as its type says, and
    /// handed over as one chunk. Past the message limit once decompressed
    /// it is closed with 1009, like a message too big on the wire; data
    /// that does not decompress with 1007 (the payload is not what the
    /// frame says it is).
    fn inflate_message(
        &mut self,
        out: &mut Vec<u8>,
        inflater: &mut Inflater,
        on_message: &mut impl FnMut(MessagePart<'_>, &mut Vec<u8>),
    ) {
        let compressed = self
            .side
            .as_mut()
            .map(|s| std::mem::take(&mut s.compressed))
            .unwrap_or_default();
        self.tidy_side();
        let max = usize::try_from(self.decoder.message_bytes_max).unwrap_or(usize::MAX);
        match inflater.inflate(&compressed, max) {
            Err(InflateError::TooLarge) => self.violation(
                close_code::MESSAGE_TOO_BIG,
                "message too big once decompressed",
                out,
            ),
            Err(InflateError::Corrupt) => self.violation(
                close_code::INVALID_PAYLOAD,
                "compressed message does not decompress",
                out,
            ),
            Ok(message) if self.text && core::str::from_utf8(message).is_err() => self.violation(
                close_code::INVALID_PAYLOAD,
                "text message is not UTF-8",
                out,
            ),
            Ok(message) => {
                if !message.is_empty() {
                    on_message(MessagePart::Chunk(message), out);
                }
                on_message(MessagePart::End, out);
            }
        }
    }

    /// Ends the session from the server side: a close frame with `code`.
    pub fn violation(&mut self, code: u16, rule: &'static str, out: &mut Vec<u8>) {
        if self.closing.is_none() {
            encode_close(code, "", out);
            self.closing = Some(Closing::Violation { code, rule });
        }
    }

    fn side_mut(&mut self) -> &mut Side {
        self.side.get_or_insert_with(Box::default)
    }

    /// The control frame's payload received so far, taken (empty if none).
    fn take_control(&mut self) -> Control {
        let control = self
            .side
            .as_mut()
            .map(|s| std::mem::take(&mut s.control))
            .unwrap_or_default();
        self.tidy_side();
        control
    }

    /// Frees the side block once nothing is in flight.
    fn tidy_side(&mut self) {
        if self
            .side
            .as_ref()
            .is_some_and(|s| s.control.len == 0 && s.compressed.is_empty())
        {
            self.side = None;
        }
    }
}

/// What a session keeps across reads while a frame or message is in
/// flight.
#[derive(Debug, Clone, Default)]
struct Side {
    control: Control,
    /// A compressed message's bytes so far (at most the message limit:
    /// the decoder counts them).
    compressed: Vec<u8>,
}

/// A control frame's payload while it arrives.
#[derive(Debug, Clone)]
struct Control {
    len: u8,
    buf: [u8; WS_CONTROL_PAYLOAD_BYTES_MAX],
}

impl Default for Control {
    fn default() -> Control {
        Control {
            len: 0,
            buf: [0; WS_CONTROL_PAYLOAD_BYTES_MAX],
        }
    }
}

impl Control {
    /// Appends what fits (the decoder never passes more than fits).
    fn push(&mut self, bytes: &[u8]) {
        let at = usize::from(self.len);
        let n = bytes.len().min(self.buf.len() - at);
        self.buf[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n as u8;
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

fn is_control(op: OpCode) -> bool {
    matches!(op, OpCode::Close | OpCode::Ping | OpCode::Pong)
}

/// Appends one fragment of an echoed message: the first carries the
/// message's opcode, later ones are continuations; `fin` ends the message.
pub fn encode_fragment(first: bool, opcode: OpCode, fin: bool, payload: &[u8], out: &mut Vec<u8>) {
    let op = if first { opcode } else { OpCode::Continuation };
    let mut head = [0; WS_SERVER_HEAD_BYTES_MAX];
    let head_len = encode_frame_head(fin, op, payload.len() as u64, &mut head);
    out.reserve(head_len + payload.len());
    out.extend_from_slice(&head[..head_len]);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_offered_subprotocol_we_speak_is_chosen() {
        let ours: &'static [String] = Vec::leak(vec!["gateway.v1".into(), "chat".into()]);
        let choose =
            |values: &[&'static str]| choose_subprotocol(values.iter().map(|v| v.as_bytes()), ours);
        // The client's order decides, across lists and repeated headers.
        assert_eq!(choose(&["chat, gateway.v1"]), Some("chat"));
        assert_eq!(choose(&["superchat,  gateway.v1 "]), Some("gateway.v1"));
        assert_eq!(choose(&["superchat", "chat"]), Some("chat"));
        // Exact names only; nothing offered or nothing in common: none.
        assert_eq!(choose(&["Chat", "gateway"]), None);
        assert_eq!(choose(&[]), None);
        assert_eq!(choose(&[",,"]), None);
        assert_eq!(choose_subprotocol([&b"chat"[..]].into_iter(), &[]), None);
        let head =
            String::from_utf8(switching_protocols_response("x", Some("chat"), None)).unwrap();
        assert!(head.ends_with("Sec-WebSocket-Accept: x\r\nSec-WebSocket-Protocol: chat\r\n\r\n"));
        assert!(valid_subprotocol("gateway.v1") && valid_subprotocol("mqtt"));
        assert!(!valid_subprotocol("") && !valid_subprotocol("a b") && !valid_subprotocol("a,b"));
    }
    use crate::limits::WS_MESSAGE_BYTES_MAX;

    /// RFC 6455 §5.7: the masking key of the masked examples.
    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A received frame, its payload reassembled from the Payload ranges.
    #[derive(Debug, PartialEq, Eq)]
    struct Frame {
        header: FrameHeader,
        payload: Vec<u8>,
    }

    /// Feeds `input` in chunks of `chunk` bytes, following the calling
    /// convention of `decode`, and checks the event order (Header, Payload*,
    /// FrameEnd) along the way.
    fn decode_chunked(
        dec: &mut FrameDecoder,
        input: &[u8],
        chunk: usize,
    ) -> Result<Vec<Frame>, FrameError> {
        let cuts: Vec<usize> = (chunk..input.len()).step_by(chunk).collect();
        decode_split(dec, input, &cuts)
    }

    /// Like [`decode_chunked`], with the input cut at `cuts` (sorted offsets;
    /// repeats give empty pieces).
    fn decode_split(
        dec: &mut FrameDecoder,
        input: &[u8],
        cuts: &[usize],
    ) -> Result<Vec<Frame>, FrameError> {
        let mut frames = Vec::new();
        let mut current: Option<Frame> = None;
        for mut piece in pieces(input, cuts) {
            let piece = &mut piece[..];
            let mut at = 0;
            loop {
                let (n, event) = dec.decode(&mut piece[at..])?;
                assert!(n <= piece.len() - at, "consumed more than given");
                match event {
                    None if n == 0 => break,
                    None => {}
                    Some(FrameEvent::Header(header)) => {
                        assert!(current.is_none(), "header inside a frame");
                        current = Some(Frame {
                            header,
                            payload: Vec::new(),
                        });
                    }
                    Some(FrameEvent::Payload(range)) => {
                        assert_eq!(range.start, 0, "payload range starts the input");
                        assert!(range.end <= n, "payload range beyond consumed bytes");
                        let frame = current.as_mut().expect("payload outside a frame");
                        frame.payload.extend_from_slice(&piece[at..][range]);
                    }
                    Some(FrameEvent::FrameEnd) => {
                        let frame = current.take().expect("frame end outside a frame");
                        assert_eq!(frame.payload.len() as u64, frame.header.payload_len);
                        frames.push(frame);
                    }
                }
                at += n;
            }
        }
        // A frame cut off by the end of the input is left out of the result.
        Ok(frames)
    }

    /// A client frame: `b0` is FIN/RSV/opcode, the length is encoded in the
    /// shortest form, the payload masked with `key`.
    /// `input` cut at `cuts` (sorted offsets ≤ len), as owned pieces: the
    /// decoder unmasks in place.
    fn pieces(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut pieces = Vec::with_capacity(cuts.len() + 1);
        let mut start = 0;
        for &cut in cuts {
            pieces.push(input[start..cut].to_vec());
            start = cut;
        }
        pieces.push(input[start..].to_vec());
        pieces
    }

    fn client_frame(b0: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut head = [0; WS_SERVER_HEAD_BYTES_MAX];
        let n = encode_frame_head(true, OpCode::Text, payload.len() as u64, &mut head);
        let mut out = vec![b0, head[1] | 0x80];
        out.extend_from_slice(&head[2..n]);
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    fn header(fin: bool, opcode: OpCode, payload_len: u64) -> FrameHeader {
        FrameHeader {
            fin,
            compressed: false,
            opcode,
            payload_len,
        }
    }

    fn decode_all(input: &[u8]) -> Result<Vec<Frame>, FrameError> {
        decode_chunked(
            &mut FrameDecoder::new(WS_MESSAGE_BYTES_MAX),
            input,
            input.len().max(1),
        )
    }

    #[test]
    fn accept_key_rfc6455_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            switching_protocols_response("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", None, None),
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
    }

    #[test]
    fn encoder_matches_rfc6455_examples() {
        // RFC 6455 §5.7, the unmasked (server-side) examples.
        let mut out = Vec::new();
        encode_frame(OpCode::Text, b"Hello", &mut out);
        assert_eq!(out, [0x81, 0x05, b'H', b'e', b'l', b'l', b'o']);

        let mut head = [0; WS_SERVER_HEAD_BYTES_MAX];
        let n = encode_frame_head(false, OpCode::Text, 3, &mut head);
        assert_eq!(head[..n], [0x01, 0x03]);
        let n = encode_frame_head(true, OpCode::Continuation, 2, &mut head);
        assert_eq!(head[..n], [0x80, 0x02]);

        out.clear();
        encode_frame(OpCode::Ping, b"Hello", &mut out);
        assert_eq!(out, [0x89, 0x05, b'H', b'e', b'l', b'l', b'o']);

        out.clear();
        encode_frame(OpCode::Binary, &[7; 256], &mut out);
        assert_eq!(out[..4], [0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(out.len(), 4 + 256);

        out.clear();
        encode_frame(OpCode::Binary, &vec![7; 65536], &mut out);
        assert_eq!(out[..10], [0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(out.len(), 10 + 65536);
    }

    #[test]
    fn encoder_length_boundaries() {
        let cases: &[(u64, &[u8])] = &[
            (0, &[0x82, 0]),
            (125, &[0x82, 125]),
            (126, &[0x82, 126, 0, 126]),
            (65535, &[0x82, 126, 0xFF, 0xFF]),
            (65536, &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
            (
                u64::MAX,
                &[0x82, 127, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
            ),
        ];
        for &(len, want) in cases {
            let mut head = [0; WS_SERVER_HEAD_BYTES_MAX];
            let n = encode_frame_head(true, OpCode::Binary, len, &mut head);
            assert_eq!(&head[..n], want, "length {len}");
        }
        let opcodes = [
            (OpCode::Continuation, 0x80),
            (OpCode::Text, 0x81),
            (OpCode::Binary, 0x82),
            (OpCode::Close, 0x88),
            (OpCode::Ping, 0x89),
            (OpCode::Pong, 0x8A),
        ];
        for (opcode, b0) in opcodes {
            let mut head = [0; WS_SERVER_HEAD_BYTES_MAX];
            encode_frame_head(true, opcode, 0, &mut head);
            assert_eq!(head[0], b0, "{opcode:?}");
        }
    }

    #[test]
    fn masked_hello_whole_and_byte_by_byte() {
        // RFC 6455 §5.7: a single-frame masked text message containing "Hello".
        let input = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        for chunk in [input.len(), 1, 2, 3, 5] {
            let mut dec = FrameDecoder::new(WS_MESSAGE_BYTES_MAX);
            let frames = decode_chunked(&mut dec, &input, chunk).unwrap();
            assert_eq!(
                frames,
                [Frame {
                    header: header(true, OpCode::Text, 5),
                    payload: b"Hello".to_vec()
                }],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn masked_pong_and_exact_events() {
        // RFC 6455 §5.7: masked Pong with "Hello", decoded in one slice.
        let mut input = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let mut dec = FrameDecoder::new(WS_MESSAGE_BYTES_MAX);
        assert_eq!(
            dec.decode(&mut input).unwrap(),
            (6, Some(FrameEvent::Header(header(true, OpCode::Pong, 5))))
        );
        assert_eq!(
            dec.decode(&mut input[6..]).unwrap(),
            (5, Some(FrameEvent::Payload(0..5)))
        );
        // Unmasked in place.
        assert_eq!(&input[6..], b"Hello");
        assert_eq!(
            dec.decode(&mut []).unwrap(),
            (0, Some(FrameEvent::FrameEnd))
        );
        assert_eq!(dec.decode(&mut []).unwrap(), (0, None));
    }

    #[test]
    fn empty_frame_reports_frame_end() {
        let mut input = client_frame(0x89, b"", KEY);
        let mut dec = FrameDecoder::new(WS_MESSAGE_BYTES_MAX);
        assert_eq!(
            dec.decode(&mut input).unwrap(),
            (6, Some(FrameEvent::Header(header(true, OpCode::Ping, 0))))
        );
        assert_eq!(
            dec.decode(&mut []).unwrap(),
            (0, Some(FrameEvent::FrameEnd))
        );
        assert_eq!(dec.decode(&mut []).unwrap(), (0, None));
    }

    #[test]
    fn partial_header_byte_by_byte() {
        // A 64-bit-length header: 14 bytes, then the first payload byte.
        let payload = vec![0xAB; 70_000];
        let frame = client_frame(0x82, &payload, KEY);
        assert_eq!(frame[1], 0xFF);
        let mut dec = FrameDecoder::new(100_000);
        for (i, &byte) in frame[..13].iter().enumerate() {
            assert_eq!(dec.decode(&mut [byte]).unwrap(), (1, None), "byte {i}");
            assert_eq!(dec.decode(&mut []).unwrap(), (0, None));
        }
        assert_eq!(
            dec.decode(&mut [frame[13], frame[14]]).unwrap(),
            (
                1,
                Some(FrameEvent::Header(header(true, OpCode::Binary, 70_000)))
            )
        );
    }

    #[test]
    fn larger_masked_frames_any_chunking() {
        // §5.7's 256-byte and 64 KiB binary messages, masked as a client sends
        // them; a fragmented "Hel" + "lo" with a ping in between.
        let big: Vec<u8> = (0..65536u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut stream = client_frame(0x82, &big[..256], KEY);
        stream.extend(client_frame(0x82, &big, [1, 2, 3, 4]));
        stream.extend(client_frame(0x01, b"Hel", KEY));
        stream.extend(client_frame(0x89, b"ping", [9, 8, 7, 6]));
        stream.extend(client_frame(0x80, b"lo", KEY));
        let want = [
            Frame {
                header: header(true, OpCode::Binary, 256),
                payload: big[..256].to_vec(),
            },
            Frame {
                header: header(true, OpCode::Binary, 65536),
                payload: big.clone(),
            },
            Frame {
                header: header(false, OpCode::Text, 3),
                payload: b"Hel".to_vec(),
            },
            Frame {
                header: header(true, OpCode::Ping, 4),
                payload: b"ping".to_vec(),
            },
            Frame {
                header: header(true, OpCode::Continuation, 2),
                payload: b"lo".to_vec(),
            },
        ];
        assert_eq!(&stream[256 + 8..256 + 8 + 4], [0x82, 0xFF, 0, 0]);
        for chunk in [stream.len(), 1, 3, 4, 7, 1000, 4096] {
            let mut dec = FrameDecoder::new(WS_MESSAGE_BYTES_MAX);
            let frames = decode_chunked(&mut dec, &stream, chunk).unwrap();
            assert!(frames == want, "chunk {chunk}");
        }
    }

    #[test]
    fn unmasked_rfc_examples_are_refused() {
        // RFC 6455 §5.7's unmasked examples: a server must refuse them.
        let cases: &[&[u8]] = &[
            &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f],
            &[0x01, 0x03, 0x48, 0x65, 0x6c],
            &[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f],
            &[0x82, 0x7E, 0x01, 0x00],
            &[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0],
        ];
        for case in cases {
            assert_eq!(
                decode_all(case),
                Err(FrameError::UnmaskedFrameFromClient),
                "{case:02x?}"
            );
        }
    }

    #[test]
    fn every_frame_error() {
        let mut ok_first = client_frame(0x01, b"abc", KEY);
        let cases: Vec<(&str, u64, Vec<u8>, FrameError, u16)> = vec![
            (
                "rsv1",
                100,
                vec![0xC1, 0x80],
                FrameError::ReservedBitsSet,
                1002,
            ),
            (
                "rsv3",
                100,
                vec![0x91, 0x80],
                FrameError::ReservedBitsSet,
                1002,
            ),
            (
                "opcode 3",
                100,
                vec![0x83, 0x80],
                FrameError::ReservedOpcode,
                1002,
            ),
            (
                "opcode 0xB",
                100,
                vec![0x8B, 0x80],
                FrameError::ReservedOpcode,
                1002,
            ),
            (
                "opcode 0xF",
                100,
                vec![0x8F, 0x80],
                FrameError::ReservedOpcode,
                1002,
            ),
            (
                "unmasked",
                100,
                vec![0x82, 0x00],
                FrameError::UnmaskedFrameFromClient,
                1002,
            ),
            (
                "ping 126",
                100,
                vec![0x89, 0xFE, 0x00, 0x7E],
                FrameError::ControlFrameTooLong,
                1002,
            ),
            (
                "close 127",
                100,
                vec![0x88, 0xFF],
                FrameError::ControlFrameTooLong,
                1002,
            ),
            (
                "ping no fin",
                100,
                vec![0x09, 0x80],
                FrameError::FragmentedControlFrame,
                1002,
            ),
            (
                "length msb",
                u64::MAX,
                vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0],
                FrameError::InvalidLength,
                1002,
            ),
            (
                "lone continuation",
                100,
                vec![0x80, 0x80],
                FrameError::UnexpectedContinuation,
                1002,
            ),
            (
                "text inside fragmented message",
                100,
                {
                    ok_first.extend([0x81, 0x80]);
                    ok_first.clone()
                },
                FrameError::ExpectedContinuation,
                1002,
            ),
            (
                "one frame over the limit, seen at its second byte",
                10,
                vec![0x82, 0x8B],
                FrameError::MessageTooBig {
                    size: 11,
                    max_size: 10,
                },
                1009,
            ),
            (
                "16-bit length over the limit, before the mask key",
                255,
                vec![0x82, 0xFE, 0x01, 0x00],
                FrameError::MessageTooBig {
                    size: 256,
                    max_size: 255,
                },
                1009,
            ),
            (
                "fragments summing over the limit",
                10,
                {
                    let mut s = client_frame(0x02, b"123456", KEY);
                    s.extend(client_frame(0x89, b"ping is not counted", KEY));
                    s.extend([0x80, 0x85]);
                    s
                },
                FrameError::MessageTooBig {
                    size: 11,
                    max_size: 10,
                },
                1009,
            ),
        ];
        for (name, max, input, want, code) in cases {
            for chunk in [input.len(), 1] {
                let mut dec = FrameDecoder::new(max);
                let got = decode_chunked(&mut dec, &input, chunk);
                assert_eq!(got, Err(want.clone()), "{name}, chunk {chunk}");
            }
            assert_eq!(want.close_code(), code, "{name}");
        }
    }

    #[test]
    fn fragment_limits_reset_between_messages() {
        // Two fragmented messages of 8 bytes each, limit 10: each is fine.
        let mut stream = Vec::new();
        for _ in 0..2 {
            stream.extend(client_frame(0x02, b"1234", KEY));
            stream.extend(client_frame(0x00, b"5678", KEY));
            stream.extend(client_frame(0x80, b"", KEY));
        }
        // Then an unfragmented message exactly at the limit.
        stream.extend(client_frame(0x81, b"0123456789", KEY));
        let frames = decode_chunked(&mut FrameDecoder::new(10), &stream, 1).unwrap();
        assert_eq!(frames.len(), 7);
        assert_eq!(frames[6].payload, b"0123456789");
    }

    #[test]
    fn close_frames() {
        let mut out = Vec::new();
        encode_close(close_code::NORMAL, "bye", &mut out);
        assert_eq!(out, [0x88, 0x05, 0x03, 0xE8, b'b', b'y', b'e']);

        // 2-byte chars: 123 bytes available for the reason → 61 chars (122 bytes).
        out.clear();
        encode_close(close_code::GOING_AWAY, &"é".repeat(100), &mut out);
        assert_eq!(out[..2], [0x88, 124]);
        assert_eq!(
            parse_close_payload(&out[2..]),
            Ok(Some((1001, "é".repeat(61).as_str())))
        );

        out.clear();
        encode_close(close_code::MESSAGE_TOO_BIG, &"x".repeat(500), &mut out);
        assert_eq!(out[1], 125);
    }

    #[test]
    fn close_payloads() {
        let code = |c: u16| c.to_be_bytes().to_vec();
        let with_reason = |c: u16, r: &[u8]| [&c.to_be_bytes()[..], r].concat();
        type Want = Result<Option<(u16, &'static str)>, CloseError>;
        let cases: Vec<(Vec<u8>, Want)> = vec![
            (vec![], Ok(None)),
            (vec![0x03], Err(CloseError::InvalidCloseCode)),
            (code(1000), Ok(Some((1000, "")))),
            (with_reason(1001, b"bye"), Ok(Some((1001, "bye")))),
            (code(1003), Ok(Some((1003, "")))),
            (code(1007), Ok(Some((1007, "")))),
            (code(1011), Ok(Some((1011, "")))),
            (code(1014), Ok(Some((1014, "")))),
            (code(3000), Ok(Some((3000, "")))),
            (code(4999), Ok(Some((4999, "")))),
            (code(0), Err(CloseError::InvalidCloseCode)),
            (code(999), Err(CloseError::InvalidCloseCode)),
            (code(1004), Err(CloseError::InvalidCloseCode)),
            (code(1005), Err(CloseError::InvalidCloseCode)),
            (code(1006), Err(CloseError::InvalidCloseCode)),
            (code(1015), Err(CloseError::InvalidCloseCode)),
            (code(2999), Err(CloseError::InvalidCloseCode)),
            (code(5000), Err(CloseError::InvalidCloseCode)),
            (
                with_reason(1000, b"\xff"),
                Err(CloseError::InvalidReasonUtf8),
            ),
            (
                with_reason(1005, b"\xff"),
                Err(CloseError::InvalidCloseCode),
            ),
        ];
        for (payload, want) in cases {
            assert_eq!(parse_close_payload(&payload), want, "{payload:02x?}");
        }
    }

    /// Small deterministic generator, so the test needs no dependency.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for round in 0..2000 {
            let len = (rng.next() % 64) as usize;
            let mut input: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Bias towards plausible headers so deeper paths are reached.
            if round % 2 == 0 && len >= 2 {
                input[0] = [0x01, 0x02, 0x00, 0x80, 0x81, 0x82, 0x88, 0x89][round % 8];
                input[1] |= 0x80;
            }
            let chunk = 1 + (rng.next() % 8) as usize;
            let _ = decode_chunked(&mut FrameDecoder::new(rng.next() % 100), &input, chunk);
        }
    }

    // ---- ServerSession and Utf8Stream ----

    fn masked(first_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first_byte];
        match payload.len() {
            n if n <= 125 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&KEY);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
        f
    }

    /// The messages a session handed over (reassembled), its replies, and how
    /// it ended.
    type SessionRun = (Vec<(OpCode, Vec<u8>)>, Vec<u8>, Option<Closing>);

    /// Runs a session over `input` in chunks of `chunk` bytes; returns the
    /// reassembled messages, the replies and how it ended.
    fn run_session(input: &[u8], chunk: usize) -> SessionRun {
        let cuts: Vec<usize> = (chunk..input.len()).step_by(chunk).collect();
        run_session_split(input, &cuts)
    }

    /// Like [`run_session`], with the input cut at `cuts`.
    fn run_session_split(input: &[u8], cuts: &[usize]) -> SessionRun {
        run_session_with(ServerSession::new(WS_MESSAGE_BYTES_MAX), input, cuts)
    }

    /// Like [`run_session_split`], with `session` as it was set up.
    fn run_session_with(mut session: ServerSession, input: &[u8], cuts: &[usize]) -> SessionRun {
        let mut inflater = Inflater::default();
        let mut messages: Vec<(OpCode, Vec<u8>)> = Vec::new();
        let mut out = Vec::new();
        let mut current: Option<(OpCode, Vec<u8>)> = None;
        let mut end = None;
        for mut piece in pieces(input, cuts) {
            end = session.input(
                &mut piece,
                &mut out,
                &mut inflater,
                &mut |part, _| match part {
                    MessagePart::Start { opcode, .. } => current = Some((opcode, Vec::new())),
                    MessagePart::Chunk(b) => current.as_mut().unwrap().1.extend_from_slice(b),
                    MessagePart::End => messages.push(current.take().unwrap()),
                },
            );
            if end.is_some() {
                break;
            }
        }
        (messages, out, end)
    }

    #[test]
    fn utf8_stream_accepts_any_split_of_valid_text_and_fails_fast() {
        let text = "aé€😀z".as_bytes();
        for cut1 in 0..=text.len() {
            for cut2 in cut1..=text.len() {
                let mut v = Utf8Stream::default();
                v.feed(&text[..cut1]).unwrap();
                v.feed(&text[cut1..cut2]).unwrap();
                v.feed(&text[cut2..]).unwrap();
                v.finish().unwrap();
            }
        }
        // An impossible second byte fails on that byte, not at the end.
        let mut v = Utf8Stream::default();
        v.feed(&[0xF4]).unwrap();
        assert_eq!(v.feed(&[0x90]), Err(InvalidUtf8));
        // A sequence left open at the end of the message fails at finish.
        let mut v = Utf8Stream::default();
        v.feed(&[b'a', 0xE2, 0x82]).unwrap();
        assert_eq!(v.finish(), Err(InvalidUtf8));
        // Surrogates and overlongs are invalid.
        assert!(Utf8Stream::default().feed(&[0xED, 0xA0, 0x80]).is_err());
        assert!(Utf8Stream::default().feed(&[0xC0, 0xAF]).is_err());
    }

    #[test]
    fn fragmented_message_with_interleaved_ping_reassembles_whatever_the_chunking() {
        let mut input = masked(0x01, b"Hel"); // text, no FIN
        input.extend(masked(0x89, b"ping!")); // ping inside the message
        input.extend(masked(0x00, "lo wörld".as_bytes())); // continuation, no FIN
        input.extend(masked(0x80, b"")); // final empty continuation
        input.extend(masked(0x8A, b"unsolicited")); // pong: ignored
        input.extend(masked(0x82, &[0, 1, 2])); // binary
        for chunk in [1, 2, 3, 7, input.len()] {
            let (messages, out, end) = run_session(&input, chunk);
            assert_eq!(end, None);
            assert_eq!(
                messages,
                vec![
                    (OpCode::Text, "Hello wörld".as_bytes().to_vec()),
                    (OpCode::Binary, vec![0, 1, 2])
                ],
                "chunk {chunk}"
            );
            let mut pong = Vec::new();
            encode_frame(OpCode::Pong, b"ping!", &mut pong);
            assert_eq!(out, pong);
        }
    }

    #[test]
    fn invalid_utf8_fails_in_the_fragment_that_breaks_it() {
        let mut input = masked(0x01, b"ok");
        input.extend(masked(0x00, &[0xCE, 0xBA, 0xF4, 0x90])); // invalid here
        let third = input.len();
        input.extend(masked(0x80, b"never read"));
        let mut session = ServerSession::new(WS_MESSAGE_BYTES_MAX);
        let mut out = Vec::new();
        let end = session.input(
            &mut input[..third].to_vec(),
            &mut out,
            &mut Inflater::default(),
            &mut |_, _| {},
        );
        assert_eq!(
            end,
            Some(Closing::Violation {
                code: close_code::INVALID_PAYLOAD,
                rule: "text message is not UTF-8"
            })
        );
        assert_eq!(out, vec![0x88, 0x02, 0x03, 0xEF]);
        // A text message ending inside a sequence fails at its end.
        let (_, _, end) = run_session(&masked(0x81, &[b'a', 0xE2, 0x82]), 1);
        assert!(matches!(
            end,
            Some(Closing::Violation {
                code: close_code::INVALID_PAYLOAD,
                ..
            })
        ));
    }

    #[test]
    fn close_handshake_rules() {
        let cases: Vec<(Vec<u8>, Option<Closing>, Vec<u8>)> = vec![
            (
                masked(0x88, &[]),
                Some(Closing::PeerClosed { code: None }),
                vec![0x88, 0x00],
            ),
            (
                masked(0x88, &[0x0F, 0xA0, b'x']),
                Some(Closing::PeerClosed { code: Some(4000) }),
                vec![0x88, 0x02, 0x0F, 0xA0],
            ),
            (
                masked(0x88, &[0x03]),
                Some(Closing::Violation {
                    code: 1002,
                    rule: "invalid close code",
                }),
                vec![0x88, 0x02, 0x03, 0xEA],
            ),
            (
                masked(0x88, &[0x03, 0xEE]),
                Some(Closing::Violation {
                    code: 1002,
                    rule: "invalid close code",
                }),
                vec![0x88, 0x02, 0x03, 0xEA],
            ),
            (
                masked(0x88, &[0x03, 0xE8, 0xFF]),
                Some(Closing::Violation {
                    code: 1007,
                    rule: "close reason is not UTF-8",
                }),
                vec![0x88, 0x02, 0x03, 0xEF],
            ),
        ];
        for (input, end, reply) in cases {
            let (_, out, got) = run_session(&input, 1);
            assert_eq!(got, end, "{input:?}");
            assert_eq!(out, reply, "{input:?}");
        }
        // Nothing after a close is processed.
        let mut input = masked(0x88, &[0x03, 0xE8]);
        input.extend(masked(0x89, b"late ping"));
        let (_, out, _) = run_session(&input, input.len());
        assert_eq!(out, vec![0x88, 0x02, 0x03, 0xE8]);
    }

    #[test]
    fn frame_errors_close_with_their_code() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x81, 0x02, b'h', b'i'], 1002), // unmasked
            (masked(0xC1, b"x"), 1002),           // RSV1
            (masked(0x83, b""), 1002),            // reserved opcode
            (masked(0x09, b""), 1002),            // fragmented ping
            (masked(0x89, &[0; 126]), 1002),      // control too long
            (masked(0x80, b"x"), 1002),           // continuation with nothing open
            ([masked(0x01, b"a"), masked(0x81, b"b")].concat(), 1002), // expected continuation
            (
                masked(0x82, &vec![0; WS_MESSAGE_BYTES_MAX as usize + 1]),
                1009,
            ),
        ];
        for (input, code) in cases {
            let (_, out, end) = run_session(&input, 3);
            assert!(
                matches!(end, Some(Closing::Violation { code: c, .. }) if c == code),
                "{:?}",
                &input[..2]
            );
            assert_eq!(&out[2..4], &code.to_be_bytes());
        }
    }

    /// A session of a connection that negotiated permessage-deflate.
    fn deflate_session(message_bytes_max: u64) -> ServerSession {
        let mut session = ServerSession::new(message_bytes_max);
        session.accept_compressed();
        session
    }

    fn deflated(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        Deflater::default().compress(payload, Window::Full, &mut out);
        out
    }

    #[test]
    fn rsv1_starts_a_compressed_message_only_where_deflate_was_negotiated() {
        // RFC 7692 §7.2.3.1's "Hello", compressed, in one text frame.
        let hello = masked(0xC1, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
        let (messages, _, end) = run_session(&hello, 100);
        assert_eq!(messages, []);
        assert_eq!(
            end,
            Some(Closing::Violation {
                code: 1002,
                rule: "reserved bits set"
            }),
            "not negotiated: RSV1 means nothing"
        );
        for chunk in [1, 3, 100] {
            let cuts: Vec<usize> = (chunk..hello.len()).step_by(chunk).collect();
            let (messages, out, end) = run_session_with(deflate_session(100), &hello, &cuts);
            assert_eq!(messages, [(OpCode::Text, b"Hello".to_vec())]);
            assert_eq!((out, end), (Vec::new(), None));
        }
        let mut decoder = FrameDecoder::new(100);
        decoder.accept_compressed();
        let frames = decode_chunked(&mut decoder, &hello, 2).unwrap();
        assert!(frames[0].header.compressed && frames[0].header.fin);

        // Refused even when negotiated: RSV1 on a continuation or a control
        // frame, RSV2 and RSV3.
        for (input, rule) in [
            (
                [masked(0x41, b"x"), masked(0xC0, b"y")].concat(),
                "compressed control frame or continuation",
            ),
            (
                masked(0xC9, b""),
                "compressed control frame or continuation",
            ),
            (masked(0xE1, b"x"), "reserved bits set"),
            (masked(0x91, b"x"), "reserved bits set"),
        ] {
            let (_, out, end) = run_session_with(deflate_session(100), &input, &[]);
            assert_eq!(end, Some(Closing::Violation { code: 1002, rule }));
            assert_eq!(&out[2..4], &1002u16.to_be_bytes());
        }
    }

    #[test]
    fn a_fragmented_compressed_message_with_a_ping_between_is_decompressed_once_whole() {
        let text = "permessage-deflate, permessage-deflate, permessage-deflate é".repeat(20);
        let compressed = deflated(text.as_bytes());
        let third = compressed.len() / 3;
        let mut input = masked(0x41, &compressed[..third]);
        input.extend(masked(0x89, b"ping"));
        input.extend(masked(0x00, &compressed[third..2 * third]));
        input.extend(masked(0x80, &compressed[2 * third..]));
        // A plain message after it: allowed on the same connection.
        input.extend(masked(0x82, b"plain"));
        for chunk in [1, 7, input.len()] {
            let cuts: Vec<usize> = (chunk..input.len()).step_by(chunk).collect();
            // A compressed message comes as one chunk, whatever the
            // reads; a plain one as its bytes arrive (counted together).
            let mut parts: Vec<String> = Vec::new();
            let mut plain = 0;
            let mut session = deflate_session(WS_MESSAGE_BYTES_MAX);
            let mut inflater = Inflater::default();
            let mut out = Vec::new();
            for mut piece in pieces(&input, &cuts) {
                let end =
                    session.input(
                        &mut piece,
                        &mut out,
                        &mut inflater,
                        &mut |part, _| match part {
                            MessagePart::Chunk(b) if parts.len() > 3 => plain += b.len(),
                            MessagePart::Chunk(b) => parts.push(format!("chunk {}", b.len())),
                            other => parts.push(format!("{other:?}")),
                        },
                    );
                assert_eq!(end, None);
            }
            assert_eq!(out, [0x8a, 4, b'p', b'i', b'n', b'g'], "the ping answered");
            assert_eq!(
                parts,
                [
                    "Start { opcode: Text, compressed: true }".to_string(),
                    format!("chunk {}", text.len()),
                    "End".into(),
                    "Start { opcode: Binary, compressed: false }".into(),
                    "End".into(),
                ]
            );
            assert_eq!(plain, 5);
            assert!(session.side.is_none(), "nothing kept between messages");
        }
        let (messages, _, _) = run_session_with(deflate_session(WS_MESSAGE_BYTES_MAX), &input, &[]);
        assert_eq!(messages[0], (OpCode::Text, text.into_bytes()));
    }

    #[test]
    fn a_compressed_message_that_is_too_big_corrupt_or_not_utf8_closes() {
        let bomb = deflated(&vec![b'a'; 1 << 20]);
        assert!(bomb.len() < 2048);
        let bad_utf8 = deflated(&[b'a', 0xff, b'b']);
        for (input, code, rule) in [
            (
                masked(0xC2, &bomb),
                1009,
                "message too big once decompressed",
            ),
            (
                masked(0xC2, &[0xff, 0xff, 0xff]),
                1007,
                "compressed message does not decompress",
            ),
            (masked(0xC1, &bad_utf8), 1007, "text message is not UTF-8"),
        ] {
            let (messages, out, end) = run_session_with(deflate_session(64 * 1024), &input, &[]);
            assert_eq!(messages, []);
            assert_eq!(end, Some(Closing::Violation { code, rule }));
            assert_eq!(&out[2..4], &code.to_be_bytes());
        }
        // The same bytes as binary are fine.
        let (messages, _, end) =
            run_session_with(deflate_session(64), &masked(0xC2, &bad_utf8), &[]);
        assert_eq!(
            (messages, end),
            (vec![(OpCode::Binary, vec![b'a', 0xff, b'b'])], None)
        );
    }

    #[test]
    fn a_frame_is_compressed_from_the_threshold_on_when_it_shrinks() {
        let json = br#"{"channel":"prices","id":"1"}"#.repeat(40);
        let mut frame = Vec::new();
        encode_frame(OpCode::Text, &json, &mut frame);
        let mut deflater = Deflater::default();
        assert_eq!(
            compress_frame(&frame, &mut deflater, Window::Full, json.len() + 1),
            None,
            "under the threshold"
        );
        for window in [Window::Full, Window::Small] {
            let compressed = compress_frame(&frame, &mut deflater, window, json.len()).unwrap();
            assert!(compressed.len() * 3 < frame.len(), "{}", compressed.len());
            assert_eq!(compressed[0], 0x80 | RSV1 | 0x1, "FIN, RSV1, text");
            // As a client reads it.
            assert_eq!(usize::from(compressed[1]), compressed.len() - 2);
            assert_eq!(
                Inflater::default().inflate(&compressed[2..], 1 << 20),
                Ok(&json[..])
            );
        }
        // What does not shrink is sent as it is.
        let mut x = 7u32;
        let noise: Vec<u8> = (0..600)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect();
        let mut frame = Vec::new();
        encode_frame(OpCode::Binary, &noise, &mut frame);
        assert_eq!(compress_frame(&frame, &mut deflater, Window::Full, 0), None);
        // Unless compression is asked for whatever it gives.
        let mut out = Vec::new();
        encode_compressed(
            OpCode::Binary,
            &noise,
            &mut deflater,
            Window::Full,
            &mut out,
        );
        assert_eq!(out[0], 0x80 | RSV1 | 0x2);
        assert!(out.len() > frame.len());
        // Control frames are never compressed.
        let mut ping = Vec::new();
        encode_frame(OpCode::Ping, &json[..100], &mut ping);
        assert_eq!(compress_frame(&ping, &mut deflater, Window::Full, 0), None);
    }

    #[test]
    fn echo_fragments_reassemble_to_the_message() {
        let mut out = Vec::new();
        encode_fragment(true, OpCode::Text, false, b"Hel", &mut out);
        encode_fragment(false, OpCode::Text, true, b"lo", &mut out);
        assert_eq!(
            out,
            vec![0x01, 0x03, b'H', b'e', b'l', 0x80, 0x02, b'l', b'o']
        );
    }

    // ---- Properties (proptest) ----

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use proptest::sample::Index;

        /// Bytes of `len` from a seed: cheap to generate even for 64 KiB,
        /// where a proptest `vec(any::<u8>())` would be slow to build and shrink.
        fn seeded_bytes(len: usize, seed: u64) -> Vec<u8> {
            let mut rng = XorShift(seed | 1);
            (0..len).map(|_| rng.next() as u8).collect()
        }

        /// Sorted cut points into `0..=len` from proptest indices.
        fn cuts(indices: &[Index], len: usize) -> Vec<usize> {
            let mut cuts: Vec<usize> = indices.iter().map(|i| i.index(len + 1)).collect();
            cuts.sort_unstable();
            cuts
        }

        /// A server frame (as `encode_*` writes it) turned into the client
        /// frame a peer would send: MASK bit set, key inserted after the
        /// length, payload masked.
        fn mask_server_frame(frame: &[u8], key: [u8; 4]) -> Vec<u8> {
            let head_len = match frame[1] {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            assert_eq!(frame[1] & 0x80, 0, "servers do not mask");
            let mut out = frame[..head_len].to_vec();
            out[1] |= 0x80;
            out.extend_from_slice(&key);
            out.extend(
                frame[head_len..]
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ key[i % 4]),
            );
            out
        }

        /// One data message as the client sends it: its fragments, and a
        /// control frame (ping when `true`, else pong) after some of them.
        #[derive(Debug, Clone)]
        struct Message {
            opcode: OpCode,
            payload: Vec<u8>,
            /// Sent compressed (permessage-deflate): the fragments are cut
            /// from the compressed bytes, the first has RSV1.
            compressed: bool,
            /// Fragment boundaries in what is sent.
            indices: Vec<Index>,
            /// After fragment i (when there is an entry i): a control frame.
            controls: Vec<Option<(bool, Vec<u8>)>>,
        }

        fn message() -> impl Strategy<Value = Message> {
            let text = any::<String>().prop_map(|s| (OpCode::Text, s.into_bytes()));
            let binary =
                prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| (OpCode::Binary, b));
            let control = prop::option::weighted(
                0.3,
                (any::<bool>(), prop::collection::vec(any::<u8>(), 0..=125)),
            );
            (
                prop_oneof![text, binary],
                any::<bool>(),
                prop::collection::vec(any::<Index>(), 0..5),
                prop::collection::vec(control, 0..6),
            )
                .prop_map(|((opcode, payload), compressed, indices, controls)| {
                    Message {
                        opcode,
                        payload,
                        compressed,
                        indices,
                        controls,
                    }
                })
        }

        /// What a valid client stream of `messages` must decode to: its
        /// frames, the messages the session hands over and the pongs it writes.
        struct Expected {
            stream: Vec<u8>,
            frames: Vec<Frame>,
            messages: Vec<(OpCode, Vec<u8>)>,
            pongs: Vec<u8>,
        }

        fn build(messages: &[Message], mask_seed: u64) -> Expected {
            let mut rng = XorShift(mask_seed | 1);
            let mut e = Expected {
                stream: Vec::new(),
                frames: Vec::new(),
                messages: Vec::new(),
                pongs: Vec::new(),
            };
            let mut push =
                |e: &mut Expected, fin: bool, compressed: bool, opcode: OpCode, payload: &[u8]| {
                    let key = (rng.next() as u32).to_be_bytes();
                    let b0 = u8::from(fin) << 7 | u8::from(compressed) << 6 | opcode.bits();
                    e.stream.extend(client_frame(b0, payload, key));
                    e.frames.push(Frame {
                        header: FrameHeader {
                            compressed,
                            ..header(fin, opcode, payload.len() as u64)
                        },
                        payload: payload.to_vec(),
                    });
                };
            for m in messages {
                let sent = if m.compressed {
                    deflated(&m.payload)
                } else {
                    m.payload.clone()
                };
                let fragments = pieces(&sent, &cuts(&m.indices, sent.len()));
                let last = fragments.len() - 1;
                for (i, fragment) in fragments.iter().enumerate() {
                    let opcode = if i == 0 {
                        m.opcode
                    } else {
                        OpCode::Continuation
                    };
                    push(&mut e, i == last, m.compressed && i == 0, opcode, fragment);
                    if let Some(Some((ping, payload))) = m.controls.get(i) {
                        let opcode = if *ping { OpCode::Ping } else { OpCode::Pong };
                        push(&mut e, true, false, opcode, payload);
                        if *ping {
                            encode_frame(OpCode::Pong, payload, &mut e.pongs);
                        }
                    }
                }
                e.messages.push((m.opcode, m.payload.clone()));
            }
            e
        }

        proptest! {
            /// (a) A valid client stream (text/binary messages, fragmented,
            /// some compressed, pings and pongs between fragments, a random
            /// key per frame)
            /// decodes to the same frames, and the session to the same
            /// messages and pongs, wherever the stream is cut.
            #[test]
            fn any_chunking_gives_the_same_frames_and_messages(
                messages in prop::collection::vec(message(), 0..5),
                mask_seed in any::<u64>(),
                split in prop::collection::vec(any::<Index>(), 0..12),
            ) {
                let e = build(&messages, mask_seed);
                let cuts = cuts(&split, e.stream.len());
                let mut dec = FrameDecoder::new(WS_MESSAGE_BYTES_MAX);
                dec.accept_compressed();
                prop_assert_eq!(decode_split(&mut dec, &e.stream, &cuts), Ok(e.frames));
                let session = || deflate_session(WS_MESSAGE_BYTES_MAX);
                let (got, out, end) = run_session_with(session(), &e.stream, &cuts);
                prop_assert_eq!(end, None);
                prop_assert_eq!(got, e.messages);
                prop_assert_eq!(out, e.pongs);

                // A close frame after it all ends the session, echoing the code.
                let mut stream = e.stream.clone();
                stream.extend(masked(0x88, &[0x03, 0xE8]));
                let (_, out, end) = run_session_with(session(), &stream, &cuts);
                prop_assert_eq!(end, Some(Closing::PeerClosed { code: Some(1000) }));
                prop_assert!(out.ends_with(&[0x88, 0x02, 0x03, 0xE8]));
            }

            /// (b) Server frames from `encode_frame` / `encode_fragment`,
            /// masked as a client would send them, decode to the opcode, FIN
            /// and payload they were encoded with (7-, 16- and 64-bit lengths).
            #[test]
            fn encoded_frames_decode_to_what_was_encoded(
                frames in prop::collection::vec(
                    (
                        prop_oneof![0usize..=125, 126usize..=300, 65_530usize..=65_600],
                        any::<u64>(),
                        0usize..4,
                        any::<[u8; 4]>(),
                    ),
                    1..6,
                ),
                chunk in 1usize..5000,
            ) {
                let mut stream = Vec::new();
                let mut want = Vec::new();
                let mut open = false; // a fragmented message is in progress
                for (i, &(len, seed, kind, key)) in frames.iter().enumerate() {
                    let mut out = Vec::new();
                    let (fin, opcode, payload) = match kind {
                        // Control frames: at most 125 bytes, always FIN.
                        0 => {
                            let payload = seeded_bytes(len.min(125), seed);
                            let opcode = [OpCode::Ping, OpCode::Pong, OpCode::Close][(seed % 3) as usize];
                            encode_frame(opcode, &payload, &mut out);
                            (true, opcode, payload)
                        }
                        // A whole message, unless one is open.
                        1 if !open => {
                            let payload = seeded_bytes(len, seed);
                            encode_frame(OpCode::Binary, &payload, &mut out);
                            (true, OpCode::Binary, payload)
                        }
                        // A fragment: first or continuation, ending the
                        // message at random and always at the last frame.
                        _ => {
                            let payload = seeded_bytes(len, seed);
                            let fin = seed % 2 == 0 || i == frames.len() - 1;
                            let first = !open;
                            encode_fragment(first, OpCode::Text, fin, &payload, &mut out);
                            open = !fin;
                            let op = if first { OpCode::Text } else { OpCode::Continuation };
                            (fin, op, payload)
                        }
                    };
                    let mut head = [0; WS_SERVER_HEAD_BYTES_MAX];
                    let n = encode_frame_head(fin, opcode, payload.len() as u64, &mut head);
                    prop_assert_eq!(&out[..n], &head[..n]);
                    prop_assert_eq!(n, match payload.len() { 0..=125 => 2, 126..=65_535 => 4, _ => 10 });
                    stream.extend(mask_server_frame(&out, key));
                    want.push(Frame { header: header(fin, opcode, payload.len() as u64), payload });
                }
                let mut dec = FrameDecoder::new(u64::MAX >> 1);
                prop_assert!(decode_chunked(&mut dec, &stream, chunk) == Ok(want));
            }

            /// (b) `encode_close` round-trips through the session: a client
            /// sending it gets its code echoed (the reason cut to fit 125 bytes
            /// on a char boundary, and still UTF-8).
            #[test]
            fn encoded_close_round_trips(code in prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999], reason in ".{0,80}", key in any::<[u8; 4]>()) {
                let mut out = Vec::new();
                encode_close(code, &reason, &mut out);
                prop_assert!(out.len() <= 2 + 125);
                let (c, r) = parse_close_payload(&out[2..]).unwrap().unwrap();
                prop_assert_eq!(c, code);
                prop_assert!(reason.starts_with(r) && (r.len() == reason.len() || r.len() > 119));
                let (_, reply, end) = run_session(&mask_server_frame(&out, key), 1);
                prop_assert_eq!(end, Some(Closing::PeerClosed { code: Some(code) }));
                prop_assert_eq!(&reply[2..], &code.to_be_bytes()[..]);
            }

            /// (c) `Utf8Stream` over any cutting of any bytes agrees with
            /// `std::str::from_utf8` on the whole, and fails in the piece that
            /// holds the first byte that cannot continue a valid sequence.
            #[test]
            fn utf8_stream_agrees_with_std(
                text in any::<String>(),
                noise in prop::collection::vec((any::<Index>(), any::<u8>()), 0..3),
                split in prop::collection::vec(any::<Index>(), 0..10),
            ) {
                // Mostly UTF-8, with a few bytes overwritten.
                let mut bytes = text.into_bytes();
                for (i, b) in &noise {
                    if !bytes.is_empty() {
                        let i = i.index(bytes.len());
                        bytes[i] = *b;
                    }
                }
                let whole = core::str::from_utf8(&bytes);
                let fails_at = whole.as_ref().err().and_then(|e| {
                    let lead_ok = matches!(bytes[e.valid_up_to()], 0xC2..=0xF4);
                    e.error_len().map(|n| e.valid_up_to() + if lead_ok { n } else { 0 })
                });
                let cuts = cuts(&split, bytes.len());
                let mut stream = Utf8Stream::default();
                let mut start = 0;
                let mut failed_in = None;
                for end in cuts.iter().copied().chain([bytes.len()]) {
                    if stream.feed(&bytes[start..end]).is_err() {
                        failed_in = Some(start..end);
                        break;
                    }
                    start = end;
                }
                match (fails_at, failed_in) {
                    (None, None) => prop_assert_eq!(stream.finish().is_ok(), whole.is_ok()),
                    (Some(i), Some(piece)) => prop_assert!(piece.contains(&i), "{:?} {}", piece, i),
                    (want, got) => prop_assert!(false, "std fails at {:?}, stream in {:?}", want, got),
                }
            }
        }
    }
}
