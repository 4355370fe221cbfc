//! `multifd send` and `multifd demo` from the command line: image specs refused before anything is
//! connected, up to 255 channels, a clean stop on SIGINT and SIGTERM, and the uuid in the summary.
//!
//! The binary under test is this build's `multifd`, or the one named by `MULTIFD_BIN` (to show that
//! a regression test fails on an older build: `MULTIFD_BIN=/path/to/old/multifd cargo test ...`).

use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use multifd_tests::qemu::{Recv, json_field, json_num, json_status, multifd_bin, temp_dir};
use multifd_tests::with_deadline;

const PAGE: usize = 4096;

fn bin() -> PathBuf {
    std::env::var_os("MULTIFD_BIN").map_or_else(multifd_bin, PathBuf::from)
}

/// `len` bytes of pages that each start with their number, so no page is a zero page.
fn image_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0x5au8; len];
    for (i, page) in v.chunks_mut(PAGE).enumerate() {
        let n = (i as u64 + 1).to_le_bytes();
        let k = page.len().min(8);
        page[..k].copy_from_slice(&n[..k]);
    }
    v
}

fn write_file(path: &Path, len: usize) -> String {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, image_bytes(len)).unwrap();
    path.display().to_string()
}

/// Runs `multifd send --connect` to a listener that never accepts, with `specs` as `--image`s;
/// asserts that it exits 1 having printed exactly `want` (one line) and that no connection reached
/// the listener (a connect completes in the kernel's backlog even when nobody accepts, so a
/// non-blocking accept afterwards finds any that was made).
fn assert_refused_before_connecting(specs: &[String], want: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cmd = Command::new(bin());
    cmd.args(["send", "--connect", &format!("127.0.0.1:{port}"), "--channels", "2", "--io-timeout", "5"]);
    for s in specs {
        cmd.arg("--image").arg(s);
    }
    let out = cmd.output().expect("run multifd send");
    let stderr = String::from_utf8_lossy(&out.stderr);
    listener.set_nonblocking(true).unwrap();
    let connected = match listener.accept() {
        Ok((_, peer)) => Some(peer),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept: {e}"),
    };
    assert_eq!(connected, None, "multifd send connected ({:?}), stderr:\n{stderr}", out.status);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert_eq!(stderr.trim_end(), want, "the one line of stderr");
}

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn send_refuses_an_empty_image_before_connecting() {
    let dir = temp_dir("send-empty");
    let spec = write_file(&dir.join("m0.img"), 0);
    let want = format!("multifd send: --image {spec:?}: the file is empty (a RAM block needs at least one page)");
    assert_refused_before_connecting(std::slice::from_ref(&spec), &want);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn send_refuses_an_image_of_partial_pages_naming_its_spec() {
    let dir = temp_dir("send-partial");
    let spec = format!("{}:pc.ram", write_file(&dir.join("guest.img"), 5000));
    let want =
        format!("multifd send: --image {spec:?}: its size, 5000 bytes, is not a multiple of the 4096-byte page size");
    assert_refused_before_connecting(std::slice::from_ref(&spec), &want);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn send_refuses_two_images_with_one_block_name_naming_both() {
    let dir = temp_dir("send-dup");
    // The same NAME given twice.
    let a = format!("{}:m0", write_file(&dir.join("a.img"), 2 * PAGE));
    let b = format!("{}:m0", write_file(&dir.join("b.img"), PAGE));
    let want = format!("multifd send: --image {b:?}: block name \"m0\" is already used by --image {a:?}");
    assert_refused_before_connecting(&[a, b.clone()], &want);
    // Two files with the same stem, and a third spec between them.
    let x = write_file(&dir.join("one/m0.img"), PAGE);
    let other = format!("{}:m1", write_file(&dir.join("other.img"), PAGE));
    let y = write_file(&dir.join("two/m0.img"), PAGE);
    let want = format!("multifd send: --image {y:?}: block name \"m0\" is already used by --image {x:?}");
    assert_refused_before_connecting(&[x, other, y], &want);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn send_refuses_a_directory_as_an_image() {
    let dir = temp_dir("send-dir");
    let sub = dir.join("m0");
    std::fs::create_dir_all(&sub).unwrap();
    let spec = sub.display().to_string();
    let want = format!("multifd send: --image {spec:?}: is a directory");
    assert_refused_before_connecting(std::slice::from_ref(&spec), &want);
    let _ = std::fs::remove_dir_all(dir);
}

/// `multifd demo` at 64 and 255 channels (QEMU's limit), which clap refused above 16.
#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn demo_runs_with_64_and_255_channels() {
    with_deadline(180, "demo_runs_with_64_and_255_channels", || {
        for channels in [64u64, 255] {
            let n = channels.to_string();
            let out = Command::new(bin())
                .args(["demo", "--size", "4M", "--channels", &n, "--rounds", "2", "--json"])
                .output()
                .expect("run multifd demo");
            let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "{channels} channels: {:?}\n{stderr}\n{stdout}", out.status);
            assert!(stdout.contains("\"verified\":\"byte-exact\""), "{channels} channels: {stdout}");
            assert_eq!(json_num(&stdout, "channels"), Some(channels), "{stdout}");
            assert_eq!(json_num(&stdout, "workers_joined"), Some(channels), "{stdout}");
            assert_eq!(json_num(&stdout, "syncs_per_channel"), Some(3), "setup + 2 rounds: {stdout}");
        }
    });
}

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn channel_counts_outside_1_to_255_are_refused_by_send_and_demo() {
    for (cmd, bad) in [("send", "0"), ("send", "256"), ("demo", "0"), ("demo", "256")] {
        let mut c = Command::new(bin());
        c.args([cmd, "--channels", bad]);
        if cmd == "send" {
            c.args(["--connect", "127.0.0.1:9", "--image", "m0.img"]);
        }
        let out = c.output().expect("run multifd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd} --channels {bad}: {stderr}");
        assert!(stderr.contains(&format!("{bad} is not in 1..=255")), "{cmd} --channels {bad}: {stderr}");
    }
}

/// A uuid given in capitals and braces is accepted; our receiver, told the plain form, accepts every
/// channel (so the init packets carry it), and the sender's summary shows it hyphenated in lowercase,
/// in the table and in the JSON.
#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn send_takes_a_braced_uuid_and_prints_it_hyphenated_lowercase() {
    with_deadline(120, "send_takes_a_braced_uuid_and_prints_it_hyphenated_lowercase", || {
        let dir = temp_dir("send-uuid");
        let img = write_file(&dir.join("m0.img"), 1 << 20);
        for json in [true, false] {
            let out = dir.join(format!("out-{json}"));
            let mut recv = Recv::start(&dir, &out, 3, &["--uuid", "00112233445566778899aabbccddeeff"]);
            let mut cmd = Command::new(bin());
            cmd.args(["send", "--connect", &format!("127.0.0.1:{}", recv.port), "--channels", "3", "--image", &img])
                .args(["--uuid", "{00112233-4455-6677-8899-AABBCCDDEEFF}"]);
            if json {
                cmd.arg("--json");
            }
            let sent = cmd.output().expect("run multifd send");
            let (stdout, stderr) = (String::from_utf8_lossy(&sent.stdout), String::from_utf8_lossy(&sent.stderr));
            if !sent.status.success() {
                let _ = recv.child.kill();
                panic!("multifd send failed ({:?}):\n{stderr}\n{stdout}", sent.status);
            }
            let (code, rjson, rerr) = recv.wait(30);
            assert_eq!(code, Some(0), "receiver: {rerr}\n{rjson}");
            assert_eq!(std::fs::read(out.join("m0.bin")).unwrap(), image_bytes(1 << 20), "received block");
            let want = "00112233-4455-6677-8899-aabbccddeeff";
            if json {
                assert!(json_status(&stdout, "completed"), "{stdout}");
                let uuid = json_field(&stdout, "uuid");
                assert_eq!(uuid.as_ref().and_then(|u| u.as_str()), Some(want), "{stdout}");
            } else {
                let line = stdout.lines().find(|l| l.starts_with("uuid "));
                assert_eq!(
                    line.map(|l| l.split_whitespace().collect::<Vec<_>>()),
                    Some(vec!["uuid", want]),
                    "{stdout}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    });
}

/// Accepts every connection and keeps it open without ever reading from it.
struct Sink {
    port: u16,
    held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Sink {
    fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&held);
        std::thread::spawn(move || {
            for s in listener.incoming().map_while(Result::ok) {
                keep.lock().unwrap().push(s);
            }
        });
        Sink { port, held }
    }

    fn connections(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Whether every held connection was closed by the sender: reads end (EOF or reset) at once.
    fn all_closed(&self) -> bool {
        self.held.lock().unwrap().iter_mut().all(|s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                    Err(_) => return false,
                }
            }
        })
    }
}

/// Waits for `child` at most `secs` seconds; kills it when it is still running.
fn wait_output(mut child: Child, secs: u64) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Starts `multifd send` of 64 MiB over 2 channels into a destination that never reads, so every
/// write blocks; sends `signal`, and returns the sender's output and how long it took to exit.
fn send_blocked_then_signal(tag: &str, signal: libc::c_int) -> (Output, Duration, Sink) {
    let dir = temp_dir(tag);
    let img = write_file(&dir.join("m0.img"), 64 << 20);
    let sink = Sink::start();
    let child = Command::new(bin())
        .args(["send", "--connect", &format!("127.0.0.1:{}", sink.port), "--channels", "2", "--image", &img])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start multifd send");
    let t0 = Instant::now();
    while sink.connections() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the sender made {} of 3 connections", sink.connections());
        std::thread::sleep(Duration::from_millis(5));
    }
    // Long enough for the socket buffers to fill and the writes to block.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    // SAFETY: kill(2) on the pid of our own child, which has not been waited for, so it is not reused.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0, "kill");
    let out = wait_output(child, 15);
    let took = t.elapsed();
    let _ = std::fs::remove_dir_all(dir);
    (out, took, sink)
}

fn assert_stopped_cleanly(out: &Output, took: Duration, sink: &Sink, name: &str, code: i32) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "exit status {:?} after {name}; stderr:\n{stderr}", out.status);
    let line = format!("multifd send: interrupted by {name}: migration cancelled");
    assert!(stderr.lines().any(|l| l == line), "no line {line:?} in stderr:\n{stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop after {name}");
    assert!(sink.all_closed(), "a connection was left open after {name}");
}

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn sigterm_stops_a_blocked_send_cleanly_with_exit_143() {
    with_deadline(60, "sigterm_stops_a_blocked_send_cleanly_with_exit_143", || {
        let (out, took, sink) = send_blocked_then_signal("send-sigterm", libc::SIGTERM);
        assert_stopped_cleanly(&out, took, &sink, "SIGTERM", 143);
    });
}

#[test]
#[cfg_attr(miri, ignore = "runs processes")]
fn sigint_stops_a_blocked_send_cleanly_with_exit_130() {
    with_deadline(60, "sigint_stops_a_blocked_send_cleanly_with_exit_130", || {
        let (out, took, sink) = send_blocked_then_signal("send-sigint", libc::SIGINT);
        assert_stopped_cleanly(&out, took, &sink, "SIGINT", 130);
    });
}

/// The engine for 255 channels is over a megabyte; `migrate` must build it without overflowing the
/// 2 MiB stack of a spawned thread, in a debug build too. Cancelled before it starts, it returns
/// `Interrupted` without connecting.
#[test]
#[cfg_attr(miri, ignore = "uses sockets")]
fn migrate_at_255_channels_runs_on_a_spawned_thread_and_honours_an_early_cancel() {
    use multifd_std::send::{GuestImage, ImageSet, SendFailure, SendOptions, StaticPrecopy, migrate};
    use std::sync::atomic::AtomicBool;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image_bytes(4 * PAGE)))] };
    let opts = SendOptions {
        connect: listener.local_addr().unwrap(),
        channels: 255,
        uuid: [0; 16],
        machine: "none".into(),
        page_size: PAGE as u32,
    };
    let mut emb = StaticPrecopy::new(&images, PAGE as u32);
    let r = std::thread::scope(|s| s.spawn(|| migrate(&opts, &images, &mut emb, &AtomicBool::new(true))).join());
    let r = r.expect("migrate's thread overflowed or panicked");
    assert!(matches!(r, Err(SendFailure::Interrupted)), "{r:?}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err_and(|e| e.kind() == ErrorKind::WouldBlock), "a cancelled migration connected");
}

/// QEMU itself allows 255 multifd channels: `multifd send --channels 255` into a QEMU destination
/// completes, and the destination's RAM is the image byte for byte.
#[test]
#[cfg_attr(miri, ignore = "runs QEMU")]
fn send_cli_into_qemu_with_255_channels() {
    use multifd_tests::qemu_dest::{QemuDest, differing_pages, guest_image};
    if !multifd_tests::require_tool("qemu-system-x86_64", "send_cli_into_qemu_with_255_channels") {
        return;
    }
    with_deadline(120, "send_cli_into_qemu_with_255_channels", || {
        let size = 8 << 20;
        let image = guest_image(5, size, 40);
        // Poison where the image has data; zero pages start zero, as QEMU assumes of a fresh guest.
        let initial: Vec<u8> = image
            .chunks(PAGE)
            .flat_map(|p| if p.iter().all(|&b| b == 0) { [0u8; PAGE] } else { [0x5au8; PAGE] })
            .collect();
        let mut dest = QemuDest::start("send-255", size, &initial, 255);
        let img = dest.dir().join("guest.img");
        std::fs::write(&img, &image).unwrap();
        let out = Command::new(bin())
            .args(["send", "--connect", &format!("127.0.0.1:{}", dest.port), "--channels", "255", "--json"])
            .arg("--image")
            .arg(format!("{}:m0", img.display()))
            .output()
            .expect("run multifd send");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "multifd send failed ({:?}): {stderr}\n{stdout}", out.status);
        assert_eq!(json_num(&stdout, "workers_joined"), Some(255), "{stdout}");
        let status = dest.wait_done(60);
        assert!(status.contains("\"completed\""), "the destination did not complete: {status}");
        let bad = differing_pages(&dest.ram(), &image);
        assert!(bad.is_empty(), "{} pages differ, first {:?}", bad.len(), bad.first());
    });
}
