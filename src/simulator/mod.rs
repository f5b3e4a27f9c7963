//! The built-in Talkdesk simulator: a faithful in-process stand-in for Talkdesk's OAuth 2.0
//! token endpoint (`POST /oauth/token`, client credentials) and its Voice Biometrics consent
//! API (`GET`/`PUT /voicebiometrics/contacts/{contact_id}/consent`), with counters and fault
//! switches for tests.
//!
//! It serves HTTP/1.1 and HTTP/2 (prior knowledge) on one listener, one tokio task per
//! connection. Tests start it in-process on port 0 with [`Simulator::start`]; the
//! `consent-proxy simulator` command runs it alone. The same switches are reachable over HTTP,
//! without authentication, under `/_sim/` (see [`Simulator`] for the list).
//!
//! Timing model: every request is decided when it arrives (a GET reads the stored status, a
//! PUT stores its status, a token is issued), then the simulator waits (the configured
//! latency, plus any delay fault), then it answers with what it decided on arrival. Tests use
//! this to model a slow read racing a write.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::consent::{parse_consent_body, ConsentStatus, ContactId};

/// The token endpoint's path.
pub const TOKEN_PATH: &str = "/oauth/token";
/// The scope a GET needs.
pub const READ_SCOPE: &str = "voicebiometrics-consent:read";
/// The scope a PUT needs.
pub const WRITE_SCOPE: &str = "voicebiometrics-consent:write";
/// How long [`Simulator::shutdown`] lets in-flight requests finish before cutting them off.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

const CONSENT_PREFIX: &str = "/voicebiometrics/contacts/";
const CONSENT_SUFFIX: &str = "/consent";
const CONTROL_PREFIX: &str = "/_sim/";
const MAX_CONSENT_BODY: usize = 64 * 1024;
const MAX_TOKEN_BODY: usize = 64 * 1024;
const MAX_CONTROL_BODY: usize = 1024 * 1024;
/// Largest body `/_sim/faults` will generate from `body_len` (for "huge upstream body" tests).
const MAX_GENERATED_BODY: usize = 64 * 1024 * 1024;
const TOKEN_LEN: usize = 43;
/// Expired tokens are remembered this long (to count `expired_token_uses`) once the token
/// table grows past `TOKEN_PRUNE_THRESHOLD`.
const TOKEN_RETENTION_AFTER_EXPIRY: Duration = Duration::from_secs(600);
const TOKEN_PRUNE_THRESHOLD: usize = 4096;
const TOKEN_REALM: &str = "Basic realm=\"talkdesk-simulator\"";

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
    shared: Arc<Shared>,
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
    /// `Some(grace)` once a shutdown is asked for; dropping the sender also stops the server.
    stop: watch::Sender<Option<Duration>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Simulator {
    /// Binds `listen` (port 0 picks a free port) and starts serving in the background.
    pub async fn start(listen: SocketAddr, config: SimulatorConfig) -> io::Result<Simulator> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let (stop, stop_rx) = watch::channel(None);
        let task = tokio::spawn(serve(listener, Arc::clone(&shared), stop_rx));
        tracing::debug!(%addr, "talkdesk simulator listening");
        Ok(Simulator {
            shared,
            server: Arc::new(ServerControl {
                addr,
                stop,
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
        self.shared.inject(route, fault, count);
    }

    /// The next `count` GETs of `contact` (raw or percent-encoded) that read the store read it
    /// on arrival, then wait `delay` (on top of latency and any delay fault) before answering.
    /// Requests rejected before reading (401/403/faulted) do not consume it.
    pub fn delay_next_get(&self, contact: &str, delay: Duration, count: u32) {
        self.shared.delay_next_get(contact, delay, count);
    }

    /// Drops every queued fault and GET delay.
    pub fn clear_faults(&self) {
        self.shared.clear_faults();
    }

    /// Sets the fixed delay before every consent-API answer.
    pub fn set_latency(&self, d: Duration) {
        self.shared.latency.store(nanos(d), Ordering::Relaxed);
    }

    /// Sets the lifetime of tokens issued from now on. `Duration::ZERO` issues tokens that are
    /// already expired (handy to test expiry without sleeping).
    pub fn set_token_ttl(&self, d: Duration) {
        self.shared.token_ttl.store(nanos(d), Ordering::Relaxed);
    }

    /// How a GET of an unknown contact is answered: `false` (the default) → 404
    /// `{"code":"not_found"}`, `true` → 200 `{"status":"NO_CONSENT"}` (Talkdesk's behaviour is
    /// unconfirmed; the proxy must cope with both).
    pub fn set_unknown_as_no_consent(&self, on: bool) {
        self.shared
            .unknown_as_no_consent
            .store(on, Ordering::Relaxed);
    }

    /// Seeds a contact's status (the contact then exists: its next PUT answers 200).
    pub fn set_status(&self, contact: &str, status: ConsentStatus) {
        self.shared
            .state()
            .contacts
            .insert(normalise(contact), status);
    }

    /// Forgets a contact (its next GET is unknown, its next PUT answers 201).
    pub fn remove_contact(&self, contact: &str) -> Option<ConsentStatus> {
        self.shared.state().contacts.remove(&normalise(contact))
    }

    /// The status stored for a contact (raw or percent-encoded id).
    pub fn stored_status(&self, contact: &str) -> Option<ConsentStatus> {
        self.shared
            .state()
            .contacts
            .get(&normalise(contact))
            .copied()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.shared.counters.snapshot()
    }

    /// The counters plus per-contact counts, pending faults and settings.
    pub fn report(&self) -> SimReport {
        self.shared.report()
    }

    /// GETs of one contact (given raw or percent-encoded).
    pub fn gets_for(&self, contact: &str) -> u64 {
        let key = normalise(contact);
        self.shared
            .state()
            .gets_per_contact
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// PUTs of one contact (given raw or percent-encoded).
    pub fn puts_for(&self, contact: &str) -> u64 {
        let key = normalise(contact);
        self.shared
            .state()
            .puts_per_contact
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// The last request received on the consent path (any method).
    pub fn last_consent_request(&self) -> Option<RecordedRequest> {
        self.shared.state().last_consent_request.clone()
    }

    /// Zeroes every counter (per-contact ones too) and forgets the last consent request.
    pub fn reset_counters(&self) {
        self.shared.reset_counters();
    }

    /// Stops accepting, closes idle connections, lets in-flight requests finish for up to
    /// [`DEFAULT_SHUTDOWN_GRACE`], then cuts the rest off. Other handles keep working for
    /// state and counters.
    pub async fn shutdown(self) {
        self.shutdown_with_grace(DEFAULT_SHUTDOWN_GRACE).await;
    }

    /// [`Simulator::shutdown`] with a chosen grace period for in-flight requests.
    pub async fn shutdown_with_grace(self, grace: Duration) {
        self.server.stop.send_replace(Some(grace));
        let task = lock(&self.server.task).take();
        if let Some(task) = task {
            if let Err(err) = task.await {
                tracing::warn!(%err, "talkdesk simulator server task failed");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state

struct Shared {
    client_id: String,
    client_secret: String,
    allowed_scopes: Vec<String>,
    token_ttl: AtomicU64,
    latency: AtomicU64,
    unknown_as_no_consent: AtomicBool,
    counters: Counters,
    state: Mutex<State>,
}

#[derive(Default)]
struct Counters {
    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
    gets: AtomicU64,
    puts: AtomicU64,
    unauthorized: AtomicU64,
    expired_token_uses: AtomicU64,
}

impl Counters {
    fn all(&self) -> [&AtomicU64; 6] {
        [
            &self.token_requests,
            &self.tokens_issued,
            &self.gets,
            &self.puts,
            &self.unauthorized,
            &self.expired_token_uses,
        ]
    }

    fn snapshot(&self) -> SimStats {
        let [token_requests, tokens_issued, gets, puts, unauthorized, expired_token_uses] =
            self.all().map(|c| c.load(Ordering::Relaxed));
        SimStats {
            token_requests,
            tokens_issued,
            gets,
            puts,
            unauthorized,
            expired_token_uses,
        }
    }
}

#[derive(Default)]
struct State {
    contacts: HashMap<String, ConsentStatus>,
    tokens: HashMap<String, IssuedToken>,
    /// Per route (by `SimRoute::index`): faults with how many answers each still covers.
    faults: [VecDeque<(Fault, u32)>; 3],
    get_delays: HashMap<String, VecDeque<(Duration, u32)>>,
    gets_per_contact: HashMap<String, u64>,
    puts_per_contact: HashMap<String, u64>,
    last_consent_request: Option<RecordedRequest>,
}

struct IssuedToken {
    expires_at: Instant,
    scopes: Vec<String>,
}

/// Takes one answer off the front of a counted queue.
fn take_counted<T: Clone>(queue: &mut VecDeque<(T, u32)>) -> Option<T> {
    let (item, remaining) = queue.front_mut()?;
    let item = item.clone();
    *remaining = remaining.saturating_sub(1);
    if *remaining == 0 {
        queue.pop_front();
    }
    Some(item)
}

impl Shared {
    fn new(config: SimulatorConfig) -> Shared {
        Shared {
            client_id: config.client_id,
            client_secret: config.client_secret,
            allowed_scopes: config.allowed_scopes,
            token_ttl: AtomicU64::new(nanos(config.token_ttl)),
            latency: AtomicU64::new(nanos(config.latency)),
            unknown_as_no_consent: AtomicBool::new(false),
            counters: Counters::default(),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency.load(Ordering::Relaxed))
    }

    fn token_ttl(&self) -> Duration {
        Duration::from_nanos(self.token_ttl.load(Ordering::Relaxed))
    }

    fn inject(&self, route: SimRoute, fault: Fault, count: u32) {
        if count > 0 {
            self.state().faults[route.index()].push_back((fault, count));
        }
    }

    fn take_fault(&self, route: SimRoute) -> Option<Fault> {
        take_counted(&mut self.state().faults[route.index()])
    }

    fn delay_next_get(&self, contact: &str, delay: Duration, count: u32) {
        if count > 0 {
            self.state()
                .get_delays
                .entry(normalise(contact))
                .or_default()
                .push_back((delay, count));
        }
    }

    fn clear_faults(&self) {
        let mut state = self.state();
        state.faults.iter_mut().for_each(VecDeque::clear);
        state.get_delays.clear();
    }

    fn reset_counters(&self) {
        for counter in self.counters.all() {
            counter.store(0, Ordering::Relaxed);
        }
        let mut state = self.state();
        state.gets_per_contact.clear();
        state.puts_per_contact.clear();
        state.last_consent_request = None;
    }

    fn report(&self) -> SimReport {
        let stats = self.counters.snapshot();
        let state = self.state();
        let sorted = |map: &HashMap<String, u64>| -> BTreeMap<String, u64> {
            map.iter().map(|(k, v)| (k.clone(), *v)).collect()
        };
        SimReport {
            stats,
            gets_per_contact: sorted(&state.gets_per_contact),
            puts_per_contact: sorted(&state.puts_per_contact),
            pending_faults: SimRoute::ALL
                .into_iter()
                .map(|route| {
                    let pending = state.faults[route.index()]
                        .iter()
                        .map(|(_, n)| u64::from(*n))
                        .sum();
                    (route.as_str().to_owned(), pending)
                })
                .collect(),
            contacts: state.contacts.len(),
            latency_ms: millis(self.latency()),
            token_ttl_ms: millis(self.token_ttl()),
            last_consent_request: state.last_consent_request.clone(),
        }
    }

    /// Issues a token valid for `token_ttl` from now.
    fn issue_token(&self, scopes: Vec<String>) -> (String, Duration) {
        let ttl = self.token_ttl();
        let token: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(TOKEN_LEN)
            .map(char::from)
            .collect();
        let now = Instant::now();
        let expires_at = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(1 << 40));
        let mut state = self.state();
        if state.tokens.len() >= TOKEN_PRUNE_THRESHOLD {
            state.tokens.retain(|_, t| {
                match t.expires_at.checked_add(TOKEN_RETENTION_AFTER_EXPIRY) {
                    Some(keep_until) => keep_until > now,
                    None => true,
                }
            });
        }
        state
            .tokens
            .insert(token.clone(), IssuedToken { expires_at, scopes });
        self.counters.tokens_issued.fetch_add(1, Ordering::Relaxed);
        (token, ttl)
    }

    /// Checks the bearer token of a consent request: `Some` is the 401/403 answer.
    fn bearer_rejection(&self, headers: &HeaderMap, scope: &str) -> Option<SimResponse> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty());
        let Some(token) = token else {
            return Some(self.unauthorized("a bearer token is required", None));
        };
        let now = Instant::now();
        let verdict = {
            let state = self.state();
            state.tokens.get(token).map(|issued| {
                (
                    issued.expires_at <= now,
                    issued.scopes.iter().any(|s| s == scope),
                )
            })
        };
        match verdict {
            None => Some(self.unauthorized("the access token is not valid", Some("invalid_token"))),
            Some((true, _)) => {
                self.counters
                    .expired_token_uses
                    .fetch_add(1, Ordering::Relaxed);
                Some(self.unauthorized("the access token has expired", Some("invalid_token")))
            }
            Some((false, false)) => Some(talkdesk_error(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!("the access token lacks the scope '{scope}'"),
            )),
            Some((false, true)) => None,
        }
    }

    /// A consent-API 401, counted.
    fn unauthorized(&self, message: &str, error: Option<&str>) -> Response<Full<Bytes>> {
        self.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
        let mut response = talkdesk_error(StatusCode::UNAUTHORIZED, "unauthorized", message);
        let challenge = match error {
            Some(error) => format!("Bearer error=\"{error}\""),
            None => "Bearer".to_owned(),
        };
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The key a contact is stored and counted under: the normalised id, or the raw string when
/// it is not a valid id (such a contact can never be reached over HTTP).
fn normalise(contact: &str) -> String {
    ContactId::from_path_segment(contact)
        .map(|id| id.as_str().to_owned())
        .unwrap_or_else(|| contact.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Server

/// The service's error: its only use is to make hyper drop the connection unanswered.
#[derive(Debug)]
struct CloseConnection;

impl fmt::Display for CloseConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection closed by a simulator fault")
    }
}

impl std::error::Error for CloseConnection {}

type SimResponse = Response<Full<Bytes>>;

async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let grace = loop {
        tokio::select! {
            changed = stop.changed() => {
                break match changed {
                    Ok(()) => stop.borrow().unwrap_or(DEFAULT_SHUTDOWN_GRACE),
                    Err(_) => DEFAULT_SHUTDOWN_GRACE,
                };
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Latency tests want no Nagle delay; failing to set it is harmless.
                    let _ = stream.set_nodelay(true);
                    let shared = Arc::clone(&shared);
                    let service = service_fn(move |req| handle(Arc::clone(&shared), req));
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .into_owned();
                    let connection = graceful.watch(connection);
                    connections.spawn(async move {
                        // Errors here are the peer going away or a CloseConnection fault.
                        let _ = connection.await;
                    });
                }
                Err(err) => {
                    tracing::warn!(%err, "talkdesk simulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("talkdesk simulator: grace period over, closing connections");
    }
    connections.shutdown().await;
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<SimResponse, CloseConnection> {
    let path = req.uri().path();
    if path == TOKEN_PATH {
        return token_endpoint(&shared, req).await;
    }
    if let Some(segment) = consent_segment(path) {
        let segment = segment.to_owned();
        return consent_endpoint(&shared, req, segment).await;
    }
    if path.starts_with(CONTROL_PREFIX) {
        return Ok(control_endpoint(&shared, req).await);
    }
    Ok(talkdesk_error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such resource",
    ))
}

/// The `{contact_id}` segment of an exact consent path.
fn consent_segment(path: &str) -> Option<&str> {
    let segment = path
        .strip_prefix(CONSENT_PREFIX)?
        .strip_suffix(CONSENT_SUFFIX)?;
    (!segment.is_empty() && !segment.contains('/')).then_some(segment)
}

/// What was decided on arrival, delivered after a wait.
enum Outcome {
    Answer(SimResponse),
    Close,
}

async fn deliver(outcome: Outcome, wait: Duration) -> Result<SimResponse, CloseConnection> {
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
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(Some(collected.to_bytes())),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Ok(None),
        Err(_) => Err(CloseConnection),
    }
}

// ---------------------------------------------------------------------------------------------
// Consent API

async fn consent_endpoint(
    shared: &Shared,
    req: Request<Incoming>,
    segment: String,
) -> Result<SimResponse, CloseConnection> {
    record_request(shared, &req);
    let (route, scope) = match *req.method() {
        Method::GET => (SimRoute::Get, READ_SCOPE),
        Method::PUT => (SimRoute::Put, WRITE_SCOPE),
        _ => return Ok(method_not_allowed("GET, PUT")),
    };
    let contact = ContactId::from_path_segment(&segment);
    count_consent_request(shared, route, contact.as_ref());

    let mut wait = shared.latency();
    match shared.take_fault(route) {
        None => {}
        Some(Fault::Delay(delay)) => wait = wait.saturating_add(delay),
        Some(fault) => return deliver(fault_outcome(shared, route, fault), wait).await,
    }

    let (parts, body) = req.into_parts();
    if let Some(response) = shared.bearer_rejection(&parts.headers, scope) {
        return deliver(Outcome::Answer(response), wait).await;
    }
    let Some(contact) = contact else {
        let response = talkdesk_error(
            StatusCode::BAD_REQUEST,
            "invalid_contact_id",
            "contact_id must be 1 to 64 characters of A-Z a-z 0-9 + . _ -, starting with a letter, a digit or +",
        );
        return deliver(Outcome::Answer(response), wait).await;
    };

    let response = match route {
        SimRoute::Get => {
            let (status, extra) = {
                let mut state = shared.state();
                let status = state.contacts.get(contact.as_str()).copied();
                let extra = state
                    .get_delays
                    .get_mut(contact.as_str())
                    .and_then(take_counted);
                if state
                    .get_delays
                    .get(contact.as_str())
                    .is_some_and(VecDeque::is_empty)
                {
                    state.get_delays.remove(contact.as_str());
                }
                (status, extra)
            };
            wait = wait.saturating_add(extra.unwrap_or_default());
            let unknown_as_no_consent = shared.unknown_as_no_consent.load(Ordering::Relaxed);
            match status {
                Some(status) => status_response(StatusCode::OK, status),
                None if unknown_as_no_consent => {
                    status_response(StatusCode::OK, ConsentStatus::NoConsent)
                }
                None => talkdesk_error(StatusCode::NOT_FOUND, "not_found", "contact not found"),
            }
        }
        SimRoute::Put | SimRoute::Token => {
            let Some(bytes) = read_body(body, MAX_CONSENT_BODY).await? else {
                let response = talkdesk_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the body is too large",
                );
                return deliver(Outcome::Answer(response), wait).await;
            };
            match parse_consent_body(&bytes) {
                Ok(status) => {
                    let previous = shared
                        .state()
                        .contacts
                        .insert(contact.as_str().to_owned(), status);
                    let code = if previous.is_some() {
                        StatusCode::OK
                    } else {
                        StatusCode::CREATED
                    };
                    status_response(code, status)
                }
                Err(err) => invalid_body(&err.message, err.field.as_deref()),
            }
        }
    };
    deliver(Outcome::Answer(response), wait).await
}

fn record_request(shared: &Shared, req: &Request<Incoming>) {
    let recorded = RecordedRequest {
        method: req.method().as_str().to_owned(),
        path_and_query: req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_owned())
            .unwrap_or_else(|| req.uri().path().to_owned()),
        headers: req
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    shared.state().last_consent_request = Some(recorded);
}

fn count_consent_request(shared: &Shared, route: SimRoute, contact: Option<&ContactId>) {
    let total = match route {
        SimRoute::Get => &shared.counters.gets,
        _ => &shared.counters.puts,
    };
    total.fetch_add(1, Ordering::Relaxed);
    if let Some(contact) = contact {
        let mut state = shared.state();
        let per_contact = match route {
            SimRoute::Get => &mut state.gets_per_contact,
            _ => &mut state.puts_per_contact,
        };
        *per_contact.entry(contact.as_str().to_owned()).or_insert(0) += 1;
    }
}

fn status_response(code: StatusCode, status: ConsentStatus) -> SimResponse {
    json_response(code, Bytes::from_static(status.canonical_body()))
}

fn invalid_body(message: &str, field: Option<&str>) -> SimResponse {
    let body = json!({
        "code": "invalid_body",
        "message": message,
        "fields": [{"name": field.unwrap_or("body"), "description": message}],
    });
    json_response(StatusCode::BAD_REQUEST, Bytes::from(body.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Faults

fn fault_outcome(shared: &Shared, route: SimRoute, fault: Fault) -> Outcome {
    let token = route == SimRoute::Token;
    let error = |status: StatusCode, code: &str, message: &str| {
        if token {
            oauth_error(status, code, message)
        } else {
            talkdesk_error(status, code, message)
        }
    };
    let response = match fault {
        Fault::CloseConnection => return Outcome::Close,
        // Handled by the callers (answer normally after the delay); kept total here.
        Fault::Delay(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "simulated failure",
        ),
        Fault::Status500 => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            if token {
                "server_error"
            } else {
                "internal_server_error"
            },
            "simulated failure",
        ),
        Fault::TooManyRequests { retry_after_s } => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                if token {
                    "temporarily_unavailable"
                } else {
                    "too_many_requests"
                },
                "rate limit exceeded (simulated)",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            response
        }
        Fault::Unauthorized if token => invalid_client("client authentication failed (simulated)"),
        Fault::Unauthorized => shared.unauthorized(
            "the access token is not valid (simulated)",
            Some("invalid_token"),
        ),
        Fault::Respond {
            status,
            headers,
            body,
        } => custom_response(status, &headers, body),
    };
    Outcome::Answer(response)
}

fn custom_response(status: u16, headers: &[(String, String)], body: Bytes) -> SimResponse {
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| !s.is_informational())
        .unwrap_or_else(|| {
            tracing::warn!(
                status,
                "simulator Respond fault: invalid status, answering 500"
            );
            StatusCode::INTERNAL_SERVER_ERROR
        });
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    for (name, value) in headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => {
                response.headers_mut().append(name, value);
            }
            _ => tracing::warn!(%name, "simulator Respond fault: invalid header skipped"),
        }
    }
    response
}

// ---------------------------------------------------------------------------------------------
// Token endpoint

async fn token_endpoint(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<SimResponse, CloseConnection> {
    if req.method() != Method::POST {
        return Ok(method_not_allowed("POST"));
    }
    shared
        .counters
        .token_requests
        .fetch_add(1, Ordering::Relaxed);
    let mut wait = Duration::ZERO;
    match shared.take_fault(SimRoute::Token) {
        None => {}
        Some(Fault::Delay(delay)) => wait = delay,
        Some(fault) => return deliver(fault_outcome(shared, SimRoute::Token, fault), wait).await,
    }
    let (parts, body) = req.into_parts();
    let Some(body) = read_body(body, MAX_TOKEN_BODY).await? else {
        let response = oauth_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "the body is too large",
        );
        return deliver(Outcome::Answer(response), wait).await;
    };
    let response = issue(shared, &parts.headers, &body).unwrap_or_else(TokenError::into_response);
    deliver(Outcome::Answer(response), wait).await
}

/// A token endpoint refusal: the OAuth error code (which gives the status) and description.
struct TokenError {
    error: &'static str,
    description: String,
}

impl TokenError {
    fn new(error: &'static str, description: impl Into<String>) -> TokenError {
        TokenError {
            error,
            description: description.into(),
        }
    }

    fn into_response(self) -> SimResponse {
        match self.error {
            "invalid_client" => invalid_client(&self.description),
            error => oauth_error(StatusCode::BAD_REQUEST, error, &self.description),
        }
    }
}

/// The token endpoint's decision.
fn issue(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<SimResponse, TokenError> {
    let bad_request = |message: &str| TokenError::new("invalid_request", message);
    let invalid_client = |message: &str| TokenError::new("invalid_client", message);
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(bad_request(
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    let form = parse_form(body).map_err(|message| bad_request(&message))?;
    let param = |name: &str| {
        form.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };

    // Client authentication: client_secret_basic or client_secret_post, not both.
    let basic = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => {
            Some(parse_basic(value).ok_or_else(|| invalid_client("malformed Basic credentials"))?)
        }
    };
    let (client_id, client_secret) = match basic {
        Some((id, secret)) => {
            if param("client_secret").is_some() {
                return Err(bad_request(
                    "use only one client authentication method (Basic or client_secret in the body)",
                ));
            }
            if param("client_id").is_some_and(|form_id| form_id != id) {
                return Err(invalid_client(
                    "client_id in the body differs from the Basic credentials",
                ));
            }
            (id, secret)
        }
        None => match (param("client_id"), param("client_secret")) {
            (Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
            _ => return Err(invalid_client("client authentication is required")),
        },
    };
    if client_id != shared.client_id || client_secret != shared.client_secret {
        return Err(invalid_client("client authentication failed"));
    }

    match param("grant_type") {
        None => return Err(bad_request("grant_type is required")),
        Some("client_credentials") => {}
        Some(_) => {
            return Err(TokenError::new(
                "unsupported_grant_type",
                "only client_credentials is supported",
            ))
        }
    }

    let mut granted: Vec<String> = Vec::new();
    match param("scope").filter(|s| !s.trim().is_empty()) {
        None => granted.clone_from(&shared.allowed_scopes),
        Some(requested) => {
            for scope in requested.split(' ').filter(|s| !s.is_empty()) {
                if !shared.allowed_scopes.iter().any(|allowed| allowed == scope) {
                    return Err(TokenError::new(
                        "invalid_scope",
                        format!("the client may not be granted the scope '{scope}'"),
                    ));
                }
                if !granted.iter().any(|g| g == scope) {
                    granted.push(scope.to_owned());
                }
            }
        }
    }

    let scope = granted.join(" ");
    let (access_token, ttl) = shared.issue_token(granted);
    let body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": ttl.as_secs(),
        "scope": scope,
    });
    let mut response = json_response(StatusCode::OK, Bytes::from(body.to_string()));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
        .headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// Decodes `Basic base64(urlencoded(id):urlencoded(secret))` (RFC 6749 §2.3.1).
fn parse_basic(value: &HeaderValue) -> Option<(String, String)> {
    let (scheme, encoded) = value.to_str().ok()?.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

/// Parses an `application/x-www-form-urlencoded` body; repeated parameters are an error
/// (RFC 6749 §3.2).
fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_owned())?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = form_decode(key).ok_or_else(|| "malformed form encoding".to_owned())?;
        let value = form_decode(value).ok_or_else(|| "malformed form encoding".to_owned())?;
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(format!("parameter '{key}' is repeated"));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Form-decodes one name or value: `+` is a space, `%XX` a byte. `None` when malformed.
fn form_decode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let high = char::from(hex[0]).to_digit(16)?;
                let low = char::from(hex[1]).to_digit(16)?;
                out.push(u8::try_from(high * 16 + low).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------------------------------------
// Control surface (/_sim/)

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    route: String,
    fault: String,
    #[serde(default = "one")]
    count: u32,
    delay_ms: Option<u64>,
    retry_after_s: Option<u64>,
    status: Option<u16>,
    headers: Option<HeaderSpec>,
    body: Option<String>,
    body_len: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HeaderSpec {
    Map(BTreeMap<String, String>),
    List(Vec<(String, String)>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayGetRequest {
    contact: String,
    delay_ms: u64,
    #[serde(default = "one")]
    count: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyRequest {
    latency_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenTtlRequest {
    token_ttl_s: Option<u64>,
    token_ttl_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnknownContactRequest {
    answer: String,
}

fn one() -> u32 {
    1
}

async fn control_endpoint(shared: &Shared, req: Request<Incoming>) -> SimResponse {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix(CONTROL_PREFIX) else {
        return control_error(StatusCode::NOT_FOUND, "not_found", "no such control");
    };
    let body = match read_body(req.into_body(), MAX_CONTROL_BODY).await {
        Ok(Some(body)) => body,
        Ok(None) => {
            return control_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body is too large",
            )
        }
        Err(CloseConnection) => {
            return control_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "body unreadable",
            )
        }
    };
    let result = match (rest, &method) {
        ("stats", &Method::GET) => to_json(&shared.report()),
        ("faults", &Method::POST) => control_fault(shared, &body),
        ("faults", &Method::DELETE) => {
            shared.clear_faults();
            ok_json()
        }
        ("delay-get", &Method::POST) => parse_json::<DelayGetRequest>(&body).map(|r| {
            shared.delay_next_get(&r.contact, Duration::from_millis(r.delay_ms), r.count);
            json!({"ok": true})
        }),
        ("latency", &Method::POST) => parse_json::<LatencyRequest>(&body).map(|r| {
            shared.latency.store(
                nanos(Duration::from_millis(r.latency_ms)),
                Ordering::Relaxed,
            );
            json!({"ok": true, "latency_ms": r.latency_ms})
        }),
        ("token-ttl", &Method::POST) => parse_json::<TokenTtlRequest>(&body).and_then(|r| {
            let ttl = match (r.token_ttl_s, r.token_ttl_ms) {
                (Some(s), None) => Duration::from_secs(s),
                (None, Some(ms)) => Duration::from_millis(ms),
                _ => return Err("give exactly one of token_ttl_s, token_ttl_ms".to_owned()),
            };
            shared.token_ttl.store(nanos(ttl), Ordering::Relaxed);
            Ok(json!({"ok": true, "token_ttl_ms": millis(ttl)}))
        }),
        ("unknown-contact", &Method::POST) => {
            parse_json::<UnknownContactRequest>(&body).and_then(|r| {
                let on = match r.answer.as_str() {
                    "not_found" | "404" => false,
                    "no_consent" | "NO_CONSENT" => true,
                    other => return Err(format!("unknown answer '{other}'")),
                };
                shared.unknown_as_no_consent.store(on, Ordering::Relaxed);
                ok_json()
            })
        }
        ("reset", &Method::POST) => {
            shared.reset_counters();
            shared.clear_faults();
            ok_json()
        }
        (
            "stats" | "faults" | "delay-get" | "latency" | "token-ttl" | "unknown-contact"
            | "reset",
            _,
        ) => {
            return control_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed",
            )
        }
        (other, _) => match other.strip_prefix("contacts/") {
            Some(segment) if !segment.is_empty() && !segment.contains('/') => {
                return control_contact(shared, &method, segment, &body)
            }
            _ => return control_error(StatusCode::NOT_FOUND, "not_found", "no such control"),
        },
    };
    match result {
        Ok(value) => json_response(StatusCode::OK, Bytes::from(value.to_string())),
        Err(message) => control_error(StatusCode::BAD_REQUEST, "invalid_request", &message),
    }
}

fn control_contact(shared: &Shared, method: &Method, segment: &str, body: &[u8]) -> SimResponse {
    let Some(contact) = ContactId::from_path_segment(segment) else {
        return talkdesk_error(
            StatusCode::BAD_REQUEST,
            "invalid_contact_id",
            "invalid contact_id",
        );
    };
    let key = contact.as_str().to_owned();
    match *method {
        Method::PUT => match parse_consent_body(body) {
            Ok(status) => {
                shared.state().contacts.insert(key, status);
                status_response(StatusCode::OK, status)
            }
            Err(err) => invalid_body(&err.message, err.field.as_deref()),
        },
        Method::GET => match shared.state().contacts.get(&key).copied() {
            Some(status) => status_response(StatusCode::OK, status),
            None => talkdesk_error(StatusCode::NOT_FOUND, "not_found", "contact not found"),
        },
        Method::DELETE => {
            shared.state().contacts.remove(&key);
            empty_response(StatusCode::NO_CONTENT)
        }
        _ => method_not_allowed("GET, PUT, DELETE"),
    }
}

fn control_fault(shared: &Shared, body: &[u8]) -> Result<serde_json::Value, String> {
    let request: FaultRequest = parse_json(body)?;
    let route = SimRoute::parse(&request.route)
        .ok_or_else(|| format!("route must be token, get or put, not '{}'", request.route))?;
    if request.count == 0 {
        return Err("count must be at least 1".to_owned());
    }
    let fault = match request.fault.as_str() {
        "500" => Fault::Status500,
        "429" => Fault::TooManyRequests {
            retry_after_s: request.retry_after_s.unwrap_or(1),
        },
        "401" => Fault::Unauthorized,
        "delay" => {
            Fault::Delay(Duration::from_millis(request.delay_ms.ok_or_else(
                || "delay_ms is required for a delay fault".to_owned(),
            )?))
        }
        "close" => Fault::CloseConnection,
        "respond" => {
            let status = request
                .status
                .ok_or_else(|| "status is required for a respond fault".to_owned())?;
            if !(200..=999).contains(&status) {
                return Err("status must be between 200 and 999".to_owned());
            }
            let headers = match request.headers {
                None => Vec::new(),
                Some(HeaderSpec::Map(map)) => map.into_iter().collect(),
                Some(HeaderSpec::List(list)) => list,
            };
            for (name, value) in &headers {
                if HeaderName::from_bytes(name.as_bytes()).is_err()
                    || HeaderValue::from_str(value).is_err()
                {
                    return Err(format!("invalid header '{name}'"));
                }
            }
            let body = match (request.body, request.body_len) {
                (Some(body), None) => Bytes::from(body),
                (None, Some(len)) if len <= MAX_GENERATED_BODY => Bytes::from(vec![b'x'; len]),
                (None, Some(_)) => {
                    return Err(format!("body_len must be at most {MAX_GENERATED_BODY}"))
                }
                (None, None) => Bytes::new(),
                (Some(_), Some(_)) => return Err("give body or body_len, not both".to_owned()),
            };
            Fault::Respond {
                status,
                headers,
                body,
            }
        }
        other => {
            return Err(format!(
                "fault must be one of 500, 429, 401, delay, close, respond, not '{other}'"
            ))
        }
    };
    shared.inject(route, fault, request.count);
    Ok(json!({"ok": true, "route": route.as_str(), "count": request.count}))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|err| format!("invalid JSON body: {err}"))
}

fn to_json<T: Serialize>(value: &T) -> Result<serde_json::Value, String> {
    serde_json::to_value(value).map_err(|err| err.to_string())
}

fn ok_json() -> Result<serde_json::Value, String> {
    Ok(json!({"ok": true}))
}

// ---------------------------------------------------------------------------------------------
// Responses

fn json_response(status: StatusCode, body: Bytes) -> SimResponse {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn empty_response(status: StatusCode) -> SimResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Talkdesk's error shape: `{"code","message"}`.
fn talkdesk_error(status: StatusCode, code: &str, message: &str) -> SimResponse {
    let body = json!({"code": code, "message": message});
    json_response(status, Bytes::from(body.to_string()))
}

fn control_error(status: StatusCode, code: &str, message: &str) -> SimResponse {
    talkdesk_error(status, code, message)
}

/// OAuth's error shape: `{"error","error_description"}`.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> SimResponse {
    let body = json!({"error": error, "error_description": description});
    let mut response = json_response(status, Bytes::from(body.to_string()));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn invalid_client(description: &str) -> SimResponse {
    let mut response = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(TOKEN_REALM),
    );
    response
}

fn method_not_allowed(allow: &'static str) -> SimResponse {
    let mut response = talkdesk_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::client::conn::http1;

    type TestResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

    const CONTACT: &str = "+15551234567";
    const CONTACT_ENCODED: &str = "%2B15551234567";

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Answer {
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).expect("a JSON body")
        }

        fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).and_then(|v| v.to_str().ok())
        }
    }

    async fn send(
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

    async fn start() -> Simulator {
        start_with(SimulatorConfig::default()).await
    }

    async fn start_with(config: SimulatorConfig) -> Simulator {
        Simulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
            .await
            .expect("simulator starts")
    }

    fn basic(id: &str, secret: &str) -> String {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        format!("Basic {encoded}")
    }

    const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

    async fn token_request(sim: &Simulator, auth: Option<&str>, body: &str) -> Answer {
        let mut headers = vec![FORM];
        if let Some(auth) = auth {
            headers.push(("authorization", auth));
        }
        send(sim.addr(), Method::POST, TOKEN_PATH, &headers, body)
            .await
            .expect("token request")
    }

    /// A token with the given scopes (space-separated; `None`: all allowed).
    async fn token(sim: &Simulator, scope: Option<&str>) -> String {
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

    fn consent_path(contact: &str) -> String {
        format!("/voicebiometrics/contacts/{contact}/consent")
    }

    async fn get(sim: &Simulator, contact: &str, token: &str) -> TestResult<Answer> {
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

    async fn put(sim: &Simulator, contact: &str, token: &str, body: &str) -> TestResult<Answer> {
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

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("a+b%3Ac%2B").as_deref(), Some("a b:c+"));
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(form_decode("%4"), None);
        let form = parse_form(b"grant_type=client_credentials&scope=a%3Ar+b&empty").unwrap();
        assert_eq!(
            form,
            vec![
                ("grant_type".to_owned(), "client_credentials".to_owned()),
                ("scope".to_owned(), "a:r b".to_owned()),
                ("empty".to_owned(), String::new()),
            ]
        );
        assert!(parse_form(b"a=1&a=2").is_err());
    }

    #[tokio::test]
    async fn token_via_basic_and_via_post() {
        let sim = start().await;
        assert_eq!(sim.token_url(), format!("{}/oauth/token", sim.base_url()));
        assert!(sim.base_url().starts_with("http://127.0.0.1:"));

        let answer = token_request(
            &sim,
            Some(&basic("sim-client", "sim-secret")),
            "grant_type=client_credentials&scope=voicebiometrics-consent%3Aread+voicebiometrics-consent:write",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("cache-control"), Some("no-store"));
        assert_eq!(answer.header("content-type"), Some("application/json"));
        let body = answer.json();
        assert!(body["access_token"].as_str().unwrap().len() >= 32);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 600);
        assert_eq!(
            body["scope"],
            "voicebiometrics-consent:read voicebiometrics-consent:write"
        );

        // client_secret_post, no scope: every allowed scope.
        let answer = token_request(
            &sim,
            None,
            "grant_type=client_credentials&client_id=sim-client&client_secret=sim-secret",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.json()["scope"],
            "voicebiometrics-consent:read voicebiometrics-consent:write"
        );

        let stats = sim.stats();
        assert_eq!((stats.token_requests, stats.tokens_issued), (2, 2));
    }

    #[tokio::test]
    async fn basic_credentials_are_form_decoded() {
        let sim = start_with(SimulatorConfig {
            client_id: "sim client".to_owned(),
            client_secret: "p@ss:w%rd".to_owned(),
            ..SimulatorConfig::default()
        })
        .await;
        let answer = token_request(
            &sim,
            Some(&basic("sim+client", "p%40ss%3Aw%25rd")),
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        sim.shutdown().await;
    }

    #[tokio::test]
    async fn token_errors() {
        let sim = start().await;
        let wrong = token_request(
            &sim,
            Some(&basic("sim-client", "nope")),
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert_eq!(wrong.json()["error"], "invalid_client");
        assert!(wrong.json()["error_description"].is_string());
        assert!(wrong
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Basic")));

        let missing = token_request(&sim, None, "grant_type=client_credentials").await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert_eq!(missing.json()["error"], "invalid_client");

        let auth = basic("sim-client", "sim-secret");
        let scope = token_request(
            &sim,
            Some(&auth),
            "grant_type=client_credentials&scope=voicebiometrics-enroll%3Awrite",
        )
        .await;
        assert_eq!(scope.status, StatusCode::BAD_REQUEST);
        assert_eq!(scope.json()["error"], "invalid_scope");

        let grant = token_request(&sim, Some(&auth), "grant_type=password").await;
        assert_eq!(grant.status, StatusCode::BAD_REQUEST);
        assert_eq!(grant.json()["error"], "unsupported_grant_type");

        let json = send(
            sim.addr(),
            Method::POST,
            TOKEN_PATH,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            r#"{"grant_type":"client_credentials"}"#,
        )
        .await
        .unwrap();
        assert_eq!(json.status, StatusCode::BAD_REQUEST);
        assert_eq!(json.json()["error"], "invalid_request");

        let stats = sim.stats();
        assert_eq!((stats.token_requests, stats.tokens_issued), (5, 0));
        assert_eq!(stats.unauthorized, 0, "token 401s are not consent 401s");
    }

    #[tokio::test]
    async fn get_unknown_is_404() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let answer = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert_eq!(answer.header("content-type"), Some("application/json"));
        assert_eq!(
            answer.json(),
            json!({"code": "not_found", "message": "contact not found"})
        );

        sim.set_unknown_as_no_consent(true);
        let answer = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json(), json!({"status": "NO_CONSENT"}));
    }

    #[tokio::test]
    async fn put_creates_then_updates_then_get_reads() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let first = put(&sim, CONTACT, &token, r#"{"status":"CONSENTED"}"#)
            .await
            .unwrap();
        assert_eq!(first.status, StatusCode::CREATED);
        assert_eq!(first.json(), json!({"status": "CONSENTED"}));
        let second = put(&sim, CONTACT, &token, r#"{"status":"REFUSED"}"#)
            .await
            .unwrap();
        assert_eq!(second.status, StatusCode::OK);
        assert_eq!(second.json(), json!({"status": "REFUSED"}));

        let read = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(read.status, StatusCode::OK);
        assert_eq!(read.header("content-type"), Some("application/json"));
        assert_eq!(read.body, Bytes::from_static(br#"{"status":"REFUSED"}"#));
        assert_eq!(sim.stored_status(CONTACT), Some(ConsentStatus::Refused));
        let stats = sim.stats();
        assert_eq!((stats.gets, stats.puts), (1, 2));
    }

    #[tokio::test]
    async fn encoded_and_raw_plus_are_one_contact() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.set_status(CONTACT_ENCODED, ConsentStatus::Deleted);
        let raw = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(raw.json(), json!({"status": "DELETED"}));
        let encoded = get(&sim, CONTACT_ENCODED, &token).await.unwrap();
        assert_eq!(encoded.json(), json!({"status": "DELETED"}));
        let update = put(&sim, CONTACT_ENCODED, &token, r#"{"status":"CONSENTED"}"#)
            .await
            .unwrap();
        assert_eq!(update.status, StatusCode::OK, "seeded contact exists");

        assert_eq!(sim.gets_for(CONTACT), 2);
        assert_eq!(sim.gets_for(CONTACT_ENCODED), 2);
        assert_eq!(sim.puts_for(CONTACT), 1);
        assert_eq!(sim.stored_status(CONTACT), Some(ConsentStatus::Consented));
    }

    #[tokio::test]
    async fn bearer_missing_unknown_or_expired_is_401() {
        let sim = start().await;
        sim.set_status(CONTACT, ConsentStatus::Consented);
        let missing = send(sim.addr(), Method::GET, &consent_path(CONTACT), &[], "")
            .await
            .unwrap();
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert_eq!(missing.json()["code"], "unauthorized");
        assert!(missing.json()["message"].is_string());

        let unknown = get(&sim, CONTACT, "not-a-token").await.unwrap();
        assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
        assert_eq!(unknown.json()["code"], "unauthorized");

        sim.set_token_ttl(Duration::ZERO);
        let expired = token(&sim, None).await;
        let answer = get(&sim, CONTACT, &expired).await.unwrap();
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.json()["code"], "unauthorized");

        let stats = sim.stats();
        assert_eq!(stats.unauthorized, 3);
        assert_eq!(stats.expired_token_uses, 1);
        assert_eq!(stats.gets, 3);

        sim.set_token_ttl(Duration::from_secs(60));
        let fresh = token(&sim, None).await;
        assert_eq!(
            get(&sim, CONTACT, &fresh).await.unwrap().status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn lacking_scope_is_403() {
        let sim = start().await;
        let read_only = token(&sim, Some(READ_SCOPE)).await;
        let answer = put(&sim, CONTACT, &read_only, r#"{"status":"CONSENTED"}"#)
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert_eq!(answer.json()["code"], "forbidden");
        assert_eq!(sim.stored_status(CONTACT), None);

        let write_only = token(&sim, Some(WRITE_SCOPE)).await;
        let answer = get(&sim, CONTACT, &write_only).await.unwrap();
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert_eq!(sim.stats().unauthorized, 0);
    }

    #[tokio::test]
    async fn bad_body_and_bad_contact_are_400() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let extra = put(&sim, CONTACT, &token, r#"{"status":"REFUSED","why":"x"}"#)
            .await
            .unwrap();
        assert_eq!(extra.status, StatusCode::BAD_REQUEST);
        let body = extra.json();
        assert_eq!(body["code"], "invalid_body");
        assert!(body["message"].is_string());
        assert_eq!(body["fields"][0]["name"], "why");
        assert!(body["fields"][0]["description"].is_string());

        let wrong = put(&sim, CONTACT, &token, r#"{"status":"MAYBE"}"#)
            .await
            .unwrap();
        assert_eq!(wrong.json()["fields"][0]["name"], "status");
        let not_json = put(&sim, CONTACT, &token, "status=REFUSED").await.unwrap();
        assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
        assert_eq!(not_json.json()["code"], "invalid_body");

        let bad_id = get(&sim, "%2F1555", &token).await.unwrap();
        assert_eq!(bad_id.status, StatusCode::BAD_REQUEST);
        assert_eq!(bad_id.json()["code"], "invalid_contact_id");
        assert_eq!(sim.stored_status(CONTACT), None);
    }

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
    async fn records_the_last_consent_request() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let auth = format!("Bearer {token}");
        let path = format!("{}?x=1", consent_path(CONTACT_ENCODED));
        send(
            sim.addr(),
            Method::GET,
            &path,
            &[("authorization", &auth), ("X-Request-Id", "req-42")],
            "",
        )
        .await
        .unwrap();
        let recorded = sim.last_consent_request().expect("recorded");
        assert_eq!(recorded.method, "GET");
        assert_eq!(recorded.path_and_query, path);
        assert_eq!(recorded.header("x-request-id"), Some("req-42"));
        assert_eq!(recorded.header("Authorization"), Some(auth.as_str()));
        assert!(!recorded.has_header("x-api-key"));
        sim.reset_counters();
        assert_eq!(sim.last_consent_request(), None);
        assert_eq!(sim.stats(), SimStats::default());
    }

    #[tokio::test]
    async fn a_500_fault_is_consumed_once() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.set_status(CONTACT, ConsentStatus::Consented);
        sim.inject(SimRoute::Get, Fault::Status500, 1);
        let failed = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(failed.json()["code"].is_string());
        let ok = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(sim.stats().gets, 2, "faulted requests are counted");
        assert_eq!(sim.gets_for(CONTACT), 2);
    }

    #[tokio::test]
    async fn faults_apply_in_order_per_route() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.inject(SimRoute::Put, Fault::Unauthorized, 1);
        sim.inject(
            SimRoute::Put,
            Fault::TooManyRequests { retry_after_s: 7 },
            2,
        );
        sim.inject(SimRoute::Token, Fault::Status500, 1);
        let body = r#"{"status":"REFUSED"}"#;

        let first = put(&sim, CONTACT, &token, body).await.unwrap();
        assert_eq!(first.status, StatusCode::UNAUTHORIZED);
        assert_eq!(first.json()["code"], "unauthorized");
        for _ in 0..2 {
            let limited = put(&sim, CONTACT, &token, body).await.unwrap();
            assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(limited.header("retry-after"), Some("7"));
        }
        assert_eq!(
            sim.stored_status(CONTACT),
            None,
            "faulted PUTs write nothing"
        );
        let ok = put(&sim, CONTACT, &token, body).await.unwrap();
        assert_eq!(ok.status, StatusCode::CREATED);

        let token_fault = token_request(
            &sim,
            Some(&basic("sim-client", "sim-secret")),
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(token_fault.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(token_fault.json()["error"], "server_error");
        let stats = sim.stats();
        assert_eq!(stats.puts, 4);
        assert_eq!(stats.unauthorized, 1);
        assert_eq!((stats.token_requests, stats.tokens_issued), (2, 1));
    }

    #[tokio::test]
    async fn respond_fault_answers_verbatim() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.inject(
            SimRoute::Get,
            Fault::Respond {
                status: 302,
                headers: vec![
                    ("location".to_owned(), "http://elsewhere/".to_owned()),
                    ("content-type".to_owned(), "text/html".to_owned()),
                ],
                body: Bytes::from_static(b"<html>moved</html>"),
            },
            1,
        );
        let answer = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(answer.status, StatusCode::FOUND);
        assert_eq!(answer.header("location"), Some("http://elsewhere/"));
        assert_eq!(answer.header("content-type"), Some("text/html"));
        assert_eq!(answer.body, Bytes::from_static(b"<html>moved</html>"));
    }

    #[tokio::test]
    async fn close_fault_closes_the_connection() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.inject(SimRoute::Get, Fault::CloseConnection, 1);
        let err = get(&sim, CONTACT, &token).await.err().expect("no answer");
        let err = err.downcast_ref::<hyper::Error>().expect("a hyper error");
        assert!(err.is_incomplete_message(), "{err}");
        assert_eq!(
            get(&sim, CONTACT, &token).await.unwrap().status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(sim.stats().gets, 2);
    }

    #[tokio::test]
    async fn delayed_get_answers_what_it_read_on_arrival() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.set_status(CONTACT, ConsentStatus::Consented);
        sim.delay_next_get(CONTACT_ENCODED, Duration::from_millis(300), 1);

        let slow = {
            let sim = sim.clone();
            let token = token.clone();
            tokio::spawn(async move { get(&sim, CONTACT, &token).await })
        };
        // The current-thread runtime runs the GET's arrival (count + read) in one go.
        while sim.gets_for(CONTACT) == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let started = Instant::now();
        let write = put(&sim, CONTACT, &token, r#"{"status":"REFUSED"}"#)
            .await
            .unwrap();
        assert_eq!(write.status, StatusCode::OK);
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "PUT not delayed"
        );

        let slow = slow.await.unwrap().unwrap();
        assert_eq!(slow.json(), json!({"status": "CONSENTED"}));
        let fresh = get(&sim, CONTACT, &token).await.unwrap();
        assert_eq!(fresh.json(), json!({"status": "REFUSED"}));
    }

    #[tokio::test]
    async fn latency_and_delay_faults_slow_answers() {
        let sim = start().await;
        let token = token(&sim, None).await;
        sim.set_latency(Duration::from_millis(100));
        let started = Instant::now();
        get(&sim, CONTACT, &token).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(100));

        sim.set_latency(Duration::ZERO);
        sim.inject(SimRoute::Token, Fault::Delay(Duration::from_millis(100)), 1);
        let started = Instant::now();
        token_request(
            &sim,
            Some(&basic("sim-client", "sim-secret")),
            "grant_type=client_credentials",
        )
        .await;
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(sim.stats().tokens_issued, 2);
    }

    #[tokio::test]
    async fn http_control_surface() {
        let sim = start().await;
        let token = token(&sim, None).await;
        let addr = sim.addr();
        let json_header = [("content-type", "application/json")];

        let seeded = send(
            addr,
            Method::PUT,
            "/_sim/contacts/%2B15551234567",
            &json_header,
            r#"{"status":"CONSENTED"}"#,
        )
        .await
        .unwrap();
        assert_eq!(seeded.status, StatusCode::OK);
        assert_eq!(sim.stored_status(CONTACT), Some(ConsentStatus::Consented));

        let fault = send(
            addr,
            Method::POST,
            "/_sim/faults",
            &json_header,
            r#"{"route":"get","fault":"429","count":2,"retry_after_s":3}"#,
        )
        .await
        .unwrap();
        assert_eq!(fault.status, StatusCode::OK);
        for _ in 0..2 {
            let limited = get(&sim, CONTACT, &token).await.unwrap();
            assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(limited.header("retry-after"), Some("3"));
        }
        assert_eq!(
            get(&sim, CONTACT, &token).await.unwrap().status,
            StatusCode::OK
        );

        let respond = send(
            addr,
            Method::POST,
            "/_sim/faults",
            &json_header,
            r#"{"route":"put","fault":"respond","status":200,"headers":{"content-type":"text/plain"},"body_len":100000}"#,
        )
        .await
        .unwrap();
        assert_eq!(respond.status, StatusCode::OK);
        let huge = put(&sim, CONTACT, &token, r#"{"status":"REFUSED"}"#)
            .await
            .unwrap();
        assert_eq!(huge.body.len(), 100_000);

        for bad in [
            r#"{"route":"nope","fault":"500"}"#,
            r#"{"route":"get","fault":"teapot"}"#,
            r#"{"route":"get","fault":"delay"}"#,
            r#"{"route":"get","fault":"500","count":0}"#,
            r#"{"route":"get","fault":"500","typo":1}"#,
            "not json",
        ] {
            let answer = send(addr, Method::POST, "/_sim/faults", &json_header, bad)
                .await
                .unwrap();
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(answer.json()["code"], "invalid_request");
        }

        let latency = send(
            addr,
            Method::POST,
            "/_sim/latency",
            &json_header,
            r#"{"latency_ms":5}"#,
        )
        .await
        .unwrap();
        assert_eq!(latency.status, StatusCode::OK);
        let delay = send(
            addr,
            Method::POST,
            "/_sim/delay-get",
            &json_header,
            r#"{"contact":"+15551234567","delay_ms":1,"count":1}"#,
        )
        .await
        .unwrap();
        assert_eq!(delay.status, StatusCode::OK);

        let stats = send(addr, Method::GET, "/_sim/stats", &[], "")
            .await
            .unwrap();
        assert_eq!(stats.status, StatusCode::OK);
        let stats = stats.json();
        assert_eq!(stats["gets"], 3);
        assert_eq!(stats["puts"], 1);
        assert_eq!(stats["tokens_issued"], 1);
        assert_eq!(stats["gets_per_contact"][CONTACT], 3);
        assert_eq!(stats["latency_ms"], 5);
        assert_eq!(stats["last_consent_request"]["method"], "PUT");

        let reset = send(addr, Method::POST, "/_sim/reset", &[], "")
            .await
            .unwrap();
        assert_eq!(reset.status, StatusCode::OK);
        assert_eq!(sim.stats(), SimStats::default());
        assert_eq!(sim.report().pending_faults.values().sum::<u64>(), 0);
        // The faulted PUT wrote nothing; seeded data survives a reset.
        assert_eq!(sim.stored_status(CONTACT), Some(ConsentStatus::Consented));

        let unknown = send(addr, Method::GET, "/_sim/nothing", &[], "")
            .await
            .unwrap();
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        let wrong_method = send(addr, Method::GET, "/_sim/faults", &[], "")
            .await
            .unwrap();
        assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
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
