//! The page store of a live image: `memory.pages`, a sparse raw file of
//! exactly memory-size bytes in page order (zero pages are holes), validated
//! against its index `pages.idx`. The file can be mapped `MAP_PRIVATE`
//! directly for copy-on-write clones, so clones share pages through the page
//! cache.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::bitmap::Bitmap;
use super::error::ImageOpenError;
use super::index::{self, INDEX_FILE};
use crate::memory::PAGE_SIZE;

/// File name of the page data inside an image directory.
pub const PAGES_FILE: &str = "memory.pages";

/// A read-only shared mapping of a whole `memory.pages` file.
#[derive(Debug)]
pub struct PageMapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is read-only and the file is immutable once written
// (images are never modified in place), so sharing it between threads is
// sharing immutable bytes.
unsafe impl Send for PageMapping {}
// SAFETY: see above.
unsafe impl Sync for PageMapping {}

impl PageMapping {
    fn map(fd: RawFd, len: usize) -> std::io::Result<Self> {
        // SAFETY: a new read-only shared mapping at an address chosen by the
        // kernel; it does not alias any existing Rust object. Checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            addr: NonNull::new(addr.cast()).expect("mmap returned null"),
            len,
        })
    }

    /// Address of the first byte (page 0).
    pub fn as_ptr(&self) -> *const u8 {
        self.addr.as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: page stores are never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of page `page`. Panics if out of range.
    pub fn page_ptr(&self, page: usize) -> *const u8 {
        assert!(
            (page + 1) * PAGE_SIZE <= self.len,
            "page {page} out of range"
        );
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.as_ptr().add(page * PAGE_SIZE) }
    }

    /// The whole mapping as bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes, lives as long as
        // `self`, and the image file is never written after it is complete.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl Drop for PageMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mapped in `map`, owned by self.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len);
        }
    }
}

/// An opened, validated page store.
#[derive(Debug)]
pub struct PageStore {
    dir: PathBuf,
    file: File,
    pages: usize,
    present: Bitmap,
    present_count: usize,
    disk_bytes: u64,
    mapping: PageMapping,
}

impl PageStore {
    /// Opens `dir/memory.pages` and `dir/pages.idx` and checks them against
    /// each other: the index must be intact (magic, version, CRC, counts) and
    /// the data file exactly `pages * PAGE_SIZE` bytes long.
    pub fn open(dir: &Path) -> Result<Self, ImageOpenError> {
        let idx_path = dir.join(INDEX_FILE);
        let idx_bytes =
            fs::read(&idx_path).map_err(|e| ImageOpenError::from_io(idx_path.clone(), e))?;
        let idx = index::decode(&idx_path, &idx_bytes)?;

        let data_path = dir.join(PAGES_FILE);
        let file =
            File::open(&data_path).map_err(|e| ImageOpenError::from_io(data_path.clone(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| ImageOpenError::from_io(data_path.clone(), e))?;
        let expected = idx.pages.saturating_mul(PAGE_SIZE as u64);
        if meta.len() != expected {
            return Err(ImageOpenError::PageStoreSizeMismatch {
                path: data_path,
                expected,
                actual: meta.len(),
                pages: idx.pages,
            });
        }
        let len = usize::try_from(expected).map_err(|_| ImageOpenError::IndexCorrupt {
            path: idx_path.clone(),
            reason: format!("{expected} bytes do not fit the address space"),
        })?;
        let mapping =
            PageMapping::map(file.as_raw_fd(), len).map_err(|source| ImageOpenError::Map {
                path: data_path.clone(),
                source,
            })?;
        let idx_disk = fs::metadata(&idx_path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            pages: idx.pages as usize,
            present: idx.present,
            present_count: idx.present_count as usize,
            disk_bytes: meta.blocks() * 512 + idx_disk,
            mapping,
        })
    }

    /// The image directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of pages (memory size / [`PAGE_SIZE`]).
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        (self.pages * PAGE_SIZE) as u64
    }

    /// Whether page `page` is stored (non-zero). Absent pages read as zeros.
    pub fn is_present(&self, page: usize) -> bool {
        self.present.get(page)
    }

    /// The bitmap of present pages.
    pub fn present(&self) -> &Bitmap {
        &self.present
    }

    /// Number of non-zero (present) pages.
    pub fn nonzero_pages(&self) -> usize {
        self.present_count
    }

    /// Bytes the page store occupies on disk (allocated blocks of the data
    /// file and the index; holes cost nothing).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Reads page `page` into `buf` (exactly [`PAGE_SIZE`] bytes) with
    /// `pread`. Absent pages read as zeros (holes).
    pub fn read_page(&self, page: usize, buf: &mut [u8]) -> std::io::Result<()> {
        assert_eq!(buf.len(), PAGE_SIZE, "read_page needs a page-sized buffer");
        self.read_pages(page, 1, buf)
    }

    /// Reads `count` pages starting at `first` into `buf`
    /// (`count * PAGE_SIZE` bytes).
    pub fn read_pages(&self, first: usize, count: usize, buf: &mut [u8]) -> std::io::Result<()> {
        assert_eq!(
            buf.len(),
            count * PAGE_SIZE,
            "buffer does not match page count"
        );
        if first + count > self.pages {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "pages {first}..{} out of range 0..{}",
                    first + count,
                    self.pages
                ),
            ));
        }
        self.file.read_exact_at(buf, (first * PAGE_SIZE) as u64)
    }

    /// The read-only shared mapping of the whole data file.
    pub fn as_mapping(&self) -> &PageMapping {
        &self.mapping
    }

    /// Asks the kernel to read the whole data file into the page cache in
    /// the background (`posix_fadvise(WILLNEED)`), e.g. after an `O_DIRECT`
    /// capture, so the first clones do not fault pages in from disk.
    pub fn prefetch_into_page_cache(&self) -> std::io::Result<()> {
        // SAFETY: an advisory call on a descriptor we own; no memory involved.
        let rc =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// The data file (for `MAP_PRIVATE` copy-on-write mappings and
    /// `copy_file_range`).
    pub fn file(&self) -> &File {
        &self.file
    }
}
