//! VMMigration reconciler: validates the request (clone exists and is
//! Running, target differs from source), picks a target node when none is
//! given (placement without the source), then writes phase Scheduled with
//! source/target in status and labels `vmstream.io/node` = target and
//! `vmstream.io/source-node` = source (each daemon watches its own). The two
//! node daemons carry the migration out and report Running/Succeeded; the
//! operator fails it on timeout or when a node's heartbeat goes stale.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use vmstream_api::v1alpha1::{VMClone, VMMigration, VMMigrationPhase, VMMigrationStatus};
use vmstream_api::{NODE_LABEL, SOURCE_NODE_LABEL, condition, set_condition};

use super::patch::{patch_labels, patch_status};
use super::translate::clone_phase;
use super::{Context, now_time};

use crate::cluster::{ObjectKey, Reserved, clone_node, image_memory_bytes};
use crate::decide::phase::{MigrationFacts, MigrationPhase, MigrationStep, migration_step};
use crate::decide::placement::{PlacementPolicy, PlacementRequest, place};
use crate::error::ReconcileError;

const RETRY: Duration = Duration::from_secs(1);

fn migration_phase(phase: VMMigrationPhase) -> MigrationPhase {
    match phase {
        VMMigrationPhase::Pending => MigrationPhase::Pending,
        VMMigrationPhase::Scheduled => MigrationPhase::Scheduled,
        VMMigrationPhase::Running => MigrationPhase::Running,
        VMMigrationPhase::Succeeded => MigrationPhase::Succeeded,
        VMMigrationPhase::Failed => MigrationPhase::Failed,
    }
}

async fn alive(ctx: &Context, node: Option<&str>) -> Result<bool, ReconcileError> {
    Ok(node.is_some_and(|n| ctx.view.node_alive(n)))
}

/// After a successful migration the VM runs on the target: point the
/// clone's `vmstream.io/node` label there, so the target's daemon owns it
/// from now on (daemons may not write labels; the operator places).
async fn hand_clone_to_target(
    ctx: &Context,
    clones: &Api<VMClone>,
    mig: &VMMigration,
    target: Option<&str>,
) -> Result<(), ReconcileError> {
    let Some(target) = target else {
        return Ok(());
    };
    let clone = clones
        .get_opt(&mig.spec.vm_clone)
        .await
        .map_err(|source| ReconcileError::Get {
            kind: "VMClone",
            name: mig.spec.vm_clone.clone(),
            source,
        })?;
    let Some(clone) = clone else { return Ok(()) };
    if clone.labels().get(NODE_LABEL).map(String::as_str) == Some(target)
        || clone.meta().deletion_timestamp.is_some()
    {
        return Ok(());
    }
    patch_labels(clones, &clone, &[(NODE_LABEL, target)]).await?;
    ctx.event(
        &clone,
        false,
        "Migrated",
        format!("now on node {target} (VMMigration {})", mig.name_any()),
    )
    .await;
    Ok(())
}

pub async fn reconcile(mig: Arc<VMMigration>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = mig
        .namespace()
        .ok_or(ReconcileError::MissingField("metadata.namespace"))?;
    let api: Api<VMMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let status = mig.status.clone().unwrap_or_default();
    let phase = status.phase.map(migration_phase);
    let clones: Api<VMClone> = Api::namespaced(ctx.client.clone(), &ns);
    if phase == Some(MigrationPhase::Succeeded) {
        hand_clone_to_target(&ctx, &clones, &mig, status.target_node.as_deref()).await?;
    }
    if matches!(
        phase,
        Some(MigrationPhase::Succeeded | MigrationPhase::Failed)
    ) {
        ctx.succeeded(mig.as_ref());
        return Ok(Action::await_change());
    }
    let clone = clones
        .get_opt(&mig.spec.vm_clone)
        .await
        .map_err(|source| ReconcileError::Get {
            kind: "VMClone",
            name: mig.spec.vm_clone.clone(),
            source,
        })?;
    let clone_node_name = clone.as_ref().and_then(clone_node);
    let source = status.source_node.clone().or(clone_node_name.clone());
    let target = status.target_node.clone().or(mig.spec.target_node.clone());
    let facts = MigrationFacts {
        phase,
        created: mig
            .meta()
            .creation_timestamp
            .as_ref()
            .map_or_else(Timestamp::now, |t| t.0),
        now: Timestamp::now(),
        timeout_seconds: i64::from(mig.spec.timeout_seconds),
        clone_phase: clone
            .as_ref()
            .map(|c| c.status.as_ref().and_then(|s| s.phase).map(clone_phase)),
        clone_deleting: clone
            .as_ref()
            .is_some_and(|c| c.meta().deletion_timestamp.is_some()),
        clone_node: clone_node_name,
        spec_source: mig.spec.source_node.clone(),
        spec_target: mig.spec.target_node.clone(),
        source: status.source_node.clone(),
        target: status.target_node.clone(),
        source_alive: alive(&ctx, source.as_deref()).await?,
        target_alive: alive(&ctx, target.as_deref()).await?,
    };

    // Placement needs the cluster's node facts: gather them only when the
    // step can ask for a target (under the placement lock until written).
    let needs_target = phase.is_none_or(|p| p == MigrationPhase::Pending)
        && mig.spec.target_node.is_none()
        && clone.is_some();
    let _placing = if needs_target {
        Some(ctx.placement_lock.lock().await)
    } else {
        None
    };
    let candidates = if needs_target {
        let memory = clone
            .as_ref()
            .and_then(|c| ctx.view.image(&ns, &c.spec.live_image))
            .map_or(0, |i| image_memory_bytes(&i));
        Some((ctx.view.node_facts(), memory))
    } else {
        None
    };
    let step = migration_step(&facts, |source| {
        let (nodes, memory) = candidates.clone().unwrap_or_default();
        let placement = clone
            .as_ref()
            .and_then(|c| c.spec.placement.clone())
            .unwrap_or_default();
        let request = PlacementRequest {
            memory_bytes: memory,
            image: clone
                .as_ref()
                .map(|c| ObjectKey::new(&ns, &c.spec.live_image).to_string()),
            image_home: None,
            node_name: None,
            node_selector: placement.node_selector.unwrap_or_default(),
            exclude: vec![source.to_owned()],
        };
        let policy = PlacementPolicy {
            overcommit_ratio: ctx.config.overcommit_ratio,
            now: Timestamp::now(),
        };
        place(&request, &nodes, &policy)
    });

    let mut conditions = status.conditions.clone();
    let action = match step {
        MigrationStep::Nothing => Action::requeue(ctx.config.recheck_interval().min(RETRY * 2)),
        MigrationStep::Wait(message) => {
            if status.message.as_deref() != Some(message.as_str()) {
                set_condition(
                    &mut conditions,
                    condition(
                        "Scheduled",
                        false,
                        "Waiting",
                        &message,
                        mig.meta().generation,
                    ),
                );
                let written = VMMigrationStatus {
                    phase: Some(VMMigrationPhase::Pending),
                    message: Some(message),
                    conditions,
                    observed_generation: mig.meta().generation,
                    ..VMMigrationStatus::default()
                };
                patch_status(&api, mig.as_ref(), &written).await?;
            }
            Action::requeue(RETRY)
        }
        MigrationStep::Fail(message) => {
            set_condition(
                &mut conditions,
                condition(
                    "Succeeded",
                    false,
                    "Failed",
                    &message,
                    mig.meta().generation,
                ),
            );
            let written = VMMigrationStatus {
                phase: Some(VMMigrationPhase::Failed),
                message: Some(message.clone()),
                completion_time: Some(now_time()),
                conditions,
                observed_generation: mig.meta().generation,
                ..VMMigrationStatus::default()
            };
            patch_status(&api, mig.as_ref(), &written).await?;
            ctx.event(mig.as_ref(), true, "MigrationFailed", message)
                .await;
            Action::await_change()
        }
        MigrationStep::Schedule { source, target } => {
            let labelled = patch_labels(
                &api,
                mig.as_ref(),
                &[(NODE_LABEL, &target), (SOURCE_NODE_LABEL, &source)],
            )
            .await?;
            let message = format!("migrating from {source} to {target}");
            set_condition(
                &mut conditions,
                condition(
                    "Scheduled",
                    true,
                    "Scheduled",
                    &message,
                    mig.meta().generation,
                ),
            );
            let written = VMMigrationStatus {
                phase: Some(VMMigrationPhase::Scheduled),
                source_node: Some(source),
                target_node: Some(target.clone()),
                start_time: Some(now_time()),
                message: Some(message.clone()),
                conditions,
                observed_generation: mig.meta().generation,
                ..VMMigrationStatus::default()
            };
            patch_status(&api, &labelled, &written).await?;
            if let Some((_, memory)) = &candidates {
                ctx.view.reserve(
                    Reserved::MigrationTarget,
                    ObjectKey::of(mig.as_ref()),
                    &target,
                    *memory,
                );
            }
            ctx.metrics.placed("VMMigration");
            ctx.event(mig.as_ref(), false, "Scheduled", message).await;
            Action::requeue(RETRY)
        }
    };
    ctx.succeeded(mig.as_ref());
    Ok(action)
}
