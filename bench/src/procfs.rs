//! Figures from /proc: a process's (or a process group's) resident set and
//! CPU time, the kernel's slab and TCP counters, and the connections a
//! server holds by its sockets.

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
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system) one thread of this process has used so far
/// (`tid` from gettid(2)), in seconds: roundtrip's hub, apart from the
/// client threads.
pub fn thread_cpu_seconds(tid: u32) -> io::Result<f64> {
    stat_cpu_seconds(&format!("/proc/self/task/{tid}/stat"))
}

fn stat_cpu_seconds(path: &str) -> io::Result<f64> {
    let text = std::fs::read_to_string(path)
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

/// The direct children of a process: from `/proc/PID/task/*/children`
/// (each thread lists the children it forked) where the kernel has them
/// (CONFIG_PROC_CHILDREN), else by scanning every `/proc/*/stat` for its
/// parent pid.
pub fn children(pid: u32) -> Vec<u32> {
    let listed: Option<Vec<u32>> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()
        .and_then(|tasks| {
            let mut all = Vec::new();
            for task in tasks {
                let path = task.ok()?.path().join("children");
                let text = std::fs::read_to_string(path).ok()?;
                all.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
            Some(all)
        });
    if let Some(children) = listed {
        return children;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| parse_stat_ppid(&stat))
                == Some(pid)
        })
        .collect()
}

/// The parent pid (field 4) of a `/proc/PID/stat` line.
pub fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `VmRSS` summed over a process and its direct children. Pages they share
/// (code, nginx's shared memory zones) count once per process that has them
/// resident: an upper bound of what the group uses, and its delta is what
/// the connections added to it.
pub fn tree_rss_bytes(pid: u32) -> io::Result<u64> {
    // The parent first: if it is gone, say so rather than sum the rest.
    let mut total = rss_bytes(pid)?;
    for child in children(pid) {
        // A child that exited in between has nothing resident any more.
        total += rss_bytes(child).unwrap_or(0);
    }
    Ok(total)
}

/// CPU seconds (user + system) of a process plus those of its direct
/// children that are still running.
pub fn tree_cpu_seconds(pid: u32) -> io::Result<f64> {
    let mut total = cpu_seconds(pid)?;
    for child in children(pid) {
        total += cpu_seconds(child).unwrap_or(0.0);
    }
    Ok(total)
}

/// TCP states (as `/proc/net/tcp` writes them) of a connection a server
/// still holds: ESTABLISHED, and CLOSE_WAIT (the peer has closed, the
/// server has not yet).
const HELD_STATES: [&str; 2] = ["01", "08"];

/// Connections a server listening on `listen` holds now: the sockets of
/// `/proc/net/tcp` and `/proc/net/tcp6` whose local address is `listen`
/// (any local address with its port when `listen` is a wildcard) in a
/// [`HELD_STATES`] state. It counts for servers without `/healthz`; it is
/// this network namespace's view, the client's ends are not among them
/// (their local port is an ephemeral one).
pub fn server_connections(listen: std::net::SocketAddr) -> io::Result<u64> {
    let mut n = 0;
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(path) {
            Ok(text) => n += count_held(&text, listen),
            // No IPv6 in this kernel: no tcp6 file.
            Err(e) if e.kind() == io::ErrorKind::NotFound && path.ends_with('6') => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
        }
    }
    Ok(n)
}

/// Counts the lines of a `/proc/net/tcp{,6}` table held on `listen` (see
/// [`server_connections`]).
pub fn count_held(table: &str, listen: std::net::SocketAddr) -> u64 {
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let (Some(_slot), Some(local), Some(_remote), Some(state)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                return false;
            };
            HELD_STATES.contains(&state)
                && parse_proc_net_addr(local).is_some_and(|a| {
                    a.port() == listen.port()
                        && (listen.ip().is_unspecified() || a.ip() == listen.ip())
                })
        })
        .count() as u64
}

/// An `ADDR:PORT` of `/proc/net/tcp` (8 hex digits, the IPv4 address in
/// host byte order) or `/proc/net/tcp6` (32 hex digits: four 32-bit words,
/// each in host byte order); an IPv4-mapped IPv6 address comes back as IPv4.
pub fn parse_proc_net_addr(field: &str) -> Option<std::net::SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = match addr.len() {
        8 => std::net::Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?.to_ne_bytes()).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, word) in bytes.chunks_exact_mut(4).enumerate() {
                let w = u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok()?;
                word.copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            match v6.to_ipv4_mapped() {
                Some(v4) => v4.into(),
                None => v6.into(),
            }
        }
        _ => return None,
    };
    Some((ip, port).into())
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
    fn parent_pid_from_proc_stat() {
        let stat = "4243 (nginx: worker) S 4242 4242 4242 0 -1 4194560 1234 0 0 0 150 25\n";
        assert_eq!(parse_stat_ppid(stat), Some(4242));
        assert_eq!(parse_stat_ppid("1 (init"), None);
        // This test process is a child of its parent.
        let me = std::process::id();
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() } as u32;
        assert!(children(parent).contains(&me));
        // (Not compared with rss_bytes(me): other tests allocate meanwhile.)
        assert!(tree_rss_bytes(me).unwrap() > 0);
        assert!(tree_cpu_seconds(me).is_ok());
        assert!(tree_rss_bytes(u32::MAX).is_err());
    }

    #[test]
    fn held_connections_from_proc_net_tcp() {
        // 127.0.0.1:8080 listening, two accepted (one ESTABLISHED, one
        // CLOSE_WAIT), one in TIME_WAIT, the client's end of one, and an
        // IPv4-mapped one in tcp6.
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1\n\
            1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2\n\
            2: 0100007F:1F90 0100007F:D432 08 00000000:00000000 00:00000000 00000000     0        0 3\n\
            3: 0100007F:1F90 0100007F:D433 06 00000000:00000000 00:00000000 00000000     0        0 0\n\
            4: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4\n";
        let listen: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(count_held(tcp, listen), 2);
        assert_eq!(count_held(tcp, "0.0.0.0:8080".parse().unwrap()), 2);
        assert_eq!(count_held(tcp, "127.0.0.2:8080".parse().unwrap()), 0);
        assert_eq!(count_held(tcp, "127.0.0.1:8081".parse().unwrap()), 0);
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
            0: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:D431 01 0\n\
            1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D432 01 0\n";
        assert_eq!(count_held(tcp6, listen), 1);
        assert_eq!(count_held(tcp6, "[::1]:8080".parse().unwrap()), 1);
        assert_eq!(parse_proc_net_addr("0100007F:1F90"), Some(listen));
        assert_eq!(parse_proc_net_addr("0100007F"), None);
        assert_eq!(parse_proc_net_addr("XYZ:1F90"), None);
        // The real tables read (this test's own listener, unconnected: 0).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(server_connections(addr).unwrap(), 0);
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let _s = l.accept().unwrap();
        assert_eq!(server_connections(addr).unwrap(), 1);
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
