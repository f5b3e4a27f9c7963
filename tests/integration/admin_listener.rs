//! The admin listener as operators see it, over real sockets (an in-process simulator and
//! proxy on port 0): health and readiness, request ids on every answer, and the metrics'
//! contract labels with no contact id in them.

use crate::support::calls::{consent_path, send};
use crate::support::*;
use consent_proxy::consent::ConsentStatus;
use http::Method;

#[tokio::test]
async fn healthz_and_readyz() {
    let h = Harness::start().await;
    let health = h.admin("/healthz").await;
    assert_eq!(health.status, 200);
    h.wait_ready().await;
    let ready = h.admin("/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(h.sim.stats().tokens_issued, 1);
}

/// A request to the admin listener.
async fn admin_send(
    h: &Harness,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> TestResponse {
    let url = format!("{}{path}", h.proxy.admin_url());
    h.http.send(method, &url, headers, None).await
}

#[tokio::test]
async fn admin_answers_carry_a_request_id() {
    let h = Harness::start().await;
    h.wait_ready().await;
    // The caller's own is echoed, on every route and on errors.
    let purge_path = "/admin/cache/+15552000009";
    for (method, path, status) in [
        (Method::GET, "/healthz", 200),
        (Method::GET, "/readyz", 200),
        (Method::GET, "/metrics", 200),
        (Method::GET, "/nope", 404),
        (Method::POST, "/metrics", 405),
        (Method::DELETE, purge_path, 401),
    ] {
        let answer = admin_send(&h, method, path, &[("x-request-id", "ops-check-7")]).await;
        assert_eq!(answer.status, status, "{path}");
        assert_eq!(answer.header("x-request-id"), Some("ops-check-7"), "{path}");
    }
    let purge = admin_send(
        &h,
        Method::DELETE,
        purge_path,
        &[("x-api-key", ADMIN_KEY), ("x-request-id", "purge-1")],
    )
    .await;
    assert_eq!(purge.status, 204);
    assert_eq!(purge.header("x-request-id"), Some("purge-1"));
    // A new one when absent or unusable, different each time.
    let first = h.admin("/healthz").await;
    let second = admin_send(
        &h,
        Method::GET,
        "/healthz",
        &[("x-request-id", "has space")],
    )
    .await;
    let first = first.header("x-request-id").expect("x-request-id");
    let second = second.header("x-request-id").expect("x-request-id");
    assert_eq!(first.len(), 32, "{first}");
    assert_eq!(second.len(), 32, "{second}");
    assert_ne!(first, second);
}

#[tokio::test]
async fn metrics_have_the_contract_labels_and_no_contact_id() {
    let h = Harness::start().await;
    h.sim.set_status("+15552000001", ConsentStatus::Consented);
    assert_eq!(h.get("+15552000001").await.status, 200);
    assert_eq!(h.get("%2B15552000001").await.status, 200);
    assert_eq!(h.put("+15552000002", "REFUSED").await.status, 201);
    assert_eq!(h.get("x7392044").await.status, 404);
    // Unauthenticated and unrouted requests.
    let anonymous = send(&h, Method::GET, &consent_path("+15552000003"), &[], None).await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(
        send(&h, Method::GET, "/nope/5552000004", &[], None)
            .await
            .status,
        404
    );
    let response = h.admin("/metrics").await;
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/plain")));
    let text = response.text();

    let sample = |labels: &[&str]| -> f64 {
        text.lines()
            .filter(|line| line.starts_with("consent_proxy_requests_total{"))
            .filter(|line| labels.iter().all(|label| line.contains(label)))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        sample(&[
            r#"route="consent""#,
            r#"method="GET""#,
            r#"code="200""#,
            r#"client="rw""#
        ]),
        2.0,
        "{text}"
    );
    assert_eq!(
        sample(&[
            r#"route="consent""#,
            r#"method="PUT""#,
            r#"code="201""#,
            r#"client="rw""#
        ]),
        1.0
    );
    assert_eq!(
        sample(&[
            r#"route="consent""#,
            r#"method="GET""#,
            r#"code="401""#,
            r#"client="anonymous""#
        ]),
        1.0
    );
    assert_eq!(
        sample(&[
            r#"route="other""#,
            r#"method="GET""#,
            r#"code="404""#,
            r#"client="anonymous""#
        ]),
        1.0
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("consent_proxy_requests_total{"))
    {
        for label in ["route=", "method=", "code=", "client="] {
            assert!(line.contains(label), "{line}");
        }
    }
    assert!(text.contains("# TYPE consent_proxy_requests_total counter"));
    assert!(text.contains("# TYPE consent_proxy_request_duration_seconds histogram"));
    assert!(text.lines().any(|l| {
        l.starts_with("consent_proxy_request_duration_seconds_bucket{")
            && l.contains(r#"route="consent""#)
            && l.contains(r#"method="GET""#)
    }));
    for digits in [
        "5552000001",
        "5552000002",
        "5552000003",
        "5552000004",
        "7392044",
    ] {
        assert!(
            !text.contains(digits),
            "metrics expose a contact id: {digits}"
        );
    }
    assert!(!text.contains("%2B"));
}
