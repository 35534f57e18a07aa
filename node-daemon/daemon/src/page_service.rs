//! The node's page streaming: a public [`PageServer`] on `--stream-addr`
//! serving every complete local image (`<state>/images/<ns>/<name>`, with
//! its state file) to other nodes, and a loopback relay server serving the
//! node's caches of **remote** images to this node's own VM processes.
//!
//! ```text
//!  other nodes ──► public PageServer ──► ImageDir (local images, also complete caches once promoted)
//!
//!  VM process ─DirectPages─► relay PageServer (loopback) ──► ReadThrough
//!  VM process ─DirectPages─►        │                          │ ensure: claim, fetch on the fault conn
//!                                   ▼                          ▼
//!                         <state>/cache/<ns>/<name>/  ◄── RemotePages ──► holders (home first)
//!                         cache.pages, cache.idx, state.bin, holders, working-set
//! ```
//!
//! One process per VM means the node cache must be shared between
//! processes: the daemon owns the one `NodeImageCache` + `RemotePages` per
//! remote image and each VM process reads through it over loopback, so a
//! second clone on the node fetches nothing the first one already fetched,
//! and no page crosses the network twice for the node. A bulk prefetch of
//! the whole image (working set first) runs in the background; once the
//! cache is complete it is promoted into a complete local image under
//! `<state>/images/<ns>/<name>` (written by the vmm's page-store writer,
//! state file copied), so the node lists the image in its VMNode, serves
//! it to other nodes, and later clones start copy-on-write from it.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmstream_pagestream::{
    ClusterToken, ImageDir, PageServer, ReadThrough, RemoteConfig, RemotePages, ServerOptions,
    fetch_state_file,
};
use vmstream_vmm::image::{PageStoreWriter, STATE_FILE, StateFile};

use crate::object_key::ObjectKey;
use crate::state_layout::StateLayout;

/// Environment variable carrying the cluster token (the Helm chart sets it
/// from a Secret).
pub const TOKEN_ENV: &str = "VMSTREAM_STREAM_TOKEN";
/// Token used when none is configured (development only: logged).
const DEVELOPMENT_TOKEN: &[u8] = b"vmstream-development-token-not-secret";
/// File listing the holders of a cached remote image (one address a line).
const HOLDERS_FILE: &str = "holders";

/// Why the page service could not do something.
#[derive(Debug, thiserror::Error)]
pub enum PageServiceError {
    #[error("cannot read the cluster token")]
    Token(#[source] vmstream_pagestream::auth::TokenError),
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no holder of image {0} is known (home node without an address, no node caching it)")]
    NoHolders(String),
    #[error("cannot open the remote image {image}")]
    Remote {
        image: String,
        #[source]
        source: vmstream_pagestream::client::RemoteOpenError,
    },
    #[error("cannot fetch the state file of {image}")]
    State {
        image: String,
        #[source]
        source: vmstream_pagestream::direct::DirectError,
    },
    #[error("the state file of {image} fetched from its holders is invalid")]
    BadState {
        image: String,
        #[source]
        source: vmstream_vmm::image::ImageOpenError,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PageServiceError {
    let what = what.into();
    move |source| PageServiceError::Io { what, source }
}

/// The cluster token's bytes: from `file` (trailing whitespace ignored),
/// else from [`TOKEN_ENV`], else the development token (with a warning).
pub fn load_token(file: Option<&Path>) -> Result<Vec<u8>, PageServiceError> {
    let bytes = if let Some(path) = file {
        let mut bytes = std::fs::read(path).map_err(io(format!("read {}", path.display())))?;
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        bytes
    } else if let Ok(value) = std::env::var(TOKEN_ENV)
        && !value.trim().is_empty()
    {
        value.trim().as_bytes().to_vec()
    } else {
        tracing::warn!(
            "no page-streaming token configured (--stream-token-file or {TOKEN_ENV}): using the fixed development token; any peer knowing it can read images"
        );
        DEVELOPMENT_TOKEN.to_vec()
    };
    ClusterToken::new(bytes.clone()).map_err(PageServiceError::Token)?;
    Ok(bytes)
}

/// What a VM process needs to stream a remote image through the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayedImage {
    /// Directory holding the image's `state.bin`.
    pub state_dir: PathBuf,
    pub image_id: String,
    /// The daemon's loopback relay server.
    pub relay: SocketAddr,
    /// File with the cluster token (mode 0600).
    pub token_file: PathBuf,
}

/// The node's page servers and remote-image caches.
pub struct PageService {
    layout: StateLayout,
    token: ClusterToken,
    token_file: PathBuf,
    public: Option<PageServer>,
    relay: PageServer,
    served: Mutex<Vec<ObjectKey>>,
    remotes: Mutex<HashMap<String, Arc<RemotePages>>>,
}

impl std::fmt::Debug for PageService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageService")
            .field("public", &self.public.as_ref().map(PageServer::local_addr))
            .field("relay", &self.relay.local_addr())
            .finish()
    }
}

fn resolve(addr: &str) -> Option<SocketAddr> {
    addr.to_socket_addrs().ok()?.next()
}

/// Holders of an image in the order to try them: the home node's address,
/// then the addresses of other nodes that list the image as cached;
/// `self_node` is never a holder. Pure.
pub fn holders_of(
    image: &str,
    home: Option<&str>,
    self_node: &str,
    nodes: &[(String, Option<String>, Vec<String>)],
) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |a: &Option<String>| {
        if let Some(a) = a
            && !out.contains(a)
        {
            out.push(a.clone());
        }
    };
    for (name, address, _) in nodes {
        if Some(name.as_str()) == home && name != self_node {
            push(address);
        }
    }
    for (name, address, images) in nodes {
        if name != self_node && images.iter().any(|i| i == image) {
            push(address);
        }
    }
    out
}

impl PageService {
    /// Starts the public server on `public_addr` (a bind failure is logged:
    /// this node then serves no images) and the relay on `relay_addr`
    /// (falling back to any loopback port), and reopens the node caches of
    /// remote images left by an earlier run.
    pub fn start(
        state_dir: &Path,
        token_bytes: &[u8],
        public_addr: Option<&str>,
        relay_addr: &str,
    ) -> Result<Arc<Self>, PageServiceError> {
        let token = ClusterToken::new(token_bytes.to_vec()).map_err(PageServiceError::Token)?;
        let public = public_addr.and_then(|addr| {
            match PageServer::bind(addr, token.clone(), ServerOptions::default()) {
                Ok(s) => {
                    tracing::info!(addr = %s.local_addr(), "page server listening");
                    Some(s)
                }
                Err(e) => {
                    tracing::error!(addr, error = %e, "cannot bind the page server: this node serves no images");
                    None
                }
            }
        });
        let relay = PageServer::bind(relay_addr, token.clone(), ServerOptions::default())
            .or_else(|e| {
                tracing::warn!(addr = relay_addr, error = %e, "relay address taken; using any loopback port (VM processes started before a restart lose their relay)");
                PageServer::bind("127.0.0.1:0", token.clone(), ServerOptions::default())
            })
            .map_err(io("bind the loopback relay server"))?;
        std::fs::create_dir_all(state_dir).map_err(io("create the state directory"))?;
        let layout = StateLayout::new(state_dir);
        let token_file = layout.stream_token_file();
        write_private(&token_file, token_bytes)
            .map_err(io(format!("write {}", token_file.display())))?;
        let service = Arc::new(Self {
            layout,
            token,
            token_file,
            public,
            relay,
            served: Mutex::new(Vec::new()),
            remotes: Mutex::new(HashMap::new()),
        });
        service.reopen_caches();
        Ok(service)
    }

    /// The public server's address, if it listens.
    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.public.as_ref().map(PageServer::local_addr)
    }

    /// Counters of the public server, if it listens.
    pub fn public_stats(&self) -> Option<vmstream_pagestream::ServerStats> {
        self.public.as_ref().map(PageServer::stats)
    }

    /// The loopback relay's address.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay.local_addr()
    }

    /// Serves every complete local image not served yet (call after
    /// images become Ready or caches are promoted).
    pub fn serve_local_images(&self, images: &[ObjectKey]) {
        let Some(public) = &self.public else {
            return;
        };
        let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        for image in images {
            if served.contains(image) {
                continue;
            }
            let id = image.namespaced_name();
            match ImageDir::open(&self.layout.image_dir(image)) {
                Ok(files) => {
                    public.add_image(&id, Arc::new(files));
                    served.push(image.clone());
                    tracing::info!(image = %id, "serving local image");
                }
                Err(e) => {
                    tracing::warn!(image = %id, error = %vmstream_pagestream::error_chain(&e), "cannot serve local image")
                }
            }
        }
    }

    /// Stops serving a local image (it is being removed).
    pub fn forget_local_image(&self, image: &ObjectKey) {
        if let Some(public) = &self.public {
            public.remove_image(&image.namespaced_name());
        }
        self.served
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|i| i != image);
    }

    fn reopen_caches(self: &Arc<Self>) {
        for image in self.layout.caches() {
            let dir = self.layout.cache_dir(&image);
            let holders: Vec<String> = std::fs::read_to_string(dir.join(HOLDERS_FILE))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
            if let Err(e) = self.relay_remote(&image, &holders) {
                tracing::warn!(namespace = %image.namespace, name = %image.name, error = %vmstream_pagestream::error_chain(&e), "cannot reopen a node cache");
            }
        }
    }

    /// Makes the remote `image` available to local VM processes:
    /// opens (or reuses) its node cache, fetching the index and the state
    /// file from `holders` when the cache is new, serves it on the relay and
    /// starts the background prefetch. Idempotent.
    pub fn relay_remote(
        self: &Arc<Self>,
        image: &ObjectKey,
        holders: &[String],
    ) -> Result<RelayedImage, PageServiceError> {
        let id = image.namespaced_name();
        let dir = self.layout.cache_dir(image);
        let relayed = RelayedImage {
            state_dir: dir.clone(),
            image_id: id.clone(),
            relay: self.relay_addr(),
            token_file: self.token_file.clone(),
        };
        let mut remotes = self.remotes.lock().unwrap_or_else(|e| e.into_inner());
        if remotes.contains_key(&id) {
            return Ok(relayed);
        }
        let addrs: Vec<SocketAddr> = holders.iter().filter_map(|h| resolve(h)).collect();
        if addrs.is_empty()
            && !dir
                .join(vmstream_pagestream::cache::CACHE_INDEX_FILE)
                .is_file()
        {
            return Err(PageServiceError::NoHolders(id));
        }
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let config = RemoteConfig::new(&id, addrs, self.token.clone());
        if StateFile::read(&dir).is_err() {
            let bytes = fetch_state_file(&config).map_err(|source| PageServiceError::State {
                image: id.clone(),
                source,
            })?;
            let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
            std::fs::write(&tmp, &bytes).map_err(io(format!("write {}", tmp.display())))?;
            std::fs::rename(&tmp, dir.join(STATE_FILE))
                .map_err(io(format!("rename {}", tmp.display())))?;
            if let Err(source) = StateFile::read(&dir) {
                let _ = std::fs::remove_file(dir.join(STATE_FILE));
                return Err(PageServiceError::BadState { image: id, source });
            }
        }
        let _ = std::fs::write(dir.join(HOLDERS_FILE), holders.join("\n"));
        let remote = Arc::new(RemotePages::open(config, &dir).map_err(|source| {
            PageServiceError::Remote {
                image: id.clone(),
                source,
            }
        })?);
        self.relay
            .add_image(&id, Arc::new(ReadThrough::new(Arc::clone(&remote))));
        remotes.insert(id.clone(), Arc::clone(&remote));
        drop(remotes);
        tracing::info!(image = %id, holders = ?holders, "relaying remote image to local VMs");
        self.prefetch_and_promote(image, remote);
        Ok(relayed)
    }

    fn prefetch_and_promote(self: &Arc<Self>, image: &ObjectKey, remote: Arc<RemotePages>) {
        let working_set = remote.cache().saved_working_set().to_vec();
        match remote.start_prefetch(working_set) {
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot start the prefetch"),
        }
        let this = Arc::clone(self);
        let image = image.clone();
        let spawned = std::thread::Builder::new()
            .name("cache-promote".into())
            .spawn(move || {
                remote.wait_prefetch();
                if !remote.cache().is_complete() {
                    tracing::warn!(image = %image.namespaced_name(), "prefetch ended with the cache incomplete; it is not promoted");
                    return;
                }
                match this.promote(&image, &remote) {
                    Ok(true) => tracing::info!(image = %image.namespaced_name(), "node cache complete: promoted to a local image"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(image = %image.namespaced_name(), error = %vmstream_pagestream::error_chain(&e), "cannot promote the complete node cache"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the cache promotion thread");
        }
    }

    /// Writes the complete cache as a local image (`<state>/images/...`,
    /// via a `.partial` directory and a rename). `false` if one exists.
    fn promote(&self, image: &ObjectKey, remote: &RemotePages) -> Result<bool, PageServiceError> {
        if self.layout.complete_image(image).is_some() {
            return Ok(false);
        }
        let dest = self.layout.image_dir(image);
        let cache = remote.cache();
        let partial = self.layout.promoting_image_dir(image);
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io(format!("create {}", partial.display())))?;
        let bytes = cache.bytes(0, cache.pages());
        let mut writer = PageStoreWriter::prepare(&partial, bytes.len()).map_err(io(format!(
            "prepare the page store in {}",
            partial.display()
        )))?;
        // SAFETY: `bytes` is the cache's read-only mapping of exactly
        // `bytes.len()` bytes; the cache is complete, so no page of it is
        // written any more while the writer reads.
        unsafe { writer.write_from(bytes.as_ptr(), None, None) }.map_err(|e| {
            PageServiceError::Io {
                what: format!("write the page store in {}", partial.display()),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        writer.finish().map_err(|e| PageServiceError::Io {
            what: format!("finish the page store in {}", partial.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        std::fs::copy(cache.dir().join(STATE_FILE), partial.join(STATE_FILE))
            .map_err(io("copy the state file"))?;
        std::fs::rename(&partial, &dest).map_err(io(format!("rename to {}", dest.display())))?;
        Ok(true)
    }

    /// Cache counters of every relayed remote image (`ns/name` → stats).
    pub fn cache_stats(&self) -> Vec<(String, vmstream_pagestream::CacheStats)> {
        self.remotes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, r)| (id.clone(), r.cache().stats()))
            .collect()
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_put_the_home_first_and_never_this_node() {
        let nodes = vec![
            ("a".to_string(), Some("10.0.0.1:7480".to_string()), vec![]),
            (
                "b".to_string(),
                Some("10.0.0.2:7480".to_string()),
                vec!["ns/img".to_string()],
            ),
            (
                "c".to_string(),
                Some("10.0.0.3:7480".to_string()),
                vec!["ns/img".to_string()],
            ),
            ("d".to_string(), None, vec!["ns/img".to_string()]),
        ];
        assert_eq!(
            holders_of("ns/img", Some("a"), "c", &nodes),
            vec!["10.0.0.1:7480", "10.0.0.2:7480"]
        );
        assert_eq!(
            holders_of("ns/img", Some("b"), "a", &nodes),
            vec!["10.0.0.2:7480", "10.0.0.3:7480"]
        );
        assert!(holders_of("ns/other", Some("d"), "a", &nodes).is_empty());
    }
}
