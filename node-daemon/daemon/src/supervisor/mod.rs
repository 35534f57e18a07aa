//! The daemon side of "one process per VM": [`VmSupervisor`] spawns VM
//! processes (its own binary in `vm` mode, in a new session so they outlive
//! the daemon), keeps a table of them, talks to them over their sockets,
//! re-adopts the ones a previous daemon left running (from
//! `<state>/vms/*/vm.json`), cleans up after dead ones, and turns their stats
//! into the per-VM usage the node publishes.
//!
//! Whether a found VM directory is adopted, removed or left alone is decided
//! by the pure [`adoption`]; usage rates by the pure [`usage_from`]. This
//! file keeps the table and talks to VMs; `launch` spawns them, `adoption`
//! finds them again after a restart, `usage` samples them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::proc_stats::process_alive;
use crate::state_layout::{StateLayout, VmPaths};
use crate::vm_protocol::{
    Reply, Request, Response, StartRefusal, VmPhase, decode, read_frame, write_frame,
};
use crate::vm_record::{RecordError, VmIdError, VmRecord, connect_socket};

mod adoption;
mod launch;
mod usage;

pub use adoption::{AdoptReport, Adoption, FoundVm, adoption};
pub use launch::VmLaunch;
pub use usage::{UsageSample, usage_from};

/// How long a stopped VM process may take to exit before it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

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
        /// The typed refusal of a start, when it was one.
        refusal: Option<StartRefusal>,
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
    let refusal = response.refusal;
    response
        .into_result()
        .map_err(|error| SupervisorError::Refused {
            id: id.into(),
            command: request.name(),
            error,
            refusal,
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
    if let Some(id) = paths.dir.file_name().and_then(|n| n.to_str()) {
        crate::vm_net::remove(id);
    }
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
