//! multifd-std: the std shim around [`multifd_core`].
//!
//! It maps the core's sans-I/O channel workers onto OS threads and sockets, routes the core's logging
//! to the `log` facade, and hosts the `multifd` command-line tool. The core does the protocol work;
//! this crate only moves bytes and runs workers.
// Receive errors carry whole block names (`multifd_core::block::BlockName`, 256 bytes; the reasons
// are on that type), so results holding them exceed these lints' thresholds.
#![allow(clippy::result_large_err, clippy::large_enum_variant)]

pub use multifd_core;

pub mod codec;
pub mod demo;
pub mod inspect;
pub mod mem;
pub mod platform;
pub mod recv;
pub mod send;
mod util;

/// Sets up `log` output for the command-line tool: `RUST_LOG` wins, otherwise `default_level`.
/// Lines read `multifd: message`, with the level after the prefix unless it is `info`.
pub fn init_logging(default_level: log::LevelFilter) {
    init_logging_as("multifd", default_level);
}

/// As [`init_logging`], with `prefix` (e.g. `multifd recv`) starting every line, so that log lines
/// and the tool's own messages read alike.
pub fn init_logging_as(prefix: &'static str, default_level: log::LevelFilter) {
    use std::io::Write;
    let mut builder = env_logger::Builder::new();
    builder.filter_level(default_level).parse_default_env().format(move |f, record| match record.level() {
        log::Level::Info => writeln!(f, "{prefix}: {}", record.args()),
        level => writeln!(f, "{prefix}: {}: {}", level.as_str().to_ascii_lowercase(), record.args()),
    });
    // A second call (tests, embedders that already set a logger) is not an error worth failing on.
    let _ = builder.try_init();
}
