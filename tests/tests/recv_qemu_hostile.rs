//! `H8` (RELIABILITY.md "Hardening"): a real QEMU 10.0 source migrates into `multifd recv` while
//! other connections to the same port misbehave: some stay idle, some close at once (over and over,
//! for the whole migration), some trickle one byte per second, some send an HTTP request. The
//! migration completes byte for byte, and the receiver's peak memory (VmHWM) stays within a few MiB
//! of the same migration's without them.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use multifd_tests::qemu::{Qemu, Recv, SourceConfig, pattern_image, temp_dir};
use multifd_tests::{require_tool, with_deadline};

const MIB: usize = 64;
const CHANNELS: u8 = 4;
/// `max-bandwidth` low enough (64 MiB/s) that the migration lasts about a second, long enough for
/// the hostile connections to be around for all of it.
const BANDWIDTH: u64 = 64 << 20;

/// Peak resident memory of process `pid` in KiB (`VmHWM`), if it still runs.
fn peak_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Migrates the guest `ram` into a new `multifd recv`; with `hostile`, misbehaving connections
/// meanwhile. Returns the receiver's peak memory in KiB, after checking the result byte for byte.
fn migrate(tag: &str, image: &[u8], hostile: bool) -> u64 {
    let dir = temp_dir(tag);
    let (out, ram) = (dir.join("out"), dir.join("ram.img"));
    std::fs::write(&ram, image).unwrap();
    let recv = Recv::start(&dir, &out, CHANNELS, &["--io-timeout", "5"]);
    let (port, pid) = (recv.port, recv.child.id());
    let stop = AtomicBool::new(false);
    let peak = std::thread::scope(|s| {
        let mut held = Vec::new();
        if hostile {
            for _ in 0..20 {
                held.push(TcpStream::connect(("127.0.0.1", port)).unwrap());
            }
            let mut http = TcpStream::connect(("127.0.0.1", port)).unwrap();
            http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            held.push(http);
            // Close at once, again and again.
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    drop(TcpStream::connect(("127.0.0.1", port)));
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            // Trickle: the multifd magic and then zeros, one byte a second.
            for _ in 0..4 {
                s.spawn(|| {
                    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else { return };
                    let bytes = [0x11u8, 0x22, 0x33, 0x44].into_iter().chain(std::iter::repeat(0));
                    for b in bytes {
                        if stop.load(Ordering::Relaxed) || c.write_all(&[b]).is_err() {
                            return;
                        }
                        let t = Instant::now();
                        while t.elapsed() < Duration::from_secs(1) && !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while let Some(k) = peak_kib(pid) {
                peak = peak.max(k);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        let mut qemu = Qemu::source(&dir, &SourceConfig { ram: ram.clone(), mib: MIB, qtest: None, uuid: None });
        qemu.migrate(port, CHANNELS, "multifd", BANDWIDTH, &[]);
        assert_eq!(qemu.wait_status(&["completed"], 60), "completed", "{tag}");
        qemu.quit();
        let (code, json, stderr) = recv.wait(20);
        stop.store(true, Ordering::Relaxed);
        drop(held);
        assert_eq!(code, Some(0), "{tag}: multifd recv failed: {stderr}\n{json}");
        if hostile {
            assert!(
                stderr.contains("closed before sending anything"),
                "{tag}: no log of a dropped connection: {stderr}"
            );
        }
        sampler.join().unwrap()
    });
    let got = std::fs::read(out.join("m0.bin")).expect("block file m0.bin");
    assert!(got == image, "{tag}: the block file differs from the guest's RAM");
    let _ = std::fs::remove_dir_all(&dir);
    peak
}

#[test]
fn recv_qemu_hostile_connections_change_nothing() {
    let test = "recv_qemu_hostile_connections_change_nothing";
    if !require_tool("qemu-system-x86_64", test) {
        return;
    }
    with_deadline(180, test, || {
        let image = pattern_image(21, MIB << 20);
        let calm = migrate("hostile-calm", &image, false);
        let hostile = migrate("hostile", &image, true);
        eprintln!("{test}: receiver peak memory {calm} KiB alone, {hostile} KiB with hostile connections");
        assert!(calm > 0 && hostile > 0, "no memory sample");
        assert!(hostile <= calm + 8 * 1024, "peak memory {hostile} KiB with hostile connections, {calm} KiB without");
    });
}
