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
