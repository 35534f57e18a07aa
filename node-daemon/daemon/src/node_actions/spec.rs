//! Translation from the API's types to the VM process's start spec (the
//! one place an API field becomes a `vm_protocol` value): boot sources
//! (built-in guests, and Linux guests once their artifacts are fetched),
//! memory fills, and a clone's memory backend.

use std::path::{Path, PathBuf};

use vmstream_api::v1alpha1::{
    BootSource, Guest, LinuxBoot, LinuxReadiness as ApiReadiness, MemoryBackend, MemoryFill,
};
use vmstream_vmm::guests::{FillSpec, GuestProgram};

use crate::vm_protocol::{
    CloneBackend, CloneNetwork, LinuxDisk, LinuxNetwork, LinuxReadiness, LinuxStart, StartSpec,
};

/// The vmm fill of an API fill: the API's random and duplicate shares are
/// kept; everything else is zero (zero pages and unfilled pages are alike).
pub fn fill_spec(fill: &MemoryFill) -> FillSpec {
    let random = fill.random_percent.min(100);
    let duplicate = fill.duplicate_percent.min(100 - random);
    FillSpec {
        zero_percent: (100 - random - duplicate) as u8,
        duplicate_percent: duplicate as u8,
        templates: 16,
        seed: fill.seed,
    }
}

fn guest_program(guest: Guest) -> GuestProgram {
    match guest {
        Guest::Counter => GuestProgram::Counter,
        Guest::Memory => GuestProgram::Memory,
        Guest::Request => GuestProgram::Request,
    }
}

/// The boot start spec of a LiveImage's built-in `guest` source (`None`
/// for a `linux` source: see [`linux_spec`]).
pub fn boot_spec(boot: &BootSource) -> Option<StartSpec> {
    let guest = boot.guest?;
    Some(StartSpec::Boot {
        guest: guest_program(guest),
        fill: boot.fill.as_ref().map(fill_spec),
        params: if guest == Guest::Counter {
            // Counter guests report progress every 4096 iterations.
            vec![4095]
        } else {
            Vec::new()
        },
        ready_timeout_ms: u64::from(boot.readiness.timeout_seconds) * 1000,
    })
}

/// The local files of a Linux guest's artifacts, as the fetcher left
/// them: `disks` in the order of the API's `disks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedLinux {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub disks: Vec<PathBuf>,
}

/// The Linux start spec of a LiveImage's `linux` boot source, given its
/// fetched files. Without a readiness probe the guest is ready once its
/// kernel runs.
pub fn linux_spec(boot: &BootSource, linux: &LinuxBoot, files: &FetchedLinux) -> StartSpec {
    StartSpec::Linux(LinuxStart {
        kernel: files.kernel.clone(),
        initrd: files.initrd.clone(),
        cmdline: linux.cmdline.clone().unwrap_or_default(),
        disks: linux
            .disks
            .iter()
            .zip(&files.disks)
            .map(|(disk, path)| LinuxDisk {
                name: disk.name.clone(),
                path: path.clone(),
                read_only: disk.read_only,
                root: disk.root,
            })
            .collect(),
        network: linux
            .network
            .iter()
            .map(|n| LinuxNetwork {
                name: n.name.clone(),
                ip: n.ip.clone(),
                gateway: n.gateway.clone(),
                mac: n.mac.clone(),
                tap: None,
            })
            .collect(),
        readiness: linux
            .readiness
            .as_ref()
            .map_or(LinuxReadiness::Booted, linux_readiness),
        ready_timeout_ms: u64::from(boot.readiness.timeout_seconds) * 1000,
        netns: None,
    })
}

fn linux_readiness(readiness: &ApiReadiness) -> LinuxReadiness {
    if let Some(pattern) = &readiness.serial_pattern {
        LinuxReadiness::SerialPattern {
            pattern: pattern.clone(),
        }
    } else if let Some(tcp) = &readiness.tcp_probe {
        LinuxReadiness::TcpProbe { port: tcp.port }
    } else if readiness.icmp.is_some() {
        LinuxReadiness::Icmp
    } else if readiness.agent.is_some() {
        LinuxReadiness::Agent
    } else {
        LinuxReadiness::Booted
    }
}

/// The protocol's backend of a VMClone's `memoryBackend`.
pub fn clone_backend(backend: MemoryBackend) -> CloneBackend {
    match backend {
        MemoryBackend::Lazy => CloneBackend::Lazy,
        MemoryBackend::CopyOnWrite => CloneBackend::CopyOnWrite,
    }
}

/// The start spec of a clone of the local image in `image_dir`.
pub fn clone_spec(
    image_dir: &Path,
    backend: MemoryBackend,
    network: Option<CloneNetwork>,
) -> StartSpec {
    StartSpec::Clone {
        image: image_dir.to_path_buf(),
        backend: clone_backend(backend),
        network,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_keeps_random_and_duplicate_shares() {
        let fill = MemoryFill {
            seed: 3,
            random_percent: 50,
            zero_percent: 10,
            duplicate_percent: 20,
        };
        let spec = fill_spec(&fill);
        assert_eq!((spec.zero_percent, spec.duplicate_percent), (30, 20));
        assert_eq!(spec.seed, 3);
    }

    #[test]
    fn a_linux_source_becomes_a_linux_start_with_the_fetched_files() {
        let boot: BootSource = serde_json::from_value(serde_json::json!({
            "memoryMiB": 256,
            "readiness": {"timeoutSeconds": 90},
            "linux": {
                "kernel": {"url": "https://h/vmlinux", "sha256": "aa"},
                "initrd": {"path": "/boot/initrd"},
                "cmdline": "console=ttyS0 root=/dev/vda",
                "disks": [
                    {"name": "root", "image": {"url": "https://h/root", "sha256": "bb"}, "root": true},
                    {"name": "data", "image": {"path": "/srv/data"}, "readOnly": true}
                ],
                "network": [{"name": "eth0", "ip": "10.0.2.15/24", "gateway": "10.0.2.2"}],
                "readiness": {"serialPattern": "login:"}
            }
        }))
        .unwrap();
        let linux = boot.linux.as_ref().unwrap();
        assert_eq!(boot_spec(&boot), None, "no built-in guest");
        let files = FetchedLinux {
            kernel: "/s/artifacts/sha256-aa".into(),
            initrd: Some("/boot/initrd".into()),
            disks: vec!["/s/artifacts/sha256-bb".into(), "/srv/data".into()],
        };
        assert_eq!(
            linux_spec(&boot, linux, &files),
            StartSpec::Linux(LinuxStart {
                kernel: "/s/artifacts/sha256-aa".into(),
                initrd: Some("/boot/initrd".into()),
                cmdline: "console=ttyS0 root=/dev/vda".into(),
                disks: vec![
                    LinuxDisk {
                        name: "root".into(),
                        path: "/s/artifacts/sha256-bb".into(),
                        read_only: false,
                        root: true
                    },
                    LinuxDisk {
                        name: "data".into(),
                        path: "/srv/data".into(),
                        read_only: true,
                        root: false
                    },
                ],
                network: vec![LinuxNetwork {
                    name: "eth0".into(),
                    ip: Some("10.0.2.15/24".into()),
                    gateway: Some("10.0.2.2".into()),
                    mac: None,
                    tap: None,
                }],
                readiness: LinuxReadiness::SerialPattern {
                    pattern: "login:".into()
                },
                ready_timeout_ms: 90_000,
                netns: None,
            })
        );
        let mut bare = linux.clone();
        bare.readiness = None;
        bare.cmdline = None;
        let StartSpec::Linux(start) = linux_spec(&boot, &bare, &files) else {
            panic!("not a Linux start");
        };
        assert_eq!(start.readiness, LinuxReadiness::Booted);
        assert_eq!(start.cmdline, "");
    }

    #[test]
    fn a_clone_spec_keeps_the_backend() {
        assert_eq!(
            clone_spec(Path::new("/img"), MemoryBackend::Lazy, None),
            StartSpec::Clone {
                image: "/img".into(),
                backend: CloneBackend::Lazy,
                network: None,
            }
        );
        assert_eq!(
            clone_backend(MemoryBackend::default()),
            CloneBackend::CopyOnWrite
        );
    }
}
