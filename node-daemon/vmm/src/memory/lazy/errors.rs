//! Why lazy guest memory could not be registered, attached or filled, and
//! what a fill did.

use std::io;

use crate::memory::source::PageSourceError;

/// Why guest RAM could not be registered for lazy streaming.
#[derive(Debug, thiserror::Error)]
pub enum LazyRegisterError {
    #[error("userfaultfd is not available on this host (neither /dev/userfaultfd nor the syscall)")]
    Unavailable(#[source] userfaultfd::Error),
    #[error("registering guest RAM {addr:#x}+{len:#x} with userfaultfd failed")]
    Register {
        addr: usize,
        len: usize,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("the kernel does not offer UFFDIO_{0} on guest RAM")]
    MissingIoctl(&'static str),
    #[error("cannot map the fault handler's stop sentinel page")]
    Sentinel(#[source] io::Error),
    #[error("cannot create the fault handler's wake-up eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot start the fault handler thread")]
    Spawn(#[source] io::Error),
}

/// Why a page source could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("a page source is already attached")]
    AlreadyAttached,
    #[error("the page source has {source_pages} pages, guest RAM has {ram_pages}")]
    SizeMismatch {
        source_pages: usize,
        ram_pages: usize,
    },
    #[error("cannot start the prefetch thread")]
    Spawn(#[source] io::Error),
}

/// Why a page could not be filled.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("page {page} is outside guest RAM (0..{pages})")]
    OutOfRange { page: usize, pages: usize },
    #[error("no page source is attached yet")]
    NotAttached,
    #[error(transparent)]
    Source(#[from] PageSourceError),
    #[error("UFFDIO_{op} of pages {first}..{end} failed: {}", io::Error::from_raw_os_error(*errno))]
    Ioctl {
        op: &'static str,
        first: usize,
        end: usize,
        errno: i32,
    },
}

/// What [`LazyMemory::fill_page`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOutcome {
    /// The page was filled now.
    Filled,
    /// The page was already present (filled earlier or concurrently).
    AlreadyPresent,
}

/// The errno behind a userfaultfd error (EAGAIN for a partial copy).
pub(super) fn errno_of(e: &userfaultfd::Error) -> i32 {
    match e {
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) => *n as i32,
        userfaultfd::Error::SystemError(n) => *n as i32,
        userfaultfd::Error::PartiallyCopied(_) => libc::EAGAIN,
        _ => libc::EIO,
    }
}
