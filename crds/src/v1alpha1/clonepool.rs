//! ClonePool (`cp`): N VMClones of one LiveImage, with a scale subresource so
//! `kubectl scale`, HPA, KEDA and VMAutoscaler can resize it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{
    DNS1123_SUBDOMAIN_PATTERN, MemoryBackend, Placement, conditions_schema, string_enum,
};

/// How many clones of which image.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "vmstream.io",
    version = "v1alpha1",
    kind = "ClonePool",
    namespaced,
    status = "ClonePoolStatus",
    derive = "PartialEq",
    shortname = "cp",
    category = "vmstream",
    doc = "N VMClones of one LiveImage.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.labelSelector"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.liveImage"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClonePoolSpec {
    /// Number of clones, 0 to 1000.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Name of the LiveImage (same namespace) the clones start from.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    pub live_image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<CloneTemplate>,
    #[serde(default)]
    pub scale_in_policy: ScaleInPolicy,
}

fn default_replicas() -> i32 {
    1
}

/// What every clone of the pool gets.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloneTemplate {
    /// Labels put on every VMClone (besides `vmstream.io/pool`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
    #[serde(default)]
    pub memory_backend: MemoryBackend,
}

string_enum! {
    /// Which clones go first when the pool shrinks: clones not yet running
    /// always go first, then the newest (`PendingThenNewest`) or the oldest
    /// (`PendingThenOldest`) running ones.
    #[derive(Default)]
    ScaleInPolicy {
        #[default]
        PendingThenNewest,
        PendingThenOldest,
    }
}

/// Observed state of a ClonePool.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClonePoolStatus {
    /// VMClones that exist for the pool.
    #[serde(default)]
    pub replicas: i32,
    /// VMClones of the pool in phase Running.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Selector of the pool's VMClones, `vmstream.io/pool=<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
