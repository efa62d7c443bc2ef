//! Device creation: interrupt lines, bus addresses, KVM ioeventfds/irqfds, and the list of
//! devices the event loop serves and the ACPI tables describe.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::acpi_pm::{self, AcpiPm, PowerButton};
use devices::bus::BusError;
use devices::exit::ExitRequest;
use devices::irq::IrqTrigger;
use devices::legacy::{i8042, serial, Serial, I8042};
use devices::virtio::block::{Block, BlockConfig, Disk, OpenError};
use devices::virtio::mmio::{self, MmioTransport};
use devices::virtio::{Interrupt, VirtioDevice};
use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};

use crate::acpi::AcpiDevice;
use crate::config::{ConsoleConfig, DiskConfig};
use crate::console::{ConsoleHub, HubWriter};
use crate::memory::{self, GuestMemory};
use crate::vcpu::Buses;

/// IOAPIC pins free for virtio devices: everything but the legacy ones podvm or the PC
/// platform use (0 timer, 1 keyboard, 2 cascade, 3/4 serial, 8 RTC).
const VIRTIO_GSIS: [u32; 16] = [5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21];

/// A device could not be created or wired.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create the interrupt eventfd of {device}: {source}")]
    IrqEventFd {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect {device} to GSI {gsi}: {source}")]
    Irqfd {
        device: String,
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot register the queue notification of {device}: {source}")]
    Ioeventfd {
        device: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot place {device} on the bus: {source}")]
    Bus {
        device: String,
        #[source]
        source: BusError,
    },
    #[error(transparent)]
    Disk(#[from] OpenError),
    #[error("cannot create {device}: {source}")]
    Create {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--net {index}: {source}")]
    Net {
        index: usize,
        #[source]
        source: devices::virtio::net::user::UserNetError,
    },
    #[error("--net {index}: {source}")]
    Tap {
        index: usize,
        #[source]
        source: devices::virtio::net::tap::TapError,
    },
    #[error("no interrupt line left for {device}")]
    NoIrq { device: String },
}

/// A virtio-mmio device as the DSDT describes it (`LNRO0005`, found by the guest's
/// virtio_mmio driver through ACPI).
pub struct VirtioMmioAcpi {
    index: usize,
    base: u64,
    gsi: u32,
}

impl AcpiDevice for VirtioMmioAcpi {
    fn append_aml(&self, dsdt: &mut Vec<u8>) {
        use acpi_tables::aml;
        use acpi_tables::Aml;
        aml::Device::new(
            format!("VR{:02X}", self.index).as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &self.index),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, self.base as u32, mmio::MMIO_LEN as u32),
                        &aml::Interrupt::new(true, true, false, false, self.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(dsdt);
    }
}

/// The VM's devices and the buses that reach them.
pub struct DeviceManager {
    /// The buses, handed to the vCPUs once everything is placed.
    pub buses: Buses,
    /// COM1, also fed by the event loop.
    pub serial: Arc<Mutex<Serial>>,
    /// virtio-blk devices, in guest order.
    pub blocks: Vec<Arc<Mutex<Block>>>,
    /// virtio-net devices' counters, in guest order.
    pub nics: Vec<Arc<devices::virtio::net::NetMetrics>>,
    /// The virtio-rng device's counters, if it has one.
    pub rng: Option<Arc<devices::virtio::rng::RngMetrics>>,
    /// Every virtio device's transport, in guest order (what a migration saves).
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Every virtio device as a migration's shape names it, in guest order.
    pub shape: Vec<String>,
    /// Devices the event loop serves.
    pub subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    /// Devices the DSDT describes.
    pub acpi: Vec<VirtioMmioAcpi>,
    /// The ACPI power button.
    pub power_button: Arc<PowerButton>,
}

impl DeviceManager {
    /// Creates the legacy devices: COM1 (output per `console`), the i8042 reset line and the
    /// ACPI power-management registers, the last two reporting to `exit`. With a socket
    /// console, COM1's output goes to `hub`.
    pub fn new(
        vm: &VmFd,
        console: &ConsoleConfig,
        hub: Option<&Arc<ConsoleHub>>,
        exit: &ExitRequest,
    ) -> Result<Self, DeviceError> {
        let mut buses = Buses::default();

        let irq = irq_line(vm, "COM1", serial::COM1_IRQ)?;
        let out: Box<dyn Write + Send> = match (console, hub) {
            (ConsoleConfig::Stdio, _) => Box::new(std::io::stdout()),
            (ConsoleConfig::Socket { .. }, Some(hub)) => Box::new(HubWriter(hub.clone())),
            (ConsoleConfig::Off, _) | (ConsoleConfig::Socket { .. }, None) => {
                Box::new(std::io::sink())
            }
        };
        let serial = Arc::new(Mutex::new(Serial::new(irq, out)));
        place_pio(
            &mut buses,
            "COM1",
            serial.clone(),
            serial::COM1_PORT_BASE,
            serial::PORT_LEN,
        )?;

        let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
        place_pio(
            &mut buses,
            "i8042",
            i8042,
            i8042::PORT_BASE,
            i8042::PORT_LEN,
        )?;

        let pm = Arc::new(Mutex::new(AcpiPm::new(exit.clone())));
        place_pio(
            &mut buses,
            "ACPI PM",
            pm,
            acpi_pm::PORT_BASE,
            acpi_pm::PORT_LEN,
        )?;
        let power_button = Arc::new(PowerButton::new(irq_line(
            vm,
            "power button",
            acpi_pm::GED_GSI,
        )?));

        Ok(Self {
            buses,
            serial,
            blocks: Vec::new(),
            nics: Vec::new(),
            rng: None,
            transports: Vec::new(),
            shape: Vec::new(),
            subscribers: Vec::new(),
            acpi: Vec::new(),
            power_button,
        })
    }

    /// Attaches the opened `disk` as the next virtio-blk device.
    pub fn add_disk(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        opened: Disk,
        disk: &DiskConfig,
    ) -> Result<(), DeviceError> {
        let name = format!("disk {}", disk.path.display());
        tracing::info!(
            path = %disk.path.display(),
            size = opened.size(),
            read_only = opened.read_only(),
            direct = opened.direct(),
            "disk attached"
        );
        let opened_size = opened.size();
        let config = BlockConfig {
            serial: disk.serial.clone(),
            engine: disk.io_engine,
        };
        let block = Block::new(opened, &config).map_err(|source| DeviceError::Create {
            device: name.clone(),
            source,
        })?;
        let block = Arc::new(Mutex::new(block));
        self.add_virtio(vm, mem, &name, block.clone())?;
        self.shape.push(format!("block {}", opened_size));
        self.subscribers.push(block.clone());
        self.blocks.push(block);
        Ok(())
    }

    /// Attaches `net` as the next virtio-net device.
    pub fn add_net(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        mut net: devices::virtio::net::Net,
    ) -> Result<(), DeviceError> {
        let name = format!("nic {}", self.nics.len());
        net.open_vhost(mem);
        self.nics.push(net.metrics());
        let net = Arc::new(Mutex::new(net));
        self.add_virtio(vm, mem, &name, net.clone())?;
        self.shape.push("net".into());
        self.subscribers.push(net);
        Ok(())
    }

    /// Attaches the virtio-rng device (after the disks and NICs).
    pub fn add_rng(&mut self, vm: &VmFd, mem: &GuestMemory) -> Result<(), DeviceError> {
        let name = "rng";
        let rng = devices::virtio::rng::Rng::new().map_err(|source| DeviceError::Create {
            device: name.into(),
            source,
        })?;
        self.rng = Some(rng.metrics());
        let rng = Arc::new(Mutex::new(rng));
        self.add_virtio(vm, mem, name, rng.clone())?;
        self.shape.push("rng".into());
        self.subscribers.push(rng);
        Ok(())
    }

    fn add_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        name: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(), DeviceError> {
        // Every virtio device is described in the DSDT, so that list also numbers them.
        let index = self.acpi.len();
        let gsi = *VIRTIO_GSIS.get(index).ok_or_else(|| DeviceError::NoIrq {
            device: name.into(),
        })?;
        let base = memory::VIRTIO_MMIO_START + index as u64 * mmio::MMIO_LEN;
        let interrupt = Arc::new(Interrupt::new(irq_line(vm, name, gsi)?));
        {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner());
            for (queue, evt) in dev.queue_events().iter().enumerate() {
                let notify = IoEventAddress::Mmio(base + mmio::QUEUE_NOTIFY);
                vm.register_ioevent(evt, &notify, queue as u32)
                    .map_err(|source| DeviceError::Ioeventfd {
                        device: name.into(),
                        source,
                    })?;
            }
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            device,
            mem.clone(),
            interrupt,
        )));
        self.transports.push(transport.clone());
        self.buses
            .mmio
            .insert(transport, base, mmio::MMIO_LEN)
            .map_err(|source| DeviceError::Bus {
                device: name.into(),
                source,
            })?;
        self.acpi.push(VirtioMmioAcpi { index, base, gsi });
        Ok(())
    }
}

fn irq_line(vm: &VmFd, device: &str, gsi: u32) -> Result<IrqTrigger, DeviceError> {
    let irq = IrqTrigger::new().map_err(|source| DeviceError::IrqEventFd {
        device: device.into(),
        source,
    })?;
    vm.register_irqfd(irq.eventfd(), gsi)
        .map_err(|source| DeviceError::Irqfd {
            device: device.into(),
            gsi,
            source,
        })?;
    Ok(irq)
}

fn place_pio(
    buses: &mut Buses,
    device: &str,
    dev: devices::bus::SharedDevice,
    port: u16,
    len: u16,
) -> Result<(), DeviceError> {
    buses
        .pio
        .insert(dev, u64::from(port), u64::from(len))
        .map_err(|source| DeviceError::Bus {
            device: device.into(),
            source,
        })
}
