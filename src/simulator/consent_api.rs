//! The consent API: `GET`/`PUT /voicebiometrics/contacts/{contact_id}/consent`, with bearer
//! tokens checked against the issued ones, and Talkdesk's error shape (`{"code","message"}`).

use std::sync::atomic::Ordering;

use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::answers::{
    invalid_body, method_not_allowed, status_response, talkdesk_error, unauthorized,
};
use super::state::{Simulation, TokenCheck};
use super::SimRoute;
use super::{deliver, faults, read_body, CloseConnection, Fault, Outcome, RecordedRequest};
use crate::consent::{parse_consent_body, ConsentStatus, ContactId};
use crate::consent::{READ_SCOPE, WRITE_SCOPE};
use crate::wire::body::Body;
use crate::wire::credentials::Authorization;

const MAX_CONSENT_BODY: usize = 64 * 1024;

/// Decides a consent request on arrival (record, count, fault, token, contact, then the read
/// or the write) and answers after the latency and any delays.
pub(super) async fn consent_endpoint(
    sim: &Simulation,
    req: Request<Incoming>,
    segment: String,
) -> Result<Response<Body>, CloseConnection> {
    record_request(sim, &req);
    let (route, scope) = match *req.method() {
        Method::GET => (SimRoute::Get, READ_SCOPE),
        Method::PUT => (SimRoute::Put, WRITE_SCOPE),
        _ => return Ok(method_not_allowed("GET, PUT")),
    };
    let contact = ContactId::from_path_segment(&segment);
    count_consent_request(sim, route, contact.as_ref());

    let mut wait = sim.latency();
    match sim.take_fault(route) {
        None => {}
        Some(Fault::Delay(delay)) => wait = wait.saturating_add(delay),
        Some(fault) => return deliver(faults::outcome(sim, route, fault), wait).await,
    }

    let (parts, body) = req.into_parts();
    if let Some(response) = bearer_rejection(sim, &parts.headers, scope) {
        return deliver(Outcome::Answer(response), wait).await;
    }
    let Some(contact) = contact else {
        let response = talkdesk_error(
            StatusCode::BAD_REQUEST,
            "invalid_contact_id",
            "contact_id must be 1 to 64 characters of A-Z a-z 0-9 + . _ -, starting with a letter, a digit or +",
        );
        return deliver(Outcome::Answer(response), wait).await;
    };

    let response = match route {
        SimRoute::Get => {
            let (status, extra_wait) = sim.read_for_get(&contact);
            wait = wait.saturating_add(extra_wait);
            match status {
                Some(status) => status_response(StatusCode::OK, status),
                None if sim.unknown_as_no_consent() => {
                    status_response(StatusCode::OK, ConsentStatus::NoConsent)
                }
                None => talkdesk_error(StatusCode::NOT_FOUND, "not_found", "contact not found"),
            }
        }
        SimRoute::Put | SimRoute::Token => {
            let Some(bytes) = read_body(body, MAX_CONSENT_BODY).await? else {
                let response = talkdesk_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the body is too large",
                );
                return deliver(Outcome::Answer(response), wait).await;
            };
            match parse_consent_body(&bytes) {
                Ok(status) => {
                    let previous = sim
                        .state()
                        .contacts
                        .insert(contact.as_str().to_owned(), status);
                    let code = if previous.is_some() {
                        StatusCode::OK
                    } else {
                        StatusCode::CREATED
                    };
                    status_response(code, status)
                }
                Err(err) => invalid_body(&err.message, err.field.as_deref()),
            }
        }
    };
    deliver(Outcome::Answer(response), wait).await
}

fn record_request(sim: &Simulation, req: &Request<Incoming>) {
    let recorded = RecordedRequest {
        method: req.method().as_str().to_owned(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| req.uri().path().to_owned()),
        headers: req
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    sim.state().last_consent_request = Some(recorded);
}

fn count_consent_request(sim: &Simulation, route: SimRoute, contact: Option<&ContactId>) {
    let total = match route {
        SimRoute::Get => &sim.counters.gets,
        _ => &sim.counters.puts,
    };
    total.fetch_add(1, Ordering::Relaxed);
    if let Some(contact) = contact {
        let mut state = sim.state();
        let per_contact = match route {
            SimRoute::Get => &mut state.gets_per_contact,
            _ => &mut state.puts_per_contact,
        };
        *per_contact.entry(contact.as_str().to_owned()).or_insert(0) += 1;
    }
}

/// Checks the bearer token of a consent request: `Some` is the 401/403 answer.
fn bearer_rejection(sim: &Simulation, headers: &HeaderMap, scope: &str) -> Option<Response<Body>> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(Authorization::parse)
        .filter(|authorization| authorization.is("Bearer"));
    let Some(token) = token else {
        return Some(unauthorized(sim, "a bearer token is required", None));
    };
    match sim.check_token(token.credentials, scope) {
        TokenCheck::Valid => None,
        TokenCheck::Unknown => Some(unauthorized(
            sim,
            "the access token is not valid",
            Some("invalid_token"),
        )),
        TokenCheck::Expired => {
            sim.counters
                .expired_token_uses
                .fetch_add(1, Ordering::Relaxed);
            Some(unauthorized(
                sim,
                "the access token has expired",
                Some("invalid_token"),
            ))
        }
        TokenCheck::LacksScope => Some(talkdesk_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("the access token lacks the scope '{scope}'"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http::{Method, StatusCode};
    use serde_json::json;

    use super::super::testing::*;
    use super::super::SimStats;
    use crate::consent::{ConsentStatus, READ_SCOPE, WRITE_SCOPE};

    #[tokio::test]
    async fn get_unknown_is_404() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let answer = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert_eq!(
            answer.json(),
            json!({"code": "not_found", "message": "contact not found"})
        );

        sim.set_unknown_as_no_consent(true);
        let answer = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json(), json!({"status": "NO_CONSENT"}));
    }

    #[tokio::test]
    async fn put_creates_then_updates_then_get_reads() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let first = put(&sim, CONTACT, &token, r#"{"status":"CONSENTED"}"#)
            .await
            .unwrap();
        assert_eq!(first.status, StatusCode::CREATED);
        assert_eq!(first.json(), json!({"status": "CONSENTED"}));
        let second = put(&sim, CONTACT, &token, r#"{"status":"REFUSED"}"#)
            .await
            .unwrap();
        assert_eq!(second.status, StatusCode::OK);
        assert_eq!(second.json(), json!({"status": "REFUSED"}));

        let read = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.header("content-type"), Some("application/json"));
        assert_eq!(read.body, Bytes::from_static(br#"{"status":"REFUSED"}"#));
        assert_eq!(sim.stored_status(CONTACT), Some(ConsentStatus::Refused));
        let stats = sim.stats();
        assert_eq!((stats.gets, stats.puts), (1, 2));
    }

    #[tokio::test]
    async fn encoded_and_raw_plus_are_one_contact() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.set_status(CONTACT_ENCODED, ConsentStatus::Deleted);
        let raw = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(raw.json(), json!({"status": "DELETED"}));
        let encoded = get(&sim, CONTACT_ENCODED, &token).await.unwrap();
        assert_eq!(encoded.json(), json!({"status": "DELETED"}));
        let update = put(&sim, CONTACT_ENCODED, &token, r#"{"status":"CONSENTED"}"#)
            .await
            .unwrap();
        assert_eq!(update.status, StatusCode::OK, "seeded contact exists");

        assert_eq!(sim.gets_for(CONTACT), 2);
        assert_eq!(sim.gets_for(CONTACT_ENCODED), 2);
        assert_eq!(sim.puts_for(CONTACT), 1);
        assert_eq!(sim.stored_status(CONTACT), Some(ConsentStatus::Consented));
    }

    #[tokio::test]
    async fn bearer_missing_unknown_or_expired_is_401() {
        let sim = start().await;
        sim.set_status(CONTACT, ConsentStatus::Consented);
        let missing = send(sim.addr(), Method::GET, &consent_path(CONTACT), &[], "")
            .await
            .unwrap();
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert_eq!(missing.json()["code"], "unauthorized");
        assert!(missing.json()["message"].is_string());

        let unknown = get(&sim, CONTACT, "not-a-token").await.unwrap();
        assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
        assert_eq!(unknown.json()["code"], "unauthorized");

        sim.set_token_ttl(Duration::ZERO);
        let expired = token(&sim, None).await;
        let answer = get(&sim, CONTACT, &expired).await.unwrap();
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.json()["code"], "unauthorized");

        let stats = sim.stats();
        assert_eq!(stats.unauthorized, 3);
        assert_eq!(stats.expired_token_uses, 1);
        assert_eq!(stats.gets, 3);

        sim.set_token_ttl(Duration::from_secs(60));
        let fresh = token(&sim, None).await;
        assert_eq!(
            get(&sim, CONTACT, &fresh).await.unwrap().status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn lacking_scope_is_403() {
        let sim = start().await;
        let read_only = token(&sim, Some(READ_SCOPE)).await;
        let answer = put(&sim, CONTACT, &read_only, r#"{"status":"CONSENTED"}"#)
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert_eq!(answer.json()["code"], "forbidden");
        assert_eq!(sim.stored_status(CONTACT), None);

        let write_only = token(&sim, Some(WRITE_SCOPE)).await;
        let answer = get(&sim, CONTACT, &write_only).await.unwrap();
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert_eq!(sim.stats().unauthorized, 0);
    }

    #[tokio::test]
    async fn bad_body_and_bad_contact_are_400() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let extra = put(&sim, CONTACT, &token, r#"{"status":"REFUSED","why":"x"}"#)
            .await
            .unwrap();
        assert_eq!(extra.status, StatusCode::BAD_REQUEST);
        let body = extra.json();
        assert_eq!(body["code"], "invalid_body");
        assert!(body["message"].is_string());
        assert_eq!(body["fields"][0]["name"], "why");
        assert!(body["fields"][0]["description"].is_string());

        let wrong = put(&sim, CONTACT, &token, r#"{"status":"MAYBE"}"#)
            .await
            .unwrap();
        assert_eq!(wrong.json()["fields"][0]["name"], "status");
        let not_json = put(&sim, CONTACT, &token, "status=REFUSED").await.unwrap();
        assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
        assert_eq!(not_json.json()["code"], "invalid_body");

        let bad_id = get(&sim, "%2F1555", &token).await.unwrap();
        assert_eq!(bad_id.status, StatusCode::BAD_REQUEST);
        assert_eq!(bad_id.json()["code"], "invalid_contact_id");
        assert_eq!(sim.stored_status(CONTACT), None);
    }

    #[tokio::test]
    async fn records_the_last_consent_request() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let auth = format!("Bearer {token}");
        let path = format!("{}?x=1", consent_path(CONTACT_ENCODED));
        send(
            sim.addr(),
            Method::GET,
            &path,
            &[("authorization", &auth), ("X-Request-Id", "req-42")],
            "",
        )
        .await
        .unwrap();
        let recorded = sim.last_consent_request().expect("recorded");
        assert_eq!(recorded.method, "GET");
        assert_eq!(recorded.path_and_query, path);
        assert_eq!(recorded.header("x-request-id"), Some("req-42"));
        assert_eq!(recorded.header("Authorization"), Some(auth.as_str()));
        assert!(!recorded.has_header("x-api-key"));
        sim.reset_counters();
        assert_eq!(sim.last_consent_request(), None);
        assert_eq!(sim.stats(), SimStats::default());
    }

    #[tokio::test]
    async fn delayed_get_answers_what_it_read_on_arrival() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.set_status(CONTACT, ConsentStatus::Consented);
        sim.delay_next_get(CONTACT_ENCODED, Duration::from_millis(300), 1);

        let slow = {
            let sim = sim.clone();
            let token = token.clone();
            tokio::spawn(async move { get(&sim, CONTACT, &token).await })
        };
        // The current-thread runtime runs the GET's arrival (count + read) in one go.
        while sim.gets_for(CONTACT) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let started = Instant::now();
        let write = put(&sim, CONTACT, &token, r#"{"status":"REFUSED"}"#)
            .await
            .unwrap();
        assert_eq!(write.status, StatusCode::OK);
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "PUT not delayed"
        );

        let slow = slow.await.unwrap().unwrap();
        assert_eq!(slow.json(), json!({"status": "CONSENTED"}));
        let fresh = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(fresh.json(), json!({"status": "REFUSED"}));
    }
}
