//! Every system call the gateway makes itself, and so every `unsafe` block
//! of the crate (the rest of it is `#![deny(unsafe_code)]`): each wrapper is
//! safe to call with any arguments, and says why its block is sound.
//!
//! Sockets accepted under io_uring are in blocking mode: every read and
//! write here passes `MSG_DONTWAIT`, so nothing ever blocks a core.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Frames written by one `sendmsg` at most (the rest by the next call).
pub const IOV_MAX: usize = 64;

/// `recv` without waiting: `Ok(0)` is the peer's end, `WouldBlock` means
/// nothing is there now.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which
    // is borrowed mutably for the call.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Whether the peer has sent anything or closed, without taking it:
/// `Ok(0)` is its end, `WouldBlock` nothing yet.
pub fn peek(fd: RawFd) -> io::Result<usize> {
    let mut byte = [0u8; 1];
    // SAFETY: the kernel writes at most 1 byte into a local buffer of 1.
    let n = unsafe {
        libc::recv(
            fd,
            byte.as_mut_ptr() as *mut libc::c_void,
            1,
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `sendmsg` of the first [`IOV_MAX`] of `bufs` without waiting (and
/// without SIGPIPE): how many bytes the kernel took. Only the entries used
/// are written (this runs once per connection per delivery batch).
pub fn sendmsg<'a>(fd: RawFd, bufs: impl IntoIterator<Item = &'a [u8]>) -> io::Result<usize> {
    let mut iov = [const { MaybeUninit::<libc::iovec>::uninit() }; IOV_MAX];
    let mut n = 0;
    for buf in bufs.into_iter().take(IOV_MAX) {
        iov[n].write(libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        });
        n += 1;
    }
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = n;
    // SAFETY: the first `n` iovecs are initialised and point into buffers
    // borrowed for the call; the kernel reads only those `n`, and only
    // reads them.
    let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Sets `TCP_DEFER_ACCEPT` on a listening socket: connections wait in the
/// kernel until their first bytes arrive (or `secs` pass).
pub fn defer_accept(listener: &impl AsRawFd, secs: u32) -> io::Result<()> {
    let secs = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads one c_int from a live local for the call.
    let r = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `shutdown(2)`.
pub fn shutdown(fd: RawFd, how: std::net::Shutdown) -> io::Result<()> {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown takes any descriptor number; a stale one fails.
    if unsafe { libc::shutdown(fd, how) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of a descriptor handed over as a number (by monoio's
/// `into_raw_fd`): from here it is closed when the `OwnedFd` drops.
///
/// The caller must own `fd` and give it up: nothing else may close it.
pub fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller's promise, above.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor or -1, checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(own(fd))
}

/// Adds one to an eventfd's counter: wakes whoever reads or polls it.
/// `EAGAIN` (a saturated counter) means the reader is awake already.
pub fn eventfd_ring(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a live u64 to a descriptor we hold.
    unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
}

/// Clears a non-blocking eventfd's counter (nothing happens if it was 0).
pub fn eventfd_clear(fd: &OwnedFd) {
    let mut counter = [0u8; 8];
    // SAFETY: reading at most 8 bytes into a local buffer of 8.
    unsafe { libc::read(fd.as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
}

/// A second descriptor for the same open file (`dup`).
pub fn dup(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: dup returns a new descriptor or -1, checked below.
    let new = unsafe { libc::dup(fd.as_raw_fd()) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(own(new))
}

/// An epoll set, edge-triggered, reporting slab keys.
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll(own(fd)))
    }

    /// Watches `fd` for input, room to write and the peer's half-close,
    /// edge-triggered, reporting `key`. Closing `fd` takes it out.
    pub fn add(&self, fd: RawFd, key: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: u64::from(key),
        };
        // SAFETY: `ev` is valid for the call; the kernel copies it.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (it is handed to another owner, still open).
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: a null event is allowed for EPOLL_CTL_DEL since 2.6.9.
        let rc = unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes up to `out.len()` ready events without waiting: how many.
    pub fn take(&self, out: &mut [libc::epoll_event]) -> usize {
        let max = out.len().min(i32::MAX as usize) as i32;
        // SAFETY: the kernel writes at most `max` events into `out`.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), out.as_mut_ptr(), max, 0) };
        n.max(0) as usize
    }

    /// A monoio handle on a duplicate of the epoll descriptor, whose
    /// `readable()` (one io_uring poll) completes when events are ready.
    /// monoio has no type for a bare descriptor; its `TcpStream` only ever
    /// polls and closes this one. Call inside the runtime.
    pub fn monoio_handle(&self) -> io::Result<monoio::net::TcpStream> {
        let dup = dup(&self.0)?;
        monoio::net::TcpStream::from_std(std::net::TcpStream::from(dup))
    }
}

/// A monoio file reading a duplicate of `fd` (an eventfd: a plain io_uring
/// read completes when it is rung). Call inside the runtime.
pub fn monoio_file(fd: &impl AsRawFd) -> io::Result<monoio::fs::File> {
    monoio::fs::File::from_std(std::fs::File::from(dup(fd)?))
}

/// Changes the calling thread's mask for `signals` (`libc::SIG_BLOCK` or
/// `SIG_UNBLOCK`); threads started afterwards inherit it.
pub fn signal_mask(how: libc::c_int, signals: &[libc::c_int]) {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before
    // use; pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Ends the process with `code` at once, running no destructor and
/// flushing nothing (callers flush first what they need flushed).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}

/// Lifts the soft open-files limit to the hard one. False if it could not.
pub fn raise_open_files_limit() -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return false;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            return libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0;
        }
    }
    true
}
