//! Bare-metal entry point. Every scenario logs through defmt and reports whether it behaved as
//! expected; the exit code (via semihosting) is 0 only if all of them did.

use cortex_m as _; // links cortex-m's single-core critical-section implementation, which defmt needs
use cortex_m_rt::entry;
use defmt_semihosting as _; // the global defmt logger: frames go out over semihosting stdout
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

#[entry]
fn main() -> ! {
    defmt::info!("firmware-demo: multifd-core {=str} on bare metal", multifd_core::VERSION);
    let mut c = Checks { run: 0, failed: 0 };
    scenario_seams(&mut c);
    scenario_lifecycle_all_start(&mut c);
    scenario_lifecycle_start_fails(&mut c);

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
