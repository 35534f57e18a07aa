//! Per-VM cgroups (v2) for accounting: each VM process moves itself into
//! `<root>/vmstream/vm-<id>` before it creates vCPU threads; the supervisor
//! removes the group after the process is gone. Hosts without a writable
//! cgroup v2 hierarchy skip this with a logged warning.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where cgroup v2 may be mounted: the unified layout, then the hybrid one.
pub const CANDIDATE_ROOTS: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// Errors placing a process in its cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy found (looked at {0:?})")]
    NoHierarchy(Vec<PathBuf>),
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot move the process into cgroup {path}")]
    Join {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The first of `candidates` that is a cgroup v2 root (it has
/// `cgroup.controllers`; a tmpfs holding v1 mounts does not).
pub fn find_root(candidates: &[PathBuf]) -> Result<PathBuf, CgroupError> {
    candidates
        .iter()
        .find(|c| c.join("cgroup.controllers").is_file())
        .cloned()
        .ok_or_else(|| CgroupError::NoHierarchy(candidates.to_vec()))
}

/// The cgroup of VM `id` under `root`.
pub fn vm_group(root: &Path, id: &str) -> PathBuf {
    root.join("vmstream").join(format!("vm-{id}"))
}

/// The VM id in a group name: `vm-<id>` or `vm-<id>~<pid>`.
pub fn group_vm_id(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("vm-")?;
    Some(rest.split_once('~').map_or(rest, |(id, _)| id))
}

fn populated(group: &Path) -> bool {
    std::fs::read_to_string(group.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
}

/// Creates the VM's group and moves the calling process into it. A group of
/// that name that already holds processes (a VM of the same id under
/// another state directory) is not shared: the group is then named
/// `vm-<id>~<pid>`.
pub fn join(root: &Path, id: &str) -> Result<PathBuf, CgroupError> {
    let mut path = vm_group(root, id);
    if populated(&path) {
        path = root
            .join("vmstream")
            .join(format!("vm-{id}~{}", std::process::id()));
    }
    std::fs::create_dir_all(&path).map_err(|source| CgroupError::Create {
        path: path.clone(),
        source,
    })?;
    // "0" names the writing process.
    std::fs::write(path.join("cgroup.procs"), "0").map_err(|source| CgroupError::Join {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Removes a VM group; a group that is gone already is fine. A group
/// stays busy until its last process has been reaped (an exited VM process
/// can linger as a zombie for a moment), so EBUSY is retried until
/// `patience` has passed.
pub fn remove(path: &Path, patience: Duration) -> io::Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        match std::fs::remove_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Removes the VM groups under the first cgroup v2 root of `roots` whose
/// VM id is not in `keep` (groups left by VMs that ended while no daemon
/// ran). Busy groups are left alone. Returns the groups removed.
pub fn sweep(roots: &[PathBuf], keep: &BTreeSet<String>) -> Vec<PathBuf> {
    let Ok(root) = find_root(roots) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(root.join("vmstream")) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = group_vm_id(&name) else {
            continue;
        };
        if !keep.contains(id) && std::fs::remove_dir(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

/// `usage_usec` from a group's `cpu.stat`.
pub fn cpu_usage_usec(group: &Path) -> Option<u64> {
    parse_cpu_usage(&std::fs::read_to_string(group.join("cpu.stat")).ok()?)
}

fn parse_cpu_usage(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_path_and_cpu_stat() {
        assert_eq!(
            vm_group(Path::new("/sys/fs/cgroup"), "a1"),
            Path::new("/sys/fs/cgroup/vmstream/vm-a1")
        );
        assert_eq!(
            parse_cpu_usage("usage_usec 1234\nuser_usec 1000\n"),
            Some(1234)
        );
        assert_eq!(parse_cpu_usage("user_usec 1\n"), None);
        assert_eq!(group_vm_id("vm-a.b"), Some("a.b"));
        assert_eq!(group_vm_id("vm-a~12"), Some("a"));
        assert_eq!(group_vm_id("other"), None);
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup_root() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            find_root(&[dir.path().to_path_buf()]),
            Err(CgroupError::NoHierarchy(_))
        ));
        std::fs::write(dir.path().join("cgroup.controllers"), "").unwrap();
        assert_eq!(find_root(&[dir.path().to_path_buf()]).unwrap(), dir.path());
    }
}
