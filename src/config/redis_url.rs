//! `cluster.redis_url`: `redis://[user[:password]@]host[:port][/db]`, or `rediss://` for TLS.
//! Parsed by hand (the dependency tree has no URL crate), and no message ever echoes it: it may
//! hold a password.

use std::net::Ipv6Addr;

use percent_encoding::percent_decode_str;

use super::{Secret, REDACTED};

const DEFAULT_PORT: u16 = 6379;

const SHAPE: &str = "redis://[user[:password]@]host[:port][/db] or rediss://...";

#[derive(Debug)]
pub(super) struct RedisUrl {
    tls: bool,
    /// As written (percent-encoded); may be empty.
    user: String,
    /// Percent-decoded; `None` when absent or empty.
    pub password: Option<Secret>,
    /// An IPv6 address without its brackets.
    host: String,
    port: u16,
    db: u32,
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("redis://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("rediss://") {
            (true, rest)
        } else {
            return Err(format!(
                "the scheme must be redis:// or rediss:// ({SHAPE})"
            ));
        };
        if rest.contains(['?', '#']) {
            return Err(format!(
                "query strings and fragments are not supported ({SHAPE})"
            ));
        }
        // The user information first, up to the last '@': a password may hold a '/' that
        // was not percent-encoded, and must not be taken for the host or the database.
        let (userinfo, after) = rest.rsplit_once('@').unwrap_or(("", rest));
        let (host_port, path) = after.split_once('/').unwrap_or((after, ""));
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let password = percent_decode_str(password)
            .decode_utf8()
            .map_err(|_| "the password is not valid percent-encoded UTF-8".to_owned())?;
        let (host, port) = split_host_port(host_port, DEFAULT_PORT, SHAPE)?;
        let db = match path {
            "" => 0,
            db => db
                .parse()
                .map_err(|_| format!("the database {db:?} is not a number ({SHAPE})"))?,
        };
        Ok(RedisUrl {
            tls,
            user: user.to_owned(),
            password: (!password.is_empty()).then(|| Secret::new(password)),
            host,
            port,
            db,
        })
    }

    /// The URL without its password, port and database spelled out: safe to log, and what
    /// the cluster client connects to (the password is handed over separately).
    pub fn without_password(&self) -> String {
        self.render(None)
    }

    /// The URL with `<redacted>` in place of its password, if it has one.
    pub fn redacted(&self) -> String {
        self.render(self.password.as_ref().map(|_| REDACTED))
    }

    fn render(&self, password: Option<&str>) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let userinfo = match password {
            Some(password) => format!("{}:{password}@", self.user),
            None if self.user.is_empty() => String::new(),
            None => format!("{}@", self.user),
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{userinfo}{host}:{}/{}", self.port, self.db)
    }
}

/// Sentinel's own port, when an entry of `cluster.sentinels` gives none.
const SENTINEL_PORT: u16 = 26379;

/// One of `cluster.sentinels`: `host[:port]` (port 26379 unless given), or
/// `rediss://host[:port]` for TLS (`redis://` may be written too). Returns whether TLS is on,
/// the host and the port. A sentinel's password comes from `cluster.sentinel_password_file`,
/// never from here.
pub(super) fn parse_sentinel(entry: &str) -> Result<(bool, String, u16), String> {
    const SENTINEL_SHAPE: &str = "host:port, or rediss://host:port for TLS";
    let (tls, rest) = if let Some(rest) = entry.strip_prefix("rediss://") {
        (true, rest)
    } else {
        (false, entry.strip_prefix("redis://").unwrap_or(entry))
    };
    if rest.contains(['@', '/', '?', '#']) {
        return Err(format!(
            "a sentinel is {SENTINEL_SHAPE}, without user, password or path \
             (cluster.sentinel_password_file holds the password)"
        ));
    }
    let (host, port) = split_host_port(rest, SENTINEL_PORT, SENTINEL_SHAPE)?;
    Ok((tls, host, port))
}

/// `host[:port]` or `[ipv6][:port]`; `shape` is the whole URL's expected form, for messages.
pub(super) fn split_host_port(
    host_port: &str,
    default_port: u16,
    shape: &str,
) -> Result<(String, u16), String> {
    let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("the IPv6 address has no closing ']' ({shape})"))?;
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{ip:?} is not an IPv6 address"));
        }
        let port =
            match after {
                "" => None,
                after => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("unexpected {after:?} after the IPv6 address ({shape})")
                })?),
            };
        (ip, port)
    } else {
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        };
        let valid_host = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !valid_host {
            return Err(format!("{host:?} is not a host name or address ({shape})"));
        }
        (host, port)
    };
    let port = match port {
        None => default_port,
        Some(port) => port
            .parse()
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| format!("the port {port:?} is not a number from 1 to 65535"))?,
    };
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_minimal_forms() {
        let url = RedisUrl::parse("rediss://app:p%40ss@redis.internal:6380/2").unwrap();
        assert_eq!(url.password.as_ref().map(Secret::expose), Some("p@ss"));
        assert_eq!(url.without_password(), "rediss://app@redis.internal:6380/2");
        assert_eq!(
            url.redacted(),
            "rediss://app:<redacted>@redis.internal:6380/2"
        );

        let url = RedisUrl::parse("redis://localhost").unwrap();
        assert!(url.password.is_none());
        assert_eq!(url.without_password(), "redis://localhost:6379/0");
        assert_eq!(url.redacted(), "redis://localhost:6379/0");

        let url = RedisUrl::parse("redis://app:pa/ss@redis:6379").unwrap();
        assert_eq!(url.password.as_ref().map(Secret::expose), Some("pa/ss"));
        assert_eq!(url.without_password(), "redis://app@redis:6379/0");

        let url = RedisUrl::parse("redis://:secret@[::1]:7000/").unwrap();
        assert_eq!(url.password.as_ref().map(Secret::expose), Some("secret"));
        assert_eq!(url.without_password(), "redis://[::1]:7000/0");
        assert_eq!(url.redacted(), "redis://:<redacted>@[::1]:7000/0");
    }

    #[test]
    fn sentinel_addresses() {
        assert_eq!(
            parse_sentinel("sentinel-0.redis:26379").unwrap(),
            (false, "sentinel-0.redis".to_owned(), 26379)
        );
        assert_eq!(
            parse_sentinel("rediss://[::1]:26380").unwrap(),
            (true, "::1".to_owned(), 26380)
        );
        assert_eq!(
            parse_sentinel("sentinel-1").unwrap(),
            (false, "sentinel-1".to_owned(), 26379)
        );
        for (entry, expected) in [
            ("u:hunter2@host:26379", "without user, password or path"),
            ("host:26379/0", "without user, password or path"),
            ("host:port", "the port \"port\""),
        ] {
            let err = parse_sentinel(entry).unwrap_err();
            assert!(err.contains(expected), "{entry}: {err}");
            assert!(!err.contains("hunter2"), "{entry}: {err}");
        }
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_the_password() {
        for (url, expected) in [
            ("http://host", "the scheme must be redis:// or rediss://"),
            ("redis://", "\"\" is not a host name"),
            ("redis://u:hunter2@:6379", "\"\" is not a host name"),
            (
                "redis://u:hunter2@host:port",
                "the port \"port\" is not a number",
            ),
            ("redis://u:hunter2@host:0", "the port \"0\" is not a number"),
            ("redis://u:hunter2@host:70000", "the port \"70000\""),
            (
                "redis://u:hunter2@host/db1",
                "the database \"db1\" is not a number",
            ),
            ("redis://u:hunter2@host/-1", "the database \"-1\""),
            ("redis://u:hunter2@host?timeout=1", "query strings"),
            ("redis://u:hunter2@[::1", "no closing ']'"),
            (
                "redis://u:hunter2@[nope]:1",
                "\"nope\" is not an IPv6 address",
            ),
            ("redis://u:hunter2@ho st", "\"ho st\" is not a host name"),
            // A '/' in the password, not percent-encoded, must not end the host part.
            ("redis://u:hun/ter2@host:port", "the port \"port\""),
            ("redis://u:12/hunter2@host/db1", "the database \"db1\""),
        ] {
            let err = RedisUrl::parse(url).unwrap_err();
            assert!(err.contains(expected), "{url}: {err}");
            assert!(
                !err.contains("hunter2") && !err.contains("ter2"),
                "{url}: {err}"
            );
        }
    }
}
