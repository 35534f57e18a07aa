//! The cluster facts the decisions need, computed from objects: node
//! heartbeats (Leases), VMNodes, the memory already committed on each node,
//! and the reservations of placements not yet visible in the caches. Pure:
//! the objects come from the caches of [`crate::view`], which imports this.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use vmstream_api::v1alpha1::{
    LiveImage, LiveImagePhase, VMClone, VMMigration, VMMigrationPhase, VMNode,
};
use vmstream_api::{MAINTENANCE_ANNOTATION, NODE_LABEL};

use crate::decide::placement::{Heartbeat, NodeFacts};

const MIB: u64 = 1 << 20;

/// Which object of a kind: its namespace and name. Displays as
/// `namespace/name`, the form VMNode `status.images` lists images in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of `obj` (namespace empty when it has none).
    pub fn of(obj: &impl ResourceExt) -> Self {
        Self::new(obj.namespace().unwrap_or_default(), obj.name_any())
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a reservation holds memory for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserved {
    /// A VMClone labelled for the node.
    Clone,
    /// A boot-sourced LiveImage labelled for the node.
    Image,
    /// A VMMigration whose target is the node.
    MigrationTarget,
}

/// Memory this operator placed on a node that the caches may not show yet.
#[derive(Clone, Debug, PartialEq)]
pub struct Reservation {
    pub what: Reserved,
    /// The object placed (of the kind `what` says).
    pub object: ObjectKey,
    pub node: String,
    pub memory_bytes: u64,
    pub at: Instant,
}

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

/// What [`node_facts_from`] aggregates (the caches of [`crate::view`]).
pub struct NodeFactsInput<'a> {
    pub nodes: &'a [Arc<VMNode>],
    pub heartbeats: &'a BTreeMap<String, Heartbeat>,
    pub images: &'a [Arc<LiveImage>],
    pub clones: &'a [Arc<VMClone>],
    pub migrations: &'a [Arc<VMMigration>],
    /// Placements written but not yet in the caches.
    pub reserved: &'a [Reservation],
}

/// Facts about every VMNode for placement: heartbeat, labels, capacity, and
/// the memory of the VMs placed there (clones not yet stopped, boot images
/// being built, clones migrating in, reservations).
pub fn node_facts_from(input: &NodeFactsInput<'_>) -> Vec<NodeFacts> {
    let memory_of: BTreeMap<ObjectKey, u64> = input
        .images
        .iter()
        .map(|i| (ObjectKey::of(&**i), image_memory_bytes(i)))
        .collect();
    let mut committed: BTreeMap<String, (u64, u32)> = BTreeMap::new();
    let mut add = |node: &str, memory: u64| {
        let entry = committed.entry(node.to_owned()).or_default();
        entry.0 += memory;
        entry.1 += 1;
    };
    let clone_memory = |c: &VMClone| {
        let image = ObjectKey::new(c.namespace().unwrap_or_default(), &c.spec.live_image);
        memory_of.get(&image).copied().unwrap_or(0)
    };
    for clone in input.clones {
        if let Some(node) = clone_node(clone)
            && !clone.phase().is_terminal()
        {
            add(&node, clone_memory(clone));
        }
    }
    // A migration in flight brings its clone's memory to the target.
    let clone_by_key: BTreeMap<ObjectKey, &VMClone> = input
        .clones
        .iter()
        .map(|c| (ObjectKey::of(&**c), &**c))
        .collect();
    for mig in input.migrations {
        let status = mig.status.clone().unwrap_or_default();
        let in_flight = matches!(
            status.phase,
            Some(VMMigrationPhase::Scheduled | VMMigrationPhase::Running)
        );
        if let (true, Some(target)) = (in_flight, status.target_node) {
            let clone = ObjectKey::new(mig.namespace().unwrap_or_default(), &mig.spec.vm_clone);
            add(
                &target,
                clone_by_key.get(&clone).map_or(0, |c| clone_memory(c)),
            );
        }
    }
    for image in input.images {
        let building = matches!(
            image.phase(),
            LiveImagePhase::Scheduled | LiveImagePhase::Booting | LiveImagePhase::Capturing
        );
        if let (true, true, Some(node)) = (
            building,
            image.spec.source.boot.is_some(),
            image.labels().get(NODE_LABEL),
        ) {
            add(node, image_memory_bytes(image));
        }
    }
    for r in input.reserved {
        add(&r.node, r.memory_bytes);
    }

    input
        .nodes
        .iter()
        .map(|n| {
            let name = n.name_any();
            let status = n.status.clone().unwrap_or_default();
            let (committed_memory_bytes, placed_vms) =
                committed.get(&name).copied().unwrap_or_default();
            NodeFacts {
                labels: n.labels().clone(),
                heartbeat: input.heartbeats.get(&name).cloned(),
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
        .collect()
}

/// True when the cached object shows what the reservation stands for, so
/// the facts already count it.
pub fn settled(
    r: &Reservation,
    images: &[Arc<LiveImage>],
    clones: &[Arc<VMClone>],
    migrations: &[Arc<VMMigration>],
) -> bool {
    match r.what {
        Reserved::Clone => clones
            .iter()
            .any(|c| ObjectKey::of(&**c) == r.object && clone_node(c).is_some()),
        Reserved::Image => images.iter().any(|i| {
            ObjectKey::of(&**i) == r.object && i.labels().contains_key(vmstream_api::NODE_LABEL)
        }),
        Reserved::MigrationTarget => migrations.iter().any(|m| {
            ObjectKey::of(&**m) == r.object
                && m.status.as_ref().and_then(|s| s.target_node.as_ref()) == Some(&r.node)
        }),
    }
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

    fn clone_on(name: &str, node: Option<&str>, phase: &str) -> Arc<VMClone> {
        let mut value = serde_json::json!({
            "apiVersion": "vmstream.io/v1alpha1", "kind": "VMClone",
            "metadata": {"name": name, "namespace": "ns", "labels": {}},
            "spec": {"liveImage": "img"},
            "status": {"phase": phase}
        });
        if let Some(node) = node {
            value["metadata"]["labels"][NODE_LABEL] = node.into();
        }
        Arc::new(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn facts_count_live_clones_migrations_builds_and_reservations() {
        let nodes: Vec<Arc<VMNode>> = ["a", "b"]
            .iter()
            .map(|n| Arc::new(VMNode::new(n, VMNodeSpec::default())))
            .collect();
        let image: LiveImage = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmstream.io/v1alpha1", "kind": "LiveImage",
            "metadata": {"name": "img", "namespace": "ns"},
            "spec": {"source": {"boot": {"guest": "Request", "memoryMiB": 16}}},
            "status": {"phase": "Ready", "memoryBytes": 16 * MIB}
        }))
        .unwrap();
        let clones = vec![
            clone_on("c1", Some("a"), "Running"),
            clone_on("c2", Some("a"), "Stopped"),
            clone_on("c3", None, "Pending"),
            clone_on("c4", Some("b"), "Starting"),
        ];
        let migration: VMMigration = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmstream.io/v1alpha1", "kind": "VMMigration",
            "metadata": {"name": "m", "namespace": "ns"},
            "spec": {"vmClone": "c1"},
            "status": {"phase": "Running", "targetNode": "b"}
        }))
        .unwrap();
        let reserved = vec![Reservation {
            what: Reserved::Clone,
            object: ObjectKey::new("ns", "c5"),
            node: "a".into(),
            memory_bytes: 16 * MIB,
            at: Instant::now(),
        }];
        let facts = node_facts_from(&NodeFactsInput {
            nodes: &nodes,
            heartbeats: &BTreeMap::new(),
            images: &[Arc::new(image)],
            clones: &clones,
            migrations: &[Arc::new(migration)],
            reserved: &reserved,
        });
        let by_name = |n: &str| facts.iter().find(|f| f.name == n).unwrap().clone();
        // a: c1 + the reservation (c2 stopped); b: c4 + c1 migrating in.
        assert_eq!(
            (by_name("a").committed_memory_bytes, by_name("a").placed_vms),
            (32 * MIB, 2)
        );
        assert_eq!(
            (by_name("b").committed_memory_bytes, by_name("b").placed_vms),
            (32 * MIB, 2)
        );
    }

    /// Images are matched against VMNode `status.images` in this form.
    #[test]
    fn an_object_key_displays_as_namespace_slash_name() {
        assert_eq!(ObjectKey::new("ns", "img").to_string(), "ns/img");
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

    fn clone_labelled(labels: serde_json::Value) -> Arc<VMClone> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "vmstream.io/v1alpha1", "kind": "VMClone",
                "metadata": {"name": "c", "namespace": "ns", "labels": labels},
                "spec": {"liveImage": "img"}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_reservation_settles_once_the_cache_shows_the_placement() {
        let r = Reservation {
            what: Reserved::Clone,
            object: ObjectKey::new("ns", "c"),
            node: "a".into(),
            memory_bytes: 1,
            at: Instant::now(),
        };
        assert!(!settled(&r, &[], &[], &[]), "not in the cache yet");
        assert!(
            !settled(&r, &[], &[clone_labelled(serde_json::json!({}))], &[]),
            "cached unplaced"
        );
        let placed = clone_labelled(serde_json::json!({ vmstream_api::NODE_LABEL: "a" }));
        assert!(settled(&r, &[], &[placed], &[]));
        let other = Reservation {
            object: ObjectKey::new("ns", "d"),
            ..r
        };
        let placed = clone_labelled(serde_json::json!({ vmstream_api::NODE_LABEL: "a" }));
        assert!(!settled(&other, &[], &[placed], &[]));
    }
}
