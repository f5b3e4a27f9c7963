//! The second cache tier (`cluster.shared_cache`): consent answers kept in Redis for every
//! instance, each under its kind's TTL, sealed, and named by a keyed digest of the contact.
//!
//! - **A fill** (this instance's own cache missed, and it leads the local fill) looks in Redis
//!   first: an answer there is handed back with its age (so the local cache keeps it no longer
//!   than its TTL allows). Otherwise it takes the contact's fill lock, reads the contact's
//!   generation, fetches from upstream and stores the answer only if the generation is still
//!   the one it read and no write is in flight (one script, atomic in Redis). While another
//!   instance holds the lock it looks again, with back-off, until that fill's answer is there,
//!   the lock is free again (the holder failed or died: this fill takes over), or its own
//!   deadline nears (it fetches without storing).
//! - **A write** replaces the contact's generation and drops its answer in the same round trip
//!   as its pending announcement, and again with its outcome, when an applied write that
//!   overlapped no other stores its status (see `scripts`).
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
const ANSWER_FORMAT: u8 = 1;

/// What a fill found when it began (or looked again).
enum Begin {
    /// An answer: sealed, what is left of its TTL, its TTL.
    Answer(Vec<u8>, Duration, Duration),
    /// A write of the contact is in flight: nothing may be stored.
    WriteInFlight,
    /// Another instance's fill holds the lock.
    Held,
    /// This fill holds the lock; the contact's generation and the epoch, for its store.
    Lead { generation: String, epoch: String },
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
    /// The generation its pending announcement set.
    generation: String,
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
        async move {
            let fetched = tier.fill_through(&key, deadline, upstream).await;
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
            let begin = match self.begin(key, &lock).await {
                Ok(begin) => begin,
                Err(problem) => {
                    self.redis.metrics.lookup(Lookup::Unavailable);
                    tracing::debug!(error = %ErrorChain(&problem), "shared tier unavailable: fetching alone");
                    return Err(upstream.await);
                }
            };
            match begin {
                Begin::Answer(sealed, left, ttl) => {
                    if let Some(found) = self.open_answer(key, &sealed, left, ttl) {
                        self.redis.metrics.lookup(if waited {
                            Lookup::Coalesced
                        } else {
                            Lookup::Hit
                        });
                        return Ok(found);
                    }
                    // Not usable here (older than this instance's TTL, or sealed with a key
                    // it does not have): fetched, and left to its own instance to replace.
                    self.redis.metrics.lookup(Lookup::Miss);
                    return Err(upstream.await);
                }
                Begin::WriteInFlight => {
                    self.redis.metrics.lookup(Lookup::WritePending);
                    return Err(upstream.await);
                }
                Begin::Lead { generation, epoch } => {
                    self.redis.metrics.lookup(Lookup::Miss);
                    let result = upstream.await;
                    self.store(key, &generation, &epoch, &lock, &result).await;
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

    async fn begin(&self, key: &str, lock: &str) -> Result<Begin, Failure> {
        let call = FILL_BEGIN
            .call()
            .key(key)
            .key(&self.epoch_key)
            .arg(lock)
            .arg(millis(self.lock_ttl))
            .arg(millis(self.guard_life));
        let answer: Value = self.redis.run(Op::Lookup, self.timeout, call).await?;
        let mut items = reply::items(answer).into_iter();
        let kind = reply::int(items.next());
        let begin = match kind {
            Some(1) => {
                let sealed = reply::bytes(items.next());
                let (left, ttl) = (reply::millis(items.next()), reply::millis(items.next()));
                sealed
                    .zip(left.zip(ttl))
                    .map(|(sealed, (left, ttl))| Begin::Answer(sealed, left, ttl))
            }
            Some(2) => Some(Begin::WriteInFlight),
            Some(3) => Some(Begin::Held),
            Some(4) => reply::text(items.next())
                .zip(reply::text(items.next()))
                .map(|(generation, epoch)| Begin::Lead { generation, epoch }),
            _ => None,
        };
        begin.ok_or_else(|| Failure::msg("Redis answered the fill script unexpectedly"))
    }

    /// A stored answer, if this instance may use it: it opens with the key in use, it is
    /// cacheable here, and it is younger than this instance's TTL for its kind.
    fn open_answer(
        &self,
        key: &str,
        sealed: &[u8],
        left: Duration,
        ttl: Duration,
    ) -> Option<(ConsentAnswer, Duration)> {
        let plaintext = self.keys.current().open(key.as_bytes(), sealed)?;
        let answer = decode_answer(&plaintext)?;
        let age = ttl.saturating_sub(left);
        (age < self.local.ttl_for(&answer)?).then_some((answer, age))
    }

    /// Stores a fill's answer under the guard, or gives the lock back when it is not cacheable.
    async fn store(
        &self,
        key: &str,
        generation: &str,
        epoch: &str,
        lock: &str,
        result: &FillResult,
    ) {
        let cacheable = result.as_ref().ok().and_then(|answer| {
            let ttl = self.local.ttl_for(answer)?;
            Some((ttl, self.seal_answer(key, answer)?))
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
            .arg(generation)
            .arg(epoch)
            .arg(lock)
            .arg(sealed)
            .arg(millis(ttl))
            .arg(millis(self.guard_life));
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

    fn seal_answer(&self, key: &str, answer: &ConsentAnswer) -> Option<Vec<u8>> {
        self.keys
            .current()
            .seal(key.as_bytes(), &encode_answer(answer)?)
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
            generation: random_id(),
        };
        let call = WRITE_PENDING
            .call()
            .key(self.contact_keys(contact))
            .arg(&shared_write.field)
            .arg(millis(self.pending_life))
            .arg(&shared_write.generation)
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
        let keys = self.contact_keys(contact);
        let (outcome, written) = match outcome {
            WriteOutcome::Applied(status) => ("applied", Some(ConsentAnswer::canonical(status))),
            WriteOutcome::NotApplied => ("not_applied", None),
            WriteOutcome::Unknown => ("unknown", None),
        };
        let stored = written.and_then(|answer| {
            let ttl = self.local.ttl_for(&answer)?;
            Some((self.seal_answer(&keys[0], &answer)?, ttl))
        });
        let (sealed, ttl) = stored.unwrap_or_default();
        WRITE_DONE
            .call()
            .key(&self.epoch_key)
            .key(keys)
            .arg(&write.field)
            .arg(outcome)
            .arg(&write.generation)
            .arg(random_id())
            .arg(sealed)
            .arg(millis(ttl))
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

/// An answer as stored (before sealing): format, HTTP status, content type, body.
fn encode_answer(answer: &ConsentAnswer) -> Option<Vec<u8>> {
    let content_type = answer
        .content_type
        .as_ref()
        .map_or(&b""[..], HeaderValue::as_bytes);
    let content_type_len = u8::try_from(content_type.len()).ok()?;
    let mut encoded = Vec::with_capacity(4 + content_type.len() + answer.body.len());
    encoded.push(ANSWER_FORMAT);
    encoded.extend_from_slice(&answer.status.as_u16().to_be_bytes());
    encoded.push(content_type_len);
    encoded.extend_from_slice(content_type);
    encoded.extend_from_slice(&answer.body);
    Some(encoded)
}

fn decode_answer(encoded: &[u8]) -> Option<ConsentAnswer> {
    let (&format, rest) = encoded.split_first()?;
    if format != ANSWER_FORMAT {
        return None;
    }
    let status = StatusCode::from_u16(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])).ok()?;
    let content_type_len = usize::from(*rest.get(2)?);
    let content_type = rest.get(3..3 + content_type_len)?;
    let body = rest.get(3 + content_type_len..)?;
    Some(ConsentAnswer {
        status,
        body: Bytes::copy_from_slice(body),
        content_type: if content_type.is_empty() {
            None
        } else {
            Some(HeaderValue::from_bytes(content_type).ok()?)
        },
        retry_after: None,
    })
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
            let decoded = decode_answer(&encode_answer(&answer).unwrap()).unwrap();
            assert_eq!(decoded.status, answer.status);
            assert_eq!(decoded.body, answer.body);
            assert_eq!(decoded.content_type, answer.content_type);
        }
        assert!(decode_answer(&[]).is_none());
        assert!(decode_answer(&[2, 0, 200, 0]).is_none(), "another format");
        assert!(decode_answer(&[1, 0, 200, 9, b'x']).is_none(), "cut short");
    }
}
