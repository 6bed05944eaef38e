//! ZeroMQ ingest: one thread owns the SUB socket, checks each publication,
//! gives it the next id, encodes it once per transport and hands the same
//! `Arc<Message>` to every core.
//!
//! Frames of a publication: `[channel, payload]` or `[channel, payload, meta]`
//! where meta is a JSON object; today it knows one key, `"event"` (the SSE
//! event name). Anything else is dropped with a warning: a publisher bug
//! should be loud, not silently half-delivered.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use crossbeam_channel::Sender;
use protocol::envelope::{self, Publication};
use serde::Deserialize;
use tracing::{info, warn};

use crate::config::Config;

/// One published message, encoded once for each transport. Cores and
/// connections share it by reference count; no subscriber gets a copy.
#[derive(Debug)]
pub struct Message {
    pub id: u64,
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
        envelope::longpoll_response(&[&poll_item], id, &[], true, &mut poll_response);
        Message {
            id,
            channel: channel.into(),
            ws: ws.into(),
            sse: sse.into(),
            poll_item: poll_item.into(),
            poll_response: poll_response.into(),
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
}

/// Why a publication was dropped at ingest.
#[derive(Debug, PartialEq, Eq)]
pub enum IngestError {
    WrongFrameCount(usize),
    BadChannelName,
    PayloadTooLarge { size: usize, max_size: usize },
    BadMeta(String),
    BadEventName,
}

/// Longest SSE event name a publisher may set.
const EVENT_NAME_BYTES_MAX: usize = 64;

/// Checks a publication's frames and returns (channel, event, payload).
pub fn check_frames<'a>(
    frames: &'a [Vec<u8>],
    cfg: &Config,
) -> Result<(&'a str, Option<String>, &'a [u8]), IngestError> {
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
    }
    Ok((channel, event, payload))
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

/// The ingest loop; runs until the SUB socket fails or every core is gone.
pub fn run(sub: zmq::Socket, cfg: &Config, cores: Vec<CoreInbox>, last_id: Arc<AtomicU64>) {
    let mut dropped: u64 = 0;
    loop {
        let frames = match sub.recv_multipart(0) {
            Ok(frames) => frames,
            Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                warn!(error = %e, "zmq receive failed; ingest stops");
                return;
            }
        };
        let (channel, event, payload) = match check_frames(&frames, cfg) {
            Ok(parts) => parts,
            Err(e) => {
                dropped += 1;
                warn!(error = ?e, dropped_total = dropped, "publication dropped");
                continue;
            }
        };
        // Only this thread assigns ids, so a plain increment is the order.
        let id = last_id.load(Ordering::Relaxed) + 1;
        let msg = Arc::new(Message::encode(id, channel, event.as_deref(), payload));
        last_id.store(id, Ordering::Release);
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
            ("news", None, &b"hello"[..])
        );
        let three = frames(&[b"news", b"hello", br#"{"event":"price"}"#]);
        let (_, event, _) = check_frames(&three, &cfg).unwrap();
        assert_eq!(event.as_deref(), Some("price"));
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
