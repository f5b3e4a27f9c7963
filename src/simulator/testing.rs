//! Helpers for the simulator's own tests: start one, and talk to it over a real socket.

use std::net::SocketAddr;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::{Simulator, SimulatorConfig, TOKEN_PATH};

pub(super) type TestResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub(super) const CONTACT: &str = "+15551234567";
pub(super) const CONTACT_ENCODED: &str = "%2B15551234567";

pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Answer {
    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub(super) async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> TestResult<Answer> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(Bytes::from(body.to_owned())))?;
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

pub(super) async fn start() -> Simulator {
    start_with(SimulatorConfig::default()).await
}

pub(super) async fn start_with(config: SimulatorConfig) -> Simulator {
    Simulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .expect("simulator starts")
}

pub(super) fn basic(id: &str, secret: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    format!("Basic {encoded}")
}

pub(super) const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

pub(super) async fn token_request(sim: &Simulator, auth: Option<&str>, body: &str) -> Answer {
    let mut headers = vec![FORM];
    if let Some(auth) = auth {
        headers.push(("authorization", auth));
    }
    send(sim.addr(), Method::POST, TOKEN_PATH, &headers, body)
        .await
        .expect("token request")
}

/// A token with the given scopes (space-separated; `None`: all allowed).
pub(super) async fn token(sim: &Simulator, scope: Option<&str>) -> String {
    let body = match scope {
        Some(scope) => format!(
            "grant_type=client_credentials&scope={}",
            scope.replace(' ', "+")
        ),
        None => "grant_type=client_credentials".to_owned(),
    };
    let answer = token_request(sim, Some(&basic("sim-client", "sim-secret")), &body).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    answer.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_owned()
}

pub(super) fn consent_path(contact: &str) -> String {
    format!("/voicebiometrics/contacts/{contact}/consent")
}

pub(super) async fn get(sim: &Simulator, contact: &str, token: &str) -> TestResult<Answer> {
    let auth = format!("Bearer {token}");
    send(
        sim.addr(),
        Method::GET,
        &consent_path(contact),
        &[("authorization", &auth)],
        "",
    )
    .await
}

pub(super) async fn put(
    sim: &Simulator,
    contact: &str,
    token: &str,
    body: &str,
) -> TestResult<Answer> {
    let auth = format!("Bearer {token}");
    send(
        sim.addr(),
        Method::PUT,
        &consent_path(contact),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}
