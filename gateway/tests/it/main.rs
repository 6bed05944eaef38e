//! The integration tests: one binary, each module a part of the gateway
//! tested from the outside, against the real binary over loopback.

use testkit as common;

mod auth;
mod bad_input;
mod deflate;
mod drain;
mod fanout;
mod forwarder;
mod grpc;
mod heartbeats;
mod http2;
mod logs;
mod longpoll;
mod metrics;
mod multicore;
mod origin;
mod overload;
mod proxy_protocol;
mod publisher_ids;
mod publisher_restart;
mod readyz_ingest;
mod redundancy;
mod resume;
mod systemd_notify;
mod tls;
mod two_gateways;
mod two_way;
mod ws_control;
mod ws_rules;
