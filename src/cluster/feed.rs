//! The feed task: one Redis session at a time (a publishing connection and a subscription to
//! the cluster's channel), reconnecting with back-off when it fails. Within a session it
//! applies the other instances' announcements to the cache, sends a heartbeat every
//! `max_staleness / 4`, and trusts the cache until `max_staleness` after sending the latest
//! heartbeat that came back. A new subscription flushes the cache first: whatever was
//! published before it may have been missed. With the shared cache, a session that finds
//! another Redis than the previous one (its run id changed: it restarted, or a replica took
//! over) starts a new epoch of the shared tier first, since Redis may have lost writes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubStream};
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::messages::{unix_us, Announcement, Body};
use super::remote::RemoteWrites;
use super::shared::SharedCache;
use super::{Shared, ANNOUNCE_TIMEOUT, CONNECT_TIMEOUT};
use crate::cache::ConsentCache;
use crate::error::{ErrorChain, Failure};
use crate::upstream::backoff::Backoff;

/// Reconnection delays: quick at first (a Redis failover), capped low (the cache is bypassed
/// meanwhile, which costs upstream calls).
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_LAST: Duration = Duration::from_secs(2);
/// While Redis stays unreachable, a reminder at WARN this often; the failures between are at
/// DEBUG (a wrong URL would otherwise log a warning every 2 s, forever).
const STILL_DOWN_WARNING_EVERY: Duration = Duration::from_secs(60);

/// The reconnection state across sessions: the back-off, and how long the feed has been down,
/// which decides whether a failure is worth a warning.
struct Reconnects {
    backoff: Backoff,
    /// Since the first failure after the feed was last live (or since start).
    down_since: Option<Instant>,
    failures: u64,
    last_warning: Option<Instant>,
}

/// How a failed session is logged.
#[derive(Debug, PartialEq, Eq)]
enum Report {
    /// The first failure of an outage: a warning.
    Lost,
    /// A reminder: still down after this many failures over this long.
    StillDown { failures: u64, down_for: Duration },
    /// Otherwise: debug only.
    Quiet,
}

impl Reconnects {
    fn new() -> Self {
        Reconnects {
            backoff: Backoff::new(RECONNECT_FIRST, RECONNECT_LAST),
            down_since: None,
            failures: 0,
            last_warning: None,
        }
    }

    fn failed(&mut self, now: Instant) -> Report {
        self.failures += 1;
        let Some(since) = self.down_since else {
            self.down_since = Some(now);
            self.last_warning = Some(now);
            return Report::Lost;
        };
        if self
            .last_warning
            .is_none_or(|warned| now.duration_since(warned) >= STILL_DOWN_WARNING_EVERY)
        {
            self.last_warning = Some(now);
            return Report::StillDown {
                failures: self.failures,
                down_for: now.duration_since(since),
            };
        }
        Report::Quiet
    }

    /// The feed is live: the next failure starts a new outage.
    fn live(&mut self) {
        self.backoff.reset();
        self.down_since = None;
        self.failures = 0;
    }
}

pub(super) struct Feed {
    pub shared: Arc<Shared>,
    pub client: redis::Client,
    pub cache: ConsentCache,
    pub shared_cache: Option<Arc<SharedCache>>,
    /// Without a password: safe to log.
    pub redis_url: String,
    pub max_staleness: Duration,
    pub pending_lifetime: Duration,
}

/// How a session ended.
enum End {
    Shutdown,
    Lost(Failure),
}

/// Heartbeats sent in this session and not yet back, oldest first.
struct Heartbeats {
    next_seq: u64,
    unanswered: VecDeque<(u64, Instant)>,
}

impl Heartbeats {
    fn send(&mut self, now: Instant) -> u64 {
        self.next_seq += 1;
        self.unanswered.push_back((self.next_seq, now));
        self.next_seq
    }

    /// When heartbeat `seq` was sent, if it is one of this session's; older ones that did not
    /// come back are forgotten (they were never taken).
    fn answered(&mut self, seq: u64) -> Option<Instant> {
        while let Some(&(oldest, sent)) = self.unanswered.front() {
            if oldest > seq {
                return None;
            }
            self.unanswered.pop_front();
            if oldest == seq {
                return Some(sent);
            }
        }
        None
    }

    fn oldest_unanswered(&self) -> Option<Instant> {
        self.unanswered.front().map(|&(_, sent)| sent)
    }
}

/// Which Redis the previous session talked to.
enum RedisSeen {
    /// No session yet.
    NotYet,
    /// Its run id (`INFO server`), which changes when it restarts or another node takes over.
    RunId(String),
    /// It would not say.
    Unknown,
}

/// Redis' run id, if it tells (`INFO server` may be refused, e.g. renamed on managed services).
async fn run_id(publisher: &MultiplexedConnection) -> Option<String> {
    let mut connection = publisher.clone();
    let info = tokio::time::timeout(
        ANNOUNCE_TIMEOUT,
        redis::cmd("INFO")
            .arg("server")
            .query_async::<String>(&mut connection),
    )
    .await
    .ok()?
    .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
}

impl Feed {
    pub(super) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut reconnects = Reconnects::new();
        let mut remote = RemoteWrites::new(self.pending_lifetime);
        // Heartbeat numbers go on across sessions, so that a late one from an earlier
        // session is never taken for one of the current session's.
        let mut next_seq = 0;
        let mut redis_seen = RedisSeen::NotYet;
        loop {
            let end = self
                .session(
                    &mut remote,
                    &mut next_seq,
                    &mut redis_seen,
                    &mut shutdown,
                    &mut reconnects,
                )
                .await;
            self.shared.link.clear();
            self.cache.distrust();
            let problem = match end {
                End::Shutdown => return,
                End::Lost(problem) => problem,
            };
            let error = ErrorChain(&problem).to_string();
            match reconnects.failed(Instant::now()) {
                Report::Lost => tracing::warn!(
                    redis = %self.redis_url,
                    error,
                    "cluster feed lost: answering from upstream, writes cannot be announced; \
                     reconnecting (further failures at debug, a reminder every minute)"
                ),
                Report::StillDown { failures, down_for } => tracing::warn!(
                    redis = %self.redis_url,
                    error,
                    failures,
                    down_for_s = down_for.as_secs(),
                    "cluster feed still down: answering from upstream, writes cannot be announced"
                ),
                Report::Quiet => tracing::debug!(
                    redis = %self.redis_url,
                    error,
                    "cluster feed: reconnecting failed"
                ),
            }
            self.shared.set_problem(Some(error));
            let delay = reconnects.backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    async fn session(
        &self,
        remote: &mut RemoteWrites,
        next_seq: &mut u64,
        redis_seen: &mut RedisSeen,
        shutdown: &mut watch::Receiver<bool>,
        reconnects: &mut Reconnects,
    ) -> End {
        let connected = tokio::select! {
            connected = self.connect() => connected,
            _ = shutdown.wait_for(|stop| *stop) => return End::Shutdown,
        };
        let (publisher, mut messages) = match connected {
            Ok(connected) => connected,
            Err(problem) => return End::Lost(problem),
        };
        if let Some(tier) = &self.shared_cache {
            if let Err(problem) = self
                .same_redis_or_new_epoch(tier, &publisher, redis_seen)
                .await
            {
                return End::Lost(problem);
            }
        }
        // Subscribed: every announcement Redis takes from now on reaches this instance.
        // Whatever came before may have been missed, so the cache forgets it all before it is
        // trusted again (when the first heartbeat comes back).
        self.cache.flush();
        self.shared.metrics.resyncs.inc();
        self.shared.link.set(publisher.clone());
        self.shared.set_problem(Some(
            "subscribed; waiting for the first heartbeat".to_owned(),
        ));

        let period = (self.max_staleness / 4).max(Duration::from_millis(1));
        // A connection that brings back nothing for this long is given up, even if open.
        let stall_limit = (self.max_staleness * 4).max(Duration::from_secs(2));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heartbeats = Heartbeats {
            next_seq: *next_seq,
            unanswered: VecDeque::new(),
        };
        let (publish_failed, mut publish_failures) = mpsc::channel::<RedisError>(1);
        let mut live = false;
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return End::Shutdown,
                _ = ticks.tick() => {
                    let now = Instant::now();
                    if heartbeats
                        .oldest_unanswered()
                        .is_some_and(|sent| now.duration_since(sent) > stall_limit)
                    {
                        return End::Lost(Failure::msg(format!(
                            "no heartbeat came back for {} ms",
                            stall_limit.as_millis()
                        )));
                    }
                    let expired = remote.expire(now);
                    if expired > 0 {
                        self.shared.metrics.expired.inc_by(expired as u64);
                        tracing::warn!(
                            expired,
                            "pending writes of other instances expired without an outcome: \
                             their contacts were dropped"
                        );
                    }
                    if live && !self.cache.is_trusted() {
                        live = false;
                        self.shared.set_problem(Some(format!(
                            "no heartbeat came back within cluster.max_staleness_ms ({} ms)",
                            self.max_staleness.as_millis()
                        )));
                        tracing::warn!(
                            redis = %self.redis_url,
                            "cluster feed not confirmed live: answering from upstream until it is"
                        );
                    }
                    let seq = heartbeats.send(now);
                    *next_seq = seq;
                    self.send_heartbeat(seq, &publisher, &publish_failed);
                }
                Some(err) = publish_failures.recv() => {
                    return End::Lost(Failure::new("the publishing connection failed", err));
                }
                message = messages.next() => {
                    let Some(message) = message else {
                        return End::Lost(Failure::msg("Redis closed the subscription"));
                    };
                    self.shared.metrics.received.inc();
                    let Some(sent) = self.apply(message.get_payload_bytes(), remote, &mut heartbeats)
                    else {
                        continue;
                    };
                    let trusted_until = sent + self.max_staleness;
                    if trusted_until > Instant::now() {
                        self.cache.trust_until(trusted_until);
                        if !live {
                            live = true;
                            reconnects.live();
                            self.shared.set_problem(None);
                            tracing::info!(redis = %self.redis_url, "cluster feed live: answering from the cache");
                        }
                    }
                }
            }
        }
    }

    /// Opens the publishing connection and subscribes to the channel, each within
    /// `CONNECT_TIMEOUT`.
    async fn connect(&self) -> Result<(MultiplexedConnection, PubSubStream), Failure> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(ANNOUNCE_TIMEOUT));
        let publisher = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|err| Failure::new("cannot connect to Redis", err))?;
        let subscribe = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.shared.channel).await?;
            Ok::<_, RedisError>(pubsub.into_on_message())
        };
        let messages = tokio::time::timeout(CONNECT_TIMEOUT, subscribe)
            .await
            .map_err(|_| {
                Failure::msg(format!(
                    "subscribing took more than {} ms",
                    CONNECT_TIMEOUT.as_millis()
                ))
            })?
            .map_err(|err| Failure::new("cannot subscribe to the cluster channel", err))?;
        Ok((publisher, messages))
    }

    /// Starts a new epoch of the shared tier when this session's Redis is not the previous
    /// session's: it restarted or failed over, and may have lost writes (announcements of
    /// writes in flight among them). Not on a process's first session: it had no write then.
    async fn same_redis_or_new_epoch(
        &self,
        tier: &SharedCache,
        publisher: &MultiplexedConnection,
        seen: &mut RedisSeen,
    ) -> Result<(), Failure> {
        let run_id = run_id(publisher).await;
        let changed = match (&*seen, &run_id) {
            (RedisSeen::NotYet, _) => false,
            (RedisSeen::RunId(before), Some(now)) => before != now,
            // Which Redis it is cannot be told (INFO refused): assume another.
            _ => true,
        };
        if changed {
            tier.new_epoch(publisher.clone(), ANNOUNCE_TIMEOUT).await?;
            tracing::warn!(
                redis = %self.redis_url,
                "Redis restarted or another node took over: the shared tier starts a new epoch \
                 (its entries are not used, and none stored for a pending write's lifetime)"
            );
        }
        *seen = run_id.map_or(RedisSeen::Unknown, RedisSeen::RunId);
        Ok(())
    }

    /// Publishes heartbeat `seq` without holding up the loop; a failure other than a timeout
    /// (which the stall limit covers) ends the session.
    fn send_heartbeat(
        &self,
        seq: u64,
        publisher: &MultiplexedConnection,
        failed: &mpsc::Sender<RedisError>,
    ) {
        let message = Announcement::new(&self.shared.id, Body::Heartbeat { seq }).encode();
        let channel = self.shared.channel.clone();
        let mut publisher = publisher.clone();
        let failed = failed.clone();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            match redis::AsyncCommands::publish::<_, _, usize>(&mut publisher, channel, message)
                .await
            {
                Ok(_) => shared.metrics.sent.inc(),
                Err(err) if err.is_timeout() => {}
                Err(err) => {
                    let _ = failed.try_send(err);
                }
            }
        });
    }

    /// Applies one message. Returns when this instance sent it, if it is one of this
    /// session's own heartbeats coming back.
    fn apply(
        &self,
        payload: &[u8],
        remote: &mut RemoteWrites,
        heartbeats: &mut Heartbeats,
    ) -> Option<Instant> {
        let announcement = match Announcement::decode(payload) {
            Ok(announcement) => announcement,
            Err(err) => {
                // It might have been about a write: forget everything rather than risk it.
                self.shared.metrics.undecodable.inc();
                self.cache.flush();
                tracing::warn!(
                    error = %err,
                    "a message on the cluster channel was not understood: the cache was flushed"
                );
                return None;
            }
        };
        let own = announcement.from == self.shared.id;
        match &announcement.body {
            Body::Heartbeat { seq } if own => return heartbeats.answered(*seq),
            Body::Heartbeat { .. } => return None,
            // The write's own WriteGuard already applies it here.
            _ if own => return None,
            Body::Pending { write, .. } => {
                let contact = announcement.contact()?;
                let guard = self.cache.begin_remote_write(&contact);
                remote.begin(&announcement.from, *write, guard, Instant::now());
            }
            Body::Done { write, .. } => {
                let contact = announcement.contact()?;
                let outcome = announcement.outcome().ok()?;
                // Without its pending announcement (sent while this instance was not
                // subscribed) the write is begun and ended here, which drops the contact.
                let guard = remote
                    .take(&announcement.from, *write)
                    .unwrap_or_else(|| self.cache.begin_remote_write(&contact));
                guard.finish(outcome);
            }
            Body::Purge { .. } => {
                let contact = announcement.contact()?;
                self.cache.purge(&contact);
                return None;
            }
        }
        self.shared
            .metrics
            .propagation
            .observe(announcement.age_s(unix_us()));
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_warns_once_then_reminds_every_minute() {
        let start = Instant::now();
        let mut reconnects = Reconnects::new();
        assert_eq!(reconnects.failed(start), Report::Lost);
        for s in 1..60 {
            let at = start + Duration::from_secs(s);
            assert_eq!(reconnects.failed(at), Report::Quiet, "{s} s");
        }
        assert_eq!(
            reconnects.failed(start + Duration::from_secs(60)),
            Report::StillDown {
                failures: 61,
                down_for: Duration::from_secs(60)
            }
        );
        assert_eq!(
            reconnects.failed(start + Duration::from_secs(61)),
            Report::Quiet
        );
        // Live again: the next failure is a new outage, warned at once.
        reconnects.live();
        assert_eq!(
            reconnects.failed(start + Duration::from_secs(62)),
            Report::Lost
        );
    }
}
