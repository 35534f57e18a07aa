//! virtio-blk (ID 2) over a raw image with a per-clone copy-on-write
//! overlay (`overlay.rs`): requests IN, OUT, FLUSH and GET_ID, features
//! FLUSH and SEG_MAX (and RO for a disk without overlay), configuration
//! space = capacity in 512-byte sectors and seg_max. Requests complete
//! synchronously inside `process_queue`, so none is in flight when the
//! state is saved.
//!
//! A chain that cannot be a block request (header shorter than 16 bytes, no
//! status byte, IN data in device-readable buffers, OUT data in
//! device-writable ones) breaks the device. A well-formed request it cannot
//! serve gets IOERR (sectors beyond the capacity, a length that is not a
//! multiple of 512, a write to a read-only disk, a failed host I/O) or
//! UNSUPP (an unknown type).

use std::path::Path;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::chain::{Buffer, Chain};
use super::device::{QueueAccess, VirtioDevice};
use super::errors::RequestError;
use super::overlay::{CowDisk, DiskOpenError, OverlayState};

/// Queue size offered.
pub const BLK_QUEUE_SIZE: u16 = 256;
/// Sector size of the virtio-blk interface.
pub const SECTOR: u64 = 512;
/// Size of the request header (type, reserved, sector).
const HEADER: u64 = 16;
/// Bytes moved per host read or write.
const CHUNK: usize = 128 << 10;

/// Saved state of a block device. The overlay file itself must travel with
/// it: a clone restores from its own copy of the overlay as it was at save
/// time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Blocks the overlay holds (empty for a read-only disk).
    pub overlay: OverlayState,
    pub read_only: bool,
    /// Requests served (with any status).
    pub requests: u64,
}

/// Where a block device's data lives.
#[derive(Debug)]
enum Backing {
    /// Read-only: the image alone.
    ReadOnly(CowDisk),
    /// Writable through the overlay.
    Overlay(CowDisk),
}

/// The block device.
#[derive(Debug)]
pub struct Block {
    name: String,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    backing: Backing,
    requests: u64,
    buf: Vec<u8>,
}

impl Block {
    /// A disk named `name` (also its GET_ID serial, first 20 bytes) over the
    /// raw `image`. With `overlay`, guest writes go to that file (created or
    /// truncated); without, the disk is read-only (feature RO).
    pub fn open(name: &str, image: &Path, overlay: Option<&Path>) -> Result<Self, DiskOpenError> {
        let backing = match overlay {
            Some(overlay) => Backing::Overlay(CowDisk::create(image, overlay)?),
            None => Backing::ReadOnly(CowDisk::create_read_only(image)?),
        };
        Ok(Self::with_backing(name, backing, 0))
    }

    /// A disk continuing from `state`: `overlay` is this clone's copy of the
    /// overlay file saved with it.
    pub fn restore(
        name: &str,
        image: &Path,
        overlay: Option<&Path>,
        state: &BlockState,
    ) -> Result<Self, DiskOpenError> {
        let backing = match (overlay, state.read_only) {
            (Some(overlay), false) => {
                Backing::Overlay(CowDisk::restore(image, overlay, &state.overlay)?)
            }
            _ => Backing::ReadOnly(CowDisk::create_read_only(image)?),
        };
        Ok(Self::with_backing(name, backing, state.requests))
    }

    fn with_backing(name: &str, backing: Backing, requests: u64) -> Self {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Self {
            name: format!("virtio-blk {name}"),
            id,
            backing,
            requests,
            buf: vec![0; CHUNK],
        }
    }

    fn disk(&self) -> &CowDisk {
        match &self.backing {
            Backing::ReadOnly(d) | Backing::Overlay(d) => d,
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk().len() / SECTOR
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        matches!(self.backing, Backing::ReadOnly(_))
    }

    /// Blocks the overlay holds (4 KiB each).
    pub fn written_blocks(&self) -> u64 {
        match &self.backing {
            Backing::ReadOnly(_) => 0,
            Backing::Overlay(d) => d.written_blocks(),
        }
    }

    /// Requests served so far (with any status).
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Serves one chain; returns the bytes written to the driver.
    fn serve(&mut self, queue: &mut QueueAccess<'_>, chain: &Chain) -> Result<u32, RequestError> {
        let head = chain.head;
        let readable = chain.readable_len();
        if readable < HEADER {
            return Err(RequestError::TooShort {
                head,
                what: "request header",
                len: readable,
                need: HEADER,
            });
        }
        let writable = chain.writable_len();
        if writable == 0 {
            return Err(RequestError::TooShort {
                head,
                what: "device-writable part (status byte)",
                len: 0,
                need: 1,
            });
        }
        let mut header = [0u8; HEADER as usize];
        chain.read_at(queue.mem(), 0, &mut header)?;
        let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let data_in = writable - 1;
        let data_out = readable - HEADER;
        let wrong = |request, b: Option<Buffer>, found, expected| {
            let b = b.expect("offset is inside the chain");
            RequestError::Direction {
                request,
                head,
                desc: b.desc,
                addr: b.addr,
                found,
                expected,
            }
        };
        let outcome = match kind {
            VIRTIO_BLK_T_IN if data_out > 0 => {
                return Err(wrong(
                    "blk IN",
                    chain.readable_at(HEADER),
                    "device-readable",
                    "device-writable",
                ));
            }
            VIRTIO_BLK_T_OUT if data_in > 0 => {
                return Err(wrong(
                    "blk OUT",
                    chain.writable_at(0),
                    "device-writable",
                    "device-readable",
                ));
            }
            VIRTIO_BLK_T_IN => self.read(queue, chain, sector, data_in).map(|()| data_in),
            VIRTIO_BLK_T_OUT => self.write(queue, chain, sector, data_out).map(|()| 0),
            VIRTIO_BLK_T_FLUSH => self.flush(head).map(|()| 0),
            VIRTIO_BLK_T_GET_ID => {
                let n = data_in.min(self.id.len() as u64) as usize;
                chain.write_at(queue.mem(), 0, &self.id[..n])?;
                Ok(n as u64)
            }
            _ => Err(RequestError::Unsupported { head, kind }),
        };
        let (status, written) = match outcome {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(error) if error.breaks_device() => return Err(error),
            Err(error) => {
                let status = match error {
                    RequestError::Unsupported { .. } => VIRTIO_BLK_S_UNSUPP,
                    _ => VIRTIO_BLK_S_IOERR,
                };
                queue.refuse(error);
                (status, 0)
            }
        };
        chain.write_at(queue.mem(), writable - 1, &[status as u8])?;
        self.requests += 1;
        // At most 4 GiB - 1: the chain was checked to hold no more.
        Ok((written + 1) as u32)
    }

    /// Checks that `len` bytes at `sector` are a whole number of sectors
    /// inside the disk; returns the byte offset.
    fn range(&self, head: u16, sector: u64, len: u64) -> Result<u64, RequestError> {
        if !len.is_multiple_of(SECTOR) {
            return Err(RequestError::DataLength { head, len });
        }
        let sectors = len / SECTOR;
        let capacity = self.capacity();
        match sector.checked_add(sectors) {
            Some(end) if end <= capacity => Ok(sector * SECTOR),
            _ => Err(RequestError::SectorRange {
                head,
                sector,
                sectors,
                capacity,
            }),
        }
    }

    fn read(
        &mut self,
        queue: &QueueAccess<'_>,
        chain: &Chain,
        sector: u64,
        len: u64,
    ) -> Result<(), RequestError> {
        let head = chain.head;
        let offset = self.range(head, sector, len)?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let disk = match &self.backing {
                Backing::ReadOnly(d) | Backing::Overlay(d) => d,
            };
            disk.read_at(offset + done, &mut self.buf[..n])
                .map_err(|source| RequestError::Io {
                    head,
                    op: "read",
                    source,
                })?;
            chain.write_at(queue.mem(), done, &self.buf[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    fn write(
        &mut self,
        queue: &QueueAccess<'_>,
        chain: &Chain,
        sector: u64,
        len: u64,
    ) -> Result<(), RequestError> {
        let head = chain.head;
        let offset = self.range(head, sector, len)?;
        let Backing::Overlay(disk) = &mut self.backing else {
            return Err(RequestError::ReadOnly { head });
        };
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            chain.read_at(queue.mem(), HEADER + done, &mut self.buf[..n])?;
            disk.write_at(offset + done, &self.buf[..n])
                .map_err(|source| RequestError::Io {
                    head,
                    op: "overlay write",
                    source,
                })?;
            done += n as u64;
        }
        Ok(())
    }

    fn flush(&self, head: u16) -> Result<(), RequestError> {
        match &self.backing {
            Backing::ReadOnly(_) => Ok(()),
            Backing::Overlay(disk) => disk.flush().map_err(|source| RequestError::Io {
                head,
                op: "overlay flush",
                source,
            }),
        }
    }
}

impl VirtioDevice for Block {
    type State = BlockState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn features(&self) -> u64 {
        let mut features = (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[BLK_QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (le64), size_max (le32, not offered), seg_max (le32).
        let mut config = [0u8; 16];
        config[0..8].copy_from_slice(&self.capacity().to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(BLK_QUEUE_SIZE - 2).to_le_bytes());
        copy_config(&config, offset, data);
    }

    fn process_queue(&mut self, queue: &mut QueueAccess<'_>) -> Result<(), RequestError> {
        while let Some(chain) = queue.next_chain()? {
            let written = self.serve(queue, &chain)?;
            queue.complete(chain.head, written)?;
        }
        Ok(())
    }

    fn save(&self) -> BlockState {
        BlockState {
            overlay: match &self.backing {
                Backing::ReadOnly(_) => OverlayState::default(),
                Backing::Overlay(d) => d.state(),
            },
            read_only: self.read_only(),
            requests: self.requests,
        }
    }
}

/// Copies the part of `config` at `offset` into `data` (the rest reads 0).
pub(super) fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset < config.len() {
        let n = (config.len() - offset).min(data.len());
        data[..n].copy_from_slice(&config[offset..offset + n]);
    }
}
