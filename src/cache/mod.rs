//! The consent-answer cache: moka for storage and TTLs, plus the per-key bookkeeping that
//! makes it safe under writes.
//!
//! Invariants (docs/ARCHITECTURE.md explains them at more length):
//! - A fill (the upstream GET after a miss) is registered per key; concurrent misses on that
//!   key wait for it (`COALESCED`) instead of calling upstream again (`fill`).
//! - A fill stores its answer only if it is still the key's registered fill when it ends,
//!   checked and stored under the key's shard lock. A write that completes unregisters any
//!   fill in flight under the same lock before storing its own answer, so a read that began
//!   before the write can never store or hand its older answer to a request that starts after
//!   the write returned. (This is the generation guard: the registered fill *is* the key's
//!   current generation. moka's own `try_get_with` would re-insert the older answer.)
//! - Writes to one key that overlap in time drop the entry instead of storing, because the
//!   order in which upstream applied them is unknown.
//! - A write is held as a [`WriteGuard`]; one dropped without an outcome (its task failed)
//!   counts as an unknown outcome and drops the entry.
//! - A hit inside the last `refresh_ahead_s` of its entry's TTL registers a fill of the key as
//!   a miss would, unless a fill or a write is in flight, and hands it back to be run in the
//!   background ([`Hit::refresh`]): a refresh is an ordinary fill, under the same guard.
//! - Entries are kept `stale_if_error_s` past their TTL; a GET whose fill fails because
//!   upstream cannot answer may be answered from the entry as it is then, never as the lookup
//!   found it ([`ConsentCache::settle`], rule 6 of docs/CONSISTENCY.md).
//! - In a cluster, a write announced by another instance is held as a remote [`WriteGuard`]
//!   ([`ConsentCache::begin_remote_write`]): it drops the entry at once, and when it ends the
//!   entry is dropped again rather than replaced (only upstream knows how it was ordered
//!   against this instance's own writes). The cache is answered from only while the cluster
//!   says its feed of announcements is live ([`ConsentCache::trust_until`]); after a gap the
//!   cluster [`flush`](ConsentCache::flush)es it. Without a cluster it is always trusted.
//! - With the cluster's shared tier, the cache keeps a log of when each contact last changed
//!   as far as this instance knows (`changes`): an answer from Redis whose read began before
//!   that is refused ([`ConsentCache::unchanged_since`]).
//!
//! The shard locks are plain mutexes: no critical section awaits (moka's sync API). The cache
//! knows nothing of Redis: `cluster` drives it through the methods above.

mod changes;
mod entry;
mod fill;
mod key;
mod lifetime;
mod metrics;
mod stale;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use moka::sync::Cache;
use tokio::time::Instant;

use crate::config::CacheSettings;
use crate::consent::{ConsentAnswer, ConsentStatus, ContactId, WriteOutcome};
use changes::ChangeLog;
use entry::{Kind, StoredAnswer, MAX_TTL};
use fill::Fill;
pub use fill::{Fetched, FillLead, FillResult, FillWaiter};
use key::{Key, KeyHashing, Keys};
use lifetime::{Freshness, Lifetimes};
pub use metrics::{CacheMetrics, CacheStatus, Invalidation};
pub use stale::Settled;

/// Number of lock shards for the per-key bookkeeping (a power of two).
const SHARDS: usize = 64;

/// What a lookup found.
pub enum Lookup {
    /// A stored answer younger than its kind's TTL.
    Hit(Hit),
    /// A fill for this key is in flight: wait for it.
    Join(FillWaiter),
    /// Nothing stored and nothing in flight: this request leads the fill.
    Lead(FillLead),
    /// The cache is disabled.
    Bypass,
    /// The cluster's feed is not confirmed live: the cache may have missed a write made
    /// through another instance, so it is neither read nor filled.
    Unsynced,
}

pub struct Hit {
    pub answer: ConsentAnswer,
    /// Seconds since the answer was stored.
    pub age_s: u32,
    /// The entry is near its TTL's end (`refresh_ahead_s`) and this hit registered the key's
    /// refresh: run it in the background ([`FillLead::spawn`]) and answer the hit at once.
    pub refresh: Option<FillLead>,
}

/// Where a write came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A PUT through this instance.
    Local,
    /// A PUT through another instance of the cluster, announced to this one.
    Remote,
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

type Shard = Mutex<HashMap<Key, KeyState, KeyHashing>>;

struct Inner {
    answers: Cache<Key, StoredAnswer, KeyHashing>,
    shards: Box<[Shard]>,
    keys: Keys,
    epoch: Instant,
    lifetimes: Lifetimes,
    enabled: bool,
    /// Milliseconds since `epoch` until which the cache may be answered from (the cluster's
    /// feed is confirmed live until then); `u64::MAX` without a cluster.
    trusted_until_ms: AtomicU64,
    /// Kept only for the cluster's shared tier ([`ConsentCache::keep_change_log`]).
    changes: OnceLock<ChangeLog>,
    metrics: CacheMetrics,
}

/// The cache handle. Cheap to clone.
#[derive(Clone)]
pub struct ConsentCache {
    inner: Arc<Inner>,
}

impl ConsentCache {
    pub fn new(settings: &CacheSettings, metrics: CacheMetrics) -> Self {
        let lifetimes = Lifetimes::new(settings);
        // One TTL for moka to evict by (a per-entry expiry policy costs ~40 bytes an entry):
        // the longest any entry may answer, its stale window included. Each kind's own limits
        // are checked exactly on every read.
        let answers = Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(lifetimes.retention())
            .build_with_hasher(KeyHashing::default());
        let shards = (0..SHARDS).map(|_| Mutex::default()).collect();
        ConsentCache {
            inner: Arc::new(Inner {
                answers,
                shards,
                keys: Keys::new(),
                epoch: Instant::now(),
                lifetimes,
                enabled: settings.enabled,
                trusted_until_ms: AtomicU64::new(u64::MAX),
                changes: OnceLock::new(),
                metrics,
            }),
        }
    }

    /// Looks a contact up: a hit, a fill to join, or the lead of a new fill. A hit touches
    /// only moka (and one atomic load: whether the cache is trusted); the shard lock is
    /// taken on a miss, and on a hit inside the refresh-ahead window. A hit is counted here;
    /// a fill joined or led is counted when it is [`settle`](Self::settle)d.
    pub fn lookup(&self, contact: &ContactId) -> Lookup {
        let inner = &self.inner;
        if !inner.enabled {
            inner.metrics.lookup(CacheStatus::Bypass);
            return Lookup::Bypass;
        }
        let now_ms = self.now_ms64();
        // Acquire: a cache trusted again after a flush is seen flushed.
        if now_ms >= inner.trusted_until_ms.load(Ordering::Acquire) {
            inner.metrics.lookup(CacheStatus::Unsynced);
            return Lookup::Unsynced;
        }
        let key = inner.keys.of(contact);
        if let Some(stored) = inner.answers.get(&key) {
            let age_ms = stored.age_ms(now_ms as u32);
            match inner.lifetimes.freshness(&stored, age_ms) {
                Freshness::Fresh => return Lookup::Hit(self.hit(&stored, age_ms, None)),
                Freshness::RefreshDue => {
                    let refresh = self.register_refresh(&key);
                    return Lookup::Hit(self.hit(&stored, age_ms, refresh));
                }
                Freshness::Expired => {}
            }
        }
        let mut shard = self.shard(&key);
        // A fill may have stored the answer while this request waited for the lock.
        if let Some(stored) = inner.answers.get(&key) {
            let age_ms = stored.age_ms(self.now_ms());
            if inner.lifetimes.freshness(&stored, age_ms) != Freshness::Expired {
                return Lookup::Hit(self.hit(&stored, age_ms, None));
            }
        }
        let state = shard.entry(key.clone()).or_default();
        match &state.fill {
            Some(fill) => Lookup::Join(fill.waiter()),
            None => {
                let (lead, fill) = FillLead::new(self.clone(), key);
                state.fill = Some(fill);
                Lookup::Lead(lead)
            }
        }
    }

    /// A counted hit on `stored`.
    fn hit(&self, stored: &StoredAnswer, age_ms: u32, refresh: Option<FillLead>) -> Hit {
        self.inner.metrics.lookup(CacheStatus::Hit);
        Hit {
            answer: stored.to_answer(),
            age_s: age_ms / 1000,
            refresh,
        }
    }

    /// Registers a refresh of `key` as its fill, unless a fill is already in flight (it
    /// refreshes the entry anyway) or a write is (a fill would not store).
    fn register_refresh(&self, key: &Key) -> Option<FillLead> {
        let mut shard = self.shard(key);
        if shard.get(key).is_some_and(|state| !state.is_idle()) {
            return None;
        }
        let (lead, fill) = FillLead::new(self.clone(), key.clone());
        shard.entry(key.clone()).or_default().fill = Some(fill);
        self.inner.metrics.refresh_started();
        Some(lead)
    }

    /// Ends `fill` (the generation guard): if it is still the key's registered fill, it is
    /// unregistered and `answer`, when cacheable, stored (as `age` old already); a superseded
    /// fill stores nothing, and
    /// neither does one that ends while a write of the key is in flight (it may have read
    /// upstream before the write applied, and a remote write's outcome may never come: the
    /// key is then read from upstream until the write ends). `None` is a fill that failed or
    /// was abandoned.
    fn complete_fill(
        &self,
        key: &Key,
        fill: &Arc<Fill>,
        answer: Option<&ConsentAnswer>,
        age: Duration,
    ) {
        let mut shard = self.shard(key);
        let Some(state) = shard.get_mut(key) else {
            return;
        };
        if state.fill.as_ref().is_some_and(|f| Arc::ptr_eq(f, fill)) {
            state.fill = None;
            let answer = answer.filter(|_| state.writes_in_flight == 0);
            // Ages are exact below MAX_TTL, which no TTL reaches.
            let age_ms = age.min(MAX_TTL).as_millis() as u32;
            let stored_at = self.now_ms().wrapping_sub(age_ms);
            let stored = answer.and_then(|answer| {
                StoredAnswer::from_read(answer, self.inner.lifetimes.caches_not_found(), stored_at)
            });
            if let Some(stored) = stored {
                self.inner.answers.insert(key.clone(), stored);
            }
        }
        if state.is_idle() {
            shard.remove(key);
        }
    }

    /// How long this cache keeps `answer`, by its kind; `None` when it is not cacheable (only
    /// 200s with a consent body and, unless `not_found_ttl_s` is 0, 404s are: rule 4). The
    /// cluster's shared tier keeps answers by the same rule.
    pub fn ttl_for(&self, answer: &ConsentAnswer) -> Option<Duration> {
        let lifetimes = &self.inner.lifetimes;
        let kind = Kind::of(answer, lifetimes.caches_not_found())?;
        Some(lifetimes.ttl_of(kind == Kind::NotFound))
    }

    /// The status this cache holds for `contact` within its TTL, without counting a lookup
    /// (the audit trail's "previous" status). `None` when it holds nothing, an expired entry
    /// or a 404.
    pub fn known_status(&self, contact: &ContactId) -> Option<ConsentStatus> {
        let stored = self.inner.answers.get(&self.inner.keys.of(contact))?;
        let age_ms = stored.age_ms(self.now_ms());
        let fresh = self.inner.lifetimes.freshness(&stored, age_ms) != Freshness::Expired;
        (fresh && !stored.is_not_found()).then(|| stored.status())
    }

    /// Marks a write to `contact` as in flight until the guard is finished (or dropped).
    pub fn begin_write(&self, contact: &ContactId) -> WriteGuard {
        self.begin(contact, Origin::Local)
    }

    /// Marks a write announced by another instance of the cluster as in flight: the entry is
    /// dropped and any fill in flight superseded at once (upstream may apply the write at any
    /// moment from now), and until the guard ends no fill of the contact stores its answer.
    /// When it ends, an applied or unknown outcome drops the entry again and supersedes the
    /// fills that began meanwhile; a write upstream refused changes nothing. It never stores
    /// the written status: whether it was applied before or after a write through this
    /// instance that this instance had already finished, only upstream knows.
    pub fn begin_remote_write(&self, contact: &ContactId) -> WriteGuard {
        self.begin(contact, Origin::Remote)
    }

    fn begin(&self, contact: &ContactId, origin: Origin) -> WriteGuard {
        let key = self.inner.keys.of(contact);
        let mut shard = self.shard(&key);
        let state = shard.entry(key.clone()).or_default();
        state.writes_in_flight += 1;
        if state.writes_in_flight > 1 {
            state.writes_overlapped = true;
        }
        if origin == Origin::Remote {
            state.fill = None;
            // Still under the shard lock, so no superseded fill can store in between.
            self.inner.answers.invalidate(&key);
            self.inner.metrics.invalidated(Invalidation::RemoteWrite);
        }
        drop(shard);
        WriteGuard {
            cache: self.clone(),
            key,
            origin,
            finished: false,
        }
    }

    /// Applies a write's outcome: a fill in flight is superseded, and the entry is replaced
    /// by the written status (a local write's only), dropped, or left alone.
    fn finish_write(&self, key: &Key, origin: Origin, outcome: WriteOutcome) {
        let mut shard = self.shard(key);
        let state = shard.entry(key.clone()).or_default();
        state.writes_in_flight = state.writes_in_flight.saturating_sub(1);
        let overlapped = state.writes_overlapped;
        if state.writes_in_flight == 0 {
            state.writes_overlapped = false;
        }
        if !matches!(outcome, WriteOutcome::NotApplied) {
            // Reads that began before this write must not store their answer.
            state.fill = None;
            self.changed(key);
        }
        if state.is_idle() {
            shard.remove(key);
        }
        if !self.inner.enabled {
            return;
        }
        // Still under the shard lock, so no fill can register and store in between.
        let answers = &self.inner.answers;
        let reason = match outcome {
            WriteOutcome::NotApplied => return,
            // Counted once, when it began.
            WriteOutcome::Applied(_) if origin == Origin::Remote => {
                answers.invalidate(key);
                return;
            }
            WriteOutcome::Applied(status) if !overlapped => {
                answers.insert(key.clone(), StoredAnswer::canonical(status, self.now_ms()));
                Invalidation::Write
            }
            WriteOutcome::Applied(_) => {
                answers.invalidate(key);
                Invalidation::ConcurrentWrites
            }
            WriteOutcome::Unknown => {
                answers.invalidate(key);
                Invalidation::UnknownOutcome
            }
        };
        self.inner.metrics.invalidated(reason);
    }

    /// Drops a contact's answer (admin purge); a fill in flight will not store its answer.
    pub fn purge(&self, contact: &ContactId) {
        let key = &self.inner.keys.of(contact);
        let mut shard = self.shard(key);
        if let Some(state) = shard.get_mut(key) {
            state.fill = None;
            if state.is_idle() {
                shard.remove(key);
            }
        }
        self.changed(key);
        self.inner.answers.invalidate(key);
        self.inner.metrics.invalidated(Invalidation::Purge);
    }

    /// Lets lookups answer from the cache until `until` (the cluster's feed is confirmed live
    /// until then). Without a cluster the cache is always trusted.
    pub fn trust_until(&self, until: Instant) {
        let ms = until
            .saturating_duration_since(self.inner.epoch)
            .as_millis();
        let ms = u64::try_from(ms).unwrap_or(u64::MAX);
        self.inner.trusted_until_ms.store(ms, Ordering::Release);
    }

    /// From now on every lookup bypasses the cache (`unsynced`) until [`Self::trust_until`].
    pub fn distrust(&self) {
        self.inner.trusted_until_ms.store(0, Ordering::Release);
    }

    /// Whether lookups may answer from the cache now.
    pub fn is_trusted(&self) -> bool {
        self.now_ms64() < self.inner.trusted_until_ms.load(Ordering::Acquire)
    }

    /// Forgets everything that may have missed an announcement: every entry is dropped,
    /// every fill in flight superseded (it will not store), and every write in flight treated
    /// as overlapping another (it will drop the entry instead of storing). The cluster calls it
    /// when its feed resumes after a gap, before trusting the cache again.
    pub fn flush(&self) {
        if let Some(changes) = self.inner.changes.get() {
            changes.flushed(self.change_ms());
        }
        for shard in self.inner.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|_, state| {
                state.fill = None;
                if state.writes_in_flight > 0 {
                    state.writes_overlapped = true;
                }
                !state.is_idle()
            });
        }
        // After every shard was passed: a fill that checked its registration before its shard
        // was passed has stored by now, and is invalidated here with everything else.
        let dropped = self.inner.answers.entry_count();
        self.inner.answers.invalidate_all();
        self.inner.metrics.flushed(dropped);
    }

    /// From now on, keeps the log of changes [`Self::unchanged_since`] reads (the cluster's
    /// shared tier asks for it: 512 KiB).
    pub fn keep_change_log(&self) {
        let _ = self.inner.changes.set(ChangeLog::new());
    }

    /// Since when `contact` is unchanged as far as this instance knows: the latest end of a
    /// write of it (local, or announced by another instance, or its announcement expired), of
    /// an admin purge, or of a flush (announcements may have been missed), or when the log
    /// began. `None` while a write of it is in flight here: any answer may be older than it.
    /// An answer read from upstream before that moment may be older than a change.
    pub fn unchanged_since(&self, contact: &ContactId) -> Option<Instant> {
        let key = &self.inner.keys.of(contact);
        let shard = self.shard(key);
        if shard
            .get(key)
            .is_some_and(|state| state.writes_in_flight > 0)
        {
            return None;
        }
        let ms = match self.inner.changes.get() {
            Some(changes) => changes.last_change(key.keyed_hash()),
            None => self.change_ms(),
        };
        drop(shard);
        Some(self.inner.epoch + Duration::from_millis(ms))
    }

    /// Records a change of `key` now.
    fn changed(&self, key: &Key) {
        if let Some(changes) = self.inner.changes.get() {
            changes.changed(key.keyed_hash(), self.change_ms());
        }
    }

    /// Now for the change log: milliseconds since the epoch rounded up, so that a recorded
    /// moment is never before the change.
    fn change_ms(&self) -> u64 {
        self.now_ms64() + 1
    }

    /// Updates the entries gauge (called before each scrape).
    pub fn refresh_entry_gauge(&self) {
        self.inner.answers.run_pending_tasks();
        let count = i64::try_from(self.inner.answers.entry_count()).unwrap_or(i64::MAX);
        self.inner.metrics.entries.set(count);
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.answers.entry_count()
    }

    /// Keys with something in flight (a fill or a write); 0 when the cache is at rest.
    pub fn keys_in_flight(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Milliseconds since the epoch, wrapping at 2^32 (ages are differences of these).
    fn now_ms(&self) -> u32 {
        self.now_ms64() as u32
    }

    /// Milliseconds since the epoch.
    fn now_ms64(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    /// The key's shard, locked. No critical section panics or awaits, so a poisoned lock
    /// (impossible in practice) is simply taken over.
    fn shard(&self, key: &Key) -> MutexGuard<'_, HashMap<Key, KeyState, KeyHashing>> {
        // Bits the shard's own map does not index by (its low bits) nor tag by (its top 7).
        let index = (key.keyed_hash() >> 32) as usize & (SHARDS - 1);
        self.inner.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
impl ConsentCache {
    /// A small enabled cache (TTLs 60 s and 30 s) with its own registry, for unit tests.
    pub(crate) fn for_tests() -> ConsentCache {
        Self::for_tests_with(None, None)
    }

    /// As [`Self::for_tests`], with `stale_if_error` and `refresh_ahead`.
    pub(crate) fn for_tests_with(
        stale_if_error: Option<Duration>,
        refresh_ahead: Option<Duration>,
    ) -> ConsentCache {
        ConsentCache::new(
            &CacheSettings {
                enabled: true,
                ttl: Duration::from_secs(60),
                not_found_ttl: Duration::from_secs(30),
                max_entries: 100,
                stale_if_error,
                refresh_ahead,
            },
            CacheMetrics::register(&prometheus::Registry::new()),
        )
    }
}

/// A write in flight for one contact. Finish it with the outcome; dropped unfinished (the
/// write's task failed), it counts as an unknown outcome: the entry is dropped, never kept.
pub struct WriteGuard {
    cache: ConsentCache,
    key: Key,
    origin: Origin,
    finished: bool,
}

impl WriteGuard {
    pub fn finish(mut self, outcome: WriteOutcome) {
        self.finished = true;
        self.cache.finish_write(&self.key, self.origin, outcome);
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.cache
                .finish_write(&self.key, self.origin, WriteOutcome::Unknown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::ConsentStatus;
    use bytes::Bytes;

    fn cache() -> ConsentCache {
        ConsentCache::for_tests()
    }

    fn contact(id: &str) -> ContactId {
        ContactId::from_path_segment(id).expect("valid id")
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    fn lead(cache: &ConsentCache, id: &ContactId) -> FillLead {
        match cache.lookup(id) {
            Lookup::Lead(lead) => lead,
            _ => panic!("expected to lead a fill"),
        }
    }

    #[tokio::test]
    async fn a_fill_whose_task_panics_leaves_nothing_behind() {
        let cache = cache();
        let id = contact("+15550000001");
        let waiter = lead(&cache, &id).spawn(async { panic!("the fetch panicked") });
        assert!(
            matches!(
                waiter.wait(deadline()).await,
                Err(crate::error::ProxyError::Internal(_))
            ),
            "waiters are told at once, not at their deadline"
        );
        assert_eq!(cache.keys_in_flight(), 0, "no per-key state is left behind");
        // The next lookup leads a new fill instead of joining the dead one.
        let answer = lead(&cache, &id)
            .spawn(async { Ok(ConsentAnswer::canonical(ConsentStatus::Refused)) })
            .wait(deadline())
            .await;
        assert_eq!(
            answer.expect("filled").body,
            &b"{\"status\":\"REFUSED\"}"[..]
        );
        assert!(matches!(cache.lookup(&id), Lookup::Hit(_)));
    }

    /// An answer another cache held for 50 s is stored 50 s old: with a 60 s TTL it is a hit
    /// for 10 s more, not 60 (rule 3 across tiers).
    #[tokio::test(start_paused = true)]
    async fn an_aged_fill_is_stored_as_old_as_it_is() {
        let cache = cache();
        let id = contact("+15550000009");
        lead(&cache, &id)
            .spawn_aged(async {
                Fetched {
                    result: Ok(ConsentAnswer::canonical(ConsentStatus::Consented)),
                    age: Duration::from_secs(50),
                }
            })
            .wait(deadline())
            .await
            .expect("filled");
        match cache.lookup(&id) {
            Lookup::Hit(hit) => assert_eq!(hit.age_s, 50),
            _ => panic!("expected a hit"),
        }
        tokio::time::advance(Duration::from_millis(9_900)).await;
        assert!(matches!(cache.lookup(&id), Lookup::Hit(_)));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(matches!(cache.lookup(&id), Lookup::Lead(_)), "past its TTL");
    }

    #[test]
    fn ttl_for_follows_the_kind_and_rule_4() {
        let cache = ConsentCache::for_tests();
        let answer = |status, body: &'static str| ConsentAnswer {
            status,
            body: Bytes::from_static(body.as_bytes()),
            content_type: None,
            retry_after: None,
        };
        assert_eq!(
            cache.ttl_for(&ConsentAnswer::canonical(ConsentStatus::Refused)),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            cache.ttl_for(&answer(http::StatusCode::NOT_FOUND, "{}")),
            Some(Duration::from_secs(30))
        );
        for (status, body) in [
            (http::StatusCode::OK, "{}"),
            (http::StatusCode::UNAUTHORIZED, "{}"),
            (http::StatusCode::SERVICE_UNAVAILABLE, "{}"),
        ] {
            assert_eq!(cache.ttl_for(&answer(status, body)), None, "{status}");
        }
    }

    #[tokio::test]
    async fn a_dropped_write_guard_drops_the_entry() {
        let cache = cache();
        let id = contact("+15550000002");
        cache
            .begin_write(&id)
            .finish(WriteOutcome::Applied(ConsentStatus::Consented));
        assert!(matches!(cache.lookup(&id), Lookup::Hit(_)));
        drop(cache.begin_write(&id));
        assert!(matches!(cache.lookup(&id), Lookup::Lead(_)));
        assert_eq!(cache.keys_in_flight(), 0);
    }

    fn hit_body(cache: &ConsentCache, id: &ContactId) -> Option<Bytes> {
        match cache.lookup(id) {
            Lookup::Hit(hit) => Some(hit.answer.body),
            _ => None,
        }
    }

    #[tokio::test]
    async fn an_untrusted_cache_is_neither_read_nor_filled() {
        let cache = cache();
        let id = contact("+15550000004");
        cache
            .begin_write(&id)
            .finish(WriteOutcome::Applied(ConsentStatus::Consented));
        cache.distrust();
        assert!(matches!(cache.lookup(&id), Lookup::Unsynced));
        assert_eq!(cache.keys_in_flight(), 0, "no fill registered");
        cache.trust_until(Instant::now() + Duration::from_secs(1));
        assert!(hit_body(&cache, &id).is_some());
        cache.trust_until(Instant::now());
        assert!(
            matches!(cache.lookup(&id), Lookup::Unsynced),
            "the deadline passed"
        );
    }

    #[tokio::test]
    async fn a_flush_drops_entries_supersedes_fills_and_stored_writes() {
        let cache = cache();
        let (cached, filling, writing) = (
            contact("+15550000005"),
            contact("+15550000006"),
            contact("+15550000007"),
        );
        cache
            .begin_write(&cached)
            .finish(WriteOutcome::Applied(ConsentStatus::Consented));
        let fill = lead(&cache, &filling);
        let write = cache.begin_write(&writing);
        cache.flush();
        assert!(matches!(cache.lookup(&cached), Lookup::Lead(_)));
        fill.spawn(async { Ok(ConsentAnswer::canonical(ConsentStatus::Consented)) })
            .wait(deadline())
            .await
            .expect("its waiters still get the answer");
        assert!(
            hit_body(&cache, &filling).is_none(),
            "a fill from before the flush"
        );
        write.finish(WriteOutcome::Applied(ConsentStatus::Refused));
        assert!(
            hit_body(&cache, &writing).is_none(),
            "a write that straddled the flush may have overlapped a missed one"
        );
    }

    #[tokio::test]
    async fn a_remote_write_drops_the_entry_and_never_stores() {
        let cache = cache();
        let id = contact("+15550000008");
        cache
            .begin_write(&id)
            .finish(WriteOutcome::Applied(ConsentStatus::Consented));
        let remote = cache.begin_remote_write(&id);
        assert!(hit_body(&cache, &id).is_none(), "dropped when announced");
        // A fill while it is in flight reads upstream but does not store.
        lead(&cache, &id)
            .spawn(async { Ok(ConsentAnswer::canonical(ConsentStatus::Consented)) })
            .wait(deadline())
            .await
            .expect("answered");
        assert!(
            hit_body(&cache, &id).is_none(),
            "no store while a write is in flight"
        );
        remote.finish(WriteOutcome::Applied(ConsentStatus::Refused));
        assert!(
            hit_body(&cache, &id).is_none(),
            "the written status is not stored"
        );
        assert_eq!(cache.keys_in_flight(), 0);
    }

    #[tokio::test]
    async fn a_fill_superseded_by_a_write_does_not_store() {
        let cache = cache();
        let id = contact("+15550000003");
        let lead = lead(&cache, &id);
        cache
            .begin_write(&id)
            .finish(WriteOutcome::Applied(ConsentStatus::Refused));
        let old = lead
            .spawn(async { Ok(ConsentAnswer::canonical(ConsentStatus::Consented)) })
            .wait(deadline())
            .await;
        assert!(old.is_ok(), "the fill's own waiters still get its answer");
        match cache.lookup(&id) {
            Lookup::Hit(hit) => assert_eq!(hit.answer.body, &b"{\"status\":\"REFUSED\"}"[..]),
            _ => panic!("the write's answer must be the one stored"),
        }
    }

    fn refreshing(cache: &ConsentCache, id: &ContactId) -> Option<FillLead> {
        match cache.lookup(id) {
            Lookup::Hit(hit) => hit.refresh,
            _ => panic!("expected a hit"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hit_near_the_ttls_end_starts_one_refresh() {
        let cache = ConsentCache::for_tests_with(None, Some(Duration::from_secs(10)));
        let id = contact("+15550000010");
        cache
            .begin_write(&id)
            .finish(WriteOutcome::Applied(ConsentStatus::Consented));
        tokio::time::advance(Duration::from_millis(49_900)).await;
        assert!(refreshing(&cache, &id).is_none(), "outside the window");
        assert_eq!(cache.keys_in_flight(), 0, "no lock state for a plain hit");
        tokio::time::advance(Duration::from_millis(200)).await;
        let refresh = refreshing(&cache, &id).expect("inside the window: a refresh");
        assert!(
            refreshing(&cache, &id).is_none(),
            "one refresh at a time: the next hit only answers"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            matches!(cache.lookup(&id), Lookup::Join(_)),
            "past the TTL, a miss joins the refresh in flight"
        );
        refresh
            .spawn(async { Ok(ConsentAnswer::canonical(ConsentStatus::Refused)) })
            .wait(deadline())
            .await
            .expect("refreshed");
        match cache.lookup(&id) {
            Lookup::Hit(hit) => {
                assert_eq!(hit.answer.body, &b"{\"status\":\"REFUSED\"}"[..]);
                assert_eq!(hit.age_s, 0);
                assert!(hit.refresh.is_none());
            }
            _ => panic!("the refresh stored its answer"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_refresh_while_a_write_is_in_flight_and_a_write_supersedes_one() {
        let cache = ConsentCache::for_tests_with(None, Some(Duration::from_secs(10)));
        let id = contact("+15550000011");
        cache
            .begin_write(&id)
            .finish(WriteOutcome::Applied(ConsentStatus::Consented));
        tokio::time::advance(Duration::from_secs(55)).await;
        let write = cache.begin_write(&id);
        assert!(refreshing(&cache, &id).is_none(), "a write is in flight");
        write.finish(WriteOutcome::NotApplied);
        let refresh = refreshing(&cache, &id).expect("a refresh");
        cache
            .begin_write(&id)
            .finish(WriteOutcome::Applied(ConsentStatus::Refused));
        refresh
            .spawn(async { Ok(ConsentAnswer::canonical(ConsentStatus::Consented)) })
            .wait(deadline())
            .await
            .expect("its waiter still gets its answer");
        assert_eq!(
            hit_body(&cache, &id).expect("a hit"),
            &b"{\"status\":\"REFUSED\"}"[..],
            "a refresh superseded by a write does not store"
        );
        assert_eq!(cache.keys_in_flight(), 0);
    }
}
