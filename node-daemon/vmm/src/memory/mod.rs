//! Guest memory: the host mapping of guest RAM (and its `vm-memory` view
//! for rust-vmm crates) and its backings (anonymous,
//! copy-on-write image file, userfaultfd streaming), the page sources that
//! feed lazy memory, footprint measurement and policy, page sharing between
//! clones (KSM) and giving clean pages back under pressure (reclaim).

pub mod backing;
pub mod cow;
pub mod footprint;
pub mod guest_memory_view;
pub mod ksm;
pub mod latency;
pub mod lazy;
pub mod ram;
pub mod reclaim;
pub mod source;

pub use cow::{CowMapError, map_copy_on_write};
pub use footprint::{
    CleanScan, CloneUsage, FootprintError, RangeFootprint, ReclaimPlan, ReclaimRequest,
    image_clean_estimate, plan_reclaim, range_footprint, resident_bytes,
};
pub use guest_memory_view::{GuestMemoryViewError, guest_memory_view};
pub use ksm::{KsmError, KsmProcessStat, KsmRunning, KsmSettings, merge_identical_pages};
pub use latency::{LatencyHistogram, LatencySnapshot};
pub use lazy::{
    AttachError, FaultStats, FillError, FillOutcome, LazyMemory, LazyOptions, LazyRegisterError,
    MissingPageHook, PageInstaller, QuiesceGuard, pin_thread, pin_thread_to, unpin_thread,
    userfaultfd_available,
};
pub use ram::{GuestRam, PAGE_SIZE};
pub use reclaim::{ReclaimError, ReclaimReport, drop_image_equal_pages};
pub use source::{BufferSource, PageSource, PageSourceError};
