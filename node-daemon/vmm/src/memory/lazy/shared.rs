//! The state a [`super::LazyMemory`] shares with its fault-handler and
//! prefetch threads and with [`PageInstaller`] handles: the userfaultfd, the
//! populated and dirty bitmaps, what serves missing pages, the stop
//! protocol's sentinel page, and the counters.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use userfaultfd::Uffd;

use super::errors::FillError;
use crate::image::Bitmap;
use crate::memory::PAGE_SIZE;
use crate::memory::latency::LatencyHistogram;
use crate::memory::source::PageSource;

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) faults: AtomicU64,
    pub(super) pages_copied: AtomicU64,
    pub(super) pages_zeroed: AtomicU64,
    pub(super) bytes_copied: AtomicU64,
    pub(super) races: AtomicU64,
    pub(super) prefetched_pages: AtomicU64,
    pub(super) wp_faults: AtomicU64,
    pub(super) errors: AtomicU64,
}

/// What serves the missing pages.
pub(super) enum Attached {
    /// The handler fills pages from the source itself.
    Source(Arc<dyn PageSource>),
    /// The handler tells the hook; the page is installed by whatever path
    /// the hook arranged (the faulting thread waits until then).
    Hook(Arc<dyn MissingPageHook>),
}

/// Told about missing pages of a [`LazyMemory`] attached with
/// [`LazyMemory::attach_hook`] (e.g. a migration target that requests the
/// page from the source over the network).
pub trait MissingPageHook: Send + Sync {
    /// A thread touched `page`, which is not installed. Called on the
    /// fault-handler thread: install the page now through `installer` if
    /// it is at hand, else arrange for it to be installed later (a request)
    /// and return; never wait for it here. The faulting thread sleeps
    /// until some path installs the page (installs wake it).
    fn missing(&self, page: usize, installer: &PageInstaller);
}

pub(super) struct Shared {
    pub(super) uffd: Uffd,
    pub(super) base: usize,
    pub(super) pages: usize,
    pub(super) populated: Bitmap,
    pub(super) dirty: Bitmap,
    pub(super) attached: OnceLock<Attached>,
    pub(super) serving: RwLock<()>,
    pub(super) stop: AtomicBool,
    pub(super) wake: OwnedFd,
    pub(super) handler_tid: AtomicI32,
    /// Set by the handler once it blocks in `read` on the userfaultfd (no
    /// `poll` per fault); stopping it then takes a touch of `sentinel`.
    pub(super) blocking: AtomicBool,
    pub(super) sentinel: SentinelPage,
    pub(super) sigbus: bool,
    pub(super) counters: Counters,
    pub(super) latency: LatencyHistogram,
    pub(super) last_error: Mutex<Option<String>>,
}

/// Installs pages into a [`LazyMemory`] from the caller's buffers, exactly
/// once each: `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` refuse a page already present
/// (EEXIST), so whichever install comes first wins and later ones count 0.
/// Installs wake threads waiting on the pages and take the quiesce lock
/// shared (a [`QuiesceGuard`] holder sees no install in flight).
///
/// The handle keeps the userfaultfd open; once the guest RAM is unmapped
/// the ioctls fail (the range is no longer registered) and report errors.
#[derive(Clone)]
pub struct PageInstaller(pub(super) Arc<Shared>);

pub(super) fn signal_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local u64 to an eventfd we own.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// One private anonymous page registered with the same userfaultfd as
/// guest RAM. A fault on it is how a handler blocked in `read` is told to
/// stop (the handler then zero-fills it, waking the stopper).
pub(super) struct SentinelPage {
    pub(super) addr: usize,
}

impl SentinelPage {
    pub(super) fn map() -> io::Result<Self> {
        // SAFETY: a fresh anonymous page at an address of the kernel's
        // choice; checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr as usize,
        })
    }
}

impl Drop for SentinelPage {
    fn drop(&mut self) {
        // SAFETY: unmaps the page mapped in `map`, owned by self.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, PAGE_SIZE);
        }
    }
}

impl Shared {
    pub(super) fn page_source(&self) -> Option<&Arc<dyn PageSource>> {
        match self.attached.get() {
            Some(Attached::Source(source)) => Some(source),
            _ => None,
        }
    }

    pub(super) fn addr(&self, page: usize) -> *mut libc::c_void {
        (self.base + page * PAGE_SIZE) as *mut libc::c_void
    }

    pub(super) fn clear_dirty(&self) {
        // A fresh bitmap cannot be swapped in behind `&self`; clear bit by
        // bit only where set (dirty sets are small between rounds).
        let mut page = 0;
        while page < self.pages {
            if self.dirty.word(page / 64) == 0 {
                page = (page / 64 + 1) * 64;
                continue;
            }
            self.dirty.clear(page);
            page += 1;
        }
    }

    pub(super) fn record_error(&self, e: &FillError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(error = %e, "serving a guest page fault failed");
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// Waits until the wake-up eventfd is signalled (attach or stop).
    pub(super) fn wait_for_wakeup(&self) {
        let mut fd = libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one initialised pollfd.
        let rc = unsafe { libc::poll(&mut fd, 1, -1) };
        if rc > 0 {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a local u64 from our eventfd.
            unsafe { libc::read(self.wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        }
    }

    /// Makes the sentinel page present (waking a stopper that touched it),
    /// so later touches never wait.
    pub(super) fn release_sentinel(&self) {
        // SAFETY: the sentinel page is registered with our userfaultfd;
        // ZEROPAGE only installs a zero page where none is present.
        let _ = unsafe {
            self.uffd
                .zeropage(self.sentinel.addr as *mut libc::c_void, PAGE_SIZE, true)
        };
    }
}
