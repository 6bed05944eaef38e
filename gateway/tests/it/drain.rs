//! Graceful drain on SIGTERM / SIGINT: the listener stops (another gateway
//! on the same port gets the new connections), `/readyz` says `draining`,
//! the open connections are told to go spread over `drain_window_ms`
//! (WebSocket close 1012, SSE `retry:` then the end of the stream, held
//! long-polls answered empty with their cursor), and the process exits 0
//! once they are gone. A second signal exits at once.
//!
//! The two-gateway test does not depend on `net.ipv4.tcp_migrate_req`: its
//! clients are all accepted before the drain starts, and they reconnect only
//! after the draining gateway closed them, which is after it shut its
//! listeners; so the kernel never has a connection queued on a closing
//! listener to hand over (or, without the sysctl, reset).

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::Message;

use crate::common::*;

/// A short window, so the test is quick; the process exits at most
/// `DRAIN_MARGIN` after it.
const DRAIN_WINDOW: Duration = Duration::from_millis(2_000);
const DRAIN_MARGIN: Duration = Duration::from_secs(5);
/// Safety net on top of the window and the margin.
const EXIT_SLACK: Duration = Duration::from_secs(8);

/// Clients on the shared port, alternately WebSocket and SSE.
const CLIENTS: usize = 40;
const CHANNEL: &str = "drain";
/// The publisher numbers its messages BASE_ID + 1, BASE_ID + 2, ...
const BASE_ID: u64 = 5_000_000;
/// Publishing pace: continuous traffic while the drain happens.
const PUBLISH_EVERY: Duration = Duration::from_millis(5);
/// Safety net for the waits on clients.
const CLIENT_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    WebSocket,
    Sse,
}

/// How one connection of a client ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// It received the publisher's last message.
    Done,
    /// WebSocket close frame with this code (None: no code).
    Closed(Option<u16>),
    /// The SSE stream ended; `retry` is the `retry:` sent after its first.
    SseEnded { retry: Option<u32> },
    /// The connection failed without a word.
    Failed(String),
}

#[derive(Debug)]
struct Connection {
    /// The gateway process that accepted it.
    pid: Option<u32>,
    end: End,
}

#[derive(Debug)]
struct ClientLog {
    kind: Kind,
    ids: Vec<u64>,
    connections: Vec<Connection>,
}

/// What the client threads tell the test as they go.
enum Event {
    /// Client `client` opened its connection number `connection` on `pid`.
    Landed {
        client: usize,
        connection: usize,
        pid: Option<u32>,
    },
    /// ... and received a first message on it.
    Received { client: usize, connection: usize },
}

/// What the test knows of its clients' progress, from their events.
struct Progress {
    events: mpsc::Receiver<Event>,
    /// (client, connection) -> the gateway that accepted it.
    landed: HashMap<(usize, usize), Option<u32>>,
    /// (client, connection) that received a message.
    received: HashSet<(usize, usize)>,
}

impl Progress {
    /// Takes events until `done` holds (at most `CLIENT_WAIT`).
    fn wait(&mut self, what: &str, done: impl Fn(&Progress) -> bool) {
        let deadline = Instant::now() + CLIENT_WAIT;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Landed {
                    client,
                    connection,
                    pid,
                }) => {
                    self.landed.insert((client, connection), pid);
                }
                Ok(Event::Received { client, connection }) => {
                    self.received.insert((client, connection));
                }
                Err(_) => panic!("clients: {what}: not within {CLIENT_WAIT:?}"),
            }
        }
    }
}

/// A client that reconnects whenever the gateway closes it, resuming from
/// the last id it got (`since=` for WebSocket, `Last-Event-ID` for SSE),
/// until it receives the message `end`.
fn client(
    client: usize,
    kind: Kind,
    addr: SocketAddr,
    pids: Vec<u32>,
    events: mpsc::Sender<Event>,
) -> ClientLog {
    let mut log = ClientLog {
        kind,
        ids: Vec::new(),
        connections: Vec::new(),
    };
    loop {
        let connection = log.connections.len();
        let last = log.ids.last().copied();
        let mut received_here = false;
        let mut on_delivery = |d: Delivery, ids: &mut Vec<u64>| -> bool {
            assert!(!d.gap, "client {client}: a gap notice: {d:?}");
            assert_eq!(d.channel, CHANNEL, "client {client}: {d:?}");
            let id = d.id.unwrap();
            ids.push(id);
            if !received_here {
                received_here = true;
                let _ = events.send(Event::Received { client, connection });
            }
            d.text() == "end"
        };
        let (pid, end) = match kind {
            Kind::WebSocket => {
                let path = match last {
                    Some(id) => format!("/ws?channel={CHANNEL}&since={id}"),
                    None => format!("/ws?channel={CHANNEL}"),
                };
                let mut ws = WsClient::connect(addr, &path);
                let pid = owner_pid(ws.ws.get_ref(), &pids);
                let _ = events.send(Event::Landed {
                    client,
                    connection,
                    pid,
                });
                let end = loop {
                    match ws.ws.read() {
                        Ok(Message::Text(t)) => {
                            let d = parse_ws_payload(t.as_bytes(), false, &path);
                            if on_delivery(d, &mut log.ids) {
                                break End::Done;
                            }
                        }
                        Ok(Message::Close(frame)) => {
                            // Answer it, as a browser would, then reconnect.
                            let _ = ws.ws.flush();
                            break End::Closed(frame.map(|f| u16::from(f.code)));
                        }
                        Ok(Message::Binary(b)) => panic!("client {client}: binary frame {b:?}"),
                        Ok(_) => {}
                        Err(tungstenite::Error::Io(e)) if is_read_timeout(&e) => {
                            panic!("client {client}: nothing received within {IO_TIMEOUT:?}")
                        }
                        Err(e) => break End::Failed(e.to_string()),
                    }
                };
                (pid, end)
            }
            Kind::Sse => {
                let last_str = last.map(|id| id.to_string());
                let path = format!("/events?channel={CHANNEL}");
                let mut sse = SseClient::connect(addr, &path, last_str.as_deref());
                let pid = owner_pid(sse.stream(), &pids);
                let _ = events.send(Event::Landed {
                    client,
                    connection,
                    pid,
                });
                let end = loop {
                    match sse.next_event_or_end() {
                        Some(ev) => {
                            let d = sse_event_to_delivery(&ev, &path);
                            if on_delivery(d, &mut log.ids) {
                                break End::Done;
                            }
                        }
                        None => {
                            break End::SseEnded {
                                retry: sse.retries.get(1).copied(),
                            }
                        }
                    }
                };
                (pid, end)
            }
        };
        let done = end == End::Done;
        log.connections.push(Connection { pid, end });
        if done {
            return log;
        }
    }
}

#[test]
fn sigterm_drains_one_of_two_gateways_on_a_port_and_its_clients_resume_on_the_other() {
    let publisher = Publisher::bind();
    let window_ms = DRAIN_WINDOW.as_millis().to_string();
    let common_args = [
        "--zmq-bind",
        "",
        "--zmq-connect",
        publisher.endpoint.as_str(),
        "--drain-window-ms",
        window_ms.as_str(),
        // Ample history, so that a resume never depends on how fast the
        // client came back.
        "--history-messages",
        "5000",
    ];
    let mut args_a = common_args.to_vec();
    args_a.extend(["--listen", "127.0.0.1:0"]);
    let mut gw_a = Gateway::start(&args_a);
    // B shares A's port: both set SO_REUSEPORT, the kernel spreads new
    // connections over the listeners of both processes.
    let shared = gw_a.listen.to_string();
    let mut args_b = common_args.to_vec();
    args_b.extend(["--listen", shared.as_str()]);
    let gw_b = Gateway::start(&args_b);
    let addr = gw_a.listen;
    assert_eq!(gw_b.listen, addr);
    let (pid_a, pid_b) = (gw_a.pid(), gw_b.pid());
    let pids = vec![pid_a, pid_b];

    let probe_path = format!("/ws?channel={PROBE_CHANNEL}");
    let probes = vec![
        ws_on(addr, &probe_path, pid_a, &pids),
        ws_on(addr, &probe_path, pid_b, &pids),
    ];
    drop(wait_for_subscription_of(&publisher, probes));

    // The clients, each on whichever gateway the kernel picks.
    let (events_tx, events) = mpsc::channel::<Event>();
    let mut handles = Vec::new();
    for c in 0..CLIENTS {
        let kind = if c % 2 == 0 {
            Kind::WebSocket
        } else {
            Kind::Sse
        };
        let (tx, pids) = (events_tx.clone(), pids.clone());
        handles.push(thread::spawn(move || client(c, kind, addr, pids, tx)));
    }
    drop(events_tx);
    let mut progress = Progress {
        events,
        landed: HashMap::new(),
        received: HashSet::new(),
    };
    progress.wait("all connected", |p| {
        (0..CLIENTS).all(|c| p.landed.contains_key(&(c, 0)))
    });
    let first_pid: HashMap<usize, Option<u32>> = (0..CLIENTS)
        .map(|c| (c, progress.landed[&(c, 0)]))
        .collect();
    let on_a: Vec<usize> = (0..CLIENTS)
        .filter(|c| first_pid[c] == Some(pid_a))
        .collect();
    let on_b: Vec<usize> = (0..CLIENTS)
        .filter(|c| first_pid[c] == Some(pid_b))
        .collect();
    assert_eq!(
        on_a.len() + on_b.len(),
        CLIENTS,
        "every client is on A or B: {first_pid:?}"
    );
    assert!(
        !on_a.is_empty() && !on_b.is_empty(),
        "the kernel put every client on one gateway: A {on_a:?}, B {on_b:?}"
    );
    // Each gateway's own /healthz counts them.
    for (name, pid, clients) in [("A", pid_a, &on_a), ("B", pid_b, &on_b)] {
        let health = healthz_of(addr, pid, &pids);
        let total: u64 = health["connections_per_core"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert!(
            total as usize > clients.len(),
            "gateway {name}: /healthz counts {total} connections for {} clients and itself: {health}",
            clients.len()
        );
    }

    // The publisher sends, with its own ids, until told to stop; then it
    // sends `end`, the last message.
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut k = 0;
            loop {
                k += 1;
                if stop.load(Ordering::Acquire) {
                    publisher.publish_with_id(CHANNEL, b"end", BASE_ID + k);
                    return BASE_ID + k;
                }
                publisher.publish_with_id(CHANNEL, format!("m{k}").as_bytes(), BASE_ID + k);
                thread::sleep(PUBLISH_EVERY);
            }
        })
    };
    progress.wait("a first message everywhere", |p| {
        (0..CLIENTS).all(|c| p.received.contains(&(c, 0)))
    });

    // Drain A.
    let signalled = Instant::now();
    gw_a.signal(libc::SIGTERM);
    let status = gw_a
        .wait_exit(DRAIN_WINDOW + DRAIN_MARGIN + EXIT_SLACK)
        .expect("gateway A still running well after its drain window and margin");
    let drained_in = signalled.elapsed();
    assert!(status.success(), "gateway A exited with {status}");

    // A's clients came back (on B) and receive there.
    progress.wait("A's clients receiving again", |p| {
        on_a.iter()
            .all(|&c| p.landed.contains_key(&(c, 1)) && p.received.contains(&(c, 1)))
    });
    stop.store(true, Ordering::Release);
    let last_id = publishing.join().expect("publisher thread");
    let logs: Vec<ClientLog> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread panicked"))
        .collect();

    for (c, log) in logs.iter().enumerate() {
        let ctx = format!("client {c} ({:?}, first on {:?})", log.kind, first_pid[&c]);
        // Every message from its first to the last, once each, in order.
        let first = log.ids[0];
        let want: Vec<u64> = (first..=last_id).collect();
        if log.ids != want {
            let missing: Vec<u64> = want
                .iter()
                .filter(|id| !log.ids.contains(id))
                .copied()
                .collect();
            panic!(
                "{ctx}: got {} messages from {first} to {last_id}, want {}; missing {missing:?}; \
                 connections {:?}; ids {:?}",
                log.ids.len(),
                want.len(),
                log.connections,
                log.ids
            );
        }
        let ended: Vec<&End> = log.connections.iter().map(|k| &k.end).collect();
        if on_b.contains(&c) {
            assert_eq!(ended, [&End::Done], "{ctx}: B served it throughout");
        } else {
            assert_eq!(log.connections.len(), 2, "{ctx}: {:?}", log.connections);
            assert_eq!(log.connections[1].pid, Some(pid_b), "{ctx}: came back on B");
            match (&log.kind, &log.connections[0].end) {
                (Kind::WebSocket, End::Closed(Some(1012))) => {}
                (Kind::Sse, End::SseEnded { retry: Some(ms) }) => {
                    assert!((1_000..=5_000).contains(ms), "{ctx}: retry {ms}")
                }
                (_, other) => panic!("{ctx}: A ended it with {other:?}, not the drain's word"),
            }
        }
    }

    let log_a = gw_a.log();
    assert!(
        log_a.contains("draining") && log_a.contains("connections_left"),
        "A logs a drain timeline:\n{log_a}"
    );
    assert!(
        log_a.contains("drained: no connection left"),
        "A exits because its connections are gone (after {drained_in:?}):\n{log_a}"
    );
    eprintln!(
        "drain: {} of {CLIENTS} clients on A, exited 0 after {drained_in:?}; {} messages",
        on_a.len(),
        last_id - BASE_ID
    );
}

/// Streams opened before the kept-alive connections of the single-gateway
/// tests: with a 60 s window the drain asks one connection a second to go,
/// the oldest first, so those are asked only after about this many seconds.
const STREAMS: usize = 10;

/// Asks `/readyz` on a kept-alive connection until it says the drain has
/// started (the signal is handled by another thread of the gateway: a
/// moment after it is sent), then returns that answer.
fn readyz_until_draining(conn: &mut HttpConn) -> HttpResponse {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let resp = conn.get("/readyz", &[]);
        if resp.status == 503 {
            return resp;
        }
        assert_eq!(resp.status, 200, "/readyz: {}", resp.describe());
        assert!(
            Instant::now() < deadline,
            "the drain did not start within {IO_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

fn assert_closes(resp: &HttpResponse, what: &str) {
    assert!(
        resp.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "{what} while draining closes its connection: {}",
        resp.describe()
    );
}

#[test]
fn readyz_is_ready_then_draining_while_healthz_stays_ok_and_new_connections_go_elsewhere() {
    // One core and a long window: the drain asks one connection a second to
    // go, in the order they came (the STREAMS first), so the kept-alive
    // connections opened last stay open while the test talks over them.
    let mut gw = Gateway::start(&["--cores", "1", "--drain-window-ms", "60000"]);
    let streams: Vec<WsClient> = (0..STREAMS).map(|_| gw.ws("/ws?channel=x")).collect();
    let mut ready_conn = gw.http();
    let resp = ready_conn.get("/readyz", &[]);
    assert_eq!(resp.status, 200, "{}", resp.describe());
    assert_eq!(
        String::from_utf8_lossy(&resp.body),
        "{\"status\":\"ready\"}\n"
    );
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let mut health_conn = gw.http();
    assert_eq!(health_conn.get("/healthz", &[]).status, 200);

    gw.signal(libc::SIGTERM);
    let resp = readyz_until_draining(&mut ready_conn);
    assert_eq!(
        String::from_utf8_lossy(&resp.body),
        "{\"status\":\"draining\"}\n",
        "{}",
        resp.describe()
    );
    assert_closes(&resp, "/readyz");
    ready_conn.expect_eof("/readyz while draining");

    // Alive all the same.
    let resp = health_conn.get("/healthz", &[]);
    assert_eq!(resp.status, 200, "{}", resp.describe());
    let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(v["status"], "ok", "{v}");
    assert_closes(&resp, "/healthz");
    health_conn.expect_eof("/healthz while draining");

    // The listener is shut: with no other process on the port, a new
    // connection is refused.
    assert!(
        TcpStream::connect(gw.listen).is_err(),
        "a draining gateway accepted a new connection"
    );

    // Once its last connections are gone it exits, long before the window.
    drop(streams);
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .expect("gateway still running after its last connection closed");
    assert!(status.success(), "exit status {status}");
    let log = gw.log();
    assert!(log.contains("drained: no connection left"), "{log}");
}

#[test]
fn the_drain_tells_each_transport_to_go_then_the_process_exits_0() {
    let mut gw = Gateway::start(&["--cores", "1", "--drain-window-ms", "1000"]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    let since = wait_for_subscription(&publisher, &[&gw]).last_id;

    let mut ws = gw.ws("/ws?channel=news");
    let mut sse = gw.sse("/events?channel=news", None);
    // A long-poll with nothing to say: held (or, should the drain come
    // first, answered at once the same way).
    let mut lp = gw.http();
    lp.set_read_timeout(LONGPOLL_IO_TIMEOUT);
    lp.send(
        format!("GET /events?channel=news&since={since} HTTP/1.1\r\nHost: gateway\r\n\r\n")
            .as_bytes(),
    );
    // A connection between requests.
    let mut idle = gw.http();
    assert_eq!(idle.get("/healthz", &[]).status, 200);

    gw.signal(libc::SIGTERM);

    // WebSocket: close 1012 (service restart).
    let code = loop {
        match ws.next_message() {
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("WebSocket: {other:?} instead of a close frame"),
        }
    };
    assert_eq!(code, Some(1012), "WebSocket close code");
    // SSE: a `retry:` with a jittered delay, then the end of the stream.
    assert!(
        sse.next_event_or_end().is_none(),
        "SSE: an event instead of the end"
    );
    assert_eq!(
        sse.retries.len(),
        2,
        "SSE: its opening retry and the drain's"
    );
    assert!(
        (1_000..=5_000).contains(&sse.retries[1]),
        "{:?}",
        sse.retries
    );
    // Long-poll: answered with its cursor and no message, and closed.
    let resp = lp.read_response();
    assert_eq!(resp.status, 200, "{}", resp.describe());
    let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let r = parse_longpoll_body(&body, "held long-poll");
    assert!(r.messages.is_empty() && r.gaps.is_empty(), "{body}");
    assert_eq!(r.cursor, since, "{body}");
    assert_closes(&resp, "the long-poll answer");
    lp.expect_eof("long-poll while draining");
    // Between requests: closed.
    idle.expect_eof("idle keep-alive connection while draining");

    drop(ws);
    let status = gw
        .wait_exit(DRAIN_WINDOW + DRAIN_MARGIN + EXIT_SLACK)
        .expect("gateway still running after its drain window and margin");
    assert!(status.success(), "exit status {status}");
    let log = gw.log();
    assert!(log.contains("SIGTERM"), "{log}");
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once() {
    let mut gw = Gateway::start(&["--cores", "1", "--drain-window-ms", "60000"]);
    let streams: Vec<WsClient> = (0..STREAMS).map(|_| gw.ws("/ws?channel=x")).collect();
    let mut ready_conn = gw.http();
    assert_eq!(ready_conn.get("/readyz", &[]).status, 200);

    gw.signal(libc::SIGINT);
    readyz_until_draining(&mut ready_conn);
    gw.signal(libc::SIGTERM);
    // Far sooner than the 60 s window: it does not wait for its streams.
    let status = gw
        .wait_exit(Duration::from_secs(15))
        .expect("gateway still running after a second signal");
    assert!(status.success(), "exit status {status}");
    let log = gw.log();
    assert!(log.contains("SIGINT"), "{log}");
    assert!(log.contains("second signal during the drain"), "{log}");
    drop(streams);
}

#[test]
fn with_a_drain_delay_readyz_says_draining_first_while_new_clients_are_still_served() {
    // The delay is the balancer's time to see /readyz fail; the test's
    // steps between the 503 and the new client take far less.
    let mut gw = Gateway::start(&[
        "--cores",
        "1",
        "--drain-window-ms",
        "1000",
        "--drain-delay-ms",
        "3000",
    ]);
    let publisher = Publisher::connect(gw.zmq_endpoint());
    wait_for_subscription(&publisher, &[&gw]);
    let mut ready_conn = gw.http();
    gw.signal(libc::SIGTERM);
    let resp = readyz_until_draining(&mut ready_conn);
    assert_eq!(
        String::from_utf8_lossy(&resp.body),
        "{\"status\":\"draining\"}\n"
    );
    // Not draining yet: a client the balancer still sends here is served.
    let mut ws = gw.ws("/ws?channel=late");
    publisher.publish("late", b"still served");
    assert_eq!(ws.next_delivery().text(), "still served");
    // Then the drain itself: asked to go, and the process exits 0.
    let code = loop {
        match ws.next_message() {
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("WebSocket: {other:?} instead of a close frame"),
        }
    };
    assert_eq!(code, Some(1012), "WebSocket close code");
    let status = gw
        .wait_exit(Duration::from_secs(3) + DRAIN_WINDOW + DRAIN_MARGIN + EXIT_SLACK)
        .expect("gateway still running after its delay, drain window and margin");
    assert!(status.success(), "exit status {status}");
    let log = gw.log();
    assert!(log.contains("leaving: /readyz answers 503"), "{log}");
}
