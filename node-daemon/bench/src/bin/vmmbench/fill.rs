//! The host fill of the benchmark guests' data area: percentages of zero,
//! duplicated and random pages like `guests::FillSpec`, but decided per
//! cluster of consecutive pages (64 pages, 256 KiB) instead of per page.
//! Real guests' free memory comes in runs, and on this host it matters for
//! the bench itself: a page store's zero pages are holes, and deleting a
//! file with tens of thousands of holes on ext4 mounted with `discard` takes
//! minutes (measured: 21–91 s for 32768 holes), so per-page holes would
//! make the bench's own clean-up dominate its run time.
//!
//! The content of a non-zero page is `FillSpec`'s (seeded random bytes, or a
//! copy of one of 64 template pages), so the memory guest's checksums are
//! reproduced on the host with [`ClusteredFill::first_qword`].

use vmstream_vmm::guests::{FillSpec, page_gpa};
use vmstream_vmm::memory::PAGE_SIZE;
use vmstream_vmm::vstate::ram_access::RamAccess;

/// What a cluster of pages holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    Zero,
    Duplicate,
    Random,
}

/// A clustered host fill (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusteredFill {
    pub zero_percent: u8,
    pub duplicate_percent: u8,
    /// Pages per cluster (> 0).
    pub cluster_pages: u64,
    pub seed: u64,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl ClusteredFill {
    /// What the cluster of RAM page `page` holds.
    pub fn kind(&self, page: u64) -> ClusterKind {
        let cluster = page / self.cluster_pages.max(1);
        let roll = (mix(self.seed ^ cluster.wrapping_mul(0x2545_f491_4f6c_dd1d)) % 100) as u8;
        if roll < self.zero_percent {
            ClusterKind::Zero
        } else if roll < self.zero_percent.saturating_add(self.duplicate_percent) {
            ClusterKind::Duplicate
        } else {
            ClusterKind::Random
        }
    }

    /// The per-page fill that gives a non-zero page's content.
    fn content(&self, kind: ClusterKind) -> Option<FillSpec> {
        let (duplicate_percent, templates) = match kind {
            ClusterKind::Zero => return None,
            ClusterKind::Duplicate => (100, 64),
            ClusterKind::Random => (0, 0),
        };
        Some(FillSpec {
            zero_percent: 0,
            duplicate_percent,
            templates,
            seed: self.seed,
        })
    }

    /// First qword of RAM page `page` after the fill.
    pub fn first_qword(&self, page: u64) -> u64 {
        self.content(self.kind(page))
            .map_or(0, |spec| spec.first_qword(page))
    }

    /// The first page in `first..end` that is not a zero page.
    pub fn first_data_page(&self, first: u64, end: u64) -> Option<u64> {
        (first..end).find(|&page| self.kind(page) != ClusterKind::Zero)
    }

    /// Writes RAM pages `first..end` of `ram` (zero pages are left
    /// untouched, so they stay unpopulated); returns the pages written.
    pub fn fill(&self, ram: &RamAccess, first: u64, end: u64) -> u64 {
        let mut qwords = [0u64; PAGE_SIZE / 8];
        let mut bytes = [0u8; PAGE_SIZE];
        let mut written = 0;
        for page in first..end {
            let Some(spec) = self.content(self.kind(page)) else {
                continue;
            };
            spec.page_qwords(page, &mut qwords);
            for (chunk, q) in bytes.chunks_exact_mut(8).zip(qwords) {
                chunk.copy_from_slice(&q.to_le_bytes());
            }
            if ram.write_bytes(page_gpa(page), &bytes).is_ok() {
                written += 1;
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILL: ClusteredFill = ClusteredFill {
        zero_percent: 30,
        duplicate_percent: 10,
        cluster_pages: 64,
        seed: 9,
    };

    #[test]
    fn clusters_are_uniform_and_percentages_hold() {
        let mut counts = [0u32; 3];
        for cluster in 0..10_000u64 {
            let kind = FILL.kind(cluster * 64);
            assert!((1..64).all(|i| FILL.kind(cluster * 64 + i) == kind));
            counts[kind as usize] += 1;
        }
        assert!((2700..3300).contains(&counts[0]), "{counts:?}");
        assert!((800..1200).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn first_qword_matches_the_written_content() {
        let pages = 4096u64;
        let mut backing = vec![0u64; pages as usize * PAGE_SIZE / 8];
        // SAFETY: `backing` outlives the view and is not otherwise accessed
        // while the view writes.
        let ram = unsafe { RamAccess::new(backing.as_mut_ptr().cast(), pages as usize * 4096) };
        let written = FILL.fill(&ram, 512, pages);
        assert!(written > 0 && written < pages - 512);
        for page in 512..pages {
            let got = ram.read_u64_at_offset(page * 4096).unwrap();
            assert_eq!(got, FILL.first_qword(page), "page {page}");
            if FILL.kind(page) != ClusterKind::Zero {
                assert_ne!(got, 0, "page {page}");
            }
        }
        let first = FILL.first_data_page(512, pages).unwrap();
        assert_ne!(FILL.first_qword(first), 0);
        assert!(first == 512 || FILL.kind(first - 1) == ClusterKind::Zero);
    }
}
