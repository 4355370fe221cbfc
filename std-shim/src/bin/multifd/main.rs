//! `multifd`: command-line front end of multifd-rs.

mod parse;

use clap::{Parser, Subcommand, ValueEnum};
use multifd_std::inspect::{self, Options};
use multifd_std::multifd_core::wire::{Compression, Layout};
use multifd_std::{recv, send};
use parse::Timeout;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Move guest RAM between hosts the way QEMU's multifd does: receive a live migration from a QEMU
/// source, migrate RAM images into a QEMU destination, decode captured streams, or watch a demo.
#[derive(Debug, Parser)]
#[command(
    name = "multifd",
    version,
    after_help = "Examples:\n  \
        multifd demo --size 256M --channels 4\n  \
        multifd recv --listen 0.0.0.0:4444 --channels 4 --out /var/lib/guest\n  \
        multifd send --connect 10.0.0.2:4444 --channels 4 --image ram.img:pc.ram\n  \
        multifd inspect main.bin chan0.bin\n\n\
        Sizes take K, M, G and T suffixes, powers of 1024 (1G = 1073741824 bytes).\n\
        `multifd <command> --help` tells what each command needs from QEMU."
)]
struct Cli {
    /// More log output (-v: debug, -vv: trace). `RUST_LOG` overrides this.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors (no progress, no summary line); results as exit code and `--json`.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Accept a live migration (main stream and N multifd channels) and write each RAM block to
    /// `DIR/<idstr>.bin`. Exit code 0 only when the migration completed and every page arrived.
    #[command(after_long_help = RECV_HELP)]
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
        /// Refuse channels whose init packet carries another uuid: 32 hex digits, plain or in
        /// 8-4-4-4-12 groups with dashes, optionally in braces or after `urn:uuid:`; either case.
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
        /// Compression methods to accept, comma-separated from none, zlib, zstd (the source's
        /// multifd-compression is read from its packets; others are refused).
        #[arg(long, value_name = "LIST", default_value = "none,zlib,zstd", value_parser = parse::accept)]
        compression: multifd_std::multifd_core::codec::Accept,
        /// Largest zstd window to accept per channel (1K to 2G; rounded up to a power of two). The
        /// source's level sets its window: 512K at level 1, 8M at 19, 32M at 20.
        #[arg(long, value_name = "BYTES", default_value = "32M", value_parser = parse::zstd_window)]
        zstd_max_window: u64,
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
        /// Compress the channels' pages (level 1).
        #[arg(long, value_enum, default_value_t = CompressionArg::None)]
        compression: CompressionArg,
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
        /// Compress the pages as QEMU's multifd-compression does (the destination must be set the
        /// same way).
        #[arg(long, value_enum, default_value_t = CompressionArg::None)]
        compression: CompressionArg,
        /// Compression level: zlib 0-9, zstd 0-20 (QEMU's multifd-zlib-level / multifd-zstd-level).
        #[arg(long, default_value_t = 1)]
        compression_level: u32,
    },
}

/// What `multifd recv --help` adds after the options.
const RECV_HELP: &str = "\
What the source must use (tested live against QEMU 10.0, and with captures of QEMU 7.2):
  - the multifd capability on both sides, and multifd-channels equal to --channels;
  - plain TCP (no TLS), no mapped-ram, no postcopy-ram;
  - multifd-compression none, zlib or zstd (any level; a zstd window above --zstd-max-window
    is refused);
  - return-path off: a source that asks for a return path is refused at once, since this
    receiver does not answer on one;
  - any zero-page-detection (multifd, legacy or none); --page-size is the source's target
    page size (4096 on x86).
A source that has silently dropped multifd (it sends pages on the main stream) is refused at once.

Connections that are not part of the migration (port probes, health checks, stray clients) are
dropped with a log line and never fail it; a connection that presents itself as a channel but is
wrong (bad init packet, id out of range, duplicate, other uuid) fails it.

Block files are created under a random name with O_EXCL, mode 0600, and renamed into place only
once every page arrived; a failure, SIGINT or SIGTERM removes them (exit 130 or 143 on a signal).

Example, destination:
  multifd recv --listen 0.0.0.0:4444 --channels 4 --out /var/lib/guest --json
and on the QEMU source (monitor commands; QMP has the same with migrate-set-capabilities,
migrate-set-parameters and migrate):
  migrate_set_capability multifd on
  migrate_set_parameter multifd-channels 4
  migrate -d tcp:DEST:4444";

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompressionArg {
    /// Pages as they are.
    None,
    /// zlib (deflate with a zlib header, one stream per channel).
    Zlib,
    /// zstd (one stream per channel).
    Zstd,
}

impl CompressionArg {
    fn method(self) -> Compression {
        match self {
            CompressionArg::None => Compression::None,
            CompressionArg::Zlib => Compression::Zlib,
            CompressionArg::Zstd => Compression::Zstd,
        }
    }
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

/// Logging for `cli`: the level from `-q`/`-v`, every line prefixed with the command's name.
fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => log::LevelFilter::Warn,
        (false, 0) => log::LevelFilter::Info,
        (false, 1) => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let prefix = match &cli.command {
        Some(Command::Recv { .. }) => "multifd recv",
        Some(Command::Send { .. }) => "multifd send",
        Some(Command::Demo { .. }) => "multifd demo",
        Some(Command::Inspect { .. }) => "multifd inspect",
        None => "multifd",
    };
    multifd_std::init_logging_as(prefix, level);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let quiet = cli.quiet;
    match cli.command {
        None => {
            let _ = <Cli as clap::CommandFactory>::command().print_help();
            ExitCode::from(2)
        }
        Some(Command::Demo { size, channels, rounds, zero_percent, seed, json, compression }) => {
            let compression = compression.method();
            demo(multifd_std::demo::DemoOptions { size, channels, rounds, zero_percent, seed, json, compression })
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
            compression,
            compression_level,
        }) => {
            let limits = match send_limits(
                connect_timeout,
                io_timeout,
                max_bandwidth,
                compression.method(),
                compression_level,
            ) {
                Ok(l) => l,
                Err(code) => return code,
            };
            send_cli(&connect, channels, &images, machine, uuid, (json, quiet), &limits)
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
            compression,
            zstd_max_window,
        }) => {
            let limits = recv::Limits {
                accept_timeout: accept_timeout.0,
                io_timeout: io_timeout.0,
                max_ram: max_ram.unwrap_or_else(recv::physical_ram),
                compression,
                zstd_window: zstd_max_window,
            };
            let progress = !json && !quiet;
            let opts = recv::Options { listen, channels, out, uuid, page_size, port_file, prealloc, progress };
            recv_cli(&opts, &limits, json, quiet)
        }
        Some(Command::Inspect { files, json, page_size, layout }) => inspect_cli(&files, json, page_size, layout),
    }
}

/// The send limits from the options; a compression level outside the method's range is a usage error.
fn send_limits(
    connect_timeout: Timeout,
    io_timeout: Timeout,
    max_bandwidth: Option<u64>,
    compression: Compression,
    compression_level: u32,
) -> Result<send::SendLimits, ExitCode> {
    let levels = match compression {
        Compression::Zlib => multifd_std::codec::ZLIB_LEVELS,
        Compression::Zstd => multifd_std::codec::ZSTD_LEVELS,
        _ => 0..=u32::MAX,
    };
    if !levels.contains(&compression_level) {
        let (lo, hi) = (levels.start(), levels.end());
        eprintln!("multifd send: --compression-level {compression_level}: {} levels are {lo}-{hi}", compression.name());
        return Err(ExitCode::from(2));
    }
    Ok(send::SendLimits {
        // No limit on a connect is the operating system's own (minutes).
        connect_timeout: connect_timeout.0.unwrap_or(Duration::from_secs(u32::MAX.into())),
        io_timeout: io_timeout.0,
        max_bandwidth: max_bandwidth.filter(|&b| b > 0),
        compression,
        compression_level,
    })
}

fn inspect_cli(files: &[PathBuf], json: bool, page_size: u32, layout: LayoutArg) -> ExitCode {
    let layout = match layout {
        LayoutArg::V7_2 => Layout::V7_2,
        LayoutArg::V9_0 => Layout::V9_0,
    };
    match inspect::inspect(files, Options { page_size, layout, json }) {
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

/// Prints `value` as one line of JSON.
fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("multifd: JSON output failed: {e}"),
    }
}

fn recv_cli(opts: &recv::Options, limits: &recv::Limits, json: bool, quiet: bool) -> ExitCode {
    let control = recv::Control::new();
    if let Err(e) = control.on_signals() {
        eprintln!("multifd recv: installing the SIGINT/SIGTERM handlers: {e}");
        return ExitCode::FAILURE;
    }
    let outcome = recv::run_controlled(opts, limits, &control);
    if json {
        print_json(&recv::summary(&outcome));
    }
    match &outcome {
        Ok(r) => {
            if !quiet {
                eprintln!("multifd recv: completed: {}", recv::completed_line(r));
            }
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("multifd recv: failed: {}", f.error);
            match f.error {
                // The shell's code for death by that signal, as if the default action had run.
                recv::Failure::Interrupted { signal: Some(sig) } => ExitCode::from(128u8.saturating_add(sig as u8)),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn send_cli(
    connect: &str,
    channels: u8,
    images: &[String],
    machine: String,
    uuid: Option<[u8; 16]>,
    (json, quiet): (bool, bool),
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
    let total = {
        use multifd_std::multifd_core::send::SourceBlocks;
        (0..blocks.count()).map(|b| blocks.used_len(b)).sum()
    };
    let written = std::sync::atomic::AtomicU64::new(0);
    let run = || send::migrate_observed(&opts, limits, &blocks, &mut embedder, cancel.flag(), &written);
    match send::with_progress(!json && !quiet, total, &written, run).map_err(|e| cancel.attribute(e)) {
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
