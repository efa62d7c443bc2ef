//! UDP through the NAT: one connected host socket per guest conversation (guest address and
//! port, remote address and port), so replies come back only from the remote the guest
//! talked to, as through a masquerading router. Conversations expire when idle.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use smoltcp::wire::EthernetAddress;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::forward::{guest_visible, Bound, Listener};
use super::frame::FlowKey;
use super::pod::PodRoute;
use super::{packet, Stack, TOKEN_UDP};
use crate::virtio::net::metrics::NetMetrics as M;

/// How long a conversation lives without a datagram either way.
pub const IDLE: Duration = Duration::from_secs(120);
/// Largest datagram read from the far side (a 64 KiB IP packet's payload).
const MAX_DATAGRAM: usize = 65_507;

struct Flow {
    key: FlowKey,
    host: UdpSocket,
    last_active: Instant,
}

/// A client of a forwarded UDP port, as the guest sees it.
struct Inbound {
    /// Index of the forward's listening socket, which answers the client.
    listener: usize,
    client: SocketAddr,
    last_active: Instant,
}

/// Every UDP conversation the guest has through the NAT.
pub struct UdpNat {
    max_flows: usize,
    flows: HashMap<u64, Flow>,
    by_key: HashMap<FlowKey, u64>,
    inbound: HashMap<FlowKey, Inbound>,
    next_id: u64,
    buf: Vec<u8>,
}

impl UdpNat {
    pub fn new(max_flows: usize) -> Self {
        Self {
            max_flows,
            flows: HashMap::new(),
            by_key: HashMap::new(),
            inbound: HashMap::new(),
            next_id: 1,
            buf: vec![0u8; MAX_DATAGRAM],
        }
    }

    /// A datagram from the guest: an answer to a client of a forwarded port, or outbound.
    pub fn on_datagram(
        &mut self,
        key: FlowKey,
        payload: &[u8],
        forwards: &[Bound],
        route: &PodRoute,
        stack: &mut Stack,
        epoll: &Epoll,
    ) {
        if let Some(inbound) = self.inbound.get_mut(&key) {
            inbound.last_active = Instant::now();
            if let Some(Listener::Udp(socket)) = forwards.get(inbound.listener).map(|b| &b.listener)
            {
                if socket.send_to(payload, inbound.client).is_err() {
                    M::inc(&stack.metrics.nat_udp_send_errors);
                }
            }
            return;
        }
        let id = match self.by_key.get(&key) {
            Some(&id) => id,
            None => match self.open(key, route, stack, epoll) {
                Some(id) => id,
                None => return,
            },
        };
        let flow = self.flows.get_mut(&id).expect("by_key and flows agree");
        flow.last_active = Instant::now();
        if flow.host.send(payload).is_err() {
            M::inc(&stack.metrics.nat_udp_send_errors);
        }
    }

    fn open(
        &mut self,
        key: FlowKey,
        route: &PodRoute,
        stack: &mut Stack,
        epoll: &Epoll,
    ) -> Option<u64> {
        if self.flows.len() >= self.max_flows {
            M::inc(&stack.metrics.nat_flow_limit);
            return None;
        }
        let Some(dst) = route.host_destination(key.remote) else {
            // The gateway, where the pod has no address of the family.
            M::inc(&stack.metrics.nat_udp_send_errors);
            return None;
        };
        let any: SocketAddr = if dst.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let host = UdpSocket::bind(any)
            .and_then(|s| s.connect(dst).map(|()| s))
            .and_then(|s| s.set_nonblocking(true).map(|()| s));
        let host = match host {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%dst, error = %e, "NAT UDP socket failed");
                M::inc(&stack.metrics.nat_udp_send_errors);
                return None;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        epoll
            .ctl(
                ControlOperation::Add,
                host.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_UDP | id),
            )
            .ok()?;
        self.flows.insert(
            id,
            Flow {
                key,
                host,
                last_active: Instant::now(),
            },
        );
        self.by_key.insert(key, id);
        M::set(&stack.metrics.nat_udp_flows, self.flows.len() as u64);
        Some(id)
    }

    /// Datagrams to forward `index` (listening on `socket`), relayed to the guest as from
    /// their senders.
    pub fn on_forwarded(
        &mut self,
        index: usize,
        bound: &Bound,
        stack: &mut Stack,
        guest_mac: EthernetAddress,
    ) {
        let Listener::Udp(socket) = &bound.listener else {
            return;
        };
        loop {
            let (n, client) = match socket.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let guest = bound.guest_addr(client);
            let remote = guest_visible(client);
            if remote.is_ipv4() != guest.is_ipv4() {
                continue;
            }
            let key = FlowKey { guest, remote };
            if !self.inbound.contains_key(&key) && self.inbound.len() >= self.max_flows {
                M::inc(&stack.metrics.nat_flow_limit);
                continue;
            }
            self.inbound.insert(
                key,
                Inbound {
                    listener: index,
                    client,
                    last_active: Instant::now(),
                },
            );
            if !stack.wire.to_guest.has_room() {
                M::inc(&stack.metrics.rx_dropped);
                continue;
            }
            if let Some(frame) = packet::udp(guest_mac, remote, guest, &self.buf[..n]) {
                stack.wire.to_guest.push(frame);
            }
        }
    }

    /// Datagrams from the far side of conversation `id`, to the guest.
    pub fn on_host_event(&mut self, id: u64, stack: &mut Stack, guest_mac: EthernetAddress) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        loop {
            match flow.host.recv(&mut self.buf) {
                Ok(n) => {
                    flow.last_active = Instant::now();
                    if !stack.wire.to_guest.has_room() {
                        // The guest is not taking frames: drop, as a full router queue does.
                        M::inc(&stack.metrics.rx_dropped);
                        continue;
                    }
                    let (src, dst) = (flow.key.remote, flow.key.guest);
                    if let Some(frame) = packet::udp(guest_mac, src, dst, &self.buf[..n]) {
                        stack.wire.to_guest.push(frame);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock, or an ICMP error the kernel reported on the connected socket.
                Err(_) => break,
            }
        }
    }

    /// Drops idle conversations.
    pub fn reap(&mut self, now: Instant, stack: &mut Stack, epoll: &Epoll) {
        let idle: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, f)| now.duration_since(f.last_active) > IDLE)
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            if let Some(flow) = self.flows.remove(&id) {
                self.by_key.remove(&flow.key);
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    flow.host.as_raw_fd(),
                    EpollEvent::default(),
                );
                M::inc(&stack.metrics.nat_expired);
            }
        }
        self.inbound
            .retain(|_, i| now.duration_since(i.last_active) <= IDLE);
        M::set(
            &stack.metrics.nat_udp_flows,
            (self.flows.len() + self.inbound.len()) as u64,
        );
    }
}
