//! [`PageInstaller`]: installs pages into lazy memory from the caller's
//! buffers (a migration target's received pages, a hook's answers).

use std::io;

use super::errors::FillError;
use super::shared::PageInstaller;
use crate::image::Bitmap;
use crate::memory::PAGE_SIZE;

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
