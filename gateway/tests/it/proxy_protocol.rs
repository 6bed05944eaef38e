//! PROXY protocol on the public listener: connections from the trusted
//! range (127.0.0.2 here, standing for the load balancer) open with a v1 or
//! v2 header, and the client it names is the one counted by
//! `connections_per_ip_max` and logged; a PROXY header from anyone else is
//! a malformed request, and its claimed address is never used.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};

use crate::common::*;

const PROXY_IP: &str = "127.0.0.2";

fn start(connections_per_ip_max: &str) -> Gateway {
    Gateway::start(&[
        "--proxy-protocol-from",
        "127.0.0.2/32",
        "--connections-per-ip-max",
        connections_per_ip_max,
    ])
}

fn from(gw: &Gateway, source: &str) -> TcpStream {
    tcp_connect(gw.listen, Some(source.parse().unwrap()), None)
}

fn v1(client: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} 10.0.0.1 {} 8080\r\n",
        client.ip(),
        client.port()
    )
    .into_bytes()
}

/// A v2 PROXY header for a TCP over IPv4 client, with a TLV after the
/// addresses (which the gateway skips).
fn v2(client: SocketAddr) -> Vec<u8> {
    let IpAddr::V4(src) = client.ip() else {
        panic!("IPv4 only")
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    let tlv = [0x04u8, 0x00, 0x02, b'n', b'o']; // PP2_TYPE_NOOP
    h.extend_from_slice(&((12 + tlv.len()) as u16).to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&Ipv4Addr::new(10, 0, 0, 1).octets());
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&8080u16.to_be_bytes());
    h.extend_from_slice(&tlv);
    h
}

/// A WebSocket (or its refusal) through the "proxy": `header` first, then
/// the upgrade, in separate writes as a proxy may send them.
fn ws_via(gw: &Gateway, source: &str, header: &[u8]) -> Result<WsClient, HttpResponse> {
    let mut stream = from(gw, source);
    stream.write_all(header).unwrap();
    ws_or_refusal(stream, "/ws?channel=news")
}

#[test]
fn a_trusted_proxy_names_the_client_counted_by_the_per_address_limit() {
    let gw = start("1");
    let client: SocketAddr = "203.0.113.7:51000".parse().unwrap();
    // v1 and v2 name the same client: its second connection is over its
    // limit of one, though every connection comes from the proxy's address.
    let first = ws_via(&gw, PROXY_IP, &v1(client)).expect("the client's first connection");
    let refused = ws_via(&gw, PROXY_IP, &v2(SocketAddr::new(client.ip(), 51001)))
        .err()
        .expect("the same client again, through v2");
    assert_unavailable(
        &refused,
        "too many connections from this address",
        "second connection of 203.0.113.7",
    );
    // Other clients behind the same proxy have their own places.
    let other = ws_via(&gw, PROXY_IP, &v2("203.0.113.8:40000".parse().unwrap()))
        .expect("another client through v2");
    let third = ws_via(&gw, PROXY_IP, &v1("198.51.100.1:1".parse().unwrap()))
        .expect("a third client through v1");
    drop((first, other, third));

    // Logs name the client, not the proxy.
    let mut stream = from(&gw, PROXY_IP);
    let mut req = v1("203.0.113.9:52000".parse().unwrap());
    req.extend_from_slice(b"GET /nowhere HTTP/1.1\r\nHost: gateway\r\n\r\n");
    stream.write_all(&req).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(answer.starts_with(b"HTTP/1.1 404 "), "{answer:?}");
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("request refused") && l.contains("404"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(line.contains("203.0.113.9:52000"), "{line}");
}

#[test]
fn a_proxy_header_from_an_untrusted_peer_is_a_bad_request_and_its_address_unused() {
    // Room for the refused connections that have not closed yet.
    let gw = start("10");
    for (version, header) in [
        ("v1", v1("192.0.2.66:1234".parse().unwrap())),
        ("v2", v2("192.0.2.66:1234".parse().unwrap())),
    ] {
        // 127.0.0.1 is not in the trusted range.
        let refused = ws_via(&gw, "127.0.0.1", &header)
            .err()
            .unwrap_or_else(|| panic!("{version} header from an untrusted peer was accepted"));
        assert_eq!(refused.status, 400, "{version}: {}", refused.describe());
    }
    assert!(
        !gw.log().contains("192.0.2.66"),
        "the untrusted claim must never be taken:\n{}",
        gw.log()
    );
    // A client of its own, the untrusted peer is served as usual.
    ws_via(&gw, "127.0.0.1", b"").expect("a plain client from 127.0.0.1");
}

#[test]
fn a_trusted_peer_without_a_valid_header_is_closed_and_logged() {
    let gw = start("1");
    for (what, bytes) in [
        (
            "no header",
            &b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"[..],
        ),
        (
            "a broken v1 line",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n",
        ),
    ] {
        let mut stream = from(&gw, PROXY_IP);
        stream.write_all(bytes).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(answer.is_empty(), "{what}: answered {answer:?}");
    }
    let log = gw.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PROXY header refused"))
        .collect();
    assert_eq!(refused.len(), 2, "{log}");
    assert!(refused[0].contains("not proxy protocol"), "{}", refused[0]);
    assert!(refused[1].contains("bad v1 header"), "{}", refused[1]);

    // The proxy's own health check (v2 LOCAL) is served as the proxy.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    let mut stream = from(&gw, PROXY_IP);
    local.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n");
    stream.write_all(&local).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 200 OK"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}
