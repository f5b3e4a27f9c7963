//! The PostgreSQL store: one table for a fleet (each instance appends to its own chain in it,
//! so instances never wait on each other's locks), reached with `tokio-postgres` (async, no
//! blocking pool), over TLS when the URL's `sslmode` asks (`pg_tls`). Two connections, one for
//! the chain writer's transactions and one for reads, each reopened when it breaks; the schema
//! is migrated by whichever instance connects first, under an advisory lock.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard, OnceCell};
use tokio_postgres::{Client, NoTls};

use super::chain::{checkpoint_mac, without_completed, ChainHead, ChainInfo, ChainKey, ChainKeys};
use super::pg_tls::MakeRustls;
use super::record::{now_us, Entry, EntryKind, Record, Row};
use super::sql::{self, head_from, record_from, row_from};
use super::store::{Appended, Store, StoreError, MIGRATIONS, PAGE};
use crate::config::{PostgresUrl, Secret};
use crate::error::{ErrorChain, Failure};

/// Connecting, and each call, give up after this long (a store that hangs fails the PUT's
/// pending record rather than holding the writer forever).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The advisory lock migrations take (any constant the deployment does not use otherwise).
const MIGRATION_LOCK: i64 = 0x636f_6e73_656e_7421;

const TYPES: sql::Types = sql::Types {
    bigint: "BIGINT",
    bytes: "BYTEA",
    empty_bytes: "'\\x'",
};

pub struct PostgresStore {
    url: PostgresUrl,
    password: Option<Secret>,
    tls: Option<MakeRustls>,
    writer: Mutex<Option<Client>>,
    reader: Mutex<Option<Client>>,
    migrated: OnceCell<()>,
}

fn failed(err: tokio_postgres::Error) -> StoreError {
    Failure::new("the PostgreSQL audit store failed", err)
}

/// `call`, given up after [`CALL_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Failure::msg(format!(
                "the PostgreSQL audit store did not answer within {} s",
                CALL_TIMEOUT.as_secs()
            )))
        })
}

impl PostgresStore {
    /// Checks the URL and the TLS roots; the connection is made on first use (a store that is
    /// down when the proxy starts does not stop it from serving GETs).
    pub async fn open(
        url: &str,
        password: Option<Secret>,
        extra_roots: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<PostgresStore, StoreError> {
        let url = PostgresUrl::parse(url).map_err(Failure::msg)?;
        let tls = if url.wants_tls() {
            Some(
                MakeRustls::new(url.root_cert.as_deref(), extra_roots)
                    .map_err(|e| Failure::new("cannot set up TLS to PostgreSQL", e))?,
            )
        } else {
            None
        };
        let store = PostgresStore {
            url,
            password,
            tls,
            writer: Mutex::new(None),
            reader: Mutex::new(None),
            migrated: OnceCell::new(),
        };
        // Try now, so that a reachable store is migrated before the first PUT; a failure is
        // only logged.
        if let Err(err) = store.client(&store.writer).await {
            tracing::warn!(error = %ErrorChain(&err), "the PostgreSQL audit store is unreachable for now");
        }
        Ok(store)
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        let mut config = self.url.config.clone();
        config.connect_timeout(CALL_TIMEOUT);
        config.application_name("consent-proxy");
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        let client = match &self.tls {
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await.map_err(failed)?;
                tokio::spawn(drive(connection));
                client
            }
            None => {
                let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
                tokio::spawn(drive(connection));
                client
            }
        };
        Ok(client)
    }

    /// The connection in `slot`, (re)opened when missing or broken, the schema migrated once.
    async fn client<'a>(
        &'a self,
        slot: &'a Mutex<Option<Client>>,
    ) -> Result<MappedMutexGuard<'a, Client>, StoreError> {
        let mut guard = slot.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            let mut client = bounded(self.connect()).await?;
            self.migrated
                .get_or_try_init(|| bounded(migrate(&mut client)))
                .await?;
            *guard = Some(client);
        }
        MutexGuard::try_map(guard, Option::as_mut)
            .map_err(|_| Failure::msg("no PostgreSQL connection"))
    }
}

/// Runs a connection until it ends; its end (the server gone) shows as a closed client.
async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(err) = connection.await {
        tracing::debug!(error = %ErrorChain(&err), "a PostgreSQL audit connection ended");
    }
}

async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(failed)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(failed)?;
    tx.batch_execute(&sql::migrations_table(&TYPES))
        .await
        .map_err(failed)?;
    let applied: i32 = tx
        .query_one(sql::APPLIED_VERSION, &[])
        .await
        .map_err(failed)?
        .get(0);
    for (index, (description, schema)) in MIGRATIONS.iter().zip(sql::schema(&TYPES)).enumerate() {
        let version = index as i32 + 1;
        if version > applied {
            tx.batch_execute(&schema).await.map_err(failed)?;
            tx.execute(sql::RECORD_MIGRATION, &[&version, description, &now_us()])
                .await
                .map_err(failed)?;
        }
    }
    tx.commit().await.map_err(failed)
}

sql::impl_columns!(tokio_postgres::Row, tokio_postgres::Error, try_get);

fn all<T>(
    rows: Vec<tokio_postgres::Row>,
    convert: fn(&tokio_postgres::Row) -> Result<T, tokio_postgres::Error>,
) -> Result<Vec<T>, StoreError> {
    rows.iter()
        .map(convert)
        .collect::<Result<_, _>>()
        .map_err(failed)
}

impl PostgresStore {
    async fn append_now(
        &self,
        mut head: ChainHead,
        key: ChainKey,
        entries: Vec<Entry>,
    ) -> Result<Appended, StoreError> {
        let mut client = self.client(&self.writer).await?;
        let tx = client.transaction().await.map_err(failed)?;
        let completing: Vec<&str> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Completion)
            .map(|e| e.record_id.as_str())
            .collect();
        let completed: HashSet<String> = if completing.is_empty() {
            HashSet::new()
        } else {
            tx.query(
                "SELECT record_id FROM audit_entries WHERE kind = 'completion' \
                 AND record_id = ANY($1)",
                &[&completing],
            )
            .await
            .map_err(failed)?
            .iter()
            .map(|row| row.get(0))
            .collect()
        };
        let (entries, already_completed) = without_completed(entries, &completed);
        let insert = tx.prepare(sql::INSERT_ROW).await.map_err(failed)?;
        let rows: Vec<Row> = entries.into_iter().map(|e| head.link(&key, e)).collect();
        // Sent together: the connection pipelines them.
        futures_util::future::try_join_all(rows.iter().map(|r| {
            let e = &r.entry;
            let insert = &insert;
            let tx = &tx;
            async move {
                tx.execute(
                    insert,
                    &[
                        &r.chain,
                        &r.seq,
                        &e.record_id,
                        &e.kind.as_str(),
                        &e.at_us,
                        &e.contact_id,
                        &e.request_id,
                        &e.client,
                        &e.auth,
                        &e.status,
                        &e.previous,
                        &e.outcome,
                        &e.upstream_status,
                        &r.prev_hash,
                        &r.hash,
                    ],
                )
                .await
            }
        }))
        .await
        .map_err(failed)?;
        tx.execute(
            sql::UPSERT_HEAD,
            &[&head.chain, &head.key_id, &head.seq, &head.hash],
        )
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        Ok(Appended {
            head,
            already_completed,
        })
    }

    async fn remove_now(&self, before_us: i64, keys: ChainKeys) -> Result<u64, StoreError> {
        let mut client = self.client(&self.writer).await?;
        let chains = client
            .query("SELECT chain, key_id, base_seq FROM audit_chains", &[])
            .await
            .map_err(failed)?;
        let mut removed = 0;
        for chain_row in chains {
            let (chain, key_id, base_seq): (String, String, i64) =
                (chain_row.get(0), chain_row.get(1), chain_row.get(2));
            let Some(key) = keys.by_id(&key_id) else {
                continue;
            };
            let tx = client.transaction().await.map_err(failed)?;
            // The chain's row locked: another instance's retention waits, its appends too
            // (for this one transaction).
            tx.execute(
                "SELECT 1 FROM audit_chains WHERE chain = $1 FOR UPDATE",
                &[&chain],
            )
            .await
            .map_err(failed)?;
            let cut = tx
                .query_opt(sql::RETENTION_CUT, &[&chain, &before_us])
                .await
                .map_err(failed)?;
            let Some((seq, hash)) = cut
                .map(|row| (row.get::<_, i64>(0), row.get::<_, Vec<u8>>(1)))
                .filter(|(seq, _)| *seq > base_seq)
            else {
                continue;
            };
            removed += tx
                .execute(sql::RETENTION_DELETE, &[&chain, &seq])
                .await
                .map_err(failed)?;
            let mac = checkpoint_mac(key, &chain, seq, &hash);
            tx.execute(sql::RETENTION_CHECKPOINT, &[&chain, &seq, &hash, &mac])
                .await
                .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
        }
        Ok(removed)
    }

    /// A read on the reader connection.
    async fn read<T>(
        &self,
        query: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        convert: fn(&tokio_postgres::Row) -> Result<T, tokio_postgres::Error>,
    ) -> Result<Vec<T>, StoreError> {
        bounded(async {
            let client = self.client(&self.reader).await?;
            let rows = client.query(query, params).await.map_err(failed)?;
            all(rows, convert)
        })
        .await
    }
}

impl Store for PostgresStore {
    fn append(
        &self,
        head: ChainHead,
        key: ChainKey,
        entries: Vec<Entry>,
    ) -> BoxFuture<'_, Result<Appended, StoreError>> {
        Box::pin(async move {
            let result = bounded(self.append_now(head, key, entries)).await;
            if result.is_err() {
                // A transaction cut short by the timeout must not be reused.
                *self.writer.lock().await = None;
            }
            result
        })
    }

    fn head(&self, chain: String) -> BoxFuture<'_, Result<Option<ChainHead>, StoreError>> {
        Box::pin(async move {
            let heads = self.read(sql::HEAD, &[&chain], head_from).await?;
            Ok(heads.into_iter().next())
        })
    }

    fn history(
        &self,
        contact: String,
        limit: i64,
    ) -> BoxFuture<'_, Result<Vec<Record>, StoreError>> {
        Box::pin(async move {
            self.read(&sql::history(), &[&contact, &limit], record_from)
                .await
        })
    }

    fn export(
        &self,
        since_us: i64,
        until_us: i64,
        after: Option<(i64, String)>,
    ) -> BoxFuture<'_, Result<Vec<Record>, StoreError>> {
        Box::pin(async move {
            let (after_at, after_id) = after.unwrap_or((i64::MIN, String::new()));
            self.read(
                &sql::export(),
                &[&since_us, &until_us, &after_at, &after_id, &PAGE],
                record_from,
            )
            .await
        })
    }

    fn chains(&self) -> BoxFuture<'_, Result<Vec<ChainInfo>, StoreError>> {
        Box::pin(async move {
            self.read(sql::CHAINS, &[], |row| {
                Ok(ChainInfo {
                    head: head_from(row)?,
                    base_seq: row.try_get(4)?,
                    base_hash: row.try_get(5)?,
                    base_mac: row.try_get(6)?,
                })
            })
            .await
        })
    }

    fn orphan_chains(&self) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            self.read(sql::ORPHAN_CHAINS, &[], |row| row.try_get(0))
                .await
        })
    }

    fn rows(&self, chain: String, after_seq: i64) -> BoxFuture<'_, Result<Vec<Row>, StoreError>> {
        Box::pin(async move {
            self.read(sql::ROWS, &[&chain, &after_seq, &PAGE], row_from)
                .await
        })
    }

    fn abandoned(&self, before_us: i64) -> BoxFuture<'_, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            self.read(sql::ABANDONED, &[&before_us], |row| row.try_get(0))
                .await
        })
    }

    fn remove_before(
        &self,
        before_us: i64,
        keys: ChainKeys,
    ) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move { bounded(self.remove_now(before_us, keys)).await })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.read("SELECT 1", &[], |_| Ok(())).await.map(drop) })
    }
}
