//! `GET /metrics` after real traffic: clean under `promtool check metrics` (no lint output at
//! all), every metric of the contract present with exactly its labels and bounded label values,
//! histograms that resolve 50 µs and 5 s, the `process_*` metrics, and no contact id anywhere.
//!
//! Needs `promtool` on PATH (Debian/Ubuntu: `apt-get install -y prometheus`) or in `$PROMTOOL`;
//! without it the test fails, saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::*;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute};
use http::Method;

/// The contract's metric table: name, type, label names.
const CONTRACT: &[(&str, &str, &[&str])] = &[
    (
        "consent_proxy_requests_total",
        "counter",
        &["route", "method", "code", "client"],
    ),
    (
        "consent_proxy_request_duration_seconds",
        "histogram",
        &["route", "method"],
    ),
    ("consent_proxy_cache_lookups_total", "counter", &["result"]),
    ("consent_proxy_cache_entries", "gauge", &[]),
    (
        "consent_proxy_cache_invalidations_total",
        "counter",
        &["reason"],
    ),
    (
        "consent_proxy_upstream_requests_total",
        "counter",
        &["method", "code"],
    ),
    (
        "consent_proxy_upstream_request_duration_seconds",
        "histogram",
        &["method"],
    ),
    ("consent_proxy_token_fetches_total", "counter", &["result"]),
    ("consent_proxy_token_expiry_timestamp_seconds", "gauge", &[]),
    ("consent_proxy_consent_writes_total", "counter", &["status"]),
    ("consent_proxy_upstream_circuit_open", "gauge", &[]),
];

/// Contacts used below; none of their digits may appear in the exposition.
const CONTACT_READ_WRITE: &str = "+31642973805";
const CONTACT_PERCENT: &str = "%2B4915207319864";
const CONTACT_UPSTREAM_500: &str = "+8613912345678";
const CONTACT_NOT_FOUND: &str = "+27829456031";
const CONTACT_INVALID: &str = "+6591827364%21";
const CONTACT_DIGITS: &[&str] = &[
    "31642973805",
    "4915207319864",
    "8613912345678",
    "27829456031",
    "6591827364",
];

#[tokio::test]
async fn metrics_are_promtool_clean_and_complete_after_traffic() {
    let promtool = Promtool::find();
    promtool.assert_detects_lint();

    // The first token fetch fails (401 from the token endpoint), the refresher's retry
    // succeeds: both `result` values of the token fetch counter get a sample.
    let sim = start_simulator().await;
    sim.inject(SimRoute::Token, Fault::Unauthorized, 1);
    let proxy = ProxyConfig::for_simulator(&sim).start().await;
    let h = Harness {
        sim,
        proxy,
        http: TestClient::new(),
    };
    h.wait_ready().await;
    drive_traffic(&h).await;

    let response = h.admin("/metrics").await;
    assert_eq!(response.status, 200);
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "content-type {content_type:?}"
    );
    let text = response.text();

    // 1. promtool: exit 0 and not a word of lint.
    promtool.assert_clean(&text);

    let exposition = Exposition::parse(&text);

    // 2. Every contract metric, with its type, help and exactly its labels.
    for (name, kind, labels) in CONTRACT {
        exposition.assert_family(name, kind, labels);
    }

    // 3. Label values are the bounded sets the contract names.
    let values = |name: &str, label: &str| exposition.label_values(name, label);
    let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    for name in [
        "consent_proxy_requests_total",
        "consent_proxy_request_duration_seconds_count",
    ] {
        assert_eq!(values(name, "route"), set(&["consent", "other"]), "{name}");
    }
    let clients = values("consent_proxy_requests_total", "client");
    assert!(
        clients.is_subset(&set(&["rw", "reader", "ops", "anonymous"])),
        "client label values {clients:?}"
    );
    assert!(clients.contains("anonymous") && clients.contains("rw"));
    assert_eq!(
        values("consent_proxy_cache_lookups_total", "result"),
        set(&["hit", "miss", "coalesced", "bypass", "unsynced", "stale"])
    );
    assert_eq!(
        values("consent_proxy_consent_writes_total", "status"),
        ConsentStatus::ALL
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect()
    );
    assert_eq!(
        values("consent_proxy_token_fetches_total", "result"),
        set(&["success", "failure"])
    );
    let reasons = values("consent_proxy_cache_invalidations_total", "reason");
    assert!(
        reasons.contains("write") && reasons.contains("purge"),
        "invalidation reasons {reasons:?}"
    );
    let upstream_codes = values("consent_proxy_upstream_requests_total", "code");
    assert!(
        upstream_codes.iter().all(|c| {
            c == "error"
                || c == "timeout"
                || (c.len() == 3 && c.bytes().all(|b| b.is_ascii_digit()))
        }),
        "upstream code values {upstream_codes:?}"
    );
    assert!(upstream_codes.contains("500") && upstream_codes.contains("200"));

    // The traffic is counted as it happened.
    let sample = |s: &str| metric_value(&text, s);
    assert_eq!(
        sample(r#"consent_proxy_cache_lookups_total{result="hit"}"#),
        2.0
    );
    assert_eq!(
        sample(r#"consent_proxy_consent_writes_total{status="REFUSED"}"#),
        1.0
    );
    assert_eq!(
        sample(
            r#"consent_proxy_requests_total{client="rw",code="400",method="GET",route="consent"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            r#"consent_proxy_requests_total{client="anonymous",code="401",method="GET",route="consent"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            r#"consent_proxy_requests_total{client="rw",code="502",method="GET",route="consent"}"#
        ),
        1.0
    );
    assert!(sample("consent_proxy_token_expiry_timestamp_seconds") > 1.0e9);
    assert_eq!(sample("consent_proxy_cache_entries"), 2.0);

    // 4. Every histogram resolves 50 µs and 5 s.
    let histograms = exposition.families_of_type("histogram");
    assert!(histograms.len() >= 2, "histograms: {histograms:?}");
    for name in &histograms {
        let bounds = exposition.bucket_bounds(name);
        assert!(
            bounds.contains(&f64::INFINITY),
            "{name}: no +Inf bucket in {bounds:?}"
        );
        assert!(
            bounds.iter().any(|&le| le <= 0.000_05),
            "{name}: no bucket at or below 50 µs in {bounds:?}"
        );
        assert!(
            bounds.iter().any(|&le| le.is_finite() && le >= 5.0),
            "{name}: no finite bucket at or above 5 s in {bounds:?}"
        );
    }

    // 5. The process metrics.
    #[cfg(target_os = "linux")]
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            exposition.samples.iter().any(|s| s.name == name),
            "{name} missing"
        );
    }
    #[cfg(target_os = "linux")]
    assert!(sample("process_start_time_seconds") > 1.0e9);

    // 6. Which build runs.
    assert_eq!(
        sample(&format!(
            r#"consent_proxy_build_info{{commit="{}",version="{}"}}"#,
            consent_proxy::build_info::COMMIT,
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );

    // 7. No contact id: neither its digits anywhere nor a contact-like label (the build's
    // commit hash may hold a run of digits).
    for digits in CONTACT_DIGITS {
        assert!(
            !text.contains(digits),
            "contact digits {digits} appear in /metrics:\n{text}"
        );
    }
    for sample in &exposition.samples {
        for (label, value) in &sample.labels {
            assert!(
                !label.contains("contact"),
                "label {label} on {}",
                sample.name
            );
            if label == "le" || (sample.name == "consent_proxy_build_info" && label == "commit") {
                continue;
            }
            // A phone-number-like value: a leading `+` or `%2B`, or a run of 6+ digits.
            let longest_digit_run = value
                .split(|c: char| !c.is_ascii_digit())
                .map(str::len)
                .max()
                .unwrap_or(0);
            assert!(
                !value.starts_with('+') && !value.starts_with("%2B") && longest_digit_run < 6,
                "contact-like label value {label}={value:?} on {}",
                sample.name
            );
        }
    }

    h.proxy.shutdown().await;
}

/// Cluster mode (a real `redis-server`): the cluster's metrics are there, with the contract's
/// types and labels, promtool-clean, after a write through the cluster.
#[tokio::test]
async fn cluster_metrics_are_promtool_clean_and_complete() {
    let promtool = Promtool::find();
    let redis = crate::support::redis_server::RedisServer::start();
    let h = Harness::start_with(|c| {
        c.clustered(&redis.url());
    })
    .await;
    h.wait_cluster_live().await;
    assert_eq!(h.metric("consent_proxy_cluster_connected").await, 1.0);
    assert_eq!(h.put(CONTACT_READ_WRITE, "REFUSED").await.status / 100, 2);
    let text = h.admin("/metrics").await.text();
    promtool.assert_clean(&text);
    let exposition = Exposition::parse(&text);
    for (name, kind, labels) in [
        ("consent_proxy_cluster_connected", "gauge", &[][..]),
        (
            "consent_proxy_cluster_messages_total",
            "counter",
            &["direction"][..],
        ),
        (
            "consent_proxy_cluster_propagation_seconds",
            "histogram",
            &[][..],
        ),
        (
            "consent_proxy_cluster_announce_failures_total",
            "counter",
            &["stage"][..],
        ),
        (
            "consent_proxy_cluster_unannounced_writes_total",
            "counter",
            &[][..],
        ),
        ("consent_proxy_cluster_resyncs_total", "counter", &[][..]),
    ] {
        exposition.assert_family(name, kind, labels);
    }
    assert_eq!(
        exposition.label_values("consent_proxy_cluster_messages_total", "direction"),
        ["received", "sent"].iter().map(|s| s.to_string()).collect()
    );
    // Two announcements of the write, and heartbeats.
    assert!(
        metric_value(
            &text,
            r#"consent_proxy_cluster_messages_total{direction="sent"}"#
        ) >= 3.0
    );
    h.proxy.shutdown().await;
}

/// The cluster's shared tier (a real `redis-server`): its metrics are there, with their types
/// and labels, promtool-clean, after a shared-tier hit (of a contact another instance read) and
/// a write.
#[tokio::test]
async fn shared_tier_metrics_are_promtool_clean_and_complete() {
    let promtool = Promtool::find();
    let redis = crate::support::redis_server::RedisServer::start();
    let h = Harness::start_with(|c| {
        crate::support::fleet::shared_tier(c.clustered(&redis.url()), true, true);
    })
    .await;
    h.wait_cluster_live().await;
    h.sim
        .set_status(CONTACT_READ_WRITE, ConsentStatus::Consented);
    // A miss of this instance, fetched and stored for the fleet.
    let fetched = "+31642973806";
    h.sim.set_status(fetched, ConsentStatus::Consented);
    assert_eq!(h.get(fetched).await.header("x-cache-status"), Some("MISS"));
    // Another instance reads the contact into Redis (once its feed is live: a MISS, not a
    // BYPASS); this one then finds it there.
    let mut config = crate::support::ProxyConfig::for_simulator(&h.sim);
    crate::support::fleet::shared_tier(config.clustered(&redis.url()), true, true);
    let other = crate::support::fleet::Instance::start(&config).await;
    crate::support::wait_until(std::time::Duration::from_secs(10), || async {
        let answer = crate::support::ProxyClient {
            http: &h.http,
            proxy: &other.proxy,
        }
        .get(CONTACT_READ_WRITE)
        .await;
        answer.header("x-cache-status") == Some("MISS")
    })
    .await;
    let shared = h.get(CONTACT_READ_WRITE).await;
    assert_eq!(shared.header("x-cache-tier"), Some("shared"));
    assert_eq!(h.put(CONTACT_READ_WRITE, "REFUSED").await.status / 100, 2);
    let text = h.admin("/metrics").await.text();
    promtool.assert_clean(&text);
    let exposition = Exposition::parse(&text);
    for (name, kind, labels) in [
        (
            "consent_proxy_shared_cache_lookups_total",
            "counter",
            &["result"][..],
        ),
        (
            "consent_proxy_shared_cache_stores_total",
            "counter",
            &["result"][..],
        ),
        (
            "consent_proxy_shared_redis_duration_seconds",
            "histogram",
            &["op"][..],
        ),
        (
            "consent_proxy_shared_token_obtained_total",
            "counter",
            &["source"][..],
        ),
        (
            "consent_proxy_shared_token_lock_waits_total",
            "counter",
            &[][..],
        ),
    ] {
        exposition.assert_family(name, kind, labels);
    }
    for (name, label, values) in [
        (
            "consent_proxy_shared_cache_lookups_total",
            "result",
            &[
                "coalesced",
                "hit",
                "lock_timeout",
                "miss",
                "outdated",
                "unavailable",
                "write_pending",
            ][..],
        ),
        (
            "consent_proxy_shared_cache_stores_total",
            "result",
            &["failed", "refused", "stored"][..],
        ),
        (
            "consent_proxy_shared_token_obtained_total",
            "source",
            &["alone", "fleet", "renewed"][..],
        ),
        (
            "consent_proxy_shared_redis_duration_seconds_count",
            "op",
            &["lookup", "store", "token"][..],
        ),
    ] {
        assert_eq!(
            exposition.label_values(name, label),
            values.iter().map(|s| s.to_string()).collect(),
            "{name}"
        );
    }
    for (sample, expected) in [
        (
            r#"consent_proxy_shared_cache_lookups_total{result="miss"}"#,
            1.0,
        ),
        (
            r#"consent_proxy_shared_cache_lookups_total{result="hit"}"#,
            1.0,
        ),
        (
            r#"consent_proxy_shared_cache_stores_total{result="stored"}"#,
            1.0,
        ),
        (
            r#"consent_proxy_shared_token_obtained_total{source="renewed"}"#,
            1.0,
        ),
    ] {
        assert_eq!(metric_value(&text, sample), expected, "{sample}");
    }
    h.proxy.shutdown().await;
}

/// GET miss + hit (twice), a `%2B` GET, a PUT, a 404 from upstream (cached), an upstream 500
/// answered 502, a 400, a 401, an unknown route, an admin purge.
async fn drive_traffic(h: &Harness) {
    h.sim
        .set_status(CONTACT_READ_WRITE, ConsentStatus::Consented);
    h.sim.set_status("+4915207319864", ConsentStatus::NoConsent);
    h.sim
        .set_status(CONTACT_UPSTREAM_500, ConsentStatus::Consented);
    h.sim.remove_contact(CONTACT_NOT_FOUND);

    let expect = |r: &TestResponse, status: u16, cache: Option<&str>| {
        assert_eq!(
            (r.status, r.header("x-cache-status")),
            (status, cache),
            "{}",
            r.text()
        );
    };
    expect(&h.get(CONTACT_READ_WRITE).await, 200, Some("MISS"));
    expect(&h.get(CONTACT_READ_WRITE).await, 200, Some("HIT"));
    expect(&h.get(CONTACT_PERCENT).await, 200, Some("MISS"));
    expect(&h.get(CONTACT_PERCENT).await, 200, Some("HIT"));
    expect(&h.get(CONTACT_NOT_FOUND).await, 404, Some("MISS"));
    let put = h.put(CONTACT_READ_WRITE, "REFUSED").await;
    assert!((200..300).contains(&put.status), "PUT: {}", put.text());

    // Upstream 500 on every attempt (the first and both retries): the caller gets 502.
    h.sim.inject(SimRoute::Get, Fault::Status500, 3);
    let failed = h.get(CONTACT_UPSTREAM_500).await;
    assert_eq!(failed.status, 502, "{}", failed.text());
    h.sim.clear_faults();

    let invalid = h.get(CONTACT_INVALID).await;
    assert_eq!(invalid.status, 400, "{}", invalid.text());
    let anonymous = h
        .http
        .send(Method::GET, &h.consent_url(CONTACT_READ_WRITE), &[], None)
        .await;
    assert_eq!(anonymous.status, 401);
    let other = h
        .http
        .send(
            Method::GET,
            &format!(
                "{}/voicebiometrics/contacts/{CONTACT_READ_WRITE}",
                h.proxy.url()
            ),
            &[("x-api-key", RW_KEY)],
            None,
        )
        .await;
    assert_eq!(other.status, 404);

    let purge = h
        .http
        .send(
            Method::DELETE,
            &format!("{}/admin/cache/{CONTACT_NOT_FOUND}", h.proxy.admin_url()),
            &[("x-api-key", ADMIN_KEY)],
            None,
        )
        .await;
    assert_eq!(purge.status, 204, "{}", purge.text());
}

// ---------------------------------------------------------------------------------------------
// promtool

struct Promtool {
    program: String,
}

impl Promtool {
    /// `$PROMTOOL`, else `promtool` from PATH; fails the test when neither runs.
    fn find() -> Promtool {
        let program = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_owned());
        match Command::new(&program).arg("--version").output() {
            Ok(output) if output.status.success() => Promtool { program },
            Ok(output) => panic!(
                "`{program} --version` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(err) => panic!(
                "promtool is required by this test and could not be run ({program}: {err}). \
                 Install it: `apt-get install -y prometheus` (Debian/Ubuntu; provides promtool), \
                 or put promtool from https://prometheus.io/download/ on PATH, or set PROMTOOL."
            ),
        }
    }

    /// Exit code and everything printed (stdout and stderr).
    fn check_metrics(&self, exposition: &str) -> (Option<i32>, String) {
        let mut child = Command::new(&self.program)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {} check metrics: {e}", self.program));
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(exposition.as_bytes())
            .expect("write to promtool");
        let output = child.wait_with_output().expect("promtool output");
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        (output.status.code(), text)
    }

    /// `promtool check metrics` exits 0 and prints nothing about `exposition`.
    fn assert_clean(&self, exposition: &str) {
        let (code, output) = self.check_metrics(exposition);
        assert!(
            code == Some(0) && output.trim().is_empty(),
            "`promtool check metrics` exit {code:?}, output:\n{output}\n--- exposition ---\n{exposition}"
        );
    }

    /// The check has teeth: promtool reports a known lint (a counter without `_total`).
    fn assert_detects_lint(&self) {
        let (code, output) =
            self.check_metrics("# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\n");
        assert!(
            code != Some(0) && output.contains("_total"),
            "promtool did not flag a lint: exit {code:?}, output {output:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A small parser for the text exposition format.

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Exposition {
    types: BTreeMap<String, String>,
    helps: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut exposition = Exposition {
            types: BTreeMap::new(),
            helps: BTreeMap::new(),
            samples: Vec::new(),
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                exposition.types.insert(name.into(), kind.trim().into());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                exposition.helps.insert(name.into(), help.into());
            } else if !line.starts_with('#') {
                exposition.samples.push(parse_sample(line));
            }
        }
        exposition
    }

    /// `# TYPE` and a non-empty `# HELP`; samples whose label names are exactly `labels`
    /// (plus `le` on buckets).
    fn assert_family(&self, name: &str, kind: &str, labels: &[&str]) {
        assert_eq!(
            self.types.get(name).map(String::as_str),
            Some(kind),
            "# TYPE of {name}"
        );
        assert!(
            self.helps.get(name).is_some_and(|h| !h.trim().is_empty()),
            "{name} has no help text"
        );
        let expected: BTreeSet<&str> = labels.iter().copied().collect();
        let series: Vec<(String, BTreeSet<&str>)> = if kind == "histogram" {
            let mut with_le = expected.clone();
            with_le.insert("le");
            vec![
                (format!("{name}_bucket"), with_le),
                (format!("{name}_sum"), expected.clone()),
                (format!("{name}_count"), expected),
            ]
        } else {
            vec![(name.to_owned(), expected)]
        };
        for (series_name, expected) in series {
            let samples: Vec<&Sample> = self
                .samples
                .iter()
                .filter(|s| s.name == series_name)
                .collect();
            assert!(!samples.is_empty(), "no sample of {series_name}");
            for sample in samples {
                let got: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
                assert_eq!(got, expected, "labels of {series_name}: {sample:?}");
                assert!(!sample.value.is_nan(), "{series_name} is NaN: {sample:?}");
            }
        }
    }

    fn label_values(&self, sample_name: &str, label: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|s| s.name == sample_name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }

    fn families_of_type(&self, kind: &str) -> Vec<String> {
        self.types
            .iter()
            .filter(|(_, k)| k.as_str() == kind)
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn bucket_bounds(&self, histogram: &str) -> Vec<f64> {
        let bucket = format!("{histogram}_bucket");
        let mut bounds: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == bucket)
            .map(|s| {
                let le = s.labels.get("le").expect("bucket without le");
                match le.as_str() {
                    "+Inf" => f64::INFINITY,
                    other => other.parse().unwrap_or_else(|_| panic!("bad le {other:?}")),
                }
            })
            .collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        bounds
    }
}

/// `name{a="x",b="y"} value [timestamp]` or `name value`.
fn parse_sample(line: &str) -> Sample {
    let (name, mut rest) = match line.find(['{', ' ']) {
        Some(i) => (&line[..i], &line[i..]),
        None => panic!("sample line without value: {line:?}"),
    };
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let mut end = None;
        loop {
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            assert_eq!(
                chars.next().map(|(_, c)| c),
                Some('"'),
                "label value not quoted: {line:?}"
            );
            let mut value = String::new();
            let mut escaped = false;
            for (_, c) in chars.by_ref() {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false;
                    }
                    (true, c) => {
                        value.push(c);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => break,
                    (false, c) => value.push(c),
                }
            }
            labels.insert(key.trim().to_owned(), value);
        }
        let end = end.unwrap_or_else(|| panic!("unterminated labels: {line:?}"));
        rest = &inner[end + 1..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no value: {line:?}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value {v:?} in {line:?}")),
    };
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}
