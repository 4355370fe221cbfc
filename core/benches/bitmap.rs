//! Received-bitmap benchmarks. Results and the command that produced them: BENCHMARKS.md.
//!
//! Run: `cargo bench -p multifd-core --bench bitmap`. Warm-up and measurement times are set below
//! (1 s and 2 s per benchmark) to keep a full run short on a shared machine.

use core::hint::black_box;
use core::sync::atomic::AtomicUsize;
use core::time::Duration;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use multifd_core::bitmap::{PageIndex, ReceivedBitmap, words_for};

/// A 1 GiB block of 4 KiB pages.
const GIB_PAGES: usize = 262_144;

fn storage(pages: usize) -> Vec<AtomicUsize> {
    (0..words_for(pages)).map(|_| AtomicUsize::new(0)).collect()
}

fn single_page(c: &mut Criterion) {
    let words = storage(GIB_PAGES);
    let b = ReceivedBitmap::new(&words, GIB_PAGES).unwrap();
    let mut g = c.benchmark_group("bitmap/single_page");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("set", |bench| {
        bench.iter(|| {
            // Stride over words so successive sets do not hit one hot word only.
            i = (i + 97) % GIB_PAGES;
            b.set(black_box(PageIndex::new(i))).unwrap();
        });
    });
    g.bench_function("test", |bench| {
        bench.iter(|| {
            i = (i + 97) % GIB_PAGES;
            black_box(b.test(black_box(PageIndex::new(i))).unwrap())
        });
    });
    g.bench_function("test_and_set", |bench| {
        bench.iter(|| {
            i = (i + 97) % GIB_PAGES;
            black_box(b.test_and_set(black_box(PageIndex::new(i))).unwrap())
        });
    });
    g.finish();
}

fn run_128(c: &mut Criterion) {
    let words = storage(GIB_PAGES);
    let b = ReceivedBitmap::new(&words, GIB_PAGES).unwrap();
    let mut g = c.benchmark_group("bitmap/set_run_128");
    g.throughput(Throughput::Elements(128));
    for (name, offset) in [("word_aligned", 0usize), ("unaligned", 37)] {
        let mut base = 0usize;
        g.bench_function(name, |bench| {
            bench.iter(|| {
                base = (base + 128) % (GIB_PAGES - 256);
                b.set_run(black_box(PageIndex::new(base + offset)), 128).unwrap();
            });
        });
    }
    g.finish();
}

fn iterate(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap/iterate_1gib_262144_pages");
    g.throughput(Throughput::Elements(GIB_PAGES as u64));
    let clean_words = storage(GIB_PAGES);
    let clean = ReceivedBitmap::new(&clean_words, GIB_PAGES).unwrap();
    let alt_words = storage(GIB_PAGES);
    let alternate = ReceivedBitmap::new(&alt_words, GIB_PAGES).unwrap();
    for p in (0..GIB_PAGES).step_by(2) {
        alternate.set(PageIndex::new(p)).unwrap();
    }
    let half_words = storage(GIB_PAGES);
    let first_half = ReceivedBitmap::new(&half_words, GIB_PAGES).unwrap();
    first_half.set_run(PageIndex::new(0), GIB_PAGES / 2).unwrap();

    let cases: [(&str, &ReceivedBitmap<'_>); 3] =
        [("clean", &clean), ("half_set_alternate_pages", &alternate), ("half_set_first_half", &first_half)];
    for (name, bitmap) in cases {
        g.bench_with_input(BenchmarkId::new("clear_runs", name), bitmap, |bench, bm| {
            bench.iter(|| bm.iter_clear_runs().map(|r| r.len).sum::<usize>());
        });
    }
    g.bench_function("count/clean", |bench| bench.iter(|| black_box(&clean).count()));
    g.finish();
}

/// Two threads each set `GIB_PAGES / 2` single pages: in disjoint word ranges, or interleaved so
/// that every word is shared. Times the sets only (the threads wait on a start flag).
fn two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap/two_threads_set");
    g.throughput(Throughput::Elements(GIB_PAGES as u64));
    let words = storage(GIB_PAGES);
    let b = ReceivedBitmap::new(&words, GIB_PAGES).unwrap();
    let half = GIB_PAGES / 2;
    type Pages = fn(usize, usize) -> usize; // (thread, k) -> page
    let layouts: [(&str, Pages); 2] =
        [("disjoint_words", |t, k| t * (GIB_PAGES / 2) + k), ("interleaved_words", |t, k| 2 * k + t)];
    for (name, page_of) in layouts {
        g.bench_function(name, |bench| {
            bench.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    b.clear();
                    let start = std::sync::Barrier::new(3);
                    let elapsed = std::thread::scope(|s| {
                        for t in 0..2 {
                            let (b, start) = (&b, &start);
                            s.spawn(move || {
                                start.wait();
                                for k in 0..half {
                                    b.set(PageIndex::new(page_of(t, k))).unwrap();
                                }
                            });
                        }
                        start.wait();
                        let t0 = Instant::now();
                        // The scope joins both threads when this closure returns; time until then.
                        t0
                    });
                    total += elapsed.elapsed();
                }
                assert_eq!(b.count(), GIB_PAGES);
                total
            });
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    targets = single_page, run_128, iterate, two_threads
}
criterion_main!(benches);
