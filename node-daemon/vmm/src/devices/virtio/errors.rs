//! The errors of the virtio devices, one enum per operation: a register
//! access the transport refuses, a queue the driver configured badly, a
//! request (descriptor chain) the device cannot or will not serve, a saved
//! state that cannot be restored; and [`DeviceFault`], which names the
//! device and queue and is what the transport records.

use std::io;

/// A guest register access the transport refused (the register keeps its
/// value; nothing else changes).
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("register {offset:#x} accessed with {len} bytes (registers are 32-bit and aligned)")]
    Width { offset: u64, len: usize },
    #[error(
        "no register at offset {offset:#x} (legacy and shared-memory registers are not offered)"
    )]
    Unknown { offset: u64 },
    #[error(
        "status {to:#x} refused in status {from:#x} (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK are set one at a time, in order)"
    )]
    StatusOrder { from: u32, to: u32 },
    #[error("status {to:#x} refused: the device needs a reset (write 0 to Status)")]
    NeedsReset { to: u32 },
    #[error(
        "FEATURES_OK refused: the driver accepted features {acked:#x}, not offered (offered {offered:#x})"
    )]
    FeaturesNotOffered { acked: u64, offered: u64 },
    #[error(
        "FEATURES_OK refused: the driver did not accept VIRTIO_F_VERSION_1 (accepted {acked:#x})"
    )]
    Version1Missing { acked: u64 },
    #[error(
        "DriverFeatures written in status {status:#x} (only after DRIVER and before FEATURES_OK)"
    )]
    FeaturesLate { status: u32 },
    #[error(
        "queue {queue} configured in status {status:#x} (only after FEATURES_OK and before DRIVER_OK)"
    )]
    QueueConfigLate { queue: u32, status: u32 },
    #[error("queue {queue} configured while it is ready")]
    QueueConfigWhileReady { queue: u32 },
    #[error("queue {queue} does not exist (the device has {queues})")]
    NoSuchQueue { queue: u32, queues: usize },
    #[error("notification of queue {queue} before DRIVER_OK (status {status:#x}); ignored")]
    NotifyBeforeDriverOk { queue: u32, status: u32 },
    #[error("notification of queue {queue}, which is not ready; ignored")]
    NotifyNotReady { queue: u32 },
    #[error("write of {len} bytes to configuration offset {offset:#x} refused (read-only)")]
    ConfigReadOnly { offset: u64, len: usize },
}

/// Why a queue cannot be made ready: its registers describe rings the
/// device cannot use.
#[derive(Debug, thiserror::Error)]
pub enum QueueSetupError {
    #[error("queue size {size} is not a power of two between 1 and {max}")]
    Size { size: u32, max: u16 },
    #[error("descriptor table address {addr:#x} is not 16-byte aligned")]
    DescAlign { addr: u64 },
    #[error("driver (available) ring address {addr:#x} is not 2-byte aligned")]
    AvailAlign { addr: u64 },
    #[error("device (used) ring address {addr:#x} is not 4-byte aligned")]
    UsedAlign { addr: u64 },
    #[error("{ring} at {addr:#x}+{len} is not inside guest memory")]
    Outside {
        ring: &'static str,
        addr: u64,
        len: u64,
    },
}

/// Why a request on a queue failed. [`RequestError::breaks_device`] says
/// whether the device stops (status NEEDS_RESET) or only answers that
/// request with an error status.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(
        "available index {avail_idx} is {ahead} entries ahead of the device's next index {next_avail} (queue size {size})"
    )]
    AvailIndex {
        avail_idx: u16,
        next_avail: u16,
        ahead: u16,
        size: u16,
    },
    #[error("available ring unreadable: {0}")]
    AvailRing(String),
    #[error("chain head {head} is not a descriptor index (queue size {size})")]
    HeadIndex { head: u16, size: u16 },
    #[error(
        "descriptor {desc} (chain head {head}) names next descriptor {next}, outside the table of {size}"
    )]
    NextIndex {
        head: u16,
        desc: u16,
        next: u16,
        size: u16,
    },
    #[error(
        "chain from head {head} is longer than the queue size {size} (descriptor {desc} loops back?)"
    )]
    Loop { head: u16, desc: u16, size: u16 },
    #[error("descriptor {desc} (chain head {head}) is indirect, which was not negotiated")]
    Indirect { head: u16, desc: u16 },
    #[error("descriptor {desc} (chain head {head}) at table address {addr:#x} cannot be read")]
    DescriptorUnreadable { head: u16, desc: u16, addr: u64 },
    #[error(
        "descriptor {desc} (chain head {head}) buffer {addr:#x}+{len} is not inside guest memory"
    )]
    Outside {
        head: u16,
        desc: u16,
        addr: u64,
        len: u32,
    },
    #[error("chain from head {head} holds more than 4 GiB (descriptor {desc})")]
    TooLong { head: u16, desc: u16 },
    #[error("descriptor {desc} (chain head {head}) is device-readable after a device-writable one")]
    ReadableAfterWritable { head: u16, desc: u16 },
    #[error("chain head {head}: the {what} is {len} bytes, at least {need} are needed")]
    TooShort {
        head: u16,
        what: &'static str,
        len: u64,
        need: u64,
    },
    #[error(
        "{request} request (chain head {head}): descriptor {desc} at {addr:#x} is {found}, the device needs it {expected}"
    )]
    Direction {
        request: &'static str,
        head: u16,
        desc: u16,
        addr: u64,
        found: &'static str,
        expected: &'static str,
    },
    #[error("chain head {head}: guest memory at {addr:#x}+{len} could not be accessed")]
    Memory { head: u16, addr: u64, len: u64 },
    #[error("chain head {head} could not be added to the used ring: {reason}")]
    UsedRing { head: u16, reason: String },
    // The variants below answer one request with an error status and keep
    // the device running.
    #[error(
        "chain head {head}: sectors {sector}+{sectors} are beyond the capacity of {capacity} sectors"
    )]
    SectorRange {
        head: u16,
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("chain head {head}: data length {len} is not a multiple of 512")]
    DataLength { head: u16, len: u64 },
    #[error("chain head {head}: write to a read-only disk")]
    ReadOnly { head: u16 },
    #[error("chain head {head}: request type {kind} is not supported")]
    Unsupported { head: u16, kind: u32 },
    #[error("chain head {head}: {op} of the backing failed")]
    Io {
        head: u16,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("chain head {head}: frame of {len} bytes dropped ({why})")]
    Dropped {
        head: u16,
        len: u64,
        why: &'static str,
    },
}

impl RequestError {
    /// True when the device must stop (NEEDS_RESET): the chain or the rings
    /// are malformed. False when only this request fails.
    pub fn breaks_device(&self) -> bool {
        !matches!(
            self,
            RequestError::SectorRange { .. }
                | RequestError::DataLength { .. }
                | RequestError::ReadOnly { .. }
                | RequestError::Unsupported { .. }
                | RequestError::Io { .. }
                | RequestError::Dropped { .. }
        )
    }
}

/// Why a saved transport state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{device}: saved state is for device type {saved}, the device is type {actual}")]
    DeviceType {
        device: String,
        saved: u32,
        actual: u32,
    },
    #[error("{device}: saved state has {saved} queues, the device has {actual}")]
    QueueCount {
        device: String,
        saved: usize,
        actual: usize,
    },
    #[error("{device} queue {queue}: saved queue cannot be used: {error}")]
    Queue {
        device: String,
        queue: u16,
        error: QueueSetupError,
    },
}

/// A refusal or failure the transport recorded, naming the device and,
/// where there is one, the queue.
#[derive(Debug, thiserror::Error)]
pub enum DeviceFault {
    #[error("{device}: {error}")]
    Register {
        device: String,
        error: RegisterError,
    },
    #[error("{device} queue {queue}: {error}")]
    QueueSetup {
        device: String,
        queue: u32,
        error: QueueSetupError,
    },
    #[error("{device} queue {queue}: {error}")]
    Request {
        device: String,
        queue: u16,
        error: RequestError,
    },
}
