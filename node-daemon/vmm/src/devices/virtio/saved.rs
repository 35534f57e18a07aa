//! Saved state of a Linux guest's virtio-mmio devices as a live image
//! carries it: where each device sits (window base, interrupt line), its
//! transport and model state, and for a disk what it is made of (the base
//! image, identified by path, size, mtime and SHA-256, and the overlay file
//! copied into the image directory). Plain data next to the devices; the
//! VMM's `DeviceState` holds a list of them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::blk::BlockState;
use super::net::NetState;
use super::rng::RngState;
use super::state::VirtioMmioState;

/// One virtio-mmio device of a captured machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// The device's name in the machine (e.g. `blk1`): names its files.
    pub name: String,
    /// Guest-physical base of its 4 KiB window.
    pub base: u64,
    /// The GSI its irqfd raises.
    pub gsi: u32,
    pub model: VirtioModelState,
}

/// The device model with its transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VirtioModelState {
    Rng {
        state: VirtioMmioState<RngState>,
    },
    Block {
        state: VirtioMmioState<BlockState>,
        disk: SavedDisk,
    },
    Net {
        state: VirtioMmioState<NetState>,
        /// The source's tap (informative: each clone names its own).
        tap: String,
    },
}

/// What a captured disk is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// The base image (read-only, shared by the source and every clone).
    pub image: PathBuf,
    pub identity: DiskIdentity,
    /// The overlay's copy in the image directory (a file name there), or
    /// `None` for a read-only disk.
    pub overlay_file: Option<String>,
}

/// How a base image is recognised: size and mtime (checked first, cheap)
/// and the SHA-256 of its contents (checked when the mtime differs, e.g.
/// on a copy of the image).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    pub len: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Lower-case hex.
    pub sha256: String,
}

/// The file name of device `name`'s overlay copy in an image directory.
pub fn overlay_file_name(name: &str) -> String {
    format!("disk-{name}.overlay")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::state::TransportState;

    #[test]
    fn round_trips_through_json_with_its_kind_tag() {
        let state = VirtioDeviceState {
            name: "blk0".into(),
            base: 0xd000_0000,
            gsi: 5,
            model: VirtioModelState::Block {
                state: VirtioMmioState {
                    transport: TransportState::default(),
                    device: BlockState::default(),
                },
                disk: SavedDisk {
                    image: "/images/root.ext2".into(),
                    identity: DiskIdentity {
                        len: 8 << 20,
                        mtime_ns: 1,
                        sha256: "ab".into(),
                    },
                    overlay_file: Some(overlay_file_name("blk0")),
                },
            },
        };
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains(r#""kind":"block""#), "{json}");
        assert!(json.contains("disk-blk0.overlay"), "{json}");
        let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
    }
}
