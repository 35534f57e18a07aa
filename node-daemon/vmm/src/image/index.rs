//! The page index `pages.idx`: a 48-byte header (magic, format version, page
//! size, page count, count of present pages, CRC32) followed by a bitmap of
//! the pages that are present (non-zero) in `memory.pages`.
//!
//! Encoding writes into a caller-provided buffer without allocating, because
//! it runs inside a forked child of a multithreaded process.

use std::path::Path;

use super::bitmap::Bitmap;
use super::error::ImageOpenError;
use super::preamble::{Preamble, u32_at, u64_at};
use super::version::{FORMAT_VERSION, FormatVersion};
use crate::memory::PAGE_SIZE;

/// File name of the page index inside an image directory.
pub const INDEX_FILE: &str = "pages.idx";
/// Magic bytes at offset 0 of the page index.
pub const INDEX_MAGIC: [u8; 8] = *b"VMSTPIDX";
/// Length of the index header; the bitmap starts here.
pub const INDEX_HEADER_LEN: usize = 48;
/// Offset of the CRC32 field (covers bytes `0..CRC_OFFSET` and the bitmap).
const CRC_OFFSET: usize = 44;

/// Total index file length for `pages` pages.
pub(crate) fn index_len(pages: usize) -> usize {
    INDEX_HEADER_LEN + pages.div_ceil(64) * 8
}

/// Encodes an index into `out` (exactly [`index_len`] bytes) from bitmap
/// words. Does not allocate.
pub(crate) fn encode_into(
    out: &mut [u8],
    pages: u64,
    words: &[u64],
    present: u64,
    version: FormatVersion,
) {
    assert_eq!(out.len(), index_len(pages as usize));
    out[..INDEX_HEADER_LEN].fill(0);
    out[0..8].copy_from_slice(&INDEX_MAGIC);
    out[8..10].copy_from_slice(&version.major.to_le_bytes());
    out[10..12].copy_from_slice(&version.minor.to_le_bytes());
    out[12..14].copy_from_slice(&version.patch.to_le_bytes());
    out[14..16].copy_from_slice(&(INDEX_HEADER_LEN as u16).to_le_bytes());
    out[16..20].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    out[24..32].copy_from_slice(&pages.to_le_bytes());
    out[32..40].copy_from_slice(&present.to_le_bytes());
    for (chunk, w) in out[INDEX_HEADER_LEN..].chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[..CRC_OFFSET]);
    crc.update(&out[INDEX_HEADER_LEN..]);
    let crc = crc.finalize();
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

/// A decoded, validated page index.
#[derive(Debug)]
pub(crate) struct PageIndex {
    pub pages: u64,
    pub present: Bitmap,
    pub present_count: u64,
}

/// Validates and decodes the bytes of a page index.
pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<PageIndex, ImageOpenError> {
    let p = || path.to_path_buf();
    let corrupt = |reason: String| ImageOpenError::IndexCorrupt {
        path: path.to_path_buf(),
        reason,
    };
    let file_len = bytes.len() as u64;
    Preamble {
        magic: &INDEX_MAGIC,
        magic_name: "VMSTPIDX",
        header_len: INDEX_HEADER_LEN,
        supported: FORMAT_VERSION,
    }
    .check(path, bytes)?;
    let pages = u64_at(bytes, 24);
    let bitmap_len = pages.div_ceil(64).saturating_mul(8);
    let end = (INDEX_HEADER_LEN as u64).saturating_add(bitmap_len);
    if file_len < end {
        return Err(ImageOpenError::Truncated {
            path: p(),
            offset: INDEX_HEADER_LEN as u64,
            expected: bitmap_len,
            file_len,
        });
    }
    if file_len > end {
        return Err(ImageOpenError::TrailingBytes {
            path: p(),
            offset: end,
            extra: file_len - end,
        });
    }
    let stored = u32_at(bytes, CRC_OFFSET);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[..CRC_OFFSET]);
    crc.update(&bytes[INDEX_HEADER_LEN..]);
    let computed = crc.finalize();
    if stored != computed {
        return Err(ImageOpenError::CrcMismatch {
            path: p(),
            stored,
            computed,
        });
    }
    let page_size = u32_at(bytes, 16) as u64;
    if page_size != PAGE_SIZE as u64 {
        return Err(ImageOpenError::UnsupportedPageSize {
            path: p(),
            found: page_size,
            expected: PAGE_SIZE as u64,
        });
    }
    if pages == 0 {
        return Err(corrupt("it describes zero pages".into()));
    }
    let words: Vec<u64> = bytes[INDEX_HEADER_LEN..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let present = Bitmap::from_words(pages as usize, &words)
        .ok_or_else(|| corrupt(format!("bits set past the last page {}", pages - 1)))?;
    let present_count = u64_at(bytes, 32);
    let counted = present.count_ones() as u64;
    if counted != present_count {
        return Err(corrupt(format!(
            "header counts {present_count} present pages, bitmap has {counted}"
        )));
    }
    Ok(PageIndex {
        pages,
        present,
        present_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(pages: u64, words: &[u64]) -> Vec<u8> {
        let mut buf = vec![0; index_len(pages as usize)];
        let present = words.iter().map(|w| w.count_ones() as u64).sum();
        encode_into(&mut buf, pages, words, present, FORMAT_VERSION);
        buf
    }

    #[test]
    fn round_trip() {
        let buf = encoded(100, &[0b1011, 1 << 35]);
        let idx = decode(Path::new("pages.idx"), &buf).unwrap();
        assert_eq!(idx.pages, 100);
        assert_eq!(idx.present_count, 4);
        assert!(idx.present.get(0) && idx.present.get(99) && !idx.present.get(2));
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let buf = encoded(100, &[0b1011, 1 << 35]);
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x10;
            assert!(
                decode(Path::new("x"), &b).is_err(),
                "flip at {i} undetected"
            );
        }
    }

    #[test]
    fn bits_past_end_are_corrupt_even_with_a_valid_crc() {
        let buf = encoded(65, &[0, 0b10]);
        match decode(Path::new("x"), &buf) {
            Err(ImageOpenError::IndexCorrupt { reason, .. }) => {
                assert!(reason.contains("past the last page"))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wrong_present_count_is_corrupt() {
        let mut buf = vec![0; index_len(64)];
        encode_into(&mut buf, 64, &[0b111], 2, FORMAT_VERSION);
        assert!(matches!(
            decode(Path::new("x"), &buf),
            Err(ImageOpenError::IndexCorrupt { .. })
        ));
    }
}
