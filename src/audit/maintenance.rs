//! The audit's housekeeping, in one task: pending records a crash left behind are resolved as
//! `unknown`, old records are removed (`audit.retention_days`), and the store is checked for
//! `/readyz`.
//!
//! Who may resolve a pending record: with SQLite, one instance owns the file, so at start
//! every pending record is a previous run's and is resolved at once. With PostgreSQL another
//! instance may still be waiting for upstream, so a record is resolved (by any instance) only
//! once it is [`RESOLVE_AFTER_TIMEOUTS`] request deadlines old: its own instance has long given
//! up on it by then. Either way the resolution is a completion in the resolver's chain, and a
//! record is completed once (the stores check, and a unique index holds).

use std::time::Duration;

use tokio::sync::watch;

use super::chain::ChainKeys;
use super::record::{now_us, Outcome};
use super::Audit;
use crate::config::AuditStoreSettings;
use crate::error::ErrorChain;

/// A pending record this many request timeouts old is abandoned.
pub const RESOLVE_AFTER_TIMEOUTS: u32 = 3;
/// Retention runs at most this often.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

pub(super) struct Schedule {
    /// How often the task wakes up.
    every: Duration,
    resolve_after: Duration,
    /// Resolve every pending record at start (the store belongs to this instance alone).
    resolve_all_at_start: bool,
    retention: Option<Duration>,
}

impl Schedule {
    pub fn new(
        store: &AuditStoreSettings,
        request_timeout: Duration,
        retention: Option<Duration>,
    ) -> Schedule {
        let resolve_after = request_timeout * RESOLVE_AFTER_TIMEOUTS;
        Schedule {
            every: request_timeout.clamp(Duration::from_millis(500), Duration::from_secs(30)),
            resolve_after,
            resolve_all_at_start: matches!(store, AuditStoreSettings::Sqlite { .. }),
            retention,
        }
    }
}

pub(super) async fn run(
    audit: Audit,
    schedule: Schedule,
    keys: ChainKeys,
    mut stopped: watch::Receiver<bool>,
) {
    let resolve_after_us = i64::try_from(schedule.resolve_after.as_micros()).unwrap_or(i64::MAX);
    let first_cutoff = if schedule.resolve_all_at_start {
        now_us()
    } else {
        now_us().saturating_sub(resolve_after_us)
    };
    resolve_abandoned(&audit, first_cutoff).await;
    let mut last_retention: Option<tokio::time::Instant> = None;
    loop {
        if let Some(retention) = schedule.retention {
            if last_retention.is_none_or(|at| at.elapsed() >= RETENTION_EVERY) {
                last_retention = Some(tokio::time::Instant::now());
                remove_old(&audit, retention, &keys).await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(schedule.every) => {}
            _ = stopped.changed() => return,
        }
        let pinged = audit.inner.store.ping().await;
        audit.inner.health.set(&audit.inner.metrics, &pinged);
        if pinged.is_ok() {
            resolve_abandoned(&audit, now_us().saturating_sub(resolve_after_us)).await;
        }
    }
}

/// Completes every pending record older than `before_us` as unknown.
async fn resolve_abandoned(audit: &Audit, before_us: i64) {
    match audit.inner.store.abandoned(before_us).await {
        Ok(records) => {
            if !records.is_empty() {
                tracing::warn!(
                    records = records.len(),
                    "audit records left pending (an instance stopped before their outcome was \
                     known) resolved as unknown"
                );
            }
            for record in records {
                audit.inner.metrics.resolved.inc();
                audit.complete(&record, Outcome::Unknown, None, false);
            }
        }
        Err(err) => tracing::warn!(
            error = %ErrorChain(&err),
            "cannot look for abandoned audit records"
        ),
    }
}

async fn remove_old(audit: &Audit, retention: Duration, keys: &ChainKeys) {
    let cutoff = now_us().saturating_sub(i64::try_from(retention.as_micros()).unwrap_or(i64::MAX));
    match audit.inner.store.remove_before(cutoff, keys.clone()).await {
        Ok(0) => {}
        Ok(removed) => {
            audit.inner.metrics.removed.inc_by(removed);
            tracing::info!(
                entries = removed,
                "old audit entries removed (audit.retention_days)"
            );
        }
        Err(err) => tracing::warn!(error = %ErrorChain(&err), "audit retention failed"),
    }
}
