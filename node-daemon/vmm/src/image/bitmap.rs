//! A fixed-size bitmap of pages with atomic words, so one thread (the fault
//! handler) can set bits while others read them, and a forked child can read
//! the parent's copy without locks or allocation.

use std::sync::atomic::{AtomicU64, Ordering};

/// A bitmap of `len` bits, one per page. Bits are set with `Release` and read
/// with `Acquire` ordering, so a reader that sees a bit also sees the writes
/// that preceded setting it.
#[derive(Debug)]
pub struct Bitmap {
    words: Box<[AtomicU64]>,
    len: usize,
}

impl Bitmap {
    /// A bitmap of `len` bits, all clear.
    pub fn new(len: usize) -> Self {
        let words = (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { words, len }
    }

    /// A bitmap of `len` bits from little-endian-numbered 64-bit words (bit
    /// `i` is bit `i % 64` of word `i / 64`). Returns `None` if the number of
    /// words is wrong or a bit at or beyond `len` is set.
    pub fn from_words(len: usize, words: &[u64]) -> Option<Self> {
        if words.len() != len.div_ceil(64) {
            return None;
        }
        if let Some(&last) = words.last() {
            let used = len % 64;
            if used != 0 && last >> used != 0 {
                return None;
            }
        }
        Some(Self {
            words: words.iter().map(|&w| AtomicU64::new(w)).collect(),
            len,
        })
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bit `i` is set. Panics if `i >= len`.
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        assert!(i < self.len, "bit {i} out of range 0..{}", self.len);
        self.words[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was already set. Panics if `i >= len`.
    #[inline]
    pub fn set(&self, i: usize) -> bool {
        assert!(i < self.len, "bit {i} out of range 0..{}", self.len);
        let mask = 1 << (i % 64);
        self.words[i / 64].fetch_or(mask, Ordering::Release) & mask != 0
    }

    /// Clears bit `i`; returns whether it was set. Panics if `i >= len`.
    #[inline]
    pub fn clear(&self, i: usize) -> bool {
        assert!(i < self.len, "bit {i} out of range 0..{}", self.len);
        let mask = 1 << (i % 64);
        self.words[i / 64].fetch_and(!mask, Ordering::AcqRel) & mask != 0
    }

    /// Sets bits `first..first + count`. Panics if the range exceeds `len`.
    pub fn set_range(&self, first: usize, count: usize) {
        assert!(first + count <= self.len, "range out of bounds");
        for i in first..first + count {
            self.set(i);
        }
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> usize {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as usize)
            .sum()
    }

    /// Word `w` (bits `64 * w .. 64 * w + 64`). Panics if out of range.
    #[inline]
    pub fn word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::Acquire)
    }

    /// Number of 64-bit words.
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// A snapshot of all words.
    pub fn to_words(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    /// First clear bit at or after `from`, if any.
    pub fn next_clear(&self, from: usize) -> Option<usize> {
        let mut i = from;
        while i < self.len {
            let word = self.word(i / 64) | ((1u64 << (i % 64)) - 1);
            if word != u64::MAX {
                let bit = (i / 64) * 64 + word.trailing_ones() as usize;
                return (bit < self.len).then_some(bit);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count() {
        let b = Bitmap::new(130);
        assert_eq!(b.word_count(), 3);
        assert!(!b.set(0));
        assert!(b.set(0));
        b.set(64);
        b.set(129);
        assert!(b.get(0) && b.get(64) && b.get(129));
        assert!(!b.get(1) && !b.get(128));
        assert_eq!(b.count_ones(), 3);
    }

    #[test]
    fn from_words_rejects_bits_past_the_end_and_wrong_length() {
        assert!(Bitmap::from_words(65, &[u64::MAX, 1]).is_some());
        assert!(Bitmap::from_words(65, &[u64::MAX, 2]).is_none());
        assert!(Bitmap::from_words(65, &[0]).is_none());
        assert!(Bitmap::from_words(64, &[u64::MAX]).is_some());
    }

    #[test]
    fn next_clear_skips_full_words() {
        let b = Bitmap::new(200);
        b.set_range(0, 130);
        assert_eq!(b.next_clear(0), Some(130));
        assert_eq!(b.next_clear(131), Some(131));
        b.set_range(130, 70);
        assert_eq!(b.next_clear(0), None);
    }

    #[test]
    fn round_trips_through_words() {
        let b = Bitmap::new(100);
        b.set(3);
        b.set(99);
        let c = Bitmap::from_words(100, &b.to_words()).unwrap();
        assert!(c.get(3) && c.get(99) && !c.get(4));
    }
}
