//! Default limits. Each one bounds something a client or publisher controls.
//! The gateway's configuration starts from these values; the parsers take the
//! limits as arguments so tests can cross them.

/// A request head larger than this is answered 431. Browsers send 0.5–2 KiB;
/// the head is buffered per connection only until it is complete.
pub const HEAD_BYTES_MAX: usize = 8 * 1024;
/// More headers than this is answered 431. Header slots live on the stack
/// during parsing (`httparse::EMPTY_HEADER` × this), 32 bytes each.
pub const HEADERS_MAX: usize = 48;
/// A request target longer than this is answered 414.
pub const URL_BYTES_MAX: usize = 4 * 1024;
/// Channel names are at most this long (bytes) and use [`CHANNEL_NAME_CHARSET`].
pub const CHANNEL_NAME_BYTES_MAX: usize = 128;
/// Human-readable description of the channel name charset.
pub const CHANNEL_NAME_CHARSET: &str = "A-Z a-z 0-9 _ - . : @ /";
/// Longest SSE event name a publisher may set (it becomes an `event:` line).
pub const EVENT_NAME_BYTES_MAX: usize = 64;
/// A connection subscribes to at most this many channels.
pub const CHANNELS_PER_CONNECTION_MAX: usize = 16;
/// A WebSocket message from a client (all fragments together) above this is
/// closed with 1009. The gateway reads client messages only for control.
pub const WS_MESSAGE_BYTES_MAX: u64 = 64 * 1024;
/// RFC 6455 §5.5: control frames carry at most 125 payload bytes.
pub const WS_CONTROL_PAYLOAD_BYTES_MAX: usize = 125;
/// Server frame header: 2 + 8 (64-bit length), never masked.
pub const WS_SERVER_HEAD_BYTES_MAX: usize = 10;
/// A long-poll response carries at most this many messages; the client polls
/// again with the returned cursor for the rest.
pub const LONGPOLL_MESSAGES_MAX: usize = 256;
/// PROXY protocol v1: the longest line a receiver must accept, CRLF included
/// ("PROXY UNKNOWN" with two full-length IPv6 addresses and ports,
/// proxy-protocol.txt §2.1). A line without its CRLF by then is refused.
pub const PROXY_V1_BYTES_MAX: usize = 107;
/// PROXY protocol v2: the longest header accepted (16 fixed bytes, the
/// address block and its TLVs). The 16-bit length field would allow
/// 16 + 65535 bytes, but the spec sizes both versions to fit the smallest TCP
/// segment every host must accept (576 − 40 = 536 bytes, §2) and has the
/// sender write the header at once; a longer one is refused rather than
/// buffered. It is held per connection only until complete, and leaves 484
/// bytes of TLVs after IPv6 addresses (e.g. ALPN, authority, a 128-byte
/// unique ID and the SSL sub-TLVs).
pub const PROXY_V2_BYTES_MAX: usize = 536;

// The v2 limit holds the largest address block (AF_UNIX, 2 × 108 bytes) and
// is no more than the length field can say; a buffer of PROXY_V2_BYTES_MAX
// holds a header of either version.
const _: () = assert!(PROXY_V2_BYTES_MAX >= 16 + 216 && PROXY_V2_BYTES_MAX <= 16 + 0xFFFF);
const _: () = assert!(PROXY_V1_BYTES_MAX <= PROXY_V2_BYTES_MAX);
