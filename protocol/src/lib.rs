//! Sans-IO protocol layer of the gateway.
//!
//! Bytes (and, where it matters, time) go in; events and bytes come out. Nothing
//! here opens a socket, reads a clock or spawns a task, so every behaviour can be
//! tested and fuzzed without a network.
//!
//! - [`http`]: HTTP/1.1 request heads (httparse), request classification into
//!   the gateway's endpoints, and the plain responses (errors, health).
//! - [`ws`]: the RFC 6455 opening handshake, a streaming frame decoder that
//!   unmasks in place, and a server frame encoder.
//! - [`sse`]: Server-Sent Events encoding.
//! - [`envelope`]: how one published message is written, once per transport
//!   (WebSocket frame, SSE event, long-poll JSON), and the long-poll response.
//! - [`origin`]: the `Origin` allowlist (cross-site WebSocket hijacking)
//!   and the CORS headers of the origins on it.
//! - [`proxy`]: the PROXY protocol header (v1 text and v2 binary) a proxy in
//!   front of the gateway writes to say who the client is.
//! - [`token`]: JWT verification for upgrades (keys by `kid`, time passed in)
//!   and the channel patterns a token grants.
//! - [`id`]: message ids and cursors, the publisher's and the gateway's.
//! - [`channel`]: channel names.
//! - [`publication`]: the frames a publisher sends over ZeroMQ, checked.
//! - [`grpc`]: gRPC's length-prefixed messages and status codes, and the
//!   messages of `proto/gateway/v1/gateway.proto`.
//! - [`upstream`]: two-way traffic: client messages and control messages,
//!   the frames sent up to the hubs, connection addresses and replies.
//! - [`limits`]: every default limit, with units in the names.

#![forbid(unsafe_code)]

pub mod channel;
pub mod deflate;
pub mod envelope;
pub mod grpc;
pub mod http;
pub mod id;
pub mod limits;
pub mod origin;
pub mod proxy;
pub mod publication;
pub mod sse;
pub mod token;
pub mod upstream;
pub mod ws;
