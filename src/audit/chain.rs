//! The hash chain that makes the trail tamper-evident.
//!
//! Each instance (each process) appends to a chain of its own, so instances sharing one
//! PostgreSQL table never wait for each other: within a chain, entry `seq` carries
//! `hash = HMAC-SHA256(key, prev_hash ‖ chain ‖ seq ‖ the entry's fields)`, where `prev_hash` is
//! the previous entry's hash (32 zero bytes for the first). Editing an entry changes its hash;
//! removing one leaves a gap in `seq` (or a `prev_hash` that names no entry); reordering
//! changes `seq` or `prev_hash`. A completion is its own entry, so outcomes are covered too.
//! Without the key nobody can recompute the hashes after a change.
//!
//! Each chain's head (its last `seq` and hash) is kept beside it, so removing the newest
//! entries is seen too. Retention removes a chain's oldest entries and keeps a checkpoint: the
//! last removed entry's `seq` and hash, signed with the key, from which verification starts.

use std::collections::HashSet;

use ring::hmac;

use super::record::{Entry, Row};
use crate::config::Secret;

/// The hash of "no previous entry".
pub const GENESIS: [u8; 32] = [0; 32];

/// One chain key, known by an id derived from it (stored with each chain, never the key).
#[derive(Clone)]
pub struct ChainKey {
    pub id: String,
    key: hmac::Key,
}

impl ChainKey {
    pub fn new(secret: &[u8]) -> ChainKey {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let tag = hmac::sign(&key, b"consent-proxy audit chain key id");
        ChainKey {
            id: hex::encode(&tag.as_ref()[..8]),
            key,
        }
    }
}

/// The configured keys: the first keys new chains, every one verifies.
#[derive(Clone)]
pub struct ChainKeys(Vec<ChainKey>);

impl ChainKeys {
    pub fn from_secrets(secrets: &[Secret]) -> ChainKeys {
        ChainKeys(
            secrets
                .iter()
                .map(|s| ChainKey::new(s.expose().as_bytes()))
                .collect(),
        )
    }

    /// The key new chains use; `None` when no key is configured.
    pub fn current(&self) -> Option<&ChainKey> {
        self.0.first()
    }

    pub fn by_id(&self, id: &str) -> Option<&ChainKey> {
        self.0.iter().find(|k| k.id == id)
    }
}

/// Where a chain stands: its last entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub chain: String,
    pub key_id: String,
    /// 0 before the first entry.
    pub seq: i64,
    pub hash: Vec<u8>,
}

impl ChainHead {
    pub fn genesis(chain: &str, key: &ChainKey) -> ChainHead {
        ChainHead {
            chain: chain.to_owned(),
            key_id: key.id.clone(),
            seq: 0,
            hash: GENESIS.to_vec(),
        }
    }

    /// Appends `entry`: the row to store, the head moved past it.
    pub fn link(&mut self, key: &ChainKey, entry: Entry) -> Row {
        let seq = self.seq + 1;
        let hash = entry_hash(key, &self.hash, &self.chain, seq, &entry);
        let row = Row {
            chain: self.chain.clone(),
            seq,
            entry,
            prev_hash: std::mem::replace(&mut self.hash, hash.clone()),
            hash,
        };
        self.seq = seq;
        row
    }
}

/// Everything stored about a chain besides its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    pub head: ChainHead,
    /// The retention checkpoint: the last removed entry's seq (0: nothing removed), its hash,
    /// and the key's signature over both.
    pub base_seq: i64,
    pub base_hash: Vec<u8>,
    pub base_mac: Vec<u8>,
}

/// The signature of a retention checkpoint.
pub fn checkpoint_mac(key: &ChainKey, chain: &str, seq: i64, hash: &[u8]) -> Vec<u8> {
    let mut ctx = hmac::Context::with_key(&key.key);
    ctx.update(b"checkpoint\0");
    put(&mut ctx, Some(chain.as_bytes()));
    ctx.update(&seq.to_be_bytes());
    put(&mut ctx, Some(hash));
    ctx.sign().as_ref().to_vec()
}

fn entry_hash(key: &ChainKey, prev: &[u8], chain: &str, seq: i64, e: &Entry) -> Vec<u8> {
    let mut ctx = hmac::Context::with_key(&key.key);
    ctx.update(b"entry\0");
    put(&mut ctx, Some(prev));
    put(&mut ctx, Some(chain.as_bytes()));
    ctx.update(&seq.to_be_bytes());
    put(&mut ctx, Some(e.record_id.as_bytes()));
    put(&mut ctx, Some(e.kind.as_str().as_bytes()));
    ctx.update(&e.at_us.to_be_bytes());
    for field in [
        &e.contact_id,
        &e.request_id,
        &e.client,
        &e.auth,
        &e.status,
        &e.previous,
        &e.outcome,
    ] {
        put(&mut ctx, field.as_deref().map(str::as_bytes));
    }
    match e.upstream_status {
        Some(status) => {
            ctx.update(&[1]);
            ctx.update(&status.to_be_bytes());
        }
        None => ctx.update(&[0]),
    }
    ctx.sign().as_ref().to_vec()
}

/// A field, unambiguously: absent, or present with its length.
fn put(ctx: &mut hmac::Context, field: Option<&[u8]>) {
    match field {
        None => ctx.update(&[0]),
        Some(bytes) => {
            ctx.update(&[1]);
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(bytes);
        }
    }
}

/// The first thing wrong with a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub chain: String,
    /// The entry where the chain stops holding, if there is one.
    pub seq: Option<i64>,
    pub record_id: Option<String>,
    pub problem: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.record_id, self.seq) {
            (Some(record), Some(seq)) => write!(
                f,
                "record {record} (chain {}, entry {seq}): {}",
                self.chain, self.problem
            ),
            _ => write!(f, "chain {}: {}", self.chain, self.problem),
        }
    }
}

/// Checks one chain's entries in `seq` order, fed page by page.
pub struct ChainCheck<'a> {
    info: &'a ChainInfo,
    key: &'a ChainKey,
    expected_seq: i64,
    prev: Vec<u8>,
    pub entries: u64,
}

impl<'a> ChainCheck<'a> {
    /// Starts at the chain's checkpoint (verified) or its beginning.
    pub fn start(info: &'a ChainInfo, keys: &'a ChainKeys) -> Result<ChainCheck<'a>, Broken> {
        let broken = |problem: String| Broken {
            chain: info.head.chain.clone(),
            seq: None,
            record_id: None,
            problem,
        };
        let key = keys.by_id(&info.head.key_id).ok_or_else(|| {
            broken(format!(
                "keyed with key {} that audit.chain_key_file does not hold",
                info.head.key_id
            ))
        })?;
        let prev = if info.base_seq == 0 {
            GENESIS.to_vec()
        } else {
            let mac = checkpoint_mac(key, &info.head.chain, info.base_seq, &info.base_hash);
            if !bool::from(subtle::ConstantTimeEq::ct_eq(&mac[..], &info.base_mac[..])) {
                return Err(broken(format!(
                    "its retention checkpoint (entries up to {}) was altered",
                    info.base_seq
                )));
            }
            info.base_hash.clone()
        };
        Ok(ChainCheck {
            info,
            key,
            expected_seq: info.base_seq + 1,
            prev,
            entries: 0,
        })
    }

    /// The next row of the chain.
    pub fn next(&mut self, row: &Row) -> Result<(), Broken> {
        let broken = |problem: String| Broken {
            chain: row.chain.clone(),
            seq: Some(row.seq),
            record_id: Some(row.entry.record_id.clone()),
            problem,
        };
        if row.seq != self.expected_seq {
            return Err(broken(if row.seq > self.expected_seq {
                format!(
                    "entries {} to {} before it were removed",
                    self.expected_seq,
                    row.seq - 1
                )
            } else {
                "out of order".to_owned()
            }));
        }
        let hash = entry_hash(self.key, &self.prev, &row.chain, row.seq, &row.entry);
        if row.prev_hash != self.prev {
            return Err(broken(
                "does not follow the entry before it (removed, reordered or edited)".to_owned(),
            ));
        }
        if hash != row.hash {
            return Err(broken(
                "was edited (its hash does not match its content)".to_owned(),
            ));
        }
        self.prev = hash;
        self.expected_seq += 1;
        self.entries += 1;
        Ok(())
    }

    /// After the last row: the chain must end where its head says.
    pub fn finish(self, last: Option<&Row>) -> Result<u64, Broken> {
        let head = &self.info.head;
        let ends_at = self.expected_seq - 1;
        if ends_at != head.seq || self.prev != head.hash {
            return Err(Broken {
                chain: head.chain.clone(),
                seq: last.map(|r| r.seq),
                record_id: last.map(|r| r.entry.record_id.clone()),
                problem: if ends_at < head.seq {
                    format!("the entries after it (up to {}) were removed", head.seq)
                } else {
                    format!("the chain's head (entry {}) was altered", head.seq)
                },
            });
        }
        Ok(self.entries)
    }
}

/// Each record is completed once: splits `entries` into those to append and the completions to
/// drop, given the records that already have a completion in the store (a completion earlier
/// in `entries` counts too).
pub fn without_completed(
    entries: Vec<Entry>,
    completed: &HashSet<String>,
) -> (Vec<Entry>, Vec<Entry>) {
    let mut seen = HashSet::new();
    entries.into_iter().partition(|e| {
        e.kind != super::record::EntryKind::Completion
            || (!completed.contains(&e.record_id) && seen.insert(e.record_id.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{EntryKind, Outcome};

    fn pending(id: &str) -> Entry {
        Entry {
            record_id: id.into(),
            kind: EntryKind::Pending,
            at_us: 1,
            contact_id: Some("+1555".into()),
            request_id: Some("r".into()),
            client: Some("c".into()),
            auth: Some("api_key".into()),
            status: Some("CONSENTED".into()),
            previous: None,
            outcome: None,
            upstream_status: None,
        }
    }

    fn chain_of(n: usize) -> (ChainKeys, ChainInfo, Vec<Row>) {
        let keys = ChainKeys(vec![ChainKey::new(&[7; 32])]);
        let key = keys.current().unwrap().clone();
        let mut head = ChainHead::genesis("a", &key);
        let rows = (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    head.link(&key, pending(&i.to_string()))
                } else {
                    head.link(
                        &key,
                        Entry::completion((i - 1).to_string(), 2, Outcome::Applied, Some(200)),
                    )
                }
            })
            .collect();
        let info = ChainInfo {
            head,
            base_seq: 0,
            base_hash: Vec::new(),
            base_mac: Vec::new(),
        };
        (keys, info, rows)
    }

    fn check(keys: &ChainKeys, info: &ChainInfo, rows: &[Row]) -> Result<u64, Broken> {
        let mut check = ChainCheck::start(info, keys)?;
        for row in rows {
            check.next(row)?;
        }
        check.finish(rows.last())
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (keys, info, rows) = chain_of(6);
        assert_eq!(check(&keys, &info, &rows), Ok(6));
    }

    #[test]
    fn edits_removals_and_swaps_are_found_at_the_first_changed_entry() {
        let (keys, info, rows) = chain_of(6);
        let mut edited = rows.clone();
        edited[3].entry.outcome = Some("refused".into());
        assert_eq!(check(&keys, &info, &edited).unwrap_err().seq, Some(4));

        let mut removed = rows.clone();
        removed.remove(2);
        assert_eq!(check(&keys, &info, &removed).unwrap_err().seq, Some(4));

        let mut swapped = rows.clone();
        swapped.swap(1, 2);
        (swapped[1].seq, swapped[2].seq) = (2, 3);
        assert_eq!(check(&keys, &info, &swapped).unwrap_err().seq, Some(2));

        let truncated = &rows[..5];
        let err = check(&keys, &info, truncated).unwrap_err();
        assert!(err.problem.contains("removed"), "{err}");
    }

    #[test]
    fn a_signed_checkpoint_stands_for_removed_entries() {
        let (keys, mut info, rows) = chain_of(6);
        let key = keys.current().unwrap();
        info.base_seq = 2;
        info.base_hash = rows[1].hash.clone();
        info.base_mac = checkpoint_mac(key, "a", 2, &rows[1].hash);
        assert_eq!(check(&keys, &info, &rows[2..]), Ok(4));
        // Removing more than the checkpoint says is a gap.
        assert!(check(&keys, &info, &rows[3..]).is_err());
        // A checkpoint moved forward without the key is refused.
        info.base_seq = 3;
        info.base_hash = rows[2].hash.clone();
        assert!(check(&keys, &info, &rows[3..])
            .unwrap_err()
            .problem
            .contains("checkpoint"));
    }
}
