//! Applying the main stream's RAM records to the block table.

use crate::block::{BlockName, BlockTable, GuestMemory, RamBlock};
use crate::wire::stream::Event;

use super::RecvError;

/// How the sender marks sync epochs on the main stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(crate) enum SyncMode {
    /// Decide from the stream: the first `MULTIFD_FLUSH` before any RAM `EOS` means [`SyncMode::Flush`];
    /// an `EOS` first means [`SyncMode::Eos`]. QEMU 8.1+ writes `MULTIFD_FLUSH` before the setup `EOS`.
    Auto,
    /// Each `MULTIFD_FLUSH` is a marker (QEMU 8.1+, the default flush-per-round mode).
    Flush,
    /// Each RAM `EOS` is a marker (QEMU 7.2-8.0, and later ones with flush after each section).
    Eos,
}

/// What the caller must do after [`MainRecv::on_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub(crate) enum MainAction {
    /// Nothing: keep feeding.
    Continue,
    /// A sync marker: release the epoch at the barrier
    /// ([`EpochBarrier::try_release`](super::EpochBarrier::try_release)) before
    /// going on (records after it belong to the next epoch).
    Marker,
    /// EOF of the device state: the migration's end, once the channels end cleanly too.
    Eof,
}

/// Counters of the main stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MainStats {
    /// Zero-page records applied.
    pub zero_pages: u64,
    /// Whole pages received on the main stream.
    pub pages: u64,
    /// Sync markers seen.
    pub markers: u32,
}

/// The main-stream side of a receiving migration, after the block list (which the embedder reads
/// first, to allocate the blocks).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MainRecv {
    mode: SyncMode,
    stats: MainStats,
    eof: bool,
}

impl MainRecv {
    /// A receiver of main-stream records in `mode`.
    pub(crate) const fn new(mode: SyncMode) -> Self {
        Self { mode, stats: MainStats { zero_pages: 0, pages: 0, markers: 0 }, eof: false }
    }

    /// The sync mode (decided once the first marker was seen, under [`SyncMode::Auto`]).
    #[cfg(all(test, not(loom)))]
    pub(crate) const fn mode(&self) -> SyncMode {
        self.mode
    }

    /// Counters so far.
    pub(crate) const fn stats(&self) -> MainStats {
        self.stats
    }

    /// Whether EOF was seen.
    pub(crate) const fn saw_eof(&self) -> bool {
        self.eof
    }

    /// Applies one parser event: zero pages and pages to their blocks (bits set, zero-page rules
    /// applied), markers per the sync mode.
    pub(crate) fn on_event<M: GuestMemory + ?Sized, const N: usize>(
        &mut self,
        ev: &Event<'_>,
        table: &BlockTable<'_, M, N>,
    ) -> Result<MainAction, RecvError> {
        match *ev {
            Event::ZeroPage { block, offset } => {
                let b = find(table, block)?;
                let err = |error| RecvError::MainBlock { block: *b.name(), offset, error };
                let page = b.page_at(offset).map_err(err)?;
                b.zero_page(page).map_err(err)?;
                self.stats.zero_pages += 1;
                Ok(MainAction::Continue)
            }
            Event::PageData { block, offset, at, data } => {
                let b = find(table, block)?;
                let err = |error| RecvError::MainBlock { block: *b.name(), offset, error };
                let page = b.page_at(offset).map_err(err)?;
                let start = b.byte_offset(page).map_err(err)?;
                let page_size = b.page_size().bytes();
                let at = at as usize;
                // The parser lends at most one page's bytes per page; refuse anything else.
                match at.checked_add(data.len()) {
                    Some(end) if end <= page_size => {
                        b.memory().write(start + at, data);
                        if end == page_size {
                            b.mark_received(page).map_err(err)?;
                            self.stats.pages += 1;
                        }
                        Ok(MainAction::Continue)
                    }
                    _ => Err(err(crate::block::BlockError::BadDataLength {
                        len: at + data.len(),
                        page_size: page_size as u32,
                    })),
                }
            }
            Event::MultifdFlush => {
                if self.mode == SyncMode::Auto {
                    self.mode = SyncMode::Flush;
                }
                Ok(self.marker_if(SyncMode::Flush))
            }
            Event::Eos => {
                if self.mode == SyncMode::Auto {
                    self.mode = SyncMode::Eos;
                }
                Ok(self.marker_if(SyncMode::Eos))
            }
            Event::Eof => {
                self.eof = true;
                Ok(MainAction::Eof)
            }
            _ => Ok(MainAction::Continue),
        }
    }

    fn marker_if(&mut self, mode: SyncMode) -> MainAction {
        if self.mode == mode {
            self.stats.markers += 1;
            MainAction::Marker
        } else {
            MainAction::Continue
        }
    }
}

/// The block a main-stream record names: a typed error if no block has that name, or if the name
/// cannot be a block name at all.
fn find<'t, 'a, M: GuestMemory + ?Sized, const N: usize>(
    table: &'t BlockTable<'a, M, N>,
    name: &[u8],
) -> Result<&'t RamBlock<'a, M>, RecvError> {
    match table.find(name) {
        Some((_, b)) => Ok(b),
        None => Err(match BlockName::new(name) {
            Ok(block) => RecvError::MainUnknownBlock { block },
            Err(error) => RecvError::MainBadBlockName { error },
        }),
    }
}
