//! Network set-up of `vmstream-linuxbench`: a namespace per VM (the
//! pagestream helpers' [`TestNetwork`], removed on drop, also on error, and
//! with it the tap inside), its tap made and configured before the VM is
//! requested (persistent, vnet header as the VMM opens it, the host MAC the
//! source had, the host address, up, a permanent neighbour entry for the
//! guest so the first frame needs no ARP round trip through the slow
//! guest, IPv6 off so the tap carries only the probes), code run on a
//! thread inside the namespace, and the wait for a tap to run.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use vmstream_pagestream::netns::{TestNetwork, enter};

use crate::error::BenchError;

/// The tap's name in every namespace.
pub const TAP: &str = "vmstap0";
/// The host side of every VM's link.
pub const HOST_IP: [u8; 4] = [192, 168, 77, 1];
/// The host side's MAC, the same for the source and its clones (the
/// guest's ARP cache holds it).
pub const HOST_MAC: &str = "02:76:6d:73:00:01";
pub const GUEST_IP: [u8; 4] = [192, 168, 77, 2];
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x02];

pub fn dotted(ip: [u8; 4]) -> String {
    ip.map(|b| b.to_string()).join(".")
}

fn run(cmd: &mut Command) -> Result<(), BenchError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(BenchError::io(format!("running {shown}")))?;
    if !out.status.success() {
        return Err(BenchError::Setup(format!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// One VM's namespace with its prepared tap; removed on drop.
pub struct VmNet {
    name: String,
    _network: TestNetwork,
}

impl VmNet {
    /// Makes the namespace and prepares its tap.
    pub fn prepare() -> Result<Self, BenchError> {
        let mut network = TestNetwork::new();
        let name = network
            .add_namespace()
            .map_err(BenchError::io("creating a network namespace"))?;
        let net = Self {
            name,
            _network: network,
        };
        net.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        let host = format!("{}/24", dotted(HOST_IP));
        let guest_mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
        net.ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"])?;
        net.ip(&["link", "set", TAP, "address", HOST_MAC])?;
        net.ip(&["addr", "add", &host, "dev", TAP])?;
        net.ip(&["link", "set", TAP, "up"])?;
        net.ip(&[
            "neigh",
            "replace",
            &dotted(GUEST_IP),
            "lladdr",
            &guest_mac,
            "dev",
            TAP,
            "nud",
            "permanent",
        ])?;
        Ok(net)
    }

    fn ip(&self, args: &[&str]) -> Result<(), BenchError> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    fn exec(&self, args: &[&str]) -> Result<(), BenchError> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    /// Runs `f` on a thread inside the namespace (taps and sockets it makes
    /// belong there).
    pub fn run<T: Send>(
        &self,
        f: impl FnOnce() -> Result<T, BenchError> + Send,
    ) -> Result<T, BenchError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let _inside = enter(&self.name)
                        .map_err(BenchError::io(format!("entering namespace {}", self.name)))?;
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Waits (up to `timeout`) until interface `name` of the calling thread's
/// namespace runs (IFF_RUNNING): the host's link-watch has activated its
/// queueing discipline after the carrier came up; frames sent before are
/// dropped. Returns whether it did.
pub fn wait_running(name: &str, timeout: Duration) -> Result<bool, BenchError> {
    // SAFETY: plain socket creation; the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(BenchError::io("socket for SIOCGIFFLAGS")(
            std::io::Error::last_os_error(),
        ));
    }
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
            return Ok(true);
        }
        if started.elapsed() >= timeout {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}
