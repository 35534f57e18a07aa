//! Copy-on-write backing: map a complete local page store `MAP_PRIVATE` over
//! a reserved [`GuestRam`]. No copy is made; clones on one node share the
//! image's pages through the page cache until they write them.

use std::os::fd::AsRawFd;

use crate::image::PageStore;
use crate::memory::GuestRam;

/// Why the copy-on-write mapping could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CowMapError {
    #[error(
        "page store {dir} holds {store} bytes of memory, the guest RAM to map it over is {ram} bytes"
    )]
    MemorySizeMismatch {
        dir: std::path::PathBuf,
        store: u64,
        ram: u64,
    },
    #[error("mmap MAP_PRIVATE|MAP_FIXED of page store {dir} over guest RAM failed")]
    Map {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Replaces the backing of `ram` with a private (copy-on-write) mapping of
/// `store`'s data file, over exactly the same addresses, so a KVM memory slot
/// registered at [`GuestRam::host_addr`] stays valid. Guest writes go to
/// private anonymous pages; the file never changes. Any userfaultfd
/// registration of the range is dropped with the old mapping.
///
/// The previous contents of `ram` are discarded: nothing may hold references
/// into guest memory across this call (vCPUs not running).
pub fn map_copy_on_write(ram: &GuestRam, store: &PageStore) -> Result<(), CowMapError> {
    if ram.len() as u64 != store.memory_size() {
        return Err(CowMapError::MemorySizeMismatch {
            dir: store.dir().to_path_buf(),
            store: store.memory_size(),
            ram: ram.len() as u64,
        });
    }
    // SAFETY: MAP_FIXED replaces exactly the range owned by `ram` (same start
    // and length), which stays mapped for the lifetime of `ram`; no Rust
    // reference into it exists (GuestRam hands out raw pointers only, and
    // the caller guarantees no vCPU is running).
    let addr = unsafe {
        libc::mmap(
            ram.host_addr().cast(),
            ram.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            store.file().as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(CowMapError::Map {
            dir: store.dir().to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    debug_assert_eq!(addr.cast::<u8>(), ram.host_addr());
    Ok(())
}
