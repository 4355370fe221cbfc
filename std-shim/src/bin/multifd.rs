//! `multifd`: command-line front end of multifd-rs.

use clap::Parser;

/// QEMU-compatible multifd live-migration channels, in Rust.
///
/// Subcommands arrive as the engines land: `recv`, `send`, `demo` and `inspect`.
#[derive(Debug, Parser)]
#[command(name = "multifd", version, about, long_about = None)]
struct Cli {
    /// More log output (-v: debug, -vv: trace). `RUST_LOG` overrides this.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    multifd_std::init_logging(level);
    log::info!("multifd {} (core {})", env!("CARGO_PKG_VERSION"), multifd_std::multifd_core::VERSION);
}
