//! Builds the firmware demo for Cortex-M3 and boots it in qemu-system-arm: the firmware's own exit
//! code (semihosting) must come back through QEMU, and its defmt log must decode and say PASS.
//! The deliberately broken variants must fail with their own codes, which shows the check can fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use multifd_tests::{require_tool, workspace_root};

const TARGET: &str = "thumbv7m-none-eabi";

/// Builds the firmware with `features` into `target/fw-test` and returns the ELF path.
fn build_firmware(features: &str) -> PathBuf {
    let root = workspace_root();
    let target_dir = root.join("target/fw-test");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(&root)
        .args(["build", "--quiet", "-p", "firmware-demo", "--profile", "fw", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host build (loom, sanitizers) must not reach the firmware.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("DEFMT_LOG", "info");
    if !features.is_empty() {
        cmd.args(["--features", features]);
    }
    let status = cmd.status().expect("run cargo build for the firmware");
    assert!(status.success(), "firmware build with features [{features}] failed: {status}");
    target_dir.join(TARGET).join("fw").join("firmware-demo")
}

/// Boots `elf` in QEMU under a timeout; returns (exit code, decoded defmt log).
fn run_in_qemu(elf: &Path) -> (Option<i32>, String) {
    let qemu = Command::new("timeout")
        .args(["60", "qemu-system-arm", "-machine", "mps2-an385", "-nographic"])
        .args(["-semihosting-config", "enable=on,target=native", "-kernel"])
        .arg(elf)
        .stdout(Stdio::piped())
        .output()
        .expect("start qemu-system-arm");
    let mut decode = Command::new("defmt-print")
        .arg("-e")
        .arg(elf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start defmt-print");
    {
        use std::io::Write;
        let mut stdin = decode.stdin.take().expect("piped stdin");
        stdin.write_all(&qemu.stdout).expect("feed defmt-print");
    }
    let decoded = decode.wait_with_output().expect("defmt-print finished");
    let log = String::from_utf8_lossy(&decoded.stdout).into_owned() + &String::from_utf8_lossy(&decoded.stderr);
    (qemu.status.code(), log)
}

#[test]
#[cfg_attr(miri, ignore = "runs external programs")]
fn firmware_runs_in_qemu_and_its_exit_code_and_log_come_back() {
    let test = "firmware_runs_in_qemu_and_its_exit_code_and_log_come_back";
    if !require_tool("qemu-system-arm", test) || !require_tool("defmt-print", test) {
        return;
    }

    let elf = build_firmware("");
    let (code, log) = run_in_qemu(&elf);
    assert_eq!(code, Some(0), "firmware should exit 0; log:\n{log}");
    assert!(log.contains("PASS:"), "decoded log lacks the PASS line:\n{log}");
    assert!(!log.contains("FAILED"), "decoded log reports a failed check:\n{log}");
    assert!(log.contains("multifd-core"), "decoded log lacks the banner:\n{log}");

    let elf = build_firmware("fail-demo");
    let (code, log) = run_in_qemu(&elf);
    assert_eq!(code, Some(3), "fail-demo must exit 3; log:\n{log}");
    assert!(log.contains("FAIL: 1 of"), "fail-demo log lacks its FAIL line:\n{log}");

    let elf = build_firmware("panic-demo");
    let (code, log) = run_in_qemu(&elf);
    assert_eq!(code, Some(101), "panic-demo must exit 101; log:\n{log}");
    assert!(log.contains("panic: "), "panic-demo log lacks the panic line:\n{log}");
}
