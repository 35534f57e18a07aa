//! The memory micro guest as the benchmarks use it: boot it with a host fill,
//! capture it, start clones of its image in warm shells, and send it touch
//! requests whose checksum is verified against the fill (every clone the
//! bench times is also checked to compute the right data).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_vmm::capture::{CaptureReport, capture};
use vmstream_vmm::devices::mailbox::{Report, report, request};
use vmstream_vmm::guests::{GuestProgram, TouchCommand, TouchPattern, TouchResult};
use vmstream_vmm::machine::{BootOptions, Machine, MachineConfig, VmShell};
use vmstream_vmm::memory::{LazyOptions, PAGE_SIZE};
use vmstream_vmm::restore::CloneMemory;
use vmstream_vmm::vstate::vm::KvmHost;

use super::error::BenchError;
use super::fill::ClusteredFill;

/// Generous: guest instructions are emulated (~1 µs each) and 50 clones
/// share two cores in the clones benchmark.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(300);

/// First RAM page the host fill and the guest's touches may use.
pub const DATA_FIRST_PAGE: u64 = vmstream_vmm::arch::x86_64::layout::DATA_START / PAGE_SIZE as u64;

/// The capture benchmark's fill: 60 % random, 30 % zero, 10 % duplicate
/// pages (in clusters of 64 pages).
pub const REALISTIC_FILL: ClusteredFill = ClusteredFill {
    zero_percent: 30,
    duplicate_percent: 10,
    cluster_pages: 64,
    seed: 0x5eed_0001,
};

/// The working-set image's fill: no zero pages, so every page a clone
/// touches is a real 4 KiB of data (90 % random, 10 % duplicates).
pub const DENSE_FILL: ClusteredFill = ClusteredFill {
    zero_percent: 0,
    duplicate_percent: 10,
    cluster_pages: 64,
    seed: 0x5eed_0002,
};

/// The clone-start images' fill: 90 % zero pages, so a 4 GiB image is
/// written (and deleted) in seconds.
pub const SPARSE_FILL: ClusteredFill = ClusteredFill {
    zero_percent: 90,
    duplicate_percent: 2,
    cluster_pages: 64,
    seed: 0x5eed_0003,
};

/// How a clone's memory is backed, as the benchmarks name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `MAP_PRIVATE` of the page store (page cache shared between clones).
    CopyOnWrite,
    /// userfaultfd MISSING faults served by the handler thread.
    Lazy,
    /// userfaultfd with `UFFD_FEATURE_SIGBUS`: the vCPU thread fills the page
    /// on the exit KVM reports (PVM: an MMIO exit).
    LazySigbus,
}

impl Backing {
    /// Name used in keys and on the child's command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::CopyOnWrite => "cow",
            Self::Lazy => "lazy",
            Self::LazySigbus => "sigbus",
        }
    }

    /// Parses [`Backing::name`].
    pub fn parse(name: &str) -> Option<Self> {
        [Self::CopyOnWrite, Self::Lazy, Self::LazySigbus]
            .into_iter()
            .find(|b| b.name() == name)
    }

    fn lazy_options(self) -> Option<LazyOptions> {
        match self {
            Self::CopyOnWrite => None,
            Self::Lazy => Some(LazyOptions::default()),
            Self::LazySigbus => Some(LazyOptions {
                sigbus: true,
                ..LazyOptions::default()
            }),
        }
    }

    /// What `restore` is asked for.
    pub fn clone_memory(self) -> CloneMemory {
        match self.lazy_options() {
            None => CloneMemory::CopyOnWrite,
            Some(options) => CloneMemory::Lazy(options),
        }
    }
}

/// A warm shell for one clone: created (and registered with userfaultfd for
/// lazy backings) before the request; returns it and how long that took.
pub fn prepare_shell(
    host: &Arc<KvmHost>,
    config: MachineConfig,
    backing: Backing,
) -> Result<(VmShell, Duration), BenchError> {
    let start = Instant::now();
    let mib = config.memory_bytes >> 20;
    let mut shell =
        VmShell::create(host, config).map_err(|source| BenchError::Shell { mib, source })?;
    if let Some(options) = backing.lazy_options() {
        shell
            .prepare_lazy(options)
            .map_err(|source| BenchError::PrepareLazy { mib, source })?;
    }
    Ok((shell, start.elapsed()))
}

/// Boots the memory guest, waits for its READY report and fills its data
/// area with `fill` (the guest never touches the data area by itself).
pub fn boot_memory_guest(
    host: &Arc<KvmHost>,
    config: MachineConfig,
    fill: &ClusteredFill,
) -> Result<Machine, BenchError> {
    let (shell, _) = prepare_shell(host, config, Backing::CopyOnWrite)?;
    let machine = Machine::boot(shell, GuestProgram::Memory, &BootOptions::default())?;
    machine
        .mailbox()
        .wait_report(0, REPORT_TIMEOUT, |r| r.kind == report::READY)
        .ok_or_else(|| BenchError::Guest("the memory guest did not report READY".into()))?;
    let pages = config.memory_bytes as u64 / PAGE_SIZE as u64;
    fill.fill(&machine.ram(), DATA_FIRST_PAGE, pages);
    Ok(machine)
}

/// Boots the memory guest over `fill`, captures it into `dir` (created) and
/// stops it.
pub fn make_image(
    host: &Arc<KvmHost>,
    config: MachineConfig,
    fill: &ClusteredFill,
    dir: &Path,
) -> Result<CaptureReport, BenchError> {
    let machine = boot_memory_guest(host, config, fill)?;
    std::fs::create_dir_all(dir).map_err(BenchError::io(format!("creating {}", dir.display())))?;
    let report = capture(&machine, dir).map_err(|source| BenchError::Capture {
        dir: dir.to_path_buf(),
        source,
    })?;
    machine.stop();
    Ok(report)
}

/// A touch request and the result the guest must report for it.
#[derive(Debug, Clone, Copy)]
pub struct CheckedTouch {
    pub command: TouchCommand,
    pub expected: TouchResult,
}

impl CheckedTouch {
    /// Reads (no marker) `count` pages spread over the whole data area of a
    /// `memory_bytes` guest filled with `fill`.
    pub fn spread(memory_bytes: usize, count: u64, fill: &ClusteredFill) -> Self {
        let region = memory_bytes as u64 / PAGE_SIZE as u64 - DATA_FIRST_PAGE;
        let command = TouchCommand {
            base_page: DATA_FIRST_PAGE,
            count,
            pattern: TouchPattern::Sequential,
            region_pages: region,
            stride: super::figures::spread_stride(region, count),
            marker: 0,
            seed: 1,
        };
        Self::of(command, fill)
    }

    /// Reads `count` consecutive pages from `first`.
    pub fn contiguous(first: u64, count: u64, fill: &ClusteredFill) -> Self {
        let command = TouchCommand {
            base_page: first,
            count,
            pattern: TouchPattern::Sequential,
            region_pages: count,
            stride: 1,
            marker: 0,
            seed: 1,
        };
        Self::of(command, fill)
    }

    /// `command` checked against `fill`.
    pub fn of(command: TouchCommand, fill: &ClusteredFill) -> Self {
        Self {
            command,
            expected: command.expected(|page| fill.first_qword(page)),
        }
    }

    /// Sends the request, waits for the answer and checks it.
    pub fn run(&self, machine: &Machine) -> Result<Report, BenchError> {
        let answer = machine
            .mailbox()
            .call(
                request::TOUCH,
                self.command.args(),
                report::RESULT,
                REPORT_TIMEOUT,
            )
            .map_err(|e| {
                BenchError::Guest(format!(
                    "touch {:?}: {e}; vCPU 0 {:?}",
                    self.command,
                    machine.vcpus()[0].status()
                ))
            })?;
        self.check(&answer.args[..3])?;
        Ok(answer)
    }

    /// Checks a reported (sum, xor, pages).
    pub fn check(&self, got: &[u64]) -> Result<(), BenchError> {
        let want = [self.expected.sum, self.expected.xor, self.expected.pages];
        if got != want {
            return Err(BenchError::Guest(format!(
                "touch {:?} reported (sum, xor, pages) {got:x?}, the image holds {want:x?}",
                self.command
            )));
        }
        Ok(())
    }
}
