//! The per-VM usage the node publishes (CPU, memory, faults, request
//! rate), sampled from the VMs' stats; rates come from the pure
//! [`usage_from`] against the previous sample.

use std::time::Duration;

use vmstream_api::v1alpha1::VmUsage;

use super::{VmSupervisor, call_socket};
use crate::object_key::{ObjectKey, ObjectKind};
use crate::vm_protocol::{Reply, Request, VmStats};
use crate::vm_record::VmRecord;

/// A usage sample kept to compute rates at the next one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UsageSample {
    pub at_ms: u64,
    pub cpu_ms: f64,
    pub requests: u64,
}

/// The published usage of a VM from its stats and the previous sample.
pub fn usage_from(
    owner: &ObjectKey,
    previous: Option<&UsageSample>,
    stats: &VmStats,
) -> (VmUsage, UsageSample) {
    let now = UsageSample {
        at_ms: stats.sampled_at_ms,
        cpu_ms: stats.vcpu_cpu_ms,
        requests: stats.requests_served,
    };
    let (utilization, rate) = match previous {
        Some(p) if now.at_ms > p.at_ms => {
            let seconds = (now.at_ms - p.at_ms) as f64 / 1000.0;
            let cpu = (now.cpu_ms - p.cpu_ms).max(0.0) / (seconds * 1000.0) * 100.0;
            let requests = now.requests.saturating_sub(p.requests) as f64 / seconds;
            (cpu, requests)
        }
        _ => (0.0, 0.0),
    };
    let usage = VmUsage {
        namespace: owner.namespace.clone(),
        name: owner.name.clone(),
        cpu_millis: stats.vcpu_cpu_ms as u64,
        cpu_utilization: utilization,
        memory_bytes: stats.memory_bytes,
        resident_bytes: stats.memory.guest_resident,
        faults_served: stats.faults.faults,
        request_rate: rate,
    };
    (usage, now)
}

impl VmSupervisor {
    /// Usage of every VM owned by a VMClone (rates against the previous
    /// call).
    pub fn sample_usage(&self) -> Vec<VmUsage> {
        let owned: Vec<(String, VmRecord)> = self
            .table()
            .iter()
            .filter(|(_, e)| {
                e.record
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.kind == ObjectKind::VMClone)
            })
            .map(|(id, e)| (id.clone(), e.record.clone()))
            .collect();
        let mut usage = Vec::new();
        for (id, record) in owned {
            let Ok(Reply::Stats(stats)) =
                call_socket(&id, &record.socket, &Request::Stats, Duration::from_secs(5))
            else {
                continue;
            };
            let owner = record.owner.as_ref().expect("filtered on owner");
            let mut table = self.table();
            let Some(entry) = table.get_mut(&id) else {
                continue;
            };
            let (u, sample) = usage_from(owner, entry.last.as_ref(), &stats);
            entry.last = Some(sample);
            usage.push(u);
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_protocol::MemoryFigures;

    #[test]
    fn usage_rates_come_from_the_delta() {
        let owner = ObjectKey::vm_clone("ns", "a");
        let mut stats = VmStats {
            vcpu_cpu_ms: 1000.0,
            requests_served: 10,
            sampled_at_ms: 10_000,
            memory_bytes: 16 << 20,
            memory: MemoryFigures {
                guest_resident: 4096,
                ..MemoryFigures::default()
            },
            ..VmStats::default()
        };
        let (first, sample) = usage_from(&owner, None, &stats);
        assert_eq!(first.cpu_utilization, 0.0);
        assert_eq!(first.cpu_millis, 1000);
        assert_eq!(first.resident_bytes, 4096);
        stats.vcpu_cpu_ms = 1500.0;
        stats.requests_served = 30;
        stats.sampled_at_ms = 12_000;
        let (second, _) = usage_from(&owner, Some(&sample), &stats);
        assert!((second.cpu_utilization - 25.0).abs() < 1e-9);
        assert!((second.request_rate - 10.0).abs() < 1e-9);
        assert_eq!(
            (second.namespace.as_str(), second.name.as_str()),
            ("ns", "a")
        );
    }
}
