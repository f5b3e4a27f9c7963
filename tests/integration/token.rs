//! The shared OAuth token, end to end over real sockets (proxy and simulator in-process, on
//! port 0): one fetch for a cold burst, renewal before expiry, one renewal for a burst of
//! upstream 401s, fail-fast while the token endpoint is down and recovery without a restart,
//! malformed token answers, and the same 401 handling for PUT. How the token is asked for
//! (HTTP Basic or form credentials, the configured scopes, against a stub token endpoint that
//! records every request) and what a refused or hanging token endpoint means for callers.

use std::convert::Infallible;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::support::calls::{assert_proxy_error, assert_upstream_untouched, basic};
use crate::support::*;
use bytes::Bytes;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute, Simulator, SimulatorConfig};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

const FETCH_OK: &str = r#"consent_proxy_token_fetches_total{result="success"}"#;
const FETCH_FAILED: &str = r#"consent_proxy_token_fetches_total{result="failure"}"#;
const RENEWED: &str = r#"consent_proxy_token_upstream_rejections_total{outcome="renewed"}"#;
const REJECTED_AGAIN: &str =
    r#"consent_proxy_token_upstream_rejections_total{outcome="rejected_again"}"#;
const EXPIRY: &str = "consent_proxy_token_expiry_timestamp_seconds";

/// How fast a `token_unavailable` answer must come (the contract says "within 1 s"; the
/// proxy fails fast while backing off, so it is far quicker than `request_timeout_ms`).
const FAIL_FAST: Duration = Duration::from_millis(500);

fn contact(i: usize) -> String {
    format!("+1555{i:07}")
}

async fn simulator_with(configure: impl FnOnce(&mut SimulatorConfig)) -> Simulator {
    let mut config = sim_config();
    configure(&mut config);
    Simulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .expect("simulator starts")
}

/// A proxy (configured by `configure`) in front of an already prepared simulator.
async fn harness_for(sim: &Simulator, configure: impl FnOnce(&mut ProxyConfig)) -> Harness {
    let mut config = ProxyConfig::for_simulator(sim);
    configure(&mut config);
    let proxy = config.start().await;
    Harness {
        sim: sim.clone(),
        proxy,
        http: TestClient::new(),
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn no_cache(config: &mut ProxyConfig) {
    config.set("cache.enabled", "false");
}

/// Sends `n` GETs at once (contact `contact(i)` for the i-th) and returns the answers in order.
async fn concurrent_gets(h: &Arc<Harness>, n: usize) -> Vec<TestResponse> {
    let mut set = JoinSet::new();
    for i in 0..n {
        let h = h.clone();
        set.spawn(async move { (i, h.get(&contact(i)).await) });
    }
    let mut answers: Vec<Option<TestResponse>> = vec![None; n];
    while let Some(joined) = set.join_next().await {
        let (i, answer) = joined.expect("request task");
        answers[i] = Some(answer);
    }
    answers.into_iter().map(Option::unwrap).collect()
}

fn assert_all_consented(answers: &[TestResponse]) {
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(
            answer.status,
            200,
            "request {i} ({}) answered {}: {}",
            contact(i),
            answer.status,
            answer.text()
        );
        assert_eq!(answer.status_field(), "CONSENTED", "request {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_burst_of_200_requests_causes_exactly_one_token_fetch() {
    let sim = start_simulator().await;
    for i in 0..200 {
        sim.set_status(&contact(i), ConsentStatus::Consented);
    }
    // The first token answer is held back a little so that the whole burst arrives while
    // that one fetch is in flight (it still comes well within the 1 s a request waits).
    sim.inject(SimRoute::Token, Fault::Delay(Duration::from_millis(200)), 1);
    // Fire at once: no waiting for readiness.
    let h = Arc::new(harness_for(&sim, |_| {}).await);
    let answers = concurrent_gets(&h, 200).await;

    assert_all_consented(&answers);
    let stats = h.sim.stats();
    assert_eq!(stats.token_requests, 1, "{stats:?}");
    assert_eq!(stats.tokens_issued, 1, "{stats:?}");
    assert_eq!(stats.gets, 200, "{stats:?}");
    assert_eq!(stats.unauthorized, 0, "{stats:?}");
    assert_eq!(h.metric(FETCH_OK).await, 1.0);
    assert_eq!(h.metric(FETCH_FAILED).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_renewed_before_they_expire() {
    let sim = simulator_with(|c| c.token_ttl = Duration::from_secs(2)).await;
    for i in 0..4 {
        sim.set_status(&contact(i), ConsentStatus::Consented);
    }
    let h = harness_for(&sim, no_cache).await;
    h.wait_ready().await;

    // A steady trickle for 10 s, every request going upstream (no cache).
    let mut ticks = tokio::time::interval(Duration::from_millis(50));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(10) {
        ticks.tick().await;
        let answer = h.get(&contact(sent % 4)).await;
        assert_eq!(
            answer.status,
            200,
            "request {sent}, {:?} in: {}",
            started.elapsed(),
            answer.text()
        );
        sent += 1;
    }

    let stats = h.sim.stats();
    assert!(sent >= 100, "only {sent} requests were sent");
    assert_eq!(stats.gets, sent as u64, "{stats:?}");
    assert_eq!(
        stats.expired_token_uses, 0,
        "an expired token was sent: {stats:?}"
    );
    assert_eq!(stats.unauthorized, 0, "{stats:?}");
    // 2 s tokens renewed at half-life give about ten in 10 s; renewing only on expiry (or
    // at the usable limit, 1.5 s) would give at most 7.
    assert!(stats.tokens_issued >= 8, "too few renewals: {stats:?}");
    assert_eq!(stats.token_requests, stats.tokens_issued, "{stats:?}");
    // A renewal may be in flight between the two reads: compare once both sides agree.
    wait_until(Duration::from_secs(3), || async {
        let before = h.sim.stats().tokens_issued;
        let fetched = h.metric(FETCH_OK).await;
        before == h.sim.stats().tokens_issued && fetched == before as f64
    })
    .await;
    assert_eq!(h.metric(FETCH_FAILED).await, 0.0);
    assert_eq!(h.metric(RENEWED).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_background_renewal_does_not_disturb_requests() {
    let sim = simulator_with(|c| c.token_ttl = Duration::from_secs(4)).await;
    sim.set_status("+15550000006", ConsentStatus::Consented);
    let h = harness_for(&sim, no_cache).await;
    h.wait_ready().await;
    let expiry = h.metric(EXPIRY).await;
    assert!(expiry > unix_now(), "expiry gauge {expiry}");

    // The renewal due at half-life (2 s) fails once; its retry (125-250 ms later) succeeds,
    // still well before the old token stops being usable (3 s).
    h.sim.inject(SimRoute::Token, Fault::Status500, 1);
    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(25));
    while h.metric(FETCH_OK).await < 2.0 {
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "no renewal: {:?}",
            h.sim.stats()
        );
        ticks.tick().await;
        let answer = h.get("+15550000006").await;
        assert_eq!(
            answer.status,
            200,
            "{:?} in: {}",
            started.elapsed(),
            answer.text()
        );
    }
    assert_eq!(h.metric(FETCH_FAILED).await, 1.0);
    let stats = h.sim.stats();
    assert_eq!(stats.token_requests, 3, "{stats:?}");
    assert_eq!(stats.unauthorized, 0, "{stats:?}");
    assert!(
        h.metric(EXPIRY).await > expiry,
        "the gauge follows the new token"
    );
    let ready = h.admin("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
}

#[tokio::test]
async fn one_upstream_401_renews_the_token_and_retries_once() {
    let h = Harness::start().await;
    h.sim.set_status("+15550000001", ConsentStatus::Consented);
    h.wait_ready().await;
    let before = h.sim.stats();
    assert_eq!(before.token_requests, 1);

    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 1);
    let answer = h.get("+15550000001").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.status_field(), "CONSENTED");

    let after = h.sim.stats();
    assert_eq!(after.token_requests, before.token_requests + 1, "{after:?}");
    assert_eq!(after.tokens_issued, before.tokens_issued + 1, "{after:?}");
    assert_eq!(after.gets, before.gets + 2, "{after:?}");
    assert_eq!(after.unauthorized, before.unauthorized + 1, "{after:?}");
    assert_eq!(h.metric(RENEWED).await, 1.0);
    assert_eq!(h.metric(REJECTED_AGAIN).await, 0.0);
    assert_eq!(h.metric(FETCH_OK).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_401s_causes_exactly_one_renewal() {
    let h = Arc::new(Harness::start_with(no_cache).await);
    for i in 0..50 {
        h.sim.set_status(&contact(i), ConsentStatus::Consented);
    }
    h.wait_ready().await;
    assert_eq!(h.sim.stats().token_requests, 1);

    // The simulator decides each answer on arrival and answers after its latency: with
    // 400 ms, all 50 first attempts take one of the 50 queued 401s before the first 401
    // reaches the proxy, so no retry can take one (each retry must then succeed).
    h.sim.set_latency(Duration::from_millis(400));
    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 50);
    let answers = concurrent_gets(&h, 50).await;

    let stats = h.sim.stats();
    assert_eq!(
        stats.unauthorized, 50,
        "the 401s were not all taken by first attempts (machine too slow?): {stats:?}"
    );
    assert_all_consented(&answers);
    assert_eq!(stats.token_requests, 2, "{stats:?}");
    assert_eq!(stats.gets, 100, "{stats:?}");
    assert_eq!(h.metric(RENEWED).await, 1.0);
    assert_eq!(h.metric(REJECTED_AGAIN).await, 0.0);
}

#[tokio::test]
async fn a_renewed_token_rejected_again_is_a_502() {
    let h = Harness::start_with(no_cache).await;
    h.sim.set_status("+15550000002", ConsentStatus::Consented);
    h.wait_ready().await;
    let before = h.sim.stats();

    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 2);
    let answer = h.get("+15550000002").await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_eq!(answer.code(), "upstream_error");

    let after = h.sim.stats();
    assert_eq!(after.gets, before.gets + 2, "one retry only: {after:?}");
    assert_eq!(after.token_requests, before.token_requests + 1, "{after:?}");
    assert_eq!(h.metric(RENEWED).await, 1.0);
    assert_eq!(h.metric(REJECTED_AGAIN).await, 1.0);

    // The renewed token is kept: the next request uses it without another fetch.
    let answer = h.get("+15550000002").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(h.sim.stats().token_requests, after.token_requests);
}

#[tokio::test]
async fn put_gets_the_same_401_renewal_and_retry() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let before = h.sim.stats();

    h.sim.inject(SimRoute::Put, Fault::Unauthorized, 1);
    let answer = h.put("+15550000003", "REFUSED").await;
    assert_eq!(answer.status, 201, "{}", answer.text());
    assert_eq!(
        h.sim.stored_status("+15550000003"),
        Some(ConsentStatus::Refused)
    );

    let after = h.sim.stats();
    assert_eq!(after.puts, before.puts + 2, "{after:?}");
    assert_eq!(after.token_requests, before.token_requests + 1, "{after:?}");
    assert_eq!(h.metric(RENEWED).await, 1.0);
    let get = h.get("+15550000003").await;
    assert_eq!(get.status, 200);
    assert_eq!(get.status_field(), "REFUSED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_down_fails_fast_then_recovers_without_restart() {
    let sim = start_simulator().await;
    sim.set_status("+15550000004", ConsentStatus::Consented);
    // Down from the start, for as long as the test wants.
    sim.inject(SimRoute::Token, Fault::Status500, 1_000_000);
    let h = Arc::new(
        harness_for(&sim, |c| {
            c.set("server.request_timeout_ms", "10000");
        })
        .await,
    );
    wait_until(Duration::from_secs(5), || async {
        h.metric(FETCH_FAILED).await >= 1.0
    })
    .await;

    let ready = h.admin("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(ready.json()["status"], "not_ready");
    let reason = ready.json()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("token"), "reason: {reason:?}");

    // One by one, then 20 at once: each answered 503 token_unavailable, fast.
    for _ in 0..3 {
        let started = Instant::now();
        let answer = h.get("+15550000004").await;
        let took = started.elapsed();
        assert_eq!(answer.status, 503, "{}", answer.text());
        assert_eq!(answer.code(), "token_unavailable");
        assert!(took < FAIL_FAST, "token_unavailable took {took:?}");
    }
    let mut set = JoinSet::new();
    for _ in 0..20 {
        let h = h.clone();
        set.spawn(async move {
            let started = Instant::now();
            let answer = h.get("+15550000004").await;
            (answer, started.elapsed())
        });
    }
    while let Some(joined) = set.join_next().await {
        let (answer, took) = joined.expect("request task");
        assert_eq!(answer.status, 503, "{}", answer.text());
        assert_eq!(answer.code(), "token_unavailable");
        assert!(took < FAIL_FAST, "token_unavailable took {took:?}");
    }
    assert_eq!(
        h.sim.stats().gets,
        0,
        "nothing may reach the consent API without a token"
    );
    assert_eq!(h.metric(EXPIRY).await, 0.0, "no token is held");
    // The refresher backs off instead of hammering the endpoint (250 ms, doubling).
    let fetches = h.sim.stats().token_requests;
    assert!(
        fetches < 10,
        "{fetches} token requests in the test's first moments"
    );
    wait_until(Duration::from_secs(5), || async {
        h.admin("/readyz").await.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("500"))
    })
    .await;

    // The endpoint recovers: the same proxy becomes ready and serves.
    h.sim.clear_faults();
    wait_until(Duration::from_secs(10), || async {
        h.admin("/readyz").await.status == 200
    })
    .await;
    let answer = h.get("+15550000004").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.status_field(), "CONSENTED");
    assert_eq!(h.metric(FETCH_OK).await, 1.0);
    assert!(h.metric(FETCH_FAILED).await >= 1.0);
    assert!(h.metric(EXPIRY).await > unix_now() + 60.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_token_answers_count_as_failures_and_the_proxy_recovers() {
    let logs = captured_logs();
    let h = Harness::start_with(no_cache).await;
    h.sim.set_status("+15550000005", ConsentStatus::Consented);
    h.wait_ready().await;

    let cases: [(&str, &str, Option<&str>); 4] = [
        (
            "not JSON",
            "this is not json MALFORMED-TOKEN-notjson",
            Some("MALFORMED-TOKEN-notjson"),
        ),
        (
            "no access_token",
            r#"{"token_type":"Bearer","expires_in":600}"#,
            None,
        ),
        (
            "expires_in 0",
            r#"{"access_token":"MALFORMED-TOKEN-zero","token_type":"Bearer","expires_in":0}"#,
            Some("MALFORMED-TOKEN-zero"),
        ),
        (
            "no expires_in",
            r#"{"access_token":"MALFORMED-TOKEN-noexp","token_type":"Bearer"}"#,
            Some("MALFORMED-TOKEN-noexp"),
        ),
    ];
    for (round, (kind, body, _)) in cases.iter().enumerate() {
        let failures_before = h.metric(FETCH_FAILED).await;
        let successes_before = h.metric(FETCH_OK).await;
        let token_requests_before = h.sim.stats().token_requests;

        // Force a renewal (upstream 401) and make its answer the malformed one.
        h.sim.inject(
            SimRoute::Token,
            Fault::Respond {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                body: Bytes::from_static(body.as_bytes()),
            },
            1,
        );
        h.sim.inject(SimRoute::Get, Fault::Unauthorized, 1);
        let started = Instant::now();
        let answer = h.get("+15550000005").await;
        assert_eq!(answer.status, 503, "{kind}: {}", answer.text());
        assert_eq!(answer.code(), "token_unavailable", "{kind}");
        assert!(
            started.elapsed() < FAIL_FAST,
            "{kind}: {:?}",
            started.elapsed()
        );
        assert_eq!(
            h.metric(FETCH_FAILED).await,
            failures_before + 1.0,
            "{kind}"
        );
        assert_eq!(
            h.metric(EXPIRY).await,
            0.0,
            "{kind}: the rejected token is gone"
        );

        // The next (good) answer after the back-off restores service, no restart.
        wait_until(Duration::from_secs(5), || async {
            h.admin("/readyz").await.status == 200
        })
        .await;
        let answer = h.get("+15550000005").await;
        assert_eq!(
            answer.status,
            200,
            "{kind} (round {round}): {}",
            answer.text()
        );
        assert_eq!(h.metric(FETCH_OK).await, successes_before + 1.0, "{kind}");
        assert!(h.metric(EXPIRY).await > unix_now() + 60.0, "{kind}");
        assert_eq!(
            h.metric(FETCH_FAILED).await,
            failures_before + 1.0,
            "{kind}"
        );
        assert_eq!(
            h.sim.stats().token_requests,
            token_requests_before + 2,
            "{kind}: one bad fetch, one good"
        );
    }

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.contains("token fetch failed"),
        "log capture did not work; captured:\n{logs}"
    );
    for (kind, _, secret) in cases {
        if let Some(secret) = secret {
            assert!(
                !logs.contains(secret),
                "{kind}: the token endpoint's body leaked into the logs"
            );
        }
    }
}

/// Dropping the last handle stops the refresher at once, even while it sleeps until the
/// next renewal (minutes away with the simulator's 600 s tokens): it must not keep the
/// manager's state alive, nor live on until that renewal.
#[tokio::test]
async fn dropping_the_manager_stops_its_refresher() {
    use consent_proxy::upstream::token::{TokenManager, TokenMetrics};
    use consent_proxy::upstream::transport::Transport;

    let sim = start_simulator().await;
    let settings = ProxyConfig::for_simulator(&sim).settings();
    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let (tokens, refresher) = TokenManager::start(
        consent_proxy::upstream::token::EndpointClient {
            transport: Transport::new(settings.talkdesk.timeout, &settings.egress),
            tracer: consent_proxy::otel::Tracer::off(),
        },
        &settings.talkdesk,
        &settings.token,
        TokenMetrics::register(&prometheus::Registry::new()),
        None,
        shutdown_rx,
    );
    tokens
        .current(Instant::now() + Duration::from_secs(5))
        .await
        .expect("a token");
    drop(tokens);
    tokio::time::timeout(Duration::from_secs(5), refresher)
        .await
        .expect("the refresher stops when its manager is dropped")
        .expect("the refresher ends cleanly");
    // Kept until here, so only the drop can have stopped the refresher.
    drop(shutdown);
}

/// Everything logged in this test binary (all its tests), installed on first use as the
/// global subscriber.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        tracing_subscriber::fmt()
            .with_env_filter("consent_proxy=trace,debug")
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init()
            .expect("no other global subscriber in this test binary");
        buffer
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl io::Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// How the proxy asks for its token (a stub token endpoint that records every request)

/// Decodes an `application/x-www-form-urlencoded` body into pairs.
fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }
    std::str::from_utf8(body)
        .unwrap()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A token request as a stub token endpoint received it.
#[derive(Debug, Clone)]
struct SeenTokenRequest {
    method: Method,
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

/// A token endpoint that records every request and answers a fixed token, so tests can see
/// exactly how the proxy asks for tokens.
struct TokenStub {
    url: String,
    seen: Arc<Mutex<Vec<SeenTokenRequest>>>,
}

impl TokenStub {
    async fn start() -> TokenStub {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let recorded = recorded.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes());
                            recorded.lock().unwrap().push(SeenTokenRequest {
                                method: parts.method,
                                path: parts.uri.path().to_owned(),
                                headers: parts.headers,
                                body: body.unwrap_or_default(),
                            });
                            let answer = Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(
                                    br#"{"access_token":"stub-token","token_type":"Bearer","expires_in":600}"#,
                                )))
                                .unwrap();
                            Ok::<_, Infallible>(answer)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenStub {
            url: format!("http://{addr}/oauth/token"),
            seen,
        }
    }

    fn requests(&self) -> Vec<SeenTokenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

/// A proxy whose token endpoint is a [`TokenStub`]; returns once it holds the stub's token.
async fn proxy_with_token_stub(configure: impl FnOnce(&mut ProxyConfig)) -> (TokenStub, Harness) {
    let stub = TokenStub::start().await;
    let h = Harness::start_with_upstream(|sim| (sim.base_url(), stub.url.clone()), configure).await;
    h.wait_ready().await;
    (stub, h)
}

#[tokio::test]
async fn token_is_requested_with_http_basic_and_the_configured_scopes() {
    let (stub, _h) = proxy_with_token_stub(|_| {}).await;
    let requests = stub.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let request = &requests[0];
    assert_eq!(request.method, Method::POST);
    assert_eq!(request.path, "/oauth/token");
    assert_eq!(
        request.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(
        request.headers["authorization"],
        basic(SIM_CLIENT_ID, SIM_CLIENT_SECRET).as_str()
    );
    let form = form_pairs(&request.body);
    assert_eq!(
        form,
        vec![
            ("grant_type".to_owned(), "client_credentials".to_owned()),
            (
                "scope".to_owned(),
                "voicebiometrics-consent:read voicebiometrics-consent:write".to_owned()
            ),
        ]
    );
}

#[tokio::test]
async fn token_request_with_client_auth_post_puts_the_credentials_in_the_form() {
    let (stub, _h) = proxy_with_token_stub(|c| {
        c.set_str("talkdesk.client_auth", "post")
            .set("talkdesk.scopes", r#"["voicebiometrics-consent:read"]"#);
    })
    .await;
    let request = &stub.requests()[0];
    assert!(!request.headers.contains_key("authorization"));
    let form = form_pairs(&request.body);
    let param = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(param("grant_type"), Some("client_credentials"));
    assert_eq!(param("scope"), Some("voicebiometrics-consent:read"));
    assert_eq!(param("client_id"), Some(SIM_CLIENT_ID));
    assert_eq!(param("client_secret"), Some(SIM_CLIENT_SECRET));
}

#[tokio::test]
async fn client_auth_post_works_against_the_simulator() {
    let h = Harness::start_with(|c| {
        c.set_str("talkdesk.client_auth", "post");
    })
    .await;
    h.sim.set_status("+15550100003", ConsentStatus::Deleted);
    let get = h.get("+15550100003").await;
    assert_eq!(get.status, 200);
    assert_eq!(get.status_field(), "DELETED");
    assert_eq!(h.put("+15550100003", "CONSENTED").await.status, 200);
    assert_eq!(h.sim.stats().tokens_issued, 1);
}

#[tokio::test]
async fn configured_scopes_are_the_ones_granted() {
    // Only the read scope: reads work, upstream refuses writes (403, passed through).
    let h = Harness::start_with(|c| {
        c.set("talkdesk.scopes", r#"["voicebiometrics-consent:read"]"#);
    })
    .await;
    h.sim.set_status("+15550100004", ConsentStatus::Consented);
    assert_eq!(h.get("+15550100004").await.status, 200);
    let put = h.put("+15550100004", "REFUSED").await;
    assert_eq!(put.status, 403, "{}", put.text());
    assert_eq!(put.code(), "forbidden");
    assert!(put.json()["message"]
        .as_str()
        .unwrap()
        .contains("voicebiometrics-consent:write"));
    assert_eq!(h.sim.puts_for("+15550100004"), 1);
    assert_eq!(
        h.sim.stored_status("+15550100004"),
        Some(ConsentStatus::Consented)
    );
}

/// A GET of `contact` is refused `503 token_unavailable` within `limit`, though the request
/// timeout (10 s in these tests) would allow far longer.
async fn assert_token_unavailable_within(h: &Harness, contact: &str, limit: Duration) {
    let started = Instant::now();
    let get = h.get(contact).await;
    let elapsed = started.elapsed();
    assert_proxy_error(&get, 503, "token_unavailable");
    assert!(
        elapsed < limit,
        "took {elapsed:?}, the request timeout is 10 s"
    );
}

#[tokio::test]
async fn wrong_client_secret_is_token_unavailable_quickly() {
    let h = Harness::start_with(|c| {
        c.set_str("talkdesk.client_secret", "not-the-sim-secret")
            .set("server.request_timeout_ms", "10000");
    })
    .await;
    assert_token_unavailable_within(&h, "+15550100005", Duration::from_millis(1500)).await;
    assert_upstream_untouched(&h.sim);
    assert!(h.sim.stats().token_requests >= 1);
    assert_eq!(h.sim.stats().tokens_issued, 0);

    let ready = h.admin("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.json()["reason"].is_string(), "{}", ready.text());
}

#[tokio::test]
async fn hanging_token_endpoint_is_token_unavailable_within_a_second() {
    let sim = start_simulator().await;
    // The first token request hangs far longer than a caller may wait for a token.
    sim.inject(SimRoute::Token, Fault::Delay(Duration::from_secs(5)), 1);
    let proxy = ProxyConfig::for_simulator(&sim)
        .set("server.request_timeout_ms", "10000")
        .set("talkdesk.timeout_ms", "8000")
        .start()
        .await;
    let h = Harness {
        sim,
        proxy,
        http: TestClient::new(),
    };
    assert_token_unavailable_within(&h, "+15550100007", Duration::from_millis(2000)).await;
    assert_upstream_untouched(&h.sim);
}

#[tokio::test]
async fn unknown_scope_is_token_unavailable() {
    let h = Harness::start_with(|c| {
        c.set("talkdesk.scopes", r#"["voicebiometrics-consent:admin"]"#);
    })
    .await;
    assert_proxy_error(&h.get("+15550100006").await, 503, "token_unavailable");
    assert_upstream_untouched(&h.sim);
    assert_eq!(h.sim.stats().tokens_issued, 0);
}

#[tokio::test]
async fn one_token_serves_many_requests() {
    let h = Harness::start_with(|c| {
        c.set("cache.enabled", "false");
    })
    .await;
    for i in 0..10 {
        let contact = format!("+1555020{i:04}");
        assert_eq!(h.put(&contact, "CONSENTED").await.status, 201);
        let get = h.get(&contact).await;
        assert_eq!(get.status, 200);
        assert_eq!(get.header("x-cache-status"), Some("BYPASS"));
    }
    let stats = h.sim.stats();
    assert_eq!(stats.gets, 10);
    assert_eq!(stats.puts, 10);
    assert_eq!(stats.token_requests, 1, "{stats:?}");
    assert_eq!(stats.unauthorized, 0);
}
