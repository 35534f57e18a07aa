//! The micro-VM's devices on the I/O port bus: COM1 (8250 UART) and the
//! mailbox. Unknown ports read as all ones and ignore writes (counted).
//! Devices in the MMIO hole (virtio-mmio) sit on the [`mmio_bus`].

pub mod mailbox;
pub mod mmio_bus;
pub mod serial;
pub mod virtio;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{MAILBOX_SLOT_SIZE, mailbox_slot};
use crate::vstate::ram_access::RamAccess;
use mailbox::{ARGS, Mailbox, MailboxState, PORT_REPORT, PORT_REQUEST};
use serial::{COM1_BASE, COM1_PORTS, Serial, SerialState};

/// Offset of the request arguments in a mailbox slot.
pub const SLOT_REQUEST_OFFSET: u64 = MAILBOX_SLOT_SIZE / 4;

/// Saved state of all devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialState,
    pub mailbox: MailboxState,
    /// The virtio-mmio devices of a Linux guest (absent in images of micro
    /// guests and in images written before format 1.1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtio: Vec<virtio::VirtioDeviceState>,
}

/// The devices of one VM.
#[derive(Debug)]
pub struct PortIoBus {
    serial: Mutex<Serial>,
    /// Raises COM1's IRQ (an irqfd on GSI 4), if wired.
    serial_irq: Option<EventFd>,
    mailbox: Arc<Mailbox>,
    ram: RamAccess,
    unknown_accesses: AtomicU64,
}

impl PortIoBus {
    /// Devices in `state`, reading mailbox slots through `ram`.
    pub fn new(state: DeviceState, ram: RamAccess) -> Self {
        Self {
            serial: Mutex::new(Serial::from_state(state.serial)),
            serial_irq: None,
            mailbox: Arc::new(Mailbox::from_state(state.mailbox)),
            ram,
            unknown_accesses: AtomicU64::new(0),
        }
    }

    /// Raises COM1's interrupt through `irq` (an eventfd the caller
    /// registered as an irqfd on GSI 4).
    pub fn with_serial_irq(mut self, irq: EventFd) -> Self {
        self.serial_irq = Some(irq);
        self
    }

    fn raise_serial_irq(&self, rose: bool) {
        if let (true, Some(irq)) = (rose, &self.serial_irq)
            && let Err(error) = irq.write(1)
        {
            tracing::warn!(%error, "cannot raise the COM1 interrupt");
        }
    }

    /// The mailbox.
    pub fn mailbox(&self) -> &Arc<Mailbox> {
        &self.mailbox
    }

    /// Serial output so far.
    pub fn serial_output(&self) -> Vec<u8> {
        self.serial_lock().output().to_vec()
    }

    /// Accesses to ports no device claims.
    pub fn unknown_accesses(&self) -> u64 {
        self.unknown_accesses.load(Ordering::Relaxed)
    }

    fn serial_lock(&self) -> std::sync::MutexGuard<'_, Serial> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device state to save (call with vCPUs paused).
    pub fn save(&self) -> DeviceState {
        DeviceState {
            serial: self.serial_lock().state(),
            mailbox: self.mailbox.save(),
            virtio: Vec::new(),
        }
    }

    /// A guest `in` on `port` by vCPU `vcpu`.
    pub fn io_in(&self, vcpu: u8, port: u16, data: &mut [u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&p) => {
                let value = self.serial_lock().read((p - COM1_BASE) as u8);
                data.fill(0);
                data[0] = value;
            }
            PORT_REQUEST => {
                let kind = match self.mailbox.poll_request(vcpu) {
                    Some(request) => {
                        self.write_request_args(vcpu, &request.args);
                        request.kind
                    }
                    None => 0,
                };
                let bytes = kind.to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&bytes[..n]);
            }
            _ => {
                self.unknown_accesses.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
        }
    }

    /// A guest `out` on `port` by vCPU `vcpu`.
    pub fn io_out(&self, vcpu: u8, port: u16, data: &[u8]) {
        match port {
            p if (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&p) => {
                let rose = self.serial_lock().write((p - COM1_BASE) as u8, data[0]);
                self.raise_serial_irq(rose);
            }
            PORT_REPORT => {
                let mut kind = [0u8; 4];
                let n = data.len().min(4);
                kind[..n].copy_from_slice(&data[..n]);
                let args = self.read_report_args(vcpu);
                self.mailbox
                    .record_report(vcpu, u32::from_le_bytes(kind), args);
            }
            _ => {
                self.unknown_accesses.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn read_report_args(&self, vcpu: u8) -> [u64; ARGS] {
        let slot = mailbox_slot(usize::from(vcpu));
        let mut args = [0u64; ARGS];
        for (i, arg) in args.iter_mut().enumerate() {
            *arg = self.ram.read_u64(slot + 8 * i as u64).unwrap_or(u64::MAX);
        }
        args
    }

    fn write_request_args(&self, vcpu: u8, args: &[u64; ARGS]) {
        let slot = mailbox_slot(usize::from(vcpu)) + SLOT_REQUEST_OFFSET;
        for (i, arg) in args.iter().enumerate() {
            // The slot is in low RAM, which every VM has (MIN_RAM).
            let _ = self.ram.write_u64(slot + 8 * i as u64, *arg);
        }
    }
}
