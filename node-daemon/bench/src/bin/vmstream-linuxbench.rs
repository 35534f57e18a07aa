//! Linux-guest benchmark for `make bench`: the project-built kernel
//! (`hack/linux-guest/build.sh`, taken from `$VMSTREAM_LINUX_DIR`) boots
//! with virtio-blk, virtio-net and virtio-rng in a network namespace; the
//! figures are the boot request to its first ICMP echo reply, the source's
//! pause while it is captured (once it idles), and clones' request to their
//! first echo reply (the headline: copy-on-write, the tap opened before the
//! request, one echo request sent at the request; beside it, probing every
//! 1 ms, with the tap opened by the VMM at restore, and lazy memory).
//! Everything runs on the real `/dev/kvm` with real taps and
//! needs root and `ip`. Prints one flat JSON object of numbers on stdout;
//! progress goes to stderr. What each figure measures is documented in the
//! module that measures it (`linuxbench/*.rs`).
//!
//! Usage: `vmstream-linuxbench [--clones N] [--lazy-clones N] [--probe-us N] [--dir PATH]`.
//! Build with `--release`. Every namespace (and the tap in it) is removed
//! when its VM is done, also on error; the work directory (image,
//! overlays) is removed at the end.

/// Prints a progress line on stderr with the time since the bench started.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("linuxbench [{:6.1} s] {}", $crate::elapsed_s(), format!($($arg)*))
    };
}

#[path = "linuxbench/clones.rs"]
mod clones;
#[path = "linuxbench/error.rs"]
mod error;
// Shared with vmstream-vmmbench; only the quantiles and the JSON object
// are used here.
#[allow(dead_code)]
#[path = "vmmbench/figures.rs"]
mod figures;
#[path = "linuxbench/net.rs"]
mod net;
#[path = "linuxbench/probe.rs"]
mod probe;
#[path = "linuxbench/source.rs"]
mod source;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vmstream_vmm::machine::MachineConfig;
use vmstream_vmm::restore::CloneSource;
use vmstream_vmm::vstate::vm::KvmHost;

use clones::{Keys, Variant};
use error::BenchError;
use figures::Figures;

/// Guest memory of the source and its clones.
const MEMORY_MIB: usize = 128;

static STARTED: OnceLock<Instant> = OnceLock::new();

/// Seconds since the bench started.
fn elapsed_s() -> f64 {
    STARTED.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// The source's and every clone's machine: one vCPU (the Linux boot path
/// supports one), [`MEMORY_MIB`].
fn config() -> MachineConfig {
    MachineConfig {
        vcpus: 1,
        memory_bytes: MEMORY_MIB << 20,
    }
}

/// Command-line settings.
#[derive(Debug, Clone)]
struct Args {
    clones: usize,
    lazy_clones: usize,
    /// Interval of a clone's echo requests.
    probe: Duration,
    dir: PathBuf,
}

fn parse_args(args: &[String]) -> Result<Args, BenchError> {
    let mut parsed = Args {
        clones: 20,
        lazy_clones: 10,
        probe: Duration::from_millis(1),
        dir: std::env::temp_dir(),
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
                .map_err(|_| BenchError::Usage(format!("{flag} needs a number")))
        };
        match flag.as_str() {
            "--clones" => parsed.clones = number(value()?)?.max(1),
            "--lazy-clones" => parsed.lazy_clones = number(value()?)?,
            "--probe-us" => parsed.probe = Duration::from_micros(number(value()?)?.max(100) as u64),
            "--dir" => parsed.dir = PathBuf::from(value()?),
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

/// Root, `/dev/kvm`, `ip` and the kernel directory, or a clear message.
fn check_host() -> Result<(Arc<KvmHost>, PathBuf), BenchError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BenchError::Setup(
            "needs root (network namespaces, taps, raw ICMP sockets)".into(),
        ));
    }
    if !KvmHost::is_available() {
        return Err(BenchError::Setup(
            "/dev/kvm is missing or not accessible read-write".into(),
        ));
    }
    let ip_works = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|out| out.status.success());
    if !ip_works {
        return Err(BenchError::Setup(
            "needs the `ip` command (iproute2)".into(),
        ));
    }
    let linux = std::env::var_os("VMSTREAM_LINUX_DIR")
        .map(PathBuf::from)
        .ok_or_else(|| {
            BenchError::Setup(
                "VMSTREAM_LINUX_DIR is not set: point it at the project kernel, \
                 VMSTREAM_LINUX_DIR=$(hack/linux-guest/build.sh)"
                    .into(),
            )
        })?;
    for file in ["vmlinux", "rootfs.ext2"] {
        if !linux.join(file).is_file() {
            return Err(BenchError::Setup(format!(
                "{} has no {file}: run hack/linux-guest/build.sh and use the directory it prints",
                linux.display()
            )));
        }
    }
    let host = KvmHost::open().map_err(BenchError::vmm("opening KVM"))?;
    Ok((host, linux))
}

fn run(args: &Args) -> Result<Figures, BenchError> {
    let (host, linux) = check_host()?;
    let work = tempfile::Builder::new()
        .prefix("vmstream-linuxbench-")
        .tempdir_in(&args.dir)
        .map_err(BenchError::io(format!(
            "creating a work directory in {}",
            args.dir.display()
        )))?;
    let started = Instant::now();
    let mut figures = Figures::default();
    let image = source::boot_and_capture(&host, &linux, work.path(), &mut figures)?;
    let source = CloneSource::open(&image).map_err(BenchError::vmm("opening the live image"))?;

    let mut headline = Vec::new();
    let mut at_restore = Vec::new();
    let mut lazy = Vec::new();
    let mut single = Vec::new();
    let mut index = 0;
    for round in 0..args.clones.max(args.lazy_clones) {
        let mut variants = Vec::new();
        if round < args.clones {
            variants.extend([
                Variant::HEADLINE,
                Variant::TAP_AT_RESTORE,
                Variant::SINGLE_PROBE,
            ]);
        }
        if round < args.lazy_clones {
            variants.push(Variant::LAZY);
        }
        for variant in variants {
            let sample = clones::one(&host, &source, variant, work.path(), index, args.probe)?;
            index += 1;
            match variant {
                Variant::HEADLINE => headline.push(sample),
                Variant::TAP_AT_RESTORE => at_restore.push(sample),
                Variant::SINGLE_PROBE => single.push(sample),
                _ => lazy.push(sample),
            }
        }
    }
    clones::put(
        &mut figures,
        &Keys {
            first_echo: "linux_clone_first_echo_ms_probe_1ms",
            restore: "linux_clone_probe_1ms_restore_ms",
            lost_first: "linux_clone_probe_1ms_lost_first",
            no_echo: "linux_clone_probe_1ms_no_echo",
        },
        &headline,
    )?;
    clones::put(
        &mut figures,
        &Keys {
            first_echo: "linux_clone_first_echo_ms_tap_at_restore",
            restore: "linux_clone_tap_at_restore_restore_ms",
            lost_first: "linux_clone_tap_at_restore_lost_first",
            no_echo: "linux_clone_tap_at_restore_no_echo",
        },
        &at_restore,
    )?;
    clones::put(
        &mut figures,
        &Keys {
            first_echo: "linux_clone_first_echo_ms",
            restore: "linux_clone_restore_ms",
            lost_first: "linux_clone_first_echo_lost_first",
            no_echo: "linux_clone_no_echo",
        },
        &single,
    )?;
    if !lazy.is_empty() {
        clones::put(
            &mut figures,
            &Keys {
                first_echo: "linux_clone_lazy_first_echo_ms",
                restore: "linux_clone_lazy_restore_ms",
                lost_first: "linux_clone_lazy_first_echo_lost_first",
                no_echo: "linux_clone_lazy_no_echo",
            },
            &lazy,
        )?;
    }
    figures.put_count("linux_clones", headline.len() as u64);
    figures.put_count("linux_lazy_clones", lazy.len() as u64);
    figures.put("linux_bench_seconds", started.elapsed().as_secs_f64());
    Ok(figures)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if cfg!(debug_assertions) {
        progress!("debug build; figures are only meaningful with --release");
    }
    STARTED.get_or_init(Instant::now);
    match parse_args(&args).and_then(|args| run(&args)) {
        Ok(figures) => println!("{}", figures.to_json()),
        Err(e) => {
            eprintln!("vmstream-linuxbench: {}", error_chain(&e));
            if matches!(e, BenchError::Usage(_)) {
                eprintln!(
                    "usage: vmstream-linuxbench [--clones N] [--lazy-clones N] [--probe-us N] [--dir PATH]"
                );
            }
            std::process::exit(1);
        }
    }
}
