//! What the gateway stands for in the pod. By default, as behind KubeVirt's masquerade
//! (where the gateway is an address of the pod's own network namespace), the guest's
//! connections to the gateway reach the pod's own address: services bound to the wildcard
//! or to the pod's IP answer, services bound to the pod's loopback do not, and destinations
//! on the loopback itself (127.0.0.0/8, ::1, and their IPv4-mapped forms) are dropped and
//! counted. With the opt-in `pod-loopback=on`, the gateway stands for the pod's loopback
//! and loopback destinations pass: every loopback-only service of the pod (sidecars' admin
//! ports, metrics endpoints) is then open to the guest.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{GATEWAY4, GATEWAY6};

/// Where connections to the gateway go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GatewayTo {
    /// The pod's own addresses, found when the NAT starts ([`pod_addresses`]).
    #[default]
    PodAddress,
    /// Given addresses (for tests: the host's interfaces are not the pod's).
    Addresses(Option<Ipv4Addr>, Option<Ipv6Addr>),
    /// The pod's loopback (127.0.0.1, ::1), with loopback destinations allowed: the opt-in.
    Loopback,
}

/// How the guest's destinations map to the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRoute {
    /// What the gateway stands for, per family; `None`: the pod has no address of that
    /// family, and the gateway reaches nothing there.
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    /// Loopback destinations pass (the opt-in).
    loopback: bool,
}

impl PodRoute {
    /// The route for `to`, looking up the pod's addresses when needed.
    pub fn new(to: GatewayTo) -> Self {
        let (v4, v6, loopback) = match to {
            GatewayTo::PodAddress => {
                let (v4, v6) = pod_addresses();
                (v4, v6, false)
            }
            GatewayTo::Addresses(v4, v6) => (v4, v6, false),
            GatewayTo::Loopback => (Some(Ipv4Addr::LOCALHOST), Some(Ipv6Addr::LOCALHOST), true),
        };
        Self { v4, v6, loopback }
    }

    /// Whether the guest may reach `dst`: anything but the pod's loopback, unless opted in.
    pub fn allows(&self, dst: IpAddr) -> bool {
        self.loopback || !on_loopback(dst)
    }

    /// Where the host socket connects for the guest's `remote`: the gateway's addresses
    /// stand for the pod; `None` where the pod has no address of the family, or `remote`
    /// is on the loopback and that is not allowed.
    pub fn host_destination(&self, remote: SocketAddr) -> Option<SocketAddr> {
        let ip = match remote.ip() {
            IpAddr::V4(a) if a == GATEWAY4 => IpAddr::V4(self.v4?),
            IpAddr::V6(a) if a == GATEWAY6 => IpAddr::V6(self.v6?),
            other if self.allows(other) => other,
            _ => return None,
        };
        Some(SocketAddr::new(ip, remote.port()))
    }
}

/// Whether `ip` lands on the host's loopback when connected to: 127.0.0.0/8, ::1, the
/// unspecified addresses (a connect to them goes to the local host), and IPv4-mapped
/// forms of those (an IPv6 socket reaches IPv4 through them).
pub fn on_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_loopback() || a.is_unspecified(),
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.to_ipv4_mapped()
                    .is_some_and(|m| m.is_loopback() || m.is_unspecified())
        }
    }
}

/// The pod's own addresses: those its routing table picks as the source toward the
/// network (the pod's eth0, which holds the default route), found by connecting a UDP socket
/// (nothing is sent) toward a documentation address of each family. No netlink, which the
/// pod's seccomp profile does not allow. `None` for a family the pod has no route in.
pub fn pod_addresses() -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let v4 = match source_toward(SocketAddr::from((Ipv4Addr::new(198, 51, 100, 1), 9))) {
        Some(IpAddr::V4(a)) if !a.is_loopback() && !a.is_unspecified() => Some(a),
        _ => None,
    };
    let documentation6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    let v6 = match source_toward(SocketAddr::from((documentation6, 9))) {
        // Global: a link-local address would need a scope to be reached.
        Some(IpAddr::V6(a))
            if !a.is_loopback() && !a.is_unspecified() && a.segments()[0] & 0xffc0 != 0xfe80 =>
        {
            Some(a)
        }
        _ => None,
    };
    (v4, v6)
}

/// The local address the kernel would send from toward `dst`.
fn source_toward(dst: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = if dst.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(dst).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(to: GatewayTo) -> PodRoute {
        PodRoute::new(to)
    }

    #[test]
    fn pod_gateway_reaches_the_pod_address_and_loopback_destinations_are_refused() {
        let pod4 = Ipv4Addr::new(10, 244, 0, 5);
        let pod6: Ipv6Addr = "fd00:10:244::5".parse().unwrap();
        let r = route(GatewayTo::Addresses(Some(pod4), Some(pod6)));
        let gw4 = SocketAddr::new(GATEWAY4.into(), 80);
        let gw6 = SocketAddr::new(GATEWAY6.into(), 80);
        assert_eq!(
            r.host_destination(gw4),
            Some(SocketAddr::new(pod4.into(), 80))
        );
        assert_eq!(
            r.host_destination(gw6),
            Some(SocketAddr::new(pod6.into(), 80))
        );
        let far: SocketAddr = "192.0.2.7:80".parse().unwrap();
        assert_eq!(r.host_destination(far), Some(far));
        for lo in [
            "127.0.0.1:80",
            "127.1.2.3:80",
            "0.0.0.0:80",
            "[::1]:80",
            "[::]:80",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:0.0.0.0]:80",
        ] {
            let lo: SocketAddr = lo.parse().unwrap();
            assert_eq!(r.host_destination(lo), None, "{lo}");
            assert!(!r.allows(lo.ip()), "{lo}");
        }
        // A pod without IPv6: the gateway reaches nothing there.
        let r = route(GatewayTo::Addresses(Some(pod4), None));
        assert_eq!(r.host_destination(gw6), None);
    }

    #[test]
    fn pod_loopback_opt_in_maps_the_gateway_to_the_loopback_and_lets_it_through() {
        let r = route(GatewayTo::Loopback);
        let gw4 = SocketAddr::new(GATEWAY4.into(), 80);
        assert_eq!(
            r.host_destination(gw4),
            Some("127.0.0.1:80".parse().unwrap())
        );
        let gw6 = SocketAddr::new(GATEWAY6.into(), 80);
        assert_eq!(r.host_destination(gw6), Some("[::1]:80".parse().unwrap()));
        let lo: SocketAddr = "127.0.0.1:22".parse().unwrap();
        assert_eq!(r.host_destination(lo), Some(lo));
    }

    #[test]
    fn pod_addresses_are_local_addresses_of_the_pod_never_its_loopback() {
        let (v4, v6) = pod_addresses();
        assert!(!v4.is_some_and(|a| a.is_loopback()));
        assert!(!v6.is_some_and(|a| a.is_loopback()));
        // Each is an address of this host: a socket binds to it.
        for ip in [v4.map(IpAddr::V4), v6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
        {
            std::net::UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("{ip}: {e}"));
        }
    }
}
