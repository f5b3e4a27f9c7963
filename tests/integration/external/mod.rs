//! Tests that need a tool from outside Rust, each started or found by the test itself and a
//! loud failure when missing: PostgreSQL (the audit store), `redis-server` (cluster mode, the shared tier, cluster metrics),
//! `promtool` (the exposition and the alert rules), Node.js with `oidc-provider` (an independent
//! OAuth server as upstream token endpoint), a Python with Authlib (an independent OAuth client),
//! `tinyproxy` (a corporate forward proxy for egress), a Python with opentelemetry-proto (an
//! independent OTLP receiver).

mod audit_postgres;
mod cluster;
mod egress;
mod metrics_exposition;
mod oauth;
mod oidc_provider;
mod otel;
mod prometheus;
mod sentinel;
mod shared_tier;
