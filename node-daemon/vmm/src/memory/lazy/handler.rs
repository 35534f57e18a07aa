//! The fault-serving thread (missing-page and write-protect events read
//! from the userfaultfd) and the background prefetcher.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use userfaultfd::{Event, EventBuffer, FaultKind};

use super::affinity::pin_thread;
use super::errors::{FillError, errno_of};
use super::shared::{Attached, PageInstaller, Shared};
use crate::memory::PAGE_SIZE;

impl Shared {
    /// The fault-serving thread: wait for a source, then block in `read` on
    /// the userfaultfd and serve each batch of events, until a fault on the
    /// sentinel page (or `stop` before blocking) ends it.
    pub(super) fn serve_faults(self: &Arc<Self>, cpu: Option<usize>, fault_around: usize) {
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
    pub(super) fn serve_events(
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
    pub(super) fn prefetch_all(&self, batch: usize) {
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
}
