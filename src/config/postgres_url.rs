//! `audit.postgres_url`: a libpq-style URL (`postgres://user@host:port/db?sslmode=require`) read
//! by `tokio-postgres`, plus libpq's `sslrootcert` (which `tokio-postgres` does not know). A
//! password is refused in the URL: it belongs in `audit.postgres_password_file`, so the URL can
//! be logged as it is.

use std::path::PathBuf;
use std::str::FromStr;

/// A validated PostgreSQL URL.
#[derive(Debug, Clone)]
pub struct PostgresUrl {
    /// Everything but `sslrootcert`, as `tokio-postgres` reads it.
    pub config: tokio_postgres::Config,
    /// `sslrootcert=PATH`: PEM roots the server's certificate is verified against, instead of
    /// the built-in ones.
    pub root_cert: Option<PathBuf>,
}

impl PostgresUrl {
    pub fn parse(url: &str) -> Result<PostgresUrl, String> {
        let Some(rest) = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
        else {
            return Err("must be a postgres:// or postgresql:// URL".to_owned());
        };
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        if let Some((user_info, _)) = authority.rsplit_once('@') {
            if user_info.contains(':') {
                // Not echoed: the part after ':' is a password.
                return Err("must not contain a password (user:password@): put it in \
                     audit.postgres_password_file"
                    .to_owned());
            }
        }
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => (url, ""),
        };
        let mut root_cert = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            match pair.split_once('=') {
                Some(("sslrootcert", path)) => {
                    let path = percent_encoding::percent_decode_str(path)
                        .decode_utf8()
                        .map_err(|_| "sslrootcert is not UTF-8".to_owned())?;
                    root_cert = Some(PathBuf::from(path.as_ref()));
                }
                _ => kept.push(pair),
            }
        }
        let without_root_cert = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let config = tokio_postgres::Config::from_str(&without_root_cert)
            .map_err(|e| format!("{url:?} is not a PostgreSQL URL: {e}"))?;
        if config.get_hosts().is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        if config.get_user().is_none_or(str::is_empty) {
            return Err(format!("{url:?} names no user (postgres://USER@host/db)"));
        }
        Ok(PostgresUrl { config, root_cert })
    }

    /// Whether TLS is asked for (`sslmode=prefer` or `require`).
    pub fn wants_tls(&self) -> bool {
        self.config.get_ssl_mode() != tokio_postgres::config::SslMode::Disable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libpq_urls() {
        let url = PostgresUrl::parse(
            "postgres://audit@db.internal:5433/consent?sslmode=require&sslrootcert=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!(url.config.get_user(), Some("audit"));
        assert_eq!(url.config.get_dbname(), Some("consent"));
        assert_eq!(url.config.get_ports(), &[5433]);
        assert!(url.wants_tls());
        assert_eq!(url.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        let plain =
            PostgresUrl::parse("postgresql://audit@127.0.0.1/consent?sslmode=disable").unwrap();
        assert!(!plain.wants_tls());
    }

    #[test]
    fn refuses_passwords_and_other_schemes() {
        let err = PostgresUrl::parse("postgres://audit:hunter2@db/consent").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(PostgresUrl::parse("mysql://audit@db/consent").is_err());
        assert!(PostgresUrl::parse("postgres://db/consent").is_err());
    }
}
