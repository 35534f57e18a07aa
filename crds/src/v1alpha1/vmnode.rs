//! VMNode (`vmn`, cluster-scoped): the compact per-node object each node daemon
//! publishes: capacity, cached images and per-VM usage, which the operator and
//! the autoscaler read instead of scraping the nodes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::conditions_schema;

/// What the cluster asks of the node.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "vmstream.io",
    version = "v1alpha1",
    kind = "VMNode",
    plural = "vmnodes",
    status = "VMNodeStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "vmn",
    category = "vmstream",
    doc = "A node running the vmstream node daemon, as the daemon reports it.",
    printcolumn(name = "Address", type_ = "string", json_path = ".status.address"),
    printcolumn(
        name = "Unschedulable",
        type_ = "boolean",
        json_path = ".spec.unschedulable"
    ),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.heartbeatTime"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.daemonVersion"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VMNodeSpec {
    /// No new LiveImages, clones or migration targets are placed here.
    #[serde(default)]
    pub unschedulable: bool,
}

/// What the node daemon reports.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VMNodeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<NodeResources>,
    /// Capacity minus what the daemon keeps for itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<NodeResources>,
    /// `host:port` of the node's page-streaming server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// LiveImages cached on the node, as `namespace/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// VMs running on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Memory and vCPUs of a node.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeResources {
    pub memory_bytes: u64,
    pub vcpus: u32,
}

/// Usage of one VM (a VMClone) on the node.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmUsage {
    pub namespace: String,
    pub name: String,
    /// Cumulative CPU time in milliseconds.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Recent CPU use in percent of one vCPU.
    #[serde(default)]
    pub cpu_utilization: f64,
    /// Guest memory size in bytes.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Guest memory present in host memory, in bytes.
    #[serde(default)]
    pub resident_bytes: u64,
    #[serde(default)]
    pub faults_served: u64,
    /// Requests per second the guest served (the `requestRate` custom metric).
    #[serde(default)]
    pub request_rate: f64,
}
