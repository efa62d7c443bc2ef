//! Fuzz entry points for virtio-net and the user NAT (devices/fuzz), also run as unit tests
//! over a few seeds.

use std::sync::Arc;

use super::backend::NetBackend;
use super::header::TxHeader;
use super::metrics::NetMetrics;
use super::user::{UserConfig, UserNet};

/// The virtio-net header of a transmitted frame: parse and finish (checksum completion) on
/// arbitrary bytes.
pub fn fuzz_net_header(data: &[u8]) {
    let Ok(header) = TxHeader::parse(data) else {
        return;
    };
    let mut frame = data[super::header::HDR_LEN..].to_vec();
    let _ = header.finish(&mut frame);
}

/// Guest frames through the NAT: `data` is a sequence of frames, each preceded by its length
/// (two bytes, little endian). The NAT has no flows (max_flows 0), so nothing reaches a host
/// socket; classification, DHCP, DHCPv6, router advertisements and the stack's gateway (ARP,
/// ICMP, TCP resets) all run. Whatever it answers must be a sane frame.
pub fn fuzz_nat_frames(data: &[u8]) {
    let config = UserConfig {
        max_flows: 0,
        ..Default::default()
    };
    let mut net = match UserNet::new(
        &config,
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        Arc::new(NetMetrics::default()),
    ) {
        Ok(n) => n,
        Err(_) => return,
    };
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let frame = &rest[..len.min(rest.len())];
        rest = &rest[frame.len()..];
        net.send(frame);
        net.flush();
        while let Some(out) = net.rx_peek() {
            assert!(
                out.len() >= 14 && out.len() <= super::device::MAX_FRAME,
                "{}",
                out.len()
            );
            net.rx_pop();
        }
    }
}

/// Real guest frames that open the NAT's paths, as seeds: an ARP request for the gateway,
/// a DHCP discover, a ping of the gateway, a SYN to the gateway, a router solicitation.
pub fn seed_frames() -> Vec<(&'static str, Vec<u8>)> {
    use super::user::{packet, GATEWAY4, GATEWAY_MAC, GUEST4};
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
        Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, IpAddress, IpProtocol, TcpControl, TcpPacket,
        TcpRepr, TcpSeqNumber,
    };
    let guest_mac = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let gw = EthernetAddress(GATEWAY_MAC);
    let sums = ChecksumCapabilities::default();

    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&guest_mac.0);
    arp.extend_from_slice(&[0x08, 0x06]);
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: guest_mac,
        source_protocol_addr: GUEST4,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: GATEWAY4,
    };
    let start = arp.len();
    arp.resize(start + repr.buffer_len(), 0);
    repr.emit(&mut ArpPacket::new_unchecked(&mut arp[start..]));

    let discover = DhcpRepr {
        message_type: DhcpMessageType::Discover,
        transaction_id: 7,
        secs: 0,
        client_hardware_address: guest_mac,
        client_ip: std::net::Ipv4Addr::UNSPECIFIED,
        your_ip: std::net::Ipv4Addr::UNSPECIFIED,
        server_ip: std::net::Ipv4Addr::UNSPECIFIED,
        router: None,
        subnet_mask: None,
        relay_agent_ip: std::net::Ipv4Addr::UNSPECIFIED,
        broadcast: false,
        requested_ip: None,
        client_identifier: Some(guest_mac),
        server_identifier: None,
        parameter_request_list: Some(&[1, 3, 6, 26]),
        dns_servers: None,
        max_size: None,
        lease_duration: None,
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    let mut body = vec![0u8; discover.buffer_len()];
    let _ = discover.emit(&mut DhcpPacket::new_unchecked(&mut body[..]));
    let dhcp = packet::udp(
        EthernetAddress::BROADCAST,
        "0.0.0.0:68".parse().expect("address"),
        "255.255.255.255:67".parse().expect("address"),
        &body,
    );

    let echo = Icmpv4Repr::EchoRequest {
        ident: 1,
        seq_no: 1,
        data: b"ping",
    };
    let ping = packet::ipv4(
        gw,
        GUEST4,
        GATEWAY4,
        IpProtocol::Icmp,
        echo.buffer_len(),
        |b| echo.emit(&mut Icmpv4Packet::new_unchecked(b), &sums),
    );

    let syn = TcpRepr {
        src_port: 40000,
        dst_port: 80,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1),
        ack_number: None,
        window_len: 64000,
        window_scale: Some(7),
        max_seg_size: Some(65480),
        sack_permitted: true,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let tcp = packet::ipv4(
        gw,
        GUEST4,
        GATEWAY4,
        IpProtocol::Tcp,
        syn.buffer_len(),
        |b| {
            syn.emit(
                &mut TcpPacket::new_unchecked(b),
                &IpAddress::Ipv4(GUEST4),
                &IpAddress::Ipv4(GATEWAY4),
                &sums,
            )
        },
    );

    let src: std::net::Ipv6Addr = "fe80::5054:ff:fe12:3456".parse().expect("address");
    let dst: std::net::Ipv6Addr = "ff02::2".parse().expect("address");
    let rs = packet::ipv6_hops(
        EthernetAddress([0x33, 0x33, 0, 0, 0, 2]),
        src,
        dst,
        IpProtocol::Icmpv6,
        255,
        8,
        |b| {
            b[0] = 133;
            Icmpv6Packet::new_unchecked(b).fill_checksum(&src, &dst);
        },
    );

    let framed = |f: &[u8]| {
        let mut out = (f.len() as u16).to_le_bytes().to_vec();
        out.extend_from_slice(f);
        out
    };
    vec![
        ("arp-gateway", framed(&arp)),
        ("dhcp-discover", framed(&dhcp)),
        ("ping-gateway", framed(&ping)),
        ("syn-gateway", framed(&tcp)),
        ("router-solicit", framed(&rs)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus(target: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
    }

    fn replay(target: &str, f: fn(&[u8])) {
        let dir = corpus(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            f(&std::fs::read(&path).unwrap());
            n += 1;
        }
        assert!(n > 0, "{} is empty", dir.display());
    }

    /// Guest frames, via the fuzz corpus and the seeds, as a unit test.
    #[test]
    fn net_fuzz_corpora_never_panic() {
        replay("net_nat_frames", fuzz_nat_frames);
        replay("net_header", fuzz_net_header);
        for (_, seed) in seed_frames() {
            fuzz_nat_frames(&seed);
        }
    }

    /// Each seed gets an answer from the gateway: ARP reply, DHCP offer, echo reply, a reset
    /// (no flows allowed here), a router advertisement.
    #[test]
    fn nat_gateway_answers_every_seed() {
        let config = UserConfig {
            max_flows: 0,
            ..Default::default()
        };
        let mut net = UserNet::new(
            &config,
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            Arc::new(NetMetrics::default()),
        )
        .unwrap();
        for (name, seed) in seed_frames() {
            net.send(&seed[2..]);
            net.flush();
            let mut answers = 0;
            while net.rx_peek().is_some() {
                net.rx_pop();
                answers += 1;
            }
            assert!(answers >= 1, "{name}: no answer");
        }
    }

    /// Writes the seeds into the NAT corpus:
    /// `cargo test -p devices net_fuzz_write_seeds -- --ignored`.
    #[test]
    #[ignore = "writes files into devices/fuzz/corpus"]
    fn net_fuzz_write_seeds() {
        let dir = corpus("net_nat_frames");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, seed) in seed_frames() {
            std::fs::write(dir.join(name), seed).unwrap();
        }
    }

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&(f.len() as u16).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn fuzz_nat_seeds_run_clean() {
        // An ARP request for the gateway, a truncated IPv4 header, a junk frame.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        arp.extend_from_slice(&[10, 0, 2, 2, 0, 0, 0, 0, 0, 0, 10, 0, 2, 1]);
        let mut short_ip = vec![
            0x52, 0x54, 0, 0x12, 0x35, 0x02, 0x52, 0x54, 0, 0x12, 0x34, 0x56,
        ];
        short_ip.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        fuzz_nat_frames(&framed(&[&arp, &short_ip, &[1, 2, 3]]));
        fuzz_nat_frames(&[0xff; 300]);
        fuzz_net_header(&[1, 0, 0, 0, 0, 0, 14, 0, 6, 0, 0, 0, 1, 2, 3]);
    }
}
