//! Inbound: the pod's ports forwarded to the guest, as KubeVirt's masquerade forwards the
//! pod's ports to the VM. podvm listens on each forwarded port on all of the pod's addresses
//! (IPv4 and IPv6, so the pod's loopback included); a TCP connection accepted there is
//! opened toward the guest by the stack, a UDP datagram is relayed as from its sender.
//!
//! The guest sees the real client address, as behind a DNAT; a client on the pod's own
//! loopback (which the guest could not answer) appears as the gateway, as in KubeVirt.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use super::{GATEWAY4, GATEWAY6, GUEST4, GUEST6};

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One forwarded port: the pod's `host` port to the guest's `guest` port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortForward {
    pub proto: Proto,
    pub host: u16,
    pub guest: u16,
}

/// Opening a forwarded port failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on the pod's {proto} port {port} ({family}) to forward it to the guest: {source}{hint}")]
pub struct BindError {
    pub proto: Proto,
    pub port: u16,
    pub family: &'static str,
    #[source]
    pub source: io::Error,
    pub hint: &'static str,
}

/// One listening socket of a forward.
pub enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// A bound forward: the rule and its listening socket.
pub struct Bound {
    pub rule: PortForward,
    pub listener: Listener,
    /// The socket is IPv6 (v6-only, or dual-stack when `dual`).
    pub v6: bool,
    pub dual: bool,
}

impl Bound {
    /// The guest address a connection or datagram from `client` goes to: the guest's
    /// address of the client's family.
    pub fn guest_addr(&self, client: SocketAddr) -> SocketAddr {
        let v4_client = match client.ip() {
            IpAddr::V4(_) => true,
            IpAddr::V6(a) => a.to_ipv4_mapped().is_some(),
        };
        let ip = if v4_client {
            IpAddr::V4(GUEST4)
        } else {
            IpAddr::V6(GUEST6)
        };
        SocketAddr::new(ip, self.rule.guest)
    }

    /// The listening socket's descriptor.
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match &self.listener {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Udp(s) => s.as_raw_fd(),
        }
    }
}

/// What `ports=all` bound: every TCP and UDP port that was free, each on one dual-stack
/// socket (or IPv4 only where the pod has no IPv6).
pub fn bind_every_port() -> Result<(Vec<Bound>, usize), BindError> {
    raise_open_file_limit();
    let mut bound = Vec::new();
    let mut skipped = 0;
    for proto in [Proto::Tcp, Proto::Udp] {
        for port in 1..=u16::MAX {
            let rule = PortForward {
                proto,
                host: port,
                guest: port,
            };
            let attempt = match bind_socket(rule, true, true) {
                Err(e) if e.source.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                    bind_socket(rule, false, false)
                }
                other => other,
            };
            match attempt {
                Ok(b) => bound.push(b),
                // Taken by podvm itself (its API or console never are TCP, but another
                // process in the pod may be), or privileged: not forwarded.
                Err(e)
                    if matches!(
                        e.source.raw_os_error(),
                        Some(libc::EADDRINUSE) | Some(libc::EACCES)
                    ) =>
                {
                    skipped += 1
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok((bound, skipped))
}

/// Every port needs two descriptors (TCP and UDP): lift the soft limit to the hard one.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one rlimit, which `limit` is.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Binds every rule on IPv4 and, where the pod has IPv6, on IPv6 (v6-only sockets, so the
/// two never overlap).
pub fn bind_all(rules: &[PortForward]) -> Result<Vec<Bound>, BindError> {
    let mut bound = Vec::new();
    for &rule in rules {
        bound.push(bind_socket(rule, false, false)?);
        match bind_socket(rule, true, false) {
            Ok(b) => bound.push(b),
            // A pod without IPv6 (or with it disabled) forwards IPv4 only.
            Err(e)
                if matches!(
                    e.source.raw_os_error(),
                    Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(bound)
}

fn bind_socket(rule: PortForward, v6: bool, dual: bool) -> Result<Bound, BindError> {
    let addr = if v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), rule.host)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), rule.host)
    };
    let err = |source: io::Error| {
        BindError {
        proto: rule.proto,
        port: rule.host,
        family: if v6 { "IPv6" } else { "IPv4" },
        hint: match source.raw_os_error() {
            Some(libc::EACCES) => "; ports below net.ipv4.ip_unprivileged_port_start need CAP_NET_BIND_SERVICE: forward a higher pod port (port=8080:80)",
            Some(libc::EADDRINUSE) => "; another process in the pod uses it: pick another pod port (port=HOSTPORT:GUESTPORT)",
            Some(libc::EMFILE) | Some(libc::ENFILE) => "; too many open files: raise the pod's open-file limit (ulimit -n) or forward fewer ports",
            _ => "",
        },
        source,
    }
    };
    let (ty, proto) = match rule.proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(
        Domain::for_address(addr),
        ty.nonblocking().cloexec(),
        Some(proto),
    )
    .map_err(err)?;
    if v6 {
        socket.set_only_v6(!dual).map_err(err)?;
    }
    if rule.proto == Proto::Tcp {
        socket.set_reuse_address(true).map_err(err)?;
    }
    socket.bind(&addr.into()).map_err(err)?;
    let listener = match rule.proto {
        Proto::Tcp => {
            socket.listen(1024).map_err(err)?;
            Listener::Tcp(socket.into())
        }
        Proto::Udp => Listener::Udp(socket.into()),
    };
    Ok(Bound {
        rule,
        listener,
        v6,
        dual,
    })
}

/// The address the guest sees for a client at `client`: itself, or the gateway for the pod's
/// own loopback.
pub fn guest_visible(client: SocketAddr) -> SocketAddr {
    match client.ip() {
        IpAddr::V4(a) if a.is_loopback() => SocketAddr::new(IpAddr::V4(GATEWAY4), client.port()),
        IpAddr::V6(a) if a.is_loopback() => SocketAddr::new(IpAddr::V6(GATEWAY6), client.port()),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => guest_visible(SocketAddr::new(IpAddr::V4(v4), client.port())),
            None => client,
        },
        IpAddr::V4(_) => client,
    }
}

/// Parses `PORT`, `HOST:GUEST`, `LO-HI`, `LO-HI:GLO-GHI`, each optionally followed by `/tcp`
/// or `/udp` (default tcp), into rules (a range gives one rule per port).
pub fn parse(spec: &str) -> Result<Vec<PortForward>, String> {
    let usage =
        "use port=PORT, port=HOSTPORT:GUESTPORT or port=FIRST-LAST, optionally with /tcp or /udp";
    let (ports, proto) = match spec.rsplit_once('/') {
        Some((p, "tcp")) => (p, Proto::Tcp),
        Some((p, "udp")) => (p, Proto::Udp),
        Some((_, other)) => {
            return Err(format!(
                "port {spec:?}: unknown protocol {other:?}; {usage}"
            ))
        }
        None => (spec, Proto::Tcp),
    };
    let range = |text: &str| -> Result<(u16, u16), String> {
        let num = |t: &str| {
            t.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| {
                format!("port {spec:?}: {t:?} is not a port from 1 to 65535; {usage}")
            })
        };
        match text.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!(
                        "port {spec:?}: the range {a}-{b} is backwards; {usage}"
                    ));
                }
                Ok((a, b))
            }
            None => num(text).map(|p| (p, p)),
        }
    };
    let (host, guest) = match ports.split_once(':') {
        Some((h, g)) => (range(h)?, range(g)?),
        None => {
            let r = range(ports)?;
            (r, r)
        }
    };
    if host.1 - host.0 != guest.1 - guest.0 {
        return Err(format!(
            "port {spec:?}: the pod range has {} ports and the guest range {}; give ranges of one length",
            host.1 - host.0 + 1,
            guest.1 - guest.0 + 1
        ));
    }
    Ok((0..=host.1 - host.0)
        .map(|i| PortForward {
            proto,
            host: host.0 + i,
            guest: guest.0 + i,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(proto: Proto, host: u16, guest: u16) -> PortForward {
        PortForward { proto, host, guest }
    }

    #[test]
    fn forward_specs_parse_ports_pairs_ranges_and_protocols() {
        assert_eq!(parse("8080").unwrap(), [rule(Proto::Tcp, 8080, 8080)]);
        assert_eq!(parse("2222:22").unwrap(), [rule(Proto::Tcp, 2222, 22)]);
        assert_eq!(parse("53/udp").unwrap(), [rule(Proto::Udp, 53, 53)]);
        assert_eq!(
            parse("8000-8002:9000-9002/tcp").unwrap(),
            [
                rule(Proto::Tcp, 8000, 9000),
                rule(Proto::Tcp, 8001, 9001),
                rule(Proto::Tcp, 8002, 9002)
            ]
        );
        assert_eq!(parse("7000-7001").unwrap().len(), 2);
    }

    #[test]
    fn forward_specs_refuse_what_cannot_work() {
        for bad in [
            "0", "65536", "x", "80/sctp", "9-8", "1-3:1-2", "", "1:", ":2",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forward_clients_on_the_pod_loopback_appear_as_the_gateway() {
        let lo: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(guest_visible(lo), "10.0.2.1:5000".parse().unwrap());
        let mapped: SocketAddr = "[::ffff:10.244.0.9]:5000".parse().unwrap();
        assert_eq!(guest_visible(mapped), "10.244.0.9:5000".parse().unwrap());
        let lo6: SocketAddr = "[::1]:5000".parse().unwrap();
        assert_eq!(guest_visible(lo6), "[fd10:0:2::1]:5000".parse().unwrap());
        let far: SocketAddr = "10.244.0.9:5000".parse().unwrap();
        assert_eq!(guest_visible(far), far);
    }
}
