//! The long-mode boot state of a micro guest's vCPUs, built on the host the
//! way Firecracker does: a flat GDT (64-bit code, data, TSS), an empty IDT,
//! CR0.PE|PG, CR4.PAE, EFER.LME|LMA, CR3 at the identity page tables, and
//! general registers that tell the guest who it is. A Linux kernel starts
//! from the same long-mode state at its 64-bit entry point (the 64-bit boot
//! protocol: RSI holds the zero page's address).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use super::layout::{GDT_ADDR, GUEST_LOAD_ADDR, IDT_ADDR, PML4_ADDR, mailbox_slot, stack_top};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const X86_CR4_OSFXSR: u64 = 1 << 9;
const X86_CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT selectors.
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// Builds a GDT descriptor from flags, base and limit (Firecracker's layout).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The GDT: null, 64-bit code, data, TSS.
pub fn gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The KVM segment register value for GDT entry `entry` at `selector`.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// `sregs` (as read from a fresh vCPU) switched to 64-bit long mode with
/// paging through the identity tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let gdt = gdt();
    let code = segment(gdt[1], CODE_SELECTOR);
    let data = segment(gdt[2], DATA_SELECTOR);
    let tss = segment(gdt[3], TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT;
    // Caching on (CD and NW clear), native FPU errors, protected mode, paging.
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers of vCPU `index` at the guest entry point: rdi = index,
/// rsi = its mailbox slot, rsp = its stack, interrupts disabled.
pub fn entry_regs(index: usize) -> kvm_regs {
    kvm_regs {
        rip: GUEST_LOAD_ADDR,
        rflags: 0x2,
        rdi: index as u64,
        rsi: mailbox_slot(index),
        rsp: stack_top(index),
        rbp: stack_top(index),
        ..Default::default()
    }
}

/// General registers at a Linux kernel's 64-bit entry point `entry`: RSI
/// = the zero page, a stack in low RAM, interrupts disabled.
pub fn linux_entry_regs(entry: u64, zero_page: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rflags: 0x2,
        rsi: zero_page,
        rsp: stack_top(0),
        rbp: stack_top(0),
        ..Default::default()
    }
}

/// Power-on x87/SSE control state.
pub fn entry_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit() {
        let cs = segment(gdt()[1], CODE_SELECTOR);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn data_segment_is_writable_flat() {
        let ds = segment(gdt()[2], DATA_SELECTOR);
        assert_eq!(ds.type_, 0x3);
        assert_eq!(ds.db, 1);
        assert_eq!(ds.base, 0);
    }

    #[test]
    fn sregs_enable_long_mode_with_paging() {
        let sregs = long_mode_sregs(kvm_sregs::default());
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_ADDR);
    }

    #[test]
    fn entry_regs_identify_the_vcpu() {
        let regs = entry_regs(1);
        assert_eq!(regs.rdi, 1);
        assert_eq!(regs.rsi, mailbox_slot(1));
        assert_eq!(regs.rip, GUEST_LOAD_ADDR);
        assert_eq!(regs.rflags & 0x200, 0);
    }

    #[test]
    fn linux_entry_points_rsi_at_the_zero_page() {
        let regs = linux_entry_regs(0x100_0000, 0x7000);
        assert_eq!((regs.rip, regs.rsi), (0x100_0000, 0x7000));
        assert_eq!(regs.rflags & 0x200, 0);
        assert_ne!(regs.rsp, 0);
    }
}
