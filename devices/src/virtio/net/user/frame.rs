//! What to do with a frame from the guest: the NAT's first and only look at untrusted bytes
//! before they reach smoltcp or a host socket. Pure (no fds, no state), fuzzable.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpAddress, IpProtocol, Ipv4Packet,
    Ipv6Packet, NdiscRepr, TcpPacket, UdpPacket,
};

use super::{GATEWAY4, GATEWAY6, GATEWAY6_LINK_LOCAL, GATEWAY_MAC, GUEST4, GUEST6};

/// A guest's TCP or UDP conversation: its own address and the one it talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub guest: SocketAddr,
    pub remote: SocketAddr,
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Truncated or inconsistent headers.
    Malformed,
    /// A wrong IP, TCP, UDP or ICMP checksum.
    Checksum,
    /// An IP fragment (the NAT does not reassemble; guests do path-MTU discovery).
    Fragment,
    /// A protocol or destination the NAT does not serve, or a spoofed source address.
    Unsupported,
}

/// The verdict on one guest frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// For the stack acting as the gateway: ARP and neighbour discovery for the gateway,
    /// pings of the gateway, segments of open TCP connections.
    Stack,
    /// A SYN: the guest opens a TCP connection.
    TcpSyn(FlowKey),
    /// A UDP datagram (not DHCP).
    Udp { key: FlowKey, payload: &'a [u8] },
    /// A DHCPv4 message (UDP to port 67).
    Dhcp4(&'a [u8]),
    /// A DHCPv6 message (UDP to port 547), with the guest's link-local source.
    Dhcp6 { src: SocketAddr, payload: &'a [u8] },
    /// An ICMPv6 router solicitation.
    RouterSolicit,
    /// An ICMP echo request to an address other than the gateway.
    Echo {
        dst: IpAddr,
        ident: u16,
        seq: u16,
        payload: &'a [u8],
    },
    /// Not for anyone here (another MAC, ARP for other hosts, multicast noise): ignored,
    /// not counted.
    Ignore,
    /// Dropped and counted.
    Drop(DropReason),
}

impl Verdict<'_> {
    /// The address beyond the gateway this verdict sends something to, if any.
    pub fn destination(&self) -> Option<IpAddr> {
        match self {
            Verdict::TcpSyn(key) | Verdict::Udp { key, .. } => Some(key.remote.ip()),
            Verdict::Echo { dst, .. } => Some(*dst),
            _ => None,
        }
    }
}

use DropReason::*;
use Verdict::Drop as D;

/// Decides what to do with `frame` (an Ethernet frame without the virtio-net header).
pub fn classify(frame: &[u8]) -> Verdict<'_> {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return D(Malformed);
    };
    let dst = eth.dst_addr();
    if dst != EthernetAddress(GATEWAY_MAC) && !dst.is_broadcast() && !dst.is_multicast() {
        return Verdict::Ignore;
    }
    match eth.ethertype() {
        EthernetProtocol::Arp => arp(eth.payload()),
        EthernetProtocol::Ipv4 => ipv4(eth.payload()),
        EthernetProtocol::Ipv6 => ipv6(eth.payload()),
        _ => Verdict::Ignore,
    }
}

fn arp(payload: &[u8]) -> Verdict<'_> {
    let Ok(packet) = ArpPacket::new_checked(payload) else {
        return D(Malformed);
    };
    match ArpRepr::parse(&packet) {
        Ok(ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            target_protocol_addr,
            ..
        }) if target_protocol_addr == GATEWAY4 => Verdict::Stack,
        Ok(ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            ..
        }) => Verdict::Stack,
        Ok(_) => Verdict::Ignore,
        Err(_) => D(Malformed),
    }
}

fn ipv4(payload: &[u8]) -> Verdict<'_> {
    let Ok(ip) = Ipv4Packet::new_checked(payload) else {
        return D(Malformed);
    };
    if ip.version() != 4 {
        return D(Malformed);
    }
    if !ip.verify_checksum() {
        return D(Checksum);
    }
    if ip.more_frags() || ip.frag_offset() != 0 {
        return D(Fragment);
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let body = ip.payload();
    let (s, d) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
    // The guest's link has only the gateway besides the guest (and DHCP's broadcasts).
    let on_link = u32::from(dst) & 0xffff_ff00 == u32::from(GATEWAY4) & 0xffff_ff00;
    if on_link && dst != GATEWAY4 {
        return Verdict::Ignore;
    }
    match ip.next_header() {
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(body) else {
                return D(Malformed);
            };
            // A zero UDP checksum means "none" over IPv4.
            if udp.checksum() != 0 && !udp.verify_checksum(&s, &d) {
                return D(Checksum);
            }
            if udp.dst_port() == 67 {
                return Verdict::Dhcp4(udp.payload());
            }
            if src != GUEST4 {
                return D(Unsupported);
            }
            // To the gateway: the pod itself (see pod::PodRoute).
            if dst.is_broadcast() || dst.is_multicast() || dst.is_unspecified() {
                return Verdict::Ignore;
            }
            Verdict::Udp {
                key: key4(src, udp.src_port(), dst, udp.dst_port()),
                payload: udp.payload(),
            }
        }
        IpProtocol::Tcp => {
            if src != GUEST4 || !unicast4(dst) {
                return D(Unsupported);
            }
            tcp(body, s, d)
        }
        IpProtocol::Icmp => {
            if src != GUEST4 {
                return D(Unsupported);
            }
            let Ok(icmp) = Icmpv4Packet::new_checked(body) else {
                return D(Malformed);
            };
            if !icmp.verify_checksum() {
                return D(Checksum);
            }
            match icmp.msg_type() {
                Icmpv4Message::EchoRequest if dst == GATEWAY4 => Verdict::Stack,
                Icmpv4Message::EchoRequest if unicast4(dst) => Verdict::Echo {
                    dst: IpAddr::V4(dst),
                    ident: icmp.echo_ident(),
                    seq: icmp.echo_seq_no(),
                    payload: icmp.data(),
                },
                _ => Verdict::Ignore,
            }
        }
        _ => D(Unsupported),
    }
}

fn ipv6(payload: &[u8]) -> Verdict<'_> {
    let Ok(ip) = Ipv6Packet::new_checked(payload) else {
        return D(Malformed);
    };
    if ip.version() != 6 {
        return D(Malformed);
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let body = ip.payload();
    let (s, d) = (IpAddress::Ipv6(src), IpAddress::Ipv6(dst));
    let on_link = u128::from(dst) >> 8 == u128::from(GATEWAY6) >> 8;
    if on_link && dst != GATEWAY6 {
        return Verdict::Ignore;
    }
    match ip.next_header() {
        IpProtocol::Icmpv6 => {
            let Ok(icmp) = Icmpv6Packet::new_checked(body) else {
                return D(Malformed);
            };
            if !icmp.verify_checksum(&src, &dst) {
                return D(Checksum);
            }
            match icmp.msg_type() {
                Icmpv6Message::RouterSolicit => Verdict::RouterSolicit,
                Icmpv6Message::NeighborSolicit => match NdiscRepr::parse(&icmp) {
                    Ok(NdiscRepr::NeighborSolicit { target_addr, .. })
                        if target_addr == GATEWAY6 || target_addr == GATEWAY6_LINK_LOCAL =>
                    {
                        Verdict::Stack
                    }
                    Ok(_) => Verdict::Ignore,
                    Err(_) => D(Malformed),
                },
                Icmpv6Message::NeighborAdvert => Verdict::Stack,
                Icmpv6Message::EchoRequest if dst == GATEWAY6 || dst == GATEWAY6_LINK_LOCAL => {
                    Verdict::Stack
                }
                Icmpv6Message::EchoRequest if src == GUEST6 && unicast6(dst) => Verdict::Echo {
                    dst: IpAddr::V6(dst),
                    ident: icmp.echo_ident(),
                    seq: icmp.echo_seq_no(),
                    payload: icmp.payload(),
                },
                _ => Verdict::Ignore,
            }
        }
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(body) else {
                return D(Malformed);
            };
            if !udp.verify_checksum(&s, &d) {
                return D(Checksum);
            }
            if udp.dst_port() == 547 {
                return Verdict::Dhcp6 {
                    src: SocketAddr::new(IpAddr::V6(src), udp.src_port()),
                    payload: udp.payload(),
                };
            }
            if src != GUEST6 {
                return D(Unsupported);
            }
            if !unicast6(dst) {
                return Verdict::Ignore;
            }
            Verdict::Udp {
                key: key6(src, udp.src_port(), dst, udp.dst_port()),
                payload: udp.payload(),
            }
        }
        IpProtocol::Tcp => {
            if src != GUEST6 || !unicast6(dst) {
                return D(Unsupported);
            }
            tcp(body, s, d)
        }
        IpProtocol::Ipv6Frag => D(Fragment),
        IpProtocol::HopByHop => Verdict::Ignore,
        _ => D(Unsupported),
    }
}

/// A TCP segment from the guest (its addresses already checked): a SYN opens a
/// connection, anything else belongs to one the stack knows.
fn tcp(body: &[u8], s: IpAddress, d: IpAddress) -> Verdict<'_> {
    let Ok(tcp) = TcpPacket::new_checked(body) else {
        return D(Malformed);
    };
    if !tcp.verify_checksum(&s, &d) {
        return D(Checksum);
    }
    if !tcp.syn() || tcp.ack() {
        return Verdict::Stack;
    }
    // Data on a SYN is for TCP Fast Open, which the stack does not offer: no client sends it
    // unasked, and the NAT would hold it while it connects.
    if !tcp.payload().is_empty() {
        return D(Unsupported);
    }
    Verdict::TcpSyn(FlowKey {
        guest: SocketAddr::new(IpAddr::from(s), tcp.src_port()),
        remote: SocketAddr::new(IpAddr::from(d), tcp.dst_port()),
    })
}

/// Where the IP packet of `frame` ends (Ethernet padding and other trailing bytes are not
/// part of it); the frame's length when it is not IPv4 or IPv6 or its length field lies.
pub fn packet_end(frame: &[u8]) -> usize {
    let field = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let end = match frame.get(12..14) {
        Some([0x08, 0x00]) => field(14 + 2).map(|total| 14 + usize::from(total)),
        Some([0x86, 0xdd]) => field(14 + 4).map(|payload| 14 + 40 + usize::from(payload)),
        _ => None,
    };
    end.filter(|&e| e <= frame.len()).unwrap_or(frame.len())
}

fn unicast4(a: Ipv4Addr) -> bool {
    !(a.is_broadcast() || a.is_multicast() || a.is_unspecified())
}

fn unicast6(a: Ipv6Addr) -> bool {
    !(a.is_multicast() || a.is_unspecified())
}

fn key4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> FlowKey {
    FlowKey {
        guest: SocketAddr::new(IpAddr::V4(src), sport),
        remote: SocketAddr::new(IpAddr::V4(dst), dport),
    }
}

fn key6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16) -> FlowKey {
    FlowKey {
        guest: SocketAddr::new(IpAddr::V6(src), sport),
        remote: SocketAddr::new(IpAddr::V6(dst), dport),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::user::packet;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber};

    const GW: EthernetAddress = EthernetAddress(GATEWAY_MAC);

    fn guest(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(GUEST4), port)
    }

    fn remote() -> SocketAddr {
        "192.0.2.7:53".parse().unwrap()
    }

    fn syn(src: Ipv4Addr) -> Vec<u8> {
        let repr = TcpRepr {
            src_port: 40000,
            dst_port: 80,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1),
            ack_number: None,
            window_len: 1000,
            window_scale: None,
            max_seg_size: Some(1460),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let dst = Ipv4Addr::new(192, 0, 2, 7);
        packet::ipv4(GW, src, dst, IpProtocol::Tcp, repr.buffer_len(), |b| {
            repr.emit(
                &mut TcpPacket::new_unchecked(b),
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
                &ChecksumCapabilities::default(),
            )
        })
        .unwrap()
    }

    #[test]
    fn frame_udp_and_dhcp_and_syn_are_recognised() {
        let f = packet::udp(GW, guest(5353), remote(), b"query").unwrap();
        assert_eq!(
            classify(&f),
            Verdict::Udp {
                key: FlowKey {
                    guest: guest(5353),
                    remote: remote()
                },
                payload: b"query"
            }
        );
        let dhcp = packet::udp(
            EthernetAddress::BROADCAST,
            "0.0.0.0:68".parse().unwrap(),
            "255.255.255.255:67".parse().unwrap(),
            b"x",
        )
        .unwrap();
        assert_eq!(classify(&dhcp), Verdict::Dhcp4(b"x"));
        assert!(matches!(classify(&syn(GUEST4)), Verdict::TcpSyn(k) if k.remote.port() == 80));
    }

    #[test]
    fn frame_bad_checksums_fragments_truncation_and_spoofing_are_dropped() {
        let good = packet::udp(GW, guest(5353), remote(), b"query").unwrap();
        let mut bad_sum = good.clone();
        *bad_sum.last_mut().unwrap() ^= 0xff;
        assert_eq!(classify(&bad_sum), Verdict::Drop(DropReason::Checksum));

        let mut fragment = good.clone();
        fragment[14 + 6] |= 0x20; // more fragments
        let mut ip = Ipv4Packet::new_unchecked(&mut fragment[14..]);
        ip.fill_checksum();
        assert_eq!(classify(&fragment), Verdict::Drop(DropReason::Fragment));

        assert_eq!(classify(&good[..30]), Verdict::Drop(DropReason::Malformed));
        assert_eq!(classify(&good[..10]), Verdict::Drop(DropReason::Malformed));

        let spoofed = syn(Ipv4Addr::new(10, 0, 2, 99));
        assert_eq!(classify(&spoofed), Verdict::Drop(DropReason::Unsupported));

        let mut bad_ip_sum = good;
        bad_ip_sum[14 + 10] ^= 0xff;
        assert_eq!(classify(&bad_ip_sum), Verdict::Drop(DropReason::Checksum));
    }

    #[test]
    fn frame_to_the_gateway_is_served_and_to_other_link_addresses_ignored() {
        let to_gw = packet::udp(GW, guest(5), "10.0.2.1:53".parse().unwrap(), b"q").unwrap();
        assert!(matches!(classify(&to_gw), Verdict::Udp { .. }));
        let to_neighbour = packet::udp(GW, guest(5), "10.0.2.7:53".parse().unwrap(), b"q").unwrap();
        assert_eq!(classify(&to_neighbour), Verdict::Ignore);
        let to_link_broadcast =
            packet::udp(GW, guest(5), "10.0.2.255:53".parse().unwrap(), b"q").unwrap();
        assert_eq!(classify(&to_link_broadcast), Verdict::Ignore);
    }

    #[test]
    fn frame_for_another_mac_is_ignored() {
        let mut f = packet::udp(GW, guest(1), remote(), b"").unwrap();
        f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 9]);
        assert_eq!(classify(&f), Verdict::Ignore);
    }

    #[test]
    fn frame_syn_with_data_is_dropped_and_a_syn_is_kept_without_trailing_bytes() {
        let repr = TcpRepr {
            src_port: 40000,
            dst_port: 80,
            control: TcpControl::Syn,
            seq_number: TcpSeqNumber(1),
            ack_number: None,
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[7; 1000],
        };
        let (src, dst) = (GUEST4, Ipv4Addr::new(192, 0, 2, 7));
        let f = packet::ipv4(GW, src, dst, IpProtocol::Tcp, repr.buffer_len(), |b| {
            repr.emit(
                &mut TcpPacket::new_unchecked(b),
                &IpAddress::Ipv4(src),
                &IpAddress::Ipv4(dst),
                &ChecksumCapabilities::default(),
            )
        })
        .unwrap();
        assert_eq!(classify(&f), Verdict::Drop(DropReason::Unsupported));

        let mut padded = syn(GUEST4);
        let len = padded.len();
        padded.resize(60_000, 0xee);
        assert!(matches!(classify(&padded), Verdict::TcpSyn(_)));
        assert_eq!(packet_end(&padded), len);
        assert_eq!(packet_end(&padded[..30]), 30);
        assert_eq!(packet_end(&[0; 10]), 10);
    }
}
