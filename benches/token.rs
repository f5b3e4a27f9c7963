//! The cost of getting the current token on the hot path: `TokenManager::current` while a
//! valid token is held (the lock-free `ArcSwap` fast path), per call on one thread, and per
//! call while two OS threads call it at once (both threads run the same number of calls;
//! the time reported is the wall time divided by the calls of one thread).
//!
//! Also the cost of making one `private_key_jwt` client assertion (ES256).
//!
//! `cargo bench --bench token`

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use consent_proxy::config::Settings;
use consent_proxy::simulator::{Simulator, SimulatorConfig};
use consent_proxy::upstream::token::{TokenManager, TokenMetrics};
use consent_proxy::upstream::transport::Transport;
use criterion::{criterion_group, criterion_main, Criterion};
use tokio::runtime::Runtime;
use tokio::sync::watch;

const CLIENT_ID: &str = "bench-client";
const CLIENT_SECRET: &str = "bench-secret-0123456789";

/// A simulator and a token manager holding a valid (10-minute) token from it.
struct Fixture {
    runtime: Runtime,
    tokens: TokenManager,
    _simulator: Simulator,
    /// Dropping it would stop the refresher.
    _shutdown: watch::Sender<bool>,
}

impl Fixture {
    fn start() -> Fixture {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (simulator, tokens, shutdown) = runtime.block_on(async {
            let simulator = Simulator::start(
                "127.0.0.1:0".parse().unwrap(),
                SimulatorConfig {
                    client_id: CLIENT_ID.into(),
                    client_secret: CLIENT_SECRET.into(),
                    ..SimulatorConfig::default()
                },
            )
            .await
            .expect("simulator starts");
            let settings = Settings::from_toml_str(&format!(
                "[talkdesk]\napi_base_url = \"{}\"\ntoken_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n\
                 client_secret = \"{CLIENT_SECRET}\"\n[auth]\nrequired = false\n",
                simulator.base_url(),
                simulator.token_url(),
            ))
            .expect("bench settings");
            let (shutdown, shutdown_rx) = watch::channel(false);
            let (tokens, _refresher) = TokenManager::start(
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
            // Wait for the first token.
            let give_up = Instant::now() + Duration::from_secs(10);
            while tokens.readiness().is_err() {
                assert!(Instant::now() < give_up, "no token: {:?}", tokens.readiness());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (simulator, tokens, shutdown)
        });
        Fixture {
            runtime,
            tokens,
            _simulator: simulator,
            _shutdown: shutdown,
        }
    }
}

fn far_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(3600)
}

/// `threads` OS threads each make `calls` calls (after a common start); the slowest
/// thread's time.
fn run_threads(tokens: &TokenManager, threads: usize, calls: u64) -> Duration {
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let tokens = tokens.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                // The fast path never awaits; a current-thread runtime is there only for the
                // slow path's timer, should the token ever be missing.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("tokio runtime");
                let deadline = far_deadline();
                runtime.block_on(async {
                    barrier.wait();
                    let started = Instant::now();
                    for _ in 0..calls {
                        black_box(tokens.current(black_box(deadline)).await.expect("token"));
                    }
                    started.elapsed()
                })
            })
        })
        .collect();
    workers
        .into_iter()
        .map(|w| w.join().expect("bench thread"))
        .max()
        .unwrap_or_default()
}

fn token_current(c: &mut Criterion) {
    let fixture = Fixture::start();
    let tokens = &fixture.tokens;
    let mut group = c.benchmark_group("token_current");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    // For scale: the fast path reads the clock once to check the token's lifetime.
    group.bench_function("baseline_instant_now", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    let deadline = far_deadline();
    group.bench_function("async_single_task", |b| {
        b.to_async(&fixture.runtime)
            .iter(|| async { black_box(tokens.current(black_box(deadline)).await.unwrap()) })
    });
    group.bench_function("1_thread", |b| {
        b.iter_custom(|calls| run_threads(tokens, 1, calls))
    });
    group.bench_function("2_threads_contended", |b| {
        b.iter_custom(|calls| run_threads(tokens, 2, calls))
    });
    group.finish();
}

/// Making one `private_key_jwt` client assertion (a UUID, the claims, one signature). It runs
/// only where a token is fetched (the refresher, or the fleet's renewal), never on a consent
/// request's path; beside it for scale, a new token's whole refresh is a network round trip.
fn client_assertion(c: &mut Criterion) {
    use consent_proxy::jws::{Algorithm, SigningKey};
    use consent_proxy::upstream::token::assertion::client_assertion;
    let mut group = c.benchmark_group("client_assertion");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let es256 = SigningKey::from_text(&SigningKey::generate_es256(), Algorithm::ES256).unwrap();
    let url = "https://acme.talkdeskid.com/oauth/token";
    group.bench_function("es256", |b| {
        b.iter(|| black_box(client_assertion(&es256, "kid", "client", url).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, token_current, client_assertion);
criterion_main!(benches);
