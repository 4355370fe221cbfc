//! Two hosts: `multifd recv` and `multifd send` in two network namespaces this test creates, joined
//! by a veth pair (addresses 10.77.1.1 and 10.77.1.2, which exist only inside those namespaces).
//! Without a cut the migration completes byte for byte; with the link set down mid-migration both
//! sides exit non-zero within their io timeout and no block file is left under its final name.
//!
//! Needs root and iproute2's `ip`: under CI their absence fails the test, locally it skips with a
//! message. The namespaces (and with them the veth pair) are deleted on drop, also on failure.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use multifd_tests::qemu::{json_num, multifd_bin, temp_dir};
use multifd_tests::{in_ci, with_deadline};

const RECV_ADDR: &str = "10.77.1.1";
const SEND_ADDR: &str = "10.77.1.2";

/// True if this test can create namespaces (root and `ip`); otherwise fails under CI, or prints a
/// clear skip line and returns false.
fn can_run(test: &str) -> bool {
    let ip = Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success());
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if ip && root {
        return true;
    }
    let why = if ip { "it must run as root (network namespaces)" } else { "`ip` (iproute2) was not found" };
    assert!(!in_ci(), "{test}: {why}; CI must run it (scripts/setup.sh installs iproute2; run as root)");
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// Runs `ip ARGS...`, panicking with its output on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Two namespaces joined by a veth pair; deleted on drop.
struct TwoHosts {
    recv_ns: String,
    send_ns: String,
    send_veth: String,
}

impl TwoHosts {
    fn new() -> TwoHosts {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        // Relaxed: a counter for unique names.
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names are at most 15 bytes.
        let tag = format!("{}{n}", pid % 1_000_000);
        let hosts = TwoHosts {
            recv_ns: format!("multifd-recv-{pid}-{n}"),
            send_ns: format!("multifd-send-{pid}-{n}"),
            send_veth: format!("mfs{tag}"),
        };
        let recv_veth = format!("mfr{tag}");
        // The guard exists before the first command, so a failed setup is still cleaned up.
        ip(&["netns", "add", &hosts.recv_ns]);
        ip(&["netns", "add", &hosts.send_ns]);
        ip(&[
            "link",
            "add",
            &recv_veth,
            "netns",
            &hosts.recv_ns,
            "type",
            "veth",
            "peer",
            "name",
            &hosts.send_veth,
            "netns",
            &hosts.send_ns,
        ]);
        for (ns, dev, addr) in [(&hosts.recv_ns, &recv_veth, RECV_ADDR), (&hosts.send_ns, &hosts.send_veth, SEND_ADDR)]
        {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// `multifd ARGS...` inside namespace `ns`.
    fn multifd(ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(multifd_bin()).args(args);
        c
    }

    /// Cuts the link: the sender's end of the veth pair goes down.
    fn cut(&self) {
        ip(&["-n", &self.send_ns, "link", "set", &self.send_veth, "down"]);
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end inside it, and with it the pair.
        for ns in [&self.recv_ns, &self.send_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A guest image with no zero page.
fn image(bytes: usize) -> Vec<u8> {
    let mut v = vec![0x3Cu8; bytes];
    for (i, page) in v.chunks_mut(4096).enumerate() {
        page[..8].copy_from_slice(&(i as u64 * 0x9E37_79B9 + 7).to_le_bytes());
    }
    v
}

/// Starts the receiver in its namespace and waits for its port.
fn start_recv(hosts: &TwoHosts, dir: &Path, out: &Path, io_timeout: &str) -> (Child, u16) {
    let port_file = dir.join("port");
    let child = TwoHosts::multifd(
        &hosts.recv_ns,
        &["recv", "--listen", &format!("{RECV_ADDR}:0"), "--channels", "4", "--json", "--io-timeout", io_timeout],
    )
    .arg("--out")
    .arg(out)
    .arg("--port-file")
    .arg(&port_file)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start multifd recv");
    let deadline = Instant::now() + Duration::from_secs(10);
    let port = loop {
        if let Some(p) = std::fs::read_to_string(&port_file).ok().and_then(|s| s.trim().parse().ok()) {
            break p;
        }
        assert!(Instant::now() < deadline, "multifd recv wrote no port file");
        std::thread::sleep(Duration::from_millis(5));
    };
    (child, port)
}

/// Waits for `child` at most `secs`, killing it (and failing) past that.
fn wait_bounded(mut child: Child, secs: u64, what: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("{what} did not exit within {secs} s: {err}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("wait")
}

fn send_cmd(hosts: &TwoHosts, port: u16, img: &Path, extra: &[&str]) -> Command {
    let mut c =
        TwoHosts::multifd(&hosts.send_ns, &["send", "--connect", &format!("{RECV_ADDR}:{port}"), "--channels", "4"]);
    c.args(extra).arg("--image").arg(format!("{}:m0", img.display()));
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn setup(tag: &str, bytes: usize) -> (PathBuf, PathBuf, PathBuf, Vec<u8>) {
    let dir = temp_dir(tag);
    let out = dir.join("out");
    let img = dir.join("m0.img");
    let data = image(bytes);
    std::fs::write(&img, &data).unwrap();
    (dir, out, img, data)
}

#[test]
fn two_hosts_migration_completes_byte_exact() {
    if !can_run("two_hosts_migration_completes_byte_exact") {
        return;
    }
    with_deadline(60, "two_hosts_migration_completes_byte_exact", || {
        let hosts = TwoHosts::new();
        let (dir, out, img, data) = setup("two-hosts", 64 << 20);
        let (recv, port) = start_recv(&hosts, &dir, &out, "5");
        let sender = send_cmd(&hosts, port, &img, &["--io-timeout", "5"]).spawn().expect("start multifd send");
        let s = wait_bounded(sender, 30, "multifd send");
        let r = wait_bounded(recv, 10, "multifd recv");
        let (serr, rerr) = (String::from_utf8_lossy(&s.stderr), String::from_utf8_lossy(&r.stderr));
        assert!(s.status.success(), "sender: {serr}\nreceiver: {rerr}");
        assert!(r.status.success(), "receiver: {rerr}\nsender: {serr}");
        let got = std::fs::read(out.join("m0.bin")).unwrap();
        assert_eq!(got.len(), data.len());
        let bad = got.chunks(4096).zip(data.chunks(4096)).position(|(a, b)| a != b);
        assert_eq!(bad, None, "first differing page");
        drop(hosts);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// 128 MiB paced at 32 MiB/s (about 4 s); the link goes down after 1 s. Nothing moves afterwards,
/// so both sides give up after their 2 s io timeout.
#[test]
fn two_hosts_link_cut_fails_both_sides_within_the_timeout() {
    if !can_run("two_hosts_link_cut_fails_both_sides_within_the_timeout") {
        return;
    }
    with_deadline(60, "two_hosts_link_cut_fails_both_sides_within_the_timeout", || {
        let hosts = TwoHosts::new();
        let (dir, out, img, _) = setup("two-hosts-cut", 128 << 20);
        let (recv, port) = start_recv(&hosts, &dir, &out, "2");
        let sender = send_cmd(&hosts, port, &img, &["--io-timeout", "2", "--max-bandwidth", "32M"])
            .spawn()
            .expect("start multifd send");
        std::thread::sleep(Duration::from_millis(1000));
        hosts.cut();
        let t0 = Instant::now();
        let s = wait_bounded(sender, 10, "multifd send");
        let r = wait_bounded(recv, 10, "multifd recv");
        let took = t0.elapsed();
        let (serr, rerr) = (String::from_utf8_lossy(&s.stderr), String::from_utf8_lossy(&r.stderr));
        let json = String::from_utf8_lossy(&r.stdout);
        // Both exited within the 2 s io timeout plus a margin for the last pacing slot and exit.
        assert!(took < Duration::from_secs(2 + 5), "exits took {took:?}");
        assert_eq!(s.status.code(), Some(1), "sender: {serr}");
        assert_eq!(r.status.code(), Some(1), "receiver: {rerr}");
        let sline = serr.lines().rfind(|l| l.starts_with("multifd send:")).unwrap_or_default();
        assert!(sline.contains("channel ") || sline.contains("main stream"), "{sline}");
        assert!(sline.contains("stalled") && sline.contains("(--io-timeout)"), "{sline}");
        let rline = rerr.lines().find(|l| l.starts_with("multifd recv: failed:")).unwrap_or_default();
        assert!(rline.contains("channel ") || rline.contains("main stream"), "{rline}");
        assert!(rline.contains("stalled: no data arrived on any connection for 2 s"), "{rline}");
        eprintln!("after the cut ({took:?}):\n  {sline}\n  {rline}");
        // The cut came mid-migration: some of the image had arrived, not all.
        let bytes = json_num(&json, "bytes").unwrap_or(0);
        assert!(bytes > (4 << 20) && bytes < (128 << 20), "received {bytes} bytes before the cut");
        let left: Vec<_> = std::fs::read_dir(&out).map(|d| d.filter_map(Result::ok).collect()).unwrap_or_default();
        assert!(left.is_empty(), "files left in {}: {left:?}", out.display());
        drop(hosts);
        let _ = std::fs::remove_dir_all(&dir);
    });
}
