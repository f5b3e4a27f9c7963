//! The OAuth 2.0 token endpoint (`POST /oauth/token`): the client credentials grant, client
//! authentication by `client_secret_basic`, `client_secret_post` or `private_key_jwt`, and OAuth's error shape
//! (`{"error","error_description"}`), on the plumbing the proxy's own endpoint shares.

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::answers::{method_not_allowed, TOKEN_REALM};
use super::assertion::ClientKeys;
use super::state::Simulation;
use super::{deliver, faults, read_body, CloseConnection, Fault, Outcome, SimRoute};
use crate::wire::body::Body;
use crate::wire::oauth::{self, ClientCredentials, TokenError, TokenErrorCode};

const MAX_TOKEN_BODY: usize = 64 * 1024;

pub(super) async fn token_endpoint(
    sim: &Simulation,
    req: Request<Incoming>,
) -> Result<Response<Body>, CloseConnection> {
    if req.method() != Method::POST {
        return Ok(method_not_allowed("POST"));
    }
    sim.counters.token_requests.fetch_add(1, Ordering::Relaxed);
    let mut wait = Duration::ZERO;
    match sim.take_fault(SimRoute::Token) {
        None => {}
        Some(Fault::Delay(delay)) => wait = delay,
        Some(fault) => return deliver(faults::outcome(sim, SimRoute::Token, fault), wait).await,
    }
    let (parts, body) = req.into_parts();
    let Some(body) = read_body(body, MAX_TOKEN_BODY).await? else {
        let response = oauth::error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "the body is too large",
        );
        return deliver(Outcome::Answer(response), wait).await;
    };
    let host = parts
        .uri
        .authority()
        .map(|authority| authority.as_str())
        .or_else(|| parts.headers.get(http::header::HOST)?.to_str().ok())
        .unwrap_or_default();
    let response = issue(sim, &parts.headers, &body, host)
        .unwrap_or_else(|refusal| refusal.into_response(TOKEN_REALM));
    deliver(Outcome::Answer(response), wait).await
}

/// The token endpoint's decision.
fn issue(
    sim: &Simulation,
    headers: &HeaderMap,
    body: &[u8],
    host: &str,
) -> Result<Response<Body>, TokenError> {
    let form = oauth::form_params(headers, body)?;
    if ClientKeys::presented(&form) {
        sim.client_keys.check(&form, &sim.client_id, host)?;
    } else {
        let client = ClientCredentials::from_request(headers, &form)?;
        if client.client_id != sim.client_id || client.client_secret != sim.client_secret {
            return Err(TokenError::new(
                TokenErrorCode::InvalidClient,
                "client authentication failed",
            ));
        }
    }
    oauth::check_grant_type(&form)?;

    let mut granted: Vec<String> = Vec::new();
    match form.get("scope").filter(|s| !s.trim().is_empty()) {
        None => granted.clone_from(&sim.allowed_scopes),
        Some(requested) => {
            for scope in requested.split(' ').filter(|s| !s.is_empty()) {
                if !sim.allowed_scopes.iter().any(|allowed| allowed == scope) {
                    return Err(TokenError::new(
                        TokenErrorCode::InvalidScope,
                        format!("the client may not be granted the scope '{scope}'"),
                    ));
                }
                if !granted.iter().any(|g| g == scope) {
                    granted.push(scope.to_owned());
                }
            }
        }
    }

    let scope = granted.join(" ");
    let (access_token, ttl) = sim.issue_token(granted);
    Ok(oauth::token_response(&access_token, ttl.as_secs(), &scope))
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};

    use super::super::testing::*;
    use super::super::{SimulatorConfig, TOKEN_PATH};

    #[tokio::test]
    async fn token_via_basic_and_via_post() {
        let sim = start().await;
        assert_eq!(sim.token_url(), format!("{}/oauth/token", sim.base_url()));
        assert!(sim.base_url().starts_with("http://127.0.0.1:"));

        let answer = token_request(
            &sim,
            Some(&basic("sim-client", "sim-secret")),
            "grant_type=client_credentials&scope=voicebiometrics-consent%3Aread+voicebiometrics-consent:write",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("cache-control"), Some("no-store"));
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let body = answer.json();
        assert!(body["access_token"].as_str().unwrap().len() >= 32);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 600);
        assert_eq!(
            body["scope"],
            "voicebiometrics-consent:read voicebiometrics-consent:write"
        );

        // client_secret_post, no scope: every allowed scope.
        let answer = token_request(
            &sim,
            None,
            "grant_type=client_credentials&client_id=sim-client&client_secret=sim-secret",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.json()["scope"],
            "voicebiometrics-consent:read voicebiometrics-consent:write"
        );

        let stats = sim.stats();
        assert_eq!((stats.token_requests, stats.tokens_issued), (2, 2));
    }

    #[tokio::test]
    async fn basic_credentials_are_form_decoded() {
        let sim = start_with(SimulatorConfig {
            client_id: "sim client".to_owned(),
            client_secret: "p@ss:w%rd".to_owned(),
            ..SimulatorConfig::default()
        })
        .await;
        let answer = token_request(
            &sim,
            Some(&basic("sim+client", "p%40ss%3Aw%25rd")),
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn token_errors() {
        let sim = start().await;
        let wrong = token_request(
            &sim,
            Some(&basic("sim-client", "nope")),
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert_eq!(wrong.json()["error"], "invalid_client");
        assert!(wrong.json()["error_description"].is_string());
        assert!(wrong
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Basic")));

        let missing = token_request(&sim, None, "grant_type=client_credentials").await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert_eq!(missing.json()["error"], "invalid_client");

        let auth = basic("sim-client", "sim-secret");
        let scope = token_request(
            &sim,
            Some(&auth),
            "grant_type=client_credentials&scope=voicebiometrics-enroll%3Awrite",
        )
        .await;
        assert_eq!(scope.status, StatusCode::BAD_REQUEST);
        assert_eq!(scope.json()["error"], "invalid_scope");

        let grant = token_request(&sim, Some(&auth), "grant_type=password").await;
        assert_eq!(grant.status, StatusCode::BAD_REQUEST);
        assert_eq!(grant.json()["error"], "unsupported_grant_type");

        let json = send(
            sim.addr(),
            Method::POST,
            TOKEN_PATH,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            r#"{"grant_type":"client_credentials"}"#,
        )
        .await
        .unwrap();
        assert_eq!(json.status, StatusCode::BAD_REQUEST);
        assert_eq!(json.json()["error"], "invalid_request");

        for malformed in [
            "grant_type=client_credentials&grant_type=client_credentials",
            "grant_type=client_credentials&scope=%zz",
        ] {
            let answer = token_request(&sim, Some(&auth), malformed).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{malformed}");
            assert_eq!(answer.json()["error"], "invalid_request", "{malformed}");
        }

        let stats = sim.stats();
        assert_eq!((stats.token_requests, stats.tokens_issued), (7, 0));
        assert_eq!(stats.unauthorized, 0, "token 401s are not consent 401s");
    }
}
