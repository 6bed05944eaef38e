//! Server-Sent Events (HTML Living Standard, "server-sent events").

/// The response head that opens an event stream.
pub fn stream_response_head() -> &'static [u8] { todo!() }

/// Appends one event. `data` is text: each line (split on "\r\n", "\r" or "\n")
/// becomes its own `data:` line, so a multi-line payload survives; an empty
/// payload is one empty `data:` line. `id`/`event` must not contain CR/LF (the
/// caller guarantees it; debug_assert). Ends with the blank line.
pub fn encode_event(out: &mut Vec<u8>, id: Option<&str>, event: Option<&str>, data: &str) { todo!() }

/// Appends a `retry:` field (milliseconds) followed by a blank line.
pub fn encode_retry(out: &mut Vec<u8>, retry_ms: u32) { todo!() }

/// Appends a comment line (`: text`), used as a heartbeat; CR/LF in `text`
/// are replaced by spaces.
pub fn encode_comment(out: &mut Vec<u8>, text: &str) { todo!() }
