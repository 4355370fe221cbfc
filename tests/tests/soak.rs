//! Soak: many consecutive migrations in this one process, with this crate's sender (`migrate`) and
//! receiver (`recv::run`) over loopback, 8 channels, every connection through a TCP proxy in the
//! test that injects a fault in every other run, at a point drawn from a seeded RNG (the seed is
//! printed; `MULTIFD_SOAK_SEED` replays it):
//! - cut: both halves of one connection are shut down after N bytes;
//! - reset: one connection is closed with an RST (`SO_LINGER` 0) after N bytes;
//! - corrupt: one byte of a channel's 64-byte init packet is flipped.
//!
//! N is uniform over the connection's expected length, or, for a quarter of the faults, within its
//! first 80 bytes (the handshake, where the early states are). Every run must either complete with
//! the received block byte-exact or fail with an error, within a deadline (a hang fails the test);
//! after each run no channel worker may be left; after all of them threads and file descriptors
//! must be back to their baseline and RSS within a tolerance of it.
//!
//! Knobs: `MULTIFD_SOAK_RUNS` (default 100), `MULTIFD_SOAK_SIZE` (guest bytes, default 4 MiB),
//! `MULTIFD_SOAK_SEED`, `MULTIFD_SOAK_DEADLINE` (seconds per run, default 120).
//! `scripts/soak.sh` runs it with the figures on stdout (a 100-run soak takes about 10 s).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use multifd_std::demo::generate_image;
use multifd_std::recv;
use multifd_std::send::{GuestImage, ImageSet, SendOptions, StaticPrecopy, migrate};
use multifd_tests::qemu::temp_dir;
use multifd_tests::worker_thread_count;

const CHANNELS: u8 = 8;

/// What the current run is doing, for the message when it hangs.
static PHASE: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

fn phase(p: String) {
    *PHASE.lock().unwrap_or_else(|e| e.into_inner()) = p;
}

/// Runs `f` on its own thread; if it has not finished after `secs`, prints what the run was doing
/// and exits the process (a hung thread cannot be stopped): a hang fails the test.
fn run_with_deadline<T: Send>(secs: u64, name: &str, f: impl FnOnce() -> T + Send) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            let v = f();
            let _ = tx.send(());
            v
        });
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(secs)) {
            let what = PHASE.lock().unwrap_or_else(|e| e.into_inner()).clone();
            eprintln!("{name}: HUNG: not finished after {secs} s; {what}");
            println!("soak: HUNG in {name}: {what}");
            std::process::exit(101);
        }
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
const PAGE: usize = 4096;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: deterministic from the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cut,
    Reset,
    Corrupt { xor: u8 },
}

/// A fault on connection `conn` (accept order: 0 is the main stream, the sender's first connection)
/// once `after` bytes of it have been forwarded.
#[derive(Debug, Clone, Copy)]
struct Fault {
    conn: usize,
    after: u64,
    kind: Kind,
}

fn pick_fault(rng: &mut Rng, size: usize) -> Fault {
    let conns = usize::from(CHANNELS) + 1;
    let kind = match rng.below(3) {
        0 => Kind::Cut,
        1 => Kind::Reset,
        _ => Kind::Corrupt { xor: 1 << rng.below(8) },
    };
    let (conn, after) = if let Kind::Corrupt { .. } = kind {
        // A byte of a channel's init packet.
        (1 + rng.below(u64::from(CHANNELS)) as usize, rng.below(64))
    } else {
        let conn = rng.below(conns as u64) as usize;
        // The main stream carries a few hundred bytes; a channel about its share of the pages.
        let expected = if conn == 0 { 200 } else { (size / usize::from(CHANNELS) + 64 * 1024) as u64 };
        let after = if rng.below(4) == 0 { rng.below(80) } else { rng.below(expected) };
        (conn, after)
    };
    Fault { conn, after, kind }
}

/// Sets `SO_LINGER` to 0 so that closing the socket sends an RST.
fn linger_zero(s: &TcpStream) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket fd and a properly sized, initialised `linger` value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt(SO_LINGER): {}", io::Error::last_os_error());
}

/// Forwards one connection from the sender (`down`) to the receiver (`up`) until either side ends,
/// the fault fires (cut, reset), or `stop` is set. Returns whether the fault fired.
fn pump(down: TcpStream, up: TcpStream, mut fault: Option<Fault>, stop: &AtomicBool) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let mut forwarded = 0u64;
    let mut fired = false;
    let mut fds = [
        libc::pollfd { fd: down.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: up.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // Relaxed: a stop flag; nothing is published through it.
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) };
        if n < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.kind(), io::ErrorKind::Interrupted, "poll: {e}");
            continue;
        }
        if fds[1].revents != 0 {
            // The receiver closed (it never writes): drop the sender's side too.
            break;
        }
        if fds[0].revents == 0 {
            continue;
        }
        let got = match (&down).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let end = forwarded + got as u64;
        if let Some(f) = fault
            && f.after < end
        {
            let at = (f.after - forwarded) as usize;
            fired = true;
            fault = None;
            if let Kind::Corrupt { xor } = f.kind {
                buf[at] ^= xor;
            } else {
                let _ = (&up).write_all(&buf[..at]);
                if f.kind == Kind::Reset {
                    // Closing both (when this returns) now sends an RST each way.
                    linger_zero(&up);
                    linger_zero(&down);
                } else {
                    let _ = up.shutdown(Shutdown::Both);
                    let _ = down.shutdown(Shutdown::Both);
                }
                break;
            }
        }
        if (&up).write_all(&buf[..got]).is_err() {
            break;
        }
        forwarded = end;
    }
    fired
}

/// Accepts the sender's connections (at most `CHANNELS + 1`) and forwards each to `target` on its
/// own thread, until `stop`. Returns whether the fault fired.
fn proxy(listener: &TcpListener, target: u16, fault: Option<Fault>, stop: &AtomicBool) -> bool {
    listener.set_nonblocking(true).expect("nonblocking listener");
    let mut fired = false;
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        let mut accepted = 0usize;
        // Relaxed: a stop flag.
        while accepted <= usize::from(CHANNELS) && !stop.load(Ordering::Relaxed) {
            let down = match listener.accept() {
                Ok((d, _)) => d,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => panic!("proxy accept: {e}"),
            };
            let conn = accepted;
            accepted += 1;
            down.set_nonblocking(false).expect("blocking socket");
            let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else { continue };
            let _ = up.set_nodelay(true);
            let f = fault.filter(|f| f.conn == conn);
            let h = std::thread::Builder::new()
                .name(format!("soak-proxy-{conn}"))
                .spawn_scoped(s, move || pump(down, up, f, stop))
                .expect("spawn a proxy thread");
            handles.push(h);
        }
        for h in handles {
            fired |= h.join().expect("proxy thread panicked");
        }
    });
    fired
}

#[derive(Debug)]
enum RunResult {
    Completed,
    Failed(String),
}

/// One migration of a fresh image through the proxy; panics if it completed but is not byte-exact.
fn one_run(dir: &Path, size: usize, image_seed: u64, fault: Option<Fault>) -> (RunResult, bool) {
    let image = generate_image(size, 30, image_seed);
    let images = ImageSet { blocks: vec![("m0".into(), GuestImage::new(image.clone()))] };
    let out = dir.join("out");
    let port_file = dir.join("port");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&port_file);
    let ropts = recv::Options {
        listen: "127.0.0.1:0".into(),
        channels: CHANNELS,
        out: out.clone(),
        uuid: None,
        page_size: PAGE as u32,
        port_file: Some(port_file.clone()),
        prealloc: Vec::new(),
        progress: false,
    };
    let stop = AtomicBool::new(false);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let proxy_port = listener.local_addr().expect("proxy address").port();
    // A connection cut before it identified itself is dropped as a stranger's; the accept timeout,
    // short here, then ends the run (the faults make such runs common).
    let limits = recv::Limits { accept_timeout: Some(Duration::from_secs(3)), ..recv::Limits::default() };
    let (report, sent, fired) = std::thread::scope(|s| {
        let receiver = s.spawn(|| recv::run_with(&ropts, &limits));
        let t0 = Instant::now();
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file).ok().and_then(|t| t.trim().parse::<u16>().ok()) {
                break p;
            }
            assert!(!receiver.is_finished() && t0.elapsed() < Duration::from_secs(10), "the receiver did not start");
            std::thread::sleep(Duration::from_millis(2));
        };
        let (listener, stop) = (&listener, &stop);
        let proxy = s.spawn(move || proxy(listener, port, fault, stop));
        let sopts = SendOptions {
            connect: ([127, 0, 0, 1], proxy_port).into(),
            channels: CHANNELS,
            uuid: [0; 16],
            machine: "none".into(),
            page_size: PAGE as u32,
        };
        let mut precopy = StaticPrecopy::new(&images, PAGE as u32);
        phase("the sender is migrating".into());
        let sent = migrate(&sopts, &images, &mut precopy, &AtomicBool::new(false));
        phase(format!("the sender returned ({:?}); waiting for the receiver", sent.as_ref().map(|_| "ok")));
        let report = receiver.join().expect("the receiver panicked");
        phase(format!("the receiver returned ({:?}); waiting for the proxy", multifd_tests::recv_error(&report)));
        // Relaxed: a stop flag; the joins order everything else.
        stop.store(true, Ordering::Relaxed);
        let fired = proxy.join().expect("the proxy panicked");
        (report, sent, fired)
    });
    let result = match (&multifd_tests::recv_error(&report), &sent) {
        (None, Ok(_)) => {
            let got = std::fs::read(out.join("m0.bin")).expect("a completed run wrote m0.bin");
            let bad = got.chunks(PAGE).zip(image.chunks(PAGE)).position(|(a, b)| a != b);
            assert!(
                got.len() == image.len() && bad.is_none(),
                "completed but not byte-exact (fault {fault:?}): first bad page {bad:?}, {} of {} bytes",
                got.len(),
                image.len()
            );
            RunResult::Completed
        }
        (Some(e), _) => RunResult::Failed(format!("receiver: {e}")),
        (None, Err(e)) => RunResult::Failed(format!("sender: {e}")),
    };
    if let RunResult::Failed(_) = result {
        let left = std::fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
        let complete_recv = report.is_ok();
        assert!(complete_recv || left == 0, "a failed run left {left} files in {}", out.display());
    }
    (result, fired)
}

fn count_dir(p: &str) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Threads of this process; waits up to 1 s for joined threads to leave /proc (asynchronous).
fn threads_settled(baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let n = count_dir("/proc/self/task");
        if n <= baseline || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn soak_consecutive_migrations_with_faults() {
    let runs = env_u64("MULTIFD_SOAK_RUNS", 100);
    let size = env_u64("MULTIFD_SOAK_SIZE", 4 << 20) as usize / PAGE * PAGE;
    let deadline = env_u64("MULTIFD_SOAK_DEADLINE", 120);
    let seed = env_u64(
        "MULTIFD_SOAK_SEED",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1),
    ) | 1;
    eprintln!("soak seed {seed} (MULTIFD_SOAK_SEED={seed} replays it), {runs} runs of {size} bytes");
    // Buffers of 1 MiB and more are mmapped and unmapped on free (glibc otherwise raises this
    // threshold after the first free and keeps image-sized buffers cached in per-thread arenas, which
    // makes RSS swing by tens of MiB between runs and hides what a leak would add).
    // SAFETY: mallopt only changes allocator parameters; called before the threads of the soak.
    let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    assert_eq!(set, 1, "mallopt(M_MMAP_THRESHOLD) failed");
    let dir = temp_dir("soak");
    let mut rng = Rng(seed);

    // Warm-up: one clean run first, so that lazily created process state (allocator arenas, the
    // stdout lock) is part of the baseline.
    let warm = run_with_deadline(deadline, "soak warm-up", || one_run(&dir, size, 0, None).0);
    assert!(matches!(warm, RunResult::Completed), "the warm-up run failed: {warm:?}");
    let (threads0, fds0, rss0) = (threads_settled(usize::MAX), count_dir("/proc/self/fd"), rss_kib());

    let (mut faults, mut fired_n, mut completed, mut failed) = (0u64, 0u64, 0u64, 0u64);
    let mut kinds = [0u64; 3];
    for i in 0..runs {
        let fault = (i % 2 == 1).then(|| pick_fault(&mut rng, size));
        let image_seed = rng.next();
        let name = format!("soak run {i} (seed {seed}, fault {fault:?})");
        let (result, fired) = run_with_deadline(deadline, &name, || one_run(&dir, size, image_seed, fault));
        if let Some(f) = fault {
            faults += 1;
            kinds[match f.kind {
                Kind::Cut => 0,
                Kind::Reset => 1,
                Kind::Corrupt { .. } => 2,
            }] += 1;
            fired_n += u64::from(fired);
        }
        match &result {
            RunResult::Completed => completed += 1,
            RunResult::Failed(msg) => {
                // "receiver: ..." or "sender: ...", with the cause after the prefix.
                assert!(msg.len() > "receiver: ".len(), "run {i}: a failure without a message");
                failed += 1;
            }
        }
        if fault.is_none() {
            assert!(matches!(result, RunResult::Completed), "run {i} had no fault but failed: {result:?}");
        }
        eprintln!("soak run {i}: fault {fault:?} fired {fired}: {result:?}; RSS {} KiB", rss_kib());
        assert_eq!(worker_thread_count(), 0, "run {i}: channel workers left running");
    }
    let (threads1, fds1, rss1) = (threads_settled(threads0), count_dir("/proc/self/fd"), rss_kib());
    let _ = std::fs::remove_dir_all(&dir);
    // Tolerance: what the allocator keeps of small buffers and fragmentation (image-sized buffers
    // are unmapped on free, see the mallopt above); a leak of one image-sized buffer per run would
    // exceed it within a few runs.
    let tolerance = 8 * 1024 + 2 * size as u64 / 1024;
    println!(
        "soak: {runs} runs of {} MiB over {CHANNELS} channels, {faults} faults injected ({} cut, {} reset, {} corrupt; {fired_n} fired), {completed} completed byte-exact, {failed} failed with an error, 0 hangs; threads {threads0} -> {threads1}, fds {fds0} -> {fds1}, RSS {:.1} -> {:.1} MiB (tolerance +{} MiB); seed {seed}",
        size >> 20,
        kinds[0],
        kinds[1],
        kinds[2],
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        tolerance / 1024
    );
    assert_eq!(completed + failed, runs);
    assert_eq!(threads1, threads0, "threads did not return to the baseline");
    assert_eq!(fds1, fds0, "file descriptors did not return to the baseline");
    assert!(rss1 <= rss0 + tolerance, "RSS grew from {rss0} KiB to {rss1} KiB (tolerance {tolerance} KiB)");
}
