//! The state file `state.bin`: a fixed 64-byte header (magic, format version,
//! memory size, vCPU count, page size, payload length, CRC32) followed by an
//! opaque payload (the machine's serialized vCPU and device state). Written
//! atomically (temporary file, fsync, rename, fsync of the directory).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::error::ImageOpenError;
use super::preamble::{Preamble, u32_at, u64_at};
use super::version::{FORMAT_VERSION, FormatVersion};
use crate::memory::PAGE_SIZE;

/// File name of the state file inside an image directory.
pub const STATE_FILE: &str = "state.bin";
/// Magic bytes at offset 0 of the state file.
pub const STATE_MAGIC: [u8; 8] = *b"VMSTRIMG";
/// Length of the fixed header; the payload starts here.
pub const STATE_HEADER_LEN: usize = 64;
/// Offset of the CRC32 field (covers bytes `0..CRC_OFFSET` and the payload).
const CRC_OFFSET: usize = 60;

/// What a state file holds besides its framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateContents {
    /// Guest memory size in bytes (a multiple of the page size).
    pub memory_size: u64,
    /// Number of vCPUs of the captured VM.
    pub vcpu_count: u32,
    /// Opaque machine state (produced and parsed by the VMM).
    pub payload: Vec<u8>,
}

/// The state file of a live image: see [`StateFile::write`] and
/// [`StateFile::read`].
#[derive(Debug)]
pub struct StateFile;

/// Why writing a state file failed.
#[derive(Debug, thiserror::Error)]
pub enum StateWriteError {
    #[error("memory size {0} is not a positive multiple of the page size {PAGE_SIZE}")]
    BadMemorySize(u64),
    #[error("cannot write state file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StateFile {
    /// Writes `dir/state.bin` atomically: a temporary file in `dir` is
    /// written, fsynced and renamed over the final name, then `dir` is
    /// fsynced. A reader never sees a partial file.
    pub fn write(dir: &Path, contents: &StateContents) -> Result<(), StateWriteError> {
        if contents.memory_size == 0 || !contents.memory_size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(StateWriteError::BadMemorySize(contents.memory_size));
        }
        let bytes = encode(contents, FORMAT_VERSION);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp-{}", std::process::id()));
        let path = dir.join(STATE_FILE);
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateWriteError::Io { path, source }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        file.write_all(&bytes).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
        Ok(())
    }

    /// Reads and validates `dir/state.bin`: magic, version (same major, minor
    /// no newer than this build's), header length, page size, exact length
    /// and CRC32.
    pub fn read(dir: &Path) -> Result<StateContents, ImageOpenError> {
        let path = dir.join(STATE_FILE);
        let bytes = fs::read(&path).map_err(|e| ImageOpenError::from_io(path.clone(), e))?;
        decode(&path, &bytes, FORMAT_VERSION)
    }
}

/// Encodes a state file with the given version (tests write other versions).
pub(crate) fn encode(contents: &StateContents, version: FormatVersion) -> Vec<u8> {
    let mut out = Vec::with_capacity(STATE_HEADER_LEN + contents.payload.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&version.major.to_le_bytes());
    out.extend_from_slice(&version.minor.to_le_bytes());
    out.extend_from_slice(&version.patch.to_le_bytes());
    out.extend_from_slice(&(STATE_HEADER_LEN as u16).to_le_bytes());
    out.extend_from_slice(&contents.memory_size.to_le_bytes());
    out.extend_from_slice(&contents.vcpu_count.to_le_bytes());
    out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(contents.payload.len() as u64).to_le_bytes());
    out.resize(CRC_OFFSET, 0);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out);
    crc.update(&contents.payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&contents.payload);
    out
}

/// Validates and decodes the bytes of a state file. Checks run in the order
/// that keeps every message meaningful: length of the fixed header, magic,
/// version (its position never changes), header length, full length, CRC,
/// then the semantic fields.
pub(crate) fn decode(
    path: &Path,
    bytes: &[u8],
    supported: FormatVersion,
) -> Result<StateContents, ImageOpenError> {
    Preamble {
        magic: &STATE_MAGIC,
        magic_name: "VMSTRIMG",
        header_len: STATE_HEADER_LEN,
        supported,
    }
    .check(path, bytes)?;
    let path = || path.to_path_buf();
    let file_len = bytes.len() as u64;
    let payload_len = u64_at(bytes, 32);
    let payload_end = (STATE_HEADER_LEN as u64).saturating_add(payload_len);
    if file_len < payload_end {
        return Err(ImageOpenError::Truncated {
            path: path(),
            offset: STATE_HEADER_LEN as u64,
            expected: payload_len,
            file_len,
        });
    }
    if file_len > payload_end {
        return Err(ImageOpenError::TrailingBytes {
            path: path(),
            offset: payload_end,
            extra: file_len - payload_end,
        });
    }
    let payload = &bytes[STATE_HEADER_LEN..];
    let stored = u32_at(bytes, CRC_OFFSET);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[..CRC_OFFSET]);
    crc.update(payload);
    let computed = crc.finalize();
    if stored != computed {
        return Err(ImageOpenError::CrcMismatch {
            path: path(),
            stored,
            computed,
        });
    }
    let page_size = u32_at(bytes, 28) as u64;
    if page_size != PAGE_SIZE as u64 {
        return Err(ImageOpenError::UnsupportedPageSize {
            path: path(),
            found: page_size,
            expected: PAGE_SIZE as u64,
        });
    }
    Ok(StateContents {
        memory_size: u64_at(bytes, 16),
        vcpu_count: u32_at(bytes, 24),
        payload: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateContents {
        StateContents {
            memory_size: 64 << 20,
            vcpu_count: 2,
            payload: b"{\"regs\":[1,2,3]}".to_vec(),
        }
    }

    fn p() -> &'static Path {
        Path::new("img/state.bin")
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample(), FORMAT_VERSION);
        assert_eq!(bytes.len(), STATE_HEADER_LEN + sample().payload.len());
        assert_eq!(decode(p(), &bytes, FORMAT_VERSION).unwrap(), sample());
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let bytes = encode(&sample(), FORMAT_VERSION);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(
                decode(p(), &b, FORMAT_VERSION).is_err(),
                "flip at byte {i} not detected"
            );
        }
    }

    #[test]
    fn truncation_names_offset_and_expected_length() {
        let bytes = encode(&sample(), FORMAT_VERSION);
        match decode(p(), &bytes[..10], FORMAT_VERSION) {
            Err(ImageOpenError::Truncated {
                offset: 0,
                expected: 64,
                file_len: 10,
                ..
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
        let n = bytes.len() - 1;
        match decode(p(), &bytes[..n], FORMAT_VERSION) {
            Err(ImageOpenError::Truncated {
                offset: 64,
                expected,
                ..
            }) => assert_eq!(expected, sample().payload.len() as u64),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn versions_are_checked_before_crc() {
        let newer_major = FormatVersion {
            major: FORMAT_VERSION.major + 1,
            minor: 0,
            patch: 0,
        };
        let bytes = encode(&sample(), newer_major);
        let err = decode(p(), &bytes, FORMAT_VERSION).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageOpenError::UnsupportedVersion { .. }));
        assert!(
            msg.contains(&newer_major.to_string()) && msg.contains(&FORMAT_VERSION.to_string())
        );
    }

    #[test]
    fn older_minor_is_read_by_newer_reader() {
        let bytes = encode(&sample(), FORMAT_VERSION);
        let newer_reader = FormatVersion {
            minor: FORMAT_VERSION.minor + 1,
            ..FORMAT_VERSION
        };
        assert_eq!(decode(p(), &bytes, newer_reader).unwrap(), sample());
    }
}
