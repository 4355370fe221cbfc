//! QEMU-compatible wire format: multifd channel packets and the main migration stream.
//!
//! Everything here is pure: decoders borrow from byte slices, encoders write into caller
//! buffers, nothing allocates and nothing does I/O. Every integer on the wire is big-endian.
//!
//! - [`packet`]: the 64-byte init packet, the RAM packet header (`320 + 8 * page_count` bytes,
//!   layouts of QEMU 7.2-8.2 and 9.0+) and the device-state packet header (QEMU 10.0+).
//! - [`stream`]: a sans-I/O incremental parser and an emitter for the subset of the main
//!   stream (`QEVM`) that RAM migration needs.
//! - [`identify_channel`]: tells a main stream from a multifd channel by its first 4 bytes.
//!
//! Invariants: the length of a packet header never comes from the peer (it follows from the
//! local page size, a [`Geometry`]; no header is longer than [`MAX_HEADER_LEN`]); every count and offset read from the peer is checked with checked
//! arithmetic before use; every failure is a typed, `Copy` error that names the field and the
//! values involved. Peer input never panics.
//!
//! ```
//! use multifd_core::wire::{identify_channel, ChannelKind};
//! assert_eq!(identify_channel(*b"QEVM"), Ok(ChannelKind::Main));
//! assert_eq!(identify_channel([0x11, 0x22, 0x33, 0x44]), Ok(ChannelKind::Multifd));
//! assert!(identify_channel(*b"GET ").is_err());
//! ```

pub mod packet;
pub mod stream;

mod error;

pub use error::{DecodeError, EncodeError, Field};
pub use packet::{
    BlockInfo, BlockLookup, ChannelSet, CommonHeader, Compression, DeviceStateHeader, DeviceStatePolicy, Flags,
    Geometry, InitPacket, Layout, MAX_HEADER_LEN, MAX_PAGE_COUNT, Offsets, Packet, PacketConfig, RamHeader, RamPacket,
};
pub use stream::{Event, Record, StreamConfig, StreamError, StreamParser};

/// Magic of multifd init packets and packet headers (`11 22 33 44` on the wire).
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// The only multifd protocol version QEMU has ever used (7.2 to 10.x).
pub const MULTIFD_VERSION: u32 = 1;
/// Magic of the main migration stream, "QEVM".
pub const MAIN_MAGIC: u32 = 0x5145_564d;
/// Main stream version written and accepted (QEMU 2.x and later).
pub const MAIN_VERSION: u32 = 3;
/// Guest bytes carried by a full RAM packet; fixes `page_count` together with the page size.
pub const PACKET_DATA_SIZE: u32 = 512 * 1024;

/// Which kind of connection a migration byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ChannelKind {
    /// The main migration stream (`QEVM`).
    Main,
    /// A multifd channel (starts with an init packet).
    Multifd,
}

/// Classifies a connection from its first 4 bytes, as QEMU 8.0+ destinations do.
pub fn identify_channel(first: [u8; 4]) -> Result<ChannelKind, DecodeError> {
    match u32::from_be_bytes(first) {
        MAIN_MAGIC => Ok(ChannelKind::Main),
        MULTIFD_MAGIC => Ok(ChannelKind::Multifd),
        other => Err(DecodeError::UnknownChannelMagic { found: other }),
    }
}

/// Reads a big-endian u32 at `at`; the caller has checked the length.
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

/// Reads a big-endian u64 at `at`; the caller has checked the length.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

/// Checks that `offset` is a page-aligned page wholly inside a block of `info`, with checked
/// arithmetic. `index` is the offset's slot, for the error.
pub fn check_page(info: BlockInfo, offset: u64, index: u32) -> Result<(), DecodeError> {
    let page_size = info.page_size.page_size();
    if !offset.is_multiple_of(u64::from(page_size)) {
        return Err(DecodeError::OffsetMisaligned { index, offset, page_size });
    }
    match offset.checked_add(u64::from(page_size)) {
        Some(end) if end <= info.used_length => Ok(()),
        _ => Err(DecodeError::OffsetOutOfRange { index, offset, page_size, used_length: info.used_length }),
    }
}
