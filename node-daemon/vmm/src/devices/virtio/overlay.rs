//! A raw disk image seen through a per-clone copy-on-write overlay. The
//! image file is opened read-only and never written. Writes go to the
//! overlay, a sparse file of the image's size, and mark their 4 KiB blocks
//! in a bitmap kept in memory (and in the device's saved state); reads take
//! written blocks from the overlay and the rest from the image. A write that
//! covers part of a block not yet written first copies that block from the
//! image, so the overlay always holds whole blocks.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Granularity of the overlay bitmap.
pub const OVERLAY_BLOCK: u64 = 4096;

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskOpenError {
    #[error("disk image {path} cannot be opened read-only")]
    Image {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is {len} bytes, not a positive multiple of 512")]
    ImageSize { path: PathBuf, len: u64 },
    #[error("overlay {path} cannot be created or opened")]
    Overlay {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("overlay {path} is {actual} bytes, the image is {expected}")]
    OverlaySize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("saved overlay state is for a {saved}-byte image, {path} is {actual} bytes")]
    StateSize {
        path: PathBuf,
        saved: u64,
        actual: u64,
    },
    #[error("saved overlay state names blocks {start}+{count}, beyond the image's {blocks} blocks")]
    StateRun { start: u64, count: u64, blocks: u64 },
}

/// The overlay's saved state: which blocks the overlay file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayState {
    /// Size of the image (and overlay) in bytes.
    pub len: u64,
    /// Written blocks as runs `[first block, count]`, ascending.
    pub written: Vec<[u64; 2]>,
}

/// An image with its copy-on-write overlay.
#[derive(Debug)]
pub struct CowDisk {
    image: File,
    overlay: File,
    len: u64,
    written: Vec<u64>,
}

impl CowDisk {
    /// Opens `image` read-only and creates (or truncates) `overlay` as an
    /// empty sparse file of the same size.
    pub fn create(image: &Path, overlay: &Path) -> Result<Self, DiskOpenError> {
        let (image_file, len) = open_image(image)?;
        let overlay_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(overlay)
            .and_then(|f| f.set_len(len).map(|()| f))
            .map_err(|source| DiskOpenError::Overlay {
                path: overlay.to_path_buf(),
                source,
            })?;
        Ok(Self::assemble(image_file, overlay_file, len))
    }

    /// Opens `image` read-only with no overlay: writes fail (a read-only
    /// disk never calls [`Self::write_at`]).
    pub fn create_read_only(image: &Path) -> Result<Self, DiskOpenError> {
        let (image_file, len) = open_image(image)?;
        // The image doubles as the "overlay" handle; it is opened read-only,
        // so even a stray write would fail with EBADF.
        let overlay = image_file
            .try_clone()
            .map_err(|source| DiskOpenError::Image {
                path: image.to_path_buf(),
                source,
            })?;
        Ok(Self::assemble(image_file, overlay, len))
    }

    /// Opens `image` read-only and the existing `overlay` whose written
    /// blocks `state` names (a restored clone's own copy of the overlay).
    pub fn restore(
        image: &Path,
        overlay: &Path,
        state: &OverlayState,
    ) -> Result<Self, DiskOpenError> {
        let (image_file, len) = open_image(image)?;
        if state.len != len {
            return Err(DiskOpenError::StateSize {
                path: image.to_path_buf(),
                saved: state.len,
                actual: len,
            });
        }
        let overlay_err = |source| DiskOpenError::Overlay {
            path: overlay.to_path_buf(),
            source,
        };
        let overlay_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(overlay)
            .map_err(overlay_err)?;
        let actual = overlay_file.metadata().map_err(overlay_err)?.len();
        if actual != len {
            return Err(DiskOpenError::OverlaySize {
                path: overlay.to_path_buf(),
                actual,
                expected: len,
            });
        }
        let mut disk = Self::assemble(image_file, overlay_file, len);
        let blocks = disk.blocks();
        for &[start, count] in &state.written {
            if start.checked_add(count).is_none_or(|end| end > blocks) {
                return Err(DiskOpenError::StateRun {
                    start,
                    count,
                    blocks,
                });
            }
            (start..start + count).for_each(|b| disk.mark(b));
        }
        Ok(disk)
    }

    fn assemble(image: File, overlay: File, len: u64) -> Self {
        let blocks = len.div_ceil(OVERLAY_BLOCK);
        Self {
            image,
            overlay,
            len,
            written: vec![0; blocks.div_ceil(64) as usize],
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never true: empty images are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn blocks(&self) -> u64 {
        self.len.div_ceil(OVERLAY_BLOCK)
    }

    /// Whether block `block` is in the overlay.
    pub fn is_written(&self, block: u64) -> bool {
        self.written[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn mark(&mut self, block: u64) {
        self.written[(block / 64) as usize] |= 1 << (block % 64);
    }

    /// Number of blocks in the overlay.
    pub fn written_blocks(&self) -> u64 {
        self.written.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Reads `buf.len()` bytes at `offset` (which the caller checked against
    /// [`Self::len`]).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let from_overlay = self.is_written(pos / OVERLAY_BLOCK);
            // Extend over following blocks with the same source.
            let mut end = (pos / OVERLAY_BLOCK + 1) * OVERLAY_BLOCK;
            let want_end = offset + buf.len() as u64;
            while end < want_end && self.is_written(end / OVERLAY_BLOCK) == from_overlay {
                end += OVERLAY_BLOCK;
            }
            let n = (end.min(want_end) - pos) as usize;
            let file = if from_overlay {
                &self.overlay
            } else {
                &self.image
            };
            file.read_exact_at(&mut buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset` into the overlay (checked by the caller
    /// against [`Self::len`]).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let first = offset / OVERLAY_BLOCK;
        let last = (end - 1) / OVERLAY_BLOCK;
        // Blocks only partly covered are copied up from the image first.
        for block in [first, last] {
            let start = block * OVERLAY_BLOCK;
            let covered = offset <= start && end >= (start + OVERLAY_BLOCK).min(self.len);
            if !covered && !self.is_written(block) {
                self.copy_up(block)?;
            }
        }
        self.overlay.write_all_at(buf, offset)?;
        (first..=last).for_each(|b| self.mark(b));
        Ok(())
    }

    fn copy_up(&mut self, block: u64) -> io::Result<()> {
        let start = block * OVERLAY_BLOCK;
        let n = OVERLAY_BLOCK.min(self.len - start) as usize;
        let mut data = vec![0u8; n];
        self.image.read_exact_at(&mut data, start)?;
        self.overlay.write_all_at(&data, start)?;
        self.mark(block);
        Ok(())
    }

    /// Makes the overlay's data durable (a FLUSH request).
    pub fn flush(&self) -> io::Result<()> {
        self.overlay.sync_data()
    }

    /// The bitmap as runs, for the saved state.
    pub fn state(&self) -> OverlayState {
        let mut written: Vec<[u64; 2]> = Vec::new();
        for block in 0..self.blocks() {
            if !self.is_written(block) {
                continue;
            }
            match written.last_mut() {
                Some([start, count]) if *start + *count == block => *count += 1,
                _ => written.push([block, 1]),
            }
        }
        OverlayState {
            len: self.len,
            written,
        }
    }
}

fn open_image(path: &Path) -> Result<(File, u64), DiskOpenError> {
    let image_err = |source| DiskOpenError::Image {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(image_err)?;
    let len = file.metadata().map_err(image_err)?.len();
    if len == 0 || !len.is_multiple_of(512) {
        return Err(DiskOpenError::ImageSize {
            path: path.to_path_buf(),
            len,
        });
    }
    Ok((file, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path, len: usize) -> (PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let path = dir.join("image.raw");
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    #[test]
    fn writes_land_in_the_overlay_and_reads_merge_both() {
        let dir = tempfile::tempdir().unwrap();
        let (img, original) = image(dir.path(), 5 * 4096 + 1024);
        let mut expect = original.clone();
        let overlay = dir.path().join("overlay");
        let mut disk = CowDisk::create(&img, &overlay).unwrap();
        // Part of block 1, all of block 3, part of the short last block 5.
        for (offset, len, byte) in [
            (4096 + 512, 1024, 0xaa),
            (3 * 4096, 4096, 0xbb),
            (5 * 4096 + 512, 512, 0xcc),
        ] {
            disk.write_at(offset, &vec![byte; len]).unwrap();
            expect[offset as usize..offset as usize + len].fill(byte);
        }
        let mut all = vec![0u8; expect.len()];
        disk.read_at(0, &mut all).unwrap();
        assert_eq!(all, expect);
        let state = disk.state();
        assert_eq!(state.written, vec![[1, 1], [3, 1], [5, 1]]);
        assert_eq!(std::fs::read(&img).unwrap(), original, "image untouched");
        drop(disk);
        let disk = CowDisk::restore(&img, &overlay, &state).unwrap();
        disk.read_at(0, &mut all).unwrap();
        assert_eq!(all, expect, "restored overlay reads the same");
        assert_eq!(disk.written_blocks(), 3);
    }

    #[test]
    fn bad_images_and_states_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = image(dir.path(), 1000);
        let overlay = dir.path().join("overlay");
        assert!(matches!(
            CowDisk::create(&img, &overlay),
            Err(DiskOpenError::ImageSize { len: 1000, .. })
        ));
        let (img, _) = image(dir.path(), 8192);
        CowDisk::create(&img, &overlay).unwrap();
        let state = OverlayState {
            len: 8192,
            written: vec![[1, 2]],
        };
        assert!(matches!(
            CowDisk::restore(&img, &overlay, &state),
            Err(DiskOpenError::StateRun { .. })
        ));
    }
}
