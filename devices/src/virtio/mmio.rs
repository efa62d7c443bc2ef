//! The virtio-mmio transport, version 2 (virtio 1.x §4.2.2), on the MMIO bus.
//!
//! Register accesses come from vCPU threads. Queue notifications do not: the VMM registers
//! each queue's eventfd as a KVM ioeventfd on [`QUEUE_NOTIFY`] with the queue index as data
//! match, so a notify never leaves the kernel.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::bus::BusDevice;
use crate::log_limit::LogLimit;
use crate::virtio::{Interrupt, VirtioDevice, F_VERSION_1};
use crate::GuestMemoryMmap;

/// Size of one device's register window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of the QueueNotify register (where the VMM places ioeventfds).
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_4450; // "PDVM"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;

    /// Whether `value` is a status a driver can reach: only the bits above (the device's own
    /// DEVICE_NEEDS_RESET only where `device_bits` has it), each stage on top of the one
    /// before (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK). A status that skips a stage
    /// (DRIVER_OK without negotiated features, say) is refused, not taken.
    pub fn is_valid(value: u32, device_bits: u32) -> bool {
        let known = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED | device_bits;
        let needs = |bit: u32, before: u32| value & bit == 0 || value & before != 0;
        value & !known == 0
            && needs(DRIVER, ACKNOWLEDGE)
            && needs(FEATURES_OK, DRIVER)
            && needs(DRIVER_OK, FEATURES_OK)
    }
}

/// One virtio device behind the virtio-mmio register interface.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    /// Register accesses the transport refused (bad width, bad state, unknown offset,
    /// a queue size or ring address the queue cannot take).
    invalid_accesses: u64,
    /// The log line of a refused activation (a guest can retry it after every reset).
    activation_failed: LogLimit,
}

impl MmioTransport {
    /// Puts `device` behind the transport; `interrupt` is its line.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let queues = fresh_queues(&*lock(&device));
        Self {
            device,
            mem,
            interrupt,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            invalid_accesses: 0,
            activation_failed: LogLimit::default(),
        }
    }

    /// Register accesses the transport refused.
    pub fn invalid_accesses(&self) -> u64 {
        self.invalid_accesses
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue configuration may change only while the driver is setting up (before DRIVER_OK).
    fn queue_config_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    /// A register read. The device's lock is taken only for what the device itself answers:
    /// the interrupt status in particular is read by the guest's interrupt handler on every
    /// interrupt, and waiting there for the event loop to finish its work on the device
    /// (a NAT pass, a batch of block requests) would stall the vCPU for nothing.
    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                self.invalid_accesses += 1;
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
                    self.invalid_accesses += 1;
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => self.invalid_accesses += 1,
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            _ => self.invalid_accesses += 1,
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            self.invalid_accesses += 1;
            return;
        }
        let Some(q) = self.selected_queue() else {
            self.invalid_accesses += 1;
            return;
        };
        // The `try_` setters: virtio-queue's plain ones log an error for every refused
        // value, which a guest could repeat on every write; a refusal is counted instead.
        let low = |addr: u64| GuestAddress((addr & !0xffff_ffff) | u64::from(value));
        let high = |addr: u64| GuestAddress((addr & 0xffff_ffff) | (u64::from(value) << 32));
        let result = match offset {
            REG_QUEUE_NUM => u16::try_from(value)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| q.try_set_size(size)),
            REG_QUEUE_READY => {
                q.set_ready(value == 1);
                Ok(())
            }
            REG_QUEUE_DESC_LOW => q.try_set_desc_table_address(low(q.desc_table())),
            REG_QUEUE_DESC_HIGH => q.try_set_desc_table_address(high(q.desc_table())),
            REG_QUEUE_DRIVER_LOW => q.try_set_avail_ring_address(low(q.avail_ring())),
            REG_QUEUE_DRIVER_HIGH => q.try_set_avail_ring_address(high(q.avail_ring())),
            REG_QUEUE_DEVICE_LOW => q.try_set_used_ring_address(low(q.used_ring())),
            REG_QUEUE_DEVICE_HIGH => q.try_set_used_ring_address(high(q.used_ring())),
            _ => unreachable!("only queue registers are routed here"),
        };
        if result.is_err() {
            self.invalid_accesses += 1;
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, one stage at a time (§3.1.1); FAILED may come any time.
        let added = value & !self.status;
        if value & self.status != self.status
            || !status::is_valid(value, self.status & status::DEVICE_NEEDS_RESET)
        {
            self.invalid_accesses += 1;
            return;
        }
        if added & status::FEATURES_OK != 0 && !self.features_ok() {
            // Not setting FEATURES_OK tells the driver its feature set was refused; nor
            // DRIVER_OK, which needs it, if the driver wrote both at once.
            self.status = value & !(status::FEATURES_OK | status::DRIVER_OK);
            return;
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 && self.status & status::FAILED == 0 {
            self.activate();
        }
    }

    fn features_ok(&mut self) -> bool {
        let mut device = lock(&self.device);
        let offered = device.avail_features();
        let acceptable =
            self.driver_features & !offered == 0 && self.driver_features & F_VERSION_1 != 0;
        if acceptable {
            device.set_acked_features(self.driver_features);
            let event_idx = self.driver_features & crate::virtio::F_EVENT_IDX != 0;
            drop(device);
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
        } else {
            self.invalid_accesses += 1;
        }
        acceptable
    }

    fn activate(&mut self) {
        let all_valid = self.queues.iter().all(|q| queue_usable(q, &self.mem));
        let result = if all_valid {
            // The device takes the configured queues; the transport keeps fresh ones, which
            // read as not ready and are configured anew after a reset.
            let fresh = fresh_queues(&*lock(&self.device));
            let queues = std::mem::replace(&mut self.queues, fresh);
            lock(&self.device)
                .activate(self.mem.clone(), self.interrupt.clone(), queues)
                .map_err(|e| e.to_string())
        } else {
            Err("a queue is not ready or lies outside guest memory".to_string())
        };
        if let Err(e) = result {
            crate::warn_limited!(self.activation_failed, error = %e, "virtio device activation failed");
            self.status |= status::DEVICE_NEEDS_RESET;
            let _ = self.interrupt.signal_config_change();
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}

/// Whether `q` is ready and its rings lie in guest memory. The same check as virtio-queue's
/// `is_valid`, which logs an error for every refusal (a guest could repeat it after every
/// reset), made first so that `is_valid` is asked only what it accepts.
fn queue_usable(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    let size = u64::from(q.size());
    let in_memory = |addr: u64, len: u64, access: Permissions| {
        usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len, access))
    };
    q.ready()
        && in_memory(q.desc_table(), 16 * size, Permissions::Read)
        && in_memory(q.avail_ring(), 6 + 2 * size, Permissions::Read)
        && in_memory(q.used_ring(), 6 + 8 * size, Permissions::Write)
        && q.is_valid(mem)
}

/// One queue's configuration and ring positions, as a migration stream carries it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    fn to_queue(&self) -> Result<Queue, RestoreError> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| RestoreError(format!("bad queue state: {e:?}")))
    }
}

/// A virtio-mmio device's state: the transport's registers and the queues.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

/// A migrated device state this device cannot take.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RestoreError(pub String);

impl MmioTransport {
    fn running(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & (status::FAILED | status::DEVICE_NEEDS_RESET) == 0
    }

    /// Freezes the device for a migration (see [`VirtioDevice::freeze`]).
    pub fn freeze(&self) {
        lock(&self.device).freeze();
    }

    /// Undoes [`MmioTransport::freeze`].
    pub fn thaw(&self) {
        lock(&self.device).thaw();
    }

    /// See [`VirtioDevice::hold_for_migration`].
    pub fn hold_for_migration(&self, held: bool) {
        lock(&self.device).hold_for_migration(held);
    }

    /// See [`VirtioDevice::held_for_migration`].
    pub fn held_for_migration(&self) -> bool {
        lock(&self.device).held_for_migration()
    }

    /// The migration landed here (see [`VirtioDevice::announce`]).
    pub fn announce(&self) {
        lock(&self.device).announce();
    }

    /// The device's state; call between [`MmioTransport::freeze`] and the end of the
    /// migration.
    pub fn state(&self) -> TransportState {
        let device = lock(&self.device);
        let active = device.queue_states();
        let queues = if self.running() && !active.is_empty() {
            active.into_iter().map(QueueSnapshot::from).collect()
        } else {
            self.queues
                .iter()
                .map(|q| QueueSnapshot::from(q.state()))
                .collect()
        };
        TransportState {
            device_type: device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Takes a migrated device's state, on a device the driver has not touched: activates
    /// the device when the driver had. Everything in `state` is checked (it comes from the
    /// network), and a state this device cannot take is refused.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        let (device_type, max_sizes, offered) = {
            let device = lock(&self.device);
            (
                device.device_type(),
                device.queue_max_sizes().to_vec(),
                device.avail_features(),
            )
        };
        if state.device_type != device_type {
            return Err(RestoreError(format!(
                "device type {} where this VM has type {device_type}",
                state.device_type
            )));
        }
        let sizes: Vec<u16> = state.queues.iter().map(|q| q.max_size).collect();
        if sizes != max_sizes {
            return Err(RestoreError(format!(
                "queues of sizes {sizes:?} where this device has {max_sizes:?}"
            )));
        }
        if state.driver_features & !offered != 0 {
            return Err(RestoreError(format!(
                "the driver acked features {:#x} this device does not offer ({offered:#x})",
                state.driver_features
            )));
        }
        let queues = state
            .queues
            .iter()
            .map(QueueSnapshot::to_queue)
            .collect::<Result<Vec<_>, _>>()?;
        if !status::is_valid(state.status, status::DEVICE_NEEDS_RESET) {
            return Err(RestoreError(format!(
                "device status {:#x} is not one a driver can reach",
                state.status
            )));
        }
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        if self.status & status::FEATURES_OK != 0 {
            lock(&self.device).set_acked_features(self.driver_features);
        }
        if self.running() {
            if !queues.iter().all(|q| queue_usable(q, &self.mem)) {
                return Err(RestoreError(
                    "an active queue is not ready or lies outside guest memory".into(),
                ));
            }
            lock(&self.device)
                .activate(self.mem.clone(), self.interrupt.clone(), queues)
                .map_err(|e| RestoreError(e.to_string()))?;
        } else {
            self.queues = queues;
        }
        self.interrupt
            .restore(state.interrupt_status)
            .map_err(|e| RestoreError(format!("cannot raise the interrupt: {e}")))
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
        .collect()
}

fn lock(
    device: &Arc<Mutex<dyn VirtioDevice>>,
) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32 bits wide and read with 32-bit accesses only.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.invalid_accesses += 1;
            data.fill(0);
            return;
        }
        let value = self.read_reg(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            lock(&self.device).write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.invalid_accesses += 1;
            return;
        };
        if !offset.is_multiple_of(4) {
            self.invalid_accesses += 1;
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqTrigger;
    use crate::virtio::rng::Rng;

    const MEM: u64 = 0x10_0000;

    fn transport() -> MmioTransport {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let device = Arc::new(Mutex::new(Rng::new().unwrap()));
        let interrupt = Arc::new(Interrupt::new(IrqTrigger::new().unwrap()));
        MmioTransport::new(device, mem, interrupt)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Status up to FEATURES_OK with VERSION_1 acked: queue configuration is open.
    fn negotiated() -> MmioTransport {
        let mut t = transport();
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write(&mut t, REG_DRIVER_FEATURES, (F_VERSION_1 >> 32) as u32);
        write(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(
            read(&mut t, REG_STATUS) & status::FEATURES_OK,
            status::FEATURES_OK
        );
        t
    }

    fn rings(t: &mut MmioTransport, desc: u64, avail: u64, used: u64) {
        for (low, addr) in [
            (REG_QUEUE_DESC_LOW, desc),
            (REG_QUEUE_DRIVER_LOW, avail),
            (REG_QUEUE_DEVICE_LOW, used),
        ] {
            write(t, low, addr as u32);
            write(t, low + 4, (addr >> 32) as u32);
        }
    }

    const ALL: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;

    #[test]
    fn mmio_status_that_skips_a_stage_or_has_unknown_bits_is_refused() {
        let mut t = transport();
        // DRIVER_OK without the stages before it (found by the fuzz target: with FAILED and
        // every unknown bit, 0xffff_fff7 was taken as the device status).
        for bad in [
            0xffff_fff7,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
            status::DRIVER,
            status::ACKNOWLEDGE | status::DEVICE_NEEDS_RESET,
            status::ACKNOWLEDGE | 0x100,
        ] {
            write(&mut t, REG_STATUS, bad);
            assert_eq!(read(&mut t, REG_STATUS), 0, "{bad:#x} was taken");
        }
        assert_eq!(t.invalid_accesses(), 5);
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::FAILED);
        assert_eq!(
            read(&mut t, REG_STATUS),
            status::ACKNOWLEDGE | status::FAILED
        );
    }

    #[test]
    fn mmio_refused_features_with_driver_ok_in_the_same_write_leave_neither_set() {
        // Found by the fuzz target: FEATURES_OK and DRIVER_OK at once, without VERSION_1.
        let mut t = transport();
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        write(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        write(&mut t, REG_STATUS, all);
        assert_eq!(
            read(&mut t, REG_STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
    }

    #[test]
    fn mmio_bad_queue_size_is_refused_and_counted_on_every_write() {
        let mut t = negotiated();
        let max = read(&mut t, REG_QUEUE_NUM_MAX);
        for bad in [0, 3, max * 2, 0x1_0000 + 8] {
            write(&mut t, REG_QUEUE_NUM, bad);
        }
        assert_eq!(t.invalid_accesses(), 4);
        assert_eq!(u32::from(t.queues[0].size()), max, "the size is unchanged");
        write(&mut t, REG_QUEUE_NUM, max / 2);
        assert_eq!(u32::from(t.queues[0].size()), max / 2);
        assert_eq!(t.invalid_accesses(), 4);
    }

    #[test]
    fn mmio_misaligned_ring_addresses_are_refused_and_counted() {
        let mut t = negotiated();
        write(&mut t, REG_QUEUE_DESC_LOW, 0x1008); // 16-byte alignment
        write(&mut t, REG_QUEUE_DRIVER_LOW, 0x2001); // 2
        write(&mut t, REG_QUEUE_DEVICE_LOW, 0x3002); // 4
        assert_eq!(t.invalid_accesses(), 3);
        rings(&mut t, 0x1_0000_1000, 0x2000, 0x3000);
        assert_eq!(t.queues[0].desc_table(), 0x1_0000_1000, "both halves land");
        assert_eq!(t.invalid_accesses(), 3);
    }

    #[test]
    fn mmio_activation_with_rings_outside_memory_needs_a_reset_and_is_retried_after_one() {
        let mut t = negotiated();
        // The used ring starts in guest memory and runs past its end.
        rings(&mut t, 0x1000, 0x2000, MEM - 8);
        write(&mut t, REG_QUEUE_READY, 1);
        write(&mut t, REG_STATUS, ALL | status::DRIVER_OK);
        assert_ne!(read(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // The device did not take the queues (on success the transport keeps fresh ones).
        assert!(t.queues[0].ready());
        // A guest can repeat this after every reset; it works once the rings fit.
        write(&mut t, REG_STATUS, 0);
        let mut t2 = t;
        write(&mut t2, REG_STATUS, status::ACKNOWLEDGE);
        write(&mut t2, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write(&mut t2, REG_DRIVER_FEATURES_SEL, 1);
        write(&mut t2, REG_DRIVER_FEATURES, (F_VERSION_1 >> 32) as u32);
        write(&mut t2, REG_STATUS, ALL);
        rings(&mut t2, 0x1000, 0x2000, 0x3000);
        write(&mut t2, REG_QUEUE_READY, 1);
        write(&mut t2, REG_STATUS, ALL | status::DRIVER_OK);
        assert_eq!(read(&mut t2, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert!(
            !t2.queues[0].ready(),
            "the device took the configured queue"
        );
    }
}
