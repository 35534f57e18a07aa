//! The migration protocol on the frame codec it shares with page streaming
//! (`vmstream_pagestream::frame`: 40-byte header, CRC, typed decode errors,
//! stream I/O): magic `"VMSM"`, version 1, its command set and limits, the
//! flags, the Hello payload and sparse bitmaps. Byte tables and the message
//! flow: `docs/MIGRATION.md`.
//!
//! In this protocol the header's `flags` are per command (`FLAG_*`) and
//! `request_id` carries the session id in Hello.

use std::io::Read;

use vmstream_pagestream::frame::{self, FrameCommand};
pub use vmstream_pagestream::frame::{HEADER_LEN, write_frame};
use vmstream_vmm::memory::PAGE_SIZE;

/// Magic bytes at offset 0 of every frame.
pub const MAGIC: [u8; 4] = *b"VMSM";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Most pages one Pages/Clean/Zero frame covers.
pub const MAX_BATCH_PAGES: u32 = 256;
/// Largest page-data payload.
pub const MAX_PAGES_PAYLOAD: u32 = MAX_BATCH_PAGES * PAGE_SIZE as u32;
/// Largest machine-state payload (JSON of a few vCPUs is ~20 KB each).
pub const MAX_STATE_PAYLOAD: u32 = 4 << 20;
/// Largest sparse-bitmap payload (pairs of u64: word index, word).
pub const MAX_BITMAP_PAYLOAD: u32 = 1 << 20;
/// Longest reason text.
pub const MAX_REASON_LEN: u32 = 1024;

/// Flag of Hello: this connection carries fault requests (else control+bulk).
pub const FLAG_FAULT_CONNECTION: u32 = 1;
/// Flag of Hello: reconnection of a session whose VM already switched over.
pub const FLAG_RESUME: u32 = 2;
/// Flag of Accept: the target's VM is running (it received Go).
pub const FLAG_TARGET_RUNNING: u32 = 4;
/// Flag of Pages: sent before the switch-over (may overwrite an older copy).
pub const FLAG_PRECOPY: u32 = 8;
/// Flag of Pages/Clean/Zero: the answer to a fault request.
pub const FLAG_FAULT_ANSWER: u32 = 16;
/// Flag of Candidates/Invalidate: the last frame of the set.
pub const FLAG_LAST: u32 = 32;

/// What a frame is. 0 is reserved as invalid so a zeroed header is never a
/// valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Source → target: session, machine shape, mode, source nonce.
    Hello = 1,
    /// Target → source: target nonce and its proof over the source nonce.
    Challenge = 2,
    /// Source → target: HMAC over the target nonce.
    Auth = 3,
    /// Target → source: ready; on resume, the pages it already resolved.
    Accept = 4,
    /// Either way: refused or aborted, with a reason; then close.
    Abort = 5,
    /// Page data of a range.
    Pages = 6,
    /// A range identical to the live image: the target takes it from there.
    Clean = 7,
    /// A range of zero pages (no image to take it from).
    Zero = 8,
    /// Source → target: pages the source will push (sparse bitmap); all
    /// others the target takes from the image.
    Candidates = 9,
    /// Source → target (hybrid): pages sent in precopy and written since;
    /// the target drops its copies.
    Invalidate = 10,
    /// Source → target: the paused VM's vCPU, VM-wide and device state.
    State = 11,
    /// Target → source: state restored, shell ready, waiting for Go.
    Ready = 12,
    /// Source → target: resume the VM (the commit point).
    Go = 13,
    /// Target → source: the VM runs on the target.
    Resumed = 14,
    /// Target → source on the fault connection: send this page now.
    FaultRequest = 15,
    /// Source → target: every candidate page has been sent.
    Done = 16,
    /// Target → source: every candidate page has arrived; release the VM.
    Complete = 17,
    /// Either way: liveness when idle.
    Ping = 18,
}

impl Command {
    /// Largest page range this command may name.
    fn max_pages(self) -> u32 {
        match self {
            Command::Pages | Command::Clean | Command::Zero => MAX_BATCH_PAGES,
            Command::FaultRequest => 1,
            _ => u32::MAX,
        }
    }
}

/// Length of the Hello payload.
pub const HELLO_LEN: usize = 8 + 4 + 4 + 8 + 32;

/// A migration frame header.
pub type Header = frame::Header<Command>;
/// Why bytes are not a valid migration frame.
pub type FrameError = frame::FrameError<Command>;
/// Why a migration frame could not be read.
pub type ReadFrameError = frame::ReadFrameError<Command>;

impl FrameCommand for Command {
    const MAGIC: [u8; 4] = MAGIC;
    const MIN_VERSION: u16 = VERSION;
    const MAX_VERSION: u16 = VERSION;

    /// The command with wire value `v`, if any.
    fn from_wire(v: u16) -> Option<Self> {
        use Command::*;
        Some(match v {
            1 => Hello,
            2 => Challenge,
            3 => Auth,
            4 => Accept,
            5 => Abort,
            6 => Pages,
            7 => Clean,
            8 => Zero,
            9 => Candidates,
            10 => Invalidate,
            11 => State,
            12 => Ready,
            13 => Go,
            14 => Resumed,
            15 => FaultRequest,
            16 => Done,
            17 => Complete,
            18 => Ping,
            _ => return None,
        })
    }

    /// Largest payload this command may carry.
    fn payload_limit(self) -> u32 {
        use Command::*;
        match self {
            Hello => HELLO_LEN as u32,
            Challenge => 64,
            Auth => 32,
            Accept => MAX_BITMAP_PAYLOAD,
            Abort => MAX_REASON_LEN,
            Pages => MAX_PAGES_PAYLOAD,
            Candidates | Invalidate => MAX_BITMAP_PAYLOAD,
            State => MAX_STATE_PAYLOAD,
            Resumed | Complete => 4096,
            Clean | Zero | Ready | Go | FaultRequest | Done | Ping => 0,
        }
    }

    fn to_wire(self) -> u16 {
        self as u16
    }

    /// The page count within the command's limit; a Pages payload is
    /// exactly its pages.
    fn check_header(header: &Header) -> Result<(), FrameError> {
        let command = header.command;
        header.check_page_count(command.max_pages())?;
        let page_bytes = u64::from(header.page_count) * PAGE_SIZE as u64;
        if command == Command::Pages && u64::from(header.payload_len) != page_bytes {
            return Err(FrameError::PayloadLength {
                command,
                len: header.payload_len,
                expected: page_bytes,
            });
        }
        Ok(())
    }
}

/// Reads one frame; the payload lands in `buf` (resized to it).
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Header, ReadFrameError> {
    frame::read_frame(r, buf)
}

/// The Hello payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub mode: u32,
    /// Identifies the live image both sides must hold (0: no image).
    pub image_fingerprint: u64,
    pub nonce: [u8; 32],
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..8].copy_from_slice(&self.memory_bytes.to_le_bytes());
        out[8..12].copy_from_slice(&self.vcpus.to_le_bytes());
        out[12..16].copy_from_slice(&self.mode.to_le_bytes());
        out[16..24].copy_from_slice(&self.image_fingerprint.to_le_bytes());
        out[24..56].copy_from_slice(&self.nonce);
        out
    }

    pub fn decode(payload: &[u8]) -> Option<Self> {
        if payload.len() != HELLO_LEN {
            return None;
        }
        Some(Self {
            memory_bytes: u64::from_le_bytes(payload[0..8].try_into().ok()?),
            vcpus: u32::from_le_bytes(payload[8..12].try_into().ok()?),
            mode: u32::from_le_bytes(payload[12..16].try_into().ok()?),
            image_fingerprint: u64::from_le_bytes(payload[16..24].try_into().ok()?),
            nonce: payload[24..56].try_into().ok()?,
        })
    }
}

/// Encodes the set bits of `words` (bit p = bit p%64 of word p/64) as
/// (word index, word) pairs of non-zero words, in frames of at most
/// [`MAX_BITMAP_PAYLOAD`] bytes.
pub fn sparse_bitmap_chunks(words: &[u64]) -> Vec<Vec<u8>> {
    let mut chunks = vec![Vec::new()];
    for (i, &w) in words.iter().enumerate() {
        if w == 0 {
            continue;
        }
        if chunks.last().expect("non-empty").len() + 16 > MAX_BITMAP_PAYLOAD as usize {
            chunks.push(Vec::new());
        }
        let chunk = chunks.last_mut().expect("non-empty");
        chunk.extend_from_slice(&(i as u64).to_le_bytes());
        chunk.extend_from_slice(&w.to_le_bytes());
    }
    chunks
}

/// Decodes a sparse-bitmap payload; `None` if malformed or a word index is
/// at or past `word_count`.
pub fn parse_sparse_bitmap(payload: &[u8], word_count: usize) -> Option<Vec<(usize, u64)>> {
    if !payload.len().is_multiple_of(16) {
        return None;
    }
    payload
        .chunks_exact(16)
        .map(|c| {
            let index = u64::from_le_bytes(c[0..8].try_into().ok()?) as usize;
            let word = u64::from_le_bytes(c[8..16].try_into().ok()?);
            (index < word_count).then_some((index, word))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        let page = vec![7u8; PAGE_SIZE];
        let h = Header::new(Command::Pages)
            .with_range(10, 2)
            .with_flags(FLAG_FAULT_ANSWER);
        write_frame(&mut wire, &h, &[&page, &page]).unwrap();
        write_frame(&mut wire, &Header::new(Command::Go), &[]).unwrap();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        let got = read_frame(&mut r, &mut buf).unwrap();
        assert_eq!((got.first_page, got.page_count), (10, 2));
        assert_eq!(got.flags, FLAG_FAULT_ANSWER);
        assert_eq!(buf.len(), 2 * PAGE_SIZE);
        assert_eq!(read_frame(&mut r, &mut buf).unwrap().command, Command::Go);
        assert!(matches!(
            read_frame(&mut r, &mut buf),
            Err(ReadFrameError::Closed)
        ));
    }

    #[test]
    fn bad_headers_are_refused_before_the_payload() {
        let good = Header::new(Command::Ping).encode_parts(&[]);
        let mut zero_cmd = good;
        zero_cmd[6] = 0;
        zero_cmd[7] = 0;
        assert!(matches!(
            Header::decode(&zero_cmd),
            Err(FrameError::UnknownCommand { value: 0 })
        ));
        let mut magic = good;
        magic[0] = b'X';
        assert!(matches!(
            Header::decode(&magic),
            Err(FrameError::BadMagic { .. })
        ));
        let mut version = good;
        version[4] = 9;
        assert!(matches!(
            Header::decode(&version),
            Err(FrameError::UnsupportedVersion { found: 9, .. })
        ));
        let mut big = Header::new(Command::Pages)
            .with_range(0, 1)
            .encode_parts(&[]);
        big[32..36].copy_from_slice(&(MAX_PAGES_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            Header::decode(&big),
            Err(FrameError::Oversized { .. })
        ));
        // Page count and payload length disagree.
        let short = Header::new(Command::Pages)
            .with_range(0, 2)
            .encode_parts(&[&[0u8; PAGE_SIZE]]);
        assert!(matches!(
            Header::decode(&short),
            Err(FrameError::PayloadLength { .. })
        ));
    }

    #[test]
    fn corrupted_payload_fails_the_crc() {
        let mut wire = Vec::new();
        write_frame(
            &mut wire,
            &Header::new(Command::Abort),
            &[b"link went away"],
        )
        .unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert!(matches!(
            read_frame(&mut &wire[..], &mut Vec::new()),
            Err(ReadFrameError::Frame(FrameError::CrcMismatch { .. }))
        ));
    }

    #[test]
    fn sparse_bitmaps_round_trip_and_reject_bad_indices() {
        let mut words = vec![0u64; 5000];
        words[3] = 0b101;
        words[4999] = 1 << 63;
        let chunks = sparse_bitmap_chunks(&words);
        assert_eq!(chunks.len(), 1);
        let pairs = parse_sparse_bitmap(&chunks[0], words.len()).unwrap();
        assert_eq!(pairs, vec![(3, 0b101), (4999, 1 << 63)]);
        assert!(parse_sparse_bitmap(&chunks[0], 4000).is_none());
        assert!(parse_sparse_bitmap(&chunks[0][..15], 5000).is_none());
        let dense = vec![u64::MAX; 200_000];
        let chunks = sparse_bitmap_chunks(&dense);
        assert!(
            chunks
                .iter()
                .all(|c| c.len() <= MAX_BITMAP_PAYLOAD as usize)
        );
        let total: usize = chunks.iter().map(|c| c.len() / 16).sum();
        assert_eq!(total, 200_000);
    }

    #[test]
    fn hello_round_trips() {
        let h = Hello {
            memory_bytes: 1 << 30,
            vcpus: 2,
            mode: 1,
            image_fingerprint: 77,
            nonce: [9; 32],
        };
        assert_eq!(Hello::decode(&h.encode()), Some(h));
        assert_eq!(Hello::decode(&[0; 10]), None);
    }
}
