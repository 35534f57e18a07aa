//! The pages a lazily streamed clone needs before its vCPUs run, found by
//! walking each saved vCPU's page tables, code, stack, GDT and IDT through
//! the image's page store (or any page source), plus the mailbox page.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use crate::arch::x86_64::layout::{MAILBOX_ADDR, gpa_to_ram_offset};
use crate::arch::x86_64::walk::{CpuRoots, cpu_pages};
use crate::image::PageStore;
use crate::memory::{PAGE_SIZE, PageSource};
use crate::vstate::VmState;

/// Reads single pages for the startup walk.
pub(crate) trait StartupRead {
    fn is_zero(&self, page: usize) -> bool;
    fn read_page(&self, page: usize, buf: &mut [u8]) -> bool;
}

impl StartupRead for PageStore {
    fn is_zero(&self, page: usize) -> bool {
        !self.is_present(page)
    }
    fn read_page(&self, page: usize, buf: &mut [u8]) -> bool {
        PageStore::read_page(self, page, buf).is_ok()
    }
}

pub(crate) struct SourceReader<'a>(pub(crate) &'a dyn PageSource);

impl StartupRead for SourceReader<'_> {
    fn is_zero(&self, page: usize) -> bool {
        page >= self.0.pages() || self.0.is_zero(page)
    }
    fn read_page(&self, page: usize, buf: &mut [u8]) -> bool {
        self.0.read_pages(page, 1, buf).is_ok()
    }
}

pub(crate) fn startup_pages(state: &VmState, store: &dyn StartupRead) -> Vec<usize> {
    let mut cache: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut read_u64 = |gpa: u64| -> Option<u64> {
        let offset = gpa_to_ram_offset(gpa, state.memory_bytes)?;
        let index = offset as usize / PAGE_SIZE;
        if store.is_zero(index) {
            return Some(0);
        }
        let page = match cache.entry(index) {
            Entry::Occupied(page) => page.into_mut(),
            Entry::Vacant(slot) => {
                let mut page = vec![0u8; PAGE_SIZE];
                if !store.read_page(index, &mut page) {
                    return None;
                }
                slot.insert(page)
            }
        };
        let at = offset as usize % PAGE_SIZE;
        Some(u64::from_le_bytes(page[at..at + 8].try_into().ok()?))
    };
    let mut pages = std::collections::BTreeSet::new();
    pages.insert(MAILBOX_ADDR as usize / PAGE_SIZE);
    for vcpu in &state.vcpus {
        let roots = CpuRoots {
            cr3: vcpu.sregs.cr3,
            long_mode_paging: vcpu.sregs.cr0 & (1 << 31) != 0 && vcpu.sregs.efer & (1 << 10) != 0,
            rip: vcpu.regs.rip,
            rsp: vcpu.regs.rsp,
            gdt_base: vcpu.sregs.gdt.base,
            idt_base: vcpu.sregs.idt.base,
        };
        for gpa in cpu_pages(&roots, &mut read_u64, STARTUP_TABLE_LIMIT) {
            if let Some(offset) = gpa_to_ram_offset(gpa, state.memory_bytes) {
                pages.insert(offset as usize / PAGE_SIZE);
            }
        }
    }
    pages.into_iter().collect()
}

/// Most page-table pages walked for the startup set.
const STARTUP_TABLE_LIMIT: usize = 4096;
