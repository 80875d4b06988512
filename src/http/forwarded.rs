//! Who the client is behind a reverse proxy: `--trusted-proxy` CIDRs and the
//! `X-Forwarded-For` / `Forwarded` (RFC 7239) headers, sans-IO.
//!
//! Only a peer inside a trusted network may name the client. Each proxy appends the address it
//! received the request from, so the list is read from the right: the first entry that is not
//! itself a trusted proxy is the client (anything to its left was written by that client and may
//! be forged). If every entry is trusted, the leftmost one is the best we know. An entry that
//! cannot be read (garbage, `unknown`, an RFC 7239 obfuscated identifier) stops the walk and the
//! TCP peer is used, so a bad header can only make clients share the proxy's address, never
//! pick an address of their choosing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An IP network: an address and a prefix length (a single address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`, `::1`. Host bits below the prefix
    /// are cleared (`10.1.2.3/8` means `10.0.0.0/8`).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("not an IP address or CIDR: {s:?}"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(format!("bad prefix length in {s:?} (0..={max})")),
            },
        };
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// For clap's `value_parser`.
    pub fn parse_arg(s: &str) -> Result<Cidr, String> {
        Cidr::parse(s)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        Cidr::parse(s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// Whether `ip` is in any of `nets`.
pub fn is_trusted(nets: &[Cidr], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

/// The client address for a request that came from `peer` with these `headers` (names
/// lowercased, as in [`crate::http::Request::headers`]).
///
/// - `peer` not in `trusted`: `peer` (the headers are ignored).
/// - Otherwise every `X-Forwarded-For` header, concatenated in order, read right to left: the
///   first entry not in `trusted`; the leftmost if all are; `peer` if an entry is unreadable.
///   Entries are bare IPs, `IPv4:port`, `[IPv6]` or `[IPv6]:port`.
/// - Without `X-Forwarded-For`, the `for=` parameters of every `Forwarded` header the same way
///   (quoted `"[2001:db8::1]:4711"`, ports; `unknown` and obfuscated `_names` fall back to
///   `peer`).
///
/// A forwarded address without a port gets port 0. IPv4-mapped IPv6 addresses come back as IPv4.
pub fn client_addr(
    peer: SocketAddr,
    trusted: &[Cidr],
    headers: &[(String, Vec<u8>)],
) -> SocketAddr {
    if !is_trusted(trusted, peer.ip()) {
        return peer;
    }
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    };
    if values("x-forwarded-for").next().is_some() {
        let entries: Vec<Option<SocketAddr>> = values("x-forwarded-for")
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|e| parse_node(trim(e)))
            .collect();
        return pick(peer, trusted, &entries);
    }
    if values("forwarded").next().is_some() {
        let entries: Vec<Option<SocketAddr>> = values("forwarded")
            .flat_map(|v| v.split(|&b| b == b','))
            .map(forwarded_for)
            .collect();
        return pick(peer, trusted, &entries);
    }
    peer
}

/// Right to left: the first untrusted entry; the leftmost if all are trusted; `peer` on an
/// unreadable entry or an empty list.
fn pick(peer: SocketAddr, trusted: &[Cidr], entries: &[Option<SocketAddr>]) -> SocketAddr {
    for e in entries.iter().rev() {
        match e {
            None => return peer,
            Some(a) if !is_trusted(trusted, a.ip()) => return *a,
            Some(_) => {}
        }
    }
    entries.first().copied().flatten().unwrap_or(peer)
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end.max(start)]
}

/// The `for=` node of one `Forwarded` element (`for=1.2.3.4;proto=https`), if readable.
fn forwarded_for(element: &[u8]) -> Option<SocketAddr> {
    for pair in element.split(|&b| b == b';') {
        let pair = trim(pair);
        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
            continue;
        };
        if !trim(&pair[..eq]).eq_ignore_ascii_case(b"for") {
            continue;
        }
        let mut value = trim(&pair[eq + 1..]);
        if value.len() >= 2 && value[0] == b'"' && value[value.len() - 1] == b'"' {
            value = &value[1..value.len() - 1];
        }
        return parse_node(value);
    }
    None
}

/// One node: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:80`.
/// `unknown`, `_obfuscated` and anything else: `None`.
fn parse_node(b: &[u8]) -> Option<SocketAddr> {
    let s = std::str::from_utf8(b).ok()?;
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip.to_canonical(), 0));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        let ip: Ipv6Addr = inner.parse().ok()?;
        return Some(SocketAddr::new(IpAddr::V6(ip).to_canonical(), 0));
    }
    let a: SocketAddr = s.parse().ok()?;
    Some(SocketAddr::new(a.ip().to_canonical(), a.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| Cidr::parse(s).unwrap()).collect()
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const PROXY: &str = "10.0.0.5:40000";

    #[test]
    fn cidr_parsing() {
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            Cidr::parse("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(Cidr::parse(" ::1 ").unwrap().to_string(), "::1/128");
        assert_eq!(
            Cidr::parse("2001:db8::1/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!(Cidr::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(
            Cidr::parse("::ffff:10.0.0.1").unwrap().to_string(),
            "10.0.0.1/32"
        );
        for bad in [
            "",
            "10.0.0.1/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.1/",
            "10.0.0.1/+8",
            "x",
            "10.0.0.1/-1",
            "[::1]",
            "1.2.3.4:80",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cidr_membership() {
        let n = nets(&["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]);
        assert!(is_trusted(&n, "10.255.1.1".parse().unwrap()));
        assert!(!is_trusted(&n, "11.0.0.1".parse().unwrap()));
        assert!(is_trusted(&n, "2001:db8:ffff::1".parse().unwrap()));
        assert!(!is_trusted(&n, "2001:db9::1".parse().unwrap()));
        assert!(is_trusted(&n, "192.0.2.7".parse().unwrap()));
        assert!(!is_trusted(&n, "192.0.2.8".parse().unwrap()));
        // IPv4-mapped IPv6 (a dual-stack listener) is the IPv4 address.
        assert!(is_trusted(&n, "::ffff:10.1.1.1".parse().unwrap()));
        let all = nets(&["0.0.0.0/0"]);
        assert!(is_trusted(&all, "1.2.3.4".parse().unwrap()));
        assert!(!is_trusted(&all, "::2".parse().unwrap()));
        assert!(!is_trusted(&[], "1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let peer = a("203.0.113.9:5555");
        let headers = h(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert_eq!(client_addr(peer, &nets(&["10.0.0.0/8"]), &headers), peer);
        assert_eq!(client_addr(peer, &[], &headers), peer);
    }

    #[test]
    fn rightmost_untrusted_forwarded_for_entry() {
        let t = nets(&["10.0.0.0/8"]);
        let peer = a(PROXY);
        let one = |xff: &str| client_addr(peer, &t, &h(&[("x-forwarded-for", xff)]));
        assert_eq!(one("198.51.100.1"), a("198.51.100.1:0"));
        // The client forged the left part; our proxies appended the right part.
        assert_eq!(one("6.6.6.6, 198.51.100.1, 10.0.0.2"), a("198.51.100.1:0"));
        assert_eq!(one("6.6.6.6,198.51.100.1,10.0.0.2"), a("198.51.100.1:0"));
        // All trusted: the leftmost.
        assert_eq!(one("10.0.0.7, 10.0.0.2"), a("10.0.0.7:0"));
        // Ports and brackets.
        assert_eq!(one("198.51.100.1:4444"), a("198.51.100.1:4444"));
        assert_eq!(one("2001:db8::1"), a("[2001:db8::1]:0"));
        assert_eq!(one("[2001:db8::1]"), a("[2001:db8::1]:0"));
        assert_eq!(one("[2001:db8::1]:4711"), a("[2001:db8::1]:4711"));
        assert_eq!(one("::ffff:198.51.100.1"), a("198.51.100.1:0"));
        // Unreadable: fall back to the proxy, never to something the client chose.
        assert_eq!(one("198.51.100.1, garbage"), peer);
        assert_eq!(one("unknown"), peer);
        assert_eq!(one(""), peer);
        assert_eq!(one("1.2.3.4,,"), peer);
        // Garbage left of the client entry does not matter.
        assert_eq!(one("garbage, 198.51.100.1"), a("198.51.100.1:0"));
    }

    #[test]
    fn several_forwarded_for_headers_are_one_list() {
        let t = nets(&["10.0.0.0/8"]);
        let headers = h(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.1"),
            ("host", "x"),
            ("x-forwarded-for", "10.0.0.3"),
        ]);
        assert_eq!(client_addr(a(PROXY), &t, &headers), a("198.51.100.1:0"));
        let headers = h(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "198.51.100.2"),
        ]);
        assert_eq!(client_addr(a(PROXY), &t, &headers), a("198.51.100.2:0"));
    }

    #[test]
    fn forwarded_header_rfc7239() {
        let t = nets(&["10.0.0.0/8"]);
        let peer = a(PROXY);
        let one = |v: &str| client_addr(peer, &t, &h(&[("forwarded", v)]));
        assert_eq!(
            one("for=192.0.2.60;proto=http;by=203.0.113.43"),
            a("192.0.2.60:0")
        );
        assert_eq!(
            one("For=\"[2001:db8:cafe::17]:4711\""),
            a("[2001:db8:cafe::17]:4711")
        );
        assert_eq!(
            one("for=\"[2001:db8:cafe::17]\""),
            a("[2001:db8:cafe::17]:0")
        );
        assert_eq!(
            one("for=192.0.2.43, for=198.51.100.17"),
            a("198.51.100.17:0")
        );
        assert_eq!(one("for=192.0.2.43, for=10.0.0.9"), a("192.0.2.43:0"));
        assert_eq!(one("proto=https; for=192.0.2.43"), a("192.0.2.43:0"));
        assert_eq!(one("for=\"192.0.2.43:80\""), a("192.0.2.43:80"));
        // Obfuscated, unknown, missing: the peer.
        assert_eq!(one("for=_hidden"), peer);
        assert_eq!(one("for=unknown"), peer);
        assert_eq!(one("for=192.0.2.43, for=_hidden"), peer);
        assert_eq!(one("proto=https"), peer);
        assert_eq!(one("for=\"[2001:db8::1\""), peer);
        assert_eq!(one("for="), peer);
        // X-Forwarded-For wins when both are present.
        let both = h(&[
            ("forwarded", "for=192.0.2.1"),
            ("x-forwarded-for", "192.0.2.2"),
        ]);
        assert_eq!(client_addr(peer, &t, &both), a("192.0.2.2:0"));
        // Neither: the peer.
        assert_eq!(client_addr(peer, &t, &h(&[("host", "x")])), peer);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let t = nets(&["0.0.0.0/0", "::/0"]);
        let peer = a(PROXY);
        let mut x: u32 = 0x1234_5678;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    b"0123456789abcdef:.[],;=\"_ forFOR\xff"[(x % 33) as usize]
                })
                .collect();
            for name in ["x-forwarded-for", "forwarded"] {
                let headers = vec![(name.to_string(), bytes.clone())];
                let _ = client_addr(peer, &t, &headers);
            }
        }
    }
}
