//! What a real QEMU 10.0 source configured in a way `multifd recv` cannot serve gets: a one-line
//! error within seconds (the accept and io timeouts are 30 s here), the same every time, and no
//! block file (RELIABILITY.md "Hardening", H5 and H6 against a real source):
//! - the `return-path` capability: the source asks for a return path and waits for the answer;
//! - no `multifd` capability: the source sends every page on the main stream, and no channel;
//! - 3 channels on the source against `--channels 2`, three times over.

use std::time::{Duration, Instant};

use multifd_tests::qemu::{Qemu, Recv, SourceConfig, pattern_image, temp_dir};
use multifd_tests::{require_tool, with_deadline};

const MIB: usize = 16;
const FAST: u64 = 64 << 30;

/// Starts a receiver for `channels` and a source, lets `setup` start the migration, and returns
/// the receiver's failure line and how long the receiver took from the migration's start.
fn refused(tag: &str, channels: u8, setup: impl FnOnce(&mut Qemu, u16)) -> (String, Duration) {
    let dir = temp_dir(tag);
    let (out, ram) = (dir.join("out"), dir.join("ram.img"));
    std::fs::write(&ram, pattern_image(7, MIB << 20)).unwrap();
    let recv = Recv::start(&dir, &out, channels, &["--accept-timeout", "30", "--io-timeout", "30"]);
    let mut qemu = Qemu::source(&dir, &SourceConfig { ram, mib: MIB, qtest: None, uuid: None });
    let t0 = Instant::now();
    setup(&mut qemu, recv.port);
    let (code, _json, stderr) = recv.wait(40);
    let took = t0.elapsed();
    qemu.kill();
    assert_eq!(code, Some(1), "{tag}: {stderr}");
    let files: Vec<_> = std::fs::read_dir(&out).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(files.is_empty(), "{tag}: files left: {files:?}");
    let line = stderr.lines().find(|l| l.starts_with("multifd recv: failed:")).unwrap_or_default().to_owned();
    let _ = std::fs::remove_dir_all(&dir);
    (line, took)
}

#[test]
fn recv_qemu_refuses_what_it_cannot_serve_at_once() {
    let test = "recv_qemu_refuses_what_it_cannot_serve_at_once";
    if !require_tool("qemu-system-x86_64", test) {
        return;
    }
    with_deadline(240, test, || {
        let (line, took) = refused("refuse-rp", 2, |q, port| q.migrate(port, 2, "multifd", FAST, &["return-path"]));
        assert!(line.contains("return path") && line.contains("turn return-path off"), "return-path: {line}");
        assert!(took < Duration::from_secs(10), "return-path: took {took:?}");

        let (line, took) = refused("refuse-plain", 2, |q, port| {
            q.cmd(&format!(r#"{{"execute":"migrate-set-parameters","arguments":{{"max-bandwidth":{FAST}}}}}"#));
            q.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#));
        });
        assert!(line.contains("not using multifd"), "no multifd: {line}");
        assert!(took < Duration::from_secs(10), "no multifd: took {took:?}");

        for run in 0..3 {
            let (line, took) = refused("refuse-3-for-2", 2, |q, port| q.migrate(port, 3, "multifd", FAST, &[]));
            assert!(line.contains("channel id 2 is out of range for 2 channels"), "run {run}: {line}");
            assert!(took < Duration::from_secs(10), "run {run}: took {took:?}");
        }
    });
}
