//! Capturing a running machine into a live image without stopping it for
//! longer than a state save and a `fork`:
//!
//! 1. prepare the page-store writer (files, buffers) while the VM runs;
//! 2. pause all vCPUs, save [`VmState`] (vCPUs, irqchip, PIT, clock,
//!    devices), quiesce the userfaultfd handler of a lazily streamed clone;
//! 3. `fork`: the child holds a copy-on-write snapshot of guest memory and
//!    writes the page store with only raw system calls, then `_exit`s;
//! 4. the parent resumes the vCPUs at once;
//! 5. [`PendingCapture::wait`] reaps the child, reads its result from a
//!    pipe and writes the state file last (it is what makes the directory a
//!    complete image).
//!
//! A Linux guest's disks travel with the image: each writable disk's
//! overlay is copied into the directory during the pause (`disk-<name>.overlay`,
//! a reflink where the file system can, else a sparse copy of the written
//! blocks, so the pause grows with the blocks written); the base image is
//! hashed before the pause and recorded by path, size, mtime and SHA-256.
//!
//! For a lazily streamed clone, pages never populated are taken from its
//! base image by the writer (the child's mappings are not registered with
//! userfaultfd, so reading them there would give zeros).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::devices::virtio::VirtioModelState;
use crate::devices::virtio::disk_files::{BaseDiskError, OverlayCopyError, copy_overlay};
use crate::image::{
    PageStoreWriter, StateContents, StateFile, StateWriteError, WriteError, WriteSummary,
};
use crate::machine::{Machine, MemoryBacking, PauseError, StateSaveError};
use crate::vstate::VmState;

/// How long each step of a capture took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureTimings {
    /// Preparing the page-store writer (VM running).
    pub prepare: Duration,
    /// Pause request until every vCPU was paused.
    pub pause: Duration,
    /// Saving vCPU, VM and device state.
    pub save_state: Duration,
    /// The `fork` call.
    pub fork: Duration,
    /// Pause request until the vCPUs were resumed: the source's downtime.
    pub source_paused: Duration,
    /// Fork until the child had written the page store.
    pub write_pages: Duration,
    /// Writing the state file.
    pub write_state: Duration,
    /// Start of the capture until the image was complete.
    pub total: Duration,
}

/// A finished capture.
#[derive(Debug, Clone)]
pub struct CaptureReport {
    pub dir: PathBuf,
    pub timings: CaptureTimings,
    pub pages: WriteSummary,
    /// Bytes of the state payload.
    pub state_bytes: usize,
}

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot prepare the page store in {dir}")]
    Prepare {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot pause the source VM")]
    Pause(#[from] PauseError),
    #[error("cannot save the source VM's state")]
    SaveState(#[from] StateSaveError),
    #[error("cannot identify the base image of a disk of the source VM")]
    Disk(#[from] BaseDiskError),
    #[error("cannot copy a disk overlay into the live image")]
    Overlay(#[from] OverlayCopyError),
    #[error("cannot create the result pipe")]
    Pipe(#[source] std::io::Error),
    #[error("fork failed")]
    Fork(#[source] std::io::Error),
    #[error("the page-store writer child failed")]
    Write(#[source] WriteError),
    #[error("the page-store writer child ended abnormally (wait status {0:#x})")]
    ChildDied(i32),
    #[error("cannot wait for the page-store writer child")]
    Wait(#[source] std::io::Error),
    #[error("cannot write the state file")]
    StateFile(#[from] StateWriteError),
    #[error(
        "{missing} pages of the VM's memory are not installed yet (migration still in progress)"
    )]
    Incomplete { missing: usize },
    #[error("cannot bring in page {page} from the clone's page source before the capture")]
    Materialize {
        page: usize,
        #[source]
        source: crate::memory::FillError,
    },
}

/// For a clone streamed from a page source without a local page store:
/// brings in every page never populated (the forked writer cannot read a
/// remote source), so the child finds all of guest RAM in memory.
fn materialize(machine: &Machine) -> Result<(), CaptureError> {
    if let MemoryBacking::Installed { memory, .. } = machine.backing() {
        // Pages still owed by the installer (e.g. a migration in postcopy)
        // cannot be fetched from here.
        let missing = memory.populated().len() - memory.populated().count_ones();
        return if missing == 0 {
            Ok(())
        } else {
            Err(CaptureError::Incomplete { missing })
        };
    }
    let MemoryBacking::LazyFrom { memory, .. } = machine.backing() else {
        return Ok(());
    };
    let populated = memory.populated();
    let mut page = 0;
    while let Some(next) = populated.next_clear(page) {
        memory
            .fill_page(next)
            .map_err(|source| CaptureError::Materialize { page: next, source })?;
        page = next + 1;
    }
    Ok(())
}

/// A capture whose page store is still being written by a child process;
/// the source VM is already running again.
#[derive(Debug)]
#[must_use = "a pending capture must be waited for, or the child is left a zombie"]
pub struct PendingCapture {
    dir: PathBuf,
    /// The writer child until it is reaped.
    child: Option<libc::pid_t>,
    result: OwnedFd,
    state: StateContents,
    started: Instant,
    forked: Instant,
    timings: CaptureTimings,
}

const RESULT_OK: u8 = 1;
const RESULT_ERR: u8 = 2;
const RESULT_LEN: usize = 1 + 32;

/// Captures `machine` into `dir` (an existing, empty directory) and waits
/// until the image is complete.
pub fn capture(machine: &Machine, dir: &Path) -> Result<CaptureReport, CaptureError> {
    start_capture(machine, dir)?.wait()
}

/// Pauses `machine`, snapshots it, resumes it, and returns while the page
/// store is written in the background by a forked child.
pub fn start_capture(machine: &Machine, dir: &Path) -> Result<PendingCapture, CaptureError> {
    let started = Instant::now();
    materialize(machine)?;
    // Hashing reads each base image whole: before the pause, once per disk.
    for device in machine.virtio() {
        if let Some(disk) = device.disk() {
            disk.identity()?;
        }
    }
    let ram = machine.guest_ram();
    let writer =
        PageStoreWriter::prepare(dir, ram.len()).map_err(|source| CaptureError::Prepare {
            dir: dir.to_path_buf(),
            source,
        })?;
    let (read_end, write_end) = pipe().map_err(CaptureError::Pipe)?;
    let mut timings = CaptureTimings {
        prepare: started.elapsed(),
        ..CaptureTimings::default()
    };

    let pause_start = Instant::now();
    if let Err(e) = machine.pause() {
        machine.resume();
        return Err(e.into());
    }
    timings.pause = pause_start.elapsed();
    let save_start = Instant::now();
    let mut state = match machine.save_state() {
        Ok(state) => state,
        Err(e) => {
            machine.resume();
            return Err(e.into());
        }
    };
    // Requests the host queued for the source are its callers' business:
    // a live image is a template, and its clones must not apply them with
    // nobody waiting for the answers.
    state.devices.mailbox.pending.clear();
    if let Err(e) = copy_overlays(machine, &state, dir) {
        machine.resume();
        return Err(e.into());
    }
    timings.save_state = save_start.elapsed();

    let (base, populated, quiesce) = match machine.backing() {
        MemoryBacking::Lazy { memory, base } => (
            Some(base.as_ref()),
            Some(memory.populated()),
            Some(memory.quiesce()),
        ),
        // Every page was brought in by `materialize` (pages are never
        // dropped from a LazyFrom clone), so guest RAM is complete; the
        // same holds for installed memory (checked by `materialize`).
        MemoryBacking::LazyFrom { memory, .. } | MemoryBacking::Installed { memory, .. } => {
            (None, None, Some(memory.quiesce()))
        }
        _ => (None, None, None),
    };
    let mem = ram.host_addr().cast_const();
    let fork_start = Instant::now();
    // SAFETY: fork in a multithreaded process: the child only runs
    // `write_child`, which uses raw system calls on pre-opened descriptors
    // and preallocated buffers, then `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the child; see `write_child`.
        unsafe { write_child(writer, mem, base, populated, write_end.as_raw_fd()) };
    }
    let fork_error = (pid < 0).then(std::io::Error::last_os_error);
    timings.fork = fork_start.elapsed();
    drop(quiesce);
    machine.resume();
    timings.source_paused = pause_start.elapsed();
    if let Some(error) = fork_error {
        return Err(CaptureError::Fork(error));
    }
    drop(write_end);
    drop(writer);
    Ok(PendingCapture {
        dir: dir.to_path_buf(),
        child: Some(pid),
        result: read_end,
        state: state_contents(&state),
        started,
        forked: fork_start,
        timings,
    })
}

/// Copies each writable disk's overlay as it is at the pause into `dir`,
/// under the name its saved state gives.
fn copy_overlays(machine: &Machine, state: &VmState, dir: &Path) -> Result<(), OverlayCopyError> {
    for (device, saved) in machine.virtio().iter().zip(&state.devices.virtio) {
        let (Some(from), VirtioModelState::Block { state, disk }) =
            (device.overlay_path(), &saved.model)
        else {
            continue;
        };
        let Some(file) = &disk.overlay_file else {
            continue;
        };
        let overlay = &state.device.overlay;
        copy_overlay(from, &dir.join(file), overlay.len, &overlay.written)?;
    }
    Ok(())
}

fn state_contents(state: &VmState) -> StateContents {
    StateContents {
        memory_size: state.memory_bytes,
        vcpu_count: state.vcpus.len() as u32,
        payload: state.encode(),
    }
}

/// The forked child: write the page store, report through the pipe, exit.
/// Nothing here allocates; `finish` releases the writer's buffers, which
/// glibc's fork handlers make safe in the child.
///
/// # Safety
/// Must only be called in the child of `fork`, with `mem` the guest RAM
/// snapshot of `writer.mem_len()` bytes.
unsafe fn write_child(
    mut writer: PageStoreWriter,
    mem: *const u8,
    base: Option<&crate::image::PageStore>,
    populated: Option<&crate::image::Bitmap>,
    result_fd: libc::c_int,
) -> ! {
    // SAFETY: the child owns a private copy of guest memory; nothing writes it.
    let outcome = unsafe { writer.write_from(mem, base, populated) }
        .and_then(|summary| writer.finish().map(|()| summary));
    let mut message = [0u8; RESULT_LEN];
    match outcome {
        Ok(summary) => {
            message[0] = RESULT_OK;
            let words = [
                summary.pages,
                summary.nonzero_pages,
                summary.pages_from_base,
                summary.runs,
            ];
            for (i, v) in words.into_iter().enumerate() {
                message[1 + 8 * i..9 + 8 * i].copy_from_slice(&v.to_le_bytes());
            }
        }
        Err(e) => {
            message[0] = RESULT_ERR;
            message[1..21].copy_from_slice(&e.to_bytes());
        }
    }
    // SAFETY: write to the pipe we own, then leave without running any
    // destructor or atexit handler.
    unsafe {
        libc::write(result_fd, message.as_ptr().cast(), message.len());
        libc::_exit(0)
    }
}

impl PendingCapture {
    /// Timings known so far (the source is already running).
    pub fn timings(&self) -> CaptureTimings {
        self.timings
    }

    /// Pid of the writer child.
    pub fn child(&self) -> Option<libc::pid_t> {
        self.child
    }

    /// Waits for the child and writes the state file on a background thread.
    pub fn wait_in_background(
        self,
    ) -> std::thread::JoinHandle<Result<CaptureReport, CaptureError>> {
        std::thread::spawn(move || self.wait())
    }

    /// Waits for the child, then writes the state file.
    pub fn wait(mut self) -> Result<CaptureReport, CaptureError> {
        let mut message = [0u8; RESULT_LEN];
        let mut got = 0;
        while got < RESULT_LEN {
            // SAFETY: reads into the local buffer from the pipe we own.
            let n = unsafe {
                libc::read(
                    self.result.as_raw_fd(),
                    message[got..].as_mut_ptr().cast(),
                    RESULT_LEN - got,
                )
            };
            if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if n <= 0 {
                break;
            }
            got += n as usize;
        }
        let pid = self
            .child
            .take()
            .expect("the child is reaped only here or in drop");
        let status = wait_child(pid).map_err(CaptureError::Wait)?;
        let mut timings = self.timings;
        timings.write_pages = self.forked.elapsed();
        let pages = match (got, message[0]) {
            (RESULT_LEN, RESULT_OK) => {
                let word = |i: usize| {
                    u64::from_le_bytes(message[1 + 8 * i..9 + 8 * i].try_into().expect("8 bytes"))
                };
                WriteSummary {
                    pages: word(0),
                    nonzero_pages: word(1),
                    pages_from_base: word(2),
                    runs: word(3),
                }
            }
            (RESULT_LEN, RESULT_ERR) => {
                let bytes: [u8; 20] = message[1..21].try_into().expect("20 bytes");
                return Err(match WriteError::from_bytes(&bytes) {
                    Some(e) => CaptureError::Write(e),
                    None => CaptureError::ChildDied(status),
                });
            }
            _ => return Err(CaptureError::ChildDied(status)),
        };
        let write_state = Instant::now();
        StateFile::write(&self.dir, &self.state)?;
        timings.write_state = write_state.elapsed();
        timings.total = self.started.elapsed();
        let state_bytes = self.state.payload.len();
        let dir = self.dir.clone();
        Ok(CaptureReport {
            dir,
            timings,
            pages,
            state_bytes,
        })
    }
}

impl Drop for PendingCapture {
    fn drop(&mut self) {
        // Not waited for: reap the child so it does not linger as a zombie.
        if let Some(pid) = self.child.take() {
            let _ = wait_child(pid);
        }
    }
}

fn wait_child(pid: libc::pid_t) -> std::io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child into a local status word.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINTR) {
            return Err(error);
        }
    }
    Ok(status)
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the local array with two new descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
