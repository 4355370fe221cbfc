//! The epoch barrier of a receiving migration: N channels and the main stream.
//!
//! A channel reaching its k-th SYNC packet counts itself in (`arrived`, cumulative) and waits until
//! epoch k is released. The main stream reaching its k-th marker waits until all N channels have
//! arrived k times (`arrived >= N * k`), then releases epoch k. A channel parks after arriving, so
//! it cannot count twice in one epoch, and `arrived` never exceeds `N * (released + 1)`.
//!
//! Ordering: a channel writes its epoch-k pages, then arrives (a Release RMW); the main stream
//! Acquire-loads the count, so it sees all those pages before it releases the epoch with a Release
//! store; a channel leaves its park with an Acquire load of `released`, so every epoch-k write of
//! every channel (and of the main stream) happens before any of its epoch-k+1 writes.
//!
//! Every wait goes through [`Coordinator::wait_until`], so terminating the migration (an error
//! anywhere) ends it. A channel that ended its stream can never arrive again: the main stream's wait
//! then fails instead of hanging (QEMU's main thread hangs there).

use core::fmt;

use crate::lifecycle::ChannelId;
#[cfg(test)]
#[allow(unused_imports)] // `Cancelled` only in the non-loom build of the blocking halves
use crate::lifecycle::{Cancelled, Coordinator, Wake};
use crate::sync::{AtomicU32, Ordering};

/// Why an epoch did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum EpochError {
    /// The migration is terminating; the wait gave up.
    Cancelled {
        /// The epoch waited for (1-based).
        epoch: u32,
    },
    /// The main stream reached marker `epoch`, but a channel's stream had ended without its SYNC.
    ChannelEnded {
        /// The epoch (1-based).
        epoch: u32,
        /// SYNC arrivals counted, over all channels.
        arrived: u32,
        /// Arrivals the epoch needs.
        needed: u32,
    },
    /// At the end, a channel's SYNC count differs from the main stream's marker count.
    Unpaired {
        /// The channel.
        channel: ChannelId,
        /// Its SYNC packets.
        syncs: u32,
        /// Main-stream markers.
        markers: u32,
    },
}

impl fmt::Display for EpochError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Cancelled { epoch } => write!(f, "wait for epoch {epoch} cancelled: the migration is terminating"),
            Self::ChannelEnded { epoch, arrived, needed } => write!(
                f,
                "main stream: marker of epoch {epoch} but a channel ended without its SYNC ({arrived} of {needed} SYNCs)"
            ),
            Self::Unpaired { channel, syncs, markers } => {
                write!(f, "{channel}: {syncs} SYNC packets, but the main stream had {markers} sync markers")
            }
        }
    }
}

impl core::error::Error for EpochError {}

/// Pairs every channel's SYNC with a main-stream marker (see the module docs).
#[derive(Debug)]
pub struct EpochBarrier {
    channels: u32,
    /// SYNC arrivals of all channels, cumulative.
    arrived: AtomicU32,
    /// Epochs released (written only by the main stream).
    released: AtomicU32,
    /// Channels whose stream has ended (they can arrive no more).
    ended: AtomicU32,
}

impl EpochBarrier {
    /// A barrier for `channels` channels, at epoch 0.
    pub fn new(channels: u8) -> Self {
        Self {
            channels: u32::from(channels),
            arrived: AtomicU32::new(0),
            released: AtomicU32::new(0),
            ended: AtomicU32::new(0),
        }
    }

    /// Counts a channel in at its SYNC (the session's [`RecvSession::poll_sync`](super::RecvSession::poll_sync) calls it).
    pub fn arrive(&self) {
        // Release: publishes this channel's page writes of the epoch to the main stream, which
        // Acquire-loads the count (RMWs continue the release sequence of earlier arrivals).
        self.arrived.fetch_add(1, Ordering::Release);
    }

    /// Whether `epoch` (1-based) has been released.
    pub fn is_released(&self, epoch: u32) -> bool {
        // Acquire: the release store of the epoch carries every other participant's epoch writes.
        self.released.load(Ordering::Acquire) >= epoch
    }

    /// Called by a channel worker at its `epoch`-th SYNC (1-based; [`ChannelStats::syncs`](super::ChannelStats)
    /// after the packet): counts it in and waits until the main stream releases that epoch.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn channel_sync<H, E, W: Wake + ?Sized, const MAX: usize>(
        &self,
        coord: &Coordinator<H, E, MAX>,
        waker: &W,
        channel: ChannelId,
        epoch: u32,
    ) -> Result<(), EpochError> {
        self.arrive();
        coord
            .wait_until(waker, channel, || self.is_released(epoch))
            .map_err(|Cancelled| EpochError::Cancelled { epoch })
    }

    /// Called by a channel worker whose stream ended (cleanly or not): it will never arrive again.
    pub fn channel_ended(&self) {
        // Release: the main stream's Acquire load then also sees the channel's last writes.
        self.ended.fetch_add(1, Ordering::Release);
    }

    /// The non-blocking half of [`MainStream::poll_marker`](super::MainStream::poll_marker): releases the next epoch if every
    /// channel has arrived for it (`Ok(Some(epoch))`), or says it cannot yet (`Ok(None)`), or that
    /// it never can because a channel ended. Only the main stream calls it.
    pub fn try_release(&self) -> Result<Option<u32>, EpochError> {
        // Relaxed: only the main stream ever stores `released`, and it is the caller.
        let epoch = self.released.load(Ordering::Relaxed) + 1;
        let needed = self.channels.saturating_mul(epoch);
        // Acquire: see the pages every arrived channel wrote before arriving.
        if self.arrived.load(Ordering::Acquire) < needed {
            // Acquire: as above, for channels that ended.
            if self.ended.load(Ordering::Acquire) == 0 {
                return Ok(None);
            }
            // Look again: a channel that arrived just before another ended still counts.
            let arrived = self.arrived.load(Ordering::Acquire);
            if arrived < needed {
                return Err(EpochError::ChannelEnded { epoch, arrived, needed });
            }
        }
        // Release: hands every epoch write seen above (and the main stream's own) to the channels.
        self.released.store(epoch, Ordering::Release);
        Ok(Some(epoch))
    }

    /// Called by the main stream at each sync marker: waits until every channel reached its SYNC of
    /// the next epoch, then releases it. Returns the epoch released (1-based). `idle_as` names the
    /// channel whose idle hook the wait uses.
    #[cfg(test)]
    pub(crate) fn main_marker<H, E, W: Wake + ?Sized, const MAX: usize>(
        &self,
        coord: &Coordinator<H, E, MAX>,
        waker: &W,
        idle_as: ChannelId,
    ) -> Result<u32, EpochError> {
        let mut outcome = Ok(None);
        let waited = coord.wait_until(waker, idle_as, || {
            outcome = self.try_release();
            !matches!(outcome, Ok(None))
        });
        if waited.is_err() {
            // Relaxed: the epoch number for the error only.
            return Err(EpochError::Cancelled { epoch: self.released.load(Ordering::Relaxed) + 1 });
        }
        match outcome {
            Ok(Some(epoch)) => Ok(epoch),
            Err(e) => Err(e),
            // Local invariant: the wait ends only once `outcome` is not `Ok(None)`.
            Ok(None) => Err(EpochError::Cancelled { epoch: 0 }),
        }
    }

    /// Epochs released so far (main-stream markers that completed).
    pub fn released(&self) -> u32 {
        // Acquire: a reader acting on the count also sees what the release published.
        self.released.load(Ordering::Acquire)
    }

    /// Whether some channel is parked at a SYNC the main stream has not (yet) released.
    pub fn channel_waiting(&self) -> bool {
        // Acquire on both: plain snapshots; the caller re-checks in its wait loop.
        self.arrived.load(Ordering::Acquire) > self.channels.saturating_mul(self.released.load(Ordering::Acquire))
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::lifecycle::{Platform, WorkerExit};
    use crate::sync::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;

    /// Models whose threads spin in `wait_until` (yielding) need more branches than loom's default.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.max_branches = 100_000;
        b.preemption_bound = Some(b.preemption_bound.unwrap_or(2).min(2));
        b.check(f);
    }

    struct Spin;
    impl Wake for Spin {
        fn wake(&self, _: ChannelId) {}
        fn idle(&self, _: ChannelId) {
            thread::yield_now();
        }
    }
    impl Platform for Spin {
        type Handle = ();
        type Error = ();
        fn start(&self, _: ChannelId) -> Result<(), ()> {
            Ok(())
        }
        fn join(&self, _: ChannelId, _: ()) -> WorkerExit {
            WorkerExit::Returned
        }
    }

    /// Two channels and the main stream, non-blocking halves only (loom cannot explore several
    /// spinning threads): a channel that sees its epoch released sees the other channel's epoch
    /// write and the main stream's; the main stream releases only after both arrived.
    #[test]
    fn loom_epoch_releases_after_all_arrived_and_marker() {
        model(|| {
            let barrier = Arc::new(EpochBarrier::new(2));
            let written = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
            let marker = Arc::new(AtomicBool::new(false));
            let mut hs = std::vec::Vec::new();
            for c in 0..2usize {
                let (barrier, written, marker) = (barrier.clone(), written.clone(), marker.clone());
                hs.push(thread::spawn(move || {
                    // Relaxed: ordering comes from the barrier, which is what the model checks.
                    written[c].store(true, Ordering::Relaxed);
                    barrier.arrive();
                    if barrier.is_released(1) {
                        // Relaxed: as above.
                        assert!(written[1 - c].load(Ordering::Relaxed), "released before the other arrived");
                        assert!(marker.load(Ordering::Relaxed), "released before the main-stream marker");
                    }
                }));
            }
            // Relaxed: published by the barrier's Release store.
            marker.store(true, Ordering::Relaxed);
            if let Ok(Some(epoch)) = barrier.try_release() {
                assert_eq!(epoch, 1);
                // Relaxed: the arrivals' Release, acquired by try_release, carries these.
                assert!(written[0].load(Ordering::Relaxed) && written[1].load(Ordering::Relaxed));
            }
            for h in hs {
                h.join().unwrap();
            }
        });
    }

    /// A channel ended without its SYNC: the release fails instead of waiting for it forever.
    #[test]
    fn loom_ended_channel_fails_the_release() {
        model(|| {
            let barrier = Arc::new(EpochBarrier::new(2));
            let b2 = barrier.clone();
            let ch = thread::spawn(move || b2.arrive());
            barrier.channel_ended();
            ch.join().unwrap();
            assert_eq!(barrier.try_release(), Err(EpochError::ChannelEnded { epoch: 1, arrived: 1, needed: 2 }));
        });
    }

    /// A channel fails before its SYNC: recording the error cancels the main stream's wait at the
    /// marker instead of leaving it hanging.
    #[test]
    fn loom_failure_cancels_epoch_waits() {
        model(|| {
            let coord: Arc<Coordinator<(), u8, 2>> = Arc::new(Coordinator::new(2).unwrap());
            let barrier = EpochBarrier::new(2);
            let c3 = coord.clone();
            let failing = thread::spawn(move || {
                c3.record_error(&Spin, 7);
            });
            assert_eq!(barrier.main_marker(&*coord, &Spin, ChannelId(0)), Err(EpochError::Cancelled { epoch: 1 }));
            failing.join().unwrap();
        });
    }
}
