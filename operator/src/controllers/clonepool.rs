//! ClonePool reconciler: keeps `spec.replicas` live VMClones, removes extra
//! ones in scale-in order, replaces Lost and Failed ones, and reports
//! replicas/readyReplicas/labelSelector for the `/scale` subresource.
//!
//! Our local control plane runs no garbage collector, so a pool carries the
//! finalizer [`POOL_FINALIZER`] and deletes its clones itself before it goes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use vmstream_api::v1alpha1::{
    ClonePool, ClonePoolStatus, LiveImagePhase, ScaleInPolicy as ApiScaleInPolicy, VMClone,
    VMClonePhase, VMCloneSpec,
};
use vmstream_api::{
    NODE_LABEL, POOL_LABEL, VM_STOPPED_FINALIZER, condition, pool_label_selector, set_condition,
};

use super::Context;
use super::patch::{ensure_finalizer, patch_own_status, remove_finalizer};
use super::translate::{clone_phase, clone_request};
use crate::cluster::{ObjectKey, Reserved};
use crate::decide::placement::{PlacementPolicy, place_batch};
use crate::decide::scale_in::{PoolMember, ScaleInPolicy, choose_victims};
use crate::error::ReconcileError;

/// Finalizer on a ClonePool until all of its VMClones are gone.
pub const POOL_FINALIZER: &str = "vmstream.io/pool-clones";

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

/// At most this many VMClone creations in flight at once.
const CREATE_CONCURRENCY: usize = 16;

/// What one scale-up created.
#[derive(Debug, Default)]
struct Created {
    total: usize,
    /// How many went to each node (`None`: left unplaced).
    per_node: BTreeMap<Option<String>, usize>,
}

impl Created {
    fn summary(&self) -> String {
        self.per_node
            .iter()
            .map(|(node, n)| format!("{}: {n}", node.as_deref().unwrap_or("unplaced")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Creates `missing` clones of `pool`, placed together: when the image is
/// Ready every clone is created already labelled for its node (decided in
/// one pass over the cached node facts, reserved until the caches show it),
/// concurrently (at most [`CREATE_CONCURRENCY`] at once). Clones no node
/// fits are created unplaced; the VMClone reconciler keeps trying them.
async fn scale_up(
    ctx: &Context,
    api: &Api<VMClone>,
    pool: &ClonePool,
    ns: &str,
    missing: usize,
) -> Result<Created, ReconcileError> {
    let started = Instant::now();
    let template = new_clone(pool)?;
    let image = ctx
        .view
        .image(ns, &pool.spec.live_image)
        .filter(|i| i.phase() == LiveImagePhase::Ready);
    let placing = ctx.placement_lock.lock().await;
    let (plan, memory) = match &image {
        Some(image) => {
            let template_spec = pool.spec.template.clone().unwrap_or_default();
            let request = clone_request(ns, image, template_spec.placement.as_ref());
            let policy = PlacementPolicy {
                overcommit_ratio: ctx.config.overcommit_ratio,
                now: Timestamp::now(),
            };
            let plan = place_batch(&request, &ctx.view.node_facts(), &policy, missing)
                .into_iter()
                .map(Result::ok)
                .collect();
            (plan, request.memory_bytes)
        }
        None => (vec![None; missing], 0),
    };
    let decided = started.elapsed();
    let results: Vec<Result<(VMClone, Option<String>), ReconcileError>> =
        futures::stream::iter(plan)
            .map(|node| {
                let mut body = template.clone();
                if let Some(node) = &node {
                    body.labels_mut().insert(NODE_LABEL.into(), node.clone());
                    body.finalizers_mut().push(VM_STOPPED_FINALIZER.into());
                }
                async move {
                    let created =
                        api.create(&PostParams::default(), &body)
                            .await
                            .map_err(|source| ReconcileError::Create {
                                kind: "VMClone",
                                owner: pool.name_any(),
                                source,
                            })?;
                    Ok((created, node))
                }
            })
            .buffer_unordered(CREATE_CONCURRENCY)
            .collect()
            .await;
    let mut created = Created::default();
    let mut first_error = None;
    for result in results {
        match result {
            Ok((clone, node)) => {
                if let Some(node) = &node {
                    ctx.view
                        .reserve(Reserved::Clone, ObjectKey::of(&clone), node, memory);
                    ctx.metrics.placed("VMClone");
                }
                created.total += 1;
                *created.per_node.entry(node).or_default() += 1;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    drop(placing);
    tracing::info!(
        pool = %pool.name_any(),
        created = created.total,
        placed = %created.summary(),
        decide_ms = decided.as_secs_f64() * 1000.0,
        total_ms = started.elapsed().as_secs_f64() * 1000.0,
        "scaled up"
    );
    match first_error {
        Some(e) if created.total == 0 => Err(e),
        Some(e) => {
            tracing::warn!(pool = %pool.name_any(), error = %e, "some clones were not created");
            Ok(created)
        }
        None => Ok(created),
    }
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
        let created = scale_up(&ctx, &clones_api, &pool, &ns, desired - count).await?;
        count += created.total;
        ctx.event(
            &pool,
            false,
            "ScaledUp",
            format!(
                "created {} VMClone(s) ({}), now {count}",
                created.total,
                created.summary()
            ),
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
    let status = ClonePoolStatus {
        replicas: i32::try_from(count).unwrap_or(i32::MAX),
        ready_replicas: i32::try_from(ready).unwrap_or(i32::MAX),
        label_selector: Some(pool_label_selector(&pool.name_any())),
        observed_generation: pool.meta().generation,
        conditions,
    };
    let current = pool.status.clone().unwrap_or_default();
    let unchanged = current.replicas as usize == count
        && current.ready_replicas as usize == ready
        && current.label_selector.is_some()
        && current.observed_generation == pool.meta().generation
        && current.conditions == status.conditions;
    // While clones come up one after another only readyReplicas moves:
    // those writes are spaced READY_STATUS_SPACING apart (the last one is
    // written when the requeue comes), so a burst of starts is not
    // answered by a burst of pool writes and re-lists.
    let only_readiness = current.replicas as usize == count
        && current.label_selector.is_some()
        && current.observed_generation == pool.meta().generation;
    if !unchanged {
        let wait = ctx.status_write_wait(&pool, READY_STATUS_SPACING);
        if let (true, Some(wait)) = (only_readiness, wait) {
            ctx.succeeded(&pool);
            return Ok(Action::requeue(wait));
        }
        patch_own_status(&pools, &pool, &status).await?;
        ctx.status_written(&pool);
    }
    ctx.succeeded(&pool);
    Ok(Action::requeue(ctx.config.recheck_interval() * 4))
}

/// Least time between two pool status writes that only change readiness.
const READY_STATUS_SPACING: Duration = Duration::from_millis(250);
