//! Starting the VM of a VM process: boot a micro guest or a Linux guest
//! (`linux`), restore a clone from a local image (copy-on-write or lazy; a
//! Linux image's clone gets its devices back with `restore_linux`), or
//! restore a clone of a remote image streamed through the daemon's relay.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_vmm::devices::mailbox::report;
use vmstream_vmm::machine::{BootOptions, Machine, MachineConfig, VmShell};
use vmstream_vmm::memory::merge_identical_pages;
use vmstream_vmm::restore::{CloneMemory, CloneSource, restore};

use super::gate::admit;
use super::{Vm, ms, responses};
use crate::error_chain::chain;
use crate::vm_protocol::{CloneBackend, Request, StartRefusal, StartReport, StartSpec, VmPhase};
use crate::vm_record::VmKind;

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

/// Why this VM process refuses `spec` before touching the VM shell, if it
/// does (a Linux readiness probe it cannot run, an interface without tap).
pub(super) fn refusal(spec: &StartSpec) -> Option<StartRefusal> {
    match spec {
        StartSpec::Linux(start) => super::linux::refusal(start),
        StartSpec::Boot { .. } | StartSpec::Clone { .. } | StartSpec::RemoteClone { .. } => None,
    }
}

impl Vm {
    /// Starts the VM; `warm`: the start came as a request to a waiting shell.
    pub(super) fn start(&self, spec: StartSpec, warm: bool) -> Result<StartReport, String> {
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
            StartSpec::Clone {
                image,
                backend,
                network,
            } => {
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
                let restored = if source.state().devices.virtio.is_empty() {
                    restore(shell, &source, &memory).map_err(|e| chain(&e))
                } else {
                    self.restore_linux_clone(shell, image, &source, &memory, network.as_ref())
                }
                .map_err(|e| {
                    StartFailure::boxed(
                        format!("starting a clone of {}: {e}", image.display()),
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
            StartSpec::Linux(start) => {
                if let Some(refused) = refusal(spec) {
                    // A start at launch is not refused before (see `refusal`).
                    return Err(StartFailure::boxed(refused.to_string(), None, Some(shell)));
                }
                let machine = self
                    .boot_linux(shell, start)
                    .map(Arc::new)
                    .map_err(|e| StartFailure::boxed(format!("booting Linux: {e}"), None, None))?;
                report.start_ms = ms(requested.elapsed());
                // Stats, pause and the serial log work while the guest boots.
                self.lock().machine = Some(Arc::clone(&machine));
                let pattern = super::linux::ready_pattern(start);
                let timeout = Duration::from_millis(start.ready_timeout_ms);
                if let Err(e) = super::linux::wait_serial(&machine, pattern, timeout) {
                    return Err(StartFailure::boxed(e, Some(machine), None));
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
}
