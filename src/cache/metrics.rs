//! The cache's metrics, every series resolved once at registration so that neither a hit nor
//! an invalidation looks up a label.

use prometheus::{IntCounter, IntGauge, Registry};

use crate::metrics;

/// How a GET was answered, as sent in `x-cache-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Coalesced,
    Bypass,
    /// Bypassed because the cluster's feed was not confirmed live (`BYPASS` to the caller).
    Unsynced,
    /// Answered from an expired entry because upstream could not answer.
    Stale,
    /// Answered from the cluster's shared tier after this instance's cache missed (`HIT`
    /// to the caller, with `x-cache-tier: shared`).
    SharedHit,
}

impl CacheStatus {
    /// What the access log adds to the `x-cache-status` value (which it logs as `cache`, the
    /// same word the caller saw): `shared` for an answer from the cluster's shared tier
    /// (`x-cache-tier: shared`), `unsynced` for a bypass because the cluster's feed was not
    /// live (the `result` label counting it); nothing for the others.
    pub fn log_detail(self) -> Option<&'static str> {
        match self {
            CacheStatus::Unsynced => Some("unsynced"),
            CacheStatus::SharedHit => Some("shared"),
            _ => None,
        }
    }

    /// The `x-cache-status` value: the contract's HIT, MISS, COALESCED, BYPASS or STALE.
    pub fn header_value(self) -> &'static str {
        match self {
            CacheStatus::Hit | CacheStatus::SharedHit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Coalesced => "COALESCED",
            CacheStatus::Bypass | CacheStatus::Unsynced => "BYPASS",
            CacheStatus::Stale => "STALE",
        }
    }
}

/// Why a cached answer was replaced or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// A PUT through this proxy replaced it.
    Write,
    /// `DELETE /admin/cache/{id}`.
    Purge,
    /// A PUT whose result is unknown (timeout, broken exchange) dropped it.
    UnknownOutcome,
    /// Overlapping PUTs to one contact dropped it (upstream's order is unknown).
    ConcurrentWrites,
    /// Another instance of the cluster announced a write of the contact.
    RemoteWrite,
}

#[derive(Clone)]
pub struct CacheMetrics {
    hit: IntCounter,
    miss: IntCounter,
    coalesced: IntCounter,
    bypass: IntCounter,
    unsynced: IntCounter,
    stale: IntCounter,
    refreshes: IntCounter,
    pub(super) entries: IntGauge,
    write: IntCounter,
    purge: IntCounter,
    unknown_outcome: IntCounter,
    concurrent_writes: IntCounter,
    remote_write: IntCounter,
    cluster_resync: IntCounter,
}

impl CacheMetrics {
    pub fn register(registry: &Registry) -> Self {
        let lookups = metrics::counter_vec(
            registry,
            "consent_proxy_cache_lookups_total",
            "Consent GETs by how the cache answered them: hit, miss, coalesced, bypass (cache \
             disabled), unsynced (bypassed: the cluster's feed was not confirmed live), stale \
             (answered from an expired entry because upstream could not answer).",
            &["result"],
        );
        let invalidations = metrics::counter_vec(
            registry,
            "consent_proxy_cache_invalidations_total",
            "Cached answers replaced or dropped, by reason: write (a PUT replaced it), \
             purge (admin), unknown_outcome (a PUT's result is unknown), \
             concurrent_writes (overlapping PUTs to one contact), remote_write (another \
             instance announced a write), cluster_resync (the whole cache dropped after a gap \
             in the cluster's feed).",
            &["reason"],
        );
        CacheMetrics {
            hit: lookups.with_label_values(&["hit"]),
            miss: lookups.with_label_values(&["miss"]),
            coalesced: lookups.with_label_values(&["coalesced"]),
            bypass: lookups.with_label_values(&["bypass"]),
            unsynced: lookups.with_label_values(&["unsynced"]),
            stale: lookups.with_label_values(&["stale"]),
            refreshes: metrics::counter(
                registry,
                "consent_proxy_cache_refreshes_total",
                "Background refreshes started by a hit near the end of its entry's TTL \
                 (cache.refresh_ahead_s).",
            ),
            entries: metrics::gauge(
                registry,
                "consent_proxy_cache_entries",
                "Consent answers held in the cache.",
            ),
            write: invalidations.with_label_values(&["write"]),
            purge: invalidations.with_label_values(&["purge"]),
            unknown_outcome: invalidations.with_label_values(&["unknown_outcome"]),
            concurrent_writes: invalidations.with_label_values(&["concurrent_writes"]),
            remote_write: invalidations.with_label_values(&["remote_write"]),
            cluster_resync: invalidations.with_label_values(&["cluster_resync"]),
        }
    }

    pub(super) fn lookup(&self, status: CacheStatus) {
        match status {
            CacheStatus::Hit => &self.hit,
            // This instance's cache missed; the shared tier counts its own hits.
            CacheStatus::Miss | CacheStatus::SharedHit => &self.miss,
            CacheStatus::Coalesced => &self.coalesced,
            CacheStatus::Bypass => &self.bypass,
            CacheStatus::Unsynced => &self.unsynced,
            CacheStatus::Stale => &self.stale,
        }
        .inc();
    }

    pub(super) fn refresh_started(&self) {
        self.refreshes.inc();
    }

    pub(super) fn invalidated(&self, reason: Invalidation) {
        match reason {
            Invalidation::Write => &self.write,
            Invalidation::Purge => &self.purge,
            Invalidation::UnknownOutcome => &self.unknown_outcome,
            Invalidation::ConcurrentWrites => &self.concurrent_writes,
            Invalidation::RemoteWrite => &self.remote_write,
        }
        .inc();
    }

    /// A flush dropped `entries` answers.
    pub(super) fn flushed(&self, entries: u64) {
        self.cluster_resync.inc_by(entries);
    }
}
