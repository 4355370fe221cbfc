//! `multifd`: command-line front end of multifd-rs.

use clap::{Parser, Subcommand, ValueEnum};
use multifd_std::inspect::{self, Options};
use multifd_std::multifd_core::wire::Layout;
use multifd_std::recv;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// QEMU-compatible multifd live-migration channels, in Rust.
///
/// Subcommands arrive as the engines land: `recv`, `send`, `demo` and `inspect`.
#[derive(Debug, Parser)]
#[command(name = "multifd", version, about, long_about = None)]
struct Cli {
    /// More log output (-v: debug, -vv: trace). `RUST_LOG` overrides this.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Accept a live migration (main stream and N multifd channels) and write each RAM block to
    /// `DIR/<idstr>.bin`. Exit code 0 only when the migration completed and every page arrived.
    Recv {
        /// Address to listen on (port 0: any free port, written to --port-file and printed).
        #[arg(long)]
        listen: String,
        /// Multifd channels of the source.
        #[arg(long)]
        channels: u8,
        /// Directory for the block files.
        #[arg(long)]
        out: PathBuf,
        /// Refuse channels whose init packet carries another uuid.
        #[arg(long)]
        uuid: Option<String>,
        /// Target page size of the migration.
        #[arg(long, default_value_t = 4096)]
        page_size: u32,
        /// Print one JSON object with the result on stdout.
        #[arg(long)]
        json: bool,
        /// Write the bound port to this file.
        #[arg(long)]
        port_file: Option<PathBuf>,
        /// Map and touch block NAME of SIZE bytes (K/M/G suffixes) before accepting connections.
        #[arg(long, value_name = "NAME:SIZE")]
        prealloc: Vec<String>,
        /// Once the first connection is in, how long the main stream and every channel may take to
        /// connect (fractions allowed; 0: no limit). The error names the missing channel ids.
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_timeout)]
        accept_timeout: Timeout,
        /// Fail as stalled when no byte arrives on any connection for this long (0: no limit).
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_timeout)]
        io_timeout: Timeout,
        /// Refuse a block list declaring more RAM than this in total (K/M/G/T suffixes; default:
        /// this machine's physical RAM).
        #[arg(long, value_name = "BYTES", value_parser = recv::parse_bytes)]
        max_ram: Option<u64>,
    },
    /// Decode captured migration streams (one file per connection: main stream or multifd
    /// channel, told apart by their first bytes) and print their packets and records.
    Inspect {
        /// Captured streams.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Target page size of the migration (fixes the packet header length).
        #[arg(long, default_value_t = 4096)]
        page_size: u32,
        /// RAM packet header layout of the sender.
        #[arg(long, value_enum, default_value_t = LayoutArg::V9_0)]
        layout: LayoutArg,
    },
    /// Generate a guest image, migrate it over loopback from our sender to our receiver in several
    /// rounds (pages dirtied between them), verify byte for byte, and print a summary.
    Demo {
        /// Guest RAM size (K, M, G suffixes).
        #[arg(long, default_value = "1G", value_parser = multifd_std::demo::parse_size)]
        size: u64,
        /// Multifd channels.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=16))]
        channels: u8,
        /// Rounds, the final one included (at least 2).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Share of zero pages, in percent.
        #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(0..=100))]
        zero_percent: u32,
        /// Seed of the image and of the dirtied pages.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Migrate RAM images to a QEMU-compatible destination (main stream plus N multifd channels).
    Send {
        /// Destination HOST:PORT (a QEMU `-incoming` address).
        #[arg(long)]
        connect: String,
        /// Multifd channels (the destination's `multifd-channels`).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=16))]
        channels: u8,
        /// RAM image `FILE[:NAME]`; NAME defaults to the file stem (`m0` for `-M none,memory-backend=m0`).
        #[arg(long = "image", required = true)]
        images: Vec<String>,
        /// Machine type in the configuration section (must match the destination's).
        #[arg(long, default_value = "none")]
        machine: String,
        /// UUID written in every init packet (all zero by default).
        #[arg(long)]
        uuid: Option<String>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// How long each connect may take (fractions allowed).
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_timeout)]
        connect_timeout: Timeout,
        /// Fail as stalled when the destination takes no byte on any connection for this long
        /// (0: no limit).
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_timeout)]
        io_timeout: Timeout,
        /// Most bytes per second on all channels together (K/M/G suffixes; default: no limit).
        #[arg(long, value_name = "BYTES", value_parser = recv::parse_bytes)]
        max_bandwidth: Option<u64>,
    },
}

/// A timeout in seconds from the command line; `None` for 0 (no limit).
#[derive(Debug, Clone, Copy)]
struct Timeout(Option<Duration>);

fn parse_timeout(s: &str) -> Result<Timeout, String> {
    recv::parse_timeout(s).map(Timeout)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LayoutArg {
    /// QEMU 7.2 to 8.2 (no zero_pages field).
    #[value(name = "7.2")]
    V7_2,
    /// QEMU 9.0 and later.
    #[value(name = "9.0")]
    V9_0,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    multifd_std::init_logging(level);
    match cli.command {
        None => {
            log::info!("multifd {} (core {})", env!("CARGO_PKG_VERSION"), multifd_std::multifd_core::VERSION);
            ExitCode::SUCCESS
        }
        Some(Command::Demo { size, channels, rounds, zero_percent, seed, json }) => {
            let opts = multifd_std::demo::DemoOptions { size, channels, rounds, zero_percent, seed, json };
            ExitCode::from(multifd_std::demo::run(&opts) as u8)
        }
        Some(Command::Send {
            connect,
            channels,
            images,
            machine,
            uuid,
            json,
            connect_timeout,
            io_timeout,
            max_bandwidth,
        }) => {
            let limits = multifd_std::send::SendLimits {
                // No limit on a connect is the operating system's own (minutes).
                connect_timeout: connect_timeout.0.unwrap_or(Duration::from_secs(u32::MAX.into())),
                io_timeout: io_timeout.0,
                max_bandwidth: max_bandwidth.filter(|&b| b > 0),
            };
            let code =
                multifd_std::send::run_cli(&connect, channels, &images, &machine, uuid.as_deref(), json, &limits);
            ExitCode::from(code as u8)
        }
        Some(Command::Recv {
            listen,
            channels,
            out,
            uuid,
            page_size,
            json,
            port_file,
            prealloc,
            accept_timeout,
            io_timeout,
            max_ram,
        }) => {
            let limits = recv::Limits {
                accept_timeout: accept_timeout.0,
                io_timeout: io_timeout.0,
                max_ram: max_ram.unwrap_or_else(recv::physical_ram),
            };
            recv::cli_args(listen, channels, out, uuid, page_size, json, port_file, prealloc, limits)
        }
        Some(Command::Inspect { files, json, page_size, layout }) => {
            let layout = match layout {
                LayoutArg::V7_2 => Layout::V7_2,
                LayoutArg::V9_0 => Layout::V9_0,
            };
            match inspect::inspect(&files, Options { page_size, layout, json }) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("multifd inspect: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
