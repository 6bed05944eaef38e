//! The figures: the idle scenario's report (per-connection arithmetic, the
//! human table and the one-line JSON), latency summaries, and the
//! comparison every scenario prints with several servers (first / other).

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::cli::{ServerKind, Transport};
use crate::util::{opt, thousands};

/// `(after - before) / n` in bytes, signed (memory can shrink), `None` for
/// no connections.
pub fn per_conn(before: u64, after: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| (after as f64 - before as f64) / n as f64)
}

/// Events per second, `None` when no time passed.
pub fn rate(n: u64, secs: f64) -> Option<f64> {
    (secs > 0.0).then(|| n as f64 / secs)
}

/// Rounds to one decimal (what the JSON carries).
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// What `/healthz` said after the connections were open.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    /// `total` connections now (per core in `per_core`); `baseline` is what
    /// it reported before any bench connection was opened. Both counts include
    /// whatever the server counts of the asking connection itself, so
    /// `total == baseline + open` is the check.
    Checked {
        baseline: u64,
        total: u64,
        per_core: Vec<u64>,
    },
    /// Not checked (an attached server without `/healthz`), and why.
    Unavailable(String),
    /// `/healthz` answered before the run but not after it: an error.
    Failed(String),
}

impl Health {
    /// What `/healthz` answered after the connections were open, against
    /// `baseline`, its count before them.
    pub fn checked(baseline: u64, answer: Result<Vec<u64>, String>) -> Health {
        match answer {
            Ok(per_core) => Health::Checked {
                baseline,
                total: per_core.iter().sum(),
                per_core,
            },
            Err(e) => Health::Failed(e),
        }
    }

    /// What is wrong with the count after `open` connections, if anything:
    /// a count other than the baseline plus them, or no answer (`when`
    /// says at which point of the run it was asked).
    pub fn error(&self, open: u64, when: &str) -> Option<String> {
        match self {
            Health::Checked {
                baseline, total, ..
            } if *total != baseline + open => Some(format!(
                "/healthz counts {total} connections, expected {} ({baseline} + {open} open)",
                baseline + open
            )),
            Health::Failed(why) => Some(format!("/healthz failed {when}: {why}")),
            _ => None,
        }
    }

    pub fn expected(&self, open: u64) -> Option<u64> {
        match self {
            Health::Checked { baseline, .. } => Some(baseline + open),
            Health::Unavailable(_) | Health::Failed(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct IdleReport {
    pub transport: Transport,
    /// Which server this is.
    pub kind: ServerKind,
    /// "spawned" or "attached".
    pub server: &'static str,
    pub pid: u32,
    pub target: String,
    /// Cores the spawned gateway was given (`None` when attached).
    pub cores: Option<u32>,
    pub channels: u64,
    pub sources: usize,
    pub requested: u64,
    /// Connections whose handshake succeeded (the divisor of every per-connection figure).
    pub open: u64,
    /// Handshakes that failed, by reason, with one example each.
    pub failures: Vec<(String, u64, String)>,
    /// Connections not even attempted before --connect-timeout-s.
    pub not_attempted: u64,
    /// From the first connect to the last completed handshake.
    pub connect_s: f64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub slab_before: u64,
    pub slab_after: u64,
    pub health: Health,
    /// Where the server's connections were counted: "/healthz", or
    /// "/proc/net/tcp" for servers without one (nchan, Bun).
    pub connections_source: &'static str,
    /// What the RSS figures are of: "process", or nginx's master and
    /// workers summed.
    pub rss_scope: String,
    /// Open connections the server had closed (or reset) by the end of the hold.
    pub closed_during_hold: u64,
    /// Open connections that had unexpected bytes waiting at the end of the hold.
    pub data_during_hold: u64,
    /// SSE connections with nothing but comments waiting (a greeting such
    /// as nchan's `: hi`): no message, not an error.
    pub sse_comments_during_hold: u64,
    /// Bytes received after response heads (idle connections should get none).
    pub bytes_after_head: u64,
    /// With `--deflate`: the connections whose 101 agreed to
    /// permessage-deflate (None: not offered).
    pub deflate_agreed: Option<u64>,
    /// After the bench closed its connections: the count `/healthz` should
    /// return to (the baseline), and what it said last (`None`: not asked,
    /// or no answer).
    pub healthz_baseline_after_close: Option<u64>,
    pub healthz_after_close: Option<u64>,
    /// Server RSS after the connections were closed.
    pub rss_after_close: Option<u64>,
    /// Over TLS: what the handshakes negotiated and what the clients
    /// offered (`None`: cleartext).
    pub tls: Option<String>,
}

impl IdleReport {
    pub fn failed(&self) -> u64 {
        self.failures.iter().map(|(_, n, _)| n).sum()
    }

    pub fn rss_per_conn(&self) -> Option<f64> {
        per_conn(self.rss_before, self.rss_after, self.open)
    }

    pub fn slab_per_conn(&self) -> Option<f64> {
        per_conn(self.slab_before, self.slab_after, self.open)
    }

    pub fn connects_per_s(&self) -> Option<f64> {
        rate(self.open, self.connect_s)
    }

    /// Everything that makes the run's figures suspect; empty means clean.
    pub fn errors(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.open < self.requested {
            errors.push(format!(
                "{} of {} connections not open ({} failed, {} not attempted before --connect-timeout-s)",
                self.requested - self.open,
                self.requested,
                self.failed(),
                self.not_attempted
            ));
        }
        for (reason, n, example) in &self.failures {
            errors.push(format!("{n} × {reason} (e.g. {example})"));
        }
        if let Health::Checked {
            baseline,
            total,
            per_core,
        } = &self.health
        {
            let expected = baseline + self.open;
            if *total != expected {
                errors.push(format!(
                    "{} counts {total} connections {per_core:?}, expected {expected} \
                     ({baseline} before the run + {} open)",
                    self.connections_source, self.open
                ));
            }
        }
        if let Health::Failed(why) = &self.health {
            errors.push(format!(
                "{} failed after the connections were open: {why}",
                self.connections_source
            ));
        }
        if self.closed_during_hold > 0 {
            errors.push(format!(
                "{} open connections were closed by the server during the hold",
                self.closed_during_hold
            ));
        }
        if let Some(baseline) = self.healthz_baseline_after_close {
            match self.healthz_after_close {
                Some(n) if n == baseline => {}
                Some(n) => errors.push(format!(
                    "{} still counts {n} connections after the bench closed them all (expected {baseline})",
                    self.connections_source
                )),
                None => errors.push(format!(
                    "{} did not answer after the connections were closed",
                    self.connections_source
                )),
            }
        }
        if self.data_during_hold > 0 {
            errors.push(format!(
                "{} idle connections received data ({} bytes after the response heads)",
                self.data_during_hold, self.bytes_after_head
            ));
        }
        errors
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "idle {}: {}",
            self.transport.name(),
            server_line(self.kind, self.pid, &self.target, self.cores)
        );
        let _ = writeln!(
            t,
            "  {:<26} {} of {} ({} failed), {} channels, {} source address(es)",
            "connections open",
            self.open,
            self.requested,
            self.failed(),
            self.channels,
            self.sources
        );
        if let Some(tls) = &self.tls {
            let _ = writeln!(t, "  {:<26} {tls}", "TLS");
        }
        let _ = writeln!(t, "  {:<26} {:.3} s", "connect time", self.connect_s);
        let _ = writeln!(
            t,
            "  {:<26} {}",
            "connects/s",
            opt(self.connects_per_s(), 0)
        );
        let _ = writeln!(
            t,
            "  {:<26} {}",
            "server RSS before",
            bytes(self.rss_before)
        );
        let _ = writeln!(t, "  {:<26} {}", "server RSS after", bytes(self.rss_after));
        if self.rss_scope != "process" {
            let _ = writeln!(t, "  {:<26} {}", "RSS of", self.rss_scope);
        }
        let _ = writeln!(
            t,
            "  {:<26} {} B",
            "RSS / connection (user)",
            opt(self.rss_per_conn(), 1)
        );
        let _ = writeln!(t, "  {:<26} {}", "Slab before", bytes(self.slab_before));
        let _ = writeln!(t, "  {:<26} {}", "Slab after", bytes(self.slab_after));
        let _ = writeln!(
            t,
            "  {:<26} {} B   (whole machine: on loopback this includes the client's end)",
            "Slab / connection (kernel)",
            opt(self.slab_per_conn(), 1)
        );
        let health =
            match &self.health {
                Health::Checked {
                    baseline,
                    total,
                    per_core,
                } => format!(
                "{total} connections {per_core:?} (expected {} = {baseline} before + {} open){}",
                baseline + self.open,
                self.open,
                if *total == baseline + self.open { " ok" } else { " MISMATCH" }
            ),
                Health::Unavailable(why) => format!("not checked: {why}"),
                Health::Failed(why) => format!("FAILED: {why}"),
            };
        let _ = writeln!(t, "  {:<26} {health}", self.connections_source);
        if let Some(n) = self.deflate_agreed {
            let _ = writeln!(
                t,
                "  {:<26} {n} of {} open",
                "permessage-deflate agreed", self.open
            );
        }
        let _ = writeln!(
            t,
            "  {:<26} {} closed, {} with data",
            "during the hold", self.closed_during_hold, self.data_during_hold
        );
        if self.sse_comments_during_hold > 0 {
            let _ = writeln!(
                t,
                "  {:<26} {} with only SSE comments waiting (a greeting, no message)",
                "", self.sse_comments_during_hold
            );
        }
        if let Some(b) = self.healthz_baseline_after_close {
            let now = self
                .healthz_after_close
                .map_or("no answer".to_string(), |n| n.to_string());
            let _ = writeln!(
                t,
                "  {:<26} {} {now} (expected {b})",
                "after close", self.connections_source
            );
        }
        if let Some(rss) = self.rss_after_close {
            let _ = writeln!(t, "  {:<26} {}", "server RSS after close", bytes(rss));
        }
        for e in self.errors() {
            let _ = writeln!(t, "  ERROR: {e}");
        }
        t
    }

    pub fn json(&self) -> Value {
        let (health_total, health_expected, health_per_core) = match &self.health {
            Health::Checked {
                total, per_core, ..
            } => (
                json!(total),
                json!(self.health.expected(self.open)),
                json!(per_core),
            ),
            Health::Unavailable(_) | Health::Failed(_) => (Value::Null, Value::Null, Value::Null),
        };
        let errors = self.errors();
        json!({
            "scenario": "idle",
            "transport": self.transport.name(),
            "tls": self.tls,
            "server": self.kind.name(),
            "process": self.server,
            "pid": self.pid,
            "cores": self.cores,
            "channels": self.channels,
            "connections": self.requested,
            "connections_open": self.open,
            "connections_failed": self.failed(),
            "connect_s": (self.connect_s * 1000.0).round() / 1000.0,
            "connects_per_s": self.connects_per_s().map(|r| r.round()),
            "rss_before_bytes": self.rss_before,
            "rss_after_bytes": self.rss_after,
            "rss_of": self.rss_scope,
            "rss_bytes_per_conn": self.rss_per_conn().map(round1),
            "slab_before_bytes": self.slab_before,
            "slab_after_bytes": self.slab_after,
            "slab_bytes_per_conn": self.slab_per_conn().map(round1),
            "connections_counted_by": self.connections_source,
            "healthz_connections": health_total,
            "healthz_expected": health_expected,
            "healthz_per_core": health_per_core,
            "closed_during_hold": self.closed_during_hold,
            "deflate_agreed": self.deflate_agreed,
            "sse_comments_during_hold": self.sse_comments_during_hold,
            "healthz_after_close": self.healthz_after_close,
            "rss_after_close_bytes": self.rss_after_close,
            "failures": failures_json(&self.failures),
            "ok": errors.is_empty(),
            "errors": errors,
        })
    }
}

/// `12,345,678 B (11.8 MiB)`.
pub fn bytes(n: u64) -> String {
    format!(
        "{} B ({:.1} MiB)",
        thousands(n),
        n as f64 / (1024.0 * 1024.0)
    )
}

/// A table's server line: `spawned gateway pid 42 at 127.0.0.1:1234, 2
/// cores`, or `attached gateway pid 42 at …` (no `cores`); nginx's cores
/// are its worker processes, Bun runs one JavaScript thread whatever
/// `--cores` says.
pub fn server_line(kind: ServerKind, pid: u32, target: &str, cores: Option<u32>) -> String {
    let name = kind.name();
    match (kind, cores) {
        (_, None) => format!("attached {name} pid {pid} at {target}"),
        (ServerKind::Nchan, Some(c)) => {
            format!("spawned nchan (nginx master pid {pid}) at {target}, {c} worker processes")
        }
        (ServerKind::Bun, Some(_)) => format!(
            "spawned bun pid {pid} at {target}, one JavaScript thread (--cores does not apply)"
        ),
        (_, Some(c)) => format!("spawned {name} pid {pid} at {target}, {c} cores"),
    }
}

/// A report's `failures` JSON object: reason → count.
pub fn failures_json(failures: &[(String, u64, String)]) -> Value {
    Value::Object(
        failures
            .iter()
            .map(|(reason, n, _)| (reason.clone(), json!(n)))
            .collect(),
    )
}

/// The idle figures `--server both` compares.
pub const IDLE_COMPARED: &[(&str, &str)] = &[
    ("RSS / connection (B)", "rss_bytes_per_conn"),
    ("Slab / connection (B)", "slab_bytes_per_conn"),
    ("connects/s", "connects_per_s"),
];

/// A latency distribution's summary, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub max_us: Option<f64>,
    pub mean_us: Option<f64>,
}

impl Latency {
    /// From a histogram of nanoseconds (all `None` when it is empty).
    pub fn from_ns(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| Some(ns as f64 / 1000.0);
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: Some(h.mean() / 1000.0),
        }
    }

    pub fn json(&self) -> Value {
        let r = |x: Option<f64>| x.map(round1);
        json!({
            "count": self.count,
            "p50": r(self.p50_us),
            "p90": r(self.p90_us),
            "p99": r(self.p99_us),
            "p999": r(self.p999_us),
            "max": r(self.max_us),
            "mean": r(self.mean_us),
        })
    }
}

/// `gateway / baseline`, when both are there, finite, and the baseline's is
/// not zero.
pub fn ratio(gateway: Option<f64>, baseline: Option<f64>) -> Option<f64> {
    match (gateway, baseline) {
        (Some(g), Some(b)) if g.is_finite() && b.is_finite() && b != 0.0 => Some(g / b),
        _ => None,
    }
}

/// The number at a dotted path (`latency_us.p99`) of a JSON object.
pub fn number_at(v: &Value, path: &str) -> Option<f64> {
    path.split('.')
        .try_fold(v, |v, key| v.get(key))
        .and_then(Value::as_f64)
}

/// A compared figure with the decimals its size deserves: none from 1000
/// up, one from 10, three below (seconds of 0.034 and 0.075 must not both
/// read 0.1); `-` when absent.
pub fn figure(x: Option<f64>) -> String {
    match x {
        Some(v) if v.abs() >= 1000.0 => opt(x, 0),
        Some(v) if v.abs() >= 10.0 => opt(x, 1),
        _ => opt(x, 3),
    }
}

/// The figure at `path` of a report: a count as the integer it is, a
/// measure by [`figure`].
fn figure_at(report: &Value, path: &str) -> String {
    match path.split('.').try_fold(report, |v, key| v.get(key)) {
        Some(n) if n.is_u64() || n.is_i64() => n.to_string(),
        other => figure(other.and_then(Value::as_f64)),
    }
}

/// Compares the first run's JSON report with each other's on `figures`
/// (label, dotted path): a human table (figure, each server's value, then
/// first / other for each other server) and a JSON object keyed by the
/// other server's name, each path → ratio (null where there is none).
pub fn compare(runs: &[(ServerKind, Value)], figures: &[(&str, &str)]) -> (String, Value) {
    let mut t = String::new();
    let Some(((first, first_json), others)) = runs.split_first() else {
        return (t, Value::Object(Default::default()));
    };
    let names: Vec<&str> = others.iter().map(|(k, _)| k.name()).collect();
    let _ = writeln!(
        t,
        "{} vs {} (ratio = {} / other):",
        first.name(),
        names.join(", "),
        first.name()
    );
    let _ = write!(t, "  {:<34} {:>14}", "figure", first.name());
    for name in &names {
        let _ = write!(t, " {name:>14}");
    }
    for name in &names {
        let _ = write!(t, " {:>12}", format!("/{name}"));
    }
    let _ = writeln!(t);
    let mut ratios: Vec<serde_json::Map<String, Value>> = vec![Default::default(); others.len()];
    for (label, path) in figures {
        let f = number_at(first_json, path);
        let values: Vec<Option<f64>> = others.iter().map(|(_, v)| number_at(v, path)).collect();
        let _ = write!(t, "  {label:<34} {:>14}", figure_at(first_json, path));
        for (_, v) in others {
            let _ = write!(t, " {:>14}", figure_at(v, path));
        }
        for (v, r) in values.iter().zip(ratios.iter_mut()) {
            let x = ratio(f, *v);
            let _ = write!(t, " {:>12}", opt(x, 3));
            r.insert(
                path.to_string(),
                json!(x.map(|r| (r * 1000.0).round() / 1000.0)),
            );
        }
        let _ = writeln!(t);
    }
    let by_name = names
        .iter()
        .zip(ratios)
        .map(|(name, r)| (name.to_string(), Value::Object(r)))
        .collect();
    (t, Value::Object(by_name))
}

/// The one JSON line of a run: one server's report as it is, or several
/// (each report under its server's name, in order under `servers`, plus
/// `ratios`: other server's name → figure → first / other).
pub fn combined_json(scenario: &str, runs: &[(ServerKind, Value)], ratios: Option<Value>) -> Value {
    if let ([(_, only)], None) = (runs, &ratios) {
        return only.clone();
    }
    let ok = runs.iter().all(|(_, v)| v["ok"] == Value::Bool(true));
    let names: Vec<&str> = runs.iter().map(|(k, _)| k.name()).collect();
    let mut out = serde_json::Map::new();
    out.insert("scenario".into(), json!(scenario));
    out.insert("servers".into(), json!(names));
    for (kind, v) in runs {
        out.insert(kind.name().into(), v.clone());
    }
    if let Some(first) = names.first() {
        out.insert("ratio".into(), json!(format!("{first} / other")));
    }
    out.insert("ratios".into(), ratios.unwrap_or(Value::Null));
    out.insert("ok".into(), json!(ok));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> IdleReport {
        IdleReport {
            transport: Transport::Ws,
            kind: ServerKind::Gateway,
            server: "spawned",
            pid: 42,
            target: "127.0.0.1:1234".into(),
            cores: Some(2),
            channels: 100,
            sources: 1,
            requested: 10_000,
            open: 10_000,
            failures: vec![],
            not_attempted: 0,
            connect_s: 2.5,
            rss_before: 4_000_000,
            rss_after: 11_000_000,
            slab_before: 200_000_000,
            slab_after: 290_000_000,
            health: Health::Checked {
                baseline: 1,
                total: 10_001,
                per_core: vec![5_001, 5_000],
            },
            connections_source: "/healthz",
            rss_scope: "process".into(),
            closed_during_hold: 0,
            deflate_agreed: None,
            data_during_hold: 0,
            sse_comments_during_hold: 0,
            bytes_after_head: 0,
            healthz_baseline_after_close: Some(1),
            healthz_after_close: Some(1),
            rss_after_close: Some(9_000_000),
            tls: None,
        }
    }

    #[test]
    fn per_connection_arithmetic() {
        assert_eq!(per_conn(1_000, 8_000, 10), Some(700.0));
        assert_eq!(
            per_conn(8_000, 1_000, 10),
            Some(-700.0),
            "memory can shrink"
        );
        assert_eq!(per_conn(1, 2, 0), None);
        assert_eq!(per_conn(0, 7, 2), Some(3.5));
        assert_eq!(rate(10_000, 2.5), Some(4_000.0));
        assert_eq!(rate(10, 0.0), None);
        assert_eq!(round1(703.66), 703.7);
        assert_eq!(round1(-0.04), -0.0);
    }

    #[test]
    fn clean_run() {
        let r = report();
        assert_eq!(r.rss_per_conn(), Some(700.0));
        assert_eq!(r.slab_per_conn(), Some(9_000.0));
        assert!(r.errors().is_empty(), "{:?}", r.errors());
        let j = r.json();
        assert_eq!(j["scenario"], "idle");
        assert_eq!(j["transport"], "ws");
        assert_eq!(j["server"], "gateway");
        assert_eq!(j["process"], "spawned");
        assert_eq!(j["connections"], 10_000);
        assert_eq!(j["connects_per_s"], 4_000.0);
        assert_eq!(j["rss_bytes_per_conn"], 700.0);
        assert_eq!(j["slab_bytes_per_conn"], 9_000.0);
        assert_eq!(j["healthz_connections"], 10_001);
        assert_eq!(j["ok"], true);
        // One line.
        assert!(!j.to_string().contains('\n'));
        let t = r.table();
        assert!(
            t.contains("700.0 B") && t.contains("4000") && t.contains(" ok"),
            "{t}"
        );
        assert!(t.contains("11,000,000 B"), "{t}");
    }

    #[test]
    fn failures_and_mismatches_are_errors() {
        let mut r = report();
        r.open = 9_990;
        r.failures = vec![(
            "status 503 (want 101)".into(),
            10,
            "HTTP/1.1 503 Service Unavailable".into(),
        )];
        r.health = Health::Checked {
            baseline: 1,
            total: 9_995,
            per_core: vec![5_000, 4_995],
        };
        r.closed_during_hold = 3;
        r.healthz_after_close = Some(2);
        let errors = r.errors();
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert!(errors[4].contains("still counts 2"), "{}", errors[4]);
        assert!(errors[0].starts_with("10 of 10000 connections not open (10 failed"));
        assert!(errors[2].contains("expected 9991"), "{}", errors[2]);
        let j = r.json();
        assert_eq!(j["ok"], false);
        assert_eq!(j["connections_failed"], 10);
        assert_eq!(j["failures"]["status 503 (want 101)"], 10);
        assert!(r.table().contains("MISMATCH"));
    }

    #[test]
    fn a_peer_counted_by_its_sockets() {
        let mut r = report();
        r.kind = ServerKind::Nchan;
        r.connections_source = "/proc/net/tcp";
        r.rss_scope = "nginx master + 2 workers (VmRSS summed)".into();
        r.health = Health::Checked {
            baseline: 0,
            total: 9_999,
            per_core: vec![9_999],
        };
        r.sse_comments_during_hold = 10_000;
        let e = r.errors();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("/proc/net/tcp counts 9999"), "{}", e[0]);
        let t = r.table();
        assert!(t.contains("nginx master + 2 workers"), "{t}");
        assert!(t.contains("only SSE comments"), "{t}");
        assert_eq!(r.json()["connections_counted_by"], "/proc/net/tcp");
    }

    #[test]
    fn attached_server_without_healthz() {
        let mut r = report();
        r.cores = None;
        r.server = "attached";
        r.health = Health::Unavailable("connection refused".into());
        assert!(r.errors().is_empty());
        assert_eq!(r.json()["healthz_connections"], Value::Null);
        assert!(r.table().contains("not checked: connection refused"));
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(10.0), Some(4.0)), Some(2.5));
        assert_eq!(ratio(Some(0.0), Some(4.0)), Some(0.0));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None, "no division by zero");
        assert_eq!(ratio(None, Some(1.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
        assert_eq!(ratio(Some(f64::NAN), Some(1.0)), None);
        let g = json!({"deliveries_per_s": 100_000.0, "latency_us": {"p99": 300.0, "p50": null}, "ok": true});
        let b = json!({"deliveries_per_s": 80_000, "latency_us": {"p99": 1200.0, "p50": 40.0}, "ok": false});
        assert_eq!(number_at(&g, "latency_us.p99"), Some(300.0));
        assert_eq!(number_at(&b, "deliveries_per_s"), Some(80_000.0));
        assert_eq!(number_at(&g, "latency_us.p50"), None);
        assert_eq!(number_at(&g, "latency_us.p99.x"), None);
        assert_eq!(number_at(&g, "nothing"), None);
        let figures = &[
            ("deliveries/s", "deliveries_per_s"),
            ("p99 µs", "latency_us.p99"),
            ("p50 µs", "latency_us.p50"),
        ];
        let runs = [
            (ServerKind::Gateway, g.clone()),
            (ServerKind::Baseline, b.clone()),
        ];
        let (table, r) = compare(&runs, figures);
        assert_eq!(r["baseline"]["deliveries_per_s"], 1.25);
        assert_eq!(r["baseline"]["latency_us.p99"], 0.25);
        assert_eq!(r["baseline"]["latency_us.p50"], Value::Null);
        assert!(
            table.contains("1.250") && table.contains("0.250"),
            "{table}"
        );
        assert!(table.starts_with("gateway vs baseline (ratio = gateway / other):\n"));
        let both = combined_json("fanout", &runs, Some(r));
        assert_eq!(both["servers"], json!(["gateway", "baseline"]));
        assert_eq!(both["gateway"]["deliveries_per_s"], 100_000.0);
        assert_eq!(both["ratios"]["baseline"]["latency_us.p99"], 0.25);
        assert_eq!(both["ratio"], "gateway / other");
        assert_eq!(both["ok"], false, "the baseline's run was not ok");
        // One server: its report as it is.
        assert_eq!(
            combined_json("fanout", &[(ServerKind::Gateway, g.clone())], None),
            g
        );
    }

    #[test]
    fn figures_keep_their_digits() {
        assert_eq!(figure(Some(11_829_248.0)), "11829248");
        assert_eq!(figure(Some(47.0)), "47.0");
        assert_eq!(figure(Some(0.034)), "0.034");
        assert_eq!(figure(Some(-0.5)), "-0.500");
        assert_eq!(figure(None), "-");
    }

    #[test]
    fn the_first_server_against_each_other_one() {
        let g = json!({"handshakes_per_s": 10_000.0, "ok": true});
        let n = json!({"handshakes_per_s": 5_000.0, "ok": true});
        let bun = json!({"handshakes_per_s": 40_000.0, "ok": true});
        let failed =
            json!({"scenario": "storm", "server": "baseline", "ok": false, "errors": ["x"]});
        let runs = [
            (ServerKind::Gateway, g),
            (ServerKind::Nchan, n),
            (ServerKind::Bun, bun),
            (ServerKind::Baseline, failed),
        ];
        let (table, r) = compare(&runs, &[("handshakes/s", "handshakes_per_s")]);
        assert_eq!(r["nchan"]["handshakes_per_s"], 2.0);
        assert_eq!(r["bun"]["handshakes_per_s"], 0.25);
        // A failed run has no figures: no ratio, not a crash.
        assert_eq!(r["baseline"]["handshakes_per_s"], Value::Null);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "gateway vs nchan, bun, baseline (ratio = gateway / other):"
        );
        for col in [
            "gateway",
            "nchan",
            "bun",
            "baseline",
            "/nchan",
            "/bun",
            "/baseline",
        ] {
            assert!(lines[1].contains(col), "{}", lines[1]);
        }
        assert!(
            lines[2].contains(" 10000 ")
                && lines[2].contains("2.000")
                && lines[2].contains("0.250")
                && lines[2].trim_end().ends_with('-'),
            "{}",
            lines[2]
        );
        let j = combined_json("storm", &runs, Some(r));
        assert_eq!(j["servers"], json!(["gateway", "nchan", "bun", "baseline"]));
        assert_eq!(j["ratios"]["bun"]["handshakes_per_s"], 0.25);
        assert_eq!(j["bun"]["handshakes_per_s"], 40_000.0);
        assert_eq!(j["ok"], false);
        assert!(!j.to_string().contains('\n'), "one line");
        // No runs, no table.
        assert_eq!(compare(&[], &[("x", "x")]).0, "");
    }

    #[test]
    fn latency_summary() {
        assert_eq!(
            Latency::from_ns(&Histogram::<u64>::new(3).unwrap()),
            Latency::default()
        );
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let l = Latency::from_ns(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50_us.unwrap() - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_us.unwrap() - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max_us.unwrap() - 1000.0).abs() < 1.0, "{l:?}");
        assert_eq!(l.json()["count"], 1000);
    }

    #[test]
    fn shared_pieces() {
        assert_eq!(
            server_line(ServerKind::Gateway, 42, "127.0.0.1:1234", Some(2)),
            "spawned gateway pid 42 at 127.0.0.1:1234, 2 cores"
        );
        assert_eq!(
            server_line(ServerKind::Baseline, 7, "[::1]:80", None),
            "attached baseline pid 7 at [::1]:80"
        );
        assert_eq!(
            server_line(ServerKind::Nchan, 9, "127.0.0.1:1", Some(2)),
            "spawned nchan (nginx master pid 9) at 127.0.0.1:1, 2 worker processes"
        );
        assert_eq!(
            server_line(ServerKind::Bun, 9, "127.0.0.1:1", Some(1)),
            "spawned bun pid 9 at 127.0.0.1:1, one JavaScript thread (--cores does not apply)"
        );
        let f = failures_json(&[("b".into(), 3, "x".into()), ("a".into(), 1, "y".into())]);
        assert_eq!(f.to_string(), r#"{"b":3,"a":1}"#);
        assert_eq!(
            Health::checked(1, Ok(vec![2, 3])),
            Health::Checked {
                baseline: 1,
                total: 5,
                per_core: vec![2, 3]
            }
        );
        assert_eq!(
            Health::checked(1, Err("refused".into())),
            Health::Failed("refused".into())
        );
    }

    #[test]
    fn byte_formatting() {
        assert_eq!(bytes(0), "0 B (0.0 MiB)");
        assert_eq!(bytes(1_048_576), "1,048,576 B (1.0 MiB)");
        assert_eq!(bytes(123), "123 B (0.0 MiB)");
    }
}
