//! Starting a clone: a live image's state and memory installed into a
//! pre-created [`VmShell`], then resumed. Nothing here grows with memory
//! size: memory is either mapped copy-on-write from the image's page store
//! (`MAP_PRIVATE|MAP_FIXED` over the already-registered range) or streamed
//! lazily through the shell's userfaultfd registration.
//!
//! What is measured: [`RestoreTimings`] covers the calling thread from the
//! request to the vCPU threads being started; [`Restored::first_entry`] and
//! [`Restored::first_exit`] add the time until vCPU 0 first entered KVM_RUN
//! and first came back with a guest exit (the guest has executed
//! instructions by then — the earliest point the VMM can observe that).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::devices::mmio_bus::MmioBus;
use crate::devices::virtio::attached::AttachedVirtio;
use crate::devices::{DeviceState, PortIoBus};
use crate::image::{ImageOpenError, LiveImage, PageStore, StateContents};
use crate::machine::{Machine, MemoryBacking, VmShell, advise, ram_access};
use crate::memory::{
    AttachError, CowMapError, LazyMemory, LazyOptions, LazyRegisterError, PAGE_SIZE, PageSource,
};
use crate::vstate::clock::{adjusted_clock, unix_now_ns};
use crate::vstate::vcpu::{self, VcpuRestoreError};
use crate::vstate::vm::{self, VmWideStateError};
use crate::vstate::{VmState, VmStateDecodeError};

mod startup;
use startup::{SourceReader, startup_pages};

/// An opened image, decoded once and shared by many clones.
#[derive(Debug, Clone)]
pub struct CloneSource {
    state: Arc<VmState>,
    /// The local page store; `None` for a source made from a state file
    /// alone ([`CloneSource::from_state`]: memory comes from a
    /// [`PageSource`] given with [`CloneMemory::LazyFrom`]).
    pages: Option<Arc<PageStore>>,
    startup_pages: Arc<[usize]>,
    /// The image directory (where a Linux guest's disk overlays are), for
    /// a source opened from one.
    dir: Option<PathBuf>,
}

/// Error opening a clone source.
#[derive(Debug, thiserror::Error)]
pub enum CloneSourceError {
    #[error("cannot open the live image")]
    Open(#[from] ImageOpenError),
    #[error("cannot decode the live image's machine state")]
    Decode(#[from] VmStateDecodeError),
    #[error("cannot read the live image's state file")]
    State(#[source] ImageOpenError),
    #[error("the page source has {source_pages} pages, the machine state {state_pages}")]
    SourceSize {
        source_pages: usize,
        state_pages: usize,
    },
    #[error(
        "the machine state describes {state} bytes of memory and {state_vcpus} vCPUs, the state file header {header} bytes and {header_vcpus} vCPUs"
    )]
    Inconsistent {
        state: u64,
        header: u64,
        state_vcpus: usize,
        header_vcpus: u32,
    },
}

impl CloneSource {
    /// Opens and decodes the image in `dir`.
    pub fn open(dir: &Path) -> Result<Self, CloneSourceError> {
        Self::from_image(LiveImage::open(dir)?)
    }

    /// Decodes an opened image.
    pub fn from_image(image: LiveImage) -> Result<Self, CloneSourceError> {
        let dir = image.dir().to_path_buf();
        let (contents, pages) = image.into_parts();
        let state = decode_state(&contents)?;
        // Found once here, off the clone-start path.
        let startup_pages = startup_pages(&state, &pages).into();
        Ok(Self {
            state: Arc::new(state),
            pages: Some(Arc::new(pages)),
            startup_pages,
            dir: Some(dir),
        })
    }

    /// A source made of a state file (`state.bin`, e.g. fetched from the
    /// image's home node) whose memory comes from `memory` (e.g. a remote
    /// page source): the startup pages are found by reading page tables
    /// through it. Clones of it start only with [`CloneMemory::LazyFrom`].
    pub fn from_state(
        contents: &StateContents,
        memory: &dyn PageSource,
    ) -> Result<Self, CloneSourceError> {
        let state = decode_state(contents)?;
        let state_pages = state.memory_bytes as usize / PAGE_SIZE;
        if memory.pages() != state_pages {
            return Err(CloneSourceError::SourceSize {
                source_pages: memory.pages(),
                state_pages,
            });
        }
        let startup_pages = startup_pages(&state, &SourceReader(memory)).into();
        Ok(Self {
            state: Arc::new(state),
            pages: None,
            startup_pages,
            dir: None,
        })
    }

    /// Reads the state file in `dir` and makes a source of it whose memory
    /// comes from `memory` (see [`CloneSource::from_state`]).
    pub fn open_state(dir: &Path, memory: &dyn PageSource) -> Result<Self, CloneSourceError> {
        let contents = crate::image::StateFile::read(dir).map_err(CloneSourceError::State)?;
        Self::from_state(&contents, memory)
    }

    /// The image directory, for a source opened from one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The machine state.
    pub fn state(&self) -> &VmState {
        &self.state
    }

    /// The page store.
    ///
    /// # Panics
    /// For a source made with [`CloneSource::from_state`], which has none
    /// (use [`CloneSource::page_store`]).
    pub fn pages(&self) -> &Arc<PageStore> {
        self.pages
            .as_ref()
            .expect("this clone source was made from a state file and has no page store")
    }

    /// The local page store, if the source has one.
    pub fn page_store(&self) -> Option<&Arc<PageStore>> {
        self.pages.as_ref()
    }

    /// RAM page indices a lazily streamed clone must have before its vCPUs
    /// run: page tables, code and stack pages, GDT, IDT, mailbox.
    pub fn startup_pages(&self) -> &[usize] {
        &self.startup_pages
    }
}

fn decode_state(contents: &StateContents) -> Result<VmState, CloneSourceError> {
    let state = VmState::decode(&contents.payload)?;
    if state.memory_bytes != contents.memory_size
        || state.vcpus.len() != contents.vcpu_count as usize
    {
        return Err(CloneSourceError::Inconsistent {
            state: state.memory_bytes,
            header: contents.memory_size,
            state_vcpus: state.vcpus.len(),
            header_vcpus: contents.vcpu_count,
        });
    }
    Ok(state)
}

/// How a clone's memory is provided.
#[derive(Clone, Default)]
pub enum CloneMemory {
    /// `MAP_PRIVATE` of the local page store: shared page cache, private writes.
    #[default]
    CopyOnWrite,
    /// Userfaultfd streaming from the page store (uses the shell's prepared
    /// registration, or registers now with these options).
    Lazy(LazyOptions),
    /// Userfaultfd streaming from any page source (e.g. the image's home
    /// node through the node cache); the only memory for a source made
    /// with [`CloneSource::from_state`].
    LazyFrom {
        options: LazyOptions,
        source: Arc<dyn PageSource>,
    },
}

impl std::fmt::Debug for CloneMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CopyOnWrite => f.write_str("CopyOnWrite"),
            Self::Lazy(options) => f.debug_tuple("Lazy").field(options).finish(),
            Self::LazyFrom { options, source } => f
                .debug_struct("LazyFrom")
                .field("options", options)
                .field("source_pages", &source.pages())
                .finish(),
        }
    }
}

/// Time spent in each step of a restore, on the calling thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreTimings {
    pub validate: Duration,
    pub memory: Duration,
    pub vm_state: Duration,
    pub vcpu_state: Duration,
    pub start: Duration,
    /// Request until the vCPU threads were started.
    pub total: Duration,
}

/// A started clone.
#[derive(Debug)]
pub struct Restored {
    pub machine: Machine,
    pub timings: RestoreTimings,
    /// When the restore was requested.
    pub requested_at: Instant,
    /// MSRs the host refused (per vCPU index).
    pub refused_msrs: Vec<(u8, Vec<u32>)>,
}

impl Restored {
    /// Request until vCPU 0 first called KVM_RUN, if it has.
    pub fn first_entry(&self) -> Option<Duration> {
        self.machine.vcpus()[0]
            .first_entry()
            .map(|t| t - self.requested_at)
    }

    /// Request until vCPU 0 first returned from KVM_RUN with a guest exit
    /// (the guest has executed instructions), waiting up to `timeout`.
    pub fn first_exit(&self, timeout: Duration) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.machine.vcpus()[0].first_exit() {
                return Some(t - self.requested_at);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the image has {image} vCPUs, the shell {shell}")]
    VcpuCount { image: usize, shell: u8 },
    #[error("the image has {image} bytes of memory, the shell {shell}")]
    MemorySize { image: u64, shell: usize },
    #[error("cannot map the image copy-on-write")]
    CopyOnWrite(#[from] CowMapError),
    #[error("cannot register guest RAM for lazy streaming")]
    LazyRegister(#[from] LazyRegisterError),
    #[error("cannot attach the page store to lazy memory")]
    LazyAttach(#[from] AttachError),
    #[error("the clone source has no local page store: use CloneMemory::LazyFrom")]
    NoPageStore,
    #[error("installed memory needs the shell's userfaultfd registration (VmShell::prepare_lazy)")]
    NotPrepared,
    #[error("the page source has {source_pages} pages, the image {image_pages}")]
    SourceSize {
        source_pages: usize,
        image_pages: usize,
    },
    #[error("cannot restore the VM-wide state")]
    VmState(#[from] VmWideStateError),
    #[error("cannot restore a vCPU")]
    Vcpu(#[from] VcpuRestoreError),
    #[error(
        "the image has {0} virtio devices: start it with linux::clone::restore_linux, which gives each clone its disks and taps"
    )]
    VirtioDevices(usize),
}

fn refuse_virtio(state: &VmState) -> Result<(), RestoreError> {
    match state.devices.virtio.len() {
        0 => Ok(()),
        n => Err(RestoreError::VirtioDevices(n)),
    }
}

/// The shell's lazy registration (or a new one) attached to `pages`, with
/// the startup pages brought in.
fn lazy_with(
    shell: &mut VmShell,
    options: &LazyOptions,
    source: &CloneSource,
    pages: Arc<dyn PageSource>,
) -> Result<LazyMemory, RestoreError> {
    let lazy = match shell.take_lazy() {
        Some(lazy) => lazy,
        None => LazyMemory::register(shell.ram(), options.clone())?,
    };
    lazy.attach(pages)?;
    // Pages the CPU walks or fetches itself, and the mailbox page the host
    // reads and writes on every report and request, come in before the
    // vCPUs start (see `arch::x86_64::walk`).
    for page in source.startup_pages() {
        let _ = lazy.fill_page(*page);
    }
    Ok(lazy)
}

/// Restores `source` into `shell` and starts it (an image without virtio
/// devices; a Linux guest's starts with `linux::clone::restore_linux`).
pub fn restore(
    shell: VmShell,
    source: &CloneSource,
    memory: &CloneMemory,
) -> Result<Restored, RestoreError> {
    refuse_virtio(source.state())?;
    Ok(prepare(shell, source, memory)?.start())
}

/// Restores `source` into `shell` with its memory, VM-wide and vCPU state,
/// leaving the vCPUs parked and the devices to the caller.
pub(crate) fn prepare(
    mut shell: VmShell,
    source: &CloneSource,
    memory: &CloneMemory,
) -> Result<PreparedVm, RestoreError> {
    let requested_at = Instant::now();
    let state = source.state();
    let config = shell.config();
    if state.vcpus.len() != usize::from(config.vcpus) {
        return Err(RestoreError::VcpuCount {
            image: state.vcpus.len(),
            shell: config.vcpus,
        });
    }
    let image_size = source
        .page_store()
        .map_or(state.memory_bytes, |store| store.memory_size());
    if state.memory_bytes != config.memory_bytes as u64 || image_size != state.memory_bytes {
        return Err(RestoreError::MemorySize {
            image: image_size,
            shell: config.memory_bytes,
        });
    }
    let mut timings = RestoreTimings {
        validate: requested_at.elapsed(),
        ..RestoreTimings::default()
    };

    let step = Instant::now();
    let backing = match memory {
        CloneMemory::CopyOnWrite => {
            let store = source.page_store().ok_or(RestoreError::NoPageStore)?;
            crate::memory::map_copy_on_write(shell.ram(), store)?;
            // Guest accesses are random: without this, every first touch of
            // a page reads ahead up to read_ahead_kb of the image (8 MiB on
            // these hosts: milliseconds per fault).
            advise(shell.ram(), libc::MADV_RANDOM, "MADV_RANDOM");
            MemoryBacking::CopyOnWrite(Arc::clone(store))
        }
        CloneMemory::Lazy(options) => {
            let store = source.page_store().ok_or(RestoreError::NoPageStore)?;
            let lazy = lazy_with(&mut shell, options, source, Arc::clone(store) as _)?;
            MemoryBacking::Lazy {
                memory: Arc::new(lazy),
                base: Arc::clone(store),
            }
        }
        CloneMemory::LazyFrom {
            options,
            source: pages,
        } => {
            let image_pages = state.memory_bytes as usize / PAGE_SIZE;
            if pages.pages() != image_pages {
                return Err(RestoreError::SourceSize {
                    source_pages: pages.pages(),
                    image_pages,
                });
            }
            let lazy = lazy_with(&mut shell, options, source, Arc::clone(pages))?;
            MemoryBacking::LazyFrom {
                memory: Arc::new(lazy),
                source: Arc::clone(pages),
            }
        }
    };
    timings.memory = step.elapsed();
    set_state(shell, state, backing, requested_at, timings)
}

/// A shell whose VM-wide and vCPU state is set and whose memory backing is
/// chosen; its vCPUs are still parked. [`PreparedVm::start`] runs it.
#[derive(Debug)]
pub struct PreparedVm {
    shell: VmShell,
    devices: DeviceState,
    backing: MemoryBacking,
    timings: RestoreTimings,
    requested_at: Instant,
    refused_msrs: Vec<(u8, Vec<u32>)>,
}

impl PreparedVm {
    /// MSRs the host refused (per vCPU index).
    pub fn refused_msrs(&self) -> &[(u8, Vec<u32>)] {
        &self.refused_msrs
    }

    /// The shell (to wire devices into its VM and RAM before the start).
    pub(crate) fn shell(&self) -> &VmShell {
        &self.shell
    }

    /// The memory backing chosen.
    pub(crate) fn backing(&self) -> &MemoryBacking {
        &self.backing
    }

    /// Creates the port devices from the saved device state and starts the vCPUs.
    pub fn start(self) -> Restored {
        self.start_with(MmioBus::default(), None, Vec::new())
    }

    /// [`PreparedVm::start`] with virtio devices restored by the caller:
    /// their bus, the owner of their threads, and the devices themselves.
    pub(crate) fn start_with(
        self,
        mmio: MmioBus,
        threads: Option<Box<dyn Send + Sync>>,
        virtio: Vec<AttachedVirtio>,
    ) -> Restored {
        let Self {
            shell,
            devices,
            backing,
            mut timings,
            requested_at,
            refused_msrs,
        } = self;
        let step = Instant::now();
        let bus = Arc::new(PortIoBus::new(devices, ram_access(shell.ram())));
        let mut machine = Machine::start_with_mmio(shell, bus, Arc::new(mmio), backing);
        if let Some(threads) = threads {
            machine.keep_device_threads(threads);
        }
        machine.attach_virtio(virtio);
        timings.start = step.elapsed();
        timings.total = requested_at.elapsed();
        Restored {
            machine,
            timings,
            requested_at,
            refused_msrs,
        }
    }
}

fn set_state(
    shell: VmShell,
    state: &VmState,
    backing: MemoryBacking,
    requested_at: Instant,
    mut timings: RestoreTimings,
) -> Result<PreparedVm, RestoreError> {
    let step = Instant::now();
    let clock = adjusted_clock(
        state.vm.clock.clock,
        state.captured_at_unix_ns,
        unix_now_ns(),
    );
    vm::restore_vm_wide(shell.vm(), &state.vm, clock)?;
    timings.vm_state = step.elapsed();

    let step = Instant::now();
    let mut refused_msrs = Vec::new();
    for (vcpu, saved) in shell.vcpus().iter().zip(&state.vcpus) {
        let refused = vcpu::restore_vcpu(shell.host(), &vcpu.fd(), saved)?;
        if !refused.is_empty() {
            refused_msrs.push((saved.index, refused));
        }
    }
    timings.vcpu_state = step.elapsed();
    Ok(PreparedVm {
        shell,
        devices: state.devices.clone(),
        backing,
        timings,
        requested_at,
        refused_msrs,
    })
}

/// Memory for [`restore_state`].
#[derive(Clone)]
pub enum StateMemory {
    /// The shell's prepared userfaultfd registration ([`VmShell::prepare_lazy`]),
    /// with a hook or source already attached and populated by the caller
    /// through [`crate::memory::PageInstaller`]. `image`: the live image the
    /// VM descends from, as held on this node (see [`MemoryBacking::Installed`]).
    Installed { image: Option<Arc<PageStore>> },
    /// Userfaultfd streaming from any page source (attached now; the startup
    /// pages found from the state's page tables are brought in first).
    LazyFrom {
        options: LazyOptions,
        source: Arc<dyn PageSource>,
    },
}

impl std::fmt::Debug for StateMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Installed { image } => f.debug_struct("Installed").field("image", image).finish(),
            Self::LazyFrom { options, source } => f
                .debug_struct("LazyFrom")
                .field("options", options)
                .field("source_pages", &source.pages())
                .finish(),
        }
    }
}

/// Restores a given machine state (e.g. received from a live-migration
/// source) into `shell` over `memory`, with the vCPUs left parked:
/// [`PreparedVm::start`] runs it. Nothing is read from an image directory.
pub fn restore_state(
    mut shell: VmShell,
    state: &VmState,
    memory: StateMemory,
) -> Result<PreparedVm, RestoreError> {
    let requested_at = Instant::now();
    refuse_virtio(state)?;
    let config = shell.config();
    if state.vcpus.len() != usize::from(config.vcpus) {
        return Err(RestoreError::VcpuCount {
            image: state.vcpus.len(),
            shell: config.vcpus,
        });
    }
    if state.memory_bytes != config.memory_bytes as u64 {
        return Err(RestoreError::MemorySize {
            image: state.memory_bytes,
            shell: config.memory_bytes,
        });
    }
    let mut timings = RestoreTimings {
        validate: requested_at.elapsed(),
        ..RestoreTimings::default()
    };
    let step = Instant::now();
    let backing = match memory {
        StateMemory::Installed { image } => {
            let lazy = shell.take_lazy().ok_or(RestoreError::NotPrepared)?;
            MemoryBacking::Installed {
                memory: Arc::new(lazy),
                image,
            }
        }
        StateMemory::LazyFrom { options, source } => {
            let pages = state.memory_bytes as usize / PAGE_SIZE;
            if source.pages() != pages {
                return Err(RestoreError::SourceSize {
                    source_pages: source.pages(),
                    image_pages: pages,
                });
            }
            let lazy = match shell.take_lazy() {
                Some(lazy) => lazy,
                None => LazyMemory::register(shell.ram(), options)?,
            };
            lazy.attach(Arc::clone(&source))?;
            for page in startup_pages(state, &SourceReader(source.as_ref())) {
                let _ = lazy.fill_page(page);
            }
            MemoryBacking::LazyFrom {
                memory: Arc::new(lazy),
                source,
            }
        }
    };
    timings.memory = step.elapsed();
    set_state(shell, state, backing, requested_at, timings)
}
