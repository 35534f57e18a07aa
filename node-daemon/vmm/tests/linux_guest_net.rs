//! A real Linux kernel with its root file system on virtio-blk and its
//! network on virtio-net: the project-built ext2 disk mounts as root, the
//! kernel configures eth0 from `ip=` and answers ICMP echo from the host
//! over a tap that lives in a network namespace of its own.

mod linux_common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use linux_common::*;
use vmstream_test_support::{Need, record_skip, require};
use vmstream_vmm::linux::{LinuxBootSpec, VirtioDeviceSpec};
use vmstream_vmm::machine::Machine;

const HOST_IP: [u8; 4] = [192, 168, 77, 1];
const GUEST_IP: [u8; 4] = [192, 168, 77, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x02];

/// A network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn create(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        Self(name.to_string())
    }

    /// `ip` inside the namespace.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.0, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs `f` on a thread that has entered the namespace (taps and
    /// sockets made there belong to it).
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = std::fs::File::open(&path).expect("open the namespace");
                    // SAFETY: setns on this thread only, with an fd that
                    // stays open for the call.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("namespace thread")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends ICMP echo requests to `dst` (one a second, up to `tries`) from a
/// raw socket of the calling thread's namespace; returns the round trip
/// of the first reply.
fn ping(dst: [u8; 4], tries: u16) -> Option<Duration> {
    // SAFETY: plain socket creation; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO reads one timeval from a live local.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst),
        },
        sin_zero: [0; 8],
    };
    let id = std::process::id() as u16;
    for seq in 0..tries {
        let mut packet = [8u8, 0, 0, 0, 0, 0, 0, 0, b'v', b'm', b's', b't', 0, 0, 0, 0];
        packet[4..6].copy_from_slice(&id.to_be_bytes());
        packet[6..8].copy_from_slice(&seq.to_be_bytes());
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
        let sent_at = Instant::now();
        // SAFETY: sends `packet` to `addr`, both live locals of the sizes given.
        unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        while sent_at.elapsed() < Duration::from_secs(1) {
            let mut reply = [0u8; 128];
            // SAFETY: receives into a live local buffer of the size given.
            let n = unsafe {
                libc::recv(
                    socket.as_raw_fd(),
                    reply.as_mut_ptr().cast(),
                    reply.len(),
                    0,
                )
            };
            if n <= 0 {
                break;
            }
            let header = usize::from(reply[0] & 0x0f) * 4;
            let icmp = &reply[header..n as usize];
            if reply[12..16] == dst
                && icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                return Some(sent_at.elapsed());
            }
        }
    }
    None
}

fn dotted(ip: [u8; 4]) -> String {
    ip.map(|b| b.to_string()).join(".")
}

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
