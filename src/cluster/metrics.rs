//! The cluster's metrics: whether the feed is live, messages, propagation delay, and the
//! writes and gaps that cost coherence or caching. Every series is resolved at registration.

use prometheus::{Histogram, IntCounter, IntGauge, Registry};

use crate::metrics;

#[derive(Clone)]
pub struct ClusterMetrics {
    pub(super) connected: IntGauge,
    pub(super) sent: IntCounter,
    pub(super) received: IntCounter,
    pub(super) propagation: Histogram,
    pub(super) pending_failed: IntCounter,
    pub(super) outcome_failed: IntCounter,
    pub(super) unannounced: IntCounter,
    pub(super) resyncs: IntCounter,
    pub(super) expired: IntCounter,
    pub(super) undecodable: IntCounter,
}

impl ClusterMetrics {
    pub fn register(registry: &Registry) -> Self {
        let messages = metrics::counter_vec(
            registry,
            "consent_proxy_cluster_messages_total",
            "Announcements and heartbeats on the cluster's Redis channel, by direction: sent, \
             received (this instance's own included).",
            &["direction"],
        );
        let announce_failures = metrics::counter_vec(
            registry,
            "consent_proxy_cluster_announce_failures_total",
            "Write announcements Redis did not take in time, by stage: pending (before \
             upstream; the PUT is refused or, with write_policy best_effort, sent anyway), \
             outcome (after upstream; the other instances drop the contact when the pending \
             announcement expires).",
            &["stage"],
        );
        ClusterMetrics {
            connected: metrics::gauge(
                registry,
                "consent_proxy_cluster_connected",
                "1 while the cluster's invalidation feed is confirmed live (this instance \
                 answers from its cache), else 0.",
            ),
            sent: messages.with_label_values(&["sent"]),
            received: messages.with_label_values(&["received"]),
            propagation: metrics::histogram(
                registry,
                "consent_proxy_cluster_propagation_seconds",
                "From a write's announcement by one instance to its application by this one \
                 (by the two instances' clocks).",
            ),
            pending_failed: announce_failures.with_label_values(&["pending"]),
            outcome_failed: announce_failures.with_label_values(&["outcome"]),
            unannounced: metrics::counter(
                registry,
                "consent_proxy_cluster_unannounced_writes_total",
                "PUTs sent upstream without a confirmed announcement (write_policy \
                 best_effort while Redis was unavailable): other instances may answer the \
                 older status from their caches up to cache.ttl_s.",
            ),
            resyncs: metrics::counter(
                registry,
                "consent_proxy_cluster_resyncs_total",
                "Subscriptions to the cluster's channel (the first and every reconnection), \
                 each of which drops the whole cache: announcements may have been missed.",
            ),
            expired: metrics::counter(
                registry,
                "consent_proxy_cluster_expired_writes_total",
                "Pending announcements whose outcome never came (the writer died or lost \
                 Redis): the contact was dropped when they expired.",
            ),
            undecodable: metrics::counter(
                registry,
                "consent_proxy_cluster_undecodable_messages_total",
                "Messages on the cluster's channel this instance could not understand (another \
                 version, or not ours); each drops the whole cache.",
            ),
        }
    }
}
