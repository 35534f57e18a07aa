//! The guest clock across a capture and a restore: the kvmclock value a
//! clone resumes at is the captured one advanced by the wall-clock time
//! between the capture and the restore, so a clone started long after its
//! image was taken does not believe it is still the moment of capture
//! (timers that should have fired by now fire at once; the guest's
//! realtime clock, kvmclock plus its boot time, is current again).

use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch now (0 before the epoch).
pub fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The kvmclock to restore: `saved` advanced by the time from
/// `captured_at` to `now` (Unix nanoseconds). Without a capture time (an
/// old image), or if the host clock went backwards, the clock resumes as
/// saved: a guest clock never runs backwards.
pub fn adjusted_clock(saved: u64, captured_at: Option<u64>, now: u64) -> u64 {
    match captured_at {
        Some(at) => saved.saturating_add(now.saturating_sub(at)),
        None => saved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn the_clock_advances_by_the_time_since_capture() {
        // (saved kvmclock, captured at, now, expected)
        let table = [
            (5 * SEC, Some(1000 * SEC), 1000 * SEC, 5 * SEC),
            (5 * SEC, Some(1000 * SEC), 1060 * SEC, 65 * SEC),
            (5 * SEC, Some(1000 * SEC), 1000 * SEC + 1, 5 * SEC + 1),
            // The host clock went back: no jump backwards.
            (5 * SEC, Some(1000 * SEC), 900 * SEC, 5 * SEC),
            // Old image without a capture time.
            (5 * SEC, None, 1060 * SEC, 5 * SEC),
            // Saturates instead of wrapping.
            (u64::MAX - 1, Some(0), 10, u64::MAX),
        ];
        for (saved, at, now, expected) in table {
            assert_eq!(
                adjusted_clock(saved, at, now),
                expected,
                "{saved} {at:?} {now}"
            );
        }
    }

    #[test]
    fn now_is_after_2020() {
        assert!(unix_now_ns() > 1_577_836_800 * SEC);
    }
}
