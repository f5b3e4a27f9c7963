//! A cache hit through the whole consent request handler, in-process on one core: requests
//! per second (criterion's throughput) and heap allocations per hit (counted by a wrapping
//! global allocator, printed once).

use std::time::Duration;

use consent_proxy::config::Settings;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::App;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "support/consent_requests.rs"]
mod consent_requests;
#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use consent_requests::{get as request, KEY, SIM_CLIENT_SECRET};
use counting_alloc::allocations;

const WORKING_SET: usize = 10_000;

fn cache_hit(c: &mut Criterion) {
    // One core: a current-thread runtime drives both the handler and the simulator.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (proxy, _simulator) = runtime.block_on(async {
        let simulator = consent_requests::simulator().await;
        let settings = Settings::from_toml_str(&format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[log]
level = "warn"
[talkdesk]
api_base_url = "{}"
token_url = "{}"
client_id = "sim-client"
client_secret = "{SIM_CLIENT_SECRET}"
[[clients]]
name = "bench"
api_key = "{KEY}"
permissions = ["read"]
"#,
            simulator.base_url(),
            simulator.token_url()
        ))
        .expect("settings");
        let proxy = App::start(settings).await.expect("proxy");
        for contact in 0..WORKING_SET {
            simulator.set_status(&format!("+1555{contact:07}"), ConsentStatus::Consented);
            let response = proxy.routes.handle(request(contact)).await;
            assert_eq!(response.status(), 200);
        }
        (proxy, simulator)
    });

    // Allocations per hit, measured outside criterion's loop.
    let hits = 10_000u64;
    let before = allocations();
    runtime.block_on(async {
        for i in 0..hits {
            let response = proxy.routes.handle(request(i as usize % WORKING_SET)).await;
            assert_eq!(response.headers()["x-cache-status"], "HIT");
        }
    });
    let per_hit = (allocations() - before) as f64 / hits as f64;
    println!("allocations per cache hit through the handler: {per_hit:.1}");

    let mut group = c.benchmark_group("handler");
    group
        .throughput(Throughput::Elements(1))
        .measurement_time(Duration::from_secs(5));
    let mut next = 0usize;
    group.bench_function("cache_hit", |b| {
        b.to_async(&runtime).iter(|| {
            next = (next + 1) % WORKING_SET;
            let routes = proxy.routes.clone();
            let request = request(next);
            async move { routes.handle(request).await }
        })
    });
    group.finish();
}

criterion_group!(benches, cache_hit);
criterion_main!(benches);
