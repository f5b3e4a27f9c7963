//! How long a stored answer answers, by kind: a hit until its TTL (`ttl_s` for a 200,
//! `not_found_ttl_s` for a 404), due for one background refresh in the last `refresh_ahead_s`
//! of that, and usable as a STALE answer (when upstream cannot answer) up to
//! `stale_if_error_s` past it. moka keeps every entry for the longest of these; each kind's
//! limits are checked exactly on every read.

use std::time::Duration;

use super::entry::{StoredAnswer, MAX_TTL};
use crate::config::CacheSettings;

/// Where an entry stands, by age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Freshness {
    /// Younger than its TTL, outside the refresh-ahead window.
    Fresh,
    /// Younger than its TTL, inside the refresh-ahead window: answer it and refresh it.
    RefreshDue,
    /// Past its TTL: not a hit (it may still be a STALE answer, see [`Lifetimes::stale_usable`]).
    Expired,
}

/// One kind's limits, in milliseconds since the entry was stored.
#[derive(Debug, Clone, Copy)]
struct KindLimits {
    ttl_ms: u32,
    /// A hit at this age or older starts a refresh; `ttl_ms` when refreshing ahead is off.
    refresh_from_ms: u32,
    /// Past this age the entry answers nothing; `ttl_ms` when stale-if-error is off.
    stale_until_ms: u32,
}

impl KindLimits {
    fn new(ttl: Duration, refresh_ahead: Option<Duration>, stale: Option<Duration>) -> Self {
        let ttl = ttl.min(MAX_TTL);
        let ttl_ms = ttl.as_millis() as u32;
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let refresh_from_ms = match refresh_ahead.map(millis) {
            None => ttl_ms,
            // Validation keeps refresh_ahead_s below ttl_s; a shorter 404 TTL refreshes in
            // its second half rather than on every hit.
            Some(ahead) if ahead < u64::from(ttl_ms) => ttl_ms - ahead as u32,
            Some(_) => ttl_ms / 2,
        };
        let stale_until = ttl.saturating_add(stale.unwrap_or_default()).min(MAX_TTL);
        KindLimits {
            ttl_ms,
            refresh_from_ms,
            stale_until_ms: stale_until.as_millis() as u32,
        }
    }
}

/// The limits of both kinds of entry.
#[derive(Debug, Clone, Copy)]
pub(super) struct Lifetimes {
    found: KindLimits,
    not_found: KindLimits,
    /// `stale_if_error_s` is set.
    serves_stale: bool,
}

impl Lifetimes {
    pub(super) fn new(settings: &CacheSettings) -> Self {
        let stale = settings.stale_if_error.filter(|s| !s.is_zero());
        Lifetimes {
            found: KindLimits::new(settings.ttl, settings.refresh_ahead, stale),
            not_found: KindLimits::new(settings.not_found_ttl, settings.refresh_ahead, stale),
            serves_stale: stale.is_some(),
        }
    }

    /// Whether a GET upstream cannot answer may be answered from an expired entry.
    pub(super) fn serves_stale(&self) -> bool {
        self.serves_stale
    }

    /// How long moka keeps an entry: the longest any kind may answer (at least 1 ms).
    pub(super) fn retention(&self) -> Duration {
        let longest = self.found.stale_until_ms.max(self.not_found.stale_until_ms);
        Duration::from_millis(u64::from(longest).max(1))
    }

    /// Whether 404 answers are cached at all.
    pub(super) fn caches_not_found(&self) -> bool {
        self.not_found.ttl_ms > 0
    }

    fn kind(&self, not_found: bool) -> &KindLimits {
        if not_found {
            &self.not_found
        } else {
            &self.found
        }
    }

    fn of(&self, stored: &StoredAnswer) -> &KindLimits {
        self.kind(stored.is_not_found())
    }

    /// The TTL of a 404 (`not_found`) or of a 200.
    pub(super) fn ttl_of(&self, not_found: bool) -> Duration {
        Duration::from_millis(self.kind(not_found).ttl_ms.into())
    }

    /// Where an entry of this age stands. One comparison for a hit outside the refresh window.
    #[inline]
    pub(super) fn freshness(&self, stored: &StoredAnswer, age_ms: u32) -> Freshness {
        let limits = self.of(stored);
        if age_ms < limits.refresh_from_ms {
            Freshness::Fresh
        } else if age_ms < limits.ttl_ms {
            Freshness::RefreshDue
        } else {
            Freshness::Expired
        }
    }

    /// Whether an entry of this age may still answer when upstream cannot (its TTL plus
    /// `stale_if_error_s`; a fresh entry always may).
    pub(super) fn stale_usable(&self, stored: &StoredAnswer, age_ms: u32) -> bool {
        age_ms < self.of(stored).stale_until_ms
    }

    /// Whether an entry of this age is past its TTL (a STALE answer, not a hit).
    pub(super) fn expired(&self, stored: &StoredAnswer, age_ms: u32) -> bool {
        age_ms >= self.of(stored).ttl_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::ConsentStatus;

    fn settings(ttl_s: u64, not_found_s: u64, ahead_s: u64, stale_s: u64) -> CacheSettings {
        let opt = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        CacheSettings {
            enabled: true,
            ttl: Duration::from_secs(ttl_s),
            not_found_ttl: Duration::from_secs(not_found_s),
            max_entries: 10,
            stale_if_error: opt(stale_s),
            refresh_ahead: opt(ahead_s),
        }
    }

    #[test]
    fn without_the_options_an_entry_is_fresh_then_expired_and_never_stale() {
        let l = Lifetimes::new(&settings(60, 30, 0, 0));
        let found = StoredAnswer::canonical(ConsentStatus::Consented, 0);
        assert_eq!(l.freshness(&found, 59_999), Freshness::Fresh);
        assert_eq!(l.freshness(&found, 60_000), Freshness::Expired);
        assert!(!l.stale_usable(&found, 60_000));
        assert_eq!(l.retention(), Duration::from_secs(60));
    }

    #[test]
    fn refresh_ahead_and_stale_windows() {
        let l = Lifetimes::new(&settings(60, 0, 10, 300));
        let found = StoredAnswer::canonical(ConsentStatus::Refused, 0);
        assert_eq!(l.freshness(&found, 49_999), Freshness::Fresh);
        assert_eq!(l.freshness(&found, 50_000), Freshness::RefreshDue);
        assert_eq!(l.freshness(&found, 60_000), Freshness::Expired);
        assert!(l.expired(&found, 60_000) && !l.expired(&found, 59_999));
        assert!(l.stale_usable(&found, 359_999));
        assert!(!l.stale_usable(&found, 360_000));
        assert_eq!(
            l.retention(),
            Duration::from_secs(360),
            "moka keeps the stale window"
        );
        assert!(!l.caches_not_found());
    }

    #[test]
    fn windows_past_the_clock_range_are_capped() {
        let l = Lifetimes::new(&settings(60, 30, 0, u64::MAX));
        assert_eq!(l.retention(), MAX_TTL);
        let found = StoredAnswer::canonical(ConsentStatus::Consented, 0);
        assert!(l.stale_usable(&found, (1 << 31) - 1));
    }

    #[test]
    fn a_404_ttl_shorter_than_refresh_ahead_refreshes_in_its_second_half() {
        let l = Lifetimes::new(&settings(60, 8, 10, 0));
        assert_eq!(l.not_found.refresh_from_ms, 4_000);
        assert_eq!(l.not_found.stale_until_ms, 8_000);
    }
}
