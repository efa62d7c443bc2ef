//! Interrupt delivery from a device model to the VMM.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

/// An edge interrupt line backed by an eventfd; the VMM registers the eventfd with KVM as an
/// irqfd for the line's GSI, so a trigger never goes through a vCPU exit.
#[derive(Debug)]
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    /// A new, unconnected line.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    /// Another handle on the same line.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// The eventfd to hand to KVM_IRQFD.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl AsRawFd for IrqTrigger {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl vm_superio::Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
