//! Building frames the gateway sends to the guest outside the stack: DHCP answers, UDP
//! replies, ICMP echo replies, router advertisements.

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
) -> Vec<u8> {
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
    frame
}

/// An IPv6 packet of `protocol` from `src` to `dst` whose payload `body` fills in.
pub fn ipv6(
    dst_mac: EthernetAddress,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    protocol: IpProtocol,
    payload_len: usize,
    body: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
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
) -> Vec<u8> {
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
    frame
}

/// A UDP datagram from `src` to `dst` (both of one family) carrying `payload`.
pub fn udp(dst_mac: EthernetAddress, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
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
        _ => Vec::new(),
    }
}
