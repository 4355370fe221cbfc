//! A complete migration on bare metal: a "source guest" and a "destination guest" in static RAM
//! arenas, two multifd channels and a main stream over in-memory byte rings, the core's send and
//! receive engines on both ends, and the same wire format QEMU speaks.
//!
//! There is one core and no threads, so the workers are cooperative: the send engine's channel worker
//! runs inline when the producer hands it a job (its `Notify::job` hook), writes its packet into its
//! ring, and every write into any ring steps the receiving side ([`Dest::pump`]) until nothing more
//! can move. Each side still runs its workers through the lifecycle coordinator and a [`Platform`], so
//! the states are the same `Uncreated -> Running -> Joined` as on Linux.

use core::cell::UnsafeCell;

use heapless::Deque;
use multifd_core::bitmap::{AtomicWord, words_for};
use multifd_core::block::{AtomicRegion, AtomicU8, BlockSpec, BlockTable, GuestMemory, TableSlot, ZeroPagePolicy};
use multifd_core::lifecycle::{ChannelId, Coordinator, CoordinatorId, Platform, Wake, WorkerExit};
use multifd_core::lock::SpinLock;
use multifd_core::recv::{EpochBarrier, MainAction, MainRecv, RecvChannel, RecvError, SyncMode};
use multifd_core::send::{
    MainSink, Notify, Precopy, PrecopyError, Quiescent, RoundStats, SendChannel, SendEngine, SourceBlocks, Step,
    precopy,
};
use multifd_core::wire::{
    ChannelSet, Event, Geometry, InitPacket, Layout, PacketConfig, StreamConfig, StreamError, StreamParser,
};

pub(crate) const PAGE: usize = 4096;
/// Pages of the two blocks: 16 KiB and 8 KiB.
pub(crate) const PAGES: [usize; 2] = [4, 2];
pub(crate) const NAMES: [&[u8]; 2] = [b"pc.ram", b"vga.vram"];
pub(crate) const CHANNELS: u8 = 2;
const RING: usize = 2048;
const UUID: [u8; 16] = *b"multifd-firmware";

// ---------------------------------------------------------------------------------------------
// Source guest.

/// The source guest's RAM. The guest (this firmware) changes it only between rounds, while the
/// migration is quiescent; channel workers read it while sending.
pub(crate) struct Source {
    a: UnsafeCell<[u8; PAGES[0] * PAGE]>,
    b: UnsafeCell<[u8; PAGES[1] * PAGE]>,
}

// SAFETY: one core, and the guest writes (`Source::fill`, `Source::dirty`) happen only before the engine
// exists or while it is quiescent (the `Quiescent` token), never while a channel reads a page.
unsafe impl Sync for Source {}

impl Source {
    pub(crate) const fn new() -> Self {
        Self { a: UnsafeCell::new([0; PAGES[0] * PAGE]), b: UnsafeCell::new([0; PAGES[1] * PAGE]) }
    }

    fn bytes(&self, block: usize) -> *mut [u8] {
        if block == 0 { self.a.get() as *mut [u8] } else { self.b.get() as *mut [u8] }
    }

    /// Writes `byte` over page `page` of `block`, or zeros when `byte` is 0.
    fn write_page(&self, block: usize, page: usize, byte: u8) {
        // SAFETY: see the `Sync` impl: callers hold `&mut` of the run (before the engine exists) or a
        // `Quiescent` token, so no channel reads the page now.
        let mem = unsafe { &mut *self.bytes(block) };
        for (i, b) in mem[page * PAGE..(page + 1) * PAGE].iter_mut().enumerate() {
            // A pattern that depends on the position, so misplaced pages are caught.
            *b = if byte == 0 { 0 } else { byte ^ (i as u8) };
        }
    }

    /// The first round's content: pages with data, and zero pages (page 1 of block 0).
    pub(crate) fn fill(&mut self) {
        for (block, &pages) in PAGES.iter().enumerate() {
            for page in 0..pages {
                let zero = block == 0 && page == 1;
                self.write_page(block, page, if zero { 0 } else { 0x10 * (block as u8 + 1) + page as u8 });
            }
        }
    }

    /// What the guest does between rounds: page 2 of block 0 gets new data, page 3 becomes zero, and
    /// page 1 of block 1 changes. Returns the dirty bitmap words per block.
    fn dirty(&self, _quiescent: &Quiescent<'_>) -> [u64; 2] {
        self.write_page(0, 2, 0x77);
        self.write_page(0, 3, 0);
        self.write_page(1, 1, 0x99);
        [(1 << 2) | (1 << 3), 1 << 1]
    }

    pub(crate) fn page(&self, block: usize, page: usize) -> &[u8] {
        // SAFETY: a shared view; callers compare after the migration, when nothing writes.
        let mem = unsafe { &*self.bytes(block) };
        &mem[page * PAGE..(page + 1) * PAGE]
    }
}

impl SourceBlocks for Source {
    fn count(&self) -> usize {
        2
    }
    fn name(&self, block: usize) -> &[u8] {
        NAMES[block]
    }
    fn used_len(&self, block: usize) -> u64 {
        (PAGES[block] * PAGE) as u64
    }
    fn page(&self, block: usize, offset: u64, len: usize) -> &[u8] {
        // SAFETY: see the `Sync` impl; the engine asks only while no guest write runs.
        let mem = unsafe { &*self.bytes(block) };
        &mem[offset as usize..offset as usize + len]
    }
}

// ---------------------------------------------------------------------------------------------
// Destination guest: static arenas with guard bytes around them.

/// Guard bytes before and after each destination block: a write outside a block would change them.
pub(crate) const GUARD: usize = 64;
const GUARD_BYTE: u8 = 0x5a;
pub(crate) static DEST_A: [AtomicU8; PAGES[0] * PAGE + 2 * GUARD] =
    [const { AtomicU8::new(0) }; PAGES[0] * PAGE + 2 * GUARD];
pub(crate) static DEST_B: [AtomicU8; PAGES[1] * PAGE + 2 * GUARD] =
    [const { AtomicU8::new(0) }; PAGES[1] * PAGE + 2 * GUARD];
static WORDS_A: [AtomicWord; words_for(PAGES[0])] = [const { AtomicWord::new(0) }; words_for(PAGES[0])];
static WORDS_B: [AtomicWord; words_for(PAGES[1])] = [const { AtomicWord::new(0) }; words_for(PAGES[1])];
pub(crate) type Table = BlockTable<'static, AtomicRegion<'static>, 4>;
pub(crate) static DEST_TABLE: TableSlot<'static, AtomicRegion<'static>, 4> = TableSlot::new();

fn dest_region(block: usize) -> AtomicRegion<'static> {
    let arena: &'static [AtomicU8] = if block == 0 { &DEST_A } else { &DEST_B };
    AtomicRegion::new(&arena[GUARD..arena.len() - GUARD])
}

static REGION_A: SpinLock<Option<AtomicRegion<'static>>> = SpinLock::new(None);

/// Clears the destination arenas (fresh, zeroed guest memory) and sets the guard bytes.
pub(crate) fn reset_dest() {
    for arena in [&DEST_A[..], &DEST_B[..]] {
        let n = arena.len();
        for (i, b) in arena.iter().enumerate() {
            let guard = i < GUARD || i >= n - GUARD;
            b.store(if guard { GUARD_BYTE } else { 0 }, core::sync::atomic::Ordering::Relaxed);
        }
    }
    let _ = REGION_A.lock(|r| r.take());
}

/// Whether every guard byte is intact.
pub(crate) fn guards_intact() -> bool {
    [&DEST_A[..], &DEST_B[..]].iter().all(|arena| {
        let n = arena.len();
        arena[..GUARD]
            .iter()
            .chain(&arena[n - GUARD..])
            .all(|b| b.load(core::sync::atomic::Ordering::Relaxed) == GUARD_BYTE)
    })
}

/// Installs the destination block table over the arenas, for the workers of coordinator `owner`.
pub(crate) fn install_dest(regions: &'static [AtomicRegion<'static>; 2], owner: CoordinatorId) -> bool {
    DEST_TABLE
        .install(owner, ZeroPagePolicy::SkipUntouched, |t| {
            for (block, region) in regions.iter().enumerate() {
                let spec = BlockSpec {
                    name: NAMES[block],
                    used_len: (PAGES[block] * PAGE) as u64,
                    page_size: geometry(),
                    memory_zeroed: true,
                };
                let words: &'static [AtomicWord] = if block == 0 { &WORDS_A } else { &WORDS_B };
                t.add(&spec, region, words)?;
            }
            Ok(())
        })
        .is_ok()
}

/// The two destination regions, built once (they borrow the static arenas).
pub(crate) fn regions() -> &'static [AtomicRegion<'static>; 2] {
    static REGIONS: SpinLock<Option<&'static [AtomicRegion<'static>; 2]>> = SpinLock::new(None);
    REGIONS.lock(|r| {
        *r.get_or_insert_with(|| {
            let cell = cortex_m::singleton!(: [AtomicRegion<'static>; 2] = [dest_region(0), dest_region(1)]);
            // Local invariant: this closure runs once (the option is filled), so the singleton is free.
            cell.map(|c| &*c).unwrap_or_else(|| panic!("regions built twice"))
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Rings and the receiving side.

/// A fault to inject into a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub(crate) enum Fault {
    /// None.
    None,
    /// The send side's platform refuses to start channel 1.
    StartChannel1,
    /// One byte of the first RAM packet header on channel 0 is corrupted on its way (its first
    /// offset is pushed outside the block).
    CorruptOffset,
}

/// Why the receiving side stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DestError {
    Channel(RecvError),
    Stream(StreamError),
    Init,
    UnknownBlock,
    Stuck,
}

impl defmt::Format for DestError {
    fn format(&self, f: defmt::Formatter<'_>) {
        match self {
            DestError::Channel(e) => defmt::write!(f, "channel: {}", defmt::Display2Format(e)),
            DestError::Stream(e) => defmt::write!(f, "main stream: {}", defmt::Display2Format(e)),
            DestError::Init => defmt::write!(f, "bad init packet"),
            DestError::UnknownBlock => defmt::write!(f, "block list names an unknown block"),
            DestError::Stuck => defmt::write!(f, "a ring is full and its reader cannot move"),
        }
    }
}

/// One receiving channel: its ring, and its state once its init packet arrived.
struct Incoming {
    ring: Deque<u8, RING>,
    init: [u8; 64],
    init_have: usize,
    chan: Option<RecvChannel>,
    /// Counted in at the epoch barrier for the SYNC it is parked at.
    arrived: bool,
    /// Bytes to corrupt: (position in this ring's stream, xor mask).
    corrupt_at: Option<(usize, u8)>,
    seen: usize,
}

/// The receiving side: the channels' and the main stream's rings and engines.
pub(crate) struct Dest {
    chans: [Incoming; CHANNELS as usize],
    ids: ChannelSet,
    main_ring: Deque<u8, RING>,
    parser: StreamParser,
    main: MainRecv,
    main_waiting: bool,
    barrier: EpochBarrier,
    blocks_checked: u8,
    pub(crate) error: Option<DestError>,
}

impl Dest {
    pub(crate) fn new(fault: Fault) -> Self {
        let incoming = |corrupt_at| Incoming {
            ring: Deque::new(),
            init: [0; 64],
            init_have: 0,
            chan: None,
            arrived: false,
            corrupt_at,
            seen: 0,
        };
        // Channel 0 carries its init packet (64 bytes), the setup SYNC packet (a header of 1344
        // bytes, no pages), then the first batch of block 0 (the cooperative schedule is
        // deterministic). Byte 320 of that header starts its first offset slot: setting bit 6 of the
        // top byte moves the offset far outside every block.
        let first_offset = 64 + geometry().header_len() + 320;
        let corrupt = if fault == Fault::CorruptOffset { Some((first_offset, 0x40)) } else { None };
        Self {
            chans: [incoming(corrupt), incoming(None)],
            ids: ChannelSet::new(),
            main_ring: Deque::new(),
            parser: StreamParser::new(StreamConfig::new(geometry())),
            main: MainRecv::new(SyncMode::Auto),
            main_waiting: false,
            barrier: EpochBarrier::new(CHANNELS),
            blocks_checked: 0,
            error: None,
        }
    }

    /// Appends `bytes` to channel `ch`'s ring (`None`: the main stream's), stepping the receiver
    /// whenever the ring is full.
    pub(crate) fn push(&mut self, ch: Option<usize>, mut bytes: &[u8], table: &Table) -> Result<(), DestError> {
        while !bytes.is_empty() {
            if let Some(e) = self.error {
                return Err(e);
            }
            let ring = match ch {
                Some(c) => &mut self.chans[c].ring,
                None => &mut self.main_ring,
            };
            let room = RING - ring.len();
            let n = room.min(bytes.len());
            for &b in &bytes[..n] {
                let b = match ch {
                    Some(c) => {
                        let inc = &mut self.chans[c];
                        let b = match inc.corrupt_at {
                            Some((at, mask)) if at == inc.seen => b ^ mask,
                            _ => b,
                        };
                        inc.seen += 1;
                        b
                    }
                    None => b,
                };
                let ring = match ch {
                    Some(c) => &mut self.chans[c].ring,
                    None => &mut self.main_ring,
                };
                // Room was checked above.
                let _ = ring.push_back(b);
            }
            bytes = &bytes[n..];
            if !self.pump(table) && !bytes.is_empty() {
                let full = match ch {
                    Some(c) => self.chans[c].ring.len() == RING,
                    None => self.main_ring.len() == RING,
                };
                if full {
                    self.error = Some(DestError::Stuck);
                }
            }
        }
        self.pump(table);
        self.error.map_or(Ok(()), Err)
    }

    /// Steps every receiver until nothing moves; returns whether anything did. Errors are kept in
    /// `self.error` (the first one wins) and stop the pump.
    pub(crate) fn pump(&mut self, table: &Table) -> bool {
        let mut any = false;
        while self.error.is_none() {
            let mut moved = false;
            for c in 0..CHANNELS as usize {
                match self.step_channel(c, table) {
                    Ok(m) => moved |= m,
                    Err(e) => self.error = Some(e),
                }
            }
            match self.step_main(table) {
                Ok(m) => moved |= m,
                Err(e) => self.error = self.error.or(Some(e)),
            }
            if !moved {
                break;
            }
            any = true;
        }
        any
    }

    fn step_channel(&mut self, c: usize, table: &Table) -> Result<bool, DestError> {
        let inc = &mut self.chans[c];
        let Some(chan) = inc.chan.as_mut() else {
            // The init packet first: it names the channel.
            let mut moved = false;
            while inc.init_have < 64 {
                let Some(b) = inc.ring.pop_front() else { break };
                inc.init[inc.init_have] = b;
                inc.init_have += 1;
                moved = true;
            }
            if inc.init_have == 64 {
                let init = InitPacket::decode(&inc.init).map_err(|_| DestError::Init)?;
                init.validate(CHANNELS, Some(UUID)).map_err(|_| DestError::Init)?;
                self.ids.insert(init.id).map_err(|_| DestError::Init)?;
                inc.chan = Some(RecvChannel::new(ChannelId(init.id), PacketConfig::new(geometry())));
                return Ok(true);
            }
            return Ok(moved);
        };
        if chan.is_parked() {
            if !inc.arrived {
                self.barrier.arrive();
                inc.arrived = true;
                return Ok(true);
            }
            if self.barrier.is_released(chan.stats().syncs) {
                chan.synced();
                inc.arrived = false;
                return Ok(true);
            }
            return Ok(false);
        }
        let (front, _) = inc.ring.as_slices();
        if front.is_empty() {
            return Ok(false);
        }
        let used = chan.receive_bytes(front, table).map_err(DestError::Channel)?;
        for _ in 0..used {
            inc.ring.pop_front();
        }
        Ok(used > 0)
    }

    fn step_main(&mut self, table: &Table) -> Result<bool, DestError> {
        if self.main_waiting {
            return match self.barrier.try_release() {
                Ok(Some(_)) => {
                    self.main_waiting = false;
                    Ok(true)
                }
                Ok(None) => Ok(false),
                Err(e) => Err(DestError::Channel(RecvError::Epoch(e))),
            };
        }
        let (front, _) = self.main_ring.as_slices();
        if front.is_empty() {
            return Ok(false);
        }
        let (used, event) = self.parser.feed(front).map_err(DestError::Stream)?;
        let mut action = MainAction::Continue;
        if let Some(ev) = event {
            if let Event::BlockDeclared { name, used_length } = ev {
                // The destination's blocks are fixed arenas: the source must declare exactly them.
                match table.find(name) {
                    Some((_, b)) if b.used_len() as u64 == used_length => self.blocks_checked += 1,
                    _ => return Err(DestError::UnknownBlock),
                }
            }
            action = self.main.on_event(&ev, table).map_err(DestError::Channel)?;
        }
        for _ in 0..used {
            self.main_ring.pop_front();
        }
        if action == MainAction::Marker {
            self.main_waiting = true;
        }
        Ok(used > 0)
    }

    /// Whether the migration ended as a complete one: EOF on the main stream, every channel at a
    /// packet boundary, every epoch paired, both blocks declared.
    pub(crate) fn completed(&self) -> bool {
        self.error.is_none()
            && self.main.saw_eof()
            && self.parser.finish().is_ok()
            && self.blocks_checked == 2
            && self.chans.iter().all(|i| {
                i.ring.is_empty()
                    && i.chan
                        .as_ref()
                        .is_some_and(|c| c.finish().is_ok() && c.stats().syncs == self.main.stats().markers)
            })
    }

    pub(crate) fn epochs(&self) -> u32 {
        self.barrier.released()
    }

    pub(crate) fn packets(&self) -> u64 {
        self.chans.iter().filter_map(|i| i.chan.as_ref()).map(|c| c.stats().packets).sum()
    }
}

pub(crate) fn geometry() -> Geometry {
    // Local invariant: 4096 is a valid page size.
    Geometry::new(PAGE as u32).unwrap_or_else(|_| panic!("4 KiB pages"))
}

// ---------------------------------------------------------------------------------------------
// The sending side's cooperative workers.

/// Errors of the firmware's migration, recorded by the lifecycle coordinators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub(crate) enum MigError {
    /// The platform refused to start a worker.
    StartRefused(u8),
    /// The receiving side failed.
    Dest,
}

type Engine<'b> = SendEngine<'b, Source, ChannelId, MigError, 4>;

/// The send side's platform and `Notify`: starting a worker writes its init packet and declares it
/// ready; a job for a channel runs that channel's worker inline, which writes the packet into the
/// channel's ring (stepping the receiver).
pub(crate) struct Coop<'e, 'b> {
    engine: &'e Engine<'b>,
    workers: SpinLock<[Option<SendChannel<'e, 'b, Source, ChannelId, MigError, 4>>; CHANNELS as usize]>,
    dest: &'e SpinLock<Dest>,
    table: &'e Table,
    refuse: Option<u8>,
}

impl Wake for Coop<'_, '_> {
    fn wake(&self, _channel: ChannelId) {
        // Nothing blocks outside the core on one core with in-memory rings.
    }
}

impl Platform for Coop<'_, '_> {
    type Handle = ChannelId;
    type Error = MigError;

    fn start(&self, channel: ChannelId) -> Result<ChannelId, MigError> {
        if self.refuse == Some(channel.0) {
            return Err(MigError::StartRefused(channel.0));
        }
        let ch = self.engine.channel(channel).map_err(|_| MigError::StartRefused(channel.0))?;
        let init = ch.init_packet(UUID);
        let pushed = self.dest.lock(|d| d.push(Some(channel.index()), &init, self.table));
        if pushed.is_err() {
            return Err(MigError::Dest);
        }
        ch.ready(self);
        self.workers.lock(|w| w[channel.index()] = Some(ch));
        Ok(channel)
    }

    fn join(&self, channel: ChannelId, _handle: ChannelId) -> WorkerExit {
        // The worker ran inline job by job; joining it retires its state.
        self.workers.lock(|w| w[channel.index()] = None);
        WorkerExit::Returned
    }
}

impl Notify for Coop<'_, '_> {
    fn job(&self, channel: ChannelId) {
        let Some(mut ch) = self.workers.lock(|w| w[channel.index()].take()) else { return };
        let result: Result<(), DestError> = match ch.next(self) {
            Ok(out) => self.dest.lock(|d| {
                d.push(Some(channel.index()), out.header(), self.table)?;
                for page in out.pages() {
                    d.push(Some(channel.index()), page, self.table)?;
                }
                Ok(())
            }),
            Err(_) => Ok(()),
        };
        ch.done(self);
        self.workers.lock(|w| w[channel.index()] = Some(ch));
        if result.is_err() {
            self.engine.lifecycle().record_error(self, MigError::Dest);
        }
    }

    fn channel_done(&self, _channel: ChannelId) {}
}

/// The main stream into its ring.
struct MainOut<'e> {
    dest: &'e SpinLock<Dest>,
    table: &'e Table,
}

impl MainSink for MainOut<'_> {
    type Error = DestError;
    fn write(&mut self, bytes: &[u8]) -> Result<(), DestError> {
        self.dest.lock(|d| d.push(None, bytes, self.table))
    }
}

/// The embedder's precopy: round 0 sends everything, the guest then dirties pages, round 1 is the last.
struct TwoRounds<'s> {
    source: &'s Source,
    all: [[u64; 1]; 2],
    dirty: [[u64; 1]; 2],
    rounds: [RoundStats; 2],
}

impl Precopy for TwoRounds<'_> {
    fn dirty(&mut self, round: u32, block: usize) -> &[u64] {
        if round == 0 { &self.all[block] } else { &self.dirty[block] }
    }

    fn between_rounds(&mut self, _round: u32, quiescent: &Quiescent<'_>) {
        let d = self.source.dirty(quiescent);
        self.dirty = [[d[0]], [d[1]]];
    }

    fn round_done(&mut self, stats: &RoundStats) -> Step {
        defmt::info!(
            "round {=u32}: {=u64} pages ({=u64} zero), {=u64} bytes, {=u64} dirty left",
            stats.round,
            stats.pages,
            stats.zero_pages,
            stats.bytes,
            stats.dirty_left
        );
        if let Some(r) = self.rounds.get_mut(stats.round as usize) {
            *r = *stats;
        }
        Step::Complete
    }

    fn vm_description(&mut self) -> &[u8] {
        br#"{"page_size": 4096, "devices": []}"#
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, defmt::Format)]
pub(crate) struct Outcome {
    pub(crate) started: u8,
    pub(crate) send_joined: u8,
    pub(crate) recv_joined: u8,
    pub(crate) sent_ok: bool,
    pub(crate) completed: bool,
    pub(crate) dest_error: bool,
    pub(crate) epochs: u32,
    pub(crate) packets: u64,
    pub(crate) released_early: bool,
    pub(crate) released_after: bool,
    /// Every bit of both destination blocks was set when the migration ended.
    pub(crate) all_bits: bool,
    /// The destination stopped on an out-of-range page offset.
    pub(crate) offset_error: bool,
}

/// The receive side's workers are stepped by the pump; this platform only gives them a lifecycle.
struct RecvWorkers;

impl Wake for RecvWorkers {
    fn wake(&self, _channel: ChannelId) {}
}

impl Platform for RecvWorkers {
    type Handle = ChannelId;
    type Error = MigError;
    fn start(&self, channel: ChannelId) -> Result<ChannelId, MigError> {
        Ok(channel)
    }
    fn join(&self, _channel: ChannelId, _handle: ChannelId) -> WorkerExit {
        WorkerExit::Returned
    }
}

/// Runs one migration of `source` into the destination arenas with `fault` injected.
pub(crate) fn run(source: &Source, fault: Fault) -> Outcome {
    reset_dest();
    let regions = regions();
    let mut out = Outcome {
        started: 0,
        send_joined: 0,
        recv_joined: 0,
        sent_ok: false,
        completed: false,
        dest_error: false,
        epochs: 0,
        packets: 0,
        released_early: false,
        released_after: false,
        all_bits: false,
        offset_error: false,
    };
    let recv_coord: Coordinator<ChannelId, MigError, 4> = match Coordinator::new(CHANNELS) {
        Ok(c) => c,
        Err(_) => return out,
    };
    if !install_dest(regions, recv_coord.id()) {
        return out;
    }
    let _ = recv_coord.create_all(&RecvWorkers, |_| Ok(()));
    let Ok(lease) = DEST_TABLE.lease() else { return out };
    lease.with(|table| {
        let dest = SpinLock::new(Dest::new(fault));
        let Ok(engine) = Engine::new(CHANNELS, source, geometry(), Layout::V9_0) else { return };
        let coop = Coop {
            engine: &engine,
            workers: SpinLock::new([const { None }; CHANNELS as usize]),
            dest: &dest,
            table,
            refuse: if fault == Fault::StartChannel1 { Some(1) } else { None },
        };
        if let Ok(report) = engine.lifecycle().create_all(&coop, |_| Ok(())) {
            out.started = report.started;
        }
        if engine.lifecycle().error().is_none() {
            let mut embedder =
                TwoRounds { source, all: [[0b1111], [0b11]], dirty: [[0], [0]], rounds: Default::default() };
            let mut main = MainOut { dest: &dest, table };
            let sent = engine
                .producer()
                .map_err(PrecopyError::Send)
                .and_then(|mut producer| precopy(&mut producer, &coop, &mut main, &mut embedder, b"none"));
            if sent.is_err() {
                engine.lifecycle().record_error(&coop, MigError::Dest);
            }
            out.sent_ok = sent.is_ok();
        }
        out.send_joined = engine.lifecycle().cleanup(&coop).map(|t| t.report().joined).unwrap_or(0);
        dest.lock(|d| {
            d.pump(table);
            out.completed = d.completed();
            out.dest_error = d.error.is_some();
            if let Some(e) = d.error {
                defmt::warn!("destination stopped: {}", e);
                out.offset_error = is_offset_error(&e);
            }
            out.epochs = d.epochs();
            out.packets = d.packets();
        });
        out.all_bits = table.iter().all(|(_, b)| b.bitmap().count() == b.pages());
    });
    drop(lease);
    out.released_early = DEST_TABLE.release_after(&recv_coord).is_ok();
    out.recv_joined = recv_coord.cleanup(&RecvWorkers).map(|t| t.report().joined).unwrap_or(0);
    out.released_after = DEST_TABLE.release_after(&recv_coord).is_ok();
    out
}

/// Whether destination page `page` of `block` equals the source's.
pub(crate) fn page_matches(source: &Source, block: usize, page: usize) -> bool {
    let region = &regions()[block];
    let want = source.page(block, page);
    let mut buf = [0u8; 256];
    (0..PAGE / 256).all(|i| {
        region.read(page * PAGE + i * 256, &mut buf);
        buf[..] == want[i * 256..(i + 1) * 256]
    })
}

/// Whether `e` is the validation of a page offset against its block.
fn is_offset_error(e: &DestError) -> bool {
    use multifd_core::block::BlockError;
    use multifd_core::wire::DecodeError;
    matches!(
        e,
        DestError::Channel(
            RecvError::Block { error: BlockError::OffsetOutOfRange { .. }, .. }
                | RecvError::Packet { error: DecodeError::OffsetOutOfRange { .. }, .. }
        )
    )
}
