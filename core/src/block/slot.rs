//! [`TableSlot`]: a place for a [`BlockTable`] in static storage, with a release gate.
//!
//! On std the shim runs workers as scoped threads that borrow the table, and the compiler proves the
//! table and its storage outlive them. On firmware the table (and the memory and bitmap words it
//! borrows) live in `static`s, so nothing stops a worker from touching them after the migration
//! ended, while the next migration reuses them (QEMU B09: a bitmap freed while receive threads were
//! not yet joined). The slot turns the rule into checks:
//!
//! - workers reach the table only through a [`TableLease`] (closure-scoped, counted);
//! - [`TableSlot::install`] binds the table to the [`Coordinator`] whose workers will lease it (its
//!   [`CoordinatorId`]), before any lease can be taken;
//! - [`TableSlot::release`], which empties the slot so that the next migration can install a table
//!   over the same storage, takes the lifecycle's [`AllJoined`] token (proof that every worker the
//!   migration's [`Coordinator`] started has been joined), refuses a token of any other coordinator
//!   with [`ReleaseError::Foreign`], and is still refused while any lease is held;
//!   [`TableSlot::release_after`] asks the coordinator for the token itself and fails with
//!   [`ReleaseError::NotQuiescent`] while a channel is not yet joined.
//!
//! # Concurrency contract
//!
//! One atomic word holds the state: a `LIVE` flag, a `BUSY` flag (install or release in progress)
//! and the lease count. Leases are taken with a CAS that requires `LIVE` and not `BUSY`; install and
//! release own the table exclusively between taking `BUSY` with a CAS from the exact state they
//! expect (empty; live with no lease) and storing the next state. The lease count alone makes the
//! slot memory-safe; the joined token is the migration-level rule (a worker may also hold `'static`
//! references to the storage that no count can see). The owner (the installing coordinator's id) is
//! written by install and read by release, both while holding `BUSY`; a release offered a foreign
//! token stores `LIVE` back, so leases asked during that brief check are refused as `NotInstalled`.
//!
//! ```mermaid
//! stateDiagram-v2
//!     Empty --> Busy: install
//!     Busy --> Live: table built
//!     Busy --> Empty: build failed / release done
//!     Live --> Live: lease taken / dropped
//!     Live --> Busy: release (all joined, no lease)
//! ```

use core::fmt;

use super::{BlockError, BlockTable, GuestMemory, ZeroPagePolicy};
use crate::lifecycle::{AllJoined, CleanupError, Coordinator, CoordinatorId, ForeignToken};
use crate::sync::{AtomicUsize, Ordering, UnsafeCell};

const LIVE: usize = 1 << (usize::BITS - 1);
const BUSY: usize = 1 << (usize::BITS - 2);
const COUNT: usize = BUSY - 1;

/// Why a [`TableSlot`] operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ReleaseError {
    /// Release asked while the migration's coordinator has not joined every worker.
    NotQuiescent(CleanupError),
    /// Release asked with the token of another coordinator than the one the table was installed for.
    Foreign(ForeignToken),
    /// Release asked while leases are held.
    LeasesHeld {
        /// Leases held at the time.
        leases: usize,
    },
    /// No table is installed (lease or release on an empty slot).
    NotInstalled,
    /// Install asked on a slot that is not empty, or while an install or release runs.
    Occupied,
    /// The lease count is at its maximum.
    TooManyLeases,
    /// Building the table failed; the slot is empty again.
    Build(BlockError),
}

impl fmt::Display for ReleaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NotQuiescent(e) => write!(f, "block table not released: {}", e),
            Self::Foreign(e) => write!(f, "block table not released: {}", e),
            Self::LeasesHeld { leases } => write!(f, "block table not released: {} leases held", leases),
            Self::NotInstalled => write!(f, "no block table installed"),
            Self::Occupied => write!(f, "block table slot occupied or busy"),
            Self::TooManyLeases => write!(f, "block table lease count exhausted"),
            Self::Build(e) => write!(f, "building the block table failed: {}", e),
        }
    }
}

impl core::error::Error for ReleaseError {}

/// A slot for one migration's [`BlockTable`], `static`-friendly (`const fn new` outside loom).
pub struct TableSlot<'a, M: ?Sized, const N: usize> {
    state: AtomicUsize,
    table: UnsafeCell<BlockTable<'a, M, N>>,
    /// The coordinator the live table was installed for. Written by install, read by release, each
    /// while holding `BUSY`.
    owner: UnsafeCell<CoordinatorId>,
}

// SAFETY: the table and its owner are mutated only by install and release, each of which first moves `state` from
// the one value that proves no lease exists (empty, or live with zero leases) to BUSY with an Acquire
// CAS and publishes its work with a Release store; leases read it only while counted in `state`.
// Sharing the slot therefore shares `&BlockTable` across threads (needs `BlockTable: Sync`) and lets
// another thread replace it (needs `BlockTable: Send`).
unsafe impl<'a, M: ?Sized, const N: usize> Sync for TableSlot<'a, M, N> where BlockTable<'a, M, N>: Send + Sync {}

impl<M: ?Sized, const N: usize> fmt::Debug for TableSlot<'_, M, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Relaxed: a snapshot for display only.
        let s = self.state.load(Ordering::Relaxed);
        f.debug_struct("TableSlot")
            .field("live", &(s & LIVE != 0))
            .field("busy", &(s & BUSY != 0))
            .field("leases", &(s & COUNT))
            .finish()
    }
}

impl<'a, M: GuestMemory + ?Sized, const N: usize> TableSlot<'a, M, N> {
    /// An empty slot. `const`, so it can be a `static`.
    #[cfg(not(all(test, loom)))]
    pub const fn new() -> Self {
        Self {
            state: AtomicUsize::new(0),
            table: UnsafeCell::new(BlockTable::new(ZeroPagePolicy::SkipUntouched)),
            owner: UnsafeCell::new(CoordinatorId::NONE),
        }
    }

    /// An empty slot (loom build: loom's atomics are not `const`).
    #[cfg(all(test, loom))]
    pub fn new() -> Self {
        Self {
            state: AtomicUsize::new(0),
            table: UnsafeCell::new(BlockTable::new(ZeroPagePolicy::SkipUntouched)),
            owner: UnsafeCell::new(CoordinatorId::NONE),
        }
    }

    /// Builds a new table in the empty slot for the workers of the coordinator `owner`
    /// ([`Coordinator::id`]): `build` gets an empty table with `policy` and adds the blocks. On success
    /// the table is live and leases can be taken, and only `owner`'s [`AllJoined`] token releases it;
    /// if `build` fails the slot is left empty and its error returned.
    pub fn install(
        &self,
        owner: CoordinatorId,
        policy: ZeroPagePolicy,
        build: impl FnOnce(&mut BlockTable<'a, M, N>) -> Result<(), BlockError>,
    ) -> Result<(), ReleaseError> {
        // Acquire: everything the last release did to the table happens before our writes to it.
        // Relaxed on failure: nothing is touched.
        if self.state.compare_exchange(0, BUSY, Ordering::Acquire, Ordering::Relaxed).is_err() {
            return Err(ReleaseError::Occupied);
        }
        let result = self.table.with_mut(|t| {
            // SAFETY: BUSY was taken from the empty state, so no lease exists and no other install or
            // release can start until we store the next state: this is the only access.
            let table = unsafe { &mut *t };
            *table = BlockTable::new(policy);
            let r = build(table);
            if r.is_err() {
                *table = BlockTable::new(policy);
            }
            r
        });
        // SAFETY: as for the table above: BUSY, taken from the empty state, makes this the only access.
        self.owner.with_mut(|o| unsafe { *o = if result.is_ok() { owner } else { CoordinatorId::NONE } });
        let next = if result.is_ok() { LIVE } else { 0 };
        // Release: publishes the built (or reset) table to the Acquire of the next lease or install.
        self.state.store(next, Ordering::Release);
        result.map_err(ReleaseError::Build)
    }

    /// A lease on the live table, for a worker to hold for as long as it may touch the table.
    pub fn lease(&self) -> Result<TableLease<'_, 'a, M, N>, ReleaseError> {
        // Relaxed: the CAS below re-checks the value and carries the ordering.
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if s & LIVE == 0 || s & BUSY != 0 {
                return Err(ReleaseError::NotInstalled);
            }
            if s & COUNT == COUNT {
                return Err(ReleaseError::TooManyLeases);
            }
            // Acquire on success: the install's Release store of LIVE makes the built table visible.
            // Relaxed on failure: we only retry with the value seen.
            match self.state.compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Ok(TableLease { slot: self }),
                Err(now) => s = now,
            }
        }
    }

    /// Empties the slot so its storage can be reused for the next migration's table. `joined` proves
    /// that every worker of the migration was joined (get it from [`Coordinator::cleanup`] or
    /// [`Coordinator::all_joined`]). Refused with [`ReleaseError::Foreign`] when the token is not
    /// from the coordinator the table was installed for, with [`ReleaseError::LeasesHeld`] while any
    /// lease is held, and with [`ReleaseError::NotInstalled`] when there is nothing to release.
    pub fn release(&self, joined: &AllJoined<'_>) -> Result<(), ReleaseError> {
        // Acquire on success: every lease holder's reads (ended by its Release decrement) happen
        // before we reset the table. Relaxed on failure: only the value is reported.
        if let Err(s) = self.state.compare_exchange(LIVE, BUSY, Ordering::Acquire, Ordering::Relaxed) {
            return Err(if s & LIVE == 0 || s & BUSY != 0 {
                ReleaseError::NotInstalled
            } else {
                ReleaseError::LeasesHeld { leases: s & COUNT }
            });
        }
        // SAFETY: BUSY was taken from "live": install, the owner's only writer, cannot run until we
        // store the next state.
        let owner = self.owner.with(|o| unsafe { *o });
        if let Err(foreign) = joined.covers(owner) {
            // Release: nothing was changed; pairs with the Acquire of the next lease or release.
            self.state.store(LIVE, Ordering::Release);
            return Err(ReleaseError::Foreign(foreign));
        }
        self.table.with_mut(|t| {
            // SAFETY: BUSY was taken from "live, zero leases": no lease exists and none can be taken
            // until we store the next state, so this is the only access to the table.
            let table = unsafe { &mut *t };
            let policy = table.policy();
            debug!("block table released: {} blocks", table.len());
            *table = BlockTable::new(policy);
        });
        // Release: the reset happens before the next install's Acquire.
        self.state.store(0, Ordering::Release);
        Ok(())
    }

    /// [`release`](Self::release), with the token taken from `coordinator`: refused with
    /// [`ReleaseError::NotQuiescent`] (naming a channel not yet joined and its state) until the
    /// coordinator's cleanup has joined every worker it started, and with [`ReleaseError::Foreign`]
    /// if the table was installed for another coordinator.
    pub fn release_after<H, E, const MAX: usize>(
        &self,
        coordinator: &Coordinator<H, E, MAX>,
    ) -> Result<(), ReleaseError> {
        let joined = coordinator.all_joined().map_err(ReleaseError::NotQuiescent)?;
        self.release(&joined)
    }
}

impl<M: GuestMemory + ?Sized, const N: usize> Default for TableSlot<'_, M, N> {
    fn default() -> Self {
        Self::new()
    }
}

/// A counted right to use the table in a [`TableSlot`]; the slot cannot be released while it lives.
pub struct TableLease<'s, 'a, M: ?Sized, const N: usize> {
    slot: &'s TableSlot<'a, M, N>,
}

impl<M: ?Sized, const N: usize> fmt::Debug for TableLease<'_, '_, M, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableLease").finish_non_exhaustive()
    }
}

impl<'a, M: ?Sized, const N: usize> TableLease<'_, 'a, M, N> {
    /// Runs `f` with the table. Closure-scoped, so loom sees every access.
    pub fn with<R>(&self, f: impl FnOnce(&BlockTable<'a, M, N>) -> R) -> R {
        // SAFETY: this lease is counted in the slot's state, so neither install nor release (the only
        // writers) can take BUSY until it is dropped; shared reads by several leases are fine.
        self.slot.table.with(|t| f(unsafe { &*t }))
    }
}

impl<M: ?Sized, const N: usize> Drop for TableLease<'_, '_, M, N> {
    fn drop(&mut self) {
        // Release: our reads of the table happen before the release that sees the count reach zero.
        self.slot.state.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::block::AtomicRegion;
    use crate::lifecycle::{ChannelId, Platform, Wake, WorkerExit};
    use crate::sync::AtomicBool;
    use core::convert::Infallible;
    use loom::sync::Arc;
    use loom::thread;

    type Slot = TableSlot<'static, AtomicRegion<'static>, 1>;
    type Coord = Coordinator<thread::JoinHandle<()>, Infallible, 1>;

    /// Starts one loom thread per channel; the worker leases the table, reads it, and records that.
    struct Workers {
        slot: Arc<Slot>,
        worked: Arc<AtomicBool>,
    }

    impl Wake for Workers {
        fn wake(&self, _: ChannelId) {}
        fn idle(&self, _: ChannelId) {
            thread::yield_now();
        }
    }

    impl Platform for Workers {
        type Handle = thread::JoinHandle<()>;
        type Error = Infallible;

        fn start(&self, _: ChannelId) -> Result<Self::Handle, Infallible> {
            let (slot, worked) = (Arc::clone(&self.slot), Arc::clone(&self.worked));
            Ok(thread::spawn(move || {
                // The table is installed before any worker starts, and cannot go while we run.
                let lease = slot.lease().unwrap();
                lease.with(|t| assert_eq!(t.len(), 0));
                // Relaxed: the join orders this for the checks after it.
                worked.store(true, Ordering::Relaxed);
            }))
        }

        fn join(&self, _: ChannelId, handle: Self::Handle) -> WorkerExit {
            handle.join().map_or(WorkerExit::Panicked, |()| WorkerExit::Returned)
        }
    }

    fn installed(owner: CoordinatorId) -> Arc<Slot> {
        let slot = Arc::new(Slot::new());
        slot.install(owner, ZeroPagePolicy::SkipUntouched, |_| Ok(())).unwrap();
        slot
    }

    /// A release racing a worker that still runs is refused: while cleanup (on another thread) has not
    /// joined the worker, `release_after` fails with `NotQuiescent`; once it succeeds, the worker's
    /// table accesses all happened before (loom checks the table cell against the release's reset).
    #[test]
    fn loom_release_racing_running_worker_is_refused() {
        loom::model(|| {
            let coord = Arc::new(Coord::new(1).unwrap());
            let slot = installed(coord.id());
            let workers = Arc::new(Workers { slot: Arc::clone(&slot), worked: Arc::new(AtomicBool::new(false)) });
            assert_eq!(coord.create_all(&*workers, |_| Ok(())).map(|r| r.started), Ok(1));
            // The worker has started and nobody joined it: refused, whatever it is doing now.
            assert!(matches!(slot.release_after(&*coord), Err(ReleaseError::NotQuiescent(_))));
            let cleaner = {
                let (coord, workers) = (Arc::clone(&coord), Arc::clone(&workers));
                thread::spawn(move || {
                    coord.cleanup(&*workers).unwrap();
                })
            };
            loop {
                match slot.release_after(&*coord) {
                    Ok(()) => break,
                    Err(ReleaseError::NotQuiescent(_)) => thread::yield_now(),
                    Err(e) => panic!("unexpected {:?}", e),
                }
            }
            // Relaxed: `release_after` acquired cleanup's Release, which follows the join.
            assert!(workers.worked.load(Ordering::Relaxed), "released only after the worker finished");
            assert_eq!(slot.lease().err(), Some(ReleaseError::NotInstalled));
            cleaner.join().unwrap();
        });
    }

    /// The lease count keeps release from overlapping a lease whatever the token says (here the
    /// owner's, from a coordinator whose workers were never started, so it proves nothing about this
    /// thread): refused while the lease is held, and a lease asked after a release fails. Loom flags
    /// any overlap of the read with the reset.
    #[test]
    fn loom_release_never_overlaps_a_lease() {
        loom::model(|| {
            let other = Coordinator::<(), Infallible, 1>::new(1).unwrap();
            let slot = installed(other.id());
            let s2 = Arc::clone(&slot);
            let t = thread::spawn(move || match s2.lease() {
                Ok(lease) => lease.with(|t| t.is_empty()),
                Err(e) => {
                    assert_eq!(e, ReleaseError::NotInstalled);
                    false
                }
            });
            let token = other.cleanup(&crate::lifecycle::testing::Inline).unwrap();
            let released = match slot.release(&token) {
                Ok(()) => true,
                Err(e) => {
                    assert_eq!(e, ReleaseError::LeasesHeld { leases: 1 });
                    false
                }
            };
            let worker_read = t.join().unwrap();
            if !released {
                assert!(worker_read, "refused only because the worker held its lease");
                assert_eq!(slot.release(&token), Ok(()));
            }
        });
    }

    /// A lease taken concurrently with an install either fails or sees the installed table.
    #[test]
    fn loom_install_publishes_the_table() {
        loom::model(|| {
            let slot = Arc::new(Slot::new());
            let s2 = Arc::clone(&slot);
            let t = thread::spawn(move || s2.lease().map(|l| l.with(|t| t.policy())));
            let owner = Coordinator::<(), Infallible, 1>::new(1).unwrap();
            slot.install(owner.id(), ZeroPagePolicy::AlwaysPopulate, |_| Ok(())).unwrap();
            match t.join().unwrap() {
                Ok(p) => assert_eq!(p, ZeroPagePolicy::AlwaysPopulate),
                Err(e) => assert_eq!(e, ReleaseError::NotInstalled),
            }
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::block::AtomicRegion;
    use crate::lifecycle::testing::Inline;
    use core::convert::Infallible;

    type Coord = Coordinator<(), Infallible, 1>;

    /// A token of a coordinator other than the table's owner is refused with both ids named, and the
    /// table stays live and leasable; the owner's token then releases it.
    #[test]
    fn release_refuses_a_token_of_another_coordinator() {
        let slot: TableSlot<'static, AtomicRegion<'static>, 1> = TableSlot::new();
        let (owner, stranger) = (Coord::new(1).unwrap(), Coord::new(1).unwrap());
        slot.install(owner.id(), ZeroPagePolicy::SkipUntouched, |_| Ok(())).unwrap();
        let foreign = stranger.cleanup(&Inline).unwrap();
        assert_eq!(
            slot.release(&foreign),
            Err(ReleaseError::Foreign(ForeignToken { bound: owner.id(), token: stranger.id() }))
        );
        assert_eq!(
            slot.release_after(&stranger),
            Err(ReleaseError::Foreign(ForeignToken { bound: owner.id(), token: stranger.id() }))
        );
        assert_eq!(slot.lease().map(|l| l.with(|t| t.len())).ok(), Some(0), "still live after the refusal");
        assert!(matches!(slot.release_after(&owner), Err(ReleaseError::NotQuiescent(_))));
        assert_eq!(slot.release(&owner.cleanup(&Inline).unwrap()), Ok(()));
        assert_eq!(slot.lease().err(), Some(ReleaseError::NotInstalled));
    }

    /// After a release, the next install binds the slot to its own coordinator: the previous owner's
    /// token no longer releases it.
    #[test]
    fn reinstall_rebinds_the_slot() {
        let slot: TableSlot<'static, AtomicRegion<'static>, 1> = TableSlot::new();
        let (first, second) = (Coord::new(1).unwrap(), Coord::new(1).unwrap());
        slot.install(first.id(), ZeroPagePolicy::SkipUntouched, |_| Ok(())).unwrap();
        let t1 = first.cleanup(&Inline).unwrap();
        assert_eq!(slot.release(&t1), Ok(()));
        slot.install(second.id(), ZeroPagePolicy::SkipUntouched, |_| Ok(())).unwrap();
        assert_eq!(
            slot.release(&t1),
            Err(ReleaseError::Foreign(ForeignToken { bound: second.id(), token: first.id() }))
        );
        assert_eq!(slot.release(&second.cleanup(&Inline).unwrap()), Ok(()));
    }
}
