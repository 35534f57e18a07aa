//! A micro-VM: [`VmShell`] (VM, vCPUs, registered guest RAM, made before a
//! clone is requested, because memory-slot registration is the slow part)
//! and [`Machine`] (a shell with devices and running vCPU threads, booted
//! from a micro guest or restored from a live image; `crate::linux` boots
//! Linux kernels into a shell).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use crate::arch::x86_64::layout::{
    self, GDT_ADDR, GUEST_LOAD_ADDR, GUEST_MAX_SIZE, IDT_ADDR, PARAMS_ADDR,
};
use crate::arch::x86_64::{boot, paging};
use crate::devices::mailbox::Mailbox;
use crate::devices::mmio_bus::MmioBus;
use crate::devices::virtio::attached::AttachedVirtio;
use crate::devices::virtio::disk_files::BaseDiskError;
use crate::devices::{DeviceState, PortIoBus};
use crate::guests::{FillSpec, GuestProgram};
pub use crate::memory::backing::MemoryBacking;
use crate::memory::{GuestRam, LazyMemory, LazyOptions, LazyRegisterError, PAGE_SIZE};
use crate::vstate::ram_access::RamAccess;
use crate::vstate::run_loop::{
    MissingPageResolver, StartArgs, VcpuControlError, VcpuShared, VcpuStats, VcpuStatus,
};
use crate::vstate::vcpu::{self, VcpuBootError, VcpuCreateError, VcpuSaveError};
use crate::vstate::vm::{self, DirtyLogError, KvmHost, VmCreateError, VmWideStateError};
use crate::vstate::{VM_STATE_VERSION, VmState};

mod config;
pub use config::{MachineConfig, MachineConfigError};

/// Error creating a VM shell.
#[derive(Debug, thiserror::Error)]
pub enum ShellCreateError {
    #[error("invalid machine configuration")]
    Config(#[from] MachineConfigError),
    #[error("cannot reserve {0} bytes of guest RAM")]
    Reserve(usize, #[source] std::io::Error),
    #[error("cannot create the VM")]
    Vm(#[from] VmCreateError),
    #[error("cannot create a vCPU")]
    Vcpu(#[from] VcpuCreateError),
    #[error("cannot spawn a vCPU thread")]
    Thread(#[source] std::io::Error),
}

/// vCPU threads; dropping this stops and joins any that are left.
#[derive(Debug, Default)]
struct VcpuThreads {
    vcpus: Vec<Arc<VcpuShared>>,
    handles: Vec<JoinHandle<()>>,
}

impl VcpuThreads {
    fn stop(&mut self) {
        for vcpu in &self.vcpus {
            vcpu.request_stop();
        }
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A VM ready to receive state: KVM VM with irqchip and PIT, vCPUs with
/// CPUID and their (parked) threads, and guest RAM reserved and registered.
/// Create shells ahead of clone requests; [`crate::restore`] or
/// [`Machine::boot`] consume one.
#[derive(Debug)]
pub struct VmShell {
    host: Arc<KvmHost>,
    config: MachineConfig,
    vcpus: VcpuThreads,
    vm: VmFd,
    /// Userfaultfd registration prepared for a lazy restore (dropped before
    /// `ram`).
    lazy: Option<LazyMemory>,
    ram: GuestRam,
    created_in: Duration,
}

impl VmShell {
    /// Creates a shell (the memory-slot registration takes milliseconds).
    pub fn create(host: &Arc<KvmHost>, config: MachineConfig) -> Result<Self, ShellCreateError> {
        let start = Instant::now();
        config.validate()?;
        let ram = GuestRam::reserve(config.memory_bytes)
            .map_err(|e| ShellCreateError::Reserve(config.memory_bytes, e))?;
        let vm = vm::create_vm(host)?;
        vm::register_ram(&vm, &ram)?;
        let mut vcpus = VcpuThreads::default();
        for index in 0..config.vcpus {
            let fd = vcpu::create_vcpu(host, &vm, index, config.vcpus)?;
            let shared = VcpuShared::new(index, fd);
            vcpus
                .handles
                .push(shared.spawn_parked().map_err(ShellCreateError::Thread)?);
            vcpus.vcpus.push(shared);
        }
        Ok(Self {
            host: Arc::clone(host),
            config,
            vcpus,
            vm,
            lazy: None,
            ram,
            created_in: start.elapsed(),
        })
    }

    /// Registers the shell's RAM with userfaultfd now, so a lazy restore
    /// only attaches its page source.
    pub fn prepare_lazy(&mut self, options: LazyOptions) -> Result<(), LazyRegisterError> {
        if self.lazy.is_none() {
            self.lazy = Some(LazyMemory::register(&self.ram, options)?);
        }
        Ok(())
    }

    /// The prepared userfaultfd registration, if any (attach a source or a
    /// hook and install pages through it before [`crate::restore::restore_state`]).
    pub fn lazy(&self) -> Option<&LazyMemory> {
        self.lazy.as_ref()
    }

    /// Takes the prepared userfaultfd registration, if any.
    pub(crate) fn take_lazy(&mut self) -> Option<LazyMemory> {
        self.lazy.take()
    }

    /// The shell's configuration.
    pub fn config(&self) -> MachineConfig {
        self.config
    }

    /// How long creating the shell took.
    pub fn created_in(&self) -> Duration {
        self.created_in
    }

    /// The guest RAM (to install a backing before restore).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub(crate) fn host(&self) -> &Arc<KvmHost> {
        &self.host
    }

    pub(crate) fn vm(&self) -> &VmFd {
        &self.vm
    }

    pub(crate) fn vcpus(&self) -> &[Arc<VcpuShared>] {
        &self.vcpus.vcpus
    }
}

/// Fills missing pages for vCPU exits (userfaultfd SIGBUS mode).
struct LazyResolver(Arc<LazyMemory>);

impl MissingPageResolver for LazyResolver {
    fn resolve(&self, ram_offset: u64) -> bool {
        self.0
            .fill_page((ram_offset / PAGE_SIZE as u64) as usize)
            .is_ok()
    }
}

/// Options for booting a micro guest.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// Values for the guest's parameter block.
    pub params: Vec<u64>,
    /// Host fill of the data area before the guest starts.
    pub fill: Option<FillSpec>,
}

/// Error booting a micro guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("guest program {name} is {len} bytes, more than {GUEST_MAX_SIZE}")]
    GuestTooLarge { name: &'static str, len: usize },
    #[error("too many guest parameters ({0}, at most 512)")]
    TooManyParams(usize),
    #[error("cannot build the identity page tables")]
    Paging(#[from] paging::PagingError),
    #[error("cannot set a vCPU's boot state")]
    Vcpu(#[from] VcpuBootError),
}

/// Error pausing a machine.
#[derive(Debug, thiserror::Error)]
#[error("cannot pause the machine")]
pub struct PauseError(#[from] pub VcpuControlError);

/// Error saving a machine's state.
#[derive(Debug, thiserror::Error)]
pub enum StateSaveError {
    #[error("the machine is not paused (vCPU {0} is {1:?})")]
    NotPaused(u8, VcpuStatus),
    #[error("cannot save a vCPU's state")]
    Vcpu(#[from] VcpuSaveError),
    #[error("cannot save the VM-wide state")]
    Vm(#[from] VmWideStateError),
    #[error("cannot identify the base image of a disk")]
    Disk(#[from] BaseDiskError),
    #[error("the machine has {0} MMIO devices that are not virtio devices it can save")]
    UnsavedDevices(usize),
}

/// Counters of a machine.
#[derive(Debug, Clone, Default)]
pub struct MachineStats {
    pub vcpus: Vec<VcpuStats>,
    /// Guest accesses to ports without a device.
    pub unknown_port_accesses: u64,
    /// Guest accesses to the MMIO hole where no device is.
    pub unclaimed_mmio_accesses: u64,
}

/// A running (or paused) micro-VM.
pub struct Machine {
    host: Arc<KvmHost>,
    config: MachineConfig,
    vcpus: Vec<Arc<VcpuShared>>,
    threads: Vec<JoinHandle<()>>,
    bus: Arc<PortIoBus>,
    mmio: Arc<MmioBus>,
    /// Device threads (e.g. network receive), stopped when dropped.
    device_threads: Vec<Box<dyn Send + Sync>>,
    /// The virtio devices on `mmio`, typed, for saving.
    virtio: Vec<AttachedVirtio>,
    backing: MemoryBacking,
    vm: VmFd,
    ram: GuestRam,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("config", &self.config)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Loads `guest` into the shell's (anonymous) RAM, builds the long-mode
    /// boot state and starts the vCPUs at the guest's entry point.
    pub fn boot(
        shell: VmShell,
        guest: GuestProgram,
        options: &BootOptions,
    ) -> Result<Self, BootError> {
        let image = guest.image();
        if image.len() as u64 > GUEST_MAX_SIZE {
            return Err(BootError::GuestTooLarge {
                name: guest.name(),
                len: image.len(),
            });
        }
        if options.params.len() > PAGE_SIZE / 8 {
            return Err(BootError::TooManyParams(options.params.len()));
        }
        let ram = ram_access(&shell.ram);
        advise(&shell.ram, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE");
        let outside = |e: crate::vstate::ram_access::OutsideRam| -> BootError {
            unreachable!("fixed boot areas lie in the minimum RAM: {e}")
        };
        write_long_mode_tables(&ram, 0)?;
        for (i, value) in options.params.iter().enumerate() {
            ram.write_u64(PARAMS_ADDR + 8 * i as u64, *value)
                .map_err(outside)?;
        }
        ram.write_bytes(GUEST_LOAD_ADDR, image).map_err(outside)?;
        if let Some(fill) = &options.fill {
            fill.fill(&ram);
        }
        for vcpu in shell.vcpus() {
            vcpu::set_boot_state(&vcpu.fd(), vcpu.index)?;
        }
        let bus = Arc::new(PortIoBus::new(DeviceState::default(), ram));
        Ok(Self::start(shell, bus, MemoryBacking::Anonymous))
    }

    /// Wraps a shell whose vCPU and VM state are set and starts its vCPUs
    /// (no MMIO devices).
    pub(crate) fn start(shell: VmShell, bus: Arc<PortIoBus>, backing: MemoryBacking) -> Self {
        Self::start_with_mmio(shell, bus, Arc::default(), backing)
    }

    /// [`Machine::start`] with devices in the MMIO hole.
    pub(crate) fn start_with_mmio(
        shell: VmShell,
        bus: Arc<PortIoBus>,
        mmio: Arc<MmioBus>,
        backing: MemoryBacking,
    ) -> Self {
        let ram = ram_access(&shell.ram);
        let resolver = backing.lazy_memory().map(|memory| {
            Arc::new(LazyResolver(Arc::clone(memory))) as Arc<dyn MissingPageResolver>
        });
        let VmShell {
            host,
            config,
            vcpus: mut threads,
            vm,
            ram: guest_ram,
            ..
        } = shell;
        for vcpu in &threads.vcpus {
            vcpu.start(StartArgs {
                bus: Arc::clone(&bus),
                mmio: Arc::clone(&mmio),
                ram,
                resolver: resolver.clone(),
            });
        }
        Self {
            host,
            config,
            vcpus: std::mem::take(&mut threads.vcpus),
            threads: std::mem::take(&mut threads.handles),
            bus,
            mmio,
            device_threads: Vec::new(),
            virtio: Vec::new(),
            backing,
            vm,
            ram: guest_ram,
        }
    }

    /// The configuration.
    pub fn config(&self) -> MachineConfig {
        self.config
    }

    /// The mailbox device.
    pub fn mailbox(&self) -> &Arc<Mailbox> {
        self.bus.mailbox()
    }

    /// Keeps `threads` (an owner of device threads that stops them when
    /// dropped) until the machine stops.
    pub(crate) fn keep_device_threads(&mut self, threads: Box<dyn Send + Sync>) {
        self.device_threads.push(threads);
    }

    /// Records the virtio devices placed on the MMIO bus (saved with the
    /// machine's state).
    pub(crate) fn attach_virtio(&mut self, devices: Vec<AttachedVirtio>) {
        self.virtio = devices;
    }

    /// The virtio devices (a Linux guest's), in window order.
    pub fn virtio(&self) -> &[AttachedVirtio] {
        &self.virtio
    }

    /// The devices in the MMIO hole.
    pub fn mmio(&self) -> &Arc<MmioBus> {
        &self.mmio
    }

    /// Serial output of this VM since it started (not its image's).
    pub fn serial_output(&self) -> Vec<u8> {
        self.bus.serial_output()
    }

    /// Host access to guest RAM (valid while the machine lives).
    pub fn ram(&self) -> RamAccess {
        ram_access(&self.ram)
    }

    /// The guest RAM mapping.
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram
    }

    /// What backs guest RAM.
    pub fn backing(&self) -> &MemoryBacking {
        &self.backing
    }

    /// The vCPUs (status, first entry/exit times).
    pub fn vcpus(&self) -> &[Arc<VcpuShared>] {
        &self.vcpus
    }

    /// Counters.
    pub fn stats(&self) -> MachineStats {
        MachineStats {
            vcpus: self.vcpus.iter().map(|v| v.stats()).collect(),
            unknown_port_accesses: self.bus.unknown_accesses(),
            unclaimed_mmio_accesses: self.mmio.unclaimed(),
        }
    }

    /// Pauses every vCPU; returns how long it took.
    pub fn pause(&self) -> Result<Duration, PauseError> {
        let start = Instant::now();
        for vcpu in &self.vcpus {
            vcpu.request_pause();
        }
        self.bus.mailbox().interrupt();
        for vcpu in &self.vcpus {
            vcpu.wait_paused(Duration::from_secs(5))?;
        }
        Ok(start.elapsed())
    }

    /// Resumes every vCPU.
    pub fn resume(&self) {
        for vcpu in &self.vcpus {
            vcpu.resume();
        }
    }

    /// Saves vCPU, VM-wide and device state; the machine must be paused.
    pub fn save_state(&self) -> Result<VmState, StateSaveError> {
        for vcpu in &self.vcpus {
            match vcpu.status() {
                VcpuStatus::Paused | VcpuStatus::NotStarted => {}
                other => return Err(StateSaveError::NotPaused(vcpu.index, other)),
            }
        }
        // Every window on the bus must be a device the state holds.
        if self.mmio.len() != self.virtio.len() {
            return Err(StateSaveError::UnsavedDevices(
                self.mmio.len().saturating_sub(self.virtio.len()),
            ));
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| vcpu::save_vcpu(&self.host, &v.fd(), v.index))
            .collect::<Result<Vec<_>, _>>()?;
        let mut devices = self.bus.save();
        devices.virtio = self
            .virtio
            .iter()
            .map(AttachedVirtio::save)
            .collect::<Result<_, _>>()?;
        Ok(VmState {
            version: VM_STATE_VERSION,
            memory_bytes: self.ram.len() as u64,
            vcpus,
            vm: vm::save_vm_wide(&self.vm)?,
            devices,
            captured_at_unix_ns: Some(crate::vstate::clock::unix_now_ns()),
        })
    }

    /// Switches on KVM dirty logging of guest RAM (re-registers the memory
    /// slots with `KVM_MEM_LOG_DIRTY_PAGES`; milliseconds). Guest writes
    /// from now on show in [`Machine::take_dirty_pages`].
    pub fn start_dirty_log(&self) -> Result<(), DirtyLogError> {
        vm::set_dirty_logging(&self.vm, &self.ram, true)?;
        // Drop what a previous logging period left.
        vm::take_dirty_log(&self.vm, &self.ram)?;
        Ok(())
    }

    /// Switches KVM dirty logging off.
    pub fn stop_dirty_log(&self) -> Result<(), DirtyLogError> {
        Ok(vm::set_dirty_logging(&self.vm, &self.ram, false)?)
    }

    /// RAM pages written since [`Machine::start_dirty_log`] or the previous
    /// call (word bitmap over RAM page indices). KVM logs guest writes only;
    /// the pages the host writes on the guest's behalf (the mailbox page:
    /// device replies) are always included. Pages the host installs into
    /// lazy memory are not writes of the guest's: callers that track which
    /// pages exist (a lazy clone's populated set) see them there.
    pub fn take_dirty_pages(&self) -> Result<Vec<u64>, DirtyLogError> {
        let mut words = vm::take_dirty_log(&self.vm, &self.ram)?;
        let mailbox = (layout::MAILBOX_ADDR as usize) / PAGE_SIZE;
        words[mailbox / 64] |= 1 << (mailbox % 64);
        Ok(words)
    }

    /// Stops the vCPU threads and waits for them.
    pub fn stop(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        for vcpu in &self.vcpus {
            vcpu.request_stop();
        }
        self.bus.mailbox().interrupt();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.device_threads.clear();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // vCPU threads hold views of guest RAM: end them before it is unmapped.
        self.stop_threads();
    }
}

/// Writes the identity page tables (mapping `[0, map_end)` and at least
/// all RAM), the GDT and the (empty) IDT that the long-mode boot state
/// points at.
pub(crate) fn write_long_mode_tables(
    ram: &RamAccess,
    map_end: u64,
) -> Result<(), paging::PagingError> {
    let write = |gpa: u64, value: u64| {
        ram.write_u64(gpa, value)
            .unwrap_or_else(|e| unreachable!("fixed boot areas lie in the minimum RAM: {e}"));
    };
    for table in paging::identity_map(layout::gpa_end(ram.len()).max(map_end))? {
        for (i, entry) in table.entries.iter().enumerate() {
            if *entry != 0 {
                write(table.gpa + 8 * i as u64, *entry);
            }
        }
    }
    for (i, entry) in boot::gdt().iter().enumerate() {
        write(GDT_ADDR + 8 * i as u64, *entry);
    }
    write(IDT_ADDR, 0);
    Ok(())
}

/// Applies `advice` to all of guest RAM; failure only costs performance.
pub(crate) fn advise(ram: &GuestRam, advice: libc::c_int, name: &str) {
    // SAFETY: madvise on exactly the range `ram` owns; these advices change
    // paging behaviour, never the contents.
    let rc = unsafe { libc::madvise(ram.host_addr().cast(), ram.len(), advice) };
    if rc != 0 {
        tracing::debug!(advice = name, error = %std::io::Error::last_os_error(), "madvise on guest RAM refused");
    }
}

pub(crate) fn ram_access(ram: &GuestRam) -> RamAccess {
    // SAFETY: the view is handed only to devices and vCPU threads of the
    // machine that owns `ram`, which stops them before dropping it.
    unsafe { RamAccess::new(ram.host_addr(), ram.len()) }
}
