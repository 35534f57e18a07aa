//! Filling runs of missing pages: zero pages with `UFFDIO_ZEROPAGE`, stored
//! pages with `UFFDIO_COPY` straight from a source's mapping or through a
//! bounce buffer, page by page where a run is partly present.

use std::sync::atomic::Ordering;

use super::errors::{FillError, errno_of};
use super::shared::Shared;
use crate::image::PageRuns;
use crate::memory::PAGE_SIZE;
use crate::memory::source::PageSource;

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

impl Shared {
    /// Fills the unpopulated pages of `first..first + count`, grouping
    /// consecutive pages of the same kind into one ioctl. Returns the number
    /// of pages this call filled. The caller holds the `serving` read lock.
    pub(super) fn fill_range(
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

    pub(super) fn mark_filled(&self, first: usize, end: usize) {
        for page in first..end {
            self.populated.set(page);
        }
    }

    pub(super) fn zero_run(&self, first: usize, end: usize) -> Result<usize, FillError> {
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

    pub(super) fn copy_run(
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
    pub(super) fn install_run(
        &self,
        src: &[u8],
        first: usize,
        end: usize,
    ) -> Result<usize, FillError> {
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

    pub(super) fn count_copied(&self, pages: usize) {
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
    pub(super) fn single_page_failed(
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
