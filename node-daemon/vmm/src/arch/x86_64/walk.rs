//! Which guest pages the CPU itself reads before and while executing: the
//! 4-level page-table pages reachable from CR3 and the pages holding RIP,
//! RSP, the GDT and the IDT. A lazily streamed clone brings these in before
//! its vCPUs start, because a hardware page walk or instruction fetch that
//! meets a missing page cannot be completed by the VMM on every host (with
//! PVM and userfaultfd SIGBUS mode it ends in a triple fault).

use std::collections::BTreeSet;

const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Registers that locate what the CPU reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuRoots {
    pub cr3: u64,
    pub long_mode_paging: bool,
    pub rip: u64,
    pub rsp: u64,
    pub gdt_base: u64,
    pub idt_base: u64,
}

/// Guest physical addresses (page-aligned) the CPU needs, reading guest
/// memory through `read_u64(gpa)`; at most `limit` table pages are walked.
pub fn cpu_pages(
    roots: &CpuRoots,
    mut read_u64: impl FnMut(u64) -> Option<u64>,
    limit: usize,
) -> BTreeSet<u64> {
    let mut pages = BTreeSet::new();
    let page = |gpa: u64| gpa & !0xfff;
    if !roots.long_mode_paging {
        for gpa in [roots.rip, roots.rsp, roots.gdt_base, roots.idt_base] {
            pages.insert(page(gpa));
        }
        return pages;
    }
    let mut stack = vec![(page(roots.cr3), 4u8)];
    let mut tables = 0;
    while let Some((table, level)) = stack.pop() {
        if !pages.insert(table) || level == 1 {
            continue;
        }
        tables += 1;
        if tables > limit {
            break;
        }
        for i in 0..512 {
            let Some(entry) = read_u64(table + 8 * i) else {
                break;
            };
            let leaf = level != 4 && entry & PAGE_SIZE_BIT != 0;
            if entry & PRESENT != 0 && !leaf {
                stack.push((entry & ADDRESS_MASK, level - 1));
            }
        }
    }
    for gva in [
        roots.rip,
        roots.rsp.wrapping_sub(8),
        roots.gdt_base,
        roots.idt_base,
    ] {
        if let Some(gpa) = translate(roots.cr3, gva, &mut read_u64) {
            pages.insert(page(gpa));
        }
    }
    pages
}

/// Translates `gva` through the 4-level tables at `cr3`.
pub fn translate(cr3: u64, gva: u64, read_u64: &mut impl FnMut(u64) -> Option<u64>) -> Option<u64> {
    let mut table = cr3 & ADDRESS_MASK;
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let entry = read_u64(table + 8 * ((gva >> shift) & 511))?;
        if entry & PRESENT == 0 {
            return None;
        }
        if level == 1 || (level <= 3 && entry & PAGE_SIZE_BIT != 0) {
            let offset_mask = (1u64 << shift) - 1;
            return Some((entry & ADDRESS_MASK & !offset_mask) | (gva & offset_mask));
        }
        table = entry & ADDRESS_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{
        GDT_ADDR, GUEST_LOAD_ADDR, IDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR,
    };
    use crate::arch::x86_64::paging::identity_map;
    use std::collections::HashMap;

    #[test]
    fn finds_identity_tables_code_and_stack() {
        let mut memory = HashMap::new();
        for table in identity_map(2 << 30).unwrap() {
            for (i, e) in table.entries.iter().enumerate() {
                memory.insert(table.gpa + 8 * i as u64, *e);
            }
        }
        let roots = CpuRoots {
            cr3: PML4_ADDR,
            long_mode_paging: true,
            rip: GUEST_LOAD_ADDR + 0x10,
            rsp: 0x9_0000,
            gdt_base: GDT_ADDR,
            idt_base: IDT_ADDR,
        };
        let pages = cpu_pages(
            &roots,
            |gpa| Some(memory.get(&gpa).copied().unwrap_or(0)),
            4096,
        );
        let expected: BTreeSet<u64> = [
            PML4_ADDR,
            PDPT_ADDR,
            PD_ADDR,
            PD_ADDR + 4096,
            GUEST_LOAD_ADDR,
            0x8_f000,
            GDT_ADDR,
            IDT_ADDR,
        ]
        .into_iter()
        .collect();
        assert_eq!(pages, expected);
    }

    #[test]
    fn translate_handles_4k_pages() {
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> page 0x7000.
        let memory: HashMap<u64, u64> = [
            (0x1000, 0x2000 | PRESENT),
            (0x2000, 0x3000 | PRESENT),
            (0x3000, 0x4000 | PRESENT),
            (0x4000 + 8 * 5, 0x7000 | PRESENT),
        ]
        .into_iter()
        .collect();
        let mut read = |gpa| Some(memory.get(&gpa).copied().unwrap_or(0));
        assert_eq!(translate(0x1000, 0x5123, &mut read), Some(0x7123));
        assert_eq!(translate(0x1000, 0x6000, &mut read), None);
    }
}
