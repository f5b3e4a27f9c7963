//! Cluster mode: several instances behind one load balancer keep their caches coherent
//! through Redis pub/sub (`cluster.redis_url`). The design, and why pub/sub rather than
//! Streams or RESP3 client tracking, is in the README ("Running several instances").
//!
//! - **Announce before writing.** A PUT first publishes "write pending for X" on the channel
//!   `{key_prefix}:consent:v1`; only once Redis has taken it does the PUT go upstream
//!   ([`Cluster::announce_write`]). When Redis cannot take it in time, `write_policy =
//!   "require"` refuses the PUT (503 `cluster_unavailable`, upstream not called) and
//!   `best_effort` sends it anyway (counted). After upstream answers, the outcome is published
//!   before the caller is answered ([`AnnouncedWrite::finish`]).
//! - **Receivers** hold a remote write guard of the cache per pending write: the contact is
//!   dropped at once, no fill stores it while the write is in flight, and when the outcome
//!   arrives (or the pending expires after `server.request_timeout_ms` plus a margin) it is
//!   dropped again (`remote`).
//! - **Know when you may be deaf.** Each instance publishes a heartbeat every
//!   `max_staleness_ms / 4` and trusts its cache only until `max_staleness_ms` after sending
//!   the latest heartbeat that came back to it: pub/sub delivers in order, so receiving it
//!   proves every announcement Redis took before it was received too. After any new
//!   subscription the whole cache is flushed before it is trusted again (`feed`).
//! - **Follow the sentinels' majority** (`cluster.sentinels`): the session's master is the one a
//!   majority of them names, asked again with every heartbeat; a heartbeat proves the cache live
//!   only together with such an answer, and a write is announced only within `max_staleness` of
//!   one, so an instance left on a replaced master (split brain) stops both (`sentinel`, `feed`).
//!
//! - **The shared tier** (`shared_cache`, `shared_token`): a second cache tier and the fleet's
//!   upstream token, kept in the same Redis ([`shared`]). With `shared_cache`, each
//!   announcement of a write (or purge) is published by a script that also applies it to the
//!   shared tier, in the same round trip.
//!
//! The hit path never touches Redis: the cache checks one atomic deadline. Dependencies flow
//! one way: `cluster` drives `cache`, which knows nothing of Redis, and serves `upstream`'s token
//! manager as a [`FleetTokens`] store.

mod feed;
mod link;
pub mod messages;
mod metrics;
mod remote;
mod sentinel;
pub mod shared;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::Registry;
use redis::{AsyncCommands, IntoConnectionInfo};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cache::ConsentCache;
use crate::config::{ClusterSettings, Secret, TalkdeskSettings, WritePolicy};
use crate::consent::{ContactId, WriteOutcome};
use crate::error::{ErrorChain, Failure, ProxyError};
use crate::upstream::token::FleetTokens;
use link::Link;
use messages::Announcement;
pub use metrics::ClusterMetrics;
use shared::{Call, FleetTokenStore, SharedCache, SharedKeys, SharedMetrics, SharedWrite};

/// How long Redis may take to acknowledge an announcement (or a heartbeat).
pub const ANNOUNCE_TIMEOUT: Duration = Duration::from_millis(250);
/// How long connecting and subscribing may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Added to a write's longest life (its request's deadline and two announcements) before a
/// pending announcement without an outcome expires.
const PENDING_MARGIN: Duration = Duration::from_secs(1);

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the cluster's Redis {url} (cluster.redis_url or cluster.sentinels)")]
pub struct ClusterStartError {
    url: String,
    #[source]
    source: redis::RedisError,
}

/// A message the feed leaves for `/readyz`, or none.
#[derive(Default)]
struct Note(Mutex<Option<String>>);

impl Note {
    fn get(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, note: Option<String>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = note;
    }
}

/// This instance as a member of the cluster: what the handle, the feed task and the writes in
/// flight share (not the shared tier, which is `shared`).
struct Member {
    /// This instance in the cluster's messages: random per process.
    id: String,
    channel: String,
    policy: WritePolicy,
    /// The connection announcements are published on (and the shared tier's commands sent).
    link: Arc<Link>,
    next_write: AtomicU64,
    /// Why the feed is not live (for `/readyz` and errors); `None` while it is.
    problem: Note,
    /// Something `/readyz` should say even while the feed is live (an evicting Redis).
    warning: Note,
    /// With sentinels: until when a write may be announced, `max_staleness` after the latest
    /// question a majority of them answered with the session's master (`None`: not at all).
    /// Without sentinels this is not consulted.
    announce_until: Mutex<Option<Instant>>,
    sentinels: bool,
    metrics: ClusterMetrics,
}

impl Member {
    /// Publishes one message, by `PUBLISH` or, when the shared tier has its part in it, by
    /// that script (which publishes it after applying it); `Ok` once Redis has taken it.
    async fn publish(
        &self,
        message: &Announcement,
        shared_part: Option<Call<'static>>,
    ) -> Result<(), Failure> {
        let mut connection = self.link.get().ok_or_else(|| {
            link::not_connected(Some(
                self.problem().unwrap_or_else(|| "connecting".to_owned()),
            ))
        })?;
        let encoded = message.encode();
        let not_taken = "Redis did not take the message";
        link::bounded(ANNOUNCE_TIMEOUT, not_taken, not_taken, async {
            match shared_part {
                Some(call) => {
                    call.args_first(&[self.channel.as_bytes(), &encoded])
                        .run::<usize>(&mut connection)
                        .await
                }
                None => {
                    connection
                        .publish::<_, _, usize>(&self.channel, encoded)
                        .await
                }
            }
        })
        .await?;
        self.metrics.sent.inc();
        Ok(())
    }

    fn problem(&self) -> Option<String> {
        self.problem.get()
    }

    fn set_problem(&self, problem: Option<String>) {
        self.problem.set(problem);
    }

    fn warning(&self) -> Option<String> {
        self.warning.get()
    }

    fn set_warning(&self, warning: Option<String>) {
        self.warning.set(warning);
    }

    fn confirmed_until(&self, until: Option<Instant>) {
        *self
            .announce_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = until;
    }

    /// With sentinels, `Err` unless a majority of them confirmed the session's master within
    /// `max_staleness`: an announcement taken by a master they have replaced would reach no
    /// other instance.
    fn master_confirmed(&self) -> Result<(), Failure> {
        if !self.sentinels {
            return Ok(());
        }
        let until = *self
            .announce_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if until.is_some_and(|until| Instant::now() < until) {
            Ok(())
        } else {
            Err(Failure::msg(
                "a majority of the sentinels has not confirmed the master within \
                 cluster.max_staleness_ms",
            ))
        }
    }
}

/// The cluster as the rest of the proxy sees it. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    member: Arc<Member>,
    cache: ConsentCache,
    /// `cluster.shared_cache`.
    shared_cache: Option<Arc<SharedCache>>,
    /// `cluster.shared_token`.
    fleet_tokens: Option<Arc<FleetTokenStore>>,
}

/// What `/readyz` says about the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The feed is confirmed live: the cache is answered from.
    pub live: bool,
    /// Why not, when it is not.
    pub reason: Option<String>,
    /// What the operator should know even while it is (Redis may evict the shared tier).
    pub warning: Option<String>,
}

impl Cluster {
    /// Starts the feed task (it connects, and reconnects, by itself). Until the feed is
    /// confirmed live the cache is not answered from. Registers the cluster's metrics (and the
    /// shared tier's, when it is on).
    pub fn start(
        settings: &ClusterSettings,
        talkdesk: &TalkdeskSettings,
        cache: ConsentCache,
        request_timeout: Duration,
        registry: &Registry,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Cluster, JoinHandle<()>), ClusterStartError> {
        let target = target(settings).map_err(|source| ClusterStartError {
            url: settings.redis_url.clone(),
            source,
        })?;
        cache.distrust();
        let link = Arc::new(Link::default());
        let member = Arc::new(Member {
            id: shared::random_id(),
            channel: format!("{}:consent:v1", settings.key_prefix),
            policy: settings.write_policy,
            link: link.clone(),
            next_write: AtomicU64::new(1),
            problem: Note(Mutex::new(Some("connecting to Redis".to_owned()))),
            warning: Note::default(),
            announce_until: Mutex::new(None),
            sentinels: settings.sentinel.is_some(),
            metrics: ClusterMetrics::register(registry),
        });
        let pending_lifetime = request_timeout + 2 * ANNOUNCE_TIMEOUT + PENDING_MARGIN;
        let shared_metrics = (settings.shared_cache || settings.shared_token)
            .then(|| SharedMetrics::register(registry));
        let keys = || SharedKeys::new(&settings.shared_keys);
        let shared_cache = shared_metrics
            .clone()
            .filter(|_| settings.shared_cache)
            .zip(keys())
            .map(|(metrics, keys)| {
                let tier = shared::SharedCacheSettings {
                    key_prefix: settings.key_prefix.clone(),
                    local: cache.clone(),
                    timeout: settings.shared_timeout,
                    attempt_timeout: talkdesk.timeout,
                    pending_life: pending_lifetime,
                };
                Arc::new(SharedCache::new(link.clone(), keys, tier, metrics))
            });
        let fleet_tokens = shared_metrics
            .filter(|_| settings.shared_token)
            .zip(keys())
            .map(|(metrics, keys)| {
                Arc::new(FleetTokenStore::new(
                    link.clone(),
                    keys,
                    &settings.key_prefix,
                    talkdesk,
                    ANNOUNCE_TIMEOUT.max(settings.shared_timeout),
                    metrics,
                ))
            });
        let feed = feed::Feed {
            member: member.clone(),
            target,
            cache: cache.clone(),
            shared_cache: shared_cache.clone(),
            redis_url: settings.redis_url.clone(),
            max_staleness: settings.max_staleness,
            pending_lifetime,
        };
        tracing::info!(
            redis = %settings.redis_url,
            channel = %member.channel,
            instance = %member.id,
            write_policy = settings.write_policy.as_str(),
            shared_cache = shared_cache.is_some(),
            shared_token = fleet_tokens.is_some(),
            "cluster mode: the cache is answered from only while the Redis feed is live"
        );
        let task = tokio::spawn(feed.run(shutdown));
        let cluster = Cluster {
            member,
            cache,
            shared_cache,
            fleet_tokens,
        };
        Ok((cluster, task))
    }

    /// The second cache tier, with `cluster.shared_cache`.
    pub fn shared_cache(&self) -> Option<&Arc<SharedCache>> {
        self.shared_cache.as_ref()
    }

    /// The fleet's token store for the token manager, with `cluster.shared_token`.
    pub fn fleet_tokens(&self) -> Option<Arc<dyn FleetTokens>> {
        self.fleet_tokens
            .clone()
            .map(|store| store as Arc<dyn FleetTokens>)
    }

    /// Announces a write of `contact` before it goes upstream. `Err` (503
    /// `cluster_unavailable`) when Redis did not take it and the policy is `require`: the
    /// write must then not be sent.
    pub async fn announce_write(&self, contact: &ContactId) -> Result<AnnouncedWrite, ProxyError> {
        let member = &self.member;
        let write = member.next_write.fetch_add(1, Ordering::Relaxed);
        let (tier, shared_part) = match &self.shared_cache {
            Some(cache) => {
                let (tier_write, call) = cache.begin_write(contact, &member.id, write);
                (Some((cache.clone(), tier_write)), Some(call))
            }
            None => (None, None),
        };
        let announced = member
            .publish(
                &Announcement::pending(&member.id, write, contact),
                shared_part,
            )
            .await
            .and_then(|()| member.master_confirmed());
        let announced_write = AnnouncedWrite {
            member: member.clone(),
            write,
            contact: contact.clone(),
            tier,
        };
        let Err(problem) = announced else {
            return Ok(announced_write);
        };
        member.metrics.pending_failed.inc();
        match member.policy {
            WritePolicy::Require => {
                tracing::warn!(
                    contact = %contact.masked(),
                    error = %ErrorChain(&problem),
                    "write refused: it could not be announced to the cluster"
                );
                // A slow Redis may still take the pending announcement later (not one that is
                // not connected): its outcome follows it, so that the others release the contact.
                if member.link.is_up() {
                    tokio::spawn(announced_write.finish(WriteOutcome::NotApplied));
                }
                Err(ProxyError::ClusterUnavailable(problem))
            }
            WritePolicy::BestEffort => {
                member.metrics.unannounced.inc();
                tracing::warn!(
                    contact = %contact.masked(),
                    error = %ErrorChain(&problem),
                    "write sent upstream unannounced (write_policy best_effort): other \
                     instances may answer the older status from their caches"
                );
                Ok(announced_write)
            }
        }
    }

    /// Tells the other instances to drop `contact` too (an admin purge); `Err` when Redis did
    /// not take it.
    pub async fn announce_purge(&self, contact: &ContactId) -> Result<(), Failure> {
        let purge = Announcement::new(
            &self.member.id,
            messages::Body::Purge {
                contact: contact.as_str().to_owned(),
            },
        );
        let shared_part = self.shared_cache.as_ref().map(|cache| cache.purge(contact));
        self.member.publish(&purge, shared_part).await
    }

    pub fn status(&self) -> ClusterStatus {
        let live = self.cache.is_trusted();
        ClusterStatus {
            live,
            reason: if live {
                None
            } else {
                Some(self.member.problem().unwrap_or_else(|| {
                    "no heartbeat came back within cluster.max_staleness_ms".to_owned()
                }))
            },
            warning: self.member.warning(),
        }
    }

    /// Sets `consent_proxy_cluster_connected` from the cache's trust now (before a scrape).
    pub fn refresh_gauge(&self) {
        self.member
            .metrics
            .connected
            .set(i64::from(self.cache.is_trusted()));
    }
}

/// Where the feed finds Redis: `cluster.redis_url`, or the master the sentinels name.
fn target(settings: &ClusterSettings) -> Result<feed::Target, redis::RedisError> {
    let roots = settings.tls_roots_pem.as_deref();
    if let Some(sentinels) = &settings.sentinel {
        let sentinels =
            sentinel::Sentinels::new(sentinels, settings.redis_password.clone(), roots)?;
        return Ok(feed::Target::Sentinel(Arc::new(sentinels)));
    }
    let client = client(&settings.redis_url, settings.redis_password.as_ref(), roots)?;
    Ok(feed::Target::Direct(Box::new(client)))
}

/// A client of the Redis (or sentinel) at `url` with `password`; with `rediss://`, trusting
/// `roots` (`egress.ca_file`) instead of the built-in roots when given.
fn client(
    url: &str,
    password: Option<&Secret>,
    roots: Option<&[u8]>,
) -> Result<redis::Client, redis::RedisError> {
    let mut info = url.into_connection_info()?;
    if let Some(password) = password {
        let redis = info
            .redis_settings()
            .clone()
            .set_password(password.expose());
        info = info.set_redis_settings(redis);
    }
    match roots {
        Some(roots) if url.starts_with("rediss://") => {
            let roots = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(roots.to_vec()),
            };
            redis::Client::build_with_tls(info, roots)
        }
        _ => redis::Client::open(info),
    }
}

/// A write announced (or, under `best_effort`, attempted) as pending; its outcome must be
/// announced with [`AnnouncedWrite::finish`].
pub struct AnnouncedWrite {
    member: Arc<Member>,
    write: u64,
    contact: ContactId,
    /// Its part in the shared tier, with `cluster.shared_cache`.
    tier: Option<(Arc<SharedCache>, SharedWrite)>,
}

impl AnnouncedWrite {
    /// Announces how the write ended. When Redis does not take it, the other instances drop
    /// the contact when the pending announcement expires.
    pub async fn finish(self, outcome: WriteOutcome) {
        let member = &self.member;
        let message = Announcement::done(&member.id, self.write, &self.contact, outcome);
        let shared_part = self
            .tier
            .as_ref()
            .map(|(cache, write)| cache.end_write(write, &self.contact, outcome));
        if let Err(problem) = member.publish(&message, shared_part).await {
            member.metrics.outcome_failed.inc();
            tracing::warn!(
                contact = %self.contact.masked(),
                error = %ErrorChain(&problem),
                "a write's outcome could not be announced: the other instances drop the \
                 contact when its pending announcement expires"
            );
        }
    }
}
