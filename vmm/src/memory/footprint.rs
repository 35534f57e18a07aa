//! Memory footprint of a host address range (a VM's guest RAM): resident,
//! private and shared bytes from `/proc/<pid>/smaps`, and resident pages by
//! `mincore`. The smaps parser is pure and tested on its own.

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

#[cfg(test)]
mod tests {
    use super::*;

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
