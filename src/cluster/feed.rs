//! The feed task: one Redis [`Session`] at a time (a publishing connection and a subscription
//! to the cluster's channel), reconnecting with back-off when it fails. Within a session it
//! applies the other instances' announcements to the cache, sends a heartbeat every
//! `max_staleness / 4`, and trusts the cache until `max_staleness` after sending the latest
//! heartbeat that came back. A new subscription flushes the cache first: whatever was
//! published before it may have been missed. With the shared cache, a session that finds
//! another Redis than the previous one (its run id changed: it restarted, or a replica took
//! over) starts a new epoch of the shared tier first, since Redis may have lost writes.
//!
//! With sentinels (`cluster.sentinels`) a session opens on the master a majority of them names,
//! and with every heartbeat asks them again. What a heartbeat proves then includes "a
//! majority named this master when the question was sent": the cache is trusted until
//! `max_staleness` after the older of the two, and a write is announced only within
//! `max_staleness` of the latest such confirmation. A majority naming another master ends the
//! session (the next one opens on the new master). So an instance left on a replaced master
//! (split brain: it was cut off, or frozen, and came back still a master) stops trusting its
//! cache and announcing writes within `max_staleness` of the failover. The other side of it:
//! a session on a master other than the previous session's (or the process's first) does not
//! trust the cache until every write that may have been announced to the previous master has
//! ended (`max_staleness` plus a pending announcement's lifetime after the sentinels switched),
//! since those writes' announcements never reach the new master. Readers never wait for any of this: they read
//! one atomic deadline.

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
use super::sentinel::{self, NodeAddress, Sentinels};
use super::shared::SharedCache;
use super::{Member, ANNOUNCE_TIMEOUT, CONNECT_TIMEOUT};
use crate::cache::ConsentCache;
use crate::error::{ErrorChain, Failure};
use crate::upstream::backoff::Backoff;

/// Reconnection delays: quick at first (a Redis failover), capped low (the cache is bypassed
/// meanwhile, which costs upstream calls).
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_LAST: Duration = Duration::from_secs(2);

/// Where the sessions' Redis is.
pub(super) enum Target {
    /// `cluster.redis_url`.
    Direct(Box<redis::Client>),
    /// Whichever master a majority of `cluster.sentinels` names.
    Sentinel(Arc<Sentinels>),
}

pub(super) struct Feed {
    pub member: Arc<Member>,
    pub target: Target,
    pub cache: ConsentCache,
    pub shared_cache: Option<Arc<SharedCache>>,
    /// Without a password: safe to log.
    pub redis_url: String,
    pub max_staleness: Duration,
    pub pending_lifetime: Duration,
}

/// While Redis stays unreachable, a reminder at WARN this often; the failures between are at
/// DEBUG (a wrong URL would otherwise log a warning every 2 s, forever).
const STILL_DOWN_WARNING_EVERY: Duration = Duration::from_secs(60);

/// An outage of the feed as the log tells it: the first failure, then a reminder a minute.
#[derive(Default)]
struct Outage {
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

impl Outage {
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
}
/// What goes on from one session to the next.
struct Continuity {
    backoff: Backoff,
    /// How long the feed has been down: whether a failure is worth a warning.
    outage: Outage,
    remote: RemoteWrites,
    /// Heartbeat numbers go on across sessions, so that a late one from an earlier session is
    /// never taken for one of the current session's.
    next_seq: u64,
    redis_seen: RedisSeen,
    /// With sentinels: the master of the latest session.
    master: Option<NodeAddress>,
    /// The latest `maxmemory-policy` warned about.
    memory_policy: Option<String>,
}

/// A majority of the sentinels asked at `sent`, and what it named.
struct Confirmation {
    sent: Instant,
    master: Result<NodeAddress, Failure>,
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
    info_field(publisher, "server", "run_id").await
}

/// `field` of `INFO section`, if Redis answers it within `ANNOUNCE_TIMEOUT`.
async fn info_field(
    publisher: &MultiplexedConnection,
    section: &str,
    field: &str,
) -> Option<String> {
    let mut connection = publisher.clone();
    let info = tokio::time::timeout(
        ANNOUNCE_TIMEOUT,
        redis::cmd("INFO")
            .arg(section)
            .query_async::<String>(&mut connection),
    )
    .await
    .ok()?
    .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|value| value.trim().to_owned())
}

impl Feed {
    pub(super) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // With sentinels an attempt costs a question to each (bounded) and follows a failover
        // at once: no longer apart than a heartbeat, so that writes resume soon after it.
        let last_delay = match self.target {
            Target::Direct(_) => RECONNECT_LAST,
            Target::Sentinel(_) => (self.max_staleness / 4).clamp(RECONNECT_FIRST, RECONNECT_LAST),
        };
        let mut continuity = Continuity {
            backoff: Backoff::new(RECONNECT_FIRST, last_delay),
            outage: Outage::default(),
            remote: RemoteWrites::new(self.pending_lifetime),
            next_seq: 0,
            redis_seen: RedisSeen::NotYet,
            master: None,
            memory_policy: None,
        };
        loop {
            let opened = tokio::select! {
                opened = self.open(&mut continuity) => opened,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            let end = match opened {
                Ok(mut session) => session.run(&mut continuity, &mut shutdown).await,
                Err(problem) => End::Lost(problem),
            };
            self.member.link.clear();
            self.member.confirmed_until(None);
            self.cache.distrust();
            let problem = match end {
                End::Shutdown => return,
                End::Lost(problem) => problem,
            };
            let error = ErrorChain(&problem).to_string();
            match continuity.outage.failed(Instant::now()) {
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
            self.member.set_problem(Some(error));
            let delay = continuity.backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Finds the master (with sentinels), connects and subscribes, and flushes the cache.
    async fn open(&self, continuity: &mut Continuity) -> Result<Session<'_>, Failure> {
        let asked = Instant::now();
        let (client, master) = match &self.target {
            Target::Direct(client) => ((**client).clone(), None),
            Target::Sentinel(sentinels) => {
                let master = sentinels.majority_master().await?;
                (sentinels.node(&master)?, Some(master))
            }
        };
        let (publisher, messages) = self.connect(&client).await?;
        if let Some(master) = &master {
            if !sentinel::is_master(&publisher).await? {
                return Err(Failure::msg(format!(
                    "{master}, which the sentinels name, does not say it is a master (yet)"
                )));
            }
        }
        if let Some(tier) = &self.shared_cache {
            self.same_redis_or_new_epoch(tier, &publisher, &mut continuity.redis_seen)
                .await?;
            tier.time_redis(&publisher, ANNOUNCE_TIMEOUT).await;
        }
        self.check_memory_policy(&publisher, continuity).await;
        // Subscribed: every announcement Redis takes from now on reaches this instance.
        // Whatever came before may have been missed, so the cache forgets it all before it is
        // trusted again (when the first heartbeat comes back).
        self.cache.flush();
        self.member.metrics.resyncs.inc();
        self.member.link.set(publisher.clone());
        let now = Instant::now();
        let trusted_from = match (&self.target, &master) {
            (Target::Sentinel(sentinels), Some(new)) if continuity.master.as_ref() != Some(new) => {
                now + self.unheard_writes_end(sentinels, new).await
            }
            _ => now,
        };
        if let Some(master) = &master {
            tracing::info!(redis = %self.redis_url, %master, "the sentinels' majority names the master");
        }
        continuity.master = master.clone();
        let (publish_failed, publish_failures) = mpsc::channel(1);
        let (confirmed, confirmations) = mpsc::channel(16);
        let mut session = Session {
            feed: self,
            publisher,
            messages,
            master,
            heartbeats: Heartbeats {
                next_seq: continuity.next_seq,
                unanswered: VecDeque::new(),
            },
            publish_failed,
            publish_failures,
            confirmed,
            confirmations,
            latest_echo: None,
            latest_confirmation: None,
            trusted_from,
            live: false,
        };
        if session.master.is_some() {
            // The majority that named this master counts as the first confirmation.
            session.latest_confirmation = Some(asked);
            self.member
                .confirmed_until(Some(asked + self.max_staleness));
        }
        self.member.set_problem(Some(if trusted_from > now {
            format!(
                "a new Redis master; the cache is used again once writes announced to the \
                 previous one have ended ({} ms)",
                (trusted_from - now).as_millis()
            )
        } else {
            "subscribed; waiting for the first heartbeat".to_owned()
        }));
        Ok(session)
    }

    /// Opens the publishing connection and subscribes to the channel, each within
    /// `CONNECT_TIMEOUT`.
    async fn connect(
        &self,
        client: &redis::Client,
    ) -> Result<(MultiplexedConnection, PubSubStream), Failure> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(ANNOUNCE_TIMEOUT));
        let publisher = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|err| Failure::new("cannot connect to Redis", err))?;
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&self.member.channel).await?;
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

    /// How long until every write that may have been announced to a master replaced by `new`
    /// has ended. An instance left on the old master announces writes for at most
    /// `max_staleness` after the sentinels switched (its latest confirmation was asked before),
    /// and each of those ends within a pending announcement's lifetime; their announcements
    /// never reach `new`, so no answer may be cached here until then. Counted from the switch
    /// as the sentinels report it, or from now when they do not say (the process's first
    /// session long after the last failover waits for nothing).
    async fn unheard_writes_end(&self, sentinels: &Sentinels, new: &NodeAddress) -> Duration {
        let unheard_for = self.max_staleness + self.pending_lifetime;
        let since_switch = sentinels.since_switch(new).await.unwrap_or_default();
        unheard_for.saturating_sub(since_switch)
    }

    /// Reads `maxmemory-policy` (`CONFIG GET`, which an ACL or a managed Redis may refuse,
    /// else `INFO memory`) and, when Redis may evict keys while the shared tier keeps answers
    /// there, warns (in the log and `/readyz`): evictions cost the tier its use, never
    /// correctness.
    async fn check_memory_policy(
        &self,
        publisher: &MultiplexedConnection,
        continuity: &mut Continuity,
    ) {
        let policy = memory_policy(publisher).await;
        let evicting = policy
            .as_deref()
            .filter(|policy| *policy != "noeviction" && self.shared_cache.is_some());
        self.member.set_warning(evicting.map(|policy| {
            format!(
                "Redis' maxmemory-policy is {policy}: it may evict the shared tier's keys \
                 (answers are then fetched from upstream again); noeviction keeps them"
            )
        }));
        if policy != continuity.memory_policy {
            if let Some(policy) = evicting {
                tracing::warn!(
                    redis = %self.redis_url,
                    policy,
                    "Redis may evict keys (maxmemory-policy): the shared tier's answers can \
                     vanish, which costs upstream calls (never correctness); noeviction keeps them"
                );
            } else if policy.is_none() {
                tracing::info!(redis = %self.redis_url, "Redis did not tell its maxmemory-policy");
            }
            continuity.memory_policy = policy;
        }
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
                self.member.metrics.undecodable.inc();
                self.cache.flush();
                tracing::warn!(
                    error = %err,
                    "a message on the cluster channel was not understood: the cache was flushed"
                );
                return None;
            }
        };
        let own = announcement.from == self.member.id;
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
        self.member
            .metrics
            .propagation
            .observe(announcement.age_s(unix_us()));
        None
    }
}

/// `maxmemory-policy`, from `CONFIG GET`, else `INFO memory`; `None` when neither answers.
async fn memory_policy(publisher: &MultiplexedConnection) -> Option<String> {
    let mut connection = publisher.clone();
    let config = tokio::time::timeout(
        ANNOUNCE_TIMEOUT,
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async::<Vec<String>>(&mut connection),
    )
    .await;
    if let Ok(Ok(pair)) = config {
        if let [_, policy] = pair.as_slice() {
            return Some(policy.clone());
        }
    }
    info_field(publisher, "memory", "maxmemory_policy").await
}

/// One Redis session: its connections, the heartbeats and (with sentinels) confirmations in
/// flight, and what they proved.
struct Session<'f> {
    feed: &'f Feed,
    publisher: MultiplexedConnection,
    messages: PubSubStream,
    /// With sentinels: the master this session is on.
    master: Option<NodeAddress>,
    heartbeats: Heartbeats,
    publish_failed: mpsc::Sender<RedisError>,
    publish_failures: mpsc::Receiver<RedisError>,
    confirmed: mpsc::Sender<Confirmation>,
    confirmations: mpsc::Receiver<Confirmation>,
    /// When the latest own heartbeat that came back was sent.
    latest_echo: Option<Instant>,
    /// With sentinels: when the latest question that a majority answered with this session's
    /// master was sent.
    latest_confirmation: Option<Instant>,
    /// The cache is not trusted before this (after a master change).
    trusted_from: Instant,
    /// The cache is trusted (as far as the feed last saw).
    live: bool,
}

impl Session<'_> {
    async fn run(
        &mut self,
        continuity: &mut Continuity,
        shutdown: &mut watch::Receiver<bool>,
    ) -> End {
        let max_staleness = self.feed.max_staleness;
        let period = (max_staleness / 4).max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return End::Shutdown,
                _ = ticks.tick() => {
                    if let Err(problem) = self.tick(continuity) {
                        return End::Lost(problem);
                    }
                }
                Some(err) = self.publish_failures.recv() => {
                    return End::Lost(Failure::new("the publishing connection failed", err));
                }
                Some(confirmation) = self.confirmations.recv() => {
                    if let Err(problem) = self.confirmed(confirmation, continuity) {
                        return End::Lost(problem);
                    }
                }
                message = self.messages.next() => {
                    let Some(message) = message else {
                        return End::Lost(Failure::msg("Redis closed the subscription"));
                    };
                    self.feed.member.metrics.received.inc();
                    let payload = message.get_payload_bytes();
                    if let Some(sent) = self.feed.apply(payload, &mut continuity.remote, &mut self.heartbeats) {
                        self.latest_echo = Some(sent);
                        self.refresh_trust(continuity);
                    }
                }
            }
        }
    }

    /// Every period: gives up a connection that brings nothing back, expires remote writes,
    /// notices lapsed trust, sends a heartbeat (and, with sentinels, asks them again).
    fn tick(&mut self, continuity: &mut Continuity) -> Result<(), Failure> {
        let feed = self.feed;
        let now = Instant::now();
        // A connection that brings back nothing for this long is given up, even if open.
        let stall_limit = (feed.max_staleness * 4).max(Duration::from_secs(2));
        if self
            .heartbeats
            .oldest_unanswered()
            .is_some_and(|sent| now.duration_since(sent) > stall_limit)
        {
            return Err(Failure::msg(format!(
                "no heartbeat came back for {} ms",
                stall_limit.as_millis()
            )));
        }
        let expired = continuity.remote.expire(now);
        if expired > 0 {
            feed.member.metrics.expired.inc_by(expired as u64);
            tracing::warn!(
                expired,
                "pending writes of other instances expired without an outcome: \
                 their contacts were dropped"
            );
        }
        if self.live && !feed.cache.is_trusted() {
            self.live = false;
            feed.member.set_problem(Some(self.why_untrusted()));
            tracing::warn!(
                redis = %feed.redis_url,
                "cluster feed not confirmed live: answering from upstream until it is"
            );
        }
        let seq = self.heartbeats.send(now);
        continuity.next_seq = seq;
        self.send_heartbeat(seq);
        if self.master.is_some() {
            self.confirm(now);
        }
        Ok(())
    }

    fn why_untrusted(&self) -> String {
        let max_staleness = self.feed.max_staleness.as_millis();
        match (
            self.master.is_some(),
            self.latest_confirmation,
            self.latest_echo,
        ) {
            (true, confirmed, echoed) if confirmed < echoed => format!(
                "a majority of the sentinels did not confirm the master within \
                 cluster.max_staleness_ms ({max_staleness} ms)"
            ),
            _ => format!(
                "no heartbeat came back within cluster.max_staleness_ms ({max_staleness} ms)"
            ),
        }
    }

    /// Asks the sentinels (the question sent `sent`) without holding up the loop.
    fn confirm(&self, sent: Instant) {
        let Target::Sentinel(sentinels) = &self.feed.target else {
            return;
        };
        let sentinels = sentinels.clone();
        let confirmed = self.confirmed.clone();
        tokio::spawn(async move {
            let master = sentinels.majority_master().await;
            let _ = confirmed.send(Confirmation { sent, master }).await;
        });
    }

    /// A majority's answer: this session's master extends the trust (and the right to
    /// announce writes); another master ends the session; no majority proves nothing.
    fn confirmed(
        &mut self,
        confirmation: Confirmation,
        continuity: &mut Continuity,
    ) -> Result<(), Failure> {
        match confirmation.master {
            Ok(named) if Some(&named) == self.master.as_ref() => {
                if self.latest_confirmation < Some(confirmation.sent) {
                    self.latest_confirmation = Some(confirmation.sent);
                    self.feed
                        .member
                        .confirmed_until(Some(confirmation.sent + self.feed.max_staleness));
                    self.refresh_trust(continuity);
                }
                Ok(())
            }
            Ok(named) => Err(Failure::msg(format!(
                "the sentinels' majority names {named} as the master now, no longer {}",
                self.master
                    .as_ref()
                    .map_or_else(String::new, ToString::to_string)
            ))),
            Err(problem) => {
                tracing::debug!(error = %ErrorChain(&problem), "the sentinels did not confirm the master");
                Ok(())
            }
        }
    }

    /// Trusts the cache until `max_staleness` after what the feed proved last: the latest
    /// heartbeat back (and, with sentinels, the latest confirmation, the older of the two).
    fn refresh_trust(&mut self, continuity: &mut Continuity) {
        let feed = self.feed;
        let proven = if self.master.is_some() {
            self.latest_echo.min(self.latest_confirmation)
        } else {
            self.latest_echo
        };
        let Some(proven) = proven else {
            return;
        };
        let trusted_until = proven + feed.max_staleness;
        let now = Instant::now();
        if trusted_until <= now || now < self.trusted_from {
            return;
        }
        feed.cache.trust_until(trusted_until);
        if !self.live {
            self.live = true;
            continuity.backoff.reset();
            continuity.outage = Outage::default();
            feed.member.set_problem(None);
            tracing::info!(redis = %feed.redis_url, "cluster feed live: answering from the cache");
        }
    }

    /// Publishes heartbeat `seq` without holding up the loop; a failure other than a timeout
    /// (which the stall limit covers) ends the session.
    fn send_heartbeat(&self, seq: u64) {
        let member = self.feed.member.clone();
        let message = Announcement::new(&member.id, Body::Heartbeat { seq }).encode();
        let channel = member.channel.clone();
        let mut publisher = self.publisher.clone();
        let failed = self.publish_failed.clone();
        tokio::spawn(async move {
            match redis::AsyncCommands::publish::<_, _, usize>(&mut publisher, channel, message)
                .await
            {
                Ok(_) => member.metrics.sent.inc(),
                Err(err) if err.is_timeout() => {}
                Err(err) => {
                    let _ = failed.try_send(err);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_warns_once_then_reminds_every_minute() {
        let start = Instant::now();
        let mut outage = Outage::default();
        assert_eq!(outage.failed(start), Report::Lost);
        for s in 1..60 {
            let at = start + Duration::from_secs(s);
            assert_eq!(outage.failed(at), Report::Quiet, "{s} s");
        }
        assert_eq!(
            outage.failed(start + Duration::from_secs(60)),
            Report::StillDown {
                failures: 61,
                down_for: Duration::from_secs(60)
            }
        );
        assert_eq!(
            outage.failed(start + Duration::from_secs(61)),
            Report::Quiet
        );
        // Live again: the next failure is a new outage, warned at once.
        outage = Outage::default();
        assert_eq!(outage.failed(start + Duration::from_secs(62)), Report::Lost);
    }
}
