//! Grouping of pages into runs: the pure decision behind "one `pwrite` per
//! run of non-zero pages" (the writer) and "one `UFFDIO_COPY` per run of
//! missing, contiguous source pages" (the fault handler). Allocation-free, so
//! it also runs in the writer's forked child.

/// Iterator over maximal runs `(start, end, key)` of consecutive pages in
/// `first..end` whose `key` is equal; pages whose key is `None` are skipped
/// and end a run. `key` is called exactly once per page, in order.
pub struct PageRuns<K, F> {
    next: usize,
    end: usize,
    key: F,
    lookahead: Option<Option<K>>,
}

impl<K: Copy + PartialEq, F: FnMut(usize) -> Option<K>> PageRuns<K, F> {
    /// Runs over pages `first..end`.
    pub fn new(first: usize, end: usize, key: F) -> Self {
        Self {
            next: first,
            end,
            key,
            lookahead: None,
        }
    }

    fn key_at_next(&mut self) -> Option<K> {
        match self.lookahead.take() {
            Some(k) => k,
            None => (self.key)(self.next),
        }
    }
}

impl<K: Copy + PartialEq, F: FnMut(usize) -> Option<K>> Iterator for PageRuns<K, F> {
    type Item = (usize, usize, K);

    fn next(&mut self) -> Option<Self::Item> {
        // Skip pages without a key.
        let (start, k) = loop {
            if self.next >= self.end {
                return None;
            }
            let k = self.key_at_next();
            let page = self.next;
            self.next += 1;
            if let Some(k) = k {
                break (page, k);
            }
        };
        while self.next < self.end {
            let k2 = (self.key)(self.next);
            if k2 != Some(k) {
                self.lookahead = Some(k2);
                break;
            }
            self.next += 1;
        }
        Some((start, self.next, k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(keys: &[Option<u8>]) -> Vec<(usize, usize, u8)> {
        PageRuns::new(0, keys.len(), |p| keys[p]).collect()
    }

    #[test]
    fn groups_equal_neighbours_and_skips_none() {
        let keys = [
            None,
            Some(1),
            Some(1),
            Some(2),
            None,
            None,
            Some(2),
            Some(2),
        ];
        assert_eq!(collect(&keys), vec![(1, 3, 1), (3, 4, 2), (6, 8, 2)]);
    }

    #[test]
    fn empty_and_all_none() {
        assert_eq!(collect(&[]), vec![]);
        assert_eq!(collect(&[None, None]), vec![]);
        assert_eq!(collect(&[Some(7)]), vec![(0, 1, 7)]);
    }

    #[test]
    fn calls_key_once_per_page_in_order() {
        let mut seen = Vec::new();
        let runs: Vec<_> = PageRuns::new(3, 9, |p| {
            seen.push(p);
            Some(p / 2)
        })
        .collect();
        assert_eq!(seen, vec![3, 4, 5, 6, 7, 8]);
        assert_eq!(runs, vec![(3, 4, 1), (4, 6, 2), (6, 8, 3), (8, 9, 4)]);
    }
}
