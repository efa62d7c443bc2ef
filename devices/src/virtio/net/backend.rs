//! What the virtio-net device needs from a backend: take the guest's frames, hand it frames
//! for the guest, and say through a file descriptor when it has work.

use std::os::fd::RawFd;

/// A network backend. Frames are whole Ethernet frames without the virtio-net header;
/// frames from the guest have complete checksums.
pub trait NetBackend: Send {
    /// A frame the guest transmitted. The backend must not block.
    fn send(&mut self, frame: &[u8]);
    /// The guest finished a batch of transmissions: process what `send` queued.
    fn flush(&mut self) {}
    /// The next frame for the guest, if one is waiting.
    fn rx_peek(&mut self) -> Option<&[u8]>;
    /// The frame [`rx_peek`](Self::rx_peek) returned was delivered (or dropped).
    fn rx_pop(&mut self);
    /// The guest has taken frames: a backend that stopped producing them when its queue was
    /// full may go on.
    fn rx_room(&mut self) {}
    /// A descriptor that becomes readable when [`process`](Self::process) has work.
    fn event_fd(&self) -> RawFd;
    /// Host-side work: sockets, timers.
    fn process(&mut self);
}
