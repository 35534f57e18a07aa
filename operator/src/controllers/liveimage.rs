//! LiveImage reconciler: the `vmstream.io/image-in-use` finalizer keeps an
//! image while VMClones reference it; boot-sourced images are placed on a
//! node (label + status Scheduled), capture images go to their source
//! clone's node; a build on a node whose heartbeat went stale fails. The node
//! daemon does the booting and capturing.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use vmstream_api::v1alpha1::{LiveImage, LiveImagePhase, VMClone, VMClonePhase};
use vmstream_api::{IMAGE_IN_USE_FINALIZER, NODE_LABEL, condition, set_condition};

use super::Context;
use super::patch::{PhaseStatus, ensure_finalizer, patch_labels, patch_status, remove_finalizer};
use crate::cluster::{ObjectKey, Reserved};
use crate::cluster::{clone_node, image_memory_bytes};
use crate::decide::phase::{ImageFacts, ImagePhase, ImageStep, image_step};
use crate::decide::placement::{PlacementPolicy, PlacementRequest, place};
use crate::error::ReconcileError;

const RETRY: Duration = Duration::from_secs(2);

fn image_phase(phase: LiveImagePhase) -> ImagePhase {
    match phase {
        LiveImagePhase::Pending => ImagePhase::Pending,
        LiveImagePhase::Scheduled => ImagePhase::Scheduled,
        LiveImagePhase::Booting => ImagePhase::Booting,
        LiveImagePhase::Capturing => ImagePhase::Capturing,
        LiveImagePhase::Ready => ImagePhase::Ready,
        LiveImagePhase::Failed => ImagePhase::Failed,
        LiveImagePhase::Deleting => ImagePhase::Deleting,
    }
}

pub async fn reconcile(image: Arc<LiveImage>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = image
        .namespace()
        .ok_or(ReconcileError::MissingField("metadata.namespace"))?;
    let api: Api<LiveImage> = Api::namespaced(ctx.client.clone(), &ns);
    let clones_api: Api<VMClone> = Api::namespaced(ctx.client.clone(), &ns);
    let deleting = image.meta().deletion_timestamp.is_some();
    let node = image
        .labels()
        .get(NODE_LABEL)
        .cloned()
        .or_else(|| image.status.as_ref().and_then(|s| s.node.clone()));
    let alive = node.as_deref().is_some_and(|n| ctx.view.node_alive(n));
    let clones_using = if deleting {
        clones_api
            .list(&ListParams::default())
            .await
            .map_err(|source| ReconcileError::List {
                kind: "VMClone",
                source,
            })?
            .items
            .iter()
            .filter(|c| c.spec.live_image == image.name_any())
            .count()
    } else {
        0
    };
    let facts = ImageFacts {
        phase: image.status.as_ref().and_then(|s| s.phase).map(image_phase),
        node: node.clone(),
        node_alive: alive,
        deletion_requested: deleting,
        clones_using,
        boot_source: image.spec.source.boot.is_some(),
    };
    let image = if deleting {
        image.as_ref().clone()
    } else {
        ensure_finalizer(&api, image.as_ref(), IMAGE_IN_USE_FINALIZER).await?
    };

    let action = match image_step(&facts) {
        ImageStep::ReleaseFinalizer => {
            remove_finalizer(&api, &image, IMAGE_IN_USE_FINALIZER).await?;
            Action::await_change()
        }
        ImageStep::BlockedByClones(n) => {
            let message = format!("deletion waits for {n} VMClone(s) using this image");
            if image.status.as_ref().and_then(|s| s.message.as_deref()) != Some(message.as_str()) {
                write(
                    &api,
                    &image,
                    LiveImagePhase::Deleting,
                    node.as_deref(),
                    &message,
                    "InUse",
                )
                .await?;
            }
            Action::requeue(RETRY)
        }
        ImageStep::FailNodeLost => {
            let message = format!(
                "node {} heartbeat is stale",
                node.clone().unwrap_or_default()
            );
            write(
                &api,
                &image,
                LiveImagePhase::Failed,
                node.as_deref(),
                &message,
                "NodeLost",
            )
            .await?;
            ctx.event(&image, true, "Failed", message).await;
            Action::await_change()
        }
        ImageStep::PlaceBoot => place_boot(&ctx, &api, &image).await?,
        ImageStep::FollowSourceClone => follow_clone(&ctx, &api, &clones_api, &image).await?,
        ImageStep::Nothing => {
            if image.phase().is_terminal() {
                Action::await_change()
            } else {
                Action::requeue(ctx.config.recheck_interval())
            }
        }
    };
    ctx.succeeded(&image);
    Ok(action)
}

async fn write(
    api: &Api<LiveImage>,
    image: &LiveImage,
    phase: LiveImagePhase,
    node: Option<&str>,
    message: &str,
    reason: &str,
) -> Result<(), ReconcileError> {
    let mut conditions = image
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    set_condition(
        &mut conditions,
        condition(
            "Scheduled",
            node.is_some() && phase != LiveImagePhase::Failed,
            reason,
            message,
            image.meta().generation,
        ),
    );
    let status = PhaseStatus {
        phase,
        node,
        message: (!message.is_empty()).then_some(message),
        conditions: &conditions,
        observed_generation: image.meta().generation,
    };
    patch_status(api, image, &status).await?;
    Ok(())
}

async fn schedule_on(
    ctx: &Context,
    api: &Api<LiveImage>,
    image: &LiveImage,
    node: &str,
) -> Result<Action, ReconcileError> {
    let labelled = if image.labels().get(NODE_LABEL).map(String::as_str) == Some(node) {
        image.clone()
    } else {
        patch_labels(api, image, &[(NODE_LABEL, node)]).await?
    };
    write(
        api,
        &labelled,
        LiveImagePhase::Scheduled,
        Some(node),
        "",
        "Placed",
    )
    .await?;
    ctx.metrics.placed("LiveImage");
    ctx.event(image, false, "Placed", format!("placed on node {node}"))
        .await;
    Ok(Action::requeue(ctx.config.recheck_interval()))
}

async fn pending(
    api: &Api<LiveImage>,
    image: &LiveImage,
    message: String,
) -> Result<Action, ReconcileError> {
    if image.status.as_ref().and_then(|s| s.message.as_deref()) != Some(message.as_str()) {
        write(
            api,
            image,
            LiveImagePhase::Pending,
            None,
            &message,
            "Unschedulable",
        )
        .await?;
    }
    Ok(Action::requeue(RETRY))
}

async fn place_boot(
    ctx: &Context,
    api: &Api<LiveImage>,
    image: &LiveImage,
) -> Result<Action, ReconcileError> {
    let placement = image.spec.placement.clone().unwrap_or_default();
    let request = PlacementRequest {
        memory_bytes: image_memory_bytes(image),
        image: None,
        image_home: None,
        node_name: placement.node_name,
        node_selector: placement.node_selector.unwrap_or_default(),
        exclude: Vec::new(),
    };
    let policy = PlacementPolicy {
        overcommit_ratio: ctx.config.overcommit_ratio,
        now: Timestamp::now(),
    };
    let placing = ctx.placement_lock.lock().await;
    match place(&request, &ctx.view.node_facts(), &policy) {
        Ok(node) => {
            let labelled = patch_labels(api, image, &[(NODE_LABEL, &node)]).await?;
            ctx.view.reserve(
                Reserved::Image,
                ObjectKey::of(image),
                &node,
                request.memory_bytes,
            );
            drop(placing);
            schedule_on(ctx, api, &labelled, &node).await
        }
        Err(why) => {
            drop(placing);
            pending(api, image, why.to_string()).await
        }
    }
}

async fn follow_clone(
    ctx: &Context,
    api: &Api<LiveImage>,
    clones: &Api<VMClone>,
    image: &LiveImage,
) -> Result<Action, ReconcileError> {
    let Some(source) = image.spec.source.from_clone.as_ref() else {
        return Err(ReconcileError::MissingField("spec.source.fromClone"));
    };
    let clone = clones
        .get_opt(&source.vm_clone)
        .await
        .map_err(|source_err| ReconcileError::Get {
            kind: "VMClone",
            name: source.vm_clone.clone(),
            source: source_err,
        })?;
    match clone {
        None => pending(api, image, format!("VMClone {} not found", source.vm_clone)).await,
        Some(c) => match (c.phase(), clone_node(&c)) {
            (VMClonePhase::Running, Some(node)) => schedule_on(ctx, api, image, &node).await,
            (phase, _) => {
                pending(
                    api,
                    image,
                    format!(
                        "waiting for VMClone {} to be Running (is {phase})",
                        source.vm_clone
                    ),
                )
                .await
            }
        },
    }
}
