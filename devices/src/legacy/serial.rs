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

    /// Queues bytes for the guest to receive; returns how many fitted in the FIFO. With
    /// the FIFO full and bytes waiting, the received-data interrupt is raised again: on a
    /// real 16550 that interrupt is a level that stays up while data waits, but here it is an
    /// edge, sent when bytes arrive, and an edge the guest missed (its handler had just found
    /// the FIFO empty) would leave a full FIFO unread and the input stuck for ever.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.uart.fifo_capacity());
        if n == 0 {
            if !bytes.is_empty() {
                self.raise_received_data();
            }
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

    /// Raises the received-data interrupt again if the guest enabled it and data waits in
    /// the FIFO. vm-superio raises it only when the identification register does not show
    /// it already: once an edge is lost, that register keeps showing it, no edge ever comes
    /// again, and a full FIFO waits for a guest that waits for an interrupt. (With DLAB set
    /// the driver is programming the baud rate, and IER is not reachable: nothing is raised.)
    fn raise_received_data(&mut self) {
        const IER: u8 = 1;
        const LCR: u8 = 3;
        const LCR_DLAB: u8 = 0x80;
        const IER_RDA: u8 = 1;
        if self.uart.read(LCR) & LCR_DLAB != 0 || self.uart.read(IER) & IER_RDA == 0 {
            return;
        }
        if self.uart.fifo_capacity() < FIFO_SIZE {
            if let Err(e) = vm_superio::Trigger::trigger(self.uart.interrupt_evt()) {
                tracing::debug!(error = %e, "serial input interrupt failed");
            }
        }
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
    fn serial_input_waiting_on_a_full_fifo_raises_the_interrupt_again() {
        let irq = IrqTrigger::new().unwrap();
        let evt = irq.try_clone().unwrap();
        let mut serial = Serial::new(irq, Box::new(std::io::sink()));
        serial.write(1, &[1]); // IER: received-data interrupt on
        let cap = serial.input_capacity();
        assert_eq!(serial.enqueue_input(&vec![b'x'; cap]), cap);
        assert!(evt.eventfd().read().unwrap() >= 1, "raised for the bytes");
        // The guest missed that edge; more input waits on the full FIFO: raised again.
        assert_eq!(serial.enqueue_input(b"more"), 0);
        assert_eq!(evt.eventfd().read().unwrap(), 1, "raised again");
        // Not with the interrupt off.
        serial.write(1, &[0]);
        assert_eq!(serial.enqueue_input(b"more"), 0);
        evt.eventfd().write(1).unwrap();
        assert_eq!(evt.eventfd().read().unwrap(), 1, "not raised with IER off");
    }
}
