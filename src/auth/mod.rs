//! Caller authentication: which configured client a request comes from, and whether it may
//! do what it asks. A client proves who it is with its key (`X-API-Key`, `Authorization:
//! Bearer <key>` or `Authorization: Basic <name:key>`) or with an access token from the
//! proxy's own token endpoint (`Authorization: Bearer <token>`).
//!
//! Keys are kept only as SHA-256 digests and compared in constant time against every client,
//! so neither timing nor a memory dump reveals a key. A token grants its scopes within what its
//! client holds in the configuration now.
//!
//! - [`token`]: signing and verifying access tokens (HS256 JWTs, key ids, rotation);
//! - `bearer`: access tokens on the consent routes, verified once, then found in a cache;
//! - [`scope`]: OAuth scopes and the permissions they stand for;
//! - [`throttle`]: failed authentications, per address and per claimed name, on the consent
//!   routes and at the token endpoint alike (one throttle, held here).

mod bearer;
mod hs256;
pub mod scope;
pub mod throttle;
pub mod token;
mod verified;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderMap};
use prometheus::Registry;
use subtle::ConstantTimeEq;

use crate::config::{ClientSettings, Permissions};
use crate::error::{Failure, ProxyError};
use crate::wire::credentials::{Authorization, BasicCredentials};
use bearer::AccessTokens;
use throttle::FailureThrottle;
use token::{TokenKeys, TokenRejection};

/// The metric label for a caller not (yet) authenticated.
pub use crate::config::ANONYMOUS;

/// What a request may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Read,
    Write,
    Admin,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
        }
    }

    fn granted_by(self, permissions: Permissions) -> bool {
        match self {
            Permission::Read => permissions.read,
            Permission::Write => permissions.write,
            Permission::Admin => permissions.admin,
        }
    }
}

/// An authenticated caller: its index among the configured clients (or `None` for the
/// anonymous caller allowed when `auth.required = false`) and its permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub client_index: Option<usize>,
    pub permissions: Permissions,
    /// The scopes of the access token it presented (`None` for a key): a 403 names what lacks
    /// the permission, the client or the token.
    pub token_scopes: Option<Permissions>,
    /// How the caller proved who it is (recorded in the audit trail).
    pub method: AuthMethod,
}

/// How a caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `X-API-Key: <key>`.
    ApiKey,
    /// `Authorization: Basic base64(<name>:<key>)`.
    Basic,
    /// `Authorization: Bearer <key>`.
    BearerKey,
    /// `Authorization: Bearer <access token>` from the proxy's token endpoint.
    AccessToken,
    /// No credentials (`auth.required = false`).
    None,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ApiKey => "api_key",
            AuthMethod::Basic => "basic",
            AuthMethod::BearerKey => "bearer_key",
            AuthMethod::AccessToken => "access_token",
            AuthMethod::None => "none",
        }
    }
}

impl Caller {
    /// 403 unless this caller holds `needed`.
    pub fn require(&self, needed: Permission) -> Result<(), ProxyError> {
        match self.token_scopes {
            _ if needed.granted_by(self.permissions) => Ok(()),
            // (Admin is no scope: a token never grants it, whatever its client holds.)
            Some(scopes) if needed != Permission::Admin && !needed.granted_by(scopes) => {
                Err(ProxyError::ScopeLacks(needed.as_str()))
            }
            _ => Err(ProxyError::Forbidden(needed.as_str())),
        }
    }
}

pub struct Authenticator {
    clients: Vec<ClientSettings>,
    required: bool,
    throttle: FailureThrottle,
    /// `None` when `oauth.enabled = false`: a Bearer value is then only ever a key.
    tokens: Option<AccessTokens>,
}

/// What the caller presented.
enum Presented<'a> {
    /// A key, with the client name it claims (Basic only).
    Key {
        claimed_name: Option<String>,
        key: std::borrow::Cow<'a, str>,
    },
    /// `Authorization: Bearer`: a key or an access token.
    Bearer(&'a str),
}

impl Authenticator {
    /// Keys only; see [`Authenticator::with_access_tokens`].
    pub fn new(clients: Vec<ClientSettings>, required: bool) -> Self {
        Authenticator {
            throttle: FailureThrottle::new(clients.iter().map(|c| c.name.as_str())),
            clients,
            required,
            tokens: None,
        }
    }

    /// Also accepts access tokens that `keys` verify (their rejections are counted in
    /// `consent_proxy_oauth_tokens_rejected_total` on `registry`).
    pub fn with_access_tokens(mut self, keys: Arc<TokenKeys>, registry: &Registry) -> Self {
        self.tokens = Some(AccessTokens::new(keys, registry));
        self
    }

    pub fn client_names(&self) -> impl Iterator<Item = &str> {
        self.clients.iter().map(|c| c.name.as_str())
    }

    pub fn client_name(&self, caller: Option<&Caller>) -> &str {
        caller
            .and_then(|c| c.client_index)
            .and_then(|i| self.clients.get(i))
            .map_or(ANONYMOUS, |c| c.name.as_str())
    }

    /// The index of the client named `name`.
    pub fn client_index(&self, name: &str) -> Option<usize> {
        self.clients.iter().position(|c| c.name == name)
    }

    /// Finds the caller and checks it holds `needed`.
    pub fn authorize(&self, headers: &HeaderMap, needed: Permission) -> Result<Caller, ProxyError> {
        let caller = self.authenticate(headers)?;
        caller.require(needed)?;
        Ok(caller)
    }

    /// The failure throttle, shared with the token endpoint.
    pub fn throttle(&self) -> &FailureThrottle {
        &self.throttle
    }

    /// Who is calling. Wrong credentials are always refused; no credentials are refused
    /// unless `auth.required = false`, when the caller is anonymous with read and write.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        match presented(headers)? {
            Some(presented) => self.check(&presented),
            None => self.without_credentials(),
        }
    }

    /// [`Authenticator::authenticate`] under the failure throttle, for a request from
    /// `address`: credentials from an address (or claiming a Basic name) that failed too often
    /// lately are refused unchecked, right or wrong (429), and a failure counts against both.
    /// A request without credentials guesses nothing: neither refused by the throttle nor
    /// counted.
    pub fn authenticate_from(
        &self,
        headers: &HeaderMap,
        address: IpAddr,
        now: Instant,
    ) -> Result<Caller, ProxyError> {
        let presented = match presented(headers) {
            Ok(None) => return self.without_credentials(),
            Ok(Some(presented)) => Ok(presented),
            Err(malformed) => Err(malformed),
        };
        let name = match &presented {
            Ok(Presented::Key {
                claimed_name: Some(name),
                ..
            }) => Some(name.as_str()),
            _ => None,
        };
        if let Some(retry_after) = self.throttle.wait(address, name, now) {
            return Err(ProxyError::TooManyAttempts { retry_after });
        }
        let result = presented
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|p| self.check(p));
        if result.is_err() {
            self.throttle.record_failure(address, name, now);
        }
        result
    }

    fn check(&self, presented: &Presented<'_>) -> Result<Caller, ProxyError> {
        match presented {
            Presented::Key { claimed_name, key } => self
                .client_with_key(
                    &ClientSettings::key_digest(key.as_bytes()),
                    claimed_name.as_deref(),
                    match claimed_name {
                        Some(_) => AuthMethod::Basic,
                        None => AuthMethod::ApiKey,
                    },
                )
                .ok_or(ProxyError::Unauthorized),
            Presented::Bearer(value) => self.bearer(value),
        }
    }

    fn without_credentials(&self) -> Result<Caller, ProxyError> {
        if self.required {
            return Err(ProxyError::MissingCredentials);
        }
        Ok(Caller {
            client_index: None,
            token_scopes: None,
            permissions: Permissions {
                read: true,
                write: true,
                admin: false,
            },
            method: AuthMethod::None,
        })
    }

    /// An OAuth client's credentials at the token endpoint: the client named `client_id`, if
    /// `client_secret` is its key (compared in constant time, whatever form the key is
    /// configured in).
    pub fn authenticate_client(&self, client_id: &str, client_secret: &str) -> Option<Caller> {
        self.client_with_key(
            &ClientSettings::key_digest(client_secret.as_bytes()),
            Some(client_id),
            AuthMethod::Basic,
        )
    }

    /// A Bearer value: a token verified before, else a client's key, else a token to verify.
    /// The cache is asked first: it is the common case, and the cheapest.
    fn bearer(&self, value: &str) -> Result<Caller, ProxyError> {
        if let Some(caller) = self
            .tokens
            .as_ref()
            .and_then(|t| t.cached(value, &self.clients))
        {
            return Ok(caller);
        }
        if let Some(caller) = self.client_with_key(
            &ClientSettings::key_digest(value.as_bytes()),
            None,
            AuthMethod::BearerKey,
        ) {
            return Ok(caller);
        }
        let rejected = |reason: TokenRejection| {
            ProxyError::InvalidToken(Failure::new("no valid access token", reason))
        };
        let tokens = self
            .tokens
            .as_ref()
            .ok_or_else(|| rejected(TokenRejection::TokensDisabled))?;
        tokens.verify(value, &self.clients).map_err(rejected)
    }

    /// The client whose key has `digest` (and whose name is `claimed_name`, when one is
    /// claimed).
    fn client_with_key(
        &self,
        digest: &[u8; 32],
        claimed_name: Option<&str>,
        method: AuthMethod,
    ) -> Option<Caller> {
        // Compare against every client so the time taken does not depend on which matched.
        let mut found = None;
        for (index, client) in self.clients.iter().enumerate() {
            let key_matches: bool = digest.ct_eq(&client.key_sha256).into();
            let name_matches = claimed_name.is_none_or(|name| name == client.name);
            if key_matches && name_matches && found.is_none() {
                found = Some(Caller {
                    client_index: Some(index),
                    permissions: client.permissions,
                    token_scopes: None,
                    method,
                });
            }
        }
        found
    }
}

/// The `reason` of `consent_proxy_auth_failures_total` on the consent routes that `error`
/// counts under, if it is a failed authentication.
pub fn failure_reason(error: &ProxyError) -> Option<&'static str> {
    match error {
        ProxyError::MissingCredentials => Some("missing"),
        ProxyError::Unauthorized => Some("invalid_key"),
        ProxyError::InvalidToken(_) => Some("invalid_token"),
        ProxyError::TooManyAttempts { .. } => Some("throttled"),
        _ => None,
    }
}

/// Every reason [`failure_reason`] gives.
pub const FAILURE_REASONS: [&str; 4] = ["missing", "invalid_key", "invalid_token", "throttled"];

/// Extracts the credential from `X-API-Key`, `Authorization: Bearer` or `Authorization:
/// Basic`. A malformed credential header is refused rather than ignored.
fn presented(headers: &HeaderMap) -> Result<Option<Presented<'_>>, ProxyError> {
    if let Some(value) = headers.get("x-api-key") {
        let key = value.to_str().map_err(|_| ProxyError::Unauthorized)?;
        return Ok(Some(Presented::Key {
            claimed_name: None,
            key: key.trim().into(),
        }));
    }
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let authorization = Authorization::parse(value).ok_or(ProxyError::Unauthorized)?;
    if authorization.is("Bearer") {
        Ok(Some(Presented::Bearer(authorization.credentials)))
    } else if authorization.is("Basic") {
        let basic =
            BasicCredentials::decode(authorization.credentials).ok_or(ProxyError::Unauthorized)?;
        Ok(Some(Presented::Key {
            claimed_name: Some(basic.user_id),
            key: basic.password.into(),
        }))
    } else {
        Err(ProxyError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorChain;
    use base64::Engine as _;
    use http::HeaderValue;

    fn authenticator(required: bool) -> Authenticator {
        Authenticator::new(
            vec![
                ClientSettings {
                    name: "ivr".into(),
                    key_sha256: ClientSettings::key_digest(b"reader-key-0123456789"),
                    permissions: Permissions {
                        read: true,
                        write: false,
                        admin: false,
                    },
                },
                ClientSettings {
                    name: "ops".into(),
                    key_sha256: ClientSettings::key_digest(b"admin-key-0123456789"),
                    permissions: Permissions {
                        read: true,
                        write: true,
                        admin: true,
                    },
                },
            ],
            required,
        )
    }

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn basic(user: &str, key: &str) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{key}"));
        format!("Basic {encoded}")
    }

    #[test]
    fn the_three_forms_find_the_client() {
        let auth = authenticator(true);
        for h in [
            headers("x-api-key", "admin-key-0123456789"),
            headers("authorization", "Bearer admin-key-0123456789"),
            headers("authorization", &basic("ops", "admin-key-0123456789")),
        ] {
            let caller = auth.authorize(&h, Permission::Admin).unwrap();
            assert_eq!(caller.client_index, Some(1));
            assert_eq!(auth.client_name(Some(&caller)), "ops");
        }
    }

    #[test]
    fn basic_needs_the_clients_own_name() {
        let auth = authenticator(true);
        let h = headers("authorization", &basic("ivr", "admin-key-0123456789"));
        assert!(matches!(
            auth.authenticate(&h),
            Err(ProxyError::Unauthorized)
        ));
    }

    #[test]
    fn wrong_missing_and_malformed_keys_are_refused() {
        let auth = authenticator(true);
        assert!(auth.authenticate(&HeaderMap::new()).is_err());
        assert!(auth.authenticate(&headers("x-api-key", "nope")).is_err());
        assert!(auth
            .authenticate(&headers("authorization", "Token x"))
            .is_err());
        assert!(auth
            .authenticate(&headers("authorization", "Basic %%%"))
            .is_err());
    }

    #[test]
    fn permissions_are_enforced() {
        let auth = authenticator(true);
        let h = headers("x-api-key", "reader-key-0123456789");
        assert!(auth.authorize(&h, Permission::Read).is_ok());
        assert!(matches!(
            auth.authorize(&h, Permission::Write),
            Err(ProxyError::Forbidden("write"))
        ));
    }

    #[test]
    fn anonymous_only_when_not_required() {
        let auth = authenticator(false);
        let caller = auth
            .authorize(&HeaderMap::new(), Permission::Write)
            .unwrap();
        assert_eq!(auth.client_name(Some(&caller)), ANONYMOUS);
        assert!(auth
            .authorize(&HeaderMap::new(), Permission::Admin)
            .is_err());
        // A wrong key is still wrong.
        assert!(auth.authenticate(&headers("x-api-key", "nope")).is_err());
    }

    fn with_tokens(auth: Authenticator, keys: &Arc<TokenKeys>) -> Authenticator {
        auth.with_access_tokens(keys.clone(), &Registry::new())
    }

    fn token_keys() -> Arc<TokenKeys> {
        Arc::new(TokenKeys::new(&[b"signing-key-0123456789abcdef0123456789"]).unwrap())
    }

    fn bearer(token: &str) -> HeaderMap {
        headers("authorization", &format!("Bearer {token}"))
    }

    const READ_WRITE: Permissions = Permissions {
        read: true,
        write: true,
        admin: false,
    };

    #[test]
    fn a_bearer_value_is_a_key_or_an_access_token() {
        let keys = token_keys();
        let auth = with_tokens(authenticator(true), &keys);
        let key = auth
            .authorize(&bearer("admin-key-0123456789"), Permission::Admin)
            .unwrap();
        assert_eq!(key.client_index, Some(1));
        let token = keys
            .issue("ops", READ_WRITE, std::time::Duration::from_secs(60))
            .unwrap();
        // Twice: verified, then found in the cache; the same answer both times.
        for _ in 0..2 {
            let caller = auth.authorize(&bearer(&token), Permission::Write).unwrap();
            assert_eq!(caller.client_index, Some(1));
            // A token never grants admin, whatever its client holds.
            assert!(matches!(
                auth.authorize(&bearer(&token), Permission::Admin),
                Err(ProxyError::Forbidden("admin"))
            ));
        }
        assert!(matches!(
            auth.authenticate(&bearer("neither-key-nor-token")),
            Err(ProxyError::InvalidToken(_))
        ));
        // Only as Bearer: a token is not a key.
        assert!(matches!(
            auth.authenticate(&headers("x-api-key", &token)),
            Err(ProxyError::Unauthorized)
        ));
    }

    #[test]
    fn a_token_grants_its_scopes_within_what_its_client_holds_now() {
        let keys = token_keys();
        let hour = std::time::Duration::from_secs(3600);
        // "ivr" holds read only now: its read-write token only reads.
        let ivr_token = keys.issue("ivr", READ_WRITE, hour).unwrap();
        let auth = with_tokens(authenticator(true), &keys);
        assert!(auth
            .authorize(&bearer(&ivr_token), Permission::Read)
            .is_ok());
        // A read-scoped token of a client that may write: the token's scope is what lacks it.
        let read_token = keys
            .issue(
                "ops",
                Permissions {
                    write: false,
                    ..READ_WRITE
                },
                hour,
            )
            .unwrap();
        let refused = auth.authorize(&bearer(&read_token), Permission::Write);
        assert!(
            matches!(refused, Err(ProxyError::ScopeLacks("write"))),
            "{refused:?}"
        );
        assert!(matches!(
            auth.authorize(&bearer(&ivr_token), Permission::Write),
            Err(ProxyError::Forbidden("write"))
        ));
        // A client no longer configured: refused, even with a valid signature.
        let gone = keys.issue("retired", READ_WRITE, hour).unwrap();
        assert!(matches!(
            auth.authenticate(&bearer(&gone)),
            Err(ProxyError::InvalidToken(_))
        ));
        // Without access tokens, a token is just a wrong key.
        let keys_only = authenticator(true);
        let error = keys_only.authenticate(&bearer(&ivr_token)).unwrap_err();
        assert!(
            ErrorChain(&error)
                .to_string()
                .contains("access tokens are disabled"),
            "{}",
            ErrorChain(&error)
        );
    }

    #[test]
    fn client_credentials_are_checked_by_name_and_key() {
        let auth = authenticator(true);
        let ops = auth
            .authenticate_client("ops", "admin-key-0123456789")
            .unwrap();
        assert_eq!(ops.client_index, Some(1));
        assert!(auth
            .authenticate_client("ivr", "admin-key-0123456789")
            .is_none());
        assert!(auth
            .authenticate_client("nobody", "admin-key-0123456789")
            .is_none());
        assert!(auth.authenticate_client("ops", "wrong").is_none());
        assert_eq!(auth.client_index("ivr"), Some(0));
        assert_eq!(auth.client_index("nobody"), None);
    }
}
