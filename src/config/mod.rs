//! Configuration: the runtime [`Settings`] and the entry points that load them.
//!
//! Layers, later wins: the built-in `config/default.toml` < `--config FILE` <
//! `CONSENT_PROXY__<SECTION>__<KEY>` environment variables. The file format is stated once, by
//! the serde structs in `schema`; `load` merges the layers and finds unknown keys, `validate`
//! turns the schema into `Settings` reporting every problem at once (each naming its key), and
//! `redact` prints the effective configuration without its secrets.

mod egress;
pub mod files;
mod introspect;
mod load;
mod log_level;
mod postgres_url;
mod problems;
mod redact;
mod redis_url;
mod schema;
mod secret_files;
mod suggest;
mod validate;

use std::{
    fmt,
    net::SocketAddr,
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use crate::wire::forwarded::TrustedProxies;

/// The built-in defaults, compiled into the binary (the lowest layer).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../config/default.toml");

/// Environment variables `CONSENT_PROXY__<SECTION>__<KEY>` override the files.
pub const ENV_PREFIX: &str = "CONSENT_PROXY";

/// The `client` metric label of unauthenticated requests; no configured client may take it.
pub const ANONYMOUS: &str = "anonymous";

/// What is shown in place of a secret.
pub use egress::ProxyEndpoint;

const REDACTED: &str = "<redacted>";

/// A secret string: `Debug` and `Display` print `<redacted>`; read it with [`Secret::expose`].
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// The validated, effective configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub log: LogSettings,
    pub talkdesk: TalkdeskSettings,
    pub egress: EgressSettings,
    pub token: TokenSettings,
    pub cache: CacheSettings,
    /// `None` when `cluster.redis_url` and `cluster.sentinels` are empty: this instance runs alone.
    pub cluster: Option<ClusterSettings>,
    pub oauth: OAuthSettings,
    pub audit: AuditSettings,
    pub clients: Vec<ClientSettings>,
    pub auth: AuthSettings,
    /// `None` when `otel.endpoint` is empty: no traces.
    pub otel: Option<OtelSettings>,
    /// The configuration as loaded, secrets already replaced: what [`Settings::redacted_toml`] prints.
    redacted: schema::ConfigFile,
    /// What is worth a warning though valid (a secret file others can read), each naming its
    /// key: printed by `check-config`, logged at start.
    warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `Some` when both `tls_cert_file` and `tls_key_file` are set.
    pub tls: Option<TlsFiles>,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// A kept-alive connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    /// The kernel's accept queue of each listener (at least 1).
    pub listen_backlog: u32,
    /// Load balancers whose `X-Forwarded-For` / `Forwarded` name the caller's address.
    pub trusted_proxies: TrustedProxies,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    /// `info`, or any tracing filter (checked when loaded).
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    Com,
    Eu,
    Ca,
    Au,
}

impl Region {
    pub const ALL: [Region; 4] = [Region::Com, Region::Eu, Region::Ca, Region::Au];

    pub fn as_str(self) -> &'static str {
        match self {
            Region::Com => "com",
            Region::Eu => "eu",
            Region::Ca => "ca",
            Region::Au => "au",
        }
    }

    /// Talkdesk's API base URL for this region (no trailing slash).
    pub fn api_base_url(self) -> &'static str {
        match self {
            Region::Com => "https://api.talkdeskapp.com",
            Region::Eu => "https://api.talkdeskapp.eu",
            Region::Ca => "https://api.talkdeskappca.com",
            Region::Au => "https://api.talkdeskapp.au",
        }
    }

    /// Talkdesk's OAuth token endpoint for `account` in this region.
    pub fn token_url(self, account: &str) -> String {
        let domain = match self {
            Region::Com => "talkdeskid.com",
            Region::Eu => "talkdeskid.eu",
            Region::Ca => "talkdeskidca.com",
            Region::Au => "talkdeskid.au",
        };
        format!("https://{account}.{domain}/oauth/token")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret_basic`: credentials in the `Authorization: Basic` header.
    Basic,
    /// `client_secret_post`: credentials in the form body.
    Post,
    /// `private_key_jwt` (RFC 7523): a JWT signed with the client's private key, no secret.
    PrivateKeyJwt,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Basic => "basic",
            ClientAuth::Post => "post",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
        }
    }
}

/// The client's credential at Talkdesk's token endpoint, and how it is presented.
#[derive(Debug, Clone)]
pub enum ClientCredential {
    /// `basic` or `post`: the client secret.
    Secret { secret: Secret, auth: ClientAuth },
    /// `private_key_jwt`: a fresh assertion per token request, signed with this key.
    PrivateKey {
        key: Arc<crate::jws::SigningKey>,
        key_id: String,
    },
}

impl ClientCredential {
    pub fn client_auth(&self) -> ClientAuth {
        match self {
            ClientCredential::Secret { auth, .. } => *auth,
            ClientCredential::PrivateKey { .. } => ClientAuth::PrivateKeyJwt,
        }
    }

    /// The client secret, when that is the credential.
    pub fn secret(&self) -> Option<&Secret> {
        match self {
            ClientCredential::Secret { secret, .. } => Some(secret),
            ClientCredential::PrivateKey { .. } => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TalkdeskSettings {
    pub account: String,
    pub region: Region,
    /// Effective (derived from the region when not configured), no trailing slash.
    pub api_base_url: String,
    /// Effective (derived from region and account when not configured).
    pub token_url: String,
    pub client_id: String,
    /// How the proxy proves who it is at the token endpoint.
    pub client_credential: ClientCredential,
    pub scopes: Vec<String>,
    pub timeout: Duration,
    pub max_retries: u32,
    pub max_response_bytes: usize,
    /// Upstream requests in flight at once (at least 1); more wait within their deadline.
    pub max_concurrent: usize,
    /// A token bucket in front of the account's rate limit; `None`: no limit.
    pub max_requests_per_s: Option<NonZeroU32>,
    /// The circuit breaker in front of upstream; `None`: no breaker.
    pub breaker: Option<BreakerSettings>,
}

/// How the proxy reaches Talkdesk: through which HTTP proxy, trusting which roots.
#[derive(Debug, Clone, Default)]
pub struct EgressSettings {
    /// `egress.proxy_url` (or `_file`); `None`: the environment's proxy variables decide,
    /// read when the transport is built (`upstream::egress`).
    pub proxy: Option<ProxyEndpoint>,
    /// `egress.ca_file`: roots trusted in addition to the built-in ones.
    pub extra_roots: Option<ExtraRoots>,
}

/// Roots from `egress.ca_file`, each validated as a trust anchor, with the file's PEM (the
/// Redis client takes PEM).
#[derive(Debug, Clone)]
pub struct ExtraRoots {
    pub certificates: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub pem: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    /// Consecutive failed upstream attempts (connect error, timeout, 5xx) that open the circuit.
    pub failures: NonZeroU32,
    /// How long an open circuit waits before letting one probe through.
    pub cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// Greater than zero.
    pub refresh_margin: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub enabled: bool,
    pub ttl: Duration,
    /// Zero: 404 answers are not cached.
    pub not_found_ttl: Duration,
    pub max_entries: u64,
    /// How long past its TTL an entry may answer when upstream cannot; `None`: never.
    pub stale_if_error: Option<Duration>,
    /// A hit this close to its TTL's end starts one background refresh; `None`: never.
    /// Shorter than `ttl`.
    pub refresh_ahead: Option<Duration>,
}

/// Several instances kept coherent through Redis.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `redis[s]://[user@]host:port/db`, never with a password in it: safe to log. With
    /// sentinels, `sentinel://<master name>`: what the logs call the Redis.
    pub redis_url: String,
    /// `cluster.sentinels`: the master is whichever node they name (and `redis_url` is not a
    /// node to connect to).
    pub sentinel: Option<SentinelSettings>,
    /// From the configured URL or `cluster.redis_password_file`.
    pub redis_password: Option<Secret>,
    /// Namespaces every Redis key and channel (non-empty, no whitespace).
    pub key_prefix: String,
    pub max_staleness: Duration,
    pub write_policy: WritePolicy,
    /// A second cache tier in Redis, shared by every instance.
    pub shared_cache: bool,
    /// One upstream token for the fleet, kept in Redis.
    pub shared_token: bool,
    /// The shared tier's secrets, the one in use first; empty unless `shared_cache` or
    /// `shared_token` is on (then at least one, each at least 32 bytes).
    pub shared_keys: Vec<Secret>,
    /// The longest a GET waits for each Redis call of the shared tier.
    pub shared_timeout: Duration,
    /// `egress.ca_file`'s PEM: with `rediss://`, the roots Redis' certificate must chain to
    /// (the Redis client takes one set of roots: these replace the built-in ones).
    pub tls_roots_pem: Option<Vec<u8>>,
}

/// Redis Sentinels that name the cluster's master.
#[derive(Debug, Clone)]
pub struct SentinelSettings {
    /// `(host, port)` of each sentinel; at least one.
    pub sentinels: Vec<(String, u16)>,
    /// The master's name as the sentinels know it.
    pub master: String,
    /// TLS to the sentinels and to the data nodes they name.
    pub tls: bool,
    /// `cluster.sentinel_password_file`.
    pub password: Option<Secret>,
}

/// What a PUT does when it cannot first announce itself to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePolicy {
    /// Refuse it with 503 `cluster_unavailable`; upstream is not called.
    Require,
    /// Go ahead; other instances may be stale up to `cache.ttl_s`.
    BestEffort,
}

impl WritePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            WritePolicy::Require => "require",
            WritePolicy::BestEffort => "best_effort",
        }
    }
}

/// OpenTelemetry trace export (`[otel]`, when `endpoint` is set).
#[derive(Debug, Clone)]
pub struct OtelSettings {
    /// The collector's base URL; spans are POSTed to `{endpoint}/v1/traces`.
    pub endpoint: String,
    pub service_name: String,
    /// Of the traces started here (0 to 1); a caller's sampled `traceparent` is always followed.
    pub sample_ratio: f64,
}

/// The proxy's own OAuth 2.0 token endpoint for callers.
#[derive(Debug, Clone)]
pub struct OAuthSettings {
    pub enabled: bool,
    /// Lifetime of the access tokens it issues (greater than zero).
    pub token_ttl: Duration,
    /// The first signs, all verify (so a key can be rotated in); each at least 32 bytes.
    /// Empty: a random key per process.
    pub signing_keys: Vec<Secret>,
}

/// The audit trail (`[audit]`).
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub enabled: bool,
    /// `Some` whenever the store's keys are set (always when `enabled`): `consent-proxy audit
    /// export|verify` read a store also while the proxy does not write to it.
    pub store: Option<AuditStoreSettings>,
    /// The chain's keys, the one that keys new chains first; at least one when `enabled`.
    pub chain_keys: Vec<Secret>,
    /// Records older than this are removed; `None`: kept forever.
    pub retention: Option<Duration>,
    pub write_policy: WritePolicy,
}

/// Where the audit trail is kept.
#[derive(Debug, Clone)]
pub enum AuditStoreSettings {
    Sqlite {
        path: PathBuf,
    },
    Postgres {
        /// `postgres://user@host:port/db?...`, never with a password in it: safe to log.
        url: String,
        /// From `audit.postgres_password_file`.
        password: Option<Secret>,
    },
}

impl AuditStoreSettings {
    pub fn kind(&self) -> &'static str {
        match self {
            AuditStoreSettings::Sqlite { .. } => AuditStoreKind::Sqlite.as_str(),
            AuditStoreSettings::Postgres { .. } => AuditStoreKind::Postgres.as_str(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditStoreKind {
    Sqlite,
    Postgres,
}

impl AuditStoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditStoreKind::Sqlite => "sqlite",
            AuditStoreKind::Postgres => "postgres",
        }
    }
}

/// What a client may do: read = GET, write = PUT, admin = `/admin/*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Permissions {
    pub read: bool,
    pub write: bool,
    pub admin: bool,
}

/// A caller of the proxy. `Debug` does not print the key hash.
#[derive(Clone)]
pub struct ClientSettings {
    pub name: String,
    /// SHA-256 of the client's API key.
    pub key_sha256: [u8; 32],
    pub permissions: Permissions,
}

impl ClientSettings {
    /// How a client's key is kept and compared: its SHA-256 digest.
    pub fn key_digest(key: &[u8]) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(key).into()
    }
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSettings")
            .field("name", &self.name)
            .field("key_sha256", &format_args!("{REDACTED}"))
            .field("permissions", &self.permissions)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub required: bool,
}

/// All problems found, each naming its key. Display: one problem per line.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

impl Settings {
    /// defaults < file < the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigErrors> {
        load::from_file_and_process_env(file)
    }

    /// defaults < this TOML text (no environment); for tests and the demo.
    pub fn from_toml_str(toml: &str) -> Result<Settings, ConfigErrors> {
        load::from_toml_str(toml)
    }

    /// The effective configuration as TOML, for `check-config` and the start-up log: every
    /// section, derived URLs filled in, secrets as `<redacted>`, nothing of the clients' keys.
    pub fn redacted_toml(&self) -> String {
        redact::to_toml(&self.redacted)
    }

    /// The warnings found while loading, each naming its key.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

#[cfg(test)]
mod test_support;

pub use postgres_url::PostgresUrl;
