//! The audit trail with its SQLite store (rule 7 of docs/CONSISTENCY.md): each PUT's record is durable
//! before the PUT reaches upstream and completed after; a caller hanging up, a crash, an
//! unwritable store; who wrote and how; `audit verify` finding tampering; `audit export`; the
//! admin route. The PostgreSQL store is in `external::audit_postgres`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute};
use http::Method;

use crate::support::audit::{self, audit_command, history, AuditDir};
use crate::support::child_proxy::ChildProxy;
use crate::support::fake_upstream::{consent_200, Act, FakeUpstream};
use crate::support::{
    start_simulator, wait_until, Harness, ProxyConfig, TestClient, ADMIN_KEY, READER_KEY, RW_KEY,
};

const CONTACT: &str = "+15557770001";

fn is_rfc3339(value: &serde_json::Value) -> bool {
    value.as_str().is_some_and(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).is_ok()
    })
}

/// Waits until `contact`'s newest record has an outcome other than pending; returns the history.
async fn settled_history(h: &Harness, contact: &str) -> Vec<serde_json::Value> {
    audit::settled_history(
        &h.http,
        &h.proxy.admin_url(),
        contact,
        Duration::from_secs(10),
    )
    .await
}

#[tokio::test]
async fn the_pending_record_is_durable_before_the_put_reaches_upstream_and_completed_after() {
    let dir = Arc::new(AuditDir::new());
    // What the store held at the moment the PUT arrived upstream, read from the file itself.
    let at_upstream = Arc::new(Mutex::new(Vec::new()));
    let upstream = {
        let (dir, at_upstream) = (dir.clone(), at_upstream.clone());
        FakeUpstream::start(move |seen, _| {
            if seen.method == "PUT" {
                let held: Vec<(String, String)> = dir
                    .open()
                    .prepare("SELECT kind, status FROM audit_entries WHERE contact_id = ?1")
                    .unwrap()
                    .query_map([CONTACT], |row| Ok((row.get(0)?, row.get(1)?)))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                at_upstream.lock().unwrap().push(held);
            }
            Act::Send(consent_200("REFUSED"))
        })
        .await
    };
    let h = Harness::start_for_api(&upstream.url(), |c| {
        dir.sqlite(c, "require");
    })
    .await;
    // The cache knows the status before the write: it is the record's "previous".
    assert_eq!(h.get(CONTACT).await.status, 200);
    let put = h
        .http
        .send(
            Method::PUT,
            &h.consent_url(CONTACT),
            &[
                ("x-api-key", RW_KEY),
                ("content-type", "application/json"),
                ("x-request-id", "audit-request-1"),
            ],
            Some(r#"{"status":"REFUSED"}"#.into()),
        )
        .await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(
        *at_upstream.lock().unwrap(),
        vec![vec![("pending".to_owned(), "REFUSED".to_owned())]],
        "the pending record was in the file when upstream received the PUT"
    );

    let records = settled_history(&h, CONTACT).await;
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(record["outcome"], "applied");
    assert_eq!(record["upstream_status"], 200);
    assert_eq!(record["status"], "REFUSED");
    assert_eq!(
        record["previous"], "REFUSED",
        "the fake upstream's GET answer, cached"
    );
    assert_eq!(record["client"], "rw");
    assert_eq!(record["auth"], "api_key");
    assert_eq!(record["request_id"], "audit-request-1");
    assert_eq!(
        record["instance"],
        h.proxy.audit.as_ref().unwrap().instance()
    );
    assert!(
        is_rfc3339(&record["at"]) && is_rfc3339(&record["answered_at"]),
        "{record}"
    );
    assert!(record["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(
        h.metric(r#"consent_proxy_audit_records_total{outcome="pending"}"#)
            .await,
        1.0
    );
    assert_eq!(
        h.metric(r#"consent_proxy_audit_records_total{outcome="applied"}"#)
            .await,
        1.0
    );
    assert_eq!(h.metric("consent_proxy_audit_pending_records").await, 0.0);
}

#[tokio::test]
async fn every_way_of_authenticating_is_recorded_and_a_refusal_keeps_upstreams_status() {
    let dir = AuditDir::new();
    let h = Harness::start_seeded(CONTACT, ConsentStatus::Consented, |c| {
        dir.sqlite(c, "require").set("talkdesk.max_retries", "0");
    })
    .await;
    let put = |headers: Vec<(&'static str, String)>, status: &'static str| {
        let h = &h;
        async move {
            let mut all: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            all.push(("content-type", "application/json"));
            h.http
                .send(
                    Method::PUT,
                    &h.consent_url(CONTACT),
                    &all,
                    Some(format!(r#"{{"status":"{status}"}}"#)),
                )
                .await
        }
    };
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("rw:{RW_KEY}"));
    let token = h
        .http
        .send(
            Method::POST,
            &format!("{}/oauth/token", h.proxy.url()),
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(format!(
                "grant_type=client_credentials&client_id=rw&client_secret={RW_KEY}"
            )),
        )
        .await
        .json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    for (headers, status) in [
        (vec![("x-api-key", RW_KEY.to_owned())], "NO_CONSENT"),
        (
            vec![("authorization", format!("Basic {basic}"))],
            "CONSENTED",
        ),
        (
            vec![("authorization", format!("Bearer {RW_KEY}"))],
            "REFUSED",
        ),
        (
            vec![("authorization", format!("Bearer {token}"))],
            "DELETED",
        ),
    ] {
        assert_eq!(put(headers, status).await.status, 200);
    }
    h.sim.inject(
        SimRoute::Put,
        Fault::TooManyRequests { retry_after_s: 1 },
        1,
    );
    let refused = put(vec![("x-api-key", ADMIN_KEY.to_owned())], "CONSENTED").await;
    assert_eq!(refused.status, 429);

    let records = settled_history(&h, CONTACT).await;
    let seen: Vec<(&str, &str, &str, &str)> = records
        .iter()
        .rev()
        .map(|r| {
            (
                r["client"].as_str().unwrap(),
                r["auth"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("rw", "api_key", "NO_CONSENT", "applied"),
            ("rw", "basic", "CONSENTED", "applied"),
            ("rw", "bearer_key", "REFUSED", "applied"),
            ("rw", "access_token", "DELETED", "applied"),
            ("ops", "api_key", "CONSENTED", "refused"),
        ],
        "oldest first here; the route answers newest first"
    );
    assert_eq!(records[0]["upstream_status"], 429);
    // Each write knew the one before (the cache holds what was written).
    assert_eq!(records[1]["previous"], "REFUSED");
    assert_eq!(records[0]["previous"], "DELETED");
}

#[tokio::test]
async fn a_put_whose_caller_hung_up_is_recorded_with_its_outcome() {
    let dir = AuditDir::new();
    let upstream = FakeUpstream::start(|seen, _| {
        if seen.method == "PUT" {
            Act::SendAfter(Duration::from_millis(300), consent_200("CONSENTED"))
        } else {
            Act::Send(consent_200("REFUSED"))
        }
    })
    .await;
    let h = Harness::start_for_api(&upstream.url(), |c| {
        dir.sqlite(c, "require");
    })
    .await;
    let put = h.put(CONTACT, "CONSENTED");
    // The caller gives up once the PUT is at upstream.
    tokio::select! {
        _ = put => panic!("the PUT was answered before upstream was reached"),
        _ = upstream.wait_for_requests(1) => {}
    }
    let records = settled_history(&h, CONTACT).await;
    assert_eq!(records[0]["outcome"], "applied", "{records:?}");
    assert_eq!(records[0]["upstream_status"], 200);
}

#[tokio::test]
async fn an_unwritable_store_refuses_puts_under_require_without_calling_upstream() {
    let dir = AuditDir::new();
    let h = Harness::start_seeded(CONTACT, ConsentStatus::Consented, |c| {
        dir.sqlite(c, "require");
    })
    .await;
    assert_eq!(h.put(CONTACT, "REFUSED").await.status, 200);
    dir.set_immutable(true);
    let puts_before = h.sim.puts_for(CONTACT);
    let refused = h.put(CONTACT, "NO_CONSENT").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.code(), "audit_unavailable");
    assert_eq!(
        h.sim.puts_for(CONTACT),
        puts_before,
        "upstream was not called"
    );
    assert_eq!(h.sim.stored_status(CONTACT), Some(ConsentStatus::Refused));
    assert_eq!(h.metric("consent_proxy_audit_failures_total").await, 1.0);
    let ready = h.admin("/readyz").await.json();
    assert_eq!(ready["audit"]["store"], "down", "{ready}");
    // GETs go on.
    assert_eq!(h.get(CONTACT).await.status, 200);
    dir.set_immutable(false);
    wait_until(Duration::from_secs(10), || async {
        h.put(CONTACT, "NO_CONSENT").await.status == 200
    })
    .await;
}

#[tokio::test]
async fn an_unwritable_store_under_best_effort_lets_puts_through_and_counts_them() {
    let dir = AuditDir::new();
    let h = Harness::start_seeded(CONTACT, ConsentStatus::Consented, |c| {
        dir.sqlite(c, "best_effort");
    })
    .await;
    assert_eq!(h.put(CONTACT, "REFUSED").await.status, 200);
    dir.set_immutable(true);
    let put = h.put(CONTACT, "NO_CONSENT").await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(h.sim.stored_status(CONTACT), Some(ConsentStatus::NoConsent));
    assert_eq!(h.metric("consent_proxy_audit_failures_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_put_is_at_upstream_leaves_it_pending_until_the_next_start() {
    let dir = AuditDir::new();
    let sim = start_simulator().await;
    // Upstream holds every PUT: the instance dies while waiting for it.
    let upstream = audit::upstream_holding_puts().await;
    let mut config = ProxyConfig::for_upstream(&upstream.url(), &sim.token_url());
    dir.sqlite(&mut config, "require")
        .set("server.request_timeout_ms", "30000")
        .set("talkdesk.timeout_ms", "30000");
    audit::crash_at_upstream(ChildProxy::start(&config), &upstream, CONTACT, "REFUSED").await;
    let outcomes: Vec<String> = dir
        .open()
        .prepare(
            "SELECT COALESCE(c.outcome, 'pending') FROM audit_entries p LEFT JOIN audit_entries c \
             ON c.record_id = p.record_id AND c.kind = 'completion' WHERE p.kind = 'pending'",
        )
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(outcomes, ["pending"], "the crash left the record pending");

    let restarted = ChildProxy::start(&config);
    let records = audit::settled_history(
        &TestClient::new(),
        &restarted.admin_url,
        CONTACT,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["outcome"], "unknown");
    assert_eq!(records[0]["upstream_status"], serde_json::Value::Null);
    assert_eq!(records[0]["status"], "REFUSED");
    // The resolution is chained like any entry.
    let verified = audit_command(&config, &["verify"]);
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");
}

/// A store with a few writes, made by a proxy that has stopped; the configuration to read it.
async fn store_with_writes(dir: &AuditDir) -> ProxyConfig {
    let h = Harness::start_seeded(CONTACT, ConsentStatus::Consented, |c| {
        dir.sqlite(c, "require");
    })
    .await;
    for status in ["REFUSED", "CONSENTED", "NO_CONSENT"] {
        assert_eq!(h.put(CONTACT, status).await.status, 200);
    }
    settled_history(&h, CONTACT).await;
    let mut config = ProxyConfig::for_simulator(&h.sim);
    dir.sqlite(&mut config, "require");
    h.proxy.shutdown().await;
    config
}

/// `audit verify` after `tamper` on a copy of the store: its exit code and output.
fn verify_after(dir: &AuditDir, config: &ProxyConfig, tamper: &str) -> (Option<i32>, String) {
    let pristine = dir.path().join("pristine.sqlite");
    if !pristine.exists() {
        std::fs::copy(dir.sqlite_path(), &pristine).unwrap();
    }
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", dir.sqlite_path().display()));
    }
    std::fs::copy(&pristine, dir.sqlite_path()).unwrap();
    if !tamper.is_empty() {
        dir.open().execute_batch(tamper).unwrap();
    }
    let out = audit_command(config, &["verify"]);
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_the_first_record_edited_removed_or_swapped() {
    let dir = AuditDir::new();
    let config = store_with_writes(&dir).await;
    // Six entries: three pending (seq 1, 3, 5) and their completions (2, 4, 6).
    let record_at = |seq: i64| -> String {
        dir.open()
            .query_row(
                "SELECT record_id FROM audit_entries WHERE seq = ?1",
                [seq],
                |r| r.get(0),
            )
            .unwrap()
    };
    let (code, out) = verify_after(&dir, &config, "");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("intact: 6 entries"), "{out}");
    let second = record_at(3);

    let (code, out) = verify_after(
        &dir,
        &config,
        "UPDATE audit_entries SET status = 'DELETED' WHERE seq = 3",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&second) && out.contains("edited"), "{out}");

    let (code, out) = verify_after(
        &dir,
        &config,
        "UPDATE audit_entries SET outcome = 'refused' WHERE seq = 4",
    );
    assert_eq!(code, Some(1), "an outcome is covered too: {out}");
    assert!(out.contains(&second), "{out}");

    let (code, out) = verify_after(&dir, &config, "DELETE FROM audit_entries WHERE seq = 3");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("entries 3 to 3 before it were removed"),
        "{out}"
    );

    let (code, out) = verify_after(&dir, &config, "DELETE FROM audit_entries WHERE seq = 6");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("removed"), "the newest entry: {out}");

    let (code, out) = verify_after(
        &dir,
        &config,
        "UPDATE audit_entries SET seq = -1 WHERE seq = 3; \
         UPDATE audit_entries SET seq = 3 WHERE seq = 5; \
         UPDATE audit_entries SET seq = 5 WHERE seq = -1;",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&record_at(3)) && out.contains("entry 3"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_export_writes_jsonl_and_csv_within_since_and_until() {
    let dir = AuditDir::new();
    let config = store_with_writes(&dir).await;
    let out = audit_command(&config, &["export"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let statuses: Vec<&str> = lines
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["REFUSED", "CONSENTED", "NO_CONSENT"],
        "oldest first"
    );
    assert!(lines
        .iter()
        .all(|r| r["contact_id"] == CONTACT && r["outcome"] == "applied"));

    let second_at = lines[1]["at"].as_str().unwrap();
    let third_at = lines[2]["at"].as_str().unwrap();
    let out = audit_command(
        &config,
        &[
            "export", "--format", "csv", "--since", second_at, "--until", third_at,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let csv = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "id,at,answered_at,instance,contact_id,request_id,client,auth,status,previous,outcome,upstream_status");
    assert_eq!(rows.len(), 2, "{csv}");
    assert!(rows[1].contains(",CONSENTED,REFUSED,applied,200"), "{csv}");

    let bad = audit_command(&config, &["export", "--since", "yesterday"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}

#[tokio::test]
async fn the_audit_route_needs_admin_and_says_when_auditing_is_off() {
    let dir = AuditDir::new();
    let h = Harness::start_seeded(CONTACT, ConsentStatus::Consented, |c| {
        dir.sqlite(c, "require");
    })
    .await;
    let url = format!("{}/admin/audit/contacts/{CONTACT}", h.proxy.admin_url());
    let as_reader = h
        .http
        .send(Method::GET, &url, &[("x-api-key", READER_KEY)], None)
        .await;
    assert_eq!(as_reader.status, 403);
    let anonymous = h.http.send(Method::GET, &url, &[], None).await;
    assert_eq!(anonymous.status, 401);
    let bad_id = format!("{}/admin/audit/contacts/%20x", h.proxy.admin_url());
    let bad = h
        .http
        .send(Method::GET, &bad_id, &[("x-api-key", ADMIN_KEY)], None)
        .await;
    assert_eq!(bad.code(), "invalid_contact_id");
    assert!(history(&h.http, &h.proxy, CONTACT).await.is_empty());

    let off = Harness::start().await;
    let url = format!("{}/admin/audit/contacts/{CONTACT}", off.proxy.admin_url());
    let answer = off
        .http
        .send(Method::GET, &url, &[("x-api-key", ADMIN_KEY)], None)
        .await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.code(), "audit_disabled");
}
