//! The background task that owns all talk with the token endpoint: it fetches the first token
//! at once, renews each before it expires, and renews at once when requests find none usable.
//! With a fleet store it takes the fleet's token, or renews it for the fleet under the store's
//! lock, or fetches alone when the store cannot help.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

use super::endpoint::TokenRequest;
use super::fleet::{
    FleetLock, FleetToken, FleetTokens, LockAnswer, TokenSource, FLEET_WAIT_MARGIN,
};
use super::{AccessToken, Phase, TokenFailure, TokenState};
use crate::error::{ErrorChain, Failure};
use crate::otel::{Span, SpanKind, Tracer};
use crate::upstream::backoff::Backoff;
use crate::upstream::transport::Transport;

/// Renewal back-off after a failed fetch: doubles from the first to the last, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_LAST: Duration = Duration::from_secs(30);
/// While another instance renews the fleet's token, the store is asked again this often.
const FLEET_POLL: Duration = Duration::from_millis(20);

/// The background task that owns all talk with the token endpoint. It holds the manager's
/// state only weakly (and only while it works), so dropping the last handle stops it.
pub(super) struct Refresher {
    pub(super) state: Weak<TokenState>,
    pub(super) wake: Arc<Notify>,
    pub(super) manager_gone: oneshot::Receiver<()>,
    pub(super) transport: Transport,
    pub(super) request: TokenRequest,
    pub(super) refresh_margin: Duration,
    pub(super) fleet: Option<Arc<dyn FleetTokens>>,
    /// The fleet id of the token last installed, when it is the fleet's.
    pub(super) installed_fleet_id: Option<u64>,
    /// Each fetch is the root span of a trace of its own: no request asked for it.
    pub(super) tracer: Tracer,
}

/// A token ready to install, and how long it lives from now (for the expiry gauge).
pub(super) type Obtained = (AccessToken, Duration);

impl Refresher {
    pub(super) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
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

    /// [`Self::fetch`], counted and timed in the token metrics.
    async fn fetch_counted(&self, state: &TokenState) -> Result<Obtained, TokenFailure> {
        let started = Instant::now();
        let mut span = self.tracer.root_span("POST", SpanKind::Client);
        if span.is_recording() {
            span.set("consent_proxy.operation", "token fetch");
            self.request.describe(&mut span);
        }
        let result = self.fetch(started, state, &mut span).await;
        if let Err(failure) = &result {
            span.set("error.type", failure.error_type());
            span.fail(ErrorChain(failure).to_string());
        }
        drop(span);
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

    async fn fetch(
        &self,
        started: Instant,
        state: &TokenState,
        span: &mut Span,
    ) -> Result<Obtained, TokenFailure> {
        let parsed = self.request.send(&self.transport, span).await?;
        let lifetime = parsed.expires_in;
        let token = self.access_token(state, parsed.authorization, started + lifetime, lifetime);
        Ok((token, lifetime))
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
}
