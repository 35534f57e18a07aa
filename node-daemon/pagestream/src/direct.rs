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
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

use vmstream_vmm::image::Bitmap;
use vmstream_vmm::memory::{PAGE_SIZE, PageSource, PageSourceError};

use crate::config::RemoteConfig;
pub use crate::connection::Connection;
use crate::connection::{ConnectError, RequestError, connect_any};
use crate::wire::{MAX_BATCH_PAGES, Reason, Role};

/// Why a direct request failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("handshake failed")]
    Handshake(#[from] ConnectError),
    /// The server refused the request (its reason says why: callers react
    /// to `UnknownImage`, `NotHeld`, ...).
    #[error("{addr} refused: {} ({:?})", reason.text, reason.code)]
    Refused { addr: SocketAddr, reason: Reason },
    #[error("request failed")]
    Request(#[source] RequestError),
    #[error("no holder is configured for the image")]
    NoHolders,
}

impl From<RequestError> for DirectError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Refused { addr, reason } => Self::Refused { addr, reason },
            other => Self::Request(other),
        }
    }
}

/// Fetches the image's state file from the first holder in
/// `config.holders` that has it (each tried once, in order). The bytes came
/// in a frame whose CRC verified; the state file's own header and CRC are
/// checked by whoever opens it (`StateFile::read`).
pub fn fetch_state_file(config: &RemoteConfig) -> Result<Vec<u8>, DirectError> {
    let mut last = DirectError::NoHolders;
    for &addr in &config.holders {
        let fetched = Connection::open(addr, Role::Fault, config)
            .map_err(DirectError::from)
            .and_then(|mut c| Ok(c.state_file()?));
        match fetched {
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
            let attempt = connect_any(&config, Role::Fault, &mut cursor, None)
                .map_err(DirectError::from)
                .and_then(|mut c| {
                    let words = c.read_index()?;
                    let index = Bitmap::from_words(c.accept().pages as usize, &words)
                        .expect("read_index checked the bitmap");
                    Ok((c, index))
                });
            match attempt {
                Ok((conn, nonzero)) => {
                    return Ok(Self {
                        pages: conn.accept().pages as usize,
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
            let conn = connect_any(&self.config, Role::Fault, &mut cursor, None);
            lane.cursor = cursor;
            let conn = conn?;
            let accept = conn.accept();
            if accept.pages as usize != self.pages
                || accept.nonzero_pages != self.nonzero.count_ones() as u64
            {
                return Err(DirectError::Request(RequestError::Protocol {
                    addr: conn.addr(),
                    what: format!("serves a different image ({accept:?})"),
                }));
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
