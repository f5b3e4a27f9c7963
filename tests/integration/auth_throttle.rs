//! Guessing credentials on the consent routes: failed authentications (X-API-Key, Bearer,
//! Basic) are throttled per caller address and per Basic name, configured or not, like the
//! token endpoint's; behind trusted load balancers the caller's forwarded address counts, and
//! from any other peer the forwarding headers are ignored. Each caller is a different loopback
//! address (127.0.0.x), so the tests do not throttle one another. The admin listener's key is
//! under the same throttle.

use std::net::{IpAddr, Ipv4Addr};

use crate::support::calls::basic;
use crate::support::*;
use http::Method;

/// A contact the simulator does not know: a caller let through is answered 404 from upstream.
const CONTACT: &str = "%2B15557900001";
const SERVED: u16 = 404;
const WRONG: &str = "wrong-key-0123456789abcdef";

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

async fn get(h: &Harness, from: &TestClient, headers: &[(&str, &str)]) -> TestResponse {
    from.send(Method::GET, &h.consent_url(CONTACT), headers, None)
        .await
}

fn assert_throttled(answer: &TestResponse, what: &str) {
    answer.assert_retry_within_a_minute(what);
    assert_eq!(answer.code(), "too_many_attempts", "{what}");
}

async fn failures(h: &Harness, route: &str, reason: &str) -> f64 {
    h.metric(&format!(
        r#"consent_proxy_auth_failures_total{{reason="{reason}",route="{route}"}}"#
    ))
    .await
}

#[tokio::test]
async fn ten_wrong_credentials_from_one_address_throttle_it_even_for_the_right_key() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let attacker = TestClient::from_address(loopback(31));
    let wrong_basic = basic("rw", WRONG);
    let wrong_bearer = format!("Bearer {WRONG}");
    // Ten failures in every form the consent routes take.
    for attempt in 0..10 {
        let headers: &[(&str, &str)] = match attempt % 3 {
            0 => &[("x-api-key", WRONG)],
            1 => &[("authorization", &wrong_bearer)],
            _ => &[("authorization", &wrong_basic)],
        };
        let answer = get(&h, &attacker, headers).await;
        assert_eq!(answer.status, 401, "attempt {}", attempt + 1);
    }
    let gets_before = h.sim.stats().gets;
    let eleventh = get(&h, &attacker, &[("x-api-key", RW_KEY)]).await;
    assert_throttled(&eleventh, "the right key after ten failures");
    assert_eq!(
        h.sim.stats().gets,
        gets_before,
        "a throttled request stays here"
    );
    // A request without credentials guesses nothing: it is not throttled (401 as ever).
    assert_eq!(get(&h, &attacker, &[]).await.status, 401);
    // Another address is not affected.
    let bystander = TestClient::from_address(loopback(32));
    let other = get(&h, &bystander, &[("x-api-key", RW_KEY)]).await;
    assert_eq!(other.status, SERVED, "{}", other.text());

    assert_eq!(failures(&h, "consent", "invalid_key").await, 7.0);
    assert_eq!(failures(&h, "consent", "invalid_token").await, 3.0);
    assert_eq!(failures(&h, "consent", "throttled").await, 1.0);
    assert_eq!(failures(&h, "consent", "missing").await, 1.0);
}

#[tokio::test]
async fn basic_names_are_throttled_alike_whether_they_exist_or_not() {
    let h = Harness::start().await;
    h.wait_ready().await;
    // Ten failures for each name, from ten addresses (one each): then the name is throttled
    // from anywhere, its right key included, and a configured name cannot be told from an
    // unknown one.
    for (name, key, first) in [("reader", READER_KEY, 40), ("nobody", RW_KEY, 60)] {
        for i in 0..10 {
            let guesser = TestClient::from_address(loopback(first + i));
            let answer = get(&h, &guesser, &[("authorization", &basic(name, WRONG))]).await;
            assert_eq!(answer.status, 401, "{name}: attempt {}", i + 1);
        }
        let fresh = TestClient::from_address(loopback(first + 10));
        let eleventh = get(&h, &fresh, &[("authorization", &basic(name, key))]).await;
        assert_throttled(&eleventh, &format!("Basic {name} on the 11th attempt"));
        // The name, not the address: its key in another form still works from there.
        let as_key = get(&h, &fresh, &[("x-api-key", key)]).await;
        assert_eq!(as_key.status, SERVED, "{name}: {}", as_key.text());
    }
}

#[tokio::test]
async fn the_token_endpoint_throttles_unknown_client_ids_like_configured_ones() {
    let h = Harness::start().await;
    for name in ["reader", "nobody"] {
        let mut last = None;
        for i in 0..11u8 {
            let guesser =
                TestClient::from_address(loopback(80 + i + if name == "nobody" { 11 } else { 0 }));
            let answer = guesser
                .send(
                    Method::POST,
                    &format!("{}/oauth/token", h.proxy.url()),
                    &[
                        ("authorization", &basic(name, WRONG)),
                        ("content-type", "application/x-www-form-urlencoded"),
                    ],
                    Some("grant_type=client_credentials".into()),
                )
                .await;
            last = Some(answer.status);
            if i < 10 {
                assert_eq!(answer.status, 401, "{name}: attempt {}", i + 1);
            }
        }
        assert_eq!(last, Some(429), "{name}: the 11th attempt");
    }
    assert_eq!(failures(&h, "other", "invalid_client").await, 20.0);
    assert_eq!(failures(&h, "other", "throttled").await, 2.0);
}

#[tokio::test]
async fn behind_a_trusted_balancer_each_caller_is_throttled_by_its_own_address() {
    let h = Harness::start_with(|c| {
        c.set("server.trusted_proxies", r#"["127.0.0.120/30"]"#);
    })
    .await;
    h.wait_ready().await;
    let balancer = TestClient::from_address(loopback(121));
    // A misconfigured flow behind the balancer fails ten times...
    for _ in 0..10 {
        let answer = get(
            &h,
            &balancer,
            &[("x-api-key", WRONG), ("x-forwarded-for", "203.0.113.7")],
        )
        .await;
        assert_eq!(answer.status, 401);
    }
    let locked = get(
        &h,
        &balancer,
        &[("x-api-key", RW_KEY), ("x-forwarded-for", "203.0.113.7")],
    )
    .await;
    assert_throttled(&locked, "the misconfigured caller itself");
    // ...and the others behind the same balancer keep working, including one whose request
    // crossed a second trusted hop.
    for forwarded in [
        "203.0.113.8",
        "203.0.113.9, 127.0.0.122",
        "203.0.113.7, 203.0.113.10",
    ] {
        let answer = get(
            &h,
            &balancer,
            &[("x-api-key", RW_KEY), ("x-forwarded-for", forwarded)],
        )
        .await;
        assert_eq!(answer.status, SERVED, "{forwarded}: {}", answer.text());
    }
    // A caller that forges the header (a peer not trusted) is counted by its own address.
    let forger = TestClient::from_address(loopback(130));
    for i in 0..10 {
        let forged = format!("198.51.100.{i}");
        let answer = get(
            &h,
            &forger,
            &[("x-api-key", WRONG), ("x-forwarded-for", &forged)],
        )
        .await;
        assert_eq!(answer.status, 401);
    }
    let forged = get(
        &h,
        &forger,
        &[("x-api-key", RW_KEY), ("x-forwarded-for", "198.51.100.99")],
    )
    .await;
    assert_throttled(&forged, "a forged X-Forwarded-For from an untrusted peer");
}

async fn purge_from(from: &TestClient, url: &str, key: &str) -> TestResponse {
    from.send(Method::DELETE, url, &[("x-api-key", key)], None)
        .await
}

#[tokio::test]
async fn the_admin_key_is_guessed_no_faster_than_a_consent_key() {
    let h = Harness::start().await;
    h.wait_ready().await;
    let purge = format!("{}/admin/cache/{CONTACT}", h.proxy.admin_url());
    let guesser = TestClient::from_address(loopback(41));
    for attempt in 0..10 {
        let answer = purge_from(&guesser, &purge, WRONG).await;
        assert_eq!(answer.status, 401, "attempt {}", attempt + 1);
    }
    assert_throttled(
        &purge_from(&guesser, &purge, ADMIN_KEY).await,
        "the admin key after ten failures",
    );
    // A key without the admin permission is refused (403), not counted as a guess.
    let reader = TestClient::from_address(loopback(42));
    for _ in 0..11 {
        assert_eq!(purge_from(&reader, &purge, RW_KEY).await.status, 403);
    }
    assert_eq!(purge_from(&reader, &purge, ADMIN_KEY).await.status, 204);

    assert_eq!(failures(&h, "admin", "invalid_key").await, 10.0);
    assert_eq!(failures(&h, "admin", "throttled").await, 1.0);
    assert_eq!(failures(&h, "admin", "missing").await, 0.0);
    assert_eq!(failures(&h, "consent", "invalid_key").await, 0.0);
}
