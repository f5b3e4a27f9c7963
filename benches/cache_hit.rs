//! A cache hit through the whole consent request handler, in-process on one core, with the
//! caller authenticated two ways: by its API key (`X-API-Key`) and by an access token from the
//! proxy's own token endpoint (`Authorization: Bearer`). Requests per second of each
//! (criterion's throughput), heap allocations per hit (counted by a wrapping global allocator),
//! and the Bearer/API-key throughput ratio from interleaved rounds in the same run (printed
//! once; the target is ≥ 0.95). Then the token endpoint itself: tokens issued per second on
//! one core.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use consent_proxy::config::Settings;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::{App, AppHandle};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};

#[path = "support/consent_requests.rs"]
mod consent_requests;
#[path = "support/counting_alloc.rs"]
mod counting_alloc;
#[path = "support/stats.rs"]
mod stats;
use consent_requests::{proxy_toml, KEY};
use counting_alloc::allocations;
use stats::median;

const WORKING_SET: usize = 10_000;
/// Interleaved rounds for the ratio, and hits per credential form in each.
const ROUNDS: usize = 15;
const HITS_PER_ROUND: usize = 20_000;

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40_000))
}

/// How a request authenticates.
#[derive(Clone)]
struct Credential {
    name: HeaderName,
    value: HeaderValue,
}

fn request(contact: usize, credential: &Credential) -> Request<Full<Bytes>> {
    Request::get(consent_requests::path(contact))
        .header(credential.name.clone(), credential.value.clone())
        .body(Full::new(Bytes::new()))
        .expect("valid request")
}

fn token_request() -> Request<Full<Bytes>> {
    Request::post("/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(format!(
            "grant_type=client_credentials&client_id=bench&client_secret={KEY}"
        ))))
        .expect("valid request")
}

/// `hits` cache hits with `credential`, each checked; the time they took.
async fn hits(proxy: &AppHandle, credential: &Credential, hits: usize, offset: usize) -> Duration {
    let started = Instant::now();
    for i in 0..hits {
        let response = proxy
            .routes
            .handle(request((offset + i) % WORKING_SET, credential), peer())
            .await;
        assert_eq!(response.headers()["x-cache-status"], "HIT");
    }
    started.elapsed()
}

fn cache_hit(c: &mut Criterion) {
    // One core: a current-thread runtime drives both the handler and the simulator.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let api_key = Credential {
        name: HeaderName::from_static("x-api-key"),
        value: HeaderValue::from_static(KEY),
    };
    let (proxy, _simulator, bearer) = runtime.block_on(async {
        let simulator = consent_requests::simulator().await;
        let settings = Settings::from_toml_str(&proxy_toml(&simulator, "warn", "", r#"["read"]"#))
            .expect("settings");
        let proxy = App::start(settings).await.expect("proxy");
        for contact in 0..WORKING_SET {
            simulator.set_status(&format!("+1555{contact:07}"), ConsentStatus::Consented);
            let response = proxy
                .routes
                .handle(request(contact, &api_key), peer())
                .await;
            assert_eq!(response.status(), 200);
        }
        let answer = proxy.routes.handle(token_request(), peer()).await;
        assert_eq!(answer.status(), 200);
        let body = answer.into_body().collect().await.expect("body").to_bytes();
        let token: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        let token = token["access_token"].as_str().expect("a token").to_owned();
        let bearer = Credential {
            name: http::header::AUTHORIZATION,
            value: HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"),
        };
        (proxy, simulator, bearer)
    });

    // Allocations per hit, measured outside criterion's loop (the first Bearer hit verifies
    // the token; the rest find it in the verified-token cache).
    for (name, credential) in [("X-API-Key", &api_key), ("Bearer token", &bearer)] {
        let n = 10_000;
        runtime.block_on(hits(&proxy, credential, 1, 0));
        let before = allocations();
        runtime.block_on(hits(&proxy, credential, n, 0));
        let per_hit = (allocations() - before) as f64 / n as f64;
        println!("allocations per cache hit through the handler ({name}): {per_hit:.1}");
    }

    // The ratio, from interleaved rounds (each round times both forms back to back, in
    // alternating order), so drift on a shared machine hits both alike.
    let ratios: Vec<f64> = (0..ROUNDS)
        .map(|round| {
            let offset = round * HITS_PER_ROUND;
            runtime.block_on(async {
                let (key_time, bearer_time) = if round % 2 == 0 {
                    let k = hits(&proxy, &api_key, HITS_PER_ROUND, offset).await;
                    (k, hits(&proxy, &bearer, HITS_PER_ROUND, offset).await)
                } else {
                    let b = hits(&proxy, &bearer, HITS_PER_ROUND, offset).await;
                    (hits(&proxy, &api_key, HITS_PER_ROUND, offset).await, b)
                };
                key_time.as_secs_f64() / bearer_time.as_secs_f64()
            })
        })
        .collect();
    let (min, max) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    println!(
        "Bearer-token hit throughput / X-API-Key hit throughput: {:.3} (median of {ROUNDS} \
         interleaved rounds of {HITS_PER_ROUND} hits each; range {min:.3}..{max:.3}; target >= 0.95)",
        median(&mut ratios.clone())
    );

    // Token issuance on this one core.
    let issued = 20_000;
    let started = Instant::now();
    runtime.block_on(async {
        for _ in 0..issued {
            let answer = proxy.routes.handle(token_request(), peer()).await;
            assert_eq!(answer.status(), 200);
        }
    });
    println!(
        "tokens issued per second on one core (POST /oauth/token through the handler): {:.0}",
        issued as f64 / started.elapsed().as_secs_f64()
    );

    let mut group = c.benchmark_group("handler");
    group
        .throughput(Throughput::Elements(1))
        .measurement_time(Duration::from_secs(5));
    for (name, credential) in [("cache_hit", &api_key), ("cache_hit_bearer", &bearer)] {
        let mut next = 0usize;
        group.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                next = (next + 1) % WORKING_SET;
                let routes = proxy.routes.clone();
                let request = request(next, credential);
                async move { routes.handle(request, peer()).await }
            })
        });
    }
    group.bench_function("token_issue", |b| {
        b.to_async(&runtime).iter(|| {
            let routes = proxy.routes.clone();
            async move { routes.handle(token_request(), peer()).await }
        })
    });
    group.finish();
}

criterion_group!(benches, cache_hit);
criterion_main!(benches);
