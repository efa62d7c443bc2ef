//! Requests from the guest to end the VM.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Why the guest asked the VM to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 pulse, ACPI reset register or triple fault).
    Reset,
    /// The guest entered ACPI S5 (power off).
    PowerOff,
    /// A vCPU failed in a way the guest cannot recover from (logged where it happened).
    Error,
    /// The VMM stopped the guest: it did not power off within the shutdown timeout after the
    /// power button, or a second termination signal asked for an immediate stop.
    Stopped,
    /// The guest moved to another podvm (live migration); it runs there now.
    Migrated,
}

/// Shared between the devices that can end the VM and the thread that waits for it.
///
/// The first request wins: a guest that powers off and then triple-faults on its way down is
/// reported as powered off.
#[derive(Debug, Clone)]
pub struct ExitRequest {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    reason: AtomicU8,
    evt: EventFd,
}

const NONE: u8 = 0;
const RESET: u8 = 1;
const POWER_OFF: u8 = 2;
const ERROR: u8 = 3;
const STOPPED: u8 = 4;
const MIGRATED: u8 = 5;

impl ExitRequest {
    /// A request not yet made.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                reason: AtomicU8::new(NONE),
                evt: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
        })
    }

    /// Records `reason` (if none was recorded yet) and wakes the waiter.
    pub fn request(&self, reason: ExitReason) {
        let code = match reason {
            ExitReason::Reset => RESET,
            ExitReason::PowerOff => POWER_OFF,
            ExitReason::Error => ERROR,
            ExitReason::Stopped => STOPPED,
            ExitReason::Migrated => MIGRATED,
        };
        let _ = self
            .inner
            .reason
            .compare_exchange(NONE, code, Ordering::SeqCst, Ordering::SeqCst);
        // A full eventfd counter already means "woken"; nothing is lost if this fails.
        let _ = self.inner.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        match self.inner.reason.load(Ordering::SeqCst) {
            RESET => Some(ExitReason::Reset),
            POWER_OFF => Some(ExitReason::PowerOff),
            ERROR => Some(ExitReason::Error),
            STOPPED => Some(ExitReason::Stopped),
            MIGRATED => Some(ExitReason::Migrated),
            _ => None,
        }
    }

    /// The eventfd that becomes readable on a request.
    pub fn eventfd(&self) -> &EventFd {
        &self.inner.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_request_wins() {
        let req = ExitRequest::new().unwrap();
        assert_eq!(req.reason(), None);
        req.request(ExitReason::PowerOff);
        req.clone().request(ExitReason::Reset);
        assert_eq!(req.reason(), Some(ExitReason::PowerOff));
        assert_eq!(req.eventfd().read().unwrap(), 2);
    }
}
