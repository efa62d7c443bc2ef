//! Virtio devices over the virtio-mmio transport (virtio 1.x, "modern" only).
//!
//! A device implements [`VirtioDevice`]: its features, its config space, its queues' sizes and
//! notification eventfds, and what to do when the driver activates it. [`mmio::MmioTransport`]
//! runs the register interface on the vCPU threads; the device does its work on the event
//! loop, which it joins as an event-manager subscriber once the driver sets DRIVER_OK.

pub mod block;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_util;
pub mod mmio;
#[cfg(any(test, feature = "fuzzing"))]
pub mod mmio_fuzzing;
pub mod net;
pub mod rng;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::irq::IrqTrigger;
use crate::GuestMemoryMmap;

/// virtio 1.x device IDs.
pub const TYPE_BLOCK: u32 = 2;

/// VIRTIO_F_VERSION_1: the device is a modern (1.x) device.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt status bit: a queue was used.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A virtio device, independent of the transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// One eventfd per queue, signalled when the driver notifies it (KVM ioeventfds).
    fn queue_events(&self) -> &[EventFd];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start serving `queues`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: std::sync::Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving queues and forget what activate set up.
    fn reset(&mut self);
    /// Migration, with the vCPUs paused: finish the work in flight (every request taken
    /// from a queue is answered in its used ring), give back buffers taken but not used,
    /// and touch neither guest memory nor the backend until [`VirtioDevice::thaw`].
    fn freeze(&mut self);
    /// Undoes [`VirtioDevice::freeze`] (a migration failed): serves what arrived meanwhile.
    fn thaw(&mut self);
    /// The state of the queues an active device serves (empty when not active).
    fn queue_states(&self) -> Vec<QueueState>;
    /// A migration landed here and the guest is about to run: a NIC announces its MAC.
    fn announce(&mut self) {}
    /// A migration starts (`true`) or failed (`false`): a device whose queues the host
    /// kernel serves (vhost-net) takes them back, since the kernel's writes into guest
    /// memory would escape the dirty log, and hands them over again afterwards. Done
    /// asynchronously; see [`VirtioDevice::held_for_migration`].
    fn hold_for_migration(&mut self, _held: bool) {}
    /// Nothing outside podvm writes into guest memory for this device any more.
    fn held_for_migration(&self) -> bool {
        true
    }
}

/// Copies what `data` asks for of a device's configuration `space` at `offset`; bytes
/// beyond the space read as zero.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(src) = usize::try_from(offset)
        .ok()
        .and_then(|start| space.get(start..))
    else {
        return;
    };
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

/// Activation failed; the transport reports DEVICE_NEEDS_RESET to the driver.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot signal the event loop: {0}")]
    Signal(#[source] io::Error),
}

/// The interrupt line and status register shared by a device and its transport.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: IrqTrigger,
}

impl Interrupt {
    /// Wraps `irq`, with no interrupt pending.
    pub fn new(irq: IrqTrigger) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Tells the driver a queue has new used buffers.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(INT_VRING)
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.eventfd().write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the bits the driver has handled.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the pending bits to what a migrated device had, and raises the line again if
    /// any is set (an interrupt in flight at the handover must not be lost; a spurious one
    /// is harmless).
    pub fn restore(&self, bits: u32) -> io::Result<()> {
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0 {
            self.irq.eventfd().write(1)?;
        }
        Ok(())
    }

    /// Clears all pending bits (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd to register as a KVM irqfd.
    pub fn eventfd(&self) -> &EventFd {
        self.irq.eventfd()
    }
}
