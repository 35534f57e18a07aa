//! The record of a VM process, `vm.json` in its directory (see
//! [`crate::state_layout::VmPaths`]): who the process is and where its
//! socket is, written by the VM process itself once its socket listens. A
//! restarted daemon finds its VMs by reading these records. Also VM ids and
//! the Unix sockets of long paths.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::object_key::ObjectKey;

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
    /// The object the VM belongs to (`{"kind","namespace","name"}`).
    pub owner: Option<ObjectKey>,
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
        let owner = ObjectKey::vm_clone("ns", "web.1");
        assert_eq!(owner.vm_id(), "vmc.ns.web.1");
        assert_eq!(validate_id(&owner.vm_id()), Ok(()));
    }

    #[test]
    fn record_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let paths = crate::state_layout::StateLayout::new(dir.path()).vm("a");
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
