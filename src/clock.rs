//! The wall clock, for times other processes read: token expiries, the cluster's send times,
//! the token expiry metric. Everything timed within the process uses tokio's `Instant`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The wall clock since the Unix epoch (zero before 1970).
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
