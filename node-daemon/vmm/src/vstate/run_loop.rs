//! The vCPU threads: one thread per vCPU runs KVM_RUN and dispatches port I/O
//! to the device bus. Pause, resume and stop are requested from any thread;
//! a running vCPU is kicked out of KVM_RUN with `immediate_exit` plus a
//! signal. A vCPU only reports itself paused after a KVM_RUN that returned
//! EINTR, so any port I/O it was in the middle of has been completed by KVM
//! and its saved state is consistent.
//!
//! Threads are spawned parked when the VM shell is created (spawning costs
//! a fraction of a millisecond here) and receive their devices at start.
//!
//! ```text
//!   NotStarted ──start──▶ Running ──pause──▶ Paused ──resume──▶ Running
//!                            │                  │
//!                            └──stop / fatal────┴──▶ Exited
//! ```

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::ram_access::RamAccess;
use crate::arch::x86_64::layout::gpa_to_ram_offset;
use crate::devices::PortIoBus;
use crate::devices::mmio_bus::MmioBus;

/// Brings in a guest page the vCPU found missing (lazily streamed memory):
/// called for an MMIO exit or a KVM_EXIT_MEMORY_FAULT at a RAM address.
pub trait MissingPageResolver: Send + Sync {
    /// Makes the page holding RAM offset `ram_offset` present; returns false
    /// if it cannot (the vCPU then stops).
    fn resolve(&self, ram_offset: u64) -> bool;
}

/// Why a vCPU thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEnd {
    /// Stopped on request.
    Stopped,
    /// The guest or KVM ended the vCPU (shutdown, internal error, ...).
    Fatal(String),
}

/// Run status of a vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStatus {
    NotStarted,
    Running,
    Paused,
    Exited(VcpuEnd),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// What a parked vCPU thread needs to run the guest.
pub struct StartArgs {
    pub bus: Arc<PortIoBus>,
    /// Devices in the MMIO hole.
    pub mmio: Arc<MmioBus>,
    pub ram: RamAccess,
    pub resolver: Option<Arc<dyn MissingPageResolver>>,
}

impl std::fmt::Debug for StartArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartArgs")
            .field("resolver", &self.resolver.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Control {
    request: Request,
    status: VcpuStatus,
    start: Option<StartArgs>,
}

/// Counters of one vCPU.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pub entries: AtomicU64,
    pub exits: AtomicU64,
    pub io_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    pub kicks: AtomicU64,
    pub run_ns: AtomicU64,
}

/// A snapshot of a vCPU's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuStats {
    pub entries: u64,
    pub exits: u64,
    pub io_exits: u64,
    pub mmio_exits: u64,
    pub kicks: u64,
    /// Wall time spent inside KVM_RUN.
    pub run_time: Duration,
    /// CPU time of the vCPU thread (user + system).
    pub cpu_time: Duration,
}

/// State shared between a vCPU thread and its controllers.
#[derive(Debug)]
pub struct VcpuShared {
    pub index: u8,
    fd: Mutex<VcpuFd>,
    kvm_run: AtomicPtr<kvm_run>,
    control: Mutex<Control>,
    changed: Condvar,
    pause_requested: AtomicBool,
    thread: OnceLock<libc::pthread_t>,
    cpu_clock: OnceLock<libc::clockid_t>,
    counters: VcpuCounters,
    first_entry: OnceLock<Instant>,
    first_exit: OnceLock<Instant>,
}

/// Error controlling a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuControlError {
    #[error("vCPU {index} has exited ({end:?})")]
    Exited { index: u8, end: VcpuEnd },
    #[error("vCPU {index} did not pause within {waited:?}")]
    PauseTimeout { index: u8, waited: Duration },
}

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction with an empty handler that touches
        // nothing; SA_RESTART is deliberately not set so KVM_RUN returns EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            let rc = libc::sigaction(kick_signal(), &action, std::ptr::null_mut());
            assert_eq!(rc, 0, "installing the vCPU kick signal handler failed");
        }
    });
}

impl VcpuShared {
    /// Wraps a vCPU fd; the thread is started by [`VcpuShared::spawn`].
    pub fn new(index: u8, mut fd: VcpuFd) -> Arc<Self> {
        let kvm_run: *mut kvm_run = fd.get_kvm_run();
        Arc::new(Self {
            index,
            fd: Mutex::new(fd),
            kvm_run: AtomicPtr::new(kvm_run),
            control: Mutex::new(Control {
                request: Request::Run,
                status: VcpuStatus::NotStarted,
                start: None,
            }),
            changed: Condvar::new(),
            pause_requested: AtomicBool::new(false),
            thread: OnceLock::new(),
            cpu_clock: OnceLock::new(),
            counters: VcpuCounters::default(),
            first_entry: OnceLock::new(),
            first_exit: OnceLock::new(),
        })
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The vCPU fd, for state save/restore. Blocks while the vCPU runs; lock
    /// it only when the vCPU is paused or not started.
    pub fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current status.
    pub fn status(&self) -> VcpuStatus {
        self.control().status.clone()
    }

    /// When the thread first called KVM_RUN.
    pub fn first_entry(&self) -> Option<Instant> {
        self.first_entry.get().copied()
    }

    /// When KVM_RUN first returned with a guest exit (not EINTR): the guest
    /// has executed instructions by then.
    pub fn first_exit(&self) -> Option<Instant> {
        self.first_exit.get().copied()
    }

    /// Counters.
    pub fn stats(&self) -> VcpuStats {
        let c = &self.counters;
        let cpu_time = self.cpu_clock.get().map_or(Duration::ZERO, |&clock| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: reading a CPU-time clock of a live (or joined, then the
            // call fails harmlessly with EINVAL) thread into a local timespec.
            let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
            if rc == 0 {
                Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
            } else {
                Duration::ZERO
            }
        });
        VcpuStats {
            entries: c.entries.load(Ordering::Relaxed),
            exits: c.exits.load(Ordering::Relaxed),
            io_exits: c.io_exits.load(Ordering::Relaxed),
            mmio_exits: c.mmio_exits.load(Ordering::Relaxed),
            kicks: c.kicks.load(Ordering::Relaxed),
            run_time: Duration::from_nanos(c.run_ns.load(Ordering::Relaxed)),
            cpu_time,
        }
    }

    fn set_immediate_exit(&self, value: u8) {
        let run = self.kvm_run.load(Ordering::Relaxed);
        // SAFETY: `run` is the vCPU's mmapped kvm_run structure, alive as long
        // as the fd inside `self`; immediate_exit is a plain byte the kernel
        // reads at KVM_RUN entry. Volatile because the kernel reads it.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(value) };
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    fn kick(&self) {
        self.set_immediate_exit(1);
        if let Some(&thread) = self.thread.get() {
            self.counters.kicks.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the thread id belongs to this vCPU's thread, which is
            // joined only after it has exited and no more kicks are sent.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Spawns the vCPU thread parked: it runs the guest after
    /// [`VcpuShared::start`] (or ends on [`VcpuShared::request_stop`]).
    pub fn spawn_parked(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        install_kick_handler();
        let shared = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || shared.thread_main())
    }

    /// Lets a parked thread run the guest with these devices.
    pub fn start(&self, args: StartArgs) {
        let mut control = self.control();
        control.start = Some(args);
        if control.status == VcpuStatus::NotStarted {
            // From now on a pause must wait for the thread to park.
            control.status = VcpuStatus::Running;
        }
        drop(control);
        self.changed.notify_all();
    }

    /// Asks the vCPU to pause (non-blocking).
    pub fn request_pause(&self) {
        let mut control = self.control();
        if control.request == Request::Run {
            control.request = Request::Pause;
        }
        self.pause_requested.store(true, Ordering::SeqCst);
        drop(control);
        self.kick();
    }

    /// Waits until the vCPU is paused, re-kicking it every millisecond.
    pub fn wait_paused(&self, timeout: Duration) -> Result<(), VcpuControlError> {
        let start = Instant::now();
        let mut control = self.control();
        loop {
            match &control.status {
                VcpuStatus::Paused | VcpuStatus::NotStarted => return Ok(()),
                VcpuStatus::Exited(end) => {
                    return Err(VcpuControlError::Exited {
                        index: self.index,
                        end: end.clone(),
                    });
                }
                VcpuStatus::Running => {}
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(VcpuControlError::PauseTimeout {
                    index: self.index,
                    waited,
                });
            }
            control = self
                .changed
                .wait_timeout(control, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if control.status == VcpuStatus::Running {
                self.kick();
            }
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut control = self.control();
        if control.request == Request::Pause {
            control.request = Request::Run;
            self.pause_requested.store(false, Ordering::SeqCst);
        }
        drop(control);
        self.changed.notify_all();
    }

    /// Asks the thread to end (non-blocking); join its handle afterwards.
    pub fn request_stop(&self) {
        let mut control = self.control();
        control.request = Request::Stop;
        self.pause_requested.store(true, Ordering::SeqCst);
        drop(control);
        self.changed.notify_all();
        self.kick();
    }

    fn set_status(&self, status: VcpuStatus) {
        self.control().status = status;
        self.changed.notify_all();
    }

    /// Parks the thread while a pause is requested; returns false to stop.
    fn park(&self) -> bool {
        let mut control = self.control();
        if control.request == Request::Pause {
            control.status = VcpuStatus::Paused;
            self.changed.notify_all();
            while control.request == Request::Pause {
                control = self
                    .changed
                    .wait(control)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        if control.request == Request::Stop {
            return false;
        }
        control.status = VcpuStatus::Running;
        self.changed.notify_all();
        // Clear the kick before looking at the request flag again: a pause
        // requested after this point sets immediate_exit anew.
        self.set_immediate_exit(0);
        true
    }

    fn thread_main(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let _ = self.thread.set(me);
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `me` is this live thread; `clock` is a local out-parameter.
        if unsafe { libc::pthread_getcpuclockid(me, &mut clock) } == 0 {
            let _ = self.cpu_clock.set(clock);
        }
        let StartArgs {
            bus,
            mmio,
            ram,
            resolver,
        } = {
            let mut control = self.control();
            loop {
                if control.request == Request::Stop {
                    control.status = VcpuStatus::Exited(VcpuEnd::Stopped);
                    self.changed.notify_all();
                    return;
                }
                if let Some(args) = control.start.take() {
                    break args;
                }
                control = self
                    .changed
                    .wait(control)
                    .unwrap_or_else(|p| p.into_inner());
            }
        };
        let (bus, mmio, resolver) = (bus.as_ref(), mmio.as_ref(), resolver.as_deref());
        if !self.park() {
            self.set_status(VcpuStatus::Exited(VcpuEnd::Stopped));
            return;
        }
        let end = loop {
            let mut fd = self.fd();
            let end = self.run_until_interrupted(&mut fd, bus, mmio, ram, resolver);
            drop(fd);
            if let Some(end) = end {
                break end;
            }
            if !self.park() {
                break VcpuEnd::Stopped;
            }
        };
        self.set_status(VcpuStatus::Exited(end));
    }

    /// Runs the guest until KVM_RUN returns EINTR while a pause or stop is
    /// requested (None) or the vCPU cannot continue (Some).
    fn run_until_interrupted(
        &self,
        fd: &mut VcpuFd,
        bus: &PortIoBus,
        mmio: &MmioBus,
        ram: RamAccess,
        resolver: Option<&dyn MissingPageResolver>,
    ) -> Option<VcpuEnd> {
        let c = &self.counters;
        loop {
            if self.pause_requested.load(Ordering::SeqCst) {
                // Complete any pending I/O, then return EINTR without entering
                // the guest.
                self.set_immediate_exit(1);
            }
            let _ = self.first_entry.set(Instant::now());
            c.entries.fetch_add(1, Ordering::Relaxed);
            let start = Instant::now();
            let result = fd.run();
            c.run_ns
                .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let exit = match result {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if self.pause_requested.load(Ordering::SeqCst) {
                        return None;
                    }
                    continue;
                }
                Err(e) if e.errno() == libc::EFAULT => {
                    return Some(VcpuEnd::Fatal(format!("KVM_RUN failed with EFAULT: {e}")));
                }
                Err(e) => return Some(VcpuEnd::Fatal(format!("KVM_RUN failed: {e}"))),
            };
            c.exits.fetch_add(1, Ordering::Relaxed);
            let _ = self.first_exit.set(Instant::now());
            match exit {
                VcpuExit::IoIn(port, data) => {
                    c.io_exits.fetch_add(1, Ordering::Relaxed);
                    bus.io_in(self.index, port, data);
                }
                VcpuExit::IoOut(port, data) => {
                    c.io_exits.fetch_add(1, Ordering::Relaxed);
                    bus.io_out(self.index, port, data);
                }
                VcpuExit::MmioRead(gpa, data) => {
                    c.mmio_exits.fetch_add(1, Ordering::Relaxed);
                    if let Err(end) =
                        complete_mmio(ram, resolver, mmio, gpa, MmioAccess::Read(data))
                    {
                        return Some(end);
                    }
                }
                VcpuExit::MmioWrite(gpa, data) => {
                    c.mmio_exits.fetch_add(1, Ordering::Relaxed);
                    if let Err(end) =
                        complete_mmio(ram, resolver, mmio, gpa, MmioAccess::Write(data))
                    {
                        return Some(end);
                    }
                }
                VcpuExit::MemoryFault { gpa, size, .. } => {
                    let resolved = gpa_to_ram_offset(gpa, ram.len())
                        .zip(resolver)
                        .is_some_and(|(offset, r)| r.resolve(offset));
                    if !resolved {
                        return Some(VcpuEnd::Fatal(format!(
                            "memory fault at guest {gpa:#x}+{size} that no backing can resolve"
                        )));
                    }
                }
                VcpuExit::Hlt => return Some(VcpuEnd::Fatal("guest halted (HLT exit)".into())),
                VcpuExit::Shutdown => {
                    return Some(VcpuEnd::Fatal("guest shut down (triple fault)".into()));
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return Some(VcpuEnd::Fatal(format!(
                        "KVM entry failed: hardware reason {reason:#x} on CPU {cpu}"
                    )));
                }
                VcpuExit::InternalError => {
                    let run = fd.get_kvm_run();
                    // SAFETY: the exit reason says the internal union member is valid.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let n = internal.ndata.min(16) as usize;
                    return Some(VcpuEnd::Fatal(format!(
                        "KVM internal error suberror {} data {:x?}",
                        internal.suberror,
                        &internal.data[..n]
                    )));
                }
                other => return Some(VcpuEnd::Fatal(format!("unexpected vCPU exit {other:?}"))),
            }
        }
    }
}

enum MmioAccess<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// Completes an MMIO exit. At a RAM address it is an access to a page that
/// lazily streamed memory has not brought in (PVM with UFFD_FEATURE_SIGBUS
/// reports those as MMIO): resolve the page, then perform the access on the
/// host mapping. Elsewhere (the MMIO hole) it goes to the device at that
/// address; where there is none, reads return zero and writes are ignored.
fn complete_mmio(
    ram: RamAccess,
    resolver: Option<&dyn MissingPageResolver>,
    mmio: &MmioBus,
    gpa: u64,
    access: MmioAccess<'_>,
) -> Result<(), VcpuEnd> {
    let Some(offset) = gpa_to_ram_offset(gpa, ram.len()) else {
        match access {
            MmioAccess::Read(data) => mmio.read(gpa, data),
            MmioAccess::Write(data) => mmio.write(gpa, data),
        }
        return Ok(());
    };
    let Some(resolver) = resolver else {
        return Err(VcpuEnd::Fatal(format!(
            "MMIO exit at RAM address {gpa:#x} without a lazy memory backing"
        )));
    };
    if !resolver.resolve(offset) {
        return Err(VcpuEnd::Fatal(format!(
            "cannot bring in guest page at {gpa:#x}"
        )));
    }
    let host = ram.base().wrapping_add(offset as usize);
    match access {
        MmioAccess::Read(data) => {
            if offset + data.len() as u64 > ram.len() {
                return Err(VcpuEnd::Fatal(format!(
                    "MMIO read past RAM end at {gpa:#x}"
                )));
            }
            // SAFETY: the range is inside guest RAM (checked) and now present.
            unsafe { std::ptr::copy_nonoverlapping(host, data.as_mut_ptr(), data.len()) };
        }
        MmioAccess::Write(data) => {
            if offset + data.len() as u64 > ram.len() {
                return Err(VcpuEnd::Fatal(format!(
                    "MMIO write past RAM end at {gpa:#x}"
                )));
            }
            // SAFETY: the range is inside guest RAM (checked) and now present.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, data.len()) };
        }
    }
    Ok(())
}
