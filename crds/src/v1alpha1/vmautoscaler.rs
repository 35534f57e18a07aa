//! VMAutoscaler (`vmas`): an HPA-v2-style policy that resizes a ClonePool from
//! per-VM usage metrics (cpu, memory, custom) published in VMNode status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{DNS1123_SUBDOMAIN_PATTERN, conditions_schema, string_enum};

/// Target, bounds, metrics and scaling behaviour.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "vmstream.io",
    version = "v1alpha1",
    kind = "VMAutoscaler",
    plural = "vmautoscalers",
    namespaced,
    status = "VMAutoscalerStatus",
    derive = "PartialEq",
    shortname = "vmas",
    category = "vmstream",
    doc = "Resizes a ClonePool from per-VM usage metrics.",
    printcolumn(
        name = "Target",
        type_ = "string",
        json_path = ".spec.scaleTargetRef.name"
    ),
    printcolumn(name = "Min", type_ = "integer", json_path = ".spec.minReplicas"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxReplicas"),
    printcolumn(
        name = "Current",
        type_ = "integer",
        json_path = ".status.currentReplicas"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredReplicas"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must be less than or equal to maxReplicas").field_path(".minReplicas"))]
pub struct VMAutoscalerSpec {
    pub scale_target_ref: ScaleTargetRef,
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// The desired replica count is the largest of the counts the metrics ask for.
    #[schemars(length(min = 1, max = 8))]
    pub metrics: Vec<MetricSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behavior: Option<ScalingBehavior>,
    /// Relative deviation from the target that causes no scaling (0.1 = 10%).
    #[serde(default = "default_tolerance")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: f64,
}

fn default_min_replicas() -> i32 {
    1
}

fn default_tolerance() -> f64 {
    0.1
}

string_enum! {
    /// Kinds a VMAutoscaler can scale: `ClonePool`.
    ScaleTargetKind { ClonePool }
}

/// The scaled object, in the autoscaler's namespace.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    pub kind: ScaleTargetKind,
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    pub name: String,
}

string_enum! {
    /// `Cpu`: CPU use in percent of one vCPU; `Memory`: resident memory in
    /// percent of the VM's memory; `Custom`: a named per-VM metric (for now
    /// `requestRate`, the guest's request rate).
    MetricType { Cpu, Memory, Custom }
}

/// One metric and its per-VM target.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type == 'Custom' ? has(self.name) : !has(self.name)").message("name is required when type is Custom and not allowed otherwise").field_path(".name"),
    validation = Rule::new("self.type == 'Custom' ? has(self.target.averageValue) : has(self.target.averageUtilization)").message("target: Cpu and Memory metrics take averageUtilization, Custom metrics take averageValue").field_path(".target")
)]
pub struct MetricSpec {
    #[serde(rename = "type")]
    pub type_: MetricType,
    /// Name of a Custom metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    pub target: MetricTarget,
}

/// Per-VM target value; exactly one of the two.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.averageUtilization) != has(self.averageValue)").message("exactly one of target.averageUtilization or target.averageValue must be set"))]
pub struct MetricTarget {
    /// Percent: of one vCPU for Cpu, of the VM's memory for Memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub average_utilization: Option<i32>,
    /// Average value per VM, for Custom metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("averageValue must be greater than 0"))]
    pub average_value: Option<f64>,
}

/// Scaling behaviour per direction (HPA semantics).
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalingBehavior {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScalingRules>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScalingRules>,
}

/// Rules of one direction. Absent fields take HPA's defaults (scale up: no
/// stabilization, +100% or +4 per 15 s, Max; scale down: 300 s window,
/// -100% per 15 s).
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalingRules {
    /// Recommendations of this many past seconds are considered, and the most
    /// conservative one is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub stabilization_window_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_policy: Option<SelectPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub policies: Vec<ScalingPolicy>,
}

string_enum! {
    /// Which policy wins: `Max` (largest change), `Min` (smallest change),
    /// `Disabled` (no scaling in this direction).
    SelectPolicy { Max, Min, Disabled }
}

string_enum! {
    /// Unit of a policy's value: `Replicas` (absolute) or `Percent` (of the
    /// current replicas).
    ScalingPolicyType { Replicas, Percent }
}

/// At most `value` replicas (or percent) of change per `periodSeconds`.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicy {
    #[serde(rename = "type")]
    pub type_: ScalingPolicyType,
    #[schemars(range(min = 1))]
    pub value: i32,
    #[schemars(range(min = 1, max = 1800))]
    pub period_seconds: i32,
}

/// Observed state of a VMAutoscaler.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VMAutoscalerStatus {
    #[serde(default)]
    pub current_replicas: i32,
    #[serde(default)]
    pub desired_replicas: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub current_metrics: Vec<MetricStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    /// Past recommendations, kept for the stabilization windows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recommendations: Vec<Recommendation>,
    /// Past scale changes, kept for the policies' periods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scale_events: Vec<ScaleEvent>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Current per-VM average of one metric.
#[derive(JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricStatus {
    #[serde(rename = "type")]
    pub type_: MetricType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub average_value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub average_utilization: Option<i32>,
}

/// A replica count the autoscaler computed at `timestamp`.
#[derive(JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recommendation {
    pub timestamp: Time,
    pub replicas: i32,
}

/// A change of the target's replicas (positive: up) made at `timestamp`.
#[derive(JsonSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleEvent {
    pub timestamp: Time,
    pub change: i32,
}
