//! Logging seam: one set of macros for the whole core, forwarding to `defmt` (firmware), to the
//! `log` facade (std), or to nothing.
//!
//! Rules for callers, so that every call compiles under all three backends:
//! - format strings use only `{}` and `{:?}` (the subset both defmt and `log` accept);
//! - every logged type implements `Debug` and, with the `defmt` feature, `defmt::Format`;
//! - never log per page above `trace!`; channel state changes log at `debug!`.
//!
//! With neither feature the macros still borrow their arguments, so a variable used only in a log
//! line does not become "unused" in that build.
#![allow(unused_macros)]

#[cfg(all(feature = "defmt", feature = "log"))]
compile_error!("multifd-core: the features `defmt` and `log` are mutually exclusive; enable one of them");

macro_rules! log_forward {
    ($level:ident, $fmt:literal $(, $arg:expr)* $(,)?) => {{
        #[cfg(feature = "defmt")]
        ::defmt::$level!($fmt $(, $arg)*);
        #[cfg(feature = "log")]
        ::log::$level!($fmt $(, $arg)*);
        #[cfg(not(any(feature = "defmt", feature = "log")))]
        {
            let _ = ($(&$arg,)*);
        }
    }};
}

#[collapse_debuginfo(yes)]
macro_rules! trace {
    ($($t:tt)*) => { log_forward!(trace, $($t)*) };
}

#[collapse_debuginfo(yes)]
macro_rules! debug {
    ($($t:tt)*) => { log_forward!(debug, $($t)*) };
}

#[collapse_debuginfo(yes)]
macro_rules! info {
    ($($t:tt)*) => { log_forward!(info, $($t)*) };
}

#[collapse_debuginfo(yes)]
macro_rules! warn {
    ($($t:tt)*) => { log_forward!(warn, $($t)*) };
}

#[collapse_debuginfo(yes)]
macro_rules! error {
    ($($t:tt)*) => { log_forward!(error, $($t)*) };
}
