//! A hostile driver on the virtio-mmio register interface: arbitrary reads and writes of any
//! width at any offset (registers and config space), queue kicks served by the device, and
//! migrated transport states restored, over a virtio-rng device with a fixed entropy source
//! and 64 KiB of guest memory. The transport must never panic, hang or touch memory outside
//! the guest's; after a reset it must read as a fresh device.
//!
//! Input format: a sequence of 8-byte operations `[op, offset (u16 LE), value (u32 LE),
//! extra]`. `op & 3` picks the access width (1, 2, 4 or 8 bytes); `op & 4` makes it a write
//! (else a read); `op & 8` serves the device's queue afterwards (a kick); `op & 16` instead
//! restores a transport state decoded from the 64 bytes that follow the operation. The
//! offset is taken modulo 0x180 (registers, then the start of the config space).

use std::sync::{Arc, Mutex};

use vm_memory::GuestAddress;

use super::fuzz_util::Cursor;
use super::mmio::{status, MmioTransport, QueueSnapshot, TransportState};
use super::rng::Rng;
use super::{Interrupt, VirtioDevice};
use crate::bus::BusDevice;
use crate::irq::IrqTrigger;
use crate::GuestMemoryMmap;

/// Guest memory of the fuzzed transport.
pub const MEM_SIZE: u64 = 0x1_0000;
/// Most operations one input runs.
const MAX_OPS: usize = 4096;

/// A virtio-rng device with a fixed entropy source on a transport over [`MEM_SIZE`] bytes of
/// guest memory.
fn rng_transport() -> (MmioTransport, Arc<Mutex<Rng>>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let mut fill = 0u8;
    let rng = Rng::with_source(Box::new(move |buf: &mut [u8]| {
        for b in buf {
            fill = fill.wrapping_add(1);
            *b = fill;
        }
        Ok(())
    }))
    .expect("the device");
    let rng = Arc::new(Mutex::new(rng));
    let device: Arc<Mutex<dyn VirtioDevice>> = rng.clone();
    let interrupt = Arc::new(Interrupt::new(IrqTrigger::new().expect("an eventfd")));
    (MmioTransport::new(device, mem, interrupt), rng)
}

/// Invariants a driver relies on whatever happened before.
fn assert_invariants(transport: &mut MmioTransport) {
    assert_eq!(read32(transport, 0x000), 0x7472_6976, "magic");
    assert_eq!(read32(transport, 0x004), 2, "version");
    let s = read32(transport, 0x070);
    assert!(
        status::is_valid(s, status::DEVICE_NEEDS_RESET),
        "a status no driver can reach: {s:#x}"
    );
}

/// Restores a transport state taken from a migration stream (as a destination does) into a
/// fresh virtio-rng transport, then serves its queue and reads its registers: never a
/// panic, a hang or an access outside guest memory, whatever the state said (the vmm's
/// `migration_state` target feeds it every transport of a decoded state).
pub fn fuzz_restore_transport(state: &TransportState) {
    let (mut transport, rng) = rng_transport();
    if transport.restore(state).is_err() {
        assert_invariants(&mut transport);
        return;
    }
    for _ in 0..4 {
        let _ = rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .process_queue();
    }
    for offset in (0..0x100).step_by(4) {
        let mut buf = [0u8; 4];
        transport.read(offset, &mut buf);
    }
    assert_invariants(&mut transport);
}

/// Runs one input.
pub fn fuzz_mmio(data: &[u8]) {
    let (mut transport, rng) = rng_transport();
    let fresh = transport.state();

    let mut input = Cursor::new(data);
    for _ in 0..MAX_OPS {
        if input.rest().is_empty() {
            break;
        }
        let op = input.u8();
        let offset = u64::from(input.u16() % 0x180);
        let value = input.u32();
        let _extra = input.u8();
        if op & 16 != 0 {
            let state = transport_state(&mut input, &fresh);
            let _ = transport.restore(&state);
            continue;
        }
        let width = 1usize << (op & 3);
        if op & 4 != 0 {
            let bytes = u64::from(value).to_le_bytes();
            transport.write(offset, &bytes[..width]);
            if offset == 0x70 && width == 4 && value == 0 {
                // A reset: the transport reads as the device it was at the start.
                assert_eq!(read32(&mut transport, 0x70), 0, "status after a reset");
                let state = transport.state();
                assert_eq!(state.queues, fresh.queues, "queues after a reset");
            }
        } else {
            let mut buf = [0u8; 8];
            transport.read(offset, &mut buf[..width]);
        }
        if op & 8 != 0 {
            let _ = rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .process_queue();
        }
        assert_invariants(&mut transport);
    }
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut buf = [0u8; 4];
    t.read(offset, &mut buf);
    u32::from_le_bytes(buf)
}

/// A transport state from the input: the right device type and queue sizes most of the
/// time (so restoring gets past the first checks), arbitrary otherwise.
fn transport_state(input: &mut Cursor, fresh: &TransportState) -> TransportState {
    let flags = input.u8();
    let mut queues = Vec::new();
    for q in &fresh.queues {
        queues.push(QueueSnapshot {
            max_size: if flags & 1 == 0 {
                q.max_size
            } else {
                input.u16()
            },
            size: input.u16(),
            ready: input.u8() & 1 != 0,
            desc_table: input.u64() % (2 * MEM_SIZE),
            avail_ring: input.u64() % (2 * MEM_SIZE),
            used_ring: input.u64() % (2 * MEM_SIZE),
            next_avail: input.u16(),
            next_used: input.u16(),
            event_idx: input.u8() & 1 != 0,
        });
    }
    TransportState {
        device_type: if flags & 2 == 0 {
            fresh.device_type
        } else {
            input.u32()
        },
        status: input.u32(),
        driver_features: input.u64(),
        device_features_sel: input.u32(),
        driver_features_sel: input.u32(),
        queue_sel: input.u32(),
        config_generation: input.u32(),
        interrupt_status: input.u32(),
        queues,
    }
}

/// Seeds: a driver bringing the device up by the book, then kicking it.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let op = |op: u8, offset: u16, value: u32| {
        let mut v = vec![op];
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&value.to_le_bytes());
        v.push(0);
        v
    };
    let write = |offset, value| op(6, offset, value);
    let mut bring_up = Vec::new();
    for (offset, value) in [
        (0x70, status::ACKNOWLEDGE),
        (0x70, status::ACKNOWLEDGE | status::DRIVER),
        (0x24, 1),
        (0x20, 1), // VERSION_1
        (
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        ),
        (0x30, 0),
        (0x38, 16),
        (0x80, 0x1000),
        (0x90, 0x2000),
        (0xa0, 0x3000),
        (0x44, 1),
        (
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        ),
    ] {
        bring_up.extend(write(offset, value));
    }
    let mut kicked = bring_up.clone();
    kicked.extend(op(6 | 8, 0x50, 0));
    let mut reset = kicked.clone();
    reset.extend(write(0x70, 0));
    let mut restored = bring_up.clone();
    restored.extend(op(16, 0, 0));
    restored.extend([0u8; 64]);
    vec![
        ("seed-bring-up", bring_up),
        ("seed-kick", kicked),
        ("seed-reset", reset),
        ("seed-restore-zeroes", restored),
        (
            "seed-odd-widths",
            [op(0, 0x71, 0), op(5, 0x38, 3), op(7, 0x80, 1)].concat(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::fuzz_util::testing::{corpus_dir, replay, within_time_limit};

    #[test]
    fn mmio_fuzz_seeds_never_panic_or_hang() {
        for (name, seed) in seeds() {
            within_time_limit(name, move || fuzz_mmio(&seed));
        }
    }

    #[test]
    fn mmio_fuzz_corpus_never_panics_or_hangs() {
        replay("virtio_mmio", fuzz_mmio);
    }

    /// Regenerates the seeds in the corpus: `cargo test -p devices -- --ignored mmio_fuzz_write_seeds`.
    #[test]
    #[ignore]
    fn mmio_fuzz_write_seeds() {
        let dir = corpus_dir("virtio_mmio");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, seed) in seeds() {
            std::fs::write(dir.join(name), seed).unwrap();
        }
    }
}
