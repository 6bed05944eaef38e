//! HTTP/1.1 request heads: parsing (httparse), classification into the
//! gateway's endpoints, and the plain responses the gateway writes itself.
//!
//! A partial head is a state ([`Parsed::Partial`]), not an error: the caller
//! keeps the bytes and calls again with more.

use std::borrow::Cow;

use base64::Engine as _;

use crate::channel::valid_channel_name;
use crate::id::{parse_cursor, Cursor};
use crate::limits;

/// Limits applied while parsing a head. Defaults come from [`crate::limits`].
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub head_bytes_max: usize,
    pub headers_max: usize,
    pub url_bytes_max: usize,
    pub channel_name_bytes_max: usize,
    pub channels_per_connection_max: usize,
    /// The path of the WebSocket echo endpoint (conformance testing), or
    /// `None` when it is not served: then that path is 404 like any other.
    pub echo_path: Option<&'static str>,
    /// The WebSocket subprotocols the server speaks
    /// (`Sec-WebSocket-Protocol`), each a token; see [`crate::ws::choose_subprotocol`].
    pub ws_subprotocols: &'static [String],
    /// permessage-deflate is offered back to WebSocket clients that ask
    /// for it (see [`crate::deflate::negotiate`]).
    pub ws_deflate: bool,
    /// The largest body of a `POST /publish` (a client's message).
    pub publish_body_bytes_max: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits {
            head_bytes_max: limits::HEAD_BYTES_MAX,
            headers_max: limits::HEADERS_MAX,
            url_bytes_max: limits::URL_BYTES_MAX,
            channel_name_bytes_max: limits::CHANNEL_NAME_BYTES_MAX,
            channels_per_connection_max: limits::CHANNELS_PER_CONNECTION_MAX,
            echo_path: None,
            ws_subprotocols: &[],
            ws_deflate: true,
            publish_body_bytes_max: limits::WS_MESSAGE_BYTES_MAX as usize,
        }
    }
}

/// What a complete, valid request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET /ws?channel=A&channel=B[&since=N]` with a valid RFC 6455 upgrade.
    WebSocket {
        channels: Vec<String>,
        /// The `Sec-WebSocket-Accept` value for the client's key (28 base64 chars).
        accept: String,
        /// The subprotocol the server answers with: the first the client
        /// offered that [`HeadLimits::ws_subprotocols`] holds, if any.
        protocol: Option<&'static str>,
        /// What permessage-deflate offer was accepted, if any.
        deflate: Option<crate::deflate::Agreement>,
        since: Option<Cursor>,
        /// The presented token (see [`Request::token`]).
        token: Option<Box<str>>,
    },
    /// `GET /events?channel=A` with `Accept: text/event-stream`; the resume
    /// point is the `Last-Event-ID` header, or a `since` query parameter.
    Sse {
        channels: Vec<String>,
        last_event_id: Option<Cursor>,
        token: Option<Box<str>>,
        /// An HTTP/1.1 request: the stream is a chunked body (HTTP/1.0 has
        /// no chunked coding; its stream ends with the connection).
        chunked: bool,
    },
    /// `GET /events?channel=A[&since=N]` without `Accept: text/event-stream`.
    LongPoll {
        channels: Vec<String>,
        since: Option<Cursor>,
        keep_alive: bool,
        token: Option<Box<str>>,
    },
    /// `GET /healthz`: the process is alive. `head`: it was a `HEAD`
    /// (balancers check health with it), answered without the body
    /// ([`without_body`]).
    Health { keep_alive: bool, head: bool },
    /// `GET /readyz`: the process takes new clients (not draining); `head`
    /// as for `Health`.
    Ready { keep_alive: bool, head: bool },
    /// `OPTIONS /events`: a CORS preflight (a cross-origin `fetch` with
    /// `Authorization`, or an EventSource polyfill); answered by the origin
    /// allowlist (`origin::Origins::preflight_response`).
    Preflight { keep_alive: bool },
    /// `POST /publish?channel=A[&address=ADDR]` with a body of
    /// `body_bytes` (Content-Length): an SSE or long-poll client's message
    /// for the hubs, from the stream at `address` if it names one.
    Publish {
        channel: String,
        address: Option<crate::upstream::Address>,
        body_bytes: usize,
        keep_alive: bool,
        token: Option<Box<str>>,
    },
    /// `OPTIONS /publish`: the CORS preflight of a cross-origin `POST`
    /// (`Origins::publish_preflight_response`).
    PublishPreflight { keep_alive: bool },
    /// `GET <echo_path>` with a valid RFC 6455 upgrade: a WebSocket that
    /// echoes every message, for conformance testing; only when
    /// [`HeadLimits::echo_path`] is set.
    Echo {
        accept: String,
        protocol: Option<&'static str>,
        deflate: Option<crate::deflate::Agreement>,
    },
}

impl Request {
    /// The token a subscribing request presented: `Authorization: Bearer
    /// <token>` ([`crate::token::bearer`]), or else a `token` query parameter
    /// (percent-decoded), since browsers cannot set headers on WebSocket or
    /// EventSource. `None` for the other requests, and when neither is there
    /// (a repeated `token` parameter is `BadQuery`). Whether one is required
    /// is the server's decision.
    pub fn token(&self) -> Option<&str> {
        match self {
            Request::WebSocket { token, .. }
            | Request::Sse { token, .. }
            | Request::LongPoll { token, .. }
            | Request::Publish { token, .. } => token.as_deref(),
            _ => None,
        }
    }
}

/// Result of feeding bytes to [`parse_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet; call again with more bytes.
    Partial,
    /// A complete head of `head_len` bytes (bytes after it belong to the next
    /// request or to the WebSocket stream).
    Complete {
        request: Request,
        head_len: usize,
        /// The `Origin` header, for the allowlist (see the `origin` module).
        origin: Option<String>,
    },
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
    /// A method other than GET (HEAD on the health checks, OPTIONS on
    /// `/events`). 405 with `Allow: GET`
    MethodNotAllowed,
    /// An HTTP/1.1 request without `Host`, or any with more than one, or
    /// one whose value is not a host and port (RFC 9112 §3.2). 400
    BadHost,
    /// A request with a body (Content-Length > 0 or Transfer-Encoding). 400
    BodyNotAllowed,
    /// `/publish` with a method other than POST (or OPTIONS, the
    /// preflight). 405 with `Allow: POST, OPTIONS`
    PostOnly,
    /// `POST /publish` without a Content-Length (chunked bodies are not
    /// taken). 411
    LengthRequired,
    /// A body over `publish_body_bytes_max`. 413
    PayloadTooLarge,
    /// `address` is not a connection address. 400
    BadAddress,
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
    /// `Origin` repeated, or not printable ASCII. 400
    BadOrigin,
}

impl Reject {
    /// The HTTP status code for this rule.
    pub fn status(&self) -> u16 {
        match self {
            Reject::HeadTooLarge | Reject::TooManyHeaders => 431,
            Reject::UrlTooLong => 414,
            Reject::NotFound => 404,
            Reject::MethodNotAllowed | Reject::PostOnly => 405,
            Reject::LengthRequired => 411,
            Reject::PayloadTooLarge => 413,
            Reject::UnsupportedWebSocketVersion => 426,
            Reject::MalformedHead
            | Reject::BadHost
            | Reject::BodyNotAllowed
            | Reject::NotAnUpgrade
            | Reject::BadWebSocketKey
            | Reject::NoChannel
            | Reject::TooManyChannels
            | Reject::BadChannelName
            | Reject::BadCursor
            | Reject::BadQuery
            | Reject::BadAddress
            | Reject::BadOrigin => 400,
        }
    }

    /// A short, stable, lowercase reason written in the response body and logs
    /// (e.g. "head too large").
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::MalformedHead => "malformed head",
            Reject::HeadTooLarge => "head too large",
            Reject::TooManyHeaders => "too many headers",
            Reject::UrlTooLong => "url too long",
            Reject::NotFound => "not found",
            Reject::MethodNotAllowed | Reject::PostOnly => "method not allowed",
            Reject::LengthRequired => "length required",
            Reject::PayloadTooLarge => "payload too large",
            Reject::BadAddress => "bad address",
            Reject::BadHost => "bad host",
            Reject::BodyNotAllowed => "body not allowed",
            Reject::NotAnUpgrade => "not an upgrade",
            Reject::UnsupportedWebSocketVersion => "unsupported websocket version",
            Reject::BadWebSocketKey => "bad websocket key",
            Reject::NoChannel => "no channel",
            Reject::TooManyChannels => "too many channels",
            Reject::BadChannelName => "bad channel name",
            Reject::BadCursor => "bad cursor",
            Reject::BadQuery => "bad query",
            Reject::BadOrigin => "bad origin",
        }
    }
}

/// Header slots on the stack while parsing. `limits.headers_max` above this is
/// capped to it (a head with more headers is refused as `TooManyHeaders`).
const HEADER_SLOTS: usize = limits::HEADERS_MAX;

/// Parses and classifies one request head at the start of `buf`.
///
/// Never panics, whatever the bytes. Limits are checked even on a partial head
/// (a head over `head_bytes_max` without its end is `HeadTooLarge`, not Partial).
/// Channel names are percent-decoded, then validated (1..=max bytes, charset
/// [`crate::limits::CHANNEL_NAME_CHARSET`]); duplicates are removed keeping the
/// first occurrence's order.
///
/// Checks run in this order, the first broken rule answering: head syntax and
/// size limits, URL length, `Host` (exactly one in HTTP/1.1, at most one in
/// HTTP/1.0), path (an unknown path is 404 whatever the method; an
/// absolute-form target, `http://host/path`, is taken by its path), method
/// (GET; HEAD on the health checks; OPTIONS on `/events` is a CORS
/// preflight), body,
/// `Origin`; then for `/ws` the upgrade headers, version and key;
/// then the query (`channel`, `since`) and, for SSE, `Last-Event-ID`. A
/// repeated `since` or `Last-Event-ID` is `BadCursor`; an empty
/// `Last-Event-ID` is ignored (the `since` parameter, if any, applies).
pub fn parse_request(buf: &[u8], limits: &HeadLimits) -> Result<Parsed, Reject> {
    // Only the first `head_bytes_max` bytes can hold an acceptable head, so
    // httparse never looks further: this bounds the work per call however much
    // the client sent.
    let window = buf.get(..limits.head_bytes_max).unwrap_or(buf);

    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    // Handing httparse exactly `headers_max` slots makes it enforce the limit.
    let slots_used = limits.headers_max.min(HEADER_SLOTS);
    let mut req = httparse::Request::new(&mut slots[..slots_used]);

    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // The URL limit is checked before the size limit: it is the more
            // precise answer when an over-long URL is what fills the head.
            if partial_url_len(window, &req) > limits.url_bytes_max {
                return Err(Reject::UrlTooLong);
            }
            // A head that has not ended within `head_bytes_max` bytes would be
            // longer than that once it does end.
            if buf.len() >= limits.head_bytes_max {
                return Err(Reject::HeadTooLarge);
            }
            return Ok(Parsed::Partial);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::TooManyHeaders),
        Err(_) => return Err(Reject::MalformedHead),
    };

    // A complete parse fills method, path and version; treat anything else
    // as malformed rather than trusting it.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Reject::MalformedHead);
    };
    if target.len() > limits.url_bytes_max {
        return Err(Reject::UrlTooLong);
    }
    let head = Head {
        headers: req.headers,
    };
    match head.single("host") {
        Ok(Some(host)) if valid_host(host) => {}
        Ok(None) if version == 0 => {}
        _ => return Err(Reject::BadHost),
    }

    let target = origin_form(target)?;
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, query),
        None => (target, ""),
    };
    let endpoint = match path {
        "/ws" => Endpoint::WebSocket,
        "/events" => Endpoint::Events,
        "/healthz" => Endpoint::Health,
        "/readyz" => Endpoint::Ready,
        // Its own rules: a POST with a body.
        "/publish" => return publish(&head, method, version, query, head_len, limits),
        p if Some(p) == limits.echo_path => Endpoint::Echo,
        _ => return Err(Reject::NotFound),
    };
    let preflight = method == "OPTIONS" && matches!(endpoint, Endpoint::Events);
    let head_only = method == "HEAD" && matches!(endpoint, Endpoint::Health | Endpoint::Ready);
    if method != "GET" && !preflight && !head_only {
        return Err(Reject::MethodNotAllowed);
    }
    if head.has_body() {
        return Err(Reject::BodyNotAllowed);
    }
    let keep_alive = head.keep_alive(version);
    let origin = head_origin(&head)?;
    if preflight {
        return Ok(Parsed::Complete {
            request: Request::Preflight { keep_alive },
            head_len,
            origin,
        });
    }

    let request = match endpoint {
        Endpoint::Health => Request::Health {
            keep_alive,
            head: head_only,
        },
        Endpoint::Ready => Request::Ready {
            keep_alive,
            head: head_only,
        },
        Endpoint::WebSocket => {
            // Order: upgrade headers, version, key, then the query (channels
            // and cursor), so a non-WebSocket client learns that first.
            let accept = websocket_accept(&head, version)?;
            let query = parse_query(query, limits)?;
            Request::WebSocket {
                channels: query.channels,
                accept,
                protocol: head.subprotocol(limits.ws_subprotocols),
                deflate: head.deflate(limits),
                since: query.since,
                token: head.bearer().or(query.token),
            }
        }
        Endpoint::Echo => Request::Echo {
            accept: websocket_accept(&head, version)?,
            protocol: head.subprotocol(limits.ws_subprotocols),
            deflate: head.deflate(limits),
        },
        Endpoint::Events => {
            let query = parse_query(query, limits)?;
            let wants_stream = head
                .values("accept")
                .any(|v| contains_ignore_ascii_case(v, b"text/event-stream"));
            if wants_stream {
                let last_event_id = match head.single("last-event-id") {
                    // Empty means "no id received yet": fall back to `since`.
                    Ok(None) | Ok(Some(b"")) => query.since,
                    Ok(Some(id)) => Some(parse_cursor(id).ok_or(Reject::BadCursor)?),
                    Err(Repeated) => return Err(Reject::BadCursor),
                };
                Request::Sse {
                    channels: query.channels,
                    last_event_id,
                    token: head.bearer().or(query.token),
                    chunked: version == 1,
                }
            } else {
                Request::LongPoll {
                    channels: query.channels,
                    since: query.since,
                    keep_alive,
                    token: head.bearer().or(query.token),
                }
            }
        }
    };
    Ok(Parsed::Complete {
        request,
        head_len,
        origin,
    })
}

/// `POST /publish` (or its preflight): a client's message, its length,
/// its channel and the stream it comes from.
fn publish(
    head: &Head,
    method: &str,
    version: u8,
    query: &str,
    head_len: usize,
    limits: &HeadLimits,
) -> Result<Parsed, Reject> {
    let keep_alive = head.keep_alive(version);
    let origin = head_origin(head)?;
    if method == "OPTIONS" && !head.has_body() {
        return Ok(Parsed::Complete {
            request: Request::PublishPreflight { keep_alive },
            head_len,
            origin,
        });
    }
    if method != "POST" {
        return Err(Reject::PostOnly);
    }
    if head.values("transfer-encoding").next().is_some() {
        return Err(Reject::LengthRequired);
    }
    let body_bytes = match head.single("content-length") {
        Ok(None) => return Err(Reject::LengthRequired),
        Ok(Some(v)) => std::str::from_utf8(v)
            .ok()
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or(Reject::MalformedHead)?,
        Err(Repeated) => return Err(Reject::MalformedHead),
    };
    if body_bytes > limits.publish_body_bytes_max {
        return Err(Reject::PayloadTooLarge);
    }
    let (mut channel, mut address, mut token) = (None, None, None);
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            "channel" => &mut channel,
            "address" => &mut address,
            "token" => &mut token,
            _ => continue,
        };
        if slot.is_some() {
            // One message, one channel, one stream, one token.
            return Err(Reject::BadQuery);
        }
        *slot = Some(
            percent_decode_strict(value)
                .ok_or(Reject::BadQuery)?
                .into_owned(),
        );
    }
    let channel = channel.ok_or(Reject::NoChannel)?;
    if !valid_channel_name(channel.as_bytes(), limits.channel_name_bytes_max) {
        return Err(Reject::BadChannelName);
    }
    let address = match address {
        None => None,
        Some(a) => Some(crate::upstream::Address::parse(a.as_bytes()).ok_or(Reject::BadAddress)?),
    };
    Ok(Parsed::Complete {
        request: Request::Publish {
            channel,
            address,
            body_bytes,
            keep_alive,
            token: head.bearer().or(token.map(String::into_boxed_str)),
        },
        head_len,
        origin,
    })
}

/// The request's `Origin`, if one: printable ASCII, once.
fn head_origin(head: &Head) -> Result<Option<String>, Reject> {
    match head.single("origin") {
        Ok(None) => Ok(None),
        // Printable ASCII, so this is valid UTF-8.
        Ok(Some(v)) if !v.is_empty() && v.iter().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(String::from_utf8_lossy(v).into_owned()))
        }
        _ => Err(Reject::BadOrigin),
    }
}

/// Checks an RFC 6455 opening handshake and returns its accept value.
fn websocket_accept(head: &Head, version: u8) -> Result<String, Reject> {
    if version != 1
        || !head.has_token("upgrade", "websocket")
        || !head.has_token("connection", "upgrade")
    {
        return Err(Reject::NotAnUpgrade);
    }
    match head.single("sec-websocket-version") {
        Ok(Some(b"13")) => {}
        _ => return Err(Reject::UnsupportedWebSocketVersion),
    }
    match head.single("sec-websocket-key") {
        Ok(Some(key)) if valid_websocket_key(key) => Ok(crate::ws::accept_key(key)),
        _ => Err(Reject::BadWebSocketKey),
    }
}

/// The path and query of a request target: the target itself in origin
/// form (`/ws?channel=a`); in absolute form (`http://host:port/ws?…`, what
/// a proxy-minded client sends, RFC 9112 §3.2.2) what follows the
/// authority, `/` if nothing does. Other forms are left to the path match
/// (404).
fn origin_form(target: &str) -> Result<&str, Reject> {
    let bytes = target.as_bytes();
    let scheme_len = ["http://", "https://"]
        .iter()
        .find(|s| bytes.len() >= s.len() && bytes[..s.len()].eq_ignore_ascii_case(s.as_bytes()))
        .map(|s| s.len());
    let Some(scheme_len) = scheme_len else {
        return Ok(target);
    };
    let rest = &target[scheme_len..];
    let authority_len = rest.find(['/', '?']).unwrap_or(rest.len());
    // An http(s) URI must name a host (RFC 9110 §4.2.1).
    if authority_len == 0 || !valid_host(&rest.as_bytes()[..authority_len]) {
        return Err(Reject::BadHost);
    }
    match &rest[authority_len..] {
        "" => Ok("/"),
        // `http://host?q`: the path is empty, which means `/`; the query is
        // that of no endpoint of ours.
        p if p.starts_with('?') => Ok("/"),
        p => Ok(p),
    }
}

/// A `Host` value (or an absolute target's authority): a host name, an
/// IPv4 address or a bracketed IPv6 literal, with an optional port; empty
/// is allowed (RFC 9112 §3.2: a target with no authority). No userinfo, no
/// path, no whitespace.
fn valid_host(host: &[u8]) -> bool {
    host.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'.' | b'-'
                    | b'_'
                    | b'~'
                    | b':'
                    | b'['
                    | b']'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
    })
}

/// `response` (a complete response with `Content-Length`) as the answer to
/// a `HEAD`: the same head, `Content-Length` included, and no body.
pub fn without_body(mut response: Vec<u8>) -> Vec<u8> {
    if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
        response.truncate(end + 4);
    }
    response
}

/// The endpoints, before their specific checks.
enum Endpoint {
    Echo,
    WebSocket,
    Events,
    Health,
    Ready,
}

/// How many bytes of request target a partial head shows so far (0 if the
/// request line has not reached the target yet). httparse fills `method` as
/// soon as it is complete and `path` once the target is, so a target still
/// being received is everything after the method and its space; httparse has
/// already checked those bytes are URI characters, or it would have refused.
fn partial_url_len(window: &[u8], req: &httparse::Request) -> usize {
    if let Some(path) = req.path {
        return path.len();
    }
    let Some(method) = req.method else {
        return 0;
    };
    // `method` borrows from `window`; its offset accounts for any empty lines
    // httparse skipped before the request line.
    let method_end = (method.as_ptr() as usize)
        .saturating_sub(window.as_ptr() as usize)
        .saturating_add(method.len());
    // +1 for the space after the method.
    window.len().saturating_sub(method_end.saturating_add(1))
}

/// A header appeared more than once where only one is allowed.
struct Repeated;

/// The parsed headers, with the lookups the classification needs. Names are
/// compared case-insensitively; values have optional whitespace trimmed.
struct Head<'h, 'b> {
    headers: &'h [httparse::Header<'b>],
}

impl<'b> Head<'_, 'b> {
    /// The subprotocol to answer with (see [`crate::ws::choose_subprotocol`]).
    fn subprotocol(&self, ours: &'static [String]) -> Option<&'static str> {
        crate::ws::choose_subprotocol(self.values("sec-websocket-protocol"), ours)
    }

    /// The permessage-deflate offer accepted, if the server offers it at
    /// all (a value that is not UTF-8 is no offer).
    fn deflate(&self, limits: &HeadLimits) -> Option<crate::deflate::Agreement> {
        if !limits.ws_deflate {
            return None;
        }
        crate::deflate::negotiate(
            self.values("sec-websocket-extensions")
                .filter_map(|v| std::str::from_utf8(v).ok()),
        )
    }

    /// Every value of header `name` (lowercase), in order.
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'b [u8]> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| trim_ows(h.value))
    }

    /// The value of a header that may appear at most once.
    fn single(&self, name: &str) -> Result<Option<&'b [u8]>, Repeated> {
        let mut values = self.values(name);
        let first = values.next();
        match values.next() {
            Some(_) => Err(Repeated),
            None => Ok(first),
        }
    }

    /// Does any `name` header hold `token` in its comma-separated list
    /// (case-insensitively)? E.g. `Connection: keep-alive, Upgrade`.
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name).any(|value| {
            value
                .split(|&b| b == b',')
                .any(|t| trim_ows(t).eq_ignore_ascii_case(token.as_bytes()))
        })
    }

    /// The token of the first `Authorization: Bearer <token>` header, if any.
    fn bearer(&self) -> Option<Box<str>> {
        self.values("authorization")
            .find_map(crate::token::bearer)
            .map(Box::from)
    }

    /// A body is announced by any Transfer-Encoding, or a Content-Length other
    /// than 0 (an unparsable one included).
    fn has_body(&self) -> bool {
        self.values("transfer-encoding").next().is_some()
            || self.values("content-length").any(|v| v != b"0")
    }

    /// HTTP/1.1 (`version` 1) keeps the connection by default, HTTP/1.0 does not.
    fn keep_alive(&self, version: u8) -> bool {
        if version == 1 {
            !self.has_token("connection", "close")
        } else {
            self.has_token("connection", "keep-alive")
        }
    }
}

/// Strips optional whitespace (SP / HTAB, RFC 9110 §5.6.3) at both ends.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn contains_ignore_ascii_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// RFC 6455 §4.2.1: the key is base64 of 16 bytes, i.e. 24 characters.
fn valid_websocket_key(key: &[u8]) -> bool {
    if key.len() != 24 {
        return false;
    }
    // 24 base64 characters decode to at most 18 bytes.
    let mut decoded = [0u8; 18];
    matches!(
        base64::engine::general_purpose::STANDARD.decode_slice(key, &mut decoded),
        Ok(16)
    )
}

/// The query parameters the endpoints use.
struct Query {
    channels: Vec<String>,
    since: Option<Cursor>,
    token: Option<Box<str>>,
}

/// Reads `channel` (repeated, at least one) and `since` (at most once) from a
/// query string; other parameters are ignored without being decoded.
fn parse_query(query: &str, limits: &HeadLimits) -> Result<Query, Reject> {
    let mut channels: Vec<String> = Vec::new();
    let mut since = None;
    let mut token: Option<Box<str>> = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "channel" => {
                let name = percent_decode_strict(value).ok_or(Reject::BadQuery)?;
                if !valid_channel_name(name.as_bytes(), limits.channel_name_bytes_max) {
                    return Err(Reject::BadChannelName);
                }
                if !channels.iter().any(|c| *c == *name) {
                    // Refuse as soon as the limit is crossed, so a long query of
                    // distinct names costs no more than the limit allows.
                    if channels.len() >= limits.channels_per_connection_max {
                        return Err(Reject::TooManyChannels);
                    }
                    channels.push(name.into_owned());
                }
            }
            "since" => {
                // Two resume points would be ambiguous.
                if since.is_some() {
                    return Err(Reject::BadCursor);
                }
                let value = percent_decode_strict(value).ok_or(Reject::BadQuery)?;
                since = Some(parse_cursor(value.as_bytes()).ok_or(Reject::BadCursor)?);
            }
            "token" => {
                // Two tokens would be ambiguous.
                if token.is_some() {
                    return Err(Reject::BadQuery);
                }
                token = Some(percent_decode_strict(value).ok_or(Reject::BadQuery)?.into());
            }
            _ => {}
        }
    }
    if channels.is_empty() {
        return Err(Reject::NoChannel);
    }
    Ok(Query {
        channels,
        since,
        token,
    })
}

/// Percent-decodes `s`, refusing a `%` not followed by two hex digits (which
/// `percent_decode` would pass through) and a result that is not UTF-8. `+` is
/// kept as is: this is not form decoding.
fn percent_decode_strict(s: &str) -> Option<Cow<'_, str>> {
    let bytes = s.as_bytes();
    for (i, _) in bytes.iter().enumerate().filter(|(_, &b)| b == b'%') {
        match bytes.get(i + 1..i + 3) {
            Some([a, b]) if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => {}
            _ => return None,
        }
    }
    percent_encoding::percent_decode(bytes).decode_utf8().ok()
}

/// The standard reason phrase for the statuses this module writes.
fn status_line_reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The complete response for a refused request: status line, `Content-Type:
/// text/plain`, `Content-Length`, `Connection: close`, the extra header the
/// rule needs (`Allow: GET`, `Sec-WebSocket-Version: 13`), and the reason plus
/// "\n" as the body.
pub fn reject_response(reject: &Reject) -> Vec<u8> {
    let extra = match reject {
        Reject::MethodNotAllowed => "Allow: GET\r\n",
        Reject::PostOnly => "Allow: POST, OPTIONS\r\n",
        Reject::UnsupportedWebSocketVersion => "Sec-WebSocket-Version: 13\r\n",
        _ => "",
    };
    refusal_with_header(reject.status(), extra, reject.reason())
}

/// `401 Unauthorized` for a subscribing request without a valid token:
/// `WWW-Authenticate: <www_authenticate>` (RFC 6750 §3, e.g. `Bearer
/// error="invalid_token"`), `Connection: close`, `reason` plus "\n" as the
/// body. Both must be one line of ASCII.
/// `cors` is the request's CORS header lines (see the `origin` module), so a
/// cross-origin page can read the status and fetch a new token.
pub fn unauthorized_response(www_authenticate: &str, reason: &str, cors: &str) -> Vec<u8> {
    refusal_with_header(
        401,
        &format!("WWW-Authenticate: {www_authenticate}\r\n{cors}"),
        reason,
    )
}

/// `403 Forbidden` with `reason` plus "\n" as the body and `Connection:
/// close`: a valid token that does not allow what was asked for, or an
/// origin off the allowlist. `cors`: CORS header lines, or "".
pub fn forbidden_response(reason: &str, cors: &str) -> Vec<u8> {
    refusal_with_header(403, cors, reason)
}

/// A refusal: status line, `Content-Type: text/plain`, `Content-Length`,
/// `Connection: close`, `extra` header lines (each ending in CRLF), and
/// `reason` plus "\n" as the body.
fn refusal_with_header(status: u16, extra: &str, reason: &str) -> Vec<u8> {
    debug_assert!(reason.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
    format!(
        "HTTP/1.1 {status} {}\r\n\
         Content-Type: text/plain\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\
         {extra}\r\n\
         {reason}\n",
        status_line_reason(status),
        reason.len() + 1,
    )
    .into_bytes()
}

/// Every answer with CORS headers lets the page read `Retry-After` (a 503,
/// a 429): without it a page on another origin cannot honour it.
pub const EXPOSE_LINE: &str = "Access-Control-Expose-Headers: Retry-After\r\n";

/// `503 Service Unavailable` for a connection turned away because the server
/// is at a limit (connections, connections per address, handshake rate) or
/// drains: `Retry-After` in seconds (the caller jitters it), `Connection:
/// close`, and `reason` plus "\n" as the body. `reason` must be one line of
/// ASCII.
///
/// Any page may read it (`Access-Control-Allow-Origin: *`, `Retry-After`
/// exposed), whatever the allowlist: it is written before the request is
/// read, so before its origin is known, and a page on another origin must
/// see when to come back rather than a network error it would retry at
/// once. It says nothing but that.
pub fn unavailable_response(reason: &str, retry_after_s: u32) -> Vec<u8> {
    let extra = format!(
        "Retry-After: {retry_after_s}\r\n\
         Access-Control-Allow-Origin: *\r\n\
         {}",
        EXPOSE_LINE
    );
    refusal_with_header(503, &extra, reason)
}

/// `202 Accepted` for a `POST /publish` whose message went to the hubs:
/// `accepted` + "\n" as the body, `extra` header lines (CORS, or ""), and
/// `Connection: close` when `!keep_alive`.
pub fn accepted_response(extra: &str, keep_alive: bool) -> Vec<u8> {
    let connection = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    format!(
        "HTTP/1.1 202 Accepted\r\n\
         Content-Type: text/plain\r\n\
         Content-Length: 9\r\n\
         {connection}{extra}\r\n\
         accepted\n"
    )
    .into_bytes()
}

/// A refused `POST /publish` that a page must be able to read: `status`
/// (429 over a send limit, 503 when the hubs have no room, 403) with
/// `extra` header lines (`Retry-After`, CORS) and `reason`, then close.
pub fn publish_refusal(status: u16, extra: &str, reason: &str) -> Vec<u8> {
    refusal_with_header(status, extra, reason)
}

/// `200 OK` for `/healthz`, `Content-Type: application/json`, body
/// `{"status":"ok","connections_per_core":[3,4]}` + "\n" (`Connection: close`
/// when `!keep_alive`).
pub fn health_response(connections_per_core: &[u64], keep_alive: bool) -> Vec<u8> {
    let counts: Vec<String> = connections_per_core.iter().map(u64::to_string).collect();
    let body = format!(
        "{{\"status\":\"ok\",\"connections_per_core\":[{}]}}\n",
        counts.join(",")
    );
    let connection = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    format!(
        "HTTP/1.1 200 OK\r\n\
         Content-Type: application/json\r\n\
         Content-Length: {}\r\n\
         {connection}\r\n\
         {body}",
        body.len()
    )
    .into_bytes()
}

/// The answer to `/readyz`: `200 OK` with `{"status":"<status>"}` when
/// `ready`, else `503 Service Unavailable` with the same body (a balancer
/// stops sending new clients); `Content-Type: application/json`,
/// `Connection: close` when `!keep_alive`. `status` is one word of ASCII
/// (`ready`, `draining`, ...).
pub fn ready_response(ready: bool, status: &str, keep_alive: bool) -> Vec<u8> {
    debug_assert!(status
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    let body = format!("{{\"status\":\"{status}\"}}\n");
    let code = if ready { 200 } else { 503 };
    let connection = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    format!(
        "HTTP/1.1 {code} {}\r\n\
         Content-Type: application/json\r\n\
         Cache-Control: no-store\r\n\
         Content-Length: {}\r\n\
         {connection}\r\n\
         {body}",
        status_line_reason(code),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6455 §1.3's key and its accept value.
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn ws_head(target: &str, extra: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
             {extra}\r\n"
        )
    }

    /// `head` with a `Host` line after its request line if it has none
    /// (every HTTP/1.1 request needs one; the cases that are about `Host`
    /// call `parse_request` themselves).
    fn with_host(head: &str) -> String {
        if head.to_ascii_lowercase().contains("\r\nhost:") {
            return head.to_string();
        }
        match head.split_once("\r\n") {
            Some((line, rest)) => format!("{line}\r\nHost: gateway.test\r\n{rest}"),
            None => head.to_string(),
        }
    }

    fn parse(head: &str) -> Result<Parsed, Reject> {
        parse_request(with_host(head).as_bytes(), &HeadLimits::default())
    }

    /// Parses a head that must be complete, returning the request.
    fn request(head: &str) -> Result<Request, Reject> {
        match parse(head)? {
            Parsed::Complete {
                request, head_len, ..
            } => {
                assert_eq!(head_len, with_host(head).len());
                Ok(request)
            }
            Parsed::Partial => panic!("partial: {head:?}"),
        }
    }

    fn channels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn permessage_deflate_is_agreed_when_offered_and_the_server_offers_it() {
        let offer = "Sec-WebSocket-Extensions: x-custom, permessage-deflate; \
                     client_max_window_bits\r\n";
        let agreed = crate::deflate::negotiate(["permessage-deflate"]);
        assert!(agreed.is_some());
        for (target, echo_path) in [("/ws?channel=a", None), ("/echo", Some("/echo"))] {
            let limits = |ws_deflate| HeadLimits {
                echo_path,
                ws_deflate,
                ..HeadLimits::default()
            };
            let deflate_of = |head: &str, ws_deflate| match parse_request(
                with_host(head).as_bytes(),
                &limits(ws_deflate),
            ) {
                Ok(Parsed::Complete {
                    request: Request::WebSocket { deflate, .. } | Request::Echo { deflate, .. },
                    ..
                }) => deflate,
                other => panic!("{other:?}"),
            };
            assert_eq!(deflate_of(&ws_head(target, offer), true), agreed);
            assert_eq!(
                deflate_of(&ws_head(target, offer), false),
                None,
                "turned off"
            );
            assert_eq!(deflate_of(&ws_head(target, ""), true), None, "not offered");
            let unkeepable = "Sec-WebSocket-Extensions: permessage-deflate; \
                              server_max_window_bits=8\r\n";
            assert_eq!(deflate_of(&ws_head(target, unkeepable), true), None);
        }
    }

    #[test]
    fn websocket_upgrade() {
        let head = ws_head("/ws?channel=news&channel=sport&channel=news&since=41", "");
        assert_eq!(
            request(&head),
            Ok(Request::WebSocket {
                channels: channels(&["news", "sport"]),
                accept: ACCEPT.to_string(),
                protocol: None,
                deflate: None,
                token: None,
                since: Some(41),
            })
        );
        // Bytes after the head are not part of it.
        let mut buf = head.clone().into_bytes();
        buf.extend_from_slice(&[0x81, 0x85, 1, 2, 3]);
        let Ok(Parsed::Complete { head_len, .. }) = parse_request(&buf, &HeadLimits::default())
        else {
            panic!("not complete");
        };
        assert_eq!(head_len, head.len());
    }

    #[test]
    fn token_from_bearer_header_or_query() {
        // Header form, on each subscribing endpoint.
        let ws = ws_head("/ws?channel=a", "Authorization: Bearer abc.def.ghi\r\n");
        assert_eq!(request(&ws).unwrap().token(), Some("abc.def.ghi"));
        let sse = "GET /events?channel=a HTTP/1.1\r\nAccept: text/event-stream\r\n\
                   authorization: bearer  abc.def.ghi \r\n\r\n";
        let sse = request(sse).unwrap();
        assert!(matches!(sse, Request::Sse { .. }));
        assert_eq!(sse.token(), Some("abc.def.ghi"));
        let lp = "GET /events?channel=a HTTP/1.1\r\nAuthorization: Bearer t1\r\n\r\n";
        assert_eq!(request(lp).unwrap().token(), Some("t1"));
        // Query form, percent-decoded.
        let ws = ws_head("/ws?channel=a&token=abc%2Edef.g%2Bh", "");
        assert_eq!(request(&ws).unwrap().token(), Some("abc.def.g+h"));
        let sse = "GET /events?token=q.r.s&channel=a HTTP/1.1\r\nAccept: text/event-stream\r\n\r\n";
        assert_eq!(request(sse).unwrap().token(), Some("q.r.s"));
        // The header wins over the query.
        let ws = ws_head(
            "/ws?channel=a&token=query",
            "Authorization: Bearer header\r\n",
        );
        assert_eq!(request(&ws).unwrap().token(), Some("header"));
        // Another scheme is no token; none at all is None.
        let ws = ws_head("/ws?channel=a", "Authorization: Basic dTpw\r\n");
        assert_eq!(request(&ws).unwrap().token(), None);
        assert_eq!(
            request(&ws_head("/ws?channel=a", "")).unwrap().token(),
            None
        );
        // Two tokens, or a badly encoded one, are a bad query.
        assert_eq!(
            request(&ws_head("/ws?channel=a&token=x&token=y", "")),
            Err(Reject::BadQuery)
        );
        assert_eq!(
            request(&ws_head("/ws?channel=a&token=%zz", "")),
            Err(Reject::BadQuery)
        );
        // Endpoints that do not subscribe carry none.
        let health = "GET /healthz?token=x HTTP/1.1\r\nAuthorization: Bearer y\r\n\r\n";
        assert_eq!(request(health).unwrap().token(), None);
    }

    #[test]
    fn auth_refusals_carry_their_header_and_reason() {
        let r = String::from_utf8(unauthorized_response(
            "Bearer error=\"invalid_token\"",
            "token expired",
            "",
        ))
        .unwrap();
        assert!(r.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{r}");
        assert!(
            r.contains("\r\nWWW-Authenticate: Bearer error=\"invalid_token\"\r\n"),
            "{r}"
        );
        assert!(r.ends_with("\r\n\r\ntoken expired\n"), "{r}");
        let r = String::from_utf8(forbidden_response("channel not allowed", "")).unwrap();
        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{r}");
        assert!(r.contains("Content-Length: 20\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nchannel not allowed\n"), "{r}");
    }

    /// The `Origin` of a complete head.
    fn origin_of(head: &str) -> Result<Option<String>, Reject> {
        match parse(head)? {
            Parsed::Complete { origin, .. } => Ok(origin),
            Parsed::Partial => panic!("partial: {head:?}"),
        }
    }

    #[test]
    fn the_origin_is_read_once_and_must_be_printable_ascii() {
        assert_eq!(origin_of(&ws_head("/ws?channel=a", "")), Ok(None));
        assert_eq!(
            origin_of(&ws_head("/ws?channel=a", "Origin: https://app.example\r\n")),
            Ok(Some("https://app.example".to_string()))
        );
        assert_eq!(
            origin_of("GET /events?channel=a HTTP/1.1\r\nOrigin: null\r\n\r\n"),
            Ok(Some("null".to_string()))
        );
        for bad in [
            "Origin: https://a.example\r\nOrigin: https://b.example\r\n",
            "Origin: https://a example\r\n",
            "Origin:\r\n",
        ] {
            assert_eq!(
                origin_of(&ws_head("/ws?channel=a", bad)),
                Err(Reject::BadOrigin),
                "{bad}"
            );
        }
        let non_ascii =
            b"GET /events?channel=a HTTP/1.1\r\nHost: h\r\nOrigin: https://\xc3\xa9.example\r\n\r\n";
        assert_eq!(
            parse_request(non_ascii, &HeadLimits::default()),
            Err(Reject::BadOrigin)
        );
    }

    #[test]
    fn options_on_events_is_a_preflight_and_elsewhere_not_allowed() {
        let head = "OPTIONS /events?channel=a HTTP/1.1\r\nOrigin: https://app.example\r\n\
                    Access-Control-Request-Method: GET\r\n\
                    Access-Control-Request-Headers: authorization\r\n\r\n";
        assert_eq!(request(head), Ok(Request::Preflight { keep_alive: true }));
        assert_eq!(origin_of(head), Ok(Some("https://app.example".to_string())));
        // A preflight carries no query the endpoint would check.
        assert_eq!(
            request("OPTIONS /events HTTP/1.0\r\n\r\n"),
            Ok(Request::Preflight { keep_alive: false })
        );
        assert_eq!(
            request("OPTIONS /ws?channel=a HTTP/1.1\r\n\r\n"),
            Err(Reject::MethodNotAllowed)
        );
        assert_eq!(
            request("POST /events?channel=a HTTP/1.1\r\n\r\n"),
            Err(Reject::MethodNotAllowed)
        );
    }

    #[test]
    fn websocket_header_variants_accepted() {
        let head = "GET /ws?channel=a HTTP/1.1\r\nupgrade: WebSocket\r\n\
                    connection: keep-alive, Upgrade\r\nsec-websocket-key:   {KEY}  \r\n\
                    SEC-WEBSOCKET-VERSION: 13\r\n\r\n"
            .replace("{KEY}", KEY);
        assert!(
            matches!(request(&head), Ok(Request::WebSocket { accept, .. }) if accept == ACCEPT)
        );
    }

    #[test]
    fn partial_head_byte_by_byte() {
        let head = ws_head("/ws?channel=news", "");
        for end in 0..head.len() {
            assert_eq!(
                parse(&head[..end]),
                Ok(Parsed::Partial),
                "prefix of {end} bytes"
            );
        }
        assert_eq!(
            parse(&head),
            Ok(Parsed::Complete {
                request: Request::WebSocket {
                    channels: channels(&["news"]),
                    accept: ACCEPT.to_string(),
                    protocol: None,
                    deflate: None,
                    token: None,
                    since: None,
                },
                head_len: head.len(),
                origin: None,
            })
        );
    }

    #[test]
    fn sse_and_longpoll() {
        let sse = |extra: &str, query: &str| {
            request(&format!(
                "GET /events?{query} HTTP/1.1\r\nAccept: text/event-stream\r\n{extra}\r\n"
            ))
        };
        let sse_ok = |names: &[&str], last_event_id| {
            Ok(Request::Sse {
                channels: channels(names),
                last_event_id,
                token: None,
                chunked: true,
            })
        };
        // HTTP/1.0 has no chunked coding.
        assert!(matches!(
            request("GET /events?channel=a HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n"),
            Ok(Request::Sse { chunked: false, .. })
        ));
        assert_eq!(sse("", "channel=a"), sse_ok(&["a"], None));
        assert_eq!(sse("", "channel=a&since=5"), sse_ok(&["a"], Some(5)));
        assert_eq!(
            sse("Last-Event-ID: 9\r\n", "channel=a&since=5"),
            sse_ok(&["a"], Some(9))
        );
        // Empty header: no cursor from it, `since` still counts.
        assert_eq!(sse("Last-Event-ID:\r\n", "channel=a"), sse_ok(&["a"], None));
        assert_eq!(
            sse("Last-Event-ID: \r\n", "channel=a&since=5"),
            sse_ok(&["a"], Some(5))
        );
        assert_eq!(
            sse("Last-Event-ID: x\r\n", "channel=a"),
            Err(Reject::BadCursor)
        );
        assert_eq!(
            sse("Last-Event-ID: 1\r\nLast-Event-ID: 2\r\n", "channel=a"),
            Err(Reject::BadCursor)
        );
        // Accept lists, any case.
        assert_eq!(
            request("GET /events?channel=a HTTP/1.1\r\nAccept: text/html, Text/Event-Stream;q=1\r\n\r\n"),
            sse_ok(&["a"], None)
        );

        let cases = [
            ("HTTP/1.1", "", true),
            ("HTTP/1.1", "Connection: close\r\n", false),
            ("HTTP/1.1", "Connection: Keep-Alive\r\n", true),
            ("HTTP/1.0", "", false),
            ("HTTP/1.0", "Connection: keep-alive\r\n", true),
            ("HTTP/1.0", "Connection: foo, Keep-Alive\r\n", true),
        ];
        for (version, extra, keep_alive) in cases {
            assert_eq!(
                request(&format!(
                    "GET /events?channel=x:y&since=0 {version}\r\n{extra}\r\n"
                )),
                Ok(Request::LongPoll {
                    channels: channels(&["x:y"]),
                    since: Some(0),
                    keep_alive,
                    token: None,
                }),
                "{version} {extra:?}"
            );
            assert_eq!(
                request(&format!("GET /healthz {version}\r\n{extra}\r\n")),
                Ok(Request::Health {
                    keep_alive,
                    head: false
                }),
                "{version} {extra:?}"
            );
        }
    }

    #[test]
    fn query_decoding() {
        let lp = |query: &str| {
            request(&format!("GET /events?{query} HTTP/1.1\r\n\r\n")).map(|r| match r {
                Request::LongPoll {
                    channels, since, ..
                } => (channels, since),
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(
            lp("channel=a%2Fb&channel=%41"),
            Ok((channels(&["a/b", "A"]), None))
        );
        assert_eq!(lp("x=%zz&&channel=a&=&y"), Ok((channels(&["a"]), None)));
        assert_eq!(
            lp("channel=a&since=%31%32"),
            Ok((channels(&["a"]), Some(12)))
        );
        assert_eq!(
            lp("channel=b&channel=a&channel=b"),
            Ok((channels(&["b", "a"]), None))
        );
        assert_eq!(lp("channel=a+b"), Err(Reject::BadChannelName));
        assert_eq!(lp("channel=a%20b"), Err(Reject::BadChannelName));
        assert_eq!(lp("channel=a%zz"), Err(Reject::BadQuery));
        assert_eq!(lp("channel=a%2"), Err(Reject::BadQuery));
        assert_eq!(lp("channel=%FF"), Err(Reject::BadQuery));
        assert_eq!(lp("channel=a&since=1&since=2"), Err(Reject::BadCursor));
        assert_eq!(lp("channel=a&since=-1"), Err(Reject::BadCursor));
        assert_eq!(lp("since=1"), Err(Reject::NoChannel));
        let sixteen: Vec<String> = (0..16).map(|i| format!("channel=c{i}")).collect();
        assert!(lp(&sixteen.join("&")).is_ok());
        assert_eq!(
            lp(&format!("{}&channel=c0", sixteen.join("&"))).map(|r| r.0.len()),
            Ok(16)
        );
        assert_eq!(
            lp(&format!("{}&channel=c16", sixteen.join("&"))),
            Err(Reject::TooManyChannels)
        );
    }

    #[test]
    fn every_reject_with_status() {
        let small = HeadLimits {
            head_bytes_max: 64,
            headers_max: 2,
            url_bytes_max: 20,
            ..HeadLimits::default()
        };
        let long_name = "a".repeat(129);
        let cases: Vec<(&str, HeadLimits, String, Reject, u16)> = vec![
            (
                "bad token",
                HeadLimits::default(),
                "G(T / HTTP/1.1\r\n\r\n".into(),
                Reject::MalformedHead,
                400,
            ),
            (
                "bad version",
                HeadLimits::default(),
                "GET /ws HTTP/2.0\r\n\r\n".into(),
                Reject::MalformedHead,
                400,
            ),
            (
                "bad header",
                HeadLimits::default(),
                "GET /ws HTTP/1.1\r\nA B: c\r\n\r\n".into(),
                Reject::MalformedHead,
                400,
            ),
            (
                "partial over the limit",
                small,
                format!("GET /healthz HTTP/1.1\r\nX: {}", "y".repeat(60)),
                Reject::HeadTooLarge,
                431,
            ),
            (
                "complete over the limit",
                small,
                format!("GET /healthz HTTP/1.1\r\nX: {}\r\n\r\n", "y".repeat(40)),
                Reject::HeadTooLarge,
                431,
            ),
            (
                "too many headers",
                small,
                "GET /healthz HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n".into(),
                Reject::TooManyHeaders,
                431,
            ),
            (
                "too many headers, default",
                HeadLimits::default(),
                format!("GET /healthz HTTP/1.1\r\n{}\r\n", "A: 1\r\n".repeat(49)),
                Reject::TooManyHeaders,
                431,
            ),
            (
                "url too long",
                small,
                "GET /healthz?abcdefghijkl HTTP/1.1\r\n\r\n".into(),
                Reject::UrlTooLong,
                414,
            ),
            (
                "url too long, partial",
                small,
                "GET /healthz?abcdefghijkl".into(),
                Reject::UrlTooLong,
                414,
            ),
            (
                "url too long, partial, default",
                HeadLimits::default(),
                format!("GET /{}", "a".repeat(5000)),
                Reject::UrlTooLong,
                414,
            ),
            (
                "not found",
                HeadLimits::default(),
                "GET /wss HTTP/1.1\r\n\r\n".into(),
                Reject::NotFound,
                404,
            ),
            (
                "not found, prefix",
                HeadLimits::default(),
                "GET /ws/x HTTP/1.1\r\n\r\n".into(),
                Reject::NotFound,
                404,
            ),
            (
                "post",
                HeadLimits::default(),
                "POST /events?channel=a HTTP/1.1\r\n\r\n".into(),
                Reject::MethodNotAllowed,
                405,
            ),
            (
                "head on a stream",
                HeadLimits::default(),
                "HEAD /events?channel=a HTTP/1.1\r\n\r\n".into(),
                Reject::MethodNotAllowed,
                405,
            ),
            (
                "body",
                HeadLimits::default(),
                "GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\n".into(),
                Reject::BodyNotAllowed,
                400,
            ),
            (
                "chunked",
                HeadLimits::default(),
                "GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
                Reject::BodyNotAllowed,
                400,
            ),
            (
                "no upgrade",
                HeadLimits::default(),
                "GET /ws?channel=a HTTP/1.1\r\nSec-WebSocket-Key: x\r\n\r\n".into(),
                Reject::NotAnUpgrade,
                400,
            ),
            (
                "http/1.0 upgrade",
                HeadLimits::default(),
                ws_head("/ws?channel=a", "").replace("HTTP/1.1", "HTTP/1.0"),
                Reject::NotAnUpgrade,
                400,
            ),
            (
                "connection without upgrade",
                HeadLimits::default(),
                ws_head("/ws?channel=a", "")
                    .replace("Connection: Upgrade", "Connection: keep-alive"),
                Reject::NotAnUpgrade,
                400,
            ),
            (
                "upgrade h2c",
                HeadLimits::default(),
                ws_head("/ws?channel=a", "").replace("Upgrade: websocket", "Upgrade: h2c"),
                Reject::NotAnUpgrade,
                400,
            ),
            (
                "version 8",
                HeadLimits::default(),
                ws_head("/ws?channel=a", "").replace("Version: 13", "Version: 8"),
                Reject::UnsupportedWebSocketVersion,
                426,
            ),
            (
                "no version",
                HeadLimits::default(),
                ws_head("/ws?channel=a", "").replace("Sec-WebSocket-Version: 13\r\n", ""),
                Reject::UnsupportedWebSocketVersion,
                426,
            ),
            (
                "no key",
                HeadLimits::default(),
                ws_head("/ws?channel=a", "").replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
                Reject::BadWebSocketKey,
                400,
            ),
            (
                "repeated key",
                HeadLimits::default(),
                ws_head("/ws?channel=a", &format!("Sec-WebSocket-Key: {KEY}\r\n")),
                Reject::BadWebSocketKey,
                400,
            ),
            (
                "short key",
                HeadLimits::default(),
                ws_head("/ws?channel=a", "").replace(KEY, "dGhlIHNhbXBsZQ=="),
                Reject::BadWebSocketKey,
                400,
            ),
            (
                "not base64",
                HeadLimits::default(),
                ws_head("/ws?channel=a", "").replace(KEY, "dGhlIHNhbXBsZSBub25jZ!=="),
                Reject::BadWebSocketKey,
                400,
            ),
            (
                "no channel",
                HeadLimits::default(),
                ws_head("/ws", ""),
                Reject::NoChannel,
                400,
            ),
            (
                "too many channels",
                HeadLimits {
                    channels_per_connection_max: 1,
                    ..HeadLimits::default()
                },
                ws_head("/ws?channel=a&channel=b", ""),
                Reject::TooManyChannels,
                400,
            ),
            (
                "empty channel",
                HeadLimits::default(),
                ws_head("/ws?channel=", ""),
                Reject::BadChannelName,
                400,
            ),
            (
                "long channel",
                HeadLimits::default(),
                ws_head(&format!("/ws?channel={long_name}"), ""),
                Reject::BadChannelName,
                400,
            ),
            (
                "bad cursor",
                HeadLimits::default(),
                ws_head("/ws?channel=a&since=18446744073709551616", ""),
                Reject::BadCursor,
                400,
            ),
            (
                "bad query",
                HeadLimits::default(),
                ws_head("/ws?channel=%", ""),
                Reject::BadQuery,
                400,
            ),
        ];
        for (name, limits, head, want, status) in cases {
            assert_eq!(
                parse_request(with_host(&head).as_bytes(), &limits),
                Err(want.clone()),
                "{name}"
            );
            assert_eq!(want.status(), status, "{name}");
        }
    }

    #[test]
    fn header_count_at_the_limit_is_fine() {
        let limits = HeadLimits {
            headers_max: 2,
            ..HeadLimits::default()
        };
        let head = "GET /healthz HTTP/1.1\r\nA: 1\r\nHost: h\r\n\r\n";
        assert!(matches!(
            parse_request(head.as_bytes(), &limits),
            Ok(Parsed::Complete { .. })
        ));
        // A head of exactly head_bytes_max bytes is accepted; one byte short of
        // complete at that size is refused.
        let limits = HeadLimits {
            head_bytes_max: head.len(),
            ..HeadLimits::default()
        };
        assert!(matches!(
            parse_request(head.as_bytes(), &limits),
            Ok(Parsed::Complete { .. })
        ));
        let longer = head.replace("A: 1", "A: 12");
        assert_eq!(
            parse_request(&longer.as_bytes()[..head.len()], &limits),
            Err(Reject::HeadTooLarge)
        );
        assert_eq!(
            parse_request(longer.as_bytes(), &limits),
            Err(Reject::HeadTooLarge)
        );
    }

    #[test]
    fn url_at_the_limit_is_fine() {
        let limits = HeadLimits {
            url_bytes_max: 12,
            ..HeadLimits::default()
        };
        // "/healthz?a=b" is 12 bytes: partial and complete heads both pass.
        assert_eq!(
            parse_request(b"GET /healthz?a=b", &limits),
            Ok(Parsed::Partial)
        );
        assert!(matches!(
            parse_request(b"GET /healthz?a=b HTTP/1.1\r\nHost: h\r\n\r\n", &limits),
            Ok(Parsed::Complete { .. })
        ));
        assert_eq!(
            parse_request(b"GET /healthz?a=bc", &limits),
            Err(Reject::UrlTooLong)
        );
        // Empty lines before the request line do not count towards the URL.
        assert_eq!(
            parse_request(b"\r\n\r\nGET /healthz?a=b", &limits),
            Ok(Parsed::Partial)
        );
    }

    #[test]
    fn reject_responses() {
        let text = |r: Reject| String::from_utf8(reject_response(&r)).unwrap();
        assert_eq!(
            text(Reject::MethodNotAllowed),
            "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain\r\nContent-Length: 19\r\n\
             Connection: close\r\nAllow: GET\r\n\r\nmethod not allowed\n"
        );
        assert!(
            text(Reject::UnsupportedWebSocketVersion).contains("\r\nSec-WebSocket-Version: 13\r\n")
        );
        let all = [
            Reject::MalformedHead,
            Reject::HeadTooLarge,
            Reject::TooManyHeaders,
            Reject::UrlTooLong,
            Reject::NotFound,
            Reject::MethodNotAllowed,
            Reject::BodyNotAllowed,
            Reject::NotAnUpgrade,
            Reject::UnsupportedWebSocketVersion,
            Reject::BadWebSocketKey,
            Reject::NoChannel,
            Reject::TooManyChannels,
            Reject::BadChannelName,
            Reject::BadCursor,
            Reject::BadQuery,
        ];
        for r in all {
            let response = text(r.clone());
            let (head, body) = response.split_once("\r\n\r\n").unwrap();
            assert!(
                head.starts_with(&format!("HTTP/1.1 {} ", r.status())),
                "{head}"
            );
            assert!(head.contains("\r\nConnection: close"), "{head}");
            assert!(
                head.contains(&format!("\r\nContent-Length: {}", body.len())),
                "{head}"
            );
            assert_eq!(body, format!("{}\n", r.reason()));
            assert!(r
                .reason()
                .bytes()
                .all(|b| b == b' ' || b.is_ascii_lowercase()));
        }
    }

    #[test]
    fn health() {
        let response = String::from_utf8(health_response(&[3, 4], true)).unwrap();
        let body = "{\"status\":\"ok\",\"connections_per_core\":[3,4]}\n";
        assert_eq!(
            response,
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        );
        let response = String::from_utf8(health_response(&[], false)).unwrap();
        assert!(response.contains("\r\nConnection: close\r\n"));
        assert!(response.ends_with("\r\n\r\n{\"status\":\"ok\",\"connections_per_core\":[]}\n"));
    }

    #[test]
    fn cursors() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (b"0", Some(0)),
            (b"42", Some(42)),
            (b"007", Some(7)),
            (b"18446744073709551615", Some(u64::MAX)),
            (b"18446744073709551616", None),
            (b"99999999999999999999", None),
            (b"000000000000000000001", None),
            (b"", None),
            (b"+1", None),
            (b"-1", None),
            (b" 1", None),
            (b"1 ", None),
            (b"1a", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_cursor(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn channel_names() {
        let cases: &[(&[u8], bool)] = &[
            (b"news", true),
            (b"A-Z_a.z:0@9/x", true),
            (b"", false),
            (b"a b", false),
            (b"a+b", false),
            (b"a%2F", false),
            (b"caf\xc3\xa9", false),
            (b"a\0", false),
        ];
        for (name, want) in cases {
            assert_eq!(valid_channel_name(name, 128), *want, "{name:?}");
        }
        assert!(valid_channel_name(&[b'a'; 128], 128));
        assert!(!valid_channel_name(&[b'a'; 129], 128));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seed = ws_head(
            "/ws?channel=a%2Fb&since=1",
            "Last-Event-ID: 3\r\nAccept: text/event-stream\r\n",
        );
        let limits = HeadLimits {
            head_bytes_max: 200,
            headers_max: 6,
            url_bytes_max: 30,
            ..HeadLimits::default()
        };
        for _ in 0..5000 {
            // Mutate a few bytes of a valid head, and cut it anywhere.
            let mut buf = seed.clone().into_bytes();
            for _ in 0..(next() % 4) {
                let i = (next() as usize) % buf.len();
                buf[i] = next() as u8;
            }
            buf.truncate((next() as usize) % (buf.len() + 1));
            let _ = parse_request(&buf, &HeadLimits::default());
            let _ = parse_request(&buf, &limits);
        }
    }

    #[test]
    fn echo_endpoint_exists_only_where_configured() {
        let head = "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                    Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        assert_eq!(
            parse_request(head.as_bytes(), &HeadLimits::default()),
            Err(Reject::NotFound)
        );
        let limits = HeadLimits {
            echo_path: Some("/"),
            ..HeadLimits::default()
        };
        match parse_request(head.as_bytes(), &limits) {
            Ok(Parsed::Complete {
                request: Request::Echo { accept, .. },
                ..
            }) => {
                assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
            }
            other => panic!("{other:?}"),
        }
        let bad = head.replace("13", "8");
        assert_eq!(
            parse_request(bad.as_bytes(), &limits),
            Err(Reject::UnsupportedWebSocketVersion)
        );
    }

    #[test]
    fn host_is_required_once_in_http_1_1_and_must_be_a_host() {
        let health = |version: &str, hosts: &str| {
            let head = format!("GET /healthz {version}\r\n{hosts}\r\n");
            parse_request(head.as_bytes(), &HeadLimits::default()).map(|p| match p {
                Parsed::Complete { request, .. } => request,
                Parsed::Partial => panic!("partial: {head:?}"),
            })
        };
        let ok = |keep_alive| {
            Ok(Request::Health {
                keep_alive,
                head: false,
            })
        };
        let cases = [
            ("HTTP/1.1", "Host: example.com\r\n", ok(true)),
            ("HTTP/1.1", "host: example.com:8080\r\n", ok(true)),
            ("HTTP/1.1", "Host: 127.0.0.1:80\r\n", ok(true)),
            ("HTTP/1.1", "Host: [::1]:8080\r\n", ok(true)),
            // RFC 9112 §3.2: empty when the target has no authority.
            ("HTTP/1.1", "Host:\r\n", ok(true)),
            ("HTTP/1.0", "", ok(false)),
            ("HTTP/1.1", "", Err(Reject::BadHost)),
            ("HTTP/1.1", "Host: a\r\nHost: a\r\n", Err(Reject::BadHost)),
            ("HTTP/1.0", "Host: a\r\nHost: b\r\n", Err(Reject::BadHost)),
            ("HTTP/1.1", "Host: a b\r\n", Err(Reject::BadHost)),
            ("HTTP/1.1", "Host: user@a\r\n", Err(Reject::BadHost)),
            ("HTTP/1.1", "Host: a/b\r\n", Err(Reject::BadHost)),
        ];
        for (version, hosts, want) in cases {
            assert_eq!(health(version, hosts), want, "{version} {hosts:?}");
        }
        assert_eq!(Reject::BadHost.status(), 400);
        // Before the path: a request without Host is 400 wherever it goes.
        assert_eq!(
            parse_request(b"GET /nowhere HTTP/1.1\r\n\r\n", &HeadLimits::default()),
            Err(Reject::BadHost)
        );
    }

    #[test]
    fn an_absolute_form_target_is_taken_by_its_path() {
        assert_eq!(
            request("GET http://127.0.0.1:8080/healthz HTTP/1.1\r\n\r\n"),
            Ok(Request::Health {
                keep_alive: true,
                head: false
            })
        );
        assert_eq!(
            request("GET HTTPS://gw.example.com/events?channel=a&since=5 HTTP/1.1\r\n\r\n"),
            Ok(Request::LongPoll {
                channels: channels(&["a"]),
                since: Some(5),
                keep_alive: true,
                token: None,
            })
        );
        let ws = ws_head("http://gw.example.com/ws?channel=news", "");
        assert!(matches!(request(&ws), Ok(Request::WebSocket { .. })));
        // Nothing after the authority is `/`, none of ours.
        for target in ["http://gw.example.com", "http://gw.example.com?channel=a"] {
            assert_eq!(
                request(&format!("GET {target} HTTP/1.1\r\n\r\n")),
                Err(Reject::NotFound),
                "{target}"
            );
        }
        // An http URI without a host, or with userinfo, is not one.
        for target in ["http:///healthz", "http://u@h/healthz"] {
            assert_eq!(
                request(&format!("GET {target} HTTP/1.1\r\n\r\n")),
                Err(Reject::BadHost),
                "{target}"
            );
        }
        // Another scheme is no absolute form we serve.
        assert_eq!(
            request("GET ftp://h/healthz HTTP/1.1\r\n\r\n"),
            Err(Reject::NotFound)
        );
    }

    #[test]
    fn a_publish_is_a_post_with_a_length_one_channel_and_maybe_a_stream_address() {
        let address = crate::upstream::Address {
            instance: 7,
            core: 1,
            key: 2,
            serial: 3,
            tag: 4,
        };
        let a = address.encode();
        assert_eq!(
            request(&format!(
                "POST /publish?channel=room&address={a}&token=t HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
            )),
            Ok(Request::Publish {
                channel: "room".into(),
                address: Some(address),
                body_bytes: 5,
                keep_alive: true,
                token: Some("t".into()),
            })
        );
        assert!(matches!(
            request("POST /publish?channel=room HTTP/1.1\r\nContent-Length: 0\r\nAuthorization: Bearer x\r\nConnection: close\r\n\r\n"),
            Ok(Request::Publish { address: None, body_bytes: 0, keep_alive: false, token: Some(t), .. }) if &*t == "x"
        ));
        assert_eq!(
            request("OPTIONS /publish HTTP/1.1\r\n\r\n"),
            Ok(Request::PublishPreflight { keep_alive: true })
        );
        for (head, reject) in [
            ("GET /publish?channel=a HTTP/1.1\r\n\r\n", Reject::PostOnly),
            ("POST /publish?channel=a HTTP/1.1\r\n\r\n", Reject::LengthRequired),
            (
                "POST /publish?channel=a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Reject::LengthRequired,
            ),
            ("POST /publish?channel=a HTTP/1.1\r\nContent-Length: x\r\n\r\n", Reject::MalformedHead),
            (
                "POST /publish?channel=a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                Reject::MalformedHead,
            ),
            ("POST /publish?channel=a HTTP/1.1\r\nContent-Length: 65537\r\n\r\n", Reject::PayloadTooLarge),
            ("POST /publish HTTP/1.1\r\nContent-Length: 1\r\n\r\n", Reject::NoChannel),
            ("POST /publish?channel=a&channel=b HTTP/1.1\r\nContent-Length: 1\r\n\r\n", Reject::BadQuery),
            ("POST /publish?channel=a%20b HTTP/1.1\r\nContent-Length: 1\r\n\r\n", Reject::BadChannelName),
            ("POST /publish?channel=a&address=zz HTTP/1.1\r\nContent-Length: 1\r\n\r\n", Reject::BadAddress),
        ] {
            assert_eq!(request(head), Err(reject.clone()), "{head:?}");
        }
        assert_eq!(Reject::PostOnly.status(), 405);
        assert!(String::from_utf8(reject_response(&Reject::PostOnly))
            .unwrap()
            .contains("\r\nAllow: POST, OPTIONS\r\n"));
        assert_eq!(
            (
                Reject::LengthRequired.status(),
                Reject::PayloadTooLarge.status()
            ),
            (411, 413)
        );
    }

    #[test]
    fn head_on_the_health_checks_is_answered_without_a_body() {
        assert_eq!(
            request("HEAD /healthz HTTP/1.1\r\n\r\n"),
            Ok(Request::Health {
                keep_alive: true,
                head: true
            })
        );
        assert_eq!(
            request("HEAD /readyz HTTP/1.1\r\nConnection: close\r\n\r\n"),
            Ok(Request::Ready {
                keep_alive: false,
                head: true
            })
        );
        for path in ["/ws?channel=a", "/events?channel=a"] {
            assert_eq!(
                request(&format!("HEAD {path} HTTP/1.1\r\n\r\n")),
                Err(Reject::MethodNotAllowed),
                "{path}"
            );
        }
        let full = health_response(&[3, 4], true);
        let head = without_body(full.clone());
        assert!(full.starts_with(&head) && full.len() > head.len());
        assert!(head.ends_with(b"\r\n\r\n"));
        let text = String::from_utf8(head).unwrap();
        assert!(text.contains("Content-Length: 45\r\n"), "{text}");
    }
}
