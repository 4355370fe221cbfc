//! OS helpers shared by `recv` and `send`: the stall policy on sockets, retrying reads, a few
//! system queries. Each exists once here.

use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use multifd_core::stall::StallWatch;

/// Whether `e` is a read or write that ran out of its socket timeout.
pub(crate) fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Locks `m`, taking the value of a poisoned lock (a panicked worker is reported separately).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A duration in seconds for messages: whole seconds without decimals.
pub(crate) fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{} s", d.as_secs()) } else { format!("{:.3} s", d.as_secs_f64()) }
}

/// Time since a fixed origin in this process: the clock the core's [`StallWatch`] is given.
pub(crate) fn now() -> Duration {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed()
}

/// The stall policy on sockets ([`multifd_core::stall`]): one byte counter for every connection of a
/// migration, and the io timeout. Sockets wait [`StallWatch::poll_interval`] at a time; a wait that
/// times out is tried again unless no byte moved on any connection for the whole io timeout.
#[derive(Clone, Copy)]
pub(crate) struct Stall<'a> {
    /// Bytes moved on all connections.
    pub(crate) total: &'a AtomicU64,
    /// The io timeout (`None`: sockets wait for ever).
    pub(crate) limit: Option<Duration>,
}

impl Stall<'_> {
    /// The socket timeout to set.
    pub(crate) fn socket_timeout(limit: Option<Duration>) -> Option<Duration> {
        StallWatch::poll_interval(limit)
    }

    pub(crate) fn watch(&self) -> StallWatch {
        // Relaxed: a progress counter; only whether it moved matters.
        StallWatch::new(self.limit, self.total.load(Ordering::Relaxed), now())
    }

    /// After a wait timed out: whether to wait again.
    pub(crate) fn again(&self, w: &mut StallWatch) -> bool {
        // Relaxed: as in `watch`.
        w.check(self.total.load(Ordering::Relaxed), now()).is_ok()
    }

    /// Counts `n` bytes moved.
    pub(crate) fn moved(&self, n: usize) {
        // Relaxed: a progress counter.
        self.total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Reads into `buf`, retrying interrupted reads and timed-out reads as [`Stall`] says.
pub(crate) fn read_retry(mut s: &TcpStream, buf: &mut [u8], stall: Stall<'_>) -> io::Result<usize> {
    let mut w = stall.watch();
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if timed_out(&e) && stall.again(&mut w) => continue,
            other => return other,
        }
    }
}

/// Reads into the guest ranges of `iov` with `readv(2)`; retries as [`read_retry`] does.
pub(crate) fn readv_raw(fd: i32, iov: &[libc::iovec], stall: Stall<'_>) -> io::Result<usize> {
    let mut w = stall.watch();
    loop {
        // SAFETY: every iovec points at a guest page range from `GuestMemory::raw_range`, valid for
        // `iov_len` bytes of writes; the kernel writes them, no Rust reference covers them. The caller
        // passes at most 512 entries, below IOV_MAX.
        let n = unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as i32) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted && !(timed_out(&e) && stall.again(&mut w)) {
            return Err(e);
        }
    }
}

/// CPU seconds (user, system) this process has used so far, every thread included.
pub(crate) fn cpu_seconds() -> (f64, f64) {
    // SAFETY: `getrusage` only writes the `rusage` it is given, which is a valid, zeroed value here.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) != 0 {
            return (0.0, 0.0);
        }
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(usage.ru_utime), secs(usage.ru_stime))
}

/// Bytes of physical RAM of this machine (`u64::MAX` if the system does not say).
pub fn physical_ram() -> u64 {
    // SAFETY: `sysconf` only reads system configuration; any argument is allowed.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages <= 0 || size <= 0 { u64::MAX } else { (pages as u64).saturating_mul(size as u64) }
}

/// Seconds since the Unix epoch, for the machine-read timestamps the benchmarks compare.
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}
