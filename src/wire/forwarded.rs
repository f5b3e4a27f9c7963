//! The caller's own address behind trusted load balancers (`server.trusted_proxies`).
//!
//! A balancer that terminates HTTP connects to the proxy itself, so the peer address is the
//! balancer's; it names the address it received the request from in `X-Forwarded-For` (or
//! RFC 7239's `Forwarded`), appending to whatever the caller sent. Only the entries appended by
//! trusted hops can be believed: the caller's address is the rightmost entry that is not a
//! trusted proxy, walking from the peer leftwards. From a peer that is not trusted, both headers
//! are ignored (anyone can write them). `X-Forwarded-For` is read when the trusted hop sent one
//! (every common balancer writes it), `Forwarded` only when it did not, so a balancer that
//! writes `Forwarded` must not pass a caller's `X-Forwarded-For` through.

use std::fmt;
use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

/// An address or a network (`10.0.0.0/8`, `2001:db8::/32`; a bare address is its /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    base: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `address` or `address/prefix`; bits beyond the prefix must be zero.
    pub fn parse(text: &str) -> Result<Network, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let base: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or a CIDR network"))?;
        let width = match base {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match prefix {
            None => width,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= width)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {width}"))?,
        };
        let network = Network { base, prefix };
        if network.masked(base) != bits(base) {
            return Err(format!(
                "{text:?} has bits set beyond its /{prefix} prefix (did you mean {}/{prefix}?)",
                network.base_of(base)
            ));
        }
        Ok(network)
    }

    /// Whether `address` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        match (self.base, address) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                self.masked(address) == bits(self.base)
            }
            _ => false,
        }
    }

    fn mask(&self) -> u128 {
        let width = if self.base.is_ipv4() { 32 } else { 128 };
        let host_bits = u32::from(width - self.prefix);
        let all = if self.base.is_ipv4() {
            u128::from(u32::MAX)
        } else {
            u128::MAX
        };
        all.checked_shl(host_bits).unwrap_or(0) & all
    }

    fn masked(&self, address: IpAddr) -> u128 {
        bits(address) & self.mask()
    }

    fn base_of(&self, address: IpAddr) -> IpAddr {
        let masked = self.masked(address);
        match address {
            IpAddr::V4(_) => IpAddr::V4((masked as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(masked.into()),
        }
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

fn bits(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The configured `server.trusted_proxies`; empty: every peer is the caller itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Network>);

impl TrustedProxies {
    pub fn new(networks: Vec<Network>) -> Self {
        TrustedProxies(networks)
    }

    fn trusts(&self, address: IpAddr) -> bool {
        self.0.iter().any(|network| network.contains(address))
    }

    /// The address of the caller that `peer` forwarded this request for: `peer` itself unless
    /// it is trusted; else the rightmost untrusted address its forwarding header names (the
    /// leftmost entry when every entry is trusted; the last trusted hop when an entry cannot be
    /// read, since nothing to the left of it can be believed).
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if self.0.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let forwarded_for = headers.get_all("x-forwarded-for");
        if forwarded_for.iter().next().is_some() {
            return self.walk(peer, entries(forwarded_for.iter(), x_forwarded_for_entry));
        }
        self.walk(
            peer,
            entries(headers.get_all("forwarded").iter(), forwarded_for_entry),
        )
    }

    /// Walks the hops from the right: the first address not trusted is the caller.
    fn walk(&self, peer: IpAddr, hops: Vec<Option<IpAddr>>) -> IpAddr {
        let mut caller = peer;
        for hop in hops.into_iter().rev() {
            match hop {
                Some(address) => {
                    caller = address;
                    if !self.trusts(address) {
                        break;
                    }
                }
                None => break,
            }
        }
        caller
    }
}

/// Every comma-separated entry of every line of a header, in order, each read by `read`
/// (`None`: an entry that names no address, or a line that is not text).
fn entries<'a>(
    lines: impl Iterator<Item = &'a HeaderValue>,
    read: fn(&str) -> Option<IpAddr>,
) -> Vec<Option<IpAddr>> {
    let mut hops = Vec::new();
    for line in lines {
        match line.to_str() {
            Ok(text) => hops.extend(text.split(',').map(|entry| read(entry.trim()))),
            Err(_) => hops.push(None),
        }
    }
    hops
}

/// An `X-Forwarded-For` entry: an address, an IPv6 one possibly in brackets, either possibly
/// with a port.
fn x_forwarded_for_entry(entry: &str) -> Option<IpAddr> {
    node_address(entry)
}

/// The `for=` parameter of one `Forwarded` element (RFC 7239 §4); `for=unknown` or an
/// obfuscated node names no address.
fn forwarded_for_entry(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| node_address(value.trim().trim_matches('"')))
            .flatten()
    })
}

/// `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn node_address(node: &str) -> Option<IpAddr> {
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    node.parse().ok().or_else(|| {
        // IPv4 with a port (a bare IPv6 address has several colons and parsed above).
        let (address, port) = node.rsplit_once(':')?;
        port.parse::<u16>().ok()?;
        address.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(networks: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            networks
                .iter()
                .map(|n| Network::parse(n).unwrap())
                .collect(),
        )
    }

    fn headers(lines: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in lines {
            headers.append(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let net = Network::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.255.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped");
        assert!(!net.contains(ip("2001:db8::1")));
        let single = Network::parse("192.0.2.7").unwrap();
        assert!(single.contains(ip("192.0.2.7")));
        assert!(!single.contains(ip("192.0.2.8")));
        let v6 = Network::parse("2001:db8::/32").unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(Network::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Network::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        for bad in [
            "10.0.0.0/33",
            "nope",
            "10.0.0.1/8",
            "2001:db8::/129",
            "10.0.0.0/x",
            "",
        ] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
        assert!(Network::parse("10.0.0.1/8")
            .unwrap_err()
            .contains("did you mean 10.0.0.0/8"));
    }

    #[test]
    fn an_untrusted_peer_is_the_caller_whatever_it_claims() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let claims = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=203.0.113.9"),
        ]);
        assert_eq!(
            proxies.client_address(ip("198.51.100.1"), &claims),
            ip("198.51.100.1")
        );
        // Nothing trusted: headers are never read.
        assert_eq!(
            TrustedProxies::default().client_address(ip("10.0.0.1"), &claims),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_caller() {
        let proxies = trusted(&["10.0.0.0/8", "192.0.2.1"]);
        let balancer = ip("10.0.0.5");
        // The caller forged the first entry; the balancer appended the real one.
        let forged = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9")]);
        assert_eq!(proxies.client_address(balancer, &forged), ip("203.0.113.9"));
        // Two trusted hops: the one the outer balancer named is skipped.
        let chain = headers(&[
            ("x-forwarded-for", "1.2.3.4, 203.0.113.9"),
            ("x-forwarded-for", "192.0.2.1"),
        ]);
        assert_eq!(proxies.client_address(balancer, &chain), ip("203.0.113.9"));
        // Every entry trusted: the leftmost.
        let inside = headers(&[("x-forwarded-for", "10.9.9.9, 192.0.2.1")]);
        assert_eq!(proxies.client_address(balancer, &inside), ip("10.9.9.9"));
        // An unreadable entry: the hop that wrote it is as far as can be believed.
        let garbled = headers(&[("x-forwarded-for", "203.0.113.9, garbage, 192.0.2.1")]);
        assert_eq!(proxies.client_address(balancer, &garbled), ip("192.0.2.1"));
        // No header: the balancer itself.
        assert_eq!(
            proxies.client_address(balancer, &HeaderMap::new()),
            balancer
        );
        // Ports and brackets.
        let ported = headers(&[("x-forwarded-for", "[2001:db8::7]:4711, 203.0.113.9:80")]);
        assert_eq!(proxies.client_address(balancer, &ported), ip("203.0.113.9"));
    }

    #[test]
    fn forwarded_is_read_when_there_is_no_x_forwarded_for() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let balancer = ip("10.0.0.5");
        let rfc = headers(&[(
            "forwarded",
            r#"for=1.2.3.4;proto=https, for="[2001:db8:cafe::17]:4711";by=10.0.0.5"#,
        )]);
        assert_eq!(
            proxies.client_address(balancer, &rfc),
            ip("2001:db8:cafe::17")
        );
        let unknown = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(proxies.client_address(balancer, &unknown), balancer);
        // Both present: X-Forwarded-For wins.
        let both = headers(&[
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(proxies.client_address(balancer, &both), ip("203.0.113.9"));
    }
}
