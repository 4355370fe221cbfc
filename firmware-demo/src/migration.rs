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
use multifd_core::lifecycle::{ChannelId, ConfigError, CoordinatorId, Platform, Wake, WorkerExit};
use multifd_core::lock::SpinLock;
use multifd_core::recv::{Identity, MainStream, RecvChannel, RecvError, RecvSession, SessionConfig};
use multifd_core::send::{
    MainSink, Notify, Precopy, PrecopyError, Quiescent, RoundStats, SendChannel, SendEngine, SourceBlocks, Step,
    precopy,
};
use multifd_core::wire::packet::INIT_PACKET_LEN;
use multifd_core::wire::{Geometry, Layout, PacketConfig};

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
// Rings and the receiving side's errors.

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

/// Why the receiving side stopped: the session's error, or a ring its reader cannot drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DestError {
    Recv(RecvError),
    Stuck,
}

impl From<RecvError> for DestError {
    fn from(e: RecvError) -> Self {
        DestError::Recv(e)
    }
}

impl defmt::Format for DestError {
    fn format(&self, f: defmt::Formatter<'_>) {
        match self {
            DestError::Recv(e) => defmt::write!(f, "{}", defmt::Display2Format(e)),
            DestError::Stuck => defmt::write!(f, "a ring is full and its reader cannot move"),
        }
    }
}

/// The receive session: its lifecycle runs the receive workers, its first recorded error is the
/// receiving side's.
type Session = RecvSession<ChannelId, DestError, 4>;

/// One incoming connection: its ring and its role.
struct Conn {
    ring: Deque<u8, RING>,
    role: Role,
    /// Bytes to corrupt: (position in this ring's stream, xor mask).
    corrupt_at: Option<(usize, u8)>,
    seen: usize,
}

impl Conn {
    /// The connections, with `fault` set up: connection 0 gets what the main stream's sink writes,
    /// connection 1 + c what send channel c writes.
    fn all(fault: Fault) -> [Conn; 1 + CHANNELS as usize] {
        // Channel 0 carries its init packet (64 bytes), the setup SYNC packet (a header of 1344
        // bytes, no pages), then the first batch of block 0 (the cooperative schedule is
        // deterministic). Byte 320 of that header starts its first offset slot: setting bit 6 of the
        // top byte moves the offset far outside every block.
        let first_offset = 64 + geometry().header_len() + 320;
        let corrupt = if fault == Fault::CorruptOffset { Some((first_offset, 0x40)) } else { None };
        let conn = |corrupt_at| Conn { ring: Deque::new(), role: Role::Unknown, corrupt_at, seen: 0 };
        [conn(None), conn(corrupt), conn(None)]
    }

    /// Appends what fits of `bytes` to the ring (corrupting the chosen byte); returns how much.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = (RING - self.ring.len()).min(bytes.len());
        for &b in &bytes[..n] {
            let mask = match self.corrupt_at {
                Some((at, mask)) if at == self.seen => mask,
                _ => 0,
            };
            self.seen += 1;
            // Room was checked above.
            let _ = self.ring.push_back(b ^ mask);
        }
        n
    }
}

pub(crate) fn geometry() -> Geometry {
    // Local invariant: 4096 is a valid page size.
    Geometry::new(PAGE as u32).unwrap_or_else(|_| panic!("4 KiB pages"))
}

// ---------------------------------------------------------------------------------------------
// The receive driver: moves the rings' bytes into the session.

/// What the session found a connection to be.
#[derive(Clone, Copy)]
enum Role {
    Unknown,
    Main,
    Channel(ChannelId),
}

/// The receiving side: the connections' rings, driven through the receive session (which finds out
/// from their first bytes which connection is what).
pub(crate) struct Dest {
    pub(crate) session: Session,
    pub(crate) main: MainStream<4>,
    conns: [Conn; 1 + CHANNELS as usize],
    /// The channels' state machines, by channel id, once claimed from the session.
    chans: [Option<RecvChannel>; CHANNELS as usize],
    listed: bool,
}

impl Dest {
    pub(crate) fn new(fault: Fault) -> Result<Self, ConfigError> {
        let cfg = SessionConfig { uuid: Some(UUID), ..SessionConfig::new(CHANNELS, PacketConfig::new(geometry())) };
        let session = Session::new(cfg)?;
        let (conns, main) = (Conn::all(fault), MainStream::new(&session));
        Ok(Self { session, main, conns, chans: [const { None }; CHANNELS as usize], listed: false })
    }

    /// The receiving side's first error, as recorded in the session's lifecycle.
    pub(crate) fn error(&self) -> Option<DestError> {
        self.session.lifecycle().error().copied()
    }

    fn fail(&self, e: DestError) {
        self.session.lifecycle().record_error(&RecvWorkers, e);
    }

    /// Appends `bytes` to channel `ch`'s ring (`None`: the main stream's), stepping the receiver
    /// whenever the ring is full.
    pub(crate) fn push(&mut self, ch: Option<usize>, mut bytes: &[u8], table: &Table) -> Result<(), DestError> {
        let k = ch.map_or(0, |c| c + 1);
        while !bytes.is_empty() && self.error().is_none() {
            bytes = &bytes[self.conns[k].fill(bytes)..];
            self.pump(table);
            if !bytes.is_empty() && self.conns[k].ring.len() == RING {
                // Pumped until nothing moved, and the ring is still full: its reader cannot move.
                self.fail(DestError::Stuck);
            }
        }
        self.pump(table);
        self.error().map_or(Ok(()), Err)
    }

    /// Steps every connection until nothing moves (the main stream last in each round, so that it
    /// sees the round's SYNC arrivals). Errors are recorded in the session (the first one wins) and
    /// stop the pump.
    pub(crate) fn pump(&mut self, table: &Table) {
        while self.error().is_none() {
            let main_at = self.conns.iter().position(|c| matches!(c.role, Role::Main));
            let (epochs, mut moved) = (self.session.epochs(), false);
            for k in (0..self.conns.len()).filter(|&k| Some(k) != main_at).chain(main_at) {
                match self.step(k, table) {
                    Ok(m) => moved |= m,
                    Err(e) => self.fail(e.into()),
                }
            }
            if !moved && self.session.epochs() == epochs {
                break;
            }
        }
    }

    /// Moves connection `k`'s ring bytes into the session; returns whether anything moved.
    fn step(&mut self, k: usize, table: &Table) -> Result<bool, RecvError> {
        let (s, conn) = (&self.session, &mut self.conns[k]);
        let mut moved = false;
        let used = match conn.role {
            Role::Unknown => {
                let mut start = [0u8; INIT_PACKET_LEN];
                let have = conn.ring.iter().zip(&mut start).map(|(b, d)| *d = *b).count();
                let (role, used) = match s.identify(&start[..have])? {
                    Identity::NeedMore { .. } => return Ok(false),
                    Identity::Main => (Role::Main, 0),
                    Identity::Channel(id) => {
                        let slot = self.chans.get_mut(id.index()).ok_or(RecvError::ChannelClaim { channel: id })?;
                        *slot = Some(s.channel(id)?);
                        (Role::Channel(id), INIT_PACKET_LEN)
                    }
                };
                (conn.role, moved) = (role, true);
                used
            }
            Role::Main if !self.listed => {
                let step = self.main.read_block_list(s, conn.ring.as_slices().0)?;
                if step.complete {
                    // The destination's blocks are fixed arenas: the declared list must be them.
                    self.main.start(table)?;
                    self.listed = true;
                }
                step.used
            }
            Role::Main => self.main.feed(s, conn.ring.as_slices().0, table)?.used,
            Role::Channel(id) => {
                let Some(ch) = self.chans.get_mut(id.index()).and_then(Option::as_mut) else { return Ok(false) };
                moved = ch.is_parked();
                if !s.poll_sync(ch) {
                    return Ok(false);
                }
                ch.receive_bytes(conn.ring.as_slices().0, table)?
            }
        };
        for _ in 0..used {
            conn.ring.pop_front();
        }
        Ok(used > 0 || moved)
    }

    /// Every sender has closed its connection: ends each stream in the session (a channel cleanly
    /// at a packet boundary, the main stream after its EOF), then checks that every channel ended.
    pub(crate) fn close(&mut self, table: &Table) {
        self.pump(table);
        let s = &self.session;
        for conn in &self.conns {
            let clean = s.lifecycle().error().is_none();
            let failed = match conn.role {
                Role::Channel(id) => {
                    if let Some(ch) = self.chans.get_mut(id.index()).and_then(Option::take) {
                        s.channel_done(&RecvWorkers, &ch, clean);
                    }
                    None
                }
                Role::Main if clean => self.main.end().err(),
                Role::Unknown if clean && !conn.ring.is_empty() => Some(s.closed_unidentified(conn.ring.len())),
                _ => None,
            };
            if let Some(e) = failed {
                s.lifecycle().record_error(&RecvWorkers, e.into());
            }
        }
        if let (None, Err(e)) = (self.error(), self.main.poll_channels(&self.session)) {
            self.fail(e.into());
        }
    }
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

/// The receive side's workers are stepped by the pump; this platform only gives them a lifecycle
/// (in the session's coordinator).
struct RecvWorkers;

impl Wake for RecvWorkers {
    fn wake(&self, _channel: ChannelId) {}
}

impl Platform for RecvWorkers {
    type Handle = ChannelId;
    type Error = DestError;
    fn start(&self, channel: ChannelId) -> Result<ChannelId, DestError> {
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
    let Ok(dest) = Dest::new(fault).map(SpinLock::new) else { return out };
    if !install_dest(regions, dest.lock(|d| d.session.lifecycle().id())) {
        return out;
    }
    let _ = dest.lock(|d| d.session.lifecycle().create_all(&RecvWorkers, |_| Ok(())));
    let Ok(lease) = DEST_TABLE.lease() else { return out };
    lease.with(|table| {
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
        dest.lock(|d| d.close(table));
        out.all_bits = table.iter().all(|(_, b)| b.bitmap().count() == b.pages());
    });
    drop(lease);
    dest.lock(|d| {
        let lifecycle = d.session.lifecycle();
        out.released_early = DEST_TABLE.release_after(lifecycle).is_ok();
        let joined = lifecycle.cleanup(&RecvWorkers);
        out.recv_joined = joined.as_ref().map(|t| t.report().joined).unwrap_or(0);
        // The completion checks read the table: a lease of their own, given back before the release.
        if let (Ok(joined), Ok(lease)) = (&joined, DEST_TABLE.lease()) {
            match lease.with(|table| d.session.finish(joined, &d.main, table)) {
                Ok(_) => out.completed = true,
                Err(e) => defmt::info!("destination incomplete: {}", defmt::Display2Format(&e)),
            }
        }
        if let Some(e) = d.error() {
            defmt::warn!("destination stopped: {}", e);
            out.dest_error = true;
            out.offset_error = is_offset_error(&e);
        }
        let totals = d.session.totals(&d.main);
        (out.epochs, out.packets) = (totals.epochs, totals.packets);
        out.released_after = DEST_TABLE.release_after(lifecycle).is_ok();
    });
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
        DestError::Recv(
            RecvError::Block { error: BlockError::OffsetOutOfRange { .. }, .. }
                | RecvError::Packet { error: DecodeError::OffsetOutOfRange { .. }, .. }
        )
    )
}
