//! HTTP/1.1 request heads: parsing (httparse), classification into the
//! gateway's endpoints, and the plain responses the gateway writes itself.
//!
//! A partial head is a state ([`Parsed::Partial`]), not an error: the caller
//! keeps the bytes and calls again with more.

/// Limits applied while parsing a head. Defaults come from [`crate::limits`].
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub head_bytes_max: usize,
    pub headers_max: usize,
    pub url_bytes_max: usize,
    pub channel_name_bytes_max: usize,
    pub channels_per_connection_max: usize,
}

impl Default for HeadLimits {
    fn default() -> Self { todo!() }
}

/// A cursor into the gateway's message sequence: "every message after this id".
pub type Cursor = u64;

/// What a complete, valid request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET /ws?channel=A&channel=B[&since=N]` with a valid RFC 6455 upgrade.
    WebSocket {
        channels: Vec<String>,
        /// The `Sec-WebSocket-Accept` value for the client's key (28 base64 chars).
        accept: String,
        since: Option<Cursor>,
    },
    /// `GET /events?channel=A` with `Accept: text/event-stream`; the resume
    /// point is the `Last-Event-ID` header, or a `since` query parameter.
    Sse { channels: Vec<String>, last_event_id: Option<Cursor> },
    /// `GET /events?channel=A[&since=N]` without `Accept: text/event-stream`.
    LongPoll { channels: Vec<String>, since: Option<Cursor>, keep_alive: bool },
    /// `GET /healthz`.
    Health { keep_alive: bool },
}

/// Result of feeding bytes to [`parse_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet; call again with more bytes.
    Partial,
    /// A complete head of `head_len` bytes (bytes after it belong to the next
    /// request or to the WebSocket stream).
    Complete { request: Request, head_len: usize },
}

/// Why a request was refused: every variant maps to one HTTP status. Named
/// after the rule that was broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// httparse refused the head (bad token, bad version, bad header line…). 400
    MalformedHead,
    /// The head is over `head_bytes_max` without being complete. 431
    HeadTooLarge,
    /// More than `headers_max` headers. 431
    TooManyHeaders,
    /// The request target is over `url_bytes_max`. 414
    UrlTooLong,
    /// The path is none of ours. 404
    NotFound,
    /// A method other than GET (HEAD is not served either). 405 with `Allow: GET`
    MethodNotAllowed,
    /// A request with a body (Content-Length > 0 or Transfer-Encoding). 400
    BodyNotAllowed,
    /// `/ws` without `Upgrade: websocket` and `Connection: upgrade`, or not HTTP/1.1. 400
    NotAnUpgrade,
    /// `Sec-WebSocket-Version` is not 13. 426 with `Sec-WebSocket-Version: 13`
    UnsupportedWebSocketVersion,
    /// `Sec-WebSocket-Key` missing, repeated, or not base64 of 16 bytes. 400
    BadWebSocketKey,
    /// No `channel` parameter. 400
    NoChannel,
    /// More channels than `channels_per_connection_max`. 400
    TooManyChannels,
    /// A channel name that is empty, too long or outside the charset. 400
    BadChannelName,
    /// `since` / `Last-Event-ID` that is not a decimal u64. 400
    BadCursor,
    /// Bad percent-encoding or a non-UTF-8 query. 400
    BadQuery,
}

impl Reject {
    /// The HTTP status code for this rule.
    pub fn status(&self) -> u16 { todo!() }
    /// A short, stable, lowercase reason written in the response body and logs
    /// (e.g. "head too large").
    pub fn reason(&self) -> &'static str { todo!() }
}

/// Parses and classifies one request head at the start of `buf`.
///
/// Never panics, whatever the bytes. Limits are checked even on a partial head
/// (a head over `head_bytes_max` without its end is `HeadTooLarge`, not Partial).
/// Channel names are percent-decoded, then validated (1..=max bytes, charset
/// [`crate::limits::CHANNEL_NAME_CHARSET`]); duplicates are removed keeping the
/// first occurrence's order.
pub fn parse_request(buf: &[u8], limits: &HeadLimits) -> Result<Parsed, Reject> { todo!() }

/// Is `name` a valid channel name (length and charset)? Used by ingest too.
pub fn valid_channel_name(name: &[u8], max_bytes: usize) -> bool { todo!() }

/// Parses a cursor (`since`, `Last-Event-ID`): a decimal u64, no sign, no
/// spaces, at most 20 digits.
pub fn parse_cursor(s: &[u8]) -> Option<Cursor> { todo!() }

/// The complete response for a refused request: status line, `Content-Type:
/// text/plain`, `Content-Length`, `Connection: close`, the extra header the
/// rule needs (`Allow: GET`, `Sec-WebSocket-Version: 13`), and the reason plus
/// "\n" as the body.
pub fn reject_response(reject: &Reject) -> Vec<u8> { todo!() }

/// `200 OK` for `/healthz`, `Content-Type: application/json`, body
/// `{"status":"ok","connections_per_core":[3,4]}` + "\n" (`Connection: close`
/// when `!keep_alive`).
pub fn health_response(connections_per_core: &[u64], keep_alive: bool) -> Vec<u8> { todo!() }
