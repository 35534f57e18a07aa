//! Pure figure arithmetic of `vmstream-vmmbench`: quantiles of samples, the
//! flat JSON object the bench prints, the touch pattern that spreads a
//! working set over a region, the 50-clone memory budget, and parsing of
//! `/proc/PID/smaps_rollup`. No I/O here, so all of it is unit-tested.

use std::time::Duration;

use serde_json::{Map, Value};

/// Quantile `q` (0..=1) of `sorted` (ascending), interpolated linearly
/// between the two closest ranks (numpy's default). `None` when empty.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let position = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let low = position.floor() as usize;
    let high = position.ceil() as usize;
    let fraction = position - low as f64;
    Some(sorted[low] + (sorted[high] - sorted[low]) * fraction)
}

/// Median and 99th percentile of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub p50: f64,
    pub p99: f64,
    pub runs: usize,
}

impl Summary {
    /// Summarizes `samples` (any order); `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Self {
            p50: quantile(&sorted, 0.5)?,
            p99: quantile(&sorted, 0.99)?,
            runs: sorted.len(),
        })
    }
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Rounds to three decimals (microsecond resolution for milliseconds).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The flat JSON object the bench prints: numbers only, keys in insertion
/// order of the run.
#[derive(Debug, Default)]
pub struct Figures {
    map: Map<String, Value>,
}

impl Figures {
    /// Sets `key` to `value` (rounded to three decimals).
    pub fn put(&mut self, key: impl Into<String>, value: f64) {
        self.map.insert(key.into(), Value::from(round3(value)));
    }

    /// Sets `key` to an integer count.
    pub fn put_count(&mut self, key: impl Into<String>, value: u64) {
        self.map.insert(key.into(), Value::from(value));
    }

    /// Sets `{name}_p50{suffix}` and `{name}_p99{suffix}` from `samples`
    /// (`suffix` is empty or starts with `_`, e.g. `_256mib`). Nothing is
    /// set when there are no samples.
    pub fn put_summary(&mut self, name: &str, suffix: &str, samples: &[f64]) -> Option<Summary> {
        let summary = Summary::of(samples)?;
        self.put(format!("{name}_p50{suffix}"), summary.p50);
        self.put(format!("{name}_p99{suffix}"), summary.p99);
        Some(summary)
    }

    /// Sets only `{name}_p50{suffix}`.
    pub fn put_median(&mut self, name: &str, suffix: &str, samples: &[f64]) -> Option<f64> {
        let summary = Summary::of(samples)?;
        self.put(format!("{name}_p50{suffix}"), summary.p50);
        Some(summary.p50)
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.map.get(key).and_then(Value::as_f64)
    }

    /// The object as one line of JSON.
    pub fn to_json(&self) -> String {
        Value::Object(self.map.clone()).to_string()
    }
}

/// A stride (in pages) for a sequential touch of `count` pages in a region
/// of `region` pages that spreads the pages over the whole region and never
/// visits a page twice: the largest odd stride with `stride * (count - 1) <
/// region`, or 1 when the region is barely larger than `count`.
pub fn spread_stride(region: u64, count: u64) -> u64 {
    if count <= 1 || region <= count {
        return 1;
    }
    let mut stride = (region - 1) / (count - 1);
    if stride.is_multiple_of(2) {
        stride -= 1;
    }
    stride.max(1)
}

/// Memory budget of the 50-clone figure, in MiB: the distinct image pages
/// the clones touched (one copy) plus, per clone, its working set and a
/// fixed VMM allowance.
pub fn clones_budget_mib(
    distinct_pages: u64,
    clones: u64,
    working_set_mib: f64,
    allowance_mib: f64,
) -> f64 {
    distinct_pages as f64 * 4096.0 / (1 << 20) as f64
        + clones as f64 * (working_set_mib + allowance_mib)
}

/// The fields of `/proc/PID/smaps_rollup` the bench uses, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rollup {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub pss_anon_kib: u64,
    pub pss_file_kib: u64,
    /// `Private_Clean + Private_Dirty`.
    pub private_kib: u64,
    /// `Shared_Clean + Shared_Dirty`.
    pub shared_kib: u64,
}

/// Parses the text of `/proc/PID/smaps_rollup` (unknown lines ignored).
pub fn parse_smaps_rollup(text: &str) -> Rollup {
    let mut rollup = Rollup::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let Ok(kib) = rest.trim().trim_end_matches("kB").trim().parse::<u64>() else {
            continue;
        };
        match key.trim() {
            "Rss" => rollup.rss_kib += kib,
            "Pss" => rollup.pss_kib += kib,
            "Pss_Anon" => rollup.pss_anon_kib += kib,
            "Pss_File" => rollup.pss_file_kib += kib,
            "Private_Clean" | "Private_Dirty" => rollup.private_kib += kib,
            "Shared_Clean" | "Shared_Dirty" => rollup.shared_kib += kib,
            _ => {}
        }
    }
    rollup
}

/// KiB to MiB.
pub fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_between_ranks() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), Some(2.5));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        let p99 = quantile(&hundred, 0.99).unwrap();
        assert!((p99 - 99.01).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(&hundred, 0.0), Some(1.0));
        assert_eq!(quantile(&hundred, 1.0), Some(100.0));
    }

    #[test]
    fn summary_sorts_its_samples() {
        let s = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.p50, s.runs), (3.0, 3));
        assert!((s.p99 - 4.96).abs() < 1e-9, "{}", s.p99);
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn figures_are_flat_rounded_numbers() {
        let mut f = Figures::default();
        f.put("a_ms", 1.23456);
        f.put_count("runs", 60);
        f.put_summary("clone_start_ms", "_256mib", &[2.0, 1.0]);
        assert_eq!(f.get("a_ms"), Some(1.235));
        assert_eq!(f.get("clone_start_ms_p50_256mib"), Some(1.5));
        let parsed: Value = serde_json::from_str(&f.to_json()).unwrap();
        let object = parsed.as_object().unwrap();
        assert_eq!(object.len(), 4);
        assert!(object.values().all(Value::is_number));
    }

    #[test]
    fn spread_stride_visits_distinct_pages_across_the_region() {
        for (region, count) in [
            (261_632u64, 4096u64),
            (65_024, 4096),
            (5000, 4096),
            (4096, 4096),
        ] {
            let stride = spread_stride(region, count);
            assert!(stride * (count - 1) < region, "{region} {count} {stride}");
            let pages: std::collections::HashSet<u64> = (0..count).map(|i| i * stride).collect();
            assert_eq!(pages.len() as u64, count);
        }
        assert_eq!(spread_stride(261_632, 4096), 63);
        assert_eq!(spread_stride(10, 1), 1);
    }

    #[test]
    fn budget_counts_shared_pages_once() {
        // 4096 distinct pages (16 MiB) + 50 x (16 + 4) MiB.
        assert_eq!(clones_budget_mib(4096, 50, 16.0, 4.0), 1016.0);
    }

    #[test]
    fn smaps_rollup_is_parsed() {
        let text = "\
55d0c0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]
Rss:               20480 kB
Pss:                5120 kB
Pss_Dirty:          1024 kB
Pss_Anon:           1000 kB
Pss_File:           4120 kB
Pss_Shmem:             0 kB
Shared_Clean:      16384 kB
Shared_Dirty:          0 kB
Private_Clean:       100 kB
Private_Dirty:      3996 kB
Referenced:        20480 kB
";
        let r = parse_smaps_rollup(text);
        assert_eq!(
            r,
            Rollup {
                rss_kib: 20480,
                pss_kib: 5120,
                pss_anon_kib: 1000,
                pss_file_kib: 4120,
                private_kib: 4096,
                shared_kib: 16384,
            }
        );
        assert_eq!(kib_to_mib(r.private_kib), 4.0);
    }
}
