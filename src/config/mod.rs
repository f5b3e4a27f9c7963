//! Configuration: load the layered configuration (built-in `config/default.toml` <
//! `--config FILE` < `CONSENT_PROXY__<SECTION>__<KEY>` environment variables) and validate it
//! into the runtime [`Settings`], reporting every problem at once, each naming its key.
//!
//! Pipeline: the `config` crate merges the layers into a generic value tree; that tree is walked
//! against the table of known keys ([`SECTIONS`], [`CLIENT_KEYS`]), which reports unknown keys and
//! type mismatches and turns environment strings into numbers, booleans and lists; the result is
//! deserialised into private `Raw*` structs (serde, `deny_unknown_fields`) and finally validated
//! into [`Settings`].

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::{self, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use config::{Config, Environment, File, FileFormat, Value, ValueKind};
use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{Map as JsonMap, Value as Json};
use sha2::{Digest, Sha256};

/// The built-in defaults, compiled into the binary (the lowest layer).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../config/default.toml");

/// Environment variables `CONSENT_PROXY__<SECTION>__<KEY>` override the files.
pub const ENV_PREFIX: &str = "CONSENT_PROXY";
const ENV_SEPARATOR: &str = "__";
/// The origin the `config` crate gives values that come from the environment.
const ENV_ORIGIN: &str = "the environment";
/// What `redacted_toml` prints in place of a secret.
const REDACTED: &str = "<redacted>";

// ---------------------------------------------------------------------------------------------
// Public runtime settings
// ---------------------------------------------------------------------------------------------

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
    pub token: TokenSettings,
    pub cache: CacheSettings,
    pub clients: Vec<ClientSettings>,
    pub auth: AuthSettings,
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
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    /// `info`, or any tracing filter (not checked here).
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

    fn parse(s: &str) -> Option<Region> {
        Region::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret_basic`: credentials in the `Authorization: Basic` header.
    Basic,
    /// `client_secret_post`: credentials in the form body.
    Post,
}

impl ClientAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::Basic => "basic",
            ClientAuth::Post => "post",
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
    pub client_secret: Secret,
    pub client_auth: ClientAuth,
    pub scopes: Vec<String>,
    pub timeout: Duration,
    pub max_retries: u32,
    pub max_response_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct TokenSettings {
    pub refresh_margin: Duration,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub enabled: bool,
    pub ttl: Duration,
    /// Zero: 404 answers are not cached.
    pub not_found_ttl: Duration,
    pub max_entries: u64,
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
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(problem)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// SHA-256 of `bytes` (how client API keys are stored and compared).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Settings {
    /// defaults < file < the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigErrors> {
        let mut problems = Vec::new();
        let mut env = HashMap::new();
        let prefix = env_prefix_lower();
        for (key, value) in std::env::vars_os() {
            // Variables that are not ours are left alone, whatever their encoding.
            let Some(key) = key.to_str().map(str::to_owned) else {
                continue;
            };
            if !key.to_lowercase().starts_with(&prefix) {
                continue;
            }
            match value.into_string() {
                Ok(value) => {
                    env.insert(key, value);
                }
                Err(_) => problems.push(format!("environment variable {key} is not valid UTF-8")),
            }
        }
        let result = Self::load_with_env(file, env);
        if problems.is_empty() {
            return result;
        }
        if let Err(ConfigErrors(more)) = result {
            problems.extend(more);
        }
        Err(ConfigErrors(problems))
    }

    /// defaults < file < the given environment map (keys like "CONSENT_PROXY__SERVER__LISTEN"); for tests.
    pub fn load_with_env(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Settings, ConfigErrors> {
        let file_layer = match file {
            None => None,
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some((format!("config file '{}'", path.display()), text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ConfigErrors(vec![format!(
                        "config file '{}' not found",
                        path.display()
                    )]))
                }
                Err(e) => {
                    return Err(ConfigErrors(vec![format!(
                        "cannot read config file '{}': {e}",
                        path.display()
                    )]))
                }
            },
        };
        build(file_layer, Some(env))
    }

    /// defaults < this TOML text (no environment); for tests and the demo.
    pub fn from_toml_str(toml: &str) -> Result<Settings, ConfigErrors> {
        build(Some(("configuration".to_owned(), toml.to_owned())), None)
    }

    /// The effective configuration as TOML, for `check-config`: every section, derived URLs
    /// filled in, `client_secret = "<redacted>"`, and nothing of the clients' keys.
    pub fn redacted_toml(&self) -> String {
        let mut out = String::new();
        let s = &self.server;
        let (cert, key) = match &s.tls {
            Some(tls) => (
                tls.cert_file.display().to_string(),
                tls.key_file.display().to_string(),
            ),
            None => (String::new(), String::new()),
        };
        section(&mut out, "server");
        kv(&mut out, "listen", quote(&s.listen.to_string()));
        kv(&mut out, "admin_listen", quote(&s.admin_listen.to_string()));
        kv(&mut out, "tls_cert_file", quote(&cert));
        kv(&mut out, "tls_key_file", quote(&key));
        kv(&mut out, "max_body_bytes", s.max_body_bytes);
        kv(&mut out, "max_header_bytes", s.max_header_bytes);
        kv(
            &mut out,
            "header_read_timeout_ms",
            s.header_read_timeout.as_millis(),
        );
        kv(
            &mut out,
            "request_timeout_ms",
            s.request_timeout.as_millis(),
        );
        kv(&mut out, "shutdown_grace_ms", s.shutdown_grace.as_millis());
        kv(&mut out, "max_connections", s.max_connections);

        section(&mut out, "log");
        kv(&mut out, "level", quote(&self.log.level));
        kv(&mut out, "format", quote(self.log.format.as_str()));

        let t = &self.talkdesk;
        section(&mut out, "talkdesk");
        kv(&mut out, "account", quote(&t.account));
        kv(&mut out, "region", quote(t.region.as_str()));
        kv(&mut out, "api_base_url", quote(&t.api_base_url));
        kv(&mut out, "token_url", quote(&t.token_url));
        kv(&mut out, "client_id", quote(&t.client_id));
        kv(&mut out, "client_secret", quote(REDACTED));
        kv(&mut out, "client_auth", quote(t.client_auth.as_str()));
        kv(
            &mut out,
            "scopes",
            quote_list(t.scopes.iter().map(String::as_str)),
        );
        kv(&mut out, "timeout_ms", t.timeout.as_millis());
        kv(&mut out, "max_retries", t.max_retries);
        kv(&mut out, "max_response_bytes", t.max_response_bytes);

        section(&mut out, "token");
        kv(
            &mut out,
            "refresh_margin_s",
            self.token.refresh_margin.as_secs(),
        );

        let c = &self.cache;
        section(&mut out, "cache");
        kv(&mut out, "enabled", c.enabled);
        kv(&mut out, "ttl_s", c.ttl.as_secs());
        kv(&mut out, "not_found_ttl_s", c.not_found_ttl.as_secs());
        kv(&mut out, "max_entries", c.max_entries);

        section(&mut out, "auth");
        kv(&mut out, "required", self.auth.required);

        for client in &self.clients {
            out.push_str("\n[[clients]]\n");
            kv(&mut out, "name", quote(&client.name));
            let p = client.permissions;
            let perms = [("read", p.read), ("write", p.write), ("admin", p.admin)]
                .into_iter()
                .filter(|(_, on)| *on)
                .map(|(name, _)| name);
            kv(&mut out, "permissions", quote_list(perms));
            out.push_str("# API key: configured (not shown)\n");
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Redacted TOML output helpers
// ---------------------------------------------------------------------------------------------

fn section(out: &mut String, name: &str) {
    if !out.is_empty() {
        out.push('\n');
    }
    let _ = writeln!(out, "[{name}]");
}

fn kv(out: &mut String, key: &str, value: impl fmt::Display) {
    let _ = writeln!(out, "{key} = {value}");
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for ch in s.chars() {
        match ch {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\r' => q.push_str("\\r"),
            '\t' => q.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04X}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn quote_list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let items: Vec<String> = items.map(quote).collect();
    format!("[{}]", items.join(", "))
}

// ---------------------------------------------------------------------------------------------
// The table of known keys
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    /// A non-negative integer.
    UInt,
    Bool,
    StrList,
}

use Kind::{Bool, Str, StrList, UInt};

/// Every key of every `[section]`; `[[clients]]` is separate ([`CLIENT_KEYS`]).
const SECTIONS: &[(&str, &[(&str, Kind)])] = &[
    (
        "server",
        &[
            ("listen", Str),
            ("admin_listen", Str),
            ("tls_cert_file", Str),
            ("tls_key_file", Str),
            ("max_body_bytes", UInt),
            ("max_header_bytes", UInt),
            ("header_read_timeout_ms", UInt),
            ("request_timeout_ms", UInt),
            ("shutdown_grace_ms", UInt),
            ("max_connections", UInt),
        ],
    ),
    ("log", &[("level", Str), ("format", Str)]),
    (
        "talkdesk",
        &[
            ("account", Str),
            ("region", Str),
            ("api_base_url", Str),
            ("token_url", Str),
            ("client_id", Str),
            ("client_secret", Str),
            ("client_secret_file", Str),
            ("client_auth", Str),
            ("scopes", StrList),
            ("timeout_ms", UInt),
            ("max_retries", UInt),
            ("max_response_bytes", UInt),
        ],
    ),
    ("token", &[("refresh_margin_s", UInt)]),
    (
        "cache",
        &[
            ("enabled", Bool),
            ("ttl_s", UInt),
            ("not_found_ttl_s", UInt),
            ("max_entries", UInt),
        ],
    ),
    ("auth", &[("required", Bool)]),
];

const CLIENTS: &str = "clients";

const CLIENT_KEYS: &[(&str, Kind)] = &[
    ("name", Str),
    ("api_key", Str),
    ("api_key_file", Str),
    ("api_key_sha256", Str),
    ("permissions", StrList),
];

/// Keys whose values are never echoed in messages.
fn is_secret_key(key: &str) -> bool {
    key == "talkdesk.client_secret" || key.ends_with(".api_key")
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

fn env_prefix_lower() -> String {
    format!("{ENV_PREFIX}{ENV_SEPARATOR}").to_lowercase()
}

/// The environment variable that sets `key` (e.g. `server.listen`).
fn env_var_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{ENV_SEPARATOR}{}",
        key.replace('.', ENV_SEPARATOR).to_uppercase()
    )
}

/// Merge the layers, walk, deserialise, validate.
fn build(
    file: Option<(String, String)>,
    env: Option<HashMap<String, String>>,
) -> Result<Settings, ConfigErrors> {
    let mut p = Problems::default();

    let mut builder =
        Config::builder().add_source(File::from_str(DEFAULT_CONFIG_TOML, FileFormat::Toml));
    if let Some((label, text)) = &file {
        // Parse here first so that a syntax error names the file.
        if let Err(e) = toml::from_str::<toml::Table>(text) {
            return Err(ConfigErrors(vec![format!(
                "{label} is not valid TOML: {}",
                e.to_string().trim_end()
            )]));
        }
        builder = builder.add_source(File::from_str(text, FileFormat::Toml));
    }
    if let Some(env) = env {
        let env = screen_env(env, &mut p);
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .source(Some(env)),
        );
    }
    let merged = match builder.build() {
        Ok(config) => config.cache,
        Err(e) => {
            p.list.push(format!("cannot load the configuration: {e}"));
            return Err(ConfigErrors(p.list));
        }
    };

    let tree = walk_root(merged, &mut p);
    let raw = RawConfig::from_tree(tree, &mut p);
    let settings = validate(raw, &mut p);
    if p.list.is_empty() {
        Ok(settings)
    } else {
        Err(ConfigErrors(p.list))
    }
}

/// Keep the variables with our prefix that name a plain key; `[[clients]]` (and anything
/// that is not `SECTION__KEY` made of letters, digits and `_`) is refused by name.
fn screen_env(env: HashMap<String, String>, p: &mut Problems) -> HashMap<String, String> {
    let prefix = env_prefix_lower();
    let mut kept = HashMap::new();
    let mut names: Vec<_> = env.into_iter().collect();
    names.sort();
    for (name, value) in names {
        let lower = name.to_lowercase();
        let Some(rest) = lower.strip_prefix(&prefix) else {
            continue;
        };
        let valid_chars = rest
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if rest.is_empty() || !valid_chars {
            p.list.push(format!(
                "environment variable {name} is not a configuration key \
                 (expected {ENV_PREFIX}__<SECTION>__<KEY>)"
            ));
            continue;
        }
        if rest.split(ENV_SEPARATOR).next() == Some(CLIENTS) {
            p.list.push(format!(
                "environment variable {name}: [[clients]] can only be configured in a file"
            ));
            continue;
        }
        kept.insert(name, value);
    }
    kept
}

// ---------------------------------------------------------------------------------------------
// Walking the merged tree against the known keys
// ---------------------------------------------------------------------------------------------

/// Problems found so far, and which keys came from the environment (so that messages can
/// name the variable).
#[derive(Default)]
struct Problems {
    list: Vec<String>,
    env_keys: HashSet<String>,
}

impl Problems {
    /// A problem with `key`: "`key`: `msg`", plus the environment variable when it set the key.
    fn at(&mut self, key: &str, msg: impl fmt::Display) {
        let note = self.note(key);
        self.list.push(format!("{key}: {msg}{note}"));
    }

    /// A problem whose message already names its key(s).
    fn msg(&mut self, msg: impl Into<String>) {
        self.list.push(msg.into());
    }

    fn note(&self, key: &str) -> String {
        if self.env_keys.contains(key) {
            format!(" (from environment variable {})", env_var_name(key))
        } else {
            String::new()
        }
    }
}

fn is_env(v: &Value) -> bool {
    v.origin() == Some(ENV_ORIGIN)
}

fn has_env_leaf(v: &Value) -> bool {
    match &v.kind {
        ValueKind::Table(t) => t.values().any(has_env_leaf),
        ValueKind::Array(a) => a.iter().any(has_env_leaf),
        _ => is_env(v),
    }
}

fn describe(v: &ValueKind, secret: bool) -> String {
    match v {
        ValueKind::Nil => "nothing".into(),
        ValueKind::Boolean(b) => format!("boolean {b}"),
        ValueKind::I64(n) => format!("integer {n}"),
        ValueKind::I128(n) => format!("integer {n}"),
        ValueKind::U64(n) => format!("integer {n}"),
        ValueKind::U128(n) => format!("integer {n}"),
        ValueKind::Float(x) => format!("float {x}"),
        ValueKind::String(_) if secret => "a string".into(),
        ValueKind::String(s) => format!("string {s:?}"),
        ValueKind::Table(_) => "a table".into(),
        ValueKind::Array(_) => "an array".into(),
    }
}

fn sorted<V>(map: impl IntoIterator<Item = (String, V)>) -> Vec<(String, V)> {
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Walk the merged tree: unknown keys and type mismatches become problems, environment
/// strings are turned into the key's type. Returns `{section: {key: value}}` plus `clients`.
fn walk_root(root: Value, p: &mut Problems) -> JsonMap<String, Json> {
    let mut out = JsonMap::new();
    let ValueKind::Table(table) = root.kind else {
        p.msg("the configuration is not a table");
        return out;
    };
    for (name, value) in sorted(table) {
        if name == CLIENTS {
            out.insert(name, Json::Array(walk_clients(value, p)));
        } else if let Some((_, keys)) = SECTIONS.iter().find(|(s, _)| *s == name) {
            if let Some(section) = walk_table(&name, keys, value, p) {
                out.insert(name, Json::Object(section));
            }
        } else {
            unknown(&name, &value, suggest_top(&name), p);
        }
    }
    out
}

fn walk_clients(value: Value, p: &mut Problems) -> Vec<Json> {
    let ValueKind::Array(items) = value.kind else {
        p.at(
            CLIENTS,
            format!(
                "expected an array of tables ([[clients]]), got {}",
                describe(&value.kind, false)
            ),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("{CLIENTS}[{i}]");
        // A client that is not a table is reported here and skipped later (Null keeps the indices).
        out.push(walk_table(&path, CLIENT_KEYS, item, p).map_or(Json::Null, Json::Object));
    }
    out
}

fn walk_table(
    path: &str,
    keys: &[(&str, Kind)],
    value: Value,
    p: &mut Problems,
) -> Option<JsonMap<String, Json>> {
    if is_env(&value) {
        p.env_keys.insert(path.to_owned());
    }
    let ValueKind::Table(table) = value.kind else {
        p.at(
            path,
            format!("expected a table, got {}", describe(&value.kind, false)),
        );
        return None;
    };
    let mut out = JsonMap::new();
    for (key, v) in sorted(table) {
        let full = format!("{path}.{key}");
        match keys.iter().find(|(k, _)| *k == key) {
            Some((_, kind)) => {
                if is_env(&v) {
                    p.env_keys.insert(full.clone());
                }
                if let Some(json) = coerce(&full, *kind, v, p) {
                    out.insert(key, json);
                }
            }
            None => {
                let hint =
                    closest(&key, keys.iter().map(|(k, _)| *k)).map(|k| format!("{path}.{k}"));
                unknown(&full, &v, hint, p);
            }
        }
    }
    Some(out)
}

/// Report an unknown key; an unknown table set from the environment is reported leaf by
/// leaf so that each variable is named.
fn unknown(full: &str, v: &Value, hint: Option<String>, p: &mut Problems) {
    if let ValueKind::Table(t) = &v.kind {
        if has_env_leaf(v) {
            for (k, child) in sorted(t.clone()) {
                unknown(&format!("{full}.{k}"), &child, None, p);
            }
            return;
        }
    }
    let mut msg = format!("unknown key '{full}'");
    if is_env(v) {
        let _ = write!(msg, " (from environment variable {})", env_var_name(full));
    }
    if let Some(hint) = hint {
        let _ = write!(msg, "; did you mean '{hint}'?");
    }
    p.msg(msg);
}

/// A suggestion for an unknown top-level key: a section with a close name, or the section
/// holding a key of that name (e.g. `listen` → `server.listen`).
fn suggest_top(name: &str) -> Option<String> {
    let sections = SECTIONS
        .iter()
        .map(|(s, _)| *s)
        .chain(std::iter::once(CLIENTS));
    if let Some(s) = closest(name, sections) {
        return Some(s.to_owned());
    }
    SECTIONS.iter().find_map(|(s, keys)| {
        keys.iter()
            .any(|(k, _)| *k == name)
            .then(|| format!("{s}.{name}"))
    })
}

/// The candidate within a small edit distance of `word`, if any.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Check a known key's value against its kind; values from the environment (always strings)
/// are parsed into the kind. `None` after reporting a problem.
fn coerce(full: &str, kind: Kind, v: Value, p: &mut Problems) -> Option<Json> {
    let env = is_env(&v);
    let secret = is_secret_key(full);
    let got = describe(&v.kind, secret);
    let mismatch = |p: &mut Problems, expected: &str| {
        p.at(full, format!("expected {expected}, got {got}"));
        None
    };
    match (kind, v.kind) {
        (Str, ValueKind::String(s)) => Some(Json::String(s)),
        (Str, _) => mismatch(p, "a string"),

        (UInt, ValueKind::I64(n)) if n >= 0 => Some(Json::from(n)),
        (UInt, ValueKind::U64(n)) if n <= i64::MAX as u64 => Some(Json::from(n)),
        (UInt, ValueKind::String(s)) if env => match s.trim().parse::<i64>() {
            Ok(n) if n >= 0 => Some(Json::from(n)),
            _ => mismatch(p, "a non-negative integer"),
        },
        (UInt, _) => mismatch(p, "a non-negative integer"),

        (Bool, ValueKind::Boolean(b)) => Some(Json::Bool(b)),
        (Bool, ValueKind::String(s)) if env => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(Json::Bool(true)),
            "false" | "0" | "no" | "off" => Some(Json::Bool(false)),
            _ => mismatch(p, "a boolean (true or false)"),
        },
        (Bool, _) => mismatch(p, "a boolean (true or false)"),

        (StrList, ValueKind::Array(items)) => {
            let mut list = Vec::with_capacity(items.len());
            let mut ok = true;
            for (i, item) in items.into_iter().enumerate() {
                match item.kind {
                    ValueKind::String(s) => list.push(Json::String(s)),
                    other => {
                        p.at(
                            &format!("{full}[{i}]"),
                            format!("expected a string, got {}", describe(&other, secret)),
                        );
                        ok = false;
                    }
                }
            }
            ok.then_some(Json::Array(list))
        }
        // From the environment: a comma- or space-separated list.
        (StrList, ValueKind::String(s)) if env => Some(Json::Array(
            s.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|item| !item.is_empty())
                .map(|item| Json::String(item.to_owned()))
                .collect(),
        )),
        (StrList, _) => mismatch(p, "an array of strings"),
    }
}

// ---------------------------------------------------------------------------------------------
// Typed raw configuration (every field optional: `None` means "already reported")
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    max_body_bytes: Option<u64>,
    max_header_bytes: Option<u64>,
    header_read_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    max_connections: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTalkdesk {
    account: Option<String>,
    region: Option<String>,
    api_base_url: Option<String>,
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<String>,
    client_auth: Option<String>,
    scopes: Option<Vec<String>>,
    timeout_ms: Option<u64>,
    max_retries: Option<u64>,
    max_response_bytes: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawToken {
    refresh_margin_s: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    enabled: Option<bool>,
    ttl_s: Option<u64>,
    not_found_ttl_s: Option<u64>,
    max_entries: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    required: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: Option<String>,
    api_key: Option<String>,
    api_key_file: Option<String>,
    api_key_sha256: Option<String>,
    permissions: Option<Vec<String>>,
}

#[derive(Default)]
struct RawConfig {
    server: RawServer,
    log: RawLog,
    talkdesk: RawTalkdesk,
    token: RawToken,
    cache: RawCache,
    auth: RawAuth,
    /// With each client's index in the file.
    clients: Vec<(usize, RawClient)>,
}

impl RawConfig {
    fn from_tree(mut tree: JsonMap<String, Json>, p: &mut Problems) -> RawConfig {
        let clients = match tree.remove(CLIENTS) {
            Some(Json::Array(items)) => items
                .into_iter()
                .enumerate()
                .filter(|(_, item)| !item.is_null())
                .map(|(i, item)| (i, typed(&format!("{CLIENTS}[{i}]"), item, p)))
                .collect(),
            _ => Vec::new(),
        };
        let mut section = |name: &str| tree.remove(name).unwrap_or(Json::Object(JsonMap::new()));
        let (server, log, talkdesk) = (section("server"), section("log"), section("talkdesk"));
        let (token, cache, auth) = (section("token"), section("cache"), section("auth"));
        RawConfig {
            server: typed("server", server, p),
            log: typed("log", log, p),
            talkdesk: typed("talkdesk", talkdesk, p),
            token: typed("token", token, p),
            cache: typed("cache", cache, p),
            auth: typed("auth", auth, p),
            clients,
        }
    }
}

/// Deserialise one section; the walk has already checked every key, so a failure here means
/// the key table and the raw structs disagree — still reported, never a panic.
fn typed<T: DeserializeOwned + Default>(path: &str, value: Json, p: &mut Problems) -> T {
    match serde_json::from_value(value) {
        Ok(t) => t,
        Err(e) => {
            p.at(path, format!("invalid section: {e}"));
            T::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation into Settings (every problem is collected; invalid values get placeholders and
// the whole result is discarded when any problem was found)
// ---------------------------------------------------------------------------------------------

fn validate(raw: RawConfig, p: &mut Problems) -> Settings {
    let server = validate_server(raw.server, p);
    let log = validate_log(raw.log, p);
    let talkdesk = validate_talkdesk(raw.talkdesk, p);
    let token = TokenSettings {
        refresh_margin: Duration::from_secs(raw.token.refresh_margin_s.unwrap_or(0)),
    };
    let cache = validate_cache(raw.cache, p);
    let auth = AuthSettings {
        required: raw.auth.required.unwrap_or(true),
    };
    let clients = validate_clients(raw.clients, p);
    if auth.required && clients.is_empty() {
        p.msg("clients: at least one [[clients]] entry is required unless auth.required = false");
    }
    Settings {
        server,
        log,
        talkdesk,
        token,
        cache,
        clients,
        auth,
    }
}

/// `value` must be at least `min`; converted to usize.
fn at_least(p: &mut Problems, key: &str, value: Option<u64>, min: u64) -> usize {
    let Some(value) = value else { return 0 };
    if value < min {
        if min == 1 {
            p.at(key, "must be greater than 0");
        } else {
            p.at(key, format!("must be at least {min}, got {value}"));
        }
        return 0;
    }
    match usize::try_from(value) {
        Ok(v) => v,
        Err(_) => {
            p.at(key, format!("{value} is too large"));
            0
        }
    }
}

fn positive_ms(p: &mut Problems, key: &str, value: Option<u64>) -> Duration {
    Duration::from_millis(at_least(p, key, value, 1) as u64)
}

fn socket_addr(p: &mut Problems, key: &str, value: Option<String>) -> SocketAddr {
    let fallback = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let Some(value) = value else { return fallback };
    match value.trim().parse() {
        Ok(addr) => addr,
        Err(_) => {
            p.at(
                key,
                format!("{value:?} is not a socket address (ip:port, e.g. \"0.0.0.0:8080\" or \"[::1]:8080\")"),
            );
            fallback
        }
    }
}

fn readable_file(p: &mut Problems, key: &str, path: &str) {
    let result = std::fs::metadata(path).and_then(|meta| {
        if meta.is_file() {
            std::fs::File::open(path).map(drop)
        } else {
            Err(std::io::Error::other("not a regular file"))
        }
    });
    if let Err(e) = result {
        p.at(key, format!("cannot read '{path}': {e}"));
    }
}

fn validate_server(raw: RawServer, p: &mut Problems) -> ServerSettings {
    let listen = socket_addr(p, "server.listen", raw.listen);
    let admin_listen = socket_addr(p, "server.admin_listen", raw.admin_listen);
    if listen == admin_listen && listen.port() != 0 {
        p.at(
            "server.admin_listen",
            format!("must differ from server.listen (both are {listen})"),
        );
    }

    let cert = raw.tls_cert_file.unwrap_or_default();
    let key = raw.tls_key_file.unwrap_or_default();
    let tls = match (cert.is_empty(), key.is_empty()) {
        (true, true) => None,
        (false, true) => {
            p.at(
                "server.tls_key_file",
                "is required when server.tls_cert_file is set (both or neither)",
            );
            None
        }
        (true, false) => {
            p.at(
                "server.tls_cert_file",
                "is required when server.tls_key_file is set (both or neither)",
            );
            None
        }
        (false, false) => {
            readable_file(p, "server.tls_cert_file", &cert);
            readable_file(p, "server.tls_key_file", &key);
            Some(TlsFiles {
                cert_file: PathBuf::from(cert),
                key_file: PathBuf::from(key),
            })
        }
    };

    ServerSettings {
        listen,
        admin_listen,
        tls,
        max_body_bytes: at_least(p, "server.max_body_bytes", raw.max_body_bytes, 1),
        max_header_bytes: at_least(p, "server.max_header_bytes", raw.max_header_bytes, 1024),
        header_read_timeout: positive_ms(
            p,
            "server.header_read_timeout_ms",
            raw.header_read_timeout_ms,
        ),
        request_timeout: positive_ms(p, "server.request_timeout_ms", raw.request_timeout_ms),
        shutdown_grace: positive_ms(p, "server.shutdown_grace_ms", raw.shutdown_grace_ms),
        max_connections: at_least(p, "server.max_connections", raw.max_connections, 1),
    }
}

fn validate_log(raw: RawLog, p: &mut Problems) -> LogSettings {
    let format = match raw.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            p.at(
                "log.format",
                format!("{other:?} is not a log format; allowed: text, json"),
            );
            LogFormat::Text
        }
    };
    let level = raw.level.unwrap_or_else(|| "info".to_owned());
    if let Err(err) = tracing_subscriber::EnvFilter::try_new(&level) {
        p.at(
            "log.level",
            format!("{level:?} is not a level or tracing filter: {err}"),
        );
    }
    LogSettings { level, format }
}

/// A DNS label: 1 to 63 of a-z 0-9 '-', not starting or ending with '-'.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An absolute http(s) URL with a host and no credentials.
fn check_url(p: &mut Problems, key: &str, url: &str, allow_query: bool) -> bool {
    let problem = match url.parse::<http::Uri>() {
        Err(e) => Some(format!("{url:?} is not a valid URL: {e}")),
        Ok(uri) => match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(authority)) => {
                if authority.host().is_empty() {
                    Some(format!("{url:?} has no host"))
                } else if url.contains('#') {
                    Some(format!("{url:?} must not have a fragment (#...)"))
                } else if authority.as_str().contains('@') {
                    Some("must not contain credentials (user@host)".to_owned())
                } else if !allow_query && uri.query().is_some() {
                    Some(format!("{url:?} must not have a query string"))
                } else {
                    None
                }
            }
            (Some("http" | "https"), None) => Some(format!("{url:?} has no host")),
            _ => Some(format!("{url:?} must be an http:// or https:// URL")),
        },
    };
    match problem {
        Some(msg) => {
            p.at(key, msg);
            false
        }
        None => true,
    }
}

/// Read a secret from a file; trailing whitespace (the newline) is dropped.
fn read_secret_file(p: &mut Problems, key: &str, path: &str) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim_end().to_owned();
            if secret.is_empty() {
                p.at(key, format!("file '{path}' is empty"));
                None
            } else {
                Some(secret)
            }
        }
        Err(e) => {
            p.at(key, format!("cannot read '{path}': {e}"));
            None
        }
    }
}

fn validate_talkdesk(raw: RawTalkdesk, p: &mut Problems) -> TalkdeskSettings {
    let allowed_regions = Region::ALL.map(Region::as_str).join(", ");
    let region = match raw.region.as_deref() {
        None => None,
        Some(s) => {
            let region = Region::parse(s);
            if region.is_none() {
                p.at(
                    "talkdesk.region",
                    format!("{s:?} is not a region; allowed: {allowed_regions}"),
                );
            }
            region
        }
    };

    let client_auth = match raw.client_auth.as_deref() {
        None | Some("basic") => ClientAuth::Basic,
        Some("post") => ClientAuth::Post,
        Some(other) => {
            p.at(
                "talkdesk.client_auth",
                format!("{other:?} is not a client authentication method; allowed: basic, post"),
            );
            ClientAuth::Basic
        }
    };

    let account = raw.account.unwrap_or_default();

    let api_base_url = match raw.api_base_url {
        None => String::new(),
        Some(url) if url.is_empty() => region
            .map(|r| r.api_base_url().to_owned())
            .unwrap_or_default(),
        Some(url) => {
            check_url(p, "talkdesk.api_base_url", &url, false);
            url.trim_end_matches('/').to_owned()
        }
    };

    let token_url = match raw.token_url {
        None => String::new(),
        Some(url) if url.is_empty() => {
            if account.is_empty() {
                p.msg("talkdesk.account or talkdesk.token_url is required");
                String::new()
            } else if !is_dns_label(&account) {
                p.at(
                    "talkdesk.account",
                    format!(
                        "{account:?} is not a DNS label (1 to 63 of a-z, 0-9 and '-', \
                         not starting or ending with '-')"
                    ),
                );
                String::new()
            } else {
                region.map(|r| r.token_url(&account)).unwrap_or_default()
            }
        }
        Some(url) => {
            check_url(p, "talkdesk.token_url", &url, true);
            url
        }
    };

    let client_id = raw.client_id.unwrap_or_default();
    if client_id.trim().is_empty() {
        let note = p.note("talkdesk.client_id");
        p.msg(format!("talkdesk.client_id is required{note}"));
    }

    let inline = raw.client_secret.filter(|s| !s.is_empty());
    let file = raw.client_secret_file.filter(|s| !s.is_empty());
    let client_secret = match (inline, file) {
        (Some(secret), None) => secret,
        (None, Some(path)) => {
            read_secret_file(p, "talkdesk.client_secret_file", &path).unwrap_or_default()
        }
        (Some(_), Some(_)) => {
            p.msg(
                "talkdesk.client_secret and talkdesk.client_secret_file are both set; \
                 give exactly one",
            );
            String::new()
        }
        (None, None) => {
            let note = p.note("talkdesk.client_secret");
            p.msg(format!(
                "talkdesk.client_secret (or talkdesk.client_secret_file) is required{note}"
            ));
            String::new()
        }
    };

    let scopes = raw.scopes.unwrap_or_default();
    if scopes.is_empty() {
        p.at("talkdesk.scopes", "must not be empty");
    }
    for scope in &scopes {
        if scope.is_empty() || scope.chars().any(char::is_whitespace) {
            p.at(
                "talkdesk.scopes",
                format!("{scope:?} is not a scope (non-empty, no whitespace)"),
            );
        }
    }

    let max_retries = raw.max_retries.map_or(0, |n| {
        u32::try_from(n).unwrap_or_else(|_| {
            p.at("talkdesk.max_retries", format!("{n} is too large"));
            0
        })
    });

    TalkdeskSettings {
        account,
        region: region.unwrap_or(Region::Com),
        api_base_url,
        token_url,
        client_id,
        client_secret: Secret::new(client_secret),
        client_auth,
        scopes,
        timeout: positive_ms(p, "talkdesk.timeout_ms", raw.timeout_ms),
        max_retries,
        max_response_bytes: at_least(p, "talkdesk.max_response_bytes", raw.max_response_bytes, 1),
    }
}

fn validate_cache(raw: RawCache, p: &mut Problems) -> CacheSettings {
    let enabled = raw.enabled.unwrap_or(true);
    if enabled && raw.ttl_s == Some(0) {
        p.at(
            "cache.ttl_s",
            "must be greater than 0 when cache.enabled = true",
        );
    }
    let max_entries = raw.max_entries.unwrap_or(1);
    if max_entries == 0 {
        p.at("cache.max_entries", "must be greater than 0");
    }
    CacheSettings {
        enabled,
        ttl: Duration::from_secs(raw.ttl_s.unwrap_or(0)),
        not_found_ttl: Duration::from_secs(raw.not_found_ttl_s.unwrap_or(0)),
        max_entries,
    }
}

const MAX_CLIENT_NAME: usize = 64;
const MIN_API_KEY: usize = 16;
/// The `client` metric label of unauthenticated requests; no client may take it.
const ANONYMOUS: &str = "anonymous";

fn validate_clients(raw: Vec<(usize, RawClient)>, p: &mut Problems) -> Vec<ClientSettings> {
    let mut clients = Vec::with_capacity(raw.len());
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut keys: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, c) in raw {
        let at = |field: &str| format!("{CLIENTS}[{i}].{field}");

        let key = at("name");
        let name_missing = c.name.is_none();
        let name = c.name.unwrap_or_default();
        if name_missing {
            p.msg(format!("{key} is required"));
        } else if name.is_empty() {
            p.at(&key, "must not be empty");
        } else if name.len() > MAX_CLIENT_NAME
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            p.at(
                &key,
                format!(
                    "{name:?} is not a client name (1 to {MAX_CLIENT_NAME} of A-Z a-z 0-9 . _ -)"
                ),
            );
        } else if name == ANONYMOUS {
            p.at(
                &key,
                format!("{ANONYMOUS:?} is reserved (the metric label of unauthenticated requests)"),
            );
        } else if let Some(first) = names.get(&name) {
            p.at(
                &key,
                format!("{name:?} is already used by {CLIENTS}[{first}]"),
            );
        } else {
            names.insert(name.clone(), i);
        }

        let given: Vec<&str> = [
            ("api_key", c.api_key.is_some()),
            ("api_key_file", c.api_key_file.is_some()),
            ("api_key_sha256", c.api_key_sha256.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(k, _)| k)
        .collect();
        let key_sha256 = match given.len() {
            0 => {
                p.msg(format!(
                    "{} (or api_key_file or api_key_sha256) is required",
                    at("api_key")
                ));
                None
            }
            1 => {
                if let Some(key) = c.api_key {
                    api_key_hash(p, &at("api_key"), &key, None)
                } else if let Some(path) = c.api_key_file {
                    let field = at("api_key_file");
                    read_secret_file(p, &field, &path)
                        .and_then(|key| api_key_hash(p, &field, &key, Some(&path)))
                } else {
                    let hex = c.api_key_sha256.unwrap_or_default();
                    let hash = decode_sha256_hex(&hex);
                    if hash.is_none() {
                        p.at(
                            &at("api_key_sha256"),
                            "must be 64 hexadecimal characters (the SHA-256 of the key)",
                        );
                    }
                    hash
                }
            }
            _ => {
                p.msg(format!(
                    "{CLIENTS}[{i}]: give exactly one of api_key, api_key_file, api_key_sha256 \
                     (found {})",
                    given.join(", ")
                ));
                None
            }
        };
        if let Some(hash) = key_sha256 {
            if let Some(first) = keys.get(&hash) {
                p.msg(format!(
                    "{CLIENTS}[{i}]: has the same API key as {CLIENTS}[{first}]; each client needs its own key"
                ));
            } else {
                keys.insert(hash, i);
            }
        }

        let permissions = validate_permissions(p, &at("permissions"), c.permissions);
        clients.push(ClientSettings {
            name,
            key_sha256: key_sha256.unwrap_or_default(),
            permissions,
        });
    }
    clients
}

/// Check a plain API key (never echoed) and hash it.
fn api_key_hash(
    p: &mut Problems,
    key: &str,
    api_key: &str,
    file: Option<&str>,
) -> Option<[u8; 32]> {
    let what = match file {
        Some(path) => format!("the API key in '{path}'"),
        None => "the API key".to_owned(),
    };
    if api_key.chars().count() < MIN_API_KEY {
        p.at(
            key,
            format!("{what} must be at least {MIN_API_KEY} characters"),
        );
        return None;
    }
    if !api_key.bytes().all(|b| b.is_ascii_graphic()) {
        p.at(
            key,
            format!("{what} must be printable ASCII without spaces (it is sent in a header)"),
        );
        return None;
    }
    Some(sha256(api_key.as_bytes()))
}

fn decode_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

fn validate_permissions(p: &mut Problems, key: &str, raw: Option<Vec<String>>) -> Permissions {
    let mut perms = Permissions::default();
    let Some(list) = raw else {
        p.msg(format!("{key} is required (a list of read, write, admin)"));
        return perms;
    };
    if list.is_empty() {
        p.at(key, "must not be empty (a list of read, write, admin)");
    }
    for perm in &list {
        match perm.as_str() {
            "read" => perms.read = true,
            "write" => perms.write = true,
            "admin" => perms.admin = true,
            other => p.at(
                key,
                format!("unknown permission {other:?}; allowed: read, write, admin"),
            ),
        }
    }
    perms
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-client-secret";
    const API_KEY: &str = "k3y-0123456789abcdef";

    /// A minimal valid configuration (on top of the defaults).
    fn minimal() -> String {
        format!(
            r#"
[talkdesk]
account = "acme"
client_id = "cid"
client_secret = "{SECRET}"

[[clients]]
name = "studio-ivr"
api_key = "{API_KEY}"
permissions = ["read", "write"]
"#
        )
    }

    fn errors(toml: &str) -> Vec<String> {
        match Settings::from_toml_str(toml) {
            Ok(_) => panic!("expected errors for:\n{toml}"),
            Err(ConfigErrors(list)) => list,
        }
    }

    fn has(list: &[String], needle: &str) -> bool {
        list.iter().any(|e| e.contains(needle))
    }

    /// A file in the temp dir with a unique name; removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(tag: &str, content: &str) -> TempFile {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "consent-proxy-config-test-{}-{n}-{tag}",
                std::process::id()
            ));
            std::fs::write(&path, content).unwrap();
            TempFile(path)
        }

        fn path_str(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn key_table_matches_default_toml() {
        let table: toml::Table = toml::from_str(DEFAULT_CONFIG_TOML).unwrap();
        let mut from_file: Vec<String> = Vec::new();
        for (section, value) in &table {
            for key in value.as_table().unwrap().keys() {
                from_file.push(format!("{section}.{key}"));
            }
        }
        let mut known: Vec<String> = SECTIONS
            .iter()
            .flat_map(|(s, keys)| keys.iter().map(move |(k, _)| format!("{s}.{k}")))
            .collect();
        from_file.sort();
        known.sort();
        assert_eq!(from_file, known);
        assert!(
            !table.contains_key(CLIENTS),
            "the [[clients]] example must be commented out"
        );
        assert_eq!(table["auth"]["required"].as_bool(), Some(true));
    }

    #[test]
    fn defaults_alone_report_only_missing_essentials() {
        let list = errors("");
        assert_eq!(
            list,
            vec![
                "talkdesk.account or talkdesk.token_url is required".to_owned(),
                "talkdesk.client_id is required".to_owned(),
                "talkdesk.client_secret (or talkdesk.client_secret_file) is required".to_owned(),
                "clients: at least one [[clients]] entry is required unless auth.required = false"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn minimal_file_gives_contract_defaults() {
        let s = Settings::from_toml_str(&minimal()).unwrap();
        assert_eq!(s.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(s.server.admin_listen, "127.0.0.1:9464".parse().unwrap());
        assert!(s.server.tls.is_none());
        assert_eq!(s.server.max_body_bytes, 4096);
        assert_eq!(s.server.max_header_bytes, 16384);
        assert_eq!(s.server.header_read_timeout, Duration::from_millis(5000));
        assert_eq!(s.server.request_timeout, Duration::from_millis(10000));
        assert_eq!(s.server.shutdown_grace, Duration::from_millis(10000));
        assert_eq!(s.server.max_connections, 10000);
        assert_eq!(s.log.level, "info");
        assert_eq!(s.log.format, LogFormat::Text);
        let t = &s.talkdesk;
        assert_eq!(t.account, "acme");
        assert_eq!(t.region, Region::Com);
        assert_eq!(t.api_base_url, "https://api.talkdeskapp.com");
        assert_eq!(t.token_url, "https://acme.talkdeskid.com/oauth/token");
        assert_eq!(t.client_id, "cid");
        assert_eq!(t.client_secret.expose(), SECRET);
        assert_eq!(t.client_auth, ClientAuth::Basic);
        assert_eq!(
            t.scopes,
            vec![
                "voicebiometrics-consent:read",
                "voicebiometrics-consent:write"
            ]
        );
        assert_eq!(t.timeout, Duration::from_millis(3000));
        assert_eq!(t.max_retries, 2);
        assert_eq!(t.max_response_bytes, 65536);
        assert_eq!(s.token.refresh_margin, Duration::from_secs(60));
        assert!(s.cache.enabled);
        assert_eq!(s.cache.ttl, Duration::from_secs(300));
        assert_eq!(s.cache.not_found_ttl, Duration::from_secs(30));
        assert_eq!(s.cache.max_entries, 1_000_000);
        assert!(s.auth.required);
        assert_eq!(s.clients.len(), 1);
        assert_eq!(s.clients[0].name, "studio-ivr");
        assert_eq!(s.clients[0].key_sha256, sha256(API_KEY.as_bytes()));
        assert_eq!(
            s.clients[0].permissions,
            Permissions {
                read: true,
                write: true,
                admin: false
            }
        );
    }

    #[test]
    fn region_derivation_for_all_four() {
        let cases = [
            (
                "com",
                "https://api.talkdeskapp.com",
                "https://acme.talkdeskid.com/oauth/token",
            ),
            (
                "eu",
                "https://api.talkdeskapp.eu",
                "https://acme.talkdeskid.eu/oauth/token",
            ),
            (
                "ca",
                "https://api.talkdeskappca.com",
                "https://acme.talkdeskidca.com/oauth/token",
            ),
            (
                "au",
                "https://api.talkdeskapp.au",
                "https://acme.talkdeskid.au/oauth/token",
            ),
        ];
        for (region, api, token) in cases {
            let toml = minimal().replace(
                "account = \"acme\"",
                &format!("account = \"acme\"\nregion = \"{region}\""),
            );
            let s = Settings::from_toml_str(&toml).unwrap();
            assert_eq!(s.talkdesk.region.as_str(), region);
            assert_eq!(s.talkdesk.api_base_url, api, "{region}");
            assert_eq!(s.talkdesk.token_url, token, "{region}");
        }
    }

    #[test]
    fn explicit_urls_win_and_lose_trailing_slash() {
        let toml = minimal().replace(
            "account = \"acme\"",
            "account = \"\"\napi_base_url = \"http://127.0.0.1:9000/\"\n\
             token_url = \"http://127.0.0.1:9000/oauth/token\"",
        );
        let s = Settings::from_toml_str(&toml).unwrap();
        assert_eq!(s.talkdesk.api_base_url, "http://127.0.0.1:9000");
        assert_eq!(s.talkdesk.token_url, "http://127.0.0.1:9000/oauth/token");

        let bad = minimal().replace(
            "account = \"acme\"",
            "account = \"Acme Inc\"\napi_base_url = \"ftp://x\"",
        );
        let list = errors(&bad);
        assert!(
            has(
                &list,
                "talkdesk.api_base_url: \"ftp://x\" must be an http:// or https:// URL"
            ),
            "{list:?}"
        );
        assert!(
            has(&list, "talkdesk.account: \"Acme Inc\" is not a DNS label"),
            "{list:?}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let toml = format!(
            "{}\n[server]\nlisen = \"1.2.3.4:1\"\n[bogus]\nx = 1\n",
            minimal().replace("permissions =", "foo = 1\npermissions =")
        );
        let list = errors(&toml);
        assert!(has(&list, "unknown key 'server.lisen'"), "{list:?}");
        assert!(has(&list, "did you mean 'server.listen'?"), "{list:?}");
        assert!(has(&list, "unknown key 'bogus'"), "{list:?}");
        assert!(has(&list, "unknown key 'clients[0].foo'"), "{list:?}");
        assert_eq!(list.len(), 3, "{list:?}");

        let list = errors(&format!("listen = \"1.2.3.4:1\"\n{}", minimal()));
        assert_eq!(
            list,
            vec!["unknown key 'listen'; did you mean 'server.listen'?".to_owned()]
        );

        let list = errors(&format!(
            "{}\n[Server]\nlisten = \"1.2.3.4:1\"\n",
            minimal()
        ));
        assert!(has(&list, "unknown key 'Server'"), "{list:?}");
    }

    #[test]
    fn several_problems_reported_together() {
        let toml = r#"
[server]
listen = "nope"
max_body_bytes = 0
max_header_bytes = 100
tls_cert_file = "/some/cert.pem"
request_timeout_ms = "ten"

[log]
format = "xml"

[talkdesk]
region = "us"
client_auth = "jwt"
scopes = []

[cache]
ttl_s = 0
max_entries = 0

[[clients]]
name = "bad name"
api_key = "short"
permissions = ["read", "root"]

[[clients]]
api_key_sha256 = "zz"
api_key = "k3y-0123456789abcdef"
permissions = []
"#;
        let list = errors(toml);
        for needle in [
            "server.listen: \"nope\" is not a socket address",
            "server.max_body_bytes: must be greater than 0",
            "server.max_header_bytes: must be at least 1024, got 100",
            "server.tls_key_file: is required when server.tls_cert_file is set",
            "server.request_timeout_ms: expected a non-negative integer, got string \"ten\"",
            "log.format: \"xml\" is not a log format",
            "talkdesk.region: \"us\" is not a region; allowed: com, eu, ca, au",
            "talkdesk.client_auth: \"jwt\"",
            "talkdesk.account or talkdesk.token_url is required",
            "talkdesk.client_id is required",
            "talkdesk.client_secret (or talkdesk.client_secret_file) is required",
            "talkdesk.scopes: must not be empty",
            "cache.ttl_s: must be greater than 0",
            "cache.max_entries: must be greater than 0",
            "clients[0].name: \"bad name\" is not a client name",
            "clients[0].api_key: the API key must be at least 16 characters",
            "clients[0].permissions: unknown permission \"root\"",
            "clients[1].name is required",
            "clients[1]: give exactly one of api_key, api_key_file, api_key_sha256",
            "clients[1].permissions: must not be empty",
        ] {
            assert!(has(&list, needle), "missing {needle:?} in {list:#?}");
        }
        // Display: one problem per line.
        let shown = ConfigErrors(list.clone()).to_string();
        assert_eq!(shown.lines().count(), list.len());
    }

    #[test]
    fn bad_region_names_key_and_allowed_values() {
        let toml = minimal().replace("account = \"acme\"", "account = \"acme\"\nregion = \"us\"");
        let list = errors(&toml);
        assert_eq!(
            list,
            vec!["talkdesk.region: \"us\" is not a region; allowed: com, eu, ca, au".to_owned()]
        );
    }

    #[test]
    fn bad_log_filter_is_named() {
        let toml = format!("{}\n[log]\nlevel = \"consent_proxy=loud\"\n", minimal());
        let list = errors(&toml);
        assert_eq!(list.len(), 1, "{list:?}");
        assert!(list[0].starts_with("log.level: "), "{list:?}");
    }

    #[test]
    fn missing_client_secret_is_named() {
        let toml = minimal().replace(&format!("client_secret = \"{SECRET}\""), "");
        let list = errors(&toml);
        assert_eq!(
            list,
            vec!["talkdesk.client_secret (or talkdesk.client_secret_file) is required".to_owned()]
        );
        let both = minimal().replace(
            "client_id = \"cid\"",
            "client_id = \"cid\"\nclient_secret_file = \"/x\"",
        );
        assert!(has(&errors(&both), "both set"));
    }

    #[test]
    fn env_overrides_file() {
        let file = TempFile::new("env.toml", &minimal());
        let s = Settings::load_with_env(
            Some(&file.0),
            env(&[
                ("CONSENT_PROXY__SERVER__LISTEN", "127.0.0.1:18080"),
                ("CONSENT_PROXY__TALKDESK__CLIENT_SECRET", "from-env"),
                ("CONSENT_PROXY__TALKDESK__REGION", "eu"),
                ("consent_proxy__log__format", "json"),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(s.talkdesk.client_secret.expose(), "from-env");
        assert_eq!(
            s.talkdesk.token_url,
            "https://acme.talkdeskid.eu/oauth/token"
        );
        assert_eq!(s.log.format, LogFormat::Json);
        // The file still supplies what the environment does not.
        assert_eq!(s.talkdesk.client_id, "cid");
        assert_eq!(s.clients.len(), 1);
    }

    #[test]
    fn env_numbers_bools_and_lists() {
        let file = TempFile::new("envtypes.toml", &minimal());
        let s = Settings::load_with_env(
            Some(&file.0),
            env(&[
                ("CONSENT_PROXY__SERVER__MAX_BODY_BYTES", "8192"),
                ("CONSENT_PROXY__TALKDESK__MAX_RETRIES", "0"),
                ("CONSENT_PROXY__CACHE__ENABLED", "false"),
                ("CONSENT_PROXY__CACHE__TTL_S", "0"),
                ("CONSENT_PROXY__AUTH__REQUIRED", "TRUE"),
                ("CONSENT_PROXY__TALKDESK__SCOPES", "a:read, b:write c:x"),
                ("CONSENT_PROXY__TALKDESK__CLIENT_ID", "12345"),
            ]),
        )
        .unwrap();
        assert_eq!(s.server.max_body_bytes, 8192);
        assert_eq!(s.talkdesk.max_retries, 0);
        assert!(!s.cache.enabled);
        assert_eq!(s.cache.ttl, Duration::ZERO);
        assert!(s.auth.required);
        assert_eq!(s.talkdesk.scopes, vec!["a:read", "b:write", "c:x"]);
        assert_eq!(s.talkdesk.client_id, "12345");

        let list = Settings::load_with_env(
            Some(&file.0),
            env(&[
                ("CONSENT_PROXY__SERVER__MAX_BODY_BYTES", "lots"),
                ("CONSENT_PROXY__CACHE__ENABLED", "maybe"),
                ("CONSENT_PROXY__SERVER__LISEN", "1.2.3.4:5"),
                ("CONSENT_PROXY__CLIENTS__0__NAME", "x"),
            ]),
        )
        .unwrap_err()
        .0;
        assert!(has(&list, "server.max_body_bytes: expected a non-negative integer, got string \"lots\" (from environment variable CONSENT_PROXY__SERVER__MAX_BODY_BYTES)"), "{list:#?}");
        assert!(has(&list, "cache.enabled: expected a boolean"), "{list:#?}");
        assert!(has(&list, "unknown key 'server.lisen' (from environment variable CONSENT_PROXY__SERVER__LISEN)"), "{list:#?}");
        assert!(
            has(
                &list,
                "CONSENT_PROXY__CLIENTS__0__NAME: [[clients]] can only be configured in a file"
            ),
            "{list:#?}"
        );
        assert_eq!(list.len(), 4, "{list:#?}");
    }

    #[test]
    fn missing_config_file_is_named() {
        let path = std::env::temp_dir().join("consent-proxy-config-test-does-not-exist.toml");
        let list = Settings::load_with_env(Some(&path), HashMap::new())
            .unwrap_err()
            .0;
        assert_eq!(list.len(), 1);
        assert!(list[0].contains(&path.display().to_string()), "{list:?}");
    }

    #[test]
    fn secret_files_are_read_and_trimmed() {
        let secret = TempFile::new("secret", "file-secret\n");
        let key = TempFile::new("apikey", "file-key-0123456789\r\n");
        let toml = minimal()
            .replace(
                &format!("client_secret = \"{SECRET}\""),
                &format!("client_secret_file = {}", quote(&secret.path_str())),
            )
            .replace(
                &format!("api_key = \"{API_KEY}\""),
                &format!("api_key_file = {}", quote(&key.path_str())),
            );
        let s = Settings::from_toml_str(&toml).unwrap();
        assert_eq!(s.talkdesk.client_secret.expose(), "file-secret");
        assert_eq!(s.clients[0].key_sha256, sha256(b"file-key-0123456789"));

        let missing = toml.replace(&secret.path_str(), "/nonexistent/consent-proxy-secret");
        let list = errors(&missing);
        assert!(
            has(
                &list,
                "talkdesk.client_secret_file: cannot read '/nonexistent/consent-proxy-secret'"
            ),
            "{list:?}"
        );
    }

    #[test]
    fn api_key_sha256_accepted() {
        let hex: String = sha256(API_KEY.as_bytes())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect();
        let toml = minimal().replace(
            &format!("api_key = \"{API_KEY}\""),
            &format!("api_key_sha256 = \"{hex}\""),
        );
        let s = Settings::from_toml_str(&toml).unwrap();
        assert_eq!(s.clients[0].key_sha256, sha256(API_KEY.as_bytes()));
    }

    #[test]
    fn auth_optional_without_clients() {
        let toml = "[talkdesk]\naccount = \"acme\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
                    [auth]\nrequired = false\n";
        let s = Settings::from_toml_str(toml).unwrap();
        assert!(!s.auth.required);
        assert!(s.clients.is_empty());
    }

    #[test]
    fn duplicate_names_and_keys() {
        let toml = format!(
            "{}\n[[clients]]\nname = \"studio-ivr\"\napi_key = \"{API_KEY}\"\npermissions = [\"admin\"]\n",
            minimal()
        );
        let list = errors(&toml);
        assert!(
            has(
                &list,
                "clients[1].name: \"studio-ivr\" is already used by clients[0]"
            ),
            "{list:?}"
        );
        assert!(
            has(&list, "clients[1]: has the same API key as clients[0]"),
            "{list:?}"
        );
        assert!(!list.iter().any(|e| e.contains(API_KEY)));
    }

    #[test]
    fn redacted_output_has_no_secret() {
        let s = Settings::from_toml_str(&minimal()).unwrap();
        let out = s.redacted_toml();
        assert!(!out.contains(SECRET), "{out}");
        assert!(!out.contains(API_KEY), "{out}");
        let hash = sha256(API_KEY.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!out.to_lowercase().contains(&hex), "{out}");
        assert!(!out.contains("api_key"), "{out}");
        assert!(out.contains("client_secret = \"<redacted>\""), "{out}");
        assert!(
            out.contains("token_url = \"https://acme.talkdeskid.com/oauth/token\""),
            "{out}"
        );
        // It is valid TOML with every section.
        let table: toml::Table = toml::from_str(&out).unwrap();
        for section in [
            "server", "log", "talkdesk", "token", "cache", "auth", "clients",
        ] {
            assert!(table.contains_key(section), "{section} missing in {out}");
        }
        // Debug output does not leak either.
        let debug = format!("{s:?}");
        assert!(
            !debug.contains(SECRET) && !debug.contains(&format!("{:?}", hash)),
            "{debug}"
        );
    }
}
