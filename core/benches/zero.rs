//! Zero-page check against a plain memory-read loop over the same buffer (issue 7: the check on one
//! core should reach at least 90% of the read loop's bandwidth). Results: BENCHMARKS.md.
//!
//! Run: `cargo bench -p multifd-core --bench zero`. Both functions read every byte of all-zero pages,
//! the zero check's worst case (a non-zero page usually stops at the first sampled byte). Two buffer
//! sizes: 1 GiB (a guest's RAM: larger than any cache, so main-memory bandwidth; the development
//! machine has a 480 MiB L3) and 1 MiB (the buffer stays in L2: the check's own speed).

use core::hint::black_box;
use core::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use multifd_core::send::is_zero_page;

const PAGE: usize = 4096;

/// The baseline: read every 8-byte word of the buffer once and combine them (OR), so nothing can be
/// skipped. The compiler vectorises it like the zero check.
fn read_loop(buf: &[u8]) -> u64 {
    let mut acc = 0u64;
    for w in buf.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        acc |= u64::from_ne_bytes(b);
    }
    acc
}

/// The zero check over the same buffer, page by page, as the send channel runs it.
fn zero_check(buf: &[u8]) -> usize {
    buf.chunks_exact(PAGE).filter(|p| is_zero_page(p)).count()
}

fn bandwidth(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_page");
    for size in [1usize << 30, 1 << 20] {
        // Written, not just allocated: a calloc'ed buffer that is only read maps the kernel's single
        // shared zero page everywhere and would be measured from cache.
        // (`black_box` keeps the compiler from folding the two fills into a calloc.)
        let mut buf = vec![1u8; size];
        black_box(&mut buf);
        buf.fill(0);
        assert_eq!(read_loop(&buf), 0);
        assert_eq!(zero_check(&buf), size / PAGE);
        g.throughput(Throughput::Bytes(size as u64));
        let label = if size >= 1 << 20 { format!("{}MiB", size >> 20) } else { format!("{}KiB", size >> 10) };
        g.bench_with_input(BenchmarkId::new("read_loop", &label), &buf, |b, buf| {
            b.iter(|| black_box(read_loop(black_box(buf))));
        });
        g.bench_with_input(BenchmarkId::new("is_zero_page", &label), &buf, |b, buf| {
            b.iter(|| black_box(zero_check(black_box(buf))));
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bandwidth
}
criterion_main!(benches);
