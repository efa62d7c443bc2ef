//! The 16550A UART on COM1, a bus adapter around vm-superio's serial state machine.

use std::io::Write;

use crate::bus::BusDevice;
use crate::irq::IrqTrigger;

/// COM1's I/O ports.
pub const COM1_PORT_BASE: u16 = 0x3f8;
/// Ports a 16550 decodes.
pub const PORT_LEN: u16 = 8;
/// Bytes the UART's receive FIFO holds (vm-superio's 16550A).
const FIFO_SIZE: usize = 64;
/// LCR's divisor-latch access bit, IER's received-data interrupt enable.
const LCR_DLAB: u8 = 0x80;
const IER_RDA: u8 = 0x01;
/// COM1's legacy IRQ line.
pub const COM1_IRQ: u32 = 4;

type Uart = vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

/// The UART with its output sink; input arrives through [`Serial::enqueue_input`].
pub struct Serial {
    uart: Uart,
    output_errors: u64,
}

impl Serial {
    /// A UART that raises `irq` and writes what the guest transmits to `out`.
    pub fn new(irq: IrqTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(irq, out),
            output_errors: 0,
        }
    }

    /// How many more input bytes the receive FIFO takes now.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Input bytes waiting in the receive FIFO for the guest to read.
    pub fn input_waiting(&self) -> usize {
        FIFO_SIZE - self.uart.fifo_capacity()
    }

    /// Queues bytes for the guest to receive; returns how many fitted in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = ?e, "serial input interrupt failed");
                n
            }
        }
    }

    /// Whether the guest has the received-data interrupt on (IER, outside baud-rate setup).
    pub fn received_data_enabled(&self) -> bool {
        received_data_on(&self.uart.state())
    }

    /// Asserts the received-data interrupt again, if the guest has it enabled and data
    /// waits in the FIFO; true if it did. On a real 16550 that interrupt is a level that
    /// stays up while data waits; here it is an edge, sent when bytes arrive (vm-superio),
    /// and an edge the guest missed (an interrupt line masked at that moment, an
    /// identification read that cleared it) would leave the FIFO unread and the input stuck
    /// for ever. The caller does this when the guest has read nothing for a while.
    ///
    /// The identification register must show the interrupt when it arrives, or Linux's 8250
    /// handler finds "no interrupt" and leaves the data: when it does not show it (a read
    /// cleared it), rewriting IER makes vm-superio set it and trigger, as re-enabling does on
    /// the real part; when it shows it already, vm-superio would not trigger again, so the
    /// line is triggered here. (With DLAB set the driver is programming the baud rate and
    /// IER is not reachable: nothing is raised.)
    pub fn raise_received_data(&mut self) -> bool {
        const IER: u8 = 1;
        const IIR_RDA: u8 = 0x04;
        let state = self.uart.state();
        if !received_data_on(&state) || state.in_buffer.is_empty() {
            return false;
        }
        let raised = if state.interrupt_identification & IIR_RDA == 0 {
            self.uart
                .write(IER, state.interrupt_enable)
                .map_err(|e| format!("{e:?}"))
        } else {
            vm_superio::Trigger::trigger(self.uart.interrupt_evt()).map_err(|e| e.to_string())
        };
        if let Err(e) = raised {
            tracing::debug!(error = %e, "serial input interrupt failed");
        }
        true
    }

    /// Output writes that failed (for example a closed stdout); the guest never sees them.
    pub fn output_errors(&self) -> u64 {
        self.output_errors
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }

    /// The UART's registers and receive FIFO, for a migration.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            rx_fifo: s.in_buffer,
        }
    }

    /// Takes a migrated UART's state; the output keeps going where this one's goes.
    pub fn restore(&mut self, snapshot: &SerialSnapshot) -> Result<(), String> {
        let irq = self
            .uart
            .interrupt_evt()
            .try_clone()
            .map_err(|e| format!("cannot share the serial interrupt: {e}"))?;
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            snapshot.registers;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: snapshot.rx_fifo.clone(),
        };
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(std::io::sink()));
        match Uart::from_state(&state, irq, vm_superio::serial::NoEvents, out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(e) => Err(format!("bad serial state: {e:?}")),
        }
    }
}

/// Whether `state` has the received-data interrupt on: IER's bit, outside baud-rate setup
/// (with DLAB set the IER offset is the divisor's high byte).
fn received_data_on(state: &vm_superio::serial::SerialState) -> bool {
    state.line_control & LCR_DLAB == 0 && state.interrupt_enable & IER_RDA != 0
}

/// COM1's state in a migration stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    pub rx_fifo: Vec<u8>,
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if self.uart.write(offset as u8, value).is_err() {
                self.output_errors += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_transmit_reaches_sink_and_input_is_bounded_by_fifo() {
        let sink = Sink::default();
        let irq = IrqTrigger::new().unwrap();
        let mut serial = Serial::new(irq, Box::new(sink.clone()));
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");

        let cap = serial.input_capacity();
        let big = vec![b'x'; cap + 10];
        assert_eq!(serial.enqueue_input(&big), cap);
        assert_eq!(serial.enqueue_input(b"y"), 0);
        let mut b = [0u8];
        serial.read(0, &mut b);
        assert_eq!(b[0], b'x');
        assert_eq!(serial.input_capacity(), 1);
    }

    #[test]
    fn serial_received_data_interrupt_is_raised_again_while_data_waits() {
        const IIR: u64 = 2;
        let irq = IrqTrigger::new().unwrap();
        let evt = irq.try_clone().unwrap();
        let mut serial = Serial::new(irq, Box::new(std::io::sink()));
        // Nothing waits: nothing to raise.
        serial.write(1, &[1]); // IER: received-data interrupt on
        let _ = evt.eventfd().read();
        assert!(!serial.raise_received_data());
        assert_eq!(serial.enqueue_input(b"abc"), 3);
        assert_eq!(serial.input_waiting(), 3);
        assert_eq!(evt.eventfd().read().unwrap(), 1, "raised for the bytes");
        // The guest missed that edge: IIR still shows it; raised again by a trigger.
        assert!(serial.raise_received_data());
        assert_eq!(evt.eventfd().read().unwrap(), 1, "raised again");
        // An identification read cleared IIR while the data stayed: raised again, and IIR
        // shows the interrupt when the guest's handler looks.
        let mut iir = [0u8];
        serial.read(IIR, &mut iir);
        serial.read(IIR, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x01, "no interrupt shown after the read");
        assert!(serial.raise_received_data());
        assert!(evt.eventfd().read().unwrap() >= 1, "raised again");
        serial.read(IIR, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x04, "received data shown");
        // Not with the interrupt off.
        serial.write(1, &[0]);
        assert!(!serial.raise_received_data());
        evt.eventfd().write(1).unwrap();
        assert_eq!(evt.eventfd().read().unwrap(), 1, "not raised with IER off");
        // Not once the guest read everything.
        serial.write(1, &[1]);
        let mut b = [0u8];
        for _ in 0..3 {
            serial.read(0, &mut b);
        }
        assert_eq!(serial.input_waiting(), 0);
        assert!(!serial.raise_received_data());
    }
}
