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
    fn reads_this_process_and_this_machine() {
        let rss = rss_bytes(std::process::id()).unwrap();
        assert!(rss > 0 && rss % 1024 == 0);
        assert!(slab_bytes().unwrap() > 0);
        assert!(rss_bytes(u32::MAX).is_err());
    }
}
