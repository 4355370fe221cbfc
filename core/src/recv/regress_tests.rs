//! Regression tests for QEMU multifd receive-side defects, named after their ids in
//! `qemu-multifd.md` (section 5 bugs B12..B33, the open observations O1..O4 of 5.6, and the
//! scenarios of 7.2), run against the core's receive engine: [`RecvChannel`], [`EpochBarrier`] and
//! [`MainRecv`] on a real block table, with channel workers on real threads where the scenario is
//! about concurrency.

use super::*;
use crate::bitmap::{AtomicWord, words_for};
use crate::block::{AtomicRegion, AtomicU8, BlockSpec, ZeroPage, ZeroPagePolicy};
use crate::codec::Accept;
use crate::lifecycle::{Coordinator, Wake};
use crate::sync::{AtomicU32, Ordering};
use crate::wire::stream::Event;
use crate::wire::{Flags, Geometry, InitPacket, Layout, RamHeader};
use core::time::Duration;
use std::thread;
use std::vec;
use std::vec::Vec;

const PS: usize = 1024;
const PAGES: usize = 16;

fn geo() -> Geometry {
    Geometry::new(PS as u32).unwrap()
}

/// Guest memory that counts the zero fills it is asked for (to tell "skipped" from "written").
struct Counting<'a> {
    inner: AtomicRegion<'a>,
    zero_fills: AtomicU32,
}

impl GuestMemory for Counting<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn write(&self, offset: usize, data: &[u8]) {
        self.inner.write(offset, data);
    }
    fn fill_zero(&self, offset: usize, len: usize) {
        // Relaxed: a statistic read after the writers are done.
        self.zero_fills.fetch_add(1, Ordering::Relaxed);
        self.inner.fill_zero(offset, len);
    }
    fn read(&self, offset: usize, out: &mut [u8]) {
        self.inner.read(offset, out);
    }
}

struct Fixture {
    mem: Vec<AtomicU8>,
    words: Vec<AtomicWord>,
}

impl Fixture {
    fn new(pages: usize) -> Self {
        Self {
            mem: (0..pages * PS).map(|_| AtomicU8::new(0)).collect(),
            words: (0..words_for(pages)).map(|_| AtomicWord::new(0)).collect(),
        }
    }

    fn untouched(&self) -> bool {
        // Relaxed: read after every writer is done.
        self.mem.iter().all(|b| b.load(Ordering::Relaxed) == 0)
    }
}

type Table<'a, M> = BlockTable<'a, M, 2>;

fn table<'a, M: GuestMemory>(
    memory: &'a M,
    words: &'a [AtomicWord],
    policy: ZeroPagePolicy,
    zeroed: bool,
) -> Table<'a, M> {
    let mut t = BlockTable::new(policy);
    let pages = memory.len() / PS;
    let spec = BlockSpec { name: b"m0", used_len: (pages * PS) as u64, page_size: geo(), memory_zeroed: zeroed };
    t.add(&spec, memory, words).unwrap();
    t
}

/// A RAM packet header (`layout`) with `normal` pages (their data appended, page i filled with
/// `fill + i`) and `zero` pages.
fn packet_with(layout: Layout, flags: u32, normal: &[usize], zero: &[usize], fill: u8) -> Vec<u8> {
    let mut out = vec![0u8; geo().header_len()];
    let offs: Vec<u64> = normal.iter().chain(zero).map(|&p| (p * PS) as u64).collect();
    RamHeader {
        flags: Flags(flags),
        pages_alloc: if offs.is_empty() { 0 } else { geo().page_count() },
        normal_pages: normal.len() as u32,
        next_packet_size: (normal.len() * PS) as u32,
        packet_num: 7,
        zero_pages: zero.len() as u32,
        block: if offs.is_empty() { b"" } else { b"m0" },
    }
    .encode(&offs, geo(), layout, &mut out)
    .unwrap();
    for i in 0..normal.len() {
        out.extend(core::iter::repeat_n(fill.wrapping_add(i as u8), PS));
    }
    out
}

fn packet(flags: u32, normal: &[usize], zero: &[usize], fill: u8) -> Vec<u8> {
    packet_with(Layout::V9_0, flags, normal, zero, fill)
}

fn page<M: GuestMemory>(t: &Table<'_, M>, p: usize) -> Vec<u8> {
    let mut out = vec![0u8; PS];
    t.find(b"m0").unwrap().1.read_page(PageIndex::new(p), &mut out).unwrap();
    out
}

fn bit<M: GuestMemory>(t: &Table<'_, M>, p: usize) -> bool {
    t.find(b"m0").unwrap().1.bitmap().test(PageIndex::new(p)).unwrap()
}

/// Waits by yielding; wakes are not needed because every wait polls its condition.
struct Yield;
impl Wake for Yield {
    fn wake(&self, _: ChannelId) {}
    fn idle(&self, _: ChannelId) {
        thread::yield_now();
    }
}

type Coord = Coordinator<(), RecvError, 4>;

/// Runs `f` and fails the test process if it has not returned within `secs` (a hang cannot be
/// stopped otherwise). Under Miri, whose clock is virtual, `f` just runs.
fn bounded(secs: u64, name: &str, f: impl FnOnce() + Send) {
    if cfg!(miri) {
        return f();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    thread::scope(|s| {
        let h = s.spawn(move || {
            f();
            let _ = tx.send(());
        });
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(secs)) {
            std::eprintln!("{name}: HUNG: not finished after {secs} s");
            std::process::exit(101);
        }
        if let Err(p) = h.join() {
            std::panic::resume_unwind(p);
        }
    });
}

/// Feeds `wire` to a channel until it parks or the bytes run out; returns the bytes consumed.
fn feed<M: GuestMemory>(ch: &mut RecvChannel, wire: &[u8], t: &Table<'_, M>) -> Result<usize, RecvError> {
    ch.receive_bytes(wire, t)
}

/// 7.2 "cancel while a recv thread is parked at SYNC" (B12): both channels sit at their SYNC, the
/// main stream never reaches its marker, the migration is cancelled. Expected: the parked waits end
/// and every worker returns, so cleanup completes.
#[test]
fn b12_cancel_while_recv_threads_parked_at_sync_cleanup_completes() {
    bounded(20, "b12", || {
        let f = Fixture::new(PAGES);
        let region = AtomicRegion::new(&f.mem);
        let t = table(&region, &f.words, ZeroPagePolicy::SkipUntouched, true);
        let coord = Coord::new(2).unwrap();
        let barrier = EpochBarrier::new(2);
        let ended = AtomicU32::new(0);
        let at_sync = AtomicU32::new(0);
        thread::scope(|s| {
            for c in 0..2u8 {
                let (t, coord, barrier, ended, at_sync) = (&t, &coord, &barrier, &ended, &at_sync);
                s.spawn(move || {
                    let mut ch = RecvChannel::new(ChannelId(c), PacketConfig::new(geo()));
                    let wire = packet(Flags::SYNC, &[usize::from(c)], &[], 1);
                    assert_eq!(feed(&mut ch, &wire, t), Ok(wire.len()));
                    assert!(ch.is_parked());
                    // Relaxed: a progress flag for the test thread; the park itself is what is tested.
                    at_sync.fetch_add(1, Ordering::Relaxed);
                    let r = barrier.channel_sync(coord, &Yield, ChannelId(c), ch.stats().syncs);
                    assert_eq!(r, Err(EpochError::Cancelled { epoch: 1 }), "channel {c}");
                    // Relaxed: read after the scope joined this thread.
                    ended.fetch_add(1, Ordering::Relaxed);
                });
            }
            // Relaxed: see above.
            while at_sync.load(Ordering::Relaxed) < 2 || !barrier.channel_waiting() {
                thread::yield_now();
            }
            thread::sleep(Duration::from_millis(10));
            // Cancel: terminate, as cleanup does first.
            assert!(coord.terminate(&Yield));
        });
        // Relaxed: the scope joined the workers.
        assert_eq!(ended.load(Ordering::Relaxed), 2, "every parked worker returned");
        assert_eq!(barrier.released(), 0, "nothing was released: the waits were cancelled");
    });
}

/// 7.2 "dest recv thread fails before its SYNC while main waits" (O3): channel 1 is parked at its
/// SYNC, the main stream waits at the marker, then channel 0 hits a bad packet before its SYNC. In
/// QEMU the main thread then waits forever. Expected: recording the error cancels the main stream's
/// wait and channel 1's park; the error names channel 0. (No end-of-channel is signalled: only the
/// error may end the wait.)
#[test]
fn o3_channel_fails_before_its_sync_cancels_the_main_wait() {
    bounded(20, "o3", || {
        let f = Fixture::new(PAGES);
        let region = AtomicRegion::new(&f.mem);
        let t = table(&region, &f.words, ZeroPagePolicy::SkipUntouched, true);
        let coord = Coord::new(2).unwrap();
        let barrier = EpochBarrier::new(2);
        thread::scope(|s| {
            let main = s.spawn(|| barrier.main_marker(&coord, &Yield, ChannelId(0)));
            let parked = s.spawn(|| {
                let mut ch = RecvChannel::new(ChannelId(1), PacketConfig::new(geo()));
                let wire = packet(Flags::SYNC, &[1], &[], 1);
                feed(&mut ch, &wire, &t).unwrap();
                barrier.channel_sync(&coord, &Yield, ChannelId(1), 1)
            });
            while !barrier.channel_waiting() {
                thread::yield_now();
            }
            let mut ch0 = RecvChannel::new(ChannelId(0), PacketConfig::new(geo()));
            let mut bad = packet(0, &[0], &[], 1);
            bad[0] ^= 0xff;
            let err = feed(&mut ch0, &bad, &t).unwrap_err();
            coord.record_error(&Yield, err);
            assert_eq!(main.join().unwrap(), Err(EpochError::Cancelled { epoch: 1 }), "main wait cancelled");
            assert_eq!(parked.join().unwrap(), Err(EpochError::Cancelled { epoch: 1 }), "channel 1 released");
        });
        assert!(
            matches!(
                coord.error(),
                Some(RecvError::Packet { channel: ChannelId(0), error: DecodeError::BadMagic { .. }, .. })
            ),
            "{:?}",
            coord.error()
        );
    });
}

/// 7.2 "SYNC without marker / marker without SYNC" (B17): the main stream reaches a marker but
/// channel 0's stream ended (cleanly, at a packet boundary) without its SYNC. Expected: the marker
/// fails with the counts instead of waiting forever.
#[test]
fn b17_marker_without_sync_fails_instead_of_hanging() {
    bounded(20, "b17", || {
        let f = Fixture::new(PAGES);
        let region = AtomicRegion::new(&f.mem);
        let t = table(&region, &f.words, ZeroPagePolicy::SkipUntouched, true);
        let coord = Coord::new(2).unwrap();
        let barrier = EpochBarrier::new(2);
        thread::scope(|s| {
            let parked = s.spawn(|| {
                let mut ch = RecvChannel::new(ChannelId(1), PacketConfig::new(geo()));
                feed(&mut ch, &packet(Flags::SYNC, &[1], &[], 1), &t).unwrap();
                barrier.channel_sync(&coord, &Yield, ChannelId(1), 1)
            });
            // Channel 0: pages but no SYNC, then a clean end.
            let mut ch0 = RecvChannel::new(ChannelId(0), PacketConfig::new(geo()));
            let wire = packet(0, &[0], &[], 1);
            assert_eq!(feed(&mut ch0, &wire, &t), Ok(wire.len()));
            assert_eq!(ch0.finish(), Ok(()));
            while !barrier.channel_waiting() {
                thread::yield_now();
            }
            barrier.channel_ended();
            let mut main = MainRecv::new(SyncMode::Auto);
            assert_eq!(main.on_event(&Event::MultifdFlush, &t), Ok(MainAction::Marker));
            let r = barrier.main_marker(&coord, &Yield, ChannelId(0));
            assert_eq!(r, Err(EpochError::ChannelEnded { epoch: 1, arrived: 1, needed: 2 }));
            coord.record_error(&Yield, RecvError::Epoch(r.unwrap_err()));
            assert_eq!(parked.join().unwrap(), Err(EpochError::Cancelled { epoch: 1 }));
        });
    });
}

/// The other direction (B18): a channel sent a SYNC, the main stream ends (EOF) without the marker.
/// Expected: detectable, not a silent park: the barrier reports a channel waiting, and the parked
/// channel's end is a truncation at an unreleased SYNC.
#[test]
fn b18_sync_without_marker_is_detected_at_the_end() {
    let f = Fixture::new(PAGES);
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words, ZeroPagePolicy::SkipUntouched, true);
    let barrier = EpochBarrier::new(1);
    let mut ch = RecvChannel::new(ChannelId(0), PacketConfig::new(geo()));
    feed(&mut ch, &packet(Flags::SYNC, &[], &[], 0), &t).unwrap();
    assert!(ch.is_parked());
    barrier.arrive();
    let mut main = MainRecv::new(SyncMode::Auto);
    assert_eq!(main.on_event(&Event::Eof, &t), Ok(MainAction::Eof));
    assert!(barrier.channel_waiting(), "a SYNC with no marker must be visible at the main stream's end");
    assert_eq!(ch.finish(), Err(RecvError::Truncated { channel: ChannelId(0), packet: 0, cut: Cut::Sync }));
}

/// B24: an epoch is aggregated only after all N channels arrived (and a channel parks after
/// arriving, so it cannot count twice).
#[test]
fn b24_epoch_released_only_after_all_n_channels_arrived() {
    let barrier = EpochBarrier::new(4);
    for n in 1..4 {
        barrier.arrive();
        assert_eq!(barrier.try_release(), Ok(None), "{n} of 4 arrived");
    }
    barrier.arrive();
    assert_eq!(barrier.try_release(), Ok(Some(1)));
    for _ in 0..3 {
        barrier.arrive();
    }
    assert_eq!(barrier.try_release(), Ok(None), "epoch 2 needs its own 4 arrivals");
    barrier.arrive();
    assert_eq!(barrier.try_release(), Ok(Some(2)));
}

/// 7.2 "packet with pages + SYNC (old sender)" (B23, B29): QEMU 8.2 and older could put pages and the
/// SYNC flag in one packet, then send an empty packet; QEMU 9.0/9.1 SYNC packets carry
/// `pages_alloc = page_count` and a stale block name. QEMU 9.2 parked before the pages and lost them.
/// Expected: the pages (normal and zero) are written and marked first, then the channel parks; the
/// packets after the release are accepted.
#[test]
fn b23_b29_pages_in_a_sync_packet_are_written_before_the_park() {
    for layout in [Layout::V7_2, Layout::V9_0] {
        let f = Fixture::new(PAGES);
        let region = AtomicRegion::new(&f.mem);
        let t = table(&region, &f.words, ZeroPagePolicy::SkipUntouched, true);
        let mut cfg = PacketConfig::new(geo());
        cfg.layout = layout;
        let zero: &[usize] = if layout == Layout::V9_0 { &[9] } else { &[] };
        let mut wire = packet_with(layout, Flags::SYNC, &[3, 5], zero, 0x30);
        let first = wire.len();
        // The empty packet QEMU <= 8.2 sends after it: no pages, stale next_packet_size.
        let mut empty = packet_with(layout, 0, &[], &[], 0);
        empty[12..16].copy_from_slice(&geo().page_count().to_be_bytes());
        empty[20..24].copy_from_slice(&((2 * PS) as u32).to_be_bytes());
        // A 9.0/9.1-style SYNC: pages_alloc = page_count, counts 0, a stale (unknown) block name.
        let mut stale = packet_with(layout, Flags::SYNC, &[], &[], 0);
        stale[12..16].copy_from_slice(&geo().page_count().to_be_bytes());
        stale[64..70].copy_from_slice(b"old.rb");
        wire.extend_from_slice(&empty);
        let mut ch = RecvChannel::new(ChannelId(0), cfg);
        assert_eq!(feed(&mut ch, &wire, &t), Ok(first), "{layout:?}: parks right after the SYNC packet's pages");
        assert!(matches!(ch.want(), Want::Sync));
        assert_eq!(page(&t, 3), vec![0x30; PS], "{layout:?}");
        assert_eq!(page(&t, 5), vec![0x31; PS], "{layout:?}");
        assert!(bit(&t, 3) && bit(&t, 5), "{layout:?}: pages marked before the park");
        if layout == Layout::V9_0 {
            assert!(bit(&t, 9), "zero page in the SYNC packet applied before the park");
        }
        ch.synced();
        assert_eq!(feed(&mut ch, &wire[first..], &t), Ok(empty.len()), "{layout:?}: the empty packet is accepted");
        assert_eq!(feed(&mut ch, &stale, &t), Ok(stale.len()), "{layout:?}: stale name in a page-less SYNC ignored");
        assert!(ch.is_parked());
        assert_eq!(ch.stats().syncs, 2);
    }
}

/// 7.2 "init packet id = N, id >= N, duplicate id, wrong uuid/magic/version" (O1): QEMU accepts
/// id == N and indexes past its array. Expected: every case is a typed error naming the value.
#[test]
fn o1_init_packet_id_equal_n_rejected() {
    let encode = |id: u8, uuid: [u8; 16]| {
        let mut b = [0u8; 64];
        InitPacket { uuid, id }.encode(&mut b).unwrap();
        b
    };
    let ok = |channels: u8, id: u8| InitPacket::decode(&encode(id, [0; 16])).unwrap().validate(channels, None);
    for n in [1u8, 2, 4, 8, 16, 255] {
        assert_eq!(ok(n, n - 1), Ok(()), "id N-1 of {n} is the last valid one");
        // id == N (QEMU's off-by-one); for N = 255 that is id 255, the largest a byte holds.
        assert_eq!(ok(n, n), Err(DecodeError::ChannelIdOutOfRange { id: n, channels: n }), "id == N of {n}");
        assert_eq!(ok(n, 255), Err(DecodeError::ChannelIdOutOfRange { id: 255, channels: n }), "id 255 of {n}");
    }
    assert_eq!(ok(255, 254), Ok(()));
    let mut set = crate::wire::ChannelSet::new();
    assert_eq!(set.insert(3), Ok(()));
    assert_eq!(set.insert(3), Err(DecodeError::DuplicateChannel { id: 3 }));
    let theirs = [7u8; 16];
    let p = InitPacket::decode(&encode(0, theirs)).unwrap();
    assert_eq!(p.validate(2, Some([1; 16])), Err(DecodeError::UuidMismatch { ours: [1; 16], theirs }));
    assert_eq!(p.validate(2, Some(theirs)), Ok(()));
    let mut bad = encode(0, [0; 16]);
    bad[0] = 0x12;
    assert_eq!(InitPacket::decode(&bad), Err(DecodeError::BadMagic { found: 0x1222_3344 }));
    let mut bad = encode(0, [0; 16]);
    bad[7] = 2;
    assert_eq!(InitPacket::decode(&bad), Err(DecodeError::BadVersion { found: 2 }));
    assert!(matches!(InitPacket::decode(&bad[..63]), Err(DecodeError::Truncated { need: 64, have: 63, .. })));
}

/// 7.2 "`pages_alloc` > page_count, counts overflow, offset beyond block, unaligned offset, unknown
/// block, bad compression value" (B28, O4, B36): QEMU resized its page array from `pages_alloc`
/// (B28), and at HEAD still checks neither alignment nor `next_packet_size` (O4). Expected: each is a
/// typed error naming the channel, the packet and the value; nothing is written to guest memory or
/// the bitmap, and the channel never asks for more than one header's bytes (its buffer is fixed).
#[test]
fn b28_o4_hostile_header_fields_are_typed_errors_and_write_nothing() {
    let page_count = geo().page_count();
    let set32 = |w: &mut Vec<u8>, at: usize, v: u32| w[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let set64 = |w: &mut Vec<u8>, at: usize, v: u64| w[at..at + 8].copy_from_slice(&v.to_be_bytes());
    type Case = (&'static str, Vec<u8>, DecodeError);
    let base = || packet(0, &[1, 2], &[4], 0x55);
    let mut cases: Vec<Case> = Vec::new();
    let mut w = base();
    set32(&mut w, 12, page_count + 1);
    cases.push((
        "pages_alloc > page_count",
        w,
        DecodeError::PagesAllocTooLarge { pages_alloc: page_count + 1, page_count },
    ));
    let mut w = base();
    set32(&mut w, 12, u32::MAX);
    cases.push(("pages_alloc = u32::MAX", w, DecodeError::PagesAllocTooLarge { pages_alloc: u32::MAX, page_count }));
    let mut w = base();
    set32(&mut w, 16, page_count + 1);
    cases.push((
        "normal > pages_alloc",
        w,
        DecodeError::NormalExceedsAlloc { normal: page_count + 1, pages_alloc: page_count },
    ));
    let mut w = base();
    set32(&mut w, 32, u32::MAX);
    cases.push((
        "zero = u32::MAX (normal + zero overflows u32)",
        w,
        DecodeError::ZeroExceedsAlloc { zero: u32::MAX, normal: 2, pages_alloc: page_count },
    ));
    let mut w = base();
    set32(&mut w, 32, page_count - 1);
    cases.push((
        "normal + zero > pages_alloc",
        w,
        DecodeError::ZeroExceedsAlloc { zero: page_count - 1, normal: 2, pages_alloc: page_count },
    ));
    let used = (PAGES * PS) as u64;
    let mut w = base();
    set64(&mut w, 320, used);
    cases.push((
        "offset == used_length",
        w,
        DecodeError::OffsetOutOfRange { index: 0, offset: used, page_size: PS as u32, used_length: used },
    ));
    let mut w = base();
    let near_max = u64::MAX - (PS as u64) + 1;
    set64(&mut w, 320 + 16, near_max);
    cases.push((
        "zero-page offset where offset + page overflows u64",
        w,
        DecodeError::OffsetOutOfRange { index: 2, offset: near_max, page_size: PS as u32, used_length: used },
    ));
    let mut w = base();
    set64(&mut w, 320 + 8, (2 * PS + 8) as u64);
    cases.push((
        "unaligned offset",
        w,
        DecodeError::OffsetMisaligned { index: 1, offset: (2 * PS + 8) as u64, page_size: PS as u32 },
    ));
    let mut w = base();
    w[64..66].copy_from_slice(b"pc");
    cases.push(("unknown block", w, DecodeError::UnknownBlock { name: crate::block::BlockName::new(b"pc").unwrap() }));
    let mut w = base();
    w[64..320].fill(b'x');
    cases.push(("unterminated block name", w, DecodeError::NameUnterminated { field: crate::wire::Field::BlockName }));
    // Methods no receiver here decodes are refused by every receiver; zlib and zstd by one told to
    // accept only uncompressed packets (the loop below sets `Accept::NONE` for those cases).
    for (method, value) in [("qpl", 0x8u32), ("uadk", 0x10), ("qatzip", 0x20)] {
        let mut w = base();
        set32(&mut w, 8, value);
        cases.push((method, w, DecodeError::CompressionRefused { found: value, accepted: Accept::ALL }));
    }
    for (method, value) in [("zlib, accepting none", 0x2u32), ("zstd, accepting none", 0x4)] {
        let mut w = base();
        set32(&mut w, 8, value);
        cases.push((method, w, DecodeError::CompressionRefused { found: value, accepted: Accept::NONE }));
    }
    let mut w = base();
    set32(&mut w, 8, 0x6);
    cases.push(("two compression bits", w, DecodeError::UnknownCompression { value: 0x6 }));
    let max = (4 * PS) as u64;
    for (what, size) in
        [("compressed next_packet_size 0", 0u32), ("compressed payload over twice the pages", 4 * PS as u32 + 1)]
    {
        let mut w = base();
        set32(&mut w, 8, 0x2);
        set32(&mut w, 20, size);
        cases.push((
            what,
            w,
            DecodeError::CompressedSize { next_packet_size: size, normal: 2, page_size: PS as u32, max },
        ));
    }
    let mut w = packet(0, &[], &[4], 0x55);
    set32(&mut w, 8, 0x4);
    set32(&mut w, 20, 9);
    cases.push(("compressed payload without data pages", w, DecodeError::PayloadWithoutPages { next_packet_size: 9 }));
    let mut w = base();
    set32(&mut w, 8, 0x80);
    cases.push(("unknown flag bit", w, DecodeError::UnknownFlags { flags: 0x80 }));
    let mut w = base();
    set32(&mut w, 20, (3 * PS) as u32);
    cases.push((
        "next_packet_size != normal * page size (O4)",
        w,
        DecodeError::PayloadSizeMismatch { next_packet_size: (3 * PS) as u32, normal: 2, page_size: PS as u32 },
    ));
    for (what, wire, want) in cases {
        let f = Fixture::new(PAGES);
        let region = AtomicRegion::new(&f.mem);
        let t = table(&region, &f.words, ZeroPagePolicy::AlwaysPopulate, true);
        let accept = if what.ends_with("accepting none") { Accept::NONE } else { Accept::ALL };
        let mut ch = RecvChannel::new(ChannelId(3), PacketConfig { compression: accept, ..PacketConfig::new(geo()) });
        // A good packet first, so the error names packet 1.
        let good = packet(0, &[0], &[], 0);
        assert_eq!(feed(&mut ch, &good, &t), Ok(good.len()));
        let words_before = f.words.iter().map(|w| w.load(Ordering::Relaxed)).collect::<Vec<_>>();
        let mut asked = 0;
        let mut refused = false;
        while let Want::Header(buf) = ch.want() {
            asked += buf.len();
            if asked > geo().header_len() {
                break;
            }
            let at = asked - buf.len();
            let n = buf.len();
            buf.copy_from_slice(&wire[at..at + n]);
            match ch.advance(n, &t) {
                Ok(()) => continue,
                Err(e) => {
                    assert_eq!(e, RecvError::Packet { channel: ChannelId(3), packet: 1, error: want }, "{what}");
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused, "{what}: the header was accepted");
        assert!(asked <= geo().header_len(), "{what}: asked for {asked} header bytes");
        assert!(!matches!(ch.want(), Want::Page { .. }), "{what}: no page data accepted after a bad header");
        // Relaxed: single-threaded.
        let words_after = f.words.iter().map(|w| w.load(Ordering::Relaxed)).collect::<Vec<_>>();
        assert_eq!(words_before, words_after, "{what}: bitmap changed");
        assert!(f.mem[PS..].iter().all(|b| b.load(Ordering::Relaxed) == 0), "{what}: guest memory written");
    }
}

/// 7.2 "page sent normal in round k, zero in round k+1" (B31, B33, O2): QPL, QATzip and (at QEMU HEAD)
/// UADK wrote page data without setting the bit, so a later zero page was skipped and stale bytes
/// stayed. Expected: the page ends zero whichever path carried each version: channel to channel,
/// main stream to channel, channel to main stream, and several pages of one packet (B33's
/// data-to-zero transition). This engine has one codec (none); the others are refused (see B28).
#[test]
fn b31_b33_o2_page_sent_as_data_then_zero_ends_zero() {
    let f = Fixture::new(PAGES);
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words, ZeroPagePolicy::SkipUntouched, true);
    let mut ch0 = RecvChannel::new(ChannelId(0), PacketConfig::new(geo()));
    let mut ch1 = RecvChannel::new(ChannelId(1), PacketConfig::new(geo()));
    let mut main = MainRecv::new(SyncMode::Auto);
    // Round k: pages 1..=4 as data on channel 0, page 6 as data on the main stream.
    let round_k = packet(0, &[1, 2, 3, 4], &[], 0xA0);
    assert_eq!(feed(&mut ch0, &round_k, &t), Ok(round_k.len()));
    let data = [0xEEu8; PS];
    main.on_event(&Event::PageData { block: b"m0", offset: (6 * PS) as u64, at: 0, data: &data }, &t).unwrap();
    for p in [1, 2, 3, 4, 6] {
        assert!(bit(&t, p), "page {p}: every data write sets the bit");
        assert_ne!(page(&t, p), vec![0; PS]);
    }
    // Round k+1: 1, 2, 3 and 6 are zero pages on channel 1 (one packet), 4 is a main-stream zero page.
    let round_k1 = packet(0, &[], &[1, 2, 3, 6], 0);
    assert_eq!(feed(&mut ch1, &round_k1, &t), Ok(round_k1.len()));
    main.on_event(&Event::ZeroPage { block: b"m0", offset: (4 * PS) as u64 }, &t).unwrap();
    for p in [1, 2, 3, 4, 6] {
        assert_eq!(page(&t, p), vec![0; PS], "page {p} kept stale data after a zero page");
    }
}

/// Related to B32 (postcopy is not implemented here, so B32 itself does not apply): the zero-page
/// shortcut is taken only when it is correct. A first-time zero page is written when the policy is
/// `AlwaysPopulate` (what postcopy needs: "bit set" implies "page populated"), and when the block's
/// memory is not declared zeroed (4.3's precondition: a block with prior content keeps no stale
/// bytes); it is skipped only under `SkipUntouched` on zeroed memory.
#[test]
fn b32_related_first_time_zero_page_populated_when_required() {
    for (policy, zeroed, want_written) in [
        (ZeroPagePolicy::AlwaysPopulate, true, true),
        (ZeroPagePolicy::SkipUntouched, false, true),
        (ZeroPagePolicy::SkipUntouched, true, false),
    ] {
        let f = Fixture::new(PAGES);
        if !zeroed {
            // Prior content, as a ROM image or a file-backed block would have.
            // Relaxed: single-threaded set-up.
            f.mem.iter().for_each(|b| b.store(0x5A, Ordering::Relaxed));
        }
        let mem = Counting { inner: AtomicRegion::new(&f.mem), zero_fills: AtomicU32::new(0) };
        let t = table(&mem, &f.words, policy, zeroed);
        let mut ch = RecvChannel::new(ChannelId(0), PacketConfig::new(geo()));
        let wire = packet(0, &[], &[2, 7], 0);
        assert_eq!(feed(&mut ch, &wire, &t), Ok(wire.len()));
        // Relaxed: single-threaded.
        let fills = mem.zero_fills.load(Ordering::Relaxed);
        assert_eq!(fills, if want_written { 2 } else { 0 }, "{policy:?}, zeroed {zeroed}");
        for p in [2, 7] {
            assert!(bit(&t, p));
            assert_eq!(page(&t, p), vec![0; PS], "{policy:?}, zeroed {zeroed}: page {p}");
        }
        let direct = t.find(b"m0").unwrap().1.zero_page(PageIndex::new(9)).unwrap();
        assert_eq!(direct, if want_written { ZeroPage::Written } else { ZeroPage::Skipped });
    }
}

/// 7.2 "concurrent bitmap sets from N threads on adjacent bits" (4.4): four channels on four threads
/// receive interleaved pages (page i on channel i % 4), so every bitmap word is written by all of
/// them at once. Expected: no lost bit, every page's bytes from its channel.
#[test]
fn s4_4_concurrent_bit_sets_from_n_channels_lose_nothing() {
    let (pages, rounds) = if cfg!(miri) { (32, 1) } else { (64, 30) };
    for _ in 0..rounds {
        let f = Fixture::new(pages);
        let region = AtomicRegion::new(&f.mem);
        let t = table(&region, &f.words, ZeroPagePolicy::SkipUntouched, true);
        thread::scope(|s| {
            for c in 0..4usize {
                let t = &t;
                s.spawn(move || {
                    let mine: Vec<usize> = (0..pages).filter(|p| p % 4 == c).collect();
                    // Half as data, half as zero pages: both set bits.
                    let (data, zero) = mine.split_at(mine.len() / 2);
                    let wire = packet(0, data, zero, 0x10 * (c as u8 + 1));
                    let mut ch = RecvChannel::new(ChannelId(c as u8), PacketConfig::new(geo()));
                    assert_eq!(feed(&mut ch, &wire, t), Ok(wire.len()));
                });
            }
        });
        let block = t.find(b"m0").unwrap().1;
        assert_eq!(block.bitmap().count(), pages, "bits lost");
        for p in 0..pages {
            assert!(bit(&t, p), "page {p}");
        }
        assert!(!f.untouched(), "data pages were written");
    }
}
