//! A deliberate data race, run only by the ThreadSanitizer tier (`--ignored`), which expects this test
//! to FAIL with a TSan report: it proves the sanitizer is really active in that tier.

#[test]
#[ignore = "deliberately racy: run only by the test command's TSan tier, which expects a TSan report"]
fn tsan_canary_detects_a_data_race() {
    struct Shared(std::cell::UnsafeCell<u64>);
    // SAFETY: deliberately unsound, so that ThreadSanitizer has a race to report.
    unsafe impl Sync for Shared {}
    impl Shared {
        fn bump(&self) {
            // SAFETY: not safe at all; this unsynchronised write is the race the canary exists to show.
            unsafe { *self.0.get() += 1 };
        }
    }
    let shared = Shared(std::cell::UnsafeCell::new(0));
    // Both threads pass the barrier before writing, so their writes are concurrent (a thread that
    // finished before the other started might be ordered by the runtime's own synchronisation).
    let start = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                start.wait();
                // Write for a fixed time, so the two threads' writes surely overlap.
                let until = std::time::Instant::now() + std::time::Duration::from_millis(50);
                while std::time::Instant::now() < until {
                    shared.bump();
                }
            });
        }
    });
    // SAFETY: both writers are joined.
    assert!(unsafe { *shared.0.get() } > 0);
}
