//! Fuzzing entry point for the virtio-rng request queue, shared by the cargo-fuzz target
//! `virtio_rng_queue` in `devices/fuzz/` and by the unit tests below that replay its corpus.
//!
//! [`fuzz_rng_queue`] plays a hostile driver: it lays an arbitrary descriptor table, avail
//! ring and buffer contents out in a small guest memory, activates a real [`Rng`] whose
//! entropy comes from a fixed-seed generator that logs what it hands out, and lets the device
//! serve the queue. It must neither panic nor hang.
//!
//! # Input format
//!
//! The shared format of [`crate::virtio::fuzz_util`], with these flag bits:
//! [`FLAG_EVENT_IDX`] (negotiated only if the device offers it, as a transport would; it does
//! not today), [`FLAG_ENTROPY_FAILS`] (the entropy source fails, as `getrandom(2)` does before
//! the host's pool is ready) and [`FLAG_BATCH`].
//!
//! # What is checked
//!
//! Everything the shared `Harness` checks for any device: every used entry answers a popped chain,
//! used.idx in guest memory is the device's count, a used entry names the published head and
//! reports no more bytes than the chain's writable descriptors hold, a head outside the table
//! gets no used entry, and an avail index more than a queue size ahead pops nothing and breaks
//! the queue. On top of that, after every pass:
//!
//! - each popped chain shows in exactly one counter (`requests`, `bad_chains` or
//!   `entropy_errors`), and the `bytes` counter equals the entropy drawn;
//! - no interrupt without a used entry: the `interrupts` counted are at most the used entries
//!   added, and the interrupt status shows a used-ring interrupt only once one was counted;
//! - a pass that spends its budget has popped something (so serving again makes progress).
//!
//! Once the device reports the queue broken, the run publishes one more chain (a driver that
//! puts its rings right without resetting the device) and checks that the device stays
//! broken: it pops nothing, writes nothing, counts nothing but the one breakage
//! (`broken_queues` is 1) and raises no interrupt.
//!
//! And for a chain published and popped alone, judged from its descriptors by the harness
//! (not by the device's own checks): a chain that is not a complete list of at most
//! [`MAX_DESCRIPTORS`] device-writable buffers inside guest memory (a readable descriptor, a
//! buffer outside memory, too many descriptors, a loop or a dangling `next`) gets 0 bytes,
//! draws no entropy and changes nothing; with a failing source a good chain gets 0 bytes and
//! changes nothing; any other chain gets exactly its writable bytes up to
//! [`MAX_REQUEST_BYTES`], and guest memory afterwards is memory before with the drawn bytes
//! laid into its buffers in order: not one other byte outside the used ring changes.

use std::io;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress};

use super::device::{EntropySource, QueueStatus, Rng, MAX_DESCRIPTORS, MAX_REQUEST_BYTES};
use super::metrics::RngMetrics;
use crate::irq::IrqTrigger;
use crate::virtio::fuzz_util::{
    inside_memory, writable_bytes, Harness, QueueDevice, SplitMix64, Step, MEM_SIZE,
};
pub use crate::virtio::fuzz_util::{FuzzInput, FLAG_BATCH, FLAG_EVENT_IDX};
use crate::virtio::{
    Interrupt, VirtioDevice, F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, INT_VRING,
};
use crate::GuestMemoryMmap;

/// Flag: the entropy source fails every time.
pub const FLAG_ENTROPY_FAILS: u8 = 2;

/// Seed of the device's entropy in a fuzz run (any fixed value: runs must be reproducible).
pub const ENTROPY_SEED: u64 = 0x7669_7274_696f_726e;

/// Most passes one notification gets: a pass stops after its budget, and a guest whose
/// buffers overlap the avail ring can keep refilling it through the device's own writes.
const MAX_PASSES: usize = 64;

/// Bytes the entropy source has handed out that the harness has not yet accounted for.
type Drawn = Arc<Mutex<Vec<u8>>>;

/// Takes what the source handed out since the last call.
fn take_drawn(drawn: &Drawn) -> Vec<u8> {
    std::mem::take(&mut *drawn.lock().expect("the entropy log is never poisoned"))
}

/// A deterministic entropy source that logs every byte it hands out into `drawn`, or, with
/// `fails`, one that always fails the way `getrandom(2)` does before the host's pool is ready.
fn recording_source(drawn: Drawn, fails: bool) -> EntropySource {
    let mut generator = SplitMix64::new(ENTROPY_SEED);
    Box::new(move |buf: &mut [u8]| {
        if fails {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        generator.fill(buf);
        drawn
            .lock()
            .expect("the entropy log is never poisoned")
            .extend_from_slice(buf);
        Ok(())
    })
}

/// The device's (next_avail, next_used): its own state, not guest-writable memory.
fn positions(rng: &Rng) -> (u16, u16) {
    let active = rng.active.as_ref().expect("the device is active");
    (active.queue.next_avail(), active.queue.next_used())
}

impl QueueDevice for Rng {
    /// Serves the queue as the event loop would: again while a pass ends with its budget
    /// spent (the event handler reschedules itself then), up to [`MAX_PASSES`].
    fn serve_queue(&mut self) -> bool {
        for _ in 0..MAX_PASSES {
            let (avail_before, _) = positions(self);
            match self.process_queue() {
                QueueStatus::Drained => return true,
                QueueStatus::Broken => return false,
                QueueStatus::BudgetSpent => assert_ne!(
                    positions(self).0,
                    avail_before,
                    "a pass spent its budget without popping a chain"
                ),
            }
        }
        true
    }

    fn positions(&self) -> (u16, u16) {
        positions(self)
    }
}

/// The counters the invariants speak of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    requests: u64,
    bytes: u64,
    bad_chains: u64,
    entropy_errors: u64,
}

impl Counts {
    /// The device's counters now.
    fn read(m: &RngMetrics) -> Self {
        Self {
            requests: RngMetrics::get(&m.requests),
            bytes: RngMetrics::get(&m.bytes),
            bad_chains: RngMetrics::get(&m.bad_chains),
            entropy_errors: RngMetrics::get(&m.entropy_errors),
        }
    }

    /// What changed since `earlier`.
    fn since(self, earlier: Self) -> Self {
        Self {
            requests: self.requests - earlier.requests,
            bytes: self.bytes - earlier.bytes,
            bad_chains: self.bad_chains - earlier.bad_chains,
            entropy_errors: self.entropy_errors - earlier.entropy_errors,
        }
    }

    /// Chains the device dealt with: each lands in exactly one of these counters.
    fn chains(self) -> u64 {
        self.requests + self.bad_chains + self.entropy_errors
    }
}

/// What the device must do with one chain, judged from its descriptors alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    /// Not a complete list of writable buffers in memory: 0 bytes, no entropy drawn.
    Refused,
    /// A good chain, but the entropy source fails: 0 bytes.
    NoEntropy,
    /// A good chain: its first `n` writable bytes filled.
    Filled(usize),
}

impl Expected {
    /// What `chain` (walked up to `MAX_DESCRIPTORS + 1` descriptors) must get.
    fn of(chain: &[Descriptor], source_fails: bool) -> Self {
        let Some(last) = chain.last() else {
            return Expected::Refused;
        };
        let complete = !last.has_next() && chain.len() <= MAX_DESCRIPTORS;
        let all_writable_in_memory = chain
            .iter()
            .all(|d| d.is_write_only() && inside_memory(d.addr(), d.len()));
        if !(complete && all_writable_in_memory) {
            Expected::Refused
        } else if source_fails {
            Expected::NoEntropy
        } else {
            let n = writable_bytes(chain).min(MAX_REQUEST_BYTES as u64);
            Expected::Filled(n as usize)
        }
    }

    /// The bytes the chain's used entry must report.
    fn bytes(self) -> usize {
        match self {
            Expected::Filled(n) => n,
            Expected::Refused | Expected::NoEntropy => 0,
        }
    }

    /// How the counters must move.
    fn counts(self) -> Counts {
        match self {
            Expected::Refused => Counts {
                bad_chains: 1,
                ..Counts::default()
            },
            Expected::NoEntropy => Counts {
                entropy_errors: 1,
                ..Counts::default()
            },
            Expected::Filled(n) => Counts {
                requests: 1,
                bytes: n as u64,
                ..Counts::default()
            },
        }
    }
}

/// All of guest memory, as bytes.
fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = vec![0u8; MEM_SIZE as usize];
    mem.read_slice(&mut out, GuestAddress(0))
        .expect("the fuzz memory is one region from 0");
    out
}

/// `before` with `random` laid into the buffers of `chain` in order, as the device must
/// write it. Buffers are known to lie in memory; zero-length ones are skipped (they may lie
/// anywhere).
fn filled(before: &[u8], chain: &[Descriptor], random: &[u8]) -> Vec<u8> {
    let mut expected = before.to_vec();
    let mut rest = random;
    for d in chain {
        let take = (d.len() as usize).min(rest.len());
        if take == 0 {
            continue;
        }
        let start = d.addr().raw_value() as usize;
        expected[start..start + take].copy_from_slice(&rest[..take]);
        rest = &rest[take..];
    }
    expected
}

/// What a run did, for tests.
#[derive(Debug)]
pub struct RngRun {
    /// The used entries the device added, in order, as (head, bytes), read back from the
    /// used ring. (In batch mode: only the last queue size of them, and as they are at the
    /// end, so a later chain whose buffers overlap the used ring may have overwritten some.)
    pub used: Vec<(u32, u32)>,
    /// Chains popped that got no used entry (a head outside the table).
    pub unanswered: u64,
    /// Whether the device reported the queue broken (it then serves nothing more).
    pub broken: bool,
    /// Guest memory afterwards.
    pub mem: GuestMemoryMmap,
}

/// A device under test, the harness driving it and what it watches the device with.
struct RngFuzz {
    harness: Harness,
    rng: Rng,
    interrupt: Arc<Interrupt>,
    drawn: Drawn,
    source_fails: bool,
    run: RngRun,
}

impl RngFuzz {
    /// Lays `input` out and activates a device over it, with the features a driver that
    /// asks for what the input's flags say would end up with.
    fn new(input: &FuzzInput) -> Self {
        let drawn = Drawn::default();
        let source_fails = input.has(FLAG_ENTROPY_FAILS);
        let mut rng = Rng::with_source(recording_source(drawn.clone(), source_fails))
            .expect("creating the device");
        let offered = rng.avail_features();
        let event_idx = input.has(FLAG_EVENT_IDX) && offered & F_EVENT_IDX != 0;
        // A driver takes indirect descriptors where offered (Linux's virtio ring does);
        // the device follows indirect tables either way.
        let mut features = F_VERSION_1 | (offered & F_INDIRECT_DESC);
        if event_idx {
            features |= F_EVENT_IDX;
        }
        rng.set_acked_features(features);
        let harness = Harness::new(input, event_idx);
        let interrupt = Arc::new(Interrupt::new(
            IrqTrigger::new().expect("creating an eventfd"),
        ));
        rng.activate(
            harness.mem().clone(),
            interrupt.clone(),
            vec![harness.queue()],
        )
        .expect("activating the device");
        let run = RngRun {
            used: Vec::new(),
            unanswered: 0,
            broken: false,
            mem: harness.mem().clone(),
        };
        Self {
            harness,
            rng,
            interrupt,
            drawn,
            source_fails,
            run,
        }
    }

    /// The device's counters now.
    fn counts(&self) -> Counts {
        Counts::read(&self.rng.metrics())
    }

    /// Interrupts the device has counted.
    fn interrupts(&self) -> u64 {
        RngMetrics::get(&self.rng.metrics().interrupts)
    }

    /// No interrupt without a used entry: since `interrupts_before`, at most one interrupt
    /// per used entry added (a pass raises at most one, and only for entries it added); and
    /// the used-ring bit of the interrupt status is set only once an interrupt was counted.
    fn check_interrupts(&self, interrupts_before: u64, used_added: u16) {
        let raised = self.interrupts() - interrupts_before;
        assert!(
            raised <= u64::from(used_added),
            "{raised} interrupts for {used_added} used entries"
        );
        let pending = self.interrupt.status() & INT_VRING != 0;
        assert_eq!(
            pending,
            self.interrupts() > 0,
            "used-ring interrupt status vs interrupts counted"
        );
    }

    /// Batch mode: publishes `avail_idx` as it is and serves once.
    fn batch(&mut self, avail_idx: u16) {
        let counts_before = self.counts();
        let interrupts_before = self.interrupts();
        let healthy = self.harness.run_batch(&mut self.rng, avail_idx);
        let (popped, used_count) = positions(&self.rng);
        self.account(popped, counts_before);
        self.check_interrupts(interrupts_before, used_count);
        let size = self.harness.size();
        let used = self
            .harness
            .used_entries(used_count.saturating_sub(size), used_count);
        self.record(healthy, popped - used_count, &used);
    }

    /// Step mode: publishes one chain, serves it, and checks what became of it.
    fn step(&mut self) {
        let published = self.harness.publish(&self.rng, MAX_DESCRIPTORS + 1);
        let before = snapshot(self.harness.mem());
        let counts_before = self.counts();
        let interrupts_before = self.interrupts();
        let step = self.harness.serve(&mut self.rng, published);
        let (drawn, delta) = self.account(step.popped, counts_before);
        if step.popped == 1 {
            self.check_alone(&step, &before, &drawn, delta);
        }
        let used_count = step.used.len() as u16;
        self.check_interrupts(interrupts_before, used_count);
        self.record(step.healthy, step.popped - used_count, &step.used);
    }

    /// Checks that the counters account for each of the `popped` chains once and for every
    /// byte drawn; returns the entropy drawn and how the counters moved. (The used entries are
    /// checked only for a chain popped alone: when several are, a later chain's buffers may
    /// overlap the used ring and overwrite an earlier entry, as the guest allowed.)
    fn account(&self, popped: u16, counts_before: Counts) -> (Vec<u8>, Counts) {
        let drawn = take_drawn(&self.drawn);
        let delta = self.counts().since(counts_before);
        assert_eq!(
            delta.chains(),
            u64::from(popped),
            "{delta:?}: every popped chain is counted once"
        );
        assert_eq!(delta.bytes, drawn.len() as u64, "bytes counted vs drawn");
        (drawn, delta)
    }

    /// A chain popped alone got exactly what its descriptors call for, and guest memory
    /// changed only by the bytes laid into its buffers.
    fn check_alone(&self, step: &Step, before: &[u8], drawn: &[u8], delta: Counts) {
        let expected = Expected::of(&step.chain, self.source_fails);
        assert_eq!(delta, expected.counts(), "{expected:?}: counters");
        if let Some(elem) = step.answer() {
            assert_eq!(
                elem.len() as usize,
                expected.bytes(),
                "{expected:?}: used length of head {}",
                step.head
            );
        }
        assert_eq!(drawn.len(), expected.bytes(), "{expected:?}: entropy drawn");
        let after = snapshot(self.harness.mem());
        let model = filled(before, &step.chain, drawn);
        self.assert_same_outside_used_ring(&model, &after, expected);
    }

    /// `actual` equals `model` everywhere but in the used ring.
    fn assert_same_outside_used_ring(&self, model: &[u8], actual: &[u8], expected: Expected) {
        let ring = self.harness.used_ring_bytes();
        let same =
            model[..ring.start] == actual[..ring.start] && model[ring.end..] == actual[ring.end..];
        if !same {
            let at = (0..model.len())
                .find(|&i| !ring.contains(&i) && model[i] != actual[i])
                .expect("a differing byte");
            panic!(
                "{expected:?}: guest byte {at:#x} is {:#04x}, expected {:#04x}",
                actual[at], model[at]
            );
        }
    }

    /// The queue was reported broken: a chain published now, on rings put right but without
    /// a reset, is not served, and nothing the guest or the counters can see moves.
    fn check_stays_broken(&mut self) {
        let metrics = self.rng.metrics();
        let broken_queues = || RngMetrics::get(&metrics.broken_queues);
        assert_eq!(broken_queues(), 1, "one breakage, counted once");
        let _published = self.harness.publish(&self.rng, 0);
        let before = snapshot(self.harness.mem());
        let positions_before = positions(&self.rng);
        let counts_before = self.counts();
        let interrupts_before = self.interrupts();
        assert!(
            !self.rng.serve_queue(),
            "a broken queue is healthy again without a reset"
        );
        assert_eq!(
            positions(&self.rng),
            positions_before,
            "a broken queue served"
        );
        assert_eq!(
            self.counts(),
            counts_before,
            "a broken queue counted a chain"
        );
        assert_eq!(
            self.interrupts(),
            interrupts_before,
            "a broken queue interrupted"
        );
        assert_eq!(broken_queues(), 1, "a breakage counted again");
        assert!(
            take_drawn(&self.drawn).is_empty(),
            "a broken queue drew entropy"
        );
        assert!(
            snapshot(self.harness.mem()) == before,
            "a broken queue wrote guest memory"
        );
    }

    /// Adds one step's or batch's outcome to the run.
    fn record(&mut self, healthy: bool, unanswered: u16, used: &[VirtqUsedElem]) {
        self.run.broken |= !healthy;
        self.run.unanswered += u64::from(unanswered);
        self.run.used.extend(used.iter().map(|e| (e.id(), e.len())));
    }
}

/// Runs one queue input and checks every invariant; returns what happened (for tests).
pub fn run_rng_queue(input: &FuzzInput) -> RngRun {
    let mut fuzz = RngFuzz::new(input);
    if input.has(FLAG_BATCH) {
        fuzz.batch(input.avail_idx);
    } else {
        // A broken queue is served no more: the steps stop there.
        for _ in 0..input.avail.len() {
            if fuzz.run.broken {
                break;
            }
            fuzz.step();
        }
    }
    if fuzz.run.broken {
        fuzz.check_stays_broken();
    } else {
        let broken_queues = RngMetrics::get(&fuzz.rng.metrics().broken_queues);
        assert_eq!(broken_queues, 0, "a breakage counted, none reported");
    }
    fuzz.run
}

/// The `virtio_rng_queue` fuzz target: any input, no panic, no hang.
pub fn fuzz_rng_queue(data: &[u8]) {
    run_rng_queue(&FuzzInput::decode(data));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::fuzz_util::testing::{
        assert_round_trips, replay_with_seeds, within_time_limit, write_seeds,
    };
    use crate::virtio::fuzz_util::{descriptor_bytes, AVAIL_RING, DATA_START, USED_RING};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    /// Where the hand-built inputs put an indirect table (first, to keep the inputs short).
    const TABLE: u64 = DATA_START;
    /// Buffers of the hand-built inputs, past the largest table.
    const BUF: u64 = DATA_START + 0x2000;

    /// A 16-entry queue holding `descriptors`, with `avail` made available one at a time.
    fn queue(descriptors: &[(u64, u32, u16, u16)], avail: &[u16]) -> FuzzInput {
        FuzzInput {
            queue_size_log2: 4,
            descriptors: descriptors.to_vec(),
            avail: avail.to_vec(),
            ..Default::default()
        }
    }

    /// Puts `entries` into `input`'s memory as a descriptor table at guest address `at`.
    fn with_table(mut input: FuzzInput, at: u64, entries: &[(u64, u32, u16, u16)]) -> FuzzInput {
        let start = (at - DATA_START) as usize;
        let end = start + 16 * entries.len();
        if input.memory.len() < end {
            input.memory.resize(end, 0);
        }
        for (i, &entry) in entries.iter().enumerate() {
            input.memory[start + 16 * i..start + 16 * (i + 1)]
                .copy_from_slice(&descriptor_bytes(entry));
        }
        input
    }

    /// An indirect table at TABLE of `n` one-byte writable buffers, chained.
    fn long_indirect(n: usize) -> FuzzInput {
        let entries: Vec<_> = (0..n)
            .map(|i| {
                let flags = if i + 1 < n { WRITE | NEXT } else { WRITE };
                (BUF + i as u64, 1, flags, (i + 1) as u16)
            })
            .collect();
        let head = [(TABLE, 16 * n as u32, INDIRECT, 0)];
        with_table(queue(&head, &[0]), TABLE, &entries)
    }

    fn flagged(mut input: FuzzInput, flags: u8) -> FuzzInput {
        input.flags = flags;
        input
    }

    fn batch(mut input: FuzzInput, avail_idx: u16) -> FuzzInput {
        input.flags |= FLAG_BATCH;
        input.avail_idx = avail_idx;
        input
    }

    /// Named hand-built inputs, one per way a chain can be good or bad; they also seed the
    /// fuzz corpus.
    fn seeds() -> Vec<(&'static str, FuzzInput)> {
        let one = [(BUF, 64, WRITE, 0)];
        let three_good = [
            (BUF, 64, WRITE, 0),
            (BUF + 0x100, 64, WRITE, 0),
            (BUF + 0x200, 64, WRITE, 0),
        ];
        vec![
            ("seed-one-buffer", queue(&one, &[0])),
            (
                "seed-two-buffers",
                queue(
                    &[(BUF, 100, WRITE | NEXT, 1), (BUF + 0x200, 200, WRITE, 0)],
                    &[0],
                ),
            ),
            (
                "seed-readable",
                queue(
                    &[
                        (BUF, 16, NEXT, 1),
                        (BUF + 0x100, 64, WRITE, 0),
                        (BUF + 0x200, 64, WRITE, 0),
                    ],
                    &[0, 2],
                ),
            ),
            (
                "seed-looping-chain",
                queue(
                    &[
                        (BUF, 64, WRITE | NEXT, 1),
                        (BUF + 0x100, 64, WRITE | NEXT, 0),
                        (BUF + 0x200, 64, WRITE, 0),
                    ],
                    &[0, 2],
                ),
            ),
            (
                "seed-indirect",
                with_table(
                    queue(&[(TABLE, 32, INDIRECT, 0)], &[0]),
                    TABLE,
                    &[(BUF, 64, WRITE | NEXT, 1), (BUF + 0x100, 64, WRITE, 0)],
                ),
            ),
            (
                "seed-indirect-in-indirect",
                with_table(
                    queue(&[(TABLE, 32, INDIRECT, 0)], &[0]),
                    TABLE,
                    &[(BUF, 64, WRITE | NEXT, 1), (TABLE, 32, INDIRECT, 0)],
                ),
            ),
            ("seed-indirect-too-long", long_indirect(MAX_DESCRIPTORS + 1)),
            ("seed-indirect-longest", long_indirect(MAX_DESCRIPTORS)),
            (
                "seed-outside-memory",
                queue(
                    &[(BUF, 64, WRITE | NEXT, 1), (MEM_SIZE - 16, 64, WRITE, 0)],
                    &[0],
                ),
            ),
            (
                "seed-wrapping",
                queue(&[(0xffff_ffff_ffff_f000, 0x2000, WRITE, 0)], &[0]),
            ),
            (
                "seed-next-out-of-range",
                queue(&[(BUF, 64, WRITE | NEXT, 200)], &[0]),
            ),
            ("seed-head-out-of-range", queue(&one, &[40, 0])),
            (
                "seed-zero-length-anywhere",
                queue(
                    &[(0x7000_0000_0000, 0, WRITE | NEXT, 1), (BUF, 64, WRITE, 0)],
                    &[0],
                ),
            ),
            (
                // Two overlapping buffers of 56 KiB: more than one request may have.
                "seed-more-than-64k",
                queue(
                    &[
                        (DATA_START, 0xe000, WRITE | NEXT, 1),
                        (DATA_START, 0xe000, WRITE, 0),
                    ],
                    &[0],
                ),
            ),
            (
                // The device's own bytes land on the avail ring, avail.idx included.
                "seed-buffer-over-avail-ring",
                queue(&[(AVAIL_RING, 0x40, WRITE, 0)], &[0, 0, 0]),
            ),
            (
                "seed-entropy-fails",
                flagged(queue(&one, &[0]), FLAG_ENTROPY_FAILS),
            ),
            (
                "seed-event-idx",
                flagged(queue(&three_good, &[0, 1, 2]), FLAG_EVENT_IDX),
            ),
            ("seed-batch", batch(queue(&three_good, &[0, 1, 2]), 3)),
            ("seed-avail-idx-runaway", batch(queue(&one, &[0]), 17)),
        ]
    }

    fn seed(name: &str) -> FuzzInput {
        seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no seed {name}"))
            .1
    }

    fn bytes_at(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    /// The first `len` bytes the device's fuzz entropy source hands out.
    fn entropy(len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        SplitMix64::new(ENTROPY_SEED).fill(&mut out);
        out
    }

    #[test]
    fn rng_fuzz_seeds_round_trip_through_the_byte_format() {
        assert_round_trips(&seeds());
    }

    #[test]
    fn rng_fuzz_valid_chain_gets_the_sources_bytes() {
        let run = run_rng_queue(&seed("seed-one-buffer"));
        assert_eq!(run.used, vec![(0, 64)]);
        assert_eq!(bytes_at(&run.mem, BUF, 64), entropy(64));
        assert_eq!(bytes_at(&run.mem, BUF + 64, 64), vec![0; 64]);
    }

    #[test]
    fn rng_fuzz_two_buffers_are_filled_in_order() {
        let run = run_rng_queue(&seed("seed-two-buffers"));
        assert_eq!(run.used, vec![(0, 300)]);
        let random = entropy(300);
        assert_eq!(bytes_at(&run.mem, BUF, 100), random[..100]);
        assert_eq!(bytes_at(&run.mem, BUF + 0x200, 200), random[100..]);
    }

    #[test]
    fn rng_fuzz_readable_descriptor_gets_zero_bytes() {
        let run = run_rng_queue(&seed("seed-readable"));
        assert_eq!(run.used, vec![(0, 0), (2, 64)]);
        assert_eq!(bytes_at(&run.mem, BUF + 0x100, 64), vec![0; 64]);
    }

    #[test]
    fn rng_fuzz_looping_chain_gets_zero_bytes_and_the_next_is_served() {
        let run = run_rng_queue(&seed("seed-looping-chain"));
        assert_eq!(run.used, vec![(0, 0), (2, 64)]);
        assert_eq!(bytes_at(&run.mem, BUF, 64), vec![0; 64]);
        assert_eq!(bytes_at(&run.mem, BUF + 0x200, 64), entropy(64));
    }

    #[test]
    fn rng_fuzz_indirect_table_is_followed() {
        let run = run_rng_queue(&seed("seed-indirect"));
        assert_eq!(run.used, vec![(0, 128)]);
        assert_eq!(bytes_at(&run.mem, BUF + 0x100, 64), entropy(128)[64..]);
        let nested = run_rng_queue(&seed("seed-indirect-in-indirect"));
        assert_eq!(nested.used, vec![(0, 0)]);
    }

    #[test]
    fn rng_fuzz_indirect_table_of_more_than_max_descriptors_gets_zero_bytes() {
        let run = run_rng_queue(&seed("seed-indirect-too-long"));
        assert_eq!(run.used, vec![(0, 0)]);
        let run = run_rng_queue(&seed("seed-indirect-longest"));
        assert_eq!(run.used, vec![(0, MAX_DESCRIPTORS as u32)]);
    }

    #[test]
    fn rng_fuzz_buffers_outside_memory_get_zero_bytes() {
        for name in [
            "seed-outside-memory",
            "seed-wrapping",
            "seed-next-out-of-range",
        ] {
            let run = run_rng_queue(&seed(name));
            assert_eq!(run.used, vec![(0, 0)], "{name}");
            assert_eq!(bytes_at(&run.mem, BUF, 64), vec![0; 64], "{name}");
        }
    }

    #[test]
    fn rng_fuzz_zero_length_buffer_anywhere_is_harmless() {
        let run = run_rng_queue(&seed("seed-zero-length-anywhere"));
        assert_eq!(run.used, vec![(0, 64)]);
        assert_eq!(bytes_at(&run.mem, BUF, 64), entropy(64));
    }

    #[test]
    fn rng_fuzz_head_outside_the_table_gets_no_used_entry() {
        let run = run_rng_queue(&seed("seed-head-out-of-range"));
        assert_eq!(run.used, vec![(0, 64)]);
        assert_eq!(run.unanswered, 1);
    }

    #[test]
    fn rng_fuzz_request_is_capped() {
        let run = run_rng_queue(&seed("seed-more-than-64k"));
        assert_eq!(run.used, vec![(0, MAX_REQUEST_BYTES as u32)]);
    }

    #[test]
    fn rng_fuzz_failing_entropy_gives_zero_bytes() {
        let run = run_rng_queue(&seed("seed-entropy-fails"));
        assert_eq!(run.used, vec![(0, 0)]);
        assert_eq!(bytes_at(&run.mem, BUF, 64), vec![0; 64]);
    }

    #[test]
    fn rng_fuzz_batch_serves_every_chain() {
        let run = run_rng_queue(&seed("seed-batch"));
        assert_eq!(run.used, vec![(0, 64), (1, 64), (2, 64)]);
        assert!(!run.broken);
    }

    #[test]
    fn rng_fuzz_event_idx_is_not_negotiated_and_chains_are_served() {
        let run = run_rng_queue(&seed("seed-event-idx"));
        assert_eq!(run.used, vec![(0, 64), (1, 64), (2, 64)]);
        // With EVENT_IDX the device would have written avail_event (3) after the used
        // entries of the 16-entry ring.
        let avail_event: u16 = run
            .mem
            .read_obj(GuestAddress(USED_RING + 4 + 8 * 16))
            .unwrap();
        assert_eq!(avail_event, 0);
    }

    #[test]
    fn rng_fuzz_avail_index_far_ahead_breaks_the_queue_and_pops_nothing() {
        within_time_limit("runaway avail index", || {
            let run = run_rng_queue(&seed("seed-avail-idx-runaway"));
            assert!(run.broken);
            assert!(run.used.is_empty());
            assert_eq!(run.unanswered, 0);
        });
    }

    #[test]
    fn rng_fuzz_device_writing_over_its_avail_ring_keeps_the_invariants() {
        within_time_limit("buffer over the avail ring", || {
            let run = run_rng_queue(&seed("seed-buffer-over-avail-ring"));
            assert!(!run.used.is_empty());
            assert_eq!(run.used[0], (0, 0x40));
        });
    }

    #[test]
    fn rng_fuzz_empty_input_serves_nothing() {
        fuzz_rng_queue(&[]);
        let run = run_rng_queue(&FuzzInput::decode(&[]));
        assert!(run.used.is_empty() && !run.broken && run.unanswered == 0);
        assert_eq!(
            bytes_at(&run.mem, 0, MEM_SIZE as usize),
            vec![0; MEM_SIZE as usize]
        );
    }

    /// Totals over many runs, to show that random inputs reach every outcome.
    #[derive(Debug, Default)]
    struct Tally {
        filled: usize,
        empty: usize,
        unanswered: u64,
        broken: usize,
    }

    impl Tally {
        fn add(&mut self, run: &RngRun) {
            self.filled += run.used.iter().filter(|&&(_, len)| len > 0).count();
            self.empty += run.used.iter().filter(|&&(_, len)| len == 0).count();
            self.unanswered += run.unanswered;
            self.broken += usize::from(run.broken);
        }
    }

    /// Runs `count` inputs made by `make` from a fixed-seed generator, each within the time
    /// limit; returns the tally.
    fn random_runs(count: usize, seed: u64, make: fn(&mut SplitMix64) -> Vec<u8>) -> Tally {
        let (tx, rx) = std::sync::mpsc::channel();
        within_time_limit("random inputs", move || {
            let mut generator = SplitMix64::new(seed);
            let mut tally = Tally::default();
            for _ in 0..count {
                let data = make(&mut generator);
                tally.add(&run_rng_queue(&FuzzInput::decode(&data)));
            }
            tx.send(tally).unwrap();
        });
        rx.recv().unwrap()
    }

    fn below(generator: &mut SplitMix64, n: u64) -> u64 {
        generator.next_u64() % n
    }

    /// Up to 600 uniformly random bytes.
    fn random_bytes(generator: &mut SplitMix64) -> Vec<u8> {
        let mut data = vec![0u8; below(generator, 600) as usize];
        generator.fill(&mut data);
        data
    }

    /// A random descriptor likelier than random bytes to make a chain the device serves:
    /// mostly writable buffers in the data area, sometimes elsewhere or wild, now and then
    /// an indirect table over the (random) memory contents.
    fn random_descriptor(g: &mut SplitMix64, count: u64) -> (u64, u32, u16, u16) {
        let next = below(g, count + 2) as u16;
        if below(g, 16) == 0 {
            let table = DATA_START + 16 * below(g, 0x100);
            return (table, 16 * below(g, 8) as u32, INDIRECT, next);
        }
        let addr = match below(g, 8) {
            0..=4 => DATA_START + below(g, MEM_SIZE - DATA_START),
            5 => below(g, MEM_SIZE),
            6 => MEM_SIZE - below(g, 64),
            _ => g.next_u64(),
        };
        let len = match below(g, 8) {
            0 => 0,
            1..=5 => below(g, 0x400) as u32,
            6 => below(g, 0x1_0000) as u32,
            _ => g.next_u64() as u32,
        };
        let mut flags = if below(g, 8) == 0 { 0 } else { WRITE };
        if below(g, 3) == 0 {
            flags |= NEXT;
        }
        (addr, len, flags, next)
    }

    /// Random flags: batch mode now and then, a failing source rarely, EVENT_IDX asked for
    /// half the time.
    fn random_flags(g: &mut SplitMix64) -> u8 {
        [
            (FLAG_BATCH, 6),
            (FLAG_ENTROPY_FAILS, 16),
            (FLAG_EVENT_IDX, 2),
        ]
        .into_iter()
        .filter(|&(_, one_in)| below(g, one_in) == 0)
        .fold(0, |flags, (flag, _)| flags | flag)
    }

    /// A random input built field by field: a queue of up to 32 entries, descriptors from
    /// `random_descriptor`, heads mostly inside the table, random memory contents.
    fn random_chains(g: &mut SplitMix64) -> Vec<u8> {
        let mut input = FuzzInput {
            queue_size_log2: below(g, 6) as u8,
            flags: random_flags(g),
            ..FuzzInput::default()
        };
        let size = u64::from(input.queue_size());
        let count = below(g, size + 1);
        input.descriptors = (0..count).map(|_| random_descriptor(g, count)).collect();
        let avail_count = below(g, size + 1);
        input.avail = (0..avail_count)
            .map(|_| below(g, count + 2) as u16)
            .collect();
        input.avail_idx = if below(g, 4) == 0 {
            g.next_u64() as u16
        } else {
            below(g, avail_count + 1) as u16
        };
        input.memory = vec![0u8; below(g, 0x1000) as usize];
        g.fill(&mut input.memory);
        input.encode()
    }

    #[test]
    fn rng_fuzz_random_bytes_keep_the_invariants() {
        let tally = random_runs(3000, 0x5eed_0001, random_bytes);
        // Random addresses almost never land in a 64 KiB guest: chains are refused.
        assert!(tally.empty > 1000, "{tally:?}");
        assert!(tally.broken > 0, "{tally:?}");
    }

    #[test]
    fn rng_fuzz_random_chains_keep_the_invariants() {
        let tally = random_runs(3000, 0x5eed_0002, random_chains);
        assert!(tally.filled > 500, "{tally:?}");
        assert!(tally.empty > 500, "{tally:?}");
        assert!(tally.unanswered > 0 && tally.broken > 0, "{tally:?}");
    }

    /// Bad chains from the fuzz corpus and the seeds, as a unit test.
    #[test]
    fn rng_fuzz_corpus_never_panics_or_hangs() {
        let replayed = replay_with_seeds("virtio_rng_queue", fuzz_rng_queue, seeds());
        assert!(replayed >= seeds().len(), "the corpus lacks seeds");
    }

    /// Writes the named seeds into the corpus:
    /// `cargo test -p devices rng_fuzz_write_seeds -- --ignored`.
    #[test]
    #[ignore = "writes files into devices/fuzz/corpus"]
    fn rng_fuzz_write_seeds() {
        write_seeds("virtio_rng_queue", &seeds());
    }
}
