//! `multifd recv`: accept a live migration from a QEMU source (or any compatible sender) on TCP and
//! write each RAM block to a file.
//!
//! This module is OS glue around the core's receive session ([`RecvSession`], [`MainStream`]),
//! which decides everything about the protocol: which connection is which, whether an init packet
//! or a block list is acceptable, when epochs are released, and whether the migration completed.
//! Here: listening and accepting (with the accept timeout), sockets with the stall timeout, mapping
//! destination memory, one `multifd-recv-N` thread per channel that `readv`s straight into guest
//! pages, the main stream on the calling thread, and the block files, written only when the
//! session's completion checks passed (under a temporary name, then renamed).

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multifd_core::bitmap::{AtomicWord, words_for};
use multifd_core::block::{BlockSpec, BlockTable, GuestMemory, ZeroPagePolicy};
use multifd_core::codec::Accept;
use multifd_core::lifecycle::{ChannelId, MAX_CHANNELS};
use multifd_core::recv::{BlockListError, MainState, MainStream, RecvError, RecvSession, SessionConfig};
use multifd_core::wire::{Geometry, PacketConfig};

use crate::mem::{AnonMemory, Populate};
use crate::platform::{Role, StdWaker, WorkerToken, run_scoped};
use crate::util::{Stall, cpu_seconds, read_retry, timed_out, unix_now};

pub use crate::util::physical_ram;

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

/// Time and size limits of `multifd recv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// How long, counted from the first accepted connection, the main stream and every channel may
    /// take to connect and identify themselves. `None`: no limit. Before the first connection the
    /// receiver waits without limit (the source may start its migration at any time).
    pub accept_timeout: Option<Duration>,
    /// How long a read may wait while no byte arrives on any connection; then the migration fails
    /// as stalled, naming the connection whose read gave up. `None`: no limit.
    pub io_timeout: Option<Duration>,
    /// Most bytes of RAM the source's block list may declare, in total (the session refuses a list
    /// past it before anything is mapped).
    pub max_ram: u64,
    /// Compression methods accepted (each packet says its own; the others are refused).
    pub compression: Accept,
    /// Largest zstd window accepted, in bytes: what one channel's decoder may keep of the sender's
    /// history ([`crate::codec::ZSTD_WINDOW_RANGE`]; the sender's level chooses the window).
    pub zstd_window: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            accept_timeout: Some(DEFAULT_ACCEPT_TIMEOUT),
            io_timeout: Some(DEFAULT_IO_TIMEOUT),
            max_ram: physical_ram(),
            compression: Accept::ALL,
            zstd_window: crate::codec::ZSTD_WINDOW_DEFAULT,
        }
    }
}

mod accept;
mod control;
mod error;
mod files;
mod report;
mod worker;

pub use accept::MAX_PENDING;
pub use control::Control;
pub use error::{Failure, Place, PreallocError};
pub use report::{BlockReport, ChannelReport, Failed, Outcome, Report, Summary, completed_line, summary};

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

/// Runs `multifd recv` with the default [`Limits`]. Every thread it started has ended when it returns.
pub fn run(opts: &Options) -> Outcome {
    run_with(opts, &Limits::default())
}

/// Runs `multifd recv` with `limits`; as [`run`].
pub fn run_with(opts: &Options, limits: &Limits) -> Outcome {
    run_controlled(opts, limits, &Control::new())
}

/// Runs `multifd recv` with `limits`, stopped early by `control` (see [`Control`]); as [`run`].
pub fn run_controlled(opts: &Options, limits: &Limits, control: &Control) -> Outcome {
    let start = Instant::now();
    let mut report = Report::default();
    let result = receive(opts, limits, control, &mut report);
    report.seconds = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => Ok(report),
        Err(error) => Err(Box::new(Failed { error, report })),
    }
}

type Session = RecvSession<WorkerToken, Failure, MAX_CHANNELS>;
type Main = MainStream<MAX_BLOCKS>;
type Table<'a> = BlockTable<'a, AnonMemory, MAX_BLOCKS>;

/// The accepted connections: the main stream (a second handle, for shutting it down) and each
/// channel's socket, by id.
struct Conns {
    main: TcpStream,
    chans: Vec<TcpStream>,
}

use accept::{Hub, PortFile, listen};

fn receive(opts: &Options, limits: &Limits, control: &Control, report: &mut Report) -> Result<(), Failure> {
    let n = opts.channels;
    if n == 0 || usize::from(n) > MAX_CHANNELS {
        return Err(Failure::Option { option: "--channels", value: n.into() });
    }
    let page_option = Failure::Option { option: "--page-size", value: opts.page_size.into() };
    let Ok(geometry) = Geometry::new(opts.page_size) else {
        return Err(page_option);
    };
    if !crate::codec::ZSTD_WINDOW_RANGE.contains(&limits.zstd_window) {
        return Err(Failure::Option { option: "--zstd-max-window", value: limits.zstd_window });
    }
    let packet = PacketConfig { compression: limits.compression, ..PacketConfig::new(geometry) };
    let cfg = SessionConfig { uuid: opts.uuid, max_ram: limits.max_ram, ..SessionConfig::new(n, packet) };
    let mut session = Session::new(cfg).map_err(|_| Failure::Option { option: "--channels", value: n.into() })?;
    // Every output is checked before anything listens: a source must not migrate into a receiver
    // that cannot keep the result.
    files::prepare_out(&opts.out)?;
    let port_file = opts.port_file.as_deref().map(PortFile::create).transpose()?;
    let mut pre = preallocate(opts, &session)?;
    let listener = listen(opts, port_file, report)?;
    let hub = Hub::new(n);
    let total = AtomicU64::new(0);
    let result = std::thread::scope(|scope| {
        let acceptor = std::thread::Builder::new()
            .name("recv-accept".into())
            .spawn_scoped(scope, || hub.accept(&listener, &session, limits, control))
            .map_err(|error| Failure::Io { place: Place::Listener, doing: "starting the acceptor thread", error })?;
        let stall = Stall { total: &total, limit: limits.io_timeout };
        let env = Env { opts, limits, control, hub: &hub, session: &session, stall };
        let result = env.receive(geometry, &mut pre, report);
        hub.stop();
        let _ = acceptor.join();
        result
    });
    report.bytes = total.load(Ordering::Relaxed);
    // Relaxed above: read after every thread was joined.
    // The first cause wins: what the acceptor saw (a wrong connection, the accept timeout, a signal)
    // made the other threads stop, so their errors are consequences.
    if let Some(f) = hub.take_failure() {
        return Err(f);
    }
    match session.lifecycle_mut().take_error() {
        Some(e) => Err(e),
        None => result,
    }
}

/// What the receive thread works with.
struct Env<'e> {
    opts: &'e Options,
    limits: &'e Limits,
    control: &'e Control,
    hub: &'e Hub,
    session: &'e Session,
    stall: Stall<'e>,
}

impl Env<'_> {
    /// The main stream from its first byte: its block list, destination memory, the block files,
    /// the stream up to its first marker while the channels connect, then the migration.
    fn receive(&self, geometry: Geometry, pre: &mut [Prealloc], report: &mut Report) -> Result<(), Failure> {
        let (opts, session) = (self.opts, self.session);
        let (socket, first) = self.hub.wait_main()?;
        let mut reader = MainReader::new(&socket, &first, self.stall);
        let mut main = Main::new(session);
        reader.block_list(session, &mut main)?;
        let memories = map_blocks(&main, pre, session)?;
        let bitmaps: Vec<Vec<AtomicWord>> = memories
            .iter()
            .map(|m| (0..words_for(m.len() / geometry.bytes())).map(|_| AtomicWord::new(0)).collect())
            .collect();
        let mut table: Table<'_> = BlockTable::new(ZeroPagePolicy::SkipUntouched);
        for (d, (mem, words)) in main.declared().zip(memories.iter().zip(&bitmaps)) {
            let spec = BlockSpec {
                name: d.name.as_bytes(),
                used_len: d.used_length,
                page_size: geometry,
                memory_zeroed: true,
            };
            let block = Name(d.name.as_bytes());
            let error = |error| Failure::Recv(RecvError::BlockList(BlockListError::BadBlock { block: d.name, error }));
            table.add(&spec, mem, words).map_err(error)?;
            report.blocks.push(BlockReport {
                name: block.text(),
                file: opts.out.join(block_file_name(d.name.as_bytes())),
                size: d.used_length,
                pages: d.used_length / u64::from(opts.page_size),
                received_pages: 0,
            });
        }
        let files = files::BlockFiles::create(&opts.out, &report.blocks)?;
        main.start(&table)?;
        reader.until_connected(session, &mut main, &table, self.hub)?;
        let setup = |error| Failure::Io { place: Place::Main, doing: "setting up the socket", error };
        let conns = self.hub.take_channels(socket.try_clone().map_err(setup)?)?;
        let run = Run {
            session,
            table: &table,
            conns: &conns,
            stall: self.stall,
            opts,
            limits: self.limits,
            hub: self.hub,
            control: self.control,
        };
        run.migrate(&mut main, &mut reader, &memories, files, report)
    }
}

/// A block's name from the wire, for messages.
struct Name<'a>(&'a [u8]);

impl Name<'_> {
    fn text(&self) -> String {
        String::from_utf8_lossy(self.0).into_owned()
    }
}

/// A `--prealloc` block: its name, size and memory (taken when the block is mapped).
type Prealloc = (Vec<u8>, u64, Option<AnonMemory>);

/// Preallocated blocks, mapped and touched before anything is accepted.
fn preallocate(opts: &Options, session: &Session) -> Result<Vec<Prealloc>, Failure> {
    let mut pre = Vec::new();
    for (name, size) in &opts.prealloc {
        let block = Name(name).text();
        let Ok(len) = usize::try_from(*size) else {
            return Err(Failure::Prealloc { block, error: PreallocError::TooLarge });
        };
        let mem = AnonMemory::new(len, Populate::Touch, session.lifecycle().id()).map_err(|error| Failure::Io {
            place: Place::Block(block),
            doing: "mapping the preallocated block",
            error,
        })?;
        pre.push((name.clone(), *size, Some(mem)));
    }
    Ok(pre)
}

/// Maps every declared block: a preallocated one if given (it must match), fresh memory otherwise.
fn map_blocks(main: &Main, pre: &mut [Prealloc], session: &Session) -> Result<Vec<AnonMemory>, Failure> {
    for (name, given, _) in pre.iter() {
        let block = Name(name).text();
        match main.declared().find(|d| d.name.as_bytes() == name.as_slice()) {
            Some(d) if d.used_length == *given => {}
            Some(d) => {
                let error = PreallocError::Size { given: *given, declared: d.used_length };
                return Err(Failure::Prealloc { block, error });
            }
            None => return Err(Failure::Prealloc { block, error: PreallocError::NotDeclared }),
        }
    }
    let mut memories = Vec::new();
    for d in main.declared() {
        let taken = pre.iter_mut().find(|p| p.0 == d.name.as_bytes()).and_then(|p| p.2.take());
        let mem = match taken {
            Some(m) => m,
            None => {
                // The session checked the total against --max-ram; a size must still fit usize.
                let len = usize::try_from(d.used_length)
                    .map_err(|_| Failure::Option { option: "--max-ram", value: d.used_length })?;
                let place = Place::Block(Name(d.name.as_bytes()).text());
                AnonMemory::new(len, Populate::Lazy, session.lifecycle().id()).map_err(|error| Failure::Io {
                    place,
                    doing: "mapping",
                    error,
                })?
            }
        };
        memories.push(mem);
    }
    Ok(memories)
}

/// The failure for an I/O error: a timed-out read is a stall, anything else an I/O error.
pub(super) fn io_failure(place: Place, doing: &'static str, error: io::Error, io_timeout: Option<Duration>) -> Failure {
    match io_timeout {
        Some(waited) if timed_out(&error) => Failure::Stalled { place, doing, waited },
        _ => Failure::Io { place, doing, error },
    }
}

/// The main stream: its socket and a read buffer.
struct MainReader<'s> {
    stream: &'s TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The connection's end was read (by [`MainReader::top_up`]).
    eof: bool,
    stall: Stall<'s>,
}

/// How long the main stream waits for the channels between two looks ahead in its input.
const LOOK_AHEAD_TICK: Duration = Duration::from_millis(20);

impl<'s> MainReader<'s> {
    /// A reader whose first input is `first`, the bytes read to identify the connection.
    fn new(stream: &'s TcpStream, first: &[u8], stall: Stall<'s>) -> Self {
        let mut buf = vec![0u8; 256 * 1024];
        buf[..first.len()].copy_from_slice(first);
        Self { stream, buf, start: 0, end: first.len(), eof: false, stall }
    }

    /// The unread input, reading more when it is used up; `None` at the connection's end.
    fn fill(&mut self) -> Result<Option<&[u8]>, Failure> {
        if self.start == self.end {
            if self.eof {
                return Ok(None);
            }
            let limit = self.stall.limit;
            let n = read_retry(self.stream, &mut self.buf, self.stall)
                .map_err(|error| io_failure(Place::Main, "reading", error, limit))?;
            if n == 0 {
                return Ok(None);
            }
            self.stall.moved(n);
            (self.start, self.end) = (0, n);
        }
        Ok(Some(&self.buf[self.start..self.end]))
    }

    /// Reads what has arrived into the free end of the buffer, waiting at most a tick for it.
    fn top_up(&mut self) -> Result<(), Failure> {
        if self.eof {
            std::thread::sleep(LOOK_AHEAD_TICK);
            return Ok(());
        }
        if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        let mut pfd = libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid `pollfd` for the main stream's open descriptor; the count says 1.
        let ready = unsafe { libc::poll(&mut pfd, 1, LOOK_AHEAD_TICK.as_millis() as i32) };
        if ready <= 0 || self.end == self.buf.len() {
            if self.end == self.buf.len() {
                std::thread::sleep(LOOK_AHEAD_TICK);
            }
            return Ok(());
        }
        let limit = self.stall.limit;
        let n = read_retry(self.stream, &mut self.buf[self.end..], self.stall)
            .map_err(|error| io_failure(Place::Main, "reading", error, limit))?;
        self.stall.moved(n);
        self.end += n;
        self.eof = n == 0;
        Ok(())
    }

    /// Reads up to the end of the block list.
    fn block_list(&mut self, session: &Session, main: &mut Main) -> Result<(), Failure> {
        loop {
            let Some(input) = self.fill()? else {
                main.end()?; // fails: the stream ended inside or before its block list
                return Err(Failure::Recv(RecvError::MainNotEnded));
            };
            let step = main.read_block_list(session, input)?;
            self.start += step.used;
            if step.complete {
                return Ok(());
            }
        }
    }

    /// Applies the main stream while the channels connect, up to its first marker (which needs
    /// them). Parked there, it looks ahead in what has arrived: a source that sends pages on the
    /// main stream, or asks for a return path, is refused before the accept timeout.
    fn until_connected(
        &mut self,
        session: &Session,
        main: &mut Main,
        table: &Table<'_>,
        hub: &Hub,
    ) -> Result<(), Failure> {
        let mut parked = false;
        loop {
            if hub.wait_all(if parked { LOOK_AHEAD_TICK } else { Duration::ZERO })? {
                return Ok(());
            }
            if parked {
                self.top_up()?;
                main.scan_ahead(&self.buf[self.start..self.end])?;
                if self.eof {
                    return Err(source_gone(hub));
                }
                continue;
            }
            let Some(input) = self.fill()? else {
                // Said where it is if the stream ended inside an item.
                main.end()?;
                return Err(source_gone(hub));
            };
            let step = main.feed(session, input, table)?;
            self.start += step.used;
            parked = step.state != MainState::Running;
        }
    }
}

/// The main stream closed before every channel was in: the source gave up (a source closes it only
/// once the migration is over, which needs every channel). The acceptor gets a moment to find the
/// connection that made it give up, whose error then wins (see `receive`).
fn source_gone(hub: &Hub) -> Failure {
    let _ = hub.wait_all(accept::GONE_GRACE);
    Failure::SourceGone { place: Place::Main, ignored: hub.ignored() }
}

/// Everything the receive's threads share.
struct Run<'r, 't> {
    session: &'r Session,
    table: &'r Table<'t>,
    conns: &'r Conns,
    stall: Stall<'r>,
    opts: &'r Options,
    limits: &'r Limits,
    hub: &'r Hub,
    control: &'r Control,
}

impl Run<'_, '_> {
    /// Runs the workers and the main stream, cleans up, and on completion writes the block files.
    fn migrate(
        &self,
        main: &mut Main,
        reader: &mut MainReader<'_>,
        mem: &[AnonMemory],
        files: files::BlockFiles,
        report: &mut Report,
    ) -> Result<(), Failure> {
        let s = self.session;
        let worker = |c: ChannelId, waker: &StdWaker<'_>| self.worker(c, waker);
        let hook: crate::platform::WakeHook<'_> = Box::new(|c: ChannelId| {
            let _ = self.conns.chans[c.index()].shutdown(Shutdown::Both);
            let _ = self.conns.main.shutdown(Shutdown::Both);
        });
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            if self.opts.progress {
                let _ = std::thread::Builder::new()
                    .name("recv-progress".into())
                    .spawn_scoped(scope, || self.progress(&done));
            }
            let result = run_scoped(Role::Recv, worker, Some(hook), |p| {
                let _ = s.lifecycle().create_all(p, |_| Ok(()));
                if let Err(e) = self.run_main(main, reader, p) {
                    s.lifecycle().record_error(p, e);
                }
                let token = s.lifecycle().cleanup(p).map_err(|_| Failure::Recv(RecvError::Terminated))?;
                self.report(main, report);
                let totals = s.finish(&token, main, self.table);
                if s.lifecycle().error().is_some() {
                    return Ok(()); // the recorded error is the caller's to return
                }
                totals?;
                // Complete: from here on no connection can change the outcome.
                self.hub.stop();
                if self.hub.failed() {
                    return Ok(()); // the acceptor's failure is the caller's to return
                }
                let (user, sys) = cpu_seconds();
                // The moment everything is in memory (before the files are written), for benchmarks.
                log::debug!("all pages received at unix time {:.6} (cpu user {user:.3} s, sys {sys:.3} s)", unix_now());
                files.write(mem, &token, &report.blocks, self.control)
            });
            // Relaxed: a stop flag for the progress line; the scope's join orders the rest.
            done.store(true, Ordering::Relaxed);
            result
        })
    }

    /// The main stream after its block list, on the calling thread.
    fn run_main(
        &self,
        main: &mut Main,
        reader: &mut MainReader<'_>,
        waker: &impl multifd_core::lifecycle::Wake,
    ) -> Result<(), Failure> {
        let s = self.session;
        main.wait_marker(s, waker, ChannelId(0))?; // parked at a marker while the channels connected
        while let Some(input) = reader.fill()? {
            let step = main.feed(s, input, self.table)?;
            reader.start += step.used;
            if step.state == MainState::AtMarker {
                main.wait_marker(s, waker, ChannelId(0))?;
            }
        }
        main.end()?;
        // QEMU closes every channel on completion: wait for each worker to see its end.
        main.wait_channels(s, waker, ChannelId(0))?;
        Ok(())
    }

    /// Fills the report's counters from the session (after the workers were joined).
    fn report(&self, main: &Main, report: &mut Report) {
        let s = self.session;
        let page = u64::from(self.opts.page_size);
        let t = s.totals(main);
        for (b, (_, block)) in report.blocks.iter_mut().zip(self.table.iter()) {
            b.received_pages = block.bitmap().count() as u64;
        }
        report.channels = s
            .lifecycle()
            .ids()
            .map(|id| {
                let c = s.channel_stats(id);
                let (packets, normal_pages, zero_pages, bytes) = (c.packets, c.normal_pages, c.zero_pages, c.bytes);
                let compression = c.method.map_or("none", |m| m.name());
                let (compressed_bytes, raw_bytes) = (c.compressed_bytes, c.compressed_pages * page);
                ChannelReport {
                    id: id.0,
                    packets,
                    normal_pages,
                    zero_pages,
                    bytes,
                    compression,
                    compressed_bytes,
                    raw_bytes,
                }
            })
            .collect();
        let mut methods = report.channels.iter().map(|c| c.compression).filter(|&m| m != "none");
        report.compression = match methods.next() {
            None => "none",
            Some(m) if methods.all(|o| o == m) => m,
            Some(_) => "mixed",
        };
        report.compressed_bytes = report.channels.iter().map(|c| c.compressed_bytes).sum();
        report.raw_bytes = report.channels.iter().map(|c| c.raw_bytes).sum();
        (report.packets, report.normal_pages, report.zero_pages) = (t.packets, t.normal_pages, t.zero_pages);
        report.sync_epochs = t.epochs;
    }
}
