//! The slice of an i8042 keyboard controller a guest without a keyboard needs: enough of the
//! command protocol to answer a probe, and the "pulse reset line" command (0xFE) that Linux's
//! `reboot=k` uses.

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitRequest};

/// First port of the device (data); the command/status port is at `PORT_BASE + 4`.
pub const PORT_BASE: u16 = 0x60;
/// Ports covered, 0x60..=0x64. Port 0x61 (PC speaker) is served by KVM's in-kernel PIT, which
/// sees it before the bus does.
pub const PORT_LEN: u16 = 5;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;

/// The controller.
pub struct I8042 {
    exit: ExitRequest,
    ctr: u8,
    output: Option<u8>,
    expect_ctr: bool,
}

impl I8042 {
    /// A controller whose reset line is wired to `exit`.
    pub fn new(exit: ExitRequest) -> Self {
        Self {
            exit,
            ctr: 0,
            output: None,
            expect_ctr: false,
        }
    }

    fn command(&mut self, cmd: u8) {
        self.expect_ctr = false;
        match cmd {
            CMD_READ_CTR => self.output = Some(self.ctr),
            CMD_WRITE_CTR => self.expect_ctr = true,
            CMD_SELF_TEST => self.output = Some(SELF_TEST_OK),
            CMD_KBD_TEST | CMD_AUX_TEST => self.output = Some(PORT_TEST_OK),
            CMD_PULSE_RESET => self.exit.request(ExitReason::Reset),
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA => self.output.take().unwrap_or(0),
            COMMAND => {
                STATUS_SYSTEM_FLAG
                    | if self.output.is_some() {
                        STATUS_OUTPUT_FULL
                    } else {
                        0
                    }
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            COMMAND => self.command(value),
            DATA if self.expect_ctr => {
                self.ctr = value;
                self.expect_ctr = false;
            }
            // Bytes for a keyboard that is not there are dropped.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn i8042_pulse_reset_requests_reset() {
        let exit = ExitRequest::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        dev.write(COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn i8042_answers_ctr_round_trip_and_self_test() {
        let mut dev = I8042::new(ExitRequest::new().unwrap());
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_ne!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA), 0x47);
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA), SELF_TEST_OK);
    }
}
