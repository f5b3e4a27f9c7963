//! The shared OAuth client-credentials token: fetched once however many requests need it,
//! renewed in the background before it expires, dropped and renewed when upstream rejects it.
//!
//! Requests read the current token from an `ArcSwap` (no lock, no await). Only one task, the
//! refresher, ever talks to the token endpoint; requests that find no usable token wake it
//! and wait on a `watch` channel for its next result, so a burst of cold requests or of
//! upstream 401s causes exactly one fetch. While the endpoint is failing and no usable token
//! is held, requests fail fast with `token_unavailable` instead of queueing behind retries.
//!
//! Here: the handle requests use ([`TokenManager`]) and the token it hands out. Beside it:
//! `refresher` (when to renew, the one task that does), `endpoint` (the token request and
//! the validation of its answer), `assertion` (the `private_key_jwt` client assertion), `fleet` (one token for several instances, through a store
//! the cluster implements), `metrics`.

pub mod assertion;
mod endpoint;
mod fleet;
mod metrics;
mod refresher;

use crate::otel::Tracer;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{HeaderValue, StatusCode};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{TalkdeskSettings, TokenSettings};
use crate::error::{ErrorChain, Failure, ProxyError};
use crate::upstream::transport::{AttemptError, Transport};
use endpoint::TokenRequest;
pub use endpoint::{form_encode, parse_token_response, ParsedToken};
pub use fleet::{
    FleetFuture, FleetLock, FleetToken, FleetTokens, LockAnswer, TokenSource, FLEET_WAIT_MARGIN,
};
pub use metrics::TokenMetrics;
use refresher::Refresher;

/// A request never waits longer than this for a token (the contract's "within 1 s").
pub const MAX_TOKEN_WAIT: Duration = Duration::from_secs(1);

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

impl TokenFailure {
    /// Its `error.type` in the token fetch's span: the attempt's failure, the status the
    /// endpoint answered, or what was wrong with its answer.
    pub fn error_type(&self) -> &'static str {
        match self {
            TokenFailure::Transport(error) => error.kind(),
            TokenFailure::Refused { status, .. } => crate::metrics::status_label(*status),
            TokenFailure::Malformed(_) => "malformed_response",
            TokenFailure::BadRequest(_) => "bad_request",
            TokenFailure::WaitTimedOut => "timeout",
            TokenFailure::Stopped => "stopped",
        }
    }
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

/// How the refresher reaches the token endpoint: the transport, and the tracer each fetch
/// reports a span to (`Tracer::off()` for none).
pub struct EndpointClient {
    pub transport: Transport,
    pub tracer: Tracer,
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
        endpoint: EndpointClient,
        talkdesk: &TalkdeskSettings,
        settings: &TokenSettings,
        metrics: TokenMetrics,
        fleet: Option<Arc<dyn FleetTokens>>,
        shutdown: watch::Receiver<bool>,
    ) -> (Self, JoinHandle<()>) {
        let EndpointClient { transport, tracer } = endpoint;
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
        let request = TokenRequest::new(talkdesk);
        let refresher = Refresher {
            state: Arc::downgrade(&state),
            wake,
            manager_gone,
            transport,
            request,
            refresh_margin: settings.refresh_margin,
            fleet,
            installed_fleet_id: None,
            tracer,
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
            Phase::BackingOff(failure) => format!("no valid token: {}", ErrorChain(failure)),
            Phase::Fetching => "no valid token yet: fetching".to_owned(),
            Phase::Idle => "no valid token: renewal pending".to_owned(),
        })
    }
}
