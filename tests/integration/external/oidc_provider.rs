//! The proxy's OAuth client-credentials client against a real, certified authorization
//! server: panva's `oidc-provider` (Node.js), run from `tests/oidc/server.mjs`. The consent
//! API is a tiny fake here that records the bearer token it is given; the token is then
//! checked with the provider's introspection endpoint.
//!
//! Needs `node` (20+) on PATH and the provider installed: `npm ci --prefix tests/oidc`.
//! Without them these tests FAIL, they never skip.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::support::*;
use base64::Engine as _;
use bytes::Bytes;
use consent_proxy::upstream::token::form_encode;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The clients `tests/oidc/server.mjs` registers.
const BASIC_CLIENT: (&str, &str) = ("consent-proxy-basic", "basic-secret-0123456789abcdef");
const POST_CLIENT: (&str, &str) = ("consent-proxy-post", "post-secret-0123456789abcdef");
const SCOPES: [&str; 2] = [
    "voicebiometrics-consent:read",
    "voicebiometrics-consent:write",
];
const CONTACT: &str = "+15550009999";
const FETCH_OK: &str = r#"consent_proxy_token_fetches_total{result="success"}"#;
const FETCH_FAILED: &str = r#"consent_proxy_token_fetches_total{result="failure"}"#;

/// A running `node tests/oidc/server.mjs`, killed on drop.
struct OidcProvider {
    child: Child,
    port: u16,
}

impl OidcProvider {
    /// With `jwt_client_jwk`, the provider also registers a `private_key_jwt` client.
    fn start(jwt_client_jwk: Option<&str>) -> OidcProvider {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/oidc");
        let installed = dir.join("node_modules/oidc-provider/package.json");
        assert!(
            installed.is_file(),
            "oidc-provider is not installed ({} is missing): run `npm ci --prefix tests/oidc` \
             in the crate root first",
            installed.display()
        );
        let mut command = Command::new("node");
        if let Some(jwk) = jwt_client_jwk {
            command.env("OIDC_JWT_CLIENT_JWK", jwk);
        }
        let mut child = command
            .arg(dir.join("server.mjs"))
            .arg("0")
            .current_dir(&dir)
            // The server exits when its stdin closes, so it never outlives this process.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `node` ({e}): Node.js 20+ must be on PATH for this test")
            });

        let stdout = child.stdout.take().expect("piped stdout");
        let (port_tx, port_rx) = mpsc::channel();
        thread::spawn(move || {
            // Reads (and keeps draining) stdout; the first `LISTENING <port>` gives the port.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.strip_prefix("LISTENING ") {
                    let _ = port_tx.send(port.trim().parse::<u16>());
                }
            }
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let stderr_reader = {
            let stderr_text = stderr_text.clone();
            thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = stderr.read(&mut chunk) {
                    stderr_text
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            })
        };

        match port_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(port)) => OidcProvider { child, port },
            outcome => {
                let _ = child.kill();
                let status = child.wait();
                let _ = stderr_reader.join();
                panic!(
                    "oidc-provider did not start ({outcome:?}, exit {status:?}); if modules are \
                     missing, run `npm ci --prefix tests/oidc`. Its stderr:\n{}",
                    stderr_text.lock().unwrap()
                );
            }
        }
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn token_url(&self) -> String {
        format!("{}/token", self.issuer())
    }

    /// RFC 7662 introspection of `token`, authenticating as the Basic client.
    async fn introspect(&self, http: &TestClient, token: &str) -> serde_json::Value {
        let (id, secret) = BASIC_CLIENT;
        let credentials = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            form_encode(id),
            form_encode(secret)
        ));
        let answer = http
            .send(
                Method::POST,
                &format!("{}/token/introspection", self.issuer()),
                &[
                    ("authorization", &format!("Basic {credentials}")),
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("accept", "application/json"),
                ],
                Some(format!("token={}", form_encode(token))),
            )
            .await;
        assert_eq!(answer.status, 200, "introspection: {}", answer.text());
        answer.json()
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stand-in consent API: answers every request 200 `{"status":"CONSENTED"}` and records
/// what it was sent.
struct FakeConsentApi {
    url: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

#[derive(Debug, Clone)]
struct SeenRequest {
    method: String,
    path: String,
    authorization: Option<String>,
}

impl FakeConsentApi {
    async fn start() -> FakeConsentApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        recorder.lock().unwrap().push(SeenRequest {
                            method: request.method().to_string(),
                            path: request.uri().path().to_owned(),
                            authorization: request
                                .headers()
                                .get(http::header::AUTHORIZATION)
                                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                        });
                        async {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(200)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from_static(
                                        br#"{"status":"CONSENTED"}"#,
                                    )))
                                    .expect("response"),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeConsentApi { url, seen }
    }

    fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

struct Setup {
    provider: OidcProvider,
    api: FakeConsentApi,
    proxy: consent_proxy::AppHandle,
    http: TestClient,
}

impl Setup {
    async fn start(client_id: &str, client_secret: &str, client_auth: &str) -> Setup {
        Self::start_with(None, |config| {
            config
                .set_str("talkdesk.client_id", client_id)
                .set_str("talkdesk.client_secret", client_secret)
                .set_str("talkdesk.client_auth", client_auth);
        })
        .await
    }

    async fn start_with(
        jwt_client_jwk: Option<&str>,
        configure: impl FnOnce(&mut ProxyConfig),
    ) -> Setup {
        let provider = OidcProvider::start(jwt_client_jwk);
        let api = FakeConsentApi::start().await;
        let mut config = ProxyConfig::for_upstream(&api.url, &provider.token_url());
        config.set("cache.enabled", "false");
        configure(&mut config);
        let proxy = config.start().await;
        Setup {
            provider,
            api,
            proxy,
            http: TestClient::new(),
        }
    }

    async fn get(&self, contact: &str) -> TestResponse {
        let url = format!(
            "{}/voicebiometrics/contacts/{contact}/consent",
            self.proxy.url()
        );
        self.http
            .send(Method::GET, &url, &[("x-api-key", RW_KEY)], None)
            .await
    }

    async fn admin(&self, path: &str) -> TestResponse {
        let url = format!("{}{path}", self.proxy.admin_url());
        self.http.send(Method::GET, &url, &[], None).await
    }

    async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.admin("/metrics").await.text(), sample)
    }

    async fn wait_ready(&self) {
        wait_until(Duration::from_secs(15), || async {
            self.admin("/readyz").await.status == 200
        })
        .await;
    }

    /// One GET through the proxy; returns the token the consent API was given.
    async fn get_through_proxy(&self) -> String {
        let answer = self.get(CONTACT).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.status_field(), "CONSENTED");

        let seen = self.api.seen();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].method, "GET");
        assert!(
            seen[0].path.starts_with("/voicebiometrics/contacts/")
                && seen[0].path.ends_with("/consent"),
            "{seen:?}"
        );
        let authorization = seen[0]
            .authorization
            .clone()
            .expect("an Authorization header");
        let token = authorization
            .strip_prefix("Bearer ")
            .unwrap_or_else(|| panic!("not a bearer token: {authorization:?}"))
            .to_owned();
        assert!(!token.is_empty());
        assert_ne!(token, RW_KEY, "the caller's key must never go upstream");
        token
    }

    /// The token is one this provider issued, live, to `client_id`, with both scopes.
    async fn assert_issued_by_provider(&self, token: &str, client_id: &str) {
        let info = self.provider.introspect(&self.http, token).await;
        assert_eq!(info["active"], true, "{info}");
        assert_eq!(info["client_id"], client_id, "{info}");
        assert_eq!(info["iss"], self.provider.issuer(), "{info}");
        let scope = info["scope"].as_str().unwrap_or_default();
        for wanted in SCOPES {
            assert!(
                scope.split(' ').any(|s| s == wanted),
                "{wanted} not in {info}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_uses_a_token_from_oidc_provider_with_client_secret_basic() {
    let (id, secret) = BASIC_CLIENT;
    let s = Setup::start(id, secret, "basic").await;
    s.wait_ready().await;

    let token = s.get_through_proxy().await;
    s.assert_issued_by_provider(&token, id).await;
    assert_eq!(s.metric(FETCH_OK).await, 1.0);
    assert_eq!(s.metric(FETCH_FAILED).await, 0.0);

    // The token is shared: a second request reuses it, no new fetch.
    let answer = s.get(CONTACT).await;
    assert_eq!(answer.status, 200);
    let seen = s.api.seen();
    assert_eq!(seen[1].authorization, seen[0].authorization);
    assert_eq!(s.metric(FETCH_OK).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_uses_a_token_from_oidc_provider_with_client_secret_post() {
    let (id, secret) = POST_CLIENT;
    let s = Setup::start(id, secret, "post").await;
    s.wait_ready().await;

    let token = s.get_through_proxy().await;
    s.assert_issued_by_provider(&token, id).await;
    assert_eq!(s.metric(FETCH_OK).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_client_secret_is_reported_and_nothing_goes_upstream() {
    let (id, _) = BASIC_CLIENT;
    let s = Setup::start(id, "not-the-secret", "basic").await;
    wait_until(Duration::from_secs(15), || async {
        s.metric(FETCH_FAILED).await >= 1.0
    })
    .await;

    wait_until(Duration::from_secs(5), || async {
        let ready = s.admin("/readyz").await;
        ready.status == 503
            && ready.json()["reason"]
                .as_str()
                .is_some_and(|r| r.contains("401") && r.contains("invalid_client"))
    })
    .await;
    let answer = s.get(CONTACT).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.code(), "token_unavailable");
    assert!(s.api.seen().is_empty(), "{:?}", s.api.seen());
    assert_eq!(s.metric(FETCH_OK).await, 0.0);
}

/// The public JWK (RFC 7517) of an ES256 key: its uncompressed point's coordinates.
fn es256_jwk(key: &consent_proxy::jws::VerifyingKey, kid: &str) -> String {
    let point = &key.public;
    assert_eq!(
        (point.len(), point[0]),
        (65, 4),
        "an uncompressed P-256 point"
    );
    let coordinate = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    serde_json::json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": coordinate(&point[1..33]), "y": coordinate(&point[33..]),
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_uses_a_token_from_oidc_provider_with_private_key_jwt() {
    use consent_proxy::jws::{Algorithm, SigningKey};
    const JWT_CLIENT: &str = "consent-proxy-jwt";
    const KID: &str = "oidc-test-key";
    let key_text = SigningKey::generate_es256();
    let public = SigningKey::from_text(&key_text, Algorithm::ES256)
        .expect("an ES256 key")
        .verifying_key();
    let key_file = crate::support::temp_file::TempFile::new("jwt-client.key", &key_text);
    let s = Setup::start_with(Some(&es256_jwk(&public, KID)), |config| {
        config
            .set_str("talkdesk.client_id", JWT_CLIENT)
            .set_str("talkdesk.client_secret", "")
            .set_str("talkdesk.client_auth", "private_key_jwt")
            .set_str("talkdesk.private_key_file", &key_file.display())
            .set_str("talkdesk.key_id", KID);
    })
    .await;
    s.wait_ready().await;
    let token = s.get_through_proxy().await;
    s.assert_issued_by_provider(&token, JWT_CLIENT).await;
    assert_eq!(s.metric(FETCH_OK).await, 1.0);
}
