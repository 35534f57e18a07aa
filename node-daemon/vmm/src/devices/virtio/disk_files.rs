//! The files behind a captured disk: identifying a base image (size, mtime,
//! SHA-256) and checking that a clone's base image is still the captured
//! one, and copying an overlay (into the live image at capture, into a
//! clone's own directory at restore) as a reflink where the file system can
//! (`FICLONE`: btrfs, XFS), else as a sparse copy of its written blocks.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::overlay::OVERLAY_BLOCK;
use super::saved::DiskIdentity;

/// Why a base image is not the one a live image was captured with.
#[derive(Debug, thiserror::Error)]
pub enum BaseDiskError {
    #[error("base disk {path} cannot be read")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("base disk {path} is {actual} bytes, the live image was captured with {expected}")]
    Size {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error(
        "base disk {path} changed since the capture (sha256 {actual}, the live image recorded {expected})"
    )]
    Content {
        path: PathBuf,
        actual: String,
        expected: String,
    },
}

/// Why an overlay could not be copied.
#[derive(Debug, thiserror::Error)]
#[error("cannot copy overlay {from} to {to}")]
pub struct OverlayCopyError {
    pub from: PathBuf,
    pub to: PathBuf,
    #[source]
    pub source: io::Error,
}

/// How an overlay was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// `FICLONE`: shares the source's extents until either side writes.
    Reflink,
    /// The written blocks copied into a sparse file of the same size.
    Sparse,
}

impl DiskIdentity {
    /// Reads `path` whole to hash it (about 1 GiB/s: done once per capture,
    /// outside the pause).
    pub fn of(path: &Path) -> Result<Self, BaseDiskError> {
        let read_err = |source| BaseDiskError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(Self {
            len: meta.len(),
            mtime_ns: mtime_ns(&meta),
            sha256: hex(&hasher.finalize()),
        })
    }

    /// Checks that `path` is the image this identity was taken of: same
    /// size, and same mtime or else same SHA-256 (a copy of the image).
    pub fn check(&self, path: &Path) -> Result<(), BaseDiskError> {
        let meta = std::fs::metadata(path).map_err(|source| BaseDiskError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.len() != self.len {
            return Err(BaseDiskError::Size {
                path: path.to_path_buf(),
                actual: meta.len(),
                expected: self.len,
            });
        }
        if mtime_ns(&meta) == self.mtime_ns {
            return Ok(());
        }
        let now = Self::of(path)?;
        if now.sha256 != self.sha256 {
            return Err(BaseDiskError::Content {
                path: path.to_path_buf(),
                actual: now.sha256,
                expected: self.sha256.clone(),
            });
        }
        Ok(())
    }
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    // i64 nanoseconds reach the year 2262 (and serde_json has no i128).
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies overlay `from` (of `len` bytes, holding the blocks in `written`
/// runs `[first, count]`) to a new file `to`, replacing any file there.
pub fn copy_overlay(
    from: &Path,
    to: &Path,
    len: u64,
    written: &[[u64; 2]],
) -> Result<CopyMethod, OverlayCopyError> {
    let err = |source| OverlayCopyError {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    let src = File::open(from).map_err(err)?;
    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(to)
        .map_err(err)?;
    // SAFETY: FICLONE takes the source descriptor by value; both are open
    // files owned by this function for the call.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(CopyMethod::Reflink);
    }
    dst.set_len(len).map_err(err)?;
    let mut buf = vec![0u8; 256 << 10];
    for &[first, count] in written {
        let start = first * OVERLAY_BLOCK;
        let end = ((first + count) * OVERLAY_BLOCK).min(len);
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at).map_err(err)?;
            dst.write_all_at(&buf[..n], at).map_err(err)?;
            at += n as u64;
        }
    }
    dst.sync_data().map_err(err)?;
    Ok(CopyMethod::Sparse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_takes_only_the_written_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a");
        let to = dir.path().join("b");
        let data: Vec<u8> = (0..4 * OVERLAY_BLOCK as usize)
            .map(|i| i as u8 | 1)
            .collect();
        std::fs::write(&from, &data).unwrap();
        let method = copy_overlay(&from, &to, data.len() as u64, &[[1, 2]]).unwrap();
        let copied = std::fs::read(&to).unwrap();
        assert_eq!(copied.len(), data.len());
        let block = OVERLAY_BLOCK as usize;
        if method == CopyMethod::Sparse {
            assert!(copied[..block].iter().all(|&b| b == 0));
            assert!(copied[3 * block..].iter().all(|&b| b == 0));
        }
        assert_eq!(copied[block..3 * block], data[block..3 * block]);
    }

    #[test]
    fn a_changed_base_disk_is_refused_and_a_touched_copy_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let identity = DiskIdentity::of(&path).unwrap();
        identity.check(&path).unwrap();
        // Same content, other mtime: accepted after hashing.
        let later = DiskIdentity {
            mtime_ns: identity.mtime_ns - 1,
            ..identity.clone()
        };
        later.check(&path).unwrap();
        let mut changed = vec![7u8; 8192];
        changed[100] = 8;
        std::fs::write(&path, &changed).unwrap();
        let error = later.check(&path).unwrap_err();
        assert!(matches!(error, BaseDiskError::Content { .. }), "{error}");
        assert!(error.to_string().contains("changed since the capture"));
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        assert!(matches!(
            identity.check(&path),
            Err(BaseDiskError::Size { actual: 4096, .. })
        ));
    }
}
