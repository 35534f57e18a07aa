//! The remote page source: [`RemotePages`] implements the VMM's
//! [`PageSource`] for an image whose pages live on other nodes. Every read
//! goes through the node's [`NodeImageCache`]: pages already there are read
//! (or mapped) from the cache file; missing pages are claimed and fetched on
//! the **fault connection** (one request per run, synchronous for the fault
//! handler, `TCP_NODELAY`), while a **bulk connection** prefetches the rest in
//! the background — the recorded working set first, then everything else in
//! page order — with a window of pipelined requests.
//!
//! Every page written into the cache came in a frame whose CRC verified and
//! whose request id, range and length matched the request; nothing else is
//! ever marked present, so a reader never sees wrong data. When a peer
//! fails (connection refused or reset, timeout, refusal, bad frame) the
//! claims are released, the fetcher backs off and tries the next holder,
//! until the retry budget is spent; only then does `read_pages` fail.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmstream_vmm::memory::{PAGE_SIZE, PageSource, PageSourceError};

use crate::cache::{CacheOpenError, FetchPath, NodeImageCache, PageState};
pub use crate::config::RemoteConfig;
pub use crate::connection::{ConnectError, RequestError};
use crate::connection::{Connection, connect_any};
use crate::wire::{Accept, Command, MAX_BATCH_PAGES, Role, valid_image_id};

/// Why a remote image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RemoteOpenError {
    #[error("image id {0:?} is not 1..=256 printable ASCII bytes")]
    BadImageId(String),
    #[error("no holder of the image could be reached")]
    Connect(#[source] ConnectError),
    #[error("cannot read the image index")]
    Index(#[source] RequestError),
    #[error("cannot open the node image cache")]
    Cache(#[from] CacheOpenError),
}

/// Counters of one [`RemotePages`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RemoteStats {
    pub connects: u64,
    pub fault_requests: u64,
    pub fault_failures: u64,
    pub bulk_requests: u64,
    pub bulk_failures: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connects: AtomicU64,
    pub fault_requests: AtomicU64,
    pub fault_failures: AtomicU64,
    pub bulk_requests: AtomicU64,
    pub bulk_failures: AtomicU64,
}

/// Groups claimed pages (sorted) into request ranges: consecutive claimed
/// pages with only zero pages between them, at most `max` pages long.
pub fn group_claimed(
    claimed: &[usize],
    is_zero: impl Fn(usize) -> bool,
    max: usize,
) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &p in claimed {
        if let Some(last) = out.last_mut()
            && p >= last.1
            && p + 1 - last.0 <= max
            && (last.1..p).all(&is_zero)
        {
            last.1 = p + 1;
            continue;
        }
        out.push((p, p + 1));
    }
    out
}

struct FaultLane {
    conn: Option<Connection>,
    cursor: usize,
}

/// The state a [`RemotePages`] shares with its bulk prefetch threads.
pub(crate) struct Inner {
    pub config: RemoteConfig,
    pub cache: Arc<NodeImageCache>,
    /// The image's page counts, checked against every holder's Accept.
    pub accept: Accept,
    fault: Mutex<FaultLane>,
    pub counters: Counters,
    pub stop: AtomicBool,
    /// Ranges the bulk prefetcher planned, in order (diagnostics); its lock
    /// also serializes the planning of the bulk connections.
    pub bulk_log: Mutex<Vec<(usize, usize)>>,
}

/// A [`PageSource`] that streams an image from other nodes through the
/// node image cache (see the module documentation).
pub struct RemotePages {
    inner: Arc<Inner>,
    bulk: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for RemotePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemotePages")
            .field("image", &self.inner.config.image_id)
            .field("holders", &self.inner.config.holders)
            .finish()
    }
}

impl RemotePages {
    /// Opens the image: reuses a cache of it in `cache_dir` if there is
    /// one (no network needed), otherwise asks a holder for its size and
    /// index and creates the cache. Later clones on the node should share
    /// the cache through [`RemotePages::with_cache`].
    pub fn open(
        config: RemoteConfig,
        cache_dir: &std::path::Path,
    ) -> Result<Self, RemoteOpenError> {
        if !valid_image_id(&config.image_id) {
            return Err(RemoteOpenError::BadImageId(config.image_id.clone()));
        }
        if let Some(cache) = NodeImageCache::open_existing(cache_dir)?
            && cache.image_id() == config.image_id
        {
            return Ok(Self::with_cache(config, cache));
        }
        let mut cursor = 0;
        let deadline = Instant::now() + config.retry_budget;
        let mut backoff = config.backoff_initial;
        let (mut conn, words) = loop {
            let attempt = connect_any(&config, Role::Fault, &mut cursor, None)
                .map_err(RemoteOpenError::Connect)
                .and_then(|mut c| {
                    let words = c.read_index().map_err(RemoteOpenError::Index)?;
                    Ok((c, words))
                });
            match attempt {
                Ok(x) => break x,
                Err(e) if Instant::now() + backoff < deadline => {
                    tracing::warn!(error = %crate::error_chain(&e), "opening the remote image failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(config.backoff_max);
                }
                Err(e) => return Err(e),
            }
        };
        let pages = conn.accept().pages as usize;
        let cache = NodeImageCache::open(cache_dir, &config.image_id, pages, &words)?;
        conn.release_buffer();
        let me = Self::with_cache(config, cache);
        me.inner.counters.connects.fetch_add(1, Ordering::Relaxed);
        let mut lane = me.inner.fault.lock().unwrap_or_else(|e| e.into_inner());
        lane.conn = Some(conn);
        lane.cursor = cursor;
        drop(lane);
        Ok(me)
    }

    /// A remote source over an already open node cache of the image
    /// (shared with other clones on the node). Connects only when a page
    /// is missing.
    pub fn with_cache(config: RemoteConfig, cache: Arc<NodeImageCache>) -> Self {
        let accept = Accept {
            pages: cache.pages() as u64,
            nonzero_pages: cache.nonzero_count() as u64,
        };
        Self {
            inner: Arc::new(Inner {
                config,
                cache,
                accept,
                fault: Mutex::new(FaultLane {
                    conn: None,
                    cursor: 0,
                }),
                counters: Counters::default(),
                stop: AtomicBool::new(false),
                bulk_log: Mutex::new(Vec::new()),
            }),
            bulk: Mutex::new(None),
        }
    }

    /// The node cache this source reads through.
    pub fn cache(&self) -> &Arc<NodeImageCache> {
        &self.inner.cache
    }

    /// The counters.
    pub fn stats(&self) -> RemoteStats {
        let c = &self.inner.counters;
        RemoteStats {
            connects: c.connects.load(Ordering::Relaxed),
            fault_requests: c.fault_requests.load(Ordering::Relaxed),
            fault_failures: c.fault_failures.load(Ordering::Relaxed),
            bulk_requests: c.bulk_requests.load(Ordering::Relaxed),
            bulk_failures: c.bulk_failures.load(Ordering::Relaxed),
        }
    }

    /// Starts the background prefetch of every page not yet cached: the
    /// pages in `first` (a working set, in order) come first, then the
    /// rest in page order. Returns `false` (and starts nothing) if a
    /// prefetch of this cache is already running on the node.
    pub fn start_prefetch(&self, first: Vec<u64>) -> io::Result<bool> {
        let cache = &self.inner.cache;
        if cache.prefetching.swap(true, Ordering::AcqRel) {
            return Ok(false);
        }
        let inner = Arc::clone(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("pagestream-bulk".into())
            .spawn(move || {
                let lanes = inner.config.bulk_connections.max(1);
                std::thread::scope(|scope| {
                    for lane in 1..lanes {
                        let (inner, first) = (&inner, &first);
                        let spawned = std::thread::Builder::new()
                            .name(format!("pagestream-bulk{lane}"))
                            .spawn_scoped(scope, move || inner.bulk_loop(first, lane));
                        if let Err(e) = spawned {
                            tracing::warn!(error = %e, "cannot start another bulk connection thread");
                        }
                    }
                    inner.bulk_loop(&first, 0);
                });
                inner.cache.prefetching.store(false, Ordering::Release);
                if let Err(e) = inner.cache.flush() {
                    tracing::warn!(error = %e, "cannot flush the node image cache");
                }
            });
        match spawned {
            Ok(h) => {
                *self.bulk.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
                Ok(true)
            }
            Err(e) => {
                cache.prefetching.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// The page ranges the background prefetcher planned (and then
    /// requested) so far, in order over all its bulk connections
    /// (diagnostics: shows the working set going first).
    pub fn bulk_ranges(&self) -> Vec<(usize, usize)> {
        self.inner
            .bulk_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for the background prefetch started by this source to end.
    pub fn wait_prefetch(&self) {
        let h = self.bulk.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }

    /// Makes sure every non-zero page of `first..first + count` is in the
    /// node cache, fetching what is missing on the fault connection and
    /// waiting for pages someone else is fetching. Retries with backoff
    /// across holders until the retry budget is spent.
    pub fn ensure(&self, first: usize, count: usize) -> Result<(), io::Error> {
        self.inner.ensure(first, count)
    }
}

impl Drop for RemotePages {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.wait_prefetch();
    }
}

impl Inner {
    fn ensure(&self, first: usize, count: usize) -> Result<(), io::Error> {
        let cache = &self.cache;
        let end = first
            .checked_add(count)
            .filter(|&e| e <= cache.pages())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "pages {first}+{count} beyond the image's {} pages",
                        cache.pages()
                    ),
                )
            })?;
        let deadline = Instant::now() + self.config.retry_budget;
        let mut backoff = self.config.backoff_initial;
        loop {
            let seen = cache.generation();
            let mut mine = Vec::new();
            let mut busy = false;
            for p in first..end {
                match cache.claim(p) {
                    PageState::Missing => mine.push(p),
                    PageState::Busy => busy = true,
                    PageState::Zero | PageState::Present => {}
                }
            }
            if mine.is_empty() && !busy {
                return Ok(());
            }
            if !mine.is_empty()
                && let Err(e) = self.fetch_for_fault(&mine)
            {
                self.counters.fault_failures.fetch_add(1, Ordering::Relaxed);
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no holder delivered pages {first}..{end} of {:?} within {:?}: {e}",
                            self.config.image_id, self.config.retry_budget
                        ),
                    ));
                }
                tracing::warn!(image = %self.config.image_id, error = %e, "fetching faulted pages failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(self.config.backoff_max);
                continue;
            }
            if busy {
                cache.wait_change(seen, Duration::from_millis(100));
            }
        }
    }

    /// Fetches claimed pages on the fault connection. On failure every
    /// claim not yet completed is released.
    fn fetch_for_fault(&self, mine: &[usize]) -> Result<(), String> {
        let cache = &self.cache;
        let runs = group_claimed(mine, |p| !cache.nonzero().get(p), MAX_BATCH_PAGES as usize);
        let mut lane = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        let release_from = |i: usize| {
            for &(a, b) in &runs[i..] {
                cache.release(a, b);
            }
        };
        if lane.conn.is_none() {
            let mut cursor = lane.cursor;
            let conn = connect_any(&self.config, Role::Fault, &mut cursor, Some(self.accept));
            lane.cursor = cursor;
            match conn {
                Ok(c) => {
                    self.counters.connects.fetch_add(1, Ordering::Relaxed);
                    lane.conn = Some(c);
                }
                Err(e) => {
                    release_from(0);
                    return Err(crate::error_chain(&e));
                }
            }
        }
        let conn = lane.conn.as_mut().expect("connected above");
        let mut ids = Vec::with_capacity(runs.len());
        let mut failure = None;
        for &(a, b) in &runs {
            match conn.send(Command::ReadPages, a, b) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            for (i, (&(a, b), &id)) in runs.iter().zip(&ids).enumerate() {
                self.counters.fault_requests.fetch_add(1, Ordering::Relaxed);
                match conn.receive_pages(cache, id, a, b) {
                    Ok(()) => cache.complete(a, b, FetchPath::Fault),
                    Err(e) => {
                        release_from(i);
                        failure = Some(e);
                        break;
                    }
                }
            }
        } else {
            release_from(0);
        }
        match failure {
            None => Ok(()),
            Some(e) => {
                lane.conn = None;
                lane.cursor = (lane.cursor + 1) % self.config.holders.len().max(1);
                Err(crate::error_chain(&e))
            }
        }
    }
}

impl PageSource for RemotePages {
    fn pages(&self) -> usize {
        self.inner.cache.pages()
    }

    fn is_zero(&self, page: usize) -> bool {
        !self.inner.cache.nonzero().get(page)
    }

    fn read_pages(
        &self,
        first: usize,
        count: usize,
        buf: &mut [u8],
    ) -> Result<(), PageSourceError> {
        let cache = &self.inner.cache;
        let err = |source| PageSourceError {
            first,
            count,
            source,
        };
        if buf.len() != count * PAGE_SIZE {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer of {} bytes for {count} pages", buf.len()),
            )));
        }
        self.inner.ensure(first, count).map_err(err)?;
        for p in first..first + count {
            cache.record_touch(p);
        }
        cache.copy_pages(first, count, buf).map_err(|p| {
            err(io::Error::other(format!(
                "page {p} is not in the cache after fetching"
            )))
        })
    }

    fn mapped_page(&self, page: usize) -> Option<*const u8> {
        let ptr = self.inner.cache.present_page_ptr(page);
        if ptr.is_some() {
            self.inner.cache.record_touch(page);
        }
        ptr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_pages_group_over_zero_gaps_only() {
        let zero = |p: usize| p == 3 || p == 4;
        assert_eq!(
            group_claimed(&[1, 2, 5, 6, 8], zero, 256),
            vec![(1, 7), (8, 9)]
        );
        assert_eq!(group_claimed(&[1, 2, 5], zero, 3), vec![(1, 3), (5, 6)]);
        assert_eq!(group_claimed(&[], zero, 3), vec![]);
    }
}
