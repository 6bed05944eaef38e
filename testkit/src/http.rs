//! Reading the gateway's HTTP/1.1 answers: response heads and `/healthz`.
//! Written apart from the gateway's own code (which parses requests, never
//! responses), and shared by the tests and the bench.

/// RFC 6455 §1.3's sample key and its `Sec-WebSocket-Accept` value. Every
/// connection sends the same key: the server's work is the same, and the
/// answer can be checked without a SHA-1 here.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Length of the response head including its final `\r\n\r\n`, once it is
/// all in `buf`.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The status code of a head's first line (`HTTP/1.1 101 Switching Protocols`).
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut words = line.split(' ');
    let version = words.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = words.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

/// The header lines of a head, as (name, value) with the value trimmed;
/// `None` for a line that is not `name: value` (or not UTF-8).
pub fn header_lines(head: &[u8]) -> impl Iterator<Item = Option<(&str, &str)>> {
    let text = std::str::from_utf8(head).ok();
    text.into_iter()
        .flat_map(|t| t.split("\r\n").skip(1))
        .take_while(|line| !line.is_empty())
        .map(|line| {
            let (key, value) = line.split_once(':')?;
            Some((key.trim(), value.trim()))
        })
}

/// The value of the first header called `name` (case-insensitive), trimmed.
pub fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    header_lines(head)
        .flatten()
        .find_map(|(key, value)| key.eq_ignore_ascii_case(name).then_some(value))
}

/// The first line of a head, for error messages (at most 100 chars).
pub fn first_line(buf: &[u8]) -> String {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(b"");
    let text = String::from_utf8_lossy(line);
    text.trim_end_matches('\r').chars().take(100).collect()
}

/// `{"status":"ok","connections_per_core":[a,b]}` → `[a, b]`; a server
/// with one total, `{"status":"ok","connections":n}` (the baseline), → `[n]`.
pub fn parse_health_body(body: &[u8]) -> Result<Vec<u64>, String> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("/healthz body is not JSON ({e}): {:?}", first_line(body)))?;
    if v.get("status").and_then(|s| s.as_str()) != Some("ok") {
        return Err(format!("/healthz status is not \"ok\": {v}"));
    }
    if let Some(n) = v.get("connections").and_then(|n| n.as_u64()) {
        if v.get("connections_per_core").is_none() {
            return Ok(vec![n]);
        }
    }
    v.get("connections_per_core")
        .and_then(|c| c.as_array())
        .and_then(|a| a.iter().map(|n| n.as_u64()).collect::<Option<Vec<u64>>>())
        .ok_or_else(|| format!("/healthz without a connections_per_core array of counts: {v}"))
}
