//! Working set: request → the clone's memory guest has read 4096 pages
//! (16 MiB) of the image that the guest had not touched before the capture
//! (the host filled them; the source guest only polled its mailbox).
//! The request starts from a warm shell exactly as in the clone-start
//! benchmark (open the image, restore, resume), then one TOUCH request reads
//! one qword of each page; the time ends when the host has the guest's
//! RESULT report, whose checksum is verified against the image.
//!
//! Backings, interleaved in every round: lazy (userfaultfd MISSING faults
//! served by the handler thread), lazy in SIGBUS mode (the vCPU thread
//! fills the page on the exit PVM reports), CoW (`MAP_PRIVATE` of the
//! page store, whose pages are in the page cache: the image was just
//! written), and lazy with record-and-prefetch as in REAP
//! (`working_set_recorded_ms_*`): the pages a first lazy clone brought in
//! (its populated bitmap, recorded once before the timed rounds) are
//! filled by a prefetch thread from the moment the clone is restored,
//! while the guest runs; pages the guest reaches first still fault.
//! Lazy variants pin the vCPU and the fault handler to one CPU (as the node
//! daemon does for 1-vCPU VM processes); the prefetcher runs on the other.
//!
//! The pages are spread over the whole 1 GiB data area (one every 63
//! pages) and none is a zero page, so every lazy fault copies 4 KiB and
//! neither fault-around (1 page) nor read-ahead (`MADV_RANDOM`) helps; a
//! CoW fault still maps the whole page-cache folio (up to 2 MiB here, about
//! 8 of the touched pages). The same touch is then repeated in the lazy
//! clone, where every page is present: that is the guest's own emulated
//! loop (~19 instructions per page at ~0.6–1 µs each on PVM) without any
//! memory streaming, the floor under all variants
//! (`working_set_present_ms_*`); `working_set_*_added_us_per_page` is what
//! each backing adds per page over that floor.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_vmm::machine::{MachineConfig, MemoryBacking};
use vmstream_vmm::restore::{CloneSource, restore};
use vmstream_vmm::vstate::vm::KvmHost;

use vmstream_vmm::memory::{pin_thread, unpin_thread};

use super::error::BenchError;
use super::figures::{Figures, ms};
use super::guest::{Backing, CheckedTouch, prepare_shell};

/// CPU of a lazy clone's vCPU and fault handler.
const VCPU_CPU: usize = 0;
/// CPU of the record-and-prefetch thread.
const PREFETCH_CPU: usize = 1;

/// A measured variant: a plain backing, or lazy with a recorded working set
/// prefetched from clone start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Plain(Backing),
    Recorded,
}

impl Variant {
    fn backing(self) -> Backing {
        match self {
            Variant::Plain(b) => b,
            Variant::Recorded => Backing::Lazy,
        }
    }
}

/// One measured clone.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    total: f64,
    rerun: Option<f64>,
    faults: Option<u64>,
}

fn once(
    host: &Arc<KvmHost>,
    dir: &Path,
    config: MachineConfig,
    touch: &CheckedTouch,
    variant: Variant,
    recorded: &Arc<Vec<usize>>,
) -> Result<Sample, BenchError> {
    let backing = variant.backing();
    // Lazy clones run as the node runs a 1-vCPU VM process: pinned to one
    // CPU, so the vCPU thread and the userfaultfd handler (both started
    // while the calling thread is pinned, so they inherit it) share it — a
    // cross-CPU wake-up per fault costs ~75 µs here, a same-CPU one ~18 µs.
    let pinned = backing != Backing::CopyOnWrite;
    if pinned {
        pin_thread(0, VCPU_CPU).map_err(BenchError::Pin)?;
    }
    let (shell, _) = prepare_shell(host, config, backing)?;
    std::thread::sleep(Duration::from_millis(2));
    let request = Instant::now();
    let source = CloneSource::open(dir).map_err(|source| BenchError::Open {
        dir: dir.to_path_buf(),
        source,
    })?;
    let restored =
        restore(shell, &source, &backing.clone_memory()).map_err(|source| BenchError::Restore {
            dir: dir.to_path_buf(),
            source,
        })?;
    if pinned {
        unpin_thread(0).map_err(BenchError::Pin)?;
    }
    let prefetch = match (variant, restored.machine.backing().lazy_memory()) {
        (Variant::Recorded, Some(memory)) => {
            let memory = Arc::clone(memory);
            let pages = Arc::clone(recorded);
            Some(std::thread::spawn(move || {
                // The prefetcher runs beside the vCPU, on the other CPU.
                let _ = pin_thread(0, PREFETCH_CPU);
                for &page in pages.iter() {
                    if memory.fill_page(page).is_err() {
                        break;
                    }
                }
            }))
        }
        _ => None,
    };
    touch.run(&restored.machine)?;
    let total = ms(request.elapsed());
    if let Some(prefetch) = prefetch {
        let _ = prefetch.join();
    }
    let faults = match restored.machine.backing() {
        MemoryBacking::Lazy { memory, .. } => {
            let _settled = memory.quiesce();
            Some(memory.stats().faults)
        }
        _ => None,
    };
    let rerun = if backing == Backing::Lazy {
        let again = Instant::now();
        touch.run(&restored.machine)?;
        Some(ms(again.elapsed()))
    } else {
        None
    };
    Ok(Sample {
        total,
        rerun,
        faults,
    })
}

/// Runs `runs` rounds of the three backings, interleaved.
pub fn run(
    host: &Arc<KvmHost>,
    dir: &Path,
    config: MachineConfig,
    touch: &CheckedTouch,
    runs: usize,
    figures: &mut Figures,
) -> Result<(), BenchError> {
    let backings = [
        Variant::Plain(Backing::Lazy),
        Variant::Plain(Backing::LazySigbus),
        Variant::Plain(Backing::CopyOnWrite),
        Variant::Recorded,
    ];
    let mut samples = vec![Vec::<Sample>::with_capacity(runs); backings.len()];
    let recorded = Arc::new(record_working_set(host, dir, config, touch)?);
    figures.put_count("working_set_recorded_pages", recorded.len() as u64);
    for backing in backings {
        once(host, dir, config, touch, backing, &recorded)?;
    }
    let started = Instant::now();
    for round in 0..runs {
        for (i, backing) in backings.iter().enumerate() {
            samples[i].push(once(host, dir, config, touch, *backing, &recorded)?);
        }
        if (round + 1) % 10 == 0 {
            progress!(
                "working set: {} rounds in {:.1} s",
                round + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    figures.put_count("working_set_runs", runs as u64);
    figures.put_count("working_set_pages", touch.command.count);
    figures.put_count("working_set_stride_pages", touch.command.stride);
    let mut medians = Vec::new();
    for (i, backing) in backings.iter().enumerate() {
        let name = match backing {
            Variant::Plain(Backing::Lazy) => "working_set_ms",
            Variant::Plain(Backing::LazySigbus) => "working_set_sigbus_ms",
            Variant::Plain(Backing::CopyOnWrite) => "working_set_cow_ms",
            Variant::Recorded => "working_set_recorded_ms",
        };
        let totals: Vec<f64> = samples[i].iter().map(|s| s.total).collect();
        medians.push(figures.put_summary(name, "_16mib", &totals).map(|s| s.p50));
        let reruns: Vec<f64> = samples[i].iter().filter_map(|s| s.rerun).collect();
        if !reruns.is_empty() {
            figures.put_summary("working_set_present_ms", "_16mib", &reruns);
        }
        let faults: Vec<f64> = samples[i]
            .iter()
            .filter_map(|s| s.faults.map(|f| f as f64))
            .collect();
        if !faults.is_empty() && *backing == Variant::Plain(Backing::Lazy) {
            figures.put_median("working_set_uffd_faults", "_16mib", &faults);
        }
    }
    // What streaming adds per page over the guest's own loop on present
    // pages (medians of the same run).
    let present = figures.get("working_set_present_ms_p50_16mib");
    for (variant, median) in backings.iter().zip(medians) {
        if let (Some(total), Some(present)) = (median, present) {
            let per_page_us = (total - present) * 1e3 / touch.command.count as f64;
            let name = match variant {
                Variant::Plain(b) => b.name(),
                Variant::Recorded => "recorded",
            };
            figures.put(format!("working_set_{name}_added_us_per_page"), per_page_us);
        }
    }
    Ok(())
}

/// The working set as a first lazy clone records it: the pages its
/// userfaultfd memory brought in while it ran the touch (REAP's record step).
fn record_working_set(
    host: &Arc<KvmHost>,
    dir: &Path,
    config: MachineConfig,
    touch: &CheckedTouch,
) -> Result<Vec<usize>, BenchError> {
    let (shell, _) = prepare_shell(host, config, Backing::Lazy)?;
    let source = CloneSource::open(dir).map_err(|source| BenchError::Open {
        dir: dir.to_path_buf(),
        source,
    })?;
    let restored = restore(shell, &source, &Backing::Lazy.clone_memory()).map_err(|source| {
        BenchError::Restore {
            dir: dir.to_path_buf(),
            source,
        }
    })?;
    touch.run(&restored.machine)?;
    let Some(memory) = restored.machine.backing().lazy_memory() else {
        return Ok(Vec::new());
    };
    let _settled = memory.quiesce();
    let populated = memory.populated();
    Ok((0..populated.len()).filter(|&p| populated.get(p)).collect())
}
