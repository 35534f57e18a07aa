//! The VM shell of a migration target, made before the switch-over because
//! memory-slot registration is the slow part: a `vmstream_vmm` [`VmShell`]
//! whose guest RAM is registered with userfaultfd, with the migration's
//! [`TargetMemory`] attached as its missing-page hook. When the state
//! arrives it becomes a `vmstream_vmm::restore::PreparedVm` (state set,
//! vCPUs parked) and, on Go, a running `vmstream_vmm::machine::Machine`
//! like any other VM (pause, capture, migrate again).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_vmm::image::PageStore;
use vmstream_vmm::machine::{MachineConfig, ShellCreateError, VmShell};
use vmstream_vmm::memory::{GuestRam, LazyOptions, LazyRegisterError, PageSource};
use vmstream_vmm::restore::{PreparedVm, RestoreError, StateMemory, restore_state};
use vmstream_vmm::vstate::VmState;
use vmstream_vmm::vstate::vm::KvmHost;

use crate::target_memory::{TargetMemory, TargetMemoryError};

/// Why a target shell could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TargetShellError {
    #[error("cannot create the VM shell")]
    Shell(#[from] ShellCreateError),
    #[error("cannot register guest RAM with userfaultfd")]
    Register(#[from] LazyRegisterError),
    #[error("cannot set up the target's guest memory")]
    Memory(#[from] TargetMemoryError),
    #[error("the shell's guest RAM is registered in SIGBUS mode (faults never reach a handler)")]
    SigbusShell,
}

/// A VM ready to receive a migrated state.
#[derive(Debug)]
pub struct TargetShell {
    shell: VmShell,
    memory: Arc<TargetMemory>,
    image: Option<Arc<PageStore>>,
    created_in: Duration,
}

impl TargetShell {
    /// Creates the VM, vCPUs, guest RAM (registered with KVM and
    /// userfaultfd). `image` is the live image the source VM was cloned
    /// from, as held on this node.
    pub fn create(
        host: &Arc<KvmHost>,
        config: MachineConfig,
        image: Option<Arc<PageStore>>,
    ) -> Result<Self, TargetShellError> {
        let start = Instant::now();
        let shell = VmShell::create(host, config)?;
        Self::with_shell(shell, image, start)
    }

    /// Makes a target of a shell made earlier (e.g. a node's warm shell:
    /// its slot registration is already paid). Its userfaultfd
    /// registration, if prepared, must be plain (no SIGBUS mode) and have
    /// nothing attached.
    pub fn from_shell(
        shell: VmShell,
        image: Option<Arc<PageStore>>,
    ) -> Result<Self, TargetShellError> {
        let mut target = Self::with_shell(shell, image, Instant::now())?;
        target.created_in += target.shell.created_in();
        Ok(target)
    }

    fn with_shell(
        mut shell: VmShell,
        image: Option<Arc<PageStore>>,
        start: Instant,
    ) -> Result<Self, TargetShellError> {
        if shell.lazy().is_some_and(|lazy| lazy.options().sigbus) {
            return Err(TargetShellError::SigbusShell);
        }
        shell.prepare_lazy(LazyOptions::default())?;
        let lazy = shell.lazy().expect("prepared above");
        let memory = Arc::new(TargetMemory::attach(
            lazy,
            image.as_ref().map(|i| Arc::clone(i) as Arc<dyn PageSource>),
        )?);
        Ok(Self {
            shell,
            memory,
            image,
            created_in: start.elapsed(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> MachineConfig {
        self.shell.config()
    }

    /// How long creating the shell took.
    pub fn created_in(&self) -> Duration {
        self.created_in
    }

    /// The guest RAM mapping (reading a page not installed yet waits for
    /// it).
    pub fn ram(&self) -> &GuestRam {
        self.shell.ram()
    }

    /// The target's guest memory.
    pub fn memory(&self) -> &Arc<TargetMemory> {
        &self.memory
    }

    /// Sets the VM-wide and vCPU state (vCPUs stay parked); the machine's
    /// memory is what was and will be installed through [`TargetMemory`].
    pub fn set_state(self, state: &VmState) -> Result<PreparedVm, RestoreError> {
        restore_state(
            self.shell,
            state,
            StateMemory::Installed { image: self.image },
        )
    }
}
