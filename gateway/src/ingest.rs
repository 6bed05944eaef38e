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
//!
//! With `zmq_subscribe = demand` the SUB socket subscribes only to channels
//! that have a subscriber on some core: each core reports its first
//! subscriber of a channel and its last one leaving ([`Interest`]), ingest
//! counts the cores per channel ([`Demand`]) and subscribes, or
//! unsubscribes once a channel has had no subscriber for the linger. A
//! publisher or forwarder (XPUB) then sends this gateway only what its
//! clients want. When a channel is unsubscribed the cores are told
//! ([`ToCore::Unsubscribed`]): its history here stops being complete.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use protocol::deflate::{Deflater, Window};
use protocol::envelope::{self, Publication};
use tracing::{debug, info, warn};

use crate::config::{Config, SubscribeMode};
use protocol::id::{ID_TAG_BITS, ID_TAG_MASK};
use protocol::publication::{check_frames, Checked, PublicationError, PublicationLimits};

/// One published message, encoded once for each transport. Cores and
/// connections share it by reference count; no subscriber gets a copy.
/// The WebSocket frame and the SSE event are made by ingest; the long-poll
/// encodings, the gRPC message and the compressed WebSocket frames only
/// when a subscriber first needs them (most messages never meet one), by
/// whichever core does.
#[derive(Debug)]
pub struct Message {
    pub id: u64,
    /// The id came from the publisher (the meta frame's `"id"`): it is a
    /// position in the publisher's sequence for the channel, the same on
    /// every gateway fed by that publisher, rather than one this process
    /// issued.
    pub from_publisher: bool,
    pub channel: Box<str>,
    event: Option<Box<str>>,
    payload: Bytes,
    /// A whole WebSocket frame.
    pub ws: Bytes,
    /// The frame for connections that negotiated permessage-deflate, per
    /// window ([`Message::ws_deflated`]), made by the first core with such
    /// a subscriber.
    ws_deflated: [OnceLock<Bytes>; 2],
    /// A whole SSE event as one chunk of a chunked body (see
    /// `core::sse_bytes` for an HTTP/1.0 stream's share of it).
    pub sse: Bytes,
    poll_item: OnceLock<Bytes>,
    poll_response: OnceLock<Bytes>,
    /// The message as a gRPC stream gets it (a length-prefixed
    /// `ServerFrame`), encoded by the first core with a gRPC subscriber.
    grpc: OnceLock<Bytes>,
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
        let mut sse_event = Vec::with_capacity(payload.len() + channel.len() + 64);
        envelope::encode_sse(&p, &mut sse_event);
        let mut sse = Vec::with_capacity(sse_event.len() + 16);
        protocol::sse::push_chunk(&mut sse, &sse_event);
        Message {
            id,
            from_publisher: false,
            channel: channel.into(),
            event: event.map(Into::into),
            payload: Bytes::copy_from_slice(payload),
            ws: ws.into(),
            ws_deflated: [OnceLock::new(), OnceLock::new()],
            sse: sse.into(),
            poll_item: OnceLock::new(),
            poll_response: OnceLock::new(),
            grpc: OnceLock::new(),
            stamped: std::time::Instant::now(),
        }
    }

    /// The message as one long-poll JSON object, for multi-message
    /// responses.
    pub fn poll_item(&self) -> &Bytes {
        self.poll_item.get_or_init(|| {
            let p = Publication {
                channel: &self.channel,
                id: self.id,
                event: self.event.as_deref(),
                payload: &self.payload,
            };
            let mut item = Vec::with_capacity(self.payload.len() + self.channel.len() + 48);
            envelope::encode_longpoll_item(&p, &mut item);
            item.into()
        })
    }

    /// A whole keep-alive long-poll response carrying only this message,
    /// shared by every long-poll client it is the next message for.
    pub fn poll_response(&self) -> &Bytes {
        self.poll_response.get_or_init(|| {
            let item = self.poll_item();
            let mut out = Vec::with_capacity(item.len() + 160);
            envelope::longpoll_response(&[item], self.id, &[], true, "", &mut out);
            out.into()
        })
    }

    /// The WebSocket frame for a connection that negotiated
    /// permessage-deflate with `window`: compressed once per message and
    /// window, by the first core that needs it (with that core's
    /// compressor), and the same bytes for every such connection; the
    /// plain frame when the message is under `threshold_bytes` or would
    /// not shrink.
    pub fn ws_deflated(
        &self,
        window: Window,
        threshold_bytes: usize,
        deflater: &RefCell<Deflater>,
    ) -> &Bytes {
        self.ws_deflated[window as usize].get_or_init(|| {
            let mut deflater = deflater.borrow_mut();
            match protocol::ws::compress_frame(&self.ws, &mut deflater, window, threshold_bytes) {
                Some(frame) => {
                    crate::ops::metrics::note_ws_deflated();
                    frame.into()
                }
                None => self.ws.clone(),
            }
        })
    }

    /// The message on a gRPC stream, shared by every gRPC subscriber.
    pub fn grpc(&self) -> &Bytes {
        self.grpc.get_or_init(|| {
            protocol::grpc::publication_message(&Publication {
                channel: &self.channel,
                id: self.id,
                event: self.event.as_deref(),
                payload: &self.payload,
            })
            .into()
        })
    }
}

/// What ingest sends a core, in the order it happened.
pub enum ToCore {
    Message(Arc<Message>),
    /// A message for one connection of this core: its slab key and serial
    /// (the entry may hold another connection by now). It has no id.
    Direct {
        key: u32,
        serial: u32,
        msg: Arc<Message>,
    },
    /// The SUB socket no longer subscribes to this channel (demand mode,
    /// after the linger): publications on it may be missed from now on, so
    /// its history here no longer shows everything since its first message.
    Unsubscribed(Box<str>),
}

/// The ingest thread's handle on one core: its queue and its doorbell.
pub struct CoreInbox {
    pub tx: Sender<ToCore>,
    /// Set by ingest when it rings, cleared by the core before it drains, so
    /// a burst of messages rings the doorbell once instead of once each.
    pub rung: Arc<AtomicBool>,
    /// An eventfd the core reads through io_uring: a wake-up that costs no
    /// polling while idle.
    pub doorbell: Arc<OwnedFd>,
}

impl CoreInbox {
    fn deliver(&self, item: ToCore) -> bool {
        if self.tx.send(item).is_err() {
            return false;
        }
        if !self.rung.swap(true, Ordering::AcqRel) {
            crate::sys::eventfd_ring(&self.doorbell);
        }
        true
    }
}

/// A core's news for ingest in demand mode: its first subscriber of a
/// channel arrived, or its last one left.
#[derive(Debug, PartialEq, Eq)]
pub enum Interest {
    On(Box<str>),
    Off(Box<str>),
}

/// How a core tells ingest about [`Interest`]: one queue for all cores
/// (so ingest sees the news in the order the cores sent it) and an eventfd
/// the ingest loop polls next to the SUB socket.
#[derive(Clone)]
pub struct InterestTx {
    tx: Sender<Interest>,
    doorbell: Arc<OwnedFd>,
}

impl InterestTx {
    pub fn send(&self, interest: Interest) {
        // Only fails once ingest is gone, when nothing is delivered anyway.
        if self.tx.send(interest).is_ok() {
            crate::sys::eventfd_ring(&self.doorbell);
        }
    }
}

/// Ingest's end of the cores' [`Interest`] queue.
pub struct InterestRx {
    rx: Receiver<Interest>,
    doorbell: Arc<OwnedFd>,
}

#[cfg(test)]
impl InterestRx {
    pub fn rx_for_tests(&self) -> &Receiver<Interest> {
        &self.rx
    }
}

/// The queue from the cores to ingest, for demand mode.
pub fn interest_channel() -> std::io::Result<(InterestTx, InterestRx)> {
    let doorbell = Arc::new(crate::sys::eventfd()?);
    let (tx, rx) = crossbeam_channel::unbounded();
    Ok((
        InterestTx {
            tx,
            doorbell: doorbell.clone(),
        },
        InterestRx { rx, doorbell },
    ))
}

/// Which channels the SUB socket subscribes to in demand mode: the number
/// of cores with a subscriber of each, and since when a channel has none.
pub struct Demand {
    channels: HashMap<Box<str>, Wanted>,
    linger: Duration,
}

struct Wanted {
    /// Cores with at least one subscriber of the channel.
    cores: u32,
    /// When `cores` fell to 0; the subscription goes after the linger.
    idle_since: Option<Instant>,
}

/// What a [`Demand`] change asks of the SUB socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Upstream {
    Subscribe,
    Nothing,
}

impl Demand {
    pub fn new(linger: Duration) -> Demand {
        Demand {
            channels: HashMap::new(),
            linger,
        }
    }

    pub fn apply(&mut self, interest: Interest, now: Instant) -> Upstream {
        match interest {
            Interest::On(name) => match self.channels.get_mut(&name) {
                Some(w) => {
                    w.cores += 1;
                    w.idle_since = None;
                    Upstream::Nothing
                }
                None => {
                    self.channels.insert(
                        name,
                        Wanted {
                            cores: 1,
                            idle_since: None,
                        },
                    );
                    Upstream::Subscribe
                }
            },
            Interest::Off(name) => {
                if let Some(w) = self.channels.get_mut(&name) {
                    w.cores = w.cores.saturating_sub(1);
                    if w.cores == 0 {
                        w.idle_since = Some(now);
                    }
                }
                Upstream::Nothing
            }
        }
    }

    /// Channels without a subscriber for the whole linger: forgotten here,
    /// to be unsubscribed.
    pub fn expire(&mut self, now: Instant) -> Vec<Box<str>> {
        let linger = self.linger;
        let gone: Vec<Box<str>> = self
            .channels
            .iter()
            .filter(|(_, w)| {
                w.idle_since
                    .is_some_and(|t| now.duration_since(t) >= linger)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            self.channels.remove(name);
        }
        gone
    }

    /// Is the SUB socket subscribed to exactly this channel? (Its
    /// subscriptions are prefixes: "news" also lets "news2" through.)
    pub fn wants(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }
}

/// Channels subscribed upstream (for `/metrics`).
/// A refused publication's place in [`crate::ops::metrics::DROP_REASONS`].
fn metric_reason(e: &PublicationError) -> usize {
    match e {
        PublicationError::WrongFrameCount(_) => 0,
        PublicationError::BadChannelName => 1,
        PublicationError::PayloadTooLarge { .. } => 2,
        PublicationError::BadMeta(_) => 3,
        PublicationError::BadEventName => 4,
        PublicationError::BadId => 5,
    }
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
    if cfg.zmq_subscribe == SubscribeMode::All {
        // Every message is taken; exact channel matching happens in each
        // core's registry (ZeroMQ subscriptions are byte prefixes: "news"
        // would match "news2").
        sub.set_subscribe(b"")
            .map_err(|e| format!("zmq subscribe: {e}"))?;
        crate::ops::metrics::set_zmq_subscriptions(1);
    } else {
        // Replies to this gateway's connections, whichever they are: one
        // subscription (an address starts with the instance).
        let prefix =
            protocol::upstream::Address::instance_prefix(crate::upstream::addresses().instance());
        sub.set_subscribe(prefix.as_bytes())
            .map_err(|e| format!("zmq subscribe: {e}"))?;
    }
    // Peers connected now, as the socket's monitor reports them: `/readyz`
    // can require at least one.
    crate::ops::metrics::watch_zmq_peers(ctx, &sub, "ingest", crate::ops::metrics::add_zmq_peers)?;
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

/// Gives a checked publication its id: the publisher's, or this
/// gateway's next (`counter << ID_TAG_BITS | tag`, the counter one past the
/// highest id seen, `max_seen`, which starts at the process's first id; see
/// [`protocol::id::GATEWAY_ID_FLOOR`]). Err: the id does not advance its
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

/// Publications received per wake-up before the loop looks at the cores'
/// interest again.
const RECEIVE_BATCH_MESSAGES: usize = 1024;

/// The ingest loop; runs until the SUB socket fails or every core is gone.
/// `published_through` is the highest id seen (assigned or the
/// publisher's); it starts at the process's first id (see
/// [`protocol::id::first_gateway_id`]). `interest` is the cores' queue in
/// demand mode.
pub fn run(
    sub: zmq::Socket,
    cfg: &Config,
    cores: Vec<CoreInbox>,
    published_through: Arc<AtomicU64>,
    interest: Option<InterestRx>,
) {
    let mut state = Ingest {
        cfg,
        dropped: 0,
        max_seen: published_through.load(Ordering::Relaxed),
        // The process's first id carries its tag.
        tag: published_through.load(Ordering::Relaxed) & ID_TAG_MASK,
        last_ids: LastIds::new(cfg.channels_max),
        direct_ids: LastIds::new(cfg.channels_max),
        published_through,
        cores,
        demand: interest
            .as_ref()
            .map(|_| Demand::new(Duration::from_millis(cfg.zmq_unsubscribe_linger_ms))),
    };
    let mut items = vec![sub.as_poll_item(zmq::POLLIN)];
    if let Some(i) = &interest {
        items.push(zmq::PollItem::from_fd(i.doorbell.as_raw_fd(), zmq::POLLIN));
    }
    // Demand mode wakes at least once a second to let lingering channels go.
    let timeout_ms = if interest.is_some() { 1000 } else { -1 };
    loop {
        match zmq::poll(&mut items, timeout_ms) {
            Ok(_) | Err(zmq::Error::EINTR) => {}
            Err(e) => {
                warn!(error = %e, "zmq poll failed; ingest stops");
                return;
            }
        }
        if let (Some(i), Some(demand)) = (&interest, &mut state.demand) {
            crate::sys::eventfd_clear(&i.doorbell);
            let now = Instant::now();
            // Every queued change first, so a channel is never dropped
            // while a core's "first subscriber" for it waits here.
            for change in i.rx.try_iter() {
                let name = match &change {
                    Interest::On(name) => Some(name.clone()),
                    Interest::Off(_) => None,
                };
                if demand.apply(change, now) == Upstream::Subscribe {
                    let name = name.unwrap_or_default();
                    if let Err(e) = sub.set_subscribe(name.as_bytes()) {
                        warn!(channel = &*name, error = %e, "zmq subscribe failed");
                    }
                    debug!(channel = &*name, "subscribed upstream");
                }
            }
            for name in demand.expire(now) {
                if let Err(e) = sub.set_unsubscribe(name.as_bytes()) {
                    warn!(channel = &*name, error = %e, "zmq unsubscribe failed");
                }
                debug!(
                    channel = &*name,
                    "unsubscribed upstream: no subscriber for the linger"
                );
                for core in &state.cores {
                    core.deliver(ToCore::Unsubscribed(name.clone()));
                }
            }
            crate::ops::metrics::set_zmq_subscriptions(demand.len() as u64);
        }
        for _ in 0..RECEIVE_BATCH_MESSAGES {
            let frames = match sub.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => break,
                Err(zmq::Error::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "zmq receive failed; ingest stops");
                    return;
                }
            };
            if !state.publication(&frames) {
                info!("no core is running; ingest stops");
                return;
            }
        }
    }
}

/// The ingest thread's state between publications.
struct Ingest<'a> {
    cfg: &'a Config,
    dropped: u64,
    max_seen: u64,
    tag: u64,
    last_ids: LastIds,
    /// The last id of each connection messages went to (`zmq_redundant`),
    /// apart from the channels', so that many connections answered do not
    /// push the channels' ids out.
    direct_ids: LastIds,
    published_through: Arc<AtomicU64>,
    cores: Vec<CoreInbox>,
    demand: Option<Demand>,
}

impl Ingest<'_> {
    /// Checks one publication, gives it its id and hands it to every core.
    /// False when no core is left.
    fn publication(&mut self, frames: &[Vec<u8>]) -> bool {
        crate::ops::metrics::note_message_in();
        let limits = PublicationLimits {
            channel_name_bytes_max: self.cfg.channel_name_bytes_max,
            payload_bytes_max: self.cfg.publish_payload_bytes_max,
        };
        let checked = match check_frames(frames, &limits) {
            Ok(checked) => checked,
            Err(e) => {
                crate::ops::metrics::note_dropped(metric_reason(&e));
                self.dropped += 1;
                warn!(error = ?e, dropped_total = self.dropped, "publication dropped");
                return true;
            }
        };
        if self.cfg.zmq_redundant {
            // Every copy but the first of each publication is dropped by
            // its id: the channel's (below), or a connection's here.
            let Some(id) = checked.id else {
                crate::ops::metrics::note_dropped(10);
                self.dropped += 1;
                warn!(
                    channel = checked.channel,
                    dropped_total = self.dropped,
                    "publication dropped: no publisher id, and the ZeroMQ endpoints are \
                     redundant (zmq_redundant): its copies could not be told apart"
                );
                return true;
            };
            if checked.connection.is_some() && self.direct_ids.advance(checked.channel, id).is_err()
            {
                crate::ops::metrics::note_dropped(6);
                return true;
            }
        }
        if let Some(to) = checked.connection {
            return self.direct(to, &checked);
        }
        if let Some(demand) = &self.demand {
            if !demand.wants(checked.channel) {
                // A longer name let through by a prefix subscription, or one
                // still in flight when its channel was unsubscribed: nobody
                // here wants it.
                crate::ops::metrics::note_dropped(8);
                debug!(
                    channel = checked.channel,
                    "publication on a channel not subscribed"
                );
                return true;
            }
        }
        // Only this thread assigns ids, so the order of this loop is the
        // order of the ids.
        let id = match assign_id(&checked, &mut self.max_seen, &mut self.last_ids, self.tag) {
            Ok(id) => id,
            // The design with redundant forwarders: each publication comes
            // once through each, and every copy after the first is not
            // after the channel's last id. Counted, not an error.
            Err(IdRefusal::NotAfterLast { last }) => {
                crate::ops::metrics::note_dropped(6);
                debug!(
                    channel = checked.channel,
                    id = ?checked.id,
                    last,
                    "publication dropped: a duplicate (its id is not after the channel's last)"
                );
                return true;
            }
            Err(IdRefusal::Exhausted) => {
                crate::ops::metrics::note_dropped(7);
                self.dropped += 1;
                warn!(
                    channel = checked.channel,
                    dropped_total = self.dropped,
                    "publication dropped: no id is left after 2^64 - 1"
                );
                return true;
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
        self.published_through
            .store(self.max_seen, Ordering::Release);
        let mut alive = 0;
        for core in &self.cores {
            if core.deliver(ToCore::Message(msg.clone())) {
                alive += 1;
            }
        }
        alive > 0
    }

    /// A message for one connection: to its core, if it is one of this
    /// gateway's (every gateway gets it with `zmq_subscribe = all`).
    fn direct(&mut self, to: protocol::upstream::Address, checked: &Checked) -> bool {
        let core = self.cores.get(usize::from(to.core));
        let Some(core) = core.filter(|_| crate::upstream::addresses().is_ours(&to)) else {
            crate::ops::metrics::note_dropped(9);
            debug!(
                to = checked.channel,
                "message for a connection of another gateway"
            );
            return true;
        };
        let msg = Message::encode(
            0,
            checked.channel,
            checked.event.as_deref(),
            checked.payload,
        );
        core.deliver(ToCore::Direct {
            key: to.key,
            serial: to.serial,
            msg: Arc::new(msg),
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::id::GATEWAY_ID_FLOOR;

    fn checked<'a>(channel: &'a str, id: Option<u64>) -> Checked<'a> {
        Checked {
            channel,
            connection: None,
            event: None,
            id,
            payload: b"",
        }
    }

    #[test]
    fn publisher_ids_must_increase_per_channel() {
        let tag = 0x2a;
        let first = protocol::id::first_gateway_id(1_800_000_000_000, tag as u16);
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
        let mut max_seen = protocol::id::first_gateway_id(1_800_000_000_000, 7);
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
    fn demand_subscribes_on_the_first_core_and_lets_go_after_the_linger() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut d = Demand::new(Duration::from_secs(60));
        let on = |n: &str| Interest::On(n.into());
        let off = |n: &str| Interest::Off(n.into());
        assert_eq!(d.apply(on("news"), t0), Upstream::Subscribe);
        // A second core with subscribers: already subscribed.
        assert_eq!(d.apply(on("news"), t0), Upstream::Nothing);
        assert!(d.wants("news") && !d.wants("news2") && !d.wants("new"));
        assert_eq!(d.apply(off("news"), t0 + s), Upstream::Nothing);
        // One core still has a subscriber: never expires.
        assert!(d.expire(t0 + 600 * s).is_empty());
        assert_eq!(d.apply(off("news"), t0 + 2 * s), Upstream::Nothing);
        assert!(d.expire(t0 + 61 * s).is_empty(), "within the linger");
        // A subscriber back within the linger keeps the subscription.
        assert_eq!(d.apply(on("news"), t0 + 30 * s), Upstream::Nothing);
        assert_eq!(d.apply(off("news"), t0 + 40 * s), Upstream::Nothing);
        assert!(d.expire(t0 + 99 * s).is_empty());
        assert_eq!(d.expire(t0 + 100 * s), vec![Box::<str>::from("news")]);
        assert!(!d.wants("news") && d.len() == 0);
        // Gone, a channel is subscribed again by its next subscriber.
        assert_eq!(d.apply(on("news"), t0 + 101 * s), Upstream::Subscribe);
        // An unknown channel leaving changes nothing.
        assert_eq!(d.apply(off("other"), t0), Upstream::Nothing);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn one_encoding_per_transport() {
        let msg = Message::encode(42, "news", None, b"hi");
        assert_eq!(msg.ws[0], 0x81, "a text frame with FIN");
        // One chunk: its size in hex, then the event.
        let event = crate::core::sse_bytes(&msg.sse, false);
        assert!(event.starts_with(b"id: 42\n") && event.ends_with(b"\n\n"));
        assert!(msg
            .sse
            .starts_with(format!("{:x}\r\nid: 42\n", event.len()).as_bytes()));
        assert!(msg.poll_response().starts_with(b"HTTP/1.1 200 OK\r\n"));
        let body_at = msg
            .poll_response()
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
            + 4;
        let body: serde_json::Value =
            serde_json::from_slice(&msg.poll_response()[body_at..]).unwrap();
        assert_eq!(body["cursor"], "42");
        assert_eq!(body["messages"][0]["data"], "hi");
    }
}
