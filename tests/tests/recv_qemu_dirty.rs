//! Harder `multifd recv` cases against a real QEMU 10.0 source: guest memory written during the
//! migration (qtest writes, `pause-before-switchover`; qemu-interop.md section 5), which only comes
//! out byte-exact if the epoch barrier orders re-sent pages; and a source killed mid-migration.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use multifd_tests::qemu::{Qemu, Recv, SourceConfig, json_num, pattern_image, temp_dir};
use multifd_tests::{require_tool, with_deadline};

const MIB: usize = 32;

#[test]
fn recv_qemu_dirty_pages_are_byte_exact_with_final_memory() {
    let test = "recv_qemu_dirty_pages_are_byte_exact_with_final_memory";
    if !require_tool("qemu-system-x86_64", test) {
        return;
    }
    with_deadline(90, test, || {
        let dir = temp_dir("dirty");
        let out = dir.join("out");
        let ram = dir.join("ram.img");
        std::fs::write(&ram, pattern_image(11, MIB << 20)).unwrap();
        let qtest_path = dir.join("qtest.sock");
        let qtest_listener = UnixListener::bind(&qtest_path).unwrap();
        let recv = Recv::start(&dir, &out, 4, &[]);
        let mut qemu = Qemu::source(
            &dir,
            &SourceConfig { ram: ram.clone(), mib: MIB, qtest: Some(qtest_path.clone()), uuid: None },
        );
        let (qtest, _) = qtest_listener.accept().unwrap();
        let stop = AtomicBool::new(false);
        let writes = AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut w = qtest.try_clone().unwrap();
                let mut r = BufReader::new(qtest);
                let mut x: u64 = 0x1234_5678_9abc_def1;
                // Relaxed: a stop flag; the qtest round trip orders the writes themselves.
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // A page from 1 MiB up; sometimes zero it whole (zero page over received data).
                    let page = (1 << 20) / 4096 + x % (((MIB << 20) - (1 << 20)) as u64 / 4096);
                    let cmd = if x.is_multiple_of(8) {
                        format!("memset {:#x} 4096 0\n", page * 4096)
                    } else {
                        format!("writeq {:#x} {:#x}\n", page * 4096 + (x >> 40) % 512 * 8, x)
                    };
                    w.write_all(cmd.as_bytes()).unwrap();
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    assert!(line.starts_with("OK"), "qtest {cmd}: {line}");
                    // Relaxed: a statistic read after the writer stopped.
                    writes.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(500));
                }
            });
            // 16 MiB/s: a few rounds while the writer dirties pages.
            qemu.migrate(recv.port, 4, "multifd", 16 << 20, &["pause-before-switchover"]);
            let st = qemu.wait_status(&["pre-switchover"], 60);
            // Relaxed: the writer's last write completed (its OK was read) before it looks again.
            stop.store(true, Ordering::Relaxed);
            assert_eq!(st, "pre-switchover");
        });
        qemu.cmd(r#"{"execute":"migrate-continue","arguments":{"state":"pre-switchover"}}"#);
        assert_eq!(qemu.wait_status(&["completed"], 30), "completed");
        qemu.quit();
        let (code, json, stderr) = recv.wait(10);
        assert_eq!(code, Some(0), "multifd recv failed: {stderr}\n{json}");
        let writes = writes.load(Ordering::Relaxed);
        assert!(writes > 100, "only {writes} guest writes happened during the migration");
        let final_ram = std::fs::read(&ram).unwrap();
        let got = std::fs::read(out.join("m0.bin")).expect("m0.bin");
        let wrong = got.chunks(4096).zip(final_ram.chunks(4096)).filter(|(a, b)| a != b).count();
        assert_eq!(wrong, 0, "{wrong} pages differ from the final guest memory ({writes} writes)");
        let epochs = json_num(&json, "sync_epochs").unwrap();
        eprintln!("dirty run: {writes} guest writes, {epochs} epochs, byte-exact");
        assert!(epochs >= 2, "expected several rounds: {json}");
        // `-M pc` has more blocks than m0 (ROMs, VGA RAM); names with '/' are %-encoded.
        let files: Vec<String> =
            std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(files.len() > 1 && files.iter().all(|f| f.ends_with(".bin") && !f.contains('/')), "{files:?}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn recv_qemu_killed_source_fails_fast_without_block_files() {
    let test = "recv_qemu_killed_source_fails_fast_without_block_files";
    if !require_tool("qemu-system-x86_64", test) {
        return;
    }
    with_deadline(60, test, || {
        let dir = temp_dir("killed");
        let out = dir.join("out");
        let ram = dir.join("ram.img");
        std::fs::write(&ram, pattern_image(12, 64 << 20)).unwrap();
        let recv = Recv::start(&dir, &out, 4, &[]);
        let mut qemu = Qemu::source(&dir, &SourceConfig { ram, mib: 64, qtest: None, uuid: None });
        // 8 MiB/s: the migration would take seconds; kill the source in the middle of it.
        qemu.migrate(recv.port, 4, "multifd", 8 << 20, &[]);
        assert_eq!(qemu.wait_status(&["active"], 10), "active");
        std::thread::sleep(Duration::from_millis(700));
        qemu.kill();
        let killed = Instant::now();
        let (code, json, stderr) = recv.wait(5);
        let took = killed.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert_ne!(code, Some(0), "a killed source must fail the migration: {stderr}");
        assert!(multifd_tests::qemu::json_status(&json, "failed"), "{json}");
        let reason = stderr.lines().find(|l| l.contains("multifd recv: failed:")).unwrap_or_default();
        assert!(reason.contains("channel") || reason.contains("main stream"), "reason names no channel: {stderr}");
        let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "files left in the output directory: {left:?}");
        eprintln!("killed source: multifd recv exited {code:?} after {took:?}: {reason}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}
