//! Lag: how long this host has known of committed changes it has not yet
//! applied.
//!
//! Observations ("there is something to read") come from notifications and
//! from the heartbeat's count of pending rows. A read that *started after* an
//! observation and ended caught up resolves it. Lag is the age of the oldest
//! unresolved observation. Measuring from observation rather than from the
//! rows' timestamps keeps a late-committing transaction (whose rows carry its
//! start time) from looking like minutes of lag.

use std::time::{Duration, Instant};

/// Tracks unresolved observations; at most two are kept: the oldest, and
/// the oldest made since the current read started.
#[derive(Debug, Default, Clone)]
pub struct LagTracker {
    oldest: Option<Instant>,
    since_read_start: Option<Instant>,
    read_started: Option<Instant>,
}

impl LagTracker {
    /// Something committed is known to be unread as of `at`.
    pub fn observe(&mut self, at: Instant) {
        if self.read_started.is_some_and(|start| at >= start) && self.since_read_start.is_none() {
            self.since_read_start = Some(at);
        }
        if self.oldest.is_none() {
            self.oldest = Some(at);
        }
    }

    /// A read begins at `at`.
    pub fn read_started(&mut self, at: Instant) {
        self.read_started = Some(at);
        self.since_read_start = None;
    }

    /// The read begun at the last [`Self::read_started`] has ended with the
    /// host caught up: everything observed before it started is applied.
    pub fn caught_up(&mut self) {
        let Some(start) = self.read_started.take() else {
            return;
        };
        if self.oldest.is_some_and(|o| o <= start) {
            self.oldest = self.since_read_start;
        }
        self.since_read_start = None;
    }

    /// The lag at `now`.
    pub fn lag(&self, now: Instant) -> Duration {
        self.oldest
            .map_or(Duration::ZERO, |o| now.saturating_duration_since(o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn caught_up_read_resolves_earlier_observations() {
        let t = Instant::now();
        let mut l = LagTracker::default();
        assert_eq!(l.lag(t), Duration::ZERO);
        l.observe(at(t, 0));
        assert_eq!(l.lag(at(t, 50)), Duration::from_millis(50));
        l.read_started(at(t, 10));
        l.caught_up();
        assert_eq!(l.lag(at(t, 60)), Duration::ZERO);
    }

    #[test]
    fn observation_during_a_read_survives_it() {
        let t = Instant::now();
        let mut l = LagTracker::default();
        l.observe(at(t, 0));
        l.read_started(at(t, 10));
        l.observe(at(t, 20)); // committed after the read's snapshot, maybe
        l.caught_up();
        assert_eq!(l.lag(at(t, 100)), Duration::from_millis(80));
        l.read_started(at(t, 100));
        l.caught_up();
        assert_eq!(l.lag(at(t, 101)), Duration::ZERO);
    }

    #[test]
    fn a_read_that_started_before_the_observation_does_not_resolve_it() {
        let t = Instant::now();
        let mut l = LagTracker::default();
        l.read_started(at(t, 0));
        l.observe(at(t, 5));
        l.caught_up();
        assert_eq!(l.lag(at(t, 10)), Duration::from_millis(5));
    }

    #[test]
    fn unfinished_reads_keep_the_lag_growing() {
        let t = Instant::now();
        let mut l = LagTracker::default();
        l.observe(at(t, 0));
        l.read_started(at(t, 1));
        // no caught_up(): a full page, more to read
        l.read_started(at(t, 2));
        assert_eq!(l.lag(at(t, 30)), Duration::from_millis(30));
    }
}
