//! Pure decisions of a migration, kept apart from I/O so they are tested
//! directly: the order the source pushes pages in (neighbours of faulted
//! pages first), when precopy rounds stop, and grouping pages into runs.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a VM moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    /// Switch over at once; memory follows (faults first, then a push).
    Postcopy,
    /// Copy memory while the VM runs, round by round, until what is left
    /// fits the downtime target (or rounds run out); then stop and copy.
    Precopy,
    /// A few precopy rounds, then postcopy for what is left.
    Hybrid,
}

impl MigrationMode {
    /// Wire value (Hello).
    pub fn to_wire(self) -> u32 {
        match self {
            Self::Postcopy => 1,
            Self::Precopy => 2,
            Self::Hybrid => 3,
        }
    }

    /// From the wire value.
    pub fn from_wire(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Postcopy),
            2 => Some(Self::Precopy),
            3 => Some(Self::Hybrid),
            _ => None,
        }
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "postcopy" => Ok(Self::Postcopy),
            "precopy" => Ok(Self::Precopy),
            "hybrid" => Ok(Self::Hybrid),
            _ => Err(format!(
                "unknown migration mode {s:?} (postcopy, precopy, hybrid)"
            )),
        }
    }
}

/// Pages pushed ahead of a faulted page (its likely next touches).
pub const NEIGHBOURS_AHEAD: usize = 64;
/// Pages pushed behind a faulted page.
pub const NEIGHBOURS_BEHIND: usize = 8;

/// Order in which the source pushes pending pages: ranges around faulted
/// pages first (most recent fault first), then the rest in page order.
/// Each page is handed out at most once.
#[derive(Debug)]
pub struct PushOrder {
    pending: Vec<u64>,
    pages: usize,
    left: usize,
    cursor: usize,
    hints: VecDeque<(usize, usize)>,
}

impl PushOrder {
    /// Pages whose bits are set in `words` (bit p = bit p%64 of word p/64)
    /// are pending.
    pub fn new(words: Vec<u64>, pages: usize) -> Self {
        let left = words.iter().map(|w| w.count_ones() as usize).sum();
        Self {
            pending: words,
            pages,
            left,
            cursor: 0,
            hints: VecDeque::new(),
        }
    }

    /// Pending pages not handed out yet.
    pub fn left(&self) -> usize {
        self.left
    }

    fn is_pending(&self, page: usize) -> bool {
        self.pending[page / 64] & (1 << (page % 64)) != 0
    }

    fn take(&mut self, page: usize) {
        self.pending[page / 64] &= !(1 << (page % 64));
        self.left -= 1;
    }

    /// Drops `page` from the pending set (it went out another way).
    pub fn forget(&mut self, page: usize) {
        if page < self.pages && self.is_pending(page) {
            self.take(page);
        }
    }

    /// The target faulted on `page`: push its neighbourhood next.
    pub fn fault_at(&mut self, page: usize) {
        let first = page.saturating_sub(NEIGHBOURS_BEHIND);
        let end = (page + 1 + NEIGHBOURS_AHEAD).min(self.pages);
        self.hints.push_front((page + 1, end));
        self.hints.push_back((first, page));
        // Bound the queue: old hints matter less than the fresh ones.
        self.hints.truncate(256);
    }

    /// The next run of consecutive pending pages, at most `max` long, for
    /// which `skip(page)` is false (pages already sent are dropped).
    pub fn next_run(&mut self, max: usize, skip: impl Fn(usize) -> bool) -> Option<(usize, usize)> {
        while let Some((start, end)) = self.hints.pop_front() {
            if let Some(run) = self.run_in(start, end, max, &skip) {
                if run.0 + run.1 < end {
                    self.hints.push_front((run.0 + run.1, end));
                }
                return Some(run);
            }
        }
        while self.cursor < self.pages {
            if let Some(run) = self.run_in(self.cursor, self.pages, max, &skip) {
                self.cursor = run.0 + run.1;
                return Some(run);
            }
            self.cursor = self.pages;
        }
        None
    }

    fn run_in(
        &mut self,
        start: usize,
        end: usize,
        max: usize,
        skip: &impl Fn(usize) -> bool,
    ) -> Option<(usize, usize)> {
        let mut page = start;
        while page < end {
            let word = self.pending[page / 64] >> (page % 64);
            if word == 0 {
                page = (page / 64 + 1) * 64;
                continue;
            }
            page += word.trailing_zeros() as usize;
            if page >= end {
                return None;
            }
            if skip(page) {
                self.take(page);
                page += 1;
                continue;
            }
            let first = page;
            while page < end && page - first < max && self.is_pending(page) && !skip(page) {
                self.take(page);
                page += 1;
            }
            return Some((first, page - first));
        }
        None
    }
}

/// What to do after a precopy round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundDecision {
    /// Copy the pages dirtied during the last round while the VM runs.
    AnotherRound,
    /// Pause and copy what is left (precopy).
    StopAndCopy,
    /// Pause and switch over; what is left follows by postcopy (hybrid).
    SwitchToPostcopy,
}

/// Limits of the precopy phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrecopyLimits {
    /// Downtime the final copy should fit in.
    pub downtime_target: Duration,
    /// Most rounds (precopy); hybrid stops after `hybrid_rounds`.
    pub max_rounds: u32,
    /// Rounds before a hybrid migration switches to postcopy.
    pub hybrid_rounds: u32,
}

impl Default for PrecopyLimits {
    fn default() -> Self {
        Self {
            downtime_target: Duration::from_millis(50),
            max_rounds: 8,
            hybrid_rounds: 2,
        }
    }
}

/// Decides after round `round` (1-based) that left `dirty_pages` to copy,
/// with the link moving `bytes_per_second`.
pub fn after_round(
    mode: MigrationMode,
    limits: &PrecopyLimits,
    round: u32,
    dirty_pages: usize,
    bytes_per_second: f64,
) -> RoundDecision {
    let final_copy = if bytes_per_second > 0.0 {
        Duration::from_secs_f64(dirty_pages as f64 * 4096.0 / bytes_per_second)
    } else {
        Duration::MAX
    };
    match mode {
        MigrationMode::Postcopy => RoundDecision::SwitchToPostcopy,
        MigrationMode::Hybrid => {
            if round >= limits.hybrid_rounds || final_copy <= limits.downtime_target {
                RoundDecision::SwitchToPostcopy
            } else {
                RoundDecision::AnotherRound
            }
        }
        MigrationMode::Precopy => {
            if final_copy <= limits.downtime_target || round >= limits.max_rounds {
                RoundDecision::StopAndCopy
            } else {
                RoundDecision::AnotherRound
            }
        }
    }
}

/// Page counts as a word bitmap of `pages` bits with `set` pages set.
pub fn words_from_pages(pages: usize, set: impl IntoIterator<Item = usize>) -> Vec<u64> {
    let mut words = vec![0u64; pages.div_ceil(64)];
    for p in set {
        words[p / 64] |= 1 << (p % 64);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(order: &mut PushOrder, max: usize) -> Vec<(usize, usize)> {
        std::iter::from_fn(|| order.next_run(max, |_| false)).collect()
    }

    #[test]
    fn pushes_every_pending_page_once_in_runs() {
        let pages = 300;
        let set: Vec<usize> = (0..pages).filter(|p| p % 7 != 3).collect();
        let mut order = PushOrder::new(words_from_pages(pages, set.iter().copied()), pages);
        let runs = drain(&mut order, 4);
        let mut got: Vec<usize> = runs.iter().flat_map(|&(f, n)| f..f + n).collect();
        assert!(runs.iter().all(|&(_, n)| (1..=4).contains(&n)));
        got.sort_unstable();
        assert_eq!(got, set);
        assert_eq!(order.left(), 0);
    }

    #[test]
    fn faulted_neighbourhood_goes_first_and_nothing_twice() {
        let pages = 1000;
        let mut order = PushOrder::new(words_from_pages(pages, 0..pages), pages);
        assert_eq!(order.next_run(10, |_| false), Some((0, 10)));
        order.fault_at(500);
        let (first, count) = order.next_run(16, |_| false).unwrap();
        assert_eq!((first, count), (501, 16));
        let mut seen = vec![false; pages];
        seen[..10].fill(true);
        seen[first..first + count].fill(true);
        for (f, n) in drain(&mut order, 16) {
            for (p, s) in seen.iter_mut().enumerate().skip(f).take(n) {
                assert!(!*s, "page {p} handed out twice");
                *s = true;
            }
        }
        // The faulted page itself was answered on the fault connection:
        // it is still pending here (forget() drops it when the caller knows).
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn skipped_pages_are_dropped_not_sent() {
        let pages = 64;
        let mut order = PushOrder::new(words_from_pages(pages, 0..pages), pages);
        let runs = drain_with(&mut order, |p| p % 2 == 0);
        assert!(runs.iter().all(|&(f, n)| n == 1 && f % 2 == 1));
        assert_eq!(runs.len(), 32);
        assert_eq!(order.left(), 0);
    }

    fn drain_with(order: &mut PushOrder, skip: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
        std::iter::from_fn(|| order.next_run(8, &skip)).collect()
    }

    #[test]
    fn forget_removes_a_page() {
        let mut order = PushOrder::new(words_from_pages(10, [2, 3, 4]), 10);
        order.forget(3);
        order.forget(9);
        assert_eq!(drain(&mut order, 8), vec![(2, 1), (4, 1)]);
    }

    #[test]
    fn precopy_rounds_stop_at_the_downtime_target_or_the_round_limit() {
        let limits = PrecopyLimits {
            downtime_target: Duration::from_millis(10),
            max_rounds: 5,
            hybrid_rounds: 2,
        };
        let fast = 1e9; // 1 GB/s: 10 ms is ~2441 pages
        use MigrationMode::*;
        assert_eq!(
            after_round(Precopy, &limits, 1, 100_000, fast),
            RoundDecision::AnotherRound
        );
        assert_eq!(
            after_round(Precopy, &limits, 1, 1000, fast),
            RoundDecision::StopAndCopy
        );
        assert_eq!(
            after_round(Precopy, &limits, 5, 100_000, fast),
            RoundDecision::StopAndCopy
        );
        assert_eq!(
            after_round(Hybrid, &limits, 1, 100_000, fast),
            RoundDecision::AnotherRound
        );
        assert_eq!(
            after_round(Hybrid, &limits, 2, 100_000, fast),
            RoundDecision::SwitchToPostcopy
        );
        assert_eq!(
            after_round(Precopy, &limits, 1, 10, 0.0),
            RoundDecision::AnotherRound
        );
    }

    #[test]
    fn modes_parse_and_round_trip_the_wire() {
        for m in [
            MigrationMode::Postcopy,
            MigrationMode::Precopy,
            MigrationMode::Hybrid,
        ] {
            assert_eq!(MigrationMode::from_wire(m.to_wire()), Some(m));
        }
        assert_eq!("Hybrid".parse::<MigrationMode>(), Ok(MigrationMode::Hybrid));
        assert!("sideways".parse::<MigrationMode>().is_err());
        assert_eq!(MigrationMode::from_wire(0), None);
    }
}
