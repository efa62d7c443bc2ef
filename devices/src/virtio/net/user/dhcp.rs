//! The DHCPv4 server: one client, one fixed address (10.0.2.2), like KubeVirt's masquerade.
//! Answers DISCOVER with OFFER, REQUEST with ACK (or NAK for another address), INFORM with
//! ACK; the options carry the router, the MTU, and the pod's DNS servers and search list.

use std::net::{Ipv4Addr, SocketAddr};

use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, DHCP_MAX_DNS_SERVER_COUNT,
};

use super::packet::{self, Reply, Unanswered};
use super::{GATEWAY4, GUEST4, NETMASK4};

/// How long a lease lasts; the guest renews at half of it.
pub const LEASE_SECS: u32 = 86_400;

/// What the server hands out besides the address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DhcpOptions {
    pub mtu: u16,
    pub dns: Vec<Ipv4Addr>,
    pub search: Vec<String>,
}

/// Option codes not in smoltcp's representation.
const OPT_MTU: u8 = 26;
const OPT_DOMAIN_NAME: u8 = 15;
const OPT_DOMAIN_SEARCH: u8 = 119;

/// The reply frame to the DHCP message `payload` from the guest, if it deserves one. The
/// reply fits one IPv4 packet of the link ([`packet::reply_limit4`]): where the search list
/// and domain name would not fit, they are left out; where even that does not fit, nothing
/// is sent ([`Unanswered::TooLarge`]).
pub fn answer(payload: &[u8], options: &DhcpOptions) -> Reply {
    let packet = DhcpPacket::new_checked(payload).map_err(|_| Unanswered::Ignored)?;
    let request = DhcpRepr::parse(&packet).map_err(|_| Unanswered::Ignored)?;
    let (kind, lease) = match request.message_type {
        DhcpMessageType::Discover => (DhcpMessageType::Offer, true),
        DhcpMessageType::Request => {
            let wanted = request.requested_ip.unwrap_or(request.client_ip);
            if wanted == GUEST4 || wanted.is_unspecified() {
                (DhcpMessageType::Ack, true)
            } else {
                (DhcpMessageType::Nak, false)
            }
        }
        DhcpMessageType::Inform => (DhcpMessageType::Ack, false),
        _ => return Err(Unanswered::Ignored),
    };
    // IPv4 and UDP headers around the DHCP message.
    let room = packet::reply_limit4(options.mtu).saturating_sub(20 + 8);
    for names in [true, false] {
        let Some(message) = reply_message(&request, kind, lease, options, names) else {
            break;
        };
        if message.len() > room {
            continue;
        }
        // To the broadcast address: the guest has no address yet, and every client takes it.
        return packet::udp(
            EthernetAddress::BROADCAST,
            SocketAddr::new(GATEWAY4.into(), 67),
            SocketAddr::new(Ipv4Addr::BROADCAST.into(), 68),
            &message,
        )
        .ok_or(Unanswered::TooLarge);
    }
    Err(Unanswered::TooLarge)
}

/// The DHCP message answering `request` with `kind`; the domain name and search list only
/// with `names`.
fn reply_message(
    request: &DhcpRepr,
    kind: DhcpMessageType,
    lease: bool,
    options: &DhcpOptions,
    names: bool,
) -> Option<Vec<u8>> {
    let nak = kind == DhcpMessageType::Nak;
    let mut dns = heapless::Vec::<Ipv4Addr, DHCP_MAX_DNS_SERVER_COUNT>::new();
    for server in options.dns.iter().take(DHCP_MAX_DNS_SERVER_COUNT) {
        let _ = dns.push(*server);
    }
    let mtu = options.mtu.to_be_bytes();
    let search = encode_search(&options.search);
    let mut extra = Vec::new();
    if !nak {
        extra.push(DhcpOption {
            kind: OPT_MTU,
            data: &mtu,
        });
        if let Some(first) = options.search.first().filter(|d| d.len() < 256 && names) {
            extra.push(DhcpOption {
                kind: OPT_DOMAIN_NAME,
                data: first.as_bytes(),
            });
        }
        if !search.is_empty() && names {
            extra.push(DhcpOption {
                kind: OPT_DOMAIN_SEARCH,
                data: &search,
            });
        }
    }
    let reply = DhcpRepr {
        message_type: kind,
        transaction_id: request.transaction_id,
        secs: 0,
        client_hardware_address: request.client_hardware_address,
        client_ip: Ipv4Addr::UNSPECIFIED,
        your_ip: if lease { GUEST4 } else { Ipv4Addr::UNSPECIFIED },
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: (!nak).then_some(GATEWAY4),
        subnet_mask: (!nak).then_some(NETMASK4),
        relay_agent_ip: Ipv4Addr::UNSPECIFIED,
        broadcast: request.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(GATEWAY4),
        parameter_request_list: None,
        dns_servers: (!nak && !dns.is_empty()).then_some(dns),
        max_size: None,
        lease_duration: lease.then_some(LEASE_SECS),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &extra,
    };
    let mut buf = vec![0u8; reply.buffer_len()];
    reply
        .emit(&mut DhcpPacket::new_unchecked(&mut buf[..]))
        .ok()?;
    Some(buf)
}

/// RFC 3397 domain search list (uncompressed labels); names that do not encode are skipped,
/// and the list stops where it would pass one option's 255 bytes.
pub fn encode_search(domains: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for domain in domains {
        let mut name = Vec::new();
        let ok = domain.trim_end_matches('.').split('.').all(|label| {
            if label.is_empty() || label.len() > 63 {
                return false;
            }
            name.push(label.len() as u8);
            name.extend_from_slice(label.as_bytes());
            true
        });
        name.push(0);
        if ok && out.len() + name.len() <= 255 {
            out.extend_from_slice(&name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, UdpPacket};

    fn request(kind: DhcpMessageType, requested: Option<Ipv4Addr>) -> Vec<u8> {
        let repr = DhcpRepr {
            message_type: kind,
            transaction_id: 0x1234_5678,
            secs: 0,
            client_hardware_address: EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            client_ip: Ipv4Addr::UNSPECIFIED,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested_ip: requested,
            client_identifier: None,
            server_identifier: None,
            parameter_request_list: None,
            dns_servers: None,
            max_size: None,
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let mut buf = vec![0u8; repr.buffer_len()];
        repr.emit(&mut DhcpPacket::new_unchecked(&mut buf[..]))
            .unwrap();
        buf
    }

    fn parse_reply(frame: &[u8]) -> (DhcpMessageType, Ipv4Addr, Vec<u8>) {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let _ = ChecksumCapabilities::default();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!((udp.src_port(), udp.dst_port()), (67, 68));
        let dhcp = DhcpPacket::new_checked(udp.payload()).unwrap();
        let repr = DhcpRepr::parse(&dhcp).unwrap();
        assert_eq!(repr.transaction_id, 0x1234_5678);
        (repr.message_type, repr.your_ip, udp.payload().to_vec())
    }

    fn options() -> DhcpOptions {
        DhcpOptions {
            mtu: 65520,
            dns: vec![Ipv4Addr::new(10, 96, 0, 10)],
            search: vec!["default.svc.cluster.local".into(), "cluster.local".into()],
        }
    }

    #[test]
    fn dhcp_discover_gets_an_offer_of_the_fixed_address_with_router_dns_mtu_and_search() {
        let reply = answer(&request(DhcpMessageType::Discover, None), &options()).unwrap();
        let (kind, yiaddr, raw) = parse_reply(&reply);
        assert_eq!(kind, DhcpMessageType::Offer);
        assert_eq!(yiaddr, GUEST4);
        let dhcp = DhcpPacket::new_checked(&raw[..]).unwrap();
        let repr = DhcpRepr::parse(&dhcp).unwrap();
        assert_eq!(repr.router, Some(GATEWAY4));
        assert_eq!(repr.subnet_mask, Some(NETMASK4));
        assert_eq!(repr.server_identifier, Some(GATEWAY4));
        assert_eq!(repr.lease_duration, Some(LEASE_SECS));
        assert_eq!(
            repr.dns_servers.unwrap().as_slice(),
            &[Ipv4Addr::new(10, 96, 0, 10)]
        );
        let opts: Vec<_> = dhcp.options().map(|o| (o.kind, o.data.to_vec())).collect();
        assert!(opts.contains(&(OPT_MTU, 65520u16.to_be_bytes().to_vec())));
        let search = opts.iter().find(|o| o.0 == OPT_DOMAIN_SEARCH).unwrap();
        assert_eq!(
            search.1,
            b"\x07default\x03svc\x07cluster\x05local\x00\x07cluster\x05local\x00"
        );
    }

    #[test]
    fn dhcp_request_for_the_fixed_address_is_acked_and_another_is_refused() {
        let ack = answer(&request(DhcpMessageType::Request, Some(GUEST4)), &options()).unwrap();
        assert_eq!(parse_reply(&ack).0, DhcpMessageType::Ack);
        let other = Some(Ipv4Addr::new(10, 0, 2, 15));
        let nak = answer(&request(DhcpMessageType::Request, other), &options()).unwrap();
        let (kind, yiaddr, _) = parse_reply(&nak);
        assert_eq!(
            (kind, yiaddr),
            (DhcpMessageType::Nak, Ipv4Addr::UNSPECIFIED)
        );
        assert_eq!(
            answer(&request(DhcpMessageType::Release, None), &options()),
            Err(Unanswered::Ignored)
        );
    }

    #[test]
    fn dhcp_garbage_gets_no_answer() {
        assert_eq!(answer(&[], &options()), Err(Unanswered::Ignored));
        assert_eq!(answer(&[1u8; 300], &options()), Err(Unanswered::Ignored));
        let mut truncated = request(DhcpMessageType::Discover, None);
        truncated.truncate(240);
        let _ = answer(&truncated, &options());
    }

    #[test]
    fn dhcp_answer_fits_a_small_mtu_by_leaving_out_the_search_list() {
        // The longest names the options can carry, on a link of the smallest MTU.
        let long = |c: char| format!("{0}.{0}.{0}", c.to_string().repeat(63));
        let opts = DhcpOptions {
            mtu: 68,
            dns: vec![Ipv4Addr::new(10, 96, 0, 10); 8],
            search: ('a'..='f').map(long).collect(),
        };
        let reply = answer(&request(DhcpMessageType::Discover, None), &opts).unwrap();
        assert!(reply.len() <= 14 + packet::MIN_REPLY4, "{}", reply.len());
        let (kind, yiaddr, raw) = parse_reply(&reply);
        assert_eq!((kind, yiaddr), (DhcpMessageType::Offer, GUEST4));
        let dhcp = DhcpPacket::new_checked(&raw[..]).unwrap();
        assert!(dhcp.options().all(|o| o.kind != OPT_DOMAIN_SEARCH));
        // With the default MTU the names are there.
        let opts = DhcpOptions { mtu: 1500, ..opts };
        let reply = answer(&request(DhcpMessageType::Discover, None), &opts).unwrap();
        let (_, _, raw) = parse_reply(&reply);
        let dhcp = DhcpPacket::new_checked(&raw[..]).unwrap();
        assert!(dhcp.options().any(|o| o.kind == OPT_DOMAIN_SEARCH));
    }
}
