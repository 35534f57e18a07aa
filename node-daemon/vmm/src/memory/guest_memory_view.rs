//! A `vm_memory::GuestMemoryMmap` over the VM's existing guest RAM mapping,
//! for code built on rust-vmm crates (`virtio-queue`): RAM below 3 GiB at
//! guest physical 0, the rest at 4 GiB, exactly the KVM slots
//! (`arch::x86_64::layout::ram_regions`). The view maps nothing itself and
//! never unmaps: the `GuestRam` stays the owner.

use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::arch::x86_64::layout::ram_regions;
use crate::vstate::ram_access::RamAccess;

/// Why a view could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuestMemoryViewError {
    #[error("guest RAM region at guest physical {gpa:#x} ({len} bytes) cannot be described")]
    Region {
        gpa: u64,
        len: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM region at guest physical {gpa:#x} overflows the address space")]
    Overflow { gpa: u64 },
    #[error("guest RAM regions overlap or are empty")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// A `GuestMemoryMmap` for the RAM that `ram` views.
///
/// The view has the lifetime contract of `RamAccess` (made with
/// `RamAccess::new`): the mapping must stay mapped for as long as the view
/// or any clone of it is used. The VMM's `Machine` keeps its `GuestRam` for
/// the life of the VM and its devices, which is what makes that hold.
pub fn guest_memory_view(ram: &RamAccess) -> Result<GuestMemoryMmap, GuestMemoryViewError> {
    let mut regions = Vec::new();
    for region in ram_regions(ram.len()) {
        // SAFETY: `ram_offset + len <= ram.len()` (ram_regions splits exactly
        // `ram.len()` bytes), so the pointer stays inside the mapping.
        let host = unsafe { ram.base().add(region.ram_offset as usize) };
        // SAFETY: `host..host+len` lies inside the live read/write guest RAM
        // mapping that `RamAccess::new`'s caller promised stays mapped for as
        // long as any copy of the view is used; `build_raw` records the
        // pointer without taking ownership (it never unmaps it). The
        // prot/flags are those of `GuestRam::reserve` (informational only).
        let mapping = unsafe {
            MmapRegion::build_raw(
                host,
                region.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
        }
        .map_err(|source| GuestMemoryViewError::Region {
            gpa: region.gpa,
            len: region.len,
            source,
        })?;
        let region = GuestRegionMmap::with_arc(Arc::new(mapping), GuestAddress(region.gpa))
            .ok_or(GuestMemoryViewError::Overflow { gpa: region.gpa })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(GuestMemoryViewError::Collection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn view_reads_what_the_ram_mapping_holds() {
        let ram = GuestRam::reserve(1 << 20).unwrap();
        // SAFETY: `ram` outlives the access and the view within this test.
        let access = unsafe { RamAccess::new(ram.host_addr(), ram.len()) };
        access.write_u64(0x1234, 0xfeed_f00d).unwrap();
        let mem = guest_memory_view(&access).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x1234)).unwrap(),
            0xfeed_f00d
        );
        mem.write_obj(7u32, GuestAddress(0x2000)).unwrap();
        assert_eq!(access.read_u64(0x2000).unwrap(), 7);
        assert!(mem.read_obj::<u64>(GuestAddress(1 << 20)).is_err());
    }

    #[test]
    fn ram_beyond_3_gib_appears_at_4_gib() {
        let len = (3usize << 30) + (2 << 20);
        let ram = GuestRam::reserve(len).unwrap();
        // SAFETY: `ram` outlives the access and the view within this test.
        let access = unsafe { RamAccess::new(ram.host_addr(), ram.len()) };
        let mem = guest_memory_view(&access).unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xabu8, GuestAddress((4 << 30) + 5)).unwrap();
        assert_eq!(access.read_u64((4 << 30) + 5).unwrap() & 0xff, 0xab);
        assert!(mem.read_obj::<u8>(GuestAddress(3 << 30)).is_err());
    }
}
