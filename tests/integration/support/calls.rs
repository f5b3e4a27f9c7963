//! What many test modules send to the proxy, and what they check of every proxy-made error:
//! credentials, consent paths, requests with other headers and bodies, and the "upstream was
//! never called" check.

use base64::Engine as _;
use consent_proxy::simulator::Simulator;
use http::Method;

use super::{Harness, TestResponse};

/// An `Authorization: Basic` value.
pub fn basic(user: &str, key: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{key}"));
    format!("Basic {encoded}")
}

/// The consent route's path for `contact` (as given: encoded or not).
pub fn consent_path(contact: &str) -> String {
    format!("/voicebiometrics/contacts/{contact}/consent")
}

/// Upstream's consent API was never called (the token endpoint may have been).
pub fn assert_upstream_untouched(sim: &Simulator) {
    let stats = sim.stats();
    assert_eq!(stats.gets, 0, "upstream GETs: {stats:?}");
    assert_eq!(stats.puts, 0, "upstream PUTs: {stats:?}");
    assert!(
        sim.last_consent_request().is_none(),
        "upstream saw {:?}",
        sim.last_consent_request()
    );
}

/// A proxy-made error: status, `code`, JSON content type and a request id.
pub fn assert_proxy_error(response: &TestResponse, status: u16, code: &str) {
    assert_eq!(
        response.status,
        status,
        "body: {}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.code(), code, "body: {}", response.text());
    assert!(
        response.json()["message"].is_string(),
        "no message: {}",
        response.text()
    );
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert!(response.header("x-request-id").is_some(), "no x-request-id");
}

/// `Harness::get`/`put` with other credentials, paths and bodies.
pub async fn send(
    h: &Harness,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> TestResponse {
    h.http
        .send(
            method,
            &format!("{}{path}", h.proxy.url()),
            headers,
            body.map(str::to_owned),
        )
        .await
}
