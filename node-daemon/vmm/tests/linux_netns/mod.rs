//! Network namespaces and ICMP echo, shared by the Linux guest tests
//! (`linux_guest_net.rs`, `linux_clone.rs`): a namespace deleted on drop,
//! code run on a thread inside it, a tap made and configured in it ahead of
//! the VMM (which then only attaches), and a raw socket ping.

#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

/// A network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn create(name: &str) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["netns", "add", name]);
        Self(name.to_string())
    }

    /// `ip` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.0, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs `f` on a thread that has entered the namespace (taps and
    /// sockets made there belong to it).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
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

/// How a tap is prepared in a namespace before the VMM attaches to it.
pub struct TapSetup<'a> {
    pub name: &'a str,
    /// The host side's MAC (a clone's tap takes its source's, so the
    /// guest's ARP cache stays right).
    pub mac: &'a str,
    pub host_ip: [u8; 4],
    /// The guest's address and MAC: a permanent neighbour entry, so the
    /// host sends its first frame without an ARP round trip through the
    /// (slow) guest.
    pub guest: ([u8; 4], [u8; 6]),
}

impl Netns {
    /// Makes a persistent tap (vnet header, as the VMM opens it) with the
    /// host address, `mac` and a permanent neighbour entry for the guest,
    /// and brings it up: all before the clone is requested. The VMM's
    /// TUNSETIFF attaches to it; the carrier comes up then.
    pub fn prepare_tap(&self, tap: &TapSetup<'_>) {
        let host = format!("{}/24", dotted(tap.host_ip));
        let guest_ip = dotted(tap.guest.0);
        let guest_mac = tap.guest.1.map(|b| format!("{b:02x}")).join(":");
        let name = tap.name;
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"]);
        self.ip(&["link", "set", name, "address", tap.mac]);
        self.ip(&["addr", "add", &host, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
        self.ip(&[
            "neigh",
            "replace",
            &guest_ip,
            "lladdr",
            &guest_mac,
            "dev",
            name,
            "nud",
            "permanent",
        ]);
    }
}

/// Waits (up to `timeout`) until interface `name` of the calling thread's
/// namespace is operationally up (IFF_RUNNING). A tap's carrier comes up
/// when the VMM attaches to it, but the host sends nothing through it
/// until the kernel's link-watch work has activated its queueing
/// discipline (the same step that sets the operational state): a frame
/// sent before is dropped. Returns whether it came up.
pub fn wait_running(name: &str, timeout: Duration) -> bool {
    // SAFETY: plain socket creation; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let started = Instant::now();
    loop {
        // SAFETY: an all-zero ifreq is a valid value of this plain C struct.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into
        // `req`, a live local ifreq.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
        // SAFETY: after a successful SIOCGIFFLAGS the union holds the flags.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        if rc == 0 && i32::from(flags) & libc::IFF_RUNNING != 0 {
            return true;
        }
        if started.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

pub fn ip(args: &[&str]) {
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
pub fn ping(dst: [u8; 4], tries: u16) -> Option<Duration> {
    first_echo(dst, tries).map(|echo| echo.rtt)
}

/// The first echo reply: which request (0 = the first one sent) it
/// answered, that request's round trip, and the time from the first
/// request to this reply.
#[derive(Debug, Clone, Copy)]
pub struct Echo {
    pub seq: u16,
    pub rtt: Duration,
    pub since_first: Duration,
}

/// [`ping`], telling which request the first reply answered.
pub fn first_echo(dst: [u8; 4], tries: u16) -> Option<Echo> {
    let started = Instant::now();
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
                return Some(Echo {
                    seq,
                    rtt: sent_at.elapsed(),
                    since_first: started.elapsed(),
                });
            }
        }
    }
    None
}

pub fn dotted(ip: [u8; 4]) -> String {
    ip.map(|b| b.to_string()).join(".")
}
