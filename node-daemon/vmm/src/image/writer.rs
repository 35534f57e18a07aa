//! The page-store writer. [`PageStoreWriter::prepare`] runs in the normal
//! process (it allocates: file descriptors, path strings, bitmap and index
//! buffers); [`PageStoreWriter::write_from`] and [`PageStoreWriter::finish`]
//! then use only raw syscalls and that preallocated memory, so they are safe
//! to call in a child forked from a multithreaded process (no allocation, no
//! locks, no buffered std I/O).

use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::bitmap::Bitmap;
use super::index::{self, INDEX_FILE};
use super::runs::PageRuns;
use super::store::{PAGES_FILE, PageStore};
use super::version::FORMAT_VERSION;
use crate::memory::PAGE_SIZE;

/// The step of writing a page store that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WritePhase {
    Prepare = 1,
    WriteData = 2,
    CopyFromBase = 3,
    WriteIndex = 4,
    Sync = 5,
    Rename = 6,
    SyncDir = 7,
}

impl WritePhase {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Prepare,
            2 => Self::WriteData,
            3 => Self::CopyFromBase,
            4 => Self::WriteIndex,
            5 => Self::Sync,
            6 => Self::Rename,
            7 => Self::SyncDir,
            _ => return None,
        })
    }
}

impl fmt::Display for WritePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Prepare => "preparing the page store files",
            Self::WriteData => "writing page data to memory.pages",
            Self::CopyFromBase => "copying never-touched pages from the base image",
            Self::WriteIndex => "writing pages.idx",
            Self::Sync => "fsyncing the page store",
            Self::Rename => "renaming the page store into place",
            Self::SyncDir => "fsyncing the image directory",
        })
    }
}

/// Why writing a page store failed. `Copy` and allocation-free so a forked
/// child can produce it and send [`WriteError::to_bytes`] to its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("{phase} failed: {}", std::io::Error::from_raw_os_error(*errno))]
    Os { phase: WritePhase, errno: i32 },
    #[error("the base image has {base} pages, the memory being written has {memory}")]
    BaseSizeMismatch { base: u64, memory: u64 },
    #[error("the populated bitmap has {bitmap} bits, the memory being written has {memory} pages")]
    PopulatedSizeMismatch { bitmap: u64, memory: u64 },
    #[error("a populated bitmap was given without a base image to take unpopulated pages from")]
    PopulatedWithoutBase,
    #[error("write_from was called twice, or finish before write_from")]
    WrongOrder,
}

impl WriteError {
    /// A fixed 20-byte encoding (for a pipe from a forked child).
    pub fn to_bytes(&self) -> [u8; 20] {
        let (tag, a, b): (u32, u64, u64) = match *self {
            Self::Os { phase, errno } => (1, phase as u64, errno as u32 as u64),
            Self::BaseSizeMismatch { base, memory } => (2, base, memory),
            Self::PopulatedSizeMismatch { bitmap, memory } => (3, bitmap, memory),
            Self::PopulatedWithoutBase => (4, 0, 0),
            Self::WrongOrder => (5, 0, 0),
        };
        let mut out = [0; 20];
        out[0..4].copy_from_slice(&tag.to_le_bytes());
        out[4..12].copy_from_slice(&a.to_le_bytes());
        out[12..20].copy_from_slice(&b.to_le_bytes());
        out
    }

    /// Decodes [`WriteError::to_bytes`]; `None` for bytes it did not produce.
    pub fn from_bytes(bytes: &[u8; 20]) -> Option<Self> {
        let tag = u32::from_le_bytes(bytes[0..4].try_into().ok()?);
        let a = u64::from_le_bytes(bytes[4..12].try_into().ok()?);
        let b = u64::from_le_bytes(bytes[12..20].try_into().ok()?);
        Some(match tag {
            1 => Self::Os {
                phase: WritePhase::from_u8(u8::try_from(a).ok()?)?,
                errno: b as u32 as i32,
            },
            2 => Self::BaseSizeMismatch { base: a, memory: b },
            3 => Self::PopulatedSizeMismatch {
                bitmap: a,
                memory: b,
            },
            4 => Self::PopulatedWithoutBase,
            5 => Self::WrongOrder,
            _ => return None,
        })
    }
}

/// What [`PageStoreWriter::write_from`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Pages in memory.
    pub pages: u64,
    /// Pages stored (non-zero), from memory or from the base.
    pub nonzero_pages: u64,
    /// Pages taken from the base image because they were never populated.
    pub pages_from_base: u64,
    /// Number of `pwrite`/`copy_file_range` runs issued.
    pub runs: u64,
}

/// Where a stored (non-zero) page's content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageOrigin {
    /// Guest memory.
    Memory,
    /// The base image (the page was never brought into a lazy clone).
    Base,
}

/// Writes one page store; see the module documentation for the
/// prepare-then-fork protocol.
#[derive(Debug)]
pub struct PageStoreWriter {
    dir: PathBuf,
    mem_len: usize,
    pages: usize,
    data: OwnedFd,
    index: OwnedFd,
    dir_fd: OwnedFd,
    data_tmp: CString,
    data_final: CString,
    index_tmp: CString,
    index_final: CString,
    present: Vec<u64>,
    index_buf: Vec<u8>,
    present_count: u64,
    written: bool,
    direct_io: bool,
}

/// How a [`PageStoreWriter`] writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// Write page data with `O_DIRECT` (straight from guest memory to the
    /// disk, bypassing the page cache): faster and leaves no second copy of
    /// the image in memory, but the first clones then read their pages from
    /// disk. Falls back to buffered writes where the filesystem refuses it.
    pub direct_io: bool,
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn os(phase: WritePhase) -> WriteError {
    WriteError::Os {
        phase,
        errno: last_errno(),
    }
}

fn cpath(p: &Path) -> Result<CString, WriteError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| WriteError::Os {
        phase: WritePhase::Prepare,
        errno: libc::EINVAL,
    })
}

/// Whether a page is all zeros. OR-folds 64-byte blocks of `u64`s (the
/// compiler vectorises the fold) and stops at the first non-zero block.
///
/// # Safety
/// `page` must be 8-byte aligned and valid for reads of [`PAGE_SIZE`] bytes.
#[inline]
unsafe fn page_is_zero(page: *const u8) -> bool {
    // SAFETY: guaranteed by the caller.
    let words = unsafe { std::slice::from_raw_parts(page.cast::<u64>(), PAGE_SIZE / 8) };
    words
        .chunks_exact(8)
        .all(|c| (c[0] | c[1] | c[2] | c[3] | c[4] | c[5] | c[6] | c[7]) == 0)
}

/// `pwrite` all of `len` bytes at `src` to `fd` at `off`, retrying short
/// writes and EINTR.
///
/// # Safety
/// `src` must be valid for reads of `len` bytes.
unsafe fn pwrite_all(
    fd: RawFd,
    mut src: *const u8,
    mut len: usize,
    mut off: u64,
    phase: WritePhase,
) -> Result<(), WriteError> {
    while len > 0 {
        // SAFETY: `src..src+len` is readable (caller's contract).
        let n = unsafe { libc::pwrite(fd, src.cast(), len.min(1 << 30), off as libc::off_t) };
        if n < 0 {
            let errno = last_errno();
            if errno == libc::EINTR {
                continue;
            }
            return Err(WriteError::Os { phase, errno });
        }
        if n == 0 {
            return Err(WriteError::Os {
                phase,
                errno: libc::EIO,
            });
        }
        let n = n as usize;
        // SAFETY: n <= len, so this stays within the caller's buffer.
        src = unsafe { src.add(n) };
        len -= n;
        off += n as u64;
    }
    Ok(())
}

impl PageStoreWriter {
    /// Creates the page store's files in `dir` (under temporary names), sizes
    /// the data file to `mem_len` (all holes) and allocates the bitmap and
    /// index buffers. Call this before forking. One writer per directory at
    /// a time: the temporary file names are fixed.
    pub fn prepare(dir: &Path, mem_len: usize) -> std::io::Result<Self> {
        Self::prepare_with(dir, mem_len, WriteOptions::default())
    }

    /// [`PageStoreWriter::prepare`] with options.
    pub fn prepare_with(
        dir: &Path,
        mem_len: usize,
        options: WriteOptions,
    ) -> std::io::Result<Self> {
        if mem_len == 0 || !mem_len.is_multiple_of(PAGE_SIZE) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("memory size {mem_len} is not a positive multiple of {PAGE_SIZE}"),
            ));
        }
        let pages = mem_len / PAGE_SIZE;
        let data_tmp_path = dir.join(format!(".{PAGES_FILE}.tmp"));
        let index_tmp_path = dir.join(format!(".{INDEX_FILE}.tmp"));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
        };
        let mut data = open(&data_tmp_path)?;
        data.set_len(mem_len as u64)?;
        let mut direct_io = false;
        if options.direct_io {
            // Filesystems without O_DIRECT refuse with EINVAL: stay buffered.
            if let Ok(direct) = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
                .open(&data_tmp_path)
            {
                data = direct;
                direct_io = true;
            }
        }
        let index = open(&index_tmp_path)?;
        let dir_fd = File::open(dir)?;
        let invalid = |_| std::io::Error::from_raw_os_error(libc::EINVAL);
        Ok(Self {
            dir: dir.to_path_buf(),
            mem_len,
            pages,
            data: data.into(),
            index: index.into(),
            dir_fd: dir_fd.into(),
            data_tmp: cpath(&data_tmp_path).map_err(invalid)?,
            data_final: cpath(&dir.join(PAGES_FILE)).map_err(invalid)?,
            index_tmp: cpath(&index_tmp_path).map_err(invalid)?,
            index_final: cpath(&dir.join(INDEX_FILE)).map_err(invalid)?,
            present: vec![0; pages.div_ceil(64)],
            index_buf: vec![0; index::index_len(pages)],
            present_count: 0,
            written: false,
            direct_io,
        })
    }

    /// Whether page data is written with `O_DIRECT`.
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }

    /// The image directory being written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Memory size this writer was prepared for.
    pub fn mem_len(&self) -> usize {
        self.mem_len
    }

    /// Writes every non-zero page of `mem` (`mem_len` bytes) to the data
    /// file, in runs of consecutive non-zero pages (one `pwrite` per run).
    /// Zero pages stay holes. If `populated` is given, pages whose bit is
    /// clear were never brought into `mem` (a lazily streamed clone) and are
    /// taken from `base` instead, with `copy_file_range` (falling back to
    /// `pwrite` from the base mapping); `mem` is not read for them.
    ///
    /// Allocation-free: safe in a forked child of a multithreaded process.
    ///
    /// # Safety
    /// `mem` must be page-aligned and valid for reads of `mem_len` bytes, and
    /// not written concurrently (pause the VM or call this in a fork).
    pub unsafe fn write_from(
        &mut self,
        mem: *const u8,
        base: Option<&PageStore>,
        populated: Option<&Bitmap>,
    ) -> Result<WriteSummary, WriteError> {
        if self.written {
            return Err(WriteError::WrongOrder);
        }
        if let Some(base) = base
            && base.pages() != self.pages
        {
            return Err(WriteError::BaseSizeMismatch {
                base: base.pages() as u64,
                memory: self.pages as u64,
            });
        }
        if let Some(p) = populated
            && p.len() != self.pages
        {
            return Err(WriteError::PopulatedSizeMismatch {
                bitmap: p.len() as u64,
                memory: self.pages as u64,
            });
        }
        let base_for_unpopulated = match (populated, base) {
            (Some(p), Some(b)) => Some((p, b)),
            (Some(_), None) => return Err(WriteError::PopulatedWithoutBase),
            (None, _) => None,
        };
        self.written = true;
        let mut summary = WriteSummary {
            pages: self.pages as u64,
            ..WriteSummary::default()
        };
        let classify = |page: usize| match base_for_unpopulated {
            Some((p, b)) if !p.get(page) => b.is_present(page).then_some(PageOrigin::Base),
            // SAFETY: `page < pages`, so the page lies within `mem`, which is
            // page-aligned and readable (caller's contract).
            _ if unsafe { page_is_zero(mem.add(page * PAGE_SIZE)) } => None,
            _ => Some(PageOrigin::Memory),
        };
        for (first, end, origin) in PageRuns::new(0, self.pages, classify) {
            // SAFETY: the run lies within `mem` (caller's contract).
            unsafe { self.flush_run(mem, base, origin, first, end)? };
            for page in first..end {
                self.present[page / 64] |= 1 << (page % 64);
            }
            let n = (end - first) as u64;
            summary.nonzero_pages += n;
            if origin == PageOrigin::Base {
                summary.pages_from_base += n;
            }
            summary.runs += 1;
        }
        self.present_count = summary.nonzero_pages;
        Ok(summary)
    }

    /// # Safety
    /// Pages `first..end` of `mem` must be readable when `origin` is Memory.
    unsafe fn flush_run(
        &self,
        mem: *const u8,
        base: Option<&PageStore>,
        origin: PageOrigin,
        first: usize,
        end: usize,
    ) -> Result<(), WriteError> {
        let off = first * PAGE_SIZE;
        let len = (end - first) * PAGE_SIZE;
        match origin {
            PageOrigin::Memory => {
                // SAFETY: the run is within `mem` (caller's contract).
                unsafe {
                    pwrite_all(
                        self.data.as_raw_fd(),
                        mem.add(off),
                        len,
                        off as u64,
                        WritePhase::WriteData,
                    )?
                }
            }
            PageOrigin::Base => {
                let base = base.expect("base origin implies a base store");
                self.copy_from_base(base, off, len)?;
            }
        }
        Ok(())
    }

    fn copy_from_base(&self, base: &PageStore, off: usize, len: usize) -> Result<(), WriteError> {
        let mut done = 0usize;
        while done < len {
            let mut off_in = (off + done) as libc::loff_t;
            let mut off_out = off_in;
            // SAFETY: copy_file_range between two open descriptors with
            // explicit offsets; no user memory is involved.
            let n = unsafe {
                libc::copy_file_range(
                    base.file().as_raw_fd(),
                    &mut off_in,
                    self.data.as_raw_fd(),
                    &mut off_out,
                    len - done,
                    0,
                )
            };
            if n > 0 {
                done += n as usize;
                continue;
            }
            let errno = if n == 0 { libc::EIO } else { last_errno() };
            match errno {
                libc::EINTR => continue,
                libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EIO => {
                    let src = base.as_mapping().as_ptr();
                    // SAFETY: `off + len` is within the base mapping, whose
                    // page count equals ours (checked in write_from).
                    return unsafe {
                        pwrite_all(
                            self.data.as_raw_fd(),
                            src.add(off + done),
                            len - done,
                            (off + done) as u64,
                            WritePhase::CopyFromBase,
                        )
                    };
                }
                errno => {
                    return Err(WriteError::Os {
                        phase: WritePhase::CopyFromBase,
                        errno,
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes the index, fsyncs both files, renames them to their final
    /// names and fsyncs the directory. Allocation-free. Write the state file
    /// ([`super::StateFile::write`]) after this: the state file is what makes
    /// a directory a complete live image.
    pub fn finish(mut self) -> Result<(), WriteError> {
        if !self.written {
            return Err(WriteError::WrongOrder);
        }
        index::encode_into(
            &mut self.index_buf,
            self.pages as u64,
            &self.present,
            self.present_count,
            FORMAT_VERSION,
        );
        // SAFETY: index_buf is an owned, initialised buffer of that length.
        unsafe {
            pwrite_all(
                self.index.as_raw_fd(),
                self.index_buf.as_ptr(),
                self.index_buf.len(),
                0,
                WritePhase::WriteIndex,
            )?;
        }
        for fd in [self.data.as_raw_fd(), self.index.as_raw_fd()] {
            // SAFETY: fsync on a descriptor we own.
            if unsafe { libc::fsync(fd) } != 0 {
                return Err(os(WritePhase::Sync));
            }
        }
        for (from, to) in [
            (&self.data_tmp, &self.data_final),
            (&self.index_tmp, &self.index_final),
        ] {
            // SAFETY: both are NUL-terminated paths owned by self.
            if unsafe { libc::rename(from.as_ptr(), to.as_ptr()) } != 0 {
                return Err(os(WritePhase::Rename));
            }
        }
        // SAFETY: fsync on the directory descriptor we own.
        if unsafe { libc::fsync(self.dir_fd.as_raw_fd()) } != 0 {
            return Err(os(WritePhase::SyncDir));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_error_round_trips_through_bytes() {
        for e in [
            WriteError::Os {
                phase: WritePhase::CopyFromBase,
                errno: libc::ENOSPC,
            },
            WriteError::BaseSizeMismatch { base: 3, memory: 4 },
            WriteError::PopulatedSizeMismatch {
                bitmap: 5,
                memory: 6,
            },
            WriteError::PopulatedWithoutBase,
            WriteError::WrongOrder,
        ] {
            assert_eq!(WriteError::from_bytes(&e.to_bytes()), Some(e));
        }
        assert_eq!(WriteError::from_bytes(&[0; 20]), None);
    }

    #[test]
    fn zero_check_finds_a_single_byte() {
        #[repr(align(4096))]
        struct Page([u8; PAGE_SIZE]);
        let mut p = Page([0; PAGE_SIZE]);
        // SAFETY: an aligned, readable page.
        assert!(unsafe { page_is_zero(p.0.as_ptr()) });
        for i in [0, 7, 63, 64, 2048, PAGE_SIZE - 1] {
            p.0[i] = 1;
            // SAFETY: as above.
            assert!(!unsafe { page_is_zero(p.0.as_ptr()) }, "byte {i}");
            p.0[i] = 0;
        }
    }
}
