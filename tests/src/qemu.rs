//! Driving a real QEMU as a migration source over QMP (and qtest), and the `multifd` binary as the
//! destination, on loopback (docs: qemu-interop.md sections 2 and 5).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A deterministic guest image: `pages` pages of 4 KiB, about 40% zero pages, the rest random
/// (xorshift64* from `seed`).
pub fn pattern_image(seed: u64, bytes: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut out = vec![0u8; bytes];
    for page in out.chunks_mut(4096) {
        if next() % 100 < 40 {
            continue;
        }
        for word in page.chunks_mut(8) {
            let v = next().to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
    out
}

/// A QEMU process, killed and reaped on drop.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the source QEMU is started.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// RAM file (the memory backend `m0`, shared).
    pub ram: PathBuf,
    /// Its size in MiB.
    pub mib: usize,
    /// `-M none` (static) or `-M pc -S` with a qtest socket (dirty-page runs).
    pub qtest: Option<PathBuf>,
    /// `-uuid`, if any.
    pub uuid: Option<String>,
}

impl Qemu {
    /// Starts a source QEMU with its QMP socket in `dir`.
    pub fn source(dir: &Path, cfg: &SourceConfig) -> Qemu {
        let qmp_path = dir.join("qmp.sock");
        let mut cmd = Command::new("qemu-system-x86_64");
        let backend = format!("memory-backend-file,id=m0,size={}M,mem-path={},share=on", cfg.mib, cfg.ram.display());
        match &cfg.qtest {
            None => cmd.args(["-M", "none,memory-backend=m0"]),
            Some(q) => cmd
                .args(["-M", "pc,memory-backend=m0", "-S", "-qtest-log", "/dev/null"])
                .arg("-qtest")
                .arg(format!("unix:{}", q.display())),
        };
        cmd.args([
            "-accel",
            "tcg",
            "-object",
            &backend,
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if let Some(u) = &cfg.uuid {
            cmd.args(["-uuid", u]);
        }
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn().expect("start qemu-system-x86_64");
        let deadline = Instant::now() + Duration::from_secs(10);
        let sock = loop {
            match UnixStream::connect(&qmp_path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("QMP socket {}: {e}", qmp_path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let mut q = Qemu { child, qmp: BufReader::new(sock) };
        let mut greeting = String::new();
        q.qmp.read_line(&mut greeting).expect("QMP greeting");
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    /// Sends one QMP command; returns the response line (panics on an error response).
    pub fn cmd(&mut self, json: &str) -> String {
        let line = self.try_cmd(json);
        assert!(!line.contains("\"error\""), "QMP {json}: {line}");
        line
    }

    /// Sends one QMP command; returns the response line, error or not.
    pub fn try_cmd(&mut self, json: &str) -> String {
        let s = self.qmp.get_mut();
        s.write_all(json.as_bytes()).expect("QMP write");
        s.write_all(b"\n").expect("QMP write");
        loop {
            let mut line = String::new();
            assert!(self.qmp.read_line(&mut line).expect("QMP read") > 0, "QMP closed during {json}");
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return line;
            }
        }
    }

    /// Sets up multifd with `channels` channels, `zpd` zero-page detection and `bandwidth` bytes/s,
    /// plus extra capabilities, then starts migrating to `127.0.0.1:port`.
    pub fn migrate(&mut self, port: u16, channels: u8, zpd: &str, bandwidth: u64, extra_caps: &[&str]) {
        let mut caps = String::from(r#"{"capability":"multifd","state":true}"#);
        for c in extra_caps {
            caps.push_str(&format!(r#",{{"capability":"{c}","state":true}}"#));
        }
        self.cmd(&format!(r#"{{"execute":"migrate-set-capabilities","arguments":{{"capabilities":[{caps}]}}}}"#));
        self.cmd(&format!(
            r#"{{"execute":"migrate-set-parameters","arguments":{{"multifd-channels":{channels},"max-bandwidth":{bandwidth},"zero-page-detection":"{zpd}"}}}}"#
        ));
        self.cmd(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#));
    }

    /// The migration status from `query-migrate`.
    pub fn status(&mut self) -> String {
        let line = self.cmd(r#"{"execute":"query-migrate"}"#);
        let at = line.find("\"status\": \"").map(|i| i + 11).unwrap_or(0);
        line[at..].split('"').next().unwrap_or("").to_owned()
    }

    /// Polls until the status is one of `want` (or `failed`), within `secs` seconds; returns it.
    pub fn wait_status(&mut self, want: &[&str], secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if want.contains(&s.as_str()) || s == "failed" {
                return s;
            }
            assert!(Instant::now() < deadline, "migration still {s:?} after {secs} s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Quits QEMU and waits for it.
    pub fn quit(mut self) {
        // Best effort: a QEMU that already closed its QMP socket (it can exit on its own right after
        // a completed outgoing migration: one recv_qemu run in about five hit a broken pipe here, on
        // this main and the one before the receive session) is just reaped below.
        let s = self.qmp.get_mut();
        let _ = s.write_all(b"{\"execute\":\"quit\"}\n");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills QEMU at once (SIGKILL) and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `multifd` binary of this build (target dir and profile of this test executable), brought up
/// to date once per test process: `cargo test -p multifd-tests` alone would not rebuild it.
pub fn multifd_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("current_exe");
            // target/<profile>/deps/<test> -> target/<profile>/multifd
            let profile_dir = exe.parent().and_then(Path::parent).expect("profile dir").to_path_buf();
            let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "-p", "multifd-std", "--bin", "multifd", "--target-dir"])
                .arg(&target_dir)
                .current_dir(crate::workspace_root());
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("cargo build multifd");
            assert!(status.success(), "building the multifd binary failed");
            let bin = profile_dir.join("multifd");
            assert!(bin.exists(), "{} not found", bin.display());
            bin
        })
        .clone()
}

/// A running `multifd recv`.
#[derive(Debug)]
pub struct Recv {
    /// The process.
    pub child: Child,
    /// Its bound port.
    pub port: u16,
}

impl Recv {
    /// Starts `multifd recv --listen 127.0.0.1:0 --channels N --out DIR --json --port-file ...` with
    /// `extra` arguments, and waits for its port.
    pub fn start(dir: &Path, out: &Path, channels: u8, extra: &[&str]) -> Recv {
        let port_file = dir.join("port");
        let _ = std::fs::remove_file(&port_file);
        let child = Command::new(multifd_bin())
            .args(["recv", "--listen", "127.0.0.1:0", "--json", "--channels", &channels.to_string(), "--out"])
            .arg(out)
            .arg("--port-file")
            .arg(&port_file)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start multifd recv");
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Ok(s) = std::fs::read_to_string(&port_file)
                && let Ok(p) = s.trim().parse()
            {
                break p;
            }
            assert!(Instant::now() < deadline, "multifd recv wrote no port file");
            std::thread::sleep(Duration::from_millis(5));
        };
        Recv { child, port }
    }

    /// Waits for the process (at most `secs`); returns (exit code, stdout, stderr).
    pub fn wait(mut self, secs: u64) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let out = self.child.wait_with_output().expect("wait");
                panic!("multifd recv did not exit within {secs} s; stderr: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = self.child.wait_with_output().expect("wait");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The number after `"key": ` in a flat JSON text, the first occurrence from `from`.
pub fn json_num(json: &str, key: &str) -> Option<u64> {
    json_field(json, key)?.as_u64()
}

/// The first value named `key` in the JSON document `json` (depth first, in document order), or
/// `None` if `json` is not JSON or has no such key.
pub fn json_field(json: &str, key: &str) -> Option<serde_json::Value> {
    fn find(v: &serde_json::Value, key: &str) -> Option<serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => {
                m.iter().find_map(|(k, v)| if k == key { Some(v.clone()) } else { find(v, key) })
            }
            serde_json::Value::Array(a) => a.iter().find_map(|v| find(v, key)),
            _ => None,
        }
    }
    let doc: serde_json::Value = serde_json::from_str(json.trim()).ok()?;
    find(&doc, key)
}

/// Whether the JSON document `json` has `"status"` equal to `status`.
pub fn json_status(json: &str, status: &str) -> bool {
    json_field(json, "status").is_some_and(|s| s == status)
}

/// A fresh temporary directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // Relaxed: a counter for unique names.
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("multifd-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
