//! Saving and restoring a virtio-mmio device: the transport's registers and
//! queue positions plus the device model's own state (see `state.rs`).

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
use vm_memory::GuestMemoryMmap;

use super::device::VirtioDevice;
use super::errors::RestoreError;
use super::interrupt::InterruptLine;
use super::mmio::VirtioMmio;
use super::queue_config::{apply_snapshot, snapshot};
use super::state::{TransportState, VirtioMmioState};

impl<D: VirtioDevice> VirtioMmio<D> {
    /// The state to save (vCPUs paused; nothing is in flight).
    pub fn save(&self) -> VirtioMmioState<D::State> {
        VirtioMmioState {
            transport: TransportState {
                device_type: self.device.device_type(),
                device_status: self.status,
                device_features_sel: self.device_features_sel,
                driver_features_sel: self.driver_features_sel,
                acked_features: self.driver_features,
                queue_sel: self.queue_sel,
                queues: self.queues.iter().map(snapshot).collect(),
                interrupt_status: self.interrupt_status,
                config_generation: self.config_generation,
            },
            device: self.device.save(),
        }
    }

    /// A transport in the saved `state` for `device` (already restored from
    /// its own state); ready queues are checked against `mem` again.
    pub fn restore(
        device: D,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptLine>,
        state: &TransportState,
    ) -> Result<Self, RestoreError> {
        let mut mmio = Self::new(device, mem, interrupt);
        let name = mmio.device.name().to_string();
        if state.device_type != mmio.device.device_type() {
            return Err(RestoreError::DeviceType {
                device: name,
                saved: state.device_type,
                actual: mmio.device.device_type(),
            });
        }
        if state.queues.len() != mmio.queues.len() {
            return Err(RestoreError::QueueCount {
                device: name,
                saved: state.queues.len(),
                actual: mmio.queues.len(),
            });
        }
        for (i, (slot, saved)) in mmio.queues.iter_mut().zip(&state.queues).enumerate() {
            if saved.ready {
                apply_snapshot(&mut slot.queue, saved, &mmio.mem).map_err(|error| {
                    RestoreError::Queue {
                        device: name.clone(),
                        queue: i as u16,
                        error,
                    }
                })?;
            }
            slot.regs = *saved;
        }
        mmio.status = state.device_status;
        mmio.device_features_sel = state.device_features_sel;
        mmio.driver_features_sel = state.driver_features_sel;
        mmio.driver_features = state.acked_features;
        mmio.queue_sel = state.queue_sel;
        mmio.interrupt_status = state.interrupt_status;
        mmio.config_generation = state.config_generation;
        if mmio.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            mmio.device.activate(mmio.driver_features);
        }
        Ok(mmio)
    }
}
