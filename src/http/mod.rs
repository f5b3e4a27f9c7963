//! The HTTP side of the proxy: the listeners and what they answer.
//!
//! - [`server`]: accept loop, connection limits, TLS termination, graceful shutdown;
//! - [`routes`]: the consent listener (the two consent routes);
//! - [`admin`]: the admin listener (metrics, health, readiness, cache purge);
//! - [`body`]: the buffered body type and small answer helpers they share;
//! - [`request_id`]: the `x-request-id` every answer of both listeners carries;
//! - [`credentials`]: `Authorization` schemes, Basic credentials and OAuth form bodies.

pub mod admin;
pub mod body;
pub mod credentials;
pub mod request_id;
pub mod routes;
pub mod server;
