//! RFC 6455 on the server side: the opening handshake, a streaming frame
//! decoder and a frame encoder that writes into the caller's buffer.

/// Opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode { Continuation, Text, Binary, Close, Ping, Pong }

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

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(sha1(key + GUID)).
pub fn accept_key(key: &[u8]) -> String { todo!() }

/// The `101 Switching Protocols` response head for an accept value.
pub fn switching_protocols_response(accept: &str) -> Vec<u8> { todo!() }

/// A frame header as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader { pub fin: bool, pub opcode: OpCode, pub payload_len: u64 }

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
    pub fn close_code(&self) -> u16 { todo!() }
}

/// Streaming decoder of client frames. Feed it any chunking of the byte
/// stream, down to one byte at a time. It keeps at most a partial frame header
/// (≤ 14 bytes) and the unmasking position; payload is never buffered here —
/// it is unmasked in place in the caller's buffer and reported by range.
/// It also tracks fragmentation (continuation rules) and the message size.
#[derive(Debug, Clone)]
pub struct FrameDecoder { /* ≤ 48 bytes, asserted at compile time */ }

impl FrameDecoder {
    pub fn new(message_bytes_max: u64) -> Self { todo!() }

    /// Decodes from the start of `input`. Returns how many bytes were consumed
    /// and at most one event; call again with `&mut input[consumed..]` until it
    /// consumes nothing and returns no event. Payload ranges refer to the slice
    /// passed in this call. After an error the decoder must not be used again.
    pub fn decode(&mut self, input: &mut [u8]) -> Result<(usize, Option<FrameEvent>), FrameError> { todo!() }
}

/// Writes a server frame header (never masked) into `head` and returns its
/// length (2, 4 or 10 bytes).
pub fn encode_frame_head(fin: bool, opcode: OpCode, payload_len: u64, head: &mut [u8; crate::limits::WS_SERVER_HEAD_BYTES_MAX]) -> usize { todo!() }

/// Appends a whole unfragmented server frame to `out`.
pub fn encode_frame(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) { todo!() }

/// Appends a close frame with `code` and `reason` (reason truncated on a
/// char boundary so the payload stays ≤ 125 bytes).
pub fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) { todo!() }

/// Parses a received close payload: empty → Ok(None); 1 byte → Err; code
/// outside the sendable ranges (RFC 6455 §7.4: 1000–1003, 1007–1011, 3000–4999)
/// → Err; reason not UTF-8 → Err(1007 case). Returns (code, reason).
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<(u16, &str)>, CloseError> { todo!() }

/// Why a close payload is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseError {
    /// One byte only, or a code that must not be sent. 1002
    InvalidCloseCode,
    /// Reason not UTF-8. 1007
    InvalidReasonUtf8,
}
