//! Host capability checks and skip bookkeeping for vmstream's tests.
//!
//! Tests that need `/dev/kvm`, `/dev/userfaultfd`, root, network namespaces or
//! the local control plane call [`require`] first. When the host lacks what
//! the test needs, the test returns early after recording *why* in the file
//! named by `VMSTREAM_SKIP_LOG` (one line per skipped test), so `make test`
//! can report how many tests ran and how many were skipped, and the reason is
//! printed on stderr.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

/// Something a test needs from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read/write access to `/dev/kvm`.
    Kvm,
    /// The userfaultfd syscall or `/dev/userfaultfd`, usable by this process.
    Userfaultfd,
    /// Effective user id 0.
    Root,
    /// `ip netns` works (root plus the `ip` tool).
    NetworkNamespaces,
}

impl Need {
    /// Why the host does not satisfy this need, or `None` when it does.
    pub fn missing(self) -> Option<String> {
        match self {
            Need::Kvm => openable_rw("/dev/kvm"),
            Need::Userfaultfd => {
                if Path::new("/dev/userfaultfd").exists() {
                    openable_rw("/dev/userfaultfd")
                } else {
                    Some("/dev/userfaultfd does not exist (kernel older than 6.1?)".into())
                }
            }
            Need::Root => {
                // SAFETY: geteuid has no preconditions and cannot fail.
                let euid = unsafe { libc_geteuid() };
                (euid != 0).then(|| format!("needs root (running as uid {euid})"))
            }
            Need::NetworkNamespaces => {
                if let Some(why) = Need::Root.missing() {
                    return Some(why);
                }
                let ok = std::process::Command::new("ip")
                    .args(["netns", "list"])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                (!ok).then(|| "`ip netns list` failed (iproute2 missing?)".into())
            }
        }
    }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn openable_rw(path: &str) -> Option<String> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => None,
        Err(e) => Some(format!("cannot open {path} read-write: {e}")),
    }
}

/// Returns `true` when every need is met. Otherwise records the skip of
/// `test` (with the first missing need as the reason) and returns `false`;
/// the caller then returns early.
pub fn require(test: &str, needs: &[Need]) -> bool {
    for need in needs {
        if let Some(why) = need.missing() {
            record_skip(test, &why);
            return false;
        }
    }
    true
}

/// Records that `test` was skipped because of `why`: a line on stderr and,
/// when `VMSTREAM_SKIP_LOG` names a file, a line appended to it.
pub fn record_skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
    if let Some(path) = std::env::var_os("VMSTREAM_SKIP_LOG")
        && let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = writeln!(f, "{test}\t{why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_check_agrees_with_euid() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc_geteuid() };
        assert_eq!(Need::Root.missing().is_none(), euid == 0);
    }

    #[test]
    fn missing_device_is_reported_with_its_path() {
        let why = openable_rw("/dev/definitely-not-here").unwrap();
        assert!(why.contains("/dev/definitely-not-here"), "{why}");
    }
}
