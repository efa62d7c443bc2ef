//! IPv6 configuration for an unmodified guest: router advertisements (a default route via
//! the gateway, the on-link /120, the MTU, DNS servers and search list) answering router
//! solicitations, and a DHCPv6 server handing out KubeVirt's fd10:0:2::2. KubeVirt's
//! masquerade gives the address but no route; podvm gives both.
//!
//! Pure functions from the guest's message to the answer frame, fuzzable.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use smoltcp::wire::{EthernetAddress, Icmpv6Packet, IpProtocol};

use super::dhcp::encode_search;
use super::packet::{self, Reply, Unanswered};
use super::{GATEWAY6_LINK_LOCAL, GATEWAY_MAC, GUEST6, PREFIX6};

/// How long the guest keeps the default route (seconds), and the address lifetimes.
pub const ROUTER_LIFETIME: u16 = 1800;
pub const ADDRESS_LIFETIME: u32 = 86_400;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Name servers passed on, at most (the resolver uses three, as for DHCPv4).
pub const MAX_DNS: usize = 3;

/// What the RA and DHCPv6 answers carry besides the address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ipv6Options {
    pub mtu: u16,
    pub dns: Vec<Ipv6Addr>,
    pub search: Vec<String>,
}

/// A router advertisement to all nodes: default router, on-link prefix fd10:0:2::/120,
/// MTU, RDNSS (the first [`MAX_DNS`] servers) and DNSSL; the "managed" flag sends the guest
/// to DHCPv6 for its address (a /120 cannot be autoconfigured). At most 400 bytes, well
/// within IPv6's minimum MTU.
pub fn router_advert(options: &Ipv6Options) -> Option<Vec<u8>> {
    let mut body = vec![
        134, 0, 0, 0,    // type, code, checksum
        64,   // current hop limit
        0xc0, // managed and other configuration
    ];
    body.extend_from_slice(&ROUTER_LIFETIME.to_be_bytes());
    body.extend_from_slice(&[0; 8]); // reachable time, retransmission timer: unspecified
                                     // Source link-layer address.
    body.extend_from_slice(&[1, 1]);
    body.extend_from_slice(&GATEWAY_MAC);
    // MTU.
    body.extend_from_slice(&[5, 1, 0, 0]);
    body.extend_from_slice(&u32::from(options.mtu).to_be_bytes());
    // Prefix information: on-link, not for autoconfiguration.
    body.extend_from_slice(&[3, 4, PREFIX6, 0x80]);
    body.extend_from_slice(&ADDRESS_LIFETIME.to_be_bytes());
    body.extend_from_slice(&ADDRESS_LIFETIME.to_be_bytes());
    body.extend_from_slice(&[0; 4]);
    body.extend_from_slice(&prefix().octets());
    // Recursive DNS servers (RFC 8106).
    let dns = &options.dns[..options.dns.len().min(MAX_DNS)];
    if !dns.is_empty() {
        body.extend_from_slice(&[25, (1 + 2 * dns.len()) as u8, 0, 0]);
        body.extend_from_slice(&u32::from(ROUTER_LIFETIME).to_be_bytes());
        for server in dns {
            body.extend_from_slice(&server.octets());
        }
    }
    // DNS search list.
    let names = encode_search(&options.search);
    if !names.is_empty() {
        let len = (8 + names.len()).div_ceil(8);
        body.extend_from_slice(&[31, len as u8, 0, 0]);
        body.extend_from_slice(&u32::from(ROUTER_LIFETIME).to_be_bytes());
        body.extend_from_slice(&names);
        body.resize(body.len() + (len * 8 - 8 - names.len()), 0);
    }
    let dst = ALL_NODES;
    packet::ipv6_hops(
        EthernetAddress([0x33, 0x33, 0, 0, 0, 1]),
        GATEWAY6_LINK_LOCAL,
        dst,
        IpProtocol::Icmpv6,
        255,
        body.len(),
        |b| {
            b.copy_from_slice(&body);
            Icmpv6Packet::new_unchecked(b).fill_checksum(&GATEWAY6_LINK_LOCAL, &dst);
        },
    )
}

fn prefix() -> Ipv6Addr {
    let bits = u128::from(GUEST6) & (u128::MAX << (128 - u32::from(PREFIX6)));
    Ipv6Addr::from(bits)
}

// DHCPv6 (RFC 8415) message types and options podvm uses.
const SOLICIT: u8 = 1;
const ADVERTISE: u8 = 2;
const REQUEST: u8 = 3;
const CONFIRM: u8 = 4;
const RENEW: u8 = 5;
const REBIND: u8 = 6;
const REPLY: u8 = 7;
const RELEASE: u8 = 8;
const DECLINE: u8 = 9;
const INFORMATION_REQUEST: u8 = 11;
const OPT_CLIENTID: u16 = 1;
const OPT_SERVERID: u16 = 2;
const OPT_IA_NA: u16 = 3;
const OPT_IAADDR: u16 = 5;
const OPT_PREFERENCE: u16 = 7;
const OPT_STATUS_CODE: u16 = 13;
const OPT_RAPID_COMMIT: u16 = 14;
const OPT_DNS_SERVERS: u16 = 23;
const OPT_DOMAIN_LIST: u16 = 24;

/// podvm's DUID: link-layer address type (3), Ethernet, the gateway's MAC.
fn server_duid() -> Vec<u8> {
    let mut d = vec![0, 3, 0, 1];
    d.extend_from_slice(&GATEWAY_MAC);
    d
}

/// The options of a DHCPv6 message body, in order; `None` if they overrun.
fn options(mut body: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let head = body.get(..4)?;
        let code = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = body.get(4..4 + len)?;
        out.push((code, value));
        body = &body[4 + len..];
    }
    Some(out)
}

fn put(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// An IA_NA option value for the identity association `iaid`: the fixed address with its
/// lifetimes.
fn ia_na(iaid: &[u8]) -> Vec<u8> {
    let mut value = iaid.to_vec();
    value.extend_from_slice(&(ADDRESS_LIFETIME / 2).to_be_bytes()); // T1
    value.extend_from_slice(&(ADDRESS_LIFETIME / 5 * 4).to_be_bytes()); // T2
    let mut addr = GUEST6.octets().to_vec();
    addr.extend_from_slice(&ADDRESS_LIFETIME.to_be_bytes()); // preferred
    addr.extend_from_slice(&ADDRESS_LIFETIME.to_be_bytes()); // valid
    put(&mut value, OPT_IAADDR, &addr);
    value
}

/// The answer frame to the DHCPv6 message `payload` the guest sent from `src` (its
/// link-local address and port 546), if it deserves one.
///
/// The answer fits one IPv6 packet of the link ([`packet::reply_limit6`]): the identity
/// associations (IA_NA) are answered in order while they fit, after room is kept for the
/// server's own options; a message whose answer cannot carry even one of the IA_NA it asks
/// for (or its client identifier) is dropped ([`Unanswered::TooLarge`]).
pub fn dhcp6_answer(
    guest_mac: EthernetAddress,
    src: SocketAddr,
    payload: &[u8],
    options6: &Ipv6Options,
) -> Reply {
    use Unanswered::{Ignored, TooLarge};
    let IpAddr::V6(client) = src.ip() else {
        return Err(Ignored);
    };
    let (&kind, rest) = payload.split_first().ok_or(Ignored)?;
    let xid = rest.get(..3).ok_or(Ignored)?;
    let opts = options(&rest[3..]).ok_or(Ignored)?;
    let find = |code| opts.iter().find(|(c, _)| *c == code).map(|(_, v)| *v);
    let client_id = find(OPT_CLIENTID);
    if let Some(server) = find(OPT_SERVERID) {
        if server != server_duid().as_slice() {
            return Err(Ignored); // for another server
        }
    }
    let rapid = kind == SOLICIT && find(OPT_RAPID_COMMIT).is_some();
    let (answer, lease) = match kind {
        SOLICIT if rapid => (REPLY, true),
        SOLICIT => (ADVERTISE, true),
        REQUEST | RENEW | REBIND => (REPLY, true),
        CONFIRM | RELEASE | DECLINE | INFORMATION_REQUEST => (REPLY, false),
        _ => return Err(Ignored),
    };
    // Everything but an information request needs the client's identity.
    if kind != INFORMATION_REQUEST && client_id.is_none() {
        return Err(Ignored);
    }
    // The DHCPv6 message may take what the IPv6 and UDP headers leave.
    let room = packet::reply_limit6(options6.mtu) - 40 - 8;
    let mut msg = vec![answer];
    msg.extend_from_slice(xid);
    if let Some(id) = client_id {
        put(&mut msg, OPT_CLIENTID, id);
    }
    put(&mut msg, OPT_SERVERID, &server_duid());
    if rapid {
        put(&mut msg, OPT_RAPID_COMMIT, &[]);
    }
    if answer == ADVERTISE {
        put(&mut msg, OPT_PREFERENCE, &[255]);
    }
    // The server's options, which close the message.
    let mut tail = Vec::new();
    if !lease && kind != INFORMATION_REQUEST {
        put(&mut tail, OPT_STATUS_CODE, &[0, 0]); // success
    }
    let dns = &options6.dns[..options6.dns.len().min(MAX_DNS)];
    if !dns.is_empty() {
        let servers: Vec<u8> = dns.iter().flat_map(|a| a.octets()).collect();
        put(&mut tail, OPT_DNS_SERVERS, &servers);
    }
    let names = encode_search(&options6.search);
    if !names.is_empty() {
        put(&mut tail, OPT_DOMAIN_LIST, &names);
    }
    if msg.len() + tail.len() > room {
        return Err(TooLarge);
    }
    if lease {
        let asked = opts.iter().filter(|(c, _)| *c == OPT_IA_NA);
        let (mut wanted, mut answered) = (0, 0);
        for iaid in asked.filter_map(|(_, ia)| ia.get(..4)) {
            wanted += 1;
            let value = ia_na(iaid);
            if msg.len() + 4 + value.len() + tail.len() > room {
                break;
            }
            put(&mut msg, OPT_IA_NA, &value);
            answered += 1;
        }
        if wanted > 0 && answered == 0 {
            return Err(TooLarge);
        }
    }
    msg.extend_from_slice(&tail);
    packet::udp(
        guest_mac,
        SocketAddr::new(IpAddr::V6(GATEWAY6_LINK_LOCAL), 547),
        SocketAddr::new(IpAddr::V6(client), src.port()),
        &msg,
    )
    .ok_or(TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{EthernetFrame, Ipv6Packet, UdpPacket};

    const MAC: EthernetAddress = EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    fn opts() -> Ipv6Options {
        Ipv6Options {
            mtu: 65520,
            dns: vec!["fd00:10:96::a".parse().unwrap()],
            search: vec!["cluster.local".into()],
        }
    }

    fn solicit(rapid: bool) -> Vec<u8> {
        let mut m = vec![SOLICIT, 0xab, 0xcd, 0xef];
        put(
            &mut m,
            OPT_CLIENTID,
            &[0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56],
        );
        let mut ia = vec![0, 0, 0, 7];
        ia.extend_from_slice(&[0; 8]);
        put(&mut m, OPT_IA_NA, &ia);
        if rapid {
            put(&mut m, OPT_RAPID_COMMIT, &[]);
        }
        m
    }

    fn answer_of(frame: &[u8]) -> (u8, Vec<(u16, Vec<u8>)>) {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        assert_eq!((udp.src_port(), udp.dst_port()), (547, 546));
        let p = udp.payload();
        assert_eq!(&p[1..4], &[0xab, 0xcd, 0xef]);
        let o = options(&p[4..]).unwrap();
        (p[0], o.into_iter().map(|(c, v)| (c, v.to_vec())).collect())
    }

    #[test]
    fn dhcp6_solicit_is_advertised_the_fixed_address_and_rapid_commit_is_replied() {
        let src: SocketAddr = "[fe80::5054:ff:fe12:3456]:546".parse().unwrap();
        let (kind, o) = answer_of(&dhcp6_answer(MAC, src, &solicit(false), &opts()).unwrap());
        assert_eq!(kind, ADVERTISE);
        let ia = &o.iter().find(|(c, _)| *c == OPT_IA_NA).unwrap().1;
        assert_eq!(&ia[..4], &[0, 0, 0, 7]);
        let inner = options(&ia[12..]).unwrap();
        assert_eq!(inner[0].0, OPT_IAADDR);
        assert_eq!(&inner[0].1[..16], &GUEST6.octets());
        assert!(o
            .iter()
            .any(|(c, v)| *c == OPT_DNS_SERVERS && v.len() == 16));
        let (kind, _) = answer_of(&dhcp6_answer(MAC, src, &solicit(true), &opts()).unwrap());
        assert_eq!(kind, REPLY);
    }

    #[test]
    fn dhcp6_ignores_other_servers_and_garbage() {
        let src: SocketAddr = "[fe80::1:2]:546".parse().unwrap();
        let mut req = solicit(false);
        req[0] = REQUEST;
        put(&mut req, OPT_SERVERID, &[0, 3, 0, 1, 1, 2, 3, 4, 5, 6]);
        assert_eq!(
            dhcp6_answer(MAC, src, &req, &opts()),
            Err(Unanswered::Ignored)
        );
        assert_eq!(
            dhcp6_answer(MAC, src, &[], &opts()),
            Err(Unanswered::Ignored)
        );
        let overrun = [1, 2, 3, 4, 0, 1, 0, 9];
        assert_eq!(
            dhcp6_answer(MAC, src, &overrun, &opts()),
            Err(Unanswered::Ignored)
        );
    }

    #[test]
    fn router_advert_is_valid_icmpv6_with_default_route_and_managed_flag() {
        let frame = router_advert(&opts()).unwrap();
        let eth = EthernetFrame::new_checked(&frame[..]).unwrap();
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        assert_eq!(ip.hop_limit(), 255);
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
        let body = ip.payload();
        assert_eq!(body[0], 134);
        assert_eq!(body[5], 0xc0);
        assert_eq!(u16::from_be_bytes([body[6], body[7]]), ROUTER_LIFETIME);
        assert_eq!(body.len() % 8, 0);
        assert_eq!(prefix(), "fd10:0:2::".parse::<Ipv6Addr>().unwrap());
    }

    /// A SOLICIT asking for `count` identity associations.
    pub(crate) fn solicit_with_ia_na(count: u32) -> Vec<u8> {
        let mut m = vec![SOLICIT, 0xab, 0xcd, 0xef];
        put(
            &mut m,
            OPT_CLIENTID,
            &[0, 3, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56],
        );
        for iaid in 0..count {
            let mut ia = iaid.to_be_bytes().to_vec();
            ia.extend_from_slice(&[0; 8]);
            put(&mut m, OPT_IA_NA, &ia);
        }
        m
    }

    #[test]
    fn dhcp6_solicit_with_1500_ia_na_gets_a_bounded_answer_not_a_panic() {
        let src: SocketAddr = "[fe80::5054:ff:fe12:3456]:546".parse().unwrap();
        let many = solicit_with_ia_na(1500);
        for mtu in [1280, 1500, 9000, 65_520] {
            let options = Ipv6Options { mtu, ..opts() };
            let frame = dhcp6_answer(MAC, src, &many, &options).unwrap();
            assert!(
                frame.len() <= 14 + usize::from(mtu),
                "{mtu}: {}",
                frame.len()
            );
            let (kind, o) = answer_of(&frame);
            assert_eq!(kind, ADVERTISE);
            let answered: Vec<_> = o.iter().filter(|(c, _)| *c == OPT_IA_NA).collect();
            assert!(!answered.is_empty() && answered.len() < 1500, "{mtu}");
            // In the order asked, and the server's options still there.
            assert_eq!(&answered[1].1[..4], &1u32.to_be_bytes());
            assert!(o.iter().any(|(c, _)| *c == OPT_DNS_SERVERS), "{mtu}");
        }
    }

    #[test]
    fn dhcp6_client_id_too_long_to_echo_within_the_mtu_is_dropped() {
        let src: SocketAddr = "[fe80::5054:ff:fe12:3456]:546".parse().unwrap();
        let mut m = vec![SOLICIT, 0xab, 0xcd, 0xef];
        put(&mut m, OPT_CLIENTID, &[7; 1400]);
        put(&mut m, OPT_IA_NA, &[0; 12]);
        let options = Ipv6Options {
            mtu: 1500,
            ..opts()
        };
        assert_eq!(
            dhcp6_answer(MAC, src, &m, &options),
            Err(Unanswered::TooLarge)
        );
    }

    #[test]
    fn router_advert_passes_on_at_most_three_name_servers() {
        let options = Ipv6Options {
            dns: vec!["fd00::53".parse().unwrap(); 200],
            ..opts()
        };
        let frame = router_advert(&options).unwrap();
        assert!(frame.len() <= 14 + packet::MIN_REPLY6);
        let mut rest = &frame[14 + 40 + 16..];
        let mut rdnss = None;
        while !rest.is_empty() {
            let len = usize::from(rest[1]) * 8;
            assert!(len > 0 && len <= rest.len(), "a well-formed option");
            if rest[0] == 25 {
                rdnss = Some(rest[1]);
            }
            rest = &rest[len..];
        }
        assert_eq!(rdnss, Some(1 + 2 * MAX_DNS as u8));
    }
}
