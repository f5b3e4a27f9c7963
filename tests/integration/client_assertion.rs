//! `talkdesk.client_auth = "private_key_jwt"`: the proxy authenticates at the token endpoint
//! with a JWT signed by the client's key (RFC 7523) instead of a secret, against the simulator,
//! which verifies the assertion as Talkdesk does:
//! - the proxy obtains a token with a key in Talkdesk's form (base64 PKCS#8) and serves consent;
//! - a key the token endpoint does not know is `token_unavailable`, as a wrong secret is;
//! - the simulator refuses a replayed `jti`, a wrong `aud`, an expired assertion and a wrong key.

use std::time::Duration;

use consent_proxy::clock::since_epoch;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::jws::{Algorithm, SigningKey};
use consent_proxy::simulator::Simulator;
use http::Method;
use serde_json::json;

use crate::support::temp_file::TempFile;
use crate::support::*;

const KEY_ID: &str = "talkdesk-key-1";

fn key(text: &str) -> SigningKey {
    SigningKey::from_text(text, Algorithm::ES256).expect("an ES256 key")
}

/// A proxy in front of `sim` that authenticates with the key in `key_file`.
async fn proxy_with_key(sim: &Simulator, key_file: &TempFile) -> Harness {
    let mut config = ProxyConfig::for_simulator(sim);
    config
        .set_str("talkdesk.client_secret", "")
        .set_str("talkdesk.client_auth", "private_key_jwt")
        .set_str("talkdesk.private_key_file", &key_file.display())
        .set_str("talkdesk.key_id", KEY_ID);
    Harness {
        sim: sim.clone(),
        proxy: config.start().await,
        http: TestClient::new(),
    }
}

#[tokio::test]
async fn the_proxy_gets_its_token_with_a_signed_assertion() {
    let sim = start_simulator().await;
    sim.set_status("+15551234567", ConsentStatus::Consented);
    let key_text = SigningKey::generate_es256();
    sim.trust_client_key(KEY_ID, key(&key_text).verifying_key());
    let key_file = TempFile::new("client.key", &key_text);
    let h = proxy_with_key(&sim, &key_file).await;
    h.wait_ready().await;
    let answer = h.get("+15551234567").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let put = h.put("+15551234567", "REFUSED").await;
    assert_eq!(put.status, 200, "{}", put.text());
    assert_eq!(sim.stats().tokens_issued, 1);
    h.proxy.shutdown().await;
}

#[tokio::test]
async fn a_key_the_token_endpoint_does_not_know_is_token_unavailable() {
    let sim = start_simulator().await;
    sim.trust_client_key(KEY_ID, key(&SigningKey::generate_es256()).verifying_key());
    let key_file = TempFile::new("client.key", &SigningKey::generate_es256());
    let h = proxy_with_key(&sim, &key_file).await;
    wait_until(Duration::from_secs(10), || async {
        let ready = h.admin("/readyz").await;
        ready.status == 503 && ready.text().contains("token endpoint answered 401")
    })
    .await;
    let answer = h.get("+15551234567").await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.code(), "token_unavailable");
    assert_eq!(sim.stats().tokens_issued, 0);
    h.proxy.shutdown().await;
}

/// Posts a token request authenticated by `assertion`; the status and the OAuth error.
async fn ask_for_token(sim: &Simulator, assertion: &str) -> (u16, String) {
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair(
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        )
        .append_pair("client_assertion", assertion)
        .finish();
    let answer = TestClient::new()
        .send(
            Method::POST,
            &sim.token_url(),
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(body),
        )
        .await;
    let error = answer.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (answer.status, error)
}

#[tokio::test]
async fn the_simulator_refuses_replayed_misaddressed_expired_and_foreign_assertions() {
    let sim = start_simulator().await;
    let signer = key(&SigningKey::generate_es256());
    sim.trust_client_key(KEY_ID, signer.verifying_key());
    let now = since_epoch().as_secs();
    let assertion = |signer: &SigningKey, jti: &str, aud: &str, exp: u64| {
        let mut header = serde_json::Map::new();
        header.insert("kid".into(), KEY_ID.into());
        let claims = json!({"iss": SIM_CLIENT_ID, "sub": SIM_CLIENT_ID, "aud": aud, "jti": jti,
                            "iat": now, "exp": exp});
        signer.sign(header, &claims).expect("signed")
    };
    let aud = sim.token_url();

    let first = assertion(&signer, "jti-1", &aud, now + 300);
    assert_eq!(ask_for_token(&sim, &first).await.0, 200);
    let refused = (401, "invalid_client".to_owned());
    assert_eq!(ask_for_token(&sim, &first).await, refused, "replayed jti");
    let elsewhere = assertion(
        &signer,
        "jti-2",
        "https://other.example/oauth/token",
        now + 300,
    );
    assert_eq!(ask_for_token(&sim, &elsewhere).await, refused, "wrong aud");
    let expired = assertion(&signer, "jti-3", &aud, now - 1);
    assert_eq!(ask_for_token(&sim, &expired).await, refused, "expired");
    let foreign = assertion(
        &key(&SigningKey::generate_es256()),
        "jti-4",
        &aud,
        now + 300,
    );
    assert_eq!(ask_for_token(&sim, &foreign).await, refused, "wrong key");
    let fresh = assertion(&signer, "jti-5", &aud, now + 300);
    assert_eq!(
        ask_for_token(&sim, &fresh).await.0,
        200,
        "a fresh one still works"
    );
    assert_eq!(sim.stats().tokens_issued, 2);
}
