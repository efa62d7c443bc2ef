//! virtio-net and NAT counters, readable from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one virtio-net device and its backend.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames the guest sent that reached the backend, and their bytes.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames delivered to the guest, and their bytes.
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// TX chains that were not valid frames (bad descriptors, short or oversized, bad
    /// virtio-net header, unsupported GSO).
    pub tx_invalid: AtomicU64,
    /// Frames the backend could not take (a full tap queue, a header the host refused).
    pub tx_dropped: AtomicU64,
    /// Frames for the guest dropped because it posted no buffer for too long or the
    /// buffers were too small.
    pub rx_dropped: AtomicU64,
    /// Interrupts sent to the guest.
    pub interrupts: AtomicU64,
    /// Times a queue's rings were found broken (each then unserved until the driver resets).
    pub broken_queues: AtomicU64,
    /// TX passes that ended on their frame budget with frames left (served on the next turn
    /// of the event loop).
    pub tx_budget_spent: AtomicU64,
    /// 1 while vhost-net moves the frames (a gauge).
    pub vhost_active: AtomicU64,
    /// RARP frames sent with the guest's MAC after a migration landed here, so that the
    /// switches learn where the guest is now.
    pub announcements: AtomicU64,
    /// Guest frames the NAT dropped: malformed, bad checksum, fragments, unsupported.
    pub nat_dropped_malformed: AtomicU64,
    pub nat_dropped_checksum: AtomicU64,
    pub nat_dropped_fragment: AtomicU64,
    pub nat_dropped_unsupported: AtomicU64,
    /// Guest packets for the pod's loopback (127.0.0.0/8, ::1), dropped unless the NIC opts
    /// in (`pod-loopback=on`).
    pub nat_dropped_loopback: AtomicU64,
    /// TCP connections the guest opened through the NAT, and those the far side refused
    /// or that failed to connect.
    pub nat_tcp_opened: AtomicU64,
    pub nat_tcp_connect_failed: AtomicU64,
    /// Connections clients opened to forwarded ports.
    pub nat_tcp_inbound: AtomicU64,
    /// Connections refused because the flow table was full.
    pub nat_flow_limit: AtomicU64,
    /// NAT entries that expired idle.
    pub nat_expired: AtomicU64,
    /// Resets passed from the guest to the far side, and from the far side to the guest.
    pub nat_tcp_resets_from_guest: AtomicU64,
    pub nat_tcp_resets_to_guest: AtomicU64,
    /// Echo replies relayed from beyond the gateway, and echo requests that could not be
    /// sent (no ping sockets in this pod, too many conversations).
    pub nat_icmp_replies: AtomicU64,
    pub nat_icmp_unanswered: AtomicU64,
    /// Requests whose answer would not fit one frame of the link (a DHCPv6 message whose
    /// client identifier leaves no room, an echo larger than the MTU), dropped unanswered.
    pub nat_reply_too_large: AtomicU64,
    /// DHCP and DHCPv6 answers sent.
    pub dhcp_replies: AtomicU64,
    /// Router advertisements sent.
    pub router_adverts: AtomicU64,
    /// TCP connections and UDP conversations in the NAT table now (gauges).
    pub nat_tcp_flows: AtomicU64,
    pub nat_udp_flows: AtomicU64,
    /// UDP datagrams the far side could not take at once (dropped, as a router would).
    pub nat_udp_send_errors: AtomicU64,
}

impl NetMetrics {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
