//! The consent-answer cache: moka for storage and TTLs, plus the per-key bookkeeping that
//! makes it safe under writes.
//!
//! Invariants (docs/ARCHITECTURE.md explains them at more length):
//! - A fill (the upstream GET after a miss) is registered per key; concurrent misses on that
//!   key wait for it (`COALESCED`) instead of calling upstream again.
//! - A fill stores its answer only if it is still the key's registered fill when it ends,
//!   checked and stored under the key's shard lock. A write that completes unregisters any
//!   fill in flight under the same lock before storing its own answer, so a read that began
//!   before the write can never store or hand its older answer to a request that starts after
//!   the write returned. (This is the generation guard: the registered fill *is* the key's
//!   current generation.)
//! - Writes to one key that overlap in time drop the entry instead of storing, because the
//!   order in which upstream applied them is unknown.
//! - Fills and writes run in their own tasks, so a caller hanging up cannot leave a write
//!   applied upstream but not reflected here.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use moka::future::Cache;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;

use crate::config::CacheSettings;
use crate::consent::ConsentAnswer;
use crate::consent::{ConsentStatus, ContactId};
use crate::error::ProxyError;
use crate::metrics;

/// Number of lock shards for the per-key bookkeeping (a power of two).
const SHARDS: usize = 64;

/// How a GET was answered, as sent in `x-cache-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Coalesced,
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Coalesced => "COALESCED",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// A cached answer, kept small (16 bytes inline): the common `{"status":"..."}` 200 answer
/// is one byte of status and shares a static body; anything else keeps upstream's answer
/// behind an `Arc`.
#[derive(Clone)]
pub struct StoredAnswer {
    /// Upstream's answer when it is not the canonical body of `status`.
    raw: Option<Arc<ConsentAnswer>>,
    status: ConsentStatus,
    /// Milliseconds since the cache's epoch when stored, wrapping (see `MAX_TTL`).
    stored_at_ms: u32,
}

/// Ages are kept as wrapping 32-bit milliseconds, exact while an entry is younger than
/// 2^31 ms; no TTL may reach that, so longer configured TTLs are clamped (24 days is far past
/// any sensible consent TTL).
const MAX_TTL: Duration = Duration::from_millis(1 << 31);

impl StoredAnswer {
    fn is_not_found(&self) -> bool {
        self.raw
            .as_ref()
            .is_some_and(|a| a.status == StatusCode::NOT_FOUND)
    }

    /// The answer to send; no body bytes are copied.
    pub fn to_answer(&self) -> ConsentAnswer {
        match &self.raw {
            None => ConsentAnswer::canonical(self.status),
            Some(answer) => ConsentAnswer::clone(answer),
        }
    }
}

#[derive(Clone)]
pub struct CacheMetrics {
    hit: IntCounter,
    miss: IntCounter,
    coalesced: IntCounter,
    bypass: IntCounter,
    entries: IntGauge,
    invalidations: IntCounterVec,
}

impl CacheMetrics {
    pub fn register(registry: &Registry) -> Self {
        let lookups = metrics::counter_vec(
            registry,
            "consent_proxy_cache_lookups_total",
            "Consent GETs by how the cache answered them.",
            &["result"],
        );
        CacheMetrics {
            hit: lookups.with_label_values(&["hit"]),
            miss: lookups.with_label_values(&["miss"]),
            coalesced: lookups.with_label_values(&["coalesced"]),
            bypass: lookups.with_label_values(&["bypass"]),
            entries: metrics::gauge(
                registry,
                "consent_proxy_cache_entries",
                "Consent answers held in the cache.",
            ),
            invalidations: metrics::counter_vec(
                registry,
                "consent_proxy_cache_invalidations_total",
                "Cached answers replaced or dropped, by reason: write (a PUT replaced it), \
                 purge (admin), unknown_outcome (a PUT's result is unknown), \
                 concurrent_writes (overlapping PUTs to one contact).",
                &["reason"],
            ),
        }
    }

    fn lookup(&self, status: CacheStatus) {
        match status {
            CacheStatus::Hit => &self.hit,
            CacheStatus::Miss => &self.miss,
            CacheStatus::Coalesced => &self.coalesced,
            CacheStatus::Bypass => &self.bypass,
        }
        .inc();
    }
}

/// The outcome of a fill, shared with every request waiting for it.
type FillResult = Option<Result<ConsentAnswer, ProxyError>>;

/// One upstream read in flight for a key.
struct Fill {
    result: watch::Receiver<FillResult>,
}

impl Fill {
    /// The fill's task ended without a result (it panicked): nobody should wait on it.
    fn is_abandoned(&self) -> bool {
        self.result.has_changed().is_err() && self.result.borrow().is_none()
    }
}

/// Per-key bookkeeping, present only while something is in flight for the key.
#[derive(Default)]
struct KeyState {
    fill: Option<Arc<Fill>>,
    writes_in_flight: u32,
    writes_overlapped: bool,
}

impl KeyState {
    fn is_idle(&self) -> bool {
        self.fill.is_none() && self.writes_in_flight == 0
    }
}

/// How a write through the proxy ended, for the cache.
#[derive(Debug, Clone, Copy)]
pub enum WriteOutcome {
    /// Upstream answered 2xx: the contact's status is now this.
    Applied(ConsentStatus),
    /// Upstream refused it (an error answer, or no connection): nothing changed.
    NotApplied,
    /// It may or may not have been applied (timeout, connection lost after sending).
    Unknown,
}

/// The per-key bookkeeping of one lock shard.
type Shard = Mutex<HashMap<Arc<str>, KeyState>>;

struct Inner {
    answers: Cache<Arc<str>, StoredAnswer>,
    shards: Box<[Shard]>,
    hasher: RandomState,
    epoch: Instant,
    ttl_ms: u32,
    not_found_ttl_ms: u32,
    enabled: bool,
    metrics: CacheMetrics,
}

/// The cache handle. Cheap to clone.
#[derive(Clone)]
pub struct ConsentCache {
    inner: Arc<Inner>,
}

impl ConsentCache {
    pub fn new(settings: &CacheSettings, metrics: CacheMetrics) -> Self {
        let ttl = settings.ttl.min(MAX_TTL);
        let not_found_ttl = settings.not_found_ttl.min(MAX_TTL);
        // One TTL for moka to evict by (a per-entry expiry policy costs ~40 bytes an entry);
        // each kind's own TTL is checked exactly on every read.
        let answers = Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(ttl.max(not_found_ttl).max(Duration::from_millis(1)))
            .build();
        let shards = (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        ConsentCache {
            inner: Arc::new(Inner {
                answers,
                shards,
                hasher: RandomState::new(),
                epoch: Instant::now(),
                ttl_ms: ttl.as_millis() as u32,
                not_found_ttl_ms: not_found_ttl.as_millis() as u32,
                enabled: settings.enabled,
                metrics,
            }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.inner.enabled
    }

    /// Answers a GET: from the cache, by joining a fill in flight, or by running `fetch` (in
    /// its own task) and storing what it returns when that is cacheable. Returns how it was
    /// answered and, for hits, the entry's age in seconds. Waiting ends at `deadline`.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        contact: &ContactId,
        deadline: Instant,
        fetch: F,
    ) -> (CacheStatus, Option<u32>, Result<ConsentAnswer, ProxyError>)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<ConsentAnswer, ProxyError>> + Send + 'static,
    {
        let inner = &self.inner;
        if !inner.enabled {
            inner.metrics.lookup(CacheStatus::Bypass);
            return (CacheStatus::Bypass, None, fetch().await);
        }
        let key = contact.as_arc();
        if let Some(hit) = self.fresh(key).await {
            return hit;
        }
        let (status, fill) = {
            let mut shard = self.shard(key).lock().await;
            // A fill may have stored the answer while this request waited for the lock.
            if let Some(hit) = self.fresh(key).await {
                return hit;
            }
            let state = shard.entry(key.clone()).or_default();
            match &state.fill {
                Some(fill) if !fill.is_abandoned() => (CacheStatus::Coalesced, fill.clone()),
                _ => {
                    let fill = self.start_fill(key.clone(), fetch());
                    state.fill = Some(fill.clone());
                    (CacheStatus::Miss, fill)
                }
            }
        };
        inner.metrics.lookup(status);
        let mut result = fill.result.clone();
        let outcome = tokio::time::timeout_at(deadline, result.wait_for(Option::is_some)).await;
        let answer = match outcome {
            Ok(Ok(done)) => done.clone().unwrap_or_else(|| {
                Err(ProxyError::Internal(
                    "fill finished without a result".into(),
                ))
            }),
            Ok(Err(_)) => Err(ProxyError::Internal(
                "fill task ended without a result".into(),
            )),
            Err(_) => Err(ProxyError::UpstreamTimeout),
        };
        (status, None, answer)
    }

    /// The key's answer as a hit, if one is stored and younger than its kind's TTL.
    async fn fresh(
        &self,
        key: &Arc<str>,
    ) -> Option<(CacheStatus, Option<u32>, Result<ConsentAnswer, ProxyError>)> {
        let stored = self.inner.answers.get(key).await?;
        let age_ms = self.now_ms().wrapping_sub(stored.stored_at_ms);
        let ttl_ms = if stored.is_not_found() {
            self.inner.not_found_ttl_ms
        } else {
            self.inner.ttl_ms
        };
        if age_ms >= ttl_ms {
            return None;
        }
        self.inner.metrics.lookup(CacheStatus::Hit);
        Some((
            CacheStatus::Hit,
            Some(age_ms / 1000),
            Ok(stored.to_answer()),
        ))
    }

    /// Spawns the upstream read for `key`; it stores its answer only if it is still the
    /// key's registered fill when it ends (the generation guard).
    fn start_fill<Fut>(&self, key: Arc<str>, fetch: Fut) -> Arc<Fill>
    where
        Fut: Future<Output = Result<ConsentAnswer, ProxyError>> + Send + 'static,
    {
        let (sender, receiver) = watch::channel(None);
        let fill = Arc::new(Fill { result: receiver });
        let cache = self.clone();
        let registered = fill.clone();
        tokio::spawn(async move {
            let result = fetch.await;
            {
                let mut shard = cache.shard(&key).lock().await;
                if let Some(state) = shard.get_mut(&key) {
                    let still_current = state
                        .fill
                        .as_ref()
                        .is_some_and(|f| Arc::ptr_eq(f, &registered));
                    if still_current {
                        state.fill = None;
                        if let Ok(answer) = &result {
                            cache.store_read(&key, answer).await;
                        }
                    }
                    if state.is_idle() {
                        shard.remove(&key);
                    }
                }
            }
            sender.send_replace(Some(result));
        });
        fill
    }

    /// Stores an upstream GET answer if it is cacheable (200 with a consent body, 404).
    async fn store_read(&self, key: &Arc<str>, answer: &ConsentAnswer) {
        let stored = match answer.status {
            StatusCode::OK => match crate::consent::consent_status_of(&answer.body) {
                Some(status) if answer.body[..] == *status.canonical_body() => {
                    self.stored(status, None)
                }
                Some(status) => self.stored(status, Some(Arc::new(compact(answer)))),
                None => return,
            },
            StatusCode::NOT_FOUND if self.inner.not_found_ttl_ms > 0 => {
                // The status is unused for a raw answer.
                self.stored(ConsentStatus::NoConsent, Some(Arc::new(compact(answer))))
            }
            _ => return,
        };
        self.inner.answers.insert(key.clone(), stored).await;
    }

    /// Marks a write to `contact` as in flight. Pair with `finish_write`.
    pub async fn begin_write(&self, contact: &ContactId) {
        let key = contact.as_arc();
        let mut shard = self.shard(key).lock().await;
        let state = shard.entry(key.clone()).or_default();
        state.writes_in_flight += 1;
        if state.writes_in_flight > 1 {
            state.writes_overlapped = true;
        }
    }

    /// Applies a write's outcome: a fill in flight is superseded, and the entry is replaced
    /// by the written status, dropped, or left alone.
    pub async fn finish_write(&self, contact: &ContactId, outcome: WriteOutcome) {
        let key = contact.as_arc();
        let mut shard = self.shard(key).lock().await;
        let state = shard.entry(key.clone()).or_default();
        state.writes_in_flight = state.writes_in_flight.saturating_sub(1);
        let overlapped = state.writes_overlapped;
        if state.writes_in_flight == 0 {
            state.writes_overlapped = false;
        }
        match outcome {
            WriteOutcome::NotApplied => {}
            WriteOutcome::Applied(_) | WriteOutcome::Unknown => {
                // Reads that began before this write must not store their answer.
                state.fill = None;
            }
        }
        if state.is_idle() {
            shard.remove(key);
        }
        if !self.inner.enabled {
            return;
        }
        match outcome {
            WriteOutcome::Applied(status) if !overlapped => {
                self.inner
                    .answers
                    .insert(key.clone(), self.stored(status, None))
                    .await;
                self.inner
                    .metrics
                    .invalidations
                    .with_label_values(&["write"])
                    .inc();
            }
            WriteOutcome::Applied(_) => {
                self.inner.answers.invalidate(key).await;
                self.inner
                    .metrics
                    .invalidations
                    .with_label_values(&["concurrent_writes"])
                    .inc();
            }
            WriteOutcome::Unknown => {
                self.inner.answers.invalidate(key).await;
                self.inner
                    .metrics
                    .invalidations
                    .with_label_values(&["unknown_outcome"])
                    .inc();
            }
            WriteOutcome::NotApplied => {}
        }
    }

    /// Drops a contact's answer (admin purge); a fill in flight will not store its answer.
    pub async fn purge(&self, contact: &ContactId) {
        let key = contact.as_arc();
        let mut shard = self.shard(key).lock().await;
        if let Some(state) = shard.get_mut(key) {
            state.fill = None;
            if state.is_idle() {
                shard.remove(key);
            }
        }
        self.inner.answers.invalidate(key).await;
        self.inner
            .metrics
            .invalidations
            .with_label_values(&["purge"])
            .inc();
    }

    /// Updates the entries gauge (called before each scrape).
    pub async fn refresh_entry_gauge(&self) {
        self.inner.answers.run_pending_tasks().await;
        let count = i64::try_from(self.inner.answers.entry_count()).unwrap_or(i64::MAX);
        self.inner.metrics.entries.set(count);
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.answers.entry_count()
    }

    fn stored(&self, status: ConsentStatus, raw: Option<Arc<ConsentAnswer>>) -> StoredAnswer {
        StoredAnswer {
            raw,
            status,
            stored_at_ms: self.now_ms(),
        }
    }

    /// Milliseconds since the epoch, wrapping at 2^32 (ages are differences of these).
    fn now_ms(&self) -> u32 {
        self.inner.epoch.elapsed().as_millis() as u32
    }

    fn shard(&self, key: &str) -> &Shard {
        let hash = self.inner.hasher.hash_one(key) as usize;
        &self.inner.shards[hash & (SHARDS - 1)]
    }
}

/// An answer's bytes copied into an exactly sized buffer, so a cached entry does not pin a
/// larger receive buffer.
fn compact(answer: &ConsentAnswer) -> ConsentAnswer {
    ConsentAnswer {
        status: answer.status,
        body: Bytes::copy_from_slice(&answer.body),
        content_type: answer.content_type.clone(),
        retry_after: None,
    }
}
