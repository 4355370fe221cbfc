//! Bare-metal entry point. Every scenario logs through defmt and reports whether it behaved as
//! expected; the exit code (via semihosting) is 0 only if all of them did.

use cortex_m as _; // links cortex-m's single-core critical-section implementation, which defmt needs
use cortex_m_rt::entry;
use defmt_semihosting as _; // the global defmt logger: frames go out over semihosting stdout
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

#[entry]
fn main() -> ! {
    defmt::info!("firmware-demo: multifd-core {=str} on bare metal", multifd_core::VERSION);
    let mut c = Checks { run: 0, failed: 0 };
    scenario_seams(&mut c);

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
