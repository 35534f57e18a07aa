//! A Linux live image through the daemon's VM processes on the real
//! /dev/kvm: the project kernel (`make linux-guest`) boots from a Linux
//! start spec with its root disk under an overlay and `eth0` on a tap the
//! daemon's network code made in the VM's own namespace; the start returns
//! at `IP-Config: Complete`, the VM is captured into an image (devices,
//! overlay, interfaces), the source stops (its namespace goes), and two
//! clones of the image (copy-on-write and lazy) run at once, each in its
//! own namespace with the image's guest address, and each answers ping.

#[path = "../../vmm/tests/linux_common/mod.rs"]
mod linux_common;
#[path = "../../vmm/tests/linux_netns/mod.rs"]
mod linux_netns;

use std::path::{Path, PathBuf};
use std::time::Instant;

use vmstream_node::supervisor::{VmLaunch, VmSupervisor};
use vmstream_node::vm_net::{self, NETNS_DIR};
use vmstream_node::vm_process::linux::{NETWORK_FILE, read_network};
use vmstream_node::vm_protocol::{
    CloneBackend, CloneNetwork, LinuxDisk, LinuxNetwork, LinuxReadiness, LinuxStart, Reply,
    Request, StartSpec,
};
use vmstream_test_support::{Need, record_skip, require};

const EXE: &str = env!("CARGO_BIN_EXE_vmstream-node");
const GUEST_IP: [u8; 4] = [192, 168, 78, 2];
const MEMORY_MIB: u64 = 128;

fn launch(id: &str, start: Option<StartSpec>) -> VmLaunch {
    VmLaunch {
        id: id.into(),
        owner: None,
        vcpus: 1,
        memory_bytes: MEMORY_MIB << 20,
        start,
        prepare_lazy: false,
        preload_image: None,
    }
}

fn netns_exists(id: &str) -> bool {
    Path::new(NETNS_DIR).join(vm_net::netns_name(id)).exists()
}

/// Stops the test's VMs (and so their namespaces) even when it fails.
struct StopAll<'a>(&'a VmSupervisor, Vec<String>);

impl Drop for StopAll<'_> {
    fn drop(&mut self) {
        for id in &self.1 {
            if self.0.get(id).is_some() {
                let _ = self.0.stop(id);
            }
            vm_net::remove(id);
        }
    }
}

#[test]
fn a_linux_image_is_booted_captured_and_cloned_by_vm_processes() {
    let test = "a_linux_image_is_booted_captured_and_cloned_by_vm_processes";
    if !require(test, &[Need::Kvm, Need::NetworkNamespaces]) {
        return;
    }
    let Some(linux) = linux_common::project_linux_dir(&["vmlinux", "rootfs.ext2"]) else {
        record_skip(
            test,
            "no project-built Linux kernel and root disk ($VMSTREAM_CACHE/linux-*/{vmlinux,rootfs.ext2}): run make linux-guest",
        );
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let supervisor = VmSupervisor::new(state.path(), PathBuf::from(EXE), Vec::new());
    let ids = ["linux-src", "linux-cow", "linux-lazy"].map(String::from);
    let _stop = StopAll(&supervisor, ids.to_vec());
    let [source_id, cow_id, lazy_id] = &ids;

    let nics = vec![LinuxNetwork {
        name: "eth0".into(),
        ip: Some(format!("{}/24", linux_netns::dotted(GUEST_IP))),
        gateway: Some("192.168.78.1".into()),
        mac: Some("52:54:00:78:00:02".into()),
        tap: None,
    }];
    let net = vm_net::create(source_id, &nics).expect("source namespace and tap");
    let mut network = nics.clone();
    network[0].tap = Some(net.taps[0].clone());
    let spec = StartSpec::Linux(LinuxStart {
        kernel: linux.join("vmlinux"),
        initrd: None,
        cmdline: String::new(),
        disks: vec![LinuxDisk {
            name: "root".into(),
            path: linux.join("rootfs.ext2"),
            read_only: false,
            root: true,
        }],
        network,
        readiness: LinuxReadiness::Booted,
        ready_timeout_ms: 300_000,
        netns: Some(net.netns.clone()),
    });
    supervisor.launch(&launch(source_id, None)).unwrap();
    let began = Instant::now();
    let reply = supervisor
        .call(source_id, &Request::Start { spec })
        .unwrap_or_else(|e| {
            let serial = state.path().join("vms").join(source_id).join("serial.log");
            panic!(
                "Linux start: {e}; console tail: {}",
                std::fs::read_to_string(serial).unwrap_or_default()
            )
        });
    assert!(matches!(reply, Reply::Started(_)), "{reply:?}");
    eprintln!(
        "source ready (IP-Config: Complete) after {:?}",
        began.elapsed()
    );
    assert!(
        state
            .path()
            .join("vms")
            .join(source_id)
            .join("disk-root.overlay")
            .is_file(),
        "the root disk's overlay is in the VM directory"
    );
    let rtt = vm_net::run_in_netns(&net.netns, || linux_netns::ping(GUEST_IP, 30)).unwrap();
    assert!(rtt.is_some(), "the source does not answer ping");

    let image = state.path().join("image");
    let Reply::Captured(summary) = supervisor
        .call(source_id, &Request::Capture { dir: image.clone() })
        .unwrap()
    else {
        panic!("no capture summary");
    };
    eprintln!(
        "captured: {} ms (paused {} ms), {} bytes",
        summary.capture_ms, summary.source_pause_ms, summary.size_bytes
    );
    assert!(
        image.join("disk-blk0.overlay").is_file(),
        "overlay in the image"
    );
    assert!(
        image.join(NETWORK_FILE).is_file(),
        "interfaces in the image"
    );
    supervisor.stop(source_id).unwrap();
    assert!(!netns_exists(source_id), "the source's namespace is left");

    let kept = read_network(&image);
    assert_eq!(kept, nics, "the image keeps the interfaces, without taps");
    let mut clones = Vec::new();
    for (id, backend) in [
        (cow_id, CloneBackend::CopyOnWrite),
        (lazy_id, CloneBackend::Lazy),
    ] {
        let net = vm_net::create(id, &kept).expect("clone namespace and tap");
        let started = Instant::now();
        supervisor
            .launch(&launch(
                id,
                Some(StartSpec::Clone {
                    image: image.clone(),
                    backend,
                    network: Some(CloneNetwork {
                        netns: net.netns.clone(),
                        taps: net.taps.clone(),
                    }),
                }),
            ))
            .unwrap_or_else(|e| panic!("clone {id}: {e}"));
        eprintln!(
            "clone {id} ({backend:?}) running after {:?}",
            started.elapsed()
        );
        assert!(
            state
                .path()
                .join("vms")
                .join(id)
                .join("disk-blk0.overlay")
                .is_file()
        );
        clones.push((id, net));
    }
    // Both run at once, each in its own namespace with the same addresses.
    for (id, net) in &clones {
        let rtt = vm_net::run_in_netns(&net.netns, || linux_netns::ping(GUEST_IP, 20)).unwrap();
        eprintln!("clone {id}: echo reply {rtt:?}");
        assert!(rtt.is_some(), "clone {id} does not answer ping");
    }
    for (id, _) in &clones {
        supervisor.stop(id).unwrap();
        assert!(!netns_exists(id), "the namespace of {id} is left");
    }
}
