//! The SQLite store: a local file in WAL mode with `synchronous = FULL` (a committed pending
//! record survives a power cut). `rusqlite` is blocking, so every call runs on tokio's blocking
//! pool; one connection writes (the instance's chain writer is its only user) and one reads
//! (the admin route, export, verify), so reads never wait behind an fsync.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::chain::{checkpoint_mac, without_completed, ChainHead, ChainInfo, ChainKey, ChainKeys};
use super::record::{Entry, EntryKind, Record, Row};
use super::sql;
use super::store::{Appended, Store, StoreError, MIGRATIONS, PAGE};
use crate::error::Failure;

/// How long a call waits for a lock another process holds (`audit export` reading, say).
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

const TYPES: sql::Types = sql::Types {
    bigint: "INTEGER",
    bytes: "BLOB",
    empty_bytes: "x''",
};

pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
}

/// The shared SQL with SQLite's numbered placeholders: `?N` binds the N-th parameter as
/// PostgreSQL's `$N` does, where SQLite's `$N` would be a name numbered by first appearance.
fn q(sql: &str) -> String {
    sql.replace('$', "?")
}

fn failed(err: rusqlite::Error) -> StoreError {
    Failure::new("the SQLite audit store failed", err)
}

/// Runs `f` with `conn` on the blocking pool.
fn blocking<T, F>(conn: &Arc<Mutex<Connection>>, f: F) -> BoxFuture<'static, Result<T, StoreError>>
where
    T: Send + 'static,
    F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
{
    let conn = conn.clone();
    Box::pin(async move {
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn).map_err(failed)
        })
        .await
        .map_err(|e| Failure::new("the SQLite audit task failed", e))?
    })
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let open = |flags| -> rusqlite::Result<Connection> {
                let conn = Connection::open_with_flags(&path, flags)?;
                conn.busy_timeout(BUSY_TIMEOUT)?;
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "FULL")?;
                Ok(conn)
            };
            let mut writer = open(
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| Failure::new(format!("cannot open '{}'", path.display()), e))?;
            migrate(&mut writer).map_err(failed)?;
            let reader = open(OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(failed)?;
            Ok(SqliteStore {
                writer: Arc::new(Mutex::new(writer)),
                reader: Arc::new(Mutex::new(reader)),
            })
        })
        .await
        .map_err(|e| Failure::new("the SQLite audit task failed", e))?
    }
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(&sql::migrations_table(&TYPES))?;
    let applied: i64 = tx.query_row(sql::APPLIED_VERSION, [], |row| row.get(0))?;
    for (index, (description, schema)) in MIGRATIONS.iter().zip(sql::schema(&TYPES)).enumerate() {
        let version = index as i64 + 1;
        if version > applied {
            tx.execute_batch(&schema)?;
            tx.execute(
                &q(sql::RECORD_MIGRATION),
                params![version, description, super::record::now_us()],
            )?;
        }
    }
    tx.commit()
}

// rusqlite takes mappers over a row of any statement's lifetime, which a generic function
// instantiated for one lifetime is not: these pin the shared mappings to that.
fn record_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    sql::record_from(row)
}

fn row_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    sql::row_from(row)
}

fn head_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<ChainHead> {
    sql::head_from(row)
}

sql::impl_columns!(rusqlite::Row<'_>, rusqlite::Error, get);

impl Store for SqliteStore {
    fn append(
        &self,
        mut head: ChainHead,
        key: ChainKey,
        entries: Vec<Entry>,
    ) -> BoxFuture<'_, Result<Appended, StoreError>> {
        blocking(&self.writer, move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut completed = HashSet::new();
            {
                let mut exists = tx.prepare_cached(
                    "SELECT 1 FROM audit_entries WHERE record_id = ?1 AND kind = 'completion'",
                )?;
                for entry in entries.iter().filter(|e| e.kind == EntryKind::Completion) {
                    if exists.exists(params![entry.record_id])? {
                        completed.insert(entry.record_id.clone());
                    }
                }
            }
            let (entries, already_completed) = without_completed(entries, &completed);
            {
                let mut insert = tx.prepare_cached(&q(sql::INSERT_ROW))?;
                for entry in entries {
                    let r = head.link(&key, entry);
                    let e = &r.entry;
                    insert.execute(params![
                        r.chain,
                        r.seq,
                        e.record_id,
                        e.kind.as_str(),
                        e.at_us,
                        e.contact_id,
                        e.request_id,
                        e.client,
                        e.auth,
                        e.status,
                        e.previous,
                        e.outcome,
                        e.upstream_status,
                        r.prev_hash,
                        r.hash,
                    ])?;
                }
            }
            tx.execute(
                &q(sql::UPSERT_HEAD),
                params![head.chain, head.key_id, head.seq, head.hash],
            )?;
            tx.commit()?;
            Ok(Appended {
                head,
                already_completed,
            })
        })
    }

    fn head(&self, chain: String) -> BoxFuture<'_, Result<Option<ChainHead>, StoreError>> {
        blocking(&self.writer, move |conn| {
            conn.query_row(&q(sql::HEAD), params![chain], head_from)
                .optional()
        })
    }

    fn history(
        &self,
        contact: String,
        limit: i64,
    ) -> BoxFuture<'_, Result<Vec<Record>, StoreError>> {
        blocking(&self.reader, move |conn| {
            let mut stmt = conn.prepare_cached(&q(&sql::history()))?;
            let rows = stmt.query_map(params![contact, limit], record_from)?;
            rows.collect()
        })
    }

    fn export(
        &self,
        since_us: i64,
        until_us: i64,
        after: Option<(i64, String)>,
    ) -> BoxFuture<'_, Result<Vec<Record>, StoreError>> {
        let (after_at, after_id) = after.unwrap_or((i64::MIN, String::new()));
        blocking(&self.reader, move |conn| {
            let mut stmt = conn.prepare_cached(&q(&sql::export()))?;
            let rows = stmt.query_map(
                params![since_us, until_us, after_at, after_id, PAGE],
                record_from,
            )?;
            rows.collect()
        })
    }

    fn chains(&self) -> BoxFuture<'_, Result<Vec<ChainInfo>, StoreError>> {
        blocking(&self.reader, |conn| {
            let mut stmt = conn.prepare_cached(&q(sql::CHAINS))?;
            let rows = stmt.query_map([], |row| {
                Ok(ChainInfo {
                    head: head_from(row)?,
                    base_seq: row.get(4)?,
                    base_hash: row.get(5)?,
                    base_mac: row.get(6)?,
                })
            })?;
            rows.collect()
        })
    }

    fn orphan_chains(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        blocking(&self.reader, |conn| {
            let mut stmt = conn.prepare_cached(&q(sql::ORPHAN_CHAINS))?;
            let rows = stmt.query_map([], |row| row.get(0))?;
            rows.collect()
        })
    }

    fn rows(&self, chain: String, after_seq: i64) -> BoxFuture<'_, Result<Vec<Row>, StoreError>> {
        blocking(&self.reader, move |conn| {
            let mut stmt = conn.prepare_cached(&q(sql::ROWS))?;
            let rows = stmt.query_map(params![chain, after_seq, PAGE], row_from)?;
            rows.collect()
        })
    }

    fn abandoned(&self, before_us: i64) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        blocking(&self.reader, move |conn| {
            let mut stmt = conn.prepare_cached(&q(sql::ABANDONED))?;
            let rows = stmt.query_map(params![before_us], |row| row.get(0))?;
            rows.collect()
        })
    }

    fn remove_before(
        &self,
        before_us: i64,
        keys: ChainKeys,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        blocking(&self.writer, move |conn| {
            let chains: Vec<(String, String, i64)> = {
                let mut stmt = conn.prepare("SELECT chain, key_id, base_seq FROM audit_chains")?;
                let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let mut removed = 0;
            for (chain, key_id, base_seq) in chains {
                let Some(key) = keys.by_id(&key_id) else {
                    continue;
                };
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let cut: Option<(i64, Vec<u8>)> = tx
                    .query_row(&q(sql::RETENTION_CUT), params![chain, before_us], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                    .optional()?;
                let Some((seq, hash)) = cut.filter(|(seq, _)| *seq > base_seq) else {
                    continue;
                };
                removed += tx.execute(&q(sql::RETENTION_DELETE), params![chain, seq])? as u64;
                let mac = checkpoint_mac(key, &chain, seq, &hash);
                tx.execute(
                    &q(sql::RETENTION_CHECKPOINT),
                    params![chain, seq, hash, mac],
                )?;
                tx.commit()?;
            }
            Ok(removed)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        // Through the writer: a store that cannot take a write is not healthy. `BEGIN
        // IMMEDIATE` takes the write lock without writing anything.
        blocking(&self.writer, |conn| {
            conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::ChainKeys;
    use crate::audit::cli::{verify_store, Verdict};
    use crate::audit::record::Outcome;
    use crate::config::Secret;

    fn pending(id: &str, at_us: i64) -> Entry {
        Entry {
            record_id: id.into(),
            kind: EntryKind::Pending,
            at_us,
            contact_id: Some("+15550001".into()),
            request_id: Some("req".into()),
            client: Some("rw".into()),
            auth: Some("api_key".into()),
            status: Some("CONSENTED".into()),
            previous: None,
            outcome: None,
            upstream_status: None,
        }
    }

    async fn verdict(store: &SqliteStore, keys: &ChainKeys) -> Result<u64, String> {
        match verify_store(store, keys).await.unwrap() {
            Verdict::Intact { entries, .. } => Ok(entries),
            Verdict::Broken(broken) => Err(broken.to_string()),
        }
    }

    #[tokio::test]
    async fn retention_removes_old_entries_and_the_chain_still_verifies() {
        let dir = std::env::temp_dir().join(format!("audit-unit-{:x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).unwrap();
        let store = SqliteStore::open(&dir.join("a.sqlite")).await.unwrap();
        let keys = ChainKeys::from_secrets(&[Secret::new("k".repeat(32))]);
        let key = keys.current().unwrap().clone();
        let mut head = ChainHead::genesis("one", &key);
        for i in 0..10 {
            let entries = vec![
                pending(&format!("r{i}"), i * 100),
                Entry::completion(format!("r{i}"), i * 100 + 50, Outcome::Applied, Some(200)),
            ];
            head = store.append(head, key.clone(), entries).await.unwrap().head;
        }
        assert_eq!(verdict(&store, &keys).await, Ok(20));
        // Everything that arrived before 450: records 0 to 4, their completions, and record 4's
        // completion (at 450) goes with them only if older; it is not.
        let removed = store.remove_before(450, keys.clone()).await.unwrap();
        assert_eq!(removed, 9);
        assert_eq!(verdict(&store, &keys).await, Ok(11));
        // Completing a record twice is refused by the store, not by luck.
        let again = vec![Entry::completion("r9".into(), 2000, Outcome::Unknown, None)];
        let appended = store.append(head, key.clone(), again).await.unwrap();
        assert_eq!(appended.already_completed.len(), 1);
        assert_eq!(verdict(&store, &keys).await, Ok(11));
        // Retention itself cannot be faked: a checkpoint moved without the key is found.
        let conn = Connection::open(dir.join("a.sqlite")).unwrap();
        conn.execute("DELETE FROM audit_entries WHERE seq = 10", [])
            .unwrap();
        conn.execute("UPDATE audit_chains SET base_seq = 10", [])
            .unwrap();
        let broken = verdict(&store, &keys).await.unwrap_err();
        assert!(broken.contains("checkpoint"), "{broken}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
