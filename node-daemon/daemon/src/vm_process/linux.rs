//! Linux guests in a VM process: booting a [`LinuxStart`] with the VMM's
//! Linux boot (disks read-only under a copy-on-write overlay in the VM's
//! directory, interfaces on the daemon's taps opened inside the VM's
//! network namespace, virtio-rng), waiting for the readiness text on the
//! serial console, and starting clones of a captured Linux image with
//! `restore_linux` (the clone's overlays in its VM directory, its own taps).
//!
//! A Linux VM keeps its interfaces' configuration; a capture writes it
//! into the image ([`NETWORK_FILE`]), so the daemon can make a clone's taps
//! alike (same gateway, same host-side MAC).

use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vmstream_vmm::linux::clone::{CloneDevices, restore_linux};
use vmstream_vmm::linux::{LinuxBootSpec, VirtioDeviceSpec};
use vmstream_vmm::machine::{Machine, VmShell};
use vmstream_vmm::restore::{CloneMemory, CloneSource, Restored};
use vmstream_vmm::vstate::run_loop::VcpuStatus;

use super::Vm;
use crate::error_chain::chain;
use crate::vm_net::{guest_address, run_in_netns};
use crate::vm_protocol::{CloneNetwork, LinuxNetwork, LinuxReadiness, LinuxStart, StartRefusal};

/// The file of a Linux image that keeps its interfaces (JSON list of
/// [`LinuxNetwork`]).
pub const NETWORK_FILE: &str = "linux-network.json";

/// Serial text a guest with a network is ready at (its kernel configured
/// the interfaces from `ip=`).
pub const READY_WITH_NETWORK: &str = "IP-Config: Complete";
/// Serial text a guest without a network is ready at.
pub const READY_WITHOUT_NETWORK: &str = "VFS: Mounted root";

/// Why this VM process refuses `start` before touching its shell.
pub(super) fn refusal(start: &LinuxStart) -> Option<StartRefusal> {
    match start.readiness {
        LinuxReadiness::Booted | LinuxReadiness::SerialPattern { .. } => {}
        LinuxReadiness::TcpProbe { .. } | LinuxReadiness::Icmp | LinuxReadiness::Agent => {
            return Some(StartRefusal::LinuxReadinessUnsupported);
        }
    }
    start
        .network
        .iter()
        .any(|n| n.tap.is_none())
        .then_some(StartRefusal::LinuxNetworkWithoutTap)
}

/// The serial text the guest of `start` is ready at.
pub fn ready_pattern(start: &LinuxStart) -> &str {
    match &start.readiness {
        LinuxReadiness::SerialPattern { pattern } => pattern,
        _ if start.network.is_empty() => READY_WITHOUT_NETWORK,
        _ => READY_WITH_NETWORK,
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    parts.try_into().ok()
}

/// The guest MAC of an interface: the one given, else a locally
/// administered one derived from the interface.
fn guest_mac(nic: &LinuxNetwork) -> Result<[u8; 6], String> {
    match &nic.mac {
        Some(mac) => {
            parse_mac(mac).ok_or_else(|| format!("interface {}: bad MAC {mac:?}", nic.name))
        }
        None => {
            let d = Sha256::digest(format!("{}/{:?}", nic.name, nic.ip).as_bytes());
            Ok([0x52, 0x54, 0x00, d[0], d[1], d[2]])
        }
    }
}

fn netmask(prefix: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

/// The VMM's boot spec of `start`, overlays in `vm_dir`: disks in order,
/// then interfaces, then virtio-rng. The caller's command line gets
/// `root=` (the root disk) and `ip=` (the first interface with an address)
/// unless it has them.
pub fn boot_spec(start: &LinuxStart, vm_dir: &Path) -> Result<LinuxBootSpec, String> {
    let mut spec = LinuxBootSpec::new(&start.kernel);
    spec.initrd = start.initrd.clone();
    let mut cmdline = start.cmdline.trim().to_owned();
    for (index, disk) in start.disks.iter().enumerate() {
        spec.devices.push(VirtioDeviceSpec::Block {
            image: disk.path.clone(),
            overlay: (!disk.read_only).then(|| vm_dir.join(format!("disk-{}.overlay", disk.name))),
        });
        if disk.root && !cmdline.split_whitespace().any(|w| w.starts_with("root=")) {
            let letter = char::from(b'a' + u8::try_from(index).unwrap_or(25).min(25));
            let mode = if disk.read_only { "ro" } else { "rw" };
            cmdline = format!("root=/dev/vd{letter} {mode} rootwait {cmdline}");
        }
    }
    let has_ip = cmdline.split_whitespace().any(|w| w.starts_with("ip="));
    let mut ip_added = has_ip;
    for nic in &start.network {
        let tap = nic
            .tap
            .clone()
            .ok_or_else(|| StartRefusal::LinuxNetworkWithoutTap.to_string())?;
        spec.devices.push(VirtioDeviceSpec::Net {
            tap,
            mac: guest_mac(nic)?,
        });
        if !ip_added && let Some((addr, prefix)) = guest_address(nic).map_err(|e| e.to_string())? {
            let gateway = nic
                .gateway
                .as_deref()
                .map(|g| g.split('/').next().unwrap_or(g))
                .unwrap_or("");
            cmdline = format!(
                "{cmdline} ip={addr}::{gateway}:{}::{}:off",
                netmask(prefix),
                nic.name
            );
            ip_added = true;
        }
    }
    spec.devices.push(VirtioDeviceSpec::Rng);
    spec.cmdline = cmdline.trim().to_owned();
    Ok(spec)
}

/// Waits until the serial console of `machine` printed `pattern`; the
/// error says what happened instead.
pub fn wait_serial(machine: &Machine, pattern: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = machine.serial_output();
        if out
            .windows(pattern.len().max(1))
            .any(|w| w == pattern.as_bytes())
        {
            return Ok(());
        }
        if let VcpuStatus::Exited(end) = machine.vcpus()[0].status() {
            return Err(format!(
                "the Linux guest stopped ({end:?}) before printing {pattern:?}"
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the Linux guest did not print {pattern:?} within {} ms (console in serial.log)",
                timeout.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Vm {
    /// Boots `start` in `shell` (inside its network namespace, if any);
    /// returns once the machine runs (readiness is the caller's wait).
    pub(super) fn boot_linux(&self, shell: VmShell, start: &LinuxStart) -> Result<Machine, String> {
        let spec = boot_spec(start, &self.paths.dir)?;
        let boot = || Machine::boot_linux(shell, &spec).map_err(|e| chain(&e));
        let machine = match &start.netns {
            Some(netns) => run_in_netns(netns, boot)??,
            None => boot()?,
        };
        self.lock().linux_network = start.network.clone();
        Ok(machine)
    }

    /// Starts a clone of the Linux image `source` (in `image`) with its
    /// overlays in this VM's directory and its interfaces on `network`.
    pub(super) fn restore_linux_clone(
        &self,
        shell: VmShell,
        image: &Path,
        source: &CloneSource,
        memory: &CloneMemory,
        network: Option<&CloneNetwork>,
    ) -> Result<Restored, String> {
        let devices = CloneDevices {
            dir: self.paths.dir.clone(),
            taps: network.map(|n| n.taps.clone()).unwrap_or_default(),
        };
        let restore = || restore_linux(shell, source, memory, &devices).map_err(|e| chain(&e));
        let restored = match network {
            Some(n) => run_in_netns(&n.netns, restore)??,
            None => restore()?,
        };
        self.lock().linux_network = read_network(image);
        Ok(restored)
    }

    /// Keeps the Linux interfaces in a captured image (nothing for VMs
    /// without them).
    pub(super) fn write_network_file(&self, dir: &Path) -> Result<(), String> {
        let network = self.lock().linux_network.clone();
        if network.is_empty() {
            return Ok(());
        }
        let path = dir.join(NETWORK_FILE);
        let json = serde_json::to_vec_pretty(&network).expect("interfaces serialize");
        std::fs::write(&path, json).map_err(|e| format!("writing {}: {e}", path.display()))
    }
}

/// The interfaces kept in the Linux image in `image` (none for other
/// images), without their taps (each VM has its own).
pub fn read_network(image: &Path) -> Vec<LinuxNetwork> {
    let Ok(text) = std::fs::read(image.join(NETWORK_FILE)) else {
        return Vec::new();
    };
    let mut network: Vec<LinuxNetwork> = serde_json::from_slice(&text).unwrap_or_default();
    for nic in &mut network {
        nic.tap = None;
    }
    network
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_protocol::LinuxDisk;

    fn start() -> LinuxStart {
        LinuxStart {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "quiet".into(),
            disks: vec![LinuxDisk {
                name: "root".into(),
                path: "/d".into(),
                read_only: false,
                root: true,
            }],
            network: vec![LinuxNetwork {
                name: "eth0".into(),
                ip: Some("192.168.77.2/24".into()),
                gateway: Some("192.168.77.1".into()),
                mac: Some("52:54:00:77:00:02".into()),
                tap: Some("vmst0".into()),
            }],
            readiness: LinuxReadiness::Booted,
            ready_timeout_ms: 1000,
            netns: None,
        }
    }

    #[test]
    fn the_boot_spec_adds_root_ip_and_overlays() {
        let spec = boot_spec(&start(), Path::new("/vm")).unwrap();
        assert_eq!(
            spec.cmdline,
            "root=/dev/vda rw rootwait quiet ip=192.168.77.2::192.168.77.1:255.255.255.0::eth0:off"
        );
        assert_eq!(
            spec.devices,
            vec![
                VirtioDeviceSpec::Block {
                    image: "/d".into(),
                    overlay: Some("/vm/disk-root.overlay".into())
                },
                VirtioDeviceSpec::Net {
                    tap: "vmst0".into(),
                    mac: [0x52, 0x54, 0, 0x77, 0, 2]
                },
                VirtioDeviceSpec::Rng,
            ]
        );
        let mut own = start();
        own.cmdline = "root=/dev/vdb ip=dhcp".into();
        assert_eq!(
            boot_spec(&own, Path::new("/vm")).unwrap().cmdline,
            "root=/dev/vdb ip=dhcp"
        );
    }

    #[test]
    fn readiness_defaults_and_refusals() {
        let mut s = start();
        assert_eq!(ready_pattern(&s), READY_WITH_NETWORK);
        s.network.clear();
        assert_eq!(ready_pattern(&s), READY_WITHOUT_NETWORK);
        assert_eq!(refusal(&s), None);
        s.readiness = LinuxReadiness::TcpProbe { port: 22 };
        assert_eq!(refusal(&s), Some(StartRefusal::LinuxReadinessUnsupported));
        let mut s = start();
        s.network[0].tap = None;
        assert_eq!(refusal(&s), Some(StartRefusal::LinuxNetworkWithoutTap));
        assert_eq!(netmask(16).to_string(), "255.255.0.0");
    }
}
