//! Access tokens already verified, so a Bearer hit costs a digest and a lookup instead of a
//! JSON parse and an HMAC: keyed by the SHA-256 of the token (the token itself is not kept),
//! bounded, and each entry gone when its token expires.
//!
//! An entry holds the client's index in the client list of the [`Authenticator`] that owns the
//! cache, so the cache must never outlive that list: a configuration change builds a new
//! authenticator, and with it an empty cache.
//!
//! [`Authenticator`]: super::Authenticator

use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;

use crate::config::Permissions;

/// More tokens than a deployment's callers hold at once; beyond it the least used are verified
/// again when they come back (about 100 bytes an entry).
pub(super) const CAPACITY: u64 = 65_536;

/// A verified token, as the cache keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Verified {
    pub client_index: usize,
    /// The token's own scopes (what its client holds now is applied on every use).
    pub scopes: Permissions,
    /// When the token's `exp` passes.
    pub expires_at: Instant,
}

pub(super) struct VerifiedTokens {
    cache: Cache<[u8; 32], Verified>,
}

/// Each entry lives until its token's expiry, and no longer.
struct UntilTokenExpiry;

impl Expiry<[u8; 32], Verified> for UntilTokenExpiry {
    fn expire_after_create(
        &self,
        _digest: &[u8; 32],
        verified: &Verified,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(verified.expires_at.saturating_duration_since(created_at))
    }
}

impl VerifiedTokens {
    pub fn new(capacity: u64) -> Self {
        VerifiedTokens {
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilTokenExpiry)
                .build(),
        }
    }

    /// The token with this digest, if verified and not expired.
    pub fn get(&self, digest: &[u8; 32]) -> Option<Verified> {
        self.cache.get(digest)
    }

    /// Remembers a verified token (one that has expired already is not kept).
    pub fn insert(&self, digest: [u8; 32], verified: Verified) {
        if verified.expires_at > Instant::now() {
            self.cache.insert(digest, verified);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_verified_token_is_found_by_its_digest() {
        let tokens = VerifiedTokens::new(10);
        let entry = verified(Duration::from_secs(60));
        tokens.insert([1; 32], entry);
        assert_eq!(tokens.get(&[1; 32]), Some(entry));
        assert_eq!(tokens.get(&[2; 32]), None);
    }

    #[test]
    fn an_entry_goes_when_its_token_expires() {
        let tokens = VerifiedTokens::new(10);
        tokens.insert([1; 32], verified(Duration::from_millis(50)));
        assert!(tokens.get(&[1; 32]).is_some());
        // Waiting for moka's clock is the point of this test: no signal marks the expiry.
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(tokens.get(&[1; 32]), None);
        // An expired one is not even stored.
        tokens.insert([3; 32], verified(Duration::ZERO));
        assert_eq!(tokens.get(&[3; 32]), None);
    }

    #[test]
    fn the_cache_is_bounded() {
        let tokens = VerifiedTokens::new(100);
        for i in 0..1000u32 {
            let mut digest = [0u8; 32];
            digest[..4].copy_from_slice(&i.to_le_bytes());
            tokens.insert(digest, verified(Duration::from_secs(60)));
        }
        tokens.cache.run_pending_tasks();
        assert!(
            tokens.cache.entry_count() <= 100,
            "{}",
            tokens.cache.entry_count()
        );
    }
}
