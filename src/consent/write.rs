//! How a write of a contact's consent ended: what the cache, the cluster's announcements and
//! their wire format all need to know of it.

use super::ConsentStatus;

/// How a write through the proxy ended.
#[derive(Debug, Clone, Copy)]
pub enum WriteOutcome {
    /// Upstream answered 2xx: the contact's status is now this.
    Applied(ConsentStatus),
    /// Upstream refused it (an error answer, or no connection): nothing changed.
    NotApplied,
    /// It may or may not have been applied (timeout, connection lost after sending).
    Unknown,
}
