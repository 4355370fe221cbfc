//! The receive session end to end: one input becomes a main stream and 1-4 multifd connections,
//! which the harness (fuzz/common/engine_harness.rs) drives through `RecvSession`, from
//! identification to the completion checks of `finish`.
//!
//! The session must never panic, and every failure is a typed error with a message; the harness
//! panics on a broken invariant (a write outside a block, a page request outside its block, a changed
//! guard byte, an error naming the wrong channel). Whether a migration completes depends only on
//! the streams' bytes, not on how they are cut and interleaved: each input runs in two schedules
//! (each stream whole, in connection order; round-robin in chunks) and both must agree. The receiver
//! accepts only uncompressed packets (`Accept::NONE`); compressed streams are `recv_compressed`'s.
//!
//! Input: byte 0 configures the run (bits 0-1: channels - 1; bit 2: each connection starts with a
//! valid init packet; bit 3: the main stream starts with a valid header and block list; bit 4: each
//! channel then carries a valid share of the pages and a SYNC packet; bit 5: the main stream ends
//! with a valid flush, EOS and EOF; bit 6: page data by vectored reads; bit 7: require a uuid).
//! Byte 1 sets the round-robin chunk: 16 times (byte 1 + 1) bytes (arbitrary piece sizes are the
//! `recv_engine` target's; here small chunks would only make each run slow). Then pieces: `sel` (the stream, modulo channels + 1;
//! bit 7: length times 16), `len`, then `len` bytes appended to that stream, between its valid start
//! and its valid end.
#![no_main]
use libfuzzer_sys::fuzz_target;
use multifd_core::codec::Accept;
use multifd_core::wire::stream::Record;
use multifd_core::wire::{Flags, Geometry, InitPacket, Layout, RamHeader};
use multifd_std::codec::ZSTD_WINDOW_DEFAULT;

#[path = "../common/engine_harness.rs"]
mod engine_harness;
use engine_harness::{Op, Setup, run};

const UUID: [u8; 16] = [0x5a; 16];
const PAGE: u32 = 4096;
/// The destination's blocks: (name, pages).
const BLOCKS: [(&[u8], usize); 2] = [(b"pc.ram", 3), (b"m1", 1)];

fn emit(out: &mut Vec<u8>, r: Record<'_>) {
    let start = out.len();
    out.resize(start + r.encoded_len(), 0);
    r.encode(&mut out[start..], PAGE).expect("encode a valid record");
}

/// A RAM packet of `block` with data pages at `pages` (filled with `fill`), or a page-less SYNC.
fn packet(out: &mut Vec<u8>, block: &[u8], pages: &[u64], fill: u8, flags: u32) {
    let geo = Geometry::new(PAGE).expect("4 KiB pages");
    let offsets: Vec<u64> = pages.iter().map(|p| p * u64::from(PAGE)).collect();
    let start = out.len();
    out.resize(start + geo.header_len(), 0);
    let header = RamHeader {
        flags: Flags(flags),
        pages_alloc: if pages.is_empty() { 0 } else { geo.page_count() },
        normal_pages: pages.len() as u32,
        next_packet_size: pages.len() as u32 * PAGE,
        packet_num: 0,
        zero_pages: 0,
        block: if pages.is_empty() { b"" } else { block },
    };
    header.encode(&offsets, geo, Layout::V9_0, &mut out[start..]).expect("encode a valid packet");
    out.extend(std::iter::repeat_n(fill, pages.len() * PAGE as usize));
}

fuzz_target!(|data: &[u8]| {
    let &[cfg, chunk, ref pieces @ ..] = data else { return };
    let mut rest = pieces;
    let channels = (cfg & 3) + 1;
    let n = usize::from(channels);
    let mut streams = vec![Vec::new(); n + 1];
    if cfg & 0x04 != 0 {
        for id in 0..channels {
            let mut b = [0u8; 64];
            InitPacket { uuid: UUID, id }.encode(&mut b).expect("encode an init packet");
            streams[usize::from(id) + 1].extend(b);
        }
    }
    if cfg & 0x08 != 0 {
        let m = &mut streams[0];
        emit(m, Record::FileHeader);
        emit(m, Record::Configuration { machine: b"none" });
        emit(m, Record::SectionStart { full: false, section_id: 1, name: b"ram", instance_id: 0, version_id: 4 });
        let total = BLOCKS.iter().map(|b| b.1 as u64 * u64::from(PAGE)).sum();
        emit(m, Record::MemSize { total });
        for (name, pages) in BLOCKS {
            emit(m, Record::BlockEntry { name, used_length: pages as u64 * u64::from(PAGE) });
        }
    }
    while let [sel, len, tail @ ..] = rest {
        let stream = usize::from(sel & 0x7f) % (n + 1);
        let len = usize::from(*len) * if sel & 0x80 != 0 { 16 } else { 1 };
        let (bytes, after) = tail.split_at(len.min(tail.len()));
        streams[stream].extend_from_slice(bytes);
        rest = after;
    }
    if cfg & 0x10 != 0 {
        // Page p of each block goes to channel p % n; every channel ends its epoch with a SYNC.
        for c in 0..n {
            for (name, pages) in BLOCKS {
                let mine: Vec<u64> = (0..pages as u64).filter(|p| *p as usize % n == c).collect();
                if !mine.is_empty() {
                    packet(&mut streams[c + 1], name, &mine, 0x40 + c as u8, 0);
                }
            }
            packet(&mut streams[c + 1], b"", &[], 0, Flags::SYNC);
        }
    }
    if cfg & 0x20 != 0 {
        let m = &mut streams[0];
        emit(m, Record::MultifdFlush);
        emit(m, Record::Eos);
        emit(m, Record::Footer { section_id: 1 });
        emit(m, Record::Eof);
    }
    let setup = Setup {
        channels,
        page_size: PAGE,
        uuid: (cfg & 0x80 != 0).then_some(UUID),
        layout: Layout::V9_0,
        blocks: BLOCKS.iter().map(|(name, pages)| (name.to_vec(), *pages)).collect(),
        compression: Accept::NONE,
        zstd_window: ZSTD_WINDOW_DEFAULT,
    };
    let vectored = cfg & 0x40 != 0;
    let whole: Vec<Op<'_>> =
        streams.iter().enumerate().map(|(stream, s)| Op::Data { stream, bytes: s, vectored }).collect();
    let chunk = 16 * (usize::from(chunk) + 1);
    let longest = streams.iter().map(Vec::len).max().unwrap_or(0);
    let mut interleaved = Vec::new();
    for at in (0..longest).step_by(chunk) {
        for (stream, s) in streams.iter().enumerate().filter(|(_, s)| at < s.len()) {
            interleaved.push(Op::Data { stream, bytes: &s[at..(at + chunk).min(s.len())], vectored });
        }
    }
    let a = run(&setup, &whole);
    let b = run(&setup, &interleaved);
    for out in [&a, &b] {
        if let Err(e) = &out.result {
            assert!(!e.to_string().is_empty(), "an error without a message: {e:?}");
        }
    }
    assert_eq!(a.result.is_ok(), b.result.is_ok(), "completion depends on the schedule: {:?} / {:?}", a.result, b.result);
    if a.result.is_ok() {
        assert_eq!(a.memory, b.memory, "a completed migration's memory depends on the schedule");
    }
});
