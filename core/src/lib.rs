//! multifd-core: see the crate README below.
//!
#![doc = include_str!("../README.md")]
#![no_std]
#![deny(unsafe_code)]
#![warn(clippy::std_instead_of_core, clippy::alloc_instead_of_core)]
// Errors that name a block carry its whole `BlockName` (256 bytes), so they are larger than this
// lint's 128-byte threshold; the choice and its cost are explained on `block::BlockName`, and the
// recv unit tests pin the sizes.
#![allow(clippy::result_large_err)]

// Unit tests use the standard library; the library itself never does.
#[cfg(test)]
extern crate std;

// `fmt` must come first: `macro_rules!` scoping is textual, and every later module uses its macros.
#[macro_use]
mod fmt;

pub mod bitmap;
pub mod block;
pub mod codec;
#[allow(unsafe_code)]
pub mod lifecycle;
#[allow(unsafe_code)]
pub mod lock;
pub mod recv;
#[allow(unsafe_code)]
pub mod send;
pub mod stall;
#[allow(unsafe_code)]
pub(crate) mod sync;
pub mod wire;

/// Version of this crate, for banners and `--version` output.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(all(test, feature = "defmt", not(target_os = "none")))]
#[allow(unsafe_code)]
mod defmt_host_logger {
    //! Host unit tests with `--features defmt` need a global logger and a timestamp to link.
    //! Firmware provides its own; this one discards everything and exists only in test builds.
    #[defmt::global_logger]
    struct Discard;

    // SAFETY: every method is a no-op, so there is no state whose exclusivity `acquire`/`release`
    // would have to guarantee.
    unsafe impl defmt::Logger for Discard {
        fn acquire() {}
        unsafe fn flush() {}
        unsafe fn release() {}
        unsafe fn write(_bytes: &[u8]) {}
    }

    defmt::timestamp!("{=u32}", 0);
}
