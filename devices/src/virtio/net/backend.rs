//! What the virtio-net device needs from a backend: take the guest's frames, hand it frames
//! for the guest, and say through a file descriptor when it has work.

use std::os::fd::RawFd;

/// A network backend. Frames are whole Ethernet frames without the virtio-net header;
/// frames from the guest have complete checksums.
pub trait NetBackend: Send {
    /// Whether frames to and from this backend carry the 12-byte virtio-net header (so
    /// checksum and segmentation offloads pass through).
    fn vnet_hdr(&self) -> bool {
        false
    }
    /// The features the driver accepted (a backend with [`vnet_hdr`](Self::vnet_hdr) sets
    /// up the offloads the guest can take).
    fn set_guest_features(&mut self, _acked: u64) {}
    /// The tap a vhost-net datapath could serve instead of this backend, if it is one.
    fn tap_for_vhost(&self) -> Option<&std::fs::File> {
        None
    }
    /// vhost-net took over the data path (`true`: stop reading and writing frames) or gave
    /// it back (`false`).
    fn set_external_datapath(&mut self, _on: bool) {}
    /// A frame the guest transmitted (behind its virtio-net header when
    /// [`vnet_hdr`](Self::vnet_hdr)). The backend must not block.
    fn send(&mut self, frame: &[u8]);
    /// The guest finished a batch of transmissions: process what `send` queued.
    fn flush(&mut self) {}
    /// The next frame for the guest, if one is waiting (behind a virtio-net header when
    /// [`vnet_hdr`](Self::vnet_hdr)).
    fn rx_peek(&mut self) -> Option<&[u8]>;
    /// The frame [`rx_peek`](Self::rx_peek) returned was delivered (or dropped).
    fn rx_pop(&mut self);
    /// The guest has taken frames: a backend that stopped producing them when its queue was
    /// full may go on.
    fn rx_room(&mut self) {}
    /// A migration landed here: tell the network that `mac` is now behind this backend
    /// (a tap sends RARP frames, as a physical NIC's driver would after a move). A NAT
    /// backend has nothing to tell: the guest's network lives inside podvm.
    fn announce(&mut self, _mac: [u8; 6]) {}
    /// A descriptor that becomes readable when [`process`](Self::process) has work.
    fn event_fd(&self) -> RawFd;
    /// Host-side work: sockets, timers.
    fn process(&mut self);
}
