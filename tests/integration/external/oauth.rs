//! The proxy's own OAuth 2.0 token endpoint and its access tokens, from the outside: in-process
//! proxies on port 0 in front of the in-process simulator, over real sockets.
//!
//! - an independent client library (Python's Authlib, `tests/oauth_client.py`) gets tokens
//!   with both client authentication methods and reads and writes with them;
//! - scopes: a read-only client cannot get the write scope, and its read token cannot write;
//! - the token endpoint's refusals are RFC 6749's, with the right status and challenge;
//! - forged, tampered, foreign, expired and `alg: none` tokens are 401 `invalid_token` and
//!   never reach upstream;
//! - instances sharing the key file accept each other's tokens, others refuse them, and a
//!   rotated key file still accepts tokens signed with the old key;
//! - a client removed from the configuration (or a permission taken away) loses its token's
//!   power at the restart;
//! - failed client authentications are throttled per address and per client name.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::temp_file::TempFile;
use crate::support::*;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::AppHandle;
use http::Method;
use serde_json::{json, Value};

const KEY_A: &str = "signing-key-a-0123456789abcdef0123456789";
const KEY_B: &str = "signing-key-b-0123456789abcdef0123456789";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const JSON: (&str, &str) = ("content-type", "application/json");
const READ: &str = "voicebiometrics-consent:read";
const WRITE: &str = "voicebiometrics-consent:write";
const BEARER_CHALLENGE: &str = r#"Bearer realm="consent-proxy", error="invalid_token""#;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A signing key file (one key a line) in the temporary directory, removed on drop.
fn key_file(keys: &[&str]) -> TempFile {
    TempFile::new("oauth-keys", &keys.join("\n"))
}

fn form_encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// `Authorization: Basic` as RFC 6749 §2.3.1 has an OAuth client send it.
fn client_basic(id: &str, secret: &str) -> String {
    let pair = format!("{}:{}", form_encode(id), form_encode(secret));
    format!("Basic {}", STANDARD.encode(pair))
}

fn token_url(proxy: &AppHandle) -> String {
    format!("{}/oauth/token", proxy.url())
}

/// A token request with `client_secret_basic`.
async fn request_token(
    http: &TestClient,
    proxy: &AppHandle,
    client: &str,
    key: &str,
    scope: Option<&str>,
) -> TestResponse {
    let mut body = "grant_type=client_credentials".to_owned();
    if let Some(scope) = scope {
        body.push_str(&format!("&scope={}", form_encode(scope)));
    }
    http.send(
        Method::POST,
        &token_url(proxy),
        &[("authorization", &client_basic(client, key)), FORM],
        Some(body),
    )
    .await
}

/// A token that must be issued.
async fn token(proxy: &AppHandle, client: &str, key: &str, scope: Option<&str>) -> String {
    let answer = request_token(&TestClient::new(), proxy, client, key, scope).await;
    assert_eq!(answer.status, 200, "token for {client}: {}", answer.text());
    answer.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

async fn get_with(proxy: &AppHandle, contact: &str, token: &str) -> TestResponse {
    let http = TestClient::new();
    let url = ProxyClient { http: &http, proxy }.consent_url(contact);
    http.send(
        Method::GET,
        &url,
        &[("authorization", &format!("Bearer {token}"))],
        None,
    )
    .await
}

async fn put_with(proxy: &AppHandle, contact: &str, token: &str, status: &str) -> TestResponse {
    let http = TestClient::new();
    let url = ProxyClient { http: &http, proxy }.consent_url(contact);
    http.send(
        Method::PUT,
        &url,
        &[("authorization", &format!("Bearer {token}")), JSON],
        Some(format!(r#"{{"status":"{status}"}}"#)),
    )
    .await
}

fn assert_invalid_token(response: &TestResponse, what: &str) {
    assert_eq!(response.status, 401, "{what}: {}", response.text());
    assert_eq!(response.code(), "unauthorized", "{what}");
    assert_eq!(
        response.header("www-authenticate"),
        Some(BEARER_CHALLENGE),
        "{what}"
    );
}

/// A proxy (with its own simulator) whose tokens are signed with the keys in `keys`.
async fn harness_with_keys(keys: &TempFile, configure: impl FnOnce(&mut ProxyConfig)) -> Harness {
    let path = keys.display();
    Harness::start_with(move |c| {
        c.set_str("oauth.signing_key_file", &path);
        configure(c);
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// An independent client library

/// The interpreter of the virtualenv `scripts/test.sh` prepares, with Authlib in it.
fn oauth_client_python() -> PathBuf {
    crate::support::python_venv::venv_python(
        "OAUTH_CLIENT_PYTHON",
        ".venv-oauth-client",
        "authlib.integrations.requests_client",
        "scripts/requirements-oauth-client.txt",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_oauth_client_gets_tokens_both_ways_and_reads_and_writes_with_them() {
    let python = oauth_client_python();
    // A secret whose Basic encoding differs with and without RFC 6749 §2.3.1's form-encoding
    // (Authlib 1.9 sends it raw).
    let secret = "s3cret:with+plus%2Bescape&=/0123456789";
    let h = Harness::start_with(|c| {
        c.with_client("studio", secret, &["read", "write"]);
    })
    .await;
    h.wait_ready().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oauth_client.py");
    let base = h.proxy.url();
    let secret_arg = secret.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([
                base.as_str(),
                "studio",
                secret_arg.as_str(),
                "%2B15557000001",
            ])
            .output()
            .expect("run tests/oauth_client.py")
    })
    .await
    .expect("client thread");
    assert!(
        output.status.success(),
        "the Authlib client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let runs: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    let methods: Vec<&str> = runs.iter().filter_map(|r| r["method"].as_str()).collect();
    assert_eq!(methods, ["client_secret_basic", "client_secret_post"]);
    for (run, (written, put_status)) in runs.iter().zip([("CONSENTED", 201), ("REFUSED", 200)]) {
        assert_eq!(run["token_type"], "Bearer", "{run}");
        assert_eq!(run["expires_in"], 3600, "{run}");
        assert_eq!(run["scope"], format!("{READ} {WRITE}"), "{run}");
        assert_eq!(run["authorization_scheme"], "Bearer", "{run}");
        assert_eq!(run["put_status"], put_status, "{run}");
        assert_eq!(run["put_body"], json!({"status": written}), "{run}");
        assert_eq!(run["get_status"], 200, "{run}");
        assert_eq!(run["get_body"], json!({"status": written}), "{run}");
    }
    assert_eq!(
        h.sim.stored_status("+15557000001"),
        Some(ConsentStatus::Refused)
    );
    let text = h.admin("/metrics").await.text();
    assert_eq!(
        metric_value(
            &text,
            r#"consent_proxy_oauth_tokens_issued_total{client="studio"}"#
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"consent_proxy_requests_total{client="studio",code="200",method="GET",route="consent"}"#
        ),
        2.0,
        "the GETs were made as the client, with its tokens"
    );
}

// ---------------------------------------------------------------------------------------------
// Scopes

#[tokio::test]
async fn a_read_only_client_cannot_get_the_write_scope_and_its_read_token_cannot_write() {
    let h = Harness::start_seeded("+15557100001", ConsentStatus::Consented, |_| {}).await;
    let http = TestClient::new();
    for scope in [WRITE.to_owned(), format!("{READ} {WRITE}")] {
        let refused = request_token(&http, &h.proxy, "reader", READER_KEY, Some(&scope)).await;
        assert_eq!(refused.status, 400, "{scope}: {}", refused.text());
        assert_eq!(refused.json()["error"], "invalid_scope", "{scope}");
        assert!(refused.json().get("access_token").is_none());
    }
    assert_eq!(
        h.metric(r#"consent_proxy_oauth_tokens_issued_total{client="reader"}"#)
            .await,
        0.0,
        "nothing issued"
    );
    // With no scope it gets what it holds: read.
    let answer = request_token(&http, &h.proxy, "reader", READER_KEY, None).await;
    assert_eq!(answer.json()["scope"], READ);
    let read_token = answer.json()["access_token"].as_str().unwrap().to_owned();
    let put = put_with(&h.proxy, "+15557100001", &read_token, "REFUSED").await;
    assert_eq!(put.status, 403, "{}", put.text());
    assert_eq!(put.code(), "forbidden");
    assert_eq!(h.sim.stats().puts, 0, "upstream was not called");
    let get = get_with(&h.proxy, "+15557100001", &read_token).await;
    assert_eq!(get.status, 200);
    assert_eq!(get.status_field(), "CONSENTED");
    // A read-write client asking only for read gets a token that only reads.
    let rw_read = token(&h.proxy, "rw", RW_KEY, Some(READ)).await;
    assert_eq!(
        put_with(&h.proxy, "+15557100001", &rw_read, "REFUSED")
            .await
            .status,
        403
    );
    assert_eq!(
        h.metric(r#"consent_proxy_oauth_tokens_issued_total{client="reader"}"#)
            .await,
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// The token endpoint's refusals

#[tokio::test]
async fn token_endpoint_refusals_are_rfc_6749_answers() {
    let special = "p@ss:w%2Brd+key/0123456789";
    let h = Harness::start_with(|c| {
        c.with_client("special", special, &["read"]);
    })
    .await;
    let http = TestClient::new();
    let url = token_url(&h.proxy);
    let text = h.admin("/metrics").await.text();
    for client in ["rw", "reader", "ops", "special"] {
        assert!(
            text.contains(&format!(
                "consent_proxy_oauth_tokens_issued_total{{client=\"{client}\"}} 0"
            )),
            "series for {client} created up front"
        );
    }
    for error in [
        "invalid_request",
        "invalid_client",
        "unsupported_grant_type",
        "invalid_scope",
        "throttled",
    ] {
        assert!(
            text.contains(&format!(
                "consent_proxy_oauth_failures_total{{error=\"{error}\"}} 0"
            )),
            "series for {error} created up front"
        );
    }

    let grant = "grant_type=client_credentials";
    let rw = client_basic("rw", RW_KEY);
    let wrong = client_basic("rw", "wrong-key-0123456789");
    let unknown = client_basic("nobody", RW_KEY);
    let both = format!("{grant}&client_id=rw&client_secret={RW_KEY}");
    let post_wrong = format!("{grant}&client_id=rw&client_secret=nope");
    // (headers, body, status, error)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("authorization", &wrong), FORM],
            grant,
            401,
            "invalid_client",
        ),
        (vec![FORM], &post_wrong, 401, "invalid_client"),
        (
            vec![("authorization", &unknown), FORM],
            grant,
            401,
            "invalid_client",
        ),
        (vec![FORM], grant, 401, "invalid_client"),
        (
            vec![("authorization", &rw), FORM],
            &both,
            400,
            "invalid_request",
        ),
        (
            vec![("authorization", &rw), FORM],
            "",
            400,
            "invalid_request",
        ),
        (
            vec![("authorization", &rw), FORM],
            "scope=x",
            400,
            "invalid_request",
        ),
        (
            vec![("authorization", &rw), FORM],
            "grant_type=password",
            400,
            "unsupported_grant_type",
        ),
        (
            vec![("authorization", &rw), JSON],
            grant,
            400,
            "invalid_request",
        ),
        (
            vec![("authorization", &rw), FORM],
            "grant_type=client_credentials&scope=admin",
            400,
            "invalid_scope",
        ),
    ];
    for (headers, body, status, error) in &cases {
        let answer = http
            .send(Method::POST, &url, headers, Some((*body).to_owned()))
            .await;
        let what = format!("{headers:?} {body}");
        assert_eq!(answer.status, *status, "{what}: {}", answer.text());
        assert_eq!(answer.json()["error"], *error, "{what}");
        assert!(answer.json()["error_description"].is_string(), "{what}");
        assert_eq!(answer.header("cache-control"), Some("no-store"), "{what}");
        let challenge = answer.header("www-authenticate");
        if *status == 401 {
            assert_eq!(challenge, Some(r#"Basic realm="consent-proxy""#), "{what}");
        } else {
            assert_eq!(challenge, None, "{what}");
        }
    }
    // A secret with ":", "@", "%" and "+" in Basic: form-encoded as RFC 6749 §2.3.1 asks, and
    // raw as many clients send it (Authlib among them): both accepted.
    let ok = request_token(&http, &h.proxy, "special", special, None).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let raw_special = format!("Basic {}", STANDARD.encode(format!("special:{special}")));
    let raw = http
        .send(
            Method::POST,
            &url,
            &[("authorization", &raw_special), FORM],
            Some(grant.to_owned()),
        )
        .await;
    assert_eq!(raw.status, 200, "{}", raw.text());
    // Only POST.
    let get = http.send(Method::GET, &url, &[], None).await;
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), Some("POST"));

    let text = h.admin("/metrics").await.text();
    for (error, count) in [
        ("invalid_client", 4.0),
        ("invalid_request", 4.0),
        ("unsupported_grant_type", 1.0),
        ("invalid_scope", 1.0),
    ] {
        assert_eq!(
            metric_value(
                &text,
                &format!("consent_proxy_oauth_failures_total{{error=\"{error}\"}}")
            ),
            count,
            "{error}"
        );
    }
    assert_eq!(
        metric_value(
            &text,
            r#"consent_proxy_oauth_tokens_issued_total{client="rw"}"#
        ),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// Tokens that are not acceptable

/// A JWT made by hand: `header` and `claims` as given, HMAC-SHA256 with `key` (or no signature).
fn forge(header: Value, claims: Value, key: Option<&str>) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = key.map_or(String::new(), |key| {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
        URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, input.as_bytes()))
    });
    format!("{input}.{signature}")
}

fn decode_part(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

#[tokio::test]
async fn unacceptable_tokens_are_401_invalid_token_and_never_reach_upstream() {
    let keys = key_file(&[KEY_A]);
    let h = harness_with_keys(&keys, |_| {}).await;
    h.wait_ready().await;
    let genuine = token(&h.proxy, "rw", RW_KEY, None).await;
    let parts: Vec<&str> = genuine.split('.').collect();
    let header = decode_part(parts[0]);
    let claims = decode_part(parts[1]);
    assert_eq!(header["alg"], "HS256");
    assert_eq!(claims["aud"], "consent-proxy");
    assert_eq!(claims["sub"], "rw");
    let with_claims = |change: &dyn Fn(&mut Value)| {
        let mut changed = claims.clone();
        change(&mut changed);
        changed
    };

    let mut flipped_signature = parts[2].to_owned().into_bytes();
    flipped_signature[3] = if flipped_signature[3] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "payload changed under the original signature",
            format!(
                "{}.{}.{}",
                parts[0],
                URL_SAFE_NO_PAD.encode(with_claims(&|c| c["sub"] = json!("ops")).to_string()),
                parts[2]
            ),
            "signature",
        ),
        (
            "expiry extended under the original signature",
            format!(
                "{}.{}.{}",
                parts[0],
                URL_SAFE_NO_PAD
                    .encode(with_claims(&|c| c["exp"] = json!(4_000_000_000u64)).to_string()),
                parts[2]
            ),
            "signature",
        ),
        (
            "one signature character changed",
            format!(
                "{}.{}.{}",
                parts[0],
                parts[1],
                String::from_utf8(flipped_signature).unwrap()
            ),
            "signature",
        ),
        (
            "signature removed",
            format!("{}.{}.", parts[0], parts[1]),
            "signature",
        ),
        (
            "alg none, unsigned",
            forge(
                json!({"alg": "none", "typ": "JWT", "kid": header["kid"]}),
                claims.clone(),
                None,
            ),
            "malformed",
        ),
        (
            "HS512 over the right key",
            forge(
                json!({"alg": "HS512", "kid": header["kid"]}),
                claims.clone(),
                Some(KEY_A),
            ),
            "algorithm",
        ),
        (
            "signed with another key, under our key id",
            forge(header.clone(), claims.clone(), Some(KEY_B)),
            "signature",
        ),
        (
            "signed with another key, under its own key id",
            forge(
                json!({"alg": "HS256", "kid": "0123456789abcdef"}),
                claims.clone(),
                Some(KEY_B),
            ),
            "unknown_key",
        ),
        (
            "for another audience, signed with the right key",
            forge(
                header.clone(),
                with_claims(&|c| c["aud"] = json!("talkdesk")),
                Some(KEY_A),
            ),
            "audience",
        ),
        (
            "expired, signed with the right key",
            forge(
                header.clone(),
                with_claims(&|c| c["exp"] = json!(1_000_000_000u64)),
                Some(KEY_A),
            ),
            "expired",
        ),
        (
            "for a client that does not exist, signed with the right key",
            forge(
                header.clone(),
                with_claims(&|c| c["sub"] = json!("mallory")),
                Some(KEY_A),
            ),
            "unknown_client",
        ),
        (
            "not a token at all",
            "not-a-key-and-not-a-token".to_owned(),
            "malformed",
        ),
    ];
    // The genuine token used first, so it is in the verified-token cache: the forgeries that
    // keep its signature must not be taken for it.
    assert_eq!(
        get_with(&h.proxy, "+15557200001", &genuine).await.status,
        404
    );
    let upstream_before = h.sim.stats().gets + h.sim.stats().puts;
    // Each forgery from its own address: together they are more failed authentications than
    // one address may make in a minute before it is throttled.
    for (i, (what, token, reason)) in cases.iter().enumerate() {
        let from = TestClient::from_address(loopback(100 + i as u8));
        let bearer = format!("Bearer {token}");
        let url = h.consent_url("+15557200001");
        let get = from
            .send(Method::GET, &url, &[("authorization", &bearer)], None)
            .await;
        assert_invalid_token(&get, what);
        let put = from
            .send(
                Method::PUT,
                &url,
                &[("authorization", &bearer), JSON],
                Some(r#"{"status":"CONSENTED"}"#.to_owned()),
            )
            .await;
        assert_invalid_token(&put, what);
        let counted = h
            .metric(&format!(
                "consent_proxy_oauth_tokens_rejected_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert!(counted >= 2.0, "{what}: reason {reason} counted {counted}");
    }
    assert_eq!(
        h.sim.stats().gets + h.sim.stats().puts,
        upstream_before,
        "upstream was called"
    );
    // The genuine token works, so the refusals were the forgeries' own doing.
    assert_eq!(
        put_with(&h.proxy, "+15557200001", &genuine, "CONSENTED")
            .await
            .status,
        201
    );
}

#[tokio::test]
async fn an_expired_token_stops_working_even_after_it_was_cached() {
    let h = Harness::start_seeded("+15557300001", ConsentStatus::Consented, |c| {
        c.set("oauth.token_ttl_s", "1");
    })
    .await;
    let issued_at = Instant::now();
    let answer = request_token(&TestClient::new(), &h.proxy, "rw", RW_KEY, None).await;
    assert_eq!(answer.json()["expires_in"], 1);
    let short_lived = answer.json()["access_token"].as_str().unwrap().to_owned();
    // Accepted (and so verified and cached) while fresh.
    assert_eq!(
        get_with(&h.proxy, "+15557300001", &short_lived)
            .await
            .status,
        200
    );
    // Expiry is a matter of the clock: poll until it is refused, bounded.
    let refused = loop {
        let answer = get_with(&h.proxy, "+15557300001", &short_lived).await;
        if answer.status != 200 {
            break answer;
        }
        assert!(
            issued_at.elapsed() < Duration::from_secs(10),
            "still accepted 10 s after a 1 s token was issued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_invalid_token(&refused, "expired");
    // Not before it expired (1 s) and its leeway: at least 2 s after issuance.
    assert!(
        issued_at.elapsed() >= Duration::from_secs(2),
        "refused after {:?}",
        issued_at.elapsed()
    );
    assert!(
        h.metric(r#"consent_proxy_oauth_tokens_rejected_total{reason="expired"}"#)
            .await
            >= 1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Several instances, restarts

#[tokio::test]
async fn instances_sharing_the_key_file_accept_each_others_tokens_and_others_refuse_them() {
    let shared = key_file(&[KEY_A]);
    let other = key_file(&[KEY_B]);
    // The rotation's middle step: the new key signs, the old one still verifies.
    let rotated = key_file(&["# new key first", KEY_B, KEY_A]);
    let sim = start_simulator().await;
    sim.set_status("+15557400001", ConsentStatus::Consented);
    let start = |keys: &TempFile| {
        let mut config = ProxyConfig::for_simulator(&sim);
        config.set_str("oauth.signing_key_file", &keys.display());
        async move { config.start().await }
    };
    let a = start(&shared).await;
    let b = start(&shared).await;
    let c = start(&other).await;
    let d = start(&rotated).await;
    let from_a = token(&a, "rw", RW_KEY, None).await;
    let from_d = token(&d, "rw", RW_KEY, None).await;

    for (proxy, token, accepted, what) in [
        (&a, &from_a, true, "A's own token on A"),
        (&b, &from_a, true, "A's token on B (same key file)"),
        (&c, &from_a, false, "A's token on C (another key)"),
        (
            &d,
            &from_a,
            true,
            "A's token on D (rotated: the old key still verifies)",
        ),
        (&d, &from_d, true, "D's own token on D"),
        (
            &a,
            &from_d,
            false,
            "D's token on A (A does not have the new key yet)",
        ),
    ] {
        let answer = get_with(proxy, "+15557400001", token).await;
        if accepted {
            assert_eq!(answer.status, 200, "{what}: {}", answer.text());
            assert_eq!(answer.status_field(), "CONSENTED", "{what}");
        } else {
            assert_invalid_token(&answer, what);
        }
    }
    for proxy in [a, b, c, d] {
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn a_client_removed_or_narrowed_in_the_configuration_loses_its_token_at_the_restart() {
    let keys = key_file(&[KEY_A]);
    let sim = start_simulator().await;
    sim.set_status("+15557500001", ConsentStatus::Consented);
    let mut before = ProxyConfig::for_simulator(&sim);
    before.set_str("oauth.signing_key_file", &keys.display());
    let first = before.start().await;
    let reader_token = token(&first, "reader", READER_KEY, None).await;
    let rw_token = token(&first, "rw", RW_KEY, None).await;
    assert_eq!(
        get_with(&first, "+15557500001", &reader_token).await.status,
        200
    );
    assert_eq!(
        put_with(&first, "+15557500002", &rw_token, "REFUSED")
            .await
            .status,
        201
    );
    first.shutdown().await;

    // The restart: "reader" removed, "rw" keeps its name and key but loses `write`.
    let mut after = ProxyConfig::for_simulator(&sim);
    after
        .set_str("oauth.signing_key_file", &keys.display())
        .without_clients()
        .with_client("rw", RW_KEY, &["read"]);
    let second = after.start().await;
    assert_invalid_token(
        &get_with(&second, "+15557500001", &reader_token).await,
        "a removed client's unexpired token",
    );
    assert_eq!(
        ProxyClient {
            http: &TestClient::new(),
            proxy: &second,
        }
        .metric(r#"consent_proxy_oauth_tokens_rejected_total{reason="unknown_client"}"#)
        .await,
        1.0
    );
    let narrowed_put = put_with(&second, "+15557500002", &rw_token, "CONSENTED").await;
    assert_eq!(narrowed_put.status, 403, "{}", narrowed_put.text());
    assert_eq!(narrowed_put.code(), "forbidden");
    assert_eq!(
        get_with(&second, "+15557500001", &rw_token).await.status,
        200
    );
    assert_eq!(
        sim.stored_status("+15557500002"),
        Some(ConsentStatus::Refused),
        "the refused write did not reach upstream"
    );
    second.shutdown().await;
}

#[tokio::test]
async fn with_oauth_disabled_there_is_no_token_endpoint_and_no_token_is_accepted() {
    let keys = key_file(&[KEY_A]);
    let issuer = harness_with_keys(&keys, |_| {}).await;
    let issued = token(&issuer.proxy, "rw", RW_KEY, None).await;
    let disabled = harness_with_keys(&keys, |c| {
        c.set("oauth.enabled", "false");
    })
    .await;
    let answer = request_token(&TestClient::new(), &disabled.proxy, "rw", RW_KEY, None).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.code(), "not_found");
    assert_invalid_token(
        &get_with(&disabled.proxy, "+15557600001", &issued).await,
        "a token where tokens are disabled",
    );
    // Keys as Bearer still work there.
    let key_as_bearer = get_with(&disabled.proxy, "+15557600001", RW_KEY).await;
    assert_ne!(key_as_bearer.status, 401);
}

// ---------------------------------------------------------------------------------------------
// Brute force

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

async fn assert_throttled(answer: &TestResponse, what: &str) {
    answer.assert_retry_within_a_minute(what);
    assert_eq!(answer.json()["error"], "temporarily_unavailable", "{what}");
}

#[tokio::test]
async fn failed_client_authentications_are_throttled_per_address_and_per_name() {
    let h = Harness::start().await;
    let attacker = TestClient::from_address(loopback(21));
    let bystander = TestClient::from_address(loopback(22));

    // Ten wrong secrets for "reader" from one address: 401 each; the eleventh attempt, even
    // with the right secret, is throttled.
    for attempt in 1..=10 {
        let answer = request_token(&attacker, &h.proxy, "reader", "guess-0123456789", None).await;
        assert_eq!(answer.status, 401, "attempt {attempt}");
    }
    let eleventh = request_token(&attacker, &h.proxy, "reader", READER_KEY, None).await;
    assert_throttled(&eleventh, "the address and the name after ten failures").await;
    // Another address, another client: unaffected.
    let other = request_token(&bystander, &h.proxy, "rw", RW_KEY, None).await;
    assert_eq!(other.status, 200, "{}", other.text());
    // Another address, the same client: its name is throttled.
    let same_name = request_token(&bystander, &h.proxy, "reader", READER_KEY, None).await;
    assert_throttled(&same_name, "the name, from another address").await;

    // Ten unknown names from one address: that address is throttled, the names are not.
    let sprayer = TestClient::from_address(loopback(23));
    for i in 0..10 {
        let answer = request_token(&sprayer, &h.proxy, &format!("guess-{i}"), RW_KEY, None).await;
        assert_eq!(answer.status, 401);
    }
    let from_sprayer = request_token(&sprayer, &h.proxy, "rw", RW_KEY, None).await;
    assert_throttled(&from_sprayer, "the address after ten unknown names").await;
    let elsewhere = request_token(
        &TestClient::from_address(loopback(24)),
        &h.proxy,
        "rw",
        RW_KEY,
        None,
    )
    .await;
    assert_eq!(
        elsewhere.status, 200,
        "a correct one from another address works"
    );

    let text = h.admin("/metrics").await.text();
    assert_eq!(
        metric_value(
            &text,
            r#"consent_proxy_oauth_failures_total{error="invalid_client"}"#
        ),
        20.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"consent_proxy_oauth_failures_total{error="throttled"}"#
        ),
        3.0
    );
    assert_eq!(
        metric_value(
            &text,
            r#"consent_proxy_oauth_tokens_issued_total{client="rw"}"#
        ),
        2.0
    );
    // The throttle is per address and name: this test's own address, which failed nothing,
    // still reads with its key.
    h.wait_ready().await;
    assert_eq!(h.get("+15557700001").await.status, 404);
}
