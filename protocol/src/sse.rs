//! Server-Sent Events (HTML Living Standard, "server-sent events").

/// The response head that opens an event stream.
pub fn stream_response_head() -> &'static [u8] {
    // `X-Accel-Buffering: no` stops nginx-style proxies from holding events back.
    b"HTTP/1.1 200 OK\r\n\
      Content-Type: text/event-stream\r\n\
      Cache-Control: no-cache\r\n\
      X-Accel-Buffering: no\r\n\
      Connection: keep-alive\r\n\r\n"
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
mod tests {
    use super::*;

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
        assert_eq!(
            stream_response_head(),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
              X-Accel-Buffering: no\r\nConnection: keep-alive\r\n\r\n"
        );
    }
}
