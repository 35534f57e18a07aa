//! Per-VM cgroups (v2) for accounting: each VM process moves itself into
//! `<root>/vmstream/vm-<id>` before it creates vCPU threads; the supervisor
//! removes the group after the process is gone. Hosts without a writable
//! cgroup v2 hierarchy skip this with a logged warning.

use std::io;
use std::path::{Path, PathBuf};

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

/// Creates the VM's group and moves the calling process into it.
pub fn join(root: &Path, id: &str) -> Result<PathBuf, CgroupError> {
    let path = vm_group(root, id);
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

/// Removes an (empty) VM group; a group that is gone already is fine.
pub fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
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
