//! TLS on both sides, with a CA and certificates made at test time (rcgen):
//! - termination: the consent listener with `server.tls_cert_file`/`tls_key_file` answers GET
//!   and PUT over HTTP/1.1 and over HTTP/2 (chosen by ALPN), serves its OAuth token endpoint
//!   there too, survives plaintext and silent clients, and refuses to start with unusable
//!   certificate or key files, naming the key;
//! - upstream: the proxy speaks HTTP/2 to an HTTPS consent API that offers it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::support::tls_upstream::{FakeTalkdesk, TestPki, FAKE_TOKEN};
use crate::support::*;
use bytes::Bytes;
use consent_proxy::consent::ConsentStatus;
use consent_proxy::error::ErrorChain;
use consent_proxy::upstream::transport::Transport;
use consent_proxy::App;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Client side

/// Which protocols the client offers by ALPN.
#[derive(Debug, Clone, Copy)]
enum Offer {
    Http1,
    H2,
    Both,
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn https_client(pki: &TestPki, offer: Offer) -> HttpsClient {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(pki.client_config())
        .https_only();
    let connector = match offer {
        Offer::Http1 => builder.enable_http1().build(),
        Offer::H2 => builder.enable_http2().build(),
        Offer::Both => builder.enable_http1().enable_http2().build(),
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

struct Answer {
    status: StatusCode,
    version: Version,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

async fn send(
    client: &HttpsClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("answered within 10 s")
        .expect("request sent");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

fn consent_url(host: &str, port: u16, contact: &str) -> String {
    format!("https://{host}:{port}/voicebiometrics/contacts/{contact}/consent")
}

/// A proxy in front of a simulator, terminating TLS with the test PKI.
async fn tls_proxy(
    pki: &TestPki,
    configure: impl FnOnce(&mut ProxyConfig),
) -> (
    consent_proxy::simulator::Simulator,
    consent_proxy::AppHandle,
) {
    let sim = start_simulator().await;
    let mut config = ProxyConfig::for_simulator(&sim);
    config
        .set_str("server.tls_cert_file", pki.cert_file.to_str().unwrap())
        .set_str("server.tls_key_file", pki.key_file.to_str().unwrap());
    configure(&mut config);
    let proxy = config.start().await;
    (sim, proxy)
}

// ---------------------------------------------------------------------------------------------
// Termination

#[tokio::test]
async fn get_and_put_over_http1_and_http2_chosen_by_alpn() {
    let pki = TestPki::new();
    let (sim, proxy) = tls_proxy(&pki, |_| {}).await;
    let port = proxy.listen_addr.port();
    let cases = [
        (Offer::Http1, Version::HTTP_11, "localhost", "+15550000001"),
        (Offer::H2, Version::HTTP_2, "127.0.0.1", "+15550000002"),
        // Offered both, the proxy picks h2.
        (Offer::Both, Version::HTTP_2, "localhost", "+15550000003"),
        (Offer::Both, Version::HTTP_2, "127.0.0.1", "%2B15550000004"),
    ];
    for (offer, version, host, contact) in cases {
        let client = https_client(&pki, offer);
        let url = consent_url(host, port, contact);
        let what = format!("{offer:?} to {host}, contact {contact}");

        let put = send(
            &client,
            Method::PUT,
            &url,
            &[("x-api-key", RW_KEY), ("content-type", "application/json")],
            r#"{"status":"CONSENTED"}"#,
        )
        .await;
        assert!(
            matches!(put.status.as_u16(), 200 | 201),
            "{what}: PUT answered {} {:?}",
            put.status,
            put.body
        );
        assert_eq!(put.version, version, "{what}: PUT");
        assert_eq!(put.json()["status"], "CONSENTED", "{what}: PUT body");
        assert!(put.headers.contains_key("x-request-id"), "{what}");

        let get = send(&client, Method::GET, &url, &[("x-api-key", RW_KEY)], "").await;
        assert_eq!(get.status, StatusCode::OK, "{what}: GET {:?}", get.body);
        assert_eq!(get.version, version, "{what}: GET");
        assert_eq!(get.json()["status"], "CONSENTED", "{what}: GET body");
        assert!(get.headers.contains_key("x-cache-status"), "{what}");

        let plus = contact.replace("%2B", "+");
        assert_eq!(
            sim.stored_status(&plus),
            Some(ConsentStatus::Consented),
            "{what}: upstream has the write"
        );

        // Errors travel over TLS too.
        let denied = send(&client, Method::GET, &url, &[("x-api-key", "wrong")], "").await;
        assert_eq!(denied.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(denied.version, version, "{what}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_token_endpoint_is_served_over_tls_and_its_tokens_work_there() {
    let pki = TestPki::new();
    let (sim, proxy) = tls_proxy(&pki, |_| {}).await;
    let port = proxy.listen_addr.port();
    for (offer, version) in [
        (Offer::Http1, Version::HTTP_11),
        (Offer::H2, Version::HTTP_2),
    ] {
        let client = https_client(&pki, offer);
        let issued = send(
            &client,
            Method::POST,
            &format!("https://localhost:{port}/oauth/token"),
            &[("content-type", "application/x-www-form-urlencoded")],
            &format!("grant_type=client_credentials&client_id=rw&client_secret={RW_KEY}"),
        )
        .await;
        assert_eq!(
            issued.status,
            StatusCode::OK,
            "{offer:?}: {:?}",
            issued.body
        );
        assert_eq!(issued.version, version);
        let token = issued.json()["access_token"].as_str().unwrap().to_owned();
        let bearer = format!("Bearer {token}");
        let url = consent_url("localhost", port, "+15550000009");
        let put = send(
            &client,
            Method::PUT,
            &url,
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            r#"{"status":"REFUSED"}"#,
        )
        .await;
        assert!(
            matches!(put.status.as_u16(), 200 | 201),
            "{offer:?}: {:?}",
            put.body
        );
        let get = send(
            &client,
            Method::GET,
            &url,
            &[("authorization", &bearer)],
            "",
        )
        .await;
        assert_eq!(get.status, StatusCode::OK, "{offer:?}");
        assert_eq!(get.json()["status"], "REFUSED");
    }
    assert_eq!(
        sim.stored_status("+15550000009"),
        Some(ConsentStatus::Refused)
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn plaintext_http_to_the_tls_port_fails_without_crashing_the_server() {
    let pki = TestPki::new();
    let (_sim, proxy) = tls_proxy(&pki, |_| {}).await;
    for _ in 0..3 {
        let mut stream = TcpStream::connect(proxy.listen_addr).await.unwrap();
        stream
            .write_all(
                b"GET /voicebiometrics/contacts/+15551234567/consent HTTP/1.1\r\n\
                  Host: localhost\r\nx-api-key: rw-key-0123456789abcdef\r\n\r\n",
            )
            .await
            .unwrap();
        let mut answer = Vec::new();
        // The server ends the connection (perhaps after a TLS alert): EOF or a reset.
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("the server closes a plaintext connection promptly");
        assert!(
            !answer.starts_with(b"HTTP/"),
            "an HTTP answer on the TLS port ({read:?}): {:?}",
            String::from_utf8_lossy(&answer)
        );
    }

    // An HTTP client gets an error, not a hang.
    let plain: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(format!(
        "http://{}/voicebiometrics/contacts/+15551234567/consent",
        proxy.listen_addr
    ))
    .header("x-api-key", RW_KEY)
    .body(Full::new(Bytes::new()))
    .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), plain.request(request))
        .await
        .expect("the plain-HTTP request fails promptly");
    assert!(outcome.is_err(), "answered over plain HTTP: {outcome:?}");

    // The server still serves TLS.
    let client = https_client(&pki, Offer::Both);
    let url = consent_url("127.0.0.1", proxy.listen_addr.port(), "+15551234567");
    let get = send(&client, Method::GET, &url, &[("x-api-key", RW_KEY)], "").await;
    assert_eq!(get.status, StatusCode::NOT_FOUND, "{:?}", get.body);
    assert_eq!(get.version, Version::HTTP_2);
    proxy.shutdown().await;
}

/// Reads until the peer closes (EOF or reset), at most `limit`.
async fn wait_closed<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // Whatever the server sends first (h2: its SETTINGS); keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_client_that_never_handshakes_is_dropped_after_header_read_timeout() {
    let pki = TestPki::new();
    let timeout = Duration::from_millis(600);
    let (_sim, proxy) = tls_proxy(&pki, |c| {
        c.set("server.header_read_timeout_ms", "600");
    })
    .await;
    // Several silent connections at once.
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(proxy.listen_addr).await.unwrap());
    }
    // Meanwhile others are served at once.
    let client = https_client(&pki, Offer::Both);
    let url = consent_url("127.0.0.1", proxy.listen_addr.port(), "+15551234567");
    for _ in 0..3 {
        let get = send(&client, Method::GET, &url, &[("x-api-key", RW_KEY)], "").await;
        assert_eq!(get.status, StatusCode::NOT_FOUND);
    }
    assert!(
        opened.elapsed() < timeout,
        "silent clients held up others: {:?}",
        opened.elapsed()
    );
    for stream in &mut silent {
        assert!(
            wait_closed(stream, Duration::from_secs(5)).await,
            "a silent connection is still open after 5 s"
        );
        assert!(
            opened.elapsed() >= timeout - Duration::from_millis(100),
            "closed before the timeout: {:?}",
            opened.elapsed()
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_silent_after_the_handshake_is_dropped_too() {
    let pki = TestPki::new();
    let (_sim, proxy) = tls_proxy(&pki, |c| {
        c.set("server.header_read_timeout_ms", "600");
    })
    .await;
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let mut config = pki.client_config();
        config.alpn_protocols = vec![alpn.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(proxy.listen_addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("handshake");
        let started = Instant::now();
        assert!(
            wait_closed(&mut tls, Duration::from_secs(5)).await,
            "{}: a TLS connection silent after the handshake is still open after 5 s",
            String::from_utf8_lossy(alpn)
        );
        assert!(started.elapsed() >= Duration::from_millis(500));
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn unusable_certificate_or_key_files_fail_the_start_naming_the_key() {
    let pki = TestPki::new();
    let sim = start_simulator().await;
    let settings_with = |cert: &Path, key: &Path| {
        let mut config = ProxyConfig::for_simulator(&sim);
        config
            .set_str("server.tls_cert_file", cert.to_str().unwrap())
            .set_str("server.tls_key_file", key.to_str().unwrap());
        config
    };
    let start_error = |config: &ProxyConfig| {
        let settings = config.settings();
        async move {
            match App::start(settings).await {
                Ok(handle) => {
                    handle.shutdown().await;
                    panic!("started with unusable TLS files");
                }
                Err(error) => ErrorChain(&error).to_string(),
            }
        }
    };

    // Missing files are caught when the configuration loads.
    let missing = pki.dir.join("missing.pem");
    for (cert, key, named) in [
        (
            missing.as_path(),
            pki.key_file.as_path(),
            "server.tls_cert_file",
        ),
        (
            pki.cert_file.as_path(),
            missing.as_path(),
            "server.tls_key_file",
        ),
    ] {
        let toml = settings_with(cert, key).to_toml();
        let errors = match consent_proxy::config::Settings::from_toml_str(&toml) {
            Ok(_) => panic!("a missing file is a configuration error"),
            Err(errors) => errors.to_string(),
        };
        assert!(errors.contains(named), "{named} not named in: {errors}");
    }

    // Files that exist but hold no usable certificate or key fail `App::start`.
    let garbage = pki.file("garbage.pem", "not a PEM file\n");
    let wrong_key = pki.file("wrong.key", &pki.other_key_pem);
    let cert_as_key = pki.file("cert-as-key.pem", &pki.cert_pem);
    for (cert, key, named) in [
        (
            garbage.as_path(),
            pki.key_file.as_path(),
            "server.tls_cert_file",
        ),
        (
            pki.cert_file.as_path(),
            garbage.as_path(),
            "server.tls_key_file",
        ),
        (
            pki.cert_file.as_path(),
            cert_as_key.as_path(),
            "server.tls_key_file",
        ),
        (
            pki.cert_file.as_path(),
            wrong_key.as_path(),
            "server.tls_key_file",
        ),
    ] {
        let message = start_error(&settings_with(cert, key)).await;
        assert!(
            message.contains(named),
            "{} / {}: {named} not named in: {message}",
            cert.display(),
            key.display()
        );
    }

    // Files removed between loading and starting.
    for removed in ["cert", "key"] {
        let cert = pki.file(
            "copy.crt",
            &std::fs::read_to_string(&pki.cert_file).unwrap(),
        );
        let key = pki.file("copy.key", &std::fs::read_to_string(&pki.key_file).unwrap());
        let settings = settings_with(&cert, &key).settings();
        std::fs::remove_file(if removed == "cert" { &cert } else { &key }).unwrap();
        let message = match App::start(settings).await {
            Ok(handle) => {
                handle.shutdown().await;
                panic!("started without its {removed} file");
            }
            Err(error) => ErrorChain(&error).to_string(),
        };
        let named = format!("server.tls_{removed}_file");
        assert!(message.contains(&named), "{named} not named in: {message}");
    }

    // Valid files start fine.
    let proxy = App::start(settings_with(&pki.cert_file, &pki.key_file).settings())
        .await
        .expect("valid TLS files start");
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_proxy_speaks_http2_to_an_https_upstream_that_offers_it() {
    let pki = TestPki::new();
    for alpn in [&[&b"h2"[..]][..], &[&b"h2"[..], &b"http/1.1"[..]][..]] {
        let fake = FakeTalkdesk::start(&pki, alpn).await;
        let config = ProxyConfig::for_upstream(&fake.url(), &format!("{}/oauth/token", fake.url()));
        let transport = Transport::with_tls(
            Duration::from_secs(3),
            pki.client_config(),
            &Default::default(),
        );
        let proxy = App::start_with_transport(config.settings(), transport)
            .await
            .expect("proxy starts");
        let http = TestClient::new();
        let url = format!(
            "{}/voicebiometrics/contacts/%2B15551234567/consent",
            proxy.url()
        );
        let get = http
            .send(Method::GET, &url, &[("x-api-key", RW_KEY)], None)
            .await;
        assert_eq!(get.status, 200, "{}", get.text());
        assert_eq!(get.status_field(), "REFUSED");
        let put = http
            .send(
                Method::PUT,
                &url,
                &[("x-api-key", RW_KEY), ("content-type", "application/json")],
                Some(r#"{"status":"CONSENTED"}"#.to_owned()),
            )
            .await;
        assert_eq!(put.status, 200, "{}", put.text());
        assert_eq!(put.status_field(), "CONSENTED");

        let seen = fake.seen();
        let what = format!("server ALPN {alpn:?}: {seen:?}");
        assert!(seen.iter().all(|s| s.version == Version::HTTP_2), "{what}");
        assert!(
            seen.iter()
                .any(|s| s.method == Method::POST && s.path == "/oauth/token"),
            "{what}"
        );
        let consent: Vec<_> = seen
            .iter()
            .filter(|s| s.path == "/voicebiometrics/contacts/%2B15551234567/consent")
            .collect();
        assert_eq!(consent.len(), 2, "{what}");
        assert_eq!(consent[0].method, Method::GET, "{what}");
        assert_eq!(consent[1].method, Method::PUT, "{what}");
        for request in consent {
            assert_eq!(
                request.authorization.as_deref(),
                Some(format!("Bearer {FAKE_TOKEN}").as_str()),
                "{what}"
            );
        }
        proxy.shutdown().await;
    }
}
