//! Starting a clone of a captured Linux guest: the machine is restored as
//! any clone is (`restore::prepare`: memory copy-on-write or lazy, VM-wide
//! state with the kvmclock advanced, vCPUs), then each virtio device is
//! rebuilt from its saved state in its saved window with its interrupt
//! line registered again as an irqfd, before the vCPUs start:
//!
//! * a disk checks its base image is the captured one (size and mtime, or
//!   SHA-256) and gets its own overlay, a copy of the image's
//!   (`disk-<name>.overlay`) in the directory the caller names: the
//!   clone's writes reach neither the image's overlay nor the base image;
//! * a network device attaches to the tap the caller names (in the calling
//!   thread's network namespace), keeping the image's MAC; or, with
//!   [`restore_linux_with_taps`], takes a tap the caller opened ahead of
//!   the request (with the VM shell, as a warm node does), so the tap's
//!   carrier change and the host's link-watch activation after it are out
//!   of the clone's path.
//!
//! Devices read guest memory through the vm-memory view of guest RAM; with
//! lazy memory the userfaultfd handler fills what they touch (the SIGBUS
//! mode cannot: a device thread would take the signal, so it is refused).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::devices::{LinuxDevices, PlaceError, interrupt_line};
use crate::devices::virtio::attached::{AttachedDisk, AttachedModel, AttachedVirtio};
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::disk_files::{BaseDiskError, OverlayCopyError, copy_overlay};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::overlay::DiskOpenError;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::tap::{Tap, TapError};
use crate::devices::virtio::{self, VirtioDeviceState, VirtioMmio, VirtioModelState};
use crate::machine::{VmShell, ram_access};
use crate::memory::guest_memory_view;
use crate::restore::{CloneMemory, CloneSource, RestoreError, Restored, prepare};

/// What each clone gets of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneDevices {
    /// Directory for the clone's disk overlays (created if absent).
    pub dir: PathBuf,
    /// Taps for the image's network devices, in window order.
    pub taps: Vec<String>,
}

/// Why a Linux clone could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LinuxCloneError {
    #[error("the clone source was not opened from an image directory: its disk overlays are there")]
    NoImageDir,
    #[error("the image has {image} network devices, {given} taps were named")]
    TapCount { image: usize, given: usize },
    #[error("lazy memory in SIGBUS mode cannot serve the devices' accesses to guest memory")]
    SigbusMemory,
    #[error("cannot create the clone's directory {dir}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {device}: its base image is not the captured one")]
    BaseDisk {
        device: String,
        #[source]
        source: BaseDiskError,
    },
    #[error("cannot restore the machine")]
    Restore(#[from] RestoreError),
    #[error("cannot make the devices' view of guest RAM: {0}")]
    Memory(String),
    #[error("disk {device}: cannot give the clone its overlay")]
    Overlay {
        device: String,
        #[source]
        source: OverlayCopyError,
    },
    #[error("disk {device}: cannot open it")]
    Disk {
        device: String,
        #[source]
        source: DiskOpenError,
    },
    #[error("network device {device}: cannot open tap {tap}")]
    Tap {
        device: String,
        tap: String,
        #[source]
        source: TapError,
    },
    #[error("device {device}: cannot wire its interrupt to GSI {gsi}")]
    Interrupt {
        device: String,
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("device {device}: its saved state cannot be restored")]
    State {
        device: String,
        #[source]
        source: virtio::RestoreError,
    },
    #[error("device {device} at {base:#x}")]
    Place {
        device: String,
        base: u64,
        #[source]
        source: PlaceError,
    },
}

/// The taps a clone's network devices get: named (opened during the
/// start) or already open.
enum CloneTaps<'a> {
    Names(std::slice::Iter<'a, String>),
    Open(std::vec::IntoIter<Tap>),
}

impl CloneTaps<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Names(names) => names.len(),
            Self::Open(taps) => taps.len(),
        }
    }

    /// The next device's tap, opened now if it was named.
    fn next(&mut self, device: &str) -> Result<Tap, LinuxCloneError> {
        match self {
            Self::Names(names) => {
                let tap = names.next().expect("tap count checked");
                Tap::open(tap).map_err(|source| LinuxCloneError::Tap {
                    device: device.to_string(),
                    tap: tap.clone(),
                    source,
                })
            }
            Self::Open(taps) => Ok(taps.next().expect("tap count checked")),
        }
    }
}

/// Starts a clone of the Linux guest in `source` in `shell` with memory
/// `memory` and the disks and taps of `devices` (each tap is opened, in the
/// calling thread's network namespace, during the start).
pub fn restore_linux(
    shell: VmShell,
    source: &CloneSource,
    memory: &CloneMemory,
    devices: &CloneDevices,
) -> Result<Restored, LinuxCloneError> {
    start(
        shell,
        source,
        memory,
        &devices.dir,
        CloneTaps::Names(devices.taps.iter()),
    )
}

/// [`restore_linux`] with taps the caller has opened already ([`Tap::open`],
/// one per network device of the image, in window order), e.g. in the
/// clone's namespace when it made the VM shell: the tap's carrier came up
/// then, and once the host has activated it (IFF_RUNNING) the clone's first
/// frames are not dropped. Disk overlays go to `dir`.
pub fn restore_linux_with_taps(
    shell: VmShell,
    source: &CloneSource,
    memory: &CloneMemory,
    dir: &Path,
    taps: Vec<Tap>,
) -> Result<Restored, LinuxCloneError> {
    start(
        shell,
        source,
        memory,
        dir,
        CloneTaps::Open(taps.into_iter()),
    )
}

fn start(
    shell: VmShell,
    source: &CloneSource,
    memory: &CloneMemory,
    dir: &Path,
    mut taps: CloneTaps<'_>,
) -> Result<Restored, LinuxCloneError> {
    let saved = &source.state().devices.virtio;
    let image_dir = source.dir().ok_or(LinuxCloneError::NoImageDir)?;
    let nets = saved
        .iter()
        .filter(|d| matches!(d.model, VirtioModelState::Net { .. }))
        .count();
    if nets != taps.len() {
        return Err(LinuxCloneError::TapCount {
            image: nets,
            given: taps.len(),
        });
    }
    for device in saved {
        if let VirtioModelState::Block { disk, .. } = &device.model {
            disk.identity
                .check(&disk.image)
                .map_err(|source| LinuxCloneError::BaseDisk {
                    device: device.name.clone(),
                    source,
                })?;
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| LinuxCloneError::Dir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let prepared = prepare(shell, source, memory)?;
    if prepared
        .backing()
        .lazy_memory()
        .is_some_and(|lazy| lazy.options().sigbus)
    {
        return Err(LinuxCloneError::SigbusMemory);
    }
    let ram = ram_access(prepared.shell().ram());
    let mem = guest_memory_view(&ram).map_err(|e| LinuxCloneError::Memory(e.to_string()))?;
    let mut built = LinuxDevices::default();
    for state in saved {
        let line = interrupt_line(prepared.shell().vm(), state.gsi).map_err(|source| {
            LinuxCloneError::Interrupt {
                device: state.name.clone(),
                gsi: state.gsi,
                source,
            }
        })?;
        let restore_err = |source| LinuxCloneError::State {
            device: state.name.clone(),
            source,
        };
        let name = &state.name;
        let model = match &state.model {
            VirtioModelState::Rng { state: saved } => {
                let rng = Rng::restore(name, &saved.device);
                let mmio = VirtioMmio::restore(rng, mem.clone(), line, &saved.transport)
                    .map_err(restore_err)?;
                AttachedModel::Rng(Arc::new(Mutex::new(mmio)))
            }
            VirtioModelState::Block { state: saved, disk } => {
                let overlay = match &disk.overlay_file {
                    Some(file) => {
                        let to = dir.join(file);
                        let ov = &saved.device.overlay;
                        copy_overlay(&image_dir.join(file), &to, ov.len, &ov.written).map_err(
                            |source| LinuxCloneError::Overlay {
                                device: name.clone(),
                                source,
                            },
                        )?;
                        Some(to)
                    }
                    None => None,
                };
                let block = Block::restore(name, &disk.image, overlay.as_deref(), &saved.device)
                    .map_err(|source| LinuxCloneError::Disk {
                        device: name.clone(),
                        source,
                    })?;
                let mmio = VirtioMmio::restore(block, mem.clone(), line, &saved.transport)
                    .map_err(restore_err)?;
                AttachedModel::Block {
                    device: Arc::new(Mutex::new(mmio)),
                    disk: AttachedDisk::new(disk.image.clone(), overlay),
                }
            }
            VirtioModelState::Net { state: saved, .. } => {
                let tap_device = taps.next(name)?;
                let tap = tap_device.name().to_string();
                let net = Net::restore(name, tap_device, &saved.device);
                let mmio = VirtioMmio::restore(net, mem.clone(), line, &saved.transport)
                    .map_err(restore_err)?;
                AttachedModel::Net {
                    device: Arc::new(Mutex::new(mmio)),
                    tap,
                }
            }
        };
        place(&mut built, state, model)?;
    }
    let LinuxDevices {
        mmio,
        net_rx,
        attached,
    } = built;
    Ok(prepared.start_with(mmio, Some(Box::new(net_rx)), attached))
}

fn place(
    built: &mut LinuxDevices,
    state: &VirtioDeviceState,
    model: AttachedModel,
) -> Result<(), LinuxCloneError> {
    built
        .place(AttachedVirtio {
            name: state.name.clone(),
            base: state.base,
            gsi: state.gsi,
            model,
        })
        .map_err(|source| LinuxCloneError::Place {
            device: state.name.clone(),
            base: state.base,
            source,
        })
}
