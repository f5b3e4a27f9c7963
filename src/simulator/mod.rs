//! The built-in Talkdesk simulator: a faithful in-process stand-in for Talkdesk's OAuth 2.0
//! token endpoint (`POST /oauth/token`, client credentials) and its Voice Biometrics consent
//! API (`GET`/`PUT /voicebiometrics/contacts/{contact_id}/consent`), with counters and fault
//! switches for tests.
//!
//! It serves HTTP/1.1 and HTTP/2 (prior knowledge) on one listener through the proxy's own
//! [`serve`](crate::wire::server::serve). Tests start it in-process on port 0 with
//! [`Simulator::start`]; the `consent-proxy simulator` command runs it alone. The same switches
//! are reachable over HTTP, without authentication, under `/_sim/` (see [`Simulator`] for the
//! list).
//!
//! Timing model: every request is decided when it arrives (a GET reads the stored status, a
//! PUT stores its status, a token is issued), then the simulator waits (the configured
//! latency, plus any delay fault), then it answers with what it decided on arrival. Tests use
//! this to model a slow read racing a write.
//!
//! This file holds the handle, the public types and the timing model; beside it:
//! - `state`: what the simulator remembers (contacts, tokens, queued faults, counters);
//! - `token`: the token endpoint;
//! - `assertion`: `private_key_jwt` client assertions checked as Talkdesk checks them;
//! - `consent_api`: the consent API;
//! - `faults`: what a faulted answer is;
//! - `control`: the `/_sim/` control surface.
//!
//! The product never uses this module; it uses the product's listener, body helpers,
//! credential parsing, JWS verification, clock and consent domain, and nothing else
//! (`src/layering.rs` checks both).

mod answers;
mod assertion;
mod consent_api;
mod control;
mod faults;
mod state;
#[cfg(test)]
mod testing;
mod token;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::consent::{consent_path_segment, ConsentStatus, READ_SCOPE, WRITE_SCOPE};
use crate::wire::body::{self, Body, ReadBodyError};
use crate::wire::server::{self, ListenerLimits};
use state::{lock, normalise, Simulation};

/// The token endpoint's path.
pub use crate::wire::oauth::TOKEN_PATH;
/// How long [`Simulator::shutdown`] lets in-flight requests finish before cutting them off.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Limits loose enough that no test trips on them (Talkdesk's own are not known).
const LISTENER_LIMITS: ListenerLimits = ListenerLimits {
    max_header_bytes: 64 * 1024,
    header_read_timeout: Duration::from_secs(3600),
    idle_timeout: Duration::from_secs(3600),
    answer_timeout: Duration::from_secs(3600),
    max_connections: 65_536,
};

/// The simulator's start-up settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulatorConfig {
    /// The one OAuth client the token endpoint accepts.
    pub client_id: String,
    pub client_secret: String,
    /// The scopes that client may be granted.
    pub allowed_scopes: Vec<String>,
    /// Lifetime of issued tokens (`expires_in`). Changeable later with `set_token_ttl`.
    pub token_ttl: Duration,
    /// Fixed delay before every consent-API answer. Changeable later with `set_latency`.
    pub latency: Duration,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            client_id: "sim-client".to_owned(),
            client_secret: "sim-secret".to_owned(),
            allowed_scopes: vec![READ_SCOPE.to_owned(), WRITE_SCOPE.to_owned()],
            token_ttl: Duration::from_secs(600),
            latency: Duration::ZERO,
        }
    }
}

/// A route fault switches apply to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimRoute {
    /// `POST /oauth/token`.
    Token,
    /// `GET /voicebiometrics/contacts/{id}/consent`.
    Get,
    /// `PUT /voicebiometrics/contacts/{id}/consent`.
    Put,
}

impl SimRoute {
    pub const ALL: [SimRoute; 3] = [SimRoute::Token, SimRoute::Get, SimRoute::Put];

    /// `token`, `get` or `put`.
    pub fn as_str(self) -> &'static str {
        match self {
            SimRoute::Token => "token",
            SimRoute::Get => "get",
            SimRoute::Put => "put",
        }
    }

    /// Parses `token`, `get` or `put` (case-insensitive).
    pub fn parse(s: &str) -> Option<SimRoute> {
        Self::ALL
            .into_iter()
            .find(|route| route.as_str().eq_ignore_ascii_case(s))
    }

    fn index(self) -> usize {
        match self {
            SimRoute::Token => 0,
            SimRoute::Get => 1,
            SimRoute::Put => 2,
        }
    }
}

impl fmt::Display for SimRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a faulted answer is instead of the normal one.
///
/// On the consent routes error bodies use Talkdesk's shape (`{"code","message"}`); on the
/// token route they use OAuth's (`{"error","error_description"}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 with an error body.
    Status500,
    /// 429 with `Retry-After: <retry_after_s>`.
    TooManyRequests { retry_after_s: u64 },
    /// 401 (`unauthorized` on the consent routes, `invalid_client` on the token route).
    Unauthorized,
    /// Wait this long (on top of the latency), then answer normally.
    Delay(Duration),
    /// Close the connection without answering (HTTP/2: reset the stream).
    CloseConnection,
    /// Answer exactly this. An invalid status is answered as 500; invalid headers are skipped.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
}

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Every `POST /oauth/token` (faulted ones included).
    pub token_requests: u64,
    /// Tokens actually issued (200 answers).
    pub tokens_issued: u64,
    /// Every GET on the consent path (faulted, rejected and invalid-id ones included).
    pub gets: u64,
    /// Every PUT on the consent path, likewise.
    pub puts: u64,
    /// 401 answers of the consent API (faulted ones included; not the token endpoint's).
    pub unauthorized: u64,
    /// Consent requests that presented a known but expired token.
    pub expired_token_uses: u64,
}

/// The last consent request as received, for asserting what the proxy forwarded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordedRequest {
    pub method: String,
    /// The request target exactly as received (not decoded), query included.
    pub path_and_query: String,
    /// All headers in arrival order, names lower-case, values lossily UTF-8.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The first value of a header (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the header is present at all (name case-insensitive).
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
}

/// Everything `GET /_sim/stats` answers: the counters plus per-contact counts and settings.
#[derive(Clone, Debug, Serialize)]
pub struct SimReport {
    #[serde(flatten)]
    pub stats: SimStats,
    /// GETs per normalised contact id.
    pub gets_per_contact: BTreeMap<String, u64>,
    /// PUTs per normalised contact id.
    pub puts_per_contact: BTreeMap<String, u64>,
    /// Faulted answers still queued, per route (`token`, `get`, `put`).
    pub pending_faults: BTreeMap<String, u64>,
    /// Number of contacts with a stored status.
    pub contacts: usize,
    pub latency_ms: u64,
    pub token_ttl_ms: u64,
    pub last_consent_request: Option<RecordedRequest>,
}

/// A running simulator. A cheap handle: clones share the same server and state. When the last
/// handle is dropped the server stops as by [`Simulator::shutdown`], in the background.
///
/// The HTTP control surface (no authentication; bad input → 400 JSON):
/// - `GET /_sim/stats`: [`SimReport`] as JSON.
/// - `POST /_sim/faults` `{"route":"token|get|put","fault":"500|429|401|delay|close|respond",
///   "count":N (default 1),"delay_ms":..,"retry_after_s":.. (default 1),"status":..,
///   "headers":{..} or [[name,value],..],"body":"..","body_len":N}` (`body_len` generates that
///   many `x` bytes when `body` is absent); `DELETE /_sim/faults` clears faults.
/// - `POST /_sim/delay-get` `{"contact":..,"delay_ms":..,"count":N (default 1)}`.
/// - `POST /_sim/latency` `{"latency_ms":..}`; `POST /_sim/token-ttl` `{"token_ttl_s":..}` or
///   `{"token_ttl_ms":..}`.
/// - `POST /_sim/unknown-contact` `{"answer":"not_found"|"no_consent"}`.
/// - `POST /_sim/reset`: counters, faults and GET delays (stored statuses and tokens stay).
/// - `PUT /_sim/contacts/{id}` with a consent body seeds a status; `GET` reads it (404 when
///   none); `DELETE` forgets it.
#[derive(Clone)]
pub struct Simulator {
    sim: Arc<Simulation>,
    server: Arc<ServerControl>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.server.addr)
            .finish_non_exhaustive()
    }
}

struct ServerControl {
    addr: SocketAddr,
    /// Sends the grace period of a shutdown; dropping it (with the last handle) stops the
    /// server with the default grace.
    stop: Mutex<Option<oneshot::Sender<Duration>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Simulator {
    /// Binds `listen` (port 0 picks a free port) and starts serving in the background.
    pub async fn start(listen: SocketAddr, config: SimulatorConfig) -> io::Result<Simulator> {
        // The proxy's default accept queue, so load tests' bursts of connections are taken.
        let listener = server::bind(listen, 1024)?;
        let addr = listener.local_addr()?;
        let sim = Arc::new(Simulation::new(config));
        let (stop, stopped) = oneshot::channel();
        let handler = {
            let sim = Arc::clone(&sim);
            move |request, _peer| handle(Arc::clone(&sim), request)
        };
        let shutdown = async { stopped.await.unwrap_or(DEFAULT_SHUTDOWN_GRACE) };
        let task = tokio::spawn(server::serve(
            listener,
            None,
            LISTENER_LIMITS,
            handler,
            shutdown,
        ));
        tracing::debug!(%addr, "talkdesk simulator listening");
        Ok(Simulator {
            sim,
            server: Arc::new(ServerControl {
                addr,
                stop: Mutex::new(Some(stop)),
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `http://HOST:PORT`, the consent API's base (an unspecified bind address is given as
    /// loopback).
    pub fn base_url(&self) -> String {
        let addr = self.server.addr;
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, addr.port()))
    }

    /// `base_url() + "/oauth/token"`.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.base_url())
    }

    /// Queues `count` answers of `route` that will be `fault`, after those already queued.
    pub fn inject(&self, route: SimRoute, fault: Fault, count: u32) {
        self.sim.inject(route, fault, count);
    }

    /// The next `count` GETs of `contact` (raw or percent-encoded) that read the store read it
    /// on arrival, then wait `delay` (on top of latency and any delay fault) before answering.
    /// Requests rejected before reading (401/403/faulted) do not consume it.
    pub fn delay_next_get(&self, contact: &str, delay: Duration, count: u32) {
        self.sim.delay_next_get(contact, delay, count);
    }

    /// Drops every queued fault and GET delay.
    pub fn clear_faults(&self) {
        self.sim.clear_faults();
    }

    /// Sets the fixed delay before every consent-API answer.
    /// Accepts `private_key_jwt` assertions of the client signed with `key`, named `key_id`.
    pub fn trust_client_key(&self, key_id: &str, key: crate::jws::VerifyingKey) {
        self.sim.client_keys.trust(key_id, key);
    }

    pub fn set_latency(&self, d: Duration) {
        self.sim.set_latency(d);
    }

    /// Sets the lifetime of tokens issued from now on. `Duration::ZERO` issues tokens that are
    /// already expired (handy to test expiry without sleeping).
    pub fn set_token_ttl(&self, d: Duration) {
        self.sim.set_token_ttl(d);
    }

    /// How a GET of an unknown contact is answered: `false` (the default) → 404
    /// `{"code":"not_found"}`, `true` → 200 `{"status":"NO_CONSENT"}` (Talkdesk's behaviour is
    /// unconfirmed; the proxy must cope with both).
    pub fn set_unknown_as_no_consent(&self, on: bool) {
        self.sim.set_unknown_as_no_consent(on);
    }

    /// Seeds a contact's status (the contact then exists: its next PUT answers 200).
    pub fn set_status(&self, contact: &str, status: ConsentStatus) {
        self.sim.state().contacts.insert(normalise(contact), status);
    }

    /// Forgets a contact (its next GET is unknown, its next PUT answers 201).
    pub fn remove_contact(&self, contact: &str) -> Option<ConsentStatus> {
        self.sim.state().contacts.remove(&normalise(contact))
    }

    /// The status stored for a contact (raw or percent-encoded id).
    pub fn stored_status(&self, contact: &str) -> Option<ConsentStatus> {
        self.sim.state().contacts.get(&normalise(contact)).copied()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.sim.counters.snapshot()
    }

    /// The counters plus per-contact counts, pending faults and settings.
    pub fn report(&self) -> SimReport {
        self.sim.report()
    }

    /// GETs of one contact (given raw or percent-encoded).
    pub fn gets_for(&self, contact: &str) -> u64 {
        let gets = &self.sim.state().gets_per_contact;
        gets.get(&normalise(contact)).copied().unwrap_or(0)
    }

    /// PUTs of one contact (given raw or percent-encoded).
    pub fn puts_for(&self, contact: &str) -> u64 {
        let puts = &self.sim.state().puts_per_contact;
        puts.get(&normalise(contact)).copied().unwrap_or(0)
    }

    /// The last request received on the consent path (any method).
    pub fn last_consent_request(&self) -> Option<RecordedRequest> {
        self.sim.state().last_consent_request.clone()
    }

    /// Zeroes every counter (per-contact ones too) and forgets the last consent request.
    pub fn reset_counters(&self) {
        self.sim.reset_counters();
    }

    /// Stops accepting, closes idle connections, lets in-flight requests finish for up to
    /// [`DEFAULT_SHUTDOWN_GRACE`], then cuts the rest off. Other handles keep working for
    /// state and counters.
    pub async fn shutdown(self) {
        self.shutdown_with_grace(DEFAULT_SHUTDOWN_GRACE).await;
    }

    /// [`Simulator::shutdown`] with a chosen grace period for in-flight requests.
    pub async fn shutdown_with_grace(self, grace: Duration) {
        if let Some(stop) = lock(&self.server.stop).take() {
            // The server is gone already when nothing receives it.
            let _ = stop.send(grace);
        }
        let task = lock(&self.server.task).take();
        if let Some(task) = task {
            if let Err(err) = task.await {
                tracing::warn!(%err, "talkdesk simulator server task failed");
            }
        }
    }
}

/// Why the simulator drops a connection unanswered: hyper does so when a handler fails.
#[derive(Debug)]
struct CloseConnection;

impl fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection closed by a simulator fault")
    }
}

impl std::error::Error for CloseConnection {}

async fn handle(
    sim: Arc<Simulation>,
    request: Request<Incoming>,
) -> Result<Response<Body>, CloseConnection> {
    let path = request.uri().path();
    if path == TOKEN_PATH {
        return token::token_endpoint(&sim, request).await;
    }
    if let Some(segment) = consent_path_segment(path) {
        let segment = segment.to_owned();
        return consent_api::consent_endpoint(&sim, request, segment).await;
    }
    if path.starts_with(control::CONTROL_PREFIX) {
        return Ok(control::control_endpoint(&sim, request).await);
    }
    Ok(answers::talkdesk_error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such resource",
    ))
}

/// What was decided on arrival, delivered after a wait.
enum Outcome {
    Answer(Response<Body>),
    Close,
}

async fn deliver(outcome: Outcome, wait: Duration) -> Result<Response<Body>, CloseConnection> {
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    match outcome {
        Outcome::Answer(response) => Ok(response),
        Outcome::Close => Err(CloseConnection),
    }
}

/// Reads a whole body up to `limit` bytes. `Ok(None)` when it is larger; `Err` when the peer
/// went away mid-body.
async fn read_body(body: Incoming, limit: usize) -> Result<Option<Bytes>, CloseConnection> {
    match body::read_body_limited(body, limit).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(ReadBodyError::TooLarge) => Ok(None),
        Err(ReadBodyError::Failed(_)) => Err(CloseConnection),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http::{Method, Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::testing::*;
    use super::*;

    #[tokio::test]
    async fn other_methods_and_paths() {
        let sim = start().await;
        let delete = send(sim.addr(), Method::DELETE, &consent_path(CONTACT), &[], "")
            .await
            .unwrap();
        assert_eq!(delete.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(delete.header("allow"), Some("GET, PUT"));
        for path in [
            "/voicebiometrics/contacts/+1555/consent/",
            "/voicebiometrics/contacts//consent",
            "/voicebiometrics/contacts/a/b/consent",
            "/nothing",
        ] {
            let answer = send(sim.addr(), Method::GET, path, &[], "").await.unwrap();
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(answer.json()["code"], "not_found");
        }
        let get_token = send(sim.addr(), Method::GET, TOKEN_PATH, &[], "")
            .await
            .unwrap();
        assert_eq!(get_token.status, StatusCode::METHOD_NOT_ALLOWED);
        let stats = sim.stats();
        assert_eq!((stats.gets, stats.token_requests), (0, 0));
    }

    #[tokio::test]
    async fn serves_http2_with_prior_knowledge() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.set_status(CONTACT, ConsentStatus::Refused);
        let stream = tokio::net::TcpStream::connect(sim.addr()).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::builder()
            .uri(format!(
                "{}{}",
                sim.base_url(),
                consent_path(CONTACT_ENCODED)
            ))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, Bytes::from_static(br#"{"status":"REFUSED"}"#));
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_cuts_slow_requests() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let addr = sim.addr();
        sim.inject(SimRoute::Get, Fault::Delay(Duration::from_secs(30)), 1);
        let slow = {
            let sim = sim.clone();
            let token = token.clone();
            tokio::spawn(async move { get(&sim, CONTACT, &token).await })
        };
        while sim.stats().gets == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let observer = sim.clone();
        let started = Instant::now();
        sim.shutdown_with_grace(Duration::from_millis(100)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(slow.await.unwrap().is_err(), "in-flight request cut off");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        assert_eq!(observer.stats().gets, 1, "state outlives the server");
    }
}
