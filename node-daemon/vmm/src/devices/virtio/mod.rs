//! Virtio devices on the virtio-mmio transport, built on rust-vmm's
//! `virtio-queue` (rings) and `virtio-bindings` (constants).
//!
//! # What the VM wiring uses
//!
//! * Guest memory: `memory::guest_memory_view(&ram_access)` gives the
//!   `GuestMemoryMmap` every device reads rings and buffers through.
//! * A device: [`VirtioMmio::new`]`(model, mem, interrupt)` with a model
//!   ([`rng::Rng`], `blk::Block`, `net::Net`) and an
//!   `Arc<dyn `[`InterruptLine`]`>`: an [`IrqfdLine`] whose
//!   [`IrqfdLine::eventfd`] the wiring registers with
//!   `VmFd::register_irqfd(fd, gsi)`.
//! * MMIO exits: a device occupies [`MMIO_SIZE`] bytes at its base; a guest
//!   access at `base + offset` goes to [`VirtioMmio::read`]/[`VirtioMmio::write`]
//!   (or the object-safe [`MmioTransport`], for a list of devices behind one
//!   `Mutex` each). The kernel learns of the device from
//!   `virtio_mmio.device=4K@<base>:<gsi>` on its command line.
//! * Notifications: QueueNotify writes arrive as MMIO writes and are served
//!   synchronously. To take them off the vCPU's exit path, register one
//!   eventfd per queue with `VmFd::register_ioevent(fd,
//!   IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), i as u32)` (datamatch
//!   = queue index) and call [`VirtioMmio::queue_notify`]`(i)` when it fires.
//! * Work found by the VMM (a readable tap for `net`): call
//!   [`VirtioMmio::process_queue`]`(queue)`; it does nothing unless the
//!   driver has the device running.
//! * Snapshots: [`VirtioMmio::save`] → [`VirtioMmioState`] (transport plus the
//!   model's state); restore the model with its own `restore`, then
//!   [`VirtioMmio::restore`]. Every request completes before
//!   `process_queue` returns, so nothing is in flight at save time.
//!
//! # What a hostile driver gets
//!
//! Register misuse (status out of order, FEATURES_OK with a feature not
//! offered or without VERSION_1, bad queue size or alignment, rings outside
//! guest memory, notifications before DRIVER_OK) is refused: the register
//! keeps its value and the refusal is kept in [`VirtioMmio::last_fault`]. A
//! malformed descriptor chain (index or address out of range, loop,
//! indirect, wrong direction, header too short, available index racing
//! ahead) breaks only that device: NEEDS_RESET, a configuration interrupt,
//! and later notifications are ignored until the driver resets it. A
//! well-formed request the device cannot serve (sector beyond capacity,
//! unknown type) gets an error status and the device goes on
//! ([`VirtioMmio::last_refused_request`]). Every error names the device, the
//! queue and the descriptor.

pub mod attached;
pub mod blk;
pub mod chain;
pub mod device;
pub mod disk_files;
pub mod errors;
pub mod interrupt;
pub mod mmio;
pub mod net;
pub mod overlay;
pub mod persist;
pub mod queue_config;
pub mod rng;
pub mod saved;
pub mod state;
pub mod status;
pub mod tap;

pub use device::{QueueAccess, VirtioDevice};
pub use errors::{DeviceFault, QueueSetupError, RegisterError, RequestError, RestoreError};
pub use interrupt::{InterruptLine, IrqfdLine, RecordedInterrupts, VirtioInterrupt};
pub use mmio::{MMIO_SIZE, MmioTransport, QUEUE_NOTIFY_OFFSET, VirtioMmio};
pub use saved::{DiskIdentity, SavedDisk, VirtioDeviceState, VirtioModelState};
pub use state::{QueueSnapshot, TransportState, VirtioMmioState};

/// InterruptStatus bit: a used buffer notification.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: a configuration change notification.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
