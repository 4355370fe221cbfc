//! The main migration stream (`QEVM`): a sans-I/O incremental parser and an emitter for the
//! subset that RAM migration needs.
//!
//! Parsed: the file header, the configuration section (machine name), the RAM section
//! (`"ram"`, version 4) in START / PART / END form with records MEM_SIZE (block list), ZERO,
//! PAGE, EOS, CONTINUE and MULTIFD_FLUSH, section footers, commands (skipped by their length),
//! EOF and the trailing JSON description. Other device sections are skipped by scanning for
//! their footer (`0x7e` + section id), which every QEMU machine type of 2.x and later writes;
//! a section body that happens to contain those 5 bytes would end the skip early (the parser
//! then reports an error rather than misreading pages, unless the rest also parses).
//!
//! The "current block" of RAM records persists across sections, as in QEMU.
//!
//! # Driving the parser
//!
//! [`StreamParser::feed`] takes any chunk of input and returns how many bytes it consumed and
//! at most one [`Event`]; call it again with the rest. Page data is lent straight from the
//! input as [`Event::PageData`] fragments (a page may span chunks), so gigabytes of pages pass
//! without copying. [`StreamParser::wants`] says how many bytes the current item still needs.
//! [`StreamParser::finish`] at end of input tells a clean end from a truncated stream.
//!
//! ```
//! use multifd_core::wire::stream::{Event, Record, StreamConfig, StreamParser};
//! let mut buf = [0u8; 64];
//! let mut n = 0;
//! for r in [Record::FileHeader, Record::Configuration { machine: b"none" }, Record::Eof] {
//!     n += r.encode(&mut buf[n..], 4096).unwrap();
//! }
//! let mut p = StreamParser::new(StreamConfig::default());
//! let mut input = &buf[..n];
//! let mut events = 0;
//! while !input.is_empty() {
//!     let (used, ev) = p.feed(input).unwrap();
//!     if let Some(Event::Configuration { machine }) = ev { assert_eq!(machine, b"none"); }
//!     events += ev.is_some() as u32;
//!     input = &input[used..];
//! }
//! p.finish().unwrap();
//! assert_eq!(events, 2);
//! ```

use super::{EncodeError, Geometry, MAIN_MAGIC, MAIN_VERSION, be32, be64};
use core::fmt;

/// RAM record flag: zero page (one fill byte follows, which must be 0).
pub const FLAG_ZERO: u64 = 0x002;
/// RAM record flag: block list (the record's address is the total RAM size).
pub const FLAG_MEM_SIZE: u64 = 0x004;
/// RAM record flag: a whole page follows.
pub const FLAG_PAGE: u64 = 0x008;
/// RAM record flag: end of this section's RAM data.
pub const FLAG_EOS: u64 = 0x010;
/// RAM record flag: same block as the previous record (no name follows).
pub const FLAG_CONTINUE: u64 = 0x020;
/// RAM record flag: multifd sync marker (QEMU 8.1+).
pub const FLAG_MULTIFD_FLUSH: u64 = 0x200;

/// Section type bytes of the main stream.
pub mod section {
    /// End of the device state.
    pub const EOF: u8 = 0x00;
    /// First part of an iterative section (with name).
    pub const START: u8 = 0x01;
    /// Middle part of an iterative section.
    pub const PART: u8 = 0x02;
    /// Last part of an iterative section.
    pub const END: u8 = 0x03;
    /// A whole device section (with name).
    pub const FULL: u8 = 0x04;
    /// The JSON description after EOF.
    pub const VMDESCRIPTION: u8 = 0x06;
    /// The configuration section (machine type).
    pub const CONFIGURATION: u8 = 0x07;
    /// A command (id and length-prefixed data).
    pub const COMMAND: u8 = 0x08;
    /// Footer after each section.
    pub const FOOTER: u8 = 0x7e;
}

/// The idstr of the RAM section.
pub const RAM_SECTION: &[u8] = b"ram";
/// The RAM section's version.
pub const RAM_VERSION: u32 = 4;
/// Longest machine name accepted in the configuration section.
pub const MAX_MACHINE_NAME: u32 = 256;

/// Parser configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct StreamConfig {
    /// Target page size: the size of PAGE data and the mask separating flags from offsets
    /// (4 KiB by default).
    pub geometry: Geometry,
}

impl StreamConfig {
    /// A configuration for `geometry`.
    pub const fn new(geometry: Geometry) -> Self {
        StreamConfig { geometry }
    }
}

/// Which kind of section header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SectionKind {
    /// START.
    Start,
    /// PART.
    Part,
    /// END.
    End,
    /// FULL.
    Full,
}

/// Something the parser found in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Event<'a> {
    /// The configuration section: the source's machine type.
    Configuration {
        /// Machine type name.
        machine: &'a [u8],
    },
    /// A START or FULL section header.
    SectionStart {
        /// START or FULL.
        kind: SectionKind,
        /// Section id.
        section_id: u32,
        /// Section name (`ram` for RAM).
        name: &'a [u8],
        /// Instance id.
        instance_id: u32,
        /// Version id.
        version_id: u32,
    },
    /// A PART or END section header.
    SectionPart {
        /// PART or END.
        kind: SectionKind,
        /// Section id.
        section_id: u32,
    },
    /// A non-RAM section's body was skipped, up to and including its footer.
    SectionSkipped {
        /// Section id.
        section_id: u32,
        /// Body bytes skipped (without the footer).
        bytes: u64,
    },
    /// A section footer after RAM data.
    Footer {
        /// Section id.
        section_id: u32,
    },
    /// MEM_SIZE: the total size of the blocks listed next.
    RamTotal {
        /// Sum of the used lengths.
        total: u64,
    },
    /// One entry of the block list.
    BlockDeclared {
        /// Block name.
        name: &'a [u8],
        /// Used length in bytes.
        used_length: u64,
    },
    /// A zero page on the main channel.
    ZeroPage {
        /// Block name.
        block: &'a [u8],
        /// Byte offset in the block.
        offset: u64,
    },
    /// A fragment of a page sent on the main channel; fragments of one page arrive in order.
    PageData {
        /// Block name.
        block: &'a [u8],
        /// Byte offset of the page in the block.
        offset: u64,
        /// Position of `data` within the page.
        at: u32,
        /// The bytes.
        data: &'a [u8],
    },
    /// MULTIFD_FLUSH: a sync point pairing with one SYNC packet per channel.
    MultifdFlush,
    /// EOS: end of the RAM data of a section (a sync point in legacy per-section mode).
    Eos,
    /// A command, skipped.
    Command {
        /// Command id (11 = switchover start in QEMU 10.0).
        cmd: u16,
        /// Its data length.
        len: u16,
    },
    /// EOF: the end of device state.
    Eof,
    /// The JSON description header; its bytes follow as [`Event::VmDescriptionData`].
    VmDescription {
        /// JSON length.
        len: u32,
    },
    /// A fragment of the JSON description.
    VmDescriptionData {
        /// The bytes.
        data: &'a [u8],
    },
}

/// Why the main stream could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum StreamError {
    /// The file magic is not `QEVM`.
    BadMagic {
        /// Value received.
        found: u32,
    },
    /// The file version is not 3.
    BadVersion {
        /// Value received.
        found: u32,
    },
    /// The stream did not start with a configuration section.
    MissingConfiguration {
        /// The section type found instead.
        found: u8,
    },
    /// A section type byte this parser does not know (subsections at top level included).
    UnknownSectionType {
        /// The byte.
        found: u8,
    },
    /// The machine name is longer than [`MAX_MACHINE_NAME`].
    MachineNameTooLong {
        /// Its length.
        len: u32,
    },
    /// The configuration section has a subsection, which this parser does not decode.
    ConfigurationSubsection,
    /// A footer names another section than the one it closes.
    FooterMismatch {
        /// Section being closed.
        expected: u32,
        /// Id in the footer.
        found: u32,
    },
    /// A footer with no section open.
    UnexpectedFooter {
        /// Id in the footer.
        found: u32,
    },
    /// The RAM section has a version other than 4.
    RamVersion {
        /// Value received.
        found: u32,
    },
    /// A RAM record with flags (low bits) outside the supported subset or combined.
    UnsupportedRamFlags {
        /// The flag bits.
        flags: u64,
        /// The address bits.
        offset: u64,
    },
    /// A CONTINUE record before any block was named.
    NoCurrentBlock {
        /// The record's offset.
        offset: u64,
    },
    /// A block-list entry is larger than what remains of the MEM_SIZE total.
    BlockListOverrun {
        /// The entry's used length.
        used_length: u64,
        /// What remained of the total.
        remaining: u64,
    },
    /// A ZERO record's fill byte is not 0.
    ZeroPageFill {
        /// The byte.
        value: u8,
    },
    /// A command this parser cannot skip (postcopy's packaged stream).
    UnsupportedCommand {
        /// Command id.
        cmd: u16,
    },
    /// A device section of known length is not followed by its footer.
    MissingFooter {
        /// The section's id.
        section: u32,
        /// The byte found where the footer marker (0x7e) belongs.
        found: u8,
    },
    /// Bytes after the end of the stream.
    TrailingData {
        /// The first such byte.
        byte: u8,
    },
    /// Input ended inside an item ([`StreamParser::finish`]).
    Truncated {
        /// Bytes the current item still needed.
        need: u64,
    },
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            StreamError::BadMagic { found } => {
                write!(f, "main stream magic is {found:#010x}, expected {MAIN_MAGIC:#010x} (QEVM)")
            }
            StreamError::BadVersion { found } => write!(f, "main stream version is {found}, expected {MAIN_VERSION}"),
            StreamError::MissingConfiguration { found } => {
                write!(f, "expected the configuration section (0x07), found section type {found:#04x}")
            }
            StreamError::UnknownSectionType { found } => write!(f, "unknown section type {found:#04x}"),
            StreamError::MachineNameTooLong { len } => {
                write!(f, "machine name length {len} is over the maximum {MAX_MACHINE_NAME}")
            }
            StreamError::ConfigurationSubsection => f.write_str("configuration subsections are not supported"),
            StreamError::FooterMismatch { expected, found } => {
                write!(f, "footer of section {found} while section {expected} is open")
            }
            StreamError::UnexpectedFooter { found } => write!(f, "footer of section {found} with no section open"),
            StreamError::RamVersion { found } => write!(f, "RAM section version is {found}, expected {RAM_VERSION}"),
            StreamError::UnsupportedRamFlags { flags, offset } => {
                write!(f, "RAM record flags {flags:#x} (offset {offset:#x}) are not supported")
            }
            StreamError::NoCurrentBlock { offset } => {
                write!(f, "RAM record at offset {offset:#x} has CONTINUE but no block was named before")
            }
            StreamError::BlockListOverrun { used_length, remaining } => write!(
                f,
                "block-list entry of {used_length:#x} bytes exceeds the remaining MEM_SIZE total {remaining:#x}"
            ),
            StreamError::ZeroPageFill { value } => write!(f, "zero-page record has fill byte {value:#04x}, expected 0"),
            StreamError::UnsupportedCommand { cmd } => write!(f, "command {cmd} is not supported"),
            StreamError::MissingFooter { section, found } => {
                write!(
                    f,
                    "section {section}: expected its footer (0x7e) after its fixed-length payload, found {found:#04x}"
                )
            }
            StreamError::TrailingData { byte } => write!(f, "data after the end of the stream (byte {byte:#04x})"),
            StreamError::Truncated { need } => write!(f, "stream ends inside an item ({need} more bytes needed)"),
        }
    }
}

impl core::error::Error for StreamError {}

/// Where the parser is. Fixed-size items are gathered in `scratch` before being processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
enum State {
    FileHeader,
    FirstSection,
    SectionType,
    ConfigLen,
    ConfigName { len: u8 },
    AfterConfig,
    SectionId { kind: SectionKind },
    StartIdLen { kind: SectionKind },
    StartName { kind: SectionKind, id: u32, len: u8 },
    FooterId,
    RamRecord,
    BlockNameLen { flags: u64, offset: u64 },
    BlockName { flags: u64, offset: u64, len: u8 },
    ZeroByte { offset: u64 },
    PageData { offset: u64, at: u32 },
    ListNameLen { remaining: u64 },
    ListEntry { remaining: u64, len: u8 },
    CommandHeader,
    CommandData { left: u16 },
    Skip { id: u32, matched: u8, bytes: u64 },
    SkipFixed { id: u32, left: u32, total: u32 },
    ExpectFooter { id: u32 },
    AfterEof,
    VmDescLen,
    VmDescData { left: u32 },
    Done,
}

/// An event waiting to be built from the parser's state and the input.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Configuration { len: usize },
    SectionStart { kind: SectionKind, id: u32, len: usize, instance: u32, version: u32 },
    SectionPart { kind: SectionKind, id: u32 },
    SectionSkipped { id: u32, bytes: u64 },
    Footer { id: u32 },
    RamTotal { total: u64 },
    BlockDeclared { len: usize, used_length: u64 },
    ZeroPage { offset: u64 },
    PageData { offset: u64, at: u32, start: usize, len: usize },
    Flush,
    Eos,
    Command { cmd: u16, len: u16 },
    Eof,
    VmDescription { len: u32 },
    VmDescriptionData { start: usize, len: usize },
}

const SCRATCH: usize = 264;

/// Incremental parser of the main stream; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct StreamParser {
    cfg: StreamConfig,
    state: State,
    scratch: [u8; SCRATCH],
    have: usize,
    block: [u8; 256],
    block_len: Option<u8>,
    ram_section: Option<u32>,
    open_section: Option<u32>,
    pos: u64,
    item_pos: u64,
}

impl StreamParser {
    /// A parser at the start of a stream.
    pub fn new(cfg: StreamConfig) -> Self {
        StreamParser {
            cfg,
            state: State::FileHeader,
            scratch: [0; SCRATCH],
            have: 0,
            block: [0; 256],
            block_len: None,
            ram_section: None,
            open_section: None,
            pos: 0,
            item_pos: 0,
        }
    }

    /// Bytes consumed so far: the stream offset of the next byte to feed.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Stream offset where the item being parsed (or that failed) starts.
    pub fn item_position(&self) -> u64 {
        self.item_pos
    }

    /// Whether the stream ended cleanly (after EOF, with or without the JSON description).
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::AfterEof | State::Done)
    }

    /// Whether the parser is inside a block list: after a MEM_SIZE record whose total the entries
    /// read so far do not yet add up to. The list ends with the entry that brings the remaining total
    /// to zero (an entry past it is [`StreamError::BlockListOverrun`]), as QEMU's loader reads it.
    pub fn in_block_list(&self) -> bool {
        matches!(self.state, State::ListNameLen { .. } | State::ListEntry { .. })
    }

    /// The current block of RAM records (`None` before the first named record).
    pub fn current_block(&self) -> Option<&[u8]> {
        self.block_len.map(|n| &self.block[..usize::from(n)])
    }

    /// Bytes the current item still needs (at least 1 until the stream is done).
    pub fn wants(&self) -> u64 {
        match self.state {
            State::PageData { at, .. } => u64::from(self.cfg.geometry.page_size() - at),
            State::CommandData { left } => u64::from(left),
            State::VmDescData { left } => u64::from(left),
            State::SkipFixed { left, .. } => u64::from(left),
            State::Skip { .. } | State::AfterEof | State::Done => 1,
            s => (Self::fixed_len(s) - self.have) as u64,
        }
    }

    /// Checks that the input ended at a clean point.
    pub fn finish(&self) -> Result<(), StreamError> {
        if self.is_done() { Ok(()) } else { Err(StreamError::Truncated { need: self.wants() }) }
    }

    fn fixed_len(s: State) -> usize {
        match s {
            State::FileHeader => 8,
            State::ConfigLen | State::SectionId { .. } | State::FooterId | State::CommandHeader | State::VmDescLen => 4,
            State::StartIdLen { .. } => 5,
            State::StartName { len, .. } => usize::from(len) + 8,
            State::ConfigName { len } | State::BlockName { len, .. } => usize::from(len),
            State::ListEntry { len, .. } => usize::from(len) + 8,
            State::RamRecord => 8,
            State::FirstSection
            | State::SectionType
            | State::AfterConfig
            | State::BlockNameLen { .. }
            | State::ZeroByte { .. }
            | State::ListNameLen { .. }
            | State::ExpectFooter { .. }
            | State::AfterEof => 1,
            // Streaming states never gather into scratch.
            State::PageData { .. }
            | State::CommandData { .. }
            | State::Skip { .. }
            | State::SkipFixed { .. }
            | State::VmDescData { .. }
            | State::Done => 0,
        }
    }

    /// Consumes a prefix of `input`; returns its length and at most one event. Call again
    /// with the rest of the input. Returns `(0, None)` only for empty input.
    pub fn feed<'s>(&'s mut self, input: &'s [u8]) -> Result<(usize, Option<Event<'s>>), StreamError> {
        let mut used = 0;
        let mut pending = None;
        while used < input.len() && pending.is_none() {
            let (n, p) = self.step(&input[used..], used)?;
            used += n;
            pending = p;
        }
        Ok((used, pending.map(|p| self.build(p, input))))
    }

    fn build<'s>(&'s self, p: Pending, input: &'s [u8]) -> Event<'s> {
        let block = self.current_block().unwrap_or(&[]);
        match p {
            Pending::Configuration { len } => Event::Configuration { machine: &self.scratch[..len] },
            Pending::SectionStart { kind, id, len, instance, version } => Event::SectionStart {
                kind,
                section_id: id,
                name: &self.scratch[..len],
                instance_id: instance,
                version_id: version,
            },
            Pending::SectionPart { kind, id } => Event::SectionPart { kind, section_id: id },
            Pending::SectionSkipped { id, bytes } => Event::SectionSkipped { section_id: id, bytes },
            Pending::Footer { id } => Event::Footer { section_id: id },
            Pending::RamTotal { total } => Event::RamTotal { total },
            Pending::BlockDeclared { len, used_length } => {
                Event::BlockDeclared { name: &self.scratch[..len], used_length }
            }
            Pending::ZeroPage { offset } => Event::ZeroPage { block, offset },
            Pending::PageData { offset, at, start, len } => {
                Event::PageData { block, offset, at, data: &input[start..start + len] }
            }
            Pending::Flush => Event::MultifdFlush,
            Pending::Eos => Event::Eos,
            Pending::Command { cmd, len } => Event::Command { cmd, len },
            Pending::Eof => Event::Eof,
            Pending::VmDescription { len } => Event::VmDescription { len },
            Pending::VmDescriptionData { start, len } => Event::VmDescriptionData { data: &input[start..start + len] },
        }
    }

    /// One step on `input` (which starts at `base` in the caller's chunk).
    fn step(&mut self, input: &[u8], base: usize) -> Result<(usize, Option<Pending>), StreamError> {
        if self.have == 0 {
            self.item_pos = self.pos;
        }
        let r = self.step_inner(input, base);
        if let Ok((n, _)) = r {
            self.pos += n as u64;
        }
        r
    }

    fn step_inner(&mut self, input: &[u8], base: usize) -> Result<(usize, Option<Pending>), StreamError> {
        match self.state {
            State::PageData { offset, at } => {
                let page_size = self.cfg.geometry.page_size();
                let left = (page_size - at) as usize;
                let n = left.min(input.len());
                let next_at = at + n as u32;
                self.state =
                    if next_at == page_size { State::RamRecord } else { State::PageData { offset, at: next_at } };
                return Ok((n, Some(Pending::PageData { offset, at, start: base, len: n })));
            }
            State::CommandData { left } => {
                let n = usize::from(left).min(input.len());
                let left = left - n as u16;
                if left == 0 {
                    self.state = State::SectionType;
                } else {
                    self.state = State::CommandData { left };
                }
                return Ok((n, None));
            }
            State::VmDescData { left } => {
                let n = (left as usize).min(input.len());
                let left = left - n as u32;
                self.state = if left == 0 { State::Done } else { State::VmDescData { left } };
                return Ok((n, Some(Pending::VmDescriptionData { start: base, len: n })));
            }
            State::Skip { id, mut matched, mut bytes } => {
                let pat = footer_pattern(id);
                for (i, &b) in input.iter().enumerate() {
                    matched = advance_match(&pat, matched, b);
                    bytes += 1;
                    if usize::from(matched) == pat.len() {
                        self.state = State::SectionType;
                        self.open_section = None;
                        return Ok((i + 1, Some(Pending::SectionSkipped { id, bytes: bytes - pat.len() as u64 })));
                    }
                }
                self.state = State::Skip { id, matched, bytes };
                return Ok((input.len(), None));
            }
            State::SkipFixed { id, left, total } => {
                let n = (left as usize).min(input.len());
                let left = left - n as u32;
                if left > 0 {
                    self.state = State::SkipFixed { id, left, total };
                    return Ok((n, None));
                }
                self.state = State::ExpectFooter { id };
                return Ok((n, Some(Pending::SectionSkipped { id, bytes: u64::from(total) })));
            }
            State::Done => return Err(StreamError::TrailingData { byte: input[0] }),
            _ => {}
        }
        let want = Self::fixed_len(self.state);
        let n = (want - self.have).min(input.len());
        self.scratch[self.have..self.have + n].copy_from_slice(&input[..n]);
        self.have += n;
        if self.have < want {
            return Ok((n, None));
        }
        self.have = 0;
        let ev = self.process()?;
        Ok((n, ev))
    }

    /// Processes a complete fixed-size item in `scratch`.
    fn process(&mut self) -> Result<Option<Pending>, StreamError> {
        let s = &self.scratch;
        // A power of two (Geometry's invariant), so `page_size - 1` masks the flag bits.
        let page_size = self.cfg.geometry.page_size();
        let mut ev = None;
        self.state = match self.state {
            State::FileHeader => {
                let magic = be32(s, 0);
                if magic != MAIN_MAGIC {
                    return Err(StreamError::BadMagic { found: magic });
                }
                let version = be32(s, 4);
                if version != MAIN_VERSION {
                    return Err(StreamError::BadVersion { found: version });
                }
                State::FirstSection
            }
            State::FirstSection => {
                if s[0] != section::CONFIGURATION {
                    return Err(StreamError::MissingConfiguration { found: s[0] });
                }
                State::ConfigLen
            }
            State::ConfigLen => {
                let len = be32(s, 0);
                match u8::try_from(len) {
                    Ok(len) if len > 0 => State::ConfigName { len },
                    Ok(_) => {
                        ev = Some(Pending::Configuration { len: 0 });
                        State::AfterConfig
                    }
                    Err(_) => return Err(StreamError::MachineNameTooLong { len }),
                }
            }
            State::ConfigName { len } => {
                ev = Some(Pending::Configuration { len: usize::from(len) });
                State::AfterConfig
            }
            State::AfterConfig => {
                if s[0] == 0x05 {
                    return Err(StreamError::ConfigurationSubsection);
                }
                Self::section_type(s[0], &mut ev)?
            }
            State::SectionType => Self::section_type(s[0], &mut ev)?,
            State::SectionId { kind } => {
                let id = be32(s, 0);
                self.open_section = Some(id);
                ev = Some(Pending::SectionPart { kind, id });
                if Some(id) == self.ram_section { State::RamRecord } else { State::Skip { id, matched: 0, bytes: 0 } }
            }
            State::StartIdLen { kind } => {
                let id = be32(s, 0);
                State::StartName { kind, id, len: s[4] }
            }
            State::StartName { kind, id, len } => {
                let l = usize::from(len);
                let instance = be32(s, l);
                let version = be32(s, l + 4);
                self.open_section = Some(id);
                ev = Some(Pending::SectionStart { kind, id, len: l, instance, version });
                if kind == SectionKind::Start && &s[..l] == RAM_SECTION {
                    if version != RAM_VERSION {
                        return Err(StreamError::RamVersion { found: version });
                    }
                    self.ram_section = Some(id);
                    State::RamRecord
                } else if let Some(len) = fixed_section_len(&s[..l], version) {
                    if len == 0 { State::ExpectFooter { id } } else { State::SkipFixed { id, left: len, total: len } }
                } else {
                    State::Skip { id, matched: 0, bytes: 0 }
                }
            }
            State::FooterId => {
                let id = be32(s, 0);
                match self.open_section.take() {
                    Some(open) if open == id => {}
                    Some(open) => return Err(StreamError::FooterMismatch { expected: open, found: id }),
                    None => return Err(StreamError::UnexpectedFooter { found: id }),
                }
                ev = Some(Pending::Footer { id });
                State::SectionType
            }
            State::RamRecord => {
                let word = be64(s, 0);
                let mask = u64::from(page_size - 1);
                let flags = word & mask;
                let offset = word & !mask;
                let op = flags & !FLAG_CONTINUE;
                let cont = flags & FLAG_CONTINUE != 0;
                match op {
                    FLAG_ZERO | FLAG_PAGE if !cont => State::BlockNameLen { flags, offset },
                    FLAG_ZERO | FLAG_PAGE => {
                        if self.block_len.is_none() {
                            return Err(StreamError::NoCurrentBlock { offset });
                        }
                        self.page_state(op, offset)
                    }
                    FLAG_MEM_SIZE if !cont => {
                        ev = Some(Pending::RamTotal { total: offset });
                        if offset == 0 { State::RamRecord } else { State::ListNameLen { remaining: offset } }
                    }
                    FLAG_EOS if !cont => {
                        ev = Some(Pending::Eos);
                        State::SectionType
                    }
                    FLAG_MULTIFD_FLUSH if !cont => {
                        ev = Some(Pending::Flush);
                        State::RamRecord
                    }
                    _ => return Err(StreamError::UnsupportedRamFlags { flags, offset }),
                }
            }
            State::BlockNameLen { flags, offset } => {
                if s[0] == 0 {
                    self.block_len = Some(0);
                    self.page_state(flags & !FLAG_CONTINUE, offset)
                } else {
                    State::BlockName { flags, offset, len: s[0] }
                }
            }
            State::BlockName { flags, offset, len } => {
                let l = usize::from(len);
                self.block[..l].copy_from_slice(&self.scratch[..l]);
                self.block_len = Some(len);
                self.page_state(flags & !FLAG_CONTINUE, offset)
            }
            State::ZeroByte { offset } => {
                if s[0] != 0 {
                    return Err(StreamError::ZeroPageFill { value: s[0] });
                }
                ev = Some(Pending::ZeroPage { offset });
                State::RamRecord
            }
            State::ListNameLen { remaining } => State::ListEntry { remaining, len: s[0] },
            State::ListEntry { remaining, len } => {
                let l = usize::from(len);
                let used_length = be64(s, l);
                let Some(rest) = remaining.checked_sub(used_length) else {
                    return Err(StreamError::BlockListOverrun { used_length, remaining });
                };
                ev = Some(Pending::BlockDeclared { len: l, used_length });
                if rest == 0 { State::RamRecord } else { State::ListNameLen { remaining: rest } }
            }
            State::CommandHeader => {
                let cmd = u16::from_be_bytes([s[0], s[1]]);
                let len = u16::from_be_bytes([s[2], s[3]]);
                // 7 = packaged postcopy stream: its payload follows outside the command.
                if cmd == 7 {
                    return Err(StreamError::UnsupportedCommand { cmd });
                }
                ev = Some(Pending::Command { cmd, len });
                if len == 0 { State::SectionType } else { State::CommandData { left: len } }
            }
            State::ExpectFooter { id } => {
                if s[0] != section::FOOTER {
                    return Err(StreamError::MissingFooter { section: id, found: s[0] });
                }
                State::FooterId
            }
            State::AfterEof => {
                if s[0] != section::VMDESCRIPTION {
                    return Err(StreamError::TrailingData { byte: s[0] });
                }
                State::VmDescLen
            }
            State::VmDescLen => {
                let len = be32(s, 0);
                ev = Some(Pending::VmDescription { len });
                if len == 0 { State::Done } else { State::VmDescData { left: len } }
            }
            State::PageData { .. }
            | State::CommandData { .. }
            | State::Skip { .. }
            | State::SkipFixed { .. }
            | State::VmDescData { .. }
            | State::Done => {
                // `step` handles the streaming states before gathering; never reached.
                self.state
            }
        };
        Ok(ev)
    }

    fn page_state(&self, op: u64, offset: u64) -> State {
        if op == FLAG_ZERO { State::ZeroByte { offset } } else { State::PageData { offset, at: 0 } }
    }

    fn section_type(t: u8, ev: &mut Option<Pending>) -> Result<State, StreamError> {
        Ok(match t {
            section::EOF => {
                *ev = Some(Pending::Eof);
                State::AfterEof
            }
            section::START => State::StartIdLen { kind: SectionKind::Start },
            section::FULL => State::StartIdLen { kind: SectionKind::Full },
            section::PART => State::SectionId { kind: SectionKind::Part },
            section::END => State::SectionId { kind: SectionKind::End },
            section::FOOTER => State::FooterId,
            section::COMMAND => State::CommandHeader,
            found => return Err(StreamError::UnknownSectionType { found }),
        })
    }
}

/// Payload length of device sections whose layout is fixed and known, so they are skipped by length
/// rather than by searching for their footer. This matters for sections holding arbitrary binary
/// values: QEMU's `timer` section (version 2: `cpu_ticks_offset`, a zero, `cpu_clock_offset`, 8 bytes
/// each) is usually section 0, whose footer is `7e 00 00 00 00`; a tick offset whose low byte is 0x7e
/// followed by the zero field looks exactly like that footer (about one run in 256), and a search
/// would end the section early and misread the rest of the stream.
fn fixed_section_len(name: &[u8], version: u32) -> Option<u32> {
    match (name, version) {
        (b"timer", 2) => Some(24),
        _ => None,
    }
}

fn footer_pattern(id: u32) -> [u8; 5] {
    let b = id.to_be_bytes();
    [section::FOOTER, b[0], b[1], b[2], b[3]]
}

/// Longest prefix of `pat` that is a suffix of (the `matched` prefix followed by `b`).
fn advance_match(pat: &[u8; 5], matched: u8, b: u8) -> u8 {
    let m = usize::from(matched);
    let mut cand = [0u8; 6];
    cand[..m].copy_from_slice(&pat[..m]);
    cand[m] = b;
    let total = m + 1;
    for k in (1..=total.min(pat.len())).rev() {
        if cand[total - k..total] == pat[..k] {
            return k as u8;
        }
    }
    0
}

/// One item of the main stream, for the emitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Record<'a> {
    /// `QEVM` and version 3.
    FileHeader,
    /// The configuration section with the machine type (must match the destination's).
    Configuration {
        /// Machine type, e.g. `none`.
        machine: &'a [u8],
    },
    /// START (or FULL with `full`) section header.
    SectionStart {
        /// FULL instead of START.
        full: bool,
        /// Section id.
        section_id: u32,
        /// Section name.
        name: &'a [u8],
        /// Instance id.
        instance_id: u32,
        /// Version id.
        version_id: u32,
    },
    /// PART (or END with `end`) section header.
    SectionPart {
        /// END instead of PART.
        end: bool,
        /// Section id.
        section_id: u32,
    },
    /// Section footer.
    Footer {
        /// Section id.
        section_id: u32,
    },
    /// MEM_SIZE record; the block-list entries must follow.
    MemSize {
        /// Sum of the used lengths.
        total: u64,
    },
    /// One block-list entry.
    BlockEntry {
        /// Block name (at most 255 bytes).
        name: &'a [u8],
        /// Used length.
        used_length: u64,
    },
    /// ZERO record; `block: None` sets CONTINUE.
    ZeroPage {
        /// Block name, or `None` for the current block.
        block: Option<&'a [u8]>,
        /// Page-aligned offset.
        offset: u64,
    },
    /// PAGE record header; the caller writes `page_size` bytes of data after it.
    PageHeader {
        /// Block name, or `None` for the current block.
        block: Option<&'a [u8]>,
        /// Page-aligned offset.
        offset: u64,
    },
    /// MULTIFD_FLUSH record.
    MultifdFlush,
    /// EOS record.
    Eos,
    /// A command with its data.
    Command {
        /// Command id.
        cmd: u16,
        /// Its data.
        data: &'a [u8],
    },
    /// EOF.
    Eof,
    /// The JSON description.
    VmDescription {
        /// The JSON.
        json: &'a [u8],
    },
    /// Bytes written as they are (a device section's body).
    Raw {
        /// The bytes.
        bytes: &'a [u8],
    },
}

struct Out<'o> {
    buf: &'o mut [u8],
    n: usize,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.n..self.n + b.len()].copy_from_slice(b);
        self.n += b.len();
    }
}

fn short_name(name: &[u8]) -> Result<u8, EncodeError> {
    u8::try_from(name.len()).map_err(|_| EncodeError::NameTooLong { len: name.len(), max: 255 })
}

impl Record<'_> {
    /// Bytes [`Record::encode`] writes (for PAGE, the record header only).
    pub fn encoded_len(&self) -> usize {
        match self {
            Record::FileHeader => 8,
            Record::Configuration { machine } => 5 + machine.len(),
            Record::SectionStart { name, .. } => 14 + name.len(),
            Record::SectionPart { .. } | Record::Footer { .. } => 5,
            Record::MemSize { .. } | Record::MultifdFlush | Record::Eos => 8,
            Record::BlockEntry { name, .. } => 9 + name.len(),
            Record::ZeroPage { block, .. } => 9 + block.map_or(0, |b| 1 + b.len()),
            Record::PageHeader { block, .. } => 8 + block.map_or(0, |b| 1 + b.len()),
            Record::Command { data, .. } => 5 + data.len(),
            Record::Eof => 1,
            Record::VmDescription { json } => 5 + json.len(),
            Record::Raw { bytes } => bytes.len(),
        }
    }

    /// Writes the record into `out`; returns the bytes written. `page_size` is the target
    /// page size, which offsets must be aligned to.
    pub fn encode(&self, out: &mut [u8], page_size: u32) -> Result<usize, EncodeError> {
        let need = self.encoded_len();
        if out.len() < need {
            return Err(EncodeError::BufferTooSmall { need, have: out.len() });
        }
        let mut o = Out { buf: out, n: 0 };
        let ram = |o: &mut Out<'_>, block: Option<&[u8]>, offset: u64, flag: u64| -> Result<(), EncodeError> {
            if !offset.is_multiple_of(u64::from(page_size)) {
                return Err(EncodeError::Misaligned { offset });
            }
            let cont = if block.is_none() { FLAG_CONTINUE } else { 0 };
            o.put(&(offset | flag | cont).to_be_bytes());
            if let Some(b) = block {
                o.put(&[short_name(b)?]);
                o.put(b);
            }
            Ok(())
        };
        match *self {
            Record::FileHeader => {
                o.put(&MAIN_MAGIC.to_be_bytes());
                o.put(&MAIN_VERSION.to_be_bytes());
            }
            Record::Configuration { machine } => {
                if machine.len() > MAX_MACHINE_NAME as usize {
                    return Err(EncodeError::NameTooLong { len: machine.len(), max: MAX_MACHINE_NAME as usize });
                }
                o.put(&[section::CONFIGURATION]);
                o.put(&(machine.len() as u32).to_be_bytes());
                o.put(machine);
            }
            Record::SectionStart { full, section_id, name, instance_id, version_id } => {
                o.put(&[if full { section::FULL } else { section::START }]);
                o.put(&section_id.to_be_bytes());
                o.put(&[short_name(name)?]);
                o.put(name);
                o.put(&instance_id.to_be_bytes());
                o.put(&version_id.to_be_bytes());
            }
            Record::SectionPart { end, section_id } => {
                o.put(&[if end { section::END } else { section::PART }]);
                o.put(&section_id.to_be_bytes());
            }
            Record::Footer { section_id } => {
                o.put(&[section::FOOTER]);
                o.put(&section_id.to_be_bytes());
            }
            Record::MemSize { total } => {
                if !total.is_multiple_of(u64::from(page_size)) {
                    return Err(EncodeError::Misaligned { offset: total });
                }
                o.put(&(total | FLAG_MEM_SIZE).to_be_bytes());
            }
            Record::BlockEntry { name, used_length } => {
                o.put(&[short_name(name)?]);
                o.put(name);
                o.put(&used_length.to_be_bytes());
            }
            Record::ZeroPage { block, offset } => {
                ram(&mut o, block, offset, FLAG_ZERO)?;
                o.put(&[0]);
            }
            Record::PageHeader { block, offset } => ram(&mut o, block, offset, FLAG_PAGE)?,
            Record::MultifdFlush => o.put(&FLAG_MULTIFD_FLUSH.to_be_bytes()),
            Record::Eos => o.put(&FLAG_EOS.to_be_bytes()),
            Record::Command { cmd, data } => {
                let len =
                    u16::try_from(data.len()).map_err(|_| EncodeError::NameTooLong { len: data.len(), max: 65535 })?;
                o.put(&[section::COMMAND]);
                o.put(&cmd.to_be_bytes());
                o.put(&len.to_be_bytes());
                o.put(data);
            }
            Record::Eof => o.put(&[section::EOF]),
            Record::VmDescription { json } => {
                let len = u32::try_from(json.len())
                    .map_err(|_| EncodeError::NameTooLong { len: json.len(), max: u32::MAX as usize })?;
                o.put(&[section::VMDESCRIPTION]);
                o.put(&len.to_be_bytes());
                o.put(json);
            }
            Record::Raw { bytes } => o.put(bytes),
        }
        Ok(o.n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// An owned copy of an event, for comparing whole event sequences.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        Config(Vec<u8>),
        Start(u32, Vec<u8>),
        Part(u32),
        Skipped(u32, u64),
        Footer(u32),
        Total(u64),
        Block(Vec<u8>, u64),
        Zero(Vec<u8>, u64),
        Page(Vec<u8>, u64, Vec<u8>),
        Flush,
        Eos,
        Cmd(u16),
        Eof,
        Desc(Vec<u8>),
    }

    /// Parses `stream` in chunks of `chunk` bytes, merging page and JSON fragments.
    fn parse(stream: &[u8], chunk: usize) -> Result<Vec<Ev>, (StreamError, u64)> {
        let mut p = StreamParser::new(StreamConfig::default());
        let mut out: Vec<Ev> = Vec::new();
        for mut c in stream.chunks(chunk) {
            while !c.is_empty() {
                let (n, ev) = match p.feed(c) {
                    Ok(r) => r,
                    Err(e) => return Err((e, p.item_position())),
                };
                assert!(n > 0);
                match ev {
                    None => {}
                    Some(Event::Configuration { machine }) => out.push(Ev::Config(machine.to_vec())),
                    Some(Event::SectionStart { section_id, name, .. }) => {
                        out.push(Ev::Start(section_id, name.to_vec()));
                    }
                    Some(Event::SectionPart { section_id, .. }) => out.push(Ev::Part(section_id)),
                    Some(Event::SectionSkipped { section_id, bytes }) => out.push(Ev::Skipped(section_id, bytes)),
                    Some(Event::Footer { section_id }) => out.push(Ev::Footer(section_id)),
                    Some(Event::RamTotal { total }) => out.push(Ev::Total(total)),
                    Some(Event::BlockDeclared { name, used_length }) => out.push(Ev::Block(name.to_vec(), used_length)),
                    Some(Event::ZeroPage { block, offset }) => out.push(Ev::Zero(block.to_vec(), offset)),
                    Some(Event::PageData { block, offset, at, data }) => {
                        if at == 0 {
                            out.push(Ev::Page(block.to_vec(), offset, Vec::new()));
                        }
                        let Some(Ev::Page(_, _, d)) = out.last_mut() else { panic!("fragment without a page") };
                        assert_eq!(d.len(), at as usize);
                        d.extend_from_slice(data);
                    }
                    Some(Event::MultifdFlush) => out.push(Ev::Flush),
                    Some(Event::Eos) => out.push(Ev::Eos),
                    Some(Event::Command { cmd, .. }) => out.push(Ev::Cmd(cmd)),
                    Some(Event::Eof) => out.push(Ev::Eof),
                    Some(Event::VmDescription { .. }) => out.push(Ev::Desc(Vec::new())),
                    Some(Event::VmDescriptionData { data }) => {
                        let Some(Ev::Desc(d)) = out.last_mut() else { panic!("JSON without header") };
                        d.extend_from_slice(data);
                    }
                }
                c = &c[n..];
            }
        }
        p.finish().map_err(|e| (e, p.position()))?;
        Ok(out)
    }

    fn emit(records: &[Record<'_>], page: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for r in records {
            let mut buf = std::vec![0u8; r.encoded_len()];
            assert_eq!(r.encode(&mut buf, 4096), Ok(buf.len()));
            v.extend_from_slice(&buf);
            if matches!(r, Record::PageHeader { .. }) {
                v.extend_from_slice(page);
            }
        }
        v
    }

    fn sample() -> (Vec<u8>, Vec<u8>) {
        let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let body = [0x7e, 0, 0, 0, 8, 0x7e, 0x7e, 0, 0, 0]; // near-misses of footer(9)
        let recs = [
            Record::FileHeader,
            Record::Configuration { machine: b"none" },
            Record::SectionStart { full: false, section_id: 1, name: b"ram", instance_id: 0, version_id: 4 },
            Record::MemSize { total: 0x3000 },
            Record::BlockEntry { name: b"m0", used_length: 0x2000 },
            Record::BlockEntry { name: b"rom", used_length: 0x1000 },
            Record::MultifdFlush,
            Record::Eos,
            Record::Footer { section_id: 1 },
            Record::SectionPart { end: false, section_id: 1 },
            Record::PageHeader { block: Some(b"m0"), offset: 0x1000 },
            Record::ZeroPage { block: None, offset: 0 },
            Record::Eos,
            Record::Footer { section_id: 1 },
            Record::Command { cmd: 11, data: &[] },
            Record::SectionPart { end: true, section_id: 1 },
            // CONTINUE refers to the block named in the previous section.
            Record::ZeroPage { block: None, offset: 0x1000 },
            Record::MultifdFlush,
            Record::Eos,
            Record::Footer { section_id: 1 },
            Record::SectionStart { full: true, section_id: 9, name: b"dev", instance_id: 0, version_id: 2 },
            Record::Raw { bytes: &body },
            Record::Footer { section_id: 9 },
            Record::Eof,
            Record::VmDescription { json: b"{\"page_size\":4096}" },
        ];
        (emit(&recs, &page), page)
    }

    #[test]
    fn emitted_stream_parses_in_any_chunking() {
        let (stream, page) = sample();
        let expected = std::vec![
            Ev::Config(b"none".to_vec()),
            Ev::Start(1, b"ram".to_vec()),
            Ev::Total(0x3000),
            Ev::Block(b"m0".to_vec(), 0x2000),
            Ev::Block(b"rom".to_vec(), 0x1000),
            Ev::Flush,
            Ev::Eos,
            Ev::Footer(1),
            Ev::Part(1),
            Ev::Page(b"m0".to_vec(), 0x1000, page.clone()),
            Ev::Zero(b"m0".to_vec(), 0),
            Ev::Eos,
            Ev::Footer(1),
            Ev::Cmd(11),
            Ev::Part(1),
            Ev::Zero(b"m0".to_vec(), 0x1000),
            Ev::Flush,
            Ev::Eos,
            Ev::Footer(1),
            Ev::Start(9, b"dev".to_vec()),
            Ev::Skipped(9, 10),
            Ev::Eof,
            Ev::Desc(b"{\"page_size\":4096}".to_vec()),
        ];
        for chunk in [1, 2, 3, 7, 100, 4097, stream.len()] {
            assert_eq!(parse(&stream, chunk).as_ref(), Ok(&expected), "chunk {chunk}");
        }
    }

    /// A stream whose only device section is QEMU's `timer` (version 2) with `payload`.
    fn with_timer(payload: &[u8]) -> Vec<u8> {
        let recs = [
            Record::FileHeader,
            Record::Configuration { machine: b"none" },
            Record::SectionStart { full: true, section_id: 0, name: b"timer", instance_id: 0, version_id: 2 },
            Record::Raw { bytes: payload },
            Record::Footer { section_id: 0 },
            Record::Eof,
        ];
        emit(&recs, &[])
    }

    #[test]
    fn the_timer_section_is_skipped_by_length_even_when_it_holds_a_footer_lookalike() {
        // Tick offset ending in 0x7e, then the zero field: the bytes of section 0's footer.
        let mut payload = [0u8; 24];
        payload[7] = 0x7e;
        let expected = std::vec![
            Ev::Config(b"none".to_vec()),
            Ev::Start(0, b"timer".to_vec()),
            Ev::Skipped(0, 24),
            Ev::Footer(0),
            Ev::Eof,
        ];
        for chunk in [1, 5, 9, 64] {
            assert_eq!(parse(&with_timer(&payload), chunk).as_ref(), Ok(&expected), "chunk {chunk}");
        }
        // A timer payload of another length is an error naming the section and the byte found.
        let short = with_timer(&payload[..23]);
        assert!(
            matches!(parse(&short, 64), Err((StreamError::MissingFooter { section: 0, found: 0 }, _))),
            "{:?}",
            parse(&short, 64)
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (stream, _) = sample();
        // The stream may end cleanly right after EOF (the JSON is optional) and at the end.
        let eof_end = stream.len() - (5 + 18);
        // Under Miri every cut costs a full interpreted parse; a prime stride still covers every
        // record kind. Natively every cut is tried.
        let stride = if cfg!(miri) { 211 } else { 1 };
        let cuts = (0..stream.len()).step_by(stride).chain([eof_end, stream.len() - 1]);
        for cut in cuts {
            let r = parse(&stream[..cut], 64);
            if cut == eof_end {
                assert!(r.is_ok());
            } else {
                assert!(matches!(r, Err((StreamError::Truncated { .. }, _))), "cut {cut}: {r:?}");
            }
        }
    }

    #[test]
    fn errors_name_values() {
        let (stream, _) = sample();
        let mut bad = stream.clone();
        bad[0] = b'X';
        assert_eq!(parse(&bad, 9), Err((StreamError::BadMagic { found: 0x5845_564d }, 0)));
        let mut bad = stream.clone();
        bad[7] = 2;
        assert_eq!(parse(&bad, 9), Err((StreamError::BadVersion { found: 2 }, 0)));
        let mut bad = stream.clone();
        bad[8] = 1;
        assert_eq!(parse(&bad, 9), Err((StreamError::MissingConfiguration { found: 1 }, 8)));
        // MEM_SIZE record -> XBZRLE.
        let at = 8 + 9 + 17;
        let mut bad = stream.clone();
        bad[at + 7] = 0x40;
        assert!(matches!(parse(&bad, 9), Err((StreamError::UnsupportedRamFlags { flags: 0x40, offset: 0x3000 }, _))));
        // First block entry larger than the total.
        let mut bad = stream.clone();
        bad[at + 8 + 3 + 5] = 0x40;
        assert!(matches!(
            parse(&bad, 9),
            Err((StreamError::BlockListOverrun { used_length: 0x40_2000, remaining: 0x3000 }, _))
        ));
        // A CONTINUE record before any block was named.
        let recs = [
            Record::FileHeader,
            Record::Configuration { machine: b"none" },
            Record::SectionStart { full: false, section_id: 1, name: b"ram", instance_id: 0, version_id: 4 },
            Record::ZeroPage { block: None, offset: 0x2000 },
        ];
        assert!(matches!(parse(&emit(&recs, &[]), 5), Err((StreamError::NoCurrentBlock { offset: 0x2000 }, _))));
        let recs = [Record::FileHeader, Record::Configuration { machine: b"none" }, Record::Footer { section_id: 3 }];
        assert!(matches!(parse(&emit(&recs, &[]), 5), Err((StreamError::UnexpectedFooter { found: 3 }, _))));
    }

    #[test]
    fn footer_scan_handles_self_overlap() {
        // Pattern 7e 00 00 7e 7e? Section id 0x00007e7e: pattern 7e 00 00 7e 7e.
        let pat = footer_pattern(0x7e7e);
        let body = [0x7e, 0x00, 0x00, 0x7e, 0x00, 0x00, 0x7e, 0x7e];
        let mut m = 0;
        let mut hit = None;
        for (i, &b) in body.iter().enumerate() {
            m = advance_match(&pat, m, b);
            if m == 5 {
                hit = Some(i);
                break;
            }
        }
        assert_eq!(hit, Some(7));
    }

    #[test]
    fn encoder_refuses_bad_input() {
        let mut buf = [0u8; 16];
        assert_eq!(
            Record::PageHeader { block: None, offset: 0x1001 }.encode(&mut buf, 4096),
            Err(EncodeError::Misaligned { offset: 0x1001 })
        );
        assert_eq!(
            Record::FileHeader.encode(&mut buf[..7], 4096),
            Err(EncodeError::BufferTooSmall { need: 8, have: 7 })
        );
    }
}
