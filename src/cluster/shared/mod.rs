//! The cluster's shared tier: what the instances keep in their one Redis beside the feed.
//!
//! - `cache` (`cluster.shared_cache`): a second cache tier. A fill (a GET this instance's own
//!   cache missed) looks in Redis first; what it fetches from upstream it stores there for every
//!   instance, under a generation guard checked by Redis; one upstream GET for the whole fleet
//!   however many instances miss at once (a fill lock per contact). Writes and purges clear or
//!   replace the contact in Redis in the same round trip as their announcement.
//! - `token` (`cluster.shared_token`): the fleet's upstream token, encrypted in Redis, renewed
//!   by one instance at a time (a renewal lock); the token manager sees it as a
//!   [`FleetTokens`](crate::upstream::token::FleetTokens) store.
//! - `keys`: the secrets' derived keys (contact digests, sealing); `scripts`: the Lua scripts,
//!   whose module comment describes what is stored; `clock`: Redis' clock bounded against this
//!   instance's (to tell an answer read after a change this instance knows of); `metrics`.
//!
//! Redis is reached over the feed's connection. Every call is bounded in time, and whenever
//! Redis cannot answer (not connected, failing, slower than the bound) the instance goes on as
//! if it were alone: a fill goes upstream without storing, a token is fetched for this instance
//! only. Redis never fails a request.

mod cache;
mod clock;
mod keys;
mod metrics;
mod scripts;
mod token;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::FromRedisValue;
use tokio::time::Instant;

use super::link::{bounded, not_connected, Link};
use crate::error::Failure;
pub use cache::{FillReport, SharedCache, SharedCacheSettings, SharedWrite};
pub(super) use keys::SharedKeys;
use metrics::Op;
pub use metrics::SharedMetrics;
pub(super) use scripts::Call;
pub use token::FleetTokenStore;

/// Redis as the shared tier sees it: the feed's connection, each call bounded and timed.
struct Redis {
    link: Arc<Link>,
    metrics: SharedMetrics,
}

impl Redis {
    /// Runs `call` within `timeout` on the feed's connection; an error when it is down.
    async fn run<T: FromRedisValue>(
        &self,
        op: Op,
        timeout: Duration,
        call: Call<'_>,
    ) -> Result<T, Failure> {
        let connection = self.link.get().ok_or_else(|| not_connected(None))?;
        self.run_on(connection, op, timeout, call).await
    }

    async fn run_on<T: FromRedisValue>(
        &self,
        mut connection: MultiplexedConnection,
        op: Op,
        timeout: Duration,
        call: Call<'_>,
    ) -> Result<T, Failure> {
        let started = Instant::now();
        let result = bounded(
            timeout,
            "Redis failed",
            "Redis did not answer",
            call.run(&mut connection),
        )
        .await;
        self.metrics.redis_call(op, started.elapsed().as_secs_f64());
        result
    }
}

/// A random 64-bit value as hex: instance ids, generations, lock holders.
pub(super) fn random_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A duration as a script's millisecond argument.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Reads the parts of a script's array answer.
mod reply {
    use std::time::Duration;

    use redis::Value;

    pub fn items(value: Value) -> Vec<Value> {
        match value {
            Value::Array(items) => items,
            _ => Vec::new(),
        }
    }

    pub fn int(value: Option<Value>) -> Option<i64> {
        match value? {
            Value::Int(n) => Some(n),
            Value::BulkString(bytes) => std::str::from_utf8(&bytes).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// A count (never negative).
    pub fn count(value: Option<Value>) -> Option<u64> {
        u64::try_from(int(value)?).ok()
    }

    /// A count of milliseconds (never negative).
    pub fn millis(value: Option<Value>) -> Option<Duration> {
        Some(Duration::from_millis(u64::try_from(int(value)?).ok()?))
    }

    pub fn bytes(value: Option<Value>) -> Option<Vec<u8>> {
        match value? {
            Value::BulkString(bytes) => Some(bytes),
            Value::SimpleString(text) => Some(text.into_bytes()),
            _ => None,
        }
    }

    pub fn text(value: Option<Value>) -> Option<String> {
        String::from_utf8(bytes(value)?).ok()
    }
}
