//! `multifd send` and `multifd demo` from the command line: image specs refused before anything is
//! connected.
//!
//! The binary under test is this build's `multifd`, or the one named by `MULTIFD_BIN` (to show that
//! a regression test fails on an older build: `MULTIFD_BIN=/path/to/old/multifd cargo test ...`).
use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use multifd_tests::qemu::{multifd_bin, temp_dir};

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
