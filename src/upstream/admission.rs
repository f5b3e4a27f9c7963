//! Admission to the consent API: what keeps the proxy from sending Talkdesk the very traffic
//! that hurts it. Every upstream attempt first gets a permit here, which checks, in order:
//! - upstream's own `Retry-After` (after a 429 or a 503): no attempt at all until it passes;
//! - the circuit breaker: `breaker_failures` consecutive failed attempts open it; while open
//!   nothing is sent; after `breaker_cooldown_ms` one probe goes through, whose success closes
//!   it and whose failure opens it again;
//! - the rate budget (`max_requests_per_s`, a token bucket that hands out reservations): an
//!   attempt that cannot have a token before its deadline is refused at once;
//! - the concurrency budget (`max_concurrent`, a semaphore): an attempt waits for a slot
//!   within its deadline.
//!
//! A refusal is `upstream_unavailable` (503) with the time after which trying again makes
//! sense, so callers hear at once instead of at the deadline.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge, Registry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{BreakerSettings, TalkdeskSettings};
use crate::error::ProxyError;
use crate::metrics;

/// The longest `Retry-After` honoured: a longer one (or a date far away) is capped, so one
/// odd answer cannot stop all traffic for hours.
pub const MAX_HOLD_OFF: Duration = Duration::from_secs(60);
/// An attempt with less time than this before its deadline is not worth a slot: waiting for
/// one gives up this long before the deadline, so the caller hears 503, not the timeout.
const MIN_USEFUL_ATTEMPT: Duration = Duration::from_millis(50);

/// Why an attempt was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Upstream's `Retry-After` has not passed.
    RetryAfter,
    /// The circuit is open (or its one probe is in flight).
    CircuitOpen,
    /// The rate budget has no token before the deadline.
    RateBudget,
    /// No concurrency slot came free before the deadline.
    Concurrency,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::RetryAfter => "retry_after",
            Refusal::CircuitOpen => "circuit_open",
            Refusal::RateBudget => "rate_budget",
            Refusal::Concurrency => "concurrency",
        }
    }

    const ALL: [Refusal; 4] = [
        Refusal::RetryAfter,
        Refusal::CircuitOpen,
        Refusal::RateBudget,
        Refusal::Concurrency,
    ];
}
metrics::assert_in_declaration_order!(Refusal::ALL);

#[derive(Clone)]
pub struct AdmissionMetrics {
    circuit_open: IntGauge,
    /// Indexed like `Refusal::ALL`.
    refused: [IntCounter; 4],
}

impl AdmissionMetrics {
    pub fn register(registry: &Registry) -> Self {
        let refused = metrics::counter_vec(
            registry,
            "consent_proxy_upstream_refused_total",
            "Upstream attempts not sent, by reason: retry_after (upstream's Retry-After has \
             not passed), circuit_open, rate_budget, concurrency.",
            &["reason"],
        );
        AdmissionMetrics {
            circuit_open: metrics::gauge(
                registry,
                "consent_proxy_upstream_circuit_open",
                "1 while the circuit to the consent API is open.",
            ),
            refused: metrics::counters(&refused, Refusal::ALL.map(Refusal::as_str)),
        }
    }

    fn refused(&self, refusal: Refusal) {
        self.refused[refusal as usize].inc();
    }
}

/// How an admitted attempt went, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Upstream answered (anything but a 5xx).
    Answered,
    /// Connect error, timeout, broken exchange, or a 5xx.
    Failed,
}

pub struct Admission {
    epoch: Instant,
    /// Milliseconds after `epoch` before which no attempt is sent (upstream's Retry-After).
    hold_off_until_ms: AtomicU64,
    breaker: Option<Breaker>,
    rate: Option<RateBudget>,
    slots: Arc<Semaphore>,
    metrics: AdmissionMetrics,
}

/// The right to send one attempt. Report how it went with [`Permit::finish`]; dropped
/// unfinished (the request was cancelled), a probe counts as failed, so the breaker is never
/// left waiting for a probe that will not come back.
pub struct Permit<'a> {
    admission: &'a Admission,
    _slot: OwnedSemaphorePermit,
    probe: bool,
    finished: bool,
}

impl Permit<'_> {
    pub fn finish(mut self, verdict: Verdict) {
        self.finished = true;
        self.admission.record(verdict, self.probe);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.finished && self.probe {
            self.admission.record(Verdict::Failed, true);
        }
    }
}

impl Admission {
    pub fn new(talkdesk: &TalkdeskSettings, metrics: AdmissionMetrics) -> Self {
        Admission {
            epoch: Instant::now(),
            hold_off_until_ms: AtomicU64::new(0),
            breaker: talkdesk.breaker.map(Breaker::new),
            rate: talkdesk.max_requests_per_s.map(RateBudget::per_second),
            slots: Arc::new(Semaphore::new(talkdesk.max_concurrent)),
            metrics,
        }
    }

    /// A permit for one attempt, or `upstream_unavailable` with when to try again.
    pub async fn admit(&self, deadline: Instant) -> Result<Permit<'_>, ProxyError> {
        if let Some(wait) = self.hold_off_remaining() {
            return Err(self.refusal(Refusal::RetryAfter, wait));
        }
        let probe = match &self.breaker {
            Some(breaker) => breaker
                .admit()
                .map_err(|wait| self.refusal(Refusal::CircuitOpen, wait))?,
            None => false,
        };
        // From here on a refusal must hand the probe back (as failed: it never ran).
        let refused = |refusal, wait| {
            if probe {
                self.record(Verdict::Failed, true);
            }
            self.refusal(refusal, wait)
        };
        let give_up = deadline.checked_sub(MIN_USEFUL_ATTEMPT).unwrap_or(deadline);
        if let Some(rate) = &self.rate {
            let go_at = rate
                .reserve(give_up)
                .map_err(|wait| refused(Refusal::RateBudget, wait))?;
            tokio::time::sleep_until(go_at).await;
        }
        let slot = match tokio::time::timeout_at(give_up, self.slots.clone().acquire_owned()).await
        {
            Ok(Ok(slot)) => slot,
            // The semaphore is never closed; a timeout means no slot came free in time.
            _ => return Err(refused(Refusal::Concurrency, Duration::from_secs(1))),
        };
        Ok(Permit {
            admission: self,
            _slot: slot,
            probe,
            finished: false,
        })
    }

    /// Upstream asked for no traffic for `wait` (its `Retry-After`, capped at `MAX_HOLD_OFF`).
    pub fn hold_off(&self, wait: Duration) {
        let until = self.epoch.elapsed() + wait.min(MAX_HOLD_OFF);
        self.hold_off_until_ms
            .fetch_max(until.as_millis() as u64, Ordering::AcqRel);
    }

    /// How long upstream's `Retry-After` still holds, if it does.
    fn hold_off_remaining(&self) -> Option<Duration> {
        let until_ms = self.hold_off_until_ms.load(Ordering::Acquire);
        if until_ms == 0 {
            // Never held off: no need to read the clock.
            return None;
        }
        Duration::from_millis(until_ms)
            .checked_sub(self.epoch.elapsed())
            .filter(|d| !d.is_zero())
    }

    /// Tells the breaker (if any) how an admitted attempt went; `probe`: it was the probe, which
    /// is handed back this way.
    fn record(&self, verdict: Verdict, probe: bool) {
        if let Some(breaker) = &self.breaker {
            breaker.record(verdict, probe, &self.metrics);
        }
    }

    fn refusal(&self, refusal: Refusal, retry_after: Duration) -> ProxyError {
        self.metrics.refused(refusal);
        ProxyError::UpstreamUnavailable {
            reason: refusal.as_str(),
            retry_after,
        }
    }
}

/// A token bucket (GCRA) that hands out reservations: each admitted attempt learns the
/// instant it may go, and one that could not go before its deadline is refused at once,
/// without taking a token. (governor's and tower's limiters only answer "not now", so
/// concurrent waiters would poll, take turns, and be refused late, at their deadlines.)
struct RateBudget {
    /// One token's worth of time.
    interval: Duration,
    /// How far ahead of the theoretical schedule a burst may go: `burst - 1` intervals.
    burst: Duration,
    /// The theoretical arrival time of the next attempt.
    next: Mutex<Instant>,
}

impl RateBudget {
    /// `per_second` attempts a second, in bursts of up to `per_second`.
    fn per_second(per_second: NonZeroU32) -> Self {
        let interval = Duration::from_secs(1) / per_second.get();
        RateBudget {
            interval,
            burst: interval * (per_second.get() - 1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// When an attempt may go, if that is no later than `latest`; else how long until a
    /// token would be free.
    fn reserve(&self, latest: Instant) -> Result<Instant, Duration> {
        let now = Instant::now();
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let scheduled = (*next).max(now);
        let go_at = scheduled.checked_sub(self.burst).unwrap_or(now).max(now);
        if go_at > latest {
            return Err(go_at - now);
        }
        *next = scheduled + self.interval;
        Ok(go_at)
    }
}

/// The circuit breaker's state.
#[derive(Debug, Clone, Copy)]
enum Circuit {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// The one probe after the cooldown is in flight.
    Probing,
}

struct Breaker {
    settings: BreakerSettings,
    state: Mutex<Circuit>,
}

impl Breaker {
    fn new(settings: BreakerSettings) -> Self {
        Breaker {
            settings,
            state: Mutex::new(Circuit::Closed { failures: 0 }),
        }
    }

    /// `Ok(true)` admits the probe, `Ok(false)` an ordinary attempt, `Err(wait)` refuses.
    fn admit(&self) -> Result<bool, Duration> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match *state {
            Circuit::Closed { .. } => Ok(false),
            Circuit::Open { until } => {
                let now = Instant::now();
                if now < until {
                    return Err(until - now);
                }
                *state = Circuit::Probing;
                Ok(true)
            }
            // Until the probe comes back, others wait a cooldown's worth at most.
            Circuit::Probing => Err(self.settings.cooldown),
        }
    }

    fn record(&self, verdict: Verdict, probe: bool, metrics: &AdmissionMetrics) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let threshold = self.settings.failures.get();
        let next = match (*state, verdict) {
            (_, Verdict::Answered) if probe => Circuit::Closed { failures: 0 },
            (_, Verdict::Failed) if probe => self.open(),
            (Circuit::Closed { .. }, Verdict::Answered) => Circuit::Closed { failures: 0 },
            (Circuit::Closed { failures }, Verdict::Failed) if failures + 1 >= threshold => {
                self.open()
            }
            (Circuit::Closed { failures }, Verdict::Failed) => Circuit::Closed {
                failures: failures + 1,
            },
            // An attempt admitted before the circuit opened, ending after: it changes nothing.
            (state @ (Circuit::Open { .. } | Circuit::Probing), _) => state,
        };
        if matches!(*state, Circuit::Closed { .. }) != matches!(next, Circuit::Closed { .. }) {
            let open = !matches!(next, Circuit::Closed { .. });
            metrics.circuit_open.set(i64::from(open));
            if open {
                tracing::warn!(
                    failures = threshold,
                    cooldown_ms = self.settings.cooldown.as_millis() as u64,
                    "circuit to the consent API opened"
                );
            } else {
                tracing::info!("circuit to the consent API closed");
            }
        }
        *state = next;
    }

    fn open(&self) -> Circuit {
        Circuit::Open {
            until: Instant::now() + self.settings.cooldown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(failures: u32, cooldown_ms: u64) -> (Breaker, AdmissionMetrics) {
        let settings = BreakerSettings {
            failures: NonZeroU32::new(failures).unwrap(),
            cooldown: Duration::from_millis(cooldown_ms),
        };
        (
            Breaker::new(settings),
            AdmissionMetrics::register(&Registry::new()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_budget_reserves_a_burst_then_one_per_interval() {
        let budget = RateBudget::per_second(NonZeroU32::new(5).unwrap());
        let now = Instant::now();
        let latest = now + Duration::from_millis(500);
        let slots: Vec<_> = (0..7).map(|_| budget.reserve(latest)).collect();
        for slot in &slots[..5] {
            assert_eq!(*slot, Ok(now), "a burst of five at once");
        }
        assert_eq!(slots[5], Ok(now + Duration::from_millis(200)));
        assert_eq!(slots[6], Ok(now + Duration::from_millis(400)));
        // The next would go at 600 ms, past `latest`: refused at once, taking nothing.
        assert_eq!(budget.reserve(latest), Err(Duration::from_millis(600)));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(budget.reserve(Instant::now()), Ok(Instant::now()));
    }

    #[test]
    fn consecutive_failures_open_and_a_success_resets() {
        let (b, m) = breaker(3, 60_000);
        for _ in 0..2 {
            assert_eq!(b.admit(), Ok(false));
            b.record(Verdict::Failed, false, &m);
        }
        b.record(Verdict::Answered, false, &m);
        for _ in 0..2 {
            b.record(Verdict::Failed, false, &m);
        }
        assert_eq!(
            b.admit(),
            Ok(false),
            "two failures after a success: still closed"
        );
        b.record(Verdict::Failed, false, &m);
        assert!(b.admit().is_err(), "the third consecutive failure opens it");
        assert_eq!(m.circuit_open.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_after_the_cooldown_and_its_result_decides() {
        let (b, m) = breaker(1, 1_000);
        b.record(Verdict::Failed, false, &m);
        assert!(b.admit().is_err());
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert_eq!(b.admit(), Ok(true), "the probe");
        assert!(b.admit().is_err(), "only one probe at a time");
        b.record(Verdict::Failed, true, &m);
        assert!(b.admit().is_err(), "a failed probe opens it again");
        tokio::time::advance(Duration::from_millis(1_001)).await;
        assert_eq!(b.admit(), Ok(true));
        b.record(Verdict::Answered, true, &m);
        assert_eq!(b.admit(), Ok(false), "a successful probe closes it");
        assert_eq!(m.circuit_open.get(), 0);
    }
}
