//! Building frames the gateway sends to the guest outside the stack: DHCP answers, UDP
//! replies, ICMP echo replies, router advertisements.
//!
//! Every builder checks that the lengths fit their 16-bit header fields and returns `None`
//! when they do not (a length that wrapped would make the header disagree with the buffer).
//! Responders bound their answers further, by the link MTU ([`reply_limit4`],
//! [`reply_limit6`]), and drop what they cannot answer within it ([`Unanswered`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, UdpPacket, UdpRepr,
};

use super::GATEWAY_MAC;

const ETH: usize = 14;
const IP4: usize = 20;
const IP6: usize = 40;
const UDP: usize = 8;

/// Hop limit of what the gateway sends.
const TTL: u8 = 64;

/// The smallest IPv4 packet every host must accept (RFC 791), and so the floor of what a
/// gateway answer may take even on a smaller configured MTU (a DHCP client must accept
/// 576-byte messages).
pub const MIN_REPLY4: usize = 576;
/// IPv6's minimum link MTU (RFC 8200).
pub const MIN_REPLY6: usize = 1280;
/// The largest IP packet the length fields can describe.
const MAX_IP: usize = 65_535;

/// The largest IPv4 packet an answer of the gateway may be on a link of `mtu`.
pub fn reply_limit4(mtu: u16) -> usize {
    usize::from(mtu).clamp(MIN_REPLY4, MAX_IP)
}

/// The largest IPv6 packet (header included) an answer of the gateway may be on a link of
/// `mtu`.
pub fn reply_limit6(mtu: u16) -> usize {
    usize::from(mtu).clamp(MIN_REPLY6, MAX_IP)
}

/// Why a responder sends nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The message deserves no answer (not a request, for another server, garbage).
    Ignored,
    /// The answer would not fit one frame of the link: dropped and counted.
    TooLarge,
}

/// A responder's answer frame, or why there is none.
pub type Reply = Result<Vec<u8>, Unanswered>;

fn ethernet(dst: EthernetAddress, ethertype: EthernetProtocol, frame: &mut [u8]) {
    EthernetRepr {
        src_addr: EthernetAddress(GATEWAY_MAC),
        dst_addr: dst,
        ethertype,
    }
    .emit(&mut EthernetFrame::new_unchecked(frame));
}

/// An IPv4 packet of `protocol` from `src` to `dst` whose payload `body` fills in.
pub fn ipv4(
    dst_mac: EthernetAddress,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    payload_len: usize,
    body: impl FnOnce(&mut [u8]),
) -> Option<Vec<u8>> {
    if IP4 + payload_len > MAX_IP {
        return None;
    }
    let mut frame = vec![0u8; ETH + IP4 + payload_len];
    ethernet(dst_mac, EthernetProtocol::Ipv4, &mut frame);
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len,
        hop_limit: TTL,
    };
    let mut ip = Ipv4Packet::new_unchecked(&mut frame[ETH..]);
    repr.emit(&mut ip, &ChecksumCapabilities::default());
    body(ip.payload_mut());
    Some(frame)
}

/// An IPv6 packet of `protocol` from `src` to `dst` whose payload `body` fills in.
pub fn ipv6(
    dst_mac: EthernetAddress,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    protocol: IpProtocol,
    payload_len: usize,
    body: impl FnOnce(&mut [u8]),
) -> Option<Vec<u8>> {
    ipv6_hops(dst_mac, src, dst, protocol, TTL, payload_len, body)
}

/// [`ipv6`] with a chosen hop limit (neighbour discovery wants 255).
pub fn ipv6_hops(
    dst_mac: EthernetAddress,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    protocol: IpProtocol,
    hop_limit: u8,
    payload_len: usize,
    body: impl FnOnce(&mut [u8]),
) -> Option<Vec<u8>> {
    if payload_len > MAX_IP {
        return None;
    }
    let mut frame = vec![0u8; ETH + IP6 + payload_len];
    ethernet(dst_mac, EthernetProtocol::Ipv6, &mut frame);
    let repr = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len,
        hop_limit,
    };
    let mut ip = Ipv6Packet::new_unchecked(&mut frame[ETH..]);
    repr.emit(&mut ip);
    body(ip.payload_mut());
    Some(frame)
}

/// A UDP datagram from `src` to `dst` (both of one family) carrying `payload`; `None` for
/// mixed families or a datagram too long for the length fields.
pub fn udp(
    dst_mac: EthernetAddress,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) -> Option<Vec<u8>> {
    if UDP + payload.len() > MAX_IP {
        return None;
    }
    let repr = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let len = UDP + payload.len();
    let fill = |buf: &mut [u8], s: IpAddress, d: IpAddress| {
        repr.emit(
            &mut UdpPacket::new_unchecked(buf),
            &s,
            &d,
            payload.len(),
            |p| p.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        );
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(dst_mac, s, d, IpProtocol::Udp, len, |b| {
            fill(b, IpAddress::Ipv4(s), IpAddress::Ipv4(d))
        }),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(dst_mac, s, d, IpProtocol::Udp, len, |b| {
            fill(b, IpAddress::Ipv6(s), IpAddress::Ipv6(d))
        }),
        // Mixed families never reach here: flows keep the guest's family on both ends.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn packet_udp_too_long_for_the_length_fields_is_not_built() {
        let mac = EthernetAddress::BROADCAST;
        let (s4, d4) = (addr("10.0.2.1:67"), addr("10.0.2.2:68"));
        let (s6, d6) = (addr("[fe80::1]:547"), addr("[fe80::2]:546"));
        // IPv4: the total length (20 + 8 + payload) must fit 16 bits.
        assert!(udp(mac, s4, d4, &vec![0; 65_507]).is_some());
        assert!(udp(mac, s4, d4, &vec![0; 65_508]).is_none());
        // IPv6: the payload length (8 + payload) must.
        assert!(udp(mac, s6, d6, &vec![0; 65_527]).is_some());
        assert!(udp(mac, s6, d6, &vec![0; 65_528]).is_none());
        assert!(udp(mac, s4, d6, b"x").is_none());
    }

    #[test]
    fn packet_reply_limits_follow_the_mtu_within_the_family_minimums() {
        assert_eq!(reply_limit4(1500), 1500);
        assert_eq!(reply_limit4(68), MIN_REPLY4);
        assert_eq!(reply_limit6(1500), 1500);
        assert_eq!(reply_limit6(576), MIN_REPLY6);
        assert_eq!(reply_limit6(65_520), 65_520);
    }
}
