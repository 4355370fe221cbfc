//! `multifd recv` accepts live migrations from a real QEMU 10.0 source (`-M none`, file-backed
//! pattern RAM, QMP sequence of qemu-interop.md section 2): the block file equals the RAM file byte
//! for byte and every page is marked received, for 1, 2, 4 and 8 channels and every zero-page mode.

use multifd_tests::qemu::{Qemu, Recv, SourceConfig, json_num, pattern_image, temp_dir};
use multifd_tests::{require_tool, with_deadline};

const MIB: usize = 16;
/// `max-bandwidth` raised (64 GiB/s) so the default 128 MiB/s throttle does not slow the tests.
const FAST: u64 = 64 << 30;

fn static_run(test: &str, channels: u8, zpd: &str, seed: u64) {
    if !require_tool("qemu-system-x86_64", test) {
        return;
    }
    with_deadline(60, test, || {
        let dir = temp_dir(test);
        let out = dir.join("out");
        let image = pattern_image(seed, MIB << 20);
        let ram = dir.join("ram.img");
        std::fs::write(&ram, &image).unwrap();
        let recv = Recv::start(&dir, &out, channels, &[]);
        let mut qemu = Qemu::source(&dir, &SourceConfig { ram: ram.clone(), mib: MIB, qtest: None, uuid: None });
        qemu.migrate(recv.port, channels, zpd, FAST, &[]);
        assert_eq!(qemu.wait_status(&["completed"], 30), "completed");
        qemu.quit();
        let (code, json, stderr) = recv.wait(10);
        assert_eq!(code, Some(0), "multifd recv failed: {stderr}\n{json}");
        let got = std::fs::read(out.join("m0.bin")).expect("block file m0.bin");
        assert_eq!(got.len(), image.len());
        let first_diff = got.iter().zip(&image).position(|(a, b)| a != b);
        assert_eq!(first_diff, None, "block file differs from the RAM image");
        assert!(multifd_tests::qemu::json_status(&json, "completed"), "{json}");
        assert_eq!(multifd_tests::qemu::json_field(&json, "error"), Some(serde_json::Value::Null), "{json}");
        let pages = (MIB << 20) / 4096;
        assert_eq!(json_num(&json, "pages"), Some(pages as u64), "{json}");
        assert_eq!(json_num(&json, "received_pages"), Some(pages as u64), "{json}");
        let zero_expected = image.chunks(4096).filter(|p| p.iter().all(|&b| b == 0)).count() as u64;
        let (normal, zero) = (json_num(&json, "normal_pages").unwrap(), json_num(&json, "zero_pages").unwrap());
        match zpd {
            "none" => assert_eq!((normal, zero), (pages as u64, 0), "{json}"),
            _ => assert_eq!((normal, zero), (pages as u64 - zero_expected, zero_expected), "{json}"),
        }
        assert!(json_num(&json, "sync_epochs").unwrap() >= 1, "{json}");
        let per_channel = multifd_tests::qemu::json_field(&json, "channels").and_then(|c| c.as_array().map(Vec::len));
        assert_eq!(per_channel, Some(usize::from(channels)), "{json}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn recv_qemu_1_channel_multifd_zero_pages() {
    static_run("recv_qemu_1_channel_multifd_zero_pages", 1, "multifd", 1);
}

#[test]
fn recv_qemu_2_channels_multifd_zero_pages() {
    static_run("recv_qemu_2_channels_multifd_zero_pages", 2, "multifd", 2);
}

#[test]
fn recv_qemu_4_channels_multifd_zero_pages() {
    static_run("recv_qemu_4_channels_multifd_zero_pages", 4, "multifd", 3);
}

#[test]
fn recv_qemu_8_channels_multifd_zero_pages() {
    static_run("recv_qemu_8_channels_multifd_zero_pages", 8, "multifd", 4);
}

#[test]
fn recv_qemu_4_channels_legacy_zero_pages() {
    static_run("recv_qemu_4_channels_legacy_zero_pages", 4, "legacy", 5);
}

#[test]
fn recv_qemu_4_channels_no_zero_page_detection() {
    static_run("recv_qemu_4_channels_no_zero_page_detection", 4, "none", 6);
}

/// A source with another uuid is refused, naming the uuid, and no block file appears.
#[test]
fn recv_qemu_uuid_mismatch_is_refused() {
    let test = "recv_qemu_uuid_mismatch_is_refused";
    if !require_tool("qemu-system-x86_64", test) {
        return;
    }
    with_deadline(60, test, || {
        let dir = temp_dir(test);
        let out = dir.join("out");
        let ram = dir.join("ram.img");
        std::fs::write(&ram, pattern_image(9, 4 << 20)).unwrap();
        let recv = Recv::start(&dir, &out, 2, &["--uuid", "11111111-2222-3333-4444-555555555555"]);
        let uuid = Some("11111111-2222-3333-4444-666666666666".to_owned());
        let mut qemu = Qemu::source(&dir, &SourceConfig { ram, mib: 4, qtest: None, uuid });
        qemu.migrate(recv.port, 2, "multifd", FAST, &[]);
        let (code, json, stderr) = recv.wait(10);
        qemu.kill();
        assert_ne!(code, Some(0), "{stderr}");
        assert!(multifd_tests::qemu::json_status(&json, "failed") && json.contains("uuid"), "{json}");
        assert!(!out.join("m0.bin").exists());
        let _ = std::fs::remove_dir_all(&dir);
    });
}
