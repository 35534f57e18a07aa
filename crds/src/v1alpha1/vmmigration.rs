//! VMMigration (`vmmig`): move one running VMClone to another node, by default
//! postcopy (the VM moves first, its memory follows).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::shared::{DNS1123_SUBDOMAIN_PATTERN, VMMigrationPhase, conditions_schema, string_enum};

/// Which clone to move, where, and how. The whole spec is immutable.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "vmstream.io",
    version = "v1alpha1",
    kind = "VMMigration",
    plural = "vmmigrations",
    namespaced,
    status = "VMMigrationStatus",
    derive = "PartialEq",
    shortname = "vmmig",
    category = "vmstream",
    doc = "Moves one running VMClone to another node.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.sourceNode"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetNode"),
    printcolumn(
        name = "Downtime(ms)",
        type_ = "number",
        json_path = ".status.downtimeMs",
        description = "time the VM ran nowhere"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self == oldSelf").message("spec is immutable"),
    validation = Rule::new("!has(self.sourceNode) || !has(self.targetNode) || self.sourceNode != self.targetNode").message("targetNode must differ from sourceNode").field_path(".targetNode"),
    validation = Rule::new("!has(self.precopyRounds) || self.mode != 'Postcopy'").message("precopyRounds is allowed only when mode is Precopy or Hybrid").field_path(".precopyRounds")
)]
pub struct VMMigrationSpec {
    /// Name of the VMClone (same namespace) to move.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN_PATTERN))]
    pub vm_clone: String,
    /// Node the clone is expected on; the migration fails if it is elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub source_node: Option<String>,
    /// Node to move to; the operator chooses when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub target_node: Option<String>,
    #[serde(default)]
    pub mode: MigrationMode,
    /// Dirty-page rounds sent while the VM still runs on the source
    /// (Precopy and Hybrid only; the operator's default applies when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 30))]
    pub precopy_rounds: Option<u32>,
    /// Bandwidth limit of the bulk page transfer in MiB/s; unlimited when absent.
    #[serde(
        default,
        rename = "bandwidthMiBps",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1))]
    pub bandwidth_mibps: Option<u32>,
    /// The migration fails (and the VM stays or resumes on the source when it
    /// can) after this long.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: u32,
}

fn default_timeout_seconds() -> u32 {
    300
}

string_enum! {
    /// `Postcopy`: pause, move vCPU and device state, resume on the target at
    /// once, then pull memory on fault and push the rest. `Precopy`: send
    /// memory in rounds while the VM runs, then move the remaining dirty
    /// pages while paused. `Hybrid`: some precopy rounds, then postcopy.
    #[derive(Default)]
    MigrationMode {
        #[default]
        Postcopy,
        Precopy,
        Hybrid,
    }
}

/// Observed state of a VMMigration.
#[derive(JsonSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VMMigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VMMigrationPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// `host:port` where the target node's VM process listens for this
    /// migration (written by the target's daemon; the source's daemon
    /// migrates the VM there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_address: Option<String>,
    /// Milliseconds the VM ran on neither node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Milliseconds from start to the last page on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_sent: Option<u64>,
    /// Pages the target requested because the guest faulted on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_faulted: Option<u64>,
    /// Total milliseconds the guest waited on faulted pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_wait_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl VMMigration {
    /// The phase in status, `Pending` when none was written yet.
    pub fn phase(&self) -> VMMigrationPhase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or(VMMigrationPhase::Pending)
    }
}
