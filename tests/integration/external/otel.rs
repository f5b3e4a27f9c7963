//! OpenTelemetry traces against an independent OTLP/HTTP receiver: `tests/otlp_receiver.py`,
//! which decodes what the proxy sends with the `opentelemetry-proto` package (a Python from
//! `.venv-otlp-receiver`, or `OTLP_RECEIVER_PYTHON`; missing, the test fails loudly).
//!
//! - a GET carrying a caller's `traceparent` is exported as one trace under the caller's span:
//!   the server span, the cache lookup, the fill and each upstream attempt (a retry visible),
//!   with the trace id and the attempt's span id sent upstream in `traceparent`;
//! - a PUT with the audit trail on has its `audit write` span under the PUT's, ended before the
//!   PUT goes upstream; in a cluster (a real `redis-server`), its two `cluster announce` spans;
//! - each token fetch is a trace of its own, its `traceparent` sent to the token endpoint, a
//!   refused fetch an error;
//! - no span name or attribute holds the contact id or a secret;
//! - a collector that is not there costs the requests nothing, only the failure counter.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use http::Method;
use serde_json::Value;

use crate::support::audit::{AuditDir, CHAIN_KEY};
use crate::support::fake_upstream::{answer, consent_200, Act, FakeUpstream};
use crate::support::python_venv::venv_python;
use crate::support::redis_server::RedisServer;
use crate::support::*;

/// The interpreter of the virtualenv `scripts/test.sh` prepares, with opentelemetry-proto.
fn receiver_python() -> PathBuf {
    venv_python(
        "OTLP_RECEIVER_PYTHON",
        ".venv-otlp-receiver",
        "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
        "scripts/requirements-otlp-receiver.txt",
    )
}

/// The receiver process and the spans it printed, one JSON object each.
struct Receiver {
    child: Child,
    port: u16,
    spans: mpsc::Receiver<Value>,
}

impl Receiver {
    fn start() -> Receiver {
        let mut child = Command::new(receiver_python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp_receiver.py"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the OTLP receiver");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().expect("a first line").expect("readable");
        let port = first
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {first}"));
        let (sender, spans) = mpsc::channel();
        std::thread::spawn(move || forward(lines, sender));
        Receiver { child, port, spans }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Tracing on in `config`, every trace started here recorded, exported to this receiver.
    fn export_from(&self, config: &mut ProxyConfig) {
        config
            .set_str("otel.endpoint", &self.endpoint())
            .set("otel.sample_ratio", "1.0");
    }

    /// The spans of the trace `trace_id` once those `named` arrived (a name twice: two of
    /// them); spans of other traces are passed over.
    fn trace(&self, trace_id: &str, named: &[&str]) -> Vec<Value> {
        let of_trace = |s: &Value| s["trace_id"] == trace_id;
        let spans = self.spans_until(Duration::from_secs(20), |spans| {
            named.iter().all(|name| {
                let wanted = named.iter().filter(|n| *n == name).count();
                spans
                    .iter()
                    .filter(|s| of_trace(s) && s["name"] == *name)
                    .count()
                    >= wanted
            })
        });
        spans.into_iter().filter(of_trace).collect()
    }

    /// Spans as they arrive until `done` holds for those received, within `limit`.
    fn spans_until(&self, limit: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = std::time::Instant::now() + limit;
        let mut spans = Vec::new();
        while !done(&spans) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.spans.recv_timeout(left) {
                Ok(span) => {
                    assert!(span.get("decode_error").is_none(), "{span}");
                    spans.push(span);
                }
                Err(_) => panic!("spans received so far: {spans:#?}"),
            }
        }
        spans
    }
}

fn forward(lines: std::io::Lines<BufReader<ChildStdout>>, sender: mpsc::Sender<Value>) {
    for line in lines.map_while(Result::ok) {
        let span = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if sender.send(span).is_err() {
            return;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn by_name<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

/// The one span named `name` in `spans`.
fn the_one<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    let found = by_name(spans, name);
    assert_eq!(found.len(), 1, "one {name:?} in {spans:#?}");
    found[0]
}

/// Nothing exported holds the contact id (in any form), a client's key or the upstream client
/// secret, nor any of `more`.
fn assert_no_secret(spans: &[Value], more: &[&str]) {
    let exported = serde_json::to_string(spans).unwrap();
    let always = [
        CONTACT,
        "15550240001",
        "%2B15550240001",
        RW_KEY,
        SIM_CLIENT_SECRET,
    ];
    for secret in always.iter().chain(more) {
        assert!(!exported.contains(secret), "{secret} exported: {exported}");
    }
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const CONTACT: &str = "+15550240001";
const PUT_SPAN: &str = "PUT /voicebiometrics/contacts/{contact_id}/consent";

/// A request for `CONTACT`'s consent with the read-write key under the caller's trace (its
/// span, sampled), with these more headers.
async fn traced_request(
    h: &Harness,
    method: Method,
    more: &[(&str, &str)],
    body: Option<String>,
) -> TestResponse {
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let mut headers = vec![("x-api-key", RW_KEY), ("traceparent", &traceparent)];
    headers.extend_from_slice(more);
    h.http
        .send(method, &h.consent_url(CONTACT), &headers, body)
        .await
}

/// A PUT of `CONTACT` as REFUSED under the caller's trace, answered 2xx.
async fn traced_put(h: &Harness) {
    let json = [("content-type", "application/json")];
    let body = Some(r#"{"status":"REFUSED"}"#.into());
    let answer = traced_request(h, Method::PUT, &json, body).await;
    assert_eq!(answer.status / 100, 2, "{}", answer.text());
}

/// The PUT's server span in `trace`, under the caller's span.
fn put_server_span(trace: &[Value]) -> &Value {
    let server = the_one(trace, PUT_SPAN);
    assert_eq!(server["parent_span_id"], CALLER_SPAN);
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_get_is_one_trace_under_the_callers_span_with_each_attempt_and_its_traceparent() {
    let receiver = Receiver::start();
    // The first attempt fails (503), the retry answers.
    let upstream = FakeUpstream::start(|_, n| {
        Act::Send(if n == 0 {
            answer("503 Service Unavailable", &[], b"")
        } else {
            consent_200("CONSENTED")
        })
    })
    .await;
    let h = Harness::start_for_api(&upstream.url(), |c| receiver.export_from(c)).await;
    let answer = traced_request(&h, Method::GET, &[("tracestate", "vendor=opaque")], None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let name = "GET /voicebiometrics/contacts/{contact_id}/consent";
    let trace = receiver.trace(
        CALLER_TRACE,
        &[name, "cache lookup", "cache fill", "GET", "GET"],
    );
    let server = by_name(&trace, name);
    assert_eq!(server.len(), 1, "{trace:#?}");
    let server = server[0];
    assert_eq!(server["parent_span_id"], CALLER_SPAN);
    assert_eq!(server["kind"], 2, "SERVER");
    assert_eq!(server["trace_state"], "vendor=opaque");
    assert_eq!(server["attributes"]["http.request.method"], "GET");
    assert_eq!(
        server["attributes"]["http.route"],
        "/voicebiometrics/contacts/{contact_id}/consent"
    );
    assert_eq!(server["attributes"]["http.response.status_code"], 200);
    assert_eq!(server["attributes"]["consent_proxy.cache.status"], "MISS");
    assert_eq!(server["resource"]["service.name"], "consent-proxy");

    let lookup = by_name(&trace, "cache lookup");
    assert_eq!(lookup.len(), 1, "{trace:#?}");
    assert_eq!(lookup[0]["parent_span_id"], server["span_id"]);
    let fill = by_name(&trace, "cache fill");
    assert_eq!(fill.len(), 1, "{trace:#?}");
    assert_eq!(fill[0]["parent_span_id"], server["span_id"]);

    // Each attempt a client span under the fill; the retry says it is one.
    let mut attempts = by_name(&trace, "GET");
    attempts.sort_by_key(|s| s["start"].as_u64());
    assert_eq!(attempts.len(), 2, "{trace:#?}");
    for attempt in &attempts {
        assert_eq!(attempt["parent_span_id"], fill[0]["span_id"]);
        assert_eq!(attempt["kind"], 3, "CLIENT");
        assert_eq!(attempt["attributes"]["server.address"], "127.0.0.1");
        assert_eq!(
            attempt["attributes"]["url.template"],
            "/voicebiometrics/contacts/{contact_id}/consent"
        );
    }
    assert_eq!(attempts[0]["attributes"]["http.response.status_code"], 503);
    assert_eq!(attempts[0]["status_code"], 2, "ERROR");
    assert!(attempts[0]["attributes"]
        .get("http.request.resend_count")
        .is_none());
    assert_eq!(attempts[1]["attributes"]["http.response.status_code"], 200);
    assert_eq!(attempts[1]["attributes"]["http.request.resend_count"], 1);

    // Upstream got the trace, each attempt naming its own span as the parent.
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for (request, attempt) in seen.iter().zip(&attempts) {
        let expected = format!(
            "traceparent: 00-{CALLER_TRACE}-{}-01",
            attempt["span_id"].as_str().unwrap()
        );
        assert!(
            request.head.to_ascii_lowercase().contains(&expected),
            "{expected} not in:\n{}",
            request.head
        );
        assert!(request.head.contains("vendor=opaque"), "{}", request.head);
    }

    // No contact id, in any form, and no key anywhere in what was exported.
    assert_no_secret(&trace, &[]);

    // A request without traceparent starts a trace of its own (sample_ratio 1.0).
    assert_eq!(h.get(CONTACT).await.status, 200);
    let more = receiver.spans_until(Duration::from_secs(20), |spans| {
        spans.iter().any(|s| s["name"] == name)
    });
    let root = more.iter().find(|s| s["name"] == name).unwrap();
    assert_ne!(root["trace_id"], CALLER_TRACE);
    assert_eq!(root["parent_span_id"], "");
    assert_eq!(root["attributes"]["consent_proxy.cache.status"], "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_with_the_audit_trail_on_has_its_audit_write_under_the_put_before_upstream() {
    let receiver = Receiver::start();
    let audit = AuditDir::new();
    let h = Harness::start_with(|c| {
        receiver.export_from(c);
        audit.sqlite(c, "require");
    })
    .await;
    h.wait_ready().await;
    traced_put(&h).await;

    // The PUT's server span, its audit write and its upstream attempt.
    let trace = receiver.trace(CALLER_TRACE, &[PUT_SPAN, "audit write", "PUT"]);
    let server = put_server_span(&trace);
    let write = the_one(&trace, "audit write");
    assert_eq!(write["parent_span_id"], server["span_id"]);
    assert_eq!(write["kind"], 3, "CLIENT");
    assert_eq!(write["status_code"], 0, "UNSET: the record is durable");
    assert_eq!(write["attributes"]["db.system.name"], "sqlite");
    assert_eq!(write["attributes"]["db.operation.name"], "INSERT");
    assert_eq!(write["attributes"]["consent_proxy.audit.record"], "pending");
    // The record was durable before the PUT went upstream.
    let attempt = the_one(&trace, "PUT");
    assert_eq!(attempt["parent_span_id"], server["span_id"]);
    assert!(
        write["end"].as_u64() <= attempt["start"].as_u64(),
        "{trace:#?}"
    );
    assert_no_secret(&trace, &[CHAIN_KEY]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_in_a_cluster_has_its_two_announcements_under_the_put() {
    let receiver = Receiver::start();
    let redis = RedisServer::start();
    let h = Harness::start_with(|c| {
        c.clustered(&redis.url());
        receiver.export_from(c);
    })
    .await;
    h.wait_cluster_live().await;
    traced_put(&h).await;

    // The PUT's server span, its upstream attempt, and the announcements of the write
    // (before it goes upstream) and of its outcome (after).
    let trace = receiver.trace(
        CALLER_TRACE,
        &[PUT_SPAN, "PUT", "cluster announce", "cluster announce"],
    );
    let server = put_server_span(&trace);
    let attempt = the_one(&trace, "PUT");
    let announcements = by_name(&trace, "cluster announce");
    assert_eq!(announcements.len(), 2, "{trace:#?}");
    for announcement in &announcements {
        assert_eq!(announcement["parent_span_id"], server["span_id"]);
        assert_eq!(announcement["kind"], 3, "CLIENT");
        assert_eq!(announcement["status_code"], 0, "UNSET: Redis took it");
        assert_eq!(announcement["attributes"]["db.system.name"], "redis");
    }
    let stage = |stage: &str| {
        let found: Vec<_> = announcements
            .iter()
            .filter(|a| a["attributes"]["consent_proxy.announcement"] == stage)
            .collect();
        assert_eq!(found.len(), 1, "one {stage} announcement in {trace:#?}");
        *found[0]
    };
    assert!(stage("pending")["end"].as_u64() <= attempt["start"].as_u64());
    assert!(stage("outcome")["start"].as_u64() >= attempt["end"].as_u64());
    assert_no_secret(&trace, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_fetch_is_a_trace_of_its_own_with_its_traceparent_and_no_secret() {
    const TOKEN: &str = "token-from-the-fake-endpoint-0123456789";
    let receiver = Receiver::start();
    // The token endpoint refuses the first request, then gives a token.
    let endpoint = FakeUpstream::start(|_, n| {
        let json = [("Content-Type", "application/json")];
        Act::Send(if n == 0 {
            answer("401 Unauthorized", &json, br#"{"error":"invalid_client"}"#)
        } else {
            let token =
                format!(r#"{{"access_token":"{TOKEN}","token_type":"Bearer","expires_in":600}}"#);
            answer("200 OK", &json, token.as_bytes())
        })
    })
    .await;
    let token_url = format!("{}/oauth/token", endpoint.url());
    let h = Harness::start_with_upstream(
        |sim| (sim.base_url(), token_url.clone()),
        |c| receiver.export_from(c),
    )
    .await;
    h.wait_ready().await;

    let is_fetch = |s: &&Value| s["attributes"]["consent_proxy.operation"] == "token fetch";
    let spans = receiver.spans_until(Duration::from_secs(20), |spans| {
        spans.iter().filter(is_fetch).count() >= 2
    });
    let mut fetches: Vec<&Value> = spans.iter().filter(is_fetch).collect();
    fetches.sort_by_key(|s| s["start"].as_u64());
    assert_ne!(fetches[0]["trace_id"], fetches[1]["trace_id"]);
    for fetch in &fetches {
        // A root: no request asked for it.
        assert_eq!(fetch["parent_span_id"], "", "{fetch:#}");
        assert_eq!(fetch["name"], "POST");
        assert_eq!(fetch["kind"], 3, "CLIENT");
        let attributes = &fetch["attributes"];
        assert_eq!(attributes["http.request.method"], "POST");
        assert_eq!(attributes["server.address"], "127.0.0.1");
        assert_eq!(attributes["server.port"], endpoint.addr.port());
        assert_eq!(attributes["url.full"], token_url.as_str());
    }
    let (refused, fetched) = (fetches[0], fetches[1]);
    assert_eq!(refused["attributes"]["http.response.status_code"], 401);
    assert_eq!(refused["attributes"]["error.type"], "401");
    assert_eq!(refused["status_code"], 2, "ERROR");
    assert!(
        refused["status_message"]
            .as_str()
            .is_some_and(|m| m.contains("401")),
        "{refused:#}"
    );
    assert_eq!(fetched["attributes"]["http.response.status_code"], 200);
    assert!(fetched["attributes"].get("error.type").is_none());
    assert_eq!(fetched["status_code"], 0, "UNSET");

    // Each request to the token endpoint named its own span as the parent.
    let seen = endpoint.seen();
    assert_eq!(seen.len(), 2);
    for (request, fetch) in seen.iter().zip(&fetches) {
        let expected = format!(
            "traceparent: 00-{}-{}-01",
            fetch["trace_id"].as_str().unwrap(),
            fetch["span_id"].as_str().unwrap()
        );
        assert!(
            request.head.to_ascii_lowercase().contains(&expected),
            "{expected} not in:\n{}",
            request.head
        );
    }
    // Neither the secret (sent as Basic credentials) nor the token it got.
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{SIM_CLIENT_ID}:{SIM_CLIENT_SECRET}"));
    assert!(seen[0].head.contains(&basic), "{}", seen[0].head);
    let fetches: Vec<Value> = fetches.into_iter().cloned().collect();
    assert_no_secret(&fetches, &[TOKEN, &basic]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_only_the_failure_counter() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let h = Harness::start_seeded(
        CONTACT,
        consent_proxy::consent::ConsentStatus::Consented,
        |c| {
            c.set_str("otel.endpoint", &endpoint);
        },
    )
    .await;
    for _ in 0..20 {
        assert_eq!(h.get(CONTACT).await.status, 200);
    }
    wait_until(Duration::from_secs(20), || async {
        h.metric("consent_proxy_otel_export_failures_total").await >= 1.0
    })
    .await;
    assert!(h.metric("consent_proxy_otel_spans_dropped_total").await >= 1.0);
    assert_eq!(
        h.metric("consent_proxy_otel_spans_exported_total").await,
        0.0
    );
}
