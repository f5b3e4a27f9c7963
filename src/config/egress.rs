//! `egress.proxy_url`: `http://[user[:password]@]host:port`, the HTTP proxy that tunnels
//! (CONNECT) every connection to Talkdesk. Parsed by hand like `cluster.redis_url`, and never
//! echoed: it may hold the proxy's password, which only the `Proxy-Authorization` header of a
//! CONNECT request carries.

use base64::Engine as _;
use http::HeaderValue;
use percent_encoding::percent_decode_str;

use super::redis_url::split_host_port;
use super::REDACTED;

const SHAPE: &str = "http://[user:password@]host:port";

/// A validated egress proxy: where it is, and the credentials it asks for.
#[derive(Clone)]
pub struct ProxyEndpoint {
    /// `host:port` (an IPv6 address in brackets): safe to log.
    pub authority: String,
    /// `Proxy-Authorization: Basic ...`, marked sensitive; `None` without credentials.
    pub authorization: Option<HeaderValue>,
    /// As written (percent-encoded), for the redacted URL.
    user: String,
}

impl std::fmt::Debug for ProxyEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl ProxyEndpoint {
    pub(super) fn parse(url: &str) -> Result<ProxyEndpoint, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("the scheme must be http:// (a proxy that tunnels with CONNECT; {SHAPE})")
        })?;
        let (userinfo, after) = rest.rsplit_once('@').unwrap_or(("", rest));
        let host_port = after.strip_suffix('/').unwrap_or(after);
        if host_port.contains(['/', '?', '#']) {
            return Err(format!("a proxy URL has no path or query ({SHAPE})"));
        }
        if !host_port.starts_with('[') && !host_port.contains(':') || host_port.ends_with(']') {
            return Err(format!("the proxy's port is required ({SHAPE})"));
        }
        let (host, port) = split_host_port(host_port, 0, SHAPE)?;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let decode = |part: &str, what: &str| {
            percent_decode_str(part)
                .decode_utf8()
                .map(|text| text.into_owned())
                .map_err(|_| format!("the {what} is not valid percent-encoded UTF-8"))
        };
        let (user_as_written, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let (user, password) = (
            decode(user_as_written, "user")?,
            decode(password, "password")?,
        );
        let authorization = if user.is_empty() && password.is_empty() {
            None
        } else {
            Some(basic_authorization(&user, &password)?)
        };
        Ok(ProxyEndpoint {
            authority,
            authorization,
            user: user_as_written.to_owned(),
        })
    }

    /// The URL with `<redacted>` for its password: what `check-config` prints.
    pub fn redacted(&self) -> String {
        match &self.authorization {
            None => format!("http://{}", self.authority),
            Some(_) => format!("http://{}:{REDACTED}@{}", self.user, self.authority),
        }
    }
}

/// `Basic base64(user:password)`, marked sensitive so that no log of headers shows it.
pub fn basic_authorization(user: &str, password: &str) -> Result<HeaderValue, String> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value = HeaderValue::try_from(format!("Basic {encoded}"))
        .map_err(|_| "the credentials cannot be sent in a header".to_owned())?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_url_with_credentials() {
        let proxy = ProxyEndpoint::parse("http://corp%40it:p%3Ass@proxy.internal:3128/").unwrap();
        assert_eq!(proxy.authority, "proxy.internal:3128");
        let expected = basic_authorization("corp@it", "p:ss").unwrap();
        assert_eq!(proxy.authorization.as_ref(), Some(&expected));
        assert!(proxy.authorization.unwrap().is_sensitive());
        let proxy = ProxyEndpoint::parse("http://corp%40it:p%3Ass@proxy.internal:3128").unwrap();
        assert_eq!(
            proxy.redacted(),
            "http://corp%40it:<redacted>@proxy.internal:3128"
        );
        assert!(!format!("{proxy:?}").contains("p%3Ass"));
    }

    #[test]
    fn a_proxy_url_without_credentials_and_in_ipv6() {
        let proxy = ProxyEndpoint::parse("http://[::1]:8888").unwrap();
        assert_eq!(proxy.authority, "[::1]:8888");
        assert!(proxy.authorization.is_none());
        assert_eq!(proxy.redacted(), "http://[::1]:8888");
    }

    #[test]
    fn malformed_proxy_urls_are_refused_without_echoing_a_password() {
        for (url, problem) in [
            ("https://proxy:3128", "the scheme must be http://"),
            ("proxy:3128", "the scheme must be http://"),
            ("http://proxy", "port is required"),
            ("http://[::1]", "port is required"),
            ("http://proxy:3128/path", "no path or query"),
            ("http://proxy:0", "not a number from 1 to 65535"),
            ("http://u:secret%ff@proxy:3128", "password is not valid"),
        ] {
            let err = ProxyEndpoint::parse(url).unwrap_err();
            assert!(err.contains(problem), "{url}: {err}");
            assert!(!err.contains("secret"), "{url}: {err}");
        }
    }
}
