//! Lifecycle tests: the transition table, a test platform that fails the k-th start on demand, unit
//! tests on real threads, and (under `--cfg loom`) loom models of every race the module rules out.

use super::*;
use crate::sync::{AtomicU32, Ordering};

#[cfg(not(loom))]
use std::{sync::Arc, thread};

#[cfg(loom)]
use loom::{sync::Arc, thread};

/// Capacity of the coordinators under test.
const CAP: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TestError {
    Prepare(u8),
    Start(u8),
    Worker(u8),
}

/// What each started worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Work {
    /// Return at once.
    Exit,
    /// Park in `wait_until` on a condition that never comes true: only terminate ends the wait.
    ParkUntilQuit,
    /// Record an error, then return.
    Fail,
    /// Write the shared buffer, then return.
    WriteShared,
}

type Coord = Coordinator<thread::JoinHandle<()>, TestError, CAP>;

pub(super) struct Inner {
    coord: Coord,
    work: Work,
    /// Start number (0-based, over the whole migration) that fails.
    fail_start_at: Option<u32>,
    starts: AtomicU32,
    started: [AtomicU32; CAP],
    joined: [AtomicU32; CAP],
    exited: [AtomicU32; CAP],
    woken: [AtomicU32; CAP],
    cancelled: [AtomicU32; CAP],
    /// Stands for state that workers borrow (a bitmap, a buffer) and the owner releases.
    shared: crate::sync::UnsafeCell<u32>,
}

// SAFETY: test-only. `shared` is accessed by workers and by the releasing thread; these tests exist
// to check, under loom, that the joins order those accesses. Everything else in `Inner` is atomic.
unsafe impl Sync for Inner {}

#[derive(Clone)]
pub(super) struct TestPlatform(Arc<Inner>);

fn counters() -> [AtomicU32; CAP] {
    core::array::from_fn(|_| AtomicU32::new(0))
}

impl TestPlatform {
    fn new(channels: u8, work: Work, fail_start_at: Option<u32>) -> Self {
        Self::with_coord(Coord::new(channels).unwrap(), work, fail_start_at)
    }

    fn with_coord(coord: Coord, work: Work, fail_start_at: Option<u32>) -> Self {
        TestPlatform(Arc::new(Inner {
            coord,
            work,
            fail_start_at,
            starts: AtomicU32::new(0),
            started: counters(),
            joined: counters(),
            exited: counters(),
            woken: counters(),
            cancelled: counters(),
            shared: crate::sync::UnsafeCell::new(0),
        }))
    }

    fn coord(&self) -> &Coord {
        &self.0.coord
    }

    fn count(a: &[AtomicU32; CAP], c: u8) -> u32 {
        a[c as usize].load(Ordering::SeqCst)
    }

    fn started(&self, c: u8) -> u32 {
        Self::count(&self.0.started, c)
    }
    fn joined(&self, c: u8) -> u32 {
        Self::count(&self.0.joined, c)
    }
    fn exited(&self, c: u8) -> u32 {
        Self::count(&self.0.exited, c)
    }
    fn woken(&self, c: u8) -> u32 {
        Self::count(&self.0.woken, c)
    }
    fn cancelled(&self, c: u8) -> u32 {
        Self::count(&self.0.cancelled, c)
    }

    /// The owner's release of the shared state: a plain write that must not race a worker's.
    fn release_shared(&self) {
        // SAFETY: test-only, see `Inner`; loom reports it if this races a worker's write.
        self.0.shared.with_mut(|p| unsafe { *p = u32::MAX });
    }

    /// Every started worker was joined exactly once and ran to its end; nothing else was joined.
    fn assert_joined_iff_started(&self) {
        for c in 0..self.coord().channels() {
            let started = self.started(c);
            assert!(started <= 1, "channel {c} started {started} times");
            assert_eq!(self.joined(c), started, "channel {c}: joins must equal starts");
            assert_eq!(self.exited(c), started, "channel {c}: a joined worker has finished");
            let state = self.coord().state(ChannelId(c)).unwrap();
            assert!(state.is_terminal(), "channel {c} left in {state:?}");
            assert_eq!(state == ChannelState::Joined, started == 1, "channel {c} is {state:?}");
        }
    }
}

impl Wake for TestPlatform {
    fn wake(&self, channel: ChannelId) {
        self.0.woken[channel.index()].fetch_add(1, Ordering::SeqCst);
    }

    fn idle(&self, _channel: ChannelId) {
        thread::yield_now();
    }
}

impl Platform for TestPlatform {
    type Handle = thread::JoinHandle<()>;
    type Error = TestError;

    fn start(&self, channel: ChannelId) -> Result<Self::Handle, TestError> {
        let c = channel.index();
        // The core calls start only for a channel it moved to `Starting` (the injected defects aside).
        if self.coord().bug == InjectedBug::None {
            assert_eq!(self.coord().state(channel), Ok(ChannelState::Starting), "start outside Starting");
        }
        let n = self.0.starts.fetch_add(1, Ordering::SeqCst);
        if self.0.fail_start_at == Some(n) {
            return Err(TestError::Start(channel.0));
        }
        self.0.started[c].fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        Ok(thread::spawn(move || {
            let coord = me.coord();
            match me.0.work {
                Work::Exit => {}
                Work::ParkUntilQuit => {
                    if coord.wait_until(&me, channel, || false) == Err(Cancelled) {
                        me.0.cancelled[c].fetch_add(1, Ordering::SeqCst);
                    }
                }
                Work::Fail => {
                    coord.record_error(&me, TestError::Worker(channel.0));
                }
                Work::WriteShared => {
                    // SAFETY: test-only, see `Inner`; released only after this worker is joined.
                    me.0.shared.with_mut(|p| unsafe { *p += 1 });
                }
            }
            me.0.exited[c].fetch_add(1, Ordering::SeqCst);
        }))
    }

    fn join(&self, channel: ChannelId, handle: Self::Handle) -> WorkerExit {
        self.0.joined[channel.index()].fetch_add(1, Ordering::SeqCst);
        match handle.join() {
            Ok(()) => WorkerExit::Returned,
            Err(_) => WorkerExit::Panicked,
        }
    }
}

/// A `prepare` that fails for `fail` and succeeds for every other channel.
fn prepare_failing(fail: Option<u8>) -> impl FnMut(ChannelId) -> Result<(), TestError> {
    move |c| if Some(c.0) == fail { Err(TestError::Prepare(c.0)) } else { Ok(()) }
}

#[cfg(not(loom))]
mod unit {
    use super::*;
    use ChannelState::*;

    /// The documented table, row by row: exactly these nine changes are legal.
    const TABLE: [(ChannelState, ChannelState); 9] = [
        (Uncreated, Creating),
        (Uncreated, Abandoned),
        (Creating, Starting),
        (Creating, Failed),
        (Creating, Abandoned),
        (Starting, Running),
        (Starting, Failed),
        (Running, Joining),
        (Joining, Joined),
    ];

    #[test]
    fn transition_table_is_exactly_the_documented_one() {
        for from in ChannelState::ALL {
            for to in ChannelState::ALL {
                assert_eq!(from.can_become(to), TABLE.contains(&(from, to)), "{from:?} -> {to:?}");
            }
        }
        for s in ChannelState::ALL {
            assert_eq!(ChannelState::from_raw(s as u8), s);
            let leaves = ChannelState::ALL.iter().any(|&to| s.can_become(to));
            assert_eq!(s.is_terminal(), !leaves, "{s:?}: terminal iff no way out");
        }
    }

    #[test]
    fn illegal_and_conflicting_transitions_are_typed_errors() {
        let coord = Coord::new(2).unwrap();
        let c = ChannelId(1);
        assert_eq!(
            coord.transition(c, Uncreated, Running),
            Err(TransitionError::Illegal { channel: c, from: Uncreated, to: Running })
        );
        assert_eq!(
            coord.transition(c, Creating, Starting),
            Err(TransitionError::Conflict { channel: c, expected: Creating, actual: Uncreated, to: Starting })
        );
        assert_eq!(
            coord.transition(ChannelId(2), Uncreated, Creating),
            Err(TransitionError::NoSuchChannel { channel: ChannelId(2), channels: 2 })
        );
        assert_eq!(coord.state(c), Ok(Uncreated), "refused changes leave the state alone");
    }

    #[test]
    fn channel_count_is_checked() {
        assert_eq!(Coord::new(0).unwrap_err(), ConfigError::ChannelCount { channels: 0, capacity: CAP });
        assert_eq!(Coord::new(9).unwrap_err(), ConfigError::ChannelCount { channels: 9, capacity: CAP });
        assert_eq!(Coord::new(8).unwrap().channels(), 8);
        let full: Coordinator<(), (), MAX_CHANNELS> = Coordinator::new(255).unwrap();
        assert_eq!(full.channels(), 255);
    }

    #[test]
    fn all_channels_start_and_are_joined_once() {
        let p = TestPlatform::new(8, Work::ParkUntilQuit, None);
        let report = p.coord().create_all(&p, prepare_failing(None)).unwrap();
        assert_eq!(report, CreateReport { started: 8, failed: 0, abandoned: 0 });
        assert!(matches!(p.coord().all_joined(), Err(CleanupError::NotQuiescent { state: Running, .. })));
        let token = p.coord().cleanup(&p).unwrap();
        assert_eq!(token.report(), CleanupReport { joined: 8, panicked: 0, sealed: 0 });
        p.assert_joined_iff_started();
        for c in 0..8 {
            assert_eq!(p.cancelled(c), 1, "channel {c}'s parked wait must end with Cancelled");
        }
        assert!(p.coord().error().is_none());
    }

    #[test]
    fn start_failure_at_every_k_joins_only_started_workers() {
        for k in 0..8u32 {
            let p = TestPlatform::new(8, Work::ParkUntilQuit, Some(k));
            let report = p.coord().create_all(&p, prepare_failing(None)).unwrap();
            assert_eq!(report, CreateReport { started: k as u8, failed: 1, abandoned: 7 - k as u8 }, "k={k}");
            assert_eq!(p.coord().state(ChannelId(k as u8)), Ok(Failed));
            assert_eq!(p.coord().error(), Some(&TestError::Start(k as u8)));
            p.coord().cleanup(&p).unwrap();
            p.assert_joined_iff_started();
            assert_eq!(p.started(k as u8), 0);
        }
    }

    #[test]
    fn prepare_failure_at_every_k_joins_only_started_workers() {
        for k in 0..8u8 {
            let p = TestPlatform::new(8, Work::Exit, None);
            let report = p.coord().create_all(&p, prepare_failing(Some(k))).unwrap();
            assert_eq!(report, CreateReport { started: k, failed: 1, abandoned: 7 - k }, "k={k}");
            assert_eq!(p.coord().error(), Some(&TestError::Prepare(k)));
            let token = p.coord().cleanup(&p).unwrap();
            assert_eq!(token.report().joined, k);
            p.assert_joined_iff_started();
        }
    }

    #[test]
    fn first_error_wins_and_later_ones_are_counted() {
        let p = TestPlatform::new(4, Work::Fail, None);
        p.coord().create_all(&p, prepare_failing(None)).unwrap();
        p.coord().cleanup(&p).unwrap();
        assert!(matches!(p.coord().error(), Some(TestError::Worker(_))));
        // Every started worker offered an error; the first stayed, the rest were counted.
        let started: u32 = (0..4).map(|c| p.started(c)).sum();
        assert!(started >= 1);
        assert_eq!(p.coord().later_errors(), started - 1);
    }

    #[test]
    fn terminate_is_idempotent_and_wakes_each_channel_once() {
        let p = TestPlatform::new(3, Work::Exit, None);
        assert!(p.coord().terminate(&p));
        assert!(!p.coord().terminate(&p));
        for c in 0..3 {
            assert_eq!(p.woken(c), 1);
        }
        assert!(p.coord().is_quitting());
        // Once quitting, creation starts nothing.
        let report = p.coord().create_all(&p, prepare_failing(None)).unwrap();
        assert_eq!(report, CreateReport { started: 0, failed: 0, abandoned: 3 });
    }

    #[test]
    fn cleanup_has_one_owner_and_gates_release() {
        let p = TestPlatform::new(2, Work::Exit, None);
        p.coord().create_all(&p, prepare_failing(None)).unwrap();
        p.coord().all_joined().unwrap_err();
        let token = p.coord().cleanup(&p).unwrap();
        assert_eq!(p.coord().cleanup(&p).unwrap_err(), CleanupError::AlreadyOwned);
        assert_eq!(p.coord().all_joined().unwrap().report(), token.report());
        p.assert_joined_iff_started();
    }

    #[test]
    fn cleanup_before_creation_seals_every_channel() {
        let p = TestPlatform::new(4, Work::Exit, None);
        let token = p.coord().cleanup(&p).unwrap();
        assert_eq!(token.report(), CleanupReport { joined: 0, panicked: 0, sealed: 4 });
        for c in 0..4 {
            assert_eq!(p.coord().create(&p, ChannelId(c), |_| Ok(())), Ok(Created::Abandoned));
            assert_eq!(p.started(c), 0);
        }
    }

    #[test]
    fn a_channel_cannot_be_created_twice() {
        let p = TestPlatform::new(1, Work::Exit, None);
        assert_eq!(p.coord().create(&p, ChannelId(0), |_| Ok(())), Ok(Created::Started));
        assert_eq!(
            p.coord().create(&p, ChannelId(0), |_| Ok(())),
            Err(TransitionError::Conflict {
                channel: ChannelId(0),
                expected: Uncreated,
                actual: Running,
                to: Creating
            })
        );
        p.coord().cleanup(&p).unwrap();
        p.assert_joined_iff_started();
    }

    #[test]
    fn a_token_covers_only_its_own_coordinator() {
        let a = Coordinator::<(), TestError, 2>::new(1).unwrap();
        let b = Coordinator::<(), TestError, 2>::new(1).unwrap();
        assert_ne!(a.id(), b.id(), "two live coordinators have different ids");
        let ta = a.cleanup(&testing::Inline).unwrap();
        let tb = b.all_joined();
        assert!(tb.is_err(), "b never ran cleanup");
        assert_eq!(ta.coordinator(), a.id());
        assert_eq!(ta.covers(a.id()), Ok(()));
        assert_eq!(ta.covers(b.id()), Err(ForeignToken { bound: b.id(), token: a.id() }));
        assert_eq!(a.all_joined().unwrap().covers(a.id()), Ok(()));
        assert_eq!(ta.covers(CoordinatorId::NONE), Err(ForeignToken { bound: CoordinatorId::NONE, token: a.id() }));
    }

    #[test]
    fn an_id_survives_a_move_and_is_never_reused_after_a_drop() {
        let a = Coordinator::<(), TestError, 2>::new(1).unwrap();
        let id = a.id();
        let moved = std::boxed::Box::new(a);
        assert_eq!(moved.id(), id, "moving a coordinator keeps its id");
        drop(moved);
        // Built in the same place again and again: a new id each time, never the dropped one's.
        let mut seen = std::vec![id];
        for _ in 0..4 {
            let c = Coordinator::<(), TestError, 2>::new(1).unwrap();
            assert!(!seen.contains(&c.id()), "id {} reused", c.id());
            seen.push(c.id());
        }
    }

    #[test]
    fn shared_state_released_with_the_token_sees_every_worker_write() {
        let p = TestPlatform::new(1, Work::WriteShared, None);
        p.coord().create_all(&p, prepare_failing(None)).unwrap();
        let _token: AllJoined<'_> = p.coord().cleanup(&p).unwrap();
        // SAFETY: every worker is joined, so this thread is the only one left touching `shared`.
        let seen = p.0.shared.with(|v| unsafe { *v });
        assert_eq!(seen, 1, "the worker's write happened before the join");
        p.release_shared();
    }

    #[test]
    #[should_panic(expected = "never started")]
    fn injected_seed_defect_1_is_caught_on_real_threads() {
        let coord = Coord::new(2).unwrap().with_bug(InjectedBug::MarkRunningBeforePrepare);
        let p = TestPlatform::with_coord(coord, Work::Exit, None);
        p.coord().create_all(&p, prepare_failing(Some(1))).unwrap();
        let _ = p.coord().cleanup(&p);
    }

    #[test]
    fn cleanup_racing_creation_on_real_threads() {
        let iterations = if cfg!(miri) { 5 } else { 300 };
        for i in 0..iterations {
            let p = TestPlatform::new(4, Work::ParkUntilQuit, None);
            let creator = {
                let p = p.clone();
                thread::spawn(move || p.coord().create_all(&p, prepare_failing(None)).unwrap())
            };
            if i % 2 == 0 {
                thread::yield_now();
            }
            let token = p.coord().cleanup(&p).unwrap();
            let created = creator.join().unwrap();
            assert_eq!(token.report().joined, created.started, "iteration {i}");
            p.assert_joined_iff_started();
        }
    }
}

#[cfg(loom)]
mod loom_models {
    use super::*;

    /// (a) channel k fails to start while the other succeeds: k is never joined, the other is joined
    /// exactly once, and the error names k.
    #[test]
    fn loom_start_failure_of_channel_k() {
        for k in 0..2u32 {
            loom::model(move || {
                let p = TestPlatform::new(2, Work::Exit, Some(k));
                p.coord().create_all(&p, prepare_failing(None)).unwrap();
                p.coord().cleanup(&p).unwrap();
                p.assert_joined_iff_started();
                assert_eq!(p.started(k as u8), 0);
                assert_eq!(p.coord().state(ChannelId(k as u8)), Ok(ChannelState::Failed));
                assert_eq!(p.coord().error(), Some(&TestError::Start(k as u8)));
            });
        }
    }

    /// (a') the failure is in a pre-start step (connect, handshake, init packet) instead.
    #[test]
    fn loom_prepare_failure_of_channel_k() {
        for k in 0..2u8 {
            loom::model(move || {
                let p = TestPlatform::new(2, Work::Exit, None);
                p.coord().create_all(&p, prepare_failing(Some(k))).unwrap();
                p.coord().cleanup(&p).unwrap();
                p.assert_joined_iff_started();
                assert_eq!(p.started(k), 0);
                assert_eq!(p.coord().error(), Some(&TestError::Prepare(k)));
            });
        }
    }

    /// (b) cleanup runs while another thread is still creating channels: no worker starts on a sealed
    /// channel, and every worker that did start is joined exactly once.
    #[test]
    fn loom_cleanup_concurrent_with_creation() {
        loom::model(|| {
            let p = TestPlatform::new(2, Work::Exit, None);
            let cleaner = {
                let p = p.clone();
                thread::spawn(move || p.coord().cleanup(&p).map(|t| t.report()))
            };
            let created = p.coord().create_all(&p, prepare_failing(None)).unwrap();
            let report = cleaner.join().unwrap().unwrap();
            assert_eq!(report.joined, created.started);
            // A channel is abandoned either by cleanup's seal or by the creator seeing the quit flag.
            assert!(report.sealed <= created.abandoned);
            assert_eq!(created.started + created.failed + created.abandoned, 2);
            assert_eq!(created.failed, 0, "nothing failed in this model");
            p.assert_joined_iff_started();
        });
    }

    /// (c) a worker exits on its own while cleanup runs: still joined exactly once.
    #[test]
    fn loom_worker_exit_concurrent_with_cleanup() {
        loom::model(|| {
            let p = TestPlatform::new(1, Work::Exit, None);
            assert_eq!(p.coord().create(&p, ChannelId(0), |_| Ok(())), Ok(Created::Started));
            let report = p.coord().cleanup(&p).unwrap().report();
            assert_eq!(report.joined, 1);
            p.assert_joined_iff_started();
        });
    }

    /// (d) two workers fail at once: one error is recorded, the other counted; terminate wakes each
    /// channel once (plus cleanup's wake right before each join).
    #[test]
    fn loom_two_workers_fail_at_once() {
        loom::model(|| {
            let p = TestPlatform::new(2, Work::Fail, None);
            let created = p.coord().create_all(&p, prepare_failing(None)).unwrap();
            p.coord().cleanup(&p).unwrap();
            p.assert_joined_iff_started();
            let started = u32::from(created.started);
            assert!(matches!(p.coord().error(), Some(TestError::Worker(_))));
            assert_eq!(p.coord().later_errors(), started - 1);
            for c in 0..2 {
                assert_eq!(p.woken(c), 1 + p.started(c), "channel {c}: one terminate wake, one join wake");
            }
        });
    }

    /// (e) terminate from two threads, then again: exactly one call sets the flag, and each channel is
    /// woken exactly once.
    #[test]
    fn loom_terminate_twice_from_two_threads() {
        loom::model(|| {
            let p = TestPlatform::new(2, Work::Exit, None);
            let other = {
                let p = p.clone();
                thread::spawn(move || p.coord().terminate(&p))
            };
            let mine = p.coord().terminate(&p);
            let theirs = other.join().unwrap();
            assert!(mine ^ theirs, "exactly one terminate is first");
            assert!(!p.coord().terminate(&p));
            for c in 0..2 {
                assert_eq!(p.woken(c), 1);
            }
        });
    }

    /// (f) a worker parked at a sync point when cleanup starts is woken (its wait is cancelled) and
    /// joined.
    #[test]
    fn loom_parked_worker_is_woken_and_joined() {
        loom::model(|| {
            let p = TestPlatform::new(1, Work::ParkUntilQuit, None);
            assert_eq!(p.coord().create(&p, ChannelId(0), |_| Ok(())), Ok(Created::Started));
            p.coord().cleanup(&p).unwrap();
            p.assert_joined_iff_started();
            assert_eq!(p.cancelled(0), 1);
        });
    }

    /// Shared state released with the token from cleanup never races a worker that uses it.
    #[test]
    fn loom_release_after_all_joined_is_race_free() {
        loom::model(|| {
            let p = TestPlatform::new(1, Work::WriteShared, None);
            p.coord().create_all(&p, prepare_failing(None)).unwrap();
            let cleaner = {
                let p = p.clone();
                thread::spawn(move || {
                    p.coord().cleanup(&p).unwrap();
                })
            };
            while p.coord().all_joined().is_err() {
                thread::yield_now();
            }
            p.release_shared();
            cleaner.join().unwrap();
        });
    }

    /// Seed defect 1, injected: the channel is marked running before the fallible step. When that
    /// step fails, cleanup finds a "running" channel without a worker. Must fail.
    #[test]
    #[should_panic(expected = "never started")]
    fn loom_broken_mark_running_before_prepare_is_caught() {
        loom::model(|| {
            let coord = Coord::new(2).unwrap().with_bug(InjectedBug::MarkRunningBeforePrepare);
            let p = TestPlatform::with_coord(coord, Work::Exit, None);
            p.coord().create_all(&p, prepare_failing(Some(1))).unwrap();
            p.coord().cleanup(&p).unwrap();
        });
    }

    /// Seed defect 2, injected: the "all joined" token is handed out as soon as cleanup begins, so the
    /// shared state is released while a worker may still write it. Loom must report the race.
    #[test]
    #[should_panic]
    fn loom_broken_release_before_join_is_caught() {
        loom::model(|| {
            let coord = Coord::new(1).unwrap().with_bug(InjectedBug::TokenBeforeJoin);
            let p = TestPlatform::with_coord(coord, Work::WriteShared, None);
            p.coord().create_all(&p, prepare_failing(None)).unwrap();
            let cleaner = {
                let p = p.clone();
                thread::spawn(move || {
                    p.coord().cleanup(&p).unwrap();
                })
            };
            while p.coord().all_joined().is_err() {
                thread::yield_now();
            }
            p.release_shared();
            cleaner.join().unwrap();
        });
    }
}
