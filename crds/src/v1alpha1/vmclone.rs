//! VMClone (`vmc`): one VM started from a LiveImage, resuming where the image
//! left off, with memory streamed on demand.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{
    DNS1123_SUBDOMAIN_PATTERN, MemoryBackend, Placement, VMClonePhase, conditions_schema,
};

/// Which image to start and where.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "vmstream.io",
    version = "v1alpha1",
    kind = "VMClone",
    plural = "vmclones",
    namespaced,
    status = "VMCloneStatus",
    derive = "PartialEq",
    shortname = "vmc",
    category = "vmstream",
    doc = "One VM started from a LiveImage.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.liveImage"),
    printcolumn(
        name = "Start(ms)",
        type_ = "number",
        json_path = ".status.startLatencyMs",
        description = "time from start request to the guest running"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VMCloneSpec {
    /// Name of the LiveImage (same namespace) to start from. Immutable.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("liveImage is immutable"))]
    pub live_image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    #[serde(default)]
    pub memory_backend: MemoryBackend,
    /// Per-clone identity given to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
}

/// What makes one clone distinguishable from its siblings.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// Observed state of a VMClone.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VMCloneStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VMClonePhase>,
    /// Node the VM runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Milliseconds from the start request to the guest running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_latency_ms: Option<f64>,
    /// Guest memory bytes present in host memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_bytes: Option<u64>,
    /// Resident bytes still shared with the image (and other clones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_bytes: Option<u64>,
    /// Resident bytes this clone wrote (its own copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_bytes: Option<u64>,
    /// Page faults served by streaming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults_served: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl VMClone {
    /// The phase in status, `Pending` when none was written yet.
    pub fn phase(&self) -> VMClonePhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or(VMClonePhase::Pending)
    }
}
