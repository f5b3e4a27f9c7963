//! The retry policy, counted at upstream: connect errors, 5xx and 429 are retried for GET and
//! PUT, at most `max_retries` times, with growing back-off, honouring `Retry-After` when it fits
//! the request's deadline and never running past it; a timed-out attempt is not retried; the
//! retry after a token renewal (upstream 401) does not count against `max_retries`.

use std::sync::Arc;
use std::time::Duration;

use crate::support::fake_upstream::{answer, consent_200, Act, FakeUpstream};
use crate::support::raw_http::free_addr;
use crate::support::*;
use bytes::Bytes;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute};
use tokio::net::TcpListener;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// A fake consent API (crate::support::fake_upstream) that records when each request arrived

fn unavailable() -> Act {
    Act::Send(answer(
        "503 Service Unavailable",
        &[("Content-Type", "application/json")],
        br#"{"code":"unavailable","message":"try later"}"#,
    ))
}

fn ok_answer() -> Act {
    Act::Send(consent_200("CONSENTED"))
}

/// A GET of `contact` for `SimRoute::Get`, else a PUT of `put_status`; and how long it took.
async fn timed_call(
    h: &Harness,
    route: SimRoute,
    contact: &str,
    put_status: &str,
) -> (TestResponse, Duration) {
    let started = Instant::now();
    let response = if route == SimRoute::Get {
        h.get(contact).await
    } else {
        h.put(contact, put_status).await
    };
    (response, started.elapsed())
}

async fn upstream_attempts(h: &Harness, method: &str, code: &str) -> f64 {
    h.metric(&format!(
        r#"consent_proxy_upstream_requests_total{{code="{code}",method="{method}"}}"#
    ))
    .await
}

fn assert_error(response: &TestResponse, status: u16, code: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.code(), code, "{}", response.text());
}

// ---------------------------------------------------------------------------------------------
// Connect errors

#[tokio::test]
async fn get_and_put_are_retried_on_connect_errors_until_upstream_listens() {
    let api = free_addr().await;
    let h = Arc::new(
        Harness::start_for_api(&format!("http://{api}"), |c| {
            // Back-off 25-50, 50-100, 100-200, 200-400, 400-800 ms: room to start listening.
            c.set("talkdesk.max_retries", "5")
                .set("server.request_timeout_ms", "5000");
        })
        .await,
    );
    for method in ["GET", "PUT"] {
        let errors_before = upstream_attempts(&h, method, "error").await;
        let request = tokio::spawn({
            let h = h.clone();
            async move {
                if method == "GET" {
                    h.get("+15555000001").await
                } else {
                    h.put("+15555000001", "CONSENTED").await
                }
            }
        });
        // Two attempts are refused...
        wait_until(Duration::from_secs(5), || async {
            upstream_attempts(&h, method, "error").await >= errors_before + 2.0
        })
        .await;
        // ...then upstream starts listening and a later attempt gets through.
        let listener = TcpListener::bind(api).await.expect("rebind the API port");
        let fake = FakeUpstream::serve(listener, |_, _| ok_answer());
        let response = tokio::time::timeout(Duration::from_secs(6), request)
            .await
            .expect("answered within the deadline")
            .unwrap();
        assert_eq!(response.status, 200, "{method}: {}", response.text());
        let refused = upstream_attempts(&h, method, "error").await - errors_before;
        assert!(
            (2.0..=5.0).contains(&refused),
            "{method}: {refused} refused attempts"
        );
        let arrivals = fake.seen();
        assert_eq!(arrivals.len(), 1, "{method}");
        assert_eq!(arrivals[0].method, method);
        fake.stop().await;
    }
}

#[tokio::test]
async fn a_port_that_always_refuses_gets_max_retries_plus_one_attempts_then_502() {
    let api = free_addr().await;
    let h = Harness::start_for_api(&format!("http://{api}"), |c| {
        c.set("talkdesk.max_retries", "2")
            .set("server.request_timeout_ms", "3000")
            .set("talkdesk.breaker_failures", "0");
    })
    .await;
    let started = Instant::now();
    assert_error(&h.get("+15555100001").await, 502, "upstream_error");
    assert_error(
        &h.put("+15555100001", "REFUSED").await,
        502,
        "upstream_error",
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(upstream_attempts(&h, "GET", "error").await, 3.0);
    assert_eq!(upstream_attempts(&h, "PUT", "error").await, 3.0);
}

// ---------------------------------------------------------------------------------------------
// 5xx and 429

#[tokio::test]
async fn five_hundreds_are_retried_exactly_max_retries_times_then_502() {
    let contact = "+15555200001";
    let h = Harness::start_seeded(contact, ConsentStatus::Consented, |c| {
        c.set("talkdesk.max_retries", "2")
            .set("talkdesk.breaker_failures", "0");
    })
    .await;

    h.sim.inject(SimRoute::Get, Fault::Status500, 10);
    assert_error(&h.get(contact).await, 502, "upstream_error");
    assert_eq!(h.sim.gets_for(contact), 3, "1 attempt + 2 retries");
    h.sim.clear_faults();

    h.sim.inject(SimRoute::Put, Fault::Status500, 10);
    assert_error(&h.put(contact, "REFUSED").await, 502, "upstream_error");
    assert_eq!(h.sim.puts_for(contact), 3, "1 attempt + 2 retries");
    assert_eq!(h.sim.stored_status(contact), Some(ConsentStatus::Consented));
    h.sim.clear_faults();

    // Other 5xx codes count the same; two failures then success is a 200.
    for status in [502, 503, 504, 599] {
        h.sim.inject(
            SimRoute::Get,
            Fault::Respond {
                status,
                headers: vec![],
                body: Bytes::from_static(br#"{"code":"oops","message":"oops"}"#),
            },
            2,
        );
        let before = h.sim.gets_for(contact);
        let get = h.get(contact).await;
        assert_eq!(get.status, 200, "{status}: {}", get.text());
        assert_eq!(h.sim.gets_for(contact) - before, 3, "{status}");
        // Next time from upstream again.
        assert_eq!(h.purge(contact).await.status, 204);
    }

    // With max_retries = 0 nothing is retried.
    let h = Harness::start_with(|c| {
        c.set("talkdesk.max_retries", "0");
    })
    .await;
    h.sim.inject(SimRoute::Get, Fault::Status500, 10);
    h.sim.inject(SimRoute::Put, Fault::Status500, 10);
    assert_error(&h.get(contact).await, 502, "upstream_error");
    assert_error(&h.put(contact, "REFUSED").await, 502, "upstream_error");
    assert_eq!((h.sim.stats().gets, h.sim.stats().puts), (1, 1));
}

#[tokio::test]
async fn a_429_with_retry_after_that_fits_the_deadline_is_retried_after_it() {
    let contact = "+15555300001";
    let h = Harness::start_seeded(contact, ConsentStatus::Refused, |c| {
        c.set("server.request_timeout_ms", "3000");
    })
    .await;
    for route in [SimRoute::Get, SimRoute::Put] {
        h.sim
            .inject(route, Fault::TooManyRequests { retry_after_s: 1 }, 1);
        let (response, elapsed) = timed_call(&h, route, contact, "DELETED").await;
        assert_eq!(response.status, 200, "{route}: {}", response.text());
        assert!(
            elapsed >= Duration::from_millis(950) && elapsed < Duration::from_millis(1600),
            "{route}: retried after {elapsed:?}, Retry-After is 1 s"
        );
    }
    assert_eq!(h.sim.gets_for(contact), 2);
    assert_eq!(h.sim.puts_for(contact), 2);
    assert_eq!(h.sim.stored_status(contact), Some(ConsentStatus::Deleted));
}

#[tokio::test]
async fn a_429_whose_retry_after_does_not_fit_is_passed_through_at_once() {
    let contact = "+15555400001";
    for route in [SimRoute::Get, SimRoute::Put] {
        // One proxy each: the first 429's Retry-After holds off every later attempt.
        let h = Harness::start_seeded(contact, ConsentStatus::Refused, |c| {
            c.set("server.request_timeout_ms", "500");
        })
        .await;
        h.sim
            .inject(route, Fault::TooManyRequests { retry_after_s: 1 }, 1);
        let (response, elapsed) = timed_call(&h, route, contact, "DELETED").await;
        assert_eq!(response.status, 429, "{route}: {}", response.text());
        assert_eq!(response.header("retry-after"), Some("1"));
        assert!(
            elapsed < Duration::from_millis(300),
            "{route}: 429 passed on after {elapsed:?}"
        );
        let stats = h.sim.stats();
        assert_eq!(stats.gets + stats.puts, 1, "{route}: no retry");
    }
    // A 503 whose Retry-After does not fit is a prompt 503 upstream_unavailable saying when.
    let h = Harness::start_seeded(contact, ConsentStatus::Refused, |c| {
        c.set("server.request_timeout_ms", "500");
    })
    .await;
    h.sim.inject(
        SimRoute::Get,
        Fault::Respond {
            status: 503,
            headers: vec![("retry-after".into(), "2".into())],
            body: Bytes::new(),
        },
        1,
    );
    let started = Instant::now();
    let response = h.get(contact).await;
    assert_error(&response, 503, "upstream_unavailable");
    assert_eq!(response.header("retry-after"), Some("2"));
    assert!(started.elapsed() < Duration::from_millis(300));
    assert_eq!(h.sim.stats().gets, 1);
}

#[tokio::test]
async fn a_429_without_retry_after_is_retried_with_back_off() {
    let contact = "+15555450001";
    let h = Harness::start_seeded(contact, ConsentStatus::Consented, |c| {
        c.set("talkdesk.max_retries", "2");
    })
    .await;
    h.sim.inject(
        SimRoute::Get,
        Fault::Respond {
            status: 429,
            headers: vec![],
            body: Bytes::from_static(br#"{"code":"too_many_requests","message":"slow"}"#),
        },
        2,
    );
    assert_eq!(h.get(contact).await.status, 200);
    assert_eq!(h.sim.gets_for(contact), 3);
    // Three 429s with max_retries = 2: upstream's 429 is passed on.
    h.sim.inject(
        SimRoute::Put,
        Fault::TooManyRequests { retry_after_s: 0 },
        3,
    );
    let put = h.put(contact, "REFUSED").await;
    assert_eq!(put.status, 429, "{}", put.text());
    assert_eq!(h.sim.puts_for(contact), 3);
}

// ---------------------------------------------------------------------------------------------
// Back-off and the deadline

#[tokio::test]
async fn back_off_between_attempts_grows() {
    let api = free_addr().await;
    let listener = TcpListener::bind(api).await.unwrap();
    let fake = FakeUpstream::serve(
        listener,
        |_, n| if n < 4 { unavailable() } else { ok_answer() },
    );
    let h = Harness::start_for_api(&format!("http://{api}"), |c| {
        c.set("talkdesk.max_retries", "4")
            .set("server.request_timeout_ms", "5000");
    })
    .await;
    let started = Instant::now();
    let get = h.get("+15555500001").await;
    assert_eq!(get.status, 200, "{}", get.text());
    assert!(started.elapsed() < Duration::from_secs(2));
    let arrivals = fake.seen();
    assert_eq!(arrivals.len(), 5);
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1].at - w[0].at).collect();
    println!("gaps between attempts: {gaps:?}");
    // Nominal: 50, 100, 200, 400 ms, each jittered to between half and all of it; the upper
    // bound leaves room for a loaded machine's scheduling delay.
    for (i, gap) in gaps.iter().enumerate() {
        let nominal = Duration::from_millis(50 << i);
        assert!(
            *gap >= nominal / 2 && *gap < nominal + Duration::from_millis(250),
            "gap {i} was {gap:?}, nominal {nominal:?}: {gaps:?}"
        );
    }
    assert!(gaps[2] > gaps[0] && gaps[3] > gaps[1], "{gaps:?}");
}

#[tokio::test]
async fn retries_never_run_past_the_request_deadline() {
    let contact = "+15555600001";
    let h = Harness::start_seeded(contact, ConsentStatus::Consented, |c| {
        c.set("talkdesk.max_retries", "10")
            .set("server.request_timeout_ms", "700")
            .set("talkdesk.breaker_failures", "0");
    })
    .await;
    // Every attempt is slow and fails.
    h.sim.set_latency(Duration::from_millis(150));
    h.sim.inject(SimRoute::Get, Fault::Status500, 100);
    h.sim.inject(SimRoute::Put, Fault::Status500, 100);
    for (route, method) in [(SimRoute::Get, "GET"), (SimRoute::Put, "PUT")] {
        let (response, elapsed) = timed_call(&h, route, contact, "REFUSED").await;
        assert!(
            matches!(response.status, 502 | 504),
            "{method}: {} {}",
            response.status,
            response.text()
        );
        assert!(
            elapsed < Duration::from_millis(700 + 250),
            "{method}: answered after {elapsed:?}, the request timeout is 700 ms"
        );
    }
    let stats = h.sim.stats();
    assert!(
        (2..=5).contains(&stats.gets) && (2..=5).contains(&stats.puts),
        "{stats:?}"
    );
    assert_eq!(h.sim.stored_status(contact), Some(ConsentStatus::Consented));
}

#[tokio::test]
async fn a_timed_out_attempt_is_not_retried() {
    let contact = "+15555700001";
    let h = Harness::start_seeded(contact, ConsentStatus::Consented, |c| {
        c.set("talkdesk.max_retries", "2")
            .set("talkdesk.timeout_ms", "200")
            .set("server.request_timeout_ms", "3000");
    })
    .await;
    for route in [SimRoute::Get, SimRoute::Put] {
        h.sim
            .inject(route, Fault::Delay(Duration::from_millis(1000)), 1);
        let (response, elapsed) = timed_call(&h, route, contact, "REFUSED").await;
        assert_error(&response, 504, "upstream_timeout");
        assert!(
            elapsed >= Duration::from_millis(180) && elapsed < Duration::from_millis(600),
            "{route}: {elapsed:?}"
        );
    }
    assert_eq!((h.sim.stats().gets, h.sim.stats().puts), (1, 1));
    assert_eq!(upstream_attempts(&h, "GET", "timeout").await, 1.0);
    assert_eq!(upstream_attempts(&h, "PUT", "timeout").await, 1.0);
}

// ---------------------------------------------------------------------------------------------
// 401

#[tokio::test]
async fn the_retry_after_a_401_does_not_count_against_max_retries() {
    let contact = "+15555800001";
    // No retries at all, yet a rejected token is renewed and the request retried once.
    let h = Harness::start_seeded(contact, ConsentStatus::Consented, |c| {
        c.set("talkdesk.max_retries", "0")
            .set("cache.enabled", "false");
    })
    .await;
    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 1);
    assert_eq!(h.get(contact).await.status, 200);
    h.sim.inject(SimRoute::Put, Fault::Unauthorized, 1);
    assert_eq!(h.put(contact, "REFUSED").await.status, 200);
    let stats = h.sim.stats();
    assert_eq!((stats.gets, stats.puts, stats.token_requests), (2, 2, 3));

    // One retry: a 500 and a 401 both get their retry.
    let h = Harness::start_seeded(contact, ConsentStatus::Consented, |c| {
        c.set("talkdesk.max_retries", "1")
            .set("cache.enabled", "false");
    })
    .await;
    h.sim.inject(SimRoute::Get, Fault::Status500, 1);
    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 1);
    assert_eq!(h.get(contact).await.status, 200);
    assert_eq!(h.sim.gets_for(contact), 3);
    // 401, then 500s: the renewal's retry, one 5xx retry, then 502.
    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 1);
    h.sim.inject(SimRoute::Get, Fault::Status500, 5);
    assert_error(&h.get(contact).await, 502, "upstream_error");
    assert_eq!(h.sim.gets_for(contact), 6);
    // A second 401 after the renewal is not retried again, whatever max_retries says.
    h.sim.clear_faults();
    h.sim.inject(SimRoute::Get, Fault::Unauthorized, 5);
    assert_error(&h.get(contact).await, 502, "upstream_error");
    assert_eq!(h.sim.gets_for(contact), 8);
}
