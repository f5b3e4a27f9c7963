//! The consent operations, independent of HTTP: a read goes through the cache to the
//! consent API; a write goes to the consent API and then through the cache, in its own task
//! so that a caller hanging up cannot leave the cache behind upstream. In cluster mode a
//! write is announced to the other instances before it goes upstream and its outcome after,
//! and with the shared cache a fill looks in the cluster's shared tier before going upstream.

use std::sync::Arc;

use http::HeaderValue;
use prometheus::{IntCounter, Registry};
use tokio::time::Instant;

use crate::audit::{Audit, Draft, Outcome as AuditOutcome};
use crate::auth::AuthMethod;
use crate::cache::{
    CacheStatus, ConsentCache, FillLead, FillResult, FillWaiter, Lookup, Settled, WriteOutcome,
};
use crate::cluster::shared::FillReport;
use crate::cluster::Cluster;
use crate::consent::{consent_status_of, ConsentAnswer};
use crate::consent::{ConsentStatus, ContactId};
use crate::error::{Failure, ProxyError};
use crate::metrics;
use crate::upstream::client::{ConsentApi, LastAttempt};

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

/// Who writes, as the audit trail records it.
pub struct Author {
    /// The client's name (`anonymous` without authentication).
    pub client: String,
    pub auth: AuthMethod,
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

    /// Reads through the cache. When this request's own fetch goes upstream (a miss or a
    /// bypass), its attempts are reported to `upstream`. A hit near the end of its TTL starts
    /// the entry's refresh in the background; a fill upstream cannot answer may be answered
    /// from the cache (`STALE`, see `cache::settle`).
    pub async fn read(
        &self,
        contact: &ContactId,
        request_id: &HeaderValue,
        deadline: Instant,
        upstream: &LastAttempt,
    ) -> Settled {
        // Built only when the fetch runs (a miss, a bypass or a refresh): a hit clones nothing,
        // and cloning a new request id's bytes would allocate a shared copy.
        let fetch = |last: LastAttempt| {
            let api = self.api.clone();
            let contact = contact.clone();
            let request_id = request_id.clone();
            async move { api.get(&contact, &request_id, deadline, &last).await }
        };
        let (cache_status, answer) = match self.cache.lookup(contact) {
            Lookup::Hit(hit) => {
                if let Some(refresh) = hit.refresh {
                    // Straight upstream, also with the shared tier (which would answer with an
                    // entry as old as this one). Its attempts are not this request's: they are
                    // not in its log line.
                    drop(refresh.spawn(fetch(LastAttempt::default())));
                }
                return Settled {
                    status: CacheStatus::Hit,
                    age_s: Some(hit.age_s),
                    answer: Ok(hit.answer),
                    upstream_failure: None,
                };
            }
            Lookup::Join(waiter) => {
                return self
                    .cache
                    .settle(contact, CacheStatus::Coalesced, waiter, deadline)
                    .await
            }
            Lookup::Lead(lead) => {
                let (waiter, report) =
                    self.lead_fill(lead, contact, deadline, fetch(upstream.clone()));
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
            Lookup::Bypass => (CacheStatus::Bypass, fetch(upstream.clone()).await),
            Lookup::Unsynced => (CacheStatus::Unsynced, fetch(upstream.clone()).await),
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
    /// "require"`) and completed with the outcome. In a cluster the write is then announced
    /// (refused with `cluster_unavailable`, upstream not called, when that fails under
    /// `write_policy = "require"`), and its outcome is announced before the answer. The
    /// upstream attempts are reported to `upstream`.
    pub async fn write(
        &self,
        contact: &ContactId,
        status: ConsentStatus,
        request_id: &HeaderValue,
        deadline: Instant,
        upstream: &LastAttempt,
        author: Author,
    ) -> Result<ConsentAnswer, ProxyError> {
        let service = self.clone();
        let contact = contact.clone();
        let request_id = request_id.clone();
        let last = upstream.clone();
        let task = tokio::spawn(async move {
            let record = match &service.audit {
                None => None,
                Some(audit) => {
                    let draft = Draft {
                        contact: contact.clone(),
                        request_id: request_id.to_str().unwrap_or("-").to_owned(),
                        client: author.client,
                        auth: author.auth,
                        status,
                        previous: service.cache.known_status(&contact),
                    };
                    audit.begin(draft, deadline).await?
                }
            };
            let write = service.cache.begin_write(&contact);
            let announced = match &service.cluster {
                None => None,
                Some(cluster) => match cluster.announce_write(&contact).await {
                    Ok(announced) => Some(announced),
                    Err(refused) => {
                        write.finish(WriteOutcome::NotApplied);
                        if let Some(record) = record {
                            record.complete(AuditOutcome::Refused, None);
                        }
                        return Err(refused);
                    }
                },
            };
            let written = service
                .api
                .put(&contact, status, &request_id, deadline, &last)
                .await;
            let outcome = match &written.answer {
                Ok(answer) if answer.status.is_success() => {
                    let status = consent_status_of(&answer.body).unwrap_or(status);
                    service.writes.acknowledged(status);
                    WriteOutcome::Applied(status)
                }
                _ if written.maybe_applied => WriteOutcome::Unknown,
                _ => WriteOutcome::NotApplied,
            };
            write.finish(outcome);
            if let Some(record) = record {
                let upstream_status = written.answer.as_ref().ok().map(|a| a.status.as_u16());
                let audited = match outcome {
                    WriteOutcome::Applied(_) => AuditOutcome::Applied,
                    WriteOutcome::Unknown => AuditOutcome::Unknown,
                    WriteOutcome::NotApplied => AuditOutcome::Refused,
                };
                record.complete(audited, upstream_status);
            }
            if let Some(announced) = announced {
                announced.finish(outcome).await;
            }
            written.answer
        });
        task.await
            .unwrap_or_else(|err| Err(ProxyError::Internal(Failure::new("write task failed", err))))
    }
}
