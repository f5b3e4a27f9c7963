//! The connection Redis commands go over: the feed's publishing connection, present only while
//! its session is up. Announcements and the shared tier use it; while it is absent they do not
//! wait for Redis but go on without it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

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
