//! Opening the configured store: the one place that knows both implementations.

use std::sync::Arc;

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::store::{Store, StoreError};
use crate::config::AuditStoreSettings;

/// Opens (creating and migrating) the configured store; PostgreSQL over TLS trusts
/// `extra_roots` (`egress.ca_file`) besides the built-in roots.
pub async fn open(
    settings: &AuditStoreSettings,
    extra_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<Arc<dyn Store>, StoreError> {
    match settings {
        AuditStoreSettings::Sqlite { path } => Ok(Arc::new(SqliteStore::open(path).await?)),
        AuditStoreSettings::Postgres { url, password } => Ok(Arc::new(
            PostgresStore::open(url, password.clone(), extra_roots).await?,
        )),
    }
}
