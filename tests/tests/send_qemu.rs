//! `multifd send` into a real QEMU 10.0 destination (`-M none`, file-backed RAM block `m0`): the
//! destination must report `completed` and its RAM file must equal the image byte for byte; with 1, 2
//! and 4 channels through the command line, and over several rounds through the library with pages
//! dirtied between rounds. SIGINT mid-migration ends `multifd send` quickly and non-zero.

use multifd_core::send::{Precopy, Quiescent, RoundStats, Step};
use multifd_std::send::{ImageSet, SendOptions, StaticPrecopy, migrate};
use multifd_tests::qemu_dest::{QemuDest, differing_pages, guest_image};
use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

/// Poison in every page the image has non-zero (the destination must overwrite it); zero pages start
/// zero, as QEMU assumes of a fresh destination.
fn poisoned(image: &[u8]) -> Vec<u8> {
    image.chunks(PAGE).flat_map(|p| if p.iter().all(|&b| b == 0) { [0u8; PAGE] } else { [0x5au8; PAGE] }).collect()
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn send_cli_into_qemu_with_1_2_and_4_channels() {
    if !multifd_tests::require_tool("qemu-system-x86_64", "send_cli_into_qemu_with_1_2_and_4_channels") {
        return;
    }
    let bin = multifd_tests::qemu::multifd_bin();
    let size = 16 << 20;
    let image = guest_image(11, size, 40);
    for channels in [1u8, 2, 4] {
        let mut dest = QemuDest::start(&format!("send-cli-{channels}"), size, &poisoned(&image), channels);
        let img = dest.dir().join("guest.img");
        std::fs::write(&img, &image).unwrap();
        let out = Command::new(&bin)
            .args(["send", "--connect", &format!("127.0.0.1:{}", dest.port), "--channels", &channels.to_string()])
            .arg("--image")
            .arg(format!("{}:m0", img.display()))
            .arg("--json")
            .output()
            .expect("run multifd send");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{channels} channels: multifd send failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&format!("\"channels\":{channels},")), "{stdout}");
        assert!(stdout.contains(&format!("\"pages\":{},", size / PAGE)), "every page sent once: {stdout}");
        let status = dest.wait_done(30);
        assert!(status.contains("\"completed\""), "{channels} channels: destination did not complete: {status}");
        let bad = differing_pages(&dest.ram(), &image);
        assert!(bad.is_empty(), "{channels} channels: {} pages differ, first {:?}", bad.len(), bad.first());
    }
}

/// Three rounds: all pages, then pages dirtied between rounds (new contents, some made zero, some
/// zero made non-zero), then the final round.
struct Dirtying<'i> {
    images: &'i ImageSet,
    pages: usize,
    bitmaps: Vec<Vec<u64>>,
    stats: Vec<RoundStats>,
}

impl Precopy for Dirtying<'_> {
    fn dirty(&mut self, round: u32, _block: usize) -> &[u64] {
        let r = round as usize;
        while self.bitmaps.len() <= r {
            let k = self.bitmaps.len();
            let mut b = vec![0u64; self.pages.div_ceil(64)];
            for i in 0..self.pages {
                if k == 0 || (i * 7 + k).is_multiple_of(5 + k) {
                    b[i / 64] |= 1 << (i % 64);
                }
            }
            self.bitmaps.push(b);
        }
        &self.bitmaps[r]
    }
    fn between_rounds(&mut self, round: u32, q: &Quiescent<'_>) {
        // Dirty exactly the pages of the next round's bitmap.
        let next = self.dirty(round + 1, 0).to_vec();
        let mem = &self.images.blocks[0].1;
        for i in 0..self.pages {
            if next[i / 64] >> (i % 64) & 1 == 1 {
                let fill = if i % 4 == 0 { 0 } else { (round as u8).wrapping_mul(31).wrapping_add(i as u8) | 1 };
                mem.write(q, i * PAGE, &[fill; PAGE]);
            }
        }
    }
    fn round_done(&mut self, stats: &RoundStats) -> Step {
        self.stats.push(*stats);
        if stats.round >= 1 { Step::Complete } else { Step::Iterate }
    }
}

#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn multi_round_send_ends_byte_exact_with_the_final_image() {
    if !multifd_tests::require_tool("qemu-system-x86_64", "multi_round_send_ends_byte_exact_with_the_final_image") {
        return;
    }
    let size = 8 << 20;
    let image = guest_image(23, size, 40);
    let mut dest = QemuDest::start("send-rounds", size, &poisoned(&image), 3);
    let mut images = ImageSet { blocks: vec![("m0".into(), multifd_std::send::GuestImage::new(image.clone()))] };
    let opts = SendOptions {
        connect: format!("127.0.0.1:{}", dest.port).parse().unwrap(),
        channels: 3,
        uuid: [0; 16],
        machine: "none".into(),
        page_size: PAGE as u32,
    };
    let pages = size / PAGE;
    let mut emb = Dirtying { images: &images, pages, bitmaps: Vec::new(), stats: Vec::new() };
    let report = migrate(&opts, &images, &mut emb, &AtomicBool::new(false)).expect("multi-round migration");
    assert_eq!(report.summary.rounds, 3, "round 0, round 1, final round");
    assert_eq!(report.summary.syncs_per_channel, 4, "setup + 3 rounds");
    let dirty1 = (0..pages).filter(|i| (i * 7 + 1) % 6 == 0).count() as u64;
    assert_eq!(emb.stats[0].pages, pages as u64);
    assert_eq!(emb.stats[0].dirty_left, dirty1);
    assert_eq!(emb.stats[1].pages, dirty1);
    assert!(emb.stats[0].zero_pages > 0 && emb.stats[0].normal_pages > 0, "{:?}", emb.stats[0]);
    let status = dest.wait_done(30);
    assert!(status.contains("\"completed\""), "destination did not complete: {status}");
    let final_image = images.blocks[0].1.as_bytes().to_vec();
    assert_ne!(final_image, image, "the rounds changed the guest");
    let bad = differing_pages(&dest.ram(), &final_image);
    assert!(bad.is_empty(), "{} pages differ from the final image, first {:?}", bad.len(), bad.first());
}

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn static_precopy_through_the_library_reports_one_round() {
    if !multifd_tests::require_tool("qemu-system-x86_64", "static_precopy_through_the_library_reports_one_round") {
        return;
    }
    let size = 4 << 20;
    let image = guest_image(5, size, 40);
    let mut dest = QemuDest::start("send-lib", size, &poisoned(&image), 2);
    let images = ImageSet { blocks: vec![("m0".into(), multifd_std::send::GuestImage::new(image.clone()))] };
    let opts = SendOptions {
        connect: format!("127.0.0.1:{}", dest.port).parse().unwrap(),
        channels: 2,
        uuid: [0; 16],
        machine: "none".into(),
        page_size: PAGE as u32,
    };
    let mut emb = StaticPrecopy::new(&images, PAGE as u32);
    let report = migrate(&opts, &images, &mut emb, &AtomicBool::new(false)).unwrap();
    assert_eq!(report.joined, 2);
    let zero = image.chunks(PAGE).filter(|p| p.iter().all(|&b| b == 0)).count() as u64;
    assert_eq!(report.summary.total.zero_pages, zero);
    assert_eq!(report.summary.total.normal_pages, (size / PAGE) as u64 - zero);
    assert!(dest.wait_done(30).contains("\"completed\""));
    assert!(differing_pages(&dest.ram(), &image).is_empty());
}

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn sigint_mid_migration_exits_non_zero_with_workers_joined() {
    // A receiver that accepts every connection and reads slowly, so the migration is mid-way.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let readers = std::thread::spawn(move || {
        let mut ends = Vec::new();
        for _ in 0..4 {
            let (mut s, _) = listener.accept().unwrap();
            ends.push(std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                let mut total = 0usize;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => return (total, "eof"),
                        Ok(n) => total += n,
                        Err(_) => return (total, "error"),
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        ends.into_iter().map(|e| e.join().unwrap()).collect::<Vec<_>>()
    });
    let dir = std::env::temp_dir().join(format!("multifd-sigint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("m0.img");
    std::fs::write(&img, guest_image(3, 64 << 20, 10)).unwrap();
    let child = Command::new(multifd_tests::qemu::multifd_bin())
        .args(["-v", "send", "--connect", &format!("127.0.0.1:{port}"), "--channels", "3", "--image"])
        .arg(&img)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc_kill(child.id() as i32, 2) };
    assert_eq!(rc, 0, "kill(SIGINT) failed");
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(took < Duration::from_secs(5), "multifd send took {took:?} to exit after SIGINT");
    assert!(!out.status.success(), "exit status {:?} after SIGINT; stderr: {stderr}", out.status);
    assert!(stderr.contains("interrupted"), "stderr: {stderr}");
    assert!(stderr.contains("3 of 3 channel workers joined"), "stderr: {stderr}");
    let ends = readers.join().unwrap();
    assert_eq!(ends.len(), 4);
    assert!(ends.iter().all(|(_, how)| *how == "eof" || *how == "error"), "{ends:?}");
    let total: usize = ends.iter().map(|(n, _)| n).sum();
    assert!(total < 64 << 20, "the whole image got through ({total} bytes): not mid-migration");
    std::fs::remove_dir_all(&dir).ok();
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
