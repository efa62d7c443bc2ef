//! The link between the NAT and smoltcp: frames for the stack wait in one queue, frames for
//! the guest in another. Every frame for the guest, whoever made it (smoltcp's sockets and
//! its own answers: ARP, neighbour advertisements, echo replies, resets; the NAT's UDP,
//! echo, DHCP and router advertisement replies), goes through [`GuestQueue::push`], which
//! drops and counts what does not fit: a guest that posts no receive buffers holds at most
//! [`TO_GUEST_FRAMES`] frames and [`TO_GUEST_BYTES`] (plus one frame) of podvm's memory.

use std::collections::VecDeque;
use std::sync::Arc;

use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::virtio::net::metrics::NetMetrics as M;

/// Frames for the guest beyond which new ones are dropped (and the stack is asked to wait).
pub const TO_GUEST_FRAMES: usize = 512;
/// Bytes of frames for the guest beyond which new ones are dropped: 64 of the link's
/// largest frames, far more than a guest's receive ring takes in one pass.
pub const TO_GUEST_BYTES: usize = 4 << 20;
/// Guest frames waiting for the stack beyond which new ones are dropped (the stack takes
/// them all on every pass; this bounds one transmit batch).
pub const TO_STACK_FRAMES: usize = 1024;

/// Frames for the guest, bounded in count and bytes.
pub struct GuestQueue {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Where a frame the queue has no room for is built and forgotten (smoltcp builds a
    /// frame before it can be refused).
    scratch: Vec<u8>,
    metrics: Arc<M>,
}

impl GuestQueue {
    pub fn new(metrics: Arc<M>) -> Self {
        Self {
            frames: VecDeque::new(),
            bytes: 0,
            scratch: Vec::new(),
            metrics,
        }
    }

    /// Whether one more frame is taken.
    pub fn has_room(&self) -> bool {
        self.frames.len() < TO_GUEST_FRAMES && self.bytes < TO_GUEST_BYTES
    }

    /// Queues `frame` for the guest; false (dropped and counted in `rx_dropped`, as a full
    /// router queue drops) when the queue is full.
    pub fn push(&mut self, frame: Vec<u8>) -> bool {
        if !self.has_room() {
            M::inc(&self.metrics.rx_dropped);
            return false;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        true
    }

    pub fn front(&self) -> Option<&Vec<u8>> {
        self.frames.front()
    }

    pub fn pop_front(&mut self) -> Option<Vec<u8>> {
        let frame = self.frames.pop_front()?;
        self.bytes -= frame.len();
        Some(frame)
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The two queues smoltcp reads from and writes to.
pub struct Wire {
    to_stack: VecDeque<Vec<u8>>,
    pub to_guest: GuestQueue,
    /// The link MTU (IP packet size).
    pub mtu: usize,
    metrics: Arc<M>,
}

impl Wire {
    pub fn new(mtu: usize, metrics: Arc<M>) -> Self {
        Self {
            to_stack: VecDeque::new(),
            to_guest: GuestQueue::new(metrics.clone()),
            mtu,
            metrics,
        }
    }

    /// Queues a guest frame for the stack; dropped and counted in `tx_dropped` when the
    /// queue is full.
    pub fn push_to_stack(&mut self, frame: Vec<u8>) {
        if self.to_stack.len() >= TO_STACK_FRAMES {
            M::inc(&self.metrics.tx_dropped);
            return;
        }
        self.to_stack.push_back(frame);
    }

    /// Guest frames waiting for the stack.
    pub fn to_stack_len(&self) -> usize {
        self.to_stack.len()
    }
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a> {
    queue: &'a mut GuestQueue,
    max_frame: usize,
}

impl smoltcp::phy::RxToken for Rx {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for Tx<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // A token handed out with a received frame may find the queue full (the stack
        // answers what it receives: ARP, echoes, resets), and an answer may be larger than
        // the link (an IPv6 echo reply): built where it costs nothing, and dropped.
        if !self.queue.has_room() || len > self.max_frame {
            let m = &self.queue.metrics;
            M::inc(if len > self.max_frame {
                &m.nat_reply_too_large
            } else {
                &m.rx_dropped
            });
            let scratch = &mut self.queue.scratch;
            scratch.clear();
            scratch.resize(len, 0);
            return f(scratch);
        }
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.queue.push(frame);
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.to_stack.pop_front()?;
        let max_frame = self.mtu + 14;
        Some((
            Rx(frame),
            Tx {
                queue: &mut self.to_guest,
                max_frame,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        let max_frame = self.mtu + 14;
        self.to_guest.has_room().then_some(Tx {
            queue: &mut self.to_guest,
            max_frame,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        // The frame classifier verified every checksum before a frame reached the stack;
        // the stack computes them on what it sends.
        let mut sums = ChecksumCapabilities::default();
        sums.ipv4 = Checksum::Tx;
        sums.udp = Checksum::Tx;
        sums.tcp = Checksum::Tx;
        sums.icmpv4 = Checksum::Tx;
        sums.icmpv6 = Checksum::Tx;
        caps.checksum = sums;
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::TxToken;

    #[test]
    fn stack_guest_queue_drops_and_counts_beyond_its_frames_and_bytes() {
        let metrics = Arc::new(M::default());
        let mut q = GuestQueue::new(metrics.clone());
        for _ in 0..TO_GUEST_FRAMES {
            assert!(q.push(vec![0; 60]));
        }
        assert!(!q.push(vec![0; 60]));
        assert_eq!(M::get(&metrics.rx_dropped), 1);
        while q.pop_front().is_some() {}
        assert_eq!(q.bytes(), 0);

        let big = 65_534;
        let fits = TO_GUEST_BYTES.div_ceil(big);
        for _ in 0..fits {
            assert!(q.push(vec![0; big]));
        }
        assert!(!q.push(vec![0; 60]));
        assert!(q.bytes() < TO_GUEST_BYTES + big);
        assert_eq!(M::get(&metrics.rx_dropped), 2);
    }

    #[test]
    fn stack_answer_token_respects_the_cap_and_the_mtu() {
        let metrics = Arc::new(M::default());
        let mut wire = Wire::new(1500, metrics.clone());
        for _ in 0..TO_GUEST_FRAMES {
            wire.to_guest.push(vec![0; 60]);
        }
        // The stack received a frame and answers it while the guest takes nothing.
        wire.push_to_stack(vec![0; 60]);
        let (_, tx) = wire.receive(Instant::ZERO).unwrap();
        assert_eq!(tx.consume(42, |b| b.len()), 42);
        assert_eq!(wire.to_guest.len(), TO_GUEST_FRAMES);
        assert_eq!(M::get(&metrics.rx_dropped), 1);
        assert!(wire.transmit(Instant::ZERO).is_none());

        // Room again, but an answer larger than the link.
        wire.to_guest.pop_front();
        wire.push_to_stack(vec![0; 60]);
        let (_, tx) = wire.receive(Instant::ZERO).unwrap();
        tx.consume(1515, |_| ());
        assert_eq!(wire.to_guest.len(), TO_GUEST_FRAMES - 1);
        assert_eq!(M::get(&metrics.nat_reply_too_large), 1);
    }

    #[test]
    fn stack_queue_for_the_stack_is_bounded() {
        let metrics = Arc::new(M::default());
        let mut wire = Wire::new(1500, metrics.clone());
        for _ in 0..TO_STACK_FRAMES + 3 {
            wire.push_to_stack(vec![0; 60]);
        }
        assert_eq!(wire.to_stack_len(), TO_STACK_FRAMES);
        assert_eq!(M::get(&metrics.tx_dropped), 3);
    }
}
