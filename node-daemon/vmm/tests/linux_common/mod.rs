//! Shared set-up for the Linux guest tests: KVM or a recorded skip, VM
//! shells, the project-built kernel and root disk (`make linux-guest`), and
//! waiting for console milestones with the console kept in a file.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmstream_test_support::{Need, record_skip, require};
use vmstream_vmm::machine::{Machine, MachineConfig, VmShell};
use vmstream_vmm::vstate::run_loop::VcpuStatus;
use vmstream_vmm::vstate::vm::KvmHost;

/// How long a real kernel may take to reach its last expected line.
pub const LINUX_BOOT_TIMEOUT: Duration = Duration::from_secs(300);

pub fn host(test: &str) -> Option<Arc<KvmHost>> {
    if !require(test, &[Need::Kvm]) {
        return None;
    }
    match KvmHost::open() {
        Ok(host) => Some(host),
        Err(error) => {
            record_skip(test, &format!("KVM is not usable: {error}"));
            None
        }
    }
}

pub fn shell(host: &Arc<KvmHost>, memory_mib: usize) -> VmShell {
    VmShell::create(
        host,
        MachineConfig {
            vcpus: 1,
            memory_bytes: memory_mib << 20,
        },
    )
    .expect("create VM shell")
}

/// The directory of the project-built kernel and root disk holding every
/// file of `needs` (e.g. `vmlinux`, `rootfs.ext2`): `$VMSTREAM_LINUX_DIR`
/// when set (`make test` sets it to what `hack/linux-guest/build.sh`
/// printed), else the newest `linux-*` directory under the project's cache
/// (`$VMSTREAM_CACHE`, default `~/.cache/vmstream`).
pub fn project_linux_dir(needs: &[&str]) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("VMSTREAM_LINUX_DIR").map(PathBuf::from) {
        return needs
            .iter()
            .all(|file| dir.join(file).is_file())
            .then_some(dir);
    }
    let cache = std::env::var_os("VMSTREAM_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/vmstream"))
        })?;
    std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("linux-"))
        .map(|entry| entry.path())
        .filter(|dir| needs.iter().all(|file| dir.join(file).is_file()))
        .max_by_key(|dir| {
            dir.join(needs[0])
                .metadata()
                .and_then(|m| m.modified())
                .ok()
        })
}

/// Waits for each of `milestones` in order (any of a milestone's
/// alternatives counts); returns the time each was first seen, or fails
/// with the console so far.
pub fn wait_for_milestones(
    machine: &Machine,
    milestones: &[&[&str]],
    timeout: Duration,
) -> Vec<(String, Duration)> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut from = 0;
    for alternatives in milestones {
        loop {
            let serial = String::from_utf8_lossy(&machine.serial_output()).into_owned();
            let hit = alternatives
                .iter()
                .filter_map(|line| serial[from..].find(line).map(|at| (at, *line)))
                .min();
            if let Some((at, line)) = hit {
                from += at + line.len();
                seen.push((line.to_string(), start.elapsed()));
                eprintln!("{:>7.1?}  {line}", start.elapsed());
                break;
            }
            let status = machine.vcpus()[0].status();
            let ended = matches!(status, VcpuStatus::Exited(_));
            if ended || start.elapsed() > timeout {
                let log = keep_console(&serial);
                let tail: String = serial
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!(
                    "no {alternatives:?} after {:?} (vCPU {status:?}); whole console in {}; tail:\n{tail}",
                    start.elapsed(),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    seen
}

/// Writes the console to a file in the temporary directory, for reading
/// after the test; returns its path.
pub fn keep_console(serial: &str) -> PathBuf {
    let path = std::env::temp_dir().join("vmstream-linux-boot-console.log");
    let _ = std::fs::write(&path, serial);
    path
}
