//! `multifd demo`: a whole migration on loopback. A deterministic guest image is generated, sent by
//! this crate's sender (iterative precopy, pages dirtied between rounds) to this crate's receiver
//! (`multifd recv`'s engine, on a thread), and the received block is checked byte for byte against the
//! sender's final image. Prints a summary table (or JSON).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use multifd_core::send::{Precopy, Quiescent, RoundStats, Step};

use crate::recv;
use crate::send::{
    GuestImage, ImageSet, SendFailure, SendJson, SendLimits, SendOptions, SendReport, format_report, migrate_with,
};
use serde::Serialize;

const PAGE: usize = 4096;

/// Options of `multifd demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Guest RAM bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Multifd channels.
    pub channels: u8,
    /// Rounds sent, the final one included (at least 2: the full round and the final one).
    pub rounds: u32,
    /// Share of zero pages in the image, in percent.
    pub zero_percent: u32,
    /// Seed of the image and of the pages dirtied between rounds.
    pub seed: u64,
    /// JSON instead of a table (the receiver then shows no progress line).
    pub json: bool,
    /// Compression of the channels (level 1, QEMU's default).
    pub compression: multifd_core::wire::Compression,
}

/// xorshift64: deterministic and fast.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The demo's guest image: about `zero_percent`% zero pages, the rest pseudo-random.
pub fn generate_image(size: usize, zero_percent: u32, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = vec![0u8; size];
    for page in out.chunks_mut(PAGE) {
        if rng.next() % 100 < u64::from(zero_percent) {
            continue;
        }
        for w in page.chunks_mut(8) {
            let v = rng.next().to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
    }
    out
}

/// Between rounds about 2% of the pages are dirtied (a quarter of them become zero pages).
struct DemoPrecopy<'i> {
    images: &'i ImageSet,
    pages: usize,
    rounds: u32,
    rng: Rng,
    bitmaps: Vec<Vec<u64>>,
}

impl Precopy for DemoPrecopy<'_> {
    fn dirty(&mut self, round: u32, _block: usize) -> &[u64] {
        let words = self.pages.div_ceil(64);
        while self.bitmaps.len() <= round as usize {
            let b = if self.bitmaps.is_empty() { vec![u64::MAX; words] } else { vec![0; words] };
            self.bitmaps.push(b);
        }
        &self.bitmaps[round as usize]
    }

    fn between_rounds(&mut self, round: u32, q: &Quiescent<'_>) {
        let next = round as usize + 1;
        self.dirty(round + 1, 0);
        let mem = &self.images.blocks[0].1;
        let mut page = vec![0u8; PAGE];
        for _ in 0..(self.pages / 50).max(1) {
            let i = (self.rng.next() % self.pages as u64) as usize;
            self.bitmaps[next][i / 64] |= 1 << (i % 64);
            if self.rng.next().is_multiple_of(4) {
                page.fill(0);
            } else {
                for w in page.chunks_mut(8) {
                    w.copy_from_slice(&self.rng.next().to_le_bytes());
                }
            }
            mem.write(q, i * PAGE, &page);
        }
    }

    fn round_done(&mut self, stats: &RoundStats) -> Step {
        if stats.round + 2 >= self.rounds { Step::Complete } else { Step::Iterate }
    }
}

/// Why the demo failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum DemoError {
    /// The guest size does not fit this machine's address space.
    TooLarge {
        /// Bytes asked for.
        size: u64,
    },
    /// A file of the demo's work directory.
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The receiver failed (and what the sender said, if it failed too).
    Receiver(Box<recv::Failed>, Option<SendFailure>),
    /// The receiver did not report its port within 10 s.
    NoPort,
    /// The receiver's thread panicked.
    ReceiverPanicked,
    /// The sender failed.
    Sender(SendFailure),
    /// The received block is not the sender's final image.
    Differs {
        /// Pages that differ.
        pages: u64,
        /// The first of them.
        first: usize,
    },
    /// The received block has another length than the image.
    Length {
        /// Bytes received.
        got: usize,
        /// Bytes of the image.
        want: usize,
    },
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { size } => write!(f, "size {size} does not fit in memory"),
            Self::Io { path, error } => write!(f, "{}: {error}", path.display()),
            Self::Receiver(r, None) => write!(f, "receiver: {} (sender: ok)", r.error),
            Self::Receiver(r, Some(s)) => write!(f, "receiver: {} (sender: {s})", r.error),
            Self::NoPort => write!(f, "receiver: it did not report its port"),
            Self::ReceiverPanicked => write!(f, "receiver: its thread panicked"),
            Self::Sender(e) => write!(f, "sender: {e}"),
            Self::Differs { pages, first } => {
                write!(f, "verification failed: {pages} pages differ from the sender's final image, first page {first}")
            }
            Self::Length { got, want } => write!(f, "verification failed: {got} bytes received, {want} expected"),
        }
    }
}

impl std::error::Error for DemoError {}

/// What a demo run did: both sides' reports, verified byte for byte.
#[derive(Debug)]
pub struct DemoReport {
    /// The options it ran with.
    pub opts: DemoOptions,
    /// The sender's report.
    pub send: SendReport,
    /// The receiver's report.
    pub recv: recv::Report,
    /// Seconds spent generating the image.
    pub image_seconds: f64,
}

/// [`DemoReport`] as JSON.
#[derive(Debug, Serialize)]
pub struct DemoJson<'a> {
    /// The sender's summary.
    pub sender: SendJson,
    /// The receiver's summary.
    pub receiver: recv::Summary<'a>,
    /// How the destination was checked.
    pub verified: &'static str,
    /// Guest bytes.
    pub size: u64,
    /// Seconds spent generating the image.
    pub image_seconds: f64,
}

impl DemoReport {
    /// The JSON form.
    pub fn json(&self) -> DemoJson<'_> {
        DemoJson {
            sender: SendJson::completed(&self.send, PAGE as u32),
            receiver: recv::Summary { status: "completed", error: None, report: &self.recv },
            verified: "byte-exact",
            size: self.opts.size,
            image_seconds: self.image_seconds,
        }
    }

    /// The summary table.
    pub fn text(&self) -> String {
        let (o, r) = (&self.opts, &self.recv);
        format!(
            "multifd demo: {} MiB guest, {} channel{}, {}% zero pages, seed {}\n{}{}{:<22} {} sync epoch{}, {} packets, {:.3} s from listening to block file written\n{:<22} byte-exact ({} pages)\n",
            o.size >> 20,
            o.channels,
            if o.channels == 1 { "" } else { "s" },
            o.zero_percent,
            o.seed,
            format_report(&self.send, PAGE as u32),
            channel_balance(&r.channels),
            "receiver",
            r.sync_epochs,
            if r.sync_epochs == 1 { "" } else { "s" },
            r.packets,
            r.seconds,
            "verification",
            o.size / PAGE as u64
        )
    }
}

/// Runs the demo in a fresh directory under the system's temporary directory (`TMPDIR`): a new
/// directory of a random `multifd-demo-*` name, created by this call alone (never one that already
/// exists, nor a symbolic link's target), readable by this user only, and removed at the end.
pub fn run(opts: &DemoOptions) -> Result<DemoReport, DemoError> {
    let size = usize::try_from(opts.size).map_err(|_| DemoError::TooLarge { size: opts.size })?;
    let dir = work_dir()?;
    let result = demo_in(opts, size, dir.path());
    // A failure to remove it leaves a private directory behind; the demo's result stands.
    let _ = dir.close();
    result
}

/// The demo's work directory: see [`run`].
fn work_dir() -> Result<tempfile::TempDir, DemoError> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix("multifd-demo-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .map_err(|error| DemoError::Io { path: std::env::temp_dir(), error })
}

fn demo_in(opts: &DemoOptions, size: usize, dir: &std::path::Path) -> Result<DemoReport, DemoError> {
    let t_gen = Instant::now();
    let image = generate_image(size, opts.zero_percent, opts.seed);
    let image_seconds = t_gen.elapsed().as_secs_f64();
    let mut images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image))] };
    let (port_file, out) = (dir.join("port"), dir.join("out"));
    let ropts = recv::Options {
        listen: "127.0.0.1:0".into(),
        channels: opts.channels,
        out: out.clone(),
        uuid: None,
        page_size: PAGE as u32,
        port_file: Some(port_file.clone()),
        prealloc: Vec::new(),
        // The receiver's progress line (a bar on a terminal) is the demo's progress display.
        progress: !opts.json,
    };
    let (sent, received) = std::thread::scope(|s| {
        let receiver = s.spawn(|| recv::run(&ropts));
        let sent = match wait_port(&port_file, &receiver) {
            Some(port) => send_rounds(opts, size, port, &images),
            None => Err(None),
        };
        (sent, receiver.join())
    });
    let recv = match (received, sent) {
        (Err(_), _) => return Err(DemoError::ReceiverPanicked),
        (Ok(Err(failed)), sent) => return Err(DemoError::Receiver(failed, sent.err().flatten())),
        (Ok(Ok(_)), Err(None)) => return Err(DemoError::NoPort),
        (Ok(Ok(_)), Err(Some(e))) => return Err(DemoError::Sender(e)),
        (Ok(Ok(recv)), Ok(send)) => (recv, send),
    };
    verify(&out.join(recv::block_file_name(b"m0")), images.blocks[0].1.as_bytes())?;
    Ok(DemoReport { opts: opts.clone(), send: recv.1, recv: recv.0, image_seconds })
}

/// The receiver's port, once its port file is written; `None` if it ended or took over 10 s.
fn wait_port<T>(port_file: &std::path::Path, receiver: &std::thread::ScopedJoinHandle<'_, T>) -> Option<u16> {
    let t0 = Instant::now();
    loop {
        if let Some(p) = std::fs::read_to_string(port_file).ok().and_then(|t| t.trim().parse::<u16>().ok()) {
            return Some(p);
        }
        if receiver.is_finished() || t0.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The sender's rounds into the receiver on `port`.
fn send_rounds(
    opts: &DemoOptions,
    size: usize,
    port: u16,
    images: &ImageSet,
) -> Result<SendReport, Option<SendFailure>> {
    let sopts = SendOptions {
        connect: ([127, 0, 0, 1], port).into(),
        channels: opts.channels,
        uuid: [0; 16],
        machine: "none".into(),
        page_size: PAGE as u32,
    };
    let mut emb = DemoPrecopy {
        images,
        pages: size / PAGE,
        rounds: opts.rounds.max(2),
        rng: Rng::new(opts.seed ^ 0xd1b5_4a32_d192_ed03),
        bitmaps: Vec::new(),
    };
    let limits = SendLimits { compression: opts.compression, ..SendLimits::default() };
    migrate_with(&sopts, &limits, images, &mut emb, &AtomicBool::new(false)).map_err(Some)
}

/// Checks the received block file against the sender's final image, page by page.
fn verify(file: &std::path::Path, expected: &[u8]) -> Result<(), DemoError> {
    let io = |error| DemoError::Io { path: file.to_path_buf(), error };
    let mut f = File::open(file).map_err(io)?;
    let (mut bad, mut first_bad, mut buf, mut at) = (0u64, None, vec![0u8; 1 << 20], 0usize);
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        let Some(want) = expected.get(at..at + n) else {
            return Err(DemoError::Length { got: at + n, want: expected.len() });
        };
        for (k, (a, b)) in buf[..n].chunks(PAGE).zip(want.chunks(PAGE)).enumerate() {
            if a != b {
                bad += 1;
                first_bad.get_or_insert(at / PAGE + k);
            }
        }
        at += n;
    }
    if at != expected.len() {
        return Err(DemoError::Length { got: at, want: expected.len() });
    }
    match first_bad {
        Some(first) => Err(DemoError::Differs { pages: bad, first }),
        None => Ok(()),
    }
}

/// The per-channel balance table: what each channel carried, as seen by the receiver, and its share
/// of the data pages (an even spread is 100/N % each).
pub fn channel_balance(channels: &[recv::ChannelReport]) -> String {
    let total: u64 = channels.iter().map(|c| c.normal_pages).sum();
    let mut out = String::from("channel    packets     normal       zero    MiB   share\n");
    for c in channels {
        let share = if total == 0 { 0.0 } else { 100.0 * c.normal_pages as f64 / total as f64 };
        out += &format!(
            "{:>7} {:>10} {:>10} {:>10} {:>6.1} {:>6.1}%\n",
            c.id,
            c.packets,
            c.normal_pages,
            c.zero_pages,
            c.bytes as f64 / (1024.0 * 1024.0),
            share
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_work_directory_is_new_private_and_removed_when_dropped() {
        let (a, b) = (work_dir().unwrap(), work_dir().unwrap());
        assert_ne!(a.path(), b.path(), "two runs got the same directory");
        for d in [&a, &b] {
            let name = d.path().file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with("multifd-demo-") && name.len() > "multifd-demo-".len(), "{name}");
            let meta = std::fs::symlink_metadata(d.path()).unwrap();
            assert!(meta.is_dir(), "{name} is not a plain directory");
            assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{name}");
        }
        let path = a.path().to_path_buf();
        a.close().unwrap();
        assert!(!path.exists(), "{} left behind", path.display());
    }
}
