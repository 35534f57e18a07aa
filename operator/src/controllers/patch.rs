//! The operator's writes to its objects: typed JSON merge patches of status,
//! labels and finalizers under the `vmstream-operator` field manager, with
//! the resourceVersion read as precondition where a node daemon writes too.

use std::collections::BTreeMap;
use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::FIELD_MANAGER;
use crate::error::ReconcileError;

pub fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// `metadata` of a merge patch: the resourceVersion read (a precondition:
/// the write fails with 409 if the object changed since) and the labels or
/// finalizers written.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MetadataPatch<'a> {
    resource_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<BTreeMap<&'a str, &'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finalizers: Option<&'a [String]>,
}

impl<'a> MetadataPatch<'a> {
    fn precondition(obj: &'a impl Resource) -> Self {
        Self {
            resource_version: obj.meta().resource_version.as_deref(),
            labels: None,
            finalizers: None,
        }
    }
}

/// A merge patch of the status subresource: `{"status": S}`, with
/// `{"metadata": {"resourceVersion": ..}}` when it is conditional.
#[derive(Debug, Serialize)]
struct StatusPatch<'a, S> {
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<MetadataPatch<'a>>,
    status: &'a S,
}

/// A merge patch of metadata only.
#[derive(Debug, Serialize)]
struct ObjectPatch<'a> {
    metadata: MetadataPatch<'a>,
}

/// The status a reconciler writes when it moves a VMClone or LiveImage to
/// `phase`. Every field is written: `None` as null, so a node or message
/// left from an earlier phase is cleared (merge patch).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseStatus<'a, P> {
    pub phase: P,
    pub node: Option<&'a str>,
    pub message: Option<&'a str>,
    pub conditions: &'a [Condition],
    pub observed_generation: Option<i64>,
}

/// A status write of the conditions alone (the other fields untouched).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConditionsStatus<'a> {
    pub conditions: &'a [Condition],
}

fn name_of<K: Resource>(obj: &K) -> Result<String, ReconcileError> {
    obj.meta()
        .name
        .clone()
        .ok_or(ReconcileError::MissingField("metadata.name"))
}

/// Merge-patch `status` of `obj`, failing on a concurrent change (the
/// patch carries the resourceVersion read), so a read-modify-write of the
/// conditions list never drops what a node daemon wrote meanwhile.
pub async fn patch_status<K, S>(api: &Api<K>, obj: &K, status: &S) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + Debug,
{
    let name = name_of(obj)?;
    let patch = StatusPatch {
        metadata: Some(MetadataPatch::precondition(obj)),
        status,
    };
    merge(api, &name, "status", Subresource::Status, &patch).await
}

/// Merge-patch `status` of an object whose status only the operator writes
/// (ClonePool, VMAutoscaler): no resourceVersion precondition, so a watch
/// cache lagging behind our own last write costs no conflict round.
pub async fn patch_own_status<K, S>(api: &Api<K>, obj: &K, status: &S) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + Debug,
{
    let name = name_of(obj)?;
    let patch = StatusPatch {
        metadata: None,
        status,
    };
    merge(api, &name, "status", Subresource::Status, &patch).await
}

/// Merge `labels` (key, value) into `metadata.labels` of `obj`
/// (resourceVersion precondition).
pub async fn patch_labels<K>(
    api: &Api<K>,
    obj: &K,
    labels: &[(&str, &str)],
) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let name = name_of(obj)?;
    let patch = ObjectPatch {
        metadata: MetadataPatch {
            labels: Some(labels.iter().copied().collect()),
            ..MetadataPatch::precondition(obj)
        },
    };
    merge(api, &name, "labels", Subresource::Object, &patch).await
}

async fn write_finalizers<K>(api: &Api<K>, obj: &K, list: &[String]) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let name = name_of(obj)?;
    let patch = ObjectPatch {
        metadata: MetadataPatch {
            finalizers: Some(list),
            ..MetadataPatch::precondition(obj)
        },
    };
    merge(api, &name, "finalizers", Subresource::Object, &patch).await
}

/// Add `finalizer` unless present; returns the object as written.
pub async fn ensure_finalizer<K>(
    api: &Api<K>,
    obj: &K,
    finalizer: &str,
) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    if obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(obj.clone());
    }
    let mut list = obj.finalizers().to_vec();
    list.push(finalizer.into());
    write_finalizers(api, obj, &list).await
}

/// Remove `finalizer` if present.
pub async fn remove_finalizer<K>(
    api: &Api<K>,
    obj: &K,
    finalizer: &str,
) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    if !obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let list: Vec<String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .cloned()
        .collect();
    match write_finalizers(api, obj, &list).await {
        // Already gone: the finalizer was the last thing holding it.
        Err(ReconcileError::Patch {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// What a merge patch is sent to.
enum Subresource {
    Object,
    Status,
}

/// Sends `patch` as a JSON merge patch to `name` (or its status); a failure
/// names the kind, the object and `what` was written.
async fn merge<K, P>(
    api: &Api<K>,
    name: &str,
    what: &'static str,
    to: Subresource,
    patch: &P,
) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    P: Serialize + Debug,
{
    let patch = Patch::Merge(patch);
    let written = match to {
        Subresource::Object => api.patch(name, &patch_params(), &patch).await,
        Subresource::Status => api.patch_status(name, &patch_params(), &patch).await,
    };
    written.map_err(|source| ReconcileError::Patch {
        kind: kind_str::<K>(),
        what,
        name: name.to_string(),
        source,
    })
}

fn kind_str<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "ClonePool" => "ClonePool",
        "VMClone" => "VMClone",
        "LiveImage" => "LiveImage",
        "VMMigration" => "VMMigration",
        "VMAutoscaler" => "VMAutoscaler",
        "VMNode" => "VMNode",
        _ => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vmstream_api::condition;
    use vmstream_api::v1alpha1::{LiveImagePhase, VMClone, VMClonePhase, VMCloneSpec};

    fn placed_clone() -> VMClone {
        let mut clone = VMClone::new(
            "c",
            VMCloneSpec {
                live_image: "img".into(),
                placement: None,
                memory_backend: Default::default(),
                identity: None,
            },
        );
        clone.metadata.resource_version = Some("42".into());
        clone
    }

    #[test]
    fn a_phase_status_clears_node_and_message_with_nulls() {
        let conditions = [condition("Scheduled", false, "Unschedulable", "m", Some(3))];
        let clone = placed_clone();
        let status = PhaseStatus {
            phase: VMClonePhase::Pending,
            node: None,
            message: Some("0/1 nodes fit"),
            conditions: &conditions,
            observed_generation: Some(3),
        };
        let patch = StatusPatch {
            metadata: Some(MetadataPatch::precondition(&clone)),
            status: &status,
        };
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            json!({
                "metadata": { "resourceVersion": "42" },
                "status": {
                    "phase": "Pending",
                    "node": null,
                    "message": "0/1 nodes fit",
                    "conditions": conditions,
                    "observedGeneration": 3,
                },
            })
        );
    }

    /// Every key a phase status writes is a field of the kind's status.
    #[test]
    fn phase_status_fields_are_status_fields_of_clones_and_images() {
        let conditions = [condition("Scheduled", true, "Placed", "", Some(1))];
        let clone = PhaseStatus {
            phase: VMClonePhase::Scheduled,
            node: Some("n"),
            message: Some("m"),
            conditions: &conditions,
            observed_generation: Some(1),
        };
        let written = serde_json::to_value(&clone).unwrap();
        let read: vmstream_api::v1alpha1::VMCloneStatus =
            serde_json::from_value(written.clone()).unwrap();
        assert_eq!(written, serde_json::to_value(read).unwrap());
        let image = PhaseStatus {
            phase: LiveImagePhase::Scheduled,
            node: clone.node,
            message: clone.message,
            conditions: clone.conditions,
            observed_generation: clone.observed_generation,
        };
        let written = serde_json::to_value(&image).unwrap();
        let read: vmstream_api::v1alpha1::LiveImageStatus =
            serde_json::from_value(written.clone()).unwrap();
        assert_eq!(written, serde_json::to_value(read).unwrap());
    }

    #[test]
    fn label_and_finalizer_patches_carry_the_resource_version() {
        let clone = placed_clone();
        let labels = ObjectPatch {
            metadata: MetadataPatch {
                labels: Some([("vmstream.io/node", "a")].into_iter().collect()),
                ..MetadataPatch::precondition(&clone)
            },
        };
        assert_eq!(
            serde_json::to_value(&labels).unwrap(),
            json!({ "metadata": { "resourceVersion": "42", "labels": { "vmstream.io/node": "a" } } })
        );
        let list = vec!["f".to_string()];
        let finalizers = ObjectPatch {
            metadata: MetadataPatch {
                finalizers: Some(&list),
                ..MetadataPatch::precondition(&clone)
            },
        };
        assert_eq!(
            serde_json::to_value(&finalizers).unwrap(),
            json!({ "metadata": { "resourceVersion": "42", "finalizers": ["f"] } })
        );
    }
}
