//! Error types of the multifd packet codecs.

use core::fmt;

use crate::block::BlockName;
use crate::codec::Accept;
use crate::wire::Compression;

/// A header field, for [`DecodeError::Truncated`] and [`EncodeError`] messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Field {
    /// The 64-byte init packet.
    InitPacket,
    /// The 12 bytes common to every packet header (magic, version, flags).
    CommonHeader,
    /// The whole RAM packet header (fixed part and offset array).
    RamHeader,
    /// The 276-byte device-state packet header.
    DeviceStateHeader,
    /// The block name of a RAM packet.
    BlockName,
    /// The offset array of a RAM packet.
    Offsets,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::InitPacket => "init packet",
            Field::CommonHeader => "packet header (magic, version, flags)",
            Field::RamHeader => "RAM packet header",
            Field::DeviceStateHeader => "device-state packet header",
            Field::BlockName => "block name",
            Field::Offsets => "offset array",
        })
    }
}

/// Why a multifd init packet or packet header was refused.
// `UnknownBlock` carries the whole name; see `BlockName`'s docs on why that size is accepted.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than `field` needs.
    Truncated {
        /// What was being decoded.
        field: Field,
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The first 4 bytes of a connection are neither `QEVM` nor the multifd magic.
    UnknownChannelMagic {
        /// The 4 bytes, big-endian.
        found: u32,
    },
    /// `magic` is not `0x11223344`.
    BadMagic {
        /// Value received.
        found: u32,
    },
    /// `version` is not 1.
    BadVersion {
        /// Value received.
        found: u32,
    },
    /// The init packet's uuid differs from the one this receiver was configured with.
    UuidMismatch {
        /// Our uuid.
        ours: [u8; 16],
        /// The peer's uuid.
        theirs: [u8; 16],
    },
    /// Channel `id` is not below the configured channel count.
    ChannelIdOutOfRange {
        /// Id received.
        id: u8,
        /// Configured number of channels.
        channels: u8,
    },
    /// A second channel announced an id already taken.
    DuplicateChannel {
        /// The id announced twice.
        id: u8,
    },
    /// `flags` has bits no QEMU version defines.
    UnknownFlags {
        /// Value received.
        flags: u32,
    },
    /// The compression value in `flags` names a method the receiver does not accept.
    CompressionRefused {
        /// Compression value received (`flags & 0x3e`).
        found: u32,
        /// What the receiver accepts.
        accepted: Accept,
    },
    /// The compression value in `flags` is not one any QEMU version defines.
    UnknownCompression {
        /// The value (`flags & 0x3e`).
        value: u32,
    },
    /// A compressed packet's `next_packet_size` is 0 for a packet with data pages, or larger than
    /// [`max_compressed_len`](crate::codec::max_compressed_len) of its pages.
    CompressedSize {
        /// Value received.
        next_packet_size: u32,
        /// `normal_pages`.
        normal: u32,
        /// Page size.
        page_size: u32,
        /// The largest payload accepted for these pages.
        max: u64,
    },
    /// A compressed packet with zero pages but no data pages has a payload.
    PayloadWithoutPages {
        /// Value received.
        next_packet_size: u32,
    },
    /// `pages_alloc` is larger than the local `page_count`.
    PagesAllocTooLarge {
        /// Value received.
        pages_alloc: u32,
        /// `512 KiB / page size`.
        page_count: u32,
    },
    /// `normal_pages` is larger than `pages_alloc`.
    NormalExceedsAlloc {
        /// Value received.
        normal: u32,
        /// Value received.
        pages_alloc: u32,
    },
    /// `zero_pages` is larger than `pages_alloc - normal_pages`.
    ZeroExceedsAlloc {
        /// Value received.
        zero: u32,
        /// Value received.
        normal: u32,
        /// Value received.
        pages_alloc: u32,
    },
    /// `next_packet_size` is not `normal_pages * page_size` in an uncompressed packet.
    PayloadSizeMismatch {
        /// Value received.
        next_packet_size: u32,
        /// Value received.
        normal: u32,
        /// Local page size.
        page_size: u32,
    },
    /// A name field (block name or device id) has no NUL in its 256 bytes.
    NameUnterminated {
        /// Which field.
        field: Field,
    },
    /// The block named by a packet with pages is not known to the receiver.
    UnknownBlock {
        /// The name received.
        name: BlockName,
    },
    /// A packet with pages has an empty block name (no block can have one).
    EmptyBlockName,
    /// Offset number `index` is not a multiple of the block's page size.
    OffsetMisaligned {
        /// Position in the offset array.
        index: u32,
        /// Value received.
        offset: u64,
        /// The block's page size.
        page_size: u32,
    },
    /// Offset number `index` does not leave a whole page inside the block.
    OffsetOutOfRange {
        /// Position in the offset array.
        index: u32,
        /// Value received.
        offset: u64,
        /// The block's page size.
        page_size: u32,
        /// The block's used length.
        used_length: u64,
    },
    /// A device-state packet arrived and the receiver is configured to refuse them.
    DeviceStateRefused {
        /// Its `next_packet_size`.
        next_packet_size: u32,
    },
    /// A device-state packet has SYNC or a compression value set (`flags`).
    DeviceStateFlags {
        /// Value received.
        flags: u32,
    },
    /// A device-state packet announces an empty payload.
    DeviceStateEmpty,
    /// The configured page size is not a power of two from 1 KiB to 64 KiB
    /// ([`Geometry::new`](super::Geometry::new)).
    BadPageSize {
        /// The configured page size.
        page_size: u32,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::Truncated { field, need, have } => {
                write!(f, "truncated {field}: need {need} bytes, have {have}")
            }
            DecodeError::UnknownChannelMagic { found } => write!(
                f,
                "unknown channel magic {found:#010x} (expected {:#010x} main stream or {:#010x} multifd)",
                super::MAIN_MAGIC,
                super::MULTIFD_MAGIC
            ),
            DecodeError::BadMagic { found } => {
                write!(f, "magic is {found:#010x}, expected {:#010x}", super::MULTIFD_MAGIC)
            }
            DecodeError::BadVersion { found } => {
                write!(f, "version is {found}, expected {}", super::MULTIFD_VERSION)
            }
            DecodeError::UuidMismatch { ours, theirs } => {
                write!(f, "uuid is {theirs:02x?}, expected {ours:02x?}")
            }
            DecodeError::ChannelIdOutOfRange { id, channels } => {
                write!(f, "channel id {id} is out of range for {channels} channels")
            }
            DecodeError::DuplicateChannel { id } => write!(f, "channel id {id} is already set up"),
            DecodeError::UnknownFlags { flags } => write!(f, "flags {flags:#x} has unknown bits"),
            DecodeError::CompressionRefused { found, accepted } => {
                let name = Compression::from_flag_value(found).map_or("?", Compression::name);
                write!(f, "compression {name} (flags value {found:#x}) is not accepted (accepted: {accepted})")
            }
            DecodeError::UnknownCompression { value } => {
                write!(f, "compression value in flags is {value:#x}, which no QEMU version defines")
            }
            DecodeError::CompressedSize { next_packet_size, normal, page_size, max } => write!(
                f,
                "compressed next_packet_size {next_packet_size} for {normal} pages of {page_size} bytes is outside 1..={max}"
            ),
            DecodeError::PayloadWithoutPages { next_packet_size } => {
                write!(f, "next_packet_size {next_packet_size} in a compressed packet with no data pages (must be 0)")
            }
            DecodeError::PagesAllocTooLarge { pages_alloc, page_count } => {
                write!(f, "pages_alloc {pages_alloc} is larger than page_count {page_count}")
            }
            DecodeError::NormalExceedsAlloc { normal, pages_alloc } => {
                write!(f, "normal_pages {normal} is larger than pages_alloc {pages_alloc}")
            }
            DecodeError::ZeroExceedsAlloc { zero, normal, pages_alloc } => {
                write!(f, "zero_pages {zero} is larger than pages_alloc {pages_alloc} - normal_pages {normal}")
            }
            DecodeError::PayloadSizeMismatch { next_packet_size, normal, page_size } => {
                write!(f, "next_packet_size {next_packet_size} is not normal_pages {normal} * page size {page_size}")
            }
            DecodeError::NameUnterminated { field } => write!(f, "{field} is not NUL-terminated"),
            DecodeError::UnknownBlock { name } => write!(f, "unknown RAM block {name}"),
            DecodeError::EmptyBlockName => f.write_str("a packet with pages has an empty block name"),
            DecodeError::OffsetMisaligned { index, offset, page_size } => {
                write!(f, "offset[{index}] {offset:#x} is not a multiple of the page size {page_size}")
            }
            DecodeError::OffsetOutOfRange { index, offset, page_size, used_length } => write!(
                f,
                "offset[{index}] {offset:#x} + page size {page_size} is past the block's used length {used_length:#x}"
            ),
            DecodeError::DeviceStateRefused { next_packet_size } => {
                write!(f, "device-state packet ({next_packet_size} payload bytes) refused by configuration")
            }
            DecodeError::DeviceStateFlags { flags } => {
                write!(f, "device-state packet has flags {flags:#x} (SYNC or compression set)")
            }
            DecodeError::DeviceStateEmpty => f.write_str("device-state packet has an empty payload"),
            DecodeError::BadPageSize { page_size } => {
                write!(f, "page size {page_size} is not a power of two between 1 KiB and 64 KiB")
            }
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why an encoder could not write its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum EncodeError {
    /// The output buffer is smaller than the encoding.
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// A name is longer than its field allows (`max` bytes, without the terminator).
    NameTooLong {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// More offsets than the packet has slots.
    TooManyOffsets {
        /// Offsets given.
        count: usize,
        /// Slots in the packet.
        page_count: u32,
    },
    /// `normal_pages + zero_pages` does not match the number of offsets given.
    CountMismatch {
        /// `normal_pages + zero_pages`.
        declared: u64,
        /// Offsets given.
        given: usize,
    },
    /// A main-stream RAM record offset is not page-aligned.
    Misaligned {
        /// The offset.
        offset: u64,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EncodeError::BufferTooSmall { need, have } => {
                write!(f, "output buffer too small: need {need} bytes, have {have}")
            }
            EncodeError::NameTooLong { len, max } => {
                write!(f, "name of {len} bytes is longer than the maximum {max}")
            }
            EncodeError::TooManyOffsets { count, page_count } => {
                write!(f, "{count} offsets do not fit in {page_count} slots")
            }
            EncodeError::CountMismatch { declared, given } => {
                write!(f, "normal_pages + zero_pages is {declared} but {given} offsets were given")
            }
            EncodeError::Misaligned { offset } => {
                write!(f, "offset {offset:#x} is not page-aligned")
            }
        }
    }
}

impl core::error::Error for EncodeError {}
