//! Where a lazily streamed clone's pages come from. The fault handler only
//! sees this small trait, so a remote page source (another node's page
//! server) plugs in beside the local page store.

use std::io;

use crate::image::PageStore;
use crate::memory::PAGE_SIZE;

/// Why a page source could not deliver pages.
#[derive(Debug, thiserror::Error)]
#[error("cannot read pages {first}..{} from the page source", first + count)]
pub struct PageSourceError {
    pub first: usize,
    pub count: usize,
    #[source]
    pub source: io::Error,
}

/// A source of guest pages for [`super::lazy::LazyMemory`].
pub trait PageSource: Send + Sync {
    /// Number of pages the source describes (must equal the guest's).
    fn pages(&self) -> usize;

    /// Whether `page` is known to be all zeros (served with
    /// `UFFDIO_ZEROPAGE`, nothing is read).
    fn is_zero(&self, page: usize) -> bool;

    /// Reads pages `first..first + count` into `buf`
    /// (`count * PAGE_SIZE` bytes).
    fn read_pages(&self, first: usize, count: usize, buf: &mut [u8])
    -> Result<(), PageSourceError>;

    /// Address of `page` in a read-only mapping that stays valid and
    /// unchanged while `self` lives, if the source has one; the handler then
    /// copies straight from it with `UFFDIO_COPY` instead of reading into a
    /// bounce buffer first.
    fn mapped_page(&self, page: usize) -> Option<*const u8> {
        let _ = page;
        None
    }
}

impl PageSource for PageStore {
    fn pages(&self) -> usize {
        PageStore::pages(self)
    }

    fn is_zero(&self, page: usize) -> bool {
        !self.is_present(page)
    }

    fn read_pages(
        &self,
        first: usize,
        count: usize,
        buf: &mut [u8],
    ) -> Result<(), PageSourceError> {
        PageStore::read_pages(self, first, count, buf).map_err(|source| PageSourceError {
            first,
            count,
            source,
        })
    }

    fn mapped_page(&self, page: usize) -> Option<*const u8> {
        (page < PageStore::pages(self)).then(|| self.as_mapping().page_ptr(page))
    }
}

/// A page source that reads from a plain in-memory buffer (tests and
/// benchmarks: the bare userfaultfd round trip without file I/O).
#[derive(Debug)]
pub struct BufferSource {
    bytes: Box<[u8]>,
}

impl BufferSource {
    /// Wraps `bytes` (a multiple of [`PAGE_SIZE`] long).
    pub fn new(bytes: Vec<u8>) -> Self {
        assert_eq!(bytes.len() % PAGE_SIZE, 0, "buffer is not whole pages");
        Self {
            bytes: bytes.into_boxed_slice(),
        }
    }
}

impl PageSource for BufferSource {
    fn pages(&self) -> usize {
        self.bytes.len() / PAGE_SIZE
    }

    fn is_zero(&self, page: usize) -> bool {
        self.bytes[page * PAGE_SIZE..(page + 1) * PAGE_SIZE]
            .iter()
            .all(|&b| b == 0)
    }

    fn read_pages(
        &self,
        first: usize,
        count: usize,
        buf: &mut [u8],
    ) -> Result<(), PageSourceError> {
        let range = first * PAGE_SIZE..(first + count) * PAGE_SIZE;
        let src = self.bytes.get(range).ok_or_else(|| PageSourceError {
            first,
            count,
            source: io::Error::new(io::ErrorKind::InvalidInput, "pages out of range"),
        })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn mapped_page(&self, page: usize) -> Option<*const u8> {
        self.bytes
            .get(page * PAGE_SIZE..(page + 1) * PAGE_SIZE)
            .map(<[u8]>::as_ptr)
    }
}
