//! Test harness: an in-process simulator and an in-process proxy on port 0, and a small
//! HTTP client, so integration tests talk over real sockets.
#![allow(dead_code)]

pub mod audit;
pub mod calls;
pub mod child_proxy;
pub mod fake_upstream;
pub mod fleet;
pub mod forward_proxy;
pub mod history;
pub mod postgres_server;
pub mod python_venv;
pub mod raw_http;
pub mod redis_server;
pub mod relay;
pub mod temp_file;
pub mod tls_upstream;
pub mod yaml;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use consent_proxy::config::Settings;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::simulator::{Simulator, SimulatorConfig};
use consent_proxy::{App, AppHandle};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Keys of the three test clients.
pub const RW_KEY: &str = "rw-key-0123456789abcdef";
pub const READER_KEY: &str = "reader-key-0123456789abcdef";
pub const ADMIN_KEY: &str = "admin-key-0123456789abcdef";
pub const SIM_CLIENT_ID: &str = "sim-client";
pub const SIM_CLIENT_SECRET: &str = "sim-secret-0123456789";

/// A proxy configuration pointed at a simulator, with per-test overrides.
pub struct ProxyConfig {
    sections: BTreeMap<String, BTreeMap<String, String>>,
    clients: bool,
    /// More `[[clients]]`, after the three test clients: (name, key, permissions).
    extra_clients: Vec<(String, String, Vec<String>)>,
}

impl ProxyConfig {
    pub fn for_upstream(api_base_url: &str, token_url: &str) -> Self {
        let mut config = ProxyConfig {
            sections: BTreeMap::new(),
            clients: true,
            extra_clients: Vec::new(),
        };
        config
            .set_str("server.listen", "127.0.0.1:0")
            .set_str("server.admin_listen", "127.0.0.1:0")
            .set_str("talkdesk.api_base_url", api_base_url)
            .set_str("talkdesk.token_url", token_url)
            .set_str("talkdesk.client_id", SIM_CLIENT_ID)
            .set_str("talkdesk.client_secret", SIM_CLIENT_SECRET);
        config
    }

    pub fn for_simulator(sim: &Simulator) -> Self {
        Self::for_upstream(&sim.base_url(), &sim.token_url())
    }

    /// Sets `section.key` to a raw TOML value (`"1"`, `"true"`, `"[\"a\"]"`).
    pub fn set(&mut self, key: &str, toml_value: &str) -> &mut Self {
        let (section, key) = key.split_once('.').expect("section.key");
        self.sections
            .entry(section.to_owned())
            .or_default()
            .insert(key.to_owned(), toml_value.to_owned());
        self
    }

    pub fn set_str(&mut self, key: &str, value: &str) -> &mut Self {
        self.set(key, &toml::Value::String(value.to_owned()).to_string())
    }

    /// Cluster mode through the Redis at `redis_url`. The proxy's own token endpoint is turned
    /// off: in a cluster it needs a signing key shared by every instance.
    pub fn clustered(&mut self, redis_url: &str) -> &mut Self {
        self.set_str("cluster.redis_url", redis_url)
            .set("oauth.enabled", "false")
    }

    pub fn without_clients(&mut self) -> &mut Self {
        self.clients = false;
        self
    }

    /// One more client, with its key as `api_key` (any characters: TOML-quoted).
    pub fn with_client(&mut self, name: &str, key: &str, permissions: &[&str]) -> &mut Self {
        self.extra_clients.push((
            name.to_owned(),
            key.to_owned(),
            permissions.iter().map(|p| (*p).to_owned()).collect(),
        ));
        self
    }

    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for (section, keys) in &self.sections {
            out.push_str(&format!("[{section}]\n"));
            for (key, value) in keys {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        if self.clients {
            out.push_str(&format!(
                "[[clients]]\nname = \"rw\"\napi_key = \"{RW_KEY}\"\npermissions = [\"read\", \"write\"]\n\
                 [[clients]]\nname = \"reader\"\napi_key = \"{READER_KEY}\"\npermissions = [\"read\"]\n\
                 [[clients]]\nname = \"ops\"\napi_key = \"{ADMIN_KEY}\"\npermissions = [\"read\", \"write\", \"admin\"]\n"
            ));
        }
        for (name, key, permissions) in &self.extra_clients {
            out.push_str(&format!(
                "[[clients]]\nname = {}\napi_key = {}\npermissions = {}\n",
                toml::Value::String(name.clone()),
                toml::Value::String(key.clone()),
                toml::Value::Array(
                    permissions
                        .iter()
                        .cloned()
                        .map(toml::Value::String)
                        .collect()
                ),
            ));
        }
        out
    }

    pub fn settings(&self) -> Settings {
        Settings::from_toml_str(&self.to_toml())
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{}", self.to_toml()))
    }

    pub async fn start(&self) -> AppHandle {
        App::start(self.settings()).await.expect("proxy starts")
    }
}

pub fn sim_config() -> SimulatorConfig {
    SimulatorConfig {
        client_id: SIM_CLIENT_ID.into(),
        client_secret: SIM_CLIENT_SECRET.into(),
        ..SimulatorConfig::default()
    }
}

pub async fn start_simulator() -> Simulator {
    Simulator::start("127.0.0.1:0".parse().unwrap(), sim_config())
        .await
        .expect("simulator starts")
}

/// A simulator and a proxy in front of it.
pub struct Harness {
    pub sim: Simulator,
    pub proxy: AppHandle,
    pub http: TestClient,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut ProxyConfig)) -> Harness {
        Self::start_with_upstream(|sim| (sim.base_url(), sim.token_url()), configure).await
    }

    /// As [`Harness::start_with`], with `contact` holding `status` upstream; returns once the
    /// proxy is ready.
    pub async fn start_seeded(
        contact: &str,
        status: ConsentStatus,
        configure: impl FnOnce(&mut ProxyConfig),
    ) -> Harness {
        let h = Self::start_with(configure).await;
        h.sim.set_status(contact, status);
        h.wait_ready().await;
        h
    }

    /// A proxy whose consent API is at `api_base_url` (a fake upstream, a port that refuses
    /// connections) and whose tokens come from the simulator; returns once the proxy is ready.
    pub async fn start_for_api(
        api_base_url: &str,
        configure: impl FnOnce(&mut ProxyConfig),
    ) -> Harness {
        let api_base_url = api_base_url.to_owned();
        let h = Self::start_with_upstream(|sim| (api_base_url, sim.token_url()), configure).await;
        h.wait_ready().await;
        h
    }

    /// A simulator and a proxy whose consent API and token URLs `urls` picks, given the
    /// simulator (`(api_base_url, token_url)`).
    pub async fn start_with_upstream(
        urls: impl FnOnce(&Simulator) -> (String, String),
        configure: impl FnOnce(&mut ProxyConfig),
    ) -> Harness {
        let sim = start_simulator().await;
        let (api_base_url, token_url) = urls(&sim);
        let mut config = ProxyConfig::for_upstream(&api_base_url, &token_url);
        configure(&mut config);
        let proxy = config.start().await;
        Harness {
            sim,
            proxy,
            http: TestClient::new(),
        }
    }

    /// The proxy as a test client talks to it.
    pub fn client(&self) -> ProxyClient<'_> {
        ProxyClient {
            http: &self.http,
            proxy: &self.proxy,
        }
    }

    pub fn consent_url(&self, contact: &str) -> String {
        self.client().consent_url(contact)
    }

    pub async fn get(&self, contact: &str) -> TestResponse {
        self.client().get(contact).await
    }

    pub async fn put(&self, contact: &str, status: &str) -> TestResponse {
        self.client().put(contact, status).await
    }

    pub async fn admin(&self, path: &str) -> TestResponse {
        self.client().admin(path).await
    }

    /// Drops `contact`'s cached answer through the admin API, with the admin key.
    pub async fn purge(&self, contact: &str) -> TestResponse {
        self.client().purge(contact).await
    }

    /// The value of one sample of the proxy's metrics, e.g.
    /// `consent_proxy_cache_lookups_total{result="hit"}`; 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        self.client().metric(sample).await
    }

    /// Waits (polling, bounded) until the proxy reports ready.
    pub async fn wait_ready(&self) {
        self.client().wait_ready().await;
    }

    /// Waits (polling, bounded) until the proxy is ready with its cluster feed live.
    pub async fn wait_cluster_live(&self) {
        wait_until(Duration::from_secs(10), || async {
            let ready = self.admin("/readyz").await;
            ready.status == 200 && ready.json()["cluster"]["feed"] == "live"
        })
        .await;
    }
}

/// One running proxy as a test talks to it: the consent routes with the read-write key, the
/// admin listener. `Harness` and `Fleet` hand one out; a test that starts its own proxy makes
/// one with `ProxyClient { http, proxy }`.
#[derive(Clone, Copy)]
pub struct ProxyClient<'a> {
    pub http: &'a TestClient,
    pub proxy: &'a AppHandle,
}

impl ProxyClient<'_> {
    /// Waits (polling, bounded) until the proxy reports ready.
    pub async fn wait_ready(&self) {
        wait_until(Duration::from_secs(10), || async {
            self.admin("/readyz").await.status == 200
        })
        .await;
    }

    /// The consent resource of `contact`.
    pub fn consent_url(&self, contact: &str) -> String {
        format!(
            "{}/voicebiometrics/contacts/{contact}/consent",
            self.proxy.url()
        )
    }

    /// `GET` of `contact`'s consent, with the read-write key.
    pub async fn get(&self, contact: &str) -> TestResponse {
        self.http
            .send(
                Method::GET,
                &self.consent_url(contact),
                &[("x-api-key", RW_KEY)],
                None,
            )
            .await
    }

    /// `PUT` of `status` as `contact`'s consent, with the read-write key.
    pub async fn put(&self, contact: &str, status: &str) -> TestResponse {
        self.http
            .send(
                Method::PUT,
                &self.consent_url(contact),
                &[("x-api-key", RW_KEY), ("content-type", "application/json")],
                Some(format!(r#"{{"status":"{status}"}}"#)),
            )
            .await
    }

    /// `GET` of `path` on the admin listener, without credentials.
    pub async fn admin(&self, path: &str) -> TestResponse {
        let url = format!("{}{path}", self.proxy.admin_url());
        self.http.send(Method::GET, &url, &[], None).await
    }

    /// `DELETE /admin/cache/{contact}`, with the admin key.
    pub async fn purge(&self, contact: &str) -> TestResponse {
        let url = format!("{}/admin/cache/{contact}", self.proxy.admin_url());
        self.http
            .send(Method::DELETE, &url, &[("x-api-key", ADMIN_KEY)], None)
            .await
    }

    /// The metrics exposition text.
    pub async fn metrics_text(&self) -> String {
        self.admin("/metrics").await.text()
    }

    /// The value of one sample of the metrics (see [`metric_value`]); 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics_text().await, sample)
    }
}

/// Finds `sample` (name with labels exactly as exposed, labels sorted) in exposition text.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Polls `condition` every 20 ms until it holds; panics after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Clone)]
pub struct TestResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The consent status in a `{"status": ...}` body.
    pub fn status_field(&self) -> String {
        self.json()["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_owned()
    }

    /// A throttle's 429: `Retry-After` in seconds, within the throttle's minute. `what` names
    /// the attempt in the failure message.
    pub fn assert_retry_within_a_minute(&self, what: &str) {
        assert_eq!(self.status, 429, "{what}: {}", self.text());
        let retry_after: u64 = self
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{what}: no Retry-After in seconds"));
        assert!(
            (1..=60).contains(&retry_after),
            "{what}: Retry-After {retry_after}"
        );
    }
}

/// A plain HTTP/1.1 client with a connection pool.
#[derive(Clone)]
pub struct TestClient {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Default for TestClient {
    fn default() -> Self {
        Self::new()
    }
}

impl TestClient {
    pub fn new() -> Self {
        TestClient {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A client whose connections come from `local` (any 127.x.y.z address is this machine's
    /// loopback, so a test can be several callers).
    pub fn from_address(local: std::net::IpAddr) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_local_address(Some(local));
        TestClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> TestResponse {
        self.try_send(method, url, headers, body)
            .await
            .expect("request sent")
    }

    /// As [`TestClient::send`], `None` when no answer came (nothing listening, a reset).
    pub async fn try_send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Option<TestResponse> {
        let mut builder = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("valid request");
        let response = self.client.request(request).await.ok()?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.ok()?.to_bytes();
        Some(TestResponse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

/// Removes every `CONSENT_PROXY*` variable (any case) of the test's own environment from
/// `command`, so that a child proxy reads only the configuration its test gives it.
pub fn without_proxy_env(command: &mut std::process::Command) -> &mut std::process::Command {
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| k.to_ascii_uppercase().starts_with("CONSENT_PROXY"))
        {
            command.env_remove(key);
        }
    }
    command
}

/// `consent-proxy serve --config <config>` as a child process: no input, no standard output,
/// its log (standard error) piped, and no `CONSENT_PROXY*` variable of the test's own.
pub fn serve_command(config: &std::path::Path) -> std::process::Command {
    use std::process::Stdio;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_consent-proxy"));
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    without_proxy_env(&mut command);
    command
}

/// Sends SIGTERM to a child process (`kill -TERM`; libc is not a dependency).
pub fn send_sigterm(child: &std::process::Child) {
    let sent = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -TERM failed");
}
