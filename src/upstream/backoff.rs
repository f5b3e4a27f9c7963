//! Exponential back-off with jitter, used by the token refresher and the request retries: the
//! first delay, doubled after each use up to a cap, each one drawn between half and all of
//! the nominal delay so that many proxies (or many requests) do not retry in step.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    last: Duration,
    nominal: Duration,
}

impl Backoff {
    pub fn new(first: Duration, last: Duration) -> Self {
        Backoff {
            first,
            last,
            nominal: first,
        }
    }

    /// The next delay to wait (jittered); the one after it will be twice as long, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.nominal.mul_f64(rand::random_range(0.5..=1.0));
        self.nominal = (self.nominal * 2).min(self.last);
        delay
    }

    /// Starts again from the first delay (after a success).
    pub fn reset(&mut self) {
        self.nominal = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let first = Duration::from_millis(100);
        let mut backoff = Backoff::new(first, Duration::from_millis(350));
        for nominal in [100, 200, 350, 350] {
            let nominal = Duration::from_millis(nominal);
            let delay = backoff.next_delay();
            assert!(
                delay >= nominal / 2 && delay <= nominal,
                "{delay:?} vs {nominal:?}"
            );
        }
        backoff.reset();
        assert_eq!(backoff.nominal, first);
    }
}
