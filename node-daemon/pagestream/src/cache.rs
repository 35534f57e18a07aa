//! The node image cache: one sparse cache file per image on a node, holding
//! the pages fetched from other nodes, plus the bitmaps that say which pages
//! are there. Every clone of the image on the node reads through it, so a
//! page crosses the network at most once per node: a fetcher must *claim* a
//! page before requesting it, and whoever finds a page claimed waits for the
//! claimer instead of asking the network again (concurrent faults on one
//! page coalesce into one request).
//!
//! ```text
//!  page state:  Zero (never fetched: the image says all zeros)
//!               Missing ──claim──► Claimed ──data verified, written──► Present
//!                  ▲                  │
//!                  └────release───────┘ (peer failed: someone may retry)
//! ```
//!
//! Files in the cache directory: `cache.pages` (image-size sparse file, page
//! order), `cache.idx` (image id, page count, non-zero and present bitmaps,
//! CRC32; rewritten atomically by [`NodeImageCache::flush`] after the data is
//! synced, so after a crash a page is never marked present without its
//! data), and `working-set` (pages the first clones touched, in order).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vmstream_vmm::image::Bitmap;
use vmstream_vmm::memory::PAGE_SIZE;

use crate::wire::valid_image_id;

/// File name of the cached page data.
pub const CACHE_DATA_FILE: &str = "cache.pages";
/// File name of the cache index.
pub const CACHE_INDEX_FILE: &str = "cache.idx";
/// File name of the recorded working set.
pub const WORKING_SET_FILE: &str = "working-set";
const INDEX_MAGIC: [u8; 8] = *b"VMSTNCAC";
const WSET_MAGIC: [u8; 8] = *b"VMSTWSET";
const FILE_VERSION: u16 = 1;

/// Why a node image cache could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CacheOpenError {
    #[error("image id {0:?} is not 1..=256 printable ASCII bytes")]
    BadImageId(String),
    #[error("the image has {pages} pages but its non-zero bitmap has {words} words")]
    BadIndex { pages: usize, words: usize },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a cache file could not be decoded (the cache then starts empty).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheFileError {
    #[error("file is {0} bytes, too short")]
    Truncated(usize),
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported file version {0}")]
    Version(u16),
    #[error("CRC mismatch")]
    Crc,
    #[error("inconsistent contents: {0}")]
    Inconsistent(&'static str),
}

/// What the cache knows about one page (decides whether to fetch it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// All zeros in the image: never fetched.
    Zero,
    /// In the cache file.
    Present,
    /// Being fetched by someone else right now.
    Busy,
    /// Neither: must be fetched.
    Missing,
}

/// Counters of a cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub pages: u64,
    pub nonzero_pages: u64,
    pub present_pages: u64,
    /// Pages written into the cache by the fault path / the bulk path.
    pub fault_pages_fetched: u64,
    pub bulk_pages_fetched: u64,
    /// Times a reader found a page being fetched and waited for it instead
    /// of asking the network again.
    pub coalesced_waits: u64,
}

#[derive(Debug, Default)]
struct Counters {
    fault_pages: AtomicU64,
    bulk_pages: AtomicU64,
    coalesced_waits: AtomicU64,
}

/// Which path brought pages in (for the counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchPath {
    Fault,
    Bulk,
}

/// A read-only shared mapping of the cache data file.
#[derive(Debug)]
struct CacheMapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only shared memory of the cache file. Pages
// are written (with pwrite) only by the thread that holds their claim and
// read as data only once present, after the write finished.
unsafe impl Send for CacheMapping {}
// SAFETY: see above.
unsafe impl Sync for CacheMapping {}

impl Drop for CacheMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this value mapped and owns.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

/// The cache of one image on one node, shared by all its clones there.
#[derive(Debug)]
pub struct NodeImageCache {
    dir: PathBuf,
    image_id: String,
    pages: usize,
    nonzero: Bitmap,
    nonzero_count: usize,
    present: Bitmap,
    claimed: Bitmap,
    file: File,
    mapping: CacheMapping,
    changed: Mutex<u64>,
    changed_cv: Condvar,
    counters: Counters,
    touched: Bitmap,
    touch_order: Mutex<Vec<u64>>,
    recording: AtomicBool,
    saved_working_set: Vec<u64>,
    /// Set while a bulk prefetcher runs for this cache (one per node).
    pub(crate) prefetching: AtomicBool,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CacheOpenError {
    let path = path.to_path_buf();
    move |source| CacheOpenError::Io {
        action,
        path,
        source,
    }
}

/// Contents of `cache.idx`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheIndex {
    pub image_id: String,
    pub pages: u64,
    pub nonzero: Vec<u64>,
    pub present: Vec<u64>,
}

impl CacheIndex {
    /// Encodes the index file: body then CRC32 of the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&INDEX_MAGIC);
        v.extend_from_slice(&FILE_VERSION.to_le_bytes());
        v.extend_from_slice(&(self.image_id.len() as u16).to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(&self.pages.to_le_bytes());
        v.extend_from_slice(self.image_id.as_bytes());
        for w in self.nonzero.iter().chain(&self.present) {
            v.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Decodes and checks an index file.
    pub fn decode(b: &[u8]) -> Result<Self, CacheFileError> {
        let body = check_file(b, &INDEX_MAGIC, 24)?;
        let id_len = u16::from_le_bytes([body[10], body[11]]) as usize;
        let pages = u64::from_le_bytes(body[16..24].try_into().expect("8 bytes"));
        let words = usize::try_from(pages.div_ceil(64))
            .map_err(|_| CacheFileError::Inconsistent("page count"))?;
        if body.len() != 24 + id_len + words * 16 {
            return Err(CacheFileError::Inconsistent("length"));
        }
        let image_id = std::str::from_utf8(&body[24..24 + id_len])
            .map_err(|_| CacheFileError::Inconsistent("image id"))?
            .to_owned();
        let all: Vec<u64> = body[24 + id_len..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Self {
            image_id,
            pages,
            nonzero: all[..words].to_vec(),
            present: all[words..].to_vec(),
        })
    }
}

/// Checks magic, version and trailing CRC32; returns the body (without CRC).
fn check_file<'a>(b: &'a [u8], magic: &[u8; 8], min: usize) -> Result<&'a [u8], CacheFileError> {
    if b.len() < min + 4 {
        return Err(CacheFileError::Truncated(b.len()));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if body[..8] != magic[..] {
        return Err(CacheFileError::BadMagic);
    }
    let version = u16::from_le_bytes([body[8], body[9]]);
    if version != FILE_VERSION {
        return Err(CacheFileError::Version(version));
    }
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(CacheFileError::Crc);
    }
    Ok(body)
}

/// Encodes a working-set file (pages in first-touch order).
pub fn encode_working_set(pages: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + pages.len() * 8 + 4);
    v.extend_from_slice(&WSET_MAGIC);
    v.extend_from_slice(&FILE_VERSION.to_le_bytes());
    v.extend_from_slice(&[0; 2]);
    v.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for p in pages {
        v.extend_from_slice(&p.to_le_bytes());
    }
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// Decodes a working-set file.
pub fn decode_working_set(b: &[u8]) -> Result<Vec<u64>, CacheFileError> {
    let body = check_file(b, &WSET_MAGIC, 16)?;
    let count = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
    if body.len() != 16 + count * 8 {
        return Err(CacheFileError::Inconsistent("length"));
    }
    Ok(body[16..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Reads the working-set file of a cache directory, if there is a valid one.
pub fn read_working_set(dir: &Path) -> Option<Vec<u64>> {
    let bytes = fs::read(dir.join(WORKING_SET_FILE)).ok()?;
    match decode_working_set(&bytes) {
        Ok(ws) => Some(ws),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "ignoring an unreadable working-set file");
            None
        }
    }
}

/// Writes `bytes` to `dir/name` atomically (temporary file, fsync, rename).
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))
}

impl NodeImageCache {
    /// Opens (or creates) the cache of `image_id` in `dir`. `nonzero_words`
    /// is the image's non-zero bitmap as served by a holder. A previous cache
    /// of the same image (same id, size and bitmap) is reused with the pages
    /// it holds; anything else found there is discarded.
    pub fn open(
        dir: &Path,
        image_id: &str,
        pages: usize,
        nonzero_words: &[u64],
    ) -> Result<Arc<Self>, CacheOpenError> {
        if !valid_image_id(image_id) {
            return Err(CacheOpenError::BadImageId(image_id.into()));
        }
        let nonzero = Bitmap::from_words(pages, nonzero_words)
            .filter(|_| pages > 0)
            .ok_or(CacheOpenError::BadIndex {
                pages,
                words: nonzero_words.len(),
            })?;
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let data_path = dir.join(CACHE_DATA_FILE);
        let previous = fs::read(dir.join(CACHE_INDEX_FILE))
            .ok()
            .and_then(|b| match CacheIndex::decode(&b) {
                Ok(idx) => Some(idx),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "discarding an unreadable cache index");
                    None
                }
            })
            .filter(|idx| {
                idx.image_id == image_id && idx.pages == pages as u64 && idx.nonzero == nonzero_words
            });
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(io_err("open", &data_path))?;
        let len = pages * PAGE_SIZE;
        let size_ok = file
            .metadata()
            .map(|m| m.len() == len as u64)
            .unwrap_or(false);
        let present = match previous {
            Some(idx) if size_ok => {
                Bitmap::from_words(pages, &idx.present).unwrap_or_else(|| Bitmap::new(pages))
            }
            _ => {
                file.set_len(0).map_err(io_err("truncate", &data_path))?;
                file.set_len(len as u64)
                    .map_err(io_err("size", &data_path))?;
                Bitmap::new(pages)
            }
        };
        // SAFETY: a new shared mapping of the whole data file (exactly `len`
        // bytes long) at an address of the kernel's choice; checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io_err("map", &data_path)(io::Error::last_os_error()));
        }
        let saved_working_set = read_working_set(dir).unwrap_or_default();
        let cache = Self {
            dir: dir.to_path_buf(),
            image_id: image_id.to_owned(),
            pages,
            nonzero_count: nonzero.count_ones(),
            nonzero,
            present,
            claimed: Bitmap::new(pages),
            file,
            mapping: CacheMapping {
                addr: NonNull::new(addr.cast()).expect("mmap returned null"),
                len,
            },
            changed: Mutex::new(0),
            changed_cv: Condvar::new(),
            counters: Counters::default(),
            touched: Bitmap::new(pages),
            touch_order: Mutex::new(Vec::new()),
            recording: AtomicBool::new(saved_working_set.is_empty()),
            saved_working_set,
            prefetching: AtomicBool::new(false),
        };
        cache
            .write_index()
            .map_err(io_err("write", &dir.join(CACHE_INDEX_FILE)))?;
        Ok(Arc::new(cache))
    }

    /// Opens the cache in `dir` from its own index, without asking any
    /// holder (a node that already has the image cached starts clones with
    /// the network down). `None` if there is no valid cache there.
    pub fn open_existing(dir: &Path) -> Result<Option<Arc<Self>>, CacheOpenError> {
        let Ok(bytes) = fs::read(dir.join(CACHE_INDEX_FILE)) else {
            return Ok(None);
        };
        let Ok(idx) = CacheIndex::decode(&bytes) else {
            return Ok(None);
        };
        let Ok(pages) = usize::try_from(idx.pages) else {
            return Ok(None);
        };
        Self::open(dir, &idx.image_id, pages, &idx.nonzero).map(Some)
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The image id.
    pub fn image_id(&self) -> &str {
        &self.image_id
    }

    /// Number of pages of the image.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The image's non-zero pages.
    pub fn nonzero(&self) -> &Bitmap {
        &self.nonzero
    }

    /// Number of non-zero pages.
    pub fn nonzero_count(&self) -> usize {
        self.nonzero_count
    }

    /// Pages whose data is in the cache.
    pub fn present(&self) -> &Bitmap {
        &self.present
    }

    /// Whether every non-zero page is in the cache.
    pub fn is_complete(&self) -> bool {
        self.present.count_ones() == self.nonzero_count
    }

    /// The state of `page` (no side effect).
    pub fn state(&self, page: usize) -> PageState {
        if !self.nonzero.get(page) {
            PageState::Zero
        } else if self.present.get(page) {
            PageState::Present
        } else if self.claimed.get(page) {
            PageState::Busy
        } else {
            PageState::Missing
        }
    }

    /// Tries to claim `page` for fetching; returns the state it was found
    /// in, where `Missing` means the caller now holds the claim and must
    /// [`complete`](Self::complete) or [`release`](Self::release) it.
    pub fn claim(&self, page: usize) -> PageState {
        if !self.nonzero.get(page) {
            return PageState::Zero;
        }
        if self.present.get(page) {
            return PageState::Present;
        }
        if self.claimed.set(page) {
            return PageState::Busy;
        }
        // Present is set before the claim is dropped: re-check so a page
        // completed just now is not fetched again.
        if self.present.get(page) {
            self.claimed.clear(page);
            return PageState::Present;
        }
        PageState::Missing
    }

    /// Writes a verified Pages payload (the non-zero pages of `first..end`
    /// in page order) into the cache file. The caller holds the claims on
    /// those pages; they are not marked present here.
    pub(crate) fn write_claimed(&self, first: usize, end: usize, payload: &[u8]) -> io::Result<()> {
        let mut at = 0;
        for (a, b) in nonzero_runs(&self.nonzero, first, end) {
            let len = (b - a) * PAGE_SIZE;
            let part = payload.get(at..at + len).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "payload shorter than its range")
            })?;
            self.file.write_all_at(part, (a * PAGE_SIZE) as u64)?;
            at += len;
        }
        Ok(())
    }

    /// Reads pages `first..end` from the cache file with `pread` (the page
    /// server sends held pages this way).
    pub fn read_raw(&self, first: usize, end: usize, buf: &mut [u8]) -> io::Result<()> {
        assert_eq!(
            buf.len(),
            (end - first) * PAGE_SIZE,
            "buffer does not match the pages"
        );
        self.file.read_exact_at(buf, (first * PAGE_SIZE) as u64)
    }

    /// Marks the non-zero pages of `first..end` present (their data was
    /// written and verified) and drops the claims; wakes waiters.
    pub(crate) fn complete(&self, first: usize, end: usize, path: FetchPath) {
        let mut n = 0;
        for p in first..end {
            if self.nonzero.get(p) {
                self.present.set(p);
                self.claimed.clear(p);
                n += 1;
            }
        }
        let counter = match path {
            FetchPath::Fault => &self.counters.fault_pages,
            FetchPath::Bulk => &self.counters.bulk_pages,
        };
        counter.fetch_add(n, Ordering::Relaxed);
        self.notify();
    }

    /// Drops the claims on the non-zero pages of `first..end` without
    /// marking them present (the fetch failed); wakes waiters.
    pub(crate) fn release(&self, first: usize, end: usize) {
        for p in first..end {
            if self.nonzero.get(p) && !self.present.get(p) {
                self.claimed.clear(p);
            }
        }
        self.notify();
    }

    fn notify(&self) {
        let mut g = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        *g = g.wrapping_add(1);
        self.changed_cv.notify_all();
    }

    /// The change counter (pass it to [`Self::wait_change`]).
    pub fn generation(&self) -> u64 {
        *self.changed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until some fetch completes or is released after generation
    /// `seen`, or `timeout` passes.
    pub fn wait_change(&self, seen: u64, timeout: Duration) {
        self.counters
            .coalesced_waits
            .fetch_add(1, Ordering::Relaxed);
        let g = self.changed.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .changed_cv
            .wait_timeout_while(g, timeout, |g| *g == seen)
            .unwrap_or_else(|e| e.into_inner());
    }

    /// Address of `page` in the cache mapping if it is present (its bytes
    /// never change afterwards).
    pub fn present_page_ptr(&self, page: usize) -> Option<*const u8> {
        (page < self.pages && self.present.get(page))
            // SAFETY: in bounds of the mapping (checked above).
            .then(|| unsafe { self.mapping.addr.as_ptr().add(page * PAGE_SIZE) as *const u8 })
    }

    /// The bytes of pages `first..end` in the cache mapping. Only pages that
    /// are present (or zero) hold image data.
    pub fn bytes(&self, first: usize, end: usize) -> &[u8] {
        assert!(
            first <= end && end <= self.pages,
            "pages {first}..{end} out of range"
        );
        // SAFETY: in bounds of the mapping, which lives as long as `self`.
        // Present pages are never written again; callers only use present or
        // zero pages as data.
        unsafe {
            std::slice::from_raw_parts(
                self.mapping.addr.as_ptr().add(first * PAGE_SIZE),
                (end - first) * PAGE_SIZE,
            )
        }
    }

    /// Copies pages `first..first + count` into `buf`; every non-zero page
    /// must be present. Returns the first page that is not, if any.
    pub fn copy_pages(&self, first: usize, count: usize, buf: &mut [u8]) -> Result<(), usize> {
        for (i, chunk) in buf.chunks_exact_mut(PAGE_SIZE).take(count).enumerate() {
            let p = first + i;
            if !self.nonzero.get(p) {
                chunk.fill(0);
            } else if self.present.get(p) {
                chunk.copy_from_slice(self.bytes(p, p + 1));
            } else {
                return Err(p);
            }
        }
        Ok(())
    }

    /// Records that a clone touched `page` (for the working set), while this
    /// cache is recording (it had no working set when opened).
    pub fn record_touch(&self, page: usize) {
        if !self.recording.load(Ordering::Relaxed) || !self.nonzero.get(page) {
            return;
        }
        if !self.touched.set(page) {
            self.touch_order
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(page as u64);
        }
    }

    /// Pages touched so far while recording, in first-touch order.
    pub fn recorded_touches(&self) -> Vec<u64> {
        self.touch_order
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The working set found in the cache directory when it was opened
    /// (empty if none: then this cache records one).
    pub fn saved_working_set(&self) -> &[u64] {
        &self.saved_working_set
    }

    /// Writes the recorded touches as the directory's working-set file (if
    /// this cache recorded any) and stops recording.
    pub fn save_working_set(&self) -> io::Result<usize> {
        if !self.recording.swap(false, Ordering::AcqRel) {
            return Ok(0);
        }
        let pages = self.recorded_touches();
        if pages.is_empty() {
            return Ok(0);
        }
        write_atomically(&self.dir, WORKING_SET_FILE, &encode_working_set(&pages))?;
        Ok(pages.len())
    }

    /// Syncs the cached data to disk, then rewrites the index with the
    /// present bitmap (so a page is never marked present on disk before its
    /// data is there).
    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: msync over exactly our mapping.
        let rc = unsafe {
            libc::msync(
                self.mapping.addr.as_ptr().cast(),
                self.mapping.len,
                libc::MS_SYNC,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.file.sync_data()?;
        self.write_index()
    }

    fn write_index(&self) -> io::Result<()> {
        let idx = CacheIndex {
            image_id: self.image_id.clone(),
            pages: self.pages as u64,
            nonzero: self.nonzero.to_words(),
            present: self.present.to_words(),
        };
        write_atomically(&self.dir, CACHE_INDEX_FILE, &idx.encode())
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            pages: self.pages as u64,
            nonzero_pages: self.nonzero_count as u64,
            present_pages: self.present.count_ones() as u64,
            fault_pages_fetched: self.counters.fault_pages.load(Ordering::Relaxed),
            bulk_pages_fetched: self.counters.bulk_pages.load(Ordering::Relaxed),
            coalesced_waits: self.counters.coalesced_waits.load(Ordering::Relaxed),
        }
    }
}

impl Drop for NodeImageCache {
    fn drop(&mut self) {
        if let Err(e) = self.save_working_set() {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot save the working set");
        }
        if let Err(e) = self.flush() {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot flush the node image cache");
        }
    }
}

/// Maximal runs of non-zero pages inside `first..end`, as `(start, end)`.
pub fn nonzero_runs(nonzero: &Bitmap, first: usize, end: usize) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut p = first;
    while p < end {
        if !nonzero.get(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < end && nonzero.get(p) {
            p += 1;
        }
        runs.push((start, p));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pages: usize, nonzero: &[usize]) -> Vec<u64> {
        let b = Bitmap::new(pages);
        for &p in nonzero {
            b.set(p);
        }
        b.to_words()
    }

    #[test]
    fn claims_are_exclusive_and_complete_marks_present() {
        let dir = tempfile::tempdir().unwrap();
        let c = NodeImageCache::open(dir.path(), "ns/a", 8, &words(8, &[1, 2, 5])).unwrap();
        assert_eq!(c.claim(0), PageState::Zero);
        assert_eq!(c.claim(1), PageState::Missing);
        assert_eq!(c.claim(1), PageState::Busy);
        assert_eq!(c.state(2), PageState::Missing);
        c.complete(1, 2, FetchPath::Fault);
        assert_eq!(c.claim(1), PageState::Present);
        assert_eq!(c.claim(5), PageState::Missing);
        c.release(5, 6);
        assert_eq!(c.claim(5), PageState::Missing);
        assert_eq!(c.stats().fault_pages_fetched, 1);
    }

    #[test]
    fn a_reopened_cache_keeps_flushed_pages_and_a_different_image_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let w = words(4, &[0, 3]);
        {
            let c = NodeImageCache::open(dir.path(), "img", 4, &w).unwrap();
            assert_eq!(c.claim(3), PageState::Missing);
            c.write_claimed(3, 4, &[0xab; PAGE_SIZE]).unwrap();
            c.complete(3, 4, FetchPath::Bulk);
            c.flush().unwrap();
        }
        let c = NodeImageCache::open_existing(dir.path()).unwrap().unwrap();
        assert_eq!(c.state(3), PageState::Present);
        assert_eq!(c.state(0), PageState::Missing);
        assert!(c.bytes(3, 4).iter().all(|&b| b == 0xab));
        drop(c);
        let c = NodeImageCache::open(dir.path(), "img", 4, &words(4, &[0, 2])).unwrap();
        assert_eq!(c.present().count_ones(), 0);
    }

    #[test]
    fn working_sets_round_trip_and_corruption_is_detected() {
        let b = encode_working_set(&[5, 1, 9]);
        assert_eq!(decode_working_set(&b).unwrap(), vec![5, 1, 9]);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 4;
            assert!(decode_working_set(&c).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn touches_are_recorded_once_in_order_and_saved() {
        let dir = tempfile::tempdir().unwrap();
        let c = NodeImageCache::open(dir.path(), "img", 70, &words(70, &[3, 7, 69])).unwrap();
        for p in [7, 3, 7, 0, 69] {
            c.record_touch(p);
        }
        assert_eq!(c.save_working_set().unwrap(), 3);
        drop(c);
        assert_eq!(read_working_set(dir.path()).unwrap(), vec![7, 3, 69]);
        let c = NodeImageCache::open_existing(dir.path()).unwrap().unwrap();
        assert_eq!(c.saved_working_set(), &[7, 3, 69]);
    }

    #[test]
    fn runs_skip_zero_pages() {
        let b = Bitmap::new(10);
        for p in [1, 2, 4, 8, 9] {
            b.set(p);
        }
        assert_eq!(nonzero_runs(&b, 0, 10), vec![(1, 3), (4, 5), (8, 10)]);
        assert_eq!(nonzero_runs(&b, 2, 9), vec![(2, 3), (4, 5), (8, 9)]);
    }
}
