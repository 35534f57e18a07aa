//! VMClone reconciler: adds the `vmstream.io/vm-stopped` finalizer, places
//! unplaced clones (label `vmstream.io/node` + status Scheduled), reports
//! clones on nodes with a stale heartbeat as Lost, and on deletion keeps the
//! object until the node daemon reports the VM Stopped (or the node is dead,
//! or the clone never had a node).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use vmstream_api::v1alpha1::{
    LiveImagePhase, VMClone, VMClonePhase, VMMigration, VMMigrationPhase,
};
use vmstream_api::{NODE_LABEL, VM_STOPPED_FINALIZER, condition, set_condition};

use super::Context;
use super::patch::{PhaseStatus, ensure_finalizer, patch_labels, patch_status, remove_finalizer};
use super::translate::{clone_phase, clone_request};
use crate::cluster::clone_node;
use crate::cluster::{ObjectKey, Reserved};
use crate::decide::drain::{DrainFacts, DrainStep, drain_step};
use crate::decide::phase::{CloneFacts, CloneStep, clone_step};
use crate::decide::placement::{PlacementPolicy, place};
use crate::error::ReconcileError;

/// How often an unplaceable clone retries placement.
const UNPLACED_RETRY: Duration = Duration::from_secs(2);

/// How long a clone created already placed waits for its daemon's first
/// status before the operator writes phase Scheduled itself.
const DAEMON_GRACE: Duration = Duration::from_secs(3);

/// True when `clone` was created more than `age` ago (creation timestamps
/// have second resolution, so this errs on the late side).
fn older_than(clone: &VMClone, age: Duration) -> bool {
    clone
        .meta()
        .creation_timestamp
        .as_ref()
        .is_none_or(|t| Timestamp::now().duration_since(t.0).unsigned_abs().gt(&age))
}

pub async fn reconcile(clone: Arc<VMClone>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = clone
        .namespace()
        .ok_or(ReconcileError::MissingField("metadata.namespace"))?;
    let api: Api<VMClone> = Api::namespaced(ctx.client.clone(), &ns);
    let deleting = clone.meta().deletion_timestamp.is_some();
    let node = clone_node(&clone);
    let alive = node.as_deref().is_some_and(|n| ctx.view.node_alive(n));
    let facts = CloneFacts {
        phase: clone.status.as_ref().and_then(|s| s.phase).map(clone_phase),
        node: node.clone(),
        node_alive: alive,
        deletion_requested: deleting,
    };
    let clone = if deleting {
        clone.as_ref().clone()
    } else {
        ensure_finalizer(&api, clone.as_ref(), VM_STOPPED_FINALIZER).await?
    };

    let action = match clone_step(&facts) {
        CloneStep::ReleaseFinalizer => {
            remove_finalizer(&api, &clone, VM_STOPPED_FINALIZER).await?;
            Action::await_change()
        }
        CloneStep::WaitForStop => Action::requeue(ctx.config.recheck_interval()),
        CloneStep::MarkLost => {
            let node = node.unwrap_or_default();
            let message = format!("node {node} heartbeat is stale");
            write_phase(
                &api,
                &clone,
                VMClonePhase::Lost,
                Some(&node),
                &message,
                "NodeLost",
            )
            .await?;
            ctx.event(&clone, true, "Lost", message).await;
            Action::requeue(ctx.config.recheck_interval())
        }
        CloneStep::Place => place_clone(&ctx, &api, &clone, &ns).await?,
        CloneStep::Nothing => {
            // A placement interrupted between the label and the status write
            // is completed here.
            let status_node = clone.status.as_ref().and_then(|s| s.node.clone());
            // A pool places its new clones when it creates them (label
            // set at creation) and their daemon normally reports Starting
            // at once; only a clone its daemon has not reported on for
            // DAEMON_GRACE (or a placement interrupted between the label
            // and the status write) gets status Scheduled here, so the
            // common path makes no write racing the daemon's.
            if let (Some(n), None) = (&node, &status_node)
                && matches!(clone.phase(), VMClonePhase::Pending)
                && older_than(&clone, DAEMON_GRACE)
            {
                write_phase(&api, &clone, VMClonePhase::Scheduled, Some(n), "", "Placed").await?;
            }
            if alive && clone.phase() == VMClonePhase::Running && !deleting {
                drain_if_needed(&ctx, &clone, &ns, node.as_deref()).await?;
            }
            if clone.phase().is_terminal() {
                Action::await_change()
            } else {
                Action::requeue(ctx.config.recheck_interval())
            }
        }
    };
    ctx.succeeded(&clone);
    Ok(action)
}

async fn write_phase(
    api: &Api<VMClone>,
    clone: &VMClone,
    phase: VMClonePhase,
    node: Option<&str>,
    message: &str,
    reason: &str,
) -> Result<(), ReconcileError> {
    let mut conditions = clone
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let scheduled = node.is_some();
    set_condition(
        &mut conditions,
        condition(
            "Scheduled",
            scheduled && phase != VMClonePhase::Lost,
            reason,
            message,
            clone.meta().generation,
        ),
    );
    let status = PhaseStatus {
        phase,
        node,
        message: (!message.is_empty()).then_some(message),
        conditions: &conditions,
        observed_generation: clone.meta().generation,
    };
    patch_status(api, clone, &status).await?;
    Ok(())
}

async fn place_clone(
    ctx: &Context,
    api: &Api<VMClone>,
    clone: &VMClone,
    ns: &str,
) -> Result<Action, ReconcileError> {
    let image_name = &clone.spec.live_image;
    let image = ctx.view.image(ns, image_name);
    let wait = |message: String| async move {
        if clone.status.as_ref().and_then(|s| s.message.as_deref()) != Some(message.as_str()) {
            write_phase(
                api,
                clone,
                VMClonePhase::Pending,
                None,
                &message,
                "Unschedulable",
            )
            .await?;
        }
        Ok::<_, ReconcileError>(Action::requeue(UNPLACED_RETRY))
    };
    let Some(image) = image else {
        return wait(format!("LiveImage {image_name} not found")).await;
    };
    if image.phase() != LiveImagePhase::Ready {
        return wait(format!("waiting for LiveImage {image_name} to be Ready")).await;
    }
    let request = clone_request(ns, &image, clone.spec.placement.as_ref());
    let policy = PlacementPolicy {
        overcommit_ratio: ctx.config.overcommit_ratio,
        now: Timestamp::now(),
    };
    let placing = ctx.placement_lock.lock().await;
    let nodes = ctx.view.node_facts();
    match place(&request, &nodes, &policy) {
        Ok(node) => {
            let labelled = patch_labels(api, clone, &[(NODE_LABEL, &node)]).await?;
            ctx.view.reserve(
                Reserved::Clone,
                ObjectKey::of(clone),
                &node,
                request.memory_bytes,
            );
            drop(placing);
            write_phase(
                api,
                &labelled,
                VMClonePhase::Scheduled,
                Some(&node),
                "",
                "Placed",
            )
            .await?;
            ctx.metrics.placed("VMClone");
            ctx.event(clone, false, "Placed", format!("placed on node {node}"))
                .await;
            Ok(Action::requeue(ctx.config.recheck_interval()))
        }
        Err(why) => {
            drop(placing);
            let message = why.to_string();
            if clone.status.as_ref().and_then(|s| s.message.as_deref()) != Some(message.as_str()) {
                ctx.event(clone, true, "FailedPlacement", message.clone())
                    .await;
            }
            wait(message).await
        }
    }
}

/// Node drain: a Running clone on a VMNode marked for maintenance gets a
/// VMMigration that moves it elsewhere (the operator picks the target).
async fn drain_if_needed(
    ctx: &Context,
    clone: &VMClone,
    ns: &str,
    node: Option<&str>,
) -> Result<(), ReconcileError> {
    let Some(node) = node else { return Ok(()) };
    let in_maintenance = ctx
        .view
        .node(node)
        .is_some_and(|n| crate::cluster::in_maintenance(&n));
    if !in_maintenance {
        return Ok(());
    }
    let migrations: Api<VMMigration> = Api::namespaced(ctx.client.clone(), ns);
    // From the cache: a drain migration it does not show yet is refused by
    // the API server as a duplicate name (409) below.
    let cached: Vec<_> = ctx
        .view
        .migrations
        .state()
        .into_iter()
        .filter(|m| m.namespace().as_deref() == Some(ns))
        .collect();
    let name = clone.name_any();
    let drain_name = crate::decide::drain::drain_migration_name(&name, node);
    let facts = DrainFacts {
        running: true,
        node: Some(node.to_string()),
        node_in_maintenance: true,
        deleting: false,
        migration_in_flight: cached.iter().any(|m| {
            m.spec.vm_clone == name
                && !matches!(
                    m.phase(),
                    VMMigrationPhase::Succeeded | VMMigrationPhase::Failed
                )
        }),
        drain_migration_exists: cached.iter().any(|m| m.name_any() == drain_name),
    };
    if let DrainStep::Migrate {
        name: migration,
        from,
    } = drain_step(&name, &facts)
    {
        let body: VMMigration = serde_json::from_value(json!({
            "apiVersion": vmstream_api::API_VERSION,
            "kind": "VMMigration",
            "metadata": { "name": migration, "namespace": ns },
            "spec": { "vmClone": name, "sourceNode": from },
        }))
        .expect("a VMMigration built from valid fields always deserializes");
        match migrations.create(&Default::default(), &body).await {
            Ok(_) => {
                ctx.event(
                    clone,
                    false,
                    "Draining",
                    format!("node {from} is in maintenance: migrating"),
                )
                .await;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(source) => {
                return Err(ReconcileError::Create {
                    kind: "VMMigration",
                    owner: name,
                    source,
                });
            }
        }
    }
    Ok(())
}
