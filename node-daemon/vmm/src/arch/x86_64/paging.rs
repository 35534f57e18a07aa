//! Identity page tables for a long-mode micro guest: one PML4, one PDPT and
//! one page directory of 2 MiB pages per GiB, covering every guest physical
//! address up to the end of RAM (the MMIO hole is mapped too; accesses there
//! exit to the VMM as MMIO).

use super::layout::{MAX_MAPPED_GPA, PD_ADDR, PDPT_ADDR, PML4_ADDR};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_2M: u64 = 1 << 7;

/// A page table to be written into guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTable {
    /// Guest physical address of the table.
    pub gpa: u64,
    /// Its 512 entries.
    pub entries: Vec<u64>,
}

/// Error building the identity map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagingError {
    #[error("guest address space end {end:#x} exceeds the identity map limit {limit:#x}")]
    TooLarge { end: u64, limit: u64 },
}

/// The tables that identity-map `[0, gpa_end)` with 2 MiB pages; CR3 is
/// [`PML4_ADDR`].
pub fn identity_map(gpa_end: u64) -> Result<Vec<PageTable>, PagingError> {
    if gpa_end > MAX_MAPPED_GPA {
        return Err(PagingError::TooLarge {
            end: gpa_end,
            limit: MAX_MAPPED_GPA,
        });
    }
    let gibs = gpa_end.div_ceil(1 << 30).max(1);
    let mut pml4 = vec![0u64; 512];
    pml4[0] = PDPT_ADDR | PRESENT | WRITABLE;
    let mut pdpt = vec![0u64; 512];
    let mut tables = Vec::with_capacity(2 + gibs as usize);
    for gib in 0..gibs {
        let pd_gpa = PD_ADDR + gib * 4096;
        pdpt[gib as usize] = pd_gpa | PRESENT | WRITABLE;
        let entries = (0..512u64)
            .map(|i| ((gib << 30) | (i << 21)) | PRESENT | WRITABLE | PAGE_SIZE_2M)
            .collect();
        tables.push(PageTable {
            gpa: pd_gpa,
            entries,
        });
    }
    tables.insert(
        0,
        PageTable {
            gpa: PML4_ADDR,
            entries: pml4,
        },
    );
    tables.insert(
        1,
        PageTable {
            gpa: PDPT_ADDR,
            entries: pdpt,
        },
    );
    Ok(tables)
}

/// Walks `tables` like the MMU would for `gva` (test aid and self-check).
pub fn translate(tables: &[PageTable], gva: u64) -> Option<u64> {
    let lookup = |gpa: u64, index: u64| -> Option<u64> {
        let table = tables.iter().find(|t| t.gpa == gpa)?;
        let entry = table.entries[index as usize];
        (entry & PRESENT != 0).then_some(entry)
    };
    let pml4e = lookup(PML4_ADDR, (gva >> 39) & 511)?;
    let pdpte = lookup(pml4e & !0xfff, (gva >> 30) & 511)?;
    let pde = lookup(pdpte & !0xfff, (gva >> 21) & 511)?;
    if pde & PAGE_SIZE_2M == 0 {
        return None;
    }
    Some((pde & !((1 << 21) - 1)) | (gva & ((1 << 21) - 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_identity_over_all_ram() {
        let end = 6u64 << 30;
        let tables = identity_map(end).unwrap();
        assert_eq!(tables.len(), 2 + 6);
        for gva in [0u64, 0x1234, 0x10_0000, (3 << 30) + 5, end - 8] {
            assert_eq!(translate(&tables, gva), Some(gva));
        }
        assert_eq!(translate(&tables, end), None);
    }

    #[test]
    fn small_guest_gets_one_directory() {
        let tables = identity_map(16 << 20).unwrap();
        assert_eq!(tables.len(), 3);
        assert_eq!(translate(&tables, (1 << 30) - 1), Some((1 << 30) - 1));
    }

    #[test]
    fn refuses_address_space_beyond_the_directory_area() {
        assert!(matches!(
            identity_map(MAX_MAPPED_GPA + 1),
            Err(PagingError::TooLarge { .. })
        ));
    }
}
