//! The audit trail with its PostgreSQL store, against a real server started by the test
//! (`support::postgres_server`): three instances writing one table make one history, each
//! instance with its own chain; a crash at upstream leaves a record pending until another
//! start resolves it; a stopped server refuses PUTs under `require` (upstream not called) and
//! lets them through, counted, under `best_effort`; `audit verify` finds a record edited in
//! the table; TLS and a password from a file when the URL asks.

use std::sync::Mutex;
use std::time::Duration;

use consent_proxy::consent::ConsentStatus;

use crate::support::audit::{self, audit_command, history, AuditDir};
use crate::support::child_proxy::ChildProxy;
use crate::support::fleet::Instance;
use crate::support::postgres_server::{CertificateFiles, PostgresServer, PASSWORD};
use crate::support::tls_upstream::TestPki;
use crate::support::{start_simulator, wait_until, Harness, ProxyClient, ProxyConfig, TestClient};

const CONTACT: &str = "+15558880001";

fn outcomes(pg: &PostgresServer, database: &str) -> Vec<String> {
    let out = pg.psql_in(
        database,
        "SELECT COALESCE(c.outcome, 'pending') FROM audit_entries p LEFT JOIN audit_entries c \
         ON c.record_id = p.record_id AND c.kind = 'completion' WHERE p.kind = 'pending' \
         ORDER BY p.at_us",
    );
    out.lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_one_postgres_write_one_history_and_verify() {
    let pg = PostgresServer::start();
    let database = pg.create_database();
    let dir = AuditDir::new();
    let sim = start_simulator().await;
    sim.set_status(CONTACT, ConsentStatus::Consented);
    let mut config = ProxyConfig::for_simulator(&sim);
    dir.postgres(
        &mut config,
        &pg.url(&database, "sslmode=disable"),
        "require",
    );
    let instances = [
        Instance::start(&config).await,
        Instance::start(&config).await,
        Instance::start(&config).await,
    ];
    let http = TestClient::new();
    // Interleaved: one contact written through each instance in turn, and others written
    // through all three at once.
    let statuses = [
        "REFUSED",
        "CONSENTED",
        "NO_CONSENT",
        "DELETED",
        "CONSENTED",
        "REFUSED",
    ];
    for (i, status) in statuses.iter().enumerate() {
        let proxy = &instances[i % 3].proxy;
        assert_eq!(
            ProxyClient { http: &http, proxy }
                .put(CONTACT, status)
                .await
                .status,
            200
        );
    }
    let concurrent = (0..30).map(|i| {
        let http = http.clone();
        let proxy = &instances[i % 3].proxy;
        async move {
            let contact = format!("+1555888{:04}", 100 + i % 5);
            ProxyClient { http: &http, proxy }
                .put(&contact, "CONSENTED")
                .await
                .status
        }
    });
    let answers = futures_util::future::join_all(concurrent).await;
    assert!(
        answers.iter().all(|s| *s == 200 || *s == 201),
        "{answers:?}"
    );

    // One history, whichever instance is asked, newest first.
    let found = Mutex::new(Vec::new());
    wait_until(Duration::from_secs(10), || async {
        let records = history(&http, &instances[2].proxy, CONTACT).await;
        let settled =
            records.len() == statuses.len() && records.iter().all(|r| r["outcome"] == "applied");
        *found.lock().unwrap() = records;
        settled
    })
    .await;
    let records = found.into_inner().unwrap();
    let written: Vec<&str> = records
        .iter()
        .rev()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(written, statuses);
    for (i, record) in records.iter().rev().enumerate() {
        assert_eq!(
            record["instance"],
            instances[i % 3].proxy.audit.as_ref().unwrap().instance(),
            "each record names the instance that took the PUT"
        );
    }
    for instance in &instances {
        wait_until(Duration::from_secs(10), || async {
            let client = ProxyClient {
                http: &http,
                proxy: &instance.proxy,
            };
            client.metric("consent_proxy_audit_pending_records").await == 0.0
        })
        .await;
    }
    let verified = audit_command(&config, &["verify"]);
    let out = String::from_utf8_lossy(&verified.stdout).into_owned();
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");
    assert!(out.contains("72 entries in 3 chains"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_upstream_leaves_the_record_pending_until_it_is_resolved_as_unknown() {
    let pg = PostgresServer::start();
    let database = pg.create_database();
    let dir = AuditDir::new();
    let sim = start_simulator().await;
    let upstream = audit::upstream_holding_puts().await;
    let mut config = ProxyConfig::for_upstream(&upstream.url(), &sim.token_url());
    dir.postgres(
        &mut config,
        &pg.url(&database, "sslmode=disable"),
        "require",
    )
    .set("server.request_timeout_ms", "2000");
    audit::crash_at_upstream(ChildProxy::start(&config), &upstream, CONTACT, "REFUSED").await;
    assert_eq!(outcomes(&pg, &database), ["pending"]);

    // Any instance resolves it once the request's deadline has long passed (3 deadlines).
    let other = ChildProxy::start(&config);
    let records = audit::settled_history(
        &TestClient::new(),
        &other.admin_url,
        CONTACT,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(records[0]["outcome"], "unknown");
    assert_eq!(outcomes(&pg, &database), ["unknown"]);
    let verified = audit_command(&config, &["verify"]);
    assert_eq!(verified.status.code(), Some(0), "{verified:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_refuses_puts_under_require_and_counts_them_under_best_effort() {
    let mut pg = PostgresServer::start();
    let database = pg.create_database();
    let dir = AuditDir::new();
    let url = pg.url(&database, "sslmode=disable");
    let strict = Harness::start_seeded(CONTACT, ConsentStatus::Consented, |c| {
        dir.postgres(c, &url, "require");
    })
    .await;
    let mut lenient_config = ProxyConfig::for_simulator(&strict.sim);
    dir.postgres(&mut lenient_config, &url, "best_effort");
    let lenient = lenient_config.start().await;
    assert_eq!(strict.put(CONTACT, "REFUSED").await.status, 200);

    pg.kill();
    let puts_before = strict.sim.puts_for(CONTACT);
    let refused = strict.put(CONTACT, "NO_CONSENT").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.code(), "audit_unavailable");
    assert_eq!(
        strict.sim.puts_for(CONTACT),
        puts_before,
        "upstream was not called"
    );
    assert_eq!(
        strict.metric("consent_proxy_audit_failures_total").await,
        1.0
    );
    wait_until(Duration::from_secs(10), || async {
        strict.admin("/readyz").await.json()["audit"]["store"] == "down"
    })
    .await;

    let through = ProxyClient {
        http: &strict.http,
        proxy: &lenient,
    }
    .put(CONTACT, "NO_CONSENT")
    .await;
    assert_eq!(through.status, 200, "{}", through.text());
    assert_eq!(
        strict.sim.stored_status(CONTACT),
        Some(ConsentStatus::NoConsent)
    );
    assert_eq!(
        ProxyClient {
            http: &strict.http,
            proxy: &lenient
        }
        .metric("consent_proxy_audit_failures_total")
        .await,
        1.0
    );

    // Back: the instance reconnects by itself.
    pg.restart();
    wait_until(Duration::from_secs(20), || async {
        strict.put(CONTACT, "CONSENTED").await.status == 200
    })
    .await;
    lenient.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_finds_a_record_edited_in_the_table() {
    let pg = PostgresServer::start();
    let database = pg.create_database();
    let dir = AuditDir::new();
    let h = Harness::start_seeded(CONTACT, ConsentStatus::Consented, |c| {
        dir.postgres(c, &pg.url(&database, "sslmode=disable"), "require");
    })
    .await;
    for status in ["REFUSED", "CONSENTED", "NO_CONSENT"] {
        assert_eq!(h.put(CONTACT, status).await.status, 200);
    }
    wait_until(Duration::from_secs(10), || async {
        h.metric("consent_proxy_audit_pending_records").await == 0.0
    })
    .await;
    let mut config = ProxyConfig::for_simulator(&h.sim);
    dir.postgres(
        &mut config,
        &pg.url(&database, "sslmode=disable"),
        "require",
    );
    assert_eq!(audit_command(&config, &["verify"]).status.code(), Some(0));

    let edited = pg.psql_in(
        &database,
        "UPDATE audit_entries SET client = 'someone-else' WHERE seq = 3 RETURNING record_id",
    );
    // psql prints the returned id, then the command's tag.
    let edited = edited.lines().next().unwrap_or_default().to_owned();
    let out = audit_command(&config, &["verify"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text.contains(&edited), "names {edited}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_a_password_file_when_the_url_asks_for_them() {
    let pki = TestPki::new();
    let pg = PostgresServer::start_tls(CertificateFiles {
        cert_file: &pki.cert_file,
        key_file: &pki.key_file,
    });
    let database = pg.create_database();
    let dir = AuditDir::new();
    let password = dir.file("pg-password", &format!("{PASSWORD}\n"));
    let ca = pki.ca_file.clone();
    let url = pg.url(
        &database,
        &format!("sslmode=require&sslrootcert={}", ca.display()),
    );
    let h = Harness::start_seeded(CONTACT, ConsentStatus::Consented, |c| {
        dir.postgres(c, &url, "require").set_str(
            "audit.postgres_password_file",
            &password.display().to_string(),
        );
    })
    .await;
    assert_eq!(h.put(CONTACT, "REFUSED").await.status, 200);
    assert_eq!(outcomes(&pg, &database).len(), 1);
    let connections = pg.psql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
         WHERE s.ssl AND a.application_name = 'consent-proxy'",
    );
    assert_ne!(connections, "0", "the proxy's connections use TLS");

    // Without TLS the server (hostssl only) refuses it: the PUT is refused, not sent.
    let plain = Harness::start_seeded(CONTACT, ConsentStatus::Consented, |c| {
        dir.postgres(c, &pg.url(&database, "sslmode=disable"), "require")
            .set_str(
                "audit.postgres_password_file",
                &password.display().to_string(),
            );
    })
    .await;
    assert_eq!(
        plain.put(CONTACT, "NO_CONSENT").await.code(),
        "audit_unavailable"
    );
}
