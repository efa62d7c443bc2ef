//! TCP through the NAT. smoltcp plays every remote host toward the guest; a non-blocking
//! host socket carries each connection from the pod's own address.
//!
//! Opening: the guest's SYN is held while podvm connects to the real destination. When the
//! host connect succeeds, a smoltcp socket listening on the destination's address and port
//! takes the held SYN and answers it, so the guest's connection is established exactly when
//! the far side accepted. When the host connect fails, the SYN goes to the stack with no
//! listener and the stack answers with a reset: the guest sees "connection refused".
//! One listener is created and fed its SYN at a time, so two connections to the same
//! destination can never swap their halves.
//!
//! Data is pumped both ways without copies beyond the socket buffers; each side's buffer
//! being full stops reading from the other (the guest sees a closing window, the far side a
//! full socket). A FIN either way becomes a shutdown of the other side's write half, a reset
//! either way a reset of the other side.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::IpListenEndpoint;
use socket2::{Domain, Protocol, Socket, Type};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::frame::FlowKey;
use super::pod::PodRoute;
use super::{Stack, TOKEN_TCP};
use crate::virtio::net::metrics::NetMetrics as M;

/// How long a connect may take before the guest gets a reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(75);
/// How long an established connection may be idle (nothing either way) before it is
/// dropped; the same order as a conntrack table's established timeout.
pub const IDLE_ESTABLISHED: Duration = Duration::from_secs(24 * 3600);
/// How long a half-closed or closing connection may be idle.
pub const IDLE_CLOSING: Duration = Duration::from_secs(120);

/// What the stack's buffers of all connections may take together, both ways: the NAT's
/// share of the pod's memory for TCP. Each connection's buffers are allocated whole when
/// it opens (smoltcp cannot grow them), and a guest that stops reading while the far side
/// sends (or the reverse) fills them, so the table must fit at its fullest.
pub const BUFFER_BUDGET: usize = 128 << 20;
/// A connection's buffer each way, at most (more does not speed up a link in memory) and
/// at least (below it, the window is a fraction of a 64 KiB segment).
pub const MAX_BUFFER: usize = 256 << 10;
pub const MIN_BUFFER: usize = 4 << 10;
/// The most connections the budget holds at [`MIN_BUFFER`]: the upper bound of max-flows.
pub const MAX_FLOWS: usize = BUFFER_BUDGET / (2 * MIN_BUFFER);

/// The buffer each way of every connection when up to `max_flows` are open: the budget
/// shared among them, within [`MIN_BUFFER`]..=[`MAX_BUFFER`], in 4 KiB steps. 64 KiB for
/// the default 1,024 connections; 256 KiB for 256 or fewer.
pub fn buffer_size(max_flows: usize) -> usize {
    let share = BUFFER_BUDGET / (2 * max_flows.max(1));
    share.clamp(MIN_BUFFER, MAX_BUFFER) & !0xfff
}

enum Phase {
    /// The host connect is under way; the guest's SYN waits.
    Connecting {
        syn: Vec<u8>,
        since: Instant,
    },
    Open(SocketHandle),
}

struct Flow {
    key: FlowKey,
    host: Socket,
    phase: Phase,
    host_readable: bool,
    host_writable: bool,
    host_eof: bool,
    host_shut_wr: bool,
    /// The far side reset the connection; the guest has been sent a reset.
    aborted: bool,
    last_active: Instant,
}

/// Table limits and buffer sizes.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    pub max_flows: usize,
    pub buffer: usize,
}

/// Every TCP connection the guest has through the NAT.
pub struct TcpNat {
    limits: TcpLimits,
    flows: HashMap<u64, Flow>,
    by_key: HashMap<FlowKey, u64>,
    next_id: u64,
}

impl TcpNat {
    pub fn new(limits: TcpLimits) -> Self {
        Self {
            limits,
            flows: HashMap::new(),
            by_key: HashMap::new(),
            next_id: 1,
        }
    }

    /// A SYN from the guest (`frame` is the whole Ethernet frame). What is kept of it while
    /// the host connects ends with its IP packet (a SYN carries no data), so each waiting
    /// connection holds a little over a hundred bytes whatever the guest appended.
    pub fn on_syn(
        &mut self,
        key: FlowKey,
        frame: &[u8],
        route: &PodRoute,
        stack: &mut Stack,
        epoll: &Epoll,
    ) {
        let frame = &frame[..super::frame::packet_end(frame)];
        if let Some(&id) = self.by_key.get(&key) {
            let reuse = match &self.flows[&id].phase {
                Phase::Connecting { .. } => return, // a retransmission; the first one waits
                Phase::Open(h) => matches!(
                    stack.sockets.get::<tcp::Socket>(*h).state(),
                    State::TimeWait | State::Closed
                ),
            };
            if !reuse {
                stack.wire.push_to_stack(frame.to_vec());
                return;
            }
            // The guest reuses the port of a finished connection.
            self.remove(id, stack, epoll);
        }
        if self.flows.len() >= self.limits.max_flows {
            M::inc(&stack.metrics.nat_flow_limit);
            refuse(frame.to_vec(), stack);
            return;
        }
        let Some(dst) = route.host_destination(key.remote) else {
            // The gateway, where the pod has no address of the family.
            M::inc(&stack.metrics.nat_tcp_connect_failed);
            refuse(frame.to_vec(), stack);
            return;
        };
        let host = match connect(dst) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%dst, error = %e, "NAT connect failed at once");
                M::inc(&stack.metrics.nat_tcp_connect_failed);
                refuse(frame.to_vec(), stack);
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = epoll.ctl(
            ControlOperation::Add,
            host.as_raw_fd(),
            EpollEvent::new(events, TOKEN_TCP | id),
        ) {
            tracing::warn!(error = %e, "cannot watch a NAT socket");
            refuse(frame.to_vec(), stack);
            return;
        }
        self.flows.insert(
            id,
            Flow {
                key,
                host,
                phase: Phase::Connecting {
                    syn: frame.to_vec(),
                    since: Instant::now(),
                },
                host_readable: false,
                host_writable: false,
                host_eof: false,
                host_shut_wr: false,
                aborted: false,
                last_active: Instant::now(),
            },
        );
        self.by_key.insert(key, id);
        M::set(&stack.metrics.nat_tcp_flows, self.flows.len() as u64);
        // A connect to the pod itself (the gateway) has usually completed by the time
        // `connect` returns: answer the guest now rather than one event-loop turn later.
        if connected(&self.flows[&id].host) {
            self.on_host_event(id, EventSet::OUT, stack, epoll);
        }
    }

    /// A client connected to a forwarded port: open the connection to the guest's
    /// `guest` address, from the address the guest should see for `client`.
    pub fn on_accept(
        &mut self,
        stream: std::net::TcpStream,
        client: SocketAddr,
        guest: SocketAddr,
        stack: &mut Stack,
        epoll: &Epoll,
    ) {
        if self.flows.len() >= self.limits.max_flows {
            M::inc(&stack.metrics.nat_flow_limit);
            return; // dropping the stream closes it
        }
        let remote = super::forward::guest_visible(client);
        let key = FlowKey { guest, remote };
        if self.by_key.contains_key(&key) || remote.is_ipv4() != guest.is_ipv4() {
            return;
        }
        let host = Socket::from(stream);
        if host.set_nonblocking(true).is_err() {
            return;
        }
        let _ = host.set_tcp_nodelay(true);
        let mut socket = new_socket(self.limits.buffer);
        let local = IpListenEndpoint {
            addr: Some(remote.ip().into()),
            port: remote.port(),
        };
        if let Err(e) = socket.connect(stack.iface.context(), guest, local) {
            tracing::debug!(%client, error = %e, "cannot open a forwarded connection");
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if epoll
            .ctl(
                ControlOperation::Add,
                host.as_raw_fd(),
                EpollEvent::new(events, TOKEN_TCP | id),
            )
            .is_err()
        {
            return;
        }
        let handle = stack.sockets.add(socket);
        self.flows.insert(
            id,
            Flow {
                key,
                host,
                phase: Phase::Open(handle),
                host_readable: true,
                host_writable: true,
                host_eof: false,
                host_shut_wr: false,
                aborted: false,
                last_active: Instant::now(),
            },
        );
        self.by_key.insert(key, id);
        M::inc(&stack.metrics.nat_tcp_inbound);
        M::set(&stack.metrics.nat_tcp_flows, self.flows.len() as u64);
        stack.poll();
    }

    /// The host socket of connection `id` has events.
    pub fn on_host_event(&mut self, id: u64, events: EventSet, stack: &mut Stack, epoll: &Epoll) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        flow.last_active = Instant::now();
        if let Phase::Connecting { syn, .. } = &mut flow.phase {
            let failed = events.intersects(EventSet::ERROR | EventSet::HANG_UP);
            let result = match flow.host.take_error() {
                Ok(None) if !failed => Ok(()),
                Ok(None) => Err(io::Error::from(io::ErrorKind::ConnectionRefused)),
                Ok(Some(e)) | Err(e) => Err(e),
            };
            if !events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                return;
            }
            let syn = std::mem::take(syn);
            match result {
                Ok(()) => {
                    let mut socket = new_socket(self.limits.buffer);
                    let endpoint = IpListenEndpoint {
                        addr: Some(flow.key.remote.ip().into()),
                        port: flow.key.remote.port(),
                    };
                    if socket.listen(endpoint).is_err() {
                        self.fail(id, syn, stack, epoll);
                        return;
                    }
                    let handle = stack.sockets.add(socket);
                    flow.phase = Phase::Open(handle);
                    flow.host_readable = true;
                    flow.host_writable = true;
                    stack.wire.push_to_stack(syn);
                    // Now, before any other listener exists, so this SYN finds this socket.
                    stack.poll();
                    M::inc(&stack.metrics.nat_tcp_opened);
                }
                Err(e) => {
                    tracing::debug!(remote = %flow.key.remote, error = %e, "NAT connect failed");
                    self.fail(id, syn, stack, epoll);
                    return;
                }
            }
        } else {
            if events.intersects(
                EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
            ) {
                flow.host_readable = true;
            }
            if events.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
                flow.host_writable = true;
            }
        }
        if let Some(flow) = self.flows.get_mut(&id) {
            pump(flow, stack);
        }
    }

    fn fail(&mut self, id: u64, syn: Vec<u8>, stack: &mut Stack, epoll: &Epoll) {
        M::inc(&stack.metrics.nat_tcp_connect_failed);
        self.remove(id, stack, epoll);
        refuse(syn, stack);
    }

    /// Moves data both ways on every open connection; true if anything moved.
    pub fn pump_all(&mut self, stack: &mut Stack) -> bool {
        let mut moved = false;
        for flow in self.flows.values_mut() {
            moved |= pump(flow, stack);
        }
        moved
    }

    /// Forgets the connections that are over: both sides closed (the stack's TIME-WAIT is
    /// of no use toward a guest on a lossless link, and keeping it would keep thousands of
    /// idle sockets in every poll of a guest that opens connections fast), or reset.
    /// Call after the stack has sent everything (its last ACK included).
    pub fn reap_finished(&mut self, stack: &mut Stack, epoll: &Epoll) {
        let finished: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, flow)| match flow.phase {
                Phase::Open(h) => finished(flow, stack.sockets.get::<tcp::Socket>(h)),
                Phase::Connecting { .. } => false,
            })
            .map(|(&id, _)| id)
            .collect();
        for id in finished {
            self.remove(id, stack, epoll);
        }
    }

    /// Drops finished, failed and idle connections.
    pub fn reap(&mut self, now: Instant, stack: &mut Stack, epoll: &Epoll) {
        let mut done = Vec::new();
        let mut timed_out = Vec::new();
        for (&id, flow) in &self.flows {
            match &flow.phase {
                Phase::Connecting { since, .. } => {
                    if now.duration_since(*since) > CONNECT_TIMEOUT {
                        timed_out.push(id);
                    }
                }
                Phase::Open(h) => {
                    let socket = stack.sockets.get::<tcp::Socket>(*h);
                    let idle = now.duration_since(flow.last_active);
                    let limit = if socket.state() == State::Established {
                        IDLE_ESTABLISHED
                    } else {
                        IDLE_CLOSING
                    };
                    if finished(flow, socket) || idle > limit {
                        if idle > limit {
                            M::inc(&stack.metrics.nat_expired);
                        }
                        done.push(id);
                    }
                }
            }
        }
        for id in timed_out {
            M::inc(&stack.metrics.nat_expired);
            let syn = match self.flows.get_mut(&id).map(|f| &mut f.phase) {
                Some(Phase::Connecting { syn, .. }) => std::mem::take(syn),
                _ => continue,
            };
            self.fail(id, syn, stack, epoll);
        }
        for id in done {
            self.remove(id, stack, epoll);
        }
    }

    /// Forgets connection `id`: a connection the guest did not finish cleanly (a reset, an
    /// expiry) is reset toward the far side too.
    fn remove(&mut self, id: u64, stack: &mut Stack, epoll: &Epoll) {
        let Some(flow) = self.flows.remove(&id) else {
            return;
        };
        self.by_key.remove(&flow.key);
        let _ = epoll.ctl(
            ControlOperation::Delete,
            flow.host.as_raw_fd(),
            EpollEvent::default(),
        );
        if let Phase::Open(h) = flow.phase {
            let socket = stack.sockets.get_mut::<tcp::Socket>(h);
            let clean = flow.host_eof && flow.host_shut_wr;
            if !clean && !flow.aborted {
                // The guest reset it (or it expired): so does the far side.
                socket.abort();
                let _ = flow.host.set_linger(Some(Duration::ZERO));
                M::inc(&stack.metrics.nat_tcp_resets_from_guest);
            }
            stack.poll();
            stack.sockets.remove(h);
        }
        M::set(&stack.metrics.nat_tcp_flows, self.flows.len() as u64);
    }
}

/// A stack socket for one connection: no Nagle (the guest's and the far side's own stacks
/// decide how to batch) and no delayed ACK (a connection's last ACK must leave before the
/// connection is forgotten, and with the link's 64 KiB segments every segment is ACKed at
/// once anyway).
fn new_socket(buffer: usize) -> tcp::Socket<'static> {
    let mut socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0u8; buffer]),
        tcp::SocketBuffer::new(vec![0u8; buffer]),
    );
    socket.set_nagle_enabled(false);
    socket.set_ack_delay(None);
    socket
}

/// Whether a connection is over and everything the guest sent has reached the far side:
/// closed (normally or by a reset), or in TIME-WAIT with the far side's write half shut.
fn finished(flow: &Flow, socket: &tcp::Socket) -> bool {
    let drained = socket.recv_queue() == 0 || flow.aborted;
    match socket.state() {
        State::Closed => drained,
        State::TimeWait => drained && flow.host_shut_wr,
        _ => false,
    }
}

/// Whether a non-blocking connect has already completed.
fn connected(socket: &Socket) -> bool {
    matches!(socket.take_error(), Ok(None)) && socket.peer_addr().is_ok()
}

/// Opens a non-blocking socket and starts connecting it to `dst`.
fn connect(dst: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(dst),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    match socket.connect(&dst.into()) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(e),
    }
}

/// Gives the guest's SYN to the stack with no listener for it: the stack answers with a reset.
fn refuse(syn: Vec<u8>, stack: &mut Stack) {
    stack.wire.push_to_stack(syn);
    stack.poll();
}

/// Moves what each side can take; true if any byte moved or a state changed.
fn pump(flow: &mut Flow, stack: &mut Stack) -> bool {
    let Phase::Open(h) = flow.phase else {
        return false;
    };
    let socket = stack.sockets.get_mut::<tcp::Socket>(h);
    let mut moved = false;

    // Guest to far side.
    while flow.host_writable && socket.can_recv() {
        let host = &flow.host;
        let result = socket.recv(|buf| match (&*host).write(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match result {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(_)) => moved = true,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => flow.host_writable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                host_reset(flow, socket, &stack.metrics);
                return true;
            }
        }
    }
    // The guest finished sending and all of it went out: finish the far side's half.
    if !flow.host_shut_wr
        && socket.recv_queue() == 0
        && matches!(
            socket.state(),
            State::CloseWait | State::LastAck | State::Closing | State::TimeWait
        )
    {
        let _ = flow.host.shutdown(std::net::Shutdown::Write);
        flow.host_shut_wr = true;
        moved = true;
    }

    // Far side to guest.
    while flow.host_readable && !flow.host_eof && socket.can_send() {
        let host = &flow.host;
        let result = socket.send(|buf| match (&*host).read(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match result {
            Ok(Ok(0)) => {
                flow.host_eof = true;
                socket.close();
                moved = true;
            }
            Ok(Ok(_)) => moved = true,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => flow.host_readable = false,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(_)) => {
                host_reset(flow, socket, &stack.metrics);
                return true;
            }
            Err(_) => break,
        }
    }
    if moved {
        flow.last_active = Instant::now();
    }
    moved
}

fn host_reset(flow: &mut Flow, socket: &mut tcp::Socket, metrics: &M) {
    socket.abort();
    flow.aborted = true;
    flow.host_readable = false;
    flow.host_writable = false;
    M::inc(&metrics.nat_tcp_resets_to_guest);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_buffers_of_the_largest_table_fit_the_budget() {
        assert_eq!(buffer_size(1024), 64 << 10);
        assert_eq!(buffer_size(256), MAX_BUFFER);
        assert_eq!(buffer_size(1), MAX_BUFFER);
        assert_eq!(buffer_size(MAX_FLOWS), MIN_BUFFER);
        for flows in [1, 3, 20, 1000, 1024, 1025, 5000, MAX_FLOWS] {
            let each = buffer_size(flows);
            assert_eq!(each % 4096, 0, "{flows}");
            assert!(flows * 2 * each <= BUFFER_BUDGET, "{flows}: {each}");
        }
    }
}
