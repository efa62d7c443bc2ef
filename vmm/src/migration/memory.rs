//! Guest memory in a migration: dirty-page logging (KVM's log of the guest's writes, and the
//! guest memory bitmap of podvm's own writes), and pages in and out of the stream.

use std::io::Write;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::stream::{self, Kind};
use crate::memory::{self, GuestMemory};

/// The page size dirty logging and the stream work in.
pub const PAGE: usize = 4096;
/// Most pages in one `Pages` section.
const RUN_PAGES: usize = 256;
/// The longest a pass keeps what it has to itself. A pass over mostly zero memory only
/// builds zero runs, and writes go out when the stream's buffer fills: without this, a
/// large sparse guest (or a source short of CPU) could keep the destination waiting past
/// its read timeout, which takes a silent source for a dead one.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// How many pages between two looks at the clock.
const CLOCK_EVERY: u64 = 256;

/// Which pages of each memory region to send: one bit per page, per region in order.
pub type DirtyPages = Vec<Vec<u64>>;

/// The bitmap of pages podvm's devices wrote in `region`.
fn bitmap(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    use std::ops::Deref;
    region.deref().bitmap()
}

/// Turns KVM's dirty logging on or off for all guest memory; on also forgets what podvm's
/// own writes marked so far.
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMemory, on: bool) -> Result<(), kvm_ioctls::Error> {
    if on {
        for region in mem.iter() {
            bitmap(region).reset();
        }
    }
    memory::register_slots(vm, mem, on)
}

/// Takes (and clears) the pages written since the last call: the guest's, from KVM, and
/// podvm's, from the memory bitmap.
pub fn harvest(vm: &VmFd, mem: &GuestMemory) -> Result<DirtyPages, kvm_ioctls::Error> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| {
            let mut bits = vm.get_dirty_log(slot as u32, region.len() as usize)?;
            let ours = bitmap(region);
            for (word, more) in bits.iter_mut().zip(ours.get_and_reset()) {
                *word |= more;
            }
            Ok(bits)
        })
        .collect()
}

/// Every page of every region.
pub fn all_pages(mem: &GuestMemory) -> DirtyPages {
    mem.iter()
        .map(|region| {
            let pages = region.len() as usize / PAGE;
            let mut bits = vec![u64::MAX; pages.div_ceil(64)];
            if !pages.is_multiple_of(64) {
                *bits.last_mut().expect("a region has pages") = (1u64 << (pages % 64)) - 1;
            }
            bits
        })
        .collect()
}

/// How many pages `dirty` selects.
pub fn count(dirty: &DirtyPages) -> u64 {
    dirty
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// What sending pages cost.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16-byte chunks")) == 0)
}

/// Sends the pages `dirty` selects: runs of pages with data as `Pages` sections, all-zero
/// pages as `Zeroes` runs (8 + 4 bytes for any number of pages).
pub fn send_pages(
    w: &mut impl Write,
    mem: &GuestMemory,
    dirty: &DirtyPages,
) -> std::io::Result<Sent> {
    send_pages_every(w, mem, dirty, KEEPALIVE)
}

/// [`send_pages`], handing over (sections written, then `flush`) what it has at least
/// every `keepalive`.
fn send_pages_every(
    w: &mut impl Write,
    mem: &GuestMemory,
    dirty: &DirtyPages,
    keepalive: Duration,
) -> std::io::Result<Sent> {
    let mut last_out = Instant::now();
    let mut sent = Sent::default();
    let mut data: Vec<u8> = Vec::with_capacity(RUN_PAGES * PAGE);
    let mut data_start = 0u64;
    let mut zeroes: Vec<u8> = Vec::new();
    let mut zero_run: Option<(u64, u32)> = None;
    let mut page = vec![0u8; PAGE];

    for (region, bits) in mem.iter().zip(dirty) {
        let base = region.start_addr().0;
        for (wi, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let bit = word.trailing_zeros() as usize;
                word &= word - 1;
                let gpa = base + ((wi * 64 + bit) * PAGE) as u64;
                if mem.read_slice(&mut page, GuestAddress(gpa)).is_err() {
                    continue;
                }
                sent.pages += 1;
                if sent.pages.is_multiple_of(CLOCK_EVERY) && last_out.elapsed() >= keepalive {
                    flush_data(w, &mut data, data_start, &mut sent)?;
                    if let Some(run) = zero_run.take() {
                        push_run(&mut zeroes, run);
                    }
                    flush_zeroes(w, &mut zeroes, &mut sent)?;
                    w.flush()?;
                    last_out = Instant::now();
                }
                if is_zero(&page) {
                    sent.zero_pages += 1;
                    zero_run = match zero_run {
                        Some((start, n)) if start + u64::from(n) * PAGE as u64 == gpa => {
                            Some((start, n + 1))
                        }
                        other => {
                            if let Some(run) = other {
                                push_run(&mut zeroes, run);
                            }
                            Some((gpa, 1))
                        }
                    };
                    continue;
                }
                let contiguous = data_start + data.len() as u64 == gpa;
                if !contiguous || data.len() >= RUN_PAGES * PAGE {
                    flush_data(w, &mut data, data_start, &mut sent)?;
                    data_start = gpa;
                }
                data.extend_from_slice(&page);
            }
        }
        if zeroes.len() > stream::MAX_SECTION / 2 {
            flush_zeroes(w, &mut zeroes, &mut sent)?;
        }
    }
    flush_data(w, &mut data, data_start, &mut sent)?;
    if let Some(run) = zero_run {
        push_run(&mut zeroes, run);
    }
    flush_zeroes(w, &mut zeroes, &mut sent)?;
    Ok(sent)
}

/// Adds a run of zero pages (address, pages) to a `Zeroes` payload.
fn push_run(zeroes: &mut Vec<u8>, (start, n): (u64, u32)) {
    zeroes.extend_from_slice(&start.to_le_bytes());
    zeroes.extend_from_slice(&n.to_le_bytes());
}

/// Writes the zero-page runs gathered as one `Zeroes` section, if there are any.
fn flush_zeroes(w: &mut impl Write, zeroes: &mut Vec<u8>, sent: &mut Sent) -> std::io::Result<()> {
    if zeroes.is_empty() {
        return Ok(());
    }
    stream::write_section(w, Kind::Zeroes, &[zeroes])?;
    sent.bytes += zeroes.len() as u64 + 12;
    zeroes.clear();
    Ok(())
}

fn flush_data(
    w: &mut impl Write,
    data: &mut Vec<u8>,
    start: u64,
    sent: &mut Sent,
) -> std::io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    stream::write_section(w, Kind::Pages, &[&start.to_le_bytes(), data])?;
    sent.bytes += data.len() as u64 + 8 + 12;
    data.clear();
    Ok(())
}

/// A `Pages` payload: where the pages go, and their bytes (whole pages).
pub fn parse_pages(payload: &[u8]) -> Result<(GuestAddress, &[u8]), String> {
    if payload.len() < 8 + PAGE || !(payload.len() - 8).is_multiple_of(PAGE) {
        return Err(format!("a pages section of {} bytes", payload.len()));
    }
    let gpa = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    if !gpa.is_multiple_of(PAGE as u64) {
        return Err(format!("pages at unaligned address {gpa:#x}"));
    }
    Ok((GuestAddress(gpa), &payload[8..]))
}

/// A `Zeroes` payload: runs of (address, pages).
pub fn parse_zeroes(payload: &[u8]) -> Result<Vec<(GuestAddress, u32)>, String> {
    if !payload.len().is_multiple_of(12) {
        return Err(format!("a zero-pages section of {} bytes", payload.len()));
    }
    payload
        .chunks_exact(12)
        .map(|c| {
            let gpa = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
            let n = u32::from_le_bytes(c[8..].try_into().expect("4 bytes"));
            if !gpa.is_multiple_of(PAGE as u64) {
                return Err(format!("zero pages at unaligned address {gpa:#x}"));
            }
            Ok((GuestAddress(gpa), n))
        })
        .collect()
}

/// Writes received pages into guest memory; refuses pages outside it.
pub fn receive_pages(mem: &GuestMemory, payload: &[u8]) -> Result<u64, String> {
    let (gpa, data) = parse_pages(payload)?;
    check_range(mem, gpa, data.len() as u64)?;
    mem.write_slice(data, gpa)
        .map_err(|e| format!("pages at {:#x}: {e}", gpa.0))?;
    Ok((data.len() / PAGE) as u64)
}

/// Zeroes received zero-page runs without reading them (see [`memory::zero_range`]):
/// pages never touched stay unallocated.
pub fn receive_zeroes(mem: &GuestMemory, payload: &[u8]) -> Result<u64, String> {
    let mut pages = 0;
    for (gpa, n) in parse_zeroes(payload)? {
        let len = u64::from(n) * PAGE as u64;
        check_range(mem, gpa, len)?;
        memory::zero_range(mem, gpa, len)
            .map_err(|e| format!("zero pages at {:#x}: {e}", gpa.0))?;
        pages += u64::from(n);
    }
    Ok(pages)
}

/// `len` bytes at `gpa` lie in one region of guest memory.
fn check_range(mem: &GuestMemory, gpa: GuestAddress, len: u64) -> Result<(), String> {
    let inside = mem.iter().any(|r| {
        let start = r.start_addr().0;
        gpa.0 >= start
            && gpa
                .0
                .checked_add(len)
                .is_some_and(|end| end <= start + r.len())
    });
    if inside {
        Ok(())
    } else {
        Err(format!(
            "{len} bytes at {:#x} are outside guest memory",
            gpa.0
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(mib: u64) -> GuestMemory {
        memory::create(mib << 20).unwrap()
    }

    /// Receives the sections of `out` into `dst`, which must then hold what `src` holds.
    fn assert_replays_to(out: &[u8], dst: &GuestMemory, src: &GuestMemory) {
        let mut r = out;
        let mut payload = Vec::new();
        while let Ok(kind) = stream::read_section(&mut r, &mut payload) {
            match kind {
                Kind::Pages => receive_pages(dst, &payload).map(|_| ()),
                Kind::Zeroes => receive_zeroes(dst, &payload).map(|_| ()),
                other => panic!("{other:?}"),
            }
            .unwrap();
        }
        let (mut a, mut b) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
        src.read_slice(&mut a, GuestAddress(0)).unwrap();
        dst.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b, "memory differs after the round trip");
    }

    #[test]
    fn migration_pages_round_trip_with_zero_runs_and_only_what_is_dirty() {
        let src = mem(4);
        src.write_slice(&[0xaa; PAGE * 3], GuestAddress(0x10000))
            .unwrap();
        src.write_slice(&[0x55; 100], GuestAddress(0x200000))
            .unwrap();
        let mut out = Vec::new();
        let sent = send_pages(&mut out, &src, &all_pages(&src)).unwrap();
        assert_eq!(sent.pages, 1024);
        assert_eq!(sent.zero_pages, 1020);
        // Four data pages, and the zero pages as a few runs: a few KiB, not 4 MiB.
        assert!(out.len() < 5 * PAGE, "{} bytes", out.len());

        let dst = mem(4);
        // Junk the source does not have must be cleared by the zero runs.
        dst.write_slice(&[1; 10], GuestAddress(0x300000)).unwrap();
        assert_replays_to(&out, &dst, &src);

        // Only the pages selected are sent.
        let mut dirty: DirtyPages = all_pages(&src).iter().map(|r| vec![0; r.len()]).collect();
        dirty[0][0] = 1 << 16; // page 0x10000
        let mut out = Vec::new();
        let sent = send_pages(&mut out, &src, &dirty).unwrap();
        assert_eq!((sent.pages, sent.zero_pages), (1, 0));
    }

    /// Records how much had been written at each flush.
    #[derive(Default)]
    struct Flushes {
        out: Vec<u8>,
        at: Vec<usize>,
    }

    impl Write for Flushes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.at.push(self.out.len());
            Ok(())
        }
    }

    #[test]
    fn migration_pass_hands_over_what_it_has_on_time_and_still_round_trips() {
        let src = mem(4);
        // Data across a hand-over point (page 256) and zero runs on both sides of it.
        src.write_slice(&[0xaa; PAGE * 10], GuestAddress(250 * PAGE as u64))
            .unwrap();
        src.write_slice(&[0x55; 100], GuestAddress(0x300000))
            .unwrap();
        let mut w = Flushes::default();
        let sent = send_pages_every(&mut w, &src, &all_pages(&src), Duration::ZERO).unwrap();
        assert_eq!((sent.pages, sent.zero_pages), (1024, 1013));
        assert_eq!(sent.bytes, w.out.len() as u64);
        // Every 256 pages, what was found so far went out: sections, each one whole.
        assert_eq!(w.at.len(), 4, "flushes at {:?}", w.at);
        assert!(
            w.at[0] > 0 && w.at.windows(2).all(|p| p[0] <= p[1]),
            "{:?}",
            w.at
        );
        let mut r = &w.out[..w.at[0]];
        let mut payload = Vec::new();
        let mut zeroes = 0;
        while !r.is_empty() {
            let kind = stream::read_section(&mut r, &mut payload).unwrap();
            if kind == Kind::Zeroes {
                zeroes += parse_zeroes(&payload)
                    .unwrap()
                    .iter()
                    .map(|z| z.1)
                    .sum::<u32>();
            }
        }
        assert_eq!(zeroes, 250, "the zero pages before the first hand-over");

        assert_replays_to(&w.out, &mem(4), &src);
    }

    #[test]
    fn migration_pages_outside_memory_or_malformed_are_refused() {
        let dst = mem(1);
        let mut p = (2u64 << 20).to_le_bytes().to_vec();
        p.extend_from_slice(&[0; PAGE]);
        assert!(receive_pages(&dst, &p).unwrap_err().contains("outside"));
        let mut p = 0x1001u64.to_le_bytes().to_vec();
        p.extend_from_slice(&[0; PAGE]);
        assert!(receive_pages(&dst, &p).is_err());
        assert!(receive_pages(&dst, &[0; 9]).is_err());
        let mut z = 0u64.to_le_bytes().to_vec();
        z.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(receive_zeroes(&dst, &z).unwrap_err().contains("outside"));
        assert!(receive_zeroes(&dst, &[0; 13]).is_err());
        // An address near the top of the address space does not wrap around.
        let mut z = (u64::MAX - 4095).to_le_bytes().to_vec();
        z.extend_from_slice(&2u32.to_le_bytes());
        assert!(receive_zeroes(&dst, &z).is_err());
    }
}
