//! The store behind the trail, as a trait with one implementation per database: SQLite (a local
//! file, one instance) and PostgreSQL (one table for a fleet). Stores only run SQL; the chain's
//! hashing and checking live in `chain`, the same for both.

use futures_util::future::BoxFuture;

use super::chain::{ChainHead, ChainInfo, ChainKey, ChainKeys};
use super::record::{Entry, Record, Row};
use crate::error::Failure;

/// What the store said when it failed (no secret, no contact id in it).
pub type StoreError = Failure;

/// The schema's versions, applied in order, each once (`audit_migrations` records which).
/// Documented in docs/audit.md; the SQL per database is in each store.
pub const MIGRATIONS: [&str; 1] = ["entries, chains and their indexes"];

/// At most this many rows per page when reading a chain or exporting.
pub const PAGE: i64 = 5_000;

/// What an append did.
pub struct Appended {
    /// The chain after it.
    pub head: ChainHead,
    /// Completions not appended because their record was completed already (by another
    /// instance resolving it, for instance).
    pub already_completed: Vec<Entry>,
}

pub trait Store: Send + Sync + 'static {
    /// Appends `entries` to the chain at `head`, in one transaction: all or none.
    fn append(
        &self,
        head: ChainHead,
        key: ChainKey,
        entries: Vec<Entry>,
    ) -> BoxFuture<'_, Result<Appended, StoreError>>;

    /// The chain's head as stored (`None`: no entry yet), after an append whose commit is
    /// unknown.
    fn head(&self, chain: String) -> BoxFuture<'_, Result<Option<ChainHead>, StoreError>>;

    /// A contact's records, newest first, at most `limit`.
    fn history(
        &self,
        contact: String,
        limit: i64,
    ) -> BoxFuture<'_, Result<Vec<Record>, StoreError>>;

    /// Records that arrived in `[since, until)`, oldest first, after `(at, id)` (paging).
    fn export(
        &self,
        since_us: i64,
        until_us: i64,
        after: Option<(i64, String)>,
    ) -> BoxFuture<'_, Result<Vec<Record>, StoreError>>;

    /// Every chain.
    fn chains(&self) -> BoxFuture<'_, Result<Vec<ChainInfo>, StoreError>>;

    /// Chains with entries but no chain row (a chain row deleted).
    fn orphan_chains(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

    /// A chain's rows after `after_seq`, in order, one page.
    fn rows(&self, chain: String, after_seq: i64) -> BoxFuture<'_, Result<Vec<Row>, StoreError>>;

    /// Pending records without a completion that arrived before `before_us`.
    fn abandoned(&self, before_us: i64) -> BoxFuture<'_, Result<Vec<String>, StoreError>>;

    /// Removes every chain's entries up to its last one older than `before_us`, leaving a
    /// signed checkpoint; returns how many entries went.
    fn remove_before(
        &self,
        before_us: i64,
        keys: ChainKeys,
    ) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// A cheap round trip, for readiness.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}
