//! A bounded soak test (ignored by default; CI runs it with the test build `cargo test` made:
//! a few hundred requests a second need no optimised build):
//!
//! ```text
//! cargo test --test integration -- --ignored soak:: --nocapture
//! ```
//!
//! Several workers send mixed GET/PUT traffic, a few hundred requests a second, over a fixed
//! set of contacts, while a chaos task makes the simulator inject 5xx, 429, 401, dropped
//! connections and delays in bursts, and cached answers are purged at random so reads keep
//! reaching upstream. At the end it checks the consent-correctness rules over
//! the recorded history (acknowledged writes are what upstream holds unless replaced; no GET
//! returns a status older than the last acknowledged write), that no request outlived
//! `request_timeout_ms`, and that the process's memory did not grow without bound.
//! `SOAK_SECS` sets the traffic's duration (default 60).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::support::history::{gets, violations, Event, Op};
use crate::support::*;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute};
use tokio::time::Instant;

const CONTACTS: usize = 20;
const WORKERS: usize = 10;
const INITIAL: &str = "NO_CONSENT";
const STATUSES: [&str; 4] = ["NO_CONSENT", "CONSENTED", "DELETED", "REFUSED"];
const REQUEST_TIMEOUT_MS: u64 = 1000;
/// Allowed beyond the request timeout, for scheduling on a loaded machine.
const TIMEOUT_SLACK: Duration = Duration::from_millis(300);
const WARM_UP: Duration = Duration::from_secs(10);
const MAX_RSS_GROWTH_KIB: u64 = 50 * 1024;

// ---- the history checker (crate::support::history) ----

#[test]
fn the_history_checker_catches_a_stale_read() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let put = |start, end, status: &str, acked| Event {
        contact: 0,
        via: 0,
        start: at(start),
        end: at(end),
        op: Op::Put {
            status: status.into(),
            acked,
        },
    };
    let get = |start, end, seen: &str| Event {
        contact: 0,
        via: 0,
        start: at(start),
        end: at(end),
        op: Op::Get {
            stale_age_s: None,
            result: Some(seen.into()),
        },
    };
    let history = vec![put(0, 10, "REFUSED", true), get(20, 30, "CONSENTED")];
    assert_eq!(violations(&history, "CONSENTED").len(), 1);
    // A read overlapping the write may see either.
    let overlapping = vec![put(0, 10, "REFUSED", true), get(5, 30, "CONSENTED")];
    assert!(violations(&overlapping, "CONSENTED").is_empty());
    // An unacknowledged write may have applied; it does not supersede anything.
    let unknown = vec![
        put(0, 10, "REFUSED", true),
        put(20, 30, "DELETED", false),
        get(40, 50, "REFUSED"),
        get(40, 50, "DELETED"),
    ];
    assert!(violations(&unknown, "CONSENTED").is_empty());
    // A later acknowledged write supersedes both.
    let mut later = unknown.clone();
    later.push(put(60, 70, "CONSENTED", true));
    later.push(get(80, 90, "DELETED"));
    assert_eq!(violations(&later, "NO_CONSENT").len(), 1);
}

// ---- the soak ----

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmRSS:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// Drops random contacts' cached answers until `until`, so that reads keep going upstream
/// (and racing writes) instead of being served from the cache.
async fn purger(h: Arc<Harness>, contacts: Arc<Vec<String>>, until: Instant) -> u64 {
    let mut purged = 0;
    while Instant::now() < until {
        let contact = &contacts[rand::random_range(0..CONTACTS)];
        let response = h.purge(contact).await;
        assert_eq!(response.status, 204, "purge: {}", response.text());
        purged += 1;
        tokio::time::sleep(Duration::from_millis(rand::random_range(5..30))).await;
    }
    purged
}

/// What one worker saw.
#[derive(Default)]
struct WorkerLog {
    events: Vec<Event>,
    by_status: BTreeMap<(&'static str, u16), u64>,
    too_slow: Vec<String>,
    longest: Duration,
}

/// Injects faults in bursts until `until`, then clears them.
async fn chaos(
    h: Arc<Harness>,
    contacts: Arc<Vec<String>>,
    until: Instant,
) -> BTreeMap<&'static str, u64> {
    let mut bursts = BTreeMap::new();
    let route = || {
        if rand::random_bool(0.5) {
            SimRoute::Get
        } else {
            SimRoute::Put
        }
    };
    while Instant::now() < until {
        let kind = match rand::random_range(0..9) {
            0 => {
                h.sim.clear_faults();
                h.sim.set_latency(Duration::ZERO);
                "quiet"
            }
            1 => {
                h.sim
                    .inject(SimRoute::Get, Fault::Status500, rand::random_range(1..15));
                h.sim
                    .inject(SimRoute::Put, Fault::Status500, rand::random_range(1..8));
                "5xx"
            }
            2 => {
                let retry_after_s = rand::random_range(0..=1);
                h.sim.inject(
                    route(),
                    Fault::TooManyRequests { retry_after_s },
                    rand::random_range(1..10),
                );
                "429"
            }
            3 => {
                h.sim
                    .inject(route(), Fault::Unauthorized, rand::random_range(1..3));
                "401"
            }
            4 => {
                let delay = Duration::from_millis(rand::random_range(20..1500));
                h.sim
                    .inject(route(), Fault::Delay(delay), rand::random_range(1..5));
                "delay"
            }
            5 => {
                let contact = &contacts[rand::random_range(0..CONTACTS)];
                let delay = Duration::from_millis(rand::random_range(20..800));
                h.sim
                    .delay_next_get(contact, delay, rand::random_range(1..4));
                "slow_get"
            }
            6 => {
                h.sim
                    .inject(route(), Fault::CloseConnection, rand::random_range(1..3));
                "close"
            }
            7 => {
                h.sim
                    .set_latency(Duration::from_millis(rand::random_range(0..60)));
                "latency"
            }
            _ => {
                // Only matters when a 401 makes the proxy renew its token.
                h.sim.inject(SimRoute::Token, Fault::Status500, 1);
                "token_500"
            }
        };
        *bursts.entry(kind).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(rand::random_range(200..800))).await;
    }
    h.sim.clear_faults();
    h.sim.set_latency(Duration::ZERO);
    bursts
}

async fn worker(h: Arc<Harness>, contacts: Arc<Vec<String>>, until: Instant) -> WorkerLog {
    let mut log = WorkerLog::default();
    let limit = Duration::from_millis(REQUEST_TIMEOUT_MS) + TIMEOUT_SLACK;
    while Instant::now() < until {
        let contact = rand::random_range(0..CONTACTS);
        let start = Instant::now();
        let (method, response, op) = if rand::random_bool(0.3) {
            let status = STATUSES[rand::random_range(0..4)];
            let response = h.put(&contacts[contact], status).await;
            let op = Op::put(status, &response);
            ("PUT", response, op)
        } else {
            let response = h.get(&contacts[contact]).await;
            let op = Op::get(&response);
            ("GET", response, op)
        };
        let end = Instant::now();
        let took = end - start;
        log.longest = log.longest.max(took);
        if took > limit {
            log.too_slow.push(format!(
                "{method} took {took:?}: {} {}",
                response.status,
                response.text()
            ));
        }
        *log.by_status.entry((method, response.status)).or_default() += 1;
        log.events.push(Event {
            contact,
            via: 0,
            start,
            end,
            op,
        });
        // Pacing: about 35 requests a second per worker.
        tokio::time::sleep(Duration::from_millis(rand::random_range(5..45))).await;
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak test: cargo test --test integration -- --ignored soak:: --nocapture"]
async fn soak_mixed_traffic_under_upstream_chaos() {
    let run_for = Duration::from_secs(
        std::env::var("SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let h = Arc::new(
        Harness::start_with(|c| {
            c.set("server.request_timeout_ms", &REQUEST_TIMEOUT_MS.to_string())
                .set("talkdesk.timeout_ms", "600")
                .set("talkdesk.max_retries", "2")
                // Short TTLs, so fills keep racing writes all through the run.
                .set("cache.ttl_s", "2")
                .set("cache.not_found_ttl_s", "1");
        })
        .await,
    );
    let contacts: Arc<Vec<String>> =
        Arc::new((0..CONTACTS).map(|i| format!("+1555990{i:04}")).collect());
    for contact in contacts.iter() {
        h.sim.set_status(contact, ConsentStatus::NoConsent);
    }
    h.wait_ready().await;

    let started = Instant::now();
    let until = started + run_for;
    let chaos = tokio::spawn(chaos(h.clone(), contacts.clone(), until));
    let purger = tokio::spawn(purger(h.clone(), contacts.clone(), until));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| tokio::spawn(worker(h.clone(), contacts.clone(), until)))
        .collect();

    // Memory: once after warm-up, then the largest seen until the end.
    tokio::time::sleep(WARM_UP.min(run_for / 2)).await;
    let rss_after_warm_up = rss_kib();
    let mut rss_max = rss_after_warm_up;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_max = rss_max.max(rss_kib());
    }

    let mut history = Vec::new();
    let mut by_status: BTreeMap<(&str, u16), u64> = BTreeMap::new();
    let mut too_slow = Vec::new();
    let mut longest = Duration::ZERO;
    for worker in workers {
        let log = worker.await.expect("worker");
        history.extend(log.events);
        for (key, n) in log.by_status {
            *by_status.entry(key).or_default() += n;
        }
        too_slow.extend(log.too_slow);
        longest = longest.max(log.longest);
    }
    let bursts = chaos.await.expect("chaos");
    let purges = purger.await.expect("purger");
    let elapsed = started.elapsed();
    let rss_end = rss_kib();

    // Upstream's final state is what the acknowledged writes say, unless a later write that
    // may have applied replaced it: checked as one more GET per contact, at upstream.
    let mut read_violations = violations(&history, INITIAL);
    let mut final_state = history.clone();
    let now = Instant::now();
    for (i, contact) in contacts.iter().enumerate() {
        let stored = h.sim.stored_status(contact).expect("seeded contact");
        final_state.push(Event {
            contact: i,
            via: 0,
            start: now,
            end: now,
            op: Op::Get {
                stale_age_s: None,
                result: Some(stored.as_str().to_owned()),
            },
        });
    }
    let final_violations: Vec<String> = violations(&final_state, INITIAL)
        .into_iter()
        .filter(|v| !read_violations.contains(v))
        .collect();
    // And through the proxy, once the dust has settled: a last 401 that met an injected
    // token-endpoint failure leaves the refresher backing off (at most 30 s, jittered), during
    // which the proxy rightly answers 503; wait for it to be ready again.
    wait_until(Duration::from_secs(45), || async {
        h.admin("/readyz").await.status == 200
    })
    .await;
    // Likewise a circuit opened by the last burst of failures, or upstream's last Retry-After,
    // refuses requests (503 upstream_unavailable) for a few seconds more.
    wait_until(Duration::from_secs(30), || async {
        h.get(&contacts[0]).await.status == 200
    })
    .await;
    let mut settled = Vec::new();
    for (i, contact) in contacts.iter().enumerate() {
        let start = Instant::now();
        let response = h.get(contact).await;
        assert_eq!(response.status, 200, "{}", response.text());
        settled.push(Event {
            contact: i,
            via: 0,
            start,
            end: Instant::now(),
            op: Op::Get {
                stale_age_s: None,
                result: Some(response.status_field()),
            },
        });
    }
    let mut settled_history = history.clone();
    settled_history.extend(settled);
    let settled_violations: Vec<String> = violations(&settled_history, INITIAL)
        .into_iter()
        .filter(|v| !read_violations.contains(v))
        .collect();

    let requests = history.len();
    let gets = gets(&history);
    let acked_puts = history
        .iter()
        .filter(|e| matches!(e.op, Op::Put { acked: true, .. }))
        .count();
    let stats = h.sim.stats();
    println!("soak: {requests} requests in {elapsed:?} ({:.0}/s): {gets} GETs, {} PUTs ({acked_puts} acknowledged)",
        requests as f64 / elapsed.as_secs_f64(), requests - gets);
    println!("soak: by status: {by_status:?}");
    println!("soak: chaos bursts: {bursts:?}, cache purges: {purges}");
    println!("soak: upstream saw {stats:?}");
    println!(
        "soak: longest request {longest:?} (limit {REQUEST_TIMEOUT_MS} ms + {TIMEOUT_SLACK:?}), {} over",
        too_slow.len()
    );
    println!(
        "soak: violations: {} stale reads, {} final-state, {} after settling",
        read_violations.len(),
        final_violations.len(),
        settled_violations.len()
    );
    println!(
        "soak: RSS after warm-up {} MiB, max {} MiB, end {} MiB",
        rss_after_warm_up / 1024,
        rss_max / 1024,
        rss_end / 1024
    );

    assert!(
        requests as f64 / elapsed.as_secs_f64() > 100.0,
        "too little traffic to mean anything"
    );
    assert!(acked_puts > 100, "too few acknowledged writes");
    read_violations.truncate(20);
    assert!(
        read_violations.is_empty(),
        "stale reads:\n{}",
        read_violations.join("\n")
    );
    assert!(
        final_violations.is_empty(),
        "upstream's final state contradicts an acknowledged write:\n{}",
        final_violations.join("\n")
    );
    assert!(
        settled_violations.is_empty(),
        "stale reads after settling:\n{}",
        settled_violations.join("\n")
    );
    assert!(
        too_slow.is_empty(),
        "{} requests outlived the request timeout, e.g.:\n{}",
        too_slow.len(),
        too_slow
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        rss_max.saturating_sub(rss_after_warm_up) < MAX_RSS_GROWTH_KIB,
        "RSS grew from {} KiB to {} KiB",
        rss_after_warm_up,
        rss_max
    );
}
