//! ACPI power management registers of a hardware-reduced ACPI platform.
//!
//! The FADT points the guest's sleep control, sleep status and reset registers at this device
//! (see `vmm::acpi`). Writing sleep type 5 with SLP_EN set means "enter S5", i.e. power off;
//! writing [`RESET_VALUE`] to the reset register means reset.

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitRequest};

/// First I/O port of the block.
pub const PORT_BASE: u16 = 0x600;
/// Number of ports in the block.
pub const PORT_LEN: u16 = 4;
/// Offset of the sleep control register (ACPI 6.x §4.8.3.7).
pub const SLEEP_CONTROL: u16 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS: u16 = 1;
/// Offset of the reset register (FADT RESET_REG).
pub const RESET: u16 = 2;
/// The value the guest writes to the reset register to reset the platform.
pub const RESET_VALUE: u8 = 0x1;
/// The SLP_TYP value the DSDT's `\_S5` package gives for power off.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The sleep and reset registers.
pub struct AcpiPm {
    exit: ExitRequest,
    unsupported_sleep: crate::log_limit::LogLimit,
}

impl AcpiPm {
    /// A block that reports power-off and reset to `exit`.
    pub fn new(exit: ExitRequest) -> Self {
        Self {
            exit,
            unsupported_sleep: Default::default(),
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status reads as "not waking"; the others are write-only.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset as u16 {
            SLEEP_CONTROL => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                    self.exit.request(ExitReason::PowerOff);
                } else if value & SLP_EN != 0 {
                    crate::warn_limited!(
                        self.unsupported_sleep,
                        sleep_type,
                        "guest asked for an unsupported sleep state"
                    );
                }
            }
            RESET if value == RESET_VALUE => self.exit.request(ExitReason::Reset),
            _ => {}
        }
    }
}

/// The ACPI power button of a hardware-reduced platform: pressing it raises the Generic
/// Event Device's interrupt, whose `_EVT` method (in the DSDT) notifies `\_SB.PWRB`; the
/// guest's button driver then starts its orderly shutdown.
pub struct PowerButton {
    irq: crate::irq::IrqTrigger,
}

/// The GED interrupt line (an IOAPIC pin no other device uses).
pub const GED_GSI: u32 = 23;

impl PowerButton {
    /// A button wired to `irq` (registered by the VMM as the irqfd of [`GED_GSI`]).
    pub fn new(irq: crate::irq::IrqTrigger) -> Self {
        Self { irq }
    }

    /// Presses the button once.
    pub fn press(&self) -> std::io::Result<()> {
        self.irq.eventfd().write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_s5_with_slp_en_requests_power_off() {
        let exit = ExitRequest::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(SLEEP_CONTROL as u64, &[S5_SLEEP_TYPE << 2]);
        assert_eq!(exit.reason(), None, "SLP_TYP without SLP_EN does nothing");
        pm.write(SLEEP_CONTROL as u64, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn acpi_reset_register_requests_reset() {
        let exit = ExitRequest::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(RESET as u64, &[0x2]);
        assert_eq!(exit.reason(), None);
        pm.write(RESET as u64, &[RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
