//! `multifd recv`: accept a live migration from a QEMU source (or any compatible sender) on TCP and
//! write each RAM block to a file.
//!
//! The flow: listen; accept the main stream and N multifd channels in any order (told apart by their
//! first bytes, channels by the id in their init packet); read the main stream up to the end of its
//! block list; map each block as fresh zeroed memory; start one `multifd-recv-N` worker per channel
//! (the core's [`RecvChannel`] asks for header bytes or for exactly the guest page the next bytes
//! belong to, and the worker `read(2)`s straight into that page); run the rest of the main stream on
//! the calling thread, releasing epochs at its sync markers; when every stream has ended, clean up
//! (terminate, shut the sockets down, join every worker), check completeness, and only then write
//! the block files (written under a temporary name and renamed).

use std::fmt;
use std::fs;
use std::io::{self, IsTerminal, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use multifd_core::bitmap::{AtomicWord, words_for};
use multifd_core::block::{BlockSpec, BlockTable, GuestMemory, ZeroPagePolicy};
use multifd_core::lifecycle::{ChannelId, Coordinator, MAX_CHANNELS};
use multifd_core::recv::{
    ChannelStats, EpochBarrier, MainAction, MainRecv, PageRange, RecvChannel, RecvError, SyncMode, Want,
};
use multifd_core::wire::packet::INIT_PACKET_LEN;
use multifd_core::wire::stream::{Event, StreamConfig, StreamParser};
use multifd_core::wire::{ChannelKind, ChannelSet, DecodeError, Geometry, InitPacket, PacketConfig, identify_channel};

use crate::mem::{AnonMemory, Populate};
use crate::platform::{Role, StdWaker, WorkerToken, run_scoped};

/// Most RAM blocks one migration may declare.
pub const MAX_BLOCKS: usize = 64;

/// Options of `multifd recv`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: String,
    /// Multifd channels the source uses.
    pub channels: u8,
    /// Directory for the block files.
    pub out: PathBuf,
    /// The source's uuid, if it must match.
    pub uuid: Option<[u8; 16]>,
    /// Target page size.
    pub page_size: u32,
    /// Where to write the bound port.
    pub port_file: Option<PathBuf>,
    /// Blocks to map and touch before accepting: (name, size in bytes).
    pub prealloc: Vec<(Vec<u8>, u64)>,
    /// Periodic progress on stderr.
    pub progress: bool,
}

/// How long, after the first connection, the others may take to arrive, by default.
pub const DEFAULT_ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long no byte may arrive on any connection before the migration is failed as stalled, by default.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Time and size limits of `multifd recv`. Kept apart from [`Options`] so that code building
/// `Options` field by field keeps compiling; [`run`] uses [`Limits::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How long, counted from the first accepted connection, the main stream and every channel may
    /// take to connect and identify themselves. `None`: no limit. Before the first connection the
    /// receiver waits without limit (the source may start its migration at any time).
    pub accept_timeout: Option<Duration>,
    /// How long a read may wait while no byte arrives on any connection; then the migration fails
    /// as stalled, naming the connection whose read gave up. `None`: no limit.
    pub io_timeout: Option<Duration>,
    /// Most bytes of RAM the source's block list may declare, in total: what the receiver maps and
    /// sizes its bitmaps after is bounded by this, never by the peer alone.
    pub max_ram: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            accept_timeout: Some(DEFAULT_ACCEPT_TIMEOUT),
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            max_ram: physical_ram(),
        }
    }
}

/// Bytes of physical RAM of this machine (`u64::MAX` if the system does not say).
pub fn physical_ram() -> u64 {
    // SAFETY: `sysconf` only reads system configuration; any argument is allowed.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages <= 0 || size <= 0 { u64::MAX } else { (pages as u64).saturating_mul(size as u64) }
}

/// A duration in seconds for messages: whole seconds without decimals.
fn secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{} s", d.as_secs()) } else { format!("{:.3} s", d.as_secs_f64()) }
}

/// Where a failure happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// The listening socket.
    Listener,
    /// An accepted connection not yet identified (0-based accept order).
    Connection(usize),
    /// The main stream.
    Main,
    /// A multifd channel.
    Channel(ChannelId),
    /// A RAM block (by its idstr).
    Block(String),
    /// The output directory or a block file.
    Output(PathBuf),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Listener => write!(f, "listener"),
            Place::Connection(n) => write!(f, "connection #{n}"),
            Place::Main => write!(f, "main stream"),
            Place::Channel(c) => write!(f, "{c}"),
            Place::Block(b) => write!(f, "block {b:?}"),
            Place::Output(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Why `multifd recv` failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Failure {
    /// An I/O error.
    Io {
        /// Where.
        place: Place,
        /// What was being done.
        doing: &'static str,
        /// The error.
        error: io::Error,
    },
    /// A connection's first bytes or init packet were refused.
    Handshake {
        /// Where.
        place: Place,
        /// Why.
        error: DecodeError,
    },
    /// A second main stream connected.
    DuplicateMain {
        /// Where.
        place: Place,
    },
    /// A connection closed before it could be identified.
    ClosedEarly {
        /// Where.
        place: Place,
        /// Bytes seen.
        have: usize,
    },
    /// The engine refused the peer's input.
    Engine(RecvError),
    /// The block list is unusable (too many blocks, bad sizes, disagreement with `--prealloc`).
    BlockList {
        /// Where.
        place: Place,
        /// Why.
        reason: String,
    },
    /// The main stream ended without its EOF record.
    MainNoEof,
    /// Some pages of a block were never received.
    Incomplete {
        /// The block.
        place: Place,
        /// Pages received.
        received: usize,
        /// Pages in the block.
        pages: usize,
    },
    /// The main stream ended while a channel was parked at a SYNC no marker will release.
    SyncWithoutMarker {
        /// The channel.
        channel: ChannelId,
        /// Markers the main stream had.
        markers: u32,
    },
    /// A channel worker panicked.
    WorkerPanicked {
        /// How many.
        count: u8,
    },
    /// Connections still missing when the accept timeout ran out.
    NeverConnected {
        /// Whether the main stream is among them.
        main: bool,
        /// The ids of the channels that never connected.
        channels: Vec<u8>,
        /// The accept timeout.
        waited: Duration,
    },
    /// No byte arrived on any connection for the io timeout while this one was read.
    Stalled {
        /// The connection whose read gave up.
        place: Place,
        /// What was being read.
        doing: &'static str,
        /// The io timeout.
        waited: Duration,
    },
    /// The block list declares more RAM than the limit allows.
    TooMuchRam {
        /// The block that crossed the limit (or the main stream, for its declared total).
        place: Place,
        /// Bytes it declares.
        size: u64,
        /// Bytes declared so far, this one included.
        total: u64,
        /// The limit (`--max-ram`).
        limit: u64,
    },
    /// The sender closed a channel inside a packet, or the main stream inside a record (the core's
    /// error says where).
    ClosedInside(RecvError),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Io { place, doing, error } => write!(f, "{place}: {doing}: {error}"),
            Failure::Handshake { place, error } => write!(f, "{place}: {error}"),
            Failure::DuplicateMain { place } => write!(f, "{place}: a second main stream connected"),
            Failure::ClosedEarly { place, have } => {
                write!(f, "{place}: closed after {have} bytes, before it could be identified")
            }
            Failure::Engine(e) => write!(f, "{e}"),
            Failure::BlockList { place, reason } => write!(f, "{place}: {reason}"),
            Failure::MainNoEof => write!(
                f,
                "main stream: closed by the sender before its EOF record (migration aborted by the peer or connection cut)"
            ),
            Failure::Incomplete { place, received, pages } => {
                write!(f, "{place}: only {received} of {pages} pages were received")
            }
            Failure::SyncWithoutMarker { channel, markers } => write!(
                f,
                "{channel}: parked at SYNC {} but the main stream ended after {markers} sync markers",
                markers + 1
            ),
            Failure::WorkerPanicked { count } => write!(f, "{count} channel worker(s) panicked"),
            Failure::NeverConnected { main, channels, waited } => {
                let mut missing: Vec<String> = Vec::new();
                if *main {
                    missing.push("main stream".into());
                }
                missing.extend(channels.iter().map(|c| format!("channel {c}")));
                write!(
                    f,
                    "{} never connected: still missing {} after the first connection (--accept-timeout)",
                    missing.join(", "),
                    secs(*waited)
                )
            }
            Failure::Stalled { place, doing, waited } => write!(
                f,
                "{place}: stalled: no data arrived on any connection for {} while {doing} (--io-timeout)",
                secs(*waited)
            ),
            Failure::TooMuchRam { place, size, total, limit } => write!(
                f,
                "{place}: declares {size} bytes, {total} bytes of RAM in all, above the limit of {limit} bytes (--max-ram)"
            ),
            Failure::ClosedInside(e) => {
                write!(f, "{e}: closed by the sender (migration aborted by the peer or connection cut)")
            }
        }
    }
}

impl std::error::Error for Failure {}

impl From<RecvError> for Failure {
    fn from(e: RecvError) -> Self {
        Failure::Engine(e)
    }
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        Failure::Io { place: Place::Listener, doing: "starting a worker thread", error }
    }
}

/// One block in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockReport {
    /// The block's idstr (lossy UTF-8).
    pub name: String,
    /// The file written (or that would have been written).
    pub file: PathBuf,
    /// Bytes.
    pub size: u64,
    /// Pages.
    pub pages: u64,
    /// Pages marked received.
    pub received_pages: u64,
}

/// What happened, for the one-line summary and `--json`.
#[derive(Debug, Default)]
pub struct Report {
    /// The failure, if any.
    pub error: Option<String>,
    /// Wall time from the first accepted connection.
    pub seconds: f64,
    /// Bytes received over all connections.
    pub bytes: u64,
    /// Blocks.
    pub blocks: Vec<BlockReport>,
    /// Pages received as data (channels and main stream).
    pub normal_pages: u64,
    /// Zero pages received (channels and main stream).
    pub zero_pages: u64,
    /// Multifd packets.
    pub packets: u64,
    /// Sync epochs released.
    pub sync_epochs: u32,
    /// Per channel.
    pub channels: Vec<(u8, ChannelStats)>,
    /// The bound address.
    pub bound: Option<std::net::SocketAddr>,
}

impl Report {
    /// Whether the migration completed.
    pub fn completed(&self) -> bool {
        self.error.is_none()
    }

    /// The report as one JSON object (no trailing newline).
    pub fn to_json(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{{\"status\": \"{}\", \"error\": {}, \"seconds\": {:.6}, \"bytes\": {}, \"blocks\": [",
            if self.completed() { "completed" } else { "failed" },
            self.error.as_deref().map_or_else(|| "null".to_owned(), json_str),
            self.seconds,
            self.bytes
        ));
        for (i, b) in self.blocks.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            s.push_str(&format!(
                "{{\"name\": {}, \"file\": {}, \"size\": {}, \"pages\": {}, \"received_pages\": {}}}",
                json_str(&b.name),
                json_str(&b.file.to_string_lossy()),
                b.size,
                b.pages,
                b.received_pages
            ));
        }
        s.push_str(&format!(
            "], \"normal_pages\": {}, \"zero_pages\": {}, \"packets\": {}, \"sync_epochs\": {}, \"channels\": [",
            self.normal_pages, self.zero_pages, self.packets, self.sync_epochs
        ));
        for (i, (id, c)) in self.channels.iter().enumerate() {
            if i > 0 {
                s.push_str(", ");
            }
            s.push_str(&format!(
                "{{\"id\": {}, \"packets\": {}, \"normal_pages\": {}, \"zero_pages\": {}, \"bytes\": {}}}",
                id, c.packets, c.normal_pages, c.zero_pages, c.bytes
            ));
        }
        s.push_str("]}");
        s
    }
}

/// A JSON string literal.
fn json_str(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for ch in v.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The file name of a block: bytes outside `A-Za-z0-9._-@` as `%XX`, then `.bin`.
pub fn block_file_name(idstr: &[u8]) -> String {
    let mut s = String::with_capacity(idstr.len() + 4);
    for &b in idstr {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s.push_str(".bin");
    s
}

/// Parses a uuid (32 hex digits, dashes ignored).
pub fn parse_uuid(s: &str) -> Result<[u8; 16], String> {
    let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return Err(format!("uuid {s:?}: expected 32 hex digits"));
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let txt = std::str::from_utf8(pair).map_err(|_| format!("uuid {s:?}: not hex"))?;
        out[i] = u8::from_str_radix(txt, 16).map_err(|_| format!("uuid {s:?}: {txt:?} is not hex"))?;
    }
    Ok(out)
}

/// Parses a byte count: digits with an optional K/M/G/T suffix (binary units, `B`/`iB` allowed).
pub fn parse_bytes(size: &str) -> Result<u64, String> {
    let size = size.trim_end_matches("iB").trim_end_matches('B');
    let (digits, shift) = match size.as_bytes().last() {
        Some(b'K' | b'k') => (&size[..size.len() - 1], 10),
        Some(b'M' | b'm') => (&size[..size.len() - 1], 20),
        Some(b'G' | b'g') => (&size[..size.len() - 1], 30),
        Some(b'T' | b't') => (&size[..size.len() - 1], 40),
        _ => (size, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("bad size {digits:?}"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| "size overflows".to_owned())
}

/// Parses `NAME:SIZE` (size in bytes, or with a K/M/G/T suffix, binary units).
pub fn parse_prealloc(s: &str) -> Result<(Vec<u8>, u64), String> {
    let (name, size) = s.rsplit_once(':').ok_or_else(|| format!("--prealloc {s:?}: expected NAME:SIZE"))?;
    if name.is_empty() {
        return Err(format!("--prealloc {s:?}: empty block name"));
    }
    let bytes = parse_bytes(size).map_err(|e| format!("--prealloc {s:?}: {e}"))?;
    if bytes == 0 {
        return Err(format!("--prealloc {s:?}: size is zero"));
    }
    Ok((name.as_bytes().to_vec(), bytes))
}

/// Parses a timeout in seconds (fractions allowed); 0 means no limit (`None`).
pub fn parse_timeout(s: &str) -> Result<Option<Duration>, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?}: a timeout is 0 (no limit) or a positive number of seconds"));
    }
    Ok((v > 0.0).then(|| Duration::from_secs_f64(v)))
}

/// Runs `multifd recv` with the default [`Limits`]; returns the report (its `error` is set on
/// failure). Every thread it started has ended when it returns.
pub fn run(opts: &Options) -> Report {
    run_with(opts, &Limits::default())
}

/// Runs `multifd recv` with `limits`; as [`run`].
pub fn run_with(opts: &Options, limits: &Limits) -> Report {
    let mut report = Report::default();
    let start = Instant::now();
    if let Err(e) = receive(opts, limits, &mut report, start) {
        report.error = Some(e.to_string());
    }
    report.seconds = start.elapsed().as_secs_f64();
    report
}

/// The main stream: a socket, a read buffer and the incremental parser.
struct MainReader<'s> {
    stream: &'s TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    parser: StreamParser,
    bytes: &'s AtomicU64,
    io_timeout: Option<Duration>,
}

/// What [`MainReader::pump`]'s callback asks for.
enum Flow {
    Continue,
    Stop,
}

impl MainReader<'_> {
    /// Feeds events to `on` until it says stop (`Ok(true)`) or the stream ends cleanly (`Ok(false)`).
    fn pump(&mut self, mut on: impl FnMut(&Event<'_>) -> Result<Flow, Failure>) -> Result<bool, Failure> {
        loop {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                let stall = Stall { total: self.bytes, limit: self.io_timeout };
                let n = read_retry(self.stream, &mut self.buf, stall)
                    .map_err(|error| io_failure(Place::Main, "reading", error, self.io_timeout))?;
                if n == 0 {
                    self.parser.finish().map_err(|error| {
                        Failure::ClosedInside(RecvError::MainStream { position: self.parser.position(), error })
                    })?;
                    return Ok(false);
                }
                // Relaxed: a progress counter.
                self.bytes.fetch_add(n as u64, Ordering::Relaxed);
                self.end = n;
            }
            let item = self.parser.item_position();
            let (used, ev) = self
                .parser
                .feed(&self.buf[self.start..self.end])
                .map_err(|error| RecvError::MainStream { position: item, error })?;
            self.start += used;
            if let Some(ev) = ev
                && let Flow::Stop = on(&ev)?
            {
                return Ok(true);
            }
        }
    }
}

/// Whether `e` is a read or write that ran out of its socket timeout.
fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// The failure for an I/O error: a timed-out read is a stall, anything else an I/O error.
fn io_failure(place: Place, doing: &'static str, error: io::Error, io_timeout: Option<Duration>) -> Failure {
    match io_timeout {
        Some(waited) if timed_out(&error) => Failure::Stalled { place, doing, waited },
        _ => Failure::Io { place, doing, error },
    }
}

/// Stall detection shared by every connection: sockets get a read timeout of a slice of the io
/// timeout ([`poll_slice`]), and a read that times out is tried again unless no byte arrived on
/// any connection for the whole io timeout. So a connection may idle while the others carry the
/// migration (a long round, a channel parked at a SYNC), and a stall is noticed within a slice of
/// the io timeout after the last byte.
#[derive(Clone, Copy)]
struct Stall<'a> {
    /// Bytes received on all connections.
    total: &'a AtomicU64,
    /// The io timeout (`None`: sockets have no timeout, reads wait for ever).
    limit: Option<Duration>,
}

/// What one read last saw of the shared byte counter, and since when.
struct Watch {
    seen: u64,
    since: Instant,
}

impl Stall<'_> {
    fn watch(&self) -> Watch {
        // Relaxed: a progress counter; only whether it moved matters.
        Watch { seen: self.total.load(Ordering::Relaxed), since: Instant::now() }
    }

    /// After a read timed out: whether to read again.
    fn again(&self, w: &mut Watch) -> bool {
        // Relaxed: as in `watch`.
        let now = self.total.load(Ordering::Relaxed);
        if now != w.seen {
            w.seen = now;
            w.since = Instant::now();
            return true;
        }
        self.limit.is_none_or(|l| w.since.elapsed() < l)
    }
}

/// The socket timeout for an io timeout: a quarter of it, at least 10 ms.
fn poll_slice(limit: Option<Duration>) -> Option<Duration> {
    limit.map(|l| (l / 4).max(Duration::from_millis(10)))
}

/// Reads into `buf`, retrying interrupted reads and timed-out reads as [`Stall`] says.
fn read_retry(mut s: &TcpStream, buf: &mut [u8], stall: Stall<'_>) -> io::Result<usize> {
    let mut w = stall.watch();
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if timed_out(&e) && stall.again(&mut w) => continue,
            other => return other,
        }
    }
}

/// Most pages one vectored read fills (a packet of 1 KiB pages has 512).
const MAX_IOV: usize = 512;

/// Reads into the guest ranges of `iov` with `readv(2)`; retries as [`read_retry`] does.
fn readv_raw(fd: i32, iov: &[libc::iovec], stall: Stall<'_>) -> io::Result<usize> {
    let mut w = stall.watch();
    loop {
        // SAFETY: every iovec points at a guest page range from `GuestMemory::raw_range`, valid for
        // `iov_len` bytes of writes; the kernel writes them, no Rust reference covers them. The count
        // is at most 512, below IOV_MAX.
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

/// Waits until `listener` has a connection to accept, or until `deadline`; false when it passed.
fn wait_acceptable(listener: &TcpListener, deadline: Option<Instant>) -> Result<bool, Failure> {
    loop {
        let timeout_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
            }
        };
        let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid `pollfd` for the listener's open descriptor; the count says 1.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r > 0 {
            return Ok(true);
        }
        if r < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(Failure::Io { place: Place::Listener, doing: "waiting for connections", error });
            }
        }
    }
}

/// Accepts the main stream and every channel. Once the first connection is in, the others must
/// arrive within the accept timeout; each connection must identify itself within the io timeout.
fn accept_all(listener: &TcpListener, opts: &Options, limits: &Limits) -> Result<(TcpStream, Vec<TcpStream>), Failure> {
    let n = usize::from(opts.channels);
    let mut main = None;
    let mut chans: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut seen = ChannelSet::new();
    let mut accepted = 0usize;
    let mut deadline: Option<Instant> = None;
    listener.set_nonblocking(true).map_err(|error| Failure::Io {
        place: Place::Listener,
        doing: "making the listener non-blocking",
        error,
    })?;
    while main.is_none() || chans.iter().any(Option::is_none) {
        let place = Place::Connection(accepted);
        if !wait_acceptable(listener, deadline)? {
            return Err(Failure::NeverConnected {
                main: main.is_none(),
                channels: (0..opts.channels).filter(|&c| chans[usize::from(c)].is_none()).collect(),
                waited: limits.accept_timeout.unwrap_or_default(),
            });
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(error) => return Err(Failure::Io { place: Place::Listener, doing: "accepting", error }),
        };
        accepted += 1;
        if deadline.is_none() {
            deadline = limits.accept_timeout.map(|t| Instant::now() + t);
        }
        let setup = |error| Failure::Io { place: place.clone(), doing: "setting up the socket", error };
        stream.set_nonblocking(false).map_err(setup)?;
        stream.set_read_timeout(poll_slice(limits.io_timeout)).map_err(setup)?;
        let _ = stream.set_nodelay(true);
        let mut first = [0u8; 4];
        let ident_start = Instant::now();
        let stalled = || {
            limits.io_timeout.filter(|&waited| ident_start.elapsed() >= waited).map(|waited| Failure::Stalled {
                place: place.clone(),
                doing: "identifying the connection",
                waited,
            })
        };
        let have = loop {
            let got = match stream.peek(&mut first) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if timed_out(&e) => match stalled() {
                    Some(f) => return Err(f),
                    None => continue,
                },
                Err(error) => return Err(Failure::Io { place, doing: "identifying the connection", error }),
            };
            if got == 0 || got == 4 {
                break got;
            }
            // A few bytes and then the peer's FIN: `peek` keeps returning those bytes without ever
            // reporting the end, so ask TCP whether the peer has closed its side.
            if peer_closed(&stream) {
                break got;
            }
            // A few bytes, then silence: give up after the io timeout as a blocking read would.
            if let Some(f) = stalled() {
                return Err(f);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if have < 4 {
            return Err(Failure::ClosedEarly { place, have });
        }
        match identify_channel(first).map_err(|error| Failure::Handshake { place: place.clone(), error })? {
            ChannelKind::Main => {
                if main.is_some() {
                    return Err(Failure::DuplicateMain { place });
                }
                main = Some(stream);
            }
            ChannelKind::Multifd => {
                let mut init = [0u8; INIT_PACKET_LEN];
                // Nothing else is read yet: the counter stays still, so the io timeout counts from here.
                let still = AtomicU64::new(0);
                let stall = Stall { total: &still, limit: limits.io_timeout };
                let mut have = 0;
                while have < INIT_PACKET_LEN {
                    let doing = "reading the init packet";
                    match read_retry(&stream, &mut init[have..], stall) {
                        Ok(0) => return Err(Failure::ClosedEarly { place, have }),
                        Ok(n) => have += n,
                        Err(error) => return Err(io_failure(place, doing, error, limits.io_timeout)),
                    }
                }
                let packet =
                    InitPacket::decode(&init).map_err(|error| Failure::Handshake { place: place.clone(), error })?;
                packet
                    .validate(opts.channels, opts.uuid)
                    .map_err(|error| Failure::Handshake { place: place.clone(), error })?;
                seen.insert(packet.id).map_err(|error| Failure::Handshake { place: place.clone(), error })?;
                chans[usize::from(packet.id)] = Some(stream);
            }
        }
    }
    // Local invariant: the loop ends only when every slot is filled.
    let chans = chans.into_iter().flatten().collect();
    Ok((main.expect("loop ends with a main stream"), chans))
}

type Table<'a> = BlockTable<'a, AnonMemory, MAX_BLOCKS>;

fn receive(opts: &Options, limits: &Limits, report: &mut Report, start: Instant) -> Result<(), Failure> {
    let n = opts.channels;
    if n == 0 || usize::from(n) > MAX_CHANNELS {
        return Err(Failure::BlockList {
            place: Place::Listener,
            reason: format!("channel count {n} is outside 1..=255"),
        });
    }
    let geometry =
        Geometry::new(opts.page_size).map_err(|error| Failure::Handshake { place: Place::Listener, error })?;
    fs::create_dir_all(&opts.out).map_err(|error| Failure::Io {
        place: Place::Output(opts.out.clone()),
        doing: "creating",
        error,
    })?;

    // Preallocated blocks are mapped and touched before anything is accepted.
    let mut pre: Vec<(Vec<u8>, u64, Option<AnonMemory>)> = Vec::new();
    for (name, size) in &opts.prealloc {
        let place = Place::Block(String::from_utf8_lossy(name).into_owned());
        let len = usize::try_from(*size)
            .map_err(|_| Failure::BlockList { place: place.clone(), reason: format!("size {size} does not fit") })?;
        let mem = AnonMemory::new(len, Populate::Touch).map_err(|error| Failure::Io {
            place,
            doing: "mapping the preallocated block",
            error,
        })?;
        pre.push((name.clone(), *size, Some(mem)));
    }

    let listener = TcpListener::bind(&opts.listen).map_err(|error| Failure::Io {
        place: Place::Listener,
        doing: "binding",
        error,
    })?;
    let bound =
        listener.local_addr().map_err(|error| Failure::Io { place: Place::Listener, doing: "local_addr", error })?;
    report.bound = Some(bound);
    eprintln!("multifd recv: listening on {bound} for {n} channels");
    if let Some(pf) = &opts.port_file {
        let tmp = pf.with_extension("tmp");
        fs::write(&tmp, format!("{}\n", bound.port()))
            .and_then(|()| fs::rename(&tmp, pf))
            .map_err(|error| Failure::Io { place: Place::Output(pf.clone()), doing: "writing the port file", error })?;
    }
    let (main_stream, chans) = accept_all(&listener, opts, limits)?;
    // Further connections are refused by the kernel once the listener is closed.
    drop(listener);
    let _ = start;

    let total_bytes = AtomicU64::new(0);
    let mut reader = MainReader {
        stream: &main_stream,
        buf: vec![0u8; 256 * 1024],
        start: 0,
        end: 0,
        parser: StreamParser::new(StreamConfig::new(geometry)),
        bytes: &total_bytes,
        io_timeout: limits.io_timeout,
    };

    // The block list comes first on the main stream; it decides what to map.
    let mut declared: Vec<(Vec<u8>, u64)> = Vec::new();
    let mut total: Option<u64> = None;
    let mut sum = 0u64;
    let stopped = reader.pump(|ev| {
        match *ev {
            // The declared total sizes nothing; the blocks are checked against the limit one by one.
            Event::RamTotal { total: t } => total = Some(t),
            Event::BlockDeclared { name, used_length } => {
                // Checked as each block arrives: nothing is kept or mapped for a list past the limits.
                let place = || Place::Block(String::from_utf8_lossy(name).into_owned());
                if declared.len() == MAX_BLOCKS {
                    return Err(Failure::BlockList {
                        place: place(),
                        reason: format!("more than {MAX_BLOCKS} blocks declared"),
                    });
                }
                sum = sum.saturating_add(used_length);
                if sum > limits.max_ram {
                    return Err(Failure::TooMuchRam {
                        place: place(),
                        size: used_length,
                        total: sum,
                        limit: limits.max_ram,
                    });
                }
                declared.push((name.to_vec(), used_length));
            }
            Event::ZeroPage { .. } | Event::PageData { .. } | Event::Eof | Event::MultifdFlush | Event::Eos => {
                return Err(Failure::BlockList {
                    place: Place::Main,
                    reason: "RAM data or a marker before the block list was complete".into(),
                });
            }
            _ => {}
        }
        Ok(if total.is_some_and(|t| t == sum && !declared.is_empty()) { Flow::Stop } else { Flow::Continue })
    })?;
    if !stopped {
        return Err(Failure::MainNoEof);
    }
    if declared.len() > MAX_BLOCKS {
        return Err(Failure::BlockList {
            place: Place::Main,
            reason: format!("{} blocks, at most {MAX_BLOCKS}", declared.len()),
        });
    }
    for (name, size, _) in &pre {
        match declared.iter().find(|d| &d.0 == name) {
            Some(d) if d.1 == *size => {}
            Some(d) => {
                return Err(Failure::BlockList {
                    place: Place::Block(String::from_utf8_lossy(name).into_owned()),
                    reason: format!("--prealloc size {size} but the source declares {} bytes", d.1),
                });
            }
            None => {
                return Err(Failure::BlockList {
                    place: Place::Block(String::from_utf8_lossy(name).into_owned()),
                    reason: "given to --prealloc but not in the source's block list".into(),
                });
            }
        }
    }

    // Map the blocks and their bitmaps; they outlive every worker (scoped threads below).
    let mut memories: Vec<AnonMemory> = Vec::with_capacity(declared.len());
    for (name, size) in &declared {
        let place = Place::Block(String::from_utf8_lossy(name).into_owned());
        let mem = match pre.iter_mut().find(|p| &p.0 == name).and_then(|p| p.2.take()) {
            Some(m) => m,
            None => {
                let len = usize::try_from(*size).map_err(|_| Failure::BlockList {
                    place: place.clone(),
                    reason: format!("size {size} does not fit"),
                })?;
                AnonMemory::new(len, Populate::Lazy).map_err(|error| Failure::Io { place, doing: "mapping", error })?
            }
        };
        memories.push(mem);
    }
    let bitmaps: Vec<Vec<AtomicWord>> = declared
        .iter()
        .map(|(_, size)| {
            (0..words_for((*size / u64::from(opts.page_size)) as usize)).map(|_| AtomicWord::new(0)).collect()
        })
        .collect();
    let mut table: Table<'_> = BlockTable::new(ZeroPagePolicy::SkipUntouched);
    for (i, (name, size)) in declared.iter().enumerate() {
        let spec = BlockSpec { name, used_len: *size, page_size: geometry, memory_zeroed: true };
        table.add(&spec, &memories[i], &bitmaps[i]).map_err(|e| Failure::BlockList {
            place: Place::Block(String::from_utf8_lossy(name).into_owned()),
            reason: e.to_string(),
        })?;
    }
    for (i, (name, size)) in declared.iter().enumerate() {
        let file = opts.out.join(block_file_name(name));
        report.blocks.push(BlockReport {
            name: String::from_utf8_lossy(name).into_owned(),
            file,
            size: *size,
            pages: size / u64::from(opts.page_size),
            received_pages: 0,
        });
        let _ = i;
    }

    let cfg = PacketConfig::new(geometry);
    let mut coord: Coordinator<WorkerToken, Failure, MAX_CHANNELS> =
        Coordinator::new(n).map_err(|e| Failure::BlockList { place: Place::Listener, reason: e.to_string() })?;
    let barrier = EpochBarrier::new(n);
    let finished = AtomicUsize::new(0);
    let stats: Mutex<Vec<ChannelStats>> = Mutex::new(vec![ChannelStats::default(); usize::from(n)]);
    let done = AtomicBool::new(false);
    let parked: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
    let mut main = MainRecv::new(SyncMode::Auto);

    let worker = |c: ChannelId, waker: &StdWaker<'_>| {
        let mut ch = RecvChannel::new(c, cfg);
        let res = run_channel(
            &mut ch,
            &chans[c.index()],
            &table,
            &coord,
            waker,
            &barrier,
            (&total_bytes, limits.io_timeout),
            &parked[c.index()],
        );
        if let Err(e) = res {
            coord.record_error(waker, e);
        }
        // After the error: a main stream waiting at a marker then sees "terminating", not this end.
        barrier.channel_ended();
        lock(&stats)[c.index()] = ch.stats();
        // Release: the main thread's Acquire count sees this worker's writes.
        finished.fetch_add(1, Ordering::Release);
    };
    let hook: Box<dyn Fn(ChannelId) + Send + Sync + '_> = Box::new(|c: ChannelId| {
        let _ = chans[c.index()].shutdown(Shutdown::Both);
        let _ = main_stream.shutdown(Shutdown::Both);
    });

    let outcome = std::thread::scope(|s| {
        if opts.progress {
            let (table, total_bytes, done, barrier) = (&table, &total_bytes, &done, &barrier);
            std::thread::Builder::new()
                .name("recv-progress".into())
                .spawn_scoped(s, move || progress(table, total_bytes, done, barrier, start))
                .ok();
        }
        let r = run_scoped(Role::Recv, worker, Some(hook), |p| {
            let created = coord.create_all(p, |_| Ok(()));
            let started = created.map(|r| usize::from(r.started)).unwrap_or(0);
            let main_result = run_main(&mut reader, &mut main, &table, &coord, p, &barrier);
            match main_result {
                Err(e) => {
                    coord.record_error(p, e);
                }
                Ok(()) => {
                    // Wait for every channel to end by itself (QEMU closes them all on completion).
                    let waited = coord.wait_until(p, ChannelId(0), || {
                        // Acquire: pairs with the workers' Release increments.
                        finished.load(Ordering::Acquire) >= started || barrier.channel_waiting()
                    });
                    if waited.is_ok() && finished.load(Ordering::Acquire) < started {
                        // Relaxed: a snapshot for the message; the barrier decided the failure.
                        let c = parked.iter().position(|f| f.load(Ordering::Relaxed)).unwrap_or(0);
                        let markers = main.stats().markers;
                        coord.record_error(p, Failure::SyncWithoutMarker { channel: ChannelId(c as u8), markers });
                    }
                }
            }
            match coord.cleanup(p) {
                Ok(token) => {
                    let panicked = token.report().panicked;
                    Some((
                        panicked,
                        finish(&table, &memories, &token, report, opts, &coord, &barrier, &main, &stats, panicked),
                    ))
                }
                Err(_) => None,
            }
        });
        // Relaxed: a stop flag for the progress line; the scope join orders the rest.
        done.store(true, Ordering::Relaxed);
        r
    });
    report.bytes = total_bytes.load(Ordering::Relaxed);
    if let Some(e) = coord.take_error() {
        return Err(e);
    }
    match outcome {
        Some((_, r)) => r,
        None => Err(Failure::BlockList { place: Place::Main, reason: "cleanup ran twice".into() }),
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    table: &Table<'_>,
    memories: &[AnonMemory],
    token: &multifd_core::lifecycle::AllJoined<'_>,
    report: &mut Report,
    opts: &Options,
    coord: &Coordinator<WorkerToken, Failure, MAX_CHANNELS>,
    barrier: &EpochBarrier,
    main: &MainRecv,
    stats: &Mutex<Vec<ChannelStats>>,
    panicked: u8,
) -> Result<(), Failure> {
    let stats = lock(stats).clone();
    for (i, (_, b)) in table.iter().enumerate() {
        report.blocks[i].received_pages = b.bitmap().count() as u64;
    }
    report.channels = stats.iter().enumerate().map(|(i, s)| (i as u8, *s)).collect();
    report.packets = stats.iter().map(|s| s.packets).sum();
    report.normal_pages = stats.iter().map(|s| s.normal_pages).sum::<u64>() + main.stats().pages;
    report.zero_pages = stats.iter().map(|s| s.zero_pages).sum::<u64>() + main.stats().zero_pages;
    report.sync_epochs = barrier.released();
    if coord.error().is_some() {
        // The recorded error is returned by the caller, after the workers' borrows have ended.
        return Ok(());
    }
    if panicked > 0 {
        return Err(Failure::WorkerPanicked { count: panicked });
    }
    if !main.saw_eof() {
        return Err(Failure::MainNoEof);
    }
    let markers = main.stats().markers;
    for (i, s) in stats.iter().enumerate() {
        if s.syncs != markers {
            return Err(RecvError::Epoch(multifd_core::recv::EpochError::Unpaired {
                channel: ChannelId(i as u8),
                syncs: s.syncs,
                markers,
            })
            .into());
        }
    }
    for b in &report.blocks {
        if b.received_pages != b.pages {
            return Err(Failure::Incomplete {
                place: Place::Block(b.name.clone()),
                received: b.received_pages as usize,
                pages: b.pages as usize,
            });
        }
    }
    // The moment everything is in memory (before the files are written), for benchmarks.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (user, sys) = cpu_seconds();
    eprintln!(
        "multifd recv: all pages received at unix time {:.6} (cpu user {user:.3} s, sys {sys:.3} s)",
        now.as_secs_f64()
    );
    // Complete: write every block under a temporary name, then rename them all.
    let mut written = Vec::new();
    let result = (|| {
        for (i, b) in report.blocks.iter().enumerate() {
            let tmp = opts.out.join(format!(".{}.part-{}", block_file_name(b.name.as_bytes()), std::process::id()));
            written.push(tmp.clone());
            let bytes = &memories[i].bytes(token)[..b.size as usize];
            let mut f = fs::File::create(&tmp).map_err(|error| Failure::Io {
                place: Place::Output(tmp.clone()),
                doing: "creating",
                error,
            })?;
            f.write_all(bytes).map_err(|error| Failure::Io {
                place: Place::Output(tmp.clone()),
                doing: "writing",
                error,
            })?;
        }
        for (i, b) in report.blocks.iter().enumerate() {
            fs::rename(&written[i], &b.file).map_err(|error| Failure::Io {
                place: Place::Output(b.file.clone()),
                doing: "renaming",
                error,
            })?;
        }
        Ok(())
    })();
    if result.is_err() {
        for w in &written {
            let _ = fs::remove_file(w);
        }
    }
    result
}

fn run_main<P: multifd_core::lifecycle::Wake>(
    reader: &mut MainReader<'_>,
    main: &mut MainRecv,
    table: &Table<'_>,
    coord: &Coordinator<WorkerToken, Failure, MAX_CHANNELS>,
    waker: &P,
    barrier: &EpochBarrier,
) -> Result<(), Failure> {
    // The callback never stops the pump: it returns at the stream's clean end, or with an error.
    reader.pump(|ev| {
        match main.on_event(ev, table)? {
            MainAction::Continue | MainAction::Eof => {}
            MainAction::Marker => {
                barrier.main_marker(coord, waker, ChannelId(0)).map_err(RecvError::Epoch)?;
            }
        }
        Ok(Flow::Continue)
    })?;
    if !main.saw_eof() {
        return Err(Failure::MainNoEof);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_channel(
    ch: &mut RecvChannel,
    stream: &TcpStream,
    table: &Table<'_>,
    coord: &Coordinator<WorkerToken, Failure, MAX_CHANNELS>,
    waker: &StdWaker<'_>,
    barrier: &EpochBarrier,
    (total, io_timeout): (&AtomicU64, Option<Duration>),
    parked: &AtomicBool,
) -> Result<(), Failure> {
    let id = ch.id();
    let fd = stream.as_raw_fd();
    let io_err = |error| io_failure(Place::Channel(id), "reading", error, io_timeout);
    let stall = Stall { total, limit: io_timeout };
    let mut scratch = [0u8; 16 * 1024];
    let mut ranges = [PageRange::EMPTY; MAX_IOV];
    // Whether the current packet's data pages were populated before the first read into them.
    let mut prefaulted = false;
    loop {
        let n = match ch.want() {
            Want::Header(buf) => {
                prefaulted = false;
                read_retry(stream, buf, stall).map_err(io_err)?
            }
            Want::Page { block, offset, len, .. } => {
                let Some(b) = table.get(block) else { return Ok(()) };
                // SAFETY: `offset..offset + len` lies inside the block (the core checked the page
                // against the used length); the pointer is only handed to `read(2)`.
                if unsafe { b.memory().raw_range(offset, len) }.is_none() {
                    let k = len.min(scratch.len());
                    let got = read_retry(stream, &mut scratch[..k], stall).map_err(io_err)?;
                    b.memory().write(offset, &scratch[..got]);
                    got
                } else {
                    // The rest of the packet's pages in one vectored read, straight into guest memory.
                    let count = ch.pending_pages(table, &mut ranges);
                    if !prefaulted {
                        prefaulted = true;
                        prefault_runs(table, &ranges[..count]);
                    }
                    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV];
                    let mut used = 0;
                    for r in &ranges[..count] {
                        let Some(rb) = table.get(r.block) else { break };
                        // SAFETY: as above: each range is a validated page of its block.
                        let Some(ptr) = (unsafe { rb.memory().raw_range(r.offset, r.len) }) else { break };
                        iov[used] = libc::iovec { iov_base: ptr.as_ptr().cast(), iov_len: r.len };
                        used += 1;
                    }
                    let n = readv_raw(fd, &iov[..used], stall).map_err(io_err)?;
                    if n == 0 {
                        0
                    } else {
                        // Relaxed: a progress counter.
                        total.fetch_add(n as u64, Ordering::Relaxed);
                        ch.advance_many(n, table)?;
                        continue;
                    }
                }
            }
            Want::Discard(len) => {
                let k = len.min(scratch.len());
                read_retry(stream, &mut scratch[..k], stall).map_err(io_err)?
            }
            Want::Sync => {
                let epoch = ch.stats().syncs;
                // Relaxed: only names the channel in an error message.
                parked.store(true, Ordering::Relaxed);
                barrier.channel_sync(coord, waker, id, epoch).map_err(RecvError::Epoch)?;
                // Relaxed: as above.
                parked.store(false, Ordering::Relaxed);
                ch.synced();
                continue;
            }
        };
        if n == 0 {
            if coord.is_quitting() {
                return Ok(());
            }
            return ch.finish().map_err(|e| match e {
                RecvError::Truncated { .. } => Failure::ClosedInside(e),
                e => Failure::from(e),
            });
        }
        // Relaxed: a progress counter.
        total.fetch_add(n as u64, Ordering::Relaxed);
        ch.advance(n, table)?;
    }
}

/// Populates fresh destination memory for `ranges` (one packet's data pages), one call per run of
/// adjacent pages: see [`AnonMemory::prefault`].
fn prefault_runs(table: &Table<'_>, ranges: &[PageRange]) {
    let mut run: Option<PageRange> = None;
    for r in ranges.iter().copied().chain(core::iter::once(PageRange::EMPTY)) {
        match &mut run {
            Some(cur) if cur.block == r.block && cur.offset + cur.len == r.offset && r.len > 0 => cur.len += r.len,
            _ => {
                if let Some(cur) = run.take()
                    && let Some(b) = table.get(cur.block)
                {
                    b.memory().prefault(cur.offset, cur.len);
                }
                run = (r.len > 0).then_some(r);
            }
        }
    }
}

fn progress(table: &Table<'_>, bytes: &AtomicU64, done: &AtomicBool, barrier: &EpochBarrier, start: Instant) {
    let tty = io::stderr().is_terminal();
    let period = if tty { Duration::from_millis(200) } else { Duration::from_secs(1) };
    let mut next = Instant::now() + period;
    // Relaxed: a stop flag; nothing is published through it.
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() < next {
            continue;
        }
        next += period;
        let (got, all) = table.iter().fold((0usize, 0usize), |(g, a), (_, b)| (g + b.bitmap().count(), a + b.pages()));
        // Relaxed: a statistic.
        let mib = bytes.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0);
        let pct = if all == 0 { 0.0 } else { 100.0 * got as f64 / all as f64 };
        let t = start.elapsed().as_secs_f64();
        if tty {
            let filled = (pct / 100.0 * 30.0) as usize;
            eprint!(
                "\r[{}{}] {pct:5.1}% {got}/{all} pages, {mib:.1} MiB, {} epochs, {t:.1} s",
                "#".repeat(filled),
                " ".repeat(30 - filled.min(30)),
                barrier.released()
            );
        } else {
            eprintln!(
                "multifd recv: {got}/{all} pages ({pct:.1}%), {mib:.1} MiB, {} epochs, {t:.1} s",
                barrier.released()
            );
        }
    }
    if tty {
        eprintln!();
    }
}

/// Whether the peer of `stream` has closed its sending side (TCP state CLOSE_WAIT or later), from
/// `TCP_INFO`; false when the state cannot be read.
fn peer_closed(stream: &TcpStream) -> bool {
    // `tcpi_state` is the first byte of `struct tcp_info`; the rest is not needed.
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes; the kernel writes at most `len` bytes and
    // stores the length used in `len`.
    let rc = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    // Linux TCP states: 8 CLOSE_WAIT, 9 LAST_ACK, 7 CLOSE (after a reset).
    rc == 0 && len >= 1 && matches!(info[0], 7..=9)
}

/// CPU seconds (user, system) this process has used so far, every thread included.
fn cpu_seconds() -> (f64, f64) {
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `multifd recv` from the command line: runs, prints the summary (and JSON), returns the exit code.
pub fn cli(opts: &Options, json: bool) -> std::process::ExitCode {
    cli_with(opts, &Limits::default(), json)
}

/// As [`cli`], with `limits`.
pub fn cli_with(opts: &Options, limits: &Limits, json: bool) -> std::process::ExitCode {
    let report = run_with(opts, limits);
    if json {
        println!("{}", report.to_json());
    }
    match &report.error {
        None => {
            let pages: u64 = report.blocks.iter().map(|b| b.pages).sum();
            eprintln!(
                "multifd recv: completed: {} blocks, {pages} pages, {} bytes in {:.3} s, {} epochs",
                report.blocks.len(),
                report.bytes,
                report.seconds,
                report.sync_epochs
            );
            std::process::ExitCode::SUCCESS
        }
        Some(e) => {
            eprintln!("multifd recv: failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `multifd recv` from parsed command-line arguments (strings not yet validated).
#[allow(clippy::too_many_arguments)]
pub fn cli_args(
    listen: String,
    channels: u8,
    out: PathBuf,
    uuid: Option<String>,
    page_size: u32,
    json: bool,
    port_file: Option<PathBuf>,
    prealloc: Vec<String>,
    limits: Limits,
) -> std::process::ExitCode {
    let parsed = (|| -> Result<Options, String> {
        let uuid = uuid.as_deref().map(parse_uuid).transpose()?;
        let prealloc = prealloc.iter().map(|p| parse_prealloc(p)).collect::<Result<Vec<_>, _>>()?;
        Ok(Options { listen, channels, out, uuid, page_size, port_file, prealloc, progress: true })
    })();
    match parsed {
        Ok(opts) => cli_with(&opts, &limits, json),
        Err(e) => {
            eprintln!("multifd recv: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
