//! A lock-free latency histogram with log2 buckets of microseconds, cheap
//! enough to update on every served fault.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Number of buckets: bucket 0 counts latencies under 1 µs, bucket `b > 0`
/// counts `[2^(b-1), 2^b)` µs; the last bucket also takes everything larger.
pub const LATENCY_BUCKETS: usize = 32;

/// The bucket a latency of `us` microseconds falls into.
pub fn bucket_of(us: u64) -> usize {
    let b = (u64::BITS - us.leading_zeros()) as usize;
    b.min(LATENCY_BUCKETS - 1)
}

/// Exclusive upper bound, in µs, of bucket `b`.
pub fn bucket_upper_us(b: usize) -> u64 {
    1u64 << b
}

/// Concurrent histogram.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counts.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
        }
    }
}

/// Counts per bucket at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencySnapshot {
    pub buckets: [u64; LATENCY_BUCKETS],
}

impl LatencySnapshot {
    /// Total number of latencies counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Upper bound (µs) of the bucket holding quantile `q` (0..=1), or
    /// `None` when empty.
    pub fn quantile_upper_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_upper_us(b));
            }
        }
        Some(bucket_upper_us(LATENCY_BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_of_microseconds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 1);
        assert_eq!(bucket_of(2), 2);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(17), 5); // [16, 32)
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn quantiles_pick_the_right_bucket() {
        let h = LatencyHistogram::default();
        for _ in 0..90 {
            h.record(Duration::from_micros(20)); // bucket 5, upper 32
        }
        for _ in 0..10 {
            h.record(Duration::from_micros(300)); // bucket 9, upper 512
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.quantile_upper_us(0.5), Some(32));
        assert_eq!(s.quantile_upper_us(0.9), Some(32));
        assert_eq!(s.quantile_upper_us(0.99), Some(512));
        assert_eq!(LatencySnapshot::default().quantile_upper_us(0.5), None);
    }
}
