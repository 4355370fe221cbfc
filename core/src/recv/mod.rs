//! The receive engine: multifd channels and the main stream of an incoming migration, sans I/O.
//!
//! - [`RecvChannel`]: one multifd channel after its init packet. It says what it wants next
//!   ([`RecvChannel::want`]): the rest of a packet header, or exactly the bytes of the guest page the
//!   next payload bytes belong to, so the embedder reads them straight into guest memory with no
//!   intermediate copy; [`RecvChannel::advance`] is then told how many bytes arrived. It validates
//!   every header against the block table, applies zero pages, sets bitmap bits, and at a SYNC
//!   packet first takes the packet's pages and then asks to park ([`Want::Sync`]).
//! - [`RecvSession`] and [`MainStream`]: the whole receive (see the [`session`] module docs): which
//!   connection is which, the block list, epochs, ends and the completion checks. Embedders drive
//!   these; the pieces below are what the session is built from.
//! - [`EpochBarrier`]: pairs every channel's SYNC with one main-stream marker. Channels are released
//!   from epoch k only when all N reached their k-th SYNC and the main stream reached its k-th
//!   marker; the session's waits go through [`Coordinator::wait_until`](crate::lifecycle::Coordinator::wait_until),
//!   so a failure anywhere cancels them.
//! - The main-stream applier (private): applies main-stream [`Event`](crate::wire::Event)s (zero pages and pages on
//!   the main channel, sync markers, EOF) to the block table, and tells whether the sender marks
//!   epochs with `MULTIFD_FLUSH` or, as QEMU 7.2 does, with every RAM `EOS`.
//!
//! Nothing here allocates or does I/O. Peer input never panics and never writes outside a block:
//! every offset is checked against the block's used length before it is turned into an address.
//!
//! ```
//! use multifd_core::bitmap::{AtomicWord, PageIndex, words_for};
//! use multifd_core::block::{AtomicRegion, AtomicU8, BlockSpec, BlockTable, ZeroPagePolicy};
//! use multifd_core::lifecycle::ChannelId;
//! use multifd_core::recv::{RecvChannel, Want};
//! use multifd_core::wire::{Flags, Geometry, Layout, PacketConfig, RamHeader};
//!
//! let geo = Geometry::new(4096)?;
//! let mem: Vec<AtomicU8> = (0..4 * 4096).map(|_| AtomicU8::new(0)).collect();
//! let region = AtomicRegion::new(&mem);
//! let words: [AtomicWord; 1] = [const { AtomicWord::new(0) }; words_for(4)];
//! let mut table: BlockTable<'_, AtomicRegion<'_>, 2> = BlockTable::new(ZeroPagePolicy::SkipUntouched);
//! table.add(&BlockSpec { name: b"m0", used_len: 4 * 4096, page_size: geo, memory_zeroed: true }, &region, &words)?;
//!
//! // One packet: page 2 as data, page 3 as a zero page, with the SYNC flag.
//! let mut wire = vec![0u8; geo.header_len()];
//! RamHeader { flags: Flags(Flags::SYNC), pages_alloc: 128, normal_pages: 1, next_packet_size: 4096,
//!             packet_num: 0, zero_pages: 1, block: b"m0" }
//!     .encode(&[2 * 4096, 3 * 4096], geo, Layout::V9_0, &mut wire)?;
//! wire.extend_from_slice(&[7u8; 4096]);
//!
//! let mut ch = RecvChannel::new(ChannelId(0), PacketConfig::new(geo));
//! let used = ch.receive_bytes(&wire, &table)?;
//! assert_eq!(used, wire.len());
//! assert!(matches!(ch.want(), Want::Sync), "pages first, then park");
//! let block = table.find(b"m0").unwrap().1;
//! assert!(block.bitmap().test(PageIndex::new(2))? && block.bitmap().test(PageIndex::new(3))?);
//! ch.synced();
//! ch.finish()?; // a clean end: at a packet boundary
//! # Ok::<(), Box<dyn core::error::Error>>(())
//! ```

mod epoch;
mod main;
pub mod session;

pub use epoch::{EpochBarrier, EpochError};
pub use main::MainStats;
pub(crate) use main::{MainAction, MainRecv, SyncMode};
pub use session::{
    BlockListStep, Declared, Identity, MainState, MainStep, MainStream, RecvSession, SessionConfig, Totals,
};

use core::fmt;

use crate::bitmap::PageIndex;
use crate::block::{BlockError, BlockId, BlockName, BlockTable, GuestMemory};
use crate::codec::{CodecError, Decompress};
use crate::lifecycle::{ChannelId, ForeignToken};
use crate::wire::packet::COMMON_HEADER_LEN;
use crate::wire::{
    BlockInfo, CommonHeader, Compression, DecodeError, Field, Geometry, MAX_HEADER_LEN, Offsets, Packet, PacketConfig,
    StreamError,
};

/// Where a channel's stream ended when it was not at a packet boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Cut {
    /// Inside a packet header.
    Header {
        /// Header bytes received.
        have: u32,
        /// Header bytes needed.
        need: u32,
    },
    /// Inside the page data of a RAM packet.
    Page {
        /// Index of the page within the packet's normal pages.
        index: u32,
        /// Normal pages in the packet.
        normal: u32,
    },
    /// Inside the payload of a device-state packet.
    DeviceState {
        /// Bytes still missing.
        left: u64,
    },
    /// Parked at a SYNC packet that was never released.
    Sync,
    /// Before the compressed payload of a RAM packet was complete.
    Compressed {
        /// Payload bytes (`next_packet_size`).
        len: u32,
        /// Normal pages in the packet.
        normal: u32,
    },
}

/// Why receiving failed. Every variant names the channel (or the main stream) and the values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum RecvError {
    /// A packet header failed validation.
    Packet {
        /// The channel.
        channel: ChannelId,
        /// Index of the packet on this channel, from 0.
        packet: u64,
        /// What was wrong.
        error: DecodeError,
    },
    /// A page could not be applied to its block.
    Block {
        /// The channel.
        channel: ChannelId,
        /// Index of the packet on this channel.
        packet: u64,
        /// The block's name.
        block: BlockName,
        /// What was wrong.
        error: BlockError,
    },
    /// The channel's stream ended inside a packet.
    Truncated {
        /// The channel.
        channel: ChannelId,
        /// Index of the unfinished packet.
        packet: u64,
        /// Where it stopped.
        cut: Cut,
    },
    /// `advance` was called with more bytes than `want` asked for.
    Overrun {
        /// The channel.
        channel: ChannelId,
        /// Bytes reported.
        got: usize,
        /// Bytes wanted.
        wanted: usize,
    },
    /// The main stream could not be parsed.
    MainStream {
        /// Byte position of the failing item.
        position: u64,
        /// What was wrong.
        error: StreamError,
    },
    /// A main-stream record names a block the receiver does not have.
    MainUnknownBlock {
        /// The name.
        block: BlockName,
    },
    /// A main-stream record names a block by a name no block can have (empty, or with a NUL).
    MainBadBlockName {
        /// Why the name is not a block name ([`BlockError::BadNameLength`] or
        /// [`BlockError::NulInName`]).
        error: BlockError,
    },
    /// A main-stream page or zero page could not be applied.
    MainBlock {
        /// The block.
        block: BlockName,
        /// Byte offset of the page.
        offset: u64,
        /// What was wrong.
        error: BlockError,
    },
    /// An epoch did not pair up.
    Epoch(EpochError),
    /// A connection's first bytes or its init packet were refused (magic, version, channel id out
    /// of range or already connected, uuid).
    Handshake {
        /// What was wrong.
        error: DecodeError,
    },
    /// A second connection began with the main stream's magic.
    DuplicateMain,
    /// A connection closed before it could be identified.
    ClosedEarly {
        /// Bytes it had sent.
        have: usize,
    },
    /// The main stream's block list is unusable.
    BlockList(BlockListError),
    /// The main stream's connection closed before the stream's end (inside a record, or before its
    /// EOF record).
    MainClosed {
        /// Bytes of the main stream received.
        position: u64,
        /// What the parser still needed.
        error: StreamError,
    },
    /// The main stream ended while a channel was parked at a SYNC that no marker can release now.
    SyncWithoutMarker {
        /// The channel.
        channel: ChannelId,
        /// Markers the main stream had.
        markers: u32,
    },
    /// A worker asked for a channel that was not identified, or that another worker has.
    ChannelClaim {
        /// The channel.
        channel: ChannelId,
    },
    /// At the end: the main stream has not ended (its end was not reported).
    MainNotEnded,
    /// At the end: a channel's stream did not end cleanly at a packet boundary.
    ChannelNotEnded {
        /// The channel.
        channel: ChannelId,
    },
    /// At the end: pages of a block were never received.
    Incomplete {
        /// The block.
        block: BlockName,
        /// Pages received.
        received: u64,
        /// Pages in the block.
        pages: u64,
    },
    /// At the end: channel workers panicked.
    WorkerPanicked {
        /// How many.
        count: u8,
    },
    /// At the end: the all-joined token given to `finish` is another coordinator's.
    ForeignToken(ForeignToken),
    /// At the end: the migration was terminated by an error recorded in the session's coordinator
    /// (that error is the migration's; this one only says the completion checks did not run).
    Terminated,
    /// The source asked for a return path (QEMU's `return-path` capability, command 1 on the main
    /// stream). This receiver never answers on one, and the source would wait for the answer.
    ReturnPath {
        /// Main-stream offset of the command's header (after its section-type byte).
        position: u64,
    },
    /// A page with its data arrived on the main stream: the source is not using multifd (QEMU sends
    /// every page on its channels when it does), so no channel will carry the pages.
    NotMultifd {
        /// Main-stream offset of the page's data.
        position: u64,
    },
    /// A compressed payload could not be decompressed into the packet's pages.
    Codec {
        /// The channel.
        channel: ChannelId,
        /// Index of the packet on this channel.
        packet: u64,
        /// The packet's method.
        method: Compression,
        /// What was wrong.
        error: CodecError,
    },
    /// A channel's packets changed compression method (QEMU uses one per migration).
    MethodChanged {
        /// The channel.
        channel: ChannelId,
        /// Index of the packet on this channel.
        packet: u64,
        /// The method of the channel's earlier data packets.
        was: Compression,
        /// This packet's.
        now: Compression,
    },
    /// A compressed packet reached an embedder that has no decompressor for its method
    /// ([`RecvChannel::receive_bytes`] has none; accept only [`Accept::NONE`](crate::codec::Accept::NONE) there).
    NoDecompressor {
        /// The channel.
        channel: ChannelId,
        /// Index of the packet on this channel.
        packet: u64,
        /// The packet's method.
        method: Compression,
    },
}

/// Why a block list was refused (see [`RecvError::BlockList`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum BlockListError {
    /// RAM data, a sync marker or EOF came before the block list was complete.
    DataBeforeList {
        /// Byte position of the record in the main stream.
        position: u64,
    },
    /// The MEM_SIZE total is zero: no blocks.
    Empty,
    /// More blocks than the receiver has room for.
    TooManyBlocks {
        /// The receiver's capacity.
        max: usize,
    },
    /// A block's name is invalid (empty, too long, or with a NUL byte).
    BadName {
        /// What was wrong.
        error: BlockError,
    },
    /// A block's used length is invalid.
    BadBlock {
        /// The block.
        block: BlockName,
        /// What was wrong.
        error: BlockError,
    },
    /// Two entries of the list have one name.
    DuplicateBlock {
        /// The name.
        block: BlockName,
    },
    /// The list declares more RAM than the receiver's limit.
    TooMuchRam {
        /// The block that crossed the limit.
        block: BlockName,
        /// Its used length.
        size: u64,
        /// Bytes declared so far, this block included.
        total: u64,
        /// The limit.
        limit: u64,
    },
    /// A second block list arrived after the first one was complete.
    Repeated {
        /// Byte position of its MEM_SIZE record.
        position: u64,
    },
    /// The block table the embedder built does not match the declared list.
    TableMismatch {
        /// The first declared block missing from the table or different in it (or the table's
        /// block the list does not declare).
        block: BlockName,
    },
    /// The block table was started before the block list was complete.
    NotComplete,
}

impl fmt::Display for BlockListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DataBeforeList { position } => {
                write!(f, "RAM data or a marker at byte {position} before the block list was complete")
            }
            Self::Empty => write!(f, "the block list declares no RAM (MEM_SIZE total 0)"),
            Self::TooManyBlocks { max } => write!(f, "more than {max} blocks declared"),
            Self::BadName { error } => write!(f, "a block name: {error}"),
            Self::BadBlock { block, error } => write!(f, "block {block}: {error}"),
            Self::DuplicateBlock { block } => write!(f, "block {block} is declared twice"),
            Self::TooMuchRam { block, size, total, limit } => write!(
                f,
                "block {block}: declares {size} bytes, {total} bytes of RAM in all, above the limit of {limit} bytes"
            ),
            Self::Repeated { position } => write!(f, "a second block list at byte {position}"),
            Self::TableMismatch { block } => {
                write!(f, "block {block} of the block list is not in the destination's block table as declared")
            }
            Self::NotComplete => write!(f, "the block table was started before the block list was complete"),
        }
    }
}

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Cut::Header { have, need } => write!(f, "inside a packet header ({have} of {need} bytes)"),
            Cut::Page { index, normal } => write!(f, "inside page {index} of {normal} of a RAM packet"),
            Cut::DeviceState { left } => write!(f, "inside a device-state payload ({left} bytes missing)"),
            Cut::Sync => write!(f, "parked at a SYNC packet no main-stream marker released"),
            Cut::Compressed { len, normal } => {
                write!(f, "inside the {len}-byte compressed payload of a packet of {normal} pages")
            }
        }
    }
}

impl fmt::Display for RecvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Packet { channel, packet, error } => write!(f, "{channel}: packet {packet}: {error}"),
            Self::Block { channel, packet, block, error } => {
                write!(f, "{channel}: packet {packet}: block {block}: {error}")
            }
            Self::Truncated { channel, packet, cut } => write!(
                f,
                "{channel}: stream ended {cut} (packet {packet}): closed by the sender (migration aborted by the peer or connection cut)"
            ),
            Self::Overrun { channel, got, wanted } => {
                write!(f, "{channel}: {got} bytes reported, only {wanted} were asked for")
            }
            Self::MainStream { position, error } => write!(f, "main stream at byte {position}: {error}"),
            Self::MainUnknownBlock { block } => write!(f, "main stream: unknown RAM block {block}"),
            Self::MainBadBlockName { error } => write!(f, "main stream: bad RAM block name: {error}"),
            Self::MainBlock { block, offset, error } => {
                write!(f, "main stream: block {block}, page at {offset:#x}: {error}")
            }
            Self::Epoch(e) => write!(f, "{e}"),
            Self::Handshake { error } => write!(f, "{error}"),
            Self::DuplicateMain => write!(f, "a second main stream connected"),
            Self::ClosedEarly { have } => write!(f, "closed after {have} bytes, before it could be identified"),
            Self::BlockList(e) => write!(f, "main stream: {e}"),
            Self::MainClosed { position, error } => write!(
                f,
                "main stream at byte {position}: {error}: closed by the sender (migration aborted by the peer or connection cut)"
            ),
            Self::SyncWithoutMarker { channel, markers } => write!(
                f,
                "{channel}: parked at SYNC {} but the main stream ended after {markers} sync markers",
                markers.saturating_add(1)
            ),
            Self::ChannelClaim { channel } => {
                write!(f, "{channel}: not identified, or its worker was already handed out")
            }
            Self::MainNotEnded => write!(f, "main stream: its end was never reported"),
            Self::ChannelNotEnded { channel } => write!(f, "{channel}: its stream did not end at a packet boundary"),
            Self::Incomplete { block, received, pages } => {
                write!(f, "block {block}: only {received} of {pages} pages were received")
            }
            Self::WorkerPanicked { count } => write!(f, "{count} channel worker(s) panicked"),
            Self::ForeignToken(e) => write!(f, "{e}"),
            Self::Terminated => write!(f, "the migration was terminated by an earlier error"),
            Self::ReturnPath { position } => write!(
                f,
                "main stream at byte {position}: the source opens a return path (command 1, QEMU's \
                 return-path capability), which this receiver does not answer: turn return-path off on the source"
            ),
            Self::Codec { channel, packet, method, error } => {
                write!(f, "{channel}: packet {packet}: {}: {error}", method.name())
            }
            Self::MethodChanged { channel, packet, was, now } => write!(
                f,
                "{channel}: packet {packet}: compression changed from {} to {} within the migration",
                was.name(),
                now.name()
            ),
            Self::NoDecompressor { channel, packet, method } => {
                write!(
                    f,
                    "{channel}: packet {packet}: compressed with {}, which this receiver cannot decode",
                    method.name()
                )
            }
            Self::NotMultifd { position } => write!(
                f,
                "main stream at byte {position}: a page with data on the main stream: the source is not \
                 using multifd (check its multifd capability: QEMU turns multifd off without a word when \
                 another capability rules it out)"
            ),
        }
    }
}

impl core::error::Error for RecvError {}

impl From<EpochError> for RecvError {
    fn from(e: EpochError) -> Self {
        Self::Epoch(e)
    }
}

/// Counters of one channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ChannelStats {
    /// Packets received (headers decoded).
    pub packets: u64,
    /// Normal (data) pages received.
    pub normal_pages: u64,
    /// Zero pages received.
    pub zero_pages: u64,
    /// Bytes consumed (headers and payloads).
    pub bytes: u64,
    /// SYNC packets received.
    pub syncs: u32,
    /// Payload bytes of compressed packets (what their pages took on the wire).
    pub compressed_bytes: u64,
    /// Normal pages that arrived compressed.
    pub compressed_pages: u64,
    /// The compression method of the channel's data packets, once one arrived.
    pub method: Option<Compression>,
}

/// A range of guest memory that page data goes to (see [`RecvChannel::pending_pages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// The block.
    pub block: BlockId,
    /// Byte offset in the block's memory.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

impl PageRange {
    /// An empty range, for initialising arrays.
    pub const EMPTY: Self = Self { block: BlockId::FIRST, offset: 0, len: 0 };
}

/// What a [`RecvChannel`] needs next.
#[derive(Debug)]
pub enum Want<'c> {
    /// Fill (a prefix of) this buffer with the next bytes of a packet header.
    Header(&'c mut [u8]),
    /// The next `len` bytes belong to `page` of `block`; write them at byte `offset` of the block's
    /// memory (inside that page).
    Page {
        /// The block.
        block: BlockId,
        /// The page.
        page: PageIndex,
        /// Byte offset in the block's memory where the next byte goes.
        offset: usize,
        /// Bytes still missing from the page.
        len: usize,
    },
    /// Read and drop `len` bytes (a device-state payload, which this engine does not interpret).
    Discard(usize),
    /// The next `len` bytes are the whole compressed payload of a RAM packet: read all of them into
    /// a buffer (at most [`RecvChannel::max_compressed`] bytes) and hand it to
    /// [`RecvChannel::decompress`] with this channel's decompressor for `method`.
    Compressed {
        /// Payload bytes.
        len: usize,
        /// The packet's method.
        method: Compression,
    },
    /// The channel reached a SYNC packet (its pages are applied): wait for the epoch's release
    /// ([`RecvSession::poll_sync`] / [`RecvSession::wait_sync`] do both: they count the channel in and
    /// call [`RecvChannel::synced`] once the epoch is released).
    Sync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Filling the header buffer up to `need` (12 until the common header is known).
    Header { have: usize, need: usize },
    /// Receiving normal page `index` of `normal`, at byte `offset` of `block` (whose page size is
    /// `geometry`); `at` bytes of it are in. Every offset of the packet (in the header buffer) was
    /// validated against `block` when the header arrived.
    Pages {
        block: BlockId,
        index: u32,
        normal: u32,
        page: PageIndex,
        offset: usize,
        at: usize,
        geometry: Geometry,
        sync: bool,
    },
    /// Dropping a device-state payload.
    Discard { left: u64 },
    /// Waiting for the `len`-byte compressed payload of a packet of `normal` pages in `block`.
    Compressed { block: BlockId, normal: u32, len: u32, geometry: Geometry, sync: bool, method: Compression },
    /// Parked at a SYNC packet.
    Sync,
}

/// One multifd channel of an incoming migration, after its init packet: a sans-I/O state machine
/// that owns its header buffer (no allocation) and writes pages into the shared block table.
pub struct RecvChannel {
    id: ChannelId,
    cfg: PacketConfig,
    /// The compression method of the channel's first packet with data pages.
    method: Option<Compression>,
    header: [u8; MAX_HEADER_LEN],
    phase: Phase,
    stats: ChannelStats,
}

impl fmt::Debug for RecvChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvChannel")
            .field("id", &self.id)
            .field("phase", &self.phase)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl RecvChannel {
    /// A channel that expects a packet header next.
    pub const fn new(id: ChannelId, cfg: PacketConfig) -> Self {
        Self {
            id,
            cfg,
            method: None,
            header: [0; MAX_HEADER_LEN],
            phase: Phase::Header { have: 0, need: COMMON_HEADER_LEN },
            stats: ChannelStats {
                packets: 0,
                normal_pages: 0,
                zero_pages: 0,
                bytes: 0,
                syncs: 0,
                compressed_bytes: 0,
                compressed_pages: 0,
                method: None,
            },
        }
    }

    /// The channel's id.
    pub const fn id(&self) -> ChannelId {
        self.id
    }

    /// Counters so far.
    pub const fn stats(&self) -> ChannelStats {
        self.stats
    }

    /// What the channel needs next.
    pub fn want(&mut self) -> Want<'_> {
        match self.phase {
            Phase::Header { have, need } => Want::Header(&mut self.header[have..need]),
            Phase::Pages { block, page, offset, at, geometry, .. } => {
                Want::Page { block, page, offset: offset + at, len: geometry.bytes() - at }
            }
            // A device-state payload is at most 4 GiB; a `usize` below 64 bits takes it in parts.
            Phase::Discard { left } => Want::Discard(usize::try_from(left).unwrap_or(usize::MAX)),
            Phase::Compressed { len, method, .. } => Want::Compressed { len: len as usize, method },
            Phase::Sync => Want::Sync,
        }
    }

    /// The compression method of the channel's data packets, once one arrived.
    pub const fn method(&self) -> Option<Compression> {
        self.method
    }

    /// The page size of this channel's packets in bytes: the scratch [`RecvChannel::decompress`]
    /// needs.
    pub fn page_size(&self) -> usize {
        self.cfg.geometry.bytes()
    }

    /// The largest compressed payload a packet can have with this channel's geometry: the buffer
    /// an embedder needs for [`Want::Compressed`].
    pub fn max_compressed(&self) -> usize {
        crate::codec::max_compressed_len(self.cfg.geometry.page_count() as usize * self.cfg.geometry.bytes())
    }

    fn wanted(&self) -> usize {
        match self.phase {
            Phase::Header { have, need } => need - have,
            Phase::Pages { at, geometry, .. } => geometry.bytes() - at,
            Phase::Discard { left } => usize::try_from(left).unwrap_or(usize::MAX),
            Phase::Compressed { .. } | Phase::Sync => 0,
        }
    }

    /// Reports that `n` bytes of what [`RecvChannel::want`] asked for have arrived (into the header
    /// buffer, into guest memory at the page's offset, or dropped). Decodes and applies a completed
    /// header; sets the bit of a completed page.
    pub fn advance<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        n: usize,
        table: &BlockTable<'_, M, N>,
    ) -> Result<(), RecvError> {
        let wanted = self.wanted();
        if n > wanted {
            return Err(RecvError::Overrun { channel: self.id, got: n, wanted });
        }
        self.stats.bytes += n as u64;
        match self.phase {
            Phase::Header { have, need } => {
                let have = have + n;
                self.phase = Phase::Header { have, need };
                if have < need {
                    return Ok(());
                }
                if need == COMMON_HEADER_LEN {
                    let common = CommonHeader::decode(&self.header[..COMMON_HEADER_LEN]).map_err(|e| self.bad(e))?;
                    let full = common.header_len(self.cfg.geometry);
                    if full > COMMON_HEADER_LEN {
                        self.phase = Phase::Header { have, need: full };
                        return Ok(());
                    }
                }
                self.on_header(need, table)
            }
            Phase::Pages { ref mut at, geometry, .. } => {
                *at += n;
                if *at < geometry.bytes() {
                    return Ok(());
                }
                self.page_done(table)
            }
            Phase::Discard { left } => {
                let left = left - n as u64;
                self.phase = Phase::Discard { left };
                if left == 0 {
                    self.next_header();
                }
                Ok(())
            }
            Phase::Compressed { .. } | Phase::Sync => Ok(()),
        }
    }

    fn bad(&self, error: DecodeError) -> RecvError {
        RecvError::Packet { channel: self.id, packet: self.stats.packets, error }
    }

    fn next_header(&mut self) {
        self.phase = Phase::Header { have: 0, need: COMMON_HEADER_LEN };
    }

    /// A whole header of `len` bytes is in the buffer.
    fn on_header<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        len: usize,
        table: &BlockTable<'_, M, N>,
    ) -> Result<(), RecvError> {
        let packet = match Packet::decode(&self.header[..len], &self.cfg) {
            Ok(p) => p,
            Err(e) => return Err(self.bad(e)),
        };
        let ram = match packet {
            Packet::DeviceState(h) => {
                let left = u64::from(h.next_packet_size);
                self.stats.packets += 1;
                self.phase = Phase::Discard { left };
                return Ok(());
            }
            Packet::Ram(ram) => ram,
        };
        let lookup = |name: &[u8]| {
            table.find(name).map(|(_, b)| BlockInfo { used_length: b.used_len() as u64, page_size: b.page_size() })
        };
        let hdr = *ram.header();
        // The one validation of this packet's offsets: each normal and zero offset is aligned to
        // the block's page size and leaves a whole page inside its used length (checked
        // arithmetic). The per-page steps below and in `page_done`/`pending_pages` rely on it.
        let checked = ram.check_pages(&lookup);
        let (id, sync, normal, zero) = (self.id, hdr.flags.is_sync(), hdr.normal_pages, hdr.zero_pages);
        let packet_no = self.stats.packets;
        checked.map_err(|error| RecvError::Packet { channel: id, packet: packet_no, error })?;
        self.stats.packets += 1;
        if sync {
            self.stats.syncs += 1;
        }
        let found = if ram.has_pages() { table.find(hdr.block) } else { None };
        let Some((block_id, block)) = found else {
            // No pages (check_pages looked nothing up): a SYNC parks, anything else is empty.
            self.finish_packet(sync);
            return Ok(());
        };
        let geometry = block.page_size();
        let block_err = |error| RecvError::Block { channel: id, packet: packet_no, block: *block.name(), error };
        for off in ram.zero_offsets() {
            let (page, _) = checked_page(off, geometry);
            debug_assert_eq!(block.page_at(off), Ok(page), "validated by check_pages");
            block.zero_page(page).map_err(block_err)?;
        }
        self.stats.zero_pages += u64::from(zero);
        let Some(first) = ram.normal_offsets().next() else {
            self.finish_packet(sync);
            return Ok(());
        };
        let method = ram.compression();
        match self.method {
            Some(was) if was != method => {
                return Err(RecvError::MethodChanged { channel: id, packet: packet_no, was, now: method });
            }
            _ => {
                self.method = Some(method);
                self.stats.method = Some(method);
            }
        }
        if method != Compression::None {
            // Decode checked 1 <= next_packet_size <= max_compressed_len(pages).
            let len = hdr.next_packet_size;
            self.phase = Phase::Compressed { block: block_id, normal, len, geometry, sync, method };
            return Ok(());
        }
        let (page, offset) = checked_page(first, geometry);
        debug_assert_eq!(block.page_at(first), Ok(page), "validated by check_pages");
        self.phase = Phase::Pages { block: block_id, index: 0, normal, page, offset, at: 0, geometry, sync };
        Ok(())
    }

    /// Decompresses the payload [`Want::Compressed`] asked for into the packet's pages: `input` is
    /// the whole payload, `codec` the channel's stream for its method, `scratch` a buffer of at least
    /// one page. Each page is decompressed into `scratch` and copied into guest memory through
    /// [`GuestMemory::write`], then its bit is set. The pages must come out exactly full and the
    /// payload must be used up; otherwise [`RecvError::Codec`].
    pub fn decompress<M: GuestMemory + ?Sized, D: Decompress + ?Sized, const N: usize>(
        &mut self,
        input: &[u8],
        codec: &mut D,
        scratch: &mut [u8],
        table: &BlockTable<'_, M, N>,
    ) -> Result<(), RecvError> {
        let Phase::Compressed { block, normal, len, geometry, sync, method } = self.phase else {
            return Err(RecvError::Overrun { channel: self.id, got: input.len(), wanted: 0 });
        };
        let (id, packet) = (self.id, self.stats.packets.saturating_sub(1));
        if input.len() != len as usize {
            return Err(RecvError::Overrun { channel: id, got: input.len(), wanted: len as usize });
        }
        let codec_err = |error| RecvError::Codec { channel: id, packet, method, error };
        if codec.method() != method {
            return Err(RecvError::NoDecompressor { channel: id, packet, method });
        }
        let ps = geometry.bytes();
        let Some(page_buf) = scratch.get_mut(..ps) else {
            return Err(codec_err(CodecError::Library { what: "scratch buffer smaller than a page" }));
        };
        // Local invariant: `block` came from this table in `on_header`; the table does not shrink.
        let Some(b) = table.get(block) else { return Ok(()) };
        let expected = u64::from(normal) * ps as u64;
        let mut rest = input;
        for i in 0..normal {
            let Some(off) = self.offsets().and_then(|o| o.get(i as usize)) else {
                let need = self.cfg.geometry.header_len();
                let error = DecodeError::Truncated { field: Field::Offsets, need, have: need };
                return Err(RecvError::Packet { channel: id, packet, error });
            };
            let produced = u64::from(i) * ps as u64;
            codec.decompress(&mut rest, page_buf, produced, expected).map_err(codec_err)?;
            // Validated against this block in `on_header`.
            let (page, offset) = checked_page(off, geometry);
            debug_assert_eq!(b.page_at(off), Ok(page), "validated by check_pages");
            b.memory().write(offset, page_buf);
            b.mark_received(page).map_err(|error| RecvError::Block { channel: id, packet, block: *b.name(), error })?;
            self.stats.normal_pages += 1;
            self.stats.compressed_pages += 1;
        }
        codec.end_packet(&mut rest, expected).map_err(codec_err)?;
        if !rest.is_empty() {
            return Err(codec_err(CodecError::Trailing { left: rest.len() as u64 }));
        }
        self.stats.bytes += u64::from(len);
        self.stats.compressed_bytes += u64::from(len);
        self.finish_packet(sync);
        Ok(())
    }

    fn finish_packet(&mut self, sync: bool) {
        if sync {
            self.phase = Phase::Sync;
        } else {
            self.next_header();
        }
    }

    /// The offset array of the RAM header in the buffer (decoded by `on_header`).
    fn offsets(&self) -> Option<Offsets<'_>> {
        Offsets::of_header(&self.header, self.cfg.geometry)
    }

    /// The current page is complete: publish it and move to the next one.
    fn page_done<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        table: &BlockTable<'_, M, N>,
    ) -> Result<(), RecvError> {
        let Phase::Pages { block, index, normal, page, geometry, sync, .. } = self.phase else {
            return Ok(());
        };
        let (id, packet) = (self.id, self.stats.packets.saturating_sub(1));
        // Local invariant: `block` came from this table in `on_header`; the table does not shrink.
        let Some(b) = table.get(block) else { return Ok(()) };
        let block_err = |error| RecvError::Block { channel: id, packet, block: *b.name(), error };
        b.mark_received(page).map_err(block_err)?;
        self.stats.normal_pages += 1;
        let next = index + 1;
        if next == normal {
            self.finish_packet(sync);
            return Ok(());
        }
        // `next < normal <= page_count`: the slot exists (decode checked the counts), so `None`
        // cannot happen; it is still a typed error rather than a panic.
        let Some(off) = self.offsets().and_then(|o| o.get(next as usize)) else {
            let need = self.cfg.geometry.header_len();
            let error = DecodeError::Truncated { field: Field::Offsets, need, have: need };
            return Err(RecvError::Packet { channel: id, packet, error });
        };
        // Validated against this block in `on_header`.
        let (page, offset) = checked_page(off, geometry);
        debug_assert_eq!(b.page_at(off), Ok(page), "validated by check_pages");
        self.phase = Phase::Pages { block, index: next, normal, page, offset, at: 0, geometry, sync };
        Ok(())
    }

    /// Where the rest of the current packet's page data goes, in wire order: fills `out` with up to
    /// `out.len()` ranges (the first one is the page [`Want::Page`] names, possibly partly filled)
    /// and returns how many. Lets an embedder read several pages with one vectored read; it then
    /// reports the bytes with [`RecvChannel::advance_many`]. Before a compressed payload
    /// ([`Want::Compressed`]) it lists every page the payload decompresses to, so an embedder can
    /// populate fresh memory first; [`RecvChannel::decompress`] then fills them. Returns 0 outside
    /// page data.
    ///
    /// The offsets were validated once, when the packet's header arrived; this only reads them.
    /// `table` is the table given to [`RecvChannel::advance`] (debug builds check the ranges
    /// against it).
    pub fn pending_pages<M: GuestMemory + ?Sized, const N: usize>(
        &self,
        table: &BlockTable<'_, M, N>,
        out: &mut [PageRange],
    ) -> usize {
        let (block, index, normal, offset, at, geometry) = match self.phase {
            Phase::Pages { block, index, normal, offset, at, geometry, .. } => {
                (block, index, normal, offset, at, geometry)
            }
            Phase::Compressed { block, normal, geometry, .. } => {
                let Some(first) = self.offsets().and_then(|o| o.get(0)) else { return 0 };
                (block, 0, normal, checked_page(first, geometry).1, 0, geometry)
            }
            _ => return 0,
        };
        let Some(offsets) = self.offsets() else { return 0 };
        let page_size = geometry.bytes();
        let mut n = 0;
        for (slot, i) in out.iter_mut().zip(index..normal) {
            let range = if i == index {
                PageRange { block, offset: offset + at, len: page_size - at }
            } else {
                let Some(off) = offsets.get(i as usize) else { break };
                let (page, start) = checked_page(off, geometry);
                debug_assert_eq!(table.get(block).map(|b| b.page_at(off)), Some(Ok(page)), "validated by check_pages");
                PageRange { block, offset: start, len: page_size }
            };
            *slot = range;
            n += 1;
        }
        n
    }

    /// [`RecvChannel::advance`] for `n` bytes that may span several of the wanted items (after a
    /// vectored read into the ranges of [`RecvChannel::pending_pages`]).
    pub fn advance_many<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        mut n: usize,
        table: &BlockTable<'_, M, N>,
    ) -> Result<(), RecvError> {
        while n > 0 {
            let k = n.min(self.wanted());
            if k == 0 {
                return Err(RecvError::Overrun { channel: self.id, got: n, wanted: 0 });
            }
            self.advance(k, table)?;
            n -= k;
        }
        Ok(())
    }

    /// Leaves the SYNC park once the epoch was released.
    pub fn synced(&mut self) {
        if self.phase == Phase::Sync {
            self.next_header();
        }
    }

    /// Whether the channel is parked at a SYNC packet.
    pub fn is_parked(&self) -> bool {
        self.phase == Phase::Sync
    }

    /// End of the channel's stream: clean only at a packet boundary.
    pub fn finish(&self) -> Result<(), RecvError> {
        let cut = match self.phase {
            Phase::Header { have: 0, .. } => return Ok(()),
            Phase::Header { have, need } => Cut::Header { have: have as u32, need: need as u32 },
            Phase::Pages { index, normal, .. } => Cut::Page { index, normal },
            Phase::Discard { left } => Cut::DeviceState { left },
            Phase::Compressed { len, normal, .. } => Cut::Compressed { len, normal },
            Phase::Sync => Cut::Sync,
        };
        Err(RecvError::Truncated { channel: self.id, packet: self.stats.packets.saturating_sub(1), cut })
    }

    /// Convenience for embedders without raw guest addresses (and for tests): consumes as much of
    /// `input` as the channel wants, copying page bytes through [`GuestMemory::write`], and stops at
    /// a SYNC park or when `input` is used up. Returns the bytes consumed.
    pub fn receive_bytes<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        input: &[u8],
        table: &BlockTable<'_, M, N>,
    ) -> Result<usize, RecvError> {
        let mut used = 0;
        while used < input.len() {
            let rest = &input[used..];
            let n = match self.want() {
                Want::Header(buf) => {
                    let n = buf.len().min(rest.len());
                    buf[..n].copy_from_slice(&rest[..n]);
                    n
                }
                Want::Page { block, offset, len, .. } => {
                    let n = len.min(rest.len());
                    if let Some(b) = table.get(block) {
                        b.memory().write(offset, &rest[..n]);
                    }
                    n
                }
                Want::Discard(len) => len.min(rest.len()),
                Want::Compressed { method, .. } => {
                    let packet = self.stats.packets.saturating_sub(1);
                    return Err(RecvError::NoDecompressor { channel: self.id, packet, method });
                }
                Want::Sync => break,
            };
            self.advance(n, table)?;
            used += n;
        }
        Ok(used)
    }
}

/// Page index and byte offset of `offset`, an offset [`RamPacket::check_pages`] validated against
/// a block of page size `geometry`: aligned, and a whole page below the block's used length (itself
/// at most the mapped `usize` length), so the conversion is lossless and no check is repeated.
///
/// [`RamPacket::check_pages`]: crate::wire::RamPacket::check_pages
#[inline]
fn checked_page(offset: u64, geometry: Geometry) -> (PageIndex, usize) {
    let at = usize::try_from(offset);
    debug_assert!(at.is_ok() && offset.is_multiple_of(u64::from(geometry.page_size())));
    // Validated offsets are below a `usize` length; `unwrap_or` keeps release builds panic-free.
    let at = at.unwrap_or(usize::MAX);
    (PageIndex::new(at >> geometry.shift()), at)
}

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, not(loom)))]
mod regress_tests;
