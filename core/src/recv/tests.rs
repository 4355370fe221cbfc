use super::*;
use crate::bitmap::{AtomicWord, words_for};
use crate::block::{AtomicRegion, AtomicU8, BlockSpec, ZeroPagePolicy};
use crate::lifecycle::{Coordinator, Wake};
use crate::wire::stream::Event;
use crate::wire::{Flags, Geometry, Layout, RamHeader};
use std::vec;
use std::vec::Vec;

const PS: usize = 1024;
const PAGES: usize = 8;

fn geo() -> Geometry {
    Geometry::new(PS as u32).unwrap()
}

struct Fixture {
    mem: Vec<AtomicU8>,
    words: Vec<AtomicWord>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            mem: (0..PAGES * PS).map(|_| AtomicU8::new(0)).collect(),
            words: (0..words_for(PAGES)).map(|_| AtomicWord::new(0)).collect(),
        }
    }
}

fn table<'a>(region: &'a AtomicRegion<'a>, words: &'a [AtomicWord]) -> BlockTable<'a, AtomicRegion<'a>, 2> {
    let mut t = BlockTable::new(ZeroPagePolicy::SkipUntouched);
    let spec = BlockSpec { name: b"m0", used_len: (PAGES * PS) as u64, page_size: geo(), memory_zeroed: true };
    t.add(&spec, region, words).unwrap();
    t
}

fn packet(flags: u32, normal: &[u64], zero: &[u64], fill: u8) -> Vec<u8> {
    let mut out = vec![0u8; geo().header_len()];
    let offs: Vec<u64> = normal.iter().chain(zero).copied().collect();
    RamHeader {
        flags: Flags(flags),
        pages_alloc: if offs.is_empty() { 0 } else { geo().page_count() },
        normal_pages: normal.len() as u32,
        next_packet_size: (normal.len() * PS) as u32,
        packet_num: 0,
        zero_pages: zero.len() as u32,
        block: if offs.is_empty() { b"" } else { b"m0" },
    }
    .encode(&offs, geo(), Layout::V9_0, &mut out)
    .unwrap();
    for (i, _) in normal.iter().enumerate() {
        out.extend(core::iter::repeat_n(fill.wrapping_add(i as u8), PS));
    }
    out
}

fn page_bytes(t: &BlockTable<'_, AtomicRegion<'_>, 2>, page: usize) -> Vec<u8> {
    let mut out = vec![0u8; PS];
    t.find(b"m0").unwrap().1.read_page(PageIndex::new(page), &mut out).unwrap();
    out
}

#[test]
fn pages_land_one_byte_at_a_time_and_sync_parks_after_them() {
    let f = Fixture::new();
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words);
    let mut wire = packet(0, &[(5 * PS) as u64, PS as u64], &[(2 * PS) as u64], 0x40);
    wire.extend(packet(Flags::SYNC, &[(3 * PS) as u64], &[], 0x70));
    let mut ch = RecvChannel::new(ChannelId(1), PacketConfig::new(geo()));
    // Feed in small pieces: a header and a page may span any number of reads.
    let step = if cfg!(miri) { 97 } else { 1 };
    let mut used = 0;
    while used < wire.len() {
        let end = (used + step).min(wire.len());
        used += ch.receive_bytes(&wire[used..end], &t).unwrap();
        if ch.is_parked() {
            break;
        }
    }
    assert_eq!(used, wire.len(), "parks only after the SYNC packet's pages");
    assert!(matches!(ch.want(), Want::Sync));
    let bm = t.find(b"m0").unwrap().1.bitmap();
    let set: Vec<usize> = (0..PAGES).filter(|&p| bm.test(PageIndex::new(p)).unwrap()).collect();
    assert_eq!(set, [1, 2, 3, 5]);
    assert_eq!(page_bytes(&t, 5), vec![0x40; PS]);
    assert_eq!(page_bytes(&t, 1), vec![0x41; PS]);
    assert_eq!(page_bytes(&t, 3), vec![0x70; PS]);
    assert_eq!(page_bytes(&t, 2), vec![0; PS]);
    let s = ch.stats();
    assert_eq!((s.packets, s.normal_pages, s.zero_pages, s.syncs, s.bytes), (2, 3, 1, 1, wire.len() as u64));
    assert!(ch.finish().is_err(), "parked at SYNC is not a clean end");
    ch.synced();
    assert_eq!(ch.finish(), Ok(()));
}

#[test]
fn zero_page_over_a_received_page_is_written() {
    let f = Fixture::new();
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words);
    let mut ch = RecvChannel::new(ChannelId(0), PacketConfig::new(geo()));
    let mut wire = packet(0, &[(4 * PS) as u64], &[], 9);
    wire.extend(packet(0, &[], &[(4 * PS) as u64], 0));
    assert_eq!(ch.receive_bytes(&wire, &t).unwrap(), wire.len());
    assert_eq!(page_bytes(&t, 4), vec![0; PS]);
}

#[test]
fn hostile_offsets_and_blocks_are_typed_errors_and_write_nothing() {
    let f = Fixture::new();
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words);
    let cases: [(Vec<u8>, &str); 3] = [
        (packet(0, &[(PAGES * PS) as u64], &[], 1), "outside"),
        (packet(0, &[(PS + 1) as u64], &[], 1), "multiple"),
        (packet(0, &[], &[u64::MAX - 3], 1), "outside"),
    ];
    for (wire, _why) in cases {
        let mut ch = RecvChannel::new(ChannelId(2), PacketConfig::new(geo()));
        let err = ch.receive_bytes(&wire, &t).unwrap_err();
        assert!(matches!(err, RecvError::Packet { channel: ChannelId(2), packet: 0, .. }), "{err:?}");
    }
    let mut wire = packet(0, &[0], &[], 1);
    wire[64..66].copy_from_slice(b"zz");
    let mut ch = RecvChannel::new(ChannelId(0), PacketConfig::new(geo()));
    let err = ch.receive_bytes(&wire, &t).unwrap_err();
    assert!(matches!(err, RecvError::Packet { error: DecodeError::UnknownBlock { .. }, .. }), "{err:?}");
    assert_eq!(t.find(b"m0").unwrap().1.bitmap().count(), 0);
    assert!(f.mem.iter().all(|b| b.load(crate::sync::Ordering::Relaxed) == 0));
}

#[test]
fn eof_inside_a_packet_is_truncation() {
    let f = Fixture::new();
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words);
    let wire = packet(0, &[0, PS as u64], &[], 1);
    for (cut, want) in [
        (5, Cut::Header { have: 5, need: 12 }),
        (100, Cut::Header { have: 100, need: geo().header_len() as u32 }),
        (geo().header_len() + PS + 3, Cut::Page { index: 1, normal: 2 }),
    ] {
        let mut ch = RecvChannel::new(ChannelId(3), PacketConfig::new(geo()));
        ch.receive_bytes(&wire[..cut], &t).unwrap();
        match ch.finish() {
            Err(RecvError::Truncated { channel: ChannelId(3), cut: got, .. }) => assert_eq!(got, want),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[test]
fn overrun_is_refused() {
    let f = Fixture::new();
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words);
    let mut ch = RecvChannel::new(ChannelId(0), PacketConfig::new(geo()));
    assert_eq!(ch.advance(13, &t), Err(RecvError::Overrun { channel: ChannelId(0), got: 13, wanted: 12 }));
}

#[test]
fn main_stream_modes_and_pages() {
    let f = Fixture::new();
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words);
    let mut m = MainRecv::new(SyncMode::Auto);
    assert_eq!(m.on_event(&Event::MultifdFlush, &t), Ok(MainAction::Marker));
    assert_eq!(m.on_event(&Event::Eos, &t), Ok(MainAction::Continue), "flush mode: EOS is no marker");
    let mut old = MainRecv::new(SyncMode::Auto);
    assert_eq!(old.on_event(&Event::Eos, &t), Ok(MainAction::Marker));
    assert_eq!(old.mode(), SyncMode::Eos);
    let data = [5u8; PS / 2];
    for at in [0, PS / 2] {
        m.on_event(&Event::PageData { block: b"m0", offset: PS as u64, at: at as u32, data: &data }, &t).unwrap();
    }
    assert_eq!(page_bytes(&t, 1), vec![5; PS]);
    assert_eq!(m.on_event(&Event::ZeroPage { block: b"m0", offset: PS as u64 }, &t), Ok(MainAction::Continue));
    assert_eq!(page_bytes(&t, 1), vec![0; PS], "zero page over a received page is written");
    let bad = m.on_event(&Event::ZeroPage { block: b"m0", offset: (PAGES * PS) as u64 }, &t);
    assert!(matches!(bad, Err(RecvError::MainBlock { offset, .. }) if offset == (PAGES * PS) as u64));
    assert!(matches!(
        m.on_event(&Event::ZeroPage { block: b"m9", offset: 0 }, &t),
        Err(RecvError::MainUnknownBlock { .. })
    ));
    assert_eq!(m.on_event(&Event::Eof, &t), Ok(MainAction::Eof));
    assert_eq!(m.stats().markers, 1);
}

struct Spin;
impl Wake for Spin {
    fn wake(&self, _: ChannelId) {}
}

#[test]
fn marker_after_a_channel_ended_fails_instead_of_hanging() {
    let coord: Coordinator<(), (), 2> = Coordinator::new(2).unwrap();
    let b = EpochBarrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(b.channel_sync(&coord, &Spin, ChannelId(0), 1), Err(EpochError::Cancelled { epoch: 1 })));
        // Channel 1 ends without its SYNC; epoch 1 first needs channel 0's arrival to be seen.
        while !b.channel_waiting() {
            std::thread::yield_now();
        }
        b.channel_ended();
        assert_eq!(
            b.main_marker(&coord, &Spin, ChannelId(0)),
            Err(EpochError::ChannelEnded { epoch: 1, arrived: 1, needed: 2 })
        );
        coord.terminate(&Spin);
    });
}

#[test]
fn pending_pages_list_the_rest_of_the_packet_for_one_vectored_read() {
    let f = Fixture::new();
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words);
    let wire = packet(0, &[(6 * PS) as u64, 0, (3 * PS) as u64], &[], 0x10);
    let hdr = geo().header_len();
    let mut ch = RecvChannel::new(ChannelId(0), PacketConfig::new(geo()));
    // The header and 100 bytes of the first page, then the rest in one "vectored read".
    assert_eq!(ch.receive_bytes(&wire[..hdr + 100], &t).unwrap(), hdr + 100);
    let mut ranges = [PageRange::EMPTY; 8];
    let n = ch.pending_pages(&t, &mut ranges);
    let got: Vec<(usize, usize)> = ranges[..n].iter().map(|r| (r.offset, r.len)).collect();
    assert_eq!(got, [(6 * PS + 100, PS - 100), (0, PS), (3 * PS, PS)]);
    let block = t.find(b"m0").unwrap().1;
    let mut rest = &wire[hdr + 100..];
    for r in &ranges[..n] {
        block.memory().write(r.offset, &rest[..r.len]);
        rest = &rest[r.len..];
    }
    ch.advance_many(wire.len() - hdr - 100, &t).unwrap();
    assert_eq!(ch.pending_pages(&t, &mut ranges), 0);
    assert_eq!((page_bytes(&t, 6)[0], page_bytes(&t, 0)[0], page_bytes(&t, 3)[0]), (0x10, 0x11, 0x12));
    assert_eq!(block.bitmap().count(), 3);
    assert_eq!(ch.finish(), Ok(()), "at a packet boundary");
}

/// The error sizes `BlockName`'s docs promise (a full name inline): seen if they grow.
#[test]
fn error_sizes_are_pinned() {
    use core::mem::size_of;
    assert_eq!(size_of::<crate::block::BlockName>(), 256);
    assert!(size_of::<DecodeError>() <= 264, "{}", size_of::<DecodeError>());
    assert!(size_of::<RecvError>() <= 304, "{}", size_of::<RecvError>());
}

/// A stand-in codec for the channel's compressed path: the "compressed" form of a page is its bytes
/// XOR 0x5a, so the test controls exactly what decompresses to what.
struct Xor(Compression);

impl Decompress for Xor {
    fn method(&self) -> Compression {
        self.0
    }
    fn decompress(
        &mut self,
        input: &mut &[u8],
        out: &mut [u8],
        produced: u64,
        expected: u64,
    ) -> Result<(), CodecError> {
        if input.len() < out.len() {
            return Err(CodecError::Short { produced: produced + input.len() as u64, expected });
        }
        for (o, i) in out.iter_mut().zip(input.iter()) {
            *o = i ^ 0x5a;
        }
        *input = &input[out.len()..];
        Ok(())
    }
    fn end_packet(&mut self, _input: &mut &[u8], _expected: u64) -> Result<(), CodecError> {
        Ok(())
    }
}

/// A compressed packet of `pages` (page index, fill byte) with method value `method`; the payload
/// is `extra` bytes longer than the pages (or shorter, if negative).
fn compressed(method: u32, pages: &[(usize, u8)], extra: isize, sync: bool) -> (Vec<u8>, Vec<u8>) {
    let offs: Vec<u64> = pages.iter().map(|&(p, _)| (p * PS) as u64).collect();
    let mut payload: Vec<u8> = pages.iter().flat_map(|&(_, fill)| core::iter::repeat_n(fill ^ 0x5a, PS)).collect();
    payload.resize((payload.len() as isize + extra) as usize, 0x5a);
    let mut header = vec![0u8; geo().header_len()];
    RamHeader {
        flags: Flags(method | if sync { Flags::SYNC } else { 0 }),
        pages_alloc: geo().page_count(),
        normal_pages: pages.len() as u32,
        next_packet_size: payload.len() as u32,
        packet_num: 0,
        zero_pages: 0,
        block: b"m0",
    }
    .encode(&offs, geo(), Layout::V9_0, &mut header)
    .unwrap();
    (header, payload)
}

/// Feeds a header byte by byte, then hands the payload to `decompress` as `Want::Compressed` asks.
fn feed_compressed(
    ch: &mut RecvChannel,
    (header, payload): &(Vec<u8>, Vec<u8>),
    codec: &mut Xor,
    t: &BlockTable<'_, AtomicRegion<'_>, 2>,
) -> Result<(), RecvError> {
    assert_eq!(ch.receive_bytes(header, t)?, header.len());
    match ch.want() {
        Want::Compressed { len, method } => {
            assert_eq!((len, method), (payload.len(), codec.0), "the whole payload is asked for at once");
            assert!(len <= ch.max_compressed());
            // Every page the payload fills is listed up front (to populate fresh memory).
            let mut ranges = [PageRange::EMPTY; 8];
            let n = ch.pending_pages(t, &mut ranges);
            let hdr = Packet::decode(header, &PacketConfig::new(geo())).unwrap();
            let Packet::Ram(ram) = hdr else { panic!("a RAM packet") };
            let want: Vec<usize> = ram.normal_offsets().map(|o| o as usize).collect();
            assert_eq!(ranges[..n].iter().map(|r| r.offset).collect::<Vec<_>>(), want);
            assert!(ranges[..n].iter().all(|r| r.len == PS));
        }
        other => panic!("wanted {other:?}"),
    }
    let mut scratch = vec![0u8; PS];
    ch.decompress(payload, codec, &mut scratch, t)
}

#[test]
fn a_compressed_packet_is_decompressed_page_by_page_into_its_offsets() {
    let f = Fixture::new();
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words);
    let mut ch = RecvChannel::new(ChannelId(2), PacketConfig::new(geo()));
    let mut codec = Xor(Compression::Zlib);
    feed_compressed(&mut ch, &compressed(0x2, &[(6, 0x11), (1, 0x22)], 0, false), &mut codec, &t).unwrap();
    feed_compressed(&mut ch, &compressed(0x2, &[(3, 0x33)], 0, true), &mut codec, &t).unwrap();
    assert!(ch.is_parked(), "a SYNC packet parks after its compressed pages");
    assert_eq!(
        (page_bytes(&t, 6), page_bytes(&t, 1), page_bytes(&t, 3)),
        (vec![0x11; PS], vec![0x22; PS], vec![0x33; PS])
    );
    let bm = t.find(b"m0").unwrap().1.bitmap();
    assert_eq!((0..PAGES).filter(|&p| bm.test(PageIndex::new(p)).unwrap()).collect::<Vec<_>>(), [1, 3, 6]);
    let s = ch.stats();
    assert_eq!(
        (s.compressed_pages, s.compressed_bytes, s.normal_pages, s.method),
        (3, 3 * PS as u64, 3, Some(Compression::Zlib))
    );
    ch.synced();
    ch.finish().unwrap();
}

#[test]
fn wrong_lengths_a_changed_method_and_no_codec_are_typed_errors() {
    let f = Fixture::new();
    let region = AtomicRegion::new(&f.mem);
    let t = table(&region, &f.words);
    let fresh = || RecvChannel::new(ChannelId(4), PacketConfig::new(geo()));
    let mut zlib = Xor(Compression::Zlib);
    // One byte short of the second page.
    let e = feed_compressed(&mut fresh(), &compressed(0x2, &[(1, 1), (2, 2)], -1, false), &mut zlib, &t).unwrap_err();
    let short = CodecError::Short { produced: (2 * PS - 1) as u64, expected: (2 * PS) as u64 };
    assert_eq!(e, RecvError::Codec { channel: ChannelId(4), packet: 0, method: Compression::Zlib, error: short });
    // Bytes left after the pages.
    let e = feed_compressed(&mut fresh(), &compressed(0x2, &[(1, 1)], 5, false), &mut zlib, &t).unwrap_err();
    let trailing = CodecError::Trailing { left: 5 };
    assert_eq!(e, RecvError::Codec { channel: ChannelId(4), packet: 0, method: Compression::Zlib, error: trailing });
    // zlib, then zstd on the same channel.
    let mut ch = fresh();
    feed_compressed(&mut ch, &compressed(0x2, &[(1, 1)], 0, false), &mut zlib, &t).unwrap();
    let (header, _) = compressed(0x4, &[(2, 2)], 0, false);
    let e = ch.receive_bytes(&header, &t).unwrap_err();
    let changed =
        RecvError::MethodChanged { channel: ChannelId(4), packet: 1, was: Compression::Zlib, now: Compression::Zstd };
    assert_eq!(e, changed);
    // A decoder for another method, and the copying convenience path, which has none.
    let mut ch = fresh();
    let (header, payload) = compressed(0x4, &[(2, 2)], 0, false);
    ch.receive_bytes(&header, &t).unwrap();
    let e = ch.decompress(&payload, &mut zlib, &mut vec![0u8; PS], &t).unwrap_err();
    assert_eq!(e, RecvError::NoDecompressor { channel: ChannelId(4), packet: 0, method: Compression::Zstd });
    let mut ch = fresh();
    let mut wire = header.clone();
    wire.extend(&payload);
    let e = ch.receive_bytes(&wire, &t).unwrap_err();
    assert_eq!(e, RecvError::NoDecompressor { channel: ChannelId(4), packet: 0, method: Compression::Zstd });
    // A stream that ends before the payload: the cut names it.
    assert_eq!(
        ch.finish(),
        Err(RecvError::Truncated {
            channel: ChannelId(4),
            packet: 0,
            cut: Cut::Compressed { len: PS as u32, normal: 1 }
        })
    );
    // A scratch buffer smaller than a page.
    let mut ch = fresh();
    ch.receive_bytes(&header, &t).unwrap();
    let e = ch.decompress(&payload, &mut Xor(Compression::Zstd), &mut [0u8; 16], &t).unwrap_err();
    assert!(matches!(e, RecvError::Codec { error: CodecError::Library { .. }, .. }), "{e:?}");
}
