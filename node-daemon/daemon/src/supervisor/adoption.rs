//! Finding the VM processes a previous daemon left running: every
//! `<state>/vms/<id>/` is adopted, removed or left alone, as the pure
//! [`adoption`] decides from what is found there.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{SupervisorError, VmEntry, VmSupervisor, call_socket, remove_leftovers};
use crate::proc_stats::process_alive;
use crate::vm_protocol::{Reply, Request};
use crate::vm_record::VmRecord;

/// A VM directory without a record younger than this may be a VM still
/// starting; older ones are leftovers.
const RECORDLESS_GRACE: Duration = Duration::from_secs(60);

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

impl VmSupervisor {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_layout::StateLayout;

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
