//! A core's side of two-way traffic: the messages and control messages of
//! WebSockets on the gateway's subprotocol and of gRPC `Connect` calls,
//! what goes upstream for them (and for presence), and the
//! acknowledgements and resumptions when the upstream socket has room
//! again (see `crate::upstream`).

use std::sync::atomic::Ordering;

use bytes::Bytes;
use protocol::deflate::Window;
use protocol::envelope;
use protocol::token::Grant;
use protocol::upstream::{self, ClientMessage, Kind, Ref, SendLimits, UpstreamMeta, USER_PREFIX};
use tracing::debug;

use crate::core::conn::{Identity, TwoWay, WsSession};
use crate::core::{events, Conn, Core, State, Transport};
use crate::ingest::Message;
use crate::ops::metrics::note_upstream_refused;
use crate::upstream::{Ack, Offered, Outgoing};

/// Reasons a client is told, in `UPSTREAM_REFUSALS` order where counted.
const NOT_CONFIGURED: &str = "upstream not configured";
const CHANNEL_NOT_ALLOWED: &str = "channel not allowed";
const TOO_MANY_CHANNELS: &str = "too many channels";
/// As a WebSocket's malformed message is told (`ClientRule::BadChannelName`).
const BAD_CHANNEL: &str = "bad channel name";

/// How a client's transport writes the answers to what it sent: JSON
/// frames on a WebSocket, `ServerFrame`s on a gRPC stream. Each appends
/// to the bytes the caller queues once.
pub trait Answers {
    fn ack(&mut self, reference: &Ref);
    fn error(&mut self, reference: Option<&Ref>, reason: &str, channel: Option<&str>);
    fn gap(&mut self, channel: &str);
    fn message(&mut self, m: &Message);
}

/// Answers on the WebSocket subprotocol. Acks, errors and gaps are short
/// and go uncompressed; a message (history replayed by a subscribe) is
/// the frame every subscriber of its kind gets, compressed on a
/// connection that negotiated permessage-deflate (`deflate`: its core and
/// window).
pub struct WsAnswers<'a> {
    pub out: &'a mut Vec<u8>,
    pub deflate: Option<(&'a Core, Window)>,
}

impl Answers for WsAnswers<'_> {
    fn ack(&mut self, reference: &Ref) {
        upstream::encode_ack(reference, self.out);
    }
    fn error(&mut self, reference: Option<&Ref>, reason: &str, channel: Option<&str>) {
        upstream::encode_error(reference, reason, channel, self.out);
    }
    fn gap(&mut self, channel: &str) {
        envelope::encode_ws_gap(channel, self.out);
    }
    fn message(&mut self, m: &Message) {
        let frame = match self.deflate {
            Some((core, window)) => core.ws_frame(m, Some(window)),
            None => &m.ws,
        };
        self.out.extend_from_slice(frame);
    }
}

/// Answers on a gRPC `Connect` stream (length-prefixed `ServerFrame`s).
pub struct GrpcAnswers<'a>(pub &'a mut Vec<u8>);

impl Answers for GrpcAnswers<'_> {
    fn ack(&mut self, reference: &Ref) {
        protocol::grpc::encode_ack(&reference.text(), self.0);
    }
    fn error(&mut self, reference: Option<&Ref>, reason: &str, channel: Option<&str>) {
        let reference = reference.map(Ref::text).unwrap_or_default();
        protocol::grpc::encode_error(&reference, reason, channel, self.0);
    }
    fn gap(&mut self, channel: &str) {
        self.0
            .extend_from_slice(&protocol::grpc::gap_message(channel));
    }
    fn message(&mut self, m: &Message) {
        self.0.extend_from_slice(m.grpc());
    }
}

impl Core {
    /// The send limits of every connection.
    pub fn send_limits(&self) -> SendLimits {
        SendLimits {
            messages_per_s: self.cfg.send_messages_per_s,
            bytes_per_s: self.cfg.send_bytes_per_s,
        }
    }

    /// Milliseconds of this core's clock, for the send budgets.
    pub fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Adds a token's user channel (`#` and its `sub`) to the channels
    /// asked for, when user channels are on: the hubs' messages for this
    /// user reach every stream of it, whatever its transport.
    pub fn add_user_channel(&self, channels: &mut Vec<String>, grant: Option<&Grant>) {
        let Some(sub) = grant
            .and_then(|g| g.sub.as_deref())
            .filter(|_| self.cfg.user_channels)
        else {
            return;
        };
        match upstream::user_channel(sub, self.cfg.channel_name_bytes_max) {
            Some(name) if !channels.contains(&name) => channels.push(name),
            Some(_) => {}
            None => debug!(
                "token sub cannot name a user channel (too long, or a space, quote or backslash)"
            ),
        }
    }

    /// The two-way state of a client that may send: its send budget, and
    /// with a token what it may read and send and what the hubs are told
    /// about it.
    pub fn new_two_way(&self, grant: Option<Box<Grant>>) -> Box<TwoWay> {
        let identity = grant.map(|g| {
            let claims = claims_for(self.cfg, &g);
            Identity::new(g.sub.as_deref(), g.patterns(), &g.send, claims.as_deref())
        });
        Box::new(TwoWay {
            message: Vec::new(),
            binary: false,
            paused: false,
            budget: upstream::SendBudget::new(&self.send_limits(), self.clock_ms()),
            identity,
        })
    }

    /// The address of connection `key`.
    pub fn address_of(&self, key: u32, c: &Conn) -> upstream::Address {
        crate::upstream::addresses().of(self.index, key, c.serial)
    }

    /// Acts on one whole message from a two-way WebSocket (`c`, slab key
    /// `key`): sends it upstream, or subscribes or unsubscribes; its
    /// answer (an ack, or an error frame: the connection stays) goes to
    /// `out`, which the caller writes once for all the messages of a read.
    pub fn client_message(
        &self,
        c: &mut Conn,
        key: u32,
        message: &[u8],
        binary: bool,
        out: &mut Vec<u8>,
    ) {
        let cfg = self.cfg;
        let parsed = upstream::parse_client_message(message, cfg.channel_name_bytes_max);
        let out = &mut WsAnswers {
            out,
            deflate: c.state.ws_deflate().map(|window| (self, window)),
        };
        match parsed {
            Err(e) => {
                note_upstream_refused(0);
                debug!(peer = %c.client(), rule = e.rule.reason(), "client message refused");
                out.error(e.reference.as_ref(), e.rule.reason(), None);
            }
            Ok(ClientMessage::Send {
                channel,
                reference,
                payload,
            }) => self.send_upstream(c, key, channel, reference, payload, binary, out),
            Ok(ClientMessage::Subscribe {
                channels,
                since,
                reference,
            }) => self.subscribe_more(c, key, channels, since, reference, out),
            Ok(ClientMessage::Unsubscribe {
                channels,
                reference,
            }) => self.unsubscribe_some(c, key, &channels, reference, out),
        }
    }

    /// Acts on one frame of a gRPC `Connect` call, as [`Core::client_message`]
    /// does for a WebSocket's message; its answers go to `out`.
    pub fn grpc_client_frame(
        &self,
        c: &mut Conn,
        key: u32,
        frame: protocol::grpc::ClientFrame,
        out: &mut Vec<u8>,
    ) {
        use protocol::grpc::client_frame::Kind as K;
        let out = &mut GrpcAnswers(out);
        let max = self.cfg.channel_name_bytes_max;
        let bad_channel = |name: &str| !protocol::channel::valid_channel_name(name.as_bytes(), max);
        match frame.kind {
            None => {
                note_upstream_refused(0);
                out.error(None, "empty frame", None);
            }
            Some(K::Send(send)) => {
                let reference = Ref::of_text(&send.r#ref);
                if bad_channel(&send.channel) {
                    note_upstream_refused(0);
                    return out.error(reference.as_ref(), BAD_CHANNEL, Some(&send.channel));
                }
                let channel = send.channel;
                self.send_upstream(c, key, &channel, reference, &send.payload, send.binary, out)
            }
            Some(K::Subscribe(more)) => {
                let reference = Ref::of_text(&more.r#ref);
                if let Some(bad) = more.channels.iter().find(|ch| bad_channel(ch)) {
                    note_upstream_refused(0);
                    return out.error(reference.as_ref(), BAD_CHANNEL, Some(bad));
                }
                self.subscribe_more(c, key, more.channels, more.since, reference, out)
            }
            Some(K::Unsubscribe(less)) => {
                let reference = Ref::of_text(&less.r#ref);
                self.unsubscribe_some(c, key, &less.channels, reference, out)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_upstream(
        &self,
        c: &mut Conn,
        key: u32,
        channel: &str,
        reference: Option<Ref>,
        payload: &[u8],
        binary: bool,
        out: &mut impl Answers,
    ) {
        let refuse = |index, reason: &str, channel, out: &mut dyn Answers| {
            note_upstream_refused(index);
            out.error(reference.as_ref(), reason, channel);
        };
        let transport = transport_name(c.transport());
        let Some(up) = &self.upstream else {
            return refuse(4, NOT_CONFIGURED, None, out);
        };
        let limits = self.send_limits();
        let now_ms = self.clock_ms();
        let address = self.address_of(key, c);
        let serial = c.serial;
        let Some(two_way) = two_way_of(c) else { return };
        if two_way
            .identity
            .as_ref()
            .is_some_and(|id| !id.may_send(channel))
        {
            return refuse(1, CHANNEL_NOT_ALLOWED, Some(channel), out);
        }
        if let Err(over) = two_way.budget.take(&limits, now_ms, payload.len()) {
            let index = match over {
                upstream::RateExceeded::MessagesPerSecond => 2,
                upstream::RateExceeded::BytesPerSecond => 3,
            };
            return refuse(index, over.reason(), Some(channel), out);
        }
        let identity = two_way.identity.as_ref();
        let mut meta = Vec::with_capacity(64);
        upstream::encode_upstream_meta(
            &UpstreamMeta {
                transport,
                sub: identity.and_then(Identity::sub),
                claims: identity.and_then(Identity::claims),
                binary: Some(binary),
                ..UpstreamMeta::default()
            },
            &mut meta,
        );
        let mut message = Outgoing::new(Kind::Message, &address, channel, meta, payload);
        message.ack = reference.clone().map(|reference| Ack {
            key,
            serial,
            reference,
        });
        match up.offer(message) {
            Offered::Sent => {
                if let Some(r) = &reference {
                    out.ack(r);
                }
            }
            Offered::Waiting => {
                // The hubs are behind: this client is not read until the
                // outbox has gone (TCP pushes back on it); its ack goes
                // with its message.
                if !two_way.paused {
                    two_way.paused = true;
                    up.pause(key, serial);
                }
            }
        }
    }

    fn subscribe_more(
        &self,
        c: &mut Conn,
        key: u32,
        channels: Vec<String>,
        since: Option<u64>,
        reference: Option<Ref>,
        out: &mut impl Answers,
    ) {
        let identity = two_way_of(c).and_then(|t| t.identity.as_ref());
        if let Some(refused) = channels
            .iter()
            .find(|ch| identity.is_some_and(|i| !i.may_read(ch)))
        {
            note_upstream_refused(1);
            return out.error(reference.as_ref(), CHANNEL_NOT_ALLOWED, Some(refused));
        }
        let mut registry = self.registry.borrow_mut();
        let subscribed: Vec<&str> = c
            .channels
            .iter()
            .filter_map(|&id| registry.channels.get(id as usize))
            .map(|ch| &*ch.name)
            .collect();
        let mut new: Vec<String> = Vec::new();
        for ch in channels {
            if !subscribed.contains(&ch.as_str()) && !new.contains(&ch) {
                new.push(ch);
            }
        }
        // The user channel is the gateway's, not counted.
        let own = subscribed
            .iter()
            .filter(|n| !n.starts_with(USER_PREFIX as char))
            .count();
        if own + new.len() > self.cfg.channels_per_connection_max {
            note_upstream_refused(7);
            return out.error(reference.as_ref(), TOO_MANY_CHANNELS, None);
        }
        let published = self.published_through.load(Ordering::Acquire);
        let (ids, resume) = registry.subscribe(
            key,
            &new,
            since,
            published,
            self.cfg.channels_max,
            self.cfg.history_messages * new.len().max(1),
        );
        drop(registry);
        let mut all = c.channels.to_vec();
        all.extend_from_slice(&ids);
        c.channels = all.into_boxed_slice();
        // The connection's skip is its first cursor (for messages still in
        // flight when it subscribed); it must not hold back the channels
        // added now, whose cursor is their own (or none): a publisher may
        // number them far below the first.
        let from = if resume.reset { 0 } else { since.unwrap_or(0) };
        c.skip_through = c.skip_through.min(from);
        if let Some(r) = &reference {
            out.ack(r);
        }
        for gap in &resume.gaps {
            out.gap(gap);
        }
        for m in &resume.messages {
            out.message(m);
        }
        for ch in &new {
            self.presence(Kind::Subscribe, c, key, ch, None);
        }
    }

    fn unsubscribe_some(
        &self,
        c: &mut Conn,
        key: u32,
        channels: &[String],
        reference: Option<Ref>,
        out: &mut impl Answers,
    ) {
        let mut registry = self.registry.borrow_mut();
        let (leave, keep): (Vec<u32>, Vec<u32>) = c.channels.iter().partition(|&&id| {
            registry
                .channels
                .get(id as usize)
                .is_some_and(|ch| channels.iter().any(|n| *n == *ch.name))
        });
        let left: Vec<Box<str>> = leave
            .iter()
            .filter_map(|&id| registry.channels.get(id as usize))
            .map(|ch| (*ch.name).into())
            .collect();
        registry.unsubscribe(key, &leave);
        drop(registry);
        c.channels = keep.into_boxed_slice();
        if let Some(r) = &reference {
            out.ack(r);
        }
        for name in &left {
            self.presence(Kind::Unsubscribe, c, key, name, None);
        }
    }

    /// Sends a presence event for stream `c` (slab key `key`) upstream,
    /// when presence is on: `connect`, `disconnect` (with why), `subscribe`
    /// or `unsubscribe` (with the channel).
    pub fn presence(
        &self,
        kind: Kind,
        c: &Conn,
        key: u32,
        channel: &str,
        gone: Option<(&str, bool)>,
    ) {
        let Some(up) = self
            .upstream
            .as_ref()
            .filter(|_| self.cfg.upstream_presence)
        else {
            return;
        };
        let Some(stream) = c.stream else { return };
        let two_way = match &c.state {
            State::WebSocket { session, .. } => session.two_way.as_deref(),
            State::GrpcStream { two_way } => two_way.as_deref(),
            _ => None,
        };
        let identity = two_way.and_then(|t| t.identity.as_ref());
        let sub = match identity.and_then(Identity::sub) {
            Some(sub) => Some(sub.to_string()),
            None => self.user_of(c),
        };
        let mut meta = Vec::with_capacity(96);
        upstream::encode_upstream_meta(
            &UpstreamMeta {
                transport: transport_name(stream),
                sub: sub.as_deref(),
                claims: identity.and_then(Identity::claims),
                reason: gone.map(|(reason, _)| reason),
                reconnect: gone.is_some_and(|(_, back)| back),
                ..UpstreamMeta::default()
            },
            &mut meta,
        );
        let address = self.address_of(key, c);
        up.offer(Outgoing::new(kind, &address, channel, meta, &[]));
    }

    /// A stream opened: `connect`, then `subscribe` for each channel it
    /// asked for (its user channel is implied by its `sub`).
    pub fn presence_open(&self, key: u32) {
        if self.upstream.is_none() || !self.cfg.upstream_presence {
            return;
        }
        let conns = self.conns.borrow();
        let Some(c) = conns.get(key as usize) else {
            return;
        };
        self.presence(Kind::Connect, c, key, "", None);
        let names: Vec<Box<str>> = {
            let registry = self.registry.borrow();
            c.channels
                .iter()
                .filter_map(|&id| registry.channels.get(id as usize))
                .map(|ch| Box::<str>::from(&*ch.name))
                .filter(|n| !n.starts_with(USER_PREFIX as char))
                .collect()
        };
        for name in &names {
            self.presence(Kind::Subscribe, c, key, name, None);
        }
    }

    /// The `sub` of a connection's user channel, if it has one.
    fn user_of(&self, c: &Conn) -> Option<String> {
        let registry = self.registry.borrow();
        c.channels
            .iter()
            .filter_map(|&id| registry.channels.get(id as usize))
            .find_map(|ch| ch.name.strip_prefix(USER_PREFIX as char))
            .map(str::to_string)
    }

    /// The upstream socket may have room: sends what waits, acknowledges
    /// what went, and reads again the clients that were paused once
    /// nothing waits.
    pub fn flush_upstream(&self) {
        let Some(up) = &self.upstream else { return };
        let flushed = up.flush();
        let max = self.cfg.outbound_queue_bytes_max;
        let mut conns = self.conns.borrow_mut();
        for ack in flushed.acks {
            let Some(c) = conns.get_mut(ack.key as usize) else {
                continue;
            };
            if c.serial != ack.serial {
                continue;
            }
            let mut out = Vec::new();
            match c.transport() {
                Transport::WebSocket => WsAnswers {
                    out: &mut out,
                    deflate: None,
                }
                .ack(&ack.reference),
                Transport::GrpcStream => GrpcAnswers(&mut out).ack(&ack.reference),
                _ => continue,
            }
            events::send(c, Bytes::from(out), max);
        }
        for (key, serial) in flushed.resumed {
            let Some(c) = conns.get_mut(key as usize) else {
                continue;
            };
            if c.serial != serial {
                continue;
            }
            if let Some(t) = two_way_of(c) {
                t.paused = false;
            }
            // Heard from: it was not read, not silent.
            c.last_heard_s = self.now_s();
            c.wake();
        }
    }
}

/// A WebSocket's two-way state, if it speaks the subprotocol.
pub fn two_way_of(c: &mut Conn) -> Option<&mut TwoWay> {
    match &mut c.state {
        State::WebSocket { session, .. } => session.two_way.as_deref_mut(),
        State::GrpcStream { two_way } => two_way.as_deref_mut(),
        _ => None,
    }
}

/// Whether a two-way WebSocket waits for room upstream (it is not read).
pub fn paused(session: &WsSession) -> bool {
    session.two_way.as_ref().is_some_and(|t| t.paused)
}

/// The name the hubs see for a stream's transport.
fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Sse => "sse",
        Transport::LongPoll => "longpoll",
        Transport::Http => "http",
        Transport::GrpcStream | Transport::Grpc => "grpc",
        _ => "websocket",
    }
}

/// The claims of `grant` the hubs are given (`upstream_claims`), as a JSON
/// object's text; None when it has none of them.
pub fn claims_for(cfg: &crate::config::Config, grant: &Grant) -> Option<Box<str>> {
    let claims: serde_json::Map<String, serde_json::Value> = cfg
        .upstream_claims
        .iter()
        .filter_map(|name| Some((name.clone(), grant.claims.get(name)?.clone())))
        .collect();
    (!claims.is_empty()).then(|| serde_json::Value::Object(claims).to_string().into())
}
