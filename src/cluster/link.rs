//! The connection Redis commands go over: the feed's publishing connection, present only while
//! its session is up. Announcements and the shared tier use it; while it is absent they do not
//! wait for Redis but go on without it. Every call over it is [`bounded`] in time.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::RedisResult;
use tokio::sync::Notify;

use crate::error::Failure;

#[derive(Default)]
pub(super) struct Link {
    connection: ArcSwapOption<MultiplexedConnection>,
    /// Set once the first session is up: until then a caller may wait a little for it.
    ever_connected: AtomicBool,
    connected: Notify,
}

impl Link {
    /// The connection, while the feed's session is up.
    pub fn get(&self) -> Option<MultiplexedConnection> {
        self.connection.load().as_deref().cloned()
    }

    pub fn is_up(&self) -> bool {
        self.connection.load().is_some()
    }

    /// The connection; before the first session is up, waits for it up to `wait` (a process
    /// starting must not count Redis as unavailable just because it is still connecting).
    pub async fn get_or_wait_first(&self, wait: Duration) -> Option<MultiplexedConnection> {
        let connected = self.connected.notified();
        if let Some(connection) = self.get() {
            return Some(connection);
        }
        if self.ever_connected.load(Ordering::Acquire) {
            return None;
        }
        let _ = tokio::time::timeout(wait, connected).await;
        self.get()
    }

    pub fn set(&self, connection: MultiplexedConnection) {
        self.connection.store(Some(Arc::new(connection)));
        self.ever_connected.store(true, Ordering::Release);
        self.connected.notify_waiters();
    }

    pub fn clear(&self) {
        self.connection.store(None);
    }
}

/// Why a call could not be made: the link is down (`why`, when it is known).
pub(super) fn not_connected(why: Option<String>) -> Failure {
    match why {
        Some(why) => Failure::msg(format!("not connected to Redis ({why})")),
        None => Failure::msg("not connected to Redis"),
    }
}

/// Awaits a Redis `call` for at most `timeout`: its error becomes `failed` (with the cause), a
/// timeout "`late` within N ms".
pub(super) async fn bounded<T>(
    timeout: Duration,
    failed: &'static str,
    late: &'static str,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(Failure::new(failed, err)),
        Err(_) => Err(Failure::msg(format!(
            "{late} within {} ms",
            timeout.as_millis()
        ))),
    }
}
