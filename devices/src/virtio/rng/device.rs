//! The virtio-rng device: one request queue whose device-writable buffers it fills with
//! bytes from the host's `getrandom(2)`. No configuration space; the only features are
//! VIRTIO_F_VERSION_1 and VIRTIO_RING_F_INDIRECT_DESC.
//!
//! The guest is not trusted. A chain that is not a list of device-writable buffers lying in
//! guest memory (a readable descriptor, a buffer outside memory, a loop, a `next` outside
//! the table, too many descriptors) is answered with 0 bytes and counted; one request gets
//! at most [`MAX_REQUEST_BYTES`], and one pass over the queue at most [`PASS_BUDGET`] worth
//! of work before it yields the event loop to the other devices. Rings that cannot be trusted
//! (an avail index more than a queue size ahead) break the queue: that is logged and counted
//! once, and the device serves nothing more until the driver resets it.

use std::io;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::metrics::RngMetrics as M;
use crate::virtio::{ActivateError, Interrupt, VirtioDevice, F_INDIRECT_DESC, F_VERSION_1};
use crate::GuestMemoryMmap;

/// virtio device ID of an entropy source.
pub const TYPE_RNG: u32 = 4;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes one request is given, however large its buffers: one `getrandom(2)` of this
/// size takes tens of microseconds, so no request holds up the event loop.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Most descriptors one chain may have (direct or through an indirect table).
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Work one pass over the queue may do before it yields the event loop: each chain costs
/// the bytes it was given, and at least [`CHAIN_COST`] (so 1 MiB of entropy, or a queue's
/// worth of small or refused chains).
pub const PASS_BUDGET: u64 = 1 << 20;
/// The least a chain costs of [`PASS_BUDGET`], whatever it was given.
pub const CHAIN_COST: u64 = 4096;

/// Fills a buffer with random bytes, entirely, or fails.
pub type EntropySource = Box<dyn FnMut(&mut [u8]) -> io::Result<()> + Send>;

/// Fills `buf` from the host's `getrandom(2)` without blocking: before the host's entropy
/// pool is initialized it fails with `EAGAIN` rather than stall the event loop.
pub fn host_entropy(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        let (ptr, len) = (rest.as_mut_ptr(), rest.len());
        // SAFETY: getrandom writes at most `len` bytes at `ptr`, the start of `rest`, a live,
        // exclusively borrowed slice of exactly that length.
        let n = unsafe { libc::getrandom(ptr.cast(), len, libc::GRND_NONBLOCK) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::other("getrandom returned no bytes"));
        }
        filled += n as usize;
    }
    Ok(())
}

/// Why a chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "descriptor {index} is device-readable; every virtio-rng buffer must be device-writable"
    )]
    Readable { index: usize },
    #[error("descriptor {index} ({len} bytes at {addr:#x}) does not lie in guest memory")]
    OutsideMemory { index: usize, addr: u64, len: u32 },
    #[error("the chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    #[error("the chain breaks off: its last descriptor has a next one that cannot be read (a loop, an index outside the table, a bad indirect table, or more than 4 GiB in all)")]
    BrokenOff,
    #[error("the chain has no descriptor")]
    Empty,
}

/// The buffers of `chain`, checked: each one device-writable and inside guest memory, at
/// most [`MAX_DESCRIPTORS`], and the chain ending where its last descriptor says it ends.
/// Pure: reads the descriptors, writes nothing.
pub fn writable_buffers(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<(GuestAddress, u32)>, ChainError> {
    let mut buffers = Vec::new();
    let mut last: Option<Descriptor> = None;
    // The queue's walk stops by itself after a queue size of descriptors (a loop), at an
    // unreadable descriptor or a bad indirect table, without saying so: a last descriptor
    // that still has NEXT set tells.
    for (index, desc) in chain.take(MAX_DESCRIPTORS + 1).enumerate() {
        if index == MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        if !desc.is_write_only() {
            return Err(ChainError::Readable { index });
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err(ChainError::OutsideMemory {
                index,
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        buffers.push((desc.addr(), desc.len()));
        last = Some(desc);
    }
    match last {
        None => Err(ChainError::Empty),
        Some(desc) if desc.has_next() => Err(ChainError::BrokenOff),
        Some(_) => Ok(buffers),
    }
}

/// How a pass over the queue ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueStatus {
    /// Everything the driver made available was served; notifications are on again.
    Drained,
    /// The pass spent its [`PASS_BUDGET`] with chains left: serve the queue again soon.
    BudgetSpent,
    /// The rings cannot be trusted (see `process_queue`): the device serves the queue no
    /// more until the driver resets it. Every pass until then ends so, at once.
    Broken,
}

pub(crate) struct Active {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub interrupt: Arc<Interrupt>,
}

/// The virtio-rng device.
pub struct Rng {
    acked_features: u64,
    queue_events: Vec<EventFd>,
    pub(crate) activate_event: EventFd,
    pub(crate) active: Option<Active>,
    /// Whether the event loop already watches the queue eventfd.
    pub(crate) queue_watched: bool,
    /// Frozen for a migration: the queue is not served.
    frozen: bool,
    /// The driver broke the queue's rings: the queue is not served until a reset. (The
    /// transport has no way to raise DEVICE_NEEDS_RESET after activation, and virtio-blk
    /// and virtio-net do not either: the driver finds out from requests left unanswered.)
    /// Not carried by a migration: a destination finds rings still broken on its first pass.
    broken: bool,
    /// The broken-queue line (a guest can break the queue again after every reset).
    broken_log: crate::log_limit::LogLimit,
    source: EntropySource,
    buf: Box<[u8]>,
    metrics: Arc<M>,
}

impl Rng {
    /// A device serving bytes from the host's `getrandom(2)`.
    pub fn new() -> io::Result<Self> {
        Self::with_source(Box::new(host_entropy))
    }

    /// A device serving bytes from `source`.
    pub fn with_source(source: EntropySource) -> io::Result<Self> {
        Ok(Self {
            acked_features: 0,
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK)?],
            activate_event: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
            queue_watched: false,
            frozen: false,
            broken: false,
            broken_log: Default::default(),
            source,
            buf: vec![0u8; MAX_REQUEST_BYTES].into_boxed_slice(),
            metrics: Arc::new(M::default()),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<M> {
        self.metrics.clone()
    }

    /// Serves the chains the driver has made available, within [`PASS_BUDGET`], then
    /// interrupts the guest if it asks for it and a used entry was added. A queue found
    /// broken is logged and counted here, once, and not served again until a reset.
    pub(crate) fn process_queue(&mut self) -> QueueStatus {
        if self.broken {
            return QueueStatus::Broken;
        }
        if self.frozen {
            return QueueStatus::Drained;
        }
        let Some(mut active) = self.active.take() else {
            return QueueStatus::Drained;
        };
        let mut used_any = false;
        let mut empty_passes = 0;
        let mut budget = PASS_BUDGET;
        let status = loop {
            if active.queue.disable_notification(&active.mem).is_err() {
                break QueueStatus::Broken;
            }
            let mut popped = false;
            while budget > 0 {
                let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let written = self.serve(&active.mem, chain);
                budget = budget.saturating_sub(u64::from(written).max(CHAIN_COST));
                // Fails for a head outside the table, whose chain was refused (and counted)
                // already: there is no used entry to give it, nor an interrupt for it.
                match active.queue.add_used(&active.mem, head, written) {
                    Ok(()) => used_any = true,
                    Err(e) => {
                        tracing::debug!(head, error = ?e, "no used entry for a virtio-rng chain")
                    }
                }
            }
            if budget == 0 {
                // Notifications stay off: the event loop comes back for the rest.
                break QueueStatus::BudgetSpent;
            }
            match active.queue.enable_notification(&active.mem) {
                Ok(true) => {
                    // More arrived while notifications were off, or the ring claims entries
                    // that can never be popped (avail.idx more than a queue size ahead): one
                    // empty pass can be a race with the driver publishing, two cannot.
                    empty_passes = if popped { 0 } else { empty_passes + 1 };
                    if empty_passes == 2 {
                        break QueueStatus::Broken;
                    }
                }
                Ok(false) => break QueueStatus::Drained,
                Err(_) => break QueueStatus::Broken,
            }
        };
        if used_any && active.queue.needs_notification(&active.mem).unwrap_or(true) {
            M::inc(&self.metrics.interrupts);
            if let Err(e) = active.interrupt.signal_used_queue() {
                tracing::warn!(error = %e, "virtio-rng interrupt failed");
            }
        }
        self.active = Some(active);
        if status == QueueStatus::Broken {
            // Chains served before the rings broke got their used entries and interrupt.
            self.broken = true;
            M::inc(&self.metrics.broken_queues);
            crate::warn_limited!(
                self.broken_log,
                "virtio-rng queue is broken; it is not served until the driver resets the device"
            );
        }
        status
    }

    /// Fills one chain's buffers; returns the bytes written (0 for a refused chain).
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let buffers = match writable_buffers(mem, chain) {
            Ok(buffers) => buffers,
            Err(e) => {
                M::inc(&self.metrics.bad_chains);
                tracing::debug!(error = %e, "invalid virtio-rng request");
                return 0;
            }
        };
        let total: u64 = buffers.iter().map(|&(_, len)| u64::from(len)).sum();
        let n = total.min(MAX_REQUEST_BYTES as u64) as usize;
        let random = &mut self.buf[..n];
        if let Err(e) = (self.source)(random) {
            if M::get(&self.metrics.entropy_errors) == 0 {
                tracing::warn!(error = %e, "getrandom failed; virtio-rng requests get no bytes until it works");
            }
            M::inc(&self.metrics.entropy_errors);
            return 0;
        }
        let mut written = 0;
        let mut failed = false;
        for (addr, len) in buffers {
            if written == n {
                break;
            }
            let take = (len as usize).min(n - written);
            // Through the guest memory object, so the pages are marked dirty for migration.
            if mem
                .write_slice(&random[written..written + take], addr)
                .is_err()
            {
                // Unreachable today: each buffer was checked above to lie in guest memory
                // (`take` is at most its length), and the device's memory object is a fixed
                // set of regions, never shrunk while it holds it. Were it reached, the chain
                // would count once, as a bad one, keeping the bytes already written.
                failed = true;
                break;
            }
            written += take;
        }
        if failed {
            M::inc(&self.metrics.bad_chains);
        } else {
            M::inc(&self.metrics.requests);
        }
        M::add(&self.metrics.bytes, written as u64);
        written as u32
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        // virtio-queue follows indirect tables whether the feature was negotiated or not,
        // and `writable_buffers` checks what it finds there like any descriptor: offered,
        // as virtio-blk and virtio-net offer it.
        F_VERSION_1 | F_INDIRECT_DESC
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        crate::virtio::read_config_space(&[], offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        self.activate_event.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.broken = false;
    }

    fn freeze(&mut self) {
        // Every chain is answered within the pass that took it: nothing is in flight.
        self.frozen = true;
    }

    fn thaw(&mut self) {
        self.frozen = false;
        // The event loop serves what the driver queued meanwhile, on its own thread.
        if let Err(e) = self.activate_event.write(1) {
            tracing::error!(error = %e, "cannot wake the virtio-rng event handler");
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqTrigger;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::VirtqUsedElem, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::Address;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
    /// Guest memory of the tests: the rings at 0, buffers from BUF on.
    const MEM_SIZE: u64 = 4 << 20;
    const SIZE: u16 = 32;
    const BUF: u64 = 0x10_0000;

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    struct Setup {
        mem: GuestMemoryMmap,
        rng: Rng,
        used_ring: GuestAddress,
        interrupt: Arc<Interrupt>,
        /// The queue as the driver set it up, to activate the device with again after a
        /// reset.
        fresh: virtio_queue::QueueState,
    }

    impl Setup {
        /// A device, activated on a mock queue of SIZE entries at address 0 holding `descs`
        /// (table indices 0, 1, ...) with `heads` made available.
        fn new(rng: Rng, descs: &[RawDescriptor], heads: &[u16]) -> Self {
            let mem =
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
            let vq = MockSplitQueue::create(&mem, GuestAddress(0), SIZE);
            for (i, d) in descs.iter().enumerate() {
                vq.desc_table().store(i as u16, *d).unwrap();
            }
            for (i, &head) in heads.iter().enumerate() {
                vq.avail().ring().ref_at(i).unwrap().store(head);
            }
            vq.avail().idx().store(heads.len() as u16);
            let queue: Queue = vq.create_queue().unwrap();
            let fresh = queue.state();
            let used_ring = vq.used_addr();
            let mut rng = rng;
            rng.set_acked_features(F_VERSION_1 | F_INDIRECT_DESC);
            let interrupt = Arc::new(Interrupt::new(IrqTrigger::new().unwrap()));
            rng.activate(mem.clone(), interrupt.clone(), vec![queue])
                .unwrap();
            Self {
                mem,
                rng,
                used_ring,
                interrupt,
                fresh,
            }
        }

        /// The driver resets the device and sets the same queue up again (its rings as they
        /// are in memory), as after a reset.
        fn reset_and_reactivate(&mut self) {
            self.rng.reset();
            self.interrupt.clear();
            self.rng.set_acked_features(F_VERSION_1 | F_INDIRECT_DESC);
            let queue = Queue::try_from(self.fresh).unwrap();
            self.rng
                .activate(self.mem.clone(), self.interrupt.clone(), vec![queue])
                .unwrap();
        }

        /// Writes the avail ring's idx (the mock driver lays the avail ring out right after
        /// the descriptor table).
        fn set_avail_idx(&self, idx: u16) {
            let at = GuestAddress(16 * u64::from(SIZE) + 2);
            self.mem.write_obj(idx.to_le(), at).unwrap();
        }

        fn host(descs: &[RawDescriptor], heads: &[u16]) -> Self {
            Self::new(Rng::new().unwrap(), descs, heads)
        }

        /// The used ring's (head, bytes) entries. (Read from memory: a second mock queue
        /// would reset the rings.)
        fn used(&self) -> Vec<(u32, u32)> {
            let idx: u16 = self.mem.read_obj(self.used_ring.unchecked_add(2)).unwrap();
            (0..u16::from_le(idx))
                .map(|i| {
                    let at = self.used_ring.unchecked_add(4 + 8 * u64::from(i % SIZE));
                    let e: VirtqUsedElem = self.mem.read_obj(at).unwrap();
                    (e.id(), e.len())
                })
                .collect()
        }

        fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut out = vec![0u8; len];
            self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
            out
        }

        fn counter(&self, f: impl Fn(&M) -> &std::sync::atomic::AtomicU64) -> u64 {
            M::get(f(&self.rng.metrics))
        }
    }

    fn random_looking(bytes: &[u8]) -> bool {
        // 64 or more bytes from getrandom are all zero with probability 2^-512.
        bytes.iter().any(|&b| b != 0)
    }

    #[test]
    fn rng_device_is_type_4_offering_version_1_and_indirect_descriptors_and_no_config_space() {
        let mut rng = Rng::new().unwrap();
        assert_eq!(rng.device_type(), 4);
        // It follows indirect tables (virtio-queue walks them whether negotiated or not),
        // so it says so, as virtio-blk and virtio-net do.
        assert_eq!(rng.avail_features(), F_VERSION_1 | F_INDIRECT_DESC);
        rng.set_acked_features(F_VERSION_1 | F_INDIRECT_DESC | crate::virtio::F_EVENT_IDX);
        assert_eq!(rng.acked_features, F_VERSION_1 | F_INDIRECT_DESC);
        assert_eq!(rng.queue_max_sizes(), &[QUEUE_SIZE]);
        let mut data = [0xffu8; 8];
        rng.read_config(0, &mut data);
        assert_eq!(data, [0; 8]);
    }

    #[test]
    fn rng_fills_every_writable_buffer_of_a_chain() {
        let descs = [
            raw(BUF, 100, WRITE | NEXT, 1),
            raw(BUF + 0x1000, 200, WRITE, 0),
        ];
        let mut s = Setup::host(&descs, &[0]);
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, 300)]);
        assert!(random_looking(&s.bytes(BUF, 100)));
        assert!(random_looking(&s.bytes(BUF + 0x1000, 200)));
        // Nothing past either buffer.
        assert_eq!(s.bytes(BUF + 100, 16), vec![0; 16]);
        assert_eq!(s.bytes(BUF + 0x1000 + 200, 16), vec![0; 16]);
        assert_eq!(s.counter(|m| &m.requests), 1);
        assert_eq!(s.counter(|m| &m.bytes), 300);
        assert_eq!(s.counter(|m| &m.bad_chains), 0);
        assert_eq!(s.counter(|m| &m.interrupts), 1);
    }

    #[test]
    fn rng_marks_the_pages_it_fills_dirty_for_migration() {
        // Two pages past the first; one buffer straddles them.
        let descs = [raw(BUF + 0x1ff0, 32, WRITE, 0)];
        let mut s = Setup::host(&descs, &[0]);
        // The region's own bitmap (what migration harvests); the region starts at 0.
        fn bitmap(mem: &GuestMemoryMmap) -> &vm_memory::bitmap::AtomicBitmap {
            let region = mem.find_region(GuestAddress(BUF)).unwrap();
            std::ops::Deref::deref(region).bitmap()
        }
        bitmap(&s.mem).reset();
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        let dirty = |addr: u64| bitmap(&s.mem).dirty_at(addr as usize);
        assert!(dirty(BUF + 0x1000) && dirty(BUF + 0x2000));
        assert!(!dirty(BUF) && !dirty(BUF + 0x3000));
    }

    #[test]
    fn rng_serves_a_chain_through_an_indirect_table() {
        let table = BUF + 0x8000;
        let descs = [raw(table, 32, INDIRECT, 0)];
        let mut s = Setup::host(&descs, &[0]);
        for (i, d) in [
            raw(BUF, 64, WRITE | NEXT, 1),
            raw(BUF + 0x100, 64, WRITE, 0),
        ]
        .into_iter()
        .enumerate()
        {
            s.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, 128)]);
        assert!(random_looking(&s.bytes(BUF + 0x100, 64)));
    }

    #[test]
    fn rng_gives_one_request_at_most_64_kib() {
        // One 1 MiB buffer, then a second chain that must still be served.
        let descs = [
            raw(BUF, 1 << 20, WRITE, 0),
            raw(BUF + (2 << 20), 64, WRITE, 0),
        ];
        let mut s = Setup::host(&descs, &[0, 1]);
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, MAX_REQUEST_BYTES as u32), (1, 64)]);
        assert!(random_looking(
            &s.bytes(BUF + MAX_REQUEST_BYTES as u64 - 64, 64)
        ));
        assert_eq!(s.bytes(BUF + MAX_REQUEST_BYTES as u64, 4096), vec![0; 4096]);
        assert_eq!(s.counter(|m| &m.bytes), MAX_REQUEST_BYTES as u64 + 64);
    }

    #[test]
    fn rng_chain_with_a_readable_descriptor_gets_zero_bytes_and_the_next_is_served() {
        let descs = [
            raw(BUF, 16, NEXT, 1),
            raw(BUF + 0x100, 64, WRITE, 0),
            raw(BUF + 0x200, 64, WRITE, 0),
        ];
        let mut s = Setup::host(&descs, &[0, 2]);
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, 0), (2, 64)]);
        assert_eq!(
            s.bytes(BUF + 0x100, 64),
            vec![0; 64],
            "a refused chain is not written"
        );
        assert!(random_looking(&s.bytes(BUF + 0x200, 64)));
        assert_eq!(s.counter(|m| &m.bad_chains), 1);
        assert_eq!(s.counter(|m| &m.requests), 1);
    }

    #[test]
    fn rng_looping_chain_gets_zero_bytes_and_the_next_is_served() {
        // 0 -> 1 -> 0 -> ...; then a good chain at 2.
        let descs = [
            raw(BUF, 64, WRITE | NEXT, 1),
            raw(BUF + 0x100, 64, WRITE | NEXT, 0),
            raw(BUF + 0x200, 64, WRITE, 0),
        ];
        let mut s = Setup::host(&descs, &[0, 2]);
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, 0), (2, 64)]);
        assert_eq!(s.bytes(BUF, 64), vec![0; 64]);
        assert_eq!(s.counter(|m| &m.bad_chains), 1);
    }

    #[test]
    fn rng_refuses_buffers_outside_guest_memory_or_wrapping_the_address_space() {
        for (addr, len) in [
            (MEM_SIZE - 16, 64),             // runs off the end of memory
            (0x1_0000_0000, 64),             // no memory there at all
            (0xffff_ffff_ffff_f000, 0x2000), // wraps around 2^64
            (BUF, u32::MAX),                 // 4 GiB in a 4 MiB guest
        ] {
            let descs = [
                raw(BUF + 0x100, 64, WRITE | NEXT, 1),
                raw(addr, len, WRITE, 0),
            ];
            let mut s = Setup::host(&descs, &[0]);
            assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
            assert_eq!(s.used(), vec![(0, 0)], "{addr:#x}+{len:#x}");
            assert_eq!(s.bytes(BUF + 0x100, 64), vec![0; 64]);
            assert_eq!(s.counter(|m| &m.bad_chains), 1);
        }
    }

    #[test]
    fn rng_refuses_a_chain_whose_next_leaves_the_table() {
        let descs = [raw(BUF, 64, WRITE | NEXT, 200)];
        let mut s = Setup::host(&descs, &[0]);
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, 0)]);
        assert_eq!(s.counter(|m| &m.bad_chains), 1);
    }

    #[test]
    fn rng_refuses_a_head_outside_the_table_without_a_used_entry_for_it() {
        // virtio-queue refuses to pop a head index beyond the queue size; the next is served.
        let descs = [raw(BUF, 64, WRITE, 0)];
        let mut s = Setup::host(&descs, &[SIZE + 3, 0]);
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, 64)]);
        assert_eq!(s.counter(|m| &m.bad_chains), 1);
    }

    #[test]
    fn rng_refuses_an_indirect_table_with_too_many_descriptors() {
        // MAX_DESCRIPTORS + 1 writable descriptors of 1 byte, chained, in an indirect table.
        let table = BUF + 0x1_0000;
        let n = MAX_DESCRIPTORS as u64 + 1;
        let descs = [raw(table, (16 * n) as u32, INDIRECT, 0)];
        let mut s = Setup::host(&descs, &[0]);
        for i in 0..n {
            let flags = if i + 1 < n { WRITE | NEXT } else { WRITE };
            s.mem
                .write_obj(
                    raw(BUF + i, 1, flags, (i + 1) as u16),
                    GuestAddress(table + 16 * i),
                )
                .unwrap();
        }
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, 0)]);
        assert_eq!(s.counter(|m| &m.bad_chains), 1);
    }

    #[test]
    fn rng_avail_index_far_ahead_reports_a_broken_queue_instead_of_spinning() {
        let mut s = Setup::host(&[], &[]);
        let avail_idx = GuestAddress(16 * u64::from(SIZE) + 2);
        s.mem.write_obj((SIZE + 1).to_le(), avail_idx).unwrap();
        assert_eq!(s.rng.process_queue(), QueueStatus::Broken);
        assert!(s.used().is_empty());
    }

    #[test]
    fn rng_broken_queue_is_served_no_more_until_the_driver_resets_the_device() {
        let descs = [raw(BUF, 64, WRITE, 0)];
        let mut s = Setup::host(&descs, &[0]);
        s.set_avail_idx(SIZE + 1);
        assert_eq!(s.rng.process_queue(), QueueStatus::Broken);
        // The driver puts the avail index right but does not reset the device: the rings
        // were not to be trusted, so the chain it names now is not served, however often
        // the queue is kicked.
        s.set_avail_idx(1);
        for _ in 0..3 {
            assert_eq!(s.rng.process_queue(), QueueStatus::Broken);
        }
        assert!(s.used().is_empty());
        assert_eq!(s.bytes(BUF, 64), vec![0; 64]);
        assert_eq!(s.counter(|m| &m.requests), 0);
        assert_eq!(s.counter(|m| &m.interrupts), 0);
        assert_eq!(s.counter(|m| &m.broken_queues), 1, "one breakage");
        // A reset clears it: the same rings set up again are served.
        s.reset_and_reactivate();
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, 64)]);
        assert!(random_looking(&s.bytes(BUF, 64)));
    }

    #[test]
    fn rng_head_outside_the_table_alone_raises_no_interrupt() {
        // The one chain made available has a head beyond the queue size: it is refused
        // with no used entry, so the guest has nothing to be interrupted for.
        let descs = [raw(BUF, 64, WRITE, 0)];
        let mut s = Setup::host(&descs, &[SIZE + 3]);
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert!(s.used().is_empty());
        assert_eq!(s.counter(|m| &m.bad_chains), 1);
        assert_eq!(s.counter(|m| &m.interrupts), 0);
        assert_eq!(s.interrupt.status() & crate::virtio::INT_VRING, 0);
    }

    #[test]
    fn rng_failing_host_entropy_gives_zero_bytes_and_is_counted() {
        let failing: EntropySource = Box::new(|_| Err(io::Error::from_raw_os_error(libc::EAGAIN)));
        let descs = [raw(BUF, 64, WRITE, 0)];
        let mut s = Setup::new(Rng::with_source(failing).unwrap(), &descs, &[0]);
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, 0)]);
        assert_eq!(s.bytes(BUF, 64), vec![0; 64]);
        assert_eq!(s.counter(|m| &m.entropy_errors), 1);
        assert_eq!(s.counter(|m| &m.bad_chains), 0);
    }

    #[test]
    fn rng_pass_yields_after_its_budget_and_the_next_pass_serves_the_rest() {
        // 20 chains of 64 KiB each: the budget (1 MiB) is 16 of them.
        let descs: Vec<RawDescriptor> = (0..20u16)
            .map(|i| raw(BUF + u64::from(i) * 0x1_0000, 0x1_0000, WRITE, 0))
            .collect();
        let heads: Vec<u16> = (0..20).collect();
        let mut s = Setup::host(&descs, &heads);
        assert_eq!(s.rng.process_queue(), QueueStatus::BudgetSpent);
        assert_eq!(s.used().len(), 16);
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used().len(), 20);
        assert_eq!(s.counter(|m| &m.bytes), 20 << 16);
    }

    #[test]
    fn rng_frozen_device_serves_nothing_until_thawed() {
        let descs = [raw(BUF, 64, WRITE, 0)];
        let mut s = Setup::host(&descs, &[0]);
        s.rng.freeze();
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert!(s.used().is_empty());
        assert_eq!(s.bytes(BUF, 64), vec![0; 64]);
        s.rng.thaw();
        assert_eq!(s.rng.process_queue(), QueueStatus::Drained);
        assert_eq!(s.used(), vec![(0, 64)]);
    }

    #[test]
    fn rng_host_entropy_fills_large_buffers_entirely() {
        let mut buf = vec![0u8; MAX_REQUEST_BYTES];
        host_entropy(&mut buf).unwrap();
        // Each 4 KiB stretch has something in it (all zero: probability 2^-32768).
        assert!(buf.chunks(4096).all(random_looking));
    }
}
