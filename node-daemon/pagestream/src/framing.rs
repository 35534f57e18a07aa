//! Page-streaming frames over a byte stream: the shared codec's stream I/O
//! ([`crate::frame`]) for this protocol's commands — a header is refused
//! before anything is allocated or read, payloads can be read straight into
//! caller-chosen buffers, and frames are written with vectored writes.

use std::io::Read;

use crate::frame::{self, HEADER_LEN};
pub use crate::frame::{read_exact_vectored, write_frame};
use crate::wire::{Command, Header};

/// Why a page-streaming frame could not be read.
pub type ReadFrameError = frame::ReadFrameError<Command>;

/// Reads and decodes a header. A connection closed before the first byte
/// is [`ReadFrameError::Closed`]; closed mid-header, a truncated frame.
pub fn read_header(r: &mut impl Read) -> Result<(Header, [u8; HEADER_LEN]), ReadFrameError> {
    frame::read_header(r)
}

/// Reads one whole frame; the payload lands in `buf` (resized to it).
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Header, ReadFrameError> {
    frame::read_frame(r, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FrameError;
    use std::io::IoSliceMut;

    #[test]
    fn frames_round_trip_through_a_stream() {
        let mut wire = Vec::new();
        let h = Header::new(Command::Pages).with_range(4, 2);
        write_frame(&mut wire, &h, &[&[1u8; 4096], &[2u8; 4096]]).unwrap();
        write_frame(
            &mut wire,
            &Header::new(Command::ReadPages).with_range(0, 1),
            &[],
        )
        .unwrap();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        let got = read_frame(&mut r, &mut buf).unwrap();
        assert_eq!(got.range(), 4..6);
        assert_eq!(buf[4096], 2);
        assert_eq!(
            read_frame(&mut r, &mut buf).unwrap().command,
            Command::ReadPages
        );
        assert!(matches!(
            read_frame(&mut r, &mut buf),
            Err(ReadFrameError::Closed)
        ));
    }

    #[test]
    fn a_stream_cut_mid_header_is_truncated() {
        let mut r: &[u8] = b"VMSP\x01\x00";
        assert!(matches!(
            read_frame(&mut r, &mut Vec::new()),
            Err(ReadFrameError::Frame(FrameError::Truncated {
                needed: 40,
                available: 6
            }))
        ));
    }

    #[test]
    fn vectored_reads_fill_every_slice() {
        let data: Vec<u8> = (0..100u8).collect();
        let (mut a, mut b) = ([0u8; 30], [0u8; 70]);
        let mut r = &data[..];
        read_exact_vectored(
            &mut r,
            &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)],
        )
        .unwrap();
        assert_eq!(a[29], 29);
        assert_eq!(b[69], 99);
    }
}
