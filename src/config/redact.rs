//! The effective configuration printed by `check-config` and logged at start: the loaded file
//! format itself, serialised by the `toml` crate, with the derived Talkdesk URLs filled in and
//! every secret replaced. A client's key is left out entirely: not its hash, not its file.

use super::{
    redis_url::RedisUrl,
    schema::{ConfigFile, Field},
    ProxyEndpoint, TalkdeskSettings, REDACTED,
};

/// `file` as validated into `talkdesk`, ready to be shown.
pub(super) fn redact(mut file: ConfigFile, talkdesk: &TalkdeskSettings) -> ConfigFile {
    file.talkdesk.api_base_url = talkdesk.api_base_url.clone().into();
    file.talkdesk.token_url = talkdesk.token_url.clone().into();
    hide(&mut file.talkdesk.client_secret);
    if let Ok(url) = &mut file.cluster.redis_url.0 {
        if !url.is_empty() {
            // Validated already; were it not, nothing of it is shown.
            *url = RedisUrl::parse(url).map_or_else(|_| REDACTED.to_owned(), |url| url.redacted());
        }
    }
    if let Ok(url) = &mut file.egress.proxy_url.0 {
        if !url.is_empty() {
            *url = ProxyEndpoint::parse(url)
                .map_or_else(|_| REDACTED.to_owned(), |url| url.redacted());
        }
    }
    for client in &mut file.clients {
        client.api_key = None;
        client.api_key_file = None;
        client.api_key_sha256 = None;
    }
    file
}

/// An inline secret becomes `<redacted>`; an empty one (not given) stays empty.
fn hide(secret: &mut Field<String>) {
    if let Ok(value) = &mut secret.0 {
        if !value.is_empty() {
            *value = REDACTED.to_owned();
        }
    }
}

pub(super) fn to_toml(file: &ConfigFile) -> String {
    toml::to_string(file)
        .unwrap_or_else(|e| format!("# the effective configuration cannot be printed: {e}\n"))
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use crate::config::test_support::{minimal, TempDir, API_KEY, SECRET};
    use crate::config::Settings;

    const KEY: &str = "oauth-signing-key-0123456789abcdef0123";

    #[test]
    fn redacted_output_has_no_secret() {
        let s = Settings::from_toml_str(&minimal()).unwrap();
        let out = s.redacted_toml();
        assert!(!out.contains(SECRET), "{out}");
        assert!(!out.contains(API_KEY), "{out}");
        let hash: [u8; 32] = Sha256::digest(API_KEY.as_bytes()).into();
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!out.to_lowercase().contains(&hex), "{out}");
        assert!(!out.contains("api_key"), "{out}");
        assert!(out.contains("client_secret = \"<redacted>\""), "{out}");
        assert!(
            out.contains("token_url = \"https://acme.talkdeskid.com/oauth/token\""),
            "{out}"
        );
        assert!(
            out.contains("api_base_url = \"https://api.talkdeskapp.com\""),
            "{out}"
        );
        // It is valid TOML with every section.
        let table: toml::Table = toml::from_str(&out).unwrap();
        for section in [
            "server", "log", "talkdesk", "token", "cache", "cluster", "oauth", "auth", "clients",
        ] {
            assert!(table.contains_key(section), "{section} missing in {out}");
        }
        assert_eq!(table["server"]["listen_backlog"].as_integer(), Some(1024));
        // Debug output does not leak either.
        let debug = format!("{s:?}");
        assert!(
            !debug.contains(SECRET) && !debug.contains(&format!("{:?}", hash)),
            "{debug}"
        );
    }

    #[test]
    fn redis_password_and_signing_keys_are_not_shown_but_the_key_path_is() {
        let dir = TempDir::new("redact");
        let keys = dir.file("signing-keys", &format!("{KEY}\n"));
        let toml = format!(
            "{}\n[cluster]\nredis_url = \"redis://app:hunter2-pw@redis:6380/1\"\n\
             [oauth]\nsigning_key_file = {keys:?}\n",
            minimal()
        );
        let s = Settings::from_toml_str(&toml).unwrap();
        let cluster = s.cluster.as_ref().unwrap();
        assert_eq!(cluster.redis_url, "redis://app@redis:6380/1");
        assert_eq!(
            cluster.redis_password.as_ref().map(|p| p.expose()),
            Some("hunter2-pw")
        );
        let out = s.redacted_toml();
        assert!(!out.contains("hunter2-pw"), "{out}");
        assert!(!out.contains(KEY), "{out}");
        assert!(
            out.contains("redis_url = \"redis://app:<redacted>@redis:6380/1\""),
            "{out}"
        );
        assert!(
            out.contains(&format!("signing_key_file = {keys:?}")),
            "{out}"
        );
        assert!(!format!("{s:?}").contains("hunter2-pw"));
    }

    #[test]
    fn a_secret_from_a_file_shows_its_path() {
        let dir = TempDir::new("redact-file");
        let secret = dir.file("secret", "from-a-file\n");
        let toml = minimal().replace(
            &format!("client_secret = \"{SECRET}\""),
            &format!("client_secret_file = {secret:?}"),
        );
        let out = Settings::from_toml_str(&toml).unwrap().redacted_toml();
        assert!(!out.contains("from-a-file"), "{out}");
        assert!(out.contains("client_secret = \"\""), "{out}");
        assert!(
            out.contains(&format!("client_secret_file = {secret:?}")),
            "{out}"
        );
    }
}
