//! A read-through image for a node's own page server: [`ReadThrough`]
//! serves the node cache of a remote image and, before serving a range,
//! makes sure its pages are there (fetching what is missing from the
//! image's holders through the node's one [`RemotePages`]). A node daemon
//! serves it on loopback to its VM processes (one process per VM), each of
//! which reads with a [`crate::direct::DirectPages`]: every clone on the
//! node shares the one cache, so a page crosses the network at most once
//! per node, however many VM processes touch it.

use std::io;
use std::sync::Arc;

use vmstream_vmm::image::Bitmap;

use crate::client::RemotePages;
use crate::server::ServedImage;

/// The node cache of a remote image, filled on demand (see the module
/// documentation).
#[derive(Debug, Clone)]
pub struct ReadThrough {
    remote: Arc<RemotePages>,
}

impl ReadThrough {
    /// Serves through `remote` (and its node cache).
    pub fn new(remote: Arc<RemotePages>) -> Self {
        Self { remote }
    }

    /// The remote source this image reads through.
    pub fn remote(&self) -> &Arc<RemotePages> {
        &self.remote
    }
}

impl ServedImage for ReadThrough {
    fn pages(&self) -> usize {
        self.remote.cache().pages()
    }

    fn nonzero(&self) -> &Bitmap {
        self.remote.cache().nonzero()
    }

    fn holds(&self, first: usize, end: usize) -> bool {
        match self.remote.ensure(first, end - first) {
            Ok(()) => {
                for p in first..end {
                    self.remote.cache().record_touch(p);
                }
                true
            }
            Err(e) => {
                tracing::warn!(first, end, error = %e, "read-through fetch failed");
                false
            }
        }
    }

    fn read_run(&self, first: usize, end: usize, buf: &mut [u8]) -> io::Result<()> {
        self.remote.cache().read_raw(first, end, buf)
    }

    fn state_file(&self) -> Option<io::Result<Vec<u8>>> {
        ServedImage::state_file(self.remote.cache().as_ref())
    }
}
