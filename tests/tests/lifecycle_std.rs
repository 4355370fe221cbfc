//! The channel lifecycle on real OS threads (`multifd-std`'s scoped platform): failures injected at
//! every channel of eight, cleanup racing creation a thousand times, workers blocked in socket reads
//! unblocked by the wake hook. Every scenario must finish (a watchdog fails it otherwise), join
//! exactly the workers that started, and leave no worker thread behind.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use multifd_core::lifecycle::{
    ChannelId, ChannelState, CleanupReport, Coordinator, CreateReport, FailNthStart, StartError,
};
use multifd_std::platform::{Role, StdWaker, WorkerToken, run_scoped};
use multifd_tests::{with_deadline, worker_thread_count};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Error {
    Prepare(u8),
    InjectedStart(u8),
    Io(io::ErrorKind),
}

impl From<multifd_std::platform::StartError> for Error {
    fn from(e: multifd_std::platform::StartError) -> Self {
        Error::Io(e.error.kind())
    }
}

impl From<StartError<multifd_std::platform::StartError>> for Error {
    fn from(e: StartError<multifd_std::platform::StartError>) -> Self {
        match e {
            StartError::Injected { channel, .. } => Error::InjectedStart(channel.0),
            StartError::Platform(e) => e.into(),
        }
    }
}

type Coord = Coordinator<WorkerToken, Error, 8>;

/// Per-channel bookkeeping the workers update.
#[derive(Default)]
struct Book {
    started: [AtomicU32; 8],
    finished: [AtomicU32; 8],
    cancelled: [AtomicU32; 8],
    names: Mutex<Vec<String>>,
}

impl Book {
    /// The worker body: note the start, park until terminate cancels the wait, note the end.
    fn park_until_quit(&self, coord: &Coord, channel: ChannelId, waker: &StdWaker<'_>) {
        let c = channel.index();
        self.started[c].fetch_add(1, Ordering::SeqCst);
        if let Some(name) = thread::current().name() {
            self.names.lock().unwrap().push(name.to_owned());
        }
        if coord.wait_until(waker, channel, || false).is_err() {
            self.cancelled[c].fetch_add(1, Ordering::SeqCst);
        }
        self.finished[c].fetch_add(1, Ordering::SeqCst);
    }

    /// Every started worker ran to its end and its channel is `Joined`; the others never started.
    fn check(&self, coord: &Coord, report: CleanupReport) {
        let mut started_total = 0;
        for c in 0..coord.channels() {
            let started = self.started[c as usize].load(Ordering::SeqCst);
            let finished = self.finished[c as usize].load(Ordering::SeqCst);
            let state = coord.state(ChannelId(c)).unwrap();
            assert!(started <= 1, "channel {c} started {started} times");
            assert_eq!(finished, started, "channel {c}: started {started}, finished {finished}");
            assert_eq!(state == ChannelState::Joined, started == 1, "channel {c} is {state:?}");
            assert!(state.is_terminal(), "channel {c} left {state:?}");
            started_total += started;
        }
        assert_eq!(u32::from(report.joined), started_total, "cleanup joined exactly the started workers");
        coord.all_joined().unwrap();
    }
}

#[test]
fn start_failure_injected_at_every_k_of_8_channels() {
    with_deadline(120, "start_failure_injected_at_every_k_of_8_channels", || {
        for k in 0..8u8 {
            let coord = Coord::new(8).unwrap();
            let book = Book::default();
            let (created, report) = run_scoped(
                Role::Send,
                |c, waker| book.park_until_quit(&coord, c, waker),
                None,
                |p| {
                    let failing = FailNthStart::new(p, u32::from(k));
                    let created = coord.create_all(&failing, |_| Ok(())).unwrap();
                    (created, coord.cleanup(&failing).unwrap().report())
                },
            );
            assert_eq!(created, CreateReport { started: k, failed: 1, abandoned: 7 - k }, "k={k}");
            assert_eq!(coord.state(ChannelId(k)), Ok(ChannelState::Failed));
            assert_eq!(coord.error(), Some(&Error::InjectedStart(k)));
            book.check(&coord, report);
            let mut names = book.names.into_inner().unwrap();
            names.sort();
            let want: Vec<_> = (0..k).map(|c| format!("multifd-send-{c}")).collect();
            assert_eq!(names, want, "k={k}: worker threads are named after their channel");
        }
        assert_eq!(worker_thread_count(), 0, "no worker thread outlives its migration");
    });
}

#[test]
fn prepare_failure_injected_at_every_k_of_8_channels() {
    with_deadline(120, "prepare_failure_injected_at_every_k_of_8_channels", || {
        for k in 0..8u8 {
            let coord = Coord::new(8).unwrap();
            let book = Book::default();
            let (created, report) = run_scoped(
                Role::Recv,
                |c, waker| book.park_until_quit(&coord, c, waker),
                None,
                |p| {
                    let prepare = |c: ChannelId| if c.0 == k { Err(Error::Prepare(k)) } else { Ok(()) };
                    let created = coord.create_all(p, prepare).unwrap();
                    (created, coord.cleanup(p).unwrap().report())
                },
            );
            assert_eq!(created, CreateReport { started: k, failed: 1, abandoned: 7 - k }, "k={k}");
            assert_eq!(coord.error(), Some(&Error::Prepare(k)));
            assert_eq!(coord.later_errors(), 0);
            book.check(&coord, report);
            for c in 0..k {
                assert_eq!(book.cancelled[c as usize].load(Ordering::SeqCst), 1, "channel {c} was woken");
            }
        }
        assert_eq!(worker_thread_count(), 0, "no worker thread outlives its migration");
    });
}

#[test]
fn cleanup_racing_creation_1000_times() {
    with_deadline(300, "cleanup_racing_creation_1000_times", || {
        let mut outcomes = [0u32; 9];
        for i in 0..1000u32 {
            let coord = Coord::new(8).unwrap();
            let book = Book::default();
            let (created, report) = run_scoped(
                Role::Recv,
                |c, waker| book.park_until_quit(&coord, c, waker),
                None,
                |p| {
                    thread::scope(|s| {
                        let creator = s.spawn(|| coord.create_all(p, |_| Ok(())).unwrap());
                        // Vary how far creation gets before cleanup begins.
                        for _ in 0..(i % 7) {
                            thread::yield_now();
                        }
                        let report = coord.cleanup(p).unwrap().report();
                        (creator.join().unwrap(), report)
                    })
                },
            );
            assert_eq!(created.failed, 0, "iteration {i}");
            assert_eq!(created.started + created.abandoned, 8, "iteration {i}");
            assert_eq!(report.joined, created.started, "iteration {i}");
            book.check(&coord, report);
            assert_eq!(worker_thread_count(), 0, "iteration {i}: a worker thread outlived its migration");
            outcomes[created.started as usize] += 1;
        }
        assert_eq!(worker_thread_count(), 0, "no worker thread outlives its migration");
        // The race must really be exercised: cleanup won before some, but not all, starts.
        eprintln!("workers started per iteration (0..=8): {outcomes:?}");
        assert!(outcomes[8] < 1000, "cleanup never overtook creation: {outcomes:?}");
    });
}

#[test]
fn workers_blocked_in_socket_reads_are_unblocked_by_the_wake_hook() {
    with_deadline(60, "workers_blocked_in_socket_reads_are_unblocked_by_the_wake_hook", || {
        let coord = Coord::new(4).unwrap();
        // Each worker reads from its end of a socket pair whose other end nobody writes: only a
        // shutdown ends that read.
        let pairs: Vec<(UnixStream, UnixStream)> = (0..4).map(|_| UnixStream::pair().unwrap()).collect();
        let read_results: Mutex<Vec<(u8, usize)>> = Mutex::new(Vec::new());
        let hook_calls = AtomicU32::new(0);
        let report = run_scoped(
            Role::Recv,
            |c, _waker| {
                let mut buf = [0u8; 64];
                let n = (&pairs[c.index()].0).read(&mut buf).unwrap_or(0);
                read_results.lock().unwrap().push((c.0, n));
            },
            Some(Box::new(|c: ChannelId| {
                hook_calls.fetch_add(1, Ordering::SeqCst);
                let _ = pairs[c.index()].0.shutdown(std::net::Shutdown::Both);
            })),
            |p| {
                assert_eq!(coord.create_all(p, |_| Ok(())).unwrap().started, 4);
                // Give the workers time to block in read().
                thread::sleep(Duration::from_millis(50));
                coord.cleanup(p).unwrap().report()
            },
        );
        assert_eq!(report.joined, 4);
        let mut results = read_results.into_inner().unwrap();
        results.sort();
        assert_eq!(results, vec![(0, 0), (1, 0), (2, 0), (3, 0)], "every read ended by the shutdown");
        // Terminate wakes each channel once; cleanup wakes each started one again before its join.
        assert_eq!(hook_calls.load(Ordering::SeqCst), 8);
        drop(pairs);
        assert_eq!(worker_thread_count(), 0, "no worker thread outlives its migration");
    });
}
