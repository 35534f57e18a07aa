//! What this host offers to VMs: memory and CPUs, read from `/proc`.

use std::io;

use vmstream_api::v1alpha1::NodeResources;

/// Errors reading host capacity.
#[derive(Debug, thiserror::Error)]
pub enum HostCapacityError {
    #[error("cannot read /proc/meminfo: {0}")]
    Meminfo(#[source] io::Error),
    #[error("/proc/meminfo has no MemTotal line")]
    NoMemTotal,
}

/// Memory and vCPUs of this host.
pub fn capacity() -> Result<NodeResources, HostCapacityError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(HostCapacityError::Meminfo)?;
    let memory_bytes = parse_mem_total(&meminfo).ok_or(HostCapacityError::NoMemTotal)?;
    let vcpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    Ok(NodeResources {
        memory_bytes,
        vcpus,
    })
}

/// Capacity minus memory reserved for the host (never below zero).
pub fn allocatable(capacity: &NodeResources, reserved_memory_bytes: u64) -> NodeResources {
    NodeResources {
        memory_bytes: capacity.memory_bytes.saturating_sub(reserved_memory_bytes),
        vcpus: capacity.vcpus,
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_total_in_kib() {
        let text = "MemTotal:       24576000 kB\nMemFree:        100 kB\n";
        assert_eq!(parse_mem_total(text), Some(24_576_000 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn allocatable_saturates() {
        let cap = NodeResources {
            memory_bytes: 100,
            vcpus: 2,
        };
        assert_eq!(allocatable(&cap, 30).memory_bytes, 70);
        assert_eq!(allocatable(&cap, 300).memory_bytes, 0);
    }

    #[test]
    fn this_host_has_memory_and_cpus() {
        let cap = capacity().unwrap();
        assert!(cap.memory_bytes > 0 && cap.vcpus > 0);
    }
}
