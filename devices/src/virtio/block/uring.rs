//! The asynchronous I/O engine: reads, writes and flushes go to an io_uring, so up to a
//! queue's worth of requests are in flight at once; completions come back through an eventfd
//! the event loop watches.
//!
//! Safety model: a submitted read or write points the kernel at guest memory through an
//! iovec array. The array lives in the in-flight slot until its completion is reaped, and the
//! guest memory mapping outlives every in-flight operation because the device drains the
//! ring ([`UringEngine::drain`]) before it lets go of the memory (on reset and on drop).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{opcode, types, IoUring};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// Where an operation's answer goes: its chain head and status byte, and for a read the
/// guest buffers the kernel writes (marked dirty on completion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub head: u16,
    pub status: GuestAddress,
    pub written: Vec<(GuestAddress, u32)>,
}

/// What an in-flight operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
}

/// A finished operation, for the device to answer.
#[derive(Debug)]
pub struct Completion {
    pub head: u16,
    pub status: GuestAddress,
    pub kind: OpKind,
    /// Bytes the operation had to move (0 for flush).
    pub expected: u64,
    /// The kernel's result: bytes moved, or a negative errno.
    pub result: i32,
    /// For a read: the guest buffers the kernel wrote, which the device marks dirty (the
    /// kernel's writes bypass the guest memory bitmap).
    pub written: Vec<(GuestAddress, u32)>,
}

struct InFlight {
    head: u16,
    status: GuestAddress,
    kind: OpKind,
    expected: u64,
    written: Vec<(GuestAddress, u32)>,
    // Read by the kernel until the completion is reaped; never touched by us meanwhile.
    _iovecs: Box<[libc::iovec]>,
}

/// An io_uring with a fixed number of in-flight slots.
pub struct UringEngine {
    ring: IoUring,
    eventfd: EventFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<u16>,
}

// SAFETY: the raw iovec pointers in the in-flight slots point into guest memory, which is
// shared with the guest and valid from any thread; the engine is only ever used by one
// thread at a time (it lives inside the device's mutex).
unsafe impl Send for UringEngine {}

impl UringEngine {
    /// A ring for `depth` operations in flight; fails where io_uring is missing or forbidden
    /// (old kernel, `kernel.io_uring_disabled`, seccomp), and the caller falls back to
    /// synchronous I/O.
    ///
    /// The ring is restricted (`IORING_REGISTER_RESTRICTIONS`) to what the engine submits:
    /// vectored reads and writes and fsync, no SQE flags, no registration once it runs. A
    /// ring is a way around seccomp (an `openat` or `connect` SQE is not a system call), so
    /// the threads allowed `io_uring_enter` can do through it only what their filters allow
    /// anyway.
    pub fn new(depth: u16) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(u32::from(depth))?;
        let eventfd = EventFd::new(libc::EFD_NONBLOCK)?;
        let submitter = ring.submitter();
        submitter.register_eventfd(eventfd.as_raw_fd())?;
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(0),
        ])?;
        submitter.register_enable_rings()?;
        Ok(Self {
            ring,
            eventfd,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
        })
    }

    /// Becomes readable when completions are waiting.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Whether another operation can be queued.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Operations submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues a vectored read or write of `iovecs` at `offset` of `fd`.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that stays mapped, and that nothing else relies on
    /// the contents of (for reads), until this operation's completion has been reaped.
    pub unsafe fn queue_rw(
        &mut self,
        fd: RawFd,
        kind: OpKind,
        offset: u64,
        iovecs: Box<[libc::iovec]>,
        dsync: bool,
        answer: Answer,
    ) -> io::Result<()> {
        let expected = iovecs.iter().map(|v| v.iov_len as u64).sum();
        let count = u32::try_from(iovecs.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let entry = match kind {
            OpKind::Read => opcode::Readv::new(types::Fd(fd), iovecs.as_ptr(), count)
                .offset(offset)
                .build(),
            OpKind::Write => opcode::Writev::new(types::Fd(fd), iovecs.as_ptr(), count)
                .offset(offset)
                .rw_flags(flags)
                .build(),
            OpKind::Flush => return Err(io::ErrorKind::InvalidInput.into()),
        };
        let op = InFlight {
            head: answer.head,
            status: answer.status,
            kind,
            expected,
            written: answer.written,
            _iovecs: iovecs,
        };
        // The iovec array moves into the slot (a boxed slice: its address stays) until the
        // completion is reaped, and the caller keeps the buffers valid as long.
        // SAFETY: so everything `entry` points at outlives the operation.
        unsafe { self.push(entry, op) }
    }

    /// Queues an fdatasync of `fd`.
    pub fn queue_flush(&mut self, fd: RawFd, answer: Answer) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        let op = InFlight {
            head: answer.head,
            status: answer.status,
            kind: OpKind::Flush,
            expected: 0,
            written: Vec::new(),
            _iovecs: Box::new([]),
        };
        // SAFETY: an fsync carries no buffers.
        unsafe { self.push(entry, op) }
    }

    /// # Safety
    ///
    /// Whatever memory `entry` points at must stay valid until its completion is reaped.
    unsafe fn push(&mut self, entry: io_uring::squeue::Entry, op: InFlight) -> io::Result<()> {
        let slot = self
            .free
            .pop()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBUSY))?;
        let entry = entry.user_data(u64::from(slot));
        // SAFETY: forwarded from the caller's contract; the slot keeps `op` (and its iovecs)
        // alive until the completion with this user_data is reaped.
        let first = unsafe { self.ring.submission().push(&entry) };
        let pushed = match first {
            Ok(()) => Ok(()),
            // The submission queue has as many entries as there are slots, so it can only be
            // full if earlier entries were never submitted; submit them and retry once.
            Err(_) => self.ring.submit().and_then(|_| {
                // SAFETY: as above.
                unsafe { self.ring.submission().push(&entry) }
                    .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))
            }),
        };
        self.occupy(slot, op, pushed)
    }

    /// Puts `op` in `slot` if its entry was `pushed`; otherwise the slot is free again (a
    /// failed push or submit must not cost a slot: the engine would run out of them).
    fn occupy(&mut self, slot: u16, op: InFlight, pushed: io::Result<()>) -> io::Result<()> {
        match pushed {
            Ok(()) => {
                self.slots[usize::from(slot)] = Some(op);
                Ok(())
            }
            Err(e) => {
                self.free.push(slot);
                Err(e)
            }
        }
    }

    /// Hands the queued operations to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(|_| ())
    }

    /// Collects finished operations.
    pub fn reap(&mut self) -> Vec<Completion> {
        let _ = self.eventfd.read();
        let mut done = Vec::new();
        for cqe in self.ring.completion() {
            let Ok(slot) = u16::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(op) = self.slots.get_mut(usize::from(slot)).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            done.push(Completion {
                head: op.head,
                status: op.status,
                kind: op.kind,
                expected: op.expected,
                result: cqe.result(),
                written: op.written,
            });
        }
        done
    }

    /// Waits until nothing is in flight; returns what completed (the caller may drop it).
    pub fn drain(&mut self) -> Vec<Completion> {
        let mut done = Vec::new();
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!(error = %e, "io_uring wait failed while draining");
                    break;
                }
            }
            done.extend(self.reap());
        }
        done
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flush_op() -> InFlight {
        InFlight {
            head: 0,
            status: GuestAddress(0),
            kind: OpKind::Flush,
            expected: 0,
            written: Vec::new(),
            _iovecs: Box::new([]),
        }
    }

    #[test]
    fn uring_failed_push_or_submit_gives_its_slot_back() {
        let mut engine = UringEngine::new(4).unwrap();
        for _ in 0..10 {
            let slot = engine.free.pop().unwrap();
            let failed = Err(io::Error::from_raw_os_error(libc::EAGAIN));
            assert!(engine.occupy(slot, flush_op(), failed).is_err());
        }
        assert!(engine.has_room());
        assert_eq!(engine.in_flight(), 0);
    }

    #[test]
    fn uring_ring_refuses_operations_it_was_not_restricted_to() {
        let mut engine = UringEngine::new(4).unwrap();
        // An openat through the ring: what seccomp would refuse as a system call.
        let path = c"/etc/hostname";
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(7);
        // SAFETY: `path` is a static C string; nothing else is pointed at.
        unsafe { engine.ring.submission().push(&open) }.unwrap();
        engine.ring.submit_and_wait(1).unwrap();
        let cqe = engine.ring.completion().next().unwrap();
        assert_eq!(cqe.user_data(), 7);
        assert_eq!(cqe.result(), -libc::EACCES, "openat ran through the ring");
        // What the engine uses still works.
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let answer = Answer {
            head: 1,
            status: GuestAddress(0),
            written: Vec::new(),
        };
        engine.queue_flush(file.as_raw_fd(), answer).unwrap();
        let done = engine.drain();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].result, 0);
    }
}
