//! The migration target's guest memory: the VM shell's userfaultfd
//! registration (`vmstream_vmm::memory::LazyMemory`) with this module as its
//! [`MissingPageHook`]: the VMM's handler thread reports a missing page and
//! goes on; the page is installed through a `PageInstaller` by whichever
//! path has it. Every page is
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
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmstream_vmm::memory::{
    AttachError, FillError, LazyMemory, MissingPageHook, PAGE_SIZE, PageInstaller, PageSource,
};

use crate::wire::{Command, Header, write_frame};

const UNKNOWN: u8 = 0;
const SOURCE: u8 = 1;
const IMAGE: u8 = 2;

/// Pages filled around a faulting page that the image provides.
const IMAGE_FAULT_AROUND: usize = 16;

/// Why the target's memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TargetMemoryError {
    #[error("the image has {image} pages, guest RAM {ram}")]
    ImageSize { image: usize, ram: usize },
    #[error("cannot attach the migration's fault hook to guest RAM")]
    Attach(#[from] AttachError),
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
    #[error("cannot install pages into guest RAM")]
    Install(#[from] FillError),
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

/// Page states, outstanding faults and the fault link: the hook the VMM's
/// fault handler calls, and what installs consult.
struct Shared {
    pages: usize,
    requested: vmstream_vmm::image::Bitmap,
    state: Box<[AtomicU8]>,
    image: Option<Arc<dyn PageSource>>,
    /// Faulted pages not yet installed, with the time of the fault.
    waiting: Mutex<HashMap<usize, Instant>>,
    waiting_count: AtomicU64,
    fault_link: Mutex<Option<TcpStream>>,
    all_sent: AtomicBool,
    running: AtomicBool,
    counters: Counters,
}

/// Guest RAM of a migration target; see the module documentation.
pub struct TargetMemory {
    shared: Arc<Shared>,
    installer: PageInstaller,
}

impl std::fmt::Debug for TargetMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetMemory")
            .field("pages", &self.shared.pages)
            .field("stats", &self.stats())
            .finish()
    }
}

impl MissingPageHook for Shared {
    fn missing(&self, page: usize, installer: &PageInstaller) {
        self.on_fault(installer, page, Instant::now());
    }
}

impl TargetMemory {
    /// Attaches to `lazy` (a VM shell's userfaultfd registration, nothing
    /// attached yet): its missing pages are handled here from now on.
    /// `image` provides pages the source reports identical to the live
    /// image (none: such pages are zero).
    pub fn attach(
        lazy: &LazyMemory,
        image: Option<Arc<dyn PageSource>>,
    ) -> Result<Self, TargetMemoryError> {
        let installer = lazy.installer();
        let pages = installer.pages();
        if let Some(image) = &image
            && image.pages() != pages
        {
            return Err(TargetMemoryError::ImageSize {
                image: image.pages(),
                ram: pages,
            });
        }
        let shared = Arc::new(Shared {
            pages,
            requested: vmstream_vmm::image::Bitmap::new(pages),
            state: (0..pages).map(|_| AtomicU8::new(UNKNOWN)).collect(),
            image,
            waiting: Mutex::new(HashMap::new()),
            waiting_count: AtomicU64::new(0),
            fault_link: Mutex::new(None),
            all_sent: AtomicBool::new(false),
            running: AtomicBool::new(false),
            counters: Counters::default(),
        });
        lazy.attach_hook(Arc::clone(&shared) as Arc<dyn MissingPageHook>)?;
        Ok(Self { shared, installer })
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

    fn check_range(&self, first: usize, count: usize) -> Result<(), InstallError> {
        if first
            .checked_add(count)
            .is_none_or(|end| end > self.shared.pages)
        {
            return Err(InstallError::OutOfRange {
                first,
                end: first.saturating_add(count),
                pages: self.shared.pages,
            });
        }
        Ok(())
    }

    /// Writes `data` over installed pages from `page` on, in place. Only
    /// while the VM does not run (precopy).
    fn overwrite(&self, page: usize, data: &[u8]) {
        debug_assert!(!self.shared.running.load(Ordering::SeqCst));
        // SAFETY: the destination pages are installed (present) inside guest
        // RAM and no vCPU runs, so nothing else reads or writes them; the
        // source is the caller's buffer of exactly `data.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.installer.page_ptr(page), data.len())
        };
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
        self.check_range(first, count)?;
        let overwrite = precopy && !self.shared.running.load(Ordering::SeqCst);
        if overwrite {
            for page in first..first + count {
                if self.installer.is_installed(page) {
                    let at = (page - first) * PAGE_SIZE;
                    self.overwrite(page, &data[at..at + PAGE_SIZE]);
                }
            }
        }
        let n = self.installer.install(first, data)?;
        self.shared.settle(first, first + count);
        let c = &self.shared.counters;
        c.pages_received.fetch_add(n as u64, Ordering::Relaxed);
        if !overwrite {
            c.duplicates
                .fetch_add((count - n) as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Pages `first..first + count` are identical to the image (or zero
    /// without one): install the missing ones from there now.
    pub fn install_from_image(&self, first: usize, count: usize) -> Result<(), InstallError> {
        self.check_range(first, count)?;
        let running = self.shared.running.load(Ordering::SeqCst);
        let mut bounce = vec![0u8; PAGE_SIZE];
        for page in first..first + count {
            self.shared.state[page].store(IMAGE, Ordering::SeqCst);
            if !running && self.installer.is_installed(page) {
                // Precopy: an older copy sent earlier is replaced.
                self.shared.image_page(page, &mut bounce)?;
                self.overwrite(page, &bounce);
            }
        }
        self.shared.fill_from_image(&self.installer, first, count)
    }

    /// Pages `first..first + count` are zero (a source without an image):
    /// install the missing ones as zero pages.
    pub fn install_zero(&self, first: usize, count: usize) -> Result<(), InstallError> {
        self.check_range(first, count)?;
        let running = self.shared.running.load(Ordering::SeqCst);
        if !running {
            let zero = [0u8; PAGE_SIZE];
            for page in first..first + count {
                if self.installer.is_installed(page) {
                    self.overwrite(page, &zero);
                }
            }
        }
        let n = self.installer.install_zero(first, count)?;
        self.shared.settle(first, first + count);
        let c = &self.shared.counters;
        c.pages_received.fetch_add(n as u64, Ordering::Relaxed);
        if running {
            c.duplicates
                .fetch_add((count - n) as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Marks the pages of a sparse bitmap as coming from the source.
    pub fn mark_candidates(&self, words: &[(usize, u64)]) {
        for page in pages_of(words, self.shared.pages) {
            let _ = self.shared.state[page].compare_exchange(
                UNKNOWN,
                SOURCE,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    /// The candidate set is complete: every page not in it comes from the
    /// image. Faults already waiting on such pages are served now.
    pub fn finish_candidates(&self) -> Result<(), InstallError> {
        for s in self.shared.state.iter() {
            let _ = s.compare_exchange(UNKNOWN, IMAGE, Ordering::SeqCst, Ordering::SeqCst);
        }
        for page in self.waiting_pages() {
            if self.shared.state[page].load(Ordering::SeqCst) == IMAGE {
                self.shared.fill_from_image(&self.installer, page, 1)?;
            }
        }
        Ok(())
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
                && !self.installer.is_installed(p)
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

    fn waiting_pages(&self) -> Vec<usize> {
        self.shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Drops the installed copies of the pages of a sparse bitmap (hybrid:
    /// written on the source after they were sent); they come from the
    /// source again. Only before the VM runs.
    pub fn invalidate(&self, words: &[(usize, u64)]) -> Result<usize, InstallError> {
        let mut dropped = 0;
        for page in pages_of(words, self.shared.pages) {
            self.shared.state[page].store(SOURCE, Ordering::SeqCst);
            if self.installer.discard(page)? {
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Faulted pages still waiting for the source (re-requested after a
    /// reconnection: their requests may have been lost).
    pub fn rerequest_waiting(&self) {
        for page in self.waiting_pages() {
            if !self.installer.is_installed(page) {
                self.shared.requested.clear(page);
                self.shared.request(page);
            }
        }
    }

    /// Pages whose final content is known here: installed, or to be taken
    /// from the image. Word bitmap (for the source after a reconnection).
    pub fn resolved_words(&self) -> Vec<u64> {
        let mut words = self.installer.installed().to_words();
        for (page, state) in self.shared.state.iter().enumerate() {
            if state.load(Ordering::SeqCst) == IMAGE {
                words[page / 64] |= 1 << (page % 64);
            }
        }
        words
    }

    /// Whether `page` is installed.
    pub fn is_installed(&self, page: usize) -> bool {
        self.installer.is_installed(page)
    }

    /// Installed page count.
    pub fn installed_pages(&self) -> usize {
        self.installer.installed().count_ones()
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

    /// Closes the fault link (the session is over; the hook stays attached
    /// and only wakes faults on installed pages from now on).
    pub fn shutdown(&self) {
        self.set_fault_link(None);
    }
}

/// The set bits of a sparse bitmap, below `pages`.
fn pages_of(words: &[(usize, u64)], pages: usize) -> impl Iterator<Item = usize> + '_ {
    words.iter().flat_map(move |&(index, word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            while bits != 0 {
                let page = index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if page < pages {
                    return Some(page);
                }
            }
            None
        })
    })
}

impl Shared {
    /// Settles the faults waiting on pages `first..end`, now installed
    /// (by this call or an earlier one): records how long they waited.
    fn settle(&self, first: usize, end: usize) {
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

    /// The image's content of `page` (zero without an image).
    fn image_page(&self, page: usize, buf: &mut [u8]) -> Result<(), InstallError> {
        match &self.image {
            Some(image) if !image.is_zero(page) => image
                .read_pages(page, 1, buf)
                .map_err(|source| InstallError::Image { page, source }),
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Installs missing pages of `first..first + count` from the image.
    fn fill_from_image(
        &self,
        installer: &PageInstaller,
        first: usize,
        count: usize,
    ) -> Result<(), InstallError> {
        let mut bounce = vec![0u8; PAGE_SIZE];
        let mut n = 0;
        for page in first..first + count {
            if installer.is_installed(page) {
                continue;
            }
            let result = match &self.image {
                Some(image) if !image.is_zero(page) => match image.mapped_page(page) {
                    Some(ptr) => {
                        // SAFETY: the image mapping stays valid and
                        // unchanged while the image source lives (trait
                        // contract), one page long.
                        let src = unsafe { std::slice::from_raw_parts(ptr, PAGE_SIZE) };
                        installer.install(page, src)
                    }
                    None => {
                        self.image_page(page, &mut bounce)?;
                        installer.install(page, &bounce)
                    }
                },
                _ => installer.install_zero(page, 1),
            };
            match result {
                Ok(k) => n += k,
                Err(e) => {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(e.into());
                }
            }
        }
        self.settle(first, first + count);
        self.counters
            .pages_from_image
            .fetch_add(n as u64, Ordering::Relaxed);
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
            let header = Header::new(Command::FaultRequest).with_range(page as u64, 1);
            if write_frame(stream, &header, &[])
                .and_then(|()| stream.flush())
                .is_err()
            {
                // Resent by `rerequest_waiting` once the link is back.
                *link = None;
            }
        }
    }

    /// A thread touched `page`, missing here (called on the VMM's fault
    /// handler thread; never waits for the page).
    fn on_fault(&self, installer: &PageInstaller, page: usize, at: Instant) {
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        if page >= self.pages {
            return;
        }
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.insert(page, at).is_none() {
                self.waiting_count.fetch_add(1, Ordering::SeqCst);
            }
        }
        // Installed between the fault and the insert: settle it now (the
        // install woke the thread).
        if installer.is_installed(page) {
            self.settle(page, page + 1);
            installer.wake(page);
            return;
        }
        // Only pages known to be the image's: a source page whose answer is
        // still on its way (the fault connection is not ordered with the
        // bulk one) must wait for it, even after Done.
        if self.state[page].load(Ordering::SeqCst) == IMAGE {
            let mut end = page + 1;
            while end < self.pages
                && end - page < IMAGE_FAULT_AROUND
                && self.state[end].load(Ordering::SeqCst) == IMAGE
                && !installer.is_installed(end)
            {
                end += 1;
            }
            if let Err(e) = self.fill_from_image(installer, page, end - page) {
                tracing::error!(error = %e, page, "serving a fault from the image failed");
            }
        } else {
            self.request(page);
        }
    }
}
