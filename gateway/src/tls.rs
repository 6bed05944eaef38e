//! TLS on the public listener (and the gRPC one, when asked): rustls'
//! unbuffered connection, driven by the core's own IO.
//!
//! A connection's TLS state is a [`Session`] in its slab entry. The core
//! reads ciphertext into its scratch buffer as for any connection; the
//! session decrypts the records in place there and hands the plaintext to
//! the same code a cleartext connection's bytes go to. Writing, the queued
//! frames (shared `Bytes`, the same for every subscriber) are sealed into
//! records in a per-thread buffer and sent from it; only what the socket
//! refuses is copied into the session. So an idle TLS connection keeps no
//! buffer at all: its session holds the record keys and the few bytes of a
//! record not yet complete. (rustls' buffered connection keeps a 4 KiB
//! read buffer per connection for its whole life; see the README.)
//!
//! Certificates come from PEM files and are chosen by the name the client
//! asks for (SNI); a SIGHUP re-reads them, and a set that does not load
//! keeps the old one. Connections already open keep their keys.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tracing::{error, info, warn};

use crate::config::Config;

/// Ciphertext a session keeps while a record is incomplete. A record is at
/// most 16 KiB and 2 KiB of expansion (RFC 8446 §5.2); a handshake message
/// may span records, and rustls joins at most 64 KiB of them. More is not
/// a TLS client.
const INCOMING_BYTES_MAX: usize = 64 * 1024 + 18 * 1024;
/// Plaintext sealed into one record: the most a record holds, so that a
/// batch of small frames costs one record's overhead and one encryption.
pub const RECORD_PLAINTEXT_BYTES: usize = 16 * 1024;

/// One loaded certificate: the names it serves and its chain and key.
struct Loaded {
    /// Its DNS names (subject alternative names, lowercased; `*.` wildcards
    /// kept as written).
    names: Vec<String>,
    key: Arc<CertifiedKey>,
    /// The end-entity certificate's `notAfter`, Unix seconds.
    not_after_s: i64,
    /// The file it came from, for logs and metrics.
    file: String,
}

/// The certificates in use: the first serves clients that name no known
/// host (or none at all).
struct Certificates(Vec<Loaded>);

thread_local! {
    /// One record's application data at a time, for the reader (see
    /// [`Session::receive`]).
    static PLAINTEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

static CERTIFICATES: OnceLock<RwLock<Arc<Certificates>>> = OnceLock::new();
static SERVER_CONFIG: OnceLock<Arc<ServerConfig>> = OnceLock::new();

/// Chooses the certificate for a client's SNI name from the current set.
#[derive(Debug)]
struct BySni;

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = current()?;
        let chosen = hello
            .server_name()
            .and_then(|name| set.0.iter().find(|c| serves(&c.names, name)))
            .or_else(|| set.0.first())?;
        Some(chosen.key.clone())
    }
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|c| (&c.file, &c.names)))
            .finish()
    }
}

/// Does a certificate for `names` serve `host`? Exact names, and `*.`
/// wildcards for exactly one label (RFC 6125 §6.4.3), case-insensitively.
fn serves(names: &[String], host: &str) -> bool {
    names.iter().any(|n| {
        if let Some(suffix) = n.strip_prefix("*.") {
            host.split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix))
        } else {
            n.eq_ignore_ascii_case(host)
        }
    })
}

fn current() -> Option<Arc<Certificates>> {
    let lock = CERTIFICATES.get()?;
    Some(lock.read().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Loads the configuration's certificates and builds the one server
/// configuration every TLS connection shares. Call once, before the cores
/// serve; does nothing when no certificate is configured.
pub fn start(cfg: &Config) -> Result<(), String> {
    if !cfg.tls_enabled() {
        return Ok(());
    }
    let set = load(cfg)?;
    info!(certificates = ?set, "TLS on the public listener");
    let _ = CERTIFICATES.set(RwLock::new(Arc::new(set)));
    let _ = SERVER_CONFIG.set(Arc::new(server_config(Arc::new(BySni))?));
    Ok(())
}

/// The configuration every TLS connection shares, its certificates from
/// `certificates`.
fn server_config(certificates: Arc<dyn ResolvesServerCert>) -> Result<ServerConfig, String> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(certificates);
    // HTTP/2 first: a browser's SSE streams and long-polls share one
    // connection (see `http2`), gRPC clients get theirs. A WebSocket opens
    // its own connection offering `http/1.1` alone (the gateway does not
    // offer RFC 8441's extended CONNECT). A client offering no ALPN speaks
    // whatever its first bytes say.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// Re-reads the certificate files (of the configuration file as it is
/// now) and swaps them in; on any error the old ones stay.
pub fn reload(cfg: &Config) {
    if CERTIFICATES.get().is_none() {
        return;
    }
    let fresh = match cfg.reload_tls_files() {
        Ok(fresh) => fresh,
        Err(e) => {
            error!(error = %e, "SIGHUP: TLS certificates not reloaded; keeping the old ones");
            return;
        }
    };
    match load(&fresh) {
        Ok(set) => {
            info!(certificates = ?set, "SIGHUP: TLS certificates reloaded");
            let lock = CERTIFICATES.get().expect("checked above");
            *lock.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        }
        Err(e) => {
            error!(error = %e, "SIGHUP: TLS certificates not reloaded; keeping the old ones")
        }
    }
}

/// Each certificate's file and `notAfter` (Unix seconds), for `/metrics`.
pub fn expiries() -> Vec<(String, i64)> {
    current()
        .map(|set| {
            set.0
                .iter()
                .map(|c| (c.file.clone(), c.not_after_s))
                .collect()
        })
        .unwrap_or_default()
}

fn load(cfg: &Config) -> Result<Certificates, String> {
    let provider = rustls::crypto::ring::default_provider();
    let mut set = Vec::new();
    for (cert_file, key_file) in cfg.tls_cert.iter().zip(&cfg.tls_key) {
        let file = cert_file.display().to_string();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| format!("tls_cert {file}: {e}"))?;
        let Some(leaf) = chain.first() else {
            return Err(format!("tls_cert {file}: no certificate in the file"));
        };
        let (names, not_after_s) = describe(leaf).map_err(|e| format!("tls_cert {file}: {e}"))?;
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| format!("tls_key {}: {e}", key_file.display()))?;
        let key = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| format!("tls_cert {file} with tls_key {}: {e}", key_file.display()))?;
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if not_after_s < now_s {
            warn!(file, "TLS certificate has expired: clients will refuse it");
        }
        set.push(Loaded {
            names,
            key: Arc::new(key),
            not_after_s,
            file,
        });
    }
    if set.is_empty() {
        return Err("no TLS certificate".into());
    }
    Ok(Certificates(set))
}

/// The DNS names and `notAfter` of a certificate.
fn describe(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Why a handshake failed, as `/metrics` counts them (and `Ok`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    Ok,
    /// Bytes that are not TLS (a cleartext request on the TLS port).
    NotTls,
    /// No protocol version, cipher suite or key exchange in common.
    Incompatible,
    /// The client refused the certificate (unknown CA, expired, wrong name).
    CertificateRejected,
    /// Another alert from the client, or a message out of place.
    ProtocolError,
    /// Not finished within `head_timeout_ms`.
    Timeout,
    /// The client closed before it finished.
    Closed,
    /// More handshake bytes than a TLS client sends.
    TooLarge,
}

pub const HANDSHAKE_RESULTS: [Handshake; 8] = [
    Handshake::Ok,
    Handshake::NotTls,
    Handshake::Incompatible,
    Handshake::CertificateRejected,
    Handshake::ProtocolError,
    Handshake::Timeout,
    Handshake::Closed,
    Handshake::TooLarge,
];

static HANDSHAKES: [AtomicU64; HANDSHAKE_RESULTS.len()] =
    [const { AtomicU64::new(0) }; HANDSHAKE_RESULTS.len()];

impl Handshake {
    pub fn name(self) -> &'static str {
        match self {
            Handshake::Ok => "ok",
            Handshake::NotTls => "not_tls",
            Handshake::Incompatible => "incompatible",
            Handshake::CertificateRejected => "certificate_rejected",
            Handshake::ProtocolError => "protocol_error",
            Handshake::Timeout => "timeout",
            Handshake::Closed => "closed",
            Handshake::TooLarge => "too_large",
        }
    }

    fn of(e: &rustls::Error) -> Handshake {
        use rustls::{AlertDescription as A, Error as E, InvalidMessage};
        match e {
            E::InvalidMessage(InvalidMessage::InvalidContentType)
            | E::InvalidMessage(InvalidMessage::UnknownProtocolVersion) => Handshake::NotTls,
            E::PeerIncompatible(_) => Handshake::Incompatible,
            E::AlertReceived(
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::AccessDenied,
            ) => Handshake::CertificateRejected,
            E::AlertReceived(
                A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity,
            ) => Handshake::Incompatible,
            _ => Handshake::ProtocolError,
        }
    }

    pub fn count(self) {
        HANDSHAKES[self as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Handshakes so far, per result in [`HANDSHAKE_RESULTS`] order.
pub fn handshake_counts() -> Vec<(&'static str, u64)> {
    HANDSHAKE_RESULTS
        .iter()
        .map(|h| (h.name(), HANDSHAKES[*h as usize].load(Ordering::Relaxed)))
        .collect()
}

/// The session broke a rule, or the client gave up: the connection ends.
#[derive(Debug)]
pub struct Failure {
    pub during_handshake: bool,
    pub kind: Handshake,
    pub error: String,
}

impl Failure {
    fn of(during_handshake: bool, e: &rustls::Error) -> Failure {
        Failure {
            during_handshake,
            kind: Handshake::of(e),
            error: e.to_string(),
        }
    }
}

/// What [`Session::receive`] found besides application data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Open,
    /// The client sent `close_notify`: nothing more will come.
    Closed,
}

/// A TLS connection's session block: rustls' connection (the record
/// keys, the handshake's state machine, empty queues) and two empty
/// buffers. What rustls allocates besides (about 1.6 KiB with *ring*: the
/// two AES-GCM keys, the state made with the connection and after the
/// handshake) is measured by `bench idle --tls`: 3.5 KB per idle
/// connection in all (see the README).
const SESSION_BYTES_MAX: usize = 1152;
const _: () = assert!(std::mem::size_of::<Session>() <= SESSION_BYTES_MAX);

/// One connection's TLS state (in its core's side table, see
/// `Conn::take_tls`).
pub struct Session {
    conn: UnbufferedServerConnection,
    /// Ciphertext of a record not yet complete (unallocated without one).
    incoming: Vec<u8>,
    /// Ciphertext to send before anything else: a handshake flight, or
    /// the part of sealed records the socket did not take (unallocated
    /// when there is none).
    outgoing: Vec<u8>,
    handshaking: bool,
    close_notify_sent: bool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("incoming", &self.incoming.len())
            .field("outgoing", &self.outgoing.len())
            .field("handshaking", &self.handshaking)
            .finish()
    }
}

/// Whether a TLS listener is configured (the shared configuration exists).
pub fn enabled() -> bool {
    SERVER_CONFIG.get().is_some()
}

impl Session {
    /// A session for a just-accepted connection. None when TLS is off.
    pub fn new() -> Option<Box<Session>> {
        Session::with_config(SERVER_CONFIG.get()?.clone())
    }

    fn with_config(config: Arc<ServerConfig>) -> Option<Box<Session>> {
        let conn = UnbufferedServerConnection::new(config).ok()?;
        Some(Box::new(Session {
            conn,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            handshaking: true,
            close_notify_sent: false,
        }))
    }

    pub fn is_handshaking(&self) -> bool {
        self.handshaking
    }

    /// Part of a record waits for the rest.
    pub fn holds_input(&self) -> bool {
        !self.incoming.is_empty()
    }

    /// Takes ciphertext just read (`raw`, decrypted in place): `plain` gets
    /// each record's application data, in order; handshake messages are
    /// answered into [`Session::pending`]. An incomplete record waits in
    /// the session for the rest.
    pub fn receive(
        &mut self,
        raw: &mut [u8],
        plain: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Received, Failure> {
        if self.incoming.is_empty() {
            let (used, received) = self.process(raw, plain)?;
            if used < raw.len() {
                self.keep(&raw[used..])?;
            }
            Ok(received)
        } else {
            self.keep(raw)?;
            let mut incoming = std::mem::take(&mut self.incoming);
            let (used, received) = self.process(&mut incoming, plain)?;
            incoming.drain(..used);
            if !incoming.is_empty() {
                self.incoming = incoming;
            }
            Ok(received)
        }
    }

    fn keep(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        if self.incoming.len() + bytes.len() > INCOMING_BYTES_MAX {
            return Err(Failure {
                during_handshake: self.handshaking,
                kind: Handshake::TooLarge,
                error: "more than a record's bytes buffered".into(),
            });
        }
        self.incoming.extend_from_slice(bytes);
        Ok(())
    }

    /// Runs rustls over `buf`: returns how many bytes it is done with.
    fn process(
        &mut self,
        buf: &mut [u8],
        plain: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(usize, Received), Failure> {
        let mut start = 0;
        let mut received = Received::Open;
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut buf[start..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => return Err(Failure::of(self.handshaking, &e)),
            };
            let mut done = false;
            match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(|e| Failure::of(false, &e))?;
                        discard += record.discard;
                        // The readers unmask WebSocket frames in place:
                        // the record's data is copied out of the read
                        // buffer (rustls lends it immutably).
                        PLAINTEXT.with(|p| {
                            let mut p = p.borrow_mut();
                            p.clear();
                            p.extend_from_slice(record.payload);
                            plain(&mut p);
                        });
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    let out = &mut self.outgoing;
                    let result = grow_into(out, |spare| encode.encode(spare));
                    if let Err(error) = result {
                        return Err(Failure {
                            during_handshake: self.handshaking,
                            kind: Handshake::ProtocolError,
                            error,
                        });
                    }
                }
                // What was encoded goes out first (the caller sends
                // `pending` before anything it seals later).
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::BlockedHandshake => done = true,
                ConnectionState::WriteTraffic(_) => {
                    if self.handshaking {
                        self.handshaking = false;
                        Handshake::Ok.count();
                    }
                    done = true;
                }
                ConnectionState::PeerClosed => received = Received::Closed,
                ConnectionState::Closed => {
                    received = Received::Closed;
                    done = true;
                }
                // Early data is off (max_early_data_size 0).
                _ => done = true,
            }
            start += discard;
            if done {
                return Ok((start, received));
            }
        }
    }

    /// Ciphertext waiting for the socket, before anything sealed later.
    pub fn pending(&self) -> &[u8] {
        &self.outgoing
    }

    /// The socket took `n` bytes of [`Session::pending`].
    pub fn sent(&mut self, n: usize) {
        if n >= self.outgoing.len() {
            // Freed, not kept: an idle connection holds no buffer.
            self.outgoing = Vec::new();
        } else {
            self.outgoing.drain(..n);
        }
    }

    /// Keeps what the socket did not take of records sealed elsewhere.
    pub fn unsent(&mut self, bytes: &[u8]) {
        self.outgoing.extend_from_slice(bytes);
    }

    /// Seals `plain` as application data records appended to `out`.
    /// Fails while the handshake is not done.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        loop {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state.map_err(|e| e.to_string())? {
                ConnectionState::WriteTraffic(mut write) => {
                    return grow_into(out, |spare| write.encrypt(plain, spare));
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    grow_into(&mut self.outgoing, |spare| encode.encode(spare))?;
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                _ => return Err("the handshake is not done".into()),
            }
        }
    }

    /// Queues `close_notify` in [`Session::pending`], once: the client
    /// can tell the end of the stream from a cut connection. Returns
    /// whether it did now.
    pub fn close_notify(&mut self) -> bool {
        if self.close_notify_sent || self.handshaking {
            return false;
        }
        self.close_notify_sent = true;
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::WriteTraffic(mut write)) = state {
            let _ = grow_into(&mut self.outgoing, |spare| write.queue_close_notify(spare));
        }
        true
    }

    /// After a failure: the alert rustls queued for the client (why the
    /// handshake failed), into [`Session::pending`].
    pub fn alert_after_failure(&mut self) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            let _ = grow_into(&mut self.outgoing, |spare| encode.encode(spare));
        }
    }
}

/// An error of rustls' unbuffered API that may only say the buffer was
/// too small (and how much room it needs).
trait TooSmall: fmt::Display {
    fn room_needed(&self) -> Option<usize>;
}

impl TooSmall for EncodeError {
    fn room_needed(&self) -> Option<usize> {
        match self {
            EncodeError::InsufficientSize(s) => Some(s.required_size),
            _ => None,
        }
    }
}

impl TooSmall for EncryptError {
    fn room_needed(&self) -> Option<usize> {
        match self {
            EncryptError::InsufficientSize(s) => Some(s.required_size),
            _ => None,
        }
    }
}

/// Appends what `f` writes to `out`, growing it as `f` asks.
fn grow_into<E: TooSmall>(
    out: &mut Vec<u8>,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(), String> {
    let len = out.len();
    let mut room = 256;
    loop {
        out.resize(len + room, 0);
        match f(&mut out[len..]) {
            Ok(n) => {
                out.truncate(len + n);
                return Ok(());
            }
            Err(e) => match e.room_needed() {
                Some(need) if need > room => room = need,
                Some(_) => {
                    out.truncate(len);
                    return Err("rustls asked for less room than it had".into());
                }
                None => {
                    out.truncate(len);
                    return Err(e.to_string());
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use std::io::{Read, Write};

    /// A server configuration with one self-signed certificate for
    /// `localhost`, and a client configuration trusting it.
    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let certified =
            Arc::new(CertifiedKey::from_der(vec![der.clone()], key, &provider).unwrap());
        #[derive(Debug)]
        struct One(Arc<CertifiedKey>);
        impl ResolvesServerCert for One {
            fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
                Some(self.0.clone())
            }
        }
        let server = server_config(Arc::new(One(certified))).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// Moves the client's bytes to the session (`step` bytes at a time)
    /// and the session's answers back until neither has more to say;
    /// returns the plaintext the session handed on.
    fn exchange(
        client: &mut rustls::ClientConnection,
        session: &mut Session,
        step: usize,
    ) -> Result<Vec<u8>, Failure> {
        let mut plain = Vec::new();
        loop {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            let answer = session.pending().to_vec();
            session.sent(answer.len());
            if wire.is_empty() && answer.is_empty() {
                return Ok(plain);
            }
            for piece in wire.chunks_mut(step) {
                session.receive(piece, &mut |p| plain.extend_from_slice(p))?;
            }
            if !answer.is_empty() {
                client.read_tls(&mut &answer[..]).unwrap();
                client.process_new_packets().unwrap();
            }
        }
    }

    #[test]
    fn a_handshake_and_data_both_ways_leave_the_session_without_buffers() {
        let request = b"GET /events?channel=a HTTP/1.1\r\n\r\n";
        for step in [1, 7, 100_000] {
            let (server, client_config) = configs();
            let mut session = Session::with_config(server).unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let mut client = rustls::ClientConnection::new(client_config, name).unwrap();
            client.writer().write_all(request).unwrap();
            let plain = exchange(&mut client, &mut session, step).unwrap();
            assert!(!session.is_handshaking() && !client.is_handshaking());
            assert_eq!(plain, request, "step {step}");
            // Idle: no partial record kept, nothing waiting to be sent.
            assert_eq!(session.incoming.capacity(), 0);
            assert_eq!(session.outgoing.capacity(), 0);

            // Two frames sealed as one record, read back whole.
            let mut sealed = Vec::new();
            let frames = [&b"data: one\n\n"[..], &b"data: two\n\n"[..]].concat();
            session.seal(&frames, &mut sealed).unwrap();
            assert_eq!(sealed.len(), frames.len() + 22, "one TLS 1.3 record");
            client.read_tls(&mut &sealed[..]).unwrap();
            client.process_new_packets().unwrap();
            let mut got = vec![0; frames.len()];
            client.reader().read_exact(&mut got).unwrap();
            assert_eq!(got, frames);

            // The client's close_notify ends the stream.
            client.send_close_notify();
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            let received = session.receive(&mut wire, &mut |_| {}).unwrap();
            assert_eq!(received, Received::Closed);
        }
    }

    #[test]
    fn cleartext_on_the_tls_port_is_a_failed_handshake_named_not_tls() {
        let (server, _) = configs();
        let mut session = Session::with_config(server).unwrap();
        let mut request = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let failure = session.receive(&mut request, &mut |_| {}).unwrap_err();
        assert!(failure.during_handshake);
        assert_eq!(failure.kind, Handshake::NotTls);
        // The alert that says why is there to send.
        session.alert_after_failure();
        assert!(!session.pending().is_empty());
    }

    #[test]
    fn a_record_longer_than_a_record_may_be_is_refused_before_it_is_buffered() {
        let (server, _) = configs();
        let mut session = Session::with_config(server).unwrap();
        // A handshake record header promising 64 KiB - 1.
        let mut header = vec![0x16, 0x03, 0x01, 0xff, 0xff];
        let failure = session.receive(&mut header, &mut |_| {}).unwrap_err();
        assert!(failure.during_handshake);
        assert!(session.incoming.len() <= header.len());
    }

    #[test]
    fn sni_names_match_exactly_or_one_wildcard_label() {
        let names = vec!["a.example.com".to_string(), "*.b.example.com".to_string()];
        assert!(serves(&names, "a.example.com"));
        assert!(serves(&names, "A.Example.COM"));
        assert!(serves(&names, "x.b.example.com"));
        assert!(!serves(&names, "b.example.com"));
        assert!(!serves(&names, "y.x.b.example.com"));
        assert!(!serves(&names, "c.example.com"));
    }
}
