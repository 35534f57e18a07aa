//! Lazily streamed guest memory: the guest RAM range is registered with
//! userfaultfd (MISSING mode, optionally write-protect) when the VM shell is
//! prepared; later a [`PageSource`] is attached and a fault-serving thread
//! fills each page on first touch with `UFFDIO_COPY` (stored page) or
//! `UFFDIO_ZEROPAGE` (zero page). Start latency does not depend on memory
//! size: nothing is copied until touched.
//!
//! ```text
//!  register ──► (shell ready: faults would wait) ──► attach(source) ──► serving
//!                                                        │  prefetch (optional)
//!  quiesce() guard: no fill in progress while held ◄─────┘  drop: stop + join
//! ```
//!
//! Rules for callers: nothing may touch the guest RAM before `attach` (the
//! access would wait for a source); the [`GuestRam`] must outlive the
//! [`LazyMemory`]; vCPUs must be stopped before the `LazyMemory` is dropped
//! (dropping closes the userfaultfd, and untouched pages then read as zero).
//! While a [`QuiesceGuard`] is held the holder must not touch unpopulated
//! guest memory itself (it would wait for the handler, which waits for the
//! guard); `fork` is fine, the child's mappings are not registered.

mod affinity;
mod errors;
mod fill;
mod handler;
mod installer;
mod shared;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockWriteGuard};
use std::thread::JoinHandle;

use userfaultfd::{FeatureFlags, IoctlFlags, RegisterMode, UffdBuilder};

pub use affinity::{pin_thread, pin_thread_to, unpin_thread};
pub use errors::{AttachError, FillError, FillOutcome, LazyRegisterError};
pub use shared::{MissingPageHook, PageInstaller};

use super::latency::{LatencyHistogram, LatencySnapshot};
use super::source::PageSource;
use super::{GuestRam, PAGE_SIZE};
use crate::image::Bitmap;
use errors::errno_of;
use shared::{Attached, Counters, SentinelPage, Shared, signal_eventfd};

/// How a [`LazyMemory`] is set up.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    /// Pin the fault-serving thread to this CPU. On hosts where cross-CPU
    /// wake-ups are expensive, pin it to the vCPU's CPU.
    pub handler_cpu: Option<usize>,
    /// Also register write-protect mode: [`LazyMemory::write_protect_all`]
    /// then records written pages in [`LazyMemory::dirty`].
    pub write_protect: bool,
    /// Ask for `UFFD_FEATURE_SIGBUS`: faults are not queued to the handler
    /// but fail (KVM reports an exit, user code gets SIGBUS); the VMM fills
    /// pages itself with [`LazyMemory::fill_page`].
    pub sigbus: bool,
    /// After attach, copy all untouched pages in the background.
    pub prefetch: bool,
    /// Pages per background prefetch batch.
    pub prefetch_batch_pages: usize,
    /// Pages filled per fault, starting at the faulting page (1 = exactly
    /// the touched page).
    pub fault_around_pages: usize,
}

impl Default for LazyOptions {
    fn default() -> Self {
        Self {
            handler_cpu: None,
            write_protect: false,
            sigbus: false,
            prefetch: false,
            prefetch_batch_pages: 64,
            fault_around_pages: 1,
        }
    }
}

/// Counters of a [`LazyMemory`] at one moment.
#[derive(Debug, Clone, Default)]
pub struct FaultStats {
    /// Missing-page fault events served by the handler thread.
    pub faults: u64,
    /// Pages filled with `UFFDIO_COPY` (faults, fault-around, prefetch, fill_page).
    pub pages_copied: u64,
    /// Pages filled with `UFFDIO_ZEROPAGE`.
    pub pages_zeroed: u64,
    /// Bytes copied with `UFFDIO_COPY`.
    pub bytes_copied: u64,
    /// Fills that found the page already present (EEXIST) or faults on
    /// pages already populated: resolved by a wake-up.
    pub races: u64,
    /// Pages filled by the background prefetcher.
    pub prefetched_pages: u64,
    /// Write-protect faults served (dirty tracking).
    pub wp_faults: u64,
    /// Fills that failed (the faulting thread stays blocked).
    pub errors: u64,
    /// Pages populated so far.
    pub populated_pages: u64,
    /// Service time of missing-page faults (event read to page filled).
    pub latency: LatencySnapshot,
}

/// Guest RAM registered with userfaultfd and the thread that serves its
/// faults. See the module documentation for the life cycle.
pub struct LazyMemory {
    shared: Arc<Shared>,
    options: LazyOptions,
    handler: Option<JoinHandle<()>>,
    prefetcher: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for LazyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyMemory")
            .field("base", &format_args!("{:#x}", self.shared.base))
            .field("pages", &self.shared.pages)
            .field("attached", &self.shared.attached.get().is_some())
            .field("options", &self.options)
            .finish()
    }
}

/// Holding this guarantees that no page fill is in progress and none starts
/// (the capture code holds it across `fork`, so the populated bitmap the
/// child sees matches the memory it sees).
#[must_use = "the handler resumes as soon as the guard is dropped"]
pub struct QuiesceGuard<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
}

/// Whether this host lets us create a userfaultfd able to serve kernel-mode
/// faults (KVM's accesses). Returns the reason when it does not (tests skip
/// with it; the daemon reports it).
pub fn userfaultfd_available() -> Result<(), String> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map(drop)
        .map_err(|e| {
            format!(
                "userfaultfd unavailable ({e}): need /dev/userfaultfd access or the userfaultfd syscall with vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE"
            )
        })
}

impl LazyMemory {
    /// Registers all of `ram` with a new userfaultfd and starts the (idle)
    /// fault-serving thread. Call at VM-shell preparation time; the range
    /// stays valid for a KVM memory slot.
    pub fn register(ram: &GuestRam, options: LazyOptions) -> Result<Self, LazyRegisterError> {
        let mut features = FeatureFlags::empty();
        if options.write_protect {
            features |= FeatureFlags::PAGEFAULT_FLAG_WP;
        }
        if options.sigbus {
            features |= FeatureFlags::SIGBUS;
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(features)
            .create()
            .map_err(LazyRegisterError::Unavailable)?;
        let mut mode = RegisterMode::MISSING;
        if options.write_protect {
            mode |= RegisterMode::WRITE_PROTECT;
        }
        let ioctls = uffd
            .register_with_mode(ram.host_addr().cast(), ram.len(), mode)
            .map_err(|source| LazyRegisterError::Register {
                addr: ram.host_addr() as usize,
                len: ram.len(),
                source,
            })?;
        for (flag, name) in [
            (IoctlFlags::COPY, "COPY"),
            (IoctlFlags::ZEROPAGE, "ZEROPAGE"),
            (IoctlFlags::WAKE, "WAKE"),
        ] {
            if !ioctls.contains(flag) {
                return Err(LazyRegisterError::MissingIoctl(name));
            }
        }
        if options.write_protect && !ioctls.contains(IoctlFlags::WRITE_PROTECT) {
            return Err(LazyRegisterError::MissingIoctl("WRITEPROTECT"));
        }
        let sentinel = SentinelPage::map().map_err(LazyRegisterError::Sentinel)?;
        uffd.register(sentinel.addr as *mut libc::c_void, PAGE_SIZE)
            .map_err(|source| LazyRegisterError::Register {
                addr: sentinel.addr,
                len: PAGE_SIZE,
                source,
            })?;
        // SAFETY: eventfd creates a new descriptor; checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(LazyRegisterError::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: efd is a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let pages = ram.pages();
        let shared = Arc::new(Shared {
            uffd,
            base: ram.host_addr() as usize,
            pages,
            populated: Bitmap::new(pages),
            dirty: Bitmap::new(pages),
            attached: OnceLock::new(),
            serving: RwLock::new(()),
            stop: AtomicBool::new(false),
            wake,
            handler_tid: AtomicI32::new(0),
            blocking: AtomicBool::new(false),
            sentinel,
            sigbus: options.sigbus,
            counters: Counters::default(),
            latency: LatencyHistogram::default(),
            last_error: Mutex::new(None),
        });
        let thread_shared = Arc::clone(&shared);
        let cpu = options.handler_cpu;
        let fault_around = options.fault_around_pages.max(1);
        let handler = std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || thread_shared.serve_faults(cpu, fault_around))
            .map_err(LazyRegisterError::Spawn)?;
        Ok(Self {
            shared,
            options,
            handler: Some(handler),
            prefetcher: Mutex::new(None),
        })
    }

    /// Attaches the page source; faults are served from now on. Starts the
    /// background prefetcher if the options ask for it.
    pub fn attach(&self, source: Arc<dyn PageSource>) -> Result<(), AttachError> {
        if source.pages() != self.shared.pages {
            return Err(AttachError::SizeMismatch {
                source_pages: source.pages(),
                ram_pages: self.shared.pages,
            });
        }
        self.shared
            .attached
            .set(Attached::Source(source))
            .map_err(|_| AttachError::AlreadyAttached)?;
        signal_eventfd(self.shared.wake.as_raw_fd());
        if self.options.prefetch {
            self.start_prefetch()?;
        }
        Ok(())
    }

    /// Attaches a hook instead of a page source: the handler thread reports
    /// each missing page to `hook` and goes on serving; the page is
    /// installed with [`PageInstaller::install`] / `install_zero` by any
    /// thread. `fill_page` and prefetch do nothing for such memory.
    pub fn attach_hook(&self, hook: Arc<dyn MissingPageHook>) -> Result<(), AttachError> {
        self.shared
            .attached
            .set(Attached::Hook(hook))
            .map_err(|_| AttachError::AlreadyAttached)?;
        signal_eventfd(self.shared.wake.as_raw_fd());
        Ok(())
    }

    /// The options it was registered with.
    pub fn options(&self) -> &LazyOptions {
        &self.options
    }

    /// A handle that installs pages from the caller's buffers (any thread,
    /// with or without a hook or source attached).
    pub fn installer(&self) -> PageInstaller {
        PageInstaller(Arc::clone(&self.shared))
    }

    /// Starts copying every page not yet populated in the background (in
    /// batches of `prefetch_batch_pages`, taking the quiesce lock per batch).
    /// Does nothing if already running or not attached.
    pub fn start_prefetch(&self) -> Result<(), AttachError> {
        let mut slot = self.prefetcher.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() || self.shared.page_source().is_none() {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        let batch = self.options.prefetch_batch_pages.max(1);
        *slot = Some(
            std::thread::Builder::new()
                .name("uffd-prefetch".into())
                .spawn(move || shared.prefetch_all(batch))
                .map_err(AttachError::Spawn)?,
        );
        Ok(())
    }

    /// Fills `page` now from the attached source, from any thread (the vCPU
    /// thread uses this in SIGBUS mode on an exit at an unpopulated address).
    pub fn fill_page(&self, page: usize) -> Result<FillOutcome, FillError> {
        if page >= self.shared.pages {
            return Err(FillError::OutOfRange {
                page,
                pages: self.shared.pages,
            });
        }
        let source = self.shared.page_source().ok_or(FillError::NotAttached)?;
        let _serving = self
            .shared
            .serving
            .read()
            .unwrap_or_else(|e| e.into_inner());
        if self.shared.populated.get(page) {
            return Ok(FillOutcome::AlreadyPresent);
        }
        let mut bounce = Vec::new();
        let filled = self
            .shared
            .fill_range(source.as_ref(), page, 1, &mut bounce)?;
        Ok(if filled > 0 {
            FillOutcome::Filled
        } else {
            FillOutcome::AlreadyPresent
        })
    }

    /// Blocks page fills (faults, prefetch, `fill_page`) until the guard is
    /// dropped; waits for fills in progress to finish.
    pub fn quiesce(&self) -> QuiesceGuard<'_> {
        QuiesceGuard {
            _guard: self
                .shared
                .serving
                .write()
                .unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Pages brought into guest RAM so far (bit set right after the page is
    /// in place; exact while a [`QuiesceGuard`] is held). Pages whose bit is
    /// clear hold nothing the guest wrote.
    pub fn populated(&self) -> &Bitmap {
        &self.shared.populated
    }

    /// Pages written since the last [`LazyMemory::write_protect_all`]
    /// (write-protect mode only).
    pub fn dirty(&self) -> &Bitmap {
        &self.shared.dirty
    }

    /// Write-protects all of guest RAM and clears the dirty bitmap; later
    /// writes fault once per page, are recorded in [`LazyMemory::dirty`] and
    /// unprotected. Only pages present at this moment are protected (the
    /// kernel cannot protect missing anonymous pages; those fault as missing
    /// first and are filled writable).
    pub fn write_protect_all(&self) -> Result<(), FillError> {
        if !self.options.write_protect {
            return Err(FillError::Ioctl {
                op: "WRITEPROTECT",
                first: 0,
                end: self.shared.pages,
                errno: libc::EINVAL,
            });
        }
        self.shared.clear_dirty();
        self.shared
            .uffd
            .write_protect(self.shared.base as *mut _, self.shared.pages * PAGE_SIZE)
            .map_err(|e| FillError::Ioctl {
                op: "WRITEPROTECT",
                first: 0,
                end: self.shared.pages,
                errno: errno_of(&e),
            })
    }

    /// Pins the fault-serving thread to `cpu` (e.g. once the vCPU's CPU is
    /// known).
    pub fn pin_handler(&self, cpu: usize) -> io::Result<()> {
        let tid = self.wait_handler_tid();
        pin_thread(tid, cpu)
    }

    fn wait_handler_tid(&self) -> libc::pid_t {
        loop {
            let tid = self.shared.handler_tid.load(Ordering::Acquire);
            if tid != 0 {
                return tid;
            }
            std::thread::yield_now();
        }
    }

    /// The counters, the populated count and the latency histogram. A
    /// faulting thread is woken by the fill itself, a moment before the
    /// handler updates the bitmap and counters: for exact figures call
    /// [`LazyMemory::quiesce`] first (it waits for fills in flight).
    pub fn stats(&self) -> FaultStats {
        let c = &self.shared.counters;
        FaultStats {
            faults: c.faults.load(Ordering::Relaxed),
            pages_copied: c.pages_copied.load(Ordering::Relaxed),
            pages_zeroed: c.pages_zeroed.load(Ordering::Relaxed),
            bytes_copied: c.bytes_copied.load(Ordering::Relaxed),
            races: c.races.load(Ordering::Relaxed),
            prefetched_pages: c.prefetched_pages.load(Ordering::Relaxed),
            wp_faults: c.wp_faults.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            populated_pages: self.shared.populated.count_ones() as u64,
            latency: self.shared.latency.snapshot(),
        }
    }

    /// The most recent fill error, if any (the faulting thread of a failed
    /// fill stays blocked; the VMM should stop the VM).
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether every page has been populated (streaming complete).
    pub fn is_complete(&self) -> bool {
        self.shared.populated.next_clear(0).is_none()
    }

    /// Stops the handler and prefetch threads and waits for them. Also done
    /// on drop.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        signal_eventfd(self.shared.wake.as_raw_fd());
        if let Some(h) = self.handler.take() {
            // Either the handler sees `stop` before it blocks in `read`, or we
            // see `blocking` and wake it with a fault on the sentinel (SeqCst
            // on both sides). It zero-fills the sentinel on every exit path,
            // so this touch never waits for a handler that is gone.
            if self.shared.blocking.load(Ordering::SeqCst) {
                // SAFETY: the sentinel page is mapped readable for the life
                // of `shared`; the read is served by the handler.
                unsafe { (self.shared.sentinel.addr as *const u8).read_volatile() };
            }
            let _ = h.join();
        }
        let prefetcher = self
            .prefetcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = prefetcher {
            let _ = h.join();
        }
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.stop_threads();
    }
}
