//! Send engine: batches of guest pages handed to channel workers, packets built for one vectored
//! write each, sync epochs, and an iterative precopy driver. Sans-I/O, no allocation.
//!
//! # Roles
//!
//! - The **producer** (one per migration, the embedder's migration thread) turns dirty pages into
//!   batches of at most `page_count` pages of one block ([`Producer::queue_page`]) and hands each batch
//!   to an idle channel ([`Producer::flush`]). At the end of a round it asks every channel for a SYNC
//!   packet ([`Producer::sync_all`]), then writes the main stream's `MULTIFD_FLUSH`.
//! - Each **channel worker** owns a [`SendChannel`], taken once per channel with
//!   [`SendEngine::channel`] (a second take is refused): [`SendChannel::next`] waits for its next job and
//!   returns an [`Outgoing`] packet (the header bytes and the guest page slices, for one vectored write,
//!   page data never copied); after writing it the worker calls [`SendChannel::done`].
//! - [`precopy`] drives whole rounds for an embedder that implements [`Precopy`].
//!
//! # Hand-over protocol (QEMU B19, B21, B22, B23)
//!
//! Each channel has one job slot: a state (`IDLE`, `DATA`, `SYNC`) and a batch cell.
//!
//! - **Ownership moves with the state.** The producer writes the batch only while the slot is `IDLE`,
//!   then publishes it with a Release store of `DATA`; from then on only the channel reads it, and the
//!   producer keeps no reference into it and decides nothing from it (B21). The channel gives it back
//!   with a Release store of `IDLE` in [`SendChannel::done`].
//! - **Sync requests are not data jobs** (B23): a slot holds either a batch or a sync request, never
//!   both, so a SYNC flag can never ride on a data packet.
//! - **Packet numbers** are taken with one atomic fetch-add when a header is filled, in the channel
//!   worker (B22), so they are unique per migration and increasing in fill order.
//! - **Idle credits** (B19): a channel posts one credit each time it becomes idle (once when it is
//!   ready, then after each job); the producer consumes one per data job and one per channel per sync.
//!   A credit therefore proves an idle slot exists, and when the migration is quiescent the credits
//!   equal the channel count ([`SendEngine::credits`]).
//! - The round-robin start index lives in the [`Producer`], so it never outlives a migration or
//!   exceeds its channel count (B25).
//!
//! # Waking
//!
//! Waits go through [`Coordinator::wait_until`] (workers) or the producer's own loop, and both end with
//! [`Cancelled`] once the migration terminates. Wake-ups that are not shutdowns (a job for a channel, a
//! channel done for the producer) go through [`Notify`], separate from [`Wake`], whose `wake` is where
//! embedders shut transports down.

mod zero;

use core::fmt;
use core::marker::PhantomData;

pub use zero::is_zero_page;

use crate::codec::{CodecError, Compress, max_compressed_len};
use crate::lifecycle::{Cancelled, ChannelId, ConfigError, Coordinator, Wake};
use crate::sync::{AtomicBool, AtomicU8, AtomicU32, Ordering, UnsafeCell};
use crate::wire::packet::{INIT_PACKET_LEN, NAME_FIELD_LEN, ram};
use crate::wire::stream::Record;
use crate::wire::{
    Compression, EncodeError, Flags, Geometry, InitPacket, Layout, MAX_HEADER_LEN, MAX_PAGE_COUNT, RamHeader,
};

const IDLE: u8 = 0;
const DATA: u8 = 1;
const SYNC: u8 = 2;

/// The guest RAM a migration sends, implemented by the embedder.
///
/// [`SourceBlocks::page`] is called by channel workers on several threads at once, for pages of
/// batches they own. Pages may change only while the migration is [`Quiescent`] (between rounds);
/// callers never keep a returned slice beyond the packet it was written in.
pub trait SourceBlocks: Sync {
    /// Number of RAM blocks.
    fn count(&self) -> usize;
    /// Name of `block` (as the destination knows it, e.g. `m0`); below 256 bytes.
    fn name(&self, block: usize) -> &[u8];
    /// Used length of `block` in bytes, a multiple of the page size.
    fn used_len(&self, block: usize) -> u64;
    /// The `len` bytes of `block` at `offset`; called only with ranges inside the used length.
    fn page(&self, block: usize, offset: u64, len: usize) -> &[u8];
}

/// Wake-ups that are not shutdowns, provided by the embedder.
pub trait Notify: Sync {
    /// A job was handed to `channel`: unblock its worker if it idles in [`Wake::idle`].
    fn job(&self, channel: ChannelId);
    /// The producer waits for a channel to finish; return after a short while or when
    /// [`Notify::channel_done`] is called. The default spins once.
    fn producer_idle(&self) {
        crate::sync::spin_loop();
    }
    /// `channel` finished a job: unblock the producer if it idles in [`Notify::producer_idle`].
    fn channel_done(&self, channel: ChannelId);
}

/// A send engine could not be configured, or the producer was given a bad page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum SendError {
    /// The channel count is outside what the coordinator holds.
    Config(ConfigError),
    /// A block name does not fit the 256-byte name field (with its terminator).
    BlockName {
        /// Block index.
        block: usize,
        /// Name length.
        len: usize,
    },
    /// A block's used length is not a multiple of the page size.
    BlockLength {
        /// Block index.
        block: usize,
        /// Its used length.
        used_len: u64,
        /// The page size.
        page_size: u32,
    },
    /// The producer was already taken: there is one per migration.
    ProducerTaken,
    /// A channel's worker state was already taken: there is one [`SendChannel`] per channel.
    ChannelTaken {
        /// The channel.
        channel: ChannelId,
    },
    /// A channel id is not below the migration's channel count.
    NoSuchChannel {
        /// The channel.
        channel: ChannelId,
        /// The migration's channel count.
        channels: u8,
    },
    /// A page refers to a block that does not exist.
    NoSuchBlock {
        /// Block index given.
        block: usize,
        /// Blocks there are.
        count: usize,
    },
    /// A page offset is not page-aligned or not inside its block.
    BadOffset {
        /// Block index.
        block: usize,
        /// Offset given.
        offset: u64,
        /// The block's used length.
        used_len: u64,
    },
    /// A dirty bitmap is shorter than its block needs.
    BitmapTooShort {
        /// Block index.
        block: usize,
        /// Words given.
        words: usize,
        /// Words needed.
        need: usize,
    },
    /// A header could not be encoded.
    Encode(EncodeError),
    /// A packet's pages could not be compressed.
    Codec {
        /// The channel.
        channel: ChannelId,
        /// The packet's number.
        packet_num: u64,
        /// What went wrong.
        error: CodecError,
    },
    /// [`Outgoing::compress`] was given a compressor for another method than the engine's.
    WrongCompressor {
        /// The engine's method.
        engine: Compression,
        /// The compressor's.
        codec: Compression,
    },
    /// The migration is terminating.
    Cancelled,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => write!(f, "{e}"),
            Self::BlockName { block, len } => {
                write!(f, "block {block}: name of {len} bytes does not fit (at most {})", NAME_FIELD_LEN - 1)
            }
            Self::BlockLength { block, used_len, page_size } => {
                write!(f, "block {block}: used length {used_len} is not a multiple of the page size {page_size}")
            }
            Self::ProducerTaken => f.write_str("the migration's producer was already taken"),
            Self::ChannelTaken { channel } => write!(f, "the worker state of {channel} was already taken"),
            Self::NoSuchChannel { channel, channels } => {
                write!(f, "{channel} does not exist: the migration has {channels} channels")
            }
            Self::NoSuchBlock { block, count } => write!(f, "block {block} does not exist ({count} blocks)"),
            Self::BadOffset { block, offset, used_len } => write!(
                f,
                "block {block}: page offset {offset:#x} is not an aligned page inside used length {used_len:#x}"
            ),
            Self::BitmapTooShort { block, words, need } => {
                write!(f, "block {block}: dirty bitmap has {words} words, {need} needed")
            }
            Self::Encode(e) => write!(f, "packet header: {e}"),
            Self::Codec { channel, packet_num, error } => write!(f, "{channel}: packet {packet_num}: {error}"),
            Self::WrongCompressor { engine, codec } => {
                write!(f, "a {} compressor for a migration compressed with {}", codec.name(), engine.name())
            }
            Self::Cancelled => f.write_str("the migration is terminating"),
        }
    }
}

impl core::error::Error for SendError {}

impl From<Cancelled> for SendError {
    fn from(_: Cancelled) -> Self {
        Self::Cancelled
    }
}

/// A batch: up to `page_count` page offsets of one block.
#[derive(Clone, Copy)]
struct Batch {
    block: usize,
    len: usize,
    offsets: [u64; MAX_PAGE_COUNT],
}

impl Batch {
    const EMPTY: Batch = Batch { block: 0, len: 0, offsets: [0; MAX_PAGE_COUNT] };
}

/// One channel's job slot.
struct JobSlot {
    state: AtomicU8,
    batch: UnsafeCell<Batch>,
}

/// Shared state of one send migration: the lifecycle coordinator, one job slot per channel, the packet
/// counter and the statistics. Workers and the producer borrow it.
pub struct SendEngine<'b, B: ?Sized, H, E, const MAX: usize> {
    lifecycle: Coordinator<H, E, MAX>,
    blocks: &'b B,
    geometry: Geometry,
    layout: Layout,
    slots: [JobSlot; MAX],
    credits: AtomicU32,
    next_packet: AtomicU32,
    producer_taken: AtomicBool,
    /// One per channel: set by the one [`SendEngine::channel`] call that takes its worker state.
    channel_taken: [AtomicBool; MAX],
    normal_pages: AtomicU32,
    zero_pages: AtomicU32,
    packets: AtomicU32,
    compression: Compression,
}

// SAFETY: the only non-`Sync` parts are the batch cells. A cell is written only by the producer while
// its slot is `IDLE` (and the producer is unique: `producer_taken`), and read only by the slot's channel
// after it Acquire-loaded `DATA`, which the producer Release-stored after writing; the channel hands it
// back with a Release store of `IDLE`, which the producer Acquire-loads before writing again. The
// coordinator is `Sync` under the bounds below, and `B: Sync` is required by `SourceBlocks`.
unsafe impl<B: ?Sized + Sync, H: Send, E: Send + Sync, const MAX: usize> Sync for SendEngine<'_, B, H, E, MAX> {}

impl<B: ?Sized, H, E, const MAX: usize> fmt::Debug for SendEngine<'_, B, H, E, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendEngine")
            .field("lifecycle", &self.lifecycle)
            .field("geometry", &self.geometry)
            .field("credits", &self.credits.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<'b, B: SourceBlocks + ?Sized, H, E, const MAX: usize> SendEngine<'b, B, H, E, MAX> {
    /// An engine for `channels` channels sending `blocks` with `geometry` and header `layout`.
    /// With [`Layout::V7_2`] there is no zero-page field, so every page is sent as data.
    pub fn new(channels: u8, blocks: &'b B, geometry: Geometry, layout: Layout) -> Result<Self, SendError> {
        let lifecycle = Coordinator::new(channels).map_err(SendError::Config)?;
        for block in 0..blocks.count() {
            let len = blocks.name(block).len();
            if len >= NAME_FIELD_LEN || len == 0 {
                return Err(SendError::BlockName { block, len });
            }
            let used_len = blocks.used_len(block);
            if !used_len.is_multiple_of(u64::from(geometry.page_size())) {
                return Err(SendError::BlockLength { block, used_len, page_size: geometry.page_size() });
            }
        }
        Ok(Self {
            lifecycle,
            blocks,
            geometry,
            layout,
            slots: core::array::from_fn(|_| JobSlot {
                state: AtomicU8::new(IDLE),
                batch: UnsafeCell::new(Batch::EMPTY),
            }),
            credits: AtomicU32::new(0),
            next_packet: AtomicU32::new(0),
            producer_taken: AtomicBool::new(false),
            channel_taken: core::array::from_fn(|_| AtomicBool::new(false)),
            normal_pages: AtomicU32::new(0),
            zero_pages: AtomicU32::new(0),
            packets: AtomicU32::new(0),
            compression: Compression::None,
        })
    }

    /// Compresses the normal pages of every data packet with `method` (QEMU's `multifd-compression`;
    /// the receiver must be set the same way). Each channel's worker then passes its packets through
    /// [`Outgoing::compress`]. Set before the channels start.
    pub fn set_compression(&mut self, method: Compression) {
        self.compression = method;
    }

    /// The method set by [`SendEngine::set_compression`].
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The channel lifecycle (create, terminate, record_error, cleanup).
    pub fn lifecycle(&self) -> &Coordinator<H, E, MAX> {
        &self.lifecycle
    }

    /// The channel lifecycle, exclusively (to take its error after cleanup).
    pub fn lifecycle_mut(&mut self) -> &mut Coordinator<H, E, MAX> {
        &mut self.lifecycle
    }

    /// The page geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The blocks being sent.
    pub fn blocks(&self) -> &'b B {
        self.blocks
    }

    /// Idle credits not yet consumed; equals the channel count when every channel is idle and ready.
    pub fn credits(&self) -> u32 {
        // Relaxed: a snapshot for statistics and tests.
        self.credits.load(Ordering::Relaxed)
    }

    /// Packet numbers handed out so far.
    pub fn packets_numbered(&self) -> u32 {
        // Relaxed: a snapshot.
        self.next_packet.load(Ordering::Relaxed)
    }

    /// The migration's only producer; `Err(ProducerTaken)` on a second call.
    pub fn producer(&self) -> Result<Producer<'_, 'b, B, H, E, MAX>, SendError> {
        // Relaxed: only the flag's own value matters (one winner), nothing is published with it.
        if self.producer_taken.swap(true, Ordering::Relaxed) {
            return Err(SendError::ProducerTaken);
        }
        Ok(Producer { engine: self, pending: Batch::EMPTY, next: 0 })
    }

    /// The worker-side state of `channel`, for its one worker: the job slot of a channel is read by
    /// exactly one [`SendChannel`], so this succeeds once per channel. `Err(ChannelTaken)` on a second
    /// call for the same channel (even after the first was dropped), `Err(NoSuchChannel)` for an id
    /// not below the channel count.
    pub fn channel(&self, channel: ChannelId) -> Result<SendChannel<'_, 'b, B, H, E, MAX>, SendError> {
        let channels = self.lifecycle.channels();
        if channel.0 >= channels {
            return Err(SendError::NoSuchChannel { channel, channels });
        }
        // Relaxed: only the flag's own value matters (one winner), nothing is published with it; the
        // job slot's own Acquire/Release protocol orders the batches.
        if self.channel_taken[channel.index()].swap(true, Ordering::Relaxed) {
            return Err(SendError::ChannelTaken { channel });
        }
        Ok(SendChannel {
            engine: self,
            id: channel,
            header: [0; MAX_HEADER_LEN],
            order: [0; MAX_PAGE_COUNT],
            job: None,
        })
    }

    fn slot(&self, channel: ChannelId) -> &JobSlot {
        &self.slots[channel.index()]
    }

    /// Counters (normal pages, zero pages, packets) since the start.
    fn counters(&self) -> (u32, u32, u32) {
        // Relaxed: read by the producer after it Acquire-loaded every slot `IDLE`, which orders the
        // workers' increments (made before their Release store of `IDLE`) before these loads.
        (
            self.normal_pages.load(Ordering::Relaxed),
            self.zero_pages.load(Ordering::Relaxed),
            self.packets.load(Ordering::Relaxed),
        )
    }
}

/// The producer side: builds batches and hands them to idle channels. One per migration.
pub struct Producer<'e, 'b, B: ?Sized, H, E, const MAX: usize> {
    engine: &'e SendEngine<'b, B, H, E, MAX>,
    pending: Batch,
    next: usize,
}

impl<B: ?Sized, H, E, const MAX: usize> fmt::Debug for Producer<'_, '_, B, H, E, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer").field("pending", &self.pending.len).field("next", &self.next).finish()
    }
}

impl<'e, 'b, B: SourceBlocks + ?Sized, H, E, const MAX: usize> Producer<'e, 'b, B, H, E, MAX> {
    /// The engine.
    pub fn engine(&self) -> &'e SendEngine<'b, B, H, E, MAX> {
        self.engine
    }

    /// Adds the page of `block` at `offset` to the current batch; a full batch, or a page of another
    /// block, first hands the current batch to an idle channel (waiting for one).
    pub fn queue_page<N: Notify + ?Sized>(&mut self, notify: &N, block: usize, offset: u64) -> Result<(), SendError> {
        let blocks = self.engine.blocks;
        let count = blocks.count();
        if block >= count {
            return Err(SendError::NoSuchBlock { block, count });
        }
        let used_len = blocks.used_len(block);
        let page = u64::from(self.engine.geometry.page_size());
        if !offset.is_multiple_of(page) || offset.checked_add(page).is_none_or(|end| end > used_len) {
            return Err(SendError::BadOffset { block, offset, used_len });
        }
        if self.pending.len > 0
            && (self.pending.block != block || self.pending.len == self.engine.geometry.page_count() as usize)
        {
            self.flush(notify)?;
        }
        self.pending.block = block;
        self.pending.offsets[self.pending.len] = offset;
        self.pending.len += 1;
        Ok(())
    }

    /// Hands the current batch, if it has pages, to an idle channel.
    pub fn flush<N: Notify + ?Sized>(&mut self, notify: &N) -> Result<(), Cancelled> {
        if self.pending.len == 0 {
            return Ok(());
        }
        let engine = self.engine;
        self.wait(notify, || take_credit(&engine.credits))?;
        let channels = usize::from(engine.lifecycle.channels());
        loop {
            // A credit proves some slot is idle (a worker posts it after its Release store of IDLE);
            // scan from the rotating index.
            for step in 0..channels {
                let c = (self.next + step) % channels;
                let slot = &engine.slots[c];
                // Acquire: pairs with the channel's Release store of IDLE; its reads of the previous
                // batch happen before our write below.
                if slot.state.load(Ordering::Acquire) == IDLE {
                    // SAFETY: the slot is IDLE, so its channel does not read the cell, and this is the
                    // only producer; the channel reads it only after the Release store below.
                    slot.batch.with_mut(|b| unsafe { *b = self.pending });
                    // Release: publishes the batch; from here the channel owns it (B21).
                    slot.state.store(DATA, Ordering::Release);
                    self.pending.len = 0;
                    self.next = (c + 1) % channels;
                    notify.job(ChannelId(c as u8));
                    return Ok(());
                }
            }
            // Unreachable while credits are balanced; wait rather than spin hot.
            self.wait(notify, || true)?;
        }
    }

    /// Flushes the current batch, then has every channel send a SYNC packet after its queued work,
    /// and waits until all have. The caller then writes the main stream's `MULTIFD_FLUSH`.
    pub fn sync_all<N: Notify + ?Sized>(&mut self, notify: &N) -> Result<Quiescent<'e>, Cancelled> {
        self.flush(notify)?;
        let engine = self.engine;
        for c in engine.lifecycle.ids() {
            let slot = engine.slot(c);
            // Acquire: as in `flush`.
            self.wait(notify, || slot.state.load(Ordering::Acquire) == IDLE)?;
            self.wait(notify, || take_credit(&engine.credits))?;
            // Release: a sync request, distinct from a data job (B23); the batch cell is not used.
            slot.state.store(SYNC, Ordering::Release);
            notify.job(c);
        }
        for c in engine.lifecycle.ids() {
            let slot = engine.slot(c);
            // Acquire: every channel's writes (its SYNC packet, its counters) happen before what follows.
            self.wait(notify, || slot.state.load(Ordering::Acquire) == IDLE)?;
        }
        Ok(Quiescent { _engine: PhantomData })
    }

    fn wait<N: Notify + ?Sized>(&self, notify: &N, mut ready: impl FnMut() -> bool) -> Result<(), Cancelled> {
        loop {
            if self.engine.lifecycle.is_quitting() {
                return Err(Cancelled);
            }
            if ready() {
                return Ok(());
            }
            notify.producer_idle();
        }
    }
}

fn take_credit(credits: &AtomicU32) -> bool {
    // Acquire on success: pairs with the worker's Release increment, after its Release store of IDLE.
    // Relaxed on failure: nothing taken.
    credits.fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
}

/// Proof that every channel is idle, handed out by [`Producer::sync_all`]: between rounds, while the
/// embedder holds it, no worker reads guest memory, so the embedder may change pages.
#[derive(Debug)]
pub struct Quiescent<'e> {
    _engine: PhantomData<&'e ()>,
}

/// What a [`SendChannel`] was handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum JobKind {
    /// A data packet: `normal` pages with data, `zero` pages as offsets only.
    Data {
        /// Pages whose data follows the header.
        normal: u32,
        /// Zero pages.
        zero: u32,
    },
    /// A SYNC packet (no pages).
    Sync,
}

#[derive(Clone, Copy)]
struct Job {
    kind: JobKind,
    block: usize,
    header_len: usize,
    packet_num: u64,
}

/// The worker side of one channel: takes jobs, builds packets.
pub struct SendChannel<'e, 'b, B: ?Sized, H, E, const MAX: usize> {
    engine: &'e SendEngine<'b, B, H, E, MAX>,
    id: ChannelId,
    header: [u8; MAX_HEADER_LEN],
    order: [u64; MAX_PAGE_COUNT],
    job: Option<Job>,
}

impl<B: ?Sized, H, E, const MAX: usize> fmt::Debug for SendChannel<'_, '_, B, H, E, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendChannel").field("id", &self.id).field("busy", &self.job.is_some()).finish()
    }
}

/// One packet to write, as one vectored write: [`Outgoing::header`], then [`Outgoing::pages`]; or,
/// when the migration is compressed, the header after [`Outgoing::compress`], then its payload.
pub struct Outgoing<'c, 'b, B: ?Sized> {
    header: &'c mut [u8],
    blocks: &'b B,
    block: usize,
    normal: &'c [u64],
    page_size: usize,
    compression: Compression,
    id: ChannelId,
    /// What the packet is.
    pub kind: JobKind,
    /// Its packet number.
    pub packet_num: u64,
}

impl<B: ?Sized> fmt::Debug for Outgoing<'_, '_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outgoing").field("kind", &self.kind).field("packet_num", &self.packet_num).finish()
    }
}

impl<'c, 'b: 'c, B: SourceBlocks + ?Sized> Outgoing<'c, 'b, B> {
    /// The packet header bytes.
    pub fn header(&self) -> &[u8] {
        self.header
    }

    /// The engine's compression method: with anything but [`Compression::None`], write the header
    /// and the payload of [`Outgoing::compress`] instead of the pages.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Compresses the packet's normal pages with `codec` into `out` (at least
    /// [`max_compressed_len`] of the pages is always enough) and writes the payload's length into the
    /// header's `next_packet_size`; returns the payload. A packet without normal pages has an empty
    /// payload and the codec is not called: its stream stays as it was, as QEMU's does.
    pub fn compress<'o, C: Compress + ?Sized>(
        &mut self,
        codec: &mut C,
        out: &'o mut [u8],
    ) -> Result<&'o [u8], SendError> {
        if codec.method() != self.compression {
            return Err(SendError::WrongCompressor { engine: self.compression, codec: codec.method() });
        }
        if self.normal.is_empty() {
            return Ok(&out[..0]);
        }
        let raw = self.normal.len() * self.page_size;
        let room = out.len().min(max_compressed_len(raw));
        let (blocks, block, ps) = (self.blocks, self.block, self.page_size);
        let mut pages = self.normal.iter().map(move |&off| blocks.page(block, off, ps));
        let (channel, packet_num) = (self.id, self.packet_num);
        let len = codec.compress(&mut pages, &mut out[..room]).map_err(|error| SendError::Codec {
            channel,
            packet_num,
            error,
        })?;
        let out: &'o [u8] = out;
        let Some(payload) = out.get(..len).filter(|_| len > 0 && len <= room) else {
            let error = CodecError::OutputFull { capacity: room as u64 };
            return Err(SendError::Codec { channel, packet_num, error });
        };
        // `len <= room <= max_compressed_len(raw)`, and `raw` is at most one packet (512 KiB), so it
        // fits the u32 field.
        let size = u32::try_from(len).map_err(|_| SendError::Codec {
            channel,
            packet_num,
            error: CodecError::OutputFull { capacity: u64::from(u32::MAX) },
        })?;
        self.header[ram::NEXT_PACKET_SIZE..ram::NEXT_PACKET_SIZE + 4].copy_from_slice(&size.to_be_bytes());
        Ok(payload)
    }

    /// The normal pages' data, in header order, borrowed from guest memory.
    pub fn pages(&self) -> impl ExactSizeIterator<Item = &'b [u8]> + 'c {
        let (blocks, block, ps) = (self.blocks, self.block, self.page_size);
        self.normal.iter().map(move |&off| blocks.page(block, off, ps))
    }

    /// Bytes the packet occupies on the wire.
    pub fn wire_len(&self) -> usize {
        self.header.len() + self.normal.len() * self.page_size
    }
}

impl<'e, 'b, B: SourceBlocks + ?Sized, H, E, const MAX: usize> SendChannel<'e, 'b, B, H, E, MAX> {
    /// This channel's id.
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// The 64-byte init packet that opens the channel (as [`init_packet`]).
    pub fn init_packet(&self, uuid: [u8; 16]) -> [u8; INIT_PACKET_LEN] {
        init_packet(self.id, uuid)
    }

    /// Declares the channel ready for jobs (after its init packet was written): posts its first idle
    /// credit. Call once.
    pub fn ready<N: Notify + ?Sized>(&self, notify: &N) {
        // Release: pairs with the producer's Acquire in `take_credit`.
        self.engine.credits.fetch_add(1, Ordering::Release);
        notify.channel_done(self.id);
    }

    /// Waits for the next job and builds its packet: zero pages sorted out, header filled with a fresh
    /// packet number. Call [`SendChannel::done`] once it is written. `Err(Cancelled)` once the
    /// migration terminates.
    pub fn next<W: Wake + ?Sized>(&mut self, waker: &W) -> Result<Outgoing<'_, 'b, B>, SendError> {
        let engine = self.engine;
        let slot = engine.slot(self.id);
        let mut state = IDLE;
        if self.job.is_none() {
            engine.lifecycle.wait_until(waker, self.id, || {
                // Acquire: pairs with the producer's Release store; the batch it wrote is visible.
                state = slot.state.load(Ordering::Acquire);
                state != IDLE
            })?;
            let geometry = engine.geometry;
            let ps = geometry.page_size() as usize;
            let job = if state == DATA {
                // SAFETY: the slot is DATA: this channel owns the batch until its Release store of IDLE
                // in `done`, and the producer does not write it meanwhile. Copied out at once.
                let batch = slot.batch.with(|b| unsafe { *b });
                let (mut normal, mut zero) = (0usize, 0usize);
                let detect = engine.layout == Layout::V9_0;
                for &off in &batch.offsets[..batch.len] {
                    if detect && is_zero_page(engine.blocks.page(batch.block, off, ps)) {
                        zero += 1;
                        self.order[batch.len - zero] = off;
                    } else {
                        self.order[normal] = off;
                        normal += 1;
                    }
                }
                // B22: the number is taken now, as the header is filled. Relaxed: uniqueness comes from
                // the atomic read-modify-write; no other memory is published with it.
                let packet_num = u64::from(engine.next_packet.fetch_add(1, Ordering::Relaxed));
                // Compressed, every data packet carries the method (zero-page-only ones too, as QEMU's
                // do) and `next_packet_size` is written by `Outgoing::compress`.
                let method = engine.compression;
                let next_packet_size = if method == Compression::None { normal * ps } else { 0 };
                let header = RamHeader {
                    flags: Flags(method.flag_value()),
                    pages_alloc: geometry.page_count(),
                    normal_pages: normal as u32,
                    next_packet_size: next_packet_size as u32,
                    packet_num,
                    zero_pages: zero as u32,
                    block: engine.blocks.name(batch.block),
                };
                let header_len = header
                    .encode(&self.order[..batch.len], geometry, engine.layout, &mut self.header)
                    .map_err(SendError::Encode)?;
                Job {
                    kind: JobKind::Data { normal: normal as u32, zero: zero as u32 },
                    block: batch.block,
                    header_len,
                    packet_num,
                }
            } else {
                // Relaxed: as above.
                let packet_num = u64::from(engine.next_packet.fetch_add(1, Ordering::Relaxed));
                let header = RamHeader {
                    flags: Flags(Flags::SYNC),
                    pages_alloc: 0,
                    normal_pages: 0,
                    next_packet_size: 0,
                    packet_num,
                    zero_pages: 0,
                    block: b"",
                };
                let header_len =
                    header.encode(&[], geometry, engine.layout, &mut self.header).map_err(SendError::Encode)?;
                Job { kind: JobKind::Sync, block: 0, header_len, packet_num }
            };
            self.job = Some(job);
        }
        // Local invariant: set just above, or kept from a call whose packet was not yet `done`.
        let Some(job) = self.job else { unreachable!("job set above") };
        let normal = match job.kind {
            JobKind::Data { normal, .. } => normal as usize,
            JobKind::Sync => 0,
        };
        Ok(Outgoing {
            header: &mut self.header[..job.header_len],
            blocks: engine.blocks,
            block: job.block,
            normal: &self.order[..normal],
            page_size: engine.geometry.page_size() as usize,
            compression: engine.compression,
            id: self.id,
            kind: job.kind,
            packet_num: job.packet_num,
        })
    }

    /// The packet from [`SendChannel::next`] was written: gives the job back and posts an idle credit.
    /// Does nothing if there is no job.
    pub fn done<N: Notify + ?Sized>(&mut self, notify: &N) {
        let Some(job) = self.job.take() else { return };
        let engine = self.engine;
        // Relaxed: statistics, published by the Release store of IDLE below.
        match job.kind {
            JobKind::Data { normal, zero } => {
                engine.normal_pages.fetch_add(normal, Ordering::Relaxed);
                engine.zero_pages.fetch_add(zero, Ordering::Relaxed);
            }
            JobKind::Sync => {}
        }
        engine.packets.fetch_add(1, Ordering::Relaxed);
        // Release: gives the batch back; everything this channel did with it happens before the
        // producer's next write.
        engine.slot(self.id).state.store(IDLE, Ordering::Release);
        // Release: pairs with `take_credit`'s Acquire.
        engine.credits.fetch_add(1, Ordering::Release);
        notify.channel_done(self.id);
    }
}

/// The main migration stream, written by the producer.
pub trait MainSink {
    /// A write error.
    type Error;
    /// Writes all of `bytes`.
    fn write(&mut self, bytes: &[u8]) -> Result<(), Self::Error>;
}

/// What the embedder wants after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Step {
    /// Send another round.
    Iterate,
    /// Send the last round (the pages dirtied since), then the device state, and finish.
    Complete,
}

/// Statistics of one round, reported to [`Precopy::round_done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RoundStats {
    /// Round number, from 0.
    pub round: u32,
    /// Pages sent (normal + zero).
    pub pages: u64,
    /// Pages sent with data.
    pub normal_pages: u64,
    /// Pages sent as zero offsets.
    pub zero_pages: u64,
    /// Bytes written on the multifd channels (headers and page data).
    pub bytes: u64,
    /// Nanoseconds the round took, by [`Precopy::now_ns`].
    pub nanos: u64,
    /// Dirty pages waiting for the next round.
    pub dirty_left: u64,
}

/// Summary of a finished precopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Summary {
    /// Rounds sent, the final one included.
    pub rounds: u32,
    /// Totals over every round (`round` is the last round's number, `dirty_left` 0).
    pub total: RoundStats,
    /// SYNC packets per channel (equal to the `MULTIFD_FLUSH` records on the main stream).
    pub syncs_per_channel: u32,
    /// The final round's statistics (not passed to [`Precopy::round_done`]).
    pub last: RoundStats,
}

/// The embedder's side of iterative precopy.
pub trait Precopy {
    /// The dirty bitmap of `block` for `round`: bit `i % 64` of word `i / 64` is page `i`. Must return
    /// the same bitmap when asked twice for the same round (once to count, once to send). Round 0 is
    /// normally every page.
    fn dirty(&mut self, round: u32, block: usize) -> &[u64];

    /// Round `round` was sent and every channel is idle: the guest may run and dirty pages for the
    /// next round now (the [`Quiescent`] token proves nobody reads guest memory).
    fn between_rounds(&mut self, round: u32, quiescent: &Quiescent<'_>) {
        let _ = (round, quiescent);
    }

    /// Statistics of a round (with the dirty pages left for the next); decides whether to iterate.
    fn round_done(&mut self, stats: &RoundStats) -> Step;

    /// Device state written after the RAM section's end and before EOF (section records, opaque).
    fn device_state(&mut self) -> &[u8] {
        &[]
    }

    /// The JSON description written after EOF.
    fn vm_description(&mut self) -> &[u8] {
        br#"{"page_size": 4096, "devices": []}"#
    }

    /// A monotonic clock in nanoseconds, for [`RoundStats::nanos`]; 0 if there is none.
    fn now_ns(&mut self) -> u64 {
        0
    }
}

/// Precopy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PrecopyError<S> {
    /// A page or bitmap was bad, or the migration was cancelled (see the coordinator's error).
    Send(SendError),
    /// The main stream could not be written.
    Main(S),
}

impl<S: fmt::Display> fmt::Display for PrecopyError<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Send(e) => write!(f, "{e}"),
            Self::Main(e) => write!(f, "main stream: {e}"),
        }
    }
}

impl<S: fmt::Debug + fmt::Display> core::error::Error for PrecopyError<S> {}

impl<S> From<SendError> for PrecopyError<S> {
    fn from(e: SendError) -> Self {
        Self::Send(e)
    }
}

impl<S> From<Cancelled> for PrecopyError<S> {
    fn from(_: Cancelled) -> Self {
        Self::Send(SendError::Cancelled)
    }
}

/// The RAM section's id in the main stream.
const RAM_SECTION_ID: u32 = 1;

fn emit<S: MainSink>(main: &mut S, page_size: u32, record: Record<'_>) -> Result<(), PrecopyError<S::Error>> {
    let mut buf = [0u8; 600];
    match record.encode(&mut buf, page_size) {
        Ok(n) => main.write(&buf[..n]).map_err(PrecopyError::Main),
        Err(e) => Err(SendError::Encode(e).into()),
    }
}

/// Runs iterative precopy to completion: the main stream's header and RAM setup section, then rounds
/// of the embedder's dirty pages, each closed by a SYNC on every channel and one `MULTIFD_FLUSH`, until
/// [`Precopy::round_done`] says [`Step::Complete`]; then the final round (in the RAM section's END),
/// the embedder's device state, EOF and the JSON description. `machine` is the configuration
/// section's machine type (`none` for a `-M none` destination).
///
/// Channel workers must be running (or starting) meanwhile. On a main-stream error the caller should
/// record it on the lifecycle coordinator (which terminates the workers).
pub fn precopy<B, H, E, const MAX: usize, N, S, P>(
    producer: &mut Producer<'_, '_, B, H, E, MAX>,
    notify: &N,
    main: &mut S,
    embedder: &mut P,
    machine: &[u8],
) -> Result<Summary, PrecopyError<S::Error>>
where
    B: SourceBlocks + ?Sized,
    N: Notify + ?Sized,
    S: MainSink,
    P: Precopy + ?Sized,
{
    let engine = producer.engine;
    let blocks = engine.blocks;
    let ps = engine.geometry.page_size();
    let total_len = (0..blocks.count()).map(|b| blocks.used_len(b)).sum();
    emit(main, ps, Record::FileHeader)?;
    emit(main, ps, Record::Configuration { machine })?;
    let start = Record::SectionStart {
        full: false,
        section_id: RAM_SECTION_ID,
        name: crate::wire::stream::RAM_SECTION,
        instance_id: 0,
        version_id: crate::wire::stream::RAM_VERSION,
    };
    emit(main, ps, start)?;
    emit(main, ps, Record::MemSize { total: total_len })?;
    for b in 0..blocks.count() {
        emit(main, ps, Record::BlockEntry { name: blocks.name(b), used_length: blocks.used_len(b) })?;
    }
    // Setup sync: older destinations must not take pages before their RAM setup ran.
    producer.sync_all(notify)?;
    let mut syncs = 1;
    emit(main, ps, Record::MultifdFlush)?;
    emit(main, ps, Record::Eos)?;
    emit(main, ps, Record::Footer { section_id: RAM_SECTION_ID })?;

    let mut total = RoundStats::default();
    let mut round = 0u32;
    let mut completing = false;
    let last: RoundStats;
    loop {
        let t0 = embedder.now_ns();
        let before = engine.counters();
        emit(main, ps, Record::SectionPart { end: completing, section_id: RAM_SECTION_ID })?;
        for b in 0..blocks.count() {
            let pages = (blocks.used_len(b) / u64::from(ps)) as usize;
            let need = pages.div_ceil(64);
            let bitmap = embedder.dirty(round, b);
            if bitmap.len() < need {
                return Err(SendError::BitmapTooShort { block: b, words: bitmap.len(), need }.into());
            }
            for (w, &word) in bitmap[..need].iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let page = w * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if page >= pages {
                        break;
                    }
                    producer.queue_page(notify, b, page as u64 * u64::from(ps))?;
                }
            }
        }
        let quiescent = producer.sync_all(notify)?;
        syncs += 1;
        emit(main, ps, Record::MultifdFlush)?;
        emit(main, ps, Record::Eos)?;
        emit(main, ps, Record::Footer { section_id: RAM_SECTION_ID })?;
        let after = engine.counters();
        let normal = u64::from(after.0.wrapping_sub(before.0));
        let zero = u64::from(after.1.wrapping_sub(before.1));
        let packets = u64::from(after.2.wrapping_sub(before.2));
        let mut stats = RoundStats {
            round,
            pages: normal + zero,
            normal_pages: normal,
            zero_pages: zero,
            bytes: normal * u64::from(ps) + packets * engine.geometry.header_len() as u64,
            nanos: embedder.now_ns().saturating_sub(t0),
            dirty_left: 0,
        };
        total.round = round;
        total.pages += stats.pages;
        total.normal_pages += stats.normal_pages;
        total.zero_pages += stats.zero_pages;
        total.bytes += stats.bytes;
        total.nanos += stats.nanos;
        if completing {
            last = stats;
            break;
        }
        embedder.between_rounds(round, &quiescent);
        for b in 0..blocks.count() {
            let pages = (blocks.used_len(b) / u64::from(ps)) as usize;
            let bitmap = embedder.dirty(round + 1, b);
            stats.dirty_left += count_dirty(bitmap, pages);
        }
        if embedder.round_done(&stats) == Step::Complete {
            completing = true;
        }
        round += 1;
    }
    let device = embedder.device_state();
    if !device.is_empty() {
        main.write(device).map_err(PrecopyError::Main)?;
    }
    emit(main, ps, Record::Eof)?;
    let json = embedder.vm_description();
    let mut head = [0u8; 5];
    head[0] = crate::wire::stream::section::VMDESCRIPTION;
    head[1..].copy_from_slice(&(json.len() as u32).to_be_bytes());
    main.write(&head).map_err(PrecopyError::Main)?;
    main.write(json).map_err(PrecopyError::Main)?;
    Ok(Summary { rounds: round + 1, total, syncs_per_channel: syncs, last })
}

/// The 64-byte init packet that opens `channel` of the migration `uuid`. Needs no [`SendChannel`], so
/// a creator can write it before the channel's worker takes its state.
pub fn init_packet(channel: ChannelId, uuid: [u8; 16]) -> [u8; INIT_PACKET_LEN] {
    let mut out = [0u8; INIT_PACKET_LEN];
    // Local invariant: the buffer is exactly INIT_PACKET_LEN bytes, all encode needs.
    let _ = InitPacket { uuid, id: channel.0 }.encode(&mut out);
    out
}

/// Set bits among the first `pages` bits of `bitmap`.
pub fn count_dirty(bitmap: &[u64], pages: usize) -> u64 {
    let full = pages / 64;
    let mut n: u64 = bitmap.iter().take(full).map(|w| u64::from(w.count_ones())).sum();
    let rest = pages % 64;
    if rest > 0
        && let Some(&w) = bitmap.get(full)
    {
        n += u64::from((w & ((1u64 << rest) - 1)).count_ones());
    }
    n
}

#[cfg(test)]
mod tests;
