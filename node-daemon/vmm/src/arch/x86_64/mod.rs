//! x86-64 machine set-up: the guest memory map, the long-mode boot state
//! (GDT, identity page tables, control registers), CPUID and MSR handling.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod msr;
pub mod paging;
pub mod walk;
