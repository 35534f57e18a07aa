//! One authenticated connection to a page server, shared by the cached
//! client ([`crate::client`]) and the cache-less one ([`crate::direct`]):
//! the mutual handshake, requests with their ids and ranges, and answers
//! checked (CRC, command, request id, range) before anyone uses them.

use std::io;
use std::net::{SocketAddr, TcpStream};

use vmstream_vmm::image::Bitmap;
use vmstream_vmm::memory::PAGE_SIZE;

use crate::auth::nonce;
use crate::cache::NodeImageCache;
use crate::config::RemoteConfig;
use crate::framing::{ReadFrameError, read_frame, read_header, write_frame};
use crate::wire::{
    Accept, Challenge, Command, FrameError, HANDSHAKE_VERSION, HEADER_LEN, Header, Hello,
    MAX_INDEX_PAGES, MAX_VERSION, MIN_VERSION, Reason, Role, decode_index,
};

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

/// One authenticated connection to a holder for one image.
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
    /// `config.image_id` in `role`.
    pub fn open(addr: SocketAddr, role: Role, config: &RemoteConfig) -> Result<Self, ConnectError> {
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
            Command::Challenge => {
                Challenge::decode(&buf).map_err(|e| bad(Command::Challenge, e))?
            }
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
        if !config.token.verify_server_proof(
            &client_nonce,
            &config.image_id,
            &challenge.server_proof,
        ) {
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
        Ok(Self {
            stream,
            addr,
            version: challenge.version,
            accept,
            next_id: 1,
            buf,
        })
    }

    /// The server's Accept (page counts of the image).
    pub fn accept(&self) -> Accept {
        self.accept
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Gives the frame buffer's memory back (an idle connection kept for
    /// later keeps no answer).
    pub(crate) fn release_buffer(&mut self) {
        self.buf = Vec::new();
    }

    /// Sends a request for `first..end`; returns its request id (the
    /// answer is read later: requests may be pipelined).
    pub(crate) fn send(
        &mut self,
        command: Command,
        first: usize,
        end: usize,
    ) -> Result<u64, RequestError> {
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
    ) -> Result<(Header, [u8; HEADER_LEN]), RequestError> {
        let addr = self.addr;
        let (h, raw) =
            read_header(&mut self.stream).map_err(|source| RequestError::Frame { addr, source })?;
        let protocol = |what: String| RequestError::Protocol { addr, what };
        if h.command == Command::Error {
            self.read_payload(&h, &raw)?;
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

    /// Reads the payload of the answer whose header is `h` into the frame
    /// buffer and checks the CRC.
    fn read_payload(&mut self, h: &Header, raw: &[u8; HEADER_LEN]) -> Result<(), RequestError> {
        let addr = self.addr;
        self.buf.resize(h.payload_len as usize, 0);
        io::Read::read_exact(&mut self.stream, &mut self.buf)
            .map_err(|source| RequestError::Io { addr, source })?;
        h.check_crc(raw, &self.buf)
            .map_err(|e| RequestError::Frame {
                addr,
                source: e.into(),
            })
    }

    /// Sends one request and reads its checked answer of kind `answer`
    /// (payload in the frame buffer).
    fn request(
        &mut self,
        command: Command,
        answer: Command,
        first: usize,
        end: usize,
    ) -> Result<Header, RequestError> {
        let id = self.send(command, first, end)?;
        let (h, raw) = self.answer_header(answer, id, first, end)?;
        self.read_payload(&h, &raw)?;
        Ok(h)
    }

    /// Receives the Pages answer to request `id`, verifies it and writes
    /// it into the cache file; the caller holds the claims on its non-zero
    /// pages. Nothing is marked present here.
    pub(crate) fn receive_pages(
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
        self.read_payload(&h, &raw)?;
        // Verified: now (and only now) into the cache file.
        cache
            .write_claimed(first, end, &self.buf)
            .map_err(|source| RequestError::Io { addr, source })
    }

    /// Reads the image's non-zero bitmap, in chunks (checked against the
    /// Accept's counts).
    pub fn read_index(&mut self) -> Result<Vec<u64>, RequestError> {
        let pages = self.accept.pages as usize;
        let mut words = Vec::with_capacity(pages.div_ceil(64));
        let mut first = 0;
        while first < pages {
            let end = (first + MAX_INDEX_PAGES as usize).min(pages);
            self.request(Command::IndexRequest, Command::Index, first, end)?;
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

    /// Reads pages `first..end` (at most `MAX_BATCH_PAGES`) into `out`
    /// (`(end - first) * PAGE_SIZE` bytes; zero pages are zero-filled).
    pub fn read_pages(
        &mut self,
        nonzero: &Bitmap,
        first: usize,
        end: usize,
        out: &mut [u8],
    ) -> Result<(), RequestError> {
        let expected = (first..end).filter(|&p| nonzero.get(p)).count();
        if expected == 0 {
            out.fill(0);
            return Ok(());
        }
        self.request(Command::ReadPages, Command::Pages, first, end)?;
        if self.buf.len() != expected * PAGE_SIZE {
            return Err(RequestError::Protocol {
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
    pub fn state_file(&mut self) -> Result<Vec<u8>, RequestError> {
        self.request(Command::StateRequest, Command::State, 0, 0)?;
        Ok(std::mem::take(&mut self.buf))
    }
}

/// Connects to the first holder that accepts, starting at `*cursor` and
/// advancing it past holders that fail. Checks the holder serves the same
/// image (page counts).
pub(crate) fn connect_any(
    config: &RemoteConfig,
    role: Role,
    cursor: &mut usize,
    expected: Option<Accept>,
) -> Result<Connection, ConnectError> {
    let n = config.holders.len();
    if n == 0 {
        return Err(ConnectError::NoHolders);
    }
    let mut last = None;
    for _ in 0..n {
        let addr = config.holders[*cursor % n];
        let result = Connection::open(addr, role, config).and_then(|c| match expected {
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
