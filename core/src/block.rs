//! RAM blocks on the destination: name, used length, page size, the guest memory the block maps and
//! its [`ReceivedBitmap`], in a fixed-capacity [`BlockTable`].
//!
//! # Writing pages
//!
//! Receive workers never write guest memory directly: they call [`RamBlock::write_page`] and
//! [`RamBlock::zero_page`], which keep the bitmap in step with memory.
//!
//! - **Every write of page data sets the page's bit**, after the bytes are written (the set publishes
//!   them). A page that is later sent as zero is then known to hold data and is overwritten (QEMU B31).
//! - **Zero pages.** A block declares whether its destination memory is zero-initialised
//!   ([`BlockSpec::memory_zeroed`]). On such a block the first zero page for a page is not written:
//!   the memory already reads as zero, and not touching it keeps an untouched anonymous page
//!   unpopulated. Every other zero page (page received before, or a block not declared zeroed) is
//!   written with zeros. [`ZeroPagePolicy::AlwaysPopulate`] writes every zero page, as postcopy needs:
//!   there "bit set" must mean "page present" (QEMU B32). Every zero page sets the bit.
//!
//! # Lifetime
//!
//! Blocks borrow their memory and bitmap words for `'a`, and workers share `&BlockTable`. On std,
//! workers are scoped threads, so the compiler proves the table outlives them. On static storage, put
//! the table in a [`TableSlot`]: workers hold [`TableLease`]s, and [`TableSlot::release`] (which frees
//! the slot for the next migration's table, and so the storage for reuse) requires the lifecycle's
//! [`AllJoined`](crate::lifecycle::AllJoined) token and is refused while any lease is held.
//!
//! # Example
//!
//! ```
//! use multifd_core::bitmap::{AtomicWord, PageIndex, words_for};
//! use multifd_core::block::{AtomicRegion, AtomicU8, BlockSpec, BlockTable, ZeroPage, ZeroPagePolicy};
//! use multifd_core::wire::Geometry;
//!
//! const PAGES: usize = 16;
//! let memory: Vec<AtomicU8> = (0..PAGES * 4096).map(|_| AtomicU8::new(0)).collect();
//! let region = AtomicRegion::new(&memory);
//! let words: [AtomicWord; words_for(PAGES)] = [const { AtomicWord::new(0) }; words_for(PAGES)];
//!
//! let mut table: BlockTable<'_, AtomicRegion<'_>, 4> = BlockTable::new(ZeroPagePolicy::SkipUntouched);
//! let spec = BlockSpec { name: b"pc.ram", used_len: (PAGES * 4096) as u64, page_size: Geometry::DEFAULT, memory_zeroed: true };
//! let id = table.add(&spec, &region, &words)?;
//! let (found, block) = table.find(b"pc.ram").expect("just added");
//! assert_eq!(found, id);
//!
//! let page = block.page_at(3 * 4096)?;
//! assert_eq!(block.zero_page(page)?, ZeroPage::Skipped, "first time, zeroed memory: untouched");
//! block.write_page(page, &[7u8; 4096])?;
//! assert_eq!(block.zero_page(page)?, ZeroPage::Written, "received before: overwritten");
//! # Ok::<(), Box<dyn core::error::Error>>(())
//! ```

use core::fmt;

use crate::bitmap::{AtomicWord, BitmapError, PageIndex, ReceivedBitmap};
use crate::sync::Ordering;
use crate::wire::Geometry;
use crate::wire::packet::NAME_FIELD_LEN;

#[allow(unsafe_code)]
mod slot;
pub use slot::{ReleaseError, TableLease, TableSlot};

/// One byte of guest memory for [`AtomicRegion`]: the platform's atomic byte (loom's in loom models).
pub type AtomicU8 = crate::sync::AtomicU8;

/// The guest memory one RAM block maps, implemented by the embedder (a raw region on bare metal, an
/// anonymous mapping on Linux).
///
/// Callers (this module) only pass ranges inside `0..len()`, whole pages of the block. Several
/// receive workers call these methods at once, on different pages and, if a peer misbehaves, on the
/// same page; an implementation must stay memory-safe under that (for example with raw-pointer copies
/// into a region no Rust reference covers, or with atomics as [`AtomicRegion`] does). Ordering between
/// a page's bytes and its bitmap bit is the bitmap's job, not the implementation's.
pub trait GuestMemory: Sync {
    /// Bytes mapped.
    fn len(&self) -> usize;

    /// Whether nothing is mapped.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `data` to `offset..offset + data.len()`.
    fn write(&self, offset: usize, data: &[u8]);

    /// Writes zeros to `offset..offset + len`.
    fn fill_zero(&self, offset: usize, len: usize);

    /// Copies `offset..offset + out.len()` into `out`.
    fn read(&self, offset: usize, out: &mut [u8]);

    /// The raw address of `offset..offset + len`, for filling guest memory outside Rust's references:
    /// a `read(2)`/`recv(2)` straight from a socket into the page, or a raw `ptr::copy`. Returns `None`
    /// (the default) when the memory has no such address; callers then copy through
    /// [`GuestMemory::write`]. Several workers may hold pointers into the same page at once (a hostile
    /// peer can send one page on two channels), which is why no `&mut [u8]` is ever handed out.
    ///
    /// # Safety
    ///
    /// Callers must pass a range inside `0..len()`, write through the pointer only with raw accesses
    /// (a syscall, `ptr::copy_nonoverlapping`), never by making a Rust reference over it, and stop
    /// using it before the memory is dropped. A page so written is published by setting its bitmap
    /// bit afterwards ([`RamBlock::mark_received`]). Implementations that return `Some` promise the
    /// pointer is valid for writes of `len` bytes for as long as `self` is borrowed.
    #[allow(unsafe_code)]
    unsafe fn raw_range(&self, offset: usize, len: usize) -> Option<core::ptr::NonNull<u8>> {
        let _ = (offset, len);
        None
    }
}

/// Guest memory over borrowed atomic bytes: safe, allocation-free and `static`-friendly, at the cost
/// of byte-wise copies. Meant for tests, demos and small firmware; a VMM maps real guest RAM.
#[derive(Debug)]
pub struct AtomicRegion<'a> {
    bytes: &'a [AtomicU8],
}

impl<'a> AtomicRegion<'a> {
    /// A region over `bytes`.
    pub const fn new(bytes: &'a [AtomicU8]) -> Self {
        Self { bytes }
    }
}

impl GuestMemory for AtomicRegion<'_> {
    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn write(&self, offset: usize, data: &[u8]) {
        for (dst, &b) in self.bytes[offset..offset + data.len()].iter().zip(data) {
            // Relaxed: the page's bitmap bit, set afterwards with Release, publishes these bytes.
            dst.store(b, Ordering::Relaxed);
        }
    }

    fn fill_zero(&self, offset: usize, len: usize) {
        for dst in &self.bytes[offset..offset + len] {
            // Relaxed: as in `write`.
            dst.store(0, Ordering::Relaxed);
        }
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        for (src, o) in self.bytes[offset..offset + out.len()].iter().zip(out) {
            // Relaxed: a reader first tests the page's bit with Acquire, which orders these loads.
            *o = src.load(Ordering::Relaxed);
        }
    }
}

/// Longest block name: QEMU's `idstr` is a 256-byte field including its terminating NUL.
pub const MAX_NAME_LEN: usize = NAME_FIELD_LEN - 1;

/// A RAM block's name (QEMU `idstr`): 1 to 255 bytes, no NUL. Stored inline.
///
/// The crate's one name type: blocks in a [`BlockTable`] have one, and every error that names a
/// block carries one ([`DecodeError::UnknownBlock`](crate::wire::DecodeError::UnknownBlock),
/// [`RecvError`](crate::recv::RecvError)'s `Block`, `MainUnknownBlock` and `MainBlock`), so a
/// message shows the whole name, exactly as the peer sent it, and a caller can compare it with
/// [`BlockTable::find`]'s names without a second type.
///
/// # Size
///
/// It is 256 bytes, which makes those errors larger than the earlier 32-byte prefix did: on a
/// 64-bit host `DecodeError` is 264 bytes (about 40 before) and `RecvError` 304 (about 80). We accept that: an error is built once, on the failure path, and ends its
/// channel; on the success path a `Result<_, RecvError>` moves only its `Ok` value and
/// discriminant, so the hot path does not pay for the size. What it costs is stack in the frames
/// that hold a `Result` (a few hundred bytes each, fine on the 4 MiB firmware board), and the
/// unit tests pin `size_of` so growth is seen. A peer name that is not a valid block name (empty,
/// or a main-stream name with a NUL) can match no block; it is reported by its own error
/// ([`DecodeError::EmptyBlockName`](crate::wire::DecodeError::EmptyBlockName),
/// [`RecvError::MainBadBlockName`](crate::recv::RecvError::MainBadBlockName)).
///
/// `Display` and `Debug` print it quoted, bytes outside printable ASCII escaped (`\xNN`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockName {
    len: u8,
    bytes: [u8; MAX_NAME_LEN],
}

impl BlockName {
    /// `name` if it is 1 to 255 bytes with no NUL byte.
    pub fn new(name: &[u8]) -> Result<Self, BlockError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(BlockError::BadNameLength { len: name.len() });
        }
        if let Some(at) = name.iter().position(|&b| b == 0) {
            return Err(BlockError::NulInName { at });
        }
        let mut bytes = [0u8; MAX_NAME_LEN];
        bytes[..name.len()].copy_from_slice(name);
        // The length was checked to be at most 255 just above.
        Ok(Self { len: name.len() as u8, bytes })
    }

    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The name as text, if it is UTF-8 (QEMU's names are ASCII).
    pub fn as_str(&self) -> Option<&str> {
        core::str::from_utf8(self.as_bytes()).ok()
    }

    /// Length in bytes (1 to 255).
    #[allow(clippy::len_without_is_empty)] // never empty
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
}

impl fmt::Display for BlockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for &b in self.as_bytes() {
            write!(f, "{}", core::ascii::escape_default(b))?;
        }
        f.write_str("\"")
    }
}

impl fmt::Debug for BlockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for BlockName {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{=[u8]:a}", self.as_bytes());
    }
}

/// What to do with zero pages; one policy per migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ZeroPagePolicy {
    /// Skip the write of a page's first zero page when its block's memory is declared zeroed.
    #[default]
    SkipUntouched,
    /// Always write zero pages (populate the memory). Required when postcopy may run: its fault
    /// handling trusts "bit set" to mean "page present".
    AlwaysPopulate,
}

/// What [`RamBlock::zero_page`] did with guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ZeroPage {
    /// Memory was not touched: first time for this page, on zeroed memory.
    Skipped,
    /// Zeros were written.
    Written,
}

/// A block as the embedder declares it to [`BlockTable::add`].
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec<'n> {
    /// QEMU's `idstr` of the block.
    pub name: &'n [u8],
    /// Bytes in use (QEMU `used_length`): a multiple of the page size, at most the mapped length.
    pub used_len: u64,
    /// Target page size.
    pub page_size: Geometry,
    /// Whether the destination memory of the whole block reads as zero before the migration (a fresh
    /// anonymous mapping, or RAM cleared at boot). Only then may first-time zero pages be skipped.
    /// Declare `false` for memory with prior content (firmware images, file-backed memory).
    pub memory_zeroed: bool,
}

/// Identifies a block inside its [`BlockTable`] (the order of `add` calls, from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlockId(u16);

impl BlockId {
    /// The first block of a table.
    pub const FIRST: Self = Self(0);

    /// The index in the table.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// Why a block could not be added, or a page operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum BlockError {
    /// Block name empty or longer than 255 bytes.
    BadNameLength {
        /// The length given.
        len: usize,
    },
    /// Block name contains a NUL byte.
    NulInName {
        /// Its position.
        at: usize,
    },
    /// Used length zero, or not a multiple of the page size.
    BadUsedLength {
        /// The used length given.
        used_len: u64,
        /// The block's page size.
        page_size: u32,
    },
    /// Used length larger than the guest memory mapped for the block.
    MemoryTooSmall {
        /// The used length given.
        used_len: u64,
        /// Bytes the memory maps.
        mapped: usize,
    },
    /// A block of that name is already in the table.
    DuplicateName,
    /// The table holds its capacity of blocks already.
    TableFull {
        /// The capacity.
        capacity: usize,
    },
    /// A byte offset not on a page boundary.
    UnalignedOffset {
        /// The offset.
        offset: u64,
        /// The block's page size.
        page_size: u32,
    },
    /// A page whose bytes are not all inside the block's used length.
    OffsetOutOfRange {
        /// The offset.
        offset: u64,
        /// The block's used length.
        used_len: u64,
    },
    /// Page data whose length is not the block's page size.
    BadDataLength {
        /// Bytes given.
        len: usize,
        /// The block's page size.
        page_size: u32,
    },
    /// The bitmap refused the operation (storage too small, page index out of range).
    Bitmap(BitmapError),
}

impl From<BitmapError> for BlockError {
    fn from(e: BitmapError) -> Self {
        Self::Bitmap(e)
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadNameLength { len } => write!(f, "block name is {} bytes; it must be 1 to 255", len),
            Self::NulInName { at } => write!(f, "block name has a NUL byte at {}", at),
            Self::BadUsedLength { used_len, page_size } => {
                write!(f, "used length {} is zero or not a multiple of the page size {}", used_len, page_size)
            }
            Self::MemoryTooSmall { used_len, mapped } => {
                write!(f, "used length {} exceeds the {} bytes of guest memory mapped", used_len, mapped)
            }
            Self::DuplicateName => write!(f, "a block with this name is already in the table"),
            Self::TableFull { capacity } => write!(f, "block table full ({} blocks)", capacity),
            Self::UnalignedOffset { offset, page_size } => {
                write!(f, "offset {:#x} is not a multiple of the page size {}", offset, page_size)
            }
            Self::OffsetOutOfRange { offset, used_len } => {
                write!(f, "page at offset {:#x} is not inside the used length {:#x}", offset, used_len)
            }
            Self::BadDataLength { len, page_size } => {
                write!(f, "page data is {} bytes, the page size is {}", len, page_size)
            }
            Self::Bitmap(e) => write!(f, "received bitmap: {}", e),
        }
    }
}

impl core::error::Error for BlockError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Bitmap(e) => Some(e),
            _ => None,
        }
    }
}

/// One RAM block: name, geometry, guest memory and received bitmap.
pub struct RamBlock<'a, M: ?Sized> {
    name: BlockName,
    used_len: usize,
    page_size: Geometry,
    memory_zeroed: bool,
    policy: ZeroPagePolicy,
    memory: &'a M,
    bitmap: ReceivedBitmap<'a>,
}

impl<M: ?Sized> fmt::Debug for RamBlock<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamBlock")
            .field("name", &self.name)
            .field("used_len", &self.used_len)
            .field("page_size", &self.page_size)
            .field("memory_zeroed", &self.memory_zeroed)
            .field("policy", &self.policy)
            .field("bitmap", &self.bitmap)
            .finish()
    }
}

impl<'a, M: GuestMemory + ?Sized> RamBlock<'a, M> {
    /// A block described by `spec`, over `memory`, with its bitmap in `words` (cleared here).
    pub fn new(
        spec: &BlockSpec<'_>,
        policy: ZeroPagePolicy,
        memory: &'a M,
        words: &'a [AtomicWord],
    ) -> Result<Self, BlockError> {
        let name = BlockName::new(spec.name)?;
        let page_size = spec.page_size;
        let bad_len = BlockError::BadUsedLength { used_len: spec.used_len, page_size: page_size.page_size() };
        if spec.used_len == 0 || !spec.used_len.is_multiple_of(u64::from(page_size.page_size())) {
            return Err(bad_len);
        }
        let mapped = memory.len();
        let used_len = match usize::try_from(spec.used_len) {
            Ok(n) if n <= mapped => n,
            _ => return Err(BlockError::MemoryTooSmall { used_len: spec.used_len, mapped }),
        };
        let bitmap = ReceivedBitmap::new(words, used_len >> page_size.shift())?;
        debug!(
            "block {:?}: {} pages of {} bytes, zeroed {}",
            name,
            bitmap.pages(),
            page_size.page_size(),
            spec.memory_zeroed
        );
        Ok(Self { name, used_len, page_size, memory_zeroed: spec.memory_zeroed, policy, memory, bitmap })
    }

    /// The block's name.
    pub fn name(&self) -> &BlockName {
        &self.name
    }

    /// Bytes in use.
    pub fn used_len(&self) -> usize {
        self.used_len
    }

    /// The block's page size.
    pub fn page_size(&self) -> Geometry {
        self.page_size
    }

    /// Pages in the block (used length / page size).
    pub fn pages(&self) -> usize {
        self.bitmap.pages()
    }

    /// Whether the block's memory was declared zero-initialised.
    pub fn memory_zeroed(&self) -> bool {
        self.memory_zeroed
    }

    /// The block's received bitmap.
    pub fn bitmap(&self) -> &ReceivedBitmap<'a> {
        &self.bitmap
    }

    /// The guest memory the block maps.
    pub fn memory(&self) -> &M {
        self.memory
    }

    /// The page starting at byte `offset` (from the wire): page aligned and wholly inside the used
    /// length, else a typed error.
    pub fn page_at(&self, offset: u64) -> Result<PageIndex, BlockError> {
        let page_size = self.page_size.page_size();
        if !offset.is_multiple_of(u64::from(page_size)) {
            return Err(BlockError::UnalignedOffset { offset, page_size });
        }
        // Aligned and below used_len (itself a multiple of the page size): the whole page fits.
        match usize::try_from(offset) {
            Ok(off) if off < self.used_len => Ok(PageIndex::new(off >> self.page_size.shift())),
            _ => Err(BlockError::OffsetOutOfRange { offset, used_len: self.used_len as u64 }),
        }
    }

    fn offset_of(&self, page: PageIndex) -> Result<usize, BlockError> {
        if page.get() >= self.pages() {
            return Err(BitmapError::PageOutOfRange { page: page.get(), pages: self.pages() }.into());
        }
        Ok(page.get() << self.page_size.shift())
    }

    /// Writes one page of data, then sets its bit (publishing the bytes to Acquire readers).
    pub fn write_page(&self, page: PageIndex, data: &[u8]) -> Result<(), BlockError> {
        let offset = self.offset_of(page)?;
        if data.len() != self.page_size.bytes() {
            return Err(BlockError::BadDataLength { len: data.len(), page_size: self.page_size.page_size() });
        }
        self.memory.write(offset, data);
        self.bitmap.set(page)?;
        Ok(())
    }

    /// Applies a zero page: skips the write only the first time on a block declared zeroed under
    /// [`ZeroPagePolicy::SkipUntouched`]; otherwise writes zeros. Always leaves the bit set.
    pub fn zero_page(&self, page: PageIndex) -> Result<ZeroPage, BlockError> {
        let offset = self.offset_of(page)?;
        let may_skip = self.memory_zeroed && self.policy == ZeroPagePolicy::SkipUntouched;
        if may_skip && !self.bitmap.test_and_set(page)? {
            trace!("zero page {:?} of {:?}: first time on zeroed memory, not written", page, self.name);
            return Ok(ZeroPage::Skipped);
        }
        // Either received before (the AcqRel test-and-set above ordered us after that write, and the
        // bit is already set), or writes are required: write the zeros, then set (publishes them).
        self.memory.fill_zero(offset, self.page_size.bytes());
        self.bitmap.set(page)?;
        Ok(ZeroPage::Written)
    }

    /// Byte offset of `page` in the block's memory (for [`GuestMemory::raw_range`]).
    pub fn byte_offset(&self, page: PageIndex) -> Result<usize, BlockError> {
        self.offset_of(page)
    }

    /// Marks `page` received after its bytes were written by other means than
    /// [`RamBlock::write_page`] (a raw write through [`GuestMemory::raw_range`], or fragments through
    /// [`GuestMemory::write`]). The Release set publishes those bytes.
    pub fn mark_received(&self, page: PageIndex) -> Result<(), BlockError> {
        self.offset_of(page)?;
        self.bitmap.set(page)?;
        Ok(())
    }

    /// Copies one page out of guest memory (for checks and for the send side).
    pub fn read_page(&self, page: PageIndex, out: &mut [u8]) -> Result<(), BlockError> {
        let offset = self.offset_of(page)?;
        if out.len() != self.page_size.bytes() {
            return Err(BlockError::BadDataLength { len: out.len(), page_size: self.page_size.page_size() });
        }
        self.memory.read(offset, out);
        Ok(())
    }
}

/// Up to `N` RAM blocks of one migration, with no allocation.
pub struct BlockTable<'a, M: ?Sized, const N: usize> {
    blocks: [Option<RamBlock<'a, M>>; N],
    len: usize,
    policy: ZeroPagePolicy,
}

impl<M: ?Sized, const N: usize> fmt::Debug for BlockTable<'_, M, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockTable").field("policy", &self.policy).field("blocks", &&self.blocks[..self.len]).finish()
    }
}

impl<'a, M: GuestMemory + ?Sized, const N: usize> BlockTable<'a, M, N> {
    /// An empty table whose blocks follow `policy` for zero pages.
    pub const fn new(policy: ZeroPagePolicy) -> Self {
        Self { blocks: [const { None }; N], len: 0, policy }
    }

    /// The zero-page policy.
    pub fn policy(&self) -> ZeroPagePolicy {
        self.policy
    }

    /// Adds a block over `memory` with its bitmap in `words` (which is cleared).
    pub fn add(&mut self, spec: &BlockSpec<'_>, memory: &'a M, words: &'a [AtomicWord]) -> Result<BlockId, BlockError> {
        if self.len == N {
            return Err(BlockError::TableFull { capacity: N });
        }
        if self.find(spec.name).is_some() {
            return Err(BlockError::DuplicateName);
        }
        let id = u16::try_from(self.len).map_err(|_| BlockError::TableFull { capacity: self.len })?;
        self.blocks[self.len] = Some(RamBlock::new(spec, self.policy, memory, words)?);
        self.len += 1;
        Ok(BlockId(id))
    }

    /// Blocks in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table has no blocks.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block `id`.
    pub fn get(&self, id: BlockId) -> Option<&RamBlock<'a, M>> {
        self.blocks.get(id.index())?.as_ref()
    }

    /// The block named `name` (as a packet names it), with its id.
    pub fn find(&self, name: &[u8]) -> Option<(BlockId, &RamBlock<'a, M>)> {
        self.iter().find(|(_, b)| b.name.as_bytes() == name)
    }

    /// All blocks, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = (BlockId, &RamBlock<'a, M>)> {
        // Indices are below N and below u16::MAX (`add` refuses more).
        self.blocks[..self.len].iter().enumerate().filter_map(|(i, b)| Some((BlockId(i as u16), b.as_ref()?)))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::bitmap::words_for;
    use crate::lifecycle::testing::Inline;
    use crate::lifecycle::{ChannelId, ChannelState, CleanupError, Coordinator};
    use crate::sync::AtomicUsize;
    use core::convert::Infallible;
    use proptest::prelude::*;
    use std::vec::Vec;

    const PS: usize = 1024;

    /// Guest memory that counts the calls that touch it, over atomic bytes pre-filled with `fill`.
    struct Recorder {
        bytes: Vec<AtomicU8>,
        touches: AtomicUsize,
    }

    impl Recorder {
        fn new(len: usize, fill: u8) -> Self {
            Self { bytes: (0..len).map(|_| AtomicU8::new(fill)).collect(), touches: AtomicUsize::new(0) }
        }
        fn touches(&self) -> usize {
            self.touches.load(Ordering::Relaxed)
        }
        fn page(&self, page: usize) -> Vec<u8> {
            let mut out = std::vec![0u8; PS];
            AtomicRegion::new(&self.bytes).read(page * PS, &mut out);
            out
        }
    }

    impl GuestMemory for Recorder {
        fn len(&self) -> usize {
            self.bytes.len()
        }
        fn write(&self, offset: usize, data: &[u8]) {
            self.touches.fetch_add(1, Ordering::Relaxed);
            AtomicRegion::new(&self.bytes).write(offset, data);
        }
        fn fill_zero(&self, offset: usize, len: usize) {
            self.touches.fetch_add(1, Ordering::Relaxed);
            AtomicRegion::new(&self.bytes).fill_zero(offset, len);
        }
        fn read(&self, offset: usize, out: &mut [u8]) {
            AtomicRegion::new(&self.bytes).read(offset, out);
        }
    }

    /// Memory that only has a length, for tests that never touch pages (cheap under Miri).
    struct Unbacked(usize);

    impl GuestMemory for Unbacked {
        fn len(&self) -> usize {
            self.0
        }
        fn write(&self, _: usize, _: &[u8]) {
            unreachable!("validation tests write no pages")
        }
        fn fill_zero(&self, _: usize, _: usize) {
            unreachable!("validation tests write no pages")
        }
        fn read(&self, _: usize, _: &mut [u8]) {
            unreachable!("validation tests read no pages")
        }
    }

    fn words(pages: usize) -> Vec<AtomicWord> {
        (0..words_for(pages)).map(|_| AtomicWord::new(0)).collect()
    }

    fn spec(pages: usize, zeroed: bool) -> BlockSpec<'static> {
        BlockSpec {
            name: b"ram0",
            used_len: (pages * PS) as u64,
            page_size: Geometry::new(PS as u32).unwrap(),
            memory_zeroed: zeroed,
        }
    }

    fn p(i: usize) -> PageIndex {
        PageIndex::new(i)
    }

    #[test]
    fn first_zero_page_on_zeroed_block_leaves_memory_untouched_and_sets_the_bit() {
        let (mem, w) = (Recorder::new(8 * PS, 0), words(8));
        let b = RamBlock::new(&spec(8, true), ZeroPagePolicy::SkipUntouched, &mem, &w).unwrap();
        assert_eq!(b.zero_page(p(2)), Ok(ZeroPage::Skipped));
        assert_eq!(mem.touches(), 0, "memory must not be touched");
        assert!(b.bitmap().test(p(2)).unwrap());
        assert_eq!(b.bitmap().count(), 1);
    }

    #[test]
    fn zero_page_on_a_page_received_before_writes_zeros() {
        let (mem, w) = (Recorder::new(8 * PS, 0), words(8));
        let b = RamBlock::new(&spec(8, true), ZeroPagePolicy::SkipUntouched, &mem, &w).unwrap();
        assert_eq!(b.zero_page(p(2)), Ok(ZeroPage::Skipped));
        assert_eq!(b.zero_page(p(2)), Ok(ZeroPage::Written), "second zero page: bit set, so write");
        assert_eq!(mem.touches(), 1);
    }

    /// QEMU B31/B33: page sent as data in round k, as a zero page in round k+1, must end zero.
    #[test]
    fn data_in_round_k_then_zero_in_round_k_plus_1_ends_zero() {
        for policy in [ZeroPagePolicy::SkipUntouched, ZeroPagePolicy::AlwaysPopulate] {
            for zeroed in [true, false] {
                let (mem, w) = (Recorder::new(6 * PS, 0), words(6));
                let b = RamBlock::new(&spec(6, zeroed), policy, &mem, &w).unwrap();
                b.write_page(p(5), &[0x5A; PS]).unwrap();
                assert_eq!(mem.page(5), [0x5A; PS]);
                assert_eq!(b.zero_page(p(5)), Ok(ZeroPage::Written), "{:?} zeroed={}", policy, zeroed);
                assert_eq!(mem.page(5), [0; PS], "{:?} zeroed={}: stale data left", policy, zeroed);
                assert!(b.bitmap().test(p(5)).unwrap());
            }
        }
    }

    #[test]
    fn zero_page_on_block_not_declared_zeroed_is_always_written() {
        let (mem, w) = (Recorder::new(8 * PS, 0xEE), words(8));
        let b = RamBlock::new(&spec(8, false), ZeroPagePolicy::SkipUntouched, &mem, &w).unwrap();
        assert_eq!(b.zero_page(p(0)), Ok(ZeroPage::Written));
        assert_eq!(mem.page(0), [0; PS], "prior content must be overwritten");
        assert_eq!(mem.page(1), [0xEE; PS], "other pages untouched");
        assert!(b.bitmap().test(p(0)).unwrap());
    }

    /// QEMU B32: with postcopy possible, "bit set" must mean "page present", so the first zero page is
    /// written even on zeroed memory.
    #[test]
    fn always_populate_writes_first_time_zero_pages() {
        let (mem, w) = (Recorder::new(8 * PS, 0), words(8));
        let b = RamBlock::new(&spec(8, true), ZeroPagePolicy::AlwaysPopulate, &mem, &w).unwrap();
        assert_eq!(b.zero_page(p(7)), Ok(ZeroPage::Written));
        assert_eq!(mem.touches(), 1);
        assert!(b.bitmap().test(p(7)).unwrap());
    }

    #[test]
    fn every_data_write_sets_the_bit() {
        let (mem, w) = (Recorder::new(8 * PS, 0), words(8));
        let b = RamBlock::new(&spec(8, true), ZeroPagePolicy::SkipUntouched, &mem, &w).unwrap();
        for i in [0, 3, 7] {
            b.write_page(p(i), &[i as u8 + 1; PS]).unwrap();
            assert!(b.bitmap().test(p(i)).unwrap());
        }
        assert_eq!(b.bitmap().count(), 3);
        let mut out = [0u8; PS];
        b.read_page(p(3), &mut out).unwrap();
        assert_eq!(out, [4; PS]);
        assert_eq!(b.write_page(p(1), &[0; 10]), Err(BlockError::BadDataLength { len: 10, page_size: 1024 }));
        assert_eq!(
            b.write_page(p(8), &[0; PS]),
            Err(BlockError::Bitmap(BitmapError::PageOutOfRange { page: 8, pages: 8 }))
        );
        assert!(!b.bitmap().test(p(1)).unwrap(), "a refused write sets nothing");
    }

    #[test]
    fn page_at_validates_offsets_from_the_wire() {
        let (mem, w) = (Recorder::new(8 * PS, 0), words(8));
        let b = RamBlock::new(&spec(8, true), ZeroPagePolicy::SkipUntouched, &mem, &w).unwrap();
        assert_eq!(b.page_at(0), Ok(p(0)));
        assert_eq!(b.page_at(7 * PS as u64), Ok(p(7)));
        assert_eq!(b.page_at(8 * PS as u64), Err(BlockError::OffsetOutOfRange { offset: 8192, used_len: 8192 }));
        assert_eq!(b.page_at(100), Err(BlockError::UnalignedOffset { offset: 100, page_size: 1024 }));
        assert_eq!(
            b.page_at(u64::MAX - 1023),
            Err(BlockError::OffsetOutOfRange { offset: u64::MAX - 1023, used_len: 8192 })
        );
    }

    #[test]
    fn block_and_table_validation_errors_are_typed() {
        let (mem, w) = (Unbacked(8 * PS), words(8));
        assert_eq!(Geometry::new(4096), Ok(Geometry::DEFAULT));
        for bad in [0, 512, 3000, 128 * 1024] {
            assert_eq!(Geometry::new(bad), Err(crate::wire::DecodeError::BadPageSize { page_size: bad }));
        }
        assert_eq!(Geometry::new(1024).map(Geometry::shift), Ok(10));
        assert_eq!(BlockName::new(b"").unwrap_err(), BlockError::BadNameLength { len: 0 });
        assert_eq!(BlockName::new(&[b'a'; 256]).unwrap_err(), BlockError::BadNameLength { len: 256 });
        assert_eq!(BlockName::new(b"a\0b").unwrap_err(), BlockError::NulInName { at: 1 });
        assert_eq!(BlockName::new(&[b'a'; 255]).map(|n| n.as_bytes().len()), Ok(255));

        let mut t: BlockTable<'_, Unbacked, 2> = BlockTable::new(ZeroPagePolicy::SkipUntouched);
        let mut s = spec(8, true);
        s.used_len = 1000;
        assert_eq!(t.add(&s, &mem, &w).unwrap_err(), BlockError::BadUsedLength { used_len: 1000, page_size: 1024 });
        s.used_len = 9 * PS as u64;
        assert_eq!(t.add(&s, &mem, &w).unwrap_err(), BlockError::MemoryTooSmall { used_len: 9216, mapped: 8192 });
        let a = t.add(&spec(8, true), &mem, &w).unwrap();
        assert_eq!(t.add(&spec(8, true), &mem, &w).unwrap_err(), BlockError::DuplicateName);
        let small = words(1);
        let big_mem = Unbacked(200 * PS);
        let s2 = BlockSpec { name: b"vga.vram", used_len: 200 * PS as u64, ..spec(1, true) };
        assert_eq!(
            t.add(&s2, &big_mem, &small).unwrap_err(),
            BlockError::Bitmap(BitmapError::StorageTooSmall { pages: 200, need_words: words_for(200), have_words: 1 })
        );
        let w2 = words(200);
        let b = t.add(&s2, &big_mem, &w2).unwrap();
        let w3 = words(8);
        let s3 = BlockSpec { name: b"third", ..spec(8, true) };
        assert_eq!(t.add(&s3, &mem, &w3).unwrap_err(), BlockError::TableFull { capacity: 2 });
        assert_eq!(t.len(), 2);
        assert_eq!(t.find(b"ram0").map(|(id, _)| id), Some(a));
        assert_eq!(t.find(b"vga.vram").map(|(id, blk)| (id, blk.pages())), Some((b, 200)));
        assert!(t.find(b"nope").is_none());
        assert_eq!(t.get(b).map(|blk| blk.name().as_str()), Some(Some("vga.vram")));
    }

    #[derive(Debug, Clone)]
    enum PageOp {
        Data(usize, u8),
        Zero(usize),
    }

    proptest! {
        // Miri runs a handful of cases: enough to check the code paths for undefined behaviour.
        #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 3 } else { 256 }, failure_persistence: None, ..ProptestConfig::default() })]

        /// Against a model of what the source sent: after any sequence of data and zero pages, every
        /// page sent holds its last content, every page never sent is untouched, and the bit is set
        /// exactly for pages sent; memory is touched only when the rules allow a skip not to apply.
        #[test]
        fn prop_block_pages_match_model(
            zeroed in any::<bool>(),
            populate in any::<bool>(),
            ops in proptest::collection::vec(prop_oneof![
                (0usize..6, 1u8..=255).prop_map(|(i, v)| PageOp::Data(i, v)),
                (0usize..6).prop_map(PageOp::Zero),
            ], 0..if cfg!(miri) { 8 } else { 30 }),
        ) {
            let initial = if zeroed { 0 } else { 0xC3 };
            let (mem, w) = (Recorder::new(6 * PS, initial), words(6));
            let policy = if populate { ZeroPagePolicy::AlwaysPopulate } else { ZeroPagePolicy::SkipUntouched };
            let b = RamBlock::new(&spec(6, zeroed), policy, &mem, &w).unwrap();
            let mut last: [Option<u8>; 6] = [None; 6];
            for op in ops {
                let before = mem.touches();
                match op {
                    PageOp::Data(i, v) => {
                        b.write_page(p(i), &[v; PS]).unwrap();
                        last[i] = Some(v);
                        prop_assert_eq!(mem.touches(), before + 1);
                    }
                    PageOp::Zero(i) => {
                        let may_skip = zeroed && !populate && last[i].is_none();
                        let expect = if may_skip { ZeroPage::Skipped } else { ZeroPage::Written };
                        prop_assert_eq!(b.zero_page(p(i)), Ok(expect));
                        prop_assert_eq!(mem.touches(), before + usize::from(!may_skip));
                        last[i] = Some(0);
                    }
                }
            }
            for (i, l) in last.iter().enumerate() {
                prop_assert_eq!(b.bitmap().test(p(i)).unwrap(), l.is_some());
                prop_assert_eq!(mem.page(i), std::vec![l.unwrap_or(initial); PS], "page {}", i);
            }
        }
    }

    type Coord = Coordinator<(), Infallible, 2>;

    #[test]
    fn slot_install_lease_release_cycle() {
        let (mem, w) = (Recorder::new(8 * PS, 0), words(8));
        let slot: TableSlot<'_, Recorder, 2> = TableSlot::new();
        assert_eq!(slot.lease().err(), Some(ReleaseError::NotInstalled));

        let coord = Coord::new(2).unwrap();
        slot.install(coord.id(), ZeroPagePolicy::SkipUntouched, |t| t.add(&spec(8, true), &mem, &w).map(drop)).unwrap();
        assert_eq!(slot.install(coord.id(), ZeroPagePolicy::SkipUntouched, |_| Ok(())), Err(ReleaseError::Occupied));

        assert_eq!(coord.create_all(&Inline, |_| Ok(())).map(|r| r.started), Ok(2));
        let lease = slot.lease().unwrap();
        let second = slot.lease().unwrap();
        lease.with(|t| t.find(b"ram0").unwrap().1.write_page(p(1), &[9; PS])).unwrap();
        assert_eq!(
            slot.release_after(&coord),
            Err(ReleaseError::NotQuiescent(CleanupError::NotQuiescent {
                channel: ChannelId(0),
                state: ChannelState::Running
            })),
            "workers started and not joined: refused"
        );
        let token = coord.cleanup(&Inline).unwrap();
        assert_eq!(token.report().joined, 2);
        assert_eq!(slot.release(&token), Err(ReleaseError::LeasesHeld { leases: 2 }));
        drop(lease);
        assert_eq!(slot.release_after(&coord), Err(ReleaseError::LeasesHeld { leases: 1 }));
        drop(second);
        assert_eq!(slot.release(&token), Ok(()));
        assert_eq!(slot.release(&token), Err(ReleaseError::NotInstalled));
        assert_eq!(slot.lease().err(), Some(ReleaseError::NotInstalled));

        // The storage is free again: the next migration's table reuses it, with a clean bitmap.
        slot.install(coord.id(), ZeroPagePolicy::AlwaysPopulate, |t| t.add(&spec(8, true), &mem, &w).map(drop))
            .unwrap();
        let lease = slot.lease().unwrap();
        lease.with(|t| {
            assert_eq!(t.policy(), ZeroPagePolicy::AlwaysPopulate);
            assert_eq!(t.get(t.find(b"ram0").unwrap().0).unwrap().bitmap().count(), 0);
        });
    }

    #[test]
    fn slot_build_failure_leaves_it_empty() {
        let (mem, w) = (Recorder::new(8 * PS, 0), words(8));
        let slot: TableSlot<'_, Recorder, 1> = TableSlot::new();
        let bad = BlockSpec { used_len: 100, ..spec(8, true) };
        let owner = Coord::new(1).unwrap().id();
        assert_eq!(
            slot.install(owner, ZeroPagePolicy::SkipUntouched, |t| t.add(&bad, &mem, &w).map(drop)),
            Err(ReleaseError::Build(BlockError::BadUsedLength { used_len: 100, page_size: 1024 }))
        );
        assert_eq!(slot.lease().err(), Some(ReleaseError::NotInstalled));
        slot.install(owner, ZeroPagePolicy::SkipUntouched, |t| t.add(&spec(8, true), &mem, &w).map(drop)).unwrap();
        assert_eq!(slot.lease().unwrap().with(|t| t.len()), 1);
    }

    /// The static-storage shape the firmware uses: everything in `static`s, no allocation.
    #[test]
    fn table_slot_lives_in_statics() {
        static MEM: [AtomicU8; 4 * 1024] = [const { AtomicU8::new(0) }; 4 * 1024];
        static WORDS: [AtomicWord; 1] = [const { AtomicWord::new(0) }];
        static REGION: AtomicRegion<'static> = AtomicRegion::new(&MEM);
        static SLOT: TableSlot<'static, AtomicRegion<'static>, 1> = TableSlot::new();
        let coord = Coord::new(1).unwrap();
        SLOT.install(coord.id(), ZeroPagePolicy::SkipUntouched, |t| t.add(&spec(4, true), &REGION, &WORDS).map(drop))
            .unwrap();
        std::thread::scope(|s| {
            for i in 0..2 {
                s.spawn(move || {
                    let lease = SLOT.lease().unwrap();
                    lease.with(|t| t.get(t.find(b"ram0").unwrap().0).unwrap().write_page(p(i), &[1; PS])).unwrap();
                });
            }
        });
        // The scope joined both workers; a coordinator that started none gives the token.
        assert_eq!(SLOT.release(&coord.cleanup(&Inline).unwrap()), Ok(()));
        assert_eq!(WORDS[0].load(Ordering::Relaxed), 0b11, "both workers' bits landed before release");
    }
}
