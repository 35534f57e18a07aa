//! Turning the queue registers the driver wrote (or a saved snapshot) into
//! a ready `virtio_queue::Queue`: size and alignment through the queue's
//! own checked setters, and every ring inside guest memory.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::errors::QueueSetupError;
use super::state::QueueSnapshot;

/// A queue and the registers the driver wrote for it.
#[derive(Debug)]
pub(super) struct QueueSlot {
    pub(super) regs: QueueSnapshot,
    pub(super) queue: Queue,
}

/// Bytes of the descriptor table, available ring and used ring of a queue of
/// `size` entries (without the event-index fields: EVENT_IDX is not offered).
pub fn ring_sizes(size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    (16 * n, 4 + 2 * n + 2, 4 + 8 * n + 2)
}

/// Configures `queue` from `regs` and makes it ready, or says why not.
/// The queue is left unready on error.
pub fn apply_snapshot(
    queue: &mut Queue,
    regs: &QueueSnapshot,
    mem: &GuestMemoryMmap,
) -> Result<(), QueueSetupError> {
    queue.set_ready(false);
    let max = queue.max_size();
    let size = u16::try_from(regs.size)
        .ok()
        .filter(|&s| s != 0 && s <= max && s.is_power_of_two())
        .ok_or(QueueSetupError::Size {
            size: regs.size,
            max,
        })?;
    queue
        .try_set_size(size)
        .map_err(|_| QueueSetupError::Size {
            size: regs.size,
            max,
        })?;
    queue
        .try_set_desc_table_address(GuestAddress(regs.desc_table))
        .map_err(|_| QueueSetupError::DescAlign {
            addr: regs.desc_table,
        })?;
    queue
        .try_set_avail_ring_address(GuestAddress(regs.avail_ring))
        .map_err(|_| QueueSetupError::AvailAlign {
            addr: regs.avail_ring,
        })?;
    queue
        .try_set_used_ring_address(GuestAddress(regs.used_ring))
        .map_err(|_| QueueSetupError::UsedAlign {
            addr: regs.used_ring,
        })?;
    let (desc_len, avail_len, used_len) = ring_sizes(size);
    for (ring, addr, len) in [
        ("descriptor table", regs.desc_table, desc_len),
        ("driver (available) ring", regs.avail_ring, avail_len),
        ("device (used) ring", regs.used_ring, used_len),
    ] {
        let inside = addr.checked_add(len).is_some()
            && GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize);
        if !inside {
            return Err(QueueSetupError::Outside { ring, addr, len });
        }
    }
    queue.set_next_avail(regs.next_avail);
    queue.set_next_used(regs.next_used);
    queue.set_event_idx(false);
    queue.set_ready(true);
    // virtio-queue's own check, for what it adds beyond the above.
    if !queue.is_valid(mem) {
        queue.set_ready(false);
        return Err(QueueSetupError::Outside {
            ring: "queue",
            addr: regs.desc_table,
            len: desc_len,
        });
    }
    Ok(())
}

/// The saved form of a queue slot.
pub(super) fn snapshot(slot: &QueueSlot) -> QueueSnapshot {
    QueueSnapshot {
        ready: slot.queue.ready(),
        next_avail: slot.queue.next_avail(),
        next_used: slot.queue.next_used(),
        ..slot.regs
    }
}

/// Sets the low 32 bits of a 64-bit queue address register pair.
pub(super) fn set_low(field: &mut u64, value: u32) {
    *field = (*field & !0xffff_ffff) | u64::from(value);
}

/// Sets the high 32 bits of a 64-bit queue address register pair.
pub(super) fn set_high(field: &mut u64, value: u32) {
    *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
}
