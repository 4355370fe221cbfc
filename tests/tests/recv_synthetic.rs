//! `multifd recv` against streams built here from the wire encoders, over loopback TCP: cases a real
//! QEMU does not produce on demand. The epoch test holds back one channel so that, without the
//! barrier, an older copy of a page would overwrite a newer one; refusals of bad handshakes; a
//! channel cut inside a packet; a hostile offset; a `--prealloc` that disagrees with the block list.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use multifd_tests::qemu::{Recv, json_num, temp_dir};
use multifd_tests::synthetic::{self, init};
use multifd_tests::with_deadline;

fn main_stream(markers: u32, eof: bool) -> Vec<u8> {
    synthetic::main_stream((PAGES * PAGE) as u64, markers, eof)
}

fn packet(out: &mut Vec<u8>, sync: bool, pages: &[(usize, u8)]) {
    synthetic::packet(out, sync, pages, &[]);
}

const PAGE: usize = 4096;
const PAGES: usize = 4;

fn connect(port: u16, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(bytes).unwrap();
    s
}

/// Page 0 is sent as 0xAA in epoch 1 on channel 0 and as 0xBB in epoch 2 on channel 1; channel 0's
/// bytes are held back. Only a receiver that keeps channel 1 parked until epoch 1 is complete ends
/// with 0xBB.
#[test]
fn recv_epoch_barrier_orders_a_page_resent_on_another_channel() {
    with_deadline(30, "recv_epoch_barrier_orders_a_page_resent_on_another_channel", || {
        let dir = temp_dir("epoch");
        let out = dir.join("out");
        let recv = Recv::start(&dir, &out, 2, &[]);
        let mut ch0 = init(0);
        packet(&mut ch0, true, &[(0, 0xAA)]);
        packet(&mut ch0, true, &[]);
        let mut ch1 = init(1);
        packet(&mut ch1, true, &[(1, 1), (2, 2), (3, 3)]);
        packet(&mut ch1, true, &[(0, 0xBB)]);
        let main = connect(recv.port, &main_stream(2, true));
        let c1 = connect(recv.port, &ch1);
        let mut c0 = connect(recv.port, &ch0[..64]);
        // Let channel 1 run ahead to its park at epoch 2 while channel 0 holds its epoch-1 data
        // back (the order is only what makes the test worth running; the result holds in any).
        std::thread::sleep(Duration::from_millis(500));
        c0.write_all(&ch0[64..]).unwrap();
        drop((main, c0, c1));
        let (code, json, stderr) = recv.wait(10);
        assert_eq!(code, Some(0), "{stderr}\n{json}");
        assert_eq!(json_num(&json, "sync_epochs"), Some(2), "{json}");
        let got = std::fs::read(out.join("m0.bin")).unwrap();
        let page0 = got[0];
        assert!(
            got[..PAGE].iter().all(|&b| b == 0xBB),
            "page 0 holds {page0:#x}: the epoch-1 copy overwrote the epoch-2 copy"
        );
        for p in 1..PAGES {
            assert!(got[p * PAGE..(p + 1) * PAGE].iter().all(|&b| b == p as u8), "page {p}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Runs a receiver for 2 channels, feeds it `conns`, and returns its failure line and JSON.
fn expect_failure(tag: &str, extra: &[&str], conns: &[Vec<u8>]) -> (String, String, std::path::PathBuf) {
    let dir = temp_dir(tag);
    let out = dir.join("out");
    let recv = Recv::start(&dir, &out, 2, extra);
    let streams: Vec<TcpStream> = conns.iter().map(|c| connect(recv.port, c)).collect();
    std::thread::sleep(Duration::from_millis(50));
    drop(streams);
    let (code, json, stderr) = recv.wait(10);
    assert_ne!(code, Some(0), "{tag}: must fail: {stderr}");
    assert!(multifd_tests::qemu::json_status(&json, "failed"), "{json}");
    let line = stderr.lines().find(|l| l.starts_with("multifd recv: failed:")).unwrap_or_default().to_owned();
    let left = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "{tag}: files left in {}", out.display());
    (line, json, dir)
}

#[test]
fn recv_refuses_bad_handshakes() {
    with_deadline(30, "recv_refuses_bad_handshakes", || {
        let (line, _, _) = expect_failure("id-range", &[], &[init(2)]);
        assert!(
            line.contains("connection #0") && line.contains("channel id 2 is out of range for 2 channels"),
            "{line}"
        );
        let (line, _, _) = expect_failure("dup-id", &[], &[init(1), init(1)]);
        assert!(line.contains("connection #1") && line.contains("channel id 1 is already set up"), "{line}");
        let main = main_stream(1, true);
        let (line, _, _) = expect_failure("dup-main", &[], &[main.clone(), main]);
        assert!(line.contains("connection #1") && line.contains("second main stream"), "{line}");
        // Not a migration's connection: dropped (logged), so the channels are missing at the end.
        let http = [b"GET / HTTP/1.0\r\n".to_vec()];
        let (line, _, _) = expect_failure("magic", &["--accept-timeout", "1"], &http);
        assert!(line.contains("never connected") && line.contains("1 other connection was dropped"), "{line}");
    });
}

#[test]
fn recv_channel_cut_inside_a_packet_names_the_channel() {
    with_deadline(30, "recv_channel_cut_inside_a_packet_names_the_channel", || {
        let mut ch1 = init(1);
        packet(&mut ch1, false, &[(1, 1), (2, 2)]);
        ch1.truncate(ch1.len() - 100);
        let mut ch0 = init(0);
        packet(&mut ch0, true, &[(0, 9)]);
        let (line, _, _) = expect_failure("cut", &[], &[main_stream(1, true), ch0, ch1]);
        assert!(line.contains("channel 1") && line.contains("inside page 1 of 2"), "{line}");
    });
}

#[test]
fn recv_hostile_offset_is_refused_with_its_value() {
    with_deadline(30, "recv_hostile_offset_is_refused_with_its_value", || {
        let mut ch0 = init(0);
        packet(&mut ch0, false, &[(PAGES, 1)]);
        let (line, _, _) = expect_failure("offset", &[], &[main_stream(1, true), ch0, init(1)]);
        assert!(line.contains("channel 0") && line.contains("0x4000"), "{line}");
    });
}

#[test]
fn recv_prealloc_must_agree_with_the_block_list() {
    with_deadline(30, "recv_prealloc_must_agree_with_the_block_list", || {
        let conns = [main_stream(1, true), init(0), init(1)];
        let (line, _, _) = expect_failure("prealloc-size", &["--prealloc", "m0:8K"], &conns);
        assert!(line.contains("m0") && line.contains("--prealloc size 8192"), "{line}");
        let (line, _, _) = expect_failure("prealloc-name", &["--prealloc", "pc.ram:16K"], &conns);
        assert!(line.contains("pc.ram") && line.contains("not in the source's block list"), "{line}");
    });
}

/// Main stream ended (EOF) while a channel still waits at a SYNC it sent: an unpaired epoch.
#[test]
fn recv_sync_without_marker_fails() {
    with_deadline(30, "recv_sync_without_marker_fails", || {
        let mut ch0 = init(0);
        packet(&mut ch0, true, &[(0, 1), (1, 1)]);
        packet(&mut ch0, true, &[]);
        let mut ch1 = init(1);
        packet(&mut ch1, true, &[(2, 1), (3, 1)]);
        let (line, _, _) = expect_failure("unpaired", &[], &[main_stream(1, true), ch0, ch1]);
        assert!(line.contains("channel 0") && line.contains("SYNC"), "{line}");
    });
}
