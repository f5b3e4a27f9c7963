//! The audit trail's metrics. Every series is resolved at registration; none names a contact.

use prometheus::{Histogram, IntCounter, IntGauge, Registry};

use super::record::Outcome;
use crate::metrics;

#[derive(Clone)]
pub struct AuditMetrics {
    /// Entries made durable, by outcome (indexed like `Outcome::ALL`): `pending` for the
    /// entries written before upstream, the others for completions.
    records: [IntCounter; 4],
    pub(super) failures: IntCounter,
    pub(super) completion_failures: IntCounter,
    pub(super) pending: IntGauge,
    pub(super) up: IntGauge,
    pub(super) commit: Histogram,
    pub(super) removed: IntCounter,
    pub(super) resolved: IntCounter,
}

impl AuditMetrics {
    pub fn register(registry: &Registry) -> Self {
        let records = metrics::counter_vec(
            registry,
            "consent_proxy_audit_records_total",
            "Audit entries made durable, by outcome: pending (written before the PUT goes \
             upstream), applied, refused, unknown (its completion).",
            &["outcome"],
        );
        AuditMetrics {
            records: metrics::counters(&records, Outcome::ALL.map(Outcome::as_str)),
            failures: metrics::counter(
                registry,
                "consent_proxy_audit_failures_total",
                "Pending audit records that could not be made durable (the PUT was refused with \
                 audit_unavailable, or with write_policy best_effort sent unrecorded).",
            ),
            completion_failures: metrics::counter(
                registry,
                "consent_proxy_audit_completion_failures_total",
                "Attempts to write a record's outcome that failed (retried while the instance \
                 runs; a record left pending is resolved as unknown later).",
            ),
            pending: metrics::gauge(
                registry,
                "consent_proxy_audit_pending_records",
                "Records this instance made durable as pending whose outcome is not durable \
                 yet (a PUT in flight, or an outcome waiting for the store).",
            ),
            up: metrics::gauge(
                registry,
                "consent_proxy_audit_store_up",
                "1 while the audit store took this instance's last write or check, else 0.",
            ),
            commit: metrics::histogram(
                registry,
                "consent_proxy_audit_commit_duration_seconds",
                "Time to make one batch of audit entries durable (one transaction).",
            ),
            removed: metrics::counter(
                registry,
                "consent_proxy_audit_retention_removed_total",
                "Audit entries removed by retention (audit.retention_days).",
            ),
            resolved: metrics::counter(
                registry,
                "consent_proxy_audit_abandoned_resolved_total",
                "Pending records left by a crash, resolved as unknown by this instance.",
            ),
        }
    }

    pub(super) fn recorded(&self, outcome: Outcome) {
        self.records[outcome as usize].inc();
    }
}
metrics::assert_in_declaration_order!(Outcome::ALL);
