//! Transport faults on both sides, over loopback TCP: a fake sender (raw sockets writing streams built
//! with the core's wire encoders) against the receiver, and a fake receiver against the sender.
//!
//! Faults: a reset inside a packet; an end of stream inside a header and inside page data; garbage
//! after a valid init packet; a stalled peer; an extra connection; a connection that never comes; the
//! main stream closing early; a block list larger than `--max-ram`. Each test asserts the failure
//! message (it names the connection and the cause), a time bound, that every channel worker was
//! joined (`worker_thread_count`, the engines run in this process) and that no block file exists under
//! its final name. The cancelled-send test runs both `multifd` processes and interrupts the sender.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use multifd_core::send::{Precopy, RoundStats, Step};
use multifd_core::wire::stream::Record;
use multifd_core::wire::{Geometry, InitPacket};
use multifd_std::recv::{self, Control, Limits, Outcome as Report};
use multifd_std::send::{self, GuestImage, ImageSet, SendLimits, SendOptions};
use multifd_tests::qemu::{multifd_bin, temp_dir};
use multifd_tests::synthetic::{self, emit, init, main_head};
use multifd_tests::{with_deadline, worker_thread_count};

fn packet(out: &mut Vec<u8>, sync: bool, pages: &[(usize, u8)]) {
    synthetic::packet(out, sync, pages, &[]);
}

const PAGE: usize = 4096;
const PAGES: usize = 4;

// ---------------------------------------------------------------------------------------------
// Streams for the fake sender (the same layout recv_synthetic.rs uses: one block m0 of 4 pages).

/// A whole main stream: block list, one sync marker, and the EOF record if `eof`.
fn main_stream(eof: bool) -> Vec<u8> {
    synthetic::main_stream((PAGES * PAGE) as u64, 1, eof)
}

fn header_len() -> usize {
    Geometry::new(PAGE as u32).unwrap().header_len()
}

/// Channel 0's whole share: pages 0 and 1, then the SYNC of the one epoch.
fn ch0_full() -> Vec<u8> {
    let mut c = init(0);
    packet(&mut c, false, &[(0, 0x10), (1, 0x11)]);
    packet(&mut c, true, &[]);
    c
}

/// Channel 1's whole share: pages 2 and 3, then the SYNC.
fn ch1_full() -> Vec<u8> {
    let mut c = init(1);
    packet(&mut c, false, &[(2, 0x12), (3, 0x13)]);
    packet(&mut c, true, &[]);
    c
}

fn connect(port: u16, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(bytes).unwrap();
    s
}

/// Closes `s` with a reset (SO_LINGER with a zero timeout) instead of an orderly end of stream.
fn reset(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid `linger` value and its size for SO_LINGER on the socket's open descriptor.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(s);
}

/// Waits until the receiver has identified the main stream and every channel.
fn wait_all_accepted(ctl: &Control) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ctl.all_connected() {
        assert!(Instant::now() < deadline, "the receiver has not identified every connection after 10 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Names of the files in `dir` (none if it does not exist).
fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Short limits for the tests: 1 s accept and io timeouts.
fn short_limits() -> Limits {
    Limits {
        accept_timeout: Some(Duration::from_secs(1)),
        io_timeout: Some(Duration::from_secs(1)),
        max_ram: 1 << 30,
        ..Limits::default()
    }
}

/// Runs the receiver (2 channels) in this process with `limits` while `feed` plays the sender on
/// its port. Returns the report and the receiver's run time, after checking what every failure
/// must leave behind: no block file, every worker joined.
fn recv_fault(
    tag: &str,
    channels: u8,
    limits: &Limits,
    feed: impl FnOnce(u16, &Control) + Send,
) -> (Report, Duration, PathBuf) {
    let dir = temp_dir(tag);
    let out = dir.join("out");
    let port_file = dir.join("port");
    let opts = recv::Options {
        listen: "127.0.0.1:0".into(),
        channels,
        out: out.clone(),
        uuid: None,
        page_size: PAGE as u32,
        port_file: Some(port_file.clone()),
        prealloc: Vec::new(),
        progress: false,
    };
    let control = Control::new();
    let (report, took) = std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let t0 = Instant::now();
            let r = recv::run_controlled(&opts, limits, &control);
            (r, t0.elapsed())
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file).ok().and_then(|t| t.trim().parse::<u16>().ok()) {
                break p;
            }
            assert!(Instant::now() < deadline && !receiver.is_finished(), "{tag}: the receiver wrote no port");
            std::thread::sleep(Duration::from_millis(2));
        };
        feed(port, &control);
        receiver.join().expect("the receiver panicked")
    });
    assert_eq!(worker_thread_count(), 0, "{tag}: receive workers still running after run_with returned");
    (report, took, out)
}

/// Checks a failed receive: the error contains every one of `want`, it came within `bound`, and no
/// file is left in the output directory.
fn assert_recv_failed(tag: &str, (report, took, out): &(Report, Duration, PathBuf), want: &[&str], bound: Duration) {
    let err = multifd_tests::recv_error(report).unwrap_or_else(|| panic!("{tag}: the receiver completed"));
    for w in want {
        assert!(err.contains(w), "{tag}: error {err:?} does not say {w:?}");
    }
    assert!(!err.contains('\n'), "{tag}: error is not one line: {err:?}");
    assert!(*took < bound, "{tag}: took {took:?}, bound {bound:?}");
    let left = files_in(out);
    assert!(left.is_empty(), "{tag}: files left in {}: {left:?}", out.display());
}

// ---------------------------------------------------------------------------------------------
// Receiver side.

#[test]
fn recv_channel_reset_mid_packet() {
    with_deadline(30, "recv_channel_reset_mid_packet", || {
        let r = recv_fault("r-reset", 2, &short_limits(), |port, ctl| {
            let _main = connect(port, &main_stream(true));
            let _c0 = connect(port, &ch0_full());
            let mut c1 = init(1);
            packet(&mut c1, false, &[(2, 0x12), (3, 0x13)]);
            let c1 = connect(port, &c1[..64 + header_len() + PAGE / 2]);
            wait_all_accepted(ctl);
            std::thread::sleep(Duration::from_millis(200));
            reset(c1);
        });
        assert_recv_failed("r-reset", &r, &["channel 1", "reading", "reset"], Duration::from_secs(5));
    });
}

#[test]
fn recv_channel_eof_inside_a_header() {
    with_deadline(30, "recv_channel_eof_inside_a_header", || {
        let r = recv_fault("r-eof-header", 2, &short_limits(), |port, ctl| {
            let _main = connect(port, &main_stream(true));
            let _c0 = connect(port, &ch0_full());
            let mut c1 = init(1);
            packet(&mut c1, false, &[(2, 0x12)]);
            let c1 = connect(port, &c1[..64 + 20]);
            wait_all_accepted(ctl);
            c1.shutdown(Shutdown::Write).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        assert_recv_failed(
            "r-eof-header",
            &r,
            &["channel 1", "header", "closed by the sender (migration aborted by the peer or connection cut)"],
            Duration::from_secs(5),
        );
    });
}

#[test]
fn recv_channel_eof_inside_page_data() {
    with_deadline(30, "recv_channel_eof_inside_page_data", || {
        let r = recv_fault("r-eof-page", 2, &short_limits(), |port, ctl| {
            let _main = connect(port, &main_stream(true));
            let _c0 = connect(port, &ch0_full());
            let mut c1 = init(1);
            packet(&mut c1, false, &[(2, 0x12), (3, 0x13)]);
            let c1 = connect(port, &c1[..64 + header_len() + PAGE + 100]);
            wait_all_accepted(ctl);
            c1.shutdown(Shutdown::Write).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        assert_recv_failed(
            "r-eof-page",
            &r,
            &[
                "channel 1",
                "inside page 1 of 2",
                "closed by the sender (migration aborted by the peer or connection cut)",
            ],
            Duration::from_secs(5),
        );
    });
}

#[test]
fn recv_garbage_after_a_valid_init_packet() {
    with_deadline(30, "recv_garbage_after_a_valid_init_packet", || {
        let r = recv_fault("r-garbage", 2, &short_limits(), |port, ctl| {
            let _main = connect(port, &main_stream(true));
            let _c0 = connect(port, &ch0_full());
            let mut c1 = init(1);
            c1.extend(std::iter::repeat_n(0x5A, 4096));
            let _c1 = connect(port, &c1);
            wait_all_accepted(ctl);
            std::thread::sleep(Duration::from_millis(300));
        });
        assert_recv_failed("r-garbage", &r, &["channel 1", "magic", "0x5a5a5a5a"], Duration::from_secs(5));
    });
}

/// Channel 1 sends half a header and goes silent; channel 0 parks at its SYNC and the main stream
/// waits at its marker, so nothing arrives anywhere: after the 1 s io timeout channel 1 gives up.
#[test]
fn recv_stalled_channel_times_out() {
    with_deadline(30, "recv_stalled_channel_times_out", || {
        let r = recv_fault("r-stall", 2, &short_limits(), |port, ctl| {
            let _main = connect(port, &main_stream(false));
            let _c0 = connect(port, &ch0_full());
            let mut c1 = init(1);
            packet(&mut c1, false, &[(2, 0x12)]);
            let _c1 = connect(port, &c1[..64 + 30]);
            wait_all_accepted(ctl);
            // Held open (and silent) until the receiver gave up.
            std::thread::sleep(Duration::from_millis(2000));
        });
        assert_recv_failed(
            "r-stall",
            &r,
            &["channel 1: stalled: no data arrived on any connection for 1 s while reading (--io-timeout)"],
            Duration::from_secs(6),
        );
        assert!(r.1 >= Duration::from_secs(1), "gave up before the io timeout: {:?}", r.1);
    });
}

/// The main stream stops inside its block list, every channel only sent its init packet.
#[test]
fn recv_stalled_main_stream_times_out() {
    with_deadline(30, "recv_stalled_main_stream_times_out", || {
        let r = recv_fault("r-stall-main", 2, &short_limits(), |port, _| {
            let m = main_head((PAGES * PAGE) as u64);
            let _main = connect(port, &m[..m.len() - 5]);
            let _c0 = connect(port, &init(0));
            let _c1 = connect(port, &init(1));
            std::thread::sleep(Duration::from_millis(2000));
        });
        assert_recv_failed("r-stall-main", &r, &["main stream: stalled", "--io-timeout"], Duration::from_secs(6));
    });
}

/// A connection that sends two bytes and nothing more cannot be identified: it is dropped after the
/// io timeout (it may be anyone's, so it does not fail the migration), and the accept timeout then
/// names what never connected and says a connection was dropped.
#[test]
fn recv_stalled_handshake_is_dropped() {
    with_deadline(30, "recv_stalled_handshake_is_dropped", || {
        let mut limits = short_limits();
        limits.accept_timeout = Some(Duration::from_secs(2));
        let r = recv_fault("r-stall-ident", 2, &limits, |port, _| {
            let _c = connect(port, &[0x11, 0x22]);
            std::thread::sleep(Duration::from_millis(2500));
        });
        assert_recv_failed(
            "r-stall-ident",
            &r,
            &["main stream, channel 0, channel 1 never connected", "1 other connection was dropped unidentified"],
            Duration::from_secs(6),
        );
    });
}

/// A few bytes and then a close, before the receiver could tell what the connection is: dropped at
/// once (a peek would keep returning the two bytes for ever), and a real migration right after it
/// completes.
#[test]
fn recv_connection_closed_after_two_bytes_is_dropped() {
    with_deadline(30, "recv_connection_closed_after_two_bytes_is_dropped", || {
        let mut limits = short_limits();
        limits.io_timeout = Some(Duration::from_secs(20));
        let (report, took, out) = recv_fault("r-closed-2", 2, &limits, |port, _| {
            let c = connect(port, &[0x11, 0x22]);
            c.shutdown(std::net::Shutdown::Write).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            drop((connect(port, &main_stream(true)), connect(port, &ch0_full()), connect(port, &ch1_full())));
        });
        assert_eq!(multifd_tests::recv_error(&report), None);
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert_eq!(std::fs::read(out.join("m0.bin")).unwrap().len(), PAGES * PAGE);
    });
}

/// An extra connection while the receiver still accepts: a second channel 1 is refused by name.
#[test]
fn recv_extra_connection_during_setup_is_refused() {
    with_deadline(30, "recv_extra_connection_during_setup_is_refused", || {
        let r = recv_fault("r-extra", 2, &short_limits(), |port, _| {
            let _c1 = connect(port, &init(1));
            let _c1b = connect(port, &init(1));
            std::thread::sleep(Duration::from_millis(300));
        });
        assert_recv_failed("r-extra", &r, &["connection #1", "channel id 1 is already set up"], Duration::from_secs(5));
    });
}

/// Extra connections once every connection is in: one that sends nothing is dropped and the
/// migration completes byte for byte; one that claims a channel already set up fails it by name.
#[test]
fn recv_extra_connection_after_setup() {
    with_deadline(30, "recv_extra_connection_after_setup", || {
        let (report, _, out) = recv_fault("r-extra-late", 2, &short_limits(), |port, ctl| {
            let main = connect(port, &main_head((PAGES * PAGE) as u64));
            let c0 = connect(port, &ch0_full());
            let c1 = connect(port, &ch1_full());
            wait_all_accepted(ctl);
            drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
            let mut main = main;
            let full = main_stream(true);
            main.write_all(&full[main_head((PAGES * PAGE) as u64).len()..]).unwrap();
            drop((main, c0, c1));
        });
        assert_eq!(multifd_tests::recv_error(&report), None);
        let got = std::fs::read(out.join("m0.bin")).unwrap();
        assert_eq!(got.len(), PAGES * PAGE);
        for p in 0..PAGES {
            assert!(got[p * PAGE..(p + 1) * PAGE].iter().all(|&b| b == 0x10 + p as u8), "page {p}");
        }
        let r = recv_fault("r-extra-late-dup", 2, &short_limits(), |port, ctl| {
            let _main = connect(port, &main_head((PAGES * PAGE) as u64));
            let _c0 = connect(port, &init(0));
            let _c1 = connect(port, &init(1));
            wait_all_accepted(ctl);
            let _dup = connect(port, &init(1));
            std::thread::sleep(Duration::from_millis(500));
        });
        assert_recv_failed(
            "r-extra-late-dup",
            &r,
            &["connection #3", "channel id 1 is already set up"],
            Duration::from_secs(5),
        );
    });
}

#[test]
fn recv_channel_that_never_arrives_is_named() {
    with_deadline(30, "recv_channel_that_never_arrives_is_named", || {
        let r = recv_fault("r-missing", 4, &short_limits(), |port, _| {
            let _main = connect(port, &main_stream(true));
            let _c0 = connect(port, &init(0));
            let _c2 = connect(port, &init(2));
            std::thread::sleep(Duration::from_millis(1600));
        });
        assert_recv_failed(
            "r-missing",
            &r,
            &["channel 1, channel 3 never connected: still missing 1 s after the first connection (--accept-timeout)"],
            Duration::from_secs(6),
        );
        let r = recv_fault("r-missing-main", 2, &short_limits(), |port, _| {
            let _c0 = connect(port, &init(0));
            let _c1 = connect(port, &init(1));
            std::thread::sleep(Duration::from_millis(1600));
        });
        assert_recv_failed("r-missing-main", &r, &["main stream never connected"], Duration::from_secs(6));
    });
}

/// The main stream ends early: after its sync marker but before the EOF record; inside a record;
/// with a reset. The channels sent everything.
#[test]
fn recv_main_stream_closing_early() {
    with_deadline(30, "recv_main_stream_closing_early", || {
        let r = recv_fault("r-main-early", 2, &short_limits(), |port, ctl| {
            let main = connect(port, &main_stream(false));
            let _c0 = connect(port, &ch0_full());
            let _c1 = connect(port, &ch1_full());
            wait_all_accepted(ctl);
            main.shutdown(Shutdown::Write).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        assert_recv_failed(
            "r-main-early",
            &r,
            &["main stream", "closed by the sender", "(migration aborted by the peer or connection cut)"],
            Duration::from_secs(5),
        );
        let r = recv_fault("r-main-mid-record", 2, &short_limits(), |port, ctl| {
            let main = connect(port, &main_head((PAGES * PAGE) as u64));
            let _c0 = connect(port, &ch0_full());
            let _c1 = connect(port, &ch1_full());
            wait_all_accepted(ctl);
            main.shutdown(Shutdown::Write).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        assert_recv_failed(
            "r-main-mid-record",
            &r,
            &["main stream at byte", "closed by the sender (migration aborted by the peer"],
            Duration::from_secs(5),
        );
        // The same with a reset instead of an orderly close.
        let r = recv_fault("r-main-reset", 2, &short_limits(), |port, ctl| {
            let main = connect(port, &main_head((PAGES * PAGE) as u64));
            let _c0 = connect(port, &ch0_full());
            let _c1 = connect(port, &ch1_full());
            wait_all_accepted(ctl);
            std::thread::sleep(Duration::from_millis(200));
            reset(main);
            std::thread::sleep(Duration::from_millis(300));
        });
        assert_recv_failed("r-main-reset", &r, &["main stream: reading", "reset"], Duration::from_secs(5));
    });
}

/// A block list declaring 1 TiB against a 2 GiB limit is refused before anything is mapped,
/// naming the block that crossed the limit and the sizes.
#[test]
fn recv_block_list_above_max_ram_is_refused() {
    with_deadline(30, "recv_block_list_above_max_ram_is_refused", || {
        let mut m = Vec::new();
        emit(&mut m, Record::FileHeader);
        emit(&mut m, Record::Configuration { machine: b"none" });
        emit(&mut m, Record::SectionStart { full: false, section_id: 1, name: b"ram", instance_id: 0, version_id: 4 });
        emit(&mut m, Record::MemSize { total: (1 << 30) + (1 << 40) });
        emit(&mut m, Record::BlockEntry { name: b"small", used_length: 1 << 30 });
        emit(&mut m, Record::BlockEntry { name: b"huge", used_length: 1 << 40 });
        let limits = Limits { max_ram: 1 << 31, ..short_limits() };
        let r = recv_fault("r-max-ram", 2, &limits, |port, _| {
            let _main = connect(port, &m);
            let _c0 = connect(port, &init(0));
            let _c1 = connect(port, &init(1));
            std::thread::sleep(Duration::from_millis(300));
        });
        assert_recv_failed(
            "r-max-ram",
            &r,
            &[
                "block \"huge\": declares 1099511627776 bytes, 1100585369600 bytes of RAM in all, above the limit of 2147483648 bytes (--max-ram)",
            ],
            Duration::from_secs(5),
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Sender side: a fake receiver.

/// Image size for the sender tests: large enough that the loopback socket buffers cannot hold it.
const SEND_BYTES: usize = 64 << 20;

/// A guest image with no zero page (every page is sent as data).
fn image(bytes: usize) -> Vec<u8> {
    let mut v = vec![0xA5u8; bytes];
    for (i, page) in v.chunks_mut(PAGE).enumerate() {
        page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    }
    v
}

/// A connection the fake receiver accepted, told apart by its first bytes.
enum Conn {
    Main(TcpStream),
    Channel(u8, TcpStream),
}

/// Accepts one connection and identifies it (reads the 64-byte init packet of a channel).
fn accept_one(l: &TcpListener) -> Conn {
    let (mut s, _) = l.accept().unwrap();
    let mut first = [0u8; 4];
    s.read_exact(&mut first).unwrap();
    if first == *b"QEVM" {
        Conn::Main(s)
    } else {
        let mut rest = [0u8; 64];
        rest[..4].copy_from_slice(&first);
        s.read_exact(&mut rest[4..]).unwrap();
        Conn::Channel(InitPacket::decode(&rest).unwrap().id, s)
    }
}

/// Reads `s` to its end on a thread of `scope`, discarding the bytes.
fn drain<'s>(scope: &'s std::thread::Scope<'s, '_>, mut s: TcpStream) {
    scope.spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
}

/// Reads exactly `n` bytes of `s` (fewer if it ends first).
fn read_n(s: &mut TcpStream, n: usize) {
    let mut buf = vec![0u8; n];
    let _ = s.read_exact(&mut buf);
}

/// One round of every page, then completion.
struct OneRound {
    all: Vec<u64>,
    none: Vec<u64>,
}

impl Precopy for OneRound {
    fn dirty(&mut self, round: u32, _block: usize) -> &[u64] {
        if round == 0 { &self.all } else { &self.none }
    }
    fn round_done(&mut self, _stats: &RoundStats) -> Step {
        Step::Complete
    }
}

fn send_limits() -> SendLimits {
    SendLimits {
        connect_timeout: Duration::from_secs(1),
        io_timeout: Some(Duration::from_secs(1)),
        max_bandwidth: None,
        ..SendLimits::default()
    }
}

/// Runs the sender (2 channels, `SEND_BYTES` of guest RAM) in this process against a fake receiver
/// on `listener`, played by `receiver` (which gets the listener). Returns the error and the time.
fn send_fault(tag: &str, listener: TcpListener, receiver: impl FnOnce(TcpListener) + Send) -> (String, Duration) {
    let addr: SocketAddr = listener.local_addr().unwrap();
    let blocks = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image(SEND_BYTES)))] };
    let pages = SEND_BYTES / PAGE;
    let mut emb = OneRound { all: vec![u64::MAX; pages.div_ceil(64)], none: vec![0; pages.div_ceil(64)] };
    let opts =
        SendOptions { connect: addr, channels: 2, uuid: [0; 16], machine: "none".into(), page_size: PAGE as u32 };
    let (result, took) = std::thread::scope(|s| {
        s.spawn(move || receiver(listener));
        let t0 = Instant::now();
        let r = send::migrate_with(&opts, &send_limits(), &blocks, &mut emb, &AtomicBool::new(false));
        (r, t0.elapsed())
    });
    assert_eq!(worker_thread_count(), 0, "{tag}: send workers still running after migrate_with returned");
    let err = match result {
        Ok(_) => panic!("{tag}: the sender completed"),
        Err(e) => e.to_string(),
    };
    assert!(!err.contains('\n'), "{tag}: error is not one line: {err:?}");
    (err, took)
}

fn listen() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// Whether `err` says the peer ended the connection (reset, broken pipe or closed).
fn says_closed(err: &str) -> bool {
    err.contains("reset") || err.contains("Broken pipe") || err.contains("closed the connection")
}

/// The fake receiver accepts the main stream and both channels, drains all but channel 1, and on
/// channel 1 calls `fault` once its init packet was read.
fn fault_on_channel_1(l: TcpListener, fault: impl FnOnce(TcpStream) + Send) {
    std::thread::scope(|s| {
        let mut fault = Some(fault);
        for _ in 0..3 {
            match accept_one(&l) {
                Conn::Main(m) => drain(s, m),
                Conn::Channel(1, c) => {
                    let f = fault.take().unwrap();
                    s.spawn(move || f(c));
                }
                Conn::Channel(_, c) => drain(s, c),
            }
        }
    });
}

#[test]
fn send_channel_reset_mid_packet() {
    with_deadline(60, "send_channel_reset_mid_packet", || {
        let (err, took) = send_fault("s-reset", listen(), |l| {
            fault_on_channel_1(l, |mut c| {
                read_n(&mut c, header_len() + 1000);
                reset(c);
            });
        });
        assert!(err.contains("channel 1") && says_closed(&err), "{err}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    });
}

#[test]
fn send_destination_ends_inside_a_header() {
    with_deadline(60, "send_destination_ends_inside_a_header", || {
        let (err, took) = send_fault("s-eof-header", listen(), |l| {
            fault_on_channel_1(l, |mut c| {
                read_n(&mut c, 20);
                c.shutdown(Shutdown::Both).unwrap();
                drop(c);
            });
        });
        assert!(err.contains("channel 1") && says_closed(&err), "{err}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    });
}

#[test]
fn send_destination_ends_inside_page_data() {
    with_deadline(60, "send_destination_ends_inside_page_data", || {
        let (err, took) = send_fault("s-eof-page", listen(), |l| {
            fault_on_channel_1(l, |mut c| {
                read_n(&mut c, header_len() + 3 * PAGE + 17);
                c.shutdown(Shutdown::Both).unwrap();
                drop(c);
            });
        });
        assert!(err.contains("channel 1") && says_closed(&err), "{err}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    });
}

/// The destination answers on a channel (a multifd destination never writes there).
#[test]
fn send_garbage_from_the_destination_after_the_init_packet() {
    with_deadline(60, "send_garbage_from_the_destination_after_the_init_packet", || {
        let (err, took) = send_fault("s-garbage", listen(), |l| {
            fault_on_channel_1(l, |mut c| {
                c.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n").unwrap();
                let mut buf = vec![0u8; 1 << 16];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            });
        });
        assert!(
            err.contains(
                "channel 1: the destination sent unexpected bytes (first 0x48) on a connection it may only read"
            ),
            "{err}"
        );
        assert!(took < Duration::from_secs(10), "{took:?}");
    });
}

/// The destination accepts everything and reads nothing: once the socket buffers are full, no byte
/// moves anywhere for the 1 s io timeout.
#[test]
fn send_stalled_destination_times_out() {
    with_deadline(60, "send_stalled_destination_times_out", || {
        let (err, took) = send_fault("s-stall", listen(), |l| {
            let conns: Vec<Conn> = (0..3).map(|_| accept_one(&l)).collect();
            // Held (unread) past the sender's 1 s io timeout.
            std::thread::sleep(Duration::from_millis(2500));
            drop(conns);
        });
        assert!(
            err.contains("channel") && err.contains("stalled: the destination took no data on any connection for 1 s"),
            "{err}"
        );
        assert!(err.contains("(--io-timeout)"), "{err}");
        assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(6), "{took:?}");
    });
}

/// A third channel against a real `multifd recv` set up for two: the receiver identifies it
/// (its listener stays open for the whole receive) and fails naming the channel id and the count,
/// whenever the extra channel arrives; it closes every connection, so the sender fails too. Both
/// within bounds, no block file.
#[test]
fn send_extra_channel_is_refused_by_the_receiver() {
    with_deadline(60, "send_extra_channel_is_refused_by_the_receiver", || {
        let dir = temp_dir("s-extra");
        let img = dir.join("m0.img");
        std::fs::write(&img, image(SEND_BYTES)).unwrap();
        let recv = multifd_tests::qemu::Recv::start(&dir, &dir.join("out"), 2, &["--io-timeout", "2"]);
        let t0 = Instant::now();
        let sender = Command::new(multifd_bin())
            .args(["send", "--connect", &format!("127.0.0.1:{}", recv.port), "--channels", "3", "--io-timeout", "2"])
            .arg("--image")
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run multifd send");
        let (code, _, stderr) = recv.wait(10);
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        let serr = String::from_utf8_lossy(&sender.stderr);
        assert_eq!(sender.status.code(), Some(1), "{serr}");
        let sline = serr.lines().rfind(|l| l.starts_with("multifd send:")).unwrap_or_default();
        assert!(says_closed(sline) || sline.contains("refused") || sline.contains("reset"), "{sline}");
        let line = stderr.lines().find(|l| l.starts_with("multifd recv: failed:")).unwrap_or_default();
        assert_ne!(code, Some(0), "{stderr}");
        assert!(line.contains("channel id 2 is out of range for 2 channels"), "{line}");
        assert!(files_in(&dir.join("out")).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// A listener with a zero backlog, so that a second pending connection is never answered.
fn listen_backlog_zero() -> TcpListener {
    let l = listen();
    // SAFETY: `listen` on the bound socket's open descriptor; it only changes the backlog.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    l
}

/// The destination never answers channel 0's connect (its accept queue is full): the connect
/// times out, naming the channel.
#[test]
fn send_channel_that_never_connects_times_out() {
    with_deadline(60, "send_channel_that_never_connects_times_out", || {
        let (err, took) = send_fault("s-missing", listen_backlog_zero(), |l| {
            // Nothing is accepted: the main stream fills the one-entry queue.
            std::thread::sleep(Duration::from_millis(1800));
            drop(l);
        });
        assert!(
            err.contains("channel 0: connect to 127.0.0.1:")
                && err.contains("no answer within 1 s (--connect-timeout)"),
            "{err}"
        );
        assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(6), "{took:?}");
    });
}

/// The destination closes its listener after accepting the main stream: a channel's connect is
/// refused, or, when it was already queued, the channel is reset once the listener is gone. Which
/// channel fails first depends on how many connects the kernel queued before the close; the error
/// names it.
#[test]
fn send_channel_refused_by_the_destination() {
    with_deadline(60, "send_channel_refused_by_the_destination", || {
        let (err, took) = send_fault("s-refused", listen(), |l| {
            let (m, _) = l.accept().unwrap();
            drop(l);
            std::thread::sleep(Duration::from_millis(500));
            drop(m);
        });
        let named = err.strip_prefix("channel ").and_then(|r| r.split(':').next()).and_then(|n| n.parse::<u8>().ok());
        assert!(named.is_some_and(|n| n < 2), "{err}");
        assert!(err.contains("refused") || err.contains("reset"), "{err}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    });
}

/// The destination closes the main stream early (with unread bytes, so a reset follows).
#[test]
fn send_main_stream_closed_early() {
    with_deadline(60, "send_main_stream_closed_early", || {
        let (err, took) = send_fault("s-main-early", listen(), |l| {
            std::thread::scope(|s| {
                for _ in 0..3 {
                    match accept_one(&l) {
                        Conn::Main(mut m) => {
                            read_n(&mut m, 20);
                            drop(m);
                        }
                        Conn::Channel(_, c) => drain(s, c),
                    }
                }
            });
        });
        assert!(err.contains("main stream") && says_closed(&err), "{err}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    });
}

// ---------------------------------------------------------------------------------------------
// A cancelled send: both processes, SIGINT to the sender mid-migration.

#[test]
fn cancelled_send_fails_both_sides_cleanly() {
    with_deadline(90, "cancelled_send_fails_both_sides_cleanly", || {
        let dir = temp_dir("cancel");
        let out = dir.join("out");
        let img = dir.join("m0.img");
        std::fs::write(&img, image(256 << 20)).unwrap();
        let recv = multifd_tests::qemu::Recv::start(&dir, &out, 4, &[]);
        // 64 MiB/s: the 256 MiB image takes about 4 s, so the interrupt lands mid-migration.
        let mut sender = Command::new(multifd_bin())
            .args(["send", "--connect", &format!("127.0.0.1:{}", recv.port), "--channels", "4"])
            .args(["--max-bandwidth", "64M", "--image"])
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start multifd send");
        std::thread::sleep(Duration::from_millis(1200));
        assert!(sender.try_wait().unwrap().is_none(), "the sender ended before it was interrupted");
        let t0 = Instant::now();
        // SAFETY: `kill` with the pid of our own child, which has not been reaped (try_wait said so).
        assert_eq!(unsafe { libc::kill(sender.id() as i32, libc::SIGINT) }, 0);
        let mut serr = String::new();
        sender.stderr.take().unwrap().read_to_string(&mut serr).unwrap();
        let status = sender.wait().unwrap();
        let (code, json, rerr) = recv.wait(10);
        assert!(t0.elapsed() < Duration::from_secs(5), "exits took {:?}", t0.elapsed());
        assert_eq!(status.code(), Some(130), "sender: {serr}");
        assert!(serr.lines().any(|l| l == "multifd send: interrupted by SIGINT: migration cancelled"), "{serr}");
        assert_eq!(code, Some(1), "{rerr}");
        assert!(multifd_tests::qemu::json_status(&json, "failed"), "{json}");
        let line = rerr.lines().find(|l| l.starts_with("multifd recv: failed:")).unwrap_or_default();
        assert!(line.contains("aborted by the peer"), "{line}");
        assert!(line.contains("channel ") || line.contains("main stream"), "{line}");
        assert!(files_in(&out).is_empty(), "files left: {:?}", files_in(&out));
        let _ = std::fs::remove_dir_all(&dir);
    });
}
