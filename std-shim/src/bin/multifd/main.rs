//! `multifd`: command-line front end of multifd-rs.

mod parse;

use clap::{Parser, Subcommand, ValueEnum};
use multifd_std::inspect::{self, Options};
use multifd_std::multifd_core::wire::Layout;
use multifd_std::{recv, send};
use parse::Timeout;
use std::net::ToSocketAddrs;
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
        /// Refuse channels whose init packet carries another uuid (32 hex digits, dashes allowed).
        #[arg(long, value_parser = parse::uuid)]
        uuid: Option<[u8; 16]>,
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
        #[arg(long, value_name = "NAME:SIZE", value_parser = parse::prealloc)]
        prealloc: Vec<(Vec<u8>, u64)>,
        /// Once the first connection is in, how long the main stream and every channel may take to
        /// connect (fractions allowed; 0: no limit). The error names the missing channel ids.
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse::timeout)]
        accept_timeout: Timeout,
        /// Fail as stalled when no byte arrives on any connection for this long (0: no limit).
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse::timeout)]
        io_timeout: Timeout,
        /// Refuse a block list declaring more RAM than this in total (K/M/G/T suffixes; default:
        /// this machine's physical RAM).
        #[arg(long, value_name = "BYTES", value_parser = parse::bytes)]
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
        #[arg(long, default_value = "1G", value_parser = parse::guest_size)]
        size: u64,
        /// Multifd channels (1 to 255, as QEMU allows).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=255))]
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
    /// SIGINT or SIGTERM cancels it cleanly: connections closed, exit status 130 or 143.
    Send {
        /// Destination HOST:PORT (a QEMU `-incoming` address).
        #[arg(long)]
        connect: String,
        /// Multifd channels (the destination's `multifd-channels`, 1 to 255).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=255))]
        channels: u8,
        /// RAM image `FILE[:NAME]`; NAME defaults to the file stem (`m0` for `-M none,memory-backend=m0`).
        /// Each must be a non-empty regular file of whole 4096-byte pages, each NAME used once.
        #[arg(long = "image", required = true)]
        images: Vec<String>,
        /// Machine type in the configuration section (must match the destination's).
        #[arg(long, default_value = "none")]
        machine: String,
        /// UUID written in every init packet (all zero by default): 32 hex digits, plain or as
        /// 8-4-4-4-12 groups with dashes, optionally in braces or after `urn:uuid:`; either case.
        #[arg(long, value_parser = parse::uuid)]
        uuid: Option<[u8; 16]>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// How long each connect may take (fractions allowed).
        #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse::timeout)]
        connect_timeout: Timeout,
        /// Fail as stalled when the destination takes no byte on any connection for this long
        /// (0: no limit).
        #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse::timeout)]
        io_timeout: Timeout,
        /// Most bytes per second on all channels together (K/M/G suffixes; default: no limit).
        #[arg(long, value_name = "BYTES", value_parser = parse::bytes)]
        max_bandwidth: Option<u64>,
    },
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
            eprintln!(
                "multifd {} (core {}): see `multifd --help`",
                env!("CARGO_PKG_VERSION"),
                multifd_std::multifd_core::VERSION
            );
            ExitCode::from(2)
        }
        Some(Command::Demo { size, channels, rounds, zero_percent, seed, json }) => {
            demo(multifd_std::demo::DemoOptions { size, channels, rounds, zero_percent, seed, json })
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
            let limits = send::SendLimits {
                // No limit on a connect is the operating system's own (minutes).
                connect_timeout: connect_timeout.0.unwrap_or(Duration::from_secs(u32::MAX.into())),
                io_timeout: io_timeout.0,
                max_bandwidth: max_bandwidth.filter(|&b| b > 0),
            };
            send_cli(&connect, channels, &images, machine, uuid, json, &limits)
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
            let opts = recv::Options { listen, channels, out, uuid, page_size, port_file, prealloc, progress: !json };
            recv_cli(&opts, &limits, json)
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

/// Prints `value` as one line of JSON.
fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("multifd: JSON output failed: {e}"),
    }
}

fn recv_cli(opts: &recv::Options, limits: &recv::Limits, json: bool) -> ExitCode {
    let outcome = recv::run_with(opts, limits);
    if json {
        print_json(&recv::summary(&outcome));
    }
    match &outcome {
        Ok(r) => {
            let pages: u64 = r.blocks.iter().map(|b| b.pages).sum();
            eprintln!(
                "multifd recv: completed: {} blocks, {pages} pages, {} bytes in {:.3} s, {} epochs",
                r.blocks.len(),
                r.bytes,
                r.seconds,
                r.sync_epochs
            );
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("multifd recv: failed: {}", f.error);
            ExitCode::FAILURE
        }
    }
}

fn send_cli(
    connect: &str,
    channels: u8,
    images: &[String],
    machine: String,
    uuid: Option<[u8; 16]>,
    json: bool,
    limits: &send::SendLimits,
) -> ExitCode {
    let addr = match connect.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(a)) => a,
        _ => {
            eprintln!("multifd send: --connect {connect:?} is not an address (HOST:PORT)");
            return ExitCode::from(2);
        }
    };
    let fail = |e: send::SendFailure| {
        if json {
            print_json(&send::SendJson::failed(&e, channels));
        }
        eprintln!("multifd send: {e}");
        ExitCode::from(match e {
            send::SendFailure::Signal(signal) => signal.exit_code(),
            send::SendFailure::Interrupted => 130,
            _ => 1,
        })
    };
    let blocks = match send::ImageSet::load(images) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let cancel = match send::SignalCancel::install() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let opts = send::SendOptions { connect: addr, channels, uuid: uuid.unwrap_or([0; 16]), machine, page_size: 4096 };
    let mut embedder = send::StaticPrecopy::new(&blocks, opts.page_size);
    send::announce_start();
    match send::migrate_with(&opts, limits, &blocks, &mut embedder, cancel.flag()).map_err(|e| cancel.attribute(e)) {
        Ok(report) if json => {
            print_json(&send::SendJson::completed(&report, opts.page_size));
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", send::format_report(&report, opts.page_size));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn demo(opts: multifd_std::demo::DemoOptions) -> ExitCode {
    match multifd_std::demo::run(&opts) {
        Ok(report) if opts.json => {
            print_json(&report.json());
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", report.text());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("multifd demo: {e}");
            ExitCode::FAILURE
        }
    }
}
