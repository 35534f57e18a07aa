//! Capture: how long the source VM is paused while it is captured
//! (`CaptureTimings::source_paused`: pause request → vCPUs resumed, covering
//! pause, state save and the `fork` whose child writes the page store), and
//! how long until the image is complete (`CaptureTimings::total`: writer
//! prepared, page store written and fsynced by the child, state file
//! written). The source is the memory guest with its RAM filled by the host
//! (60 % random, 30 % zero, 10 % duplicate pages, in clusters of 64
//! pages: see `fill.rs`), running (polling its
//! mailbox) throughout. Captures run one after the other, never two at
//! once; each image but the last is deleted before the next capture.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vmstream_vmm::capture::start_capture;
use vmstream_vmm::machine::MachineConfig;
use vmstream_vmm::vstate::vm::KvmHost;

use super::error::BenchError;
use super::figures::{Figures, ms};
use super::guest::{REALISTIC_FILL, boot_memory_guest};

/// Captures a `config` guest `runs` times into `work/<name>-<i>`. The
/// first `complete_runs` captures run to completion (their `total` is
/// measured); in the others the page-store writer child is killed (by its
/// pid) as soon as the source has resumed, because only the pause is
/// measured there and a capture's writing takes seconds on a busy host.
/// Keeps the last complete image and returns its directory.
#[allow(clippy::too_many_arguments)]
pub fn run(
    host: &Arc<KvmHost>,
    work: &Path,
    name: &str,
    suffix: &str,
    config: MachineConfig,
    runs: usize,
    complete_runs: usize,
    figures: &mut Figures,
) -> Result<PathBuf, BenchError> {
    let complete_runs = complete_runs.clamp(1, runs);
    let booted = Instant::now();
    let machine = boot_memory_guest(host, config, &REALISTIC_FILL)?;
    progress!(
        "{} MiB source booted and filled in {:.1} s",
        config.memory_bytes >> 20,
        booted.elapsed().as_secs_f64()
    );
    let mut paused = Vec::with_capacity(runs);
    let mut totals = Vec::with_capacity(complete_runs);
    let mut forks = Vec::with_capacity(runs);
    let mut saves = Vec::with_capacity(runs);
    let mut stops = Vec::with_capacity(runs);
    let mut kept: Option<PathBuf> = None;
    let mut nonzero_pages = 0;
    for i in 0..runs {
        let dir = work.join(format!("{name}-{i}"));
        std::fs::create_dir_all(&dir)
            .map_err(BenchError::io(format!("creating {}", dir.display())))?;
        let capture_error = |source| BenchError::Capture {
            dir: dir.clone(),
            source,
        };
        let t = Instant::now();
        let pending = start_capture(&machine, &dir).map_err(capture_error)?;
        let timings = pending.timings();
        paused.push(ms(timings.source_paused));
        forks.push(ms(timings.fork));
        saves.push(ms(timings.save_state));
        stops.push(ms(timings.pause));
        if i < complete_runs {
            let report = pending.wait().map_err(capture_error)?;
            progress!(
                "capture {i}: {:.3} s, report total {:?}",
                t.elapsed().as_secs_f64(),
                report.timings.total
            );
            totals.push(ms(report.timings.total));
            nonzero_pages = report.pages.nonzero_pages;
            if let Some(previous) = kept.replace(dir) {
                remove(&previous)?;
            }
        } else {
            if let Some(pid) = pending.child() {
                // SAFETY: kill(2) of the writer child this process forked
                // and has not reaped yet (the pid cannot be reused).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            // Reaps the child; the capture ends as "child died", expected.
            let _ = pending.wait();
            remove(&dir)?;
        }
        if (i + 1) % 5 == 0 {
            progress!("{} captures of {} MiB", i + 1, config.memory_bytes >> 20);
        }
    }
    machine.stop();
    figures.put_count(format!("capture_runs{suffix}"), runs as u64);
    figures.put_count(
        format!("capture_complete_runs{suffix}"),
        complete_runs as u64,
    );
    figures.put_summary("capture_pause_ms", suffix, &paused);
    figures.put_summary("capture_total_ms", suffix, &totals);
    figures.put_median("capture_fork_ms", suffix, &forks);
    figures.put_median("capture_save_state_ms", suffix, &saves);
    figures.put_median("capture_stop_vcpus_ms", suffix, &stops);
    figures.put(
        format!("capture_nonzero_mib{suffix}"),
        nonzero_pages as f64 / 256.0,
    );
    progress!(
        "{runs} captures of {} MiB: paused p50 {:?} ms, complete p50 {:?} ms",
        config.memory_bytes >> 20,
        figures.get(&format!("capture_pause_ms_p50{suffix}")),
        figures.get(&format!("capture_total_ms_p50{suffix}"))
    );
    Ok(kept.expect("at least one complete capture"))
}

fn remove(dir: &Path) -> Result<(), BenchError> {
    let t = Instant::now();
    std::fs::remove_dir_all(dir).map_err(BenchError::io(format!("removing {}", dir.display())))?;
    progress!(
        "removed {} in {:.3} s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
