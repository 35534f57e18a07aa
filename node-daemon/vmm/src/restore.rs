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

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::arch::x86_64::layout::{MAILBOX_ADDR, gpa_to_ram_offset};
use crate::arch::x86_64::walk::{CpuRoots, cpu_pages};
use crate::devices::{DeviceState, PortIoBus};
use crate::image::{ImageOpenError, LiveImage, PageStore, StateContents};
use crate::machine::{Machine, MemoryBacking, VmShell, advise, ram_access};
use crate::memory::{
    AttachError, CowMapError, LazyMemory, LazyOptions, LazyRegisterError, PAGE_SIZE, PageSource,
};
use crate::vstate::vcpu::{self, VcpuRestoreError};
use crate::vstate::vm::{self, VmWideStateError};
use crate::vstate::{VmState, VmStateDecodeError};

/// An opened image, decoded once and shared by many clones.
#[derive(Debug, Clone)]
pub struct CloneSource {
    state: Arc<VmState>,
    /// The local page store; `None` for a source made from a state file
    /// alone ([`CloneSource::from_state`]: memory comes from a
    /// [`PageSource`] given with [`CloneMemory::LazyFrom`]).
    pages: Option<Arc<PageStore>>,
    startup_pages: Arc<[usize]>,
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
        let (contents, pages) = image.into_parts();
        let state = decode_state(&contents)?;
        // Found once here, off the clone-start path.
        let startup_pages = startup_pages(&state, &pages).into();
        Ok(Self {
            state: Arc::new(state),
            pages: Some(Arc::new(pages)),
            startup_pages,
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
        })
    }

    /// Reads the state file in `dir` and makes a source of it whose memory
    /// comes from `memory` (see [`CloneSource::from_state`]).
    pub fn open_state(dir: &Path, memory: &dyn PageSource) -> Result<Self, CloneSourceError> {
        let contents = crate::image::StateFile::read(dir).map_err(CloneSourceError::State)?;
        Self::from_state(&contents, memory)
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

/// Reads single pages for the startup walk.
trait StartupRead {
    fn is_zero(&self, page: usize) -> bool;
    fn read_page(&self, page: usize, buf: &mut [u8]) -> bool;
}

impl StartupRead for PageStore {
    fn is_zero(&self, page: usize) -> bool {
        !self.is_present(page)
    }
    fn read_page(&self, page: usize, buf: &mut [u8]) -> bool {
        PageStore::read_page(self, page, buf).is_ok()
    }
}

struct SourceReader<'a>(&'a dyn PageSource);

impl StartupRead for SourceReader<'_> {
    fn is_zero(&self, page: usize) -> bool {
        page >= self.0.pages() || self.0.is_zero(page)
    }
    fn read_page(&self, page: usize, buf: &mut [u8]) -> bool {
        self.0.read_pages(page, 1, buf).is_ok()
    }
}

fn startup_pages(state: &VmState, store: &dyn StartupRead) -> Vec<usize> {
    let mut cache: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut read_u64 = |gpa: u64| -> Option<u64> {
        let offset = gpa_to_ram_offset(gpa, state.memory_bytes)?;
        let index = offset as usize / PAGE_SIZE;
        if store.is_zero(index) {
            return Some(0);
        }
        let page = match cache.entry(index) {
            Entry::Occupied(page) => page.into_mut(),
            Entry::Vacant(slot) => {
                let mut page = vec![0u8; PAGE_SIZE];
                if !store.read_page(index, &mut page) {
                    return None;
                }
                slot.insert(page)
            }
        };
        let at = offset as usize % PAGE_SIZE;
        Some(u64::from_le_bytes(page[at..at + 8].try_into().ok()?))
    };
    let mut pages = std::collections::BTreeSet::new();
    pages.insert(MAILBOX_ADDR as usize / PAGE_SIZE);
    for vcpu in &state.vcpus {
        let roots = CpuRoots {
            cr3: vcpu.sregs.cr3,
            long_mode_paging: vcpu.sregs.cr0 & (1 << 31) != 0 && vcpu.sregs.efer & (1 << 10) != 0,
            rip: vcpu.regs.rip,
            rsp: vcpu.regs.rsp,
            gdt_base: vcpu.sregs.gdt.base,
            idt_base: vcpu.sregs.idt.base,
        };
        for gpa in cpu_pages(&roots, &mut read_u64, STARTUP_TABLE_LIMIT) {
            if let Some(offset) = gpa_to_ram_offset(gpa, state.memory_bytes) {
                pages.insert(offset as usize / PAGE_SIZE);
            }
        }
    }
    pages.into_iter().collect()
}

/// Most page-table pages walked for the startup set.
const STARTUP_TABLE_LIMIT: usize = 4096;

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

/// Restores `source` into `shell` and starts it.
pub fn restore(
    mut shell: VmShell,
    source: &CloneSource,
    memory: &CloneMemory,
) -> Result<Restored, RestoreError> {
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
    Ok(set_state(shell, state, backing, requested_at, timings)?.start())
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

    /// Creates the devices from the saved device state and starts the vCPUs.
    pub fn start(self) -> Restored {
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
        let machine = Machine::start(shell, bus, backing);
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
    vm::restore_vm_wide(shell.vm(), &state.vm)?;
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
