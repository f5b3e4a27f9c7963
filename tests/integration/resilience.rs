//! When Talkdesk struggles: the concurrency and rate budgets, upstream's `Retry-After` honoured
//! for every caller, the circuit breaker, and STALE answers from the cache meanwhile. Each
//! against a real socket: a fake upstream that counts what reaches it (and how many at once),
//! the simulator with its faults, or a port that refuses connections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::fake_upstream::{answer, consent_200, Act, FakeUpstream};
use crate::support::raw_http::free_addr;
use crate::support::*;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A proxy (no cache: every GET goes upstream) in front of `api`, with the simulator's token
/// endpoint.
async fn proxy_for(api: &str, configure: impl FnOnce(&mut ProxyConfig)) -> Harness {
    Harness::start_for_api(api, |c| {
        c.set("cache.enabled", "false");
        configure(c);
    })
    .await
}

/// GETs of `n` distinct contacts at once; each answer with how long it took.
async fn concurrent_gets(h: &Arc<Harness>, n: usize) -> Vec<(TestResponse, Duration)> {
    let mut gets = JoinSet::new();
    for i in 0..n {
        let h = h.clone();
        gets.spawn(async move {
            let started = Instant::now();
            let answer = h.get(&format!("+1555700{i:04}")).await;
            (answer, started.elapsed())
        });
    }
    gets.join_all().await
}

fn is_unavailable(answer: &TestResponse) -> bool {
    answer.status == 503
        && answer.code() == "upstream_unavailable"
        && answer
            .header("retry-after")
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|s| s >= 1)
}

#[tokio::test]
async fn max_concurrent_bounds_what_upstream_sees_and_late_callers_get_503_before_the_deadline() {
    let fake = FakeUpstream::start(|_, _| {
        Act::SendAfter(Duration::from_millis(300), consent_200("CONSENTED"))
    })
    .await;
    // Room for three waves of four within the deadline: everyone is served, four at a time.
    let h = Arc::new(
        proxy_for(&fake.url(), |c| {
            c.set("talkdesk.max_concurrent", "4")
                .set("server.request_timeout_ms", "3000");
        })
        .await,
    );
    let answers = concurrent_gets(&h, 12).await;
    assert!(answers.iter().all(|(a, _)| a.status == 200), "all served");
    assert_eq!(
        fake.max_concurrent(),
        4,
        "upstream never saw more than four at once"
    );

    // Upstream slower than the deadline: the first four reach it and time out (504); the
    // rest never get a slot before their deadline and hear 503 upstream_unavailable (with
    // Retry-After) just before it, instead of the 504 the deadline would give them.
    let fake = FakeUpstream::start(|_, _| {
        Act::SendAfter(Duration::from_millis(900), consent_200("CONSENTED"))
    })
    .await;
    let h = Arc::new(
        proxy_for(&fake.url(), |c| {
            c.set("talkdesk.max_concurrent", "4")
                .set("talkdesk.max_retries", "0")
                .set("talkdesk.breaker_failures", "0")
                .set("server.request_timeout_ms", "600");
        })
        .await,
    );
    let answers = concurrent_gets(&h, 12).await;
    let timed_out = answers
        .iter()
        .filter(|(a, _)| a.status == 504 && a.code() == "upstream_timeout")
        .count();
    let refused = answers.iter().filter(|(a, _)| is_unavailable(a)).count();
    assert_eq!((timed_out, refused), (4, 8), "{:?}", statuses(&answers));
    assert!(fake.max_concurrent() <= 4);
    assert_eq!(fake.seen().len(), 4, "the refused never reached upstream");
}

#[tokio::test]
async fn a_rate_budget_refuses_at_once_what_it_cannot_serve_before_the_deadline() {
    let fake = FakeUpstream::start(|_, _| Act::Send(consent_200("CONSENTED"))).await;
    let h = Arc::new(
        proxy_for(&fake.url(), |c| {
            c.set("talkdesk.max_requests_per_s", "5")
                .set("server.request_timeout_ms", "1000");
        })
        .await,
    );
    let answers = concurrent_gets(&h, 20).await;
    let served = answers.iter().filter(|(a, _)| a.status == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(a, _)| is_unavailable(a)).collect();
    assert_eq!(served + refused.len(), 20, "{:?}", statuses(&answers));
    // A burst of five, then one every 200 ms within the (one second) deadline.
    assert!((5..=10).contains(&served), "{served} served");
    assert_eq!(fake.seen().len(), served);
    let slowest_refusal = refused.iter().map(|(_, took)| *took).max().unwrap();
    assert!(
        slowest_refusal < Duration::from_millis(500),
        "refusals come at once, not at the 1 s deadline: {slowest_refusal:?}"
    );
}

/// A 429 with `Retry-After: 2` under load: upstream sees nothing for two seconds; callers of
/// contacts the cache holds (expired) are answered STALE, the others 503 `upstream_unavailable`
/// with `Retry-After`, and traffic resumes afterwards.
#[tokio::test]
async fn upstreams_retry_after_holds_off_every_caller_then_traffic_resumes() {
    const TRIGGER: &str = "+15557100000";
    let limited = Arc::new(AtomicBool::new(false));
    let fake = FakeUpstream::start({
        let limited = limited.clone();
        move |seen, _| {
            if seen.target.contains(&TRIGGER[1..]) && !limited.swap(true, Ordering::SeqCst) {
                Act::Send(answer(
                    "429 Too Many Requests",
                    &[("Content-Type", "application/json"), ("Retry-After", "2")],
                    br#"{"code":"too_many_requests","message":"slow down"}"#,
                ))
            } else {
                Act::Send(consent_200("CONSENTED"))
            }
        }
    })
    .await;
    let h = Arc::new(
        proxy_for(&fake.url(), |c| {
            c.set("talkdesk.max_retries", "0")
                .set("cache.enabled", "true")
                .set("cache.ttl_s", "1")
                .set("cache.stale_if_error_s", "30");
        })
        .await,
    );
    let cached = |i: usize| format!("+155571090{:02}", i % 20);
    for i in 0..20 {
        assert_eq!(h.get(&cached(i)).await.status, 200);
    }
    let warmed = fake.seen().len();
    // The TTL passes: from here on every cached contact needs upstream.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let first = h.get(TRIGGER).await;
    assert_eq!(first.status, 429, "{}", first.text());
    let held_off_at = Instant::now();

    // Load from four callers for three seconds, half on cached contacts.
    let mut callers = JoinSet::new();
    for caller in 0..4 {
        let h = h.clone();
        callers.spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0;
            while held_off_at.elapsed() < Duration::from_secs(3) {
                let was_cached = i % 2 == 0;
                let contact = if was_cached {
                    cached(caller * 5 + i)
                } else {
                    format!("+155571{caller}{i:04}")
                };
                let answer = h.get(&contact).await;
                answers.push((held_off_at.elapsed(), was_cached, answer));
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers
        });
    }
    let answers: Vec<_> = callers.join_all().await.into_iter().flatten().collect();
    let arrivals = fake.seen();
    let limited_at = arrivals[warmed].at;
    for later in &arrivals[warmed + 1..] {
        assert!(
            later.at.duration_since(limited_at) >= Duration::from_millis(1900),
            "upstream saw a request {:?} after its 429 asked for 2 s",
            later.at.duration_since(limited_at)
        );
    }
    let mut stale = 0;
    for (at, was_cached, answer) in &answers {
        if *at < Duration::from_millis(1900) {
            if *was_cached {
                assert_eq!(
                    (answer.status, answer.header("x-cache-status")),
                    (200, Some("STALE")),
                    "at {at:?}: {}",
                    answer.text()
                );
                stale += 1;
            } else {
                assert!(
                    is_unavailable(answer),
                    "at {at:?}: {} {}",
                    answer.status,
                    answer.text()
                );
            }
        }
    }
    assert!(stale > 20, "{stale} STALE answers");
    let resumed = answers
        .iter()
        .filter(|(at, _, a)| {
            *at > Duration::from_millis(2100)
                && a.status == 200
                && a.header("x-cache-status") != Some("STALE")
        })
        .count();
    assert!(resumed > 0, "traffic resumes after the Retry-After");
    assert!(arrivals.len() > warmed + 1);
}

/// 1,000 contacts cached, then upstream answers 500 to everything: once the TTL has passed,
/// every GET of them is answered STALE (with the status cached, `Age` and `Warning`), and
/// upstream sees nothing but the breaker's probes; past `ttl_s + stale_if_error_s` they fail
/// with `upstream_unavailable` (the circuit is open) or, for a probe, `upstream_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_contacts_are_answered_stale_while_upstream_fails_and_only_probes_reach_it() {
    const CONTACTS: usize = 1000;
    const TTL: Duration = Duration::from_secs(1);
    const STALE: Duration = Duration::from_secs(3);
    const COOLDOWN: Duration = Duration::from_millis(300);
    let h = Arc::new(
        Harness::start_with(|c| {
            c.set("cache.ttl_s", "1")
                .set("cache.stale_if_error_s", "3")
                .set("talkdesk.breaker_failures", "3")
                .set(
                    "talkdesk.breaker_cooldown_ms",
                    &COOLDOWN.as_millis().to_string(),
                );
        })
        .await,
    );
    h.wait_ready().await;
    let statuses = [
        ConsentStatus::NoConsent,
        ConsentStatus::Consented,
        ConsentStatus::Deleted,
        ConsentStatus::Refused,
    ];
    let contact = |i: usize| format!("+15557300{i:04}");
    for i in 0..CONTACTS {
        h.sim.set_status(&contact(i), statuses[i % 4]);
    }
    // When each contact was cached (between the two instants).
    let cached_at: Vec<(Instant, Instant)> = for_each_contact(&h, CONTACTS, 32, |_, answer| {
        assert_eq!(answer.header("x-cache-status"), Some("MISS"));
    })
    .await;
    let last_cached = cached_at.iter().map(|(_, end)| *end).max().unwrap();
    tokio::time::sleep_until(last_cached + TTL + Duration::from_millis(50)).await;
    h.sim.inject(SimRoute::Get, Fault::Status500, u32::MAX);

    // The first GET opens the circuit (its three attempts fail) and is answered STALE.
    let first = h.get(&contact(0)).await;
    assert_eq!(
        first.header("x-cache-status"),
        Some("STALE"),
        "{}",
        first.text()
    );
    assert_eq!(h.metric("consent_proxy_upstream_circuit_open").await, 1.0);
    let upstream_before = h.sim.stats().gets;
    let phase = Instant::now();
    let checked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let timing = for_each_contact(&h, CONTACTS, 16, {
        let checked = checked.clone();
        move |i, answer| {
            let (cached_from, _) = cached_at[i];
            // Certainly within TTL + STALE when the GET ended: it must be STALE.
            if Instant::now() < cached_from + TTL + STALE - Duration::from_millis(50) {
                assert_eq!(
                    (answer.status, answer.header("x-cache-status")),
                    (200, Some("STALE")),
                    "contact {i}: {}",
                    answer.text()
                );
                assert_eq!(answer.status_field(), statuses[i % 4].as_str());
                assert!(answer
                    .header("warning")
                    .is_some_and(|w| w.starts_with("111 ")));
                let age: u64 = answer.header("age").unwrap().parse().unwrap();
                assert!((1..4).contains(&age), "Age {age}");
                checked.fetch_add(1, Ordering::SeqCst);
            }
        }
    })
    .await;
    let phase_took = phase.elapsed();
    let probes = h.sim.stats().gets - upstream_before;
    let checked = checked.load(Ordering::SeqCst);
    let slowest = timing
        .iter()
        .map(|(start, end)| end.duration_since(*start))
        .max()
        .unwrap();
    println!(
        "{checked} STALE answers checked in {phase_took:?} (slowest {slowest:?}); {probes} \
         upstream GETs"
    );
    assert!(checked >= CONTACTS / 2, "only {checked} GETs checked");
    let most_probes = (phase_took.as_millis() / COOLDOWN.as_millis()) as u64 + 1;
    assert!(
        probes <= most_probes,
        "{probes} upstream GETs in {phase_took:?}: more than one probe per cooldown"
    );

    // Past TTL + STALE for every contact: the failure is the answer.
    tokio::time::sleep_until(last_cached + TTL + STALE + Duration::from_millis(50)).await;
    for i in (0..CONTACTS).step_by(50) {
        let late = h.get(&contact(i)).await;
        assert!(
            is_unavailable(&late) || (late.status, late.code().as_str()) == (502, "upstream_error"),
            "contact {i}: {} {}",
            late.status,
            late.text()
        );
    }
    assert!(
        h.metric(r#"consent_proxy_cache_lookups_total{result="stale"}"#)
            .await
            >= checked as f64
    );
}

/// GETs of contacts `0..n` (`+15557300NNNN`), `concurrency` at a time; `check(i, answer)` on
/// each answer. Returns when each GET started and ended.
async fn for_each_contact(
    h: &Arc<Harness>,
    n: usize,
    concurrency: usize,
    check: impl Fn(usize, &TestResponse) + Send + Sync + 'static,
) -> Vec<(Instant, Instant)> {
    let check = Arc::new(check);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (h, check, next) = (h.clone(), check.clone(), next.clone());
        workers.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return done;
                }
                let start = Instant::now();
                let answer = h.get(&format!("+15557300{i:04}")).await;
                check(i, &answer);
                done.push((i, start, Instant::now()));
            }
        });
    }
    let mut times = vec![(Instant::now(), Instant::now()); n];
    for (i, start, end) in workers.join_all().await.into_iter().flatten() {
        times[i] = (start, end);
    }
    times
}

#[tokio::test]
async fn the_breaker_opens_after_consecutive_failures_probes_once_per_cooldown_and_closes() {
    let api = free_addr().await;
    let h = proxy_for(&format!("http://{api}"), |c| {
        c.set("talkdesk.breaker_failures", "3")
            .set("talkdesk.breaker_cooldown_ms", "400")
            .set("talkdesk.max_retries", "0");
    })
    .await;
    let attempts =
        || h.metric(r#"consent_proxy_upstream_requests_total{code="error",method="GET"}"#);
    // Connections are refused: three failed attempts open the circuit.
    for i in 0..3 {
        let answer = h.get(&format!("+155572000{i:02}")).await;
        assert_eq!(answer.status, 502, "{}", answer.text());
    }
    assert_eq!(h.metric("consent_proxy_upstream_circuit_open").await, 1.0);
    assert_eq!(attempts().await, 3.0);

    // While open, callers hear at once, nothing is attempted but one probe per cooldown.
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut refused = 0;
    while started.elapsed() < Duration::from_millis(1300) {
        let asked = Instant::now();
        let answer = h.get("+15557200100").await;
        if is_unavailable(&answer) {
            refused += 1;
            slowest = slowest.max(asked.elapsed());
        } else {
            assert_eq!(answer.status, 502, "a probe: {}", answer.text());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let probes = attempts().await - 3.0;
    assert!(
        (1.0..=4.0).contains(&probes),
        "{probes} probes in 1.3 s with a 400 ms cooldown"
    );
    assert!(refused > 20, "{refused} refused");
    assert!(
        slowest < Duration::from_millis(100),
        "an open circuit answers at once; slowest {slowest:?}"
    );

    // Upstream comes back: the next probe succeeds and closes the circuit.
    let back = Arc::new(AtomicBool::new(true));
    let listener = TcpListener::bind(api).await.expect("rebind the API port");
    let up = back.clone();
    let fake = FakeUpstream::serve(listener, move |_, _| {
        assert!(up.load(Ordering::SeqCst));
        Act::Send(consent_200("REFUSED"))
    });
    wait_until(Duration::from_secs(5), || async {
        h.get("+15557200101").await.status == 200
    })
    .await;
    assert_eq!(h.metric("consent_proxy_upstream_circuit_open").await, 0.0);
    let answers: Vec<u16> = futures_statuses(&h, 5).await;
    assert_eq!(
        answers,
        vec![200; 5],
        "closed: everyone goes upstream again"
    );
    assert!(fake.seen().len() >= 6);
}

async fn futures_statuses(h: &Harness, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(h.get(&format!("+15557200{:03}", 200 + i)).await.status);
    }
    out
}

fn statuses(answers: &[(TestResponse, Duration)]) -> Vec<(u16, String)> {
    answers.iter().map(|(a, _)| (a.status, a.code())).collect()
}
