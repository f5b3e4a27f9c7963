//! `private_key_jwt` at the simulator's token endpoint: a client whose public key a test (or
//! the demo) registered may authenticate with a signed assertion instead of its secret, as at
//! Talkdesk. Checked: the signature with the key its `kid` names, `iss` = `sub` = the client,
//! `aud` = this token endpoint's URL, not expired, `jti` never seen before.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::clock::since_epoch;
use crate::jws::VerifyingKey;
use crate::wire::credentials::FormParams;
use crate::wire::oauth::{TokenError, TokenErrorCode, TOKEN_PATH};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The registered public keys (by `kid`) and the `jti`s already used, until they expire.
#[derive(Default)]
pub(super) struct ClientKeys {
    keys: Mutex<HashMap<String, VerifyingKey>>,
    used: Mutex<HashMap<String, u64>>,
}

impl ClientKeys {
    pub(super) fn trust(&self, key_id: &str, key: VerifyingKey) {
        lock(&self.keys).insert(key_id.to_owned(), key);
    }

    /// Whether the form authenticates with an assertion at all.
    pub(super) fn presented(form: &FormParams) -> bool {
        form.get("client_assertion_type").is_some() || form.get("client_assertion").is_some()
    }

    /// The client the assertion authenticates, given the `host` the request was sent to.
    pub(super) fn check(
        &self,
        form: &FormParams,
        client_id: &str,
        host: &str,
    ) -> Result<(), TokenError> {
        let refuse = |why: &'static str| TokenError::new(TokenErrorCode::InvalidClient, why);
        if form.get("client_assertion_type") != Some(JWT_BEARER) {
            return Err(TokenError::new(
                TokenErrorCode::InvalidRequest,
                "client_assertion_type must be jwt-bearer",
            ));
        }
        if form.get("client_secret").is_some() {
            return Err(TokenError::new(
                TokenErrorCode::InvalidRequest,
                "a client assertion and a client secret",
            ));
        }
        let assertion = form.get("client_assertion").unwrap_or_default();
        let key_id = header_kid(assertion).ok_or_else(|| refuse("the assertion names no kid"))?;
        let key = lock(&self.keys)
            .get(&key_id)
            .cloned()
            .ok_or_else(|| refuse("unknown kid"))?;
        let (_, claims) = key
            .verify(assertion)
            .map_err(|_| refuse("the assertion's signature does not verify"))?;
        if claims["iss"] != client_id || claims["sub"] != client_id {
            return Err(refuse("the assertion's iss and sub must be the client id"));
        }
        if claims["aud"] != format!("http://{host}{TOKEN_PATH}").as_str() {
            return Err(refuse("the assertion's aud is not this token endpoint"));
        }
        let now = since_epoch().as_secs();
        let expires = claims["exp"].as_u64().unwrap_or(0);
        if expires <= now {
            return Err(refuse("the assertion has expired"));
        }
        let jti = claims["jti"]
            .as_str()
            .filter(|jti| !jti.is_empty())
            .ok_or_else(|| refuse("the assertion has no jti"))?;
        let mut used = lock(&self.used);
        used.retain(|_, until| *until > now);
        if used.insert(jti.to_owned(), expires).is_some() {
            return Err(refuse("the assertion's jti was used before"));
        }
        Ok(())
    }
}

/// The `kid` of a JWT's header, read before the key to check it with is known.
fn header_kid(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let header: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    header["kid"].as_str().map(str::to_owned)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
