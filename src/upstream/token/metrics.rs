//! The token metrics: fetches, their duration, the current token's expiry, upstream's
//! rejections of it.

use prometheus::{Histogram, IntCounter, Registry};

use crate::metrics;

#[derive(Clone)]
pub struct TokenMetrics {
    pub(super) fetch_succeeded: IntCounter,
    pub(super) fetch_failed: IntCounter,
    pub(super) expiry: prometheus::Gauge,
    pub(super) fetch_duration: Histogram,
    pub(super) renewed_after_rejection: IntCounter,
    rejected_again: IntCounter,
}

impl TokenMetrics {
    /// Registers the token metrics, every label value present from the start (at 0), so
    /// `increase()` sees the first failure and dashboards are never empty.
    pub fn register(registry: &Registry) -> Self {
        let fetches = metrics::counter_vec(
            registry,
            "consent_proxy_token_fetches_total",
            "Token endpoint requests by result.",
            &["result"],
        );
        let rejections = metrics::counter_vec(
            registry,
            "consent_proxy_token_upstream_rejections_total",
            "Upstream 401 answers to the proxy's token, by what followed: renewed \
             (token dropped and renewed), rejected_again (401 after a renewal, caller got 502).",
            &["outcome"],
        );
        TokenMetrics {
            fetch_succeeded: fetches.with_label_values(&["success"]),
            fetch_failed: fetches.with_label_values(&["failure"]),
            expiry: metrics::float_gauge(
                registry,
                "consent_proxy_token_expiry_timestamp_seconds",
                "Unix time at which the current access token expires (0 = none held).",
            ),
            fetch_duration: metrics::histogram(
                registry,
                "consent_proxy_token_fetch_duration_seconds",
                "Time taken by token endpoint requests.",
            ),
            renewed_after_rejection: rejections.with_label_values(&["renewed"]),
            rejected_again: rejections.with_label_values(&["rejected_again"]),
        }
    }

    pub fn rejected_again(&self) -> &IntCounter {
        &self.rejected_again
    }
}
