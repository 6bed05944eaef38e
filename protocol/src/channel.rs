//! Channel names: what a client may subscribe to and a publisher publish
//! on. Exact names, compared byte for byte (no prefix matching).

/// Is `name` a valid channel name: 1 to `max_bytes` bytes of
/// [`crate::limits::CHANNEL_NAME_CHARSET`]?
pub fn valid_channel_name(name: &[u8], max_bytes: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_bytes
        && name.iter().all(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@' | b'/')
        })
}
