//! Host mapping of a VM's guest RAM: one contiguous, page-aligned range of
//! host virtual memory whose backing (anonymous, copy-on-write image file, or
//! userfaultfd-streamed) can be chosen after the range is registered with KVM.

use std::io;
use std::ptr::NonNull;

/// Size of a guest page.
pub const PAGE_SIZE: usize = 4096;

/// A reserved, page-aligned host range that holds guest RAM.
///
/// The range is created anonymous and private. Other backings are installed
/// later with `MAP_FIXED` over the same addresses, so a KVM memory slot that
/// points at [`GuestRam::host_addr`] stays valid whatever backs it.
#[derive(Debug)]
pub struct GuestRam {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY (Send/Sync): the mapping is plain memory owned by this value;
// concurrent access is coordinated by the VMM (vCPUs, fault handler).
// SAFETY: see above.
unsafe impl Send for GuestRam {}
// SAFETY: see above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Reserves `len` bytes (a positive multiple of [`PAGE_SIZE`]) of anonymous
    /// private memory with `MAP_NORESERVE`; nothing is populated.
    pub fn reserve(len: usize) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest RAM size {len} is not a positive multiple of {PAGE_SIZE}"),
            ));
        }
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choice;
        // no existing memory is affected. The result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: NonNull::new(addr.cast()).expect("mmap returned null"),
            len,
        })
    }

    /// Host virtual address of guest physical address 0.
    pub fn host_addr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// Length of the range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a reservation is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of guest pages.
    pub fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `reserve` (or replaced in place with
        // MAP_FIXED) and is owned exclusively by this value.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len);
        }
    }
}
