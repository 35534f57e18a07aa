//! VM mode: `vmstream-node vm --id ID ...` runs exactly one VM in its own
//! process. It joins its cgroup, creates the VM shell (VM, vCPUs, memory
//! slots and, for lazy clones, the userfaultfd registration) *before* any
//! start request, listens on `<state>/vms/<id>/control.sock`, writes
//! `vm.json`, and then serves the supervisor protocol
//! ([`crate::vm_protocol`]) until a `stop` request, after which it removes
//! its directory and exits. The process does not depend on the daemon that
//! started it: the daemon may die and a new one re-adopts the VM from
//! `vm.json`.
//!
//! Phases: `Warm --start--> Starting --> Running <--pause/resume--> Paused`;
//! any --stop--> `Stopping` (exit); a failed start or a vCPU that ended
//! gives `Failed`. Which request is allowed in which phase is decided by the
//! pure [`admit`].
//!
//! Exactly-once mailbox requests across a migration: a mailbox call is
//! counted in the [`MailboxGate`] (under the core lock, together with its
//! admission) until its answer is back; `migrate` closes the gate (new
//! mailbox requests are refused with `mailbox refused: the VM is
//! migrating`, nothing applied) and waits until the calls in flight are
//! answered before the migration pauses the VM, so the saved state never
//! carries a request whose waiter is here. A migration that fails before
//! the switch-over opens the gate again.

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vmstream_vmm::capture::capture;
use vmstream_vmm::devices::mailbox::{ARGS, report, request};
use vmstream_vmm::machine::{BootOptions, Machine, MachineConfig, VmShell};
use vmstream_vmm::memory::{
    LazyOptions, drop_image_equal_pages, merge_identical_pages, range_footprint,
};
use vmstream_vmm::restore::{CloneMemory, CloneSource, restore};
use vmstream_vmm::vstate::run_loop::{VcpuEnd, VcpuStatus};
use vmstream_vmm::vstate::vm::KvmHost;

use crate::cgroup;

mod migration;
use crate::proc_stats;
use crate::vm_protocol::{
    CaptureSummary, CloneBackend, FaultFigures, MAX_FRAME, MemoryFigures, ReclaimSummary, Reply,
    Request, Response, StartReport, StartSpec, VmPhase, VmStats, parse_request, read_frame,
    write_frame,
};
use crate::vm_record::{VmKind, VmOwner, VmPaths, VmRecord, bind_socket, dir_size, validate_id};

/// How one VM process is set up (its command line).
#[derive(Debug, Clone)]
pub struct VmProcessConfig {
    pub id: String,
    pub state_dir: PathBuf,
    pub vcpus: u8,
    pub memory_bytes: usize,
    /// Start at once (in the background, the socket answers meanwhile).
    pub start: Option<StartSpec>,
    /// Register guest RAM with userfaultfd before the start request.
    pub prepare_lazy: bool,
    /// Open (and decode) this image before the start request.
    pub preload_image: Option<PathBuf>,
    pub owner: Option<VmOwner>,
    /// cgroup v2 roots to try; empty: no cgroup.
    pub cgroup_roots: Vec<PathBuf>,
    /// Mark a clone's guest RAM mergeable (KSM, `MADV_MERGEABLE`) when it
    /// starts, so ksmd may merge identical pages of different clones.
    pub ksm: bool,
    /// Lazy clones copy every page of the image in the background after
    /// the start (the clone then no longer depends on the image).
    pub lazy_prefetch: bool,
}

/// Errors setting up a VM process.
#[derive(Debug, thiserror::Error)]
pub enum VmProcessError {
    #[error("invalid VM id")]
    Id(#[from] crate::vm_record::VmIdError),
    #[error("cannot create the VM directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("cannot open /dev/kvm")]
    Kvm(#[from] vmstream_vmm::vstate::vm::KvmHostError),
    #[error("cannot create the VM shell")]
    Shell(#[from] vmstream_vmm::machine::ShellCreateError),
    #[error("cannot register guest RAM with userfaultfd")]
    Lazy(#[from] vmstream_vmm::memory::LazyRegisterError),
    #[error("cannot open the live image {0}")]
    Image(PathBuf, #[source] vmstream_vmm::restore::CloneSourceError),
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    #[error("cannot write the VM record")]
    Record(#[from] crate::vm_record::RecordError),
}

/// Whether `request` may run in `phase` (`migrating`: a migration of this
/// VM is under way); the error names why not.
pub fn admit(phase: &VmPhase, migrating: bool, request: &Request) -> Result<(), String> {
    use VmPhase::*;
    let allowed = match request {
        Request::Ping | Request::Stats | Request::Stop | Request::WaitRunning { .. } => true,
        Request::Start { .. } => *phase == Warm,
        Request::Pause | Request::Mailbox { .. } => *phase == Running,
        Request::Resume => *phase == Paused,
        Request::Capture { .. } | Request::Reclaim { .. } => matches!(phase, Running | Paused),
        Request::Receive { .. } => *phase == Warm,
        Request::Migrate { .. } => *phase == Running,
    };
    if !allowed {
        return Err(format!(
            "{} refused: the VM is {}",
            request.name(),
            phase_name(phase)
        ));
    }
    // While migrating the VM is paused and resumed by the migration and its
    // state is saved: nothing else may run in it or change it.
    let refused_while_migrating = matches!(
        request,
        Request::Mailbox { .. }
            | Request::Pause
            | Request::Resume
            | Request::Capture { .. }
            | Request::Reclaim { .. }
            | Request::Migrate { .. }
    );
    if migrating && refused_while_migrating {
        return Err(format!("{} refused: the VM is migrating", request.name()));
    }
    Ok(())
}

/// Mailbox calls and migrations of one VM, kept under the VM's core lock
/// (pure: no I/O, no waiting). A mailbox call is counted from its admission
/// (same lock hold) until its answer or failure; a migration closes the
/// gate, then waits until [`MailboxGate::drained`] before it pauses the VM.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MailboxGate {
    migrating: bool,
    in_flight: usize,
}

impl MailboxGate {
    /// Whether a migration has closed the gate.
    pub fn migrating(&self) -> bool {
        self.migrating
    }

    /// Mailbox calls admitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Admits `request` in `phase`; an admitted mailbox call is counted
    /// (the caller must [`MailboxGate::leave`] when it finished).
    pub fn admit(&mut self, phase: &VmPhase, request: &Request) -> Result<(), String> {
        admit(phase, self.migrating, request)?;
        if matches!(request, Request::Mailbox { .. }) {
            self.in_flight += 1;
        }
        Ok(())
    }

    /// A counted mailbox call finished (answered, timed out or failed).
    pub fn leave(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Closes the gate for a migration of a VM in `phase`: from now on
    /// mailbox requests are refused. Refused itself unless the VM runs
    /// and no other migration is under way.
    pub fn begin_migration(&mut self, phase: &VmPhase) -> Result<(), String> {
        if *phase != VmPhase::Running {
            return Err(format!("migrate refused: the VM is {}", phase_name(phase)));
        }
        if self.migrating {
            return Err("migrate refused: the VM is migrating".into());
        }
        self.migrating = true;
        Ok(())
    }

    /// No mailbox call is in flight: the VM may be paused and saved.
    pub fn drained(&self) -> bool {
        self.in_flight == 0
    }

    /// The migration ended (it failed before the switch-over and the VM
    /// runs here again, or the phase already refuses mailbox requests).
    pub fn end_migration(&mut self) {
        self.migrating = false;
    }
}

/// Opens a remote image for a clone: pages through the daemon's relay
/// (no cache in this process: guest memory keeps what it touched, the
/// daemon's node cache keeps everything for the node), state from
/// `state_dir`. The error is a message for the start failure.
fn open_remote(
    state_dir: &std::path::Path,
    image_id: &str,
    relay: std::net::SocketAddr,
    token_file: &std::path::Path,
    shell: MachineConfig,
) -> Result<(CloneSource, Arc<dyn vmstream_vmm::memory::PageSource>), String> {
    use vmstream_pagestream::{ClusterToken, DirectPages, RemoteConfig};
    let token = ClusterToken::from_file(token_file).map_err(|e| chain(&e))?;
    let pages = DirectPages::open(RemoteConfig::new(image_id, vec![relay], token))
        .map_err(|e| chain(&e))?;
    let source = CloneSource::open_state(state_dir, &pages).map_err(|e| {
        format!(
            "opening remote image {image_id} (state in {}): {}",
            state_dir.display(),
            chain(&e)
        )
    })?;
    let state = source.state();
    if state.vcpus.len() != usize::from(shell.vcpus)
        || state.memory_bytes != shell.memory_bytes as u64
    {
        return Err(format!(
            "remote image {image_id} has {} vCPUs and {} bytes of memory, this VM shell {} and {}",
            state.vcpus.len(),
            state.memory_bytes,
            shell.vcpus,
            shell.memory_bytes
        ));
    }
    Ok((source, Arc::new(pages)))
}

fn phase_name(phase: &VmPhase) -> &'static str {
    match phase {
        VmPhase::Warm => "warm (not started)",
        VmPhase::Starting => "starting",
        VmPhase::Running => "running",
        VmPhase::Paused => "paused",
        VmPhase::Failed => "failed",
        VmPhase::Stopping => "stopping",
    }
}

struct Core {
    phase: VmPhase,
    shell: Option<VmShell>,
    machine: Option<Arc<Machine>>,
    preloaded: Option<(PathBuf, CloneSource)>,
    start: Option<StartReport>,
    failure: Option<String>,
    record: VmRecord,
    /// Mailbox responses counted at start (a clone inherits its image's count).
    responses_at_start: u64,
    /// Pages a reclaim never drops (a clone's startup pages: page tables,
    /// code, stack, mailbox).
    keep_pages: Vec<usize>,
    /// Whether guest RAM was marked mergeable (KSM).
    ksm_enabled: bool,
    /// Mailbox calls in flight and whether a migration refuses new ones.
    mailbox_gate: MailboxGate,
}

/// A started VM.
struct Started {
    machine: Arc<Machine>,
    report: StartReport,
    kind: VmKind,
    image: Option<PathBuf>,
    keep_pages: Vec<usize>,
    ksm_enabled: bool,
}

/// A failed start: what remains of the VM (a shell that was not consumed
/// lets the VM stay warm).
struct StartFailure {
    message: String,
    machine: Option<Arc<Machine>>,
    shell: Option<VmShell>,
}

impl StartFailure {
    fn boxed(message: String, machine: Option<Arc<Machine>>, shell: Option<VmShell>) -> Box<Self> {
        Box::new(Self {
            message,
            machine,
            shell,
        })
    }
}

/// A counted mailbox call: leaves the [`MailboxGate`] when dropped
/// (answered, failed or unwound) and wakes a migration waiting for it.
struct MailboxCall<'a>(&'a Vm);

impl Drop for MailboxCall<'_> {
    fn drop(&mut self) {
        let mut core = self.0.lock();
        core.mailbox_gate.leave();
        self.0.changed.notify_all();
    }
}

struct Vm {
    paths: VmPaths,
    config: MachineConfig,
    shell_created_ms: f64,
    core: Mutex<Core>,
    changed: Condvar,
    /// Held by a capture or a reclaim (both pause and resume the vCPUs).
    capture_lock: Mutex<()>,
    ksm: bool,
    lazy_options: LazyOptions,
}

/// Milliseconds with microsecond resolution (status fields stay readable).
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A 1-vCPU VM process runs on one CPU: its vCPU thread and its
/// userfaultfd fault handler (started after this, so they inherit the
/// affinity) then share that CPU. On these hosts a fault served across CPUs
/// costs ~75 µs against ~18 µs on the same CPU. VM processes are spread over
/// the CPUs by process id. Multi-vCPU VMs are left to the scheduler.
fn pin_single_vcpu_process(config: &VmProcessConfig) {
    if config.vcpus != 1 {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = std::process::id() as usize % cpus;
    if let Err(e) = vmstream_vmm::memory::pin_thread(0, cpu) {
        tracing::warn!(cpu, error = %e, "VM process not pinned to a CPU");
    }
}

/// Runs the VM process until a stop request (then exits the process).
pub fn run(config: VmProcessConfig) -> Result<(), VmProcessError> {
    validate_id(&config.id)?;
    let paths = VmPaths::new(&config.state_dir, &config.id);
    std::fs::create_dir_all(&paths.dir).map_err(|e| VmProcessError::Dir(paths.dir.clone(), e))?;
    let cgroup = join_cgroup(&config);
    pin_single_vcpu_process(&config);
    let host = KvmHost::open()?;
    let machine_config = MachineConfig {
        vcpus: config.vcpus,
        memory_bytes: config.memory_bytes,
    };
    let mut shell = VmShell::create(&host, machine_config)?;
    let lazy_wanted = config.prepare_lazy
        || matches!(
            &config.start,
            Some(
                StartSpec::Clone {
                    backend: CloneBackend::Lazy,
                    ..
                } | StartSpec::RemoteClone { .. }
            )
        );
    let lazy_options = LazyOptions {
        prefetch: config.lazy_prefetch,
        ..LazyOptions::default()
    };
    if lazy_wanted {
        shell.prepare_lazy(lazy_options.clone())?;
    }
    let preloaded = match &config.preload_image {
        Some(dir) => Some((
            dir.clone(),
            CloneSource::open(dir).map_err(|e| VmProcessError::Image(dir.clone(), e))?,
        )),
        None => None,
    };
    let shell_created_ms = ms(shell.created_in());
    tracing::info!(id = %config.id, shell_ms = shell_created_ms, "VM shell created");

    let _ = std::fs::remove_file(&paths.socket);
    let listener =
        bind_socket(&paths.socket).map_err(|e| VmProcessError::Listen(paths.socket.clone(), e))?;
    let pid = std::process::id();
    let record = VmRecord {
        id: config.id.clone(),
        pid,
        start_ticks: proc_stats::read_stat(pid).map_or(0, |s| s.start_ticks),
        kind: VmKind::Warm,
        image: None,
        owner: config.owner.clone(),
        vcpus: config.vcpus,
        memory_bytes: config.memory_bytes as u64,
        created_at: chrono::Utc::now().to_rfc3339(),
        socket: paths.socket.clone(),
        cgroup,
    };
    record.write(&paths.record)?;
    let vm = Arc::new(Vm {
        paths,
        config: machine_config,
        shell_created_ms,
        core: Mutex::new(Core {
            phase: VmPhase::Warm,
            shell: Some(shell),
            machine: None,
            preloaded,
            start: None,
            failure: None,
            record,
            responses_at_start: 0,
            keep_pages: Vec::new(),
            ksm_enabled: false,
            mailbox_gate: MailboxGate::default(),
        }),
        changed: Condvar::new(),
        capture_lock: Mutex::new(()),
        ksm: config.ksm,
        lazy_options,
    });
    {
        let vm = Arc::clone(&vm);
        std::thread::Builder::new()
            .name("serial-log".into())
            .spawn(move || vm.copy_serial_output())
            .map_err(|e| VmProcessError::Listen(PathBuf::from("serial-log thread"), e))?;
    }
    if let Some(spec) = config.start.clone() {
        let vm = Arc::clone(&vm);
        std::thread::spawn(move || {
            if let Err(e) = vm.start(spec, false) {
                tracing::error!(error = %e, "VM start failed");
                // Nobody will send another start: the VM has failed.
                let mut core = vm.lock();
                core.failure = Some(e);
                vm.set_phase(&mut core, VmPhase::Failed);
            }
        });
    }
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let vm = Arc::clone(&vm);
                std::thread::spawn(move || vm.serve(stream));
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
    Ok(())
}

fn join_cgroup(config: &VmProcessConfig) -> Option<PathBuf> {
    if config.cgroup_roots.is_empty() {
        return None;
    }
    let joined =
        cgroup::find_root(&config.cgroup_roots).and_then(|root| cgroup::join(&root, &config.id));
    match joined {
        Ok(path) => Some(path),
        Err(e) => {
            tracing::warn!(error = %e, "VM runs without its own cgroup");
            None
        }
    }
}

impl Vm {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_phase(&self, core: &mut Core, phase: VmPhase) {
        core.phase = phase;
        self.changed.notify_all();
    }

    /// The phase, with a vCPU that ended turning a running VM into Failed.
    fn phase(&self, core: &mut Core) -> VmPhase {
        if matches!(core.phase, VmPhase::Running | VmPhase::Paused)
            && let Some(machine) = &core.machine
        {
            for vcpu in machine.vcpus() {
                if let VcpuStatus::Exited(VcpuEnd::Fatal(why)) = vcpu.status() {
                    core.failure = Some(format!("vCPU {} ended: {why}", vcpu.index));
                    self.set_phase(core, VmPhase::Failed);
                    break;
                }
            }
        }
        core.phase.clone()
    }

    fn machine(&self) -> Result<Arc<Machine>, String> {
        self.lock()
            .machine
            .clone()
            .ok_or_else(|| "the VM has no machine".to_string())
    }

    fn serve(self: &Arc<Self>, stream: UnixStream) {
        let Ok(read_half) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(read_half);
        let mut writer = stream;
        loop {
            let frame = match read_frame(&mut reader, MAX_FRAME) {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(_) => return,
            };
            let request = frame.and_then(|line| parse_request(&line));
            let (response, stop) = match request {
                Err(e) => (Response::error(e.to_string()), false),
                Ok(request) => {
                    let stop = request == Request::Stop;
                    (self.handle(request), stop)
                }
            };
            if write_frame(&mut writer, &response).is_err() && !stop {
                return;
            }
            if stop && response.ok {
                self.exit_after_stop();
            }
        }
    }

    fn handle(self: &Arc<Self>, request: Request) -> Response {
        // Admission and the count of mailbox calls in flight under one lock
        // hold: a migration closing the gate sees every admitted call.
        let _mailbox_call = {
            let mut core = self.lock();
            let phase = self.phase(&mut core);
            if let Err(e) = core.mailbox_gate.admit(&phase, &request) {
                let why = core
                    .failure
                    .as_ref()
                    .map(|f| format!("{e}: {f}"))
                    .unwrap_or(e);
                return Response::error(why);
            }
            matches!(request, Request::Mailbox { .. }).then(|| MailboxCall(self))
        };
        let result = match request {
            Request::Ping => {
                let mut core = self.lock();
                let phase = self.phase(&mut core);
                Ok(Reply::Pong {
                    id: core.record.id.clone(),
                    pid: core.record.pid,
                    phase,
                })
            }
            Request::Start { spec } => self.start(spec, true).map(Reply::Started),
            Request::Pause => self.pause(),
            Request::Resume => self.resume(),
            Request::Capture { dir } => self.capture(&dir).map(Reply::Captured),
            Request::Stop => {
                let mut core = self.lock();
                self.set_phase(&mut core, VmPhase::Stopping);
                Ok(Reply::Stopping)
            }
            Request::Stats => Ok(Reply::Stats(Box::new(self.stats()))),
            Request::Mailbox {
                request,
                timeout_ms,
            } => self.ask(request, Duration::from_millis(timeout_ms.unwrap_or(20_000))),
            Request::WaitRunning { timeout_ms } => {
                self.wait_running(Duration::from_millis(timeout_ms))
            }
            Request::Reclaim { max_bytes } => self.reclaim(max_bytes).map(Reply::Reclaimed),
            Request::Receive {
                listen,
                image,
                token_file,
            } => self.receive(listen, image, &token_file),
            Request::Migrate {
                target,
                mode,
                token_file,
                precopy_rounds,
                bandwidth_bytes_per_s,
                target_has_image,
            } => self.migrate(
                target,
                mode,
                &token_file,
                precopy_rounds,
                bandwidth_bytes_per_s,
                target_has_image,
            ),
        };
        match result {
            Ok(reply) => Response::ok(reply),
            Err(e) => Response::error(e),
        }
    }

    /// Starts the VM; `warm`: the start came as a request to a waiting shell.
    fn start(&self, spec: StartSpec, warm: bool) -> Result<StartReport, String> {
        let requested = Instant::now();
        let (shell, preloaded) = {
            let mut core = self.lock();
            let phase = self.phase(&mut core);
            admit(&phase, false, &Request::Start { spec: spec.clone() })?;
            let shell = core.shell.take().ok_or("the VM shell is gone")?;
            self.set_phase(&mut core, VmPhase::Starting);
            (shell, core.preloaded.take())
        };
        let outcome = self.start_in(shell, preloaded, &spec, requested, warm);
        let mut core = self.lock();
        match outcome {
            Ok(Started {
                machine,
                report,
                kind,
                image,
                keep_pages,
                ksm_enabled,
            }) => {
                core.responses_at_start = responses(&machine);
                core.keep_pages = keep_pages;
                core.ksm_enabled = ksm_enabled;
                core.machine = Some(machine);
                core.start = Some(report.clone());
                core.record.kind = kind;
                core.record.image = image;
                if let Err(e) = core.record.write(&self.paths.record) {
                    tracing::warn!(error = %e, "VM record not updated");
                }
                self.set_phase(&mut core, VmPhase::Running);
                Ok(report)
            }
            Err(failure) => {
                let StartFailure {
                    message,
                    machine,
                    shell,
                } = *failure;
                core.machine = machine;
                if let Some(shell) = shell {
                    // Nothing consumed the shell: the VM stays warm.
                    core.shell = Some(shell);
                    self.set_phase(&mut core, VmPhase::Warm);
                } else {
                    core.failure = Some(message.clone());
                    self.set_phase(&mut core, VmPhase::Failed);
                }
                Err(message)
            }
        }
    }

    fn start_in(
        &self,
        shell: VmShell,
        preloaded: Option<(PathBuf, CloneSource)>,
        spec: &StartSpec,
        requested: Instant,
        warm: bool,
    ) -> Result<Started, Box<StartFailure>> {
        let mut report = StartReport {
            shell_created_ms: self.shell_created_ms,
            warm,
            ..StartReport::default()
        };
        match spec {
            StartSpec::Boot {
                guest,
                fill,
                params,
                ready_timeout_ms,
            } => {
                let options = BootOptions {
                    params: params.clone(),
                    fill: *fill,
                };
                let machine = Machine::boot(shell, *guest, &options)
                    .map(Arc::new)
                    .map_err(|e| {
                        StartFailure::boxed(
                            format!("booting {}: {}", guest.name(), chain(&e)),
                            None,
                            None,
                        )
                    })?;
                report.start_ms = ms(requested.elapsed());
                // Stats and pause work while the guest boots.
                self.lock().machine = Some(Arc::clone(&machine));
                let ready = machine.mailbox().wait_report(
                    0,
                    Duration::from_millis(*ready_timeout_ms),
                    |r| r.kind == report::READY,
                );
                if ready.is_none() {
                    return Err(StartFailure::boxed(
                        format!(
                            "the {} guest did not report READY within {ready_timeout_ms} ms",
                            guest.name()
                        ),
                        Some(machine),
                        None,
                    ));
                }
                report.first_exit_ms = Some(ms(requested.elapsed()));
                Ok(Started {
                    machine,
                    report,
                    kind: VmKind::Boot,
                    image: None,
                    keep_pages: Vec::new(),
                    ksm_enabled: false,
                })
            }
            StartSpec::Clone { image, backend } => {
                let source = match preloaded {
                    Some((dir, source)) if &dir == image => source,
                    _ => match CloneSource::open(image) {
                        Ok(source) => source,
                        Err(e) => {
                            let message =
                                format!("opening live image {}: {}", image.display(), chain(&e));
                            return Err(StartFailure::boxed(message, None, Some(shell)));
                        }
                    },
                };
                let state = source.state();
                if state.vcpus.len() != usize::from(self.config.vcpus)
                    || state.memory_bytes != self.config.memory_bytes as u64
                {
                    let message = format!(
                        "live image {} has {} vCPUs and {} bytes of memory, this VM shell {} and {}",
                        image.display(),
                        state.vcpus.len(),
                        state.memory_bytes,
                        self.config.vcpus,
                        self.config.memory_bytes
                    );
                    return Err(StartFailure::boxed(message, None, Some(shell)));
                }
                let memory = match backend {
                    CloneBackend::CopyOnWrite => CloneMemory::CopyOnWrite,
                    CloneBackend::Lazy => CloneMemory::Lazy(self.lazy_options.clone()),
                };
                let restored = restore(shell, &source, &memory).map_err(|e| {
                    StartFailure::boxed(
                        format!("starting a clone of {}: {}", image.display(), chain(&e)),
                        None,
                        None,
                    )
                })?;
                report.start_ms = ms(requested.elapsed());
                // After the start is timed: marking is not on the start path.
                let ksm_enabled = self.ksm
                    && merge_identical_pages(restored.machine.guest_ram())
                        .inspect_err(|e| tracing::warn!(error = %chain(e), "KSM not enabled"))
                        .is_ok();
                report.first_exit_ms = restored.first_exit(Duration::from_secs(10)).map(|_| {
                    restored.machine.vcpus()[0]
                        .first_exit()
                        .map_or(0.0, |t| ms(t - requested))
                });
                Ok(Started {
                    machine: Arc::new(restored.machine),
                    report,
                    kind: VmKind::Clone,
                    image: Some(image.clone()),
                    keep_pages: source.startup_pages().to_vec(),
                    ksm_enabled,
                })
            }
            StartSpec::RemoteClone {
                state_dir,
                image_id,
                relay,
                token_file,
            } => {
                let (source, pages) =
                    match open_remote(state_dir, image_id, *relay, token_file, self.config) {
                        Ok(x) => x,
                        Err(message) => {
                            return Err(StartFailure::boxed(message, None, Some(shell)));
                        }
                    };
                let memory = CloneMemory::LazyFrom {
                    options: self.lazy_options.clone(),
                    source: pages,
                };
                let restored = restore(shell, &source, &memory).map_err(|e| {
                    StartFailure::boxed(
                        format!("starting a clone of remote image {image_id}: {}", chain(&e)),
                        None,
                        None,
                    )
                })?;
                report.start_ms = ms(requested.elapsed());
                report.first_exit_ms = restored.first_exit(Duration::from_secs(10)).map(|_| {
                    restored.machine.vcpus()[0]
                        .first_exit()
                        .map_or(0.0, |t| ms(t - requested))
                });
                Ok(Started {
                    machine: Arc::new(restored.machine),
                    report,
                    kind: VmKind::Clone,
                    image: Some(state_dir.clone()),
                    keep_pages: source.startup_pages().to_vec(),
                    ksm_enabled: false,
                })
            }
        }
    }

    fn pause(&self) -> Result<Reply, String> {
        let machine = self.machine()?;
        let took = machine.pause().map_err(|e| chain(&e))?;
        let mut core = self.lock();
        self.set_phase(&mut core, VmPhase::Paused);
        Ok(Reply::Paused { pause_ms: ms(took) })
    }

    fn resume(&self) -> Result<Reply, String> {
        let machine = self.machine()?;
        machine.resume();
        let mut core = self.lock();
        self.set_phase(&mut core, VmPhase::Running);
        Ok(Reply::Resumed)
    }

    fn capture(&self, dir: &Path) -> Result<CaptureSummary, String> {
        let _one_at_a_time = self.capture_lock.lock().unwrap_or_else(|e| e.into_inner());
        let machine = self.machine()?;
        let was_paused = self.lock().phase == VmPhase::Paused;
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let captured = capture(&machine, dir)
            .map_err(|e| format!("capturing into {}: {}", dir.display(), chain(&e)));
        // Capture resumes the source; a paused VM stays paused.
        if was_paused && let Err(e) = machine.pause() {
            tracing::warn!(error = %e, "re-pausing after capture failed");
        }
        let report = captured?;
        Ok(CaptureSummary {
            dir: dir.to_path_buf(),
            memory_bytes: self.config.memory_bytes as u64,
            pages: report.pages.pages,
            nonzero_pages: report.pages.nonzero_pages,
            size_bytes: dir_size(dir).unwrap_or(0),
            capture_ms: ms(report.timings.total),
            source_pause_ms: ms(report.timings.source_paused),
        })
    }

    fn reclaim(&self, max_bytes: u64) -> Result<ReclaimSummary, String> {
        let _one_at_a_time = self.capture_lock.lock().unwrap_or_else(|e| e.into_inner());
        let machine = self.machine()?;
        let (was_paused, keep) = {
            let core = self.lock();
            (core.phase == VmPhase::Paused, core.keep_pages.clone())
        };
        let report = drop_image_equal_pages(&machine, &keep, max_bytes, !was_paused)
            .map_err(|e| format!("reclaiming guest memory: {}", chain(&e)))?;
        let ram = machine.guest_ram();
        let private_after =
            range_footprint(None, ram.host_addr() as usize, ram.len()).map_or(0, |f| f.owned());
        Ok(ReclaimSummary {
            scanned_pages: report.scanned_pages,
            image_equal_pages: report.image_equal_pages,
            dropped_bytes: report.dropped_bytes(),
            clean_left_bytes: report.clean_left_bytes(),
            guest_private_after: private_after,
            paused_ms: ms(report.paused),
            took_ms: ms(report.took),
        })
    }

    fn ask(&self, n: u64, timeout: Duration) -> Result<Reply, String> {
        let mailbox = self.mailbox()?;
        let mut args = [0u64; ARGS];
        args[0] = n;
        let sent = Instant::now();
        let answer = mailbox
            .call(request::ANSWER, args, report::RESPONSE, timeout)
            .map_err(|e| format!("{e} (does the guest answer requests?)"))?;
        Ok(Reply::Answer {
            answer: answer.args[0],
            round_trip_us: sent.elapsed().as_micros() as u64,
        })
    }

    fn wait_running(&self, timeout: Duration) -> Result<Reply, String> {
        let deadline = Instant::now() + timeout;
        let mut core = self.lock();
        loop {
            match self.phase(&mut core) {
                VmPhase::Running | VmPhase::Paused => return Ok(Reply::Running),
                VmPhase::Failed => {
                    return Err(format!(
                        "the VM failed: {}",
                        core.failure.as_deref().unwrap_or("unknown")
                    ));
                }
                VmPhase::Stopping => return Err("the VM is stopping".into()),
                VmPhase::Warm | VmPhase::Starting => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("the VM is not running after {timeout:?}"));
            }
            core = self
                .changed
                .wait_timeout(core, (deadline - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn stats(&self) -> VmStats {
        let (phase, machine, start, record, base, ksm_enabled) = {
            let mut core = self.lock();
            let phase = self.phase(&mut core);
            (
                phase,
                core.machine.clone(),
                core.start.clone(),
                core.record.clone(),
                core.responses_at_start,
                core.ksm_enabled,
            )
        };
        let pid = record.pid;
        let rollup = proc_stats::read_smaps_rollup(None).unwrap_or_default();
        let mut stats = VmStats {
            id: record.id.clone(),
            pid,
            phase: Some(phase),
            vcpus: self.config.vcpus,
            memory_bytes: self.config.memory_bytes as u64,
            process_cpu_ms: proc_stats::read_stat(pid)
                .map_or(0.0, |s| ms(proc_stats::ticks_to_duration(s.cpu_ticks))),
            memory: MemoryFigures {
                rss: rollup.rss,
                pss: rollup.pss,
                private: rollup.private,
                shared: rollup.shared,
                ksm_enabled,
                ..MemoryFigures::default()
            },
            start,
            sampled_at_ms: now_ms(),
            ..VmStats::default()
        };
        let Some(machine) = machine else {
            return stats;
        };
        let m = machine.stats();
        stats.vcpu_cpu_ms = m.vcpus.iter().map(|v| ms(v.cpu_time)).sum();
        stats.requests_served = responses(&machine).saturating_sub(base);
        let ram = machine.guest_ram();
        if let Ok(f) = range_footprint(None, ram.host_addr() as usize, ram.len()) {
            stats.memory.guest_resident = f.resident;
            stats.memory.guest_private = f.owned();
            stats.memory.guest_shared = f.shared_with_node();
            stats.memory.guest_ksm = f.ksm;
        }
        if let Some(memory) = machine.backing().lazy_memory() {
            let f = memory.stats();
            stats.faults = FaultFigures {
                faults: f.faults,
                pages_copied: f.pages_copied,
                pages_zeroed: f.pages_zeroed,
                errors: f.errors,
                latency_us: f
                    .latency
                    .buckets
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(|(b, n)| (vmstream_vmm::memory::latency::bucket_upper_us(b), *n))
                    .collect(),
                p50_us: f.latency.quantile_upper_us(0.5),
                p99_us: f.latency.quantile_upper_us(0.99),
            };
        }
        stats
    }

    fn exit_after_stop(&self) -> ! {
        let machine = self.lock().machine.take();
        if let Some(machine) = machine {
            match Arc::try_unwrap(machine) {
                Ok(machine) => machine.stop(),
                // Another request still holds it; exiting ends its threads.
                Err(shared) => drop(shared),
            }
        }
        self.append_serial_output(&mut self.serial_written());
        if let Err(e) = std::fs::remove_dir_all(&self.paths.dir) {
            tracing::warn!(error = %e, dir = %self.paths.dir.display(), "VM directory not removed");
        }
        tracing::info!("VM stopped");
        std::process::exit(0)
    }

    fn serial_written(&self) -> usize {
        std::fs::metadata(&self.paths.serial).map_or(0, |m| m.len() as usize)
    }

    fn append_serial_output(&self, written: &mut usize) {
        let Some(machine) = self.lock().machine.clone() else {
            return;
        };
        let output = machine.serial_output();
        if output.len() <= *written {
            return;
        }
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.paths.serial)
            .and_then(|mut f| f.write_all(&output[*written..]));
        if appended.is_ok() {
            *written = output.len();
        }
    }

    /// Copies the guest's serial output into `serial.log` as it grows.
    fn copy_serial_output(&self) {
        let mut written = 0;
        loop {
            std::thread::sleep(Duration::from_millis(250));
            if self.lock().phase == VmPhase::Stopping {
                return;
            }
            self.append_serial_output(&mut written);
        }
    }
}

fn responses(machine: &Machine) -> u64 {
    machine
        .mailbox()
        .save()
        .reports_by_kind
        .get(&report::RESPONSE)
        .copied()
        .unwrap_or(0)
}

/// An error with its sources, `a: b: c`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_by_phase() {
        let start = Request::Start {
            spec: StartSpec::Clone {
                image: "/i".into(),
                backend: CloneBackend::Lazy,
            },
        };
        assert!(admit(&VmPhase::Warm, false, &start).is_ok());
        let e = admit(&VmPhase::Running, false, &start).unwrap_err();
        assert_eq!(e, "start refused: the VM is running");
        assert!(admit(&VmPhase::Running, false, &Request::Pause).is_ok());
        assert!(admit(&VmPhase::Paused, false, &Request::Pause).is_err());
        assert!(admit(&VmPhase::Paused, false, &Request::Resume).is_ok());
        assert!(
            admit(
                &VmPhase::Warm,
                false,
                &Request::Capture { dir: "/d".into() }
            )
            .is_err()
        );
        assert!(
            admit(
                &VmPhase::Paused,
                false,
                &Request::Capture { dir: "/d".into() }
            )
            .is_ok()
        );
        let reclaim = Request::Reclaim { max_bytes: 1 };
        assert!(admit(&VmPhase::Running, false, &reclaim).is_ok());
        assert!(admit(&VmPhase::Paused, false, &reclaim).is_ok());
        assert_eq!(
            admit(&VmPhase::Warm, false, &reclaim).unwrap_err(),
            "reclaim refused: the VM is warm (not started)"
        );
        let ask = Request::Mailbox {
            request: 1,
            timeout_ms: None,
        };
        assert!(admit(&VmPhase::Paused, false, &ask).is_err());
        for phase in [
            VmPhase::Warm,
            VmPhase::Starting,
            VmPhase::Failed,
            VmPhase::Stopping,
        ] {
            assert!(admit(&phase, false, &Request::Stop).is_ok());
            assert!(admit(&phase, false, &Request::Stats).is_ok());
        }
    }

    fn ask(n: u64) -> Request {
        Request::Mailbox {
            request: n,
            timeout_ms: None,
        }
    }

    #[test]
    fn a_migrating_vm_refuses_what_would_touch_it() {
        let running = VmPhase::Running;
        assert_eq!(
            admit(&running, true, &ask(1)).unwrap_err(),
            "mailbox refused: the VM is migrating"
        );
        for refused in [
            Request::Pause,
            Request::Capture { dir: "/d".into() },
            Request::Reclaim { max_bytes: 1 },
        ] {
            assert!(admit(&running, true, &refused).is_err(), "{refused:?}");
        }
        assert!(admit(&VmPhase::Paused, true, &Request::Resume).is_err());
        for allowed in [Request::Ping, Request::Stats, Request::Stop] {
            assert!(admit(&running, true, &allowed).is_ok(), "{allowed:?}");
        }
        // The phase's refusal is named first.
        assert_eq!(
            admit(&VmPhase::Stopping, true, &ask(1)).unwrap_err(),
            "mailbox refused: the VM is stopping"
        );
    }

    #[test]
    fn the_gate_counts_mailbox_calls_and_refuses_them_while_migrating() {
        let running = VmPhase::Running;
        let mut gate = MailboxGate::default();
        gate.admit(&running, &ask(1)).unwrap();
        gate.admit(&running, &ask(2)).unwrap();
        gate.admit(&running, &Request::Stats).unwrap();
        assert_eq!(gate.in_flight(), 2, "only mailbox calls are counted");
        // A refused call is not counted.
        assert!(gate.admit(&VmPhase::Paused, &ask(3)).is_err());
        assert_eq!(gate.in_flight(), 2);

        gate.begin_migration(&running).unwrap();
        assert!(gate.migrating());
        assert!(!gate.drained(), "two calls still in flight");
        assert_eq!(
            gate.admit(&running, &ask(4)).unwrap_err(),
            "mailbox refused: the VM is migrating"
        );
        assert_eq!(gate.in_flight(), 2);
        assert_eq!(
            gate.begin_migration(&running).unwrap_err(),
            "migrate refused: the VM is migrating"
        );
        gate.leave();
        assert!(!gate.drained());
        gate.leave();
        assert!(gate.drained());

        // Failed before the switch-over: requests are admitted again.
        gate.end_migration();
        assert!(!gate.migrating());
        gate.admit(&running, &ask(5)).unwrap();
        assert_eq!(gate.in_flight(), 1);
        gate.leave();
        gate.leave();
        assert_eq!(gate.in_flight(), 0, "never below zero");

        assert_eq!(
            gate.begin_migration(&VmPhase::Paused).unwrap_err(),
            "migrate refused: the VM is paused"
        );
        assert!(!gate.migrating());
    }
}
