//! Validation's unit tests: every key's checks, and that problems are all collected.

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
    assert_eq!(t.client_credential.secret().unwrap().expose(), SECRET);
    assert_eq!(t.client_credential.client_auth(), ClientAuth::Basic);
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
    .replace(
        "permissions = [\"read\", \"write\"]",
        "permissions = [\"read\", 1]",
    );
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

/// A heartbeat every `max_staleness_ms / 4`: below 100 ms an instance would flood Redis.
#[test]
fn max_staleness_has_a_floor_of_100_ms() {
    for (ms, refused) in [(1, true), (99, true), (100, false)] {
        let toml = minimal_with(
            "cluster",
            &format!(
                "redis_url = \"redis://redis\"\nmax_staleness_ms = {ms}\n[oauth]\nenabled = false"
            ),
        );
        let list = match Settings::from_toml_str(&toml) {
            Ok(_) => Vec::new(),
            Err(_) => errors(&toml),
        };
        assert_eq!(
            has(
                &list,
                &format!("cluster.max_staleness_ms: {ms} is below 100")
            ),
            refused,
            "{ms}: {list:#?}"
        );
        assert_eq!(list.is_empty(), !refused, "{ms}: {list:#?}");
    }
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
        "cluster.max_staleness_ms: 0 is below 100 (each instance publishes a heartbeat every \
         max_staleness_ms / 4)",
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
            "cluster.redis_password_file: is set but cluster.redis_url and cluster.sentinels \
             are empty (no cluster to connect to)"
                .to_owned()
        ]
    );
}

#[test]
fn sentinel_settings() {
    let dir = TempDir::new("sentinels");
    let toml = minimal_with(
        "cluster",
        &format!(
            "sentinels = [\"sentinel-0:26379\", \"[::1]:26380\"]\nsentinel_master = \"consent\"\n\
             sentinel_password_file = {:?}\nredis_password_file = {:?}\n[oauth]\nenabled = false",
            dir.file("sentinel-password", "sentinel-pw\n"),
            dir.file("redis-password", "node-pw\n"),
        ),
    );
    let cluster = Settings::from_toml_str(&toml).unwrap().cluster.unwrap();
    let sentinel = cluster.sentinel.unwrap();
    assert_eq!(
        sentinel.sentinels,
        vec![("sentinel-0".to_owned(), 26379), ("::1".to_owned(), 26380)]
    );
    assert_eq!(sentinel.master, "consent");
    assert!(!sentinel.tls);
    assert_eq!(
        sentinel.password.as_ref().map(Secret::expose),
        Some("sentinel-pw")
    );
    assert_eq!(
        cluster.redis_password.as_ref().map(Secret::expose),
        Some("node-pw")
    );
    assert_eq!(cluster.redis_url, "sentinel://consent");

    let tls = minimal_with(
        "cluster",
        "sentinels = [\"rediss://s0:26379\"]\nsentinel_master = \"m\"\n[oauth]\nenabled = false",
    );
    assert!(
        Settings::from_toml_str(&tls)
            .unwrap()
            .cluster
            .unwrap()
            .sentinel
            .unwrap()
            .tls
    );
}

#[test]
fn sentinel_problems() {
    for (cluster, expected) in [
        (
            "redis_url = \"redis://redis\"\nsentinels = [\"s0:26379\"]\nsentinel_master = \"m\"",
            "cluster.redis_url and cluster.sentinels are both set; give exactly one",
        ),
        (
            "sentinels = [\"s0:26379\"]",
            "cluster.sentinel_master is required with cluster.sentinels",
        ),
        (
            "sentinels = [\"s0:port\"]\nsentinel_master = \"m\"",
            "cluster.sentinels: the port \"port\" is not a number",
        ),
        (
            "sentinels = [\"rediss://s0:1\", \"s1:2\"]\nsentinel_master = \"m\"",
            "cluster.sentinels: mixes rediss:// and plain entries",
        ),
        (
            "redis_url = \"redis://redis\"\nsentinel_master = \"m\"",
            "cluster.sentinel_master and cluster.sentinel_password_file need cluster.sentinels",
        ),
        (
            "sentinel_master = \"m\"",
            "cluster.sentinel_master: is set but cluster.redis_url and cluster.sentinels are empty",
        ),
    ] {
        let list = errors(&minimal_with(
            "cluster",
            &format!("{cluster}\n[oauth]\nenabled = false"),
        ));
        assert_eq!(list.len(), 1, "{cluster}: {list:#?}");
        assert!(list[0].starts_with(expected), "{cluster}: {list:#?}");
    }
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
        has(
            &list,
            "cluster.shared_key_file: a shared-tier key must be at least 32 bytes; shorter: line 1"
        ),
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
fn log_level_typos_are_refused_with_the_level_meant() {
    // tracing reads each of these as a target to log at every level: nothing of the proxy
    // would be logged.
    for (typo, meant) in [
        ("deubg", "debug"),
        ("warning", "warn"),
        ("verbose", "debug"),
    ] {
        let list = errors(&minimal_with("log", &format!("level = {typo:?}")));
        assert_eq!(list.len(), 1, "{list:?}");
        assert!(
            list[0].starts_with(&format!(
                "log.level: {typo:?} is not a level; did you mean {meant:?}?"
            )),
            "{list:?}"
        );
    }
    let s = Settings::from_toml_str(&minimal_with("log", "level = \"consent_proxy=debug,info\""))
        .unwrap();
    assert_eq!(s.log.level, "consent_proxy=debug,info");
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
    assert_eq!(
        s.talkdesk.client_credential.secret().unwrap().expose(),
        "file-secret"
    );
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

/// A CA certificate in PEM (made by rcgen).
fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).unwrap().pem()
}

#[test]
fn egress_settings_from_a_proxy_url_file_and_a_ca_file() {
    let dir = TempDir::new("egress");
    let url = dir.file("proxy-url", "http://corp:pr0xy-pw@proxy.internal:3128\n");
    let roots = dir.file("corp-ca.pem", &format!("{}{}", ca_pem(), ca_pem()));
    let toml = minimal_with(
        "egress",
        &format!("proxy_url_file = {url:?}\nca_file = {roots:?}"),
    );
    let s = Settings::from_toml_str(&toml).unwrap();
    let proxy = s.egress.proxy.as_ref().unwrap();
    assert_eq!(proxy.authority, "proxy.internal:3128");
    assert!(proxy.authorization.is_some());
    assert_eq!(s.egress.extra_roots.as_ref().unwrap().certificates.len(), 2);
    assert!(s.cluster.is_none());

    let inline = minimal_with(
        "egress",
        "proxy_url = \"http://corp:pr0xy-pw@proxy.internal:3128\"",
    );
    let out = Settings::from_toml_str(&inline).unwrap().redacted_toml();
    assert!(
        out.contains("http://corp:<redacted>@proxy.internal:3128"),
        "{out}"
    );
    assert!(!out.contains("pr0xy-pw"), "{out}");
    assert!(!format!("{:?}", Settings::from_toml_str(&inline).unwrap()).contains("pr0xy-pw"));
}

#[test]
fn egress_problems_name_their_key_and_never_the_password() {
    let dir = TempDir::new("egress-bad");
    let not_pem = dir.file("not-pem.pem", "just text\n");
    let broken = dir.file(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    for (extra, key, problem) in [
        (
            "ca_file = \"/nonexistent/ca.pem\"",
            "egress.ca_file",
            "cannot read",
        ),
        (
            &format!("ca_file = {not_pem:?}"),
            "egress.ca_file",
            "holds no PEM certificate",
        ),
        (&format!("ca_file = {broken:?}"), "egress.ca_file", ""),
        (
            "proxy_url = \"https://u:pr0xy-pw@p:3128\"",
            "egress.proxy_url",
            "http://",
        ),
        (
            "proxy_url = \"http://u:pr0xy-pw@p\"",
            "egress.proxy_url",
            "port is required",
        ),
        (
            "proxy_url = \"http://p:1\"\nproxy_url_file = \"/x\"",
            "egress.proxy_url_file",
            "both set",
        ),
    ] {
        let list = errors(&minimal_with("egress", extra));
        assert!(has(&list, key) && has(&list, problem), "{extra}: {list:?}");
        assert!(!has(&list, "pr0xy-pw"), "{extra}: {list:?}");
    }
}

#[test]
fn egress_ca_roots_reach_a_rediss_cluster() {
    let dir = TempDir::new("egress-redis");
    let roots = dir.file("corp-ca.pem", &ca_pem());
    let toml = minimal_with(
        "egress",
        &format!(
            "ca_file = {roots:?}\n[cluster]\nredis_url = \"rediss://redis.internal\"\n\
             [oauth]\nsigning_key_file = {:?}",
            dir.file("keys", SIGNING_KEY)
        ),
    );
    let s = Settings::from_toml_str(&toml).unwrap();
    let pem = s.cluster.unwrap().tls_roots_pem.unwrap();
    assert_eq!(pem, std::fs::read(&roots).unwrap());
}

/// Sets a file's permission bits.
fn chmod(path: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn every_file_read_is_bounded_and_an_oversized_one_names_its_key() {
    let dir = TempDir::new("oversized");
    // One line of 2 MiB: read whole, it would be a valid (long) key or secret.
    let huge = dir.file("huge", &"k".repeat(2 << 20));
    chmod(&huge, 0o600);
    let toml = minimal()
        .replace(
            &format!("client_secret = \"{SECRET}\""),
            &format!("client_secret_file = {huge:?}"),
        )
        .replace(
            &format!("api_key = \"{API_KEY}\""),
            &format!("api_key_file = {huge:?}"),
        )
        + &format!(
            "[oauth]\nsigning_key_file = {huge:?}\n[server]\ntls_cert_file = {huge:?}\n\
             tls_key_file = {huge:?}\n"
        );
    let list = errors(&toml);
    for key in [
        "talkdesk.client_secret_file",
        "clients[0].api_key_file",
        "oauth.signing_key_file",
        "server.tls_key_file",
    ] {
        assert!(
            has(&list, &format!("{key}: '{huge}' is larger than 64 KiB")),
            "{key} in {list:#?}"
        );
    }
    assert!(
        has(
            &list,
            &format!("server.tls_cert_file: '{huge}' is larger than 1 MiB")
        ),
        "{list:#?}"
    );
    assert_eq!(list.len(), 5, "{list:#?}");

    // A key directory's files are bounded too; a device is not a file to read a key from.
    let keys = TempDir::new("oversized-dir");
    std::fs::copy(&huge, keys.path().join("key")).unwrap();
    let list = errors(&minimal_with(
        "oauth",
        &format!("signing_key_file = {:?}", keys.path_str()),
    ));
    assert!(has(&list, "oauth.signing_key_file: '"), "{list:#?}");
    assert!(has(&list, "is larger than 64 KiB"), "{list:#?}");
    let list = errors(&minimal_with("oauth", "signing_key_file = \"/dev/zero\""));
    assert_eq!(
        list,
        vec!["oauth.signing_key_file: '/dev/zero' is not a regular file".to_owned()]
    );
}

#[test]
fn secret_files_others_can_write_are_refused_readable_ones_warned_naming_their_key() {
    let dir = TempDir::new("modes");
    let secret = dir.file("secret", "file-secret\n");
    let keys = TempDir::new("modes-keys");
    let key = keys.file("current", &format!("{SIGNING_KEY}\n"));
    let toml = minimal().replace(
        &format!("client_secret = \"{SECRET}\""),
        &format!("client_secret_file = {secret:?}"),
    ) + &format!("[oauth]\nsigning_key_file = {:?}\n", keys.path_str());

    // Owner and group (Kubernetes' fsGroup mounts, 0440): quiet.
    chmod(&secret, 0o640);
    chmod(&key, 0o440);
    let s = Settings::from_toml_str(&toml).unwrap();
    assert!(s.warnings().is_empty(), "{:?}", s.warnings());

    // Readable by others: loads, with a warning naming the key and the file.
    chmod(&secret, 0o644);
    chmod(&key, 0o444);
    let s = Settings::from_toml_str(&toml).unwrap();
    assert_eq!(
        s.talkdesk.client_credential.secret().unwrap().expose(),
        "file-secret"
    );
    assert_eq!(
        s.warnings(),
        [
            format!(
                "talkdesk.client_secret_file: '{secret}' can be read by others (mode 0644); \
                 owner and group suffice: chmod o-r"
            ),
            format!(
                "oauth.signing_key_file: '{key}' can be read by others (mode 0444); \
                 owner and group suffice: chmod o-r"
            ),
        ]
    );

    // Writable by others: refused.
    chmod(&secret, 0o646);
    chmod(&key, 0o442);
    let list = errors(&toml);
    assert_eq!(list.len(), 2, "{list:#?}");
    assert!(has(
        &list,
        &format!("talkdesk.client_secret_file: '{secret}' can be written by others (mode 0646)")
    ));
    assert!(has(
        &list,
        &format!("oauth.signing_key_file: '{key}' can be written by others (mode 0442)")
    ));
    assert!(!has(&list, "file-secret") && !has(&list, SIGNING_KEY));
}

#[test]
fn listeners_that_would_collide_are_refused() {
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    for (a, b, collide) in [
        ("127.0.0.1:9000", "127.0.0.1:9000", true),
        ("0.0.0.0:9000", "127.0.0.1:9000", true),
        ("10.0.0.5:9000", "0.0.0.0:9000", true),
        ("[::]:9000", "127.0.0.1:9000", true),
        ("[::]:9000", "0.0.0.0:9000", true),
        ("[::]:9000", "[::1]:9000", true),
        ("[::ffff:127.0.0.1]:9000", "127.0.0.1:9000", true),
        ("0.0.0.0:9000", "[::1]:9000", false),
        ("127.0.0.1:9000", "127.0.0.2:9000", false),
        ("127.0.0.1:9000", "[::1]:9000", false),
        ("0.0.0.0:9000", "0.0.0.0:9001", false),
        ("0.0.0.0:0", "0.0.0.0:0", false),
    ] {
        assert_eq!(listeners_collide(addr(a), addr(b)), collide, "{a} {b}");
        assert_eq!(listeners_collide(addr(b), addr(a)), collide, "{b} {a}");
    }

    let list = errors(&minimal_with(
        "server",
        "listen = \"127.0.0.1:9000\"\nadmin_listen = \"0.0.0.0:9000\"",
    ));
    assert_eq!(
        list,
        vec![
            "server.admin_listen: 0.0.0.0:9000 collides with server.listen (127.0.0.1:9000): \
             the same port on overlapping addresses; give it another port"
                .to_owned()
        ]
    );
    Settings::from_toml_str(&minimal_with(
        "server",
        "listen = \"127.0.0.1:9000\"\nadmin_listen = \"127.0.0.2:9000\"",
    ))
    .unwrap();
}

#[test]
fn private_key_jwt_needs_a_key_that_fits_its_algorithm_and_no_secret() {
    use crate::jws::SigningKey;
    let dir = TempDir::new("jwt");
    let key_text = SigningKey::generate_es256();
    let key = dir.file("client.key", &key_text);
    let not_a_key = dir.file("not-a-key", "hello\n");
    let jwt = |extra: &str| {
        minimal().replace(
            &format!("client_secret = \"{SECRET}\""),
            &format!("client_auth = \"private_key_jwt\"\n{extra}"),
        )
    };
    let given = format!("private_key_file = {key:?}\nkey_id = \"kid-1\"");
    let s = Settings::from_toml_str(&jwt(&given)).unwrap();
    let ClientCredential::PrivateKey {
        key_id,
        key: signer,
    } = &s.talkdesk.client_credential
    else {
        panic!("{:?}", s.talkdesk.client_credential);
    };
    assert_eq!(key_id, "kid-1");
    assert_eq!(signer.algorithm(), crate::jws::Algorithm::ES256);
    assert_eq!(
        s.talkdesk.client_credential.client_auth(),
        ClientAuth::PrivateKeyJwt
    );
    let shown = format!("{}{:?}", s.redacted_toml(), s);
    assert!(!shown.contains(&key_text[..24]), "{shown}");

    for (extra, needle) in [
        (
            "key_id = \"kid-1\"".to_owned(),
            "talkdesk.private_key_file is required with private_key_jwt",
        ),
        (
            format!("private_key_file = {key:?}"),
            "talkdesk.key_id is required with private_key_jwt",
        ),
        (
            format!("{given}\nclient_secret = \"{SECRET}\""),
            "talkdesk.client_secret must be empty with talkdesk.client_auth = \"private_key_jwt\"",
        ),
        (
            format!("{given}\nkey_algorithm = \"RS256\""),
            "the key does not fit RS256: RS256 needs an RSA key",
        ),
        (
            format!("{given}\nkey_algorithm = \"ES384\""),
            "the key does not fit ES384: ES384 needs an EC P-384 key",
        ),
        (
            format!("private_key_file = {not_a_key:?}\nkey_id = \"kid-1\""),
            "not a private key: neither base64 PKCS#8",
        ),
        (
            format!("{given}\nkey_algorithm = \"HS256\""),
            "talkdesk.key_algorithm: \"HS256\" is not a key algorithm",
        ),
    ] {
        let list = errors(&jwt(&extra));
        assert!(
            has(&list, needle),
            "{extra}: missing {needle:?} in {list:#?}"
        );
        assert!(!has(&list, &key_text[..24]), "{list:#?}");
    }

    // A key for the other methods is refused rather than silently unused.
    let list = errors(&minimal_with("talkdesk", &given));
    assert!(
        has(
            &list,
            "talkdesk.key_id is used only with talkdesk.client_auth = \"private_key_jwt\""
        ),
        "{list:#?}"
    );
}

#[test]
fn trusted_proxies_are_addresses_or_networks() {
    let s = Settings::from_toml_str(&minimal()).unwrap();
    assert_eq!(s.server.trusted_proxies, TrustedProxies::default());
    let s = Settings::from_toml_str(&minimal_with(
        "server",
        r#"trusted_proxies = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]"#,
    ))
    .unwrap();
    let balancer: std::net::IpAddr = "10.1.2.3".parse().unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    assert_eq!(
        s.server.trusted_proxies.client_address(balancer, &headers),
        "203.0.113.9".parse::<std::net::IpAddr>().unwrap()
    );
    let list = errors(&minimal_with(
        "server",
        r#"trusted_proxies = ["10.0.0.1/8"]"#,
    ));
    assert!(
        has(
            &list,
            "server.trusted_proxies: \"10.0.0.1/8\" has bits set beyond its /8 prefix"
        ),
        "{list:?}"
    );
    let list = errors(&minimal_with("server", r#"trusted_proxies = ["balancer"]"#));
    assert!(
        has(
            &list,
            "server.trusted_proxies: \"balancer\" is not an IP address or a CIDR network"
        ),
        "{list:?}"
    );
}
