//! Descriptor chains taken from a `virtio_queue::Queue`, checked before any
//! byte moves: every descriptor index, buffer address and length is checked
//! against the table size and guest memory, chains longer than the queue
//! (loops) and indirect descriptors (not negotiated) are refused, and
//! device-readable buffers must come before device-writable ones. The
//! rings themselves (available index, used ring, wrap-around) are
//! `virtio-queue`'s; this file walks the descriptor table itself so that an
//! error can name the descriptor instead of ending the chain silently.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as RawDescriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::errors::RequestError;

/// Size of one descriptor table entry.
const DESC_SIZE: u64 = 16;

/// One checked buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Index of the descriptor in the table.
    pub desc: u16,
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A checked descriptor chain: device-readable buffers, then device-writable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor (what goes into the used ring).
    pub head: u16,
    /// Buffers the device reads (driver → device).
    pub readable: Vec<Buffer>,
    /// Buffers the device writes (device → driver).
    pub writable: Vec<Buffer>,
}

impl Chain {
    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        total(&self.readable)
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        total(&self.writable)
    }

    /// Copies `buf.len()` bytes from the readable buffers, starting `offset`
    /// bytes in.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), RequestError> {
        let mut done = 0usize;
        for (addr, len) in segments(&self.readable, offset, buf.len() as u64) {
            mem.read_slice(&mut buf[done..done + len], GuestAddress(addr))
                .map_err(|_| self.memory_error(addr, len))?;
            done += len;
        }
        if done < buf.len() {
            return Err(self.memory_error(offset, buf.len()));
        }
        Ok(())
    }

    /// Copies `buf` into the writable buffers, starting `offset` bytes in.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), RequestError> {
        let mut done = 0usize;
        for (addr, len) in segments(&self.writable, offset, buf.len() as u64) {
            mem.write_slice(&buf[done..done + len], GuestAddress(addr))
                .map_err(|_| self.memory_error(addr, len))?;
            done += len;
        }
        if done < buf.len() {
            return Err(self.memory_error(offset, buf.len()));
        }
        Ok(())
    }

    /// The readable buffer holding byte `offset` of the readable part.
    pub fn readable_at(&self, offset: u64) -> Option<Buffer> {
        buffer_at(&self.readable, offset)
    }

    /// The writable buffer holding byte `offset` of the writable part.
    pub fn writable_at(&self, offset: u64) -> Option<Buffer> {
        buffer_at(&self.writable, offset)
    }

    fn memory_error(&self, addr: u64, len: usize) -> RequestError {
        RequestError::Memory {
            head: self.head,
            addr,
            len: len as u64,
        }
    }
}

fn total(buffers: &[Buffer]) -> u64 {
    buffers.iter().map(|b| u64::from(b.len)).sum()
}

fn buffer_at(buffers: &[Buffer], mut offset: u64) -> Option<Buffer> {
    for b in buffers {
        if offset < u64::from(b.len) {
            return Some(*b);
        }
        offset -= u64::from(b.len);
    }
    None
}

/// The (address, length) pieces of `len` bytes starting `offset` bytes into
/// `buffers` (fewer bytes if the buffers end first).
fn segments(buffers: &[Buffer], mut offset: u64, mut len: u64) -> Vec<(u64, usize)> {
    let mut out = Vec::new();
    for b in buffers {
        if len == 0 {
            break;
        }
        let blen = u64::from(b.len);
        if offset >= blen {
            offset -= blen;
            continue;
        }
        let n = (blen - offset).min(len);
        out.push((b.addr + offset, n as usize));
        len -= n;
        offset = 0;
    }
    out
}

/// Takes the next available chain of `queue` and checks it; `None` when the
/// driver has made nothing more available.
pub fn next_chain(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<Chain>, RequestError> {
    let size = queue.size();
    let next_avail = queue.next_avail();
    let avail_idx = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| RequestError::AvailRing(e.to_string()))?;
    let ahead = (avail_idx - Wrapping(next_avail)).0;
    if ahead > size {
        return Err(RequestError::AvailIndex {
            avail_idx: avail_idx.0,
            next_avail,
            ahead,
            size,
        });
    }
    if ahead == 0 {
        return Ok(None);
    }
    let head = match queue
        .iter(mem)
        .map_err(|e| RequestError::AvailRing(e.to_string()))?
        .next()
    {
        Some(chain) => chain.head_index(),
        None => {
            return Err(RequestError::AvailRing(format!(
                "entry {} of the available ring",
                next_avail % size
            )));
        }
    };
    walk(mem, queue.desc_table(), size, head).map(Some)
}

/// Walks and checks the chain starting at `head` in the table at
/// `desc_table` with `size` entries.
pub fn walk(
    mem: &GuestMemoryMmap,
    desc_table: u64,
    size: u16,
    head: u16,
) -> Result<Chain, RequestError> {
    if head >= size {
        return Err(RequestError::HeadIndex { head, size });
    }
    let mut chain = Chain {
        head,
        readable: Vec::new(),
        writable: Vec::new(),
    };
    let mut desc = head;
    let mut total = 0u64;
    for _ in 0..size {
        let table_addr = desc_table + u64::from(desc) * DESC_SIZE;
        let raw: RawDescriptor = mem.read_obj(GuestAddress(table_addr)).map_err(|_| {
            RequestError::DescriptorUnreadable {
                head,
                desc,
                addr: table_addr,
            }
        })?;
        let flags = u32::from(raw.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            return Err(RequestError::Indirect { head, desc });
        }
        let buffer = Buffer {
            desc,
            addr: raw.addr().0,
            len: raw.len(),
        };
        check_buffer(mem, head, &buffer)?;
        total += u64::from(buffer.len);
        if total > u64::from(u32::MAX) {
            return Err(RequestError::TooLong { head, desc });
        }
        if flags & VRING_DESC_F_WRITE != 0 {
            chain.writable.push(buffer);
        } else if chain.writable.is_empty() {
            chain.readable.push(buffer);
        } else {
            return Err(RequestError::ReadableAfterWritable { head, desc });
        }
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        let next = raw.next();
        if next >= size {
            return Err(RequestError::NextIndex {
                head,
                desc,
                next,
                size,
            });
        }
        desc = next;
    }
    Err(RequestError::Loop { head, desc, size })
}

fn check_buffer(mem: &GuestMemoryMmap, head: u16, b: &Buffer) -> Result<(), RequestError> {
    let inside = b.addr.checked_add(u64::from(b.len)).is_some()
        && (b.len == 0
            || GuestMemoryBackend::check_range(mem, GuestAddress(b.addr), b.len as usize));
    if inside {
        Ok(())
    } else {
        Err(RequestError::Outside {
            head,
            desc: b.desc,
            addr: b.addr,
            len: b.len,
        })
    }
}

/// Puts `head` with `len` written bytes into the used ring.
pub fn complete(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), RequestError> {
    queue
        .add_used(mem, head, len)
        .map_err(|e| RequestError::UsedRing {
            head,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(desc: u16, addr: u64, len: u32) -> Buffer {
        Buffer { desc, addr, len }
    }

    #[test]
    fn segments_skip_and_split_across_buffers() {
        let bufs = [buf(0, 0x1000, 16), buf(1, 0x2000, 100), buf(2, 0x3000, 10)];
        assert_eq!(segments(&bufs, 10, 20), vec![(0x100a, 6), (0x2000, 14)]);
        assert_eq!(segments(&bufs, 120, 100), vec![(0x3004, 6)]);
        assert_eq!(segments(&bufs, 200, 1), vec![]);
        assert_eq!(buffer_at(&bufs, 16), Some(bufs[1]));
        assert_eq!(buffer_at(&bufs, 126), None);
    }
}
