//! Requests to a page server without a node cache: [`Connection`] (one
//! authenticated connection: index, pages, state file), [`fetch_state_file`]
//! (an image's `state.bin` from the first holder that has it) and
//! [`DirectPages`], a [`PageSource`] that asks a server for every page it
//! is asked for and keeps nothing. A VM process uses `DirectPages` pointed
//! at its own node daemon, whose page server reads through the node's one
//! cache of the image (see [`crate::relay`]): the guest's memory keeps the
//! pages, the node cache keeps them for the node, so nothing is stored
//! twice and no page crosses the network twice.
//!
//! Every answer is a frame whose CRC verified and whose command, request id,
//! range and length match the request; a failing server is dropped and the
//! request retried (next holder, backoff) until the retry budget is spent.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::Instant;

use vmstream_vmm::image::Bitmap;
use vmstream_vmm::memory::{PAGE_SIZE, PageSource, PageSourceError};

use crate::client::{ConnectError, Handshaken, RemoteConfig, handshake};
use crate::framing::{ReadFrameError, read_frame, write_frame};
use crate::wire::{
    Accept, Command, Header, MAX_BATCH_PAGES, MAX_INDEX_PAGES, Reason, Role, decode_index,
};

/// Why a direct request failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("handshake failed")]
    Handshake(#[from] ConnectError),
    #[error("cannot send to {addr}")]
    Write {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("bad or missing frame from {addr}")]
    Read {
        addr: SocketAddr,
        #[source]
        source: ReadFrameError,
    },
    #[error("{addr} refused: {} ({:?})", reason.text, reason.code)]
    Refused { addr: SocketAddr, reason: Reason },
    #[error("{addr} answered out of protocol: {what}")]
    Protocol { addr: SocketAddr, what: String },
    #[error("{addr} could not prove it knows the cluster token")]
    ServerNotAuthenticated { addr: SocketAddr },
    #[error("no holder is configured for the image")]
    NoHolders,
}

/// One authenticated connection to a page server for one image.
pub struct Connection {
    stream: TcpStream,
    addr: SocketAddr,
    version: u16,
    accept: Accept,
    next_id: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("accept", &self.accept)
            .finish()
    }
}

impl Connection {
    /// Connects to `addr` and completes the mutual handshake for
    /// `config.image_id`.
    pub fn open(addr: SocketAddr, role: Role, config: &RemoteConfig) -> Result<Self, DirectError> {
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

    /// The server's Accept (page counts of the image).
    pub fn accept(&self) -> Accept {
        self.accept
    }

    /// Sends one request and reads its answer (payload in `self.buf`),
    /// checking command, request id and range.
    fn request(
        &mut self,
        command: Command,
        answer: Command,
        first: usize,
        end: usize,
    ) -> Result<Header, DirectError> {
        let addr = self.addr;
        let id = self.next_id;
        self.next_id += 1;
        let h = Header::new(command)
            .with_version(self.version)
            .with_request(id)
            .with_range(first as u64, (end - first) as u32);
        write_frame(&mut self.stream, &h, &[])
            .map_err(|source| DirectError::Write { addr, source })?;
        let got = read_frame(&mut self.stream, &mut self.buf)
            .map_err(|source| DirectError::Read { addr, source })?;
        if got.command == Command::Error {
            let reason =
                Reason::decode(Command::Error, &self.buf).map_err(|e| DirectError::Read {
                    addr,
                    source: e.into(),
                })?;
            return Err(DirectError::Refused { addr, reason });
        }
        if got.command != answer
            || got.request_id != id
            || got.range() != (first as u64..end as u64)
        {
            return Err(DirectError::Protocol {
                addr,
                what: format!(
                    "{:?} for request {} pages {:?}, expected {answer:?} for request {id} pages {first}..{end}",
                    got.command,
                    got.request_id,
                    got.range()
                ),
            });
        }
        Ok(got)
    }

    /// The image's non-zero bitmap (checked against the Accept).
    pub fn read_index(&mut self) -> Result<Bitmap, DirectError> {
        let pages = self.accept.pages as usize;
        let mut words = Vec::with_capacity(pages.div_ceil(64));
        let mut first = 0;
        while first < pages {
            let end = (first + MAX_INDEX_PAGES as usize).min(pages);
            self.request(Command::IndexRequest, Command::Index, first, end)?;
            words.extend(decode_index(&self.buf));
            first = end;
        }
        Bitmap::from_words(pages, &words)
            .filter(|b| b.count_ones() as u64 == self.accept.nonzero_pages)
            .ok_or_else(|| DirectError::Protocol {
                addr: self.addr,
                what: format!(
                    "index does not match the Accept's {} non-zero pages",
                    self.accept.nonzero_pages
                ),
            })
    }

    /// Reads pages `first..end` (at most [`MAX_BATCH_PAGES`]) into `out`
    /// (`(end - first) * PAGE_SIZE` bytes; zero pages are zero-filled).
    pub fn read_pages(
        &mut self,
        nonzero: &Bitmap,
        first: usize,
        end: usize,
        out: &mut [u8],
    ) -> Result<(), DirectError> {
        let expected = (first..end).filter(|&p| nonzero.get(p)).count();
        if expected == 0 {
            out.fill(0);
            return Ok(());
        }
        self.request(Command::ReadPages, Command::Pages, first, end)?;
        if self.buf.len() != expected * PAGE_SIZE {
            return Err(DirectError::Protocol {
                addr: self.addr,
                what: format!(
                    "{} bytes of pages for {first}..{end}, the index says {} pages",
                    self.buf.len(),
                    expected
                ),
            });
        }
        let mut at = 0;
        for (i, chunk) in out.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if nonzero.get(first + i) {
                chunk.copy_from_slice(&self.buf[at..at + PAGE_SIZE]);
                at += PAGE_SIZE;
            } else {
                chunk.fill(0);
            }
        }
        Ok(())
    }

    /// The image's state file (`state.bin`), whole.
    pub fn state_file(&mut self) -> Result<Vec<u8>, DirectError> {
        self.request(Command::StateRequest, Command::State, 0, 0)?;
        Ok(std::mem::take(&mut self.buf))
    }
}

/// Connects to the first of `config.holders` (from `*cursor`) that
/// accepts, advancing the cursor past those that fail.
fn connect_any(
    config: &RemoteConfig,
    role: Role,
    cursor: &mut usize,
) -> Result<Connection, DirectError> {
    let n = config.holders.len();
    let mut last = DirectError::NoHolders;
    for _ in 0..n {
        let addr = config.holders[*cursor % n];
        match Connection::open(addr, role, config) {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(holder = %addr, error = %crate::error_chain(&e), "page holder unavailable");
                *cursor = (*cursor + 1) % n;
                last = e;
            }
        }
    }
    Err(last)
}

/// Fetches the image's state file from the first holder in
/// `config.holders` that has it (each tried once, in order). The bytes came
/// in a frame whose CRC verified; the state file's own header and CRC are
/// checked by whoever opens it (`StateFile::read`).
pub fn fetch_state_file(config: &RemoteConfig) -> Result<Vec<u8>, DirectError> {
    let mut last = DirectError::NoHolders;
    for &addr in &config.holders {
        match Connection::open(addr, Role::Fault, config).and_then(|mut c| c.state_file()) {
            Ok(bytes) => return Ok(bytes),
            Err(e) => {
                tracing::warn!(holder = %addr, error = %crate::error_chain(&e), "state file not fetched from this holder");
                last = e;
            }
        }
    }
    Err(last)
}

/// Why a [`DirectPages`] could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open image {image_id:?} on any holder")]
pub struct DirectOpenError {
    pub image_id: String,
    #[source]
    pub source: DirectError,
}

struct Lane {
    conn: Option<Connection>,
    cursor: usize,
}

/// A [`PageSource`] that asks a page server for every page and keeps
/// nothing (see the module documentation).
pub struct DirectPages {
    config: RemoteConfig,
    pages: usize,
    nonzero: Bitmap,
    lane: Mutex<Lane>,
}

impl std::fmt::Debug for DirectPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectPages")
            .field("image", &self.config.image_id)
            .field("holders", &self.config.holders)
            .field("pages", &self.pages)
            .finish()
    }
}

impl DirectPages {
    /// Connects (retrying within the budget) and reads the image's index.
    pub fn open(config: RemoteConfig) -> Result<Self, DirectOpenError> {
        let deadline = Instant::now() + config.retry_budget;
        let mut backoff = config.backoff_initial;
        let mut cursor = 0;
        loop {
            let attempt = connect_any(&config, Role::Fault, &mut cursor).and_then(|mut c| {
                let index = c.read_index()?;
                Ok((c, index))
            });
            match attempt {
                Ok((conn, nonzero)) => {
                    return Ok(Self {
                        pages: conn.accept.pages as usize,
                        nonzero,
                        lane: Mutex::new(Lane {
                            conn: Some(conn),
                            cursor,
                        }),
                        config,
                    });
                }
                Err(e) if Instant::now() + backoff < deadline => {
                    tracing::warn!(error = %crate::error_chain(&e), "opening the image failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(config.backoff_max);
                }
                Err(source) => {
                    return Err(DirectOpenError {
                        image_id: config.image_id.clone(),
                        source,
                    });
                }
            }
        }
    }

    fn try_read(&self, lane: &mut Lane, first: usize, buf: &mut [u8]) -> Result<(), DirectError> {
        if lane.conn.is_none() {
            let mut cursor = lane.cursor;
            let conn = connect_any(&self.config, Role::Fault, &mut cursor);
            lane.cursor = cursor;
            let conn = conn?;
            if conn.accept.pages as usize != self.pages
                || conn.accept.nonzero_pages != self.nonzero.count_ones() as u64
            {
                return Err(DirectError::Protocol {
                    addr: conn.addr,
                    what: format!("serves a different image ({:?})", conn.accept),
                });
            }
            lane.conn = Some(conn);
        }
        let conn = lane.conn.as_mut().expect("connected above");
        let max = MAX_BATCH_PAGES as usize;
        for (i, chunk) in buf.chunks_mut(max * PAGE_SIZE).enumerate() {
            let a = first + i * max;
            let b = a + chunk.len() / PAGE_SIZE;
            conn.read_pages(&self.nonzero, a, b, chunk)?;
        }
        Ok(())
    }
}

impl PageSource for DirectPages {
    fn pages(&self) -> usize {
        self.pages
    }

    fn is_zero(&self, page: usize) -> bool {
        !self.nonzero.get(page)
    }

    fn read_pages(
        &self,
        first: usize,
        count: usize,
        buf: &mut [u8],
    ) -> Result<(), PageSourceError> {
        let err = |source| PageSourceError {
            first,
            count,
            source,
        };
        if first.checked_add(count).is_none_or(|e| e > self.pages) || buf.len() != count * PAGE_SIZE
        {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "pages {first}+{count} ({} bytes) for an image of {} pages",
                    buf.len(),
                    self.pages
                ),
            )));
        }
        let deadline = Instant::now() + self.config.retry_budget;
        let mut backoff = self.config.backoff_initial;
        let mut lane = self.lane.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match self.try_read(&mut lane, first, buf) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    lane.conn = None;
                    let n = self.config.holders.len().max(1);
                    lane.cursor = (lane.cursor + 1) % n;
                    if Instant::now() >= deadline {
                        return Err(err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "no holder delivered the pages within {:?}: {}",
                                self.config.retry_budget,
                                crate::error_chain(&e)
                            ),
                        )));
                    }
                    tracing::warn!(image = %self.config.image_id, error = %crate::error_chain(&e), "reading pages failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.config.backoff_max);
                }
            }
        }
    }
}
