//! Clone start: request → the clone's first guest instruction, from a warm
//! `VmShell` (created, and registered with userfaultfd for lazy memory,
//! before the request, as a node keeps a pool of shells).
//!
//! Timed path, on the requesting thread: `CloneSource::open` (read and
//! validate `state.bin` and `pages.idx`, map `memory.pages`, decode the VM
//! state), `restore` (install memory: `MAP_PRIVATE|MAP_FIXED` of the page
//! store for CoW, attach the page store to the prepared userfaultfd and
//! bring in the startup pages for lazy; VM-wide state; every vCPU's state;
//! devices; hand the devices to the parked vCPU threads), until vCPU 0's
//! first `KVM_RUN` returned with a guest exit. That instant is taken by the
//! vCPU thread right after `KVM_RUN` returns (`VcpuShared::first_exit`):
//! the guest has executed instructions by then (the memory guest resumes
//! in its mailbox poll loop, so the exit is its `in` from the request port
//! after a few instructions) — it is the earliest point the VMM can
//! observe that the clone runs. Every timed clone then answers a touch
//! request that is checked against the image.
//!
//! Variants, interleaved in every round: lazy (userfaultfd) and CoW memory,
//! each with the image opened on the request (the headline keys) and with a
//! `CloneSource` opened before the request and shared by all clones
//! (`*_cached_source_*`: a node that keeps its local images open; the
//! startup-page set is then computed once, too).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_vmm::machine::MachineConfig;
use vmstream_vmm::restore::{CloneSource, restore};
use vmstream_vmm::vstate::vm::KvmHost;

use super::error::BenchError;
use super::figures::{Figures, ms, quantile};
use super::guest::{Backing, CheckedTouch, prepare_shell};

/// One image size the clone-start benchmark runs on.
#[derive(Debug, Clone)]
pub struct StartImage {
    /// Key suffix, e.g. `_256mib`.
    pub suffix: &'static str,
    pub dir: PathBuf,
    pub config: MachineConfig,
    /// A small checked touch run on every clone after timing.
    pub check: CheckedTouch,
}

/// Times of one clone start.
#[derive(Debug, Clone, Copy, Default)]
struct StartSample {
    shell_prepare: f64,
    open: f64,
    restore: f64,
    memory: f64,
    state: f64,
    first_exit: f64,
}

/// Pause between preparing a shell and the request, so the shell's threads
/// (parked vCPUs, userfaultfd handler) are idle as in a pool.
const SETTLE: Duration = Duration::from_millis(2);

fn open(image: &StartImage) -> Result<CloneSource, BenchError> {
    CloneSource::open(&image.dir).map_err(|source| BenchError::Open {
        dir: image.dir.clone(),
        source,
    })
}

/// One clone start; `cached` is an already opened source (the variant where
/// the node keeps its images open), else the image is opened on request.
fn start_once(
    host: &Arc<KvmHost>,
    image: &StartImage,
    backing: Backing,
    cached: Option<&CloneSource>,
) -> Result<StartSample, BenchError> {
    let (shell, shell_prepare) = prepare_shell(host, image.config, backing)?;
    std::thread::sleep(SETTLE);

    let request = Instant::now();
    let opened_now;
    let source = match cached {
        Some(source) => source,
        None => {
            opened_now = open(image)?;
            &opened_now
        }
    };
    let opened = request.elapsed();
    let restored =
        restore(shell, source, &backing.clone_memory()).map_err(|source| BenchError::Restore {
            dir: image.dir.clone(),
            source,
        })?;
    let first_exit =
        wait_first_exit(&restored.machine, Duration::from_secs(10)).ok_or_else(|| {
            BenchError::Guest(format!(
                "{} clone of {} never exited to the VMM; vCPU 0 {:?}",
                backing.name(),
                image.dir.display(),
                restored.machine.vcpus()[0].status()
            ))
        })?;
    let timings = restored.timings;
    image.check.run(&restored.machine)?;
    drop(restored);
    Ok(StartSample {
        shell_prepare: ms(shell_prepare),
        open: ms(opened),
        restore: ms(timings.total),
        memory: ms(timings.memory),
        state: ms(timings.vm_state + timings.vcpu_state),
        first_exit: ms(first_exit.saturating_duration_since(request)),
    })
}

/// The instant vCPU 0 first came back from KVM_RUN with a guest exit.
fn wait_first_exit(machine: &vmstream_vmm::machine::Machine, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(at) = machine.vcpus()[0].first_exit() {
            return Some(at);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// A way of starting clones that is measured.
#[derive(Debug, Clone, Copy)]
struct Variant {
    backing: Backing,
    /// The image was opened before the request (kept open by the node).
    cached_source: bool,
    /// Key stem, e.g. `clone_start_cow`.
    name: &'static str,
}

const VARIANTS: [Variant; 4] = [
    Variant {
        backing: Backing::Lazy,
        cached_source: false,
        name: "clone_start",
    },
    Variant {
        backing: Backing::CopyOnWrite,
        cached_source: false,
        name: "clone_start_cow",
    },
    Variant {
        backing: Backing::Lazy,
        cached_source: true,
        name: "clone_start_cached_source",
    },
    Variant {
        backing: Backing::CopyOnWrite,
        cached_source: true,
        name: "clone_start_cow_cached_source",
    },
];

/// Runs `runs` rounds; each round starts one clone of every image in every
/// variant (interleaved, so drift on this noisy host hits all alike). The
/// lazy (userfaultfd) backing with the image opened on request gives the
/// headline `clone_start_ms_*` keys.
pub fn run(
    host: &Arc<KvmHost>,
    images: &[StartImage],
    runs: usize,
    figures: &mut Figures,
) -> Result<(), BenchError> {
    let sources = images.iter().map(open).collect::<Result<Vec<_>, _>>()?;
    let cases: Vec<(usize, Variant)> = (0..images.len())
        .flat_map(|i| VARIANTS.iter().map(move |v| (i, *v)))
        .collect();
    let once = |(i, v): (usize, Variant)| {
        let cached = v.cached_source.then(|| &sources[i]);
        start_once(host, &images[i], v.backing, cached)
    };
    // One untimed round first: page cache, code paths, KVM caches warm.
    for case in &cases {
        once(*case)?;
    }
    let mut samples = vec![Vec::<StartSample>::with_capacity(runs); cases.len()];
    let started = Instant::now();
    for round in 0..runs {
        for (k, case) in cases.iter().enumerate() {
            samples[k].push(once(*case)?);
        }
        if (round + 1) % 10 == 0 {
            progress!(
                "clone start: {} rounds in {:.1} s",
                round + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    figures.put_count("clone_start_runs", runs as u64);
    for (k, (i, v)) in cases.iter().enumerate() {
        let s = &samples[k];
        let pick = |f: fn(&StartSample) -> f64| s.iter().map(f).collect::<Vec<_>>();
        let (name, suffix) = (v.name, images[*i].suffix);
        let first_exit = pick(|x| x.first_exit);
        figures.put_summary(&format!("{name}_ms"), suffix, &first_exit);
        let mut sorted = first_exit.clone();
        sorted.sort_by(f64::total_cmp);
        progress!(
            "{name}{suffix}: first exit ms p50 {:.3} p90 {:.3} max {:.3}",
            quantile(&sorted, 0.5).unwrap_or(f64::NAN),
            quantile(&sorted, 0.9).unwrap_or(f64::NAN),
            sorted.last().copied().unwrap_or(f64::NAN)
        );
        if !v.cached_source {
            figures.put_median(&format!("{name}_open_ms"), suffix, &pick(|x| x.open));
        }
        figures.put_median(&format!("{name}_restore_ms"), suffix, &pick(|x| x.restore));
        figures.put_median(&format!("{name}_memory_ms"), suffix, &pick(|x| x.memory));
        figures.put_median(&format!("{name}_state_ms"), suffix, &pick(|x| x.state));
        if !v.cached_source {
            let shell_name = match v.backing {
                Backing::CopyOnWrite => "shell_prepare_ms",
                _ => "shell_prepare_lazy_ms",
            };
            figures.put_summary(shell_name, suffix, &pick(|x| x.shell_prepare));
        }
    }
    Ok(())
}
