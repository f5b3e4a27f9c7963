//! A cluster in one test process: a simulator, a real `redis-server` and in-process proxies,
//! each on a runtime of its own, with helpers to talk to each instance.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::Simulator;
use consent_proxy::{App, AppHandle};
use tokio::time::Instant;

use super::history::{cluster_violations, gets, lost_writes, random_upstream_delays, RandomClient};
use super::redis_server::RedisServer;
use super::{start_simulator, wait_until, ProxyClient, ProxyConfig, TestClient, TestResponse};

/// `cluster.max_staleness_ms` in these tests.
pub const MAX_STALENESS: Duration = Duration::from_millis(400);
/// The bound for a healthy cluster (rule 5 of docs/CONSISTENCY.md).
pub const RULE_5_LAG: Duration = Duration::from_millis(50);
/// The secret of the cluster's shared tier in these tests (the same for every instance).
const SHARED_KEY: &str = "shared-tier-test-key-0123456789abcdef";

/// A simulator, a Redis and proxies pointed at both.
pub struct Fleet {
    pub sim: Simulator,
    /// Locked only to kill, freeze or restart it.
    pub redis: std::sync::Mutex<RedisServer>,
    pub proxies: Vec<Instance>,
    pub http: TestClient,
}

/// One proxy on a runtime of its own (one worker thread), as if in a process of its own: on a
/// runtime shared by all the instances of a test, a chain of one instance's tasks can hold
/// another's feed task back for a millisecond or more, which separate processes never see.
pub struct Instance {
    pub proxy: AppHandle,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Instance {
    pub async fn start(config: &ProxyConfig) -> Instance {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let settings = config.settings();
        let proxy = runtime
            .spawn(async move { App::start(settings).await.expect("proxy starts") })
            .await
            .expect("start task");
        Instance {
            proxy,
            runtime: Some(runtime),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The cluster keys every test uses; `redis_url` is the instance's way to Redis.
pub fn cluster_config(sim: &Simulator, redis_url: &str) -> ProxyConfig {
    let mut config = ProxyConfig::for_simulator(sim);
    config
        .clustered(redis_url)
        .set(
            "cluster.max_staleness_ms",
            &MAX_STALENESS.as_millis().to_string(),
        )
        .set("log.level", "\"warn\"");
    config
}

/// Turns the shared tier on in `config`: the shared cache, the fleet token, or both, with the
/// tests' key and a Redis bound generous enough for a loaded test machine (the tests that are
/// about a slow Redis set their own).
pub fn shared_tier(config: &mut ProxyConfig, cache: bool, token: bool) -> &mut ProxyConfig {
    shared_tier_with_keys(config, cache, token, &[SHARED_KEY])
}

/// As [`shared_tier`], with these keys in `cluster.shared_key_file` (the first in use).
pub fn shared_tier_with_keys<'a>(
    config: &'a mut ProxyConfig,
    cache: bool,
    token: bool,
    keys: &[&str],
) -> &'a mut ProxyConfig {
    let content = keys.join("\n");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let key_file = dir.join(format!("shared-tier-keys-{:x}", fnv1a(content.as_bytes())));
    if std::fs::read_to_string(&key_file).ok() != Some(content.clone()) {
        // Written aside and renamed: a test reading it meanwhile never sees it half written.
        let aside = dir.join(format!("shared-tier-keys.{}", rand::random::<u64>()));
        std::fs::write(&aside, &content).expect("write the shared keys");
        std::fs::rename(&aside, &key_file).expect("move the shared keys in place");
    }
    config
        .set("cluster.shared_cache", &cache.to_string())
        .set("cluster.shared_token", &token.to_string())
        .set_str("cluster.shared_key_file", &key_file.display().to_string())
        .set("cluster.shared_timeout_ms", "250")
}

/// A stable name for a key file's content.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The race of a fill and a write on two instances: `contact` is CONSENTED upstream; a GET
/// through `reader` reaches upstream and reads it, but its answer is held back (600 ms); while
/// it is, a PUT of REFUSED through `writer` returns 200. Returns the slow GET, still in flight.
pub async fn slow_fill_then_write(
    fleet: &Arc<Fleet>,
    contact: &'static str,
    reader: usize,
    writer: usize,
) -> tokio::task::JoinHandle<TestResponse> {
    slow_fill_then_write_holding(fleet, contact, reader, writer, Duration::from_millis(600)).await
}

/// As [`slow_fill_then_write`], the fill's answer held back for `hold`.
pub async fn slow_fill_then_write_holding(
    fleet: &Arc<Fleet>,
    contact: &'static str,
    reader: usize,
    writer: usize,
    hold: Duration,
) -> tokio::task::JoinHandle<TestResponse> {
    fleet.sim.set_status(contact, ConsentStatus::Consented);
    fleet.sim.delay_next_get(contact, hold, 1);
    let slow_read = tokio::spawn({
        let fleet = fleet.clone();
        async move { fleet.get(reader, contact).await }
    });
    // The slow fill has reached upstream and read CONSENTED.
    wait_until(Duration::from_secs(5), || async {
        fleet.sim.gets_for(contact) == 1
    })
    .await;
    let write = fleet.put(writer, contact, "REFUSED").await;
    assert_eq!(write.status, 200, "{}", write.text());
    assert!(!slow_read.is_finished(), "the fill must still be in flight");
    slow_read
}

/// What a [`randomized_history`] run saw.
pub struct HistoryRun {
    pub violations: Vec<String>,
    /// Acknowledged writes upstream does not reflect at the end ([`lost_writes`]).
    pub lost_writes: Vec<String>,
    /// When each PUT refused with 503 `cluster_unavailable` started.
    pub refused_puts: Vec<Instant>,
    /// When each GET answered `BYPASS` (the cache not trusted) started.
    pub bypassed_gets: Vec<Instant>,
    /// Hits of the instances' own caches.
    pub local_hits: f64,
    /// Hits of the shared tier (0 without it).
    pub shared_hits: f64,
}

/// Rule 5 over a randomized history on three instances: six clients on random instances, 20 %
/// PUTs, three contacts `{prefix}0..2` starting `NO_CONSENT`, random upstream delays, for 5 s.
pub async fn randomized_history(fleet: Arc<Fleet>, prefix: &str) -> HistoryRun {
    randomized_history_across(fleet, prefix, Duration::from_secs(5), RULE_5_LAG).await
}

/// As [`randomized_history`], for `run_for`, with rule 5 checked at `lag` (a fault the caller
/// causes meanwhile allows `max_staleness_ms`).
pub async fn randomized_history_across(
    fleet: Arc<Fleet>,
    prefix: &str,
    run_for: Duration,
    lag: Duration,
) -> HistoryRun {
    randomized_history_with(fleet, prefix, run_for, lag, 0.2).await
}

/// As [`randomized_history`], for `run_for`, with `put_share` of the operations PUTs.
pub async fn randomized_history_for(
    fleet: Arc<Fleet>,
    prefix: &str,
    run_for: Duration,
    put_share: f64,
) -> HistoryRun {
    randomized_history_with(fleet, prefix, run_for, RULE_5_LAG, put_share).await
}

async fn randomized_history_with(
    fleet: Arc<Fleet>,
    prefix: &str,
    run_for: Duration,
    lag: Duration,
    put_share: f64,
) -> HistoryRun {
    const CONTACTS: usize = 3;
    const INITIAL: &str = "NO_CONSENT";
    let contacts: Vec<String> = (0..CONTACTS).map(|i| format!("{prefix}{i}")).collect();
    for contact in &contacts {
        fleet.sim.set_status(contact, ConsentStatus::NoConsent);
    }
    let refused_puts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let bypassed_gets = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    let delays = tokio::spawn({
        let fleet = fleet.clone();
        let contacts = contacts.clone();
        async move { random_upstream_delays(&fleet.sim, &contacts, started + run_for).await }
    });
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let fleet = fleet.clone();
            let contacts = contacts.clone();
            let (refused_puts, bypassed_gets) = (refused_puts.clone(), bypassed_gets.clone());
            tokio::spawn(async move {
                let (fleet, contacts) = (&fleet, &contacts);
                let (refused_puts, bypassed_gets) = (&refused_puts, &bypassed_gets);
                RandomClient {
                    until: started + run_for,
                    contacts: CONTACTS,
                    instances: 3,
                    put_share,
                    pause_ms: 0..0,
                }
                .run(
                    |via, contact| async move {
                        let start = Instant::now();
                        let answer = fleet.get(via, &contacts[contact]).await;
                        if answer.header("x-cache-status") == Some("BYPASS") {
                            bypassed_gets.lock().unwrap().push(start);
                        }
                        answer
                    },
                    |via, contact, status| async move {
                        let start = Instant::now();
                        let answer = fleet.put(via, &contacts[contact], status).await;
                        if answer.status == 503 && answer.code() == "cluster_unavailable" {
                            refused_puts.lock().unwrap().push(start);
                        }
                        answer
                    },
                )
                .await
            })
        })
        .collect();
    let mut history = Vec::new();
    for client in clients {
        history.extend(client.await.expect("client"));
    }
    delays.await.expect("delays");
    let (mut local_hits, mut shared_hits) = (0.0, 0.0);
    for i in 0..3 {
        local_hits += fleet
            .metric(i, r#"consent_proxy_cache_lookups_total{result="hit"}"#)
            .await;
        shared_hits += fleet
            .metric(
                i,
                r#"consent_proxy_shared_cache_lookups_total{result="hit"}"#,
            )
            .await;
    }
    let gets = gets(&history);
    let puts = history.len() - gets;
    let violations = cluster_violations(&history, INITIAL, lag);
    let upstream: Vec<(usize, String)> = contacts
        .iter()
        .enumerate()
        .filter_map(|(i, contact)| Some((i, fleet.sim.stored_status(contact)?.as_str().to_owned())))
        .collect();
    let lost_writes = lost_writes(&history, INITIAL, &upstream);
    println!(
        "history: {} operations ({gets} GETs, {puts} PUTs, {local_hits} local hits, \
         {shared_hits} shared-tier hits, {} upstream GETs) over 3 instances, {} violations at \
         {lag:?}, {} lost writes",
        history.len(),
        fleet.sim.stats().gets,
        violations.len(),
        lost_writes.len()
    );
    assert!(
        gets > 200 && puts > 40,
        "too little traffic to mean anything"
    );
    let taken =
        |times: Arc<std::sync::Mutex<Vec<Instant>>>| std::mem::take(&mut *times.lock().unwrap());
    HistoryRun {
        violations,
        lost_writes,
        refused_puts: taken(refused_puts),
        bypassed_gets: taken(bypassed_gets),
        local_hits,
        shared_hits,
    }
}

impl Fleet {
    pub async fn start(instances: usize) -> Fleet {
        Self::start_with(instances, |_, _| {}).await
    }

    /// `configure(i, config)` adjusts instance `i`'s configuration.
    pub async fn start_with(
        instances: usize,
        configure: impl Fn(usize, &mut ProxyConfig),
    ) -> Fleet {
        Self::start_on(start_simulator().await, instances, configure).await
    }

    /// As [`Self::start_with`], in front of `sim`.
    pub async fn start_on(
        sim: Simulator,
        instances: usize,
        configure: impl Fn(usize, &mut ProxyConfig),
    ) -> Fleet {
        Self::start_with_redis(sim, RedisServer::start(), instances, configure).await
    }

    /// As [`Self::start_on`], with this Redis.
    pub async fn start_with_redis(
        sim: Simulator,
        redis: RedisServer,
        instances: usize,
        configure: impl Fn(usize, &mut ProxyConfig),
    ) -> Fleet {
        let mut proxies = Vec::new();
        for i in 0..instances {
            let mut config = cluster_config(&sim, &redis.url());
            configure(i, &mut config);
            proxies.push(Instance::start(&config).await);
        }
        Self::of(sim, redis, proxies).await
    }

    /// The fleet of these instances, once each is ready with its feed live (for tests that
    /// start their instances themselves, e.g. some behind a relay).
    pub async fn of(sim: Simulator, redis: RedisServer, proxies: Vec<Instance>) -> Fleet {
        let fleet = Fleet {
            sim,
            redis: std::sync::Mutex::new(redis),
            proxies,
            http: TestClient::new(),
        };
        fleet.wait_live(0..fleet.proxies.len()).await;
        fleet
    }

    pub fn redis(&self) -> std::sync::MutexGuard<'_, RedisServer> {
        self.redis.lock().unwrap()
    }

    /// Instance `i` as a test client talks to it.
    pub fn client(&self, i: usize) -> ProxyClient<'_> {
        ProxyClient {
            http: &self.http,
            proxy: &self.proxies[i].proxy,
        }
    }

    pub fn url(&self, i: usize, contact: &str) -> String {
        self.client(i).consent_url(contact)
    }

    pub async fn get(&self, i: usize, contact: &str) -> TestResponse {
        self.client(i).get(contact).await
    }

    pub async fn put(&self, i: usize, contact: &str, status: &str) -> TestResponse {
        self.client(i).put(contact, status).await
    }

    pub async fn admin(&self, i: usize, path: &str) -> TestResponse {
        self.client(i).admin(path).await
    }

    pub async fn metric(&self, i: usize, sample: &str) -> f64 {
        self.client(i).metric(sample).await
    }

    /// `/readyz`'s status and the feed's state in it (`live` or `down`).
    pub async fn feed(&self, i: usize) -> (u16, String) {
        let ready = self.admin(i, "/readyz").await;
        let feed = ready.json()["cluster"]["feed"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (ready.status, feed)
    }

    /// Waits (bounded) until these instances are ready with their feed live.
    pub async fn wait_live(&self, instances: impl IntoIterator<Item = usize>) {
        for i in instances {
            wait_until(Duration::from_secs(20), || async {
                self.feed(i).await == (200, "live".to_owned())
            })
            .await;
        }
    }

    /// `DELETE /admin/cache/{contact}` through instance `via` (with the admin key), then waits
    /// until each of `others` has applied its announcement.
    pub async fn purge(&self, via: usize, contact: &str, others: &[usize]) {
        let purged = self.client(via).purge(contact).await;
        assert_eq!(purged.status, 204);
        for &i in others {
            wait_until(Duration::from_secs(2), || async {
                self.metric(
                    i,
                    r#"consent_proxy_cache_invalidations_total{reason="purge"}"#,
                )
                .await
                    == 1.0
            })
            .await;
        }
    }

    /// Reads `contact` through every instance until each answers it from its cache.
    pub async fn cache_everywhere(&self, contact: &str, expected: &str) {
        for i in 0..self.proxies.len() {
            wait_until(Duration::from_secs(5), || async {
                let response = self.get(i, contact).await;
                assert_eq!(response.status_field(), expected, "instance {i}");
                response.header("x-cache-status") == Some("HIT")
            })
            .await;
        }
    }
}
