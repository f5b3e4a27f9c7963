//! Redis' clock (`TIME`, read by the scripts) against this instance's monotonic clock, to tell
//! whether something Redis timed (when a fill's read began) came after something this instance
//! timed (a change of a contact it heard of).
//!
//! A script sent at local moment `s` that read Redis' clock as `r` bounds the offset between the
//! clocks from above: Redis read it after the call was sent, so `r - s` is at least the offset.
//! The tightest bound seen is kept (the fastest round trip), loosened by 0.1% of the time since
//! it was measured, as fast as two clocks kept by NTP may drift apart. A Redis time later than
//! a local moment plus that bound is certainly after it. Redis' clock must not be stepped
//! forward (its key expiry assumes as much too).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Redis' time is in whole milliseconds, and so are the local ones here: one of each.
pub(super) const ROUNDING: Duration = Duration::from_millis(2);

pub(super) struct RedisClock {
    origin: Instant,
    /// The tightest bound: Redis' ms minus local ms, and when it was measured.
    bound: Mutex<Option<(i64, Instant)>>,
}

impl RedisClock {
    pub fn new() -> RedisClock {
        RedisClock {
            origin: Instant::now(),
            bound: Mutex::new(None),
        }
    }

    /// Local milliseconds since the origin (earlier moments count as the origin).
    fn local_ms(&self, at: Instant) -> i64 {
        i64::try_from(at.saturating_duration_since(self.origin).as_millis()).unwrap_or(i64::MAX)
    }

    /// The bound now: the kept one, loosened by the drift since it was measured.
    fn offset_at(bound: (i64, Instant), now: Instant) -> i64 {
        let drift = now.saturating_duration_since(bound.1).as_millis() / 1000;
        bound
            .0
            .saturating_add(i64::try_from(drift).unwrap_or(i64::MAX))
    }

    /// A script sent at `sent` read Redis' clock as `redis_ms`.
    pub fn observe(&self, sent: Instant, redis_ms: u64) {
        let sample = i64::try_from(redis_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(self.local_ms(sent));
        let now = Instant::now();
        let mut bound = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
        if bound.is_none_or(|kept| sample <= Self::offset_at(kept, now)) {
            *bound = Some((sample, now));
        }
    }

    /// The latest Redis time the local moment `at` may have been (rounding included): a Redis
    /// time after it is certainly after `at`. `None` until a script has answered.
    pub fn latest_redis_ms(&self, at: Instant) -> Option<u64> {
        let bound = (*self.bound.lock().unwrap_or_else(PoisonError::into_inner))?;
        let redis = self
            .local_ms(at)
            .saturating_add(Self::offset_at(bound, Instant::now()))
            .saturating_add(ROUNDING.as_millis() as i64);
        u64::try_from(redis).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_fastest_round_trip_bounds_the_offset_and_loosens_with_time() {
        let clock = RedisClock::new();
        let start = Instant::now();
        assert_eq!(clock.latest_redis_ms(start), None);
        tokio::time::advance(Duration::from_millis(100)).await;
        // Sent at local 100 ms, Redis read 1,000,130: offset at most 1,000,030.
        clock.observe(start + Duration::from_millis(100), 1_000_130);
        // A slower round trip says less: ignored.
        clock.observe(start + Duration::from_millis(100), 1_000_180);
        assert_eq!(clock.latest_redis_ms(start), Some(1_000_032));
        // A faster one tightens it.
        clock.observe(start + Duration::from_millis(100), 1_000_110);
        assert_eq!(clock.latest_redis_ms(start), Some(1_000_012));
        // 10 s later it allows 10 ms of drift.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(clock.latest_redis_ms(start), Some(1_000_022));
    }
}
