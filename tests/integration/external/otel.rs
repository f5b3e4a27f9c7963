//! OpenTelemetry traces against an independent OTLP/HTTP receiver: `tests/otlp_receiver.py`,
//! which decodes what the proxy sends with the `opentelemetry-proto` package (a Python from
//! `.venv-otlp-receiver`, or `OTLP_RECEIVER_PYTHON`; missing, the test fails loudly).
//!
//! - a GET carrying a caller's `traceparent` is exported as one trace under the caller's span:
//!   the server span, the cache lookup, the fill and each upstream attempt (a retry visible),
//!   with the trace id and the attempt's span id sent upstream in `traceparent`;
//! - no span name or attribute holds the contact id or a secret;
//! - a collector that is not there costs the requests nothing, only the failure counter.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use http::Method;
use serde_json::Value;

use crate::support::fake_upstream::{answer, consent_200, Act, FakeUpstream};
use crate::support::python_venv::venv_python;
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

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const CONTACT: &str = "+15550240001";

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
    let endpoint = receiver.endpoint();
    let h = Harness::start_for_api(&upstream.url(), |c| {
        c.set_str("otel.endpoint", &endpoint)
            .set("otel.sample_ratio", "1.0");
    })
    .await;
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let answer = h
        .http
        .send(
            Method::GET,
            &h.consent_url(CONTACT),
            &[
                ("x-api-key", RW_KEY),
                ("traceparent", &traceparent),
                ("tracestate", "vendor=opaque"),
            ],
            None,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let trace = receiver.spans_until(Duration::from_secs(20), |spans| {
        spans
            .iter()
            .filter(|s| s["trace_id"] == CALLER_TRACE)
            .count()
            >= 5
    });
    let trace: Vec<Value> = trace
        .into_iter()
        .filter(|s| s["trace_id"] == CALLER_TRACE)
        .collect();
    let name = "GET /voicebiometrics/contacts/{contact_id}/consent";
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
    let exported = serde_json::to_string(&trace).unwrap();
    for secret in [CONTACT, "15550240001", "%2B15550240001", RW_KEY] {
        assert!(!exported.contains(secret), "{secret} exported: {exported}");
    }

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
