//! consent-proxy: a caching, token-sharing reverse proxy in front of Talkdesk's Voice
//! Biometrics consent API. See `docs/ARCHITECTURE.md` for how the modules fit together.
//!
//! The folders tell the story, from the network inwards; each imports only from the ones
//! below it (the `layering` tests check the floors, `docs/ARCHITECTURE.md` draws them):
//! - [`http`]: the proxy's handlers: the consent routes, the proxy's own OAuth token endpoint
//!   and the admin routes;
//! - [`service`]: the consent operations without HTTP (read through the cache, write through);
//! - [`audit`]: the audit trail of consent writes (SQLite or PostgreSQL, hash-chained);
//! - [`cluster`]: cluster mode: the caches of several instances kept coherent through Redis,
//!   and the shared tier (one cache and one upstream token for the fleet);
//! - [`cache`]: the consent-answer cache and the rules that keep it correct under writes;
//! - [`upstream`]: the Talkdesk client: admission (Retry-After, circuit breaker, budgets),
//!   retries, transport, the shared OAuth token;
//! - [`request`]: one request's context (id, deadline, caller, its last upstream attempt), lent
//!   from the handler through the service to the consent API;
//! - [`auth`]: who the caller is (API keys, the proxy's access tokens) and what it may do;
//! - [`consent`]: the domain (statuses, contact ids, bodies, answers), shared by everyone;
//! - [`wire`]: HTTP plumbing that knows nothing of the product (listener, bodies, credentials,
//!   OAuth form plumbing, request ids), shared by the handlers, `auth`, `error` and the simulator;
//! - [`clock`]: the wall clock, for times other processes read;
//! - [`jws`]: signed JWTs with ring's keys (the `private_key_jwt` client assertion, and the
//!   simulator's check of it);
//! - [`config`]: the configuration schema, its layers and its validation into [`config::Settings`];
//! - [`simulator`]: a Talkdesk stand-in for tests and `demo`; the product never uses it, and it
//!   uses only the product's shared plumbing (the `layering` tests check both).

pub mod app;
pub mod audit;
pub mod auth;
pub mod build_info;
pub mod cache;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod consent;
pub mod demo;
pub mod error;
pub mod http;
pub mod jws;
#[cfg(test)]
mod layering;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod request;
pub mod service;
pub mod simulator;
pub mod tls;
pub mod upstream;
pub mod wire;

pub use app::{App, AppHandle};
