//! The consent cache through the whole proxy: hits, TTLs, coalescing, what is never cached,
//! write-through without races (including a randomized history check of the contract's
//! read-your-writes rule), `%2B` equivalence and the admin purge.

mod support;

use std::sync::Arc;
use std::time::Duration;

use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute};
use http::Method;
use support::history::{gets, random_client, random_upstream_delays, violations, Event, Op};
use support::*;
use tokio::time::Instant;

const HIT: Option<&str> = Some("HIT");
const MISS: Option<&str> = Some("MISS");

#[tokio::test]
async fn second_get_is_a_hit_until_the_ttl_passes() {
    let h = Harness::start_with(|c| {
        c.set("cache.ttl_s", "1");
    })
    .await;
    h.sim.set_status("+15550001", ConsentStatus::Consented);

    let first = h.get("+15550001").await;
    assert_eq!((first.status, first.header("x-cache-status")), (200, MISS));
    let second = h.get("+15550001").await;
    assert_eq!((second.status, second.header("x-cache-status")), (200, HIT));
    assert_eq!(second.status_field(), "CONSENTED");
    assert!(second.header("age").is_some());
    assert_eq!(
        h.sim.gets_for("+15550001"),
        1,
        "a hit must not call upstream"
    );

    // The TTL is the behaviour under test: let it pass.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let third = h.get("+15550001").await;
    assert_eq!(third.header("x-cache-status"), MISS);
    assert_eq!(h.sim.gets_for("+15550001"), 2);
    assert_eq!(
        h.metric(r#"consent_proxy_cache_lookups_total{result="hit"}"#)
            .await,
        1.0
    );
    assert_eq!(
        h.metric(r#"consent_proxy_cache_lookups_total{result="miss"}"#)
            .await,
        2.0
    );
}

#[tokio::test]
async fn concurrent_misses_make_one_upstream_call() {
    let h = Arc::new(Harness::start().await);
    h.sim.set_status("+15550002", ConsentStatus::Refused);
    // Keep the one upstream read in flight long enough for all 100 to arrive.
    h.sim
        .delay_next_get("+15550002", Duration::from_millis(300), 1);
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.get("+15550002").await })
        })
        .collect();
    let mut coalesced = 0;
    for request in requests {
        let response = request.await.unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.status_field(), "REFUSED");
        if response.header("x-cache-status") == Some("COALESCED") {
            coalesced += 1;
        }
    }
    assert_eq!(h.sim.gets_for("+15550002"), 1);
    assert!(coalesced > 0, "some requests must have joined the fill");
}

#[tokio::test]
async fn a_failed_fill_reaches_every_waiter_and_is_not_cached() {
    let h = Arc::new(
        Harness::start_with(|c| {
            c.set("talkdesk.max_retries", "0");
        })
        .await,
    );
    h.sim.set_status("+15550003", ConsentStatus::Consented);
    // The failing answer is slow, so every request arrives while the fill is in flight.
    h.sim.set_latency(Duration::from_millis(300));
    h.sim.inject(SimRoute::Get, Fault::Status500, 1);
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.get("+15550003").await })
        })
        .collect();
    for waiter in waiters {
        let response = waiter.await.unwrap();
        assert_eq!(response.status, 502, "{}", response.text());
        assert_eq!(response.code(), "upstream_error");
    }
    assert_eq!(h.sim.gets_for("+15550003"), 1);
    h.sim.set_latency(Duration::ZERO);
    let after = h.get("+15550003").await;
    assert_eq!((after.status, after.header("x-cache-status")), (200, MISS));
}

#[tokio::test]
async fn not_found_is_cached_for_its_own_ttl() {
    let h = Harness::start_with(|c| {
        c.set("cache.not_found_ttl_s", "1").set("cache.ttl_s", "60");
    })
    .await;
    assert_eq!(h.get("+15550004").await.status, 404);
    let again = h.get("+15550004").await;
    assert_eq!((again.status, again.header("x-cache-status")), (404, HIT));
    assert_eq!(again.code(), "not_found");
    assert_eq!(h.sim.gets_for("+15550004"), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(h.get("+15550004").await.header("x-cache-status"), MISS);
}

#[tokio::test]
async fn not_found_ttl_zero_means_not_cached() {
    let h = Harness::start_with(|c| {
        c.set("cache.not_found_ttl_s", "0");
    })
    .await;
    assert_eq!(h.get("+15550005").await.header("x-cache-status"), MISS);
    assert_eq!(h.get("+15550005").await.header("x-cache-status"), MISS);
    assert_eq!(h.sim.gets_for("+15550005"), 2);
}

#[tokio::test]
async fn errors_are_never_cached() {
    let h = Harness::start_with(|c| {
        c.set("talkdesk.max_retries", "0");
    })
    .await;
    h.sim.set_status("+15550006", ConsentStatus::Consented);
    for (fault, expected) in [
        (Fault::Status500, 502),
        (Fault::TooManyRequests { retry_after_s: 0 }, 429),
        // Two 401s: the renewal's retry is rejected too.
        (Fault::Unauthorized, 502),
    ] {
        let count = if matches!(fault, Fault::Unauthorized) {
            2
        } else {
            1
        };
        h.sim.inject(SimRoute::Get, fault.clone(), count);
        let failed = h.get("+15550006").await;
        assert_eq!(failed.status, expected, "{fault:?}: {}", failed.text());
        let next = h.get("+15550006").await;
        assert_eq!(
            (next.status, next.header("x-cache-status")),
            (200, MISS),
            "after {fault:?}"
        );
        assert_eq!(h.purge("+15550006").await.status, 204);
    }
}

#[tokio::test]
async fn a_write_replaces_the_entry() {
    let h = Harness::start().await;
    h.sim.set_status("+15550007", ConsentStatus::Consented);
    assert_eq!(h.get("+15550007").await.status_field(), "CONSENTED");
    assert_eq!(h.put("+15550007", "REFUSED").await.status, 200);
    let after = h.get("+15550007").await;
    assert_eq!(after.header("x-cache-status"), HIT);
    assert_eq!(after.status_field(), "REFUSED");
    assert_eq!(h.sim.gets_for("+15550007"), 1);
    assert_eq!(
        h.metric(r#"consent_proxy_consent_writes_total{status="REFUSED"}"#)
            .await,
        1.0
    );
    assert_eq!(
        h.metric(r#"consent_proxy_cache_invalidations_total{reason="write"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_refused_write_leaves_the_cache_and_an_unknown_one_drops_it() {
    let h = Harness::start_with(|c| {
        c.set("talkdesk.max_retries", "0")
            .set("talkdesk.timeout_ms", "200");
    })
    .await;
    h.sim.set_status("+15550008", ConsentStatus::Consented);
    h.get("+15550008").await;

    // Upstream refuses with 500 (after no retries): 502, the cached answer stays.
    h.sim.inject(SimRoute::Put, Fault::Status500, 1);
    assert_eq!(h.put("+15550008", "REFUSED").await.status, 502);
    let still = h.get("+15550008").await;
    assert_eq!(
        (
            still.header("x-cache-status"),
            still.status_field().as_str()
        ),
        (HIT, "CONSENTED")
    );

    // A gateway in front of upstream answers 502: the write may have happened behind it.
    h.sim.inject(
        SimRoute::Put,
        Fault::Respond {
            status: 502,
            headers: Vec::new(),
            body: bytes::Bytes::from_static(b"bad gateway"),
        },
        1,
    );
    assert_eq!(h.put("+15550008", "REFUSED").await.status, 502);
    let dropped = h.get("+15550008").await;
    assert_eq!(
        dropped.header("x-cache-status"),
        MISS,
        "a 502 write drops the entry"
    );

    // Upstream takes longer than the attempt timeout: the write may have happened.
    h.sim
        .inject(SimRoute::Put, Fault::Delay(Duration::from_millis(600)), 1);
    assert_eq!(h.put("+15550008", "REFUSED").await.status, 504);
    let after = h.get("+15550008").await;
    assert_eq!(
        after.header("x-cache-status"),
        MISS,
        "unknown outcome drops the entry"
    );
    assert_eq!(
        h.metric(r#"consent_proxy_cache_invalidations_total{reason="unknown_outcome"}"#)
            .await,
        2.0
    );
}

/// The contract's rule 2 in its sharpest form: a read that started before a write and ends
/// after it must not store its older answer for requests that start after the write.
#[tokio::test]
async fn a_slow_read_racing_a_write_never_serves_the_old_status_afterwards() {
    let h = Arc::new(Harness::start().await);
    let contact = "+15550009";
    h.sim.set_status(contact, ConsentStatus::Consented);
    h.sim.delay_next_get(contact, Duration::from_millis(400), 1);

    let slow_read = tokio::spawn({
        let h = h.clone();
        async move { h.get(contact).await }
    });
    // The slow read has reached upstream and read CONSENTED.
    wait_until(Duration::from_secs(5), || async {
        h.sim.gets_for(contact) == 1
    })
    .await;
    let write = h.put(contact, "REFUSED").await;
    assert_eq!(write.status, 200);
    assert!(!slow_read.is_finished(), "the read must still be in flight");

    let during = h.get(contact).await;
    assert_eq!(
        during.status_field(),
        "REFUSED",
        "read started after the write"
    );

    let slow = slow_read.await.unwrap();
    assert_eq!(
        slow.status_field(),
        "CONSENTED",
        "it started before the write"
    );

    for _ in 0..3 {
        let after = h.get(contact).await;
        assert_eq!(
            after.status_field(),
            "REFUSED",
            "the old fill must not be stored"
        );
    }
}

#[tokio::test]
async fn plus_and_encoded_plus_share_one_entry() {
    let h = Harness::start().await;
    h.sim.set_status("+15550010", ConsentStatus::Deleted);
    assert_eq!(h.get("%2B15550010").await.header("x-cache-status"), MISS);
    let hit = h.get("+15550010").await;
    assert_eq!(
        (hit.header("x-cache-status"), hit.status_field().as_str()),
        (HIT, "DELETED")
    );
    assert_eq!(h.sim.gets_for("+15550010"), 1);
}

#[tokio::test]
async fn purge_drops_the_entry_and_needs_admin() {
    let h = Harness::start().await;
    h.sim.set_status("+15550011", ConsentStatus::Consented);
    h.get("+15550011").await;
    assert_eq!(h.get("+15550011").await.header("x-cache-status"), HIT);

    let url = format!("{}/admin/cache/%2B15550011", h.proxy.admin_url());
    let anonymous = h.http.send(Method::DELETE, &url, &[], None).await;
    assert_eq!(anonymous.status, 401);
    let not_admin = h
        .http
        .send(Method::DELETE, &url, &[("x-api-key", RW_KEY)], None)
        .await;
    assert_eq!(
        (not_admin.status, not_admin.code().as_str()),
        (403, "forbidden")
    );
    assert_eq!(h.get("+15550011").await.header("x-cache-status"), HIT);

    let admin = h
        .http
        .send(Method::DELETE, &url, &[("x-api-key", ADMIN_KEY)], None)
        .await;
    assert_eq!(admin.status, 204);
    assert_eq!(h.get("+15550011").await.header("x-cache-status"), MISS);
    assert_eq!(
        h.metric(r#"consent_proxy_cache_invalidations_total{reason="purge"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn disabled_cache_bypasses() {
    let h = Harness::start_with(|c| {
        c.set("cache.enabled", "false");
    })
    .await;
    h.sim.set_status("+15550012", ConsentStatus::Consented);
    for _ in 0..3 {
        assert_eq!(
            h.get("+15550012").await.header("x-cache-status"),
            Some("BYPASS")
        );
    }
    assert_eq!(h.sim.gets_for("+15550012"), 3);
}

// ---- randomized history check of rule 2 ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_history_never_reads_older_than_an_acknowledged_write() {
    let h = Arc::new(
        Harness::start_with(|c| {
            c.set("talkdesk.max_retries", "0");
        })
        .await,
    );
    const CONTACTS: usize = 3;
    const INITIAL: &str = "NO_CONSENT";
    let contacts: Vec<String> = (0..CONTACTS).map(|i| format!("+1555777000{i}")).collect();
    for contact in &contacts {
        h.sim.set_status(contact, ConsentStatus::NoConsent);
    }
    let run_for = Duration::from_secs(4);
    let started = Instant::now();

    // Random upstream delays on reads and writes while the clients run.
    let delays = tokio::spawn({
        let h = h.clone();
        let contacts = contacts.clone();
        async move { random_upstream_delays(&h.sim, &contacts, started + run_for).await }
    });

    let clients: Vec<_> = (0..6)
        .map(|_| {
            let h = h.clone();
            let contacts = contacts.clone();
            tokio::spawn(async move {
                random_client(
                    started + run_for,
                    CONTACTS,
                    1,
                    0.25,
                    0..0,
                    |_, contact| h.get(&contacts[contact]),
                    |_, contact, status| h.put(&contacts[contact], status),
                )
                .await
            })
        })
        .collect();

    let mut history = Vec::new();
    for client in clients {
        history.extend(client.await.unwrap());
    }
    delays.await.unwrap();
    let gets = gets(&history);
    let puts = history.len() - gets;
    let problems = violations(&history, INITIAL);
    println!(
        "history: {} operations ({gets} GETs, {puts} PUTs), {} violations",
        history.len(),
        problems.len()
    );
    assert!(
        gets > 100 && puts > 20,
        "too little traffic to mean anything"
    );
    assert!(
        problems.is_empty(),
        "rule 2 violated:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_history_checker_catches_a_stale_read() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let history = vec![
        Event {
            contact: 0,
            via: 0,
            start: at(0),
            end: at(10),
            op: Op::Put {
                status: "REFUSED".into(),
                acked: true,
            },
        },
        Event {
            contact: 0,
            via: 0,
            start: at(20),
            end: at(30),
            op: Op::Get {
                result: Some("CONSENTED".into()),
            },
        },
    ];
    assert_eq!(violations(&history, "CONSENTED").len(), 1);
    // A read overlapping the write may see either.
    let mut overlapping = history.clone();
    overlapping[1].start = at(5);
    assert!(violations(&overlapping, "CONSENTED").is_empty());
}
