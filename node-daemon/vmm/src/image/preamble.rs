//! The preamble every live-image file starts with — 8-byte magic, format
//! version (major, minor, patch as little-endian u16) and header length (u16
//! at offset 14) — and its checks, shared by the state file and the page
//! index so both refuse bad files with the same errors in the same order:
//! too short for the header, wrong magic, unreadable version, wrong header
//! length. Also the little-endian field readers both decoders use.

use std::path::Path;

use super::error::{ImageOpenError, describe_magic};
use super::version::FormatVersion;

/// What a file's preamble must say.
pub(crate) struct Preamble<'a> {
    pub magic: &'a [u8; 8],
    /// The magic as text, for error messages.
    pub magic_name: &'static str,
    pub header_len: usize,
    pub supported: FormatVersion,
}

impl Preamble<'_> {
    /// Checks the preamble of `bytes` (read from `path`); returns the file's version.
    pub fn check(&self, path: &Path, bytes: &[u8]) -> Result<FormatVersion, ImageOpenError> {
        if bytes.len() < self.header_len {
            return Err(ImageOpenError::Truncated {
                path: path.to_path_buf(),
                offset: 0,
                expected: self.header_len as u64,
                file_len: bytes.len() as u64,
            });
        }
        if bytes[..8] != self.magic[..] {
            return Err(ImageOpenError::BadMagic {
                path: path.to_path_buf(),
                found: describe_magic(&bytes[..8]),
                expected: self.magic_name,
            });
        }
        let found = FormatVersion {
            major: u16_at(bytes, 8),
            minor: u16_at(bytes, 10),
            patch: u16_at(bytes, 12),
        };
        if !found.is_readable_by(self.supported) {
            return Err(ImageOpenError::UnsupportedVersion {
                path: path.to_path_buf(),
                found,
                supported: self.supported,
            });
        }
        let header_len = u64::from(u16_at(bytes, 14));
        if header_len != self.header_len as u64 {
            return Err(ImageOpenError::BadHeaderLength {
                path: path.to_path_buf(),
                found: header_len,
                expected: self.header_len as u64,
            });
        }
        Ok(found)
    }
}

/// Little-endian u16 at `off` (the caller has checked the length).
pub(crate) fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}

/// Little-endian u32 at `off` (the caller has checked the length).
pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// Little-endian u64 at `off` (the caller has checked the length).
pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
