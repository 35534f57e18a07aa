//! Fifty clones, each in its own process, of one 1 GiB image; every clone
//! reads the same 4096 pages (16 MiB, no zero pages among them) and then
//! pauses. Host memory is the sum over the clone processes of their PSS
//! (`/proc/PID/smaps_rollup`), so pages shared between clones (the image's
//! page cache pages, the binary) count once in total. KVM's own kernel
//! memory (shadow page tables, vCPU structures) is not in PSS and not
//! counted.
//!
//! The headline run reads 16 contiguous MiB. A second run reads 4096 pages
//! spread over the whole image (one every 63 pages): on this kernel a file
//! fault maps the whole large folio of the page cache (observed: 2 MiB per
//! touched page), for the CoW guest mapping and for the lazy handler's
//! mapping of the page store alike, so spread reads map (and count in PSS)
//! nearly the whole image, once for all clones.
//!
//! The bench re-executes itself as each child:
//! `vmstream-vmmbench --clone-child DIR BACKING BASE COUNT REGION STRIDE`.
//! The child opens the image, prepares a shell, restores, runs the touch,
//! pauses the VM, prints `ready SUM XOR PAGES TOUCH_MS` on stdout and waits
//! for its stdin to close before it exits. On failure it prints
//! `error MESSAGE` and exits non-zero.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Instant;

use vmstream_vmm::guests::{TouchCommand, TouchPattern};
use vmstream_vmm::machine::MachineConfig;
use vmstream_vmm::restore::{CloneSource, restore};
use vmstream_vmm::vstate::vm::KvmHost;

use super::error::BenchError;
use super::figures::{Figures, Rollup, clones_budget_mib, kib_to_mib, parse_smaps_rollup};
use super::guest::{Backing, CheckedTouch, prepare_shell};

/// The flag that puts the binary in clone-child mode.
pub const CHILD_FLAG: &str = "--clone-child";

/// VMM allowance per clone in the budget (MiB).
const ALLOWANCE_MIB: f64 = 4.0;

/// Child processes that are killed (by pid) and reaped if the run fails.
struct Children {
    running: Vec<(Child, BufReader<ChildStdout>)>,
}

impl Drop for Children {
    fn drop(&mut self) {
        for (child, _) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Memory of one set of clones.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    pss_mib: f64,
    rss_mib: f64,
    private_mib_per_clone: f64,
    pss_anon_mib: f64,
    pss_file_mib: f64,
    ready_s: f64,
    touch_ms_p50: f64,
}

fn spawn_child(dir: &Path, backing: Backing, touch: &TouchCommand) -> Result<Child, BenchError> {
    let exe = std::env::current_exe().map_err(BenchError::io("finding this executable"))?;
    Command::new(exe)
        .arg(CHILD_FLAG)
        .arg(dir)
        .arg(backing.name())
        .args(
            [
                touch.base_page,
                touch.count,
                touch.region_pages,
                touch.stride,
            ]
            .map(|v| v.to_string()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(BenchError::io("spawning a clone child"))
}

fn run_set(
    dir: &Path,
    backing: Backing,
    touch: &CheckedTouch,
    clones: usize,
) -> Result<Footprint, BenchError> {
    let started = Instant::now();
    let mut children = Children {
        running: Vec::with_capacity(clones),
    };
    for _ in 0..clones {
        let mut child = spawn_child(dir, backing, &touch.command)?;
        let stdout = child.stdout.take().expect("stdout is piped");
        children.running.push((child, BufReader::new(stdout)));
    }
    let mut touch_ms = Vec::with_capacity(clones);
    for (child, stdout) in &mut children.running {
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .map_err(BenchError::io("reading a clone child's report"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["ready", sum, xor, pages, ms] => {
                let parse = |s: &str| s.parse::<u64>().unwrap_or(u64::MAX);
                touch.check(&[parse(sum), parse(xor), parse(pages)])?;
                touch_ms.push(ms.parse::<f64>().unwrap_or(f64::NAN));
            }
            _ => {
                return Err(BenchError::Child(format!(
                    "clone child {} ({}) reported {:?}",
                    child.id(),
                    backing.name(),
                    line.trim()
                )));
            }
        }
    }
    let ready_s = started.elapsed().as_secs_f64();
    let mut total = Rollup::default();
    for (child, _) in &children.running {
        let path = format!("/proc/{}/smaps_rollup", child.id());
        let text =
            std::fs::read_to_string(&path).map_err(BenchError::io(format!("reading {path}")))?;
        let r = parse_smaps_rollup(&text);
        total.rss_kib += r.rss_kib;
        total.pss_kib += r.pss_kib;
        total.pss_anon_kib += r.pss_anon_kib;
        total.pss_file_kib += r.pss_file_kib;
        total.private_kib += r.private_kib;
        total.shared_kib += r.shared_kib;
    }
    // Closing stdin lets the children exit; reap them all.
    for (mut child, _) in std::mem::take(&mut children.running) {
        drop(child.stdin.take());
        let status = child
            .wait()
            .map_err(BenchError::io("waiting for a clone child"))?;
        if !status.success() {
            return Err(BenchError::Child(format!(
                "clone child {} exited with {status}",
                child.id()
            )));
        }
    }
    touch_ms.sort_by(f64::total_cmp);
    Ok(Footprint {
        pss_mib: kib_to_mib(total.pss_kib),
        rss_mib: kib_to_mib(total.rss_kib),
        private_mib_per_clone: kib_to_mib(total.private_kib) / clones as f64,
        pss_anon_mib: kib_to_mib(total.pss_anon_kib),
        pss_file_mib: kib_to_mib(total.pss_file_kib),
        ready_s,
        touch_ms_p50: super::figures::quantile(&touch_ms, 0.5).unwrap_or(f64::NAN),
    })
}

/// Runs `clones` clones with CoW memory, then with lazy memory, first all
/// reading the `contiguous` 16 MiB (the headline figures; the backing with
/// the smaller host memory gives `clones50_host_mib`), then all reading the
/// `spread` 16 MiB (`clones50_spread_*`).
pub fn run(
    dir: &Path,
    contiguous: &CheckedTouch,
    spread: &CheckedTouch,
    clones: usize,
    figures: &mut Figures,
) -> Result<(), BenchError> {
    figures.put_count("clones50_clones", clones as u64);
    for (layout, touch) in [("", contiguous), ("spread_", spread)] {
        let distinct: std::collections::HashSet<u64> = touch.command.pages().collect();
        let distinct_mib = distinct.len() as f64 * 4096.0 / (1 << 20) as f64;
        let working_set_mib = touch.command.count as f64 * 4096.0 / (1 << 20) as f64;
        let budget = clones_budget_mib(
            distinct.len() as u64,
            clones as u64,
            working_set_mib,
            ALLOWANCE_MIB,
        );
        let mut best: Option<(Backing, Footprint)> = None;
        for backing in [Backing::CopyOnWrite, Backing::Lazy] {
            let f = run_set(dir, backing, touch, clones)?;
            progress!(
                "{clones} {} clones ({}): PSS {:.1} MiB, RSS {:.1} MiB, private {:.2} MiB each, all ready after {:.1} s",
                backing.name(),
                if layout.is_empty() {
                    "contiguous"
                } else {
                    "spread"
                },
                f.pss_mib,
                f.rss_mib,
                f.private_mib_per_clone,
                f.ready_s
            );
            let prefix = format!("clones50_{layout}{}", backing.name());
            figures.put(format!("{prefix}_host_mib"), f.pss_mib);
            figures.put(format!("{prefix}_rss_sum_mib"), f.rss_mib);
            figures.put(
                format!("{prefix}_private_mib_per_clone"),
                f.private_mib_per_clone,
            );
            figures.put(format!("{prefix}_pss_anon_mib"), f.pss_anon_mib);
            figures.put(format!("{prefix}_pss_file_mib"), f.pss_file_mib);
            figures.put(format!("{prefix}_all_ready_s"), f.ready_s);
            figures.put(format!("{prefix}_touch_ms_p50"), f.touch_ms_p50);
            if best.is_none_or(|(_, b)| f.pss_mib < b.pss_mib) {
                best = Some((backing, f));
            }
        }
        let (backing, f) = best.expect("two backings measured");
        figures.put(format!("clones50_{layout}host_mib"), f.pss_mib);
        figures.put(format!("clones50_{layout}budget_mib"), budget);
        figures.put(format!("clones50_{layout}rss_sum_mib"), f.rss_mib);
        figures.put(
            format!("clones50_{layout}private_mib_per_clone"),
            f.private_mib_per_clone,
        );
        figures.put_count(
            format!("clones50_{layout}reported_backing_is_cow"),
            u64::from(backing == Backing::CopyOnWrite),
        );
        figures.put(
            format!("clones50_{layout}distinct_touched_mib"),
            distinct_mib,
        );
    }
    Ok(())
}

/// Entry point of a clone child (`args` after [`CHILD_FLAG`]). Returns the
/// process exit code.
pub fn child_main(args: &[String]) -> i32 {
    let mut stdout = std::io::stdout();
    match child(args) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(stdout, "error {}", super::error_chain(&e));
            let _ = stdout.flush();
            1
        }
    }
}

fn child(args: &[String]) -> Result<(), BenchError> {
    let [dir, backing, base, count, region, stride] = args else {
        return Err(BenchError::Usage(format!(
            "{CHILD_FLAG} DIR BACKING BASE COUNT REGION STRIDE, got {args:?}"
        )));
    };
    let number = |s: &String| {
        s.parse::<u64>()
            .map_err(|e| BenchError::Usage(format!("{s}: {e}")))
    };
    let dir = PathBuf::from(dir);
    let backing = Backing::parse(backing)
        .ok_or_else(|| BenchError::Usage(format!("unknown backing {backing}")))?;
    let command = TouchCommand {
        base_page: number(base)?,
        count: number(count)?,
        pattern: TouchPattern::Sequential,
        region_pages: number(region)?,
        stride: number(stride)?,
        marker: 0,
        seed: 1,
    };
    let host = KvmHost::open().map_err(BenchError::Kvm)?;
    let source = CloneSource::open(&dir).map_err(|source| BenchError::Open {
        dir: dir.clone(),
        source,
    })?;
    let config = MachineConfig {
        vcpus: source.state().vcpus.len() as u8,
        memory_bytes: source.state().memory_bytes as usize,
    };
    let (shell, _) = prepare_shell(&host, config, backing)?;
    let restored =
        restore(shell, &source, &backing.clone_memory()).map_err(|source| BenchError::Restore {
            dir: dir.clone(),
            source,
        })?;
    let started = Instant::now();
    let answer = restored
        .machine
        .mailbox()
        .call(
            vmstream_vmm::devices::mailbox::request::TOUCH,
            command.args(),
            vmstream_vmm::devices::mailbox::report::RESULT,
            super::guest::REPORT_TIMEOUT,
        )
        .map_err(|e| BenchError::Guest(format!("touch {command:?}: {e}")))?;
    let touch_ms = started.elapsed().as_secs_f64() * 1e3;
    restored.machine.pause()?;
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "ready {} {} {} {touch_ms:.3}",
        answer.args[0], answer.args[1], answer.args[2]
    )
    .and_then(|()| stdout.flush())
    .map_err(BenchError::io("reporting to the parent"))?;
    // Stay alive (paused, memory in place) until the parent has measured.
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(restored);
    Ok(())
}
