//! Frames over a byte stream: reading one frame (header first, so a bad or
//! oversized header is refused before anything is allocated or read), reading
//! a payload straight into caller-chosen buffers (the node cache's pages),
//! and writing a header plus payload parts with vectored writes (no copy).

use std::io::{self, IoSlice, IoSliceMut, Read, Write};

use crate::wire::{FrameError, HEADER_LEN, Header};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadFrameError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("reading a frame failed")]
    Io(#[source] io::Error),
    #[error("refused frame: {0}")]
    Frame(#[from] FrameError),
}

/// Reads and decodes a header. A connection closed before the first byte
/// is [`ReadFrameError::Closed`]; closed mid-header is an I/O error.
pub fn read_header(r: &mut impl Read) -> Result<(Header, [u8; HEADER_LEN]), ReadFrameError> {
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
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Header, ReadFrameError> {
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

/// Writes `header` (its length and CRC computed over `parts`) and the parts.
pub fn write_frame(w: &mut impl Write, header: &Header, parts: &[&[u8]]) -> io::Result<()> {
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
    use crate::wire::Command;

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
