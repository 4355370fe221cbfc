//! The decompressing receive path end to end: one input becomes a zlib or zstd migration (a main
//! stream and one or two multifd connections) whose payloads come from the real compressors of the
//! std shim (`multifd_std::codec`), some of them then mutated or replaced by raw input, received by
//! the session through the harness (fuzz/common/engine_harness.rs), which decompresses with the real
//! decoders as `multifd recv`'s workers do.
//!
//! Checks: no panic; the harness's invariants (no write outside a block's used length, guard bytes
//! intact, errors naming their own channel, payloads within `max_compressed`, byte counts); every
//! failure a typed error with a message, and never a refused connection (every init packet here is
//! valid); a migration whose packets are all as the compressor made them, to a receiver that
//! accepts the method, completes with exactly the compressor's input pages in memory (zero pages
//! zero), and one to a receiver that refuses the method (or the zstd window) fails with that
//! refusal; when both schedules run, they agree on completion and on the memory.
//!
//! Input: byte 0 configures the run (bit 0: zstd, else zlib; bits 1-2: the level, zlib 1/0/6/9,
//! zstd 1/0/2/5; bit 3: two channels, else one; bit 4: also run a round-robin schedule; bits 5-7:
//! the receiver, 0-5 accepting every method with the default zstd window, 6 refusing this method,
//! 7 a 64 KiB zstd window (zstd) or only uncompressed packets (zlib)). Byte 1 sets the round-robin
//! chunk: 16 times (byte 1 + 1) bytes. Then ops: `op` (bits 0-2: the kind, below; bits 3-4: the
//! channel, modulo the channel count). Every kind but 7 is followed by `data` and `zero`, masks of
//! the channel's 8 pages (channel c owns pages c, c + n, ... of block `pc.ram`, so a page is only
//! ever written by one channel and the result does not depend on the schedule; a page in both masks
//! is data), then `plen` and `plen % 17` pattern bytes the data pages are filled from. Kinds:
//! 0-3: a packet as the compressor made it; 4: one then mutated (`mtype`, `pos` as two bytes, `val`:
//! flip a byte, truncate, append bytes, change only `next_packet_size`, or cut the stream inside the
//! payload); 5: a raw payload (`rlen`, then 4 * `rlen` bytes) instead of the compressor's; 6: a
//! header override (`fsel`, `size` as two bytes: the compression value, the SYNC bit and perhaps
//! `next_packet_size` from the input); 7: an epoch (a SYNC on every channel, a marker on the main
//! stream). After the ops, every channel not cut sends its unsent pages as zero pages (in a
//! compressed packet without a payload) and a SYNC; the main stream ends with its last marker.
#![no_main]
use libfuzzer_sys::fuzz_target;
use multifd_core::codec::{Accept, Compress, max_compressed_len};
use multifd_core::recv::RecvError;
use multifd_core::wire::stream::Record;
use multifd_core::wire::{Compression, DecodeError, Flags, Geometry, InitPacket, Layout, RamHeader};
use multifd_std::codec::{ZSTD_WINDOW_DEFAULT, ZlibEncoder, ZstdEncoder};

#[path = "../common/engine_harness.rs"]
mod engine_harness;
use engine_harness::{Fail, Op, Outcome, Setup, run};

const PAGE: usize = 4096;
/// Pages each channel owns.
const OWN: usize = 8;
const BLOCK: &[u8] = b"pc.ram";
/// The zstd window of a receiver that must refuse every zstd stream here (level 1 needs 512 KiB).
const SMALL_WINDOW: u64 = 64 << 10;

/// The rest of the input, read from the front.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }
}

fn emit(out: &mut Vec<u8>, r: Record<'_>) {
    let start = out.len();
    out.resize(start + r.encoded_len(), 0);
    r.encode(&mut out[start..], PAGE as u32).expect("encode a valid record");
}

/// One multifd connection as the generator builds it.
struct Chan {
    bytes: Vec<u8>,
    enc: Box<dyn Compress>,
    /// Cut inside a payload: nothing more is sent.
    cut: bool,
    /// Owned pages some packet listed.
    listed: [bool; OWN],
}

/// A packet to append: its header fields and its payload.
struct Pkt {
    flags: u32,
    normal: Vec<usize>,
    zero: Vec<usize>,
    next_size: u32,
    payload: Vec<u8>,
}

fn append(out: &mut Vec<u8>, p: &Pkt) {
    let geo = Geometry::new(PAGE as u32).expect("4 KiB pages");
    let offsets: Vec<u64> = p.normal.iter().chain(&p.zero).map(|&pg| (pg * PAGE) as u64).collect();
    let start = out.len();
    out.resize(start + geo.header_len(), 0);
    let header = RamHeader {
        flags: Flags(p.flags),
        pages_alloc: if offsets.is_empty() { 0 } else { geo.page_count() },
        normal_pages: p.normal.len() as u32,
        next_packet_size: p.next_size,
        packet_num: 0,
        zero_pages: p.zero.len() as u32,
        block: if offsets.is_empty() { b"" } else { BLOCK },
    };
    header.encode(&offsets, geo, Layout::V9_0, &mut out[start..]).expect("encode a packet header");
    out.extend_from_slice(&p.payload);
}

fn sync_packet() -> Pkt {
    Pkt { flags: Flags::SYNC, normal: Vec::new(), zero: Vec::new(), next_size: 0, payload: Vec::new() }
}

/// Page `pg` of a packet whose data pages are filled from `pattern`.
fn page_bytes(pattern: &[u8], pg: usize) -> Vec<u8> {
    let tag = pg as u8 + 1;
    if pattern.is_empty() {
        return vec![tag; PAGE];
    }
    (0..PAGE).map(|j| pattern[j % pattern.len()] ^ tag.wrapping_mul((j / 512) as u8 | 1)).collect()
}

/// What the receiver is told.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Receiver {
    /// Every method, the default zstd window.
    Normal,
    /// Every method but this one.
    Refuses,
    /// A zstd window no stream here fits.
    SmallWindow,
}

struct Gen {
    method: Compression,
    n: usize,
    chans: Vec<Chan>,
    main_markers: u32,
    /// The image a migration without altered packets leaves.
    image: Vec<u8>,
    /// No packet was altered (mutated, raw payload, header override).
    clean: bool,
    /// Packets carrying the method in their flags.
    flagged: u32,
    /// Packets with data pages as the compressor made them, before anything was altered.
    intact_data_packets: u32,
}

impl Gen {
    fn new(method: Compression, level: u32, n: usize) -> Self {
        let chans = (0..n)
            .map(|id| {
                let mut bytes = vec![0u8; 64];
                InitPacket { uuid: [0; 16], id: id as u8 }.encode(&mut bytes).expect("encode an init packet");
                let enc: Box<dyn Compress> = match method {
                    Compression::Zlib => Box::new(ZlibEncoder::new(level).expect("zlib level")),
                    _ => Box::new(ZstdEncoder::new(level).expect("zstd level")),
                };
                Chan { bytes, enc, cut: false, listed: [false; OWN] }
            })
            .collect();
        Gen {
            method,
            n,
            chans,
            main_markers: 0,
            image: vec![0; n * OWN * PAGE],
            clean: true,
            flagged: 0,
            intact_data_packets: 0,
        }
    }

    /// A packet of channel `c` for the pages in the masks, compressed by the channel's compressor.
    fn packet(&mut self, c: usize, data: u8, zero: u8, pattern: &[u8]) -> Pkt {
        let n = self.n;
        let owned = |mask: u8| (0..OWN).filter(move |&k| mask & (1u8 << k) != 0);
        let normal: Vec<usize> = owned(data).map(|k| c + k * n).collect();
        let zero: Vec<usize> = owned(zero & !data).map(|k| c + k * n).collect();
        let pages: Vec<Vec<u8>> = normal.iter().map(|&pg| page_bytes(pattern, pg)).collect();
        let (method, mut payload) = (self.method, Vec::new());
        if !pages.is_empty() {
            // The sender's bound: twice the pages always holds them.
            payload = vec![0u8; max_compressed_len(pages.len() * PAGE)];
            let mut it = pages.iter().map(Vec::as_slice);
            let len = self.chans[c].enc.compress(&mut it, &mut payload).unwrap_or_else(|e| {
                panic!("{method:?}: {} pages do not compress into twice their size: {e}", pages.len())
            });
            assert!(len > 0, "an empty compressed payload for {} pages", pages.len());
            payload.truncate(len);
        }
        for (&pg, bytes) in normal.iter().zip(&pages) {
            self.image[pg * PAGE..(pg + 1) * PAGE].copy_from_slice(bytes);
        }
        for &pg in &zero {
            self.image[pg * PAGE..(pg + 1) * PAGE].fill(0);
        }
        for &pg in normal.iter().chain(&zero) {
            self.chans[c].listed[pg / n] = true;
        }
        let next_size = payload.len() as u32;
        Pkt { flags: method.flag_value(), normal, zero, next_size, payload }
    }

    fn push(&mut self, c: usize, p: &Pkt) {
        if self.chans[c].cut {
            return;
        }
        if p.flags & 0x3e != 0 {
            self.flagged += 1;
        }
        if self.clean && !p.normal.is_empty() {
            self.intact_data_packets += 1;
        }
        append(&mut self.chans[c].bytes, p);
    }

    fn epoch(&mut self) {
        for c in 0..self.n {
            self.push(c, &sync_packet());
        }
        self.main_markers += 1;
    }

    /// Every channel not cut lists its unsent pages as zero pages, then ends its last epoch.
    fn finish(&mut self) -> Vec<Vec<u8>> {
        for c in 0..self.n {
            let zero: Vec<usize> = (0..OWN).filter(|&k| !self.chans[c].listed[k]).map(|k| c + k * self.n).collect();
            if !zero.is_empty() {
                let p = Pkt {
                    flags: self.method.flag_value(),
                    normal: Vec::new(),
                    zero,
                    next_size: 0,
                    payload: Vec::new(),
                };
                self.push(c, &p);
            }
        }
        self.epoch();
        let mut m = Vec::new();
        emit(&mut m, Record::FileHeader);
        emit(&mut m, Record::Configuration { machine: b"none" });
        emit(&mut m, Record::SectionStart { full: false, section_id: 1, name: b"ram", instance_id: 0, version_id: 4 });
        let size = (self.n * OWN * PAGE) as u64;
        emit(&mut m, Record::MemSize { total: size });
        emit(&mut m, Record::BlockEntry { name: BLOCK, used_length: size });
        for i in 0..self.main_markers {
            if i > 0 {
                emit(&mut m, Record::SectionPart { end: i + 1 == self.main_markers, section_id: 1 });
            }
            emit(&mut m, Record::MultifdFlush);
            emit(&mut m, Record::Eos);
            emit(&mut m, Record::Footer { section_id: 1 });
        }
        emit(&mut m, Record::Eof);
        std::iter::once(m).chain(self.chans.iter().map(|c| c.bytes.clone())).collect()
    }
}

/// Applies a mutation to `p`; returns the payload bytes to send before cutting the stream, if the
/// mutation is a cut.
fn mutate(p: &mut Pkt, inp: &mut Input<'_>) -> Option<Option<usize>> {
    let (mtype, pos, val) = (inp.byte()?, usize::from(inp.u16()?), inp.byte()?);
    let len = p.payload.len();
    match mtype % 5 {
        0 if len > 0 => p.payload[pos % len] ^= val.max(1),
        1 if len > 0 => p.payload.truncate(pos % len),
        2 => p.payload.extend(inp.take(usize::from(val % 32) + 1)),
        3 => p.next_size = p.next_size.wrapping_add(i32::from(val as i8) as u32),
        4 => return Some(Some(if len > 0 { pos % len } else { 0 })),
        _ => p.payload.clear(),
    }
    if mtype % 5 != 3 {
        p.next_size = p.payload.len() as u32;
    }
    Some(None)
}

fn schedule(streams: &[Vec<u8>], chunk: Option<usize>) -> Vec<Op<'_>> {
    let Some(chunk) = chunk else {
        return streams.iter().enumerate().map(|(stream, s)| Op::Data { stream, bytes: s, vectored: false }).collect();
    };
    let longest = streams.iter().map(Vec::len).max().unwrap_or(0);
    let mut ops = Vec::new();
    for at in (0..longest).step_by(chunk) {
        for (stream, s) in streams.iter().enumerate().filter(|(_, s)| at < s.len()) {
            ops.push(Op::Data { stream, bytes: &s[at..(at + chunk).min(s.len())], vectored: true });
        }
    }
    ops
}

fn check(out: &Outcome, g: &Gen, receiver: Receiver) {
    if let Err(e) = &out.result {
        assert!(!e.to_string().is_empty(), "an error without a message: {e:?}");
        assert!(!matches!(e, Fail::Connection { .. }), "a valid connection was refused: {e}");
    }
    match receiver {
        Receiver::Normal if g.clean => {
            assert!(out.result.is_ok(), "{:?}: unaltered packets failed: {:?}", g.method, out.result);
            assert!(out.memory[0] == g.image, "{:?}: memory differs from the compressor's input", g.method);
            assert_eq!(out.epochs, g.main_markers, "epochs released");
        }
        Receiver::Refuses if g.flagged > 0 && g.clean => {
            let refused = matches!(
                out.result,
                Err(Fail::Session(RecvError::Packet { error: DecodeError::CompressionRefused { .. }, .. }))
            );
            assert!(refused, "{:?}: a refused method was not refused: {:?}", g.method, out.result);
        }
        Receiver::SmallWindow if g.intact_data_packets > 0 && g.clean => {
            let want = if g.method == Compression::Zstd { "WindowTooLarge" } else { "CompressionRefused" };
            let got = format!("{:?}", out.result);
            assert!(got.contains(want), "{:?}: expected {want}, got {got}", g.method);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let (Some(cfg), Some(chunk)) = (inp.byte(), inp.byte()) else { return };
    let method = if cfg & 1 != 0 { Compression::Zstd } else { Compression::Zlib };
    let levels = if method == Compression::Zstd { [1, 0, 2, 5] } else { [1, 0, 6, 9] };
    let level = levels[usize::from((cfg >> 1) & 3)];
    let n = if cfg & 0x08 != 0 { 2 } else { 1 };
    let receiver = match cfg >> 5 {
        6 => Receiver::Refuses,
        7 => Receiver::SmallWindow,
        _ => Receiver::Normal,
    };
    let other = if method == Compression::Zlib { Compression::Zstd } else { Compression::Zlib };
    let (compression, zstd_window) = match receiver {
        Receiver::Normal => (Accept::ALL, ZSTD_WINDOW_DEFAULT),
        Receiver::Refuses => (Accept::empty().with(Compression::None).with(other), ZSTD_WINDOW_DEFAULT),
        Receiver::SmallWindow if method == Compression::Zstd => (Accept::ALL, SMALL_WINDOW),
        Receiver::SmallWindow => (Accept::NONE, ZSTD_WINDOW_DEFAULT),
    };

    let mut g = Gen::new(method, level, n);
    while let Some(op) = inp.byte() {
        let c = usize::from(op >> 3) % n;
        if op & 7 == 7 {
            g.epoch();
            continue;
        }
        let (Some(dmask), Some(zmask), Some(plen)) = (inp.byte(), inp.byte(), inp.byte()) else { break };
        let pattern = inp.take(usize::from(plen % 17)).to_vec();
        let mut p = g.packet(c, dmask, zmask, &pattern);
        match op & 7 {
            4 => {
                g.clean = false;
                match mutate(&mut p, &mut inp) {
                    None => break,
                    Some(None) => {}
                    Some(Some(keep)) => {
                        // The stream ends inside this packet's payload.
                        p.payload.truncate(keep);
                        g.push(c, &p);
                        g.chans[c].cut = true;
                        continue;
                    }
                }
            }
            5 => {
                g.clean = false;
                let Some(rlen) = inp.byte() else { break };
                p.payload = inp.take(4 * usize::from(rlen)).to_vec();
                p.next_size = p.payload.len() as u32;
            }
            6 => {
                g.clean = false;
                let (Some(fsel), Some(size)) = (inp.byte(), inp.u16()) else { break };
                p.flags = u32::from(fsel) & 0x3e | if fsel & 0x80 != 0 { Flags::SYNC } else { 0 };
                if fsel & 0x40 != 0 {
                    p.next_size = u32::from(size);
                }
            }
            _ => {}
        }
        g.push(c, &p);
    }
    let streams = g.finish();
    let setup = Setup {
        channels: n as u8,
        page_size: PAGE as u32,
        uuid: None,
        layout: Layout::V9_0,
        blocks: vec![(BLOCK.to_vec(), n * OWN)],
        compression,
        zstd_window,
    };
    let whole = run(&setup, &schedule(&streams, None));
    check(&whole, &g, receiver);
    if cfg & 0x10 != 0 {
        let rr = run(&setup, &schedule(&streams, Some(16 * (usize::from(chunk) + 1))));
        check(&rr, &g, receiver);
        assert_eq!(whole.result.is_ok(), rr.result.is_ok(), "schedules disagree: {:?} / {:?}", whole.result, rr.result);
        if whole.result.is_ok() {
            assert!(whole.memory == rr.memory, "a completed migration's memory depends on the schedule");
        }
    }
});
