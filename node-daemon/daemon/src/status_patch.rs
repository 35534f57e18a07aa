//! Typed status writes: a merge patch of an object's `/status` carrying a
//! typed status struct of the API crate, under the field manager
//! `vmstream-node`. Only the fields set in the struct are written (every
//! optional field skips `None`), so each write says exactly what it changes.

use kube::api::{Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::{Api, Resource};
use serde::Serialize;

use crate::heartbeat::FIELD_MANAGER;

/// The body of a status merge patch: `{"status": <typed status>}`.
#[derive(Debug, Serialize)]
pub struct StatusPatch<'a, T> {
    pub status: &'a T,
}

/// Merge-patches the status of `K` `namespace/name` with `status`.
pub async fn merge_status<K, S>(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    status: &S,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: Serialize + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .patch_status(
            name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(&StatusPatch { status }),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmstream_api::v1alpha1::{VMClonePhase, VMCloneStatus};

    #[test]
    fn only_the_fields_set_are_written() {
        let status = VMCloneStatus {
            phase: Some(VMClonePhase::Stopped),
            message: Some(String::new()),
            ..VMCloneStatus::default()
        };
        assert_eq!(
            serde_json::to_value(StatusPatch { status: &status }).unwrap(),
            serde_json::json!({"status": {"phase": "Stopped", "message": ""}})
        );
    }
}
