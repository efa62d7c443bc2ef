//! Fuzzing entry points for the virtio-blk request path, shared by the cargo-fuzz targets in
//! `devices/fuzz/` and by the unit tests that replay their corpus.
//!
//! [`fuzz_block_queue`] plays a hostile driver: it lays an arbitrary descriptor table, avail
//! ring and buffer contents out in a small guest memory, activates a [`Block`] over a fresh
//! 1 MiB in-memory disk, and lets the device serve the queue. [`fuzz_request_parse`] feeds an
//! arbitrary descriptor list straight to [`Request::parse`]. Neither may panic or hang, and
//! both check invariants that hold for every input.
//!
//! # Queue input format ([`FuzzInput`])
//!
//! | bytes      | meaning                                                                  |
//! |------------|--------------------------------------------------------------------------|
//! | 0          | queue size: `1 << (b % 9)` (1 to 256)                                    |
//! | 1          | flags: [`FLAG_EVENT_IDX`], [`FLAG_FLUSH`], [`FLAG_READ_ONLY`], [`FLAG_SERIAL`], [`FLAG_BATCH`] |
//! | 2..4       | avail index (LE), used in batch mode only                                |
//! | 4          | number of descriptors (clamped to the queue size)                        |
//! | 5          | number of avail ring entries (clamped to the queue size)                 |
//! | 16 each    | raw descriptors: addr u64, len u32, flags u16, next u16 (LE), unchecked   |
//! | 2 each     | avail ring entries (LE head indices, unchecked)                          |
//! | the rest   | guest memory contents from [`DATA_START`] on                             |
//!
//! Missing bytes read as zero. In step mode (the default) the harness publishes one avail
//! entry per `process_queue` call, so it knows exactly which chain the device saw and can check
//! its used entry; batch mode writes the avail index as given (it may be anything, including
//! more than a queue size ahead) and calls `process_queue` once.
//!
//! Checked for every input, against the device's own queue positions (which the guest cannot
//! write): every used entry answers a popped chain; used.idx in guest memory matches; in step
//! mode the published chain is always popped, and when it is the only one, its used entry
//! names its head and reports no more bytes than the chain's writable descriptors hold (a head
//! outside the table gets no used entry); in batch mode an avail index more than a queue size
//! ahead pops nothing and reports the queue broken. The device runs with synchronous I/O
//! ([`IoEngine::Sync`]), so every request completes within `process_queue`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::backend::{Disk, DiskOptions};
use super::device::{Block, BlockConfig, IoEngine};
use super::request::{Limits, ParseError, Request, RequestType, MAX_CHAIN_LEN, SECTOR_SIZE};
use crate::irq::IrqTrigger;
use crate::virtio::{Interrupt, VirtioDevice, F_EVENT_IDX};
use crate::GuestMemoryMmap;

/// Guest memory size of a fuzz run.
pub const MEM_SIZE: u64 = 0x1_0000;
/// The descriptor table (at most 4 KiB).
pub const DESC_TABLE: u64 = 0;
/// The avail ring (at most 4 + 2 * 256 + 2 bytes).
pub const AVAIL_RING: u64 = 0x1000;
/// The used ring (at most 4 + 8 * 256 + 2 bytes).
pub const USED_RING: u64 = 0x1400;
/// Where the input's memory contents go, above the rings.
pub const DATA_START: u64 = 0x2000;
/// Size of the scratch disk.
pub const DISK_SIZE: u64 = 1 << 20;

/// Flag: negotiate VIRTIO_RING_F_EVENT_IDX.
pub const FLAG_EVENT_IDX: u8 = 1;
/// Flag: negotiate VIRTIO_BLK_F_FLUSH (writes are then not synced on completion).
pub const FLAG_FLUSH: u8 = 2;
/// Flag: open the disk read-only.
pub const FLAG_READ_ONLY: u8 = 4;
/// Flag: give the disk a serial number (GET_ID).
pub const FLAG_SERIAL: u8 = 8;
/// Flag: write the avail index from the input and serve the queue once.
pub const FLAG_BATCH: u8 = 16;

/// A decoded queue fuzz input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FuzzInput {
    /// The queue size is `1 << (queue_size_log2 % 9)`.
    pub queue_size_log2: u8,
    pub flags: u8,
    /// Batch mode's avail index.
    pub avail_idx: u16,
    /// (addr, len, flags, next), stored at table indices 0, 1, ...
    pub descriptors: Vec<(u64, u32, u16, u16)>,
    /// Avail ring entries.
    pub avail: Vec<u16>,
    /// Guest memory from [`DATA_START`] on.
    pub memory: Vec<u8>,
}

/// Reads little-endian fields, with zeroes past the end.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

impl FuzzInput {
    /// The queue size.
    pub fn queue_size(&self) -> u16 {
        1 << (self.queue_size_log2 % 9)
    }

    /// Decodes any byte string.
    pub fn decode(data: &[u8]) -> Self {
        let mut c = Cursor(data);
        let queue_size_log2 = c.u8();
        let size = 1usize << (queue_size_log2 % 9);
        let flags = c.u8();
        let avail_idx = c.u16();
        let n_desc = usize::from(c.u8()).min(size);
        let n_avail = usize::from(c.u8()).min(size);
        let descriptors = (0..n_desc)
            .map(|_| (c.u64(), c.u32(), c.u16(), c.u16()))
            .collect();
        let avail = (0..n_avail).map(|_| c.u16()).collect();
        let room = (MEM_SIZE - DATA_START) as usize;
        let memory = c.0[..c.0.len().min(room)].to_vec();
        FuzzInput {
            queue_size_log2,
            flags,
            avail_idx,
            descriptors,
            avail,
            memory,
        }
    }

    /// Encodes the input so that `decode` gives it back (for counts within the queue size).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.queue_size_log2, self.flags];
        out.extend_from_slice(&self.avail_idx.to_le_bytes());
        out.push(self.descriptors.len() as u8);
        out.push(self.avail.len() as u8);
        for &(addr, len, flags, next) in &self.descriptors {
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&next.to_le_bytes());
        }
        for head in &self.avail {
            out.extend_from_slice(&head.to_le_bytes());
        }
        out.extend_from_slice(&self.memory);
        out
    }
}

/// A fresh, zeroed, sparse in-memory disk of [`DISK_SIZE`] bytes: a memfd reopened through
/// /proc so that [`Disk::open`] takes its usual path (and lock) without touching the file
/// system, and so that no state leaks from one fuzz input to the next.
pub fn scratch_disk(read_only: bool) -> Disk {
    // SAFETY: memfd_create reads the NUL-terminated name, which outlives the call; it touches
    // no other memory.
    let fd = unsafe { libc::memfd_create(c"podvm-blk-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(DISK_SIZE).expect("sizing the scratch disk");
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    Disk::open(&DiskOptions {
        path: path.into(),
        read_only,
        direct: Some(false),
        defer_lock: false,
    })
    .expect("opening the scratch disk")
    // `file` closes here; the disk holds its own descriptor of the memfd.
}

/// A synchronous-I/O device over a scratch disk, with `features` acknowledged (masked by what
/// the device offers).
pub fn scratch_block(read_only: bool, serial: Option<&str>, features: u64) -> Block {
    let config = BlockConfig {
        serial: serial.map(str::to_owned),
        engine: IoEngine::Sync,
    };
    let mut block = Block::new(scratch_disk(read_only), &config).expect("creating the device");
    let offered = block.avail_features();
    block.set_acked_features(features & offered);
    block
}

/// Activates `block` with the one queue `queue` over `mem`.
pub fn activate(block: &mut Block, mem: &GuestMemoryMmap, queue: Queue) {
    let interrupt = Interrupt::new(IrqTrigger::new().expect("creating an eventfd"));
    block
        .activate(mem.clone(), Arc::new(interrupt), vec![queue])
        .expect("activating the device");
}

/// A ready split queue of `size` entries at DESC_TABLE, AVAIL_RING and USED_RING. (The mock
/// driver's layout is not used here: its used ring overlaps the end of its avail ring.)
fn fuzz_queue(size: u16, event_idx: bool) -> Queue {
    let mut q = Queue::new(size).expect("a power-of-two queue size");
    q.set_size(size);
    q.set_ready(true);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    q.set_used_ring_address(Some(USED_RING as u32), Some(0));
    q.set_event_idx(event_idx);
    q
}

/// The device's (next_avail, next_used): its own state, not guest-writable memory.
fn positions(block: &Block) -> (u16, u16) {
    let active = block.active.as_ref().expect("the device is active");
    (active.queue.next_avail(), active.queue.next_used())
}

fn used_elem(mem: &GuestMemoryMmap, used_ring: GuestAddress, size: u16, at: u16) -> VirtqUsedElem {
    let offset = 4 + 8 * u64::from(at % size);
    mem.read_obj(used_ring.unchecked_add(offset))
        .expect("the used ring lies in guest memory")
}

/// Sum of the writable lengths of the chain the device will pop next, walked the way the
/// device walks it (same queue geometry, same memory, the first MAX_CHAIN_LEN + 1
/// descriptors), and its head index.
fn next_chain_writable(mem: &GuestMemoryMmap, shadow: &mut Queue, next_avail: u16) -> (u16, u64) {
    shadow.set_next_avail(next_avail);
    let chain = shadow
        .pop_descriptor_chain(mem)
        .expect("the harness published an avail entry");
    let head = chain.head_index();
    let writable = chain
        .take(MAX_CHAIN_LEN + 1)
        .filter(Descriptor::is_write_only)
        .map(|d| u64::from(d.len()))
        .sum();
    (head, writable)
}

/// Runs one queue input; returns the guest memory afterwards (for tests).
pub fn run_block_queue(input: &FuzzInput) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("allocating guest memory");
    let size = input.queue_size();
    let (desc_table, avail_ring, used_ring) = (
        GuestAddress(DESC_TABLE),
        GuestAddress(AVAIL_RING),
        GuestAddress(USED_RING),
    );

    for (i, &(addr, len, flags, next)) in input.descriptors.iter().enumerate() {
        mem.write_obj(
            Descriptor::new(addr, len, flags, next),
            desc_table.unchecked_add(16 * i as u64),
        )
        .expect("the descriptor table lies in guest memory");
    }
    for (i, &head) in input.avail.iter().enumerate() {
        mem.write_obj(head.to_le(), avail_ring.unchecked_add(4 + 2 * i as u64))
            .expect("the avail ring lies in guest memory");
    }
    mem.write_slice(&input.memory, GuestAddress(DATA_START))
        .expect("the data area lies in guest memory");

    let event_idx = input.flags & FLAG_EVENT_IDX != 0;
    // Everything the device offers, with FLUSH and EVENT_IDX as the input says.
    let mut features = !(1 << VIRTIO_BLK_F_FLUSH | F_EVENT_IDX);
    if event_idx {
        features |= F_EVENT_IDX;
    }
    if input.flags & FLAG_FLUSH != 0 {
        features |= 1 << VIRTIO_BLK_F_FLUSH;
    }
    let serial = (input.flags & FLAG_SERIAL != 0).then_some("podvm-fuzz-serial-0123");
    let mut block = scratch_block(input.flags & FLAG_READ_ONLY != 0, serial, features);

    let mut shadow = fuzz_queue(size, event_idx);
    activate(&mut block, &mem, fuzz_queue(size, event_idx));

    let avail_idx_addr = avail_ring.unchecked_add(2);
    let used_idx_addr = used_ring.unchecked_add(2);
    if input.flags & FLAG_BATCH != 0 {
        mem.write_obj(input.avail_idx.to_le(), avail_idx_addr)
            .expect("the avail ring lies in guest memory");
        let healthy = block.process_queue();
        let (next_avail, next_used) = positions(&block);
        // Every used entry answers a popped chain.
        assert!(
            next_used <= next_avail,
            "{next_used} used for {next_avail} popped"
        );
        if input.avail_idx > size {
            // The device cannot trust such a ring: it pops nothing and reports it broken.
            assert_eq!((next_avail, next_used), (0, 0));
            assert!(
                !healthy,
                "an avail index {} ahead of a queue of {size}",
                input.avail_idx
            );
        }
        let used_idx: u16 = mem.read_obj(used_idx_addr).expect("used ring in memory");
        assert_eq!(
            u16::from_le(used_idx),
            next_used,
            "used.idx in guest memory"
        );
        return mem;
    }

    for _ in 0..input.avail.len() {
        let (avail_before, used_before) = positions(&block);
        // Publish one more entry, and apply what disable_notification is about to write
        // itself, so that the walk below sees the memory exactly as the device's will (an
        // indirect table may overlap the rings).
        mem.write_obj(avail_before.wrapping_add(1).to_le(), avail_idx_addr)
            .expect("the avail ring lies in guest memory");
        if !event_idx {
            mem.write_obj(1u16.to_le(), used_ring)
                .expect("the used ring lies in guest memory");
        }
        let (head, writable) = next_chain_writable(&mem, &mut shadow, avail_before);

        block.process_queue();

        let (avail_after, used_after) = positions(&block);
        let popped = avail_after.wrapping_sub(avail_before);
        let used = used_after.wrapping_sub(used_before);
        // The published entry is always popped; more only if the chain's own writes moved
        // avail.idx (guest memory is the guest's to scribble on, even through the device).
        assert!(popped >= 1, "the published chain was not popped");
        assert!(
            used <= popped,
            "{used} used entries for {popped} popped chains"
        );
        let used_idx: u16 = mem.read_obj(used_idx_addr).expect("used ring in memory");
        assert_eq!(
            u16::from_le(used_idx),
            used_after,
            "used.idx in guest memory"
        );
        if popped == 1 {
            if head < size {
                assert_eq!(used, 1, "a chain with a valid head got no used entry");
                let elem = used_elem(&mem, used_ring, size, used_before);
                assert_eq!(elem.id(), u32::from(head), "used entry for the wrong chain");
                assert!(
                    u64::from(elem.len()) <= writable,
                    "used len {} > {writable} writable bytes",
                    elem.len()
                );
            } else {
                assert_eq!(used, 0, "a used entry for out-of-range head {head}");
            }
        }
    }
    mem
}

/// The `virtio_blk_queue` fuzz target: any input, no panic, no hang.
pub fn fuzz_block_queue(data: &[u8]) {
    run_block_queue(&FuzzInput::decode(data));
}

/// The `virtio_blk_request` fuzz target: [`Request::parse`] over an arbitrary descriptor list.
///
/// Format: capacity in sectors (u64, taken modulo 2^32), seg_max (u8), size_max (u32, LE),
/// a descriptor count (u8), that many 16-byte descriptors (only addr, len and flags matter),
/// then guest memory contents from address 0 (memory is [`MEM_SIZE`] bytes).
pub fn fuzz_request_parse(data: &[u8]) {
    let mut c = Cursor(data);
    let limits = Limits {
        capacity_sectors: c.u64() & 0xffff_ffff,
        seg_max: u32::from(c.u8()),
        size_max: c.u32(),
    };
    let n = usize::from(c.u8());
    let descs: Vec<Descriptor> = (0..n)
        .map(|_| Descriptor::new(c.u64(), c.u32(), c.u16(), c.u16()))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("allocating guest memory");
    let contents = &c.0[..c.0.len().min(MEM_SIZE as usize)];
    mem.write_slice(contents, GuestAddress(0))
        .expect("the contents fit in guest memory");

    let inside = |addr: GuestAddress, len: u32| {
        len == 0 || mem.check_range(addr, len as usize, vm_memory::Permissions::ReadWrite)
    };
    match Request::parse(descs.iter().copied(), &mem, &limits) {
        Ok(req) => {
            assert!(descs.len() >= 2);
            let last = descs[descs.len() - 1];
            assert!(last.is_write_only() && inside(req.status, 1));
            assert_eq!(
                req.status.raw_value() + 1,
                last.addr().raw_value() + u64::from(last.len())
            );
            assert!(!descs[0].is_write_only() && descs[0].len() >= 16);
            assert_eq!(req.data.len(), descs.len() - 2);
            assert!(req.data.len() <= limits.seg_max as usize);
            let mut total = 0u64;
            for (&(addr, len), d) in req.data.iter().zip(&descs[1..]) {
                assert_eq!((addr, len), (d.addr(), d.len()));
                assert!(len <= limits.size_max && inside(addr, len));
                total += u64::from(len);
            }
            assert_eq!(req.data_len, total);
            if matches!(req.request_type, RequestType::In | RequestType::Out) {
                assert_eq!(req.data_len % SECTOR_SIZE, 0);
                assert!(req.sector + req.data_len / SECTOR_SIZE <= limits.capacity_sectors);
            }
        }
        Err(ParseError { status, .. }) => {
            if let Some(status) = status {
                let last = descs[descs.len().min(MAX_CHAIN_LEN + 1) - 1];
                assert!(last.is_write_only() && inside(status, 1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::mpsc;
    use std::time::Duration;

    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_WRITE_ZEROES,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::ByteValued;

    use super::*;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    /// Per-input time limit when replaying the corpus (a debug build serves any of them in
    /// milliseconds).
    const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);

    fn corpus_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
    }

    /// Memory contents at DATA_START: a request header at `at` (relative to DATA_START).
    fn header(memory: &mut Vec<u8>, at: usize, request_type: u32, sector: u64) {
        if memory.len() < at + 16 {
            memory.resize(at + 16, 0);
        }
        memory[at..at + 4].copy_from_slice(&request_type.to_le_bytes());
        memory[at + 4..at + 8].fill(0);
        memory[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
    }

    const HDR: u64 = DATA_START;
    const BUF: u64 = DATA_START + 0x1000;
    const STATUS: u64 = DATA_START + 0x100;

    /// One three-descriptor request (header, data, status) at table index 0.
    fn single(request_type: u32, sector: u64, data: (u64, u32, u16)) -> FuzzInput {
        let mut memory = Vec::new();
        header(&mut memory, 0, request_type, sector);
        FuzzInput {
            queue_size_log2: 4,
            descriptors: vec![
                (HDR, 16, NEXT, 1),
                (data.0, data.1, data.2 | NEXT, 2),
                (STATUS, 1, WRITE, 0),
            ],
            avail: vec![0],
            memory,
            ..Default::default()
        }
    }

    /// Named seeds for the queue target; they cover each request type and each way a chain
    /// can be malformed.
    pub(super) fn seeds() -> Vec<(&'static str, FuzzInput)> {
        let mut seeds = vec![
            ("seed-read", single(VIRTIO_BLK_T_IN, 4, (BUF, 1024, WRITE))),
            ("seed-write", single(VIRTIO_BLK_T_OUT, 8, (BUF, 512, 0))),
            ("seed-get-id", {
                let mut s = single(VIRTIO_BLK_T_GET_ID, 0, (BUF, 20, WRITE));
                s.flags = FLAG_SERIAL;
                s
            }),
            (
                "seed-read-past-end",
                single(VIRTIO_BLK_T_IN, DISK_SIZE / 512, (BUF, 512, WRITE)),
            ),
            ("seed-unsupported", single(0x77, 0, (BUF, 512, WRITE))),
            ("seed-header-write-only", {
                let mut s = single(VIRTIO_BLK_T_IN, 0, (BUF, 512, WRITE));
                s.descriptors[0].2 |= WRITE;
                s
            }),
            ("seed-outside-memory", {
                single(VIRTIO_BLK_T_IN, 0, (0xffff_ffff_ffff_f000, 0x1000, WRITE))
            }),
            ("seed-write-read-only", {
                let mut s = single(VIRTIO_BLK_T_OUT, 0, (BUF, 512, 0));
                s.flags = FLAG_READ_ONLY;
                s
            }),
        ];

        let mut flush = single(VIRTIO_BLK_T_FLUSH, 0, (0, 0, 0));
        flush.descriptors = vec![(HDR, 16, NEXT, 1), (STATUS, 1, WRITE, 0)];
        flush.flags = FLAG_FLUSH | FLAG_EVENT_IDX;
        seeds.push(("seed-flush", flush));

        // A discard segment (sector 16, 8 sectors, no flags) in a readable descriptor.
        let mut discard = single(VIRTIO_BLK_T_DISCARD, 0, (BUF, 16, 0));
        discard.memory.resize(0x1010, 0);
        discard.memory[0x1000..0x1008].copy_from_slice(&16u64.to_le_bytes());
        discard.memory[0x1008..0x100c].copy_from_slice(&8u32.to_le_bytes());
        seeds.push(("seed-discard", discard.clone()));

        // Write-zeroes of the same segment, with UNMAP (punch a hole) and without (zero the
        // range, or write zeroes where the file system cannot).
        for (name, flags) in [("seed-write-zeroes-unmap", 1u32), ("seed-write-zeroes", 0)] {
            let mut wz = discard.clone();
            wz.memory[0..4].copy_from_slice(&VIRTIO_BLK_T_WRITE_ZEROES.to_le_bytes());
            wz.memory[0x100c..0x1010].copy_from_slice(&flags.to_le_bytes());
            seeds.push((name, wz));
        }

        let mut missing_status = single(VIRTIO_BLK_T_IN, 0, (BUF, 512, WRITE));
        missing_status.descriptors.truncate(2);
        missing_status.descriptors[1].2 = 0;
        seeds.push(("seed-missing-status", missing_status));

        // Chain 0 loops (0 -> 1 -> 0); chain 2 is a valid read served after it.
        let mut looping = single(VIRTIO_BLK_T_IN, 0, (BUF, 512, WRITE));
        looping.descriptors = vec![
            (HDR, 16, NEXT, 1),
            (BUF, 512, NEXT | WRITE, 0),
            (HDR, 16, NEXT, 3),
            (BUF, 512, NEXT | WRITE, 4),
            (STATUS, 1, WRITE, 0),
        ];
        looping.avail = vec![0, 2];
        seeds.push(("seed-looping-chain", looping));

        // The same read through an indirect table at DATA_START + 0x800.
        let mut indirect = single(VIRTIO_BLK_T_IN, 2, (BUF, 512, WRITE));
        let table = DATA_START + 0x800;
        indirect.descriptors = vec![(table, 48, INDIRECT, 0)];
        indirect.memory.resize(0x830, 0);
        for (i, (addr, len, flags, next)) in [
            (HDR, 16u32, NEXT, 1u16),
            (BUF, 512, NEXT | WRITE, 2),
            (STATUS, 1, WRITE, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            let at = 0x800 + 16 * i;
            indirect.memory[at..at + 16].copy_from_slice(d.as_slice());
        }
        seeds.push(("seed-indirect-read", indirect));

        // The header's `next` leaves the table, and an indirect table outside memory.
        let mut next_out = single(VIRTIO_BLK_T_IN, 0, (BUF, 512, WRITE));
        next_out.descriptors[0].3 = 200;
        seeds.push(("seed-next-out-of-range", next_out));
        let mut indirect_out = single(VIRTIO_BLK_T_IN, 0, (BUF, 512, WRITE));
        indirect_out.descriptors = vec![(0x7000_0000_0000, 48, INDIRECT, 0)];
        seeds.push(("seed-indirect-outside-memory", indirect_out));

        // An avail index far ahead of the queue: the device must give up, not spin.
        let mut runaway = single(VIRTIO_BLK_T_IN, 0, (BUF, 512, WRITE));
        runaway.flags = FLAG_BATCH;
        runaway.avail_idx = 0x8000;
        seeds.push(("seed-avail-idx-runaway", runaway));
        seeds
    }

    fn status_at(mem: &GuestMemoryMmap, addr: u64) -> u32 {
        u32::from(mem.read_obj::<u8>(GuestAddress(addr)).unwrap())
    }

    #[test]
    fn blk_fuzz_input_round_trips() {
        for (name, seed) in seeds() {
            assert_eq!(FuzzInput::decode(&seed.encode()), seed, "{name}");
        }
    }

    #[test]
    fn blk_fuzz_seeds_get_the_expected_status() {
        let expect = [
            ("seed-read", VIRTIO_BLK_S_OK),
            ("seed-write", VIRTIO_BLK_S_OK),
            ("seed-get-id", VIRTIO_BLK_S_OK),
            ("seed-flush", VIRTIO_BLK_S_OK),
            ("seed-discard", VIRTIO_BLK_S_OK),
            ("seed-write-zeroes", VIRTIO_BLK_S_OK),
            ("seed-write-zeroes-unmap", VIRTIO_BLK_S_OK),
            ("seed-indirect-read", VIRTIO_BLK_S_OK),
            ("seed-looping-chain", VIRTIO_BLK_S_OK),
            ("seed-read-past-end", VIRTIO_BLK_S_IOERR),
            ("seed-header-write-only", VIRTIO_BLK_S_IOERR),
            ("seed-outside-memory", VIRTIO_BLK_S_IOERR),
            ("seed-write-read-only", VIRTIO_BLK_S_IOERR),
            ("seed-unsupported", VIRTIO_BLK_S_UNSUPP),
        ];
        let seeds = seeds();
        for (name, status) in expect {
            let seed = &seeds.iter().find(|(n, _)| *n == name).unwrap().1;
            let mut input = seed.clone();
            // 0xff marks "never written".
            input.memory.resize(input.memory.len().max(0x101), 0);
            input.memory[0x100] = 0xff;
            let mem = run_block_queue(&input);
            assert_eq!(status_at(&mem, STATUS), status, "{name}");
        }
    }

    /// Runs `f` on a thread; fails the test (naming `what`) if it panics or overruns.
    fn within_time_limit(what: &str, f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        match rx.recv_timeout(REPLAY_TIMEOUT) {
            Ok(()) => worker.join().unwrap(),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = worker.join();
                panic!("{what}: panicked");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{what}: still running after {REPLAY_TIMEOUT:?} (hang)")
            }
        }
    }

    fn replay(target: &str, f: fn(&[u8])) {
        let dir = corpus_dir(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} is empty", dir.display());
        for path in files {
            let data = std::fs::read(&path).unwrap();
            within_time_limit(&path.display().to_string(), move || f(&data));
        }
    }

    /// Bad descriptor chains, via the fuzz corpus, as a unit test.
    #[test]
    fn blk_fuzz_corpus_never_panics_or_hangs() {
        replay("virtio_blk_queue", fuzz_block_queue);
        for (name, seed) in seeds() {
            within_time_limit(name, move || fuzz_block_queue(&seed.encode()));
        }
    }

    #[test]
    fn blk_request_fuzz_corpus_never_panics() {
        replay("virtio_blk_request", fuzz_request_parse);
    }

    /// Writes the named seeds into the queue corpus:
    /// `cargo test -p devices blk_fuzz_write_seeds -- --ignored`.
    #[test]
    #[ignore = "writes files into devices/fuzz/corpus"]
    fn blk_fuzz_write_seeds() {
        let dir = corpus_dir("virtio_blk_queue");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, seed) in seeds() {
            std::fs::write(dir.join(name), seed.encode()).unwrap();
        }
        // The request target: capacity 2048, seg_max 4, size_max 4096, a valid read.
        let dir = corpus_dir("virtio_blk_request");
        std::fs::create_dir_all(&dir).unwrap();
        let mut read = 2048u64.to_le_bytes().to_vec();
        read.push(4);
        read.extend_from_slice(&4096u32.to_le_bytes());
        read.push(3);
        for (addr, len, flags) in [
            (0x100u64, 16u32, NEXT),
            (0x1000, 512, WRITE | NEXT),
            (0x200, 1, WRITE),
        ] {
            read.extend_from_slice(
                RawDescriptor::from(Descriptor::new(addr, len, flags, 0)).as_slice(),
            );
        }
        read.resize(read.len() + 0x100, 0);
        read.extend_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        std::fs::write(dir.join("seed-read"), read).unwrap();
    }

    // Explicit scenarios, built with virtio-queue's mock driver rather than the fuzz format.

    const T_HDR: u64 = 0x4000;
    const T_BUF: u64 = 0x5000;
    const T_STATUS: u64 = 0x6000;
    const T_LOOP: u64 = 0x7000;

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Serves a 16-entry mock queue holding `descs` (at table indices 0, 1, ...) with `heads`
    /// made available, and a request header of `request_type` at `sector` at T_HDR; returns
    /// the memory and the used ring's (id, len) entries.
    fn serve(
        descs: &[RawDescriptor],
        heads: &[u16],
        request_type: u32,
        sector: u64,
    ) -> (GuestMemoryMmap, Vec<(u32, u32)>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        for (i, &head) in heads.iter().enumerate() {
            vq.avail().ring().ref_at(i).unwrap().store(head);
        }
        vq.avail().idx().store(heads.len() as u16);
        mem.write_obj(request_type.to_le(), GuestAddress(T_HDR))
            .unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(T_HDR + 8))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(T_STATUS)).unwrap();

        let mut block = scratch_block(false, None, u64::MAX);
        activate(&mut block, &mem, vq.create_queue().unwrap());
        assert!(block.process_queue(), "the queue is healthy");

        let used = (0..vq.used().idx().load())
            .map(|i| {
                let e: VirtqUsedElem = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
                (e.id(), e.len())
            })
            .collect();
        (mem, used)
    }

    fn read_chain_at(first: u16) -> [RawDescriptor; 3] {
        [
            raw(T_HDR, 16, NEXT, first + 1),
            raw(T_BUF, 512, NEXT | WRITE, first + 2),
            raw(T_STATUS, 1, WRITE, 0),
        ]
    }

    #[test]
    fn blk_looping_chain_is_refused_and_the_next_request_served() {
        // Chain 0 loops 0 -> 1 -> 0 -> ...; chain 2 is a well-formed read after it.
        let mut descs = vec![raw(T_HDR, 16, NEXT, 1), raw(T_LOOP, 512, NEXT | WRITE, 0)];
        descs.extend(read_chain_at(2));
        let (mem, used) = serve(&descs, &[0, 2], VIRTIO_BLK_T_IN, 0);
        // The loop is cut at the queue size and refused (status IOERR in its last writable
        // byte, one byte used); the read then completes normally.
        assert_eq!(used, vec![(0, 1), (2, 513)]);
        assert_eq!(status_at(&mem, T_LOOP + 511), VIRTIO_BLK_S_IOERR);
        assert_eq!(status_at(&mem, T_STATUS), VIRTIO_BLK_S_OK);
    }

    /// Regression: process_queue used to spin forever when avail.idx was more than a queue
    /// size ahead (pop_descriptor_chain refuses the ring, enable_notification keeps saying
    /// there is more).
    #[test]
    fn blk_avail_index_far_ahead_reports_broken_queue_instead_of_spinning() {
        within_time_limit("runaway avail index", || {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
            let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
            vq.avail().idx().store(17);
            let mut block = scratch_block(false, None, u64::MAX);
            activate(&mut block, &mem, vq.create_queue().unwrap());
            assert!(!block.process_queue(), "the queue is reported broken");
            assert_eq!(positions(&block), (0, 0), "nothing was popped");
        });
    }

    #[test]
    fn blk_read_past_end_of_disk_gets_ioerr() {
        let (mem, used) = serve(&read_chain_at(0), &[0], VIRTIO_BLK_T_IN, DISK_SIZE / 512);
        assert_eq!(status_at(&mem, T_STATUS), VIRTIO_BLK_S_IOERR);
        assert_eq!(used, vec![(0, 1)]);
    }

    #[test]
    fn blk_unknown_request_type_gets_unsupp() {
        let (mem, used) = serve(&read_chain_at(0), &[0], 0x77, 0);
        assert_eq!(status_at(&mem, T_STATUS), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(used, vec![(0, 1)]);
    }
}
