//! Live images of a running Linux: the project kernel boots with its root
//! on virtio-blk (through an overlay) and `ip=` on virtio-net in a network
//! namespace, is captured once it answers ping, and clones start from the
//! image one at a time, each with its own overlay and its own tap in a
//! namespace of its own carrying the same host address (made before the
//! request, as a node would), and each must answer the first echo request
//! (the time from the request to that reply is printed). The source is
//! captured once its kernel has finished booting and idles. The base disk and the captured overlay stay as they were, and an
//! image whose base disk changed is refused. One boot for the file (the
//! emulated kernel takes 20-60 s); a host-driven test shows a clone's disk
//! writes reach neither the base image nor the captured overlay.

mod linux_common;
mod linux_netns;
mod virtio_common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use linux_common::*;
use linux_netns::{Netns, TapSetup, dotted, first_echo, wait_running};
use virtio_common::*;
use vmstream_test_support::{Need, record_skip, require};
use vmstream_vmm::capture::capture;
use vmstream_vmm::devices::virtio::blk::Block;
use vmstream_vmm::devices::virtio::disk_files::{BaseDiskError, copy_overlay};
use vmstream_vmm::devices::virtio::{InterruptLine, VirtioMmio, VirtioModelState};
use vmstream_vmm::linux::clone::{CloneDevices, LinuxCloneError, restore_linux};
use vmstream_vmm::linux::{LinuxBootSpec, VirtioDeviceSpec};
use vmstream_vmm::machine::Machine;
use vmstream_vmm::memory::LazyOptions;
use vmstream_vmm::restore::{CloneMemory, CloneSource, RestoreError, restore};

const HOST_IP: [u8; 4] = [192, 168, 77, 1];
const GUEST_IP: [u8; 4] = [192, 168, 77, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x02];
const TAP: &str = "vmstap0";
const MEMORY_MIB: usize = 128;
/// Clones of each memory kind started (one at a time).
const CLONE_ROUNDS: usize = 3;
/// What the project kernel prints once no init could run and PID 1 idles
/// (its patched `init/main.c`): the end of its boot.
const GUEST_IDLE: &str = "vmstream: no init could run; PID 1 idles";

fn sha256(path: &Path) -> String {
    format!("{:x}", Sha256::digest(std::fs::read(path).unwrap()))
}

/// Gives `tap` (made in `netns` by the VMM) the host address, the source's
/// host-side MAC (so the guest's ARP cache stays right) and brings it up.
fn configure_tap(netns: &Netns, mac: Option<&str>) {
    if let Some(mac) = mac {
        netns.ip(&["link", "set", TAP, "address", mac]);
    }
    netns.ip(&[
        "addr",
        "add",
        &format!("{}/24", dotted(HOST_IP)),
        "dev",
        TAP,
    ]);
    netns.ip(&["link", "set", TAP, "up"]);
}

fn tap_mac(netns: &Netns) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &netns.0, "cat"])
        .arg(format!("/sys/class/net/{TAP}/address"))
        .output()
        .expect("read the tap's MAC");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_captured_linux_clones_answer_ping_each_in_its_own_namespace() {
    let test = "a_captured_linux_clones_answer_ping_each_in_its_own_namespace";
    if !require(test, &[Need::Kvm, Need::NetworkNamespaces]) {
        return;
    }
    let Some(host) = host(test) else { return };
    let Some(linux) = project_linux_dir(&["vmlinux", "rootfs.ext2"]) else {
        record_skip(
            test,
            "no project-built Linux kernel and root disk ($VMSTREAM_CACHE/linux-*/{vmlinux,rootfs.ext2}): run make linux-guest",
        );
        return;
    };
    let work = tempfile::tempdir().unwrap();
    // A copy of the root disk, so the test can change it at the end.
    let base = work.path().join("rootfs.ext2");
    std::fs::copy(linux.join("rootfs.ext2"), &base).unwrap();
    let base_sha = sha256(&base);
    let mut spec = LinuxBootSpec::new(linux.join("vmlinux"));
    spec.devices = vec![
        VirtioDeviceSpec::Block {
            image: base.clone(),
            overlay: Some(work.path().join("source.overlay")),
        },
        VirtioDeviceSpec::Net {
            tap: TAP.into(),
            mac: GUEST_MAC,
        },
        VirtioDeviceSpec::Rng,
    ];
    spec.cmdline = format!(
        "root=/dev/vda ro rootwait ip={}::{}:255.255.255.0::eth0:off",
        dotted(GUEST_IP),
        dotted(HOST_IP)
    );
    let pid = std::process::id();
    let source_ns = Netns::create(&format!("vmscap{pid}"));
    let machine: Machine =
        source_ns.run(|| Machine::boot_linux(shell(&host, MEMORY_MIB), &spec).expect("boot Linux"));
    configure_tap(&source_ns, None);
    let host_mac = tap_mac(&source_ns);
    wait_for_milestones(
        &machine,
        &[
            &["Linux version"],
            &["IP-Config: Complete"],
            &["VFS: Mounted root (ext2 filesystem) readonly"],
            // The kernel's last boot work (freeing and write-protecting
            // init memory: ~10 s of emulated instructions in PID 1, which
            // a PREEMPT_NONE kernel does not leave for the softirq thread
            // that would answer ping) is over: the image is of an idle
            // guest, as a clone should start from.
            &[GUEST_IDLE],
        ],
        LINUX_BOOT_TIMEOUT,
    );
    let echo = source_ns.run(|| first_echo(GUEST_IP, 30));
    eprintln!("source: first echo {echo:?}");
    assert!(echo.is_some(), "the source does not answer ping");

    let image = work.path().join("image");
    std::fs::create_dir(&image).unwrap();
    let report = capture(&machine, &image).expect("capture the running Linux");
    eprintln!(
        "captured: paused {:?} (save {:?}), total {:?}, {} non-zero pages, state {} bytes",
        report.timings.source_paused,
        report.timings.save_state,
        report.timings.total,
        report.pages.nonzero_pages,
        report.state_bytes
    );
    drop(machine);
    drop(source_ns);

    let source = CloneSource::open(&image).expect("open the image");
    let saved = &source.state().devices.virtio;
    assert_eq!(saved.len(), 3);
    assert!(matches!(saved[0].model, VirtioModelState::Block { .. }));
    assert_eq!((saved[1].base, saved[1].gsi), (0xd000_1000, 6));
    assert!(source.state().captured_at_unix_ns.is_some());
    let captured_overlay = image.join("disk-blk0.overlay");
    let overlay_sha = sha256(&captured_overlay);

    // The plain restore refuses an image with devices, naming the way.
    let error = restore(shell(&host, MEMORY_MIB), &source, &CloneMemory::CopyOnWrite).unwrap_err();
    assert!(matches!(error, RestoreError::VirtioDevices(3)), "{error}");

    // Each clone's tap is made and configured in its namespace before the
    // request (the source's host MAC, the host address, a permanent
    // neighbour entry for the guest): the VMM only attaches to it, and the
    // first echo request goes out at once. Latency is printed, not asserted.
    let memories = [
        ("copy-on-write", CloneMemory::CopyOnWrite),
        ("lazy", CloneMemory::Lazy(LazyOptions::default())),
    ];
    let mut latencies: Vec<(&str, Duration)> = Vec::new();
    for round in 0..CLONE_ROUNDS {
        for (kind, memory) in &memories {
            let i = latencies.len();
            let netns = Netns::create(&format!("vmsclone{i}-{pid}"));
            netns.prepare_tap(&TapSetup {
                name: TAP,
                mac: &host_mac,
                host_ip: HOST_IP,
                guest: (GUEST_IP, GUEST_MAC),
            });
            let devices = CloneDevices {
                dir: work.path().join(format!("clone{i}")),
                taps: vec![TAP.into()],
            };
            let (clone, (running, echo), first_reply) = netns.run(|| {
                let requested = Instant::now();
                let clone = restore_linux(shell(&host, MEMORY_MIB), &source, memory, &devices)
                    .expect("start a clone");
                let running = wait_running(TAP, Duration::from_secs(2));
                let echo = first_echo(GUEST_IP, 20);
                (clone, (running, echo), requested.elapsed())
            });
            let stats = clone.machine.stats();
            eprintln!(
                "clone {i} (round {round}, {kind}): restore {:?}, first echo reply {first_reply:?} after the request ({echo:?}); vCPU {:?}, {:?}",
                clone.timings.total,
                clone.machine.vcpus()[0].status(),
                stats.vcpus[0],
            );
            assert!(running, "clone {i} ({kind}): its tap never came up");
            let echo = echo.unwrap_or_else(|| panic!("clone {i} ({kind}) does not answer ping"));
            // Behaviour, not time: the first request is answered (no boot
            // work left in the guest, no ARP round trip through it) ...
            assert_eq!(
                echo.seq, 0,
                "clone {i} ({kind}) lost its first echo requests"
            );
            // ... and the clone's console shows it resumed idle.
            let console = String::from_utf8_lossy(&clone.machine.serial_output()).into_owned();
            assert!(
                !console.contains("Freeing unused kernel") && !console.contains("Run /"),
                "clone {i} ({kind}) was still booting:\n{console}"
            );
            assert!(devices.dir.join("disk-blk0.overlay").is_file());
            assert_eq!(clone.machine.virtio().len(), 3);
            assert_eq!(stats.unclaimed_mmio_accesses, 0);
            drop(clone);
            latencies.push((kind, first_reply));
        }
    }
    for (kind, _) in &memories {
        let mut times: Vec<_> = latencies
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, t)| *t)
            .collect();
        times.sort();
        eprintln!(
            "{kind} clones: request to first echo reply p50 {:?} (all: {times:?})",
            times[times.len() / 2]
        );
    }
    assert_eq!(sha256(&base), base_sha, "the base disk changed");
    assert_eq!(
        sha256(&captured_overlay),
        overlay_sha,
        "the captured overlay changed"
    );

    // A changed base disk is refused before anything is started.
    let mut bytes = std::fs::read(&base).unwrap();
    bytes[1024] ^= 0xff;
    std::fs::write(&base, &bytes).unwrap();
    let devices = CloneDevices {
        dir: work.path().join("refused"),
        taps: vec![TAP.into()],
    };
    let error = restore_linux(
        shell(&host, MEMORY_MIB),
        &source,
        &CloneMemory::CopyOnWrite,
        &devices,
    )
    .unwrap_err();
    eprintln!(
        "changed base disk: {error}: {}",
        std::error::Error::source(&error).unwrap()
    );
    assert!(
        matches!(
            &error,
            LinuxCloneError::BaseDisk {
                source: BaseDiskError::Content { .. },
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_clones_disk_writes_reach_neither_the_base_image_nor_the_captured_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&base, &data).unwrap();
    let base_sha = sha256(&base);
    let g = TestGuest::new(16);
    let line = || -> Arc<dyn InterruptLine> { g.interrupts.clone() };

    // The source writes sector 8 (overlay block 1).
    let source_overlay = dir.path().join("source.overlay");
    let block = Block::open("blk0", &base, Some(&source_overlay)).unwrap();
    let mut dev = VirtioMmio::new(block, g.mem.clone(), line());
    let mut qs = bring_up(&mut dev, u64::MAX, &[16]);
    g.write(BLK_DATA_ADDR, &[0xaa; 512]);
    let write = [readable(BLK_DATA_ADDR, 512)];
    assert_eq!(
        blk_request(&g, &mut dev, &mut qs[0], BLK_T_OUT, 8, &write).0,
        0
    );

    // Capture: state plus the overlay copied into the image.
    let saved = dev.save();
    assert_eq!(saved.device.overlay.written, vec![[1, 1]]);
    let captured = dir.path().join("disk-blk0.overlay");
    let ov = &saved.device.overlay;
    copy_overlay(&source_overlay, &captured, ov.len, &ov.written).unwrap();
    let captured_sha = sha256(&captured);

    // A clone from its own copy writes sector 16 (block 2) and rewrites 8.
    let clone_overlay = dir.path().join("clone.overlay");
    copy_overlay(&captured, &clone_overlay, ov.len, &ov.written).unwrap();
    let block = Block::restore("blk0", &base, Some(&clone_overlay), &saved.device).unwrap();
    let mut clone = VirtioMmio::restore(block, g.mem.clone(), line(), &saved.transport).unwrap();
    let q = &mut qs[0];
    g.write(BLK_DATA_ADDR, &[0xbb; 512]);
    assert_eq!(blk_request(&g, &mut clone, q, BLK_T_OUT, 16, &write).0, 0);
    g.write(BLK_DATA_ADDR, &[0xcc; 512]);
    assert_eq!(blk_request(&g, &mut clone, q, BLK_T_OUT, 8, &write).0, 0);
    let read = [writable(BLK_DATA_ADDR, 512 * 9)];
    assert_eq!(blk_request(&g, &mut clone, q, BLK_T_IN, 8, &read).0, 0);
    let got = g.read(BLK_DATA_ADDR, 512 * 9);
    assert!(got[..512].iter().all(|&b| b == 0xcc));
    assert_eq!(got[512..4096], data[8 * 512 + 512..16 * 512]);
    assert!(got[4096..].iter().all(|&b| b == 0xbb));
    assert_eq!(clone.device().written_blocks(), 2);

    assert_eq!(sha256(&base), base_sha, "the base image changed");
    assert_eq!(
        sha256(&captured),
        captured_sha,
        "the captured overlay changed"
    );
}
