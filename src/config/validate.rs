//! Validation: the deserialised schema into the runtime [`Settings`]. Every key is checked and
//! every problem recorded before anything is built, so one bad value never hides another; the
//! settings exist only when nothing was wrong (each section is `Some` only when all its values
//! are).

use std::{collections::HashMap, net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use super::{
    problems::Problems,
    redact,
    redis_url::RedisUrl,
    schema::{self, Field},
    secret_files::{read_keys, read_secret_file},
    AuthSettings, BreakerSettings, CacheSettings, ClientSettings, ClusterSettings, LogSettings,
    OAuthSettings, Permissions, Secret, ServerSettings, Settings, TalkdeskSettings, TlsFiles,
    TokenSettings, ANONYMOUS,
};

const MAX_CLIENT_NAME: usize = 64;
const MIN_API_KEY: usize = 16;

pub(super) fn settings(file: schema::ConfigFile, p: &mut Problems) -> Option<Settings> {
    let shown = file.clone();
    let clustered = matches!(&file.cluster.redis_url.0, Ok(url) if !url.is_empty());
    let client_count = file.clients.len();

    let server = server(file.server, p);
    let log = log(file.log, p);
    let talkdesk = talkdesk(file.talkdesk, p);
    let token = p
        .check(
            "token.refresh_margin_s",
            file.token.refresh_margin_s,
            positive_secs,
        )
        .map(|refresh_margin| TokenSettings { refresh_margin });
    let cache = cache(file.cache, p);
    let cluster = cluster(file.cluster, p);
    shared_tier_fits(cluster.as_ref(), cache.as_ref(), server.as_ref(), p);
    let oauth = oauth(file.oauth, clustered, p);
    let auth = p
        .value("auth.required", file.auth.required)
        .map(|required| AuthSettings { required });
    let clients = clients(file.clients, p);
    if auth.as_ref().is_some_and(|auth| auth.required) && client_count == 0 {
        p.general(
            "clients: at least one [[clients]] entry is required unless auth.required = false",
        );
    }

    let talkdesk = talkdesk?;
    Some(Settings {
        redacted: redact::redact(shown, &talkdesk),
        server: server?,
        log: log?,
        talkdesk,
        token: token?,
        cache: cache?,
        cluster: cluster?,
        oauth: oauth?,
        clients: clients?,
        auth: auth?,
    })
}

/// The shared tier needs the local cache in front of it, and Redis calls shorter than a request.
fn shared_tier_fits(
    cluster: Option<&Option<ClusterSettings>>,
    cache: Option<&CacheSettings>,
    server: Option<&ServerSettings>,
    p: &mut Problems,
) {
    let Some(Some(cluster)) = cluster else {
        return;
    };
    if cluster.shared_cache && cache.is_some_and(|cache| !cache.enabled) {
        p.at(
            "cluster.shared_cache",
            "true needs cache.enabled = true (the shared tier is the second tier behind it)",
        );
    }
    let shared = cluster.shared_cache || cluster.shared_token;
    if let Some(server) = server.filter(|s| shared && cluster.shared_timeout >= s.request_timeout) {
        p.at(
            "cluster.shared_timeout_ms",
            format!(
                "must be less than server.request_timeout_ms ({})",
                server.request_timeout.as_millis()
            ),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Rules: a check and a conversion of one value; the error is the message after "key: ".

const NOT_POSITIVE: &str = "must be greater than 0";

fn positive<T: Default + PartialEq>(n: T) -> Result<T, String> {
    if n == T::default() {
        Err(NOT_POSITIVE.to_owned())
    } else {
        Ok(n)
    }
}

fn positive_millis(ms: u64) -> Result<Duration, String> {
    positive(ms).map(Duration::from_millis)
}

fn positive_secs(s: u64) -> Result<Duration, String> {
    positive(s).map(Duration::from_secs)
}

/// Seconds, where 0 turns the feature off.
fn secs_or_off(s: u64) -> Result<Option<Duration>, String> {
    Ok((s > 0).then(|| Duration::from_secs(s)))
}

/// The keys in a key file or directory; none when the path is empty (the key is not set).
fn key_file(what: &'static str) -> impl FnOnce(String) -> Result<Vec<Secret>, String> {
    move |path| {
        if path.is_empty() {
            Ok(Vec::new())
        } else {
            read_keys(&path, what)
        }
    }
}

/// A size or a count of at least `min`.
fn at_least(min: u64) -> impl FnOnce(u64) -> Result<usize, String> {
    move |n| {
        if n < min {
            return Err(if min == 1 {
                NOT_POSITIVE.to_owned()
            } else {
                format!("must be at least {min}, got {n}")
            });
        }
        usize::try_from(n).map_err(|_| format!("{n} is too large"))
    }
}

fn socket_addr(s: String) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("{s:?} is not a socket address (ip:port, e.g. \"0.0.0.0:8080\" or \"[::1]:8080\")")
    })
}

fn readable_file(path: &str) -> Result<(), String> {
    std::fs::metadata(path)
        .and_then(|meta| {
            if meta.is_file() {
                std::fs::File::open(path).map(drop)
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        })
        .map_err(|e| format!("cannot read '{path}': {e}"))
}

/// An absolute http(s) URL with a host and no credentials (it is logged).
fn http_url(url: &str, allow_query: bool) -> Result<(), String> {
    let uri = url
        .parse::<http::Uri>()
        .map_err(|e| format!("{url:?} is not a valid URL: {e}"))?;
    let authority = match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(authority)) => authority,
        (Some("http" | "https"), None) => return Err(format!("{url:?} has no host")),
        _ => return Err(format!("{url:?} must be an http:// or https:// URL")),
    };
    if authority.host().is_empty() {
        Err(format!("{url:?} has no host"))
    } else if url.contains('#') {
        Err(format!("{url:?} must not have a fragment (#...)"))
    } else if authority.as_str().contains('@') {
        // Not echoed: the user part may be a password.
        Err("must not contain credentials (user@host)".to_owned())
    } else if !allow_query && uri.query().is_some() {
        Err(format!("{url:?} must not have a query string"))
    } else {
        Ok(())
    }
}

/// A DNS label: 1 to 63 of a-z 0-9 '-', not starting or ending with '-'.
fn dns_label(s: &str) -> Result<(), String> {
    let valid = !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a DNS label (1 to 63 of a-z, 0-9 and '-', not starting or ending with '-')"
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Sections

fn server(s: schema::Server, p: &mut Problems) -> Option<ServerSettings> {
    let listen = p.check("server.listen", s.listen, socket_addr);
    let admin_listen = p.check("server.admin_listen", s.admin_listen, socket_addr);
    if let (Some(listen), Some(admin_listen)) = (listen, admin_listen) {
        // Port 0 (tests) lets the kernel pick two different ports.
        if listen == admin_listen && listen.port() != 0 {
            p.at(
                "server.admin_listen",
                format!("must differ from server.listen (both are {listen})"),
            );
        }
    }
    let tls = tls_files(s.tls_cert_file, s.tls_key_file, p);
    let max_body_bytes = p.check("server.max_body_bytes", s.max_body_bytes, at_least(1));
    let max_header_bytes = p.check(
        "server.max_header_bytes",
        s.max_header_bytes,
        at_least(1024),
    );
    let header_read_timeout = p.check(
        "server.header_read_timeout_ms",
        s.header_read_timeout_ms,
        positive_millis,
    );
    let idle_timeout = p.check("server.idle_timeout_ms", s.idle_timeout_ms, positive_millis);
    let request_timeout = p.check(
        "server.request_timeout_ms",
        s.request_timeout_ms,
        positive_millis,
    );
    let shutdown_grace = p.check(
        "server.shutdown_grace_ms",
        s.shutdown_grace_ms,
        positive_millis,
    );
    let max_connections = p.check("server.max_connections", s.max_connections, at_least(1));
    let listen_backlog = p.check("server.listen_backlog", s.listen_backlog, positive);
    Some(ServerSettings {
        listen: listen?,
        admin_listen: admin_listen?,
        tls: tls?,
        max_body_bytes: max_body_bytes?,
        max_header_bytes: max_header_bytes?,
        header_read_timeout: header_read_timeout?,
        idle_timeout: idle_timeout?,
        request_timeout: request_timeout?,
        shutdown_grace: shutdown_grace?,
        max_connections: max_connections?,
        listen_backlog: listen_backlog?,
    })
}

/// Both files or neither.
fn tls_files(
    cert: Field<String>,
    key: Field<String>,
    p: &mut Problems,
) -> Option<Option<TlsFiles>> {
    let cert = p.value("server.tls_cert_file", cert);
    let key = p.value("server.tls_key_file", key);
    let (cert, key) = (cert?, key?);
    match (cert.is_empty(), key.is_empty()) {
        (true, true) => Some(None),
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
            let cert_readable = p.take("server.tls_cert_file", readable_file(&cert));
            let key_readable = p.take("server.tls_key_file", readable_file(&key));
            cert_readable.and(key_readable)?;
            Some(Some(TlsFiles {
                cert_file: PathBuf::from(cert),
                key_file: PathBuf::from(key),
            }))
        }
    }
}

fn log(l: schema::Log, p: &mut Problems) -> Option<LogSettings> {
    let level = p.check(
        "log.level",
        l.level,
        |level| match tracing_subscriber::EnvFilter::try_new(&level) {
            Ok(_) => Ok(level),
            Err(e) => Err(format!("{level:?} is not a level or tracing filter: {e}")),
        },
    );
    let format = p.value("log.format", l.format);
    Some(LogSettings {
        level: level?,
        format: format?,
    })
}

fn talkdesk(t: schema::Talkdesk, p: &mut Problems) -> Option<TalkdeskSettings> {
    let account = p.value("talkdesk.account", t.account);
    let region = p.value("talkdesk.region", t.region);
    let api_base_url = match p.value("talkdesk.api_base_url", t.api_base_url) {
        Some(url) if url.is_empty() => region.map(|region| region.api_base_url().to_owned()),
        Some(url) => p
            .take("talkdesk.api_base_url", http_url(&url, false))
            .map(|()| url.trim_end_matches('/').to_owned()),
        None => None,
    };
    let token_url = match (
        p.value("talkdesk.token_url", t.token_url),
        account.as_deref(),
    ) {
        (Some(url), _) if !url.is_empty() => p
            .take("talkdesk.token_url", http_url(&url, true))
            .map(|()| url),
        (Some(_), Some("")) => {
            p.general("talkdesk.account or talkdesk.token_url is required");
            None
        }
        (Some(_), Some(account)) => p
            .take("talkdesk.account", dns_label(account))
            .and(region)
            .map(|region| region.token_url(account)),
        (None, _) | (_, None) => None,
    };
    let client_id = p.value("talkdesk.client_id", t.client_id).filter(|id| {
        let given = !id.trim().is_empty();
        if !given {
            p.about("talkdesk.client_id", "talkdesk.client_id is required");
        }
        given
    });
    let client_secret = client_secret(t.client_secret, t.client_secret_file, p);
    let client_auth = p.value("talkdesk.client_auth", t.client_auth);
    let scopes = p.check("talkdesk.scopes", t.scopes, scopes);
    let timeout = p.check("talkdesk.timeout_ms", t.timeout_ms, positive_millis);
    let max_retries = p.value("talkdesk.max_retries", t.max_retries);
    let max_response_bytes = p.check(
        "talkdesk.max_response_bytes",
        t.max_response_bytes,
        at_least(1),
    );
    let max_concurrent = p.check("talkdesk.max_concurrent", t.max_concurrent, at_least(1));
    // 0: no limit.
    let max_requests_per_s = p
        .value("talkdesk.max_requests_per_s", t.max_requests_per_s)
        .map(NonZeroU32::new);
    // 0: no breaker; the cooldown is checked all the same.
    let breaker_failures = p.value("talkdesk.breaker_failures", t.breaker_failures);
    let breaker_cooldown = p.check(
        "talkdesk.breaker_cooldown_ms",
        t.breaker_cooldown_ms,
        positive_millis,
    );

    let breaker = match (breaker_failures, breaker_cooldown) {
        (Some(failures), Some(cooldown)) => {
            Some(NonZeroU32::new(failures).map(|failures| BreakerSettings { failures, cooldown }))
        }
        _ => None,
    };

    Some(TalkdeskSettings {
        account: account?,
        region: region?,
        api_base_url: api_base_url?,
        token_url: token_url?,
        client_id: client_id?,
        client_secret: client_secret?,
        client_auth: client_auth?,
        scopes: scopes?,
        timeout: timeout?,
        max_retries: max_retries?,
        max_response_bytes: max_response_bytes?,
        max_concurrent: max_concurrent?,
        max_requests_per_s: max_requests_per_s?,
        breaker: breaker?,
    })
}

/// Exactly one of `talkdesk.client_secret` and `talkdesk.client_secret_file`.
fn client_secret(inline: Field<String>, file: Field<String>, p: &mut Problems) -> Option<Secret> {
    let inline = p.value("talkdesk.client_secret", inline);
    let file = p.value("talkdesk.client_secret_file", file);
    let (inline, file) = (inline?, file?);
    match (inline.is_empty(), file.is_empty()) {
        (false, true) => Some(Secret::new(inline)),
        (true, false) => p.take("talkdesk.client_secret_file", read_secret_file(&file)),
        (false, false) => {
            p.general(
                "talkdesk.client_secret and talkdesk.client_secret_file are both set; give exactly one",
            );
            None
        }
        (true, true) => {
            p.about(
                "talkdesk.client_secret",
                "talkdesk.client_secret (or talkdesk.client_secret_file) is required",
            );
            None
        }
    }
}

fn scopes(scopes: Vec<String>) -> Result<Vec<String>, String> {
    if scopes.is_empty() {
        return Err("must not be empty".to_owned());
    }
    let invalid: Vec<String> = scopes
        .iter()
        .filter(|scope| scope.is_empty() || scope.chars().any(char::is_whitespace))
        .map(|scope| format!("{scope:?} is not a scope (non-empty, no whitespace)"))
        .collect();
    if invalid.is_empty() {
        Ok(scopes)
    } else {
        Err(invalid.join("; "))
    }
}

fn cache(c: schema::Cache, p: &mut Problems) -> Option<CacheSettings> {
    let enabled = p.value("cache.enabled", c.enabled);
    let ttl = p.value("cache.ttl_s", c.ttl_s).map(Duration::from_secs);
    let not_found_ttl = p
        .value("cache.not_found_ttl_s", c.not_found_ttl_s)
        .map(Duration::from_secs);
    let max_entries = p.check("cache.max_entries", c.max_entries, positive);
    let stale_if_error = p.check("cache.stale_if_error_s", c.stale_if_error_s, secs_or_off);
    let refresh_ahead = p.check("cache.refresh_ahead_s", c.refresh_ahead_s, secs_or_off);
    if let (Some(true), Some(ttl)) = (enabled, ttl) {
        if ttl.is_zero() {
            p.at(
                "cache.ttl_s",
                "must be greater than 0 when cache.enabled = true",
            );
        } else if refresh_ahead.flatten().is_some_and(|ahead| ahead >= ttl) {
            p.at(
                "cache.refresh_ahead_s",
                format!(
                    "must be less than cache.ttl_s ({}), or 0 to turn refreshing ahead off",
                    ttl.as_secs()
                ),
            );
        }
    }
    Some(CacheSettings {
        enabled: enabled?,
        ttl: ttl?,
        not_found_ttl: not_found_ttl?,
        max_entries: max_entries?,
        stale_if_error: stale_if_error?,
        refresh_ahead: refresh_ahead?,
    })
}

/// `Some(None)`: no cluster (`redis_url = ""`).
fn cluster(c: schema::Cluster, p: &mut Problems) -> Option<Option<ClusterSettings>> {
    let url = p.value("cluster.redis_url", c.redis_url);
    let password_file = p.value("cluster.redis_password_file", c.redis_password_file);
    let key_prefix = p.check("cluster.key_prefix", c.key_prefix, |prefix| {
        if prefix.is_empty() || prefix.chars().any(char::is_whitespace) {
            Err(format!(
                "{prefix:?} is not a key prefix (non-empty, no whitespace)"
            ))
        } else {
            Ok(prefix)
        }
    });
    let max_staleness = p.check(
        "cluster.max_staleness_ms",
        c.max_staleness_ms,
        positive_millis,
    );
    let write_policy = p.value("cluster.write_policy", c.write_policy);
    let shared_cache = p.value("cluster.shared_cache", c.shared_cache);
    let shared_token = p.value("cluster.shared_token", c.shared_token);
    let shared_timeout = p.check(
        "cluster.shared_timeout_ms",
        c.shared_timeout_ms,
        positive_millis,
    );
    let shared_keys = p.check(
        "cluster.shared_key_file",
        c.shared_key_file,
        key_file("a shared-tier key"),
    );
    let shared_on = [
        ("cluster.shared_cache", shared_cache),
        ("cluster.shared_token", shared_token),
    ]
    .into_iter()
    .filter(|(_, on)| *on == Some(true))
    .map(|(key, _)| key)
    .collect::<Vec<_>>();

    let (url, password_file) = (url?, password_file?);
    if url.is_empty() {
        for key in &shared_on {
            p.at(
                key,
                "true needs cluster.redis_url (the shared tier lives in Redis)",
            );
        }
        if !password_file.is_empty() {
            p.at(
                "cluster.redis_password_file",
                "is set but cluster.redis_url is empty (no cluster to connect to)",
            );
            return None;
        }
        return shared_on.is_empty().then_some(None);
    }
    let keys_missing = !shared_on.is_empty() && shared_keys.as_ref().is_some_and(Vec::is_empty);
    if keys_missing {
        for key in &shared_on {
            p.at(
                key,
                "true needs cluster.shared_key_file (the shared tier's keys, the same on every \
                 instance)",
            );
        }
    }
    let redis = p.take("cluster.redis_url", RedisUrl::parse(&url));
    let file_password = if password_file.is_empty() {
        Some(None)
    } else {
        p.take(
            "cluster.redis_password_file",
            read_secret_file(&password_file),
        )
        .map(Some)
    };
    let (mut redis, file_password) = (redis?, file_password?);
    let redis_password = match (redis.password.take(), file_password) {
        (Some(_), Some(_)) => {
            p.general(
                "cluster.redis_url has a password and cluster.redis_password_file is set; \
                 give exactly one",
            );
            return None;
        }
        (from_url, from_file) => from_url.or(from_file),
    };
    if keys_missing {
        return None;
    }
    Some(Some(ClusterSettings {
        redis_url: redis.without_password(),
        redis_password,
        key_prefix: key_prefix?,
        max_staleness: max_staleness?,
        write_policy: write_policy?,
        shared_cache: shared_cache?,
        shared_token: shared_token?,
        shared_keys: shared_keys?,
        shared_timeout: shared_timeout?,
    }))
}

fn oauth(o: schema::OAuth, clustered: bool, p: &mut Problems) -> Option<OAuthSettings> {
    let enabled = p.value("oauth.enabled", o.enabled);
    let token_ttl = p.check("oauth.token_ttl_s", o.token_ttl_s, positive_secs);
    let signing_keys = p.check(
        "oauth.signing_key_file",
        o.signing_key_file,
        key_file("a signing key"),
    );
    if clustered && enabled == Some(true) && signing_keys.as_ref().is_some_and(Vec::is_empty) {
        p.at(
            "oauth.signing_key_file",
            "must be set when cluster.redis_url is set and oauth.enabled = true \
             (with a random key per process, the other instances would reject this one's tokens)",
        );
    }
    Some(OAuthSettings {
        enabled: enabled?,
        token_ttl: token_ttl?,
        signing_keys: signing_keys?,
    })
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Names and key digests already taken, with the index of the client that took each.
#[derive(Default)]
struct Taken {
    names: HashMap<String, usize>,
    keys: HashMap<[u8; 32], usize>,
}

fn clients(entries: Vec<schema::Client>, p: &mut Problems) -> Option<Vec<ClientSettings>> {
    let mut taken = Taken::default();
    // Every client is checked before any failure counts.
    let checked: Vec<Option<ClientSettings>> = entries
        .into_iter()
        .enumerate()
        .map(|(i, entry)| client(i, entry, &mut taken, p))
        .collect();
    checked.into_iter().collect()
}

fn client(
    i: usize,
    c: schema::Client,
    taken: &mut Taken,
    p: &mut Problems,
) -> Option<ClientSettings> {
    let key = |field: &str| format!("clients[{i}].{field}");

    let name = match c.name {
        None => {
            p.general(format!("{} is required", key("name")));
            None
        }
        Some(name) => p.check(&key("name"), name, |name| {
            client_name(&name)?;
            match taken.names.get(&name) {
                Some(first) => Err(format!("{name:?} is already used by clients[{first}]")),
                None => {
                    taken.names.insert(name.clone(), i);
                    Ok(name)
                }
            }
        }),
    };

    let key_sha256 = match (c.api_key, c.api_key_file, c.api_key_sha256) {
        (Some(api_key), None, None) => p.check(&key("api_key"), api_key, |api_key| {
            api_key_digest(&api_key, "the API key")
        }),
        (None, Some(file), None) => p.check(&key("api_key_file"), file, |path| {
            let api_key = read_secret_file(&path)?;
            api_key_digest(api_key.expose(), &format!("the API key in '{path}'"))
        }),
        (None, None, Some(hex)) => p.check(&key("api_key_sha256"), hex, |hex| {
            decode_sha256_hex(&hex)
                .ok_or_else(|| "must be 64 hexadecimal characters (the SHA-256 of the key)".into())
        }),
        (None, None, None) => {
            p.general(format!(
                "{} (or api_key_file or api_key_sha256) is required",
                key("api_key")
            ));
            None
        }
        (api_key, file, hex) => {
            let given: Vec<&str> = [
                ("api_key", api_key.is_some()),
                ("api_key_file", file.is_some()),
                ("api_key_sha256", hex.is_some()),
            ]
            .into_iter()
            .filter_map(|(field, set)| set.then_some(field))
            .collect();
            p.general(format!(
                "clients[{i}]: give exactly one of api_key, api_key_file, api_key_sha256 (found {})",
                given.join(", ")
            ));
            None
        }
    };
    let key_sha256 = key_sha256.filter(|digest| match taken.keys.get(digest) {
        Some(first) => {
            p.general(format!(
                "clients[{i}]: has the same API key as clients[{first}]; each client needs its own key"
            ));
            false
        }
        None => {
            taken.keys.insert(*digest, i);
            true
        }
    });

    let permissions = match c.permissions {
        None => {
            p.general(format!(
                "{} is required (a list of read, write, admin)",
                key("permissions")
            ));
            None
        }
        Some(list) => p.check(&key("permissions"), list, permissions),
    };

    Some(ClientSettings {
        name: name?,
        key_sha256: key_sha256?,
        permissions: permissions?,
    })
}

fn client_name(name: &str) -> Result<(), String> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() {
        Err("must not be empty".to_owned())
    } else if name.len() > MAX_CLIENT_NAME || !valid_chars {
        Err(format!(
            "{name:?} is not a client name (1 to {MAX_CLIENT_NAME} of A-Z a-z 0-9 . _ -)"
        ))
    } else if name == ANONYMOUS {
        Err(format!(
            "{ANONYMOUS:?} is reserved (the metric label of unauthenticated requests)"
        ))
    } else {
        Ok(())
    }
}

/// The SHA-256 of a plain API key (`what` says where it came from; the key is never echoed).
fn api_key_digest(api_key: &str, what: &str) -> Result<[u8; 32], String> {
    if api_key.chars().count() < MIN_API_KEY {
        Err(format!("{what} must be at least {MIN_API_KEY} characters"))
    } else if !api_key.bytes().all(|b| b.is_ascii_graphic()) {
        Err(format!(
            "{what} must be printable ASCII without spaces (it is sent in a header)"
        ))
    } else {
        Ok(ClientSettings::key_digest(api_key.as_bytes()))
    }
}

fn decode_sha256_hex(digits: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(digits, &mut digest).ok()?;
    Some(digest)
}

fn permissions(list: Vec<String>) -> Result<Permissions, String> {
    if list.is_empty() {
        return Err("must not be empty (a list of read, write, admin)".to_owned());
    }
    let mut permissions = Permissions::default();
    let mut unknown = Vec::new();
    for permission in &list {
        match permission.as_str() {
            "read" => permissions.read = true,
            "write" => permissions.write = true,
            "admin" => permissions.admin = true,
            other => unknown.push(format!(
                "unknown permission {other:?}; allowed: read, write, admin"
            )),
        }
    }
    if unknown.is_empty() {
        Ok(permissions)
    } else {
        Err(unknown.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        test_support::{errors, has, minimal, minimal_with, TempDir, API_KEY, SECRET},
        ClientAuth, ConfigErrors, LogFormat, Region, WritePolicy,
    };

    fn digest(key: &str) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(key.as_bytes()).into()
    }

    const SIGNING_KEY: &str = "signing-key-0123456789abcdef0123456789";

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
        assert_eq!(s.server.listen_backlog, 1024);
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
        assert_eq!(t.max_concurrent, 100);
        assert_eq!(t.max_requests_per_s, None);
        let breaker = t.breaker.unwrap();
        assert_eq!(breaker.failures.get(), 5);
        assert_eq!(breaker.cooldown, Duration::from_millis(5000));
        assert_eq!(s.token.refresh_margin, Duration::from_secs(60));
        assert!(s.cache.enabled);
        assert_eq!(s.cache.ttl, Duration::from_secs(300));
        assert_eq!(s.cache.not_found_ttl, Duration::from_secs(30));
        assert_eq!(s.cache.max_entries, 1_000_000);
        assert_eq!(s.cache.stale_if_error, None);
        assert_eq!(s.cache.refresh_ahead, None);
        assert!(s.cluster.is_none());
        assert!(s.oauth.enabled);
        assert_eq!(s.oauth.token_ttl, Duration::from_secs(3600));
        assert!(s.oauth.signing_keys.is_empty());
        assert!(s.auth.required);
        assert_eq!(s.clients.len(), 1);
        assert_eq!(s.clients[0].name, "studio-ivr");
        assert_eq!(s.clients[0].key_sha256, digest(API_KEY));
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
            let toml = minimal_with("talkdesk", &format!("region = \"{region}\""));
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
        let with_credentials =
            minimal_with("talkdesk", "api_base_url = \"https://user:pw@example.com\"");
        let list = errors(&with_credentials);
        assert_eq!(
            list,
            vec!["talkdesk.api_base_url: must not contain credentials (user@host)".to_owned()]
        );
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
listen_backlog = 0

[log]
format = "xml"

[talkdesk]
region = "us"
client_auth = "jwt"
scopes = []
max_concurrent = 0

[token]
refresh_margin_s = 0

[cache]
ttl_s = 0
max_entries = 0

[cluster]
key_prefix = ""
shared_cache = true

[oauth]
token_ttl_s = 0

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
            "server.listen_backlog: must be greater than 0",
            "log.format: \"xml\" is not a log format",
            "talkdesk.region: \"us\" is not a region; allowed: com, eu, ca, au",
            "talkdesk.client_auth: \"jwt\"",
            "talkdesk.account or talkdesk.token_url is required",
            "talkdesk.client_id is required",
            "talkdesk.client_secret (or talkdesk.client_secret_file) is required",
            "talkdesk.scopes: must not be empty",
            "talkdesk.max_concurrent: must be greater than 0",
            "token.refresh_margin_s: must be greater than 0",
            "cache.ttl_s: must be greater than 0",
            "cache.max_entries: must be greater than 0",
            "cluster.key_prefix: \"\" is not a key prefix",
            "cluster.shared_cache: true needs cluster.redis_url",
            "oauth.token_ttl_s: must be greater than 0",
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
    fn wrong_types_name_their_key_and_do_not_hide_the_others() {
        let toml = minimal_with(
            "server",
            "listen = 8080\nmax_connections = -1\nmax_body_bytes = 1.5\nlisten_backlog = 5000000000",
        )
        .replace("permissions = [\"read\", \"write\"]", "permissions = [\"read\", 1]");
        let list = errors(&toml);
        assert_eq!(
            list,
            vec![
                "server.listen: expected a string, got integer 8080".to_owned(),
                "server.max_body_bytes: expected a non-negative integer, got float 1.5".to_owned(),
                "server.max_connections: expected a non-negative integer, got integer -1".to_owned(),
                "server.listen_backlog: expected an integer from 0 to 4294967295, got integer 5000000000"
                    .to_owned(),
                "clients[0].permissions: expected an array of strings, got an array".to_owned(),
            ]
        );
    }

    #[test]
    fn refresh_margin_must_be_positive() {
        let list = errors(&minimal_with("token", "refresh_margin_s = 0"));
        assert_eq!(
            list,
            vec!["token.refresh_margin_s: must be greater than 0".to_owned()]
        );
    }

    #[test]
    fn talkdesk_limits_and_breaker() {
        let toml = minimal_with(
            "talkdesk",
            "max_concurrent = 8\nmax_requests_per_s = 50\nbreaker_failures = 0",
        );
        let t = Settings::from_toml_str(&toml).unwrap().talkdesk;
        assert_eq!(t.max_concurrent, 8);
        assert_eq!(t.max_requests_per_s.map(NonZeroU32::get), Some(50));
        assert!(t.breaker.is_none(), "0 = no breaker");

        let list = errors(&minimal_with(
            "talkdesk",
            "max_concurrent = 0\nbreaker_cooldown_ms = 0\nmax_requests_per_s = -1",
        ));
        assert_eq!(list.len(), 3, "{list:#?}");
        assert!(has(
            &list,
            "talkdesk.max_concurrent: must be greater than 0"
        ));
        assert!(has(
            &list,
            "talkdesk.breaker_cooldown_ms: must be greater than 0"
        ));
        assert!(has(
            &list,
            "talkdesk.max_requests_per_s: expected an integer"
        ));
    }

    #[test]
    fn stale_and_refresh_ahead() {
        let toml = minimal_with(
            "cache",
            "ttl_s = 60\nstale_if_error_s = 600\nrefresh_ahead_s = 10",
        );
        let c = Settings::from_toml_str(&toml).unwrap().cache;
        assert_eq!(c.stale_if_error, Some(Duration::from_secs(600)));
        assert_eq!(c.refresh_ahead, Some(Duration::from_secs(10)));

        let list = errors(&minimal_with("cache", "ttl_s = 60\nrefresh_ahead_s = 60"));
        assert_eq!(
            list,
            vec![
                "cache.refresh_ahead_s: must be less than cache.ttl_s (60), or 0 to turn \
                 refreshing ahead off"
                    .to_owned()
            ]
        );
        // Not checked against a TTL that is not in use.
        let off = minimal_with("cache", "enabled = false\nttl_s = 0\nrefresh_ahead_s = 60");
        assert!(Settings::from_toml_str(&off).is_ok());
    }

    #[test]
    fn cluster_settings_and_password_from_a_file() {
        let dir = TempDir::new("cluster");
        let password = dir.file("redis-password", "from-file-pw\n");
        let toml = minimal_with(
            "cluster",
            &format!(
                "redis_url = \"rediss://redis.internal\"\nredis_password_file = {password:?}\n\
                 key_prefix = \"tenant-a\"\nmax_staleness_ms = 250\nwrite_policy = \"best_effort\"\n\
                 [oauth]\nsigning_key_file = {:?}",
                dir.file("keys", SIGNING_KEY)
            ),
        );
        let s = Settings::from_toml_str(&toml).unwrap();
        let cluster = s.cluster.unwrap();
        assert_eq!(cluster.redis_url, "rediss://redis.internal:6379/0");
        assert_eq!(
            cluster.redis_password.as_ref().map(Secret::expose),
            Some("from-file-pw")
        );
        assert_eq!(cluster.key_prefix, "tenant-a");
        assert_eq!(cluster.max_staleness, Duration::from_millis(250));
        assert_eq!(cluster.write_policy, WritePolicy::BestEffort);
        assert!(!cluster.shared_cache && !cluster.shared_token);
    }

    #[test]
    fn cluster_problems() {
        let dir = TempDir::new("cluster-bad");
        let password = dir.file("redis-password", "from-file-pw\n");
        let toml = minimal_with(
            "cluster",
            &format!(
                "redis_url = \"redis://:url-pw@redis\"\nredis_password_file = {password:?}\n\
                 key_prefix = \"a b\"\nmax_staleness_ms = 0\nwrite_policy = \"sometimes\"\n\
                 shared_cache = true\nshared_token = true\n[oauth]\nenabled = false"
            ),
        );
        let list = errors(&toml);
        for needle in [
            "cluster.key_prefix: \"a b\" is not a key prefix (non-empty, no whitespace)",
            "cluster.max_staleness_ms: must be greater than 0",
            "cluster.write_policy: \"sometimes\" is not a write policy; allowed: require, best_effort",
            "cluster.shared_cache: true needs cluster.shared_key_file",
            "cluster.shared_token: true needs cluster.shared_key_file",
            "cluster.redis_url has a password and cluster.redis_password_file is set",
        ] {
            assert!(has(&list, needle), "missing {needle:?} in {list:#?}");
        }
        assert_eq!(list.len(), 6, "{list:#?}");
        assert!(!list
            .iter()
            .any(|e| e.contains("url-pw") || e.contains("from-file-pw")));

        let list = errors(&minimal_with(
            "cluster",
            "redis_url = \"redis://user:pw@redis:port\"\n[oauth]\nenabled = false",
        ));
        assert_eq!(
            list,
            vec!["cluster.redis_url: the port \"port\" is not a number from 1 to 65535".to_owned()]
        );
        let list = errors(&minimal_with("cluster", "redis_password_file = \"/x\""));
        assert_eq!(
            list,
            vec![
                "cluster.redis_password_file: is set but cluster.redis_url is empty \
                 (no cluster to connect to)"
                    .to_owned()
            ]
        );
    }

    #[test]
    fn shared_tier_settings() {
        let dir = TempDir::new("shared-tier");
        let keys = dir.file(
            "shared-keys",
            &format!("# in use\n{SIGNING_KEY}\nolder-key-0123456789abcdef0123456789\n"),
        );
        let toml = minimal_with(
            "cluster",
            &format!(
                "redis_url = \"redis://redis\"\nshared_cache = true\nshared_token = true\n\
                 shared_key_file = {keys:?}\nshared_timeout_ms = 20\n[oauth]\nenabled = false"
            ),
        );
        let cluster = Settings::from_toml_str(&toml).unwrap().cluster.unwrap();
        assert!(cluster.shared_cache && cluster.shared_token);
        assert_eq!(cluster.shared_keys.len(), 2);
        assert_eq!(cluster.shared_keys[0].expose(), SIGNING_KEY);
        assert_eq!(cluster.shared_timeout, Duration::from_millis(20));

        let short = dir.file("short", "too-short\n");
        let list = errors(&minimal_with(
            "cluster",
            &format!(
                "redis_url = \"redis://redis\"\nshared_cache = true\nshared_key_file = {short:?}\n\
                 [oauth]\nenabled = false"
            ),
        ));
        assert!(
            has(&list, "cluster.shared_key_file: a shared-tier key must be at least 32 bytes; shorter: line 1"),
            "{list:#?}"
        );
        assert!(!list.iter().any(|e| e.contains("too-short")));
        let list = errors(&minimal_with(
            "cluster",
            &format!(
                "redis_url = \"redis://redis\"\nshared_cache = true\nshared_key_file = {keys:?}\n\
                 [cache]\nenabled = false\n[oauth]\nenabled = false"
            ),
        ));
        assert_eq!(
            list,
            vec!["cluster.shared_cache: true needs cache.enabled = true (the shared tier is the second tier behind it)"]
        );
        let list = errors(&minimal_with(
            "cluster",
            &format!(
                "redis_url = \"redis://redis\"\nshared_token = true\nshared_key_file = {keys:?}\n\
                 shared_timeout_ms = 10000\n[oauth]\nenabled = false"
            ),
        ));
        assert_eq!(
            list,
            vec!["cluster.shared_timeout_ms: must be less than server.request_timeout_ms (10000)"]
        );
        assert!(!list.iter().any(|e| e.contains(SIGNING_KEY)));
    }

    #[test]
    fn random_signing_key_refused_in_a_cluster() {
        let clustered = minimal_with("cluster", "redis_url = \"redis://redis\"");
        let list = errors(&clustered);
        assert_eq!(list.len(), 1, "{list:#?}");
        assert!(list[0].starts_with(
            "oauth.signing_key_file: must be set when cluster.redis_url is set and oauth.enabled = true"
        ));
        // Fine without the token endpoint, or with a key file.
        let disabled = format!("{clustered}\n[oauth]\nenabled = false\n");
        assert!(Settings::from_toml_str(&disabled).is_ok());
        let dir = TempDir::new("oauth-cluster");
        let keys = dir.file("keys", SIGNING_KEY);
        let with_key = format!("{clustered}\n[oauth]\nsigning_key_file = {keys:?}\n");
        let s = Settings::from_toml_str(&with_key).unwrap();
        assert_eq!(s.oauth.signing_keys.len(), 1);
        assert_eq!(s.oauth.signing_keys[0].expose(), SIGNING_KEY);
    }

    #[test]
    fn signing_key_problems_name_the_file() {
        let dir = TempDir::new("oauth-short");
        let keys = dir.file("keys", "too-short\n");
        let list = errors(&minimal_with(
            "oauth",
            &format!("signing_key_file = {keys:?}\ntoken_ttl_s = 0"),
        ));
        assert_eq!(list.len(), 2, "{list:#?}");
        assert!(has(&list, "oauth.token_ttl_s: must be greater than 0"));
        assert!(has(
            &list,
            &format!("oauth.signing_key_file: a signing key must be at least 32 bytes; shorter: line 1 of '{keys}'")
        ));
        assert!(!has(&list, "too-short"));
    }

    #[test]
    fn bad_region_names_key_and_allowed_values() {
        let list = errors(&minimal_with("talkdesk", "region = \"us\""));
        assert_eq!(
            list,
            vec!["talkdesk.region: \"us\" is not a region; allowed: com, eu, ca, au".to_owned()]
        );
    }

    #[test]
    fn bad_log_filter_is_named() {
        let list = errors(&minimal_with("log", "level = \"consent_proxy=loud\""));
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
        let both = minimal_with("talkdesk", "client_secret_file = \"/x\"");
        assert!(has(&errors(&both), "both set"));
    }

    #[test]
    fn secret_files_are_read_and_trimmed() {
        let dir = TempDir::new("secrets");
        let secret = dir.file("secret", "file-secret\n");
        let key = dir.file("apikey", "file-key-0123456789\r\n");
        let toml = minimal()
            .replace(
                &format!("client_secret = \"{SECRET}\""),
                &format!("client_secret_file = {secret:?}"),
            )
            .replace(
                &format!("api_key = \"{API_KEY}\""),
                &format!("api_key_file = {key:?}"),
            );
        let s = Settings::from_toml_str(&toml).unwrap();
        assert_eq!(s.talkdesk.client_secret.expose(), "file-secret");
        assert_eq!(s.clients[0].key_sha256, digest("file-key-0123456789"));

        let missing = toml.replace(&secret, "/nonexistent/consent-proxy-secret");
        let list = errors(&missing);
        assert!(
            has(
                &list,
                "talkdesk.client_secret_file: cannot read '/nonexistent/consent-proxy-secret'"
            ),
            "{list:?}"
        );
        let empty = dir.file("empty", "\n");
        let list = errors(&toml.replace(&key, &empty));
        assert_eq!(
            list,
            vec![format!("clients[0].api_key_file: file '{empty}' is empty")]
        );
    }

    #[test]
    fn api_key_sha256_accepted() {
        let hex: String = digest(API_KEY).iter().map(|b| format!("{b:02X}")).collect();
        let toml = minimal().replace(
            &format!("api_key = \"{API_KEY}\""),
            &format!("api_key_sha256 = \"{hex}\""),
        );
        let s = Settings::from_toml_str(&toml).unwrap();
        assert_eq!(s.clients[0].key_sha256, digest(API_KEY));
        // A sign is not a hex digit.
        assert_eq!(decode_sha256_hex(&format!("+f{}", &hex[2..])), None);
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

        let reserved = minimal().replace("name = \"studio-ivr\"", &format!("name = {ANONYMOUS:?}"));
        assert!(has(
            &errors(&reserved),
            "clients[0].name: \"anonymous\" is reserved"
        ));
    }
}
