//! Placement: which node a new VMClone (or a boot-sourced LiveImage) goes to.
//!
//! Pure: the caller gathers the facts about every node (heartbeat Lease,
//! VMNode capacity and labels, memory already committed there) and the
//! request; [`place`] filters and ranks them. Nothing here talks to a server.
//!
//! Rule, in order:
//! 1. `placement.nodeName`, when set, is the only candidate; `nodeSelector`
//!    labels must all match the VMNode's labels; excluded nodes (a migration's
//!    source) are dropped.
//! 2. The node's heartbeat must be fresh: `renewTime + leaseDurationSeconds > now`.
//! 3. The node must not be unschedulable (VMNode `spec.unschedulable` or the
//!    maintenance annotation).
//! 4. Memory: `committed + requested <= capacity × overcommit ratio`.
//! 5. Among the survivors, a node that already holds the image (its home or
//!    its cache list) wins; then the least loaded (committed memory / capacity);
//!    then fewer VMs; then the name, so the choice is deterministic.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// The last heartbeat a node's daemon wrote into its Lease.
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    pub renew_time: Timestamp,
    pub lease_duration_seconds: i64,
}

impl Heartbeat {
    /// True while `renew_time + lease_duration_seconds > now`.
    pub fn is_fresh(&self, now: Timestamp) -> bool {
        let expiry = self
            .renew_time
            .checked_add(SignedDuration::from_secs(self.lease_duration_seconds))
            .unwrap_or(self.renew_time);
        expiry > now
    }
}

/// Everything placement needs to know about one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeFacts {
    pub name: String,
    /// The VMNode object's labels, matched against `nodeSelector`.
    pub labels: BTreeMap<String, String>,
    /// `None` when the node has no heartbeat Lease at all.
    pub heartbeat: Option<Heartbeat>,
    /// VMNode `spec.unschedulable` or the maintenance annotation.
    pub unschedulable: bool,
    /// Allocatable (else capacity) memory the VMNode reports.
    pub memory_capacity_bytes: u64,
    /// Sum of the memory of the VMs already placed on this node.
    pub committed_memory_bytes: u64,
    /// How many VMs are placed there (tie-break only).
    pub placed_vms: u32,
    /// `namespace/name` of every LiveImage the node caches.
    pub images: Vec<String>,
}

/// What is being placed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlacementRequest {
    /// Guest memory of the new VM.
    pub memory_bytes: u64,
    /// `namespace/name` of the LiveImage the VM starts from (none for a boot).
    pub image: Option<String>,
    /// The node that holds the image (its `status.node`).
    pub image_home: Option<String>,
    /// `placement.nodeName`.
    pub node_name: Option<String>,
    /// `placement.nodeSelector`.
    pub node_selector: BTreeMap<String, String>,
    /// Nodes that must not be chosen (a migration's source node).
    pub exclude: Vec<String>,
}

/// Knobs of the rule that do not come from the object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlacementPolicy {
    /// Memory overcommit: a node takes VMs up to `capacity × ratio`.
    pub overcommit_ratio: f64,
    pub now: Timestamp,
}

/// Why no node fits: how many nodes fell at each test.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoNodeFits {
    pub total: usize,
    pub name_mismatch: usize,
    pub selector_mismatch: usize,
    pub excluded: usize,
    pub heartbeat_stale: usize,
    pub unschedulable: usize,
    pub insufficient_memory: usize,
}

impl fmt::Display for NoNodeFits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0/{} nodes fit", self.total)?;
        let parts = [
            (self.name_mismatch, "not the requested nodeName"),
            (self.selector_mismatch, "nodeSelector mismatch"),
            (self.excluded, "excluded"),
            (self.heartbeat_stale, "heartbeat stale"),
            (self.unschedulable, "unschedulable"),
            (self.insufficient_memory, "insufficient memory"),
        ];
        let mut first = true;
        for (count, what) in parts {
            if count > 0 {
                write!(f, "{} {count} {what}", if first { ":" } else { "," })?;
                first = false;
            }
        }
        Ok(())
    }
}

impl std::error::Error for NoNodeFits {}

/// True when every `selector` entry equals the node's label.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn fits_memory(node: &NodeFacts, memory_bytes: u64, ratio: f64) -> bool {
    let limit = node.memory_capacity_bytes as f64 * ratio;
    (node.committed_memory_bytes as f64 + memory_bytes as f64) <= limit
}

fn holds_image(node: &NodeFacts, req: &PlacementRequest) -> bool {
    req.image_home.as_deref() == Some(node.name.as_str())
        || req
            .image
            .as_ref()
            .is_some_and(|image| node.images.iter().any(|i| i == image))
}

fn load(node: &NodeFacts) -> f64 {
    if node.memory_capacity_bytes == 0 {
        f64::INFINITY
    } else {
        node.committed_memory_bytes as f64 / node.memory_capacity_bytes as f64
    }
}

/// Choose the node for `req` among `nodes`; the reason when none fits.
pub fn place(
    req: &PlacementRequest,
    nodes: &[NodeFacts],
    policy: &PlacementPolicy,
) -> Result<String, NoNodeFits> {
    let mut why = NoNodeFits {
        total: nodes.len(),
        ..NoNodeFits::default()
    };
    let mut candidates: Vec<&NodeFacts> = Vec::new();
    for node in nodes {
        if req.node_name.as_ref().is_some_and(|n| *n != node.name) {
            why.name_mismatch += 1;
        } else if !selector_matches(&req.node_selector, &node.labels) {
            why.selector_mismatch += 1;
        } else if req.exclude.contains(&node.name) {
            why.excluded += 1;
        } else if !node
            .heartbeat
            .as_ref()
            .is_some_and(|h| h.is_fresh(policy.now))
        {
            why.heartbeat_stale += 1;
        } else if node.unschedulable {
            why.unschedulable += 1;
        } else if !fits_memory(node, req.memory_bytes, policy.overcommit_ratio) {
            why.insufficient_memory += 1;
        } else {
            candidates.push(node);
        }
    }
    candidates
        .into_iter()
        .min_by(|a, b| {
            holds_image(b, req)
                .cmp(&holds_image(a, req))
                .then(load(a).total_cmp(&load(b)))
                .then(a.placed_vms.cmp(&b.placed_vms))
                .then(a.name.cmp(&b.name))
        })
        .map(|n| n.name.clone())
        .ok_or(why)
}

/// Places `count` VMs of the same request one after the other, each seeing
/// the memory of the ones placed before it (a pool's scale-up decided in one
/// pass). One result per VM, in order.
pub fn place_batch(
    req: &PlacementRequest,
    nodes: &[NodeFacts],
    policy: &PlacementPolicy,
    count: usize,
) -> Vec<Result<String, NoNodeFits>> {
    let mut nodes = nodes.to_vec();
    (0..count)
        .map(|_| {
            let chosen = place(req, &nodes, policy)?;
            if let Some(node) = nodes.iter_mut().find(|n| n.name == chosen) {
                node.committed_memory_bytes += req.memory_bytes;
                node.placed_vms += 1;
            }
            Ok(chosen)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn now() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().unwrap()
    }

    fn node(name: &str, capacity_gib: u64, committed_gib: u64) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            heartbeat: Some(Heartbeat {
                renew_time: now() - SignedDuration::from_secs(2),
                lease_duration_seconds: 10,
            }),
            memory_capacity_bytes: capacity_gib * GIB,
            committed_memory_bytes: committed_gib * GIB,
            ..NodeFacts::default()
        }
    }

    fn policy() -> PlacementPolicy {
        PlacementPolicy {
            overcommit_ratio: 1.0,
            now: now(),
        }
    }

    fn request(memory_gib: u64) -> PlacementRequest {
        PlacementRequest {
            memory_bytes: memory_gib * GIB,
            image: Some("ns/img".into()),
            ..PlacementRequest::default()
        }
    }

    #[test]
    fn heartbeat_freshness_is_strict_at_expiry() {
        let h = Heartbeat {
            renew_time: now(),
            lease_duration_seconds: 10,
        };
        assert!(h.is_fresh(now() + SignedDuration::from_secs(9)));
        assert!(!h.is_fresh(now() + SignedDuration::from_secs(10)));
    }

    #[test]
    fn least_loaded_node_wins() {
        let nodes = [node("a", 8, 4), node("b", 8, 1), node("c", 8, 2)];
        assert_eq!(place(&request(1), &nodes, &policy()).unwrap(), "b");
    }

    #[test]
    fn node_holding_the_image_wins_over_less_loaded() {
        let mut cached = node("a", 8, 4);
        cached.images = vec!["ns/img".into()];
        let nodes = [cached, node("b", 8, 0)];
        assert_eq!(place(&request(1), &nodes, &policy()).unwrap(), "a");
        let mut req = request(1);
        req.image = None;
        req.image_home = Some("b".into());
        let nodes = [node("a", 8, 0), node("b", 8, 4)];
        assert_eq!(place(&req, &nodes, &policy()).unwrap(), "b");
    }

    #[test]
    fn stale_or_missing_heartbeat_excludes_node() {
        let mut stale = node("a", 8, 0);
        stale.heartbeat = Some(Heartbeat {
            renew_time: now() - SignedDuration::from_secs(30),
            lease_duration_seconds: 10,
        });
        let mut none = node("b", 8, 0);
        none.heartbeat = None;
        let err = place(&request(1), &[stale.clone(), none.clone()], &policy()).unwrap_err();
        assert_eq!(err.heartbeat_stale, 2);
        assert_eq!(err.to_string(), "0/2 nodes fit: 2 heartbeat stale");
        let nodes = [stale, none, node("c", 8, 6)];
        assert_eq!(place(&request(1), &nodes, &policy()).unwrap(), "c");
    }

    #[test]
    fn unschedulable_node_is_skipped() {
        let mut a = node("a", 8, 0);
        a.unschedulable = true;
        let nodes = [a, node("b", 8, 7)];
        assert_eq!(place(&request(1), &nodes, &policy()).unwrap(), "b");
    }

    #[test]
    fn memory_respects_overcommit_ratio() {
        let nodes = [node("a", 4, 3)];
        let err = place(&request(2), &nodes, &policy()).unwrap_err();
        assert_eq!(err.insufficient_memory, 1);
        let over = PlacementPolicy {
            overcommit_ratio: 1.5,
            now: now(),
        };
        assert_eq!(place(&request(2), &nodes, &over).unwrap(), "a");
        // Exactly at the limit still fits.
        assert_eq!(place(&request(1), &nodes, &policy()).unwrap(), "a");
    }

    #[test]
    fn node_name_and_selector_restrict_candidates() {
        let mut a = node("a", 8, 0);
        a.labels.insert("zone".into(), "x".into());
        let mut b = node("b", 8, 4);
        b.labels.insert("zone".into(), "y".into());
        let nodes = [a, b];
        let mut req = request(1);
        req.node_selector.insert("zone".into(), "y".into());
        assert_eq!(place(&req, &nodes, &policy()).unwrap(), "b");
        let mut req = request(1);
        req.node_name = Some("b".into());
        assert_eq!(place(&req, &nodes, &policy()).unwrap(), "b");
        req.node_name = Some("zz".into());
        let err = place(&req, &nodes, &policy()).unwrap_err();
        assert_eq!(err.name_mismatch, 2);
    }

    #[test]
    fn excluded_node_is_never_chosen() {
        let nodes = [node("a", 8, 0), node("b", 8, 7)];
        let mut req = request(1);
        req.exclude = vec!["a".into()];
        assert_eq!(place(&req, &nodes, &policy()).unwrap(), "b");
    }

    #[test]
    fn ties_break_by_vm_count_then_name() {
        let mut a = node("a", 8, 2);
        a.placed_vms = 3;
        let mut b = node("b", 8, 2);
        b.placed_vms = 1;
        let c = {
            let mut c = node("c", 8, 2);
            c.placed_vms = 1;
            c
        };
        assert_eq!(place(&request(1), &[a, c, b], &policy()).unwrap(), "b");
    }

    #[test]
    fn batch_spends_free_memory_once_and_reports_the_rest() {
        // Room for 2 VMs on a, 3 on b; 7 requested.
        let nodes = [node("a", 4, 2), node("b", 4, 1)];
        let placed = place_batch(&request(1), &nodes, &policy(), 7);
        let on = |n: &str| placed.iter().filter(|r| r.as_deref() == Ok(n)).count();
        assert_eq!((on("a"), on("b")), (2, 3));
        assert_eq!(placed.iter().filter(|r| r.is_err()).count(), 2);
        let refused = placed.last().unwrap().as_ref().unwrap_err();
        assert_eq!(refused.insufficient_memory, 2);
    }

    #[test]
    fn batch_spreads_by_load_and_fills_the_image_holder_first() {
        let nodes = [node("a", 8, 0), node("b", 8, 0)];
        let placed = place_batch(&request(1), &nodes, &policy(), 4);
        let names: Vec<&str> = placed.iter().map(|r| r.as_deref().unwrap()).collect();
        assert_eq!(names, ["a", "b", "a", "b"]);
        let mut holder = node("b", 8, 0);
        holder.images = vec!["ns/img".into()];
        let placed = place_batch(&request(2), &[node("a", 8, 0), holder], &policy(), 5);
        let names: Vec<&str> = placed.iter().map(|r| r.as_deref().unwrap()).collect();
        assert_eq!(names, ["b", "b", "b", "b", "a"]);
    }

    #[test]
    fn no_nodes_reports_zero_of_zero() {
        let err = place(&request(1), &[], &policy()).unwrap_err();
        assert_eq!(err.to_string(), "0/0 nodes fit");
    }
}
