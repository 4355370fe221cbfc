//! A real QEMU destination for send tests: `-M none,memory-backend=m0` with a file-backed RAM block,
//! `-incoming defer`, multifd on and the channel count set over QMP, listening on a loopback port.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running QEMU destination; killed and its directory removed on drop.
#[derive(Debug)]
pub struct QemuDest {
    child: Child,
    qmp: BufReader<UnixStream>,
    dir: PathBuf,
    /// The RAM file QEMU maps as block `m0`.
    pub ram: PathBuf,
    /// The loopback port it listens on for the migration.
    pub port: u16,
}

impl Drop for QemuDest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl QemuDest {
    /// Starts a destination for a `size`-byte block `m0`, whose RAM file initially holds `initial`
    /// (zero-filled if shorter), expecting `channels` multifd channels.
    pub fn start(tag: &str, size: usize, initial: &[u8], channels: u8) -> QemuDest {
        Self::start_with(tag, size, initial, channels, "")
    }

    /// As [`QemuDest::start`], with `params` (more members of the `migrate-set-parameters` arguments
    /// object, e.g. `"multifd-compression":"zlib"`; empty for none) set before `migrate-incoming`.
    pub fn start_with(tag: &str, size: usize, initial: &[u8], channels: u8, params: &str) -> QemuDest {
        let dir = std::env::temp_dir().join(format!("multifd-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the destination's directory");
        let ram = dir.join("ram.img");
        let mut bytes = initial.to_vec();
        bytes.resize(size, 0);
        std::fs::write(&ram, bytes).expect("write the destination's RAM file");
        let qmp_path = dir.join("qmp.sock");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("qemu-system-x86_64")
            .args(["-M", "none,memory-backend=m0", "-accel", "tcg", "-object"])
            .arg(format!("memory-backend-file,id=m0,size={size},mem-path={},share=on", ram.display()))
            .args(["-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .args(["-incoming", "defer"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start QEMU");
        let t0 = Instant::now();
        let sock = loop {
            match UnixStream::connect(&qmp_path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("QMP socket {}: {e}", qmp_path.display()),
            }
        };
        let mut dest = QemuDest { child, qmp: BufReader::new(sock), dir, ram, port };
        let mut greeting = String::new();
        dest.qmp.read_line(&mut greeting).unwrap();
        dest.cmd(r#"{"execute":"qmp_capabilities"}"#);
        dest.cmd(
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"multifd","state":true}]}}"#,
        );
        let params = if params.is_empty() { String::new() } else { format!(",{params}") };
        dest.cmd(&format!(
            r#"{{"execute":"migrate-set-parameters","arguments":{{"multifd-channels":{channels}{params}}}}}"#
        ));
        dest.cmd(&format!(r#"{{"execute":"migrate-incoming","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#));
        dest
    }

    /// Sends a QMP command; returns its `return` line (panics on an `error` reply).
    pub fn cmd(&mut self, json: &str) -> String {
        self.qmp.get_mut().write_all(json.as_bytes()).unwrap();
        self.qmp.get_mut().write_all(b"\n").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.qmp.read_line(&mut line).unwrap() > 0, "QMP closed while waiting for {json}");
            if line.contains("\"return\"") || line.contains("\"error\"") {
                assert!(!line.contains("\"error\""), "QMP {json}: {line}");
                return line;
            }
        }
    }

    /// Polls `query-migrate` until the status is `completed` or `failed` or `secs` pass; returns the
    /// last reply.
    pub fn wait_done(&mut self, secs: u64) -> String {
        let t0 = Instant::now();
        loop {
            let r = self.cmd(r#"{"execute":"query-migrate"}"#);
            if r.contains("\"completed\"") || r.contains("\"failed\"") || t0.elapsed() > Duration::from_secs(secs) {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The RAM file's current contents.
    pub fn ram(&self) -> Vec<u8> {
        std::fs::read(&self.ram).expect("read the destination's RAM file")
    }

    /// Where test files for this destination may go.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A deterministic guest image of `size` bytes: about `zero_percent`% zero pages (4 KiB), the others
/// pseudo-random bytes from `seed` (xorshift).
pub fn guest_image(seed: u64, size: usize, zero_percent: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = vec![0u8; size];
    for page in out.chunks_mut(4096) {
        if next() % 100 < u64::from(zero_percent) {
            continue;
        }
        for w in page.chunks_mut(8) {
            let v = next().to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
    }
    out
}

/// Indices of the 4 KiB pages where `a` and `b` differ (and a length mismatch as page `usize::MAX`).
pub fn differing_pages(a: &[u8], b: &[u8]) -> Vec<usize> {
    let mut bad: Vec<usize> =
        a.chunks(4096).zip(b.chunks(4096)).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i).collect();
    if a.len() != b.len() {
        bad.push(usize::MAX);
    }
    bad
}
