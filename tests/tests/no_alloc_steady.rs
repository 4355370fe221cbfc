//! No heap allocation per packet in steady state, on either side (issue 7).
//!
//! A counting global allocator wraps the system allocator in this test binary. Our sender and our
//! receiver run in this process over loopback and migrate a 256 MiB image in several rounds:
//! round 0 sends every page (warm-up: connections, threads, buffers), then round 1 every page again,
//! round 2 one page in eight, round 3 every page, and a small final round. The test embedder reads the
//! allocation counter when a round starts (its first dirty-bitmap query) and when it ends
//! (`round_done`), without allocating itself. A full round is 512 packets per side; if either side
//! allocated per packet, rounds 1 and 3 would show hundreds of allocations and round 2 an eighth of
//! that. The assertion: after warm-up every round allocates at most a small constant, the same for a
//! full round as for an eighth of one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multifd_core::send::{Precopy, RoundStats, Step};
use multifd_std::recv;
use multifd_std::send::{GuestImage, ImageSet, SendOptions, migrate};

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
const SIZE: usize = 256 << 20;
const PAGES: usize = SIZE / PAGE;
const ROUNDS: usize = 5;

/// Rounds 0, 1 and 3 send every page, round 2 one page in eight, round 4 (the final one) one page in 64.
struct Probe {
    bitmaps: Vec<Vec<u64>>,
    started: [Option<u64>; ROUNDS],
    ended: [Option<u64>; ROUNDS],
    packets_sent: [u64; ROUNDS],
}

impl Probe {
    fn new() -> Self {
        let words = PAGES.div_ceil(64);
        let every = |stride: usize| -> Vec<u64> {
            let mut b = vec![0u64; words];
            for p in (0..PAGES).step_by(stride) {
                b[p / 64] |= 1 << (p % 64);
            }
            b
        };
        Probe {
            bitmaps: vec![every(1), every(1), every(8), every(1), every(64)],
            started: [None; ROUNDS],
            ended: [None; ROUNDS],
            packets_sent: [0; ROUNDS],
        }
    }
}

impl Precopy for Probe {
    fn dirty(&mut self, round: u32, _block: usize) -> &[u64] {
        let r = round as usize;
        if self.started[r].is_none() {
            self.started[r] = Some(allocs());
        }
        &self.bitmaps[r]
    }

    fn round_done(&mut self, stats: &RoundStats) -> Step {
        let r = stats.round as usize;
        self.ended[r] = Some(allocs());
        self.packets_sent[r] = stats.pages.div_ceil(128);
        if r + 2 >= ROUNDS { Step::Complete } else { Step::Iterate }
    }
}

fn image() -> Vec<u8> {
    // 40% zero pages, the rest a cheap non-zero pattern that differs per page.
    let mut v = vec![0u8; SIZE];
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

#[test]
fn steady_state_migration_of_256_mib_allocates_nothing_per_packet() {
    multifd_tests::with_deadline(180, "steady_state_migration_of_256_mib_allocates_nothing_per_packet", || {
        let dir = std::env::temp_dir().join(format!("multifd-no-alloc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port_file = dir.join("port");
        let mut images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image()))] };
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
        let mut probe = Probe::new();
        let (sent, received) = std::thread::scope(|s| {
            let receiver = s.spawn(|| recv::run(&ropts));
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
            let sent = migrate(&sopts, &images, &mut probe, &AtomicBool::new(false));
            (sent, receiver.join().expect("receiver thread"))
        });
        let report = sent.expect("sender failed");
        assert!(received.is_ok(), "receiver failed: {:?}", multifd_tests::recv_error(&received));
        // The destination got the image.
        let got = std::fs::read(dir.join("out").join(recv::block_file_name(b"m0"))).unwrap();
        assert!(got == images.blocks[0].1.as_bytes(), "destination differs from the image");
        let _ = std::fs::remove_dir_all(&dir);

        assert_eq!(report.rounds.len(), ROUNDS, "rounds sent");
        let mut per_round = Vec::new();
        for r in 0..ROUNDS - 1 {
            let (a, b) = (probe.started[r].expect("round started"), probe.ended[r].expect("round ended"));
            per_round.push((r, b - a, probe.packets_sent[r]));
        }
        eprintln!("allocations per round (round, allocations, packets per side): {per_round:?}");
        assert!(per_round[1].2 >= 500 && per_round[2].2 >= 60, "rounds too small to show per-packet work");
        // After warm-up: at most a small constant per round, whatever the round's size.
        for &(r, n, packets) in &per_round[1..] {
            assert!(n <= 8, "round {r}: {n} heap allocations while sending {packets} packets per side");
        }
        let (full, eighth) = (per_round[1].1.max(per_round[3].1), per_round[2].1);
        assert!(full <= eighth + 2, "a full round allocated {full} times, an eighth of one {eighth} times");
    });
}
