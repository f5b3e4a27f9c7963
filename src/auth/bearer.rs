//! Access tokens presented on the consent routes: verified once (signature, algorithm, key id,
//! audience, expiry), then found in the verified-token cache until they expire; on every use a
//! token grants its scopes within what its client holds now.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{IntCounter, Registry};

use super::scope;
use super::token::{TokenKeys, TokenRejection};
use super::verified::{Verified, VerifiedTokens, CAPACITY};
use super::{AuthMethod, Caller};
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

    /// The caller a token verified before stands for, if it is cached and has not expired.
    /// `clients` is the client list of the authenticator that owns this cache.
    pub fn cached(&self, token: &str, clients: &[ClientSettings]) -> Option<Caller> {
        caller(self.verified.get(token)?, clients)
    }

    /// Verifies a token not seen before (or no longer cached), caches it, and says whom it
    /// stands for.
    pub fn verify(
        &self,
        token: &str,
        clients: &[ClientSettings],
    ) -> Result<Caller, TokenRejection> {
        let verified = self.verify_claims(token, clients).inspect_err(|reason| {
            if let Some((_, counter)) = self.rejected.iter().find(|(r, _)| r == reason) {
                counter.inc();
            }
            tracing::debug!(reason = %reason, "access token refused");
        })?;
        self.verified.insert(token, verified);
        caller(verified, clients).ok_or(TokenRejection::UnknownClient)
    }

    fn verify_claims(
        &self,
        token: &str,
        clients: &[ClientSettings],
    ) -> Result<Verified, TokenRejection> {
        let claims = self.keys.verify(token)?;
        // The client is looked up by name in the configuration this instance runs now: a
        // client removed since the token was issued is refused.
        let client_index = clients
            .iter()
            .position(|c| c.name == claims.client)
            .ok_or(TokenRejection::UnknownClient)?;
        Ok(Verified {
            client_index,
            scopes: claims.scopes,
            expires_at: Instant::now() + claims.remaining(),
        })
    }
}

/// What a verified token grants now: its scopes within what its client holds.
fn caller(verified: Verified, clients: &[ClientSettings]) -> Option<Caller> {
    let client = clients.get(verified.client_index)?;
    Some(Caller {
        client_index: Some(verified.client_index),
        permissions: scope::granted_now(verified.scopes, client.permissions),
        token_scopes: Some(verified.scopes),
        method: AuthMethod::AccessToken,
    })
}
