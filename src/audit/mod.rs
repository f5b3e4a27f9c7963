//! The audit trail (`[audit]`): a durable, tamper-evident record of every consent write, with
//! its caller, request id, the status known before, and upstream's outcome (rule 7 of docs/CONSISTENCY.md).
//!
//! - `mod` (here): [`Audit`], what the write path uses: [`Audit::begin`] makes a record durable
//!   as pending before the PUT goes upstream (or refuses the PUT, `write_policy = "require"`),
//!   [`PendingRecord::complete`] records its outcome after;
//! - `record`: entries (the immutable rows: a record's pending entry and its completion) and
//!   records (what readers see), times as RFC 3339;
//! - `chain`: the keyed hash chain over each instance's entries, and its verification;
//! - `writer`: the one task per instance that appends to its chain, in group commits;
//! - `store`: the store trait (`open` opens the configured one); `sqlite` (a local file) and `postgres` (a fleet's one table,
//!   with `pg_tls`: rustls for `sslmode`), sharing their SQL in `sql`;
//! - `maintenance`: pending records left by a crash resolved as unknown, retention, the
//!   store's health;
//! - `cli`: `consent-proxy audit export` and `audit verify`;
//! - `metrics`.
//!
//! The store holds contact ids in full (that is its purpose); logs and metrics never do.

mod chain;
pub mod cli;
mod maintenance;
mod metrics;
mod open;
mod pg_tls;
mod postgres;
pub mod record;
mod sql;
mod sqlite;
mod store;
mod writer;

use std::sync::Arc;

use prometheus::Registry;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::auth::AuthMethod;
use crate::config::{AuditStoreSettings, Settings, WritePolicy};
use crate::consent::{ConsentStatus, ContactId};
use crate::error::{ErrorChain, Failure, ProxyError};
pub use metrics::AuditMetrics;
pub use record::{Outcome, Record};

use chain::ChainKeys;
use record::{now_us, Entry, EntryKind};
use store::Store;
use writer::{Health, Job, Writer};

/// The most records `GET /admin/audit/contacts/{id}` returns (the newest).
pub const HISTORY_LIMIT: i64 = 1000;

/// The audit trail of a running proxy. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: mpsc::UnboundedSender<Job>,
    store: Arc<dyn Store>,
    /// This process's name in the records, and its chain's.
    instance: String,
    policy: WritePolicy,
    metrics: AuditMetrics,
    health: Arc<Health>,
    /// The store's `db.system.name` in OpenTelemetry's database conventions.
    db_system: &'static str,
}

/// Why auditing could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit store")]
pub struct AuditStartError(#[source] Failure);

/// The audit's background tasks, stopped after the listeners have drained.
pub struct AuditTasks {
    writer: JoinHandle<()>,
    maintenance: JoinHandle<()>,
    stop: watch::Sender<bool>,
    jobs: mpsc::UnboundedSender<Job>,
}

impl AuditTasks {
    /// Writes what is queued (the last outcomes), then stops.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.maintenance.await;
        let _ = self.jobs.send(Job::Stop);
        let _ = self.writer.await;
    }
}

/// What a PUT's pending record says.
pub struct Draft {
    pub contact: ContactId,
    pub request_id: String,
    pub client: String,
    pub auth: AuthMethod,
    pub status: ConsentStatus,
    /// The status the proxy knew before (its cache), if any.
    pub previous: Option<ConsentStatus>,
}

/// A durable pending record, to be completed with the write's outcome. Dropped uncompleted
/// (the write's task failed), it is completed as unknown.
pub struct PendingRecord {
    audit: Audit,
    id: String,
    completed: bool,
}

impl PendingRecord {
    /// Records the outcome (queued for the chain writer; the caller does not wait for it).
    pub fn complete(mut self, outcome: Outcome, upstream_status: Option<u16>) {
        self.completed = true;
        self.audit
            .complete(&self.id, outcome, upstream_status, true);
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if !self.completed {
            self.audit.complete(&self.id, Outcome::Unknown, None, true);
        }
    }
}

impl Audit {
    /// Opens the store (creating and migrating its schema), resolves what a crash left pending
    /// and starts the chain writer and the maintenance task. `None` unless `audit.enabled`.
    pub async fn start(
        settings: &Settings,
        registry: &Registry,
    ) -> Result<Option<(Audit, AuditTasks)>, AuditStartError> {
        let request_timeout = settings.server.request_timeout;
        let extra_roots = settings.egress.extra_roots.as_ref();
        let extra_roots = extra_roots.map_or(&[][..], |r| &r.certificates[..]);
        let settings = &settings.audit;
        let (true, Some(store_settings), Some(key)) = (
            settings.enabled,
            settings.store.as_ref(),
            ChainKeys::from_secrets(&settings.chain_keys)
                .current()
                .cloned(),
        ) else {
            return Ok(None);
        };
        let store = open::open(store_settings, extra_roots)
            .await
            .map_err(AuditStartError)?;
        let metrics = AuditMetrics::register(registry);
        let health = Arc::new(Health::default());
        let instance = instance_name();
        let (jobs, receiver) = mpsc::unbounded_channel();
        let writer = tokio::spawn(
            Writer {
                store: store.clone(),
                key,
                chain: instance.clone(),
                metrics: metrics.clone(),
                health: health.clone(),
            }
            .run(receiver),
        );
        let audit = Audit {
            inner: Arc::new(Inner {
                jobs: jobs.clone(),
                store,
                instance,
                policy: settings.write_policy,
                metrics,
                health,
                db_system: match store_settings {
                    AuditStoreSettings::Sqlite { .. } => "sqlite",
                    AuditStoreSettings::Postgres { .. } => "postgresql",
                },
            }),
        };
        let (stop, stopped) = watch::channel(false);
        let maintenance = tokio::spawn(maintenance::run(
            audit.clone(),
            maintenance::Schedule::new(store_settings, request_timeout, settings.retention),
            ChainKeys::from_secrets(&settings.chain_keys),
            stopped,
        ));
        tracing::info!(
            instance = %audit.inner.instance,
            store = store_settings.kind(),
            "audit trail on"
        );
        Ok(Some((
            audit,
            AuditTasks {
                writer,
                maintenance,
                stop,
                jobs,
            },
        )))
    }

    /// The store's `db.system.name` (OpenTelemetry): `sqlite` or `postgresql`.
    pub fn db_system(&self) -> &'static str {
        self.inner.db_system
    }

    /// Makes the PUT's pending record durable before it goes upstream, waiting at most half
    /// the time left before `deadline` (the other half is upstream's). When that fails:
    /// `audit_unavailable` under `write_policy = "require"`; with `best_effort`, `Ok(None)`
    /// (the PUT goes ahead unrecorded). Either way `consent_proxy_audit_failures_total` counts it.
    pub async fn begin(
        &self,
        draft: Draft,
        deadline: Instant,
    ) -> Result<Option<PendingRecord>, ProxyError> {
        let id = format!("{:032x}", rand::random::<u128>());
        let entry = Entry {
            record_id: id.clone(),
            kind: EntryKind::Pending,
            at_us: now_us(),
            contact_id: Some(draft.contact.as_str().to_owned()),
            request_id: Some(draft.request_id),
            client: Some(draft.client),
            auth: Some(draft.auth.as_str().to_owned()),
            status: Some(draft.status.as_str().to_owned()),
            previous: draft.previous.map(|s| s.as_str().to_owned()),
            outcome: None,
            upstream_status: None,
        };
        let (done, durable) = oneshot::channel();
        let now = Instant::now();
        let wait = deadline.saturating_duration_since(now) / 2;
        let result = match self.inner.jobs.send(Job::Pending { entry, done }) {
            Err(_) => Err(Failure::msg("the audit writer has stopped")),
            Ok(()) => match tokio::time::timeout(wait, durable).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(Failure::msg("the audit writer has stopped")),
                Err(_) => Err(Failure::msg(format!(
                    "the audit store did not make the record durable within {} ms",
                    wait.as_millis()
                ))),
            },
        };
        match result {
            Ok(()) => Ok(Some(PendingRecord {
                audit: self.clone(),
                id,
                completed: false,
            })),
            Err(failure) => {
                self.inner.metrics.failures.inc();
                // Should it be committed after all (the wait ran out), it is completed as
                // refused: it was not sent upstream under `require`, and is unrecorded otherwise.
                self.complete(&id, Outcome::Refused, None, false);
                match self.inner.policy {
                    WritePolicy::Require => Err(ProxyError::AuditUnavailable(failure)),
                    WritePolicy::BestEffort => {
                        tracing::warn!(
                            error = %ErrorChain(&failure),
                            "the PUT goes upstream without an audit record \
                             (audit.write_policy = best_effort)"
                        );
                        Ok(None)
                    }
                }
            }
        }
    }

    fn complete(&self, id: &str, outcome: Outcome, upstream_status: Option<u16>, own: bool) {
        let entry = Entry::completion(id.to_owned(), now_us(), outcome, upstream_status);
        if self
            .inner
            .jobs
            .send(Job::Completion { entry, own })
            .is_err()
        {
            tracing::warn!(
                record = %id,
                "the audit writer has stopped: this outcome is not recorded"
            );
        }
    }

    /// A contact's records, newest first (at most [`HISTORY_LIMIT`]).
    pub async fn history(&self, contact: &ContactId) -> Result<Vec<Record>, ProxyError> {
        self.inner
            .store
            .history(contact.as_str().to_owned(), HISTORY_LIMIT)
            .await
            .map_err(ProxyError::AuditUnavailable)
    }

    /// `None` while the store takes writes, else why not (for `/readyz`).
    pub fn problem(&self) -> Option<String> {
        self.inner.health.problem()
    }

    pub fn instance(&self) -> &str {
        &self.inner.instance
    }
}

/// This process's name: the host's name (a pod's, in Kubernetes) and a random suffix, so that
/// a restarted process starts a chain of its own.
fn instance_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "consent-proxy".to_owned());
    format!("{host}-{:08x}", rand::random::<u32>())
}
