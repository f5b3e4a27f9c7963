//! What the proxy logs, from the outside: the real binary (`consent-proxy serve`) in front of
//! an in-process simulator, driven through a full scenario (reads, writes, caller 401s, token
//! renewals, upstream 500s, a broken exchange, a timeout, a token endpoint failure, a purge,
//! the proxy's own token endpoint granting and refusing, its access tokens accepted and
//! refused), stopped with SIGTERM. Its standard error must hold no secret in any form (keys,
//! client secrets, access tokens, the token signing key) and no full contact id, while the
//! masked ids and every access-log field are there; in JSON every line must be one object.
//!
//! `LOGS_TEST_DUMP=<dir>` writes each run's standard error there, for reading.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::calls::basic;
use crate::support::temp_file::TempFile;
use crate::support::*;
use base64::Engine as _;
use bytes::Bytes;
use consent_proxy::simulator::{Fault, SimRoute, Simulator};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A key no client has: callers' wrong keys must not be logged either.
const WRONG_KEY: &str = "wrong-key-fedcba9876543210";
/// The proxy's token signing key.
const SIGNING_KEY: &str = "logs-test-signing-key-0123456789abcdef";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

/// One run of the scenario.
struct Run {
    level: &'static str,
    format: Format,
    client_auth: &'static str,
    /// Callers speak HTTP/2 (prior knowledge) instead of HTTP/1.1.
    http2: bool,
}

// ---------------------------------------------------------------------------------------------
// The proxy process

/// The running binary; killed if the test ends without stopping it.
struct Proxy {
    child: Child,
    /// Every line of standard error so far.
    lines: Arc<Mutex<Vec<String>>>,
    listening: mpsc::Receiver<String>,
    /// Removed when the proxy is dropped.
    _config_file: TempFile,
}

impl Proxy {
    fn start(config_toml: &str) -> Proxy {
        let config_file = TempFile::new("logs.toml", config_toml);
        let mut child = serve_command(config_file.path())
            .spawn()
            .expect("spawn consent-proxy");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, listening) = mpsc::channel();
        {
            let lines = lines.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("consent-proxy listening") {
                        let _ = tx.send(line.clone());
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Proxy {
            child,
            lines,
            listening,
            _config_file: config_file,
        }
    }

    /// Waits for the "listening" event; returns (consent, admin) base URLs.
    fn wait_listening(&mut self) -> (String, String) {
        let line = self
            .listening
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the proxy did not start:\n{}", self.transcript()));
        let addr = |key: &str| {
            // Text: `key=127.0.0.1:1234`; JSON: `"key":"127.0.0.1:1234"`.
            let start = line
                .find(&format!("{key}="))
                .map(|i| i + key.len() + 1)
                .or_else(|| {
                    line.find(&format!("\"{key}\":\""))
                        .map(|i| i + key.len() + 4)
                })
                .unwrap_or_else(|| panic!("no {key} in {line}"));
            let rest = &line[start..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                .unwrap_or(rest.len());
            format!("http://{}", &rest[..end])
        };
        (addr("listen_addr"), addr("admin_addr"))
    }

    /// SIGTERM, then waits (bounded) for a clean exit; returns all of standard error.
    fn stop(mut self) -> String {
        crate::support::send_sigterm(&self.child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within 20 s of SIGTERM:\n{}",
                self.transcript()
            );
            thread::sleep(Duration::from_millis(20));
        };
        // Let the reader thread drain the pipe.
        thread::sleep(Duration::from_millis(200));
        let transcript = self.transcript();
        assert_eq!(status.code(), Some(0), "{status}:\n{transcript}");
        transcript
    }

    fn transcript(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Callers

struct Caller {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    admin: String,
}

impl Caller {
    async fn send(
        &self,
        method: Method,
        url: &str,
        request_id: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> (u16, String) {
        let mut builder = Request::builder()
            .method(method)
            .uri(url)
            .header("x-request-id", request_id);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(15), self.client.request(request))
            .await
            .expect("answered within 15 s")
            .expect("request sent");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn get(&self, request_id: &str, contact: &str, auth: (&str, &str)) -> (u16, String) {
        let url = format!("{}/voicebiometrics/contacts/{contact}/consent", self.base);
        self.send(Method::GET, &url, request_id, &[auth], None)
            .await
    }

    async fn put(&self, request_id: &str, contact: &str, status: &str) -> (u16, String) {
        let url = format!("{}/voicebiometrics/contacts/{contact}/consent", self.base);
        let body = format!(r#"{{"status":"{status}"}}"#);
        let auth = basic("rw", RW_KEY);
        self.send(
            Method::PUT,
            &url,
            request_id,
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            Some(&body),
        )
        .await
    }

    async fn ready(&self) -> bool {
        let url = format!("{}/readyz", self.admin);
        self.send(Method::GET, &url, "readyz", &[], None).await.0 == 200
    }
}

fn base64_of(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// What the access log must say of one request.
struct Expected {
    request_id: &'static str,
    method: &'static str,
    client: &'static str,
    contact: &'static str,
    status: u16,
    cache: &'static str,
    upstream_status: &'static str,
}

impl Expected {
    /// A GET refused for its credentials: anonymous, nothing looked up.
    fn refused(request_id: &'static str) -> Expected {
        Expected {
            request_id,
            method: "GET",
            client: "anonymous",
            contact: "-",
            status: 401,
            cache: "-",
            upstream_status: "-",
        }
    }
}

const CONTACTS: [&str; 8] = [
    "+15551234567",
    "+15559876543",
    "+15550001111",
    "+15550002222",
    "+15550003333",
    "+15550004444",
    "+15550005555",
    "+15550006666",
];

// ---------------------------------------------------------------------------------------------
// The scenario

async fn scenario(run: Run) {
    let sim = start_simulator().await;
    let mut config = ProxyConfig::for_simulator(&sim);
    config
        .set_str("log.level", run.level)
        .set_str(
            "log.format",
            match run.format {
                Format::Text => "text",
                Format::Json => "json",
            },
        )
        .set_str("talkdesk.client_auth", run.client_auth)
        .set("talkdesk.timeout_ms", "800")
        .set("talkdesk.max_retries", "2")
        // The scenario's run of upstream failures would open the circuit before r13.
        .set("talkdesk.breaker_failures", "0");
    let signing_key_file = TempFile::new("logs-signing-key", SIGNING_KEY);
    config.set_str("oauth.signing_key_file", &signing_key_file.display());
    let mut proxy = Proxy::start(&config.to_toml());
    let (base, admin) = proxy.wait_listening();
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(run.http2);
    let caller = Caller {
        client: builder.build_http(),
        base,
        admin,
    };
    wait_until(Duration::from_secs(10), || caller.ready()).await;

    let mut tokens = BTreeSet::new();
    let mut note_token = |sim: &Simulator| {
        if let Some(auth) = sim
            .last_consent_request()
            .and_then(|r| r.header("authorization").map(str::to_owned))
        {
            tokens.insert(auth.trim_start_matches("Bearer ").to_owned());
        }
    };
    let rw = ("x-api-key", RW_KEY);
    let reader = format!("Bearer {READER_KEY}");
    let ops = basic("ops", ADMIN_KEY);
    let mut expected = Vec::new();
    let mut expect = |e: Expected, got: (u16, String)| {
        assert_eq!(got.0, e.status, "{}: {}", e.request_id, got.1);
        expected.push(e);
    };

    let got = caller.get("r01-miss", "+15551234567", rw).await;
    note_token(&sim);
    expect(
        Expected {
            request_id: "r01-miss",
            method: "GET",
            client: "rw",
            contact: "+15551234567",
            status: 404,
            cache: "MISS",
            upstream_status: "404",
        },
        got,
    );
    let got = caller.put("r02-put", "%2B15551234567", "CONSENTED").await;
    note_token(&sim);
    expect(
        Expected {
            request_id: "r02-put",
            method: "PUT",
            client: "rw",
            contact: "+15551234567",
            status: 201,
            cache: "-",
            upstream_status: "201",
        },
        got,
    );
    let got = caller
        .get("r03-hit", "%2B15551234567", ("authorization", &reader))
        .await;
    expect(
        Expected {
            request_id: "r03-hit",
            method: "GET",
            client: "reader",
            contact: "+15551234567",
            status: 200,
            cache: "HIT",
            upstream_status: "-",
        },
        got,
    );
    let got = caller
        .get("r04-basic", "+15559876543", ("authorization", &ops))
        .await;
    note_token(&sim);
    expect(
        Expected {
            request_id: "r04-basic",
            method: "GET",
            client: "ops",
            contact: "+15559876543",
            status: 404,
            cache: "MISS",
            upstream_status: "404",
        },
        got,
    );

    // Callers with wrong keys, in all three forms.
    let wrong_bearer = format!("Bearer {WRONG_KEY}");
    let wrong_basic = basic("rw", WRONG_KEY);
    for (request_id, auth) in [
        ("r05-wrong-key", ("x-api-key", WRONG_KEY)),
        ("r06-wrong-bearer", ("authorization", wrong_bearer.as_str())),
        ("r07-wrong-basic", ("authorization", wrong_basic.as_str())),
    ] {
        let got = caller.get(request_id, "+15551234567", auth).await;
        expect(Expected::refused(request_id), got);
    }

    // Upstream rejects the token once: renewed, retried.
    sim.inject(SimRoute::Get, Fault::Unauthorized, 1);
    let got = caller.get("r08-renewal", "+15550001111", rw).await;
    note_token(&sim);
    expect(
        Expected {
            request_id: "r08-renewal",
            method: "GET",
            client: "rw",
            contact: "+15550001111",
            status: 404,
            cache: "MISS",
            upstream_status: "404",
        },
        got,
    );
    // Upstream fails every attempt: 502 after the retries.
    sim.inject(SimRoute::Get, Fault::Status500, 3);
    let got = caller.get("r09-upstream-500", "+15550002222", rw).await;
    note_token(&sim);
    expect(
        Expected {
            request_id: "r09-upstream-500",
            method: "GET",
            client: "rw",
            contact: "+15550002222",
            status: 502,
            cache: "MISS",
            upstream_status: "500",
        },
        got,
    );
    // The connection breaks under a write.
    sim.inject(SimRoute::Put, Fault::CloseConnection, 1);
    let got = caller
        .put("r10-upstream-close", "+15550003333", "REFUSED")
        .await;
    note_token(&sim);
    expect(
        Expected {
            request_id: "r10-upstream-close",
            method: "PUT",
            client: "rw",
            contact: "+15550003333",
            status: 502,
            cache: "-",
            upstream_status: "error",
        },
        got,
    );
    // Upstream too slow for one attempt.
    sim.inject(SimRoute::Get, Fault::Delay(Duration::from_secs(2)), 1);
    let got = caller.get("r11-upstream-timeout", "+15550004444", rw).await;
    note_token(&sim);
    expect(
        Expected {
            request_id: "r11-upstream-timeout",
            method: "GET",
            client: "rw",
            contact: "+15550004444",
            status: 504,
            cache: "MISS",
            upstream_status: "timeout",
        },
        got,
    );
    // A purge on the admin listener (logged, masked; not an access-log event of the consent
    // listener).
    let purge = caller
        .send(
            Method::DELETE,
            &format!("{}/admin/cache/%2B15551234567", caller.admin),
            "purge",
            &[("x-api-key", ADMIN_KEY)],
            None,
        )
        .await;
    assert_eq!(purge.0, 204, "purge: {}", purge.1);
    // Upstream rejects the token and the token endpoint refuses a new one: 503.
    sim.inject(SimRoute::Get, Fault::Unauthorized, 1);
    sim.inject(SimRoute::Token, Fault::Unauthorized, 1);
    let got = caller.get("r12-token-failure", "+15550005555", rw).await;
    note_token(&sim);
    expect(
        Expected {
            request_id: "r12-token-failure",
            method: "GET",
            client: "rw",
            contact: "+15550005555",
            status: 503,
            cache: "MISS",
            upstream_status: "401",
        },
        got,
    );
    // The refresher recovers on its own.
    wait_until(Duration::from_secs(10), || caller.ready()).await;
    let got = caller.get("r13-after-purge", "+15551234567", rw).await;
    note_token(&sim);
    expect(
        Expected {
            request_id: "r13-after-purge",
            method: "GET",
            client: "rw",
            contact: "+15551234567",
            status: 200,
            cache: "MISS",
            upstream_status: "200",
        },
        got,
    );
    let got = caller.get("r14-plain", "+15550006666", rw).await;
    note_token(&sim);
    expect(
        Expected {
            request_id: "r14-plain",
            method: "GET",
            client: "rw",
            contact: "+15550006666",
            status: 404,
            cache: "MISS",
            upstream_status: "404",
        },
        got,
    );
    assert!(
        tokens.len() >= 3,
        "expected several tokens (renewals): {}",
        tokens.len()
    );

    // The proxy's own token endpoint: a token granted (Basic), one refused (post, wrong
    // secret); the token used, and a tampered one refused.
    let token_url = format!("{}/oauth/token", caller.base);
    let form = ("content-type", "application/x-www-form-urlencoded");
    let rw_basic = basic("rw", RW_KEY);
    let (status, body) = caller
        .send(
            Method::POST,
            &token_url,
            "t01-token",
            &[("authorization", rw_basic.as_str()), form],
            Some("grant_type=client_credentials"),
        )
        .await;
    assert_eq!(status, 200, "t01-token: {body}");
    let access_token: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let access_token = access_token["access_token"]
        .as_str()
        .expect("a token")
        .to_owned();
    let wrong_post =
        format!("grant_type=client_credentials&client_id=rw&client_secret={WRONG_KEY}");
    let (status, _) = caller
        .send(
            Method::POST,
            &token_url,
            "t02-token-refused",
            &[form],
            Some(&wrong_post),
        )
        .await;
    assert_eq!(status, 401, "t02-token-refused");
    let with_token = format!("Bearer {access_token}");
    let got = caller
        .get(
            "t03-with-token",
            "+15550006666",
            ("authorization", &with_token),
        )
        .await;
    expect(
        Expected {
            request_id: "t03-with-token",
            method: "GET",
            client: "rw",
            contact: "+15550006666",
            status: 404,
            cache: "HIT",
            upstream_status: "-",
        },
        got,
    );
    let tampered_token = format!("{access_token}x");
    let tampered = format!("Bearer {tampered_token}");
    let got = caller
        .get(
            "t04-tampered-token",
            "+15550006666",
            ("authorization", &tampered),
        )
        .await;
    expect(Expected::refused("t04-tampered-token"), got);
    drop(signing_key_file);

    let log = proxy.stop();
    if let Ok(dir) = std::env::var("LOGS_TEST_DUMP") {
        let name = format!(
            "{}-{:?}.log",
            run.level.replace([',', '='], "_"),
            run.format
        );
        std::fs::write(std::path::Path::new(&dir).join(name), &log).unwrap();
    }
    let mut secrets = tokens;
    secrets.insert(access_token.clone());
    secrets.insert(tampered_token);
    // Each part of the access token but the header (which only names the algorithm and key id).
    secrets.extend(access_token.split('.').skip(1).map(str::to_owned));
    check_secrets(&run, &log, &secrets);
    check_events(&run, &log, &expected);
    check_token_endpoint_events(&run, &log);
}

// ---------------------------------------------------------------------------------------------
// Checks

fn check_secrets(run: &Run, log: &str, tokens: &BTreeSet<String>) {
    let mut forbidden: Vec<(String, String)> = vec![
        ("client secret".into(), SIM_CLIENT_SECRET.into()),
        ("token signing key".into(), SIGNING_KEY.into()),
        (
            "token endpoint Basic credential".into(),
            base64_of(&format!("{SIM_CLIENT_ID}:{SIM_CLIENT_SECRET}")),
        ),
    ];
    for (name, key) in [
        ("rw", RW_KEY),
        ("reader", READER_KEY),
        ("ops", ADMIN_KEY),
        ("rw", WRONG_KEY),
    ] {
        forbidden.push((format!("API key of {name}"), key.to_owned()));
        forbidden.push((
            format!("Basic credential of {name}"),
            base64_of(&format!("{name}:{key}")),
        ));
    }
    for token in tokens {
        forbidden.push(("bearer token".into(), token.clone()));
    }
    for contact in CONTACTS {
        let digits = contact.trim_start_matches('+');
        forbidden.push(("contact id".into(), contact.to_owned()));
        forbidden.push(("encoded contact id".into(), format!("%2B{digits}")));
        forbidden.push(("encoded contact id".into(), format!("%2b{digits}")));
        forbidden.push(("contact id digits".into(), digits.to_owned()));
    }
    for (what, secret) in &forbidden {
        if let Some(line) = log.lines().find(|line| line.contains(secret.as_str())) {
            panic!(
                "[{} {:?}] the {what} ({secret}) is logged:\n{line}",
                run.level, run.format
            );
        }
    }
    let lower = log.to_ascii_lowercase();
    assert!(
        !lower.contains("bearer "),
        "[{}] a bearer credential is logged",
        run.level
    );
    // Issued tokens are 43 alphanumerics: no such run (a token never seen by this test, say
    // one renewed just before the end) may appear either.
    let longest_run = log
        .split(|c: char| !c.is_ascii_alphanumeric())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(
        longest_run < 40,
        "[{}] a token-like string is logged",
        run.level
    );

    for contact in CONTACTS {
        let masked = consent_proxy::consent::mask_contact_id(contact);
        assert!(
            log.contains(&masked),
            "[{}] masked contact {masked} missing",
            run.level
        );
    }
    assert!(log.contains("+155******67"));
    assert!(log.contains("cache entry purged"), "purge not logged");
}

/// The fields of the access-log event with this request id.
fn access_log_event(run: &Run, log: &str, request_id: &str) -> BTreeMap<String, String> {
    let events: Vec<BTreeMap<String, String>> = log
        .lines()
        .filter_map(|line| match run.format {
            Format::Json => {
                let value: serde_json::Value = serde_json::from_str(line).ok()?;
                let object = value.as_object()?;
                if object.get("message")?.as_str()? != "request"
                    || object.get("target")?.as_str()? != "consent_proxy::http::routes"
                {
                    return None;
                }
                Some(
                    object
                        .iter()
                        .map(|(k, v)| {
                            let v = match v {
                                serde_json::Value::String(s) => s.clone(),
                                other => other.to_string(),
                            };
                            (k.clone(), v)
                        })
                        .collect(),
                )
            }
            Format::Text => {
                let (_, fields) = line.split_once(" consent_proxy::http::routes: request ")?;
                Some(text_fields(fields))
            }
        })
        .filter(|fields| fields.get("request_id").map(String::as_str) == Some(request_id))
        .collect();
    assert_eq!(
        events.len(),
        1,
        "[{} {:?}] access-log events for {request_id}: {events:?}",
        run.level,
        run.format
    );
    events.into_iter().next().unwrap()
}

/// `key=value key="quoted value"` as tracing's text format writes fields.
fn text_fields(mut rest: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    loop {
        rest = rest.trim_start();
        let Some(eq) = rest.find('=') else {
            return fields;
        };
        let key = rest[..eq].to_owned();
        rest = &rest[eq + 1..];
        let mut value = String::new();
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            rest = &quoted[end..];
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            value.push_str(&rest[..end]);
            rest = &rest[end..];
        }
        fields.insert(key, value);
    }
}

/// The token endpoint's requests are in the access log too (route `other`), the granted one
/// under its client, the refused one anonymous with the OAuth error.
fn check_token_endpoint_events(run: &Run, log: &str) {
    let tag = format!("[{} {:?}]", run.level, run.format);
    let granted = access_log_event(run, log, "t01-token");
    let field = |fields: &BTreeMap<String, String>, name: &str| fields.get(name).cloned();
    assert_eq!(
        field(&granted, "route").as_deref(),
        Some("other"),
        "{tag} {granted:?}"
    );
    assert_eq!(field(&granted, "method").as_deref(), Some("POST"), "{tag}");
    assert_eq!(field(&granted, "client").as_deref(), Some("rw"), "{tag}");
    assert_eq!(field(&granted, "status").as_deref(), Some("200"), "{tag}");
    let refused = access_log_event(run, log, "t02-token-refused");
    assert_eq!(
        field(&refused, "client").as_deref(),
        Some("anonymous"),
        "{tag}"
    );
    assert_eq!(field(&refused, "status").as_deref(), Some("401"), "{tag}");
    assert!(
        field(&refused, "error").is_some_and(|e| e.starts_with("invalid_client")),
        "{tag} {refused:?}"
    );
    let tampered = access_log_event(run, log, "t04-tampered-token");
    assert!(
        field(&tampered, "error").is_some_and(|e| e.contains("signature")),
        "{tag} the reason a token was refused: {tampered:?}"
    );
}

fn check_events(run: &Run, log: &str, expected: &[Expected]) {
    let tag = format!("[{} {:?}]", run.level, run.format);
    if run.format == Format::Json {
        for line in log.lines() {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{tag} not JSON ({e}): {line}"));
            let object = value
                .as_object()
                .unwrap_or_else(|| panic!("{tag} not an object: {line}"));
            for key in ["timestamp", "level", "target"] {
                assert!(object.contains_key(key), "{tag} no {key}: {line}");
            }
            // (Some library events are fields only, without a message.)
            if object["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("consent_proxy"))
            {
                assert!(object.contains_key("message"), "{tag} no message: {line}");
            }
        }
    }

    for e in expected {
        let fields = access_log_event(run, log, e.request_id);
        let what = format!("{tag} {}: {fields:?}", e.request_id);
        let field = |name: &str| fields.get(name).map(String::as_str);
        let masked = if e.contact == "-" {
            "-".to_owned()
        } else {
            consent_proxy::consent::mask_contact_id(e.contact)
        };
        assert_eq!(field("client"), Some(e.client), "{what}");
        assert_eq!(field("method"), Some(e.method), "{what}");
        assert_eq!(field("route"), Some("consent"), "{what}");
        assert_eq!(field("contact"), Some(masked.as_str()), "{what}");
        assert_eq!(
            field("status"),
            Some(e.status.to_string().as_str()),
            "{what}"
        );
        assert_eq!(field("cache"), Some(e.cache), "{what}");
        assert_eq!(field("upstream_status"), Some(e.upstream_status), "{what}");
        let duration: u64 = field("duration_us")
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no duration_us"));
        match field("upstream_duration_us") {
            None => assert_eq!(e.upstream_status, "-", "{what}: no upstream_duration_us"),
            Some(upstream) => {
                assert_ne!(
                    e.upstream_status, "-",
                    "{what}: upstream duration without status"
                );
                let upstream: u64 = upstream.parse().expect("a number");
                assert!(
                    upstream <= duration,
                    "{what}: upstream took longer than all"
                );
            }
        }
        if e.upstream_status == "timeout" {
            let upstream: u64 = field("upstream_duration_us").unwrap().parse().unwrap();
            assert!(
                upstream >= 700_000,
                "{what}: the timed-out attempt's duration"
            );
        }
        assert!(field("error").is_some(), "{what}");
    }

    // The start-up configuration, secrets redacted.
    assert!(
        log.contains("effective configuration (secrets redacted)"),
        "{tag} no start-up configuration"
    );
    assert!(
        log.contains(r#"client_secret = \"<redacted>\""#)
            || log.contains(r#"client_secret = "<redacted>""#),
        "{tag} client_secret not shown as redacted"
    );
    // Every client is listed, with nothing of its key (the secret checks cover the key itself).
    assert!(
        log.contains("[[clients]]"),
        "{tag} no clients in the configuration"
    );
    assert!(
        !log.contains("api_key"),
        "{tag} a client key field is logged"
    );

    // Our own debug events are there whenever our crate is at debug.
    assert!(log.contains("token obtained"), "{tag} no debug events");

    // The HTTP libraries' debug events: only when the filter names them.
    let library_lines = log
        .lines()
        .filter(|line| line.contains("hyper_util::") || line.contains("h2::"))
        .count();
    if run.level.contains("hyper_util") {
        assert!(library_lines > 0, "{tag} no library events at all");
    } else {
        assert_eq!(library_lines, 0, "{tag} library events despite the cap");
    }
}

// ---------------------------------------------------------------------------------------------
// The runs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_at_consent_proxy_debug() {
    scenario(Run {
        level: "consent_proxy=debug,info",
        format: Format::Text,
        client_auth: "basic",
        http2: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_at_consent_proxy_debug() {
    scenario(Run {
        level: "consent_proxy=debug,info",
        format: Format::Json,
        client_auth: "post",
        http2: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_at_debug() {
    scenario(Run {
        level: "debug",
        format: Format::Text,
        client_auth: "post",
        http2: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_at_debug() {
    scenario(Run {
        level: "debug",
        format: Format::Json,
        client_auth: "basic",
        http2: false,
    })
    .await;
}

/// The HTTP libraries named explicitly, at trace, with callers on HTTP/2: even their events
/// carry none of the secrets or full contact ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_with_the_http_libraries_at_trace() {
    scenario(Run {
        level: "trace,hyper_util=trace,h2=trace",
        format: Format::Json,
        client_auth: "basic",
        http2: true,
    })
    .await;
}

/// Cluster mode, at trace, in JSON: the Redis password (given in the URL), and a wrong one that
/// Redis refuses, reach no log line, metric, `/readyz` answer or error answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_stays_secret() {
    const PASSWORD: &str = "redis-pw-5f3a9c1e7b";
    const WRONG: &str = "wrong-redis-pw-42d8e0";
    let redis = crate::support::redis_server::RedisServer::start_with_password(Some(PASSWORD));
    let sim = start_simulator().await;
    for (password, accepted) in [(PASSWORD, true), (WRONG, false)] {
        let mut config = ProxyConfig::for_simulator(&sim);
        config
            .clustered(&format!("redis://:{password}@127.0.0.1:{}", redis.port()))
            .set_str("log.level", "trace")
            .set_str("log.format", "json");
        let mut proxy = Proxy::start(&config.to_toml());
        let (base, admin) = proxy.wait_listening();
        let caller = Caller {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base,
            admin,
        };
        wait_until(Duration::from_secs(10), || caller.ready()).await;
        let readyz = format!("{}/readyz", caller.admin);
        let feed = if accepted { "live" } else { "down" };
        wait_until(Duration::from_secs(10), || async {
            let (_, body) = caller.send(Method::GET, &readyz, "r", &[], None).await;
            body.contains(&format!("\"feed\":\"{feed}\""))
        })
        .await;
        let mut answers = Vec::new();
        let (status, body) = caller.put("put-1", "+15551234567", "REFUSED").await;
        assert_eq!((200..300).contains(&status), accepted, "{status} {body}");
        answers.push(body);
        answers.push(
            caller
                .get("get-1", "+15551234567", ("x-api-key", RW_KEY))
                .await
                .1,
        );
        let metrics = format!("{}/metrics", caller.admin);
        answers.push(caller.send(Method::GET, &metrics, "m", &[], None).await.1);
        answers.push(caller.send(Method::GET, &readyz, "r", &[], None).await.1);
        let log = proxy.stop();
        assert!(
            log.contains("cluster mode"),
            "the cluster's start-up is logged"
        );
        // The access log names how the GET was answered as its `x-cache-status` does: BYPASS
        // while the feed is down, the reason in `cache_detail`.
        let get = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|event| event["message"] == "request" && event["request_id"] == "get-1")
            .expect("the GET's access-log line");
        let (cache, detail) = if accepted {
            ("HIT", serde_json::Value::Null)
        } else {
            ("BYPASS", "unsynced".into())
        };
        assert_eq!(get["cache"], cache, "{get}");
        assert_eq!(get["cache_detail"], detail, "{get}");
        for text in answers.iter().chain([&log]) {
            if let Some(line) = text.lines().find(|line| line.contains(password)) {
                panic!("the Redis password is shown:\n{line}");
            }
        }
    }
}
