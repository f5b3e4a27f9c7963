//! Resident memory per cached contact: 1,000,000 contacts in the proxy's cache (as configured
//! by default, and with `stale_if_error_s` set: its entries live longer, not larger), side by
//! side with a bare moka cache of the same keys holding unit values with a TTL (moka's floor).
//! Each variant runs in its own child process so one's freed memory cannot hide the other's.
//! The allocator is the binary's (mimalloc), so the figures are what ships.
//!
//! `cargo bench --bench cache_memory` (optionally `ENTRIES=N`).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use consent_proxy::cache::{CacheMetrics, ConsentCache, Lookup};
use consent_proxy::config::CacheSettings;
use consent_proxy::consent::ConsentAnswer;
use consent_proxy::consent::{ConsentStatus, ContactId};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

fn key(i: u64) -> String {
    format!("+1555{i:07}")
}

async fn fill_proxy_cache(entries: u64, stale_if_error: Option<Duration>) -> u64 {
    let cache = ConsentCache::new(
        &CacheSettings {
            enabled: true,
            ttl: Duration::from_secs(300),
            not_found_ttl: Duration::from_secs(30),
            max_entries: entries,
            stale_if_error,
            refresh_ahead: None,
        },
        CacheMetrics::register(&prometheus::Registry::new()),
    );
    let before = rss_bytes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    for i in 0..entries {
        let contact = ContactId::from_path_segment(&key(i)).expect("valid id");
        let Lookup::Lead(lead) = cache.lookup(&contact) else {
            panic!("a new contact leads its fill");
        };
        let answer = lead
            .spawn(async { Ok(ConsentAnswer::canonical(ConsentStatus::Consented)) })
            .wait(deadline)
            .await;
        assert!(answer.is_ok());
    }
    cache.refresh_entry_gauge();
    assert_eq!(cache.entry_count(), entries);
    let used = rss_bytes() - before;
    std::hint::black_box(&cache);
    used
}

async fn fill_bare_moka(entries: u64) -> u64 {
    let cache: moka::sync::Cache<Arc<str>, ()> = moka::sync::Cache::builder()
        .max_capacity(entries)
        .time_to_live(Duration::from_secs(300))
        .build();
    let before = rss_bytes();
    for i in 0..entries {
        cache.insert(Arc::from(key(i)), ());
    }
    cache.run_pending_tasks();
    assert_eq!(cache.entry_count(), entries);
    let used = rss_bytes() - before;
    std::hint::black_box(&cache);
    used
}

fn main() {
    let entries: u64 = std::env::var("ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    if let Ok(variant) = std::env::var("CACHE_MEMORY_VARIANT") {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let used = runtime.block_on(async {
            match variant.as_str() {
                "proxy" => fill_proxy_cache(entries, None).await,
                "proxy-stale" => fill_proxy_cache(entries, Some(Duration::from_secs(3600))).await,
                _ => fill_bare_moka(entries).await,
            }
        });
        println!("{used}");
        return;
    }
    // Parent: run each variant in a fresh process.
    let exe = std::env::current_exe().expect("own path");
    let measure = |variant: &str| -> f64 {
        let output = Command::new(&exe)
            .env("CACHE_MEMORY_VARIANT", variant)
            .env("ENTRIES", entries.to_string())
            .output()
            .expect("child runs");
        let text = String::from_utf8_lossy(&output.stdout);
        let bytes: f64 = text
            .trim()
            .lines()
            .last()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0.0);
        bytes / entries as f64
    };
    let bare = measure("bare");
    let proxy = measure("proxy");
    let stale = measure("proxy-stale");
    println!("resident memory per cached contact ({entries} entries):");
    println!("  bare moka (Arc<str> -> (), TTL):            {bare:8.1} bytes");
    println!("  consent-proxy cache:                        {proxy:8.1} bytes");
    println!("  consent-proxy cache, stale_if_error_s 3600: {stale:8.1} bytes");
    println!(
        "  ratio proxy / bare:                         {:8.3}",
        proxy / bare
    );
    println!(
        "  ratio proxy with stale_if_error / bare:     {:8.3}",
        stale / bare
    );
}
