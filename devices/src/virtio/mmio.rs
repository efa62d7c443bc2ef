//! The virtio-mmio transport, version 2 (virtio 1.x §4.2.2), on the MMIO bus.
//!
//! Register accesses come from vCPU threads. Queue notifications do not: the VMM registers
//! each queue's eventfd as a KVM ioeventfd on [`QUEUE_NOTIFY`] with the queue index as data
//! match, so a notify never leaves the kernel.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueState, QueueT};

use crate::bus::BusDevice;
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
    /// Register accesses the transport refused (bad width, bad state, unknown offset).
    invalid_accesses: u64,
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
        match offset {
            REG_QUEUE_NUM => q.set_size(value as u16),
            REG_QUEUE_READY => q.set_ready(value == 1),
            REG_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => unreachable!("only queue registers are routed here"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, one stage at a time (§3.1.1); FAILED may come any time.
        let added = value & !self.status;
        if value & self.status != self.status {
            self.invalid_accesses += 1;
            return;
        }
        if added & status::FEATURES_OK != 0 && !self.features_ok() {
            // Not setting FEATURES_OK tells the driver its feature set was refused.
            self.status = value & !status::FEATURES_OK;
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
        let all_valid = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
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
            tracing::warn!(error = %e, "virtio device activation failed");
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
            if !queues.iter().all(|q| q.ready() && q.is_valid(&self.mem)) {
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
