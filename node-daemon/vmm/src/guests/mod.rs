//! The micro guests (assembled from `vmm/guests/*.S` by `build.rs`) and the
//! host-side knowledge about them: their parameters, the memory guest's page
//! choice and checksum (reproduced on the host to check the guest), the
//! counter guest's hash, and the host fill of guest memory with realistic
//! content (random pages, zero pages, duplicated pages).

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::{DATA_START, MMIO_HOLE_START};
use crate::devices::mailbox::ARGS;
use crate::memory::PAGE_SIZE;
use crate::vstate::ram_access::RamAccess;

static COUNTER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/counter.bin"));
static MEMORY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memory.bin"));
static REQUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/request.bin"));

/// A micro guest program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestProgram {
    /// Counts in a register and in memory forever, reporting progress.
    Counter,
    /// Touches pages on request and reports their checksum.
    Memory,
    /// Answers requests with a function of the request and a memory counter.
    Request,
}

impl GuestProgram {
    /// The flat binary, loaded at `layout::GUEST_LOAD_ADDR`.
    pub fn image(self) -> &'static [u8] {
        match self {
            Self::Counter => COUNTER,
            Self::Memory => MEMORY,
            Self::Request => REQUEST,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Memory => "memory",
            Self::Request => "request",
        }
    }
}

/// Counter guest: PARAMS\[0\] is the progress mask; a report is made every
/// `mask + 1` iterations (`mask + 1` must be a power of two).
pub const COUNTER_PARAM_MASK: usize = 0;

/// FNV-1a-style hash the counter guest keeps in r13 after `n` iterations.
pub fn counter_hash(n: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 1..=n {
        hash = (hash ^ i).wrapping_mul(0x100_0000_01b3);
    }
    hash
}

/// Request guest's answer to `n` when it has served `served` requests
/// (including this one).
pub fn request_answer(n: u64, served: u64) -> u64 {
    n.wrapping_mul(1_000_003).wrapping_add(served)
}

/// Page choice of a memory-guest touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TouchPattern {
    Sequential,
    Random,
    HotCold,
}

/// A memory-guest touch request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TouchCommand {
    /// First page of the region (RAM page index, ≥ DATA_START / 4 KiB).
    pub base_page: u64,
    /// Pages to touch.
    pub count: u64,
    pub pattern: TouchPattern,
    /// Pages in the region (> 0).
    pub region_pages: u64,
    /// Sequential stride in pages (< region_pages).
    pub stride: u64,
    /// 0 = read only; otherwise written at offset 0 of each page after reading.
    pub marker: u64,
    /// xorshift64 seed (non-zero).
    pub seed: u64,
}

/// Error in a touch command.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TouchCommandError {
    #[error("touch region is empty")]
    EmptyRegion,
    #[error("touch stride {stride} is not below the region size {region}")]
    Stride { stride: u64, region: u64 },
    #[error("touch seed is zero")]
    ZeroSeed,
    #[error("touch region pages {first}..{end} are outside the data area of {ram_pages} RAM pages")]
    OutsideData {
        first: u64,
        end: u64,
        ram_pages: u64,
    },
}

/// Checksum a memory guest reports for a touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TouchResult {
    pub sum: u64,
    pub xor: u64,
    pub pages: u64,
}

impl TouchCommand {
    /// Checks the command against a RAM of `ram_pages` pages.
    pub fn validate(&self, ram_pages: u64) -> Result<(), TouchCommandError> {
        if self.region_pages == 0 {
            return Err(TouchCommandError::EmptyRegion);
        }
        if self.pattern == TouchPattern::Sequential && self.stride >= self.region_pages {
            return Err(TouchCommandError::Stride {
                stride: self.stride,
                region: self.region_pages,
            });
        }
        if self.pattern != TouchPattern::Sequential && self.seed == 0 {
            return Err(TouchCommandError::ZeroSeed);
        }
        let first = self.base_page;
        let end = self.base_page.saturating_add(self.region_pages);
        if first < DATA_START / PAGE_SIZE as u64 || end > ram_pages {
            return Err(TouchCommandError::OutsideData {
                first,
                end,
                ram_pages,
            });
        }
        Ok(())
    }

    /// Request arguments (argument 7, the sequence number, is set by the
    /// mailbox).
    pub fn args(&self) -> [u64; ARGS] {
        let pattern = match self.pattern {
            TouchPattern::Sequential => 0,
            TouchPattern::Random => 1,
            TouchPattern::HotCold => 2,
        };
        [
            self.base_page,
            self.count,
            pattern,
            self.region_pages,
            self.stride,
            self.marker,
            self.seed,
            0,
        ]
    }

    /// The RAM pages the guest touches, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let hot = (self.region_pages >> 3).max(1);
        let mut position = 0u64;
        let mut x = self.seed;
        (0..self.count).map(move |_| {
            let index = match self.pattern {
                TouchPattern::Sequential => {
                    let index = position;
                    position += self.stride;
                    if position >= self.region_pages {
                        position -= self.region_pages;
                    }
                    index
                }
                TouchPattern::Random => {
                    x = xorshift64(x);
                    x % self.region_pages
                }
                TouchPattern::HotCold => {
                    x = xorshift64(x);
                    if (x & 0xff) < 230 {
                        (x >> 8) % hot
                    } else {
                        (x >> 8) % self.region_pages
                    }
                }
            };
            self.base_page + index
        })
    }

    /// The result the guest must report, given the first qword of each page
    /// before the touch (`first_qword(page)`); applies the marker writes.
    pub fn expected(&self, mut first_qword: impl FnMut(u64) -> u64) -> TouchResult {
        let mut written = std::collections::HashSet::new();
        let mut result = TouchResult {
            sum: 0,
            xor: 0,
            pages: self.count,
        };
        for page in self.pages() {
            let value = if written.contains(&page) {
                self.marker
            } else {
                first_qword(page)
            };
            result.sum = result.sum.wrapping_add(value);
            result.xor ^= value;
            if self.marker != 0 {
                written.insert(page);
            }
        }
        result
    }
}

/// The xorshift64 step the memory guest uses.
pub fn xorshift64(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Guest physical address of RAM page `page` (pages from 3 GiB on live above
/// the MMIO hole), as the memory guest computes it.
pub fn page_gpa(page: u64) -> u64 {
    crate::arch::x86_64::layout::ram_offset_to_gpa(page * PAGE_SIZE as u64)
}

const _: () = assert!(MMIO_HOLE_START.is_multiple_of(PAGE_SIZE as u64));

/// How the host fills the data area of guest RAM before a guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FillSpec {
    /// Percentage of pages left zero.
    pub zero_percent: u8,
    /// Percentage of pages that are copies of one of `templates` pages.
    pub duplicate_percent: u8,
    /// Number of distinct duplicated pages.
    pub templates: u32,
    pub seed: u64,
}

/// What one page of the data area holds after the fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFill {
    Zero,
    /// A copy of template `n`.
    Duplicate(u32),
    /// Random bytes from the stream seeded with the value.
    Random(u64),
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl FillSpec {
    /// What RAM page `page` holds (pages below the data area are not filled).
    pub fn page(&self, page: u64) -> PageFill {
        let h = splitmix64(self.seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let roll = (h % 100) as u8;
        if roll < self.zero_percent {
            PageFill::Zero
        } else if roll < self.zero_percent.saturating_add(self.duplicate_percent)
            && self.templates > 0
        {
            PageFill::Duplicate(((h >> 32) % u64::from(self.templates)) as u32)
        } else {
            PageFill::Random(h | 1)
        }
    }

    fn stream_seed(&self, fill: PageFill) -> Option<u64> {
        match fill {
            PageFill::Zero => None,
            PageFill::Duplicate(t) => Some(splitmix64(self.seed ^ 0xd0d0_d0d0 ^ u64::from(t)) | 1),
            PageFill::Random(seed) => Some(seed),
        }
    }

    /// The page's content as qwords (zero page: all zero).
    pub fn page_qwords(&self, page: u64, out: &mut [u64; PAGE_SIZE / 8]) {
        match self.stream_seed(self.page(page)) {
            None => out.fill(0),
            Some(mut x) => {
                for q in out.iter_mut() {
                    x = xorshift64(x);
                    *q = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
                }
            }
        }
    }

    /// First qword of page `page` after the fill.
    pub fn first_qword(&self, page: u64) -> u64 {
        match self.stream_seed(self.page(page)) {
            None => 0,
            Some(x) => xorshift64(x).wrapping_mul(0x2545_f491_4f6c_dd1d),
        }
    }

    /// Fills the data area of `ram` (RAM offsets `DATA_START..len`); zero
    /// pages are not written, so they stay unpopulated. Returns the number
    /// of pages written.
    pub fn fill(&self, ram: &RamAccess) -> u64 {
        let mut buffer = [0u64; PAGE_SIZE / 8];
        let mut written = 0;
        for page in DATA_START / PAGE_SIZE as u64..ram.len() / PAGE_SIZE as u64 {
            if self.page(page) == PageFill::Zero {
                continue;
            }
            self.page_qwords(page, &mut buffer);
            let offset = page as usize * PAGE_SIZE;
            // SAFETY: offset + PAGE_SIZE <= ram.len(), inside the live
            // mapping; the buffer is host memory that does not overlap it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    buffer.as_ptr().cast::<u8>(),
                    ram.base().add(offset),
                    PAGE_SIZE,
                );
            }
            written += 1;
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_are_embedded() {
        for guest in [
            GuestProgram::Counter,
            GuestProgram::Memory,
            GuestProgram::Request,
        ] {
            let image = guest.image();
            assert!(!image.is_empty() && image.len() < 4096, "{}", guest.name());
        }
    }

    #[test]
    fn counter_hash_is_the_fold_of_the_counter() {
        assert_eq!(counter_hash(0), 0xcbf2_9ce4_8422_2325);
        let one = (0xcbf2_9ce4_8422_2325u64 ^ 1).wrapping_mul(0x100_0000_01b3);
        assert_eq!(counter_hash(1), one);
    }

    fn command(pattern: TouchPattern) -> TouchCommand {
        TouchCommand {
            base_page: 512,
            count: 1000,
            pattern,
            region_pages: 100,
            stride: 7,
            marker: 0,
            seed: 42,
        }
    }

    #[test]
    fn sequential_touches_wrap_with_stride() {
        let pages: Vec<_> = command(TouchPattern::Sequential).pages().take(16).collect();
        assert_eq!(&pages[..3], &[512, 519, 526]);
        assert_eq!(pages[15], 512 + (15 * 7) % 100);
        assert!(pages.iter().all(|p| (512..612).contains(p)));
    }

    #[test]
    fn random_and_hot_cold_stay_in_region_and_hot_is_skewed() {
        let random: Vec<_> = command(TouchPattern::Random).pages().collect();
        assert!(random.iter().all(|p| (512..612).contains(p)));
        let hot_cold: Vec<_> = command(TouchPattern::HotCold).pages().collect();
        assert!(hot_cold.iter().all(|p| (512..612).contains(p)));
        let hot = hot_cold.iter().filter(|&&p| p < 512 + 12).count();
        assert!(hot > 800, "hot pages touched {hot} of 1000");
    }

    #[test]
    fn expected_applies_marker_writes() {
        let mut cmd = command(TouchPattern::Sequential);
        cmd.count = 3;
        cmd.stride = 50;
        cmd.marker = 9;
        // Pages 512, 562, 512: the second visit of 512 reads the marker.
        let result = cmd.expected(|page| page);
        assert_eq!(result.sum, 512 + 562 + 9);
        assert_eq!(result.xor, 512 ^ 562 ^ 9);
    }

    #[test]
    fn validate_refuses_bad_commands() {
        let cmd = command(TouchPattern::Random);
        assert_eq!(cmd.validate(1 << 20), Ok(()));
        assert!(
            TouchCommand {
                region_pages: 0,
                ..cmd
            }
            .validate(1 << 20)
            .is_err()
        );
        assert!(TouchCommand { seed: 0, ..cmd }.validate(1 << 20).is_err());
        assert!(
            TouchCommand {
                base_page: 10,
                ..cmd
            }
            .validate(1 << 20)
            .is_err()
        );
        assert!(cmd.validate(600).is_err());
    }

    #[test]
    fn fill_percentages_are_roughly_respected() {
        let spec = FillSpec {
            zero_percent: 30,
            duplicate_percent: 20,
            templates: 8,
            seed: 7,
        };
        let (mut zero, mut dup) = (0, 0);
        for page in 0..10_000 {
            match spec.page(page) {
                PageFill::Zero => zero += 1,
                PageFill::Duplicate(_) => dup += 1,
                PageFill::Random(_) => {}
            }
        }
        assert!((2500..3500).contains(&zero), "{zero}");
        assert!((1500..2500).contains(&dup), "{dup}");
        let mut page = [0u64; PAGE_SIZE / 8];
        for p in 0..100 {
            spec.page_qwords(p, &mut page);
            assert_eq!(page[0], spec.first_qword(p));
        }
    }

    #[test]
    fn fill_writes_pages_that_match_the_spec() {
        let pages = DATA_START as usize / PAGE_SIZE + 64;
        let mut backing = vec![0u64; pages * PAGE_SIZE / 8];
        // SAFETY: `backing` outlives the view.
        let ram = unsafe { RamAccess::new(backing.as_mut_ptr().cast(), pages * PAGE_SIZE) };
        let spec = FillSpec {
            zero_percent: 25,
            duplicate_percent: 25,
            templates: 2,
            seed: 1,
        };
        spec.fill(&ram);
        for page in (DATA_START / 4096)..pages as u64 {
            let got = ram.read_u64_at_offset(page * 4096).unwrap();
            assert_eq!(got, spec.first_qword(page));
        }
        assert_eq!(ram.read_u64_at_offset(0).unwrap(), 0);
    }
}
