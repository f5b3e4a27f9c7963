//! The shared tier's metrics, registered only when `cluster.shared_cache` or
//! `cluster.shared_token` is on. Every series is resolved at registration.

use prometheus::{Histogram, IntCounter, Registry};

use crate::metrics;
use crate::upstream::token::TokenSource;

/// How the shared tier answered a fill (a GET this instance's own cache missed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// An answer was in Redis.
    Hit,
    /// Another instance's fill of the contact was in flight; its answer was waited for.
    Coalesced,
    /// Nothing in Redis: this instance fetched from upstream for the fleet.
    Miss,
    /// An answer in Redis this instance may not take: its read began before a change of the
    /// contact this instance knows of (an entry replayed, or stored by a fill whose keys were
    /// lost mid-way), or it does not open (altered, moved, another key). Fetched from
    /// upstream; replaced in Redis when this fill could take the lock.
    Outdated,
    /// A write of the contact was in flight: fetched from upstream, nothing stored.
    WritePending,
    /// Another instance's fill did not end in time: fetched from upstream, nothing stored.
    LockTimeout,
    /// Redis was not connected, failed or too slow: fetched as if alone.
    Unavailable,
}

impl Lookup {
    const ALL: [Lookup; 7] = [
        Lookup::Hit,
        Lookup::Coalesced,
        Lookup::Miss,
        Lookup::Outdated,
        Lookup::WritePending,
        Lookup::LockTimeout,
        Lookup::Unavailable,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Coalesced => "coalesced",
            Lookup::Miss => "miss",
            Lookup::Outdated => "outdated",
            Lookup::WritePending => "write_pending",
            Lookup::LockTimeout => "lock_timeout",
            Lookup::Unavailable => "unavailable",
        }
    }
}
metrics::assert_in_declaration_order!(Lookup::ALL);

/// A fill's attempt to store its answer in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Stored,
    /// The generation guard refused it: a write was announced since the fill began.
    Refused,
    /// Redis failed or was too slow.
    Failed,
}

impl Store {
    const ALL: [Store; 3] = [Store::Stored, Store::Refused, Store::Failed];

    fn as_str(self) -> &'static str {
        match self {
            Store::Stored => "stored",
            Store::Refused => "refused",
            Store::Failed => "failed",
        }
    }
}
metrics::assert_in_declaration_order!(Store::ALL);

/// Which Redis call a latency is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A fill's first look (and each look while it waits for another instance's fill).
    Lookup,
    /// A fill's store (or its lock given back).
    Store,
    /// The fleet token's reads, lock and store.
    Token,
}

impl Op {
    const ALL: [Op; 3] = [Op::Lookup, Op::Store, Op::Token];

    fn as_str(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Store => "store",
            Op::Token => "token",
        }
    }
}
metrics::assert_in_declaration_order!(Op::ALL);
metrics::assert_in_declaration_order!(TokenSource::ALL);

#[derive(Clone)]
pub struct SharedMetrics {
    lookups: [IntCounter; 7],
    stores: [IntCounter; 3],
    tokens: [IntCounter; 3],
    token_lock_waits: IntCounter,
    latency: [Histogram; 3],
}

impl SharedMetrics {
    pub fn register(registry: &Registry) -> Self {
        let lookups = metrics::counter_vec(
            registry,
            "consent_proxy_shared_cache_lookups_total",
            "Fills (GETs this instance's cache missed) by how the shared tier in Redis answered: \
             hit, coalesced (another instance's fill answered it), miss (fetched upstream for \
             the fleet), outdated (an answer there was older than a change this instance knows \
             of, or did not open: fetched upstream, and replaced when possible), write_pending (a write was in flight: fetched, not stored), \
             lock_timeout (another instance's fill took too long: fetched, not stored), \
             unavailable (Redis not connected, failing or slower than \
             cluster.shared_timeout_ms: fetched as if alone).",
            &["result"],
        );
        let stores = metrics::counter_vec(
            registry,
            "consent_proxy_shared_cache_stores_total",
            "Answers fetched upstream for the shared tier, by what Redis did with them: stored, \
             refused (the generation guard: a write of the contact was announced since the \
             fill began), failed (Redis failed or was too slow).",
            &["result"],
        );
        let tokens = metrics::counter_vec(
            registry,
            "consent_proxy_shared_token_obtained_total",
            "Upstream tokens this instance installed, by where they came from: fleet (read from \
             Redis), renewed (fetched by this instance for the fleet, under the renewal lock), \
             alone (fetched for itself only: Redis unavailable, or the renewing instance too \
             slow).",
            &["source"],
        );
        let latency = metrics::histogram_vec(
            registry,
            "consent_proxy_shared_redis_duration_seconds",
            "Redis calls of the shared tier, by operation: lookup (a fill's look, and each look \
             while it waits for another instance's fill), store (a fill's store or lock \
             release), token (the fleet token's read, lock and store). A call cut off by \
             cluster.shared_timeout_ms counts its timeout.",
            &["op"],
        );
        SharedMetrics {
            lookups: metrics::counters(&lookups, Lookup::ALL.map(Lookup::as_str)),
            stores: metrics::counters(&stores, Store::ALL.map(Store::as_str)),
            tokens: metrics::counters(&tokens, TokenSource::ALL.map(TokenSource::as_str)),
            token_lock_waits: metrics::counter(
                registry,
                "consent_proxy_shared_token_lock_waits_total",
                "Times this instance found the fleet token's renewal lock held by another \
                 instance and waited for its token (lock contention).",
            ),
            latency: Op::ALL.map(|op| latency.with_label_values(&[op.as_str()])),
        }
    }

    pub fn lookup(&self, result: Lookup) {
        self.lookups[result as usize].inc();
    }

    pub fn store(&self, result: Store) {
        self.stores[result as usize].inc();
    }

    pub fn token(&self, source: TokenSource) {
        self.tokens[source as usize].inc();
    }

    pub fn token_lock_wait(&self) {
        self.token_lock_waits.inc();
    }

    pub fn redis_call(&self, op: Op, seconds: f64) {
        self.latency[op as usize].observe(seconds);
    }
}
