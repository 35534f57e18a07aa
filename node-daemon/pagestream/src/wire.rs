//! The page-streaming protocol on the shared frame codec ([`crate::frame`]:
//! 40-byte header, CRC, typed decode errors): magic `"VMSP"`, its command
//! set and limits, and the handshake, reason and index payloads, encoded
//! and decoded field by field. Byte tables: `docs/PAGE-STREAMING.md`.
//!
//! In this protocol the header's `flags` are reserved (0), `request_id` is
//! echoed in the answer, and only ReadPages, Pages, IndexRequest and Index
//! carry a page range.

use vmstream_vmm::memory::PAGE_SIZE;

pub use crate::frame::HEADER_LEN;
use crate::frame::{self, FrameCommand, u16_at, u64_at};

/// Magic bytes at offset 0 of every frame.
pub const MAGIC: [u8; 4] = *b"VMSP";
/// Oldest protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
/// Newest protocol version this build speaks.
pub const MAX_VERSION: u16 = 1;
/// Version in the header of handshake frames (Hello, Challenge, Reject
/// before agreement): frozen, so any future build can still negotiate.
pub const HANDSHAKE_VERSION: u16 = 1;

/// Most pages one ReadPages request or one Pages answer may cover.
pub const MAX_BATCH_PAGES: u32 = 256;
/// Most pages one IndexRequest may cover (a 64 KiB bitmap).
pub const MAX_INDEX_PAGES: u32 = 512 * 1024;
/// Largest payload of any frame (a full batch of pages).
pub const MAX_PAYLOAD: u32 = MAX_BATCH_PAGES * PAGE_SIZE as u32;
/// Largest state file a State frame carries (1 MiB; a 1-vCPU micro VM's is
/// about 20 KB).
pub const MAX_STATE_LEN: u32 = 1 << 20;
/// Longest image id in a Hello.
pub const MAX_IMAGE_ID_LEN: usize = 256;
/// Longest reason text in a Reject or Error.
pub const MAX_REASON_LEN: usize = 512;
/// Length of handshake nonces and HMAC-SHA256 tags.
pub const NONCE_LEN: usize = 32;
/// Length of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;

const HELLO_FIXED: usize = 8 + NONCE_LEN;
const CHALLENGE_LEN: usize = 4 + NONCE_LEN + MAC_LEN;
const ACCEPT_LEN: usize = 16;
const REASON_FIXED: usize = 4;

/// What a frame is. Values are the `command` field; 0 is reserved as
/// invalid so a zeroed header is never a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Client → server: versions, role, client nonce, image id.
    Hello = 1,
    /// Server → client: chosen version, server nonce, server proof.
    Challenge = 2,
    /// Client → server: HMAC over the server nonce and the image id.
    Auth = 3,
    /// Server → client: the peer is authenticated; image page counts.
    Accept = 4,
    /// Server → client: the handshake failed (code and reason); then close.
    Reject = 5,
    /// Client → server: send the non-zero bitmap of a page range.
    IndexRequest = 6,
    /// Server → client: bitmap words of the requested range.
    Index = 7,
    /// Client → server: send the non-zero pages of a page range.
    ReadPages = 8,
    /// Server → client: the non-zero pages of a range, in page order.
    Pages = 9,
    /// Server → client: a request failed (code and reason).
    Error = 10,
    /// Client → server: send the image's state file (vCPU and device
    /// state, `state.bin`).
    StateRequest = 11,
    /// Server → client: the image's state file, whole (at most
    /// [`MAX_STATE_LEN`] bytes).
    State = 12,
}

/// A page-streaming frame header.
pub type Header = frame::Header<Command>;
/// Why bytes are not a valid page-streaming frame.
pub type FrameError = frame::FrameError<Command>;

impl FrameCommand for Command {
    const MAGIC: [u8; 4] = MAGIC;
    const MIN_VERSION: u16 = MIN_VERSION;
    const MAX_VERSION: u16 = MAX_VERSION;

    /// The command with wire value `v`, if any.
    fn from_wire(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Challenge,
            3 => Self::Auth,
            4 => Self::Accept,
            5 => Self::Reject,
            6 => Self::IndexRequest,
            7 => Self::Index,
            8 => Self::ReadPages,
            9 => Self::Pages,
            10 => Self::Error,
            11 => Self::StateRequest,
            12 => Self::State,
            _ => return None,
        })
    }

    /// Largest payload this command may carry.
    fn payload_limit(self) -> u32 {
        match self {
            Self::Hello => (HELLO_FIXED + MAX_IMAGE_ID_LEN) as u32,
            Self::Challenge => CHALLENGE_LEN as u32,
            Self::Auth => MAC_LEN as u32,
            Self::Accept => ACCEPT_LEN as u32,
            Self::Reject | Self::Error => (REASON_FIXED + MAX_REASON_LEN) as u32,
            Self::IndexRequest | Self::ReadPages | Self::StateRequest => 0,
            Self::State => MAX_STATE_LEN,
            Self::Index => MAX_INDEX_PAGES / 8,
            Self::Pages => MAX_PAYLOAD,
        }
    }

    fn to_wire(self) -> u16 {
        self as u16
    }

    /// Reserved flags are zero; only range commands carry a page range,
    /// within their limits; Pages carry whole pages, no more than the
    /// range; index ranges are aligned and Index payloads sized to them.
    fn check_header(header: &Header) -> Result<(), FrameError> {
        let command = header.command;
        let malformed = |reason: String| FrameError::Malformed { command, reason };
        if header.flags != 0 {
            return Err(malformed(format!(
                "reserved flags {:#x} are set",
                header.flags
            )));
        }
        let ranged = matches!(
            command,
            Command::ReadPages | Command::Pages | Command::IndexRequest | Command::Index
        );
        if !ranged {
            return if header.first_page != 0 || header.page_count != 0 {
                Err(malformed("a page range on a frame that takes none".into()))
            } else {
                Ok(())
            };
        }
        let max_pages = match command {
            Command::IndexRequest | Command::Index => MAX_INDEX_PAGES,
            _ => MAX_BATCH_PAGES,
        };
        if header.page_count == 0 {
            return Err(malformed("page count 0 (an empty batch)".into()));
        }
        header.check_page_count(max_pages)?;
        if header
            .first_page
            .checked_add(header.page_count.into())
            .is_none()
        {
            return Err(malformed(format!(
                "page range {}+{} overflows",
                header.first_page, header.page_count
            )));
        }
        match command {
            Command::Pages => {
                let len = header.payload_len as usize;
                if !len.is_multiple_of(PAGE_SIZE) {
                    return Err(malformed(format!(
                        "payload of {len} bytes is not whole pages"
                    )));
                }
                if len / PAGE_SIZE > header.page_count as usize {
                    return Err(malformed(format!(
                        "{} pages of data for a range of {} pages",
                        len / PAGE_SIZE,
                        header.page_count
                    )));
                }
            }
            Command::IndexRequest | Command::Index => {
                if !header.first_page.is_multiple_of(64) {
                    return Err(malformed(format!(
                        "index range starts at page {}, not a multiple of 64",
                        header.first_page
                    )));
                }
                if command == Command::Index {
                    let expected = (header.page_count as usize).div_ceil(64) * 8;
                    if header.payload_len as usize != expected {
                        return Err(malformed(format!(
                            "index payload of {} bytes for {} pages (expected {expected})",
                            header.payload_len, header.page_count
                        )));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Decodes one complete frame from the start of `bytes`: the header, its
/// limits, the payload length and the CRC. Returns the header, the payload
/// and the number of bytes consumed.
pub fn decode_frame(bytes: &[u8]) -> Result<(Header, &[u8], usize), FrameError> {
    frame::decode_frame(bytes)
}

/// The role of a connection, stated in the Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// On-demand page requests of faulting clones (latency first).
    Fault = 1,
    /// Background prefetch (throughput first).
    Bulk = 2,
}

/// The Hello payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub role: Role,
    pub client_nonce: [u8; NONCE_LEN],
    pub image_id: String,
}

/// The Challenge payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub version: u16,
    pub server_nonce: [u8; NONCE_LEN],
    /// HMAC proving the server knows the cluster token.
    pub server_proof: [u8; MAC_LEN],
}

/// The Accept payload: what the client needs to know about the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    pub pages: u64,
    pub nonzero_pages: u64,
}

/// A Reject or Error payload: a code and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub code: ReasonCode,
    pub text: String,
}

/// Why a handshake or a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ReasonCode {
    /// The peer sent something this side cannot decode.
    Malformed = 1,
    /// No version in common.
    VersionMismatch = 2,
    /// The HMAC did not verify.
    AuthFailed = 3,
    /// A request came before the handshake finished.
    NotAuthenticated = 4,
    /// The server does not serve this image.
    UnknownImage = 5,
    /// The page range lies (partly) outside the image.
    OutOfRange = 6,
    /// This holder does not have (all) the requested pages.
    NotHeld = 7,
    /// Reading the pages failed on the server.
    ReadFailed = 8,
    /// Too many connections.
    Busy = 9,
    /// A frame that is valid but not expected here.
    Unexpected = 10,
}

impl ReasonCode {
    /// The code with wire value `v`, if any.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Malformed,
            2 => Self::VersionMismatch,
            3 => Self::AuthFailed,
            4 => Self::NotAuthenticated,
            5 => Self::UnknownImage,
            6 => Self::OutOfRange,
            7 => Self::NotHeld,
            8 => Self::ReadFailed,
            9 => Self::Busy,
            10 => Self::Unexpected,
            _ => return None,
        })
    }
}

fn malformed(command: Command, reason: impl Into<String>) -> FrameError {
    FrameError::Malformed {
        command,
        reason: reason.into(),
    }
}

fn exact_len(command: Command, payload: &[u8], len: usize) -> Result<(), FrameError> {
    if payload.len() != len {
        return Err(malformed(
            command,
            format!("payload is {} bytes, expected {len}", payload.len()),
        ));
    }
    Ok(())
}

/// Whether `id` is an acceptable image id: 1..=256 bytes of printable
/// ASCII without spaces (e.g. `namespace/name` or a content id).
pub fn valid_image_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_IMAGE_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

impl Hello {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HELLO_FIXED + self.image_id.len());
        v.extend_from_slice(&self.min_version.to_le_bytes());
        v.extend_from_slice(&self.max_version.to_le_bytes());
        v.push(self.role as u8);
        v.push(0);
        v.extend_from_slice(&(self.image_id.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.client_nonce);
        v.extend_from_slice(self.image_id.as_bytes());
        v
    }

    /// Parses a Hello payload.
    pub fn decode(payload: &[u8]) -> Result<Self, FrameError> {
        let c = Command::Hello;
        if payload.len() < HELLO_FIXED {
            return Err(malformed(
                c,
                format!(
                    "payload is {} bytes, at least {HELLO_FIXED} needed",
                    payload.len()
                ),
            ));
        }
        let min_version = u16_at(payload, 0);
        let max_version = u16_at(payload, 2);
        if min_version > max_version || min_version == 0 {
            return Err(malformed(
                c,
                format!("version range {min_version}..={max_version} is empty"),
            ));
        }
        let role = match payload[4] {
            1 => Role::Fault,
            2 => Role::Bulk,
            r => return Err(malformed(c, format!("unknown role {r}"))),
        };
        if payload[5] != 0 {
            return Err(malformed(c, "reserved byte is not zero"));
        }
        let id_len = u16_at(payload, 6) as usize;
        exact_len(c, payload, HELLO_FIXED + id_len)?;
        let client_nonce = payload[8..8 + NONCE_LEN].try_into().expect("nonce");
        let image_id = std::str::from_utf8(&payload[HELLO_FIXED..])
            .ok()
            .filter(|id| valid_image_id(id))
            .ok_or_else(|| malformed(c, "image id is not 1..=256 printable ASCII bytes"))?
            .to_owned();
        Ok(Self {
            min_version,
            max_version,
            role,
            client_nonce,
            image_id,
        })
    }
}

impl Challenge {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(CHALLENGE_LEN);
        v.extend_from_slice(&self.version.to_le_bytes());
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&self.server_nonce);
        v.extend_from_slice(&self.server_proof);
        v
    }

    /// Parses a Challenge payload.
    pub fn decode(payload: &[u8]) -> Result<Self, FrameError> {
        exact_len(Command::Challenge, payload, CHALLENGE_LEN)?;
        Ok(Self {
            version: u16_at(payload, 0),
            server_nonce: payload[4..4 + NONCE_LEN].try_into().expect("nonce"),
            server_proof: payload[4 + NONCE_LEN..].try_into().expect("mac"),
        })
    }
}

/// Parses an Auth payload (the client's HMAC tag).
pub fn decode_auth(payload: &[u8]) -> Result<[u8; MAC_LEN], FrameError> {
    exact_len(Command::Auth, payload, MAC_LEN)?;
    Ok(payload.try_into().expect("mac"))
}

impl Accept {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(ACCEPT_LEN);
        v.extend_from_slice(&self.pages.to_le_bytes());
        v.extend_from_slice(&self.nonzero_pages.to_le_bytes());
        v
    }

    /// Parses an Accept payload.
    pub fn decode(payload: &[u8]) -> Result<Self, FrameError> {
        exact_len(Command::Accept, payload, ACCEPT_LEN)?;
        let pages = u64_at(payload, 0);
        let nonzero_pages = u64_at(payload, 8);
        if nonzero_pages > pages || pages == 0 {
            return Err(malformed(
                Command::Accept,
                format!("{nonzero_pages} non-zero pages of {pages}"),
            ));
        }
        Ok(Self {
            pages,
            nonzero_pages,
        })
    }
}

impl Reason {
    /// A reason; the text is cut to [`MAX_REASON_LEN`] bytes (at a char
    /// boundary).
    pub fn new(code: ReasonCode, text: impl Into<String>) -> Self {
        let mut text = text.into();
        if text.len() > MAX_REASON_LEN {
            let mut cut = MAX_REASON_LEN;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        Self { code, text }
    }

    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(REASON_FIXED + self.text.len());
        v.extend_from_slice(&(self.code as u16).to_le_bytes());
        v.extend_from_slice(&(self.text.len() as u16).to_le_bytes());
        v.extend_from_slice(self.text.as_bytes());
        v
    }

    /// Parses a Reject or Error payload.
    pub fn decode(command: Command, payload: &[u8]) -> Result<Self, FrameError> {
        if payload.len() < REASON_FIXED {
            return Err(malformed(command, "reason payload shorter than 4 bytes"));
        }
        let code = ReasonCode::from_u16(u16_at(payload, 0)).ok_or_else(|| {
            malformed(
                command,
                format!("unknown reason code {}", u16_at(payload, 0)),
            )
        })?;
        let len = u16_at(payload, 2) as usize;
        exact_len(command, payload, REASON_FIXED + len)?;
        let text = String::from_utf8_lossy(&payload[REASON_FIXED..]).into_owned();
        Ok(Self { code, text })
    }
}

/// Encodes bitmap words as an Index payload.
pub fn encode_index(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Decodes an Index payload into words (its length was checked with the
/// header).
pub fn decode_index(payload: &[u8]) -> Vec<u64> {
    payload
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages_frame() -> Vec<u8> {
        let payload = vec![7u8; 2 * PAGE_SIZE];
        Header::new(Command::Pages)
            .with_range(10, 3)
            .with_request(42)
            .encode_frame(&payload)
    }

    #[test]
    fn a_pages_frame_round_trips() {
        let f = pages_frame();
        let (h, payload, used) = decode_frame(&f).unwrap();
        assert_eq!(used, f.len());
        assert_eq!(h.command, Command::Pages);
        assert_eq!(h.request_id, 42);
        assert_eq!(h.range(), 10..13);
        assert_eq!(payload.len(), 2 * PAGE_SIZE);
    }

    #[test]
    fn every_header_bit_flip_is_refused() {
        let f = pages_frame();
        for byte in 0..HEADER_LEN {
            for bit in 0..8 {
                let mut g = f.clone();
                g[byte] ^= 1 << bit;
                assert!(
                    decode_frame(&g).is_err(),
                    "flip of bit {bit} in byte {byte} accepted"
                );
            }
        }
    }

    #[test]
    fn payload_corruption_is_a_crc_mismatch() {
        let mut f = pages_frame();
        f[HEADER_LEN + 100] ^= 1;
        assert!(matches!(
            decode_frame(&f),
            Err(FrameError::CrcMismatch { .. })
        ));
    }

    #[test]
    fn limits_are_enforced_with_value_and_limit() {
        let mut h = Header::new(Command::ReadPages).with_range(0, MAX_BATCH_PAGES + 1);
        let f = h.encode_frame(&[]);
        match decode_frame(&f) {
            Err(FrameError::Oversized {
                field,
                value,
                limit,
                ..
            }) => {
                assert_eq!(field, "page_count");
                assert_eq!(value, u64::from(MAX_BATCH_PAGES) + 1);
                assert_eq!(limit, u64::from(MAX_BATCH_PAGES));
            }
            other => panic!("{other:?}"),
        }
        h.page_count = 0;
        let err = decode_frame(&h.encode_frame(&[])).unwrap_err();
        assert!(err.to_string().contains("page count 0"), "{err}");
    }

    #[test]
    fn handshake_payloads_round_trip() {
        let hello = Hello {
            min_version: 1,
            max_version: 3,
            role: Role::Bulk,
            client_nonce: [9; NONCE_LEN],
            image_id: "default/web".into(),
        };
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        let ch = Challenge {
            version: 1,
            server_nonce: [1; NONCE_LEN],
            server_proof: [2; MAC_LEN],
        };
        assert_eq!(Challenge::decode(&ch.encode()).unwrap(), ch);
        let acc = Accept {
            pages: 10,
            nonzero_pages: 3,
        };
        assert_eq!(Accept::decode(&acc.encode()).unwrap(), acc);
        let r = Reason::new(ReasonCode::NotHeld, "x".repeat(2000));
        let back = Reason::decode(Command::Error, &r.encode()).unwrap();
        assert_eq!(back.code, ReasonCode::NotHeld);
        assert_eq!(back.text.len(), MAX_REASON_LEN);
    }

    #[test]
    fn hello_with_bad_image_id_or_role_is_refused() {
        let mut hello = Hello {
            min_version: 1,
            max_version: 1,
            role: Role::Fault,
            client_nonce: [0; NONCE_LEN],
            image_id: "a b".into(),
        };
        assert!(Hello::decode(&hello.encode()).is_err());
        hello.image_id = "ok".into();
        let mut p = hello.encode();
        p[4] = 9;
        assert!(
            Hello::decode(&p)
                .unwrap_err()
                .to_string()
                .contains("unknown role 9")
        );
    }

    #[test]
    fn index_frames_must_be_aligned_and_sized() {
        let f = Header::new(Command::IndexRequest)
            .with_range(3, 64)
            .encode_frame(&[]);
        assert!(
            decode_frame(&f)
                .unwrap_err()
                .to_string()
                .contains("multiple of 64")
        );
        let f = Header::new(Command::Index)
            .with_range(0, 65)
            .encode_frame(&[0; 8]);
        assert!(
            decode_frame(&f)
                .unwrap_err()
                .to_string()
                .contains("expected 16")
        );
    }
}
