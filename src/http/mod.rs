//! The proxy's HTTP handlers, standing on the plumbing in [`crate::wire`].
//!
//! - [`routes`]: the consent listener (the two consent routes, and the token endpoint);
//! - [`token_endpoint`]: the proxy's own OAuth token endpoint (`POST /oauth/token`);
//! - [`admin`]: the admin listener (metrics, health, readiness, cache purge).

pub mod admin;
pub mod routes;
pub mod token_endpoint;
