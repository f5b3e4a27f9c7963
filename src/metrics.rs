//! The app-owned Prometheus registry and the metric helpers every component uses.
//!
//! Each component (HTTP layer, cache, token manager, upstream client) registers its own
//! metrics on the one `Registry` it is handed at construction; nothing uses the global
//! default registry, so several proxies can live in one test process.

#[cfg(target_os = "linux")]
mod process;

use http::StatusCode;
use prometheus::{
    core::Collector, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::build_info;

/// Buckets from 25 µs (a cache hit) to 10 s (past any upstream deadline).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Registers a collector, panicking only on a programming error (duplicate or invalid name),
/// which every test that builds an app would catch at once.
fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    if let Err(err) = registry.register(Box::new(collector.clone())) {
        panic!("metric registration is a programming error: {err}");
    }
    collector
}

pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::with_opts(Opts::new(name, help)).expect("valid metric"),
    )
}

pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

/// One counter per value of a one-label family, resolved at registration, indexed like
/// `labels` (an enum's `ALL` mapped by `as_str`, then indexed by `variant as usize` where
/// `assert_in_declaration_order!` holds).
pub fn counters<const N: usize>(
    family: &IntCounterVec,
    labels: [&'static str; N],
) -> [IntCounter; N] {
    labels.map(|label| family.with_label_values(&[label]))
}

/// Fails the build unless `$all` (an enum's `ALL`) lists its variants in declaration order, so
/// that `variant as usize` indexes the series built from it.
macro_rules! assert_in_declaration_order {
    ($all:expr) => {
        const _: () = {
            let all = $all;
            let mut i = 0;
            while i < all.len() {
                assert!(all[i] as usize == i, "ALL is not in declaration order");
                i += 1;
            }
        };
    };
}
pub(crate) use assert_in_declaration_order;

pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::with_opts(Opts::new(name, help)).expect("valid metric"),
    )
}

pub fn float_gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Gauge {
    register(
        registry,
        prometheus::Gauge::with_opts(Opts::new(name, help)).expect("valid metric"),
    )
}

pub fn histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    register(registry, Histogram::with_opts(opts).expect("valid metric"))
}

pub fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    register(
        registry,
        HistogramVec::new(opts, labels).expect("valid metric"),
    )
}

/// A new registry with the process metrics (`process_*`) and `consent_proxy_build_info`
/// already on it.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    if let Err(err) = registry.register(Box::new(process::ProcessMetrics::for_self())) {
        tracing::warn!(error = %err, "process metrics unavailable");
    }
    register_build_info(&registry);
    registry
}

/// `consent_proxy_build_info{version, commit} 1`: which build runs, joinable onto any other
/// series (`* on(instance) group_left(version, commit) consent_proxy_build_info`).
fn register_build_info(registry: &Registry) {
    let info = register(
        registry,
        IntGaugeVec::new(
            Opts::new(
                "consent_proxy_build_info",
                "The running build: crate version and git commit; always 1.",
            ),
            &["version", "commit"],
        )
        .expect("valid metric"),
    );
    info.with_label_values(&[build_info::VERSION, build_info::COMMIT])
        .set(1);
}

/// The registry in Prometheus' text exposition format.
pub fn encode(registry: &Registry) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(16 * 1024);
    // Encoding into a Vec only fails on a malformed family, which registration prevents.
    if let Err(err) = TextEncoder::new().encode(&registry.gather(), &mut buffer) {
        tracing::error!(error = %err, "metrics encoding failed");
    }
    buffer
}

/// A status code as a metric label without allocating.
pub fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        409 => "409",
        413 => "413",
        415 => "415",
        429 => "429",
        431 => "431",
        499 => "499",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        code => match code / 100 {
            1 => "1xx",
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        },
    }
}

/// The HTTP layer's metrics: one count and one latency per answered request.
#[derive(Clone)]
pub struct HttpMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    /// `consent_proxy_auth_failures_total{route,reason}`.
    pub auth_failures: IntCounterVec,
}

impl HttpMetrics {
    pub fn register(registry: &Registry) -> Self {
        HttpMetrics {
            requests: counter_vec(
                registry,
                "consent_proxy_requests_total",
                "Requests answered on the consent listener.",
                &["route", "method", "code", "client"],
            ),
            duration: histogram_vec(
                registry,
                "consent_proxy_request_duration_seconds",
                "Time from request head to answer on the consent listener.",
                &["route", "method"],
            ),
            auth_failures: counter_vec(
                registry,
                "consent_proxy_auth_failures_total",
                "Failed caller authentications, by route (consent: the consent routes; other: \
                 the token endpoint; admin: the admin listener's routes) and reason (throttled: \
                 refused unchecked after too many failures).",
                &["route", "reason"],
            ),
        }
    }
}
