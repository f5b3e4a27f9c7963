//! What a faulted answer is instead of the normal one, in the error shape of its route.

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use super::answers::{invalid_client, talkdesk_error, unauthorized};
use super::state::Simulation;
use super::{Fault, Outcome, SimRoute};
use crate::wire::body::Body;
use crate::wire::oauth;

/// The answer `fault` makes on `route` (`Delay` is the callers' to apply).
pub(super) fn outcome(sim: &Simulation, route: SimRoute, fault: Fault) -> Outcome {
    let token = route == SimRoute::Token;
    let error = |status: StatusCode, code: &str, message: &str| {
        if token {
            oauth::error_response(status, code, message)
        } else {
            talkdesk_error(status, code, message)
        }
    };
    let response = match fault {
        Fault::CloseConnection => return Outcome::Close,
        // Handled by the callers (answer normally after the delay); kept total here.
        Fault::Delay(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "simulated failure",
        ),
        Fault::Status500 => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            if token {
                "server_error"
            } else {
                "internal_server_error"
            },
            "simulated failure",
        ),
        Fault::TooManyRequests { retry_after_s } => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                if token {
                    "temporarily_unavailable"
                } else {
                    "too_many_requests"
                },
                "rate limit exceeded (simulated)",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            response
        }
        Fault::Unauthorized if token => invalid_client("client authentication failed (simulated)"),
        Fault::Unauthorized => unauthorized(
            sim,
            "the access token is not valid (simulated)",
            Some("invalid_token"),
        ),
        Fault::Respond {
            status,
            headers,
            body,
        } => custom_response(status, &headers, body),
    };
    Outcome::Answer(response)
}

fn custom_response(status: u16, headers: &[(String, String)], body: Bytes) -> Response<Body> {
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| !s.is_informational())
        .unwrap_or_else(|| {
            tracing::warn!(
                status,
                "simulator Respond fault: invalid status, answering 500"
            );
            StatusCode::INTERNAL_SERVER_ERROR
        });
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = status;
    for (name, value) in headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => {
                response.headers_mut().append(name, value);
            }
            _ => tracing::warn!(%name, "simulator Respond fault: invalid header skipped"),
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http::StatusCode;

    use super::super::testing::*;
    use super::super::{Fault, SimRoute};
    use crate::consent::ConsentStatus;

    #[tokio::test]
    async fn a_500_fault_is_consumed_once() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.set_status(CONTACT, ConsentStatus::Consented);
        sim.inject(SimRoute::Get, Fault::Status500, 1);
        let failed = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(failed.json()["code"].is_string());
        let ok = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(sim.stats().gets, 2, "faulted requests are counted");
        assert_eq!(sim.gets_for(CONTACT), 2);
    }

    #[tokio::test]
    async fn faults_apply_in_order_per_route() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.inject(SimRoute::Put, Fault::Unauthorized, 1);
        sim.inject(
            SimRoute::Put,
            Fault::TooManyRequests { retry_after_s: 7 },
            2,
        );
        sim.inject(SimRoute::Token, Fault::Status500, 1);
        let body = r#"{"status":"REFUSED"}"#;

        let first = put(&sim, CONTACT, &token, body).await.unwrap();
        assert_eq!(first.status, StatusCode::UNAUTHORIZED);
        assert_eq!(first.json()["code"], "unauthorized");
        for _ in 0..2 {
            let limited = put(&sim, CONTACT, &token, body).await.unwrap();
            assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(limited.header("retry-after"), Some("7"));
        }
        assert_eq!(
            sim.stored_status(CONTACT),
            None,
            "faulted PUTs write nothing"
        );
        let ok = put(&sim, CONTACT, &token, body).await.unwrap();
        assert_eq!(ok.status, StatusCode::CREATED);

        let token_fault = token_request(
            &sim,
            Some(&basic("sim-client", "sim-secret")),
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(token_fault.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(token_fault.json()["error"], "server_error");
        let stats = sim.stats();
        assert_eq!(stats.puts, 4);
        assert_eq!(stats.unauthorized, 1);
        assert_eq!((stats.token_requests, stats.tokens_issued), (2, 1));
    }

    #[tokio::test]
    async fn respond_fault_answers_verbatim() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.inject(
            SimRoute::Get,
            Fault::Respond {
                status: 302,
                headers: vec![
                    ("location".to_owned(), "http://elsewhere/".to_owned()),
                    ("content-type".to_owned(), "text/html".to_owned()),
                ],
                body: Bytes::from_static(b"<html>moved</html>"),
            },
            1,
        );
        let answer = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(answer.status, StatusCode::FOUND);
        assert_eq!(answer.header("location"), Some("http://elsewhere/"));
        assert_eq!(answer.header("content-type"), Some("text/html"));
        assert_eq!(answer.body, Bytes::from_static(b"<html>moved</html>"));
    }

    #[tokio::test]
    async fn close_fault_closes_the_connection() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.inject(SimRoute::Get, Fault::CloseConnection, 1);
        let err = get(&sim, CONTACT, &token).await.err().expect("no answer");
        let err = err.downcast_ref::<hyper::Error>().expect("a hyper error");
        assert!(err.is_incomplete_message(), "{err}");
        assert_eq!(
            get(&sim, CONTACT, &token).await.unwrap().status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(sim.stats().gets, 2);
    }

    #[tokio::test]
    async fn latency_and_delay_faults_slow_answers() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.set_latency(Duration::from_millis(100));
        let started = Instant::now();
        get(&sim, CONTACT, &token).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(100));

        sim.set_latency(Duration::ZERO);
        sim.inject(SimRoute::Token, Fault::Delay(Duration::from_millis(100)), 1);
        let started = Instant::now();
        token_request(
            &sim,
            Some(&basic("sim-client", "sim-secret")),
            "grant_type=client_credentials",
        )
        .await;
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(sim.stats().tokens_issued, 2);
    }
}
