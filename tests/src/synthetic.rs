//! Synthetic migration streams for tests that play a QEMU source (or a broken one) by hand: built
//! with the core's wire encoders, one RAM block `m0` of 4 KiB pages.

use multifd_core::wire::{Flags, Geometry, InitPacket, Layout, RamHeader, Record};

/// Page size of every synthetic stream.
pub const PAGE: usize = 4096;

/// Appends the encoding of `r` to `out`.
pub fn emit(out: &mut Vec<u8>, r: Record<'_>) {
    let start = out.len();
    out.resize(start + r.encoded_len(), 0);
    r.encode(&mut out[start..], PAGE as u32).unwrap();
}

/// The main stream up to the end of its block list: one block `m0` of `size` bytes.
pub fn main_head(size: u64) -> Vec<u8> {
    let mut m = Vec::new();
    emit(&mut m, Record::FileHeader);
    emit(&mut m, Record::Configuration { machine: b"none" });
    emit(&mut m, Record::SectionStart { full: false, section_id: 1, name: b"ram", instance_id: 0, version_id: 4 });
    emit(&mut m, Record::MemSize { total: size });
    emit(&mut m, Record::BlockEntry { name: b"m0", used_length: size });
    m
}

/// A whole main stream for block `m0` of `size` bytes: `markers` MULTIFD_FLUSH markers (the first
/// in the setup part, each further one in its own section part, the last one ending the section),
/// then the EOF record if `eof`.
pub fn main_stream(size: u64, markers: u32, eof: bool) -> Vec<u8> {
    let mut m = main_head(size);
    for i in 0..markers {
        if i > 0 {
            emit(&mut m, Record::SectionPart { end: i + 1 == markers, section_id: 1 });
        }
        emit(&mut m, Record::MultifdFlush);
        emit(&mut m, Record::Eos);
        emit(&mut m, Record::Footer { section_id: 1 });
    }
    if eof {
        emit(&mut m, Record::Eof);
    }
    m
}

/// A channel's init packet for `id` with `uuid`.
pub fn init_with(id: u8, uuid: [u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; 64];
    InitPacket { uuid, id }.encode(&mut b).unwrap();
    b
}

/// A channel's init packet for `id` with the all-zero uuid.
pub fn init(id: u8) -> Vec<u8> {
    init_with(id, [0; 16])
}

/// The geometry of 4 KiB pages.
pub fn geo() -> Geometry {
    Geometry::new(PAGE as u32).unwrap()
}

/// Appends one RAM packet for block `m0` (9.0 layout, packet number 0): `data` as (page index, fill
/// byte) normal pages, then `zero` as zero pages; a SYNC packet if `sync`.
pub fn packet(out: &mut Vec<u8>, sync: bool, data: &[(usize, u8)], zero: &[usize]) {
    let start = out.len();
    out.resize(start + geo().header_len(), 0);
    let offs: Vec<u64> = data.iter().map(|p| p.0).chain(zero.iter().copied()).map(|p| (p * PAGE) as u64).collect();
    RamHeader {
        flags: Flags(if sync { Flags::SYNC } else { 0 }),
        pages_alloc: if offs.is_empty() { 0 } else { geo().page_count() },
        normal_pages: data.len() as u32,
        next_packet_size: (data.len() * PAGE) as u32,
        packet_num: 0,
        zero_pages: zero.len() as u32,
        block: if offs.is_empty() { b"" } else { b"m0" },
    }
    .encode(&offs, geo(), Layout::V9_0, &mut out[start..])
    .unwrap();
    for p in data {
        out.extend(std::iter::repeat_n(p.1, PAGE));
    }
}
