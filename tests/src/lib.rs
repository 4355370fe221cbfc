//! Helpers shared by the host integration tests.

use std::path::PathBuf;
use std::process::Command;

/// The workspace root (the parent of this package).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Whether we run under CI, where a test whose external tool is missing must fail, not skip.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Returns true if `tool` can be run. If it cannot: under CI this panics (a missing tool is a
/// failure there); locally it prints a clear "skipped" line and returns false.
pub fn require_tool(tool: &str, test: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(!in_ci(), "{test}: `{tool}` is required in CI but was not found; run scripts/setup.sh");
        eprintln!("SKIPPED {test}: `{tool}` not found (run scripts/setup.sh to install it)");
    }
    found
}
