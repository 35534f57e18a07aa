//! Giving memory back under pressure: drop a clone's resident pages that
//! still equal its image, so the next touch brings them back from the image
//! (lazy clones: a userfaultfd MISSING fault served from the page store;
//! copy-on-write clones: the page cache page is mapped again). Nothing the
//! guest wrote is ever dropped — a page is dropped only if its bytes equal
//! the image page at the moment of the drop, checked while the vCPUs are
//! paused.
//!
//! Which pages are looked at depends on the backing:
//!
//! * lazy: every populated page (its populated bit is cleared when it is
//!   dropped, so the fault handler fills it again and a capture takes it
//!   from the base image). Pages the image holds as zero are skipped (they
//!   are the shared zero page until written: nothing to give back).
//! * copy-on-write: only anonymous pages (written, or copied by a write
//!   fault), found with `/proc/self/pagemap`; clean pages are the image's
//!   page cache pages, shared with every clone and reclaimed by the kernel's
//!   LRU like any file page.
//! * lazy from another page source (`LazyFrom`, e.g. a remote node): the
//!   same as lazy when the source has a local mapping to compare against;
//!   otherwise nothing is dropped (comparing would read every page over the
//!   network, and a dropped page would be fetched again from afar).
//! * anonymous (booted VM): no image, nothing to drop.
//!
//! Two passes keep the pause short: candidates are found while the guest
//! runs, then, paused (and with the lazy fault handler quiesced), each
//! candidate is compared again and runs of still-equal pages are dropped with
//! `MADV_DONTNEED`. The pause grows with the bytes dropped, not with memory
//! size.

use std::io::{self, Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use super::{GuestRam, PAGE_SIZE, PageSource};
use crate::image::Bitmap;
use crate::machine::{Machine, MemoryBacking, PauseError};

/// What a reclaim did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Resident pages compared with the image.
    pub scanned_pages: u64,
    /// Of those, pages equal to the image (found while running).
    pub image_equal_pages: u64,
    /// Pages dropped (still equal while paused).
    pub dropped_pages: u64,
    /// How long the vCPUs were paused.
    pub paused: Duration,
    /// Whole reclaim.
    pub took: Duration,
}

impl ReclaimReport {
    /// Bytes dropped.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_pages * PAGE_SIZE as u64
    }

    /// Image-equal bytes found but not dropped (beyond the requested
    /// maximum, or written in between).
    pub fn clean_left_bytes(&self) -> u64 {
        self.image_equal_pages.saturating_sub(self.dropped_pages) * PAGE_SIZE as u64
    }
}

/// Why a reclaim failed.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    #[error("cannot pause the vCPUs to drop pages")]
    Pause(#[from] PauseError),
    #[error("cannot read /proc/self/pagemap for guest RAM")]
    Pagemap(#[source] io::Error),
    #[error("madvise(MADV_DONTNEED) of guest pages {first}..{end} failed")]
    Drop {
        first: usize,
        end: usize,
        #[source]
        source: io::Error,
    },
}

/// Drops up to `max_bytes` of `machine`'s resident pages that equal its
/// image, never the pages in `keep` (pages the CPU walks or fetches itself,
/// the mailbox page: hot, and on userfaultfd SIGBUS hosts not refillable
/// through an exit). `max_bytes == 0` only counts (no pause, no drop).
/// The vCPUs are paused for the drop; `resume_after` says whether to resume
/// them (false when the caller had them paused already).
pub fn drop_image_equal_pages(
    machine: &Machine,
    keep: &[usize],
    max_bytes: u64,
    resume_after: bool,
) -> Result<ReclaimReport, ReclaimError> {
    let started = Instant::now();
    let ram = machine.guest_ram();
    let nothing = || ReclaimReport {
        took: started.elapsed(),
        ..ReclaimReport::default()
    };
    let (image, resident): (&dyn PageSource, Vec<usize>) = match machine.backing() {
        // Installed memory: a dropped page would go to the installer's hook,
        // whose source (e.g. a migration) may be gone.
        MemoryBacking::Anonymous | MemoryBacking::Installed { .. } => return Ok(nothing()),
        MemoryBacking::CopyOnWrite(store) => (store.as_ref(), anonymous_pages(ram)?),
        MemoryBacking::Lazy { memory, base } => (
            base.as_ref(),
            populated_pages(memory.populated(), base.as_ref()),
        ),
        MemoryBacking::LazyFrom { memory, source } => {
            if source.pages() == 0 || source.mapped_page(0).is_none() {
                return Ok(nothing());
            }
            (
                source.as_ref(),
                populated_pages(memory.populated(), source.as_ref()),
            )
        }
    };
    let max_pages = max_bytes.div_ceil(PAGE_SIZE as u64) as usize;
    let mut report = ReclaimReport::default();
    let mut candidates = Vec::new();
    for page in resident {
        if keep.contains(&page) {
            continue;
        }
        report.scanned_pages += 1;
        if page_equals_image(ram, image, page) {
            report.image_equal_pages += 1;
            if candidates.len() < max_pages {
                candidates.push(page);
            }
        }
    }
    if candidates.is_empty() {
        report.took = started.elapsed();
        return Ok(report);
    }

    let paused_at = Instant::now();
    machine.pause()?;
    let quiesce = machine
        .backing()
        .lazy_memory()
        .map(|memory| (memory.quiesce(), memory.populated()));
    let dropped = drop_still_equal(ram, image, &candidates, quiesce.as_ref().map(|q| q.1));
    drop(quiesce);
    if resume_after {
        machine.resume();
    }
    report.paused = paused_at.elapsed();
    report.dropped_pages = dropped? as u64;
    report.took = started.elapsed();
    Ok(report)
}

/// Pages whose populated bit is set and whose image page is not zero.
fn populated_pages(populated: &Bitmap, image: &dyn PageSource) -> Vec<usize> {
    (0..populated.len())
        .filter(|&p| populated.word(p / 64) != 0 && populated.get(p) && !image.is_zero(p))
        .collect()
}

/// Pages of `ram` backed by an anonymous page in this process (pagemap:
/// present, not file-backed or shared).
fn anonymous_pages(ram: &GuestRam) -> Result<Vec<usize>, ReclaimError> {
    const PRESENT: u64 = 1 << 63;
    const FILE_OR_SHARED: u64 = 1 << 61;
    let mut file = std::fs::File::open("/proc/self/pagemap").map_err(ReclaimError::Pagemap)?;
    let first_entry = (ram.host_addr() as u64 / PAGE_SIZE as u64) * 8;
    file.seek(SeekFrom::Start(first_entry))
        .map_err(ReclaimError::Pagemap)?;
    let mut pages = Vec::new();
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = 0;
    while page < ram.pages() {
        let want = (ram.pages() - page).min(4096) * 8;
        file.read_exact(&mut buf[..want])
            .map_err(ReclaimError::Pagemap)?;
        for entry in buf[..want].chunks_exact(8) {
            let e = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            if e & PRESENT != 0 && e & FILE_OR_SHARED == 0 {
                pages.push(page);
            }
            page += 1;
        }
    }
    Ok(pages)
}

/// Whether guest page `page` holds exactly the image's page.
fn page_equals_image(ram: &GuestRam, image: &dyn PageSource, page: usize) -> bool {
    // SAFETY: page < ram.pages(): the 4 KiB lie inside the live guest RAM
    // mapping; the caller only passes resident pages, so reading does not
    // wait for a fault handler. The guest may write concurrently: the bytes
    // read are only a hint, re-checked while paused.
    let guest =
        unsafe { std::slice::from_raw_parts(ram.host_addr().add(page * PAGE_SIZE), PAGE_SIZE) };
    if image.is_zero(page) {
        return guest.iter().all(|&b| b == 0);
    }
    match image.mapped_page(page) {
        // SAFETY: `mapped_page` points at a read-only page that stays
        // valid and unchanged while `image` lives.
        Some(stored) => guest == unsafe { std::slice::from_raw_parts(stored, PAGE_SIZE) },
        // Without a local copy to compare with, a page is never dropped.
        None => false,
    }
}

/// Drops the candidates that still equal the image, in runs; the vCPUs are
/// paused and (lazy) fills quiesced. Returns the pages dropped.
fn drop_still_equal(
    ram: &GuestRam,
    image: &dyn PageSource,
    candidates: &[usize],
    populated: Option<&Bitmap>,
) -> Result<usize, ReclaimError> {
    let mut dropped = 0;
    let mut run: Option<(usize, usize)> = None;
    let flush = |first: usize, end: usize| -> Result<usize, ReclaimError> {
        // SAFETY: pages first..end lie inside guest RAM; MADV_DONTNEED
        // discards their contents, which equal the image (checked with the
        // vCPUs paused and no fill in flight), so the next touch brings the
        // same bytes back.
        let rc = unsafe {
            libc::madvise(
                ram.host_addr().add(first * PAGE_SIZE).cast(),
                (end - first) * PAGE_SIZE,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(ReclaimError::Drop {
                first,
                end,
                source: io::Error::last_os_error(),
            });
        }
        if let Some(populated) = populated {
            for page in first..end {
                populated.clear(page);
            }
        }
        Ok(end - first)
    };
    for &page in candidates {
        if populated.is_some_and(|p| !p.get(page)) || !page_equals_image(ram, image, page) {
            continue;
        }
        run = match run {
            Some((first, end)) if end == page => Some((first, page + 1)),
            Some((first, end)) => {
                dropped += flush(first, end)?;
                Some((page, page + 1))
            }
            None => Some((page, page + 1)),
        };
    }
    if let Some((first, end)) = run {
        dropped += flush(first, end)?;
    }
    Ok(dropped)
}
