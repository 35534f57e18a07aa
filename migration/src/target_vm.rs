//! The VM on the migration target, assembled from the VMM's public parts:
//! a [`TargetShell`] (KVM VM with irqchip and PIT, vCPUs and their parked
//! threads, guest RAM registered with KVM and with the target's own
//! userfaultfd) made before the switch-over, because slot registration is
//! the slow part; then state set and vCPUs started ([`MigratedVm`]).
//!
//! This duplicates the small start path of `vmstream_vmm::machine::Machine`
//! because `restore::restore` only takes a `CloneSource` (an image's state
//! and page store); with a VMM entry point that restores a given `VmState`
//! over an arbitrary page source, the migrated VM would be a `Machine`
//! (see `docs/MIGRATION.md`, "Needed from the VMM").

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vmstream_vmm::devices::PortIoBus;
use vmstream_vmm::devices::mailbox::Mailbox;
use vmstream_vmm::machine::MachineConfig;
use vmstream_vmm::memory::{GuestRam, PageSource};
use vmstream_vmm::vstate::VmState;
use vmstream_vmm::vstate::ram_access::RamAccess;
use vmstream_vmm::vstate::run_loop::{StartArgs, VcpuShared, VcpuStatus};
use vmstream_vmm::vstate::vcpu::{self, VcpuCreateError, VcpuRestoreError};
use vmstream_vmm::vstate::vm::{self, KvmHost, VmCreateError, VmWideStateError};

use crate::target_memory::{TargetMemory, TargetMemoryError};

/// Why a target shell could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TargetShellError {
    #[error("invalid machine configuration")]
    Config(#[from] vmstream_vmm::machine::MachineConfigError),
    #[error("cannot reserve {0} bytes of guest RAM")]
    Reserve(usize, #[source] std::io::Error),
    #[error("cannot create the VM")]
    Vm(#[from] VmCreateError),
    #[error("cannot create a vCPU")]
    Vcpu(#[from] VcpuCreateError),
    #[error("cannot spawn a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot set up the target's guest memory")]
    Memory(#[from] TargetMemoryError),
}

/// Why the migrated state could not be set.
#[derive(Debug, thiserror::Error)]
pub enum TargetRestoreError {
    #[error(
        "the state has {state} vCPUs and {memory} bytes, the shell {shell_vcpus} and {shell_memory}"
    )]
    Shape {
        state: usize,
        memory: u64,
        shell_vcpus: u8,
        shell_memory: usize,
    },
    #[error("cannot restore the VM-wide state")]
    Vm(#[from] VmWideStateError),
    #[error("cannot restore a vCPU")]
    Vcpu(#[from] VcpuRestoreError),
}

/// vCPU threads; dropping stops and joins them.
#[derive(Debug, Default)]
struct Vcpus {
    shared: Vec<Arc<VcpuShared>>,
    handles: Vec<JoinHandle<()>>,
}

impl Vcpus {
    fn stop(&mut self, mailbox: Option<&Mailbox>) {
        for v in &self.shared {
            v.request_stop();
        }
        if let Some(mailbox) = mailbox {
            mailbox.interrupt();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop(None);
    }
}

/// A VM ready to receive a migrated state. Field order is drop order:
/// vCPU threads, then memory (handler), then the VM fd, then guest RAM.
#[derive(Debug)]
pub struct TargetShell {
    vcpus: Vcpus,
    memory: Arc<TargetMemory>,
    vm: VmFd,
    ram: GuestRam,
    host: Arc<KvmHost>,
    config: MachineConfig,
    created_in: Duration,
}

impl TargetShell {
    /// Creates the VM, vCPUs, guest RAM (registered with KVM and
    /// userfaultfd). `image` is the live image the source VM was cloned
    /// from, as held on this node.
    pub fn create(
        host: &Arc<KvmHost>,
        config: MachineConfig,
        image: Option<Arc<dyn PageSource>>,
    ) -> Result<Self, TargetShellError> {
        let start = Instant::now();
        config.validate()?;
        let ram = GuestRam::reserve(config.memory_bytes)
            .map_err(|e| TargetShellError::Reserve(config.memory_bytes, e))?;
        let vm = vm::create_vm(host)?;
        vm::register_ram(&vm, &ram)?;
        let memory = Arc::new(TargetMemory::register(&ram, image)?);
        let mut vcpus = Vcpus::default();
        for index in 0..config.vcpus {
            let fd = vcpu::create_vcpu(host, &vm, index, config.vcpus)?;
            let shared = VcpuShared::new(index, fd);
            vcpus
                .handles
                .push(shared.spawn_parked().map_err(TargetShellError::Thread)?);
            vcpus.shared.push(shared);
        }
        Ok(Self {
            vcpus,
            memory,
            vm,
            ram,
            host: Arc::clone(host),
            config,
            created_in: start.elapsed(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> MachineConfig {
        self.config
    }

    /// How long creating the shell took.
    pub fn created_in(&self) -> Duration {
        self.created_in
    }

    /// The target's guest memory.
    pub fn memory(&self) -> &Arc<TargetMemory> {
        &self.memory
    }

    /// Sets the VM-wide and vCPU state (vCPUs stay parked). Returns the
    /// MSRs the host refused, per vCPU.
    pub fn set_state(&self, state: &VmState) -> Result<Vec<(u8, Vec<u32>)>, TargetRestoreError> {
        if state.vcpus.len() != usize::from(self.config.vcpus)
            || state.memory_bytes != self.config.memory_bytes as u64
        {
            return Err(TargetRestoreError::Shape {
                state: state.vcpus.len(),
                memory: state.memory_bytes,
                shell_vcpus: self.config.vcpus,
                shell_memory: self.config.memory_bytes,
            });
        }
        vm::restore_vm_wide(&self.vm, &state.vm)?;
        let mut refused = Vec::new();
        for (vcpu, saved) in self.vcpus.shared.iter().zip(&state.vcpus) {
            let r = vcpu::restore_vcpu(&self.host, &vcpu.fd(), saved)?;
            if !r.is_empty() {
                refused.push((saved.index, r));
            }
        }
        Ok(refused)
    }

    /// Creates the devices from `state` and starts the vCPUs.
    pub fn start(self, state: &VmState) -> MigratedVm {
        let ram = ram_access(&self.ram);
        let bus = Arc::new(PortIoBus::new(state.devices.clone(), ram));
        self.memory.set_running();
        for vcpu in &self.vcpus.shared {
            vcpu.start(StartArgs {
                bus: Arc::clone(&bus),
                ram,
                resolver: None,
            });
        }
        MigratedVm {
            vcpus: self.vcpus,
            bus,
            memory: self.memory,
            vm: self.vm,
            ram: self.ram,
            started_at: Instant::now(),
        }
    }
}

fn ram_access(ram: &GuestRam) -> RamAccess {
    // SAFETY: the view goes only to this VM's devices and vCPU threads,
    // which are stopped before the RAM is unmapped (field order).
    unsafe { RamAccess::new(ram.host_addr(), ram.len()) }
}

/// A VM running on the migration target. Field order is drop order.
pub struct MigratedVm {
    vcpus: Vcpus,
    bus: Arc<PortIoBus>,
    memory: Arc<TargetMemory>,
    #[allow(dead_code)]
    vm: VmFd,
    ram: GuestRam,
    started_at: Instant,
}

impl std::fmt::Debug for MigratedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigratedVm")
            .field("vcpus", &self.vcpus.shared.len())
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

impl MigratedVm {
    /// The mailbox device.
    pub fn mailbox(&self) -> &Arc<Mailbox> {
        self.bus.mailbox()
    }

    /// Serial output since the VM started here.
    pub fn serial_output(&self) -> Vec<u8> {
        self.bus.serial_output()
    }

    /// Host access to guest RAM (touching a missing page waits for it).
    pub fn ram(&self) -> RamAccess {
        ram_access(&self.ram)
    }

    /// The guest memory and its counters.
    pub fn memory(&self) -> &Arc<TargetMemory> {
        &self.memory
    }

    /// vCPU statuses.
    pub fn vcpu_status(&self) -> Vec<VcpuStatus> {
        self.vcpus.shared.iter().map(|v| v.status()).collect()
    }

    /// Guest RAM (its host range, for memory figures).
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Per-vCPU counters (CPU time among them).
    pub fn vcpu_stats(&self) -> Vec<vmstream_vmm::vstate::run_loop::VcpuStats> {
        self.vcpus.shared.iter().map(|v| v.stats()).collect()
    }

    /// When the vCPUs were started.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// Stops the vCPUs and the memory's handler.
    pub fn stop(mut self) {
        self.vcpus.stop(Some(self.bus.mailbox()));
    }
}

impl Drop for MigratedVm {
    fn drop(&mut self) {
        self.vcpus.stop(Some(self.bus.mailbox()));
        self.memory.shutdown();
    }
}
