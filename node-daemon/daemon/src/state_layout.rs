//! The one owner of the node's on-disk state layout under `--state-dir`:
//! where live images, node caches of remote images, VM process directories,
//! fetched artifacts and token files are, and what makes an image directory
//! complete.
//!
//! ```text
//! <state>/images/<ns>/<name>/          a complete live image (+ vmstream-capture.json)
//! <state>/images/<ns>/.<name>.partial/ a capture in progress (renamed when complete)
//! <state>/images/<ns>/.<name>.promote/ a node cache being promoted to a local image
//! <state>/cache/<ns>/<name>/           node cache of a remote image
//! <state>/vms/<id>/                    one VM process (vm.json, control.sock, vm.log, serial.log)
//! <state>/artifacts/sha256-<hex>          a fetched, verified artifact (kernel, initrd, disk image)
//! <state>/artifacts/sha256-<hex>.verified its digest and size, written before the file is renamed in
//! <state>/artifacts/.sha256-<hex>.<n>.partial a download in progress
//! <state>/stream-token, migration-token, supervisor.sock
//! ```
//!
//! Work in progress is named with a leading dot: Kubernetes names start
//! with a letter or digit, so `.<name>.partial` can be no image's name, and
//! images whose names differ only after a dot (`web.v1`, `web.v2`) never
//! share one.

use std::io;
use std::path::{Path, PathBuf};

use vmstream_vmm::image::{LiveImage as ImageFiles, STATE_FILE};

use crate::object_key::ObjectKey;
use crate::vm_protocol::CaptureSummary;

/// Figures of a local image, kept next to its files.
pub const CAPTURE_FILE: &str = "vmstream-capture.json";

/// The paths of the node's state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateLayout {
    root: PathBuf,
}

/// The files of one VM process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub record: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub serial: PathBuf,
}

impl StateLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<state>/images`.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// `<state>/images/<ns>/<name>`: the complete local copy of a LiveImage.
    pub fn image_dir(&self, image: &ObjectKey) -> PathBuf {
        self.images_dir().join(&image.namespace).join(&image.name)
    }

    /// Where a capture of `image` is written before it is renamed into
    /// place, so a directory at [`Self::image_dir`] is always complete.
    pub fn partial_image_dir(&self, image: &ObjectKey) -> PathBuf {
        self.in_progress_dir(image, "partial")
    }

    /// Where a complete node cache of `image` is written as a local image
    /// before it is renamed into place.
    pub fn promoting_image_dir(&self, image: &ObjectKey) -> PathBuf {
        self.in_progress_dir(image, "promote")
    }

    /// `<state>/images/<ns>/.<name>.<what>`, beside the image's directory
    /// (same file system, so the final rename is atomic).
    fn in_progress_dir(&self, image: &ObjectKey, what: &str) -> PathBuf {
        self.images_dir()
            .join(&image.namespace)
            .join(format!(".{}.{what}", image.name))
    }

    /// `<image dir>/vmstream-capture.json`: the figures of a local image.
    pub fn capture_file(&self, image: &ObjectKey) -> PathBuf {
        capture_file_in(&self.image_dir(image))
    }

    /// The image directory of `image` when it holds a complete image (its
    /// state file).
    pub fn complete_image(&self, image: &ObjectKey) -> Option<PathBuf> {
        let dir = self.image_dir(image);
        dir.join(STATE_FILE).is_file().then_some(dir)
    }

    /// The figures of the complete local image `image`, or `None` when
    /// there is none (from its capture file, else from its files).
    pub fn local_image(&self, image: &ObjectKey) -> Option<CaptureSummary> {
        let dir = self.image_dir(image);
        let files = ImageFiles::open(&dir).ok()?;
        if let Ok(text) = std::fs::read(capture_file_in(&dir))
            && let Ok(summary) = serde_json::from_slice::<CaptureSummary>(&text)
        {
            return Some(summary);
        }
        Some(CaptureSummary {
            memory_bytes: files.state().memory_size,
            pages: files.pages().pages() as u64,
            nonzero_pages: files.pages().nonzero_pages() as u64,
            size_bytes: dir_size(&dir).unwrap_or(0),
            capture_ms: 0.0,
            source_pause_ms: 0.0,
            dir,
        })
    }

    /// Every complete image under `<state>/images`, sorted (work in
    /// progress, named with a leading dot, is not an image even when its
    /// state file is already written).
    pub fn local_images(&self) -> Vec<ObjectKey> {
        let mut out = Vec::new();
        let Ok(namespaces) = std::fs::read_dir(self.images_dir()) else {
            return out;
        };
        for ns in namespaces.flatten() {
            let Ok(names) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            for name in names.flatten() {
                let in_progress = name.file_name().to_string_lossy().starts_with('.');
                if !in_progress && name.path().join(STATE_FILE).is_file() {
                    out.push(ObjectKey::live_image(
                        ns.file_name().to_string_lossy(),
                        name.file_name().to_string_lossy(),
                    ));
                }
            }
        }
        out.sort();
        out
    }

    /// `<state>/cache`.
    pub fn caches_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// `<state>/cache/<ns>/<name>`: the node cache of a remote image.
    pub fn cache_dir(&self, image: &ObjectKey) -> PathBuf {
        self.caches_dir().join(&image.namespace).join(&image.name)
    }

    /// Every node cache directory under `<state>/cache`, as image keys.
    pub fn caches(&self) -> Vec<ObjectKey> {
        let mut out = Vec::new();
        let Ok(namespaces) = std::fs::read_dir(self.caches_dir()) else {
            return out;
        };
        for ns in namespaces.flatten() {
            let Ok(names) = std::fs::read_dir(ns.path()) else {
                continue;
            };
            for name in names.flatten() {
                out.push(ObjectKey::live_image(
                    ns.file_name().to_string_lossy(),
                    name.file_name().to_string_lossy(),
                ));
            }
        }
        out
    }

    /// `<state>/vms`.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// The files of VM `id`, under `<state>/vms/<id>`.
    pub fn vm(&self, id: &str) -> VmPaths {
        let dir = self.vms_dir().join(id);
        VmPaths {
            record: dir.join("vm.json"),
            socket: dir.join("control.sock"),
            log: dir.join("vm.log"),
            serial: dir.join("serial.log"),
            dir,
        }
    }

    /// `<state>/artifacts`: the node's cache of fetched artifacts.
    pub fn artifacts_dir(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    /// `<state>/artifacts/sha256-<hex>`: the verified artifact with this
    /// SHA-256 (lowercase hex), shared by every LiveImage naming it.
    pub fn artifact_file(&self, sha256: &str) -> PathBuf {
        self.artifacts_dir().join(format!("sha256-{sha256}"))
    }

    /// `<state>/artifacts/sha256-<hex>.verified`: the digest and size the
    /// artifact had when it was verified.
    pub fn artifact_record(&self, sha256: &str) -> PathBuf {
        self.artifacts_dir()
            .join(format!("sha256-{sha256}.verified"))
    }

    /// `<state>/artifacts/.sha256-<hex>.<unique>.partial`: one download in
    /// progress (each fetch its own, so concurrent fetches of one digest do
    /// not share a file; same directory, so the final rename is atomic).
    pub fn partial_artifact(&self, sha256: &str, unique: &str) -> PathBuf {
        self.artifacts_dir()
            .join(format!(".sha256-{sha256}.{unique}.partial"))
    }

    /// `<state>/stream-token`: the cluster token handed to VM processes
    /// streaming remote images through the relay.
    pub fn stream_token_file(&self) -> PathBuf {
        self.root.join("stream-token")
    }

    /// `<state>/migration-token`: the token migrations authenticate with.
    pub fn migration_token_file(&self) -> PathBuf {
        self.root.join("migration-token")
    }

    /// `<state>/supervisor.sock`: the daemon's own control socket.
    pub fn supervisor_socket(&self) -> PathBuf {
        self.root.join("supervisor.sock")
    }
}

/// The capture file of the image in `dir` (complete or partial).
pub fn capture_file_in(dir: &Path) -> PathBuf {
    dir.join(CAPTURE_FILE)
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
    fn paths_follow_the_layout() {
        let layout = StateLayout::new("/s");
        let img = ObjectKey::live_image("ns", "img");
        assert_eq!(layout.image_dir(&img), Path::new("/s/images/ns/img"));
        assert_eq!(
            layout.partial_image_dir(&img),
            Path::new("/s/images/ns/.img.partial")
        );
        assert_eq!(
            layout.promoting_image_dir(&img),
            Path::new("/s/images/ns/.img.promote")
        );
        // Names that differ after a dot keep their own work in progress.
        assert_ne!(
            layout.partial_image_dir(&ObjectKey::live_image("ns", "web.v1")),
            layout.partial_image_dir(&ObjectKey::live_image("ns", "web.v2"))
        );
        assert_eq!(
            layout.capture_file(&img),
            Path::new("/s/images/ns/img/vmstream-capture.json")
        );
        assert_eq!(layout.cache_dir(&img), Path::new("/s/cache/ns/img"));
        let vm = layout.vm("vmc.ns.a");
        assert_eq!(vm.dir, Path::new("/s/vms/vmc.ns.a"));
        assert_eq!(vm.record, Path::new("/s/vms/vmc.ns.a/vm.json"));
        assert_eq!(vm.socket, Path::new("/s/vms/vmc.ns.a/control.sock"));
        assert_eq!(
            layout.artifact_file("ab12"),
            Path::new("/s/artifacts/sha256-ab12")
        );
        assert_eq!(
            layout.artifact_record("ab12"),
            Path::new("/s/artifacts/sha256-ab12.verified")
        );
        assert_eq!(
            layout.partial_artifact("ab12", "7-1"),
            Path::new("/s/artifacts/.sha256-ab12.7-1.partial")
        );
    }

    #[test]
    fn only_complete_images_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StateLayout::new(dir.path());
        let done = layout.image_dir(&ObjectKey::live_image("b", "x"));
        std::fs::create_dir_all(&done).unwrap();
        std::fs::write(done.join(STATE_FILE), "").unwrap();
        std::fs::create_dir_all(layout.image_dir(&ObjectKey::live_image("a", "y"))).unwrap();
        let partial = layout.partial_image_dir(&ObjectKey::live_image("b", "z"));
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join(STATE_FILE), "").unwrap();
        assert_eq!(layout.local_images(), [ObjectKey::live_image("b", "x")]);
        assert!(
            layout
                .complete_image(&ObjectKey::live_image("a", "y"))
                .is_none()
        );
    }
}
