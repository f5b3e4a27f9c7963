//! Egress as in a corporate network: Talkdesk (an HTTPS fake with a certificate from a CA made
//! here) reached through a real forward proxy (`tinyproxy`, started here) and trusted through
//! `egress.ca_file`:
//! - without `ca_file` the certificate is refused, and `/readyz` and the caller's 503 say why;
//! - with it, the token, a GET and a PUT succeed, directly and through the proxy, whose log shows
//!   one tunnel carrying every request (the pool keeps it);
//! - a proxy that wants credentials (407), one that refuses the port (403) and one that is down
//!   each give their own reason, and callers get 503 `token_unavailable` at once;
//! - without `egress.proxy_url`, `HTTPS_PROXY` and `NO_PROXY` from the environment are followed
//!   as curl follows them, and `egress.proxy_url` wins over them.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use consent_proxy::AppHandle;

use crate::support::forward_proxy::ForwardProxy;
use crate::support::redis_server::free_port;
use crate::support::temp_file::TempFile;
use crate::support::tls_upstream::{FakeTalkdesk, TestPki};
use crate::support::*;

const CONTACT: &str = "+15551234567";
const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A proxy configuration in front of `fake`, its token endpoint included.
fn config_for(fake: &FakeTalkdesk) -> ProxyConfig {
    let mut config = ProxyConfig::for_upstream(&fake.url(), &format!("{}/oauth/token", fake.url()));
    config.set("cache.enabled", "false");
    config
}

async fn readyz(http: &TestClient, proxy: &AppHandle) -> TestResponse {
    ProxyClient { http, proxy }.admin("/readyz").await
}

/// Waits (bounded) until `proxy` reports ready.
async fn wait_ready(http: &TestClient, proxy: &AppHandle) {
    ProxyClient { http, proxy }.wait_ready().await
}

/// A proxy in front of `fake` that trusts `ca_file` and reaches it through `proxy_url`.
async fn start_through(fake: &FakeTalkdesk, ca_file: &str, proxy_url: &str) -> AppHandle {
    config_for(fake)
        .set_str("egress.ca_file", ca_file)
        .set_str("egress.proxy_url", proxy_url)
        .start()
        .await
}

/// Waits until `/readyz` answers 503 with a reason containing `needle`; returns the reason.
async fn wait_unready_because(http: &TestClient, proxy: &AppHandle, needle: &str) -> String {
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let answer = readyz(http, proxy).await;
        last = answer.json()["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if answer.status == 503 && last.contains(needle) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("/readyz never gave a reason with {needle:?}; the last: {last:?}");
}

/// A GET answered 503 `token_unavailable` well before the request's deadline (10 s).
async fn assert_refused_at_once(http: &TestClient, proxy: &AppHandle) {
    let started = Instant::now();
    let answer = ProxyClient { http, proxy }.get(CONTACT).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.code(), "token_unavailable", "{}", answer.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered after {:?}, near the deadline",
        started.elapsed()
    );
}

async fn assert_get_and_put_work(http: &TestClient, proxy: &AppHandle) {
    let get = ProxyClient { http, proxy }.get(CONTACT).await;
    assert_eq!(get.status, 200, "{}", get.text());
    let put = ProxyClient { http, proxy }.put(CONTACT, "CONSENTED").await;
    assert_eq!(put.status, 200, "{}", put.text());
}

#[tokio::test]
async fn a_certificate_from_an_unknown_ca_is_refused_saying_why_and_trusted_with_ca_file() {
    let pki = TestPki::new();
    let fake = FakeTalkdesk::start(&pki, ALPN).await;
    let http = TestClient::new();

    let untrusting = config_for(&fake).start().await;
    let reason = wait_unready_because(&http, &untrusting, "not trusted").await;
    assert!(reason.contains("egress.ca_file"), "{reason}");
    assert_refused_at_once(&http, &untrusting).await;
    untrusting.shutdown().await;

    let trusting = config_for(&fake)
        .set_str("egress.ca_file", &pki.ca_file.display().to_string())
        .start()
        .await;
    wait_ready(&http, &trusting).await;
    assert_get_and_put_work(&http, &trusting).await;
    trusting.shutdown().await;
}

#[tokio::test]
async fn through_the_forward_proxy_one_tunnel_carries_every_request() {
    let pki = TestPki::new();
    let fake = FakeTalkdesk::start(&pki, ALPN).await;
    let forward = ForwardProxy::start(&[fake.addr.port()], None);
    let http = TestClient::new();
    let ca_file = pki.ca_file.display().to_string();
    let proxy = start_through(&fake, &ca_file, &forward.url()).await;
    wait_ready(&http, &proxy).await;
    assert_get_and_put_work(&http, &proxy).await;
    let client = ProxyClient {
        http: &http,
        proxy: &proxy,
    };
    for _ in 0..20 {
        assert_eq!(client.get(CONTACT).await.status, 200);
    }
    let upstream_requests = fake.seen().len();
    let tunnels = forward.connects();
    println!(
        "{upstream_requests} upstream requests over {} tunnel(s): {tunnels:?}",
        tunnels.len()
    );
    assert_eq!(upstream_requests, 23, "token + 22 consent requests");
    let expected = format!("CONNECT localhost:{} HTTP/1.1", fake.addr.port());
    assert_eq!(tunnels, [expected], "one tunnel, kept by the pool");
    proxy.shutdown().await;
}

#[tokio::test]
async fn each_way_a_tunnel_fails_has_its_own_reason() {
    let pki = TestPki::new();
    let fake = FakeTalkdesk::start(&pki, ALPN).await;
    let http = TestClient::new();
    let ca_file = pki.ca_file.display().to_string();
    let asking = ForwardProxy::start(&[fake.addr.port()], Some(("corp", "pr0xy-pw")));
    // Tunnels only to port 1 (with no `ConnectPort` at all, tinyproxy would allow every port).
    let refusing = ForwardProxy::start(&[1], None);
    let down = format!("http://127.0.0.1:{}", free_port());
    let with_credentials = asking.url().replace("http://", "http://corp:pr0xy-pw@");

    for (proxy_url, needle) in [
        (asking.url(), "407 (the proxy wants credentials"),
        (refusing.url(), "403 (the proxy's policy forbids"),
        (down, "is unreachable"),
    ] {
        let proxy = start_through(&fake, &ca_file, &proxy_url).await;
        let reason = wait_unready_because(&http, &proxy, needle).await;
        assert!(reason.contains("the egress proxy 127.0.0.1:"), "{reason}");
        assert_refused_at_once(&http, &proxy).await;
        proxy.shutdown().await;
    }

    let proxy = start_through(&fake, &ca_file, &with_credentials).await;
    wait_ready(&http, &proxy).await;
    assert_get_and_put_work(&http, &proxy).await;
    let reasons = readyz(&http, &proxy).await.text();
    assert!(!reasons.contains("pr0xy-pw"), "{reasons}");
    assert!(!asking.connects().is_empty());
    proxy.shutdown().await;
}

/// `consent-proxy serve` as a child process with `env` added to its environment.
struct Served {
    child: Child,
    admin: String,
    _config: TempFile,
}

impl Served {
    fn start(config: &mut ProxyConfig, env: &[(&str, &str)]) -> Served {
        let admin = format!("127.0.0.1:{}", free_port());
        config
            .set_str("server.listen", &format!("127.0.0.1:{}", free_port()))
            .set_str("server.admin_listen", &admin);
        let file = TempFile::new("egress.toml", &config.to_toml());
        let mut command = serve_command(file.path());
        command.envs(env.iter().copied()).stderr(Stdio::null());
        for name in [
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
        ] {
            if !env.iter().any(|(key, _)| *key == name) {
                command.env_remove(name);
            }
        }
        Served {
            child: command.spawn().expect("start consent-proxy"),
            admin: format!("http://{admin}"),
            _config: file,
        }
    }

    async fn readyz(&self, http: &TestClient) -> Option<TestResponse> {
        let url = format!("{}/readyz", self.admin);
        http.try_send(http::Method::GET, &url, &[], None).await
    }

    async fn wait_ready(&self, http: &TestClient) {
        wait_until(Duration::from_secs(15), || async {
            self.readyz(http)
                .await
                .is_some_and(|answer| answer.status == 200)
        })
        .await;
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_environment_names_the_proxy_unless_egress_proxy_url_does() {
    let pki = TestPki::new();
    let fake = FakeTalkdesk::start(&pki, ALPN).await;
    let forward = ForwardProxy::start(&[fake.addr.port()], None);
    let http = TestClient::new();
    let ca_file = pki.ca_file.display().to_string();
    let tunnel = format!("CONNECT localhost:{} HTTP/1.1", fake.addr.port());

    let mut config = config_for(&fake);
    config.set_str("egress.ca_file", &ca_file);
    let served = Served::start(&mut config, &[("HTTPS_PROXY", &forward.url())]);
    served.wait_ready(&http).await;
    assert_eq!(
        forward.connects(),
        std::slice::from_ref(&tunnel),
        "HTTPS_PROXY followed"
    );
    drop(served);

    let served = Served::start(
        &mut config,
        &[
            ("HTTPS_PROXY", &forward.url()),
            ("NO_PROXY", "example.com,localhost"),
        ],
    );
    served.wait_ready(&http).await;
    assert_eq!(
        forward.connects(),
        std::slice::from_ref(&tunnel),
        "NO_PROXY: direct"
    );
    drop(served);

    let down = format!("http://127.0.0.1:{}", free_port());
    config.set_str("egress.proxy_url", &down);
    let served = Served::start(&mut config, &[("HTTPS_PROXY", &forward.url())]);
    wait_until(Duration::from_secs(15), || async {
        served
            .readyz(&http)
            .await
            .is_some_and(|answer| answer.status == 503 && answer.text().contains("is unreachable"))
    })
    .await;
    assert_eq!(forward.connects(), [tunnel], "egress.proxy_url wins");
}
