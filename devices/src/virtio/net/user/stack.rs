//! The link between the NAT and smoltcp: frames for the stack wait in one queue, frames the
//! stack (and the rest of the NAT) produce for the guest in another.

use std::collections::VecDeque;

use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Frames for the guest beyond which the stack is asked to wait (the guest is not taking
/// them); the NAT's own replies are few and always queued.
pub const TO_GUEST_HIGH: usize = 512;

/// The two queues smoltcp reads from and writes to.
pub struct Wire {
    pub to_stack: VecDeque<Vec<u8>>,
    pub to_guest: VecDeque<Vec<u8>>,
    /// The link MTU (IP packet size).
    pub mtu: usize,
}

impl Wire {
    pub fn new(mtu: usize) -> Self {
        Self {
            to_stack: VecDeque::new(),
            to_guest: VecDeque::new(),
            mtu,
        }
    }
}

pub struct Rx(Vec<u8>);
pub struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

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
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.push_back(frame);
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.to_stack.pop_front()?;
        Some((Rx(frame), Tx(&mut self.to_guest)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Tx<'_>> {
        (self.to_guest.len() < TO_GUEST_HIGH).then_some(Tx(&mut self.to_guest))
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
