//! The vmstream.io/v1alpha1 API: Rust types of the custom resources (LiveImage,
//! VMClone, VMMigration, ClonePool, VMAutoscaler, VMNode), the label, annotation
//! and finalizer names every component agrees on, and condition helpers.
//!
//! The CRD YAML under `crds/` is generated from these types by `crdgen`; bad
//! input is refused by the API server itself through the schema bounds, enums
//! and CEL rules declared here.

pub mod conditions;
pub mod manifests;
pub mod v1alpha1;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use kube::CustomResourceExt;

pub use conditions::{condition, find_condition, is_condition_true, set_condition};

/// API group of every vmstream kind.
pub const GROUP: &str = "vmstream.io";
/// API version of the kinds in [`v1alpha1`].
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` value of the kinds in [`v1alpha1`].
pub const API_VERSION: &str = "vmstream.io/v1alpha1";

/// Label naming the node an object (LiveImage, VMClone, VMMigration) is placed on;
/// node daemons watch only objects carrying their own node name here.
pub const NODE_LABEL: &str = "vmstream.io/node";
/// Label on a VMMigration naming the node the VM migrates from (set by the
/// operator when it schedules the migration), so the source node's daemon
/// can watch the migrations of its VMs with a label selector.
pub const SOURCE_NODE_LABEL: &str = "vmstream.io/source-node";
/// Label naming the ClonePool a VMClone belongs to.
pub const POOL_LABEL: &str = "vmstream.io/pool";
/// Label naming the LiveImage a VMClone is started from.
pub const IMAGE_LABEL: &str = "vmstream.io/live-image";
/// Finalizer that keeps a VMClone object until its VM has really stopped.
pub const VM_STOPPED_FINALIZER: &str = "vmstream.io/vm-stopped";
/// Finalizer that keeps a LiveImage while clones still stream from it.
pub const IMAGE_IN_USE_FINALIZER: &str = "vmstream.io/image-in-use";
/// Prefix of the per-node heartbeat Lease name (`vmstream-node-<node>`).
pub const HEARTBEAT_LEASE_PREFIX: &str = "vmstream-node-";
/// Namespace holding the heartbeat Leases unless configured otherwise.
pub const DEFAULT_SYSTEM_NAMESPACE: &str = "vmstream-system";
/// Annotation on a VMNode (value `"true"`) asking the operator to move VMs away
/// and place no new work on the node.
pub const MAINTENANCE_ANNOTATION: &str = "vmstream.io/maintenance";

/// Name of the heartbeat Lease of `node`.
pub fn heartbeat_lease_name(node: &str) -> String {
    format!("{HEARTBEAT_LEASE_PREFIX}{node}")
}

/// Label selector string selecting the clones of ClonePool `pool`
/// (the value ClonePool's `status.labelSelector` carries).
pub fn pool_label_selector(pool: &str) -> String {
    format!("{POOL_LABEL}={pool}")
}

/// Every CustomResourceDefinition of the API, in a stable order, with schema
/// formats normalized (see [`normalize_schema`]). Install these (or the YAML
/// `crdgen` writes from them) rather than `Kind::crd()` directly.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![
        v1alpha1::LiveImage::crd(),
        v1alpha1::VMClone::crd(),
        v1alpha1::VMMigration::crd(),
        v1alpha1::ClonePool::crd(),
        v1alpha1::VMAutoscaler::crd(),
        v1alpha1::VMNode::crd(),
    ];
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                normalize_schema(schema);
            }
        }
    }
    crds
}

/// Tidy what schemars emits for the API server:
/// * unsigned integer formats (`uint32`, `uint64`, ...), which the server does
///   not know and warns about on every apply, become the OpenAPI formats wide
///   enough for them. Kubernetes stores integers as int64, so `uint64` becomes
///   `int64` (values above 2^63-1 are refused by the server);
/// * the `null` member of optional enums goes (the field stays `nullable`), so
///   error messages list only the real values.
pub fn normalize_schema(schema: &mut JSONSchemaProps) {
    if let Some(values) = schema.enum_.as_mut() {
        values.retain(|v| !v.0.is_null());
    }
    if let Some(format) = schema.format.as_mut() {
        match format.as_str() {
            "uint8" | "uint16" | "int8" | "int16" => *format = "int32".to_owned(),
            "uint32" | "uint64" | "uint" => *format = "int64".to_owned(),
            _ => {}
        }
    }
    let children = schema
        .properties
        .iter_mut()
        .flat_map(|p| p.values_mut())
        .chain(schema.items.iter_mut().filter_map(|items| match items {
            JSONSchemaPropsOrArray::Schema(s) => Some(s.as_mut()),
            JSONSchemaPropsOrArray::Schemas(_) => None,
        }))
        .chain(
            schema
                .additional_properties
                .iter_mut()
                .filter_map(|ap| match ap {
                    JSONSchemaPropsOrBool::Schema(s) => Some(s.as_mut()),
                    JSONSchemaPropsOrBool::Bool(_) => None,
                }),
        );
    for child in children {
        normalize_schema(child);
    }
    for list in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of]
        .into_iter()
        .flatten()
    {
        list.iter_mut().for_each(normalize_schema);
    }
}
