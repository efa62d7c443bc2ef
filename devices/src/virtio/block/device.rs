//! The virtio-blk device: features, configuration space, and serving the request queue.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::Address;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{AlignedBuf, Disk};
use super::metrics::BlockMetrics as M;
use super::request::{Limits, Request, RequestType, Segment, DISCARD_SEGMENT_SIZE, SECTOR_SIZE};
use super::uring::{Answer, OpKind, UringEngine};
use crate::virtio::{
    ActivateError, Interrupt, VirtioDevice, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, TYPE_BLOCK,
};
use crate::GuestMemoryMmap;

/// Queue size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data descriptors per request (the queue size less header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Longest data descriptor, and the bounce buffer's size.
pub const SIZE_MAX: u32 = 1 << 20;
/// Most sectors one discard or write-zeroes segment may cover (1 GiB).
/// Synchronous work one pass over the queue does before the event loop turns, in bytes
/// moved or zeroed: a few milliseconds of disk time. A request costs at least
/// [`MIN_REQUEST_COST`], a flush [`FLUSH_COST`], a discard or write-zeroes its range (the
/// fallback that writes zeroes moves all of it); one request may overshoot, the next waits.
pub const PASS_BUDGET: u64 = 8 << 20;
const MIN_REQUEST_COST: u64 = 4096;
const FLUSH_COST: u64 = 1 << 20;
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
/// Segments per discard or write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 1;

/// How requests reach the backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring, many requests in flight; synchronous I/O where io_uring is unavailable.
    #[default]
    IoUring,
    /// One request at a time with pread/pwrite on the event loop.
    Sync,
}

/// Per-disk settings beyond the backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// The disk's serial number (GET_ID), at most 20 bytes.
    pub serial: Option<String>,
    /// The I/O engine.
    pub engine: IoEngine,
}

/// Virtio-blk configuration space layout (virtio 1.x §5.2.4), offsets in bytes.
mod cfg {
    pub const CAPACITY: usize = 0;
    pub const SIZE_MAX: usize = 8;
    pub const SEG_MAX: usize = 12;
    pub const BLK_SIZE: usize = 20;
    pub const MAX_DISCARD_SECTORS: usize = 36;
    pub const MAX_DISCARD_SEG: usize = 40;
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    pub const LEN: usize = 60;
}

pub(crate) struct Active {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub interrupt: Arc<Interrupt>,
}

/// One virtio-blk device.
pub struct Block {
    pub(crate) disk: Disk,
    config_space: [u8; cfg::LEN],
    avail_features: u64,
    acked_features: u64,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    queue_events: Vec<EventFd>,
    pub(crate) activate_event: EventFd,
    // Declared before `active` so it is dropped (and drained) before the guest memory that
    // in-flight operations point into.
    pub(crate) engine: Option<UringEngine>,
    /// Requests are waiting in the avail ring because every engine slot is busy.
    stalled: bool,
    /// Frozen for a migration: the queue is not served.
    frozen: bool,
    /// The rings were found broken: logged and counted once, not served until a reset.
    /// Not carried by a migration: a destination finds rings still broken on its first pass.
    broken: bool,
    /// The log lines a guest can repeat (a queue broken after every reset, failing I/O).
    broken_log: crate::log_limit::LogLimit,
    io_error_log: crate::log_limit::LogLimit,
    /// Synchronous work of the current pass over the queue, in bytes (see [`PASS_BUDGET`]).
    pass_cost: u64,
    pub(crate) active: Option<Active>,
    /// Whether the event loop already watches the queue eventfd.
    pub(crate) queue_watched: bool,
    bounce: AlignedBuf,
    pub(crate) metrics: Arc<M>,
}

fn put_u32(space: &mut [u8], offset: usize, value: u32) {
    space[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

impl Block {
    /// A device serving `disk`.
    pub fn new(disk: Disk, config: &BlockConfig) -> std::io::Result<Self> {
        let mut avail_features = F_VERSION_1
            | F_EVENT_IDX
            | F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if disk.read_only() {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }

        let mut space = [0u8; cfg::LEN];
        space[cfg::CAPACITY..cfg::CAPACITY + 8]
            .copy_from_slice(&(disk.size() / SECTOR_SIZE).to_le_bytes());
        put_u32(&mut space, cfg::SIZE_MAX, SIZE_MAX);
        put_u32(&mut space, cfg::SEG_MAX, SEG_MAX);
        put_u32(&mut space, cfg::BLK_SIZE, disk.logical_block_size());
        let sectors_per_block = disk.logical_block_size() / SECTOR_SIZE as u32;
        put_u32(&mut space, cfg::MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS);
        put_u32(&mut space, cfg::MAX_DISCARD_SEG, MAX_DISCARD_SEG);
        put_u32(&mut space, cfg::DISCARD_SECTOR_ALIGNMENT, sectors_per_block);
        put_u32(
            &mut space,
            cfg::MAX_WRITE_ZEROES_SECTORS,
            MAX_DISCARD_SECTORS,
        );
        put_u32(&mut space, cfg::MAX_WRITE_ZEROES_SEG, MAX_DISCARD_SEG);
        space[cfg::WRITE_ZEROES_MAY_UNMAP] = 1;

        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        if let Some(s) = &config.serial {
            let n = s.len().min(serial.len());
            serial[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        let engine = match config.engine {
            IoEngine::Sync => None,
            IoEngine::IoUring => match UringEngine::new(QUEUE_SIZE) {
                Ok(engine) => Some(engine),
                Err(e) => {
                    tracing::warn!(
                        disk = %disk.path().display(),
                        error = %e,
                        "io_uring is unavailable; this disk uses synchronous I/O"
                    );
                    None
                }
            },
        };
        Ok(Self {
            disk,
            config_space: space,
            avail_features,
            acked_features: 0,
            serial,
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK)?],
            activate_event: EventFd::new(libc::EFD_NONBLOCK)?,
            engine,
            stalled: false,
            frozen: false,
            broken: false,
            broken_log: Default::default(),
            io_error_log: Default::default(),
            pass_cost: 0,
            active: None,
            queue_watched: false,
            bounce: AlignedBuf::new(SIZE_MAX as usize),
            metrics: Arc::new(M::default()),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<M> {
        self.metrics.clone()
    }

    /// The backing disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    fn flush_negotiated(&self) -> bool {
        self.acked_features & (1 << VIRTIO_BLK_F_FLUSH) != 0
    }

    fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.disk.size() / SECTOR_SIZE,
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
        }
    }

    /// Serves the requests the driver has made available (as many as the engine has room
    /// for, and synchronous work up to [`PASS_BUDGET`]: a pass that spent it leaves
    /// notifications off and kicks the queue's eventfd, so the event loop serves the other
    /// devices before the rest), then interrupts the guest if it asked for it. Returns false if the queue is
    /// broken: that is logged and counted here, once, and the queue is not served again
    /// until the driver resets the device (a guest kicking broken rings cannot flood the
    /// log or keep the event loop busy).
    pub(crate) fn process_queue(&mut self) -> bool {
        if self.broken {
            return false;
        }
        if self.frozen {
            return true;
        }
        let Some(mut active) = self.active.take() else {
            return true;
        };
        let mut used_any = false;
        let mut empty_passes = 0;
        self.stalled = false;
        self.pass_cost = 0;
        let healthy = loop {
            if active.queue.disable_notification(&active.mem).is_err() {
                break false;
            }
            let mut popped = false;
            while self.has_room() && self.pass_cost < PASS_BUDGET {
                let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                if let Some(written) = self.serve(&active.mem, chain, head) {
                    if active.queue.add_used(&active.mem, head, written).is_err() {
                        M::inc(&self.metrics.invalid_requests);
                    }
                    used_any = true;
                }
            }
            if !self.has_room() {
                // Completions free slots and call back here; notifications stay off meanwhile.
                self.stalled = true;
                break true;
            }
            if self.pass_cost >= PASS_BUDGET {
                // Notifications stay off; the eventfd brings the loop back for the rest.
                M::inc(&self.metrics.budget_spent);
                if let Err(e) = self.queue_events[0].write(1) {
                    tracing::error!(error = %e, "cannot reschedule the virtio-blk queue");
                }
                break true;
            }
            match active.queue.enable_notification(&active.mem) {
                Ok(true) => {
                    // More arrived while notifications were off, or the ring claims entries
                    // that can never be popped (avail.idx more than a queue size ahead, an
                    // avail ring at address 0): that would spin here forever. One empty pass
                    // can be a race with the driver publishing; two in a row cannot.
                    empty_passes = if popped { 0 } else { empty_passes + 1 };
                    if empty_passes == 2 {
                        break false;
                    }
                }
                Ok(false) => break true,
                Err(_) => break false,
            }
        };
        if let Some(engine) = self.engine.as_mut() {
            if let Err(e) = engine.submit() {
                tracing::error!(error = %e, "io_uring submit failed");
            }
        }
        if used_any {
            self.notify(&mut active);
        }
        self.active = Some(active);
        if !healthy {
            // Requests served before the rings broke got their used entries and interrupt;
            // those in flight are answered when they complete.
            self.broken = true;
            self.stalled = false;
            M::inc(&self.metrics.broken_queues);
            crate::warn_limited!(
                self.broken_log,
                disk = %self.disk.path().display(),
                "virtio-blk queue is broken; it is not served until the driver resets the device"
            );
        }
        healthy
    }

    fn has_room(&self) -> bool {
        self.engine.as_ref().is_none_or(UringEngine::has_room)
    }

    fn notify(&self, active: &mut Active) {
        if active.queue.needs_notification(&active.mem).unwrap_or(true) {
            M::inc(&self.metrics.interrupts);
            if let Err(e) = active.interrupt.signal_used_queue() {
                tracing::warn!(error = %e, "virtio-blk interrupt failed");
            }
        }
    }

    /// Answers the operations the io_uring finished, then resumes the queue if it stalled.
    pub(crate) fn process_completions(&mut self) {
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let done = engine.reap();
        self.answer(done);
        if self.stalled {
            self.process_queue();
        }
    }

    /// Answers finished operations in the used ring, interrupting the guest if it asks.
    fn answer(&mut self, done: Vec<super::uring::Completion>) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let metrics = self.metrics.clone();
        for c in &done {
            let ok = c.result >= 0 && c.result as u64 == c.expected;
            if !ok {
                M::inc(&metrics.io_errors);
                crate::warn_limited!(
                    self.io_error_log,
                    disk = %self.disk.path().display(),
                    result = c.result,
                    expected = c.expected,
                    "disk I/O failed"
                );
            }
            let mut data = 0;
            match c.kind {
                OpKind::Read if ok => {
                    M::add(&metrics.read_bytes, c.expected);
                    data = c.expected as u32;
                }
                OpKind::Write if ok => M::add(&metrics.write_bytes, c.expected),
                _ => {}
            }
            let status = if ok {
                VIRTIO_BLK_S_OK
            } else {
                VIRTIO_BLK_S_IOERR
            };
            for &(addr, len) in &c.written {
                if let Ok(slice) = active.mem.get_slice(addr, len as usize) {
                    slice.bitmap().mark_dirty(0, len as usize);
                }
            }
            let written = self.complete(&active.mem, c.status, status, data);
            if active.queue.add_used(&active.mem, c.head, written).is_err() {
                M::inc(&metrics.invalid_requests);
            }
        }
        if !done.is_empty() {
            self.notify(&mut active);
        }
        self.active = Some(active);
    }

    /// Serves one chain: answered at once (returns the bytes written into guest buffers), or
    /// handed to the io_uring (returns `None`; answered on completion).
    fn serve(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        head: u16,
    ) -> Option<u32> {
        let request = match Request::parse(chain, mem, &self.limits()) {
            Ok(r) => r,
            Err(e) => {
                M::inc(&self.metrics.invalid_requests);
                tracing::debug!(error = %e, "invalid virtio-blk request");
                return Some(match e.status {
                    Some(status) => self.complete(mem, status, VIRTIO_BLK_S_IOERR, 0),
                    None => 0,
                });
            }
        };
        if self.submit_async(mem, &request, head) {
            return None;
        }
        let (status, data_written) = self.execute(mem, &request);
        Some(self.complete(mem, request.status, status, data_written))
    }

    /// Hands a read, write or flush to the io_uring when there is one and the buffers allow
    /// it; false means "do it synchronously".
    fn submit_async(&mut self, mem: &GuestMemoryMmap, req: &Request, head: u16) -> bool {
        let kind = match req.request_type {
            RequestType::In => OpKind::Read,
            RequestType::Out if !self.disk.read_only() => OpKind::Write,
            RequestType::Flush => OpKind::Flush,
            _ => return false,
        };
        let dsync = !self.flush_negotiated();
        let fd = self.disk.as_raw_fd();
        let align = self
            .disk
            .direct()
            .then(|| self.disk.logical_block_size() as usize);
        let Some(engine) = self.engine.as_mut() else {
            return false;
        };
        let queued = match kind {
            OpKind::Flush => engine.queue_flush(
                fd,
                Answer {
                    head,
                    status: req.status,
                    written: Vec::new(),
                },
            ),
            _ => {
                let Some(iovecs) = guest_iovecs(mem, &req.data, align) else {
                    return false; // unaligned for O_DIRECT, or across memory regions
                };
                // The guest lent these buffers until the device answers; the memory behind
                // them is held by `self.active`, which reset and drop release only after
                // draining the engine.
                // SAFETY: so the iovecs stay valid until their completion is reaped.
                unsafe {
                    engine.queue_rw(
                        fd,
                        kind,
                        req.sector * SECTOR_SIZE,
                        iovecs,
                        dsync,
                        Answer {
                            head,
                            status: req.status,
                            written: if kind == OpKind::Read {
                                req.data.clone()
                            } else {
                                Vec::new()
                            },
                        },
                    )
                }
            }
        };
        match queued {
            Ok(()) => {
                let counter = match kind {
                    OpKind::Read => &self.metrics.read_requests,
                    OpKind::Write => &self.metrics.write_requests,
                    OpKind::Flush => &self.metrics.flush_requests,
                };
                M::inc(counter);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "io_uring queueing failed; serving synchronously");
                false
            }
        }
    }

    fn complete(&self, mem: &GuestMemoryMmap, at: GuestAddress, status: u32, data: u32) -> u32 {
        match mem.write_obj(status as u8, at) {
            Ok(()) => data + 1,
            Err(_) => data,
        }
    }

    /// Carries out a parsed request; returns the status and the data bytes written to the
    /// guest.
    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> (u32, u32) {
        let metrics = self.metrics.clone();
        self.pass_cost += match req.request_type {
            RequestType::Flush => FLUSH_COST,
            _ => req.data_len.max(MIN_REQUEST_COST),
        };
        let writes = matches!(
            req.request_type,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && self.disk.read_only() {
            M::inc(&metrics.read_only_violations);
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let result = match req.request_type {
            RequestType::In => {
                M::inc(&metrics.read_requests);
                self.read(mem, req)
                    .inspect(|&n| M::add(&metrics.read_bytes, u64::from(n)))
            }
            RequestType::Out => {
                M::inc(&metrics.write_requests);
                self.write(mem, req).map(|()| {
                    M::add(&metrics.write_bytes, req.data_len);
                    0
                })
            }
            RequestType::Flush => {
                M::inc(&metrics.flush_requests);
                self.disk.flush().map(|()| 0).map_err(Failure::Io)
            }
            RequestType::GetId => {
                M::inc(&metrics.get_id_requests);
                let (addr, len) = req.data[0];
                let n = (len as usize).min(self.serial.len());
                mem.write_slice(&self.serial[..n], addr)
                    .map(|()| n as u32)
                    .map_err(|_| Failure::Memory)
            }
            RequestType::Discard => {
                M::inc(&metrics.discard_requests);
                self.discard_or_zero(mem, req, false).map(|()| 0)
            }
            RequestType::WriteZeroes => {
                M::inc(&metrics.write_zeroes_requests);
                self.discard_or_zero(mem, req, true).map(|()| 0)
            }
            RequestType::Unsupported(t) => {
                M::inc(&metrics.unsupported_requests);
                tracing::debug!(request_type = t, "unsupported virtio-blk request");
                Err(Failure::Unsupported)
            }
        };
        match result {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(Failure::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
            Err(Failure::Io(e)) => {
                M::inc(&metrics.io_errors);
                crate::warn_limited!(
                    self.io_error_log,
                    disk = %self.disk.path().display(),
                    error = %e,
                    "disk I/O failed"
                );
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(Failure::Memory) | Err(Failure::Invalid) => {
                M::inc(&metrics.invalid_requests);
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    fn read(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Result<u32, Failure> {
        let mut offset = req.sector * SECTOR_SIZE;
        for &(addr, len) in &req.data {
            let buf = &mut self.bounce.as_mut_slice()[..len as usize];
            self.disk.read_at(buf, offset).map_err(Failure::Io)?;
            mem.write_slice(buf, addr).map_err(|_| Failure::Memory)?;
            offset += u64::from(len);
        }
        Ok(req.data_len as u32)
    }

    fn write(&mut self, mem: &GuestMemoryMmap, req: &Request) -> Result<(), Failure> {
        let mut offset = req.sector * SECTOR_SIZE;
        for &(addr, len) in &req.data {
            let buf = &mut self.bounce.as_mut_slice()[..len as usize];
            mem.read_slice(buf, addr).map_err(|_| Failure::Memory)?;
            self.disk.write_at(buf, offset).map_err(Failure::Io)?;
            offset += u64::from(len);
        }
        self.write_through()
    }

    /// Without FLUSH the driver assumes write-through: what a write, discard or write-zeroes
    /// changed is durable when the request completes.
    fn write_through(&self) -> Result<(), Failure> {
        if self.flush_negotiated() {
            return Ok(());
        }
        M::inc(&self.metrics.write_through_syncs);
        self.disk.flush().map_err(Failure::Io)
    }

    fn discard_or_zero(
        &mut self,
        mem: &GuestMemoryMmap,
        req: &Request,
        zero: bool,
    ) -> Result<(), Failure> {
        let capacity = self.disk.size() / SECTOR_SIZE;
        let segments = req.data_len / u64::from(DISCARD_SEGMENT_SIZE);
        if segments > u64::from(MAX_DISCARD_SEG) {
            return Err(Failure::Invalid);
        }
        for &(addr, len) in &req.data {
            for i in 0..u64::from(len / DISCARD_SEGMENT_SIZE) {
                let at = addr
                    .checked_add(i * u64::from(DISCARD_SEGMENT_SIZE))
                    .ok_or(Failure::Memory)?;
                let seg: Segment = mem.read_obj(at).map_err(|_| Failure::Memory)?;
                let (sector, count, flags) = (
                    seg.sector.to_native(),
                    seg.num_sectors.to_native(),
                    seg.flags.to_native(),
                );
                let allowed_flags = if zero {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !allowed_flags != 0 {
                    return Err(Failure::Unsupported);
                }
                if count == 0
                    || count > MAX_DISCARD_SECTORS
                    || sector
                        .checked_add(u64::from(count))
                        .is_none_or(|end| end > capacity)
                {
                    return Err(Failure::Invalid);
                }
                let (offset, bytes) = (sector * SECTOR_SIZE, u64::from(count) * SECTOR_SIZE);
                self.pass_cost += bytes;
                let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                let done = if zero {
                    self.disk.write_zeroes(offset, bytes, unmap)
                } else {
                    self.disk.discard(offset, bytes)
                };
                done.map_err(Failure::Io)?;
            }
        }
        self.write_through()
    }

    /// Makes all completed writes durable; called when the VM stops.
    pub fn flush_on_exit(&mut self) -> std::io::Result<()> {
        if let Some(engine) = self.engine.as_mut() {
            engine.drain();
        }
        if self.disk.read_only() {
            return Ok(());
        }
        self.disk.flush()
    }
}

enum Failure {
    Io(std::io::Error),
    Memory,
    Invalid,
    Unsupported,
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field podvm offers is read-only (no CONFIG_WCE).
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        self.activate_event.write(1).map_err(ActivateError::Signal)
    }

    fn reset(&mut self) {
        // Nothing may still write into guest memory or the rings once the driver reuses them.
        if let Some(engine) = self.engine.as_mut() {
            engine.drain();
        }
        self.stalled = false;
        self.broken = false;
        self.active = None;
        self.acked_features = 0;
    }

    fn freeze(&mut self) {
        self.frozen = true;
        if let Some(engine) = self.engine.as_mut() {
            let done = engine.drain();
            self.answer(done);
        }
    }

    fn thaw(&mut self) {
        self.frozen = false;
        // The event loop takes up the requests queued meanwhile, on its own thread.
        if let Err(e) = self.activate_event.write(1) {
            tracing::error!(error = %e, "cannot wake the virtio-blk event handler");
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }
}

/// Host iovecs for guest buffers; `None` if a buffer spans memory regions or, with `align`,
/// is not aligned for O_DIRECT.
fn guest_iovecs(
    mem: &GuestMemoryMmap,
    data: &[(GuestAddress, u32)],
    align: Option<usize>,
) -> Option<Box<[libc::iovec]>> {
    data.iter()
        .map(|&(addr, len)| {
            let slice = mem.get_slice(addr, len as usize).ok()?;
            let base = slice.ptr_guard_mut().as_ptr();
            if let Some(a) = align {
                if !(base as usize).is_multiple_of(a) || !(len as usize).is_multiple_of(a) {
                    return None;
                }
            }
            Some(libc::iovec {
                iov_base: base.cast(),
                iov_len: len as usize,
            })
        })
        .collect()
}
