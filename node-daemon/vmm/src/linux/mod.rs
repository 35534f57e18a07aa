//! Booting a Linux kernel in a VM shell with the 64-bit Linux boot
//! protocol: the uncompressed ELF `vmlinux` is loaded at its physical
//! addresses, the zero page (e820 map from the RAM layout, command line,
//! initrd) is written, and vCPU 0 starts at the ELF entry in long mode on
//! the micro guests' identity page tables and GDT, with RSI pointing at the
//! zero page and CPUID from a [`CpuTemplate`]. The console is the 8250 on
//! COM1 (`console=ttyS0`, its THR-empty interrupt on IRQ 4); virtio devices sit on the MMIO bus and are
//! announced on the command line ([`devices`]). Only one vCPU boots: there
//! is no MP table or ACPI to announce others.

pub mod boot_params;
pub mod clone;
pub mod devices;
pub mod loader;
pub mod net_rx;

use std::path::PathBuf;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::arch::x86_64::cpuid::{self, CpuTemplate};
use crate::arch::x86_64::layout::{MMIO_HOLE_END, ZERO_PAGE_ADDR};
use crate::arch::x86_64::paging::PagingError;
use crate::devices::{DeviceState, PortIoBus};
use crate::machine::{Machine, MemoryBacking, VmShell, ram_access, write_long_mode_tables};
use crate::memory::guest_memory_view;
use crate::vstate::vcpu::{self, VcpuBootError};
pub use devices::VirtioDeviceSpec;
pub use loader::{ElfProblem, LoadedKernel};

/// COM1's ISA interrupt.
const SERIAL_GSI: u32 = 4;

/// The command line every Linux guest gets before the template's switches
/// and the caller's own: the serial console, and early messages on it.
pub const BASE_CMDLINE: &str = "console=ttyS0 earlyprintk=serial";

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxBootSpec {
    /// Uncompressed ELF kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// Initial RAM disk, placed at the top of low RAM.
    pub initrd: Option<PathBuf>,
    /// Command-line arguments after [`BASE_CMDLINE`] and the template's
    /// switches (e.g. `root=/dev/vda ro`).
    pub cmdline: String,
    /// Which CPU features the guest sees.
    pub template: CpuTemplate,
    /// Virtio devices, in window order.
    pub devices: Vec<VirtioDeviceSpec>,
}

impl LinuxBootSpec {
    /// A spec for `kernel` with no initrd, no extra arguments and the
    /// template this host needs.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            template: CpuTemplate::detect(),
            devices: Vec::new(),
        }
    }

    /// The command line the kernel gets: [`BASE_CMDLINE`], the template's
    /// switches, the virtio devices, then the caller's arguments (last, so
    /// `-- init args` stay at the end).
    pub fn full_cmdline(&self) -> String {
        let slots = devices::virtio_slots(self.devices.len()).unwrap_or_default();
        [
            BASE_CMDLINE,
            &self.template.kernel_switches(),
            &devices::cmdline_entries(&slots),
            self.cmdline.trim(),
        ]
        .iter()
        .filter(|part| !part.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
    }
}

/// Error booting a Linux kernel.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error(
        "Linux guests boot with 1 vCPU (no MP table or ACPI announces more); the shell has {0}"
    )]
    VcpuCount(u8),
    #[error("{what} {path} not found")]
    NotFound { what: &'static str, path: PathBuf },
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is not an x86-64 ELF kernel: {problem}")]
    NotElf { path: PathBuf, problem: ElfProblem },
    #[error(
        "kernel {path} occupies {start:#x}..{end:#x}, which is not inside RAM between 1 MiB and {low_ram_end:#x}"
    )]
    KernelDoesNotFit {
        path: PathBuf,
        start: u64,
        end: u64,
        low_ram_end: u64,
    },
    #[error("cannot load kernel {path}")]
    KernelLoad {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error(
        "initrd {path} ({size} bytes) does not fit in the {room} bytes of low RAM above the kernel"
    )]
    InitrdDoesNotFit { path: PathBuf, size: u64, room: u64 },
    #[error("kernel command line is {len} bytes, Linux reads at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line is not valid: {reason}")]
    CmdlineInvalid { reason: String },
    #[error("cannot write the {what} into guest RAM: {detail}")]
    GuestWrite { what: &'static str, detail: String },
    #[error("{count} virtio devices asked for, there are interrupt lines for {max}")]
    TooManyDevices { count: usize, max: usize },
    #[error("cannot wire the interrupt of the {device} device to GSI {gsi}")]
    Interrupt {
        device: &'static str,
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open disk image {image}")]
    Disk {
        image: PathBuf,
        #[source]
        source: crate::devices::virtio::overlay::DiskOpenError,
    },
    #[error("cannot open tap {tap}")]
    Tap {
        tap: String,
        #[source]
        source: crate::devices::virtio::tap::TapError,
    },
    #[error("cannot start a device thread")]
    Thread {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the identity page tables")]
    Paging(#[from] PagingError),
    #[error("cannot set the boot vCPU's state")]
    Vcpu(#[from] VcpuBootError),
}

impl Machine {
    /// Boots the Linux kernel of `spec` in `shell` (one vCPU): loads it,
    /// writes the zero page and command line ([`LinuxBootSpec::full_cmdline`])
    /// and starts vCPU 0 at the kernel's 64-bit entry point.
    pub fn boot_linux(shell: VmShell, spec: &LinuxBootSpec) -> Result<Self, LinuxBootError> {
        let vcpus = shell.config().vcpus;
        if vcpus != 1 {
            return Err(LinuxBootError::VcpuCount(vcpus));
        }
        let loaded = loader::load(
            shell.ram(),
            &spec.kernel,
            spec.initrd.as_deref(),
            &spec.full_cmdline(),
        )?;
        let ram = ram_access(shell.ram());
        // The MMIO hole too: the kernel's first instructions may touch
        // devices before it switches to its own page tables.
        write_long_mode_tables(&ram, MMIO_HOLE_END)?;
        let memory = guest_memory_view(&ram).map_err(|e| LinuxBootError::GuestWrite {
            what: "devices' view of guest RAM",
            detail: e.to_string(),
        })?;
        let devices = devices::build(shell.vm(), &memory, &spec.devices)?;
        let mut cpuid = spec
            .template
            .apply(shell.host().supported_cpuid().as_slice());
        cpuid::patch_for_vcpu(&mut cpuid, 0, 1);
        for vcpu in shell.vcpus() {
            vcpu::set_linux_boot_state(
                &vcpu.fd(),
                vcpu.index,
                &cpuid,
                loaded.entry,
                ZERO_PAGE_ADDR,
            )?;
        }
        tracing::info!(
            kernel = %spec.kernel.display(),
            entry = format_args!("{:#x}", loaded.entry),
            kernel_end = format_args!("{:#x}", loaded.kernel_end),
            initrd = ?loaded.initrd,
            "booting Linux"
        );
        let bus = Arc::new(
            PortIoBus::new(DeviceState::default(), ram).with_serial_irq(serial_irq(shell.vm())?),
        );
        let mut machine =
            Self::start_with_mmio(shell, bus, Arc::new(devices.mmio), MemoryBacking::Anonymous);
        machine.keep_device_threads(Box::new(devices.net_rx));
        machine.attach_virtio(devices.attached);
        Ok(machine)
    }
}

/// COM1's interrupt line: an eventfd registered as an irqfd on GSI 4.
fn serial_irq(vm: &kvm_ioctls::VmFd) -> Result<EventFd, LinuxBootError> {
    let error = |source| LinuxBootError::Interrupt {
        device: "serial",
        gsi: SERIAL_GSI,
        source,
    };
    let fd = EventFd::new(EFD_NONBLOCK).map_err(error)?;
    vm.register_irqfd(&fd, SERIAL_GSI)
        .map_err(|e| error(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_puts_console_switches_then_the_callers_arguments() {
        let mut spec = LinuxBootSpec::new("/vmlinux");
        spec.template = CpuTemplate::Host;
        assert_eq!(spec.full_cmdline(), BASE_CMDLINE);
        spec.cmdline = " root=/dev/vda ro -- init ".into();
        assert_eq!(
            spec.full_cmdline(),
            format!("{BASE_CMDLINE} root=/dev/vda ro -- init")
        );
        spec.devices = vec![VirtioDeviceSpec::Rng];
        assert_eq!(
            spec.full_cmdline(),
            format!("{BASE_CMDLINE} virtio_mmio.device=4K@0xd0000000:5 root=/dev/vda ro -- init")
        );
        spec.devices.clear();
        spec.template = CpuTemplate::Emulated;
        let line = spec.full_cmdline();
        assert!(
            line.starts_with("console=ttyS0 earlyprintk=serial noxsave nofsgsbase clearcpuid=")
        );
        assert!(line.ends_with(" root=/dev/vda ro -- init"));
    }
}
