//! Access tokens already verified, so a Bearer hit costs a lookup instead of a JSON parse and
//! an HMAC: bounded, and an entry is never used past its token's expiry.
//!
//! Keyed by the last 16 bytes of the token (part of its signature, an HMAC of everything
//! before it: as good a digest of the token as any, and free), each entry holding the whole
//! token, which a hit must equal. Neither a SHA-256 of the whole token nor moka: each costs
//! about as much as the rest of a hit's authentication (`benches/cache_hit.rs` measures the
//! Bearer hit against the `X-API-Key` one). Keeping the tokens themselves exposes nothing new:
//! the signing keys that could mint any token live in the same memory.
//!
//! Only verified tokens are stored, so what an attacker sends never takes room. A full shard
//! first drops its expired entries, then an arbitrary one: an evicted token is only verified
//! again on its next use.
//!
//! An entry holds the client's index in the client list of the [`Authenticator`] that owns the
//! cache, so the cache must never outlive that list: a configuration change builds a new
//! authenticator, and with it an empty cache.
//!
//! [`Authenticator`]: super::Authenticator

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::Instant;

use crate::config::Permissions;

/// More tokens than a deployment's callers hold at once (about 400 bytes an entry).
pub(super) const CAPACITY: usize = 16_384;

/// Shards, so concurrent hits do not all touch one lock.
const SHARDS: usize = 16;

/// A verified token, as the cache keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Verified {
    pub client_index: usize,
    /// The token's own scopes (what its client holds now is applied on every use).
    pub scopes: Permissions,
    /// When the token's `exp` passes.
    pub expires_at: Instant,
}

struct Entry {
    token: Box<str>,
    verified: Verified,
}

pub(super) struct VerifiedTokens {
    shards: Box<[RwLock<HashMap<u128, Entry>>]>,
    per_shard: usize,
}

/// The last 16 bytes of `token` (zero-padded in front when shorter).
fn tail(token: &str) -> u128 {
    let bytes = token.as_bytes();
    let taken = bytes.len().min(16);
    let mut tail = [0u8; 16];
    tail[16 - taken..].copy_from_slice(&bytes[bytes.len() - taken..]);
    u128::from_le_bytes(tail)
}

/// The token's second-to-last byte: a base64url character of its signature carrying 6
/// random bits. (The last character of an HS256 signature carries only 4, and would leave 5
/// of the 16 shards unused.)
fn shard_index(tail: u128) -> usize {
    (tail >> 112) as u8 as usize % SHARDS
}

impl VerifiedTokens {
    pub fn new(capacity: usize) -> Self {
        VerifiedTokens {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, tail: u128) -> &RwLock<HashMap<u128, Entry>> {
        &self.shards[shard_index(tail)]
    }

    /// The verified token equal to `token`, if it has not expired.
    pub fn get(&self, token: &str) -> Option<Verified> {
        let tail = tail(token);
        let shard = self
            .shard(tail)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = shard.get(&tail)?;
        // A plain comparison: reaching it at all takes the last 16 bytes of a verified token's
        // signature, and what it compares beyond them (header and claims) is not secret.
        (*entry.token == *token && entry.verified.expires_at > Instant::now())
            .then_some(entry.verified)
    }

    /// Remembers a verified token (one that has expired already is not kept).
    pub fn insert(&self, token: &str, verified: Verified) {
        let now = Instant::now();
        if verified.expires_at <= now {
            return;
        }
        let tail = tail(token);
        let mut shard = self
            .shard(tail)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard && !shard.contains_key(&tail) {
            shard.retain(|_, entry| entry.verified.expires_at > now);
            if shard.len() >= self.per_shard {
                if let Some(victim) = shard.keys().next().copied() {
                    shard.remove(&victim);
                }
            }
        }
        shard.insert(
            tail,
            Entry {
                token: token.into(),
                verified,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const READ: Permissions = Permissions {
        read: true,
        write: false,
        admin: false,
    };

    fn verified(lifetime: Duration) -> Verified {
        Verified {
            client_index: 2,
            scopes: READ,
            expires_at: Instant::now() + lifetime,
        }
    }

    #[test]
    fn a_verified_token_is_found_by_itself_only() {
        let tokens = VerifiedTokens::new(10);
        let entry = verified(Duration::from_secs(60));
        tokens.insert("header.claims.signature-0123456789", entry);
        assert_eq!(
            tokens.get("header.claims.signature-0123456789"),
            Some(entry)
        );
        // The same tail under other content: not the token that was verified.
        assert_eq!(tokens.get("header.CLAIMS.signature-0123456789"), None);
        assert_eq!(tokens.get("signature-0123456789"), None);
        assert_eq!(tokens.get("header.claims.signature-0123456780"), None);
        assert_eq!(tokens.get(""), None);
    }

    #[test]
    fn an_entry_is_not_used_past_its_tokens_expiry() {
        let tokens = VerifiedTokens::new(10);
        tokens.insert(
            "short-lived-token-0123456789",
            verified(Duration::from_millis(50)),
        );
        assert!(tokens.get("short-lived-token-0123456789").is_some());
        // Waiting for the clock is the point of this test: no signal marks the expiry.
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(tokens.get("short-lived-token-0123456789"), None);
        // An expired one is not even stored.
        tokens.insert("expired-token-0123456789", verified(Duration::ZERO));
        assert_eq!(tokens.get("expired-token-0123456789"), None);
    }

    #[test]
    fn the_cache_is_bounded_and_makes_room_from_expired_entries_first() {
        let tokens = VerifiedTokens::new(SHARDS * 4);
        for i in 0..1000 {
            tokens.insert(&format!("token-{i:08}"), verified(Duration::from_secs(60)));
        }
        assert!(tokens.len() <= SHARDS * 4, "{}", tokens.len());

        let tokens = VerifiedTokens::new(SHARDS);
        // One shard's worth: tokens ending in the same two characters share a shard.
        tokens.insert("expiring-soon-a", verified(Duration::from_millis(20)));
        std::thread::sleep(Duration::from_millis(40));
        tokens.insert("long-lived-00-a", verified(Duration::from_secs(60)));
        assert!(tokens.get("long-lived-00-a").is_some());
        tokens.insert("long-lived-01-a", verified(Duration::from_secs(60)));
        // The shard held one entry: the newcomer took the expired entry's place, then the
        // next one an arbitrary live entry's.
        assert!(tokens.get("long-lived-01-a").is_some());
        assert_eq!(tokens.len(), 1);
    }

    #[test]
    fn hs256_tokens_spread_over_every_shard() {
        use base64::Engine as _;
        let mut used = std::collections::HashSet::new();
        for _ in 0..2000 {
            let signature: [u8; 32] = rand::random();
            let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature);
            used.insert(shard_index(tail(&format!("header.claims.{signature}"))));
        }
        assert_eq!(used.len(), SHARDS, "shards used: {used:?}");
    }
}
