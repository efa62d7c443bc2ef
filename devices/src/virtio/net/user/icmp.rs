//! Pings beyond the gateway, through unprivileged ICMP datagram ("ping") sockets: the pod may
//! open them when its `net.ipv4.ping_group_range` includes its group (Kubernetes runtimes
//! set that range wide by default). Where it does not, the guest's pings go unanswered and
//! are counted. The kernel picks the echo identifier of a ping socket; replies are given back
//! to the guest with its own identifier.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpProtocol,
};
use socket2::{Domain, Protocol, Socket, Type};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{self, Reply, Unanswered};
use super::{Stack, GUEST4, GUEST6, TOKEN_ICMP};
use crate::virtio::net::metrics::NetMetrics as M;

/// How long a ping conversation lives without an echo either way.
pub const IDLE: Duration = Duration::from_secs(60);

struct Flow {
    dst: IpAddr,
    ident: u16,
    socket: Socket,
    last_active: Instant,
}

/// Ping conversations: one ping socket per destination and guest identifier.
pub struct IcmpNat {
    max_flows: usize,
    /// The link MTU: larger replies are dropped.
    mtu: u16,
    flows: HashMap<u64, Flow>,
    by_key: HashMap<(IpAddr, u16), u64>,
    next_id: u64,
    /// Ping sockets were refused once: the pod does not allow them; stop trying.
    unavailable: bool,
}

impl IcmpNat {
    /// At most `max_flows` conversations at once, on a link of `mtu`.
    pub fn new(max_flows: usize, mtu: u16) -> Self {
        Self {
            max_flows,
            mtu,
            flows: HashMap::new(),
            by_key: HashMap::new(),
            next_id: 1,
            unavailable: false,
        }
    }

    /// An echo request from the guest to `dst`.
    pub fn on_echo(
        &mut self,
        dst: IpAddr,
        ident: u16,
        seq: u16,
        payload: &[u8],
        stack: &mut Stack,
        epoll: &Epoll,
    ) {
        let id = match self.by_key.get(&(dst, ident)) {
            Some(&id) => id,
            None => match self.open(dst, ident, epoll) {
                Some(id) => id,
                None => {
                    M::inc(&stack.metrics.nat_icmp_unanswered);
                    return;
                }
            },
        };
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        flow.last_active = Instant::now();
        // Type, code, checksum (the kernel fills it), identifier (the kernel's), sequence.
        let mut msg = Vec::with_capacity(8 + payload.len());
        msg.push(if dst.is_ipv4() { 8 } else { 128 });
        msg.extend_from_slice(&[0, 0, 0, 0, 0]);
        msg.extend_from_slice(&seq.to_be_bytes());
        msg.extend_from_slice(payload);
        if flow.socket.send(&msg).is_err() {
            M::inc(&stack.metrics.nat_icmp_unanswered);
        }
    }

    fn open(&mut self, dst: IpAddr, ident: u16, epoll: &Epoll) -> Option<u64> {
        if self.unavailable || self.flows.len() >= self.max_flows {
            return None;
        }
        let (domain, proto) = match dst {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
        };
        let socket = match Socket::new(domain, Type::DGRAM.nonblocking().cloexec(), Some(proto)) {
            Ok(s) => s,
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) {
                    tracing::info!(
                        "ping sockets are not allowed in this pod (net.ipv4.ping_group_range); \
                         the guest's pings beyond the gateway go unanswered"
                    );
                    self.unavailable = true;
                }
                return None;
            }
        };
        socket.connect(&SocketAddr::new(dst, 0).into()).ok()?;
        let id = self.next_id;
        self.next_id += 1;
        epoll
            .ctl(
                ControlOperation::Add,
                socket.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_ICMP | id),
            )
            .ok()?;
        self.flows.insert(
            id,
            Flow {
                dst,
                ident,
                socket,
                last_active: Instant::now(),
            },
        );
        self.by_key.insert((dst, ident), id);
        Some(id)
    }

    /// Echo replies on conversation `id`, to the guest.
    pub fn on_host_event(&mut self, id: u64, stack: &mut Stack, guest_mac: EthernetAddress) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let mut buf = vec![0u8; 65_536];
        loop {
            let n = match (&flow.socket).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let msg = &buf[..n];
            // Only echo replies come back on a ping socket; errors are not relayed.
            if n < 8 || (msg[0] != 0 && msg[0] != 129) {
                continue;
            }
            flow.last_active = Instant::now();
            let seq = u16::from_be_bytes([msg[6], msg[7]]);
            let data = &msg[8..];
            let Ok(frame) = echo_reply(guest_mac, flow.dst, flow.ident, seq, data, self.mtu) else {
                M::inc(&stack.metrics.nat_reply_too_large);
                continue;
            };
            if stack.wire.to_guest.push(frame) {
                M::inc(&stack.metrics.nat_icmp_replies);
            }
        }
    }

    /// Drops idle conversations.
    pub fn reap(&mut self, now: Instant, epoll: &Epoll) {
        let idle: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, f)| now.duration_since(f.last_active) > IDLE)
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            if let Some(flow) = self.flows.remove(&id) {
                self.by_key.remove(&(flow.dst, flow.ident));
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    flow.socket.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
    }
}

/// An echo reply from `from` to the guest, if it fits one IP packet of the link's `mtu`
/// (the guest chose the size of its request; a reply larger than its link is dropped).
pub fn echo_reply(
    guest_mac: EthernetAddress,
    from: IpAddr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
    mtu: u16,
) -> Reply {
    let sums = ChecksumCapabilities::default();
    let (header, limit) = match from {
        IpAddr::V4(_) => (20, packet::reply_limit4(mtu)),
        IpAddr::V6(_) => (40, packet::reply_limit6(mtu)),
    };
    if header + 8 + data.len() > limit {
        return Err(Unanswered::TooLarge);
    }
    let frame = match from {
        IpAddr::V4(src) => {
            let repr = Icmpv4Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            packet::ipv4(
                guest_mac,
                src,
                GUEST4,
                IpProtocol::Icmp,
                repr.buffer_len(),
                |b| repr.emit(&mut Icmpv4Packet::new_unchecked(b), &sums),
            )
        }
        IpAddr::V6(src) => {
            let repr = Icmpv6Repr::EchoReply {
                ident,
                seq_no,
                data,
            };
            packet::ipv6(
                guest_mac,
                src,
                GUEST6,
                IpProtocol::Icmpv6,
                repr.buffer_len(),
                |b| repr.emit(&src, &GUEST6, &mut Icmpv6Packet::new_unchecked(b), &sums),
            )
        }
    };
    frame.ok_or(Unanswered::TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, Ipv6Packet};

    const MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    #[test]
    fn icmp_echo_reply_fits_the_mtu_or_is_not_sent() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        // 1500 bytes of IPv4: 20 + 8 + 1472.
        let reply = echo_reply(MAC, v4, 1, 2, &[0xa5; 1472], 1500).unwrap();
        assert_eq!(reply.len(), 14 + 1500);
        let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        assert_eq!(
            echo_reply(MAC, v4, 1, 2, &[0; 1473], 1500),
            Err(Unanswered::TooLarge)
        );
        // The largest echo the length fields allow: never a wrapped header.
        assert_eq!(
            echo_reply(MAC, v4, 1, 2, &[0; 65_515], 65_520),
            Err(Unanswered::TooLarge)
        );
        let reply = echo_reply(MAC, v6, 1, 2, &[0; 1452], 1500).unwrap();
        let ip = Ipv6Packet::new_checked(&reply[14..]).unwrap();
        assert_eq!(usize::from(ip.payload_len()), 8 + 1452);
        assert_eq!(
            echo_reply(MAC, v6, 1, 2, &[0; 65_528], 65_520),
            Err(Unanswered::TooLarge)
        );
    }
}
