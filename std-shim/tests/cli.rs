//! The `multifd` binary starts, parses its arguments and reports its version.

use std::process::Command;

#[test]
#[cfg_attr(miri, ignore = "runs an external program")]
fn version_flag_prints_the_package_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_multifd")).arg("--version").output().expect("run multifd");
    assert!(out.status.success(), "multifd --version failed: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), format!("multifd {}", env!("CARGO_PKG_VERSION")));
}

#[test]
#[cfg_attr(miri, ignore = "runs an external program")]
fn unknown_argument_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_multifd")).arg("--no-such-flag").output().expect("run multifd");
    assert_eq!(out.status.code(), Some(2), "clap exits 2 on a usage error: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}
