//! Cluster mode behind Redis Sentinel (`cluster.sentinels`): a real master, its replica and three
//! sentinels (`down-after-milliseconds` 1 s, quorum 2), three in-process proxies and the
//! randomized three-instance history running across each fault, checked for rule 5 of docs/CONSISTENCY.md (at the
//! 50 ms bound on a healthy cluster, at `max_staleness_ms` across a fault) and for lost
//! acknowledged writes:
//! - a healthy cluster, then `SENTINEL FAILOVER` by hand;
//! - the master killed (with the shared tier on);
//! - the master frozen (`SIGSTOP`) past `down-after-milliseconds`, failed over, then thawed
//!   while still believing it is the master (split brain): an instance that stayed connected to
//!   it must not acknowledge a write the others cannot hear;
//! - the sentinels killed one by one: with a majority left nothing changes; without one the
//!   instances stop trusting their caches and refuse writes (they cannot tell a split brain).
//!
//! Each prints how long PUTs were refused and GETs bypassed the cache.

use std::sync::Arc;
use std::time::Duration;

use crate::support::fleet::{
    randomized_history_across, shared_tier, Fleet, HistoryRun, MAX_STALENESS, RULE_5_LAG,
};
use crate::support::redis_server::{self, RedisServer, SentinelSet, DOWN_AFTER, SENTINEL_MASTER};
use crate::support::*;
use consent_proxy::consent::ConsentStatus;
use tokio::time::Instant;

/// `server.request_timeout_ms` here: it bounds a write's life, hence how long an instance on a
/// new master waits before caching (writes announced to the old one must have ended).
const REQUEST_TIMEOUT_MS: u64 = 2000;

/// Instance `i` of a fleet behind `set`'s sentinels, with `max_staleness`.
fn behind_sentinels(config: &mut ProxyConfig, set: &SentinelSet, max_staleness: Duration) {
    config
        .set_str("cluster.redis_url", "")
        .set("cluster.sentinels", &set.toml_list())
        .set_str("cluster.sentinel_master", SENTINEL_MASTER)
        .set(
            "cluster.max_staleness_ms",
            &max_staleness.as_millis().to_string(),
        )
        .set("server.request_timeout_ms", &REQUEST_TIMEOUT_MS.to_string())
        .set("talkdesk.timeout_ms", "1000");
}

/// A master, its replica, three sentinels and three proxies following them; instance `i` has
/// `max_staleness(i)`.
async fn sentinel_fleet(max_staleness: impl Fn(usize) -> Duration) -> (Arc<Fleet>, SentinelSet) {
    sentinel_fleet_with(|i, config| {
        config.set(
            "cluster.max_staleness_ms",
            &max_staleness(i).as_millis().to_string(),
        );
    })
    .await
}

/// As [`sentinel_fleet`], each instance's configuration adjusted by `configure(i, config)`
/// (`max_staleness_ms` is [`MAX_STALENESS`] unless it sets another).
async fn sentinel_fleet_with(
    configure: impl Fn(usize, &mut ProxyConfig),
) -> (Arc<Fleet>, SentinelSet) {
    let master = RedisServer::start();
    let set = tokio::task::block_in_place(|| SentinelSet::start(&master));
    fleet_behind(master, set, configure).await
}

/// Three proxies following `set`'s sentinels, `master` the master they name now.
async fn fleet_behind(
    master: RedisServer,
    set: SentinelSet,
    configure: impl Fn(usize, &mut ProxyConfig),
) -> (Arc<Fleet>, SentinelSet) {
    let fleet = Fleet::start_with_redis(start_simulator().await, master, 3, |i, config| {
        behind_sentinels(config, &set, MAX_STALENESS);
        configure(i, config);
    })
    .await;
    (Arc::new(fleet), set)
}

/// The span from the first to the last of `times` (zero when there are none).
fn span(times: &[Instant]) -> Duration {
    match (times.iter().min(), times.iter().max()) {
        (Some(first), Some(last)) => *last - *first,
        _ => Duration::ZERO,
    }
}

/// Asserts what rule 5 and rule 1 demand of `run`, and prints the figures for `kind`.
fn check(kind: &str, run: &HistoryRun) {
    println!(
        "{kind}: PUTs refused for {:?} ({} refused), GETs bypassed the cache for {:?} ({}), \
         {} violations, {} lost writes",
        span(&run.refused_puts),
        run.refused_puts.len(),
        span(&run.bypassed_gets),
        run.bypassed_gets.len(),
        run.violations.len(),
        run.lost_writes.len()
    );
    assert!(run.violations.is_empty(), "{kind}: {:#?}", run.violations);
    assert!(run.lost_writes.is_empty(), "{kind}: {:#?}", run.lost_writes);
}

/// Every instance is live again, and a write through each is seen through all.
async fn all_follow_the_new_master(fleet: &Fleet, contact: &str) {
    fleet.wait_live(0..3).await;
    for (i, status) in ["REFUSED", "DELETED", "CONSENTED"].into_iter().enumerate() {
        let written = fleet.put(i, contact, status).await;
        assert!(
            (200..300).contains(&written.status),
            "instance {i}: {}",
            written.text()
        );
        // Rule 5's bound for the other instances (through `i` itself it holds at once).
        tokio::time::sleep(RULE_5_LAG).await;
        for j in 0..3 {
            let seen = fleet.get(j, contact).await;
            assert_eq!(
                seen.status_field(),
                status,
                "written through {i}, read through {j}: {} {} ({:?})",
                seen.status,
                seen.text(),
                seen.header("x-cache-status")
            );
        }
    }
}

/// Runs the history for `run_for` at `lag`, causing `fault` one second in.
async fn history_across(
    fleet: &Arc<Fleet>,
    prefix: &'static str,
    run_for: Duration,
    lag: Duration,
    fault: impl FnOnce() + Send + 'static,
) -> HistoryRun {
    let history = tokio::spawn(randomized_history_across(
        fleet.clone(),
        prefix,
        run_for,
        lag,
    ));
    // The fault comes after a second of traffic on a healthy cluster.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::spawn_blocking(fault).await.expect("fault");
    history.await.expect("history")
}

/// `name` from `INFO section` of the Redis or sentinel at `port` (a number).
fn info_counter(port: u16, section: &str, name: &str) -> f64 {
    let info: String = redis_server::command(port, redis::cmd("INFO").arg(section)).expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Commands per second over 2 s: `PUBLISH` on the master (`INFO commandstats`), and all
/// commands on the sentinels together (a sentinel's `INFO` has no per-command counts).
async fn command_rates(master: u16, set: &SentinelSet) -> (f64, f64) {
    let count = || {
        let stats: String = redis_server::command(master, redis::cmd("INFO").arg("commandstats"))
            .expect("INFO commandstats");
        let publish: f64 = stats
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_publish:calls="))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0.0);
        let sentinels: f64 = set
            .ports()
            .iter()
            .map(|&port| info_counter(port, "stats", "total_commands_processed"))
            .sum();
        (publish, sentinels)
    };
    let window = Duration::from_secs(2);
    let before = tokio::task::block_in_place(count);
    tokio::time::sleep(window).await;
    let after = tokio::task::block_in_place(count);
    let per_s = |n: f64| n / window.as_secs_f64();
    (per_s(after.0 - before.0), per_s(after.1 - before.1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_then_failed_over_by_hand() {
    let master = RedisServer::start();
    let set = tokio::task::block_in_place(|| SentinelSet::start(&master));
    let master_port = master.port();
    let (quiet_publish, quiet_sentinels) = command_rates(master_port, &set).await;
    let (fleet, set) = fleet_behind(master, set, |_, _| {}).await;
    let (publish, sentinels) = command_rates(master_port, &set).await;
    println!(
        "at rest, per instance (max_staleness_ms {}): {:.1} PUBLISH/s on the master, {:.1} \
         commands/s over the three sentinels (the sentinels' own traffic subtracted)",
        MAX_STALENESS.as_millis(),
        (publish - quiet_publish) / 3.0,
        (sentinels - quiet_sentinels) / 3.0
    );
    let healthy = randomized_history_across(
        fleet.clone(),
        "+1555190100",
        Duration::from_secs(4),
        RULE_5_LAG,
    )
    .await;
    check("healthy, behind sentinels (50 ms bound)", &healthy);
    assert!(healthy.refused_puts.is_empty() && healthy.bypassed_gets.is_empty());

    let set = Arc::new(set);
    let replica = set.replica.port();
    let run = history_across(
        &fleet,
        "+1555190110",
        Duration::from_secs(9),
        MAX_STALENESS,
        {
            let set = set.clone();
            move || {
                set.failover();
                set.wait_master(replica, Duration::from_secs(10));
            }
        },
    )
    .await;
    check("SENTINEL FAILOVER", &run);
    // On the new master no instance caches until every write that may have been announced to
    // the old one (and so never heard here) has ended: max_staleness plus a pending
    // announcement's lifetime (3.9 s here) after the sentinels switched. The GETs bypass the
    // cache from when each instance noticed the switch: at least the request timeout, whatever
    // the noticing took (without the wait: some 40 ms).
    let write_life = Duration::from_millis(REQUEST_TIMEOUT_MS);
    assert!(
        span(&run.bypassed_gets) >= write_life,
        "the cache was used again {:?} after the failover",
        span(&run.bypassed_gets)
    );
    all_follow_the_new_master(&fleet, "+15551901199").await;
}

/// With the shared tier on: the promoted replica is another Redis (its run id), so the tier
/// starts a new epoch there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_killed() {
    let (fleet, set) = sentinel_fleet_with(|_, config| {
        shared_tier(config, true, false);
    })
    .await;
    let set = Arc::new(set);
    let replica = set.replica.port();
    let run = history_across(
        &fleet,
        "+1555190200",
        Duration::from_secs(10),
        MAX_STALENESS,
        {
            let (fleet, set) = (fleet.clone(), set.clone());
            move || {
                fleet.redis().kill();
                set.wait_master(replica, DOWN_AFTER + Duration::from_secs(10));
            }
        },
    )
    .await;
    check("master killed", &run);
    all_follow_the_new_master(&fleet, "+15551902099").await;
}

/// Split brain. Instance 0 gives a silent connection up only after 8 s (`max_staleness_ms`
/// 2000), so it is still connected to the old master when that is thawed, still a master in
/// its own eyes (the sentinels demote it only some seconds later). Instances 1 and 2 gave up
/// theirs and follow the new master. A write acknowledged through 0 must be heard by 1 and 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_master_frozen_past_down_after_then_thawed() {
    let slow = Duration::from_millis(2000);
    let (fleet, set) = sentinel_fleet(|i| if i == 0 { slow } else { MAX_STALENESS }).await;
    let set = Arc::new(set);
    let replica = set.replica.port();
    let run = history_across(&fleet, "+1555190300", Duration::from_secs(8), slow, {
        let (fleet, set) = (fleet.clone(), set.clone());
        move || {
            fleet.redis().freeze();
            set.wait_master(replica, DOWN_AFTER + Duration::from_secs(10));
            fleet.redis().thaw();
        }
    })
    .await;
    check("master frozen past down-after, then thawed", &run);

    // Right after: 1 and 2 cache a contact; a write through 0 must reach them.
    let contact = "+15551903099";
    fleet.sim.set_status(contact, ConsentStatus::Consented);
    fleet.wait_live([1, 2]).await;
    for i in [1, 2] {
        wait_until(Duration::from_secs(5), || async {
            fleet.get(i, contact).await.header("x-cache-status") == Some("HIT")
        })
        .await;
    }
    let written = fleet.put(0, contact, "REFUSED").await;
    if written.status == 200 {
        tokio::time::sleep(slow).await;
        for i in [1, 2] {
            let seen = fleet.get(i, contact).await;
            assert_eq!(
                seen.status_field(),
                "REFUSED",
                "instance {i} did not hear a write acknowledged through instance 0 ({:?})",
                seen.header("x-cache-status")
            );
        }
    } else {
        assert_eq!(
            (written.status, written.code().as_str()),
            (503, "cluster_unavailable")
        );
    }
    all_follow_the_new_master(&fleet, "+15551903098").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_killed_one_by_one() {
    let (fleet, set) = sentinel_fleet(|_| MAX_STALENESS).await;
    let set = Arc::new(std::sync::Mutex::new(set));
    let kill = |i: usize| {
        let set = set.clone();
        move || set.lock().unwrap().kill_sentinel(i)
    };

    // Two of three left: a majority still names the master; nothing changes.
    let run = history_across(
        &fleet,
        "+1555190400",
        Duration::from_secs(4),
        RULE_5_LAG,
        kill(0),
    )
    .await;
    check("one sentinel of three killed (50 ms bound)", &run);
    assert!(run.refused_puts.is_empty() && run.bypassed_gets.is_empty());

    // One left: no majority, so no instance can tell it is not on a replaced master.
    let killed_at = Instant::now() + Duration::from_secs(1);
    let run = history_across(
        &fleet,
        "+1555190410",
        Duration::from_secs(4),
        MAX_STALENESS,
        kill(1),
    )
    .await;
    check("two sentinels of three killed", &run);
    let late = killed_at + MAX_STALENESS + Duration::from_millis(500);
    for i in 0..3 {
        assert_eq!(
            fleet.feed(i).await,
            (200, "down".to_owned()),
            "instance {i}"
        );
        let reason = fleet.admin(i, "/readyz").await.json()["cluster"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(reason.contains("sentinels"), "{reason}");
    }
    let refused = fleet.put(0, "+15551904199", "REFUSED").await;
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (503, "cluster_unavailable")
    );
    assert!(
        run.refused_puts.iter().filter(|&&at| at > late).count() > 10,
        "writes go on without a majority of the sentinels"
    );
}
