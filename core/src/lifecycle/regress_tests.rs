//! Regression tests for QEMU's multifd lifecycle defects, named after their ids in
//! `qemu-multifd.md` section 5 (B01..B14) and the scenarios of its section 7.2.
//!
//! Each scenario is one function that runs the situation QEMU got wrong and asserts the outcome the
//! table expects. Where the core carries a test-only [`InjectedBug`] that reproduces the QEMU defect,
//! a companion test runs the same scenario with the defect injected and requires it to fail: proof
//! that the scenario can catch the bug, not only that today's code passes it.
//!
//! Creation here runs the way QEMU runs it: one creator per channel on its own thread (QEMU's
//! asynchronous connect callbacks and TLS handshake threads), racing each other and cleanup.

use super::*;
use crate::sync::{AtomicBool, AtomicU32, Ordering};
use core::time::Duration;
use std::sync::Arc;
use std::thread;
use std::vec::Vec;

const CAP: usize = 8;

/// Errors of the scenarios: each names the channel it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Error {
    Connect(u8),
    Handshake(u8),
    Worker(u8),
}

/// What a started worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Waits in `wait_until` until the migration terminates (a thread idle in its loop).
    ParkUntilQuit,
    /// Returns at once (a thread that already exited before cleanup).
    Exit,
    /// Waits for `go`, then records an error: several workers fail at the same moment.
    FailOnGo,
    /// Sets bits of the shared "bitmap" until cancelled, then finishes its packet (a short sleep and
    /// one more write), as a recv thread busy in a packet when the load ends.
    WriteUntilQuit,
}

type Coord = Coordinator<thread::JoinHandle<()>, Error, CAP>;

fn counters() -> [AtomicU32; CAP] {
    core::array::from_fn(|_| AtomicU32::new(0))
}

struct Inner {
    coord: Coord,
    work: Work,
    started: [AtomicU32; CAP],
    joined: [AtomicU32; CAP],
    exited: [AtomicU32; CAP],
    woken: [AtomicU32; CAP],
    /// Set once the channel's pre-start step (connect, handshake) completed successfully.
    established: [AtomicBool; CAP],
    /// `Platform::start` was called for a channel that was not established (B40).
    started_unestablished: AtomicU32,
    /// Workers currently running.
    live: AtomicU32,
    go: AtomicBool,
    /// The shared state workers write (a received bitmap in QEMU's B09): "freed" by the owner.
    bitmap_freed: AtomicBool,
    bitmap_writes: AtomicU32,
    /// Writes that happened after the owner freed the state: use after free.
    writes_after_free: AtomicU32,
}

#[derive(Clone)]
struct Rig(Arc<Inner>);

// Orderings in this test rig are all SeqCst: the counters are observations for assertions, and the
// strongest ordering keeps them from hiding an ordering bug of the code under test.
impl Rig {
    fn new(channels: u8, work: Work, bug: InjectedBug) -> Self {
        Rig(Arc::new(Inner {
            coord: Coord::new(channels).unwrap().with_bug(bug),
            work,
            started: counters(),
            joined: counters(),
            exited: counters(),
            woken: counters(),
            established: core::array::from_fn(|_| AtomicBool::new(false)),
            started_unestablished: AtomicU32::new(0),
            live: AtomicU32::new(0),
            go: AtomicBool::new(false),
            bitmap_freed: AtomicBool::new(false),
            bitmap_writes: AtomicU32::new(0),
            writes_after_free: AtomicU32::new(0),
        }))
    }

    fn coord(&self) -> &Coord {
        &self.0.coord
    }

    fn get(a: &[AtomicU32; CAP], c: u8) -> u32 {
        a[usize::from(c)].load(Ordering::SeqCst)
    }

    fn write_bitmap(&self) {
        self.0.bitmap_writes.fetch_add(1, Ordering::SeqCst);
        if self.0.bitmap_freed.load(Ordering::SeqCst) {
            self.0.writes_after_free.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The invariants every scenario ends with: join iff started, exactly once; every channel in a
    /// terminal state; no worker still running.
    fn assert_join_iff_started(&self) {
        for c in 0..self.coord().channels() {
            let started = Self::get(&self.0.started, c);
            assert!(started <= 1, "channel {c} started {started} times");
            assert_eq!(Self::get(&self.0.joined, c), started, "channel {c}: joins must equal starts");
            assert_eq!(Self::get(&self.0.exited, c), started, "channel {c}: a joined worker has ended");
            let state = self.coord().state(ChannelId(c)).unwrap();
            assert!(state.is_terminal(), "channel {c} left in {state:?}");
            assert_eq!(state == ChannelState::Joined, started == 1, "channel {c} is {state:?}");
        }
        assert_eq!(self.0.live.load(Ordering::SeqCst), 0, "a worker outlived cleanup");
        assert_eq!(self.0.started_unestablished.load(Ordering::SeqCst), 0, "a worker started on a half-set-up channel");
    }
}

impl Wake for Rig {
    fn wake(&self, channel: ChannelId) {
        self.0.woken[channel.index()].fetch_add(1, Ordering::SeqCst);
    }

    fn idle(&self, _channel: ChannelId) {
        thread::yield_now();
    }
}

impl Platform for Rig {
    type Handle = thread::JoinHandle<()>;
    type Error = Error;

    fn start(&self, channel: ChannelId) -> Result<Self::Handle, Error> {
        let c = channel.index();
        if !self.0.established[c].load(Ordering::SeqCst) {
            self.0.started_unestablished.fetch_add(1, Ordering::SeqCst);
        }
        self.0.started[c].fetch_add(1, Ordering::SeqCst);
        self.0.live.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        Ok(thread::spawn(move || {
            let coord = me.coord();
            match me.0.work {
                Work::ParkUntilQuit => {
                    let _ = coord.wait_until(&me, channel, || false);
                }
                Work::Exit => {}
                Work::FailOnGo => {
                    while !me.0.go.load(Ordering::SeqCst) {
                        thread::yield_now();
                    }
                    coord.record_error(&me, Error::Worker(channel.0));
                }
                Work::WriteUntilQuit => {
                    let _ = coord.wait_until(&me, channel, || {
                        me.write_bitmap();
                        false
                    });
                    // Still inside a packet when the migration ends: finish it.
                    thread::sleep(Duration::from_millis(30));
                    me.write_bitmap();
                }
            }
            me.0.exited[c].fetch_add(1, Ordering::SeqCst);
            me.0.live.fetch_sub(1, Ordering::SeqCst);
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

fn iterations(native: u32) -> u32 {
    if cfg!(miri) { 2 } else { native }
}

/// Runs one creator per channel on its own thread. `step(c)` is channel c's pre-start step (it may
/// sleep: a connect that completes late). Cleanup starts as soon as the creator of `cleanup_after`
/// has finished (or every creator, for `None`), while the others may still be connecting. Returns
/// each creator's outcome.
fn create_racing_cleanup(
    rig: &Rig,
    cleanup_after: Option<u8>,
    step: impl Fn(u8) -> Result<(), Error> + Sync,
) -> Vec<Result<Created, TransitionError>> {
    let channels = rig.coord().channels();
    let finished: [AtomicBool; CAP] = core::array::from_fn(|_| AtomicBool::new(false));
    thread::scope(|s| {
        let creators: Vec<_> = (0..channels)
            .map(|c| {
                let (rig, step, finished) = (rig, &step, &finished);
                s.spawn(move || {
                    let r = rig.coord().create(rig, ChannelId(c), |id| {
                        step(id.0)?;
                        rig.0.established[id.index()].store(true, Ordering::SeqCst);
                        Ok(())
                    });
                    finished[usize::from(c)].store(true, Ordering::SeqCst);
                    r
                })
            })
            .collect();
        let ready = || match cleanup_after {
            Some(k) => finished[usize::from(k)].load(Ordering::SeqCst),
            None => finished[..usize::from(channels)].iter().all(|f| f.load(Ordering::SeqCst)),
        };
        while !ready() {
            thread::yield_now();
        }
        let report = rig.coord().cleanup(rig).unwrap().report();
        let outcomes: Vec<_> = creators.into_iter().map(|h| h.join().unwrap()).collect();
        let started = outcomes.iter().filter(|r| **r == Ok(Created::Started)).count();
        assert_eq!(usize::from(report.joined), started, "cleanup joined exactly the workers that started");
        outcomes
    })
}

/// 7.2 row 1 (B01, B02, B03, B08): channel k of N fails to connect while the others connect late
/// (or early). Expected: k is never joined, every other channel that started is joined exactly once,
/// and no worker runs after cleanup returned (nothing can use state freed after it).
fn scenario_channel_k_fails_others_late(bug: InjectedBug) {
    const N: u8 = 4;
    for round in 0..iterations(40) {
        for k in 0..N {
            // Even rounds: the others connect late (after k failed and cleanup began). Odd rounds: they
            // connect at once and k fails late, after their workers started.
            let others_late = round % 2 == 0;
            let rig = Rig::new(N, Work::ParkUntilQuit, bug);
            let outcomes = create_racing_cleanup(&rig, if others_late { Some(k) } else { None }, |c| {
                let late = Duration::from_millis(if cfg!(miri) { 1 } else { 3 });
                match (c == k, others_late) {
                    (true, true) => Err(Error::Connect(c)),
                    (true, false) => {
                        thread::sleep(late);
                        Err(Error::Connect(c))
                    }
                    (false, true) => {
                        thread::sleep(late);
                        Ok(())
                    }
                    (false, false) => Ok(()),
                }
            });
            rig.assert_join_iff_started();
            assert_eq!(Rig::get(&rig.0.started, k), 0, "k={k}: the failed channel must never start");
            assert!(
                matches!(outcomes[usize::from(k)], Ok(Created::Failed | Created::Abandoned)),
                "k={k}: {:?}",
                outcomes[usize::from(k)]
            );
            assert_eq!(rig.coord().error(), Some(&Error::Connect(k)), "k={k}: the connect error is the migration's");
            assert_eq!(rig.coord().later_errors(), 0, "k={k}: one failure, one error");
            for (c, o) in outcomes.iter().enumerate() {
                assert!(o.is_ok(), "channel {c}: creation must not fail with a state error: {o:?}");
            }
        }
    }
}

#[test]
fn b01_b02_b03_b08_channel_k_fails_to_connect_others_late() {
    scenario_channel_k_fails_others_late(InjectedBug::None);
}

/// The same scenario with QEMU's B01 defect injected (the channel is published as running before its
/// fallible step): cleanup finds a "running" channel that never started, and the scenario fails.
#[test]
#[should_panic(expected = "never started")]
fn b01_injected_running_before_connect_is_caught() {
    scenario_channel_k_fails_others_late(InjectedBug::MarkRunningBeforePrepare);
}

/// 7.2 row 2 (B01, B04, B14, B40): a pre-thread handshake (TLS in QEMU; here connect + init packet)
/// fails for one channel. Handshakes run on helper threads, one per channel. Expected: every helper
/// is joined, the failed channel's worker never exists (so it is never joined), no worker starts on a
/// half-established channel, and the error is reported exactly once.
fn scenario_handshake_fails_for_one_channel(bug: InjectedBug) {
    const N: u8 = 4;
    for k in 0..N {
        let rig = Rig::new(N, Work::ParkUntilQuit, bug);
        let helpers_joined = AtomicU32::new(0);
        thread::scope(|s| {
            let helpers: Vec<_> = (0..N)
                .map(|c| {
                    let rig = &rig;
                    s.spawn(move || {
                        rig.coord().create(rig, ChannelId(c), |id| {
                            if id.0 == k {
                                return Err(Error::Handshake(id.0));
                            }
                            rig.0.established[id.index()].store(true, Ordering::SeqCst);
                            Ok(())
                        })
                    })
                })
                .collect();
            for h in helpers {
                h.join().unwrap().unwrap();
                helpers_joined.fetch_add(1, Ordering::SeqCst);
            }
        });
        assert_eq!(helpers_joined.load(Ordering::SeqCst), u32::from(N), "every handshake helper is joined");
        rig.coord().cleanup(&rig).unwrap();
        rig.assert_join_iff_started();
        assert_eq!(Rig::get(&rig.0.started, k), 0);
        assert_eq!(Rig::get(&rig.0.joined, k), 0, "k={k}: the main thread of a failed handshake is never joined");
        assert_eq!(rig.coord().error(), Some(&Error::Handshake(k)));
        assert_eq!(rig.coord().later_errors(), 0, "k={k}: the error is reported once");
        for c in 0..N {
            assert_eq!(Rig::get(&rig.0.woken, c), 1 + Rig::get(&rig.0.started, c), "channel {c}: one terminate wake");
        }
    }
}

#[test]
fn b01_b04_b14_b40_handshake_fails_for_one_channel() {
    scenario_handshake_fails_for_one_channel(InjectedBug::None);
}

#[test]
#[should_panic(expected = "never started")]
fn b01_b04_injected_running_before_handshake_is_caught() {
    scenario_handshake_fails_for_one_channel(InjectedBug::MarkRunningBeforePrepare);
}

/// B05: workers that already returned before cleanup are joined too (QEMU skipped them and leaked).
#[test]
fn b05_workers_that_already_exited_are_joined() {
    let rig = Rig::new(4, Work::Exit, InjectedBug::None);
    let report = rig.coord().create_all(&rig, |c| {
        rig.0.established[c.index()].store(true, Ordering::SeqCst);
        Ok(())
    });
    assert_eq!(report.unwrap().started, 4);
    while rig.0.live.load(Ordering::SeqCst) != 0 {
        thread::yield_now();
    }
    let token = rig.coord().cleanup(&rig).unwrap();
    assert_eq!(token.report().joined, 4, "a finished worker still has to be joined");
    rig.assert_join_iff_started();
}

/// B07: terminate and cleanup tolerate channels at every stage of set-up (never claimed, in the middle
/// of connecting, running), and a terminate that runs twice.
#[test]
fn b07_terminate_tolerates_partially_set_up_channels() {
    let rig = Rig::new(4, Work::ParkUntilQuit, InjectedBug::None);
    let release = AtomicBool::new(false);
    let connecting = AtomicBool::new(false);
    thread::scope(|s| {
        assert_eq!(
            rig.coord().create(&rig, ChannelId(0), |c| {
                rig.0.established[c.index()].store(true, Ordering::SeqCst);
                Ok(())
            }),
            Ok(Created::Started)
        );
        let slow = s.spawn(|| {
            rig.coord().create(&rig, ChannelId(1), |c| {
                connecting.store(true, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    thread::yield_now();
                }
                rig.0.established[c.index()].store(true, Ordering::SeqCst);
                Ok(())
            })
        });
        while !connecting.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        assert_eq!(rig.coord().state(ChannelId(1)), Ok(ChannelState::Creating));
        assert!(rig.coord().terminate(&rig));
        assert!(!rig.coord().terminate(&rig), "terminate is idempotent");
        let report = rig.coord().cleanup(&rig).unwrap().report();
        assert_eq!((report.joined, report.sealed), (1, 3), "channel 0 joined; 1 (connecting), 2, 3 sealed");
        release.store(true, Ordering::SeqCst);
        assert_eq!(slow.join().unwrap(), Ok(Created::Abandoned), "a sealed channel never starts its worker");
    });
    rig.assert_join_iff_started();
    for c in 0..4 {
        assert_eq!(Rig::get(&rig.0.woken, c), 1 + Rig::get(&rig.0.started, c), "channel {c}");
    }
}

/// 7.2 row "recv threads still writing the bitmap when the load finishes or fails" (B06, B09):
/// workers are busy writing shared state when the migration fails; the owner frees that state as
/// soon as it holds the all-joined token. Expected: no write after the free. With QEMU's defect
/// injected (the token handed out when cleanup begins, not after the joins) a worker still finishing
/// its packet writes into freed state, and the scenario fails.
fn scenario_state_freed_only_after_join(bug: InjectedBug) {
    for _ in 0..iterations(5) {
        let rig = Rig::new(3, Work::WriteUntilQuit, bug);
        rig.coord()
            .create_all(&rig, |c| {
                rig.0.established[c.index()].store(true, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        while rig.0.bitmap_writes.load(Ordering::SeqCst) < 3 {
            thread::yield_now();
        }
        thread::scope(|s| {
            // The load fails: an error is recorded and the one cleanup owner joins the workers.
            let cleaner = s.spawn(|| {
                rig.coord().record_error(&rig, Error::Worker(0));
                rig.coord().cleanup(&rig).map(|t| t.report())
            });
            // The owner of the bitmap frees it the moment it is allowed to.
            while rig.coord().all_joined().is_err() {
                thread::yield_now();
            }
            rig.0.bitmap_freed.store(true, Ordering::SeqCst);
            assert_eq!(cleaner.join().unwrap().unwrap().joined, 3);
        });
        assert_eq!(rig.0.writes_after_free.load(Ordering::SeqCst), 0, "a worker wrote the bitmap after it was freed");
        rig.assert_join_iff_started();
    }
}

#[test]
fn b06_b09_bitmap_freed_only_after_every_worker_joined() {
    scenario_state_freed_only_after_join(InjectedBug::None);
}

#[test]
#[should_panic(expected = "after it was freed")]
fn b09_injected_free_before_join_is_caught() {
    scenario_state_freed_only_after_join(InjectedBug::TokenBeforeJoin);
}

/// 7.2 row "error from two threads at once" (3.7): every worker records an error at the same moment.
/// Expected: one error kept, the others counted, and the migration terminated exactly once (each
/// channel woken once by terminate, plus once right before its join).
#[test]
fn s3_7_error_from_two_threads_at_once_recorded_once() {
    for _ in 0..iterations(50) {
        let rig = Rig::new(4, Work::FailOnGo, InjectedBug::None);
        rig.coord()
            .create_all(&rig, |c| {
                rig.0.established[c.index()].store(true, Ordering::SeqCst);
                Ok(())
            })
            .unwrap();
        rig.0.go.store(true, Ordering::SeqCst);
        while rig.0.live.load(Ordering::SeqCst) != 0 {
            thread::yield_now();
        }
        rig.coord().cleanup(&rig).unwrap();
        rig.assert_join_iff_started();
        assert!(matches!(rig.coord().error(), Some(Error::Worker(_))), "{:?}", rig.coord().error());
        assert_eq!(rig.coord().later_errors(), 3, "one error kept, three counted");
        for c in 0..4 {
            assert_eq!(Rig::get(&rig.0.woken, c), 2, "channel {c}: terminate ran once (plus the join wake)");
        }
    }
}
