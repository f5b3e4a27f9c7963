//! What the in-process benchmarks send through the handler: consent GETs and PUTs for the
//! contacts `+1555NNNNNNN` of a working set, with the benchmarks' API key, the simulator they
//! are sent to and the proxy configuration in front of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use consent_proxy::simulator::{Simulator, SimulatorConfig};
use consent_proxy::AppHandle;
use http::Request;
use http_body_util::Full;

pub const KEY: &str = "bench-key-0123456789abcdef";
pub const SIM_CLIENT_SECRET: &str = "bench-secret";
/// The callers' address, as the listener would pass it.
pub const PEER: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40_000);

/// Nanoseconds per hit of each proxy of `modes` in each of 7 rounds: `hits` GETs over the
/// first `working_set` contacts (cached already), the proxies in turn within each round so that
/// whatever else the machine does falls on all of them alike.
pub fn hit_rounds<const N: usize>(
    runtime: &tokio::runtime::Runtime,
    modes: &[AppHandle; N],
    hits: usize,
    working_set: usize,
) -> [Vec<f64>; N] {
    let mut per_hit = std::array::from_fn(|_| Vec::new());
    for _round in 0..7 {
        for (mode, proxy) in modes.iter().enumerate() {
            let started = Instant::now();
            runtime.block_on(async {
                for i in 0..hits {
                    let response = proxy.routes.handle(get(i % working_set), PEER).await;
                    debug_assert_eq!(response.headers()["x-cache-status"], "HIT");
                }
            });
            per_hit[mode].push(started.elapsed().as_nanos() as f64 / hits as f64);
        }
    }
    per_hit
}

/// The latency of each of `puts` PUTs through each proxy of `modes` (alternating statuses),
/// after 200 to warm each (connections, token, scripts): blocks of 100 PUTs, one block per
/// proxy in turn, so that whatever else the machine does falls on all of them alike. Panics
/// on an answer that is not 2xx.
pub async fn interleaved_put_latencies<const N: usize>(
    modes: &[AppHandle; N],
    puts: usize,
) -> [Vec<Duration>; N] {
    let statuses = ["CONSENTED", "REFUSED"];
    for proxy in modes {
        for i in 0..200 {
            proxy.routes.handle(put(i, statuses[i % 2]), PEER).await;
        }
    }
    let mut latencies = std::array::from_fn(|_| Vec::new());
    for block in 0..(puts / 100).max(1) {
        for (mode, proxy) in modes.iter().enumerate() {
            for i in 0..100 {
                let request = put(block * 100 + i, statuses[i % 2]);
                let started = Instant::now();
                let response = proxy.routes.handle(request, PEER).await;
                latencies[mode].push(started.elapsed());
                assert!(response.status().is_success(), "{}", response.status());
            }
        }
    }
    latencies
}

/// The consent resource of the working set's `contact`.
pub fn path(contact: usize) -> String {
    format!("/voicebiometrics/contacts/%2B1555{contact:07}/consent")
}

pub fn get(contact: usize) -> Request<Full<Bytes>> {
    Request::get(path(contact))
        .header("x-api-key", KEY)
        .body(Full::new(Bytes::new()))
        .expect("valid request")
}

pub fn put(contact: usize, status: &str) -> Request<Full<Bytes>> {
    Request::put(path(contact))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"status":"{status}"}}"#
        ))))
        .expect("valid request")
}

/// A proxy configuration (TOML) in front of `sim`, logging at `log_level`, with `sections`
/// (more TOML) and one client, "bench", with the key [`KEY`] and `permissions` (a TOML array).
pub fn proxy_toml(sim: &Simulator, log_level: &str, sections: &str, permissions: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[log]
level = "{log_level}"
[talkdesk]
api_base_url = "{}"
token_url = "{}"
client_id = "sim-client"
client_secret = "{SIM_CLIENT_SECRET}"
{sections}
[[clients]]
name = "bench"
api_key = "{KEY}"
permissions = {permissions}
"#,
        sim.base_url(),
        sim.token_url()
    )
}

/// The simulator on a free loopback port, with the client secret the benchmarks configure.
pub async fn simulator() -> Simulator {
    Simulator::start(
        "127.0.0.1:0".parse().expect("addr"),
        SimulatorConfig {
            client_secret: SIM_CLIENT_SECRET.into(),
            ..SimulatorConfig::default()
        },
    )
    .await
    .expect("simulator")
}
