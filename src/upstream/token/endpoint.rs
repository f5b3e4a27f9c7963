//! The token endpoint as a client sees it: the client-credentials request (RFC 6749 §4.4,
//! client authentication by Basic or in the body) and the validation of its answer, whose
//! errors never echo the body (it may hold a token).

use std::borrow::Cow;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::Full;
use serde::Deserialize;

use super::assertion::{client_assertion, JWT_BEARER};
use super::TokenFailure;
use crate::config::{ClientAuth, ClientCredential, TalkdeskSettings};
use crate::otel::Span;
use crate::upstream::transport::{describe_server, Transport, USER_AGENT};

/// The largest token response read.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// How to ask the token endpoint for a token.
pub(super) struct TokenRequest {
    url: String,
    client_id: String,
    credential: ClientCredential,
    scopes: String,
    pub(super) timeout: Duration,
}

impl TokenRequest {
    pub(super) fn new(talkdesk: &TalkdeskSettings) -> Self {
        TokenRequest {
            url: talkdesk.token_url.clone(),
            client_id: talkdesk.client_id.clone(),
            credential: talkdesk.client_credential.clone(),
            scopes: talkdesk.scopes.join(" "),
            timeout: talkdesk.timeout,
        }
    }

    /// The token request's client span in OpenTelemetry's HTTP conventions: the method, where
    /// it goes (`url.full` without the query, which this proxy does not control the content
    /// of; `token_url` cannot hold credentials), never what is sent.
    pub(super) fn describe(&self, span: &mut Span) {
        span.set("http.request.method", "POST");
        if let Ok(uri) = self.url.parse::<http::Uri>() {
            describe_server(span, &uri);
            if let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) {
                span.set("url.full", format!("{scheme}://{authority}{}", uri.path()));
            }
        }
    }

    /// One request to the token endpoint, within `timeout`; its answer validated. The request
    /// carries `span`'s `traceparent`, and the answer's status goes into it.
    pub(super) async fn send(
        &self,
        transport: &Transport,
        span: &mut Span,
    ) -> Result<ParsedToken, TokenFailure> {
        let mut request = self.build()?;
        span.inject(request.headers_mut());
        let answer = transport
            .attempt(request, self.timeout, MAX_TOKEN_RESPONSE_BYTES)
            .await
            .map_err(TokenFailure::Transport)?;
        span.set(
            "http.response.status_code",
            i64::from(answer.status.as_u16()),
        );
        if !answer.status.is_success() {
            return Err(TokenFailure::Refused {
                status: answer.status,
                oauth_error: oauth_error_code(&answer.body),
            });
        }
        parse_token_response(&answer.body)
    }

    fn build(&self) -> Result<Request<Full<Bytes>>, TokenFailure> {
        let r = self;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials")
            .append_pair("scope", &r.scopes);
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(&r.url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, USER_AGENT);
        match &r.credential {
            ClientCredential::Secret {
                secret,
                auth: ClientAuth::Basic,
            } => {
                // RFC 6749 §2.3.1: both parts form-encoded before base64.
                let pair = format!(
                    "{}:{}",
                    form_encode(&r.client_id),
                    form_encode(secret.expose())
                );
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                    .map_err(|_| TokenFailure::BadRequest("client credentials"))?;
                value.set_sensitive(true);
                builder = builder.header(header::AUTHORIZATION, value);
            }
            ClientCredential::Secret { secret, .. } => {
                form.append_pair("client_id", &r.client_id)
                    .append_pair("client_secret", secret.expose());
            }
            ClientCredential::PrivateKey { key, key_id } => {
                let assertion =
                    client_assertion(key, key_id, &r.client_id, &r.url).map_err(|_| {
                        TokenFailure::BadRequest("the client assertion could not be signed")
                    })?;
                form.append_pair("client_assertion_type", JWT_BEARER)
                    .append_pair("client_assertion", &assertion);
            }
        }
        builder
            .body(Full::new(Bytes::from(form.finish())))
            .map_err(|_| TokenFailure::BadRequest("token_url is not a valid request target"))
    }
}

/// A successful token response, validated.
pub struct ParsedToken {
    pub authorization: HeaderValue,
    pub expires_in: Duration,
}

/// A token endpoint's answer as RFC 6749 §5.1 describes it; other members are ignored.
#[derive(Deserialize)]
struct TokenResponse<'a> {
    #[serde(borrow)]
    access_token: Option<Cow<'a, str>>,
    /// `Some(None)` is an explicit `null`, which is refused like any other non-Bearer type.
    #[serde(borrow, default, deserialize_with = "present")]
    token_type: Option<Option<Cow<'a, str>>>,
    expires_in: Option<Lifetime<'a>>,
}

/// Deserializes a member that is present (even as `null`) as `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// `expires_in` as a number, or as a numeric string (some servers send one).
#[derive(Deserialize)]
#[serde(untagged)]
enum Lifetime<'a> {
    Seconds(f64),
    #[serde(borrow)]
    Text(Cow<'a, str>),
}

impl Lifetime<'_> {
    fn seconds(&self) -> Option<f64> {
        match self {
            Lifetime::Seconds(s) => Some(*s),
            Lifetime::Text(s) => s.trim().parse().ok(),
        }
    }
}

/// Validates a token endpoint's JSON answer. Errors never contain the body (which may hold
/// a token): serde's own messages can echo values, so they are replaced by fixed ones.
pub fn parse_token_response(body: &[u8]) -> Result<ParsedToken, TokenFailure> {
    let response: TokenResponse<'_> = serde_json::from_slice(body).map_err(|e| {
        TokenFailure::Malformed(if e.is_data() {
            "token response is not a token answer"
        } else {
            "token response is not JSON"
        })
    })?;
    let access_token =
        response
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or(TokenFailure::Malformed(
                "token response has no access_token",
            ))?;
    // Visible ASCII only (RFC 6750's b64token is a subset): `HeaderValue` would also take
    // spaces, tabs and non-ASCII bytes, which upstream would trim, split or refuse.
    let not_a_header =
        TokenFailure::Malformed("access_token has characters not allowed in a header");
    if !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(not_a_header);
    }
    let bearer =
        |t: &Option<Cow<'_, str>>| t.as_ref().is_some_and(|t| t.eq_ignore_ascii_case("bearer"));
    if response.token_type.is_some_and(|t| !bearer(&t)) {
        return Err(TokenFailure::Malformed(
            "token response's token_type is not Bearer",
        ));
    }
    let expires_in = response
        .expires_in
        .and_then(|l| l.seconds())
        .filter(|s| s.is_finite() && *s >= 1.0)
        .ok_or(TokenFailure::Malformed(
            "token response has no positive expires_in",
        ))?;
    let mut authorization =
        HeaderValue::from_str(&format!("Bearer {access_token}")).map_err(|_| not_a_header)?;
    authorization.set_sensitive(true);
    Ok(ParsedToken {
        authorization,
        // Capped at a year so instant arithmetic cannot overflow.
        expires_in: Duration::from_secs_f64(expires_in.min(365.0 * 86_400.0)),
    })
}

/// The OAuth `error` code of an error answer, when it is a short plain word (never the
/// description, which could echo input).
fn oauth_error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = value.get("error")?.as_str()?;
    (code.len() <= 40 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then(|| code.to_owned())
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 §2.3.1 wants it for
/// the id and secret inside a Basic header too).
pub fn form_encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_token_response() {
        let parsed = parse_token_response(
            br#"{"access_token":"abc","token_type":"Bearer","expires_in":600,"scope":"x"}"#,
        )
        .unwrap();
        assert_eq!(parsed.expires_in, Duration::from_secs(600));
        assert!(parsed.authorization.is_sensitive());
    }

    #[test]
    fn malformed_token_responses_are_refused_without_echoing_the_body() {
        for body in [
            &b"not json"[..],
            br#"{"token_type":"Bearer","expires_in":600}"#,
            br#"{"access_token":"secret-xyz","expires_in":0}"#,
            br#"{"access_token":"secret-xyz"}"#,
            br#"{"access_token":"secret-xyz","expires_in":600,"token_type":"mac"}"#,
            br#"{"access_token":"bad\nvalue","expires_in":600}"#,
        ] {
            let err = parse_token_response(body).err().unwrap().to_string();
            assert!(!err.contains("secret-xyz"), "{err}");
        }
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b:c/d"), "a+b%3Ac%2Fd");
    }
}
