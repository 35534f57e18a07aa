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

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{
    Event, EventBuffer, FaultKind, FeatureFlags, IoctlFlags, RegisterMode, Uffd, UffdBuilder,
};

use super::latency::{LatencyHistogram, LatencySnapshot};
use super::source::{PageSource, PageSourceError};
use super::{GuestRam, PAGE_SIZE};
use crate::image::{Bitmap, PageRuns};

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

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    pages_copied: AtomicU64,
    pages_zeroed: AtomicU64,
    bytes_copied: AtomicU64,
    races: AtomicU64,
    prefetched_pages: AtomicU64,
    wp_faults: AtomicU64,
    errors: AtomicU64,
}

/// How a run of missing pages is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FillKind {
    /// `UFFDIO_ZEROPAGE`.
    Zero,
    /// `UFFDIO_COPY` straight from the source's mapping; the value is the
    /// (virtual) mapping address of page 0, equal for contiguous pages.
    Mapped(usize),
    /// Read into the bounce buffer, then `UFFDIO_COPY`.
    Read,
}

/// What serves the missing pages.
enum Attached {
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

struct Shared {
    uffd: Uffd,
    base: usize,
    pages: usize,
    populated: Bitmap,
    dirty: Bitmap,
    attached: OnceLock<Attached>,
    serving: RwLock<()>,
    stop: AtomicBool,
    wake: OwnedFd,
    handler_tid: AtomicI32,
    /// Set by the handler once it blocks in `read` on the userfaultfd (no
    /// `poll` per fault); stopping it then takes a touch of `sentinel`.
    blocking: AtomicBool,
    sentinel: SentinelPage,
    sigbus: bool,
    counters: Counters,
    latency: LatencyHistogram,
    last_error: Mutex<Option<String>>,
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

fn errno_of(e: &userfaultfd::Error) -> i32 {
    match e {
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) => *n as i32,
        userfaultfd::Error::SystemError(n) => *n as i32,
        userfaultfd::Error::PartiallyCopied(_) => libc::EAGAIN,
        _ => libc::EIO,
    }
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

/// Pins thread `tid` (0: the calling thread) to `cpu`. Threads it starts
/// afterwards inherit the affinity.
pub fn pin_thread(tid: libc::pid_t, cpu: usize) -> io::Result<()> {
    pin_thread_to(tid, [cpu])
}

/// Lets thread `tid` (0: the calling thread) run on every online CPU again.
pub fn unpin_thread(tid: libc::pid_t) -> io::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    pin_thread_to(tid, 0..cpus)
}

/// Restricts thread `tid` (0: the calling thread) to `cpus`.
pub fn pin_thread_to(tid: libc::pid_t, cpus: impl IntoIterator<Item = usize>) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus {
        // SAFETY: CPU_SET writes one bit of the set we own (it bounds-checks cpu).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: passes a pointer to our set and its exact size.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn signal_eventfd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local u64 to an eventfd we own.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// One private anonymous page registered with the same userfaultfd as
/// guest RAM. A fault on it is how a handler blocked in `read` is told to
/// stop (the handler then zero-fills it, waking the stopper).
struct SentinelPage {
    addr: usize,
}

impl SentinelPage {
    fn map() -> io::Result<Self> {
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

impl Shared {
    fn page_source(&self) -> Option<&Arc<dyn PageSource>> {
        match self.attached.get() {
            Some(Attached::Source(source)) => Some(source),
            _ => None,
        }
    }

    fn addr(&self, page: usize) -> *mut libc::c_void {
        (self.base + page * PAGE_SIZE) as *mut libc::c_void
    }

    fn clear_dirty(&self) {
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

    fn record_error(&self, e: &FillError) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(error = %e, "serving a guest page fault failed");
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// Waits until the wake-up eventfd is signalled (attach or stop).
    fn wait_for_wakeup(&self) {
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
    fn release_sentinel(&self) {
        // SAFETY: the sentinel page is registered with our userfaultfd;
        // ZEROPAGE only installs a zero page where none is present.
        let _ = unsafe {
            self.uffd
                .zeropage(self.sentinel.addr as *mut libc::c_void, PAGE_SIZE, true)
        };
    }

    /// The fault-serving thread: wait for a source, then block in `read` on
    /// the userfaultfd and serve each batch of events, until a fault on the
    /// sentinel page (or `stop` before blocking) ends it.
    fn serve_faults(self: &Arc<Self>, cpu: Option<usize>, fault_around: usize) {
        struct ReleaseOnExit<'a>(&'a Shared);
        impl Drop for ReleaseOnExit<'_> {
            fn drop(&mut self) {
                self.0.release_sentinel();
            }
        }
        let _release = ReleaseOnExit(self);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.handler_tid.store(tid, Ordering::Release);
        if let Some(cpu) = cpu
            && let Err(e) = pin_thread(0, cpu)
        {
            tracing::warn!(cpu, error = %e, "cannot pin the userfaultfd handler");
        }
        while self.attached.get().is_none() || self.sigbus {
            // In SIGBUS mode faults never reach us: just wait for stop.
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            self.wait_for_wakeup();
        }
        // Attached: switch the descriptor to blocking reads, which saves a
        // poll per fault. Stopping now needs a sentinel fault.
        let fd = self.uffd.as_raw_fd();
        // SAFETY: fcntl on our own descriptor; only O_NONBLOCK changes.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) & !libc::O_NONBLOCK,
            )
        };
        self.blocking.store(true, Ordering::SeqCst);
        if self.stop.load(Ordering::SeqCst) {
            return;
        }
        let mut events = EventBuffer::new(64);
        let mut bounce = vec![0u8; fault_around * PAGE_SIZE];
        loop {
            match self.serve_events(&mut events, &mut bounce, fault_around) {
                Ok(false) => {}
                Ok(true) => return,
                Err(e) if errno_of(&e) == libc::EINTR => {}
                Err(e) => {
                    tracing::error!(error = %e, "reading userfaultfd events failed");
                    return;
                }
            }
        }
    }

    /// Reads one batch of events (blocking) and serves it. Returns whether
    /// the sentinel was touched (stop).
    fn serve_events(
        self: &Arc<Self>,
        events: &mut EventBuffer,
        bounce: &mut Vec<u8>,
        fault_around: usize,
    ) -> Result<bool, userfaultfd::Error> {
        let batch = self.uffd.read_events(events)?;
        let start = Instant::now();
        let Some(attached) = self.attached.get() else {
            return Ok(false);
        };
        // A hook installs through a `PageInstaller`, which takes the lock
        // itself (a nested read lock could deadlock behind a writer).
        let _serving = match attached {
            Attached::Source(_) => Some(self.serving.read().unwrap_or_else(|e| e.into_inner())),
            Attached::Hook(_) => None,
        };
        let mut stop = false;
        for event in batch {
            let Ok(Event::Pagefault { kind, addr, .. }) = event else {
                continue;
            };
            let addr = addr as usize;
            if addr & !(PAGE_SIZE - 1) == self.sentinel.addr {
                stop = true;
                continue;
            }
            if addr < self.base || addr >= self.base + self.pages * PAGE_SIZE {
                continue;
            }
            let page = (addr - self.base) / PAGE_SIZE;
            match kind {
                FaultKind::Missing => {
                    self.counters.faults.fetch_add(1, Ordering::Relaxed);
                    let source = match attached {
                        Attached::Source(source) => source,
                        Attached::Hook(hook) => {
                            if self.populated.get(page) {
                                self.counters.races.fetch_add(1, Ordering::Relaxed);
                                let _ = self.uffd.wake(self.addr(page), PAGE_SIZE);
                            } else {
                                hook.missing(page, &PageInstaller(Arc::clone(self)));
                            }
                            self.latency.record(start.elapsed());
                            continue;
                        }
                    };
                    let count = fault_around.min(self.pages - page);
                    match self.fill_range(source.as_ref(), page, count, bounce) {
                        Ok(0) => {
                            // Already present (filled by a concurrent fill):
                            // make sure the faulting thread is woken.
                            self.counters.races.fetch_add(1, Ordering::Relaxed);
                            let _ = self.uffd.wake(self.addr(page), PAGE_SIZE);
                        }
                        Ok(_) => {}
                        Err(e) => self.record_error(&e),
                    }
                    self.latency.record(start.elapsed());
                }
                FaultKind::WriteProtected => {
                    self.counters.wp_faults.fetch_add(1, Ordering::Relaxed);
                    self.dirty.set(page);
                    if let Err(e) =
                        self.uffd
                            .remove_write_protection(self.addr(page), PAGE_SIZE, true)
                    {
                        self.record_error(&FillError::Ioctl {
                            op: "WRITEPROTECT",
                            first: page,
                            end: page + 1,
                            errno: errno_of(&e),
                        });
                    }
                }
            }
        }
        Ok(stop)
    }

    /// Background prefetch: fill every unpopulated page, batch by batch.
    fn prefetch_all(&self, batch: usize) {
        let Some(source) = self.page_source() else {
            return;
        };
        let mut bounce = vec![0u8; batch * PAGE_SIZE];
        let mut page = 0;
        while let Some(first) = self.populated.next_clear(page) {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let count = batch.min(self.pages - first);
            let filled = {
                let _serving = self.serving.read().unwrap_or_else(|e| e.into_inner());
                self.fill_range(source.as_ref(), first, count, &mut bounce)
            };
            match filled {
                Ok(n) => {
                    self.counters
                        .prefetched_pages
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.record_error(&e);
                    return;
                }
            }
            page = first + count;
        }
    }

    /// Fills the unpopulated pages of `first..first + count`, grouping
    /// consecutive pages of the same kind into one ioctl. Returns the number
    /// of pages this call filled. The caller holds the `serving` read lock.
    fn fill_range(
        &self,
        source: &dyn PageSource,
        first: usize,
        count: usize,
        bounce: &mut Vec<u8>,
    ) -> Result<usize, FillError> {
        // Missing pages grouped by how they are filled: zero, copied from
        // one contiguous stretch of a source mapping (key: the mapping
        // address of page 0), or read through the bounce buffer.
        let key = |page: usize| {
            if self.populated.get(page) {
                None
            } else if source.is_zero(page) {
                Some(FillKind::Zero)
            } else if let Some(ptr) = source.mapped_page(page) {
                Some(FillKind::Mapped(
                    (ptr as usize).wrapping_sub(page * PAGE_SIZE),
                ))
            } else {
                Some(FillKind::Read)
            }
        };
        let mut filled = 0;
        for (start, end, kind) in PageRuns::new(first, first + count, key) {
            filled += match kind {
                FillKind::Zero => self.zero_run(start, end)?,
                FillKind::Mapped(origin) => {
                    let src = origin.wrapping_add(start * PAGE_SIZE) as *const u8;
                    self.copy_run(source, Some(src), start, end, bounce)?
                }
                FillKind::Read => self.copy_run(source, None, start, end, bounce)?,
            };
        }
        Ok(filled)
    }

    fn mark_filled(&self, first: usize, end: usize) {
        for page in first..end {
            self.populated.set(page);
        }
    }

    fn zero_run(&self, first: usize, end: usize) -> Result<usize, FillError> {
        let len = (end - first) * PAGE_SIZE;
        // SAFETY: the destination lies inside the registered guest RAM range;
        // UFFDIO_ZEROPAGE only installs zero pages where none are present.
        match unsafe { self.uffd.zeropage(self.addr(first), len, true) } {
            Ok(n) if n == len => {
                self.mark_filled(first, end);
                self.counters
                    .pages_zeroed
                    .fetch_add((end - first) as u64, Ordering::Relaxed);
                Ok(end - first)
            }
            // Partly done or a page already present: go page by page.
            Ok(_) | Err(_) if end - first > 1 => {
                let mut n = 0;
                for page in first..end {
                    n += self.zero_run(page, page + 1)?;
                }
                Ok(n)
            }
            Ok(_) => self.single_page_failed("ZEROPAGE", first, libc::EAGAIN),
            Err(e) => self.single_page_failed("ZEROPAGE", first, errno_of(&e)),
        }
    }

    fn copy_run(
        &self,
        source: &dyn PageSource,
        mapped: Option<*const u8>,
        first: usize,
        end: usize,
        bounce: &mut Vec<u8>,
    ) -> Result<usize, FillError> {
        let len = (end - first) * PAGE_SIZE;
        let src: &[u8] = match mapped {
            // SAFETY: a source mapping is valid for the pages it holds and
            // lives as long as the source, which outlives this call.
            Some(src) => unsafe { std::slice::from_raw_parts(src, len) },
            None => {
                if bounce.len() < len {
                    bounce.resize(len, 0);
                }
                source.read_pages(first, end - first, &mut bounce[..len])?;
                &bounce[..len]
            }
        };
        self.install_run(src, first, end)
    }

    /// `UFFDIO_COPY` of `src` into `first..end`; pages found present are
    /// skipped. Returns how many this call installed.
    fn install_run(&self, src: &[u8], first: usize, end: usize) -> Result<usize, FillError> {
        let len = (end - first) * PAGE_SIZE;
        debug_assert_eq!(src.len(), len);
        // SAFETY: `src` is valid for `len` bytes (the caller's slice); the
        // destination lies inside the registered guest RAM range and
        // UFFDIO_COPY only fills pages that are missing.
        let result = unsafe {
            self.uffd
                .copy(src.as_ptr().cast(), self.addr(first), len, true)
        };
        let done = match result {
            Ok(n) if n == len => {
                self.mark_filled(first, end);
                self.count_copied(end - first);
                return Ok(end - first);
            }
            Ok(n) | Err(userfaultfd::Error::PartiallyCopied(n)) => n / PAGE_SIZE,
            Err(e) if end - first == 1 => {
                return self.single_page_failed("COPY", first, errno_of(&e));
            }
            Err(_) => 0,
        };
        if end - first == 1 && done == 0 {
            return self.single_page_failed("COPY", first, libc::EAGAIN);
        }
        self.mark_filled(first, first + done);
        self.count_copied(done);
        let mut n = done;
        for page in first + done..end {
            let at = (page - first) * PAGE_SIZE;
            n += self.install_run(&src[at..at + PAGE_SIZE], page, page + 1)?;
        }
        Ok(n)
    }

    fn count_copied(&self, pages: usize) {
        self.counters
            .pages_copied
            .fetch_add(pages as u64, Ordering::Relaxed);
        self.counters
            .bytes_copied
            .fetch_add((pages * PAGE_SIZE) as u64, Ordering::Relaxed);
    }

    /// A one-page fill failed with `errno`: EEXIST means someone else filled
    /// it (count a race, wake waiters, report 0 pages filled); EAGAIN means
    /// the address space was changing (retry once); anything else is an
    /// error.
    fn single_page_failed(
        &self,
        op: &'static str,
        page: usize,
        errno: i32,
    ) -> Result<usize, FillError> {
        match errno {
            libc::EEXIST => {
                self.populated.set(page);
                self.counters.races.fetch_add(1, Ordering::Relaxed);
                let _ = self.uffd.wake(self.addr(page), PAGE_SIZE);
                Ok(0)
            }
            _ => Err(FillError::Ioctl {
                op,
                first: page,
                end: page + 1,
                errno,
            }),
        }
    }
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
pub struct PageInstaller(Arc<Shared>);

impl std::fmt::Debug for PageInstaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageInstaller")
            .field("pages", &self.0.pages)
            .finish()
    }
}

impl PageInstaller {
    /// Number of guest pages.
    pub fn pages(&self) -> usize {
        self.0.pages
    }

    fn check(&self, first: usize, count: usize) -> Result<(), FillError> {
        match first.checked_add(count) {
            Some(end) if end <= self.0.pages => Ok(()),
            _ => Err(FillError::OutOfRange {
                page: first.saturating_add(count).saturating_sub(1),
                pages: self.0.pages,
            }),
        }
    }

    /// Installs `data` (whole pages) at `first..`; pages already present
    /// are left as they are. Returns how many pages this call installed.
    pub fn install(&self, first: usize, data: &[u8]) -> Result<usize, FillError> {
        assert!(
            data.len().is_multiple_of(PAGE_SIZE),
            "install takes whole pages"
        );
        let count = data.len() / PAGE_SIZE;
        self.check(first, count)?;
        let _serving = self.0.serving.read().unwrap_or_else(|e| e.into_inner());
        let mut installed = 0;
        let mut page = first;
        // Runs of pages not yet populated go in one ioctl each.
        while page < first + count {
            if self.0.populated.get(page) {
                page += 1;
                continue;
            }
            let mut end = page + 1;
            while end < first + count && !self.0.populated.get(end) {
                end += 1;
            }
            let src = &data[(page - first) * PAGE_SIZE..(end - first) * PAGE_SIZE];
            installed += self.0.install_run(src, page, end)?;
            page = end;
        }
        Ok(installed)
    }

    /// Installs zero pages at `first..first + count` where none is present.
    /// Returns how many pages this call installed.
    pub fn install_zero(&self, first: usize, count: usize) -> Result<usize, FillError> {
        self.check(first, count)?;
        let _serving = self.0.serving.read().unwrap_or_else(|e| e.into_inner());
        let mut installed = 0;
        let mut page = first;
        while page < first + count {
            if self.0.populated.get(page) {
                page += 1;
                continue;
            }
            let mut end = page + 1;
            while end < first + count && !self.0.populated.get(end) {
                end += 1;
            }
            installed += self.0.zero_run(page, end)?;
            page = end;
        }
        Ok(installed)
    }

    /// Whether `page` is installed.
    pub fn is_installed(&self, page: usize) -> bool {
        self.0.populated.get(page)
    }

    /// The installed pages.
    pub fn installed(&self) -> &Bitmap {
        &self.0.populated
    }

    /// Makes an installed page missing again (`MADV_DONTNEED`): its next
    /// touch faults. Returns whether it was installed. Only while no vCPU
    /// runs (a running guest would see the page vanish).
    pub fn discard(&self, page: usize) -> Result<bool, FillError> {
        self.check(page, 1)?;
        let _serving = self.0.serving.read().unwrap_or_else(|e| e.into_inner());
        if !self.0.populated.clear(page) {
            return Ok(false);
        }
        // SAFETY: one page inside the registered guest RAM; MADV_DONTNEED
        // drops its contents, the next access faults to our userfaultfd.
        let rc = unsafe { libc::madvise(self.0.addr(page), PAGE_SIZE, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(FillError::Ioctl {
                op: "DONTNEED (madvise)",
                first: page,
                end: page + 1,
                errno: io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            });
        }
        Ok(true)
    }

    /// Host address of `page` (for writing an installed page in place while
    /// no vCPU runs).
    pub fn page_ptr(&self, page: usize) -> *mut u8 {
        assert!(page < self.0.pages, "page {page} outside guest RAM");
        self.0.addr(page).cast()
    }

    /// Wakes threads waiting on `page` (after it was installed by a path
    /// that did not wake them).
    pub fn wake(&self, page: usize) {
        if page < self.0.pages {
            let _ = self.0.uffd.wake(self.0.addr(page), PAGE_SIZE);
        }
    }
}
