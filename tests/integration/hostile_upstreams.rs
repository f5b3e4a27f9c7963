//! Broken and hostile upstreams: answers the proxy cannot use (not JSON, the wrong shape, too
//! large, redirects, absurd headers), answers that arrive too slowly or break off, and a token
//! endpoint that never answers. The simulator's fault switches are used where they fit; a tiny
//! fake upstream writing crafted bytes does what the simulator cannot. After every failure the
//! proxy must serve the next good request normally.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::fake_upstream::{answer, consent_200, Act, FakeUpstream};
use crate::support::*;
use bytes::Bytes;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Fault, SimRoute};
use http::Method;
use tokio::time::Instant;

const TOKEN_BODY: &[u8] =
    br#"{"access_token":"fake-token","token_type":"Bearer","expires_in":600}"#;

/// A proxy whose consent API (and, unless the fake answers them too, token endpoint) is a
/// fake upstream; the simulator provides tokens.
async fn proxy_before_fake(
    fake: &FakeUpstream,
    fake_tokens: bool,
    configure: impl FnOnce(&mut ProxyConfig),
) -> Harness {
    Harness::start_with_upstream(
        |sim| {
            let token_url = if fake_tokens {
                format!("{}/oauth/token", fake.url())
            } else {
                sim.token_url()
            };
            (fake.url(), token_url)
        },
        configure,
    )
    .await
}

/// Asserts a proxy-made error: status and `code`.
fn assert_error(response: &TestResponse, status: u16, code: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.code(), code, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
}

// ---------------------------------------------------------------------------------------------
// Unusable answers (simulator faults)

#[tokio::test]
async fn a_200_that_is_not_a_consent_body_is_502_and_not_cached() {
    let h = Harness::start().await;
    let bodies: [&[u8]; 12] = [
        b"<html>surprise</html>",
        b"",
        b"null",
        b"[]",
        b"{}",
        br#"{"status":"MAYBE"}"#,
        br#"{"status":"consented"}"#,
        br#"{"status":5}"#,
        br#"{"status":null}"#,
        br#"{"Status":"CONSENTED"}"#,
        br#"{"status":"CONSENTED"} trailing"#,
        br#"{"status":"CONSENTED""#,
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let contact = format!("+1555400{i:04}");
        h.sim.set_status(&contact, ConsentStatus::Consented);
        h.sim.inject(
            SimRoute::Get,
            Fault::Respond {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                body: Bytes::from_static(body),
            },
            1,
        );
        let get = h.get(&contact).await;
        assert_error(&get, 502, "upstream_error");
        assert!(get.header("x-cache-status").is_none());
        // Not cached: the next GET asks upstream again and gets the real answer.
        let next = h.get(&contact).await;
        assert_eq!(
            (next.status, next.header("x-cache-status")),
            (200, Some("MISS")),
            "after {:?}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(next.status_field(), "CONSENTED");
        assert_eq!(
            h.sim.gets_for(&contact),
            2,
            "an unusable 200 is not retried"
        );
    }
}

#[tokio::test]
async fn an_answer_larger_than_max_response_bytes_is_502() {
    let h = Harness::start_with(|c| {
        c.set("talkdesk.max_response_bytes", "1024");
    })
    .await;
    let contact = "+15554100001";
    h.sim.set_status(contact, ConsentStatus::Refused);
    let valid_but_big = format!(r#"{{"status":"CONSENTED","pad":"{}"}}"#, "x".repeat(2000));
    for (status, body) in [
        (200, valid_but_big.clone()),
        (
            404,
            format!(r#"{{"code":"not_found","pad":"{}"}}"#, "x".repeat(2000)),
        ),
        (200, "x".repeat(10 * 1024 * 1024)),
    ] {
        h.sim.inject(
            SimRoute::Get,
            Fault::Respond {
                status,
                headers: vec![("content-type".into(), "application/json".into())],
                body: Bytes::from(body),
            },
            1,
        );
        assert_error(&h.get(contact).await, 502, "upstream_error");
        let next = h.get(contact).await;
        assert_eq!(
            (next.status, next.header("x-cache-status")),
            (200, Some("MISS"))
        );
        assert_eq!(next.status_field(), "REFUSED");
        assert_eq!(h.purge(contact).await.status, 204);
    }
    // A write whose answer is too large is not acknowledged.
    h.sim.inject(
        SimRoute::Put,
        Fault::Respond {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(valid_but_big),
        },
        1,
    );
    assert_error(&h.put(contact, "DELETED").await, 502, "upstream_error");
    // Exactly at the limit is fine.
    let at_limit = format!(
        r#"{{"status":"CONSENTED","pad":"{}"}}"#,
        "x".repeat(1024 - r#"{"status":"CONSENTED","pad":""}"#.len())
    );
    assert_eq!(at_limit.len(), 1024);
    h.sim.inject(
        SimRoute::Get,
        Fault::Respond {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(at_limit),
        },
        1,
    );
    let get = h.get(contact).await;
    assert_eq!(get.status, 200, "{}", get.text());
    assert_eq!(get.status_field(), "CONSENTED");
}

#[tokio::test]
async fn an_endless_upstream_body_is_cut_off_at_max_response_bytes() {
    let fake = FakeUpstream::start(|_, n| {
        if n == 0 {
            Act::Flood
        } else {
            Act::Send(consent_200("DELETED"))
        }
    })
    .await;
    let h = proxy_before_fake(&fake, false, |c| {
        c.set("talkdesk.max_response_bytes", "65536");
    })
    .await;
    let started = Instant::now();
    assert_error(&h.get("+15554200001").await, 502, "upstream_error");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let next = h.get("+15554200001").await;
    assert_eq!(
        (next.status, next.status_field().as_str()),
        (200, "DELETED")
    );
    assert_eq!(fake.seen().len(), 2);
}

#[tokio::test]
async fn a_write_acknowledged_with_another_status_drops_the_entry_instead_of_caching_either() {
    // Upstream holds REFUSED and says so on a GET, but acknowledges every PUT with CONSENTED.
    let fake = FakeUpstream::start(|seen, _| match seen.method.as_str() {
        "PUT" => Act::Send(consent_200("CONSENTED")),
        _ => Act::Send(consent_200("REFUSED")),
    })
    .await;
    let h = proxy_before_fake(&fake, false, |_| {}).await;
    let contact = "+15554250001";
    let upstream_gets = || fake.seen().iter().filter(|s| s.method == "GET").count();
    let cached = |r: &TestResponse| (r.status, r.header("x-cache-status").map(str::to_owned));
    let got = h.get(contact).await;
    assert_eq!(cached(&got), (200, Some("MISS".into())));
    assert_eq!(cached(&h.get(contact).await), (200, Some("HIT".into())));

    let put = h.put(contact, "REFUSED").await;
    // The caller gets upstream's answer as it is (rule 1 of docs/CONSISTENCY.md: 2xx only on upstream's 2xx) ...
    assert_eq!(
        (put.status, put.status_field().as_str()),
        (200, "CONSENTED")
    );
    // ... but the cache holds neither status: the next GET asks upstream.
    let after = h.get(contact).await;
    assert_eq!(
        cached(&after),
        (200, Some("MISS".into())),
        "{}",
        after.text()
    );
    assert_eq!(after.status_field(), "REFUSED");
    assert_eq!(upstream_gets(), 2);
    // The write is counted under the status written.
    assert_eq!(
        h.metric(r#"consent_proxy_consent_writes_total{status="REFUSED"}"#)
            .await,
        1.0
    );
    assert_eq!(
        h.metric(r#"consent_proxy_consent_writes_total{status="CONSENTED"}"#)
            .await,
        0.0
    );

    // An answer that agrees with the write stores the written status, as always.
    let put = h.put(contact, "CONSENTED").await;
    assert_eq!(
        (put.status, put.status_field().as_str()),
        (200, "CONSENTED")
    );
    let hit = h.get(contact).await;
    assert_eq!(cached(&hit), (200, Some("HIT".into())));
    assert_eq!(hit.status_field(), "CONSENTED");
    assert_eq!(upstream_gets(), 2);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let h = Harness::start().await;
    let contact = "+15554300001";
    let elsewhere = "+15554300002";
    h.sim.set_status(contact, ConsentStatus::Consented);
    h.sim.set_status(elsewhere, ConsentStatus::Refused);
    // A target that would show up in the simulator's counters if followed.
    let location = format!(
        "{}/voicebiometrics/contacts/%2B15554300002/consent",
        h.sim.base_url()
    );
    for status in [301, 302, 303, 307, 308] {
        for route in [SimRoute::Get, SimRoute::Put] {
            h.sim.inject(
                route,
                Fault::Respond {
                    status,
                    headers: vec![("location".into(), location.clone())],
                    body: Bytes::new(),
                },
                1,
            );
            let response = if route == SimRoute::Get {
                h.get(contact).await
            } else {
                h.put(contact, "DELETED").await
            };
            assert_error(&response, 502, "upstream_error");
            assert!(response.header("location").is_none());
        }
    }
    assert_eq!(h.sim.gets_for(elsewhere), 0, "a redirect was followed");
    assert_eq!(h.sim.puts_for(elsewhere), 0, "a redirect was followed");
    assert_eq!(h.sim.gets_for(contact), 5, "one attempt per GET");
    assert_eq!(h.sim.puts_for(contact), 5, "one attempt per PUT");
    assert_eq!(h.sim.stored_status(contact), Some(ConsentStatus::Consented));
    let next = h.get(contact).await;
    assert_eq!(
        (next.status, next.header("x-cache-status")),
        (200, Some("MISS"))
    );
    assert_eq!(h.put(contact, "DELETED").await.status, 200);
}

#[tokio::test]
async fn absurd_retry_after_values_do_not_break_the_proxy() {
    let contact = "+15554400001";
    for retry_after in [
        "18446744073709551615",
        "99999999999999999999999",
        "9223372036854775807",
        "-1",
        "1e9",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "",
    ] {
        // One proxy per value: a value that parses holds off all upstream traffic.
        let h = Harness::start_with(|c| {
            c.set("server.request_timeout_ms", "2000");
        })
        .await;
        h.sim.set_status(contact, ConsentStatus::Consented);
        for route in [SimRoute::Get, SimRoute::Put] {
            h.sim.inject(
                route,
                Fault::Respond {
                    status: 503,
                    headers: vec![("retry-after".into(), retry_after.into())],
                    body: Bytes::from_static(br#"{"code":"unavailable","message":"busy"}"#),
                },
                1,
            );
        }
        let started = Instant::now();
        let get = h.get(contact).await;
        assert!(started.elapsed() < Duration::from_millis(2500));
        let put = h.put(contact, "REFUSED").await;
        match retry_after.parse::<u64>() {
            // A number of seconds is honoured, capped at a minute: upstream is left alone
            // and callers are told when to come back, at once. Never a crash or an overflow.
            Ok(_) => {
                for answer in [&get, &put] {
                    assert_eq!(answer.status, 503, "{retry_after:?}: {}", answer.text());
                    assert_eq!(answer.code(), "upstream_unavailable");
                    let wait: u64 = answer.header("retry-after").unwrap().parse().unwrap();
                    assert!((1..=60).contains(&wait), "{retry_after:?}: {wait}");
                }
                assert_eq!(
                    h.sim.stats().puts,
                    0,
                    "{retry_after:?}: the PUT was held off"
                );
            }
            // A value that means nothing is ignored: retried at once, then answered.
            Err(_) => {
                assert_eq!(get.status, 200, "{retry_after:?}: {}", get.text());
                assert_eq!(put.status, 200, "{retry_after:?}: {}", put.text());
                let get = h.get(contact).await;
                assert_eq!(
                    (get.header("x-cache-status"), get.status_field().as_str()),
                    (Some("HIT"), "REFUSED"),
                    "{retry_after:?}"
                );
            }
        }
        assert_eq!(h.admin("/healthz").await.status, 200);
    }
    // The huge value on a 429 is passed through as it is.
    let h = Harness::start().await;
    h.sim.set_status(contact, ConsentStatus::Consented);
    h.sim.inject(
        SimRoute::Get,
        Fault::Respond {
            status: 429,
            headers: vec![("retry-after".into(), "18446744073709551615".into())],
            body: Bytes::from_static(br#"{"code":"too_many_requests","message":"slow down"}"#),
        },
        1,
    );
    let get = h.get(contact).await;
    assert_eq!(get.status, 429, "{}", get.text());
    assert_eq!(get.header("retry-after"), Some("18446744073709551615"));
}

// ---------------------------------------------------------------------------------------------
// Slow and broken exchanges (fake upstream)

#[tokio::test]
async fn a_body_dripped_past_the_deadline_is_504_and_not_retried() {
    let drip = || Act::Drip {
        head: b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n"
            .to_vec(),
        body: br#"{"status":"CONSENTED"}"#.to_vec(),
        every: Duration::from_millis(100),
    };
    let fake = FakeUpstream::start(move |_, n| {
        if n < 2 {
            drip()
        } else {
            Act::Send(consent_200("REFUSED"))
        }
    })
    .await;
    let h = proxy_before_fake(&fake, false, |c| {
        c.set("server.request_timeout_ms", "800")
            .set("talkdesk.timeout_ms", "3000");
    })
    .await;
    h.wait_ready().await;
    for method in [Method::GET, Method::PUT] {
        let started = Instant::now();
        let response = if method == Method::GET {
            h.get("+15554500001").await
        } else {
            h.put("+15554500001", "REFUSED").await
        };
        let elapsed = started.elapsed();
        assert_error(&response, 504, "upstream_timeout");
        assert!(
            elapsed >= Duration::from_millis(750) && elapsed < Duration::from_millis(1300),
            "{method}: answered after {elapsed:?}; the deadline is 800 ms"
        );
    }
    assert_eq!(fake.seen().len(), 2, "a timed-out attempt is not retried");
    let next = h.get("+15554500001").await;
    assert_eq!(
        (
            next.status,
            next.header("x-cache-status"),
            next.status_field().as_str()
        ),
        (200, Some("MISS"), "REFUSED")
    );
}

#[tokio::test]
async fn a_connection_broken_mid_answer_is_502() {
    let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n";
    let partial: Vec<u8> = [&head[..], br#"{"stat"#].concat();
    let acts = vec![
        // Reset after part of the body.
        Act::ResetAfter(partial.clone()),
        // Closed (FIN) after part of the body.
        Act::Send(partial.clone()),
        // Reset after part of the head.
        Act::ResetAfter(b"HTTP/1.1 200 OK\r\nContent-Ty".to_vec()),
        // Closed without a word.
        Act::Send(Vec::new()),
        // Not HTTP at all.
        Act::Send(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()),
        // A chunked body with a broken chunk size.
        Act::Send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(),
        ),
    ];
    let cases = acts.len();
    let script = Arc::new(acts);
    let fake = FakeUpstream::start({
        let script = script.clone();
        move |_, n| {
            // Each broken answer is followed by a good one.
            if n % 2 == 0 && n / 2 < script.len() {
                script[n / 2].clone()
            } else {
                Act::Send(consent_200("NO_CONSENT"))
            }
        }
    })
    .await;
    let h = proxy_before_fake(&fake, false, |_| {}).await;
    h.wait_ready().await;
    for case in 0..cases {
        let contact = format!("+1555460{case:04}");
        let broken = h.get(&contact).await;
        assert_error(&broken, 502, "upstream_error");
        assert_eq!(fake.seen().len(), 2 * case + 1, "case {case}: not retried");
        let next = h.get(&contact).await;
        assert_eq!(
            (next.status, next.header("x-cache-status")),
            (200, Some("MISS")),
            "case {case}: {}",
            next.text()
        );
    }
    // The same for a write: 502, and the following write goes through.
    let fake_puts = FakeUpstream::start(move |_, n| {
        if n == 0 {
            Act::ResetAfter(partial.clone())
        } else {
            Act::Send(consent_200("REFUSED"))
        }
    })
    .await;
    let h = proxy_before_fake(&fake_puts, false, |_| {}).await;
    h.wait_ready().await;
    assert_error(
        &h.put("+15554609999", "REFUSED").await,
        502,
        "upstream_error",
    );
    assert_eq!(h.put("+15554609999", "REFUSED").await.status, 200);
    assert_eq!(fake_puts.seen().len(), 2);
}

#[tokio::test]
async fn a_token_endpoint_that_hangs_is_503_within_a_second_not_a_hang() {
    let token_requests = Arc::new(AtomicUsize::new(0));
    let fake = FakeUpstream::start({
        let token_requests = token_requests.clone();
        move |seen, _| {
            if seen.target.starts_with("/oauth/token") {
                // The first token request is accepted and never answered.
                if token_requests.fetch_add(1, Ordering::SeqCst) == 0 {
                    Act::Hang
                } else {
                    Act::Send(answer(
                        "200 OK",
                        &[("Content-Type", "application/json")],
                        TOKEN_BODY,
                    ))
                }
            } else {
                Act::Send(consent_200("CONSENTED"))
            }
        }
    })
    .await;
    let h = proxy_before_fake(&fake, true, |c| {
        c.set("server.request_timeout_ms", "10000")
            .set("talkdesk.timeout_ms", "1500");
    })
    .await;
    fake.wait_for_requests(1).await;
    let started = Instant::now();
    let get = h.get("+15554700001").await;
    let elapsed = started.elapsed();
    assert_error(&get, 503, "token_unavailable");
    assert!(
        elapsed < Duration::from_millis(1300),
        "answered after {elapsed:?}; the request timeout is 10 s"
    );
    let started = Instant::now();
    let put = h.put("+15554700001", "REFUSED").await;
    assert!(
        matches!(put.status, 503 | 200),
        "{} {}",
        put.status,
        put.text()
    );
    assert!(started.elapsed() < Duration::from_millis(1300));
    if put.status == 503 {
        assert!(
            fake.seen()
                .iter()
                .all(|s| s.target.starts_with("/oauth/token")),
            "the consent API was called without a token: {:?}",
            fake.seen()
        );
    }

    // The hung fetch times out, the next one succeeds, and requests are served again.
    h.wait_ready().await;
    let get = h.get("+15554700001").await;
    assert_eq!(get.status, 200, "{}", get.text());
    assert_eq!(token_requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_proxy_forwards_only_its_own_request_to_a_hostile_upstream() {
    // Sanity check of the fake itself, and of what the proxy sends it.
    let fake = FakeUpstream::start(|_, _| Act::Send(consent_200("CONSENTED"))).await;
    let h = proxy_before_fake(&fake, false, |_| {}).await;
    h.wait_ready().await;
    assert_eq!(h.get("%2B15554800001").await.status, 200);
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].target.as_str()),
        ("GET", "/voicebiometrics/contacts/%2B15554800001/consent")
    );
}
