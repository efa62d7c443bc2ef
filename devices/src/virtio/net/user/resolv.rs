//! The pod's `/etc/resolv.conf`, which the DHCP servers pass on to the guest as KubeVirt does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Name servers and search domains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolv {
    pub dns4: Vec<Ipv4Addr>,
    pub dns6: Vec<Ipv6Addr>,
    pub search: Vec<String>,
}

impl Resolv {
    /// Parses resolv.conf text: `nameserver` and `search` (or `domain`) lines; a later
    /// `search` or `domain` replaces an earlier one, as in the resolver. Loopback name servers
    /// (a resolver in the pod itself) are skipped: the guest cannot reach the pod's loopback
    /// through them.
    pub fn parse(text: &str) -> Self {
        let mut r = Self::default();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => match words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    Some(IpAddr::V4(a)) if !a.is_loopback() => r.dns4.push(a),
                    Some(IpAddr::V6(a)) if !a.is_loopback() => r.dns6.push(a),
                    _ => {}
                },
                Some("search") | Some("domain") => {
                    r.search = words.map(str::to_owned).collect();
                }
                _ => {}
            }
        }
        r
    }

    /// Reads and parses `path`; an unreadable file gives no servers.
    pub fn load(path: &std::path::Path) -> Self {
        std::fs::read_to_string(path)
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_of_a_kubernetes_pod() {
        let text = "search default.svc.cluster.local svc.cluster.local cluster.local\n\
                    nameserver 10.96.0.10\n\
                    nameserver fd00:10:96::a\n\
                    nameserver 127.0.0.53 # a local stub\n\
                    options ndots:5\n";
        let r = Resolv::parse(text);
        assert_eq!(r.dns4, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(r.dns6, vec!["fd00:10:96::a".parse::<Ipv6Addr>().unwrap()]);
        assert_eq!(
            r.search,
            [
                "default.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(
            Resolv::parse("nameserver nonsense\nsearch\n"),
            Resolv::default()
        );
    }
}
