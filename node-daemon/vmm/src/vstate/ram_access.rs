//! Host access to guest RAM by guest physical address, for devices (mailbox
//! slots), the loader and tests. It is a raw view of the `GuestRam` mapping:
//! the owner of the mapping (the `Machine`) outlives every view it hands out.

use crate::arch::x86_64::layout::gpa_to_ram_offset;

/// A raw, copyable view of guest RAM.
#[derive(Debug, Clone, Copy)]
pub struct RamAccess {
    base: *mut u8,
    len: u64,
}

// SAFETY: the view is plain addresses into a mapping that the machine keeps
// alive for as long as any vCPU thread or device holds a view; guest memory is
// shared with the guest anyway, so accesses are volatile and unsynchronised.
unsafe impl Send for RamAccess {}
// SAFETY: see above.
unsafe impl Sync for RamAccess {}

/// Error for a host access outside guest RAM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("guest physical range {gpa:#x}+{len} is not inside guest RAM")]
pub struct OutsideRam {
    pub gpa: u64,
    pub len: u64,
}

impl RamAccess {
    /// A view of `len` bytes at `base`.
    ///
    /// # Safety
    /// `base..base+len` must stay mapped read/write for the life of every copy.
    pub unsafe fn new(base: *mut u8, len: usize) -> Self {
        Self {
            base,
            len: len as u64,
        }
    }

    /// Length of guest RAM.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host pointer of RAM offset 0.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    fn host_ptr(&self, gpa: u64, len: u64) -> Result<*mut u8, OutsideRam> {
        let offset = gpa_to_ram_offset(gpa, self.len).ok_or(OutsideRam { gpa, len })?;
        let last =
            gpa_to_ram_offset(gpa + len.max(1) - 1, self.len).ok_or(OutsideRam { gpa, len })?;
        if last != offset + len.max(1) - 1 {
            return Err(OutsideRam { gpa, len });
        }
        // SAFETY: offset < len of the mapping (checked above).
        Ok(unsafe { self.base.add(offset as usize) })
    }

    /// Reads the u64 at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, OutsideRam> {
        let ptr = self.host_ptr(gpa, 8)?;
        // SAFETY: the 8 bytes are inside the live mapping; unaligned volatile
        // read of plain memory the guest may be writing concurrently.
        Ok(u64::from_le_bytes(unsafe {
            std::ptr::read_volatile(ptr.cast::<[u8; 8]>())
        }))
    }

    /// Writes the u64 at `gpa`.
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), OutsideRam> {
        let ptr = self.host_ptr(gpa, 8)?;
        // SAFETY: the 8 bytes are inside the live mapping.
        unsafe { std::ptr::write_volatile(ptr.cast::<[u8; 8]>(), value.to_le_bytes()) };
        Ok(())
    }

    /// Copies `bytes` into guest memory at `gpa` (must not cross the hole).
    pub fn write_bytes(&self, gpa: u64, bytes: &[u8]) -> Result<(), OutsideRam> {
        let ptr = self.host_ptr(gpa, bytes.len() as u64)?;
        // SAFETY: the range is inside the live mapping and does not overlap
        // `bytes` (a host buffer).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len()) };
        Ok(())
    }

    /// Reads the u64 at RAM offset `offset` (not a guest physical address).
    pub fn read_u64_at_offset(&self, offset: u64) -> Result<u64, OutsideRam> {
        if offset + 8 > self.len {
            return Err(OutsideRam {
                gpa: offset,
                len: 8,
            });
        }
        // SAFETY: offset+8 <= len, inside the live mapping.
        let bytes =
            unsafe { std::ptr::read_volatile(self.base.add(offset as usize).cast::<[u8; 8]>()) };
        Ok(u64::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_inside_ram_only() {
        let mut backing = vec![0u8; 8192];
        // SAFETY: `backing` outlives the view within this test.
        let ram = unsafe { RamAccess::new(backing.as_mut_ptr(), backing.len()) };
        ram.write_u64(16, 0xdead_beef).unwrap();
        assert_eq!(ram.read_u64(16).unwrap(), 0xdead_beef);
        assert_eq!(ram.read_u64_at_offset(16).unwrap(), 0xdead_beef);
        assert!(ram.read_u64(8190).is_err());
        assert!(ram.write_bytes(8000, &[0; 200]).is_err());
        ram.write_bytes(8000, &[1; 192]).unwrap();
    }
}
