//! The guest physical memory map of a vmstream micro-VM and the translation
//! between offsets in guest RAM (the host mapping) and guest physical
//! addresses. RAM from 3 GiB on is placed above 4 GiB so the LAPIC/IOAPIC
//! MMIO windows stay free.

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x1000;
/// Interrupt descriptor table (empty: micro guests run with interrupts off).
pub const IDT_ADDR: u64 = 0x2000;
/// Host-to-guest parameter block (u64 array, guest-specific meaning).
pub const PARAMS_ADDR: u64 = 0x3000;
/// Mailbox page: one [`MAILBOX_SLOT_SIZE`] slot per vCPU.
pub const MAILBOX_ADDR: u64 = 0x4000;
/// Size of one vCPU's mailbox slot: 8 report args then 8 request args.
pub const MAILBOX_SLOT_SIZE: u64 = 0x100;
/// Guest counters the host can inspect (u64 array).
pub const STATE_ADDR: u64 = 0x5000;
/// Linux boot: the kernel command line, NUL-terminated.
pub const CMDLINE_ADDR: u64 = 0x6000;
/// Linux boot: longest command line with its NUL (Linux's x86
/// `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;
/// Linux boot: the zero page (`boot_params`) the kernel finds through RSI.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table (one entry per GiB).
pub const PDPT_ADDR: u64 = 0xa000;
/// First page directory; one 4 KiB directory per GiB of address space follows.
pub const PD_ADDR: u64 = 0x1_0000;
/// End of the page-directory area.
pub const PD_END: u64 = 0x8_0000;
/// Highest guest physical address the identity map can cover.
pub const MAX_MAPPED_GPA: u64 = ((PD_END - PD_ADDR) / 4096) << 30;
/// Top of vCPU 0's stack; vCPU i's stack top is `STACKS_TOP - i * STACK_SIZE`.
pub const STACKS_TOP: u64 = 0x9_0000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 0x2000;
/// Most vCPUs a micro-VM may have (stacks and mailbox slots).
pub const MAX_VCPUS: usize = 8;
/// Guest program load address and entry point.
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;
/// Largest guest program.
pub const GUEST_MAX_SIZE: u64 = 0x10_0000;
/// First byte of RAM free for data (host fill, memory guest touches).
pub const DATA_START: u64 = 0x20_0000;
/// Smallest guest RAM.
pub const MIN_RAM: u64 = 4 << 20;
/// Start of the Extended BIOS Data Area: usable RAM in the first MiB ends
/// here in a Linux guest's e820 map (the rest of it is the legacy VGA and
/// BIOS areas).
pub const EBDA_START: u64 = 0x9_fc00;
/// First byte above the legacy first MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the MMIO hole (LAPIC, IOAPIC, ...).
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the MMIO hole; RAM continues here.
pub const MMIO_HOLE_END: u64 = 4 << 30;

/// One KVM memory slot's worth of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Offset of the first byte in the host RAM mapping.
    pub ram_offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The RAM regions (KVM slots) of a guest with `ram_len` bytes of RAM:
/// one below the MMIO hole and, for more than 3 GiB, one above 4 GiB.
pub fn ram_regions(ram_len: u64) -> Vec<RamRegion> {
    let low = ram_len.min(MMIO_HOLE_START);
    let mut regions = vec![RamRegion {
        gpa: 0,
        ram_offset: 0,
        len: low,
    }];
    if ram_len > MMIO_HOLE_START {
        regions.push(RamRegion {
            gpa: MMIO_HOLE_END,
            ram_offset: MMIO_HOLE_START,
            len: ram_len - MMIO_HOLE_START,
        });
    }
    regions
}

/// Guest physical address of the RAM byte at `ram_offset`.
pub fn ram_offset_to_gpa(ram_offset: u64) -> u64 {
    if ram_offset >= MMIO_HOLE_START {
        ram_offset + (MMIO_HOLE_END - MMIO_HOLE_START)
    } else {
        ram_offset
    }
}

/// RAM offset of guest physical address `gpa`, or `None` if it is not RAM.
pub fn gpa_to_ram_offset(gpa: u64, ram_len: u64) -> Option<u64> {
    let offset = if gpa >= MMIO_HOLE_END {
        gpa - (MMIO_HOLE_END - MMIO_HOLE_START)
    } else if gpa >= MMIO_HOLE_START {
        return None;
    } else {
        gpa
    };
    (offset < ram_len).then_some(offset)
}

/// End of the guest physical address space that holds RAM (exclusive).
pub fn gpa_end(ram_len: u64) -> u64 {
    ram_offset_to_gpa(ram_len - 1) + 1
}

/// Address of vCPU `index`'s mailbox slot.
pub fn mailbox_slot(index: usize) -> u64 {
    MAILBOX_ADDR + index as u64 * MAILBOX_SLOT_SIZE
}

/// Stack top of vCPU `index`.
pub fn stack_top(index: usize) -> u64 {
    STACKS_TOP - index as u64 * STACK_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_region() {
        assert_eq!(
            ram_regions(64 << 20),
            vec![RamRegion {
                gpa: 0,
                ram_offset: 0,
                len: 64 << 20
            }]
        );
        assert_eq!(gpa_end(64 << 20), 64 << 20);
    }

    #[test]
    fn large_ram_skips_the_mmio_hole() {
        let regions = ram_regions(5 << 30);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].len, 3 << 30);
        assert_eq!(regions[1].gpa, 4 << 30);
        assert_eq!(regions[1].ram_offset, 3 << 30);
        assert_eq!(regions[1].len, 2 << 30);
        assert_eq!(gpa_end(5 << 30), 6 << 30);
    }

    #[test]
    fn offsets_and_addresses_round_trip() {
        let len = 5u64 << 30;
        for offset in [0, 4096, (3 << 30) - 8, 3 << 30, (5 << 30) - 1] {
            let gpa = ram_offset_to_gpa(offset);
            assert_eq!(gpa_to_ram_offset(gpa, len), Some(offset));
        }
        assert_eq!(gpa_to_ram_offset(0xfee0_0000, len), None);
        assert_eq!(gpa_to_ram_offset(6 << 30, len), None);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        assert!(PD_ADDR > PDPT_ADDR && PD_END <= stack_top(MAX_VCPUS - 1) - STACK_SIZE);
        const { assert!(STACKS_TOP <= GUEST_LOAD_ADDR) };
        const { assert!(GUEST_LOAD_ADDR + GUEST_MAX_SIZE <= DATA_START) };
        assert!(mailbox_slot(MAX_VCPUS) <= MAILBOX_ADDR + 4096);
        const { assert!(MAX_MAPPED_GPA >= 64 << 30) };
        const { assert!(STATE_ADDR + 4096 <= CMDLINE_ADDR) };
        const { assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= ZERO_PAGE_ADDR) };
        const { assert!(ZERO_PAGE_ADDR + 4096 <= PML4_ADDR) };
        const { assert!(STACKS_TOP <= EBDA_START && EBDA_START < HIGH_MEMORY_START) };
    }
}
