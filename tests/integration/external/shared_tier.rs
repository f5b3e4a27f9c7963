//! The cluster's shared tier against a real `redis-server` (started here on a free port; a
//! missing `redis-server` fails loudly), with three in-process proxies and one simulator.
//!
//! Shared cache (`cluster.shared_cache`):
//! - a GET through A, then through B and C: one upstream GET in total, B and C answer from the
//!   shared tier (`HIT`, `x-cache-tier: shared`); a just-started instance does so even when
//!   its first lookup's round trip to Redis is slow (it timed Redis' clock as it started);
//! - 100 concurrent misses spread over the three instances: one upstream GET; a fill lock whose
//!   holder died is taken over;
//! - a fill that began before a write announced through another instance does not store its
//!   older answer into Redis (the Redis-side generation guard);
//! - nor when the contact's keys leave Redis mid-fill after the write (deleted; evicted under
//!   `allkeys-lru` and `volatile-lru`): a missing generation refuses the store;
//! - a contact's entry saved before a write and put back after it by a client without the
//!   shared key (a replay) is refused by every instance that knows of the write;
//! - the randomized three-instance history keeps rule 5 (docs/CONSISTENCY.md), also while the contacts' keys are
//!   deleted and evicted all along;
//! - a restarted instance takes no answer read before it started: it reads each contact once
//!   and replaces it for the fleet;
//! - an admin purge clears the shared tier; during a key rotation a write clears every
//!   keyspace; after Redis restarts with its data, the tier starts a new epoch;
//! - a frozen Redis never fails a GET: it is answered from upstream within its deadline.
//!
//! Shared token (`cluster.shared_token`):
//! - one token fetch per token lifetime for the whole fleet, renewed before it expires;
//! - a burst of upstream 401s across the instances: one renewal;
//! - Redis stopped: each instance fetches its own token and keeps serving.

use std::sync::Arc;
use std::time::Duration;

use crate::support::fleet::{
    cluster_config, randomized_history_for, shared_tier, shared_tier_with_keys,
    slow_fill_then_write, slow_fill_then_write_holding, Fleet, Instance,
};
use crate::support::redis_server::RedisServer;
use crate::support::relay::Relay;
use crate::support::*;
use consent_proxy::consent::{ConsentStatus, ContactId};
use consent_proxy::simulator::{Fault, SimRoute, Simulator, SimulatorConfig};
use futures_util::future::join_all;
use tokio::time::Instant;

const SHARED_HIT: &str = r#"consent_proxy_shared_cache_lookups_total{result="hit"}"#;
const SHARED_COALESCED: &str = r#"consent_proxy_shared_cache_lookups_total{result="coalesced"}"#;
const OUTDATED: &str = r#"consent_proxy_shared_cache_lookups_total{result="outdated"}"#;
const STORES_REFUSED: &str = r#"consent_proxy_shared_cache_stores_total{result="refused"}"#;
const STORED: &str = r#"consent_proxy_shared_cache_stores_total{result="stored"}"#;
/// Announcements of other instances applied (each write: its pending and its outcome).
const APPLIED: &str = "consent_proxy_cluster_propagation_seconds_count";
/// Every contact's hash in Redis (the default `cluster.key_prefix`).
const CONTACT_KEYS: &str = "consent-proxy:v1:c:*";
const FETCHED: &str = r#"consent_proxy_token_fetches_total{result="success"}"#;

/// Three instances with the shared cache on.
async fn shared_cache_fleet() -> Fleet {
    Fleet::start_with(3, |_, c| {
        shared_tier(c, true, false);
    })
    .await
}

/// Lets every instance of a fresh fleet time Redis' clock once more before a test reads what
/// it expects from the shared tier. An instance takes a shared answer only if the answer's
/// upstream read certainly began after the instance's session did, by a bound on Redis' clock
/// it tightens with each script it runs. It times the clock as its session starts (five round
/// trips, the fastest kept: the test below shows they are needed), but on a machine loaded by
/// the rest of the suite a read right after the fleet is up may still be rightly refused: a
/// MISS where a test looks for a shared HIT (seen in full runs, twice, before the session's
/// samples, always on the instance started last). Each instance reads a contact of its own (a
/// shared miss: one more hash in Redis, no shared hit counted).
async fn time_redis_everywhere(fleet: &Fleet) {
    for i in 0..fleet.proxies.len() {
        fleet.get(i, &format!("+155509998{i:02}")).await;
    }
}

/// Where an answer came from: `x-cache-status` and `x-cache-tier`.
fn source(response: &TestResponse) -> (String, Option<String>) {
    (
        response
            .header("x-cache-status")
            .unwrap_or_default()
            .to_owned(),
        response.header("x-cache-tier").map(str::to_owned),
    )
}

fn shared_hit() -> (String, Option<String>) {
    ("HIT".to_owned(), Some("shared".to_owned()))
}

fn local(status: &str) -> (String, Option<String>) {
    (status.to_owned(), None)
}

// ---------------------------------------------------------------------------------------------
// The shared cache

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_read_through_one_instance_is_answered_by_the_others_from_the_shared_tier() {
    let fleet = shared_cache_fleet().await;
    time_redis_everywhere(&fleet).await;
    let contact = "+15550900001";
    fleet.sim.set_status(contact, ConsentStatus::Consented);

    let first = fleet.get(0, contact).await;
    assert_eq!(first.status_field(), "CONSENTED");
    assert_eq!(source(&first), local("MISS"));
    for i in [1, 2] {
        let answer = fleet.get(i, contact).await;
        assert_eq!(answer.status_field(), "CONSENTED", "instance {i}");
        assert_eq!(source(&answer), shared_hit(), "instance {i}");
        assert!(answer.header("age").is_some(), "a hit says its age");
        assert_eq!(fleet.metric(i, SHARED_HIT).await, 1.0);
        // Now in the instance's own cache too.
        assert_eq!(source(&fleet.get(i, contact).await), local("HIT"));
    }
    assert_eq!(fleet.sim.gets_for(contact), 1, "one upstream GET in total");

    // Upstream's 404 is shared too (under cache.not_found_ttl_s).
    let unknown = "+15550900099";
    assert_eq!(
        (
            fleet.get(0, unknown).await.status,
            fleet.get(1, unknown).await.status
        ),
        (404, 404)
    );
    assert_eq!(source(&fleet.get(2, unknown).await), shared_hit());
    assert_eq!(fleet.sim.gets_for(unknown), 1);
}

/// A just-started instance takes a shared answer read after its session began even when its
/// first lookup's round trip to Redis is slow: it timed Redis' clock as the session started.
/// Instance B reaches Redis through a relay that holds B's lookup for 200 ms (the Redis
/// client's own response timeout is 250 ms); the answer A stored was read right after B's
/// start, so B can tell it is newer than B's session only by a bound on Redis' clock from
/// before the slow round trip (without one, B's first bound is that round trip's, loose by
/// 200 ms, and B refuses the answer: seen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_just_started_instance_takes_shared_answers_though_its_first_round_trip_is_slow() {
    const HELD: Duration = Duration::from_millis(200);
    let sim = start_simulator().await;
    let redis = RedisServer::start();
    let relay = Relay::before(&redis).await;
    let mut proxies = Vec::new();
    for redis_url in [redis.url(), relay.url()] {
        let mut config = cluster_config(&sim, &redis_url);
        shared_tier(&mut config, true, false)
            // The held round trip costs B neither its lookup nor its feed.
            .set("cluster.shared_timeout_ms", "1000")
            .set("cluster.max_staleness_ms", "2000");
        proxies.push(Instance::start(&config).await);
    }
    let fleet = Fleet::of(sim, redis, proxies).await;
    let contact = "+15550900071";
    fleet.sim.set_status(contact, ConsentStatus::Consented);
    assert_eq!(source(&fleet.get(0, contact).await), local("MISS"));

    relay.pause();
    let resume_later = async {
        // The fault itself: how long B's round trips are held.
        tokio::time::sleep(HELD).await;
        relay.resume();
    };
    let (answer, ()) = tokio::join!(fleet.get(1, contact), resume_later);
    assert_eq!(answer.status_field(), "CONSENTED");
    assert_eq!(
        source(&answer),
        shared_hit(),
        "B refused A's answer: {}",
        answer.text()
    );
    assert_eq!(fleet.sim.gets_for(contact), 1, "one upstream GET in total");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_over_three_instances_make_one_upstream_get() {
    let fleet = Arc::new(shared_cache_fleet().await);
    let contact = "+15550900002";
    fleet.sim.set_status(contact, ConsentStatus::Refused);
    // Upstream takes its time, so that all the GETs arrive while the first is in flight.
    fleet.sim.set_latency(Duration::from_millis(400));
    let answers = join_all((0..100).map(|i| {
        let fleet = fleet.clone();
        async move { fleet.get(i % 3, contact).await }
    }))
    .await;
    for answer in &answers {
        assert_eq!(
            (answer.status, answer.status_field()),
            (200, "REFUSED".to_owned())
        );
    }
    assert_eq!(
        fleet.sim.gets_for(contact),
        1,
        "one upstream GET for the fleet"
    );
    let mut coalesced_elsewhere = 0.0;
    for i in 0..3 {
        coalesced_elsewhere += fleet.metric(i, SHARED_COALESCED).await;
    }
    assert_eq!(
        coalesced_elsewhere, 2.0,
        "two instances waited for the third's fill"
    );
}

/// A's fill holds the contact's fill lock when A dies (its runtime is dropped mid-fill, as a
/// process killed): B's fill waits for it, takes over once the lock expires (one upstream
/// attempt, 1 s here, plus two Redis calls), fetches and stores for the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_lock_whose_holder_died_is_taken_over() {
    let mut fleet = Fleet::start_with(3, |_, c| {
        shared_tier(c, true, false).set("talkdesk.timeout_ms", "1000");
    })
    .await;
    let contact = "+15550900007";
    fleet.sim.set_status(contact, ConsentStatus::Consented);
    fleet
        .sim
        .delay_next_get(contact, Duration::from_millis(900), 1);
    let url = fleet.url(0, contact);
    let http = fleet.http.clone();
    // Its connection breaks when A dies (the client's panic then ends this task, ignored).
    let dying = tokio::spawn(async move {
        http.send(http::Method::GET, &url, &[("x-api-key", RW_KEY)], None)
            .await
    });
    wait_until(Duration::from_secs(5), || async {
        fleet.sim.gets_for(contact) == 1
    })
    .await;
    drop(fleet.proxies.remove(0));
    let _ = dying.await;
    // B and C are now instances 0 and 1.
    let answer = fleet.get(0, contact).await;
    assert_eq!(answer.status_field(), "CONSENTED");
    for (result, expected) in [("miss", 1.0), ("lock_timeout", 0.0)] {
        let sample = format!(r#"consent_proxy_shared_cache_lookups_total{{result="{result}"}}"#);
        assert_eq!(fleet.metric(0, &sample).await, expected, "{result}");
    }
    assert_eq!(fleet.sim.gets_for(contact), 2);
    assert_eq!(source(&fleet.get(1, contact).await), shared_hit());
}

/// B's fill reads upstream before a write through A is applied, and its answer (the older
/// status) comes back after A's PUT has returned: Redis refuses to store it, so neither B
/// nor any other instance is later answered the older status from the shared tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_began_before_a_write_elsewhere_does_not_store_into_redis() {
    let fleet = Arc::new(shared_cache_fleet().await);
    let contact = "+15550900003";
    // B's fill holds the contact's fill lock when A's PUT returns.
    let slow_read = slow_fill_then_write(&fleet, contact, 1, 0).await;
    let slow = slow_read.await.unwrap();
    assert_eq!(
        slow.status_field(),
        "CONSENTED",
        "it began before the write"
    );
    assert_eq!(fleet.metric(1, STORES_REFUSED).await, 1.0);

    // The write left nothing in Redis (its status is not stored there): C reads REFUSED from
    // upstream once for the fleet, and B (whose own cache the write cleared) is answered it
    // from the shared tier.
    let answer = fleet.get(2, contact).await;
    assert_eq!(
        (answer.status_field(), source(&answer)),
        ("REFUSED".to_owned(), local("MISS"))
    );
    let answer = fleet.get(1, contact).await;
    assert_eq!(
        (answer.status_field(), source(&answer)),
        ("REFUSED".to_owned(), shared_hit())
    );
    assert_eq!(fleet.sim.gets_for(contact), 2, "one more upstream GET");
}

/// How a contact's keys leave Redis in the tests below.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// An operator's `DEL`.
    Deleted,
    /// Evicted by Redis itself under `maxmemory-policy allkeys-lru`.
    EvictedAllKeysLru,
    /// Evicted under `volatile-lru` (every key of the tier has a TTL).
    EvictedVolatileLru,
}

impl Loss {
    /// Sets Redis up for it (before the contact is used).
    fn prepare(self, redis: &RedisServer) {
        match self {
            Loss::Deleted => {}
            Loss::EvictedAllKeysLru => redis.limit_memory("allkeys-lru"),
            Loss::EvictedVolatileLru => redis.limit_memory("volatile-lru"),
        }
    }

    /// Makes `key` leave Redis.
    fn lose(self, redis: &RedisServer, key: &str) {
        match self {
            Loss::Deleted => {
                redis.command(&["DEL", key]);
            }
            Loss::EvictedAllKeysLru => {
                let junk = redis.evict(key, false);
                println!("evicted under allkeys-lru after {junk} junk keys");
            }
            Loss::EvictedVolatileLru => {
                let junk = redis.evict(key, true);
                println!("evicted under volatile-lru after {junk} junk keys");
            }
        }
    }
}

/// The issue's scenario: A's fill reads CONSENTED and is held; a PUT of REFUSED through B
/// returns 200; the contact's keys leave Redis; A's fill ends. Its answer must not be stored
/// (the generation it began under is gone), and A and C answer REFUSED, never CONSENTED from
/// the shared tier.
async fn keys_lost_mid_fill(loss: Loss, contact: &'static str) {
    let fleet = Arc::new(shared_cache_fleet().await);
    loss.prepare(&fleet.redis());
    let slow_read =
        slow_fill_then_write_holding(&fleet, contact, 0, 1, Duration::from_millis(2000)).await;
    let keys = fleet.redis().keys(CONTACT_KEYS);
    assert_eq!(keys.len(), 1, "the contact's hash: {keys:?}");
    loss.lose(&fleet.redis(), &keys[0]);
    assert!(
        fleet.redis().keys(CONTACT_KEYS).is_empty(),
        "the contact's keys are gone"
    );
    assert!(
        !slow_read.is_finished(),
        "lost while the fill was in flight"
    );
    let slow = slow_read.await.unwrap();
    assert_eq!(
        slow.status_field(),
        "CONSENTED",
        "it began before the write"
    );
    assert_eq!(
        (
            fleet.metric(0, STORED).await,
            fleet.metric(0, STORES_REFUSED).await
        ),
        (0.0, 1.0),
        "{loss:?}: the fill's older answer was stored into Redis"
    );
    for i in [0, 2] {
        let answer = fleet.get(i, contact).await;
        assert_eq!(
            answer.status_field(),
            "REFUSED",
            "{loss:?}: instance {i} answered older than the acknowledged write ({:?})",
            source(&answer)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_deleted_mid_fill_do_not_let_the_fill_store_its_older_answer() {
    keys_lost_mid_fill(Loss::Deleted, "+15550900011").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_evicted_mid_fill_under_allkeys_lru_do_not_let_the_fill_store_its_older_answer() {
    keys_lost_mid_fill(Loss::EvictedAllKeysLru, "+15550900012").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_evicted_mid_fill_under_volatile_lru_do_not_let_the_fill_store_its_older_answer() {
    keys_lost_mid_fill(Loss::EvictedVolatileLru, "+15550900013").await;
}

/// A Redis client without the shared key saves a contact's hash (`HGETALL`) while it holds
/// CONSENTED, lets a write of REFUSED happen, then puts the saved fields back (`DEL` +
/// `HSET`): the entry opens (it is the one sealed before, generation included), but every
/// instance knows of the write, which ended after that answer's read began, and refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_entry_does_not_roll_a_contact_back() {
    let fleet = shared_cache_fleet().await;
    let contact = "+15550900014";
    fleet.sim.set_status(contact, ConsentStatus::Consented);
    assert_eq!(source(&fleet.get(0, contact).await), local("MISS"));
    let keys = fleet.redis().keys(CONTACT_KEYS);
    assert_eq!(keys.len(), 1);
    let key = keys[0].clone();
    let saved: Vec<Vec<u8>> =
        redis::from_redis_value(fleet.redis().command(&["HGETALL", &key])).unwrap();

    assert_eq!(fleet.put(1, contact, "REFUSED").await.status, 200);
    for i in [0, 2] {
        wait_until(Duration::from_secs(2), || async {
            fleet.metric(i, APPLIED).await == 2.0
        })
        .await;
    }
    let mut replay: Vec<&[u8]> = vec![b"HSET", key.as_bytes()];
    replay.extend(saved.iter().map(Vec::as_slice));
    fleet.redis().command(&["DEL", &key]);
    fleet.redis().command(&replay);
    fleet.redis().command(&["PEXPIRE", &key, "60000"]);

    for i in [0, 2] {
        let answer = fleet.get(i, contact).await;
        assert_eq!(
            (answer.status_field(), source(&answer)),
            ("REFUSED".to_owned(), local("MISS")),
            "instance {i} was rolled back"
        );
        assert_eq!(fleet.metric(i, OUTDATED).await, 1.0, "instance {i}");
        // This instance's fill replaced the replayed entry: replayed again for the next one.
        fleet.redis().command(&["DEL", &key]);
        fleet.redis().command(&replay);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_history_with_the_shared_cache_keeps_rule_5() {
    let fleet = Fleet::start_with(3, |_, c| {
        shared_tier(c, true, false).set("talkdesk.max_retries", "0");
    })
    .await;
    // 10 s: a write's status is not stored in Redis, so the tier answers only the reads
    // between a write's first read and the next write (about 20 in 5 s).
    let run =
        randomized_history_for(Arc::new(fleet), "+1555091000", Duration::from_secs(10), 0.2).await;
    assert!(
        run.shared_hits > 20.0,
        "too few shared-tier hits to mean anything"
    );
    assert!(
        run.violations.is_empty(),
        "rule 5 violated:\n{}",
        run.violations.join("\n")
    );
}

/// A restarted instance cannot know the writes it missed (nor whether Redis lost or was given
/// back older keys meanwhile): it takes no answer read before it started. It reads each
/// contact once from upstream and replaces the answer for the fleet, which the others then
/// take from the shared tier.
/// The randomized history while the contacts' keys leave Redis at the worst moments: deleted
/// as soon as each write's outcome is announced (the vandal listens on the channel), and
/// evicted by Redis itself all along (`allkeys-lru`, junk written all the time). 0 violations;
/// what it costs (upstream GETs) is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_history_with_keys_deleted_and_evicted_keeps_rule_5() {
    let fleet = Arc::new(
        Fleet::start_with(3, |_, c| {
            shared_tier(c, true, false).set("talkdesk.max_retries", "0");
        })
        .await,
    );
    fleet.redis().limit_memory("allkeys-lru");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let vandal = std::thread::spawn({
        let (fleet, stop) = (fleet.clone(), stop.clone());
        move || {
            let mut connection = fleet.redis().admin();
            let mut listening = fleet.redis().admin();
            let mut channel = listening.as_pubsub();
            channel.subscribe("consent-proxy:consent:v1").unwrap();
            channel
                .set_read_timeout(Some(Duration::from_millis(5)))
                .unwrap();
            let junk = "x".repeat(1024);
            let (mut rounds, mut deletes) = (0, 0);
            // Each contact's hash, learnt from the field a pending write sets in it.
            let mut hashes = std::collections::HashMap::<String, String>::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let message: Option<serde_json::Value> = channel
                    .get_message()
                    .ok()
                    .and_then(|message| message.get_payload::<String>().ok())
                    .and_then(|payload| serde_json::from_str(&payload).ok());
                let mut pipe = redis::pipe();
                if let Some(message) = message {
                    let contact = message["contact"].as_str().unwrap_or_default().to_owned();
                    match message["kind"].as_str() {
                        Some("pending") => {
                            let field = format!(
                                "p:{}:{}",
                                message["from"].as_str().unwrap(),
                                message["write"]
                            );
                            let keys: Vec<String> = redis::cmd("KEYS")
                                .arg(CONTACT_KEYS)
                                .query(&mut connection)
                                .unwrap();
                            for key in keys {
                                let has: bool = redis::cmd("HEXISTS")
                                    .arg(&key)
                                    .arg(&field)
                                    .query(&mut connection)
                                    .unwrap();
                                if has {
                                    hashes.insert(contact.clone(), key);
                                }
                            }
                        }
                        Some("done") => {
                            if let Some(key) = hashes.get(&contact) {
                                pipe.cmd("DEL").arg(key).ignore();
                                deletes += 1;
                            }
                        }
                        _ => {}
                    }
                }
                for i in 0..5 {
                    pipe.cmd("SET")
                        .arg(format!("junk:{rounds}:{i}"))
                        .arg(&junk)
                        .ignore();
                }
                let () = pipe.query(&mut connection).unwrap();
                rounds += 1;
            }
            deletes
        }
    });
    // 5 % PUTs: an older answer left in Redis would live long enough after a write to be read
    // (at 20 %, the next write often drops it within the 50 ms rule 5 allows).
    let run =
        randomized_history_for(fleet.clone(), "+1555091100", Duration::from_secs(8), 0.05).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let deletes = vandal.join().unwrap();
    let evicted: String =
        redis::from_redis_value(fleet.redis().command(&["INFO", "stats"])).unwrap();
    let evicted = evicted
        .lines()
        .find(|line| line.starts_with("evicted_keys:"))
        .unwrap_or_default()
        .to_owned();
    println!("keys deleted after {deletes} writes, {evicted}");
    assert!(
        run.violations.is_empty(),
        "rule 5 violated:\n{}",
        run.violations.join("\n")
    );
    assert!(
        run.shared_hits > 5.0,
        "the tier never answered: proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_takes_no_answer_read_before_it_started_and_replaces_them() {
    let mut fleet = shared_cache_fleet().await;
    let contacts: Vec<String> = (0..20).map(|i| format!("+155509200{i:02}")).collect();
    for contact in &contacts {
        fleet.sim.set_status(contact, ConsentStatus::Deleted);
        assert_eq!(fleet.get(0, contact).await.status_field(), "DELETED");
    }
    // Instance C stops (its runtime dropped, as a process killed) and a new one takes its place.
    drop(fleet.proxies.remove(2));
    let mut config = cluster_config(&fleet.sim, &fleet.redis().url());
    shared_tier(&mut config, true, false);
    fleet.proxies.push(Instance::start(&config).await);
    fleet.wait_live([2]).await;
    fleet.sim.reset_counters();
    for contact in &contacts {
        let answer = fleet.get(2, contact).await;
        assert_eq!(
            (answer.status_field(), source(&answer)),
            ("DELETED".to_owned(), local("MISS"))
        );
    }
    assert_eq!(fleet.sim.stats().gets, 20, "each read once from upstream");
    assert_eq!(fleet.metric(2, OUTDATED).await, 20.0);
    for contact in &contacts {
        assert_eq!(source(&fleet.get(1, contact).await), shared_hit());
    }
    assert_eq!(fleet.sim.stats().gets, 20, "and replaced for the fleet");
}

/// `DELETE /admin/cache/{id}` through one instance drops the contact from the shared tier too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_purge_clears_the_shared_tier() {
    let fleet = shared_cache_fleet().await;
    time_redis_everywhere(&fleet).await;
    let contact = "+15550900004";
    fleet.sim.set_status(contact, ConsentStatus::Consented);
    fleet.get(0, contact).await;
    assert_eq!(source(&fleet.get(1, contact).await), shared_hit());
    fleet.purge(2, contact, &[1]).await;
    assert_eq!(source(&fleet.get(1, contact).await), local("MISS"));
    assert_eq!(fleet.sim.gets_for(contact), 2);
}

/// A rotation of `cluster.shared_key_file` done as documented: A still uses the old key and has
/// the new one as its second, B and C use the new one. A write through A clears the contact in
/// both keyspaces, so B and C never read the answer they stored before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_key_rotation_a_write_clears_every_keyspace() {
    const OLD: &str = "rotation-old-key-0123456789abcdef0123";
    const NEW: &str = "rotation-new-key-0123456789abcdef0123";
    let fleet = Fleet::start_with(3, |i, c| {
        let keys = if i == 0 { [OLD, NEW] } else { [NEW, OLD] };
        shared_tier_with_keys(c, true, false, &keys);
    })
    .await;
    time_redis_everywhere(&fleet).await;
    let contact = "+15550900005";
    fleet.sim.set_status(contact, ConsentStatus::Consented);
    assert_eq!(source(&fleet.get(1, contact).await), local("MISS"));
    assert_eq!(source(&fleet.get(2, contact).await), shared_hit());
    assert_eq!(fleet.put(0, contact, "REFUSED").await.status, 200);
    let id = ContactId::from_path_segment(contact).unwrap();
    fleet.proxies[1].proxy.cache.purge(&id);
    // A late heartbeat on a loaded machine would leave B unsynced (BYPASS: no cache used at
    // all, which would prove nothing here): B's feed is live again before it reads.
    fleet.wait_live([1]).await;
    let answer = fleet.get(1, contact).await;
    assert_eq!(
        (answer.status_field(), source(&answer)),
        ("REFUSED".to_owned(), local("MISS"))
    );
}

/// Redis restarts with its data (persistence, or a replica taking over) and may have lost the
/// latest writes: the instances see another run id and start a new epoch, so nothing stored
/// before is used, and nothing is stored until a pending write could have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_the_shared_tier_starts_a_new_epoch() {
    let fleet = Fleet::start_with_redis(
        start_simulator().await,
        crate::support::redis_server::RedisServer::start_persistent(),
        3,
        |_, c| {
            shared_tier(c, true, false).set("server.request_timeout_ms", "1000");
        },
    )
    .await;
    let contact = "+15550900006";
    fleet.sim.set_status(contact, ConsentStatus::Consented);
    fleet.get(0, contact).await;
    assert_eq!(source(&fleet.get(1, contact).await), shared_hit());

    fleet.redis().kill();
    fleet.redis().restart();
    fleet.wait_live(0..3).await;
    let answer = fleet.get(2, contact).await;
    assert_eq!(
        (answer.status_field(), source(&answer)),
        ("CONSENTED".to_owned(), local("MISS")),
        "an answer of the previous epoch was used"
    );
    assert_eq!(
        fleet
            .metric(
                2,
                r#"consent_proxy_shared_cache_lookups_total{result="write_pending"}"#
            )
            .await,
        1.0,
        "stores are held off"
    );
    // Once a pending write's lifetime (1 s + 1.5 s) has passed, the tier fills again. A purge
    // is a change of the contact: B takes no answer whose read began within the clocks'
    // uncertainty of it (a few ms), so A's read begins well after it.
    let id = ContactId::from_path_segment(contact).unwrap();
    wait_until(Duration::from_secs(10), || async {
        fleet.proxies[0].proxy.cache.purge(&id);
        fleet.proxies[1].proxy.cache.purge(&id);
        tokio::time::sleep(Duration::from_millis(50)).await;
        fleet.get(0, contact).await;
        source(&fleet.get(1, contact).await) == shared_hit()
    })
    .await;
}

/// Redis stops answering (`SIGSTOP`): GETs are answered from upstream, each within its
/// deadline; a fill never waits on Redis longer than `cluster.shared_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_never_fails_a_read() {
    let fleet = Fleet::start_with(3, |_, c| {
        shared_tier(c, true, false)
            .set("cluster.shared_timeout_ms", "50")
            .set("server.request_timeout_ms", "2000");
    })
    .await;
    let contacts: Vec<String> = (0..30).map(|i| format!("+155509300{i:02}")).collect();
    for contact in &contacts {
        fleet.sim.set_status(contact, ConsentStatus::Consented);
    }
    fleet.redis().freeze();
    for (n, contact) in contacts.iter().enumerate() {
        let answer = fleet.get(n % 3, contact).await;
        assert_eq!(
            (answer.status, answer.status_field()),
            (200, "CONSENTED".to_owned()),
            "{}",
            answer.text()
        );
    }
    let mut unavailable = 0.0;
    for i in 0..3 {
        unavailable += fleet
            .metric(
                i,
                r#"consent_proxy_shared_cache_lookups_total{result="unavailable"}"#,
            )
            .await;
    }
    assert!(unavailable >= 1.0, "no fill met the frozen Redis");
    fleet.redis().thaw();
}

// ---------------------------------------------------------------------------------------------
// The shared token

/// A simulator issuing tokens that live `ttl`, with the contacts `contact(0..n)` CONSENTED.
async fn simulator_with_token_ttl(ttl: Duration, contacts: usize) -> Simulator {
    let sim = Simulator::start(
        "127.0.0.1:0".parse().unwrap(),
        SimulatorConfig {
            token_ttl: ttl,
            ..sim_config()
        },
    )
    .await
    .expect("simulator starts");
    for i in 0..contacts {
        sim.set_status(&contact(i), ConsentStatus::Consented);
    }
    sim
}

fn contact(i: usize) -> String {
    format!("+15550940{i:03}")
}

/// Three instances sharing the token, without a cache (every GET goes upstream with it).
async fn shared_token_fleet(sim: Simulator) -> Fleet {
    Fleet::start_on(sim, 3, |_, c| {
        shared_tier(c, false, true)
            .set("cache.enabled", "false")
            .set("token.refresh_margin_s", "1");
    })
    .await
}

/// GETs through the instances in turn, one every 30 ms, until `until`; every one must be a 200.
async fn steady_traffic(fleet: &Fleet, until: Instant) -> usize {
    let mut ticks = tokio::time::interval(Duration::from_millis(30));
    let mut sent = 0;
    while Instant::now() < until {
        ticks.tick().await;
        let answer = fleet.get(sent % 3, &contact(sent % 5)).await;
        assert_eq!(answer.status, 200, "request {sent}: {}", answer.text());
        sent += 1;
    }
    sent
}

async fn total(fleet: &Fleet, sample: &str) -> f64 {
    let mut sum = 0.0;
    for i in 0..fleet.proxies.len() {
        sum += fleet.metric(i, sample).await;
    }
    sum
}

/// Tokens of 3 s, renewed 1 s before their end: over 9 s the fleet fetches one every 2 s (and
/// the first), not one per instance; none is ever used expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_fetches_one_token_per_lifetime_and_renews_it_before_it_expires() {
    let sim = simulator_with_token_ttl(Duration::from_secs(3), 5).await;
    let fleet = shared_token_fleet(sim).await;
    let started = Instant::now();
    let sent = steady_traffic(&fleet, started + Duration::from_secs(9)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let stats = fleet.sim.stats();
    println!("{sent} GETs in {elapsed:.1} s over 3 instances: {stats:?}");
    assert_eq!(stats.expired_token_uses, 0, "{stats:?}");
    assert_eq!(stats.unauthorized, 0, "{stats:?}");
    // One per renewal period (2 s) since the first, plus the first; each instance alone would
    // fetch three times as many.
    let per_period = (elapsed / 2.0).ceil() as u64 + 1;
    assert!(
        (per_period.saturating_sub(2)..=per_period + 1).contains(&stats.tokens_issued),
        "expected about {per_period} tokens for the fleet, issued {}",
        stats.tokens_issued
    );
    assert_eq!(stats.token_requests, stats.tokens_issued, "{stats:?}");
    wait_until(Duration::from_secs(3), || async {
        total(&fleet, FETCHED).await == fleet.sim.stats().tokens_issued as f64
    })
    .await;
    for i in 0..3 {
        assert!(
            fleet
                .metric(
                    i,
                    r#"consent_proxy_shared_token_obtained_total{source="fleet"}"#
                )
                .await
                >= 1.0,
            "instance {i} never used the fleet's token"
        );
    }
}

/// The simulator decides each answer on arrival and answers after its latency: with 400 ms,
/// all 30 first attempts take one of the 30 queued 401s before the first 401 reaches a proxy,
/// so every retry meets a renewed token. The three instances renew once between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_401s_across_the_fleet_renews_the_token_once() {
    let sim = simulator_with_token_ttl(Duration::from_secs(600), 30).await;
    let fleet = Arc::new(shared_token_fleet(sim).await);
    let before = fleet.sim.stats();
    assert_eq!(
        before.tokens_issued, 1,
        "one token for the fleet: {before:?}"
    );

    fleet.sim.set_latency(Duration::from_millis(400));
    fleet.sim.inject(SimRoute::Get, Fault::Unauthorized, 30);
    let answers = join_all((0..30).map(|i| {
        let fleet = fleet.clone();
        async move { fleet.get(i % 3, &contact(i)).await }
    }))
    .await;
    let stats = fleet.sim.stats();
    assert_eq!(
        stats.unauthorized, 30,
        "the 401s were not all taken by first attempts (machine too slow?): {stats:?}"
    );
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(
        stats.token_requests,
        before.token_requests + 1,
        "one renewal for the fleet: {stats:?}"
    );
    assert_eq!(
        total(
            &fleet,
            r#"consent_proxy_token_upstream_rejections_total{outcome="renewed"}"#
        )
        .await,
        3.0,
        "each instance dropped the rejected token"
    );
}

/// Redis killed: each instance fetches a token of its own when its token is due, and every GET
/// is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_each_instance_fetches_its_own_token_and_keeps_serving() {
    let sim = simulator_with_token_ttl(Duration::from_secs(3), 5).await;
    let fleet = shared_token_fleet(sim).await;
    let before = fleet.sim.stats();
    fleet.redis().kill();
    let sent = steady_traffic(&fleet, Instant::now() + Duration::from_secs(5)).await;
    let stats = fleet.sim.stats();
    println!("Redis down: {sent} GETs answered; {stats:?}");
    assert_eq!(stats.expired_token_uses, 0, "{stats:?}");
    for i in 0..3 {
        assert!(
            fleet
                .metric(
                    i,
                    r#"consent_proxy_shared_token_obtained_total{source="alone"}"#
                )
                .await
                >= 1.0,
            "instance {i} did not fetch its own token"
        );
    }
    assert!(
        stats.tokens_issued >= before.tokens_issued + 3,
        "each instance renews for itself: {stats:?}"
    );
}
