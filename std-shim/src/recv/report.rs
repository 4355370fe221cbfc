//! What `multifd recv` reports, complete or failed, and its JSON form.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

use super::Failure;

/// One block in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockReport {
    /// The block's idstr (lossy UTF-8).
    pub name: String,
    /// The file written (or that would have been written).
    pub file: PathBuf,
    /// Bytes.
    pub size: u64,
    /// Pages.
    pub pages: u64,
    /// Pages marked received.
    pub received_pages: u64,
}

/// One channel in the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ChannelReport {
    /// The channel id.
    pub id: u8,
    /// Packets received.
    pub packets: u64,
    /// Data pages.
    pub normal_pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Bytes after the init packet.
    pub bytes: u64,
    /// The compression method of its data packets (`none`, `zlib`, `zstd`; `none` before any).
    pub compression: &'static str,
    /// Payload bytes of its compressed packets.
    pub compressed_bytes: u64,
    /// What those payloads decompressed to (their pages' bytes).
    pub raw_bytes: u64,
}

/// What a receive did (complete or, inside [`Failed`], up to the failure).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    /// Wall time from the call.
    pub seconds: f64,
    /// Bytes received over all connections.
    pub bytes: u64,
    /// Blocks.
    pub blocks: Vec<BlockReport>,
    /// Pages received as data (channels and main stream).
    pub normal_pages: u64,
    /// Zero pages received (channels and main stream).
    pub zero_pages: u64,
    /// Multifd packets.
    pub packets: u64,
    /// Sync epochs released.
    pub sync_epochs: u32,
    /// The compression method of the channels' data (`none`, `zlib`, `zstd`, or `mixed` if channels
    /// differed).
    pub compression: &'static str,
    /// Compressed payload bytes, all channels.
    pub compressed_bytes: u64,
    /// What they decompressed to.
    pub raw_bytes: u64,
    /// Per channel.
    pub channels: Vec<ChannelReport>,
    /// The bound address.
    #[serde(skip)]
    pub bound: Option<SocketAddr>,
}

/// A receive that failed: the error, and what had happened until then.
#[derive(Debug)]
pub struct Failed {
    /// Why.
    pub error: Failure,
    /// What was received before.
    pub report: Report,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Failed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// What [`run_with`](super::run_with) returns.
pub type Outcome = Result<Report, Box<Failed>>;

/// The outcome as one JSON-serialisable object: `status`, `error` (text or null), then the report.
#[derive(Debug, Serialize)]
pub struct Summary<'a> {
    /// `completed` or `failed`.
    pub status: &'static str,
    /// The failure's message.
    pub error: Option<String>,
    /// The report.
    #[serde(flatten)]
    pub report: &'a Report,
}

/// The [`Summary`] of `outcome`.
pub fn summary(outcome: &Outcome) -> Summary<'_> {
    match outcome {
        Ok(report) => Summary { status: "completed", error: None, report },
        Err(f) => Summary { status: "failed", error: Some(f.error.to_string()), report: &f.report },
    }
}

/// The one-line summary of a completed receive, e.g. `1 block (16.0 MiB, 4096 pages) in 0.41 s,
/// 39.0 MiB/s, 3 sync epochs`.
pub fn completed_line(r: &Report) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let (size, pages) = r.blocks.iter().fold((0, 0), |(s, p), b| (s + b.size, p + b.pages));
    let n = r.blocks.len();
    let rate = if r.seconds > 0.0 { mib(r.bytes) / r.seconds } else { 0.0 };
    let compressed = if r.raw_bytes > 0 {
        format!(
            ", {}: {:.1} MiB of pages in {:.1} MiB ({:.0}%)",
            r.compression,
            mib(r.raw_bytes),
            mib(r.compressed_bytes),
            100.0 * r.compressed_bytes as f64 / r.raw_bytes as f64
        )
    } else {
        String::new()
    };
    format!(
        "{n} block{} ({:.1} MiB, {pages} page{}) in {:.2} s, {rate:.1} MiB/s on the wire, {} sync epoch{}{compressed}",
        if n == 1 { "" } else { "s" },
        mib(size),
        if pages == 1 { "" } else { "s" },
        r.seconds,
        r.sync_epochs,
        if r.sync_epochs == 1 { "" } else { "s" },
    )
}
