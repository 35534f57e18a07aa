//! Live migration in a VM process: the source side (`migrate`: the running
//! VM moves to a target and this process stops its copy) and the target
//! side (`receive`: the warm shell becomes the migration target shell,
//! the process listens on a TCP port and runs the received VM, a vmm
//! `Machine` hosted like any other: pause, resume, capture, stats, mailbox,
//! a further migration, stop).
//!
//! Before the source pauses the VM it closes the mailbox gate
//! ([`super::MailboxGate`]): new mailbox requests are refused (`mailbox
//! refused: the VM is migrating`) and the calls already admitted are
//! answered here first (waited for up to [`MAILBOX_DRAIN_TIMEOUT`]), so no
//! request travels in the saved state to be answered where nobody waits.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_migration::{MigrateError, MigrationMode, SourceOptions, TargetOptions, TargetShell};
use vmstream_pagestream::ClusterToken;
use vmstream_vmm::devices::mailbox::{Mailbox, report};
use vmstream_vmm::restore::CloneSource;
use vmstream_vmm::vstate::vm::KvmHost;

use super::{Vm, ms};
use crate::error_chain::chain;
use crate::vm_protocol::{MigrateMode, Reply, StartReport, VmPhase};
use crate::vm_record::VmKind;

/// The migration library's mode for a protocol mode.
pub fn migration_mode(mode: MigrateMode) -> MigrationMode {
    match mode {
        MigrateMode::Postcopy => MigrationMode::Postcopy,
        MigrateMode::Precopy => MigrationMode::Precopy,
        MigrateMode::Hybrid => MigrationMode::Hybrid,
    }
}

/// Source options for a Migrate request (pure).
pub fn source_options(
    mode: MigrateMode,
    token: ClusterToken,
    precopy_rounds: u32,
    bandwidth_bytes_per_s: Option<u64>,
    target_has_image: bool,
) -> SourceOptions {
    let mut options = SourceOptions::new(migration_mode(mode), token);
    if precopy_rounds > 0 {
        options.limits.max_rounds = precopy_rounds;
        options.limits.hybrid_rounds = precopy_rounds;
    }
    options.bandwidth_limit = bandwidth_bytes_per_s;
    options.target_has_image = target_has_image;
    options
}

/// Whether the VM runs on this node again after `error` (the migration
/// failed before the switch-over).
pub fn runs_here_after(error: &MigrateError) -> bool {
    matches!(
        error,
        MigrateError::BeforeSwitchover(_) | MigrateError::SaveState(_)
    )
}

/// Longest wait for admitted mailbox calls to be answered before a
/// migration pauses the VM; past it the migration is not started.
pub const MAILBOX_DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// The mailbox gate closed by a migration; opened again when dropped (the
/// migration failed before the switch-over and the VM runs here, or it
/// ended and the phase refuses mailbox requests by itself).
struct ClosedMailbox<'a>(&'a Vm);

impl Drop for ClosedMailbox<'_> {
    fn drop(&mut self) {
        let mut core = self.0.lock();
        core.mailbox_gate.end_migration();
        self.0.changed.notify_all();
    }
}

fn mailbox_responses(mailbox: &Mailbox) -> u64 {
    mailbox
        .save()
        .reports_by_kind
        .get(&report::RESPONSE)
        .copied()
        .unwrap_or(0)
}

impl Vm {
    /// The mailbox of the running VM (started here or received).
    pub(super) fn mailbox(&self) -> Result<Arc<Mailbox>, String> {
        let core = self.lock();
        if let Some(machine) = &core.machine {
            return Ok(Arc::clone(machine.mailbox()));
        }
        Err("the VM has no machine".to_string())
    }

    /// Closes the mailbox gate for a migration and waits up to `timeout`
    /// until no admitted mailbox call is in flight. Refused (gate open
    /// again) if the VM does not run, another migration is under way or
    /// calls are still in flight at the deadline.
    fn close_mailbox(&self, timeout: Duration) -> Result<ClosedMailbox<'_>, String> {
        let began = Instant::now();
        let deadline = began + timeout;
        let mut core = self.lock();
        let phase = self.phase(&mut core);
        core.mailbox_gate.begin_migration(&phase)?;
        let waited_for = core.mailbox_gate.in_flight();
        while !core.mailbox_gate.drained() {
            let now = Instant::now();
            if now >= deadline {
                let left = core.mailbox_gate.in_flight();
                core.mailbox_gate.end_migration();
                self.changed.notify_all();
                return Err(format!(
                    "{left} mailbox call(s) still unanswered after {timeout:?}"
                ));
            }
            core = self
                .changed
                .wait_timeout(core, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(core);
        tracing::info!(
            waited_for,
            waited_ms = ms(began.elapsed()),
            "mailbox closed for the migration"
        );
        Ok(ClosedMailbox(self))
    }

    /// Becomes a migration target listening on `listen`; the VM arrives in
    /// the background.
    pub(super) fn receive(
        self: &Arc<Self>,
        listen: SocketAddr,
        image: Option<PathBuf>,
        token_file: &Path,
    ) -> Result<Reply, String> {
        let token = ClusterToken::from_file(token_file).map_err(|e| {
            format!(
                "reading the migration token {}: {}",
                token_file.display(),
                chain(&e)
            )
        })?;
        let pages = match &image {
            Some(dir) => Some(Arc::clone(
                CloneSource::open(dir)
                    .map_err(|e| format!("opening live image {}: {}", dir.display(), chain(&e)))?
                    .pages(),
            )),
            None => None,
        };
        let host = KvmHost::open().map_err(|e| chain(&e))?;
        let listener =
            TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("no local address: {e}"))?;
        let warm = {
            let mut core = self.lock();
            let phase = self.phase(&mut core);
            if phase != VmPhase::Warm {
                return Err(format!("receive refused: the VM is {phase:?}"));
            }
            self.set_phase(&mut core, VmPhase::Starting);
            core.shell.take()
        };
        // The warm shell becomes the target shell (its slots are
        // registered already); a new one is made if it cannot.
        let made = match warm {
            Some(warm) => TargetShell::from_shell(warm, pages.clone()).or_else(|e| {
                tracing::warn!(error = %chain(&e), "the warm shell cannot receive; making a new one");
                TargetShell::create(&host, self.config, pages.clone())
            }),
            None => TargetShell::create(&host, self.config, pages.clone()),
        };
        let shell = match made {
            Ok(shell) => shell,
            Err(e) => {
                let message = format!("creating the migration target shell: {}", chain(&e));
                let mut core = self.lock();
                core.failure = Some(message.clone());
                self.set_phase(&mut core, VmPhase::Failed);
                return Err(message);
            }
        };
        let shell_created_ms = ms(shell.created_in());
        let options = TargetOptions::new(token, host, pages);
        let vm = Arc::clone(self);
        std::thread::Builder::new()
            .name("migration-target".into())
            .spawn(move || {
                let received = vmstream_migration::receive(&listener, &options, Some(shell));
                let mut core = vm.lock();
                match received {
                    Ok(received) => {
                        tracing::info!(mode = ?received.mode, side = ?received.side, "migrated VM runs here");
                        let machine = Arc::new(received.vm);
                        core.responses_at_start = mailbox_responses(machine.mailbox());
                        core.machine = Some(machine);
                        core.start = Some(StartReport {
                            shell_created_ms,
                            start_ms: received.side.start_ms,
                            first_exit_ms: None,
                            warm: true,
                        });
                        core.record.kind = VmKind::Clone;
                        core.record.image = image;
                        if let Err(e) = core.record.write(&vm.paths.record) {
                            tracing::warn!(error = %e, "VM record not updated");
                        }
                        vm.set_phase(&mut core, VmPhase::Running);
                    }
                    Err(e) => {
                        let message = format!("receiving the migration: {}", chain(&e));
                        tracing::warn!(error = %message, "migration target failed");
                        core.failure = Some(message);
                        vm.set_phase(&mut core, VmPhase::Failed);
                    }
                }
            })
            .map_err(|e| format!("cannot start the migration thread: {e}"))?;
        Ok(Reply::Receiving { addr })
    }

    /// Migrates the running VM to `target`. On success this process's copy
    /// is stopped and the process stays in phase `stopping` until stopped.
    /// Mailbox requests are refused while it migrates (see the module
    /// documentation).
    pub(super) fn migrate(
        &self,
        target: SocketAddr,
        mode: MigrateMode,
        token_file: &Path,
        precopy_rounds: u32,
        bandwidth_bytes_per_s: Option<u64>,
        target_has_image: bool,
    ) -> Result<Reply, String> {
        let _one_at_a_time = self.capture_lock.lock().unwrap_or_else(|e| e.into_inner());
        let token = ClusterToken::from_file(token_file).map_err(|e| {
            format!(
                "reading the migration token {}: {}",
                token_file.display(),
                chain(&e)
            )
        })?;
        let machine = self.machine()?;
        let options = source_options(
            mode,
            token,
            precopy_rounds,
            bandwidth_bytes_per_s,
            target_has_image,
        );
        // From here until the phase says stopping (or the VM runs here
        // again) mailbox requests are refused; the admitted ones are
        // answered before the migration pauses the VM.
        let _closed = self
            .close_mailbox(MAILBOX_DRAIN_TIMEOUT)
            .map_err(|e| format!("migration to {target} not started (the VM runs on here): {e}"))?;
        match vmstream_migration::migrate(&machine, target, &options) {
            Ok(report) => {
                let taken = {
                    let mut core = self.lock();
                    core.failure = Some(format!("migrated to {target}"));
                    self.set_phase(&mut core, VmPhase::Stopping);
                    core.machine.take()
                };
                drop(machine);
                if let Some(machine) = taken {
                    match Arc::try_unwrap(machine) {
                        Ok(machine) => machine.stop(),
                        Err(shared) => drop(shared),
                    }
                }
                tracing::info!(%target, downtime_ms = report.downtime_ms, total_ms = report.total_ms, "VM migrated away");
                Ok(Reply::Migrated(Box::new(report)))
            }
            Err(e) if runs_here_after(&e) => Err(format!(
                "migration to {target} failed before the switch-over (the VM runs here again): {}",
                chain(&e)
            )),
            Err(e) => {
                let message = format!(
                    "migration to {target} failed after the switch-over (the VM stays paused here): {}",
                    chain(&e)
                );
                let mut core = self.lock();
                core.failure = Some(message.clone());
                self.set_phase(&mut core, VmPhase::Failed);
                Err(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_follow_the_request() {
        let token = ClusterToken::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap();
        let o = source_options(MigrateMode::Hybrid, token.clone(), 3, Some(1 << 20), false);
        assert_eq!(o.mode, MigrationMode::Hybrid);
        assert_eq!(o.limits.hybrid_rounds, 3);
        assert_eq!(o.bandwidth_limit, Some(1 << 20));
        assert!(!o.target_has_image);
        let d = source_options(MigrateMode::Postcopy, token, 0, None, true);
        assert_eq!(d.limits, vmstream_migration::PrecopyLimits::default());
        assert!(d.target_has_image);
    }
}
