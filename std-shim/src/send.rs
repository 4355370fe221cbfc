//! `multifd send`: migrates RAM images to a QEMU-compatible destination over a main stream and N
//! multifd channels, with the core's send engine on named scoped threads (`multifd-send-N`).
//!
//! The library entry point is [`migrate`]: it takes the blocks ([`ImageSet`]), an embedder that
//! implements [`Precopy`] (which pages each round sends, when to stop), and a cancel flag. The
//! command line uses [`StaticPrecopy`] (one round of every page) and [`run_cli`].

use std::fmt;
use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use multifd_core::lifecycle::ChannelId;
use multifd_core::send::{
    MainSink, Notify, Precopy, PrecopyError, Quiescent, RoundStats, SendEngine, SendError, SourceBlocks, Step, Summary,
    precopy,
};
use multifd_core::wire::{Geometry, Layout};

use crate::platform::{Role, StdWaker, WakeHook, WorkerToken, run_scoped};

/// Channels a std migration can have (the engine's capacity).
pub const MAX_SEND_CHANNELS: usize = 16;

/// Guest memory of one RAM block on the source: channel workers read it, and the embedder may change
/// it between rounds while it holds the engine's [`Quiescent`] token. Either a heap buffer
/// ([`GuestImage::new`]) or a private mapping of an image file ([`GuestImage::map_file`]).
pub struct GuestImage {
    base: NonNull<u8>,
    len: usize,
    backing: Backing,
}

enum Backing {
    /// Owns the `Box<[u8]>` at `base`, rebuilt and dropped in `Drop`.
    Heap,
    /// A `mmap` of `len.max(1)` bytes at `base`, unmapped in `Drop`.
    Map,
}

// SAFETY: the memory is owned by this value (a leaked box or a private mapping) and reached only
// through `base`, so it may move to another thread.
unsafe impl Send for GuestImage {}
// SAFETY: shared access is reads of pages by channel workers during a round, and writes through
// `write`, which requires the `Quiescent` token: every channel is idle then, and idle workers hold no
// page slice (the send channel's packet borrows end before `done`). So reads and writes never overlap.
unsafe impl Sync for GuestImage {}

impl fmt::Debug for GuestImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backing = match self.backing {
            Backing::Heap => "heap",
            Backing::Map => "file mapping",
        };
        f.debug_struct("GuestImage").field("len", &self.len).field("backing", &backing).finish()
    }
}

impl GuestImage {
    /// Takes ownership of `bytes` as guest memory.
    pub fn new(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        let raw = Box::into_raw(bytes.into_boxed_slice());
        // SAFETY: `Box::into_raw` never returns null (for an empty slice it is dangling, not null).
        let base = unsafe { NonNull::new_unchecked(raw.cast::<u8>()) };
        Self { base, len, backing: Backing::Heap }
    }

    /// Maps the file at `path` privately as guest memory and, when it fits in half the physical
    /// memory, populates the mapping (pages are read into the page cache and mapped, not copied), so
    /// the image is loaded before the migration starts. Writes (between rounds) stay private to this
    /// process. The file must not be truncated while it is mapped (reads past its new end would
    /// fault).
    pub fn map_file(path: &Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::other("the file does not fit in the address space"))?;
        if len == 0 {
            return Ok(Self::new(Vec::new()));
        }
        // SAFETY: a new private mapping of an open file at an address of the kernel's choice: no
        // existing memory is affected; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the range is the mapping just created; the advice is a hint (read-ahead), its
        // failure changes nothing but speed.
        unsafe { libc::madvise(ptr, len, libc::MADV_SEQUENTIAL) };
        if len as u64 <= crate::recv::physical_ram() / 2 {
            // SAFETY: as above. Loads the image before the migration, as a running guest's memory
            // is resident: channels then take no page fault per page while sending (BENCHMARKS.md:
            // about a fifth of the time into a preallocated destination). A hint: on failure
            // (kernels before 5.14) pages fault in when sent. Skipped for an image that would push
            // itself out of the page cache again.
            unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_READ) };
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { base, len, backing: Backing::Map })
    }

    /// Bytes of guest memory.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "guest image range {offset}+{len} outside its {} bytes",
            self.len
        );
    }

    /// `len` bytes at `offset` (panics outside the image).
    pub fn read(&self, offset: usize, len: usize) -> &[u8] {
        self.check(offset, len);
        // SAFETY: in bounds (checked above) of memory this value owns; no write overlaps the borrow
        // (see the `Sync` impl: writes happen only while the migration is quiescent).
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(offset), len) }
    }

    /// Writes `data` at `offset` while every channel is idle (the guest "runs" between rounds).
    pub fn write(&self, _quiescent: &Quiescent<'_>, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: in bounds; the `Quiescent` token proves no worker reads guest memory now (see `Sync`).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.as_ptr().add(offset), data.len()) }
    }

    /// The whole image, with exclusive access.
    pub fn as_bytes(&mut self) -> &[u8] {
        // SAFETY: `&mut self` excludes every other access; the range is the whole image.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }
}

impl Drop for GuestImage {
    fn drop(&mut self) {
        match self.backing {
            Backing::Heap => {
                let raw = std::ptr::slice_from_raw_parts_mut(self.base.as_ptr(), self.len);
                // SAFETY: `base`/`len` came from `Box::into_raw` of a `Box<[u8]>` in `new`, and the
                // box is rebuilt once, here.
                drop(unsafe { Box::from_raw(raw) });
            }
            Backing::Map => {
                // SAFETY: `base`/`len` is the mapping made in `map_file`, unmapped once, here.
                unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
            }
        }
    }
}

/// The RAM blocks of a migration: name and guest memory each.
#[derive(Debug, Default)]
pub struct ImageSet {
    /// Blocks in order.
    pub blocks: Vec<(String, GuestImage)>,
}

impl ImageSet {
    /// Maps `FILE[:NAME]` specs (see [`GuestImage::map_file`]); a block's name defaults to the file stem.
    pub fn load(specs: &[String]) -> Result<Self, SendFailure> {
        let mut blocks = Vec::new();
        for spec in specs {
            let (path, name) = match spec.rsplit_once(':') {
                Some((p, n)) if !n.is_empty() && !n.contains('/') => (PathBuf::from(p), n.to_owned()),
                _ => {
                    let p = PathBuf::from(spec);
                    let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    (p, stem)
                }
            };
            let image = GuestImage::map_file(&path).map_err(|err| SendFailure::Image { path: path.clone(), err })?;
            blocks.push((name, image));
        }
        Ok(Self { blocks })
    }
}

impl SourceBlocks for ImageSet {
    fn count(&self) -> usize {
        self.blocks.len()
    }
    fn name(&self, block: usize) -> &[u8] {
        self.blocks[block].0.as_bytes()
    }
    fn used_len(&self, block: usize) -> u64 {
        self.blocks[block].1.len() as u64
    }
    fn page(&self, block: usize, offset: u64, len: usize) -> &[u8] {
        self.blocks[block].1.read(offset as usize, len)
    }
}

/// Why a send migration failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum SendFailure {
    /// An image file could not be read.
    Image {
        /// The file.
        path: PathBuf,
        /// The error.
        err: io::Error,
    },
    /// The engine refused the configuration or a page.
    Engine(SendError),
    /// A connection could not be made.
    Connect {
        /// `main stream` or `channel N`.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The error.
        err: io::Error,
    },
    /// A channel's write failed.
    Channel {
        /// The channel.
        channel: u8,
        /// Its packet number being written (None for the init packet).
        packet_num: Option<u64>,
        /// The error.
        err: io::Error,
    },
    /// The main stream's write failed.
    Main(io::Error),
    /// A worker thread could not be started.
    Spawn(io::Error),
    /// Cancelled (SIGINT or the cancel flag).
    Interrupted,
    /// A connection was not established within the connect timeout.
    ConnectTimeout {
        /// `main stream` or `channel N`.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The connect timeout.
        waited: Duration,
    },
    /// A write waited the whole io timeout while the destination took no byte on any connection.
    Stalled {
        /// `main stream` or `channel N`.
        what: String,
        /// The packet being written, on a channel.
        packet_num: Option<u64>,
        /// The io timeout.
        waited: Duration,
    },
    /// The destination wrote to, or closed, a connection it may only read (a multifd destination
    /// without a return path never writes to the source).
    Peer {
        /// `main stream` or `channel N`.
        what: String,
        /// What it did.
        did: PeerAction,
    },
}

/// What a destination did on a connection it should only have read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAction {
    /// It sent bytes (the first is given).
    SentBytes(u8),
    /// It closed its side (end of stream) before the migration ended.
    Closed,
}

/// A duration in seconds for messages: whole seconds without decimals.
fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{} s", d.as_secs()) } else { format!("{:.3} s", d.as_secs_f64()) }
}

impl fmt::Display for SendFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Image { path, err } => write!(f, "image {}: {err}", path.display()),
            Self::Engine(e) => write!(f, "{e}"),
            Self::Connect { what, addr, err } => write!(f, "{what}: connect to {addr}: {err}"),
            Self::Channel { channel, packet_num: Some(n), err } => {
                write!(f, "channel {channel}: writing packet {n}: {err}")
            }
            Self::Channel { channel, packet_num: None, err } => write!(f, "channel {channel}: init packet: {err}"),
            Self::Main(err) => write!(f, "main stream: {err}"),
            Self::Spawn(err) => write!(f, "starting a channel worker: {err}"),
            Self::Interrupted => f.write_str("interrupted: migration cancelled"),
            Self::ConnectTimeout { what, addr, waited } => {
                write!(f, "{what}: connect to {addr}: no answer within {} (--connect-timeout)", secs(*waited))
            }
            Self::Stalled { what, packet_num, waited } => {
                write!(f, "{what}: stalled: the destination took no data on any connection for {}", secs(*waited))?;
                if let Some(n) = packet_num {
                    write!(f, " while packet {n} was being written")?;
                }
                f.write_str(" (--io-timeout)")
            }
            Self::Peer { what, did: PeerAction::SentBytes(b) } => write!(
                f,
                "{what}: the destination sent unexpected bytes (first {b:#04x}) on a connection it may only read"
            ),
            Self::Peer { what, did: PeerAction::Closed } => {
                write!(f, "{what}: the destination closed the connection before the migration ended")
            }
        }
    }
}

impl std::error::Error for SendFailure {}

impl From<io::Error> for SendFailure {
    fn from(err: io::Error) -> Self {
        Self::Spawn(err)
    }
}

/// Options of a send migration.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Destination address (main stream and every channel).
    pub connect: SocketAddr,
    /// Multifd channels.
    pub channels: u8,
    /// The uuid in every init packet.
    pub uuid: [u8; 16],
    /// Machine type in the configuration section.
    pub machine: String,
    /// Target page size.
    pub page_size: u32,
}

/// How long a connect may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long writes may wait while the destination takes no byte on any connection, by default.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Time limits and pacing of a send migration. Kept apart from [`SendOptions`] so that code
/// building `SendOptions` field by field keeps compiling; [`migrate`] uses [`SendLimits::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendLimits {
    /// How long each connect (main stream and every channel) may take.
    pub connect_timeout: Duration,
    /// How long a write may wait while the destination takes no byte on any connection; then the
    /// migration fails as stalled, naming the connection. `None`: no limit.
    pub io_timeout: Option<Duration>,
    /// Most bytes per second written on all channels together (headers and pages). `None`: no limit.
    pub max_bandwidth: Option<u64>,
}

impl Default for SendLimits {
    fn default() -> Self {
        Self { connect_timeout: DEFAULT_CONNECT_TIMEOUT, io_timeout: Some(DEFAULT_IO_TIMEOUT), max_bandwidth: None }
    }
}

/// Paces channel writes to a byte rate shared by every channel: each packet reserves its slot of
/// time after the previous reservation and waits for it.
struct Pace {
    bytes_per_sec: u64,
    next: Mutex<Option<Instant>>,
}

impl Pace {
    /// Waits until `bytes` may be written; returns early when `stop` says so.
    fn take(&self, bytes: usize, stop: impl Fn() -> bool) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec.max(1) as f64);
        let start = {
            let mut next = lock(&self.next);
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + cost);
            start
        };
        while !stop() {
            let left = start.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            // Short sleeps, so a cancelled migration does not wait out a long reservation.
            thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

/// What a finished migration reports.
#[derive(Debug, Clone)]
pub struct SendReport {
    /// Engine summary (rounds, totals, SYNCs per channel).
    pub summary: Summary,
    /// Every round's statistics.
    pub rounds: Vec<RoundStats>,
    /// Wall time from the first connect to the last byte written.
    pub elapsed: Duration,
    /// Channels used.
    pub channels: u8,
    /// Workers joined at cleanup.
    pub joined: u8,
}

/// One round of every page, then completion: a static image.
#[derive(Debug)]
pub struct StaticPrecopy {
    all: Vec<Vec<u64>>,
    none: Vec<u64>,
}

impl StaticPrecopy {
    /// For `blocks` with `page_size` pages.
    pub fn new(blocks: &ImageSet, page_size: u32) -> Self {
        let all: Vec<Vec<u64>> =
            blocks.blocks.iter().map(|(_, m)| vec![u64::MAX; (m.len() / page_size as usize).div_ceil(64)]).collect();
        let none = vec![0; all.iter().map(Vec::len).max().unwrap_or(0)];
        Self { all, none }
    }
}

impl Precopy for StaticPrecopy {
    fn dirty(&mut self, round: u32, block: usize) -> &[u64] {
        if round == 0 { &self.all[block] } else { &self.none }
    }
    fn round_done(&mut self, _stats: &RoundStats) -> Step {
        Step::Complete
    }
}

/// Records every round's statistics and passes everything else to the embedder.
struct Recording<'p, P: ?Sized> {
    inner: &'p mut P,
    rounds: Vec<RoundStats>,
    t0: Instant,
}

impl<P: Precopy + ?Sized> Precopy for Recording<'_, P> {
    fn dirty(&mut self, round: u32, block: usize) -> &[u64] {
        self.inner.dirty(round, block)
    }
    fn between_rounds(&mut self, round: u32, quiescent: &Quiescent<'_>) {
        self.inner.between_rounds(round, quiescent);
    }
    fn round_done(&mut self, stats: &RoundStats) -> Step {
        self.rounds.push(*stats);
        self.inner.round_done(stats)
    }
    fn device_state(&mut self) -> &[u8] {
        self.inner.device_state()
    }
    fn vm_description(&mut self) -> &[u8] {
        self.inner.vm_description()
    }
    fn now_ns(&mut self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
}

/// Wakes workers for jobs and the producer for finished jobs (not shutdowns).
struct SendNotify {
    workers: Mutex<Vec<Option<Thread>>>,
    producer: Thread,
}

impl Notify for SendNotify {
    fn job(&self, channel: ChannelId) {
        if let Some(t) = &lock(&self.workers)[channel.index()] {
            t.unpark();
        }
    }
    fn producer_idle(&self) {
        thread::park_timeout(Duration::from_millis(1));
    }
    fn channel_done(&self, _channel: ChannelId) {
        self.producer.unpark();
    }
}

/// The main stream as a [`MainSink`].
struct MainStream<'a> {
    stream: &'a TcpStream,
    written: &'a AtomicU64,
    io_timeout: Option<Duration>,
}

impl MainSink for MainStream<'_> {
    type Error = SendFailure;
    fn write(&mut self, bytes: &[u8]) -> Result<(), SendFailure> {
        let what = || "main stream".to_owned();
        write_all_vectored(self.stream, &mut [IoSlice::new(bytes)], self.written, self.io_timeout).map_err(|err| {
            match self.io_timeout {
                Some(waited) if timed_out(&err) => SendFailure::Stalled { what: what(), packet_num: None, waited },
                _ => SendFailure::Main(err),
            }
        })?;
        check_peer(self.stream).map_err(|f| f.unwrap_or_else(|did| SendFailure::Peer { what: what(), did }))
    }
}

/// Whether `e` is a write (or connect) that ran out of its timeout.
fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Looks, without waiting, whether the destination wrote to or closed a connection it may only
/// read: `Err(Err(action))` if so, `Err(Ok(failure))` for a socket error.
fn check_peer(stream: &TcpStream) -> Result<(), Result<SendFailure, PeerAction>> {
    let mut byte = 0u8;
    // SAFETY: `byte` is a valid, writable one-byte buffer for the duration of the call; the
    // descriptor belongs to `stream`, which outlives the call.
    let n = unsafe { libc::recv(stream.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    match n {
        1.. => Err(Err(PeerAction::SentBytes(byte))),
        0 => Err(Err(PeerAction::Closed)),
        _ => {
            let e = io::Error::last_os_error();
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                Ok(())
            } else {
                Err(Ok(SendFailure::Main(e)))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn connect(addr: SocketAddr, what: String, limits: &SendLimits) -> Result<TcpStream, SendFailure> {
    let s = TcpStream::connect_timeout(&addr, limits.connect_timeout).map_err(|err| {
        if timed_out(&err) {
            SendFailure::ConnectTimeout { what: what.clone(), addr, waited: limits.connect_timeout }
        } else {
            SendFailure::Connect { what: what.clone(), addr, err }
        }
    })?;
    s.set_nodelay(true).map_err(|err| SendFailure::Connect { what: what.clone(), addr, err })?;
    let slice = limits.io_timeout.map(|l| (l / 4).max(Duration::from_millis(10)));
    s.set_write_timeout(slice).map_err(|err| SendFailure::Connect { what, addr, err })?;
    Ok(s)
}

/// Writes all of `bufs` with vectored writes, counting the bytes in `written` (shared by every
/// connection). Sockets have a write timeout of a quarter of the io timeout; a write that times out
/// is tried again unless the destination took no byte on any connection for the whole io timeout.
/// So one connection may wait while others move, and a stall is noticed soon after the io timeout.
fn write_all_vectored(
    mut s: &TcpStream,
    mut bufs: &mut [IoSlice<'_>],
    written: &AtomicU64,
    io_timeout: Option<Duration>,
) -> io::Result<()> {
    // Relaxed: a progress counter; only whether it moved matters.
    let mut seen = written.load(Ordering::Relaxed);
    let mut since = Instant::now();
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "connection closed")),
            Ok(n) => {
                // Relaxed: as above.
                written.fetch_add(n as u64, Ordering::Relaxed);
                IoSlice::advance_slices(&mut bufs, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => {
                // Relaxed: as above.
                let now = written.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    since = Instant::now();
                } else if io_timeout.is_some_and(|l| since.elapsed() >= l) {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

type Engine<'b> = SendEngine<'b, ImageSet, WorkerToken, SendFailure, MAX_SEND_CHANNELS>;

/// Migrates `blocks` to `opts.connect`: connects the main stream and `opts.channels` channels, runs
/// `embedder`'s rounds with the core's precopy driver, and joins every worker before returning.
/// Setting `cancel` (from any thread, e.g. a SIGINT handler) ends the migration with
/// [`SendFailure::Interrupted`]: transports are shut down, so the destination sees an aborted stream.
/// Uses the default [`SendLimits`].
pub fn migrate<P: Precopy + ?Sized>(
    opts: &SendOptions,
    blocks: &ImageSet,
    embedder: &mut P,
    cancel: &AtomicBool,
) -> Result<SendReport, SendFailure> {
    migrate_with(opts, &SendLimits::default(), blocks, embedder, cancel)
}

/// As [`migrate`], with `limits` (timeouts and pacing).
pub fn migrate_with<P: Precopy + ?Sized>(
    opts: &SendOptions,
    limits: &SendLimits,
    blocks: &ImageSet,
    embedder: &mut P,
    cancel: &AtomicBool,
) -> Result<SendReport, SendFailure> {
    let geometry = Geometry::new(opts.page_size).map_err(|_| {
        SendFailure::Engine(SendError::BlockLength { block: 0, used_len: 0, page_size: opts.page_size })
    })?;
    let engine: Box<Engine<'_>> =
        Box::new(SendEngine::new(opts.channels, blocks, geometry, Layout::V9_0).map_err(SendFailure::Engine)?);
    let t0 = Instant::now();
    let main = connect(opts.connect, "main stream".into(), limits)?;
    let written = AtomicU64::new(0);
    let pace = limits.max_bandwidth.map(|bytes_per_sec| Pace { bytes_per_sec, next: Mutex::new(None) });
    let main_clone = main.try_clone().map_err(SendFailure::Main)?;
    let streams: Mutex<Vec<Option<TcpStream>>> = Mutex::new((0..opts.channels).map(|_| None).collect());
    let shutdowns: Mutex<Vec<TcpStream>> = Mutex::new(vec![main_clone]);
    let notify = SendNotify { workers: Mutex::new(vec![None; MAX_SEND_CHANNELS]), producer: thread::current() };
    let engine_ref: &Engine<'_> = &engine;

    let worker = |id: ChannelId, waker: &StdWaker<'_>| {
        lock(&notify.workers)[id.index()] = Some(thread::current());
        let Some(stream) = lock(&streams)[id.index()].take() else { return };
        let mut ch = engine_ref.channel(id);
        ch.ready(&notify);
        loop {
            let out = match ch.next(waker) {
                Ok(out) => out,
                Err(SendError::Cancelled) => return,
                Err(e) => {
                    engine_ref.lifecycle().record_error(waker, SendFailure::Engine(e));
                    return;
                }
            };
            // On the stack: no heap allocation per packet (tests/tests/no_alloc_steady.rs).
            let mut slices = [IoSlice::new(&[]); 1 + multifd_core::wire::MAX_PAGE_COUNT];
            slices[0] = IoSlice::new(out.header());
            let mut used = 1;
            debug_assert!(out.pages().len() < slices.len(), "a packet holds at most MAX_PAGE_COUNT pages");
            for (slot, page) in slices[1..].iter_mut().zip(out.pages()) {
                *slot = IoSlice::new(page);
                used += 1;
            }
            let packet_num = out.packet_num;
            if let Some(pace) = &pace {
                let bytes = slices[..used].iter().map(|s| s.len()).sum();
                pace.take(bytes, || engine_ref.lifecycle().is_quitting());
            }
            if let Err(err) = write_all_vectored(&stream, &mut slices[..used], &written, limits.io_timeout) {
                let what = format!("channel {}", id.0);
                let failure = match limits.io_timeout {
                    Some(waited) if timed_out(&err) => {
                        SendFailure::Stalled { what, packet_num: Some(packet_num), waited }
                    }
                    _ => SendFailure::Channel { channel: id.0, packet_num: Some(packet_num), err },
                };
                engine_ref.lifecycle().record_error(waker, failure);
                return;
            }
            if let Err(f) = check_peer(&stream) {
                let failure = f.unwrap_or_else(|did| SendFailure::Peer { what: format!("channel {}", id.0), did });
                let failure = match failure {
                    SendFailure::Main(err) => SendFailure::Channel { channel: id.0, packet_num: Some(packet_num), err },
                    other => other,
                };
                engine_ref.lifecycle().record_error(waker, failure);
                return;
            }
            ch.done(&notify);
        }
    };
    // Terminate shuts every transport down (main stream included), so blocked writes end (QEMU B15).
    let hook: WakeHook<'_> = Box::new(|_channel| {
        for s in lock(&shutdowns).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    });

    let mut recording = Recording { inner: embedder, rounds: Vec::new(), t0 };
    let (result, joined) = run_scoped(Role::Send, worker, Some(hook), |platform| {
        let done = AtomicBool::new(false);
        thread::scope(|s| {
            // Watches the cancel flag: the migration is failed with `Interrupted`, which terminates it.
            s.spawn(|| {
                // Relaxed: plain flags; the coordinator's own atomics order what follows.
                while !done.load(Ordering::Relaxed) {
                    if cancel.load(Ordering::Relaxed) {
                        engine_ref.lifecycle().record_error(platform, SendFailure::Interrupted);
                        return;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            });
            let created = engine_ref.lifecycle().create_all(platform, |id| {
                let stream = connect(opts.connect, format!("channel {}", id.0), limits)?;
                let init = engine_ref.channel(id).init_packet(opts.uuid);
                let mut w = &stream;
                w.write_all(&init).map_err(|err| SendFailure::Channel { channel: id.0, packet_num: None, err })?;
                lock(&shutdowns).push(stream.try_clone().map_err(SendFailure::Spawn)?);
                lock(&streams)[id.index()] = Some(stream);
                Ok(())
            });
            let result = match created {
                Ok(r) if r.started == opts.channels => {
                    let mut producer = engine_ref.producer().map_err(SendFailure::Engine);
                    match &mut producer {
                        Ok(p) => precopy(
                            p,
                            &notify,
                            &mut MainStream { stream: &main, written: &written, io_timeout: limits.io_timeout },
                            &mut recording,
                            opts.machine.as_bytes(),
                        )
                        .map_err(|e| match e {
                            PrecopyError::Main(failure) => {
                                engine_ref.lifecycle().record_error(platform, failure);
                                None
                            }
                            PrecopyError::Send(SendError::Cancelled) => None,
                            PrecopyError::Send(other) => {
                                engine_ref.lifecycle().record_error(platform, SendFailure::Engine(other));
                                None
                            }
                        }),
                        Err(_) => Err(None),
                    }
                }
                _ => Err(None::<()>),
            };
            // Relaxed: see the watcher.
            done.store(true, Ordering::Relaxed);
            let joined = engine_ref.lifecycle().cleanup(platform).map(|t| t.report().joined).unwrap_or(0);
            (result, joined)
        })
    });
    let elapsed = t0.elapsed();
    log::info!("multifd send: {joined} of {} channel workers joined", opts.channels);
    drop(main);
    let mut engine = engine;
    match result {
        Ok(summary) if engine.lifecycle().error().is_none() => {
            let mut rounds = recording.rounds;
            rounds.push(summary.last);
            Ok(SendReport { summary, rounds, elapsed, channels: opts.channels, joined })
        }
        _ => Err(take_error(&mut engine)),
    }
}

fn take_error(engine: &mut Engine<'_>) -> SendFailure {
    engine.lifecycle_mut().take_error().unwrap_or(SendFailure::Interrupted)
}

/// Parses a UUID (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, dashes optional).
pub fn parse_uuid(s: &str) -> Result<[u8; 16], String> {
    let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return Err(format!("uuid {s:?}: {} hex digits, 32 expected", hex.len()));
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let txt = std::str::from_utf8(pair).map_err(|_| format!("uuid {s:?}: not hex"))?;
        out[i] = u8::from_str_radix(txt, 16).map_err(|_| format!("uuid {s:?}: {txt:?} is not hex"))?;
    }
    Ok(out)
}

static SIGINT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_sig: libc::c_int) {
    // Relaxed: a flag polled by the watcher thread; async-signal-safe (a plain atomic store).
    SIGINT.store(true, Ordering::Relaxed);
}

/// Installs a SIGINT handler that sets the flag [`migrate`] watches; returns the flag.
pub fn cancel_on_sigint() -> &'static AtomicBool {
    // SAFETY: `on_sigint` only stores to an atomic, which is async-signal-safe; `signal` is given a
    // valid `extern "C" fn(c_int)` cast to `sighandler_t` as libc documents.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    &SIGINT
}

/// Formats a report as a table (or JSON).
pub fn format_report(r: &SendReport, page_size: u32, json: bool) -> String {
    let t = r.summary.total;
    let secs = r.elapsed.as_secs_f64();
    let guest_bytes = t.pages * u64::from(page_size);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    if json {
        let rounds: Vec<String> = r
            .rounds
            .iter()
            .map(|s| {
                format!(
                    r#"{{"round":{},"pages":{},"normal_pages":{},"zero_pages":{},"bytes":{},"seconds":{:.6},"dirty_left":{}}}"#,
                    s.round,
                    s.pages,
                    s.normal_pages,
                    s.zero_pages,
                    s.bytes,
                    s.nanos as f64 / 1e9,
                    s.dirty_left
                )
            })
            .collect();
        return format!(
            r#"{{"status":"completed","channels":{},"rounds":{},"pages":{},"normal_pages":{},"zero_pages":{},"wire_bytes":{},"seconds":{:.6},"guest_mib_per_s":{:.1},"syncs_per_channel":{},"workers_joined":{},"per_round":[{}]}}"#,
            r.channels,
            r.summary.rounds,
            t.pages,
            t.normal_pages,
            t.zero_pages,
            t.bytes,
            secs,
            mib(guest_bytes) / secs.max(1e-9),
            r.summary.syncs_per_channel,
            r.joined,
            rounds.join(",")
        ) + "\n";
    }
    let mut out = String::new();
    out += &format!("{:<22} {}\n", "status", "completed");
    out += &format!("{:<22} {}\n", "channels", r.channels);
    out += &format!("{:<22} {}\n", "rounds", r.summary.rounds);
    out += &format!("{:<22} {} ({} normal, {} zero)\n", "pages sent", t.pages, t.normal_pages, t.zero_pages);
    out += &format!("{:<22} {:.1} MiB\n", "bytes on channels", mib(t.bytes));
    out += &format!("{:<22} {:.3} s\n", "time", secs);
    out += &format!("{:<22} {:.1} MiB/s guest RAM\n", "throughput", mib(guest_bytes) / secs.max(1e-9));
    out += &format!("{:<22} {} per channel\n", "SYNC packets", r.summary.syncs_per_channel);
    out += "round      pages     normal       zero    MiB    seconds  dirty left\n";
    for s in &r.rounds {
        out += &format!(
            "{:>5} {:>10} {:>10} {:>10} {:>6.1} {:>10.3} {:>11}\n",
            s.round,
            s.pages,
            s.normal_pages,
            s.zero_pages,
            mib(s.bytes),
            s.nanos as f64 / 1e9,
            s.dirty_left
        );
    }
    out
}

/// `multifd send`: loads the images, migrates them, prints the report; returns the exit status.
pub fn run_cli(
    connect: &str,
    channels: u8,
    images: &[String],
    machine: &str,
    uuid: Option<&str>,
    json: bool,
    limits: &SendLimits,
) -> i32 {
    let addr = match connect.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        _ => {
            eprintln!("multifd send: --connect {connect:?} is not an address (HOST:PORT)");
            return 2;
        }
    };
    let uuid = match uuid.map(parse_uuid).transpose() {
        Ok(u) => u.unwrap_or([0; 16]),
        Err(e) => {
            eprintln!("multifd send: {e}");
            return 2;
        }
    };
    let blocks = match ImageSet::load(images) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("multifd send: {e}");
            return 1;
        }
    };
    let cancel = cancel_on_sigint();
    let opts = SendOptions { connect: addr, channels, uuid, machine: machine.to_owned(), page_size: 4096 };
    let mut embedder = StaticPrecopy::new(&blocks, opts.page_size);
    // The moment the migration starts (images loaded, before connecting), for benchmarks.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    eprintln!("multifd send: connecting at unix time {:.6}", now.as_secs_f64());
    match migrate_with(&opts, limits, &blocks, &mut embedder, cancel) {
        Ok(report) => {
            print!("{}", format_report(&report, opts.page_size, json));
            0
        }
        Err(e) => {
            eprintln!("multifd send: {e}");
            if matches!(e, SendFailure::Interrupted) { 130 } else { 1 }
        }
    }
}

/// Path helper for callers: the default block name of an image (its file stem).
pub fn default_block_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}
