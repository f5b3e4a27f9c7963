//! consent-proxy: a caching, token-sharing reverse proxy in front of Talkdesk's Voice
//! Biometrics consent API. See `docs/ARCHITECTURE.md` for how the modules fit together.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cache;
pub mod config;
pub mod consent;
pub mod demo;
pub mod error;
pub mod http_util;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod simulator;
pub mod token;
pub mod transport;
pub mod upstream;

pub use app::{App, AppHandle};

/// Sent upstream as `User-Agent`.
pub const USER_AGENT: &str = concat!("consent-proxy/", env!("CARGO_PKG_VERSION"));
