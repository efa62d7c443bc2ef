//! What the virtio queue fuzz harnesses (virtio-blk, virtio-rng) have in common: the byte
//! format that describes a hostile driver's queue, its layout in a small guest memory, and a
//! driver loop that hands the device one chain at a time and checks what must hold for any
//! device and any input.
//!
//! # Queue input format ([`FuzzInput`])
//!
//! | bytes      | meaning                                                                  |
//! |------------|--------------------------------------------------------------------------|
//! | 0          | queue size: `1 << (b % 9)` (1 to 256)                                    |
//! | 1          | flags: [`FLAG_EVENT_IDX`], [`FLAG_BATCH`], and the device's own bits     |
//! | 2..4       | avail index (LE), used in batch mode only                                |
//! | 4          | number of descriptors (clamped to the queue size)                        |
//! | 5          | number of avail ring entries (clamped to the queue size)                 |
//! | 16 each    | raw descriptors: addr u64, len u32, flags u16, next u16 (LE), unchecked   |
//! | 2 each     | avail ring entries (LE head indices, unchecked)                          |
//! | the rest   | guest memory contents from [`DATA_START`] on                             |
//!
//! Missing bytes read as zero. In step mode (the default) the harness publishes one avail
//! entry per pass of the device, so it knows exactly which chain the device saw and can check
//! its used entry; batch mode writes the avail index as given (it may be anything, including
//! more than a queue size ahead) and serves the queue once.
//!
//! Checked for every device and input by `Harness`, against the device's own queue
//! positions (which the guest cannot write): every used entry answers a popped chain; used.idx
//! in guest memory matches the device's count; in step mode the published chain is always
//! popped, and when it is the only one, its used entry names its head and reports no more
//! bytes than the chain's writable descriptors hold (a head outside the table gets no used
//! entry); in batch mode an avail index more than a queue size ahead pops nothing and reports
//! the queue broken. Each device's harness adds what is particular to it.

use std::ops::Range;

use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

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

/// Flag: negotiate VIRTIO_RING_F_EVENT_IDX (where the device offers it).
pub const FLAG_EVENT_IDX: u8 = 1;
/// Flag: write the avail index from the input and serve the queue once.
pub const FLAG_BATCH: u8 = 16;

/// Reads little-endian fields off the front of a byte string; bytes past its end read as
/// zero, so that every input decodes to something.
pub(crate) struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    /// A reader at the start of `data`.
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    pub(crate) fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    /// What has not been read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.0
    }
}

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

impl FuzzInput {
    /// The queue size.
    pub fn queue_size(&self) -> u16 {
        1 << (self.queue_size_log2 % 9)
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Decodes any byte string.
    pub fn decode(data: &[u8]) -> Self {
        let mut c = Cursor::new(data);
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
        let rest = c.rest();
        let memory = rest[..rest.len().min(room)].to_vec();
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
        for &descriptor in &self.descriptors {
            out.extend_from_slice(&descriptor_bytes(descriptor));
        }
        for head in &self.avail {
            out.extend_from_slice(&head.to_le_bytes());
        }
        out.extend_from_slice(&self.memory);
        out
    }
}

/// A descriptor (addr, len, flags, next) as the 16 bytes a descriptor table holds.
pub fn descriptor_bytes((addr, len, flags, next): (u64, u32, u16, u16)) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&addr.to_le_bytes());
    out[8..12].copy_from_slice(&len.to_le_bytes());
    out[12..14].copy_from_slice(&flags.to_le_bytes());
    out[14..].copy_from_slice(&next.to_le_bytes());
    out
}

/// A small, fixed-seed pseudo-random generator (SplitMix64): deterministic entropy for a
/// device under test, and reproducible random inputs for unit tests. Not for cryptography.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose whole output is fixed by `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 pseudo-random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// What the harness needs from the device under test.
pub(crate) trait QueueDevice {
    /// Serves the queue as the event loop would after a notification; `false` if the device
    /// found the rings broken.
    fn serve_queue(&mut self) -> bool;
    /// The device's (next_avail, next_used): its own state, not guest-writable memory.
    fn positions(&self) -> (u16, u16);
}

/// A chain the harness made available and has not yet had served.
pub(crate) struct Published {
    head: u16,
    chain: Vec<Descriptor>,
    avail_before: u16,
    used_before: u16,
}

/// What one step did: the chain the harness published and what the device made of it.
#[derive(Debug)]
pub(crate) struct Step {
    /// The published chain's head index.
    pub head: u16,
    /// Its descriptors as the device walks them (indirect tables followed), up to the limit
    /// the harness was given.
    pub chain: Vec<Descriptor>,
    /// Chains the device popped in this step (more than one only if the chain's own buffers
    /// overlap the avail ring and the device's writes moved avail.idx).
    pub popped: u16,
    /// The used entries the device added in this step, in order.
    pub used: Vec<VirtqUsedElem>,
    /// Whether the device still considers the queue healthy.
    pub healthy: bool,
}

impl Step {
    /// The used entry answering the published chain, when the device popped that chain alone.
    pub fn answer(&self) -> Option<&VirtqUsedElem> {
        if self.popped == 1 {
            self.used.first()
        } else {
            None
        }
    }
}

/// The sum of the lengths of the device-writable descriptors of `chain`.
pub(crate) fn writable_bytes(chain: &[Descriptor]) -> u64 {
    chain
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum()
}

/// A fuzz input laid out in guest memory, and a driver that publishes its chains.
pub(crate) struct Harness {
    mem: GuestMemoryMmap,
    size: u16,
    event_idx: bool,
    /// A queue of the same geometry as the device's, used only to walk the next chain the
    /// way the device will walk it.
    shadow: Queue,
}

impl Harness {
    /// A fresh guest memory holding `input`'s descriptor table, avail ring entries and memory
    /// contents (avail.idx stays 0: nothing is published yet).
    pub(crate) fn new(input: &FuzzInput, event_idx: bool) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("allocating guest memory");
        for (i, &(addr, len, flags, next)) in input.descriptors.iter().enumerate() {
            mem.write_obj(
                Descriptor::new(addr, len, flags, next),
                GuestAddress(DESC_TABLE + 16 * i as u64),
            )
            .expect("the descriptor table lies in guest memory");
        }
        for (i, &head) in input.avail.iter().enumerate() {
            mem.write_obj(head.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * i as u64))
                .expect("the avail ring lies in guest memory");
        }
        mem.write_slice(&input.memory, GuestAddress(DATA_START))
            .expect("the data area lies in guest memory");
        let size = input.queue_size();
        Self {
            mem,
            size,
            event_idx,
            shadow: fuzz_queue(size, event_idx),
        }
    }

    /// The guest memory.
    pub(crate) fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The queue size.
    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// A ready queue for the device to activate with.
    pub(crate) fn queue(&self) -> Queue {
        fuzz_queue(self.size, self.event_idx)
    }

    /// Where the used ring lies (flags, idx, the entries and avail_event): the bytes the
    /// queue itself writes, as opposed to the device's buffers.
    pub(crate) fn used_ring_bytes(&self) -> Range<usize> {
        let start = USED_RING as usize;
        start..start + 6 + 8 * usize::from(self.size)
    }

    /// used.idx as the guest sees it.
    fn used_idx(&self) -> u16 {
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(USED_RING + 2))
            .expect("the used ring lies in guest memory");
        u16::from_le(idx)
    }

    /// The used entries in positions `from..to` of the used ring.
    pub(crate) fn used_entries(&self, from: u16, to: u16) -> Vec<VirtqUsedElem> {
        let count = to.wrapping_sub(from);
        (0..count)
            .map(|i| {
                let slot = from.wrapping_add(i) % self.size;
                let at = USED_RING + 4 + 8 * u64::from(slot);
                self.mem
                    .read_obj(GuestAddress(at))
                    .expect("the used ring lies in guest memory")
            })
            .collect()
    }

    /// Batch mode: writes `avail_idx` and serves the queue once. Returns whether the device
    /// found the queue healthy.
    pub(crate) fn run_batch(&self, device: &mut impl QueueDevice, avail_idx: u16) -> bool {
        self.mem
            .write_obj(avail_idx.to_le(), GuestAddress(AVAIL_RING + 2))
            .expect("the avail ring lies in guest memory");
        let healthy = device.serve_queue();
        let (next_avail, next_used) = device.positions();
        // Every used entry answers a popped chain.
        assert!(
            next_used <= next_avail,
            "{next_used} used for {next_avail} popped"
        );
        if avail_idx > self.size {
            // The device cannot trust such a ring: it pops nothing and reports it broken.
            assert_eq!((next_avail, next_used), (0, 0));
            assert!(
                !healthy,
                "an avail index {avail_idx} ahead of a queue of {}",
                self.size
            );
        }
        assert_eq!(self.used_idx(), next_used, "used.idx in guest memory");
        healthy
    }

    /// Publishes the next avail entry, and walks the chain it names the way the device will
    /// (the first `chain_limit` descriptors). Also applies what the device's first
    /// `disable_notification` writes, so that the walk sees memory exactly as the device's
    /// will (an indirect table may overlap the rings).
    pub(crate) fn publish(&mut self, device: &impl QueueDevice, chain_limit: usize) -> Published {
        let (avail_before, used_before) = device.positions();
        self.mem
            .write_obj(
                avail_before.wrapping_add(1).to_le(),
                GuestAddress(AVAIL_RING + 2),
            )
            .expect("the avail ring lies in guest memory");
        if !self.event_idx {
            self.mem
                .write_obj(1u16.to_le(), GuestAddress(USED_RING))
                .expect("the used ring lies in guest memory");
        }
        self.shadow.set_next_avail(avail_before);
        let chain = self
            .shadow
            .pop_descriptor_chain(&self.mem)
            .expect("the harness published an avail entry");
        let head = chain.head_index();
        Published {
            head,
            chain: chain.take(chain_limit).collect(),
            avail_before,
            used_before,
        }
    }

    /// Has the device serve what `publish` made available, and checks the step against the
    /// device's positions.
    pub(crate) fn serve(&self, device: &mut impl QueueDevice, published: Published) -> Step {
        let Published {
            head,
            chain,
            avail_before,
            used_before,
        } = published;
        let healthy = device.serve_queue();
        let (avail_after, used_after) = device.positions();
        let popped = avail_after.wrapping_sub(avail_before);
        let used_count = used_after.wrapping_sub(used_before);
        // The published entry is always popped; more only if the chain's own writes moved
        // avail.idx (guest memory is the guest's to scribble on, even through the device).
        assert!(popped >= 1, "the published chain was not popped");
        assert!(
            used_count <= popped,
            "{used_count} used entries for {popped} popped chains"
        );
        assert_eq!(self.used_idx(), used_after, "used.idx in guest memory");
        let used = self.used_entries(used_before, used_after);
        let step = Step {
            head,
            chain,
            popped,
            used,
            healthy,
        };
        if popped == 1 {
            self.check_answer(&step);
        }
        step
    }

    /// The one popped chain got the used entry it should: one naming its head, with no more
    /// bytes than it has room for, or none at all for a head outside the table.
    fn check_answer(&self, step: &Step) {
        let head = step.head;
        if head >= self.size {
            assert!(
                step.used.is_empty(),
                "a used entry for out-of-range head {head}"
            );
            return;
        }
        let elem = step
            .answer()
            .expect("a chain with a valid head got no used entry");
        assert_eq!(elem.id(), u32::from(head), "used entry for the wrong chain");
        let writable = writable_bytes(&step.chain);
        assert!(
            u64::from(elem.len()) <= writable,
            "used len {} > {writable} writable bytes",
            elem.len()
        );
    }
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

/// Whether `len` bytes at `addr` lie inside the fuzz guest memory (one region from 0). A
/// zero-length buffer holds no byte, so it lies anywhere.
pub(crate) fn inside_memory(addr: GuestAddress, len: u32) -> bool {
    len == 0
        || addr
            .raw_value()
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= MEM_SIZE)
}

/// Helpers for the unit tests that replay fuzz inputs.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    use super::FuzzInput;

    pub(crate) use crate::fuzz_replay::within_time_limit;

    /// The committed corpus of the fuzz target `target`.
    pub(crate) fn corpus_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
    }

    /// Runs `f` over every file of `target`'s corpus, each within the time limit; fails if
    /// the corpus is empty. Returns how many inputs ran.
    pub(crate) fn replay(target: &str, f: fn(&[u8])) -> usize {
        crate::fuzz_replay::replay_dir(&corpus_dir(target), f)
    }

    /// Runs `f` over `target`'s corpus, then over the encoded `seeds` (which may be newer
    /// than the corpus), each within the time limit. Returns how many corpus inputs ran.
    pub(crate) fn replay_with_seeds(
        target: &str,
        f: fn(&[u8]),
        seeds: Vec<(&'static str, FuzzInput)>,
    ) -> usize {
        let replayed = replay(target, f);
        for (name, seed) in seeds {
            within_time_limit(name, move || f(&seed.encode()));
        }
        replayed
    }

    /// Each seed survives encoding and decoding unchanged.
    pub(crate) fn assert_round_trips(seeds: &[(&str, FuzzInput)]) {
        for (name, seed) in seeds {
            assert_eq!(&FuzzInput::decode(&seed.encode()), seed, "{name}");
        }
    }

    /// Writes each seed, encoded, into `target`'s corpus under its name.
    pub(crate) fn write_seeds(target: &str, seeds: &[(&str, FuzzInput)]) {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, seed) in seeds {
            std::fs::write(dir.join(name), seed.encode()).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITE: u16 = 2;

    /// A device that pops every chain and answers it with a fixed, made-up length, to show
    /// that the harness notices a device that misreports.
    struct Liar {
        mem: GuestMemoryMmap,
        queue: Queue,
        len: u32,
    }

    impl QueueDevice for Liar {
        fn serve_queue(&mut self) -> bool {
            while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
                let head = chain.head_index();
                self.queue.add_used(&self.mem, head, self.len).unwrap();
            }
            true
        }

        fn positions(&self) -> (u16, u16) {
            (self.queue.next_avail(), self.queue.next_used())
        }
    }

    /// One 64-byte writable buffer at DATA_START, made available.
    fn one_buffer() -> FuzzInput {
        FuzzInput {
            queue_size_log2: 2,
            descriptors: vec![(DATA_START, 64, WRITE, 0)],
            avail: vec![0],
            ..Default::default()
        }
    }

    fn step_with(len: u32) -> Step {
        let mut h = Harness::new(&one_buffer(), false);
        let mut liar = Liar {
            mem: h.mem().clone(),
            queue: h.queue(),
            len,
        };
        let published = h.publish(&liar, 8);
        h.serve(&mut liar, published)
    }

    #[test]
    fn fuzz_harness_accepts_an_honest_used_entry() {
        let step = step_with(64);
        assert_eq!(step.answer().map(|e| (e.id(), e.len())), Some((0, 64)));
        assert_eq!(writable_bytes(&step.chain), 64);
    }

    #[test]
    #[should_panic(expected = "used len 65 > 64 writable bytes")]
    fn fuzz_harness_catches_a_used_length_beyond_the_buffers() {
        step_with(65);
    }

    #[test]
    fn fuzz_cursor_reads_zeroes_past_the_end() {
        let mut c = Cursor::new(&[1, 2, 3]);
        assert_eq!(c.u16(), 0x0201);
        assert_eq!(c.u32(), 3);
        assert_eq!(c.u64(), 0);
        assert!(c.rest().is_empty());
    }

    #[test]
    fn fuzz_inside_memory_handles_the_edges() {
        assert!(inside_memory(GuestAddress(MEM_SIZE - 4), 4));
        assert!(!inside_memory(GuestAddress(MEM_SIZE - 4), 5));
        assert!(!inside_memory(GuestAddress(u64::MAX - 1), 4));
        assert!(inside_memory(GuestAddress(u64::MAX), 0));
    }

    #[test]
    fn fuzz_splitmix_is_fixed_by_its_seed() {
        let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
        let (mut x, mut y) = ([0u8; 13], [0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert_ne!(x, [0u8; 13]);
        assert_ne!(SplitMix64::new(8).next_u64(), SplitMix64::new(7).next_u64());
    }
}
