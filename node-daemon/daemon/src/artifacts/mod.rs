//! The node's artifact fetcher: the kernels, initrds and disk images a
//! LiveImage's `linux` source names, fetched once per node into the
//! artifact cache of [`StateLayout`] (keyed by SHA-256) and verified.
//!
//! * a URL artifact: a cached file is used when its `.verified` record
//!   matches (digest and size: a cheap check, no re-hash); a cached file
//!   without a matching record is re-hashed in full. Otherwise the URL is
//!   streamed to a partial file of its own while hashing, refused when it
//!   exceeds the size limit or its digest differs (the partial file is
//!   removed, nothing enters the cache), else the record is written and the
//!   file renamed into place. Two fetches of one digest download twice and
//!   rename the same content; the cache stays correct.
//! * a node-local path: must exist; hashed in full when a sha256 is given.
//!
//! `http` does the streaming download, `kernel` the kernel magic check.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use vmstream_api::v1alpha1::{Artifact, ArtifactSource};

use crate::state_layout::StateLayout;

mod http;
mod kernel;

pub use http::HttpGet;
pub use kernel::{KernelFormat, kernel_format};

/// Largest artifact fetched unless configured otherwise (a disk image).
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 32 << 30;

/// Why an artifact could not be provided; each failure has the stable
/// `reason` of the LiveImage's status condition.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{artifact} has sha256 {got}, expected {expected}")]
    DigestMismatch {
        artifact: String,
        expected: String,
        got: String,
    },
    #[error("cannot fetch {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error("{artifact} is larger than the limit of {limit} bytes")]
    TooLarge { artifact: String, limit: u64 },
    #[error("{artifact} is not a kernel (neither an ELF file nor a bzImage)")]
    NotAKernel { artifact: String },
    #[error("no file {}", path.display())]
    NotFound { path: PathBuf },
    #[error("the artifact names neither a url with its sha256 nor a path")]
    Malformed,
    #[error("cannot {what} {}", path.display())]
    Cache {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FetchError {
    /// The `reason` of the status condition this failure is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::DigestMismatch { .. } => "ArtifactDigestMismatch",
            Self::Unreachable { .. } => "ArtifactUnreachable",
            Self::TooLarge { .. } => "ArtifactTooLarge",
            Self::NotAKernel { .. } => "NotAKernel",
            Self::NotFound { .. } => "ArtifactNotFound",
            Self::Malformed => "ArtifactMalformed",
            Self::Cache { .. } => "ArtifactCacheFailed",
        }
    }

    fn cache(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Cache { what, path, source }
    }
}

/// Fetches artifacts into the node's cache.
#[derive(Clone)]
pub struct ArtifactFetcher {
    layout: StateLayout,
    max_bytes: u64,
    http: HttpGet,
}

/// Tells the partial files of concurrent fetches in this process apart.
static NEXT_PARTIAL: AtomicU64 = AtomicU64::new(0);

impl ArtifactFetcher {
    /// A fetcher caching under `layout`'s artifact directory, refusing
    /// artifacts over [`DEFAULT_MAX_ARTIFACT_BYTES`].
    pub fn new(layout: StateLayout) -> Self {
        Self {
            layout,
            max_bytes: DEFAULT_MAX_ARTIFACT_BYTES,
            http: HttpGet::new(),
        }
    }

    /// The same fetcher with another size limit.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The local file holding `artifact`'s verified content.
    pub async fn fetch(&self, artifact: &Artifact) -> Result<PathBuf, FetchError> {
        match artifact.source().ok_or(FetchError::Malformed)? {
            ArtifactSource::Path { path, sha256 } => {
                local_file(PathBuf::from(path), sha256.map(str::to_owned)).await
            }
            ArtifactSource::Url { url, sha256 } => {
                if let Some(file) = self.cached(sha256).await? {
                    return Ok(file);
                }
                self.download(url, sha256).await
            }
        }
    }

    /// [`Self::fetch`], then the kernel check: the file must be an ELF
    /// image or a bzImage.
    pub async fn fetch_kernel(&self, artifact: &Artifact) -> Result<PathBuf, FetchError> {
        let path = self.fetch(artifact).await?;
        let head = read_head(&path, kernel::HEAD_LEN)
            .map_err(FetchError::cache("read the kernel", &path))?;
        if kernel_format(&head).is_none() {
            return Err(FetchError::NotAKernel {
                artifact: describe(artifact),
            });
        }
        Ok(path)
    }

    /// The cached file of digest `sha256`, verified: cheaply by its record
    /// (digest and size), else by hashing it in full (a file that fails is
    /// removed).
    async fn cached(&self, sha256: &str) -> Result<Option<PathBuf>, FetchError> {
        let file = self.layout.artifact_file(sha256);
        let record = self.layout.artifact_record(sha256);
        let Ok(meta) = std::fs::metadata(&file) else {
            return Ok(None);
        };
        if std::fs::read_to_string(&record).ok().as_deref()
            == Some(verified_record(sha256, meta.len()).as_str())
        {
            return Ok(Some(file));
        }
        let (got, size) = hash_file(file.clone()).await?;
        if got == sha256 {
            write_record(&record, sha256, size)?;
            return Ok(Some(file));
        }
        tracing::warn!(file = %file.display(), got, "cached artifact does not match its name; fetching again");
        let _ = std::fs::remove_file(&record);
        let _ = std::fs::remove_file(&file);
        Ok(None)
    }

    async fn download(&self, url: &str, sha256: &str) -> Result<PathBuf, FetchError> {
        let dir = self.layout.artifacts_dir();
        std::fs::create_dir_all(&dir).map_err(FetchError::cache("create", &dir))?;
        let unique = format!(
            "{}-{}",
            std::process::id(),
            NEXT_PARTIAL.fetch_add(1, Ordering::Relaxed)
        );
        let partial = self.layout.partial_artifact(sha256, &unique);
        let result = self.download_into(url, sha256, &partial).await;
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result
    }

    async fn download_into(
        &self,
        url: &str,
        sha256: &str,
        partial: &Path,
    ) -> Result<PathBuf, FetchError> {
        let (got, size) = self.http.download(url, partial, self.max_bytes).await?;
        if got != sha256 {
            return Err(FetchError::DigestMismatch {
                artifact: url.to_owned(),
                expected: sha256.to_owned(),
                got,
            });
        }
        write_record(&self.layout.artifact_record(sha256), sha256, size)?;
        let file = self.layout.artifact_file(sha256);
        std::fs::rename(partial, &file).map_err(FetchError::cache("rename into place", partial))?;
        tracing::info!(url, file = %file.display(), size, "artifact fetched");
        Ok(file)
    }
}

/// A node-local artifact: it must exist, and match `sha256` when given.
async fn local_file(path: PathBuf, sha256: Option<String>) -> Result<PathBuf, FetchError> {
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => {}
        _ => return Err(FetchError::NotFound { path }),
    }
    if let Some(expected) = sha256 {
        let (got, _) = hash_file(path.clone()).await?;
        if got != expected {
            return Err(FetchError::DigestMismatch {
                artifact: path.display().to_string(),
                expected,
                got,
            });
        }
    }
    Ok(path)
}

/// How an artifact is named in errors: its URL or path.
fn describe(artifact: &Artifact) -> String {
    artifact
        .url
        .clone()
        .or_else(|| artifact.path.clone())
        .unwrap_or_default()
}

/// The content of a `.verified` record.
fn verified_record(sha256: &str, size: u64) -> String {
    format!("sha256 {sha256} size {size}\n")
}

/// Writes the record through a temporary file, so a record is whole.
fn write_record(record: &Path, sha256: &str, size: u64) -> Result<(), FetchError> {
    let tmp = record.with_extension(format!("verified.{}.tmp", std::process::id()));
    std::fs::write(&tmp, verified_record(sha256, size))
        .map_err(FetchError::cache("write", &tmp))?;
    std::fs::rename(&tmp, record).map_err(FetchError::cache("rename into place", &tmp))
}

/// Lowercase hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) and size of a file, hashed off the async threads.
async fn hash_file(path: PathBuf) -> Result<(String, u64), FetchError> {
    let p = path.clone();
    let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
        let mut file = std::fs::File::open(&p)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok((hex(&hasher.finalize()), size))
    })
    .await
    .map_err(|e| FetchError::Cache {
        what: "hash",
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    hashed.map_err(FetchError::cache("hash", &path))
}

/// Up to `len` bytes from the start of a file.
fn read_head(path: &Path, len: usize) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(len);
    std::fs::File::open(path)?
        .take(len as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_have_stable_reasons() {
        let mismatch = FetchError::DigestMismatch {
            artifact: "http://h/k".into(),
            expected: "aa".into(),
            got: "bb".into(),
        };
        assert_eq!(mismatch.reason(), "ArtifactDigestMismatch");
        assert_eq!(
            mismatch.to_string(),
            "http://h/k has sha256 bb, expected aa"
        );
        assert_eq!(
            FetchError::NotFound { path: "/x".into() }.reason(),
            "ArtifactNotFound"
        );
        assert_eq!(
            FetchError::TooLarge {
                artifact: "u".into(),
                limit: 1
            }
            .reason(),
            "ArtifactTooLarge"
        );
    }

    #[test]
    fn records_name_digest_and_size() {
        assert_eq!(verified_record("ab", 7), "sha256 ab size 7\n");
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
