//! Network namespaces for tests and benchmarks: "nodes" joined by real veth
//! pairs, so page streaming crosses a real network hop with real TCP. A
//! [`TestNetwork`] removes every namespace it created when dropped (also
//! when a test panics); deleting a namespace destroys the veth ends inside
//! it. Threads enter a namespace with [`enter`] (restored on drop of the
//! guard); threads they spawn afterwards inherit it. Needs root and `ip`.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

use rand::Rng;

/// Runs `ip` with `args`; an error carries the command and its stderr.
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A set of namespaces created for one test, removed on drop.
#[derive(Debug, Default)]
pub struct TestNetwork {
    namespaces: Vec<String>,
}

/// Addresses of the two ends of a veth link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// Address of the end in the first namespace.
    pub a: Ipv4Addr,
    /// Address of the end in the second namespace.
    pub b: Ipv4Addr,
}

fn random_suffix() -> String {
    format!("{:06x}", rand::rng().random::<u32>() & 0xff_ffff)
}

impl TestNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a namespace `vmst-<random>` with loopback up; returns its name.
    pub fn add_namespace(&mut self) -> io::Result<String> {
        let name = format!("vmst-{}", random_suffix());
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// Joins namespaces `a` and `b` with a veth pair in a private /24
    /// chosen at random (`10.R.S.1` in `a`, `10.R.S.2` in `b`).
    pub fn link(&mut self, a: &str, b: &str) -> io::Result<Link> {
        let mut rng = rand::rng();
        let (r, s) = (rng.random_range(100..=199u8), rng.random::<u8>());
        let suffix = random_suffix();
        let (va, vb) = (format!("vs{suffix}a"), format!("vs{suffix}b"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        let moved = ip(&["link", "set", &va, "netns", a])
            .and_then(|()| ip(&["link", "set", &vb, "netns", b]));
        if let Err(e) = moved {
            let _ = ip(&["link", "del", &va]);
            return Err(e);
        }
        let link = Link {
            a: Ipv4Addr::new(10, r, s, 1),
            b: Ipv4Addr::new(10, r, s, 2),
        };
        for (ns, dev, addr) in [(a, &va, link.a), (b, &vb, link.b)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(link)
    }

    /// The namespaces created so far.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("cannot remove network namespace {ns}: {e}");
            }
        }
    }
}

/// While alive, the current thread is in another network namespace; on
/// drop it returns to the one it was in.
#[derive(Debug)]
pub struct NamespaceGuard {
    original: File,
}

fn setns(fd: &File) -> io::Result<()> {
    // SAFETY: setns on a namespace descriptor we own; it only changes the
    // calling thread's network namespace.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into namespace `ns` (sockets it creates from
/// now on, and threads it spawns, live there).
pub fn enter(ns: &str) -> io::Result<NamespaceGuard> {
    let original = File::open("/proc/thread-self/ns/net")?;
    let target = File::open(format!("/var/run/netns/{ns}"))?;
    setns(&target)?;
    Ok(NamespaceGuard { original })
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original) {
            eprintln!("cannot return to the original network namespace: {e}");
        }
    }
}

/// Runs `f` on a new thread inside namespace `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<io::Result<T>>> {
    let ns = ns.to_owned();
    std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            let _guard = enter(&ns)?;
            Ok(f())
        })
}
