//! HTTP plumbing that knows nothing of the product: the listener, buffered bodies, credential
//! parsing, the RFC 6749 token-endpoint plumbing and request ids. The proxy's handlers (`http`),
//! the caller authentication (`auth`), the error mapping (`error`) and the simulator stand on it;
//! it imports nothing of the crate but itself (`src/layering.rs` checks).
//!
//! - [`server`]: accept loop, connection limits, TLS termination, graceful shutdown;
//! - [`body`]: the buffered body type and small answer helpers;
//! - [`credentials`]: `Authorization` schemes, Basic credentials and OAuth form bodies;
//! - [`oauth`]: token-endpoint plumbing (client credentials, grant type, RFC 6749 answers);
//! - [`request_id`]: the `x-request-id` every answer of both listeners carries;
//! - [`forwarded`]: the caller's address behind trusted load balancers (`X-Forwarded-For`,
//!   `Forwarded`).

pub mod body;
pub mod credentials;
pub mod forwarded;
pub mod oauth;
pub mod request_id;
pub mod server;
