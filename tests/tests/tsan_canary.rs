//! A deliberate data race, run only by the ThreadSanitizer tier (`--ignored`), which expects this test
//! to FAIL with a TSan report: it proves the sanitizer is really active in that tier.

use std::sync::atomic::{AtomicBool, Ordering};

#[test]
#[ignore = "deliberately racy: run only by the test command's TSan tier, which expects a TSan report"]
fn tsan_canary_detects_a_data_race() {
    // TSan does not report every racy execution, so race 32 times, on fresh memory each time; one
    // report is all the tier needs.
    for _ in 0..32 {
        race_once();
    }
}

fn race_once() {
    struct Shared(std::cell::UnsafeCell<u64>);
    // SAFETY: deliberately unsound, so that ThreadSanitizer has a race to report.
    unsafe impl Sync for Shared {}
    impl Shared {
        fn bump(&self) {
            // SAFETY: not safe at all; this unsynchronised write is the race the canary exists to show.
            unsafe { *self.0.get() += 1 };
        }
    }
    let shared = Box::new(Shared(std::cell::UnsafeCell::new(0)));
    let shared = &*shared;
    // A writes, then raises a Relaxed flag; B waits for it, writes, and raises its own; A stays alive
    // until then. Relaxed flags create no happens-before edge, so the two writes race; B's always
    // follows A's in real time while both threads live (TSan can miss a race with a thread that has
    // already exited, whose slot it reuses).
    let a_wrote = AtomicBool::new(false);
    let b_wrote = AtomicBool::new(false);
    let wait = |flag: &AtomicBool| {
        while !flag.load(Ordering::Relaxed) {
            std::hint::spin_loop();
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            shared.bump();
            a_wrote.store(true, Ordering::Relaxed);
            wait(&b_wrote);
        });
        s.spawn(|| {
            wait(&a_wrote);
            shared.bump();
            b_wrote.store(true, Ordering::Relaxed);
        });
    });
    // SAFETY: both writers are joined.
    assert_eq!(unsafe { *shared.0.get() }, 2);
}
