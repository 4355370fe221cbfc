//! Bare-metal entry point. Every scenario logs through defmt and reports whether it behaved as
//! expected; the exit code (via semihosting) is 0 only if all of them did.

use cortex_m as _; // links cortex-m's single-core critical-section implementation, which defmt needs
use cortex_m_rt::entry;
use defmt_semihosting as _; // the global defmt logger: frames go out over semihosting stdout
use multifd_core::bitmap::{AtomicWord, PageIndex, words_for};
use multifd_core::block::{
    AtomicRegion, AtomicU8, BlockSpec, GuestMemory, ReleaseError, TableSlot, ZeroPage, ZeroPagePolicy,
};
use multifd_core::lifecycle::{
    ChannelId, ChannelState, CleanupReport, Coordinator, CreateReport, Platform, Wake, WorkerExit,
};
use multifd_core::lock::SpinLock;
use semihosting::process::exit;

/// Exit code when a scenario did not behave as expected.
const EXIT_CHECK_FAILED: i32 = 3;
/// Exit code of the panic handler.
const EXIT_PANIC: i32 = 101;

/// Shared state of the kind channel workers use, in a `static`: the core's lock is `const`-constructible.
static SHARED: SpinLock<u32> = SpinLock::new(0);

/// Counts checks and failures, and logs each failure with its name.
struct Checks {
    run: u32,
    failed: u32,
}

impl Checks {
    /// Records one check: logs it, and counts it as failed unless `ok`.
    fn check(&mut self, name: &str, ok: bool) {
        self.run += 1;
        if ok {
            defmt::info!("check {=str}: ok", name);
        } else {
            self.failed += 1;
            defmt::error!("check {=str}: FAILED", name);
        }
    }
}

fn scenario_seams(c: &mut Checks) {
    let after = SHARED.lock(|v| {
        *v += 41;
        *v
    });
    c.check("spin lock holds a value in a static", after == 41);
    let nested = SHARED.lock(|_| SHARED.try_lock(|v| *v));
    c.check("try_lock refuses while the lock is held", nested.is_none());
    let after = SHARED.try_lock(|v| {
        *v += 1;
        *v
    });
    c.check("try_lock succeeds once released", after == Some(42));
    c.check("core version is linked", !multifd_core::VERSION.is_empty());
}

/// Why the firmware's channel work failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FwError {
    /// The platform refused to start this channel's worker.
    StartRefused(u8),
}

/// A cooperative platform: "starting" a worker queues it, "joining" runs it to completion on the one
/// core. It can refuse one channel's start, to exercise the failure path.
struct Cooperative {
    refuse: Option<u8>,
    ran: SpinLock<[u8; 4]>,
}

impl Wake for Cooperative {
    fn wake(&self, _channel: ChannelId) {
        // Nothing blocks outside the core: a queued worker has not run yet.
    }
}

impl Platform for Cooperative {
    type Handle = ChannelId;
    type Error = FwError;

    fn start(&self, channel: ChannelId) -> Result<ChannelId, FwError> {
        if self.refuse == Some(channel.0) {
            return Err(FwError::StartRefused(channel.0));
        }
        Ok(channel)
    }

    fn join(&self, channel: ChannelId, handle: ChannelId) -> WorkerExit {
        // Run the queued worker: here it only counts that it ran.
        self.ran.lock(|ran| ran[handle.index()] += 1);
        defmt::info!("worker {=u8} ran and was joined", channel.0);
        WorkerExit::Returned
    }
}

type FwCoordinator = Coordinator<ChannelId, FwError, 4>;

/// The coordinator lives in a `static`: its constructor is `const`.
static LIFECYCLE_OK: FwCoordinator = match Coordinator::new(3) {
    Ok(c) => c,
    Err(_) => panic!("3 channels fit a capacity of 4"),
};
static LIFECYCLE_FAIL: FwCoordinator = match Coordinator::new(3) {
    Ok(c) => c,
    Err(_) => panic!("3 channels fit a capacity of 4"),
};

fn scenario_lifecycle_all_start(c: &mut Checks) {
    let platform = Cooperative { refuse: None, ran: SpinLock::new([0; 4]) };
    let created = LIFECYCLE_OK.create_all(&platform, |_| Ok(()));
    c.check("lifecycle: 3 of 3 workers started", created == Ok(CreateReport { started: 3, failed: 0, abandoned: 0 }));
    c.check("lifecycle: nothing released before cleanup", LIFECYCLE_OK.all_joined().is_err());
    let report = LIFECYCLE_OK.cleanup(&platform).map(|t| t.report());
    c.check("lifecycle: cleanup joined 3", report == Ok(CleanupReport { joined: 3, panicked: 0, sealed: 0 }));
    c.check("lifecycle: each worker ran once", platform.ran.lock(|r| *r == [1, 1, 1, 0]));
    c.check("lifecycle: release allowed after cleanup", LIFECYCLE_OK.all_joined().is_ok());
}

fn scenario_lifecycle_start_fails(c: &mut Checks) {
    let platform = Cooperative { refuse: Some(1), ran: SpinLock::new([0; 4]) };
    let created = LIFECYCLE_FAIL.create_all(&platform, |_| Ok(()));
    c.check(
        "lifecycle: channel 1 fails, channel 2 abandoned",
        created == Ok(CreateReport { started: 1, failed: 1, abandoned: 1 }),
    );
    c.check("lifecycle: the error names channel 1", LIFECYCLE_FAIL.error() == Some(&FwError::StartRefused(1)));
    let report = LIFECYCLE_FAIL.cleanup(&platform).map(|t| t.report());
    c.check("lifecycle: only the started worker is joined", report.map(|r| r.joined) == Ok(1));
    c.check("lifecycle: the failed channel never ran", platform.ran.lock(|r| *r == [1, 0, 0, 0]));
    c.check("lifecycle: channel 1 is Failed", LIFECYCLE_FAIL.state(ChannelId(1)) == Ok(ChannelState::Failed));
}

/// Destination guest RAM for the block scenario: two blocks of 4 KiB pages, in statics.
const PAGE: usize = 4096;
const PAGES_A: usize = 4;
const PAGES_B: usize = 2;
static RAM_A: [AtomicU8; PAGES_A * PAGE] = [const { AtomicU8::new(0) }; PAGES_A * PAGE];
static RAM_B: [AtomicU8; PAGES_B * PAGE] = [const { AtomicU8::new(0) }; PAGES_B * PAGE];
static REGION_A: AtomicRegion<'static> = AtomicRegion::new(&RAM_A);
static REGION_B: AtomicRegion<'static> = AtomicRegion::new(&RAM_B);
static WORDS_A: [AtomicWord; words_for(PAGES_A)] = [const { AtomicWord::new(0) }; words_for(PAGES_A)];
static WORDS_B: [AtomicWord; words_for(PAGES_B)] = [const { AtomicWord::new(0) }; words_for(PAGES_B)];
static TABLE: TableSlot<'static, AtomicRegion<'static>, 2> = TableSlot::new();
static BLOCKS_COORD: FwCoordinator = match Coordinator::new(1) {
    Ok(c) => c,
    Err(_) => panic!("1 channel fits a capacity of 4"),
};

/// What the worker's first zero page on zeroed memory did (it must not touch memory).
static FIRST_ZERO: SpinLock<Option<ZeroPage>> = SpinLock::new(None);

/// A platform whose one worker, run when joined, receives pages into the table through a lease.
struct PageWorker;

impl Wake for PageWorker {
    fn wake(&self, _channel: ChannelId) {}
}

impl Platform for PageWorker {
    type Handle = ChannelId;
    type Error = FwError;

    fn start(&self, channel: ChannelId) -> Result<ChannelId, FwError> {
        Ok(channel)
    }

    fn join(&self, _channel: ChannelId, _handle: ChannelId) -> WorkerExit {
        let Ok(lease) = TABLE.lease() else { return WorkerExit::Panicked };
        lease.with(|table| {
            let (Some((_, a)), Some((_, b))) = (table.find(b"pc.ram"), table.find(b"vga.vram")) else { return };
            // Block A: data on pages 0 and 2, a zero page on 1 (first time: untouched), page 3
            // data then zero (must end zero). Block B: both pages data. One page buffer on the
            // stack, filled per page, keeps 4 KiB constants out of flash.
            let mut buf = [0u8; PAGE];
            let mut data = |byte: u8| {
                buf.fill(byte);
                buf
            };
            let _ = a.write_page(PageIndex::new(0), &data(0xA0));
            let first = a.zero_page(PageIndex::new(1));
            FIRST_ZERO.lock(|z| *z = first.ok());
            let _ = a.write_page(PageIndex::new(2), &data(0xA2));
            let _ = a.write_page(PageIndex::new(3), &data(0xA3));
            let _ = a.zero_page(PageIndex::new(3));
            let _ = b.write_page(PageIndex::new(0), &data(0xB0));
            let _ = b.write_page(PageIndex::new(1), &data(0xB1));
        });
        WorkerExit::Returned
    }
}

fn page_is(region: &AtomicRegion<'_>, page: usize, byte: u8) -> bool {
    let mut buf = [0u8; 64];
    (0..PAGE / 64).all(|i| {
        region.read(page * PAGE + i * 64, &mut buf);
        buf.iter().all(|&b| b == byte)
    })
}

fn scenario_blocks(c: &mut Checks) {
    let installed = TABLE.install(BLOCKS_COORD.id(), ZeroPagePolicy::SkipUntouched, |table| {
        let size = multifd_core::wire::Geometry::DEFAULT;
        let a = BlockSpec { name: b"pc.ram", used_len: (PAGES_A * PAGE) as u64, page_size: size, memory_zeroed: true };
        let b =
            BlockSpec { name: b"vga.vram", used_len: (PAGES_B * PAGE) as u64, page_size: size, memory_zeroed: true };
        table.add(&a, &REGION_A, &WORDS_A)?;
        table.add(&b, &REGION_B, &WORDS_B)?;
        Ok(())
    });
    c.check("blocks: table of 2 blocks installed in static storage", installed.is_ok());
    let created = BLOCKS_COORD.create_all(&PageWorker, |_| Ok(()));
    c.check("blocks: receive worker started", created.map(|r| r.started) == Ok(1));
    c.check(
        "blocks: release refused while the worker is not joined",
        matches!(TABLE.release_after(&BLOCKS_COORD), Err(ReleaseError::NotQuiescent(_))),
    );
    let joined = BLOCKS_COORD.cleanup(&PageWorker).map(|t| t.report().joined);
    c.check("blocks: worker joined", joined == Ok(1));
    let counts = TABLE.lease().map(|l| {
        l.with(|t| {
            let a = t.find(b"pc.ram").map(|(_, b)| b.bitmap().count());
            let b = t.find(b"vga.vram").map(|(_, b)| b.bitmap().count());
            (a, b)
        })
    });
    c.check("blocks: every page's bit is set", counts == Ok((Some(PAGES_A), Some(PAGES_B))));
    c.check("blocks: data pages hold their bytes", page_is(&REGION_A, 0, 0xA0) && page_is(&REGION_A, 2, 0xA2));
    c.check("blocks: first-time zero page skipped the write", FIRST_ZERO.lock(|z| *z) == Some(ZeroPage::Skipped));
    c.check("blocks: first-time zero page reads zero", page_is(&REGION_A, 1, 0));
    c.check("blocks: data then zero ends zero (B31)", page_is(&REGION_A, 3, 0));
    c.check("blocks: second block intact", page_is(&REGION_B, 0, 0xB0) && page_is(&REGION_B, 1, 0xB1));
    c.check("blocks: released after all joined", TABLE.release_after(&BLOCKS_COORD).is_ok());
    c.check("blocks: no lease after release", matches!(TABLE.lease(), Err(ReleaseError::NotInstalled)));
}

fn scenario_migration(c: &mut Checks) {
    use crate::migration::{Fault, PAGES, guards_intact, page_matches, run};
    let Some(source) = cortex_m::singleton!(: crate::migration::Source = crate::migration::Source::new()) else {
        c.check("migration: source arena", false);
        return;
    };
    source.fill();
    let source: &'static crate::migration::Source = source;

    // 1. A full migration with one dirty round, byte for byte.
    let out = run(source, Fault::None);
    defmt::info!("migration: {}", out);
    c.check("migration: both send workers started", out.started == 2);
    c.check("migration: precopy finished", out.sent_ok);
    c.check("migration: destination completed (EOF, clean channel ends, epochs paired)", out.completed);
    c.check("migration: two epochs (the setup flush and one per round)", out.epochs >= 2);
    let exact = (0..2).all(|b| (0..PAGES[b]).all(|p| page_matches(source, b, p)));
    c.check("migration: destination equals the source byte for byte", exact);
    c.check("migration: every bitmap bit is set", out.all_bits);
    c.check("migration: no byte written outside a block", guards_intact());
    c.check("migration: send workers joined", out.send_joined == 2);
    c.check("migration: block table refused before the receive workers were joined", !out.released_early);
    c.check("migration: block table released after they were", out.released_after);

    // 2. Channel 1's worker cannot start: the migration fails cleanly.
    let out = run(source, Fault::StartChannel1);
    defmt::info!("start failure: {}", out);
    c.check("start failure: only channel 0 started", out.started == 1);
    c.check("start failure: nothing was sent", !out.sent_ok && !out.completed);
    c.check("start failure: only the started worker was joined", out.send_joined == 1);
    c.check("start failure: arena released only after cleanup", !out.released_early && out.released_after);

    // 3. A corrupted packet header on channel 0: a typed error, no write outside a block.
    let out = run(source, Fault::CorruptOffset);
    defmt::info!("corrupt packet: {}", out);
    c.check("corrupt packet: the destination reports the bad offset", out.offset_error && !out.completed);
    c.check("corrupt packet: the sender stops too", !out.sent_ok);
    c.check("corrupt packet: no byte written outside a block", guards_intact());
    c.check("corrupt packet: workers joined, arena released after", out.send_joined == 2 && out.released_after);
}

/// Logs the RAM the core's engine state takes, for BENCHMARKS.md (4 channels, 4 blocks).
fn log_state_sizes() {
    use core::mem::size_of;
    use multifd_core::recv::{MainStream, RecvChannel, RecvSession};
    use multifd_core::send::SendEngine;
    use multifd_core::wire::{MAX_HEADER_LEN, MAX_PAGE_COUNT};
    type Send4 = SendEngine<'static, crate::migration::Source, ChannelId, FwError, 4>;
    type Session4 = RecvSession<ChannelId, FwError, 4>;
    type Table4 = TableSlot<'static, AtomicRegion<'static>, 4>;
    // Packet buffers: a send slot's batch (the next packet's offsets) and a receive channel's header.
    let send_batches = 4 * MAX_PAGE_COUNT * 8;
    let recv_headers = 4 * MAX_HEADER_LEN;
    let send = size_of::<Send4>();
    let recv = 4 * size_of::<RecvChannel>() + size_of::<Session4>();
    let main = size_of::<MainStream<4>>();
    defmt::info!(
        "state bytes: send engine {=usize} (batches {=usize}), 4 recv channels + session {=usize} (headers {=usize}), block table slot {=usize}, main stream (parser, 4-block list) {=usize}",
        send,
        send_batches,
        recv,
        recv_headers,
        size_of::<Table4>(),
        main
    );
    let engine_state = (send - send_batches) + (recv - recv_headers) + size_of::<Table4>() + main;
    defmt::info!("engine state for 4 channels and 4 blocks, packet buffers excluded: {=usize} bytes", engine_state);
}

#[entry]
fn main() -> ! {
    defmt::info!("firmware-demo: multifd-core {=str} on bare metal", multifd_core::VERSION);
    let mut c = Checks { run: 0, failed: 0 };
    scenario_seams(&mut c);
    scenario_lifecycle_all_start(&mut c);
    scenario_lifecycle_start_fails(&mut c);
    scenario_blocks(&mut c);
    scenario_migration(&mut c);
    log_state_sizes();

    #[cfg(feature = "fail-demo")]
    c.check("deliberately failing check (fail-demo)", false);
    if cfg!(feature = "panic-demo") {
        panic!("deliberate panic (panic-demo)");
    }

    if c.failed == 0 {
        defmt::info!("PASS: {=u32} checks", c.run);
        exit(0)
    } else {
        defmt::error!("FAIL: {=u32} of {=u32} checks failed", c.failed, c.run);
        exit(EXIT_CHECK_FAILED)
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // Everything, panics included, goes through defmt: plain text on semihosting stdout would
    // corrupt the defmt frame stream.
    defmt::error!("panic: {}", defmt::Display2Format(info));
    exit(EXIT_PANIC)
}
