//! `multifd inspect`: decodes captured migration streams (one file per connection) for people
//! debugging a migration. A multifd channel becomes a per-packet table (or JSON); a main stream
//! becomes its list of records. Files are read incrementally, so large captures are fine.

use core::fmt::{self, Write as _};
use multifd_core::wire::stream::{Event, StreamConfig, StreamParser};
use multifd_core::wire::{
    ChannelKind, CommonHeader, Compression, Geometry, InitPacket, Layout, Packet, PacketConfig, identify_channel,
    packet::{COMMON_HEADER_LEN, INIT_PACKET_LEN},
};
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
        message: String,
    },
    /// Bad command-line option.
    Options(String),
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
            InspectError::Invalid { path, offset, message } => {
                write!(f, "{}: at byte offset {offset}: {message}", path.display())
            }
            InspectError::Options(m) => f.write_str(m),
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

/// Inspects every file and returns the text (or one JSON document) to print.
pub fn inspect(files: &[PathBuf], opts: Options) -> Result<String, InspectError> {
    let geometry = Geometry::new(opts.page_size).map_err(|e| InspectError::Options(format!("--page-size: {e}")))?;
    let mut out = String::new();
    if opts.json {
        out.push_str("{\"files\":[");
    }
    for (i, path) in files.iter().enumerate() {
        if opts.json && i > 0 {
            out.push(',');
        }
        inspect_file(path, geometry, opts, &mut out)?;
    }
    if opts.json {
        out.push_str("]}\n");
    }
    Ok(out)
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

fn inspect_file(path: &Path, geometry: Geometry, opts: Options, out: &mut String) -> Result<(), InspectError> {
    let io_err = |source| InspectError::Io { path: path.to_path_buf(), source };
    let mut f = io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(io_err)?);
    let mut magic = [0u8; 4];
    let n = read_full(&mut f, &mut magic).map_err(io_err)?;
    let kind = match identify_channel(magic) {
        Ok(k) if n == 4 => k,
        _ => return Err(InspectError::UnknownStream { path: path.to_path_buf(), magic: magic[..n].to_vec() }),
    };
    let invalid = |offset: u64, message: String| InspectError::Invalid { path: path.to_path_buf(), offset, message };
    let name = json_str(&path.display().to_string());
    match kind {
        ChannelKind::Multifd => {
            let cfg = PacketConfig { layout: opts.layout, ..PacketConfig::new(geometry) };
            let mut hdr = vec![0u8; geometry.header_len().max(INIT_PACKET_LEN)];
            hdr[..4].copy_from_slice(&magic);
            let n = read_full(&mut f, &mut hdr[4..INIT_PACKET_LEN]).map_err(io_err)? + 4;
            let init = InitPacket::decode(&hdr[..n]).map_err(|e| invalid(0, format!("init packet: {e}")))?;
            if opts.json {
                let _ = write!(
                    out,
                    "{{\"file\":{name},\"kind\":\"multifd\",\"channel\":{},\"uuid\":\"{}\",\"packets\":[",
                    init.id,
                    hex(&init.uuid)
                );
            } else {
                let _ = writeln!(out, "{}: multifd channel {} (uuid {})", path.display(), init.id, hex(&init.uuid));
                let _ = writeln!(
                    out,
                    "{:>10} {:>10} {:<12} {:<12} {:>5} {:>6} {:>5} offsets (normal | zero)",
                    "at", "packet_num", "flags", "block", "alloc", "normal", "zero"
                );
            }
            let mut pos = INIT_PACKET_LEN as u64;
            let mut count = 0u64;
            loop {
                let n = read_full(&mut f, &mut hdr[..COMMON_HEADER_LEN]).map_err(io_err)?;
                if n == 0 {
                    break;
                }
                let common = CommonHeader::decode(&hdr[..n]).map_err(|e| invalid(pos, e.to_string()))?;
                let len = common.header_len(geometry);
                let k = read_full(&mut f, &mut hdr[COMMON_HEADER_LEN..len]).map_err(io_err)?;
                let packet =
                    Packet::decode(&hdr[..COMMON_HEADER_LEN + k], &cfg).map_err(|e| invalid(pos, e.to_string()))?;
                let payload = match packet {
                    Packet::Ram(p) => {
                        let h = p.header();
                        let normal: Vec<u64> = p.normal_offsets().collect();
                        let zero: Vec<u64> = p.zero_offsets().collect();
                        let block = String::from_utf8_lossy(h.block);
                        if opts.json {
                            let _ = write!(
                                out,
                                "{}{{\"at\":{pos},\"type\":\"ram\",\"packet_num\":{},\"flags\":{},\"sync\":{},\"block\":{},\"pages_alloc\":{},\"normal\":{},\"zero\":{},\"next_packet_size\":{},\"normal_offsets\":{:?},\"zero_offsets\":{:?}}}",
                                if count > 0 { "," } else { "" },
                                h.packet_num,
                                h.flags.0,
                                h.flags.is_sync(),
                                json_str(&block),
                                h.pages_alloc,
                                h.normal_pages,
                                h.zero_pages,
                                h.next_packet_size,
                                normal,
                                zero
                            );
                        } else {
                            let _ = writeln!(
                                out,
                                "{pos:>10} {:>10} {:<12} {:<12} {:>5} {:>6} {:>5} {} | {}",
                                h.packet_num,
                                h.flags.to_string(),
                                if block.is_empty() { "-".into() } else { block },
                                h.pages_alloc,
                                h.normal_pages,
                                h.zero_pages,
                                short_list(&normal),
                                short_list(&zero)
                            );
                        }
                        p.payload_len(Compression::None)
                    }
                    Packet::DeviceState(d) => {
                        let id = String::from_utf8_lossy(d.idstr);
                        if opts.json {
                            let _ = write!(
                                out,
                                "{}{{\"at\":{pos},\"type\":\"device_state\",\"idstr\":{},\"instance_id\":{},\"next_packet_size\":{}}}",
                                if count > 0 { "," } else { "" },
                                json_str(&id),
                                d.instance_id,
                                d.next_packet_size
                            );
                        } else {
                            let _ = writeln!(
                                out,
                                "{pos:>10} device state {id} instance {} ({} bytes)",
                                d.instance_id, d.next_packet_size
                            );
                        }
                        u64::from(d.next_packet_size)
                    }
                };
                count += 1;
                let skipped = io::copy(&mut (&mut f).take(payload), &mut io::sink()).map_err(io_err)?;
                if skipped < payload {
                    return Err(invalid(
                        pos,
                        format!("truncated payload: need {payload} bytes after the header, have {skipped}"),
                    ));
                }
                pos += len as u64 + payload;
            }
            if opts.json {
                out.push_str("]}");
            } else {
                let _ = writeln!(out, "{count} packets, {pos} bytes");
            }
        }
        ChannelKind::Main => {
            let mut p = StreamParser::new(StreamConfig::new(geometry));
            if opts.json {
                let _ = write!(out, "{{\"file\":{name},\"kind\":\"main\",\"records\":[");
            } else {
                let _ = writeln!(out, "{}: main stream", path.display());
            }
            let mut first = true;
            let mut buf = vec![0u8; 1 << 16];
            buf[..4].copy_from_slice(&magic);
            let mut fill = 4;
            loop {
                fill += read_full(&mut f, &mut buf[fill..]).map_err(io_err)?;
                if fill == 0 {
                    break;
                }
                let mut chunk = &buf[..fill];
                while !chunk.is_empty() {
                    let (n, ev) = match p.feed(chunk) {
                        Ok(r) => r,
                        Err(e) => return Err(invalid(p.item_position(), e.to_string())),
                    };
                    if let Some(ev) = ev
                        && let Some(line) = describe(&ev, opts.json)
                    {
                        let at = p.item_position();
                        if opts.json {
                            let _ = write!(out, "{}{{\"at\":{at},{line}}}", if first { "" } else { "," });
                        } else {
                            let _ = writeln!(out, "{at:>10} {line}");
                        }
                        first = false;
                    }
                    chunk = &chunk[n..];
                }
                fill = 0;
            }
            if let Err(e) = p.finish() {
                return Err(invalid(p.item_position(), e.to_string()));
            }
            if opts.json {
                out.push_str("]}");
            } else {
                let _ = writeln!(out, "{} bytes", p.position());
            }
        }
    }
    Ok(())
}

/// One line (text) or the JSON members for an event; `None` for continuation fragments.
fn describe(ev: &Event<'_>, json: bool) -> Option<String> {
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (kind, text, fields) = match *ev {
        Event::Configuration { machine } => {
            ("configuration", format!("machine {}", s(machine)), format!("\"machine\":{}", json_str(&s(machine))))
        }
        Event::SectionStart { kind, section_id, name, instance_id, version_id } => (
            "section_start",
            format!("section {kind:?} id {section_id} \"{}\" instance {instance_id} version {version_id}", s(name)),
            format!(
                "\"section\":\"{kind:?}\",\"section_id\":{section_id},\"name\":{},\"instance_id\":{instance_id},\"version_id\":{version_id}",
                json_str(&s(name))
            ),
        ),
        Event::SectionPart { kind, section_id } => (
            "section_part",
            format!("section {kind:?} id {section_id}"),
            format!("\"section\":\"{kind:?}\",\"section_id\":{section_id}"),
        ),
        Event::SectionSkipped { section_id, bytes } => (
            "section_skipped",
            format!("  (device section {section_id}: {bytes} bytes skipped)"),
            format!("\"section_id\":{section_id},\"bytes\":{bytes}"),
        ),
        Event::Footer { section_id } => {
            ("footer", format!("footer {section_id}"), format!("\"section_id\":{section_id}"))
        }
        Event::RamTotal { total } => ("mem_size", format!("  MEM_SIZE total {total:#x}"), format!("\"total\":{total}")),
        Event::BlockDeclared { name, used_length } => (
            "block",
            format!("  block \"{}\" used_length {used_length:#x}", s(name)),
            format!("\"name\":{},\"used_length\":{used_length}", json_str(&s(name))),
        ),
        Event::ZeroPage { block, offset } => (
            "zero_page",
            format!("  ZERO \"{}\" {offset:#x}", s(block)),
            format!("\"block\":{},\"offset\":{offset}", json_str(&s(block))),
        ),
        Event::PageData { block, offset, at, .. } => {
            if at != 0 {
                return None;
            }
            (
                "page",
                format!("  PAGE \"{}\" {offset:#x}", s(block)),
                format!("\"block\":{},\"offset\":{offset}", json_str(&s(block))),
            )
        }
        Event::MultifdFlush => ("multifd_flush", "  MULTIFD_FLUSH".into(), String::new()),
        Event::Eos => ("eos", "  EOS".into(), String::new()),
        Event::Command { cmd, len } => {
            ("command", format!("command {cmd} ({len} bytes)"), format!("\"cmd\":{cmd},\"len\":{len}"))
        }
        Event::Eof => ("eof", "EOF".into(), String::new()),
        Event::VmDescription { len } => {
            ("vmdescription", format!("JSON description ({len} bytes)"), format!("\"len\":{len}"))
        }
        Event::VmDescriptionData { .. } => return None,
        _ => ("other", format!("{ev:?}"), String::new()),
    };
    Some(if json {
        if fields.is_empty() { format!("\"record\":\"{kind}\"") } else { format!("\"record\":\"{kind}\",{fields}") }
    } else {
        text
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

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}
