//! The daemon side of "one process per VM": [`VmSupervisor`] spawns VM
//! processes (its own binary in `vm` mode, in a new session so they outlive
//! the daemon), keeps a table of them, talks to them over their sockets,
//! re-adopts the ones a previous daemon left running (from
//! `<state>/vms/*/vm.json`), cleans up after dead ones, and turns their stats
//! into the per-VM usage the node publishes.
//!
//! Whether a found VM directory is adopted, removed or left alone is decided
//! by the pure [`adoption`]; usage rates by the pure [`usage_from`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufReader;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmstream_api::v1alpha1::VmUsage;

use crate::error_chain::chain;
use crate::object_key::{ObjectKey, ObjectKind};
use crate::proc_stats::process_alive;
use crate::state_layout::{StateLayout, VmPaths};
use crate::vm_protocol::{
    Reply, Request, Response, StartSpec, VmPhase, VmStats, decode, read_frame, write_frame,
};
use crate::vm_record::{RecordError, VmIdError, VmRecord, connect_socket, validate_id};

/// How long a new VM process may take to answer its first ping.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped VM process may take to exit before it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// A VM directory without a record younger than this may be a VM still
/// starting; older ones are leftovers.
const RECORDLESS_GRACE: Duration = Duration::from_secs(60);

/// What to launch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmLaunch {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<ObjectKey>,
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// Start at once; `None` leaves a warm shell waiting for `start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartSpec>,
    /// Register guest RAM with userfaultfd in the warm shell.
    #[serde(default)]
    pub prepare_lazy: bool,
    /// Decode this image in the warm shell, before the start request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preload_image: Option<PathBuf>,
}

/// Errors of supervisor operations.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("invalid VM id")]
    Id(#[from] VmIdError),
    #[error("VM {0} already exists")]
    Exists(String),
    #[error("no VM {0}")]
    NotFound(String),
    #[error("cannot prepare the directory of VM {id}")]
    Dir {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot spawn the process of VM {id}")]
    Spawn {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the process of VM {id} did not come up: {why}; last log lines:\n{log}")]
    LaunchFailed {
        id: String,
        why: String,
        log: String,
    },
    #[error("talking to VM {id} at {socket}")]
    Socket {
        id: String,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {id} answered with an unreadable response: {why}")]
    BadResponse { id: String, why: String },
    #[error("VM {id}: {error}")]
    Refused {
        id: String,
        command: &'static str,
        error: String,
    },
    #[error("cannot scan {0}")]
    Scan(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// One VM in the table.
#[derive(Debug)]
struct VmEntry {
    record: VmRecord,
    /// Set when this daemon spawned the process (to reap it).
    child: Option<Child>,
    last: Option<UsageSample>,
    /// The phase the VM last answered (or its successful launch implied),
    /// and when: [`VmSupervisor::list_recent`] reuses it.
    phase: Option<(VmPhase, Instant)>,
}

/// A VM as `list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmListing {
    pub record: VmRecord,
    pub alive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VmPhase>,
}

/// What [`VmSupervisor::adopt_all`] found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdoptReport {
    pub adopted: Vec<String>,
    pub removed: Vec<String>,
    /// `(id, why)` of directories left alone.
    pub kept: Vec<(String, String)>,
}

/// What is known about a VM directory found at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundVm {
    /// `vm.json` could be read.
    pub has_record: bool,
    /// The recorded process runs (same start time).
    pub alive: bool,
    /// Its socket answered a ping with the directory's id.
    pub answers: bool,
    /// Time since the directory was last modified.
    pub age: Duration,
}

/// What to do with a found VM directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adoption {
    Adopt,
    /// Dead VM or leftover: remove the directory (and cgroup).
    Remove,
    /// Leave it; the reason is logged.
    Keep(&'static str),
}

/// Decides about a VM directory found at daemon start.
pub fn adoption(found: &FoundVm) -> Adoption {
    match found {
        FoundVm {
            has_record: false,
            age,
            ..
        } if *age < RECORDLESS_GRACE => Adoption::Keep("no vm.json yet (VM starting?)"),
        FoundVm {
            has_record: false, ..
        } => Adoption::Remove,
        FoundVm { alive: false, .. } => Adoption::Remove,
        FoundVm { answers: true, .. } => Adoption::Adopt,
        FoundVm { answers: false, .. } => {
            Adoption::Keep("the process runs but its socket does not answer")
        }
    }
}

/// A usage sample kept to compute rates at the next one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsageSample {
    pub at_ms: u64,
    pub cpu_ms: f64,
    pub requests: u64,
}

/// The published usage of a VM from its stats and the previous sample.
pub fn usage_from(
    owner: &ObjectKey,
    previous: Option<&UsageSample>,
    stats: &VmStats,
) -> (VmUsage, UsageSample) {
    let now = UsageSample {
        at_ms: stats.sampled_at_ms,
        cpu_ms: stats.vcpu_cpu_ms,
        requests: stats.requests_served,
    };
    let (utilization, rate) = match previous {
        Some(p) if now.at_ms > p.at_ms => {
            let seconds = (now.at_ms - p.at_ms) as f64 / 1000.0;
            let cpu = (now.cpu_ms - p.cpu_ms).max(0.0) / (seconds * 1000.0) * 100.0;
            let requests = now.requests.saturating_sub(p.requests) as f64 / seconds;
            (cpu, requests)
        }
        _ => (0.0, 0.0),
    };
    let usage = VmUsage {
        namespace: owner.namespace.clone(),
        name: owner.name.clone(),
        cpu_millis: stats.vcpu_cpu_ms as u64,
        cpu_utilization: utilization,
        memory_bytes: stats.memory_bytes,
        resident_bytes: stats.memory.guest_resident,
        faults_served: stats.faults.faults,
        request_rate: rate,
    };
    (usage, now)
}

/// Sends one request to the socket at `socket` and reads the response.
pub fn call_socket(
    id: &str,
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, SupervisorError> {
    let io = |source| SupervisorError::Socket {
        id: id.to_string(),
        socket: socket.to_path_buf(),
        source,
    };
    let mut stream = connect_socket(socket).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    write_frame(&mut stream, request).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let line = match read_frame(&mut reader, 16 << 20).map_err(io)? {
        Some(Ok(line)) => line,
        Some(Err(e)) => {
            return Err(SupervisorError::BadResponse {
                id: id.into(),
                why: e.to_string(),
            });
        }
        None => {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed without a response",
            )));
        }
    };
    let response: Response = decode(&line).map_err(|e| SupervisorError::BadResponse {
        id: id.into(),
        why: e.to_string(),
    })?;
    response
        .into_result()
        .map_err(|error| SupervisorError::Refused {
            id: id.into(),
            command: request.name(),
            error,
        })
}

/// How long a request may take.
fn request_timeout(request: &Request) -> Duration {
    match request {
        Request::Mailbox { timeout_ms, .. } => {
            Duration::from_millis(timeout_ms.unwrap_or(20_000)) + Duration::from_secs(5)
        }
        Request::WaitRunning { timeout_ms } => {
            Duration::from_millis(*timeout_ms) + Duration::from_secs(5)
        }
        Request::Start { .. } | Request::Capture { .. } | Request::Migrate { .. } => {
            Duration::from_secs(600)
        }
        Request::Reclaim { .. } => Duration::from_secs(120),
        _ => Duration::from_secs(15),
    }
}

/// Spawns, tracks and re-adopts the node's VM processes.
#[derive(Debug)]
pub struct VmSupervisor {
    layout: StateLayout,
    exe: PathBuf,
    cgroup_roots: Vec<PathBuf>,
    table: Mutex<BTreeMap<String, VmEntry>>,
    launching: Mutex<BTreeSet<String>>,
    /// VM processes mark clone RAM mergeable (KSM).
    ksm: bool,
    /// Lazy clones prefetch their whole image in the background.
    lazy_prefetch: bool,
}

impl VmSupervisor {
    /// A supervisor of the VMs under `state_dir`, spawning `exe vm ...`;
    /// VM processes try the given cgroup v2 roots (empty: no cgroups).
    pub fn new(state_dir: &Path, exe: PathBuf, cgroup_roots: Vec<PathBuf>) -> Self {
        Self {
            layout: StateLayout::new(state_dir),
            exe,
            cgroup_roots,
            table: Mutex::new(BTreeMap::new()),
            launching: Mutex::new(BTreeSet::new()),
            ksm: false,
            lazy_prefetch: false,
        }
    }

    /// Lets every VM process it launches mark its clone's guest RAM
    /// mergeable (`vm --ksm`), so ksmd may merge identical pages of
    /// different clones.
    pub fn with_ksm(mut self, ksm: bool) -> Self {
        self.ksm = ksm;
        self
    }

    /// Lets lazy clones it launches copy their whole image in the
    /// background after the start (`vm --lazy-prefetch`).
    pub fn with_lazy_prefetch(mut self, prefetch: bool) -> Self {
        self.lazy_prefetch = prefetch;
        self
    }

    pub fn state_dir(&self) -> &Path {
        self.layout.root()
    }

    /// The layout of the state directory the VMs live in.
    pub fn layout(&self) -> &StateLayout {
        &self.layout
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<String, VmEntry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns a VM process and waits until its socket answers and, when it
    /// was given something to start, until that runs (a VM that fails to
    /// start is stopped and its log tail returned in the error).
    pub fn launch(&self, launch: &VmLaunch) -> Result<VmRecord, SupervisorError> {
        validate_id(&launch.id)?;
        let id = launch.id.clone();
        {
            let mut launching = self.launching.lock().unwrap_or_else(|e| e.into_inner());
            let paths = self.layout.vm(&id);
            if self.table().contains_key(&id) || launching.contains(&id) || paths.dir.exists() {
                return Err(SupervisorError::Exists(id));
            }
            launching.insert(id.clone());
        }
        let result = self.spawn_and_wait(launch);
        self.launching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        let (record, child) = result?;
        self.table().insert(
            id.clone(),
            VmEntry {
                record: record.clone(),
                child: Some(child),
                last: None,
                phase: None,
            },
        );
        if let Some(start) = &launch.start {
            let timeout_ms = match start {
                StartSpec::Boot {
                    ready_timeout_ms, ..
                } => *ready_timeout_ms,
                StartSpec::Clone { .. } | StartSpec::RemoteClone { .. } => 60_000,
            };
            if let Err(e) = self.call(&id, &Request::WaitRunning { timeout_ms }) {
                let log = tail(&self.layout.vm(&id).log, 20);
                let _ = self.stop(&id);
                return Err(SupervisorError::LaunchFailed {
                    id,
                    why: chain(&e),
                    log,
                });
            }
        }
        if let Some(entry) = self.table().get_mut(&id) {
            let phase = if launch.start.is_some() {
                VmPhase::Running
            } else {
                VmPhase::Warm
            };
            entry.phase = Some((phase, Instant::now()));
        }
        // The start may have updated the record (kind, image).
        Ok(self.get(&id).unwrap_or(record))
    }

    fn spawn_and_wait(&self, launch: &VmLaunch) -> Result<(VmRecord, Child), SupervisorError> {
        let id = &launch.id;
        let paths = self.layout.vm(id);
        let dir_err = |source| SupervisorError::Dir {
            id: id.clone(),
            source,
        };
        std::fs::create_dir_all(&paths.dir).map_err(dir_err)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log)
            .map_err(dir_err)?;
        let log2 = log.try_clone().map_err(dir_err)?;
        let mut command = Command::new(&self.exe);
        command
            .arg("vm")
            .args(["--id", id])
            .arg("--state-dir")
            .arg(self.layout.root())
            .args(["--vcpus", &launch.vcpus.to_string()])
            .args(["--memory-bytes", &launch.memory_bytes.to_string()]);
        if let Some(start) = &launch.start {
            let json = serde_json::to_string(start).expect("start spec serializes");
            command.args(["--start", &json]);
        }
        if launch.prepare_lazy {
            command.arg("--prepare-lazy");
        }
        if let Some(image) = &launch.preload_image {
            command.arg("--preload-image").arg(image);
        }
        if self.ksm {
            command.arg("--ksm");
        }
        if self.lazy_prefetch {
            command.arg("--lazy-prefetch");
        }
        if let Some(owner) = &launch.owner {
            let json = serde_json::to_string(owner).expect("owner serializes");
            command.args(["--owner", &json]);
        }
        for root in &self.cgroup_roots {
            command.arg("--cgroup-root").arg(root);
        }
        if self.cgroup_roots.is_empty() {
            command.arg("--no-cgroup");
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        // SAFETY: setsid is async-signal-safe; the child calls only it
        // between fork and exec. A new session detaches the VM from the
        // daemon's process group and terminal, so the daemon's death (or a
        // signal to its group) does not reach it; no PDEATHSIG is set.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| SupervisorError::Spawn {
            id: id.clone(),
            source,
        })?;
        let pid = child.id();
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        let failed = |why: String, child: &mut Child| {
            let _ = child.kill();
            let _ = child.wait();
            let log = tail(&paths.log, 20);
            let _ = std::fs::remove_dir_all(&paths.dir);
            SupervisorError::LaunchFailed {
                id: id.clone(),
                why,
                log,
            }
        };
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(failed(format!("it exited with {status}"), &mut child));
            }
            if let Ok(record) = VmRecord::read(&paths.record)
                && record.pid == pid
                && call_socket(id, &record.socket, &Request::Ping, Duration::from_secs(5)).is_ok()
            {
                return Ok((record, child));
            }
            if Instant::now() >= deadline {
                return Err(failed(
                    format!("no answer within {LAUNCH_TIMEOUT:?}"),
                    &mut child,
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Scans `<state>/vms` and adopts every VM whose process runs and
    /// answers; removes the directories of dead ones.
    pub fn adopt_all(&self) -> Result<AdoptReport, SupervisorError> {
        let dir = self.layout.vms_dir();
        let mut report = AdoptReport::default();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
            Err(e) => return Err(SupervisorError::Scan(dir, e)),
        };
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !entry.path().is_dir() || self.table().contains_key(&id) {
                continue;
            }
            if self
                .launching
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&id)
            {
                continue;
            }
            let paths = self.layout.vm(&id);
            let record = VmRecord::read(&paths.record).ok();
            let alive = record
                .as_ref()
                .is_some_and(|r| process_alive(r.pid, Some(r.start_ticks)));
            let answers = alive
                && record.as_ref().is_some_and(|r| {
                    matches!(
                        call_socket(&id, &r.socket, &Request::Ping, Duration::from_secs(5)),
                        Ok(Reply::Pong { id: ref got, .. }) if *got == id
                    )
                });
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            let found = FoundVm {
                has_record: record.is_some(),
                alive,
                answers,
                age,
            };
            match (adoption(&found), record) {
                (Adoption::Adopt, Some(record)) => {
                    tracing::info!(id, pid = record.pid, "re-adopted VM");
                    self.table().insert(
                        id.clone(),
                        VmEntry {
                            record,
                            child: None,
                            last: None,
                            phase: None,
                        },
                    );
                    report.adopted.push(id);
                }
                (Adoption::Keep(why), _) => {
                    tracing::warn!(id, why, "VM directory left alone");
                    report.kept.push((id, why.to_string()));
                }
                (_, record) => {
                    tracing::info!(id, "removing the directory of a dead VM");
                    remove_leftovers(&paths, record.as_ref());
                    report.removed.push(id);
                }
            }
        }
        let keep: BTreeSet<String> = self.table().keys().cloned().collect();
        for group in crate::cgroup::sweep(&self.cgroup_roots, &keep) {
            tracing::info!(cgroup = %group.display(), "removed the cgroup of a gone VM");
        }
        Ok(report)
    }

    fn record(&self, id: &str) -> Result<VmRecord, SupervisorError> {
        self.table()
            .get(id)
            .map(|e| e.record.clone())
            .ok_or_else(|| SupervisorError::NotFound(id.into()))
    }

    /// Sends `request` to VM `id` (`stop` goes through [`Self::stop`]).
    pub fn call(&self, id: &str, request: &Request) -> Result<Reply, SupervisorError> {
        if *request == Request::Stop {
            self.stop(id)?;
            return Ok(Reply::Stopping);
        }
        let record = self.record(id)?;
        if !matches!(
            request,
            Request::Ping | Request::Stats | Request::Mailbox { .. } | Request::WaitRunning { .. }
        ) {
            // The request may change the phase: the next listing asks.
            if let Some(entry) = self.table().get_mut(id) {
                entry.phase = None;
            }
        }
        let reply = call_socket(id, &record.socket, request, request_timeout(request))?;
        if matches!(request, Request::Start { .. } | Request::WaitRunning { .. })
            && let Ok(updated) = VmRecord::read(&self.layout.vm(id).record)
            && let Some(entry) = self.table().get_mut(id)
        {
            entry.record = updated;
        }
        Ok(reply)
    }

    /// Stops VM `id`, waits for its process to end (killing it if it does
    /// not), and removes its directory and cgroup.
    pub fn stop(&self, id: &str) -> Result<(), SupervisorError> {
        let Some(mut entry) = self.table().remove(id) else {
            return Err(SupervisorError::NotFound(id.into()));
        };
        let record = &entry.record;
        if let Err(e) = call_socket(id, &record.socket, &Request::Stop, Duration::from_secs(15)) {
            tracing::warn!(id, error = %e, "stop request failed; killing the VM process");
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let mut killed = false;
        loop {
            let gone = match entry.child.as_mut() {
                Some(child) => child.try_wait().map(|s| s.is_some()).unwrap_or(true),
                None => !process_alive(record.pid, Some(record.start_ticks)),
            };
            if gone {
                break;
            }
            if Instant::now() >= deadline && !killed {
                tracing::warn!(id, pid = record.pid, "VM process did not exit; SIGKILL");
                // SAFETY: kill(2) on the recorded pid, whose start time was
                // just checked to still match (not a reused pid).
                unsafe { libc::kill(record.pid as libc::pid_t, libc::SIGKILL) };
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        remove_leftovers(&self.layout.vm(id), Some(record));
        Ok(())
    }

    /// Every VM in the table, with its phase if it answers. The VMs are
    /// asked in parallel (a few threads): a VM busy starting answers late,
    /// and the sync loop that lists them should not wait for each in turn.
    pub fn list(&self) -> Vec<VmListing> {
        self.list_recent(Duration::ZERO)
    }

    /// Like [`Self::list`], but a VM whose phase is known from the last
    /// `max_age` (an answer, or its launch) is not asked again; liveness is
    /// always checked (`/proc`). For the syncs that watch events trigger:
    /// during a burst of placements they would otherwise ping every VM
    /// each time.
    pub fn list_recent(&self, max_age: Duration) -> Vec<VmListing> {
        let entries: Vec<(VmRecord, Option<VmPhase>)> = self
            .table()
            .values()
            .map(|e| {
                let known = e
                    .phase
                    .as_ref()
                    .filter(|(_, at)| at.elapsed() < max_age)
                    .map(|(p, _)| p.clone());
                (e.record.clone(), known)
            })
            .collect();
        let (known, unknown): (Vec<_>, Vec<_>) =
            entries.into_iter().partition(|(_, p)| p.is_some());
        let mut out: Vec<VmListing> = known
            .into_iter()
            .map(|(record, phase)| VmListing {
                alive: process_alive(record.pid, Some(record.start_ticks)),
                record,
                phase,
            })
            .collect();
        let records: Vec<VmRecord> = unknown.into_iter().map(|(r, _)| r).collect();
        let chunk = records.len().div_ceil(LIST_THREADS).max(1);
        let asked: Vec<VmListing> = std::thread::scope(|scope| {
            let workers: Vec<_> = records
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || part.iter().cloned().map(listing).collect::<Vec<_>>())
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        let now = Instant::now();
        let mut table = self.table();
        for l in &asked {
            if let Some(entry) = table.get_mut(&l.record.id) {
                entry.phase = l.phase.clone().map(|p| (p, now));
            }
        }
        drop(table);
        out.extend(asked);
        out
    }

    /// The record of VM `id`, if it is in the table.
    pub fn get(&self, id: &str) -> Option<VmRecord> {
        self.table().get(id).map(|e| e.record.clone())
    }

    /// Usage of every VM owned by a VMClone (rates against the previous
    /// call).
    pub fn sample_usage(&self) -> Vec<VmUsage> {
        let owned: Vec<(String, VmRecord)> = self
            .table()
            .iter()
            .filter(|(_, e)| {
                e.record
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.kind == ObjectKind::VMClone)
            })
            .map(|(id, e)| (id.clone(), e.record.clone()))
            .collect();
        let mut usage = Vec::new();
        for (id, record) in owned {
            let Ok(Reply::Stats(stats)) =
                call_socket(&id, &record.socket, &Request::Stats, Duration::from_secs(5))
            else {
                continue;
            };
            let owner = record.owner.as_ref().expect("filtered on owner");
            let mut table = self.table();
            let Some(entry) = table.get_mut(&id) else {
                continue;
            };
            let (u, sample) = usage_from(owner, entry.last.as_ref(), &stats);
            entry.last = Some(sample);
            usage.push(u);
        }
        usage
    }

    /// Reaps exited children and forgets VMs whose process is gone
    /// (removing their directories). Returns the ids forgotten.
    pub fn forget_dead(&self) -> Vec<String> {
        let mut table = self.table();
        let mut dead = Vec::new();
        for (id, entry) in table.iter_mut() {
            let gone = match entry.child.as_mut() {
                Some(child) => child.try_wait().map(|s| s.is_some()).unwrap_or(true),
                None => !process_alive(entry.record.pid, Some(entry.record.start_ticks)),
            };
            if gone {
                dead.push(id.clone());
            }
        }
        for id in &dead {
            if let Some(entry) = table.remove(id) {
                tracing::warn!(id, pid = entry.record.pid, "VM process is gone");
                remove_leftovers(&self.layout.vm(id), Some(&entry.record));
            }
        }
        dead
    }
}

/// Threads [`VmSupervisor::list`] asks VMs from.
const LIST_THREADS: usize = 4;

/// One VM's listing: alive (same start time) and, if it answers, its phase.
fn listing(record: VmRecord) -> VmListing {
    let alive = process_alive(record.pid, Some(record.start_ticks));
    let phase = alive
        .then(|| {
            call_socket(
                &record.id,
                &record.socket,
                &Request::Ping,
                Duration::from_secs(5),
            )
            .ok()
        })
        .flatten()
        .and_then(|reply| match reply {
            Reply::Pong { phase, .. } => Some(phase),
            _ => None,
        });
    VmListing {
        record,
        alive,
        phase,
    }
}

fn remove_leftovers(paths: &VmPaths, record: Option<&VmRecord>) {
    if let Err(e) = std::fs::remove_dir_all(&paths.dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %paths.dir.display(), error = %e, "VM directory not removed");
    }
    if let Some(group) = record.and_then(|r| r.cgroup.as_ref())
        && let Err(e) = crate::cgroup::remove(group, Duration::from_secs(2))
    {
        tracing::warn!(cgroup = %group.display(), error = %e, "VM cgroup not removed");
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_protocol::MemoryFigures;

    fn found(has_record: bool, alive: bool, answers: bool, age_s: u64) -> FoundVm {
        FoundVm {
            has_record,
            alive,
            answers,
            age: Duration::from_secs(age_s),
        }
    }

    #[test]
    fn adoption_decisions() {
        assert_eq!(adoption(&found(true, true, true, 0)), Adoption::Adopt);
        assert_eq!(adoption(&found(true, false, false, 0)), Adoption::Remove);
        assert!(matches!(
            adoption(&found(true, true, false, 0)),
            Adoption::Keep(_)
        ));
        assert!(matches!(
            adoption(&found(false, false, false, 1)),
            Adoption::Keep(_)
        ));
        assert_eq!(
            adoption(&found(false, false, false, 3600)),
            Adoption::Remove
        );
    }

    #[test]
    fn usage_rates_come_from_the_delta() {
        let owner = ObjectKey::vm_clone("ns", "a");
        let mut stats = VmStats {
            vcpu_cpu_ms: 1000.0,
            requests_served: 10,
            sampled_at_ms: 10_000,
            memory_bytes: 16 << 20,
            memory: MemoryFigures {
                guest_resident: 4096,
                ..MemoryFigures::default()
            },
            ..VmStats::default()
        };
        let (first, sample) = usage_from(&owner, None, &stats);
        assert_eq!(first.cpu_utilization, 0.0);
        assert_eq!(first.cpu_millis, 1000);
        assert_eq!(first.resident_bytes, 4096);
        stats.vcpu_cpu_ms = 1500.0;
        stats.requests_served = 30;
        stats.sampled_at_ms = 12_000;
        let (second, _) = usage_from(&owner, Some(&sample), &stats);
        assert!((second.cpu_utilization - 25.0).abs() < 1e-9);
        assert!((second.request_rate - 10.0).abs() < 1e-9);
        assert_eq!(
            (second.namespace.as_str(), second.name.as_str()),
            ("ns", "a")
        );
    }

    #[test]
    fn adopt_all_removes_dead_and_keeps_fresh_recordless_dirs() {
        let state = tempfile::tempdir().unwrap();
        let layout = StateLayout::new(state.path());
        let dead = layout.vm("dead");
        std::fs::create_dir_all(&dead.dir).unwrap();
        VmRecord {
            id: "dead".into(),
            pid: u32::MAX - 7,
            start_ticks: 1,
            kind: crate::vm_record::VmKind::Boot,
            image: None,
            owner: None,
            vcpus: 1,
            memory_bytes: 1 << 24,
            created_at: String::new(),
            socket: dead.socket.clone(),
            cgroup: None,
        }
        .write(&dead.record)
        .unwrap();
        let fresh = layout.vm("fresh");
        std::fs::create_dir_all(&fresh.dir).unwrap();
        let supervisor = VmSupervisor::new(state.path(), "/bin/false".into(), Vec::new());
        let report = supervisor.adopt_all().unwrap();
        assert_eq!(report.removed, vec!["dead"]);
        assert_eq!(report.kept.len(), 1);
        assert!(!dead.dir.exists() && fresh.dir.exists());
        assert!(supervisor.list().is_empty());
    }
}
