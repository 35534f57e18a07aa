//! The status writes of the sync loop: a typed LiveImage or VMClone status
//! with the phase, this node, and the phase's condition (whose reason is the
//! phase, or the failure's reason), merged into the object's `/status`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Resource, ResourceExt};
use vmstream_api::v1alpha1::{
    LiveImage, LiveImagePhase, LiveImageStatus, VMClone, VMClonePhase, VMCloneStatus,
};
use vmstream_api::{condition, set_condition};

use super::NodeActions;
use super::error::ActionError;
use crate::object_key::ObjectKey;
use crate::status_patch::merge_status;

/// A LiveImage status saying only `message`.
pub fn image_message(message: impl Into<String>) -> LiveImageStatus {
    LiveImageStatus {
        message: Some(message.into()),
        ..LiveImageStatus::default()
    }
}

/// A VMClone status saying only `message`.
pub fn clone_message(message: impl Into<String>) -> VMCloneStatus {
    VMCloneStatus {
        message: Some(message.into()),
        ..VMCloneStatus::default()
    }
}

/// `conditions` with the condition `(type, true?, reason)` put in, its
/// message the status's message.
fn with_condition(
    conditions: Option<&Vec<Condition>>,
    (condition_type, is_true, reason): (&str, bool, &str),
    message: Option<&str>,
    generation: Option<i64>,
) -> Vec<Condition> {
    let mut conditions = conditions.cloned().unwrap_or_default();
    set_condition(
        &mut conditions,
        condition(
            condition_type,
            is_true,
            reason,
            message.unwrap_or(""),
            generation,
        ),
    );
    conditions
}

impl NodeActions {
    /// Writes `status` with `phase`, this node and the Ready condition
    /// (reason: the phase).
    pub(super) async fn patch_image(
        &self,
        image: &LiveImage,
        phase: LiveImagePhase,
        status: LiveImageStatus,
    ) -> Result<(), ActionError> {
        self.write_image_status(image, phase, phase.as_str(), status)
            .await
    }

    /// Writes phase Failed with `message`, the Ready condition's reason
    /// `reason`.
    pub(super) async fn fail_image(
        &self,
        image: &LiveImage,
        reason: &str,
        message: String,
    ) -> Result<(), ActionError> {
        self.write_image_status(
            image,
            LiveImagePhase::Failed,
            reason,
            image_message(message),
        )
        .await
    }

    async fn write_image_status(
        &self,
        image: &LiveImage,
        phase: LiveImagePhase,
        reason: &str,
        mut status: LiveImageStatus,
    ) -> Result<(), ActionError> {
        status.conditions = with_condition(
            image.status.as_ref().map(|s| &s.conditions),
            ("Ready", phase == LiveImagePhase::Ready, reason),
            status.message.as_deref(),
            image.meta().generation,
        );
        status.phase = Some(phase);
        status.node = Some(self.node.clone());
        let ns = image.namespace().unwrap_or_default();
        merge_status::<LiveImage, _>(&self.client, &ns, &image.name_any(), &status)
            .await
            .map_err(|source| ActionError::Status {
                object: ObjectKey::live_image(ns, image.name_any()),
                source: Box::new(source),
            })
    }

    /// Writes `status` with `phase`, this node and the Running condition
    /// (reason: the phase), and remembers the phase written.
    pub(super) async fn patch_clone(
        &self,
        clone: &VMClone,
        phase: VMClonePhase,
        status: VMCloneStatus,
    ) -> Result<(), ActionError> {
        self.write_clone_status(clone, phase, phase.as_str(), status)
            .await
    }

    /// Writes phase Failed with `message`, the Running condition's reason
    /// `reason`.
    pub(super) async fn fail_clone(
        &self,
        clone: &VMClone,
        reason: &str,
        message: String,
    ) -> Result<(), ActionError> {
        self.write_clone_status(clone, VMClonePhase::Failed, reason, clone_message(message))
            .await
    }

    async fn write_clone_status(
        &self,
        clone: &VMClone,
        phase: VMClonePhase,
        reason: &str,
        mut status: VMCloneStatus,
    ) -> Result<(), ActionError> {
        status.conditions = with_condition(
            clone.status.as_ref().map(|s| &s.conditions),
            ("Running", phase == VMClonePhase::Running, reason),
            status.message.as_deref(),
            clone.meta().generation,
        );
        status.phase = Some(phase);
        status.node = Some(self.node.clone());
        let ns = clone.namespace().unwrap_or_default();
        merge_status::<VMClone, _>(&self.client, &ns, &clone.name_any(), &status)
            .await
            .map_err(|source| ActionError::Status {
                object: ObjectKey::vm_clone(ns, clone.name_any()),
                source: Box::new(source),
            })?;
        self.remember_report(clone, phase);
        Ok(())
    }
}
