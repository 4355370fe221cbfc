//! `multifd inspect`: decodes captured migration streams (one file per connection) for people
//! debugging a migration. A multifd channel becomes a per-packet table (or JSON); a main stream
//! becomes its list of records. Files are read incrementally, so large captures are fine.

use core::fmt::{self, Write as _};
use multifd_core::wire::stream::{Event, StreamConfig, StreamParser};
use multifd_core::wire::{
    ChannelKind, CommonHeader, DecodeError, Flags, Geometry, InitPacket, Layout, Packet, PacketConfig, StreamError,
    identify_channel,
    packet::{COMMON_HEADER_LEN, INIT_PACKET_LEN},
};
use serde::Serialize;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Options of `multifd inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Target page size of the migration.
    pub page_size: u32,
    /// RAM header layout: QEMU 7.2-8.2 or 9.0+.
    pub layout: Layout,
    /// JSON instead of a table.
    pub json: bool,
}

/// What was wrong with a file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// The init packet.
    InitPacket(DecodeError),
    /// A packet header.
    Packet(DecodeError),
    /// The main stream.
    Stream(StreamError),
    /// A packet's payload is cut short.
    TruncatedPayload {
        /// Bytes the header announces after it.
        need: u64,
        /// Bytes the file has.
        have: u64,
    },
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InitPacket(e) => write!(f, "init packet: {e}"),
            Self::Packet(e) => write!(f, "{e}"),
            Self::Stream(e) => write!(f, "{e}"),
            Self::TruncatedPayload { need, have } => {
                write!(f, "truncated payload: need {need} bytes after the header, have {have}")
            }
        }
    }
}

/// Why a file could not be inspected.
#[derive(Debug)]
pub enum InspectError {
    /// The file could not be opened or read.
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The first 4 bytes are neither a main stream nor a multifd channel.
    UnknownStream {
        /// The file.
        path: PathBuf,
        /// The bytes (fewer when the file is shorter).
        magic: Vec<u8>,
    },
    /// Invalid or truncated content.
    Invalid {
        /// The file.
        path: PathBuf,
        /// Byte offset in the file where the bad item starts.
        offset: u64,
        /// What is wrong (names the field and values).
        error: Invalid,
    },
    /// The page size option is not one QEMU uses.
    PageSize(DecodeError),
}

impl fmt::Display for InspectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InspectError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            InspectError::UnknownStream { path, magic } => write!(
                f,
                "{}: unknown stream type: first bytes {:02x?} are neither \"QEVM\" (main stream) nor 11 22 33 44 (multifd)",
                path.display(),
                magic
            ),
            InspectError::Invalid { path, offset, error } => {
                write!(f, "{}: at byte offset {offset}: {error}", path.display())
            }
            InspectError::PageSize(e) => write!(f, "--page-size: {e}"),
        }
    }
}

impl core::error::Error for InspectError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            InspectError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// What one file holds.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileReport {
    /// A multifd channel.
    Multifd {
        /// The file.
        file: String,
        /// The init packet's channel id.
        channel: u8,
        /// The init packet's uuid, in hex.
        uuid: String,
        /// Every packet.
        packets: Vec<PacketRow>,
        /// Bytes in the file.
        #[serde(skip)]
        bytes: u64,
    },
    /// A main stream.
    Main {
        /// The file.
        file: String,
        /// Every record (page data fragments after a page's first are left out).
        records: Vec<RecordRow>,
        /// Bytes in the file.
        #[serde(skip)]
        bytes: u64,
    },
}

/// One packet of a channel.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PacketRow {
    /// A RAM packet.
    Ram {
        /// Offset in the file.
        at: u64,
        /// Its number.
        packet_num: u64,
        /// Raw flags.
        flags: u32,
        /// Whether SYNC is set.
        sync: bool,
        /// Block name.
        block: String,
        /// Offset slots.
        pages_alloc: u32,
        /// Data pages.
        normal: u32,
        /// Zero pages.
        zero: u32,
        /// Payload bytes.
        next_packet_size: u32,
        /// Compression method (`none`, `zlib`, `zstd`, ...).
        compression: &'static str,
        /// Payload bytes on the wire (compressed, or the data pages).
        payload_bytes: u64,
        /// The data pages' bytes (what a compressed payload decompresses to).
        raw_bytes: u64,
        /// Offsets of the data pages.
        normal_offsets: Vec<u64>,
        /// Offsets of the zero pages.
        zero_offsets: Vec<u64>,
    },
    /// A device-state packet.
    DeviceState {
        /// Offset in the file.
        at: u64,
        /// The device's idstr.
        idstr: String,
        /// Its instance id.
        instance_id: u32,
        /// Payload bytes.
        next_packet_size: u32,
    },
}

/// One record of a main stream, at its offset.
#[derive(Debug, Serialize)]
pub struct RecordRow {
    /// Offset in the file.
    pub at: u64,
    /// The record.
    #[serde(flatten)]
    pub record: Record,
}

/// A main-stream record, as `inspect` shows it.
#[derive(Debug, Serialize)]
#[serde(tag = "record", rename_all = "snake_case")]
#[allow(missing_docs)]
pub enum Record {
    Configuration { machine: String },
    SectionStart { section: String, section_id: u32, name: String, instance_id: u32, version_id: u32 },
    SectionPart { section: String, section_id: u32 },
    SectionSkipped { section_id: u32, bytes: u64 },
    Footer { section_id: u32 },
    MemSize { total: u64 },
    Block { name: String, used_length: u64 },
    ZeroPage { block: String, offset: u64 },
    Page { block: String, offset: u64 },
    MultifdFlush,
    Eos,
    Command { cmd: u16, len: u16 },
    Eof,
    Vmdescription { len: u32 },
    Other { event: String },
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Configuration { machine } => write!(f, "machine {machine}"),
            Record::SectionStart { section, section_id, name, instance_id, version_id } => {
                write!(f, "section {section} id {section_id} \"{name}\" instance {instance_id} version {version_id}")
            }
            Record::SectionPart { section, section_id } => write!(f, "section {section} id {section_id}"),
            Record::SectionSkipped { section_id, bytes } => {
                write!(f, "  (device section {section_id}: {bytes} bytes skipped)")
            }
            Record::Footer { section_id } => write!(f, "footer {section_id}"),
            Record::MemSize { total } => write!(f, "  MEM_SIZE total {total:#x}"),
            Record::Block { name, used_length } => write!(f, "  block \"{name}\" used_length {used_length:#x}"),
            Record::ZeroPage { block, offset } => write!(f, "  ZERO \"{block}\" {offset:#x}"),
            Record::Page { block, offset } => write!(f, "  PAGE \"{block}\" {offset:#x}"),
            Record::MultifdFlush => write!(f, "  MULTIFD_FLUSH"),
            Record::Eos => write!(f, "  EOS"),
            Record::Command { cmd, len } => write!(f, "command {cmd} ({len} bytes)"),
            Record::Eof => write!(f, "EOF"),
            Record::Vmdescription { len } => write!(f, "JSON description ({len} bytes)"),
            Record::Other { event } => write!(f, "{event}"),
        }
    }
}

/// Every file's report, in the order given.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// The files.
    pub files: Vec<FileReport>,
}

/// Inspects every file.
pub fn inspect_files(files: &[PathBuf], page_size: u32, layout: Layout) -> Result<Inspection, InspectError> {
    let geometry = Geometry::new(page_size).map_err(InspectError::PageSize)?;
    let files = files.iter().map(|p| inspect_file(p, geometry, layout)).collect::<Result<_, _>>()?;
    Ok(Inspection { files })
}

/// Inspects every file and returns the text (or one JSON document) to print.
pub fn inspect(files: &[PathBuf], opts: Options) -> Result<String, InspectError> {
    let report = inspect_files(files, opts.page_size, opts.layout)?;
    if opts.json {
        // Local invariant: the report holds strings and numbers only, which always serialise.
        return Ok(serde_json::to_string(&report).unwrap_or_default() + "\n");
    }
    let mut out = String::new();
    for f in &report.files {
        render(f, &mut out);
    }
    Ok(out)
}

fn render(file: &FileReport, out: &mut String) {
    match file {
        FileReport::Multifd { file, channel, uuid, packets, bytes } => {
            let _ = writeln!(out, "{file}: multifd channel {channel} (uuid {uuid})");
            let _ = writeln!(
                out,
                "{:>10} {:>10} {:<12} {:<12} {:>5} {:>6} {:>5} offsets (normal | zero)",
                "at", "packet_num", "flags", "block", "alloc", "normal", "zero"
            );
            for p in packets {
                match p {
                    PacketRow::Ram {
                        at,
                        packet_num,
                        flags,
                        block,
                        pages_alloc,
                        normal,
                        zero,
                        normal_offsets,
                        zero_offsets,
                        compression,
                        payload_bytes,
                        raw_bytes,
                        ..
                    } => {
                        let block = if block.is_empty() { "-" } else { block };
                        let (n, z) = (short_list(normal_offsets), short_list(zero_offsets));
                        let flags = Flags(*flags).to_string();
                        let packed = if *compression != "none" && *raw_bytes > 0 {
                            format!(" [{compression}: {payload_bytes} bytes for {raw_bytes}]")
                        } else {
                            String::new()
                        };
                        let _ = writeln!(
                            out,
                            "{at:>10} {packet_num:>10} {flags:<12} {block:<12} {pages_alloc:>5} {normal:>6} {zero:>5} {n} | {z}{packed}"
                        );
                    }
                    PacketRow::DeviceState { at, idstr, instance_id, next_packet_size } => {
                        let _ = writeln!(
                            out,
                            "{at:>10} device state {idstr} instance {instance_id} ({next_packet_size} bytes)"
                        );
                    }
                }
            }
            let _ = writeln!(out, "{} packets, {bytes} bytes", packets.len());
            let (mut packed, mut raw, mut method) = (0u64, 0u64, None);
            for p in packets {
                if let PacketRow::Ram { compression, payload_bytes, raw_bytes, .. } = p
                    && *compression != "none"
                {
                    (packed, raw, method) = (packed + payload_bytes, raw + raw_bytes, Some(*compression));
                }
            }
            if let Some(m) = method {
                let _ = writeln!(out, "{m}: {raw} bytes of pages in {packed} compressed bytes");
            }
        }
        FileReport::Main { file, records, bytes } => {
            let _ = writeln!(out, "{file}: main stream");
            for r in records {
                let _ = writeln!(out, "{:>10} {}", r.at, r.record);
            }
            let _ = writeln!(out, "{bytes} bytes");
        }
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(n < len)` only at end of file.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

type Reader = io::BufReader<std::fs::File>;

fn inspect_file(path: &Path, geometry: Geometry, layout: Layout) -> Result<FileReport, InspectError> {
    let io_err = |source| InspectError::Io { path: path.to_path_buf(), source };
    let mut f = io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(io_err)?);
    let mut magic = [0u8; 4];
    let n = read_full(&mut f, &mut magic).map_err(io_err)?;
    match identify_channel(magic) {
        Ok(ChannelKind::Multifd) if n == 4 => channel_file(path, &mut f, magic, geometry, layout),
        Ok(ChannelKind::Main) if n == 4 => main_file(path, &mut f, magic, geometry),
        _ => Err(InspectError::UnknownStream { path: path.to_path_buf(), magic: magic[..n].to_vec() }),
    }
}

fn channel_file(
    path: &Path,
    f: &mut Reader,
    magic: [u8; 4],
    geometry: Geometry,
    layout: Layout,
) -> Result<FileReport, InspectError> {
    let io_err = |source| InspectError::Io { path: path.to_path_buf(), source };
    let invalid = |offset: u64, error| InspectError::Invalid { path: path.to_path_buf(), offset, error };
    let cfg = PacketConfig { layout, ..PacketConfig::new(geometry) };
    let mut hdr = vec![0u8; geometry.header_len().max(INIT_PACKET_LEN)];
    hdr[..4].copy_from_slice(&magic);
    let n = read_full(f, &mut hdr[4..INIT_PACKET_LEN]).map_err(io_err)? + 4;
    let init = InitPacket::decode(&hdr[..n]).map_err(|e| invalid(0, Invalid::InitPacket(e)))?;
    let (mut pos, mut packets) = (INIT_PACKET_LEN as u64, Vec::new());
    loop {
        let n = read_full(f, &mut hdr[..COMMON_HEADER_LEN]).map_err(io_err)?;
        if n == 0 {
            break;
        }
        let common = CommonHeader::decode(&hdr[..n]).map_err(|e| invalid(pos, Invalid::Packet(e)))?;
        let len = common.header_len(geometry);
        let k = read_full(f, &mut hdr[COMMON_HEADER_LEN..len]).map_err(io_err)?;
        let packet =
            Packet::decode(&hdr[..COMMON_HEADER_LEN + k], &cfg).map_err(|e| invalid(pos, Invalid::Packet(e)))?;
        let (row, payload) = packet_row(pos, &packet);
        packets.push(row);
        let skipped = io::copy(&mut f.take(payload), &mut io::sink()).map_err(io_err)?;
        if skipped < payload {
            return Err(invalid(pos, Invalid::TruncatedPayload { need: payload, have: skipped }));
        }
        pos += len as u64 + payload;
    }
    let (file, uuid) = (path.display().to_string(), hex(&init.uuid));
    Ok(FileReport::Multifd { file, channel: init.id, uuid, packets, bytes: pos })
}

/// A packet's row and its payload length.
fn packet_row(at: u64, packet: &Packet<'_>) -> (PacketRow, u64) {
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match packet {
        Packet::Ram(p) => {
            let h = p.header();
            let row = PacketRow::Ram {
                at,
                packet_num: h.packet_num,
                flags: h.flags.0,
                sync: h.flags.is_sync(),
                block: s(h.block),
                pages_alloc: h.pages_alloc,
                normal: h.normal_pages,
                zero: h.zero_pages,
                next_packet_size: h.next_packet_size,
                compression: p.compression().name(),
                payload_bytes: p.payload_len(),
                raw_bytes: p.raw_len(),
                normal_offsets: p.normal_offsets().collect(),
                zero_offsets: p.zero_offsets().collect(),
            };
            (row, p.payload_len())
        }
        Packet::DeviceState(d) => {
            let (idstr, instance_id, next_packet_size) = (s(d.idstr), d.instance_id, d.next_packet_size);
            (PacketRow::DeviceState { at, idstr, instance_id, next_packet_size }, u64::from(next_packet_size))
        }
    }
}

fn main_file(path: &Path, f: &mut Reader, magic: [u8; 4], geometry: Geometry) -> Result<FileReport, InspectError> {
    let io_err = |source| InspectError::Io { path: path.to_path_buf(), source };
    let invalid =
        |offset: u64, e| InspectError::Invalid { path: path.to_path_buf(), offset, error: Invalid::Stream(e) };
    let mut p = StreamParser::new(StreamConfig::new(geometry));
    let (mut records, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    buf[..4].copy_from_slice(&magic);
    let mut fill = 4;
    loop {
        fill += read_full(f, &mut buf[fill..]).map_err(io_err)?;
        if fill == 0 {
            break;
        }
        let mut chunk = &buf[..fill];
        while !chunk.is_empty() {
            let (n, ev) = match p.feed(chunk) {
                Ok(r) => r,
                Err(e) => return Err(invalid(p.item_position(), e)),
            };
            if let Some(record) = ev.as_ref().and_then(record) {
                records.push(RecordRow { at: p.item_position(), record });
            }
            chunk = &chunk[n..];
        }
        fill = 0;
    }
    p.finish().map_err(|e| invalid(p.item_position(), e))?;
    Ok(FileReport::Main { file: path.display().to_string(), records, bytes: p.position() })
}

/// The record for an event; `None` for continuation fragments.
fn record(ev: &Event<'_>) -> Option<Record> {
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Some(match *ev {
        Event::Configuration { machine } => Record::Configuration { machine: s(machine) },
        Event::SectionStart { kind, section_id, name, instance_id, version_id } => {
            Record::SectionStart { section: format!("{kind:?}"), section_id, name: s(name), instance_id, version_id }
        }
        Event::SectionPart { kind, section_id } => Record::SectionPart { section: format!("{kind:?}"), section_id },
        Event::SectionSkipped { section_id, bytes } => Record::SectionSkipped { section_id, bytes },
        Event::Footer { section_id } => Record::Footer { section_id },
        Event::RamTotal { total } => Record::MemSize { total },
        Event::BlockDeclared { name, used_length } => Record::Block { name: s(name), used_length },
        Event::ZeroPage { block, offset } => Record::ZeroPage { block: s(block), offset },
        Event::PageData { block, offset, at: 0, .. } => Record::Page { block: s(block), offset },
        Event::PageData { .. } | Event::VmDescriptionData { .. } => return None,
        Event::MultifdFlush => Record::MultifdFlush,
        Event::Eos => Record::Eos,
        Event::Command { cmd, len } => Record::Command { cmd, len },
        Event::Eof => Record::Eof,
        Event::VmDescription { len } => Record::Vmdescription { len },
        _ => Record::Other { event: format!("{ev:?}") },
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn short_list(v: &[u64]) -> String {
    let mut s: Vec<String> = v.iter().take(6).map(|o| format!("{o:#x}")).collect();
    if v.len() > 6 {
        s.push(format!("... ({} more)", v.len() - 6));
    }
    if s.is_empty() { "-".into() } else { s.join(",") }
}
