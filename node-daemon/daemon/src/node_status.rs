//! The node's VMNode object: capacity, allocatable memory, page-streaming
//! address, cached images and per-VM usage, published by server-side apply
//! on the status subresource. It is the one compact object the operator and
//! the autoscaler read instead of scraping nodes.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde::Serialize;
use tokio::sync::watch;
use vmstream_api::v1alpha1::{NodeResources, VMNode, VMNodeStatus, VmUsage};

use crate::heartbeat::FIELD_MANAGER;

/// Errors publishing the node's status.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("creating VMNode {node}: {source}")]
    Create {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing status of VMNode {node}: {source}")]
    Status {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// What the VM side of the daemon knows right now (updated by the VM
/// supervisor, read by the publisher).
#[derive(Clone, Debug, Default)]
pub struct NodeReport {
    pub images: Vec<String>,
    pub vms: Vec<VmUsage>,
}

/// Shared handle to the node's current report.
pub type SharedReport = Arc<RwLock<NodeReport>>;

/// Static facts of this node's VMNode.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub node: String,
    pub capacity: NodeResources,
    pub allocatable: NodeResources,
    pub address: Option<String>,
}

/// The status the node publishes at `now` (pure: easy to test).
pub fn build_status(id: &NodeIdentity, report: &NodeReport, now: Timestamp) -> VMNodeStatus {
    let mut images = report.images.clone();
    images.sort();
    images.dedup();
    let mut vms = report.vms.clone();
    vms.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    VMNodeStatus {
        capacity: Some(id.capacity.clone()),
        allocatable: Some(id.allocatable.clone()),
        address: id.address.clone(),
        images,
        vms,
        heartbeat_time: Some(Time(now)),
        daemon_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        ..VMNodeStatus::default()
    }
}

/// A VMNode as this daemon applies it: the object with an empty spec (so
/// no spec field, e.g. `unschedulable`, is claimed), or only its status.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct VMNodeApply<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: VMNodeApplyMeta<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<EmptySpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<VMNodeStatus>,
}

#[derive(Debug, Serialize)]
struct VMNodeApplyMeta<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<std::collections::BTreeMap<&'static str, &'a str>>,
}

/// `{}`: the VMNode's spec belongs to the operator and the admin.
#[derive(Debug, Serialize)]
struct EmptySpec {}

impl<'a> VMNodeApply<'a> {
    fn object(node: &'a str) -> Self {
        Self {
            api_version: vmstream_api::API_VERSION,
            kind: "VMNode",
            metadata: VMNodeApplyMeta {
                name: node,
                labels: Some([(vmstream_api::NODE_LABEL, node)].into_iter().collect()),
            },
            spec: Some(EmptySpec {}),
            status: None,
        }
    }

    fn status(node: &'a str, status: VMNodeStatus) -> Self {
        Self {
            api_version: vmstream_api::API_VERSION,
            kind: "VMNode",
            metadata: VMNodeApplyMeta {
                name: node,
                labels: None,
            },
            spec: None,
            status: Some(status),
        }
    }
}

/// Creates the VMNode if missing and writes its status once.
pub async fn publish(
    client: &kube::Client,
    id: &NodeIdentity,
    report: &NodeReport,
) -> Result<(), PublishError> {
    let api: Api<VMNode> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let object = VMNodeApply::object(&id.node);
    api.patch(&id.node, &params, &Patch::Apply(&object))
        .await
        .map_err(|source| PublishError::Create {
            node: id.node.clone(),
            source,
        })?;
    let status = VMNodeApply::status(&id.node, build_status(id, report, Timestamp::now()));
    api.patch_status(&id.node, &params, &Patch::Apply(&status))
        .await
        .map_err(|source| PublishError::Status {
            node: id.node.clone(),
            source,
        })?;
    Ok(())
}

/// Publishes the status every `interval` until `stop` turns true.
pub async fn run(
    client: kube::Client,
    id: NodeIdentity,
    report: SharedReport,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let snapshot = report.read().map(|r| r.clone()).unwrap_or_default();
                if let Err(e) = publish(&client, &id, &snapshot).await {
                    tracing::warn!(error = %e, "node status not published");
                }
            }
            _ = stop.changed() => {
                if *stop.borrow() { return; }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_objects_claim_no_spec_field() {
        assert_eq!(
            serde_json::to_value(VMNodeApply::object("n1")).unwrap(),
            serde_json::json!({
                "apiVersion": vmstream_api::API_VERSION,
                "kind": "VMNode",
                "metadata": { "name": "n1", "labels": { vmstream_api::NODE_LABEL: "n1" } },
                "spec": {},
            })
        );
        let status =
            serde_json::to_value(VMNodeApply::status("n1", VMNodeStatus::default())).unwrap();
        assert_eq!(status["metadata"], serde_json::json!({ "name": "n1" }));
        assert!(status.get("spec").is_none());
    }

    #[test]
    fn status_is_sorted_and_deduplicated() {
        let id = NodeIdentity {
            node: "n1".into(),
            capacity: NodeResources {
                memory_bytes: 8 << 30,
                vcpus: 2,
            },
            allocatable: NodeResources {
                memory_bytes: 7 << 30,
                vcpus: 2,
            },
            address: Some("10.0.0.1:7480".into()),
        };
        let vm = |name: &str| VmUsage {
            namespace: "ns".into(),
            name: name.into(),
            ..Default::default()
        };
        let report = NodeReport {
            images: vec!["ns/b".into(), "ns/a".into(), "ns/b".into()],
            vms: vec![vm("z"), vm("a")],
        };
        let s = build_status(&id, &report, Timestamp::UNIX_EPOCH);
        assert_eq!(s.images, vec!["ns/a", "ns/b"]);
        assert_eq!(
            s.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            vec!["a", "z"]
        );
        assert_eq!(s.allocatable.unwrap().memory_bytes, 7 << 30);
        assert_eq!(s.address.as_deref(), Some("10.0.0.1:7480"));
    }
}
