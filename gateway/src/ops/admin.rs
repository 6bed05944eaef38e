//! The admin listener: `GET /metrics` (Prometheus text format 0.0.4),
//! `/healthz` and `/readyz` (the same answers as the public listener's), on
//! an address of its own (`admin_listen`), served by one plain thread with
//! blocking sockets, never by the cores' runtimes: a scrape costs the cores
//! nothing but the once-a-second snapshot they publish anyway.
//!
//! One request per connection, answered with `Connection: close`. Requests
//! are served one at a time, each bounded by [`IO_TIMEOUT`]: meant for a
//! scraper and a health checker on a private address, not the public.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::config::Config;

/// How long one admin connection may take to send its request or to take
/// the response.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const HEAD_BYTES_MAX: usize = 8192;

/// Binds the admin listener (an error stops start-up) and starts its
/// thread. Returns the bound address; None when `admin_listen` is empty.
pub fn spawn(
    cfg: &'static Config,
    conn_counts: Arc<[AtomicU64]>,
) -> Result<Option<SocketAddr>, String> {
    serve_on(&cfg.admin_listen, move |path| {
        gateway_get(cfg, &conn_counts, path)
    })
}

/// Binds `listen` (none when empty) and answers each `GET`/`HEAD` with what
/// `get` says for its path, on a thread of its own.
pub fn serve_on(
    listen: &str,
    get: impl Fn(&str) -> Vec<u8> + Send + 'static,
) -> Result<Option<SocketAddr>, String> {
    if listen.is_empty() {
        return Ok(None);
    }
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("admin listener on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = serve(&get, stream) {
                            debug!(error = %e, "admin request failed");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "admin accept failed");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
        .map_err(|e| format!("spawn admin thread: {e}"))?;
    info!(admin_listen = %addr, "admin listener: /metrics /healthz /readyz");
    Ok(Some(addr))
}

fn serve(get: &impl Fn(&str) -> Vec<u8>, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let response = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break respond(get, req.method, req.path);
            }
            Ok(httparse::Status::Partial) if buf.len() < HEAD_BYTES_MAX => {}
            _ => break plain(400, "Bad Request", "bad request\n"),
        }
    };
    stream.write_all(&response)?;
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

fn respond(get: &impl Fn(&str) -> Vec<u8>, method: Option<&str>, path: Option<&str>) -> Vec<u8> {
    let path = path.unwrap_or("").split('?').next().unwrap_or("");
    // HEAD answers like GET without the body (balancers check with it).
    match method {
        Some("GET") => get(path),
        Some("HEAD") => protocol::http::without_body(get(path)),
        _ => plain(405, "Method Not Allowed", "GET or HEAD only\n"),
    }
}

/// A `/metrics` answer with `body` (Prometheus text format 0.0.4).
pub fn metrics_response(body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\n\
         Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Cache-Control: no-store\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn gateway_get(cfg: &Config, conn_counts: &[AtomicU64], path: &str) -> Vec<u8> {
    match path {
        "/metrics" => metrics_response(&super::metrics::render()),
        "/healthz" => {
            let counts: Vec<u64> = conn_counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
            protocol::http::health_response(&counts, false)
        }
        "/readyz" => {
            let (ready, status) = super::service::readiness(cfg);
            protocol::http::ready_response(ready, status, false)
        }
        _ => plain(404, "Not Found", "not found\n"),
    }
}

pub fn plain(code: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} {reason}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n\
         {body}",
        body.len()
    )
    .into_bytes()
}
