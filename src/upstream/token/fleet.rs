//! One upstream token for several instances (`cluster.shared_token`): the store the cluster
//! implements ([`FleetTokens`]) and what it hands out. The refresher uses it (take the fleet's
//! token, or renew it for the fleet under the store's lock, or fetch alone when the store
//! cannot help).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http::HeaderValue;

use crate::error::Failure;

/// A refresher waiting for the instance that renews the fleet's token gives up after one
/// token request's timeout plus this, then fetches alone. A
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
