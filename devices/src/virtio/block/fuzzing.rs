//! Fuzzing entry points for the virtio-blk request path, shared by the cargo-fuzz targets in
//! `devices/fuzz/` and by the unit tests that replay their corpus.
//!
//! [`fuzz_block_queue`] plays a hostile driver: it lays an arbitrary descriptor table, avail
//! ring and buffer contents out in a small guest memory, activates a [`Block`] over a fresh
//! 1 MiB in-memory disk, and lets the device serve the queue. [`fuzz_request_parse`] feeds an
//! arbitrary descriptor list straight to [`Request::parse`]. Neither may panic or hang, and
//! both check invariants that hold for every input.
//!
//! # Queue input format
//!
//! The shared format of [`crate::virtio::fuzz_util`] (queue size, flags, avail index,
//! descriptors, avail entries, memory contents), with these flag bits: [`FLAG_EVENT_IDX`],
//! [`FLAG_FLUSH`], [`FLAG_READ_ONLY`], [`FLAG_SERIAL`], [`FLAG_BATCH`].
//!
//! Checked for every input: what the shared `Harness` checks for any device (every used entry
//! answers a popped chain, used.idx matches, the published chain is popped and its used
//! entry names its head and reports no more than its writable bytes, a runaway avail index
//! pops nothing and breaks the queue). The device runs with synchronous I/O
//! ([`IoEngine::Sync`]), so every request completes within `process_queue`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::backend::{Disk, DiskOptions};
use super::device::{Block, BlockConfig, IoEngine};
use super::request::{Limits, ParseError, Request, RequestType, MAX_CHAIN_LEN, SECTOR_SIZE};
use crate::irq::IrqTrigger;
use crate::virtio::fuzz_util::{Cursor, Harness, QueueDevice};
pub use crate::virtio::fuzz_util::{
    FuzzInput, AVAIL_RING, DATA_START, DESC_TABLE, FLAG_BATCH, FLAG_EVENT_IDX, MEM_SIZE, USED_RING,
};
use crate::virtio::{Interrupt, VirtioDevice, F_EVENT_IDX};
use crate::GuestMemoryMmap;

/// Size of the scratch disk.
pub const DISK_SIZE: u64 = 1 << 20;

/// Flag: negotiate VIRTIO_BLK_F_FLUSH (writes are then not synced on completion).
pub const FLAG_FLUSH: u8 = 2;
/// Flag: open the disk read-only.
pub const FLAG_READ_ONLY: u8 = 4;
/// Flag: give the disk a serial number (GET_ID).
pub const FLAG_SERIAL: u8 = 8;
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

/// The device's (next_avail, next_used): its own state, not guest-writable memory.
fn positions(block: &Block) -> (u16, u16) {
    let active = block.active.as_ref().expect("the device is active");
    (active.queue.next_avail(), active.queue.next_used())
}

impl QueueDevice for Block {
    fn serve_queue(&mut self) -> bool {
        self.process_queue()
    }

    fn positions(&self) -> (u16, u16) {
        positions(self)
    }
}

/// The features a fuzz input asks for: everything the device offers, with FLUSH and
/// EVENT_IDX as its flags say.
fn input_features(input: &FuzzInput) -> u64 {
    let mut features = !(1 << VIRTIO_BLK_F_FLUSH | F_EVENT_IDX);
    if input.has(FLAG_EVENT_IDX) {
        features |= F_EVENT_IDX;
    }
    if input.has(FLAG_FLUSH) {
        features |= 1 << VIRTIO_BLK_F_FLUSH;
    }
    features
}

/// Runs one queue input; returns the guest memory afterwards (for tests).
pub fn run_block_queue(input: &FuzzInput) -> GuestMemoryMmap {
    let serial = input.has(FLAG_SERIAL).then_some("podvm-fuzz-serial-0123");
    let mut block = scratch_block(input.has(FLAG_READ_ONLY), serial, input_features(input));
    let mut harness = Harness::new(input, input.has(FLAG_EVENT_IDX));
    activate(&mut block, harness.mem(), harness.queue());

    let healthy = if input.has(FLAG_BATCH) {
        harness.run_batch(&mut block, input.avail_idx)
    } else {
        // A broken queue is served no more: the steps stop there.
        let mut healthy = true;
        for _ in 0..input.avail.len() {
            let published = harness.publish(&block, MAX_CHAIN_LEN + 1);
            healthy = harness.serve(&mut block, published).healthy;
            if !healthy {
                break;
            }
        }
        healthy
    };
    let broken_queues = || block.metrics.broken_queues.load(Ordering::Relaxed);
    if healthy {
        assert_eq!(broken_queues(), 0, "a breakage counted, none reported");
    } else {
        assert_eq!(broken_queues(), 1, "one breakage, counted once");
        check_stays_broken(&mut block, &mut harness);
    }
    harness.mem().clone()
}

/// The queue was reported broken: a chain published now, without a reset, is not served, and
/// nothing the guest or the counters can see moves.
fn check_stays_broken(block: &mut Block, harness: &mut Harness) {
    let _published = harness.publish(block, 0);
    let mut before = vec![0u8; MEM_SIZE as usize];
    harness
        .mem()
        .read_slice(&mut before, GuestAddress(0))
        .expect("the fuzz memory is one region from 0");
    let positions_before = positions(block);
    let interrupts_before = block.metrics.interrupts.load(Ordering::Relaxed);
    assert!(
        !block.process_queue(),
        "a broken queue is healthy again without a reset"
    );
    assert_eq!(positions(block), positions_before, "a broken queue served");
    assert_eq!(
        block.metrics.interrupts.load(Ordering::Relaxed),
        interrupts_before,
        "a broken queue raised an interrupt"
    );
    assert_eq!(
        block.metrics.broken_queues.load(Ordering::Relaxed),
        1,
        "a broken queue counted again"
    );
    let mut after = vec![0u8; MEM_SIZE as usize];
    harness
        .mem()
        .read_slice(&mut after, GuestAddress(0))
        .expect("the fuzz memory is one region from 0");
    assert!(before == after, "a broken queue wrote guest memory");
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
    let mut c = Cursor::new(data);
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
    let rest = c.rest();
    let contents = &rest[..rest.len().min(MEM_SIZE as usize)];
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
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_WRITE_ZEROES,
    };
    use virtio_queue::desc::split::VirtqUsedElem;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::ByteValued;

    use super::*;
    use crate::virtio::fuzz_util::testing::{
        assert_round_trips, corpus_dir, replay, replay_with_seeds, within_time_limit, write_seeds,
    };

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
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
        assert_round_trips(&seeds());
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

    /// Bad descriptor chains, via the fuzz corpus, as a unit test.
    #[test]
    fn blk_fuzz_corpus_never_panics_or_hangs() {
        replay_with_seeds("virtio_blk_queue", fuzz_block_queue, seeds());
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
        write_seeds("virtio_blk_queue", &seeds());
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
    fn blk_broken_queue_is_counted_once_and_served_again_only_after_a_reset() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        vq.avail().idx().store(17);
        let mut block = scratch_block(false, None, u64::MAX);
        activate(&mut block, &mem, vq.create_queue().unwrap());
        let broken = |b: &Block| b.metrics.broken_queues.load(Ordering::Relaxed);
        // A driver kicking the broken rings over and over: one breakage.
        for _ in 0..5 {
            assert!(!block.process_queue());
        }
        assert_eq!(broken(&block), 1);
        // Rings put right without a reset are still not served.
        vq.avail().idx().store(0);
        assert!(!block.process_queue());
        assert_eq!(broken(&block), 1);
        // After a reset and a new activation the queue is served again.
        block.reset();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        activate(&mut block, &mem, vq.create_queue().unwrap());
        assert!(block.process_queue(), "a reset device serves its new rings");
        assert_eq!(broken(&block), 1);
    }

    #[test]
    fn blk_read_past_end_of_disk_gets_ioerr() {
        let (mem, used) = serve(&read_chain_at(0), &[0], VIRTIO_BLK_T_IN, DISK_SIZE / 512);
        assert_eq!(status_at(&mem, T_STATUS), VIRTIO_BLK_S_IOERR);
        assert_eq!(used, vec![(0, 1)]);
    }

    /// Runs `f` on a device with `features`, activated on a 16-entry queue whose avail ring
    /// offers one write-zeroes chain (head 0, one segment of `sectors` sectors from
    /// `sector`) `times` times.
    fn with_write_zeroes_queue<R>(
        features: u64,
        (sector, sectors): (u64, u32),
        times: u16,
        f: impl FnOnce(&GuestMemoryMmap, &MockSplitQueue<GuestMemoryMmap>, &mut Block) -> R,
    ) -> R {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let descs = [
            raw(T_HDR, 16, NEXT, 1),
            raw(T_BUF, 16, NEXT, 2),
            raw(T_STATUS, 1, WRITE, 0),
        ];
        for (i, d) in descs.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        for i in 0..usize::from(times) {
            vq.avail().ring().ref_at(i).unwrap().store(0);
        }
        vq.avail().idx().store(times);
        mem.write_obj(VIRTIO_BLK_T_WRITE_ZEROES.to_le(), GuestAddress(T_HDR))
            .unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(T_BUF)).unwrap();
        mem.write_obj(sectors.to_le(), GuestAddress(T_BUF + 8))
            .unwrap();
        let mut block = scratch_block(false, None, features);
        activate(&mut block, &mem, vq.create_queue().unwrap());
        f(&mem, &vq, &mut block)
    }

    #[test]
    fn blk_pass_ends_on_its_budget_of_synchronous_work() {
        // 16 write-zeroes requests of the whole 1 MiB disk: a pass stops once it has zeroed
        // PASS_BUDGET, the next serves the rest.
        let whole_disk = (0, (DISK_SIZE / 512) as u32);
        with_write_zeroes_queue(u64::MAX, whole_disk, 16, |mem, vq, block| {
            let per_pass = super::super::device::PASS_BUDGET.div_ceil(DISK_SIZE + 4096);
            assert!(block.process_queue());
            assert_eq!(vq.used().idx().load(), per_pass as u16);
            assert_eq!(block.metrics.budget_spent.load(Ordering::Relaxed), 1);
            assert_eq!(block.queue_events()[0].read().unwrap(), 1, "rescheduled");
            assert!(block.process_queue());
            assert_eq!(vq.used().idx().load(), 16);
            assert_eq!(status_at(mem, T_STATUS), VIRTIO_BLK_S_OK);
        });
    }

    /// One write-zeroes request (sectors 8..16) on a device with `features`: its status and
    /// the device's write-through syncs.
    fn write_zeroes_with(features: u64) -> (u32, u64) {
        with_write_zeroes_queue(features, (8, 8), 1, |mem, _, block| {
            assert!(block.process_queue());
            let syncs = block.metrics.write_through_syncs.load(Ordering::Relaxed);
            (status_at(mem, T_STATUS), syncs)
        })
    }

    #[test]
    fn blk_write_zeroes_without_flush_is_made_durable_before_it_completes() {
        let no_flush = !(1 << VIRTIO_BLK_F_FLUSH);
        assert_eq!(write_zeroes_with(no_flush), (VIRTIO_BLK_S_OK, 1));
        // With FLUSH the driver asks for durability itself.
        assert_eq!(write_zeroes_with(u64::MAX), (VIRTIO_BLK_S_OK, 0));
    }

    #[test]
    fn blk_unknown_request_type_gets_unsupp() {
        let (mem, used) = serve(&read_chain_at(0), &[0], 0x77, 0);
        assert_eq!(status_at(&mem, T_STATUS), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(used, vec![(0, 1)]);
    }
}
