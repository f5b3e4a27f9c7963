//! What cluster mode costs, each figure against the same measurement without it, in one run
//! (a real `redis-server` on a free port; the in-process simulator as upstream):
//!
//! 1. the cache hit through the whole handler, in-process on one core: cluster on against off
//!    (target: at least 0.95× the throughput), and with the Redis found through three sentinels
//!    (`cluster.sentinels`) against off (target: at least 0.98×);
//! 2. PUT latency through the handler (upstream and Redis over loopback): p50 and p99 with the
//!    two announcements against without (target: at most 1 ms added at p50), and with the
//!    shared tier's scripts in their place;
//! 3. propagation under load: three instances, mixed PUTs and GETs, p50 / p99 / max of
//!    `consent_proxy_cluster_propagation_seconds` (from an announcement by one instance to its
//!    application by another);
//! 4. the shared tier (`cluster.shared_cache`): upstream GETs per 1,000 lookups over three
//!    instances taking turns (round robin), each lookup of a call on the next instance, with a
//!    working set five times what one instance's cache holds, without and with the tier;
//! 5. a shared-tier hit's latency through the handler (Redis over loopback): p50 / p99, against
//!    a local hit and an upstream miss in the same run. (1. also times the local hit with the
//!    shared tier on: it must not change.)
//!
//! `cargo bench --bench cluster`; `CLUSTER_BENCH_SCALE=0.2` for a quick run;
//! `CLUSTER_BENCH_ONLY=shared` skips 3; `CLUSTER_BENCH_ONLY=hit` runs 1 alone.

use std::time::{Duration, Instant};

use consent_proxy::config::Settings;
use consent_proxy::consent::ContactId;
use consent_proxy::simulator::Simulator;
use consent_proxy::{App, AppHandle};

#[path = "support/consent_requests.rs"]
mod consent_requests;
#[path = "../tests/integration/support/redis_server.rs"]
mod redis_server;
#[path = "support/stats.rs"]
mod stats;
use consent_requests::{get, hit_rounds, interleaved_put_latencies, proxy_toml, put, PEER};
use stats::median;

const WORKING_SET: usize = 10_000;

fn scale() -> f64 {
    std::env::var("CLUSTER_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

fn scaled(n: usize) -> usize {
    ((n as f64 * scale()) as usize).max(10)
}

/// The simulator, answering unknown contacts `NO_CONSENT` (nothing to seed).
async fn simulator() -> Simulator {
    let sim = consent_requests::simulator().await;
    sim.set_unknown_as_no_consent(true);
    sim
}

/// A proxy in front of `sim`; in cluster mode when `redis_url` is given.
async fn proxy(sim: &Simulator, redis_url: Option<&str>, max_staleness_ms: u64) -> AppHandle {
    proxy_with(sim, redis_url, max_staleness_ms, "", "").await
}

/// A proxy in cluster mode through `set`'s sentinels (the default `max_staleness_ms`), started
/// on `runtime`, where its feed keeps running while the timed rounds hold the bench's thread
/// (the other cluster modes instead get a `max_staleness_ms` longer than the rounds, which a
/// sentinel-mode proxy would wait out after its first session: writes announced to a replaced
/// master could still be in flight). A first session this soon after the sentinels took their
/// master waits out that time: some 12 s.
async fn sentinel_proxy(
    sim: &Simulator,
    set: &redis_server::SentinelSet,
    runtime: &tokio::runtime::Runtime,
) -> AppHandle {
    let settings = Settings::from_toml_str(&proxy_toml(
        sim,
        "error",
        &format!(
            "[cluster]\nsentinels = {}\nsentinel_master = {:?}\n[oauth]\nenabled = false\n",
            set.toml_list(),
            redis_server::SENTINEL_MASTER
        ),
        r#"["read", "write"]"#,
    ))
    .expect("settings");
    let proxy = runtime
        .spawn(async move { App::start(settings).await.expect("proxy") })
        .await
        .expect("start task");
    let started = Instant::now();
    while !(proxy.tokens.readiness().is_ok()
        && proxy.cluster.as_ref().is_some_and(|c| c.status().live))
    {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "the sentinel-mode proxy did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy
}

/// As [`proxy`], with more `[cluster]` keys (TOML lines) and more sections.
async fn proxy_with(
    sim: &Simulator,
    redis_url: Option<&str>,
    max_staleness_ms: u64,
    cluster_keys: &str,
    sections: &str,
) -> AppHandle {
    let cluster = match redis_url {
        Some(url) => format!(
            "[cluster]\nredis_url = \"{url}\"\nmax_staleness_ms = {max_staleness_ms}\n\
             {cluster_keys}\n[oauth]\nenabled = false\n"
        ),
        None => String::new(),
    };
    let settings = Settings::from_toml_str(&proxy_toml(
        sim,
        "error",
        &format!("{cluster}\n{sections}"),
        r#"["read", "write"]"#,
    ))
    .expect("settings");
    let proxy = App::start(settings).await.expect("proxy");
    // Ready with a token and, in cluster mode, the feed live.
    for _ in 0..500 {
        let ready = proxy.tokens.readiness().is_ok()
            && proxy.cluster.as_ref().is_none_or(|c| c.status().live);
        if ready {
            return proxy;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the proxy did not become ready");
}

fn counter(proxy: &AppHandle, name: &str, label: (&str, &str)) -> f64 {
    proxy
        .registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|metric| {
            metric
                .get_label()
                .iter()
                .any(|l| l.name() == label.0 && l.value() == label.1)
        })
        .map(|metric| metric.get_counter().get_value())
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The hit path, cluster off, on, on with the shared tier, and on through sentinels,
/// interleaved rounds on one core.
fn hit_path() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let redis = redis_server::RedisServer::start();
    let sentinel_master = redis_server::RedisServer::start();
    let sentinels = redis_server::SentinelSet::start(&sentinel_master);
    let sentinel_runtime = one_worker_runtime();
    let (modes, _sim) = runtime.block_on(async {
        let sim = simulator().await;
        let off = proxy(&sim, None, 0).await;
        // A long max_staleness: the feed must stay trusted while criterion-less rounds run
        // back to back on this one thread (the hit path's cost does not depend on it).
        let on = proxy(&sim, Some(&redis.url()), 60_000).await;
        let shared = proxy_with(&sim, Some(&redis.url()), 60_000, &shared_cache_keys(), "").await;
        let through_sentinels = sentinel_proxy(&sim, &sentinels, &sentinel_runtime).await;
        let modes = [off, on, shared, through_sentinels];
        for proxy in &modes {
            for i in 0..WORKING_SET {
                let response = proxy.routes.handle(get(i), PEER).await;
                assert_eq!(response.status(), 200);
            }
        }
        (modes, sim)
    });
    let hits = scaled(200_000);
    let per_hit = hit_rounds(&runtime, &modes, hits, WORKING_SET);
    for (name, proxy) in [
        "off",
        "on",
        "on with the shared tier",
        "on through sentinels",
    ]
    .iter()
    .zip(&modes)
    {
        let bypassed = counter(
            proxy,
            "consent_proxy_cache_lookups_total",
            ("result", "unsynced"),
        ) + counter(
            proxy,
            "consent_proxy_cache_lookups_total",
            ("result", "miss"),
        );
        assert_eq!(
            bypassed, WORKING_SET as f64,
            "cluster {name}: every timed GET must be a hit"
        );
    }
    let [off_ns, on_ns, shared_ns, sentinel_ns] = per_hit.map(|mut rounds| median(&mut rounds));
    println!(
        "hit path (in-process handler, one core, {hits} hits x 7 rounds, medians): cluster off \
         {off_ns:.0} ns/hit ({:.0}/s), on {on_ns:.0} ns/hit ({:.0}/s), on with the shared tier \
         {shared_ns:.0} ns/hit ({:.0}/s): on/off throughput {:.3}x, shared tier on/off {:.3}x \
         (against cluster on without it: {:.3}x)",
        1e9 / off_ns,
        1e9 / on_ns,
        1e9 / shared_ns,
        off_ns / on_ns,
        off_ns / shared_ns,
        on_ns / shared_ns
    );
    println!(
        "hit path through sentinels (cluster.sentinels, same rounds): {sentinel_ns:.0} ns/hit \
         ({:.0}/s): sentinel/off throughput {:.3}x (target >= 0.98x), sentinel/redis_url {:.3}x",
        1e9 / sentinel_ns,
        off_ns / sentinel_ns,
        on_ns / sentinel_ns
    );
    runtime.block_on(async {
        for proxy in modes {
            proxy.shutdown().await;
        }
    });
}

/// A runtime with one worker thread, so that redis-server has the other core (on two cores, a
/// second worker competing with it shows up as Redis' scheduling delay in the p99, not as the
/// proxy's cost).
fn one_worker_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The `[cluster]` keys of the shared cache, with a key file written for the benchmarks.
fn shared_cache_keys() -> String {
    let key_file = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-shared-key");
    std::fs::write(&key_file, "bench-shared-tier-key-0123456789abcdef").expect("key file");
    format!(
        "shared_cache = true\nshared_key_file = {:?}\nshared_timeout_ms = 50",
        key_file.display().to_string()
    )
}

/// PUT latency with and without the announcements, one PUT at a time. One worker thread, so
/// that redis-server has the other core (on two cores, a second worker competing with it shows
/// up as Redis' scheduling delay in the p99, not as the proxy's cost).
fn put_latency() {
    let runtime = one_worker_runtime();
    let redis = redis_server::RedisServer::start();
    let puts = scaled(3_000);
    let [mut off, mut on, mut shared] = runtime.block_on(async {
        let sim = simulator().await;
        let modes = [
            proxy(&sim, None, 0).await,
            proxy(&sim, Some(&redis.url()), 1_000).await,
            proxy_with(&sim, Some(&redis.url()), 1_000, &shared_cache_keys(), "").await,
        ];
        let latencies = interleaved_put_latencies(&modes, puts).await;
        for proxy in &modes[1..] {
            let refused = counter(
                proxy,
                "consent_proxy_cluster_announce_failures_total",
                ("stage", "pending"),
            );
            assert_eq!(refused, 0.0, "every PUT announced");
        }
        sim.shutdown().await;
        latencies
    });
    for latencies in [&mut off, &mut on, &mut shared] {
        latencies.sort();
    }
    let p = |sorted: &[Duration]| (percentile(sorted, 0.5), percentile(sorted, 0.99));
    let ((off50, off99), (on50, on99), (shared50, shared99)) = (p(&off), p(&on), p(&shared));
    println!(
        "PUT latency ({} PUTs each, handler -> simulator over loopback): cluster off p50 {off50:?} \
         p99 {off99:?}; on p50 {on50:?} p99 {on99:?}; on with the shared tier p50 {shared50:?} \
         p99 {shared99:?}; added by the announcements: p50 {:?} ({:.2}x), p99 {:?} ({:.2}x); \
         by the announcements with the shared tier's scripts: p50 {:?} ({:.2}x), p99 {:?} \
         ({:.2}x)",
        on.len(),
        on50.saturating_sub(off50),
        on50.as_secs_f64() / off50.as_secs_f64(),
        on99.saturating_sub(off99),
        on99.as_secs_f64() / off99.as_secs_f64(),
        shared50.saturating_sub(off50),
        shared50.as_secs_f64() / off50.as_secs_f64(),
        shared99.saturating_sub(off99),
        shared99.as_secs_f64() / off99.as_secs_f64(),
    );
}

/// The quantile of a Prometheus histogram, as `histogram_quantile` computes it.
fn histogram_quantile(buckets: &[(f64, u64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0, |b| b.1) as f64;
    let rank = q * total;
    let mut previous = (0.0, 0u64);
    for &(bound, count) in buckets {
        if count as f64 >= rank {
            let in_bucket = (count - previous.1) as f64;
            let fraction = if in_bucket == 0.0 {
                0.0
            } else {
                (rank - previous.1 as f64) / in_bucket
            };
            return previous.0 + (bound - previous.0) * fraction;
        }
        previous = (bound, count);
    }
    f64::INFINITY
}

/// Propagation under load across three instances, each on a runtime of its own.
fn propagation() {
    let redis = redis_server::RedisServer::start();
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sim = main.block_on(simulator());
    let instances: Vec<(tokio::runtime::Runtime, AppHandle)> = (0..3)
        .map(|_| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let proxy = runtime.block_on(proxy(&sim, Some(&redis.url()), 1_000));
            (runtime, proxy)
        })
        .collect();
    let routes: Vec<_> = instances.iter().map(|(_, p)| p.routes.clone()).collect();
    let run_for = Duration::from_secs_f64(10.0 * scale());
    let (requests, writes) = main.block_on(async {
        let until = Instant::now() + run_for;
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let routes = routes.clone();
                tokio::spawn(async move {
                    let (mut requests, mut writes) = (0u64, 0u64);
                    while Instant::now() < until {
                        let via = &routes[rand::random_range(0..3)];
                        let i = rand::random_range(0..200);
                        if rand::random_bool(0.2) {
                            let status = ["CONSENTED", "REFUSED"][rand::random_range(0..2)];
                            via.handle(put(i, status), PEER).await;
                            writes += 1;
                        } else {
                            via.handle(get(i), PEER).await;
                        }
                        requests += 1;
                    }
                    (requests, writes)
                })
            })
            .collect();
        let mut totals = (0, 0);
        for worker in workers {
            let (r, w) = worker.await.expect("worker");
            totals.0 += r;
            totals.1 += w;
        }
        totals
    });
    // The three instances' histograms added up: (upper bound, cumulative count), then +Inf.
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    let mut applied = 0;
    for (_, proxy) in &instances {
        for family in proxy.registry.gather() {
            if family.name() != "consent_proxy_cluster_propagation_seconds" {
                continue;
            }
            for metric in family.get_metric() {
                let histogram = metric.get_histogram();
                for (i, bucket) in histogram.get_bucket().iter().enumerate() {
                    if buckets.len() <= i {
                        buckets.push((bucket.upper_bound(), 0));
                    }
                    buckets[i].1 += bucket.cumulative_count();
                }
                applied += histogram.get_sample_count();
            }
        }
    }
    buckets.push((f64::INFINITY, applied));
    let max_bucket = buckets
        .iter()
        .find(|b| b.1 == applied)
        .map_or(f64::INFINITY, |b| b.0);
    println!(
        "propagation under load ({requests} requests in {run_for:?}, {writes} PUTs over 3 \
         instances; {applied} announcements applied): p50 {:.0} us, p99 {:.0} us, all within \
         {:.0} us (bucket bound)",
        histogram_quantile(&buckets, 0.5) * 1e6,
        histogram_quantile(&buckets, 0.99) * 1e6,
        max_bucket * 1e6
    );
    for (runtime, proxy) in instances {
        runtime.block_on(proxy.shutdown());
        runtime.shutdown_background();
    }
    main.block_on(sim.shutdown());
}

/// Upstream GETs per 1,000 lookups over three instances taking turns, without and with the
/// shared tier. Each call looks its contact up twice (a common flow shape), the second time on
/// the next instance; contacts are drawn at random from a working set five times what one
/// instance's cache holds (`cache.max_entries`), the same calls in both runs, one lookup at a
/// time (no coalescing).
fn shared_tier_upstream_gets() {
    const INSTANCE_ENTRIES: usize = 1_000;
    const CONTACTS: usize = 5 * INSTANCE_ENTRIES;
    let calls = scaled(10_000);
    let sequence: Vec<usize> = (0..calls)
        .map(|_| rand::random_range(0..CONTACTS))
        .collect();
    let runtime = one_worker_runtime();
    let mut per_thousand = Vec::new();
    for shared in [false, true] {
        let redis = redis_server::RedisServer::start();
        let (total, second_half, unavailable, (used, keys)) = runtime.block_on(async {
            let sim = simulator().await;
            let keys = if shared {
                shared_cache_keys()
            } else {
                String::new()
            };
            let cache = format!("[cache]\nmax_entries = {INSTANCE_ENTRIES}");
            let mut instances = Vec::new();
            for _ in 0..3 {
                instances.push(proxy_with(&sim, Some(&redis.url()), 1_000, &keys, &cache).await);
            }
            sim.reset_counters();
            let (empty, _) = redis_memory(&redis.admin_url()).await;
            let mut halfway = 0;
            for (n, &contact) in sequence.iter().enumerate() {
                if n == calls / 2 {
                    halfway = sim.stats().gets;
                }
                for lookup in 0..2 {
                    let via = &instances[(2 * n + lookup) % 3];
                    let response = via.routes.handle(get(contact), PEER).await;
                    assert_eq!(response.status(), 200);
                }
            }
            let gets = sim.stats().gets;
            let (used, keys) = redis_memory(&redis.admin_url()).await;
            let redis_bytes = (used.saturating_sub(empty), keys);
            let unavailable: f64 = instances
                .iter()
                .map(|p| {
                    counter(
                        p,
                        "consent_proxy_shared_cache_lookups_total",
                        ("result", "unavailable"),
                    )
                })
                .sum();
            for proxy in instances {
                proxy.shutdown().await;
            }
            sim.shutdown().await;
            (gets, gets - halfway, unavailable, redis_bytes)
        });
        let lookups = 2 * calls;
        let overall = total as f64 * 1000.0 / lookups as f64;
        let steady = second_half as f64 * 1000.0 / (lookups - lookups / 2) as f64;
        per_thousand.push((overall, steady));
        println!(
            "round robin over 3 instances, shared tier {}: {lookups} lookups of {CONTACTS} \
             contacts (each instance's cache holds {INSTANCE_ENTRIES}): {total} upstream GETs, \
             {overall:.0} per 1,000 lookups ({steady:.0} in the second half){}",
            if shared { "on" } else { "off" },
            if shared {
                format!(
                    "; {unavailable} fills found Redis unavailable; Redis grew by {used} bytes \
                     for {keys} keys ({} bytes a contact)",
                    used / keys.max(1)
                )
            } else {
                String::new()
            }
        );
    }
    let ((off, off_steady), (on, on_steady)) = (per_thousand[0], per_thousand[1]);
    println!(
        "upstream GETs per 1,000 lookups, shared tier on/off: {:.3}x overall, {:.3}x in the \
         second half",
        on / off,
        on_steady / off_steady
    );
}

/// Redis' `used_memory` and its number of keys.
async fn redis_memory(url: &str) -> (u64, u64) {
    let client = redis::Client::open(url).expect("redis url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut connection)
        .await
        .expect("INFO memory");
    let used = info
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let keys: u64 = redis::cmd("DBSIZE")
        .query_async(&mut connection)
        .await
        .expect("DBSIZE");
    (used, keys)
}

/// A shared-tier hit through the handler (this instance's cache misses, Redis has the answer),
/// against a local hit and an upstream miss, in interleaved blocks on one worker thread (so
/// that redis-server has the other core).
fn shared_hit_latency() {
    let runtime = one_worker_runtime();
    let redis = redis_server::RedisServer::start();
    let lookups = scaled(3_000);
    let [mut shared, mut local, mut miss] = runtime.block_on(async {
        let sim = simulator().await;
        // `filler` fills Redis; `tier` reads each contact once from it (a purge would count
        // as a change of the contact, after which the tier's older answer is refused).
        let filler = proxy_with(&sim, Some(&redis.url()), 60_000, &shared_cache_keys(), "").await;
        let tier = proxy_with(&sim, Some(&redis.url()), 60_000, &shared_cache_keys(), "").await;
        let alone = proxy(&sim, Some(&redis.url()), 60_000).await;
        let forget = |proxy: &AppHandle, i: usize| {
            let id = ContactId::from_path_segment(&format!("+1555{i:07}")).expect("contact");
            proxy.cache.purge(&id);
        };
        // Warm all three (connections, token, scripts loaded) and fill Redis.
        for i in 0..lookups {
            filler.routes.handle(get(i), PEER).await;
            alone.routes.handle(get(i), PEER).await;
        }
        for i in lookups..lookups + 100 {
            tier.routes.handle(get(i), PEER).await;
        }
        let mut latencies = [Vec::new(), Vec::new(), Vec::new()];
        for block in 0..(lookups / 100).max(1) {
            for i in block * 100..(block + 1) * 100 {
                let started = Instant::now();
                let response = tier.routes.handle(get(i), PEER).await;
                latencies[0].push(started.elapsed());
                assert_eq!(
                    response.headers().get("x-cache-tier").map(|v| v.as_bytes()),
                    Some(&b"shared"[..])
                );
            }
            for i in block * 100..(block + 1) * 100 {
                let started = Instant::now();
                let response = tier.routes.handle(get(i), PEER).await;
                latencies[1].push(started.elapsed());
                assert_eq!(response.headers()["x-cache-status"], "HIT");
            }
            for i in block * 100..(block + 1) * 100 {
                forget(&alone, i);
                let started = Instant::now();
                let response = alone.routes.handle(get(i), PEER).await;
                latencies[2].push(started.elapsed());
                assert_eq!(response.headers()["x-cache-status"], "MISS");
            }
        }
        filler.shutdown().await;
        tier.shutdown().await;
        alone.shutdown().await;
        sim.shutdown().await;
        latencies
    });
    for latencies in [&mut shared, &mut local, &mut miss] {
        latencies.sort();
    }
    let p = |sorted: &[Duration]| (percentile(sorted, 0.5), percentile(sorted, 0.99));
    let ((shared50, shared99), (local50, local99), (miss50, miss99)) =
        (p(&shared), p(&local), p(&miss));
    println!(
        "GET latency through the handler ({} each, Redis and the simulator over loopback): \
         shared-tier hit p50 {shared50:?} p99 {shared99:?}; local hit p50 {local50:?} p99 \
         {local99:?}; upstream miss p50 {miss50:?} p99 {miss99:?}; a shared-tier hit takes \
         {:.2}x an upstream miss at p50 ({:.2}x at p99)",
        shared.len(),
        shared50.as_secs_f64() / miss50.as_secs_f64(),
        shared99.as_secs_f64() / miss99.as_secs_f64(),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is read.
    let only = std::env::var("CLUSTER_BENCH_ONLY").unwrap_or_default();
    let only_shared = only == "shared";
    hit_path();
    if only == "hit" {
        return;
    }
    put_latency();
    if !only_shared {
        propagation();
    }
    shared_tier_upstream_gets();
    shared_hit_latency();
}
