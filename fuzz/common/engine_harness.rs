//! A single-threaded model of a whole receiving migration, driving the core's receive engine the way
//! `multifd recv` does (init packet check, [`RecvChannel`] per channel, [`MainRecv`] and the
//! [`EpochBarrier`] through its non-blocking halves), but over byte streams handed in by the caller
//! in arbitrary pieces and interleavings instead of sockets.
//!
//! Shared by the `recv_engine` fuzz target (fuzz/fuzz_targets/recv_engine.rs) and the malformed-corpus
//! test (tests/tests/malformed_corpus.rs), which includes this file with `#[path]`.
//!
//! Guest memory is one arena of atomic bytes holding every block, with guard bytes before, between
//! and after the blocks (and after each block's used length). The harness itself checks the
//! invariants a hostile peer must never break, and panics (a fuzz crash, a test failure) if one is:
//! - a write through [`GuestMemory`] is inside the block's used length;
//! - every page the engine asks for is inside its block, page-aligned, at most one page long;
//! - after the run every guard byte still holds [`GUARD`];
//! - an error that names a channel names the channel it came from; `Overrun` (a harness bug) never
//!   happens.
//!
//! Stream 0 is the main stream; streams 1..=N are the multifd connections in connection order (the
//! channel id comes from each one's init packet, as in the real receiver).
#![allow(dead_code, unreachable_pub)]
// `RecvError` carries whole block names (see `multifd_core::block::BlockName`), so its results are large.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use multifd_core::bitmap::{AtomicWord, words_for};
use multifd_core::block::{BlockSpec, BlockTable, GuestMemory, ZeroPagePolicy};
use multifd_core::lifecycle::ChannelId;
use multifd_core::recv::{
    EpochBarrier, EpochError, MainAction, MainRecv, PageRange, RecvChannel, RecvError, SyncMode, Want,
};
use multifd_core::wire::packet::INIT_PACKET_LEN;
use multifd_core::wire::stream::{StreamConfig, StreamParser};
use multifd_core::wire::{
    ChannelKind, ChannelSet, DecodeError, Geometry, InitPacket, Layout, PacketConfig, identify_channel,
};

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

/// Why the modelled migration failed: the first failure, as `multifd recv` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// A connection's init packet (or first bytes) was refused.
    Handshake {
        /// Stream index.
        stream: usize,
        /// Why.
        error: DecodeError,
    },
    /// A multifd connection began with the main stream's magic.
    DuplicateMain {
        /// Stream index.
        stream: usize,
    },
    /// A connection ended before its init packet was complete.
    ClosedEarly {
        /// Stream index.
        stream: usize,
        /// Bytes it sent.
        have: usize,
    },
    /// The engine refused the input.
    Engine(RecvError),
    /// The main stream ended without EOF.
    MainNoEof,
    /// A channel stayed parked at a SYNC no marker released.
    SyncWithoutMarker {
        /// The channel.
        channel: ChannelId,
        /// Markers the main stream had.
        markers: u32,
    },
    /// Pages of a block were never received.
    Incomplete {
        /// Block index.
        block: usize,
        /// Pages received.
        received: usize,
        /// Pages in the block.
        pages: usize,
    },
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Handshake { stream, error } => write!(f, "connection {stream}: {error}"),
            Fail::DuplicateMain { stream } => write!(f, "connection {stream}: a second main stream"),
            Fail::ClosedEarly { stream, have } => write!(f, "connection {stream}: closed after {have} bytes"),
            Fail::Engine(e) => write!(f, "{e}"),
            Fail::MainNoEof => write!(f, "main stream: ended without EOF"),
            Fail::SyncWithoutMarker { channel, markers } => {
                write!(f, "{channel}: parked at a SYNC after {markers} markers")
            }
            Fail::Incomplete { block, received, pages } => {
                write!(f, "block {block}: {received} of {pages} pages received")
            }
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

enum ChanState {
    /// Collecting the init packet.
    Init {
        buf: [u8; INIT_PACKET_LEN],
        have: usize,
    },
    Running(Box<RecvChannel>),
    Done,
}

struct Conn<'d> {
    state: ChanState,
    queue: VecDeque<(&'d [u8], bool)>,
    eof: bool,
    /// Parked at this epoch (arrived, not yet released).
    parked: Option<u32>,
}

struct Main<'d> {
    parser: StreamParser,
    recv: MainRecv,
    queue: VecDeque<&'d [u8]>,
    eof: bool,
    done: bool,
    at_marker: bool,
}

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
    let arena: Vec<AtomicU8> = (0..at).map(|_| AtomicU8::new(GUARD)).collect();
    for (i, (_, pages)) in setup.blocks.iter().enumerate() {
        for b in &arena[layout[i]..layout[i] + pages * ps] {
            // Relaxed: single-threaded harness.
            b.store(0, Ordering::Relaxed);
        }
    }
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

    let mut m = Model {
        setup,
        cfg: PacketConfig { layout: setup.layout, ..PacketConfig::new(geometry) },
        table: &table,
        barrier: EpochBarrier::new(setup.channels),
        seen: ChannelSet::new(),
        main: Main {
            parser: StreamParser::new(StreamConfig::new(geometry)),
            recv: MainRecv::new(SyncMode::Auto),
            queue: VecDeque::new(),
            eof: false,
            done: false,
            at_marker: false,
        },
        conns: (0..setup.channels)
            .map(|_| Conn {
                state: ChanState::Init { buf: [0; INIT_PACKET_LEN], have: 0 },
                queue: VecDeque::new(),
                eof: false,
                parked: None,
            })
            .collect(),
    };
    let mut result = Ok(());
    for op in ops {
        match *op {
            Op::Data { stream: 0, bytes, .. } => m.main.queue.push_back(bytes),
            Op::Data { stream, bytes, vectored } => {
                if let Some(c) = m.conns.get_mut(stream - 1) {
                    c.queue.push_back((bytes, vectored));
                }
            }
            Op::End { stream: 0 } => m.main.eof = true,
            Op::End { stream } => {
                if let Some(c) = m.conns.get_mut(stream - 1) {
                    c.eof = true;
                }
            }
        }
        result = m.pump();
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        m.main.eof = true;
        for c in &mut m.conns {
            c.eof = true;
        }
        result = m.pump().and_then(|()| m.finish());
    }
    let epochs = m.barrier.released();
    drop(m);
    // No byte outside the blocks' used lengths changed: check the gaps between the used ranges.
    let used: Vec<(usize, usize)> =
        setup.blocks.iter().enumerate().map(|(k, (_, p))| (layout[k], layout[k] + p * ps)).collect();
    let mut gap_start = 0;
    for &(start, end) in used.iter().chain([&(arena.len(), arena.len())]) {
        for (i, b) in arena.iter().enumerate().take(start).skip(gap_start) {
            // Relaxed: single-threaded harness.
            let v = b.load(Ordering::Relaxed);
            assert!(v == GUARD, "guard byte {i} of the arena changed to {v:#x}");
        }
        gap_start = end;
    }
    let memory = setup
        .blocks
        .iter()
        .enumerate()
        .map(|(k, (_, p))| arena[layout[k]..layout[k] + p * ps].iter().map(|b| b.load(Ordering::Relaxed)).collect())
        .collect();
    Outcome { result, epochs, memory }
}

struct Model<'s, 'd, 't> {
    setup: &'s Setup,
    cfg: PacketConfig,
    table: &'t Table<'t>,
    barrier: EpochBarrier,
    seen: ChannelSet,
    main: Main<'d>,
    conns: Vec<Conn<'d>>,
}

/// Checks that an engine error raised while feeding channel `id` names that channel.
fn check_channel_error(e: &RecvError, id: ChannelId) {
    match *e {
        RecvError::Packet { channel, .. } | RecvError::Block { channel, .. } | RecvError::Truncated { channel, .. } => {
            assert_eq!(channel, id, "error names another channel: {e}");
        }
        RecvError::Overrun { .. } => panic!("the harness advanced more than was wanted: {e}"),
        _ => {}
    }
    assert!(!e.to_string().is_empty());
}

impl Model<'_, '_, '_> {
    /// Runs every stream as far as its queued bytes and the barrier allow.
    fn pump(&mut self) -> Result<(), Fail> {
        loop {
            let mut progress = self.pump_main()?;
            for i in 0..self.conns.len() {
                progress |= self.pump_conn(i)?;
            }
            if !progress {
                return Ok(());
            }
        }
    }

    fn pump_main(&mut self) -> Result<bool, Fail> {
        let mut progress = false;
        let main = &mut self.main;
        while !main.done {
            if main.at_marker {
                match self.barrier.try_release() {
                    Ok(Some(_)) => main.at_marker = false,
                    Ok(None) => return Ok(progress),
                    Err(e) => return Err(Fail::Engine(RecvError::Epoch(e))),
                }
                progress = true;
                continue;
            }
            let Some(front) = main.queue.front_mut() else {
                if main.eof {
                    main.done = true;
                    progress = true;
                    main.parser.finish().map_err(|error| {
                        Fail::Engine(RecvError::MainStream { position: main.parser.position(), error })
                    })?;
                }
                return Ok(progress);
            };
            if front.is_empty() {
                main.queue.pop_front();
                continue;
            }
            let data = *front;
            let item = main.parser.item_position();
            let (used, ev) = main
                .parser
                .feed(data)
                .map_err(|error| Fail::Engine(RecvError::MainStream { position: item, error }))?;
            assert!(used > 0 && used <= data.len(), "the main-stream parser made no progress");
            *front = &data[used..];
            progress = true;
            if let Some(ev) = ev {
                match main.recv.on_event(&ev, self.table).map_err(Fail::Engine)? {
                    MainAction::Marker => main.at_marker = true,
                    MainAction::Continue | MainAction::Eof => {}
                }
            }
        }
        Ok(progress)
    }

    fn pump_conn(&mut self, i: usize) -> Result<bool, Fail> {
        let stream = i + 1;
        let mut progress = false;
        loop {
            let conn = &mut self.conns[i];
            while conn.queue.front().is_some_and(|f| f.0.is_empty()) {
                conn.queue.pop_front();
            }
            match &mut conn.state {
                ChanState::Done => return Ok(progress),
                ChanState::Init { buf, have } => {
                    let Some((front, _)) = conn.queue.front_mut() else {
                        if conn.eof {
                            return Err(Fail::ClosedEarly { stream, have: *have });
                        }
                        return Ok(progress);
                    };
                    let n = front.len().min(INIT_PACKET_LEN - *have);
                    buf[*have..*have + n].copy_from_slice(&front[..n]);
                    *front = &front[n..];
                    if front.is_empty() {
                        conn.queue.pop_front();
                    }
                    let before = *have;
                    *have += n;
                    progress |= n > 0;
                    if before < 4 && *have >= 4 {
                        let first = [buf[0], buf[1], buf[2], buf[3]];
                        match identify_channel(first).map_err(|error| Fail::Handshake { stream, error })? {
                            ChannelKind::Main => return Err(Fail::DuplicateMain { stream }),
                            ChannelKind::Multifd => {}
                        }
                    }
                    if *have == INIT_PACKET_LEN {
                        let p = InitPacket::decode(&buf[..]).map_err(|error| Fail::Handshake { stream, error })?;
                        p.validate(self.setup.channels, self.setup.uuid)
                            .map_err(|error| Fail::Handshake { stream, error })?;
                        self.seen.insert(p.id).map_err(|error| Fail::Handshake { stream, error })?;
                        conn.state = ChanState::Running(Box::new(RecvChannel::new(ChannelId(p.id), self.cfg)));
                    }
                }
                ChanState::Running(ch) => {
                    let id = ch.id();
                    if let Some(epoch) = conn.parked {
                        if !self.barrier.is_released(epoch) {
                            return Ok(progress);
                        }
                        ch.synced();
                        conn.parked = None;
                        progress = true;
                        continue;
                    }
                    if matches!(ch.want(), Want::Sync) {
                        self.barrier.arrive();
                        conn.parked = Some(ch.stats().syncs);
                        progress = true;
                        continue;
                    }
                    let Some((front, vectored)) = conn.queue.front_mut() else {
                        if conn.eof {
                            let end = ch.finish();
                            conn.state = ChanState::Done;
                            self.barrier.channel_ended();
                            if let Err(e) = end {
                                check_channel_error(&e, id);
                                return Err(Fail::Engine(e));
                            }
                            return Ok(true);
                        }
                        return Ok(progress);
                    };
                    let before = ch.stats().bytes;
                    let used = feed(ch, front, *vectored, self.table, self.setup.page_size as usize);
                    if let Err(e) = &used {
                        check_channel_error(e, id);
                    }
                    let used = used.map_err(Fail::Engine)?;
                    assert_eq!(ch.stats().bytes - before, used as u64, "bytes consumed and counted differ");
                    *front = &front[used..];
                    if front.is_empty() {
                        conn.queue.pop_front();
                    }
                    progress |= used > 0;
                }
            }
        }
    }

    /// The end checks of `multifd recv` once every stream has ended without an error.
    fn finish(&mut self) -> Result<(), Fail> {
        let markers = self.main.recv.stats().markers;
        for c in &self.conns {
            if let (ChanState::Running(ch), Some(_)) = (&c.state, c.parked) {
                return Err(Fail::SyncWithoutMarker { channel: ch.id(), markers });
            }
        }
        if !self.main.recv.saw_eof() {
            return Err(Fail::MainNoEof);
        }
        for c in &self.conns {
            if let ChanState::Running(ch) = &c.state
                && ch.stats().syncs != markers
            {
                let e = EpochError::Unpaired { channel: ch.id(), syncs: ch.stats().syncs, markers };
                return Err(Fail::Engine(RecvError::Epoch(e)));
            }
        }
        for (k, (_, b)) in self.table.iter().enumerate() {
            if b.bitmap().count() != b.pages() {
                return Err(Fail::Incomplete { block: k, received: b.bitmap().count(), pages: b.pages() });
            }
        }
        Ok(())
    }
}

/// Feeds the front of `input` to `ch` as one read: what the channel wants next, at most. Returns the
/// bytes used (0 only when the channel parks at a SYNC).
fn feed(ch: &mut RecvChannel, input: &[u8], vectored: bool, table: &Table<'_>, ps: usize) -> Result<usize, RecvError> {
    let n = match ch.want() {
        Want::Header(buf) => {
            let n = buf.len().min(input.len());
            buf[..n].copy_from_slice(&input[..n]);
            n
        }
        Want::Page { block, page, offset, len } => {
            let b = table.get(block).expect("the engine named a block of the table");
            assert!(len > 0 && len <= ps, "page request of {len} bytes");
            assert!(offset + len <= b.used_len(), "page request {offset}+{len} outside {} bytes", b.used_len());
            assert_eq!(offset / ps, page.get(), "page request offset {offset} is not in page {}", page.get());
            assert_eq!((offset + len) % ps, 0, "page request does not end at its page's end");
            if vectored {
                let mut ranges = [PageRange::EMPTY; IOV];
                let count = ch.pending_pages(table, &mut ranges);
                assert!(count >= 1, "pending_pages listed nothing during page data");
                assert_eq!((ranges[0].block, ranges[0].offset, ranges[0].len), (block, offset, len));
                let mut rest = input;
                let mut total = 0;
                for r in &ranges[..count] {
                    let rb = table.get(r.block).expect("pending range names a block of the table");
                    assert!(r.len > 0 && r.len <= ps && r.offset + r.len <= rb.used_len(), "pending range {r:?}");
                    let k = r.len.min(rest.len());
                    rb.memory().write(r.offset, &rest[..k]);
                    rest = &rest[k..];
                    total += k;
                    if rest.is_empty() {
                        break;
                    }
                }
                ch.advance_many(total, table)?;
                return Ok(total);
            }
            let n = len.min(input.len());
            b.memory().write(offset, &input[..n]);
            n
        }
        Want::Discard(len) => len.min(input.len()),
        Want::Sync => return Ok(0),
    };
    ch.advance(n, table)?;
    Ok(n)
}
