//! The `user` backend: a masquerade NAT in podvm's own process, so the pod needs no
//! privileges. The guest sees KubeVirt's masquerade network: it is 10.0.2.2/24 and
//! fd10:0:2::2/120, the gateway is 10.0.2.1 and fd10:0:2::1, DHCP comes from the gateway,
//! and everything it sends out leaves from the pod's own address.
//!
//! A guest frame is first classified ([`frame::classify`], pure): ARP, neighbour discovery
//! and pings for the gateway, and segments of open TCP connections go to a smoltcp
//! interface that plays the gateway and (with "any IP") every remote host; a TCP SYN opens a
//! host connection first ([`tcp`]); UDP goes to per-conversation host sockets ([`udp`]);
//! DHCP is answered here ([`dhcp`]). Host sockets are watched by the backend's own epoll,
//! which the device's event loop watches in turn.

pub mod dhcp;
pub mod forward;
pub mod frame;
pub mod icmp;
pub mod ipv6;
pub mod packet;
pub mod pod;
pub mod resolv;
mod stack;
pub mod tcp;
pub mod udp;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use self::frame::{DropReason, Verdict};
use self::stack::Wire;
use super::backend::NetBackend;
use super::metrics::NetMetrics as M;

/// The gateway (podvm) and the guest, as in KubeVirt's masquerade binding.
pub const GATEWAY4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
pub const GUEST4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const NETMASK4: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
pub const PREFIX4: u8 = 24;
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0, 2, 0, 0, 0, 0, 1);
pub const GUEST6: Ipv6Addr = Ipv6Addr::new(0xfd10, 0, 2, 0, 0, 0, 0, 2);
pub const PREFIX6: u8 = 120;
pub const GATEWAY6_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The gateway's MAC address.
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x35, 0x02];
/// The link MTU: as large as virtio-net frames go, so bulk TCP moves in 64 KiB segments
/// without segmentation offload (the pod's MTU does not apply: podvm's own sockets carry
/// the data out).
pub const DEFAULT_MTU: u16 = 65_520;

/// Epoll tokens: the kind in the top byte, a flow id below.
const TOKEN_TIMER: u64 = 0;
const TOKEN_TCP: u64 = 1 << 56;
const TOKEN_UDP: u64 = 2 << 56;
const TOKEN_FORWARD: u64 = 3 << 56;
const TOKEN_ICMP: u64 = 4 << 56;
const KIND_MASK: u64 = 0xff << 56;

/// Housekeeping interval: idle expiry, connect timeouts.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// How the NAT is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserConfig {
    pub mtu: u16,
    /// Name servers and search domains handed to the guest (the pod's resolv.conf).
    pub resolv: resolv::Resolv,
    /// Most TCP connections, and most UDP conversations, at once (0: no traffic beyond the
    /// gateway at all).
    pub max_flows: usize,
    /// Per-connection socket buffer, each way: [`tcp::buffer_size`] of `max_flows` unless
    /// set (tests).
    pub tcp_buffer: Option<usize>,
    /// The pod's ports forwarded to the guest.
    pub forwards: Vec<forward::PortForward>,
    /// Forward every free TCP and UDP port of the pod to the same guest port (KubeVirt's
    /// behaviour when a VMI lists no ports).
    pub forward_all: bool,
    /// What the gateway stands for: the pod's own address (default) or, opted in, the
    /// pod's loopback ([`pod`]).
    pub gateway: pod::GatewayTo,
}

impl Default for UserConfig {
    fn default() -> Self {
        Self {
            mtu: DEFAULT_MTU,
            resolv: resolv::Resolv::default(),
            max_flows: 1024,
            tcp_buffer: None,
            forwards: Vec::new(),
            forward_all: false,
            gateway: pod::GatewayTo::default(),
        }
    }
}

/// The smoltcp side: interface, sockets, the frame queues, counters.
pub struct Stack {
    iface: Interface,
    pub wire: Wire,
    pub sockets: SocketSet<'static>,
    pub metrics: Arc<M>,
    epoch: std::time::Instant,
}

impl Stack {
    fn now(&self) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs the interface: takes queued frames in, sends what sockets have.
    pub fn poll(&mut self) -> PollResult {
        let now = self.now();
        self.iface.poll(now, &mut self.wire, &mut self.sockets)
    }
}

/// Creating the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum UserNetError {
    #[error("cannot create the NAT's epoll or timer: {0}")]
    Setup(#[source] std::io::Error),
    #[error(transparent)]
    Forward(#[from] forward::BindError),
}

/// The masquerade NAT backend.
pub struct UserNet {
    stack: Stack,
    epoll: Epoll,
    timer: TimerFd,
    /// When the armed timer fires; None once it has fired.
    timer_due: Option<std::time::Instant>,
    tcp: tcp::TcpNat,
    udp: udp::UdpNat,
    icmp: icmp::IcmpNat,
    dhcp: dhcp::DhcpOptions,
    ipv6: ipv6::Ipv6Options,
    forwards: Vec<forward::Bound>,
    guest_mac: EthernetAddress,
    /// Where the guest's destinations, the gateway's above all, go on the host.
    route: pod::PodRoute,
    /// The largest frame the gateway's stack takes from the guest: one IP packet of the
    /// link's MTU (what the stack answers, an echo reply above all, is as large).
    max_stack_frame: usize,
}

impl UserNet {
    /// A NAT for a guest whose MAC is `guest_mac`.
    pub fn new(
        config: &UserConfig,
        guest_mac: [u8; 6],
        metrics: Arc<M>,
    ) -> Result<Self, UserNetError> {
        let mut wire = Wire::new(config.mtu as usize, metrics.clone());
        let epoch = std::time::Instant::now();
        let mut iface_config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        iface_config.random_seed = random_seed();
        let mut iface = Interface::new(iface_config, &mut wire, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(GATEWAY4), PREFIX4));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(GATEWAY6), PREFIX6));
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv6(GATEWAY6_LINK_LOCAL), 64));
        });
        // "Any IP": the interface accepts packets for every address routed through itself,
        // which is how it plays every remote host.
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY4);
        let _ = iface.routes_mut().add_default_ipv6_route(GATEWAY6);
        iface.set_any_ip(true);

        let epoll = Epoll::new().map_err(UserNetError::Setup)?;
        let timer = TimerFd::new()
            .map_err(|e| UserNetError::Setup(std::io::Error::from_raw_os_error(e.errno())))?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TIMER),
            )
            .map_err(UserNetError::Setup)?;
        let mut forwards = forward::bind_all(&config.forwards)?;
        if config.forward_all {
            let started = std::time::Instant::now();
            let (all, skipped) = forward::bind_every_port()?;
            tracing::info!(
                ports = all.len(),
                skipped,
                ms = started.elapsed().as_millis() as u64,
                "forwarding every free TCP and UDP port of the pod to the guest"
            );
            forwards.extend(all);
        }
        for (index, bound) in forwards.iter().enumerate() {
            let fd = bound.fd();
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, TOKEN_FORWARD | index as u64),
                )
                .map_err(UserNetError::Setup)?;
        }
        let mut net = Self {
            stack: Stack {
                iface,
                wire,
                sockets: SocketSet::new(Vec::new()),
                metrics,
                epoch,
            },
            epoll,
            timer,
            timer_due: None,
            tcp: tcp::TcpNat::new(tcp::TcpLimits {
                max_flows: config.max_flows,
                buffer: config
                    .tcp_buffer
                    .unwrap_or_else(|| tcp::buffer_size(config.max_flows)),
            }),
            udp: udp::UdpNat::new(config.max_flows),
            icmp: icmp::IcmpNat::new(config.max_flows.min(64), config.mtu),
            dhcp: dhcp::DhcpOptions {
                mtu: config.mtu,
                dns: config.resolv.dns4.clone(),
                search: config.resolv.search.clone(),
            },
            ipv6: ipv6::Ipv6Options {
                mtu: config.mtu,
                dns: config.resolv.dns6.clone(),
                search: config.resolv.search.clone(),
            },
            forwards,
            guest_mac: EthernetAddress(guest_mac),
            max_stack_frame: 14 + usize::from(config.mtu),
            route: pod::PodRoute::new(config.gateway),
        };
        net.arm_timer(HOUSEKEEPING);
        Ok(net)
    }

    /// Makes sure the timer fires within `after`. A timer already due sooner stays as it
    /// is (firing early costs one pass; re-arming on every pass cost a syscall per frame).
    fn arm_timer(&mut self, after: Duration) {
        let after = after.max(Duration::from_micros(100));
        let due = std::time::Instant::now() + after;
        if self.timer_due.is_some_and(|armed| armed <= due) {
            return;
        }
        match self.timer.reset(after, None) {
            Ok(()) => self.timer_due = Some(due),
            Err(e) => tracing::warn!(error = %e, "cannot arm the NAT timer"),
        }
    }

    /// Runs the stack and the connections until nothing moves (bounded), then sets the timer
    /// for the stack's next deadline.
    fn run(&mut self) {
        let mut busy = false;
        for _ in 0..64 {
            let changed = self.stack.poll();
            let moved = self.tcp.pump_all(&mut self.stack);
            busy = moved || changed == PollResult::SocketStateChanged;
            if !busy {
                break;
            }
        }
        if !busy {
            self.tcp.reap_finished(&mut self.stack, &self.epoll);
        }
        let now = self.stack.now();
        let next = if busy {
            Duration::ZERO
        } else {
            self.stack
                .iface
                .poll_delay(now, &self.stack.sockets)
                .map_or(HOUSEKEEPING, |d| Duration::from_micros(d.total_micros()))
                .min(HOUSEKEEPING)
        };
        self.arm_timer(next);
    }

    /// Queues a responder's answer for the guest, counted in `sent`; an answer too large
    /// for the link is counted instead.
    fn reply(&mut self, reply: packet::Reply, sent: fn(&M) -> &std::sync::atomic::AtomicU64) {
        let m = &self.stack.metrics;
        match reply {
            Ok(frame) => {
                if self.stack.wire.to_guest.push(frame) {
                    M::inc(sent(m));
                }
            }
            Err(packet::Unanswered::TooLarge) => M::inc(&m.nat_reply_too_large),
            Err(packet::Unanswered::Ignored) => {}
        }
    }

    fn count_drop(&self, reason: DropReason) {
        let m = &self.stack.metrics;
        M::inc(match reason {
            DropReason::Malformed => &m.nat_dropped_malformed,
            DropReason::Checksum => &m.nat_dropped_checksum,
            DropReason::Fragment => &m.nat_dropped_fragment,
            DropReason::Unsupported => &m.nat_dropped_unsupported,
        });
    }
}

fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: getrandom writes at most `seed.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n == seed.len() as isize {
        u64::from_ne_bytes(seed)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x5eed, |d| d.as_nanos() as u64)
    }
}

impl UserNet {
    /// Drops finished connections and whatever has been idle too long as of `now`.
    pub fn housekeeping(&mut self, now: std::time::Instant) {
        self.tcp.reap(now, &mut self.stack, &self.epoll);
        self.udp.reap(now, &mut self.stack, &self.epoll);
        self.icmp.reap(now, &self.epoll);
    }

    /// A forwarded port's listening socket is readable.
    fn on_forward(&mut self, index: usize) {
        let Some(bound) = self.forwards.get(index) else {
            return;
        };
        match &bound.listener {
            forward::Listener::Tcp(listener) => loop {
                match listener.accept() {
                    Ok((stream, client)) => self.tcp.on_accept(
                        stream,
                        client,
                        bound.guest_addr(client),
                        &mut self.stack,
                        &self.epoll,
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            },
            forward::Listener::Udp(_) => {
                self.udp
                    .on_forwarded(index, bound, &mut self.stack, self.guest_mac)
            }
        }
    }
}

impl NetBackend for UserNet {
    fn send(&mut self, frame: &[u8]) {
        let verdict = frame::classify(frame);
        if verdict
            .destination()
            .is_some_and(|dst| !self.route.allows(dst))
        {
            // The pod's loopback, not opted in.
            M::inc(&self.stack.metrics.nat_dropped_loopback);
            return;
        }
        match verdict {
            // Larger than the link allows: the stack's answer (an echo reply) would be too.
            Verdict::Stack if frame.len() > self.max_stack_frame => {
                M::inc(&self.stack.metrics.nat_reply_too_large)
            }
            Verdict::Stack => self.stack.wire.push_to_stack(frame.to_vec()),
            Verdict::TcpSyn(key) => {
                self.tcp
                    .on_syn(key, frame, &self.route, &mut self.stack, &self.epoll)
            }
            Verdict::Udp { key, payload } => self.udp.on_datagram(
                key,
                payload,
                &self.forwards,
                &self.route,
                &mut self.stack,
                &self.epoll,
            ),
            Verdict::Dhcp4(payload) => {
                let reply = dhcp::answer(payload, &self.dhcp);
                self.reply(reply, |m| &m.dhcp_replies);
            }
            Verdict::Echo {
                dst,
                ident,
                seq,
                payload,
            } => self
                .icmp
                .on_echo(dst, ident, seq, payload, &mut self.stack, &self.epoll),
            Verdict::RouterSolicit => {
                let ra = ipv6::router_advert(&self.ipv6).ok_or(packet::Unanswered::TooLarge);
                self.reply(ra, |m| &m.router_adverts);
            }
            Verdict::Dhcp6 { src, payload } => {
                let reply = ipv6::dhcp6_answer(self.guest_mac, src, payload, &self.ipv6);
                self.reply(reply, |m| &m.dhcp_replies);
            }
            Verdict::Ignore => {}
            Verdict::Drop(reason) => self.count_drop(reason),
        }
    }

    fn flush(&mut self) {
        self.run();
    }

    fn rx_peek(&mut self) -> Option<&[u8]> {
        self.stack.wire.to_guest.front().map(Vec::as_slice)
    }

    fn rx_pop(&mut self) {
        self.stack.wire.to_guest.pop_front();
    }

    fn rx_room(&mut self) {
        let queue = &self.stack.wire.to_guest;
        if queue.len() < stack::TO_GUEST_FRAMES / 2 && queue.bytes() < stack::TO_GUEST_BYTES / 2 {
            self.run();
        }
    }

    fn event_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn process(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        let mut housekeeping = false;
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "NAT epoll failed");
                    break;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                let id = token & !KIND_MASK;
                match token & KIND_MASK {
                    TOKEN_TIMER => {
                        let _ = self.timer.wait();
                        self.timer_due = None;
                        housekeeping = true;
                    }
                    TOKEN_TCP => {
                        self.tcp
                            .on_host_event(id, ev.event_set(), &mut self.stack, &self.epoll)
                    }
                    TOKEN_UDP => self.udp.on_host_event(id, &mut self.stack, self.guest_mac),
                    TOKEN_FORWARD => self.on_forward(id as usize),
                    TOKEN_ICMP => self.icmp.on_host_event(id, &mut self.stack, self.guest_mac),
                    _ => {}
                }
            }
            if n < events.len() {
                break;
            }
        }
        if housekeeping {
            self.housekeeping(std::time::Instant::now());
        }
        self.run();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{EthernetFrame, Ipv4Packet, UdpPacket};
    use std::net::{IpAddr, SocketAddr, UdpSocket};

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    #[test]
    fn nat_udp_to_the_gateway_with_pod_loopback_reaches_the_loopback_answers_and_expires_when_idle()
    {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let port = server.local_addr().unwrap().port();
        let metrics = Arc::new(M::default());
        let config = UserConfig {
            gateway: pod::GatewayTo::Loopback,
            ..Default::default()
        };
        let mut net = UserNet::new(&config, MAC, metrics.clone()).unwrap();
        let guest = SocketAddr::new(GUEST4.into(), 5000);
        let gateway = SocketAddr::new(GATEWAY4.into(), port);
        let frame = packet::udp(EthernetAddress(GATEWAY_MAC), guest, gateway, b"hello").unwrap();
        net.send(&frame);
        net.flush();

        let mut buf = [0u8; 64];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert!(from.ip().is_loopback());
        server.send_to(b"world", from).unwrap();

        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let reply = loop {
            net.process();
            if let Some(f) = net.rx_peek() {
                break f.to_vec();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no reply reached the guest"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (GATEWAY4, GUEST4));
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!((udp.src_port(), udp.dst_port()), (port, 5000));
        assert_eq!(udp.payload(), b"world");
        assert_eq!(M::get(&metrics.nat_udp_flows), 1);

        // Idle past the limit: the conversation goes, counted.
        net.housekeeping(std::time::Instant::now() + udp::IDLE / 2);
        assert_eq!(M::get(&metrics.nat_udp_flows), 1);
        net.housekeeping(std::time::Instant::now() + udp::IDLE + Duration::from_secs(1));
        assert_eq!(M::get(&metrics.nat_udp_flows), 0);
        assert_eq!(M::get(&metrics.nat_expired), 1);
    }

    /// An echo request for the gateway of `data_len` bytes, from the guest.
    fn ping_gateway(data_len: usize) -> Vec<u8> {
        use smoltcp::phy::ChecksumCapabilities;
        use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr};
        let data = vec![0x5a; data_len];
        let echo = Icmpv4Repr::EchoRequest {
            ident: 1,
            seq_no: 1,
            data: &data,
        };
        let len = echo.buffer_len();
        let gw = EthernetAddress(GATEWAY_MAC);
        packet::ipv4(
            gw,
            GUEST4,
            GATEWAY4,
            smoltcp::wire::IpProtocol::Icmp,
            len,
            |b| {
                echo.emit(
                    &mut Icmpv4Packet::new_unchecked(b),
                    &ChecksumCapabilities::default(),
                )
            },
        )
        .unwrap()
    }

    #[test]
    fn nat_echo_of_the_gateway_larger_than_the_mtu_is_dropped_and_counted() {
        let metrics = Arc::new(M::default());
        let config = UserConfig {
            mtu: 1500,
            max_flows: 0,
            ..Default::default()
        };
        let mut net = UserNet::new(&config, MAC, metrics.clone()).unwrap();
        // The guest's ARP request for the gateway, so the stack knows where to answer.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&MAC);
        arp.extend_from_slice(&[10, 0, 2, 2, 0, 0, 0, 0, 0, 0, 10, 0, 2, 1]);
        net.send(&arp);
        net.flush();
        while net.rx_peek().is_some() {
            net.rx_pop();
        }

        // 20 + 8 + 1472 = 1500: answered, in one frame of the link.
        net.send(&ping_gateway(1472));
        net.flush();
        assert_eq!(net.rx_peek().map(<[u8]>::len), Some(14 + 1500));
        net.rx_pop();

        // One byte more: no answer, counted.
        net.send(&ping_gateway(1473));
        net.flush();
        assert!(net.rx_peek().is_none());
        assert_eq!(M::get(&metrics.nat_reply_too_large), 1);
    }

    #[test]
    fn nat_answers_to_a_guest_that_takes_nothing_are_capped_and_counted() {
        let metrics = Arc::new(M::default());
        let config = UserConfig {
            max_flows: 0,
            ..Default::default()
        };
        let mut net = UserNet::new(&config, MAC, metrics.clone()).unwrap();
        let arp = {
            let mut arp = vec![0xff; 6];
            arp.extend_from_slice(&MAC);
            arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
            arp.extend_from_slice(&MAC);
            arp.extend_from_slice(&[10, 0, 2, 2, 0, 0, 0, 0, 0, 0, 10, 0, 2, 1]);
            arp
        };
        let discover = crate::virtio::net::fuzzing::seed_frames()
            .into_iter()
            .find(|(name, _)| *name == "dhcp-discover")
            .unwrap()
            .1[2..]
            .to_vec();
        // smoltcp's own answers (ARP replies) and the NAT's (DHCP offers), 600 each.
        for frame in [&arp, &discover] {
            for _ in 0..600 {
                net.send(frame);
                net.flush();
            }
        }
        assert_eq!(net.stack.wire.to_guest.len(), stack::TO_GUEST_FRAMES);
        assert_eq!(
            M::get(&metrics.rx_dropped),
            (2 * 600 - stack::TO_GUEST_FRAMES) as u64
        );

        // Large echo replies: the bytes are capped too.
        while net.rx_peek().is_some() {
            net.rx_pop();
        }
        for _ in 0..100 {
            net.send(&ping_gateway(60_000));
            net.flush();
        }
        let queue = &net.stack.wire.to_guest;
        assert!(queue.bytes() <= stack::TO_GUEST_BYTES + 14 + 20 + 8 + 60_000);
        assert!(queue.len() < 100);
    }

    #[test]
    fn nat_gateway_reaches_the_pod_address_not_its_loopback_which_is_dropped_and_counted() {
        let Some(pod4) = pod::pod_addresses().0 else {
            eprintln!("SKIP: this host has no IPv4 address besides the loopback");
            return;
        };
        // A service of the pod on every address, and one on the loopback only.
        let open = UdpSocket::bind("0.0.0.0:0").unwrap();
        let private = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&open, &private] {
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
        }
        let metrics = Arc::new(M::default());
        let mut net = UserNet::new(&UserConfig::default(), MAC, metrics.clone()).unwrap();
        let guest = SocketAddr::new(GUEST4.into(), 5000);
        let gw = EthernetAddress(GATEWAY_MAC);
        let to = |ip: Ipv4Addr, s: &UdpSocket| {
            SocketAddr::new(ip.into(), s.local_addr().unwrap().port())
        };
        for dst in [
            to(GATEWAY4, &open),
            to(GATEWAY4, &private),
            to(Ipv4Addr::LOCALHOST, &private),
        ] {
            net.send(&packet::udp(gw, guest, dst, b"hello").unwrap());
            net.flush();
        }

        let mut buf = [0u8; 64];
        let (n, from) = open.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from.ip()), (&b"hello"[..], IpAddr::V4(pod4)));
        assert!(
            private.recv_from(&mut buf).is_err(),
            "the loopback was reached"
        );
        assert_eq!(M::get(&metrics.nat_dropped_loopback), 1);
    }
}
