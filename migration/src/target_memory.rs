//! The migration target's guest memory: guest RAM registered with its own
//! userfaultfd (MISSING mode) and a fault-serving thread. Every page is
//! installed exactly once, by whichever comes first: a page pushed by the
//! source, the answer to a fault request, or the local live image (pages the
//! source reported identical to it). `UFFDIO_COPY` refuses a page that is
//! already present (EEXIST), so a page pushed while a fault for it is in
//! flight is installed once and the later copy is dropped; both copies come
//! from the paused source and are identical anyway.
//!
//! ```text
//! page state:  Unknown ──Candidates──► Source ──(push | fault answer)──► installed
//!                 │                      └──Clean/Zero──► Image ──fault──► installed
//!                 └──Candidates(last)──► Image
//! fault on a page: installed → wake; Image → copy from the image now;
//!                  Unknown/Source → FaultRequest to the source (once), wait.
//! ```
//!
//! Before the switch-over (precopy) the VM does not run, so pages sent again
//! are written in place over the installed copy.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{Event, EventBuffer, FaultKind, IoctlFlags, Uffd, UffdBuilder};
use vmstream_vmm::image::Bitmap;
use vmstream_vmm::memory::{GuestRam, PAGE_SIZE, PageSource};

use crate::wire::{Command, Header, write_frame};

const UNKNOWN: u8 = 0;
const SOURCE: u8 = 1;
const IMAGE: u8 = 2;

/// Pages filled around a faulting page that the image provides.
const IMAGE_FAULT_AROUND: usize = 16;

/// Why the target's memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TargetMemoryError {
    #[error("cannot create a userfaultfd for guest RAM")]
    Create(#[source] userfaultfd::Error),
    #[error("cannot register guest RAM {addr:#x}+{len:#x} with userfaultfd")]
    Register {
        addr: usize,
        len: usize,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("the kernel does not offer UFFDIO_COPY/ZEROPAGE/WAKE on guest RAM")]
    MissingIoctl,
    #[error("the image has {image} pages, guest RAM {ram}")]
    ImageSize { image: usize, ram: usize },
    #[error("cannot create the handler's eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot start the fault handler thread")]
    Spawn(#[source] io::Error),
}

/// Why pages could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("pages {first}..{end} are outside guest RAM ({pages} pages)")]
    OutOfRange {
        first: usize,
        end: usize,
        pages: usize,
    },
    #[error("UFFDIO_{op} of pages {first}..{end} failed: {}", io::Error::from_raw_os_error(*errno))]
    Ioctl {
        op: &'static str,
        first: usize,
        end: usize,
        errno: i32,
    },
    #[error("cannot read page {page} from the live image")]
    Image {
        page: usize,
        #[source]
        source: vmstream_vmm::memory::PageSourceError,
    },
}

/// Counters of the target's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetMemoryStats {
    /// Missing-page faults read by the handler.
    pub faults: u64,
    /// Pages requested from the source because of a fault.
    pub pages_requested: u64,
    /// Total time faulting threads waited for requested or image pages.
    pub fault_wait_ns: u64,
    /// Longest single fault wait.
    pub max_fault_wait_ns: u64,
    /// Pages installed from received data.
    pub pages_received: u64,
    /// Received pages dropped because the page was already installed.
    pub duplicates: u64,
    /// Pages installed from the live image (or as zero pages).
    pub pages_from_image: u64,
    /// Fills that failed.
    pub errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    faults: AtomicU64,
    pages_requested: AtomicU64,
    fault_wait_ns: AtomicU64,
    max_fault_wait_ns: AtomicU64,
    pages_received: AtomicU64,
    duplicates: AtomicU64,
    pages_from_image: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    uffd: Uffd,
    base: usize,
    pages: usize,
    installed: Bitmap,
    requested: Bitmap,
    state: Box<[AtomicU8]>,
    image: Option<Arc<dyn PageSource>>,
    /// Faulted pages not yet installed, with the time of the fault.
    waiting: Mutex<HashMap<usize, Instant>>,
    waiting_count: AtomicU64,
    fault_link: Mutex<Option<TcpStream>>,
    all_sent: AtomicBool,
    running: AtomicBool,
    stop: AtomicBool,
    wake: OwnedFd,
    counters: Counters,
}

/// Guest RAM of a migration target; see the module documentation.
pub struct TargetMemory {
    shared: Arc<Shared>,
    handler: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for TargetMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetMemory")
            .field("pages", &self.shared.pages)
            .field("stats", &self.stats())
            .finish()
    }
}

fn errno_of(e: &userfaultfd::Error) -> i32 {
    match e {
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) => *n as i32,
        userfaultfd::Error::SystemError(n) => *n as i32,
        userfaultfd::Error::PartiallyCopied(_) => libc::EAGAIN,
        _ => libc::EIO,
    }
}

impl TargetMemory {
    /// Registers `ram` with a new userfaultfd and starts the fault handler.
    /// `image` provides pages the source reports identical to the live
    /// image (none: such pages are zero).
    pub fn register(
        ram: &GuestRam,
        image: Option<Arc<dyn PageSource>>,
    ) -> Result<Self, TargetMemoryError> {
        if let Some(image) = &image
            && image.pages() != ram.pages()
        {
            return Err(TargetMemoryError::ImageSize {
                image: image.pages(),
                ram: ram.pages(),
            });
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(TargetMemoryError::Create)?;
        let ioctls = uffd
            .register(ram.host_addr().cast(), ram.len())
            .map_err(|source| TargetMemoryError::Register {
                addr: ram.host_addr() as usize,
                len: ram.len(),
                source,
            })?;
        if !ioctls.contains(IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE) {
            return Err(TargetMemoryError::MissingIoctl);
        }
        // SAFETY: eventfd creates a new descriptor; checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(TargetMemoryError::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: efd is a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let pages = ram.pages();
        let shared = Arc::new(Shared {
            uffd,
            base: ram.host_addr() as usize,
            pages,
            installed: Bitmap::new(pages),
            requested: Bitmap::new(pages),
            state: (0..pages).map(|_| AtomicU8::new(UNKNOWN)).collect(),
            image,
            waiting: Mutex::new(HashMap::new()),
            waiting_count: AtomicU64::new(0),
            fault_link: Mutex::new(None),
            all_sent: AtomicBool::new(false),
            running: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wake,
            counters: Counters::default(),
        });
        let thread_shared = Arc::clone(&shared);
        let handler = std::thread::Builder::new()
            .name("migrate-faults".into())
            .spawn(move || thread_shared.serve_faults())
            .map_err(TargetMemoryError::Spawn)?;
        Ok(Self {
            shared,
            handler: Mutex::new(Some(handler)),
        })
    }

    /// Number of guest pages.
    pub fn pages(&self) -> usize {
        self.shared.pages
    }

    /// The VM runs from now on: received pages may no longer overwrite.
    pub fn set_running(&self) {
        self.shared.running.store(true, Ordering::SeqCst);
    }

    /// Where fault requests go (None while the link is down).
    pub fn set_fault_link(&self, link: Option<TcpStream>) {
        *self
            .shared
            .fault_link
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = link;
    }

    /// Sends a Ping on the fault connection (keeps the source's liveness
    /// check quiet while no faults happen).
    pub fn ping_fault_link(&self) {
        let mut link = self
            .shared
            .fault_link
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = link.as_mut()
            && write_frame(stream, &Header::new(Command::Ping), &[]).is_err()
        {
            *link = None;
        }
    }

    /// Installs received pages `first..first + data.len() / PAGE_SIZE`.
    /// Pages already installed are dropped (counted as duplicates), except
    /// `precopy` pages before the VM runs, which overwrite the older copy.
    pub fn install_pages(
        &self,
        first: usize,
        data: &[u8],
        precopy: bool,
    ) -> Result<(), InstallError> {
        let count = data.len() / PAGE_SIZE;
        self.shared.check_range(first, count)?;
        let overwrite = precopy && !self.shared.running.load(Ordering::SeqCst);
        let mut page = first;
        while page < first + count {
            let installed = self.shared.installed.get(page);
            let mut end = page + 1;
            while end < first + count && self.shared.installed.get(end) == installed {
                end += 1;
            }
            let src = &data[(page - first) * PAGE_SIZE..(end - first) * PAGE_SIZE];
            if installed {
                if overwrite {
                    // SAFETY: the destination pages are present (installed)
                    // inside guest RAM and the VM is not running, so nothing
                    // else reads or writes them; the source is our buffer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            self.shared.addr(page).cast::<u8>(),
                            src.len(),
                        )
                    };
                } else {
                    self.shared
                        .counters
                        .duplicates
                        .fetch_add((end - page) as u64, Ordering::Relaxed);
                }
            } else {
                let n = self.shared.copy_run(src, page, end)?;
                self.shared
                    .counters
                    .pages_received
                    .fetch_add(n as u64, Ordering::Relaxed);
                self.shared
                    .counters
                    .duplicates
                    .fetch_add((end - page - n) as u64, Ordering::Relaxed);
            }
            page = end;
        }
        Ok(())
    }

    /// Pages `first..first + count` are identical to the image (or zero
    /// without one): install the missing ones from there now.
    pub fn install_from_image(&self, first: usize, count: usize) -> Result<(), InstallError> {
        self.shared.check_range(first, count)?;
        let running = self.shared.running.load(Ordering::SeqCst);
        let mut bounce = vec![0u8; PAGE_SIZE];
        for page in first..first + count {
            self.shared.state[page].store(IMAGE, Ordering::SeqCst);
            if !running && self.shared.installed.get(page) {
                // Precopy: an older copy sent earlier is replaced.
                match &self.shared.image {
                    Some(image) if !image.is_zero(page) => {
                        image
                            .read_pages(page, 1, &mut bounce)
                            .map_err(|source| InstallError::Image { page, source })?
                    }
                    _ => bounce.fill(0),
                }
                // SAFETY: an installed page of guest RAM while the VM does
                // not run: nothing else touches it; the source is our buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bounce.as_ptr(),
                        self.shared.addr(page).cast::<u8>(),
                        PAGE_SIZE,
                    )
                };
            }
        }
        self.shared.fill_from_image(first, count)
    }

    /// Pages `first..first + count` are zero (a source without an image):
    /// install the missing ones as zero pages.
    pub fn install_zero(&self, first: usize, count: usize) -> Result<(), InstallError> {
        self.shared.check_range(first, count)?;
        for page in first..first + count {
            if !self.shared.installed.get(page) {
                let n = self.shared.zero_page(page)?;
                self.shared
                    .counters
                    .pages_received
                    .fetch_add(n as u64, Ordering::Relaxed);
            } else if self.shared.running.load(Ordering::SeqCst) {
                self.shared
                    .counters
                    .duplicates
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                // SAFETY: an installed page of guest RAM while the VM does
                // not run (precopy): nothing else touches it.
                unsafe { std::ptr::write_bytes(self.shared.addr(page).cast::<u8>(), 0, PAGE_SIZE) };
            }
        }
        Ok(())
    }

    /// Marks the pages of a sparse bitmap as coming from the source.
    pub fn mark_candidates(&self, words: &[(usize, u64)]) {
        for &(index, word) in words {
            let mut bits = word;
            while bits != 0 {
                let page = index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if page < self.shared.pages {
                    let _ = self.shared.state[page].compare_exchange(
                        UNKNOWN,
                        SOURCE,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
            }
        }
    }

    /// The candidate set is complete: every page not in it comes from the
    /// image. Faults already waiting on such pages are served now.
    pub fn finish_candidates(&self) -> Result<(), InstallError> {
        for s in self.shared.state.iter() {
            let _ = s.compare_exchange(UNKNOWN, IMAGE, Ordering::SeqCst, Ordering::SeqCst);
        }
        self.serve_waiting_from_image()
    }

    /// The source sent every candidate page on the bulk connection.
    /// Returns the source pages not installed yet, split into those a fault
    /// answer is still expected for (requested) and those that should have
    /// arrived (not requested: 0 unless the protocol was broken).
    pub fn missing_source_pages(&self) -> (usize, usize) {
        self.shared.all_sent.store(true, Ordering::SeqCst);
        let mut requested = 0;
        let mut lost = 0;
        for p in 0..self.shared.pages {
            if self.shared.state[p].load(Ordering::SeqCst) == SOURCE
                && !self.shared.installed.get(p)
            {
                if self.shared.requested.get(p) {
                    requested += 1;
                } else {
                    lost += 1;
                }
            }
        }
        (requested, lost)
    }

    fn serve_waiting_from_image(&self) -> Result<(), InstallError> {
        let waiting: Vec<usize> = self
            .shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        for page in waiting {
            if self.shared.state[page].load(Ordering::SeqCst) == IMAGE {
                self.shared.fill_from_image(page, 1)?;
            }
        }
        Ok(())
    }

    /// Drops the installed copies of the pages of a sparse bitmap (hybrid:
    /// written on the source after they were sent); they come from the
    /// source again. Only before the VM runs.
    pub fn invalidate(&self, words: &[(usize, u64)]) -> io::Result<usize> {
        let mut dropped = 0;
        for &(index, word) in words {
            let mut bits = word;
            while bits != 0 {
                let page = index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if page >= self.shared.pages {
                    continue;
                }
                self.shared.state[page].store(SOURCE, Ordering::SeqCst);
                if self.shared.installed.clear(page) {
                    // SAFETY: one page inside guest RAM that the VM does not
                    // use yet; MADV_DONTNEED makes it missing again, so the
                    // next access faults to our userfaultfd.
                    let rc = unsafe {
                        libc::madvise(self.shared.addr(page), PAGE_SIZE, libc::MADV_DONTNEED)
                    };
                    if rc != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    dropped += 1;
                }
            }
        }
        Ok(dropped)
    }

    /// Faulted pages still waiting for the source (re-requested after a
    /// reconnection: their requests may have been lost).
    pub fn rerequest_waiting(&self) {
        let waiting: Vec<usize> = self
            .shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        for page in waiting {
            if !self.shared.installed.get(page) {
                self.shared.requested.clear(page);
                self.shared.request(page);
            }
        }
    }

    /// Pages whose final content is known here: installed, or to be taken
    /// from the image. Word bitmap (for the source after a reconnection).
    pub fn resolved_words(&self) -> Vec<u64> {
        let mut words = vec![0u64; self.shared.pages.div_ceil(64)];
        for (page, state) in self.shared.state.iter().enumerate() {
            if self.shared.installed.get(page) || state.load(Ordering::SeqCst) == IMAGE {
                words[page / 64] |= 1 << (page % 64);
            }
        }
        words
    }

    /// Whether `page` is installed.
    pub fn is_installed(&self, page: usize) -> bool {
        self.shared.installed.get(page)
    }

    /// Installed page count.
    pub fn installed_pages(&self) -> usize {
        self.shared.installed.count_ones()
    }

    /// Counters.
    pub fn stats(&self) -> TargetMemoryStats {
        let c = &self.shared.counters;
        TargetMemoryStats {
            faults: c.faults.load(Ordering::Relaxed),
            pages_requested: c.pages_requested.load(Ordering::Relaxed),
            fault_wait_ns: c.fault_wait_ns.load(Ordering::Relaxed),
            max_fault_wait_ns: c.max_fault_wait_ns.load(Ordering::Relaxed),
            pages_received: c.pages_received.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            pages_from_image: c.pages_from_image.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// Stops the fault handler (vCPUs must be stopped first).
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64 to our eventfd.
        unsafe { libc::write(self.shared.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        let handler = self
            .handler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handler {
            let _ = h.join();
        }
    }
}

impl Drop for TargetMemory {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    fn addr(&self, page: usize) -> *mut libc::c_void {
        (self.base + page * PAGE_SIZE) as *mut libc::c_void
    }

    fn check_range(&self, first: usize, count: usize) -> Result<(), InstallError> {
        if first.checked_add(count).is_none_or(|end| end > self.pages) {
            return Err(InstallError::OutOfRange {
                first,
                end: first.saturating_add(count),
                pages: self.pages,
            });
        }
        Ok(())
    }

    /// Marks pages installed and settles the faults waiting on them.
    fn mark_installed(&self, first: usize, end: usize) {
        for page in first..end {
            self.installed.set(page);
        }
        if self.waiting_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        for page in first..end {
            if let Some(since) = waiting.remove(&page) {
                self.waiting_count.fetch_sub(1, Ordering::SeqCst);
                let ns = since.elapsed().as_nanos() as u64;
                self.counters.fault_wait_ns.fetch_add(ns, Ordering::Relaxed);
                self.counters
                    .max_fault_wait_ns
                    .fetch_max(ns, Ordering::Relaxed);
            }
        }
    }

    /// `UFFDIO_COPY` of `src` into missing pages `first..end`; returns how
    /// many this call installed (pages found present are skipped).
    fn copy_run(&self, src: &[u8], first: usize, end: usize) -> Result<usize, InstallError> {
        let len = (end - first) * PAGE_SIZE;
        // SAFETY: `src` is valid for `len` bytes; the destination lies in the
        // registered guest RAM; UFFDIO_COPY only fills missing pages.
        let result = unsafe {
            self.uffd
                .copy(src.as_ptr().cast(), self.addr(first), len, true)
        };
        match result {
            Ok(n) if n == len => {
                self.mark_installed(first, end);
                return Ok(end - first);
            }
            Err(e) if end - first == 1 => {
                return match errno_of(&e) {
                    libc::EEXIST => {
                        self.installed.set(first);
                        let _ = self.uffd.wake(self.addr(first), PAGE_SIZE);
                        Ok(0)
                    }
                    errno => {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        Err(InstallError::Ioctl {
                            op: "COPY",
                            first,
                            end,
                            errno,
                        })
                    }
                };
            }
            _ => {}
        }
        // Partly done or a page already present: page by page.
        let mut n = 0;
        for page in first..end {
            if self.installed.get(page) {
                continue;
            }
            let at = (page - first) * PAGE_SIZE;
            n += self.copy_run(&src[at..at + PAGE_SIZE], page, page + 1)?;
        }
        Ok(n)
    }

    fn zero_page(&self, page: usize) -> Result<usize, InstallError> {
        // SAFETY: one page inside the registered guest RAM; ZEROPAGE only
        // installs a zero page where none is present.
        match unsafe { self.uffd.zeropage(self.addr(page), PAGE_SIZE, true) } {
            Ok(_) => {
                self.mark_installed(page, page + 1);
                Ok(1)
            }
            Err(e) if errno_of(&e) == libc::EEXIST => {
                self.installed.set(page);
                let _ = self.uffd.wake(self.addr(page), PAGE_SIZE);
                Ok(0)
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                Err(InstallError::Ioctl {
                    op: "ZEROPAGE",
                    first: page,
                    end: page + 1,
                    errno: errno_of(&e),
                })
            }
        }
    }

    /// Installs missing pages of `first..first + count` from the image.
    fn fill_from_image(&self, first: usize, count: usize) -> Result<(), InstallError> {
        let mut bounce = Vec::new();
        for page in first..first + count {
            if self.installed.get(page) {
                continue;
            }
            let n = match &self.image {
                Some(image) if !image.is_zero(page) => match image.mapped_page(page) {
                    Some(ptr) => {
                        // SAFETY: the image mapping stays valid and
                        // unchanged while the image source lives (trait
                        // contract), one page long.
                        let src = unsafe { std::slice::from_raw_parts(ptr, PAGE_SIZE) };
                        self.copy_run(src, page, page + 1)?
                    }
                    None => {
                        bounce.resize(PAGE_SIZE, 0);
                        image
                            .read_pages(page, 1, &mut bounce)
                            .map_err(|source| InstallError::Image { page, source })?;
                        self.copy_run(&bounce, page, page + 1)?
                    }
                },
                _ => self.zero_page(page)?,
            };
            self.counters
                .pages_from_image
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sends a fault request for `page` unless one is outstanding.
    fn request(&self, page: usize) {
        if self.requested.set(page) {
            return;
        }
        self.counters
            .pages_requested
            .fetch_add(1, Ordering::Relaxed);
        let mut link = self.fault_link.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stream) = link.as_mut() {
            let header = Header::new(Command::FaultRequest).range(page as u64, 1);
            if write_frame(stream, &header, &[])
                .and_then(|()| stream.flush())
                .is_err()
            {
                // Resent by `rerequest_waiting` once the link is back.
                *link = None;
            }
        }
    }

    fn on_fault(&self, page: usize, at: Instant) {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        if self.installed.get(page) {
            let _ = self.uffd.wake(self.addr(page), PAGE_SIZE);
            return;
        }
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.insert(page, at).is_none() {
                self.waiting_count.fetch_add(1, Ordering::SeqCst);
            }
        }
        // Installed between the check and the insert: settle it now.
        if self.installed.get(page) {
            self.mark_installed(page, page + 1);
            let _ = self.uffd.wake(self.addr(page), PAGE_SIZE);
            return;
        }
        // Only pages known to be the image's: a source page whose answer is
        // still on its way (the fault connection is not ordered with the
        // bulk one) must wait for it, even after Done.
        let from_image = self.state[page].load(Ordering::SeqCst) == IMAGE;
        if from_image {
            let mut end = page + 1;
            while end < self.pages
                && end - page < IMAGE_FAULT_AROUND
                && self.state[end].load(Ordering::SeqCst) == IMAGE
                && !self.installed.get(end)
            {
                end += 1;
            }
            if let Err(e) = self.fill_from_image(page, end - page) {
                tracing::error!(error = %e, page, "serving a fault from the image failed");
            }
        } else {
            self.request(page);
        }
    }

    fn serve_faults(&self) {
        let mut events = EventBuffer::new(64);
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two initialised pollfds.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if rc <= 0 {
                continue;
            }
            let batch = match self.uffd.read_events(&mut events) {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %e, "reading userfaultfd events failed");
                    return;
                }
            };
            let at = Instant::now();
            let pages: Vec<usize> = batch
                .filter_map(|event| match event {
                    Ok(Event::Pagefault {
                        kind: FaultKind::Missing,
                        addr,
                        ..
                    }) => {
                        let addr = addr as usize;
                        (addr >= self.base && addr < self.base + self.pages * PAGE_SIZE)
                            .then(|| (addr - self.base) / PAGE_SIZE)
                    }
                    _ => None,
                })
                .collect();
            for page in pages {
                self.on_fault(page, at);
            }
        }
    }
}
