//! The consent cache through the whole proxy: hits, TTLs, coalescing, what is never cached,
//! write-through without races (including a randomized history check of
//! read-your-writes, rule 2 of docs/CONSISTENCY.md), `%2B` equivalence and the admin purge; STALE answers when upstream
//! cannot answer (never older than a write the proxy knows of: rule 6, also checked over a
//! randomized history with upstream outages) and refreshing ahead of the TTL.

use std::sync::Arc;
use std::time::Duration;

use crate::support::fake_upstream::{answer, consent_200, Act, FakeUpstream};
use crate::support::history::{
    gets, random_upstream_delays, random_upstream_outages, stale_violations, violations, Event, Op,
    OutageFaults, RandomClient,
};
use crate::support::*;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute};
use http::Method;
use tokio::time::Instant;

const HIT: Option<&str> = Some("HIT");
const MISS: Option<&str> = Some("MISS");
const STALE: Option<&str> = Some("STALE");
/// The `Warning` on a STALE answer.
const REVALIDATION_FAILED: Option<&str> = Some(r#"111 consent-proxy "Revalidation Failed""#);

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

/// A PUT one of whose attempts may have applied (a gateway in front of upstream answered 502
/// before a retry) has an unknown outcome however its retries end, a 500 or a 4xx: the entry
/// is dropped, never kept at the older status.
#[tokio::test]
async fn a_put_retried_after_a_gateway_error_has_an_unknown_outcome_however_it_ends() {
    let h = Harness::start_with(|c| {
        c.set("talkdesk.max_retries", "1");
    })
    .await;
    let contact = "+15550018";
    h.sim.set_status(contact, ConsentStatus::Consented);
    let respond = |status: u16| Fault::Respond {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: bytes::Bytes::from_static(br#"{"code":"x","message":"y"}"#),
    };
    for (then, answered) in [(Fault::Status500, 502), (respond(409), 409)] {
        assert_eq!(h.get(contact).await.status_field(), "CONSENTED");
        assert_eq!(h.get(contact).await.header("x-cache-status"), HIT);
        h.sim.inject(SimRoute::Put, respond(502), 1);
        h.sim.inject(SimRoute::Put, then.clone(), 1);
        assert_eq!(h.put(contact, "REFUSED").await.status, answered, "{then:?}");
        assert_eq!(
            h.get(contact).await.header("x-cache-status"),
            MISS,
            "after a 502 then {then:?}, the entry is dropped"
        );
    }
}

/// Rule 2 in its sharpest form: a read that started before a write and ends
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

// ---- stale-if-error ----

/// TTL 1 s, STALE answers up to 30 s past it, no retries (each failure ends the fill at once).
fn stale_if_error(c: &mut ProxyConfig) {
    c.set("cache.ttl_s", "1")
        .set("cache.stale_if_error_s", "30")
        .set("talkdesk.max_retries", "0")
        .set("talkdesk.breaker_failures", "0");
}

/// The TTL is the behaviour under test: let it pass.
async fn let_the_ttl_pass() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

fn assert_stale(response: &TestResponse, status: &str) {
    assert_eq!(
        (response.status, response.header("x-cache-status")),
        (200, STALE),
        "{}",
        response.text()
    );
    assert_eq!(response.status_field(), status);
    assert_eq!(response.header("warning"), REVALIDATION_FAILED);
    let age: u64 = response.header("age").unwrap().parse().unwrap();
    assert!((1..30).contains(&age), "Age {age}");
}

#[tokio::test]
async fn when_upstream_cannot_answer_an_expired_entry_answers_stale_but_a_404_is_an_answer() {
    let h = Harness::start_with(|c| {
        stale_if_error(c);
        c.set("talkdesk.timeout_ms", "300");
    })
    .await;
    let contact = "+15550013";
    h.sim.set_status(contact, ConsentStatus::Consented);
    assert_eq!(h.get(contact).await.header("x-cache-status"), MISS);
    let_the_ttl_pass().await;
    for fault in [
        Fault::Status500,
        Fault::TooManyRequests { retry_after_s: 0 },
        Fault::CloseConnection,
        Fault::Delay(Duration::from_millis(400)),
    ] {
        h.sim.inject(SimRoute::Get, fault.clone(), 1);
        assert_stale(&h.get(contact).await, "CONSENTED");
    }
    assert_eq!(
        h.metric(r#"consent_proxy_cache_lookups_total{result="stale"}"#)
            .await,
        4.0
    );
    assert_eq!(
        h.metric(r#"consent_proxy_cache_lookups_total{result="miss"}"#)
            .await,
        1.0,
        "a STALE answer is counted as STALE only"
    );
    // A 400 or a 404 from upstream is an answer: passed on, never replaced by a stale one.
    h.sim.inject(
        SimRoute::Get,
        Fault::Respond {
            status: 400,
            headers: vec![("content-type".into(), "application/json".into())],
            body: bytes::Bytes::from_static(br#"{"code":"bad_request","message":"no"}"#),
        },
        1,
    );
    assert_eq!(h.get(contact).await.status, 400);
    h.sim.remove_contact(contact);
    let gone = h.get(contact).await;
    assert_eq!((gone.status, gone.header("x-cache-status")), (404, MISS));
}

/// Rule 6: the status a PUT wrote is what a STALE answer says afterwards; after a PUT whose
/// outcome is unknown there is no STALE answer at all.
#[tokio::test]
async fn a_stale_answer_is_never_older_than_a_write() {
    let h = Harness::start_with(|c| {
        stale_if_error(c);
        c.set("talkdesk.timeout_ms", "300");
    })
    .await;
    let contact = "+15550014";
    h.sim.set_status(contact, ConsentStatus::Consented);
    assert_eq!(h.get(contact).await.status_field(), "CONSENTED");
    assert_eq!(h.put(contact, "REFUSED").await.status, 200);
    let_the_ttl_pass().await;
    h.sim.inject(SimRoute::Get, Fault::Status500, u32::MAX);
    assert_stale(&h.get(contact).await, "REFUSED");

    // A PUT that outlives the attempt timeout may have been applied: the entry is dropped.
    h.sim
        .inject(SimRoute::Put, Fault::Delay(Duration::from_millis(400)), 1);
    assert_eq!(h.put(contact, "CONSENTED").await.status, 504);
    let after = h.get(contact).await;
    assert_eq!(
        (after.status, after.code().as_str()),
        (502, "upstream_error"),
        "no STALE answer from before a write that may have applied"
    );
}

/// Rule 6 against a write that completes while the GET's fill is in flight: when the fill
/// fails, the GET falls back on what the write left, not on the entry its lookup found.
#[tokio::test]
async fn a_get_whose_fill_fails_after_a_put_returned_falls_back_on_the_put() {
    // GETs: CONSENTED at first, then 500 after 400 ms. PUTs: 200 at once.
    let fake = FakeUpstream::start(|seen, n| match (seen.method.as_str(), n) {
        ("PUT", _) => Act::Send(consent_200("REFUSED")),
        (_, 0) => Act::Send(consent_200("CONSENTED")),
        _ => Act::SendAfter(
            Duration::from_millis(400),
            answer("500 Internal Server Error", &[], b"{}"),
        ),
    })
    .await;
    let h = Arc::new(
        Harness::start_with_upstream(|sim| (fake.url(), sim.token_url()), stale_if_error).await,
    );
    h.wait_ready().await;
    let contact = "+15550015";
    assert_eq!(h.get(contact).await.status_field(), "CONSENTED");
    let_the_ttl_pass().await;
    let slow = tokio::spawn({
        let h = h.clone();
        async move { h.get(contact).await }
    });
    fake.wait_for_requests(2).await;
    assert_eq!(h.put(contact, "REFUSED").await.status, 200);
    assert!(
        !slow.is_finished(),
        "the GET's fill must still be in flight"
    );
    let slow = slow.await.unwrap();
    assert_eq!(
        (slow.status_field().as_str(), slow.header("x-cache-status")),
        ("REFUSED", HIT),
        "the write's fresh entry, not a STALE answer older than the write"
    );
}

/// A GET whose upstream call is still pending near its deadline (upstream holds it, the
/// attempt timeout is longer than the deadline) is answered STALE before the deadline, not 504
/// at it.
#[tokio::test]
async fn a_get_still_pending_near_its_deadline_is_answered_stale_before_it() {
    let fake = FakeUpstream::start(|_, n| match n {
        0 => Act::Send(consent_200("REFUSED")),
        _ => Act::Hang,
    })
    .await;
    let h = Harness::start_with_upstream(
        |sim| (fake.url(), sim.token_url()),
        |c| {
            stale_if_error(c);
            c.set("server.request_timeout_ms", "1000")
                .set("talkdesk.timeout_ms", "5000");
        },
    )
    .await;
    h.wait_ready().await;
    let contact = "+15550019";
    assert_eq!(h.get(contact).await.status_field(), "REFUSED");
    let_the_ttl_pass().await;
    let asked = Instant::now();
    let stale = h.get(contact).await;
    let took = asked.elapsed();
    assert_stale(&stale, "REFUSED");
    assert!(
        (Duration::from_millis(700)..Duration::from_millis(1000)).contains(&took),
        "answered after {took:?}: 250 ms before the 1 s deadline expected"
    );
    // Without an entry to fall back on, the deadline's 504.
    let other = h.get("+15550020").await;
    assert_eq!(
        (other.status, other.code().as_str()),
        (504, "upstream_timeout")
    );
}

/// Past `ttl_s + stale_if_error_s` an entry answers nothing.
#[tokio::test]
async fn past_the_stale_window_the_failure_is_answered() {
    let h = Harness::start_with(|c| {
        stale_if_error(c);
        c.set("cache.stale_if_error_s", "1");
    })
    .await;
    let contact = "+15550016";
    h.sim.set_status(contact, ConsentStatus::Deleted);
    h.get(contact).await;
    h.sim.inject(SimRoute::Get, Fault::Status500, u32::MAX);
    let_the_ttl_pass().await;
    assert_stale(&h.get(contact).await, "DELETED");
    let_the_ttl_pass().await;
    let late = h.get(contact).await;
    assert_eq!((late.status, late.code().as_str()), (502, "upstream_error"));
}

// ---- refresh-ahead ----

/// One contact looked up back to back for several TTLs (2 s, refreshed in its last second):
/// after the first MISS every lookup is a HIT, never waiting on upstream, and upstream sees one
/// GET per refresh, one every `ttl_s - refresh_ahead_s`. A change made upstream behind the
/// proxy's back is seen within that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_looked_up_continuously_is_refreshed_in_the_background() {
    let h = Harness::start_with(|c| {
        c.set("cache.ttl_s", "2").set("cache.refresh_ahead_s", "1");
    })
    .await;
    let contact = "+15550017";
    h.sim.set_status(contact, ConsentStatus::Consented);
    let started = Instant::now();
    let first = h.get(contact).await;
    assert_eq!(first.header("x-cache-status"), MISS);
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let mut changed_at = None;
    let mut refused_seen_after = None;
    while started.elapsed() < Duration::from_millis(6500) {
        if changed_at.is_none() && started.elapsed() > Duration::from_secs(4) {
            h.sim.set_status(contact, ConsentStatus::Refused);
            changed_at = Some(Instant::now());
        }
        let answer = h.get(contact).await;
        assert_eq!(answer.status, 200);
        *seen
            .entry(answer.header("x-cache-status").unwrap_or("-").to_owned())
            .or_default() += 1;
        if let (Some(at), None) = (changed_at, refused_seen_after) {
            if answer.status_field() == "REFUSED" {
                refused_seen_after = Some(at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let upstream = h.sim.gets_for(contact) as f64;
    let refreshes = h.metric("consent_proxy_cache_refreshes_total").await;
    println!("{seen:?}; {upstream} upstream GETs in {elapsed:.1} s, {refreshes} refreshes");
    assert_eq!(seen.keys().collect::<Vec<_>>(), vec!["HIT"], "{seen:?}");
    assert_eq!(upstream, refreshes + 1.0);
    // One refresh every second at the most (the first once the entry is 1 s old), and at
    // least one per TTL, or a lookup would have missed.
    assert!(
        (elapsed / 2.0..=elapsed + 1.0).contains(&upstream),
        "{upstream} upstream GETs in {elapsed:.1} s"
    );
    let refused_after = refused_seen_after.expect("the change upstream was seen");
    assert!(
        refused_after < Duration::from_millis(1500),
        "{refused_after:?}"
    );
}

// ---- randomized histories with upstream outages: rules 2 and 6 ----

/// Mixed faults (500, 429 with and without `Retry-After`, closed connections, timeouts) and a
/// breaker that opens on them; random clients over twelve contacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_history_with_outages_never_answers_stale_older_than_a_write() {
    history_with_outages(OutageFaults::Mixed).await;
}

/// Every upstream failure is a timeout, so a fill fails at least that long after its GET
/// began, and each contact has one reader (no GET joins another's fill): a write acknowledged
/// within that time is one the proxy knew of when it answered, and the STALE answer must not
/// be older than it. (Remembering the entry the lookup found, instead of reading it again when
/// the fill fails, breaks this one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_history_with_slow_outages_falls_back_on_writes_made_during_the_get() {
    history_with_outages(OutageFaults::Slow).await;
}

async fn history_with_outages(faults: OutageFaults) {
    const TTL_S: u64 = 1;
    const STALE_S: u64 = 3;
    const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(200);
    const CONTACTS: usize = 12;
    const INITIAL: &str = "NO_CONSENT";
    let slow = faults == OutageFaults::Slow;
    let h = Arc::new(
        Harness::start_with(|c| {
            c.set("cache.ttl_s", &TTL_S.to_string())
                .set("cache.stale_if_error_s", &STALE_S.to_string())
                .set("talkdesk.max_retries", "0")
                .set(
                    "talkdesk.timeout_ms",
                    &ATTEMPT_TIMEOUT.as_millis().to_string(),
                )
                .set("talkdesk.breaker_failures", if slow { "0" } else { "3" })
                .set("talkdesk.breaker_cooldown_ms", "200");
        })
        .await,
    );
    let contacts: Vec<String> = (0..CONTACTS).map(|i| format!("+155577710{i:02}")).collect();
    for contact in &contacts {
        h.sim.set_status(contact, ConsentStatus::NoConsent);
    }
    let run_for = Duration::from_secs(8);
    let until = Instant::now() + run_for;
    let delays = tokio::spawn({
        let h = h.clone();
        let contacts = contacts.clone();
        async move { random_upstream_delays(&h.sim, &contacts, until).await }
    });
    let outages = tokio::spawn({
        let h = h.clone();
        let past_timeout = ATTEMPT_TIMEOUT + Duration::from_millis(100);
        async move { random_upstream_outages(&h.sim, faults, past_timeout, until).await }
    });
    let get = |h: &Arc<Harness>, contact: &str| {
        let (h, contact) = (h.clone(), contact.to_owned());
        async move { h.get(&contact).await }
    };
    let put = |h: &Arc<Harness>, contact: &str, status: &'static str| {
        let (h, contact) = (h.clone(), contact.to_owned());
        async move { h.put(&contact, status).await }
    };
    // Mixed: four clients, each reading and writing any contact. Slow: six readers with two
    // contacts of their own, and one writer of all of them.
    let mut clients = Vec::new();
    let (readers, owned) = if slow { (6, 2) } else { (4, CONTACTS) };
    for reader in 0..readers {
        let (h, contacts) = (h.clone(), contacts.clone());
        let first = if slow { reader * owned } else { 0 };
        let put_share = if slow { 0.0 } else { 0.1 };
        clients.push(tokio::spawn(async move {
            let mut events = RandomClient {
                until,
                contacts: owned,
                instances: 1,
                put_share,
                pause_ms: 5..30,
            }
            .run(
                |_, c| get(&h, &contacts[first + c]),
                |_, c, status| put(&h, &contacts[first + c], status),
            )
            .await;
            events.iter_mut().for_each(|e| e.contact += first);
            events
        }));
    }
    if slow {
        let (h, contacts) = (h.clone(), contacts.clone());
        clients.push(tokio::spawn(async move {
            RandomClient {
                until,
                contacts: CONTACTS,
                instances: 1,
                put_share: 1.0,
                pause_ms: 50..150,
            }
            .run(
                |_, c| get(&h, &contacts[c]),
                |_, c, status| put(&h, &contacts[c], status),
            )
            .await
        }));
    }
    let mut history = Vec::new();
    for client in clients {
        history.extend(client.await.unwrap());
    }
    delays.await.unwrap();
    let outages = outages.await.unwrap();
    let gets = gets(&history);
    let puts = history.len() - gets;
    let rule_2 = violations(&history, INITIAL);
    let failure_latency = if slow {
        ATTEMPT_TIMEOUT
    } else {
        Duration::ZERO
    };
    let rule_6 = stale_violations(
        &history,
        Duration::from_secs(TTL_S + STALE_S),
        failure_latency,
    );
    println!(
        "{faults:?}: {} operations ({gets} GETs, {puts} PUTs), {outages} outages, {} STALE \
         answers ({} held to a write), {} writes during a failing GET; violations: rule 2 {}, \
         rule 6 {}",
        history.len(),
        rule_6.stale,
        rule_6.after_a_write,
        rule_6.writes_during_failing_gets,
        rule_2.len(),
        rule_6.violations.len()
    );
    assert!(
        gets > 200 && puts > 20 && outages >= 2,
        "too little traffic to mean anything"
    );
    assert!(
        rule_6.stale > 20 && rule_6.after_a_write > 5,
        "too few STALE answers to mean anything"
    );
    if slow {
        assert!(
            rule_6.writes_during_failing_gets > 3,
            "too few writes during failing GETs to mean anything"
        );
    }
    assert!(rule_2.is_empty(), "rule 2 violated:\n{}", rule_2.join("\n"));
    assert!(
        rule_6.violations.is_empty(),
        "rule 6 violated:\n{}",
        rule_6.violations.join("\n")
    );
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
                RandomClient {
                    until: started + run_for,
                    contacts: CONTACTS,
                    instances: 1,
                    put_share: 0.25,
                    pause_ms: 0..0,
                }
                .run(
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
                stale_age_s: None,
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

#[test]
fn the_stale_checker_catches_an_answer_older_than_a_write_or_its_window() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let event = |start, end, op| Event {
        contact: 0,
        via: 0,
        start: at(start),
        end: at(end),
        op,
    };
    let write = event(
        0,
        10,
        Op::Put {
            status: "REFUSED".into(),
            acked: true,
        },
    );
    let stale = |start, age_s| {
        event(
            start,
            start + 5,
            Op::Get {
                result: Some("REFUSED".into()),
                stale_age_s: Some(age_s),
            },
        )
    };
    let limit = Duration::from_secs(4);
    let check = |history: &[Event]| stale_violations(history, limit, Duration::ZERO);
    let slow_failures =
        |history: &[Event]| stale_violations(history, limit, Duration::from_millis(200));
    // 2.5 s after the write began, an answer 2 s old may be the write's; one 3 s old is not.
    let fine = check(&[write.clone(), stale(2500, 2)]);
    assert_eq!((fine.stale, fine.after_a_write), (1, 1));
    assert!(fine.violations.is_empty());
    assert_eq!(check(&[write.clone(), stale(2500, 3)]).violations.len(), 1);
    // A GET that began before the write ended is not held to it, unless failures are known
    // to take longer than that; the window always holds.
    assert!(check(&[write.clone(), stale(5, 3)]).violations.is_empty());
    let during = slow_failures(&[write.clone(), stale(5, 1)]);
    assert_eq!(during.violations.len(), 1);
    assert_eq!(check(&[stale(6000, 4)]).violations.len(), 1);
}
