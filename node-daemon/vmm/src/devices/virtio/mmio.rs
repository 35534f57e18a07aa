//! The virtio-mmio transport (virtio 1.1 §4.2.2, version 2 registers) for
//! one device: the register file, the status state machine, feature
//! negotiation, queue configuration checked against guest memory, and the
//! dispatch of notifications to the device model.
//!
//! Status moves 0 → ACKNOWLEDGE → +DRIVER → +FEATURES_OK → +DRIVER_OK, one
//! bit at a time; any other write is refused (the register keeps its value)
//! except 0 (reset) and FAILED. FEATURES_OK is refused unless the driver
//! accepted VIRTIO_F_VERSION_1 and nothing that was not offered. Queues are
//! configured between FEATURES_OK and DRIVER_OK; QueueReady = 1 is refused
//! unless size and alignment are valid and all three rings lie in guest
//! memory. A malformed chain breaks the device: NEEDS_RESET is set, a
//! configuration interrupt is raised and notifications are ignored until
//! the driver resets it. Every refusal is kept in [`VirtioMmio::last_fault`].

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::device::{QueueAccess, VirtioDevice};
use super::errors::{DeviceFault, RegisterError, RequestError};
use super::interrupt::{InterruptLine, VirtioInterrupt};
use super::queue_config::{QueueSlot, apply_snapshot, set_high, set_low};
use super::state::QueueSnapshot;
use super::status::{StatusChange, check_features, status_change};

/// "virt", little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// virtio-mmio version 2 (virtio 1.0 and later).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver.
pub const VENDOR_ID: u32 = 0x7473_6d76; // "vmst"
/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;
/// Size of a device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of QueueNotify (for `VmFd::register_ioevent`).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// Register-level access to a virtio-mmio device, whatever its model
/// (object safe: the VM wiring keeps `Arc<Mutex<dyn MmioTransport>>`).
pub trait MmioTransport: Send {
    /// A guest read of `data.len()` bytes at `offset` into the window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` into the window.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// The guest notified queue `value` (an ioeventfd on QueueNotify fired).
    fn queue_notify(&mut self, value: u32);
    /// Virtio device ID.
    fn device_type(&self) -> u32;
}

/// One virtio device behind the virtio-mmio register interface.
pub struct VirtioMmio<D: VirtioDevice> {
    pub(super) device: D,
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<dyn InterruptLine>,
    pub(super) status: u32,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) queue_sel: u32,
    pub(super) queues: Vec<QueueSlot>,
    pub(super) interrupt_status: u32,
    pub(super) config_generation: u32,
    last_fault: Option<DeviceFault>,
    faults: u64,
    last_refused: Option<DeviceFault>,
    refused: u64,
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioMmio<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmio")
            .field("device", &self.device.name())
            .field("status", &self.status)
            .field("acked_features", &self.driver_features)
            .field("queues", &self.queues)
            .field("interrupt_status", &self.interrupt_status)
            .field("last_fault", &self.last_fault)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// A freshly reset transport for `device` over guest memory `mem`
    /// (see `memory::guest_memory_view`), raising `interrupt`.
    ///
    /// Panics if the device's queue sizes are not powers of two up to
    /// 32768 (a bug in the device model, not guest input).
    pub fn new(device: D, mem: GuestMemoryMmap, interrupt: Arc<dyn InterruptLine>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueSlot {
                regs: QueueSnapshot::default(),
                queue: Queue::new(max).expect("device queue sizes are powers of two <= 32768"),
            })
            .collect();
        Self {
            device,
            mem,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            interrupt_status: 0,
            config_generation: 0,
            last_fault: None,
            faults: 0,
            last_refused: None,
            refused: 0,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutable.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// True when the device stopped on a malformed request (NEEDS_RESET).
    pub fn needs_reset(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// Features offered: the device's plus VIRTIO_F_VERSION_1.
    pub fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Whether queue `index` is ready.
    pub fn queue_ready(&self, index: usize) -> bool {
        self.queues.get(index).is_some_and(|s| s.queue.ready())
    }

    /// InterruptStatus bits not yet acknowledged.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// The latest refused register access or queue configuration, or the
    /// fault that broke the device.
    pub fn last_fault(&self) -> Option<&DeviceFault> {
        self.last_fault.as_ref()
    }

    /// How many faults were recorded.
    pub fn fault_count(&self) -> u64 {
        self.faults
    }

    /// The latest request answered with an error status (device still working).
    pub fn last_refused_request(&self) -> Option<&DeviceFault> {
        self.last_refused.as_ref()
    }

    /// How many requests were answered with an error status.
    pub fn refused_requests(&self) -> u64 {
        self.refused
    }

    /// Serves queue `index` if the device is running (DRIVER_OK, not broken)
    /// and the queue is ready; for work the VMM finds (a readable tap). Returns
    /// whether it ran. Guest notifications go through [`Self::queue_notify`].
    pub fn process_queue(&mut self, index: u16) -> bool {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
            || self.needs_reset()
            || !self.queue_ready(usize::from(index))
        {
            return false;
        }
        let slot = &mut self.queues[usize::from(index)];
        let mut access = QueueAccess::new(index, &mut slot.queue, &self.mem);
        let result = self.device.process_queue(&mut access);
        let (completed, refused) = access.finish();
        for error in refused {
            self.refuse(index, error);
        }
        if completed > 0 {
            let notify = self.queues[usize::from(index)]
                .queue
                .needs_notification(&self.mem)
                .unwrap_or(true);
            if notify {
                self.raise(VirtioInterrupt::Queue(index));
            }
        }
        match result {
            Ok(()) => {}
            Err(error) if !error.breaks_device() => self.refuse(index, error),
            Err(error) => self.break_device(index, error),
        }
        true
    }

    /// A guest notification of queue `value`: refused (and recorded) before
    /// DRIVER_OK, for a missing queue or one not ready; ignored while the
    /// device needs a reset.
    pub fn queue_notify(&mut self, value: u32) {
        let error = if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            RegisterError::NotifyBeforeDriverOk {
                queue: value,
                status: self.status,
            }
        } else if self.needs_reset() {
            return;
        } else if value as usize >= self.queues.len() {
            RegisterError::NoSuchQueue {
                queue: value,
                queues: self.queues.len(),
            }
        } else if !self.queue_ready(value as usize) {
            RegisterError::NotifyNotReady { queue: value }
        } else {
            self.process_queue(value as u16);
            return;
        };
        self.register_fault(error);
    }

    /// A guest read of the register window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.register_fault(RegisterError::Width {
                offset,
                len: data.len(),
            });
            return;
        }
        let value = match offset as u32 {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |s| u32::from(s.queue.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => u32::from(self.queue_ready(self.queue_sel as usize)),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            reg::VIRTIO_MMIO_STATUS => self.status,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // Write-only registers read as zero.
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A guest write to the register window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.register_fault(RegisterError::ConfigReadOnly {
                offset: offset - CONFIG_OFFSET,
                len: data.len(),
            });
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.register_fault(RegisterError::Width {
                offset,
                len: data.len(),
            });
        };
        if !offset.is_multiple_of(4) {
            return self.register_fault(RegisterError::Width { offset, len: 4 });
        }
        let value = u32::from_le_bytes(bytes);
        let result = match offset as u32 {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => {
                self.device_features_sel = value;
                Ok(())
            }
            reg::VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => {
                self.driver_features_sel = value;
                Ok(())
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => {
                self.queue_sel = value;
                Ok(())
            }
            reg::VIRTIO_MMIO_QUEUE_NUM => self.queue_regs().map(|r| r.size = value),
            reg::VIRTIO_MMIO_QUEUE_READY => return self.write_queue_ready(value),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {
                self.queue_notify(value);
                Ok(())
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt_status &= !value;
                Ok(())
            }
            reg::VIRTIO_MMIO_STATUS => self.write_status(value),
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.queue_regs().map(|r| set_low(&mut r.desc_table, value))
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => self
                .queue_regs()
                .map(|r| set_high(&mut r.desc_table, value)),
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.queue_regs().map(|r| set_low(&mut r.avail_ring, value))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self
                .queue_regs()
                .map(|r| set_high(&mut r.avail_ring, value)),
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.queue_regs().map(|r| set_low(&mut r.used_ring, value))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.queue_regs().map(|r| set_high(&mut r.used_ring, value))
            }
            _ => Err(RegisterError::Unknown { offset }),
        };
        if let Err(error) = result {
            self.register_fault(error);
        }
    }

    fn write_driver_features(&mut self, value: u32) -> Result<(), RegisterError> {
        if self.status != VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER {
            return Err(RegisterError::FeaturesLate {
                status: self.status,
            });
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            // Feature words beyond 64 bits: nothing is offered there.
            _ if value != 0 => {
                return Err(RegisterError::FeaturesNotOffered {
                    acked: u64::from(value),
                    offered: 0,
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// The registers of the selected queue, if it may be configured now.
    fn queue_regs(&mut self) -> Result<&mut QueueSnapshot, RegisterError> {
        let queue = self.queue_sel;
        let configurable = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET) == 0;
        if !configurable {
            return Err(RegisterError::QueueConfigLate {
                queue,
                status: self.status,
            });
        }
        let queues = self.queues.len();
        let slot = self
            .queues
            .get_mut(queue as usize)
            .ok_or(RegisterError::NoSuchQueue { queue, queues })?;
        if slot.queue.ready() {
            return Err(RegisterError::QueueConfigWhileReady { queue });
        }
        Ok(&mut slot.regs)
    }

    fn write_queue_ready(&mut self, value: u32) {
        let queue = self.queue_sel;
        if value == 0 {
            // Allowed at any time (Linux clears it after a reset too).
            if let Some(slot) = self.queues.get_mut(queue as usize) {
                slot.queue.set_ready(false);
                slot.regs.ready = false;
            }
            return;
        }
        if let Err(error) = self.queue_regs() {
            return self.register_fault(error);
        }
        let slot = &mut self.queues[queue as usize];
        let regs = QueueSnapshot {
            ready: true,
            next_avail: 0,
            next_used: 0,
            ..slot.regs
        };
        let result = apply_snapshot(&mut slot.queue, &regs, &self.mem).map(|()| slot.regs = regs);
        if let Err(error) = result {
            self.fault(DeviceFault::QueueSetup {
                device: self.device.name().to_string(),
                queue,
                error,
            });
        }
    }

    fn write_status(&mut self, value: u32) -> Result<(), RegisterError> {
        match status_change(self.status, value)? {
            StatusChange::Reset => self.reset(),
            StatusChange::Failed => self.status |= VIRTIO_CONFIG_S_FAILED,
            StatusChange::Unchanged => {}
            StatusChange::Step(step) => {
                if step == VIRTIO_CONFIG_S_FEATURES_OK {
                    check_features(self.driver_features, self.offered_features())?;
                }
                if step == VIRTIO_CONFIG_S_DRIVER_OK {
                    self.device.activate(self.driver_features);
                }
                self.status |= step;
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for slot in &mut self.queues {
            slot.queue.reset();
            slot.regs = QueueSnapshot::default();
        }
        self.interrupt_status = 0;
        self.device.reset();
    }

    fn raise(&mut self, reason: VirtioInterrupt) {
        self.interrupt_status |= reason.status_bit();
        if let Err(error) = self.interrupt.trigger(reason) {
            tracing::warn!(device = self.device.name(), %error, "virtio interrupt not delivered");
        }
    }

    fn register_fault(&mut self, error: RegisterError) {
        self.fault(DeviceFault::Register {
            device: self.device.name().to_string(),
            error,
        });
    }

    fn fault(&mut self, fault: DeviceFault) {
        tracing::warn!("{fault}");
        self.faults += 1;
        self.last_fault = Some(fault);
    }

    fn refuse(&mut self, queue: u16, error: RequestError) {
        let fault = DeviceFault::Request {
            device: self.device.name().to_string(),
            queue,
            error,
        };
        tracing::debug!("{fault}");
        self.refused += 1;
        self.last_refused = Some(fault);
    }

    fn break_device(&mut self, queue: u16, error: RequestError) {
        self.fault(DeviceFault::Request {
            device: self.device.name().to_string(),
            queue,
            error,
        });
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.raise(VirtioInterrupt::Config);
        }
    }
}

impl<D: VirtioDevice> MmioTransport for VirtioMmio<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        VirtioMmio::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        VirtioMmio::write(self, offset, data)
    }

    fn queue_notify(&mut self, value: u32) {
        VirtioMmio::queue_notify(self, value)
    }

    fn device_type(&self) -> u32 {
        self.device.device_type()
    }
}
