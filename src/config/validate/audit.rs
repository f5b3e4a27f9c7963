//! `[audit]`: the store's keys, the chain key, retention and the write policy.

use std::{path::PathBuf, time::Duration};

use super::super::{
    problems::Problems, schema, secret_files::read_secret_file, AuditSettings, AuditStoreKind,
    AuditStoreSettings, PostgresUrl,
};
use super::{key_file, readable_file};
use crate::config::files::FileKind;

/// `[audit]`: the store's keys are checked whenever set (export and verify read a store the
/// proxy does not write to), and required when `enabled`.
pub(super) fn audit(a: schema::Audit, p: &mut Problems) -> Option<AuditSettings> {
    let enabled = p.value("audit.enabled", a.enabled);
    let kind = p.value("audit.store", a.store);
    let sqlite_path = p.value("audit.sqlite_path", a.sqlite_path);
    let postgres_url = p.value("audit.postgres_url", a.postgres_url);
    let password_file = p.value("audit.postgres_password_file", a.postgres_password_file);
    let chain_keys = key_file(
        "audit.chain_key_file",
        a.chain_key_file,
        "an audit chain key",
        p,
    );
    let retention = p.check("audit.retention_days", a.retention_days, |days| {
        days.checked_mul(86_400)
            .filter(|_| days <= 100 * 365)
            .map(|secs| (secs > 0).then(|| Duration::from_secs(secs)))
            .ok_or_else(|| format!("{days} days is more than 100 years"))
    });
    let write_policy = p.value("audit.write_policy", a.write_policy);
    let (enabled, kind) = (enabled?, kind?);
    let (sqlite_path, postgres_url, password_file) = (sqlite_path?, postgres_url?, password_file?);
    let store = match kind {
        AuditStoreKind::Sqlite => {
            if !postgres_url.is_empty() || !password_file.is_empty() {
                p.general(
                    "audit.postgres_url and audit.postgres_password_file need \
                     audit.store = \"postgres\"",
                );
            }
            (!sqlite_path.is_empty()).then(|| AuditStoreSettings::Sqlite {
                path: PathBuf::from(sqlite_path),
            })
        }
        AuditStoreKind::Postgres => {
            if !sqlite_path.is_empty() {
                p.at("audit.sqlite_path", "needs audit.store = \"sqlite\"");
            }
            let password = if password_file.is_empty() {
                Some(None)
            } else {
                p.take_file(
                    "audit.postgres_password_file",
                    read_secret_file(&password_file),
                )
                .map(Some)
            };
            if postgres_url.is_empty() {
                if password.as_ref().is_some_and(Option::is_some) {
                    p.at(
                        "audit.postgres_password_file",
                        "is set but audit.postgres_url is empty",
                    );
                }
                None
            } else {
                let url = p.take("audit.postgres_url", PostgresUrl::parse(&postgres_url));
                if let Some(root_cert) = url.as_ref().and_then(|url| url.root_cert.as_ref()) {
                    let path = root_cert.display().to_string();
                    p.take_file(
                        "audit.postgres_url",
                        readable_file(&path, FileKind::Certificates)
                            .map_err(|e| format!("sslrootcert: {e}")),
                    );
                }
                Some(AuditStoreSettings::Postgres {
                    url: postgres_url,
                    password: password?,
                })
            }
        }
    };
    if enabled {
        if store.is_none() {
            let key = match kind {
                AuditStoreKind::Sqlite => "audit.sqlite_path",
                AuditStoreKind::Postgres => "audit.postgres_url",
            };
            p.at(
                key,
                format!(
                    "is required when audit.enabled = true and audit.store = \"{}\"",
                    kind.as_str()
                ),
            );
        }
        if chain_keys.as_ref().is_some_and(Vec::is_empty) {
            p.at(
                "audit.chain_key_file",
                "is required when audit.enabled = true (a secret of at least 32 bytes, the \
                 same on every instance)",
            );
        }
    }
    Some(AuditSettings {
        enabled,
        store,
        chain_keys: chain_keys?,
        retention: retention?,
        write_policy: write_policy?,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{errors, has, minimal_with, TempDir};
    use crate::config::{AuditStoreSettings, Settings, WritePolicy};

    const CHAIN_KEY: &str = "audit-chain-key-0123456789abcdef0123";

    #[test]
    fn off_by_default_with_three_years_of_retention() {
        let s = Settings::from_toml_str(&minimal_with("audit", "")).unwrap();
        assert!(!s.audit.enabled);
        assert!(s.audit.store.is_none());
        assert_eq!(
            s.audit.retention,
            Some(std::time::Duration::from_secs(1095 * 86_400))
        );
        assert_eq!(s.audit.write_policy, WritePolicy::Require);
    }

    #[test]
    fn enabled_needs_the_stores_path_and_a_chain_key() {
        let list = errors(&minimal_with("audit", "enabled = true"));
        assert!(
            has(
                &list,
                "audit.sqlite_path: is required when audit.enabled = true"
            ),
            "{list:?}"
        );
        assert!(has(&list, "audit.chain_key_file: is required"), "{list:?}");
        let list = errors(&minimal_with(
            "audit",
            "enabled = true\nstore = \"postgres\"",
        ));
        assert!(has(&list, "audit.postgres_url: is required"), "{list:?}");
    }

    #[test]
    fn a_short_chain_key_and_keys_of_the_other_store_are_refused() {
        let dir = TempDir::new("audit-keys");
        let short = dir.file("short.key", "too-short");
        let list = errors(&minimal_with(
            "audit",
            &format!(
                "enabled = true\nsqlite_path = \"/tmp/a.sqlite\"\nchain_key_file = \"{short}\"\n\
                 postgres_url = \"postgres://a@db/x\"\nretention_days = 999999"
            ),
        ));
        assert!(
            has(
                &list,
                "audit.chain_key_file: an audit chain key must be at least 32 bytes"
            ),
            "{list:?}"
        );
        assert!(
            has(
                &list,
                "audit.postgres_url and audit.postgres_password_file need"
            ),
            "{list:?}"
        );
        assert!(
            has(
                &list,
                "audit.retention_days: 999999 days is more than 100 years"
            ),
            "{list:?}"
        );
    }

    #[test]
    fn postgres_with_a_password_file_and_tls() {
        let dir = TempDir::new("audit-pg");
        let key = dir.file("chain.key", CHAIN_KEY);
        let password = dir.file("pw", "secret-pw\n");
        let ca = dir.file("ca.pem", "-----BEGIN CERTIFICATE-----\n");
        let s = Settings::from_toml_str(&minimal_with(
            "audit",
            &format!(
                "enabled = true\nstore = \"postgres\"\nchain_key_file = \"{key}\"\n\
                 postgres_url = \"postgres://audit@db:5432/consent?sslmode=require&sslrootcert={ca}\"\n\
                 postgres_password_file = \"{password}\"\nwrite_policy = \"best_effort\""
            ),
        ))
        .unwrap();
        match &s.audit.store {
            Some(AuditStoreSettings::Postgres { password, .. }) => {
                assert_eq!(password.as_ref().map(|p| p.expose()), Some("secret-pw"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!s.redacted_toml().contains("secret-pw"));
        let list = errors(&minimal_with(
            "audit",
            "store = \"postgres\"\npostgres_url = \"postgres://audit:hunter2@db/consent\"",
        ));
        assert!(
            has(&list, "audit.postgres_url: must not contain a password"),
            "{list:?}"
        );
        assert!(!list.iter().any(|e| e.contains("hunter2")), "{list:?}");
        let list = errors(&minimal_with(
            "audit",
            "store = \"postgres\"\npostgres_url = \"postgres://audit@db/consent?sslrootcert=/nonexistent.pem\"",
        ));
        assert!(
            has(
                &list,
                "audit.postgres_url: sslrootcert: cannot read '/nonexistent.pem'"
            ),
            "{list:?}"
        );
    }
}
