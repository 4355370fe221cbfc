//! The floor for a whole migration on this machine: how fast the bytes of one precopy round of an
//! image can cross loopback TCP at all, with the same packets on the same number of connections, and
//! nothing else (no zero-page check, no bitmap, no protocol checks, no main stream).
//!
//! Used by `scripts/bench-migrate.sh` as the "floor" variant. Before the clock starts it loads the
//! image (mapped and populated, as `multifd send` does), finds its data pages, maps the destination
//! (`--prealloc`: populated up front, as `multifd recv --prealloc`; otherwise fresh 4 KiB pages,
//! populated per packet as `multifd recv` does), and connects N loopback sockets. Then packet k (up
//! to 128 data pages, in page order, behind a header of the size `multifd send` writes) goes to
//! connection k mod N: one `writev` of header and pages on the sending thread, one `readv` into the
//! destination pages on the receiving thread. It prints the seconds from the first write to the last
//! byte read, and checks the destination afterwards.
//!
//! Usage: `loopback_floor IMAGE CHANNELS [--prealloc]`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

const PAGE: usize = 4096;
const PACKET_PAGES: usize = 128;
/// Bytes of a full packet header: the fixed fields and one offset per page (`core::wire::packet`).
const HEADER: usize = multifd_core::wire::packet::RAM_FIXED_LEN + 8 * PACKET_PAGES;

struct Map {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; each thread touches only the pages of its own packets.
unsafe impl Send for Map {}
// SAFETY: as above.
unsafe impl Sync for Map {}

fn map(len: usize, fd: Option<i32>, advice: i32) -> Map {
    let (flags, fd) = match fd {
        Some(fd) => (libc::MAP_PRIVATE, fd),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1),
    };
    // SAFETY: a new mapping at an address of the kernel's choice; checked against MAP_FAILED.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
    assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    if fd < 0 {
        // SAFETY: the mapping just made; a hint.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
    }
    if advice != 0 {
        // SAFETY: the mapping just made; populating changes no contents.
        unsafe { libc::madvise(ptr, len, advice) };
    }
    Map { ptr: ptr.cast(), len }
}

fn iovecs(base: *mut u8, header: *mut u8, pages: &[usize]) -> Vec<libc::iovec> {
    let mut v = vec![libc::iovec { iov_base: header.cast(), iov_len: HEADER }];
    for &p in pages {
        // SAFETY: every page index comes from the image's page count, so the page is inside the
        // mapping of that length.
        let at = unsafe { base.add(p * PAGE) };
        v.push(libc::iovec { iov_base: at.cast(), iov_len: PAGE });
    }
    v
}

/// Moves all of `iov` with `writev`/`readv` (`write` selects which), resuming after short transfers.
fn transfer(fd: i32, mut iov: &mut [libc::iovec], write: bool) {
    while !iov.is_empty() {
        // SAFETY: every iovec points into a live mapping or header buffer of its stated length.
        let n = unsafe {
            if write {
                libc::writev(fd, iov.as_ptr(), iov.len() as i32)
            } else {
                libc::readv(fd, iov.as_ptr(), iov.len() as i32)
            }
        };
        assert!(n > 0, "{}: {}", if write { "writev" } else { "readv" }, std::io::Error::last_os_error());
        let mut n = n as usize;
        while n > 0 {
            if n >= iov[0].iov_len {
                n -= iov[0].iov_len;
                iov = &mut iov[1..];
            } else {
                // SAFETY: advancing inside the same buffer.
                iov[0].iov_base = unsafe { iov[0].iov_base.cast::<u8>().add(n) }.cast();
                iov[0].iov_len -= n;
                n = 0;
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: loopback_floor IMAGE CHANNELS [--prealloc]");
        std::process::exit(2);
    }
    let prealloc = args.iter().any(|a| a == "--prealloc");
    let channels: usize = args[2].parse().expect("CHANNELS: a number");
    let file = std::fs::File::open(&args[1]).expect("open the image");
    let len = file.metadata().unwrap().len() as usize;
    let src = map(len, Some(file.as_raw_fd()), libc::MADV_POPULATE_READ);
    let dst = map(len, None, if prealloc { libc::MADV_POPULATE_WRITE } else { 0 });
    // SAFETY: the source mapping is `len` bytes and nothing writes it.
    let image = unsafe { std::slice::from_raw_parts(src.ptr, len) };
    let data: Vec<usize> =
        (0..len / PAGE).filter(|&p| image[p * PAGE..(p + 1) * PAGE].iter().any(|&b| b != 0)).collect();
    let packets: Vec<&[usize]> = data.chunks(PACKET_PAGES).collect();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let pairs: Vec<(TcpStream, TcpStream)> = (0..channels)
        .map(|_| {
            let out = TcpStream::connect(addr).unwrap();
            (out, listener.accept().unwrap().0)
        })
        .collect();
    let start = std::sync::Barrier::new(2 * channels + 1);
    let (t0, t1) = std::thread::scope(|s| {
        let mut readers = Vec::new();
        for (id, (mut out, mut inc)) in pairs.into_iter().enumerate() {
            let mine: Vec<&[usize]> = packets.iter().skip(id).step_by(channels).copied().collect();
            let (mine2, src, dst, start) = (mine.clone(), &src, &dst, &start);
            s.spawn(move || {
                let mut header = vec![0x5au8; HEADER];
                start.wait();
                for pages in &mine {
                    transfer(out.as_raw_fd(), &mut iovecs(src.ptr, header.as_mut_ptr(), pages), true);
                }
                out.flush().unwrap();
            });
            readers.push(s.spawn(move || {
                let mut header = vec![0u8; HEADER];
                start.wait();
                for pages in &mine2 {
                    if !prealloc {
                        // One call per run of adjacent pages, as multifd recv does.
                        for run in pages.chunk_by(|a, b| a + 1 == *b) {
                            // SAFETY: pages of the destination mapping, as in `iovecs`.
                            let at = unsafe { dst.ptr.add(run[0] * PAGE) };
                            // SAFETY: the run lies inside the mapping; populating changes nothing.
                            unsafe { libc::madvise(at.cast(), run.len() * PAGE, libc::MADV_POPULATE_WRITE) };
                        }
                    }
                    transfer(inc.as_raw_fd(), &mut iovecs(dst.ptr, header.as_mut_ptr(), pages), false);
                }
                let mut rest = [0u8; 1];
                assert_eq!(inc.read(&mut rest).unwrap(), 0, "bytes after the last packet");
                Instant::now()
            }));
        }
        start.wait();
        let t0 = Instant::now();
        let t1 = readers.into_iter().map(|r| r.join().unwrap()).max().unwrap();
        (t0, t1)
    });
    let secs = (t1 - t0).as_secs_f64();
    // SAFETY: every thread is joined; the destination is `len` bytes.
    let got = unsafe { std::slice::from_raw_parts(dst.ptr, dst.len) };
    assert!(got == image, "the destination differs from the image");
    let bytes = (data.len() * PAGE + packets.len() * HEADER) as f64;
    println!(
        "loopback floor: {secs:.6} s, {:.0} MiB/s, {} packets, {} data pages",
        bytes / secs / (1 << 20) as f64,
        packets.len(),
        data.len()
    );
}
