//! A single-threaded model of a whole receiving migration, driving the core's receive session
//! ([`RecvSession`], [`MainStream`]) cooperatively, as the firmware does and as `multifd recv` does
//! with threads: every connection is identified by the session from its first bytes, the main
//! stream's block list is checked against the block table, epochs, ends and the completion checks
//! are the session's. The byte streams are handed in by the caller in arbitrary pieces and
//! interleavings instead of arriving on sockets.
//!
//! Shared by the `recv_engine`, `recv_session` and `recv_compressed` fuzz targets
//! (fuzz/fuzz_targets/) and the malformed-corpus test (tests/tests/malformed_corpus.rs), which
//! includes this file with `#[path]`.
//!
//! Compressed packets ([`Want::Compressed`]) go through the channel's
//! [`multifd_std::codec::ChannelDecoder`], the type `multifd recv`'s channel workers use: it makes
//! the real zlib or zstd stream and its buffers at the channel's first compressed packet, takes the
//! payload in whatever pieces arrive, and decompresses it once whole. A stream that ends inside a
//! payload is reported by the channel's end ([`multifd_core::recv::Cut::Compressed`]).
//! [`Setup::compression`] is the receiver's accepted set (`multifd recv --compression`).
//!
//! Guest memory is one arena of atomic bytes holding every block, with guard bytes before, between
//! and after the blocks (and after each block's used length). The harness itself checks the
//! invariants a hostile peer must never break, and panics (a fuzz crash, a test failure) if one is:
//! - a write through [`GuestMemory`] is inside the block's used length;
//! - every page the engine asks for is inside its block, page-aligned, at most one page long;
//! - after the run every guard byte still holds [`GUARD`];
//! - an error that names a channel names the channel it came from; `Overrun` (a harness bug) never
//!   happens; every error has a non-empty message;
//! - a compressed payload the engine asks for fits [`RecvChannel::max_compressed`] (else the
//!   decoder's cut buffer ends in `Overrun`), nothing of it is counted before its last byte, and
//!   once decompressed without error it counts exactly its payload's bytes;
//! - plain data is counted as it is read.
//!
//! Streams are connections in connection order; the session decides from their first bytes which
//! one is the main stream (usually stream 0) and which channel each other one is (its init packet).
#![allow(dead_code, unreachable_pub)]
// `RecvError` carries whole block names (see `multifd_core::block::BlockName`), so its results are large.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use multifd_core::bitmap::{AtomicWord, words_for};
use multifd_core::block::{BlockSpec, BlockTable, GuestMemory, ZeroPagePolicy};
use multifd_core::codec::Accept;
use multifd_core::lifecycle::{ChannelId, Platform, Wake, WorkerExit};
use multifd_core::recv::{
    ChannelStats, Identity, MainState, MainStream, PageRange, RecvChannel, RecvError, RecvSession, SessionConfig, Want,
};
use multifd_core::wire::packet::INIT_PACKET_LEN;
use multifd_core::wire::{Geometry, Layout, PacketConfig};
use multifd_std::codec::ChannelDecoder;

/// The value of every guard byte.
pub const GUARD: u8 = 0xA5;
/// Guard bytes before the first block, between blocks and after the last.
const GUARD_LEN: usize = 256;
/// Bytes mapped after each block's used length (also guard bytes: the engine must not use them).
const SLACK: usize = 128;
/// Most pages one vectored step lists.
const IOV: usize = 8;

/// What the receiver is configured with.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Multifd channels expected.
    pub channels: u8,
    /// Target page size.
    pub page_size: u32,
    /// The uuid the init packets must carry, if any.
    pub uuid: Option<[u8; 16]>,
    /// Packet header layout expected.
    pub layout: Layout,
    /// The blocks: (name, pages).
    pub blocks: Vec<(Vec<u8>, usize)>,
    /// Compression methods accepted (`multifd recv --compression`; its default is [`Accept::ALL`]).
    pub compression: Accept,
    /// Largest zstd window accepted (`multifd recv --zstd-max-window`; its default is
    /// [`multifd_std::codec::ZSTD_WINDOW_DEFAULT`]).
    pub zstd_window: u64,
}

/// One step of the peer: bytes arriving on a stream (one `read`'s worth), or its end.
#[derive(Debug, Clone, Copy)]
pub enum Op<'a> {
    /// `bytes` arrive on `stream`; `vectored` page data is taken as one vectored read over the
    /// ranges [`RecvChannel::pending_pages`] lists, as `multifd recv` does.
    Data {
        /// Stream index (0 main, 1..=N connections).
        stream: usize,
        /// The bytes.
        bytes: &'a [u8],
        /// Page data through `pending_pages`/`advance_many`.
        vectored: bool,
    },
    /// The stream ends (EOF) after what it already received.
    End {
        /// Stream index.
        stream: usize,
    },
}

/// Why the modelled migration failed: the first failure, as the session reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// A connection was refused before it was identified: its first bytes or its init packet, or it
    /// closed first.
    Connection {
        /// Stream index.
        stream: usize,
        /// Why.
        error: RecvError,
    },
    /// The session refused the migration (a channel, the main stream, an epoch, or a completion
    /// check).
    Session(RecvError),
}

impl From<RecvError> for Fail {
    fn from(e: RecvError) -> Self {
        Fail::Session(e)
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Connection { stream, error } => write!(f, "connection {stream}: {error}"),
            Fail::Session(e) => write!(f, "{e}"),
        }
    }
}

/// What a run ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `Ok` when the migration completed (every stream ended cleanly, epochs paired, every page in).
    pub result: Result<(), Fail>,
    /// Epochs released.
    pub epochs: u32,
    /// The blocks' bytes after the run.
    pub memory: Vec<Vec<u8>>,
}

/// One block's view of the arena: writes are checked against the used length.
struct View<'a> {
    arena: &'a [AtomicU8],
    base: usize,
    used: usize,
}

impl GuestMemory for View<'_> {
    fn len(&self) -> usize {
        self.used + SLACK
    }
    fn write(&self, offset: usize, data: &[u8]) {
        assert!(
            offset.checked_add(data.len()).is_some_and(|end| end <= self.used),
            "write of {} bytes at {offset} outside a block of {} bytes",
            data.len(),
            self.used
        );
        for (dst, &b) in self.arena[self.base + offset..].iter().zip(data) {
            // Relaxed: single-threaded harness.
            dst.store(b, Ordering::Relaxed);
        }
    }
    fn fill_zero(&self, offset: usize, len: usize) {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.used), "zero fill outside a block");
        for dst in &self.arena[self.base + offset..self.base + offset + len] {
            // Relaxed: single-threaded harness.
            dst.store(0, Ordering::Relaxed);
        }
    }
    fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset.checked_add(out.len()).is_some_and(|end| end <= self.used), "read outside a block");
        for (src, o) in self.arena[self.base + offset..].iter().zip(out) {
            // Relaxed: single-threaded harness.
            *o = src.load(Ordering::Relaxed);
        }
    }
}

/// The receive workers run inline, stepped by the model; this platform only gives them a lifecycle.
struct Inline;

impl Wake for Inline {
    fn wake(&self, _: ChannelId) {}
}

impl Platform for Inline {
    type Handle = ();
    type Error = Fail;
    fn start(&self, _: ChannelId) -> Result<(), Fail> {
        Ok(())
    }
    fn join(&self, _: ChannelId, _: ()) -> WorkerExit {
        WorkerExit::Returned
    }
}

type Session = RecvSession<(), Fail, 4>;
type Table<'a> = BlockTable<'a, View<'a>, 4>;

/// Runs the migration `ops` describe; after the last op every stream ends. Panics if an invariant
/// (see the module docs) is broken.
pub fn run(setup: &Setup, ops: &[Op<'_>]) -> Outcome {
    let geometry = Geometry::new(setup.page_size).expect("harness page size");
    let ps = setup.page_size as usize;
    let mut layout = Vec::new();
    let mut at = GUARD_LEN;
    for (_, pages) in &setup.blocks {
        layout.push(at);
        at += pages * ps + SLACK + GUARD_LEN;
    }
    // Built and read back as plain bytes: an atomic access per byte costs a compare of its ordering
    // per byte under coverage instrumentation, the slowest part of a fuzz run.
    let mut init = vec![GUARD; at];
    for (i, (_, pages)) in setup.blocks.iter().enumerate() {
        init[layout[i]..layout[i] + pages * ps].fill(0);
    }
    let arena: Vec<AtomicU8> = init.into_iter().map(AtomicU8::new).collect();
    let views: Vec<View<'_>> = setup
        .blocks
        .iter()
        .enumerate()
        .map(|(i, (_, p))| View { arena: &arena, base: layout[i], used: p * ps })
        .collect();
    let words: Vec<Vec<AtomicWord>> =
        setup.blocks.iter().map(|(_, p)| (0..words_for(*p)).map(|_| AtomicWord::new(0)).collect()).collect();
    let mut table: Table<'_> = BlockTable::new(ZeroPagePolicy::SkipUntouched);
    for (i, (name, pages)) in setup.blocks.iter().enumerate() {
        let spec = BlockSpec { name, used_len: (pages * ps) as u64, page_size: geometry, memory_zeroed: true };
        table.add(&spec, &views[i], &words[i]).expect("harness block table");
    }

    let packet = PacketConfig { layout: setup.layout, compression: setup.compression, ..PacketConfig::new(geometry) };
    let cfg = SessionConfig { uuid: setup.uuid, ..SessionConfig::new(setup.channels, packet) };
    let (result, epochs) = drive(cfg, &table, ops, setup.zstd_window);
    drop(views);
    // No byte outside the blocks' used lengths changed: check the gaps between the used ranges,
    // each with one slice comparison (for the same reason as above).
    let bytes: Vec<u8> = arena.into_iter().map(AtomicU8::into_inner).collect();
    let guard = vec![GUARD; bytes.len()];
    let used: Vec<(usize, usize)> =
        setup.blocks.iter().enumerate().map(|(k, (_, p))| (layout[k], layout[k] + p * ps)).collect();
    let mut gap_start = 0;
    for &(start, end) in used.iter().chain([&(bytes.len(), bytes.len())]) {
        let gap = &bytes[gap_start..start];
        if gap != &guard[..gap.len()] {
            let i = gap_start + gap.iter().position(|&v| v != GUARD).unwrap_or_default();
            panic!("guard byte {i} of the arena changed to {:#x}", bytes[i]);
        }
        gap_start = end;
    }
    let memory =
        setup.blocks.iter().enumerate().map(|(k, (_, p))| bytes[layout[k]..layout[k] + p * ps].to_vec()).collect();
    if let Err(e) = &result {
        assert!(!e.to_string().is_empty(), "an error without a message: {e:?}");
    }
    Outcome { result, epochs, memory }
}

/// Checks that an error raised while stepping channel `id` (or recorded when it ended) names that
/// channel, and that no `Overrun` (a harness bug) happens.
fn check_channel_error(e: &Fail, id: ChannelId) {
    match *e {
        Fail::Session(
            RecvError::Packet { channel, .. }
            | RecvError::Block { channel, .. }
            | RecvError::Truncated { channel, .. }
            | RecvError::Codec { channel, .. }
            | RecvError::MethodChanged { channel, .. }
            | RecvError::NoDecompressor { channel, .. },
        ) => {
            assert_eq!(channel, id, "error names another channel: {e}");
        }
        Fail::Session(RecvError::Overrun { .. }) => panic!("the harness advanced more than was wanted: {e}"),
        _ => {}
    }
}

/// Checks one read of page data: the ranges to read into (the first is the page `Want::Page` asked
/// for, `asked` at `page`) are inside their blocks, at most one page each, and end at a page's end.
fn check_pages(table: &Table<'_>, asked: PageRange, page: usize, ranges: &[PageRange], ps: usize) {
    assert_eq!(asked.offset / ps, page, "page request offset {} is not in page {page}", asked.offset);
    assert!(ranges.first() == Some(&asked), "pending_pages does not start with the wanted page: {ranges:?}");
    for r in ranges {
        let b = table.get(r.block).expect("the engine named a block of the table");
        assert!(r.len > 0 && r.len <= ps, "page request of {} bytes", r.len);
        assert!(r.offset + r.len <= b.used_len(), "page request {r:?} outside {} bytes", b.used_len());
        assert_eq!((r.offset + r.len) % ps, 0, "page request {r:?} does not end at its page's end");
    }
}

/// Checks a channel's counters after it read `n` bytes of plain data: counted as read.
fn check_counted(before: ChannelStats, after: ChannelStats, n: usize) {
    let (bytes, packed) = (after.bytes - before.bytes, after.compressed_bytes - before.compressed_bytes);
    assert_eq!((bytes, packed), (n as u64, 0), "plain bytes read and bytes counted");
}

/// Takes the front of `input` into `ch`'s compressed payload of `len` bytes through the channel's
/// decoder ([`ChannelDecoder::take`], as a worker's reads do) and checks the counters: nothing is
/// counted until the payload's last byte arrives, then the whole payload, decompressed.
fn take_checked(
    ch: &mut RecvChannel,
    dec: &mut ChannelDecoder,
    input: &[u8],
    len: usize,
    table: &Table,
) -> Result<usize, Fail> {
    let (before, have) = (ch.stats(), dec.have());
    let n = dec.take(ch, input, table)?;
    let after = ch.stats();
    // Completed: something arrived and the decoder holds nothing of a payload any more.
    let done = if n > 0 && dec.have() == 0 { have + n } else { 0 };
    assert!(done > 0 || dec.have() == have + n, "{n} more bytes of a {len}-byte payload, {have} before");
    assert!(done == 0 || done == len, "a {len}-byte payload decompressed after {done} bytes");
    let (bytes, packed) = (after.bytes - before.bytes, after.compressed_bytes - before.compressed_bytes);
    assert_eq!((bytes, packed), (done as u64, done as u64), "compressed payload bytes counted");
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// The receive driver: moves the connections' bytes into the session.

/// What the session found a connection to be.
enum Role {
    Unknown,
    /// The main stream; `true` once its block list is complete and matched the table.
    Main(bool),
    /// A channel, and its decoder (as `multifd recv`'s workers have one).
    Channel(Box<RecvChannel>, ChannelDecoder),
    Done,
}

/// A connection: what arrived and was not read yet, whether page data is read vectored, its end.
struct Conn {
    role: Role,
    bytes: VecDeque<u8>,
    vectored: bool,
    eof: bool,
}

struct Model<'t> {
    s: &'t Session,
    table: &'t Table<'t>,
    main: MainStream<4>,
    conns: Vec<Conn>,
    zstd_window: u64,
}

/// Runs `ops` through a session for `cfg` into `table`, then every stream ends; returns the first
/// failure (or what the completion checks say) and the epochs released.
fn drive(cfg: SessionConfig, table: &Table<'_>, ops: &[Op<'_>], zstd_window: u64) -> (Result<(), Fail>, u32) {
    let s = Session::new(cfg).expect("harness channel count");
    s.lifecycle().create_all(&Inline, |_| Ok(())).expect("harness lifecycle");
    let conns =
        (0..=cfg.channels).map(|_| Conn { role: Role::Unknown, bytes: VecDeque::new(), vectored: false, eof: false });
    let conns = conns.collect();
    let mut m = Model { s: &s, table, main: MainStream::new(&s), conns, zstd_window };
    for op in ops.iter().copied().chain((0..=usize::from(cfg.channels)).map(|stream| Op::End { stream })) {
        let (Op::Data { stream, .. } | Op::End { stream }) = op;
        let Some(c) = m.conns.get_mut(stream) else { continue };
        match op {
            Op::Data { bytes, vectored, .. } => (c.vectored, ()) = (vectored, c.bytes.extend(bytes)),
            Op::End { .. } => c.eof = true,
        }
        m.pump();
    }
    let joined = s.lifecycle().cleanup(&Inline).expect("harness cleanup");
    let finished = s.finish(&joined, &m.main, table).map(drop).map_err(Fail::Session);
    // After a recorded error `finish` only says the migration was terminated: report that error.
    (s.lifecycle().error().map_or(finished, |e| Err(*e)), s.epochs())
}

impl Model<'_> {
    /// Steps every connection until nothing moves (the main stream last in each round, so that it
    /// sees the round's SYNC arrivals); the first error is recorded in the session.
    fn pump(&mut self) {
        while self.s.lifecycle().error().is_none() {
            let main_at = self.conns.iter().position(|c| matches!(c.role, Role::Main(_)));
            let (epochs, order) = (self.s.epochs(), (0..self.conns.len()).filter(|&i| Some(i) != main_at));
            let stepped =
                order.chain(main_at).map(|i| self.step(i).map_err(|e| self.s.lifecycle().record_error(&Inline, e)));
            if !stepped.fold(false, |moved, step| step.unwrap_or(false) | moved) && self.s.epochs() == epochs {
                break;
            }
        }
    }

    /// Moves connection `i`'s bytes into the session; returns whether anything moved.
    fn step(&mut self, i: usize) -> Result<bool, Fail> {
        let (s, table, window, conn) = (self.s, self.table, self.zstd_window, &mut self.conns[i]);
        let (input, mut moved): (&[u8], _) = (conn.bytes.make_contiguous(), false);
        let used = match &mut conn.role {
            Role::Unknown => {
                let start = &input[..input.len().min(INIT_PACKET_LEN)];
                let refused = |error| Fail::Connection { stream: i, error };
                conn.role = match s.identify(start).map_err(refused)? {
                    Identity::NeedMore { .. } if !conn.eof => return Ok(false),
                    Identity::NeedMore { .. } => return Err(refused(s.closed_unidentified(start.len()))),
                    Identity::Main => Role::Main(false),
                    Identity::Channel(id) => Role::Channel(Box::new(s.channel(id)?), ChannelDecoder::new(window)),
                };
                moved = true;
                if matches!(conn.role, Role::Main(_)) { 0 } else { INIT_PACKET_LEN }
            }
            Role::Main(listed) => {
                let (used, at_marker) = if *listed {
                    let step = self.main.feed(s, input, table)?;
                    (step.used, step.state == MainState::AtMarker)
                } else {
                    let step = self.main.read_block_list(s, input)?;
                    *listed = step.complete && self.main.start(table).map(|()| true)?;
                    (step.used, false)
                };
                // Closed (and not waiting at a marker): report the end (again: it only checks), then
                // catch a channel parked at a SYNC no marker can release now.
                if input.is_empty() && conn.eof && !at_marker {
                    self.main.end()?;
                    self.main.poll_channels(s)?;
                }
                used
            }
            Role::Channel(ch, codec) => {
                let true = s.poll_sync(ch) else { return Ok(false) };
                if conn.eof && input.is_empty() {
                    s.channel_done(&Inline, ch, true);
                    s.lifecycle().error().inspect(|e| check_channel_error(e, ch.id()));
                    conn.role = Role::Done;
                    return Ok(true);
                }
                // One read: what the channel wants next, at most (page data into the ranges
                // `pending_pages` lists when vectored, a compressed payload into its decoder).
                let mut read = || -> Result<usize, Fail> {
                    let (before, mut ranges) = (ch.stats(), [PageRange::EMPTY; IOV]);
                    let n = match ch.want() {
                        Want::Header(buf) => buf.iter_mut().zip(input).map(|(d, b)| *d = *b).count(),
                        Want::Page { block, page, offset, len } => {
                            let count = ch.pending_pages(table, &mut ranges[..if conn.vectored { IOV } else { 1 }]);
                            let asked = PageRange { block, offset, len };
                            check_pages(table, asked, page.get(), &ranges[..count], ch.page_size());
                            ranges[..count].iter().fold(0, |at, r| {
                                let k = r.len.min(input.len() - at);
                                table.get(r.block).inspect(|b| b.memory().write(r.offset, &input[at..at + k]));
                                at + k
                            })
                        }
                        Want::Discard(len) => len.min(input.len()),
                        Want::Compressed { len, .. } => return take_checked(ch, codec, input, len, table),
                        Want::Sync => 0,
                    };
                    ch.advance_many(n, table)?;
                    check_counted(before, ch.stats(), n);
                    Ok(n)
                };
                read().inspect_err(|e| check_channel_error(e, ch.id()))?
            }
            Role::Done => 0,
        };
        conn.bytes.drain(..used);
        Ok(used > 0 || moved)
    }
}
