//! The received bitmap: one bit per page of a RAM block, set once the page's bytes are in guest
//! memory.
//!
//! The destination uses it for three things: to decide whether a zero page may be skipped (a page
//! never received on zero-initialised memory already reads as zero), to answer "is this page here?"
//! on the postcopy fault path, and to tell the source, after a postcopy network failure, which pages
//! it still has to send (see [`ReceivedBitmap::export`]; postcopy is not implemented yet, so that
//! part of the API, `export`/`import` and their errors, `iter_clear_runs`, waits for it).
//!
//! # Storage and concurrency
//!
//! [`ReceivedBitmap`] borrows its words (`&'a [AtomicWord]`, native width), so the storage can be a
//! `static` on firmware, a `Vec` on a host, or a tiny vector inside a loom model. Every receive worker
//! of a migration shares one `&ReceivedBitmap`; all mutation is atomic:
//!
//! - setting bits is an atomic OR ([`set`](ReceivedBitmap::set), [`set_run`](ReceivedBitmap::set_run)
//!   does one read-modify-write per word touched), so two workers that set bits in the same word never
//!   lose each other's bits;
//! - a set is a `Release` operation and a test an `Acquire` one: a worker writes the page bytes, then
//!   sets the bit; a thread that sees the bit set also sees those bytes;
//! - clearing is `Relaxed`: a clear publishes nothing, and clears are ordered against workers by the
//!   migration's sync barrier or by joining the workers first.
//!
//! Bits past the last page are kept zero: construction clears the whole storage, and no operation
//! accepts a page index at or beyond [`pages`](ReceivedBitmap::pages).
//!
//! # Example
//!
//! ```
//! use multifd_core::bitmap::{AtomicWord, PageIndex, ReceivedBitmap, words_for};
//!
//! // 100 pages; on firmware this array would be a `static`.
//! let words: [AtomicWord; words_for(100)] = [const { AtomicWord::new(0) }; words_for(100)];
//! let bitmap = ReceivedBitmap::new(&words, 100)?;
//! bitmap.set_run(PageIndex::new(60), 10)?;
//! assert!(!bitmap.test_and_set(PageIndex::new(3))?, "first time: the bit was clear");
//! assert!(bitmap.test(PageIndex::new(65))?);
//! assert_eq!(bitmap.count(), 11);
//! let missing: Vec<_> = bitmap.iter_clear_runs().map(|r| (r.first.get(), r.len)).collect();
//! assert_eq!(missing, [(0, 3), (4, 56), (70, 30)]);
//! # Ok::<(), Box<dyn core::error::Error>>(())
//! ```

use core::fmt;

use crate::sync::{AtomicUsize, Ordering};

/// One word of bitmap storage: the target's native atomic width (32 bits on thumbv7/riscv32, 64 on
/// aarch64/x86_64).
pub type AtomicWord = AtomicUsize;

/// Bits in one [`AtomicWord`].
pub const WORD_BITS: usize = usize::BITS as usize;

/// Words of storage a bitmap of `pages` pages needs.
pub const fn words_for(pages: usize) -> usize {
    pages.div_ceil(WORD_BITS)
}

/// The 64-bit value that ends one block's bitmap in QEMU's postcopy-recovery layout. Used by
/// [`ReceivedBitmap::export`] and [`ReceivedBitmap::import`], whose intended user is postcopy
/// recovery (not implemented yet).
pub const RECV_BITMAP_END_MARK: u64 = 0x0123_4567_89ab_cdef;

/// Index of a page inside one RAM block (byte offset divided by the block's page size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PageIndex(usize);

impl PageIndex {
    /// The page with index `index`.
    pub const fn new(index: usize) -> Self {
        Self(index)
    }

    /// The index as a plain number.
    pub const fn get(self) -> usize {
        self.0
    }
}

impl fmt::Display for PageIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page {}", self.0)
    }
}

/// A maximal run of consecutive pages whose bits are all clear, from
/// [`ReceivedBitmap::iter_clear_runs`] (intended user: postcopy recovery, see there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PageRun {
    /// First page of the run.
    pub first: PageIndex,
    /// Number of pages in the run (at least 1).
    pub len: usize,
}

impl PageRun {
    /// One past the last page of the run.
    pub const fn end(&self) -> usize {
        self.first.0 + self.len
    }
}

/// Why a bitmap operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum BitmapError {
    /// The storage handed to [`ReceivedBitmap::new`] has fewer words than `pages` need.
    StorageTooSmall {
        /// Pages the bitmap was asked to cover.
        pages: usize,
        /// Words those pages need.
        need_words: usize,
        /// Words the storage has.
        have_words: usize,
    },
    /// A page index at or beyond the end of the block.
    PageOutOfRange {
        /// The index asked for.
        page: usize,
        /// Pages in the block.
        pages: usize,
    },
    /// A run that is empty, or that does not fit inside the block.
    RunOutOfRange {
        /// First page of the run.
        first: usize,
        /// Pages in the run.
        len: usize,
        /// Pages in the block.
        pages: usize,
    },
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::StorageTooSmall { pages, need_words, have_words } => write!(
                f,
                "bitmap storage too small: {} pages need {} words, storage has {}",
                pages, need_words, have_words
            ),
            Self::PageOutOfRange { page, pages } => {
                write!(f, "page index {} out of range: the block has {} pages", page, pages)
            }
            Self::RunOutOfRange { first, len, pages } => write!(
                f,
                "page run of {} pages from index {} is empty or past the end of a {}-page block",
                len, first, pages
            ),
        }
    }
}

impl core::error::Error for BitmapError {}

/// Why [`ReceivedBitmap::export`] could not write its output. Not used yet: its intended user is postcopy recovery (see
/// [`ReceivedBitmap::export`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ExportError {
    /// The output buffer is shorter than [`ReceivedBitmap::export_len`].
    BufferTooSmall {
        /// Bytes the export needs.
        need: usize,
        /// Bytes the buffer has.
        have: usize,
    },
}

impl fmt::Display for ExportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BufferTooSmall { need, have } => {
                write!(f, "bitmap export needs {} bytes, buffer has {}", need, have)
            }
        }
    }
}

impl core::error::Error for ExportError {}

/// Why bytes in QEMU's postcopy-recovery bitmap layout were rejected by [`ReceivedBitmap::import`].
/// Not used yet: its intended user is postcopy recovery (see [`ReceivedBitmap::import`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ImportError {
    /// Fewer bytes than the length field, or than the length field announces plus the end mark.
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The length field does not match this bitmap's page count.
    LengthMismatch {
        /// Bitmap bytes this block's page count gives.
        expected: u64,
        /// Bitmap bytes the input announces.
        got: u64,
    },
    /// The 64-bit value after the bitmap is not [`RECV_BITMAP_END_MARK`].
    BadEndMark {
        /// The value found.
        got: u64,
    },
    /// A bit past the block's last page is set.
    BitPastEnd {
        /// Index of the first such bit.
        bit: usize,
        /// Pages in the block.
        pages: usize,
    },
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated { need, have } => {
                write!(f, "received-bitmap message truncated: need {} bytes, have {}", need, have)
            }
            Self::LengthMismatch { expected, got } => {
                write!(f, "received-bitmap length field is {} bytes, the block's page count gives {}", got, expected)
            }
            Self::BadEndMark { got } => {
                write!(f, "received-bitmap end mark is {:#018x}, expected {:#018x}", got, RECV_BITMAP_END_MARK)
            }
            Self::BitPastEnd { bit, pages } => {
                write!(f, "received bitmap sets bit {} but the block has only {} pages", bit, pages)
            }
        }
    }
}

impl core::error::Error for ImportError {}

/// Every atomic OR on bitmap words goes through here, so a test build can count read-modify-writes.
#[inline(always)]
fn fetch_or(word: &AtomicWord, mask: usize, order: Ordering) -> usize {
    #[cfg(all(test, not(loom)))]
    rmw_count::bump();
    word.fetch_or(mask, order)
}

/// Every atomic AND on bitmap words goes through here (counted like [`fetch_or`]).
#[inline(always)]
fn fetch_and(word: &AtomicWord, mask: usize, order: Ordering) -> usize {
    #[cfg(all(test, not(loom)))]
    rmw_count::bump();
    word.fetch_and(mask, order)
}

/// Mask of bits `lo..hi` of one word (`lo < hi <= WORD_BITS`).
#[inline(always)]
fn bits_mask(lo: usize, hi: usize) -> usize {
    let upper = if hi == WORD_BITS { usize::MAX } else { (1usize << hi) - 1 };
    upper & (usize::MAX << lo)
}

/// The received bitmap of one RAM block, over borrowed atomic words. See the module documentation.
pub struct ReceivedBitmap<'a> {
    words: &'a [AtomicWord],
    pages: usize,
}

impl fmt::Debug for ReceivedBitmap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceivedBitmap").field("pages", &self.pages).field("set", &self.count()).finish()
    }
}

impl<'a> ReceivedBitmap<'a> {
    /// A bitmap of `pages` pages over `words`, with every bit clear. The whole storage is cleared, so
    /// no bit from an earlier use of it survives. `words` may be longer than needed; the extra words
    /// are cleared and then unused.
    pub fn new(words: &'a [AtomicWord], pages: usize) -> Result<Self, BitmapError> {
        let need_words = words_for(pages);
        if words.len() < need_words {
            return Err(BitmapError::StorageTooSmall { pages, need_words, have_words: words.len() });
        }
        for w in words {
            // Relaxed: a fresh bitmap publishes nothing; whoever shares it with workers afterwards
            // (a scoped spawn, or the block-table slot's Release) orders these stores before them.
            w.store(0, Ordering::Relaxed);
        }
        Ok(Self { words: &words[..need_words], pages })
    }

    /// A second view of storage another `ReceivedBitmap` already initialised (loom threads need
    /// `'static` captures, so each builds its own view of an `Arc`'d vector). Does not clear.
    #[cfg(all(test, loom))]
    fn new_shared(words: &'a [AtomicWord], pages: usize) -> Self {
        Self { words: &words[..words_for(pages)], pages }
    }

    /// Pages covered by the bitmap.
    pub const fn pages(&self) -> usize {
        self.pages
    }

    fn check_page(&self, page: PageIndex) -> Result<(usize, usize), BitmapError> {
        if page.0 >= self.pages {
            return Err(BitmapError::PageOutOfRange { page: page.0, pages: self.pages });
        }
        Ok((page.0 / WORD_BITS, 1usize << (page.0 % WORD_BITS)))
    }

    /// Marks `page` received. Call it after the page's bytes are written: the set publishes them.
    pub fn set(&self, page: PageIndex) -> Result<(), BitmapError> {
        let (w, bit) = self.check_page(page)?;
        // Release: publishes the page bytes written before this set to any Acquire test of the bit.
        fetch_or(&self.words[w], bit, Ordering::Release);
        Ok(())
    }

    /// Whether `page` has been received. If it has, the page bytes written before its set are visible
    /// to the caller.
    pub fn test(&self, page: PageIndex) -> Result<bool, BitmapError> {
        let (w, bit) = self.check_page(page)?;
        // Acquire: pairs with the Release of the set, so the page bytes behind a set bit are visible.
        Ok(self.words[w].load(Ordering::Acquire) & bit != 0)
    }

    /// Sets `page`'s bit and returns whether it was already set. Of several callers racing on one clear
    /// bit, exactly one sees `false`.
    pub fn test_and_set(&self, page: PageIndex) -> Result<bool, BitmapError> {
        let (w, bit) = self.check_page(page)?;
        // AcqRel: Release publishes bytes written before, as `set` does; Acquire orders what the caller
        // does next (for example overwriting the page with zeros) after the earlier setter's writes.
        Ok(fetch_or(&self.words[w], bit, Ordering::AcqRel) & bit != 0)
    }

    fn check_run(&self, first: PageIndex, len: usize) -> Result<(), BitmapError> {
        match first.0.checked_add(len) {
            Some(end) if len > 0 && end <= self.pages => Ok(()),
            _ => Err(BitmapError::RunOutOfRange { first: first.0, len, pages: self.pages }),
        }
    }

    /// Calls `f(word_index, mask)` for each word the run `first..first+len` touches (validated).
    #[inline(always)]
    fn for_each_word_of_run(first: usize, len: usize, mut f: impl FnMut(usize, usize)) {
        let end = first + len;
        let (first_word, last_word) = (first / WORD_BITS, (end - 1) / WORD_BITS);
        for w in first_word..=last_word {
            let lo = if w == first_word { first % WORD_BITS } else { 0 };
            let hi = if w == last_word { end - last_word * WORD_BITS } else { WORD_BITS };
            f(w, bits_mask(lo, hi));
        }
    }

    /// Marks the `len` pages from `first` received, with one atomic read-modify-write per word the run
    /// touches (a 128-page run on 64-bit words: 2 when word-aligned, else 3).
    pub fn set_run(&self, first: PageIndex, len: usize) -> Result<(), BitmapError> {
        self.check_run(first, len)?;
        Self::for_each_word_of_run(first.0, len, |w, mask| {
            // Release: publishes the bytes of every page of the run written before, as in `set`.
            fetch_or(&self.words[w], mask, Ordering::Release);
        });
        Ok(())
    }

    /// Marks the `len` pages from `first` not received (for a discarded range), one read-modify-write
    /// per word touched.
    pub fn clear_run(&self, first: PageIndex, len: usize) -> Result<(), BitmapError> {
        self.check_run(first, len)?;
        Self::for_each_word_of_run(first.0, len, |w, mask| {
            // Relaxed: a clear publishes no page bytes; see the module docs for what orders clears.
            fetch_and(&self.words[w], !mask, Ordering::Relaxed);
        });
        Ok(())
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in self.words {
            // Relaxed: a clear publishes no page bytes; see the module docs for what orders clears.
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Number of pages received. A snapshot: with workers still running it may already be stale.
    pub fn count(&self) -> usize {
        self.words
            .iter()
            // Relaxed: a statistic; no page bytes are read on the strength of it.
            .map(|w| w.load(Ordering::Relaxed).count_ones() as usize)
            .sum()
    }

    /// Maximal runs of received pages, in increasing order. Test-only: the checker of
    /// [`iter_clear_runs`](Self::iter_clear_runs) and of imports; nothing outside needs it.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn iter_set_runs(&self) -> Runs<'_> {
        Runs { words: self.words, pages: self.pages, pos: 0, want_set: true }
    }

    /// Maximal runs of pages not yet received, in increasing order. Not used yet: its intended user is postcopy recovery: a source
    /// that [`import`](Self::import)ed the destination's bitmap resends exactly these runs (QEMU
    /// turns the received bitmap into the dirty bitmap, `ram_dirty_bitmap_reload`).
    pub fn iter_clear_runs(&self) -> Runs<'_> {
        Runs { words: self.words, pages: self.pages, pos: 0, want_set: false }
    }

    /// Bytes of bitmap in QEMU's postcopy-recovery layout for `pages` pages: one bit per page rounded
    /// up to whole bytes, then up to a multiple of 8. Not used yet: its intended user is postcopy recovery (see [`export`](Self::export)).
    pub const fn export_bitmap_len(pages: usize) -> usize {
        pages.div_ceil(8).next_multiple_of(8)
    }

    /// Bytes [`export`](Self::export) writes: the 8-byte length, the bitmap, the 8-byte end mark.
    /// Not used yet: its intended user is postcopy recovery (see [`export`](Self::export)).
    pub const fn export_len(&self) -> usize {
        8 + Self::export_bitmap_len(self.pages) + 8
    }

    /// Writes the bitmap in the layout a QEMU destination sends to the source during postcopy recovery
    /// (one RAM block's part of it; the block name travels in the enclosing message):
    ///
    /// - the bitmap's byte length ([`export_bitmap_len`](Self::export_bitmap_len)), big-endian `u64`;
    /// - the bitmap as little-endian 64-bit words: page `i` is bit `i % 8` of byte `i / 8`; padding
    ///   bits are zero;
    /// - [`RECV_BITMAP_END_MARK`], big-endian `u64`.
    ///
    /// Returns the bytes written ([`export_len`](Self::export_len)). The layout does not depend on the
    /// native word width.
    ///
    /// Not used yet: its intended user is postcopy recovery: after a postcopy network failure the destination sends each
    /// block's received bitmap back to the source on the return path in this layout (QEMU's
    /// `ramblock_recv_bitmap_send`, message `MIG_RP_MSG_RECV_BITMAP`), so the source resends only
    /// what is missing.
    pub fn export(&self, out: &mut [u8]) -> Result<usize, ExportError> {
        let need = self.export_len();
        let Some(out) = out.get_mut(..need) else {
            return Err(ExportError::BufferTooSmall { need, have: out.len() });
        };
        let bitmap_len = Self::export_bitmap_len(self.pages);
        let (len_field, rest) = out.split_at_mut(8);
        let (body, end_field) = rest.split_at_mut(bitmap_len);
        len_field.copy_from_slice(&(bitmap_len as u64).to_be_bytes());
        body.fill(0);
        // The native words' little-endian bytes are exactly the layout's bytes, whatever the width;
        // `words_for(pages) * WORD_BITS / 8 <= bitmap_len`, so they always fit.
        for (chunk, w) in body.chunks_mut(WORD_BITS / 8).zip(self.words) {
            // Acquire: the export reports pages as received; it pairs with the setters' Release.
            let bytes = w.load(Ordering::Acquire).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        end_field.copy_from_slice(&RECV_BITMAP_END_MARK.to_be_bytes());
        Ok(need)
    }

    /// Reads one block's bitmap in the layout [`export`](Self::export) writes and sets every page it
    /// marks (bits already set stay set). The input is checked completely first: on error nothing is
    /// changed. Returns the bytes consumed.
    ///
    /// Not used yet: its intended user is postcopy recovery, on the source side: it reads the bitmap the destination sent
    /// with [`export`](Self::export) (QEMU's `ram_dirty_bitmap_reload`); the tests use it to check the
    /// exporter.
    pub fn import(&self, input: &[u8]) -> Result<usize, ImportError> {
        let read_u64 = |at: usize| -> Result<u64, ImportError> {
            let need = at + 8;
            let bytes = input.get(at..need).ok_or(ImportError::Truncated { need, have: input.len() })?;
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            Ok(u64::from_be_bytes(b))
        };
        let expected = Self::export_bitmap_len(self.pages);
        let got = read_u64(0)?;
        if got != expected as u64 {
            return Err(ImportError::LengthMismatch { expected: expected as u64, got });
        }
        let mark = read_u64(8 + expected)?;
        if mark != RECV_BITMAP_END_MARK {
            return Err(ImportError::BadEndMark { got: mark });
        }
        let body = &input[8..8 + expected];
        // Bits past the last page must be zero: check the partial byte, then every byte after it.
        let first_bad = (self.pages..self.pages.next_multiple_of(8))
            .find(|&bit| body[bit / 8] & (1 << (bit % 8)) != 0)
            .or_else(|| {
                let from = self.pages.div_ceil(8);
                body[from..]
                    .iter()
                    .position(|&b| b != 0)
                    .map(|i| (from + i) * 8 + body[from + i].trailing_zeros() as usize)
            });
        if let Some(bit) = first_bad {
            return Err(ImportError::BitPastEnd { bit, pages: self.pages });
        }
        for (chunk, w) in body.chunks(WORD_BITS / 8).zip(self.words) {
            let mut bytes = [0u8; WORD_BITS / 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            let mask = usize::from_le_bytes(bytes);
            if mask != 0 {
                // Release: as in `set`; imported bits stand for pages another party holds, and the
                // same ordering keeps every set alike.
                fetch_or(w, mask, Ordering::Release);
            }
        }
        Ok(8 + expected + 8)
    }
}

/// Iterator over maximal runs of clear (or, in tests, set) pages; see
/// [`ReceivedBitmap::iter_clear_runs`].
#[derive(Debug)]
pub struct Runs<'b> {
    words: &'b [AtomicWord],
    pages: usize,
    pos: usize,
    want_set: bool,
}

impl Runs<'_> {
    /// Word `w`, inverted when looking for clear bits, so the search is always for a 1.
    #[inline(always)]
    fn load(&self, w: usize, want_set: bool) -> usize {
        // Acquire: a caller acting on a set bit (for example reading the page) sees the page bytes.
        let v = self.words[w].load(Ordering::Acquire);
        if want_set { v } else { !v }
    }

    /// First page at or after `from` whose bit equals `want_set`, if any.
    #[inline]
    fn seek(&self, from: usize, want_set: bool) -> Option<usize> {
        if from >= self.pages {
            return None;
        }
        let mut w = from / WORD_BITS;
        let mut v = self.load(w, want_set) & (usize::MAX << (from % WORD_BITS));
        loop {
            if v != 0 {
                let page = w * WORD_BITS + v.trailing_zeros() as usize;
                // Inverted padding bits of the last word read as "clear": they are not pages.
                return (page < self.pages).then_some(page);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            v = self.load(w, want_set);
        }
    }
}

impl Iterator for Runs<'_> {
    type Item = PageRun;

    fn next(&mut self) -> Option<PageRun> {
        let start = self.seek(self.pos, self.want_set)?;
        let end = self.seek(start, !self.want_set).unwrap_or(self.pages);
        self.pos = end;
        Some(PageRun { first: PageIndex(start), len: end - start })
    }
}

/// Test-build counter of atomic read-modify-writes on bitmap words, per thread.
#[cfg(all(test, not(loom)))]
pub(crate) mod rmw_count {
    use core::cell::Cell;

    std::thread_local! {
        static COUNT: Cell<usize> = const { Cell::new(0) };
    }

    pub(crate) fn bump() {
        COUNT.with(|c| c.set(c.get() + 1));
    }

    /// Read-modify-writes this thread has done since the last call.
    pub(crate) fn take() -> usize {
        COUNT.with(|c| c.replace(0))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    fn storage(pages: usize) -> Vec<AtomicWord> {
        (0..words_for(pages)).map(|_| AtomicWord::new(0)).collect()
    }

    fn runs_of(model: &[bool], want: bool) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < model.len() {
            if model[i] == want {
                let start = i;
                while i < model.len() && model[i] == want {
                    i += 1;
                }
                runs.push((start, i - start));
            } else {
                i += 1;
            }
        }
        runs
    }

    fn runs_of_bitmap(it: Runs<'_>) -> Vec<(usize, usize)> {
        it.map(|r| (r.first.get(), r.len)).collect()
    }

    /// Everything observable about the bitmap agrees with the model.
    fn assert_matches(b: &ReceivedBitmap<'_>, model: &[bool]) {
        for (i, &m) in model.iter().enumerate() {
            assert_eq!(b.test(PageIndex::new(i)).unwrap(), m, "bit {}", i);
        }
        assert_eq!(b.count(), model.iter().filter(|&&m| m).count());
        assert_eq!(runs_of_bitmap(b.iter_set_runs()), runs_of(model, true));
        assert_eq!(runs_of_bitmap(b.iter_clear_runs()), runs_of(model, false));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(usize),
        TestAndSet(usize),
        SetRun(usize, usize),
        ClearRun(usize, usize),
        Clear,
    }

    fn op(pages: usize) -> impl Strategy<Value = Op> {
        // Indices and lengths reach a little past the end, so out-of-range paths are exercised too.
        let idx = 0..pages + 3;
        prop_oneof![
            4 => idx.clone().prop_map(Op::Set),
            4 => idx.clone().prop_map(Op::TestAndSet),
            4 => (idx.clone(), 0..pages + 3).prop_map(|(a, n)| Op::SetRun(a, n)),
            2 => (idx, 0..pages + 3).prop_map(|(a, n)| Op::ClearRun(a, n)),
            1 => Just(Op::Clear),
        ]
    }

    fn case() -> impl Strategy<Value = (usize, Vec<Op>)> {
        // Page counts below, at and above word multiples (32- and 64-bit words alike).
        // Under Miri: smaller blocks (still past one 64-bit word) and shorter sequences.
        let (max_pages, max_ops) = if cfg!(miri) { (140, 8) } else { (300, 40) };
        (1usize..max_pages).prop_flat_map(move |pages| (Just(pages), proptest::collection::vec(op(pages), 0..max_ops)))
    }

    fn run_ok(first: usize, len: usize, pages: usize) -> bool {
        len > 0 && first + len <= pages
    }

    /// Words a validated run touches: the read-modify-writes it may cost.
    fn words_touched(first: usize, len: usize) -> usize {
        (first + len - 1) / WORD_BITS - first / WORD_BITS + 1
    }

    proptest! {
        // Miri runs a handful of cases: enough to check the code paths for undefined behaviour.
        #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 3 } else { 512 }, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn prop_bitmap_matches_vec_bool_model((pages, ops) in case()) {
            let words = storage(pages);
            let b = ReceivedBitmap::new(&words, pages).unwrap();
            let mut model = std::vec![false; pages];
            for op in ops {
                rmw_count::take();
                match op {
                    Op::Set(i) => {
                        let r = b.set(PageIndex::new(i));
                        if i < pages {
                            prop_assert_eq!(r, Ok(()));
                            model[i] = true;
                        } else {
                            prop_assert_eq!(r, Err(BitmapError::PageOutOfRange { page: i, pages }));
                        }
                    }
                    Op::TestAndSet(i) => {
                        let r = b.test_and_set(PageIndex::new(i));
                        if i < pages {
                            prop_assert_eq!(r, Ok(model[i]));
                            model[i] = true;
                        } else {
                            prop_assert_eq!(r, Err(BitmapError::PageOutOfRange { page: i, pages }));
                        }
                    }
                    Op::SetRun(a, n) | Op::ClearRun(a, n) => {
                        let set = matches!(op, Op::SetRun(..));
                        let r = if set { b.set_run(PageIndex::new(a), n) } else { b.clear_run(PageIndex::new(a), n) };
                        if run_ok(a, n, pages) {
                            prop_assert_eq!(r, Ok(()));
                            model[a..a + n].fill(set);
                            prop_assert_eq!(rmw_count::take(), words_touched(a, n), "one RMW per word touched");
                        } else {
                            prop_assert_eq!(r, Err(BitmapError::RunOutOfRange { first: a, len: n, pages }));
                            prop_assert_eq!(rmw_count::take(), 0, "a refused run touches nothing");
                        }
                    }
                    Op::Clear => {
                        b.clear();
                        model.fill(false);
                    }
                }
                assert_matches(&b, &model);
            }
            // The export carries exactly the model's bits, and imports back to the same bitmap.
            let mut out = std::vec![0xAAu8; b.export_len()];
            prop_assert_eq!(b.export(&mut out), Ok(b.export_len()));
            for (i, &m) in model.iter().enumerate() {
                prop_assert_eq!(out[8 + i / 8] & (1 << (i % 8)) != 0, m, "exported bit {}", i);
            }
            let words2 = storage(pages);
            let b2 = ReceivedBitmap::new(&words2, pages).unwrap();
            prop_assert_eq!(b2.import(&out), Ok(out.len()));
            assert_matches(&b2, &model);
        }
    }

    #[test]
    fn new_rejects_short_storage_and_clears_what_it_is_given() {
        let words = storage(64);
        assert_eq!(
            ReceivedBitmap::new(&words[..1], WORD_BITS + 1).unwrap_err(),
            BitmapError::StorageTooSmall { pages: WORD_BITS + 1, need_words: 2, have_words: 1 }
        );
        words[0].store(usize::MAX, Ordering::Relaxed);
        let b = ReceivedBitmap::new(&words, 64).unwrap();
        assert_eq!(b.count(), 0, "stale bits from an earlier use of the storage must not survive");
    }

    #[test]
    fn run_crossing_two_word_boundaries() {
        let pages = 3 * WORD_BITS;
        let words = storage(pages);
        let b = ReceivedBitmap::new(&words, pages).unwrap();
        rmw_count::take();
        b.set_run(PageIndex::new(WORD_BITS - 1), WORD_BITS + 2).unwrap();
        assert_eq!(rmw_count::take(), 3);
        assert_eq!(runs_of_bitmap(b.iter_set_runs()), [(WORD_BITS - 1, WORD_BITS + 2)]);
        assert_eq!(runs_of_bitmap(b.iter_clear_runs()), [(0, WORD_BITS - 1), (2 * WORD_BITS + 1, WORD_BITS - 1)]);
    }

    /// The goal from the issue: a 128-page run (one full packet of 4 KiB pages) costs at most 3 atomic
    /// read-modify-writes on 64-bit words, at every alignment; exactly 2 when it starts on a word.
    #[test]
    fn run_of_128_pages_costs_at_most_three_rmws() {
        let pages = 1024;
        let words = storage(pages);
        let b = ReceivedBitmap::new(&words, pages).unwrap();
        let bound = 128usize.div_ceil(WORD_BITS) + 1;
        // Every start offset; under Miri a sample of them (each offset class mod 64 still appears).
        let step = if cfg!(miri) { 13 } else { 1 };
        for first in (0..=(pages - 128)).step_by(step) {
            rmw_count::take();
            b.set_run(PageIndex::new(first), 128).unwrap();
            let rmws = rmw_count::take();
            assert!(rmws <= bound, "run at {} cost {} RMWs, bound {}", first, rmws, bound);
            if first % WORD_BITS == 0 {
                assert_eq!(rmws, 128 / WORD_BITS);
            }
        }
        if WORD_BITS == 64 {
            assert_eq!(bound, 3);
        }
    }

    #[test]
    fn export_layout_fixed_vector() {
        // 70 pages: 9 bytes of bits, padded to 16. Pages 0, 9 and 69 set.
        let words = storage(70);
        let b = ReceivedBitmap::new(&words, 70).unwrap();
        for p in [0, 9, 69] {
            b.set(PageIndex::new(p)).unwrap();
        }
        let mut out = [0xFFu8; 40];
        assert_eq!(b.export(&mut out), Ok(32));
        let mut expected = std::vec![0, 0, 0, 0, 0, 0, 0, 16]; // big-endian length 16
        expected.extend_from_slice(&[0x01, 0x02, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(&out[..32], &expected[..]);
        assert_eq!(&out[32..], &[0xFF; 8], "nothing written past the export");
        assert_eq!(b.export(&mut out[..31]), Err(ExportError::BufferTooSmall { need: 32, have: 31 }));
    }

    #[test]
    fn import_rejects_malformed_input_without_changing_the_bitmap() {
        let words = storage(70);
        let b = ReceivedBitmap::new(&words, 70).unwrap();
        b.set(PageIndex::new(5)).unwrap();
        let mut good = [0u8; 32];
        b.export(&mut good).unwrap();
        let target_words = storage(70);
        let t = ReceivedBitmap::new(&target_words, 70).unwrap();

        assert_eq!(t.import(&good[..5]), Err(ImportError::Truncated { need: 8, have: 5 }));
        assert_eq!(t.import(&good[..30]), Err(ImportError::Truncated { need: 32, have: 30 }));
        let mut bad = good;
        bad[7] = 24;
        assert_eq!(t.import(&bad), Err(ImportError::LengthMismatch { expected: 16, got: 24 }));
        let mut bad = good;
        bad[31] ^= 1;
        assert_eq!(t.import(&bad), Err(ImportError::BadEndMark { got: RECV_BITMAP_END_MARK ^ 1 }));
        let mut bad = good;
        bad[8 + 8] |= 0x80; // bit 71: inside the last partial byte, past page 69
        assert_eq!(t.import(&bad), Err(ImportError::BitPastEnd { bit: 71, pages: 70 }));
        let mut bad = good;
        bad[8 + 12] = 0x04; // bit 98: in a padding byte
        assert_eq!(t.import(&bad), Err(ImportError::BitPastEnd { bit: 98, pages: 70 }));
        assert_eq!(t.count(), 0, "refused imports change nothing");

        assert_eq!(t.import(&good), Ok(32));
        assert_eq!(runs_of_bitmap(t.iter_set_runs()), [(5, 1)]);
    }

    #[test]
    fn out_of_range_pages_are_typed_errors() {
        let words = storage(10);
        let b = ReceivedBitmap::new(&words, 10).unwrap();
        let e = BitmapError::PageOutOfRange { page: 10, pages: 10 };
        assert_eq!(b.set(PageIndex::new(10)), Err(e));
        assert_eq!(b.test(PageIndex::new(10)), Err(e));
        assert_eq!(b.test_and_set(PageIndex::new(10)), Err(e));
        assert_eq!(
            b.set_run(PageIndex::new(usize::MAX), 2),
            Err(BitmapError::RunOutOfRange { first: usize::MAX, len: 2, pages: 10 }),
            "overflowing runs are refused, not wrapped"
        );
        assert_eq!(std::format!("{}", e), "page index 10 out of range: the block has 10 pages");
    }

    #[test]
    fn concurrent_setters_in_shared_words_lose_no_bits() {
        let pages = 4 * WORD_BITS;
        let words = storage(pages);
        let b = ReceivedBitmap::new(&words, pages).unwrap();
        // Four threads, interleaved pages: every word is shared by all of them.
        std::thread::scope(|s| {
            for t in 0..4 {
                let b = &b;
                s.spawn(move || {
                    for p in (t..pages).step_by(4) {
                        b.set(PageIndex::new(p)).unwrap();
                    }
                });
            }
        });
        assert_eq!(b.count(), pages);
        assert_eq!(runs_of_bitmap(b.iter_set_runs()), [(0, pages)]);
    }
}

#[cfg(all(test, loom))]
#[allow(unsafe_code)]
mod loom_tests {
    use super::*;
    use crate::sync::UnsafeCell;
    use loom::sync::Arc;
    use loom::thread;
    use std::vec::Vec;

    struct Shared {
        words: Vec<AtomicWord>,
        page: UnsafeCell<u32>,
    }

    /// Two workers set different bits of the same word at the same time: both bits survive, in every
    /// interleaving (the set is an atomic OR, not a load and a store).
    #[test]
    fn loom_two_workers_in_one_word_lose_no_bit() {
        loom::model(|| {
            let words: Arc<Vec<AtomicWord>> = Arc::new((0..1).map(|_| AtomicWord::new(0)).collect());
            let w2 = Arc::clone(&words);
            let t = thread::spawn(move || {
                let b = ReceivedBitmap::new_shared(&w2, 8);
                b.set_run(PageIndex::new(4), 2).unwrap();
            });
            let b = ReceivedBitmap::new_shared(&words, 8);
            b.set(PageIndex::new(1)).unwrap();
            t.join().unwrap();
            assert_eq!(b.count(), 3);
            assert!(b.test(PageIndex::new(1)).unwrap() && b.test(PageIndex::new(4)).unwrap());
        });
    }

    /// Two workers race `test_and_set` on one clear bit: exactly one sees it clear.
    #[test]
    fn loom_test_and_set_has_one_winner() {
        loom::model(|| {
            let words: Arc<Vec<AtomicWord>> = Arc::new((0..1).map(|_| AtomicWord::new(0)).collect());
            let w2 = Arc::clone(&words);
            let t = thread::spawn(move || ReceivedBitmap::new_shared(&w2, 8).test_and_set(PageIndex::new(3)).unwrap());
            let mine = ReceivedBitmap::new_shared(&words, 8).test_and_set(PageIndex::new(3)).unwrap();
            let theirs = t.join().unwrap();
            assert!(mine ^ theirs, "exactly one caller must see the bit clear");
        });
    }

    /// The set publishes the page bytes written before it: a reader that sees the bit reads the page
    /// without a data race (loom flags the cell access if the orderings were too weak).
    #[test]
    fn loom_set_publishes_page_bytes() {
        loom::model(|| {
            let shared =
                Arc::new(Shared { words: (0..1).map(|_| AtomicWord::new(0)).collect(), page: UnsafeCell::new(0) });
            let writer = Arc::clone(&shared);
            let t = thread::spawn(move || {
                // SAFETY: only this thread writes the page, and readers read it only after seeing its
                // bit, which is set after this write with Release.
                writer.page.with_mut(|p| unsafe { *p = 0xABCD });
                ReceivedBitmap::new_shared(&writer.words, 8).set(PageIndex::new(2)).unwrap();
            });
            if ReceivedBitmap::new_shared(&shared.words, 8).test(PageIndex::new(2)).unwrap() {
                // SAFETY: the bit is set, so the writer's write happened before (Release/Acquire).
                let v = shared.page.with(|p| unsafe { *p });
                assert_eq!(v, 0xABCD);
            }
            t.join().unwrap();
        });
    }
}
