//! Device models for podvm.
//!
//! Every device here is a plain state machine behind the [`bus::BusDevice`] trait: it owns no
//! vCPU, knows nothing about KVM and is driven by the VMM's port-I/O and MMIO buses. Interrupts
//! leave a device through [`irq::IrqTrigger`] (an eventfd the VMM registers as a KVM irqfd), and
//! requests to end the VM (guest reset, guest power-off) through [`exit::ExitRequest`].

pub mod acpi_pm;
pub mod bus;
pub mod exit;
pub mod irq;
pub mod legacy;
pub mod virtio;

/// Guest memory as devices see it. Dirty-page tracking for migration changes this type (and
/// only this type) to one with a bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
