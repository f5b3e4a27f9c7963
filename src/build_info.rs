//! What this binary is: the crate version and the git commit it was built from (recorded by
//! `build.rs`; `unknown` when built outside a git checkout), for `--version` and the
//! `consent_proxy_build_info` metric.

/// The crate version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The abbreviated git commit, or `unknown`.
pub const COMMIT: &str = env!("CONSENT_PROXY_COMMIT");

/// What `consent-proxy --version` prints after the program name.
pub const VERSION_LINE: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CONSENT_PROXY_COMMIT"),
    ")"
);
