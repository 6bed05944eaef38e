//! The little HTTP/1.1 the client side needs: request heads for each
//! transport, checking a response head, and `/healthz`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::cli::Transport;

pub use testkit::http::{
    first_line, head_len, header, parse_health_body, status_code, WS_ACCEPT, WS_KEY,
};

/// What a browser offers for permessage-deflate (Chrome's and Firefox's
/// offer), when the bench's WebSocket clients are told to.
pub const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// The request head that subscribes one connection to `channel`; a
/// WebSocket one offers `subprotocol` (`Sec-WebSocket-Protocol`) when
/// given: the gateway's two-way `gateway.v1`; and permessage-deflate
/// ([`DEFLATE_OFFER`]) when `deflate`.
pub fn subscribe_request_with(
    transport: Transport,
    host: &str,
    channel: &str,
    subprotocol: Option<&str>,
    deflate: bool,
) -> Vec<u8> {
    match transport {
        Transport::Ws => format!(
            "GET /ws?channel={channel} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{}{}\r\n",
            subprotocol.map_or(String::new(), |p| format!("Sec-WebSocket-Protocol: {p}\r\n")),
            if deflate {
                format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")
            } else {
                String::new()
            }
        ),
        Transport::Sse => format!(
            "GET /events?channel={channel} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\
             Cache-Control: no-cache\r\n\r\n"
        ),
        Transport::LongPoll => {
            format!("GET /events?channel={channel} HTTP/1.1\r\nHost: {host}\r\n\r\n")
        }
        Transport::Grpc => unreachable!("gRPC subscribes over HTTP/2 (see grpc.rs)"),
    }
    .into_bytes()
}

/// Checks that a complete response head accepts the subscription, and for
/// a WebSocket that offered `subprotocol`, that the 101 chose it (a server
/// that does not speak it would take the client's messages for noise). The
/// error is short and stable (it is used as a failure category).
pub fn check_subscribe_response(
    transport: Transport,
    head: &[u8],
    subprotocol: Option<&str>,
) -> Result<(), String> {
    check_head(transport, head)?;
    match (transport, subprotocol) {
        (Transport::Ws, Some(want)) => match header(head, "Sec-WebSocket-Protocol") {
            Some(got) if got == want => Ok(()),
            Some(other) => Err(format!("101 chose subprotocol {other:?}, not {want:?}")),
            None => Err(format!(
                "101 without Sec-WebSocket-Protocol (offered {want:?})"
            )),
        },
        _ => Ok(()),
    }
}

/// Whether a 101 agreed to permessage-deflate (the server may decline an
/// offer and go on without it).
pub fn deflate_agreed(head: &[u8]) -> bool {
    header(head, "Sec-WebSocket-Extensions")
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("permessage-deflate"))
}

fn check_head(transport: Transport, head: &[u8]) -> Result<(), String> {
    let status =
        status_code(head).ok_or_else(|| format!("malformed status line {:?}", first_line(head)))?;
    match transport {
        Transport::Ws => {
            if status != 101 {
                return Err(format!(
                    "status {status} (want 101): {:?}",
                    first_line(head)
                ));
            }
            match header(head, "Sec-WebSocket-Accept") {
                Some(WS_ACCEPT) => Ok(()),
                Some(other) => Err(format!("101 with a wrong Sec-WebSocket-Accept {other:?}")),
                None => Err("101 without Sec-WebSocket-Accept".into()),
            }
        }
        Transport::Sse => {
            if status != 200 {
                return Err(format!(
                    "status {status} (want 200): {:?}",
                    first_line(head)
                ));
            }
            match header(head, "Content-Type") {
                Some(ct) if ct.to_ascii_lowercase().starts_with("text/event-stream") => Ok(()),
                other => Err(format!(
                    "200 with Content-Type {other:?}, not text/event-stream"
                )),
            }
        }
        // A held poll has no answer to check; one that came at once was not
        // held.
        Transport::LongPoll => Err(format!(
            "a long-poll answered at once ({status}): {:?}",
            first_line(head)
        )),
        Transport::Grpc => Err("an HTTP/1.1 head where gRPC speaks HTTP/2".into()),
    }
}

/// Connections per core from a complete `/healthz` response, or `None` while
/// `buf` does not hold all of it yet.
pub fn parse_health(buf: &[u8]) -> Result<Option<Vec<u64>>, String> {
    let Some(len) = head_len(buf) else {
        return Ok(None);
    };
    let head = &buf[..len];
    match status_code(head) {
        Some(200) => {}
        _ => return Err(format!("/healthz answered {:?}", first_line(head))),
    }
    let body = &buf[len..];
    let body = match header(head, "Content-Length") {
        Some(n) => {
            let n: usize = n
                .parse()
                .map_err(|_| format!("/healthz Content-Length {n:?}"))?;
            if body.len() < n {
                return Ok(None);
            }
            &body[..n]
        }
        // No length: the body ends at EOF, which the caller signals by
        // calling again with `eof`; see `healthz`.
        None => return Ok(None),
    };
    parse_health_body(body).map(Some)
}

/// Asks a server's `/healthz` for its connections per core.
pub fn healthz(addr: SocketAddr, timeout: Duration) -> Result<Vec<u64>, String> {
    let deadline = Instant::now() + timeout;
    let s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("/healthz connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    healthz_on(s, addr, deadline, timeout)
}

/// [`healthz`] over TLS, trusting what `tls` trusts.
pub fn healthz_tls(
    addr: SocketAddr,
    tls: &crate::tls::ClientTls,
    timeout: Duration,
) -> Result<Vec<u64>, String> {
    let deadline = Instant::now() + timeout;
    let s =
        crate::tls::connect_blocking(tls, addr, timeout).map_err(|e| format!("/healthz {e}"))?;
    healthz_on(s, addr, deadline, timeout)
}

/// The `/healthz` request and its answer on a connected stream.
fn healthz_on(
    mut s: impl Read + Write,
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u64>, String> {
    s.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("/healthz send: {e}"))?;
    s.flush().map_err(|e| format!("/healthz send: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(counts) = parse_health(&buf)? {
            return Ok(counts);
        }
        if Instant::now() >= deadline {
            return Err(format!("/healthz: no complete answer within {timeout:?}"));
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                // EOF: a body without Content-Length ends here.
                return match head_len(&buf) {
                    Some(len) => parse_health_body(&buf[len..]),
                    None => Err(format!(
                        "/healthz: connection closed after {} bytes",
                        buf.len()
                    )),
                };
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("/healthz read: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WS_OK: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    const SSE_OK: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n";

    #[test]
    fn requests() {
        let ws = String::from_utf8(subscribe_request_with(
            Transport::Ws,
            "127.0.0.1:80",
            "idle-7",
            None,
            false,
        ))
        .unwrap();
        assert!(ws.starts_with("GET /ws?channel=idle-7 HTTP/1.1\r\n"));
        assert!(ws.contains("\r\nUpgrade: websocket\r\n"));
        assert!(ws.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(ws.ends_with("\r\n\r\n") && head_len(ws.as_bytes()) == Some(ws.len()));
        let sse = String::from_utf8(subscribe_request_with(
            Transport::Sse,
            "h",
            "idle-0",
            None,
            false,
        ))
        .unwrap();
        assert!(sse.starts_with("GET /events?channel=idle-0 HTTP/1.1\r\nHost: h\r\n"));
        assert!(sse.contains("\r\nAccept: text/event-stream\r\n"));
        assert_eq!(head_len(sse.as_bytes()), Some(sse.len()));
    }

    #[test]
    fn head_parsing() {
        assert_eq!(head_len(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(head_len(b"HTTP/1.1 200 OK\r\n\r\ndata: x\n\n"), Some(19));
        assert_eq!(status_code(WS_OK), Some(101));
        assert_eq!(
            status_code(b"HTTP/1.0 503 Service Unavailable\r\n\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 20 OK\r\n\r\n"), None);
        assert_eq!(header(WS_OK, "Sec-WebSocket-Accept"), Some(WS_ACCEPT));
        assert_eq!(header(WS_OK, "upgrade"), Some("websocket"));
        assert_eq!(header(WS_OK, "Content-Type"), None);
        assert_eq!(first_line(WS_OK), "HTTP/1.1 101 Switching Protocols");
    }

    #[test]
    fn subscribe_responses() {
        assert_eq!(check_subscribe_response(Transport::Ws, WS_OK, None), Ok(()));
        assert_eq!(
            check_subscribe_response(Transport::Sse, SSE_OK, None),
            Ok(())
        );
        let refused = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n";
        assert!(check_subscribe_response(Transport::Ws, refused, None)
            .unwrap_err()
            .starts_with("status 503"));
        assert!(check_subscribe_response(Transport::Sse, refused, None)
            .unwrap_err()
            .starts_with("status 503"));
        assert!(check_subscribe_response(Transport::Ws, SSE_OK, None)
            .unwrap_err()
            .starts_with("status 200"));
        let bad_accept = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: xyz\r\n\r\n";
        assert!(check_subscribe_response(Transport::Ws, bad_accept, None)
            .unwrap_err()
            .contains("wrong"));
        let no_accept = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
        assert!(check_subscribe_response(Transport::Ws, no_accept, None).is_err());
        let json = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n";
        assert!(check_subscribe_response(Transport::Sse, json, None).is_err());
        assert!(check_subscribe_response(Transport::Sse, b"garbage\r\n\r\n", None).is_err());
    }

    #[test]
    fn the_two_way_subprotocol_is_offered_and_checked() {
        let req = String::from_utf8(subscribe_request_with(
            Transport::Ws,
            "h",
            "rt.3",
            Some("gateway.v1"),
            false,
        ))
        .unwrap();
        assert!(req.starts_with("GET /ws?channel=rt.3 HTTP/1.1\r\n"));
        assert!(req.contains("\r\nSec-WebSocket-Protocol: gateway.v1\r\n"));
        assert_eq!(head_len(req.as_bytes()), Some(req.len()));
        assert!(
            !String::from_utf8(subscribe_request_with(Transport::Ws, "h", "x", None, false))
                .unwrap()
                .contains("Protocol")
        );
        let chosen = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: gateway.v1\r\n\r\n";
        let v1 = Some("gateway.v1");
        assert_eq!(check_subscribe_response(Transport::Ws, chosen, v1), Ok(()));
        let err = check_subscribe_response(Transport::Ws, WS_OK, v1).unwrap_err();
        assert!(err.contains("without Sec-WebSocket-Protocol"), "{err}");
        let other = b"HTTP/1.1 101 Switching Protocols\r\n\
            Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n";
        assert!(check_subscribe_response(Transport::Ws, other, v1).is_err());
        // Not offered: not asked for.
        assert_eq!(
            check_subscribe_response(Transport::Ws, chosen, None),
            Ok(())
        );
    }

    #[test]
    fn permessage_deflate_is_offered_as_browsers_do_and_its_agreement_read() {
        let req =
            String::from_utf8(subscribe_request_with(Transport::Ws, "h", "x", None, true)).unwrap();
        assert!(req.contains(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        ));
        assert_eq!(head_len(req.as_bytes()), Some(req.len()));
        let agreed = b"HTTP/1.1 101 Switching Protocols\r\n\
            Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n";
        assert!(deflate_agreed(agreed));
        assert!(!deflate_agreed(WS_OK));
    }

    #[test]
    fn health_responses() {
        let body = "{\"status\":\"ok\",\"connections_per_core\":[5003,4998]}\n";
        let full = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(parse_health(full.as_bytes()), Ok(Some(vec![5003, 4998])));
        // Incomplete: head only, or part of the body.
        assert_eq!(parse_health(&full.as_bytes()[..20]), Ok(None));
        assert_eq!(parse_health(&full.as_bytes()[..full.len() - 3]), Ok(None));
        assert!(parse_health(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").is_err());
        assert!(parse_health_body(b"{\"status\":\"ok\"}").is_err());
        assert!(parse_health_body(b"{\"status\":\"ok\",\"connections_per_core\":[1,-2]}").is_err());
        assert!(
            parse_health_body(b"{\"status\":\"draining\",\"connections_per_core\":[1]}").is_err()
        );
        assert!(parse_health_body(b"ok").is_err());
        // One total instead of per-core counts (the baseline's shape).
        assert_eq!(
            parse_health_body(b"{\"status\":\"ok\",\"connections\":42}"),
            Ok(vec![42])
        );
        assert!(parse_health_body(b"{\"status\":\"ok\",\"connections\":-1}").is_err());
    }

    #[test]
    fn healthz_against_a_tiny_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"GET /healthz HTTP/1.1\r\n"));
            let body = "{\"status\":\"ok\",\"connections_per_core\":[1,2]}\n";
            // Head and body in separate writes; the socket stays open.
            s.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(body.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        assert_eq!(healthz(addr, Duration::from_secs(5)), Ok(vec![1, 2]));
        server.join().unwrap();
    }
}
