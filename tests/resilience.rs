//! When Talkdesk struggles: the concurrency and rate budgets, upstream's `Retry-After` honoured
//! for every caller, and the circuit breaker. Each against a real socket: a fake upstream that
//! counts what reaches it (and how many at once), or a port that refuses connections.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::fake_upstream::{answer, consent_200, Act, FakeUpstream};
use support::raw_http::free_addr;
use support::*;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A proxy (no cache: every GET goes upstream) in front of `api`, with the simulator's token
/// endpoint.
async fn proxy_for(api: &str, configure: impl FnOnce(&mut ProxyConfig)) -> Harness {
    let api = api.to_owned();
    let h = Harness::start_with_upstream(
        |sim| (api, sim.token_url()),
        |c| {
            c.set("cache.enabled", "false");
            configure(c);
        },
    )
    .await;
    h.wait_ready().await;
    h
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

#[tokio::test]
async fn upstreams_retry_after_holds_off_every_caller_then_traffic_resumes() {
    let fake = FakeUpstream::start(|_, n| {
        if n == 0 {
            Act::Send(answer(
                "429 Too Many Requests",
                &[("Content-Type", "application/json"), ("Retry-After", "2")],
                br#"{"code":"too_many_requests","message":"slow down"}"#,
            ))
        } else {
            Act::Send(consent_200("CONSENTED"))
        }
    })
    .await;
    let h = Arc::new(
        proxy_for(&fake.url(), |c| {
            c.set("talkdesk.max_retries", "0");
        })
        .await,
    );
    let first = h.get("+15557100000").await;
    assert_eq!(first.status, 429, "{}", first.text());
    let held_off_at = Instant::now();

    // Load from four callers for three seconds.
    let mut callers = JoinSet::new();
    for caller in 0..4 {
        let h = h.clone();
        callers.spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0;
            while held_off_at.elapsed() < Duration::from_secs(3) {
                let answer = h.get(&format!("+155571{caller}{i:04}")).await;
                answers.push((held_off_at.elapsed(), answer));
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers
        });
    }
    let answers: Vec<_> = callers.join_all().await.into_iter().flatten().collect();
    let arrivals = fake.seen();
    let first_arrival = arrivals[0].at;
    for later in &arrivals[1..] {
        assert!(
            later.at.duration_since(first_arrival) >= Duration::from_millis(1900),
            "upstream saw a request {:?} after its 429 asked for 2 s",
            later.at.duration_since(first_arrival)
        );
    }
    for (at, answer) in &answers {
        if *at < Duration::from_millis(1900) {
            assert!(
                is_unavailable(answer),
                "at {at:?}: {} {}",
                answer.status,
                answer.text()
            );
        }
    }
    let resumed = answers
        .iter()
        .filter(|(at, a)| *at > Duration::from_millis(2100) && a.status == 200)
        .count();
    assert!(resumed > 0, "traffic resumes after the Retry-After");
    assert!(arrivals.len() > 1);
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
