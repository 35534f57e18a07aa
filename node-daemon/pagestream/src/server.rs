//! The page server: serves the pages of one or more images (by image id) to
//! authenticated peers, from the image's local page store (its home node) or
//! from a node image cache (any node that holds the pages). One thread per
//! connection with blocking sockets and `TCP_NODELAY`: a fault connection's
//! request is answered the moment it arrives, never behind another
//! connection's bulk transfer.
//!
//! Per connection:
//!
//! ```text
//!  AwaitHello ──Hello──► send Challenge ──► AwaitAuth ──Auth ok, image known──► send Accept ──► Serving
//!      │ anything else / bad frame              │ bad tag / unknown image / anything else
//!      └──────────────► send Reject{reason}, log, close ◄────┘
//!  Serving: IndexRequest ─► Index | ReadPages ─► Pages | bad range ─► Error (stays open)
//!           malformed or unexpected frame ─► Error{reason}, log, close
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vmstream_vmm::image::{Bitmap, PageStore};
use vmstream_vmm::memory::PAGE_SIZE;

use crate::auth::{ClusterToken, nonce};
use crate::cache::{NodeImageCache, nonzero_runs};
use crate::framing::{ReadFrameError, read_frame, write_frame};
use crate::wire::{
    Accept, Challenge, Command, FrameError, HANDSHAKE_VERSION, Header, Hello, MAX_STATE_LEN,
    MAX_VERSION, MIN_VERSION, Reason, ReasonCode, Role, decode_auth, encode_index,
};

/// Pages a server can serve for one image.
pub trait ServedImage: Send + Sync {
    /// Number of pages of the image.
    fn pages(&self) -> usize;
    /// The image's non-zero pages (zero pages are never sent).
    fn nonzero(&self) -> &Bitmap;
    /// Whether every non-zero page of `first..end` is held here.
    fn holds(&self, first: usize, end: usize) -> bool;
    /// Reads pages `first..end` (all held) into `buf` (`pread`: no page
    /// faults on the serving side).
    fn read_run(&self, first: usize, end: usize, buf: &mut [u8]) -> io::Result<()>;
    /// The bytes of pages `first..end` (all held) in a read-only mapping
    /// whose held pages never change, if the image has one: answers are
    /// then sent straight from it instead of through [`Self::read_run`].
    fn mapped_run(&self, _first: usize, _end: usize) -> Option<&[u8]> {
        None
    }
    /// The image's state file (`state.bin`), if this server has it.
    fn state_file(&self) -> Option<io::Result<Vec<u8>>> {
        None
    }
}

/// A complete local image directory (page store and state file), served
/// by its home node.
#[derive(Debug)]
pub struct ImageDir {
    store: PageStore,
    dir: std::path::PathBuf,
}

impl ImageDir {
    /// Opens the page store of the image in `dir`.
    pub fn open(dir: &std::path::Path) -> Result<Self, vmstream_vmm::image::ImageOpenError> {
        Ok(Self {
            store: PageStore::open(dir)?,
            dir: dir.to_path_buf(),
        })
    }
}

impl ServedImage for ImageDir {
    fn pages(&self) -> usize {
        self.store.pages()
    }
    fn nonzero(&self) -> &Bitmap {
        self.store.present()
    }
    fn holds(&self, _first: usize, _end: usize) -> bool {
        true
    }
    fn read_run(&self, first: usize, end: usize, buf: &mut [u8]) -> io::Result<()> {
        self.store.read_pages(first, end - first, buf)
    }
    fn mapped_run(&self, first: usize, end: usize) -> Option<&[u8]> {
        store_run(&self.store, first, end)
    }
    fn state_file(&self) -> Option<io::Result<Vec<u8>>> {
        Some(std::fs::read(
            self.dir.join(vmstream_vmm::image::STATE_FILE),
        ))
    }
}

impl ServedImage for PageStore {
    fn pages(&self) -> usize {
        PageStore::pages(self)
    }
    fn nonzero(&self) -> &Bitmap {
        self.present()
    }
    fn holds(&self, _first: usize, _end: usize) -> bool {
        true
    }
    fn read_run(&self, first: usize, end: usize, buf: &mut [u8]) -> io::Result<()> {
        self.read_pages(first, end - first, buf)
    }
    fn mapped_run(&self, first: usize, end: usize) -> Option<&[u8]> {
        store_run(self, first, end)
    }
}

impl ServedImage for NodeImageCache {
    fn pages(&self) -> usize {
        NodeImageCache::pages(self)
    }
    fn nonzero(&self) -> &Bitmap {
        NodeImageCache::nonzero(self)
    }
    fn holds(&self, first: usize, end: usize) -> bool {
        (first..end).all(|p| !self.nonzero().get(p) || self.present().get(p))
    }
    fn read_run(&self, first: usize, end: usize, buf: &mut [u8]) -> io::Result<()> {
        self.read_raw(first, end, buf)
    }
    fn mapped_run(&self, first: usize, end: usize) -> Option<&[u8]> {
        (first <= end && end <= NodeImageCache::pages(self)).then(|| {
            let bytes = self.bytes(first, end);
            populate_read(bytes);
            bytes
        })
    }
    fn state_file(&self) -> Option<io::Result<Vec<u8>>> {
        let path = self.dir().join(vmstream_vmm::image::STATE_FILE);
        path.is_file().then(|| std::fs::read(path))
    }
}

/// Pages `first..end` of a page store's read-only mapping (the store's
/// files are immutable once written), mapped in ahead of use.
fn store_run(store: &PageStore, first: usize, end: usize) -> Option<&[u8]> {
    let mapping = store.as_mapping();
    let (a, b) = (first.checked_mul(PAGE_SIZE)?, end.checked_mul(PAGE_SIZE)?);
    if a > b || b > mapping.len() {
        return None;
    }
    // SAFETY: `a..b` lies inside the mapping, which lives as long as
    // `store`; the store's data file is never modified in place.
    let bytes = unsafe { std::slice::from_raw_parts(mapping.as_ptr().add(a), b - a) };
    populate_read(bytes);
    Some(bytes)
}

/// Maps `bytes` (part of a file mapping) in with one call rather than a
/// page fault per few pages when the CRC first reads them. Best effort: an
/// error only means the pages fault in one by one.
fn populate_read(bytes: &[u8]) {
    let start = bytes.as_ptr() as usize;
    let aligned = start & !(PAGE_SIZE - 1);
    // SAFETY: advice on pages of a live read-only mapping (rounded down to
    // its page boundary, which is inside the same mapping); no memory is
    // changed.
    unsafe {
        libc::madvise(
            aligned as *mut libc::c_void,
            bytes.len() + (start - aligned),
            libc::MADV_POPULATE_READ,
        )
    };
}

/// How a server behaves.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Connections served at once; more are refused with `Busy`.
    pub max_connections: usize,
    /// Time a peer has to complete the handshake.
    pub handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_connections: 256,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters of a server.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    pub connections_accepted: u64,
    pub handshakes_completed: u64,
    /// Refused frames and handshakes, by kind (`bad_magic`, `auth_failed`, ...).
    pub refusals: BTreeMap<String, u64>,
    /// ReadPages requests answered with pages.
    pub page_requests: u64,
    pub fault_page_requests: u64,
    pub bulk_page_requests: u64,
    /// Non-zero pages sent.
    pub pages_sent: u64,
    pub index_requests: u64,
    /// State files sent.
    pub state_requests: u64,
}

impl ServerStats {
    /// Total refusals of all kinds.
    pub fn refused(&self) -> u64 {
        self.refusals.values().sum()
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    handshakes: AtomicU64,
    refusals: Mutex<BTreeMap<String, u64>>,
    fault_requests: AtomicU64,
    bulk_requests: AtomicU64,
    pages_sent: AtomicU64,
    index_requests: AtomicU64,
    state_requests: AtomicU64,
}

struct ServerShared {
    token: ClusterToken,
    options: ServerOptions,
    images: RwLock<HashMap<String, Arc<dyn ServedImage>>>,
    stop: AtomicBool,
    live: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
    counters: Counters,
}

/// A running page server (see the module documentation).
pub struct PageServer {
    shared: Arc<ServerShared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Why a frame or handshake was refused: the code sent to the peer, a
/// short kind for the counters and logs, and the text.
#[derive(Debug)]
struct Refusal {
    code: ReasonCode,
    kind: &'static str,
    text: String,
}

impl Refusal {
    fn new(code: ReasonCode, kind: &'static str, text: impl Into<String>) -> Self {
        Self {
            code,
            kind,
            text: text.into(),
        }
    }

    fn from_frame(e: &FrameError) -> Self {
        let kind = match e {
            FrameError::Truncated { .. } => "truncated",
            FrameError::BadMagic { .. } => "bad_magic",
            FrameError::UnsupportedVersion { .. } => "unsupported_version",
            FrameError::UnknownCommand { .. } => "unknown_command",
            FrameError::Oversized { .. } => "oversized",
            FrameError::CrcMismatch { .. } => "crc_mismatch",
            FrameError::Malformed { .. } | FrameError::PayloadLength { .. } => "malformed",
        };
        Self::new(ReasonCode::Malformed, kind, e.to_string())
    }
}

/// The peer's end of a failed read: a refusal to report, or nothing to say
/// (closed, I/O error).
enum ReadOutcome {
    Refuse(Refusal),
    Gone,
}

fn classify(e: ReadFrameError) -> ReadOutcome {
    match e {
        ReadFrameError::Frame(f) => ReadOutcome::Refuse(Refusal::from_frame(&f)),
        ReadFrameError::Closed | ReadFrameError::Io(_) => ReadOutcome::Gone,
    }
}

struct Session {
    image: Arc<dyn ServedImage>,
    image_id: String,
    role: Role,
    version: u16,
}

impl PageServer {
    /// Binds `addr` and starts serving (no images yet: add them with
    /// [`PageServer::add_image`]).
    pub fn bind(
        addr: impl ToSocketAddrs,
        token: ClusterToken,
        options: ServerOptions,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(ServerShared {
            token,
            options,
            images: RwLock::new(HashMap::new()),
            stop: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            counters: Counters::default(),
        });
        let acceptor_shared = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name("pagestream-accept".into())
            .spawn(move || accept_loop(&acceptor_shared, &listener))?;
        Ok(Self {
            shared,
            addr,
            acceptor: Some(acceptor),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `image` under `image_id` (replacing any previous one).
    pub fn add_image(&self, image_id: &str, image: Arc<dyn ServedImage>) {
        self.shared
            .images
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(image_id.to_owned(), image);
    }

    /// Stops serving `image_id` (connections already open keep it).
    pub fn remove_image(&self, image_id: &str) {
        self.shared
            .images
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(image_id);
    }

    /// The counters.
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        let fault = c.fault_requests.load(Ordering::Relaxed);
        let bulk = c.bulk_requests.load(Ordering::Relaxed);
        ServerStats {
            connections_accepted: c.accepted.load(Ordering::Relaxed),
            handshakes_completed: c.handshakes.load(Ordering::Relaxed),
            refusals: c.refusals.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            page_requests: fault + bulk,
            fault_page_requests: fault,
            bulk_page_requests: bulk,
            pages_sent: c.pages_sent.load(Ordering::Relaxed),
            index_requests: c.index_requests.load(Ordering::Relaxed),
            state_requests: c.state_requests.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, closes every connection and waits for the acceptor.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        for s in self
            .shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: &Arc<ServerShared>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a page-stream connection failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let busy = {
            let mut live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
            let busy = live.len() >= shared.options.max_connections;
            if !busy && let Ok(clone) = stream.try_clone() {
                live.insert(id, clone);
            }
            busy
        };
        let conn_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("pagestream-conn".into())
            .spawn(move || {
                if busy {
                    let peer = stream.peer_addr().ok();
                    refuse(
                        &conn_shared,
                        &stream,
                        peer,
                        Refusal::new(ReasonCode::Busy, "busy", "too many connections"),
                        Command::Reject,
                    );
                } else {
                    serve_connection(&conn_shared, stream);
                    conn_shared
                        .live
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a page-stream connection thread");
            shared
                .live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

/// Counts and logs a refusal and tells the peer (best effort).
fn refuse(
    shared: &ServerShared,
    mut stream: &TcpStream,
    peer: Option<SocketAddr>,
    refusal: Refusal,
    command: Command,
) {
    tracing::warn!(
        peer = ?peer,
        kind = refusal.kind,
        reason = %refusal.text,
        "refused a page-stream peer"
    );
    *shared
        .counters
        .refusals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(refusal.kind.to_owned())
        .or_default() += 1;
    let payload = Reason::new(refusal.code, refusal.text).encode();
    let header = Header::new(command).with_version(HANDSHAKE_VERSION);
    let _ = write_frame(&mut stream, &header, &[&payload]);
}

fn serve_connection(shared: &ServerShared, stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(shared.options.handshake_timeout));
    let session = match handshake(shared, &stream) {
        Ok(s) => s,
        Err(ReadOutcome::Refuse(r)) => {
            refuse(shared, &stream, peer, r, Command::Reject);
            return;
        }
        Err(ReadOutcome::Gone) => return,
    };
    shared.counters.handshakes.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(peer = ?peer, image = %session.image_id, role = ?session.role, "page-stream peer accepted");
    let _ = stream.set_read_timeout(None);
    if let Err(ReadOutcome::Refuse(r)) = serve_requests(shared, &stream, &session) {
        refuse(shared, &stream, peer, r, Command::Error);
    }
}

fn handshake(shared: &ServerShared, mut stream: &TcpStream) -> Result<Session, ReadOutcome> {
    let mut buf = Vec::new();
    let header = read_frame(&mut stream, &mut buf).map_err(classify)?;
    if header.command != Command::Hello {
        return Err(ReadOutcome::Refuse(Refusal::new(
            ReasonCode::NotAuthenticated,
            "not_authenticated",
            format!(
                "{:?} frame before the handshake (expected Hello)",
                header.command
            ),
        )));
    }
    let hello = Hello::decode(&buf).map_err(|e| ReadOutcome::Refuse(Refusal::from_frame(&e)))?;
    let version = hello.max_version.min(MAX_VERSION);
    if version < hello.min_version.max(MIN_VERSION) {
        return Err(ReadOutcome::Refuse(Refusal::new(
            ReasonCode::VersionMismatch,
            "version_mismatch",
            format!(
                "no common protocol version: peer speaks {}..={}, this server {MIN_VERSION}..={MAX_VERSION}",
                hello.min_version, hello.max_version
            ),
        )));
    }
    let server_nonce = nonce();
    let challenge = Challenge {
        version,
        server_nonce,
        server_proof: shared
            .token
            .server_proof(&hello.client_nonce, &hello.image_id),
    };
    write_frame(
        &mut stream,
        &Header::new(Command::Challenge).with_version(HANDSHAKE_VERSION),
        &[&challenge.encode()],
    )
    .map_err(|_| ReadOutcome::Gone)?;

    let header = read_frame(&mut stream, &mut buf).map_err(classify)?;
    if header.command != Command::Auth {
        return Err(ReadOutcome::Refuse(Refusal::new(
            ReasonCode::NotAuthenticated,
            "not_authenticated",
            format!(
                "{:?} frame before authentication (expected Auth)",
                header.command
            ),
        )));
    }
    let tag = decode_auth(&buf).map_err(|e| ReadOutcome::Refuse(Refusal::from_frame(&e)))?;
    if !shared
        .token
        .verify_client_tag(&server_nonce, &hello.image_id, &tag)
    {
        return Err(ReadOutcome::Refuse(Refusal::new(
            ReasonCode::AuthFailed,
            "auth_failed",
            "authentication failed: the HMAC does not match the cluster token",
        )));
    }
    let image = shared
        .images
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&hello.image_id)
        .cloned()
        .ok_or_else(|| {
            ReadOutcome::Refuse(Refusal::new(
                ReasonCode::UnknownImage,
                "unknown_image",
                format!("this node does not serve image {:?}", hello.image_id),
            ))
        })?;
    let accept = Accept {
        pages: image.pages() as u64,
        nonzero_pages: image.nonzero().count_ones() as u64,
    };
    write_frame(
        &mut stream,
        &Header::new(Command::Accept).with_version(version),
        &[&accept.encode()],
    )
    .map_err(|_| ReadOutcome::Gone)?;
    Ok(Session {
        image,
        image_id: hello.image_id,
        role: hello.role,
        version,
    })
}

fn serve_requests(
    shared: &ServerShared,
    mut stream: &TcpStream,
    session: &Session,
) -> Result<(), ReadOutcome> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let header = read_frame(&mut stream, &mut buf).map_err(classify)?;
        let answer = match header.command {
            Command::ReadPages => answer_pages(shared, stream, session, &header, &mut out),
            Command::IndexRequest => answer_index(shared, stream, session, &header),
            Command::StateRequest => answer_state(shared, stream, session, &header),
            other => {
                return Err(ReadOutcome::Refuse(Refusal::new(
                    ReasonCode::Unexpected,
                    "unexpected",
                    format!("{other:?} frame is not a request"),
                )));
            }
        };
        match answer {
            Ok(()) => {}
            Err(AnswerError::Io) => return Err(ReadOutcome::Gone),
            Err(AnswerError::Refused(r)) => {
                // A request that is well-formed but cannot be served: the
                // peer gets an Error for that request id and may go on.
                tracing::warn!(image = %session.image_id, kind = r.kind, reason = %r.text, "refused a page request");
                *shared
                    .counters
                    .refusals
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(r.kind.to_owned())
                    .or_default() += 1;
                let h = Header::new(Command::Error)
                    .with_version(session.version)
                    .with_request(header.request_id);
                write_frame(&mut stream, &h, &[&Reason::new(r.code, r.text).encode()])
                    .map_err(|_| ReadOutcome::Gone)?;
            }
        }
    }
}

enum AnswerError {
    Io,
    Refused(Refusal),
}

fn check_range(session: &Session, header: &Header) -> Result<(usize, usize), AnswerError> {
    let pages = session.image.pages() as u64;
    let range = header.range();
    if range.end > pages {
        return Err(AnswerError::Refused(Refusal::new(
            ReasonCode::OutOfRange,
            "out_of_range",
            format!(
                "pages {}..{} lie beyond image {:?} of {pages} pages",
                range.start, range.end, session.image_id
            ),
        )));
    }
    Ok((range.start as usize, range.end as usize))
}

fn answer_pages(
    shared: &ServerShared,
    mut stream: &TcpStream,
    session: &Session,
    header: &Header,
    out: &mut Vec<u8>,
) -> Result<(), AnswerError> {
    let (first, end) = check_range(session, header)?;
    let image = &session.image;
    if !image.holds(first, end) {
        return Err(AnswerError::Refused(Refusal::new(
            ReasonCode::NotHeld,
            "not_held",
            format!("this node does not hold all of pages {first}..{end}"),
        )));
    }
    let runs = nonzero_runs(image.nonzero(), first, end);
    let sent: usize = runs.iter().map(|(a, b)| b - a).sum();
    // Straight from the image's mapping when it has one (no copy into a
    // buffer: the CRC reads the pages, `writev` copies them into the
    // socket), else `pread` into `out`.
    let mapped: Option<Vec<&[u8]>> = runs.iter().map(|&(a, b)| image.mapped_run(a, b)).collect();
    if mapped.is_none() {
        out.resize(sent * PAGE_SIZE, 0);
        let mut at = 0;
        for &(a, b) in &runs {
            let len = (b - a) * PAGE_SIZE;
            image.read_run(a, b, &mut out[at..at + len]).map_err(|e| {
                AnswerError::Refused(Refusal::new(
                    ReasonCode::ReadFailed,
                    "read_failed",
                    format!("reading pages {a}..{b} failed: {e}"),
                ))
            })?;
            at += len;
        }
    }
    let parts = mapped.unwrap_or_else(|| vec![&out[..]]);
    let h = Header::new(Command::Pages)
        .with_version(session.version)
        .with_request(header.request_id)
        .with_range(header.first_page, header.page_count);
    // Counted before sending, so a peer that has the answer sees it counted.
    let c = &shared.counters;
    match session.role {
        Role::Fault => c.fault_requests.fetch_add(1, Ordering::Relaxed),
        Role::Bulk => c.bulk_requests.fetch_add(1, Ordering::Relaxed),
    };
    c.pages_sent.fetch_add(sent as u64, Ordering::Relaxed);
    write_frame(&mut stream, &h, &parts).map_err(|_| AnswerError::Io)?;
    Ok(())
}

fn answer_index(
    shared: &ServerShared,
    mut stream: &TcpStream,
    session: &Session,
    header: &Header,
) -> Result<(), AnswerError> {
    let (first, end) = check_range(session, header)?;
    let words = index_words(session.image.nonzero(), first, end);
    let h = Header::new(Command::Index)
        .with_version(session.version)
        .with_request(header.request_id)
        .with_range(header.first_page, header.page_count);
    shared
        .counters
        .index_requests
        .fetch_add(1, Ordering::Relaxed);
    write_frame(&mut stream, &h, &[&encode_index(&words)]).map_err(|_| AnswerError::Io)?;
    Ok(())
}

fn answer_state(
    shared: &ServerShared,
    mut stream: &TcpStream,
    session: &Session,
    header: &Header,
) -> Result<(), AnswerError> {
    let refused = |code, kind, text: String| AnswerError::Refused(Refusal::new(code, kind, text));
    let bytes = match session.image.state_file() {
        None => {
            return Err(refused(
                ReasonCode::NotHeld,
                "not_held",
                format!(
                    "this node does not hold the state file of image {:?}",
                    session.image_id
                ),
            ));
        }
        Some(Err(e)) => {
            return Err(refused(
                ReasonCode::ReadFailed,
                "read_failed",
                format!(
                    "reading the state file of image {:?} failed: {e}",
                    session.image_id
                ),
            ));
        }
        Some(Ok(bytes)) => bytes,
    };
    if bytes.len() > MAX_STATE_LEN as usize {
        return Err(refused(
            ReasonCode::ReadFailed,
            "read_failed",
            format!(
                "the state file of image {:?} is {} bytes, over the limit {MAX_STATE_LEN}",
                session.image_id,
                bytes.len()
            ),
        ));
    }
    let h = Header::new(Command::State)
        .with_version(session.version)
        .with_request(header.request_id);
    shared
        .counters
        .state_requests
        .fetch_add(1, Ordering::Relaxed);
    write_frame(&mut stream, &h, &[&bytes]).map_err(|_| AnswerError::Io)?;
    Ok(())
}

/// Bitmap words for pages `first..end` (`first` a multiple of 64); bits past
/// `end` are zero.
fn index_words(bitmap: &Bitmap, first: usize, end: usize) -> Vec<u64> {
    let n = (end - first).div_ceil(64);
    (0..n)
        .map(|i| {
            let mut w = bitmap.word(first / 64 + i);
            let base = first + i * 64;
            if base + 64 > end {
                let keep = end - base;
                w &= (1u64 << keep) - 1;
            }
            w
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_words_mask_bits_past_the_range() {
        let b = Bitmap::new(200);
        for p in [0, 63, 64, 70, 130, 199] {
            b.set(p);
        }
        assert_eq!(index_words(&b, 0, 200).len(), 4);
        let w = index_words(&b, 64, 71);
        assert_eq!(w, vec![(1 << 0) | (1 << 6)]);
        let w = index_words(&b, 128, 131);
        assert_eq!(w, vec![1 << 2]);
    }
}
