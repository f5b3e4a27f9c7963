//! Request coalescing as types (after pingora-cache's cache lock): a lookup that misses
//! either joins the fill in flight for its key ([`FillWaiter`]) or leads a new one
//! ([`FillLead`]). The lead is a permit: whoever holds it must finish the fill, and if it is
//! dropped unfinished (its task panicked or was cancelled) its `Drop` unregisters the fill so
//! the next request starts afresh, and everyone waiting on it gets an error at once.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::key::Key;
use super::ConsentCache;
use crate::consent::ConsentAnswer;
use crate::error::ProxyError;

/// What a fill ends with, shared with every request waiting on it.
pub type FillResult = Result<ConsentAnswer, ProxyError>;

/// What a fill's fetch produced, with how old its answer already was: an answer another cache
/// held (the cluster's shared tier) is stored no younger than it is, so that it is never
/// served past its TTL (rule 3 of docs/CONSISTENCY.md).
pub struct Fetched {
    pub result: FillResult,
    pub age: Duration,
}

/// One upstream read in flight for a key. Its identity (the `Arc`) is the key's generation:
/// a fill stores its answer only if it is still the key's registered fill when it ends.
///
/// Its result is set once and then announced: a one-shot broadcast in one allocation (a
/// `watch` channel took two with the `Arc`, and woke its receivers twice, on the value and
/// on the sender's drop).
pub(super) struct Fill {
    result: OnceLock<FillResult>,
    ended: Notify,
}

impl Fill {
    pub(super) fn waiter(self: &Arc<Self>) -> FillWaiter {
        FillWaiter { fill: self.clone() }
    }

    /// Sets the result, unless one was, and wakes every waiter.
    fn end(&self, result: FillResult) {
        let _ = self.result.set(result);
        self.ended.notify_waiters();
    }
}

/// A request waiting on a fill it did not start (`COALESCED`), or on its own (`MISS`).
pub struct FillWaiter {
    fill: Arc<Fill>,
}

impl FillWaiter {
    /// The fill's result, or `upstream_timeout` when `deadline` comes first.
    pub async fn wait(mut self, deadline: Instant) -> FillResult {
        self.result_by(deadline)
            .await
            .unwrap_or(Err(ProxyError::UpstreamTimeout))
    }

    /// The fill's result, or `None` when `deadline` comes first (the waiter can wait on).
    pub async fn result_by(&mut self, deadline: Instant) -> Option<FillResult> {
        tokio::time::timeout_at(deadline, self.result()).await.ok()
    }

    async fn result(&self) -> FillResult {
        loop {
            // Made before the result is read: `notify_waiters` wakes a `Notified` from its
            // making on, so a result set after this read is announced to it.
            let ended = self.fill.ended.notified();
            if let Some(result) = self.fill.result.get() {
                return result.clone();
            }
            ended.await;
        }
    }
}

fn abandoned() -> ProxyError {
    ProxyError::Internal("the fill ended without a result (its task failed)".into())
}

/// The permit to run a key's fill. See the module comment.
pub struct FillLead {
    cache: ConsentCache,
    key: Key,
    fill: Arc<Fill>,
    finished: bool,
}

impl FillLead {
    /// Registers a new fill for `key`; the caller holds the key's shard lock.
    pub(super) fn new(cache: ConsentCache, key: Key) -> (Self, Arc<Fill>) {
        let fill = Arc::new(Fill {
            result: OnceLock::new(),
            ended: Notify::new(),
        });
        let lead = FillLead {
            cache,
            key,
            fill: fill.clone(),
            finished: false,
        };
        (lead, fill)
    }

    /// Runs `fetch` in its own task (so that a caller hanging up cannot abandon the fill
    /// others wait on), stores its answer if the fill is still current, and hands the result
    /// to every waiter. Returns the lead's own waiter.
    pub fn spawn<Fut>(self, fetch: Fut) -> FillWaiter
    where
        Fut: Future<Output = FillResult> + Send + 'static,
    {
        self.spawn_aged(async move {
            Fetched {
                result: fetch.await,
                age: Duration::ZERO,
            }
        })
    }

    /// As [`Self::spawn`], for a fetch whose answer may already have an age.
    pub fn spawn_aged<Fut>(self, fetch: Fut) -> FillWaiter
    where
        Fut: Future<Output = Fetched> + Send + 'static,
    {
        let waiter = self.fill.waiter();
        tokio::spawn(async move {
            let fetched = fetch.await;
            self.finish(fetched.result, fetched.age);
        });
        waiter
    }

    fn finish(mut self, result: FillResult, age: Duration) {
        self.cache
            .complete_fill(&self.key, &self.fill, result.as_ref().ok(), age);
        self.finished = true;
        self.fill.end(result);
    }
}

impl Drop for FillLead {
    fn drop(&mut self) {
        if !self.finished {
            self.cache
                .complete_fill(&self.key, &self.fill, None, Duration::ZERO);
            self.fill.end(Err(abandoned()));
        }
    }
}
