//! consent-proxy's integration tests: one test binary (one compile and link of `support`), a
//! module per concern. Each test starts what it needs on loopback: the in-process simulator or
//! a purpose-built fake upstream, and the proxy on port 0 (or the binary, for the command line).
//! `tests/README.md` maps behaviours to modules and harness calls.
//!
//! The modules under [`external`] also need tools from outside Rust (`redis-server`, `promtool`,
//! Node.js with `oidc-provider`, a Python with Authlib, `tinyproxy`); `scripts/test.sh` installs and provides
//! them, and a test whose tool is missing fails loudly, never passes. Without them:
//! `cargo test --test integration -- --skip external::`.

mod support;

mod admin_listener;
mod audit;
mod auth_throttle;
mod cache;
mod cli;
mod client_assertion;
mod docs;
mod hostile_clients;
mod hostile_upstreams;
mod kubernetes;
mod logs;
mod openapi;
mod properties;
mod proxy_api;
mod resilience;
mod retries;
mod smoke;
mod soak;
mod tls;
mod token;

mod external;
