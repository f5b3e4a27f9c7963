//! `consent-proxy audit export` and `consent-proxy audit verify`: read the configured store,
//! whether or not the proxy is writing to it.

use std::io::Write;

use super::chain::{Broken, ChainCheck, ChainKeys};
use super::open;
use super::record::{parse_time, Record, CSV_COLUMNS};
use super::store::Store;
use crate::config::{AuditStoreSettings, Settings};
use crate::error::Failure;

/// `--format` of `audit export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
    /// RFC 4180, with a header line.
    Csv,
}

/// What `audit verify` found.
pub enum Verdict {
    Intact { chains: usize, entries: u64 },
    Broken(Broken),
}

async fn open(settings: &Settings) -> Result<std::sync::Arc<dyn Store>, Failure> {
    let Some(store) = &settings.audit.store else {
        return Err(Failure::msg(
            "no audit store is configured (audit.sqlite_path or audit.postgres_url)",
        ));
    };
    if let AuditStoreSettings::Sqlite { path } = store {
        // Reading must not create an empty store where a path was mistyped.
        if !path.exists() {
            return Err(Failure::msg(format!(
                "the audit store '{}' does not exist",
                path.display()
            )));
        }
    }
    let extra_roots = settings.egress.extra_roots.as_ref();
    open::open(store, extra_roots.map_or(&[], |r| &r.certificates[..])).await
}

/// Writes the records that arrived in `[since, until)` to `out`, oldest first; returns how many.
pub async fn export(
    settings: &Settings,
    since: Option<&str>,
    until: Option<&str>,
    format: ExportFormat,
    out: &mut dyn Write,
) -> Result<u64, Failure> {
    let since_us = since.map(parse_time).transpose()?.unwrap_or(i64::MIN);
    let until_us = until.map(parse_time).transpose()?.unwrap_or(i64::MAX);
    let store = open(settings).await?;
    let write_failed = |e| Failure::new("cannot write the export", e);
    if format == ExportFormat::Csv {
        writeln!(out, "{}", CSV_COLUMNS.join(",")).map_err(write_failed)?;
    }
    let mut after = None;
    let mut count = 0;
    loop {
        let page: Vec<Record> = store.export(since_us, until_us, after.clone()).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some((last.at, last.id.clone()));
        for record in &page {
            match format {
                ExportFormat::Jsonl => {
                    let line = serde_json::to_string(record)
                        .map_err(|e| Failure::new("cannot encode a record", e))?;
                    writeln!(out, "{line}")
                }
                ExportFormat::Csv => writeln!(out, "{}", record.to_csv_line()),
            }
            .map_err(write_failed)?;
            count += 1;
        }
    }
    out.flush().map_err(write_failed)?;
    Ok(count)
}

/// Checks every chain from its checkpoint (or beginning) to its head.
pub async fn verify(settings: &Settings) -> Result<Verdict, Failure> {
    let keys = ChainKeys::from_secrets(&settings.audit.chain_keys);
    if keys.current().is_none() {
        return Err(Failure::msg(
            "audit.chain_key_file is not set: the chain cannot be checked without its key",
        ));
    }
    let store = open(settings).await?;
    verify_store(store.as_ref(), &keys).await
}

/// Checks every chain of `store` with `keys`.
pub(super) async fn verify_store(store: &dyn Store, keys: &ChainKeys) -> Result<Verdict, Failure> {
    if let Some(orphan) = store.orphan_chains().await?.into_iter().next() {
        return Ok(Verdict::Broken(Broken {
            chain: orphan,
            seq: None,
            record_id: None,
            problem: "has entries but its chain record (head) was removed".to_owned(),
        }));
    }
    let chains = store.chains().await?;
    let mut entries = 0;
    for info in &chains {
        let mut check = match ChainCheck::start(info, keys) {
            Ok(check) => check,
            Err(broken) => return Ok(Verdict::Broken(broken)),
        };
        let mut after = info.base_seq;
        let mut last = None;
        loop {
            let page = store.rows(info.head.chain.clone(), after).await?;
            let Some(tail) = page.last() else {
                break;
            };
            after = tail.seq;
            for row in &page {
                if let Err(broken) = check.next(row) {
                    return Ok(Verdict::Broken(broken));
                }
            }
            last = page.into_iter().last();
        }
        match check.finish(last.as_ref()) {
            Ok(n) => entries += n,
            Err(broken) => return Ok(Verdict::Broken(broken)),
        }
    }
    Ok(Verdict::Intact {
        chains: chains.len(),
        entries,
    })
}
