//! Guest memory: the host mapping of guest RAM and its backings (anonymous,
//! copy-on-write image file, userfaultfd streaming), the page sources that
//! feed lazy memory, and footprint measurement.

pub mod cow;
pub mod footprint;
pub mod latency;
pub mod lazy;
pub mod ram;
pub mod source;

pub use cow::{CowMapError, map_copy_on_write};
pub use footprint::{FootprintError, RangeFootprint, range_footprint, resident_bytes};
pub use latency::{LatencyHistogram, LatencySnapshot};
pub use lazy::{
    AttachError, FaultStats, FillError, FillOutcome, LazyMemory, LazyOptions, LazyRegisterError,
    QuiesceGuard, pin_thread, userfaultfd_available,
};
pub use ram::{GuestRam, PAGE_SIZE};
pub use source::{BufferSource, PageSource, PageSourceError};
