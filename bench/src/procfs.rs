//! Memory figures from /proc: a process's resident set and the kernel's slab.

use std::io;

/// `VmRSS` of a process (all its threads), in bytes.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    parse_kib_field(&text, "VmRSS")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{path}: no VmRSS line")))
}

/// `Slab` of /proc/meminfo (the whole machine's kernel slab), in bytes.
pub fn slab_bytes() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    parse_kib_field(&text, "Slab")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/meminfo: no Slab line"))
}

/// CPU time (user + system) a process has used so far, all its threads,
/// from `/proc/PID/stat`, in seconds.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    let ticks = parse_stat_cpu_ticks(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: no utime/stime"),
        )
    })?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in clock
/// ticks. The command name (field 2) may hold spaces and parentheses, so
/// the fields are counted from its last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // rest starts at field 3 (state): utime is the 12th from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time (user + system) this process has used so far, all threads.
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage into a zeroed local struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The listen-queue and SYN counters of `/proc/net/netstat` (TcpExt) that
/// tell whether a connect storm lost SYNs: machine-wide, so a delta over a
/// phase is the bench's own on a quiet loopback.
pub const TCP_COUNTERS: &[&str] = &[
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDrop",
    "TCPReqQFullDoCookies",
    "SyncookiesSent",
];

/// The values of `names` in `/proc/net/netstat`'s TcpExt lines (0 for a
/// name this kernel does not have).
pub fn tcp_ext_counters(names: &[&str]) -> io::Result<Vec<u64>> {
    let text = std::fs::read_to_string("/proc/net/netstat")?;
    Ok(parse_netstat(&text, "TcpExt", names))
}

/// `Prefix: name name …` followed by `Prefix: value value …`.
pub fn parse_netstat(text: &str, prefix: &str, names: &[&str]) -> Vec<u64> {
    let tag = format!("{prefix}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&tag));
    let (Some(keys), Some(values)) = (lines.next(), lines.next()) else {
        return vec![0; names.len()];
    };
    let pairs: Vec<(&str, u64)> = keys
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .map(|(k, v)| (k, v.parse().unwrap_or(0)))
        .collect();
    names
        .iter()
        .map(|n| pairs.iter().find(|(k, _)| k == n).map_or(0, |(_, v)| *v))
        .collect()
}

/// The value of a `Name:   1234 kB` line, in bytes. Used for both
/// /proc/PID/status and /proc/meminfo, which share the format. The name must
/// match exactly (`Slab` is not `SReclaimable`, `VmRSS` is not `VmRSSx`).
pub fn parse_kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, rest) = line.split_once(':')?;
        if key.trim() != name {
            return None;
        }
        let mut words = rest.split_whitespace();
        let value: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some(unit) if unit.eq_ignore_ascii_case("kB") => value.checked_mul(1024),
            // A count without a unit would not be a memory figure.
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tgateway\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
        VmPeak:\t  215084 kB\nVmSize:\t  215084 kB\nVmLck:\t       0 kB\nVmHWM:\t   12345 kB\n\
        VmRSS:\t    8792 kB\nRssAnon:\t    2048 kB\nRssFile:\t    6744 kB\nThreads:\t4\n";

    const MEMINFO: &str = "MemTotal:        8144244 kB\nMemFree:         5251208 kB\n\
        Buffers:           12345 kB\nSReclaimable:      98765 kB\nSlab:             214528 kB\n\
        SUnreclaim:       115763 kB\nHugePages_Total:       0\nHugepagesize:       2048 kB\n";

    #[test]
    fn vmrss_from_proc_status() {
        assert_eq!(parse_kib_field(STATUS, "VmRSS"), Some(8792 * 1024));
        assert_eq!(parse_kib_field(STATUS, "RssAnon"), Some(2048 * 1024));
    }

    #[test]
    fn slab_from_meminfo_not_its_neighbours() {
        assert_eq!(parse_kib_field(MEMINFO, "Slab"), Some(214_528 * 1024));
        assert_eq!(
            parse_kib_field(MEMINFO, "SReclaimable"),
            Some(98_765 * 1024)
        );
    }

    #[test]
    fn missing_or_malformed_lines() {
        assert_eq!(parse_kib_field(STATUS, "Slab"), None);
        assert_eq!(parse_kib_field(MEMINFO, "HugePages_Total"), None, "no unit");
        assert_eq!(parse_kib_field("VmRSS:\t lots kB\n", "VmRSS"), None);
        assert_eq!(parse_kib_field("VmRSS:\n", "VmRSS"), None);
        assert_eq!(parse_kib_field("VmRSSx:\t 1 kB\n", "VmRSS"), None);
        assert_eq!(parse_kib_field("", "VmRSS"), None);
    }

    #[test]
    fn netstat_counters() {
        let text = "TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops\n\
                    TcpExt: 3 0 17 19\n\
                    IpExt: InNoRoutes ListenDrops\n\
                    IpExt: 0 99\n";
        assert_eq!(
            parse_netstat(text, "TcpExt", &["ListenDrops", "ListenOverflows", "Nope"]),
            vec![19, 17, 0]
        );
        assert_eq!(parse_netstat("", "TcpExt", &["ListenDrops"]), vec![0]);
        assert_eq!(
            tcp_ext_counters(TCP_COUNTERS).unwrap().len(),
            TCP_COUNTERS.len()
        );
    }

    #[test]
    fn cpu_ticks_from_proc_stat() {
        let stat = "4242 (gate way) S 1 4242 4242 0 -1 4194560 1234 0 0 0 150 25 0 0 20 0 6 0 \
                    100 215084000 2198 18446744073709551615\n";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(175));
        // A name with a closing parenthesis in it.
        let odd = "7 (a) b) R 1 7 7 0 -1 0 0 0 0 0 3 4 0 0 20 0 1 0 5 0 0\n";
        assert_eq!(parse_stat_cpu_ticks(odd), Some(7));
        assert_eq!(parse_stat_cpu_ticks("7 (x) R 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("no parens"), None);
    }

    #[test]
    fn reads_this_process_and_this_machine() {
        // Burn a little CPU so that there is some to see (ticks are 10 ms).
        let start = std::time::Instant::now();
        while self_cpu_seconds() < 0.05 && start.elapsed().as_secs() < 5 {
            std::hint::black_box((0..10_000u64).sum::<u64>());
        }
        assert!(cpu_seconds(std::process::id()).unwrap() > 0.0);
        assert!(self_cpu_seconds() > 0.0);
        let rss = rss_bytes(std::process::id()).unwrap();
        assert!(rss > 0 && rss.is_multiple_of(1024));
        assert!(slab_bytes().unwrap() > 0);
        assert!(rss_bytes(u32::MAX).is_err());
    }
}
