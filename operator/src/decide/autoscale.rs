//! Autoscaling: the Kubernetes HorizontalPodAutoscaler algorithm, applied to
//! a ClonePool's VMClones and the per-VM metrics the node daemons publish.
//!
//! The semantics follow k8s `pkg/controller/podautoscaler` (`horizontal.go`,
//! `replica_calculator.go`) step by step; the one deliberate difference is
//! where the history lives: the HPA keeps recommendations and scale events in
//! controller memory, we keep them in the VMAutoscaler's status so a restart
//! or a change of leader does not forget a stabilization window.
//!
//! 1. `scale.spec.replicas == 0 && minReplicas != 0`: scaling disabled.
//!    `current > max` → `max`; `current < min` → `min` (no metrics needed).
//! 2. Per metric ([`replicas_for_metric`]): clones are grouped like pods in
//!    `groupPods`: *ignored* (deletion requested, Stopping/Stopped/Failed/Lost),
//!    *unready* (not yet Running: Pending/Scheduled/Starting), *missing*
//!    (Running but no sample in any VMNode), *ready* (has a sample).
//!    `ratio = current / target`; without missing or unready clones:
//!    `|ratio − 1| ≤ tolerance` keeps the current count, else
//!    `ceil(ratio × ready)`. With missing clones: on scale-down they count as
//!    using the target (utilization metrics: `max(100 %, target)` of their
//!    request), on scale-up as 0; on scale-up unready clones count as 0; the
//!    ratio is recomputed and the count kept when that ratio is within
//!    tolerance or flips the direction.
//! 3. The proposal is the max over metrics. A metric that cannot be computed
//!    (no clone has a sample) is invalid; when all are invalid, or some are
//!    and the rest would scale down, nothing changes.
//! 4. Behaviours (`normalizeDesiredReplicasWithBehaviors`): stabilization
//!    (scale-up: min of recommendations inside the window; scale-down: max),
//!    then rate policies over the scale events inside each policy's period,
//!    combined by selectPolicy (Max/Min/Disabled), then min/max.
//!
//! Not modelled: the HPA's CPU initialization period (clones have no
//! readiness probe; a clone counts as ready once Running with a sample).

use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// Default tolerance, as `--horizontal-pod-autoscaler-tolerance`.
pub const DEFAULT_TOLERANCE: f64 = 0.1;
/// Default scale-down stabilization, as
/// `--horizontal-pod-autoscaler-downscale-stabilization`.
pub const DEFAULT_SCALE_DOWN_WINDOW_SECONDS: i64 = 300;

/// What a metric measures.
#[derive(Clone, Debug, PartialEq)]
pub enum MetricSource {
    /// vCPU use; utilization is in percent of one vCPU, a value in vCPUs.
    Cpu,
    /// Resident memory; utilization is in percent of the VM's memory, a
    /// value in bytes.
    Memory,
    /// A per-VM custom metric by name; only `requestRate` is published.
    Custom(String),
}

/// The target of a metric.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetricTarget {
    AverageUtilization(i32),
    AverageValue(f64),
}

#[derive(Clone, Debug, PartialEq)]
pub struct MetricSpec {
    pub source: MetricSource,
    pub target: MetricTarget,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    Replicas,
    Percent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScalingPolicy {
    pub kind: PolicyKind,
    pub value: i32,
    pub period_seconds: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectPolicy {
    Max,
    Min,
    Disabled,
}

/// `ScalingRules` as the user wrote them: every field optional.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScalingRules {
    pub stabilization_window_seconds: Option<i32>,
    pub select_policy: Option<SelectPolicy>,
    pub policies: Option<Vec<ScalingPolicy>>,
}

/// Rules with the k8s defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedRules {
    pub stabilization_window_seconds: i64,
    pub select_policy: SelectPolicy,
    pub policies: Vec<ScalingPolicy>,
}

/// k8s `GenerateHPAScaleUpRules`: window 0, Max of (4 replicas, 100 %) per 15 s.
pub fn resolve_scale_up(rules: Option<&ScalingRules>) -> ResolvedRules {
    let rules = rules.cloned().unwrap_or_default();
    ResolvedRules {
        stabilization_window_seconds: rules.stabilization_window_seconds.unwrap_or(0).into(),
        select_policy: rules.select_policy.unwrap_or(SelectPolicy::Max),
        policies: rules.policies.unwrap_or_else(|| {
            vec![
                ScalingPolicy {
                    kind: PolicyKind::Replicas,
                    value: 4,
                    period_seconds: 15,
                },
                ScalingPolicy {
                    kind: PolicyKind::Percent,
                    value: 100,
                    period_seconds: 15,
                },
            ]
        }),
    }
}

/// k8s `GenerateHPAScaleDownRules`: window from the controller default
/// (300 s), Max of (100 %) per 15 s.
pub fn resolve_scale_down(rules: Option<&ScalingRules>) -> ResolvedRules {
    let rules = rules.cloned().unwrap_or_default();
    ResolvedRules {
        stabilization_window_seconds: rules
            .stabilization_window_seconds
            .map_or(DEFAULT_SCALE_DOWN_WINDOW_SECONDS, i64::from),
        select_policy: rules.select_policy.unwrap_or(SelectPolicy::Max),
        policies: rules.policies.unwrap_or_else(|| {
            vec![ScalingPolicy {
                kind: PolicyKind::Percent,
                value: 100,
                period_seconds: 15,
            }]
        }),
    }
}

/// How a clone counts, like a pod in the HPA's `groupPods`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneReadiness {
    /// Running (or migrating): counted when it has a sample, else missing.
    Running,
    /// Not yet running (Pending, Scheduled, Starting): unready.
    NotYetRunning,
    /// Being deleted, stopped, failed or lost: ignored.
    Gone,
}

/// One VM's figures from a VMNode's `status.vms`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VmUsage {
    /// Percent of one vCPU.
    pub cpu_utilization: f64,
    pub memory_bytes: u64,
    pub resident_bytes: u64,
    pub request_rate: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CloneSample {
    pub name: String,
    pub readiness: CloneReadiness,
    pub usage: Option<VmUsage>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recommendation {
    pub timestamp: Timestamp,
    pub replicas: i32,
}

/// A rescale: `change > 0` added replicas, `change < 0` removed them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleEvent {
    pub timestamp: Timestamp,
    pub change: i32,
}

/// Everything one autoscaling pass needs.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscaleInput {
    /// The target's `spec.replicas` (the HPA's `currentReplicas`).
    pub spec_replicas: i32,
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub metrics: Vec<MetricSpec>,
    pub scale_up: ResolvedRules,
    pub scale_down: ResolvedRules,
    pub tolerance: f64,
    pub clones: Vec<CloneSample>,
    pub recommendations: Vec<Recommendation>,
    pub scale_events: Vec<ScaleEvent>,
    pub now: Timestamp,
}

/// The observed value of one metric, for `status.currentMetrics`.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricStatus {
    pub source: MetricSource,
    /// Average over the clones with a sample (vCPUs, bytes, or the custom value).
    pub average_value: f64,
    /// Percent, for utilization targets.
    pub average_utilization: Option<i32>,
    /// This metric's replica proposal.
    pub proposal: i32,
}

/// A condition as the HPA sets it (`AbleToScale`, `ScalingActive`, `ScalingLimited`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionOutcome {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The result of one pass.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscaleDecision {
    pub current_replicas: i32,
    pub desired_replicas: i32,
    /// True when the target's replicas must be written.
    pub rescale: bool,
    /// Why, for the event on rescale.
    pub reason: String,
    pub metrics: Vec<MetricStatus>,
    /// History to store back in status (pruned, with this pass appended).
    pub recommendations: Vec<Recommendation>,
    pub scale_events: Vec<ScaleEvent>,
    pub conditions: Vec<ConditionOutcome>,
}

/// Why a metric could not be computed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetricError {
    #[error("no clones in the pool while calculating replica count")]
    NoClones,
    #[error("did not receive metrics for any clone of the pool (clones might not be running yet)")]
    NoSamples,
    #[error("utilization target is only defined for cpu and memory, not custom metric {0}")]
    UtilizationOfCustom(String),
    #[error("custom metric {0} is not published by node daemons (known: requestRate)")]
    UnknownCustomMetric(String),
}

/// `|1 − ratio| ≤ tolerance`.
fn within_tolerance(ratio: f64, tolerance: f64) -> bool {
    (1.0 - ratio).abs() <= tolerance
}

/// One clone's value and, for utilization metrics, its request.
#[derive(Clone, Copy, Debug)]
struct Point {
    value: f64,
    request: f64,
}

/// The value of `source` in `usage`, with the request it is measured against
/// (percent of one vCPU: 100; bytes of the VM's memory).
fn point(
    source: &MetricSource,
    target: MetricTarget,
    usage: &VmUsage,
) -> Result<Point, MetricError> {
    match (source, target) {
        (MetricSource::Cpu, MetricTarget::AverageUtilization(_)) => Ok(Point {
            value: usage.cpu_utilization,
            request: 100.0,
        }),
        (MetricSource::Cpu, MetricTarget::AverageValue(_)) => Ok(Point {
            value: usage.cpu_utilization / 100.0,
            request: 0.0,
        }),
        (MetricSource::Memory, _) => Ok(Point {
            value: usage.resident_bytes as f64,
            request: usage.memory_bytes as f64,
        }),
        (MetricSource::Custom(name), MetricTarget::AverageUtilization(_)) => {
            Err(MetricError::UtilizationOfCustom(name.clone()))
        }
        (MetricSource::Custom(name), MetricTarget::AverageValue(_)) if name == "requestRate" => {
            Ok(Point {
                value: usage.request_rate,
                request: 0.0,
            })
        }
        (MetricSource::Custom(name), MetricTarget::AverageValue(_)) => {
            Err(MetricError::UnknownCustomMetric(name.clone()))
        }
    }
}

/// The usage ratio over `points`: utilization (integer percent, truncated as
/// `GetResourceUtilizationRatio` does) over its target, or the plain average
/// over its target (`GetMetricUsageRatio`).
fn usage_ratio(points: &[Point], target: MetricTarget) -> (f64, Option<i32>) {
    let total: f64 = points.iter().map(|p| p.value).sum();
    match target {
        MetricTarget::AverageUtilization(t) => {
            let requests: f64 = points.iter().map(|p| p.request).sum();
            let utilization = if requests > 0.0 {
                (total * 100.0 / requests).floor() as i32
            } else {
                0
            };
            (f64::from(utilization) / f64::from(t), Some(utilization))
        }
        MetricTarget::AverageValue(t) => ((total / points.len() as f64) / t, None),
    }
}

/// `GetResourceReplicas` / `calcPlainMetricReplicas` for one metric.
pub fn replicas_for_metric(
    metric: &MetricSpec,
    current_replicas: i32,
    tolerance: f64,
    clones: &[CloneSample],
) -> Result<MetricStatus, MetricError> {
    if clones.is_empty() {
        return Err(MetricError::NoClones);
    }
    let mut ready: Vec<Point> = Vec::new();
    let mut unready = 0usize;
    let mut missing = 0usize;
    for clone in clones {
        match clone.readiness {
            CloneReadiness::Gone => {}
            CloneReadiness::NotYetRunning => unready += 1,
            CloneReadiness::Running => match &clone.usage {
                Some(usage) => ready.push(point(&metric.source, metric.target, usage)?),
                None => missing += 1,
            },
        }
    }
    if ready.is_empty() {
        return Err(MetricError::NoSamples);
    }
    let ready_count = ready.len();
    let (ratio, utilization) = usage_ratio(&ready, metric.target);
    let raw_average = ready.iter().map(|p| p.value).sum::<f64>() / ready_count as f64;
    let status = |proposal: i32| MetricStatus {
        source: metric.source.clone(),
        average_value: raw_average,
        average_utilization: utilization,
        proposal,
    };

    let scale_up_with_unready = unready > 0 && ratio > 1.0;
    if !scale_up_with_unready && missing == 0 {
        if within_tolerance(ratio, tolerance) {
            return Ok(status(current_replicas));
        }
        return Ok(status((ratio * ready_count as f64).ceil() as i32));
    }

    // A clone without a sample has no known request: for cpu it is one
    // vCPU (100 %), for memory the ready clones' mean (one pool, one image).
    let mean_request = ready.iter().map(|p| p.request).sum::<f64>() / ready_count as f64;
    let mut points = ready.clone();
    let missing_value = match metric.target {
        // Utilization: on scale-down max(100 %, target) of the request, on
        // scale-up 0; at exactly 1.0 the HPA leaves them out.
        MetricTarget::AverageUtilization(t) if ratio < 1.0 => {
            Some(mean_request * f64::from(t.max(100)) / 100.0)
        }
        MetricTarget::AverageUtilization(_) if ratio > 1.0 => Some(0.0),
        MetricTarget::AverageUtilization(_) => None,
        // Plain values: on scale-down exactly the target, otherwise 0.
        MetricTarget::AverageValue(t) if ratio < 1.0 => Some(t),
        MetricTarget::AverageValue(_) => Some(0.0),
    };
    if let Some(value) = missing_value {
        points.extend((0..missing).map(|_| Point {
            value,
            request: mean_request,
        }));
    }
    if scale_up_with_unready {
        for _ in 0..unready {
            points.push(Point {
                value: 0.0,
                request: mean_request,
            });
        }
    }
    let (new_ratio, _) = usage_ratio(&points, metric.target);
    if within_tolerance(new_ratio, tolerance)
        || (ratio < 1.0 && new_ratio > 1.0)
        || (ratio > 1.0 && new_ratio < 1.0)
    {
        return Ok(status(current_replicas));
    }
    let new_replicas = (new_ratio * points.len() as f64).ceil() as i32;
    if (new_ratio < 1.0 && new_replicas > current_replicas)
        || (new_ratio > 1.0 && new_replicas < current_replicas)
    {
        return Ok(status(current_replicas));
    }
    Ok(status(new_replicas))
}

fn condition(
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: impl Into<String>,
) -> ConditionOutcome {
    ConditionOutcome {
        type_,
        status,
        reason,
        message: message.into(),
    }
}

fn after(t: Timestamp, cutoff: Timestamp) -> bool {
    t > cutoff
}

fn cutoff(now: Timestamp, seconds: i64) -> Timestamp {
    now.checked_sub(SignedDuration::from_secs(seconds))
        .unwrap_or(now)
}

/// `stabilizeRecommendationWithBehaviors`: returns the stabilized count and
/// the history with `desired` appended (samples outside both windows dropped).
fn stabilize(input: &AutoscaleInput, desired: i32) -> (i32, Vec<Recommendation>) {
    let up_cutoff = cutoff(input.now, input.scale_up.stabilization_window_seconds);
    let down_cutoff = cutoff(input.now, input.scale_down.stabilization_window_seconds);
    let mut up = desired;
    let mut down = desired;
    let mut kept = Vec::new();
    for rec in &input.recommendations {
        let in_up = after(rec.timestamp, up_cutoff);
        let in_down = after(rec.timestamp, down_cutoff);
        if in_up {
            up = up.min(rec.replicas);
        }
        if in_down {
            down = down.max(rec.replicas);
        }
        if in_up || in_down {
            kept.push(*rec);
        }
    }
    kept.push(Recommendation {
        timestamp: input.now,
        replicas: desired,
    });
    let recommendation = input.spec_replicas.max(up).min(down);
    (recommendation, kept)
}

/// `getReplicasChangePerPeriod` for one direction.
fn change_in_period(events: &[ScaleEvent], now: Timestamp, period_seconds: i32, up: bool) -> i32 {
    let cut = cutoff(now, period_seconds.into());
    events
        .iter()
        .filter(|e| after(e.timestamp, cut))
        .filter(|e| if up { e.change > 0 } else { e.change < 0 })
        .map(|e| e.change.abs())
        .sum()
}

/// `calculateScaleUpLimitWithScalingRules`.
fn scale_up_limit(
    current: i32,
    events: &[ScaleEvent],
    rules: &ResolvedRules,
    now: Timestamp,
) -> i32 {
    let (mut result, pick): (i32, fn(i32, i32) -> i32) = match rules.select_policy {
        SelectPolicy::Disabled => return current,
        SelectPolicy::Min => (i32::MAX, std::cmp::min),
        SelectPolicy::Max => (i32::MIN, std::cmp::max),
    };
    for policy in &rules.policies {
        let added = change_in_period(events, now, policy.period_seconds, true);
        let deleted = change_in_period(events, now, policy.period_seconds, false);
        let start = current - added + deleted;
        let proposed = match policy.kind {
            PolicyKind::Replicas => start + policy.value,
            PolicyKind::Percent => {
                (f64::from(start) * (1.0 + f64::from(policy.value) / 100.0)).ceil() as i32
            }
        };
        result = pick(result, proposed);
    }
    result
}

/// `calculateScaleDownLimitWithBehaviors`.
fn scale_down_limit(
    current: i32,
    events: &[ScaleEvent],
    rules: &ResolvedRules,
    now: Timestamp,
) -> i32 {
    let (mut result, pick): (i32, fn(i32, i32) -> i32) = match rules.select_policy {
        SelectPolicy::Disabled => return current,
        SelectPolicy::Min => (i32::MIN, std::cmp::max),
        SelectPolicy::Max => (i32::MAX, std::cmp::min),
    };
    for policy in &rules.policies {
        let added = change_in_period(events, now, policy.period_seconds, true);
        let deleted = change_in_period(events, now, policy.period_seconds, false);
        let start = current - added + deleted;
        let proposed = match policy.kind {
            PolicyKind::Replicas => start - policy.value,
            // Truncated toward zero, as `int32(float64(...))`.
            PolicyKind::Percent => {
                (f64::from(start) * (1.0 - f64::from(policy.value) / 100.0)) as i32
            }
        };
        result = pick(result, proposed);
    }
    result
}

/// `convertDesiredReplicasWithBehaviorRate`: the count after rate limits and
/// min/max, with the ScalingLimited reason.
fn rate_limit(input: &AutoscaleInput, desired: i32) -> (i32, &'static str, &'static str) {
    let current = input.spec_replicas;
    if desired > current {
        let limit =
            scale_up_limit(current, &input.scale_events, &input.scale_up, input.now).max(current);
        let (allowed, reason, message) = if input.max_replicas > limit {
            (
                limit,
                "ScaleUpLimit",
                "the desired replica count is increasing faster than the maximum scale rate",
            )
        } else {
            (
                input.max_replicas,
                "TooManyReplicas",
                "the desired replica count is more than the maximum replica count",
            )
        };
        if desired > allowed {
            return (allowed, reason, message);
        }
    } else if desired < current {
        let limit = scale_down_limit(current, &input.scale_events, &input.scale_down, input.now)
            .min(current);
        let (allowed, reason, message) = if input.min_replicas < limit {
            (
                limit,
                "ScaleDownLimit",
                "the desired replica count is decreasing faster than the maximum scale rate",
            )
        } else {
            (
                input.min_replicas,
                "TooFewReplicas",
                "the desired replica count is less than the minimum replica count",
            )
        };
        if desired < allowed {
            return (allowed, reason, message);
        }
    }
    (
        desired,
        "DesiredWithinRange",
        "the desired count is within the acceptable range",
    )
}

/// Keep the scale events any policy period can still see; append `change`.
fn record_scale_event(input: &AutoscaleInput, change: i32) -> Vec<ScaleEvent> {
    let longest = input
        .scale_up
        .policies
        .iter()
        .chain(&input.scale_down.policies)
        .map(|p| p.period_seconds)
        .max()
        .unwrap_or(0);
    let cut = cutoff(input.now, longest.into());
    let mut events: Vec<ScaleEvent> = input
        .scale_events
        .iter()
        .filter(|e| after(e.timestamp, cut))
        .copied()
        .collect();
    if change != 0 {
        events.push(ScaleEvent {
            timestamp: input.now,
            change,
        });
    }
    events
}

/// One autoscaling pass (`reconcileAutoscaler` without the I/O).
pub fn decide(input: &AutoscaleInput) -> AutoscaleDecision {
    let current = input.spec_replicas;
    let mut decision = AutoscaleDecision {
        current_replicas: current,
        desired_replicas: current,
        rescale: false,
        reason: String::new(),
        metrics: Vec::new(),
        recommendations: input.recommendations.clone(),
        scale_events: record_scale_event(input, 0),
        conditions: vec![condition(
            "AbleToScale",
            true,
            "SucceededGetScale",
            "the autoscaler was able to get the target's current scale",
        )],
    };

    if current == 0 && input.min_replicas != 0 {
        decision.desired_replicas = 0;
        decision.conditions.push(condition(
            "ScalingActive",
            false,
            "ScalingDisabled",
            "scaling is disabled since the replica count of the target is zero",
        ));
        return decision;
    }
    if current > input.max_replicas {
        decision.desired_replicas = input.max_replicas;
        decision.reason = "Current number of replicas above Spec.MaxReplicas".into();
    } else if current < input.min_replicas {
        decision.desired_replicas = input.min_replicas;
        decision.reason = "Current number of replicas below Spec.MinReplicas".into();
    } else {
        // computeReplicasForMetrics
        let mut proposal = 0;
        let mut proposal_source = None;
        let mut invalid: Vec<(MetricSource, MetricError)> = Vec::new();
        for metric in &input.metrics {
            match replicas_for_metric(metric, current, input.tolerance, &input.clones) {
                Ok(status) => {
                    if status.proposal > proposal || proposal_source.is_none() {
                        proposal = proposal.max(status.proposal);
                        proposal_source = Some(status.source.clone());
                    }
                    decision.metrics.push(status);
                }
                Err(err) => invalid.push((metric.source.clone(), err)),
            }
        }
        if !invalid.is_empty() && (invalid.len() >= input.metrics.len() || proposal < current) {
            let (source, err) = &invalid[0];
            decision.conditions.push(condition(
                "ScalingActive",
                false,
                "FailedGetMetric",
                format!(
                    "the autoscaler was unable to compute the replica count for {source:?}: {err}"
                ),
            ));
            return decision;
        }
        decision.conditions.push(condition(
            "ScalingActive",
            true,
            "ValidMetricFound",
            format!(
                "the autoscaler was able to successfully calculate a replica count from {:?}",
                proposal_source.unwrap_or(MetricSource::Cpu)
            ),
        ));

        // normalizeDesiredReplicasWithBehaviors
        let (stabilized, recommendations) = stabilize(input, proposal);
        decision.recommendations = recommendations;
        decision.conditions[0] = if stabilized != proposal {
            if proposal >= current {
                condition(
                    "AbleToScale",
                    true,
                    "ScaleUpStabilized",
                    "recent recommendations were lower than current one, applying the lowest recent recommendation",
                )
            } else {
                condition(
                    "AbleToScale",
                    true,
                    "ScaleDownStabilized",
                    "recent recommendations were higher than current one, applying the highest recent recommendation",
                )
            }
        } else {
            condition(
                "AbleToScale",
                true,
                "ReadyForNewScale",
                "recommended size matches current size",
            )
        };
        let (desired, reason, message) = rate_limit(input, stabilized);
        decision.conditions.push(condition(
            "ScalingLimited",
            desired != stabilized,
            reason,
            message,
        ));
        decision.desired_replicas = desired;
        decision.reason = match &decision.metrics.iter().max_by_key(|m| m.proposal) {
            Some(m) if desired > current => format!("{:?} above target", m.source),
            _ if desired < current => "All metrics below target".into(),
            _ => String::new(),
        };
    }
    decision.rescale = decision.desired_replicas != current;
    if decision.rescale {
        decision.scale_events = record_scale_event(input, decision.desired_replicas - current);
    }
    decision
}

#[cfg(test)]
mod tests;
