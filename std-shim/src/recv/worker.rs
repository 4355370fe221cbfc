//! The channel workers of `multifd recv`: one thread per channel reads its connection, headers
//! into the channel's buffer, plain page data with one `readv(2)` straight into guest memory, and
//! compressed payloads into a buffer of the worker's own, decompressed page by page by the core
//! (`RecvChannel::decompress`); and the progress line.

use std::io::{self, IsTerminal};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use multifd_core::block::GuestMemory;
use multifd_core::lifecycle::ChannelId;
use multifd_core::recv::{PageRange, RecvChannel, Want};

use super::{Failure, Place, Run, Table, accept, io_failure};
use crate::codec::ChannelDecoder;
use crate::platform::StdWaker;
use crate::util::{read_retry, readv_raw};

impl Run<'_, '_> {
    /// One channel's worker thread.
    pub(super) fn worker(&self, c: ChannelId, waker: &StdWaker<'_>) {
        let s = self.session;
        let mut ch = match s.channel(c) {
            Ok(ch) => ch,
            Err(e) => {
                s.lifecycle().record_error(waker, Failure::Recv(e));
                return;
            }
        };
        match self.read_channel(&mut ch, waker) {
            Ok(closed) => s.channel_done(waker, &ch, closed),
            Err(e) => {
                s.lifecycle().record_error(waker, e);
                s.channel_done(waker, &ch, false);
            }
        }
    }

    /// Reads channel `ch` until its connection closes (`Ok(true)`) or the migration terminates
    /// (`Ok(false)`): headers into the channel's buffer, page data straight into guest memory.
    fn read_channel(&self, ch: &mut RecvChannel, waker: &StdWaker<'_>) -> Result<bool, Failure> {
        let (id, stream) = (ch.id(), &self.conns.chans[ch.id().index()]);
        let io_err = |error| io_failure(Place::Channel(id), "reading", error, self.stall.limit);
        // Made once per channel: zeroing these arrays for every read cost more than the reads' own
        // bookkeeping (callgrind, BENCHMARKS.md "Before and after the receive session").
        let mut page_io = PageIo {
            ranges: [PageRange::EMPTY; MAX_IOV],
            iov: [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV],
        };
        let mut scratch = [0u8; 16 * 1024];
        // Whether the current packet's data pages were populated before the first read into them.
        let mut prefaulted = false;
        // Its stream and buffers are made at the channel's first compressed packet, then kept.
        let mut codec = ChannelDecoder::new(self.limits.zstd_window);
        loop {
            let n = match ch.want() {
                Want::Header(buf) => {
                    prefaulted = false;
                    read_retry(stream, buf, self.stall).map_err(io_err)?
                }
                Want::Page { .. } => {
                    let n = self.read_pages(ch, stream, &mut prefaulted, &mut page_io, &mut scratch).map_err(io_err)?;
                    if n > 0 {
                        self.stall.moved(n);
                        ch.advance_many(n, self.table)?;
                        continue;
                    }
                    0
                }
                Want::Discard(len) => {
                    read_retry(stream, &mut scratch[..len.min(16 * 1024)], self.stall).map_err(io_err)?
                }
                Want::Compressed { .. } => {
                    // Fresh memory is populated per run of the packet's pages, as for plain ones.
                    if codec.have() == 0 {
                        let count = ch.pending_pages(self.table, &mut page_io.ranges);
                        prefault_runs(self.table, &page_io.ranges[..count]);
                    }
                    let n = read_retry(stream, codec.unfilled(ch)?, self.stall).map_err(io_err)?;
                    if n == 0 {
                        // Closed inside the payload: `finish` names the cut.
                        return Ok(!self.session.lifecycle().is_quitting());
                    }
                    self.stall.moved(n);
                    codec.filled(n, ch, self.table)?;
                    continue;
                }
                Want::Sync => {
                    self.session.wait_sync(waker, ch)?;
                    continue;
                }
            };
            if n == 0 {
                return Ok(!self.session.lifecycle().is_quitting());
            }
            self.stall.moved(n);
            ch.advance(n, self.table)?;
        }
    }

    /// The rest of the packet's pages in one vectored read, straight into guest memory (populated
    /// first, one call per run of adjacent pages); through a copy for memory without raw addresses.
    fn read_pages(
        &self,
        ch: &RecvChannel,
        stream: &TcpStream,
        prefaulted: &mut bool,
        page_io: &mut PageIo,
        scratch: &mut [u8],
    ) -> io::Result<usize> {
        let PageIo { ranges, iov } = page_io;
        let count = ch.pending_pages(self.table, ranges);
        let ranges = &ranges[..count];
        if !*prefaulted {
            *prefaulted = true;
            prefault_runs(self.table, ranges);
        }
        let mut used = 0;
        for r in ranges {
            let Some(b) = self.table.get(r.block) else { break };
            // SAFETY: each range is a page of its block the core validated against the used length;
            // the pointer is only handed to `readv(2)`.
            let Some(ptr) = (unsafe { b.memory().raw_range(r.offset, r.len) }) else { break };
            iov[used] = libc::iovec { iov_base: ptr.as_ptr().cast(), iov_len: r.len };
            used += 1;
        }
        if used > 0 {
            return readv_raw(stream.as_raw_fd(), &iov[..used], self.stall);
        }
        // Memory without a raw address: read into the scratch buffer, then copy.
        let Some(r) = ranges.first() else { return Ok(0) };
        let k = r.len.min(scratch.len());
        let got = read_retry(stream, &mut scratch[..k], self.stall)?;
        if let Some(b) = self.table.get(r.block) {
            b.memory().write(r.offset, &scratch[..got]);
        }
        Ok(got)
    }

    /// Progress on stderr until `done`: a bar with rate and time left on a terminal (`indicatif`),
    /// a line every 5 s otherwise.
    pub(super) fn progress(&self, done: &AtomicBool) {
        let page = u64::from(self.opts.page_size);
        let all: u64 = self.table.iter().map(|(_, b)| b.pages() as u64).sum::<u64>() * page;
        let got = || self.table.iter().map(|(_, b)| b.bitmap().count() as u64).sum::<u64>() * page;
        let tty = io::stderr().is_terminal();
        let bar = indicatif::ProgressBar::new(all);
        if tty {
            let style = indicatif::ProgressStyle::with_template(
                "{bar:30} {percent:>3}% {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            );
            bar.set_style(style.unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
        }
        let (start, mut next) = (Instant::now(), Instant::now());
        // Relaxed: a stop flag; nothing is published through it.
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            let (now, epochs) = (got(), self.session.epochs());
            if tty {
                bar.set_position(now);
                bar.set_message(format!("{epochs} sync epoch{}", accept::plural(epochs.into())));
            } else if Instant::now() >= next {
                next += Duration::from_secs(5);
                let pct = if all == 0 { 0.0 } else { 100.0 * now as f64 / all as f64 };
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                let t = start.elapsed().as_secs_f64();
                log::info!("{:.1} of {:.1} MiB ({pct:.1}%), {epochs} sync epochs, {t:.1} s", mib(now), mib(all));
            }
        }
        bar.finish_and_clear();
    }
}

/// A channel worker's buffers for one vectored read: the packet's pending page ranges and the
/// `iovec`s pointing at them; reused from read to read (only the first `count` entries are used).
struct PageIo {
    ranges: [PageRange; MAX_IOV],
    iov: [libc::iovec; MAX_IOV],
}

/// Most pages one vectored read fills (a packet of 1 KiB pages has 512).
const MAX_IOV: usize = 512;

/// Populates fresh destination memory for `ranges` (one packet's data pages), one call per run of
/// adjacent pages: see [`AnonMemory::prefault`].
fn prefault_runs(table: &Table<'_>, ranges: &[PageRange]) {
    let mut run: Option<PageRange> = None;
    for r in ranges.iter().copied().chain(core::iter::once(PageRange::EMPTY)) {
        match &mut run {
            Some(cur) if cur.block == r.block && cur.offset + cur.len == r.offset && r.len > 0 => cur.len += r.len,
            _ => {
                if let Some(cur) = run.take()
                    && let Some(b) = table.get(cur.block)
                {
                    b.memory().prefault(cur.offset, cur.len);
                }
                run = (r.len > 0).then_some(r);
            }
        }
    }
}
