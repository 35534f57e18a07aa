//! Guest memory: the host mapping of guest RAM and its backings.

pub mod ram;

pub use ram::{GuestRam, PAGE_SIZE};
