//! SQL both stores share: the schema, the record view (a pending entry joined with its
//! completion) and the chain's reads and writes, with `$n` placeholders (SQLite reads them as
//! `?n`, see `sqlite::q`), and the mapping of each query's columns to a type.

use super::chain::ChainHead;
use super::record::{Entry, EntryKind, Record, Row};

/// How a database names the column types the schema uses.
pub struct Types {
    /// A 64-bit integer.
    pub bigint: &'static str,
    /// A byte string, and its empty literal.
    pub bytes: &'static str,
    pub empty_bytes: &'static str,
}

/// The schema at each version of [`MIGRATIONS`](super::store::MIGRATIONS), for a database's
/// types (documented in docs/audit.md).
pub fn schema(types: &Types) -> [String; 1] {
    let Types {
        bigint,
        bytes,
        empty_bytes,
    } = types;
    [format!(
        "
CREATE TABLE audit_entries (
    chain TEXT NOT NULL,
    seq {bigint} NOT NULL,
    record_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('pending', 'completion')),
    at_us {bigint} NOT NULL,
    contact_id TEXT,
    request_id TEXT,
    client TEXT,
    auth TEXT,
    status TEXT,
    previous TEXT,
    outcome TEXT,
    upstream_status INTEGER,
    prev_hash {bytes} NOT NULL,
    hash {bytes} NOT NULL,
    PRIMARY KEY (chain, seq)
);
CREATE UNIQUE INDEX audit_entries_record ON audit_entries (record_id, kind);
CREATE INDEX audit_entries_contact ON audit_entries (contact_id, at_us) WHERE kind = 'pending';
CREATE INDEX audit_entries_at ON audit_entries (at_us) WHERE kind = 'pending';
CREATE TABLE audit_chains (
    chain TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    head_seq {bigint} NOT NULL,
    head_hash {bytes} NOT NULL,
    base_seq {bigint} NOT NULL DEFAULT 0,
    base_hash {bytes} NOT NULL DEFAULT {empty_bytes},
    base_mac {bytes} NOT NULL DEFAULT {empty_bytes}
);
"
    )]
}

/// The table of applied versions, created first.
pub fn migrations_table(types: &Types) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS audit_migrations (version INTEGER PRIMARY KEY, \
         description TEXT NOT NULL, applied_at_us {} NOT NULL)",
        types.bigint
    )
}

pub const APPLIED_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM audit_migrations";

pub const RECORD_MIGRATION: &str =
    "INSERT INTO audit_migrations (version, description, applied_at_us) VALUES ($1, $2, $3)";

/// The columns of a [`Record`](super::record::Record), in `record_from` order.
pub const SELECT_RECORDS: &str = "SELECT p.record_id, p.at_us, c.at_us, p.chain, p.contact_id, \
     p.request_id, p.client, p.auth, p.status, p.previous, COALESCE(c.outcome, 'pending'), \
     c.upstream_status \
     FROM audit_entries p LEFT JOIN audit_entries c \
     ON c.record_id = p.record_id AND c.kind = 'completion' \
     WHERE p.kind = 'pending'";

/// A contact's records, newest first: `$1` the contact, `$2` the limit.
pub fn history() -> String {
    format!(
        "{SELECT_RECORDS} AND p.contact_id = $1 ORDER BY p.at_us DESC, p.record_id DESC LIMIT $2"
    )
}

/// Records in `[$1, $2)` after `($3, $4)`, oldest first, one page of `$5`.
pub fn export() -> String {
    format!(
        "{SELECT_RECORDS} AND p.at_us >= $1 AND p.at_us < $2 AND (p.at_us > $3 OR \
         (p.at_us = $3 AND p.record_id > $4)) ORDER BY p.at_us, p.record_id LIMIT $5"
    )
}

/// A chain's rows after `$2`, in order, one page of `$3`.
pub const ROWS: &str =
    "SELECT chain, seq, record_id, kind, at_us, contact_id, request_id, client, \
     auth, status, previous, outcome, upstream_status, prev_hash, hash FROM audit_entries \
     WHERE chain = $1 AND seq > $2 ORDER BY seq LIMIT $3";

/// Inserting one row, columns as in [`ROWS`].
pub const INSERT_ROW: &str = "INSERT INTO audit_entries (chain, seq, record_id, kind, at_us, \
     contact_id, request_id, client, auth, status, previous, outcome, upstream_status, prev_hash, \
     hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)";

/// Moving a chain's head (the row created with the chain's first entry).
pub const UPSERT_HEAD: &str = "INSERT INTO audit_chains (chain, key_id, head_seq, head_hash) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (chain) DO UPDATE SET head_seq = excluded.head_seq, \
     head_hash = excluded.head_hash";

pub const HEAD: &str =
    "SELECT chain, key_id, head_seq, head_hash FROM audit_chains WHERE chain = $1";

pub const CHAINS: &str =
    "SELECT chain, key_id, head_seq, head_hash, base_seq, base_hash, base_mac \
     FROM audit_chains ORDER BY chain";

pub const ORPHAN_CHAINS: &str = "SELECT DISTINCT e.chain FROM audit_entries e \
     LEFT JOIN audit_chains c ON c.chain = e.chain WHERE c.chain IS NULL ORDER BY e.chain";

pub const ABANDONED: &str = "SELECT p.record_id FROM audit_entries p WHERE p.kind = 'pending' \
     AND p.at_us < $1 AND NOT EXISTS (SELECT 1 FROM audit_entries c \
     WHERE c.record_id = p.record_id AND c.kind = 'completion') ORDER BY p.at_us LIMIT 1000";

/// The newest of a chain's entries older than `$2`: where retention cuts.
pub const RETENTION_CUT: &str = "SELECT seq, hash FROM audit_entries WHERE chain = $1 AND seq = \
     (SELECT MAX(seq) FROM audit_entries WHERE chain = $1 AND at_us < $2)";

pub const RETENTION_DELETE: &str = "DELETE FROM audit_entries WHERE chain = $1 AND seq <= $2";

pub const RETENTION_CHECKPOINT: &str = "UPDATE audit_chains SET base_seq = $2, base_hash = $3, \
     base_mac = $4 WHERE chain = $1";

/// One answer row of either store, read by column: what the mappings below need of it, so
/// that each query's columns are mapped to a type once, whichever store ran it.
pub trait Columns {
    type Error;
    fn text(&self, column: usize) -> Result<String, Self::Error>;
    fn maybe_text(&self, column: usize) -> Result<Option<String>, Self::Error>;
    fn int(&self, column: usize) -> Result<i64, Self::Error>;
    fn maybe_int(&self, column: usize) -> Result<Option<i64>, Self::Error>;
    fn maybe_int32(&self, column: usize) -> Result<Option<i32>, Self::Error>;
    fn bytes(&self, column: usize) -> Result<Vec<u8>, Self::Error>;
}

/// Implements [`Columns`] for a store's row type (`$row`) with its typed getter (`$get`) and
/// error type: each method is that getter at the asked type.
macro_rules! impl_columns {
    ($row:ty, $error:ty, $get:ident) => {
        impl $crate::audit::sql::Columns for $row {
            type Error = $error;
            fn text(&self, column: usize) -> Result<String, $error> {
                self.$get(column)
            }
            fn maybe_text(&self, column: usize) -> Result<Option<String>, $error> {
                self.$get(column)
            }
            fn int(&self, column: usize) -> Result<i64, $error> {
                self.$get(column)
            }
            fn maybe_int(&self, column: usize) -> Result<Option<i64>, $error> {
                self.$get(column)
            }
            fn maybe_int32(&self, column: usize) -> Result<Option<i32>, $error> {
                self.$get(column)
            }
            fn bytes(&self, column: usize) -> Result<Vec<u8>, $error> {
                self.$get(column)
            }
        }
    };
}
pub(super) use impl_columns;

/// A row of [`SELECT_RECORDS`].
pub fn record_from<C: Columns + ?Sized>(row: &C) -> Result<Record, C::Error> {
    Ok(Record {
        id: row.text(0)?,
        at: row.int(1)?,
        answered_at: row.maybe_int(2)?,
        instance: row.text(3)?,
        contact_id: row.text(4)?,
        request_id: row.text(5)?,
        client: row.text(6)?,
        auth: row.text(7)?,
        status: row.text(8)?,
        previous: row.maybe_text(9)?,
        outcome: row.text(10)?,
        upstream_status: row.maybe_int32(11)?,
    })
}

/// A row of [`ROWS`].
pub fn row_from<C: Columns + ?Sized>(row: &C) -> Result<Row, C::Error> {
    let kind = row.text(3)?;
    Ok(Row {
        chain: row.text(0)?,
        seq: row.int(1)?,
        entry: Entry {
            record_id: row.text(2)?,
            // An unknown kind is tampering: kept as a completion, whose hash will not match.
            kind: EntryKind::parse(&kind).unwrap_or(EntryKind::Completion),
            at_us: row.int(4)?,
            contact_id: row.maybe_text(5)?,
            request_id: row.maybe_text(6)?,
            client: row.maybe_text(7)?,
            auth: row.maybe_text(8)?,
            status: row.maybe_text(9)?,
            previous: row.maybe_text(10)?,
            outcome: row.maybe_text(11)?,
            upstream_status: row.maybe_int32(12)?,
        },
        prev_hash: row.bytes(13)?,
        hash: row.bytes(14)?,
    })
}

/// A row of [`HEAD`].
pub fn head_from<C: Columns + ?Sized>(row: &C) -> Result<ChainHead, C::Error> {
    Ok(ChainHead {
        chain: row.text(0)?,
        key_id: row.text(1)?,
        seq: row.int(2)?,
        hash: row.bytes(3)?,
    })
}
