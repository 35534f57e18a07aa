//! The requests a started VM process carries out besides start and
//! migration: pause, resume, capture, reclaim, mailbox calls, waiting until
//! it runs, stats, and the stop that ends the process.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_vmm::capture::capture;
use vmstream_vmm::devices::mailbox::{ARGS, report, request};
use vmstream_vmm::memory::{drop_image_equal_pages, range_footprint};

use super::{Vm, ms, now_ms, responses};
use crate::error_chain::chain;
use crate::proc_stats;
use crate::state_layout::dir_size;
use crate::vm_protocol::{
    CaptureSummary, FaultFigures, MemoryFigures, ReclaimSummary, Reply, VmPhase, VmStats,
};

impl Vm {
    pub(super) fn pause(&self) -> Result<Reply, String> {
        let machine = self.machine()?;
        let took = machine.pause().map_err(|e| chain(&e))?;
        let mut core = self.lock();
        self.set_phase(&mut core, VmPhase::Paused);
        Ok(Reply::Paused { pause_ms: ms(took) })
    }

    pub(super) fn resume(&self) -> Result<Reply, String> {
        let machine = self.machine()?;
        machine.resume();
        let mut core = self.lock();
        self.set_phase(&mut core, VmPhase::Running);
        Ok(Reply::Resumed)
    }

    pub(super) fn capture(&self, dir: &Path) -> Result<CaptureSummary, String> {
        let _one_at_a_time = self.capture_lock.lock().unwrap_or_else(|e| e.into_inner());
        let machine = self.machine()?;
        let was_paused = self.lock().phase == VmPhase::Paused;
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let captured = capture(&machine, dir)
            .map_err(|e| format!("capturing into {}: {}", dir.display(), chain(&e)));
        // Capture resumes the source; a paused VM stays paused.
        if was_paused && let Err(e) = machine.pause() {
            tracing::warn!(error = %e, "re-pausing after capture failed");
        }
        let report = captured?;
        self.write_network_file(dir)?;
        Ok(CaptureSummary {
            dir: dir.to_path_buf(),
            memory_bytes: self.config.memory_bytes as u64,
            pages: report.pages.pages,
            nonzero_pages: report.pages.nonzero_pages,
            size_bytes: dir_size(dir).unwrap_or(0),
            capture_ms: ms(report.timings.total),
            source_pause_ms: ms(report.timings.source_paused),
        })
    }

    pub(super) fn reclaim(&self, max_bytes: u64) -> Result<ReclaimSummary, String> {
        let _one_at_a_time = self.capture_lock.lock().unwrap_or_else(|e| e.into_inner());
        let machine = self.machine()?;
        let (was_paused, keep) = {
            let core = self.lock();
            (core.phase == VmPhase::Paused, core.keep_pages.clone())
        };
        let report = drop_image_equal_pages(&machine, &keep, max_bytes, !was_paused)
            .map_err(|e| format!("reclaiming guest memory: {}", chain(&e)))?;
        let ram = machine.guest_ram();
        let private_after =
            range_footprint(None, ram.host_addr() as usize, ram.len()).map_or(0, |f| f.owned());
        Ok(ReclaimSummary {
            scanned_pages: report.scanned_pages,
            image_equal_pages: report.image_equal_pages,
            dropped_bytes: report.dropped_bytes(),
            clean_left_bytes: report.clean_left_bytes(),
            guest_private_after: private_after,
            paused_ms: ms(report.paused),
            took_ms: ms(report.took),
        })
    }

    pub(super) fn ask(&self, n: u64, timeout: Duration) -> Result<Reply, String> {
        let mailbox = self.mailbox()?;
        let mut args = [0u64; ARGS];
        args[0] = n;
        let sent = Instant::now();
        let answer = mailbox
            .call(request::ANSWER, args, report::RESPONSE, timeout)
            .map_err(|e| format!("{e} (does the guest answer requests?)"))?;
        Ok(Reply::Answer {
            answer: answer.args[0],
            round_trip_us: sent.elapsed().as_micros() as u64,
        })
    }

    pub(super) fn wait_running(&self, timeout: Duration) -> Result<Reply, String> {
        let deadline = Instant::now() + timeout;
        let mut core = self.lock();
        loop {
            match self.phase(&mut core) {
                VmPhase::Running | VmPhase::Paused => return Ok(Reply::Running),
                VmPhase::Failed => {
                    return Err(format!(
                        "the VM failed: {}",
                        core.failure.as_deref().unwrap_or("unknown")
                    ));
                }
                VmPhase::Stopping => return Err("the VM is stopping".into()),
                VmPhase::Warm | VmPhase::Starting => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("the VM is not running after {timeout:?}"));
            }
            core = self
                .changed
                .wait_timeout(core, (deadline - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub(super) fn stats(&self) -> VmStats {
        let (phase, machine, start, record, base, ksm_enabled) = {
            let mut core = self.lock();
            let phase = self.phase(&mut core);
            (
                phase,
                core.machine.clone(),
                core.start.clone(),
                core.record.clone(),
                core.responses_at_start,
                core.ksm_enabled,
            )
        };
        let pid = record.pid;
        let rollup = proc_stats::read_smaps_rollup(None).unwrap_or_default();
        let mut stats = VmStats {
            id: record.id.clone(),
            pid,
            phase: Some(phase),
            vcpus: self.config.vcpus,
            memory_bytes: self.config.memory_bytes as u64,
            process_cpu_ms: proc_stats::read_stat(pid)
                .map_or(0.0, |s| ms(proc_stats::ticks_to_duration(s.cpu_ticks))),
            memory: MemoryFigures {
                rss: rollup.rss,
                pss: rollup.pss,
                private: rollup.private,
                shared: rollup.shared,
                ksm_enabled,
                ..MemoryFigures::default()
            },
            start,
            sampled_at_ms: now_ms(),
            ..VmStats::default()
        };
        let Some(machine) = machine else {
            return stats;
        };
        let m = machine.stats();
        stats.vcpu_cpu_ms = m.vcpus.iter().map(|v| ms(v.cpu_time)).sum();
        stats.requests_served = responses(&machine).saturating_sub(base);
        let ram = machine.guest_ram();
        if let Ok(f) = range_footprint(None, ram.host_addr() as usize, ram.len()) {
            stats.memory.guest_resident = f.resident;
            stats.memory.guest_private = f.owned();
            stats.memory.guest_shared = f.shared_with_node();
            stats.memory.guest_ksm = f.ksm;
        }
        if let Some(memory) = machine.backing().lazy_memory() {
            let f = memory.stats();
            stats.faults = FaultFigures {
                faults: f.faults,
                pages_copied: f.pages_copied,
                pages_zeroed: f.pages_zeroed,
                errors: f.errors,
                latency_us: f
                    .latency
                    .buckets
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(|(b, n)| (vmstream_vmm::memory::latency::bucket_upper_us(b), *n))
                    .collect(),
                p50_us: f.latency.quantile_upper_us(0.5),
                p99_us: f.latency.quantile_upper_us(0.99),
            };
        }
        stats
    }

    pub(super) fn exit_after_stop(&self) -> ! {
        let machine = self.lock().machine.take();
        if let Some(machine) = machine {
            match Arc::try_unwrap(machine) {
                Ok(machine) => machine.stop(),
                // Another request still holds it; exiting ends its threads.
                Err(shared) => drop(shared),
            }
        }
        self.append_serial_output(&mut self.serial_written());
        if let Err(e) = std::fs::remove_dir_all(&self.paths.dir) {
            tracing::warn!(error = %e, dir = %self.paths.dir.display(), "VM directory not removed");
        }
        tracing::info!("VM stopped");
        std::process::exit(0)
    }
}
