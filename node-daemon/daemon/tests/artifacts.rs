//! The artifact fetcher against a plain-HTTP server on loopback started by
//! the test: a good fetch lands in the cache and a second fetch is a cache
//! hit (no second request); a digest mismatch is refused and leaves nothing
//! in the cache; an unreachable URL, an HTTP error, a too-large artifact, a
//! file that is no kernel, and node-local paths (missing, wrong digest) each
//! fail with their reason.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use vmstream_api::v1alpha1::Artifact;
use vmstream_node::artifacts::{ArtifactFetcher, FetchError, hex};
use vmstream_node::state_layout::StateLayout;

/// A tiny HTTP/1.1 server answering GET `path` with fixed bytes (404 for
/// other paths), counting requests per path.
struct Server {
    addr: SocketAddr,
    requests: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Server {
    fn start(files: Vec<(&'static str, Vec<u8>)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let files: BTreeMap<String, Vec<u8>> =
            files.into_iter().map(|(p, b)| (p.to_owned(), b)).collect();
        let requests = Arc::new(Mutex::new(BTreeMap::new()));
        let counted = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                // Skip the headers.
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                        break;
                    }
                }
                *counted.lock().unwrap().entry(path.clone()).or_insert(0) += 1;
                let response = match files.get(&path) {
                    Some(body) => {
                        let mut r = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(body);
                        r
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = stream.write_all(&response);
            }
        });
        Self { addr, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn elf_kernel() -> Vec<u8> {
    let mut k = b"\x7fELF\x02\x01\x01".to_vec();
    k.resize(64 << 10, 0x5a);
    k
}

fn bz_image() -> Vec<u8> {
    let mut k = vec![0u8; 8192];
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k
}

/// Files in the artifact cache directory (complete or not).
fn cache_entries(state: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(StateLayout::new(state).artifacts_dir())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn a_fetched_artifact_is_cached_and_fetched_once() {
    let kernel = elf_kernel();
    let digest = sha256(&kernel);
    let server = Server::start(vec![("/vmlinux", kernel.clone()), ("/bz", bz_image())]);
    let state = tempfile::tempdir().unwrap();
    let fetcher = ArtifactFetcher::new(StateLayout::new(state.path()));
    let artifact = Artifact::url(server.url("/vmlinux"), digest.clone());

    let path = fetcher.fetch_kernel(&artifact).await.unwrap();
    assert_eq!(
        path,
        state.path().join(format!("artifacts/sha256-{digest}"))
    );
    assert_eq!(std::fs::read(&path).unwrap(), kernel);
    assert_eq!(
        cache_entries(state.path()),
        [
            format!("sha256-{digest}"),
            format!("sha256-{digest}.verified")
        ]
    );
    assert_eq!(server.requests("/vmlinux"), 1);

    // A cache hit: no second request, also from a new fetcher (a restarted
    // daemon).
    let again = ArtifactFetcher::new(StateLayout::new(state.path()));
    assert_eq!(again.fetch_kernel(&artifact).await.unwrap(), path);
    assert_eq!(fetcher.fetch(&artifact).await.unwrap(), path);
    assert_eq!(server.requests("/vmlinux"), 1);

    // A cached file without its record is re-hashed in full, then used.
    std::fs::remove_file(StateLayout::new(state.path()).artifact_record(&digest)).unwrap();
    assert_eq!(fetcher.fetch(&artifact).await.unwrap(), path);
    assert_eq!(server.requests("/vmlinux"), 1);
    // A cached file that was changed is fetched again.
    std::fs::write(&path, b"corrupted").unwrap();
    std::fs::remove_file(StateLayout::new(state.path()).artifact_record(&digest)).unwrap();
    assert_eq!(fetcher.fetch(&artifact).await.unwrap(), path);
    assert_eq!(std::fs::read(&path).unwrap(), kernel);
    assert_eq!(server.requests("/vmlinux"), 2);

    // A bzImage is a kernel too.
    let bz = Artifact::url(server.url("/bz"), sha256(&bz_image()));
    fetcher.fetch_kernel(&bz).await.unwrap();

    // Concurrent fetches of one digest both succeed with the same file.
    let fresh = tempfile::tempdir().unwrap();
    let fetcher = ArtifactFetcher::new(StateLayout::new(fresh.path()));
    let (a, b) = tokio::join!(fetcher.fetch(&artifact), fetcher.fetch(&artifact));
    assert_eq!(a.unwrap(), b.unwrap());
    assert_eq!(cache_entries(fresh.path()).len(), 2, "file and record only");
}

#[tokio::test]
async fn a_digest_mismatch_is_refused_and_leaves_nothing_cached() {
    let server = Server::start(vec![("/vmlinux", elf_kernel())]);
    let state = tempfile::tempdir().unwrap();
    let fetcher = ArtifactFetcher::new(StateLayout::new(state.path()));
    let wrong = sha256(b"something else");
    let err = fetcher
        .fetch(&Artifact::url(server.url("/vmlinux"), wrong.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ArtifactDigestMismatch");
    let FetchError::DigestMismatch { expected, got, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!((expected, got), (&wrong, &sha256(&elf_kernel())));
    assert!(
        cache_entries(state.path()).is_empty(),
        "{:?}",
        cache_entries(state.path())
    );
}

#[tokio::test]
async fn unreachable_urls_and_http_errors_are_unreachable() {
    // A port nothing listens on: bind, note the port, close.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let fetcher = ArtifactFetcher::new(StateLayout::new(state.path()));
    let url = format!("http://{closed}/vmlinux");
    let err = fetcher
        .fetch(&Artifact::url(url.clone(), sha256(b"k")))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ArtifactUnreachable");
    assert!(err.to_string().contains(&url), "{err}");

    let server = Server::start(vec![]);
    let err = fetcher
        .fetch(&Artifact::url(server.url("/missing"), sha256(b"k")))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ArtifactUnreachable");
    assert!(err.to_string().contains("404"), "{err}");
    assert!(cache_entries(state.path()).is_empty());
}

#[tokio::test]
async fn too_large_artifacts_and_non_kernels_are_refused() {
    let script = b"#!/bin/sh\necho not a kernel\n".to_vec();
    let server = Server::start(vec![("/big", vec![7u8; 4096]), ("/script", script.clone())]);
    let state = tempfile::tempdir().unwrap();
    let fetcher = ArtifactFetcher::new(StateLayout::new(state.path())).with_max_bytes(1024);
    let err = fetcher
        .fetch(&Artifact::url(server.url("/big"), sha256(&[7u8; 4096])))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ArtifactTooLarge");
    assert!(cache_entries(state.path()).is_empty());

    let err = fetcher
        .fetch_kernel(&Artifact::url(server.url("/script"), sha256(&script)))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "NotAKernel");
    assert!(err.to_string().contains("/script"), "{err}");
}

#[tokio::test]
async fn node_local_paths_are_verified_when_a_digest_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vmlinux");
    std::fs::write(&file, elf_kernel()).unwrap();
    let fetcher = ArtifactFetcher::new(StateLayout::new(dir.path().join("state")));
    let path = file.display().to_string();

    let right = Artifact::path(path.clone(), Some(sha256(&elf_kernel())));
    assert_eq!(fetcher.fetch_kernel(&right).await.unwrap(), file);
    let unverified = Artifact::path(path.clone(), None);
    assert_eq!(fetcher.fetch(&unverified).await.unwrap(), file);

    let wrong = Artifact::path(path.clone(), Some(sha256(b"other")));
    let err = fetcher.fetch(&wrong).await.unwrap_err();
    assert_eq!(err.reason(), "ArtifactDigestMismatch");
    assert!(err.to_string().contains(&path), "{err}");

    let missing = Artifact::path(dir.path().join("nope").display().to_string(), None);
    let err = fetcher.fetch(&missing).await.unwrap_err();
    assert_eq!(err.reason(), "ArtifactNotFound");

    // Nothing of a node-local artifact enters the cache.
    assert!(cache_entries(&dir.path().join("state")).is_empty());
}
