//! How a GET that missed ends: it waits for the key's fill, and when the fill fails for a
//! reason that says upstream cannot answer (`stale_if_error_s` set), it is answered from the
//! entry instead, as `STALE`, if the entry is still within its TTL plus `stale_if_error_s`.
//!
//! Rule 6 of docs/CONSISTENCY.md (a STALE answer is never older than a write this instance, or the cluster, knows
//! of) holds because the entry is read again when the failure happens, never remembered from
//! the lookup: a write that completed meanwhile has replaced or dropped it (under the shard
//! lock, before its caller heard back), a write announced by another instance and a cluster
//! flush have dropped it, and a cache that is not trusted (the cluster's feed not confirmed
//! live) answers nothing.

use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use super::{CacheStatus, ConsentCache, FillResult, FillWaiter};
use crate::consent::{ConsentAnswer, ContactId};
use crate::error::ProxyError;

/// A GET whose fill has not ended this close to its deadline is answered from a usable
/// stale entry, so the caller hears before its deadline instead of a 504.
const STALE_BEFORE_DEADLINE: Duration = Duration::from_millis(250);

/// How a GET was answered. For one that joined or led a fill: `Miss` or `Coalesced` (the
/// fill's result), `Stale`, or `Hit` (the fill failed, but a write had meanwhile stored a
/// fresh answer).
pub struct Settled {
    pub status: CacheStatus,
    /// Seconds since the answer was stored, when it came from the cache.
    pub age_s: Option<u32>,
    pub answer: FillResult,
    /// Why the answer came from the cache: the fill's failure.
    pub upstream_failure: Option<ProxyError>,
}

impl ConsentCache {
    /// Waits for `waiter`'s fill (joined as `Coalesced`, or led as `Miss`) and answers the
    /// GET: the fill's result, or, when upstream cannot answer, the entry (see the module
    /// comment). Counts the GET by how it was answered.
    pub async fn settle(
        &self,
        contact: &ContactId,
        joined_as: CacheStatus,
        mut waiter: FillWaiter,
        deadline: Instant,
    ) -> Settled {
        let settled = if !self.serves_stale() {
            self.fill_result(joined_as, waiter.wait(deadline).await)
        } else {
            let give_up = deadline
                .checked_sub(STALE_BEFORE_DEADLINE)
                .unwrap_or(deadline);
            match waiter.result_by(give_up).await {
                Some(result) if upstream_could_not_answer(&result) => {
                    let failure = failure_of(&result);
                    self.answer_from_entry(contact, failure)
                        .unwrap_or_else(|| self.fill_result(joined_as, result))
                }
                Some(result) => self.fill_result(joined_as, result),
                None => match self.answer_from_entry(contact, ProxyError::UpstreamTimeout) {
                    Some(settled) => settled,
                    None => self.fill_result(joined_as, waiter.wait(deadline).await),
                },
            }
        };
        self.inner.metrics.lookup(settled.status);
        settled
    }

    fn serves_stale(&self) -> bool {
        self.inner.lifetimes.serves_stale()
    }

    fn fill_result(&self, joined_as: CacheStatus, answer: FillResult) -> Settled {
        Settled {
            status: joined_as,
            age_s: None,
            answer,
            upstream_failure: None,
        }
    }

    /// The key's entry, read now, as the answer to a GET upstream could not answer: `Stale`
    /// past its TTL, `Hit` before (a write stored it meanwhile); `None` when there is no
    /// entry within its TTL plus `stale_if_error_s`, or the cache is not trusted.
    fn answer_from_entry(&self, contact: &ContactId, failure: ProxyError) -> Option<Settled> {
        if !self.is_trusted() {
            return None;
        }
        let stored = self.inner.answers.get(&self.inner.keys.of(contact))?;
        let age_ms = stored.age_ms(self.now_ms());
        let lifetimes = &self.inner.lifetimes;
        if !lifetimes.stale_usable(&stored, age_ms) {
            return None;
        }
        let status = if lifetimes.expired(&stored, age_ms) {
            CacheStatus::Stale
        } else {
            CacheStatus::Hit
        };
        Some(Settled {
            status,
            age_s: Some(age_ms / 1000),
            answer: Ok(stored.to_answer()),
            upstream_failure: Some(failure),
        })
    }
}

/// Whether a fill's result says upstream cannot answer now (5xx, an upstream 429, timeout,
/// unreachable, refused by admission, no token), as opposed to an answer (a 404 is one).
fn upstream_could_not_answer(result: &FillResult) -> bool {
    match result {
        Ok(answer) => answer_is_a_failure(answer),
        Err(error) => error.upstream_cannot_answer(),
    }
}

fn answer_is_a_failure(answer: &ConsentAnswer) -> bool {
    answer.status == StatusCode::TOO_MANY_REQUESTS || answer.status.is_server_error()
}

/// The failure a STALE answer stands in for, for the access log.
fn failure_of(result: &FillResult) -> ProxyError {
    match result {
        Err(error) => error.clone(),
        Ok(answer) => {
            ProxyError::Upstream(format!("upstream answered {}", answer.status.as_u16()).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{FillLead, Lookup};
    use crate::consent::ConsentStatus;
    use crate::consent::WriteOutcome;
    use crate::error::Failure;

    const TTL: Duration = Duration::from_secs(60);
    const STALE: Duration = Duration::from_secs(300);

    fn contact(id: &str) -> ContactId {
        ContactId::from_path_segment(id).expect("valid id")
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// A stale-serving cache holding `status` for `id`, stored `age` ago.
    async fn cached(id: &ContactId, status: ConsentStatus, age: Duration) -> ConsentCache {
        let cache = ConsentCache::for_tests_with(Some(STALE), None);
        cache.begin_write(id).finish(WriteOutcome::Applied(status));
        tokio::time::advance(age).await;
        cache
    }

    fn lead(cache: &ConsentCache, id: &ContactId) -> FillLead {
        match cache.lookup(id) {
            Lookup::Lead(lead) => lead,
            _ => panic!("expected to lead a fill"),
        }
    }

    /// A GET of `id` whose fill ends with `result`.
    async fn get(cache: &ConsentCache, id: &ContactId, result: FillResult) -> Settled {
        let waiter = lead(cache, id).spawn(async move { result });
        cache
            .settle(id, CacheStatus::Miss, waiter, deadline())
            .await
    }

    fn body(settled: &Settled) -> &[u8] {
        &settled.answer.as_ref().expect("an answer").body
    }

    fn unreachable() -> FillResult {
        Err(ProxyError::Upstream(Failure::msg("unreachable")))
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fill_is_answered_stale_within_the_window_and_not_after() {
        let id = contact("+15550000020");
        let cache = cached(&id, ConsentStatus::Consented, TTL + Duration::from_secs(1)).await;
        let stale = get(&cache, &id, unreachable()).await;
        assert_eq!(stale.status, CacheStatus::Stale);
        assert_eq!(stale.age_s, Some(61));
        assert_eq!(body(&stale), br#"{"status":"CONSENTED"}"#);
        assert!(matches!(
            stale.upstream_failure,
            Some(ProxyError::Upstream(_))
        ));

        tokio::time::advance(STALE).await;
        let late = get(&cache, &id, unreachable()).await;
        assert_eq!(late.status, CacheStatus::Miss);
        assert!(
            matches!(late.answer, Err(ProxyError::Upstream(_))),
            "past the window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_not_replaced_by_a_stale_one() {
        let id = contact("+15550000021");
        let cache = cached(&id, ConsentStatus::Consented, TTL * 2).await;
        let not_found = ConsentAnswer {
            status: StatusCode::NOT_FOUND,
            body: bytes::Bytes::from_static(br#"{"code":"not_found"}"#),
            content_type: None,
            retry_after: None,
        };
        let settled = get(&cache, &id, Ok(not_found)).await;
        assert_eq!(settled.status, CacheStatus::Miss);
        assert_eq!(
            settled.answer.expect("upstream's").status,
            StatusCode::NOT_FOUND
        );
    }

    /// Rule 6: a write that completes while the fill is in flight is what a failed fill
    /// falls back on, never the entry the lookup found.
    #[tokio::test(start_paused = true)]
    async fn the_entry_is_read_again_when_the_fill_fails() {
        let id = contact("+15550000022");
        let cache = cached(&id, ConsentStatus::Consented, TTL * 2).await;
        let (fail, failed) = tokio::sync::oneshot::channel::<()>();
        let waiter = lead(&cache, &id).spawn(async move {
            let _ = failed.await;
            unreachable()
        });
        cache
            .begin_write(&id)
            .finish(WriteOutcome::Applied(ConsentStatus::Refused));
        fail.send(()).unwrap();
        let settled = cache
            .settle(&id, CacheStatus::Miss, waiter, deadline())
            .await;
        assert_eq!(body(&settled), br#"{"status":"REFUSED"}"#);
        assert_eq!(
            settled.status,
            CacheStatus::Hit,
            "the write's answer is fresh"
        );

        // A write whose outcome is unknown drops the entry: nothing to fall back on.
        tokio::time::advance(TTL * 2).await;
        let (fail, failed) = tokio::sync::oneshot::channel::<()>();
        let waiter = lead(&cache, &id).spawn(async move {
            let _ = failed.await;
            unreachable()
        });
        cache.begin_write(&id).finish(WriteOutcome::Unknown);
        fail.send(()).unwrap();
        let settled = cache
            .settle(&id, CacheStatus::Miss, waiter, deadline())
            .await;
        assert!(
            settled.answer.is_err(),
            "no stale answer after an unknown write"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_untrusted_cache_answers_nothing_stale() {
        let id = contact("+15550000023");
        let cache = cached(&id, ConsentStatus::Consented, TTL * 2).await;
        let waiter = lead(&cache, &id).spawn(async { unreachable() });
        cache.distrust();
        let settled = cache
            .settle(&id, CacheStatus::Miss, waiter, deadline())
            .await;
        assert!(settled.answer.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fill_still_waiting_near_the_deadline_is_answered_stale_before_it() {
        let id = contact("+15550000024");
        let cache = cached(&id, ConsentStatus::Deleted, TTL * 2).await;
        let waiter = lead(&cache, &id).spawn(std::future::pending());
        let asked = Instant::now();
        let deadline = asked + Duration::from_secs(2);
        let settled = cache.settle(&id, CacheStatus::Miss, waiter, deadline).await;
        assert_eq!(settled.status, CacheStatus::Stale);
        assert_eq!(Instant::now(), deadline - STALE_BEFORE_DEADLINE);
        assert!(matches!(
            settled.upstream_failure,
            Some(ProxyError::UpstreamTimeout)
        ));

        // Without an entry to fall back on, the GET waits to its deadline.
        let other = contact("+15550000025");
        let waiter = lead(&cache, &other).spawn(std::future::pending());
        let deadline = Instant::now() + Duration::from_secs(2);
        let settled = cache
            .settle(&other, CacheStatus::Miss, waiter, deadline)
            .await;
        assert!(matches!(settled.answer, Err(ProxyError::UpstreamTimeout)));
        assert_eq!(Instant::now(), deadline);
    }

    fn answer(status: StatusCode) -> FillResult {
        Ok(ConsentAnswer {
            status,
            body: bytes::Bytes::new(),
            content_type: None,
            retry_after: None,
        })
    }

    #[test]
    fn what_counts_as_upstream_not_answering() {
        let cannot = [
            answer(StatusCode::TOO_MANY_REQUESTS),
            Err(ProxyError::Upstream(Failure::msg("unreachable"))),
            Err(ProxyError::UpstreamTimeout),
            Err(ProxyError::UpstreamUnavailable {
                reason: "circuit_open",
                retry_after: Duration::from_secs(1),
            }),
            Err(ProxyError::TokenUnavailable(Failure::msg("no token"))),
        ];
        for result in &cannot {
            assert!(upstream_could_not_answer(result), "{result:?}");
        }
        let answers = [
            answer(StatusCode::OK),
            answer(StatusCode::NOT_FOUND),
            answer(StatusCode::BAD_REQUEST),
            answer(StatusCode::FORBIDDEN),
            answer(StatusCode::CONFLICT),
            Err(ProxyError::Internal(Failure::msg("a defect"))),
        ];
        for result in &answers {
            assert!(!upstream_could_not_answer(result), "{result:?}");
        }
    }
}
