//! How fanout publishes: ZeroMQ `[channel, payload]` to the gateway and
//! the baseline (their contract), `POST /pub?channel=…` to nchan and Bun,
//! which have no ZeroMQ. Over HTTP the body is what the gateway sends its
//! subscribers, a JSON meta line of the same shape and size, `\n`, then the
//! payload (the tail the receivers decode is at its end), so that every
//! server carries comparable bytes to its subscribers.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cli::ServerKind;
use crate::http;

/// How long one `POST` may take, response included.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// A response head or chunk-size line longer than this is not an answer.
const RESPONSE_HEAD_MAX: usize = 16 * 1024;

/// Where fanout's publications go.
pub enum Publisher {
    Zmq {
        /// Kept alive as long as the socket is.
        _ctx: zmq::Context,
        sock: zmq::Socket,
    },
    Http(HttpPublisher),
}

impl Publisher {
    /// ZeroMQ when the server has an endpoint; HTTP POSTs to `listen` for
    /// nchan and Bun, which have none; otherwise why there is no way to
    /// publish.
    pub fn connect(
        kind: ServerKind,
        zmq: Option<&str>,
        listen: SocketAddr,
    ) -> Result<Publisher, String> {
        match (zmq, kind) {
            (Some(endpoint), _) => {
                let ctx = zmq::Context::new();
                let sock = ctx
                    .socket(zmq::PUB)
                    .map_err(|e| format!("zmq socket: {e}"))?;
                // Unlimited: a publication is never dropped on the bench's side.
                sock.set_sndhwm(0).map_err(|e| format!("zmq sndhwm: {e}"))?;
                sock.set_linger(0).map_err(|e| format!("zmq linger: {e}"))?;
                sock.connect(endpoint)
                    .map_err(|e| format!("zmq connect {endpoint}: {e}"))?;
                Ok(Publisher::Zmq { _ctx: ctx, sock })
            }
            (None, ServerKind::Nchan | ServerKind::Bun) => {
                Ok(Publisher::Http(HttpPublisher::new(listen)))
            }
            (None, _) => Err(format!(
                "the {} has no ZeroMQ endpoint to publish to (READY zmq=-, or --zmq not given)",
                kind.name()
            )),
        }
    }

    /// Publishes one message. An error is the end of the run (ZeroMQ
    /// refused a send); a POST that failed or was refused is counted (see
    /// [`Publisher::failures`]) and the run goes on, its message missing.
    pub fn publish(&mut self, channel: &[u8], payload: &[u8]) -> Result<(), String> {
        match self {
            Publisher::Zmq { sock, .. } => sock
                .send(channel, zmq::SNDMORE)
                .and_then(|_| sock.send(payload, 0))
                .map_err(|e| format!("zmq send: {e}")),
            Publisher::Http(h) => {
                h.post(channel, payload);
                Ok(())
            }
        }
    }

    /// Publications that failed, by reason, with one example each (ZeroMQ:
    /// none, a failed send ends the run). Over HTTP it first waits for the
    /// answers still due.
    pub fn failures(&mut self) -> Vec<(String, u64, String)> {
        match self {
            Publisher::Zmq { .. } => Vec::new(),
            Publisher::Http(h) => h.settle(),
        }
    }

    /// For the tables: "ZeroMQ" or "HTTP POST /pub (N connections)".
    pub fn describe(&self) -> String {
        match self {
            Publisher::Zmq { .. } => "ZeroMQ".into(),
            Publisher::Http(h) => format!(
                "HTTP POST /pub?channel=…, pipelined on one keep-alive connection \
                 at a time ({} opened)",
                h.connections_opened
            ),
        }
    }
}

/// Requests sent and not answered yet, at most, on the publisher's
/// connection: enough that the server's time per publication does not set
/// the publication rate (ZeroMQ does not wait for the server either), few
/// enough to notice a server that stopped answering.
const PIPELINE_DEPTH: usize = 128;

/// POSTs publications on one keep-alive HTTP/1.1 connection, pipelined: the
/// publisher sends each one when it is due, a reader thread reads the
/// answers in order and counts the ones that are not 2xx. A connection the
/// server closes is replaced by a new one; requests it left unanswered are
/// counted as failed (their messages go missing and show as such).
pub struct HttpPublisher {
    addr: SocketAddr,
    conn: Option<PipeConn>,
    request: Vec<u8>,
    /// The meta line's id, like the gateway's: microseconds at start, +1
    /// per publication.
    next_id: u64,
    pub posts: u64,
    pub connections_opened: u64,
    /// Failures on connections already closed, and before any connection.
    failures: Failures,
}

/// Failure reason → (count, first example).
type Failures = BTreeMap<String, (u64, String)>;

fn count(failures: &mut Failures, reason: String, n: u64, example: String) {
    if n > 0 {
        failures.entry(reason).or_insert((0, example)).0 += n;
    }
}

/// One connection: the publisher writes, its reader thread reads.
struct PipeConn {
    stream: TcpStream,
    pipe: Arc<Pipe>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// What the publisher and the reader share.
#[derive(Default)]
struct Pipe {
    state: Mutex<PipeState>,
    /// Signalled when an answer came in or the connection ended.
    changed: Condvar,
}

#[derive(Default)]
struct PipeState {
    /// Requests sent and not answered: (publication number, channel).
    in_flight: VecDeque<(u64, String)>,
    /// The connection ended (closed by the server, or an error): why.
    ended: Option<String>,
    failures: Failures,
}

impl PipeConn {
    fn open(addr: SocketAddr) -> Result<PipeConn, String> {
        let stream = TcpStream::connect_timeout(&addr, POST_TIMEOUT)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .and_then(|_| stream.set_write_timeout(Some(POST_TIMEOUT)))
            .map_err(|e| format!("socket options: {e}"))?;
        let mut read_half = stream.try_clone().map_err(|e| format!("dup: {e}"))?;
        let pipe = Arc::new(Pipe::default());
        let shared = pipe.clone();
        let reader = std::thread::Builder::new()
            .name("publish-answers".into())
            .spawn(move || read_answers(&mut read_half, &shared))
            .map_err(|e| format!("spawn reader thread: {e}"))?;
        Ok(PipeConn {
            stream,
            pipe,
            reader: Some(reader),
        })
    }

    /// Waits until every request sent has its answer (or `timeout`), then
    /// stops the reader and hands back the failures; requests still
    /// unanswered count as failed.
    fn close(mut self, timeout: Duration) -> Failures {
        let deadline = Instant::now() + timeout;
        let mut st = self.pipe.state.lock().expect("lock");
        while !st.in_flight.is_empty() && st.ended.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self.pipe.changed.wait_timeout(st, left).expect("lock").0;
        }
        let mut failures = std::mem::take(&mut st.failures);
        let why = st
            .ended
            .clone()
            .unwrap_or_else(|| format!("no answer within {} s", timeout.as_secs()));
        let unanswered = std::mem::take(&mut st.in_flight);
        drop(st);
        if let Some((no, channel)) = unanswered.front() {
            count(
                &mut failures,
                format!("POST /pub unanswered: {why}"),
                unanswered.len() as u64,
                format!("message {no} to {channel}"),
            );
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        failures
    }
}

impl Drop for PipeConn {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// The reader thread: one answer per request sent, in order, until the
/// connection ends.
fn read_answers(stream: &mut TcpStream, pipe: &Pipe) {
    let mut buf = Vec::new();
    loop {
        let answer = read_response(stream, &mut buf);
        let mut st = pipe.state.lock().expect("lock");
        match answer {
            Ok(r) => {
                let Some((no, channel)) = st.in_flight.pop_front() else {
                    st.ended = Some(format!("an answer to no request: {:?}", r.first_line));
                    pipe.changed.notify_all();
                    return;
                };
                if !(200..300).contains(&r.status) {
                    count(
                        &mut st.failures,
                        format!("POST /pub answered {}", r.status),
                        1,
                        format!("message {no} to {channel}: {:?}", r.first_line),
                    );
                }
                if !r.keep_alive {
                    st.ended = Some("the server closed the connection".into());
                }
            }
            Err(e) => st.ended = Some(e),
        }
        let ended = st.ended.is_some();
        pipe.changed.notify_all();
        if ended {
            return;
        }
    }
}

impl HttpPublisher {
    pub fn new(addr: SocketAddr) -> HttpPublisher {
        HttpPublisher {
            addr,
            conn: None,
            request: Vec::new(),
            next_id: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            posts: 0,
            connections_opened: 0,
            failures: Failures::new(),
        }
    }

    /// Sends one publication (its answer is read by the reader thread); a
    /// failure is counted.
    pub fn post(&mut self, channel: &[u8], payload: &[u8]) {
        self.posts += 1;
        self.next_id += 1;
        let channel = String::from_utf8_lossy(channel).into_owned();
        build_request(
            &mut self.request,
            &self.addr.to_string(),
            &channel,
            self.next_id,
            payload,
        );
        let example = format!("message {} to {channel}", self.posts);
        // A connection that ended is replaced (once per publication).
        for _ in 0..2 {
            if let Err(e) = self.ensure_connected() {
                count(&mut self.failures, format!("POST /pub: {e}"), 1, example);
                return;
            }
            let conn = self.conn.as_mut().expect("connected above");
            {
                let mut st = conn.pipe.state.lock().expect("lock");
                let deadline = Instant::now() + POST_TIMEOUT;
                while st.in_flight.len() >= PIPELINE_DEPTH && st.ended.is_none() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        st.ended = Some(format!(
                            "{PIPELINE_DEPTH} requests unanswered for {} s",
                            POST_TIMEOUT.as_secs()
                        ));
                        break;
                    }
                    st = conn.pipe.changed.wait_timeout(st, left).expect("lock").0;
                }
                if st.ended.is_some() {
                    drop(st);
                    self.retire();
                    continue;
                }
                st.in_flight.push_back((self.posts, channel.clone()));
            }
            if let Err(e) = conn.stream.write_all(&self.request) {
                // Not (completely) sent: not in flight, and not a failure
                // yet, it goes again on a new connection.
                let mut st = conn.pipe.state.lock().expect("lock");
                st.in_flight.pop_back();
                st.ended.get_or_insert(format!("send: {e}"));
                drop(st);
                self.retire();
                continue;
            }
            return;
        }
        count(
            &mut self.failures,
            "POST /pub: the connection ended twice in a row".into(),
            1,
            example,
        );
    }

    fn ensure_connected(&mut self) -> Result<(), String> {
        let ended = self
            .conn
            .as_ref()
            .is_some_and(|c| c.pipe.state.lock().expect("lock").ended.is_some());
        if ended {
            self.retire();
        }
        if self.conn.is_none() {
            self.conn = Some(PipeConn::open(self.addr)?);
            self.connections_opened += 1;
        }
        Ok(())
    }

    /// Closes the current connection, keeping its failures.
    fn retire(&mut self) {
        if let Some(c) = self.conn.take() {
            for (k, (n, e)) in c.close(POST_TIMEOUT) {
                count(&mut self.failures, k, n, e);
            }
        }
    }

    /// Waits for the answers still due (at most [`POST_TIMEOUT`]) and
    /// returns every failure so far; the connection is closed (a later
    /// publication opens a new one).
    pub fn settle(&mut self) -> Vec<(String, u64, String)> {
        self.retire();
        self.failures
            .iter()
            .map(|(k, (n, e))| (k.clone(), *n, e.clone()))
            .collect()
    }
}

/// `POST /pub?channel=…` whose body is the gateway's meta line for
/// (channel, id), `\n`, then `payload`.
pub fn build_request(out: &mut Vec<u8>, host: &str, channel: &str, id: u64, payload: &[u8]) {
    // The gateway's meta line; bench channel names need no JSON escaping.
    let meta = format!(r#"{{"channel":"{channel}","id":"{id}"}}"#);
    out.clear();
    let _ = write!(
        out,
        "POST /pub?channel={channel} HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n{meta}\n",
        meta.len() + 1 + payload.len()
    );
    out.extend_from_slice(payload);
}

/// What one response said.
#[derive(Debug, PartialEq)]
struct Response {
    status: u16,
    first_line: String,
    /// Whether the connection can carry the next request.
    keep_alive: bool,
}

/// Reads from `r` into `buf`: false at EOF.
fn fill(r: &mut impl io::Read, buf: &mut Vec<u8>) -> Result<bool, String> {
    let mut chunk = [0u8; 4096];
    loop {
        match r.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
}

/// Reads up to a CRLF and returns the line without it.
fn line(r: &mut impl io::Read, buf: &mut Vec<u8>) -> Result<String, String> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 2);
            return Ok(line);
        }
        if buf.len() > RESPONSE_HEAD_MAX {
            return Err(format!(
                "a line of the answer over {RESPONSE_HEAD_MAX} bytes"
            ));
        }
        if !fill(r, buf)? {
            return Err("connection closed in a chunked body".into());
        }
    }
}

/// Reads one complete response (head, then a body by Content-Length,
/// chunked, or up to EOF) from `r`, with `buf` holding what was read before
/// and keeping what comes after. Interim 1xx answers are skipped.
fn read_response(r: &mut impl io::Read, buf: &mut Vec<u8>) -> Result<Response, String> {
    let head_len = loop {
        if let Some(n) = http::head_len(buf) {
            let interim = http::status_code(&buf[..n]).is_some_and(|s| (100..200).contains(&s));
            if interim {
                buf.drain(..n);
                continue;
            }
            break n;
        }
        if buf.len() > RESPONSE_HEAD_MAX {
            return Err(format!("response head over {RESPONSE_HEAD_MAX} bytes"));
        }
        if !fill(r, buf)? {
            return Err(format!(
                "connection closed after {} bytes of response head",
                buf.len()
            ));
        }
    };
    let head = &buf[..head_len];
    let first_line = http::first_line(head);
    let status =
        http::status_code(head).ok_or_else(|| format!("malformed status line {first_line:?}"))?;
    let connection = http::header(head, "Connection").map(str::to_ascii_lowercase);
    let mut keep_alive = match connection.as_deref() {
        Some(c) if c.contains("close") => false,
        Some(c) if c.contains("keep-alive") => true,
        _ => !first_line.starts_with("HTTP/1.0"),
    };
    let chunked = http::header(head, "Transfer-Encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let length = http::header(head, "Content-Length").and_then(|n| n.trim().parse::<usize>().ok());
    let no_body = status == 204 || status == 304;
    buf.drain(..head_len);
    if no_body {
    } else if chunked {
        // size line, data, CRLF … a 0 size line, trailers, empty line.
        loop {
            let size_line = line(r, buf)?;
            let size_hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| format!("bad chunk size {size_line:?}"))?;
            if size == 0 {
                while !line(r, buf)?.is_empty() {}
                break;
            }
            while buf.len() < size + 2 {
                if !fill(r, buf)? {
                    return Err("connection closed in a chunked body".into());
                }
            }
            buf.drain(..size + 2);
        }
    } else if let Some(n) = length {
        while buf.len() < n {
            if !fill(r, buf)? {
                return Err("connection closed in the response body".into());
            }
        }
        buf.drain(..n);
    } else {
        // No length: the body ends with the connection.
        while fill(r, buf)? {}
        buf.clear();
        keep_alive = false;
    }
    Ok(Response {
        status,
        first_line,
        keep_alive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::{self, Tail, KIND_MEASURED};
    use std::io::{BufRead as _, Read as _};
    use std::net::TcpListener;

    #[test]
    fn the_body_is_meta_line_newline_payload() {
        let tail = Tail {
            kind: KIND_MEASURED,
            channel: 3,
            seq: 7,
            sent_ns: 123_456_789,
        };
        let mut payload = Vec::new();
        ws::encode_payload(&mut payload, 40, &tail);
        let mut req = Vec::new();
        build_request(
            &mut req,
            "127.0.0.1:80",
            "fanout-3",
            1_765_000_000_000_001,
            &payload,
        );
        let text = String::from_utf8(req.clone()).unwrap();
        let head_len = http::head_len(&req).unwrap();
        assert!(text.starts_with("POST /pub?channel=fanout-3 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n"));
        let body = &req[head_len..];
        assert_eq!(
            http::header(&req[..head_len], "Content-Length"),
            Some(body.len().to_string().as_str())
        );
        let meta = br#"{"channel":"fanout-3","id":"1765000000000001"}"#;
        assert!(body.starts_with(meta));
        assert_eq!(body[meta.len()], b'\n');
        assert_eq!(&body[meta.len() + 1..], &payload[..]);
        // What a subscriber gets back decodes like the gateway's frames.
        assert_eq!(ws::decode_tail(body), Some(tail));
    }

    fn response(bytes: &[u8]) -> Result<Response, String> {
        let mut buf = Vec::new();
        read_response(&mut &bytes[..], &mut buf)
    }

    #[test]
    fn responses() {
        let nchan = b"HTTP/1.1 201 Created\r\nServer: nginx\r\nContent-Type: text/plain\r\n\
            Content-Length: 5\r\nConnection: keep-alive\r\n\r\nqueue";
        let r = response(nchan).unwrap();
        assert_eq!((r.status, r.keep_alive), (201, true));
        assert_eq!(r.first_line, "HTTP/1.1 201 Created");
        let bun = b"HTTP/1.1 202 Accepted\r\nDate: x\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(response(bun).unwrap().status, 202);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert!(response(chunked).unwrap().keep_alive);
        let close = b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        let r = response(close).unwrap();
        assert_eq!((r.status, r.keep_alive), (503, false));
        let to_eof = b"HTTP/1.0 200 OK\r\n\r\nwhatever";
        assert!(!response(to_eof).unwrap().keep_alive);
        assert!(
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort")
                .unwrap_err()
                .contains("closed in the response body")
        );
        assert!(response(b"").unwrap_err().contains("closed after 0 bytes"));
        assert!(response(b"SSH-2.0\r\n\r\n")
            .unwrap_err()
            .contains("malformed"));
        let interim =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(response(interim).unwrap().status, 202);
        // Two responses in one read: the second stays in the buffer.
        let mut buf = Vec::new();
        let two = [&bun[..], &nchan[..]].concat();
        let mut r = &two[..];
        assert_eq!(read_response(&mut r, &mut buf).unwrap().status, 202);
        assert_eq!(read_response(&mut r, &mut buf).unwrap().status, 201);
        assert!(buf.is_empty());
    }

    /// A server that answers each POST with `status`, closing a connection
    /// (saying so) after `per_conn` answers; it stops after `total` bodies
    /// or when no connection came for a second, and returns the bodies.
    fn tiny_server(
        status: &'static str,
        per_conn: usize,
        total: usize,
    ) -> (SocketAddr, std::thread::JoinHandle<Vec<Vec<u8>>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        l.set_nonblocking(true).unwrap();
        let h = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            let mut idle_since = Instant::now();
            while bodies.len() < total {
                let s = match l.accept() {
                    Ok((s, _)) => s,
                    Err(_) if idle_since.elapsed() < Duration::from_secs(1) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(_) => break,
                };
                s.set_nonblocking(false).unwrap();
                let mut r = std::io::BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                for i in 1..=per_conn {
                    let mut len = 0;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return bodies;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.strip_prefix("Content-Length: ") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    bodies.push(body);
                    let close = if i == per_conn {
                        "Connection: close\r\n"
                    } else {
                        ""
                    };
                    w.write_all(
                        format!("HTTP/1.1 {status}\r\n{close}Content-Length: 2\r\n\r\nok")
                            .as_bytes(),
                    )
                    .unwrap();
                    if bodies.len() == total {
                        break;
                    }
                }
                idle_since = Instant::now();
            }
            bodies
        });
        (addr, h)
    }

    fn failed(f: &[(String, u64, String)]) -> u64 {
        f.iter().map(|(_, n, _)| n).sum()
    }

    #[test]
    fn posts_pipelined_on_one_connection() {
        let (addr, server) = tiny_server("202 Accepted", 1000, 50);
        let mut p = Publisher::connect(ServerKind::Bun, None, addr)
            .ok()
            .unwrap();
        for i in 0..50u8 {
            p.publish(b"fanout-0", &[b'0' + i % 10; 40]).unwrap();
        }
        assert!(p.failures().is_empty(), "{:?}", p.failures());
        let bodies = server.join().unwrap();
        assert_eq!(bodies.len(), 50);
        // In order.
        assert!(bodies[49].ends_with(&[b'9'; 40]));
        assert!(bodies[13].ends_with(&[b'3'; 40]));
        let Publisher::Http(h) = &p else { panic!() };
        assert_eq!((h.posts, h.connections_opened), (50, 1));
        assert!(p.describe().contains("POST /pub"));
    }

    #[test]
    fn a_closed_connection_is_replaced_and_its_losses_counted() {
        let (addr, server) = tiny_server("201 Created", 2, 100);
        let mut p = Publisher::connect(ServerKind::Nchan, None, addr)
            .ok()
            .unwrap();
        // Two, answered (the second with Connection: close), then two more
        // on a new connection.
        for _ in 0..2 {
            p.publish(b"c", b"x").unwrap();
        }
        assert!(p.failures().is_empty());
        for _ in 0..2 {
            p.publish(b"c", b"y").unwrap();
        }
        assert!(p.failures().is_empty());
        // A pipelined burst: what the server did not read before it closed
        // is counted, nothing goes unaccounted.
        for _ in 0..10 {
            p.publish(b"c", b"z").unwrap();
        }
        let f = p.failures();
        let bodies = server.join().unwrap();
        assert_eq!(bodies.len() as u64 + failed(&f), 14, "{f:?}");
        let Publisher::Http(h) = &p else { panic!() };
        assert!(h.connections_opened >= 3);
    }

    #[test]
    fn refused_and_failed_posts_are_counted() {
        let (addr, server) = tiny_server("500 Internal Server Error", 10, 2);
        let mut p = Publisher::connect(ServerKind::Nchan, None, addr)
            .ok()
            .unwrap();
        p.publish(b"c", b"x").unwrap();
        p.publish(b"c", b"y").unwrap();
        let f = p.failures();
        server.join().unwrap();
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!((f[0].0.as_str(), f[0].1), ("POST /pub answered 500", 2));
        // Nobody listens any more.
        p.publish(b"c", b"z").unwrap();
        let f = p.failures();
        assert_eq!(failed(&f), 3);
        assert!(
            f.iter()
                .any(|(k, n, _)| k.starts_with("POST /pub: connect") && *n == 1),
            "{f:?}"
        );
        // The gateway and the baseline have ZeroMQ or nothing.
        let err = Publisher::connect(ServerKind::Baseline, None, addr)
            .err()
            .unwrap();
        assert!(err.contains("no ZeroMQ endpoint"), "{err}");
    }
}
