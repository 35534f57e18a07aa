//! What a virtio device model provides to the MMIO transport: its identity,
//! features, queue sizes, configuration space, the processing of one queue
//! and its saved state. The transport owns the status machine, feature
//! negotiation, the queues and the interrupt; a device only sees a queue
//! through [`QueueAccess`] when the driver (or the VMM) says it has work.

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::chain::{self, Chain};
use super::errors::RequestError;

/// A virtio device model behind a [`super::VirtioMmio`] transport.
pub trait VirtioDevice: Send {
    /// The device's own saved state (see the device's `restore`).
    type State: Debug + Clone + Serialize + DeserializeOwned;

    /// Virtio device ID (1 net, 2 block, 4 entropy).
    fn device_type(&self) -> u32;

    /// A name for logs and errors, e.g. "virtio-blk rootfs".
    fn name(&self) -> &str;

    /// Device-specific feature bits offered (the transport adds
    /// VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;

    /// The largest size of each queue (powers of two); their number is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Reads device configuration space at `offset` (bytes past the end
    /// read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, _acked_features: u64) {}

    /// The driver reset the device (status 0).
    fn reset(&mut self) {}

    /// Serves what the driver made available on one queue. An `Err` breaks
    /// the device (NEEDS_RESET); a request answered with an error status is
    /// reported through [`QueueAccess::refuse`] instead.
    fn process_queue(&mut self, queue: &mut QueueAccess<'_>) -> Result<(), RequestError>;

    /// The device's state to save (with the vCPUs paused).
    fn save(&self) -> Self::State;
}

/// One queue, lent to a device for the time of one `process_queue`.
#[derive(Debug)]
pub struct QueueAccess<'a> {
    index: u16,
    queue: &'a mut Queue,
    mem: &'a GuestMemoryMmap,
    refused: Vec<RequestError>,
    completed: u32,
}

impl<'a> QueueAccess<'a> {
    pub(super) fn new(index: u16, queue: &'a mut Queue, mem: &'a GuestMemoryMmap) -> Self {
        Self {
            index,
            queue,
            mem,
            refused: Vec::new(),
            completed: 0,
        }
    }

    /// Index of the queue.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Guest memory.
    pub fn mem(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// The next available chain, checked (see `chain.rs`), or `None`.
    pub fn next_chain(&mut self) -> Result<Option<Chain>, RequestError> {
        chain::next_chain(self.queue, self.mem)
    }

    /// Returns the chain at `head` to the driver with `len` bytes written.
    pub fn complete(&mut self, head: u16, len: u32) -> Result<(), RequestError> {
        chain::complete(self.queue, self.mem, head, len)?;
        self.completed += 1;
        Ok(())
    }

    /// Records a request answered with an error status (the device keeps
    /// working).
    pub fn refuse(&mut self, error: RequestError) {
        self.refused.push(error);
    }

    pub(super) fn finish(self) -> (u32, Vec<RequestError>) {
        (self.completed, self.refused)
    }
}
