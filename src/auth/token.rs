//! The proxy's own access tokens: HS256 JWTs that every instance holding the same signing keys
//! can check on its own, with no shared store.
//!
//! A token names its client (`sub`), its scopes (`scope`), when it was issued and when it
//! expires (`iat`, `exp`), the proxy as its audience (`aud`) and the key that signed it (`kid`,
//! in the header). The first configured key signs, every configured key verifies, so a new key
//! can be rolled in before it signs and an old one kept until its last token has expired. Key
//! ids are derived from the keys themselves, so instances agree without configuring any.
//!
//! Verification accepts exactly one algorithm, HS256, and a known key id: no `none`, no other
//! HMAC, no public-key algorithm that could be confused with a shared secret. Expiry is checked
//! with [`LEEWAY`] for clocks that differ between instances, and no more: here, against the
//! clock to the nanosecond (jsonwebtoken's own check compares whole seconds, which stretches a
//! 2 s leeway to almost 3 s).

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::hs256;
use super::scope;
use crate::clock::since_epoch;
use crate::config::{OAuthSettings, Permissions};
use crate::error::Failure;

/// The `aud` of every token: the proxy. A token meant for another service is refused.
pub const AUDIENCE: &str = "consent-proxy";

/// How long past its `exp` a token is still accepted: clocks of instances differ a little.
pub const LEEWAY: Duration = Duration::from_secs(2);

/// Longer Bearer values are not tokens of ours (they are about 300 bytes); not even parsed.
const MAX_TOKEN_BYTES: usize = 2048;

/// Bytes of a random per-process key (when `oauth.signing_key_file` is empty).
const RANDOM_KEY_BYTES: usize = 32;

/// Why a Bearer value is not an acceptable access token. Shown in logs and metric labels:
/// never the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("not a client's key, and not an access token")]
    Malformed,
    #[error("access token signed with another algorithm than HS256")]
    Algorithm,
    #[error("access token signed with an unknown key")]
    UnknownKey,
    #[error("access token signature does not match")]
    Signature,
    #[error("access token expired")]
    Expired,
    #[error("access token for another audience")]
    Audience,
    #[error("access token of a client that is no longer configured")]
    UnknownClient,
    #[error("not a client's key (access tokens are disabled)")]
    TokensDisabled,
}

impl TokenRejection {
    pub const ALL: [TokenRejection; 8] = [
        TokenRejection::Malformed,
        TokenRejection::Algorithm,
        TokenRejection::UnknownKey,
        TokenRejection::Signature,
        TokenRejection::Expired,
        TokenRejection::Audience,
        TokenRejection::UnknownClient,
        TokenRejection::TokensDisabled,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRejection::Malformed => "malformed",
            TokenRejection::Algorithm => "algorithm",
            TokenRejection::UnknownKey => "unknown_key",
            TokenRejection::Signature => "signature",
            TokenRejection::Expired => "expired",
            TokenRejection::Audience => "audience",
            TokenRejection::UnknownClient => "unknown_client",
            TokenRejection::TokensDisabled => "tokens_disabled",
        }
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedClaims {
    /// The client's name.
    pub client: String,
    pub scopes: Permissions,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at_unix: u64,
}

impl VerifiedClaims {
    /// How long the token has left (zero once `exp` has passed, even within the leeway).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.expires_at_unix).saturating_sub(since_epoch())
    }
}

/// The claims as they are on the wire.
#[derive(Serialize, Deserialize)]
struct Claims {
    sub: String,
    aud: String,
    iat: u64,
    exp: u64,
    scope: String,
}

struct Key {
    id: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

/// The signing keys: the first signs, all verify. `Debug`-free: nothing here may be printed.
pub struct TokenKeys {
    keys: Vec<Key>,
    validation: Validation,
}

/// A key's id: the first 8 bytes of a SHA-256 over a label and the key, hex. Every instance
/// derives the same id from the same key; the id says nothing usable about the key.
pub fn key_id(secret: &[u8]) -> String {
    let mut digest = Sha256::new();
    digest.update(b"consent-proxy oauth key id\n");
    digest.update(secret);
    hex::encode(&digest.finalize()[..8])
}

impl TokenKeys {
    /// The configured keys, or one random key for this process when none are configured.
    pub fn from_settings(settings: &OAuthSettings) -> Result<TokenKeys, Failure> {
        if settings.signing_keys.is_empty() {
            let random: [u8; RANDOM_KEY_BYTES] = rand::random();
            return TokenKeys::new(&[random.as_slice()]);
        }
        let secrets: Vec<&[u8]> = settings
            .signing_keys
            .iter()
            .map(|secret| secret.expose().as_bytes())
            .collect();
        TokenKeys::new(&secrets)
    }

    /// Keys from their secrets, the signing one first.
    pub fn new(secrets: &[&[u8]]) -> Result<TokenKeys, Failure> {
        hs256::install();
        if secrets.is_empty() {
            return Err(Failure::msg("no signing key"));
        }
        let keys = secrets
            .iter()
            .map(|secret| {
                Ok(Key {
                    id: key_id(secret),
                    encoding: EncodingKey::from_secret(secret)
                        .map_err(|e| Failure::new("unusable signing key", e))?,
                    decoding: DecodingKey::from_secret(secret)
                        .map_err(|e| Failure::new("unusable signing key", e))?,
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked in `verify_at`; `exp` stays required (a token without one is not
        // ours), and a non-numeric one fails to deserialise.
        validation.leeway = 0;
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        Ok(TokenKeys { keys, validation })
    }

    /// The key ids, the signing one first (for the start-up log: ids are not secret, every
    /// token carries one).
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|key| key.id.as_str()).collect()
    }

    /// A token for `client` naming `scopes`, valid for `ttl` from now.
    pub fn issue(
        &self,
        client: &str,
        scopes: Permissions,
        ttl: Duration,
    ) -> Result<String, Failure> {
        let signing = self
            .keys
            .first()
            .ok_or_else(|| Failure::msg("no signing key"))?;
        let issued_at = since_epoch().as_secs();
        let claims = Claims {
            sub: client.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: issued_at,
            exp: issued_at.saturating_add(ttl.as_secs()),
            scope: scope::to_scope_string(scopes),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(signing.id.clone());
        jsonwebtoken::encode(&header, &claims, &signing.encoding)
            .map_err(|e| Failure::new("cannot sign an access token", e))
    }

    /// Checks `token`: its shape, algorithm, key id, signature, audience and expiry.
    pub fn verify(&self, token: &str) -> Result<VerifiedClaims, TokenRejection> {
        self.verify_at(token, since_epoch())
    }

    /// [`TokenKeys::verify`] with the wall clock reading `now` (since the Unix epoch): a token
    /// is accepted while `now` is at most its `exp` plus [`LEEWAY`].
    fn verify_at(&self, token: &str, now: Duration) -> Result<VerifiedClaims, TokenRejection> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenRejection::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenRejection::Algorithm);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.iter().find(|key| key.id == kid))
            .ok_or(TokenRejection::UnknownKey)?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation)
            .map_err(|e| rejection(e.kind()))?;
        if now > Duration::from_secs(data.claims.exp).saturating_add(LEEWAY) {
            return Err(TokenRejection::Expired);
        }
        Ok(VerifiedClaims {
            client: data.claims.sub,
            scopes: scope::from_token(&data.claims.scope),
            expires_at_unix: data.claims.exp,
        })
    }
}

fn rejection(kind: &ErrorKind) -> TokenRejection {
    match kind {
        ErrorKind::InvalidSignature => TokenRejection::Signature,
        ErrorKind::ExpiredSignature => TokenRejection::Expired,
        ErrorKind::InvalidAudience => TokenRejection::Audience,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => TokenRejection::Algorithm,
        _ => TokenRejection::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use ring::hmac;
    use serde_json::json;

    const KEY_A: &[u8] = b"key-a-0123456789abcdef0123456789abcdef";
    const KEY_B: &[u8] = b"key-b-0123456789abcdef0123456789abcdef";
    const READ_WRITE: Permissions = Permissions {
        read: true,
        write: true,
        admin: false,
    };
    const HOUR: Duration = Duration::from_secs(3600);

    fn keys(secrets: &[&[u8]]) -> TokenKeys {
        TokenKeys::new(secrets).unwrap()
    }

    /// A token built by hand: any header, any claims, HMAC-SHA256 with `secret` (or no
    /// signature at all).
    fn forge(
        header: serde_json::Value,
        claims: serde_json::Value,
        secret: Option<&[u8]>,
    ) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = secret.map_or(String::new(), |secret| {
            let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
            URL_SAFE_NO_PAD.encode(hmac::sign(&key, input.as_bytes()))
        });
        format!("{input}.{signature}")
    }

    fn now() -> u64 {
        since_epoch().as_secs()
    }

    fn good_claims() -> serde_json::Value {
        json!({"sub": "rw", "aud": AUDIENCE, "iat": now(), "exp": now() + 60,
               "scope": "voicebiometrics-consent:read"})
    }

    #[test]
    fn an_issued_token_verifies_with_its_claims() {
        let keys = keys(&[KEY_A]);
        let token = keys.issue("studio-ivr", READ_WRITE, HOUR).unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.client, "studio-ivr");
        assert_eq!(claims.scopes, READ_WRITE);
        let remaining = claims.remaining();
        assert!(remaining > HOUR - Duration::from_secs(2) && remaining <= HOUR);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
        assert_eq!(header.kid.as_deref(), Some(key_id(KEY_A).as_str()));
    }

    #[test]
    fn key_ids_are_derived_from_the_key_alone() {
        assert_eq!(key_id(KEY_A), key_id(KEY_A));
        assert_ne!(key_id(KEY_A), key_id(KEY_B));
        assert_eq!(key_id(KEY_A).len(), 16);
        assert!(!key_id(KEY_A).contains("key-a"));
    }

    #[test]
    fn rotation_the_first_key_signs_every_key_verifies() {
        let old = keys(&[KEY_A]);
        let rotated = keys(&[KEY_B, KEY_A]);
        let old_token = old.issue("rw", READ_WRITE, HOUR).unwrap();
        let new_token = rotated.issue("rw", READ_WRITE, HOUR).unwrap();
        assert!(rotated.verify(&old_token).is_ok(), "old tokens still work");
        assert_eq!(
            jsonwebtoken::decode_header(&new_token).unwrap().kid,
            Some(key_id(KEY_B))
        );
        assert_eq!(old.verify(&new_token), Err(TokenRejection::UnknownKey));
        // Once the old key is dropped, its tokens stop working.
        assert_eq!(
            keys(&[KEY_B]).verify(&old_token),
            Err(TokenRejection::UnknownKey)
        );
    }

    #[test]
    fn tampering_is_refused() {
        let keys = keys(&[KEY_A]);
        let token = keys.issue("reader", READ_WRITE, HOUR).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        // Another payload under the original signature.
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["sub"] = json!("ops");
        let swapped = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            parts[2]
        );
        assert_eq!(keys.verify(&swapped), Err(TokenRejection::Signature));
        // One signature character changed.
        let mut signature = parts[2].to_owned().into_bytes();
        signature[5] = if signature[5] == b'A' { b'B' } else { b'A' };
        let flipped = format!(
            "{}.{}.{}",
            parts[0],
            parts[1],
            String::from_utf8(signature).unwrap()
        );
        assert_eq!(keys.verify(&flipped), Err(TokenRejection::Signature));
        for malformed in [
            "",
            "a.b",
            "a.b.c",
            "...",
            &"x".repeat(3000),
            &format!("{token}.x"),
        ] {
            assert_eq!(
                keys.verify(malformed),
                Err(TokenRejection::Malformed),
                "{malformed}"
            );
        }
    }

    #[test]
    fn only_hs256_with_a_known_key_id_is_accepted() {
        let keys = keys(&[KEY_A]);
        let kid = key_id(KEY_A);
        let ok = forge(
            json!({"alg": "HS256", "kid": kid}),
            good_claims(),
            Some(KEY_A),
        );
        assert!(keys.verify(&ok).is_ok());
        // alg none, with or without a signature.
        for signature in [None, Some(KEY_A)] {
            let none = forge(json!({"alg": "none", "kid": kid}), good_claims(), signature);
            assert_eq!(keys.verify(&none), Err(TokenRejection::Malformed));
        }
        // Another HMAC over the same key, and an algorithm of the public-key kind.
        for alg in ["HS384", "HS512", "RS256", "ES256"] {
            let other = forge(json!({"alg": alg, "kid": kid}), good_claims(), Some(KEY_A));
            assert_eq!(keys.verify(&other), Err(TokenRejection::Algorithm), "{alg}");
        }
        // No kid, an unknown kid, a key we do not have.
        let no_kid = forge(json!({"alg": "HS256"}), good_claims(), Some(KEY_A));
        assert_eq!(keys.verify(&no_kid), Err(TokenRejection::UnknownKey));
        let other_kid = forge(
            json!({"alg": "HS256", "kid": "0011223344556677"}),
            good_claims(),
            Some(KEY_A),
        );
        assert_eq!(keys.verify(&other_kid), Err(TokenRejection::UnknownKey));
        let other_key = forge(
            json!({"alg": "HS256", "kid": kid}),
            good_claims(),
            Some(KEY_B),
        );
        assert_eq!(keys.verify(&other_key), Err(TokenRejection::Signature));
    }

    #[test]
    fn expiry_audience_and_claim_types_are_checked() {
        let keys = keys(&[KEY_A]);
        let header = json!({"alg": "HS256", "kid": key_id(KEY_A)});
        let with = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut claims = good_claims();
            change(&mut claims);
            forge(header.clone(), claims, Some(KEY_A))
        };
        let leeway = LEEWAY.as_secs();
        // Within the leeway: accepted; beyond it: expired.
        assert!(keys
            .verify(&with(&|c| c["exp"] = json!(now() - leeway + 1)))
            .is_ok());
        assert_eq!(
            keys.verify(&with(&|c| c["exp"] = json!(now() - leeway - 2))),
            Err(TokenRejection::Expired)
        );
        // Exactly at the bound, against a chosen clock: `exp` + LEEWAY is the last instant.
        let exp = now() + 60;
        let token = with(&|c| c["exp"] = json!(exp));
        let at_exp = Duration::from_secs(exp);
        assert!(keys.verify_at(&token, at_exp + LEEWAY).is_ok());
        assert_eq!(
            keys.verify_at(&token, at_exp + LEEWAY + Duration::from_nanos(1)),
            Err(TokenRejection::Expired)
        );
        // The reported case: 2.9 s past `exp`.
        assert_eq!(
            keys.verify_at(&token, at_exp + Duration::from_millis(2900)),
            Err(TokenRejection::Expired)
        );
        // The type-confusion trick: an `exp` that is not a number is not "no exp".
        assert_eq!(
            keys.verify(&with(&|c| c["exp"] = json!("99999999999"))),
            Err(TokenRejection::Malformed)
        );
        assert_eq!(
            keys.verify(&with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
            Err(TokenRejection::Malformed)
        );
        assert_eq!(
            keys.verify(&with(&|c| c["aud"] = json!("talkdesk"))),
            Err(TokenRejection::Audience)
        );
        // A claim missing altogether: not a token of ours.
        assert_eq!(
            keys.verify(&with(&|c| {
                c.as_object_mut().unwrap().remove("aud");
            })),
            Err(TokenRejection::Malformed)
        );
        assert_eq!(
            keys.verify(&with(&|c| {
                c.as_object_mut().unwrap().remove("sub");
            })),
            Err(TokenRejection::Malformed)
        );
    }

    #[test]
    fn an_empty_configuration_gets_a_random_key_per_process() {
        let settings = OAuthSettings {
            enabled: true,
            token_ttl: HOUR,
            signing_keys: Vec::new(),
        };
        let first = TokenKeys::from_settings(&settings).unwrap();
        let second = TokenKeys::from_settings(&settings).unwrap();
        assert_ne!(first.key_ids(), second.key_ids());
        let token = first.issue("rw", READ_WRITE, HOUR).unwrap();
        assert!(first.verify(&token).is_ok());
        assert_eq!(second.verify(&token), Err(TokenRejection::UnknownKey));
    }
}
