//! The stall policy of a migration, in both directions: a migration is stalled when no byte has
//! moved on any of its connections for the io timeout.
//!
//! One connection may wait while the others carry the migration (a channel parked at a SYNC, a
//! long round, the main stream between sections), so a single connection's silence is not a stall.
//! The embedder keeps one byte counter for all connections, lets each blocking read or write time
//! out after [`StallWatch::poll_interval`], and asks its watch whether to wait again. Time is passed
//! in (any monotonic clock, as a [`Duration`] since an arbitrary origin), so the policy needs no OS.
//!
//! ```
//! use core::time::Duration;
//! use multifd_core::stall::{Stalled, StallWatch};
//!
//! let limit = Some(Duration::from_secs(4));
//! assert_eq!(StallWatch::poll_interval(limit), Some(Duration::from_secs(1)));
//! let mut w = StallWatch::new(limit, 100, Duration::ZERO);
//! // Another connection moved bytes: not a stall, and the clock restarts.
//! assert_eq!(w.check(150, Duration::from_secs(3)), Ok(()));
//! assert_eq!(w.check(150, Duration::from_secs(6)), Ok(()));
//! // Nothing moved for the whole limit since then.
//! assert_eq!(w.check(150, Duration::from_secs(7)), Err(Stalled { waited: Duration::from_secs(4) }));
//! ```

use core::fmt;
use core::time::Duration;

/// No byte moved on any connection for `waited`, the io timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stalled {
    /// The io timeout.
    pub waited: Duration,
}

impl fmt::Display for Stalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stalled: no byte moved on any connection for {:?}", self.waited)
    }
}

impl core::error::Error for Stalled {}

/// What one waiting read or write last saw of the shared byte counter, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallWatch {
    limit: Option<Duration>,
    seen: u64,
    since: Duration,
}

impl StallWatch {
    /// How long one blocking read or write should wait before it asks [`StallWatch::check`]: a
    /// quarter of the io timeout, at least 10 ms, so a stall is noticed within a quarter of the
    /// timeout after it is due. `None` (no io timeout): wait without limit.
    pub fn poll_interval(limit: Option<Duration>) -> Option<Duration> {
        limit.map(|l| (l / 4).max(Duration::from_millis(10)))
    }

    /// A watch that starts at `now`, with the shared counter at `total`. `limit` `None`: never stalls.
    pub const fn new(limit: Option<Duration>, total: u64, now: Duration) -> Self {
        Self { limit, seen: total, since: now }
    }

    /// After a wait timed out, with the shared counter now at `total`: `Ok` to wait again, or
    /// [`Stalled`] when it has not moved for the whole io timeout.
    pub fn check(&mut self, total: u64, now: Duration) -> Result<(), Stalled> {
        if total != self.seen {
            self.seen = total;
            self.since = now;
            return Ok(());
        }
        match self.limit {
            Some(waited) if now.saturating_sub(self.since) >= waited => Err(Stalled { waited }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn no_limit_never_stalls() {
        let mut w = StallWatch::new(None, 0, S(0));
        assert_eq!(w.check(0, S(1_000_000)), Ok(()));
        assert_eq!(StallWatch::poll_interval(None), None);
    }

    #[test]
    fn stalls_only_after_the_limit_without_progress() {
        let mut w = StallWatch::new(Some(S(10)), 7, S(100));
        assert_eq!(w.check(7, S(109)), Ok(()));
        assert_eq!(w.check(7, S(110)), Err(Stalled { waited: S(10) }));
        // Progress anywhere restarts the clock from the moment it is seen.
        assert_eq!(w.check(8, S(111)), Ok(()));
        assert_eq!(w.check(8, S(120)), Ok(()));
        assert_eq!(w.check(8, S(121)), Err(Stalled { waited: S(10) }));
    }

    #[test]
    fn a_clock_that_goes_back_is_not_a_stall() {
        let mut w = StallWatch::new(Some(S(10)), 0, S(100));
        assert_eq!(w.check(0, S(50)), Ok(()));
    }

    #[test]
    fn poll_interval_is_a_quarter_with_a_floor() {
        assert_eq!(StallWatch::poll_interval(Some(S(60))), Some(S(15)));
        assert_eq!(StallWatch::poll_interval(Some(Duration::from_millis(8))), Some(Duration::from_millis(10)));
        assert_eq!(StallWatch::poll_interval(Some(Duration::MAX)), Some(Duration::MAX / 4));
    }
}
