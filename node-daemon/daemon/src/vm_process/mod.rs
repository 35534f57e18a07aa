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
//! The files: this one sets the process up and serves requests, `gate`
//! admits them, `start` starts the VM (`linux`: Linux guests), `operations` carries out the other
//! requests, `serial` copies the console, `migration` moves the VM.
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

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmstream_vmm::devices::mailbox::report;
use vmstream_vmm::machine::{Machine, MachineConfig, VmShell};
use vmstream_vmm::memory::LazyOptions;
use vmstream_vmm::restore::CloneSource;
use vmstream_vmm::vstate::run_loop::{VcpuEnd, VcpuStatus};
use vmstream_vmm::vstate::vm::KvmHost;

use crate::cgroup;
use crate::object_key::ObjectKey;
use crate::proc_stats;
use crate::state_layout::{StateLayout, VmPaths};
use crate::vm_protocol::{
    CloneBackend, MAX_FRAME, Reply, Request, Response, StartReport, StartSpec, VmPhase,
    parse_request, read_frame, write_frame,
};
use crate::vm_record::{VmKind, VmRecord, bind_socket, validate_id};

mod gate;
pub mod linux;
mod migration;
mod operations;
mod serial;
mod start;

pub use gate::{MailboxGate, admit};

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
    pub owner: Option<ObjectKey>,
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
    /// A Linux guest's interfaces (kept in its captures).
    linux_network: Vec<crate::vm_protocol::LinuxNetwork>,
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
    let paths = StateLayout::new(&config.state_dir).vm(&config.id);
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
            linux_network: Vec::new(),
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
            Request::Start { spec } => {
                if let Some(refusal) = start::refusal(&spec) {
                    return Response::refused(refusal);
                }
                self.start(spec, true).map(Reply::Started)
            }
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
