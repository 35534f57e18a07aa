//! Live images on disk: the versioned, checksummed state file (`state.bin`),
//! the page store (`memory.pages` + `pages.idx`), the allocation-free writer
//! that produces a page store from guest memory inside a forked child, and
//! [`LiveImage`], which opens and validates all of them together.
//!
//! The byte layout and the versioning policy are described in
//! `docs/LIVE-IMAGE-FORMAT.md`.

mod bitmap;
mod error;
mod index;
mod live;
mod preamble;
mod runs;
mod state;
mod store;
mod version;
mod writer;

pub use bitmap::Bitmap;
pub use error::ImageOpenError;
pub use index::{INDEX_FILE, INDEX_HEADER_LEN, INDEX_MAGIC};
pub use live::LiveImage;
pub use runs::PageRuns;
pub use state::{
    STATE_FILE, STATE_HEADER_LEN, STATE_MAGIC, StateContents, StateFile, StateWriteError,
};
pub use store::{PAGES_FILE, PageMapping, PageStore};
pub use version::{FORMAT_VERSION, FormatVersion};
pub use writer::{PageStoreWriter, WriteError, WriteOptions, WritePhase, WriteSummary};
