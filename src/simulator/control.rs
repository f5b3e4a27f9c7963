//! The control surface under `/_sim/`, for tests driving a simulator out of process (see
//! [`Simulator`](super::Simulator) for the list): no authentication; bad input is a 400 in
//! Talkdesk's error shape.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::answers::{invalid_body, method_not_allowed, status_response, talkdesk_error};
use super::state::{millis, Simulation};
use super::{read_body, CloseConnection, Fault, SimRoute};
use crate::consent::{parse_consent_body, ContactId};
use crate::wire::body::{self, Body};

pub(super) const CONTROL_PREFIX: &str = "/_sim/";
const MAX_CONTROL_BODY: usize = 1024 * 1024;
/// Largest body `/_sim/faults` will generate from `body_len` (for "huge upstream body" tests).
const MAX_GENERATED_BODY: usize = 64 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    route: String,
    fault: String,
    #[serde(default = "one")]
    count: u32,
    delay_ms: Option<u64>,
    retry_after_s: Option<u64>,
    status: Option<u16>,
    headers: Option<HeaderSpec>,
    body: Option<String>,
    body_len: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HeaderSpec {
    Map(BTreeMap<String, String>),
    List(Vec<(String, String)>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayGetRequest {
    contact: String,
    delay_ms: u64,
    #[serde(default = "one")]
    count: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyRequest {
    latency_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenTtlRequest {
    token_ttl_s: Option<u64>,
    token_ttl_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnknownContactRequest {
    answer: String,
}

fn one() -> u32 {
    1
}

pub(super) async fn control_endpoint(sim: &Simulation, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix(CONTROL_PREFIX) else {
        return talkdesk_error(StatusCode::NOT_FOUND, "not_found", "no such control");
    };
    let body = match read_body(req.into_body(), MAX_CONTROL_BODY).await {
        Ok(Some(body)) => body,
        Ok(None) => {
            return talkdesk_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body is too large",
            )
        }
        Err(CloseConnection) => {
            return talkdesk_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "body unreadable",
            )
        }
    };
    let result = match (rest, &method) {
        ("stats", &Method::GET) => to_json(&sim.report()),
        ("faults", &Method::POST) => control_fault(sim, &body),
        ("faults", &Method::DELETE) => {
            sim.clear_faults();
            ok_json()
        }
        ("delay-get", &Method::POST) => parse_json::<DelayGetRequest>(&body).map(|r| {
            sim.delay_next_get(&r.contact, Duration::from_millis(r.delay_ms), r.count);
            json!({"ok": true})
        }),
        ("latency", &Method::POST) => parse_json::<LatencyRequest>(&body).map(|r| {
            sim.set_latency(Duration::from_millis(r.latency_ms));
            json!({"ok": true, "latency_ms": r.latency_ms})
        }),
        ("token-ttl", &Method::POST) => parse_json::<TokenTtlRequest>(&body).and_then(|r| {
            let ttl = match (r.token_ttl_s, r.token_ttl_ms) {
                (Some(s), None) => Duration::from_secs(s),
                (None, Some(ms)) => Duration::from_millis(ms),
                _ => return Err("give exactly one of token_ttl_s, token_ttl_ms".to_owned()),
            };
            sim.set_token_ttl(ttl);
            Ok(json!({"ok": true, "token_ttl_ms": millis(ttl)}))
        }),
        ("unknown-contact", &Method::POST) => {
            parse_json::<UnknownContactRequest>(&body).and_then(|r| {
                let on = match r.answer.as_str() {
                    "not_found" | "404" => false,
                    "no_consent" | "NO_CONSENT" => true,
                    other => return Err(format!("unknown answer '{other}'")),
                };
                sim.set_unknown_as_no_consent(on);
                ok_json()
            })
        }
        ("reset", &Method::POST) => {
            sim.reset_counters();
            sim.clear_faults();
            ok_json()
        }
        (
            "stats" | "faults" | "delay-get" | "latency" | "token-ttl" | "unknown-contact"
            | "reset",
            _,
        ) => {
            return talkdesk_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed",
            )
        }
        (other, _) => match other.strip_prefix("contacts/") {
            Some(segment) if !segment.is_empty() && !segment.contains('/') => {
                return control_contact(sim, &method, segment, &body)
            }
            _ => return talkdesk_error(StatusCode::NOT_FOUND, "not_found", "no such control"),
        },
    };
    match result {
        Ok(value) => body::json_response(StatusCode::OK, &value),
        Err(message) => talkdesk_error(StatusCode::BAD_REQUEST, "invalid_request", &message),
    }
}

fn control_contact(
    sim: &Simulation,
    method: &Method,
    segment: &str,
    body: &[u8],
) -> Response<Body> {
    let Some(contact) = ContactId::from_path_segment(segment) else {
        return talkdesk_error(
            StatusCode::BAD_REQUEST,
            "invalid_contact_id",
            "invalid contact_id",
        );
    };
    let key = contact.as_str().to_owned();
    match *method {
        Method::PUT => match parse_consent_body(body) {
            Ok(status) => {
                sim.state().contacts.insert(key, status);
                status_response(StatusCode::OK, status)
            }
            Err(err) => invalid_body(&err.message, err.field.as_deref()),
        },
        Method::GET => match sim.state().contacts.get(&key).copied() {
            Some(status) => status_response(StatusCode::OK, status),
            None => talkdesk_error(StatusCode::NOT_FOUND, "not_found", "contact not found"),
        },
        Method::DELETE => {
            sim.state().contacts.remove(&key);
            body::empty_response(StatusCode::NO_CONTENT)
        }
        _ => method_not_allowed("GET, PUT, DELETE"),
    }
}

fn control_fault(sim: &Simulation, body: &[u8]) -> Result<serde_json::Value, String> {
    let request: FaultRequest = parse_json(body)?;
    let route = SimRoute::parse(&request.route)
        .ok_or_else(|| format!("route must be token, get or put, not '{}'", request.route))?;
    if request.count == 0 {
        return Err("count must be at least 1".to_owned());
    }
    let fault = match request.fault.as_str() {
        "500" => Fault::Status500,
        "429" => Fault::TooManyRequests {
            retry_after_s: request.retry_after_s.unwrap_or(1),
        },
        "401" => Fault::Unauthorized,
        "delay" => {
            Fault::Delay(Duration::from_millis(request.delay_ms.ok_or_else(
                || "delay_ms is required for a delay fault".to_owned(),
            )?))
        }
        "close" => Fault::CloseConnection,
        "respond" => {
            let status = request
                .status
                .ok_or_else(|| "status is required for a respond fault".to_owned())?;
            if !(200..=999).contains(&status) {
                return Err("status must be between 200 and 999".to_owned());
            }
            let headers = match request.headers {
                None => Vec::new(),
                Some(HeaderSpec::Map(map)) => map.into_iter().collect(),
                Some(HeaderSpec::List(list)) => list,
            };
            for (name, value) in &headers {
                if HeaderName::from_bytes(name.as_bytes()).is_err()
                    || HeaderValue::from_str(value).is_err()
                {
                    return Err(format!("invalid header '{name}'"));
                }
            }
            let body = match (request.body, request.body_len) {
                (Some(body), None) => Bytes::from(body),
                (None, Some(len)) if len <= MAX_GENERATED_BODY => Bytes::from(vec![b'x'; len]),
                (None, Some(_)) => {
                    return Err(format!("body_len must be at most {MAX_GENERATED_BODY}"))
                }
                (None, None) => Bytes::new(),
                (Some(_), Some(_)) => return Err("give body or body_len, not both".to_owned()),
            };
            Fault::Respond {
                status,
                headers,
                body,
            }
        }
        other => {
            return Err(format!(
                "fault must be one of 500, 429, 401, delay, close, respond, not '{other}'"
            ))
        }
    };
    sim.inject(route, fault, request.count);
    Ok(json!({"ok": true, "route": route.as_str(), "count": request.count}))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|err| format!("invalid JSON body: {err}"))
}

fn to_json<T: Serialize>(value: &T) -> Result<serde_json::Value, String> {
    serde_json::to_value(value).map_err(|err| err.to_string())
}

fn ok_json() -> Result<serde_json::Value, String> {
    Ok(json!({"ok": true}))
}

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};

    use super::super::testing::*;
    use super::super::SimStats;
    use crate::consent::ConsentStatus;

    #[tokio::test]
    async fn http_control_surface() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let addr = sim.addr();
        let json_header = [("content-type", "application/json")];

        let seeded = send(
            addr,
            Method::PUT,
            "/_sim/contacts/%2B15551234567",
            &json_header,
            r#"{"status":"CONSENTED"}"#,
        )
        .await
        .unwrap();
        assert_eq!(seeded.status, StatusCode::OK);
        assert_eq!(sim.stored_status(CONTACT), Some(ConsentStatus::Consented));

        let fault = send(
            addr,
            Method::POST,
            "/_sim/faults",
            &json_header,
            r#"{"route":"get","fault":"429","count":2,"retry_after_s":3}"#,
        )
        .await
        .unwrap();
        assert_eq!(fault.status, StatusCode::OK);
        for _ in 0..2 {
            let limited = get(&sim, CONTACT, &token).await.unwrap();
            assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(limited.header("retry-after"), Some("3"));
        }
        assert_eq!(
            get(&sim, CONTACT, &token).await.unwrap().status,
            StatusCode::OK
        );

        let respond = send(
            addr,
            Method::POST,
            "/_sim/faults",
            &json_header,
            r#"{"route":"put","fault":"respond","status":200,"headers":{"content-type":"text/plain"},"body_len":100000}"#,
        )
        .await
        .unwrap();
        assert_eq!(respond.status, StatusCode::OK);
        let huge = put(&sim, CONTACT, &token, r#"{"status":"REFUSED"}"#)
            .await
            .unwrap();
        assert_eq!(huge.body.len(), 100_000);

        for bad in [
            r#"{"route":"nope","fault":"500"}"#,
            r#"{"route":"get","fault":"teapot"}"#,
            r#"{"route":"get","fault":"delay"}"#,
            r#"{"route":"get","fault":"500","count":0}"#,
            r#"{"route":"get","fault":"500","typo":1}"#,
            "not json",
        ] {
            let answer = send(addr, Method::POST, "/_sim/faults", &json_header, bad)
                .await
                .unwrap();
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(answer.json()["code"], "invalid_request");
        }

        let latency = send(
            addr,
            Method::POST,
            "/_sim/latency",
            &json_header,
            r#"{"latency_ms":5}"#,
        )
        .await
        .unwrap();
        assert_eq!(latency.status, StatusCode::OK);
        let delay = send(
            addr,
            Method::POST,
            "/_sim/delay-get",
            &json_header,
            r#"{"contact":"+15551234567","delay_ms":1,"count":1}"#,
        )
        .await
        .unwrap();
        assert_eq!(delay.status, StatusCode::OK);

        let stats = send(addr, Method::GET, "/_sim/stats", &[], "")
            .await
            .unwrap();
        assert_eq!(stats.status, StatusCode::OK);
        let stats = stats.json();
        assert_eq!(stats["gets"], 3);
        assert_eq!(stats["puts"], 1);
        assert_eq!(stats["tokens_issued"], 1);
        assert_eq!(stats["gets_per_contact"][CONTACT], 3);
        assert_eq!(stats["latency_ms"], 5);
        assert_eq!(stats["last_consent_request"]["method"], "PUT");

        let reset = send(addr, Method::POST, "/_sim/reset", &[], "")
            .await
            .unwrap();
        assert_eq!(reset.status, StatusCode::OK);
        assert_eq!(sim.stats(), SimStats::default());
        assert_eq!(sim.report().pending_faults.values().sum::<u64>(), 0);
        // The faulted PUT wrote nothing; seeded data survives a reset.
        assert_eq!(sim.stored_status(CONTACT), Some(ConsentStatus::Consented));

        let unknown = send(addr, Method::GET, "/_sim/nothing", &[], "")
            .await
            .unwrap();
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        let wrong_method = send(addr, Method::GET, "/_sim/faults", &[], "")
            .await
            .unwrap();
        assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    }
}
