//! Helpers shared by the host integration tests.

pub mod qemu_dest;
pub mod synthetic;

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

/// Runs `f` on its own thread and fails the test (exiting the process, since a hung thread cannot be
/// stopped) if it has not finished within `secs` seconds: "no hang" is part of what tests assert.
///
/// Tests that use it run one at a time (a process-wide lock), so that process-wide measures such as
/// [`worker_thread_count`] taken inside `f` are not disturbed by other tests of the same binary.
pub fn with_deadline(secs: u64, name: &str, f: impl FnOnce() + Send) {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let worker = s.spawn(move || {
            f();
            let _ = done_tx.send(());
        });
        match done_rx.recv_timeout(std::time::Duration::from_secs(secs)) {
            Ok(()) => {}
            // The closure panicked: its sender was dropped. Re-raise the panic through join.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                eprintln!("{name}: HUNG: not finished after {secs} s");
                std::process::exit(101);
            }
        }
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// Number of threads in this process whose name starts with `multifd-` (the channel workers), read
/// from /proc/self/task/*/comm (Linux). A joined thread can stay listed there for a moment after
/// `pthread_join` returns (the kernel releases it asynchronously), so this waits up to one second for
/// the count to reach zero and returns what it last saw.
pub fn worker_thread_count() -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let n = worker_threads_listed();
        if n == 0 || std::time::Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn worker_threads_listed() -> usize {
    let tasks = std::fs::read_dir("/proc/self/task").expect("read /proc/self/task");
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|name| name.starts_with("multifd-"))
        .count()
}
pub mod qemu;

/// The error message of a `multifd recv` outcome, if it failed.
pub fn recv_error(o: &multifd_std::recv::Outcome) -> Option<String> {
    o.as_ref().err().map(|f| f.error.to_string())
}

/// The report of a `multifd recv` outcome: complete, or up to the failure.
pub fn recv_report(o: &multifd_std::recv::Outcome) -> &multifd_std::recv::Report {
    match o {
        Ok(r) => r,
        Err(f) => &f.report,
    }
}
