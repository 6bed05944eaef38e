//! Admission control at accept: a connection over the process's share of
//! `connections_max`, over its client address's `connections_per_ip_max`,
//! or over this core's `handshakes_per_s_per_core` is answered
//! `503 Service Unavailable` with a jittered `Retry-After` and closed, before
//! a byte of its request is read. Nothing here runs on the delivery path.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use rand::Rng;

/// Why a new connection was turned away. Named after the limit it crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This core already serves its share of `connections_max`.
    ConnectionsMax,
    /// The client's address already holds `connections_per_ip_max`.
    ConnectionsPerIpMax,
    /// This core has accepted `handshakes_per_s_per_core` in the last second.
    HandshakeRate,
}

impl Refusal {
    const ALL: [Refusal; 3] = [
        Refusal::ConnectionsMax,
        Refusal::ConnectionsPerIpMax,
        Refusal::HandshakeRate,
    ];

    /// The one-line reason in the 503 body and the logs.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ConnectionsMax => "too many connections",
            Refusal::ConnectionsPerIpMax => "too many connections from this address",
            Refusal::HandshakeRate => "too many new connections",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// `Retry-After` is drawn from this range (seconds), uniformly, so that
/// refused clients that obey it do not come back in one wave.
pub const RETRY_AFTER_S_MIN: u32 = 1;
pub const RETRY_AFTER_S_MAX: u32 = 5;

/// The complete 503 response for a refusal, with a jittered `Retry-After`.
pub fn refusal_response(refusal: Refusal) -> Vec<u8> {
    let retry_after_s = rand::thread_rng().gen_range(RETRY_AFTER_S_MIN..=RETRY_AFTER_S_MAX);
    protocol::http::unavailable_response(refusal.reason(), retry_after_s)
}

/// A token bucket holding one second's worth of tokens, refilled from the
/// clock passed in (no timer). Tokens are kept in thousandths so that a
/// refill after a few milliseconds is not lost to rounding.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate_per_s: u64,
    milli_tokens: u64,
    last_ms: u64,
}

impl TokenBucket {
    /// A full bucket: a burst of `rate_per_s` passes at once.
    pub fn new(rate_per_s: u32, now_ms: u64) -> TokenBucket {
        TokenBucket {
            rate_per_s: u64::from(rate_per_s),
            milli_tokens: u64::from(rate_per_s) * 1000,
            last_ms: now_ms,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now_ms: u64) -> bool {
        let elapsed_ms = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let cap = self.rate_per_s * 1000;
        self.milli_tokens = cap.min(self.milli_tokens + elapsed_ms.min(1000) * self.rate_per_s);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

/// Open connections per client address, shared by every core. Locked only
/// when a connection is accepted or closed, never while delivering. An entry
/// costs about 30 bytes and exists only while its address has a connection.
pub struct IpCounts {
    max: u32,
    counts: Mutex<HashMap<IpAddr, u32>>,
}

impl IpCounts {
    pub fn new(max: u32) -> IpCounts {
        IpCounts {
            max,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more connection from `ip`, unless it is at its maximum.
    pub fn acquire(&self, ip: IpAddr) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }

    pub fn release(&self, ip: IpAddr) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&ip);
            }
        }
    }

    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.counts.lock().unwrap().len()
    }
}

/// One core's admission state.
pub struct Admission {
    /// This core's share of `connections_max`.
    connections_max: usize,
    per_ip: Option<Arc<IpCounts>>,
    handshakes: Cell<Option<TokenBucket>>,
    /// Refusals since the sweep last logged them, per reason: one log line
    /// a second at most, however hard clients knock.
    refused: [Cell<u64>; 3],
}

impl Admission {
    /// `per_ip` is the table every core shares (None when that limit is off).
    pub fn new(
        cfg: &crate::config::Config,
        cores: usize,
        per_ip: Option<Arc<IpCounts>>,
        now_ms: u64,
    ) -> Admission {
        let rate = cfg.handshakes_per_s_per_core;
        Admission {
            connections_max: cfg.connections_max.div_ceil(cores.max(1)),
            per_ip,
            handshakes: Cell::new((rate > 0).then(|| TokenBucket::new(rate, now_ms))),
            refused: Default::default(),
        }
    }

    /// Decides on a new connection while `open` connections are served by
    /// this core. On success the connection holds a place under `ip` in the
    /// address table (when there is one) until [`Admission::release`].
    /// `ip` is None for a proxy's connection, whose client is not known
    /// yet (see [`Admission::admit_address`]).
    pub fn admit(&self, open: usize, ip: Option<IpAddr>, now_ms: u64) -> Result<(), Refusal> {
        self.count(self.decide(open, ip, now_ms))
    }

    /// Takes a place in the address table for a client named by its
    /// proxy's PROXY header.
    pub fn admit_address(&self, ip: IpAddr) -> Result<(), Refusal> {
        self.count(match &self.per_ip {
            Some(table) if !table.acquire(ip) => Err(Refusal::ConnectionsPerIpMax),
            _ => Ok(()),
        })
    }

    fn count(&self, verdict: Result<(), Refusal>) -> Result<(), Refusal> {
        if let Err(refusal) = verdict {
            let counter = &self.refused[refusal.index()];
            counter.set(counter.get() + 1);
        }
        verdict
    }

    fn decide(&self, open: usize, ip: Option<IpAddr>, now_ms: u64) -> Result<(), Refusal> {
        if open >= self.connections_max {
            return Err(Refusal::ConnectionsMax);
        }
        if let Some(mut bucket) = self.handshakes.get() {
            let ok = bucket.take(now_ms);
            self.handshakes.set(Some(bucket));
            if !ok {
                return Err(Refusal::HandshakeRate);
            }
        }
        if let (Some(table), Some(ip)) = (&self.per_ip, ip) {
            if !table.acquire(ip) {
                return Err(Refusal::ConnectionsPerIpMax);
            }
        }
        Ok(())
    }

    /// Whether admitted connections hold a place in the address table.
    pub fn counts_addresses(&self) -> bool {
        self.per_ip.is_some()
    }

    /// Gives back the address-table place of a closed connection.
    pub fn release(&self, ip: IpAddr) {
        if let Some(table) = &self.per_ip {
            table.release(ip);
        }
    }

    /// Refusals since the last call, per reason (for the sweep's log line).
    pub fn take_refused(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .into_iter()
            .map(|r| (r, self.refused[r.index()].take()))
            .filter(|&(_, n)| n > 0)
    }
}

/// The address a client is counted under: an IPv4 client of a dual-stack
/// listener (`::ffff:a.b.c.d`) is the same client as over IPv4.
pub fn client_ip(peer: std::net::SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_passes_a_burst_then_refills_with_time() {
        let mut b = TokenBucket::new(3, 0);
        assert!(b.take(0) && b.take(0) && b.take(0));
        assert!(!b.take(0));
        assert!(!b.take(100), "a third of a token after 100 ms at 3/s");
        assert!(!b.take(300), "0.9 tokens");
        assert!(b.take(334), "one token after 1/3 s");
        // A long pause refills one second's worth, not more.
        assert!((0..3).all(|_| b.take(60_000)));
        assert!(!b.take(60_000));
        // A clock that goes backwards takes nothing and gives nothing.
        assert!(!b.take(1));
    }

    #[test]
    fn address_table_counts_per_address_and_forgets_empty_ones() {
        let t = IpCounts::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(t.acquire(a) && t.acquire(a) && !t.acquire(a));
        assert!(t.acquire(b));
        t.release(a);
        assert!(t.acquire(a));
        t.release(a);
        t.release(a);
        t.release(b);
        assert_eq!(t.addresses(), 0);
    }

    #[test]
    fn limits_are_checked_in_order_and_refusals_counted() {
        let cfg = crate::config::Config {
            connections_max: 3,
            connections_per_ip_max: 1,
            handshakes_per_s_per_core: 2,
            ..Default::default()
        };
        let table = Arc::new(IpCounts::new(1));
        // Two cores: this one's share of 3 is 2.
        let adm = Admission::new(&cfg, 2, Some(table.clone()), 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(adm.admit(0, Some(a), 0), Ok(()));
        assert_eq!(adm.admit(1, Some(a), 0), Err(Refusal::ConnectionsPerIpMax));
        assert_eq!(adm.admit(1, Some(b), 0), Err(Refusal::HandshakeRate));
        assert_eq!(adm.admit(2, Some(b), 5_000), Err(Refusal::ConnectionsMax));
        assert_eq!(adm.admit(1, Some(b), 5_000), Ok(()));
        // A proxy's connection: the client is counted once its header
        // names it.
        assert_eq!(adm.admit(0, None, 10_000), Ok(()));
        assert_eq!(adm.admit_address(b), Err(Refusal::ConnectionsPerIpMax));
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        assert_eq!(adm.admit_address(c), Ok(()));
        assert_eq!(adm.admit_address(c), Err(Refusal::ConnectionsPerIpMax));
        let refused: Vec<_> = adm.take_refused().collect();
        assert_eq!(
            refused,
            vec![
                (Refusal::ConnectionsMax, 1),
                (Refusal::ConnectionsPerIpMax, 3),
                (Refusal::HandshakeRate, 1)
            ]
        );
        assert_eq!(adm.take_refused().count(), 0);
    }

    #[test]
    fn retry_after_is_jittered_within_its_range() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let r = String::from_utf8(refusal_response(Refusal::ConnectionsMax)).unwrap();
            assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
            let v: u32 = r
                .lines()
                .find_map(|l| l.strip_prefix("Retry-After: "))
                .unwrap()
                .parse()
                .unwrap();
            assert!((RETRY_AFTER_S_MIN..=RETRY_AFTER_S_MAX).contains(&v));
            seen.insert(v);
        }
        assert!(seen.len() > 1, "Retry-After never varied: {seen:?}");
    }

    #[test]
    fn mapped_ipv4_counts_as_ipv4() {
        let v6: std::net::SocketAddr = "[::ffff:10.1.2.3]:5".parse().unwrap();
        assert_eq!(client_ip(v6), "10.1.2.3".parse::<IpAddr>().unwrap());
    }
}
