//! The shared OAuth client-credentials token: fetched once however many requests need it,
//! renewed in the background before it expires, dropped and renewed when upstream rejects it.
//!
//! Requests read the current token from an `ArcSwap` (no lock, no await). Only one task, the
//! refresher, ever talks to the token endpoint; requests that find no usable token wake it
//! and wait on a `watch` channel for its next result, so a burst of cold requests or of
//! upstream 401s causes exactly one fetch. While the endpoint is failing and no usable token
//! is held, requests fail fast with `token_unavailable` instead of queueing behind retries.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use prometheus::{Histogram, IntCounter, Registry};
use serde::Deserialize;
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{ClientAuth, Secret, TalkdeskSettings, TokenSettings};
use crate::error::{Failure, ProxyError};
use crate::metrics;
use crate::upstream::backoff::Backoff;
use crate::upstream::transport::{AttemptError, Transport, USER_AGENT};

/// A request never waits longer than this for a token (the contract's "within 1 s").
pub const MAX_TOKEN_WAIT: Duration = Duration::from_secs(1);
/// Renewal back-off after a failed fetch: doubles from the first to the last, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_LAST: Duration = Duration::from_secs(30);
/// The largest token response read.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
/// While another instance renews the fleet's token, the store is asked again this often...
const FLEET_POLL: Duration = Duration::from_millis(20);
/// ...for at most one token request's timeout plus this, then the refresher fetches alone. A
/// fleet store holds its renewal lock for the same time at most, so a waiter gives up only
/// once the lock's holder could no longer store.
pub const FLEET_WAIT_MARGIN: Duration = Duration::from_secs(1);

/// A future of a fleet store's (a trait object's).
pub type FleetFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The fleet's token, as a fleet store hands it out.
pub struct FleetToken {
    /// `Bearer <token>`, marked sensitive.
    pub authorization: HeaderValue,
    /// What is left of its lifetime, by the store's clock.
    pub remaining: Duration,
    /// Its whole lifetime (`expires_in` when it was fetched).
    pub lifetime: Duration,
    /// Tells the fleet's tokens apart.
    pub id: u64,
}

/// The fleet's renewal lock, held by this instance.
pub struct FleetLock(pub String);

/// What a fleet store says to a request for its lock.
pub enum LockAnswer {
    /// The lock is this instance's: fetch, then [`FleetTokens::store`] or
    /// [`FleetTokens::release`].
    Locked(FleetLock),
    /// The token was replaced meanwhile: here is the new one.
    Replaced(FleetToken),
    /// Another instance holds the lock.
    Held,
}

/// One upstream token for several instances (`cluster.shared_token`): kept where every instance
/// reads it, renewed by one instance at a time. The token manager knows only this; the cluster
/// implements it over Redis. Every method is bounded in time by the store.
pub trait FleetTokens: Send + Sync + 'static {
    /// The fleet's current token, if it has one.
    fn read(&self) -> FleetFuture<'_, Result<Option<FleetToken>, Failure>>;
    /// The renewal lock, unless the fleet's token is no longer `replacing` (the id of the token
    /// this instance found unusable; `None`: it found none), or another instance holds the lock.
    fn lock(&self, replacing: Option<u64>) -> FleetFuture<'_, Result<LockAnswer, Failure>>;
    /// Stores a token fetched under `lock` for the fleet and releases the lock; its fleet id.
    fn store(
        &self,
        lock: FleetLock,
        authorization: HeaderValue,
        remaining: Duration,
        lifetime: Duration,
    ) -> FleetFuture<'_, Result<u64, Failure>>;
    /// Releases `lock` without storing (the fetch failed).
    fn release(&self, lock: FleetLock) -> FleetFuture<'_, ()>;
    /// A token was installed, from `source` (for the store's metrics).
    fn installed(&self, source: TokenSource);
    /// The lock was found held by another instance, whose token this instance now waits for:
    /// once per wait, however often the lock is asked for meanwhile (for the store's metrics).
    fn waiting_for_lock(&self);
}

/// Where an installed token came from, with a fleet store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// The fleet's, from the store.
    Fleet,
    /// Fetched by this instance for the fleet, under the renewal lock.
    Renewed,
    /// Fetched for this instance only: the store could not help.
    Alone,
}

impl TokenSource {
    pub const ALL: [TokenSource; 3] =
        [TokenSource::Fleet, TokenSource::Renewed, TokenSource::Alone];

    /// Its label in the store's metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Fleet => "fleet",
            TokenSource::Renewed => "renewed",
            TokenSource::Alone => "alone",
        }
    }
}

/// A bearer token and when it stops being usable.
pub struct AccessToken {
    /// `Bearer <token>`, marked sensitive so hyper never logs it.
    authorization: HeaderValue,
    /// Past this instant the token is never sent (a safety margin before its real expiry).
    usable_until: Instant,
    /// When the refresher renews it.
    refresh_at: Instant,
    /// Distinguishes tokens, so that only the current one is dropped on a 401.
    id: u64,
}

impl AccessToken {
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("id", &self.id)
            .field("authorization", &"<redacted>")
            .finish()
    }
}

/// Why no token could be had. Never holds the token endpoint's body, which may hold a token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenFailure {
    #[error("token endpoint request failed")]
    Transport(#[source] AttemptError),
    #[error("token endpoint answered {status}{}", oauth_error_note(.oauth_error))]
    Refused {
        status: StatusCode,
        /// The OAuth `error` code, when it is a short plain word.
        oauth_error: Option<String>,
    },
    #[error("{0}")]
    Malformed(&'static str),
    #[error("the token request could not be built: {0}")]
    BadRequest(&'static str),
    #[error("the token endpoint did not answer in time")]
    WaitTimedOut,
    #[error("the token refresher stopped")]
    Stopped,
}

fn oauth_error_note(code: &Option<String>) -> String {
    code.as_deref()
        .map(|c| format!(" ({c})"))
        .unwrap_or_default()
}

impl From<TokenFailure> for ProxyError {
    fn from(failure: TokenFailure) -> Self {
        ProxyError::TokenUnavailable(Failure::new("no access token", failure))
    }
}

/// What the refresher is doing, as requests see it.
#[derive(Debug, Clone)]
enum Phase {
    /// A fetch is in flight: wait for it.
    Fetching,
    /// The last fetch succeeded; the refresher sleeps until renewal or a wake-up.
    Idle,
    /// The last fetch failed and the refresher is backing off: fail fast.
    BackingOff(TokenFailure),
}

#[derive(Clone)]
pub struct TokenMetrics {
    fetch_succeeded: IntCounter,
    fetch_failed: IntCounter,
    expiry: prometheus::Gauge,
    fetch_duration: Histogram,
    renewed_after_rejection: IntCounter,
    rejected_again: IntCounter,
}

impl TokenMetrics {
    /// Registers the token metrics, every label value present from the start (at 0), so
    /// `increase()` sees the first failure and dashboards are never empty.
    pub fn register(registry: &Registry) -> Self {
        let fetches = metrics::counter_vec(
            registry,
            "consent_proxy_token_fetches_total",
            "Token endpoint requests by result.",
            &["result"],
        );
        let rejections = metrics::counter_vec(
            registry,
            "consent_proxy_token_upstream_rejections_total",
            "Upstream 401 answers to the proxy's token, by what followed: renewed \
             (token dropped and renewed), rejected_again (401 after a renewal, caller got 502).",
            &["outcome"],
        );
        TokenMetrics {
            fetch_succeeded: fetches.with_label_values(&["success"]),
            fetch_failed: fetches.with_label_values(&["failure"]),
            expiry: metrics::float_gauge(
                registry,
                "consent_proxy_token_expiry_timestamp_seconds",
                "Unix time at which the current access token expires (0 = none held).",
            ),
            fetch_duration: metrics::histogram(
                registry,
                "consent_proxy_token_fetch_duration_seconds",
                "Time taken by token endpoint requests.",
            ),
            renewed_after_rejection: rejections.with_label_values(&["renewed"]),
            rejected_again: rejections.with_label_values(&["rejected_again"]),
        }
    }

    pub fn rejected_again(&self) -> &IntCounter {
        &self.rejected_again
    }
}

/// How to ask the token endpoint for a token.
struct TokenRequest {
    url: String,
    client_id: String,
    client_secret: Secret,
    client_auth: ClientAuth,
    scopes: String,
    timeout: Duration,
}

/// The token manager's state: held by every handle, and weakly by the refresher.
struct TokenState {
    current: ArcSwapOption<AccessToken>,
    phase: watch::Sender<Phase>,
    /// Wakes the refresher when a request finds no usable token.
    wake: Arc<Notify>,
    next_id: AtomicU64,
    metrics: TokenMetrics,
    /// Dropped with the last handle: tells a sleeping refresher to stop at once.
    _alive: oneshot::Sender<()>,
}

impl TokenState {
    fn usable_token(&self) -> Option<Arc<AccessToken>> {
        let token = self.current.load_full()?;
        token.is_usable(Instant::now()).then_some(token)
    }
}

/// The handle requests use. Cheap to clone.
#[derive(Clone)]
pub struct TokenManager {
    state: Arc<TokenState>,
}

impl TokenManager {
    /// Starts the refresher, which fetches the first token at once. It stops when the
    /// returned manager and all its clones are dropped, or when `shutdown` fires; the handle
    /// says when it has.
    pub fn start(
        transport: Transport,
        talkdesk: &TalkdeskSettings,
        settings: &TokenSettings,
        metrics: TokenMetrics,
        fleet: Option<Arc<dyn FleetTokens>>,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let (phase, _) = watch::channel(Phase::Fetching);
        let (alive, manager_gone) = oneshot::channel();
        let wake = Arc::new(Notify::new());
        let state = Arc::new(TokenState {
            current: ArcSwapOption::empty(),
            phase,
            wake: wake.clone(),
            next_id: AtomicU64::new(1),
            metrics,
            _alive: alive,
        });
        let request = TokenRequest {
            url: talkdesk.token_url.clone(),
            client_id: talkdesk.client_id.clone(),
            client_secret: talkdesk.client_secret.clone(),
            client_auth: talkdesk.client_auth,
            scopes: talkdesk.scopes.join(" "),
            timeout: talkdesk.timeout,
        };
        let refresher = Refresher {
            state: Arc::downgrade(&state),
            wake,
            manager_gone,
            transport,
            request,
            refresh_margin: settings.refresh_margin,
            fleet,
            installed_fleet_id: None,
        };
        let task = tokio::spawn(refresher.run(shutdown));
        (TokenManager { state }, task)
    }

    /// The current token, waiting (at most `MAX_TOKEN_WAIT`, and not past `deadline`) for
    /// the refresher when none is usable. Fails fast while the token endpoint is failing.
    pub async fn current(&self, deadline: Instant) -> Result<Arc<AccessToken>, ProxyError> {
        if let Some(token) = self.state.usable_token() {
            return Ok(token);
        }
        let wait_until = deadline.min(Instant::now() + MAX_TOKEN_WAIT);
        let mut phase = self.state.phase.subscribe();
        loop {
            if let Some(token) = self.state.usable_token() {
                return Ok(token);
            }
            match &*phase.borrow_and_update() {
                Phase::BackingOff(failure) => return Err(failure.clone().into()),
                // Idle with no usable token: dropped after a 401 or expired unrenewed.
                Phase::Idle => self.state.wake.notify_one(),
                Phase::Fetching => {}
            }
            match tokio::time::timeout_at(wait_until, phase.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(TokenFailure::Stopped.into()),
                Err(_) => return Err(TokenFailure::WaitTimedOut.into()),
            }
        }
    }

    /// Upstream rejected `token`: drop it if it is still the current one (so a burst of 401s
    /// causes one renewal) and wake the refresher.
    pub fn reject(&self, token: &Arc<AccessToken>) {
        let current = self.state.current.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) {
            let previous = self.state.current.compare_and_swap(&*current, None);
            if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, token)) {
                self.state.metrics.renewed_after_rejection.inc();
                // No token is held until the renewal succeeds ("0 = none held").
                self.state.metrics.expiry.set(0.0);
                tracing::info!(token_id = token.id, "upstream rejected the token; renewing");
                self.state.wake.notify_one();
            }
        }
    }

    pub fn metrics(&self) -> &TokenMetrics {
        &self.state.metrics
    }

    /// Ready when a usable token is held; otherwise the reason.
    pub fn readiness(&self) -> Result<(), String> {
        if self.state.usable_token().is_some() {
            return Ok(());
        }
        Err(match &*self.state.phase.borrow() {
            Phase::BackingOff(failure) => format!("no valid token: {failure}"),
            Phase::Fetching => "no valid token yet: fetching".to_owned(),
            Phase::Idle => "no valid token: renewal pending".to_owned(),
        })
    }
}

/// The background task that owns all talk with the token endpoint. It holds the manager's
/// state only weakly (and only while it works), so dropping the last handle stops it.
struct Refresher {
    state: Weak<TokenState>,
    wake: Arc<Notify>,
    manager_gone: oneshot::Receiver<()>,
    transport: Transport,
    request: TokenRequest,
    refresh_margin: Duration,
    fleet: Option<Arc<dyn FleetTokens>>,
    /// The fleet id of the token last installed, when it is the fleet's.
    installed_fleet_id: Option<u64>,
}

/// A token ready to install, and how long it lives from now (for the expiry gauge).
type Obtained = (AccessToken, Duration);

impl Refresher {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_LAST);
        loop {
            let Some(state) = self.state.upgrade() else {
                return;
            };
            state.phase.send_replace(Phase::Fetching);
            let result = self.obtain(&state).await;
            let (sleep_until, backing_off) = match result {
                Ok((token, lifetime_left)) => {
                    tracing::debug!(
                        token_id = token.id,
                        expires_in_s = lifetime_left.as_secs(),
                        "token obtained"
                    );
                    let refresh_at = token.refresh_at;
                    state.current.store(Some(Arc::new(token)));
                    // After the store, so that a concurrent `reject` of the previous token
                    // (which zeroes the gauge) cannot overwrite the new token's expiry.
                    state
                        .metrics
                        .expiry
                        .set((crate::clock::since_epoch() + lifetime_left).as_secs_f64());
                    state.phase.send_replace(Phase::Idle);
                    backoff.reset();
                    (refresh_at, false)
                }
                Err(failure) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = %crate::error::ErrorChain(&failure),
                        retry_in_ms = delay.as_millis() as u64,
                        "token fetch failed"
                    );
                    state.phase.send_replace(Phase::BackingOff(failure));
                    (Instant::now() + delay, true)
                }
            };
            drop(state);
            if !self.sleep(sleep_until, backing_off, &mut shutdown).await {
                return;
            }
        }
    }

    /// Sleeps until `until`, or until woken while no usable token is held (not while backing
    /// off: requests fail fast then). Returns false when the proxy is shutting down or the
    /// manager is gone.
    async fn sleep(
        &mut self,
        until: Instant,
        backing_off: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                _ = self.wake.notified(), if !backing_off => {
                    match self.state.upgrade() {
                        Some(state) if state.usable_token().is_some() => {}
                        Some(_) => return true,
                        None => return false,
                    }
                }
                _ = &mut self.manager_gone => return false,
                _ = shutdown.changed() => return false,
            }
        }
    }

    /// A token: the fleet's when there is a fleet store and it can help, else fetched.
    async fn obtain(&mut self, state: &TokenState) -> Result<Obtained, TokenFailure> {
        let Some(fleet) = self.fleet.clone() else {
            return self.fetch_counted(state).await;
        };
        // The token held was dropped (upstream rejected it) or ran out: if it was the fleet's,
        // the fleet's copy is no good either.
        let rejected = state
            .usable_token()
            .is_none()
            .then_some(self.installed_fleet_id)
            .flatten();
        let give_up_at = Instant::now() + self.request.timeout + FLEET_WAIT_MARGIN;
        let mut waiting = false;
        loop {
            let found = match fleet.read().await {
                Ok(found) => found,
                Err(problem) => return self.alone(state, fleet.as_ref(), problem).await,
            };
            let replacing = match found {
                Some(token) if self.usable_from_fleet(&token, rejected) => {
                    return Ok(self.install_fleet_token(state, fleet.as_ref(), token));
                }
                Some(token) => Some(token.id),
                None => None,
            };
            match fleet.lock(replacing).await {
                Err(problem) => return self.alone(state, fleet.as_ref(), problem).await,
                Ok(LockAnswer::Replaced(token)) if self.usable_from_fleet(&token, rejected) => {
                    return Ok(self.install_fleet_token(state, fleet.as_ref(), token));
                }
                Ok(LockAnswer::Locked(lock)) => {
                    return self.renew_for_fleet(state, fleet.as_ref(), lock).await;
                }
                Ok(LockAnswer::Held) if !waiting => {
                    waiting = true;
                    fleet.waiting_for_lock();
                }
                Ok(LockAnswer::Replaced(_) | LockAnswer::Held) => {}
            }
            if Instant::now() + FLEET_POLL >= give_up_at {
                let problem = Failure::msg(format!(
                    "no token from the instance renewing it within {} ms",
                    (self.request.timeout + FLEET_WAIT_MARGIN).as_millis()
                ));
                return self.alone(state, fleet.as_ref(), problem).await;
            }
            tokio::time::sleep(FLEET_POLL).await;
        }
    }

    /// Whether the fleet's `token` may be installed: not the one just rejected, not due for
    /// renewal (then this instance renews it, or waits for the one that does).
    fn usable_from_fleet(&self, token: &FleetToken, rejected: Option<u64>) -> bool {
        let (margin, safety) = self.margins(token.lifetime);
        Some(token.id) != rejected && token.remaining > margin.max(safety)
    }

    fn install_fleet_token(
        &mut self,
        state: &TokenState,
        fleet: &dyn FleetTokens,
        token: FleetToken,
    ) -> Obtained {
        fleet.installed(TokenSource::Fleet);
        self.installed_fleet_id = Some(token.id);
        let expires_at = Instant::now() + token.remaining;
        let access = self.access_token(state, token.authorization, expires_at, token.lifetime);
        (access, token.remaining)
    }

    /// Fetches under the fleet's lock and stores the token for the others; the token is used
    /// here even when storing fails (the lock then expires by itself).
    async fn renew_for_fleet(
        &mut self,
        state: &TokenState,
        fleet: &dyn FleetTokens,
        lock: FleetLock,
    ) -> Result<Obtained, TokenFailure> {
        let started = Instant::now();
        let (token, lifetime) = match self.fetch_counted(state).await {
            Ok(fetched) => fetched,
            Err(failure) => {
                fleet.release(lock).await;
                return Err(failure);
            }
        };
        fleet.installed(TokenSource::Renewed);
        let remaining = lifetime.saturating_sub(started.elapsed());
        self.installed_fleet_id = match fleet
            .store(lock, token.authorization.clone(), remaining, lifetime)
            .await
        {
            Ok(id) => Some(id),
            Err(problem) => {
                tracing::warn!(
                    error = %crate::error::ErrorChain(&problem),
                    "the renewed token could not be stored for the fleet; the others renew \
                     their own when their lock wait ends"
                );
                None
            }
        };
        Ok((token, lifetime))
    }

    /// Fetches a token for this instance only: the fleet store could not help.
    async fn alone(
        &mut self,
        state: &TokenState,
        fleet: &dyn FleetTokens,
        problem: Failure,
    ) -> Result<Obtained, TokenFailure> {
        tracing::warn!(
            error = %crate::error::ErrorChain(&problem),
            "the fleet's token is out of reach: fetching one for this instance"
        );
        self.installed_fleet_id = None;
        let result = self.fetch_counted(state).await;
        if result.is_ok() {
            fleet.installed(TokenSource::Alone);
        }
        result
    }

    /// [`Self::fetch`], counted and timed in the token metrics.
    async fn fetch_counted(&self, state: &TokenState) -> Result<Obtained, TokenFailure> {
        let started = Instant::now();
        let result = self.fetch(started, state).await;
        let metrics = &state.metrics;
        metrics
            .fetch_duration
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(_) => metrics.fetch_succeeded.inc(),
            Err(_) => metrics.fetch_failed.inc(),
        }
        result
    }

    /// The refresh margin and the safety margin for a token of `lifetime`: it is renewed
    /// `margin` before its end and never sent in its last `safety`.
    fn margins(&self, lifetime: Duration) -> (Duration, Duration) {
        let margin = self.refresh_margin.min(lifetime / 2);
        let safety = (lifetime / 4).min(Duration::from_secs(5));
        (margin, safety)
    }

    fn access_token(
        &self,
        state: &TokenState,
        authorization: HeaderValue,
        expires_at: Instant,
        lifetime: Duration,
    ) -> AccessToken {
        let (margin, safety) = self.margins(lifetime);
        let before_end = |d: Duration| expires_at.checked_sub(d).unwrap_or(expires_at);
        AccessToken {
            authorization,
            usable_until: before_end(safety),
            refresh_at: before_end(margin),
            id: state.next_id.fetch_add(1, Ordering::Relaxed),
        }
    }

    async fn fetch(&self, started: Instant, state: &TokenState) -> Result<Obtained, TokenFailure> {
        let request = self.build_request()?;
        let answer = self
            .transport
            .attempt(request, self.request.timeout, MAX_TOKEN_RESPONSE_BYTES)
            .await
            .map_err(TokenFailure::Transport)?;
        if !answer.status.is_success() {
            return Err(TokenFailure::Refused {
                status: answer.status,
                oauth_error: oauth_error_code(&answer.body),
            });
        }
        let parsed = parse_token_response(&answer.body)?;
        let lifetime = parsed.expires_in;
        let token = self.access_token(state, parsed.authorization, started + lifetime, lifetime);
        Ok((token, lifetime))
    }

    fn build_request(&self) -> Result<Request<Full<Bytes>>, TokenFailure> {
        let r = &self.request;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials")
            .append_pair("scope", &r.scopes);
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(&r.url)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, USER_AGENT);
        match r.client_auth {
            ClientAuth::Basic => {
                // RFC 6749 §2.3.1: both parts form-encoded before base64.
                let pair = format!(
                    "{}:{}",
                    form_encode(&r.client_id),
                    form_encode(r.client_secret.expose())
                );
                let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
                    .map_err(|_| TokenFailure::BadRequest("client credentials"))?;
                value.set_sensitive(true);
                builder = builder.header(header::AUTHORIZATION, value);
            }
            ClientAuth::Post => {
                form.append_pair("client_id", &r.client_id)
                    .append_pair("client_secret", r.client_secret.expose());
            }
        }
        builder
            .body(Full::new(Bytes::from(form.finish())))
            .map_err(|_| TokenFailure::BadRequest("token_url is not a valid request target"))
    }
}

/// A successful token response, validated.
pub struct ParsedToken {
    pub authorization: HeaderValue,
    pub expires_in: Duration,
}

/// A token endpoint's answer as RFC 6749 §5.1 describes it; other members are ignored.
#[derive(Deserialize)]
struct TokenResponse<'a> {
    #[serde(borrow)]
    access_token: Option<Cow<'a, str>>,
    /// `Some(None)` is an explicit `null`, which is refused like any other non-Bearer type.
    #[serde(borrow, default, deserialize_with = "present")]
    token_type: Option<Option<Cow<'a, str>>>,
    expires_in: Option<Lifetime<'a>>,
}

/// Deserializes a member that is present (even as `null`) as `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// `expires_in` as a number, or as a numeric string (some servers send one).
#[derive(Deserialize)]
#[serde(untagged)]
enum Lifetime<'a> {
    Seconds(f64),
    #[serde(borrow)]
    Text(Cow<'a, str>),
}

impl Lifetime<'_> {
    fn seconds(&self) -> Option<f64> {
        match self {
            Lifetime::Seconds(s) => Some(*s),
            Lifetime::Text(s) => s.trim().parse().ok(),
        }
    }
}

/// Validates a token endpoint's JSON answer. Errors never contain the body (which may hold
/// a token): serde's own messages can echo values, so they are replaced by fixed ones.
pub fn parse_token_response(body: &[u8]) -> Result<ParsedToken, TokenFailure> {
    let response: TokenResponse<'_> = serde_json::from_slice(body).map_err(|e| {
        TokenFailure::Malformed(if e.is_data() {
            "token response is not a token answer"
        } else {
            "token response is not JSON"
        })
    })?;
    let access_token =
        response
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or(TokenFailure::Malformed(
                "token response has no access_token",
            ))?;
    // Visible ASCII only (RFC 6750's b64token is a subset): `HeaderValue` would also take
    // spaces, tabs and non-ASCII bytes, which upstream would trim, split or refuse.
    let not_a_header =
        TokenFailure::Malformed("access_token has characters not allowed in a header");
    if !access_token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(not_a_header);
    }
    let bearer =
        |t: &Option<Cow<'_, str>>| t.as_ref().is_some_and(|t| t.eq_ignore_ascii_case("bearer"));
    if response.token_type.is_some_and(|t| !bearer(&t)) {
        return Err(TokenFailure::Malformed(
            "token response's token_type is not Bearer",
        ));
    }
    let expires_in = response
        .expires_in
        .and_then(|l| l.seconds())
        .filter(|s| s.is_finite() && *s >= 1.0)
        .ok_or(TokenFailure::Malformed(
            "token response has no positive expires_in",
        ))?;
    let mut authorization =
        HeaderValue::from_str(&format!("Bearer {access_token}")).map_err(|_| not_a_header)?;
    authorization.set_sensitive(true);
    Ok(ParsedToken {
        authorization,
        // Capped at a year so instant arithmetic cannot overflow.
        expires_in: Duration::from_secs_f64(expires_in.min(365.0 * 86_400.0)),
    })
}

/// The OAuth `error` code of an error answer, when it is a short plain word (never the
/// description, which could echo input).
fn oauth_error_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = value.get("error")?.as_str()?;
    (code.len() <= 40 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then(|| code.to_owned())
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 §2.3.1 wants it for
/// the id and secret inside a Basic header too).
pub fn form_encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_token_response() {
        let parsed = parse_token_response(
            br#"{"access_token":"abc","token_type":"Bearer","expires_in":600,"scope":"x"}"#,
        )
        .unwrap();
        assert_eq!(parsed.expires_in, Duration::from_secs(600));
        assert!(parsed.authorization.is_sensitive());
    }

    #[test]
    fn malformed_token_responses_are_refused_without_echoing_the_body() {
        for body in [
            &b"not json"[..],
            br#"{"token_type":"Bearer","expires_in":600}"#,
            br#"{"access_token":"secret-xyz","expires_in":0}"#,
            br#"{"access_token":"secret-xyz"}"#,
            br#"{"access_token":"secret-xyz","expires_in":600,"token_type":"mac"}"#,
            br#"{"access_token":"bad\nvalue","expires_in":600}"#,
        ] {
            let err = parse_token_response(body).err().unwrap().to_string();
            assert!(!err.contains("secret-xyz"), "{err}");
        }
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b:c/d"), "a+b%3Ac%2Fd");
    }
}
