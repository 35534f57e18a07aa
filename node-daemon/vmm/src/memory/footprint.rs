//! Memory footprint of a host address range (a VM's guest RAM): resident,
//! private and shared bytes from `/proc/<pid>/smaps`, and resident pages by
//! `mincore`. The smaps parser is pure and tested on its own.
//!
//! Also the node's footprint policy, as pure decisions: [`plan_reclaim`]
//! picks which clones give back how many bytes of clean, image-equal pages
//! when the node is over its memory budget, and [`image_clean_estimate`]
//! says how many such bytes a clone may hold, from its last reclaim scan.

use std::io;

use crate::memory::PAGE_SIZE;

/// Footprint of the mappings that lie inside a range. Figures come from
/// smaps, per mapping (VMA); a mapping that only partly overlaps the range is
/// counted whole (guest RAM is always whole mappings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RangeFootprint {
    /// Bytes of the mappings counted.
    pub size: u64,
    /// Resident bytes (`Rss`).
    pub resident: u64,
    /// Proportional set size (`Pss`): shared pages divided among sharers.
    pub proportional: u64,
    /// Resident pages mapped only here (`Private_Clean + Private_Dirty`),
    /// e.g. pages a clone wrote or received by `UFFDIO_COPY`.
    pub private: u64,
    /// Resident pages also mapped elsewhere (`Shared_Clean + Shared_Dirty`),
    /// e.g. image pages shared through the page cache.
    pub shared: u64,
    /// Anonymous bytes (`Anonymous`).
    pub anonymous: u64,
    /// Bytes of pages merged by KSM (`KSM`; kernels without the field: 0).
    pub ksm: u64,
}

impl RangeFootprint {
    /// Resident bytes this range alone holds: anonymous pages not merged by
    /// KSM (pages a clone wrote, pages `UFFDIO_COPY` put in). Unlike smaps'
    /// `Private_*`, an image page mapped from the page cache by only one
    /// clone is not counted: the node keeps it whether or not the clone runs.
    pub fn owned(&self) -> u64 {
        self.anonymous.saturating_sub(self.ksm).min(self.resident)
    }

    /// Resident bytes shared with the node (image pages in the page cache,
    /// KSM-merged pages): resident minus [`RangeFootprint::owned`].
    pub fn shared_with_node(&self) -> u64 {
        self.resident.saturating_sub(self.owned())
    }
}

/// Why the footprint could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum FootprintError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("mincore over {len} bytes at {addr:#x} failed")]
    Mincore {
        addr: usize,
        len: usize,
        #[source]
        source: io::Error,
    },
}

/// Footprint of `[addr, addr + len)` in process `pid` (`None`: this process).
pub fn range_footprint(
    pid: Option<u32>,
    addr: usize,
    len: usize,
) -> Result<RangeFootprint, FootprintError> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/smaps"),
        None => "/proc/self/smaps".to_string(),
    };
    let text = std::fs::read_to_string(&path).map_err(|source| FootprintError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(parse_smaps_range(&text, addr, addr + len))
}

/// Sums the smaps fields of every mapping that overlaps `[start, end)`.
pub fn parse_smaps_range(smaps: &str, start: usize, end: usize) -> RangeFootprint {
    let mut total = RangeFootprint::default();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            inside = lo < end && hi > start;
            if inside {
                total.size += (hi - lo) as u64;
            }
            continue;
        }
        if !inside {
            continue;
        }
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kib: u64 = rest
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or(0);
        let bytes = kib * 1024;
        match key {
            "Rss" => total.resident += bytes,
            "Pss" => total.proportional += bytes,
            "Private_Clean" | "Private_Dirty" => total.private += bytes,
            "Shared_Clean" | "Shared_Dirty" => total.shared += bytes,
            "Anonymous" => total.anonymous += bytes,
            "KSM" => total.ksm += bytes,
            _ => {}
        }
    }
    total
}

/// Resident bytes of `[addr, addr + len)` in this process by `mincore`
/// (page-exact; for file mappings it reports page-cache residency).
pub fn resident_bytes(addr: *const u8, len: usize) -> Result<u64, FootprintError> {
    let pages = len.div_ceil(PAGE_SIZE);
    let mut vec = vec![0u8; pages];
    // SAFETY: mincore only writes `pages` bytes into `vec`, which has that
    // length; the address range is only inspected, never accessed.
    let rc = unsafe { libc::mincore(addr.cast_mut().cast(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(FootprintError::Mincore {
            addr: addr as usize,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE as u64)
}

/// What the footprint policy knows about one clone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CloneUsage {
    /// Bytes charged to the clone (the PSS of its process).
    pub charged: u64,
    /// Bytes of its resident pages that may still equal the image and were
    /// never written (see [`image_clean_estimate`]); dropping them loses
    /// nothing, the next touch brings them back from the image.
    pub image_clean: u64,
}

/// One request of a [`ReclaimPlan`]: clone `clone` (index into the usage
/// slice) should drop up to `bytes` of clean image-equal pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReclaimRequest {
    pub clone: usize,
    pub bytes: u64,
}

/// What [`plan_reclaim`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReclaimPlan {
    /// Bytes used above the budget (0: within budget, no requests).
    pub over_budget: u64,
    /// Requests, the clone with the most clean pages first.
    pub requests: Vec<ReclaimRequest>,
    /// Bytes over budget that clean pages cannot cover: only data the clones
    /// wrote is left (the node should stop taking clones or move some away).
    pub shortfall: u64,
}

/// Smallest request worth a scan of a clone's memory.
pub const MIN_RECLAIM_BYTES: u64 = 16 * PAGE_SIZE as u64;

/// Decides which clones give back memory when the node uses more than
/// `budget` bytes: the sum of the clones' charges plus `node_cache` (memory
/// the node holds outside the clones). Only clean pages that still equal the
/// image are asked for — they can be streamed back — taken from the clones
/// holding the most of them first, so the fewest clones pay refaults.
/// Requests are page multiples, at least [`MIN_RECLAIM_BYTES`] unless that
/// is more than the clone holds.
pub fn plan_reclaim(budget: u64, node_cache: u64, clones: &[CloneUsage]) -> ReclaimPlan {
    let used = clones
        .iter()
        .fold(node_cache, |sum, c| sum.saturating_add(c.charged));
    let over_budget = used.saturating_sub(budget);
    let mut plan = ReclaimPlan {
        over_budget,
        ..ReclaimPlan::default()
    };
    if over_budget == 0 {
        return plan;
    }
    let page = PAGE_SIZE as u64;
    let mut order: Vec<usize> = (0..clones.len())
        .filter(|&i| clones[i].image_clean >= page)
        .collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(clones[i].image_clean), i));
    let mut remaining = over_budget;
    for i in order {
        if remaining == 0 {
            break;
        }
        let held = clones[i].image_clean / page * page;
        let want = remaining.max(MIN_RECLAIM_BYTES).div_ceil(page) * page;
        let bytes = want.min(held);
        remaining = remaining.saturating_sub(bytes);
        plan.requests.push(ReclaimRequest { clone: i, bytes });
    }
    plan.shortfall = remaining;
    plan
}

/// What a clone's last reclaim scan left behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CleanScan {
    /// The clone's owned bytes ([`RangeFootprint::owned`]) right after the scan.
    pub owned_after: u64,
    /// Image-equal bytes the scan found but did not drop.
    pub clean_left: u64,
}

/// Upper estimate of the clean image-equal bytes a clone holds now: never
/// scanned, all of its owned pages may be (a lazy clone's pages are copies
/// of the image until written); after a scan, what the scan left plus
/// whatever the clone's owned memory grew by since.
pub fn image_clean_estimate(last: Option<CleanScan>, owned_now: u64) -> u64 {
    match last {
        None => owned_now,
        Some(scan) => scan
            .clean_left
            .saturating_add(owned_now.saturating_sub(scan.owned_after))
            .min(owned_now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn usage(charged_mib: u64, clean_mib: u64) -> CloneUsage {
        CloneUsage {
            charged: charged_mib * MIB,
            image_clean: clean_mib * MIB,
        }
    }

    #[test]
    fn within_budget_asks_nothing() {
        let clones = [usage(10, 8), usage(10, 8)];
        let plan = plan_reclaim(20 * MIB, 0, &clones);
        assert_eq!(plan, ReclaimPlan::default());
        // The node cache counts against the budget too.
        let plan = plan_reclaim(20 * MIB, MIB, &clones);
        assert_eq!(plan.over_budget, MIB);
        assert_eq!(plan.requests.len(), 1);
    }

    #[test]
    fn takes_clean_pages_from_the_largest_holders_first() {
        let clones = [usage(10, 2), usage(30, 20), usage(20, 5), usage(5, 0)];
        let plan = plan_reclaim(40 * MIB, 0, &clones);
        assert_eq!(plan.over_budget, 25 * MIB);
        assert_eq!(
            plan.requests,
            vec![
                ReclaimRequest {
                    clone: 1,
                    bytes: 20 * MIB
                },
                ReclaimRequest {
                    clone: 2,
                    bytes: 5 * MIB
                },
            ]
        );
        assert_eq!(plan.shortfall, 0);
    }

    #[test]
    fn reports_what_clean_pages_cannot_cover() {
        let clones = [usage(50, 3), usage(50, 1), usage(50, 0)];
        let plan = plan_reclaim(100 * MIB, 0, &clones);
        assert_eq!(plan.requests.len(), 2, "{plan:?}");
        assert_eq!(plan.shortfall, 46 * MIB);
        // A clone with no clean page is never asked.
        assert!(plan.requests.iter().all(|r| r.clone != 2));
    }

    #[test]
    fn requests_are_whole_pages_and_not_tiny() {
        let clones = [CloneUsage {
            charged: 10 * MIB,
            image_clean: 5 * PAGE_SIZE as u64 + 100,
        }];
        let plan = plan_reclaim(10 * MIB - 1, 0, &clones);
        // One byte over: the request is rounded up to MIN_RECLAIM_BYTES,
        // capped at what the clone holds (whole pages).
        assert_eq!(plan.requests[0].bytes, 5 * PAGE_SIZE as u64);
        let big = [usage(10, 4)];
        let plan = plan_reclaim(10 * MIB - 1, 0, &big);
        assert_eq!(plan.requests[0].bytes, MIN_RECLAIM_BYTES);
        assert_eq!(plan.shortfall, 0);
    }

    #[test]
    fn estimate_follows_the_last_scan() {
        assert_eq!(image_clean_estimate(None, 7 * MIB), 7 * MIB);
        let scan = CleanScan {
            owned_after: 4 * MIB,
            clean_left: MIB,
        };
        // Nothing new since the scan: only what it left.
        assert_eq!(image_clean_estimate(Some(scan), 4 * MIB), MIB);
        // Grew by 3 MiB: those pages may be clean copies too.
        assert_eq!(image_clean_estimate(Some(scan), 7 * MIB), 4 * MIB);
        // Shrank (pages dropped elsewhere): never more than it owns.
        assert_eq!(image_clean_estimate(Some(scan), MIB / 2), MIB / 2);
    }

    #[test]
    fn owned_excludes_page_cache_and_ksm() {
        let f = RangeFootprint {
            resident: 10 * MIB,
            anonymous: 6 * MIB,
            ksm: 2 * MIB,
            ..RangeFootprint::default()
        };
        assert_eq!(f.owned(), 4 * MIB);
        assert_eq!(f.shared_with_node(), 6 * MIB);
    }

    const SMAPS: &str = "\
7f0000000000-7f0000200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                 512 kB
Pss:                 256 kB
Shared_Clean:        256 kB
Shared_Dirty:          0 kB
Private_Clean:         0 kB
Private_Dirty:       256 kB
Anonymous:           256 kB
VmFlags: rd wr mr mw me ac 
7f0000200000-7f0000400000 rw-p 00000000 08:01 1234 /img/memory.pages
Size:               2048 kB
Rss:                 100 kB
Pss:                 100 kB
Private_Clean:        40 kB
Private_Dirty:        60 kB
Anonymous:            60 kB
7f1000000000-7f1000001000 r--p 00000000 00:00 0 
Rss:                   4 kB
";

    #[test]
    fn sums_only_overlapping_mappings() {
        let f = parse_smaps_range(SMAPS, 0x7f00_0000_0000, 0x7f00_0040_0000);
        assert_eq!(f.size, 4 << 20);
        assert_eq!(f.resident, 612 * 1024);
        assert_eq!(f.proportional, 356 * 1024);
        assert_eq!(f.private, 356 * 1024);
        assert_eq!(f.shared, 256 * 1024);
        assert_eq!(f.anonymous, 316 * 1024);
        let g = parse_smaps_range(SMAPS, 0x7f00_0020_0000, 0x7f00_0020_1000);
        assert_eq!(g.resident, 100 * 1024);
        assert_eq!(
            parse_smaps_range(SMAPS, 0x1000, 0x2000),
            RangeFootprint::default()
        );
    }

    #[test]
    fn measures_this_process() {
        let len = 16 * PAGE_SIZE;
        let mut v = vec![0u8; len + PAGE_SIZE];
        let off = v.as_ptr().align_offset(PAGE_SIZE);
        for i in 0..len {
            v[off + i] = 1;
        }
        let r = resident_bytes(v[off..].as_ptr(), len).unwrap();
        assert_eq!(r, len as u64);
        let f = range_footprint(None, v.as_ptr() as usize, v.len()).unwrap();
        assert!(f.resident >= len as u64);
    }
}
