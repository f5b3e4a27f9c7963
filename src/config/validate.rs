//! Validation: the deserialised schema into the runtime [`Settings`]. Every key is checked and
//! every problem recorded before anything is built, so one bad value never hides another; the
//! settings exist only when nothing was wrong (each section is `Some` only when all its values
//! are).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use crate::jws::{Algorithm, SigningKey};

use super::{
    files::{read_text, FileKind},
    log_level::log_filter,
    problems::Problems,
    redact,
    redis_url::{parse_sentinel, RedisUrl},
    schema::{self, Field},
    secret_files::{read_keys, read_secret_file, FromFiles},
    AuthSettings, BreakerSettings, CacheSettings, ClientAuth, ClientCredential, ClientSettings,
    ClusterSettings, EgressSettings, ExtraRoots, LogSettings, OAuthSettings, OtelSettings,
    Permissions, ProxyEndpoint, Secret, SentinelSettings, ServerSettings, Settings,
    TalkdeskSettings, TlsFiles, TokenSettings, ANONYMOUS,
};
use crate::wire::forwarded::{Network, TrustedProxies};

const MAX_CLIENT_NAME: usize = 64;
const MIN_API_KEY: usize = 16;

pub(super) fn settings(file: schema::ConfigFile, p: &mut Problems) -> Option<Settings> {
    let shown = file.clone();
    let clustered = matches!(&file.cluster.redis_url.0, Ok(url) if !url.is_empty())
        || matches!(&file.cluster.sentinels.0, Ok(sentinels) if !sentinels.is_empty());
    let client_count = file.clients.len();

    let server = server(file.server, p);
    let log = log(file.log, p);
    let talkdesk = talkdesk(file.talkdesk, p);
    let egress = egress(file.egress, p);
    let token = p
        .check(
            "token.refresh_margin_s",
            file.token.refresh_margin_s,
            positive_secs,
        )
        .map(|refresh_margin| TokenSettings { refresh_margin });
    let cache = cache(file.cache, p);
    let mut cluster = cluster(file.cluster, p);
    if let (Some(Some(cluster)), Some(Some(roots))) = (
        cluster.as_mut(),
        egress.as_ref().map(|egress| &egress.extra_roots),
    ) {
        cluster.tls_roots_pem = Some(roots.pem.clone());
    }
    shared_tier_fits(cluster.as_ref(), cache.as_ref(), server.as_ref(), p);
    let oauth = oauth(file.oauth, clustered, p);
    let audit = audit::audit(file.audit, p);
    let auth = p
        .value("auth.required", file.auth.required)
        .map(|required| AuthSettings { required });
    let clients = clients(file.clients, p);
    let otel = otel(file.otel, p);
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
        egress: egress?,
        token: token?,
        cache: cache?,
        cluster: cluster?,
        oauth: oauth?,
        audit: audit?,
        clients: clients?,
        auth: auth?,
        otel: otel?,
        warnings: Vec::new(),
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

/// The least `cluster.max_staleness_ms`: 40 heartbeats a second per instance.
const MIN_STALENESS_MS: u64 = 100;

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

/// The keys in the key file or directory `key` names; none when it is empty (not set).
fn key_file(key: &str, field: Field<String>, what: &str, p: &mut Problems) -> Option<Vec<Secret>> {
    let path = p.value(key, field)?;
    let keys = if path.is_empty() {
        Ok(FromFiles {
            value: Vec::new(),
            warnings: Vec::new(),
        })
    } else {
        read_keys(&path, what)
    };
    p.take_file(key, keys)
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

/// A file that can be read within its kind's bound and checks (the TLS files, which the
/// listener reads again when it starts).
fn readable_file(path: &str, kind: FileKind) -> Result<FromFiles<()>, String> {
    read_text(Path::new(path), kind).map(|read| FromFiles {
        value: (),
        warnings: read.warning.into_iter().collect(),
    })
}

/// Whether two listeners could not both be bound: the same port (not 0, with which the kernel
/// picks two) on overlapping addresses. An unspecified address covers its family, and `[::]`
/// covers IPv4 too (Linux binds it dual-stack unless `net.ipv6.bindv6only` is set);
/// `::ffff:a.b.c.d` is the IPv4 address `a.b.c.d`.
pub(super) fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (a, b) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers =
        |wide: IpAddr, other: IpAddr| wide.is_unspecified() && (wide.is_ipv6() || other.is_ipv4());
    a == b || covers(a, b) || covers(b, a)
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
        if listeners_collide(listen, admin_listen) {
            p.at(
                "server.admin_listen",
                format!(
                    "{admin_listen} collides with server.listen ({listen}): the same port on \
                     overlapping addresses; give it another port"
                ),
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
    let trusted_proxies = p.check("server.trusted_proxies", s.trusted_proxies, |entries| {
        let networks = entries
            .iter()
            .map(|entry| Network::parse(entry))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies::new(networks))
    });
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
        trusted_proxies: trusted_proxies?,
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
            let cert_readable = p.take_file(
                "server.tls_cert_file",
                readable_file(&cert, FileKind::Certificates),
            );
            let key_readable =
                p.take_file("server.tls_key_file", readable_file(&key, FileKind::Secret));
            cert_readable.and(key_readable)?;
            Some(Some(TlsFiles {
                cert_file: PathBuf::from(cert),
                key_file: PathBuf::from(key),
            }))
        }
    }
}

fn log(l: schema::Log, p: &mut Problems) -> Option<LogSettings> {
    let level = p.check("log.level", l.level, log_filter);
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
    let client_auth = p.value("talkdesk.client_auth", t.client_auth);
    let client_credential = client_credential(
        client_auth,
        CredentialKeys {
            secret: t.client_secret,
            secret_file: t.client_secret_file,
            private_key_file: t.private_key_file,
            key_id: t.key_id,
            key_algorithm: t.key_algorithm,
        },
        p,
    );
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
        client_credential: client_credential?,
        scopes: scopes?,
        timeout: timeout?,
        max_retries: max_retries?,
        max_response_bytes: max_response_bytes?,
        max_concurrent: max_concurrent?,
        max_requests_per_s: max_requests_per_s?,
        breaker: breaker?,
    })
}

/// The keys of `[talkdesk]` that say how the client authenticates.
struct CredentialKeys {
    secret: Field<String>,
    secret_file: Field<String>,
    private_key_file: Field<String>,
    key_id: Field<String>,
    key_algorithm: Field<Algorithm>,
}

/// A client secret for `basic` and `post`; a private key and its id, and no secret, for
/// `private_key_jwt`. Keys of the other method are refused rather than silently unused.
fn client_credential(
    auth: Option<ClientAuth>,
    keys: CredentialKeys,
    p: &mut Problems,
) -> Option<ClientCredential> {
    let private_key_file = p.value("talkdesk.private_key_file", keys.private_key_file);
    let key_id = p.value("talkdesk.key_id", keys.key_id);
    let algorithm = p.value("talkdesk.key_algorithm", keys.key_algorithm);
    // An unreadable `client_auth` is reported already; the secret's problems are still told.
    if auth != Some(ClientAuth::PrivateKeyJwt) {
        for (key, value) in [
            ("talkdesk.private_key_file", &private_key_file),
            ("talkdesk.key_id", &key_id),
        ] {
            if value.as_ref().is_some_and(|value| !value.is_empty()) {
                p.about(
                    key,
                    format!("{key} is used only with talkdesk.client_auth = \"private_key_jwt\""),
                );
            }
        }
        let secret = client_secret(keys.secret, keys.secret_file, p)?;
        return Some(ClientCredential::Secret {
            secret,
            auth: auth?,
        });
    }
    for (key, value) in [
        (
            "talkdesk.client_secret",
            p.value("talkdesk.client_secret", keys.secret),
        ),
        (
            "talkdesk.client_secret_file",
            p.value("talkdesk.client_secret_file", keys.secret_file),
        ),
    ] {
        if value.is_some_and(|value| !value.is_empty()) {
            p.about(
                key,
                format!("{key} must be empty with talkdesk.client_auth = \"private_key_jwt\" (the key signs instead)"),
            );
        }
    }
    let key_id = key_id.filter(|id| {
        let given = !id.trim().is_empty();
        if !given {
            p.about(
                "talkdesk.key_id",
                "talkdesk.key_id is required with private_key_jwt",
            );
        }
        given
    });
    let key = match private_key_file?.as_str() {
        "" => {
            p.about(
                "talkdesk.private_key_file",
                "talkdesk.private_key_file is required with private_key_jwt",
            );
            None
        }
        path => {
            let algorithm = algorithm?;
            p.take_file(
                "talkdesk.private_key_file",
                read_secret_file(path).and_then(|text| {
                    let key = SigningKey::from_text(text.value.expose(), algorithm)
                        .map_err(|e| format!("'{path}': {e}"))?;
                    Ok(text.map(|_| key))
                }),
            )
        }
    };
    Some(ClientCredential::PrivateKey {
        key: Arc::new(key?),
        key_id: key_id?,
    })
}

/// Exactly one of `talkdesk.client_secret` and `talkdesk.client_secret_file`.
fn client_secret(inline: Field<String>, file: Field<String>, p: &mut Problems) -> Option<Secret> {
    let inline = p.value("talkdesk.client_secret", inline);
    let file = p.value("talkdesk.client_secret_file", file);
    let (inline, file) = (inline?, file?);
    match (inline.is_empty(), file.is_empty()) {
        (false, true) => Some(Secret::new(inline)),
        (true, false) => p.take_file("talkdesk.client_secret_file", read_secret_file(&file)),
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

fn egress(e: schema::Egress, p: &mut Problems) -> Option<EgressSettings> {
    let inline = p.value("egress.proxy_url", e.proxy_url);
    let file = p.value("egress.proxy_url_file", e.proxy_url_file);
    let extra_roots = p.check("egress.ca_file", e.ca_file, |path| {
        (!path.is_empty()).then(|| extra_roots(&path)).transpose()
    });
    let proxy = match (inline?, file?) {
        (inline, file) if inline.is_empty() && file.is_empty() => None,
        (inline, file) if !inline.is_empty() && !file.is_empty() => {
            p.general("egress.proxy_url and egress.proxy_url_file are both set; give at most one");
            return None;
        }
        (inline, _) if !inline.is_empty() => {
            Some(p.take("egress.proxy_url", ProxyEndpoint::parse(&inline))?)
        }
        (_, file) => Some(p.take_file(
            "egress.proxy_url_file",
            read_secret_file(&file).and_then(|url| {
                let endpoint = ProxyEndpoint::parse(url.value.expose())?;
                Ok(url.map(|_| endpoint))
            }),
        )?),
    };
    Some(EgressSettings {
        proxy,
        extra_roots: extra_roots?,
    })
}

/// PEM certificates, each usable as a trust anchor, at least one.
fn extra_roots(path: &str) -> Result<ExtraRoots, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let pem = read_text(std::path::Path::new(path), FileKind::Certificates)?
        .text
        .into_bytes();
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("'{path}' is not PEM certificates: {e}"))?;
    if certificates.is_empty() {
        return Err(format!("'{path}' holds no PEM certificate"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, certificate) in certificates.iter().enumerate() {
        roots.add(certificate.clone()).map_err(|e| {
            format!(
                "certificate {} of '{path}' is not a usable root: {e}",
                i + 1
            )
        })?;
    }
    Ok(ExtraRoots { certificates, pem })
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

/// `Some(None)`: no cluster (`redis_url = ""` and no `sentinels`).
fn cluster(c: schema::Cluster, p: &mut Problems) -> Option<Option<ClusterSettings>> {
    let url = p.value("cluster.redis_url", c.redis_url);
    let sentinels = p.value("cluster.sentinels", c.sentinels);
    let sentinel_master = p.value("cluster.sentinel_master", c.sentinel_master);
    let sentinel_password_file =
        p.value("cluster.sentinel_password_file", c.sentinel_password_file);
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
    let max_staleness = p.check("cluster.max_staleness_ms", c.max_staleness_ms, |ms| {
        // A heartbeat every max_staleness_ms / 4: below the floor an instance would spend more
        // Redis commands on proving its feed live than a fleet's writes cost.
        if ms < MIN_STALENESS_MS {
            Err(format!(
                "{ms} is below {MIN_STALENESS_MS} (each instance publishes a heartbeat every \
                 max_staleness_ms / 4)"
            ))
        } else {
            Ok(Duration::from_millis(ms))
        }
    });
    let write_policy = p.value("cluster.write_policy", c.write_policy);
    let shared_cache = p.value("cluster.shared_cache", c.shared_cache);
    let shared_token = p.value("cluster.shared_token", c.shared_token);
    let shared_timeout = p.check(
        "cluster.shared_timeout_ms",
        c.shared_timeout_ms,
        positive_millis,
    );
    let shared_keys = key_file(
        "cluster.shared_key_file",
        c.shared_key_file,
        "a shared-tier key",
        p,
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
    let (sentinels, sentinel_master, sentinel_password_file) =
        (sentinels?, sentinel_master?, sentinel_password_file?);
    if url.is_empty() && sentinels.is_empty() {
        for key in &shared_on {
            p.at(
                key,
                "true needs cluster.redis_url or cluster.sentinels (the shared tier lives in Redis)",
            );
        }
        let stray = [
            ("cluster.redis_password_file", password_file.is_empty()),
            ("cluster.sentinel_master", sentinel_master.is_empty()),
            (
                "cluster.sentinel_password_file",
                sentinel_password_file.is_empty(),
            ),
        ]
        .into_iter()
        .filter(|(_, empty)| !empty)
        .map(|(key, _)| key)
        .collect::<Vec<_>>();
        for key in &stray {
            p.at(
                key,
                "is set but cluster.redis_url and cluster.sentinels are empty (no cluster to \
                 connect to)",
            );
        }
        return (shared_on.is_empty() && stray.is_empty()).then_some(None);
    }
    if !url.is_empty() && !sentinels.is_empty() {
        p.general(
            "cluster.redis_url and cluster.sentinels are both set; give exactly one (the \
             sentinels name the master)",
        );
        return None;
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
    let file_password = optional_secret_file(p, "cluster.redis_password_file", &password_file);
    let (redis_url, url_password, sentinel) = if sentinels.is_empty() {
        if !sentinel_master.is_empty() || !sentinel_password_file.is_empty() {
            p.general(
                "cluster.sentinel_master and cluster.sentinel_password_file need \
                 cluster.sentinels (with cluster.redis_url there is no sentinel to ask)",
            );
            return None;
        }
        let mut redis = p.take("cluster.redis_url", RedisUrl::parse(&url))?;
        let password = redis.password.take();
        (redis.without_password(), password, None)
    } else {
        let sentinel = sentinel_settings(p, sentinels, sentinel_master, &sentinel_password_file)?;
        (
            format!("sentinel://{}", sentinel.master),
            None,
            Some(sentinel),
        )
    };
    let redis_password = match (url_password, file_password?) {
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
        redis_url,
        sentinel,
        redis_password,
        key_prefix: key_prefix?,
        max_staleness: max_staleness?,
        write_policy: write_policy?,
        shared_cache: shared_cache?,
        shared_token: shared_token?,
        shared_keys: shared_keys?,
        shared_timeout: shared_timeout?,
        tls_roots_pem: None,
    }))
}

/// The secret in the file at `path` (`key`'s value), `Some(None)` when `path` is empty.
fn optional_secret_file(p: &mut Problems, key: &str, path: &str) -> Option<Option<Secret>> {
    if path.is_empty() {
        return Some(None);
    }
    p.take_file(key, read_secret_file(path)).map(Some)
}

/// `cluster.sentinels` (not empty) with the master's name and the sentinels' password.
fn sentinel_settings(
    p: &mut Problems,
    entries: Vec<String>,
    master: String,
    password_file: &str,
) -> Option<SentinelSettings> {
    let password = optional_secret_file(p, "cluster.sentinel_password_file", password_file);
    if master.is_empty() {
        p.about(
            "cluster.sentinel_master",
            "cluster.sentinel_master is required with cluster.sentinels",
        );
    }
    let mut sentinels = Vec::new();
    let mut tls_modes = Vec::new();
    for entry in &entries {
        if let Some((tls, host, port)) = p.take("cluster.sentinels", parse_sentinel(entry)) {
            tls_modes.push(tls);
            sentinels.push((host, port));
        }
    }
    if tls_modes.iter().any(|&tls| tls != tls_modes[0]) {
        p.at(
            "cluster.sentinels",
            "mixes rediss:// and plain entries; TLS is on for every sentinel or none",
        );
        return None;
    }
    if sentinels.len() != entries.len() || master.is_empty() {
        return None;
    }
    Some(SentinelSettings {
        sentinels,
        master,
        tls: tls_modes[0],
        password: password?,
    })
}

fn oauth(o: schema::OAuth, clustered: bool, p: &mut Problems) -> Option<OAuthSettings> {
    let enabled = p.value("oauth.enabled", o.enabled);
    let token_ttl = p.check("oauth.token_ttl_s", o.token_ttl_s, positive_secs);
    let signing_keys = key_file(
        "oauth.signing_key_file",
        o.signing_key_file,
        "a signing key",
        p,
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

fn otel(o: schema::Otel, p: &mut Problems) -> Option<Option<OtelSettings>> {
    let endpoint = p.check("otel.endpoint", o.endpoint, |url| {
        if url.is_empty() {
            return Ok(url);
        }
        http_url(&url, false)?;
        Ok(url.trim_end_matches('/').to_owned())
    });
    let service_name = p.check("otel.service_name", o.service_name, |name| {
        if name.is_empty() || name.chars().any(char::is_control) {
            Err("must be a non-empty name without control characters".to_owned())
        } else {
            Ok(name)
        }
    });
    let sample_ratio = p.check("otel.sample_ratio", o.sample_ratio, |ratio| {
        if (0.0..=1.0).contains(&ratio) {
            Ok(ratio)
        } else {
            Err(format!("must be between 0 and 1, got {ratio}"))
        }
    });
    let endpoint = endpoint?;
    let (service_name, sample_ratio) = (service_name?, sample_ratio?);
    Some((!endpoint.is_empty()).then_some(OtelSettings {
        endpoint,
        service_name,
        sample_ratio,
    }))
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
        (None, Some(file), None) => {
            let key = key("api_key_file");
            let digest = p.check(&key, file, |path| {
                let api_key = read_secret_file(&path)?;
                let what = format!("the API key in '{path}'");
                let digest = api_key_digest(api_key.value.expose(), &what)?;
                Ok(api_key.map(|_| digest))
            });
            digest.and_then(|digest| p.take_file(&key, Ok(digest)))
        }
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

mod audit;
#[cfg(test)]
mod tests;
