//! The on-disk trace of a VM process, `<state>/vms/<id>/`: `vm.json` (who the
//! process is and where its socket is, written by the VM process itself once
//! its socket listens), `control.sock`, `vm.log` (its stdout/stderr) and
//! `serial.log` (the guest's serial console). A restarted daemon finds its
//! VMs by reading these records.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The files of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub record: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub serial: PathBuf,
}

impl VmPaths {
    pub fn new(state_dir: &Path, id: &str) -> Self {
        let dir = vms_dir(state_dir).join(id);
        Self {
            record: dir.join("vm.json"),
            socket: dir.join("control.sock"),
            log: dir.join("vm.log"),
            serial: dir.join("serial.log"),
            dir,
        }
    }
}

/// `<state>/vms`.
pub fn vms_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("vms")
}

/// What a VM process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmKind {
    /// A shell waiting for its start request.
    Warm,
    /// A booted micro guest.
    Boot,
    /// A clone started from a live image.
    Clone,
}

/// The Kubernetes object a VM belongs to, if any.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VmOwner {
    /// `LiveImage` (an image's source VM) or `VMClone`.
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

/// `vm.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    pub id: String,
    pub pid: u32,
    /// Process start time in clock ticks after boot (guards against pid reuse).
    pub start_ticks: u64,
    pub kind: VmKind,
    /// Live image directory of a clone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<VmOwner>,
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// RFC 3339.
    pub created_at: String,
    pub socket: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

/// Errors reading or writing `vm.json`.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a VM record")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl VmRecord {
    pub fn read(path: &Path) -> Result<Self, RecordError> {
        let text = std::fs::read(path).map_err(|source| RecordError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| RecordError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes the record atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        let tmp = path.with_extension("json.tmp");
        let err = |source| RecordError::Write {
            path: path.to_path_buf(),
            source,
        };
        let text = serde_json::to_vec_pretty(self).map_err(|e| err(io::Error::other(e)))?;
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

/// Why a VM id is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmIdError {
    #[error("VM id is empty")]
    Empty,
    #[error("VM id {0:?} is longer than 100 characters")]
    TooLong(String),
    #[error("VM id {0:?} may only hold a-z, 0-9, '-', '_' and '.', and must not start with '.'")]
    Characters(String),
}

/// Checks that `id` is usable as a directory and cgroup name.
pub fn validate_id(id: &str) -> Result<(), VmIdError> {
    if id.is_empty() {
        return Err(VmIdError::Empty);
    }
    if id.len() > 100 {
        return Err(VmIdError::TooLong(id.into()));
    }
    let ok = id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if !ok || id.starts_with('.') {
        return Err(VmIdError::Characters(id.into()));
    }
    Ok(())
}

/// The VM id of a Kubernetes object: `<kind prefix>.<namespace>.<name>`
/// (namespaces hold no dots, so the id is unambiguous).
pub fn owner_id(owner: &VmOwner) -> String {
    let prefix = match owner.kind.as_str() {
        "LiveImage" => "li",
        "VMClone" => "vmc",
        _ => "vm",
    };
    format!("{prefix}.{}.{}", owner.namespace, owner.name)
}

/// Unix socket paths are limited to 107 bytes; a longer path is reached
/// through `/proc/self/fd/<dir fd>/<name>`.
const SUN_PATH_LIMIT: usize = 100;

fn with_short_path<T>(path: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().len() < SUN_PATH_LIMIT {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    let dir = std::fs::File::open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    f(&short)
}

/// Binds a listening socket at `path` (whatever its length).
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    with_short_path(path, |p| UnixListener::bind(p))
}

/// Connects to the socket at `path` (whatever its length).
pub fn connect_socket(path: &Path) -> io::Result<UnixStream> {
    with_short_path(path, |p| UnixStream::connect(p))
}

/// Disk space in bytes used by the regular files directly in `dir`
/// (allocated blocks: page stores are sparse where pages are zero).
pub fn dir_size(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(validate_id("vm-1"), Ok(()));
        assert_eq!(validate_id("vmc.ns.a.b"), Ok(()));
        assert_eq!(validate_id(""), Err(VmIdError::Empty));
        assert!(validate_id("../x").is_err());
        assert!(validate_id("A").is_err());
        assert!(validate_id(".x").is_err());
        assert!(validate_id(&"a".repeat(101)).is_err());
        let owner = VmOwner {
            kind: "VMClone".into(),
            namespace: "ns".into(),
            name: "web.1".into(),
        };
        assert_eq!(owner_id(&owner), "vmc.ns.web.1");
        assert_eq!(validate_id(&owner_id(&owner)), Ok(()));
    }

    #[test]
    fn record_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let paths = VmPaths::new(dir.path(), "a");
        std::fs::create_dir_all(&paths.dir).unwrap();
        let record = VmRecord {
            id: "a".into(),
            pid: 1,
            start_ticks: 2,
            kind: VmKind::Clone,
            image: Some("/img".into()),
            owner: None,
            vcpus: 1,
            memory_bytes: 16 << 20,
            created_at: "2026-01-01T00:00:00Z".into(),
            socket: paths.socket.clone(),
            cgroup: None,
        };
        record.write(&paths.record).unwrap();
        assert_eq!(VmRecord::read(&paths.record).unwrap(), record);
        assert!(!paths.record.with_extension("json.tmp").exists());
        std::fs::write(&paths.record, "{").unwrap();
        assert!(matches!(
            VmRecord::read(&paths.record),
            Err(RecordError::Parse { .. })
        ));
    }

    #[test]
    fn long_socket_paths_work() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("control.sock");
        let _listener = bind_socket(&path).unwrap();
        assert!(path.exists());
        connect_socket(&path).unwrap();
    }
}
