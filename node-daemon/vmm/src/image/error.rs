//! The one error type of opening a live image (state file, page store, or
//! both together): every variant names the file and what is wrong with it.

use std::io;
use std::path::PathBuf;

use super::version::FormatVersion;

/// Why a live image (or one of its files) cannot be opened. Nothing is mapped
/// from an image that produced this error.
#[derive(Debug, thiserror::Error)]
pub enum ImageOpenError {
    #[error("live image file {path} is missing")]
    Missing { path: PathBuf },
    #[error("cannot read live image file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "live image file {path} is truncated: expected {expected} bytes at offset {offset}, but the file has {file_len} bytes"
    )]
    Truncated {
        path: PathBuf,
        offset: u64,
        expected: u64,
        file_len: u64,
    },
    #[error("live image file {path} has {extra} unexpected trailing bytes after offset {offset}")]
    TrailingBytes {
        path: PathBuf,
        offset: u64,
        extra: u64,
    },
    #[error("live image file {path} has bad magic {found:?} (expected {expected:?})")]
    BadMagic {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error(
        "live image file {path} has unsupported format version {found} (this build supports {supported}: same major, minor up to {})",
        supported.minor
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: FormatVersion,
        supported: FormatVersion,
    },
    #[error("live image file {path} has header length {found} (expected {expected})")]
    BadHeaderLength {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("live image file {path} has page size {found} (this build supports {expected})")]
    UnsupportedPageSize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error(
        "live image file {path} fails its CRC32 check: stored {stored:#010x}, computed {computed:#010x}"
    )]
    CrcMismatch {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error(
        "page store {path} is {actual} bytes but its index describes {expected} bytes ({pages} pages)"
    )]
    PageStoreSizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
        pages: u64,
    },
    #[error("page index {path} is corrupt: {reason}")]
    IndexCorrupt { path: PathBuf, reason: String },
    #[error(
        "live image {dir} is inconsistent: its state file says memory is {state_memory} bytes, its page store holds {store_memory} bytes"
    )]
    ImageInconsistent {
        dir: PathBuf,
        state_memory: u64,
        store_memory: u64,
    },
    #[error(
        "live image {dir} does not fit the VM shell: image memory is {image} bytes, the shell has {shell} bytes"
    )]
    MemorySizeMismatch {
        dir: PathBuf,
        image: u64,
        shell: u64,
    },
    #[error("cannot map page store {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ImageOpenError {
    /// Maps an I/O error on `path` to [`ImageOpenError::Missing`] when the
    /// file does not exist and to [`ImageOpenError::Io`] otherwise.
    pub(crate) fn from_io(path: PathBuf, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::NotFound {
            Self::Missing { path }
        } else {
            Self::Io { path, source }
        }
    }
}

/// Renders magic bytes for an error message (printable ASCII kept, the rest
/// escaped).
pub(crate) fn describe_magic(found: &[u8]) -> String {
    found.escape_ascii().to_string()
}
