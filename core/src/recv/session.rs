//! The receive session: one incoming migration, from the first byte of each connection to a typed
//! completion report, without I/O or allocation. The counterpart of [`SendEngine`](crate::send::SendEngine).
//!
//! The embedder accepts connections, moves bytes and runs one worker per channel; the session
//! decides everything else:
//!
//! 1. **Identify** each connection from its first bytes ([`RecvSession::identify`]): the main stream
//!    (`QEVM` magic, at most one) or a multifd channel, whose 64-byte init packet is checked (magic,
//!    version, id below the channel count, id not seen before, uuid).
//! 2. **Block list** ([`MainStream::read_block_list`]): the main stream's RAM setup declares the
//!    blocks; each is checked (name, used length, count, total against [`SessionConfig::max_ram`])
//!    and the list ends explicitly, with the entry that uses up the MEM_SIZE total. The embedder maps
//!    memory for [`MainStream::declared`], builds a [`BlockTable`] and hands it to
//!    [`MainStream::start`], which checks that it matches.
//! 3. **Run**: each worker takes its [`RecvChannel`] once ([`RecvSession::channel`]), reads what it
//!    wants, and at a SYNC calls [`RecvSession::poll_sync`] (cooperative) or
//!    [`RecvSession::wait_sync`] (blocking). The main stream is fed through [`MainStream::feed`],
//!    which applies its records and stops at each sync marker until the epoch barrier releases it
//!    ([`MainStream::poll_marker`] / [`MainStream::wait_marker`]).
//! 4. **End**: a worker whose connection closed (or that stops) reports it with
//!    [`RecvSession::channel_done`]; the main stream's close is [`MainStream::end`]; then
//!    [`MainStream::poll_channels`] / [`MainStream::wait_channels`] wait for the channels and catch a
//!    channel parked at a SYNC no marker can release any more.
//! 5. **Finish**: after the lifecycle's cleanup joined every worker, [`RecvSession::finish`] checks
//!    each completion condition in turn and returns the [`Totals`] or the condition that failed.
//!
//! Calls named `wait_*` block through [`Coordinator::wait_until`] (they idle through
//! [`Wake::idle`] and end as soon as the migration is terminating); every other call returns at once.
//!
//! ```
//! use multifd_core::lifecycle::{ChannelId, MAX_CHANNELS};
//! use multifd_core::recv::{Identity, RecvSession, SessionConfig};
//! use multifd_core::wire::{Geometry, InitPacket, PacketConfig};
//!
//! let cfg = SessionConfig::new(2, PacketConfig::new(Geometry::new(4096)?));
//! let session: RecvSession<(), (), 4> = RecvSession::new(cfg)?;
//! // A connection that starts with the main stream's magic is the main stream.
//! assert_eq!(session.identify(b"QEVM")?, Identity::Main);
//! // A multifd connection needs its whole init packet.
//! let mut init = [0u8; 64];
//! InitPacket { uuid: [0; 16], id: 1 }.encode(&mut init)?;
//! assert_eq!(session.identify(&init[..4])?, Identity::NeedMore { need: 64 });
//! assert_eq!(session.identify(&init)?, Identity::Channel(ChannelId(1)));
//! assert!(session.identify(&init).is_err(), "channel 1 is already connected");
//! assert!(!session.all_connected());
//! # let _ = MAX_CHANNELS;
//! # Ok::<(), Box<dyn core::error::Error>>(())
//! ```

use core::fmt;

use crate::block::{BlockError, BlockName, BlockTable, GuestMemory};
use crate::lifecycle::{AllJoined, ChannelId, ConfigError, Coordinator, Wake};
use crate::lock::SpinLock;
use crate::sync::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use crate::wire::packet::INIT_PACKET_LEN;
use crate::wire::stream::{Event, StreamConfig, StreamParser};
use crate::wire::{ChannelKind, DecodeError, InitPacket, PacketConfig, identify_channel};

use super::{
    BlockListError, ChannelStats, EpochBarrier, EpochError, MainAction, MainRecv, MainStats, RecvChannel, RecvError,
    SyncMode,
};

/// What a receive session is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Multifd channels the source uses (1 to the session's `MAX`).
    pub channels: u8,
    /// The uuid every init packet must carry, if it must match.
    pub uuid: Option<[u8; 16]>,
    /// Page geometry, header layout, compression and device-state policy of the channels' packets.
    pub packet: PacketConfig,
    /// Most bytes of RAM the block list may declare in all.
    pub max_ram: u64,
}

impl SessionConfig {
    /// `channels` channels decoded with `packet`, any uuid, no RAM limit.
    pub const fn new(channels: u8, packet: PacketConfig) -> Self {
        Self { channels, uuid: None, packet, max_ram: u64::MAX }
    }
}

/// What [`RecvSession::identify`] found out about a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Identity {
    /// Not decided yet: call again with at least `need` bytes of the connection's start.
    NeedMore {
        /// Bytes needed in all.
        need: usize,
    },
    /// The main stream: every byte of the connection, those given included, is main-stream input.
    Main,
    /// Multifd channel `id`: the connection's first [`INIT_PACKET_LEN`] bytes were its init packet;
    /// what follows them is the channel's packets.
    Channel(ChannelId),
}

/// Per-channel states of a session.
/// QEMU's command asking the destination to open a return path to the source.
const OPEN_RETURN_PATH: u16 = 1;

const UNSEEN: u8 = 0;
const IDENTIFIED: u8 = 1;
const CLAIMED: u8 = 2;
/// The worker stopped; its stream did not end cleanly (or it stopped for another reason).
const STOPPED: u8 = 3;
/// The worker's stream ended at a packet boundary, not parked at a SYNC.
const ENDED: u8 = 4;

/// One incoming migration: identification, the epoch barrier, the channels' end states and the
/// lifecycle of their workers (see the [module docs](self)). Shared by reference between the main
/// stream's thread and every channel worker.
///
/// `H` and `E` are the lifecycle's worker handle and error types; `MAX` bounds the channel count.
pub struct RecvSession<H, E, const MAX: usize> {
    cfg: SessionConfig,
    coord: Coordinator<H, E, MAX>,
    barrier: EpochBarrier,
    main_seen: AtomicBool,
    identified: AtomicU32,
    state: [AtomicU8; MAX],
    /// Set while a channel has arrived at the barrier and waits for its epoch's release.
    parked: [AtomicBool; MAX],
    stats: SpinLock<[ChannelStats; MAX]>,
    done: AtomicU32,
}

impl<H, E, const MAX: usize> fmt::Debug for RecvSession<H, E, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvSession")
            .field("cfg", &self.cfg)
            .field("barrier", &self.barrier)
            .field("identified", &self.identified)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<H, E, const MAX: usize> RecvSession<H, E, MAX> {
    /// A session for `cfg.channels` channels (1 to `MAX`).
    pub fn new(cfg: SessionConfig) -> Result<Self, ConfigError> {
        Ok(Self {
            cfg,
            coord: Coordinator::new(cfg.channels)?,
            barrier: EpochBarrier::new(cfg.channels),
            main_seen: AtomicBool::new(false),
            identified: AtomicU32::new(0),
            state: core::array::from_fn(|_| AtomicU8::new(UNSEEN)),
            parked: core::array::from_fn(|_| AtomicBool::new(false)),
            stats: SpinLock::new([ChannelStats::default(); MAX]),
            done: AtomicU32::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// The lifecycle of the channel workers: start them with `create_all`, record failures with
    /// `record_error`, end them with `cleanup`.
    pub fn lifecycle(&self) -> &Coordinator<H, E, MAX> {
        &self.coord
    }

    /// As [`RecvSession::lifecycle`], mutable (to take the recorded error after cleanup).
    pub fn lifecycle_mut(&mut self) -> &mut Coordinator<H, E, MAX> {
        &mut self.coord
    }

    /// The epoch barrier (for its counters; the session drives it).
    pub fn barrier(&self) -> &EpochBarrier {
        &self.barrier
    }

    /// Sync epochs released so far.
    pub fn epochs(&self) -> u32 {
        self.barrier.released()
    }

    /// Identifies a connection from `start`, everything it has sent so far (see [`Identity`]).
    /// Call again with more bytes while it answers [`Identity::NeedMore`]; a connection answered
    /// `Main` or `Channel` is identified for good (asking again about it is a duplicate).
    pub fn identify(&self, start: &[u8]) -> Result<Identity, RecvError> {
        let Some(first) = start.first_chunk::<4>() else {
            return Ok(Identity::NeedMore { need: 4 });
        };
        match identify_channel(*first).map_err(|error| RecvError::Handshake { error })? {
            ChannelKind::Main => {
                // AcqRel: only whether another connection took the role matters; nothing is published.
                if self.main_seen.swap(true, Ordering::AcqRel) {
                    return Err(RecvError::DuplicateMain);
                }
                Ok(Identity::Main)
            }
            ChannelKind::Multifd => {
                let Some(init) = start.first_chunk::<INIT_PACKET_LEN>() else {
                    return Ok(Identity::NeedMore { need: INIT_PACKET_LEN });
                };
                let packet = InitPacket::decode(init).map_err(|error| RecvError::Handshake { error })?;
                packet.validate(self.cfg.channels, self.cfg.uuid).map_err(|error| RecvError::Handshake { error })?;
                let id = ChannelId(packet.id);
                // AcqRel: the CAS decides which connection is this channel; Release lets a worker
                // that claims the channel see the identification.
                let won =
                    self.state[id.index()].compare_exchange(UNSEEN, IDENTIFIED, Ordering::AcqRel, Ordering::Relaxed);
                if won.is_err() {
                    return Err(RecvError::Handshake { error: DecodeError::DuplicateChannel { id: packet.id } });
                }
                // Relaxed: a count for `all_connected`; the state CAS above carries the ordering.
                self.identified.fetch_add(1, Ordering::Relaxed);
                Ok(Identity::Channel(id))
            }
        }
    }

    /// A connection closed after `have` bytes, before [`RecvSession::identify`] decided what it is.
    pub fn closed_unidentified(&self, have: usize) -> RecvError {
        RecvError::ClosedEarly { have }
    }

    /// Whether the main stream has connected.
    pub fn main_connected(&self) -> bool {
        // Acquire: a snapshot; pairs with the swap in `identify`.
        self.main_seen.load(Ordering::Acquire)
    }

    /// Whether channel `id` has connected.
    pub fn channel_connected(&self, id: ChannelId) -> bool {
        // Acquire: a snapshot; pairs with the CAS in `identify`.
        self.state.get(id.index()).is_some_and(|s| s.load(Ordering::Acquire) != UNSEEN)
    }

    /// Whether the main stream and every channel have connected.
    pub fn all_connected(&self) -> bool {
        // Relaxed: a count; `channel_connected` gives the ordered view per channel.
        self.main_connected() && self.identified.load(Ordering::Relaxed) == u32::from(self.cfg.channels)
    }

    /// The channel state machine for `id`'s worker; succeeds once per identified channel.
    pub fn channel(&self, id: ChannelId) -> Result<RecvChannel, RecvError> {
        let slot = self.state.get(id.index()).filter(|_| id.0 < self.cfg.channels);
        // AcqRel: the CAS hands the channel to exactly one worker and orders it after `identify`.
        match slot.map(|s| s.compare_exchange(IDENTIFIED, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)) {
            Some(Ok(_)) => Ok(RecvChannel::new(id, self.cfg.packet)),
            _ => Err(RecvError::ChannelClaim { channel: id }),
        }
    }

    /// For a channel parked at a SYNC ([`Want::Sync`](super::Want::Sync)): counts it in at the epoch
    /// barrier (once per SYNC) and, once the main stream released that epoch, lets it go on. Returns
    /// whether the channel may go on (also when it was not parked). Never waits.
    pub fn poll_sync(&self, ch: &mut RecvChannel) -> bool {
        if !ch.is_parked() {
            return true;
        }
        let Some(parked) = self.parked.get(ch.id().index()) else { return false };
        // Relaxed: the flag is this channel's own (only its worker writes it); others read it only
        // to name the channel in an error.
        if !parked.load(Ordering::Relaxed) {
            parked.store(true, Ordering::Relaxed);
            self.barrier.arrive();
        }
        if !self.barrier.is_released(ch.stats().syncs) {
            return false;
        }
        // Relaxed: as above.
        parked.store(false, Ordering::Relaxed);
        ch.synced();
        true
    }

    /// [`RecvSession::poll_sync`] until the channel may go on; fails when the migration terminates.
    pub fn wait_sync<W: Wake + ?Sized>(&self, waker: &W, ch: &mut RecvChannel) -> Result<(), RecvError> {
        let (id, epoch) = (ch.id(), ch.stats().syncs);
        self.coord
            .wait_until(waker, id, || self.poll_sync(ch))
            .map_err(|_| RecvError::Epoch(EpochError::Cancelled { epoch }))
    }

    /// Channel `ch`'s worker stops: its connection closed (`closed`: the end is checked, and a cut
    /// inside a packet or at an unreleased SYNC is recorded as the migration's error), or it stops
    /// for another reason (the migration is terminating, or the worker failed: record that error
    /// first, so that a main stream waiting at a marker sees the migration terminating rather than a
    /// channel that ended). Call it exactly once per claimed channel.
    pub fn channel_done<W: Wake + ?Sized>(&self, waker: &W, ch: &RecvChannel, closed: bool)
    where
        E: From<RecvError>,
    {
        let end = if closed { ch.finish() } else { Ok(()) };
        let clean = closed && end.is_ok();
        if let Err(e) = end {
            self.coord.record_error(waker, E::from(e));
        }
        let i = ch.id().index();
        self.stats.lock(|s| {
            if let Some(slot) = s.get_mut(i) {
                *slot = ch.stats();
            }
        });
        if let Some(state) = self.state.get(i) {
            // Release: `finish` Acquire-loads it after the join (the join orders it anyway).
            state.store(if clean { ENDED } else { STOPPED }, Ordering::Release);
        }
        self.barrier.channel_ended();
        // Release: the main stream's Acquire count in `poll_channels` sees the stats written above.
        self.done.fetch_add(1, Ordering::Release);
    }

    /// Counters of channel `id` as its worker left them (zero until [`RecvSession::channel_done`]).
    pub fn channel_stats(&self, id: ChannelId) -> ChannelStats {
        self.stats.lock(|s| s.get(id.index()).copied().unwrap_or_default())
    }

    /// The migration's totals so far: channels that have ended and the main stream.
    pub fn totals<const B: usize>(&self, main: &MainStream<B>) -> Totals {
        let m = main.stats();
        let mut t = Totals { epochs: self.epochs(), main: m, ..Totals::default() };
        self.stats.lock(|s| {
            for c in s.iter().take(usize::from(self.cfg.channels)) {
                t.packets += c.packets;
                t.normal_pages += c.normal_pages;
                t.zero_pages += c.zero_pages;
                t.channel_bytes += c.bytes;
            }
        });
        t.normal_pages += m.pages;
        t.zero_pages += m.zero_pages;
        t
    }

    /// The completion checks, after the lifecycle's cleanup joined every worker (`joined`, the token
    /// of this session's own lifecycle), for a migration that recorded no error. In order: no worker panicked; the main stream ended at its
    /// EOF; every channel's stream ended at a packet boundary with as many SYNCs as the main stream
    /// had markers; every page of every block was received. Returns the totals, or the first
    /// condition that failed.
    pub fn finish<M: GuestMemory + ?Sized, const N: usize, const B: usize>(
        &self,
        joined: &AllJoined<'_>,
        main: &MainStream<B>,
        table: &BlockTable<'_, M, N>,
    ) -> Result<Totals, RecvError> {
        joined.covers(self.coord.id()).map_err(RecvError::ForeignToken)?;
        if self.coord.error().is_some() {
            return Err(RecvError::Terminated);
        }
        let panicked = joined.report().panicked;
        if panicked > 0 {
            return Err(RecvError::WorkerPanicked { count: panicked });
        }
        if main.phase != Phase::Ended {
            return Err(RecvError::MainNotEnded);
        }
        let markers = main.stats().markers;
        for (i, state) in self.state.iter().enumerate().take(usize::from(self.cfg.channels)) {
            let channel = ChannelId(i as u8);
            // Acquire: pairs with `channel_done`'s Release store.
            if state.load(Ordering::Acquire) != ENDED {
                return Err(RecvError::ChannelNotEnded { channel });
            }
            let syncs = self.channel_stats(channel).syncs;
            if syncs != markers {
                return Err(RecvError::Epoch(EpochError::Unpaired { channel, syncs, markers }));
            }
        }
        for (_, b) in table.iter() {
            let (received, pages) = (b.bitmap().count() as u64, b.pages() as u64);
            if received != pages {
                return Err(RecvError::Incomplete { block: *b.name(), received, pages });
            }
        }
        Ok(self.totals(main))
    }

    fn parked_channel(&self) -> ChannelId {
        // Relaxed: a snapshot to name the channel in the error; the barrier decided the failure.
        let i = self.parked.iter().position(|p| p.load(Ordering::Relaxed)).unwrap_or(0);
        ChannelId(i as u8)
    }
}

/// What an incoming migration moved, from [`RecvSession::totals`] and [`RecvSession::finish`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Totals {
    /// Sync epochs released.
    pub epochs: u32,
    /// Multifd packets.
    pub packets: u64,
    /// Pages received as data, on the channels and the main stream.
    pub normal_pages: u64,
    /// Zero pages received, on the channels and the main stream.
    pub zero_pages: u64,
    /// Bytes the channels consumed (headers and payloads, after their init packets).
    pub channel_bytes: u64,
    /// The main stream's counters.
    pub main: MainStats,
}

/// One entry of the block list, as declared by the source and checked by the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    /// The block's name.
    pub name: BlockName,
    /// Its used length in bytes.
    pub used_length: u64,
}

/// What [`MainStream::read_block_list`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlockListStep {
    /// Input bytes consumed.
    pub used: usize,
    /// Whether the list is complete: map [`MainStream::declared`], then [`MainStream::start`]. The
    /// rest of the input belongs to [`MainStream::feed`].
    pub complete: bool,
}

/// What [`MainStream::feed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MainStep {
    /// Input bytes consumed.
    pub used: usize,
    /// Where the main stream stands.
    pub state: MainState,
}

/// Where a running main stream stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MainState {
    /// Keep feeding.
    Running,
    /// At a sync marker whose epoch the channels have not all reached: nothing more is consumed until
    /// [`MainStream::poll_marker`] (or [`MainStream::wait_marker`]) releases it.
    AtMarker,
    /// The EOF record was applied; what may follow is the JSON description. Keep feeding until the
    /// connection closes, then call [`MainStream::end`].
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    BlockList,
    Listed,
    Running,
    AtMarker,
    Ended,
}

/// The main stream of a receive session, owned by the one thread that reads it. `B` is the most
/// blocks its list may declare.
pub struct MainStream<const B: usize> {
    parser: StreamParser,
    recv: MainRecv,
    phase: Phase,
    list: List<B>,
}

/// The block list as declared so far.
#[derive(Debug)]
struct List<const B: usize> {
    declared: [Option<Declared>; B],
    count: usize,
    total: u64,
}

impl<const B: usize> fmt::Debug for MainStream<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MainStream")
            .field("phase", &self.phase)
            .field("position", &self.parser.position())
            .field("blocks", &self.list.count)
            .field("stats", &self.recv.stats())
            .finish_non_exhaustive()
    }
}

impl<const B: usize> MainStream<B> {
    /// A main stream at its first byte, for `session`'s page size.
    pub fn new<H, E, const MAX: usize>(session: &RecvSession<H, E, MAX>) -> Self {
        Self {
            parser: StreamParser::new(StreamConfig::new(session.cfg.packet.geometry)),
            recv: MainRecv::new(SyncMode::Auto),
            phase: Phase::BlockList,
            list: List { declared: [None; B], count: 0, total: 0 },
        }
    }

    /// Bytes of the main stream consumed so far.
    pub fn position(&self) -> u64 {
        self.parser.position()
    }

    /// The main stream's counters.
    pub fn stats(&self) -> MainStats {
        self.recv.stats()
    }

    /// Whether the EOF record was seen.
    pub fn saw_eof(&self) -> bool {
        self.recv.saw_eof()
    }

    /// The blocks declared so far, in the order of the list.
    pub fn declared(&self) -> impl Iterator<Item = &Declared> {
        self.list.iter()
    }

    /// Reads the start of the main stream up to the end of its block list, checking each entry. Call
    /// with more input until it says `complete`.
    pub fn read_block_list<H, E, const MAX: usize>(
        &mut self,
        session: &RecvSession<H, E, MAX>,
        mut input: &[u8],
    ) -> Result<BlockListStep, RecvError> {
        let mut used = 0;
        while self.phase == Phase::BlockList && !input.is_empty() {
            let item = self.parser.item_position();
            let (n, ev) = self.parser.feed(input).map_err(|error| RecvError::MainStream { position: item, error })?;
            used += n;
            input = &input[n..];
            match ev {
                Some(Event::RamTotal { total: 0 }) => return Err(RecvError::BlockList(BlockListError::Empty)),
                Some(Event::BlockDeclared { name, used_length }) => {
                    let page_size = session.cfg.packet.geometry.page_size();
                    let limit = session.cfg.max_ram;
                    self.list.declare(name, used_length, page_size, limit).map_err(RecvError::BlockList)?;
                    if !self.parser.in_block_list() {
                        self.phase = Phase::Listed;
                    }
                }
                Some(Event::Command { cmd: OPEN_RETURN_PATH, .. }) => {
                    return Err(RecvError::ReturnPath { position: self.parser.item_position() });
                }
                Some(
                    Event::ZeroPage { .. } | Event::PageData { .. } | Event::Eof | Event::MultifdFlush | Event::Eos,
                ) => {
                    let position = self.parser.item_position();
                    return Err(RecvError::BlockList(BlockListError::DataBeforeList { position }));
                }
                _ => {}
            }
        }
        Ok(BlockListStep { used, complete: self.phase != Phase::BlockList })
    }

    /// Starts applying the stream to `table`, which the embedder built for [`MainStream::declared`]:
    /// every declared block must be in it with the declared used length, and nothing else.
    pub fn start<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        table: &BlockTable<'_, M, N>,
    ) -> Result<(), RecvError> {
        if self.phase != Phase::Listed {
            return Err(RecvError::BlockList(BlockListError::NotComplete));
        }
        for d in self.declared() {
            let same = table.find(d.name.as_bytes()).is_some_and(|(_, b)| b.used_len() as u64 == d.used_length);
            if !same {
                return Err(RecvError::BlockList(BlockListError::TableMismatch { block: d.name }));
            }
        }
        if table.len() != self.list.count {
            let extra = table.iter().map(|(_, b)| b.name()).find(|n| !self.declared().any(|d| d.name == **n));
            // A table of as many blocks holding every declared one has no extra block; then the
            // count differs through a duplicate in the table, named by the first declared block.
            let first = self.declared().next().map(|d| d.name);
            let Some(block) = extra.copied().or(first) else {
                return Err(RecvError::BlockList(BlockListError::NotComplete));
            };
            return Err(RecvError::BlockList(BlockListError::TableMismatch { block }));
        }
        self.phase = Phase::Running;
        Ok(())
    }

    /// Feeds main-stream input after the block list: applies its records to `table` and, at each sync
    /// marker, releases the epoch if every channel has reached it. Consumes nothing while
    /// [`MainState::AtMarker`].
    pub fn feed<M: GuestMemory + ?Sized, const N: usize, H, E, const MAX: usize>(
        &mut self,
        session: &RecvSession<H, E, MAX>,
        mut input: &[u8],
        table: &BlockTable<'_, M, N>,
    ) -> Result<MainStep, RecvError> {
        let mut used = 0;
        loop {
            match self.phase {
                Phase::BlockList | Phase::Listed => return Err(RecvError::BlockList(BlockListError::NotComplete)),
                Phase::Ended => return Ok(MainStep { used, state: MainState::Eof }),
                Phase::AtMarker => {
                    if !self.poll_marker(session)? {
                        return Ok(MainStep { used, state: MainState::AtMarker });
                    }
                }
                Phase::Running => {}
            }
            if input.is_empty() {
                let state = if self.recv.saw_eof() { MainState::Eof } else { MainState::Running };
                return Ok(MainStep { used, state });
            }
            let item = self.parser.item_position();
            let (n, ev) = self.parser.feed(input).map_err(|error| RecvError::MainStream { position: item, error })?;
            used += n;
            input = &input[n..];
            let Some(ev) = ev else { continue };
            match ev {
                Event::RamTotal { .. } => {
                    let position = self.parser.item_position();
                    return Err(RecvError::BlockList(BlockListError::Repeated { position }));
                }
                Event::PageData { .. } => {
                    return Err(RecvError::NotMultifd { position: self.parser.item_position() });
                }
                Event::Command { cmd: OPEN_RETURN_PATH, .. } => {
                    return Err(RecvError::ReturnPath { position: self.parser.item_position() });
                }
                _ => {}
            }
            if self.recv.on_event(&ev, table)? == MainAction::Marker {
                self.phase = Phase::AtMarker;
            }
        }
    }

    /// Looks ahead through `input`, the bytes right after what [`MainStream::feed`] consumed, without
    /// applying them: fails if they hold what `feed` will refuse for the source's configuration (a
    /// page on the main stream: no multifd; a return-path request). For a receiver still waiting for
    /// its channels at a marker, so that a source that will never open them is told at once.
    /// Anything else wrong in `input` is left for `feed` to report where it is.
    pub fn scan_ahead(&self, mut input: &[u8]) -> Result<(), RecvError> {
        let mut parser = self.parser.clone();
        while !input.is_empty() {
            let Ok((n, ev)) = parser.feed(input) else { return Ok(()) };
            input = &input[n..];
            let (page, return_path, eof) = match ev {
                Some(Event::PageData { .. }) => (true, false, false),
                Some(Event::Command { cmd: OPEN_RETURN_PATH, .. }) => (false, true, false),
                Some(Event::Eof) => (false, false, true),
                _ => (false, false, false),
            };
            let position = parser.item_position();
            if page {
                return Err(RecvError::NotMultifd { position });
            }
            if return_path {
                return Err(RecvError::ReturnPath { position });
            }
            if eof {
                return Ok(());
            }
        }
        Ok(())
    }

    /// At a sync marker: releases the epoch if every channel has reached its SYNC. Returns whether
    /// the stream may go on (also when it was not at a marker). Never waits.
    pub fn poll_marker<H, E, const MAX: usize>(&mut self, session: &RecvSession<H, E, MAX>) -> Result<bool, RecvError> {
        if self.phase != Phase::AtMarker {
            return Ok(true);
        }
        match session.barrier.try_release()? {
            Some(_) => {
                self.phase = Phase::Running;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// [`MainStream::poll_marker`] until the epoch is released; fails when the migration terminates.
    /// `idle_as` names the channel whose [`Wake::idle`] the wait uses.
    pub fn wait_marker<H, E, W: Wake + ?Sized, const MAX: usize>(
        &mut self,
        session: &RecvSession<H, E, MAX>,
        waker: &W,
        idle_as: ChannelId,
    ) -> Result<(), RecvError> {
        let cancelled = || RecvError::Epoch(EpochError::Cancelled { epoch: session.epochs() + 1 });
        wait_poll(&session.coord, waker, idle_as, || self.poll_marker(session), cancelled)
    }

    /// The main stream's connection closed: clean only after its EOF record, at an item boundary.
    /// Calling it again after a clean end is harmless (it answers `Ok` again).
    pub fn end(&mut self) -> Result<(), RecvError> {
        self.parser.finish().map_err(|error| RecvError::MainClosed { position: self.parser.position(), error })?;
        self.phase = Phase::Ended;
        Ok(())
    }

    /// After [`MainStream::end`]: whether every channel's worker has stopped. Fails when a channel is
    /// parked at a SYNC, which no marker can release any more.
    pub fn poll_channels<H, E, const MAX: usize>(&self, session: &RecvSession<H, E, MAX>) -> Result<bool, RecvError> {
        if self.phase != Phase::Ended {
            return Err(RecvError::MainNotEnded);
        }
        // Acquire: pairs with the Release increments of `channel_done`.
        if session.done.load(Ordering::Acquire) >= u32::from(session.cfg.channels) {
            return Ok(true);
        }
        if session.barrier.channel_waiting() {
            let channel = session.parked_channel();
            return Err(RecvError::SyncWithoutMarker { channel, markers: self.stats().markers });
        }
        Ok(false)
    }

    /// [`MainStream::poll_channels`] until every channel's worker has stopped; fails as it does, or
    /// when the migration terminates.
    pub fn wait_channels<H, E, W: Wake + ?Sized, const MAX: usize>(
        &self,
        session: &RecvSession<H, E, MAX>,
        waker: &W,
        idle_as: ChannelId,
    ) -> Result<(), RecvError> {
        wait_poll(&session.coord, waker, idle_as, || self.poll_channels(session), || RecvError::Terminated)
    }
}

/// Runs `poll` inside the lifecycle's wait until it answers `Ok(true)` or fails; `cancelled()` if the
/// migration terminates first.
fn wait_poll<H, E, W: Wake + ?Sized, const MAX: usize>(
    coord: &Coordinator<H, E, MAX>,
    waker: &W,
    idle_as: ChannelId,
    mut poll: impl FnMut() -> Result<bool, RecvError>,
    cancelled: impl FnOnce() -> RecvError,
) -> Result<(), RecvError> {
    let mut outcome = Ok(false);
    let waited = coord.wait_until(waker, idle_as, || {
        outcome = poll();
        !matches!(outcome, Ok(false))
    });
    match (waited, outcome) {
        (_, Err(e)) => Err(e),
        (Ok(()), Ok(_)) => Ok(()),
        (Err(_), Ok(_)) => Err(cancelled()),
    }
}

impl<const B: usize> List<B> {
    fn iter(&self) -> impl Iterator<Item = &Declared> {
        self.declared.iter().take(self.count).flatten()
    }

    fn declare(&mut self, name: &[u8], used_length: u64, page_size: u32, limit: u64) -> Result<(), BlockListError> {
        let checked = BlockName::new(name).map_err(|error| BlockListError::BadName { error })?;
        let block = checked;
        if used_length == 0 || !used_length.is_multiple_of(u64::from(page_size)) {
            let error = BlockError::BadUsedLength { used_len: used_length, page_size };
            return Err(BlockListError::BadBlock { block, error });
        }
        if self.iter().any(|d| d.name == checked) {
            return Err(BlockListError::DuplicateBlock { block });
        }
        let total = self.total.saturating_add(used_length);
        if total > limit {
            return Err(BlockListError::TooMuchRam { block, size: used_length, total, limit });
        }
        let slot = self.declared.get_mut(self.count).ok_or(BlockListError::TooManyBlocks { max: B })?;
        *slot = Some(Declared { name: checked, used_length });
        self.count += 1;
        self.total = total;
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::wire::Geometry;
    use loom::sync::Arc;
    use loom::thread;

    fn session() -> Arc<RecvSession<(), RecvError, 2>> {
        let packet = PacketConfig::new(Geometry::new(4096).unwrap());
        Arc::new(RecvSession::new(SessionConfig::new(2, packet)).unwrap())
    }

    /// Two connections race with the same channel id, and two with the main stream's magic: each
    /// role goes to exactly one of them, and the other gets the duplicate error.
    #[test]
    fn loom_identification_gives_each_role_to_one_connection() {
        loom::model(|| {
            let s = session();
            let mut init = [0u8; INIT_PACKET_LEN];
            InitPacket { uuid: [0; 16], id: 1 }.encode(&mut init).unwrap();
            let s2 = s.clone();
            let t = thread::spawn(move || (s2.identify(&init), s2.identify(b"QEVM")));
            let (mine, main) = (s.identify(&init), s.identify(b"QEVM"));
            let (theirs, their_main) = t.join().unwrap();
            let dup = Err(RecvError::Handshake { error: DecodeError::DuplicateChannel { id: 1 } });
            assert!(
                (mine == Ok(Identity::Channel(ChannelId(1))) && theirs == dup)
                    || (theirs == Ok(Identity::Channel(ChannelId(1))) && mine == dup)
            );
            assert!(
                (main == Ok(Identity::Main) && their_main == Err(RecvError::DuplicateMain))
                    || (their_main == Ok(Identity::Main) && main == Err(RecvError::DuplicateMain))
            );
            assert!(s.channel_connected(ChannelId(1)) && !s.channel_connected(ChannelId(0)));
        });
    }

    /// Two workers claim one identified channel: exactly one gets it.
    #[test]
    fn loom_a_channel_is_claimed_once() {
        loom::model(|| {
            let s = session();
            let mut init = [0u8; INIT_PACKET_LEN];
            InitPacket { uuid: [0; 16], id: 0 }.encode(&mut init).unwrap();
            s.identify(&init).unwrap();
            let s2 = s.clone();
            let t = thread::spawn(move || s2.channel(ChannelId(0)).is_ok());
            let mine = s.channel(ChannelId(0)).is_ok();
            let theirs = t.join().unwrap();
            assert!(mine ^ theirs, "claimed by both or by neither");
        });
    }
}
