//! One upstream token for several instances (`cluster.shared_token`): the store the cluster
//! implements ([`FleetTokens`]) and how the refresher uses it (take the fleet's token, or
//! renew it for the fleet under the store's lock, or fetch alone when the store cannot help).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use super::refresher::{Obtained, Refresher};
use super::{TokenFailure, TokenState};
use crate::error::Failure;

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

impl Refresher {
    /// A token: the fleet's when there is a fleet store and it can help, else fetched.
    pub(super) async fn obtain(&mut self, state: &TokenState) -> Result<Obtained, TokenFailure> {
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
