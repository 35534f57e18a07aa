//! A `vm_memory::GuestMemoryMmap` view of a VM's [`GuestRam`], for the
//! rust-vmm crates that take guest memory that way (`linux-loader`, virtio
//! queues): one region per KVM slot (RAM below 3 GiB at guest physical 0,
//! the rest at 4 GiB), pointing into the existing host mapping.

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::GuestRam;
use crate::arch::x86_64::layout::ram_regions;

/// A view of `ram` as `vm-memory` guest memory. The view does not own the
/// mapping (dropping it unmaps nothing); use it only while `ram` lives,
/// like every other view the machine hands its devices.
pub fn guest_memory_view(ram: &GuestRam) -> GuestMemoryMmap {
    let regions = ram_regions(ram.len() as u64)
        .into_iter()
        .map(|region| {
            let host = ram.host_addr().wrapping_add(region.ram_offset as usize);
            // SAFETY: `host..host+len` lies inside the live, page-aligned
            // RAM reservation (regions are 2 MiB multiples that start at
            // offset 0 or 3 GiB); the flags and protection are the ones
            // `GuestRam::reserve` maps with. The region is not owned, so the
            // view never unmaps it.
            let mapping = unsafe {
                MmapRegion::build_raw(
                    host,
                    region.len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
            .expect("guest RAM regions are page-aligned");
            GuestRegionMmap::new(mapping, GuestAddress(region.gpa))
                .expect("guest RAM regions end below 2^64")
        })
        .collect();
    GuestMemoryMmap::from_regions(regions).expect("guest RAM regions are sorted and disjoint")
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn view_writes_land_in_guest_ram() {
        let ram = GuestRam::reserve(16 << 20).unwrap();
        let view = guest_memory_view(&ram);
        assert_eq!(view.num_regions(), 1);
        view.write_obj(0xdead_beef_u32, GuestAddress(0x2000))
            .unwrap();
        // SAFETY: offset 0x2000 lies inside the 16 MiB reservation.
        let value = unsafe { ram.host_addr().add(0x2000).cast::<u32>().read_unaligned() };
        assert_eq!(value, 0xdead_beef);
        assert!(view.write_obj(1u8, GuestAddress(16 << 20)).is_err());
    }

    #[test]
    fn ram_beyond_3_gib_appears_at_4_gib() {
        // Reserved with MAP_NORESERVE and never touched but for two bytes.
        let ram = GuestRam::reserve((3 << 30) + (2 << 20)).unwrap();
        let view = guest_memory_view(&ram);
        assert_eq!(view.num_regions(), 2);
        view.write_obj(7u8, GuestAddress(4 << 30)).unwrap();
        // SAFETY: RAM offset 3 GiB is inside the reservation.
        assert_eq!(unsafe { ram.host_addr().add(3 << 30).read() }, 7);
        assert!(view.write_obj(7u8, GuestAddress(3 << 30)).is_err());
    }
}
