//! The idle scenario: open N subscribed connections that then say nothing,
//! and measure what they cost the server.
//!
//! One thread, nonblocking sockets and one level-triggered epoll set. At most
//! `--in-flight` handshakes run at once; a connection whose handshake is done
//! leaves the epoll set (so the client adds no epoll entry per idle
//! connection to the machine's Slab) and is only looked at again, with a
//! peeking `recv`, at the end of the hold. They are closed with a reset, so
//! that back-to-back runs do not measure each other's TIME_WAIT sockets.
//! gRPC connections (`--transport grpc`) are HTTP/2 and opened by the h2
//! client of `grpc`, each with one Subscribe stream. Over TLS (`--tls`) a
//! connection keeps its client TLS state (the bench's memory, not the
//! server's), so that what waits on it at the end of the hold is
//! decrypted and judged like cleartext.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::cli::{IdleArgs, Server, ServerKind, Transport};
use crate::grpc::{self, IdleConfig, IdleGrpc};
use crate::handshake::{advance, Handshake, Progress, Step};
use crate::http;
use crate::procfs;
use crate::report::{Health, IdleReport};
use crate::sys::{self, Epoll};
use crate::target::Target;
use crate::tls::{self, ClientTls, TlsSetup};

const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to count the closed connections out.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

pub fn run(
    args: &IdleArgs,
    kind: ServerKind,
    server: &Server,
    tls: Option<&TlsSetup>,
) -> Result<IdleReport, String> {
    kind.check_transport(args.transport)?;
    if tls.is_some() && args.transport == Transport::Grpc {
        return Err(
            "--tls measures WebSocket, SSE and long-poll (--transport ws|sse|longpoll)".into(),
        );
    }
    sys::check_nofile_for(args.connections)?;

    // Spawned (and stopped when dropped) or attached; with its gRPC
    // listener for gRPC.
    let mut server = if args.transport == Transport::Grpc {
        Target::start(kind, &grpc::with_grpc_listener(server, kind, 1))?
    } else {
        Target::start_with_tls(kind, server, tls)?
    };
    let (pid, cores) = (server.pid, server.cores);
    let target = if args.transport == Transport::Grpc {
        server.grpc
    } else {
        server.listen
    };
    sys::check_sources(&args.sources, target)?;
    let source = server.connections_source();

    // Connections the server counts before this run (its own /healthz
    // request included, if it counts that).
    let baseline = match server.connections(HEALTHZ_TIMEOUT) {
        Ok(per_core) => Some(per_core.iter().sum::<u64>()),
        Err(e) if !server.is_spawned() => {
            eprintln!("bench: {source} unavailable, the connection count is not checked: {e}");
            None
        }
        Err(e) => return Err(e),
    };
    let unavailable_why = format!("the server had no {source} before the run");
    // Let the server finish with the /healthz connection before measuring.
    std::thread::sleep(Duration::from_millis(200));
    let rss_before = server.rss_bytes()?;
    let slab_before = procfs::slab_bytes().map_err(|e| e.to_string())?;

    let mut conns = if args.transport == Transport::Grpc {
        Held::Grpc(IdleGrpc::open(&IdleConfig {
            target,
            sources: &args.sources,
            connections: args.connections,
            channels: args.channels,
            in_flight: args.in_flight,
            connect_timeout: Duration::from_secs_f64(args.connect_timeout_s),
            handshake_timeout: Duration::from_secs_f64(args.handshake_timeout_s),
        })?)
    } else {
        let mut c = Connector::new(args, target, server.tls.clone())?;
        c.run();
        Held::Http(Box::new(c))
    };
    let connect_s = conns.connect_time().as_secs_f64();
    eprintln!(
        "bench: {} of {} open in {connect_s:.3} s; holding {} s",
        conns.open(),
        args.connections,
        args.hold_s
    );

    std::thread::sleep(Duration::from_secs_f64(args.hold_s));
    let hold = conns.check_alive();
    let tls_negotiated = match (&conns, &server.tls) {
        (Held::Http(c), Some(client)) => Some(format!(
            "{} (clients: {})",
            c.negotiated.as_deref().unwrap_or("no handshake completed"),
            client.describe()
        )),
        _ => None,
    };

    let health = match baseline {
        Some(baseline) => Health::checked(baseline, server.connections(HEALTHZ_TIMEOUT)),
        None => Health::Unavailable(unavailable_why),
    };
    std::thread::sleep(Duration::from_millis(100));
    // A crashed gateway is a zombie without VmRSS: say what happened.
    server
        .alive()
        .map_err(|e| format!("{e} with {} connections open", conns.open()))?;
    let rss_after = server
        .rss_bytes()
        .map_err(|e| format!("after the connections: {e}"))?;
    let rss_scope = server.rss_scope();
    let slab_after = procfs::slab_bytes().map_err(|e| e.to_string())?;

    let mut report = IdleReport {
        transport: args.transport,
        kind,
        server: server.how(),
        pid,
        target: target.to_string(),
        cores,
        channels: args.channels,
        sources: args.sources.len(),
        requested: args.connections,
        open: conns.open(),
        failures: conns
            .failures()
            .iter()
            .map(|(k, (n, e))| (k.clone(), *n, e.clone()))
            .collect(),
        not_attempted: conns.not_attempted(),
        connect_s,
        rss_before,
        rss_after,
        slab_before,
        slab_after,
        health,
        connections_source: source,
        rss_scope,
        closed_during_hold: hold.closed,
        deflate_agreed: args.deflate.then(|| conns.deflate_agreed()),
        data_during_hold: hold.with_data,
        sse_comments_during_hold: hold.sse_comments_only,
        bytes_after_head: conns.bytes_after_head() + hold.bytes,
        healthz_baseline_after_close: None,
        healthz_after_close: None,
        rss_after_close: None,
        tls: tls_negotiated,
    };
    conns.close_all();
    // The server should let go of every connection: wait for its count to
    // return to the baseline.
    if let Some(baseline) = baseline {
        let deadline = Instant::now() + CLOSE_GRACE;
        loop {
            let total = server
                .connections(HEALTHZ_TIMEOUT)
                .map(|c| c.iter().sum::<u64>())
                .ok();
            report.healthz_after_close = total;
            if total == Some(baseline) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        report.healthz_baseline_after_close = Some(baseline);
    }
    report.rss_after_close = server.rss_bytes().ok();
    server.stop();
    Ok(report)
}

/// What the open connections looked like at the end of the hold.
#[derive(Debug, Default, PartialEq, Eq)]
struct Hold {
    /// Closed or reset by the server.
    closed: u64,
    /// With bytes waiting (SSE comments aside).
    with_data: u64,
    /// SSE: with nothing but comments waiting.
    sse_comments_only: u64,
    /// Bytes waiting, over all of them (up to 4 KiB each).
    bytes: u64,
}

/// Whether an SSE stream's bytes hold no event: only comment lines (`:`…)
/// and blank lines, and the chunk-size lines of a chunked body (hex digits;
/// a line of only those would be an SSE field without a value, which
/// carries nothing either).
pub fn only_sse_comments(bytes: &[u8]) -> bool {
    bytes.split(|&b| b == b'\n').all(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.is_empty() || line[0] == b':' || line.iter().all(u8::is_ascii_hexdigit)
    })
}

/// The connections of one run: opened by idle's own handshakes, or gRPC's.
enum Held<'a> {
    Http(Box<Connector<'a>>),
    Grpc(IdleGrpc),
}

impl Held<'_> {
    fn open(&self) -> u64 {
        match self {
            Held::Http(c) => c.established.len() as u64,
            Held::Grpc(g) => g.open,
        }
    }

    fn connect_time(&self) -> Duration {
        match self {
            Held::Http(c) => c.connect_time(),
            Held::Grpc(g) => g.connect_time,
        }
    }

    fn failures(&self) -> &BTreeMap<String, (u64, String)> {
        match self {
            Held::Http(c) => &c.failures,
            Held::Grpc(g) => &g.failures,
        }
    }

    fn not_attempted(&self) -> u64 {
        match self {
            Held::Http(c) => c.not_attempted(),
            Held::Grpc(g) => g.not_attempted,
        }
    }

    /// Connections whose 101 agreed to permessage-deflate.
    fn deflate_agreed(&self) -> u64 {
        match self {
            Held::Http(c) => c.deflate_agreed,
            Held::Grpc(_) => 0,
        }
    }

    /// Bytes that came with the response heads (gRPC: counted by the hold).
    fn bytes_after_head(&self) -> u64 {
        match self {
            Held::Http(c) => c.bytes_after_head,
            Held::Grpc(_) => 0,
        }
    }

    fn check_alive(&mut self) -> Hold {
        match self {
            Held::Http(c) => c.check_alive(),
            Held::Grpc(g) => {
                let (closed, with_data, bytes) = g.hold_counts();
                Hold {
                    closed,
                    with_data,
                    sse_comments_only: 0,
                    bytes,
                }
            }
        }
    }

    fn close_all(&mut self) {
        match self {
            Held::Http(c) => c.close_all(),
            Held::Grpc(g) => g.close_all(),
        }
    }
}

/// Opens the connections of one run and keeps them.
struct Connector<'a> {
    args: &'a IdleArgs,
    target: SocketAddr,
    host: String,
    ep: Epoll,
    /// Handshakes under way, by token (the connection's index).
    inflight: HashMap<u64, Handshake>,
    /// (start, token) in start order: the front is the oldest, for timeouts.
    started: VecDeque<(Instant, u64)>,
    next: u64,
    pub established: Vec<RawFd>,
    /// Over TLS: the client side of each established connection, in the
    /// same order.
    established_tls: Vec<rustls::ClientConnection>,
    tls: Option<ClientTls>,
    /// Over TLS: what the first completed handshake negotiated.
    pub negotiated: Option<String>,
    /// Per established connection: bytes of the two-way welcome already
    /// read with the response head.
    welcome_read: Vec<u8>,
    /// Failure category → (count, first example).
    pub failures: BTreeMap<String, (u64, String)>,
    pub bytes_after_head: u64,
    /// Connections whose 101 agreed to permessage-deflate.
    pub deflate_agreed: u64,
    first_start: Option<Instant>,
    last_done: Option<Instant>,
    /// No new connection is started after this (EMFILE and the like).
    stop_starting: bool,
}

impl<'a> Connector<'a> {
    fn new(args: &'a IdleArgs, target: SocketAddr, tls: Option<ClientTls>) -> Result<Self, String> {
        Ok(Connector {
            args,
            target,
            host: target.to_string(),
            ep: Epoll::new().map_err(|e| format!("epoll_create1: {e}"))?,
            inflight: HashMap::new(),
            started: VecDeque::new(),
            next: 0,
            established: Vec::with_capacity(args.connections as usize),
            established_tls: Vec::new(),
            tls,
            negotiated: None,
            welcome_read: Vec::with_capacity(args.connections as usize),
            failures: BTreeMap::new(),
            bytes_after_head: 0,
            deflate_agreed: 0,
            first_start: None,
            last_done: None,
            stop_starting: false,
        })
    }

    fn fail(&mut self, category: String, example: String) {
        let entry = self.failures.entry(category).or_insert((0, example));
        entry.0 += 1;
    }

    fn failed(&self) -> u64 {
        self.failures.values().map(|(n, _)| n).sum()
    }

    fn not_attempted(&self) -> u64 {
        self.args.connections - self.next
    }

    /// From the first connect to the last completed handshake.
    fn connect_time(&self) -> Duration {
        match (self.first_start, self.last_done) {
            (Some(a), Some(b)) => b - a,
            _ => Duration::ZERO,
        }
    }

    fn source(&self, i: u64) -> IpAddr {
        self.args.sources[(i % self.args.sources.len() as u64) as usize]
    }

    /// Starts connection `i`.
    fn start(&mut self, i: u64, now: Instant) {
        let fd = match sys::start_connect(self.source(i), self.target) {
            Ok(fd) => fd,
            Err(e) => {
                let category = match e.raw_os_error() {
                    Some(libc::EMFILE) | Some(libc::ENFILE) => {
                        self.stop_starting = true;
                        format!("socket: {e}: out of descriptors")
                    }
                    Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => {
                        format!("connect: {e}: local ports exhausted, add --sources")
                    }
                    _ => format!("connect: {e}"),
                };
                let example = format!("connection {i} from {}", self.source(i));
                self.fail(category, example);
                return;
            }
        };
        if let Err(e) = self
            .ep
            .add(fd, (libc::EPOLLOUT | libc::EPOLLRDHUP) as u32, i)
        {
            sys::close(fd);
            self.fail(format!("epoll_ctl: {e}"), format!("connection {i}"));
            return;
        }
        let mut channel = format!("idle-{}", i % self.args.channels);
        if let Some(secret) = &self.args.token_hs256 {
            // The token rides in the query after the channel.
            channel.push_str("&token=");
            channel.push_str(&idle_token(secret, i));
        }
        let buf = http::subscribe_request_with(
            self.args.transport,
            &self.host,
            &channel,
            self.args.subprotocol.as_deref(),
            self.args.deflate,
        );
        self.inflight
            .insert(i, Handshake::new(fd, buf, self.tls.as_ref()));
        self.started.push_back((now, i));
    }

    /// The connect phase: returns when every connection is open or failed,
    /// or at --connect-timeout-s.
    fn run(&mut self) {
        let args = self.args;
        let start = Instant::now();
        self.first_start = Some(start);
        let deadline = start + Duration::from_secs_f64(args.connect_timeout_s);
        let handshake_timeout = Duration::from_secs_f64(args.handshake_timeout_s);
        let mut events: Vec<libc::epoll_event> = Vec::with_capacity(1024);
        let mut last_progress = start;
        let mut open_at_last_progress = 0u64;
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            while !self.stop_starting
                && self.next < args.connections
                && (self.inflight.len() as u64) < args.in_flight
            {
                self.start(self.next, now);
                self.next += 1;
            }
            if self.inflight.is_empty() && (self.next == args.connections || self.stop_starting) {
                break;
            }
            // Handshakes past their time, oldest first.
            while let Some(&(t, token)) = self.started.front() {
                if now.duration_since(t) < handshake_timeout {
                    break;
                }
                self.started.pop_front();
                if let Some(h) = self.inflight.remove(&token) {
                    sys::close(h.fd);
                    self.fail(
                        format!(
                            "no answer within --handshake-timeout-s {} s ({})",
                            args.handshake_timeout_s,
                            h.step.name()
                        ),
                        format!(
                            "connection {token}: {} bytes of response",
                            if h.step == Step::Reading {
                                h.buf.len()
                            } else {
                                0
                            }
                        ),
                    );
                }
            }
            let wait_ms = deadline
                .saturating_duration_since(now)
                .as_millis()
                .clamp(1, 100) as i32;
            if let Err(e) = self.ep.wait(&mut events, wait_ms) {
                self.fail(format!("epoll_wait: {e}"), String::new());
                break;
            }
            for ev in events.iter() {
                let (token, flags) = (ev.u64, ev.events);
                let Some(h) = self.inflight.get_mut(&token) else {
                    continue;
                };
                let progress = advance(
                    h,
                    flags,
                    &self.ep,
                    token,
                    args.transport,
                    args.subprotocol.as_deref(),
                );
                match progress {
                    Progress::Pending => {}
                    Progress::Done(extra) => {
                        let mut h = self.inflight.remove(&token).expect("present");
                        let head = &h.buf[..h.buf.len() - extra];
                        self.deflate_agreed += u64::from(http::deflate_agreed(head));
                        if let Some(conn) = h.take_tls() {
                            if self.negotiated.is_none() {
                                self.negotiated = Some(tls::negotiated(&conn));
                            }
                            self.established_tls.push(*conn);
                        }
                        // Out of the epoll set: an idle connection costs the
                        // client nothing but its socket.
                        let _ = self.ep.delete(h.fd);
                        self.established.push(h.fd);
                        self.welcome_read.push(extra.min(WELCOME_BYTES) as u8);
                        self.bytes_after_head += extra as u64;
                        self.last_done = Some(Instant::now());
                    }
                    Progress::Failed(category, example) => {
                        let h = self.inflight.remove(&token).expect("present");
                        sys::close(h.fd);
                        self.fail(category, format!("connection {token}: {example}"));
                    }
                }
            }
            let now = Instant::now();
            if now.duration_since(last_progress) >= Duration::from_secs(1) {
                let open = self.established.len() as u64;
                let since = now.duration_since(last_progress).as_secs_f64();
                eprintln!(
                    "bench: idle {}: {open}/{} open, {} failed, {} in flight, {:.0}/s now, {:.0}/s average",
                    args.transport.name(),
                    args.connections,
                    self.failed(),
                    self.inflight.len(),
                    (open - open_at_last_progress) as f64 / since,
                    open as f64 / now.duration_since(start).as_secs_f64()
                );
                last_progress = now;
                open_at_last_progress = open;
            }
        }
        // Whatever is still under way at the deadline failed.
        let left: Vec<(u64, Handshake)> = self.inflight.drain().collect();
        for (token, h) in left {
            sys::close(h.fd);
            self.fail(
                format!(
                    "unfinished at --connect-timeout-s {} s ({})",
                    args.connect_timeout_s,
                    h.step.name()
                ),
                format!("connection {token}"),
            );
        }
        self.started.clear();
        if self.last_done.is_none() {
            self.last_done = Some(Instant::now());
        }
    }

    /// After the hold: how many open connections the server closed or
    /// reset, how many have bytes waiting (and how many bytes, peeked, up to
    /// 4 KiB each). Over SSE, bytes that are only comments (a greeting like
    /// nchan's `: hi`, a keep-alive) are counted apart: they are no message.
    fn check_alive(&mut self) -> Hold {
        if self.tls.is_some() {
            return self.check_alive_tls();
        }
        let mut hold = Hold::default();
        let mut buf = [0u8; 4096];
        for (k, &fd) in self.established.iter().enumerate() {
            // A two-way client's welcome is expected: what is left of it
            // after the response head is taken off the socket first.
            if self.args.subprotocol.is_some() {
                let left = WELCOME_BYTES - usize::from(self.welcome_read[k]);
                if left > 0 {
                    let _ = sys::recv(fd, &mut buf[..left], libc::MSG_DONTWAIT);
                }
            }
            match sys::recv(fd, &mut buf, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
                Ok(0) => hold.closed += 1,
                Ok(n) => {
                    if self.args.transport == Transport::Sse && only_sse_comments(&buf[..n]) {
                        hold.sse_comments_only += 1;
                    } else {
                        hold.with_data += 1;
                    }
                    hold.bytes += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => hold.closed += 1,
            }
        }
        hold
    }

    /// [`Connector::check_alive`] over TLS: what waits is read (up to 4
    /// KiB of plaintext each, past a two-way client's welcome) and
    /// decrypted; TLS' own messages (session tickets) are no data.
    fn check_alive_tls(&mut self) -> Hold {
        let mut hold = Hold::default();
        for (k, conn) in self.established_tls.iter_mut().enumerate() {
            let fd = self.established[k];
            let welcome = if self.args.subprotocol.is_some() {
                WELCOME_BYTES - usize::from(self.welcome_read[k])
            } else {
                0
            };
            let (plain, closed) = tls::drain(conn, fd, welcome + 4096);
            let rest = &plain[welcome.min(plain.len())..];
            if closed {
                hold.closed += 1;
            } else if !rest.is_empty() {
                if self.args.transport == Transport::Sse && only_sse_comments(rest) {
                    hold.sse_comments_only += 1;
                } else {
                    hold.with_data += 1;
                }
            }
            hold.bytes += rest.len() as u64;
        }
        hold
    }

    /// Resets every open connection (see `sys::close_abortive`).
    fn close_all(&mut self) {
        for fd in self.established.drain(..) {
            sys::close_abortive(fd);
        }
        self.established_tls.clear();
    }
}

impl Drop for Connector<'_> {
    fn drop(&mut self) {
        self.close_all();
        for (_, h) in self.inflight.drain() {
            sys::close(h.fd);
        }
    }
}

/// The gateway's welcome to a `gateway.v1` client: a text frame of
/// `{"type":"welcome","address":"<52 hex digits>"}` and `\n` (84 bytes).
const WELCOME_BYTES: usize = 2 + 84;

/// Connection `i`'s token: HS256 under kid `idle`, user `idle-{i}`,
/// reading and sending on `idle-*`, valid for an hour.
fn idle_token(secret: &str, i: u64) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let claims = serde_json::json!({
        "sub": format!("idle-{i}"), "exp": exp, "channels": ["idle-*"], "send": ["idle-*"],
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("idle".into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("an HS256 token")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Scenario};
    use clap::Parser;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn args(target: SocketAddr, extra: &[&str]) -> IdleArgs {
        let target = target.to_string();
        let mut all = vec![
            "bench",
            "idle",
            "--pid",
            "1",
            "--target",
            &target,
            "--in-flight",
            "8",
        ];
        all.extend_from_slice(extra);
        match Cli::try_parse_from(all).unwrap().scenario {
            Scenario::Idle(a) => a,
            other => panic!("{other:?}"),
        }
    }

    /// Accepts `n` connections, reads each request head and answers it with
    /// `answer(index, head)` (`None`: close without a word); keeps the
    /// sockets open until the returned handle is joined after `done`.
    fn fake_server(
        n: usize,
        answer: fn(usize, &str) -> Option<String>,
    ) -> (
        SocketAddr,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let mut keep = Vec::new();
            let mut heads = Vec::new();
            for i in 0..n {
                let (mut s, _) = listener.accept().unwrap();
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while http::head_len(&head).is_none() {
                    let k = s.read(&mut b).unwrap();
                    assert!(k > 0);
                    head.extend_from_slice(&b[..k]);
                }
                let head = String::from_utf8(head).unwrap();
                if let Some(resp) = answer(i, &head) {
                    s.write_all(resp.as_bytes()).unwrap();
                    keep.push(s);
                }
                heads.push(head);
            }
            let _ = done_rx.recv();
            heads
        });
        (addr, done_tx, handle)
    }

    const WS_101: &str =
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    #[test]
    fn opens_every_connection_and_subscribes_round_robin() {
        let (addr, done, server) = fake_server(50, |_, _| Some(WS_101.to_string()));
        let a = args(addr, &["--connections", "50", "--channels", "7"]);
        let mut c = Connector::new(&a, addr, None).unwrap();
        c.run();
        assert_eq!(c.established.len(), 50);
        assert!(c.failures.is_empty(), "{:?}", c.failures);
        assert_eq!(c.not_attempted(), 0);
        assert_eq!(c.check_alive(), Hold::default());
        c.close_all();
        done.send(()).unwrap();
        let heads = server.join().unwrap();
        // The server saw them in connect order (at most 8 in flight, but
        // accepted in order); every channel idle-0..6 is used.
        for ch in 0..7 {
            let line = format!("GET /ws?channel=idle-{ch} HTTP/1.1\r\n");
            assert!(heads.iter().any(|h| h.starts_with(&line)), "no {line:?}");
        }
        assert!(heads.iter().all(|h| h.contains("Sec-WebSocket-Key: ")));
    }

    #[test]
    fn counts_refusals_and_closes_by_reason() {
        let (addr, done, server) = fake_server(30, |i, _| match i % 3 {
            0 => Some(WS_101.to_string()),
            1 => Some(
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"
                    .into(),
            ),
            _ => None,
        });
        let a = args(addr, &["--connections", "30"]);
        let mut c = Connector::new(&a, addr, None).unwrap();
        c.run();
        assert_eq!(c.established.len(), 10);
        let failures: Vec<(&str, u64)> = c
            .failures
            .iter()
            .map(|(k, (n, _))| (k.as_str(), *n))
            .collect();
        assert_eq!(
            failures,
            vec![
                ("closed before a complete response head", 10),
                (
                    "status 503 (want 101): \"HTTP/1.1 503 Service Unavailable\"",
                    10
                ),
            ]
        );
        done.send(()).unwrap();
        server.join().unwrap();
        // The server is gone: every open connection now reads as closed.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.check_alive().closed, 10);
    }

    #[test]
    fn sse_and_a_refused_port() {
        let (addr, done, server) = fake_server(5, |_, head| {
            assert!(head.starts_with("GET /events?channel=idle-"));
            assert!(head.contains("\r\nAccept: text/event-stream\r\n"));
            Some("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n: hi\n\n".into())
        });
        let a = args(addr, &["--connections", "5", "--transport", "sse"]);
        let mut c = Connector::new(&a, addr, None).unwrap();
        c.run();
        assert_eq!(c.established.len(), 5);
        // The comment arrives with the head (counted then) or after it
        // (peeked at the end of the hold): 6 bytes per connection either way.
        std::thread::sleep(Duration::from_millis(50));
        let hold = c.check_alive();
        assert_eq!(hold.closed, 0);
        assert_eq!(hold.with_data, 0, "a comment is not data");
        assert_eq!(c.bytes_after_head + hold.bytes, 5 * 6);
        done.send(()).unwrap();
        server.join().unwrap();

        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let a = args(closed, &["--connections", "3"]);
        let mut c = Connector::new(&a, closed, None).unwrap();
        c.run();
        assert!(c.established.is_empty());
        let (reason, (n, _)) = c.failures.iter().next().unwrap();
        assert!(
            reason.starts_with("connect: Connection refused"),
            "{reason}"
        );
        assert_eq!(*n, 3);
    }

    #[test]
    fn over_tls_what_waits_is_decrypted_and_judged() {
        let setup = crate::tls::TlsSetup::generate().unwrap();
        let (addr, done, server) = setup.serve(5, |_, head| {
            assert!(head.starts_with("GET /events?channel=idle-"), "{head}");
            Some(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n: hi\n\n".to_vec())
        });
        let a = args(addr, &["--connections", "5", "--transport", "sse"]);
        let mut c = Connector::new(&a, addr, Some(setup.client.clone())).unwrap();
        c.run();
        assert!(c.failures.is_empty(), "{:?}", c.failures);
        assert_eq!(c.established.len(), 5);
        assert!(c.negotiated.as_deref().unwrap().starts_with("TLS 1.3 "));
        std::thread::sleep(Duration::from_millis(50));
        // The session tickets that follow the handshake are no data; the
        // greeting is a comment, whether it came with the head or after.
        let hold = c.check_alive();
        assert_eq!((hold.closed, hold.with_data), (0, 0));
        assert_eq!(c.bytes_after_head + hold.bytes, 5 * 6);
        done.send(()).unwrap();
        server.join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.check_alive().closed, 5);
        c.close_all();
    }

    #[test]
    fn sse_comments_are_not_messages() {
        assert!(only_sse_comments(b": hi\n\n"));
        assert!(only_sse_comments(b""));
        // Bun's chunked stream: size line, comment, CRLF.
        assert!(only_sse_comments(b"6\r\n: hi\n\n\r\n"));
        assert!(only_sse_comments(b":\r\n\r\n: keep-alive\n\n"));
        assert!(!only_sse_comments(b"data: x\n\n"));
        assert!(!only_sse_comments(b": hi\n\nid: 1\ndata: x\n\n"));
        assert!(!only_sse_comments(b"1e\r\nevent: m\n"));
    }
}
