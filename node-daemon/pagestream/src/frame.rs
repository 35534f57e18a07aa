//! The frame codec shared by vmstream's wire protocols (page streaming and
//! live migration): a fixed 40-byte little-endian header, checked against
//! the protocol's limits before any payload is read, and a CRC32 over the
//! header's first 36 bytes and the payload; plus reading and writing frames
//! on a byte stream. Each protocol brings its magic, versions, command enum
//! and limits through [`FrameCommand`].
//!
//! ```text
//! off len field
//!   0   4 magic        per protocol ("VMSP", "VMSM")
//!   4   2 version      protocol version of this frame
//!   6   2 command      the protocol's command (0 is reserved: never valid)
//!   8   4 flags        per protocol
//!  12   8 request_id   request id (echoed in answers), session id, counts
//!  20   8 first_page   first page of a range
//!  28   4 page_count   pages in the range
//!  32   4 payload_len  bytes following the header
//!  36   4 crc32        CRC32 of bytes 0..36 and the payload
//! ```

use std::fmt::Debug;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 40;
/// Offset of the CRC field (it covers bytes `0..CRC_OFFSET` and the payload).
const CRC_OFFSET: usize = 36;

/// A protocol's command space: the command enum names the protocol's magic,
/// the versions it accepts and its limits.
pub trait FrameCommand: Copy + Eq + Debug + Send + Sync + 'static {
    /// Magic bytes at offset 0 of every frame.
    const MAGIC: [u8; 4];
    /// Oldest header version accepted.
    const MIN_VERSION: u16;
    /// Newest header version accepted (and the one new headers carry).
    const MAX_VERSION: u16;
    /// The command with wire value `value`, if any (0 never is one).
    fn from_wire(value: u16) -> Option<Self>;
    /// The command's wire value.
    fn to_wire(self) -> u16;
    /// Largest payload this command may carry (checked first).
    fn payload_limit(self) -> u32;
    /// The protocol's further checks of a decoded header (ranges, flags,
    /// lengths), before any payload is read.
    fn check_header(header: &Header<Self>) -> Result<(), FrameError<Self>>;
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError<C: FrameCommand> {
    #[error("truncated frame: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("bad magic {found:02x?} (expected {:?})", magic_text::<C>())]
    BadMagic { found: [u8; 4] },
    #[error("unsupported protocol version {found} (this build speaks {min}..={max})")]
    UnsupportedVersion { found: u16, min: u16, max: u16 },
    #[error("unknown command {value}{}", if *value == 0 { " (0 is reserved as invalid)" } else { "" })]
    UnknownCommand { value: u16 },
    #[error("{command:?} frame field {field} is {value}, over the limit {limit}")]
    Oversized {
        command: C,
        field: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("{command:?} frame payload is {len} bytes, pages need {expected}")]
    PayloadLength { command: C, len: u32, expected: u64 },
    #[error("CRC mismatch: header says {stored:#010x}, frame computes to {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("malformed {command:?} frame: {reason}")]
    Malformed { command: C, reason: String },
}

fn magic_text<C: FrameCommand>() -> &'static str {
    std::str::from_utf8(&C::MAGIC).unwrap_or("?")
}

/// A decoded frame header (all fields checked against the command's limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<C> {
    pub version: u16,
    pub command: C,
    pub flags: u32,
    /// Page streaming: the request id, echoed in the answer. Migration: the
    /// session id in Hello.
    pub request_id: u64,
    pub first_page: u64,
    pub page_count: u32,
    pub payload_len: u32,
    pub crc: u32,
}

pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl<C: FrameCommand> Header<C> {
    /// A header for `command` with every other field zero and the newest
    /// version.
    pub fn new(command: C) -> Self {
        Self {
            version: C::MAX_VERSION,
            command,
            flags: 0,
            request_id: 0,
            first_page: 0,
            page_count: 0,
            payload_len: 0,
            crc: 0,
        }
    }

    /// Sets the page range.
    pub fn with_range(mut self, first_page: u64, page_count: u32) -> Self {
        self.first_page = first_page;
        self.page_count = page_count;
        self
    }

    /// Sets the request id.
    pub fn with_request(mut self, request_id: u64) -> Self {
        self.request_id = request_id;
        self
    }

    /// Sets the header version.
    pub fn with_version(mut self, version: u16) -> Self {
        self.version = version;
        self
    }

    /// Sets the flags.
    pub fn with_flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }

    /// The page range as `first..end`.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.first_page..self.first_page + u64::from(self.page_count)
    }

    /// Encodes the header for a payload made of `parts` (concatenated):
    /// sets `payload_len` and the CRC. The payload is not copied.
    pub fn encode_parts(&self, parts: &[&[u8]]) -> [u8; HEADER_LEN] {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let payload_len = u32::try_from(len).expect("payload over 4 GiB");
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&C::MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&self.command.to_wire().to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..20].copy_from_slice(&self.request_id.to_le_bytes());
        out[20..28].copy_from_slice(&self.first_page.to_le_bytes());
        out[28..32].copy_from_slice(&self.page_count.to_le_bytes());
        out[32..36].copy_from_slice(&payload_len.to_le_bytes());
        let crc = crc_of(&out, parts);
        out[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Encodes header and payload into one buffer.
    pub fn encode_frame(&self, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
        v.extend_from_slice(&self.encode_parts(&[payload]));
        v.extend_from_slice(payload);
        v
    }

    /// Decodes and checks a header: magic, version, command, the payload
    /// length against the command's limit, then the protocol's own checks.
    /// The CRC can only be checked once the payload is there
    /// ([`Header::check_crc`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError<C>> {
        if bytes.len() < HEADER_LEN {
            return Err(FrameError::Truncated {
                needed: HEADER_LEN,
                available: bytes.len(),
            });
        }
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != C::MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = u16_at(bytes, 4);
        if !(C::MIN_VERSION..=C::MAX_VERSION).contains(&version) {
            return Err(FrameError::UnsupportedVersion {
                found: version,
                min: C::MIN_VERSION,
                max: C::MAX_VERSION,
            });
        }
        let value = u16_at(bytes, 6);
        let command = C::from_wire(value).ok_or(FrameError::UnknownCommand { value })?;
        let header = Self {
            version,
            command,
            flags: u32_at(bytes, 8),
            request_id: u64_at(bytes, 12),
            first_page: u64_at(bytes, 20),
            page_count: u32_at(bytes, 28),
            payload_len: u32_at(bytes, 32),
            crc: u32_at(bytes, CRC_OFFSET),
        };
        let limit = command.payload_limit();
        if header.payload_len > limit {
            return Err(FrameError::Oversized {
                command,
                field: "payload_len",
                value: header.payload_len.into(),
                limit: limit.into(),
            });
        }
        C::check_header(&header)?;
        Ok(header)
    }

    /// Refuses a page count over `limit` (for [`FrameCommand::check_header`]).
    pub fn check_page_count(&self, limit: u32) -> Result<(), FrameError<C>> {
        if self.page_count > limit {
            return Err(FrameError::Oversized {
                command: self.command,
                field: "page_count",
                value: self.page_count.into(),
                limit: limit.into(),
            });
        }
        Ok(())
    }

    /// Checks the CRC over this header's encoded fields and `payload`.
    pub fn check_crc(&self, raw_header: &[u8], payload: &[u8]) -> Result<(), FrameError<C>> {
        self.check_crc_parts(raw_header, &[payload])
    }

    /// Checks the CRC over this header's encoded fields and a payload that
    /// sits in several buffers (concatenated in order).
    pub fn check_crc_parts(&self, raw_header: &[u8], parts: &[&[u8]]) -> Result<(), FrameError<C>> {
        let computed = crc_of(raw_header, parts);
        if computed != self.crc {
            return Err(FrameError::CrcMismatch {
                stored: self.crc,
                computed,
            });
        }
        Ok(())
    }
}

/// CRC32 of the header's bytes before the CRC field and the payload parts.
fn crc_of(raw_header: &[u8], parts: &[&[u8]]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&raw_header[..CRC_OFFSET]);
    for p in parts {
        crc.update(p);
    }
    crc.finalize()
}

/// A decoded frame: the header, the payload and the bytes consumed.
pub type Decoded<'a, C> = (Header<C>, &'a [u8], usize);

/// Decodes one complete frame from the start of `bytes`: the header, its
/// limits, the payload length and the CRC. Returns the header, the payload
/// and the number of bytes consumed.
pub fn decode_frame<C: FrameCommand>(bytes: &[u8]) -> Result<Decoded<'_, C>, FrameError<C>> {
    let header = Header::<C>::decode(bytes)?;
    let end = HEADER_LEN + header.payload_len as usize;
    if bytes.len() < end {
        return Err(FrameError::Truncated {
            needed: end,
            available: bytes.len(),
        });
    }
    let payload = &bytes[HEADER_LEN..end];
    header.check_crc(bytes, payload)?;
    Ok((header, payload, end))
}

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError<C: FrameCommand> {
    #[error("the peer closed the connection")]
    Closed,
    #[error("reading a frame failed")]
    Io(#[source] io::Error),
    #[error("refused frame: {0}")]
    Frame(#[from] FrameError<C>),
}

/// Reads and decodes a header (a bad or oversized one is refused before
/// anything is allocated or read). A connection closed before the first
/// byte is [`ReadFrameError::Closed`]; closed mid-header, a truncated frame.
pub fn read_header<C: FrameCommand>(
    r: &mut impl Read,
) -> Result<(Header<C>, [u8; HEADER_LEN]), ReadFrameError<C>> {
    let mut raw = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut raw[got..]) {
            Ok(0) if got == 0 => return Err(ReadFrameError::Closed),
            Ok(0) => {
                return Err(ReadFrameError::Frame(FrameError::Truncated {
                    needed: HEADER_LEN,
                    available: got,
                }));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadFrameError::Io(e)),
        }
    }
    Ok((Header::decode(&raw)?, raw))
}

/// Reads one whole frame; the payload lands in `buf` (resized to it).
pub fn read_frame<C: FrameCommand>(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
) -> Result<Header<C>, ReadFrameError<C>> {
    let (header, raw) = read_header(r)?;
    buf.resize(header.payload_len as usize, 0);
    r.read_exact(buf).map_err(ReadFrameError::Io)?;
    header.check_crc(&raw, buf)?;
    Ok(header)
}

/// Reads exactly the total length of `bufs` into them, in order.
pub fn read_exact_vectored(r: &mut impl Read, mut bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
    IoSliceMut::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match r.read_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => IoSliceMut::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `header` (its length and CRC computed over `parts`) and the parts
/// with vectored writes (the payload is not copied).
pub fn write_frame<C: FrameCommand>(
    w: &mut impl Write,
    header: &Header<C>,
    parts: &[&[u8]],
) -> io::Result<()> {
    let raw = header.encode_parts(parts);
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len() + 1);
    slices.push(IoSlice::new(&raw));
    slices.extend(
        parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p)),
    );
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol of two commands, to test the codec on its own.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Test {
        Ping = 1,
        Data = 2,
    }

    impl FrameCommand for Test {
        const MAGIC: [u8; 4] = *b"TEST";
        const MIN_VERSION: u16 = 2;
        const MAX_VERSION: u16 = 3;
        fn from_wire(value: u16) -> Option<Self> {
            match value {
                1 => Some(Self::Ping),
                2 => Some(Self::Data),
                _ => None,
            }
        }
        fn to_wire(self) -> u16 {
            self as u16
        }
        fn payload_limit(self) -> u32 {
            match self {
                Self::Ping => 0,
                Self::Data => 100,
            }
        }
        fn check_header(header: &Header<Self>) -> Result<(), FrameError<Self>> {
            header.check_page_count(4)
        }
    }

    #[test]
    fn the_header_layout_is_the_documented_one() {
        let raw = Header::new(Test::Data)
            .with_flags(0x0102_0304)
            .with_request(0x1112_1314_1516_1718)
            .with_range(0x2122_2324_2526_2728, 3)
            .encode_parts(&[b"ab", b"c"]);
        assert_eq!(&raw[0..4], b"TEST");
        assert_eq!(u16_at(&raw, 4), 3);
        assert_eq!(u16_at(&raw, 6), 2);
        assert_eq!(u32_at(&raw, 8), 0x0102_0304);
        assert_eq!(u64_at(&raw, 12), 0x1112_1314_1516_1718);
        assert_eq!(u64_at(&raw, 20), 0x2122_2324_2526_2728);
        assert_eq!(u32_at(&raw, 28), 3);
        assert_eq!(u32_at(&raw, 32), 3);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&raw[..36]);
        crc.update(b"abc");
        assert_eq!(u32_at(&raw, 36), crc.finalize());
    }

    #[test]
    fn headers_are_refused_in_order_with_the_protocols_limits() {
        let good = Header::new(Test::Data).encode_frame(b"xyz");
        let (h, payload, used) = decode_frame::<Test>(&good).unwrap();
        assert_eq!((h.command, payload, used), (Test::Data, &b"xyz"[..], 43));
        let mut old = good.clone();
        old[4] = 1;
        assert_eq!(
            Header::<Test>::decode(&old),
            Err(FrameError::UnsupportedVersion {
                found: 1,
                min: 2,
                max: 3
            })
        );
        let mut magic = good.clone();
        magic[0] = b'X';
        let err = Header::<Test>::decode(&magic).unwrap_err();
        assert!(err.to_string().contains("expected \"TEST\""), "{err}");
        let ping = Header::new(Test::Ping).encode_frame(b"x");
        assert!(matches!(
            decode_frame::<Test>(&ping),
            Err(FrameError::Oversized {
                field: "payload_len",
                ..
            })
        ));
        let ranged = Header::new(Test::Ping).with_range(0, 5).encode_frame(&[]);
        assert!(matches!(
            decode_frame::<Test>(&ranged),
            Err(FrameError::Oversized {
                field: "page_count",
                ..
            })
        ));
        let mut cut = good.clone();
        cut.pop();
        assert!(matches!(
            decode_frame::<Test>(&cut),
            Err(FrameError::Truncated {
                needed: 43,
                available: 42
            })
        ));
    }

    #[test]
    fn frames_round_trip_through_a_stream() {
        let mut wire = Vec::new();
        write_frame(&mut wire, &Header::new(Test::Data), &[b"12", b"", b"3"]).unwrap();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        let h: Header<Test> = read_frame(&mut r, &mut buf).unwrap();
        assert_eq!((h.command, &buf[..]), (Test::Data, &b"123"[..]));
        assert!(matches!(
            read_frame::<Test>(&mut r, &mut buf),
            Err(ReadFrameError::Closed)
        ));
    }
}
