//! The cost of tracing on a cache hit through the whole handler, in-process on one core:
//! three proxies in front of one simulator, tracing off, on with `sample_ratio = 1.0` and on
//! with `0.01`, exporting to a collector stand-in (a loopback HTTP server answering 200) on the
//! same core, so the export's encoding and sending are paid here too. Each request yields once
//! (all three alike) so the exporter runs between hits as it would between requests. Prints
//! the throughput ratios on/off, medians of interleaved rounds in the same run, and the spans
//! exported and dropped.
//!
//! `cargo bench --bench otel` (ROUNDS and HITS_PER_ROUND below; OTEL_BENCH_ROUNDS overrides)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use consent_proxy::config::Settings;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::{App, AppHandle};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[path = "support/consent_requests.rs"]
mod consent_requests;
#[path = "support/stats.rs"]
mod stats;
use consent_requests::proxy_toml;
use stats::median;

const WORKING_SET: usize = 1_000;
const ROUNDS: usize = 11;
const HITS_PER_ROUND: usize = 10_000;

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40_000))
}

/// A collector stand-in: every request answered 200 with an empty body.
async fn collector() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(stream),
                service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                }),
            ));
        }
    });
    addr
}

async fn hits(proxy: &AppHandle, n: usize) -> Duration {
    let started = Instant::now();
    for i in 0..n {
        let response = proxy
            .routes
            .handle(consent_requests::get(i % WORKING_SET), peer())
            .await;
        assert_eq!(response.headers()["x-cache-status"], "HIT");
        tokio::task::yield_now().await;
    }
    started.elapsed()
}

fn metric(proxy: &AppHandle, name: &str) -> f64 {
    proxy
        .registry
        .gather()
        .iter()
        .find(|family| family.name() == name)
        .and_then(|family| {
            family
                .get_metric()
                .first()
                .map(|m| m.get_counter().get_value())
        })
        .unwrap_or(0.0)
}

fn main() {
    let rounds = std::env::var("OTEL_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let names = ["off", "sample 1.0", "sample 0.01"];
    let proxies = runtime.block_on(async {
        let simulator = consent_requests::simulator().await;
        for contact in 0..WORKING_SET {
            simulator.set_status(&format!("+1555{contact:07}"), ConsentStatus::Consented);
        }
        let collector = collector().await;
        let mut proxies = Vec::new();
        for otel in [
            String::new(),
            format!("[otel]\nendpoint = \"http://{collector}\"\nsample_ratio = 1.0\n"),
            format!("[otel]\nendpoint = \"http://{collector}\"\nsample_ratio = 0.01\n"),
        ] {
            let settings =
                Settings::from_toml_str(&proxy_toml(&simulator, "warn", &otel, r#"["read"]"#))
                    .expect("settings");
            let proxy = App::start(settings).await.expect("proxy");
            for contact in 0..WORKING_SET {
                let response = proxy
                    .routes
                    .handle(consent_requests::get(contact), peer())
                    .await;
                assert_eq!(response.status(), 200);
            }
            proxies.push(proxy);
        }
        // Keeps the simulator alive with the proxies.
        std::mem::forget(simulator);
        proxies
    });

    let mut times = vec![Vec::new(); proxies.len()];
    for round in 0..rounds {
        // Rotating order, so drift on a shared machine hits each alike.
        for k in 0..proxies.len() {
            let i = (round + k) % proxies.len();
            let took = runtime.block_on(hits(&proxies[i], HITS_PER_ROUND));
            times[i].push(took.as_secs_f64());
        }
    }
    let off = median(&mut times[0].clone());
    println!(
        "cache hit through the handler, tracing off: {:.0} hits/s (median of {rounds} rounds of \
         {HITS_PER_ROUND})",
        HITS_PER_ROUND as f64 / off
    );
    for i in 1..proxies.len() {
        let ratios: Vec<f64> = times[0]
            .iter()
            .zip(&times[i])
            .map(|(off, on)| off / on)
            .collect();
        let (min, max) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        println!(
            "tracing {} / off throughput: {:.3} (median of per-round ratios; range {min:.3}..{max:.3}); \
             spans exported {}, dropped {}",
            names[i],
            median(&mut ratios.clone()),
            metric(&proxies[i], "consent_proxy_otel_spans_exported_total"),
            metric(&proxies[i], "consent_proxy_otel_spans_dropped_total"),
        );
    }
}
