//! The virtio devices a running machine has, kept typed (the MMIO bus only
//! sees them as windows) so the machine can save each one with its
//! placement, and capture can copy a disk's overlay file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::VirtioDevice;
use super::blk::Block;
use super::disk_files::BaseDiskError;
use super::mmio::VirtioMmio;
use super::net::Net;
use super::rng::Rng;
use super::saved::{
    DiskIdentity, SavedDisk, VirtioDeviceState, VirtioModelState, overlay_file_name,
};

/// A device of a running machine and where it sits.
#[derive(Debug)]
pub struct AttachedVirtio {
    /// Name in the machine (e.g. `blk1`).
    pub name: String,
    /// Guest-physical base of its window.
    pub base: u64,
    /// The GSI its irqfd raises.
    pub gsi: u32,
    pub model: AttachedModel,
}

/// The device, by kind.
#[derive(Debug)]
pub enum AttachedModel {
    Rng(Arc<Mutex<VirtioMmio<Rng>>>),
    Block {
        device: Arc<Mutex<VirtioMmio<Block>>>,
        disk: AttachedDisk,
    },
    Net {
        device: Arc<Mutex<VirtioMmio<Net>>>,
        tap: String,
    },
}

/// The files of a block device.
#[derive(Debug)]
pub struct AttachedDisk {
    pub image: PathBuf,
    pub overlay: Option<PathBuf>,
    /// The base image's identity, found once (hashing reads it whole).
    identity: OnceLock<DiskIdentity>,
}

impl AttachedDisk {
    /// A disk over `image` with an optional overlay file.
    pub fn new(image: PathBuf, overlay: Option<PathBuf>) -> Self {
        Self {
            image,
            overlay,
            identity: OnceLock::new(),
        }
    }

    /// The base image's identity (hashed on first use).
    pub fn identity(&self) -> Result<&DiskIdentity, BaseDiskError> {
        if let Some(identity) = self.identity.get() {
            return Ok(identity);
        }
        let identity = DiskIdentity::of(&self.image)?;
        Ok(self.identity.get_or_init(|| identity))
    }
}

fn lock<T>(device: &Mutex<T>) -> MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl AttachedVirtio {
    /// The device's saved state (vCPUs paused). A disk's overlay is named
    /// by the file its copy gets in the image directory
    /// ([`overlay_file_name`]); copying it is the capture's job.
    pub fn save(&self) -> Result<VirtioDeviceState, BaseDiskError> {
        let model = match &self.model {
            AttachedModel::Rng(device) => VirtioModelState::Rng {
                state: lock(device).save(),
            },
            AttachedModel::Block { device, disk } => VirtioModelState::Block {
                state: lock(device).save(),
                disk: SavedDisk {
                    image: disk.image.clone(),
                    identity: disk.identity()?.clone(),
                    overlay_file: disk.overlay.as_ref().map(|_| overlay_file_name(&self.name)),
                },
            },
            AttachedModel::Net { device, tap } => VirtioModelState::Net {
                state: lock(device).save(),
                tap: tap.clone(),
            },
        };
        Ok(VirtioDeviceState {
            name: self.name.clone(),
            base: self.base,
            gsi: self.gsi,
            model,
        })
    }

    /// The disk's files, for a block device.
    pub fn disk(&self) -> Option<&AttachedDisk> {
        match &self.model {
            AttachedModel::Block { disk, .. } => Some(disk),
            _ => None,
        }
    }

    /// The overlay file of a writable block device.
    pub fn overlay_path(&self) -> Option<&Path> {
        self.disk().and_then(|disk| disk.overlay.as_deref())
    }

    /// The device's virtio name (e.g. "virtio-blk blk1").
    pub fn device_name(&self) -> String {
        match &self.model {
            AttachedModel::Rng(d) => lock(d).device().name().to_string(),
            AttachedModel::Block { device, .. } => lock(device).device().name().to_string(),
            AttachedModel::Net { device, .. } => lock(device).device().name().to_string(),
        }
    }
}
