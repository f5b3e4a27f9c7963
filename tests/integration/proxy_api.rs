//! The consent API as callers see it, over real sockets: an in-process simulator and an
//! in-process proxy on port 0 (see `support`). Each test asserts the behaviour it names,
//! including, where the contract says so, that upstream was never called.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::calls::{
    assert_proxy_error, assert_upstream_untouched, basic, consent_path, send,
};
use crate::support::raw_http::{free_addr, read_raw_answer};
use crate::support::*;
use bytes::Bytes;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute};
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpStream;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Helpers

async fn put_body(h: &Harness, contact: &str, body: &str) -> TestResponse {
    send(
        h,
        Method::PUT,
        &consent_path(contact),
        &[("x-api-key", RW_KEY), ("content-type", "application/json")],
        Some(body),
    )
    .await
}

/// Sends raw bytes on a fresh connection and reads the answer until the server closes it.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let answer = read_raw_answer(addr, request, Duration::from_secs(10), |_| false).await;
    assert!(answer.is_some(), "no answer within 10 s");
    String::from_utf8_lossy(&answer.unwrap_or_default()).into_owned()
}

/// The status code of a raw HTTP/1.1 answer.
fn raw_status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

// ---------------------------------------------------------------------------------------------
// Reads and writes reach upstream with the proxy's token

#[tokio::test]
async fn get_reaches_upstream_with_bearer_token_and_returns_its_answer() {
    let h = Harness::start().await;
    h.sim.set_status("+15550100001", ConsentStatus::Consented);
    let get = h.get("%2B15550100001").await;
    assert_eq!(get.status, 200);
    assert_eq!(get.json(), serde_json::json!({"status": "CONSENTED"}));
    assert_eq!(get.header("content-type"), Some("application/json"));
    assert_eq!(get.header("x-cache-status"), Some("MISS"));

    let seen = h.sim.last_consent_request().expect("upstream called");
    assert_eq!(seen.method, "GET");
    assert_eq!(
        seen.path_and_query,
        "/voicebiometrics/contacts/%2B15550100001/consent"
    );
    let authorization = seen.header("authorization").expect("authorization sent");
    assert!(
        authorization.starts_with("Bearer ") && authorization.len() > "Bearer ".len(),
        "{authorization}"
    );
    assert_eq!(h.sim.gets_for("+15550100001"), 1);
}

#[tokio::test]
async fn put_reaches_upstream_first_201_then_200_and_get_sees_the_new_status() {
    let h = Harness::start().await;
    let first = h.put("+15550100002", "CONSENTED").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.json(), serde_json::json!({"status": "CONSENTED"}));
    let seen = h.sim.last_consent_request().expect("upstream called");
    assert_eq!(seen.method, "PUT");
    assert!(seen
        .header("authorization")
        .is_some_and(|v| v.starts_with("Bearer ")));
    assert_eq!(seen.header("content-type"), Some("application/json"));

    let second = h.put("+15550100002", "REFUSED").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.json(), serde_json::json!({"status": "REFUSED"}));
    assert_eq!(h.sim.puts_for("+15550100002"), 2);
    assert_eq!(
        h.sim.stored_status("+15550100002"),
        Some(ConsentStatus::Refused)
    );

    let get = h.get("+15550100002").await;
    assert_eq!(get.status, 200);
    assert_eq!(get.status_field(), "REFUSED");
}

// ---------------------------------------------------------------------------------------------
// The error table

#[tokio::test]
async fn invalid_contact_ids_are_400_without_calling_upstream() {
    let h = Harness::start().await;
    let too_long = "1".repeat(65);
    let bad = [
        "%2F",
        "..",
        ".",
        too_long.as_str(),
        "%252B1",
        "-15551234567",
        "_abc",
        ".abc",
        "%20",
        "a%20b",
        "%C3%A9",
        "a%00",
        "%zz",
        "%",
        "a*b",
        "a,b",
        "a;b",
        "a@b",
    ];
    for contact in bad {
        let get = h.get(contact).await;
        assert_proxy_error(&get, 400, "invalid_contact_id");
        let put = h.put(contact, "REFUSED").await;
        assert_proxy_error(&put, 400, "invalid_contact_id");
    }
    assert_upstream_untouched(&h.sim);
    // The longest valid id still goes through.
    assert_eq!(h.get(&"1".repeat(64)).await.status, 404);
    assert_eq!(h.sim.stats().gets, 1);
}

#[tokio::test]
async fn invalid_bodies_are_400_with_the_culprit_field_without_calling_upstream() {
    let h = Harness::start().await;
    let contact = "+15550300001";
    // Bodies without any field to blame.
    for body in [
        "not json",
        "",
        "{",
        r#"["status"]"#,
        r#""REFUSED""#,
        "42",
        "null",
    ] {
        let put = put_body(&h, contact, body).await;
        assert_proxy_error(&put, 400, "invalid_body");
    }
    // Bodies with a culprit, named in `fields`.
    for (body, field) in [
        ("{}", "status"),
        (r#"{"status":"MAYBE"}"#, "status"),
        (r#"{"status":"refused"}"#, "status"),
        (r#"{"status":1}"#, "status"),
        (r#"{"status":null}"#, "status"),
        (r#"{"status":"REFUSED","note":"x"}"#, "note"),
        (r#"{"reason":"x"}"#, "reason"),
        // Ambiguous: which status was meant is not the proxy's to guess.
        (r#"{"status":"CONSENTED","status":"REFUSED"}"#, "status"),
        (r#"{"status":"REFUSED","st\u0061tus":"REFUSED"}"#, "status"),
    ] {
        let put = put_body(&h, contact, body).await;
        assert_proxy_error(&put, 400, "invalid_body");
        let fields = put.json()["fields"].clone();
        let fields = fields.as_array().unwrap_or_else(|| {
            panic!("no fields for {body}: {}", put.text());
        });
        assert_eq!(fields.len(), 1, "{body}: {}", put.text());
        assert_eq!(fields[0]["name"], field, "{body}: {}", put.text());
        assert!(fields[0]["description"].is_string(), "{}", put.text());
    }
    assert_upstream_untouched(&h.sim);
}

#[tokio::test]
async fn missing_or_wrong_key_is_401_with_a_challenge_without_calling_upstream() {
    let h = Harness::start().await;
    let path = consent_path("+15550400001");
    let wrong_user = basic("reader", RW_KEY);
    let unknown_user = basic("nobody", RW_KEY);
    let wrong_basic_key = basic("rw", "wrong-key-0123456789abcdef");
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("x-api-key", "wrong-key-0123456789abcdef")],
        vec![("x-api-key", "")],
        vec![("authorization", "Bearer wrong-key-0123456789abcdef")],
        vec![("authorization", &wrong_user)],
        vec![("authorization", &unknown_user)],
        vec![("authorization", &wrong_basic_key)],
        vec![("authorization", "Basic not-base64!")],
        vec![("authorization", "Token rw-key-0123456789abcdef")],
    ];
    for (i, headers) in cases.iter().enumerate() {
        // Each case from its own address: together they are more failures than one address
        // may make in a minute before it is throttled.
        let from = TestClient::from_address(std::net::Ipv4Addr::new(127, 0, 4, i as u8 + 1).into());
        for method in [Method::GET, Method::PUT] {
            let mut headers = headers.clone();
            headers.push(("content-type", "application/json"));
            let response = from
                .send(
                    method.clone(),
                    &format!("{}{path}", h.proxy.url()),
                    &headers,
                    Some(r#"{"status":"REFUSED"}"#.to_owned()),
                )
                .await;
            assert_proxy_error(&response, 401, "unauthorized");
            // A Bearer value is a key or an access token: RFC 6750's challenge says it was
            // refused. Anything else gets the Basic challenge.
            let bearer = headers
                .iter()
                .any(|(name, value)| *name == "authorization" && value.starts_with("Bearer "));
            let challenge = if bearer {
                r#"Bearer realm="consent-proxy", error="invalid_token""#
            } else {
                r#"Basic realm="consent-proxy""#
            };
            assert_eq!(
                response.header("www-authenticate"),
                Some(challenge),
                "{method} {headers:?}"
            );
        }
    }
    assert_upstream_untouched(&h.sim);
}

#[tokio::test]
async fn reader_key_cannot_put_403_without_calling_upstream() {
    let h = Harness::start().await;
    let path = consent_path("+15550500001");
    let reader_basic = basic("reader", READER_KEY);
    let reader_bearer = format!("Bearer {READER_KEY}");
    for credentials in [
        ("x-api-key", READER_KEY),
        ("authorization", reader_bearer.as_str()),
        ("authorization", reader_basic.as_str()),
    ] {
        let put = send(
            &h,
            Method::PUT,
            &path,
            &[credentials, ("content-type", "application/json")],
            Some(r#"{"status":"REFUSED"}"#),
        )
        .await;
        assert_proxy_error(&put, 403, "forbidden");
    }
    assert_upstream_untouched(&h.sim);
    // The same key may read.
    let get = send(&h, Method::GET, &path, &[("x-api-key", READER_KEY)], None).await;
    assert_eq!(get.status, 404);
    assert_eq!(h.sim.stats().gets, 1);
}

#[tokio::test]
async fn other_paths_are_404_not_found_without_calling_upstream() {
    let h = Harness::start().await;
    let paths = [
        "/",
        "/voicebiometrics",
        "/voicebiometrics/contacts",
        "/voicebiometrics/contacts/",
        "/voicebiometrics/contacts/%2B15550600001",
        "/voicebiometrics/contacts/%2B15550600001/consent/",
        "/voicebiometrics/contacts/%2B15550600001/consent/x",
        "/voicebiometrics/contacts//consent",
        "/voicebiometrics/contacts/a//consent",
        "/voicebiometrics//contacts/a/consent",
        "//voicebiometrics/contacts/a/consent",
        "/voicebiometrics/contacts/a/b/consent",
        "/voicebiometrics/contacts/x/enrollment",
        "/voicebiometrics/contacts/x/CONSENT",
        "/VOICEBIOMETRICS/contacts/x/consent",
        "/api/voicebiometrics/contacts/x/consent",
        "/metrics",
        "/healthz",
        // The token endpoint is exactly /oauth/token (tests/integration/external/oauth.rs).
        "/oauth/token/",
        "/oauth",
        "/_sim/stats",
    ];
    for path in paths {
        for method in [Method::GET, Method::PUT] {
            let with_key = send(
                &h,
                method.clone(),
                path,
                &[("x-api-key", RW_KEY), ("content-type", "application/json")],
                Some(r#"{"status":"REFUSED"}"#),
            )
            .await;
            assert_proxy_error(&with_key, 404, "not_found");
            let without_key = send(&h, method.clone(), path, &[], None).await;
            assert_proxy_error(&without_key, 404, "not_found");
        }
    }
    assert_upstream_untouched(&h.sim);
}

#[tokio::test]
async fn other_methods_on_a_consent_path_are_405_with_allow() {
    let h = Harness::start().await;
    let path = consent_path("+15550700001");
    for method in [Method::POST, Method::DELETE, Method::PATCH, Method::OPTIONS] {
        let response = send(
            &h,
            method.clone(),
            &path,
            &[("x-api-key", RW_KEY), ("content-type", "application/json")],
            Some(r#"{"status":"REFUSED"}"#),
        )
        .await;
        assert_proxy_error(&response, 405, "method_not_allowed");
        let allow = response.header("allow").expect("Allow header");
        let mut allowed: Vec<&str> = allow.split(',').map(str::trim).collect();
        allowed.sort_unstable();
        assert_eq!(allowed, ["GET", "PUT"], "{method}");
    }
    assert_upstream_untouched(&h.sim);
}

#[tokio::test]
async fn a_405_is_counted_under_the_caller_whose_key_is_valid() {
    let h = Harness::start().await;
    let path = consent_path("+15550700002");
    let delete = |headers: &'static [(&'static str, &'static str)]| {
        send(&h, Method::DELETE, &path, headers, None)
    };
    let sample = |client: &str| {
        format!(
            r#"consent_proxy_requests_total{{client="{client}",code="405",method="DELETE",route="consent"}}"#
        )
    };
    assert_eq!(delete(&[("x-api-key", RW_KEY)]).await.status, 405);
    assert_eq!(delete(&[("x-api-key", READER_KEY)]).await.status, 405);
    // No key, or a wrong one: still a 405 (the method is wrong whoever asks), anonymous.
    assert_eq!(delete(&[]).await.status, 405);
    assert_eq!(
        delete(&[("x-api-key", "not-a-key-0123456789abcdef")])
            .await
            .status,
        405
    );
    assert_eq!(h.metric(&sample("rw")).await, 1.0);
    assert_eq!(h.metric(&sample("reader")).await, 1.0);
    assert_eq!(h.metric(&sample("anonymous")).await, 2.0);
}

#[tokio::test]
async fn a_403_is_counted_under_the_caller_that_lacks_the_permission() {
    let h = Harness::start().await;
    let put = send(
        &h,
        Method::PUT,
        &consent_path("+15550700003"),
        &[
            ("x-api-key", READER_KEY),
            ("content-type", "application/json"),
        ],
        Some(r#"{"status":"REFUSED"}"#),
    )
    .await;
    assert_eq!(put.status, 403, "{}", put.text());
    let sample = |client: &str| {
        format!(
            r#"consent_proxy_requests_total{{client="{client}",code="403",method="PUT",route="consent"}}"#
        )
    };
    assert_eq!(h.metric(&sample("reader")).await, 1.0);
    assert_eq!(h.metric(&sample("anonymous")).await, 0.0);
    assert_upstream_untouched(&h.sim);
}

#[tokio::test]
async fn body_over_max_body_bytes_is_413_without_calling_upstream() {
    let h = Harness::start_with(|c| {
        c.set("server.max_body_bytes", "256");
    })
    .await;
    let contact = "+15550800001";
    let padding = "x".repeat(300);
    let big = format!(r#"{{"status":"REFUSED","pad":"{padding}"}}"#);
    // With Content-Length.
    assert_proxy_error(&put_body(&h, contact, &big).await, 413, "payload_too_large");

    // Chunked, so the size is only known while reading.
    let path = consent_path(contact);
    let chunked = format!(
        "PUT {path} HTTP/1.1\r\nHost: proxy\r\nX-API-Key: {RW_KEY}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let answer = raw_exchange(h.proxy.listen_addr, chunked.as_bytes()).await;
    assert_eq!(raw_status(&answer), 413, "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");

    // A body exactly at the limit is accepted.
    let fits = format!(
        r#"{{"status":"REFUSED"{}}}"#,
        " ".repeat(256 - r#"{"status":"REFUSED"}"#.len())
    );
    assert_eq!(fits.len(), 256);
    assert_upstream_untouched(&h.sim);
    assert_eq!(put_body(&h, contact, &fits).await.status, 201);
}

#[tokio::test]
async fn upstream_unreachable_is_502_upstream_error() {
    let port = free_addr().await.port();
    // The breaker (which would open after five refused connects) is tested on its own.
    let h = Harness::start_with_upstream(
        |sim| (format!("http://127.0.0.1:{port}"), sim.token_url()),
        |c| {
            c.set("talkdesk.breaker_failures", "0");
        },
    )
    .await;
    h.wait_ready().await;
    assert_proxy_error(&h.get("+15550900001").await, 502, "upstream_error");
    assert_proxy_error(
        &h.put("+15550900001", "REFUSED").await,
        502,
        "upstream_error",
    );
    assert!(h
        .metric(r#"consent_proxy_upstream_requests_total{code="error",method="GET"}"#)
        .await
        .ge(&1.0));
}

#[tokio::test]
async fn unusable_upstream_answer_is_502_upstream_error() {
    let h = Harness::start_with(|c| {
        c.set("talkdesk.max_retries", "0");
    })
    .await;
    h.sim.inject(
        SimRoute::Get,
        Fault::Respond {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(b"<html>surprise</html>"),
        },
        1,
    );
    assert_proxy_error(&h.get("+15550900002").await, 502, "upstream_error");
    h.sim.inject(SimRoute::Get, Fault::CloseConnection, 1);
    assert_proxy_error(&h.get("+15550900002").await, 502, "upstream_error");
}

#[tokio::test]
async fn upstream_401_renews_the_token_once_then_502() {
    let h = Harness::start_seeded("+15550900003", ConsentStatus::Consented, |c| {
        c.set("cache.enabled", "false");
    })
    .await;
    // One rejection: the token is renewed and the request retried.
    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 1);
    let get = h.get("+15550900003").await;
    assert_eq!(get.status, 200, "{}", get.text());
    assert_eq!(h.sim.stats().token_requests, 2);
    assert_eq!(h.sim.gets_for("+15550900003"), 2);
    // Rejected again after the renewal: 502, never upstream's 401.
    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 2);
    let get = h.get("+15550900003").await;
    assert_proxy_error(&get, 502, "upstream_error");
    assert!(get.header("www-authenticate").is_none());
    assert_eq!(h.sim.stats().token_requests, 3);
    assert_eq!(h.sim.gets_for("+15550900003"), 4);
}

#[tokio::test]
async fn slow_upstream_is_504_upstream_timeout_at_the_deadline() {
    let h = Harness::start_with(|c| {
        c.set("server.request_timeout_ms", "300")
            .set("talkdesk.timeout_ms", "200");
    })
    .await;
    h.wait_ready().await;
    h.sim.set_latency(Duration::from_millis(1500));
    let started = Instant::now();
    let get = h.get("+15551000001").await;
    let elapsed = started.elapsed();
    assert_proxy_error(&get, 504, "upstream_timeout");
    assert!(
        elapsed >= Duration::from_millis(200) && elapsed < Duration::from_millis(1000),
        "took {elapsed:?}"
    );
    // A timed-out attempt is not retried.
    assert_eq!(h.sim.stats().gets, 1);

    let started = Instant::now();
    let put = h.put("+15551000001", "REFUSED").await;
    assert_proxy_error(&put, 504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert_eq!(h.sim.stats().puts, 1);
}

#[tokio::test]
async fn upstream_404_is_passed_through_with_its_body() {
    let h = Harness::start().await;
    let get = h.get("+15551100001").await;
    assert_eq!(get.status, 404);
    // The simulator's own body, not the proxy's `no such route`.
    assert_eq!(
        get.json(),
        serde_json::json!({"code": "not_found", "message": "contact not found"})
    );
    assert_eq!(get.header("x-cache-status"), Some("MISS"));
    assert_eq!(h.sim.gets_for("+15551100001"), 1);
}

#[tokio::test]
async fn upstream_429_is_passed_through_with_retry_after_once_retries_are_exhausted() {
    let h = Harness::start_with(|c| {
        c.set("talkdesk.max_retries", "0");
    })
    .await;
    h.sim.set_status("+15551200001", ConsentStatus::Consented);
    h.sim.inject(
        SimRoute::Get,
        Fault::TooManyRequests { retry_after_s: 7 },
        1,
    );
    let get = h.get("+15551200001").await;
    assert_eq!(get.status, 429, "{}", get.text());
    assert_eq!(get.header("retry-after"), Some("7"));
    assert_eq!(get.code(), "too_many_requests");
    assert_eq!(h.sim.stats().gets, 1);

    // Upstream's Retry-After holds for every caller: until it passes nothing is sent.
    let put = h.put("+15551200001", "REFUSED").await;
    assert_proxy_error(&put, 503, "upstream_unavailable");
    let wait: u64 = put.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=7).contains(&wait), "Retry-After {wait}");
    assert_eq!(h.sim.stats().puts, 0);

    // A PUT's own 429 is passed through the same way.
    let h = Harness::start_with(|c| {
        c.set("talkdesk.max_retries", "0");
    })
    .await;
    h.sim.inject(
        SimRoute::Put,
        Fault::TooManyRequests { retry_after_s: 3 },
        1,
    );
    let put = h.put("+15551200001", "REFUSED").await;
    assert_eq!(put.status, 429);
    assert_eq!(put.header("retry-after"), Some("3"));
    assert_eq!(h.sim.stats().puts, 1);
}

#[tokio::test]
async fn upstream_500_once_is_retried_to_200() {
    let h = Harness::start().await;
    h.sim.set_status("+15551300001", ConsentStatus::Refused);
    h.sim.inject(SimRoute::Get, Fault::Status500, 1);
    let get = h.get("+15551300001").await;
    assert_eq!(get.status, 200, "{}", get.text());
    assert_eq!(get.status_field(), "REFUSED");
    assert_eq!(h.sim.gets_for("+15551300001"), 2);

    h.sim.inject(SimRoute::Put, Fault::Status500, 1);
    let put = h.put("+15551300001", "CONSENTED").await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(h.sim.puts_for("+15551300001"), 2);
}

#[tokio::test]
async fn oversized_request_headers_are_431_without_calling_upstream() {
    let h = Harness::start_with(|c| {
        c.set("server.max_header_bytes", "2048");
    })
    .await;
    let path = consent_path("+15551400001");
    // Over the limit but within hyper's read buffer: the HTTP layer counts and refuses.
    let pad = "y".repeat(2100);
    let response = send(
        &h,
        Method::GET,
        &path,
        &[("x-api-key", RW_KEY), ("x-padding", &pad)],
        None,
    )
    .await;
    assert_eq!(response.status, 431);
    assert!(response.header("x-request-id").is_some());
    // Several headers that only together pass the limit.
    let pad = "z".repeat(500);
    let response = send(
        &h,
        Method::GET,
        &path,
        &[
            ("x-api-key", RW_KEY),
            ("x-pad-1", &pad),
            ("x-pad-2", &pad),
            ("x-pad-3", &pad),
            ("x-pad-4", &pad),
            ("x-pad-5", &pad),
        ],
        None,
    )
    .await;
    assert_eq!(response.status, 431);
    // Far over, beyond the read buffer: hyper itself answers 431.
    let huge = "w".repeat(64 * 1024);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: proxy\r\nX-API-Key: {RW_KEY}\r\nX-Huge: {huge}\r\n\
         Connection: close\r\n\r\n"
    );
    let answer = raw_exchange(h.proxy.listen_addr, request.as_bytes()).await;
    assert_eq!(raw_status(&answer), 431, "{answer}");
    assert_upstream_untouched(&h.sim);
    // Just under the limit is fine.
    let ok = send(
        &h,
        Method::GET,
        &path,
        &[("x-api-key", RW_KEY), ("x-padding", &"v".repeat(1500))],
        None,
    )
    .await;
    assert_eq!(ok.status, 404);
}

// ---------------------------------------------------------------------------------------------
// Callers' credentials and headers

#[tokio::test]
async fn all_three_caller_key_forms_work() {
    let h = Harness::start().await;
    h.sim.set_status("+15551500001", ConsentStatus::Consented);
    let path = consent_path("+15551500001");
    let bearer = format!("Bearer {RW_KEY}");
    let basic_rw = basic("rw", RW_KEY);
    for credentials in [
        ("x-api-key", RW_KEY),
        ("authorization", bearer.as_str()),
        ("authorization", basic_rw.as_str()),
    ] {
        let get = send(&h, Method::GET, &path, &[credentials], None).await;
        assert_eq!(get.status, 200, "{credentials:?}: {}", get.text());
        let put = send(
            &h,
            Method::PUT,
            &path,
            &[credentials, ("content-type", "application/json")],
            Some(r#"{"status":"CONSENTED"}"#),
        )
        .await;
        assert_eq!(put.status, 200, "{credentials:?}: {}", put.text());
    }
    assert_eq!(h.sim.puts_for("+15551500001"), 3);
}

#[tokio::test]
async fn caller_credentials_cookies_and_hop_by_hop_headers_never_reach_upstream() {
    let h = Harness::start_with(|c| {
        c.set("cache.enabled", "false");
    })
    .await;
    h.sim.set_status("+15551600001", ConsentStatus::Consented);
    let path = consent_path("+15551600001");
    let bearer = format!("Bearer {RW_KEY}");
    let basic_rw = basic("rw", RW_KEY);
    let extra: [(&str, &str); 8] = [
        ("cookie", "session=caller-cookie-value"),
        ("connection", "x-foo"),
        ("x-foo", "hop-by-hop-value"),
        ("te", "trailers"),
        ("upgrade", "websocket"),
        ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
    ];
    for credentials in [
        ("x-api-key", RW_KEY),
        ("authorization", bearer.as_str()),
        ("authorization", basic_rw.as_str()),
    ] {
        for method in [Method::GET, Method::PUT] {
            let mut headers = vec![credentials, ("content-type", "application/json")];
            headers.extend_from_slice(&extra);
            let response = send(
                &h,
                method.clone(),
                &path,
                &headers,
                Some(r#"{"status":"CONSENTED"}"#),
            )
            .await;
            assert_eq!(response.status, 200, "{method} {credentials:?}");

            let seen = h.sim.last_consent_request().expect("upstream called");
            assert_eq!(seen.method, method.as_str());
            let authorizations: Vec<&str> = seen
                .headers
                .iter()
                .filter(|(name, _)| name == "authorization")
                .map(|(_, value)| value.as_str())
                .collect();
            assert_eq!(authorizations.len(), 1, "{:?}", seen.headers);
            assert!(authorizations[0].starts_with("Bearer "));
            assert!(!authorizations[0].contains(RW_KEY), "caller key forwarded");
            for name in [
                "x-api-key",
                "cookie",
                "x-foo",
                "te",
                "upgrade",
                "proxy-authorization",
                "keep-alive",
                "proxy-connection",
            ] {
                assert!(
                    !seen.has_header(name),
                    "{name} forwarded: {:?}",
                    seen.headers
                );
            }
            if let Some(connection) = seen.header("connection") {
                assert!(!connection.contains("x-foo"), "{connection}");
            }
            for (_, value) in &seen.headers {
                assert!(!value.contains(RW_KEY), "caller key forwarded: {value}");
                assert!(!value.contains("caller-cookie-value"));
                assert!(!value.contains("hop-by-hop-value"));
            }
        }
    }
}

#[tokio::test]
async fn query_string_is_not_forwarded() {
    let h = Harness::start_with(|c| {
        c.set("cache.enabled", "false");
    })
    .await;
    h.sim.set_status("+15551700001", ConsentStatus::Consented);
    let path = format!(
        "{}?status=REFUSED&access_token=abc",
        consent_path("%2B15551700001")
    );
    let get = send(&h, Method::GET, &path, &[("x-api-key", RW_KEY)], None).await;
    assert_eq!(get.status, 200);
    let seen = h.sim.last_consent_request().unwrap();
    assert_eq!(
        seen.path_and_query,
        "/voicebiometrics/contacts/%2B15551700001/consent"
    );

    let put = send(
        &h,
        Method::PUT,
        &path,
        &[("x-api-key", RW_KEY), ("content-type", "application/json")],
        Some(r#"{"status":"DELETED"}"#),
    )
    .await;
    assert_eq!(put.status, 200);
    let seen = h.sim.last_consent_request().unwrap();
    assert_eq!(seen.method, "PUT");
    assert_eq!(
        seen.path_and_query,
        "/voicebiometrics/contacts/%2B15551700001/consent"
    );
    assert_eq!(
        h.sim.stored_status("+15551700001"),
        Some(ConsentStatus::Deleted)
    );
}

#[tokio::test]
async fn request_id_is_sent_upstream_and_echoed() {
    let h = Harness::start_with(|c| {
        c.set("cache.enabled", "false");
    })
    .await;
    let path = consent_path("+15551800001");
    // The caller's own.
    let get = send(
        &h,
        Method::GET,
        &path,
        &[
            ("x-api-key", RW_KEY),
            ("x-request-id", "studio-flow-42.abc"),
        ],
        None,
    )
    .await;
    assert_eq!(get.header("x-request-id"), Some("studio-flow-42.abc"));
    let seen = h.sim.last_consent_request().unwrap();
    assert_eq!(seen.header("x-request-id"), Some("studio-flow-42.abc"));

    // A new one when absent, the same upstream and back.
    let put = h.put("+15551800001", "CONSENTED").await;
    assert_eq!(put.status, 201);
    let generated = put.header("x-request-id").expect("x-request-id").to_owned();
    assert!(!generated.is_empty());
    let seen = h.sim.last_consent_request().unwrap();
    assert_eq!(seen.header("x-request-id"), Some(generated.as_str()));
    // Fresh for every request.
    let again = h.get("+15551800001").await;
    let second = again.header("x-request-id").unwrap();
    assert_ne!(second, generated);
    assert_eq!(
        h.sim.last_consent_request().unwrap().header("x-request-id"),
        Some(second)
    );

    // Also on the proxy's own errors.
    let not_found = send(&h, Method::GET, "/nope", &[("x-request-id", "r-1")], None).await;
    assert_eq!(not_found.header("x-request-id"), Some("r-1"));
}

// ---------------------------------------------------------------------------------------------
// Contact normalisation

#[tokio::test]
async fn encoded_and_raw_plus_reach_upstream_as_one_contact() {
    let h = Harness::start_with(|c| {
        c.set("cache.enabled", "false");
    })
    .await;
    let put = h.put("%2B15551900001", "REFUSED").await;
    assert_eq!(put.status, 201);
    assert_eq!(
        h.sim.last_consent_request().unwrap().path_and_query,
        "/voicebiometrics/contacts/%2B15551900001/consent"
    );
    let get = h.get("+15551900001").await;
    assert_eq!(get.status, 200);
    assert_eq!(get.status_field(), "REFUSED");
    assert_eq!(
        h.sim.last_consent_request().unwrap().path_and_query,
        "/voicebiometrics/contacts/%2B15551900001/consent"
    );
    assert_eq!(h.put("+15551900001", "CONSENTED").await.status, 200);
    assert_eq!(h.sim.puts_for("+15551900001"), 2);
    assert_eq!(h.sim.puts_for("%2B15551900001"), 2);
    assert_eq!(h.sim.gets_for("+15551900001"), 1);
    assert_eq!(
        h.sim.stored_status("+15551900001"),
        Some(ConsentStatus::Consented)
    );
    assert_eq!(h.sim.report().contacts, 1);
}

#[tokio::test]
async fn encoded_and_raw_plus_share_one_cache_entry() {
    let h = Harness::start().await;
    h.sim.set_status("+15551900002", ConsentStatus::Consented);
    let first = h.get("+15551900002").await;
    assert_eq!(first.header("x-cache-status"), Some("MISS"));
    let second = h.get("%2B15551900002").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-cache-status"), Some("HIT"));
    assert_eq!(h.sim.gets_for("+15551900002"), 1);
}

// ---------------------------------------------------------------------------------------------
// Protocols and lifecycle

#[tokio::test]
async fn http2_prior_knowledge_works_on_the_plain_listener() {
    let h = Harness::start().await;
    h.sim.set_status("+15552100001", ConsentStatus::NoConsent);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();

    let request = Request::get(h.consent_url("%2B15552100001"))
        .header("x-api-key", RW_KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.expect("h2 request");
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-request-id"));
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], br#"{"status":"NO_CONSENT"}"#);

    let request = Request::put(h.consent_url("%2B15552100001"))
        .header("x-api-key", RW_KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"status":"CONSENTED"}"#)))
        .unwrap();
    let response = client.request(request).await.expect("h2 request");
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        h.sim.stored_status("+15552100001"),
        Some(ConsentStatus::Consented)
    );

    // Request headers over server.max_header_bytes are refused over h2 as well.
    let request = Request::get(h.consent_url("%2B15552100001"))
        .header("x-api-key", RW_KEY)
        .header("x-padding", "p".repeat(20_000))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.expect("h2 request");
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(h.sim.stats().gets, 1);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_refuses_new_connections() {
    let Harness { sim, proxy, http } = Harness::start().await;
    sim.set_status("+15552200001", ConsentStatus::Consented);
    sim.set_latency(Duration::from_millis(300));
    let listen_addr = proxy.listen_addr;
    let admin_addr = proxy.admin_addr;
    let url = format!(
        "{}/voicebiometrics/contacts/%2B15552200001/consent",
        proxy.url()
    );
    let in_flight = tokio::spawn(async move {
        let response = http
            .send(Method::GET, &url, &[("x-api-key", RW_KEY)], None)
            .await;
        (response, Instant::now())
    });
    // The request is in flight once upstream has received it (and is sitting on it).
    wait_until(Duration::from_secs(5), || async { sim.stats().gets == 1 }).await;

    let shutdown_started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), proxy.shutdown())
        .await
        .expect("shutdown within 5 s");
    let (response, answered_at) = in_flight.await.expect("request task");
    assert!(
        answered_at > shutdown_started,
        "the request was not in flight at shutdown"
    );
    assert_eq!(response.status, 200);
    assert_eq!(response.status_field(), "CONSENTED");

    let refused = TcpStream::connect(listen_addr).await;
    assert!(refused.is_err(), "consent listener still accepts");
    let refused = TcpStream::connect(admin_addr).await;
    assert!(refused.is_err(), "admin listener still accepts");
}
