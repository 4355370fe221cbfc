//! The whole receive engine fed arbitrary bytes: a main stream and 1-4 multifd connections, each
//! an arbitrary byte stream, arriving in arbitrary pieces and interleavings, against a small fixed
//! guest memory (two blocks in one arena with guard bytes around and between them).
//!
//! The harness (fuzz/common/engine_harness.rs) panics on a broken invariant: a write outside a
//! block's used length, a page request outside its block, a changed guard byte, an error naming the
//! wrong channel. The engine itself must never panic; every failure is a typed error. The receiver
//! accepts only uncompressed packets (`Accept::NONE`: a compression value in the flags is refused
//! at its header, as before compression existed); the decompressing path is `recv_compressed`'s.
//!
//! Input: byte 0 configures the run (bits 0-1: channels - 1; bits 2-3: page size 4K/64K/1K/4K;
//! bit 4: start each connection with a valid init packet; bit 5: start the main stream with a valid
//! header and block list; bit 6: the 7.2 header layout; bit 7: require a uuid). Then ops of two
//! bytes plus data: `sel` (bits 0-3: stream, modulo channels + 1; bit 5: length times 16; bit 6:
//! page data by vectored read; bit 7: the stream ends after the data), `len`, then `len` bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use multifd_core::codec::Accept;
use multifd_core::wire::stream::Record;
use multifd_core::wire::{InitPacket, Layout};
use multifd_std::codec::ZSTD_WINDOW_DEFAULT;

#[path = "../common/engine_harness.rs"]
mod engine_harness;
use engine_harness::{Op, Setup, run};

const UUID: [u8; 16] = [0x5a; 16];

fn emit(out: &mut Vec<u8>, r: Record<'_>, page_size: u32) {
    let start = out.len();
    out.resize(start + r.encoded_len(), 0);
    r.encode(&mut out[start..], page_size).expect("encode a valid record");
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, mut rest)) = data.split_first() else { return };
    let channels = (cfg & 3) + 1;
    let page_size = [4096u32, 65536, 1024, 4096][usize::from((cfg >> 2) & 3)];
    let setup = Setup {
        channels,
        page_size,
        uuid: (cfg & 0x80 != 0).then_some(UUID),
        layout: if cfg & 0x40 != 0 { Layout::V7_2 } else { Layout::V9_0 },
        blocks: vec![(b"pc.ram".to_vec(), 3), (b"m1".to_vec(), 1)],
        compression: Accept::NONE,
        zstd_window: ZSTD_WINDOW_DEFAULT,
    };
    // Valid prefixes make the deeper states reachable from short inputs.
    let mut inits = Vec::new();
    if cfg & 0x10 != 0 {
        for id in 0..channels {
            let mut b = vec![0u8; 64];
            InitPacket { uuid: UUID, id }.encode(&mut b).expect("encode an init packet");
            inits.push(b);
        }
    }
    let mut header = Vec::new();
    if cfg & 0x20 != 0 {
        let ps = u64::from(page_size);
        emit(&mut header, Record::FileHeader, page_size);
        emit(&mut header, Record::Configuration { machine: b"none" }, page_size);
        let start = Record::SectionStart { full: false, section_id: 1, name: b"ram", instance_id: 0, version_id: 4 };
        emit(&mut header, start, page_size);
        emit(&mut header, Record::MemSize { total: 4 * ps }, page_size);
        emit(&mut header, Record::BlockEntry { name: b"pc.ram", used_length: 3 * ps }, page_size);
        emit(&mut header, Record::BlockEntry { name: b"m1", used_length: ps }, page_size);
    }
    let mut ops: Vec<Op<'_>> = Vec::new();
    for (i, b) in inits.iter().enumerate() {
        ops.push(Op::Data { stream: i + 1, bytes: b, vectored: false });
    }
    if !header.is_empty() {
        ops.push(Op::Data { stream: 0, bytes: &header, vectored: false });
    }
    while let [sel, len, tail @ ..] = rest {
        let stream = usize::from(sel & 0x0f) % (usize::from(channels) + 1);
        let len = usize::from(*len) * if sel & 0x20 != 0 { 16 } else { 1 };
        let (bytes, after) = tail.split_at(len.min(tail.len()));
        ops.push(Op::Data { stream, bytes, vectored: sel & 0x40 != 0 });
        if sel & 0x80 != 0 {
            ops.push(Op::End { stream });
        }
        rest = after;
    }
    let out = run(&setup, &ops);
    if let Err(e) = &out.result {
        assert!(!e.to_string().is_empty());
    }
});
