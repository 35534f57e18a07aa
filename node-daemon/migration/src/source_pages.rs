//! Which pages of the source VM the target lacks, and what each is on the
//! wire. Pages never touched since the clone started are still the live
//! image's (the target has it); of the others, pages whose content equals
//! the image page are sent as "clean" (a header, no data). How the touched
//! set is found depends on the memory backing:
//!
//! * lazily streamed clone: the pages the fault handler populated;
//! * copy-on-write clone: the pages that became private anonymous copies
//!   (written), from `/proc/self/pagemap` — exact, no comparison needed;
//! * booted VM (no image): every page; zero pages are sent as "zero".
//!
//! Precopy rounds find pages written since they were sent by content
//! hashing ([`PageHashes`]): KVM dirty logging needs the VM fd, which the
//! VMM keeps private (noted in `docs/MIGRATION.md`); userfaultfd
//! write-protect covers only lazily streamed clones made with it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vmstream_vmm::image::PageStore;
use vmstream_vmm::machine::{Machine, MemoryBacking};
use vmstream_vmm::memory::PAGE_SIZE;

/// What a page is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// Its bytes.
    Data,
    /// Identical to the live image page.
    Clean,
    /// All zero (no image).
    Zero,
}

/// The source VM's memory as migration reads it.
pub struct SourceMemory {
    base: *const u8,
    pages: usize,
    image: Option<Arc<PageStore>>,
    /// Whether touched pages may still equal the image (compare them).
    compare: bool,
    touched: Vec<u64>,
    /// Made [`SourceMemory::without_image`].
    ignore_image: bool,
}

// SAFETY: the pointer is the paused (or running, for precopy) VM's guest
// RAM, which the caller keeps mapped while this value lives; reads race only
// with the guest's own writes, which migration tracks.
unsafe impl Send for SourceMemory {}
// SAFETY: see above; all access is read-only.
unsafe impl Sync for SourceMemory {}

/// Why the source's touched pages could not be found.
#[derive(Debug, thiserror::Error)]
pub enum TouchedPagesError {
    #[error("cannot read /proc/self/pagemap for guest RAM")]
    Pagemap(#[source] io::Error),
}

const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE_OR_SHARED: u64 = 1 << 61;

impl SourceMemory {
    /// Looks at `machine`'s backing and finds the pages that may differ
    /// from its image. Call with the VM paused for the final set; during
    /// precopy the set only grows, which later rounds pick up.
    pub fn of(machine: &Machine) -> Result<Self, TouchedPagesError> {
        let ram = machine.guest_ram();
        let pages = ram.pages();
        let base = ram.host_addr() as *const u8;
        let (image, compare, touched) = match machine.backing() {
            MemoryBacking::Lazy { memory, base } => {
                (Some(Arc::clone(base)), true, memory.populated().to_words())
            }
            MemoryBacking::CopyOnWrite(store) => (
                Some(Arc::clone(store)),
                false,
                private_pages(base as usize, pages).map_err(TouchedPagesError::Pagemap)?,
            ),
            // Received by migration: every page is installed; those still
            // equal to this node's image go as Clean.
            MemoryBacking::Installed { image, .. } => {
                (image.clone(), image.is_some(), all_pages(pages))
            }
            // Streamed from another node: no local image to compare with.
            MemoryBacking::Anonymous | MemoryBacking::LazyFrom { .. } => {
                (None, false, all_pages(pages))
            }
        };
        Ok(Self {
            base,
            pages,
            image,
            compare,
            touched,
            ignore_image: false,
        })
    }

    /// Re-reads the touched set (it grows while the VM runs). A source
    /// made [`SourceMemory::without_image`] stays so.
    pub fn refresh(&mut self, machine: &Machine) -> Result<(), TouchedPagesError> {
        let fresh = Self::of(machine)?;
        *self = if self.ignore_image {
            fresh.without_image()
        } else {
            fresh
        };
        Ok(())
    }

    /// Ignores the live image (the target does not hold it): every page is
    /// a candidate, zero pages are announced as zero, the rest crosses as
    /// data. Pages a lazy clone never populated are read through its
    /// mapping (its fault handler brings them in from the image).
    pub fn without_image(mut self) -> Self {
        self.image = None;
        self.ignore_image = true;
        self.compare = false;
        self.touched = all_pages(self.pages);
        self
    }

    /// Treats every page as touched (compared with the image if there is
    /// one): the safe fallback when the touched set cannot be read.
    pub fn touch_all(&mut self) {
        self.touched = all_pages(self.pages);
        self.compare = self.image.is_some();
    }

    /// Adds pages known to be written (e.g. from KVM's dirty log) to the
    /// touched set, without re-reading the backing.
    pub fn add_touched(&mut self, words: &[u64]) {
        for (t, w) in self.touched.iter_mut().zip(words) {
            *t |= w;
        }
    }

    /// Number of guest pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The image the VM was cloned from, if any.
    pub fn image(&self) -> Option<&Arc<PageStore>> {
        self.image.as_ref()
    }

    /// Pages that may differ from the image (word bitmap).
    pub fn touched_words(&self) -> &[u64] {
        &self.touched
    }

    /// Number of touched pages.
    pub fn touched_count(&self) -> usize {
        self.touched.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether `page` may differ from the image.
    pub fn is_touched(&self, page: usize) -> bool {
        self.touched[page / 64] & (1 << (page % 64)) != 0
    }

    /// Page `page` of guest RAM (valid while the VM's RAM is mapped).
    pub fn page(&self, page: usize) -> &[u8] {
        assert!(page < self.pages, "page {page} out of range");
        // SAFETY: inside guest RAM, which outlives self (see the Send impl).
        unsafe { std::slice::from_raw_parts(self.base.add(page * PAGE_SIZE), PAGE_SIZE) }
    }

    /// Pages `first..first + count` as one slice.
    pub fn pages_slice(&self, first: usize, count: usize) -> &[u8] {
        assert!(first + count <= self.pages, "pages out of range");
        // SAFETY: inside guest RAM, which outlives self.
        unsafe { std::slice::from_raw_parts(self.base.add(first * PAGE_SIZE), count * PAGE_SIZE) }
    }

    /// What `page` is on the wire (a touched page; untouched pages are
    /// clean by construction).
    pub fn classify(&self, page: usize) -> PageKind {
        if !self.is_touched(page) {
            return if self.image.is_some() {
                PageKind::Clean
            } else {
                PageKind::Zero
            };
        }
        let bytes = self.page(page);
        match &self.image {
            None => {
                if is_zero(bytes) {
                    PageKind::Zero
                } else {
                    PageKind::Data
                }
            }
            Some(image) if self.compare => {
                let same = if image.is_present(page) {
                    // SAFETY: the image mapping covers every page of the
                    // image and stays mapped while `image` lives.
                    let img = unsafe {
                        std::slice::from_raw_parts(image.as_mapping().page_ptr(page), PAGE_SIZE)
                    };
                    img == bytes
                } else {
                    is_zero(bytes)
                };
                if same {
                    PageKind::Clean
                } else {
                    PageKind::Data
                }
            }
            Some(_) => PageKind::Data,
        }
    }
}

fn all_pages(pages: usize) -> Vec<u64> {
    let mut words = vec![u64::MAX; pages.div_ceil(64)];
    if !pages.is_multiple_of(64)
        && let Some(last) = words.last_mut()
    {
        *last = (1u64 << (pages % 64)) - 1;
    }
    words
}

/// Pages of a private file mapping that hold private (written) copies or
/// were swapped out: present and not file-backed, or swapped.
fn private_pages(base: usize, pages: usize) -> io::Result<Vec<u64>> {
    let file = File::open("/proc/self/pagemap")?;
    let mut words = vec![0u64; pages.div_ceil(64)];
    let chunk = 64 * 1024;
    let mut buf = vec![0u8; chunk * 8];
    let mut page = 0;
    while page < pages {
        let n = chunk.min(pages - page);
        let offset = ((base / PAGE_SIZE + page) * 8) as u64;
        file.read_exact_at(&mut buf[..n * 8], offset)?;
        for i in 0..n {
            let e = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            let private = e & PAGEMAP_PRESENT != 0 && e & PAGEMAP_FILE_OR_SHARED == 0;
            if private || e & PAGEMAP_SWAPPED != 0 {
                let p = page + i;
                words[p / 64] |= 1 << (p % 64);
            }
        }
        page += n;
    }
    Ok(words)
}

/// Whether a page is all zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to splits safely.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && body.chunks(8).all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

/// A 64-bit hash of a page's content (four independent multiply-rotate
/// lanes, folded): detects pages written since they were sent.
pub fn page_hash(bytes: &[u8]) -> u64 {
    const K: [u64; 4] = [
        0x9E37_79B9_7F4A_7C15,
        0xC2B2_AE3D_27D4_EB4F,
        0x1656_67B1_9E37_79F9,
        0x85EB_CA77_C2B2_AE63,
    ];
    let mut lanes = [1u64, 2, 3, 4];
    for chunk in bytes.chunks_exact(32) {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(chunk[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            *lane = (*lane ^ w).wrapping_mul(K[i]).rotate_left(29);
        }
    }
    lanes
        .iter()
        .fold(0u64, |h, &l| (h ^ l).wrapping_mul(K[0]).rotate_left(31))
}

/// Content hashes of the pages as they were sent, for precopy rounds.
#[derive(Debug)]
pub struct PageHashes {
    hashes: Vec<u64>,
    sent: Vec<u64>,
}

impl PageHashes {
    /// Nothing sent yet.
    pub fn new(pages: usize) -> Self {
        Self {
            hashes: vec![0; pages],
            sent: vec![0; pages.div_ceil(64)],
        }
    }

    /// Records that `page` went out with content hashing to `hash`.
    pub fn record(&mut self, page: usize, hash: u64) {
        self.hashes[page] = hash;
        self.sent[page / 64] |= 1 << (page % 64);
    }

    /// Whether `page` was sent in an earlier round.
    pub fn was_sent(&self, page: usize) -> bool {
        self.sent[page / 64] & (1 << (page % 64)) != 0
    }

    /// Pages sent before whose content changed since.
    pub fn changed(&self, memory: &SourceMemory) -> Vec<u64> {
        self.changed_among(memory, &self.sent)
    }

    /// Pages of `candidates` (word bitmap, e.g. the pages written since the
    /// last round) that were sent before and whose content changed since:
    /// a page written back with the bytes it had is not sent again. Costs
    /// one hash per candidate.
    pub fn changed_among(&self, memory: &SourceMemory, candidates: &[u64]) -> Vec<u64> {
        let mut words = vec![0u64; self.sent.len()];
        for (w, (&sent, &candidate)) in self.sent.iter().zip(candidates).enumerate() {
            let mut bits = sent & candidate;
            while bits != 0 {
                let page = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if page_hash(memory.page(page)) != self.hashes[page] {
                    words[w] |= 1 << (page % 64);
                }
            }
        }
        words
    }

    /// Pages sent in some round (word bitmap).
    pub fn sent_words(&self) -> &[u64] {
        &self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[1] = 1;
        assert!(!is_zero(&page));
    }

    #[test]
    fn hash_changes_with_any_word() {
        let page = vec![0u8; PAGE_SIZE];
        let h0 = page_hash(&page);
        for at in [0, 8, 16, 24, 2048, 4088] {
            let mut p = page.clone();
            p[at] = 1;
            assert_ne!(page_hash(&p), h0, "write at {at} not seen");
        }
        // Swapping two words is a different page, with a different hash.
        let mut a = vec![0u8; PAGE_SIZE];
        a[0] = 1;
        let mut b = vec![0u8; PAGE_SIZE];
        b[32] = 1;
        assert_ne!(page_hash(&a), page_hash(&b));
    }

    #[test]
    fn all_pages_sets_exactly_the_pages() {
        let words = all_pages(130);
        assert_eq!(words.len(), 3);
        assert_eq!(words[2], 0b11);
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 130);
    }

    #[test]
    fn pagemap_sees_written_private_pages() {
        // A private file mapping: read pages stay file pages, written
        // pages become private copies.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 4 * PAGE_SIZE]).unwrap();
        let f = File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh private mapping of our file, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let p = addr.cast::<u8>();
        // SAFETY: inside the 4-page mapping.
        unsafe {
            let _ = p.read_volatile();
            p.add(2 * PAGE_SIZE).write_volatile(7);
        }
        let words = private_pages(addr as usize, 4).unwrap();
        assert_eq!(words, vec![0b100]);
        // SAFETY: unmaps our mapping.
        unsafe { libc::munmap(addr, 4 * PAGE_SIZE) };
    }
}
