//! A real Prometheus scrapes the proxy's admin listener, loads `deploy/prometheus/alerts.yml`,
//! and answers every query of `deploy/grafana/consent-proxy.json`. The proxy runs in cluster
//! mode, with the shared tier, against a real `redis-server` (see `crate::support::redis_server`), so
//! that every metric the rules and panels name is exposed.
//!
//! Needs `prometheus` on PATH (Debian/Ubuntu: `apt-get install -y prometheus`) or in
//! `$PROMETHEUS`; without it the test fails, saying so. Prometheus runs on a free loopback
//! port with its own temporary config and storage, and is killed when the test ends.

use std::collections::BTreeSet;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::*;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute};
use http::Method;
use serde_json::Value;

const JOB: &str = "consent-proxy";
const CONTACT: &str = "+15557654321";
const CONTACT_RENEWAL: &str = "+15557654322";

/// Every alert `deploy/prometheus/alerts.yml` must define.
const ALERTS: &[&str] = &[
    "ConsentProxyDown",
    "TokenUnavailable",
    "TokenFetchFailing",
    "ConsentErrorRatioHigh",
    "UpstreamErrorRatioHigh",
    "UpstreamLatencyHigh",
    "CacheHitRatioCollapsed",
    "ClusterFeedDown",
    "SharedCacheUnavailable",
];

#[tokio::test]
async fn prometheus_scrapes_the_proxy_evaluates_the_alerts_and_runs_the_dashboard_queries() {
    // In cluster mode with the shared tier (and a real Redis), so that the cluster's and the
    // shared tier's metrics, panels and alerts are exercised too; the traffic below is the
    // same as for a single instance.
    let redis = crate::support::redis_server::RedisServer::start();
    // And with the audit trail on, for its panels and alert.
    let audit = crate::support::audit::AuditDir::new();
    let h = Harness::start_with(|c| {
        crate::support::fleet::shared_tier(c.clustered(&redis.url()), true, true);
        audit.sqlite(c, "require");
    })
    .await;
    h.wait_cluster_live().await;
    let target = h.proxy.admin_url().trim_start_matches("http://").to_owned();
    let http = TestClient::new();
    let prometheus =
        Prometheus::start(&http, &target, &repo_path("deploy/prometheus/alerts.yml")).await;

    // 1 miss and 4 hits on one contact, then a write.
    h.sim.set_status(CONTACT, ConsentStatus::Consented);
    for expected in ["MISS", "HIT", "HIT", "HIT", "HIT"] {
        let response = h.get(CONTACT).await;
        assert_eq!(
            (response.status, response.header("x-cache-status")),
            (200, Some(expected)),
            "{}",
            response.text()
        );
    }
    let put = h.put(CONTACT, "REFUSED").await;
    assert!((200..300).contains(&put.status), "PUT: {}", put.text());

    // The scrape.
    for (query, expected) in [
        (r#"up{job="consent-proxy"}"#, 1.0),
        (r#"consent_proxy_cache_lookups_total{result="hit"}"#, 4.0),
        (r#"consent_proxy_cache_lookups_total{result="miss"}"#, 1.0),
        (
            r#"consent_proxy_request_duration_seconds_count{route="consent",method="GET"}"#,
            5.0,
        ),
        (
            r#"consent_proxy_request_duration_seconds_count{route="consent",method="PUT"}"#,
            1.0,
        ),
        (
            r#"consent_proxy_consent_writes_total{status="REFUSED"}"#,
            1.0,
        ),
    ] {
        prometheus.wait_for_value(&http, query, expected).await;
    }

    // One upstream 401 (token renewed, request retried) on another contact, so that the
    // token rejection counter the dashboard shows has a series too.
    h.sim.set_status(CONTACT_RENEWAL, ConsentStatus::NoConsent);
    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 1);
    let renewed = h.get(CONTACT_RENEWAL).await;
    assert_eq!(renewed.status, 200, "{}", renewed.text());

    let exposition = h.admin("/metrics").await.text();
    check_rules(&prometheus, &http, &exposition).await;
    check_dashboard(&prometheus, &http, &exposition, &target).await;

    drop(prometheus);
    h.proxy.shutdown().await;
}

/// Prometheus loaded every alert of alerts.yml, evaluates each without error, and none is
/// pending or firing against a healthy proxy; every metric a rule names is exposed.
async fn check_rules(prometheus: &Prometheus, http: &TestClient, exposition: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let (last, settled) = loop {
        let answer = prometheus.get_json(http, "/api/v1/rules?type=alert").await;
        let rules = all_rules(&answer);
        let settled = !rules.is_empty()
            && rules.iter().all(|rule| {
                rule["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001-"))
                    && rule["health"] == "ok"
                    && rule["state"] == "inactive"
            });
        if settled || Instant::now() >= deadline {
            break (answer, settled);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let rules = all_rules(&last);
    let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    for alert in ALERTS {
        assert!(names.contains(alert), "alert {alert} not loaded: {names:?}");
    }
    for rule in &rules {
        assert_eq!(
            rule["health"], "ok",
            "rule {} unhealthy: {}",
            rule["name"], rule["lastError"]
        );
        assert_ne!(
            rule["state"], "firing",
            "rule {} fires: {rule}",
            rule["name"]
        );
        for metric in metric_names(rule["query"].as_str().unwrap_or_default()) {
            assert!(
                exposed(exposition, &metric),
                "rule {} uses {metric}, which /metrics does not expose",
                rule["name"]
            );
        }
    }
    assert!(
        settled,
        "rules not all evaluated, healthy and inactive within 20 s: {last:#}"
    );
}

/// Every target of every panel of the dashboard is a valid query against the real
/// Prometheus, naming only metrics the proxy exposes; the core panels show data.
async fn check_dashboard(
    prometheus: &Prometheus,
    http: &TestClient,
    exposition: &str,
    instance: &str,
) {
    let path = repo_path("deploy/grafana/consent-proxy.json");
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));

    let schema = dashboard["schemaVersion"].as_u64().unwrap_or(0);
    assert!(schema >= 36, "schemaVersion {schema}");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    assert!(
        variables.iter().any(|v| v["type"] == "datasource"
            && v["name"] == "DS_PROMETHEUS"
            && v["query"] == "prometheus"),
        "no Prometheus datasource variable DS_PROMETHEUS"
    );

    let panels = all_panels(&dashboard);
    let mut targets = Vec::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {title:?} datasource"
        );
        let panel_targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!panel_targets.is_empty(), "panel {title:?} has no targets");
        for target in panel_targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: target without expr"))
                .to_owned();
            targets.push((title.clone(), expr));
        }
    }

    // The panels the dashboard must have, by the metric they show.
    let all_exprs = targets
        .iter()
        .map(|(_, e)| e.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for metric in [
        "consent_proxy_requests_total",
        "consent_proxy_request_duration_seconds_bucket",
        "consent_proxy_cache_lookups_total",
        "consent_proxy_cache_entries",
        "consent_proxy_upstream_request_duration_seconds_bucket",
        "consent_proxy_upstream_requests_total",
        "consent_proxy_token_expiry_timestamp_seconds",
        "consent_proxy_consent_writes_total",
        "consent_proxy_cluster_connected",
        "consent_proxy_cluster_messages_total",
        "consent_proxy_cluster_propagation_seconds_bucket",
        "consent_proxy_shared_cache_lookups_total",
        "consent_proxy_shared_cache_stores_total",
        "consent_proxy_shared_redis_duration_seconds_bucket",
        "consent_proxy_shared_token_obtained_total",
        "consent_proxy_shared_token_lock_waits_total",
        "consent_proxy_audit_records_total",
        "consent_proxy_audit_failures_total",
        "consent_proxy_audit_pending_records",
        "consent_proxy_audit_store_up",
    ] {
        assert!(
            all_exprs.contains(metric),
            "no dashboard panel queries {metric}"
        );
    }

    for (title, expr) in &targets {
        let query = substitute_variables(expr, instance);
        assert!(
            !query.contains('$'),
            "panel {title:?}: unknown Grafana variable left in {query:?}"
        );
        for metric in metric_names(&query) {
            assert!(
                exposed(exposition, &metric),
                "panel {title:?} uses {metric}, which /metrics does not expose"
            );
        }
        let answer = prometheus.query(http, &query).await;
        assert_eq!(
            answer["status"], "success",
            "panel {title:?}: {query}\n{answer:#}"
        );
    }

    // The core panels have data once Prometheus holds a few scrapes.
    for title in [
        "Requests by code",
        "Request latency p50 / p99",
        "Cache hit ratio",
        "Cache entries",
        "Upstream latency p50 / p99",
        "Token time to expiry",
        "Consent writes by status",
        "Cluster feed live",
        "Cluster messages",
        "Shared cache lookups by result",
    ] {
        let (_, expr) = targets
            .iter()
            .find(|(t, _)| t == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"));
        let query = substitute_variables(expr, instance);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let answer = prometheus.query(http, &query).await;
            if answer["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "panel {title:?} shows no data: {query}\n{answer:#}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// What Grafana would put in place of its variables for this one proxy.
fn substitute_variables(expr: &str, instance: &str) -> String {
    let mut query = expr.to_owned();
    for (variable, value) in [
        ("$__rate_interval", "1m"),
        ("${__rate_interval}", "1m"),
        ("$__interval", "15s"),
        ("${__interval}", "15s"),
        ("$__range", "1h"),
        ("${__range}", "1h"),
        ("${job}", JOB),
        ("$job", JOB),
        ("${instance}", instance),
        ("$instance", instance),
    ] {
        query = query.replace(variable, value);
    }
    query
}

fn all_panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    fn walk(panels: &Value, out: &mut Vec<Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                walk(&panel["panels"], out);
            } else {
                out.push(panel.clone());
            }
        }
    }
    walk(&dashboard["panels"], &mut out);
    assert!(!out.is_empty(), "dashboard has no panels");
    out
}

fn all_rules(answer: &Value) -> Vec<Value> {
    answer["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The `consent_proxy_*` and `process_*` metric names a query mentions.
fn metric_names(query: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = query.as_bytes();
    let is_name = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if is_name(bytes[i]) && (i == 0 || !is_name(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && is_name(bytes[i]) {
                i += 1;
            }
            let word = &query[start..i];
            if word.starts_with("consent_proxy_") || word.starts_with("process_") {
                names.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Whether the exposition has samples of `metric` (a series name, e.g. `x_bucket`).
fn exposed(exposition: &str, metric: &str) -> bool {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .any(|line| {
            line.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A Prometheus server of our own

struct Prometheus {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Prometheus {
    /// Starts `$PROMETHEUS` (else `prometheus` from PATH) scraping `target` every second and
    /// evaluating `rules` every second; returns once it answers `/-/ready`.
    async fn start(http: &TestClient, target: &str, rules: &Path) -> Prometheus {
        let program = std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".to_owned());
        if let Err(err) = Command::new(&program).arg("--version").output() {
            panic!(
                "prometheus is required by this test and could not be run ({program}: {err}). \
                 Install it: `apt-get install -y prometheus` (Debian/Ubuntu), or put the \
                 prometheus binary from https://prometheus.io/download/ on PATH, or set PROMETHEUS."
            );
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "consent-proxy-prometheus-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules:?}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules = rules.display().to_string(),
            ),
        )
        .expect("write prometheus.yml");

        // The port is free when probed; another process may take it before Prometheus
        // binds, so try a few.
        let mut failures = Vec::new();
        for attempt in 0..3 {
            let port = free_port();
            let log_path = dir.join(format!("prometheus-{attempt}.log"));
            let log = fs::File::create(&log_path).expect("log file");
            let mut child = Command::new(&program)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {program}: {e}"));
            let url = format!("http://127.0.0.1:{port}");
            match wait_ready(http, &mut child, &url, Duration::from_secs(30)).await {
                Ok(()) => return Prometheus { child, dir, url },
                Err(reason) => {
                    let log = fs::read_to_string(&log_path).unwrap_or_default();
                    failures.push(format!("attempt {attempt} on port {port}: {reason}\n{log}"));
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        let _ = fs::remove_dir_all(&dir);
        panic!("Prometheus did not start:\n{}", failures.join("\n"));
    }

    async fn get_json(&self, http: &TestClient, path_and_query: &str) -> Value {
        let response = http
            .send(
                Method::GET,
                &format!("{}{path_and_query}", self.url),
                &[],
                None,
            )
            .await;
        serde_json::from_slice(&response.body).unwrap_or_else(|_| {
            panic!(
                "Prometheus {path_and_query}: {} {}",
                response.status,
                response.text()
            )
        })
    }

    /// An instant query; the whole API answer (errors included).
    async fn query(&self, http: &TestClient, query: &str) -> Value {
        self.get_json(http, &format!("/api/v1/query?query={}", url_encode(query)))
            .await
    }

    /// Polls (bounded) until `query` returns exactly one series whose value is `expected`.
    async fn wait_for_value(&self, http: &TestClient, query: &str, expected: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let last = self.query(http, query).await;
            let result = last["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if result.len() == 1
                && result[0]["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    == Some(expected)
            {
                return;
            }
            if Instant::now() >= deadline {
                let targets = self.get_json(http, "/api/v1/targets").await;
                panic!(
                    "Prometheus never returned {expected} for {query} within 30 s.\n\
                     last answer: {last:#}\nscrape targets: {targets:#}"
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Polls `/-/ready` until it answers 200; an error when the process exits or time runs out.
async fn wait_ready(
    http: &TestClient,
    child: &mut Child,
    url: &str,
    limit: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Err(format!("exited with {status}"));
        }
        // Connection refused until it listens: probe the port before sending.
        let addr = url.trim_start_matches("http://");
        if tokio::net::TcpStream::connect(addr).await.is_ok()
            && http
                .send(Method::GET, &format!("{url}/-/ready"), &[], None)
                .await
                .status
                == 200
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
