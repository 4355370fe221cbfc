//! No heap allocation per packet in steady state, on either side (issue 7), uncompressed and with
//! QEMU's multifd compression (zlib and zstd on the send side, decompression of both on the
//! receive side).
//!
//! A counting global allocator wraps the system allocator in this test binary. Our sender and our
//! receiver run in this process over loopback and migrate an image in several rounds: round 0 sends
//! every page (warm-up: connections, threads, buffers, and with compression each channel's stream
//! and buffers: the send worker makes its encoder at start, the receive worker its decoder at the
//! channel's first compressed packet, the libraries their windows and tables at their first use),
//! then round 1 every page again, round 2 one page in eight, round 3 every page, and a small final
//! round. The test embedder reads the allocation counter when a round starts (its first
//! dirty-bitmap query) and when it ends (`round_done`), without allocating itself. A full round is
//! one packet per 128 pages per side (512 for the uncompressed 256 MiB image, 128 for the compressed
//! 64 MiB ones); if either side allocated per packet, rounds 1 and 3 would show that many
//! allocations and round 2 an eighth of it. The assertion: after warm-up every round allocates at
//! most a small constant, the same for a full round as for an eighth of one. Each counted migration
//! runs in a child process of its own with one test thread, so that nothing else in the process
//! (another test, the test harness) allocates while a round is counted.
//!
//! What the counting allocator sees: every allocation through Rust's global allocator, which is
//! all of our code, the std shim, the standard library, and zlib, since `flate2`'s `zlib-rs` backend
//! is pure Rust and allocates through the global allocator (its `rust-allocator` feature, which
//! flate2 enables). What it cannot see: allocations of C code that calls `malloc` directly, which
//! here is zstd (libzstd through `zstd-sys`: `ZSTD_createCCtx`/`DCtx` and the workspaces and window
//! buffers they grow on first use all come from `malloc` unless a context is made with a custom
//! allocator, `ZSTD_createCCtx_advanced(ZSTD_customMem)`, which `zstd-sys` exposes only with its
//! `experimental` feature and `zstd-safe` does not wrap; the std shim makes its contexts with
//! `CCtx::create`/`DCtx::create`). So for zstd the counting allocator proves only that the Rust side
//! of the codec (the shim's wrapper, the core) allocates nothing per packet. The C side is checked
//! another way by `zstd_c_library_mallocs_nothing_per_packet`: it reruns the zstd migration in a
//! child process with glibc's malloc tracer (`LD_PRELOAD=libc_malloc_debug.so.0`, `MALLOC_TRACE`,
//! `mtrace()`), which records every `malloc`, `calloc` and `realloc` of the process, C or Rust, and
//! counts them per steady round.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multifd_core::send::{Precopy, RoundStats, Step};
use multifd_core::wire::Compression;
use multifd_std::recv;
use multifd_std::send::{GuestImage, ImageSet, SendLimits, SendOptions, migrate_with};

/// Counts every allocation and reallocation made by any thread of this test binary.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a side effect.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // Relaxed: a statistic; the test reads it at points ordered by the migration's own sync.
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout, which the caller guarantees is valid.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // Relaxed: a statistic.
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Relaxed: a statistic.
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator (hence from `System`) with `layout`, per the caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (hence from `System`) with `layout`, per the caller.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    // Relaxed: see above.
    ALLOCS.load(Ordering::Relaxed)
}

const PAGE: usize = 4096;
const ROUNDS: usize = 5;
/// Pages per packet (4 KiB pages).
const PACKET_PAGES: usize = 128;
/// Image sizes: uncompressed, and compressed (smaller: compressing costs CPU, also under TSan).
const SIZE: usize = 256 << 20;
const COMPRESSED_SIZE: usize = 64 << 20;

// glibc's malloc tracer (in `libc_malloc_debug.so` since glibc 2.34; without it preloaded these
// are no-ops).
unsafe extern "C" {
    fn mtrace();
    fn muntrace();
}

/// Sizes of the marker allocations that split a malloc trace into rounds (see [`Trace`]).
const MARK: usize = 0x7a_5000;

/// The malloc trace of rounds 1-3, in the child of `zstd_c_library_mallocs_nothing_per_packet`:
/// tracing starts when round 1 starts; a marker allocation of `MARK + r` bytes is made when round r
/// starts (r = 1, 2, 3) and one of `MARK + 4` when round 3 ends, then tracing stops.
struct Trace;

impl Trace {
    fn start() {
        // SAFETY: mtrace only installs glibc's tracing hooks (a no-op without libc_malloc_debug).
        unsafe { mtrace() }
    }
    fn mark(r: usize) {
        // SAFETY: a plain malloc/free pair of a nonzero size; the pointer is never dereferenced.
        unsafe { libc::free(libc::malloc(MARK + r)) }
    }
    fn stop() {
        // SAFETY: as in `start`.
        unsafe { muntrace() }
    }
}

/// Rounds 0, 1 and 3 send every page, round 2 one page in eight, round 4 (the final one) one page in 64.
struct Probe {
    bitmaps: Vec<Vec<u64>>,
    started: [Option<u64>; ROUNDS],
    ended: [Option<u64>; ROUNDS],
    packets_sent: [u64; ROUNDS],
    /// Whether to write the malloc-trace markers (see [`Trace`]).
    trace: bool,
}

impl Probe {
    fn new(pages: usize, trace: bool) -> Self {
        let words = pages.div_ceil(64);
        let every = |stride: usize| -> Vec<u64> {
            let mut b = vec![0u64; words];
            for p in (0..pages).step_by(stride) {
                b[p / 64] |= 1 << (p % 64);
            }
            b
        };
        Probe {
            bitmaps: vec![every(1), every(1), every(8), every(1), every(64)],
            started: [None; ROUNDS],
            ended: [None; ROUNDS],
            packets_sent: [0; ROUNDS],
            trace,
        }
    }
}

impl Precopy for Probe {
    fn dirty(&mut self, round: u32, _block: usize) -> &[u64] {
        let r = round as usize;
        if self.started[r].is_none() {
            self.started[r] = Some(allocs());
            if self.trace && (1..=3).contains(&r) {
                if r == 1 {
                    Trace::start();
                }
                Trace::mark(r);
            }
        }
        &self.bitmaps[r]
    }

    fn round_done(&mut self, stats: &RoundStats) -> Step {
        let r = stats.round as usize;
        self.ended[r] = Some(allocs());
        if self.trace && r == 3 {
            Trace::mark(4);
            Trace::stop();
        }
        self.packets_sent[r] = stats.pages.div_ceil(PACKET_PAGES as u64);
        if r + 2 >= ROUNDS { Step::Complete } else { Step::Iterate }
    }
}

fn image(size: usize) -> Vec<u8> {
    // 40% zero pages, the rest a cheap non-zero pattern that differs per page.
    let mut v = vec![0u8; size];
    for (i, page) in v.chunks_mut(PAGE).enumerate() {
        if i % 5 < 2 {
            continue;
        }
        for (k, w) in page.chunks_mut(8).enumerate() {
            w.copy_from_slice(&((i as u64) << 20 | k as u64 | 1).to_le_bytes());
        }
    }
    v
}

/// Migrates a `size`-byte image with `compression` (level 1) from our sender to our receiver in
/// this process; checks the destination and that both sides used the method; returns the probe.
fn migrate_rounds(tag: &str, size: usize, compression: Compression, trace: bool) -> Probe {
    let dir = std::env::temp_dir().join(format!("multifd-no-alloc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port_file = dir.join("port");
    let mut images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image(size)))] };
    let ropts = recv::Options {
        listen: "127.0.0.1:0".into(),
        channels: 4,
        out: dir.join("out"),
        uuid: None,
        page_size: PAGE as u32,
        port_file: Some(port_file.clone()),
        prealloc: Vec::new(),
        progress: false,
    };
    // The receiver accepts every method by default, as `multifd recv` does.
    let rlimits = recv::Limits::default();
    let slimits = SendLimits { compression, compression_level: 1, ..SendLimits::default() };
    let mut probe = Probe::new(size / PAGE, trace);
    let (sent, received) = std::thread::scope(|s| {
        let receiver = s.spawn(|| recv::run_with(&ropts, &rlimits));
        let t0 = Instant::now();
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file).ok().and_then(|t| t.trim().parse::<u16>().ok()) {
                break p;
            }
            assert!(!receiver.is_finished() && t0.elapsed() < Duration::from_secs(10), "receiver did not start");
            std::thread::sleep(Duration::from_millis(5));
        };
        let sopts = SendOptions {
            connect: ([127, 0, 0, 1], port).into(),
            channels: 4,
            uuid: [0; 16],
            machine: "none".into(),
            page_size: PAGE as u32,
        };
        let sent = migrate_with(&sopts, &slimits, &images, &mut probe, &AtomicBool::new(false));
        (sent, receiver.join().expect("receiver thread"))
    });
    let report = sent.expect("sender failed");
    assert!(received.is_ok(), "receiver failed: {:?}", multifd_tests::recv_error(&received));
    // The destination got the image.
    let got = std::fs::read(dir.join("out").join(recv::block_file_name(b"m0"))).unwrap();
    assert!(got == images.blocks[0].1.as_bytes(), "{tag}: destination differs from the image");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(report.rounds.len(), ROUNDS, "rounds sent");
    // Both sides really ran the method (or really ran uncompressed).
    let rreport = multifd_tests::recv_report(&received);
    assert_eq!(report.compression, compression, "{tag}: the sender's method");
    assert_eq!(rreport.compression, compression.name(), "{tag}: the receiver's method");
    let sent_compressed: u64 = report.compressed.iter().map(|c| c.compressed_bytes).sum();
    if compression != Compression::None {
        assert!(sent_compressed > 0 && rreport.compressed_bytes == sent_compressed, "{tag}: compressed bytes");
    }
    probe
}

/// The allocation check of the module docs on `probe`'s rounds.
fn assert_steady(tag: &str, probe: &Probe, pages: usize) {
    let mut per_round = Vec::new();
    for r in 0..ROUNDS - 1 {
        let (a, b) = (probe.started[r].expect("round started"), probe.ended[r].expect("round ended"));
        per_round.push((r, b - a, probe.packets_sent[r]));
    }
    eprintln!("{tag}: allocations per round (round, allocations, packets per side): {per_round:?}");
    let (full, eighth) = ((pages / PACKET_PAGES) as u64, (pages / PACKET_PAGES / 8) as u64);
    assert!(per_round[1].2 >= full && per_round[2].2 >= eighth, "rounds too small to show per-packet work");
    // After warm-up: at most a small constant per round, whatever the round's size.
    for &(r, n, packets) in &per_round[1..] {
        assert!(n <= 8, "{tag}: round {r}: {n} heap allocations while sending {packets} packets per side");
    }
    let (full, eighth) = (per_round[1].1.max(per_round[3].1), per_round[2].1);
    assert!(full <= eighth + 2, "{tag}: a full round allocated {full} times, an eighth of one {eighth} times");
}

#[test]
fn steady_state_migration_of_256_mib_allocates_nothing_per_packet() {
    counted_alone(
        "steady_state_migration_of_256_mib_allocates_nothing_per_packet",
        "uncompressed",
        SIZE,
        Compression::None,
    );
}

/// zlib: every allocation of the codec is visible to the counting allocator (see the module docs).
#[test]
fn steady_state_zlib_migration_allocates_nothing_per_packet() {
    counted_alone(
        "steady_state_zlib_migration_allocates_nothing_per_packet",
        "zlib",
        COMPRESSED_SIZE,
        Compression::Zlib,
    );
}

/// zstd: the counting allocator sees the Rust side only; the C library is
/// `zstd_c_library_mallocs_nothing_per_packet`'s.
#[test]
fn steady_state_zstd_migration_allocates_nothing_per_packet() {
    counted_alone(
        "steady_state_zstd_migration_allocates_nothing_per_packet",
        "zstd",
        COMPRESSED_SIZE,
        Compression::Zstd,
    );
}

/// One counted migration, run by the test `name` in a child process of its own (see [`alone`]).
fn counted_alone(name: &str, tag: &str, size: usize, compression: Compression) {
    if in_child() {
        multifd_tests::with_deadline(180, name, || {
            let probe = migrate_rounds(tag, size, compression, false);
            assert_steady(tag, &probe, size / PAGE);
        });
    } else {
        alone(name, &[]);
    }
}

/// Set in the child processes that [`alone`] starts.
const CHILD_ENV: &str = "MULTIFD_NO_ALLOC_CHILD";

fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Reruns this binary's test `name` in a child process, alone (`--exact --test-threads=1`), with
/// `env` added, and fails if the child fails or did not run exactly that one test (its stderr is
/// passed on). Why a child: the counting allocator counts every thread of the process, and a
/// test binary has threads that are not the migration's. The test harness's own thread formats a
/// line when another test finishes and, when tests run in parallel, a "has been running for over 60
/// seconds" notice (three allocations, once seen in a steady round under ThreadSanitizer); with one
/// test thread the harness waits without a timer. The child re-checks the whole test itself, so its
/// failure message is the test's.
fn alone(name: &str, env: &[(&str, &OsStr)]) {
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("this test binary"));
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"]).env(CHILD_ENV, "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the test's child process");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprint!("{stderr}");
    assert!(out.status.success(), "{name}: the child process failed ({}):\n{stdout}", out.status);
    assert!(stdout.contains("1 passed"), "{name}: the child process did not run the test:\n{stdout}");
}

const MALLOC_DEBUG: &str = "/lib/x86_64-linux-gnu/libc_malloc_debug.so.0";

/// Allocations (`malloc`, `calloc`, `realloc`, `memalign`) in each of rounds 1, 2 and 3 of a glibc
/// malloc trace written by [`Trace`], the markers themselves not counted. `None` if a marker is
/// missing (the trace did not record the process's allocations).
fn trace_rounds(trace: &str) -> Option<[u64; 3]> {
    let marks: Vec<String> = (1..=4).map(|r| format!("{:#x}", MARK + r)).collect();
    let (mut round, mut counts) = (0usize, [0u64; 3]);
    for line in trace.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        // `@ caller + 0xADDR 0xSIZE` (malloc, calloc, memalign) and `@ caller > 0xADDR 0xSIZE` (realloc).
        let Some(at) = words.iter().position(|w| *w == "+" || *w == ">") else { continue };
        let size = words.get(at + 2).copied().unwrap_or_default();
        if let Some(k) = marks.iter().position(|m| m == size) {
            if k != round {
                return None;
            }
            round = k + 1;
            continue;
        }
        if (1..=3).contains(&round) {
            counts[round - 1] += 1;
        }
    }
    (round == 4).then_some(counts)
}

/// zstd's C library (and everything else, C or Rust) calls `malloc` nothing per packet in steady
/// state: the zstd migration reruns in a child process with glibc's malloc tracer preloaded, which
/// records every allocation of rounds 1-3 between marker allocations (see [`Trace`]). Skipped, with
/// a note, when `libc_malloc_debug.so.0` is missing or under a sanitizer (whose own allocator the
/// tracer cannot see: tier 8 builds with `RUSTFLAGS=-Zsanitizer=thread`).
#[test]
fn zstd_c_library_mallocs_nothing_per_packet() {
    if in_child() {
        // The child: one traced zstd migration.
        migrate_rounds("zstd-traced", COMPRESSED_SIZE, Compression::Zstd, true);
        return;
    }
    if std::env::var("RUSTFLAGS").is_ok_and(|f| f.contains("sanitizer")) {
        eprintln!("zstd_c_library_mallocs_nothing_per_packet: skipped under a sanitizer (RUSTFLAGS)");
        return;
    }
    if !Path::new(MALLOC_DEBUG).exists() {
        eprintln!("zstd_c_library_mallocs_nothing_per_packet: skipped: no {MALLOC_DEBUG} (glibc 2.34 or later)");
        return;
    }
    multifd_tests::with_deadline(180, "zstd_c_library_mallocs_nothing_per_packet", || {
        let dir: PathBuf = std::env::temp_dir().join(format!("multifd-mtrace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let trace_file = dir.join("trace");
        alone(
            "zstd_c_library_mallocs_nothing_per_packet",
            &[("LD_PRELOAD", OsStr::new(MALLOC_DEBUG)), ("MALLOC_TRACE", trace_file.as_os_str())],
        );
        let trace = std::fs::read_to_string(&trace_file).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        let Some(rounds) = trace_rounds(&trace) else {
            panic!(
                "the malloc trace lacks its round markers ({} lines): was {MALLOC_DEBUG} preloaded?",
                trace.lines().count()
            )
        };
        eprintln!("zstd, every malloc of the process (rounds 1, 2, 3; 128, 16, 128 packets per side): {rounds:?}");
        for (r, n) in rounds.iter().enumerate() {
            assert!(*n <= 8, "round {}: {n} mallocs (C or Rust) in a steady zstd round", r + 1);
        }
        assert!(
            rounds[0].max(rounds[2]) <= rounds[1] + 2,
            "a full round called malloc more often than an eighth: {rounds:?}"
        );
    });
}
