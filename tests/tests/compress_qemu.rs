//! QEMU multifd compression (`multifd-compression` zlib and zstd) against a real QEMU 10.0 and
//! between our own sender and receiver:
//! - a QEMU source (`-M none`, file-backed RAM holding a mixed image: about 40% zero pages, 30%
//!   text-like compressible pages, 30% random pages) into `multifd recv`, zlib at levels 1 and 9 and
//!   zstd at levels 1 and 19, with 1 and 4 channels: the block file equals the image and the JSON
//!   report names the method and counts fewer compressed bytes than page bytes;
//! - `multifd send --compression zlib|zstd` into a QEMU destination set the same way: the
//!   destination's RAM file equals the image;
//! - our sender into our receiver with both methods (command line), byte-exact, the two reports
//!   agreeing on the compressed and raw byte counts; levels out of range are usage errors;
//! - several rounds with pages dirtied between them, compressed, through the library, byte-exact
//!   with the final image (each channel's stream runs across all rounds);
//! - refusals with a real QEMU source: `--compression none` against zlib, and `--zstd-max-window 1M`
//!   against zstd level 19 (its 8 MiB window), each a one-line error and no block file; the same
//!   level-19 source is accepted with a window of exactly 8 MiB.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use multifd_core::send::{Precopy, Quiescent, RoundStats, Step};
use multifd_core::wire::Compression;
use multifd_std::recv;
use multifd_std::send::{GuestImage, ImageSet, SendLimits, SendOptions, migrate_with};
use multifd_tests::qemu::{Qemu, Recv, SourceConfig, json_field, json_num, json_status, multifd_bin, temp_dir};
use multifd_tests::qemu_dest::{QemuDest, differing_pages};
use multifd_tests::{require_tool, with_deadline};
use serde_json::Value;

const PAGE: usize = 4096;
/// The shared image of the QEMU-source matrix, in MiB.
const MIB: usize = 64;
/// Bytes of the shared image that our sender migrates (the debug build's codecs are slower).
const SEND_SIZE: usize = 32 << 20;
/// `max-bandwidth` raised (64 GiB/s) so the default 128 MiB/s throttle does not slow the tests.
const FAST: u64 = 64 << 30;
const QEMU: &str = "qemu-system-x86_64";

// ---------------------------------------------------------------------------------------------
// Images

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

const WORDS: &[&str] = &[
    "the",
    "guest",
    "page",
    "migration",
    "channel",
    "multifd",
    "packet",
    "sync",
    "epoch",
    "zero",
    "memory",
    "block",
    "stream",
    "source",
    "destination",
    "offset",
    "header",
    "flags",
    "round",
    "dirty",
    "bitmap",
    "receiver",
    "sender",
    "of",
    "and",
    "to",
    "in",
    "is",
    "a",
    "QEMU",
    "RAM",
    "zlib",
    "zstd",
    "window",
    "level",
    "frame",
    "deflate",
    "4096",
    "0x11223344",
    "completed",
    "active",
    "setup",
    "device",
    "state",
    "kernel",
    "buffer",
    "thread",
    "socket",
    "loopback",
];

/// Fills `page` with words from [`WORDS`], spaces and line breaks: compressible, not trivially so.
fn text_page(rng: &mut Rng, page: &mut [u8]) {
    let mut at = 0;
    let mut col = 0;
    while at < page.len() {
        let r = rng.next();
        let word = WORDS[(r % WORDS.len() as u64) as usize].as_bytes();
        col += word.len() + 1;
        let sep = if col > 72 {
            col = 0;
            b'\n'
        } else {
            b' '
        };
        for &b in word.iter().chain(std::iter::once(&sep)) {
            if at == page.len() {
                break;
            }
            page[at] = b;
            at += 1;
        }
    }
}

fn random_page(rng: &mut Rng, page: &mut [u8]) {
    for w in page.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        w.copy_from_slice(&v[..w.len()]);
    }
}

/// A deterministic image of `bytes`: about 40% zero pages, 30% text-like pages, 30% random pages.
fn mixed_image(seed: u64, bytes: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = vec![0u8; bytes];
    for page in out.chunks_mut(PAGE) {
        match rng.next() % 100 {
            0..40 => {}
            40..70 => text_page(&mut rng, page),
            _ => random_page(&mut rng, page),
        }
    }
    out
}

/// The shared 64 MiB image, made once per test process.
fn image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| mixed_image(0xC0DE, MIB << 20))
}

fn zero_pages(image: &[u8]) -> u64 {
    image.chunks(PAGE).filter(|p| p.iter().all(|&b| b == 0)).count() as u64
}

#[test]
fn the_mixed_image_has_the_intended_mix() {
    let img = mixed_image(0xC0DE, 16 << 20);
    let pages = img.len() / PAGE;
    let zero = zero_pages(&img) as usize;
    let text =
        img.chunks(PAGE).filter(|p| p[0] != 0 && p.iter().all(|b| b.is_ascii_graphic() || b" \n".contains(b))).count();
    let random = pages - zero - text;
    for (what, n, pct) in [("zero", zero, 40), ("text", text, 30), ("random", random, 30)] {
        let got = n * 100 / pages;
        assert!(got.abs_diff(pct) <= 3, "{what} pages: {got}% of {pages}, wanted about {pct}%");
    }
    assert_eq!(mixed_image(0xC0DE, 1 << 20), img[..1 << 20], "deterministic");
}

// ---------------------------------------------------------------------------------------------
// Processes and directories, cleaned up on every path

/// A test directory, removed on drop (also when the test fails).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        Scratch(temp_dir(tag))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `multifd recv`, killed and reaped on drop unless it was waited for.
struct RecvProc(Option<Recv>);

impl RecvProc {
    fn start(dir: &Path, out: &Path, channels: u8, extra: &[&str]) -> Self {
        RecvProc(Some(Recv::start(dir, out, channels, extra)))
    }
    fn port(&self) -> u16 {
        self.0.as_ref().map_or(0, |r| r.port)
    }
    /// (exit code, stdout, stderr), within `secs`.
    fn wait(mut self, secs: u64) -> (Option<i32>, String, String) {
        self.0.take().expect("not waited yet").wait(secs)
    }
}

impl Drop for RecvProc {
    fn drop(&mut self) {
        if let Some(mut r) = self.0.take() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

/// Runs `cmd` with its output captured; kills it and fails the test if it runs past `secs`.
/// Returns (exit code, stdout, stderr).
fn run_bounded(cmd: &mut Command, secs: u64) -> (Option<i32>, String, String) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not exit within {secs} s; stderr: {}", err.join().unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code(), out.join().unwrap_or_default(), err.join().unwrap_or_default())
}

/// Files in `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

/// Sets the source's (or destination's) compression method and level over QMP.
fn set_compression(qemu: &mut Qemu, method: &str, level: u32) {
    let args = format!(r#"{{"multifd-compression":"{method}","multifd-{method}-level":{level}}}"#);
    qemu.cmd(&format!(r#"{{"execute":"migrate-set-parameters","arguments":{args}}}"#));
}

/// The first byte where `got` and `want` differ (the shorter length if their lengths differ).
fn first_diff(got: &[u8], want: &[u8]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}

// ---------------------------------------------------------------------------------------------
// Report checks

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

/// Checks `multifd recv --json` output of a compressed migration over `channels` channels with
/// `method`: the method at the top and on every channel, compressed < raw, and raw equal to the
/// bytes of the data pages, overall and per channel (every data page travelled compressed).
fn check_recv_json(json: &str, method: &str, channels: u8) {
    let doc: Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"));
    assert_eq!(doc.get("compression").and_then(Value::as_str), Some(method), "{json}");
    let (compressed, raw, normal) = (u(&doc, "compressed_bytes"), u(&doc, "raw_bytes"), u(&doc, "normal_pages"));
    assert!(raw > 0, "raw_bytes 0: {json}");
    assert!(compressed < raw, "compressed_bytes {compressed} not below raw_bytes {raw}: {json}");
    assert_eq!(raw, normal * PAGE as u64, "raw_bytes are the data pages' bytes: {json}");
    let per = doc.get("channels").and_then(Value::as_array).unwrap_or_else(|| panic!("no channels: {json}"));
    assert_eq!(per.len(), usize::from(channels), "{json}");
    let (mut c_sum, mut r_sum) = (0, 0);
    for ch in per {
        assert_eq!(ch.get("compression").and_then(Value::as_str), Some(method), "channel {ch}");
        let (c, r) = (u(ch, "compressed_bytes"), u(ch, "raw_bytes"));
        assert_eq!(r, u(ch, "normal_pages") * PAGE as u64, "channel {ch}");
        assert!(r == 0 || c < r, "channel {ch}");
        c_sum += c;
        r_sum += r;
    }
    assert_eq!((c_sum, r_sum), (compressed, raw), "channels add up to the totals: {json}");
}

// ---------------------------------------------------------------------------------------------
// 1. A real QEMU source, compressed, into `multifd recv`

/// A QEMU 10.0 source (`-M none`, the shared 64 MiB mixed image as its file-backed RAM) compressing
/// with `method` at `level` over `channels` channels into `multifd recv` (default options: every
/// method accepted): the migration completes, the block file equals the image byte for byte, every
/// page is received, the zero pages are counted as such, and the JSON report names the method and
/// counts fewer compressed bytes than raw bytes (see [`check_recv_json`]).
fn qemu_source_into_recv(test: &str, method: &str, level: u32, channels: u8) {
    if !require_tool(QEMU, test) {
        return;
    }
    let _ = multifd_bin(); // built before the deadline starts
    let image = image();
    with_deadline(240, test, || {
        let dir = Scratch::new(test);
        let (out, ram) = (dir.0.join("out"), dir.0.join("ram.img"));
        std::fs::write(&ram, image).unwrap();
        let recv = RecvProc::start(&dir.0, &out, channels, &[]);
        let mut qemu = Qemu::source(&dir.0, &SourceConfig { ram, mib: MIB, qtest: None, uuid: None });
        set_compression(&mut qemu, method, level);
        let t0 = Instant::now();
        qemu.migrate(recv.port(), channels, "multifd", FAST, &[]);
        let status = qemu.wait_status(&["completed"], 200);
        let took = t0.elapsed();
        if status != "completed" {
            qemu.kill();
            let (code, json, stderr) = recv.wait(10);
            panic!("{test}: source {status}; multifd recv exited {code:?}: {stderr}\n{json}");
        }
        qemu.quit();
        let (code, json, stderr) = recv.wait(30);
        assert_eq!(code, Some(0), "multifd recv failed: {stderr}\n{json}");
        assert!(json_status(&json, "completed"), "{json}");
        let got = std::fs::read(out.join("m0.bin")).expect("block file m0.bin");
        assert_eq!(first_diff(&got, image), None, "block file differs from the image ({} bytes)", got.len());
        let pages = (MIB << 20) as u64 / PAGE as u64;
        assert_eq!(json_num(&json, "received_pages"), Some(pages), "{json}");
        let zero = zero_pages(image);
        assert_eq!(json_num(&json, "zero_pages"), Some(zero), "{json}");
        assert_eq!(json_num(&json, "normal_pages"), Some(pages - zero), "{json}");
        check_recv_json(&json, method, channels);
        let (c, r) = (json_num(&json, "compressed_bytes").unwrap(), json_num(&json, "raw_bytes").unwrap());
        eprintln!(
            "{test}: {method} level {level}, {channels} ch: {r} -> {c} bytes ({:.0}%) in {took:.2?}",
            100.0 * c as f64 / r as f64
        );
    });
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn qemu_zlib_level_1_one_channel_into_recv() {
    qemu_source_into_recv("qemu_zlib_level_1_one_channel_into_recv", "zlib", 1, 1);
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn qemu_zlib_level_1_four_channels_into_recv() {
    qemu_source_into_recv("qemu_zlib_level_1_four_channels_into_recv", "zlib", 1, 4);
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn qemu_zlib_level_9_one_channel_into_recv() {
    qemu_source_into_recv("qemu_zlib_level_9_one_channel_into_recv", "zlib", 9, 1);
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn qemu_zlib_level_9_four_channels_into_recv() {
    qemu_source_into_recv("qemu_zlib_level_9_four_channels_into_recv", "zlib", 9, 4);
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn qemu_zstd_level_1_one_channel_into_recv() {
    qemu_source_into_recv("qemu_zstd_level_1_one_channel_into_recv", "zstd", 1, 1);
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn qemu_zstd_level_1_four_channels_into_recv() {
    qemu_source_into_recv("qemu_zstd_level_1_four_channels_into_recv", "zstd", 1, 4);
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn qemu_zstd_level_19_one_channel_into_recv() {
    qemu_source_into_recv("qemu_zstd_level_19_one_channel_into_recv", "zstd", 19, 1);
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn qemu_zstd_level_19_four_channels_into_recv() {
    qemu_source_into_recv("qemu_zstd_level_19_four_channels_into_recv", "zstd", 19, 4);
}

// ---------------------------------------------------------------------------------------------
// 2. `multifd send`, compressed, into a real QEMU destination

/// Poison in every page the image has non-zero (the destination must overwrite it); zero pages start
/// zero, as QEMU assumes of a fresh destination.
fn poisoned(image: &[u8]) -> Vec<u8> {
    image.chunks(PAGE).flat_map(|p| if p.iter().all(|&b| b == 0) { [0u8; PAGE] } else { [0x5au8; PAGE] }).collect()
}

/// `multifd send --compression METHOD --compression-level LEVEL` (2 channels, the first 32 MiB of
/// the shared image) into a QEMU 10.0 destination whose `multifd-compression` is the same method,
/// with file-backed RAM poisoned where the image has data: the destination reports `completed`
/// (QEMU checked every packet's method and decompressed size), its RAM file equals the image, and
/// the sender's JSON names the method and level and counts fewer compressed than raw bytes.
fn send_into_qemu_dest(test: &str, method: &str, level: u32) {
    if !require_tool(QEMU, test) {
        return;
    }
    let bin = multifd_bin();
    let image = &image()[..SEND_SIZE];
    let channels = 2u8;
    with_deadline(240, test, || {
        let params = format!(r#""multifd-compression":"{method}""#);
        let mut dest = QemuDest::start_with(test, image.len(), &poisoned(image), channels, &params);
        let img = dest.dir().join("guest.img");
        std::fs::write(&img, image).unwrap();
        let (code, stdout, stderr) = run_bounded(
            Command::new(&bin)
                .args(["send", "--connect", &format!("127.0.0.1:{}", dest.port), "--channels", &channels.to_string()])
                .arg("--image")
                .arg(format!("{}:m0", img.display()))
                .args(["--json", "--compression", method, "--compression-level", &level.to_string()]),
            200,
        );
        assert_eq!(code, Some(0), "multifd send failed: {stderr}\n{stdout}");
        let status = dest.wait_done(60);
        assert!(status.contains("\"completed\""), "destination did not complete: {status}\nsender: {stderr}");
        let bad = differing_pages(&dest.ram(), image);
        assert!(bad.is_empty(), "{} pages differ from the image, first {:?}", bad.len(), bad.first());
        assert_eq!(json_field(&stdout, "compression"), Some(Value::from(method)), "{stdout}");
        assert_eq!(json_num(&stdout, "compression_level"), Some(u64::from(level)), "{stdout}");
        let (c, r) = (json_num(&stdout, "compressed_bytes").unwrap(), json_num(&stdout, "raw_bytes").unwrap());
        let normal = json_num(&stdout, "normal_pages").unwrap();
        assert!(r > 0 && c < r, "compressed {c}, raw {r}: {stdout}");
        assert_eq!(r, normal * PAGE as u64, "every data page compressed: {stdout}");
        let per = json_field(&stdout, "per_channel").and_then(|v| v.as_array().map(Vec::len));
        assert_eq!(per, Some(usize::from(channels)), "{stdout}");
    });
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn send_zlib_into_qemu_destination() {
    send_into_qemu_dest("send_zlib_into_qemu_destination", "zlib", 1);
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn send_zstd_into_qemu_destination() {
    send_into_qemu_dest("send_zstd_into_qemu_destination", "zstd", 3);
}

// ---------------------------------------------------------------------------------------------
// 3. Our sender into our receiver, command line

/// `multifd send --compression zlib` (level 6) and `--compression zstd` (level 3) over 4 channels
/// into `multifd recv` (default options): the block file equals the image; both reports name the
/// method; and the receiver counts exactly the compressed and raw bytes the sender wrote, overall
/// and per channel.
#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn our_sender_into_our_receiver_with_zlib_and_zstd() {
    let test = "our_sender_into_our_receiver_with_zlib_and_zstd";
    let bin = multifd_bin();
    let image = &image()[..SEND_SIZE];
    with_deadline(300, test, || {
        for (method, level) in [("zlib", 6u32), ("zstd", 3)] {
            let channels = 4u8;
            let dir = Scratch::new(&format!("ours-{method}"));
            let (out, img) = (dir.0.join("out"), dir.0.join("guest.img"));
            std::fs::write(&img, image).unwrap();
            let recv = RecvProc::start(&dir.0, &out, channels, &[]);
            let (code, sent, stderr) = run_bounded(
                Command::new(&bin)
                    .args(["send", "--connect", &format!("127.0.0.1:{}", recv.port()), "--channels", "4"])
                    .arg("--image")
                    .arg(format!("{}:m0", img.display()))
                    .args(["--json", "--compression", method, "--compression-level", &level.to_string()]),
                240,
            );
            assert_eq!(code, Some(0), "{method}: multifd send failed: {stderr}\n{sent}");
            let (code, json, rstderr) = recv.wait(30);
            assert_eq!(code, Some(0), "{method}: multifd recv failed: {rstderr}\n{json}");
            let got = std::fs::read(out.join("m0.bin")).expect("block file m0.bin");
            assert_eq!(first_diff(&got, image), None, "{method}: block file differs from the image");
            check_recv_json(&json, method, channels);
            assert_eq!(json_field(&sent, "compression"), Some(Value::from(method)), "{sent}");
            assert_eq!(json_num(&sent, "compression_level"), Some(u64::from(level)), "{sent}");
            for key in ["compressed_bytes", "raw_bytes"] {
                assert_eq!(json_num(&sent, key), json_num(&json, key), "{method} {key}: sent {sent}\nreceived {json}");
            }
            // Per channel, by id: what the sender compressed is what the receiver decompressed.
            let sent_per = json_field(&sent, "per_channel").and_then(|v| v.as_array().cloned()).expect("per_channel");
            let recv_per = json_field(&json, "channels").and_then(|v| v.as_array().cloned()).expect("channels");
            assert_eq!(sent_per.len(), usize::from(channels), "{sent}");
            for s in &sent_per {
                let r = recv_per.iter().find(|r| r.get("id") == s.get("id")).unwrap_or_else(|| panic!("{s} in {json}"));
                for key in ["compressed_bytes", "raw_bytes"] {
                    assert_eq!(s.get(key), r.get(key), "{method} channel {}: {key}", s["id"]);
                }
            }
        }
    });
}

/// `multifd send --compression-level` out of range (zlib 10, zstd 21) is a usage error (exit 2)
/// naming the range, before anything connects; the highest levels (zlib 9, zstd 20) are accepted and
/// the run goes on to connect (and fail, exit 1: nothing listens).
#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn compression_levels_out_of_range_are_usage_errors() {
    let bin = multifd_bin();
    let dir = Scratch::new("levels");
    let img = dir.0.join("guest.img");
    std::fs::write(&img, &image()[..1 << 20]).unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let send = |method: &str, level: u32| {
        run_bounded(
            Command::new(&bin)
                .args(["send", "--connect", &format!("127.0.0.1:{port}"), "--connect-timeout", "5", "--image"])
                .arg(format!("{}:m0", img.display()))
                .args(["--compression", method, "--compression-level", &level.to_string()]),
            30,
        )
    };
    for (method, bad, range) in [("zlib", 10, "0-9"), ("zstd", 21, "0-20")] {
        let (code, _, stderr) = send(method, bad);
        assert_eq!(code, Some(2), "{method} level {bad}: {stderr}");
        assert!(stderr.contains(range) && stderr.lines().count() == 1, "{method} level {bad}: {stderr}");
    }
    for (method, top) in [("zlib", 9), ("zstd", 20)] {
        let (code, _, stderr) = send(method, top);
        assert_eq!(code, Some(1), "{method} level {top} is valid; only the connect fails: {stderr}");
        assert!(!stderr.contains("levels are"), "{method} level {top}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Dirty rounds, compressed, through the library

/// Four rounds (all pages, two rounds of dirtied pages, the final round) with pages dirtied between
/// rounds: new text, new random data, zeroed pages and zero pages made non-zero.
struct Dirtying<'i> {
    images: &'i ImageSet,
    pages: usize,
    bitmaps: Vec<Vec<u64>>,
    stats: Vec<RoundStats>,
    rng: Rng,
}

impl Precopy for Dirtying<'_> {
    fn dirty(&mut self, round: u32, _block: usize) -> &[u64] {
        while self.bitmaps.len() <= round as usize {
            let k = self.bitmaps.len();
            let mut b = vec![0u64; self.pages.div_ceil(64)];
            for i in 0..self.pages {
                if k == 0 || (i * 31 + k * 17).is_multiple_of(3 + k) {
                    b[i / 64] |= 1 << (i % 64);
                }
            }
            self.bitmaps.push(b);
        }
        &self.bitmaps[round as usize]
    }

    fn between_rounds(&mut self, round: u32, q: &Quiescent<'_>) {
        let next = self.dirty(round + 1, 0).to_vec();
        let mem = &self.images.blocks[0].1;
        let mut page = vec![0u8; PAGE];
        for i in 0..self.pages {
            if next[i / 64] >> (i % 64) & 1 == 1 {
                match self.rng.next() % 4 {
                    0 => page.fill(0),
                    1 => random_page(&mut self.rng, &mut page),
                    _ => text_page(&mut self.rng, &mut page),
                }
                mem.write(q, i * PAGE, &page);
            }
        }
    }

    fn round_done(&mut self, stats: &RoundStats) -> Step {
        self.stats.push(*stats);
        if stats.round >= 2 { Step::Complete } else { Step::Iterate }
    }
}

/// Our sender (`migrate_with`, `SendLimits::compression`) into our receiver (`recv::run_with`, every
/// method accepted) on loopback, 3 channels, 16 MiB, four rounds with pages dirtied between them,
/// once with zlib and once with zstd: the block file equals the final image byte for byte (a page
/// re-sent in a later round overwrites the earlier copy, through the same per-channel stream);
/// the receiver's report names the method, its compressed and raw byte counts equal the sender's,
/// raw equals the data pages' bytes, and one epoch per SYNC.
#[test]
#[cfg_attr(miri, ignore = "runs threads and sockets")]
fn dirty_rounds_with_compression_are_byte_exact_with_the_final_image() {
    let test = "dirty_rounds_with_compression_are_byte_exact_with_the_final_image";
    with_deadline(300, test, || {
        for (method, level) in [(Compression::Zlib, 1u32), (Compression::Zstd, 1)] {
            dirty_run(method, level);
        }
    });
}

fn dirty_run(method: Compression, level: u32) {
    let name = method.name();
    let size = 16 << 20;
    let channels = 3u8;
    let initial = mixed_image(77, size);
    let mut images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(initial.clone()))] };
    let dir = Scratch::new(&format!("dirty-{name}"));
    let (out, port_file) = (dir.0.join("out"), dir.0.join("port"));
    let ropts = recv::Options {
        listen: "127.0.0.1:0".into(),
        channels,
        out: out.clone(),
        uuid: None,
        page_size: PAGE as u32,
        port_file: Some(port_file.clone()),
        prealloc: Vec::new(),
        progress: false,
    };
    let rlimits = recv::Limits {
        accept_timeout: Some(Duration::from_secs(30)),
        io_timeout: Some(Duration::from_secs(30)),
        ..recv::Limits::default()
    };
    let slimits = SendLimits { compression: method, compression_level: level, ..SendLimits::default() };
    let pages = size / PAGE;
    let mut emb = Dirtying { images: &images, pages, bitmaps: Vec::new(), stats: Vec::new(), rng: Rng::new(5) };
    let (sent, received) = std::thread::scope(|s| {
        let receiver = s.spawn(|| recv::run_with(&ropts, &rlimits));
        let t0 = Instant::now();
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file).ok().and_then(|t| t.trim().parse::<u16>().ok()) {
                break p;
            }
            assert!(
                !receiver.is_finished() && t0.elapsed() < Duration::from_secs(10),
                "{name}: the receiver did not start"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        let sopts = SendOptions {
            connect: ([127, 0, 0, 1], port).into(),
            channels,
            uuid: [0; 16],
            machine: "none".into(),
            page_size: PAGE as u32,
        };
        let sent = migrate_with(&sopts, &slimits, &images, &mut emb, &AtomicBool::new(false));
        (sent, receiver.join().expect("the receiver panicked"))
    });
    let sent = sent
        .unwrap_or_else(|e| panic!("{name}: send failed: {e}; receiver: {:?}", multifd_tests::recv_error(&received)));
    let report = received.unwrap_or_else(|f| panic!("{name}: receive failed: {}", f.error));
    assert_eq!(sent.summary.rounds, 4, "{name}: rounds 0, 1, 2 and the final one");
    assert!(emb.stats.len() == 3 && emb.stats[1].pages > 0 && emb.stats[2].pages > 0, "{name}: {:?}", emb.stats);
    assert!(sent.summary.last.pages > 0, "{name}: the final round re-sends dirtied pages: {:?}", sent.summary.last);
    let final_image = images.blocks[0].1.as_bytes().to_vec();
    assert_ne!(final_image, initial, "{name}: the rounds changed the guest");
    let got = std::fs::read(out.join("m0.bin")).expect("block file m0.bin");
    let bad = differing_pages(&got, &final_image);
    assert!(bad.is_empty(), "{name}: {} pages differ from the final image, first {:?}", bad.len(), bad.first());

    assert_eq!(sent.compression, method);
    assert_eq!(sent.compression_level, Some(level), "{name}");
    assert_eq!(report.compression, name, "{name}: {report:?}");
    let (s_c, s_r) = sent.compressed.iter().fold((0, 0), |(c, r), x| (c + x.compressed_bytes, r + x.raw_bytes));
    assert!(s_r > 0 && s_c < s_r, "{name}: sender compressed {s_c} of {s_r}");
    assert_eq!((report.compressed_bytes, report.raw_bytes), (s_c, s_r), "{name}: receiver vs sender byte counts");
    assert_eq!(report.raw_bytes, report.normal_pages * PAGE as u64, "{name}: every data page compressed");
    assert_eq!(report.normal_pages, sent.summary.total.normal_pages, "{name}");
    assert_eq!(report.zero_pages, sent.summary.total.zero_pages, "{name}");
    assert_eq!(report.sync_epochs, sent.summary.syncs_per_channel, "{name}: one epoch per SYNC");
    assert!(report.channels.iter().all(|c| c.compression == name), "{name}: {:?}", report.channels);
    eprintln!("{name}: {} rounds, {s_r} -> {s_c} bytes, byte-exact", sent.summary.rounds);
}

// ---------------------------------------------------------------------------------------------
// 5. Refusals with a real QEMU source

/// What [`qemu_against`] saw.
struct Against {
    code: Option<i32>,
    stderr: String,
    /// Files left in the output directory.
    left: Vec<PathBuf>,
    /// The block file `m0.bin`, if there is one.
    block: Option<Vec<u8>>,
    /// From the migration's start to the receiver's exit.
    took: Duration,
}

/// Runs a QEMU source (16 MiB of the mixed image, 2 channels) compressing with `method` at `level`
/// into `multifd recv` with `extra` options, until the receiver exits.
fn qemu_against(tag: &str, method: &str, level: u32, extra: &[&str]) -> Against {
    let mib = 16;
    let dir = Scratch::new(tag);
    let (out, ram) = (dir.0.join("out"), dir.0.join("ram.img"));
    std::fs::write(&ram, &image()[..mib << 20]).unwrap();
    let mut args = vec!["--accept-timeout", "30", "--io-timeout", "30"];
    args.extend_from_slice(extra);
    let recv = RecvProc::start(&dir.0, &out, 2, &args);
    let mut qemu = Qemu::source(&dir.0, &SourceConfig { ram, mib, qtest: None, uuid: None });
    set_compression(&mut qemu, method, level);
    let t0 = Instant::now();
    qemu.migrate(recv.port(), 2, "multifd", FAST, &[]);
    let (code, json, stderr) = recv.wait(120);
    let took = t0.elapsed();
    qemu.kill();
    if code != Some(0) {
        assert!(json_status(&json, "failed"), "{tag}: {json}");
    }
    Against { code, stderr, left: files_in(&out), block: std::fs::read(out.join("m0.bin")).ok(), took }
}

/// The receiver's failure line: exactly one line of stderr starts with `multifd recv: failed:`.
fn failure_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("multifd recv: failed:")).collect();
    assert_eq!(lines.len(), 1, "one failure line wanted: {stderr}");
    lines[0].to_owned()
}

/// `multifd recv --compression none` against a QEMU source compressing with zlib fails (exit 1)
/// within seconds with one line naming zlib as not accepted and what is, and leaves no block file
/// (neither under its final name nor a partial one).
#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn recv_refuses_zlib_when_only_none_is_accepted() {
    let test = "recv_refuses_zlib_when_only_none_is_accepted";
    if !require_tool(QEMU, test) {
        return;
    }
    let _ = multifd_bin();
    with_deadline(180, test, || {
        let r = qemu_against("refuse-zlib", "zlib", 1, &["--compression", "none"]);
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        let line = failure_line(&r.stderr);
        assert!(line.contains("not accepted") && line.contains("zlib"), "{line}");
        assert!(line.contains("accepted: none"), "{line}");
        assert!(r.block.is_none() && r.left.is_empty(), "files left: {:?}", r.left);
        assert!(r.took < Duration::from_secs(20), "took {:?}", r.took);
    });
}

/// `multifd recv --zstd-max-window 1M` against a QEMU source at zstd level 19 (an 8 MiB window)
/// fails (exit 1) with one line about the window naming the 1048576-byte limit, and leaves no block
/// file; with `--zstd-max-window 8M` (exactly the window) the same source is received byte-exact.
#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn recv_refuses_a_zstd_window_above_its_limit() {
    let test = "recv_refuses_a_zstd_window_above_its_limit";
    if !require_tool(QEMU, test) {
        return;
    }
    let _ = multifd_bin();
    with_deadline(240, test, || {
        let r = qemu_against("refuse-window", "zstd", 19, &["--zstd-max-window", "1M"]);
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        let line = failure_line(&r.stderr);
        assert!(line.contains("window") && line.contains("1048576"), "{line}");
        assert!(r.block.is_none() && r.left.is_empty(), "files left: {:?}", r.left);
        assert!(r.took < Duration::from_secs(60), "took {:?}", r.took);

        let r = qemu_against("window-8m", "zstd", 19, &["--zstd-max-window", "8M"]);
        assert_eq!(r.code, Some(0), "an 8 MiB window is within an 8 MiB limit: {}", r.stderr);
        assert_eq!(r.left.len(), 1, "{:?}", r.left);
        let got = r.block.expect("block file m0.bin");
        assert_eq!(first_diff(&got, &image()[..16 << 20]), None, "m0.bin differs from the image");
    });
}
