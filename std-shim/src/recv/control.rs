//! Stopping a receive from outside (a signal, or the embedder), and watching it connect.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Signal number stored when [`Control::stop`] is called (no signal has this number).
const STOPPED_BY_CALL: usize = usize::MAX;

/// Stops a running receive and says how far it got. Share one between the thread running
/// [`run_controlled`](super::run_controlled) and any other; [`Control::on_signals`] makes SIGINT and
/// SIGTERM stop it.
///
/// A stopped receive ends every worker, drops whatever it received and removes its partial block
/// files, and fails with [`Failure::Interrupted`](super::Failure::Interrupted).
#[derive(Debug, Default)]
pub struct Control {
    /// Set by a signal or by `stop`.
    stopped: Arc<AtomicBool>,
    /// The signal that stopped the receive ([`STOPPED_BY_CALL`] for `stop`), 0 while running.
    signal: Arc<AtomicUsize>,
    /// Whether the main stream and every channel have connected.
    connected: AtomicBool,
}

impl Control {
    /// A control nothing has stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes SIGINT and SIGTERM stop the receive. A second signal of either kind while the first is
    /// being handled ends the process at once with the shell's code for it (128 + the signal).
    pub fn on_signals(&self) -> io::Result<()> {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // Registered first so that it sees the flag as it was before this signal set it.
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&self.stopped))?;
            signal_hook::flag::register_usize(sig, Arc::clone(&self.signal), sig as usize)?;
            signal_hook::flag::register(sig, Arc::clone(&self.stopped))?;
        }
        Ok(())
    }

    /// Stops the receive.
    pub fn stop(&self) {
        // Relaxed: both are flags read on their own; nothing else is published through them.
        self.signal.store(STOPPED_BY_CALL, Ordering::Relaxed);
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// `Some` once stopped: the signal's number, or `None` when stopped by [`Control::stop`].
    pub fn stopped(&self) -> Option<Option<i32>> {
        // Relaxed: as in `stop`.
        if !self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        match self.signal.load(Ordering::Relaxed) {
            STOPPED_BY_CALL | 0 => Some(None),
            n => Some(i32::try_from(n).ok()),
        }
    }

    /// Whether the main stream and every channel have connected and identified themselves.
    pub fn all_connected(&self) -> bool {
        // Relaxed: a progress flag for observers; nothing is read through it.
        self.connected.load(Ordering::Relaxed)
    }

    pub(super) fn set_connected(&self) {
        // Relaxed: as in `all_connected`.
        self.connected.store(true, Ordering::Relaxed);
    }
}
