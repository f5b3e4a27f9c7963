//! The proxy's own OAuth 2.0 token endpoint (`POST /oauth/token` on the consent listener), so a
//! Studio integration keeps its OAuth client-credentials settings: the client authenticates
//! with its name and key (`client_secret_basic` or `client_secret_post`), receives a signed
//! access token for the scopes it holds, and presents it as `Authorization: Bearer` on the
//! consent routes. Failed client authentications are throttled per client name and per source
//! address (429 with `Retry-After`).
//!
//! The consent routes read the request (method, body within `server.max_body_bytes` and the
//! deadline); what to answer is decided here, from the headers and the body.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use prometheus::{IntCounter, IntCounterVec, Registry};

use crate::auth::token::TokenKeys;
use crate::auth::{scope, Authenticator, Caller};
use crate::error::{retry_after_seconds, Failure, ProxyError, BASIC_CHALLENGE};
use crate::metrics;
use crate::wire::body::Body;
use crate::wire::oauth::{self, ClientCredentials, TokenError, TokenErrorCode};

/// The `error` label of a throttled attempt in `consent_proxy_oauth_failures_total`.
const THROTTLED: &str = "throttled";

/// Why a token request was not granted.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// An RFC 6749 §5.2 error.
    Token(TokenError),
    /// Too many failed client authentications for this name or address; retry after this.
    Throttled(Duration),
    /// The token could not be signed (a defect; not expected in operation).
    Internal(Failure),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Token(error) => write!(f, "{error}"),
            Refusal::Throttled(wait) => {
                write!(
                    f,
                    "{THROTTLED}: retry after {} s",
                    retry_after_seconds(*wait)
                )
            }
            Refusal::Internal(failure) => write!(f, "{}", crate::error::ErrorChain(failure)),
        }
    }
}

impl Refusal {
    /// Every reason [`Refusal::auth_failure_reason`] gives.
    pub const AUTH_FAILURE_REASONS: [&'static str; 2] = ["invalid_client", THROTTLED];

    /// The `reason` of `consent_proxy_auth_failures_total` this refusal counts under, if it is
    /// a failed (or throttled) client authentication.
    pub fn auth_failure_reason(&self) -> Option<&'static str> {
        match self {
            Refusal::Token(error) if error.code == TokenErrorCode::InvalidClient => {
                Some(Self::AUTH_FAILURE_REASONS[0])
            }
            Refusal::Throttled(_) => Some(THROTTLED),
            _ => None,
        }
    }
}

impl From<TokenError> for Refusal {
    fn from(error: TokenError) -> Self {
        Refusal::Token(error)
    }
}

/// The endpoint's answer, with what the access log and the request metrics need.
pub struct TokenAnswer {
    pub response: Response<Body>,
    /// The authenticated client, when a token was issued.
    pub caller: Option<Caller>,
    pub refusal: Option<Refusal>,
}

/// `consent_proxy_oauth_tokens_issued_total{client}` and
/// `consent_proxy_oauth_failures_total{error}`, every series created up front.
pub struct OAuthMetrics {
    /// By client index.
    issued: Vec<IntCounter>,
    failures: IntCounterVec,
}

impl OAuthMetrics {
    pub fn register(
        registry: &Registry,
        client_names: impl Iterator<Item = impl AsRef<str>>,
    ) -> Self {
        let issued = metrics::counter_vec(
            registry,
            "consent_proxy_oauth_tokens_issued_total",
            "Access tokens issued by the proxy's token endpoint, by client.",
            &["client"],
        );
        let failures = metrics::counter_vec(
            registry,
            "consent_proxy_oauth_failures_total",
            "Token requests refused by the proxy's token endpoint, by OAuth error code \
             (throttled: too many failed client authentications).",
            &["error"],
        );
        for code in TokenErrorCode::ALL {
            failures.with_label_values(&[code.as_str()]);
        }
        failures.with_label_values(&[THROTTLED]);
        OAuthMetrics {
            issued: client_names
                .map(|name| issued.with_label_values(&[name.as_ref()]))
                .collect(),
            failures,
        }
    }

    fn count(&self, client_index: Option<usize>, refusal: Option<&Refusal>) {
        match refusal {
            None => {
                if let Some(counter) = client_index.and_then(|i| self.issued.get(i)) {
                    counter.inc();
                }
            }
            Some(Refusal::Token(error)) => {
                self.failures
                    .with_label_values(&[error.code.as_str()])
                    .inc();
            }
            Some(Refusal::Throttled(_)) => self.failures.with_label_values(&[THROTTLED]).inc(),
            Some(Refusal::Internal(_)) => {}
        }
    }
}

/// An access token granted.
struct Issued {
    /// The client, with the permissions the token grants.
    caller: Caller,
    access_token: String,
}

pub struct TokenEndpoint {
    auth: Arc<Authenticator>,
    keys: Arc<TokenKeys>,
    ttl: Duration,
    metrics: OAuthMetrics,
}

impl TokenEndpoint {
    pub fn new(
        auth: Arc<Authenticator>,
        keys: Arc<TokenKeys>,
        ttl: Duration,
        registry: &Registry,
    ) -> Self {
        let metrics = OAuthMetrics::register(registry, auth.client_names());
        TokenEndpoint {
            auth,
            keys,
            ttl,
            metrics,
        }
    }

    /// Answers a `POST /oauth/token` from `peer` with these headers and body.
    pub fn answer(&self, headers: &HeaderMap, body: &[u8], peer: IpAddr) -> TokenAnswer {
        let decided = self.decide(headers, body, peer, Instant::now());
        let (response, caller, refusal) = match decided {
            Ok(issued) => (
                oauth::token_response(
                    &issued.access_token,
                    self.ttl.as_secs(),
                    &scope::to_scope_string(issued.caller.permissions),
                ),
                Some(issued.caller),
                None,
            ),
            Err(refusal) => (refusal_response(&refusal), None, Some(refusal)),
        };
        self.metrics
            .count(caller.and_then(|c| c.client_index), refusal.as_ref());
        TokenAnswer {
            response,
            caller,
            refusal,
        }
    }

    fn decide(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        peer: IpAddr,
        now: Instant,
    ) -> Result<Issued, Refusal> {
        let throttle = self.auth.throttle();
        if let Some(wait) = throttle.address_wait(peer, now) {
            return Err(Refusal::Throttled(wait));
        }
        let form = oauth::form_params(headers, body)?;
        let credentials = ClientCredentials::from_request(headers, &form).inspect_err(|error| {
            if error.code == TokenErrorCode::InvalidClient {
                throttle.record_failure(peer, None, now);
            }
        })?;
        // Any name is counted, configured or not: the throttle must not tell which exist.
        let name = credentials.client_id.as_str();
        if let Some(wait) = throttle.name_wait(name, now) {
            return Err(Refusal::Throttled(wait));
        }
        // Every reading is tried, so the time taken does not say which one matched.
        let mut authenticated = None;
        for (id, secret) in credentials.readings() {
            let caller = self.auth.authenticate_client(id, secret);
            authenticated = authenticated.or(caller.map(|caller| (caller, id.to_owned())));
        }
        let Some((client, client_name)) = authenticated else {
            throttle.record_failure(peer, Some(name), now);
            return Err(TokenError::new(
                TokenErrorCode::InvalidClient,
                "client authentication failed",
            )
            .into());
        };
        oauth::check_grant_type(&form)?;
        let scopes = scope::to_grant(form.get("scope"), client.permissions)
            .map_err(|e| TokenError::new(TokenErrorCode::InvalidScope, e.to_string()))?;
        let access_token = self
            .keys
            .issue(&client_name, scopes, self.ttl)
            .map_err(Refusal::Internal)?;
        Ok(Issued {
            caller: Caller {
                permissions: scopes,
                token_scopes: Some(scopes),
                ..client
            },
            access_token,
        })
    }
}

fn refusal_response(refusal: &Refusal) -> Response<Body> {
    match refusal {
        Refusal::Token(error) => error.clone().into_response(BASIC_CHALLENGE),
        Refusal::Throttled(wait) => {
            let seconds = retry_after_seconds(*wait);
            let mut response = oauth::error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                &format!("too many failed client authentications; retry in {seconds} s"),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            response
        }
        Refusal::Internal(failure) => ProxyError::Internal(failure.clone()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::throttle::MAX_FAILURES;
    use crate::config::{ClientSettings, Permissions};
    use sha2::{Digest, Sha256};
    use std::net::Ipv4Addr;

    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const OTHER_PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

    fn endpoint() -> (TokenEndpoint, Registry) {
        let clients = vec![
            ClientSettings {
                name: "rw".into(),
                key_sha256: Sha256::digest(b"rw-key-0123456789").into(),
                permissions: Permissions {
                    read: true,
                    write: true,
                    admin: false,
                },
            },
            ClientSettings {
                name: "reader".into(),
                key_sha256: Sha256::digest(b"reader-key-0123456789").into(),
                permissions: Permissions {
                    read: true,
                    write: false,
                    admin: false,
                },
            },
        ];
        let registry = Registry::new();
        let keys = Arc::new(TokenKeys::new(&[b"signing-key-0123456789abcdef0123456789"]).unwrap());
        let auth =
            Arc::new(Authenticator::new(clients, true).with_access_tokens(keys.clone(), &registry));
        (
            TokenEndpoint::new(auth, keys, Duration::from_secs(60), &registry),
            registry,
        )
    }

    fn form_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers
    }

    fn post(endpoint: &TokenEndpoint, body: &str, peer: IpAddr) -> TokenAnswer {
        endpoint.answer(&form_headers(), body.as_bytes(), peer)
    }

    fn sample(registry: &Registry, name: &str, label: &str) -> u64 {
        registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric().iter())
            .find(|metric| metric.get_label().iter().any(|l| l.value() == label))
            .map_or(u64::MAX, |metric| metric.get_counter().get_value() as u64)
    }

    #[test]
    fn a_token_is_issued_for_the_scopes_held() {
        let (endpoint, registry) = endpoint();
        assert_eq!(
            sample(
                &registry,
                "consent_proxy_oauth_tokens_issued_total",
                "reader"
            ),
            0
        );
        let answer = post(
            &endpoint,
            "grant_type=client_credentials&client_id=reader&client_secret=reader-key-0123456789",
            PEER,
        );
        assert_eq!(answer.response.status(), 200);
        assert!(answer.refusal.is_none());
        assert_eq!(answer.caller.and_then(|c| c.client_index), Some(1));
        assert_eq!(
            sample(
                &registry,
                "consent_proxy_oauth_tokens_issued_total",
                "reader"
            ),
            1
        );
        let refused = post(
            &endpoint,
            "grant_type=client_credentials&client_id=reader&client_secret=reader-key-0123456789\
             &scope=voicebiometrics-consent%3Awrite",
            PEER,
        );
        assert_eq!(refused.response.status(), 400);
        assert!(matches!(
            refused.refusal,
            Some(Refusal::Token(TokenError {
                code: TokenErrorCode::InvalidScope,
                ..
            }))
        ));
        assert_eq!(
            sample(
                &registry,
                "consent_proxy_oauth_tokens_issued_total",
                "reader"
            ),
            1
        );
        assert_eq!(
            sample(
                &registry,
                "consent_proxy_oauth_failures_total",
                "invalid_scope"
            ),
            1
        );
    }

    #[test]
    fn failed_authentications_are_throttled_per_address_and_per_name() {
        let (endpoint, registry) = endpoint();
        for _ in 0..MAX_FAILURES {
            let answer = post(
                &endpoint,
                "grant_type=client_credentials&client_id=rw&client_secret=nope",
                PEER,
            );
            assert_eq!(answer.response.status(), 401);
        }
        let throttled = post(
            &endpoint,
            "grant_type=client_credentials&client_id=rw&client_secret=rw-key-0123456789",
            PEER,
        );
        assert_eq!(throttled.response.status(), 429);
        let retry_after: u64 = throttled.response.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry_after), "{retry_after}");
        // Another address, another client: not affected. The same client: its name is.
        let other = post(
            &endpoint,
            "grant_type=client_credentials&client_id=reader&client_secret=reader-key-0123456789",
            OTHER_PEER,
        );
        assert_eq!(other.response.status(), 200);
        let same_name = post(
            &endpoint,
            "grant_type=client_credentials&client_id=rw&client_secret=rw-key-0123456789",
            OTHER_PEER,
        );
        assert_eq!(same_name.response.status(), 429);
        assert_eq!(
            sample(
                &registry,
                "consent_proxy_oauth_failures_total",
                "invalid_client"
            ),
            10
        );
        assert_eq!(
            sample(&registry, "consent_proxy_oauth_failures_total", "throttled"),
            2
        );
    }

    #[test]
    fn only_failed_client_authentication_counts_towards_the_throttle() {
        let (endpoint, _registry) = endpoint();
        for _ in 0..2 * MAX_FAILURES {
            // Both methods at once: a malformed request, not a failed authentication.
            let answer = endpoint.answer(
                &{
                    let mut h = form_headers();
                    h.insert(
                        header::AUTHORIZATION,
                        HeaderValue::from_static("Basic cnc6eA=="),
                    );
                    h
                },
                b"grant_type=client_credentials&client_secret=x",
                PEER,
            );
            assert_eq!(answer.response.status(), 400);
            let wrong_grant = post(
                &endpoint,
                "grant_type=password&client_id=rw&client_secret=rw-key-0123456789",
                PEER,
            );
            assert_eq!(wrong_grant.response.status(), 400);
        }
        let ok = post(
            &endpoint,
            "grant_type=client_credentials&client_id=rw&client_secret=rw-key-0123456789",
            PEER,
        );
        assert_eq!(ok.response.status(), 200);
    }
}
