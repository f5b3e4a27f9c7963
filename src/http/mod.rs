//! The HTTP side of the proxy: the listeners and what they answer.
//!
//! - [`server`]: accept loop, connection limits, TLS termination, graceful shutdown;
//! - [`routes`]: the consent listener (the two consent routes, and the token endpoint);
//! - [`token_endpoint`]: the proxy's own OAuth token endpoint (`POST /oauth/token`);
//! - [`admin`]: the admin listener (metrics, health, readiness, cache purge);
//! - [`body`]: the buffered body type and small answer helpers they share;
//! - [`credentials`]: `Authorization` schemes, Basic credentials and OAuth form bodies;
//! - [`oauth`]: token-endpoint plumbing shared with the simulator (client credentials, grant
//!   type, RFC 6749 answers).

pub mod admin;
pub mod body;
pub mod credentials;
pub mod oauth;
pub mod routes;
pub mod server;
pub mod token_endpoint;
