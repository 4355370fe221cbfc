//! Multifd channel packets: init packet, RAM packet header, device-state packet header.
//!
//! A multifd channel carries one 64-byte [`InitPacket`], then packets until EOF. Every packet
//! starts with a 12-byte [`CommonHeader`] (magic, version, flags). If its flags have
//! [`Flags::DEVICE_STATE`] the header is [`DEVICE_STATE_HEADER_LEN`] bytes long, otherwise it
//! is a RAM header of [`Geometry::header_len`] bytes: 320 fixed bytes and one 64-bit offset
//! slot per page of a 512 KiB packet. That length comes from the local page size, never from
//! the peer. Uncompressed, `normal_pages` pages of data follow a RAM header.
//!
//! Decoding is in two steps, so the receive side can read exactly what it needs:
//! [`CommonHeader::decode`] on the first 12 bytes tells [`CommonHeader::header_len`], then
//! [`Packet::decode`] on the whole header checks the structure (counts, flags, name) and
//! borrows the offsets without copying; [`RamPacket::check_pages`] then checks the block and
//! every offset against the receiver's blocks.
//!
//! ```
//! use multifd_core::wire::{BlockInfo, Flags, Geometry, Layout, Packet, PacketConfig, RamHeader};
//! let geo = Geometry::new(4096).unwrap();
//! let cfg = PacketConfig::new(geo);
//! let mut buf = [0u8; 1344];
//! let hdr = RamHeader {
//!     flags: Flags::empty(), pages_alloc: 128, normal_pages: 1, next_packet_size: 4096,
//!     packet_num: 7, zero_pages: 1, block: b"m0",
//! };
//! let n = hdr.encode(&[0x2000, 0x5000], geo, Layout::V9_0, &mut buf).unwrap();
//! assert_eq!(n, geo.header_len());
//! let Packet::Ram(p) = Packet::decode(&buf, &cfg).unwrap() else { panic!() };
//! assert_eq!(p.header().packet_num, 7);
//! assert!(p.normal_offsets().eq([0x2000]));
//! let block = BlockInfo { used_length: 0x10000, page_size: geo };
//! let lookup = |name: &[u8]| (name == b"m0").then_some(block);
//! assert_eq!(p.check_pages(&lookup), Ok(Some(block)));
//! ```

use super::{DecodeError, EncodeError, Field, MULTIFD_MAGIC, MULTIFD_VERSION, PACKET_DATA_SIZE, be32, be64};
use crate::block::BlockName;
use crate::codec::{Accept, max_compressed_len};
use core::fmt;

/// Length of the init packet.
pub const INIT_PACKET_LEN: usize = 64;
/// Length of the part common to every packet header (magic, version, flags).
pub const COMMON_HEADER_LEN: usize = 12;
/// Length of the fixed part of a RAM packet header, before the offset array.
pub const RAM_FIXED_LEN: usize = 320;
/// Length of the device-state packet header (QEMU 10.0+).
pub const DEVICE_STATE_HEADER_LEN: usize = 276;
/// Size of the NUL-padded name fields (RAM block name, device id).
pub const NAME_FIELD_LEN: usize = 256;

/// Byte offsets of the fields of the 12-byte header common to every packet (and of the init
/// packet, which starts the same way). Encoders and decoders both use these.
pub mod common {
    /// `magic` (u32).
    pub const MAGIC: usize = 0;
    /// `version` (u32).
    pub const VERSION: usize = 4;
    /// `flags` (u32) in packet headers.
    pub const FLAGS: usize = 8;
}

/// Byte offsets of the fields of the 64-byte init packet after magic and version.
pub mod init {
    /// `uuid` (16 bytes).
    pub const UUID: usize = 8;
    /// Channel `id` (u8).
    pub const ID: usize = 24;
}

/// Byte offsets of the fields of a RAM packet header.
pub mod ram {
    /// `pages_alloc` (u32).
    pub const PAGES_ALLOC: usize = 12;
    /// `normal_pages` (u32).
    pub const NORMAL_PAGES: usize = 16;
    /// `next_packet_size` (u32).
    pub const NEXT_PACKET_SIZE: usize = 20;
    /// `packet_num` (u64).
    pub const PACKET_NUM: usize = 24;
    /// `zero_pages` (u32; QEMU 9.0+, reserved before).
    pub const ZERO_PAGES: usize = 32;
    /// `ramblock` name field ([`NAME_FIELD_LEN`](super::NAME_FIELD_LEN) bytes, NUL-padded).
    pub const BLOCK: usize = 64;
    /// The offset array (one big-endian u64 per slot), right after the fixed part.
    pub const OFFSETS: usize = super::RAM_FIXED_LEN;
}

/// Byte offsets of the fields of a device-state packet header (QEMU 10.0+).
pub mod device_state {
    /// `idstr` name field ([`NAME_FIELD_LEN`](super::NAME_FIELD_LEN) bytes, NUL-padded).
    pub const IDSTR: usize = 12;
    /// `instance_id` (u32).
    pub const INSTANCE_ID: usize = 268;
    /// `next_packet_size` (u32).
    pub const NEXT_PACKET_SIZE: usize = 272;
}

const _: () = assert!(ram::BLOCK + NAME_FIELD_LEN == RAM_FIXED_LEN);
const _: () = assert!(device_state::IDSTR + NAME_FIELD_LEN == device_state::INSTANCE_ID);
const _: () = assert!(device_state::NEXT_PACKET_SIZE + 4 == DEVICE_STATE_HEADER_LEN);

/// Packet flags: SYNC, a compression value, DEVICE_STATE.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Flags(pub u32);

impl Flags {
    /// The packet closes a sync epoch on its channel.
    pub const SYNC: u32 = 0x01;
    /// Bits holding the compression value (an enumeration, not independent bits).
    pub const COMPRESSION_MASK: u32 = 0x3e;
    /// The packet is a device-state packet (QEMU 10.0+).
    pub const DEVICE_STATE: u32 = 0x40;
    /// Every bit some QEMU version defines.
    pub const KNOWN: u32 = Self::SYNC | Self::COMPRESSION_MASK | Self::DEVICE_STATE;

    /// No flags.
    pub const fn empty() -> Self {
        Flags(0)
    }
    /// Whether SYNC is set.
    pub const fn is_sync(self) -> bool {
        self.0 & Self::SYNC != 0
    }
    /// Whether DEVICE_STATE is set.
    pub const fn is_device_state(self) -> bool {
        self.0 & Self::DEVICE_STATE != 0
    }
    /// The compression value (`flags & 0x3e`).
    pub const fn compression(self) -> u32 {
        self.0 & Self::COMPRESSION_MASK
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if self.is_sync() {
            f.write_str("SYNC")?;
            sep = "|";
        }
        if self.is_device_state() {
            write!(f, "{sep}DEVICE_STATE")?;
            sep = "|";
        }
        if self.compression() != 0 {
            write!(f, "{sep}COMP={:#x}", self.compression())?;
            sep = "|";
        }
        let unknown = self.0 & !Self::KNOWN;
        if unknown != 0 {
            write!(f, "{sep}{unknown:#x}")?;
            sep = "|";
        }
        if sep.is_empty() {
            f.write_str("-")?;
        }
        Ok(())
    }
}

/// Compression methods, as their value in the flags word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Compression {
    /// No compression: the payload is the raw pages.
    #[default]
    None,
    /// zlib.
    Zlib,
    /// zstd.
    Zstd,
    /// Intel QPL (9.1+).
    Qpl,
    /// UADK (9.1+).
    Uadk,
    /// QATzip (9.2+).
    Qatzip,
}

impl Compression {
    /// The method a flags word's compression value (`flags & 0x3e`) names; `None` for a value no
    /// QEMU version defines (two bits set, say).
    pub const fn from_flag_value(value: u32) -> Option<Self> {
        Some(match value {
            0x00 => Compression::None,
            0x02 => Compression::Zlib,
            0x04 => Compression::Zstd,
            0x08 => Compression::Qpl,
            0x10 => Compression::Uadk,
            0x20 => Compression::Qatzip,
            _ => return None,
        })
    }

    /// Its name, as QEMU's `multifd-compression` parameter spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
            Compression::Qpl => "qpl",
            Compression::Uadk => "uadk",
            Compression::Qatzip => "qatzip",
        }
    }

    /// The value this method puts in the flags word.
    pub const fn flag_value(self) -> u32 {
        match self {
            Compression::None => 0x00,
            Compression::Zlib => 0x02,
            Compression::Zstd => 0x04,
            Compression::Qpl => 0x08,
            Compression::Uadk => 0x10,
            Compression::Qatzip => 0x20,
        }
    }
}

/// Which RAM header layout: QEMU 9.0 added `zero_pages` at byte 32 (reserved before).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Layout {
    /// QEMU 7.2 to 8.2: no `zero_pages`; bytes 32..64 reserved (decoded as zero pages = 0).
    V7_2,
    /// QEMU 9.0 and later: `zero_pages` at byte 32.
    V9_0,
}

/// The target page size of a migration, and what it fixes on the wire: the RAM header length
/// ([`Geometry::header_len`]), the offset slots per packet ([`Geometry::page_count`]), the size
/// of PAGE data and the flag mask of main-stream RAM records. The one page-size type of the
/// crate: the packet codec, the stream parser ([`StreamConfig`](super::StreamConfig)) and the
/// block table ([`BlockSpec::page_size`](crate::block::BlockSpec::page_size)) all take it.
///
/// Always a power of two from [`Geometry::MIN`] (1 KiB) to [`Geometry::MAX`] (64 KiB), the
/// range of QEMU's target page sizes.
///
/// ```
/// use multifd_core::wire::Geometry;
/// let g = Geometry::new(4096)?;
/// assert_eq!((g.bytes(), g.shift(), g.page_count(), g.header_len()), (4096, 12, 128, 1344));
/// assert_eq!(g, Geometry::DEFAULT);
/// assert!(Geometry::new(128 * 1024).is_err());
/// # Ok::<(), multifd_core::wire::DecodeError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Geometry {
    page_size: u32,
}

impl Geometry {
    /// 4 KiB, the page size of x86, most Arm and RISC-V guests.
    pub const DEFAULT: Self = Geometry { page_size: 4096 };
    /// Smallest accepted page size (QEMU's smallest target page, 1 KiB).
    pub const MIN: u32 = 1024;
    /// Largest accepted page size (QEMU's largest target page, 64 KiB).
    pub const MAX: u32 = 64 * 1024;

    /// A geometry for `page_size`: a power of two from [`Geometry::MIN`] to [`Geometry::MAX`].
    pub const fn new(page_size: u32) -> Result<Self, DecodeError> {
        if page_size.is_power_of_two() && page_size >= Self::MIN && page_size <= Self::MAX {
            Ok(Geometry { page_size })
        } else {
            Err(DecodeError::BadPageSize { page_size })
        }
    }
    /// The target page size in bytes.
    pub const fn page_size(self) -> u32 {
        self.page_size
    }
    /// The target page size in bytes, as a `usize` (lossless: at most 64 KiB).
    pub const fn bytes(self) -> usize {
        self.page_size as usize
    }
    /// log2 of the page size.
    pub const fn shift(self) -> u32 {
        self.page_size.trailing_zeros()
    }
    /// Offset slots per packet: `512 KiB / page size` (128 for 4 KiB pages).
    pub const fn page_count(self) -> u32 {
        PACKET_DATA_SIZE / self.page_size
    }
    /// Length of a RAM packet header: `320 + 8 * page_count` (1344 for 4 KiB pages).
    pub const fn header_len(self) -> usize {
        ram::OFFSETS + 8 * self.page_count() as usize
    }
}

impl Default for Geometry {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Largest `page_count` (offset slots per packet) of any accepted page size: 512 KiB / 1 KiB.
pub const MAX_PAGE_COUNT: usize = (PACKET_DATA_SIZE / Geometry::MIN) as usize;
/// Largest RAM packet header of any accepted page size: `320 + 8 * MAX_PAGE_COUNT` (4416) bytes.
/// A receive buffer of this size holds any packet header (device-state headers are shorter).
pub const MAX_HEADER_LEN: usize = RAM_FIXED_LEN + 8 * MAX_PAGE_COUNT;

const _: () = assert!(DEVICE_STATE_HEADER_LEN <= MAX_HEADER_LEN);

/// What a receiver does with a device-state packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DeviceStatePolicy {
    /// Decode it and let the caller skip its payload by length.
    Skip,
    /// Fail with [`DecodeError::DeviceStateRefused`].
    Refuse,
}

/// Receiver configuration for decoding packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PacketConfig {
    /// Page size and header length.
    pub geometry: Geometry,
    /// Header layout expected from the sender.
    pub layout: Layout,
    /// Compression methods accepted (read from each packet's flags; [`Accept::ALL`] by default).
    pub compression: Accept,
    /// Device-state packets: skip or refuse.
    pub device_state: DeviceStatePolicy,
}

impl PacketConfig {
    /// Layout 9.0+, no compression, device state skipped.
    pub const fn new(geometry: Geometry) -> Self {
        PacketConfig { geometry, layout: Layout::V9_0, compression: Accept::ALL, device_state: DeviceStatePolicy::Skip }
    }
}

/// The payload length rules of a RAM packet with pages: uncompressed, exactly the pages; compressed,
/// nothing without data pages (QEMU's receivers assert on that) and otherwise 1 to
/// [`max_compressed_len`] bytes.
fn check_payload(
    method: Compression,
    next_packet_size: u32,
    normal: u32,
    raw: u64,
    page_size: u32,
) -> Result<(), DecodeError> {
    let size = u64::from(next_packet_size);
    if method == Compression::None {
        if size != raw {
            return Err(DecodeError::PayloadSizeMismatch { next_packet_size, normal, page_size });
        }
        return Ok(());
    }
    if normal == 0 {
        if size != 0 {
            return Err(DecodeError::PayloadWithoutPages { next_packet_size });
        }
        return Ok(());
    }
    let max = max_compressed_len(usize::try_from(raw).unwrap_or(usize::MAX)) as u64;
    if size == 0 || size > max {
        return Err(DecodeError::CompressedSize { next_packet_size, normal, page_size, max });
    }
    Ok(())
}

fn need(field: Field, buf: &[u8], len: usize) -> Result<(), DecodeError> {
    if buf.len() < len { Err(DecodeError::Truncated { field, need: len, have: buf.len() }) } else { Ok(()) }
}

fn out_need(buf: &[u8], len: usize) -> Result<(), EncodeError> {
    if buf.len() < len { Err(EncodeError::BufferTooSmall { need: len, have: buf.len() }) } else { Ok(()) }
}

/// Returns the name before the first NUL of a 256-byte name field.
fn name_field(field: Field, raw: &[u8]) -> Result<&[u8], DecodeError> {
    match raw.iter().position(|&b| b == 0) {
        Some(n) => Ok(&raw[..n]),
        None => Err(DecodeError::NameUnterminated { field }),
    }
}

fn put_name(out: &mut [u8], name: &[u8]) -> Result<(), EncodeError> {
    if name.len() >= NAME_FIELD_LEN || name.contains(&0) {
        return Err(EncodeError::NameTooLong { len: name.len(), max: NAME_FIELD_LEN - 1 });
    }
    out[..NAME_FIELD_LEN].fill(0);
    out[..name.len()].copy_from_slice(name);
    Ok(())
}

/// The 64-byte packet that opens every multifd channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InitPacket {
    /// The sending QEMU's `-uuid` (all zero when unset).
    pub uuid: [u8; 16],
    /// The channel index, 0-based.
    pub id: u8,
}

impl InitPacket {
    /// Decodes and checks magic and version. Reserved bytes are ignored, as QEMU does.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        need(Field::InitPacket, buf, INIT_PACKET_LEN)?;
        check_magic_version(buf)?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[init::UUID..init::UUID + 16]);
        Ok(InitPacket { uuid, id: buf[init::ID] })
    }

    /// Checks the packet against the receiver's configuration: `id < channels` (QEMU's own
    /// check is off by one) and, when the receiver has a uuid, an equal uuid.
    pub fn validate(&self, channels: u8, uuid: Option<[u8; 16]>) -> Result<(), DecodeError> {
        if let Some(ours) = uuid
            && ours != self.uuid
        {
            return Err(DecodeError::UuidMismatch { ours, theirs: self.uuid });
        }
        if self.id >= channels {
            return Err(DecodeError::ChannelIdOutOfRange { id: self.id, channels });
        }
        Ok(())
    }

    /// Writes the 64 bytes into `out`; returns 64.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        out_need(out, INIT_PACKET_LEN)?;
        let out = &mut out[..INIT_PACKET_LEN];
        out.fill(0);
        put_magic_version(out);
        out[init::UUID..init::UUID + 16].copy_from_slice(&self.uuid);
        out[init::ID] = self.id;
        Ok(INIT_PACKET_LEN)
    }
}

/// Which channel ids have sent their init packet: catches duplicates (up to 255 channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ChannelSet {
    seen: [u32; 8],
}

impl ChannelSet {
    /// No channel seen yet.
    pub const fn new() -> Self {
        ChannelSet { seen: [0; 8] }
    }
    /// Records `id`; fails if it was recorded before.
    pub fn insert(&mut self, id: u8) -> Result<(), DecodeError> {
        let word = &mut self.seen[usize::from(id / 32)];
        let bit = 1u32 << (id % 32);
        if *word & bit != 0 {
            return Err(DecodeError::DuplicateChannel { id });
        }
        *word |= bit;
        Ok(())
    }
    /// Number of ids recorded.
    pub fn len(&self) -> u32 {
        self.seen.iter().map(|w| w.count_ones()).sum()
    }
    /// Whether no id is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn put32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(out: &mut [u8], at: usize, v: u64) {
    out[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn put_magic_version(out: &mut [u8]) {
    put32(out, common::MAGIC, MULTIFD_MAGIC);
    put32(out, common::VERSION, MULTIFD_VERSION);
}

fn check_magic_version(buf: &[u8]) -> Result<(), DecodeError> {
    let magic = be32(buf, common::MAGIC);
    if magic != MULTIFD_MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    let version = be32(buf, common::VERSION);
    if version != MULTIFD_VERSION {
        return Err(DecodeError::BadVersion { found: version });
    }
    Ok(())
}

/// The first 12 bytes of every packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CommonHeader {
    /// The flags word.
    pub flags: Flags,
}

impl CommonHeader {
    /// Decodes the first 12 bytes; checks magic, version and that every flag bit is known.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        need(Field::CommonHeader, buf, COMMON_HEADER_LEN)?;
        check_magic_version(buf)?;
        let flags = Flags(be32(buf, common::FLAGS));
        if flags.0 & !Flags::KNOWN != 0 {
            return Err(DecodeError::UnknownFlags { flags: flags.0 });
        }
        Ok(CommonHeader { flags })
    }

    /// The whole header's length, counting the 12 bytes already read.
    pub fn header_len(&self, geometry: Geometry) -> usize {
        if self.flags.is_device_state() { DEVICE_STATE_HEADER_LEN } else { geometry.header_len() }
    }
}

/// The fields of a RAM packet header, without the offset array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RamHeader<'a> {
    /// SYNC and the compression value.
    pub flags: Flags,
    /// Slots the sender used (its `page_count`; 0 in QEMU 9.2+ page-less SYNC packets).
    pub pages_alloc: u32,
    /// Pages whose data follows, listed first in the offset array.
    pub normal_pages: u32,
    /// Payload bytes after the header (the compressed size when compressed).
    pub next_packet_size: u32,
    /// Global sequence number across channels (never validated by QEMU).
    pub packet_num: u64,
    /// Zero pages, listed after the normal ones (9.0+; 0 with [`Layout::V7_2`]).
    pub zero_pages: u32,
    /// RAM block name, without the NUL.
    pub block: &'a [u8],
}

impl RamHeader<'_> {
    /// Writes a whole header: fixed part, `offsets` (normal then zero), remaining slots zero.
    ///
    /// `offsets.len()` must equal `normal_pages + zero_pages`. With [`Layout::V7_2`]
    /// `zero_pages` must be 0 (the field does not exist there).
    pub fn encode(
        &self,
        offsets: &[u64],
        geometry: Geometry,
        layout: Layout,
        out: &mut [u8],
    ) -> Result<usize, EncodeError> {
        let len = geometry.header_len();
        out_need(out, len)?;
        let zero = if layout == Layout::V9_0 { self.zero_pages } else { 0 };
        let declared = u64::from(self.normal_pages) + u64::from(zero);
        if declared != offsets.len() as u64 {
            return Err(EncodeError::CountMismatch { declared, given: offsets.len() });
        }
        if offsets.len() > geometry.page_count() as usize {
            return Err(EncodeError::TooManyOffsets { count: offsets.len(), page_count: geometry.page_count() });
        }
        let out = &mut out[..len];
        out.fill(0);
        put_magic_version(out);
        put32(out, common::FLAGS, self.flags.0);
        put32(out, ram::PAGES_ALLOC, self.pages_alloc);
        put32(out, ram::NORMAL_PAGES, self.normal_pages);
        put32(out, ram::NEXT_PACKET_SIZE, self.next_packet_size);
        put64(out, ram::PACKET_NUM, self.packet_num);
        put32(out, ram::ZERO_PAGES, zero);
        put_name(&mut out[ram::BLOCK..ram::BLOCK + NAME_FIELD_LEN], self.block)?;
        for (slot, off) in out[ram::OFFSETS..].chunks_exact_mut(8).zip(offsets) {
            slot.copy_from_slice(&off.to_be_bytes());
        }
        Ok(len)
    }
}

/// The offset array of a decoded RAM packet, borrowed from the input (big-endian slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Offsets<'a> {
    raw: &'a [u8],
}

impl<'a> Offsets<'a> {
    /// The offset array of a RAM packet header held in `header` (at least
    /// [`Geometry::header_len`] bytes for `geometry`, as after [`Packet::decode`] succeeded on
    /// it): for a receiver that keeps the header bytes and reads one slot at a time. `None` if
    /// `header` is too short.
    pub fn of_header(header: &'a [u8], geometry: Geometry) -> Option<Self> {
        header.get(ram::OFFSETS..geometry.header_len()).map(|raw| Offsets { raw })
    }
    /// Number of slots.
    pub fn len(&self) -> usize {
        self.raw.len() / 8
    }
    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }
    /// Slot `i`, if it exists.
    pub fn get(&self, i: usize) -> Option<u64> {
        let at = i.checked_mul(8)?;
        (at.checked_add(8)? <= self.raw.len()).then(|| be64(self.raw, at))
    }
    /// Iterates over every slot.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u64> + Clone + 'a {
        self.raw.chunks_exact(8).map(|c| be64(c, 0))
    }
}

/// A decoded RAM packet header. Counts are already checked against each other and the local
/// `page_count`; offsets and the block are checked by [`RamPacket::check_pages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RamPacket<'a> {
    header: RamHeader<'a>,
    offsets: Offsets<'a>,
    geometry: Geometry,
}

impl<'a> RamPacket<'a> {
    /// The header fields.
    pub fn header(&self) -> &RamHeader<'a> {
        &self.header
    }
    /// Every slot of the offset array, including stale ones past the counts.
    pub fn all_offsets(&self) -> Offsets<'a> {
        self.offsets
    }
    /// Offsets of the normal pages, in payload order.
    pub fn normal_offsets(&self) -> impl ExactSizeIterator<Item = u64> + Clone + 'a {
        self.offsets.iter().take(self.header.normal_pages as usize)
    }
    /// Offsets of the zero pages.
    pub fn zero_offsets(&self) -> impl ExactSizeIterator<Item = u64> + Clone + 'a {
        self.offsets.iter().skip(self.header.normal_pages as usize).take(self.header.zero_pages as usize)
    }
    /// Whether the packet carries any page (normal or zero).
    pub fn has_pages(&self) -> bool {
        self.header.normal_pages != 0 || self.header.zero_pages != 0
    }
    /// Payload bytes after the header. Uncompressed this is `normal_pages * page_size`, not
    /// `next_packet_size` (which QEMU 7.2 leaves stale in page-less SYNC packets); compressed it is
    /// `next_packet_size` (0 without data pages).
    pub fn payload_len(&self) -> u64 {
        if self.compression() == Compression::None || self.header.normal_pages == 0 {
            self.raw_len()
        } else {
            u64::from(self.header.next_packet_size)
        }
    }

    /// Bytes of the normal pages once decompressed: `normal_pages * page_size`.
    pub fn raw_len(&self) -> u64 {
        u64::from(self.header.normal_pages) * u64::from(self.geometry.page_size())
    }

    /// The packet's compression method (decode checked that the flags name one).
    pub fn compression(&self) -> Compression {
        Compression::from_flag_value(self.header.flags.compression()).unwrap_or(Compression::None)
    }

    /// Checks the block and every normal and zero offset: the block is known to `blocks`,
    /// each offset is aligned to the block's page size and leaves a whole page inside its
    /// used length. Returns the block, or `None` when the packet has no pages (its name is
    /// then not looked up: SYNC packets carry an empty or stale one). Unsorted offsets and
    /// repeated offsets are accepted, as real senders produce both.
    pub fn check_pages<L: BlockLookup + ?Sized>(&self, blocks: &L) -> Result<Option<BlockInfo>, DecodeError> {
        if !self.has_pages() {
            return Ok(None);
        }
        let Some(info) = blocks.lookup(self.header.block) else {
            // The name field gave at most 255 bytes before its NUL, so only an empty name is
            // not a valid block name.
            return Err(match BlockName::new(self.header.block) {
                Ok(name) => DecodeError::UnknownBlock { name },
                Err(_) => DecodeError::EmptyBlockName,
            });
        };
        let n = self.header.normal_pages as usize + self.header.zero_pages as usize;
        for (i, off) in self.offsets.iter().take(n).enumerate() {
            // i < page_count <= 512, so it fits in u32.
            super::check_page(info, off, i as u32)?;
        }
        Ok(Some(info))
    }
}

/// Size and page size of a RAM block, as the receiver knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlockInfo {
    /// Bytes of the block in use.
    pub used_length: u64,
    /// The block's page size (the target page size, or larger for huge-page backends).
    pub page_size: Geometry,
}

/// Finds a RAM block by name. Implemented for closures `Fn(&[u8]) -> Option<BlockInfo>`.
pub trait BlockLookup {
    /// The block called `name` (bytes before the NUL), if the receiver has one.
    fn lookup(&self, name: &[u8]) -> Option<BlockInfo>;
}

impl<F: Fn(&[u8]) -> Option<BlockInfo>> BlockLookup for F {
    fn lookup(&self, name: &[u8]) -> Option<BlockInfo> {
        self(name)
    }
}

/// A decoded device-state packet header (QEMU 10.0+); `next_packet_size` bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DeviceStateHeader<'a> {
    /// Section id of the device, without the NUL.
    pub idstr: &'a [u8],
    /// Instance id of the device.
    pub instance_id: u32,
    /// Payload bytes after the header; never 0.
    pub next_packet_size: u32,
}

impl DeviceStateHeader<'_> {
    /// Writes the 276-byte header.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        out_need(out, DEVICE_STATE_HEADER_LEN)?;
        let out = &mut out[..DEVICE_STATE_HEADER_LEN];
        out.fill(0);
        put_magic_version(out);
        put32(out, common::FLAGS, Flags::DEVICE_STATE);
        put_name(&mut out[device_state::IDSTR..device_state::IDSTR + NAME_FIELD_LEN], self.idstr)?;
        put32(out, device_state::INSTANCE_ID, self.instance_id);
        put32(out, device_state::NEXT_PACKET_SIZE, self.next_packet_size);
        Ok(DEVICE_STATE_HEADER_LEN)
    }
}

/// A decoded packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Packet<'a> {
    /// A RAM packet; its payload is [`RamPacket::payload_len`] bytes.
    Ram(RamPacket<'a>),
    /// A device-state packet; skip `next_packet_size` payload bytes to stay in sync.
    DeviceState(DeviceStateHeader<'a>),
}

impl<'a> Packet<'a> {
    /// Decodes a whole packet header (its length from [`CommonHeader::header_len`]) and
    /// checks everything that needs no knowledge of the receiver's blocks.
    pub fn decode(buf: &'a [u8], cfg: &PacketConfig) -> Result<Self, DecodeError> {
        let common = CommonHeader::decode(buf)?;
        let flags = common.flags;
        if flags.is_device_state() {
            need(Field::DeviceStateHeader, buf, DEVICE_STATE_HEADER_LEN)?;
            let next_packet_size = be32(buf, device_state::NEXT_PACKET_SIZE);
            if flags.0 != Flags::DEVICE_STATE {
                return Err(DecodeError::DeviceStateFlags { flags: flags.0 });
            }
            let idstr =
                name_field(Field::DeviceStateHeader, &buf[device_state::IDSTR..device_state::IDSTR + NAME_FIELD_LEN])?;
            if next_packet_size == 0 {
                return Err(DecodeError::DeviceStateEmpty);
            }
            if cfg.device_state == DeviceStatePolicy::Refuse {
                return Err(DecodeError::DeviceStateRefused { next_packet_size });
            }
            return Ok(Packet::DeviceState(DeviceStateHeader {
                idstr,
                instance_id: be32(buf, device_state::INSTANCE_ID),
                next_packet_size,
            }));
        }
        let geo = cfg.geometry;
        let len = geo.header_len();
        need(Field::RamHeader, buf, len)?;
        let pages_alloc = be32(buf, ram::PAGES_ALLOC);
        let normal = be32(buf, ram::NORMAL_PAGES);
        let next_packet_size = be32(buf, ram::NEXT_PACKET_SIZE);
        let zero = match cfg.layout {
            Layout::V9_0 => be32(buf, ram::ZERO_PAGES),
            Layout::V7_2 => 0,
        };
        let page_count = geo.page_count();
        if pages_alloc > page_count {
            return Err(DecodeError::PagesAllocTooLarge { pages_alloc, page_count });
        }
        if normal > pages_alloc {
            return Err(DecodeError::NormalExceedsAlloc { normal, pages_alloc });
        }
        match pages_alloc.checked_sub(normal) {
            Some(room) if zero <= room => {}
            _ => return Err(DecodeError::ZeroExceedsAlloc { zero, normal, pages_alloc }),
        }
        let method = Compression::from_flag_value(flags.compression())
            .ok_or(DecodeError::UnknownCompression { value: flags.compression() })?;
        // Packets without data pages carry no method when they are SYNC-only, so the accepted set
        // only constrains packets that carry one, or carry pages.
        if (method != Compression::None || normal > 0) && !cfg.compression.contains(method) {
            return Err(DecodeError::CompressionRefused { found: flags.compression(), accepted: cfg.compression });
        }
        // QEMU 7.2 leaves a stale `next_packet_size` in packets with no pages at all (SYNC ones, and
        // the empty packet that can follow a SYNC with pages), so those are exempt; uncompressed,
        // the payload length never comes from this field.
        let stale_ok = normal == 0 && zero == 0;
        let raw = u64::from(normal) * u64::from(geo.page_size());
        if !stale_ok {
            check_payload(method, next_packet_size, normal, raw, geo.page_size())?;
        }
        let block = name_field(Field::BlockName, &buf[ram::BLOCK..ram::BLOCK + NAME_FIELD_LEN])?;
        let header = RamHeader {
            flags,
            pages_alloc,
            normal_pages: normal,
            next_packet_size,
            packet_num: be64(buf, ram::PACKET_NUM),
            zero_pages: zero,
            block,
        };
        Ok(Packet::Ram(RamPacket { header, offsets: Offsets { raw: &buf[ram::OFFSETS..len] }, geometry: geo }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GEO: Geometry = match Geometry::new(4096) {
        Ok(g) => g,
        Err(_) => panic!(),
    };

    fn cfg() -> PacketConfig {
        PacketConfig::new(GEO)
    }

    fn sample(buf: &mut [u8], normal: u32, zero: u32, flags: u32) {
        let offs: std::vec::Vec<u64> = (0..u64::from(normal + zero)).map(|i| i * 4096).collect();
        RamHeader {
            flags: Flags(flags),
            pages_alloc: 128,
            normal_pages: normal,
            next_packet_size: normal * 4096,
            packet_num: 1,
            zero_pages: zero,
            block: b"m0",
        }
        .encode(&offs, GEO, Layout::V9_0, buf)
        .unwrap();
    }

    #[test]
    fn header_len_by_page_size() {
        assert_eq!(Geometry::new(4096).unwrap().header_len(), 1344);
        assert_eq!(Geometry::new(65536).unwrap().header_len(), 384);
        assert_eq!(Geometry::new(1024).unwrap().header_len(), 4416);
        assert_eq!(Geometry::new(3000), Err(DecodeError::BadPageSize { page_size: 3000 }));
        assert_eq!(Geometry::new(512), Err(DecodeError::BadPageSize { page_size: 512 }));
    }

    #[test]
    fn init_packet_checks() {
        let mut b = [0u8; 64];
        InitPacket { uuid: [7; 16], id: 3 }.encode(&mut b).unwrap();
        let p = InitPacket::decode(&b).unwrap();
        assert_eq!(p.validate(4, Some([7; 16])), Ok(()));
        // QEMU's check is `id > channels`; ours refuses id == channels.
        assert_eq!(p.validate(3, None), Err(DecodeError::ChannelIdOutOfRange { id: 3, channels: 3 }));
        assert_eq!(p.validate(4, Some([1; 16])), Err(DecodeError::UuidMismatch { ours: [1; 16], theirs: [7; 16] }));
        b[3] = 0x45;
        assert_eq!(InitPacket::decode(&b), Err(DecodeError::BadMagic { found: 0x1122_3345 }));
        b[3] = 0x44;
        b[7] = 2;
        assert_eq!(InitPacket::decode(&b), Err(DecodeError::BadVersion { found: 2 }));
        let mut set = ChannelSet::new();
        assert_eq!(set.insert(255), Ok(()));
        assert_eq!(set.insert(0), Ok(()));
        assert_eq!(set.insert(255), Err(DecodeError::DuplicateChannel { id: 255 }));
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn count_checks() {
        let mut b = [0u8; 1344];
        sample(&mut b, 2, 1, 0);
        let mut bad = b;
        bad[12..16].copy_from_slice(&129u32.to_be_bytes());
        assert_eq!(
            Packet::decode(&bad, &cfg()),
            Err(DecodeError::PagesAllocTooLarge { pages_alloc: 129, page_count: 128 })
        );
        let mut bad = b;
        bad[12..16].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(Packet::decode(&bad, &cfg()), Err(DecodeError::NormalExceedsAlloc { normal: 2, pages_alloc: 1 }));
        let mut bad = b;
        bad[32..36].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Packet::decode(&bad, &cfg()),
            Err(DecodeError::ZeroExceedsAlloc { zero: u32::MAX, normal: 2, pages_alloc: 128 })
        );
        let mut bad = b;
        bad[23] = 1;
        assert_eq!(
            Packet::decode(&bad, &cfg()),
            Err(DecodeError::PayloadSizeMismatch { next_packet_size: 8193, normal: 2, page_size: 4096 })
        );
        let mut bad = b;
        bad[11] = 0x04;
        let none = PacketConfig { compression: Accept::NONE, ..cfg() };
        assert_eq!(
            Packet::decode(&bad, &none),
            Err(DecodeError::CompressionRefused { found: 4, accepted: Accept::NONE })
        );
        assert!(Packet::decode(&bad, &cfg()).is_ok(), "zstd with 2 pages in 8192 bytes is a valid compressed packet");
        let mut bad = b;
        bad[11] = 0x80;
        assert_eq!(Packet::decode(&bad, &cfg()), Err(DecodeError::UnknownFlags { flags: 0x80 }));
        let mut bad = b;
        bad[64..320].fill(b'a');
        assert_eq!(Packet::decode(&bad, &cfg()), Err(DecodeError::NameUnterminated { field: Field::BlockName }));
        // The 7.2 layout ignores bytes 32..36.
        let mut old = bad;
        old.copy_from_slice(&b);
        let c72 = PacketConfig { layout: Layout::V7_2, ..cfg() };
        let Packet::Ram(p) = Packet::decode(&old, &c72).unwrap() else { panic!() };
        assert_eq!(p.header().zero_pages, 0);
    }

    #[test]
    fn tolerated_real_sender_quirks() {
        let mut b = [0u8; 1344];
        // 10.0 page-less SYNC: pages_alloc 0, empty name.
        RamHeader {
            flags: Flags(1),
            pages_alloc: 0,
            normal_pages: 0,
            next_packet_size: 0,
            packet_num: 0,
            zero_pages: 0,
            block: b"",
        }
        .encode(&[], GEO, Layout::V9_0, &mut b)
        .unwrap();
        let Packet::Ram(p) = Packet::decode(&b, &cfg()).unwrap() else { panic!() };
        assert_eq!(p.check_pages(&|_: &[u8]| None), Ok(None));
        // 7.2 page-less SYNC with a stale next_packet_size and stale slots.
        b[12..16].copy_from_slice(&128u32.to_be_bytes());
        b[20..24].copy_from_slice(&(5 * 4096u32).to_be_bytes());
        b[320..328].copy_from_slice(&0xdead_0000u64.to_be_bytes());
        let Packet::Ram(p) = Packet::decode(&b, &cfg()).unwrap() else { panic!() };
        assert_eq!(p.payload_len(), 0);
        // Pages inside a SYNC packet, unsorted and repeated offsets.
        let offs = [0x3000, 0x1000, 0x3000];
        RamHeader {
            flags: Flags(1),
            pages_alloc: 128,
            normal_pages: 3,
            next_packet_size: 3 * 4096,
            packet_num: 9,
            zero_pages: 0,
            block: b"m0",
        }
        .encode(&offs, GEO, Layout::V9_0, &mut b)
        .unwrap();
        let Packet::Ram(p) = Packet::decode(&b, &cfg()).unwrap() else { panic!() };
        let info = BlockInfo { used_length: 0x4000, page_size: GEO };
        assert_eq!(p.check_pages(&|n: &[u8]| (n == b"m0").then_some(info)), Ok(Some(info)));
        // A smaller block: the 0x3000 page no longer fits.
        let small = BlockInfo { used_length: 0x3fff, page_size: GEO };
        assert_eq!(
            p.check_pages(&|_: &[u8]| Some(small)),
            Err(DecodeError::OffsetOutOfRange { index: 0, offset: 0x3000, page_size: 4096, used_length: 0x3fff })
        );
        let unknown = p.check_pages(&|_: &[u8]| None);
        assert_eq!(unknown, Err(DecodeError::UnknownBlock { name: BlockName::new(b"m0").unwrap() }));
    }

    #[test]
    fn offsets_checked_with_overflow() {
        let mut b = [0u8; 1344];
        RamHeader {
            flags: Flags(0),
            pages_alloc: 128,
            normal_pages: 0,
            next_packet_size: 0,
            packet_num: 0,
            zero_pages: 2,
            block: b"m0",
        }
        .encode(&[0, u64::MAX - 4095], GEO, Layout::V9_0, &mut b)
        .unwrap();
        let Packet::Ram(p) = Packet::decode(&b, &cfg()).unwrap() else { panic!() };
        let info = BlockInfo { used_length: u64::MAX, page_size: GEO };
        assert_eq!(
            p.check_pages(&|_: &[u8]| Some(info)),
            Err(DecodeError::OffsetOutOfRange {
                index: 1,
                offset: u64::MAX - 4095,
                page_size: 4096,
                used_length: u64::MAX
            })
        );
        b[320 + 7] = 1;
        let Packet::Ram(p) = Packet::decode(&b, &cfg()).unwrap() else { panic!() };
        assert_eq!(
            p.check_pages(&|_: &[u8]| Some(info)),
            Err(DecodeError::OffsetMisaligned { index: 0, offset: 1, page_size: 4096 })
        );
    }

    #[test]
    fn device_state() {
        let mut b = [0u8; 276];
        DeviceStateHeader { idstr: b"0000:00:02.0/vfio", instance_id: 1, next_packet_size: 100 }
            .encode(&mut b)
            .unwrap();
        let Packet::DeviceState(d) = Packet::decode(&b, &cfg()).unwrap() else { panic!() };
        assert_eq!((d.idstr, d.instance_id, d.next_packet_size), (&b"0000:00:02.0/vfio"[..], 1, 100));
        assert_eq!(CommonHeader::decode(&b).unwrap().header_len(GEO), 276);
        let refuse = PacketConfig { device_state: DeviceStatePolicy::Refuse, ..cfg() };
        assert_eq!(Packet::decode(&b, &refuse), Err(DecodeError::DeviceStateRefused { next_packet_size: 100 }));
        b[11] |= 1;
        assert_eq!(Packet::decode(&b, &cfg()), Err(DecodeError::DeviceStateFlags { flags: 0x41 }));
        b[11] = 0x40;
        b[272..276].fill(0);
        assert_eq!(Packet::decode(&b, &cfg()), Err(DecodeError::DeviceStateEmpty));
    }

    fn arb_header() -> impl Strategy<Value = (u32, u32, u32, u32, u64, std::vec::Vec<u8>, std::vec::Vec<u64>, bool)> {
        (0u32..=128, any::<u64>(), prop::collection::vec(1u8..=255, 0..255), any::<bool>(), any::<bool>())
            .prop_flat_map(|(alloc, num, name, sync, v9)| {
                (Just(alloc), 0..=alloc, Just(num), Just(name), Just(sync), Just(v9))
            })
            .prop_flat_map(|(alloc, normal, num, name, sync, v9)| {
                let zmax = if v9 { alloc - normal } else { 0 };
                (0..=zmax).prop_flat_map(move |zero| {
                    let name = name.clone();
                    prop::collection::vec(any::<u64>(), (normal + zero) as usize)
                        .prop_map(move |offs| (alloc, normal, zero, u32::from(sync), num, name.clone(), offs, v9))
                })
            })
    }

    proptest! {
        // Few cases under Miri (slow), and no failure files (Miri isolates the file system).
        #![proptest_config(ProptestConfig {
            cases: if cfg!(miri) { 2 } else { 256 },
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn ram_header_roundtrip((alloc, normal, zero, sync, num, name, offs, v9) in arb_header()) {
            let layout = if v9 { Layout::V9_0 } else { Layout::V7_2 };
            let hdr = RamHeader {
                flags: Flags(sync), pages_alloc: alloc, normal_pages: normal,
                next_packet_size: normal * 4096, packet_num: num, zero_pages: zero, block: &name,
            };
            let mut buf = [0u8; 1344];
            prop_assert_eq!(hdr.encode(&offs, GEO, layout, &mut buf), Ok(1344));
            let c = PacketConfig { layout, ..cfg() };
            let Packet::Ram(p) = Packet::decode(&buf, &c).unwrap() else { panic!("not RAM") };
            prop_assert_eq!(*p.header(), hdr);
            prop_assert!(p.normal_offsets().chain(p.zero_offsets()).eq(offs.iter().copied()));
            prop_assert_eq!(p.all_offsets().len(), 128);
            for cut in 0..1344 {
                prop_assert_eq!(
                    Packet::decode(&buf[..cut], &c),
                    Err(if cut < 12 {
                        DecodeError::Truncated { field: Field::CommonHeader, need: 12, have: cut }
                    } else {
                        DecodeError::Truncated { field: Field::RamHeader, need: 1344, have: cut }
                    })
                );
            }
        }

        #[test]
        fn init_roundtrip(uuid in any::<[u8; 16]>(), id in any::<u8>()) {
            let p = InitPacket { uuid, id };
            let mut buf = [0u8; 64];
            prop_assert_eq!(p.encode(&mut buf), Ok(64));
            prop_assert_eq!(InitPacket::decode(&buf), Ok(p));
            for cut in 0..64 {
                prop_assert_eq!(InitPacket::decode(&buf[..cut]), Err(DecodeError::Truncated { field: Field::InitPacket, need: 64, have: cut }));
            }
        }

        #[test]
        fn device_state_roundtrip(name in prop::collection::vec(1u8..=255, 0..255), inst in any::<u32>(), size in 1u32..) {
            let d = DeviceStateHeader { idstr: &name, instance_id: inst, next_packet_size: size };
            let mut buf = [0u8; 276];
            prop_assert_eq!(d.encode(&mut buf), Ok(276));
            prop_assert_eq!(Packet::decode(&buf, &cfg()), Ok(Packet::DeviceState(d)));
            for cut in 12..276 {
                prop_assert_eq!(Packet::decode(&buf[..cut], &cfg()), Err(DecodeError::Truncated { field: Field::DeviceStateHeader, need: 276, have: cut }));
            }
        }

        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1400)) {
            let _ = Packet::decode(&bytes, &cfg());
            let _ = InitPacket::decode(&bytes);
        }
    }
}
