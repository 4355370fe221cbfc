//! `multifd send`: migrates RAM images to a QEMU-compatible destination over a main stream and N
//! multifd channels, with the core's send engine on named scoped threads (`multifd-send-N`).
//!
//! The library entry point is [`migrate`]: it takes the blocks ([`ImageSet`]), an embedder that
//! implements [`Precopy`] (which pages each round sends, when to stop), and a cancel flag. The
//! command line (`src/bin`) uses [`StaticPrecopy`] (one round of every page).

use std::fmt;
use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use multifd_core::lifecycle::ChannelId;
use multifd_core::send::{
    MainSink, Notify, Precopy, PrecopyError, Quiescent, RoundStats, SendEngine, SendError, SourceBlocks, Step, Summary,
    precopy,
};
use multifd_core::wire::{Compression, Geometry, Layout, MAIN_MAGIC, MAIN_VERSION};
use serde::Serialize;

use crate::platform::{Role, StartError, StdWaker, WakeHook, WorkerToken, run_scoped};
use crate::util::{Stall, lock, secs, timed_out, unix_now};

/// Channels a std migration can have (the engine's capacity): as many as QEMU allows.
pub const MAX_SEND_CHANNELS: usize = multifd_core::lifecycle::MAX_CHANNELS;

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

/// The page size [`ImageSet::load`] checks image sizes against: the one `multifd send` migrates with.
pub const IMAGE_PAGE_SIZE: u32 = 4096;

impl ImageSet {
    /// Maps `FILE[:NAME]` specs (see [`GuestImage::map_file`]); a block's name defaults to the file
    /// stem. Each file must be a non-empty regular file of whole [`IMAGE_PAGE_SIZE`] pages, and no
    /// two specs may give the same block name; otherwise [`SendFailure::ImageSpec`] says which spec
    /// and why, before any file is mapped.
    pub fn load(specs: &[String]) -> Result<Self, SendFailure> {
        Self::load_for_page_size(specs, IMAGE_PAGE_SIZE)
    }

    /// As [`ImageSet::load`], checking sizes against `page_size`.
    pub fn load_for_page_size(specs: &[String], page_size: u32) -> Result<Self, SendFailure> {
        let parsed: Vec<(PathBuf, String)> = specs.iter().map(|s| split_spec(s)).collect();
        for (i, (path, name)) in parsed.iter().enumerate() {
            let refuse = |problem| SendFailure::ImageSpec { spec: specs[i].clone(), problem };
            if let Some(first) = parsed[..i].iter().position(|(_, n)| n == name) {
                return Err(refuse(ImageProblem::DuplicateName { name: name.clone(), first: specs[first].clone() }));
            }
            let meta = std::fs::metadata(path).map_err(|err| SendFailure::Image { path: path.clone(), err })?;
            let problem = if meta.is_dir() {
                Some(ImageProblem::Directory)
            } else if !meta.is_file() {
                Some(ImageProblem::NotRegularFile)
            } else {
                size_problem(meta.len(), page_size)
            };
            if let Some(problem) = problem {
                return Err(refuse(problem));
            }
        }
        let mut blocks = Vec::with_capacity(parsed.len());
        for (i, (path, name)) in parsed.into_iter().enumerate() {
            let image = GuestImage::map_file(&path).map_err(|err| SendFailure::Image { path: path.clone(), err })?;
            // The file may have changed since it was checked: the mapping's length is what is sent.
            if let Some(problem) = size_problem(image.len() as u64, page_size) {
                return Err(SendFailure::ImageSpec { spec: specs[i].clone(), problem });
            }
            blocks.push((name, image));
        }
        Ok(Self { blocks })
    }
}

/// Splits `FILE[:NAME]`: a NAME is what follows the last colon, if that is neither empty nor holds
/// a `/` (then the whole spec is the file, and the name its stem).
fn split_spec(spec: &str) -> (PathBuf, String) {
    match spec.rsplit_once(':') {
        Some((p, n)) if !n.is_empty() && !n.contains('/') => (PathBuf::from(p), n.to_owned()),
        _ => {
            let p = PathBuf::from(spec);
            let stem = default_block_name(&p);
            (p, stem)
        }
    }
}

/// What is wrong with an image of `len` bytes as a RAM block of `page_size` pages, if anything.
fn size_problem(len: u64, page_size: u32) -> Option<ImageProblem> {
    if len == 0 {
        Some(ImageProblem::Empty)
    } else if !len.is_multiple_of(u64::from(page_size.max(1))) {
        Some(ImageProblem::NotWholePages { len, page_size })
    } else {
        None
    }
}

/// Why an image spec was refused (see [`ImageSet::load`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageProblem {
    /// The file is empty: a block without pages, which a destination refuses.
    Empty,
    /// The file's size is not a whole number of pages.
    NotWholePages {
        /// Its size in bytes.
        len: u64,
        /// The page size.
        page_size: u32,
    },
    /// The path is a directory.
    Directory,
    /// The path is neither a regular file nor a directory (a FIFO, a socket, a device).
    NotRegularFile,
    /// An earlier spec already gives a block this name.
    DuplicateName {
        /// The block name.
        name: String,
        /// The earlier spec.
        first: String,
    },
}

impl fmt::Display for ImageProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("the file is empty (a RAM block needs at least one page)"),
            Self::NotWholePages { len, page_size } => {
                write!(f, "its size, {len} bytes, is not a multiple of the {page_size}-byte page size")
            }
            Self::Directory => f.write_str("is a directory"),
            Self::NotRegularFile => f.write_str("is not a regular file"),
            Self::DuplicateName { name, first } => {
                write!(f, "block name {name:?} is already used by --image {first:?}")
            }
        }
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
    /// An image spec was refused before anything was connected.
    ImageSpec {
        /// The spec, as given (`FILE[:NAME]`).
        spec: String,
        /// What is wrong with it.
        problem: ImageProblem,
    },
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
    /// A worker thread could not be started, or a socket could not be cloned for shutdown.
    Spawn {
        /// The channel.
        channel: u8,
        /// The error.
        err: io::Error,
    },
    /// The thread that builds the engine could not be started.
    Setup(io::Error),
    /// Cancelled through the cancel flag.
    Interrupted,
    /// Cancelled by a signal (see [`SignalCancel::attribute`]).
    Signal(StopSignal),
    /// A signal handler could not be installed.
    SignalSetup {
        /// The signal.
        signal: StopSignal,
        /// The error.
        err: io::Error,
    },
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

impl fmt::Display for SendFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ImageSpec { spec, problem } => write!(f, "--image {spec:?}: {problem}"),
            Self::Image { path, err } => write!(f, "image {}: {err}", path.display()),
            Self::Engine(e) => write!(f, "{e}"),
            Self::Connect { what, addr, err } => write!(f, "{what}: connect to {addr}: {err}"),
            Self::Channel { channel, packet_num: Some(n), err } => {
                write!(f, "channel {channel}: writing packet {n}: {err}")
            }
            Self::Channel { channel, packet_num: None, err } => write!(f, "channel {channel}: init packet: {err}"),
            Self::Main(err) => write!(f, "main stream: {err}"),
            Self::Spawn { channel, err } => write!(f, "channel {channel}: starting its worker: {err}"),
            Self::Setup(err) => write!(f, "starting the thread that builds the send engine: {err}"),
            Self::Interrupted => f.write_str("interrupted: migration cancelled"),
            Self::Signal(signal) => write!(f, "interrupted by {}: migration cancelled", signal.name()),
            Self::SignalSetup { signal, err } => write!(f, "installing the {} handler: {err}", signal.name()),
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

impl From<StartError> for SendFailure {
    fn from(e: StartError) -> Self {
        Self::Spawn { channel: e.channel.0, err: e.error }
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
    /// Compression of the channels' pages (QEMU's `multifd-compression`; the destination must be
    /// set the same way).
    pub compression: Compression,
    /// Its level: zlib 0-9, zstd 0-20 ([`crate::codec::ZLIB_LEVELS`], [`crate::codec::ZSTD_LEVELS`]).
    pub compression_level: u32,
}

impl Default for SendLimits {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            max_bandwidth: None,
            compression: Compression::None,
            compression_level: crate::codec::DEFAULT_LEVEL,
        }
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
        // At most a packet at a rate of at least 1 byte/s: days, not an overflow; checked anyway.
        let secs = bytes as f64 / self.bytes_per_sec.max(1) as f64;
        let cost = Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(u64::from(u32::MAX)));
        let start = {
            let mut next = lock(&self.next);
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start.checked_add(cost).unwrap_or(start));
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
    /// The uuid sent in every init packet.
    pub uuid: [u8; 16],
    /// The compression method of the channels.
    pub compression: Compression,
    /// Its level (`None` uncompressed).
    pub compression_level: Option<u32>,
    /// Per channel: compressed payload bytes written, and the page bytes they hold.
    pub compressed: Vec<ChannelCompression>,
}

impl SendReport {
    fn new(
        opts: &SendOptions,
        limits: &SendLimits,
        summary: Summary,
        rounds: Vec<RoundStats>,
        (elapsed, joined): (Duration, u8),
        counts: &[CodecCount],
    ) -> Self {
        let (compression, compressed) = (limits.compression, CodecCount::report(counts));
        let compression_level = Some(limits.compression_level).filter(|_| compression != Compression::None);
        let (channels, uuid) = (opts.channels, opts.uuid);
        SendReport { summary, rounds, elapsed, channels, joined, uuid, compression, compression_level, compressed }
    }

    /// Bytes written on the channels: the engine's count (headers and whole pages) with each
    /// compressed packet's pages replaced by its payload.
    pub fn wire_bytes(&self) -> u64 {
        let (c, raw) = self.compressed.iter().fold((0u64, 0u64), |(c, w), x| (c + x.compressed_bytes, w + x.raw_bytes));
        self.summary.total.bytes.saturating_sub(raw).saturating_add(c)
    }
}

/// What one channel's compression did, in a [`SendReport`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ChannelCompression {
    /// The channel.
    pub id: u8,
    /// Compressed payload bytes written.
    pub compressed_bytes: u64,
    /// The page bytes they hold.
    pub raw_bytes: u64,
}

/// Counters of one channel's compression, while it runs (Relaxed: read after the workers joined).
#[derive(Debug, Default)]
struct CodecCount {
    compressed: AtomicU64,
    raw: AtomicU64,
}

impl CodecCount {
    /// The report's per-channel figures, once every worker was joined.
    fn report(counts: &[CodecCount]) -> Vec<ChannelCompression> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed); // Relaxed: the workers were joined.
        let each = counts.iter().zip(0u8..);
        each.map(|(c, id)| ChannelCompression { id, compressed_bytes: load(&c.compressed), raw_bytes: load(&c.raw) })
            .collect()
    }
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
    stall: Stall<'a>,
    /// What [`connect_main`] already wrote, which the driver's first write starts with: dropped then.
    sent_early: Option<&'a [u8]>,
}

impl MainSink for MainStream<'_> {
    type Error = SendFailure;
    fn write(&mut self, bytes: &[u8]) -> Result<(), SendFailure> {
        let what = || "main stream".to_owned();
        let bytes = match self.sent_early.take() {
            None => bytes,
            Some(sent) => bytes.strip_prefix(sent).ok_or_else(|| {
                // Local invariant: the precopy driver's first record is the file header.
                SendFailure::Main(io::Error::other("the first record is not the file header sent at connect"))
            })?,
        };
        if bytes.is_empty() {
            // A write of nothing would read as a closed connection (`WriteZero`).
            return Ok(());
        }
        // Looked at before the write, not after: once the last record is written, a destination
        // that has everything closes at once (QEMU does, on the end of the stream), and a look after
        // that write would call a completed migration failed. A close before any record is still
        // seen, at the next record.
        check_peer(self.stream).map_err(|f| f.unwrap_or_else(|did| SendFailure::Peer { what: what(), did }))?;
        write_all_vectored(self.stream, &mut [IoSlice::new(bytes)], self.stall).map_err(|err| match self.stall.limit {
            Some(waited) if timed_out(&err) => SendFailure::Stalled { what: what(), packet_num: None, waited },
            _ => SendFailure::Main(err),
        })
    }
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

/// The main stream's file header (magic and version), as the precopy driver's first record encodes it.
const FILE_HEADER: &[u8] = &{
    let mut b = [0u8; 8];
    let (magic, version) = (MAIN_MAGIC.to_be_bytes(), MAIN_VERSION.to_be_bytes());
    let mut i = 0;
    while i < 4 {
        (b[i], b[4 + i]) = (magic[i], version[i]);
        i += 1;
    }
    b
};

/// Connects the main stream and writes its file header at once, before any channel connects. A
/// destination that accepts one connection at a time and tells them apart by their first bytes
/// (as `multifd recv` does) then identifies the main stream without waiting: otherwise it waits on
/// it while the channels queue up in its listen backlog, and beyond the backlog (128 connections
/// for a std listener) the next channel's connect times out. The bytes on the wire are the same.
fn connect_main(opts: &SendOptions, limits: &SendLimits) -> Result<TcpStream, SendFailure> {
    let main = connect(opts.connect, "main stream".into(), limits)?;
    (&main).write_all(FILE_HEADER).map_err(SendFailure::Main)?;
    Ok(main)
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
    s.set_write_timeout(Stall::socket_timeout(limits.io_timeout)).map_err(|err| SendFailure::Connect {
        what,
        addr,
        err,
    })?;
    Ok(s)
}

/// Writes all of `bufs` with vectored writes, counting the bytes in the shared counter. Sockets have
/// a write timeout of [`Stall::socket_timeout`]; a write that times out is tried again unless the
/// destination took no byte on any connection for the whole io timeout ([`multifd_core::stall`]).
fn write_all_vectored(mut s: &TcpStream, mut bufs: &mut [IoSlice<'_>], stall: Stall<'_>) -> io::Result<()> {
    let mut w = stall.watch();
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "connection closed")),
            Ok(n) => {
                stall.moved(n);
                IoSlice::advance_slices(&mut bufs, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) && stall.again(&mut w) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

type Engine<'b> = SendEngine<'b, ImageSet, WorkerToken, SendFailure, MAX_SEND_CHANNELS>;

/// What every channel worker of a send migration shares.
struct Worker<'w, 'b> {
    engine: &'w Engine<'b>,
    notify: &'w SendNotify,
    streams: &'w Mutex<Vec<Option<TcpStream>>>,
    pace: Option<&'w Pace>,
    stall: Stall<'w>,
    level: u32,
    counts: &'w [CodecCount],
}

impl Worker<'_, '_> {
    /// Channel `id`'s worker: each packet the engine builds, written with one vectored write (the
    /// header, then the guest pages straight from the image), until the migration ends.
    fn run(&self, id: ChannelId, waker: &StdWaker<'_>) -> Result<(), SendFailure> {
        lock(&self.notify.workers)[id.index()] = Some(thread::current());
        let Some(stream) = lock(self.streams)[id.index()].take() else { return Ok(()) };
        let mut ch = self.engine.channel(id).map_err(SendFailure::Engine)?;
        // The channel's compression stream and its output buffer, made once: no allocation per packet.
        let method = self.engine.compression();
        let mut codec = crate::codec::encoder(method, self.level)
            .map_err(|error| SendFailure::Engine(SendError::Codec { channel: id, packet_num: 0, error }))?;
        let geometry = self.engine.geometry();
        let raw = geometry.page_count() as usize * geometry.page_size() as usize;
        let mut payload =
            if codec.is_some() { vec![0u8; multifd_core::codec::max_compressed_len(raw)] } else { Vec::new() };
        ch.ready(self.notify);
        loop {
            let mut out = match ch.next(waker) {
                Ok(out) => out,
                Err(SendError::Cancelled) => return Ok(()),
                Err(e) => return Err(SendFailure::Engine(e)),
            };
            let compressed = match codec.as_deref_mut() {
                Some(c) => {
                    let bytes = out.compress(c, &mut payload).map_err(SendFailure::Engine)?;
                    let count = &self.counts[id.index()];
                    // Relaxed: statistics, read after the workers were joined.
                    count.compressed.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    count.raw.fetch_add((out.pages().len() * geometry.page_size() as usize) as u64, Ordering::Relaxed);
                    Some(bytes)
                }
                None => None,
            };
            // On the stack: no heap allocation per packet (tests/tests/no_alloc_steady.rs).
            let mut slices = [IoSlice::new(&[]); 1 + multifd_core::wire::MAX_PAGE_COUNT];
            slices[0] = IoSlice::new(out.header());
            let mut used = 1;
            if let Some(bytes) = compressed {
                slices[1] = IoSlice::new(bytes);
                used += usize::from(!bytes.is_empty());
            } else {
                debug_assert!(out.pages().len() < slices.len(), "a packet holds at most MAX_PAGE_COUNT pages");
                for (slot, page) in slices[1..].iter_mut().zip(out.pages()) {
                    *slot = IoSlice::new(page);
                    used += 1;
                }
            }
            let packet_num = out.packet_num;
            if let Some(pace) = self.pace {
                let bytes = slices[..used].iter().map(|s| s.len()).sum();
                pace.take(bytes, || self.engine.lifecycle().is_quitting());
            }
            let what = || format!("channel {}", id.0);
            write_all_vectored(&stream, &mut slices[..used], self.stall).map_err(|err| match self.stall.limit {
                Some(waited) if timed_out(&err) => {
                    SendFailure::Stalled { what: what(), packet_num: Some(packet_num), waited }
                }
                _ => SendFailure::Channel { channel: id.0, packet_num: Some(packet_num), err },
            })?;
            check_peer(&stream).map_err(|f| match f {
                Ok(SendFailure::Main(err)) => SendFailure::Channel { channel: id.0, packet_num: Some(packet_num), err },
                Ok(other) => other,
                Err(did) => SendFailure::Peer { what: what(), did },
            })?;
            ch.done(self.notify);
        }
    }
}

/// Refuses a compression level outside the method's range before anything connects.
fn check_level(limits: &SendLimits) -> Result<(), SendFailure> {
    let range = match limits.compression {
        Compression::Zlib => crate::codec::ZLIB_LEVELS,
        Compression::Zstd => crate::codec::ZSTD_LEVELS,
        _ => return Ok(()),
    };
    if range.contains(&limits.compression_level) {
        return Ok(());
    }
    let error = multifd_core::codec::CodecError::Library {
        what: if limits.compression == Compression::Zlib { "zlib levels are 0-9" } else { "zstd levels are 0-20" },
    };
    Err(SendFailure::Engine(SendError::Codec { channel: ChannelId(0), packet_num: 0, error }))
}

/// Connects channel `id` and writes its init packet: the steps before its worker starts.
fn open_channel(
    opts: &SendOptions,
    limits: &SendLimits,
    id: ChannelId,
    streams: &Mutex<Vec<Option<TcpStream>>>,
    shutdowns: &Mutex<Vec<TcpStream>>,
) -> Result<(), SendFailure> {
    let stream = connect(opts.connect, format!("channel {}", id.0), limits)?;
    let init = multifd_core::send::init_packet(id, opts.uuid);
    let mut w = &stream;
    w.write_all(&init).map_err(|err| SendFailure::Channel { channel: id.0, packet_num: None, err })?;
    let clone = stream.try_clone().map_err(|err| SendFailure::Spawn { channel: id.0, err })?;
    lock(shutdowns).push(clone);
    lock(streams)[id.index()] = Some(stream);
    Ok(())
}

/// The producer's rounds; a failure is recorded on the engine's lifecycle (`Err(None)`).
fn run_precopy<P: Precopy + ?Sized>(
    engine: &Engine<'_>,
    platform: &impl multifd_core::lifecycle::Wake,
    notify: &SendNotify,
    main: &mut MainStream<'_>,
    recording: &mut Recording<'_, P>,
    opts: &SendOptions,
) -> Result<Summary, Option<()>> {
    let mut producer = engine.producer().map_err(|_| None)?;
    precopy(&mut producer, notify, main, recording, opts.machine.as_bytes()).map_err(|e| {
        match e {
            PrecopyError::Main(failure) => {
                engine.lifecycle().record_error(platform, failure);
            }
            PrecopyError::Send(SendError::Cancelled) => {}
            PrecopyError::Send(other) => {
                engine.lifecycle().record_error(platform, SendFailure::Engine(other));
            }
        }
        None
    })
}

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
    migrate_observed(opts, limits, blocks, embedder, cancel, &AtomicU64::new(0))
}

/// As [`migrate_with`]; `written` counts the bytes written on every connection as they go (for a
/// progress display: read it from another thread, `Relaxed`).
pub fn migrate_observed<P: Precopy + ?Sized>(
    opts: &SendOptions,
    limits: &SendLimits,
    blocks: &ImageSet,
    embedder: &mut P,
    cancel: &AtomicBool,
    written: &AtomicU64,
) -> Result<SendReport, SendFailure> {
    let engine = new_engine(opts, blocks, limits)?;
    // Relaxed: see the watcher below. A cancel that came before is not left waiting on connects.
    if cancel.load(Ordering::Relaxed) {
        return Err(SendFailure::Interrupted);
    }
    let t0 = Instant::now();
    let main = connect_main(opts, limits)?;
    let pace = limits.max_bandwidth.map(|bytes_per_sec| Pace { bytes_per_sec, next: Mutex::new(None) });
    let main_clone = main.try_clone().map_err(SendFailure::Main)?;
    let streams: Mutex<Vec<Option<TcpStream>>> = Mutex::new((0..opts.channels).map(|_| None).collect());
    let shutdowns: Mutex<Vec<TcpStream>> = Mutex::new(vec![main_clone]);
    let notify = SendNotify { workers: Mutex::new(vec![None; MAX_SEND_CHANNELS]), producer: thread::current() };
    let engine_ref: &Engine<'_> = &engine;

    let stall = Stall { total: written, limit: limits.io_timeout };
    let counts: Vec<CodecCount> = (0..opts.channels).map(|_| CodecCount::default()).collect();
    let (level, pace) = (limits.compression_level, pace.as_ref());
    let ctx = Worker { engine: engine_ref, notify: &notify, streams: &streams, pace, stall, level, counts: &counts };
    let worker = |id: ChannelId, waker: &StdWaker<'_>| {
        if let Err(failure) = ctx.run(id, waker) {
            engine_ref.lifecycle().record_error(waker, failure);
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
            s.spawn(|| watch_cancel(&done, cancel, engine_ref, platform));
            let created =
                engine_ref.lifecycle().create_all(platform, |id| open_channel(opts, limits, id, &streams, &shutdowns));
            let result = match created {
                Ok(r) if r.started == opts.channels => {
                    let mut main = MainStream { stream: &main, stall, sent_early: Some(FILE_HEADER) };
                    run_precopy(engine_ref, platform, &notify, &mut main, &mut recording, opts)
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
    log::debug!("{joined} of {} channel workers joined", opts.channels);
    drop(main);
    let mut engine = engine;
    match result {
        Ok(summary) if engine.lifecycle().error().is_none() => {
            let mut rounds = recording.rounds;
            rounds.push(summary.last);
            Ok(SendReport::new(opts, limits, summary, rounds, (elapsed, joined), &counts))
        }
        _ => Err(take_error(&mut engine)),
    }
}

/// Watches the cancel flag until `done`: the migration is failed with `Interrupted`, which
/// terminates it.
fn watch_cancel(
    done: &AtomicBool,
    cancel: &AtomicBool,
    engine: &Engine<'_>,
    waker: &impl multifd_core::lifecycle::Wake,
) {
    // Relaxed: plain flags; the coordinator's own atomics order what follows.
    while !done.load(Ordering::Relaxed) {
        if cancel.load(Ordering::Relaxed) {
            engine.lifecycle().record_error(waker, SendFailure::Interrupted);
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The engine for `opts` and `blocks`, built in its box. With room for [`MAX_SEND_CHANNELS`]
/// channels it is over a megabyte (each job slot holds a batch of up to `MAX_PAGE_COUNT` page
/// offsets), and building it by value goes through stack temporaries: an unoptimised build needs
/// several times its size on the stack, more than the 2 MiB a spawned thread has by default. So it
/// is built on a short-lived thread whose stack is sized for it.
fn new_engine<'b>(
    opts: &SendOptions,
    blocks: &'b ImageSet,
    limits: &SendLimits,
) -> Result<Box<Engine<'b>>, SendFailure> {
    check_level(limits)?;
    let mut engine = build_engine(opts, blocks)?;
    engine.set_compression(limits.compression);
    Ok(engine)
}

/// [`new_engine`]'s build, on its own thread.
fn build_engine<'b>(opts: &SendOptions, blocks: &'b ImageSet) -> Result<Box<Engine<'b>>, SendFailure> {
    let geometry = Geometry::new(opts.page_size).map_err(|_| {
        SendFailure::Engine(SendError::BlockLength { block: 0, used_len: 0, page_size: opts.page_size })
    })?;
    let stack = 8 * std::mem::size_of::<Engine<'_>>() + (1 << 20);
    let build = || SendEngine::new(opts.channels, blocks, geometry, Layout::V9_0).map(Box::new);
    thread::scope(|s| {
        let builder = thread::Builder::new().name("send-engine-setup".into()).stack_size(stack);
        match builder.spawn_scoped(s, build).map(|h| h.join()) {
            Ok(Ok(built)) => built.map_err(SendFailure::Engine),
            // `SendEngine::new` has no panicking path; should one appear, it reaches the caller as is.
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(err) => Err(SendFailure::Setup(err)),
        }
    })
}

fn take_error(engine: &mut Engine<'_>) -> SendFailure {
    engine.lifecycle_mut().take_error().unwrap_or(SendFailure::Interrupted)
}

/// A termination signal that [`SignalCancel`] turns into a clean cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGINT (Ctrl-C).
    Int,
    /// SIGTERM (what `kill` and service managers send).
    Term,
}

impl StopSignal {
    /// Every signal [`SignalCancel`] handles.
    pub const ALL: [StopSignal; 2] = [StopSignal::Int, StopSignal::Term];

    /// The signal's number.
    pub fn number(self) -> libc::c_int {
        match self {
            Self::Int => libc::SIGINT,
            Self::Term => libc::SIGTERM,
        }
    }

    /// The signal's name, such as `SIGTERM`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Int => "SIGINT",
            Self::Term => "SIGTERM",
        }
    }

    /// The exit status of a command it stopped: 128 plus the signal's number, as a shell reports a
    /// command killed by it (130 for SIGINT, 143 for SIGTERM).
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Int => 130,
            Self::Term => 143,
        }
    }
}

/// A cancel flag for [`migrate`] that SIGINT and SIGTERM set, remembering the first signal that
/// came, so the command can say which one stopped it. The signals are caught for the rest of the
/// process (signal-hook cannot hand their default action back), so install it once, in a program
/// that has nothing else to do after a cancel than to exit. A second signal, once the flag is set,
/// ends the process at once with that signal's [`StopSignal::exit_code`], for a cancel that hangs.
#[derive(Debug)]
pub struct SignalCancel {
    flag: Arc<AtomicBool>,
    /// The first signal that arrived: 1 + its index in [`StopSignal::ALL`]; 0 before any.
    first: Arc<AtomicUsize>,
}

impl SignalCancel {
    /// Installs the handlers of every [`StopSignal`].
    pub fn install() -> Result<Self, SendFailure> {
        let cancel = Self { flag: Arc::new(AtomicBool::new(false)), first: Arc::new(AtomicUsize::new(0)) };
        for (tag, signal) in (1..).zip(StopSignal::ALL) {
            let setup = |err| SendFailure::SignalSetup { signal, err };
            let number = signal.number();
            // Actions run in the order they were registered. The exit comes first, so it sees the flag
            // as an earlier signal left it; the record of the signal comes before the flag is set, so
            // a reader that sees the flag also sees which signal set it. Each action only loads or
            // stores an atomic, or calls `_exit`: all async-signal-safe.
            let code = libc::c_int::from(signal.exit_code());
            signal_hook::flag::register_conditional_shutdown(number, code, Arc::clone(&cancel.flag)).map_err(setup)?;
            let first = Arc::clone(&cancel.first);
            let record = move || {
                // SeqCst, as signal-hook's own flags: keeps this store before the flag's.
                let _ = first.compare_exchange(0, tag, Ordering::SeqCst, Ordering::SeqCst);
            };
            // SAFETY: the action is async-signal-safe (one atomic compare-exchange, no allocation, no
            // lock) and may run on any thread at any time without harm.
            unsafe { signal_hook::low_level::register(number, record) }.map_err(setup)?;
            signal_hook::flag::register(number, Arc::clone(&cancel.flag)).map_err(setup)?;
        }
        Ok(cancel)
    }

    /// The flag to give [`migrate`]: set once a signal arrived.
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// The first signal that arrived, if any.
    pub fn signal(&self) -> Option<StopSignal> {
        let tag = self.first.load(Ordering::SeqCst);
        tag.checked_sub(1).and_then(|i| StopSignal::ALL.get(i).copied())
    }

    /// `failure`, naming the signal when a signal's cancel caused it ([`SendFailure::Signal`]).
    pub fn attribute(&self, failure: SendFailure) -> SendFailure {
        match (failure, self.signal()) {
            (SendFailure::Interrupted, Some(signal)) => SendFailure::Signal(signal),
            (other, _) => other,
        }
    }
}

/// A send report as JSON: what `multifd send --json` prints.
#[derive(Debug, Serialize)]
pub struct SendJson {
    /// `completed` or `failed`.
    pub status: &'static str,
    /// The failure's message, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Channels used.
    pub channels: u8,
    /// The init packets' uuid, hyphenated lowercase (in a completed migration's summary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Rounds sent.
    pub rounds: u32,
    /// Pages sent.
    pub pages: u64,
    /// Pages with data.
    pub normal_pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Bytes on the channels.
    pub wire_bytes: u64,
    /// Wall time.
    pub seconds: f64,
    /// Guest RAM per second.
    pub guest_mib_per_s: f64,
    /// SYNC packets per channel.
    pub syncs_per_channel: u32,
    /// Workers joined.
    pub workers_joined: u8,
    /// Each round.
    pub per_round: Vec<RoundJson>,
    /// The compression method (`none`, `zlib`, `zstd`).
    pub compression: &'static str,
    /// Its level, when compressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<u32>,
    /// Compressed payload bytes, all channels (0 uncompressed).
    pub compressed_bytes: u64,
    /// The page bytes those payloads hold.
    pub raw_bytes: u64,
    /// Per channel, when compressed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_channel: Vec<ChannelCompression>,
}

/// One round in [`SendJson`].
#[derive(Debug, Serialize)]
pub struct RoundJson {
    /// Round number.
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Pages with data.
    pub normal_pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Bytes on the channels.
    pub bytes: u64,
    /// Its duration.
    pub seconds: f64,
    /// Dirty pages left after it.
    pub dirty_left: u64,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl SendJson {
    /// The JSON form of `r` (pages of `page_size` bytes).
    pub fn completed(r: &SendReport, page_size: u32) -> Self {
        let (t, secs) = (r.summary.total, r.elapsed.as_secs_f64());
        let per_round = r
            .rounds
            .iter()
            .map(|s| RoundJson {
                round: s.round,
                pages: s.pages,
                normal_pages: s.normal_pages,
                zero_pages: s.zero_pages,
                bytes: s.bytes,
                seconds: s.nanos as f64 / 1e9,
                dirty_left: s.dirty_left,
            })
            .collect();
        Self {
            status: "completed",
            error: None,
            channels: r.channels,
            uuid: Some(uuid::Uuid::from_bytes(r.uuid).to_string()),
            rounds: r.summary.rounds,
            pages: t.pages,
            normal_pages: t.normal_pages,
            zero_pages: t.zero_pages,
            wire_bytes: r.wire_bytes(),
            seconds: secs,
            guest_mib_per_s: mib(t.pages * u64::from(page_size)) / secs.max(1e-9),
            syncs_per_channel: r.summary.syncs_per_channel,
            workers_joined: r.joined,
            per_round,
            compression: r.compression.name(),
            compression_level: r.compression_level,
            compressed_bytes: r.compressed.iter().map(|c| c.compressed_bytes).sum(),
            raw_bytes: r.compressed.iter().map(|c| c.raw_bytes).sum(),
            per_channel: if r.compression == Compression::None { Vec::new() } else { r.compressed.clone() },
        }
    }

    /// The JSON form of a failed migration over `channels` channels.
    pub fn failed(error: &SendFailure, channels: u8) -> Self {
        Self {
            status: "failed",
            error: Some(error.to_string()),
            channels,
            uuid: None,
            rounds: 0,
            pages: 0,
            normal_pages: 0,
            zero_pages: 0,
            wire_bytes: 0,
            seconds: 0.0,
            guest_mib_per_s: 0.0,
            syncs_per_channel: 0,
            workers_joined: 0,
            per_round: Vec::new(),
            compression: "none",
            compression_level: None,
            compressed_bytes: 0,
            raw_bytes: 0,
            per_channel: Vec::new(),
        }
    }
}

/// Formats a report as a table.
pub fn format_report(r: &SendReport, page_size: u32) -> String {
    let t = r.summary.total;
    let secs = r.elapsed.as_secs_f64();
    let guest_bytes = t.pages * u64::from(page_size);
    let mut out = String::new();
    out += &format!("{:<22} {}\n", "status", "completed");
    out += &format!("{:<22} {}\n", "channels", r.channels);
    out += &format!("{:<22} {}\n", "uuid", uuid::Uuid::from_bytes(r.uuid));
    out += &format!("{:<22} {}\n", "rounds", r.summary.rounds);
    out += &format!("{:<22} {} ({} normal, {} zero)\n", "pages sent", t.pages, t.normal_pages, t.zero_pages);
    out += &format!("{:<22} {:.1} MiB\n", "bytes on channels", mib(r.wire_bytes()));
    out += &format!("{:<22} {:.3} s\n", "time", secs);
    out += &format!("{:<22} {:.1} MiB/s guest RAM\n", "throughput", mib(guest_bytes) / secs.max(1e-9));
    out += &format!("{:<22} {} per channel\n", "SYNC packets", r.summary.syncs_per_channel);
    if let Some(level) = r.compression_level {
        let (c, raw) = r.compressed.iter().fold((0, 0), |(c, w), x| (c + x.compressed_bytes, w + x.raw_bytes));
        let pct = if raw == 0 { 0.0 } else { 100.0 * c as f64 / raw as f64 };
        out += &format!(
            "{:<22} {} level {level}: {:.1} MiB of pages in {:.1} MiB ({pct:.0}%)\n",
            "compression",
            r.compression.name(),
            mib(raw),
            mib(c)
        );
        for x in &r.compressed {
            out += &format!(
                "{:<22} {:.1} MiB in {:.1} MiB\n",
                format!("  channel {}", x.id),
                mib(x.raw_bytes),
                mib(x.compressed_bytes)
            );
        }
    }
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

/// Logs the migration's start (at debug level: `-v`), with the unix time the benchmarks read.
pub fn announce_start() {
    log::debug!("connecting at unix time {:.6}", unix_now());
}

/// Path helper for callers: the default block name of an image (its file stem).
pub fn default_block_name(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Runs `f` while a progress bar on stderr (a terminal only, and when `show`) follows `written`
/// against `total` bytes, with rate and time left; the bar is cleared when `f` returns. Later
/// rounds resend dirty pages, so past the first pass the bar stays full and the byte count goes on.
pub fn with_progress<R>(show: bool, total: u64, written: &AtomicU64, f: impl FnOnce() -> R) -> R {
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return f();
    }
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{bar:30} {percent:>3}% {binary_bytes} sent of {binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            );
            bar.set_style(style.unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            // Relaxed: a stop flag and a statistic; nothing is published through them.
            while !done.load(Ordering::Relaxed) {
                bar.set_position(written.load(Ordering::Relaxed));
                thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        let r = f();
        // Relaxed: as above.
        done.store(true, Ordering::Relaxed);
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use multifd_core::wire::stream::Record;

    #[test]
    fn the_header_sent_at_connect_is_the_drivers_first_record() {
        let mut buf = [0u8; 16];
        let n = Record::FileHeader.encode(&mut buf, 4096).unwrap();
        assert_eq!(FILE_HEADER, &buf[..n]);
    }

    /// A destination that closed the main stream before the next record is still reported, naming it
    /// (the sink looks at the peer before each record, so that a close after the last one, which
    /// a QEMU destination makes as soon as it has the end of the stream, is not a failure).
    #[test]
    fn a_close_before_a_record_is_reported() {
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        drop(listener.accept().unwrap());
        // Wait until the close has arrived.
        let mut byte = 0u8;
        // SAFETY: a one-byte buffer, valid for the call, on the sender's open descriptor.
        while unsafe { libc::recv(sender.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK) } != 0 {}
        let total = AtomicU64::new(0);
        let mut sink = MainStream { stream: &sender, stall: Stall { total: &total, limit: None }, sent_early: None };
        let err = sink.write(&[0x07]).unwrap_err().to_string();
        assert_eq!(err, "main stream: the destination closed the connection before the migration ended");
    }
}
