//! The one seam for everything concurrent in the core: atomics, interior-mutability cells and the
//! spin hint. Under `cfg(all(test, loom))` these are loom's instrumented versions, so loom sees
//! every access the core makes; otherwise they are `core`'s.
//!
//! Nothing outside this module names `core::sync::atomic` or `core::cell::UnsafeCell` (the test
//! command's tier 1 greps for it). Loom's atomics cannot be built in a `const fn`, so types that
//! must live in a `static` have a `const fn new` outside loom and a plain `fn new` under it.
#![allow(unreachable_pub, dead_code, unused_imports)]

#[cfg(not(all(test, loom)))]
mod imp {
    pub use core::hint::spin_loop;
    pub use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering, fence};

    /// `core::cell::UnsafeCell` behind loom's closure API, so call sites are the same in both builds.
    #[derive(Debug)]
    #[repr(transparent)]
    pub struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        /// Wraps `value`.
        pub const fn new(value: T) -> Self {
            Self(core::cell::UnsafeCell::new(value))
        }

        /// Calls `f` with a shared raw pointer to the contents.
        #[inline(always)]
        pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }

        /// Calls `f` with a unique raw pointer to the contents.
        #[inline(always)]
        pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

#[cfg(all(test, loom))]
mod imp {
    pub use loom::cell::UnsafeCell;
    pub use loom::hint::spin_loop;
    pub use loom::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering, fence};
}

pub(crate) use imp::*;

/// A number no earlier call returned (from 1; a `usize` does not run out in practice). One counter
/// for the whole program, outside loom's model on purpose: it hands out identities, it is not a
/// protocol under test.
pub(crate) fn next_unique_id() -> usize {
    static NEXT: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(1);
    // Relaxed: only uniqueness matters, which the RMW gives; nothing is published through it.
    NEXT.fetch_add(1, core::sync::atomic::Ordering::Relaxed)
}
