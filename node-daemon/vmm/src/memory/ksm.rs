//! Kernel same-page merging (KSM) for guest RAM: marking a clone's RAM
//! mergeable (`MADV_MERGEABLE`), reading what a process has merged
//! (`/proc/PID/ksm_stat`), and reading or changing the node-wide KSM
//! settings in `/sys/kernel/mm/ksm` (tests and benchmarks turn it on and
//! restore it afterwards). KSM merges only anonymous pages: the pages a
//! copy-on-write clone wrote, and every page a lazily streamed clone holds
//! (each is its own copy of the image page until written).

use std::io;
use std::path::{Path, PathBuf};

use super::GuestRam;

/// Where the node-wide KSM settings live.
pub const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";

/// Why a KSM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KsmError {
    #[error("madvise(MADV_MERGEABLE) on guest RAM {addr:#x}+{len:#x} failed")]
    Advise {
        addr: usize,
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("KSM is not available on this host: {0} is missing (kernel without CONFIG_KSM?)")]
    Unavailable(PathBuf),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {value} to {path}")]
    Write {
        path: PathBuf,
        value: u64,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds {text:?}, not a number")]
    Parse { path: PathBuf, text: String },
}

/// Marks all of `ram` mergeable: ksmd may then merge its anonymous pages
/// with identical pages of other mergeable ranges (other clones). Works over
/// any backing; the marking survives nothing — call it after the backing is
/// installed (a later `MAP_FIXED` replaces the mapping and its flags).
pub fn merge_identical_pages(ram: &GuestRam) -> Result<(), KsmError> {
    // SAFETY: madvise on exactly the range `ram` owns; MADV_MERGEABLE only
    // changes how the kernel may back the pages, never their contents.
    let rc = unsafe { libc::madvise(ram.host_addr().cast(), ram.len(), libc::MADV_MERGEABLE) };
    if rc != 0 {
        return Err(KsmError::Advise {
            addr: ram.host_addr() as usize,
            len: ram.len(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// What `/proc/PID/ksm_stat` says about a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KsmProcessStat {
    /// Pages of the process mapped to a merged (KSM) page.
    pub merging_pages: u64,
    /// Zero pages merged into the shared zero page (`use_zero_pages`).
    pub zero_pages: u64,
    /// Bytes saved minus KSM's bookkeeping for this process.
    pub process_profit: i64,
    /// Whether any range of the process is marked mergeable.
    pub mergeable: bool,
}

/// Parses the text of `/proc/PID/ksm_stat` (pure; unknown lines ignored).
pub fn parse_ksm_stat(text: &str) -> KsmProcessStat {
    let mut stat = KsmProcessStat::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        let value = value.trim();
        match key {
            "ksm_merging_pages" => stat.merging_pages = value.parse().unwrap_or(0),
            "ksm_zero_pages" => stat.zero_pages = value.parse().unwrap_or(0),
            "ksm_process_profit" => stat.process_profit = value.parse().unwrap_or(0),
            "ksm_mergeable:" | "ksm_mergeable" => stat.mergeable = value == "yes",
            _ => {}
        }
    }
    stat
}

/// KSM figures of process `pid` (`None`: this process).
pub fn process_stat(pid: Option<u32>) -> Result<KsmProcessStat, KsmError> {
    let path = PathBuf::from(match pid {
        Some(pid) => format!("/proc/{pid}/ksm_stat"),
        None => "/proc/self/ksm_stat".into(),
    });
    let text = std::fs::read_to_string(&path).map_err(|source| KsmError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(parse_ksm_stat(&text))
}

/// The node-wide KSM settings this code changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KsmSettings {
    /// `run`: 0 stopped, 1 running, 2 unmerge all.
    pub run: u64,
    /// `pages_to_scan`: pages ksmd scans per wake-up.
    pub pages_to_scan: u64,
    /// `sleep_millisecs`: ksmd's sleep between scans.
    pub sleep_millisecs: u64,
}

impl KsmSettings {
    /// Reads the settings from `dir` (normally [`KSM_SYSFS`]).
    pub fn read(dir: &Path) -> Result<Self, KsmError> {
        if !dir.join("run").exists() {
            return Err(KsmError::Unavailable(dir.to_path_buf()));
        }
        Ok(Self {
            run: read_number(&dir.join("run"))?,
            pages_to_scan: read_number(&dir.join("pages_to_scan"))?,
            sleep_millisecs: read_number(&dir.join("sleep_millisecs"))?,
        })
    }

    /// Writes the settings to `dir`.
    pub fn apply(&self, dir: &Path) -> Result<(), KsmError> {
        write_number(&dir.join("pages_to_scan"), self.pages_to_scan)?;
        write_number(&dir.join("sleep_millisecs"), self.sleep_millisecs)?;
        write_number(&dir.join("run"), self.run)
    }

    /// Node-wide count of full scans ksmd has completed (`full_scans`).
    pub fn full_scans(dir: &Path) -> Result<u64, KsmError> {
        read_number(&dir.join("full_scans"))
    }
}

fn read_number(path: &Path) -> Result<u64, KsmError> {
    let text = std::fs::read_to_string(path).map_err(|source| KsmError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    text.trim().parse().map_err(|_| KsmError::Parse {
        path: path.to_path_buf(),
        text: text.trim().to_string(),
    })
}

fn write_number(path: &Path, value: u64) -> Result<(), KsmError> {
    std::fs::write(path, value.to_string()).map_err(|source| KsmError::Write {
        path: path.to_path_buf(),
        value,
        source,
    })
}

/// Runs ksmd fast while alive and puts the previous settings back on drop
/// (tests, benchmarks).
#[derive(Debug)]
pub struct KsmRunning {
    dir: PathBuf,
    previous: KsmSettings,
}

impl KsmRunning {
    /// Starts ksmd in `dir` with `pages_to_scan` pages every
    /// `sleep_millisecs`.
    pub fn start(dir: &Path, pages_to_scan: u64, sleep_millisecs: u64) -> Result<Self, KsmError> {
        let previous = KsmSettings::read(dir)?;
        let guard = Self {
            dir: dir.to_path_buf(),
            previous,
        };
        KsmSettings {
            run: 1,
            pages_to_scan,
            sleep_millisecs,
        }
        .apply(dir)?;
        Ok(guard)
    }

    /// The settings that were in place before.
    pub fn previous(&self) -> KsmSettings {
        self.previous
    }
}

impl Drop for KsmRunning {
    fn drop(&mut self) {
        if let Err(e) = self.previous.apply(&self.dir) {
            tracing::warn!(error = %e, "KSM settings not restored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ksm_stat() {
        let text = "ksm_rmap_items 12\nksm_zero_pages 3\nksm_merging_pages 40\nksm_process_profit -512\nksm_merge_any: no\nksm_mergeable: yes\n";
        assert_eq!(
            parse_ksm_stat(text),
            KsmProcessStat {
                merging_pages: 40,
                zero_pages: 3,
                process_profit: -512,
                mergeable: true,
            }
        );
        assert_eq!(parse_ksm_stat(""), KsmProcessStat::default());
    }

    #[test]
    fn settings_round_trip_in_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            KsmSettings::read(dir.path()),
            Err(KsmError::Unavailable(_))
        ));
        for (name, value) in [
            ("run", "0"),
            ("pages_to_scan", "100"),
            ("sleep_millisecs", "20"),
        ] {
            std::fs::write(dir.path().join(name), format!("{value}\n")).unwrap();
        }
        {
            let running = KsmRunning::start(dir.path(), 5000, 5).unwrap();
            assert_eq!(running.previous().pages_to_scan, 100);
            let now = KsmSettings::read(dir.path()).unwrap();
            assert_eq!(
                (now.run, now.pages_to_scan, now.sleep_millisecs),
                (1, 5000, 5)
            );
        }
        let restored = KsmSettings::read(dir.path()).unwrap();
        assert_eq!(
            restored,
            KsmSettings {
                run: 0,
                pages_to_scan: 100,
                sleep_millisecs: 20
            }
        );
        std::fs::write(dir.path().join("run"), "x").unwrap();
        assert!(matches!(
            KsmSettings::read(dir.path()),
            Err(KsmError::Parse { .. })
        ));
    }
}
