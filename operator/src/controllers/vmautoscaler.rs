//! VMAutoscaler reconciler: reads the pool's clones and their usage from the
//! VMNodes' `status.vms`, runs the HPA algorithm ([`crate::decide::autoscale`]),
//! writes the replica count through the ClonePool's `/scale` subresource and
//! records metrics, recommendations and scale events in status (the history
//! the stabilization windows and rate policies need survives restarts).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::autoscaling::v1::Scale;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;
use vmstream_api::v1alpha1::{
    self as api, ClonePool, MetricType, ScalingPolicyType, VMAutoscaler, VMClonePhase, VMNode,
};
use vmstream_api::{condition, set_condition};

use super::clonepool::pool_clones;
use super::patch::{ConditionsStatus, patch_own_status, patch_params};
use super::{Context, now_time};
use crate::cluster::ObjectKey;
use crate::decide::autoscale::{
    self, AutoscaleInput, CloneReadiness, CloneSample, MetricSource, MetricSpec, MetricTarget,
    PolicyKind, Recommendation, ScaleEvent, ScalingPolicy, ScalingRules, SelectPolicy, VmUsage,
};
use crate::error::ReconcileError;

fn rules(r: Option<&api::ScalingRules>) -> Option<ScalingRules> {
    r.map(|r| ScalingRules {
        stabilization_window_seconds: r.stabilization_window_seconds,
        select_policy: r.select_policy.map(|s| match s {
            api::SelectPolicy::Max => SelectPolicy::Max,
            api::SelectPolicy::Min => SelectPolicy::Min,
            api::SelectPolicy::Disabled => SelectPolicy::Disabled,
        }),
        // An empty list means "not given": the k8s defaults apply.
        policies: (!r.policies.is_empty()).then(|| {
            r.policies
                .iter()
                .map(|p| ScalingPolicy {
                    kind: match p.type_ {
                        ScalingPolicyType::Replicas => PolicyKind::Replicas,
                        ScalingPolicyType::Percent => PolicyKind::Percent,
                    },
                    value: p.value,
                    period_seconds: p.period_seconds,
                })
                .collect()
        }),
    })
}

fn metric_spec(m: &api::MetricSpec) -> MetricSpec {
    MetricSpec {
        source: match m.type_ {
            MetricType::Cpu => MetricSource::Cpu,
            MetricType::Memory => MetricSource::Memory,
            MetricType::Custom => MetricSource::Custom(m.name.clone().unwrap_or_default()),
        },
        target: match (m.target.average_utilization, m.target.average_value) {
            (Some(u), _) => MetricTarget::AverageUtilization(u),
            (None, Some(v)) => MetricTarget::AverageValue(v),
            (None, None) => MetricTarget::AverageUtilization(100),
        },
    }
}

fn readiness(clone: &api::VMClone) -> CloneReadiness {
    if clone.meta().deletion_timestamp.is_some() {
        return CloneReadiness::Gone;
    }
    match clone.phase() {
        VMClonePhase::Running | VMClonePhase::Migrating => CloneReadiness::Running,
        VMClonePhase::Pending | VMClonePhase::Scheduled | VMClonePhase::Starting => {
            CloneReadiness::NotYetRunning
        }
        VMClonePhase::Stopping
        | VMClonePhase::Stopped
        | VMClonePhase::Lost
        | VMClonePhase::Failed => CloneReadiness::Gone,
    }
}

fn metric_status(m: &autoscale::MetricStatus) -> api::MetricStatus {
    let (type_, name) = match &m.source {
        MetricSource::Cpu => (MetricType::Cpu, None),
        MetricSource::Memory => (MetricType::Memory, None),
        MetricSource::Custom(n) => (MetricType::Custom, Some(n.clone())),
    };
    api::MetricStatus {
        type_,
        name,
        average_value: m.average_value,
        average_utilization: m.average_utilization,
    }
}

/// The status an autoscaler pass writes. Every field is written, the lists
/// even when empty and `lastScaleTime` as null when unset: a merge patch
/// replaces them, so scale events that left every window are dropped.
#[derive(Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct PassStatus<'a> {
    current_replicas: i32,
    desired_replicas: i32,
    current_metrics: Vec<api::MetricStatus>,
    last_scale_time: Option<Time>,
    recommendations: Vec<api::Recommendation>,
    scale_events: Vec<api::ScaleEvent>,
    conditions: &'a [Condition],
    observed_generation: Option<i64>,
}

pub async fn reconcile(
    vmas: Arc<VMAutoscaler>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let ns = vmas
        .namespace()
        .ok_or(ReconcileError::MissingField("metadata.namespace"))?;
    if let Some(wait) = ctx.pass_due(vmas.as_ref(), ctx.config.autoscale_interval) {
        return Ok(Action::requeue(wait));
    }
    let api: Api<VMAutoscaler> = Api::namespaced(ctx.client.clone(), &ns);
    let pools: Api<ClonePool> = Api::namespaced(ctx.client.clone(), &ns);
    let every = Action::requeue(ctx.config.autoscale_interval);
    let status = vmas.status.clone().unwrap_or_default();
    let mut conditions = status.conditions.clone();
    let generation = vmas.meta().generation;
    let target = &vmas.spec.scale_target_ref.name;

    let pool = pools
        .get_opt(target)
        .await
        .map_err(|source| ReconcileError::Get {
            kind: "ClonePool",
            name: target.clone(),
            source,
        })?;
    let Some(pool) = pool else {
        set_condition(
            &mut conditions,
            condition(
                "AbleToScale",
                false,
                "FailedGetScale",
                &format!("ClonePool {target} not found"),
                generation,
            ),
        );
        if conditions != status.conditions {
            let written = ConditionsStatus {
                conditions: &conditions,
            };
            patch_own_status(&api, vmas.as_ref(), &written).await?;
        }
        ctx.succeeded(vmas.as_ref());
        return Ok(every);
    };

    let clones = pool_clones(&Api::namespaced(ctx.client.clone(), &ns), &pool).await?;
    let nodes = Api::<VMNode>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|source| ReconcileError::List {
            kind: "VMNode",
            source,
        })?;
    let usage: BTreeMap<ObjectKey, VmUsage> = nodes
        .items
        .iter()
        .flat_map(|n| n.status.iter().flat_map(|s| s.vms.iter()))
        .map(|vm| {
            (
                ObjectKey::new(&vm.namespace, &vm.name),
                VmUsage {
                    cpu_utilization: vm.cpu_utilization,
                    memory_bytes: vm.memory_bytes,
                    resident_bytes: vm.resident_bytes,
                    request_rate: vm.request_rate,
                },
            )
        })
        .collect();
    let samples = clones
        .iter()
        .map(|c| CloneSample {
            name: c.name_any(),
            readiness: readiness(c),
            usage: usage.get(&ObjectKey::of(c)).copied(),
        })
        .collect();
    let behavior = vmas.spec.behavior.clone().unwrap_or_default();
    let input = AutoscaleInput {
        spec_replicas: pool.spec.replicas,
        min_replicas: vmas.spec.min_replicas,
        max_replicas: vmas.spec.max_replicas,
        metrics: vmas.spec.metrics.iter().map(metric_spec).collect(),
        scale_up: autoscale::resolve_scale_up(rules(behavior.scale_up.as_ref()).as_ref()),
        scale_down: autoscale::resolve_scale_down(rules(behavior.scale_down.as_ref()).as_ref()),
        tolerance: vmas.spec.tolerance,
        clones: samples,
        recommendations: status
            .recommendations
            .iter()
            .map(|r| Recommendation {
                timestamp: r.timestamp.0,
                replicas: r.replicas,
            })
            .collect(),
        scale_events: status
            .scale_events
            .iter()
            .map(|e| ScaleEvent {
                timestamp: e.timestamp.0,
                change: e.change,
            })
            .collect(),
        now: Timestamp::now(),
    };
    let decision = autoscale::decide(&input);

    let mut last_scale_time = status.last_scale_time.clone();
    if decision.rescale {
        let patch = json!({ "spec": { "replicas": decision.desired_replicas } });
        let _: Scale = pools
            .patch_scale(target, &patch_params(), &Patch::Merge(&patch))
            .await
            .map_err(|source| ReconcileError::Patch {
                kind: "ClonePool",
                what: "scale",
                name: target.clone(),
                source,
            })?;
        last_scale_time = Some(now_time());
        let direction = if decision.desired_replicas > decision.current_replicas {
            "up"
        } else {
            "down"
        };
        ctx.metrics.scaled(direction);
        ctx.event(
            vmas.as_ref(),
            false,
            "SuccessfulRescale",
            format!(
                "New size: {}; reason: {}",
                decision.desired_replicas,
                if decision.reason.is_empty() {
                    "-"
                } else {
                    &decision.reason
                }
            ),
        )
        .await;
    } else {
        ctx.metrics.scaled("none");
    }
    for c in &decision.conditions {
        set_condition(
            &mut conditions,
            condition(c.type_, c.status, c.reason, &c.message, generation),
        );
    }
    let written = PassStatus {
        current_replicas: decision.current_replicas,
        desired_replicas: decision.desired_replicas,
        current_metrics: decision.metrics.iter().map(metric_status).collect(),
        last_scale_time,
        recommendations: decision
            .recommendations
            .iter()
            .map(|r| api::Recommendation {
                timestamp: Time(r.timestamp),
                replicas: r.replicas,
            })
            .collect(),
        scale_events: decision
            .scale_events
            .iter()
            .map(|e| api::ScaleEvent {
                timestamp: Time(e.timestamp),
                change: e.change,
            })
            .collect(),
        conditions: &conditions,
        observed_generation: generation,
    };
    patch_own_status(&api, vmas.as_ref(), &written).await?;
    ctx.succeeded(vmas.as_ref());
    Ok(every)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pass_status(conditions: &[Condition], scaled: bool) -> PassStatus<'_> {
        let at = Time("2026-01-01T00:00:00Z".parse().unwrap());
        PassStatus {
            current_replicas: 2,
            desired_replicas: 3,
            current_metrics: vec![api::MetricStatus {
                type_: MetricType::Cpu,
                name: None,
                average_value: 75.0,
                average_utilization: Some(75),
            }],
            last_scale_time: scaled.then(|| at.clone()),
            recommendations: vec![api::Recommendation {
                timestamp: at.clone(),
                replicas: 3,
            }],
            scale_events: if scaled {
                vec![api::ScaleEvent {
                    timestamp: at,
                    change: 1,
                }]
            } else {
                Vec::new()
            },
            conditions,
            observed_generation: Some(4),
        }
    }

    /// Every key a pass writes is a field of VMAutoscalerStatus.
    #[test]
    fn pass_status_fields_are_autoscaler_status_fields() {
        let conditions = [condition(
            "AbleToScale",
            true,
            "SucceededRescale",
            "",
            Some(4),
        )];
        let written = serde_json::to_value(pass_status(&conditions, true)).unwrap();
        let read: api::VMAutoscalerStatus = serde_json::from_value(written.clone()).unwrap();
        assert_eq!(written, serde_json::to_value(read).unwrap());
    }

    #[test]
    fn a_pass_clears_old_scale_events_and_unset_scale_time() {
        let written = serde_json::to_value(pass_status(&[], false)).unwrap();
        assert_eq!(written["scaleEvents"], json!([]));
        assert_eq!(written["lastScaleTime"], json!(null));
        assert_eq!(written["conditions"], json!([]));
    }
}
