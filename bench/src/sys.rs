//! Thin wrappers over the libc calls the client side uses: nonblocking
//! sockets, epoll and the open-files limit.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now
/// in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                return Err(io::Error::last_os_error());
            }
            lim = want;
        }
    }
    Ok(lim.rlim_cur)
}

/// Descriptors the bench needs besides its client sockets.
const SPARE_FDS: u64 = 64;

/// Raises RLIMIT_NOFILE (see `raise_nofile_limit`), or says why `--connections
/// {connections}` sockets do not fit under it.
pub fn check_nofile_for(connections: u64) -> Result<(), String> {
    let nofile = raise_nofile_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    if connections + SPARE_FDS > nofile {
        return Err(format!(
            "--connections {} needs {} open files, and this process may open {nofile} \
             (the hard RLIMIT_NOFILE): lower --connections or raise the limit",
            connections,
            connections + SPARE_FDS
        ));
    }
    Ok(())
}

/// Says why client sockets bound to `sources` cannot reach `target`: an
/// address of the other IP version.
pub fn check_sources(sources: &[IpAddr], target: SocketAddr) -> Result<(), String> {
    match sources.iter().find(|ip| ip.is_ipv4() != target.is_ipv4()) {
        Some(ip) => Err(format!(
            "source address {ip} and target {target} are different IP versions"
        )),
        None => Ok(()),
    }
}

/// A socket address in the form connect(2) and bind(2) take.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn close(fd: RawFd) {
    // SAFETY: closing a descriptor this module handed out and nobody else uses.
    unsafe {
        libc::close(fd);
    }
}

/// Closes with a reset (SO_LINGER 0): no TIME_WAIT socket is left behind in
/// the kernel's slab, or holding a local port, for the next run.
pub fn close_abortive(fd: RawFd) {
    set_linger_zero(fd);
    close(fd);
}

/// SO_LINGER 0: the socket's close, whoever does it, is a reset.
pub fn set_linger_zero(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a local struct of the stated size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of_val(&linger) as libc::socklen_t,
        );
    }
}

/// Starts a nonblocking connect from `source` (any port) to `target`.
/// Returns the socket; the connect completes when it turns writable.
pub fn start_connect(source: IpAddr, target: SocketAddr) -> io::Result<RawFd> {
    let domain = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscalls on a descriptor owned here; closed on every error path.
    unsafe {
        let fd = check(libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let result = (|| {
            // Let connect(2) pick the port by the whole 4-tuple, so each
            // source address gets a full ephemeral range per target, rather
            // than bind(2) reserving a port for all destinations.
            let one: libc::c_int = 1;
            check(libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of_val(&one) as libc::socklen_t,
            ))?;
            let (src, src_len) = sockaddr(SocketAddr::new(source, 0));
            check(libc::bind(
                fd,
                &src as *const _ as *const libc::sockaddr,
                src_len,
            ))?;
            let (dst, dst_len) = sockaddr(target);
            if libc::connect(fd, &dst as *const _ as *const libc::sockaddr, dst_len) < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINPROGRESS) {
                    return Err(e);
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(fd),
            Err(e) => {
                libc::close(fd);
                Err(e)
            }
        }
    }
}

/// The pending error of a socket (SO_ERROR), `None` when there is none.
pub fn socket_error(fd: RawFd) -> Option<io::Error> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of_val(&err) as libc::socklen_t;
    // SAFETY: getsockopt into a local int of the stated size.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if ret < 0 {
        Some(io::Error::last_os_error())
    } else if err != 0 {
        Some(io::Error::from_raw_os_error(err))
    } else {
        None
    }
}

/// send(2) without SIGPIPE.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length come from a live slice.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// recv(2) with extra flags (the sockets are nonblocking already).
pub fn recv(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: the pointer and length come from a live mutable slice.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Asks the kernel to stamp what this socket receives (`SO_TIMESTAMPNS`):
/// [`recv_stamped`] then says when the data reached the socket, whatever
/// the reading thread was doing.
pub fn enable_receive_timestamps(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// `recv` that also returns the kernel's receive timestamp of the data, in
/// CLOCK_REALTIME nanoseconds, when the socket has them on. On TCP it is
/// the timestamp of the last segment the read took: for what came earlier
/// in the same read, a little late (never early).
pub fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    // Room for one SCM_TIMESTAMPNS message (a timespec), 8-aligned.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg with the msghdr above.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled,
    // within msg_controllen; the payload of SCM_TIMESTAMPNS is a timespec.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::timespec);
                stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, stamp))
}

/// An epoll instance (level-triggered use only).
pub struct Epoll {
    fd: RawFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall.
        Ok(Epoll {
            fd: check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?,
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: epoll_ctl with a valid event struct.
        check(unsafe { libc::epoll_ctl(self.fd, op, fd, &mut ev) }).map(|_| ())
    }

    pub fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    pub fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout_ms` and returns the ready events in `out`'s
    /// spare capacity (EINTR reads as no events).
    pub fn wait(&self, out: &mut Vec<libc::epoll_event>, timeout_ms: i32) -> io::Result<()> {
        out.clear();
        // SAFETY: the kernel writes at most `capacity` events into the buffer.
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                out.as_mut_ptr(),
                out.capacity() as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: the kernel initialised the first n entries.
        unsafe { out.set_len(n as usize) };
        Ok(())
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        close(self.fd);
    }
}

/// An eventfd: another thread's way to wake a thread sleeping in
/// epoll_wait (roundtrip's commands to its client threads), a signal
/// rather than a polling timeout.
pub struct EventFd {
    fd: RawFd,
}

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        Ok(EventFd { fd })
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Makes the descriptor readable (wakes the thread that waits on it).
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: an 8-byte write from a live u64 (what an eventfd takes).
        unsafe { libc::write(self.fd, &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Reads the count back to 0 (the descriptor stops being readable).
    pub fn drain(&self) {
        let mut n: u64 = 0;
        // SAFETY: an 8-byte read into a live u64; nonblocking.
        unsafe { libc::read(self.fd, &mut n as *mut u64 as *mut libc::c_void, 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        close(self.fd);
    }
}

/// CPUs the servers this run spawns are restricted to (`--server-cpus`),
/// set once at start.
static SERVER_CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();

fn cpu_set(cpus: &[usize]) -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is beyond what a CPU set holds"),
            ));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    if cpus.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no CPU"));
    }
    Ok(set)
}

/// Restricts the calling thread, and every thread and process it starts
/// from now on, to `cpus` (the bench's `--client-cpus`).
pub fn pin_self(cpus: &[usize]) -> io::Result<()> {
    let set = cpu_set(cpus)?;
    // SAFETY: pid 0 is the calling thread; `set` lives for the call.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Remembers where spawned servers run (`--server-cpus`); checked now, so
/// that a bad list fails before anything starts.
pub fn set_server_cpus(cpus: Vec<usize>) -> io::Result<()> {
    cpu_set(&cpus)?;
    let _ = SERVER_CPUS.set(cpus);
    Ok(())
}

/// Makes `cmd`'s process run on the `--server-cpus` (if given): its
/// threads and children (nginx's workers) inherit them.
pub fn place_server(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let Some(cpus) = SERVER_CPUS.get() else {
        return;
    };
    let Ok(set) = cpu_set(cpus) else {
        return;
    };
    // SAFETY: between fork and exec only sched_setaffinity runs, which is
    // async-signal-safe, on a set computed before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn realtime_ns() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    #[test]
    fn a_stamped_read_says_when_the_kernel_received_the_data() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        let mut buf = [0u8; 16];
        // Off: data, no stamp.
        tx.write_all(b"a").unwrap();
        assert_eq!(recv_stamped(rx.as_raw_fd(), &mut buf).unwrap(), (1, None));
        enable_receive_timestamps(rx.as_raw_fd()).unwrap();
        // The kernel turns stamping on for the machine from a work queue,
        // a moment after the first socket asks: the first reads may still
        // come without one.
        let mut tries = 0;
        let (before, stamp, after) = loop {
            let before = realtime_ns();
            tx.write_all(b"hello").unwrap();
            let (n, stamp) = recv_stamped(rx.as_raw_fd(), &mut buf).unwrap();
            let after = realtime_ns();
            assert_eq!(&buf[..n], b"hello");
            if let Some(stamp) = stamp {
                break (before, stamp, after);
            }
            tries += 1;
            assert!(tries < 500, "no receive timestamp after {tries} reads");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(
            before <= stamp && stamp <= after,
            "{before} <= {stamp} <= {after}"
        );
    }

    #[test]
    fn nofile_limit_is_raised_to_the_hard_limit() {
        let soft = raise_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        assert_eq!(soft, lim.rlim_cur);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert!(check_nofile_for(1).is_ok());
        let err = check_nofile_for(soft).unwrap_err();
        assert!(
            err.starts_with(&format!("--connections {soft} needs ")),
            "{err}"
        );
    }

    #[test]
    fn sources_must_match_the_target_ip_version() {
        let v4: IpAddr = "127.0.0.2".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        let target: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert!(check_sources(&[v4], target).is_ok());
        assert_eq!(
            check_sources(&[v4, v6], target).unwrap_err(),
            "source address ::1 and target 127.0.0.1:80 are different IP versions"
        );
    }

    #[test]
    fn connect_send_recv_over_loopback() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = listener.local_addr().unwrap();
        let fd = start_connect("127.0.0.2".parse().unwrap(), target).unwrap();
        let ep = Epoll::new().unwrap();
        ep.add(fd, libc::EPOLLOUT as u32, 7).unwrap();
        let mut events = Vec::with_capacity(4);
        ep.wait(&mut events, 5000).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!({ events[0].u64 }, 7);
        assert!(socket_error(fd).is_none());
        let (mut peer, from) = listener.accept().unwrap();
        assert_eq!(
            from.ip(),
            "127.0.0.2".parse::<IpAddr>().unwrap(),
            "bound to the source address"
        );
        assert_eq!(send(fd, b"hi").unwrap(), 2);
        let mut buf = [0u8; 2];
        std::io::Read::read_exact(&mut peer, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        let mut b = [0u8; 8];
        assert_eq!(
            recv(fd, &mut b, libc::MSG_PEEK).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(peer);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            recv(fd, &mut b, libc::MSG_PEEK).unwrap(),
            0,
            "EOF after the peer closed"
        );
        close(fd);
    }

    #[test]
    fn abortive_close_resets_the_peer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd =
            start_connect("127.0.0.1".parse().unwrap(), listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        close_abortive(fd);
        let mut b = [0u8; 1];
        let err = std::io::Read::read(&mut peer, &mut b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn refused_connect_shows_as_socket_error() {
        // A port nobody listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let fd = start_connect("127.0.0.1".parse().unwrap(), port).unwrap();
        let ep = Epoll::new().unwrap();
        ep.add(fd, libc::EPOLLOUT as u32, 1).unwrap();
        let mut events = Vec::with_capacity(4);
        ep.wait(&mut events, 5000).unwrap();
        assert_eq!(
            socket_error(fd).unwrap().raw_os_error(),
            Some(libc::ECONNREFUSED)
        );
        close(fd);
    }

    #[test]
    fn an_eventfd_wakes_epoll_until_drained() {
        let ep = Epoll::new().unwrap();
        let wake = EventFd::new().unwrap();
        ep.add(wake.fd(), libc::EPOLLIN as u32, 7).unwrap();
        let mut events = Vec::with_capacity(4);
        ep.wait(&mut events, 0).unwrap();
        assert!(events.is_empty());
        wake.notify();
        wake.notify();
        ep.wait(&mut events, 1000).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!({ events[0].u64 }, 7);
        wake.drain();
        ep.wait(&mut events, 0).unwrap();
        assert!(events.is_empty(), "one drain reads both notifications");
    }

    #[test]
    fn cpu_placement() {
        // A thread of its own: the test runner's threads keep their CPUs.
        std::thread::spawn(|| {
            pin_self(&[0]).unwrap();
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            assert!(
                status.contains("Cpus_allowed_list:\t0\n"),
                "{}",
                status
                    .lines()
                    .find(|l| l.starts_with("Cpus_allowed_list"))
                    .unwrap_or("")
            );
        })
        .join()
        .unwrap();
        assert!(pin_self(&[]).is_err());
        assert!(pin_self(&[libc::CPU_SETSIZE as usize]).is_err());
        // A spawned server gets the CPUs it was given.
        set_server_cpus(vec![0]).unwrap();
        let mut cmd = std::process::Command::new("grep");
        cmd.args(["Cpus_allowed_list", "/proc/self/status"]);
        place_server(&mut cmd);
        let out = cmd.output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "Cpus_allowed_list:\t0\n"
        );
    }
}
