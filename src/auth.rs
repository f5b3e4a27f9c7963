//! Caller authentication: which configured client holds the presented key, and whether it
//! may do what it asks.
//!
//! Keys are kept only as SHA-256 digests and compared in constant time against every client,
//! so neither timing nor a memory dump reveals a key.

use http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ClientSettings, Permissions};
use crate::error::ProxyError;
use crate::http::credentials::{Authorization, BasicCredentials};

/// The metric label for a caller not (yet) authenticated.
pub use crate::config::ANONYMOUS;

/// How client keys are kept and compared: their SHA-256 digest.
fn sha256(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

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
}

pub struct Authenticator {
    clients: Vec<ClientSettings>,
    required: bool,
}

/// A key presented by the caller, and the client name it claims (Basic only).
struct Presented<'a> {
    claimed_name: Option<String>,
    key: std::borrow::Cow<'a, str>,
}

impl Authenticator {
    pub fn new(clients: Vec<ClientSettings>, required: bool) -> Self {
        Authenticator { clients, required }
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

    /// Finds the caller and checks it holds `needed`.
    pub fn authorize(&self, headers: &HeaderMap, needed: Permission) -> Result<Caller, ProxyError> {
        let caller = self.authenticate(headers)?;
        if needed.granted_by(caller.permissions) {
            Ok(caller)
        } else {
            Err(ProxyError::Forbidden(needed.as_str()))
        }
    }

    /// Who is calling. Wrong credentials are always refused; no credentials are refused
    /// unless `auth.required = false`, when the caller is anonymous with read and write.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        match presented_key(headers)? {
            Some(presented) => self.find_client(&presented).ok_or(ProxyError::Unauthorized),
            None if !self.required => Ok(Caller {
                client_index: None,
                permissions: Permissions {
                    read: true,
                    write: true,
                    admin: false,
                },
            }),
            None => Err(ProxyError::Unauthorized),
        }
    }

    fn find_client(&self, presented: &Presented<'_>) -> Option<Caller> {
        let digest = sha256(presented.key.as_bytes());
        // Compare against every client so the time taken does not depend on which matched.
        let mut found = None;
        for (index, client) in self.clients.iter().enumerate() {
            let key_matches: bool = digest.ct_eq(&client.key_sha256).into();
            let name_matches = presented
                .claimed_name
                .as_deref()
                .is_none_or(|name| name == client.name);
            if key_matches && name_matches && found.is_none() {
                found = Some(Caller {
                    client_index: Some(index),
                    permissions: client.permissions,
                });
            }
        }
        found
    }
}

/// Extracts the key from `X-API-Key`, `Authorization: Bearer` or `Authorization: Basic`.
/// A malformed credential header is refused rather than ignored.
fn presented_key(headers: &HeaderMap) -> Result<Option<Presented<'_>>, ProxyError> {
    if let Some(value) = headers.get("x-api-key") {
        let key = value.to_str().map_err(|_| ProxyError::Unauthorized)?;
        return Ok(Some(Presented {
            claimed_name: None,
            key: key.trim().into(),
        }));
    }
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let authorization = Authorization::parse(value).ok_or(ProxyError::Unauthorized)?;
    if authorization.is("Bearer") {
        Ok(Some(Presented {
            claimed_name: None,
            key: authorization.credentials.into(),
        }))
    } else if authorization.is("Basic") {
        let basic =
            BasicCredentials::decode(authorization.credentials).ok_or(ProxyError::Unauthorized)?;
        Ok(Some(Presented {
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
    use base64::Engine as _;
    use http::HeaderValue;

    fn authenticator(required: bool) -> Authenticator {
        Authenticator::new(
            vec![
                ClientSettings {
                    name: "ivr".into(),
                    key_sha256: sha256(b"reader-key-0123456789"),
                    permissions: Permissions {
                        read: true,
                        write: false,
                        admin: false,
                    },
                },
                ClientSettings {
                    name: "ops".into(),
                    key_sha256: sha256(b"admin-key-0123456789"),
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
}
