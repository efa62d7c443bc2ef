//! Device creation: interrupt lines, bus addresses and the list of devices.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::acpi_pm::{self, AcpiPm};
use devices::bus::BusError;
use devices::exit::ExitRequest;
use devices::irq::IrqTrigger;
use devices::legacy::{i8042, serial, Serial, I8042};
use kvm_ioctls::VmFd;

use crate::config::ConsoleConfig;
use crate::vcpu::Buses;

/// A device could not be created or wired.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create the interrupt eventfd of {device}: {source}")]
    IrqEventFd {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect {device} to GSI {gsi}: {source}")]
    Irqfd {
        device: &'static str,
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot place {device} on the bus: {source}")]
    Bus {
        device: &'static str,
        #[source]
        source: BusError,
    },
}

/// The VM's devices and the buses that reach them.
pub struct DeviceManager {
    /// The buses, handed to the vCPUs once everything is placed.
    pub buses: Buses,
    /// COM1, also fed by the event loop.
    pub serial: Arc<Mutex<Serial>>,
}

impl DeviceManager {
    /// Creates the legacy devices: COM1 (output per `console`), the i8042 reset line and the
    /// ACPI power-management registers, the last two reporting to `exit`.
    pub fn new(
        vm: &VmFd,
        console: &ConsoleConfig,
        exit: &ExitRequest,
    ) -> Result<Self, DeviceError> {
        let mut buses = Buses::default();

        let irq = irq_line(vm, "COM1", serial::COM1_IRQ)?;
        let out: Box<dyn Write + Send> = match console {
            ConsoleConfig::Stdio => Box::new(std::io::stdout()),
            ConsoleConfig::Off => Box::new(std::io::sink()),
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

        Ok(Self { buses, serial })
    }
}

fn irq_line(vm: &VmFd, device: &'static str, gsi: u32) -> Result<IrqTrigger, DeviceError> {
    let irq = IrqTrigger::new().map_err(|source| DeviceError::IrqEventFd { device, source })?;
    vm.register_irqfd(irq.eventfd(), gsi)
        .map_err(|source| DeviceError::Irqfd {
            device,
            gsi,
            source,
        })?;
    Ok(irq)
}

fn place_pio(
    buses: &mut Buses,
    device: &'static str,
    dev: devices::bus::SharedDevice,
    port: u16,
    len: u16,
) -> Result<(), DeviceError> {
    buses
        .pio
        .insert(dev, u64::from(port), u64::from(len))
        .map_err(|source| DeviceError::Bus { device, source })
}
