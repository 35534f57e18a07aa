//! A minimal 8250 UART on COM1 (0x3f8): enough for a guest to print bytes.
//! Transmitted bytes go to a per-VM log; the line status register always
//! says the transmitter is empty; there is no input. The one interrupt is
//! "transmitter holding register empty" (THRI): pending when the driver
//! enables it in IER and after every byte it writes, cleared by reading
//! IIR or writing a byte; the IRQ line follows it gated by MCR OUT2, as on
//! a PC, and [`Serial::write`] reports when the line rises
//! so the bus can raise IRQ 4 (an edge on the PIC).

use serde::{Deserialize, Serialize};

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of COM1 ports.
pub const COM1_PORTS: u16 = 8;
/// Bytes of output kept per VM; later bytes are counted, not stored.
pub const OUTPUT_LIMIT: usize = 1 << 20;

const DATA: u8 = 0;
const IER: u8 = 1;
const IIR_FCR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const MSR: u8 = 6;
const SCR: u8 = 7;

const LCR_DLAB: u8 = 0x80;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_IDLE: u8 = 0x40;
const IIR_NONE_PENDING: u8 = 0x01;
const IIR_THRI: u8 = 0x02;
const IER_THRI: u8 = 0x02;
const MCR_OUT2: u8 = 0x08;
const IIR_FIFO_ENABLED: u8 = 0xc0;
const FCR_FIFO_ENABLE: u8 = 0x01;
const MSR_DEFAULT: u8 = 0xb0; // DCD, DSR, CTS
const MCR_LOOP: u8 = 0x10;

/// The UART's registers: the saved device state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub ier: u8,
    pub fcr: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    /// Bytes the guest has transmitted so far (stored or not).
    pub transmitted: u64,
    /// A THR-empty interrupt is pending (not yet taken by an IIR read).
    #[serde(default)]
    pub thri_pending: bool,
}

/// COM1 with its output log.
#[derive(Debug, Default)]
pub struct Serial {
    state: SerialState,
    output: Vec<u8>,
}

impl Serial {
    /// A UART in the given register state with an empty log.
    pub fn from_state(state: SerialState) -> Self {
        Self {
            state,
            output: Vec::new(),
        }
    }

    /// The registers.
    pub fn state(&self) -> SerialState {
        self.state.clone()
    }

    /// Bytes transmitted since this VM (not its image) started.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Whether the UART drives its IRQ line.
    fn irq_level(&self) -> bool {
        self.state.thri_pending && self.state.ier & IER_THRI != 0 && self.state.mcr & MCR_OUT2 != 0
    }

    /// A guest read of register `offset` (reading IIR takes a pending
    /// interrupt; reads never raise one).
    pub fn read(&mut self, offset: u8) -> u8 {
        let dlab = self.state.lcr & LCR_DLAB != 0;
        match offset {
            DATA if dlab => self.state.dll,
            DATA => 0,
            IER if dlab => self.state.dlm,
            IER => self.state.ier,
            IIR_FCR => {
                let fifo = if self.state.fcr & FCR_FIFO_ENABLE != 0 {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                if self.state.thri_pending && self.state.ier & IER_THRI != 0 {
                    self.state.thri_pending = false;
                    IIR_THRI | fifo
                } else {
                    IIR_NONE_PENDING | fifo
                }
            }
            LCR => self.state.lcr,
            MCR => self.state.mcr,
            LSR => LSR_THR_EMPTY | LSR_IDLE,
            MSR if self.state.mcr & MCR_LOOP != 0 => loopback_msr(self.state.mcr),
            MSR => MSR_DEFAULT,
            SCR => self.state.scr,
            _ => 0xff,
        }
    }

    /// A guest write of `value` to register `offset`; returns whether the
    /// IRQ line rose.
    pub fn write(&mut self, offset: u8, value: u8) -> bool {
        let before = self.irq_level();
        let dlab = self.state.lcr & LCR_DLAB != 0;
        match offset {
            DATA if dlab => self.state.dll = value,
            DATA => {
                // The byte leaves at once: THR is empty again.
                self.transmit(value);
                self.state.thri_pending = true;
            }
            IER if dlab => self.state.dlm = value,
            IER => {
                let enabling = value & IER_THRI != 0 && self.state.ier & IER_THRI == 0;
                self.state.ier = value & 0x0f;
                if enabling {
                    self.state.thri_pending = true;
                }
            }
            IIR_FCR => self.state.fcr = value,
            LCR => self.state.lcr = value,
            MCR => self.state.mcr = value,
            SCR => self.state.scr = value,
            _ => {}
        }
        // Writing a byte clears THRI before the empty THR sets it again: a
        // new edge whenever the line is up afterwards.
        self.irq_level() && (!before || offset == DATA && !dlab)
    }

    fn transmit(&mut self, byte: u8) {
        self.state.transmitted += 1;
        if self.state.mcr & MCR_LOOP == 0 && self.output.len() < OUTPUT_LIMIT {
            self.output.push(byte);
        }
    }
}

/// The modem status a UART in loopback mode reports: its own modem
/// controls fed back (DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD), as Linux's
/// 8250 probe checks (MCR 0x0a must read back as MSR 0x90).
fn loopback_msr(mcr: u8) -> u8 {
    ((mcr & 0x01) << 5) | ((mcr & 0x02) << 3) | ((mcr & 0x04) << 4) | ((mcr & 0x08) << 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmits_bytes_to_the_log() {
        let mut serial = Serial::default();
        assert_ne!(serial.read(LSR) & LSR_THR_EMPTY, 0);
        for byte in b"hi\n" {
            serial.write(DATA, *byte);
        }
        assert_eq!(serial.output(), b"hi\n");
        assert_eq!(serial.state().transmitted, 3);
    }

    #[test]
    fn divisor_latch_is_separate_from_data() {
        let mut serial = Serial::default();
        serial.write(LCR, LCR_DLAB | 0x03);
        serial.write(DATA, 0x01);
        serial.write(IER, 0x00);
        serial.write(LCR, 0x03);
        assert_eq!(serial.state().dll, 1);
        assert!(serial.output().is_empty());
        assert_eq!(serial.read(LCR), 0x03);
    }

    #[test]
    fn loopback_feeds_modem_controls_back_like_an_8250() {
        // (MCR low bits, MSR high nibble)
        let table = [
            (0x0a, 0x90),
            (0x01, 0x20),
            (0x02, 0x10),
            (0x04, 0x40),
            (0x08, 0x80),
            (0x0f, 0xf0),
        ];
        let mut serial = Serial::default();
        for (mcr, msr) in table {
            serial.write(MCR, MCR_LOOP | mcr);
            assert_eq!(serial.read(MSR) & 0xf0, msr, "MCR {mcr:#x}");
        }
    }

    #[test]
    fn thr_empty_interrupt_follows_ier_iir_and_out2() {
        let mut serial = Serial::default();
        // Polled output (no IER) never interrupts.
        assert!(!serial.write(DATA, b'a'));
        assert_eq!(serial.read(IIR_FCR) & 0x0f, IIR_NONE_PENDING);
        // Enabling THRI with OUT2 set raises the line at once.
        serial.write(MCR, MCR_OUT2);
        assert!(serial.write(IER, IER_THRI));
        // Reading IIR takes the interrupt.
        assert_eq!(serial.read(IIR_FCR) & 0x0f, IIR_THRI);
        assert_eq!(serial.read(IIR_FCR) & 0x0f, IIR_NONE_PENDING);
        // Every byte written raises it again, taken or not.
        assert!(serial.write(DATA, b'b'));
        assert!(serial.write(DATA, b'c'));
        assert_eq!(serial.read(IIR_FCR) & 0x0f, IIR_THRI);
        // Switching THRI off, or OUT2 off, keeps the line down.
        assert!(!serial.write(IER, 0));
        assert!(!serial.write(DATA, b'd'));
        assert!(serial.write(IER, IER_THRI));
        serial.write(MCR, 0);
        assert!(!serial.write(DATA, b'e'));
        assert_eq!(serial.output(), b"abcde");
    }

    #[test]
    fn state_round_trips() {
        let mut serial = Serial::default();
        serial.write(SCR, 0x5a);
        serial.write(DATA, b'x');
        let restored = Serial::from_state(serial.state());
        assert_eq!(restored.state(), serial.state());
        assert!(restored.output().is_empty());
    }
}
