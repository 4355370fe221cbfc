//! Regression tests for QEMU's multifd defects (`qemu-multifd.md` section 5, the scenarios of its
//! table 7.2, and the open observations O1-O3), run on the std shim: `multifd_std::recv::run` and
//! `multifd_std::send::migrate` in this process, with real worker threads and loopback sockets, and
//! `multifd_std::platform` for the lifecycle scenarios. Each test is named after its bug ids.
//!
//! Every scenario runs under a deadline (a hang fails the test) and, where it ends in an error,
//! checks that the error names the channel or stream and the value, that every worker thread was
//! joined (none named `multifd-*` is left), and that no block file was written. The core-level
//! halves of these scenarios (with QEMU's seed defects injected to show they are caught) are in
//! `core/src/lifecycle/regress_tests.rs` and `core/src/recv/regress_tests.rs`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use multifd_core::codec::Accept;
use multifd_core::lifecycle::{ChannelId, ChannelState, Coordinator, Created};
use multifd_core::send::{Precopy, Quiescent, RoundStats, Step};
use multifd_core::wire::stream::{Event, Record, StreamConfig, StreamParser};
use multifd_core::wire::{Flags, InitPacket, Packet, PacketConfig};
use multifd_std::platform::{Role, WorkerToken, run_scoped};
use multifd_std::recv::{self, Outcome as Report};
use multifd_std::send::{GuestImage, ImageSet, SendFailure, SendOptions, StaticPrecopy, migrate};
use multifd_tests::qemu::temp_dir;
use multifd_tests::synthetic::{self, emit, geo, init, packet};
use multifd_tests::{with_deadline, worker_thread_count};

fn main_head(pages: usize) -> Vec<u8> {
    synthetic::main_head((pages * PAGE) as u64)
}

fn main_stream(pages: usize, markers: u32, eof: bool) -> Vec<u8> {
    synthetic::main_stream((pages * PAGE) as u64, markers, eof)
}

const PAGE: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Streams built from the wire encoders (what a QEMU source, or a broken one, would send).

// ---------------------------------------------------------------------------------------------
// `multifd recv` in this process.

struct RecvRun {
    port: u16,
    handle: thread::JoinHandle<Report>,
    dir: PathBuf,
    out: PathBuf,
}

fn start_recv(tag: &str, channels: u8, uuid: Option<[u8; 16]>) -> RecvRun {
    start_recv_with(tag, channels, uuid, &recv::Limits::default())
}

/// As [`start_recv`], the receiver run with `limits` (`recv::run_with`).
fn start_recv_with(tag: &str, channels: u8, uuid: Option<[u8; 16]>, limits: &recv::Limits) -> RecvRun {
    let dir = temp_dir(tag);
    let out = dir.join("out");
    let port_file = dir.join("port");
    let opts = recv::Options {
        listen: "127.0.0.1:0".into(),
        channels,
        out: out.clone(),
        uuid,
        page_size: PAGE as u32,
        port_file: Some(port_file.clone()),
        prealloc: Vec::new(),
        progress: false,
    };
    let limits = limits.clone();
    let handle =
        thread::Builder::new().name("regress-recv".into()).spawn(move || recv::run_with(&opts, &limits)).unwrap();
    let t0 = Instant::now();
    let port = loop {
        if let Some(p) = std::fs::read_to_string(&port_file).ok().and_then(|t| t.trim().parse::<u16>().ok()) {
            break p;
        }
        assert!(!handle.is_finished(), "{tag}: the receiver ended before listening");
        assert!(t0.elapsed() < Duration::from_secs(10), "{tag}: no port file");
        thread::sleep(Duration::from_millis(2));
    };
    RecvRun { port, handle, dir, out }
}

impl RecvRun {
    fn connect(&self, bytes: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(bytes).unwrap();
        s
    }

    /// Waits for the receiver; checks that it left no worker thread behind.
    fn join(self, tag: &str) -> (Report, PathBuf) {
        let report = self.handle.join().expect("the receiver panicked");
        assert_eq!(worker_thread_count(), 0, "{tag}: a multifd-recv worker outlived the receiver");
        (report, self.out)
    }
}

/// Runs a receiver for `channels` channels, connects `conns` in order (writing each one's bytes),
/// closes them at once or only after the receiver ended (`keep_open`), and returns its error. Checks
/// that it failed, joined every worker and wrote no block file.
fn recv_failure(tag: &str, channels: u8, uuid: Option<[u8; 16]>, conns: &[Vec<u8>], keep_open: bool) -> String {
    recv_failure_of(start_recv(tag, channels, uuid), tag, conns, keep_open)
}

/// As [`recv_failure`] (no uuid), the receiver run with `limits`.
fn recv_failure_with(tag: &str, channels: u8, limits: &recv::Limits, conns: &[Vec<u8>], keep_open: bool) -> String {
    recv_failure_of(start_recv_with(tag, channels, None, limits), tag, conns, keep_open)
}

fn recv_failure_of(r: RecvRun, tag: &str, conns: &[Vec<u8>], keep_open: bool) -> String {
    let mut streams: Vec<TcpStream> = conns.iter().map(|c| r.connect(c)).collect();
    if !keep_open {
        streams.clear();
    }
    let dir = r.dir.clone();
    let (report, out) = r.join(tag);
    drop(streams);
    let err = multifd_tests::recv_error(&report).unwrap_or_else(|| panic!("{tag}: the receiver must fail: {report:?}"));
    let left: Vec<_> =
        std::fs::read_dir(&out).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "{tag}: files left: {left:?}");
    let _ = std::fs::remove_dir_all(dir);
    err
}

/// Runs a receiver that must succeed; returns the received `m0` block.
fn recv_success(tag: &str, channels: u8, conns: &[Vec<u8>]) -> Vec<u8> {
    let r = start_recv(tag, channels, None);
    let streams: Vec<TcpStream> = conns.iter().map(|c| r.connect(c)).collect();
    drop(streams);
    let dir = r.dir.clone();
    let (report, out) = r.join(tag);
    assert_eq!(multifd_tests::recv_error(&report), None, "{tag}: {report:?}");
    let got = std::fs::read(out.join("m0.bin")).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    got
}

// ---------------------------------------------------------------------------------------------
// A destination that only captures (or misbehaves): for the send side.

/// What the fake destination does with a multifd channel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DestMode {
    /// Read everything until EOF.
    Capture,
    /// Read channel `k`'s init packet and first packet header (the setup SYNC), then close it.
    CloseAfterFirstSync(u8),
    /// Accept, read nothing: the sender's writes block once the socket buffers are full.
    NeverRead,
}

struct FakeDest {
    addr: SocketAddr,
    acceptor: thread::JoinHandle<Captured>,
}

/// What a [`FakeDest`] saw: the main stream, each channel's bytes (by id), and the sockets it held
/// unread.
type Captured = (Vec<u8>, Vec<Vec<u8>>, Vec<TcpStream>);

impl FakeDest {
    fn start(channels: u8, mode: DestMode) -> FakeDest {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = thread::Builder::new()
            .name("regress-dest".into())
            .spawn(move || {
                let conns: Vec<TcpStream> = (0..=channels).map(|_| listener.accept().unwrap().0).collect();
                if mode == DestMode::NeverRead {
                    // Hand every socket back unread: they stay open until `finish`.
                    return (Vec::new(), Vec::new(), conns);
                }
                thread::scope(|s| {
                    let readers: Vec<_> = conns
                        .into_iter()
                        .map(|mut c| {
                            s.spawn(move || {
                                let mut head = [0u8; 64];
                                let mut got = 0;
                                while got < 4 {
                                    match c.read(&mut head[got..4]) {
                                        Ok(0) | Err(_) => return (None, head[..got].to_vec()),
                                        Ok(n) => got += n,
                                    }
                                }
                                let multifd = u32::from_be_bytes([head[0], head[1], head[2], head[3]])
                                    == multifd_core::wire::MULTIFD_MAGIC;
                                if !multifd {
                                    let mut all = head[..4].to_vec();
                                    let _ = c.read_to_end(&mut all);
                                    return (None, all);
                                }
                                c.read_exact(&mut head[4..]).unwrap();
                                let id = head[24];
                                let mut all = head.to_vec();
                                if let DestMode::CloseAfterFirstSync(k) = mode
                                    && k == id
                                {
                                    let mut first = vec![0u8; geo().header_len()];
                                    c.read_exact(&mut first).unwrap();
                                    all.extend(first);
                                    let _ = c.shutdown(Shutdown::Both);
                                    return (Some(id), all);
                                }
                                let _ = c.read_to_end(&mut all);
                                (Some(id), all)
                            })
                        })
                        .collect();
                    let mut main = Vec::new();
                    let mut chans = vec![Vec::new(); usize::from(channels)];
                    for r in readers {
                        match r.join().unwrap() {
                            (Some(id), bytes) => chans[usize::from(id)] = bytes,
                            (None, bytes) => main = bytes,
                        }
                    }
                    (main, chans, Vec::new())
                })
            })
            .unwrap();
        FakeDest { addr, acceptor }
    }

    fn finish(self) -> Captured {
        self.acceptor.join().expect("the fake destination panicked")
    }
}

fn send_opts(addr: SocketAddr, channels: u8) -> SendOptions {
    SendOptions { connect: addr, channels, uuid: [0; 16], machine: "none".into(), page_size: PAGE as u32 }
}

/// A deterministic image: page i filled with a byte derived from i (never 0), except `zero` pages.
fn image(pages: usize, zero: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut v = vec![0u8; pages * PAGE];
    for (i, p) in v.chunks_mut(PAGE).enumerate() {
        if !zero(i) {
            p.fill((i % 251) as u8 + 1);
            p[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
    }
    v
}

/// Two rounds: every page, then `dirty` pages rewritten by `rewrite` between the rounds.
struct TwoRounds<'i> {
    images: &'i ImageSet,
    pages: usize,
    dirty: Vec<usize>,
    rewrite: fn(usize) -> Vec<u8>,
    bitmaps: [Vec<u64>; 2],
}

impl<'i> TwoRounds<'i> {
    fn new(images: &'i ImageSet, dirty: Vec<usize>, rewrite: fn(usize) -> Vec<u8>) -> Self {
        let pages = images.blocks[0].1.len() / PAGE;
        let words = pages.div_ceil(64);
        let mut second = vec![0u64; words];
        for &p in &dirty {
            second[p / 64] |= 1 << (p % 64);
        }
        TwoRounds { images, pages, dirty, rewrite, bitmaps: [vec![u64::MAX; words], second] }
    }
}

impl Precopy for TwoRounds<'_> {
    fn dirty(&mut self, round: u32, _block: usize) -> &[u64] {
        &self.bitmaps[(round as usize).min(1)]
    }
    fn between_rounds(&mut self, _round: u32, q: &Quiescent<'_>) {
        for &p in &self.dirty {
            self.images.blocks[0].1.write(q, p * PAGE, &(self.rewrite)(p));
        }
    }
    fn round_done(&mut self, _stats: &RoundStats) -> Step {
        let _ = self.pages;
        Step::Complete
    }
}

/// Our sender into our receiver on loopback; returns the received block and the joined count.
fn loopback(tag: &str, channels: u8, images: &ImageSet, embedder: &mut dyn Precopy) -> (Vec<u8>, u8) {
    let r = start_recv(tag, channels, None);
    let sent =
        migrate(&send_opts(([127, 0, 0, 1], r.port).into(), channels), images, embedder, &AtomicBool::new(false));
    let dir = r.dir.clone();
    let (report, out) = r.join(tag);
    let sent = sent.unwrap_or_else(|e| panic!("{tag}: sender: {e}"));
    assert_eq!(multifd_tests::recv_error(&report), None, "{tag}: receiver: {report:?}");
    let got = std::fs::read(out.join("m0.bin")).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    (got, sent.joined)
}

// ---------------------------------------------------------------------------------------------
// 7.2 row 1 and 2: creation failures (lifecycle on the std platform, real sockets).

#[derive(Debug)]
enum CreateFail {
    Connect { channel: u8, kind: io::ErrorKind },
    // Read only through `Debug`, in a failing assertion's message.
    Start(#[allow(dead_code)] io::ErrorKind),
}

impl From<multifd_std::platform::StartError> for CreateFail {
    fn from(e: multifd_std::platform::StartError) -> Self {
        CreateFail::Start(e.error.kind())
    }
}

/// 7.2 row 1 (B01, B02, B03, B08): channel k of N fails to connect (nothing listens on its port)
/// while the others connect late (or early, with k failing late). Creators run one per channel on
/// their own threads, workers on `multifd-send-N` threads. Expected: k never started nor joined,
/// every started worker joined exactly once, nothing left running, the error names channel k.
#[test]
fn b01_b02_b03_b08_std_channel_k_fails_to_connect_others_late() {
    with_deadline(60, "b01_b02_b03_b08_std_channel_k_fails_to_connect_others_late", || {
        const N: u8 = 4;
        let refused_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for (k, others_late) in [(0u8, true), (3, true), (0, false), (2, false)] {
            let good = TcpListener::bind("127.0.0.1:0").unwrap();
            let good_addr = good.local_addr().unwrap();
            let coord: Coordinator<WorkerToken, CreateFail, 16> = Coordinator::new(N).unwrap();
            let streams: Mutex<Vec<Option<TcpStream>>> = Mutex::new((0..N).map(|_| None).collect());
            let k_done = AtomicBool::new(false);
            let worker = |c: ChannelId, waker: &multifd_std::platform::StdWaker<'_>| {
                // A channel thread idle in its loop until the migration ends.
                let _ = coord.wait_until(waker, c, || false);
            };
            let hook: multifd_std::platform::WakeHook<'_> = Box::new(|c: ChannelId| {
                if let Some(s) = &streams.lock().unwrap()[c.index()] {
                    let _ = s.shutdown(Shutdown::Both);
                }
            });
            let (outcomes, joined) = run_scoped(Role::Send, worker, Some(hook), |p| {
                thread::scope(|s| {
                    let creators: Vec<_> = (0..N)
                        .map(|c| {
                            let (coord, streams, k_done) = (&coord, &streams, &k_done);
                            s.spawn(move || {
                                let r = coord.create(p, ChannelId(c), |id| {
                                    let late = Duration::from_millis(30);
                                    if id.0 == k {
                                        if !others_late {
                                            thread::sleep(late);
                                        }
                                        let e = TcpStream::connect(("127.0.0.1", refused_port)).unwrap_err();
                                        return Err(CreateFail::Connect { channel: id.0, kind: e.kind() });
                                    }
                                    if others_late {
                                        thread::sleep(late);
                                    }
                                    let s = TcpStream::connect(good_addr)
                                        .map_err(|e| CreateFail::Connect { channel: id.0, kind: e.kind() })?;
                                    streams.lock().unwrap()[id.index()] = Some(s);
                                    Ok(())
                                });
                                if c == k {
                                    k_done.store(true, Ordering::SeqCst);
                                }
                                r
                            })
                        })
                        .collect();
                    // Cleanup begins as soon as k has failed, racing the late creators.
                    while !k_done.load(Ordering::SeqCst) {
                        thread::sleep(Duration::from_millis(1));
                    }
                    let joined = coord.cleanup(p).unwrap().report().joined;
                    let outcomes: Vec<Result<Created, _>> = creators.into_iter().map(|h| h.join().unwrap()).collect();
                    (outcomes, joined)
                })
            });
            let tag = format!("k={k} others_late={others_late}");
            assert_eq!(worker_thread_count(), 0, "{tag}: a worker outlived cleanup");
            let started = outcomes.iter().filter(|o| matches!(o, Ok(Created::Started))).count();
            assert_eq!(usize::from(joined), started, "{tag}: joined exactly the started workers");
            if !others_late {
                assert_eq!(started, usize::from(N) - 1, "{tag}: the early channels started");
            }
            assert!(matches!(outcomes[usize::from(k)], Ok(Created::Failed)), "{tag}: {:?}", outcomes[usize::from(k)]);
            let state = coord.state(ChannelId(k)).unwrap();
            assert_eq!(state, ChannelState::Failed, "{tag}: k is never joined");
            for c in 0..N {
                let st = coord.state(ChannelId(c)).unwrap();
                assert!(
                    matches!(st, ChannelState::Joined | ChannelState::Failed | ChannelState::Abandoned),
                    "{tag}: {c} {st:?}"
                );
            }
            match coord.error() {
                Some(CreateFail::Connect { channel, kind }) => {
                    assert_eq!((*channel, *kind), (k, io::ErrorKind::ConnectionRefused), "{tag}");
                }
                other => panic!("{tag}: {other:?}"),
            }
            assert_eq!(coord.later_errors(), 0, "{tag}: one failure, one error");
            drop(good);
        }
    });
}

/// 7.2 row 2 (B01, B04, B14, B40): a pre-thread handshake fails for one channel (here its init
/// packet carries version 2). Expected: the receiver fails once, naming the connection and the
/// value; no worker was started (so none is joined); no block file.
#[test]
fn b01_b04_b14_b40_std_handshake_fails_for_one_channel() {
    with_deadline(30, "b01_b04_b14_b40_std_handshake_fails_for_one_channel", || {
        let mut bad = init(1);
        bad[7] = 2;
        let err = recv_failure("handshake", 2, None, &[main_stream(4, 1, true), init(0), bad], false);
        assert!(err.contains("connection #2") && err.contains("version is 2, expected 1"), "{err}");
        assert_eq!(err.lines().count(), 1, "reported once: {err}");
    });
}

/// B20: an error on a channel's connection before every channel arrived fails the migration at
/// once, instead of waiting for channels that will never come: here an init packet with the right
/// magic and a wrong version (a connection whose first bytes are no migration's is someone else's:
/// it is dropped, see RELIABILITY.md H4), and a channel that closes while others are missing.
#[test]
fn b20_std_error_before_all_channels_arrived_fails_visibly() {
    with_deadline(30, "b20_std_error_before_all_channels_arrived_fails_visibly", || {
        let t0 = Instant::now();
        let mut bad = init(1);
        bad[7] = 9;
        let err = recv_failure("b20", 4, None, &[main_stream(4, 1, true), init(0), bad], true);
        assert!(err.contains("connection #2") && err.contains("version is 9, expected 1"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
        let t0 = Instant::now();
        let err = recv_failure("b20-gone", 4, None, &[main_stream(4, 1, true), init(0)], false);
        assert!(err.contains("channel 0: closed by the source before every connection was in"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    });
}

// ---------------------------------------------------------------------------------------------
// 7.2 rows 3-5: hangs.

/// 7.2 "cancel while a recv thread is parked at SYNC" (B12): both channels sent a SYNC and wait at
/// it (their sockets stay open), then the main stream is cut before its marker. Expected: the parked
/// workers are released, joined, and the receiver fails naming the main stream.
#[test]
fn b12_std_cancel_while_recv_threads_parked_at_sync() {
    with_deadline(30, "b12_std_cancel_while_recv_threads_parked_at_sync", || {
        let r = start_recv("b12", 2, None);
        let (mut c0, mut c1) = (init(0), init(1));
        packet(&mut c0, true, &[(0, 1)], &[]);
        packet(&mut c1, true, &[(1, 1)], &[]);
        let main = r.connect(&main_head(4));
        let chans = [r.connect(&c0), r.connect(&c1)];
        // Both channels reach their SYNC and park; the main stream has no marker yet.
        thread::sleep(Duration::from_millis(300));
        assert!(!r.handle.is_finished(), "nothing has failed yet");
        drop(main);
        let dir = r.dir.clone();
        let (report, out) = r.join("b12");
        drop(chans);
        let err = multifd_tests::recv_error(&report).expect("must fail");
        assert!(err.contains("main stream"), "{err}");
        assert_eq!(multifd_tests::recv_report(&report).sync_epochs, 0, "no epoch was released");
        assert_eq!(std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0), 0, "files left");
        let _ = std::fs::remove_dir_all(dir);
    });
}

/// 7.2 "sender I/O error during sync" (B13): the destination closes channel 1 right after its first
/// SYNC packet. Expected: the migration thread does not wait forever for that channel; `migrate`
/// returns an error naming channel 1 (a failed write of a numbered packet, or the close seen by the
/// check after a packet), with every worker joined.
#[test]
fn b13_std_sender_io_error_during_sync_returns_error() {
    with_deadline(60, "b13_std_sender_io_error_during_sync_returns_error", || {
        let dest = FakeDest::start(2, DestMode::CloseAfterFirstSync(1));
        let images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image(2048, |_| false)))] };
        let mut emb = StaticPrecopy::new(&images, PAGE as u32);
        let r = migrate(&send_opts(dest.addr, 2), &images, &mut emb, &AtomicBool::new(false));
        assert_eq!(worker_thread_count(), 0, "a multifd-send worker outlived migrate");
        match r {
            Err(SendFailure::Channel { channel: 1, packet_num: Some(_), err }) => {
                assert!(matches!(err.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset), "{err}");
            }
            // The sender's check after each packet may see the close before a write fails.
            Err(SendFailure::Peer { what, .. }) => assert_eq!(what, "channel 1"),
            other => panic!("expected an error on channel 1, got {other:?}"),
        }
        dest.finish();
    });
}

/// 7.2 "sockets blocked in write/read at cancel" (B15), send side: the destination reads nothing, so
/// every sender thread blocks in a write; then the migration is cancelled. Expected: the transports
/// are shut down, the writes return, every worker is joined, and `migrate` reports the cancel.
#[test]
fn b15_std_sender_blocked_in_write_unblocked_by_cancel() {
    with_deadline(60, "b15_std_sender_blocked_in_write_unblocked_by_cancel", || {
        let dest = FakeDest::start(2, DestMode::NeverRead);
        let images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image(16384, |_| false)))] };
        let mut emb = StaticPrecopy::new(&images, PAGE as u32);
        let cancel = AtomicBool::new(false);
        let (r, blocked_for) = thread::scope(|s| {
            let h = s.spawn(|| migrate(&send_opts(dest.addr, 2), &images, &mut emb, &cancel));
            thread::sleep(Duration::from_millis(500));
            assert!(!h.is_finished(), "64 MiB cannot fit in the socket buffers of a reader that never reads");
            assert!(worker_thread_count_now() > 0, "the sender's workers are running (blocked)");
            let t = Instant::now();
            cancel.store(true, Ordering::SeqCst);
            let r = h.join().unwrap();
            (r, t.elapsed())
        });
        assert!(matches!(r, Err(SendFailure::Interrupted)), "{r:?}");
        assert!(blocked_for < Duration::from_secs(5), "cancel took {blocked_for:?}");
        assert_eq!(worker_thread_count(), 0, "a multifd-send worker outlived migrate");
        dest.finish();
    });
}

/// Live `multifd-*` threads right now (no waiting for them to go away).
fn worker_thread_count_now() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|n| n.starts_with("multifd-"))
        .count()
}

/// B15, receive side: every channel worker is blocked in `read` (the channels sent only their init
/// packets and stay open) when the main stream fails. Expected: the shutdown unblocks the reads, the
/// workers are joined, the receiver fails naming the main stream.
#[test]
fn b15_std_recv_blocked_in_read_unblocked_when_main_stream_fails() {
    with_deadline(30, "b15_std_recv_blocked_in_read_unblocked_when_main_stream_fails", || {
        let mut main = main_head(4);
        main.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0]);
        let err = recv_failure("b15-recv", 2, None, &[main, init(0), init(1)], true);
        assert!(err.contains("main stream"), "{err}");
    });
}

// ---------------------------------------------------------------------------------------------
// 7.2 rows 6-8: protocol pairing and ordering.

/// 7.2 "packet with pages + SYNC (old sender)" (B23, B29): a QEMU <= 8.2 sender puts pages in its
/// SYNC packet and follows it with an empty packet (stale `next_packet_size`). Expected: the pages
/// are written, then the sync; the migration completes byte for byte.
#[test]
fn b23_b29_std_old_sender_pages_in_sync_packet_written() {
    with_deadline(30, "b23_b29_std_old_sender_pages_in_sync_packet_written", || {
        let mut c0 = init(0);
        packet(&mut c0, true, &[(0, 0x10), (1, 0x11)], &[]);
        let mut empty = Vec::new();
        packet(&mut empty, false, &[], &[]);
        empty[12..16].copy_from_slice(&geo().page_count().to_be_bytes());
        empty[20..24].copy_from_slice(&((2 * PAGE) as u32).to_be_bytes());
        c0.extend_from_slice(&empty);
        packet(&mut c0, true, &[(2, 0x12)], &[3]);
        let got = recv_success("b29", 1, &[main_stream(4, 2, true), c0]);
        for (p, b) in [(0, 0x10u8), (1, 0x11), (2, 0x12), (3, 0)] {
            assert!(got[p * PAGE..(p + 1) * PAGE].iter().all(|&x| x == b), "page {p}");
        }
    });
}

/// 7.2 "SYNC without marker / marker without SYNC" (B17): the main stream has two markers, each
/// channel only one SYNC, then ends. Expected: the receiver fails with the counts, no hang.
#[test]
fn b17_std_marker_without_sync_fails() {
    with_deadline(30, "b17_std_marker_without_sync_fails", || {
        let (mut c0, mut c1) = (init(0), init(1));
        packet(&mut c0, true, &[(0, 1), (1, 1)], &[]);
        packet(&mut c1, true, &[(2, 1), (3, 1)], &[]);
        let err = recv_failure("b17", 2, None, &[main_stream(4, 2, true), c0, c1], false);
        assert!(err.contains("epoch 2") && err.contains("without its SYNC"), "{err}");
    });
}

/// B18: a channel sends a SYNC the main stream never pairs with a marker. Expected: detected at the
/// main stream's end, naming the channel.
#[test]
fn b18_std_sync_without_marker_fails() {
    with_deadline(30, "b18_std_sync_without_marker_fails", || {
        let (mut c0, mut c1) = (init(0), init(1));
        packet(&mut c0, true, &[(0, 1), (1, 1)], &[]);
        packet(&mut c0, true, &[], &[]);
        packet(&mut c1, true, &[(2, 1), (3, 1)], &[]);
        let err = recv_failure("b18", 2, None, &[main_stream(4, 1, true), c0, c1], false);
        assert!(err.contains("channel 0") && err.contains("SYNC"), "{err}");
    });
}

/// Send side of B17, B18, B22, B23, B30, B34, B35: what our sender puts on the wire, captured by a
/// destination that only reads. Expected: SYNC packets carry no pages, a zeroed header body and an
/// empty block name (B23, B35); data packets never carry SYNC (B23); packet numbers are unique and
/// increase per channel (B22); every channel sends exactly one SYNC per main-stream MULTIFD_FLUSH
/// (B17, B18); within a round every dirty page is sent exactly once (B34); a batch of only zero
/// pages is still sent as a header (B30).
#[test]
fn b17_b18_b22_b23_b30_b34_b35_std_sender_packets_well_formed() {
    with_deadline(60, "b17_b18_b22_b23_b30_b34_b35_std_sender_packets_well_formed", || {
        const PAGES: usize = 512;
        const N: u8 = 4;
        let dest = FakeDest::start(N, DestMode::Capture);
        let images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image(PAGES, |i| i < 128 || i % 7 == 0)))] };
        let dirty: Vec<usize> = (300..340).chain([1, 2, 500]).collect();
        let mut emb = TwoRounds::new(&images, dirty.clone(), |p| vec![(p % 200) as u8 + 3; PAGE]);
        migrate(&send_opts(dest.addr, N), &images, &mut emb, &AtomicBool::new(false)).unwrap();
        assert_eq!(worker_thread_count(), 0);
        let (main, chans, _) = dest.finish();

        let mut parser = StreamParser::new(StreamConfig::new(geo()));
        let (mut flushes, mut at) = (0u32, 0usize);
        while at < main.len() {
            let (used, ev) = parser.feed(&main[at..]).unwrap();
            assert!(used > 0 || ev.is_some(), "the parser made no progress at byte {at}");
            at += used;
            if let Some(Event::MultifdFlush) = ev {
                flushes += 1;
            }
        }
        assert_eq!(flushes, 3, "setup, round 0, final round");

        let cfg = PacketConfig::new(geo());
        let mut numbers = Vec::new();
        // Pages per epoch (1-based), over all channels.
        let mut epochs: Vec<Vec<usize>> = vec![Vec::new(); 4];
        let mut zero_only_batches = 0;
        for (c, bytes) in chans.iter().enumerate() {
            assert_eq!(InitPacket::decode(&bytes[..64]).unwrap().id as usize, c);
            let (mut at, mut epoch, mut last_num) = (64usize, 1usize, None::<u64>);
            while at < bytes.len() {
                let hdr = &bytes[at..at + geo().header_len()];
                let Packet::Ram(p) = Packet::decode(hdr, &cfg).unwrap() else { panic!("channel {c}: device state") };
                let h = *p.header();
                assert!(last_num.is_none_or(|n| h.packet_num > n), "channel {c}: packet numbers must increase");
                last_num = Some(h.packet_num);
                numbers.push(h.packet_num);
                assert_eq!(&hdr[36..64], &[0u8; 28][..], "channel {c}: reserved bytes are zero");
                if h.flags.is_sync() {
                    assert_eq!(
                        (h.normal_pages, h.zero_pages, h.pages_alloc),
                        (0, 0, 0),
                        "channel {c}: SYNC with pages"
                    );
                    assert!(hdr[64..320].iter().all(|&b| b == 0), "channel {c}: SYNC packet carries a block name");
                    assert_eq!(h.flags.0, Flags::SYNC, "channel {c}: SYNC packet flags");
                    epoch += 1;
                } else {
                    assert_eq!(h.block, b"m0");
                    assert!(hdr[64 + 3..320].iter().all(|&b| b == 0), "channel {c}: name not NUL-padded");
                    assert!(p.has_pages(), "channel {c}: an empty data packet");
                    if h.normal_pages == 0 {
                        zero_only_batches += 1;
                    }
                    epochs[epoch].extend(p.normal_offsets().chain(p.zero_offsets()).map(|o| o as usize / PAGE));
                }
                at += geo().header_len() + h.normal_pages as usize * PAGE;
            }
            assert_eq!(at, bytes.len(), "channel {c}: trailing bytes");
            assert_eq!(epoch as u32 - 1, flushes, "channel {c}: one SYNC per MULTIFD_FLUSH");
        }
        let mut sorted = numbers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), numbers.len(), "packet numbers are unique across channels");
        assert!(epochs[1].is_empty(), "no page before the setup sync");
        let mut round0 = epochs[2].clone();
        round0.sort_unstable();
        assert_eq!(round0, (0..PAGES).collect::<Vec<_>>(), "round 0: every page exactly once");
        let mut round1 = epochs[3].clone();
        round1.sort_unstable();
        let mut want = dirty.clone();
        want.sort_unstable();
        assert_eq!(round1, want, "final round: exactly the dirty pages, once each");
        assert!(zero_only_batches > 0, "a batch of only zero pages is still sent");
    });
}

/// 7.2 "two migrations in a row, channel count 4 -> 2" (B25): QEMU kept the round-robin index in a
/// static and reused it with fewer channels. Expected: both migrations complete byte for byte with
/// every worker joined.
#[test]
fn b25_two_migrations_in_a_row_4_then_2_channels() {
    with_deadline(90, "b25_two_migrations_in_a_row_4_then_2_channels", || {
        for (i, channels) in [4u8, 2, 4, 1].into_iter().enumerate() {
            let pages = 1024;
            let want = image(pages, |p| p % 5 == 0);
            let images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(want.clone()))] };
            let mut emb = StaticPrecopy::new(&images, PAGE as u32);
            let (got, joined) = loopback(&format!("b25-{i}"), channels, &images, &mut emb);
            assert_eq!(joined, channels, "migration {i}: every worker joined");
            assert!(got == want, "migration {i} ({channels} channels): not byte-exact");
            assert_eq!(worker_thread_count(), 0);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 7.2 rows 9-10: hostile handshakes and headers.

/// 7.2 "init packet id = N, id >= N, duplicate id, wrong uuid/magic/version" (O1). Expected: each
/// is refused with the connection and the value named; no worker starts, no file is written.
#[test]
fn o1_std_init_packet_id_equal_n_rejected() {
    with_deadline(60, "o1_std_init_packet_id_equal_n_rejected", || {
        let main = || main_stream(4, 1, true);
        let err = recv_failure("o1-n", 2, None, &[main(), init(0), init(2)], false);
        assert!(err.contains("connection #2") && err.contains("channel id 2 is out of range for 2 channels"), "{err}");
        let err = recv_failure("o1-255", 2, None, &[init(255)], false);
        assert!(err.contains("channel id 255 is out of range for 2 channels"), "{err}");
        let err = recv_failure("o1-dup", 2, None, &[init(1), init(1)], false);
        assert!(err.contains("connection #1") && err.contains("channel id 1 is already set up"), "{err}");
        let mut other = init(0);
        other[8..24].copy_from_slice(&[9; 16]);
        let err = recv_failure("o1-uuid", 2, Some([1; 16]), &[other], false);
        assert!(err.contains("connection #0") && err.contains("uuid is"), "{err}");
        let mut bad = init(0);
        bad[4..8].copy_from_slice(&7u32.to_be_bytes());
        let err = recv_failure("o1-version", 2, None, &[bad], false);
        assert!(err.contains("version is 7"), "{err}");
        // First bytes that are neither magic make a connection someone else's: it is dropped, not
        // refused (RELIABILITY.md H4, `h4_stray_connections_neither_delay_nor_fail_a_migration`).
    });
}

/// 7.2 "`pages_alloc` > page_count, counts overflow, offset beyond block, unaligned offset, unknown
/// block, bad compression value" (B28, O4). Expected: a clean error naming the channel and the value.
/// A bad compression value is one of three: a value no QEMU version defines (two method bits), a
/// method QEMU defines that this receiver never decodes (QPL), and zlib sent to a receiver told to
/// accept only uncompressed packets (`Limits::compression`, `multifd recv --compression none`); zlib
/// and zstd themselves are accepted by default (their payload errors: tests/tests/malformed_corpus.rs).
#[test]
fn b28_o4_std_hostile_packet_headers_refused() {
    with_deadline(60, "b28_o4_std_hostile_packet_headers_refused", || {
        let all = recv::Limits::default();
        let none = recv::Limits { compression: Accept::NONE, ..recv::Limits::default() };
        let cases: [(&str, usize, Vec<u8>, &recv::Limits, &str); 9] = [
            ("pages_alloc", 12, 129u32.to_be_bytes().to_vec(), &all, "pages_alloc 129 is larger than page_count 128"),
            ("zero-overflow", 32, u32::MAX.to_be_bytes().to_vec(), &all, "zero_pages 4294967295 is larger"),
            ("offset", 320, ((4 * PAGE) as u64).to_be_bytes().to_vec(), &all, "offset[0] 0x4000"),
            (
                "unaligned",
                320,
                100u64.to_be_bytes().to_vec(),
                &all,
                "offset[0] 0x64 is not a multiple of the page size",
            ),
            ("block", 64, b"pc.ram\0".to_vec(), &all, "unknown RAM block \"pc.ram\""),
            (
                "compression",
                8,
                6u32.to_be_bytes().to_vec(),
                &all,
                "compression value in flags is 0x6, which no QEMU version",
            ),
            (
                "qpl",
                8,
                8u32.to_be_bytes().to_vec(),
                &all,
                "compression qpl (flags value 0x8) is not accepted (accepted: none,zlib,zstd)",
            ),
            (
                "zlib",
                8,
                2u32.to_be_bytes().to_vec(),
                &none,
                "compression zlib (flags value 0x2) is not accepted (accepted: none)",
            ),
            ("size", 20, 1u32.to_be_bytes().to_vec(), &all, "next_packet_size 1 is not normal_pages 1"),
        ];
        for (tag, at, bytes, limits, want) in cases {
            let mut c0 = init(0);
            let start = c0.len();
            packet(&mut c0, false, &[(0, 1)], &[]);
            c0[start + at..start + at + bytes.len()].copy_from_slice(&bytes);
            let err = recv_failure_with(&format!("b28-{tag}"), 1, limits, &[main_stream(4, 1, true), c0], true);
            assert!(err.contains("channel 0") && err.contains("packet 0") && err.contains(want), "{tag}: {err}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 7.2 rows 11, 13-16: data and concurrency.

/// 7.2 "page sent normal in round k, zero in round k+1" (B31, B33, O2): our sender into our receiver,
/// pages rewritten to zero between the rounds (and some zero pages rewritten to data); then a
/// synthetic stream where channel 0 sends page 0 as data in epoch 1 and channel 1 as a zero page in
/// epoch 2. Expected: the destination page is zero (byte-exact with the source's final image).
#[test]
fn b31_b33_o2_std_page_data_then_zero_next_round_arrives_zero() {
    with_deadline(60, "b31_b33_o2_std_page_data_then_zero_next_round_arrives_zero", || {
        let pages = 1024;
        let mut images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image(pages, |p| p % 9 == 0)))] };
        // Data pages (not multiples of 9) become zero; a few zero pages (multiples of 9) become data.
        let dirty: Vec<usize> = (1..200).filter(|p| p % 9 != 0).chain([9, 18, 900]).collect();
        let mut emb = TwoRounds::new(&images, dirty, |p| if p % 9 == 0 { vec![0x77; PAGE] } else { vec![0; PAGE] });
        let (got, _) = loopback("b31", 4, &images, &mut emb);
        drop(emb);
        let want = images.blocks[0].1.as_bytes();
        for p in 0..pages {
            assert!(got[p * PAGE..(p + 1) * PAGE] == want[p * PAGE..(p + 1) * PAGE], "page {p} differs");
        }
        assert!(got[PAGE..2 * PAGE].iter().all(|&b| b == 0), "page 1 was data, then zero");

        let (mut c0, mut c1) = (init(0), init(1));
        packet(&mut c0, true, &[(0, 0xAB), (1, 2)], &[]);
        packet(&mut c0, true, &[], &[]);
        packet(&mut c1, true, &[(2, 3), (3, 4)], &[]);
        packet(&mut c1, true, &[], &[0]);
        let got = recv_success("b31-synthetic", 2, &[main_stream(4, 2, true), c0, c1]);
        assert!(got[..PAGE].iter().all(|&b| b == 0), "page 0 kept its round-1 data");
    });
}

/// 7.2 "recv threads still writing bitmap when load finishes / fails" (B09): channels stream pages
/// (their writers keep going) when the main stream fails on an unknown block. Expected: the receiver
/// fails naming the main stream, every worker is joined before anything is released (the shim's
/// workers are scoped threads; TSan and Miri check the core's side), no file is written.
#[test]
fn b09_std_load_fails_while_channels_write() {
    with_deadline(60, "b09_std_load_fails_while_channels_write", || {
        let pages = 64;
        let r = start_recv("b09", 2, None);
        let mut main = main_head(pages);
        let writers: Vec<_> = (0..2u8)
            .map(|c| {
                let mut s = r.connect(&init(c));
                // A writer stuck on a full window to a closed receiver is not this test's subject.
                s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                thread::spawn(move || {
                    let mut p = Vec::new();
                    let mine: Vec<(usize, u8)> =
                        (0..pages).filter(|i| i % 2 == usize::from(c)).map(|i| (i, 5)).collect();
                    packet(&mut p, false, &mine, &[]);
                    // Keep writing until the receiver is gone.
                    let t0 = Instant::now();
                    while t0.elapsed() < Duration::from_secs(20) {
                        if s.write_all(&p).is_err() {
                            return true;
                        }
                    }
                    false
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(100));
        emit(&mut main, Record::ZeroPage { block: Some(b"nope"), offset: 0 });
        let m = r.connect(&main);
        let dir = r.dir.clone();
        let (report, out) = r.join("b09");
        drop(m);
        let err = multifd_tests::recv_error(&report).expect("must fail");
        for w in writers {
            assert!(w.join().unwrap(), "a channel writer kept writing for 20 s after the receiver ended");
        }
        assert!(err.contains("main stream") && err.contains("nope"), "{err}");
        assert_eq!(std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0), 0, "files left");
        let _ = std::fs::remove_dir_all(dir);
    });
}

/// 7.2 "dest recv thread fails before its SYNC while main waits" (O3): channel 1 waits at its SYNC,
/// the main stream waits at its marker, channel 0 sends a bad packet; every socket stays open.
/// Expected: the main stream's wait is cancelled and the receiver fails naming channel 0 (QEMU hangs).
#[test]
fn o3_std_channel_fails_before_sync_while_main_waits() {
    with_deadline(30, "o3_std_channel_fails_before_sync_while_main_waits", || {
        let r = start_recv("o3", 2, None);
        let mut bad = Vec::new();
        packet(&mut bad, false, &[(0, 1)], &[]);
        bad[0] ^= 0xff;
        let mut c1 = init(1);
        packet(&mut c1, true, &[(1, 1)], &[]);
        let main = r.connect(&main_stream(4, 1, false));
        let mut c0 = r.connect(&init(0));
        let c1 = r.connect(&c1);
        // Channel 1 parks at its SYNC, the main stream waits at its marker for channel 0.
        thread::sleep(Duration::from_millis(300));
        assert!(!r.handle.is_finished(), "the main stream waits at its marker");
        c0.write_all(&bad).unwrap();
        let dir = r.dir.clone();
        let (report, out) = r.join("o3");
        drop((main, c0, c1));
        let err = multifd_tests::recv_error(&report).expect("must fail");
        assert!(err.contains("channel 0") && err.contains("magic is 0xee223344"), "{err}");
        assert_eq!(std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0), 0, "files left");
        let _ = std::fs::remove_dir_all(dir);
    });
}

/// 7.2 "concurrent bitmap sets from N threads on adjacent bits" (4.4): 8 channels, page i on channel
/// i % 8, so every bitmap word is set by all 8 workers at once. Expected: complete (a lost bit fails
/// the completeness check) and byte-exact.
#[test]
fn s4_4_std_eight_channels_on_adjacent_bits_complete() {
    with_deadline(30, "s4_4_std_eight_channels_on_adjacent_bits_complete", || {
        let pages = 256;
        let mut conns = vec![main_stream(pages, 1, true)];
        for c in 0..8u8 {
            let mut ch = init(c);
            let mine: Vec<(usize, u8)> = (0..pages).filter(|p| p % 8 == usize::from(c)).map(|p| (p, p as u8)).collect();
            let (a, b) = mine.split_at(mine.len() / 2);
            packet(&mut ch, false, a, &[]);
            packet(&mut ch, true, b, &[]);
            conns.push(ch);
        }
        let got = recv_success("s4-4", 8, &conns);
        for p in 0..pages {
            assert!(got[p * PAGE..(p + 1) * PAGE].iter().all(|&b| b == p as u8), "page {p}");
        }
    });
}

/// 7.2 "error from two threads at once" (3.7): both channels send a bad packet at once. Expected: one
/// error is reported (naming one channel), every worker joined.
#[test]
fn s3_7_std_errors_from_two_channels_at_once_reported_once() {
    with_deadline(30, "s3_7_std_errors_from_two_channels_at_once_reported_once", || {
        let bad = |id: u8| {
            let mut c = init(id);
            let start = c.len();
            packet(&mut c, false, &[(usize::from(id), 1)], &[]);
            c[start + 12..start + 16].copy_from_slice(&1000u32.to_be_bytes());
            c
        };
        for i in 0..5 {
            let err = recv_failure(&format!("s3-7-{i}"), 2, None, &[main_stream(4, 1, false), bad(0), bad(1)], true);
            let named = ["channel 0", "channel 1"].iter().filter(|c| err.contains(*c)).count();
            assert_eq!(named, 1, "exactly one error: {err}");
            assert!(err.contains("pages_alloc 1000"), "{err}");
        }
    });
}
