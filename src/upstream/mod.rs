//! Talking to Talkdesk: the consent-API client and what it stands on.
//!
//! - [`admission`]: what may be sent at all: upstream's Retry-After, the circuit breaker, the
//!   rate and concurrency budgets;
//! - [`client`]: builds consent requests, retries what is safe, renews the token on a 401;
//! - [`token`]: the one shared OAuth client-credentials token and its background refresher;
//! - [`backoff`]: exponential back-off with jitter, shared by the refresher and the retries;
//! - [`transport`]: the pooled outbound HTTP client (one attempt, bounded in time and size);
//! - [`egress`]: how its connections leave: directly, or through an HTTP proxy's CONNECT tunnel.

pub mod admission;
pub mod backoff;
pub mod client;
pub mod egress;
pub mod token;
pub mod transport;
