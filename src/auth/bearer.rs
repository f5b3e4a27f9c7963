//! Access tokens presented on the consent routes: verified once (signature, algorithm, key id,
//! audience, expiry), then found by the digest of the token until it expires; on every use the
//! token grants its scopes within what its client holds now.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{IntCounter, Registry};

use super::scope;
use super::token::{TokenKeys, TokenRejection};
use super::verified::{Verified, VerifiedTokens, CAPACITY};
use super::Caller;
use crate::config::ClientSettings;
use crate::metrics;

pub(super) struct AccessTokens {
    keys: Arc<TokenKeys>,
    verified: VerifiedTokens,
    /// `consent_proxy_oauth_tokens_rejected_total`, by [`TokenRejection::ALL`].
    rejected: Vec<(TokenRejection, IntCounter)>,
}

impl AccessTokens {
    pub fn new(keys: Arc<TokenKeys>, registry: &Registry) -> Self {
        let rejected = metrics::counter_vec(
            registry,
            "consent_proxy_oauth_tokens_rejected_total",
            "Bearer values on the consent routes that were neither a client's key nor an \
             acceptable access token, by reason.",
            &["reason"],
        );
        AccessTokens {
            keys,
            verified: VerifiedTokens::new(CAPACITY),
            rejected: TokenRejection::ALL
                .into_iter()
                .map(|reason| (reason, rejected.with_label_values(&[reason.as_str()])))
                .collect(),
        }
    }

    /// The caller an access token stands for. `digest` is the token's SHA-256; `clients` is
    /// the client list of the authenticator that owns this cache.
    pub fn caller(
        &self,
        token: &str,
        digest: [u8; 32],
        clients: &[ClientSettings],
    ) -> Result<Caller, TokenRejection> {
        let verified = match self.verified.get(&digest) {
            Some(verified) => verified,
            None => self.verify(token, digest, clients).inspect_err(|reason| {
                if let Some((_, counter)) = self.rejected.iter().find(|(r, _)| r == reason) {
                    counter.inc();
                }
                tracing::debug!(reason = %reason, "access token refused");
            })?,
        };
        let client = clients
            .get(verified.client_index)
            .ok_or(TokenRejection::UnknownClient)?;
        Ok(Caller {
            client_index: Some(verified.client_index),
            permissions: scope::granted_now(verified.scopes, client.permissions),
        })
    }

    /// Verifies a token not seen before (or no longer cached) and caches it.
    fn verify(
        &self,
        token: &str,
        digest: [u8; 32],
        clients: &[ClientSettings],
    ) -> Result<Verified, TokenRejection> {
        let claims = self.keys.verify(token)?;
        // The client is looked up by name in the configuration this instance runs now: a
        // client removed since the token was issued is refused.
        let client_index = clients
            .iter()
            .position(|c| c.name == claims.client)
            .ok_or(TokenRejection::UnknownClient)?;
        let verified = Verified {
            client_index,
            scopes: claims.scopes,
            expires_at: Instant::now() + claims.remaining(),
        };
        self.verified.insert(digest, verified);
        Ok(verified)
    }
}
