//! A closure-scoped spin lock for state shared between channel workers.
//!
//! Access is only through [`SpinLock::lock`]: the closure gets `&mut T` and the lock is released
//! when it returns (or unwinds), so no guard can escape and the lock cannot be held across I/O by
//! accident. It spins with the platform's spin hint, which makes it usable on bare metal with no
//! scheduler; critical sections must therefore stay short.
//!
//! It is built on the crate's `sync` seam, so loom models exercise every acquisition and every access to
//! the protected value.

use crate::sync::{AtomicBool, Ordering, UnsafeCell, spin_loop};

/// A mutual-exclusion spin lock whose value is reachable only inside [`SpinLock::lock`].
#[derive(Debug)]
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through `lock`, which grants `&mut T` to one thread at a time
// (the `locked` flag is taken with an Acquire CAS and released with a Release store), so sharing the
// lock across threads only ever moves `T` between threads: `T: Send` is what that needs.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// A new, unlocked lock holding `value`. `const`, so the lock can live in a `static`.
    #[cfg(not(all(test, loom)))]
    pub const fn new(value: T) -> Self {
        Self { locked: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }

    /// A new, unlocked lock holding `value` (loom build: loom's atomics are not `const`).
    #[cfg(all(test, loom))]
    pub fn new(value: T) -> Self {
        Self { locked: AtomicBool::new(false), value: UnsafeCell::new(value) }
    }

    /// Runs `f` with exclusive access to the value, spinning until the lock is free.
    pub fn lock<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        loop {
            // Acquire on success: everything the previous holder wrote before its Release is visible.
            // Relaxed on failure: nothing is read when the lock is not taken.
            if self.locked.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                break;
            }
            // Relaxed: a hint only; the CAS above does the synchronising.
            while self.locked.load(Ordering::Relaxed) {
                spin_loop();
            }
        }
        self.run_locked(f)
    }

    /// Runs `f` with exclusive access if the lock is free right now; `None` if it is held.
    pub fn try_lock<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        // Acquire on success / Relaxed on failure: as in `lock`.
        self.locked.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).ok().map(|_| self.run_locked(f))
    }

    /// The value, through a unique borrow of the lock (no locking needed).
    pub fn get_mut(&mut self) -> &mut T {
        // SAFETY: `&mut self` proves no other reference to the lock, hence to the value, exists.
        self.value.with_mut(|p| unsafe { &mut *p })
    }

    /// Runs `f` on the value; the caller holds the lock. Releases it afterwards, even on unwind.
    fn run_locked<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        struct Release<'a>(&'a AtomicBool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                // Release: publishes the holder's writes to the next Acquire in `lock`/`try_lock`.
                self.0.store(false, Ordering::Release);
            }
        }
        let _release = Release(&self.locked);
        // SAFETY: the caller took `locked` from false to true, so this thread is the only one inside
        // the lock until `_release` drops; no other `&mut T` to the value can exist meanwhile.
        self.value.with_mut(|p| f(unsafe { &mut *p }))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::SpinLock;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn lock_gives_exclusive_access_across_threads() {
        let lock = Arc::new(SpinLock::new(0u64));
        let per_thread = if cfg!(miri) { 50 } else { 10_000 };
        let workers: std::vec::Vec<_> = (0..4)
            .map(|_| {
                let lock = Arc::clone(&lock);
                thread::spawn(move || {
                    for _ in 0..per_thread {
                        // A non-atomic read-modify-write: any overlap of two holders loses an update.
                        lock.lock(|v| {
                            let seen = core::hint::black_box(*v);
                            *v = seen + 1;
                        });
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(lock.lock(|v| *v), 4 * per_thread);
    }

    #[test]
    fn try_lock_fails_while_held_and_succeeds_after() {
        let lock = SpinLock::new(1u8);
        let inner = lock.lock(|_| lock.try_lock(|v| *v));
        assert_eq!(inner, None, "try_lock must fail while the lock is held");
        assert_eq!(lock.try_lock(|v| *v), Some(1));
    }

    #[test]
    fn lock_is_released_when_the_closure_panics() {
        let lock = SpinLock::new(5u8);
        let r = std::panic::catch_unwind(core::panic::AssertUnwindSafe(|| lock.lock(|_| panic!("boom"))));
        assert!(r.is_err());
        assert_eq!(lock.try_lock(|v| *v), Some(5), "a panic inside the closure must not leave the lock held");
    }

    #[test]
    fn get_mut_reaches_the_value_without_locking() {
        let mut lock = SpinLock::new(3u8);
        *lock.get_mut() = 4;
        assert_eq!(lock.lock(|v| *v), 4);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::SpinLock;
    use loom::sync::Arc;
    use loom::thread;

    /// Two threads each do a split read-then-write increment inside the lock. With mutual exclusion
    /// no increment is lost, and loom checks every interleaving of the lock's atomics and cell.
    #[test]
    fn loom_spinlock_mutual_exclusion() {
        loom::model(|| {
            let lock = Arc::new(SpinLock::new(0u32));
            let other = Arc::clone(&lock);
            let t = thread::spawn(move || other.lock(|v| *v += 1));
            lock.lock(|v| *v += 1);
            t.join().unwrap();
            assert_eq!(lock.lock(|v| *v), 2);
        });
    }
}
