//! The two-way side of the contract: a WebSocket client on the gateway's
//! subprotocol (`gateway.v1`) and a hub worker (a ZeroMQ PULL socket on the
//! gateway's upstream endpoint, and a PUB socket to answer with).

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::Message;
use tungstenite::WebSocket;

use crate::{is_read_timeout, IO_TIMEOUT};

/// The gateway's WebSocket subprotocol.
pub const SUBPROTOCOL: &str = "gateway.v1";

/// What a two-way client receives: a message (meta line and payload), or
/// a control frame (`welcome`, `ack`, `error`).
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Message {
        meta: Value,
        payload: Vec<u8>,
        binary: bool,
    },
    Control(Value),
}

impl Frame {
    /// The message's channel and payload as text; panics on a control frame.
    pub fn message(&self) -> (String, String) {
        match self {
            Frame::Message { meta, payload, .. } => (
                meta["channel"].as_str().unwrap_or_default().to_string(),
                String::from_utf8_lossy(payload).into_owned(),
            ),
            Frame::Control(c) => panic!("expected a message, got {c}"),
        }
    }

    /// The control frame; panics on a message.
    pub fn control(&self) -> &Value {
        match self {
            Frame::Control(c) => c,
            Frame::Message { meta, .. } => panic!("expected a control frame, got message {meta}"),
        }
    }
}

/// A WebSocket on the gateway's subprotocol.
pub struct TwoWayClient {
    pub ws: WebSocket<TcpStream>,
    /// Its address, from the welcome frame.
    pub address: String,
    pub path: String,
}

impl TwoWayClient {
    /// Connects to `path` offering the subprotocol (and a bearer token, if
    /// given), checks the answer names it, and reads the welcome.
    pub fn connect(addr: SocketAddr, path: &str, token: Option<&str>) -> TwoWayClient {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (ws, response) = tungstenite::client::client(request, stream)
            .unwrap_or_else(|e| panic!("two-way handshake for {path}: {e:?}"));
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some(SUBPROTOCOL),
            "the gateway answers with its subprotocol"
        );
        let mut client = TwoWayClient {
            ws,
            address: String::new(),
            path: path.to_string(),
        };
        let welcome = client.next_frame();
        let welcome = welcome.control();
        assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
        client.address = welcome["address"]
            .as_str()
            .expect("the welcome names the address")
            .to_string();
        assert_eq!(client.address.len(), 52, "{welcome}");
        client
    }

    /// Sends a message on `channel` (text), with a `ref` if given.
    pub fn send(&mut self, channel: &str, reference: Option<&str>, payload: &str) {
        let mut meta = serde_json::json!({ "channel": channel });
        if let Some(r) = reference {
            meta["ref"] = r.into();
        }
        self.send_raw(Message::Text(format!("{meta}\n{payload}")));
    }

    /// Sends a control message (`{"type":"subscribe",…}`).
    pub fn control(&mut self, control: &Value) {
        self.send_raw(Message::Text(control.to_string()));
    }

    pub fn send_raw(&mut self, message: Message) {
        self.ws
            .send(message)
            .unwrap_or_else(|e| panic!("ws {}: send failed: {e:?}", self.path));
    }

    /// The next data frame, parsed (pings and pongs skipped).
    pub fn next_frame(&mut self) -> Frame {
        loop {
            let (bytes, binary) = match self.ws.read() {
                Ok(Message::Text(t)) => (t.into_bytes(), false),
                Ok(Message::Binary(b)) => (b, true),
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Ok(other) => panic!("ws {}: expected a frame, got {other:?}", self.path),
                Err(tungstenite::Error::Io(e)) if is_read_timeout(&e) => {
                    panic!("ws {}: nothing within {IO_TIMEOUT:?}", self.path)
                }
                Err(e) => panic!("ws {}: read failed: {e:?}", self.path),
            };
            return parse_frame(&bytes, binary, &self.path);
        }
    }

    /// The next data frame if one comes within `limit` (for probing a
    /// subscription that may not be there yet).
    pub fn try_next_frame(&mut self, limit: Duration) -> Option<Frame> {
        self.ws.get_ref().set_read_timeout(Some(limit)).unwrap();
        let got = match self.ws.read() {
            Ok(Message::Text(t)) => Some((t.into_bytes(), false)),
            Ok(Message::Binary(b)) => Some((b, true)),
            Ok(_) => None,
            Err(tungstenite::Error::Io(e)) if is_read_timeout(&e) => None,
            Err(e) => panic!("ws {}: read failed: {e:?}", self.path),
        };
        self.ws
            .get_ref()
            .set_read_timeout(Some(IO_TIMEOUT))
            .unwrap();
        got.map(|(bytes, binary)| parse_frame(&bytes, binary, &self.path))
    }

    /// The next control frame, messages before it returned too.
    pub fn next_control(&mut self) -> (Value, Vec<Frame>) {
        let mut before = Vec::new();
        loop {
            match self.next_frame() {
                Frame::Control(c) => return (c, before),
                m => before.push(m),
            }
        }
    }
}

/// A frame's meta line and payload.
fn parse_frame(bytes: &[u8], binary: bool, context: &str) -> Frame {
    let nl = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    let meta: Value = serde_json::from_slice(&bytes[..nl]).unwrap_or_else(|e| {
        panic!(
            "ws {context}: not a meta line ({e}): {:?}",
            String::from_utf8_lossy(bytes)
        )
    });
    let payload = bytes.get(nl + 1..).unwrap_or_default().to_vec();
    if meta.get("type").is_some() {
        assert!(payload.is_empty(), "a control frame has no payload: {meta}");
        Frame::Control(meta)
    } else {
        Frame::Message {
            meta,
            payload,
            binary,
        }
    }
}

/// One message the gateway sent upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub kind: String,
    pub address: String,
    pub channel: String,
    pub meta: Value,
    pub payload: Vec<u8>,
}

impl Upstream {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A hub worker: a PULL socket connected to a gateway's upstream endpoint.
pub struct Hub {
    pull: zmq::Socket,
    _ctx: zmq::Context,
}

impl Hub {
    /// Connects to `endpoint` (a gateway's `upstream=` endpoint).
    pub fn connect(endpoint: &str) -> Hub {
        let ctx = zmq::Context::new();
        let pull = ctx.socket(zmq::PULL).unwrap();
        pull.set_linger(0).unwrap();
        // A hub that stops reading fills up soon (the backpressure tests).
        pull.set_rcvhwm(100).unwrap();
        pull.connect(endpoint)
            .unwrap_or_else(|e| panic!("hub connect {endpoint}: {e}"));
        Hub { pull, _ctx: ctx }
    }

    /// Binds a PULL socket on a free port (for `--upstream-connect`).
    pub fn bind() -> (Hub, String) {
        let ctx = zmq::Context::new();
        let pull = ctx.socket(zmq::PULL).unwrap();
        pull.set_linger(0).unwrap();
        pull.set_rcvhwm(100).unwrap();
        pull.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = pull.get_last_endpoint().unwrap().unwrap();
        (Hub { pull, _ctx: ctx }, endpoint)
    }

    /// The next upstream message; panics after the safety net.
    pub fn next(&self) -> Upstream {
        self.next_within(IO_TIMEOUT)
            .unwrap_or_else(|| panic!("hub: nothing upstream within {IO_TIMEOUT:?}"))
    }

    /// The next upstream message, or None after `limit`.
    pub fn next_within(&self, limit: Duration) -> Option<Upstream> {
        let mut items = [self.pull.as_poll_item(zmq::POLLIN)];
        if zmq::poll(&mut items, limit.as_millis() as i64).ok()? == 0 {
            return None;
        }
        let frames = self.pull.recv_multipart(0).expect("hub receive");
        assert_eq!(
            frames.len(),
            5,
            "an upstream message is five frames: {frames:?}"
        );
        let text = |f: &Vec<u8>| String::from_utf8(f.clone()).expect("an ASCII frame");
        Some(Upstream {
            kind: text(&frames[0]),
            address: text(&frames[1]),
            channel: text(&frames[2]),
            meta: serde_json::from_slice(&frames[3]).expect("the meta frame is JSON"),
            payload: frames[4].clone(),
        })
    }

    /// The next upstream message of `kind`, skipping others.
    pub fn next_of(&self, kind: &str) -> Upstream {
        loop {
            let m = self.next();
            if m.kind == kind {
                return m;
            }
        }
    }
}
