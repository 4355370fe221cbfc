//! Regression tests for what a hostile peer or a careless operator did to `multifd recv` (issue 15,
//! RELIABILITY.md "Hardening"). Each one failed on the receiver before the fix:
//!
//! - `H1` huge timeouts panicked (`--accept-timeout 1e19`, `--io-timeout 1e20`) at start or when the
//!   first peer connected;
//! - `H2` a symbolic link planted in `--out` under the temporary or the final name of a block file
//!   was followed, so the receiver overwrote the link's target;
//! - `H3` an `--out` where no file can be created was found only after the whole migration arrived;
//! - `H4` connections were identified one at a time (one idle connection held up the real ones until
//!   the io timeout), and one that closed before sending anything, or sent bytes that are not a
//!   migration's, failed the receive;
//! - `H5` the main stream was not read until every channel had connected: a wrong version, a source
//!   not using multifd, or a return-path request waited for the accept (or io) timeout;
//! - `H6` a source with more channels than `--channels` got a different error depending on timing;
//! - `H7` SIGTERM (or SIGINT) while the block file was written left the partial file behind.
//!
//! The fake sources are raw sockets writing streams built with the core's wire encoders (one block
//! `m0` of 4 pages, two channels), as in `transport_faults.rs`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use multifd_core::wire::stream::Record;
use multifd_std::recv::{self, Limits, Outcome};
use multifd_tests::qemu::{multifd_bin, temp_dir};
use multifd_tests::synthetic::{self, emit, init, main_head};
use multifd_tests::{recv_error, with_deadline, worker_thread_count};

const PAGE: usize = 4096;
const PAGES: usize = 4;

fn main_stream() -> Vec<u8> {
    synthetic::main_stream((PAGES * PAGE) as u64, 1, true)
}

/// Channel `id`'s whole share (id 0: pages 0 and 1, id 1: pages 2 and 3), then its SYNC.
fn channel(id: u8) -> Vec<u8> {
    let mut c = init(id);
    let first = usize::from(id) * 2;
    synthetic::packet(&mut c, false, &[(first, 0x10 + first as u8), (first + 1, 0x11 + first as u8)], &[]);
    synthetic::packet(&mut c, true, &[], &[]);
    c
}

fn connect(port: u16, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(bytes).unwrap();
    s
}

/// Plays a whole, correct two-channel migration on `port`.
fn migrate(port: u16) {
    let conns = [connect(port, &main_stream()), connect(port, &channel(0)), connect(port, &channel(1))];
    drop(conns);
}

fn limits(accept: u64, io: u64) -> Limits {
    Limits {
        accept_timeout: Some(Duration::from_secs(accept)),
        io_timeout: Some(Duration::from_secs(io)),
        max_ram: 1 << 30,
        ..Limits::default()
    }
}

fn options(dir: &Path) -> recv::Options {
    recv::Options {
        listen: "127.0.0.1:0".into(),
        channels: 2,
        out: dir.join("out"),
        uuid: None,
        page_size: PAGE as u32,
        port_file: Some(dir.join("port")),
        prealloc: Vec::new(),
        progress: false,
    }
}

fn read_port(port_file: &Path, deadline: Instant) -> Option<u16> {
    while Instant::now() < deadline {
        if let Some(p) = std::fs::read_to_string(port_file).ok().and_then(|t| t.trim().parse().ok()) {
            return Some(p);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Runs the receiver in this process with `opts` and `limits` while `feed` plays on its port;
/// returns the outcome and how long the receiver ran. Checks that every worker was joined.
fn recv_with(opts: &recv::Options, limits: &Limits, feed: impl FnOnce(u16) + Send) -> (Outcome, Duration) {
    let r = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let t0 = Instant::now();
            (recv::run_with(opts, limits), t0.elapsed())
        });
        let port_file = opts.port_file.clone().unwrap();
        let port = read_port(&port_file, Instant::now() + Duration::from_secs(10)).expect("the receiver wrote no port");
        feed(port);
        receiver.join().expect("the receiver panicked")
    });
    assert_eq!(worker_thread_count(), 0, "receive workers still running after run_with returned");
    r
}

/// Checks that `m0.bin` in `out` holds the four pages of [`channel`] and is a regular file.
fn assert_block_file(out: &Path) {
    let path = out.join("m0.bin");
    let meta = std::fs::symlink_metadata(&path).expect("m0.bin");
    assert!(meta.file_type().is_file(), "m0.bin is not a regular file: {:?}", meta.file_type());
    let got = std::fs::read(&path).unwrap();
    assert_eq!(got.len(), PAGES * PAGE);
    for p in 0..PAGES {
        assert!(got[p * PAGE..(p + 1) * PAGE].iter().all(|&b| b == 0x10 + p as u8), "page {p}");
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// A `multifd recv` process for 2 channels on a free port, with its stderr captured: `out` and
/// `port_file` as given, then `extra`.
fn spawn_recv(out: &str, port_file: &str, extra: &[&str]) -> Child {
    Command::new(multifd_bin())
        .args(["recv", "--listen", "127.0.0.1:0", "--channels", "2", "--out", out, "--port-file", port_file])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn multifd recv")
}

/// Waits at most `secs` for `child` to exit; kills it if it does not. Returns (exit code, stderr).
fn wait_child(mut child: Child, secs: u64) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code(), err)
}

/// H1: timeouts too large for the clock are refused in one line at start (exit 2), and none makes
/// the receiver panic, neither at start nor when a peer connects. The library takes any `Duration`,
/// `Duration::MAX` included, without panicking.
#[test]
fn h1_huge_timeouts_are_refused_and_never_panic() {
    with_deadline(60, "h1_huge_timeouts_are_refused_and_never_panic", || {
        let dir = temp_dir("h1-cli");
        for (option, value) in [("--accept-timeout", "1e19"), ("--io-timeout", "1e20"), ("--accept-timeout", "inf")] {
            let port_file = dir.join("port");
            let _ = std::fs::remove_file(&port_file);
            let out = dir.join("out");
            let child = spawn_recv(out.to_str().unwrap(), port_file.to_str().unwrap(), &[option, value]);
            // If it listens anyway, be its first peer (the old receiver panicked right there).
            if let Some(port) = read_port(&port_file, Instant::now() + Duration::from_secs(2)) {
                let _c = connect(port, &main_head((PAGES * PAGE) as u64));
                std::thread::sleep(Duration::from_millis(300));
            }
            let (code, err) = wait_child(child, 5);
            assert!(!err.contains("panicked"), "{option} {value}: panicked: {err}");
            assert_eq!(code, Some(2), "{option} {value}: exit code, stderr: {err}");
            let first = err.lines().next().unwrap_or_default();
            assert!(first.contains(value) && first.contains("at most"), "{option} {value}: {err}");
        }
        // In-process: the largest durations there are, and a whole migration under them.
        let dir = temp_dir("h1-lib");
        let huge = Limits {
            accept_timeout: Some(Duration::MAX),
            io_timeout: Some(Duration::MAX),
            max_ram: 1 << 30,
            ..Limits::default()
        };
        let (outcome, _) = recv_with(&options(&dir), &huge, migrate);
        assert_eq!(recv_error(&outcome), None);
        assert_block_file(&dir.join("out"));
    });
}

/// H2: links planted in `--out` under the names the receiver uses (the old predictable temporary
/// name `.m0.bin.part-<pid>` and the final `m0.bin`) are never followed: their targets keep their
/// bytes and `m0.bin` ends as a regular file with the migrated RAM, mode 0600.
#[test]
fn h2_planted_symlinks_in_out_are_not_followed() {
    with_deadline(60, "h2_planted_symlinks_in_out_are_not_followed", || {
        let dir = temp_dir("h2");
        let out = dir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let victim_tmp = dir.join("victim-tmp");
        let victim_final = dir.join("victim-final");
        std::fs::write(&victim_tmp, b"precious").unwrap();
        std::fs::write(&victim_final, b"precious").unwrap();
        let tmp_name = format!(".m0.bin.part-{}", std::process::id());
        std::os::unix::fs::symlink(&victim_tmp, out.join(tmp_name)).unwrap();
        std::os::unix::fs::symlink(&victim_final, out.join("m0.bin")).unwrap();
        let (outcome, _) = recv_with(&options(&dir), &limits(10, 10), migrate);
        assert_eq!(recv_error(&outcome), None);
        assert_eq!(std::fs::read(&victim_tmp).unwrap(), b"precious", "the link at the temporary name was followed");
        assert_eq!(std::fs::read(&victim_final).unwrap(), b"precious", "the link at the final name was followed");
        assert_block_file(&out);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("m0.bin")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "guest RAM readable by others: mode {mode:o}");
    });
}

/// H3: an `--out` in which no file can be created (here under `/proc`, where even root cannot) is
/// refused before the receiver listens: no port is ever written, the error names the directory,
/// and a source cannot connect.
#[test]
fn h3_unwritable_out_is_refused_before_listening() {
    with_deadline(60, "h3_unwritable_out_is_refused_before_listening", || {
        let dir = temp_dir("h3");
        let port_file = dir.join("port");
        let child = spawn_recv("/proc/self/fdinfo", port_file.to_str().unwrap(), &[]);
        // The old receiver listened and took the whole migration before it found out.
        let port = read_port(&port_file, Instant::now() + Duration::from_secs(2));
        if let Some(port) = port {
            migrate(port);
        }
        let (code, err) = wait_child(child, 5);
        assert_eq!(port, None, "the receiver listened with an unwritable --out; stderr: {err}");
        assert_eq!(code, Some(1), "stderr: {err}");
        assert!(err.contains("/proc/self/fdinfo"), "the error does not name --out: {err}");
        // And a port file that cannot be created is refused the same way.
        let out = dir.join("out");
        let child = spawn_recv(out.to_str().unwrap(), "/proc/self/fdinfo/port", &[]);
        let (code, err) = wait_child(child, 5);
        assert_eq!(code, Some(1), "stderr: {err}");
        assert!(err.contains("/proc/self/fdinfo/port"), "the error does not name --port-file: {err}");
        assert!(!err.contains("listening on"), "it listened before checking --port-file: {err}");
    });
}

/// H4: connections that are not part of the migration neither hold it up nor fail it: one idle
/// connection, one closed at once, one sending an HTTP request, and more idle ones than the
/// receiver keeps waiting at once, all before the real connections. The migration completes long
/// before the io timeout (20 s), byte for byte.
#[test]
fn h4_stray_connections_neither_delay_nor_fail_a_migration() {
    with_deadline(60, "h4_stray_connections_neither_delay_nor_fail_a_migration", || {
        let dir = temp_dir("h4");
        let (outcome, took) = recv_with(&options(&dir), &limits(20, 20), |port| {
            let idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
            drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
            let http = connect(port, b"GET / HTTP/1.0\r\n\r\n");
            let crowd: Vec<TcpStream> =
                (0..recv::MAX_PENDING + 8).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
            std::thread::sleep(Duration::from_millis(200));
            migrate(port);
            drop((idle, http, crowd));
        });
        assert_eq!(recv_error(&outcome), None);
        assert!(took < Duration::from_secs(8), "took {took:?}: stray connections held the migration up");
        assert_block_file(&dir.join("out"));
    });
}

/// The main stream, `main`, alone (no channel ever connects): the receiver must fail within a few
/// seconds with an error containing every one of `want`, although its accept and io timeouts are
/// 30 s. `hold` keeps the connection open afterwards (a source waiting for an answer).
fn main_alone_fails_fast(tag: &str, main: &[u8], want: &[&str]) {
    let dir = temp_dir(tag);
    let (outcome, took) = recv_with(&options(&dir), &limits(30, 30), |port| {
        let mut s = connect(port, main);
        // A source waiting for an answer: read until the receiver closes.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.read(&mut [0u8; 64]);
    });
    let err = recv_error(&outcome).unwrap_or_else(|| panic!("{tag}: the receiver completed"));
    for w in want {
        assert!(err.contains(w), "{tag}: error {err:?} does not say {w:?}");
    }
    assert!(took < Duration::from_secs(5), "{tag}: took {took:?}");
    assert!(files_in(&dir.join("out")).is_empty(), "{tag}: files left behind");
}

/// H5: the main stream is validated as soon as it arrives, before any channel connects: a wrong
/// stream version, a source that is not using multifd (a page with data on the main stream, after
/// its first EOS), and a return-path request each fail at once, naming the cause.
#[test]
fn h5_main_stream_is_checked_before_the_channels_arrive() {
    with_deadline(60, "h5_main_stream_is_checked_before_the_channels_arrive", || {
        let mut bad_version = main_head((PAGES * PAGE) as u64);
        bad_version[7] = 2;
        main_alone_fails_fast("h5-version", &bad_version, &["main stream", "version"]);

        let mut plain = main_head((PAGES * PAGE) as u64);
        emit(&mut plain, Record::Eos);
        emit(&mut plain, Record::Footer { section_id: 1 });
        emit(&mut plain, Record::SectionPart { end: false, section_id: 1 });
        // RAM_SAVE_FLAG_PAGE (0x08) for offset 0 of block "m0", then the page.
        plain.extend_from_slice(&0x08u64.to_be_bytes());
        plain.push(2);
        plain.extend_from_slice(b"m0");
        plain.extend_from_slice(&[0x5a; PAGE]);
        main_alone_fails_fast("h5-plain", &plain, &["not using multifd"]);

        let mut rp = Vec::new();
        emit(&mut rp, Record::FileHeader);
        emit(&mut rp, Record::Configuration { machine: b"none" });
        emit(&mut rp, Record::Command { cmd: 1, data: &[] });
        emit(&mut rp, Record::Command { cmd: 2, data: &[0, 0, 0, 1] });
        main_alone_fails_fast("h5-return-path", &rp, &["return path", "return-path"]);
    });
}

/// H6: a source with one channel more than `--channels 2` gets the same error whenever the extra
/// channel connects: first, between the others, or last (when the old receiver had closed its
/// listener, so the source gave up and the error was about the main stream ending early).
#[test]
fn h6_too_many_channels_gets_one_message() {
    with_deadline(60, "h6_too_many_channels_gets_one_message", || {
        for (tag, order) in [("h6-first", [2u8, 0, 1]), ("h6-middle", [0, 2, 1]), ("h6-last", [0, 1, 2])] {
            let dir = temp_dir(tag);
            let (outcome, took) = recv_with(&options(&dir), &limits(10, 10), |port| {
                // As QEMU does: the main stream first, its header and configuration; then channels.
                let mut head = Vec::new();
                emit(&mut head, Record::FileHeader);
                emit(&mut head, Record::Configuration { machine: b"none" });
                let main = connect(port, &head);
                std::thread::sleep(Duration::from_millis(100));
                let mut chans = Vec::new();
                for id in order {
                    match TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| s.write_all(&init(id)).map(|()| s)) {
                        Ok(s) => chans.push(s),
                        // Refused: a source aborts its migration and closes the main stream.
                        Err(_) => break,
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(Duration::from_millis(300));
                let _ = main.shutdown(Shutdown::Both);
            });
            let err = recv_error(&outcome).unwrap_or_else(|| panic!("{tag}: the receiver completed"));
            assert!(err.contains("channel id 2 is out of range for 2 channels"), "{tag}: {err}");
            assert!(took < Duration::from_secs(5), "{tag}: took {took:?}");
        }
    });
}

/// H7: SIGTERM and SIGINT while the receiver writes a large block file: it stops, removes the
/// partial file, says so in one line and exits with 128 + the signal's number.
#[test]
fn h7_signals_stop_cleanly_and_leave_no_partial_file() {
    with_deadline(120, "h7_signals_stop_cleanly_and_leave_no_partial_file", || {
        for (signal, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
            let dir = temp_dir(&format!("h7-{signal}"));
            let out = dir.join("out");
            let port_file = dir.join("port");
            // A 1 GiB block sent as zero pages: cheap to send, and then the receiver has 1 GiB to
            // write once the migration completed, long enough to be interrupted in.
            let size: u64 = 1 << 30;
            let child = spawn_recv(out.to_str().unwrap(), port_file.to_str().unwrap(), &[]);
            let port = read_port(&port_file, Instant::now() + Duration::from_secs(10)).expect("no port");
            let pages = (size as usize) / PAGE;
            let per_packet = synthetic::geo().page_count() as usize;
            let mut chans = [init(0), init(1)];
            for (i, first) in (0..pages).step_by(per_packet).enumerate() {
                let zero: Vec<usize> = (first..(first + per_packet).min(pages)).collect();
                synthetic::packet(&mut chans[i % 2], false, &[], &zero);
            }
            for c in &mut chans {
                synthetic::packet(c, true, &[], &[]);
            }
            let main = connect(port, &synthetic::main_stream(size, 1, true));
            let writers: Vec<_> = chans
                .iter()
                .map(|c| {
                    let c = c.clone();
                    std::thread::spawn(move || drop(connect(port, &c)))
                })
                .collect();
            writers.into_iter().for_each(|w| w.join().unwrap());
            drop(main);
            // Wait until the partial file appears (the receiver is writing), then signal.
            let deadline = Instant::now() + Duration::from_secs(20);
            while !files_in(&out).iter().any(|f| f.starts_with(".m0.bin") && file_len(&out.join(f)) > 0) {
                assert!(Instant::now() < deadline, "signal {signal}: no partial file appeared: {:?}", files_in(&out));
                std::thread::sleep(Duration::from_millis(1));
            }
            // SAFETY: sends a signal to the child this test started and has not reaped.
            assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
            let (got, err) = wait_child(child, 20);
            assert_eq!(got, Some(code), "signal {signal}: exit code; stderr: {err}");
            assert!(err.contains("interrupted by SIG"), "signal {signal}: {err}");
            assert!(files_in(&out).is_empty(), "signal {signal}: left behind: {:?}", files_in(&out));
        }
    });
}

fn file_len(p: &PathBuf) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}
