//! The answers the simulated Talkdesk gives, built in one place for every endpoint and fault:
//! the consent API's bodies and Talkdesk's error shape (`{"code","message"}`), its 401 with
//! the Bearer challenge, and the token endpoint's `invalid_client`.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use super::state::Simulation;
use crate::consent::ConsentStatus;
use crate::wire::body::{self, Body};
use crate::wire::oauth::{TokenError, TokenErrorCode};

pub(super) const TOKEN_REALM: &str = "Basic realm=\"talkdesk-simulator\"";

pub(super) fn status_response(code: StatusCode, status: ConsentStatus) -> Response<Body> {
    let canonical = Bytes::from_static(status.canonical_body());
    body::bytes_response(code, body::APPLICATION_JSON, canonical)
}

pub(super) fn invalid_body(message: &str, field: Option<&str>) -> Response<Body> {
    let body = json!({
        "code": "invalid_body",
        "message": message,
        "fields": [{"name": field.unwrap_or("body"), "description": message}],
    });
    body::json_response(StatusCode::BAD_REQUEST, &body)
}

/// A consent-API 401, counted.
pub(super) fn unauthorized(sim: &Simulation, message: &str, error: Option<&str>) -> Response<Body> {
    sim.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
    let mut response = talkdesk_error(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let challenge = match error {
        Some(error) => format!("Bearer error=\"{error}\""),
        None => "Bearer".to_owned(),
    };
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// Talkdesk's error shape: `{"code","message"}`.
pub(super) fn talkdesk_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    body::json_response(status, &json!({"code": code, "message": message}))
}

pub(super) fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = talkdesk_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

/// A 401 `invalid_client`, with the Basic challenge RFC 6749 §5.2 asks for.
pub(super) fn invalid_client(description: &'static str) -> Response<Body> {
    TokenError::new(TokenErrorCode::InvalidClient, description).into_response(TOKEN_REALM)
}
