//! Saved state of a virtio-mmio device: the transport's registers and queue
//! positions (plain data, serde) next to the device model's own state.
//! Nothing is in flight when it is taken: every device completes a request
//! before `process_queue` returns, and state is saved with the vCPUs paused.

use serde::{Deserialize, Serialize};

/// One queue as the driver configured it and how far the device got.
/// Mirrors `virtio_queue::QueueState` (which has no serde) plus the raw
/// register values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// QueueNum as written by the driver (0 = not written, refused at QueueReady).
    pub size: u32,
    /// QueueDesc (descriptor table address).
    pub desc_table: u64,
    /// QueueDriver (available ring address).
    pub avail_ring: u64,
    /// QueueDevice (used ring address).
    pub used_ring: u64,
    /// QueueReady.
    pub ready: bool,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

/// The transport's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// Device ID the state belongs to (checked on restore).
    pub device_type: u32,
    /// Status register, including NEEDS_RESET if the device broke.
    pub device_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueSnapshot>,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    pub config_generation: u32,
}

/// A virtio-mmio device's saved state: transport plus device model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState<S> {
    pub transport: TransportState,
    pub device: S,
}
