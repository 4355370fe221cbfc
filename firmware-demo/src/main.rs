//! The firmware demo: multifd-core on a bare-metal Cortex-M3 (QEMU's mps2-an385 board).
//!
//! On the host this file compiles to a stub that explains how to run the real thing (`cargo fw`);
//! the firmware itself lives in `fw.rs` and is built only for `target_os = "none"`.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]
// Receive errors carry whole block names (`multifd_core::block::BlockName`, 256 bytes; the reasons
// are on that type), so results holding them exceed these lints' thresholds.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

#[cfg(target_os = "none")]
mod fw;
#[cfg(target_os = "none")]
mod migration;

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("firmware-demo runs on bare metal; build and run it in QEMU with `cargo fw`");
}
