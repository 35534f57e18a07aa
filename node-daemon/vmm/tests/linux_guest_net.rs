//! A real Linux kernel with its root file system on virtio-blk and its
//! network on virtio-net: the project-built ext2 disk mounts as root, the
//! kernel configures eth0 from `ip=` and answers ICMP echo from the host
//! over a tap that lives in a network namespace of its own.

mod linux_common;
mod linux_netns;

use linux_common::*;
use linux_netns::{Netns, dotted, ping};
use vmstream_test_support::{Need, record_skip, require};
use vmstream_vmm::linux::{LinuxBootSpec, VirtioDeviceSpec};
use vmstream_vmm::machine::Machine;

const HOST_IP: [u8; 4] = [192, 168, 77, 1];
const GUEST_IP: [u8; 4] = [192, 168, 77, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x02];

#[test]
fn linux_mounts_root_from_virtio_blk_and_answers_ping_over_virtio_net() {
    let test = "linux_mounts_root_from_virtio_blk_and_answers_ping_over_virtio_net";
    if !require(test, &[Need::Kvm, Need::NetworkNamespaces]) {
        return;
    }
    let Some(host) = host(test) else { return };
    let Some(dir) = project_linux_dir(&["vmlinux", "rootfs.ext2"]) else {
        record_skip(
            test,
            "no project-built Linux kernel and root disk ($VMSTREAM_CACHE/linux-*/{vmlinux,rootfs.ext2}): run make linux-guest",
        );
        return;
    };
    let image = dir.join("rootfs.ext2");
    let image_before = std::fs::read(&image).unwrap();
    let netns = Netns::create(&format!("vmslinux{}", std::process::id()));
    let tap = "vmstap0";
    let mut spec = LinuxBootSpec::new(dir.join("vmlinux"));
    spec.devices = vec![
        VirtioDeviceSpec::Block {
            image: image.clone(),
            overlay: None,
        },
        VirtioDeviceSpec::Net {
            tap: tap.into(),
            mac: GUEST_MAC,
        },
    ];
    spec.cmdline = format!(
        "root=/dev/vda ro rootwait ip={}::{}:255.255.255.0::eth0:off",
        dotted(GUEST_IP),
        dotted(HOST_IP)
    );
    eprintln!("booting with: {}", spec.full_cmdline());
    // The tap is created in the namespace by the thread that boots.
    let machine: Machine = netns.run(|| {
        Machine::boot_linux(shell(&host, 128), &spec).expect("boot Linux with root and network")
    });
    netns.ip(&[
        "addr",
        "add",
        &format!("{}/24", dotted(HOST_IP)),
        "dev",
        tap,
    ]);
    netns.ip(&["link", "set", tap, "up"]);
    let seen = wait_for_milestones(
        &machine,
        &[
            &["Linux version"],
            &["virtio_blk virtio0: [vda]"],
            &["IP-Config: Complete"],
            &["VFS: Mounted root (ext2 filesystem) readonly"],
        ],
        LINUX_BOOT_TIMEOUT,
    );
    let booted_in = seen.last().unwrap().1;
    let rtt = netns.run(|| ping(GUEST_IP, 30));
    let serial = String::from_utf8_lossy(&machine.serial_output()).into_owned();
    eprintln!("console in {}", keep_console(&serial).display());
    let rtt = rtt.unwrap_or_else(|| {
        panic!(
            "no echo reply from {} within 30 s; vCPU {:?}",
            dotted(GUEST_IP),
            machine.vcpus()[0].status()
        )
    });
    eprintln!(
        "root mounted after {booted_in:?}; first echo reply after {rtt:?}; {:?}",
        machine.stats().vcpus[0]
    );
    drop(machine);
    assert!(
        std::fs::read(&image).unwrap() == image_before,
        "the root disk image changed"
    );
}
