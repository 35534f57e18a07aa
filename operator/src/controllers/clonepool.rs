//! ClonePool reconciler: keeps `spec.replicas` live VMClones, removes extra
//! ones in scale-in order, replaces Lost and Failed ones, and reports
//! replicas/readyReplicas/labelSelector for the `/scale` subresource.
//!
//! Our local control plane runs no garbage collector, so a pool carries the
//! finalizer [`POOL_FINALIZER`] and deletes its clones itself before it goes.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use vmstream_api::v1alpha1::{
    ClonePool, ScaleInPolicy as ApiScaleInPolicy, VMClone, VMClonePhase, VMCloneSpec,
};
use vmstream_api::{POOL_LABEL, condition, pool_label_selector, set_condition};

use super::{Context, ensure_finalizer, patch_own_status, remove_finalizer};
use crate::decide::phase::ClonePhase;
use crate::decide::scale_in::{PoolMember, ScaleInPolicy, choose_victims};
use crate::error::ReconcileError;

/// Finalizer on a ClonePool until all of its VMClones are gone.
pub const POOL_FINALIZER: &str = "vmstream.io/pool-clones";

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

fn owner_reference(pool: &ClonePool) -> Result<OwnerReference, ReconcileError> {
    let mut owner = pool
        .controller_owner_ref(&())
        .ok_or(ReconcileError::MissingField("metadata.uid"))?;
    owner.block_owner_deletion = Some(true);
    Ok(owner)
}

/// The pool's clones: labelled for it and owned by this very pool (a
/// recreated pool of the same name does not adopt its predecessor's clones).
pub async fn pool_clones(
    api: &Api<VMClone>,
    pool: &ClonePool,
) -> Result<Vec<VMClone>, ReconcileError> {
    let uid = pool.uid();
    let list = api
        .list(&ListParams::default().labels(&pool_label_selector(&pool.name_any())))
        .await
        .map_err(|source| ReconcileError::List {
            kind: "VMClone",
            source,
        })?;
    Ok(list
        .items
        .into_iter()
        .filter(|c| {
            c.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
        })
        .collect())
}

async fn delete_clone(api: &Api<VMClone>, name: &str) -> Result<(), ReconcileError> {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ReconcileError::Delete {
            kind: "VMClone",
            name: name.into(),
            source,
        }),
    }
}

fn new_clone(pool: &ClonePool) -> Result<VMClone, ReconcileError> {
    let template = pool.spec.template.clone().unwrap_or_default();
    let mut labels = template.labels;
    labels.insert(POOL_LABEL.into(), pool.name_any());
    Ok(VMClone {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", pool.name_any())),
            namespace: pool.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner_reference(pool)?]),
            ..ObjectMeta::default()
        },
        spec: VMCloneSpec {
            live_image: pool.spec.live_image.clone(),
            placement: template.placement,
            memory_backend: template.memory_backend,
            identity: None,
        },
        status: None,
    })
}

pub async fn reconcile(pool: Arc<ClonePool>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = pool
        .namespace()
        .ok_or(ReconcileError::MissingField("metadata.namespace"))?;
    let pools: Api<ClonePool> = Api::namespaced(ctx.client.clone(), &ns);
    let clones_api: Api<VMClone> = Api::namespaced(ctx.client.clone(), &ns);
    let clones = pool_clones(&clones_api, &pool).await?;

    if pool.meta().deletion_timestamp.is_some() {
        for clone in clones
            .iter()
            .filter(|c| c.meta().deletion_timestamp.is_none())
        {
            delete_clone(&clones_api, &clone.name_any()).await?;
        }
        if clones.is_empty() {
            remove_finalizer(&pools, pool.as_ref(), POOL_FINALIZER).await?;
            ctx.succeeded(pool.as_ref());
            return Ok(Action::await_change());
        }
        ctx.succeeded(pool.as_ref());
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let pool = ensure_finalizer(&pools, pool.as_ref(), POOL_FINALIZER).await?;

    // Lost and Failed clones are replaced: delete them, do not count them.
    let mut live: Vec<&VMClone> = Vec::new();
    for clone in clones
        .iter()
        .filter(|c| c.meta().deletion_timestamp.is_none())
    {
        if matches!(clone.phase(), VMClonePhase::Lost | VMClonePhase::Failed) {
            delete_clone(&clones_api, &clone.name_any()).await?;
            ctx.event(
                &pool,
                true,
                "ReplacingClone",
                format!("deleting {} VMClone {}", clone.phase(), clone.name_any()),
            )
            .await;
        } else {
            live.push(clone);
        }
    }

    let desired = usize::try_from(pool.spec.replicas.max(0)).unwrap_or(0);
    let mut count = live.len();
    if count < desired {
        let template = new_clone(&pool)?;
        let missing = desired - count;
        for _ in 0..missing {
            let created = clones_api
                .create(&PostParams::default(), &template)
                .await
                .map_err(|source| ReconcileError::Create {
                    kind: "VMClone",
                    owner: pool.name_any(),
                    source,
                })?;
            count += 1;
            tracing::info!(pool = %pool.name_any(), clone = %created.name_any(), "created clone");
        }
        ctx.event(
            &pool,
            false,
            "ScaledUp",
            format!("created {} VMClone(s), now {count}", desired - live.len()),
        )
        .await;
    } else if count > desired {
        let members: Vec<PoolMember> = live
            .iter()
            .map(|c| PoolMember {
                name: c.name_any(),
                created: c
                    .meta()
                    .creation_timestamp
                    .as_ref()
                    .map_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH, |t| t.0),
                phase: c.status.as_ref().and_then(|s| s.phase).map(clone_phase),
            })
            .collect();
        let policy = match pool.spec.scale_in_policy {
            ApiScaleInPolicy::PendingThenNewest => ScaleInPolicy::PendingThenNewest,
            ApiScaleInPolicy::PendingThenOldest => ScaleInPolicy::PendingThenOldest,
        };
        let victims = choose_victims(&members, count - desired, policy);
        for name in &victims {
            delete_clone(&clones_api, name).await?;
            count -= 1;
        }
        ctx.event(
            &pool,
            false,
            "ScaledDown",
            format!("deleted VMClone(s) {}, now {count}", victims.join(", ")),
        )
        .await;
    }

    let ready = live
        .iter()
        .filter(|c| c.phase() == VMClonePhase::Running)
        .count()
        .min(count);
    let mut conditions = pool
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let all_ready = ready == desired;
    set_condition(
        &mut conditions,
        condition(
            "Ready",
            all_ready,
            if all_ready {
                "AllReplicasReady"
            } else {
                "ReplicasNotReady"
            },
            &format!("{ready}/{desired} VMClones running"),
            pool.meta().generation,
        ),
    );
    let status = json!({
        "replicas": count,
        "readyReplicas": ready,
        "labelSelector": pool_label_selector(&pool.name_any()),
        "observedGeneration": pool.meta().generation,
        "conditions": conditions,
    });
    let current = pool.status.clone().unwrap_or_default();
    let unchanged = current.replicas as usize == count
        && current.ready_replicas as usize == ready
        && current.label_selector.is_some()
        && current.observed_generation == pool.meta().generation
        && current.conditions == conditions;
    if !unchanged {
        patch_own_status(&pools, &pool, status).await?;
    }
    ctx.succeeded(&pool);
    Ok(Action::requeue(ctx.config.recheck_interval() * 4))
}
