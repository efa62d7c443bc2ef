//! Device models for podvm.
//!
//! Every device here is a plain state machine behind the [`bus::BusDevice`] trait: it owns no
//! vCPU, knows nothing about KVM and is driven by the VMM's port-I/O and MMIO buses. Interrupts
//! leave a device through [`irq::IrqTrigger`] (an eventfd the VMM registers as a KVM irqfd), and
//! requests to end the VM (guest reset, guest power-off) through [`exit::ExitRequest`].

pub mod acpi_pm;
pub mod bus;
pub mod exit;
pub mod fuzz_replay;
pub mod irq;
pub mod legacy;
pub mod log_limit;
pub mod virtio;

/// Guest memory as devices see it: every write a device makes through it marks the pages
/// dirty in a bitmap, which live migration sends along with the pages KVM logged for the
/// guest's own writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
