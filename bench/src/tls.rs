//! TLS for `--tls` runs: a certificate made for the run, the servers'
//! files, and the client side (rustls, TLS 1.3 only, trusting that one
//! certificate, no session resumption) over the bench's own nonblocking
//! sockets.
//!
//! Every server of a run gets the same certificate and key: an ECDSA P-256
//! key and a self-signed certificate for `localhost` and `127.0.0.1`,
//! written as PEM into a temporary directory (removed when the run ends).
//! The clients trust that certificate alone and verify it as a browser
//! would (the chain to a trust anchor, the name, the handshake's
//! signature). They keep no sessions, so every connection is a full
//! handshake with an ephemeral key exchange, whatever tickets the server
//! sends.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::sys;
use crate::util::TempDir;

/// The name the clients ask for (SNI) and check the certificate against.
pub const SERVER_NAME: &str = "localhost";

/// The certificate and key files a server loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// The client side: its configuration and the name it connects to.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientTls({})", self.describe())
    }
}

impl ClientTls {
    /// A client that trusts `cert` (DER) alone.
    pub fn trusting(cert: CertificateDer<'static>) -> Result<ClientTls, String> {
        let mut roots = RootCertStore::empty();
        roots
            .add(cert)
            .map_err(|e| format!("TLS: the certificate as a trust anchor: {e}"))?;
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| format!("TLS: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        // What a browser offers for a WebSocket or an EventSource.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Every connection a full handshake: no ticket or session is kept
        // (and so none offered), for any server.
        config.resumption = Resumption::disabled();
        let name = ServerName::try_from(SERVER_NAME)
            .map_err(|e| format!("TLS: server name: {e}"))?
            .to_owned();
        Ok(ClientTls {
            config: Arc::new(config),
            name,
        })
    }

    /// A new client connection; its ClientHello is ready to be written.
    pub fn connect(&self) -> Result<ClientConnection, String> {
        ClientConnection::new(self.config.clone(), self.name.clone())
            .map_err(|e| format!("TLS: {e}"))
    }

    /// What the clients offer, for the tables.
    pub fn describe(&self) -> String {
        "TLS 1.3 only, ALPN http/1.1, SNI localhost, no session resumption (full handshakes)".into()
    }
}

/// What one handshake negotiated: `TLS 1.3 TLS13_AES_256_GCM_SHA384 X25519`.
pub fn negotiated(conn: &ClientConnection) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "?".into(),
    };
    let suite = conn
        .negotiated_cipher_suite()
        .map_or("?".into(), |s| format!("{:?}", s.suite()));
    let group = conn
        .negotiated_key_exchange_group()
        .map_or("?".into(), |g| format!("{:?}", g.name()));
    let alpn = conn.alpn_protocol().map_or("no ALPN".into(), |p| {
        String::from_utf8_lossy(p).into_owned()
    });
    format!("{version} {suite} {group}, {alpn}")
}

/// The certificate and key of one run, in a directory removed when this
/// is dropped, and the client that trusts them.
pub struct TlsSetup {
    pub files: TlsFiles,
    pub client: ClientTls,
    _dir: TempDir,
}

impl TlsSetup {
    /// Makes a key and a self-signed certificate and writes them.
    pub fn generate() -> Result<TlsSetup, String> {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string(), "127.0.0.1".into()])
                .map_err(|e| format!("TLS: making a certificate: {e}"))?;
        let dir = TempDir::new("tls")?;
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        write_file(&files.cert, cert.pem().as_bytes())?;
        write_file(&files.key, signing_key.serialize_pem().as_bytes())?;
        let client = ClientTls::trusting(cert.der().clone())?;
        Ok(TlsSetup {
            files,
            client,
            _dir: dir,
        })
    }

    /// A rustls server configuration with the certificate and key, for
    /// the tests' servers.
    #[cfg(test)]
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        let certs = CertificateDer::pem_file_iter(&self.files.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&self.files.key).unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        )
    }

    /// A test server: accepts `n` TLS connections on a thread, reads each
    /// request head and writes `answer(i, head)` (`None`: closes it); keeps
    /// the rest open until `done` is sent, then returns the heads.
    #[cfg(test)]
    pub fn serve(
        &self,
        n: usize,
        answer: fn(usize, &str) -> Option<Vec<u8>>,
    ) -> (
        SocketAddr,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        let config = self.server_config();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let mut keep = Vec::new();
            let mut heads = Vec::new();
            for i in 0..n {
                let (tcp, _) = listener.accept().unwrap();
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while testkit::http::head_len(&head).is_none() {
                    match s.read(&mut b) {
                        Ok(k) if k > 0 => head.extend_from_slice(&b[..k]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                if let Some(bytes) = answer(i, &head) {
                    s.write_all(&bytes).unwrap();
                    s.flush().unwrap();
                    keep.push(s);
                }
                heads.push(head);
            }
            let _ = done_rx.recv();
            heads
        });
        (addr, done_tx, handle)
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| format!("write {}: {e}", path.display()))
}

/// A nonblocking socket as rustls' source and sink of ciphertext.
pub struct FdIo(pub RawFd);

impl Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv(self.0, buf, 0)
    }
}

impl Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send(self.0, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What is waiting on an open TLS connection, taken off it: plaintext
/// (up to `max` bytes), and whether the server closed it (a close_notify,
/// an end of stream, a reset or a TLS error).
pub fn drain(conn: &mut ClientConnection, fd: RawFd, max: usize) -> (Vec<u8>, bool) {
    let mut plain = Vec::new();
    let mut closed = false;
    let mut io = FdIo(fd);
    loop {
        match conn.read_tls(&mut io) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {
                if conn.process_new_packets().is_err() {
                    return (plain, true);
                }
                if read_plaintext(conn, &mut plain, max) {
                    closed = true;
                }
                if plain.len() >= max {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    if !closed && conn.process_new_packets().is_err() {
        closed = true;
    }
    if read_plaintext(conn, &mut plain, max) {
        closed = true;
    }
    (plain, closed)
}

/// Moves the plaintext rustls has into `out` (up to `max` bytes in all);
/// true when the server said close_notify.
pub fn read_plaintext(conn: &mut ClientConnection, out: &mut Vec<u8>, max: usize) -> bool {
    let mut chunk = [0u8; 4096];
    while out.len() < max {
        let room = (max - out.len()).min(chunk.len());
        match conn.reader().read(&mut chunk[..room]) {
            Ok(0) => return true,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => return true,
        }
    }
    false
}

/// A blocking TLS connection (for `/healthz`), `timeout` for the connect
/// and each read.
pub fn connect_blocking(
    tls: &ClientTls,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<rustls::StreamOwned<ClientConnection, TcpStream>, String> {
    let tcp = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("TLS connect {addr}: {e}"))?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    Ok(rustls::StreamOwned::new(tls.connect()?, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn the_generated_certificate_is_trusted_over_a_blocking_stream() {
        let setup = TlsSetup::generate().unwrap();
        let text = std::fs::read_to_string(&setup.files.cert).unwrap();
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----"));
        let key = std::fs::read_to_string(&setup.files.key).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        let config = setup.server_config();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut b = [0u8; 5];
            s.read_exact(&mut b).unwrap();
            s.write_all(b"pong").unwrap();
            s.flush().unwrap();
            b
        });
        let mut c = connect_blocking(&setup.client, addr, Duration::from_secs(5)).unwrap();
        c.write_all(b"ping!").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"pong");
        assert_eq!(&t.join().unwrap(), b"ping!");
        let n = negotiated(&c.conn);
        assert!(n.starts_with("TLS 1.3 TLS13_"), "{n}");
        let dir = setup.files.cert.parent().unwrap().to_owned();
        drop(setup);
        assert!(!dir.exists());
    }

    #[test]
    fn another_certificate_is_refused() {
        let setup = TlsSetup::generate().unwrap();
        let other = TlsSetup::generate().unwrap();
        let config = other.server_config();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
        });
        let mut c = connect_blocking(&setup.client, addr, Duration::from_secs(5)).unwrap();
        let err = c.write_all(b"x").and_then(|()| c.flush()).unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
        t.join().unwrap();
    }
}
