//! Channel name → local subscribers and history, for one core; what a
//! resuming client is owed.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::rc::Rc;
use std::sync::Arc;

use indexmap::IndexSet;
use protocol::id::{GATEWAY_ID_FLOOR, ID_TAG_MASK};
use slab::Slab;

use crate::ingest::{Interest, InterestTx, Message};

/// A channel as one core sees it: its local subscribers and its history.
pub(super) struct Channel {
    /// Shared with the table's key: one copy of the name.
    pub(super) name: Rc<str>,
    pub(super) subscribers: Subscribers,
    pub(super) history: VecDeque<Arc<Message>>,
    /// Highest id this channel's history has let go of: a cursor below it
    /// cannot be served completely.
    pub(super) evicted_through: u64,
}

/// A channel's local subscribers: slab keys, which this core hands out
/// (no client chooses them), so the hasher needs no random keys, and the
/// set carries none (16 bytes less on every channel, a user channel's
/// included).
pub(super) type Subscribers = IndexSet<u32, BuildHasherDefault<DefaultHasher>>;

/// Channel name → local subscribers and history, for one core.
pub struct Registry {
    pub(super) ids: HashMap<Rc<str>, u32>,
    pub(super) channels: Slab<Channel>,
    /// Channel ids in creation order, for evicting whole channels past
    /// `channels_max`.
    pub(super) age: VecDeque<u32>,
    /// Highest id of any message whose channel was evicted from the table, or
    /// that was published before this process started: a cursor at or below
    /// it on an unknown channel cannot be trusted.
    pub(super) forgotten_through: u64,
    /// This process's tag, the low bits of every id it assigns.
    pub(super) own_tag: u64,
    /// Messages pushed out of a channel's history by `history_messages`
    /// (for `/metrics`).
    pub evictions: u64,
    /// Demand mode: where this core reports a channel's first local
    /// subscriber and its last one leaving.
    pub(super) interest: Option<InterestTx>,
}

/// What a resuming client gets: messages after its cursor, and the channels
/// whose history no longer reaches back to it.
pub struct Resume {
    pub messages: Vec<Arc<Message>>,
    pub gaps: Vec<Box<str>>,
    /// Where the subscribed channels stand on this core: the highest id
    /// among their last messages (or, for a channel without one, the id
    /// below which it knows nothing). A client without a cursor, or one told
    /// of a gap, continues from here.
    pub present: u64,
    /// The cursor could not be used on some channel (it is not a position
    /// this core can place: from the future, or from this gateway's own
    /// sequence on a channel numbered by its publisher): that channel's
    /// whole history was replayed after its gap, and the connection must
    /// not skip live messages by that cursor.
    pub reset: bool,
}

impl Registry {
    pub(super) fn new(first_id: u64, interest: Option<InterestTx>) -> Registry {
        Registry {
            ids: HashMap::new(),
            channels: Slab::new(),
            age: VecDeque::new(),
            forgotten_through: first_id,
            own_tag: first_id & ID_TAG_MASK,
            evictions: 0,
            interest,
        }
    }

    /// Ingest no longer subscribes to `name` (demand mode): what is
    /// published on it from now on may never reach this core, so nothing
    /// before now can be resumed completely here. A channel without
    /// subscribers is forgotten; one that got a subscriber meanwhile (ingest
    /// subscribes again when it hears of it) loses its history, and its
    /// subscribers are returned to be told of the gap.
    pub(super) fn forget(&mut self, name: &str, published_through: u64) -> Option<&Subscribers> {
        self.forgotten_through = self.forgotten_through.max(published_through);
        let id = *self.ids.get(name)?;
        let ch = &mut self.channels[id as usize];
        if ch.subscribers.is_empty() {
            self.remove(id);
            return None;
        }
        ch.history.clear();
        ch.evicted_through = ch.evicted_through.max(published_through);
        Some(&self.channels[id as usize].subscribers)
    }

    pub(super) fn id_of(&mut self, name: &str, channels_max: usize) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        if self.channels.len() >= channels_max {
            self.evict_one();
        }
        let name: Rc<str> = name.into();
        let id = self.channels.insert(Channel {
            name: name.clone(),
            subscribers: Subscribers::default(),
            history: VecDeque::new(),
            // Whatever this channel had before it entered the table (before
            // this process started, or before it was evicted) is unknown.
            evicted_through: self.forgotten_through,
        }) as u32;
        self.ids.insert(name, id);
        self.age.push_back(id);
        id
    }

    /// Drops the oldest channel that has no subscribers. Bounded: looks at
    /// each channel at most once.
    pub(super) fn evict_one(&mut self) {
        for _ in 0..self.age.len() {
            let Some(id) = self.age.pop_front() else {
                return;
            };
            let Some(ch) = self.channels.get(id as usize) else {
                continue;
            };
            if ch.subscribers.is_empty() {
                self.remove(id);
                return;
            }
            self.age.push_back(id);
        }
    }

    pub(super) fn remove(&mut self, id: u32) {
        let ch = self.channels.remove(id as usize);
        let last = ch.history.back().map_or(ch.evicted_through, |m| m.id);
        self.forgotten_through = self.forgotten_through.max(last);
        self.ids.remove(&ch.name);
        self.age.retain(|&a| a != id);
    }

    /// Appends a message to its channel's history (entering the channel
    /// if need be) and returns the channel's id, and whether this message
    /// showed that the channel is numbered by its publisher below this
    /// gateway's own ids (subscribers waiting with a cursor of this
    /// gateway's sequence must then not skip by it).
    pub(super) fn record(
        &mut self,
        msg: &Arc<Message>,
        history_max: usize,
        channels_max: usize,
    ) -> (u32, bool) {
        let id = self.id_of(&msg.channel, channels_max);
        let ch = &mut self.channels[id as usize];
        let mut renumbered = false;
        if ch.history.is_empty() && msg.from_publisher {
            // The first message of a channel whose ids are the publisher's:
            // what it published before is unknown here, and its sequence
            // says where that ends (ids increase per channel).
            ch.evicted_through = msg.id - 1;
            renumbered = msg.id < GATEWAY_ID_FLOOR;
        }
        if ch.history.len() >= history_max {
            if let Some(old) = ch.history.pop_front() {
                ch.evicted_through = old.id;
                self.evictions += 1;
            }
        }
        ch.history.push_back(msg.clone());
        (id, renumbered)
    }

    /// Subscribes `conn` to `names` and returns what it missed after `since`.
    /// Runs without yielding, so no message can slip between the history it
    /// replays and the live messages that follow.
    pub fn subscribe(
        &mut self,
        conn: u32,
        names: &[String],
        since: Option<u64>,
        published_through: u64,
        channels_max: usize,
        replay_max: usize,
    ) -> (Box<[u32]>, Resume) {
        let mut ids = Vec::with_capacity(names.len());
        let own_tag = self.own_tag;
        let mut resume = Resume {
            messages: Vec::new(),
            gaps: Vec::new(),
            present: 0,
            reset: false,
        };
        for name in names {
            let id = self.id_of(name, channels_max);
            let ch = &mut self.channels[id as usize];
            if ch.subscribers.is_empty() {
                if let Some(interest) = &self.interest {
                    interest.send(Interest::On(name.as_str().into()));
                }
            }
            if ch.subscribers.capacity() == 0 {
                // Most channels have few subscribers per core (a user
                // channel, one or two): the set would otherwise start with
                // room for four.
                ch.subscribers.reserve_exact(1);
            }
            ch.subscribers.insert(conn);
            ids.push(id);
            let last = ch.history.back();
            resume.present = resume
                .present
                .max(last.map_or(ch.evicted_through, |m| m.id));
            let Some(since) = since else { continue };
            // A cursor this core cannot place is a gap, then the whole
            // history: one from the future (another process) on a channel
            // whose ids this process issues, or one of this gateway's own
            // sequence (a "nothing yet" handed out before the channel had a
            // message) on a channel numbered by its publisher below it. A
            // publisher's cursor merely ahead of this core comes from a
            // gateway that got the message a moment earlier: taken at its
            // word.
            let unusable = match last {
                Some(m) if m.from_publisher => {
                    since > m.id && since >= GATEWAY_ID_FLOOR && m.id < GATEWAY_ID_FLOOR
                }
                // On a channel this gateway numbers: from the future, or
                // another process's id (another tag), however close its
                // number.
                _ => {
                    since > published_through
                        || (since >= GATEWAY_ID_FLOOR && since & ID_TAG_MASK != own_tag)
                }
            };
            // A cursor from before what this core remembers is a gap too,
            // never a guess.
            if unusable || ch.evicted_through > since {
                resume.gaps.push(name.as_str().into());
            }
            let after = if unusable { 0 } else { since };
            resume.reset |= unusable;
            resume
                .messages
                .extend(ch.history.iter().filter(|m| m.id > after).cloned());
        }
        // Several channels: deliver in id order, as live delivery would.
        resume.messages.sort_by_key(|m| m.id);
        resume.messages.truncate(replay_max);
        (ids.into_boxed_slice(), resume)
    }

    pub fn unsubscribe(&mut self, conn: u32, channels: &[u32]) {
        for &id in channels {
            let Some(ch) = self.channels.get_mut(id as usize) else {
                continue;
            };
            if ch.subscribers.swap_remove(&conn) && ch.subscribers.is_empty() {
                if let Some(interest) = &self.interest {
                    interest.send(Interest::Off((*ch.name).into()));
                }
            }
            // A channel nobody listens to and nothing was published on would
            // otherwise let clients grow the table with made-up names.
            if ch.subscribers.is_empty() && ch.history.is_empty() {
                self.remove(id);
            }
        }
    }
}
