//! Process figures read from `/proc`: CPU time, state and start time from
//! `/proc/<pid>/stat`, memory from `/proc/<pid>/smaps_rollup`. The parsers
//! are pure and tested on sample text; the readers are thin.

use std::time::Duration;

/// Fields of `/proc/<pid>/stat` the daemon uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z`, ...
    pub state: char,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time after boot, in clock ticks (identifies the process
    /// across pid reuse).
    pub start_ticks: u64,
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state); field n is fields[n - 3].
    let field = |n: usize| fields.get(n - 3).copied();
    let state = field(3)?.chars().next()?;
    let utime: u64 = field(14)?.parse().ok()?;
    let stime: u64 = field(15)?.parse().ok()?;
    let start_ticks: u64 = field(22)?.parse().ok()?;
    Some(ProcStat {
        state,
        cpu_ticks: utime + stime,
        start_ticks,
    })
}

/// `/proc/<pid>/stat` of a process, or `None` when there is none.
pub fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Clock ticks per second.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Ticks as a duration.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    let hz = ticks_per_second();
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000 / hz))
}

/// Whether `pid` is a live (not zombie) process started at `start_ticks`
/// (when given).
pub fn process_alive(pid: u32, start_ticks: Option<u64>) -> bool {
    match read_stat(pid) {
        Some(stat) => stat.state != 'Z' && start_ticks.is_none_or(|t| t == stat.start_ticks),
        None => false,
    }
}

/// Memory totals of a process from `smaps_rollup`, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryRollup {
    pub rss: u64,
    pub pss: u64,
    pub private: u64,
    pub shared: u64,
}

/// Parses `/proc/<pid>/smaps_rollup`.
pub fn parse_smaps_rollup(text: &str) -> MemoryRollup {
    let mut m = MemoryRollup::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let Ok(kib) = rest.trim().trim_end_matches("kB").trim().parse::<u64>() else {
            continue;
        };
        let bytes = kib * 1024;
        match key {
            "Rss" => m.rss += bytes,
            "Pss" => m.pss += bytes,
            "Private_Clean" | "Private_Dirty" => m.private += bytes,
            "Shared_Clean" | "Shared_Dirty" => m.shared += bytes,
            _ => {}
        }
    }
    m
}

/// `smaps_rollup` of `pid` (`None`: this process).
pub fn read_smaps_rollup(pid: Option<u32>) -> std::io::Result<MemoryRollup> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/smaps_rollup"),
        None => "/proc/self/smaps_rollup".into(),
    };
    Ok(parse_smaps_rollup(&std::fs::read_to_string(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (vmstream (vm) x) S 1 4242 4242 0 -1 4194560 800 0 0 0 \
        150 50 0 0 20 0 5 0 987654 12345678 900 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn stat_fields_are_counted_after_the_command() {
        let s = parse_stat(STAT).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.cpu_ticks, 200);
        assert_eq!(s.start_ticks, 987_654);
        assert_eq!(parse_stat("12 (x) S 1"), None);
    }

    #[test]
    fn this_process_is_alive_and_its_start_time_identifies_it() {
        let me = std::process::id();
        let stat = read_stat(me).unwrap();
        assert!(process_alive(me, Some(stat.start_ticks)));
        assert!(!process_alive(me, Some(stat.start_ticks + 1)));
        assert!(!process_alive(u32::MAX - 1, None));
    }

    #[test]
    fn rollup_sums_private_and_shared() {
        let text = "55f1e9313000-7ffe833e4000 ---p 00000000 00:00 0  [rollup]\n\
            Rss:                1724 kB\nPss:                 221 kB\n\
            Pss_Dirty:           116 kB\nShared_Clean:       1568 kB\n\
            Shared_Dirty:          4 kB\nPrivate_Clean:        40 kB\n\
            Private_Dirty:       116 kB\n";
        let m = parse_smaps_rollup(text);
        assert_eq!(m.rss, 1724 * 1024);
        assert_eq!(m.pss, 221 * 1024);
        assert_eq!(m.shared, 1572 * 1024);
        assert_eq!(m.private, 156 * 1024);
        assert!(read_smaps_rollup(None).unwrap().rss > 0);
    }
}
