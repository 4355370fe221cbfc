//! `multifd demo` end to end at a small size: sender and receiver on loopback, several rounds with
//! pages dirtied between them, and the destination verified byte for byte by the demo itself. The
//! test also checks the report: the rounds, the SYNC count and the pages add up.

use multifd_tests::qemu::json_num;
use multifd_tests::qemu::multifd_bin;
use std::process::Command;

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn demo_64m_is_byte_exact_over_three_rounds() {
    multifd_tests::with_deadline(120, "demo_64m_is_byte_exact_over_three_rounds", || {
        let out = Command::new(multifd_bin())
            .args(["demo", "--size", "64M", "--channels", "3", "--rounds", "3", "--seed", "7", "--json"])
            .output()
            .expect("run multifd demo");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "multifd demo failed ({:?}): {stderr}\n{stdout}", out.status);
        assert!(stdout.contains("\"verified\":\"byte-exact\""), "{stdout}");
        assert_eq!(json_num(&stdout, "rounds"), Some(3), "{stdout}");
        assert_eq!(json_num(&stdout, "syncs_per_channel"), Some(4), "setup + 3 rounds: {stdout}");
        let pages = json_num(&stdout, "pages").expect("pages");
        assert!(pages > 16384, "round 0 has every page of 64 MiB, later rounds the dirtied ones: {pages}");
        assert_eq!(json_num(&stdout, "workers_joined"), Some(3), "{stdout}");
    });
}

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn demo_refuses_a_size_that_is_not_whole_pages() {
    let out = Command::new(multifd_bin()).args(["demo", "--size", "1000"]).output().expect("run multifd demo");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a positive multiple of 4096"), "{stderr}");
}

/// Our sender into our receiver with 1, 2, 4 and 8 channels, three rounds with dirtied pages each:
/// byte-exact every time, one SYNC per channel per round (plus the setup one), every worker joined.
#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn our_sender_into_our_receiver_at_1_2_4_8_channels() {
    multifd_tests::with_deadline(240, "our_sender_into_our_receiver_at_1_2_4_8_channels", || {
        for channels in [1u64, 2, 4, 8] {
            let n = channels.to_string();
            let out = Command::new(multifd_bin())
                .args(["demo", "--size", "16M", "--channels", &n, "--rounds", "3", "--seed", &n, "--json"])
                .output()
                .expect("run multifd demo");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{channels} channels failed ({:?}): {stderr}\n{stdout}", out.status);
            assert!(stdout.contains("\"verified\":\"byte-exact\""), "{channels} channels: {stdout}");
            assert_eq!(json_num(&stdout, "rounds"), Some(3), "{channels} channels: {stdout}");
            assert_eq!(json_num(&stdout, "syncs_per_channel"), Some(4), "{channels} channels: {stdout}");
            assert_eq!(json_num(&stdout, "workers_joined"), Some(channels), "{channels} channels: {stdout}");
        }
    });
}
