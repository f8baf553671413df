//! Who the client is, by address (SPEC §5): the socket peer, unless the peer is a proxy named in
//! `TRUSTED_PROXIES`, in which case the client is the right-most address of `X-Forwarded-For`
//! that is not itself a trusted proxy. Behind a TLS terminator every client shares the
//! terminator's address, and the per-address limits would lump them together; believing the
//! header from anyone else would let every client choose its own address and escape them.

use std::fmt;
use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderName};
use ipnet::IpNet;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Most entries of `TRUSTED_PROXIES`: a deployment has a handful of proxy ranges; the list is
/// searched for every request.
const TRUSTED_PROXIES_MAX: usize = 64;

/// Most `X-Forwarded-For` hops looked at: a real chain has a few; a longer one is forged and
/// only costs parsing.
const FORWARDED_HOPS_MAX: usize = 16;

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses `TRUSTED_PROXIES`: addresses and CIDR ranges, comma separated; empty for none.
    pub fn parse(text: &str) -> Result<TrustedProxies, String> {
        let mut networks = Vec::new();
        for entry in text
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            let network = entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{entry:?} is not an IP address or a CIDR range"))?;
            networks.push(network);
        }
        if networks.len() > TRUSTED_PROXIES_MAX {
            return Err(format!("at most {TRUSTED_PROXIES_MAX} entries"));
        }
        Ok(TrustedProxies(networks))
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        self.0.iter().any(|network| network.contains(&address))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub fn client_address(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev().take(FORWARDED_HOPS_MAX) {
            match hop.parse::<IpAddr>() {
                Ok(address) if self.contains(address) => continue,
                Ok(address) => return address.to_canonical(),
                // A malformed hop was written by whoever is before the last trusted proxy: no
                // address left of it can be believed.
                Err(_) => break,
            }
        }
        peer
    }

    /// Whether the request comes from a trusted proxy (whose `X-Forwarded-Proto` is passed on).
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.contains(peer)
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self.0.iter().map(IpNet::to_string).collect();
        f.write_str(&entries.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(forwarded_for: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_str(forwarded_for).expect("a header"),
        );
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn the_header_is_believed_only_from_a_trusted_proxy() {
        // Proves a client cannot pick its own address, and a trusted proxy's word is taken.
        let trusted = TrustedProxies::parse("10.0.0.0/8, 192.0.2.7").expect("valid");
        let forged = headers("203.0.113.50");
        assert_eq!(
            trusted.client_address(ip("198.51.100.1"), &forged),
            ip("198.51.100.1")
        );
        assert_eq!(
            trusted.client_address(ip("10.1.2.3"), &forged),
            ip("203.0.113.50")
        );
        // A client's own forged hop left of the proxy's is skipped: the right-most untrusted
        // hop is the one the proxy saw.
        let chain = headers("1.1.1.1, 203.0.113.50, 10.9.9.9");
        assert_eq!(
            trusted.client_address(ip("192.0.2.7"), &chain),
            ip("203.0.113.50")
        );
        let garbage = headers("not-an-address");
        assert_eq!(
            trusted.client_address(ip("10.1.2.3"), &garbage),
            ip("10.1.2.3")
        );
        let nobody = TrustedProxies::default();
        assert_eq!(
            nobody.client_address(ip("10.1.2.3"), &forged),
            ip("10.1.2.3")
        );
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["10.0.0.0/33", "proxy.example", "10.0.0.1 10.0.0.2"] {
            assert!(TrustedProxies::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            TrustedProxies::parse("").expect("empty"),
            TrustedProxies::default()
        );
        assert!(
            TrustedProxies::parse("::1")
                .expect("IPv6")
                .contains(ip("::1"))
        );
        assert!(
            TrustedProxies::parse("127.0.0.1")
                .expect("v4")
                .contains(ip("::ffff:127.0.0.1")),
            "a v4-mapped peer is its v4 address"
        );
    }
}
