//! The client side of a subscription handshake (connect, send the request,
//! read and check the response head; over TLS, the TLS handshake first, the
//! request going out with the client's Finished) as a nonblocking state
//! machine driven by epoll, and [`Dialer`], which runs many of them with a
//! bound on how many are in flight, start times, per-attempt timeouts and
//! retries with backoff.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::io::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::cli::Transport;
use crate::http;
use crate::sys::{self, Epoll};
use crate::tls::{self, ClientTls, FdIo};
use crate::util::Rng;

/// A response head larger than this is a failure, not something to buffer.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connecting,
    /// TLS: the handshake (the request is queued behind it).
    Tls,
    Sending,
    Reading,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Connecting => "connecting",
            Step::Tls => "TLS handshake",
            Step::Sending => "sending the request",
            Step::Reading => "waiting for the response head",
        }
    }
}

/// One connection whose handshake is under way.
pub struct Handshake {
    pub fd: RawFd,
    pub step: Step,
    /// The request while sending, then the response head as it arrives
    /// (over TLS: the plaintext).
    pub buf: Vec<u8>,
    pub sent: usize,
    /// Over TLS: the client, then (once connected) its connection.
    pub tls: Option<Tls>,
}

/// A handshake's TLS side.
pub enum Tls {
    /// Not connected yet: the client its connection is made from.
    Client(ClientTls),
    /// Connected: rustls' connection and the events epoll watches for it.
    Conn {
        conn: Box<rustls::ClientConnection>,
        events: u32,
    },
}

impl Handshake {
    /// A connection whose connect was just started, with its request;
    /// TLS when `tls` is given.
    pub fn new(fd: RawFd, request: Vec<u8>, tls: Option<&ClientTls>) -> Handshake {
        Handshake {
            fd,
            step: Step::Connecting,
            buf: request,
            sent: 0,
            tls: tls.map(|c| Tls::Client(c.clone())),
        }
    }

    /// Its TLS connection, once connected (taken: the handshake is done).
    pub fn take_tls(&mut self) -> Option<Box<rustls::ClientConnection>> {
        match self.tls.take() {
            Some(Tls::Conn { conn, .. }) => Some(conn),
            _ => None,
        }
    }
}

pub enum Progress {
    Pending,
    /// Handshake done; this many bytes followed the response head.
    Done(usize),
    /// Failed: a category (counted) and an example (shown once).
    Failed(String, String),
}

/// Moves one handshake on after epoll reported `flags` for it (a
/// WebSocket that offered `subprotocol` must have it chosen).
pub fn advance(
    h: &mut Handshake,
    flags: u32,
    ep: &Epoll,
    token: u64,
    transport: Transport,
    subprotocol: Option<&str>,
) -> Progress {
    if h.step == Step::Connecting {
        if let Some(e) = sys::socket_error(h.fd) {
            return Progress::Failed(format!("connect: {e}"), String::new());
        }
        if flags & libc::EPOLLOUT as u32 == 0 {
            // Woken by EPOLLRDHUP/ERR/HUP without a pending error.
            return Progress::Failed(
                "connect: hung up while connecting".into(),
                format!("events {flags:#x}"),
            );
        }
        if let Some(Tls::Client(client)) = &h.tls {
            let mut conn = match client.connect() {
                Ok(c) => c,
                Err(e) => return Progress::Failed(e, String::new()),
            };
            // Queued: rustls sends it right after the client's Finished.
            if let Err(e) = conn.writer().write_all(&h.buf) {
                return Progress::Failed(format!("TLS: queueing the request: {e}"), String::new());
            }
            h.tls = Some(Tls::Conn {
                conn: Box::new(conn),
                events: (libc::EPOLLOUT | libc::EPOLLRDHUP) as u32,
            });
            h.buf = Vec::with_capacity(512);
            h.step = Step::Tls;
        } else {
            h.step = Step::Sending;
        }
    }
    if matches!(h.tls, Some(Tls::Conn { .. })) {
        return advance_tls(h, ep, token, transport, subprotocol);
    }
    if h.step == Step::Sending {
        while h.sent < h.buf.len() {
            match sys::send(h.fd, &h.buf[h.sent..]) {
                Ok(n) => h.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Pending,
                Err(e) => return Progress::Failed(format!("send: {e}"), String::new()),
            }
        }
        if transport == Transport::LongPoll {
            // Held by the server: nothing comes back until a message (or
            // its poll timeout), so the request sent is the handshake.
            h.buf = Vec::new();
            return Progress::Done(0);
        }
        h.buf = Vec::with_capacity(512);
        h.step = Step::Reading;
        if let Err(e) = ep.modify(h.fd, (libc::EPOLLIN | libc::EPOLLRDHUP) as u32, token) {
            return Progress::Failed(format!("epoll_ctl: {e}"), String::new());
        }
        // Level-triggered: epoll reports the answer when it is there.
        return Progress::Pending;
    }
    let mut chunk = [0u8; 4096];
    loop {
        match sys::recv(h.fd, &mut chunk, 0) {
            Ok(0) => {
                return Progress::Failed(
                    "closed before a complete response head".into(),
                    format!(
                        "{} bytes received: {:?}",
                        h.buf.len(),
                        http::first_line(&h.buf)
                    ),
                )
            }
            Ok(n) => {
                h.buf.extend_from_slice(&chunk[..n]);
                if let Some(done) = head_progress(&h.buf, transport, subprotocol) {
                    return done;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Pending,
            Err(e) => {
                return Progress::Failed(
                    format!("recv: {e}"),
                    format!(
                        "{} bytes received: {:?}",
                        h.buf.len(),
                        http::first_line(&h.buf)
                    ),
                )
            }
        }
    }
}

/// What the response so far in `buf` decides: done (the head accepts the
/// subscription), failed (it refuses, or is too long), or `None`: not all
/// of the head is there yet.
fn head_progress(buf: &[u8], transport: Transport, subprotocol: Option<&str>) -> Option<Progress> {
    if let Some(len) = http::head_len(buf) {
        let head = &buf[..len];
        return Some(
            match http::check_subscribe_response(transport, head, subprotocol) {
                Ok(()) => Progress::Done(buf.len() - len),
                Err(e) => Progress::Failed(e, head_excerpt(head)),
            },
        );
    }
    if buf.len() > HEAD_BYTES_MAX {
        return Some(Progress::Failed(
            format!("response head over {HEAD_BYTES_MAX} bytes"),
            http::first_line(buf),
        ));
    }
    None
}

/// [`advance`] over TLS, once connected: writes what rustls has to send,
/// reads and decrypts what came, and checks the plaintext's response head;
/// epoll watches for readability, and writability while rustls has
/// something the socket refused.
fn advance_tls(
    h: &mut Handshake,
    ep: &Epoll,
    token: u64,
    transport: Transport,
    subprotocol: Option<&str>,
) -> Progress {
    let Some(Tls::Conn { conn, events }) = h.tls.as_mut() else {
        unreachable!("called for a connected TLS handshake");
    };
    let mut sock = FdIo(h.fd);
    loop {
        while conn.wants_write() {
            match conn.write_tls(&mut sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Progress::Failed(format!("send: {e}"), String::new()),
            }
        }
        if h.step == Step::Tls && !conn.is_handshaking() {
            h.step = Step::Reading;
        }
        if transport == Transport::LongPoll && h.step == Step::Reading && !conn.wants_write() {
            // Held by the server (see `advance`): the request sent is the
            // handshake.
            return Progress::Done(0);
        }
        match conn.read_tls(&mut sock) {
            Ok(0) => {
                return Progress::Failed(
                    if h.step == Step::Tls {
                        "closed during the TLS handshake".into()
                    } else {
                        "closed before a complete response head".into()
                    },
                    format!(
                        "{} bytes received: {:?}",
                        h.buf.len(),
                        http::first_line(&h.buf)
                    ),
                )
            }
            Ok(_) => {
                if let Err(e) = conn.process_new_packets() {
                    // The alert that says why, as any client would send it.
                    let _ = conn.write_tls(&mut sock);
                    return Progress::Failed(format!("TLS: {e}"), String::new());
                }
                let closed = tls::read_plaintext(conn, &mut h.buf, usize::MAX);
                if let Some(done) = head_progress(&h.buf, transport, subprotocol) {
                    return done;
                }
                if closed {
                    return Progress::Failed(
                        "closed (close_notify) before a complete response head".into(),
                        format!("{} bytes received", h.buf.len()),
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let want = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32
                    | if conn.wants_write() {
                        libc::EPOLLOUT as u32
                    } else {
                        0
                    };
                if want != *events {
                    if let Err(e) = ep.modify(h.fd, want, token) {
                        return Progress::Failed(format!("epoll_ctl: {e}"), String::new());
                    }
                    *events = want;
                }
                return Progress::Pending;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Progress::Failed(
                    format!("recv: {e}"),
                    format!(
                        "{} bytes received: {:?}",
                        h.buf.len(),
                        http::first_line(&h.buf)
                    ),
                )
            }
        }
    }
}

/// The head of a refused response on one line, short, for the failure example.
pub fn head_excerpt(head: &[u8]) -> String {
    let text = String::from_utf8_lossy(&head[..head.len().min(300)]).into_owned();
    text.trim_end().replace("\r\n", " | ")
}

/// Whether a response head announces a chunked body.
fn chunked_body(head: &[u8]) -> bool {
    http::header(head, "Transfer-Encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
}

/// What a [`Dialer`] needs to open connections.
#[derive(Debug, Clone)]
pub struct DialConfig {
    pub target: SocketAddr,
    pub sources: Vec<IpAddr>,
    pub transport: Transport,
    /// Connection i (global index) subscribes to `{prefix}{i % channels}`
    /// (`fanout-3`, `rt.3`) and binds to source `i % sources.len()`.
    pub channel_prefix: String,
    pub channels: u64,
    /// Handshakes in flight at once (this dialer's share).
    pub in_flight: usize,
    pub handshake_timeout: Duration,
    /// Attempts per connection (1: no retry).
    pub max_attempts: u32,
    /// First retry after about this long (±50 % random), doubling per
    /// attempt up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Whether an open connection stays in the epoll set (readable, same
    /// token) or leaves it.
    pub keep_in_epoll: bool,
    /// A WebSocket subprotocol to offer, which the 101 must then choose
    /// (the two-way `gateway.v1`); `None`: the plain subscription.
    pub subprotocol: Option<&'static str>,
    /// Connect with TLS (the handshake's plaintext only: an open
    /// connection's TLS state is dropped, so this is for clients that then
    /// read nothing, the storm's).
    pub tls: Option<ClientTls>,
    /// Offer permessage-deflate (a server may decline it).
    pub deflate: bool,
}

/// A connection whose handshake succeeded.
#[derive(Debug)]
pub struct Opened {
    pub local: u32,
    pub fd: RawFd,
    /// Bytes that came after the response head.
    pub extra: Vec<u8>,
    /// The head said `Transfer-Encoding: chunked` (what hyper-based servers
    /// do for an SSE stream): the body must be de-chunked before it is read.
    pub chunked: bool,
    /// The 101 agreed to permessage-deflate.
    pub deflate: bool,
    /// From the start of the successful attempt to its response head.
    pub latency: Duration,
    pub attempt: u32,
}

#[derive(Debug)]
pub enum Outcome {
    Opened(Opened),
    /// Every attempt failed (or the dialer was stopped): not open.
    GaveUp,
}

struct Attempt {
    hs: Handshake,
    started: Instant,
    attempt: u32,
}

/// Opens connections `local` = 0, 1, … (global index `base + local`) when
/// they are due, at most `in_flight` at a time, with a timeout per attempt
/// and bounded retries. The epoll token of a handshake is its `local`.
pub struct Dialer {
    cfg: DialConfig,
    base: u64,
    host: String,
    inflight: HashMap<u32, Attempt>,
    /// (start, local, attempt) in start order, for timeouts.
    timeouts: VecDeque<(Instant, u32, u32)>,
    /// (due, local, attempt): attempts waiting for their time or a slot.
    due: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// Failed attempts by reason → (count, first example).
    pub failures: BTreeMap<String, (u64, String)>,
    pub attempts: u64,
    pub failed_attempts: u64,
    pub gave_up: u64,
    pub max_in_flight_seen: usize,
    /// Out of descriptors: nothing more is started.
    out_of_fds: bool,
    rng: Rng,
    /// Over TLS: what the first completed handshake negotiated.
    pub negotiated: Option<String>,
}

impl Dialer {
    pub fn new(cfg: DialConfig, base: u64, seed: u64) -> Dialer {
        Dialer {
            host: cfg.target.to_string(),
            cfg,
            base,
            inflight: HashMap::new(),
            timeouts: VecDeque::new(),
            due: BinaryHeap::new(),
            failures: BTreeMap::new(),
            attempts: 0,
            failed_attempts: 0,
            gave_up: 0,
            max_in_flight_seen: 0,
            out_of_fds: false,
            rng: Rng::new(seed),
            negotiated: None,
        }
    }

    /// Connection `local`'s first attempt starts at `when` (or as soon
    /// after as a slot is free).
    pub fn schedule(&mut self, local: u32, when: Instant) {
        self.due.push(Reverse((when, local, 1)));
    }

    /// Nothing in flight and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.inflight.is_empty() && self.due.is_empty()
    }

    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether epoll token `token` is a handshake of this dialer's.
    pub fn owns(&self, token: u64) -> bool {
        self.inflight.contains_key(&(token as u32))
    }

    /// The delay before the next retry: `backoff · 2^(attempt-1)`, capped,
    /// times a random factor in [0.5, 1.5).
    pub fn backoff(&mut self, attempt: u32) -> Duration {
        let doubled = self
            .cfg
            .backoff
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20));
        doubled
            .min(self.cfg.backoff_max)
            .mul_f64(0.5 + self.rng.unit())
    }

    /// Expires attempts past their timeout and starts due ones while slots
    /// are free.
    pub fn step(&mut self, ep: &Epoll, now: Instant, out: &mut Vec<Outcome>) {
        while let Some(&(t, local, attempt)) = self.timeouts.front() {
            if now.duration_since(t) < self.cfg.handshake_timeout {
                break;
            }
            self.timeouts.pop_front();
            if self.inflight.get(&local).map(|a| a.attempt) != Some(attempt) {
                continue; // finished already (this entry is stale)
            }
            let a = self.inflight.remove(&local).expect("present");
            sys::close_abortive(a.hs.fd);
            let category = format!(
                "no answer within {} s ({})",
                self.cfg.handshake_timeout.as_secs_f64(),
                a.hs.step.name()
            );
            self.fail(local, attempt, category, String::new(), true, now, out);
        }
        while self.inflight.len() < self.cfg.in_flight && !self.out_of_fds {
            match self.due.peek() {
                Some(&Reverse((when, local, attempt))) if when <= now => {
                    self.due.pop();
                    self.start(ep, local, attempt, now, out);
                }
                _ => break,
            }
        }
        if self.out_of_fds {
            while self.due.pop().is_some() {
                self.gave_up += 1;
                out.push(Outcome::GaveUp);
            }
        }
    }

    /// How long epoll may sleep before the dialer has something to do
    /// (capped at `cap_ms`).
    pub fn wait_ms(&self, now: Instant, cap_ms: i32) -> i32 {
        let mut next: Option<Instant> = None;
        if self.inflight.len() < self.cfg.in_flight {
            next = self.due.peek().map(|Reverse((when, _, _))| *when);
        }
        if let Some(&(t, _, _)) = self.timeouts.front() {
            let expiry = t + self.cfg.handshake_timeout;
            next = Some(next.map_or(expiry, |n| n.min(expiry)));
        }
        match next {
            None => cap_ms,
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_micros().div_ceil(1000);
                (ms as i32).clamp(0, cap_ms)
            }
        }
    }

    fn start(
        &mut self,
        ep: &Epoll,
        local: u32,
        attempt: u32,
        now: Instant,
        out: &mut Vec<Outcome>,
    ) {
        let global = self.base + local as u64;
        let source = self.cfg.sources[(global % self.cfg.sources.len() as u64) as usize];
        self.attempts += 1;
        let fd = match sys::start_connect(source, self.cfg.target) {
            Ok(fd) => fd,
            Err(e) => {
                let (category, retry) = match e.raw_os_error() {
                    Some(libc::EMFILE) | Some(libc::ENFILE) => {
                        self.out_of_fds = true;
                        (format!("socket: {e}: out of descriptors"), false)
                    }
                    Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => (
                        format!("connect: {e}: local ports exhausted, add --sources"),
                        true,
                    ),
                    _ => (format!("connect: {e}"), true),
                };
                self.fail(
                    local,
                    attempt,
                    category,
                    format!("from {source}"),
                    retry,
                    now,
                    out,
                );
                return;
            }
        };
        if let Err(e) = ep.add(fd, (libc::EPOLLOUT | libc::EPOLLRDHUP) as u32, local as u64) {
            sys::close(fd);
            self.fail(
                local,
                attempt,
                format!("epoll_ctl: {e}"),
                String::new(),
                false,
                now,
                out,
            );
            return;
        }
        let channel = format!("{}{}", self.cfg.channel_prefix, global % self.cfg.channels);
        let buf = http::subscribe_request_with(
            self.cfg.transport,
            &self.host,
            &channel,
            self.cfg.subprotocol,
            self.cfg.deflate,
        );
        self.inflight.insert(
            local,
            Attempt {
                hs: Handshake::new(fd, buf, self.cfg.tls.as_ref()),
                started: now,
                attempt,
            },
        );
        self.timeouts.push_back((now, local, attempt));
        self.max_in_flight_seen = self.max_in_flight_seen.max(self.inflight.len());
    }

    /// Moves handshake `token` on after epoll reported `flags` for it.
    pub fn on_event(
        &mut self,
        ep: &Epoll,
        token: u64,
        flags: u32,
        now: Instant,
        out: &mut Vec<Outcome>,
    ) {
        let local = token as u32;
        let Some(a) = self.inflight.get_mut(&local) else {
            return;
        };
        match advance(
            &mut a.hs,
            flags,
            ep,
            token,
            self.cfg.transport,
            self.cfg.subprotocol,
        ) {
            Progress::Pending => {}
            Progress::Done(extra) => {
                let mut a = self.inflight.remove(&local).expect("present");
                if let Some(conn) = a.hs.take_tls() {
                    if self.negotiated.is_none() {
                        self.negotiated = Some(tls::negotiated(&conn));
                    }
                }
                if !self.cfg.keep_in_epoll {
                    let _ = ep.delete(a.hs.fd);
                }
                let buf = a.hs.buf;
                let head = &buf[..buf.len() - extra];
                let (chunked, deflate) = (chunked_body(head), http::deflate_agreed(head));
                out.push(Outcome::Opened(Opened {
                    local,
                    fd: a.hs.fd,
                    chunked,
                    deflate,
                    extra: buf[buf.len() - extra..].to_vec(),
                    latency: now.duration_since(a.started),
                    attempt: a.attempt,
                }));
            }
            Progress::Failed(category, example) => {
                let a = self.inflight.remove(&local).expect("present");
                sys::close_abortive(a.hs.fd);
                self.fail(local, a.attempt, category, example, true, now, out);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn fail(
        &mut self,
        local: u32,
        attempt: u32,
        category: String,
        example: String,
        retry: bool,
        now: Instant,
        out: &mut Vec<Outcome>,
    ) {
        self.failed_attempts += 1;
        let example = format!(
            "connection {} attempt {attempt}{}{example}",
            self.base + local as u64,
            if example.is_empty() { "" } else { ": " }
        );
        self.failures.entry(category).or_insert((0, example)).0 += 1;
        if retry && attempt < self.cfg.max_attempts && !self.out_of_fds {
            let at = now + self.backoff(attempt);
            self.due.push(Reverse((at, local, attempt + 1)));
        } else {
            self.gave_up += 1;
            out.push(Outcome::GaveUp);
        }
    }

    /// Stops: every attempt in flight or waiting is given up (counted under
    /// `why`); returns how many.
    pub fn abandon(&mut self, why: &str, out: &mut Vec<Outcome>) -> u64 {
        let mut n = 0;
        let inflight: Vec<(u32, Attempt)> = self.inflight.drain().collect();
        for (local, a) in inflight {
            sys::close_abortive(a.hs.fd);
            let category = format!("{why} ({})", a.hs.step.name());
            let example = format!("connection {}", self.base + local as u64);
            self.failures.entry(category).or_insert((0, example)).0 += 1;
            out.push(Outcome::GaveUp);
            n += 1;
        }
        while let Some(Reverse((_, local, attempt))) = self.due.pop() {
            let category = format!("{why} (not started)");
            let example = format!("connection {} attempt {attempt}", self.base + local as u64);
            self.failures.entry(category).or_insert((0, example)).0 += 1;
            out.push(Outcome::GaveUp);
            n += 1;
        }
        self.timeouts.clear();
        self.gave_up += n;
        n
    }
}

impl Drop for Dialer {
    fn drop(&mut self) {
        for (_, a) in self.inflight.drain() {
            sys::close_abortive(a.hs.fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    const WS_101: &str =
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    #[test]
    fn chunked_bodies_are_recognised() {
        assert!(!chunked_body(WS_101.as_bytes()));
        assert!(chunked_body(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
              transfer-encoding: chunked\r\n\r\n"
        ));
        assert!(chunked_body(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"
        ));
        assert!(!chunked_body(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
        ));
    }

    fn config(target: SocketAddr, max_attempts: u32) -> DialConfig {
        DialConfig {
            target,
            sources: vec!["127.0.0.1".parse().unwrap()],
            transport: Transport::Ws,
            channel_prefix: "t-".into(),
            channels: 3,
            in_flight: 4,
            handshake_timeout: Duration::from_secs(5),
            max_attempts,
            backoff: Duration::from_millis(5),
            backoff_max: Duration::from_millis(40),
            keep_in_epoll: false,
            subprotocol: None,
            tls: None,
            deflate: false,
        }
    }

    /// Runs the dialer until it is idle (or 10 s pass).
    fn drive(d: &mut Dialer, ep: &Epoll) -> Vec<Outcome> {
        let mut out = Vec::new();
        let mut events = Vec::with_capacity(64);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !d.is_idle() && Instant::now() < deadline {
            d.step(ep, Instant::now(), &mut out);
            ep.wait(&mut events, d.wait_ms(Instant::now(), 50)).unwrap();
            for ev in events.iter() {
                let (token, flags) = (ev.u64, ev.events);
                assert!(d.owns(token));
                d.on_event(ep, token, flags, Instant::now(), &mut out);
            }
        }
        out
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut d = Dialer::new(config("127.0.0.1:1".parse().unwrap(), 5), 0, 7);
        for _ in 0..100 {
            let b1 = d.backoff(1);
            assert!(b1 >= Duration::from_micros(2500) && b1 < Duration::from_micros(7500));
            let b3 = d.backoff(3);
            assert!(b3 >= Duration::from_millis(10) && b3 < Duration::from_millis(30));
            let b9 = d.backoff(9);
            assert!(b9 >= Duration::from_millis(20) && b9 < Duration::from_millis(60));
        }
        assert!(d.backoff(1000) < Duration::from_millis(60), "no overflow");
    }

    #[test]
    fn opens_subscribes_and_keeps_bytes_after_the_head() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut heads = Vec::new();
            let mut keep = Vec::new();
            for _ in 0..6 {
                let (mut s, _) = listener.accept().unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while http::head_len(&head).is_none() {
                    let k = s.read(&mut b).unwrap();
                    head.extend_from_slice(&b[..k]);
                }
                // The response head and a first frame in one write.
                let mut answer = WS_101.as_bytes().to_vec();
                answer.extend_from_slice(&[0x81, 2, b'h', b'i']);
                s.write_all(&answer).unwrap();
                heads.push(String::from_utf8(head).unwrap());
                keep.push(s);
            }
            std::thread::sleep(Duration::from_millis(200));
            heads
        });
        let ep = Epoll::new().unwrap();
        let mut d = Dialer::new(config(addr, 1), 10, 1);
        let now = Instant::now();
        for local in 0..6 {
            d.schedule(local, now);
        }
        let out = drive(&mut d, &ep);
        assert_eq!(out.len(), 6);
        for o in &out {
            match o {
                Outcome::Opened(o) => {
                    assert_eq!(o.extra, b"\x81\x02hi");
                    assert!(!o.chunked);
                    assert_eq!(o.attempt, 1);
                    sys::close(o.fd);
                }
                Outcome::GaveUp => panic!("gave up"),
            }
        }
        assert!(d.max_in_flight_seen <= 4);
        assert_eq!((d.attempts, d.failed_attempts, d.gave_up), (6, 0, 0));
        let heads = server.join().unwrap();
        // Global indices 10..16 over 3 channels.
        for ch in ["t-0", "t-1", "t-2"] {
            let line = format!("GET /ws?channel={ch} HTTP/1.1\r\n");
            assert_eq!(heads.iter().filter(|h| h.starts_with(&line)).count(), 2);
        }
    }

    #[test]
    fn refused_attempts_retry_then_give_up() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let ep = Epoll::new().unwrap();
        let mut d = Dialer::new(config(port, 3), 0, 2);
        d.schedule(0, Instant::now());
        d.schedule(1, Instant::now());
        let t = Instant::now();
        let out = drive(&mut d, &ep);
        assert!(matches!(out[..], [Outcome::GaveUp, Outcome::GaveUp]));
        assert_eq!(d.attempts, 6);
        assert_eq!(d.failed_attempts, 6);
        assert_eq!(d.gave_up, 2);
        let (reason, (n, example)) = d.failures.iter().next().unwrap();
        assert!(reason.contains("Connection refused"), "{reason}");
        assert_eq!(*n, 6);
        assert!(example.contains("attempt 1"), "{example}");
        // Two backoffs of at least 2.5 ms and 5 ms.
        assert!(t.elapsed() >= Duration::from_micros(7500));
    }

    #[test]
    fn a_refused_then_accepted_attempt_succeeds_on_retry() {
        // A 503 first, then a 101: the second attempt opens.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut keep = Vec::new();
            for i in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while http::head_len(&head).is_none() {
                    let k = s.read(&mut b).unwrap();
                    head.extend_from_slice(&b[..k]);
                }
                let answer = if i == 0 {
                    "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n"
                } else {
                    WS_101
                };
                s.write_all(answer.as_bytes()).unwrap();
                keep.push(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        });
        let ep = Epoll::new().unwrap();
        let mut d = Dialer::new(config(addr, 2), 0, 3);
        d.schedule(0, Instant::now());
        let out = drive(&mut d, &ep);
        match &out[..] {
            [Outcome::Opened(o)] => {
                assert_eq!(o.attempt, 2);
                sys::close(o.fd);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(d.failed_attempts, 1);
        assert!(d.failures.keys().next().unwrap().starts_with("status 503"));
        server.join().unwrap();
    }

    #[test]
    fn over_tls_the_request_follows_the_handshake() {
        let setup = crate::tls::TlsSetup::generate().unwrap();
        let (addr, done, server) = setup.serve(6, |_, _| {
            // The response head and a first frame in one record.
            let mut answer = WS_101.as_bytes().to_vec();
            answer.extend_from_slice(&[0x81, 2, b'h', b'i']);
            Some(answer)
        });
        let ep = Epoll::new().unwrap();
        let mut cfg = config(addr, 1);
        cfg.tls = Some(setup.client.clone());
        let mut d = Dialer::new(cfg, 10, 1);
        let now = Instant::now();
        for local in 0..6 {
            d.schedule(local, now);
        }
        let out = drive(&mut d, &ep);
        assert!(d.failures.is_empty(), "{:?}", d.failures);
        assert_eq!(out.len(), 6);
        for o in &out {
            match o {
                Outcome::Opened(o) => {
                    assert_eq!(o.extra, b"\x81\x02hi");
                    sys::close(o.fd);
                }
                Outcome::GaveUp => panic!("gave up"),
            }
        }
        let negotiated = d.negotiated.clone().unwrap();
        assert!(negotiated.starts_with("TLS 1.3 "), "{negotiated}");
        done.send(()).unwrap();
        let heads = server.join().unwrap();
        for ch in ["t-0", "t-1", "t-2"] {
            let line = format!("GET /ws?channel={ch} HTTP/1.1\r\n");
            assert_eq!(heads.iter().filter(|h| h.starts_with(&line)).count(), 2);
        }
    }

    #[test]
    fn over_tls_an_untrusted_certificate_and_a_refusal_fail() {
        let setup = crate::tls::TlsSetup::generate().unwrap();
        let other = crate::tls::TlsSetup::generate().unwrap();
        // A server with another certificate: refused by the client (whose
        // alert, or the reset that follows it, fails the server's read).
        let server_config = other.server_config();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(server_config).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut b = [0u8; 16];
            s.read(&mut b).is_err()
        });
        let ep = Epoll::new().unwrap();
        let mut cfg = config(addr, 1);
        cfg.tls = Some(setup.client.clone());
        let mut d = Dialer::new(cfg.clone(), 0, 1);
        d.schedule(0, Instant::now());
        assert!(matches!(drive(&mut d, &ep)[..], [Outcome::GaveUp]));
        let (reason, _) = d.failures.iter().next().unwrap();
        assert!(
            reason.starts_with("TLS: invalid peer certificate"),
            "{reason}"
        );
        assert!(server.join().unwrap());

        // The right certificate, a 503: the head is checked as in cleartext.
        let (addr, done, server) = setup.serve(1, |_, _| {
            Some(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n".to_vec())
        });
        cfg.target = addr;
        let mut d = Dialer::new(cfg, 0, 1);
        d.schedule(0, Instant::now());
        assert!(matches!(drive(&mut d, &ep)[..], [Outcome::GaveUp]));
        let (reason, _) = d.failures.iter().next().unwrap();
        assert!(reason.starts_with("status 503"), "{reason}");
        done.send(()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn abandon_gives_up_everything_left() {
        // A listener that never answers: handshakes stay in flight.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ep = Epoll::new().unwrap();
        let mut d = Dialer::new(config(listener.local_addr().unwrap(), 1), 0, 4);
        let now = Instant::now();
        for local in 0..10 {
            d.schedule(local, now);
        }
        let mut out = Vec::new();
        d.step(&ep, now, &mut out);
        assert_eq!(d.in_flight(), 4);
        assert_eq!(d.abandon("stopped", &mut out), 10);
        assert_eq!(out.len(), 10);
        assert!(d.is_idle());
        assert_eq!(d.gave_up, 10);
        let total: u64 = d.failures.values().map(|(n, _)| n).sum();
        assert_eq!(total, 10);
        assert!(d.failures.contains_key("stopped (not started)"));
    }
}
