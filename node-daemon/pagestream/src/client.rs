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

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmstream_vmm::image::Bitmap;
use vmstream_vmm::memory::{PAGE_SIZE, PageSource, PageSourceError};

use crate::auth::{ClusterToken, nonce};
use crate::cache::{CacheOpenError, FetchPath, NodeImageCache, PageState};
use crate::framing::{ReadFrameError, read_frame, read_header, write_frame};
use crate::wire::{
    Accept, Challenge, Command, FrameError, HANDSHAKE_VERSION, Header, Hello, MAX_BATCH_PAGES,
    MAX_INDEX_PAGES, MAX_VERSION, MIN_VERSION, Reason, Role, decode_index, valid_image_id,
};

/// Where and how to fetch an image's pages.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The image id the holders serve it under.
    pub image_id: String,
    /// Nodes that hold the image (home first), tried in turn on failure.
    pub holders: Vec<SocketAddr>,
    /// The cluster secret.
    pub token: ClusterToken,
    /// Time to establish one TCP connection.
    pub connect_timeout: Duration,
    /// Time a peer may take to answer a request before it is taken for dead.
    pub request_timeout: Duration,
    /// Total time a fault keeps retrying before `read_pages` fails.
    pub retry_budget: Duration,
    /// First and longest wait between retries.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Bulk requests in flight at once, per bulk connection.
    pub bulk_window: usize,
    /// Bulk connections (each with its own thread) a prefetch opens. They
    /// share the work through the cache's claims; two let the receiving,
    /// checking and writing of one batch overlap another's on both ends.
    pub bulk_connections: usize,
}

impl RemoteConfig {
    /// A configuration with default timeouts.
    pub fn new(image_id: &str, holders: Vec<SocketAddr>, token: ClusterToken) -> Self {
        Self {
            image_id: image_id.to_owned(),
            holders,
            token,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(120),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
            bulk_window: 8,
            bulk_connections: 2,
        }
    }
}

/// Why a connection to a holder could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("handshake with {addr} failed")]
    Read {
        addr: SocketAddr,
        #[source]
        source: ReadFrameError,
    },
    #[error("cannot send the handshake to {addr}")]
    Write {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{addr} refused the handshake: {} ({:?})", reason.text, reason.code)]
    Rejected { addr: SocketAddr, reason: Reason },
    #[error("{addr} sent a bad {command:?} during the handshake")]
    BadFrame {
        addr: SocketAddr,
        command: Command,
        #[source]
        source: FrameError,
    },
    #[error("{addr} answered the handshake with {command:?}")]
    Unexpected { addr: SocketAddr, command: Command },
    #[error("{addr} chose protocol version {version}, outside {MIN_VERSION}..={MAX_VERSION}")]
    Version { addr: SocketAddr, version: u16 },
    #[error("{addr} could not prove it knows the cluster token")]
    ServerNotAuthenticated { addr: SocketAddr },
    #[error("{addr} serves image {image:?} with {found:?}, expected {expected:?}")]
    ImageMismatch {
        addr: SocketAddr,
        image: String,
        found: Accept,
        expected: Accept,
    },
    #[error("no holder is configured for the image")]
    NoHolders,
}

/// Why one request failed (the connection is dropped and the pages retried).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request to {addr} failed")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("answer from {addr} refused")]
    Frame {
        addr: SocketAddr,
        #[source]
        source: ReadFrameError,
    },
    #[error("{addr} refused the request: {} ({:?})", reason.text, reason.code)]
    Refused { addr: SocketAddr, reason: Reason },
    #[error("{addr} answered out of protocol: {what}")]
    Protocol { addr: SocketAddr, what: String },
}

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
struct Counters {
    connects: AtomicU64,
    fault_requests: AtomicU64,
    fault_failures: AtomicU64,
    bulk_requests: AtomicU64,
    bulk_failures: AtomicU64,
}

/// An authenticated connection, right after the handshake.
pub(crate) struct Handshaken {
    pub stream: TcpStream,
    /// The protocol version the server chose.
    pub version: u16,
    /// The server's Accept (page counts of the image).
    pub accept: Accept,
    /// A frame buffer to keep using on this connection.
    pub buf: Vec<u8>,
}

/// Connects to `addr` and completes the mutual handshake for
/// `config.image_id` in `role` (shared by the cached [`RemotePages`] and the
/// cache-less `direct` client).
pub(crate) fn handshake(
    addr: SocketAddr,
    role: Role,
    config: &RemoteConfig,
) -> Result<Handshaken, ConnectError> {
    let mut stream = TcpStream::connect_timeout(&addr, config.connect_timeout)
        .map_err(|source| ConnectError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(config.request_timeout));
    let _ = stream.set_write_timeout(Some(config.request_timeout));
    let client_nonce = nonce();
    let hello = Hello {
        min_version: MIN_VERSION,
        max_version: MAX_VERSION,
        role,
        client_nonce,
        image_id: config.image_id.clone(),
    };
    let write_err = |source| ConnectError::Write { addr, source };
    write_frame(
        &mut stream,
        &Header::new(Command::Hello).with_version(HANDSHAKE_VERSION),
        &[&hello.encode()],
    )
    .map_err(write_err)?;
    let mut buf = Vec::new();
    let read_err = |source| ConnectError::Read { addr, source };
    let bad = |command, source| ConnectError::BadFrame {
        addr,
        command,
        source,
    };
    let h = read_frame(&mut stream, &mut buf).map_err(read_err)?;
    let challenge = match h.command {
        Command::Challenge => Challenge::decode(&buf).map_err(|e| bad(Command::Challenge, e))?,
        Command::Reject => {
            let reason =
                Reason::decode(Command::Reject, &buf).map_err(|e| bad(Command::Reject, e))?;
            return Err(ConnectError::Rejected { addr, reason });
        }
        command => return Err(ConnectError::Unexpected { addr, command }),
    };
    if !(MIN_VERSION..=MAX_VERSION).contains(&challenge.version) {
        return Err(ConnectError::Version {
            addr,
            version: challenge.version,
        });
    }
    if !config
        .token
        .verify_server_proof(&client_nonce, &config.image_id, &challenge.server_proof)
    {
        return Err(ConnectError::ServerNotAuthenticated { addr });
    }
    let tag = config
        .token
        .client_tag(&challenge.server_nonce, &config.image_id);
    write_frame(
        &mut stream,
        &Header::new(Command::Auth).with_version(challenge.version),
        &[&tag],
    )
    .map_err(write_err)?;
    let h = read_frame(&mut stream, &mut buf).map_err(read_err)?;
    let accept = match h.command {
        Command::Accept => Accept::decode(&buf).map_err(|e| bad(Command::Accept, e))?,
        Command::Reject => {
            let reason =
                Reason::decode(Command::Reject, &buf).map_err(|e| bad(Command::Reject, e))?;
            return Err(ConnectError::Rejected { addr, reason });
        }
        command => return Err(ConnectError::Unexpected { addr, command }),
    };
    Ok(Handshaken {
        stream,
        version: challenge.version,
        accept,
        buf,
    })
}

/// One authenticated connection to a holder.
struct PeerConnection {
    stream: TcpStream,
    addr: SocketAddr,
    version: u16,
    accept: Accept,
    next_id: u64,
    buf: Vec<u8>,
}

impl PeerConnection {
    fn open(addr: SocketAddr, role: Role, config: &RemoteConfig) -> Result<Self, ConnectError> {
        let Handshaken {
            stream,
            version,
            accept,
            buf,
        } = handshake(addr, role, config)?;
        Ok(Self {
            stream,
            addr,
            version,
            accept,
            next_id: 1,
            buf,
        })
    }

    fn send(&mut self, command: Command, first: usize, end: usize) -> Result<u64, RequestError> {
        let id = self.next_id;
        self.next_id += 1;
        let h = Header::new(command)
            .with_version(self.version)
            .with_request(id)
            .with_range(first as u64, (end - first) as u32);
        write_frame(&mut self.stream, &h, &[]).map_err(|source| RequestError::Io {
            addr: self.addr,
            source,
        })?;
        Ok(id)
    }

    /// Reads the header of the answer to request `id` for `first..end` of
    /// kind `expected`; an Error answer becomes [`RequestError::Refused`].
    fn answer_header(
        &mut self,
        expected: Command,
        id: u64,
        first: usize,
        end: usize,
    ) -> Result<(Header, [u8; crate::wire::HEADER_LEN]), RequestError> {
        let addr = self.addr;
        let (h, raw) =
            read_header(&mut self.stream).map_err(|source| RequestError::Frame { addr, source })?;
        let protocol = |what: String| RequestError::Protocol { addr, what };
        if h.command == Command::Error {
            self.buf.resize(h.payload_len as usize, 0);
            io::Read::read_exact(&mut self.stream, &mut self.buf)
                .map_err(|source| RequestError::Io { addr, source })?;
            h.check_crc(&raw, &self.buf)
                .map_err(|e| RequestError::Frame {
                    addr,
                    source: e.into(),
                })?;
            let reason =
                Reason::decode(Command::Error, &self.buf).map_err(|e| RequestError::Frame {
                    addr,
                    source: e.into(),
                })?;
            return Err(RequestError::Refused { addr, reason });
        }
        if h.command != expected {
            return Err(protocol(format!(
                "{:?} where {expected:?} was due",
                h.command
            )));
        }
        if h.request_id != id || h.range() != (first as u64..end as u64) {
            return Err(protocol(format!(
                "answer to request {} for pages {:?}, expected request {id} for {first}..{end}",
                h.request_id,
                h.range()
            )));
        }
        Ok((h, raw))
    }

    /// Receives the Pages answer to request `id`, verifies it and writes
    /// it into the cache file; the caller holds the claims on its non-zero
    /// pages. Nothing is marked present here.
    fn receive_pages(
        &mut self,
        cache: &NodeImageCache,
        id: u64,
        first: usize,
        end: usize,
    ) -> Result<(), RequestError> {
        let addr = self.addr;
        let (h, raw) = self.answer_header(Command::Pages, id, first, end)?;
        let expected = (first..end).filter(|&p| cache.nonzero().get(p)).count() * PAGE_SIZE;
        if h.payload_len as usize != expected {
            return Err(RequestError::Protocol {
                addr,
                what: format!(
                    "{} bytes of pages for {first}..{end}, the image's index says {expected}",
                    h.payload_len
                ),
            });
        }
        self.buf.resize(expected, 0);
        io::Read::read_exact(&mut self.stream, &mut self.buf)
            .map_err(|source| RequestError::Io { addr, source })?;
        h.check_crc(&raw, &self.buf)
            .map_err(|e| RequestError::Frame {
                addr,
                source: e.into(),
            })?;
        // Verified: now (and only now) into the cache file.
        cache
            .write_claimed(first, end, &self.buf)
            .map_err(|source| RequestError::Io { addr, source })
    }

    /// Reads the image's non-zero bitmap, in chunks.
    fn read_index(&mut self) -> Result<Vec<u64>, RequestError> {
        let pages = self.accept.pages as usize;
        let mut words = Vec::with_capacity(pages.div_ceil(64));
        let mut first = 0;
        while first < pages {
            let end = (first + MAX_INDEX_PAGES as usize).min(pages);
            let id = self.send(Command::IndexRequest, first, end)?;
            let (h, raw) = self.answer_header(Command::Index, id, first, end)?;
            self.buf.resize(h.payload_len as usize, 0);
            let addr = self.addr;
            io::Read::read_exact(&mut self.stream, &mut self.buf)
                .map_err(|source| RequestError::Io { addr, source })?;
            h.check_crc(&raw, &self.buf)
                .map_err(|e| RequestError::Frame {
                    addr,
                    source: e.into(),
                })?;
            words.extend(decode_index(&self.buf));
            first = end;
        }
        let count: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        if count != self.accept.nonzero_pages || Bitmap::from_words(pages, &words).is_none() {
            return Err(RequestError::Protocol {
                addr: self.addr,
                what: format!(
                    "index has {count} non-zero pages, the Accept said {}",
                    self.accept.nonzero_pages
                ),
            });
        }
        Ok(words)
    }
}

/// Connects to the first holder that accepts, starting at `*cursor` and
/// advancing it past holders that fail. Checks the holder serves the same
/// image (page counts).
fn connect_any(
    config: &RemoteConfig,
    role: Role,
    cursor: &mut usize,
    expected: Option<Accept>,
) -> Result<PeerConnection, ConnectError> {
    let n = config.holders.len();
    if n == 0 {
        return Err(ConnectError::NoHolders);
    }
    let mut last = None;
    for _ in 0..n {
        let addr = config.holders[*cursor % n];
        let result = PeerConnection::open(addr, role, config).and_then(|c| match expected {
            Some(e) if c.accept != e => Err(ConnectError::ImageMismatch {
                addr,
                image: config.image_id.clone(),
                found: c.accept,
                expected: e,
            }),
            _ => Ok(c),
        });
        match result {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(holder = %addr, role = ?role, error = %crate::error_chain(&e), "page holder unavailable");
                *cursor = (*cursor + 1) % n;
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one holder was tried"))
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

/// Plans the next bulk run from `start`: the first page that `claim` turns
/// into ours (`Missing`), extended over further claimable and zero pages up
/// to `max` pages and `limit`, ending on a claimed page. Returns the run and
/// the position to continue from.
pub fn plan_run(
    start: usize,
    limit: usize,
    max: usize,
    mut claim: impl FnMut(usize) -> PageState,
) -> Option<((usize, usize), usize)> {
    let mut p = start;
    let first = loop {
        if p >= limit {
            return None;
        }
        if claim(p) == PageState::Missing {
            break p;
        }
        p += 1;
    };
    let mut end = first + 1;
    let mut q = first + 1;
    while q < limit && q - first < max {
        match claim(q) {
            PageState::Missing => end = q + 1,
            PageState::Zero => {}
            PageState::Present | PageState::Busy => break,
        }
        q += 1;
    }
    Some(((first, end), q.max(end)))
}

struct FaultLane {
    conn: Option<PeerConnection>,
    cursor: usize,
}

struct Inner {
    config: RemoteConfig,
    cache: Arc<NodeImageCache>,
    accept: Accept,
    fault: Mutex<FaultLane>,
    counters: Counters,
    stop: AtomicBool,
    /// Ranges the bulk prefetcher planned, in order (diagnostics); its lock
    /// also serializes the planning of the bulk connections.
    bulk_log: Mutex<Vec<(usize, usize)>>,
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
        let pages = conn.accept.pages as usize;
        let cache = NodeImageCache::open(cache_dir, &config.image_id, pages, &words)?;
        conn.buf = Vec::new();
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

    /// One bulk connection's prefetch (`lane` numbers the connections of
    /// one prefetch); runs until every page is present, the prefetch is
    /// stopped, or the retry budget is spent.
    fn bulk_loop(&self, working_set: &[u64], lane: usize) {
        let cache = &self.cache;
        let pages = cache.pages();
        let max = MAX_BATCH_PAGES as usize;
        let mut conn: Option<PeerConnection> = None;
        let mut cursor = 0;
        tracing::debug!(image = %self.config.image_id, lane, "bulk connection starts");
        let mut inflight: VecDeque<(u64, usize, usize)> = VecDeque::new();
        let mut ws_pos = 0;
        let mut seq_pos = 0;
        let mut backoff = self.config.backoff_initial;
        let mut failing_since: Option<Instant> = None;
        let release_all = |inflight: &mut VecDeque<(u64, usize, usize)>| {
            for (_, a, b) in inflight.drain(..) {
                cache.release(a, b);
            }
        };
        loop {
            if self.stop.load(Ordering::Acquire) {
                release_all(&mut inflight);
                return;
            }
            if conn.is_none() {
                match connect_any(&self.config, Role::Bulk, &mut cursor, Some(self.accept)) {
                    Ok(c) => {
                        self.counters.connects.fetch_add(1, Ordering::Relaxed);
                        conn = Some(c);
                    }
                    Err(e) => {
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > self.config.retry_budget {
                            tracing::error!(error = %crate::error_chain(&e), "bulk prefetch gives up: no holder reachable");
                            return;
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(self.config.backoff_max);
                        continue;
                    }
                }
            }
            let c = conn.as_mut().expect("connected above");
            let mut send_failed = false;
            while inflight.len() < self.config.bulk_window.max(1) {
                // Planned and logged under the log's lock: with several bulk
                // connections, none plans a page outside the working set
                // before every working-set page is planned and logged.
                let run = {
                    let mut log = self.bulk_log.lock().unwrap_or_else(|e| e.into_inner());
                    let run = if ws_pos < working_set.len() {
                        next_working_set_run(cache, working_set, &mut ws_pos, max)
                    } else {
                        plan_run(seq_pos, pages, max, |p| cache.claim(p)).map(|(run, next)| {
                            seq_pos = next;
                            run
                        })
                    };
                    log.extend(run);
                    run
                };
                let Some((a, b)) = run else {
                    if ws_pos < working_set.len() {
                        continue;
                    }
                    break;
                };
                match c.send(Command::ReadPages, a, b) {
                    Ok(id) => inflight.push_back((id, a, b)),
                    Err(_) => {
                        cache.release(a, b);
                        send_failed = true;
                        break;
                    }
                }
            }
            let Some(&(id, a, b)) = inflight.front() else {
                if send_failed {
                    conn = None;
                    continue;
                }
                if cache.is_complete() {
                    return;
                }
                // Pages released by failed fetches elsewhere, or still being
                // fetched by faults: sweep again after a short wait.
                let seen = cache.generation();
                if (0..pages).any(|p| cache.state(p) == PageState::Busy) {
                    cache.wait_change(seen, Duration::from_millis(50));
                }
                seq_pos = 0;
                continue;
            };
            self.counters.bulk_requests.fetch_add(1, Ordering::Relaxed);
            let result = if send_failed {
                Err(RequestError::Protocol {
                    addr: c.addr,
                    what: "send failed".into(),
                })
            } else {
                c.receive_pages(cache, id, a, b)
            };
            match result {
                Ok(()) => {
                    inflight.pop_front();
                    cache.complete(a, b, FetchPath::Bulk);
                    failing_since = None;
                    backoff = self.config.backoff_initial;
                }
                Err(e) => {
                    self.counters.bulk_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(image = %self.config.image_id, error = %crate::error_chain(&e), "bulk transfer failed; reconnecting");
                    release_all(&mut inflight);
                    conn = None;
                    cursor = (cursor + 1) % self.config.holders.len().max(1);
                    // Restart the sweep so released pages are picked up.
                    seq_pos = 0;
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.config.retry_budget {
                        tracing::error!(image = %self.config.image_id, "bulk prefetch gives up: transfers keep failing");
                        return;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.config.backoff_max);
                }
            }
        }
    }
}

/// The next run of the working set (consecutive listed pages that are
/// consecutive in memory and claimable), advancing `pos`.
fn next_working_set_run(
    cache: &NodeImageCache,
    ws: &[u64],
    pos: &mut usize,
    max: usize,
) -> Option<(usize, usize)> {
    while *pos < ws.len() {
        let p = ws[*pos] as usize;
        *pos += 1;
        if p >= cache.pages() || cache.claim(p) != PageState::Missing {
            continue;
        }
        let mut end = p + 1;
        while *pos < ws.len()
            && ws[*pos] as usize == end
            && end - p < max
            && end < cache.pages()
            && cache.claim(end) == PageState::Missing
        {
            end += 1;
            *pos += 1;
        }
        return Some((p, end));
    }
    None
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

    #[test]
    fn bulk_runs_start_on_a_claim_cross_zeros_and_stop_at_others_pages() {
        use PageState::*;
        let states = [Present, Missing, Zero, Missing, Busy, Missing, Zero, Zero];
        let claim = |p: usize| states[p];
        assert_eq!(plan_run(0, 8, 256, claim), Some(((1, 4), 4)));
        // Trailing zeros are not part of the run, but are skipped.
        assert_eq!(plan_run(5, 8, 256, claim), Some(((5, 6), 8)));
        assert_eq!(plan_run(6, 8, 256, claim), None);
        // The length limit holds.
        let all = |_| Missing;
        assert_eq!(plan_run(0, 1000, 256, all), Some(((0, 256), 256)));
    }
}
