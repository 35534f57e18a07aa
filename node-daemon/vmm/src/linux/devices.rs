//! The virtio-mmio devices of a Linux guest: where they sit (4 KiB windows
//! from [`VIRTIO_MMIO_BASE`] in the MMIO hole), which interrupt each raises
//! (legacy GSIs 5, 6, 7, 9, 10, 11 through an irqfd, so a device thread can
//! interrupt the guest without the vCPU), and the `virtio_mmio.device=`
//! entries that announce them on the kernel command line (the guest has no
//! ACPI or device tree to find them otherwise). QueueNotify writes are
//! served synchronously on the vCPU thread that made them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use super::LinuxBootError;
use super::net_rx::NetRxThreads;
use crate::devices::mmio_bus::{MmioBus, MmioBusError, MmioDevice};
use crate::devices::virtio::attached::{AttachedDisk, AttachedModel, AttachedVirtio};
use crate::devices::virtio::blk::Block;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::tap::Tap;
use crate::devices::virtio::{InterruptLine, IrqfdLine, MMIO_SIZE, VirtioMmio};

/// Guest physical address of the first device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The interrupt lines devices get, in order: ISA IRQs no legacy device of
/// this machine uses (4 is COM1, 8 the RTC).
pub const VIRTIO_GSIS: [u32; 6] = [5, 6, 7, 9, 10, 11];

/// A virtio device to give the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtioDeviceSpec {
    /// virtio-rng (entropy from the host).
    Rng,
    /// virtio-blk over the raw `image`: read-only, or writable through a
    /// copy-on-write `overlay` file (created or truncated); the image file
    /// is never written.
    Block {
        image: PathBuf,
        overlay: Option<PathBuf>,
    },
    /// virtio-net on tap `tap` (created in the calling thread's network
    /// namespace, or attached), with MAC `mac`.
    Net { tap: String, mac: [u8; 6] },
}

impl VirtioDeviceSpec {
    fn name(&self) -> &'static str {
        match self {
            Self::Rng => "rng",
            Self::Block { .. } => "blk",
            Self::Net { .. } => "net",
        }
    }
}

/// The devices of a Linux guest: their MMIO bus, the receive threads of
/// its network devices, and the devices themselves (typed, for saving).
#[derive(Debug, Default)]
pub struct LinuxDevices {
    pub mmio: MmioBus,
    pub net_rx: NetRxThreads,
    pub attached: Vec<AttachedVirtio>,
}

/// Where device `index` sits and what it raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    pub base: u64,
    pub gsi: u32,
}

/// The slots of `count` devices, or `None` for more than there are lines.
pub fn virtio_slots(count: usize) -> Option<Vec<VirtioSlot>> {
    (count <= VIRTIO_GSIS.len()).then(|| {
        VIRTIO_GSIS[..count]
            .iter()
            .enumerate()
            .map(|(i, &gsi)| VirtioSlot {
                base: VIRTIO_MMIO_BASE + i as u64 * MMIO_SIZE,
                gsi,
            })
            .collect()
    })
}

/// The command-line entries that announce `slots` to Linux's virtio-mmio
/// driver (`virtio_mmio.device=4K@0xd0000000:5 ...`).
pub fn cmdline_entries(slots: &[VirtioSlot]) -> String {
    slots
        .iter()
        .map(|slot| {
            format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                MMIO_SIZE >> 10,
                slot.base,
                slot.gsi
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds the devices of `specs` over guest memory `mem`, registers their
/// irqfds with `vm`, places them on a new MMIO bus and starts the receive
/// threads of network devices.
pub(super) fn build(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    specs: &[VirtioDeviceSpec],
) -> Result<LinuxDevices, LinuxBootError> {
    let slots = virtio_slots(specs.len()).ok_or(LinuxBootError::TooManyDevices {
        count: specs.len(),
        max: VIRTIO_GSIS.len(),
    })?;
    let mut devices = LinuxDevices::default();
    for (index, (spec, slot)) in specs.iter().zip(slots).enumerate() {
        let line = interrupt_line(vm, slot.gsi).map_err(|source| LinuxBootError::Interrupt {
            device: spec.name(),
            gsi: slot.gsi,
            source,
        })?;
        let name = format!("{}{index}", spec.name());
        let model = match spec {
            VirtioDeviceSpec::Rng => AttachedModel::Rng(Arc::new(Mutex::new(VirtioMmio::new(
                Rng::new(&name),
                mem.clone(),
                line,
            )))),
            VirtioDeviceSpec::Block { image, overlay } => {
                let disk = Block::open(&name, image, overlay.as_deref()).map_err(|source| {
                    LinuxBootError::Disk {
                        image: image.clone(),
                        source,
                    }
                })?;
                AttachedModel::Block {
                    device: Arc::new(Mutex::new(VirtioMmio::new(disk, mem.clone(), line))),
                    disk: AttachedDisk::new(image.clone(), overlay.clone()),
                }
            }
            VirtioDeviceSpec::Net { tap, mac } => {
                let tap_device = Tap::open(tap).map_err(|source| LinuxBootError::Tap {
                    tap: tap.clone(),
                    source,
                })?;
                AttachedModel::Net {
                    device: Arc::new(Mutex::new(VirtioMmio::new(
                        Net::new(&name, tap_device, *mac),
                        mem.clone(),
                        line,
                    ))),
                    tap: tap.clone(),
                }
            }
        };
        devices
            .place(AttachedVirtio {
                name,
                base: slot.base,
                gsi: slot.gsi,
                model,
            })
            .map_err(|e| match e {
                PlaceError::Thread(source) => LinuxBootError::Thread { source },
                PlaceError::Window(e) => {
                    unreachable!("virtio slots are disjoint windows in the MMIO hole: {e}")
                }
            })?;
    }
    Ok(devices)
}

/// A new irqfd registered with `vm` to raise `gsi`.
pub(crate) fn interrupt_line(vm: &VmFd, gsi: u32) -> std::io::Result<Arc<dyn InterruptLine>> {
    let line = IrqfdLine::new()?;
    vm.register_irqfd(line.eventfd(), gsi)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    Ok(Arc::new(line))
}

/// Why a device could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("its window cannot be placed")]
    Window(#[from] MmioBusError),
    #[error("its receive thread cannot be started")]
    Thread(#[source] std::io::Error),
}

impl LinuxDevices {
    /// Puts `device` in its window on the bus, starts its receive thread if
    /// it is a network device, and keeps it for saving.
    pub(crate) fn place(&mut self, device: AttachedVirtio) -> Result<(), PlaceError> {
        let window: Arc<dyn MmioDevice> = match &device.model {
            AttachedModel::Rng(d) => d.clone(),
            AttachedModel::Block { device, .. } => device.clone(),
            AttachedModel::Net { device, .. } => device.clone(),
        };
        self.mmio.insert(device.base, MMIO_SIZE, window)?;
        if let AttachedModel::Net { device, .. } = &device.model {
            self.net_rx
                .spawn(Arc::clone(device))
                .map_err(PlaceError::Thread)?;
        }
        self.attached.push(device);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_get_consecutive_windows_and_free_legacy_lines() {
        let slots = virtio_slots(3).unwrap();
        assert_eq!(
            slots,
            vec![
                VirtioSlot {
                    base: 0xd000_0000,
                    gsi: 5
                },
                VirtioSlot {
                    base: 0xd000_1000,
                    gsi: 6
                },
                VirtioSlot {
                    base: 0xd000_2000,
                    gsi: 7
                },
            ]
        );
        assert_eq!(virtio_slots(6).unwrap()[5].gsi, 11);
        assert_eq!(virtio_slots(7), None);
        assert_eq!(virtio_slots(0), Some(vec![]));
    }

    #[test]
    fn command_line_announces_each_device() {
        assert_eq!(
            cmdline_entries(&virtio_slots(2).unwrap()),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(cmdline_entries(&[]), "");
    }
}
