//! The pieces of a cache hit that the proxy does per request besides the cache lookup, each
//! with its time (criterion) and its heap allocations per call (counted by a wrapping global
//! allocator and printed once before the timings):
//!
//! - `request_id/new`: a fresh `x-request-id` (when the caller sent none);
//! - `contact_id/plain`, `contact_id/percent_encoded`: parsing the `{contact_id}` segment;
//! - `age/table` vs `age/from_u32`: the `Age` header of a hit, from the pre-built table
//!   (`http_util::age_value`) vs `HeaderValue::from(u32)` (what it replaced);
//! - `header_name/const` vs `header_name/str`: inserting `x-cache-status` under a
//!   `HeaderName` constant vs under a `&'static str` (which allocates a copy of the name);
//! - `metrics/resolved` vs `metrics/with_label_values`: counting one answer in
//!   `consent_proxy_requests_total` and observing its latency, through pre-resolved series
//!   (what `ConsentRoutes::record` does for common answers) vs label lookups per request;
//! - `auth/authorize`: finding the caller by its `X-API-Key` (one SHA-256 of the key, then a
//!   constant-time comparison with each client's digest; three clients here);
//! - `auth/authorize_bearer_token`: finding it by an access token from the proxy's token
//!   endpoint (one SHA-256 of the token, the same comparisons, then the verified-token cache);
//! - `auth/verify_token`: what the cache saves, verifying the token (header, HMAC, claims).
//!
//! `cargo bench --bench hot_path`

use std::hint::black_box;
use std::time::Duration;

use std::sync::Arc;

use consent_proxy::auth::token::TokenKeys;
use consent_proxy::auth::{Authenticator, Permission};
use consent_proxy::config::{ClientSettings, Permissions};
use consent_proxy::consent::ContactId;
use consent_proxy::metrics::HttpMetrics;
use consent_proxy::wire::body::{self as http_util, APPLICATION_JSON};
use consent_proxy::wire::request_id::new_request_id;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocations;

/// Allocations per call of `f`, over `n` calls.
fn allocations_per_call<R>(n: u64, mut f: impl FnMut() -> R) -> f64 {
    let before = allocations();
    for _ in 0..n {
        black_box(f());
    }
    (allocations() - before) as f64 / n as f64
}

const X_CACHE_STATUS: HeaderName = HeaderName::from_static("x-cache-status");

fn hit_response() -> http::Response<http_util::Body> {
    http_util::bytes_response(
        StatusCode::OK,
        APPLICATION_JSON,
        bytes::Bytes::from_static(br#"{"status":"CONSENTED"}"#),
    )
}

fn hot_path(c: &mut Criterion) {
    let registry = prometheus::Registry::new();
    let metrics = HttpMetrics::register(&registry);
    let resolved_counter =
        metrics
            .requests
            .with_label_values(&["consent", "GET", "200", "studio-ivr"]);
    let resolved_histogram = metrics.duration.with_label_values(&["consent", "GET"]);

    let permissions = Permissions {
        read: true,
        write: false,
        admin: false,
    };
    let auth = Authenticator::new(
        ["studio-ivr", "studio-outbound", "ops"]
            .iter()
            .map(|name| ClientSettings {
                name: (*name).to_owned(),
                key_sha256: Sha256::digest(format!("{name}-key-0123456789abcdef").as_bytes())
                    .into(),
                permissions,
            })
            .collect(),
        true,
    );
    let token_keys =
        Arc::new(TokenKeys::new(&[b"bench-signing-key-0123456789abcdef01234567"]).expect("keys"));
    let auth = auth.with_access_tokens(token_keys.clone(), &registry);
    let token = token_keys
        .issue("studio-outbound", permissions, Duration::from_secs(3600))
        .expect("token");
    let mut bearer_headers = HeaderMap::new();
    bearer_headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"),
    );
    assert!(auth.authorize(&bearer_headers, Permission::Read).is_ok());
    let mut key_headers = HeaderMap::new();
    key_headers.insert(
        "x-api-key",
        HeaderValue::from_static("studio-outbound-key-0123456789abcdef"),
    );
    assert!(auth.authorize(&key_headers, Permission::Read).is_ok());

    let n = 100_000;
    println!("allocations per call:");
    println!(
        "  request_id/new               {:.1}",
        allocations_per_call(n, new_request_id)
    );
    println!(
        "  contact_id/plain             {:.1}",
        allocations_per_call(n, || ContactId::from_path_segment("+15551234567"))
    );
    println!(
        "  contact_id/percent_encoded   {:.1}",
        allocations_per_call(n, || ContactId::from_path_segment("%2B15551234567"))
    );
    println!(
        "  age/table                    {:.1}",
        allocations_per_call(n, || http_util::age_value(black_box(42)))
    );
    println!(
        "  age/from_u32                 {:.1}",
        allocations_per_call(n, || HeaderValue::from(black_box(42u32)))
    );
    // Both on a fresh response, as the handler has: the first insert of a custom name is what
    // costs (the response's own allocations are in both figures).
    println!(
        "  header_name/const            {:.1}",
        allocations_per_call(n, || {
            let mut response = hit_response();
            response
                .headers_mut()
                .insert(X_CACHE_STATUS, HeaderValue::from_static("HIT"));
            response
        })
    );
    println!(
        "  header_name/str              {:.1}",
        allocations_per_call(n, || {
            let mut response = hit_response();
            response
                .headers_mut()
                .insert("x-cache-status", HeaderValue::from_static("HIT"));
            response
        })
    );
    println!(
        "  metrics/resolved             {:.1}",
        allocations_per_call(n, || {
            resolved_counter.inc();
            resolved_histogram.observe(0.000_04);
        })
    );
    println!(
        "  metrics/with_label_values    {:.1}",
        allocations_per_call(n, || {
            metrics
                .requests
                .with_label_values(&["consent", "GET", "200", "studio-ivr"])
                .inc();
            metrics
                .duration
                .with_label_values(&["consent", "GET"])
                .observe(0.000_04);
        })
    );

    println!(
        "  auth/authorize               {:.1}",
        allocations_per_call(n, || auth.authorize(&key_headers, Permission::Read).is_ok())
    );
    println!(
        "  auth/authorize_bearer_token  {:.1}",
        allocations_per_call(n, || auth
            .authorize(&bearer_headers, Permission::Read)
            .is_ok())
    );
    println!(
        "  auth/verify_token            {:.1}",
        allocations_per_call(n, || token_keys.verify(&token).is_ok())
    );

    let mut group = c.benchmark_group("hot_path");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    group.bench_function("request_id/new", |b| b.iter(new_request_id));
    group.bench_function("contact_id/plain", |b| {
        b.iter(|| ContactId::from_path_segment(black_box("+15551234567")))
    });
    group.bench_function("contact_id/percent_encoded", |b| {
        b.iter(|| ContactId::from_path_segment(black_box("%2B15551234567")))
    });
    group.bench_function("age/table", |b| {
        b.iter(|| http_util::age_value(black_box(42)))
    });
    group.bench_function("age/from_u32", |b| {
        b.iter(|| HeaderValue::from(black_box(42u32)))
    });
    group.bench_function("header_name/const", |b| {
        b.iter(|| {
            let mut response = hit_response();
            response
                .headers_mut()
                .insert(X_CACHE_STATUS, HeaderValue::from_static("HIT"));
            response
        })
    });
    group.bench_function("header_name/str", |b| {
        b.iter(|| {
            let mut response = hit_response();
            response
                .headers_mut()
                .insert("x-cache-status", HeaderValue::from_static("HIT"));
            response
        })
    });
    group.bench_function("metrics/resolved", |b| {
        b.iter(|| {
            resolved_counter.inc();
            resolved_histogram.observe(black_box(0.000_04));
        })
    });
    group.bench_function("metrics/with_label_values", |b| {
        b.iter(|| {
            metrics
                .requests
                .with_label_values(&["consent", "GET", "200", "studio-ivr"])
                .inc();
            metrics
                .duration
                .with_label_values(&["consent", "GET"])
                .observe(black_box(0.000_04));
        })
    });
    group.bench_function("auth/authorize", |b| {
        b.iter(|| {
            auth.authorize(black_box(&key_headers), Permission::Read)
                .is_ok()
        })
    });
    group.bench_function("auth/authorize_bearer_token", |b| {
        b.iter(|| {
            auth.authorize(black_box(&bearer_headers), Permission::Read)
                .is_ok()
        })
    });
    group.bench_function("auth/verify_token", |b| {
        b.iter(|| token_keys.verify(black_box(&token)).is_ok())
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
