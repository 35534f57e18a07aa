//! Translation from API objects to the inputs of the pure decisions in
//! [`crate::decide`], for what several reconcilers share (a clone's phase,
//! the placement request of a clone).

use kube::ResourceExt;
use vmstream_api::v1alpha1::{LiveImage, Placement, VMClonePhase};

use crate::cluster::{ObjectKey, image_memory_bytes};
use crate::decide::phase::ClonePhase;
use crate::decide::placement::PlacementRequest;

/// The API's phase as the decision modules spell it.
pub fn clone_phase(phase: VMClonePhase) -> ClonePhase {
    match phase {
        VMClonePhase::Pending => ClonePhase::Pending,
        VMClonePhase::Scheduled => ClonePhase::Scheduled,
        VMClonePhase::Starting => ClonePhase::Starting,
        VMClonePhase::Running => ClonePhase::Running,
        VMClonePhase::Migrating => ClonePhase::Migrating,
        VMClonePhase::Stopping => ClonePhase::Stopping,
        VMClonePhase::Stopped => ClonePhase::Stopped,
        VMClonePhase::Lost => ClonePhase::Lost,
        VMClonePhase::Failed => ClonePhase::Failed,
    }
}

/// The placement request of a clone of `image` (in namespace `ns`) with the
/// clone's `placement`.
pub fn clone_request(
    ns: &str,
    image: &LiveImage,
    placement: Option<&Placement>,
) -> PlacementRequest {
    let placement = placement.cloned().unwrap_or_default();
    PlacementRequest {
        memory_bytes: image_memory_bytes(image),
        image: Some(ObjectKey::new(ns, image.name_any()).to_string()),
        image_home: image.status.as_ref().and_then(|s| s.node.clone()),
        node_name: placement.node_name,
        node_selector: placement.node_selector.unwrap_or_default(),
        exclude: Vec::new(),
    }
}
