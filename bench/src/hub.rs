//! roundtrip's hub: what a backend's hub worker does under the two-way
//! contract, with nothing of its own in the way. Each hub thread connects
//! a PULL socket to the server's upstream endpoint (`--upstream-bind`, a
//! PUSH) and a publisher to the server's SUB endpoint (`--zmq-bind`), and
//! for every `[b"message", address, channel, meta, payload]` it receives
//! publishes `[b"!" + address, payload]` at once: the reply goes back to
//! the one connection that sent the message, payload untouched (it carries
//! the client's send time and sequence number). Other kinds (presence) are
//! counted and ignored, as a hub must.
//!
//! The publisher is an XPUB rather than a PUB: the subscriptions the
//! server's SUB sends when the connection is made arrive on it, which is
//! the signal that the path back is up (ZeroMQ's slow joiner: a PUB drops
//! what it sends before then). The clients' probes then check the whole
//! path end to end. A hub thread sleeps in zmq_poll on its two sockets and
//! an inproc PAIR that says stop: no polling loop, no timeout.
//!
//! Several hub threads (`--hub-threads`) each get their share of the
//! server's messages (PUSH spreads them round robin over the connected
//! PULLs); each thread's CPU time is read from /proc, so the report can say
//! whether the hub, rather than the server, was the limit.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::procfs;

/// Hex digits of a connection's address (the gateway's `ADDRESS_BYTES`).
pub const ADDRESS_BYTES: usize = 52;
/// Frames of an upstream message: kind, address, channel, meta, payload.
const UPSTREAM_FRAMES: usize = 5;
/// Messages taken off the PULL socket per wake-up before the other
/// sockets are looked at again.
const BATCH: usize = 1024;

/// Whether `text` is a connection's address: 52 lowercase hex digits.
pub fn is_address(text: &[u8]) -> bool {
    text.len() == ADDRESS_BYTES && text.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// What one hub thread has seen; read by the main thread while it runs.
#[derive(Default)]
pub struct HubStats {
    /// `message`s republished to their connection.
    pub messages: AtomicU64,
    /// Other kinds (connect, disconnect, subscribe, unsubscribe, unknown):
    /// ignored.
    pub other_kinds: AtomicU64,
    /// Subscription messages from the server's SUB (on the XPUB).
    pub subscriptions: AtomicU64,
    /// The thread's id, for its CPU time (0 until it runs).
    pub tid: AtomicU32,
    pub joined: AtomicBool,
    /// What did not follow the contract, by rule: count, first example.
    pub problems: Mutex<BTreeMap<String, (u64, String)>>,
}

impl HubStats {
    fn problem(&self, rule: &str, example: impl FnOnce() -> String) {
        let mut p = self.problems.lock().expect("lock");
        match p.get_mut(rule) {
            Some(entry) => entry.0 += 1,
            None => {
                p.insert(rule.to_string(), (1, example()));
            }
        }
    }
}

/// What a [`Hub`] saw over its life.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HubSummary {
    pub threads: usize,
    pub messages: u64,
    pub other_kinds: u64,
    pub subscriptions: u64,
    /// Contract problems: rule, count, first example.
    pub problems: Vec<(String, u64, String)>,
    /// Hub threads that failed (a ZeroMQ error), and why.
    pub failed: Vec<String>,
}

/// The hub threads; [`Hub::stop`] ends them.
pub struct Hub {
    /// Kept alive as long as the sockets are.
    _ctx: zmq::Context,
    /// One PAIR per thread, bound here: a message on it says stop.
    stops: Vec<zmq::Socket>,
    handles: Vec<JoinHandle<Result<(), String>>>,
    pub stats: Vec<Arc<HubStats>>,
    joined_rx: mpsc::Receiver<usize>,
}

impl Hub {
    /// Starts `threads` hub threads, each connecting a PULL to `upstream`
    /// and an XPUB to `publish_to`.
    pub fn start(threads: usize, upstream: &str, publish_to: &str) -> Result<Hub, String> {
        let ctx = zmq::Context::new();
        let (joined_tx, joined_rx) = mpsc::channel();
        let (setup_tx, setup_rx) = mpsc::channel();
        let mut hub = Hub {
            _ctx: ctx.clone(),
            stops: Vec::new(),
            handles: Vec::new(),
            stats: Vec::new(),
            joined_rx,
        };
        for index in 0..threads {
            let stop = ctx
                .socket(zmq::PAIR)
                .map_err(|e| format!("zmq socket: {e}"))?;
            let stop_endpoint = format!("inproc://hub-stop-{index}");
            // Bound before the thread connects (inproc wants the bind first
            // in older libzmq).
            stop.bind(&stop_endpoint)
                .map_err(|e| format!("zmq bind {stop_endpoint}: {e}"))?;
            hub.stops.push(stop);
            let stats = Arc::new(HubStats::default());
            hub.stats.push(stats.clone());
            let thread = HubThread {
                index,
                upstream: upstream.to_string(),
                publish_to: publish_to.to_string(),
                stop_endpoint,
                stats,
                joined_tx: joined_tx.clone(),
                setup_tx: setup_tx.clone(),
            };
            let ctx = ctx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("hub-{index}"))
                .spawn(move || serve(&ctx, thread))
                .map_err(|e| format!("spawn hub thread: {e}"))?;
            hub.handles.push(handle);
        }
        // Each thread says when its sockets are up (or why not): a bad
        // endpoint fails here, and a stop sent later always has a peer.
        for _ in 0..threads {
            match setup_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("hub: {e}")),
                Err(_) => return Err("a hub thread did not start".into()),
            }
        }
        Ok(hub)
    }

    /// Tells every hub thread to stop. Never blocks: a thread that failed
    /// has no peer socket left to take it, and needs none.
    fn tell_stop(&self) {
        for stop in &self.stops {
            let _ = stop.send(&b"stop"[..], zmq::DONTWAIT);
        }
    }

    /// Waits until every hub thread's publisher has been joined by the
    /// server (a subscription arrived), or `deadline`; returns how many
    /// were.
    pub fn wait_joined(&self, deadline: Instant) -> usize {
        let joined = || self.stats.iter().filter(|s| s.joined.load(Relaxed)).count();
        while joined() < self.stats.len() {
            // Each thread says so once, when it is joined.
            let left = deadline.saturating_duration_since(Instant::now());
            if self.joined_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        joined()
    }

    /// `message`s republished so far, all threads.
    pub fn messages(&self) -> u64 {
        self.stats.iter().map(|s| s.messages.load(Relaxed)).sum()
    }

    /// CPU seconds the hub threads have used so far (`None`: a thread's
    /// /proc entry could not be read).
    pub fn cpu_seconds(&self) -> Option<f64> {
        self.stats
            .iter()
            .map(|s| match s.tid.load(Relaxed) {
                0 => Some(0.0),
                tid => procfs::thread_cpu_seconds(tid).ok(),
            })
            .sum()
    }

    /// Stops the threads and says what they saw.
    pub fn stop(mut self) -> HubSummary {
        self.tell_stop();
        let mut summary = HubSummary {
            threads: self.stats.len(),
            ..HubSummary::default()
        };
        for (i, h) in self.handles.drain(..).enumerate() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => summary.failed.push(format!("hub thread {i}: {e}")),
                Err(_) => summary.failed.push(format!("hub thread {i} panicked")),
            }
        }
        let mut problems: BTreeMap<String, (u64, String)> = BTreeMap::new();
        for s in &self.stats {
            summary.messages += s.messages.load(Relaxed);
            summary.other_kinds += s.other_kinds.load(Relaxed);
            summary.subscriptions += s.subscriptions.load(Relaxed);
            for (rule, (n, example)) in s.problems.lock().expect("lock").iter() {
                problems
                    .entry(rule.clone())
                    .or_insert((0, example.clone()))
                    .0 += n;
            }
        }
        summary.problems = problems.into_iter().map(|(k, (n, e))| (k, n, e)).collect();
        summary
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        // Not stopped (an early return): stop the threads anyway.
        self.tell_stop();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Receives one multipart message into `frames` without waiting (frames
/// past `frames.len()` are received and dropped); returns how many frames
/// it had, `None` when nothing is waiting.
fn recv_multipart_into(
    sock: &zmq::Socket,
    frames: &mut [zmq::Message],
) -> Result<Option<usize>, zmq::Error> {
    let mut n = 0;
    let mut spare = zmq::Message::new();
    loop {
        let slot = match frames.get_mut(n) {
            Some(slot) => slot,
            None => &mut spare,
        };
        // The rest of a multipart message is there once its first frame is.
        let flags = if n == 0 { zmq::DONTWAIT } else { 0 };
        match sock.recv(slot, flags) {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) if n == 0 => return Ok(None),
            Err(e) => return Err(e),
        }
        n += 1;
        if !slot.get_more() {
            return Ok(Some(n));
        }
    }
}

/// What the hub does with one upstream message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Publish `[b"!" + address, payload]`; the contract problems it has
    /// (it is republished all the same: the clients' figures then show
    /// what the server does with it).
    Reply { problems: Vec<&'static str> },
    /// Another kind (presence): ignored.
    Ignore,
    /// Not an upstream message: why.
    Malformed(&'static str),
}

/// Checks one upstream message (its frames, `count` of them).
pub fn judge(frames: &[&[u8]], count: usize) -> Verdict {
    if count != UPSTREAM_FRAMES || frames.len() < UPSTREAM_FRAMES {
        return Verdict::Malformed("not 5 frames");
    }
    // connect, disconnect, subscribe, unsubscribe (presence), or a kind
    // this hub does not know: a hub ignores what it does not handle.
    if frames[0] != b"message" {
        return Verdict::Ignore;
    }
    let mut problems = Vec::new();
    if !is_address(frames[1]) {
        return Verdict::Malformed("address is not 52 lowercase hex digits");
    }
    if !frames[2].starts_with(b"rt.") {
        problems.push("channel is not the client's rt.<n>");
    }
    let meta = frames[3];
    let websocket = meta.starts_with(b"{")
        && meta.ends_with(b"}")
        && contains(meta, b"\"transport\":\"websocket\"");
    if !websocket {
        problems.push("meta does not say transport websocket");
    }
    if !contains(meta, b"\"binary\":false") {
        problems.push("meta does not say binary false (the bench sends text)");
    }
    Verdict::Reply { problems }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What one hub thread is given.
struct HubThread {
    index: usize,
    upstream: String,
    publish_to: String,
    stop_endpoint: String,
    stats: Arc<HubStats>,
    joined_tx: mpsc::Sender<usize>,
    /// Where it says whether its sockets are up.
    setup_tx: mpsc::Sender<Result<(), String>>,
}

/// One hub thread: until told to stop, republishes each message to its
/// connection.
fn serve(ctx: &zmq::Context, t: HubThread) -> Result<(), String> {
    let HubThread {
        index,
        upstream,
        publish_to,
        stop_endpoint,
        stats,
        joined_tx,
        setup_tx,
    } = t;
    let (upstream, publish_to, stop_endpoint) = (&upstream, &publish_to, &stop_endpoint);
    // SAFETY: gettid has no preconditions.
    stats
        .tid
        .store(unsafe { libc::syscall(libc::SYS_gettid) } as u32, Relaxed);
    let sockets = (|| {
        let socket = |kind, what: &str| {
            let s = ctx
                .socket(kind)
                .map_err(|e| format!("zmq {what} socket: {e}"))?;
            s.set_linger(0)
                .map_err(|e| format!("zmq {what} linger: {e}"))?;
            Ok::<_, String>(s)
        };
        // The stop socket first: whatever fails after, stop finds a peer.
        let stop = socket(zmq::PAIR, "PAIR")?;
        stop.connect(stop_endpoint)
            .map_err(|e| format!("zmq connect {stop_endpoint}: {e}"))?;
        let pull = socket(zmq::PULL, "PULL")?;
        pull.connect(upstream)
            .map_err(|e| format!("zmq connect {upstream}: {e}"))?;
        let xpub = socket(zmq::XPUB, "XPUB")?;
        // Unlimited: the bench never drops a reply on its side (what is in
        // flight is bounded by the clients' windows).
        xpub.set_sndhwm(0).map_err(|e| format!("zmq sndhwm: {e}"))?;
        xpub.connect(publish_to)
            .map_err(|e| format!("zmq connect {publish_to}: {e}"))?;
        Ok::<_, String>((pull, xpub, stop))
    })();
    let _ = setup_tx.send(sockets.as_ref().map(|_| ()).map_err(String::clone));
    let (pull, xpub, stop) = sockets?;

    let mut frames: Vec<zmq::Message> = (0..UPSTREAM_FRAMES).map(|_| zmq::Message::new()).collect();
    let mut topic: Vec<u8> = Vec::with_capacity(1 + ADDRESS_BYTES);
    let mut subscription = zmq::Message::new();
    loop {
        let (upstream_ready, subscribed, stopped) = {
            let mut items = [
                pull.as_poll_item(zmq::POLLIN),
                xpub.as_poll_item(zmq::POLLIN),
                stop.as_poll_item(zmq::POLLIN),
            ];
            match zmq::poll(&mut items, -1) {
                Ok(_) => {}
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(format!("zmq poll: {e}")),
            }
            (
                items[0].is_readable(),
                items[1].is_readable(),
                items[2].is_readable(),
            )
        };
        if stopped {
            return Ok(());
        }
        if subscribed {
            loop {
                match xpub.recv(&mut subscription, zmq::DONTWAIT) {
                    Ok(()) => {
                        stats.subscriptions.fetch_add(1, Relaxed);
                    }
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => return Err(format!("zmq recv (XPUB): {e}")),
                }
            }
            if !stats.joined.swap(true, Relaxed) {
                let _ = joined_tx.send(index);
            }
        }
        if !upstream_ready {
            continue;
        }
        for _ in 0..BATCH {
            let count = match recv_multipart_into(&pull, &mut frames) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => return Err(format!("zmq recv (PULL): {e}")),
            };
            let mut views: [&[u8]; UPSTREAM_FRAMES] = [&[]; UPSTREAM_FRAMES];
            let kept = count.min(UPSTREAM_FRAMES);
            for (view, frame) in views.iter_mut().zip(&frames[..kept]) {
                *view = frame;
            }
            let views = &views[..kept];
            match judge(views, count) {
                Verdict::Reply { problems } => {
                    for rule in problems {
                        stats.problem(rule, || describe(views));
                    }
                    topic.clear();
                    topic.push(b'!');
                    topic.extend_from_slice(views[1]);
                    let payload = std::mem::replace(&mut frames[4], zmq::Message::new());
                    xpub.send(&topic[..], zmq::SNDMORE)
                        .and_then(|()| xpub.send(payload, 0))
                        .map_err(|e| format!("zmq send: {e}"))?;
                    stats.messages.fetch_add(1, Relaxed);
                }
                Verdict::Ignore => {
                    stats.other_kinds.fetch_add(1, Relaxed);
                }
                Verdict::Malformed(rule) => {
                    let example = format!("{count} frames: {}", describe(views));
                    stats.problem(rule, || example);
                }
            }
        }
    }
}

/// The frames of a message, short, for an example.
fn describe(frames: &[&[u8]]) -> String {
    frames
        .iter()
        .map(|f| format!("{:?}", String::from_utf8_lossy(&f[..f.len().min(80)])))
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address as the baseline makes them: instance, then a counter.
    fn address() -> Vec<u8> {
        format!("{:016x}{:036x}", 0x0123_4567_89ab_cdef_u64, 7).into_bytes()
    }

    #[test]
    fn verdicts() {
        let addr = &address()[..];
        let meta: &[u8] = br#"{"transport":"websocket","binary":false}"#;
        let ok: [&[u8]; 5] = [b"message", addr, b"rt.7", meta, b"payload"];
        assert_eq!(judge(&ok, 5), Verdict::Reply { problems: vec![] });
        let presence: [&[u8]; 5] = [b"connect", addr, b"", br#"{"transport":"websocket"}"#, b""];
        assert_eq!(judge(&presence, 5), Verdict::Ignore);
        let future: [&[u8]; 5] = [b"typing", addr, b"rt.7", meta, b""];
        assert_eq!(judge(&future, 5), Verdict::Ignore);
        assert_eq!(judge(&ok[..2], 2), Verdict::Malformed("not 5 frames"));
        assert_eq!(judge(&ok, 6), Verdict::Malformed("not 5 frames"));
        let upper = b"0123456789ABCDEF000000000000000000000000000000000000";
        let bad: [&[u8]; 5] = [b"message", upper, b"rt.7", meta, b"p"];
        assert!(matches!(judge(&bad, 5), Verdict::Malformed(_)));
        let foreign: [&[u8]; 5] = [
            b"message",
            addr,
            b"news",
            br#"{"transport":"sse","binary":true}"#,
            b"p",
        ];
        let Verdict::Reply { problems } = judge(&foreign, 5) else {
            panic!()
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(is_address(addr));
        assert!(!is_address(&addr[..51]));
    }

    #[test]
    fn a_bad_endpoint_fails_the_start_and_nothing_hangs() {
        let err = Hub::start(2, "tcp://nowhere", "tcp://127.0.0.1:1")
            .err()
            .unwrap();
        assert!(err.contains("zmq connect tcp://nowhere"), "{err}");
    }

    /// A server stand-in: a bound PUSH (upstream) and a bound SUB; the hub
    /// between them turns a message into a reply to its address.
    #[test]
    fn republishes_a_message_to_its_connection() {
        let ctx = zmq::Context::new();
        let push = ctx.socket(zmq::PUSH).unwrap();
        push.set_linger(0).unwrap();
        push.bind("tcp://127.0.0.1:*").unwrap();
        let upstream = push.get_last_endpoint().unwrap().unwrap();
        let sub = ctx.socket(zmq::SUB).unwrap();
        sub.set_linger(0).unwrap();
        sub.set_subscribe(b"").unwrap();
        sub.set_rcvtimeo(10_000).unwrap();
        sub.bind("tcp://127.0.0.1:*").unwrap();
        let publish_to = sub.get_last_endpoint().unwrap().unwrap();
        // Like a server's ingest, the SUB is in recv: ZeroMQ attaches a
        // connecting peer (and sends it the subscriptions) in the thread
        // that uses the socket.
        let replies = std::thread::spawn(move || sub.recv_multipart(0));

        let hub = Hub::start(1, &upstream, &publish_to).unwrap();
        // The SUB's subscription reaching the XPUB is the signal.
        assert_eq!(hub.wait_joined(Instant::now() + Duration::from_secs(10)), 1);
        let addr = &address()[..];
        let meta: &[u8] = br#"{"transport":"websocket","binary":false}"#;
        // A presence event and a malformed message first: ignored, counted.
        push.send_multipart([&b"connect"[..], addr, b"", meta, b""], 0)
            .unwrap();
        push.send_multipart([&b"message"[..], addr], 0).unwrap();
        push.send_multipart([&b"message"[..], addr, b"rt.7", meta, b"m0000"], 0)
            .unwrap();
        let reply = replies.join().unwrap().expect("a reply within 10 s");
        let mut topic = b"!".to_vec();
        topic.extend_from_slice(addr);
        assert_eq!(reply, vec![topic, b"m0000".to_vec()]);
        assert_eq!(hub.messages(), 1);
        assert!(hub.cpu_seconds().is_some());
        let summary = hub.stop();
        assert_eq!(summary.messages, 1);
        assert_eq!(summary.other_kinds, 1);
        assert!(summary.subscriptions >= 1);
        assert!(summary.failed.is_empty(), "{:?}", summary.failed);
        assert_eq!(summary.problems.len(), 1, "{:?}", summary.problems);
        assert_eq!(summary.problems[0].0, "not 5 frames");
    }
}
