//! ZeroMQ ingest: one thread owns the SUB socket, checks each publication,
//! gives it its id (the publisher's, or the next one of this process),
//! encodes it once per transport and hands the same `Arc<Message>` to every
//! core.
//!
//! Frames of a publication: `[channel, payload]` or `[channel, payload, meta]`
//! where meta is a JSON object with two optional keys: `"event"` (the SSE
//! event name) and `"id"` (the publisher's id for the message, a decimal u64
//! as a JSON string or number). Anything else is dropped with a warning: a
//! publisher bug should be loud, not silently half-delivered.
//!
//! Ids never go backwards on a channel: a publication whose id is not greater
//! than the last one of its channel (a duplicate, or a reordered or replayed
//! publication) is dropped with a warning rather than delivered out of order.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::Sender;
use protocol::envelope::{self, Publication};
use serde::Deserialize;
use tracing::{info, warn};

use crate::config::Config;
use crate::core::{GATEWAY_ID_FLOOR, ID_TAG_BITS, ID_TAG_MASK};

/// One published message, encoded once for each transport. Cores and
/// connections share it by reference count; no subscriber gets a copy.
#[derive(Debug)]
pub struct Message {
    pub id: u64,
    /// The id came from the publisher (the meta frame's `"id"`): it is a
    /// position in the publisher's sequence for the channel, the same on
    /// every gateway fed by that publisher, rather than one this process
    /// issued.
    pub from_publisher: bool,
    pub channel: Box<str>,
    /// A whole WebSocket frame.
    pub ws: Bytes,
    /// A whole SSE event.
    pub sse: Bytes,
    /// The message as one long-poll JSON object, for multi-message responses.
    pub poll_item: Bytes,
    /// A whole keep-alive long-poll response carrying only this message,
    /// shared by every long-poll client it is the next message for.
    pub poll_response: Bytes,
    /// When ingest encoded it: the start of the publish→send latency.
    pub stamped: std::time::Instant,
}

impl Message {
    pub fn encode(id: u64, channel: &str, event: Option<&str>, payload: &[u8]) -> Message {
        let p = Publication {
            channel,
            id,
            event,
            payload,
        };
        let mut ws = Vec::with_capacity(payload.len() + channel.len() + 48);
        envelope::encode_ws(&p, &mut ws);
        let mut sse = Vec::with_capacity(payload.len() + channel.len() + 64);
        envelope::encode_sse(&p, &mut sse);
        let mut poll_item = Vec::with_capacity(payload.len() + channel.len() + 48);
        envelope::encode_longpoll_item(&p, &mut poll_item);
        let mut poll_response = Vec::with_capacity(poll_item.len() + 160);
        envelope::longpoll_response(&[&poll_item], id, &[], true, "", &mut poll_response);
        Message {
            id,
            from_publisher: false,
            channel: channel.into(),
            ws: ws.into(),
            sse: sse.into(),
            poll_item: poll_item.into(),
            poll_response: poll_response.into(),
            stamped: std::time::Instant::now(),
        }
    }
}

/// The ingest thread's handle on one core: its queue and its doorbell.
pub struct CoreInbox {
    pub tx: Sender<Arc<Message>>,
    /// Set by ingest when it rings, cleared by the core before it drains, so
    /// a burst of messages rings the doorbell once instead of once each.
    pub rung: Arc<AtomicBool>,
    /// An eventfd the core reads through io_uring: a wake-up that costs no
    /// polling while idle.
    pub doorbell: Arc<OwnedFd>,
}

impl CoreInbox {
    fn deliver(&self, msg: Arc<Message>) -> bool {
        if self.tx.send(msg).is_err() {
            return false;
        }
        if !self.rung.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a live u64 to an eventfd we own.
            let n = unsafe {
                libc::write(
                    self.doorbell.as_raw_fd(),
                    &one as *const u64 as *const libc::c_void,
                    8,
                )
            };
            // EAGAIN means the counter is saturated: the core is already woken.
            debug_assert!(
                n == 8 || std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
            );
        }
        true
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    event: Option<String>,
    /// Checked by [`publisher_id`]: a string or a number.
    id: Option<serde_json::Value>,
}

/// Why a publication was dropped at ingest.
#[derive(Debug, PartialEq, Eq)]
pub enum IngestError {
    WrongFrameCount(usize),
    BadChannelName,
    PayloadTooLarge {
        size: usize,
        max_size: usize,
    },
    BadMeta(String),
    BadEventName,
    /// `"id"` is not a decimal u64 from 1 to 2^64 - 1 (as a JSON string or
    /// number).
    BadId,
}

impl IngestError {
    /// Its index in [`crate::metrics::DROP_REASONS`].
    fn metric_reason(&self) -> usize {
        match self {
            IngestError::WrongFrameCount(_) => 0,
            IngestError::BadChannelName => 1,
            IngestError::PayloadTooLarge { .. } => 2,
            IngestError::BadMeta(_) => 3,
            IngestError::BadEventName => 4,
            IngestError::BadId => 5,
        }
    }
}

/// Longest SSE event name a publisher may set.
const EVENT_NAME_BYTES_MAX: usize = 64;

/// A publication that passed the checks.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked<'a> {
    pub channel: &'a str,
    pub event: Option<String>,
    /// The publisher's id for the message, if it gave one.
    pub id: Option<u64>,
    pub payload: &'a [u8],
}

/// The meta frame's `"id"`: a decimal u64 as a JSON string (`"42"`) or
/// number (`42`). 0 is refused: a cursor of 0 means "before everything",
/// so a message with id 0 could never be resumed to.
fn publisher_id(v: &serde_json::Value) -> Result<u64, IngestError> {
    let id = match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().ok()
        }
        _ => None,
    };
    // Ids from GATEWAY_ID_FLOOR up are the gateways' own (they carry a
    // process tag); a publisher's there could pass for one.
    id.filter(|&id| id > 0 && id < GATEWAY_ID_FLOOR)
        .ok_or(IngestError::BadId)
}

/// Checks a publication's frames.
pub fn check_frames<'a>(frames: &'a [Vec<u8>], cfg: &Config) -> Result<Checked<'a>, IngestError> {
    if frames.len() != 2 && frames.len() != 3 {
        return Err(IngestError::WrongFrameCount(frames.len()));
    }
    let channel = &frames[0];
    if !protocol::http::valid_channel_name(channel, cfg.channel_name_bytes_max) {
        return Err(IngestError::BadChannelName);
    }
    // Valid names are ASCII, so this cannot fail.
    let channel = std::str::from_utf8(channel).map_err(|_| IngestError::BadChannelName)?;
    let payload = &frames[1];
    if payload.len() > cfg.publish_payload_bytes_max {
        return Err(IngestError::PayloadTooLarge {
            size: payload.len(),
            max_size: cfg.publish_payload_bytes_max,
        });
    }
    let mut event = None;
    let mut id = None;
    if let Some(meta) = frames.get(2) {
        let meta: Meta =
            serde_json::from_slice(meta).map_err(|e| IngestError::BadMeta(e.to_string()))?;
        if let Some(name) = meta.event {
            let ok = !name.is_empty()
                && name.len() <= EVENT_NAME_BYTES_MAX
                && name.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(IngestError::BadEventName);
            }
            event = Some(name);
        }
        if let Some(v) = &meta.id {
            id = Some(publisher_id(v)?);
        }
    }
    Ok(Checked {
        channel,
        event,
        id,
        payload,
    })
}

/// The last id of each channel, so that ids never go backwards on a
/// channel. Bounded like the cores' channel tables (`channels_max`): past
/// it, the channel that entered first is forgotten (its next publication is
/// accepted whatever its id).
pub struct LastIds {
    last: HashMap<Rc<str>, u64>,
    /// Channels in the order they entered, for forgetting the oldest.
    age: VecDeque<Rc<str>>,
    channels_max: usize,
}

impl LastIds {
    pub fn new(channels_max: usize) -> LastIds {
        LastIds {
            last: HashMap::new(),
            age: VecDeque::new(),
            channels_max: channels_max.max(1),
        }
    }

    /// Makes `id` the last id of `channel`, or returns the channel's last id
    /// when `id` is not greater than it.
    pub fn advance(&mut self, channel: &str, id: u64) -> Result<(), u64> {
        if let Some(last) = self.last.get_mut(channel) {
            if id <= *last {
                return Err(*last);
            }
            *last = id;
            return Ok(());
        }
        if self.last.len() >= self.channels_max {
            if let Some(oldest) = self.age.pop_front() {
                self.last.remove(&oldest);
            }
        }
        let name: Rc<str> = channel.into();
        self.last.insert(name.clone(), id);
        self.age.push_back(name);
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.last.len()
    }
}

/// Where the SUB socket ended up, for the readiness line.
pub struct Bound {
    pub endpoint: Option<String>,
}

/// Creates the SUB socket (bind and/or connect) on the calling thread, so
/// that configuration errors stop start-up, then returns it for [`run`].
pub fn open(ctx: &zmq::Context, cfg: &Config) -> Result<(zmq::Socket, Bound), String> {
    let sub = ctx
        .socket(zmq::SUB)
        .map_err(|e| format!("zmq socket: {e}"))?;
    sub.set_rcvhwm(cfg.zmq_rcvhwm_messages)
        .map_err(|e| format!("zmq rcvhwm: {e}"))?;
    // Every message is taken; exact channel matching happens in each core's
    // registry (ZeroMQ subscriptions are byte prefixes: "news" would match
    // "news2").
    sub.set_subscribe(b"")
        .map_err(|e| format!("zmq subscribe: {e}"))?;
    watch_peers(ctx, &sub)?;
    let mut bound = Bound { endpoint: None };
    if !cfg.zmq_bind.is_empty() {
        sub.bind(&cfg.zmq_bind)
            .map_err(|e| format!("zmq bind {}: {e}", cfg.zmq_bind))?;
        let last = sub
            .get_last_endpoint()
            .map_err(|e| format!("zmq endpoint: {e}"))?
            .unwrap_or_else(|raw| String::from_utf8_lossy(&raw).into_owned());
        bound.endpoint = Some(last);
    }
    for endpoint in &cfg.zmq_connect {
        sub.connect(endpoint)
            .map_err(|e| format!("zmq connect {endpoint}: {e}"))?;
    }
    Ok((sub, bound))
}

/// ZeroMQ peers (publishers or forwarders) the SUB socket is connected to
/// now, as its monitor reports them; `/readyz` can require at least one.
static PUBLISHER_PEERS: AtomicI64 = AtomicI64::new(0);

pub fn publisher_peers() -> i64 {
    PUBLISHER_PEERS.load(Ordering::Relaxed)
}

/// Counts the SUB socket's peers from its monitor events, on a thread of
/// their own so the ingest loop keeps its single blocking receive.
fn watch_peers(ctx: &zmq::Context, sub: &zmq::Socket) -> Result<(), String> {
    const ENDPOINT: &str = "inproc://gateway-ingest-monitor";
    let events = zmq::SocketEvent::CONNECTED as i32
        | zmq::SocketEvent::ACCEPTED as i32
        | zmq::SocketEvent::DISCONNECTED as i32;
    sub.monitor(ENDPOINT, events)
        .map_err(|e| format!("zmq monitor: {e}"))?;
    let pair = ctx
        .socket(zmq::PAIR)
        .map_err(|e| format!("zmq monitor socket: {e}"))?;
    pair.connect(ENDPOINT)
        .map_err(|e| format!("zmq monitor connect: {e}"))?;
    std::thread::Builder::new()
        .name("ingest-monitor".into())
        .spawn(move || loop {
            // An event is two frames: 2 bytes of event number and 4 of
            // value (little-endian), then the peer's endpoint.
            let Ok(frames) = pair.recv_multipart(0) else {
                return;
            };
            let Some(head) = frames.first().filter(|f| f.len() >= 2) else {
                continue;
            };
            let event = zmq::SocketEvent::from_raw(u16::from_le_bytes([head[0], head[1]]));
            let endpoint = frames
                .get(1)
                .map(|f| String::from_utf8_lossy(f).into_owned());
            let delta = match event {
                zmq::SocketEvent::CONNECTED | zmq::SocketEvent::ACCEPTED => 1,
                zmq::SocketEvent::DISCONNECTED => -1,
                _ => continue,
            };
            let now = PUBLISHER_PEERS.fetch_add(delta, Ordering::Relaxed) + delta;
            info!(
                ?event,
                endpoint = endpoint.as_deref().unwrap_or("?"),
                peers = now,
                "zmq peer"
            );
        })
        .map_err(|e| format!("spawn zmq monitor thread: {e}"))?;
    Ok(())
}

/// Gives a checked publication its id: the publisher's, or this
/// gateway's next (`counter << ID_TAG_BITS | tag`, the counter one past the
/// highest id seen, `max_seen`, which starts at the process's first id; see
/// [`crate::core::GATEWAY_ID_FLOOR`]). Err: the id does not advance its
/// channel (the channel's last id), or no id is left.
pub fn assign_id(
    checked: &Checked,
    max_seen: &mut u64,
    last_ids: &mut LastIds,
    tag: u64,
) -> Result<u64, IdRefusal> {
    let id = match checked.id {
        Some(id) => id,
        None => {
            let counter = (*max_seen >> ID_TAG_BITS) + 1;
            if counter >> (64 - ID_TAG_BITS) != 0 {
                return Err(IdRefusal::Exhausted);
            }
            counter << ID_TAG_BITS | tag
        }
    };
    last_ids
        .advance(checked.channel, id)
        .map_err(|last| IdRefusal::NotAfterLast { last })?;
    *max_seen = (*max_seen).max(id);
    Ok(id)
}

/// Why a publication got no id.
#[derive(Debug, PartialEq, Eq)]
pub enum IdRefusal {
    /// Its id is not greater than the channel's last one: a duplicate, or a
    /// publication that arrived out of order.
    NotAfterLast { last: u64 },
    /// A publisher id of 2^64 - 1 was seen: no greater id is left to assign.
    Exhausted,
}

/// The ingest loop; runs until the SUB socket fails or every core is gone.
/// `published_through` is the highest id seen (assigned or the
/// publisher's); it starts at the process's first id (see
/// [`crate::core::first_gateway_id`]).
pub fn run(
    sub: zmq::Socket,
    cfg: &Config,
    cores: Vec<CoreInbox>,
    published_through: Arc<AtomicU64>,
) {
    let mut dropped: u64 = 0;
    let mut max_seen = published_through.load(Ordering::Relaxed);
    // The process's first id carries its tag.
    let tag = max_seen & ID_TAG_MASK;
    let mut last_ids = LastIds::new(cfg.channels_max);
    loop {
        let frames = match sub.recv_multipart(0) {
            Ok(frames) => frames,
            Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                warn!(error = %e, "zmq receive failed; ingest stops");
                return;
            }
        };
        crate::metrics::note_message_in();
        let checked = match check_frames(&frames, cfg) {
            Ok(checked) => checked,
            Err(e) => {
                crate::metrics::note_dropped(e.metric_reason());
                dropped += 1;
                warn!(error = ?e, dropped_total = dropped, "publication dropped");
                continue;
            }
        };
        // Only this thread assigns ids, so the order of this loop is the
        // order of the ids.
        let id = match assign_id(&checked, &mut max_seen, &mut last_ids, tag) {
            Ok(id) => id,
            Err(why) => {
                crate::metrics::note_dropped(match why {
                    IdRefusal::NotAfterLast { .. } => 6,
                    IdRefusal::Exhausted => 7,
                });
                dropped += 1;
                warn!(
                    channel = checked.channel,
                    id = ?checked.id,
                    error = ?why,
                    dropped_total = dropped,
                    "publication dropped: its id does not follow the channel's last one \
                     (a duplicate or a reordered publication)"
                );
                continue;
            }
        };
        let mut msg = Message::encode(
            id,
            checked.channel,
            checked.event.as_deref(),
            checked.payload,
        );
        msg.from_publisher = checked.id.is_some();
        let msg = Arc::new(msg);
        published_through.store(max_seen, Ordering::Release);
        let mut alive = 0;
        for core in &cores {
            if core.deliver(msg.clone()) {
                alive += 1;
            }
        }
        if alive == 0 {
            info!("no core is running; ingest stops");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn accepts_two_or_three_frames() {
        let cfg = Config::default();
        let two = frames(&[b"news", b"hello"]);
        assert_eq!(
            check_frames(&two, &cfg).unwrap(),
            Checked {
                channel: "news",
                event: None,
                id: None,
                payload: &b"hello"[..]
            }
        );
        let three = frames(&[b"news", b"hello", br#"{"event":"price"}"#]);
        let checked = check_frames(&three, &cfg).unwrap();
        assert_eq!(checked.event.as_deref(), Some("price"));
        assert_eq!(checked.id, None);
    }

    #[test]
    fn a_publisher_id_is_a_decimal_u64_as_a_string_or_a_number() {
        let cfg = Config::default();
        let id_of = |meta: &[u8]| {
            let f = frames(&[b"news", b"x", meta]);
            check_frames(&f, &cfg).map(|c| c.id)
        };
        assert_eq!(id_of(br#"{"id":"42"}"#), Ok(Some(42)));
        assert_eq!(id_of(br#"{"id":42}"#), Ok(Some(42)));
        // Up to just below the gateways' own range (2^56).
        assert_eq!(
            id_of(br#"{"id":"72057594037927935","event":"e"}"#),
            Ok(Some(GATEWAY_ID_FLOOR - 1))
        );
        assert_eq!(
            id_of(br#"{"id":1700000000000000}"#),
            Ok(Some(1_700_000_000_000_000))
        );
        assert_eq!(id_of(br#"{"id":null}"#), Ok(None));
        for bad in [
            &br#"{"id":"0"}"#[..],
            br#"{"id":0}"#,
            br#"{"id":-1}"#,
            br#"{"id":72057594037927936}"#,
            br#"{"id":"18446744073709551615"}"#,
            br#"{"id":1.5}"#,
            br#"{"id":"1.5"}"#,
            br#"{"id":""}"#,
            br#"{"id":" 1"}"#,
            br#"{"id":"-1"}"#,
            br#"{"id":"+1"}"#,
            br#"{"id":"0x10"}"#,
            br#"{"id":"18446744073709551616"}"#,
            br#"{"id":18446744073709551616}"#,
            br#"{"id":true}"#,
            br#"{"id":[1]}"#,
        ] {
            assert_eq!(
                id_of(bad),
                Err(IngestError::BadId),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn checked<'a>(channel: &'a str, id: Option<u64>) -> Checked<'a> {
        Checked {
            channel,
            event: None,
            id,
            payload: b"",
        }
    }

    #[test]
    fn publisher_ids_must_increase_per_channel() {
        let tag = 0x2a;
        let first = crate::core::first_gateway_id(1_800_000_000_000, tag as u16);
        let mut max_seen = first;
        let mut last = LastIds::new(100);
        let mut id = |ch: &str, given: Option<u64>, max_seen: &mut u64| {
            assign_id(&checked(ch, given), max_seen, &mut last, tag)
        };
        // Publisher ids are taken as they are, far below the gateway's.
        assert_eq!(id("a", Some(5), &mut max_seen), Ok(5));
        assert_eq!(id("a", Some(7), &mut max_seen), Ok(7));
        assert_eq!(max_seen, first);
        // A duplicate or an older id on the same channel is refused...
        for old in [7, 6, 1] {
            assert_eq!(
                id("a", Some(old), &mut max_seen),
                Err(IdRefusal::NotAfterLast { last: 7 })
            );
        }
        // ... while another channel has its own sequence.
        assert_eq!(id("b", Some(3), &mut max_seen), Ok(3));
        // The gateway's own ids carry its tag and keep increasing.
        let g1 = id("c", None, &mut max_seen).unwrap();
        let g2 = id("b", None, &mut max_seen).unwrap();
        assert!(first < g1 && g1 < g2);
        assert_eq!((g1 & ID_TAG_MASK, g2 & ID_TAG_MASK), (tag, tag));
        // A publisher id below what the gateway gave the channel is refused:
        // mixing the two on one channel never delivers out of order.
        assert_eq!(
            id("b", Some(4), &mut max_seen),
            Err(IdRefusal::NotAfterLast { last: g2 })
        );
        // No counter is left past the top of the id space.
        let mut top = u64::MAX;
        assert_eq!(id("e", None, &mut top), Err(IdRefusal::Exhausted));
    }

    #[test]
    fn gateway_ids_increase_across_channels_with_the_tag_in_the_low_bits() {
        let mut max_seen = crate::core::first_gateway_id(1_800_000_000_000, 7);
        let mut last = LastIds::new(100);
        let ids: Vec<u64> = ["a", "b", "a", "c"]
            .iter()
            .map(|ch| assign_id(&checked(ch, None), &mut max_seen, &mut last, 7).unwrap())
            .collect();
        let counters: Vec<u64> = ids.iter().map(|id| id >> ID_TAG_BITS).collect();
        assert_eq!(
            counters,
            [
                1_800_000_000_001,
                1_800_000_000_002,
                1_800_000_000_003,
                1_800_000_000_004
            ]
        );
        assert!(ids
            .iter()
            .all(|id| id & ID_TAG_MASK == 7 && *id >= GATEWAY_ID_FLOOR));
    }

    #[test]
    fn the_last_id_table_is_bounded_and_forgets_the_oldest_channel() {
        let mut last = LastIds::new(2);
        last.advance("a", 10).unwrap();
        last.advance("b", 10).unwrap();
        last.advance("c", 10).unwrap();
        assert_eq!(last.len(), 2);
        // "a" was forgotten: its next id is taken whatever it is.
        assert_eq!(last.advance("a", 1), Ok(()));
        // "c" is still known.
        assert_eq!(last.advance("c", 10), Err(10));
    }

    #[test]
    fn refuses_what_it_cannot_deliver_faithfully() {
        let cfg = Config {
            publish_payload_bytes_max: 4,
            ..Config::default()
        };
        type Case = (Vec<Vec<u8>>, fn(&IngestError) -> bool);
        let cases: Vec<Case> = vec![
            (frames(&[b"news"]), |e| {
                matches!(e, IngestError::WrongFrameCount(1))
            }),
            (frames(&[b"news", b"a", b"{}", b"x"]), |e| {
                matches!(e, IngestError::WrongFrameCount(4))
            }),
            (frames(&[b"bad channel", b"a"]), |e| {
                *e == IngestError::BadChannelName
            }),
            (frames(&[b"", b"a"]), |e| *e == IngestError::BadChannelName),
            (frames(&[b"news", b"hello"]), |e| {
                *e == IngestError::PayloadTooLarge {
                    size: 5,
                    max_size: 4,
                }
            }),
            (frames(&[b"news", b"a", b"not json"]), |e| {
                matches!(e, IngestError::BadMeta(_))
            }),
            (frames(&[b"news", b"a", br#"{"evnt":"x"}"#]), |e| {
                matches!(e, IngestError::BadMeta(_))
            }),
            (frames(&[b"news", b"a", br#"{"event":"a\nb"}"#]), |e| {
                *e == IngestError::BadEventName
            }),
        ];
        for (input, expected) in cases {
            let err = check_frames(&input, &cfg).unwrap_err();
            assert!(expected(&err), "{input:?} gave {err:?}");
        }
    }

    #[test]
    fn one_encoding_per_transport() {
        let msg = Message::encode(42, "news", None, b"hi");
        assert_eq!(msg.ws[0], 0x81, "a text frame with FIN");
        assert!(msg.sse.starts_with(b"id: 42\n"));
        assert!(msg.poll_response.starts_with(b"HTTP/1.1 200 OK\r\n"));
        let body_at = msg
            .poll_response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
            + 4;
        let body: serde_json::Value =
            serde_json::from_slice(&msg.poll_response[body_at..]).unwrap();
        assert_eq!(body["cursor"], "42");
        assert_eq!(body["messages"][0]["data"], "hi");
    }
}
