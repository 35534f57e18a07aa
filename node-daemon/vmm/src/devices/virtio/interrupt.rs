//! How a virtio device tells the guest something happened: a small trait
//! with an irqfd implementation (the VM wiring registers its eventfd with
//! `VmFd::register_irqfd`) and a recorder for tests.

use std::io;
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Why a device raises its interrupt; the bit it sets in InterruptStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterrupt {
    /// The device added buffers to the used ring of this queue
    /// (InterruptStatus bit 0, "used buffer notification").
    Queue(u16),
    /// The configuration changed or the device needs a reset
    /// (InterruptStatus bit 1, "configuration change notification").
    Config,
}

impl VirtioInterrupt {
    /// The InterruptStatus bit this reason sets.
    pub fn status_bit(self) -> u32 {
        match self {
            VirtioInterrupt::Queue(_) => super::INT_VRING,
            VirtioInterrupt::Config => super::INT_CONFIG,
        }
    }
}

/// The interrupt line of one virtio-mmio device.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt. The transport has already set the matching
    /// InterruptStatus bit; the guest reads it and acknowledges.
    fn trigger(&self, reason: VirtioInterrupt) -> io::Result<()>;
}

/// An interrupt delivered through an irqfd: writing the eventfd injects the
/// GSI it is registered for. Registration (`VmFd::register_irqfd(&fd, gsi)`)
/// is the VM wiring's job; see [`IrqfdLine::eventfd`].
#[derive(Debug)]
pub struct IrqfdLine {
    eventfd: EventFd,
}

impl IrqfdLine {
    /// A fresh non-blocking eventfd, not yet registered with KVM.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            eventfd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register with `VmFd::register_irqfd`.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

impl InterruptLine for IrqfdLine {
    fn trigger(&self, _reason: VirtioInterrupt) -> io::Result<()> {
        self.eventfd.write(1)
    }
}

/// Records every interrupt instead of delivering it (tests).
#[derive(Debug, Default)]
pub struct RecordedInterrupts {
    events: Mutex<Vec<VirtioInterrupt>>,
}

impl RecordedInterrupts {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the interrupts recorded so far.
    pub fn take(&self) -> Vec<VirtioInterrupt> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Number of interrupts recorded and not yet taken.
    pub fn count(&self) -> usize {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl InterruptLine for RecordedInterrupts {
    fn trigger(&self, reason: VirtioInterrupt) -> io::Result<()> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reason);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irqfd_line_counts_triggers_on_its_eventfd() {
        let line = IrqfdLine::new().unwrap();
        line.trigger(VirtioInterrupt::Queue(0)).unwrap();
        line.trigger(VirtioInterrupt::Config).unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn recorder_keeps_reasons_in_order() {
        let rec = RecordedInterrupts::new();
        rec.trigger(VirtioInterrupt::Queue(1)).unwrap();
        rec.trigger(VirtioInterrupt::Config).unwrap();
        assert_eq!(
            rec.take(),
            vec![VirtioInterrupt::Queue(1), VirtioInterrupt::Config]
        );
        assert_eq!(rec.count(), 0);
    }
}
