//! The zero page of the Linux x86 boot protocol (`boot_params`, found by
//! the kernel through RSI at its 64-bit entry point): the e820 memory map
//! built from the VM's RAM layout, the command line and initrd, and the
//! header fields a boot loader fills in. Pure: the loader writes the result.

use linux_loader::loader::bootparam::{E820_MAX_ENTRIES_ZEROPAGE, boot_e820_entry, boot_params};

use crate::arch::x86_64::layout::{
    EBDA_START, HIGH_MEMORY_START, MMIO_HOLE_END, MMIO_HOLE_START, ram_regions,
};
use crate::memory::PAGE_SIZE;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved ranges (legacy areas, the MMIO hole).
pub const E820_RESERVED: u32 = 2;

/// `boot_flag`: the boot sector signature.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header`: "HdrS".
const HEADER_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: a loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xff;
/// `kernel_alignment`: the physical alignment x86-64 kernels are built for.
const KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// One range of the e820 memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

const fn e820(addr: u64, end: u64, kind: u32) -> E820Entry {
    E820Entry {
        addr,
        size: end - addr,
        kind,
    }
}

/// The e820 map of a VM with `ram_len` bytes of RAM: RAM up to the EBDA,
/// the rest of the first MiB reserved (EBDA, VGA, BIOS areas), RAM from
/// 1 MiB to the MMIO hole, the hole reserved (LAPIC, IOAPIC, device
/// windows), and RAM from 4 GiB for RAM beyond 3 GiB.
pub fn e820_map(ram_len: u64) -> Vec<E820Entry> {
    let mut map = vec![
        e820(0, EBDA_START, E820_RAM),
        e820(EBDA_START, HIGH_MEMORY_START, E820_RESERVED),
    ];
    for region in ram_regions(ram_len) {
        let start = region.gpa.max(HIGH_MEMORY_START);
        let end = region.gpa + region.len;
        if region.gpa == MMIO_HOLE_END {
            map.push(e820(MMIO_HOLE_START, MMIO_HOLE_END, E820_RESERVED));
        }
        if start < end {
            map.push(e820(start, end, E820_RAM));
        }
    }
    if ram_len <= MMIO_HOLE_START {
        map.push(e820(MMIO_HOLE_START, MMIO_HOLE_END, E820_RESERVED));
    }
    map
}

/// Where an initrd of `size` bytes goes: page-aligned at the top of RAM
/// below the MMIO hole, or `None` when it would overlap the kernel (which
/// ends at `kernel_end`).
pub fn initrd_address(ram_len: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let low_end = ram_len.min(MMIO_HOLE_START);
    let addr = low_end.checked_sub(size)? & !(PAGE_SIZE as u64 - 1);
    (addr >= kernel_end).then_some(addr)
}

/// What the zero page describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroPageSpec {
    /// Guest RAM size.
    pub ram_len: u64,
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Its length without the NUL.
    pub cmdline_len: usize,
    /// Guest address and size of the initrd, if any.
    pub initrd: Option<(u64, u64)>,
}

/// The zero page for `spec`.
pub fn zero_page(spec: &ZeroPageSpec) -> boot_params {
    let mut params = boot_params::default();
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HEADER_MAGIC;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    params.hdr.cmd_line_ptr = spec.cmdline_addr as u32;
    params.ext_cmd_line_ptr = (spec.cmdline_addr >> 32) as u32;
    params.hdr.cmdline_size = spec.cmdline_len as u32;
    if let Some((addr, size)) = spec.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = e820_map(spec.ram_len);
    assert!(
        map.len() <= E820_MAX_ENTRIES_ZEROPAGE,
        "the e820 map has a handful of entries"
    );
    params.e820_entries = map.len() as u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// An expected e820 map as (start, end, type).
    type Map = &'static [(u64, u64, u32)];

    #[test]
    fn e820_maps_follow_the_ram_layout() {
        // (RAM size, expected map)
        let table: [(u64, Map); 3] = [
            (
                128 * MIB,
                &[
                    (0, 0x9_fc00, E820_RAM),
                    (0x9_fc00, MIB, E820_RESERVED),
                    (MIB, 128 * MIB, E820_RAM),
                    (3 * GIB, 4 * GIB, E820_RESERVED),
                ],
            ),
            (
                3 * GIB,
                &[
                    (0, 0x9_fc00, E820_RAM),
                    (0x9_fc00, MIB, E820_RESERVED),
                    (MIB, 3 * GIB, E820_RAM),
                    (3 * GIB, 4 * GIB, E820_RESERVED),
                ],
            ),
            (
                5 * GIB,
                &[
                    (0, 0x9_fc00, E820_RAM),
                    (0x9_fc00, MIB, E820_RESERVED),
                    (MIB, 3 * GIB, E820_RAM),
                    (3 * GIB, 4 * GIB, E820_RESERVED),
                    (4 * GIB, 6 * GIB, E820_RAM),
                ],
            ),
        ];
        for (ram, expected) in table {
            let map: Vec<(u64, u64, u32)> = e820_map(ram)
                .iter()
                .map(|e| (e.addr, e.addr + e.size, e.kind))
                .collect();
            assert_eq!(map, expected, "RAM {ram:#x}");
            let usable: u64 = e820_map(ram)
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum();
            assert_eq!(usable, ram - (MIB - 0x9_fc00), "RAM {ram:#x}");
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        // (RAM, kernel end, initrd size) -> address
        let table = [
            (128 * MIB, 20 * MIB, 4096, Some(128 * MIB - 4096)),
            (128 * MIB, 20 * MIB, 5000, Some(128 * MIB - 8192)),
            (5 * GIB, 20 * MIB, MIB, Some(3 * GIB - MIB)),
            (32 * MIB, 20 * MIB, 12 * MIB, Some(20 * MIB)),
            (32 * MIB, 20 * MIB, 13 * MIB, None),
            (32 * MIB, 20 * MIB, 64 * MIB, None),
        ];
        for (ram, kernel_end, size, expected) in table {
            assert_eq!(
                initrd_address(ram, kernel_end, size),
                expected,
                "RAM {ram:#x}, kernel end {kernel_end:#x}, initrd {size}"
            );
        }
    }

    #[test]
    fn zero_page_carries_header_cmdline_initrd_and_map() {
        let params = zero_page(&ZeroPageSpec {
            ram_len: 128 * MIB,
            cmdline_addr: 0x6000,
            cmdline_len: 42,
            initrd: Some((0x7f0_0000, 0x1_2345)),
        });
        // Packed fields are copied out before comparing.
        assert_eq!({ params.hdr.boot_flag }, 0xaa55);
        assert_eq!({ params.hdr.header }, 0x5372_6448);
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.cmd_line_ptr }, 0x6000);
        assert_eq!({ params.ext_cmd_line_ptr }, 0);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!({ params.hdr.ramdisk_image }, 0x7f0_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x1_2345);
        assert_eq!(
            { params.sentinel },
            0,
            "a non-zero sentinel makes Linux wipe fields"
        );
        assert_eq!(params.e820_entries, 4);
        let third = params.e820_table[2];
        assert_eq!(
            ({ third.addr }, { third.size }, { third.r#type }),
            (MIB, 127 * MIB, E820_RAM)
        );
        let none = zero_page(&ZeroPageSpec {
            ram_len: 128 * MIB,
            cmdline_addr: 0x6000,
            cmdline_len: 0,
            initrd: None,
        });
        assert_eq!(
            ({ none.hdr.ramdisk_image }, { none.hdr.ramdisk_size }),
            (0, 0)
        );
    }

    #[test]
    fn zero_page_is_one_page() {
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
    }
}
