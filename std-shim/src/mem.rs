//! Guest memory for `multifd recv`: one anonymous private mapping per RAM block.
//!
//! Fresh mappings read as zero without being touched, so the block is declared zeroed and a page's
//! first zero page never faults it in. How the mapping is made is part of the receive speed:
//!
//! - [`Populate::Lazy`]: pages are populated on first write, one 4 KiB page at a time: the mapping
//!   is advised `MADV_NOHUGEPAGE`, and the receiver populates a packet's data pages just before
//!   reading into them ([`AnonMemory::prefault`]). With huge pages, the first data page in a 2 MiB range makes the kernel
//!   zero all of it, zero pages included; with 4 KiB pages a zero page is never populated at all. On
//!   the 2-vCPU development VM, where getting and zeroing a fresh page is expensive, a 1 GiB receive
//!   with 40% zero pages spent about 3 s of system CPU with huge pages and about 1 s without, and its
//!   wall time halved (measured with `multifd demo` and `scripts/bench-migrate.sh`, BENCHMARKS.md).
//! - [`Populate::Touch`] (`--prealloc`): advised `MADV_HUGEPAGE` (fewer TLB misses while receiving)
//!   and populated before the migration starts (`MADV_POPULATE_WRITE`, or one write per page on a
//!   kernel without it), so receiving does no page faults at all.
//!
//! Bytes are reached only through raw pointers ([`GuestMemory::raw_range`] for socket reads, raw
//! copies otherwise): no `&`/`&mut [u8]` over the mapping exists while workers run, since a hostile
//! peer may send one page on two channels at once. A mapping is made for the workers of one
//! lifecycle coordinator (its `CoordinatorId`, given to [`AnonMemory::new`], before any worker can
//! reach the mapping). After every worker is joined, [`AnonMemory::bytes`] lends the contents as a
//! slice, which needs that coordinator's `AllJoined` token: a token of another coordinator proves
//! nothing about this mapping's writers and is refused.

use std::io;
use std::ptr::NonNull;

use multifd_core::block::GuestMemory;
use multifd_core::lifecycle::{AllJoined, CoordinatorId, ForeignToken};

/// How to populate a fresh mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Populate {
    /// Fault pages in on first write, in 4 KiB pages.
    Lazy,
    /// Populate and touch every page now.
    Touch,
}

/// An anonymous, private, zero-initialised mapping.
#[derive(Debug)]
pub struct AnonMemory {
    ptr: NonNull<u8>,
    len: usize,
    lazy: bool,
    /// The coordinator whose workers write the mapping; only its token unlocks [`AnonMemory::bytes`].
    owner: CoordinatorId,
}

// SAFETY: the mapping is plain memory owned by this value; all access from shared references goes
// through raw pointers whose concurrent use is governed by the `GuestMemory` contract (writes are
// published to readers through the received bitmap).
unsafe impl Send for AnonMemory {}
// SAFETY: as for `Send`: no method hands out a reference over the bytes while `&self` is shared,
// except `bytes`, which requires proof that every worker of the owning coordinator was joined.
unsafe impl Sync for AnonMemory {}

impl AnonMemory {
    /// Maps `len` bytes (rounded up to the system page size, at least one page) for the workers of
    /// the coordinator `owner` (`Coordinator::id`): only its `AllJoined` token unlocks
    /// [`AnonMemory::bytes`]. The coordinator must not move while the mapping is in use.
    pub fn new(len: usize, populate: Populate, owner: CoordinatorId) -> io::Result<Self> {
        let map_len = len.max(1);
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice: no existing memory
        // is affected; the result is checked against MAP_FAILED.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let advice = match populate {
            Populate::Lazy => libc::MADV_NOHUGEPAGE,
            Populate::Touch => libc::MADV_HUGEPAGE,
        };
        // SAFETY: `ptr..ptr + map_len` is the mapping just created. The advice is a hint; its failure
        // (a kernel without THP) changes nothing but speed, so the result is ignored.
        unsafe { libc::madvise(ptr, map_len, advice) };
        let Some(ptr) = NonNull::new(ptr.cast::<u8>()) else {
            return Err(io::Error::other("mmap returned a null mapping"));
        };
        let mem = Self { ptr, len, lazy: populate == Populate::Lazy, owner };
        if populate == Populate::Touch {
            // SAFETY: the range is the mapping just created; populating it changes no contents.
            let populated = unsafe { libc::madvise(ptr.as_ptr().cast(), map_len, libc::MADV_POPULATE_WRITE) } == 0;
            if !populated {
                // Kernels before 5.14: one write per page faults everything in.
                for off in (0..len).step_by(4096) {
                    // SAFETY: `off` is inside the mapping, and nobody else can reach it yet.
                    unsafe { mem.ptr.as_ptr().add(off).write_volatile(0) };
                }
            }
        }
        Ok(mem)
    }

    /// Populates the pages under `offset..offset + len` just before a read fills them: one
    /// `MADV_POPULATE_WRITE` call per run of pages instead of one page fault per page taken inside
    /// the socket read (which copies with the socket locked). On the development VM this made a
    /// 1 GiB receive into fresh memory about 10% faster (BENCHMARKS.md). Contents are unchanged; a
    /// failure (kernels before 5.14) is ignored, as the pages then fault in when written; a
    /// [`Populate::Touch`] mapping is already populated and makes no call.
    pub fn prefault(&self, offset: usize, len: usize) {
        if !self.lazy || len == 0 {
            return;
        }
        self.check(offset, len);
        // SAFETY: `sysconf` only reads system configuration.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let start = offset / page * page;
        let end = (offset + len).div_ceil(page) * page;
        // SAFETY: `start..end` covers whole pages of the mapping: `offset + len <= self.len`
        // (checked) and the mapping's length is rounded up to the page size by `mmap`. Populating
        // changes no contents, so writers racing on the same pages are unaffected.
        unsafe { libc::madvise(self.ptr.as_ptr().add(start).cast(), end - start, libc::MADV_POPULATE_WRITE) };
    }

    /// The contents, once every worker that could write them has been joined: `joined` must be the
    /// token of the coordinator the mapping was made for, or the call is refused with
    /// [`ForeignToken`] naming both coordinators.
    pub fn bytes<'m>(&'m self, joined: &AllJoined<'_>) -> Result<&'m [u8], ForeignToken> {
        joined.covers(self.owner)?;
        // SAFETY: the token is the owning coordinator's and proves every worker it started was
        // joined, so no raw writer is left; the mapping is valid for `len` bytes while `self` lives.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) })
    }

    fn check(&self, offset: usize, len: usize) {
        // Local invariant: the core passes only ranges inside the block; a bad range is a bug here,
        // never peer input (offsets from the wire are checked before they become addresses).
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "range {offset}+{len} outside {}",
            self.len
        );
    }
}

impl Drop for AnonMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; `&mut self` means nothing borrows it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len.max(1)) };
    }
}

impl GuestMemory for AnonMemory {
    fn len(&self) -> usize {
        self.len
    }

    fn write(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: inside the mapping (checked); a raw copy, no reference over guest memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len()) };
    }

    fn fill_zero(&self, offset: usize, len: usize) {
        self.check(offset, len);
        // SAFETY: inside the mapping (checked); a raw fill.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), 0, len) };
    }

    fn read(&self, offset: usize, out: &mut [u8]) {
        self.check(offset, out.len());
        // SAFETY: inside the mapping (checked); a raw copy out.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), out.len()) };
    }

    unsafe fn raw_range(&self, offset: usize, len: usize) -> Option<NonNull<u8>> {
        self.check(offset, len);
        // SAFETY: `offset` is inside the mapping (checked), so the pointer is in bounds and non-null.
        Some(unsafe { self.ptr.add(offset) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use multifd_core::lifecycle::{ChannelId, Coordinator, Platform, Wake, WorkerExit};
    use std::convert::Infallible;

    type Coord = Coordinator<(), Infallible, 1>;

    /// Runs no thread: enough to take a coordinator through cleanup.
    struct NoThreads;

    impl Wake for NoThreads {
        fn wake(&self, _: ChannelId) {}
    }

    impl Platform for NoThreads {
        type Handle = ();
        type Error = Infallible;
        fn start(&self, _: ChannelId) -> Result<(), Infallible> {
            Ok(())
        }
        fn join(&self, _: ChannelId, _: ()) -> WorkerExit {
            WorkerExit::Returned
        }
    }

    /// Before the fix any coordinator's token lent the bytes, even while this mapping's own workers
    /// (another coordinator's) could still write them.
    #[test]
    fn bytes_refuses_the_token_of_another_coordinator() {
        let (owner, stranger) = (Coord::new(1).unwrap(), Coord::new(1).unwrap());
        let m = AnonMemory::new(4096, Populate::Lazy, owner.id()).unwrap();
        assert_eq!(owner.create_all(&NoThreads, |_| Ok(())).map(|r| r.started), Ok(1));
        m.write(7, b"x");
        let foreign = stranger.cleanup(&NoThreads).unwrap();
        assert_eq!(m.bytes(&foreign), Err(ForeignToken { bound: owner.id(), token: stranger.id() }));
        let mine = owner.cleanup(&NoThreads).unwrap();
        assert_eq!(m.bytes(&mine).map(|b| (b.len(), b[7])), Ok((4096, b'x')));
    }

    #[test]
    fn fresh_memory_reads_zero_and_round_trips() {
        for populate in [Populate::Lazy, Populate::Touch] {
            let m = AnonMemory::new(3 * 4096, populate, Coord::new(1).unwrap().id()).unwrap();
            let mut page = vec![1u8; 4096];
            m.read(4096, &mut page);
            assert!(page.iter().all(|&b| b == 0));
            m.write(4096 + 10, b"abc");
            m.read(4096 + 9, &mut page[..5]);
            assert_eq!(&page[..5], b"\0abc\0");
            m.fill_zero(4096, 4096);
            m.read(4096 + 10, &mut page[..3]);
            assert_eq!(&page[..3], b"\0\0\0");
        }
    }

    /// Which of the first `pages` pages of `m` are resident (`mincore`).
    fn resident(m: &AnonMemory, pages: usize) -> Vec<bool> {
        let mut v = vec![0u8; pages];
        // SAFETY: the mapping's base is page aligned and at least `pages` pages long; `v` has one
        // byte per page.
        assert_eq!(unsafe { libc::mincore(m.ptr.as_ptr().cast(), pages * 4096, v.as_mut_ptr()) }, 0);
        v.iter().map(|b| b & 1 == 1).collect()
    }

    #[test]
    fn prefault_populates_exactly_the_pages_under_the_range_and_keeps_them_zero() {
        let m = AnonMemory::new(16 * 4096, Populate::Lazy, Coord::new(1).unwrap().id()).unwrap();
        assert_eq!(resident(&m, 16), vec![false; 16]);
        // Bytes 3*4096+5 .. 5*4096+5 lie in pages 3, 4 and 5.
        m.prefault(3 * 4096 + 5, 2 * 4096);
        m.prefault(9 * 4096, 4096);
        m.prefault(12 * 4096, 0);
        let want: Vec<bool> = (0..16).map(|p| (3..=5).contains(&p) || p == 9).collect();
        assert_eq!(resident(&m, 16), want);
        let mut page = vec![1u8; 4096];
        m.read(4 * 4096, &mut page);
        assert!(page.iter().all(|&b| b == 0));
        let t = AnonMemory::new(4 * 4096, Populate::Touch, Coord::new(1).unwrap().id()).unwrap();
        assert_eq!(resident(&t, 4), vec![true; 4]);
    }
}
