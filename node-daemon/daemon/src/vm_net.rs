//! Network plumbing of Linux VMs: every Linux VM (an image's source or a
//! clone) gets a network namespace of its own, named after its VM id, with
//! one persistent tap per interface of the guest, created there by the
//! daemon before the VM process starts: host side address = the
//! interface's gateway (with the guest address's prefix, else /24), a MAC
//! derived from the interface (so a clone's tap has the MAC its image's
//! guest has in its ARP cache), up. The VM process attaches to the taps from
//! a thread inside the namespace. Every clone of an image carries the
//! image's guest address and MAC; the namespaces keep two of them on one
//! node apart (reaching them from outside is the next step: NAT).
//!
//! Removing the namespace's name ([`remove`]) is enough: the taps go with
//! the namespace when the VM process that holds them exits.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::vm_protocol::LinuxNetwork;

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Why a VM's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VmNetError {
    #[error("interface {nic}: {what} {value:?} is not an IPv4 address (with optional /prefix)")]
    Address {
        nic: String,
        what: &'static str,
        value: String,
    },
    #[error("{count} network interfaces; at most 10 per VM")]
    TooManyInterfaces { count: usize },
    #[error("cannot run `ip {args}`")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Command { args: String, stderr: String },
}

impl VmNetError {
    /// The `reason` of the status condition this error is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Address { .. } | Self::TooManyInterfaces { .. } => "NetworkInvalid",
            Self::Spawn { .. } | Self::Command { .. } => "NetworkSetupFailed",
        }
    }
}

/// What a VM process is given of its network: the namespace to open its
/// taps in and the taps, in interface order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNet {
    pub netns: String,
    pub taps: Vec<String>,
}

fn short_hash(id: &str) -> String {
    let digest = Sha256::digest(id.as_bytes());
    digest[..5].iter().map(|b| format!("{b:02x}")).collect()
}

/// The network namespace of VM `id`.
pub fn netns_name(id: &str) -> String {
    format!("vms-{}", short_hash(id))
}

/// The tap of interface `index` (0..10) of VM `id`: 14 bytes.
pub fn tap_name(id: &str, index: usize) -> String {
    format!("vms{}{}", short_hash(id), index % 10)
}

/// The host-side MAC of an interface: locally administered, derived from
/// its name and gateway (the same for an image's source and its clones).
pub fn host_mac(nic: &LinuxNetwork) -> String {
    let digest = Sha256::digest(format!("{}/{:?}", nic.name, nic.gateway).as_bytes());
    format!(
        "02:76:6d:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2]
    )
}

/// An address with an optional `/prefix`.
fn parse_cidr(
    nic: &str,
    what: &'static str,
    value: &str,
) -> Result<(Ipv4Addr, Option<u8>), VmNetError> {
    let bad = || VmNetError::Address {
        nic: nic.to_owned(),
        what,
        value: value.to_owned(),
    };
    let (addr, prefix) = match value.split_once('/') {
        Some((addr, prefix)) => {
            let prefix: u8 = prefix.parse().map_err(|_| bad())?;
            if prefix > 32 {
                return Err(bad());
            }
            (addr, Some(prefix))
        }
        None => (value, None),
    };
    Ok((addr.parse().map_err(|_| bad())?, prefix))
}

/// The host side of an interface: gateway address and prefix, if the
/// interface names a gateway.
pub fn host_address(nic: &LinuxNetwork) -> Result<Option<(Ipv4Addr, u8)>, VmNetError> {
    let Some(gateway) = &nic.gateway else {
        return Ok(None);
    };
    let (addr, gw_prefix) = parse_cidr(&nic.name, "gateway", gateway)?;
    let ip_prefix = match &nic.ip {
        Some(ip) => parse_cidr(&nic.name, "ip", ip)?.1,
        None => None,
    };
    Ok(Some((addr, gw_prefix.or(ip_prefix).unwrap_or(24))))
}

/// The guest's address of an interface, if given.
pub fn guest_address(nic: &LinuxNetwork) -> Result<Option<(Ipv4Addr, u8)>, VmNetError> {
    match &nic.ip {
        Some(ip) => {
            let (addr, prefix) = parse_cidr(&nic.name, "ip", ip)?;
            Ok(Some((addr, prefix.unwrap_or(24))))
        }
        None => Ok(None),
    }
}

fn ip(args: &[&str]) -> Result<(), VmNetError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| VmNetError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VmNetError::Command {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Creates the namespace of VM `id` (replacing a left-over one) with a tap
/// per interface of `nics`, configured and up. Nothing is left behind on
/// failure.
pub fn create(id: &str, nics: &[LinuxNetwork]) -> Result<VmNet, VmNetError> {
    if nics.len() > 10 {
        return Err(VmNetError::TooManyInterfaces { count: nics.len() });
    }
    let hosts = nics
        .iter()
        .map(host_address)
        .collect::<Result<Vec<_>, _>>()?;
    let netns = netns_name(id);
    remove(id);
    ip(&["netns", "add", &netns])?;
    let made = (|| {
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        let mut taps = Vec::with_capacity(nics.len());
        for (index, (nic, host)) in nics.iter().zip(&hosts).enumerate() {
            let tap = tap_name(id, index);
            ip(&["-n", &netns, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
            ip(&["-n", &netns, "link", "set", &tap, "address", &host_mac(nic)])?;
            if let Some((addr, prefix)) = host {
                ip(&[
                    "-n",
                    &netns,
                    "addr",
                    "add",
                    &format!("{addr}/{prefix}"),
                    "dev",
                    &tap,
                ])?;
            }
            ip(&["-n", &netns, "link", "set", &tap, "up"])?;
            taps.push(tap);
        }
        Ok(taps)
    })();
    match made {
        Ok(taps) => Ok(VmNet { netns, taps }),
        Err(e) => {
            remove(id);
            Err(e)
        }
    }
}

/// Removes the namespace of VM `id` and its taps, if there is one
/// (a VM without a network costs a `stat`).
pub fn remove(id: &str) {
    let netns = netns_name(id);
    if !Path::new(NETNS_DIR).join(&netns).exists() {
        return;
    }
    // The taps are persistent: delete them, so they do not outlive the
    // namespace's last user.
    for index in 0..10 {
        let tap = tap_name(id, index);
        if ip(&["-n", &netns, "link", "show", &tap]).is_err() {
            break;
        }
        let _ = ip(&["-n", &netns, "link", "del", &tap]);
    }
    if let Err(e) = ip(&["netns", "del", &netns]) {
        tracing::warn!(netns, error = %e, "network namespace not removed");
    }
}

/// Runs `f` on a thread that entered the named network namespace (taps
/// opened there belong to it; threads it starts inherit it). The error is
/// a message for the start failure.
pub fn run_in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    use std::os::fd::AsRawFd;
    let path = Path::new(NETNS_DIR).join(netns);
    let ns = std::fs::File::open(&path)
        .map_err(|e| format!("cannot open network namespace {}: {e}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns(2) moves only this (new, scoped) thread into
                // the namespace; `ns` is an open namespace file for the call.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(format!(
                        "cannot enter network namespace {netns}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| format!("the thread in network namespace {netns} panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(ip: Option<&str>, gateway: Option<&str>) -> LinuxNetwork {
        LinuxNetwork {
            name: "eth0".into(),
            ip: ip.map(Into::into),
            gateway: gateway.map(Into::into),
            mac: None,
            tap: None,
        }
    }

    #[test]
    fn names_are_short_deterministic_and_distinct() {
        let a = tap_name("default.web-1", 0);
        assert_eq!(a, tap_name("default.web-1", 0));
        assert!(a.len() <= 15 && a.starts_with("vms"), "{a}");
        assert_ne!(a, tap_name("default.web-2", 0));
        assert_ne!(a, tap_name("default.web-1", 1));
        assert_eq!(netns_name("x"), netns_name("x"));
        assert_ne!(netns_name("x"), netns_name("y"));
    }

    #[test]
    fn the_host_side_takes_the_gateway_with_the_guests_prefix() {
        let n = nic(Some("10.0.2.15/16"), Some("10.0.2.2"));
        assert_eq!(
            host_address(&n).unwrap(),
            Some(("10.0.2.2".parse().unwrap(), 16))
        );
        let n = nic(None, Some("10.0.2.2"));
        assert_eq!(
            host_address(&n).unwrap(),
            Some(("10.0.2.2".parse().unwrap(), 24))
        );
        assert_eq!(host_address(&nic(Some("10.0.2.15"), None)).unwrap(), None);
        let bad = host_address(&nic(None, Some("10.0.2"))).unwrap_err();
        assert_eq!(bad.reason(), "NetworkInvalid");
        assert_eq!(host_mac(&n), host_mac(&n.clone()));
        assert!(host_mac(&n).starts_with("02:"));
    }
}
