//! `multifd demo`: a whole migration on loopback. A deterministic guest image is generated, sent by
//! this crate's sender (iterative precopy, pages dirtied between rounds) to this crate's receiver
//! (`multifd recv`'s engine, on a thread), and the received block is checked byte for byte against the
//! sender's final image. Prints a summary table (or JSON).

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use multifd_core::send::{Precopy, Quiescent, RoundStats, Step};

use crate::recv;
use crate::send::{GuestImage, ImageSet, SendOptions, format_report, migrate};

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
    /// JSON instead of a table.
    pub json: bool,
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

/// Parses a size such as `64M`, `1G`, `4096` (K, M, G: binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| format!("size {s:?}: not a number with an optional K/M/G suffix"))?;
    let bytes = n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("size {s:?} overflows"))?;
    if bytes == 0 || !bytes.is_multiple_of(PAGE as u64) {
        return Err(format!("size {s:?}: {bytes} bytes is not a positive multiple of 4096"));
    }
    Ok(bytes)
}

/// Runs the demo; returns the process exit code (0 only if the destination is byte-exact).
pub fn run(opts: &DemoOptions) -> i32 {
    match demo(opts) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(e) => {
            eprintln!("multifd demo: {e}");
            1
        }
    }
}

fn demo(opts: &DemoOptions) -> Result<String, String> {
    let size = usize::try_from(opts.size).map_err(|_| format!("size {} does not fit in memory", opts.size))?;
    let dir = std::env::temp_dir().join(format!("multifd-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = demo_in(opts, size, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo_in(opts: &DemoOptions, size: usize, dir: &std::path::Path) -> Result<String, String> {
    let t_gen = Instant::now();
    let image = generate_image(size, opts.zero_percent, opts.seed);
    let gen_secs = t_gen.elapsed().as_secs_f64();
    let mut images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image))] };
    let port_file = dir.join("port");
    let out = dir.join("out");
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
    let (send_result, recv_report) = std::thread::scope(|s| {
        let receiver = s.spawn(|| recv::run(&ropts));
        let t0 = Instant::now();
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file).ok().and_then(|t| t.trim().parse::<u16>().ok()) {
                break Some(p);
            }
            if receiver.is_finished() || t0.elapsed() > Duration::from_secs(10) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let send_result = match port {
            Some(port) => {
                let sopts = SendOptions {
                    connect: ([127, 0, 0, 1], port).into(),
                    channels: opts.channels,
                    uuid: [0; 16],
                    machine: "none".into(),
                    page_size: PAGE as u32,
                };
                let mut emb = DemoPrecopy {
                    images: &images,
                    pages: size / PAGE,
                    rounds: opts.rounds.max(2),
                    rng: Rng::new(opts.seed ^ 0xd1b5_4a32_d192_ed03),
                    bitmaps: Vec::new(),
                };
                migrate(&sopts, &images, &mut emb, &AtomicBool::new(false)).map_err(|e| e.to_string())
            }
            None => Err("the receiver did not report its port".to_owned()),
        };
        (send_result, receiver.join().map_err(|_| "the receiver thread panicked".to_owned()))
    });
    let recv_report = recv_report?;
    if let Some(e) = &recv_report.error {
        return Err(format!("receiver: {e} (sender: {})", send_result.err().unwrap_or_else(|| "ok".into())));
    }
    let report = send_result.map_err(|e| format!("sender: {e}"))?;
    // Verify: the received block file against the sender's final image, page by page.
    let file: PathBuf = out.join(recv::block_file_name(b"m0"));
    let expected = images.blocks[0].1.as_bytes();
    let mut f = File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let (mut bad, mut first_bad, mut buf, mut at) = (0u64, None, vec![0u8; 1 << 20], 0usize);
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", file.display()))?;
        if n == 0 {
            break;
        }
        let want = expected.get(at..at + n).ok_or_else(|| format!("{} is longer than the image", file.display()))?;
        for (k, (a, b)) in buf[..n].chunks(PAGE).zip(want.chunks(PAGE)).enumerate() {
            if a != b {
                bad += 1;
                first_bad.get_or_insert(at / PAGE + k);
            }
        }
        at += n;
    }
    if at != expected.len() {
        return Err(format!("{}: {at} bytes received, {} expected", file.display(), expected.len()));
    }
    if bad > 0 {
        return Err(format!(
            "verification failed: {bad} pages differ from the sender's final image, first page {first_bad:?}"
        ));
    }
    let mut text = format_report(&report, PAGE as u32, opts.json);
    let balance = channel_balance(&recv_report.channels);
    if opts.json {
        text = format!(
            "{{\"sender\":{},\"receiver\":{},\"verified\":\"byte-exact\",\"size\":{},\"image_seconds\":{gen_secs:.3}}}\n",
            text.trim_end(),
            recv_report.to_json(),
            opts.size
        );
    } else {
        text = format!(
            "multifd demo: {} MiB guest, {} channels, {}% zero pages, seed {}\n{text}{balance}{:<22} {} epochs, {} packets, {:.3} s from listening to block file written\n{:<22} byte-exact ({} pages)\n",
            opts.size >> 20,
            opts.channels,
            opts.zero_percent,
            opts.seed,
            "receiver",
            recv_report.sync_epochs,
            recv_report.packets,
            recv_report.seconds,
            "verification",
            size / PAGE
        );
    }
    Ok(text)
}

/// The per-channel balance table: what each channel carried, as seen by the receiver, and its share
/// of the data pages (an even spread is 100/N % each).
pub fn channel_balance(channels: &[(u8, multifd_core::recv::ChannelStats)]) -> String {
    let total: u64 = channels.iter().map(|(_, c)| c.normal_pages).sum();
    let mut out = String::from("channel    packets     normal       zero    MiB   share\n");
    for (id, c) in channels {
        let share = if total == 0 { 0.0 } else { 100.0 * c.normal_pages as f64 / total as f64 };
        out += &format!(
            "{:>7} {:>10} {:>10} {:>10} {:>6.1} {:>6.1}%\n",
            id,
            c.packets,
            c.normal_pages,
            c.zero_pages,
            c.bytes as f64 / (1024.0 * 1024.0),
            share
        );
    }
    out
}
