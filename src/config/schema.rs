//! The file format: serde structs that mirror `config/default.toml` key for key. They are the
//! one statement of which keys exist: unknown keys, "did you mean" suggestions and the printed
//! effective configuration all come from them.
//!
//! Every key is a [`Field`], read on its own: a bad value becomes a problem naming its key
//! instead of failing the whole file, and a value from the environment (always a string) is
//! parsed into the key's type. Defaults are not here: the default layer always supplies every
//! section key (a unit test holds `config/default.toml` to that).

use config::{Value, ValueKind};
use serde::{ser::Error as _, Deserialize, Deserializer, Serialize, Serializer};

use super::{AuditStoreKind, ClientAuth, LogFormat, Region, WritePolicy};
use crate::jws::Algorithm;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct ConfigFile {
    pub server: Server,
    pub log: Log,
    pub talkdesk: Talkdesk,
    pub egress: Egress,
    pub token: Token,
    pub cache: Cache,
    pub cluster: Cluster,
    pub oauth: OAuth,
    pub audit: Audit,
    pub auth: Auth,
    pub otel: Otel,
    /// Only from a file: the shipped defaults have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<Client>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Server {
    pub listen: Field<String>,
    pub admin_listen: Field<String>,
    pub tls_cert_file: Field<String>,
    pub tls_key_file: Field<String>,
    pub max_body_bytes: Field<u64>,
    pub max_header_bytes: Field<u64>,
    pub header_read_timeout_ms: Field<u64>,
    pub idle_timeout_ms: Field<u64>,
    pub request_timeout_ms: Field<u64>,
    pub shutdown_grace_ms: Field<u64>,
    pub max_connections: Field<u64>,
    pub listen_backlog: Field<u32>,
    pub trusted_proxies: Field<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Log {
    pub level: Field<String>,
    pub format: Field<LogFormat>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Talkdesk {
    pub account: Field<String>,
    pub region: Field<Region>,
    pub api_base_url: Field<String>,
    pub token_url: Field<String>,
    pub client_id: Field<String>,
    pub client_secret: Field<String>,
    pub client_secret_file: Field<String>,
    pub client_auth: Field<ClientAuth>,
    pub private_key_file: Field<String>,
    pub key_id: Field<String>,
    pub key_algorithm: Field<Algorithm>,
    pub scopes: Field<Vec<String>>,
    pub timeout_ms: Field<u64>,
    pub max_retries: Field<u32>,
    pub max_response_bytes: Field<u64>,
    pub max_concurrent: Field<u64>,
    pub max_requests_per_s: Field<u32>,
    pub breaker_failures: Field<u32>,
    pub breaker_cooldown_ms: Field<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Egress {
    pub proxy_url: Field<String>,
    pub proxy_url_file: Field<String>,
    pub ca_file: Field<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Token {
    pub refresh_margin_s: Field<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Cache {
    pub enabled: Field<bool>,
    pub ttl_s: Field<u64>,
    pub not_found_ttl_s: Field<u64>,
    pub max_entries: Field<u64>,
    pub stale_if_error_s: Field<u64>,
    pub refresh_ahead_s: Field<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Cluster {
    pub redis_url: Field<String>,
    pub sentinels: Field<Vec<String>>,
    pub sentinel_master: Field<String>,
    pub sentinel_password_file: Field<String>,
    pub redis_password_file: Field<String>,
    pub key_prefix: Field<String>,
    pub max_staleness_ms: Field<u64>,
    pub write_policy: Field<WritePolicy>,
    pub shared_cache: Field<bool>,
    pub shared_token: Field<bool>,
    pub shared_key_file: Field<String>,
    pub shared_timeout_ms: Field<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct OAuth {
    pub enabled: Field<bool>,
    pub token_ttl_s: Field<u64>,
    pub signing_key_file: Field<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Otel {
    pub endpoint: Field<String>,
    pub service_name: Field<String>,
    pub sample_ratio: Field<f64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Audit {
    pub enabled: Field<bool>,
    pub store: Field<AuditStoreKind>,
    pub sqlite_path: Field<String>,
    pub postgres_url: Field<String>,
    pub postgres_password_file: Field<String>,
    pub chain_key_file: Field<String>,
    pub retention_days: Field<u64>,
    pub write_policy: Field<WritePolicy>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Auth {
    pub required: Field<bool>,
}

/// One `[[clients]]` entry. No default layer fills it, so every key is optional here and
/// validation says which are required.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct Client {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Field<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Field<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<Field<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_sha256: Option<Field<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Field<Vec<String>>>,
}

/// One key's value, or what is wrong with it ("expected ..., got ...", without the key name:
/// validation adds it).
#[derive(Debug, Clone)]
pub(super) struct Field<T>(pub Result<T, String>);

impl<T> From<T> for Field<T> {
    fn from(value: T) -> Self {
        Field(Ok(value))
    }
}

impl<'de, T: Leaf> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Whatever the value is, it is captured whole, so a wrong one fails only this key.
        let value = Value::deserialize(deserializer)?;
        Ok(Field(T::from_value(value)))
    }
}

impl<T: Leaf> Serialize for Field<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Ok(value) => value.to_toml().serialize(serializer),
            Err(problem) => Err(S::Error::custom(problem)),
        }
    }
}

/// A type a key can hold: read from the merged configuration, written back as TOML.
pub(super) trait Leaf: Sized {
    fn from_value(value: Value) -> Result<Self, String>;
    fn to_toml(&self) -> toml::Value;
}

/// "expected {what}, got {value}"; strings are quoted, which is safe because a secret is a
/// string key and a string is never the wrong type for one.
fn expected(what: &str, value: &Value) -> String {
    let got = match &value.kind {
        ValueKind::Nil => "nothing".to_owned(),
        ValueKind::Boolean(b) => format!("boolean {b}"),
        ValueKind::I64(n) => format!("integer {n}"),
        ValueKind::I128(n) => format!("integer {n}"),
        ValueKind::U64(n) => format!("integer {n}"),
        ValueKind::U128(n) => format!("integer {n}"),
        ValueKind::Float(x) => format!("float {x}"),
        ValueKind::String(s) => format!("string {s:?}"),
        ValueKind::Table(_) => "a table".to_owned(),
        ValueKind::Array(_) => "an array".to_owned(),
    };
    format!("expected {what}, got {got}")
}

/// A TOML integer, or a decimal string from the environment.
fn integer(value: &Value) -> Option<i64> {
    match &value.kind {
        ValueKind::I64(n) => Some(*n),
        ValueKind::U64(n) => i64::try_from(*n).ok(),
        ValueKind::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Leaf for u64 {
    fn from_value(value: Value) -> Result<Self, String> {
        integer(&value)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| expected("a non-negative integer", &value))
    }

    fn to_toml(&self) -> toml::Value {
        // Read from an i64 (TOML's integers), so it fits back into one.
        toml::Value::Integer(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl Leaf for u32 {
    fn from_value(value: Value) -> Result<Self, String> {
        integer(&value)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| expected("an integer from 0 to 4294967295", &value))
    }

    fn to_toml(&self) -> toml::Value {
        toml::Value::Integer(i64::from(*self))
    }
}

impl Leaf for f64 {
    fn from_value(value: Value) -> Result<Self, String> {
        match &value.kind {
            ValueKind::Float(x) => Some(*x),
            ValueKind::I64(n) => Some(*n as f64),
            ValueKind::U64(n) => Some(*n as f64),
            ValueKind::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .filter(|x: &f64| x.is_finite())
        .ok_or_else(|| expected("a number", &value))
    }

    fn to_toml(&self) -> toml::Value {
        toml::Value::Float(*self)
    }
}

impl Leaf for bool {
    fn from_value(value: Value) -> Result<Self, String> {
        match &value.kind {
            ValueKind::Boolean(b) => Ok(*b),
            // From the environment.
            ValueKind::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(expected("a boolean (true or false)", &value)),
            },
            _ => Err(expected("a boolean (true or false)", &value)),
        }
    }

    fn to_toml(&self) -> toml::Value {
        toml::Value::Boolean(*self)
    }
}

impl Leaf for String {
    fn from_value(value: Value) -> Result<Self, String> {
        match value.kind {
            ValueKind::String(s) => Ok(s),
            _ => Err(expected("a string", &value)),
        }
    }

    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.clone())
    }
}

/// A list of strings: a TOML array, or from the environment one string of items separated by
/// commas or spaces.
impl Leaf for Vec<String> {
    fn from_value(value: Value) -> Result<Self, String> {
        match &value.kind {
            ValueKind::Array(items) => items
                .iter()
                .map(|item| match &item.kind {
                    ValueKind::String(s) => Some(s.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| expected("an array of strings", &value)),
            ValueKind::String(s) => Ok(s
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect()),
            _ => Err(expected("an array of strings", &value)),
        }
    }

    fn to_toml(&self) -> toml::Value {
        toml::Value::Array(self.iter().cloned().map(toml::Value::String).collect())
    }
}

/// A key whose value is one of a few names (`region = "eu"`).
pub(super) trait Choice: Copy + 'static {
    /// What a value is, in messages: `"us" is not a region`.
    const WHAT: &'static str;
    /// Every value, in the order messages list them.
    const ALL: &'static [Self];
    fn name(self) -> &'static str;
}

impl<T: Choice> Leaf for T {
    fn from_value(value: Value) -> Result<Self, String> {
        let allowed = || {
            let names: Vec<_> = T::ALL.iter().map(|choice| choice.name()).collect();
            names.join(", ")
        };
        match &value.kind {
            ValueKind::String(s) => T::ALL
                .iter()
                .copied()
                .find(|choice| choice.name() == s)
                .ok_or_else(|| format!("{s:?} is not a {}; allowed: {}", T::WHAT, allowed())),
            _ => Err(expected(&format!("one of {}", allowed()), &value)),
        }
    }

    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.name().to_owned())
    }
}

impl Choice for LogFormat {
    const WHAT: &'static str = "log format";
    const ALL: &'static [Self] = &[LogFormat::Text, LogFormat::Json];
    fn name(self) -> &'static str {
        self.as_str()
    }
}

impl Choice for Region {
    const WHAT: &'static str = "region";
    const ALL: &'static [Self] = &Region::ALL;
    fn name(self) -> &'static str {
        self.as_str()
    }
}

impl Choice for ClientAuth {
    const WHAT: &'static str = "client authentication method";
    const ALL: &'static [Self] = &[
        ClientAuth::Basic,
        ClientAuth::Post,
        ClientAuth::PrivateKeyJwt,
    ];
    fn name(self) -> &'static str {
        self.as_str()
    }
}

impl Choice for Algorithm {
    const WHAT: &'static str = "key algorithm";
    const ALL: &'static [Self] = &Algorithm::ALL;
    fn name(self) -> &'static str {
        self.as_str()
    }
}

impl Choice for WritePolicy {
    const WHAT: &'static str = "write policy";
    const ALL: &'static [Self] = &[WritePolicy::Require, WritePolicy::BestEffort];
    fn name(self) -> &'static str {
        self.as_str()
    }
}

impl Choice for AuditStoreKind {
    const WHAT: &'static str = "audit store";
    const ALL: &'static [Self] = &[AuditStoreKind::Sqlite, AuditStoreKind::Postgres];
    fn name(self) -> &'static str {
        self.as_str()
    }
}
