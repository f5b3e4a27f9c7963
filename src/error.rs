//! The proxy's one error type, and the single place where errors become HTTP answers.
//!
//! Each variant names what failed (the caller's request, upstream, the token endpoint, the
//! cluster or the proxy itself), and a failure keeps its cause: a [`Failure`] holds a context
//! and the underlying error behind an `Arc`, so one error can be handed to every request
//! waiting on a coalesced fill without losing its source. The mapping to the contract's status
//! codes and `{code, message, fields}` bodies lives only here.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

/// An error shared by everyone who waits on the operation that failed.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// What failed (a short context for logs) and why (the underlying error, if any).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{context}")]
pub struct Failure {
    context: Cow<'static, str>,
    #[source]
    cause: Option<SharedError>,
}

impl Failure {
    /// A failure with a cause.
    pub fn new(
        context: impl Into<Cow<'static, str>>,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Failure {
            context: context.into(),
            cause: Some(Arc::new(cause)),
        }
    }

    /// A failure whose context says it all.
    pub fn msg(context: impl Into<Cow<'static, str>>) -> Self {
        Failure {
            context: context.into(),
            cause: None,
        }
    }
}

impl From<&'static str> for Failure {
    fn from(context: &'static str) -> Self {
        Failure::msg(context)
    }
}

impl From<String> for Failure {
    fn from(context: String) -> Self {
        Failure::msg(context)
    }
}

/// Displays an error followed by each of its sources (`a: b: c`), for logs.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Some errors (redis', io-wrapping ones) already end their own text with their
        // cause's: such a cause is not written twice.
        let mut written = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !written.ends_with(&text) {
                written.push_str(": ");
                written.push_str(&text);
            }
            source = cause.source();
        }
        f.write_str(&written)
    }
}

/// One field named in an `invalid_body` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid contact id")]
    InvalidContactId,
    #[error("invalid body: {message}")]
    InvalidBody {
        message: String,
        fields: Vec<FieldProblem>,
    },
    #[error("wrong credentials")]
    Unauthorized,
    /// No credentials at all (the same answer as [`ProxyError::Unauthorized`]; counted apart).
    #[error("no credentials")]
    MissingCredentials,
    /// Too many failed authentications from the caller's address (or for the Basic name it
    /// claimed) within the throttle's window; retry after this.
    #[error("too many failed authentications")]
    TooManyAttempts { retry_after: Duration },
    /// An `Authorization: Bearer` value that is neither a client's key nor an acceptable
    /// access token (the cause says why).
    #[error("wrong credentials")]
    InvalidToken(#[source] Failure),
    #[error("the client lacks the '{0}' permission")]
    Forbidden(&'static str),
    /// The client holds the permission, or may, but the access token's scope does not.
    #[error("the access token's scope lacks '{0}'")]
    ScopeLacks(&'static str),
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("unsupported content type")]
    UnsupportedMediaType,
    #[error("request body not received in time")]
    RequestTimeout,
    #[error("upstream error")]
    Upstream(#[source] Failure),
    #[error("no valid token")]
    TokenUnavailable(#[source] Failure),
    #[error("upstream timeout")]
    UpstreamTimeout,
    /// Nothing was sent: the circuit is open, upstream's `Retry-After` holds, or the budget
    /// has no room before the deadline.
    #[error("upstream unavailable ({reason})")]
    UpstreamUnavailable {
        reason: &'static str,
        retry_after: Duration,
    },
    /// A PUT that could not first be announced to the cluster (`write_policy = "require"`);
    /// upstream was not called.
    #[error("the write could not be announced to the cluster")]
    ClusterUnavailable(#[source] Failure),
    /// A PUT whose pending audit record could not be made durable (`audit.write_policy =
    /// "require"`), or an audit read the store could not answer; upstream was not called.
    #[error("the audit store is unavailable")]
    AuditUnavailable(#[source] Failure),
    /// `GET /admin/audit/...` while `audit.enabled = false`.
    #[error("auditing is off")]
    AuditDisabled,
    #[error("internal error")]
    Internal(#[source] Failure),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidContactId | ProxyError::InvalidBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Unauthorized
            | ProxyError::MissingCredentials
            | ProxyError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            ProxyError::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Forbidden(_) | ProxyError::ScopeLacks(_) => StatusCode::FORBIDDEN,
            ProxyError::NotFound | ProxyError::AuditDisabled => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::TokenUnavailable(_)
            | ProxyError::ClusterUnavailable(_)
            | ProxyError::AuditUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the error says upstream cannot answer now (it failed, timed out, was
    /// unreachable, admission refused to call it, or no token could be had), as opposed to
    /// the caller's request or the proxy being at fault. A GET that failed so may be answered
    /// STALE (`cache.stale_if_error_s`).
    pub fn upstream_cannot_answer(&self) -> bool {
        matches!(
            self,
            ProxyError::Upstream(_)
                | ProxyError::UpstreamTimeout
                | ProxyError::UpstreamUnavailable { .. }
                | ProxyError::TokenUnavailable(_)
        )
    }

    /// The contract's machine-readable `code`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::InvalidContactId => "invalid_contact_id",
            ProxyError::InvalidBody { .. } => "invalid_body",
            ProxyError::Unauthorized
            | ProxyError::MissingCredentials
            | ProxyError::InvalidToken(_) => "unauthorized",
            ProxyError::TooManyAttempts { .. } => "too_many_attempts",
            ProxyError::Forbidden(_) | ProxyError::ScopeLacks(_) => "forbidden",
            ProxyError::NotFound => "not_found",
            ProxyError::MethodNotAllowed { .. } => "method_not_allowed",
            ProxyError::PayloadTooLarge { .. } => "payload_too_large",
            ProxyError::UnsupportedMediaType => "unsupported_media_type",
            ProxyError::RequestTimeout => "request_timeout",
            ProxyError::Upstream(_) => "upstream_error",
            ProxyError::TokenUnavailable(_) => "token_unavailable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::UpstreamUnavailable { .. } => "upstream_unavailable",
            ProxyError::ClusterUnavailable(_) => "cluster_unavailable",
            ProxyError::AuditUnavailable(_) => "audit_unavailable",
            ProxyError::AuditDisabled => "audit_disabled",
            ProxyError::Internal(_) => "internal_error",
        }
    }

    /// The message shown to the caller: says what went wrong without internals or secrets.
    fn public_message(&self) -> String {
        match self {
            ProxyError::InvalidContactId => "contact_id must be 1 to 64 characters of A-Z a-z 0-9 + . _ -, starting with a letter, a digit or +".into(),
            ProxyError::InvalidBody { message, .. } => message.clone(),
            ProxyError::Unauthorized | ProxyError::MissingCredentials => {
                "a valid API key or access token is required".into()
            }
            ProxyError::TooManyAttempts { .. } => "too many failed authentications from this address or for this client name; retry after the time in Retry-After".into(),
            ProxyError::InvalidToken(_) => {
                "the Bearer credential is neither a client's key nor a valid access token".into()
            }
            ProxyError::Forbidden(permission) => {
                format!("this client lacks the '{permission}' permission")
            }
            ProxyError::ScopeLacks(permission) => format!(
                "this access token's scope lacks '{permission}': request a token with the scope \
                 voicebiometrics-consent:{permission}, or none (every permission the client holds)"
            ),
            ProxyError::NotFound => "no such route".into(),
            ProxyError::MethodNotAllowed { allow } => format!("allowed methods: {allow}"),
            ProxyError::PayloadTooLarge { limit } => {
                format!("the body is larger than {limit} bytes")
            }
            ProxyError::UnsupportedMediaType => "the body must be application/json".into(),
            ProxyError::RequestTimeout => "the request body was not received in time".into(),
            ProxyError::Upstream(_) => "the consent API failed or answered something unusable".into(),
            ProxyError::TokenUnavailable(_) => "no access token can be had from the token endpoint".into(),
            ProxyError::UpstreamTimeout => "the consent API did not answer in time".into(),
            ProxyError::UpstreamUnavailable { .. } => {
                "the consent API is unavailable for now; retry after the time in Retry-After".into()
            }
            ProxyError::ClusterUnavailable(_) => "the write could not be announced to the other instances of the cluster, so it was not sent to the consent API; retry it".into(),
            ProxyError::AuditUnavailable(_) => "the audit store is unavailable (a write that cannot be recorded is not sent to the consent API); retry it".into(),
            ProxyError::AuditDisabled => "auditing is off (audit.enabled = false)".into(),
            ProxyError::Internal(_) => "internal error".into(),
        }
    }

    /// The error as the contract's JSON answer, with the headers some codes require.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut body = json!({ "code": self.code(), "message": self.public_message() });
        if let ProxyError::InvalidBody { fields, .. } = &self {
            if !fields.is_empty() {
                body["fields"] = fields
                    .iter()
                    .map(|f| json!({ "name": f.name, "description": f.description }))
                    .collect();
            }
        }
        let mut response = crate::wire::body::json_response(self.status(), &body);
        let headers = response.headers_mut();
        match self {
            ProxyError::Unauthorized | ProxyError::MissingCredentials => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(BASIC_CHALLENGE),
                );
            }
            ProxyError::InvalidToken(_) => {
                // RFC 6750 §3: the Bearer scheme's challenge, saying the token was refused.
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"consent-proxy\", error=\"invalid_token\"",
                    ),
                );
            }
            ProxyError::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ProxyError::UpstreamUnavailable { retry_after, .. }
            | ProxyError::TooManyAttempts { retry_after } => {
                let seconds = retry_after_seconds(retry_after);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            _ => {}
        }
        response
    }
}

/// The challenge of a 401 for a missing or unknown key, or an OAuth `invalid_client`.
pub const BASIC_CHALLENGE: &str = "Basic realm=\"consent-proxy\"";

/// A wait as `Retry-After` seconds: rounded up, never 0 (which would invite an immediate
/// retry).
pub fn retry_after_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_shape_and_headers() {
        let response = ProxyError::Unauthorized.into_response();
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            "Basic realm=\"consent-proxy\""
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["code"], "unauthorized");

        let response = ProxyError::InvalidBody {
            message: "bad".into(),
            fields: vec![FieldProblem {
                name: "status".into(),
                description: "required".into(),
            }],
        }
        .into_response();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["fields"][0]["name"], "status");
    }

    #[tokio::test]
    async fn a_refused_bearer_value_gets_the_bearer_challenge() {
        let cause = Failure::msg("access token expired");
        let response = ProxyError::InvalidToken(cause).into_response();
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"consent-proxy\", error=\"invalid_token\""
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["code"], "unauthorized");
        assert!(!value["message"].as_str().unwrap().contains("expired"));
    }

    #[test]
    fn retry_after_is_rounded_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_seconds(Duration::from_millis(3001)), 4);
    }

    #[test]
    fn upstream_details_never_reach_the_caller() {
        let err = ProxyError::Upstream("token abc123 rejected".into());
        assert!(!err.public_message().contains("abc123"));
        assert!(
            ErrorChain(&err).to_string().contains("abc123"),
            "kept for the logs"
        );
    }

    #[test]
    fn a_cause_the_error_already_ends_with_is_not_repeated() {
        /// Like redis' error: its text ends with its cause's.
        #[derive(Debug)]
        struct Wrapping(std::io::Error);
        impl fmt::Display for Wrapping {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "connecting: {}", self.0)
            }
        }
        impl std::error::Error for Wrapping {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let failure = Failure::new("cluster feed", Wrapping(refused()));
        assert_eq!(
            ErrorChain(&failure).to_string(),
            "cluster feed: connecting: refused"
        );
        // A cause that adds something is kept.
        let failure = Failure::new("cluster feed", refused());
        assert_eq!(ErrorChain(&failure).to_string(), "cluster feed: refused");
    }
}
