//! Launching a VM process: its own binary in `vm` mode, in a new session so
//! it outlives the daemon, waited for until its socket answers (and, given
//! something to start, until that runs).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{SupervisorError, VmEntry, VmSupervisor, call_socket, tail};
use crate::error_chain::chain;
use crate::object_key::ObjectKey;
use crate::vm_protocol::{Request, StartSpec, VmPhase};
use crate::vm_record::{VmRecord, validate_id};

/// How long a new VM process may take to answer its first ping.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

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

impl VmSupervisor {
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
                StartSpec::Linux(linux) => linux.ready_timeout_ms,
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
}
