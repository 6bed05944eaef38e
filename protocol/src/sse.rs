//! Server-Sent Events (HTML Living Standard, "server-sent events").

/// Appends the response head that opens an event stream, with `extra`
/// header lines (each ending in CRLF: the CORS headers, or "").
///
/// `chunked` (for an HTTP/1.1 request) sends the stream as a chunked body,
/// each write one or more whole events in one chunk (see [`push_chunk`]).
/// Without it (HTTP/1.0, which has no chunked coding) the body ends when
/// the connection does. Every mainstream SSE server frames HTTP/1.1
/// streams this way, and HTTP clients read a chunked body chunk by chunk,
/// whereas a body delimited by the connection's end is, for many of them,
/// a download read in blocks (Python `requests`' `iter_content(8192)`
/// returns once 8 KiB have come: at 100 small events a second, half a
/// second late).
pub fn stream_response_head(extra: &str, chunked: bool, out: &mut Vec<u8>) {
    // `X-Accel-Buffering: no` stops nginx-style proxies from holding events back.
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\n\
          Content-Type: text/event-stream\r\n\
          Cache-Control: no-cache\r\n\
          X-Accel-Buffering: no\r\n",
    );
    if chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n");
    } else {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(extra.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked body (RFC 9112 7.1): a stream the gateway
/// ends on purpose ends with it, so the client sees a complete response
/// rather than one cut off.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Appends `body` as one chunk of a chunked body (RFC 9112 7.1): its size
/// in hex, CRLF, the bytes, CRLF. Nothing for an empty `body` (an empty
/// chunk would end the body).
pub fn push_chunk(out: &mut Vec<u8>, body: &[u8]) {
    if body.is_empty() {
        return;
    }
    let digits = (usize::BITS - body.len().leading_zeros()).div_ceil(4) as usize;
    out.reserve(digits + body.len() + 4);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(body.len() >> (i * 4)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

/// Where the body of `chunk`, one chunk as [`push_chunk`] makes it, lies
/// within it: what an HTTP/1.0 stream is sent of the same bytes.
pub fn chunk_body(chunk: &[u8]) -> std::ops::Range<usize> {
    let start = chunk
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(0, |i| i + 2);
    start..chunk.len().saturating_sub(2).max(start)
}

/// Appends one event. `data` is text: each line (split on "\r\n", "\r" or "\n")
/// becomes its own `data:` line, so a multi-line payload survives; an empty
/// payload is one empty `data:` line. `id`/`event` must not contain CR/LF (the
/// caller guarantees it; debug_assert). Ends with the blank line.
pub fn encode_event(out: &mut Vec<u8>, id: Option<&str>, event: Option<&str>, data: &str) {
    if let Some(id) = id {
        debug_assert!(!has_line_break(id), "SSE id with CR/LF: {id:?}");
        push_field(out, "id", id.as_bytes());
    }
    if let Some(event) = event {
        debug_assert!(!has_line_break(event), "SSE event with CR/LF: {event:?}");
        push_field(out, "event", event.as_bytes());
    }
    push_data_lines(out, data.as_bytes());
    out.push(b'\n');
}

/// Appends a `retry:` field (milliseconds) followed by a blank line.
pub fn encode_retry(out: &mut Vec<u8>, retry_ms: u32) {
    out.extend_from_slice(format!("retry: {retry_ms}\n\n").as_bytes());
}

/// Appends a comment line (`: text`), used as a heartbeat; CR/LF in `text`
/// are replaced by spaces.
pub fn encode_comment(out: &mut Vec<u8>, text: &str) {
    out.reserve(text.len() + 3);
    out.extend_from_slice(b": ");
    out.extend(
        text.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.push(b'\n');
}

fn has_line_break(s: &str) -> bool {
    s.bytes().any(|b| b == b'\r' || b == b'\n')
}

/// Appends `name: value\n`.
pub(crate) fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.reserve(name.len() + value.len() + 3);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Appends one `data: …` line per line of `data`, splitting on "\r\n", "\r"
/// and "\n" (the three line ends the SSE parser recognises, so none may appear
/// inside a field). Empty `data` and a trailing line end each give an empty
/// line, so the client's reassembled `data` equals the input, line ends
/// normalised to "\n".
pub(crate) fn push_data_lines(out: &mut Vec<u8>, mut data: &[u8]) {
    loop {
        match data.iter().position(|&b| b == b'\r' || b == b'\n') {
            None => {
                push_field(out, "data", data);
                return;
            }
            Some(i) => {
                push_field(out, "data", &data[..i]);
                // "\r\n" is one line end, not two.
                let end_len = if data[i..].starts_with(b"\r\n") { 2 } else { 1 };
                data = &data[i + end_len..];
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One dispatched event as an EventSource sees it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Event {
        pub id: Option<String>,
        pub event: Option<String>,
        pub data: String,
    }

    /// A minimal SSE parser after the HTML standard's "interpreting an event
    /// stream": lines end at CRLF, CR or LF; an empty line dispatches; a line
    /// starting with ':' is a comment; `field: value` drops one leading space
    /// of the value; `data` lines are joined with "\n". Unlike a browser it
    /// keeps `id` and `event` per event (no last-event-id carry-over) and
    /// ignores `retry`. Panics on an unknown field or a truncated event.
    pub(crate) fn parse_stream(stream: &str) -> Vec<Event> {
        let mut events = Vec::new();
        let mut current = Event {
            id: None,
            event: None,
            data: String::new(),
        };
        let mut data_lines = 0;
        let mut rest = stream;
        while !rest.is_empty() {
            let end = rest.find(['\r', '\n']).expect("unterminated line");
            let line = &rest[..end];
            rest = &rest[end..];
            rest = rest
                .strip_prefix("\r\n")
                .or_else(|| rest.strip_prefix(['\r', '\n']))
                .unwrap();
            if line.is_empty() {
                if data_lines > 0 {
                    current.data.pop(); // the last "\n"
                    events.push(current.clone());
                }
                current = Event {
                    id: None,
                    event: None,
                    data: String::new(),
                };
                data_lines = 0;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "data" => {
                    current.data.push_str(value);
                    current.data.push('\n');
                    data_lines += 1;
                }
                "id" => current.id = Some(value.to_string()),
                "event" => current.event = Some(value.to_string()),
                "retry" => {}
                other => panic!("unknown field {other:?}"),
            }
        }
        assert_eq!(data_lines, 0, "stream ends inside an event");
        events
    }

    /// `data` as the client reassembles it: every line end becomes "\n".
    pub(crate) fn normalise_line_ends(data: &str) -> String {
        data.replace("\r\n", "\n").replace('\r', "\n")
    }

    fn event(id: Option<&str>, event: Option<&str>, data: &str) -> String {
        let mut out = Vec::new();
        encode_event(&mut out, id, event, data);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn event_fields_and_line_splitting() {
        let cases: &[(Option<&str>, Option<&str>, &str, &str)] = &[
            (None, None, "hi", "data: hi\n\n"),
            (Some("7"), None, "hi", "id: 7\ndata: hi\n\n"),
            (
                Some("7"),
                Some("news"),
                "hi",
                "id: 7\nevent: news\ndata: hi\n\n",
            ),
            (None, Some("x"), "", "event: x\ndata: \n\n"),
            (None, None, "a\nb", "data: a\ndata: b\n\n"),
            (None, None, "a\r\nb", "data: a\ndata: b\n\n"),
            (None, None, "a\rb", "data: a\ndata: b\n\n"),
            // "\n\r" is two line ends: LF, then a lone CR.
            (None, None, "a\n\rb", "data: a\ndata: \ndata: b\n\n"),
            (None, None, "a\r\n\r\nb", "data: a\ndata: \ndata: b\n\n"),
            (None, None, "a\n", "data: a\ndata: \n\n"),
            (None, None, "\n", "data: \ndata: \n\n"),
            // Leading space of the line survives: the parser drops only one.
            (None, None, " x", "data:  x\n\n"),
        ];
        for (id, ev, data, want) in cases {
            assert_eq!(event(*id, *ev, data), *want, "data {data:?}");
        }
    }

    #[test]
    fn retry_and_comment() {
        let mut out = Vec::new();
        encode_retry(&mut out, 3000);
        encode_comment(&mut out, "ping\r\nx\ny");
        assert_eq!(out, b"retry: 3000\n\n: ping  x y\n");
    }

    #[test]
    fn stream_head() {
        let mut out = Vec::new();
        stream_response_head("", true, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
              X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
        );
        out.clear();
        stream_response_head("Vary: Origin\r\n", true, &mut out);
        assert!(out.ends_with(b"Connection: keep-alive\r\nVary: Origin\r\n\r\n"));
        out.clear();
        stream_response_head("", false, &mut out);
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
              X-Accel-Buffering: no\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn chunks() {
        for len in [1usize, 9, 15, 16, 255, 256, 4095, 4096, 70_000] {
            let body = vec![b'x'; len];
            let mut out = b"before".to_vec();
            push_chunk(&mut out, &body);
            let chunk = &out[6..];
            let size_line = format!("{len:x}\r\n");
            assert!(chunk.starts_with(size_line.as_bytes()), "{len}");
            assert!(chunk.ends_with(b"\r\n"));
            assert_eq!(chunk.len(), size_line.len() + len + 2);
            assert_eq!(&chunk[chunk_body(chunk)], &body[..]);
        }
        let mut out = Vec::new();
        push_chunk(&mut out, b"");
        assert!(out.is_empty(), "an empty chunk would end the body");
        let mut out = Vec::new();
        push_chunk(&mut out, b": heartbeat\n\n");
        assert_eq!(out, b"d\r\n: heartbeat\n\n\r\n");
    }

    proptest! {
        /// (d) Events encoded one after another, with comments and retry
        /// fields between them, parse back to their id, event name and data
        /// (line ends normalised to "\n") whatever the text.
        #[test]
        fn encoded_events_parse_back(
            events in prop::collection::vec(
                (
                    prop::option::of("[^\r\n]{0,12}"),
                    prop::option::of("[^\r\n]{0,12}"),
                    prop_oneof![any::<String>(), "([a-z ]|\r|\n|\r\n){0,20}"],
                    prop::option::of(any::<String>()),
                ),
                1..6,
            ),
        ) {
            let mut out = Vec::new();
            let mut want = Vec::new();
            for (id, event, data, comment) in &events {
                encode_event(&mut out, id.as_deref(), event.as_deref(), data);
                if let Some(comment) = comment {
                    encode_comment(&mut out, comment);
                    encode_retry(&mut out, 1000);
                }
                want.push(Event { id: id.clone(), event: event.clone(), data: normalise_line_ends(data) });
            }
            prop_assert_eq!(parse_stream(&String::from_utf8(out).unwrap()), want);
        }
    }
}
