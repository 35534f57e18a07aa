//! VMM benchmark for `make bench`: clone start from warm shells (256 MiB and
//! 4 GiB images, userfaultfd and copy-on-write memory), a clone's first
//! 16 MiB working set, the source's pause during capture (256 MiB and
//! 1 GiB), and the host memory of 50 clones in 50 processes. Everything
//! runs on the real `/dev/kvm` and real userfaultfd with the memory micro
//! guest; every clone that is timed is also checked to read the image's
//! data. Prints one flat JSON object of numbers on stdout; progress goes to
//! stderr. What each figure measures is documented in the module of its
//! benchmark (`vmmbench/*.rs`).
//!
//! Usage: `vmstream-vmmbench [--runs N] [--capture-runs N] [--capture-complete N] [--ws-runs N]
//! [--clones N] [--vcpus N] [--dir PATH] [--keep] [--only LIST]` where LIST is a
//! comma-separated subset of `capture,start,working-set,clones`. Build with
//! `--release`. Images and work files go to a fresh directory under
//! `--dir` (default: the system temp dir) that is removed at the end.

/// Prints a progress line on stderr with the time since the bench started.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("vmmbench [{:6.1} s] {}", $crate::elapsed_s(), format!($($arg)*))
    };
}

#[path = "vmmbench/capture_pause.rs"]
mod capture_pause;
#[path = "vmmbench/clones.rs"]
mod clones;
#[path = "vmmbench/error.rs"]
mod error;
#[path = "vmmbench/figures.rs"]
mod figures;
#[path = "vmmbench/fill.rs"]
mod fill;
#[path = "vmmbench/guest.rs"]
mod guest;
#[path = "vmmbench/start.rs"]
mod start;
#[path = "vmmbench/working_set.rs"]
mod working_set;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use vmstream_vmm::machine::MachineConfig;
use vmstream_vmm::vstate::vm::KvmHost;

use error::BenchError;
use figures::Figures;
use guest::{CheckedTouch, DENSE_FILL, SPARSE_FILL};

const MIB: usize = 1 << 20;

static STARTED: OnceLock<Instant> = OnceLock::new();

/// Seconds since the bench started.
fn elapsed_s() -> f64 {
    STARTED.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Command-line settings.
#[derive(Debug, Clone)]
struct Args {
    runs: usize,
    capture_runs: usize,
    capture_complete: usize,
    ws_runs: usize,
    clones: usize,
    vcpus: u8,
    dir: PathBuf,
    only: Vec<String>,
    /// Leave the work directory (images) in place, for inspection.
    keep: bool,
}

const PARTS: [&str; 4] = ["capture", "start", "working-set", "clones"];

fn parse_args(args: &[String]) -> Result<Args, BenchError> {
    let mut parsed = Args {
        runs: 60,
        capture_runs: 20,
        capture_complete: 5,
        ws_runs: 50,
        clones: 50,
        vcpus: 2,
        dir: std::env::temp_dir(),
        only: PARTS.iter().map(|s| s.to_string()).collect(),
        keep: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| BenchError::Usage(format!("{flag} needs a value")))
        };
        let number = |v: String| {
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| BenchError::Usage(format!("{flag} needs a positive number")))
        };
        match flag.as_str() {
            "--runs" => parsed.runs = number(value()?)?,
            "--capture-runs" => parsed.capture_runs = number(value()?)?,
            "--capture-complete" => parsed.capture_complete = number(value()?)?,
            "--ws-runs" => parsed.ws_runs = number(value()?)?,
            "--clones" => parsed.clones = number(value()?)?,
            "--vcpus" => {
                parsed.vcpus = u8::try_from(number(value()?)?)
                    .map_err(|_| BenchError::Usage("--vcpus is too large".into()))?
            }
            "--dir" => parsed.dir = PathBuf::from(value()?),
            "--keep" => parsed.keep = true,
            "--only" => {
                parsed.only = value()?.split(',').map(str::to_string).collect();
                if let Some(bad) = parsed.only.iter().find(|p| !PARTS.contains(&p.as_str())) {
                    return Err(BenchError::Usage(format!(
                        "--only: unknown part {bad} (parts: {})",
                        PARTS.join(",")
                    )));
                }
            }
            other => return Err(BenchError::Usage(format!("unknown argument {other}"))),
        }
    }
    Ok(parsed)
}

/// The error and its causes, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The work directory; removed (with every image in it) when dropped,
/// unless `--keep` was given.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create(parent: &Path, keep: bool) -> Result<Self, BenchError> {
        let path = parent.join(format!("vmstream-vmmbench-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(BenchError::io(format!("creating {}", path.display())))?;
        Ok(Self { path, keep })
    }

    /// Removes an image that is no longer needed (unless `--keep`).
    fn discard(&self, dir: &Path) -> Result<(), BenchError> {
        if self.keep {
            return Ok(());
        }
        std::fs::remove_dir_all(dir).map_err(BenchError::io(format!("removing {}", dir.display())))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.keep {
            progress!("work directory kept: {}", self.path.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            progress!("cannot remove {}: {e}", self.path.display());
        }
    }
}

fn open_host() -> Result<Arc<KvmHost>, BenchError> {
    if !KvmHost::is_available() {
        return Err(BenchError::KvmMissing);
    }
    let host = KvmHost::open().map_err(BenchError::Kvm)?;
    vmstream_vmm::memory::userfaultfd_available().map_err(BenchError::Userfaultfd)?;
    Ok(host)
}

fn config(vcpus: u8, mib: usize) -> MachineConfig {
    MachineConfig {
        vcpus,
        memory_bytes: mib * MIB,
    }
}

/// The check run on every timed clone: 16 pages from the first page of the
/// data area that holds data.
fn data_check(config: MachineConfig, fill: &fill::ClusteredFill) -> CheckedTouch {
    let pages = config.memory_bytes as u64 / 4096;
    let first = fill
        .first_data_page(guest::DATA_FIRST_PAGE, pages - 16)
        .unwrap_or(guest::DATA_FIRST_PAGE);
    CheckedTouch::contiguous(first, 16, fill)
}

fn run(args: &Args) -> Result<Figures, BenchError> {
    let host = open_host()?;
    let work = WorkDir::create(&args.dir, args.keep)?;
    let wants = |part: &str| args.only.iter().any(|p| p == part);
    let started = Instant::now();
    let mut figures = Figures::default();
    figures.put_count("vcpus", u64::from(args.vcpus));

    if wants("capture") {
        for (name, suffix, mib) in [
            ("capture-256mib", "_256mib", 256),
            ("capture-1gib", "_1gib", 1024),
        ] {
            let kept = capture_pause::run(
                &host,
                &work.path,
                name,
                suffix,
                config(args.vcpus, mib),
                args.capture_runs,
                args.capture_complete,
                &mut figures,
            )?;
            work.discard(&kept)?;
        }
    }

    if wants("start") {
        // Both sizes get the same (sparse) fill: what a clone start does
        // depends on the memory size, not on the pages' content, and a
        // sparse 4 GiB image is quick to write.
        let mut images = Vec::new();
        for (suffix, mib) in [("_256mib", 256), ("_4gib", 4096)] {
            let config = config(args.vcpus, mib);
            let dir = work.path.join(format!("start{suffix}"));
            let made = Instant::now();
            guest::make_image(&host, config, &SPARSE_FILL, &dir)?;
            progress!(
                "{mib} MiB clone-start image made in {:.1} s",
                made.elapsed().as_secs_f64()
            );
            images.push(start::StartImage {
                suffix,
                dir,
                config,
                check: data_check(config, &SPARSE_FILL),
            });
        }
        start::run(&host, &images, args.runs, &mut figures)?;
        for image in &images {
            work.discard(&image.dir)?;
        }
    }

    if wants("working-set") || wants("clones") {
        let ws = config(args.vcpus, 1024);
        let dir = work.path.join("working-set-1gib");
        guest::make_image(&host, ws, &DENSE_FILL, &dir)?;
        let spread = CheckedTouch::spread(ws.memory_bytes, 4096, &DENSE_FILL);
        if wants("working-set") {
            working_set::run(&host, &dir, ws, &spread, args.ws_runs, &mut figures)?;
        }
        if wants("clones") {
            // 16 contiguous MiB, 4 MiB into the data area.
            let contiguous =
                CheckedTouch::contiguous(guest::DATA_FIRST_PAGE + 1024, 4096, &DENSE_FILL);
            clones::run(&dir, &contiguous, &spread, args.clones, &mut figures)?;
        }
        work.discard(&dir)?;
    }
    figures.put("bench_seconds", started.elapsed().as_secs_f64());
    Ok(figures)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(clones::CHILD_FLAG) {
        std::process::exit(clones::child_main(&args[1..]));
    }
    if cfg!(debug_assertions) {
        progress!("debug build; figures are only meaningful with --release");
    }
    STARTED.get_or_init(Instant::now);
    let outcome = parse_args(&args).and_then(|args| run(&args));
    match outcome {
        Ok(figures) => println!("{}", figures.to_json()),
        Err(e) => {
            eprintln!("vmstream-vmmbench: {}", error_chain(&e));
            if matches!(e, BenchError::Usage(_)) {
                eprintln!(
                    "usage: vmstream-vmmbench [--runs N] [--capture-runs N] [--capture-complete N] [--ws-runs N] [--clones N] [--vcpus N] [--dir PATH] [--keep] [--only capture,start,working-set,clones]"
                );
            }
            std::process::exit(1);
        }
    }
}
