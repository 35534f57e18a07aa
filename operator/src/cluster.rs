//! Reads the cluster facts the decisions need: node heartbeats (Leases),
//! VMNodes, and the memory already committed on each node. Reads go straight
//! to the API server (quorum reads), never to a cache, so a freshly restarted
//! operator sees every object it created before it died.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use vmstream_api::v1alpha1::{
    LiveImage, LiveImagePhase, VMClone, VMMigration, VMMigrationPhase, VMNode,
};
use vmstream_api::{HEARTBEAT_LEASE_PREFIX, MAINTENANCE_ANNOTATION, NODE_LABEL};

use crate::controllers::{Context, HEARTBEAT_CACHE_TTL};
use crate::decide::placement::{Heartbeat, NodeFacts};
use crate::error::ReconcileError;

const MIB: u64 = 1 << 20;

/// The heartbeat a node Lease records; `fallback` when it states no duration.
pub fn heartbeat_of(lease: &Lease, fallback: Duration) -> Option<Heartbeat> {
    let spec = lease.spec.as_ref()?;
    let renew = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
    Some(Heartbeat {
        renew_time: renew.0,
        lease_duration_seconds: spec
            .lease_duration_seconds
            .map_or(fallback.as_secs() as i64, i64::from),
    })
}

/// Heartbeats of every node, by node name.
pub async fn heartbeats(ctx: &Context) -> Result<BTreeMap<String, Heartbeat>, ReconcileError> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let leases = api
        .list(&ListParams::default())
        .await
        .map_err(|source| ReconcileError::List {
            kind: "Lease",
            source,
        })?;
    Ok(leases
        .items
        .iter()
        .filter_map(|l| {
            let node = l
                .name_any()
                .strip_prefix(HEARTBEAT_LEASE_PREFIX)?
                .to_owned();
            Some((node, heartbeat_of(l, ctx.config.heartbeat_timeout)?))
        })
        .collect())
}

/// Whether `node`'s heartbeat is fresh now. One Lease list serves every
/// check for [`HEARTBEAT_CACHE_TTL`], so rechecking N placed VMs costs at
/// most one list per TTL instead of N reads.
pub async fn node_alive(ctx: &Context, node: &str) -> Result<bool, ReconcileError> {
    let mut cache = ctx.heartbeat_cache.lock().await;
    let fresh = cache
        .as_ref()
        .is_some_and(|(at, _)| at.elapsed() < HEARTBEAT_CACHE_TTL);
    if !fresh {
        *cache = Some((Instant::now(), heartbeats(ctx).await?));
    }
    Ok(cache
        .as_ref()
        .and_then(|(_, beats)| beats.get(node))
        .is_some_and(|h| h.is_fresh(Timestamp::now())))
}

/// Guest memory of a LiveImage: measured once captured, else what its boot
/// source asks for, else 0 (a capture whose size is not known yet).
pub fn image_memory_bytes(image: &LiveImage) -> u64 {
    image
        .status
        .as_ref()
        .and_then(|s| s.memory_bytes)
        .or_else(|| {
            image
                .spec
                .source
                .boot
                .as_ref()
                .map(|b| u64::from(b.memory_mib) * MIB)
        })
        .unwrap_or(0)
}

/// The node a VMClone is placed on (label first, then status).
pub fn clone_node(clone: &VMClone) -> Option<String> {
    clone
        .labels()
        .get(NODE_LABEL)
        .cloned()
        .or_else(|| clone.status.as_ref().and_then(|s| s.node.clone()))
}

/// `namespace/name`.
pub fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// True when the node takes no new work.
pub fn unschedulable(node: &VMNode) -> bool {
    node.spec.unschedulable || in_maintenance(node)
}

/// True when the node is marked for maintenance: its VMs are moved away.
pub fn in_maintenance(node: &VMNode) -> bool {
    node.annotations()
        .get(MAINTENANCE_ANNOTATION)
        .is_some_and(|v| v != "false")
}

/// Facts about every VMNode for placement: heartbeat, labels, capacity, and
/// the memory of the VMs placed there (clones not yet stopped, boot images
/// being built, clones migrating in).
pub async fn node_facts(ctx: &Context) -> Result<Vec<NodeFacts>, ReconcileError> {
    let client = ctx.client.clone();
    let nodes = Api::<VMNode>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|source| ReconcileError::List {
            kind: "VMNode",
            source,
        })?;
    let beats = heartbeats(ctx).await?;
    let images = Api::<LiveImage>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|source| ReconcileError::List {
            kind: "LiveImage",
            source,
        })?;
    let clones = Api::<VMClone>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|source| ReconcileError::List {
            kind: "VMClone",
            source,
        })?;

    let memory_of: BTreeMap<String, u64> = images
        .items
        .iter()
        .map(|i| {
            (
                key(&i.namespace().unwrap_or_default(), &i.name_any()),
                image_memory_bytes(i),
            )
        })
        .collect();
    let mut committed: BTreeMap<String, (u64, u32)> = BTreeMap::new();
    for clone in &clones.items {
        let Some(node) = clone_node(clone) else {
            continue;
        };
        if clone.phase().is_terminal() {
            continue;
        }
        let image = key(
            &clone.namespace().unwrap_or_default(),
            &clone.spec.live_image,
        );
        let entry = committed.entry(node).or_default();
        entry.0 += memory_of.get(&image).copied().unwrap_or(0);
        entry.1 += 1;
    }
    // A migration in flight brings its clone's memory to the target.
    let migrations = Api::<VMMigration>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|source| ReconcileError::List {
            kind: "VMMigration",
            source,
        })?;
    let clone_memory: BTreeMap<String, u64> = clones
        .items
        .iter()
        .map(|c| {
            let ns = c.namespace().unwrap_or_default();
            let image = key(&ns, &c.spec.live_image);
            (
                key(&ns, &c.name_any()),
                memory_of.get(&image).copied().unwrap_or(0),
            )
        })
        .collect();
    for mig in &migrations.items {
        let status = mig.status.clone().unwrap_or_default();
        let in_flight = matches!(
            status.phase,
            Some(VMMigrationPhase::Scheduled | VMMigrationPhase::Running)
        );
        if let (true, Some(target)) = (in_flight, status.target_node) {
            let clone = key(&mig.namespace().unwrap_or_default(), &mig.spec.vm_clone);
            let entry = committed.entry(target).or_default();
            entry.0 += clone_memory.get(&clone).copied().unwrap_or(0);
            entry.1 += 1;
        }
    }
    for image in &images.items {
        let building = matches!(
            image.phase(),
            LiveImagePhase::Scheduled | LiveImagePhase::Booting | LiveImagePhase::Capturing
        );
        if let (true, true, Some(node)) = (
            building,
            image.spec.source.boot.is_some(),
            image.labels().get(NODE_LABEL),
        ) {
            let entry = committed.entry(node.clone()).or_default();
            entry.0 += image_memory_bytes(image);
            entry.1 += 1;
        }
    }

    Ok(nodes
        .items
        .iter()
        .map(|n| {
            let name = n.name_any();
            let status = n.status.clone().unwrap_or_default();
            let (committed_memory_bytes, placed_vms) =
                committed.get(&name).copied().unwrap_or_default();
            NodeFacts {
                labels: n.labels().clone(),
                heartbeat: beats.get(&name).cloned(),
                unschedulable: unschedulable(n),
                memory_capacity_bytes: status
                    .allocatable
                    .or(status.capacity)
                    .map_or(0, |r| r.memory_bytes),
                committed_memory_bytes,
                placed_vms,
                images: status.images,
                name,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use vmstream_api::v1alpha1::VMNodeSpec;

    fn lease(duration: Option<i32>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime("2026-01-01T00:00:00Z".parse().unwrap())),
                lease_duration_seconds: duration,
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn heartbeat_uses_lease_duration_else_the_timeout() {
        let fallback = Duration::from_secs(40);
        assert_eq!(
            heartbeat_of(&lease(Some(10)), fallback)
                .unwrap()
                .lease_duration_seconds,
            10
        );
        assert_eq!(
            heartbeat_of(&lease(None), fallback)
                .unwrap()
                .lease_duration_seconds,
            40
        );
        assert!(heartbeat_of(&Lease::default(), fallback).is_none());
    }

    #[test]
    fn maintenance_annotation_makes_a_node_unschedulable() {
        let mut node = VMNode::new("n", VMNodeSpec::default());
        assert!(!unschedulable(&node));
        node.annotations_mut()
            .insert(MAINTENANCE_ANNOTATION.into(), "false".into());
        assert!(!unschedulable(&node));
        node.annotations_mut()
            .insert(MAINTENANCE_ANNOTATION.into(), "kernel upgrade".into());
        assert!(unschedulable(&node));
        let cordoned = VMNode::new(
            "m",
            VMNodeSpec {
                unschedulable: true,
            },
        );
        assert!(unschedulable(&cordoned));
    }
}
