//! The second cache tier (`cluster.shared_cache`): consent answers kept in Redis for every
//! instance, each under its kind's TTL, sealed, and named by a keyed digest of the contact.
//!
//! - **A fill** (this instance's own cache missed, and it leads the local fill) looks in Redis
//!   first: an answer there is handed back with its age (so the local cache keeps it no longer
//!   than its TTL allows). Otherwise it takes the contact's fill lock, reads the contact's
//!   generation (making one when there is none), fetches from upstream and stores the answer
//!   only if the generation is still that very one and no write is in flight (one script,
//!   atomic in Redis). While another instance holds the lock it looks again, with back-off,
//!   until that fill's answer is there, the lock is free again (the holder failed or died:
//!   this fill takes over), or its own deadline nears (it fetches without storing).
//! - **What this instance knows decides, not what Redis kept.** Each answer is sealed with
//!   when the fill that read it began (Redis time), the contact's generation and the epoch. An
//!   instance takes an answer only if that read began after the latest change of the contact
//!   it knows of ([`ConsentCache::unchanged_since`]: a write's end or a purge as announced, a
//!   flush), never while a write of it is in flight. So an answer stored after the contact's
//!   keys were evicted or deleted mid-fill, or an old entry replayed by a client without the
//!   shared key, is refused (and replaced by this fill): Redis losing or rolling back keys
//!   costs upstream GETs, never an answer older than an acknowledged write.
//! - **A write** replaces the contact's generation and drops its answer in the same round trip
//!   as its pending announcement, and again with its outcome (see `scripts`).
//!
//! Every call on a fill's path is bounded by `cluster.shared_timeout_ms`; when Redis cannot
//! answer, the fill goes upstream as if the instance were alone, and stores nothing.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::time::Instant;

use super::clock::RedisClock;
use super::keys::{KeySet, SharedKeys};
use super::metrics::{Lookup, Op, SharedMetrics, Store};
use super::scripts::{
    Call, FILL_BEGIN, FILL_RELEASE, FILL_STORE, NEW_EPOCH, PURGE, WRITE_DONE, WRITE_PENDING,
};
use super::{millis, random_id, reply, Redis};
use crate::cache::{ConsentCache, Fetched, FillResult};
use crate::cluster::link::Link;
use crate::consent::{ConsentAnswer, ContactId, WriteOutcome};
use crate::error::{ErrorChain, Failure};

/// A fill waiting for another instance's looks again after this, doubling...
const FIRST_POLL: Duration = Duration::from_millis(2);
/// ...up to this.
const LAST_POLL: Duration = Duration::from_millis(25);
/// The format of a stored answer's plaintext.
const ANSWER_FORMAT: u8 = 2;

/// Readings of Redis' clock when a session starts (the fastest kept).
const SESSION_CLOCK_SAMPLES: usize = 5;

/// What a fill found when it began (or looked again).
enum Begin {
    /// An answer, sealed, and what it must have been sealed with.
    Answer { sealed: Vec<u8>, seen: Seen },
    /// A write of the contact is in flight: nothing may be stored.
    WriteInFlight,
    /// Another instance's fill holds the lock.
    Held,
    /// This fill holds the lock: what its store is checked against and sealed with; whether
    /// it replaces an answer this instance may not take.
    Lead { seen: Seen, replaces: bool },
}

/// The contact's state in Redis as a script saw it.
struct Seen {
    generation: String,
    epoch: String,
    /// Redis' time then (ms).
    now: u64,
}

impl Seen {
    /// From a script's answer: generation, epoch, and Redis' time unless `now` is given.
    fn read(now: Option<u64>, items: &mut impl Iterator<Item = Value>) -> Option<Seen> {
        let generation = reply::text(items.next())?;
        let epoch = reply::text(items.next())?;
        let now = now.or_else(|| reply::count(items.next()))?;
        Some(Seen {
            generation,
            epoch,
            now,
        })
    }

    /// What a sealed answer is bound to besides its key: it opens only under the generation
    /// and epoch it was stored with (an answer copied into another state of the contact does
    /// not open).
    fn context(&self, key: &str) -> Vec<u8> {
        [key, &self.generation, &self.epoch].join("\n").into_bytes()
    }
}

/// How a fill was answered, read by the request that led it once the fill is over.
#[derive(Clone, Default)]
pub struct FillReport(Arc<OnceLock<Duration>>);

impl FillReport {
    /// The answer's age when it came from the shared tier (as a hit, or another instance's
    /// fill); `None` when it came from upstream.
    pub fn shared_age(&self) -> Option<Duration> {
        self.0.get().copied()
    }
}

/// A write's part in the shared tier, between its two announcements.
pub struct SharedWrite {
    /// Its hash field while it is in flight: `p:{instance}:{write}`.
    field: String,
}

pub struct SharedCache {
    redis: Redis,
    keys: SharedKeys,
    /// `{key_prefix}:v1`
    prefix: String,
    epoch_key: String,
    /// The instance's own cache: its TTLs and its rule of what is cacheable are the tier's.
    local: ConsentCache,
    timeout: Duration,
    /// How long a fill may hold a contact's lock: one upstream attempt and two calls.
    lock_ttl: Duration,
    /// How long a write stays in flight without its outcome (the cluster's pending lifetime).
    pending_life: Duration,
    /// How long a contact's hash outlives its last change (longer than any fill or write).
    guard_life: Duration,
    /// Fills keep this much of their deadline for their own upstream attempt.
    attempt_timeout: Duration,
    /// Redis' clock against this instance's.
    clock: RedisClock,
}

/// What the shared cache needs beyond its keys and Redis.
pub struct SharedCacheSettings {
    pub key_prefix: String,
    pub local: ConsentCache,
    /// `cluster.shared_timeout_ms`.
    pub timeout: Duration,
    /// `talkdesk.timeout_ms`.
    pub attempt_timeout: Duration,
    pub pending_life: Duration,
}

impl SharedCache {
    pub(in crate::cluster) fn new(
        link: Arc<Link>,
        keys: SharedKeys,
        settings: SharedCacheSettings,
        metrics: SharedMetrics,
    ) -> SharedCache {
        let prefix = format!("{}:v1", settings.key_prefix);
        // What answers from Redis are checked against.
        settings.local.keep_change_log();
        SharedCache {
            redis: Redis { link, metrics },
            keys,
            epoch_key: format!("{prefix}:epoch"),
            prefix,
            local: settings.local,
            timeout: settings.timeout,
            lock_ttl: settings.attempt_timeout + 2 * settings.timeout,
            pending_life: settings.pending_life,
            guard_life: 2 * settings.pending_life,
            attempt_timeout: settings.attempt_timeout,
            clock: RedisClock::new(),
        }
    }

    /// The fetch of a local fill, through the shared tier: the answer in Redis, or `upstream`'s
    /// (stored in Redis when the generation guard allows). `report` says which, afterwards.
    pub fn fill<F>(
        self: &Arc<Self>,
        contact: &ContactId,
        deadline: Instant,
        upstream: F,
        report: FillReport,
    ) -> impl Future<Output = Fetched> + Send + 'static
    where
        F: Future<Output = FillResult> + Send + 'static,
    {
        let tier = self.clone();
        let key = tier.contact_key(tier.keys.current(), contact);
        let contact = contact.clone();
        async move {
            let fetched = tier.fill_through(&key, &contact, deadline, upstream).await;
            match fetched {
                Ok((answer, age)) => {
                    let _ = report.0.set(age);
                    Fetched {
                        result: Ok(answer),
                        age,
                    }
                }
                Err(result) => Fetched {
                    result,
                    age: Duration::ZERO,
                },
            }
        }
    }

    /// `Ok`: the tier's answer and its age; `Err`: upstream's result.
    async fn fill_through<F>(
        &self,
        key: &str,
        contact: &ContactId,
        deadline: Instant,
        upstream: F,
    ) -> Result<(ConsentAnswer, Duration), FillResult>
    where
        F: Future<Output = FillResult>,
    {
        let lock = random_id();
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        // Time kept for this fill's own upstream attempt should the other instance's not end.
        let wait_until = deadline - self.attempt_timeout.min(left / 2);
        let mut poll = FIRST_POLL;
        let mut waited = false;
        loop {
            // An answer whose upstream read began before the latest change of the contact this
            // instance knows of may be older than that change, whatever Redis holds.
            let Some(unchanged_since) = self.local.unchanged_since(contact) else {
                self.redis.metrics.lookup(Lookup::WritePending);
                return Err(upstream.await);
            };
            let begin = match self.begin(key, &lock, unchanged_since).await {
                Ok(begin) => begin,
                Err(problem) => {
                    self.redis.metrics.lookup(Lookup::Unavailable);
                    tracing::debug!(error = %ErrorChain(&problem), "shared tier unavailable: fetching alone");
                    return Err(upstream.await);
                }
            };
            match begin {
                Begin::Answer { sealed, seen } => {
                    if let Some(found) = self.open_answer(key, &sealed, &seen, unchanged_since) {
                        self.redis.metrics.lookup(if waited {
                            Lookup::Coalesced
                        } else {
                            Lookup::Hit
                        });
                        return Ok(found);
                    }
                    // Not usable here (older than this instance's TTL or than a change it
                    // knows of, sealed with a key it does not have, altered): fetched, and
                    // left to be replaced when it expires or its contact changes.
                    self.redis.metrics.lookup(Lookup::Outdated);
                    return Err(upstream.await);
                }
                Begin::WriteInFlight => {
                    self.redis.metrics.lookup(Lookup::WritePending);
                    return Err(upstream.await);
                }
                Begin::Lead { seen, replaces } => {
                    self.redis.metrics.lookup(if replaces {
                        Lookup::Outdated
                    } else {
                        Lookup::Miss
                    });
                    let result = upstream.await;
                    self.store(key, &seen, &lock, &result).await;
                    return Err(result);
                }
                Begin::Held => {
                    waited = true;
                    if Instant::now() + poll >= wait_until {
                        self.redis.metrics.lookup(Lookup::LockTimeout);
                        return Err(upstream.await);
                    }
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(LAST_POLL);
                }
            }
        }
    }

    /// The fill script: answers whose read began by `unchanged_since` (as far as Redis' clock
    /// can tell) are replaced, not handed back.
    async fn begin(
        &self,
        key: &str,
        lock: &str,
        unchanged_since: Instant,
    ) -> Result<Begin, Failure> {
        let sent = Instant::now();
        let call = FILL_BEGIN
            .call()
            .key(key)
            .key(&self.epoch_key)
            .arg(lock)
            .arg(millis(self.lock_ttl))
            .arg(millis(self.guard_life))
            .arg(self.clock.latest_redis_ms(unchanged_since).unwrap_or(0))
            .arg(random_id());
        let answer: Value = self.redis.run(Op::Lookup, self.timeout, call).await?;
        let mut items = reply::items(answer).into_iter();
        let kind = reply::int(items.next());
        let begin = match kind {
            Some(1) => {
                let sealed = reply::bytes(items.next());
                let now = reply::count(items.next());
                if let Some(now) = now {
                    self.clock.observe(sent, now);
                }
                sealed
                    .zip(Seen::read(now, &mut items))
                    .map(|(sealed, seen)| Begin::Answer { sealed, seen })
            }
            Some(2) => Some(Begin::WriteInFlight),
            Some(3) => Some(Begin::Held),
            Some(4) => Seen::read(None, &mut items).map(|seen| {
                self.clock.observe(sent, seen.now);
                Begin::Lead {
                    seen,
                    replaces: reply::int(items.next()) == Some(1),
                }
            }),
            _ => None,
        };
        begin.ok_or_else(|| Failure::msg("Redis answered the fill script unexpectedly"))
    }

    /// A stored answer, if this instance may use it: it opens with the key in use under the
    /// generation and epoch it was found with, it is cacheable here, its read began certainly
    /// after `unchanged_since` (every change this instance knows of), and it is younger than
    /// this instance's TTL for its kind. Its age counts from when its read began.
    fn open_answer(
        &self,
        key: &str,
        sealed: &[u8],
        seen: &Seen,
        unchanged_since: Instant,
    ) -> Option<(ConsentAnswer, Duration)> {
        let plaintext = self.keys.current().open(&seen.context(key), sealed)?;
        let (begun, answer) = decode_answer(&plaintext)?;
        let age = Duration::from_millis(seen.now.checked_sub(begun)?);
        let after_every_change = begun > self.clock.latest_redis_ms(unchanged_since)?;
        (after_every_change && age < self.local.ttl_for(&answer)?).then_some((answer, age))
    }

    /// Stores a fill's answer under the guard, or gives the lock back when it is not cacheable.
    async fn store(&self, key: &str, seen: &Seen, lock: &str, result: &FillResult) {
        let cacheable = result.as_ref().ok().and_then(|answer| {
            let ttl = self.local.ttl_for(answer)?;
            let sealed = self
                .keys
                .current()
                .seal(&seen.context(key), &encode_answer(seen.now, answer)?)?;
            Some((ttl, sealed))
        });
        let Some((ttl, sealed)) = cacheable else {
            let release = FILL_RELEASE.call().key(key).arg(lock);
            let _ = self
                .redis
                .run::<i64>(Op::Store, self.timeout, release)
                .await;
            return;
        };
        let call = FILL_STORE
            .call()
            .key(key)
            .key(&self.epoch_key)
            .arg(&seen.generation)
            .arg(&seen.epoch)
            .arg(lock)
            .arg(sealed)
            .arg(millis(ttl))
            .arg(millis(self.guard_life))
            .arg(seen.now);
        let outcome = match self.redis.run::<i64>(Op::Store, self.timeout, call).await {
            Ok(1) => Store::Stored,
            Ok(_) => {
                tracing::debug!("shared tier: a write since the fill began; its answer not stored");
                Store::Refused
            }
            Err(problem) => {
                tracing::debug!(error = %ErrorChain(&problem), "shared tier: store failed");
                Store::Failed
            }
        };
        self.redis.metrics.store(outcome);
    }

    fn contact_key(&self, keys: &KeySet, contact: &ContactId) -> String {
        format!(
            "{}:c:{}:{}",
            self.prefix,
            keys.id(),
            keys.digest(contact.as_str().as_bytes())
        )
    }

    /// The contact's key in every keyspace, the one in use first.
    fn contact_keys(&self, contact: &ContactId) -> Vec<String> {
        self.keys
            .all()
            .iter()
            .map(|keys| self.contact_key(keys, contact))
            .collect()
    }

    /// The script that announces write `write` of `contact` by `instance` as pending, and what
    /// the write needs for its outcome.
    pub(in crate::cluster) fn begin_write(
        &self,
        contact: &ContactId,
        instance: &str,
        write: u64,
    ) -> (SharedWrite, Call<'static>) {
        let shared_write = SharedWrite {
            field: format!("p:{instance}:{write}"),
        };
        let call = WRITE_PENDING
            .call()
            .key(self.contact_keys(contact))
            .arg(&shared_write.field)
            .arg(millis(self.pending_life))
            .arg(random_id())
            .arg(millis(self.guard_life));
        (shared_write, call)
    }

    /// The script that announces the outcome of `write`.
    pub(in crate::cluster) fn end_write(
        &self,
        write: &SharedWrite,
        contact: &ContactId,
        outcome: WriteOutcome,
    ) -> Call<'static> {
        let outcome = match outcome {
            WriteOutcome::Applied(_) => "applied",
            WriteOutcome::NotApplied => "not_applied",
            WriteOutcome::Unknown => "unknown",
        };
        WRITE_DONE
            .call()
            .key(self.contact_keys(contact))
            .arg(&write.field)
            .arg(outcome)
            .arg(random_id())
            .arg(millis(self.guard_life))
    }

    /// The script that announces an admin purge of `contact`.
    pub(in crate::cluster) fn purge(&self, contact: &ContactId) -> Call<'static> {
        PURGE
            .call()
            .key(self.contact_keys(contact))
            .arg(random_id())
            .arg(millis(self.guard_life))
    }

    /// Reads Redis' clock a few times on `connection` (`TIME`, all within `budget`), so that a
    /// new session's first shared lookups can tell an answer read after the session began:
    /// otherwise the first bound would come from the first lookup's own round trip, and one
    /// slow round trip right after a start (a loaded machine) made it loose enough to refuse
    /// good answers (safe, but Talkdesk read again). Best effort: a failure or the budget's end
    /// stops it, and the session starts all the same.
    pub(in crate::cluster) async fn time_redis(
        &self,
        connection: &MultiplexedConnection,
        budget: Duration,
    ) {
        let samples = async {
            let command = redis::cmd("TIME");
            for _ in 0..SESSION_CLOCK_SAMPLES {
                let mut connection = connection.clone();
                let sent = Instant::now();
                let Ok((seconds, micros)) =
                    command.query_async::<(u64, u64)>(&mut connection).await
                else {
                    return;
                };
                // As the scripts read it: whole milliseconds.
                self.clock
                    .observe(sent, seconds.saturating_mul(1000) + micros / 1000);
            }
        };
        let _ = tokio::time::timeout(budget, samples).await;
    }

    /// Starts a new epoch: Redis may have lost writes (it restarted or failed over), so no
    /// answer stored before is used, and nothing is stored for one pending lifetime.
    pub(in crate::cluster) async fn new_epoch(
        &self,
        connection: MultiplexedConnection,
        timeout: Duration,
    ) -> Result<(), Failure> {
        let call = NEW_EPOCH
            .call()
            .key(&self.epoch_key)
            .arg(random_id())
            .arg(millis(self.pending_life));
        self.redis
            .run_on::<i64>(connection, Op::Store, timeout, call)
            .await
            .map(drop)
    }
}

/// An answer as stored (before sealing): format, when its read began (Redis ms), HTTP status,
/// content type, body.
fn encode_answer(begun: u64, answer: &ConsentAnswer) -> Option<Vec<u8>> {
    let content_type = answer
        .content_type
        .as_ref()
        .map_or(&b""[..], HeaderValue::as_bytes);
    let content_type_len = u8::try_from(content_type.len()).ok()?;
    let mut encoded = Vec::with_capacity(12 + content_type.len() + answer.body.len());
    encoded.push(ANSWER_FORMAT);
    encoded.extend_from_slice(&begun.to_be_bytes());
    encoded.extend_from_slice(&answer.status.as_u16().to_be_bytes());
    encoded.push(content_type_len);
    encoded.extend_from_slice(content_type);
    encoded.extend_from_slice(&answer.body);
    Some(encoded)
}

fn decode_answer(encoded: &[u8]) -> Option<(u64, ConsentAnswer)> {
    let (&format, rest) = encoded.split_first()?;
    if format != ANSWER_FORMAT {
        return None;
    }
    let (begun, rest) = rest.split_first_chunk::<8>()?;
    let status = StatusCode::from_u16(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])).ok()?;
    let content_type_len = usize::from(*rest.get(2)?);
    let content_type = rest.get(3..3 + content_type_len)?;
    let body = rest.get(3 + content_type_len..)?;
    let answer = ConsentAnswer {
        status,
        body: Bytes::copy_from_slice(body),
        content_type: if content_type.is_empty() {
            None
        } else {
            Some(HeaderValue::from_bytes(content_type).ok()?)
        },
        retry_after: None,
    };
    Some((u64::from_be_bytes(*begun), answer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::ConsentStatus;

    #[test]
    fn answers_round_trip() {
        let not_found = ConsentAnswer {
            status: StatusCode::NOT_FOUND,
            body: Bytes::from_static(br#"{"code":"not_found"}"#),
            content_type: Some(HeaderValue::from_static("application/json; charset=utf-8")),
            retry_after: None,
        };
        for answer in [ConsentAnswer::canonical(ConsentStatus::Refused), not_found] {
            let (begun, decoded) = decode_answer(&encode_answer(42, &answer).unwrap()).unwrap();
            assert_eq!(begun, 42);
            assert_eq!(decoded.status, answer.status);
            assert_eq!(decoded.body, answer.body);
            assert_eq!(decoded.content_type, answer.content_type);
        }
        assert!(decode_answer(&[]).is_none());
        assert!(decode_answer(&[1, 0, 200, 0]).is_none(), "another format");
        let mut cut = vec![ANSWER_FORMAT];
        cut.extend_from_slice(&[0; 8]);
        cut.extend_from_slice(&[0, 200, 9, b'x']);
        assert!(decode_answer(&cut).is_none(), "cut short");
        assert!(decode_answer(&[ANSWER_FORMAT, 0, 0]).is_none(), "no time");
    }
}
