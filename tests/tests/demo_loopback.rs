//! `multifd demo` end to end at a small size: sender and receiver on loopback, several rounds with
//! pages dirtied between them, and the destination verified byte for byte by the demo itself. The
//! test also checks the report: the rounds, the SYNC count and the pages add up.

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

/// The first number after `"key":` (with or without a space) in a flat JSON text.
fn json_num(json: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let at = json.find(&pat)? + pat.len();
    json[at..].trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}
