//! The audit trail's cost and capacity, printed as figures (no criterion: each part measures
//! its baseline in the same run):
//!
//! 1. the hit path with auditing off vs on (SQLite), interleaved rounds on one core: a GET never
//!    touches the audit (target: on/off throughput at least 0.99x);
//! 2. PUT latency through the handler, one at a time (upstream = the simulator over loopback):
//!    auditing off, SQLite with full durability (WAL, `synchronous = FULL`, on this machine's
//!    disk), PostgreSQL over loopback (a real server, `fsync = on`); p50 / p99 and what auditing
//!    adds;
//! 3. records per second each store sustains: 256 writers making records pending and
//!    completing them through `Audit` (group commits), for a few seconds;
//! 4. `audit verify` time per 100,000 records (200,000 entries: pending and completion), SQLite
//!    and PostgreSQL.
//!
//! `cargo bench --bench audit`; `AUDIT_BENCH_SCALE=0.2` shortens it. Needs PostgreSQL
//! (/usr/lib/postgresql/*/bin, as for the tests).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use consent_proxy::audit::{cli, Audit, Draft, Outcome};
use consent_proxy::auth::AuthMethod;
use consent_proxy::config::Settings;
use consent_proxy::consent::{ConsentStatus, ContactId};
use consent_proxy::simulator::Simulator;
use consent_proxy::{App, AppHandle};

#[path = "support/consent_requests.rs"]
mod consent_requests;
#[path = "../tests/integration/support/postgres_server.rs"]
mod postgres_server;
#[path = "support/stats.rs"]
mod stats;
use consent_requests::{get, hit_rounds, interleaved_put_latencies, proxy_toml, PEER};
use postgres_server::PostgresServer;
use stats::median;

const WORKING_SET: usize = 10_000;

fn scaled(n: usize) -> usize {
    let scale: f64 = std::env::var("AUDIT_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * scale) as usize).max(10)
}

/// Where the benchmark's files go, and the `[audit]` section for each store.
struct Stores {
    dir: std::path::PathBuf,
    pg: PostgresServer,
}

impl Stores {
    fn new() -> Stores {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("audit-bench-{:x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).expect("bench dir");
        std::fs::write(
            dir.join("chain.key"),
            "bench-audit-chain-key-0123456789abcdef",
        )
        .unwrap();
        Stores {
            dir,
            pg: PostgresServer::start(),
        }
    }

    fn sqlite(&self, name: &str) -> String {
        format!(
            "[audit]\nenabled = true\nstore = \"sqlite\"\nsqlite_path = {:?}\nchain_key_file = {:?}\n",
            self.dir.join(format!("{name}.sqlite")).display().to_string(),
            self.dir.join("chain.key").display().to_string()
        )
    }

    fn postgres(&self) -> String {
        let database = self.pg.create_database();
        format!(
            "[audit]\nenabled = true\nstore = \"postgres\"\npostgres_url = {:?}\nchain_key_file = {:?}\n",
            self.pg.url(&database, "sslmode=disable"),
            self.dir.join("chain.key").display().to_string()
        )
    }
}

impl Drop for Stores {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn simulator() -> Simulator {
    let sim = consent_requests::simulator().await;
    sim.set_unknown_as_no_consent(true);
    sim
}

fn settings(sim: &Simulator, audit: &str) -> Settings {
    Settings::from_toml_str(&proxy_toml(sim, "error", audit, r#"["read", "write"]"#))
        .expect("settings")
}

async fn proxy(sim: &Simulator, audit: &str) -> AppHandle {
    let proxy = App::start(settings(sim, audit)).await.expect("proxy");
    for _ in 0..500 {
        if proxy.tokens.readiness().is_ok() {
            return proxy;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the proxy did not become ready");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn hit_path(stores: &Stores) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (modes, _sim) = runtime.block_on(async {
        let sim = simulator().await;
        let modes = [
            proxy(&sim, "").await,
            proxy(&sim, &stores.sqlite("hits")).await,
        ];
        for proxy in &modes {
            for i in 0..WORKING_SET {
                assert_eq!(proxy.routes.handle(get(i), PEER).await.status(), 200);
            }
        }
        (modes, sim)
    });
    let hits = scaled(200_000);
    let per_hit = hit_rounds(&runtime, &modes, hits, WORKING_SET);
    let [off_ns, on_ns] = per_hit.map(|mut rounds| median(&mut rounds));
    println!(
        "hit path (in-process handler, one core, {hits} hits x 7 rounds, medians): audit off \
         {off_ns:.0} ns/hit, on {on_ns:.0} ns/hit: on/off throughput {:.3}x",
        off_ns / on_ns
    );
    runtime.block_on(async {
        for proxy in modes {
            proxy.shutdown().await;
        }
    });
}

fn put_latency(stores: &Stores) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let puts = scaled(3_000);
    let postgres = stores.postgres();
    let latencies = runtime.block_on(async {
        let sim = simulator().await;
        let modes = [
            proxy(&sim, "").await,
            proxy(&sim, &stores.sqlite("puts")).await,
            proxy(&sim, &postgres).await,
        ];
        let latencies = interleaved_put_latencies(&modes, puts).await;
        for proxy in modes {
            proxy.shutdown().await;
        }
        latencies
    });
    let [off, sqlite, pg] = latencies.map(|mut l| {
        l.sort();
        (percentile(&l, 0.5), percentile(&l, 0.99))
    });
    let added = |(p50, p99): (Duration, Duration)| {
        format!(
            "p50 {p50:?} p99 {p99:?} (adds p50 {:?}, p99 {:?})",
            p50.saturating_sub(off.0),
            p99.saturating_sub(off.1)
        )
    };
    println!(
        "PUT latency ({puts} PUTs each, one at a time, handler -> simulator over loopback): audit \
         off p50 {:?} p99 {:?}; SQLite (synchronous = FULL) {}; PostgreSQL (loopback, fsync on) {}",
        off.0,
        off.1,
        added(sqlite),
        added(pg)
    );
}

async fn audit_only(
    audit_toml: &str,
    sim: &Simulator,
) -> (Audit, consent_proxy::audit::AuditTasks) {
    let settings = settings(sim, audit_toml);
    Audit::start(&settings, &prometheus::Registry::new())
        .await
        .expect("audit starts")
        .expect("audit on")
}

/// `writers` tasks making records pending and completing them until `records` are made.
async fn write_records(audit: &Audit, writers: usize, records: u64) -> Duration {
    let made = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (audit, made) = (audit.clone(), made.clone());
            tokio::spawn(async move {
                let contact =
                    ContactId::from_path_segment(&format!("+1555{w:07}")).expect("contact");
                while made.fetch_add(1, Ordering::Relaxed) < records {
                    let draft = Draft {
                        contact: contact.clone(),
                        request_id: "bench".into(),
                        client: "bench".into(),
                        auth: AuthMethod::ApiKey,
                        status: ConsentStatus::Consented,
                        previous: None,
                    };
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    let record = audit
                        .begin(draft, deadline)
                        .await
                        .expect("durable")
                        .expect("recorded");
                    record.complete(Outcome::Applied, Some(200));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    started.elapsed()
}

fn throughput_and_verify(stores: &Stores) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let postgres = stores.postgres();
    let verify_records = scaled(100_000) as u64;
    runtime.block_on(async {
        let sim = simulator().await;
        for (name, toml) in [
            ("SQLite", stores.sqlite("throughput")),
            ("PostgreSQL", postgres),
        ] {
            let (audit, tasks) = audit_only(&toml, &sim).await;
            let records = scaled(20_000) as u64;
            let took = write_records(&audit, 256, records).await;
            // The rest, to reach the verified count, not timed.
            write_records(&audit, 256, verify_records.saturating_sub(records)).await;
            drop(audit);
            tasks.stop().await;
            let settings = settings(&sim, &toml);
            let started = Instant::now();
            let verdict = cli::verify(&settings).await.expect("verify");
            let verified_in = started.elapsed();
            let entries = match verdict {
                cli::Verdict::Intact { entries, .. } => entries,
                cli::Verdict::Broken(broken) => panic!("{broken}"),
            };
            println!(
                "{name}: {:.0} records/s sustained (256 writers, {records} records, pending + \
                 completion each); verify: {entries} entries ({} records) in {verified_in:?} = \
                 {:.2} s per 100,000 records",
                records as f64 / took.as_secs_f64(),
                entries / 2,
                verified_in.as_secs_f64() * 100_000.0 / (entries / 2) as f64
            );
        }
    });
}

fn main() {
    let stores = Stores::new();
    hit_path(&stores);
    put_latency(&stores);
    throughput_and_verify(&stores);
}
