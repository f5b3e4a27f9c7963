//! OAuth 2.0 token-endpoint plumbing shared by the proxy's own endpoint and the simulator's
//! (RFC 6749): the form body, the client credentials a request carries (`client_secret_basic`
//! or `client_secret_post`, never both), the grant type, and the §5.1 and §5.2 answers.

use std::borrow::Cow;

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::wire::body::{self, Body};
use crate::wire::credentials::{self, Authorization, BasicCredentials, FormParams};

/// Where token endpoints live, the proxy's and Talkdesk's (and so the simulator's).
pub const TOKEN_PATH: &str = "/oauth/token";

/// The only grant type either endpoint knows.
pub const CLIENT_CREDENTIALS: &str = "client_credentials";

/// RFC 6749 §5.2 error codes a token endpoint here answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenErrorCode {
    InvalidRequest,
    InvalidClient,
    UnsupportedGrantType,
    InvalidScope,
}

impl TokenErrorCode {
    pub const ALL: [TokenErrorCode; 4] = [
        TokenErrorCode::InvalidRequest,
        TokenErrorCode::InvalidClient,
        TokenErrorCode::UnsupportedGrantType,
        TokenErrorCode::InvalidScope,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenErrorCode::InvalidRequest => "invalid_request",
            TokenErrorCode::InvalidClient => "invalid_client",
            TokenErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            TokenErrorCode::InvalidScope => "invalid_scope",
        }
    }

    /// 401 for a failed client authentication, 400 for the rest (§5.2).
    pub fn status(self) -> StatusCode {
        match self {
            TokenErrorCode::InvalidClient => StatusCode::UNAUTHORIZED,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// A refused token request: the error code and a description for the client's developer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {description}", .code.as_str())]
pub struct TokenError {
    pub code: TokenErrorCode,
    pub description: Cow<'static, str>,
}

impl TokenError {
    pub fn new(code: TokenErrorCode, description: impl Into<Cow<'static, str>>) -> Self {
        TokenError {
            code,
            description: description.into(),
        }
    }

    fn invalid_request(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new(TokenErrorCode::InvalidRequest, description)
    }

    fn invalid_client(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new(TokenErrorCode::InvalidClient, description)
    }

    /// The §5.2 answer; `invalid_client` carries `basic_challenge` as its `WWW-Authenticate`.
    pub fn into_response(self, basic_challenge: &'static str) -> Response<Body> {
        let mut response =
            error_response(self.code.status(), self.code.as_str(), &self.description);
        if self.code == TokenErrorCode::InvalidClient {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(basic_challenge),
            );
        }
        response
    }
}

/// An error in §5.2's shape, `{"error","error_description"}`, not to be stored by anyone.
pub fn error_response(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    let mut response = body::json_response(
        status,
        &json!({"error": error, "error_description": description}),
    );
    no_store(&mut response);
    response
}

/// The §5.1 answer: a Bearer token, its lifetime and its scopes, not to be stored by anyone.
pub fn token_response(access_token: &str, expires_in_s: u64, scope: &str) -> Response<Body> {
    let mut response = body::json_response(
        StatusCode::OK,
        &json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": expires_in_s,
            "scope": scope,
        }),
    );
    no_store(&mut response);
    response
}

fn no_store(response: &mut Response<Body>) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

/// The request's form parameters: it must be `application/x-www-form-urlencoded`, strictly
/// encoded, each parameter once.
pub fn form_params(headers: &HeaderMap, body: &[u8]) -> Result<FormParams, TokenError> {
    if !credentials::is_form_urlencoded(headers) {
        return Err(TokenError::invalid_request(
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    FormParams::parse(body).map_err(|err| TokenError::invalid_request(err.to_string()))
}

/// Who the client says it is: a client id and secret, from `Authorization: Basic`
/// (form-decoded, §2.3.1) or from the body, never both (§2.3).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: String,
    /// Basic credentials read as they are, when that differs from the §2.3.1 reading: many
    /// clients (Authlib and `requests` among them) do not form-encode before the Basic
    /// encoding, so a secret holding `+` or `%` reads differently. A server accepting either
    /// reading works with both kinds of client.
    pub unencoded: Option<(String, String)>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("unencoded", &self.unencoded.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ClientCredentials {
    /// The readings to try, the §2.3.1 one first: (client id, client secret).
    pub fn readings(&self) -> impl Iterator<Item = (&str, &str)> {
        std::iter::once((self.client_id.as_str(), self.client_secret.as_str())).chain(
            self.unencoded
                .as_ref()
                .map(|(id, secret)| (id.as_str(), secret.as_str())),
        )
    }

    pub fn from_request(headers: &HeaderMap, form: &FormParams) -> Result<Self, TokenError> {
        let basic = match headers.get(header::AUTHORIZATION) {
            None => None,
            Some(value) => Some(
                Authorization::parse(value)
                    .filter(|authorization| authorization.is("Basic"))
                    .and_then(|basic| basic_readings(basic.credentials))
                    .ok_or_else(|| TokenError::invalid_client("malformed Basic credentials"))?,
            ),
        };
        match basic {
            Some((BasicCredentials { user_id, password }, unencoded)) => {
                if form.get("client_secret").is_some() {
                    return Err(TokenError::invalid_request(
                        "use only one client authentication method (Basic or client_secret in \
                         the body)",
                    ));
                }
                if form
                    .get("client_id")
                    .is_some_and(|form_id| form_id != user_id)
                {
                    return Err(TokenError::invalid_client(
                        "client_id in the body differs from the Basic credentials",
                    ));
                }
                Ok(ClientCredentials {
                    client_id: user_id,
                    client_secret: password,
                    unencoded,
                })
            }
            None => match (form.get("client_id"), form.get("client_secret")) {
                (Some(id), Some(secret)) => Ok(ClientCredentials {
                    client_id: id.to_owned(),
                    client_secret: secret.to_owned(),
                    unencoded: None,
                }),
                _ => Err(TokenError::invalid_client(
                    "client authentication is required",
                )),
            },
        }
    }
}

/// Basic credentials as §2.3.1 reads them (falling back to the raw reading when they are not
/// well-formed form encoding), and the raw reading when it differs.
fn basic_readings(credentials: &str) -> Option<(BasicCredentials, Option<(String, String)>)> {
    let raw = BasicCredentials::decode(credentials)?;
    match raw.form_decoded() {
        Some(decoded) if decoded == raw => Some((decoded, None)),
        Some(decoded) => Some((decoded, Some((raw.user_id, raw.password)))),
        None => Some((raw, None)),
    }
}

/// The grant must be `client_credentials`.
pub fn check_grant_type(form: &FormParams) -> Result<(), TokenError> {
    match form.get("grant_type") {
        None => Err(TokenError::invalid_request("grant_type is required")),
        Some(CLIENT_CREDENTIALS) => Ok(()),
        Some(_) => Err(TokenError::new(
            TokenErrorCode::UnsupportedGrantType,
            "only client_credentials is supported",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn basic(user_pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
    }

    fn credentials(
        pairs: &[(&'static str, &str)],
        body: &str,
    ) -> Result<ClientCredentials, TokenError> {
        let form = FormParams::parse(body.as_bytes()).unwrap();
        ClientCredentials::from_request(&headers(pairs), &form)
    }

    fn code(result: Result<ClientCredentials, TokenError>) -> TokenErrorCode {
        result.unwrap_err().code
    }

    #[test]
    fn basic_or_post_credentials() {
        let from_basic = credentials(&[("authorization", &basic("my+app:s%3Acret"))], "").unwrap();
        assert_eq!(from_basic.client_id, "my app");
        assert_eq!(from_basic.client_secret, "s:cret");
        // Both readings, the RFC's first, when a client may not have form-encoded.
        let readings: Vec<(&str, &str)> = from_basic.readings().collect();
        assert_eq!(readings, [("my app", "s:cret"), ("my+app", "s%3Acret")]);
        // Not well-formed form encoding: only the raw reading.
        let raw_only = credentials(&[("authorization", &basic("app:100%"))], "").unwrap();
        assert_eq!(raw_only.readings().collect::<Vec<_>>(), [("app", "100%")]);
        // Nothing to decode: one reading.
        let plain = credentials(&[("authorization", &basic("app:secret"))], "").unwrap();
        assert_eq!(plain.readings().count(), 1);
        let same_id =
            credentials(&[("authorization", &basic("app:secret"))], "client_id=app").unwrap();
        assert_eq!(same_id.client_id, "app");
        let from_post = credentials(&[], "client_id=app&client_secret=s%2Bcret").unwrap();
        assert_eq!(from_post.client_secret, "s+cret");
        assert!(!format!("{from_post:?}").contains("s+cret"));
    }

    #[test]
    fn ambiguous_missing_or_malformed_credentials_are_refused() {
        let both = credentials(
            &[("authorization", &basic("app:secret"))],
            "client_id=app&client_secret=secret",
        );
        assert_eq!(code(both), TokenErrorCode::InvalidRequest);
        let other_id = credentials(
            &[("authorization", &basic("app:secret"))],
            "client_id=other",
        );
        assert_eq!(code(other_id), TokenErrorCode::InvalidClient);
        for (pairs, body) in [
            (vec![], ""),
            (vec![], "client_id=app"),
            (vec![], "client_secret=secret"),
            (
                vec![("authorization", "Bearer abc")],
                "client_id=app&client_secret=x",
            ),
            (vec![("authorization", "Basic %%%")], ""),
            (vec![("authorization", "Basic bm8tY29sb24=")], ""),
        ] {
            assert_eq!(
                code(credentials(&pairs, body)),
                TokenErrorCode::InvalidClient,
                "{pairs:?} {body}"
            );
        }
    }

    #[test]
    fn grant_type_and_form() {
        let form = |body: &str| FormParams::parse(body.as_bytes()).unwrap();
        assert!(check_grant_type(&form("grant_type=client_credentials")).is_ok());
        assert_eq!(
            check_grant_type(&form("")).unwrap_err().code,
            TokenErrorCode::InvalidRequest
        );
        assert_eq!(
            check_grant_type(&form("grant_type=password"))
                .unwrap_err()
                .code,
            TokenErrorCode::UnsupportedGrantType
        );
        let json = headers(&[("content-type", "application/json")]);
        assert_eq!(
            form_params(&json, b"grant_type=client_credentials")
                .unwrap_err()
                .code,
            TokenErrorCode::InvalidRequest
        );
        let form_type = headers(&[("content-type", "application/x-www-form-urlencoded")]);
        assert_eq!(
            form_params(&form_type, b"a=1&a=2").unwrap_err().code,
            TokenErrorCode::InvalidRequest
        );
    }

    #[test]
    fn answers_are_never_stored() {
        let ok = token_response("t", 60, "s");
        assert_eq!(ok.headers()[header::CACHE_CONTROL], "no-store");
        let refused =
            TokenError::new(TokenErrorCode::InvalidClient, "no").into_response("Basic realm=\"x\"");
        assert_eq!(refused.status(), 401);
        assert_eq!(refused.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(
            refused.headers()[header::WWW_AUTHENTICATE],
            "Basic realm=\"x\""
        );
        let scope = TokenError::new(TokenErrorCode::InvalidScope, "no").into_response("Basic");
        assert_eq!(scope.status(), 400);
        assert!(scope.headers().get(header::WWW_AUTHENTICATE).is_none());
    }
}
