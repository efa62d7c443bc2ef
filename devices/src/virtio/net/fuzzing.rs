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

/// Named fuzz inputs.
pub type Seeds = Vec<(&'static str, Vec<u8>)>;

/// The DHCP servers' configuration a DHCP fuzz input starts with: the MTU (two bytes,
/// little endian, brought into 68..=65520), then one byte: name servers in its low nibble,
/// search domains (each of three 63-byte labels, the longest the options carry) in its
/// high one. The rest is the guest's message.
struct DhcpSetup<'a> {
    mtu: u16,
    dns4: Vec<std::net::Ipv4Addr>,
    dns6: Vec<std::net::Ipv6Addr>,
    search: Vec<String>,
    payload: &'a [u8],
}

fn dhcp_setup(data: &[u8]) -> Option<DhcpSetup<'_>> {
    let (head, payload) = (data.get(..3)?, &data[3..]);
    let mtu = u16::from_le_bytes([head[0], head[1]]).clamp(68, super::user::DEFAULT_MTU);
    let servers = head[2] & 0x0f;
    let dns4 = (0..servers)
        .map(|i| std::net::Ipv4Addr::new(10, 96, 0, i))
        .collect();
    let dns6 = (0..servers)
        .map(|i| std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i)))
        .collect();
    let search = (0..head[2] >> 4)
        .map(|i| {
            let label = char::from(b'a' + i).to_string().repeat(63);
            format!("{label}.{label}.{label}")
        })
        .collect();
    Some(DhcpSetup {
        mtu,
        dns4,
        dns6,
        search,
        payload,
    })
}

/// The checks every answer frame of the DHCP servers passes: within one IP packet of
/// `limit`, and well formed (lengths that agree, UDP checksum, from the server port).
fn check_dhcp_answer(frame: &[u8], limit: usize, server_port: u16) {
    use smoltcp::wire::{
        EthernetFrame, EthernetProtocol, IpAddress, Ipv4Packet, Ipv6Packet, UdpPacket,
    };
    assert!(frame.len() <= 14 + limit, "{} > 14 + {limit}", frame.len());
    let eth = EthernetFrame::new_checked(frame).expect("Ethernet");
    let (udp, src, dst) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).expect("IPv4");
            assert_eq!(usize::from(ip.total_len()), frame.len() - 14);
            assert!(ip.verify_checksum());
            let (s, d) = (ip.src_addr(), ip.dst_addr());
            (
                ip.payload().to_vec(),
                IpAddress::Ipv4(s),
                IpAddress::Ipv4(d),
            )
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).expect("IPv6");
            assert_eq!(usize::from(ip.payload_len()) + 40, frame.len() - 14);
            let (s, d) = (ip.src_addr(), ip.dst_addr());
            (
                ip.payload().to_vec(),
                IpAddress::Ipv6(s),
                IpAddress::Ipv6(d),
            )
        }
        other => panic!("answer of ethertype {other}"),
    };
    let udp = UdpPacket::new_checked(&udp[..]).expect("UDP");
    assert_eq!(usize::from(udp.len()), udp.as_ref().len());
    assert!(udp.verify_checksum(&src, &dst));
    assert_eq!(udp.src_port(), server_port);
}

/// A DHCPv4 message from the guest, straight to the server (no frame, no checksums in the
/// way): whatever it answers fits the link and is well formed. Format: [`dhcp_setup`].
pub fn fuzz_dhcp4(data: &[u8]) {
    use super::user::{dhcp, packet};
    let Some(setup) = dhcp_setup(data) else {
        return;
    };
    let mtu = setup.mtu;
    let options = dhcp::DhcpOptions {
        mtu,
        dns: setup.dns4,
        search: setup.search,
    };
    if let Ok(frame) = dhcp::answer(setup.payload, &options) {
        check_dhcp_answer(&frame, packet::reply_limit4(mtu), 67);
        let udp = &frame[14 + 20 + 8..];
        let dhcp = smoltcp::wire::DhcpPacket::new_checked(udp).expect("DHCP");
        smoltcp::wire::DhcpRepr::parse(&dhcp).expect("a DHCP message");
    }
}

/// A DHCPv6 message from the guest (from its link-local address), straight to the server:
/// whatever it answers fits the link and is well formed. Format: [`dhcp_setup`].
pub fn fuzz_dhcp6(data: &[u8]) {
    use super::user::{ipv6, packet};
    use smoltcp::wire::EthernetAddress;
    let Some(setup) = dhcp_setup(data) else {
        return;
    };
    let mtu = setup.mtu;
    let options = ipv6::Ipv6Options {
        mtu,
        dns: setup.dns6,
        search: setup.search,
    };
    let mac = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let src = "[fe80::5054:ff:fe12:3456]:546".parse().expect("address");
    if let Ok(frame) = ipv6::dhcp6_answer(mac, src, setup.payload, &options) {
        check_dhcp_answer(&frame, packet::reply_limit6(mtu), 547);
    }
    if let Some(ra) = ipv6::router_advert(&options) {
        assert!(ra.len() <= 14 + packet::reply_limit6(mtu));
    }
}

/// Seeds of the DHCP targets: the messages real clients send, on the default link and on
/// the smallest, with many name servers and long search lists, and a SOLICIT with 1,500
/// IA_NA options (its answer once overflowed the 16-bit lengths).
pub fn seed_dhcp() -> (Seeds, Seeds) {
    use smoltcp::wire::{DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress};
    let input = |mtu: u16, config: u8, payload: &[u8]| {
        let mut out = mtu.to_le_bytes().to_vec();
        out.push(config);
        out.extend_from_slice(payload);
        out
    };
    let dhcp4 = |kind, requested| {
        let repr = DhcpRepr {
            message_type: kind,
            transaction_id: 7,
            secs: 0,
            client_hardware_address: EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            client_ip: std::net::Ipv4Addr::UNSPECIFIED,
            your_ip: std::net::Ipv4Addr::UNSPECIFIED,
            server_ip: std::net::Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: std::net::Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested_ip: requested,
            client_identifier: None,
            server_identifier: None,
            parameter_request_list: Some(&[1, 3, 6, 15, 26, 119]),
            dns_servers: None,
            max_size: None,
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut DhcpPacket::new_unchecked(&mut buf[..]))
            .expect("a DHCP message");
        buf
    };
    let guest4 = Some(super::user::GUEST4);
    let discover = dhcp4(DhcpMessageType::Discover, None);
    let request = dhcp4(DhcpMessageType::Request, guest4);
    let inform = dhcp4(DhcpMessageType::Inform, None);
    let v4 = vec![
        ("discover", input(1500, 0x21, &discover)),
        ("discover-mtu-68-long-search", input(68, 0x6f, &discover)),
        ("request", input(65_520, 0x31, &request)),
        ("inform", input(576, 0x11, &inform)),
    ];

    let option = |code: u16, value: &[u8]| {
        let mut o = code.to_be_bytes().to_vec();
        o.extend_from_slice(&(value.len() as u16).to_be_bytes());
        o.extend_from_slice(value);
        o
    };
    let client_id = option(1, &[0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    let message = |kind: u8, ia_na: u32, extra: &[u8]| {
        let mut m = vec![kind, 0xab, 0xcd, 0xef];
        m.extend_from_slice(&client_id);
        for iaid in 0..ia_na {
            let mut ia = iaid.to_be_bytes().to_vec();
            ia.extend_from_slice(&[0; 8]);
            m.extend_from_slice(&option(3, &ia));
        }
        m.extend_from_slice(extra);
        m
    };
    let server_id = option(2, &[0, 3, 0, 1, 0x52, 0x54, 0x00, 0x12, 0x35, 0x02]);
    let v6 = vec![
        ("solicit", input(1500, 0x22, &message(1, 1, &[]))),
        (
            "solicit-rapid",
            input(65_520, 0x12, &message(1, 1, &option(14, &[]))),
        ),
        ("request", input(1280, 0x62, &message(3, 1, &server_id))),
        (
            "information-request",
            input(1500, 0x32, &message(11, 0, &[])),
        ),
        (
            "solicit-1500-ia-na",
            input(65_520, 0x62, &message(1, 1500, &[])),
        ),
        (
            "solicit-1500-ia-na-mtu-1280",
            input(1280, 0x62, &message(1, 1500, &[])),
        ),
    ];
    (v4, v6)
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
    )
    .expect("a small frame");

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
    )
    .expect("a small frame");

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
    )
    .expect("a small frame");

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
    )
    .expect("a small frame");

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

    use crate::virtio::fuzz_util::testing::{corpus_dir as corpus, replay, within_time_limit};

    /// Guest frames, via the fuzz corpus and the seeds, as a unit test.
    #[test]
    fn net_fuzz_corpora_never_panic() {
        replay("net_nat_frames", fuzz_nat_frames);
        replay("net_header", fuzz_net_header);
        for (_, seed) in seed_frames() {
            fuzz_nat_frames(&seed);
        }
    }

    /// The DHCP servers, fed directly, via their fuzz corpora and the seeds, as a unit test.
    #[test]
    fn net_dhcp_fuzz_corpora_never_panic() {
        replay("net_dhcp4", fuzz_dhcp4);
        replay("net_dhcp6", fuzz_dhcp6);
        let (v4, v6) = seed_dhcp();
        for (name, seed) in v4 {
            within_time_limit(name, move || fuzz_dhcp4(&seed));
        }
        for (name, seed) in v6 {
            within_time_limit(name, move || fuzz_dhcp6(&seed));
        }
    }

    /// Writes the DHCP seeds into their corpora:
    /// `cargo test -p devices net_dhcp_fuzz_write_seeds -- --ignored`.
    #[test]
    #[ignore = "writes files into devices/fuzz/corpus"]
    fn net_dhcp_fuzz_write_seeds() {
        let (v4, v6) = seed_dhcp();
        for (target, seeds) in [("net_dhcp4", v4), ("net_dhcp6", v6)] {
            let dir = corpus(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, seed) in seeds {
                std::fs::write(dir.join(name), seed).unwrap();
            }
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
