//! The consent operations, independent of HTTP: a read goes through the cache to the
//! consent API; a write goes to the consent API and then through the cache, in its own task
//! so that a caller hanging up cannot leave the cache behind upstream. In cluster mode a
//! write is announced to the other instances before it goes upstream and its outcome after,
//! and with the shared cache a fill looks in the cluster's shared tier before going upstream.
//! With the audit trail on, a write's pending record is made durable before anything else, and
//! completed with its outcome.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus::{IntCounter, Registry};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::audit::{Audit, Draft, Outcome as AuditOutcome};
use crate::auth::AuthMethod;
use crate::cache::{
    CacheStatus, ConsentCache, FillLead, FillResult, FillWaiter, Hit, Lookup, Settled,
};
use crate::cluster::shared::FillReport;
use crate::cluster::{Cluster, ClusterStatus};
use crate::consent::{consent_status_of, ConsentAnswer};
use crate::consent::{ConsentStatus, ContactId, WriteOutcome};
use crate::error::{ErrorChain, Failure, ProxyError};
use crate::metrics;
use crate::otel::{Span, SpanKind};
use crate::request::RequestContext;
use crate::upstream::client::ConsentApi;

#[derive(Clone)]
pub struct WriteMetrics {
    /// Acknowledged writes, one counter per status (indexed like `ConsentStatus::ALL`).
    by_status: [IntCounter; 4],
}

impl WriteMetrics {
    pub fn register(registry: &Registry) -> Self {
        let writes = metrics::counter_vec(
            registry,
            "consent_proxy_consent_writes_total",
            "Consent writes acknowledged by upstream (2xx), by the status written.",
            &["status"],
        );
        WriteMetrics {
            by_status: metrics::counters(&writes, ConsentStatus::ALL.map(ConsentStatus::as_str)),
        }
    }

    fn acknowledged(&self, status: ConsentStatus) {
        self.by_status[status as usize].inc();
    }
}
metrics::assert_in_declaration_order!(ConsentStatus::ALL);

/// A GET's read, begun by [`ConsentService::begin_read`].
pub enum Read {
    /// Answered from the cache at once.
    Settled(Settled),
    /// Waiting for a fill, or for upstream: [`ConsentService::finish_read`].
    Pending(PendingRead),
}

/// A read that waits: the cache's lookup, and the lookup's span, which lasts until the GET
/// is settled.
pub struct PendingRead {
    lookup: Lookup,
    span: Span,
}

/// How the cache answered, on the lookup's span.
fn describe_lookup(span: &mut Span, settled: &Settled) {
    if span.is_recording() {
        span.set("consent_proxy.cache.status", settled.status.header_value());
        if let Some(detail) = settled.status.log_detail() {
            span.set("consent_proxy.cache.detail", detail);
        }
    }
}

#[derive(Clone)]
pub struct ConsentService {
    api: Arc<ConsentApi>,
    cache: ConsentCache,
    /// `None`: this instance runs alone.
    cluster: Option<Cluster>,
    /// `None` unless `audit.enabled`.
    audit: Option<Audit>,
    writes: WriteMetrics,
}

impl ConsentService {
    pub fn new(
        api: Arc<ConsentApi>,
        cache: ConsentCache,
        cluster: Option<Cluster>,
        audit: Option<Audit>,
        writes: WriteMetrics,
    ) -> Self {
        ConsentService {
            api,
            cache,
            cluster,
            audit,
            writes,
        }
    }

    /// Begins a GET's read through the cache. A hit is settled at once, with no waiting
    /// (near the end of its TTL it also starts the entry's refresh in the background); any
    /// other lookup is left to [`ConsentService::finish_read`]. When this request's own fetch
    /// goes upstream (a miss or a bypass), its attempts are reported to `request`; a fill
    /// upstream cannot answer may be answered from the cache (`STALE`, see `cache::settle`).
    ///
    /// Two steps so that the HTTP layer can answer a hit without an asynchronous state
    /// machine: a hit's future would be a miss's size, moved several times on its way into
    /// hyper's connection task.
    pub fn begin_read(&self, contact: &ContactId, request: &RequestContext) -> Read {
        // The lookup's span lasts until the GET is settled: a wait for a fill is part of it.
        let mut span = request.trace.child("cache lookup", SpanKind::Internal);
        match self.cache.lookup(contact) {
            Lookup::Hit(hit) => {
                let settled = self.hit(hit, contact, request);
                describe_lookup(&mut span, &settled);
                Read::Settled(settled)
            }
            lookup => Read::Pending(PendingRead { lookup, span }),
        }
    }

    /// Settles a read [`ConsentService::begin_read`] could not: waits for the fill it joins
    /// or leads, or reads upstream when the cache cannot be used.
    pub async fn finish_read(
        &self,
        pending: PendingRead,
        contact: &ContactId,
        request: &RequestContext,
    ) -> Settled {
        let PendingRead { lookup, mut span } = pending;
        let settled = self.settle_lookup(lookup, contact, request).await;
        describe_lookup(&mut span, &settled);
        settled
    }

    /// A hit's answer. Near the end of its TTL it starts the entry's refresh, straight
    /// upstream, also with the shared tier (which would answer with an entry as old as this
    /// one). The refresh's attempts are not this request's: they are not in its log line.
    fn hit(&self, hit: Hit, contact: &ContactId, request: &RequestContext) -> Settled {
        if let Some(refresh) = hit.refresh {
            drop(refresh.spawn(self.upstream_fill(contact, request.detached())));
        }
        Settled {
            status: CacheStatus::Hit,
            age_s: Some(hit.age_s),
            answer: Ok(hit.answer),
            upstream_failure: None,
        }
    }

    /// A fill's upstream read, in its own task: built only when a fill runs (a miss or a
    /// refresh), so a hit clones nothing (cloning a new request id's bytes would allocate a
    /// shared copy).
    fn upstream_fill(
        &self,
        contact: &ContactId,
        mut context: RequestContext,
    ) -> impl Future<Output = FillResult> + Send + 'static {
        let api = self.api.clone();
        let contact = contact.clone();
        async move {
            // The fill's span, parent of its upstream attempts.
            let mut fill = context.trace.child("cache fill", SpanKind::Internal);
            context.trace = fill.handle();
            let result = api.get(&contact, &context).await;
            match &result {
                Ok(answer) => fill.set(
                    "http.response.status_code",
                    i64::from(answer.status.as_u16()),
                ),
                Err(error) => fill.fail(error.code()),
            }
            result
        }
    }

    async fn settle_lookup(
        &self,
        lookup: Lookup,
        contact: &ContactId,
        request: &RequestContext,
    ) -> Settled {
        let deadline = request.deadline;
        let (cache_status, answer) = match lookup {
            Lookup::Hit(hit) => return self.hit(hit, contact, request),
            Lookup::Join(waiter) => {
                return self
                    .cache
                    .settle(contact, CacheStatus::Coalesced, waiter, deadline)
                    .await
            }
            Lookup::Lead(lead) => {
                let (waiter, report) = self.lead_fill(
                    lead,
                    contact,
                    deadline,
                    self.upstream_fill(contact, request.hand_over()),
                );
                let settled = self
                    .cache
                    .settle(contact, CacheStatus::Miss, waiter, deadline)
                    .await;
                let shared_age = report.as_ref().and_then(FillReport::shared_age);
                if let Some(age) = shared_age.filter(|_| settled.status == CacheStatus::Miss) {
                    if settled.answer.is_ok() {
                        return Settled {
                            status: CacheStatus::SharedHit,
                            age_s: Some(age.as_secs() as u32),
                            answer: settled.answer,
                            upstream_failure: None,
                        };
                    }
                }
                return settled;
            }
            Lookup::Bypass => (CacheStatus::Bypass, self.api.get(contact, request).await),
            Lookup::Unsynced => (CacheStatus::Unsynced, self.api.get(contact, request).await),
        };
        Settled {
            status: cache_status,
            age_s: None,
            answer,
            upstream_failure: None,
        }
    }

    /// Runs the fill a miss leads: through the cluster's shared tier when there is one (with
    /// the report that says whether the tier answered), else straight upstream.
    fn lead_fill<F>(
        &self,
        lead: FillLead,
        contact: &ContactId,
        deadline: Instant,
        upstream: F,
    ) -> (FillWaiter, Option<FillReport>)
    where
        F: std::future::Future<Output = FillResult> + Send + 'static,
    {
        match self.cluster.as_ref().and_then(Cluster::shared_cache) {
            None => (lead.spawn(upstream), None),
            Some(tier) => {
                let report = FillReport::default();
                let fill = tier.fill(contact, deadline, upstream, report.clone());
                (lead.spawn_aged(fill), Some(report))
            }
        }
    }

    /// Writes upstream, then updates the cache; answered 2xx only when upstream said 2xx.
    /// With the audit trail on, the write's pending record is made durable first (refused with
    /// `audit_unavailable`, upstream not called, when that fails under `audit.write_policy =
    /// "require"`; `client` is the caller's name in it) and completed with the outcome. In a
    /// cluster the write is then announced (refused with `cluster_unavailable`, upstream not
    /// called, when that fails under `write_policy = "require"`), and its outcome is announced
    /// before the answer. The upstream attempts are reported to `request`.
    ///
    /// The write starts at once, in its own task; the returned [`WriteTask`] resolves to its
    /// answer and, dropped, leaves the write running to its end.
    pub fn write(
        &self,
        contact: &ContactId,
        status: ConsentStatus,
        request: &RequestContext,
        client: &str,
    ) -> WriteTask {
        let service = self.clone();
        let contact = contact.clone();
        let request = request.hand_over();
        let client = client.to_owned();
        let task = tokio::spawn(async move {
            let record = match &service.audit {
                None => None,
                Some(audit) => {
                    let draft = Draft {
                        contact: contact.clone(),
                        request_id: request.id.to_str().unwrap_or("-").to_owned(),
                        client,
                        auth: request.caller.map_or(AuthMethod::None, |c| c.method),
                        status,
                        previous: service.cache.known_status(&contact),
                    };
                    // The pending record, made durable before the write goes upstream.
                    let mut span = request.trace.child("audit write", SpanKind::Client);
                    if span.is_recording() {
                        span.set("db.system.name", audit.db_system());
                        span.set("db.operation.name", "INSERT");
                        span.set("consent_proxy.audit.record", "pending");
                    }
                    let begun = audit.begin(draft, request.deadline).await;
                    match &begun {
                        Ok(Some(_)) => {}
                        Ok(None) => span.fail("not durable; the PUT goes on (best_effort)"),
                        Err(refused) => span.fail(refused.code()),
                    }
                    begun?
                }
            };
            let write = service.cache.begin_write(&contact);
            let announced = match &service.cluster {
                None => None,
                Some(cluster) => {
                    let mut span = announce_span(&request, "pending");
                    match cluster.announce_write(&contact).await {
                        Ok(announced) => Some(announced),
                        Err(refused) => {
                            span.fail(refused.code());
                            write.finish(WriteOutcome::NotApplied);
                            if let Some(record) = record {
                                record.complete(AuditOutcome::Refused, None);
                            }
                            return Err(refused);
                        }
                    }
                }
            };
            let written = service.api.put(&contact, status, &request).await;
            let outcome = match &written.answer {
                Ok(answer) if answer.status.is_success() => {
                    service.writes.acknowledged(status);
                    applied(&contact, status, consent_status_of(&answer.body))
                }
                _ if written.maybe_applied => WriteOutcome::Unknown,
                _ => WriteOutcome::NotApplied,
            };
            write.finish(outcome);
            if let Some(record) = record {
                // By upstream's answer: a 2xx applied the write, whatever the cache makes of it.
                let audited = match &written.answer {
                    Ok(answer) if answer.status.is_success() => AuditOutcome::Applied,
                    _ if written.maybe_applied => AuditOutcome::Unknown,
                    _ => AuditOutcome::Refused,
                };
                let upstream_status = written.answer.as_ref().ok().map(|a| a.status.as_u16());
                record.complete(audited, upstream_status);
            }
            if let Some(announced) = announced {
                let _span = announce_span(&request, "outcome");
                announced.finish(outcome).await;
            }
            written.answer
        });
        WriteTask(task)
    }

    /// Drops the contact's cached answer here and, in a cluster, on the other instances and in
    /// the shared tier. Without Redis they cannot be told, but then they do not answer from
    /// their caches either, and flush them when they reconnect; the shared tier's entry,
    /// though, stays until its TTL unless the purge is repeated once Redis is back (the
    /// warning says so).
    pub async fn purge(&self, contact: &ContactId) {
        self.cache.purge(contact);
        if let Some(cluster) = &self.cluster {
            if let Err(problem) = cluster.announce_purge(contact).await {
                tracing::warn!(
                    contact = %contact.masked(),
                    error = %ErrorChain(&problem),
                    "the purge could not be announced to the other instances (nor applied to the \
                     shared tier, if on): repeat it once Redis is back"
                );
            }
        }
    }

    /// The audit trail, when `audit.enabled` (the admin listener reads histories through it).
    pub fn audit(&self) -> Option<&Audit> {
        self.audit.as_ref()
    }

    /// Brings the gauges read at scrape time up to date: the cache's entries, the cluster's
    /// feed.
    pub fn refresh_gauges(&self) {
        self.cache.refresh_entry_gauge();
        if let Some(cluster) = &self.cluster {
            cluster.refresh_gauge();
        }
    }

    /// The cluster feed's state, in cluster mode.
    pub fn cluster_status(&self) -> Option<ClusterStatus> {
        self.cluster.as_ref().map(Cluster::status)
    }
}

/// What a write upstream acknowledged (2xx) did, given the status its answer names, if any.
/// An answer naming another status than the one written contradicts the acknowledgement: the
/// contact's status is then unknown, as after a timeout, and the cached answer is dropped
/// rather than set to either (docs/ARCHITECTURE.md, "Writes"). The caller still gets
/// upstream's answer as it is.
fn applied(
    contact: &ContactId,
    written: ConsentStatus,
    echoed: Option<ConsentStatus>,
) -> WriteOutcome {
    match echoed {
        Some(echoed) if echoed != written => {
            tracing::warn!(
                contact = %contact.masked(),
                written = %written,
                echoed = %echoed,
                "upstream acknowledged a consent write with another status; the contact's \
                 cached answer is dropped"
            );
            WriteOutcome::Unknown
        }
        _ => WriteOutcome::Applied(written),
    }
}

/// A write running in its own task: awaiting it gives the write's answer.
pub struct WriteTask(JoinHandle<Result<ConsentAnswer, ProxyError>>);

impl Future for WriteTask {
    type Output = Result<ConsentAnswer, ProxyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|joined| {
            joined.unwrap_or_else(|err| {
                Err(ProxyError::Internal(Failure::new("write task failed", err)))
            })
        })
    }
}

/// The span of a write's announcement to the cluster through Redis, `stage` `pending` (before
/// the write goes upstream) or `outcome` (after).
fn announce_span(request: &RequestContext, stage: &'static str) -> Span {
    let mut span = request.trace.child("cluster announce", SpanKind::Client);
    if span.is_recording() {
        span.set("db.system.name", "redis");
        span.set("consent_proxy.announcement", stage);
    }
    span
}
