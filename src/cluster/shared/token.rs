//! The fleet's upstream token in Redis (`cluster.shared_token`), after Tyk's upstream OAuth:
//! one hash holds the token (sealed: readable only with the cluster's shared key), its fleet id
//! and its lifetime, expiring with the token; a renewal lock (`SET NX PX`) lets one instance at
//! a time fetch a new one. The token manager drives it through
//! [`FleetTokens`](crate::upstream::token::FleetTokens).
//!
//! The slot is named by the key id and a keyed digest of what the token is for (token URL,
//! client id, scopes), so instances configured for another client never share it.

use std::time::Duration;

use http::HeaderValue;
use redis::Value;

use super::keys::{KeySet, SharedKeys};
use super::metrics::{Op, SharedMetrics};
use super::scripts::{Call, TOKEN_LOCK, TOKEN_READ, TOKEN_RELEASE, TOKEN_STORE};
use super::{millis, random_id, reply, Redis};
use crate::cluster::link::{not_connected, Link};
// A process that is starting waits for its first connection to Redis as long as the feed does.
use crate::cluster::CONNECT_TIMEOUT;
use crate::config::TalkdeskSettings;
use crate::error::Failure;
use crate::upstream::token::{
    FleetFuture, FleetLock, FleetToken, FleetTokens, LockAnswer, TokenSource, FLEET_WAIT_MARGIN,
};

pub struct FleetTokenStore {
    redis: Redis,
    keys: SharedKeys,
    token_key: String,
    lock_key: String,
    /// How long the renewal lock is held at most: one token request and the margin the
    /// waiters allow (`FLEET_WAIT_MARGIN`).
    lock_ttl: Duration,
    /// Each Redis call's bound (the refresher is off the requests' path).
    timeout: Duration,
}

impl FleetTokenStore {
    pub(in crate::cluster) fn new(
        link: std::sync::Arc<Link>,
        keys: SharedKeys,
        key_prefix: &str,
        talkdesk: &TalkdeskSettings,
        timeout: Duration,
        metrics: SharedMetrics,
    ) -> FleetTokenStore {
        let current = keys.current();
        let purpose = format!(
            "{}\n{}\n{}",
            talkdesk.token_url,
            talkdesk.client_id,
            talkdesk.scopes.join(" ")
        );
        let token_key = format!(
            "{key_prefix}:v1:token:{}:{}",
            current.id(),
            current.digest(purpose.as_bytes())
        );
        FleetTokenStore {
            redis: Redis { link, metrics },
            lock_key: format!("{token_key}:lock"),
            token_key,
            keys,
            lock_ttl: talkdesk.timeout + FLEET_WAIT_MARGIN,
            timeout,
        }
    }

    fn keys(&self) -> &KeySet {
        self.keys.current()
    }

    async fn run(&self, call: Call<'_>) -> Result<Value, Failure> {
        let connection = self
            .redis
            .link
            .get_or_wait_first(CONNECT_TIMEOUT)
            .await
            .ok_or_else(|| not_connected(None))?;
        self.redis
            .run_on(connection, Op::Token, self.timeout, call)
            .await
    }

    /// The token in `items` (id, sealed, lifetime ms, ms left). One that cannot be opened
    /// (sealed with another key, altered) counts as expired: it is renewed.
    fn token(&self, mut items: impl Iterator<Item = Value>) -> Option<FleetToken> {
        let id = u64::from_str_radix(&reply::text(items.next())?, 16).ok()?;
        let sealed = reply::bytes(items.next())?;
        let lifetime = reply::millis(items.next())?;
        let left = reply::millis(items.next())?;
        let authorization = self
            .keys()
            .open(self.token_key.as_bytes(), &sealed)
            .and_then(|plain| HeaderValue::from_bytes(&plain).ok())
            .map(|mut value| {
                value.set_sensitive(true);
                value
            });
        Some(match authorization {
            Some(authorization) => FleetToken {
                authorization,
                remaining: left,
                lifetime,
                id,
            },
            None => FleetToken {
                authorization: HeaderValue::from_static(""),
                remaining: Duration::ZERO,
                lifetime,
                id,
            },
        })
    }
}

impl FleetTokens for FleetTokenStore {
    fn read(&self) -> FleetFuture<'_, Result<Option<FleetToken>, Failure>> {
        Box::pin(async move {
            let answer = self.run(TOKEN_READ.call().key(&self.token_key)).await?;
            let items = reply::items(answer);
            if items.is_empty() {
                return Ok(None);
            }
            self.token(items.into_iter())
                .map(Some)
                .ok_or_else(|| Failure::msg("Redis answered the token read unexpectedly"))
        })
    }

    fn lock(&self, replacing: Option<u64>) -> FleetFuture<'_, Result<LockAnswer, Failure>> {
        Box::pin(async move {
            let lock = random_id();
            let call = TOKEN_LOCK
                .call()
                .key(&self.token_key)
                .key(&self.lock_key)
                .arg(replacing.map(|id| format!("{id:016x}")).unwrap_or_default())
                .arg(&lock)
                .arg(millis(self.lock_ttl));
            let mut items = reply::items(self.run(call).await?).into_iter();
            let answer = match reply::int(items.next()) {
                Some(1) => self.token(items).map(LockAnswer::Replaced),
                Some(2) => Some(LockAnswer::Locked(FleetLock(lock))),
                Some(3) => Some(LockAnswer::Held),
                _ => None,
            };
            answer.ok_or_else(|| Failure::msg("Redis answered the token lock unexpectedly"))
        })
    }

    fn store(
        &self,
        lock: FleetLock,
        authorization: HeaderValue,
        remaining: Duration,
        lifetime: Duration,
    ) -> FleetFuture<'_, Result<u64, Failure>> {
        Box::pin(async move {
            let id = rand::random::<u64>();
            let sealed = self
                .keys()
                .seal(self.token_key.as_bytes(), authorization.as_bytes())
                .ok_or_else(|| Failure::msg("the token could not be sealed"))?;
            let call = TOKEN_STORE
                .call()
                .key(&self.token_key)
                .key(&self.lock_key)
                .arg(format!("{id:016x}"))
                .arg(sealed)
                .arg(millis(lifetime).max(1))
                .arg(millis(remaining).max(1))
                .arg(&lock.0);
            self.run(call).await.map(|_| id)
        })
    }

    fn release(&self, lock: FleetLock) -> FleetFuture<'_, ()> {
        Box::pin(async move {
            let call = TOKEN_RELEASE.call().key(&self.lock_key).arg(&lock.0);
            let _ = self.run(call).await;
        })
    }

    fn installed(&self, source: TokenSource) {
        self.redis.metrics.token(source);
    }

    fn waiting_for_lock(&self) {
        self.redis.metrics.token_lock_wait();
    }
}
