//! Table of autoscaling cases, each reproducing a named behaviour of the
//! Kubernetes HorizontalPodAutoscaler.

use super::*;

fn now() -> Timestamp {
    "2026-01-01T12:00:00Z".parse().unwrap()
}

fn ago(seconds: i64) -> Timestamp {
    now() - SignedDuration::from_secs(seconds)
}

fn cpu(target: i32) -> MetricSpec {
    MetricSpec {
        source: MetricSource::Cpu,
        target: MetricTarget::AverageUtilization(target),
    }
}

fn running(cpu_utilization: f64) -> CloneSample {
    CloneSample {
        name: String::new(),
        readiness: CloneReadiness::Running,
        usage: Some(VmUsage {
            cpu_utilization,
            memory_bytes: 1 << 30,
            resident_bytes: 1 << 29,
            request_rate: 0.0,
        }),
    }
}

fn with(readiness: CloneReadiness) -> CloneSample {
    CloneSample {
        name: String::new(),
        readiness,
        usage: None,
    }
}

/// `current` clones all at `cpu_utilization` percent, target 50 %, min 1,
/// max 100, default behaviour, tolerance 0.1.
fn base(current: i32, cpu_utilization: f64) -> AutoscaleInput {
    AutoscaleInput {
        spec_replicas: current,
        min_replicas: 1,
        max_replicas: 100,
        metrics: vec![cpu(50)],
        scale_up: resolve_scale_up(None),
        scale_down: resolve_scale_down(None),
        tolerance: DEFAULT_TOLERANCE,
        clones: (0..current).map(|_| running(cpu_utilization)).collect(),
        recommendations: Vec::new(),
        scale_events: Vec::new(),
        now: now(),
    }
}

fn rules(window: i32, select: SelectPolicy, policies: &[(PolicyKind, i32, i32)]) -> ScalingRules {
    ScalingRules {
        stabilization_window_seconds: Some(window),
        select_policy: Some(select),
        policies: Some(
            policies
                .iter()
                .map(|&(kind, value, period_seconds)| ScalingPolicy {
                    kind,
                    value,
                    period_seconds,
                })
                .collect(),
        ),
    }
}

fn rec(seconds_ago: i64, replicas: i32) -> Recommendation {
    Recommendation {
        timestamp: ago(seconds_ago),
        replicas,
    }
}

fn event(seconds_ago: i64, change: i32) -> ScaleEvent {
    ScaleEvent {
        timestamp: ago(seconds_ago),
        change,
    }
}

struct Case {
    /// The k8s behaviour this case reproduces.
    name: &'static str,
    input: AutoscaleInput,
    desired: i32,
}

fn cases() -> Vec<Case> {
    use PolicyKind::{Percent, Replicas};
    let mut v = Vec::new();

    v.push(Case {
        name: "tolerance: ratio 1.08 is within 0.1, keep current",
        input: base(3, 54.0),
        desired: 3,
    });
    v.push(Case {
        name: "outside tolerance: ceil(ratio x ready) = ceil(1.6 x 3)",
        input: base(3, 80.0),
        desired: 5,
    });
    v.push(Case {
        name: "configured tolerance 0 scales on a 4% deviation",
        input: AutoscaleInput {
            tolerance: 0.0,
            ..base(5, 52.0)
        },
        desired: 6,
    });
    v.push(Case {
        name: "utilization is truncated to an integer percent (50.9% -> 50%, ratio 1)",
        input: AutoscaleInput {
            tolerance: 0.0,
            ..base(4, 50.9)
        },
        desired: 4,
    });
    v.push(Case {
        name: "default scale-up policy: max(+4 pods, +100%) per 15s from 1 -> 5",
        input: base(1, 1000.0),
        desired: 5,
    });
    v.push(Case {
        name: "default scale-up policy: 100% wins for larger pools, 10 -> 20",
        input: base(10, 200.0),
        desired: 20,
    });
    v.push(Case {
        name: "scale-up limited by a scale event inside the policy period",
        input: AutoscaleInput {
            scale_up: resolve_scale_up(Some(&rules(0, SelectPolicy::Max, &[(Replicas, 2, 60)]))),
            scale_events: vec![event(30, 2)],
            ..base(4, 100.0)
        },
        desired: 4,
    });
    v.push(Case {
        name: "scale event older than the period no longer limits",
        input: AutoscaleInput {
            scale_up: resolve_scale_up(Some(&rules(0, SelectPolicy::Max, &[(Replicas, 2, 60)]))),
            scale_events: vec![event(90, 2)],
            ..base(4, 100.0)
        },
        desired: 6,
    });
    v.push(Case {
        name: "scale-down stabilization window keeps the max recommendation",
        input: AutoscaleInput {
            recommendations: vec![rec(100, 4), rec(400, 9)],
            ..base(5, 10.0)
        },
        desired: 4,
    });
    v.push(Case {
        name: "default scale-down window is 300s: a recommendation 299s old still holds",
        input: AutoscaleInput {
            recommendations: vec![rec(299, 5)],
            ..base(5, 10.0)
        },
        desired: 5,
    });
    v.push(Case {
        name: "default scale-down window is 300s: after it, scale down at once (100%/15s)",
        input: AutoscaleInput {
            recommendations: vec![rec(301, 5)],
            ..base(5, 10.0)
        },
        desired: 1,
    });
    v.push(Case {
        name: "scale-up stabilization window keeps the min recommendation",
        input: AutoscaleInput {
            scale_up: resolve_scale_up(Some(&ScalingRules {
                stabilization_window_seconds: Some(60),
                ..ScalingRules::default()
            })),
            recommendations: vec![rec(30, 3)],
            ..base(3, 100.0)
        },
        desired: 3,
    });
    v.push(Case {
        name: "selectPolicy Min takes the smaller change (+4 pods vs +100%)",
        input: AutoscaleInput {
            scale_up: resolve_scale_up(Some(&rules(
                0,
                SelectPolicy::Min,
                &[(Replicas, 4, 15), (Percent, 100, 15)],
            ))),
            ..base(10, 200.0)
        },
        desired: 14,
    });
    v.push(Case {
        name: "selectPolicy Disabled on scaleDown forbids scaling down",
        input: AutoscaleInput {
            scale_down: resolve_scale_down(Some(&rules(0, SelectPolicy::Disabled, &[]))),
            ..base(5, 10.0)
        },
        desired: 5,
    });
    v.push(Case {
        name: "selectPolicy Disabled on scaleUp forbids scaling up",
        input: AutoscaleInput {
            scale_up: resolve_scale_up(Some(&rules(0, SelectPolicy::Disabled, &[]))),
            ..base(5, 100.0)
        },
        desired: 5,
    });
    v.push(Case {
        name: "Percent scale-down policy truncates: int(5 x 0.5) = 2",
        input: AutoscaleInput {
            scale_down: resolve_scale_down(Some(&rules(
                0,
                SelectPolicy::Max,
                &[(Percent, 50, 60)],
            ))),
            ..base(5, 1.0)
        },
        desired: 2,
    });
    v.push(Case {
        name: "scale-down limited by an earlier scale-down inside the period",
        input: AutoscaleInput {
            scale_down: resolve_scale_down(Some(&rules(
                0,
                SelectPolicy::Max,
                &[(Replicas, 1, 60)],
            ))),
            scale_events: vec![event(30, -1)],
            ..base(4, 1.0)
        },
        desired: 4,
    });
    v.push(Case {
        name: "maxReplicas clamps the recommendation (TooManyReplicas)",
        input: AutoscaleInput {
            max_replicas: 6,
            ..base(4, 250.0)
        },
        desired: 6,
    });
    v.push(Case {
        name: "minReplicas clamps the recommendation (TooFewReplicas)",
        input: AutoscaleInput {
            min_replicas: 3,
            scale_down: resolve_scale_down(Some(&ScalingRules {
                stabilization_window_seconds: Some(0),
                ..ScalingRules::default()
            })),
            ..base(5, 1.0)
        },
        desired: 3,
    });
    v.push(Case {
        name: "current above maxReplicas goes to max without reading metrics",
        input: AutoscaleInput {
            max_replicas: 10,
            clones: Vec::new(),
            ..base(12, 0.0)
        },
        desired: 10,
    });
    v.push(Case {
        name: "current below minReplicas goes to min without reading metrics",
        input: AutoscaleInput {
            min_replicas: 2,
            clones: Vec::new(),
            ..base(1, 0.0)
        },
        desired: 2,
    });
    v.push(Case {
        name: "zero current replicas with minReplicas > 0: scaling disabled",
        input: base(0, 0.0),
        desired: 0,
    });
    v.push(Case {
        name: "multiple metrics: the max proposal wins",
        input: AutoscaleInput {
            metrics: vec![
                cpu(50),
                MetricSpec {
                    source: MetricSource::Custom("requestRate".into()),
                    target: MetricTarget::AverageValue(10.0),
                },
            ],
            clones: (0..3)
                .map(|_| {
                    let mut c = running(50.0);
                    c.usage.as_mut().unwrap().request_rate = 20.0;
                    c
                })
                .collect(),
            ..base(3, 0.0)
        },
        desired: 6,
    });
    v.push(Case {
        name: "missing metrics on scale-down count as 100% and flip direction: keep",
        input: AutoscaleInput {
            clones: vec![
                running(10.0),
                running(10.0),
                with(CloneReadiness::Running),
                with(CloneReadiness::Running),
            ],
            ..base(4, 0.0)
        },
        desired: 4,
    });
    v.push(Case {
        name: "missing metrics on scale-up count as 0: 300%/4 -> ratio 1.5 -> 6",
        input: AutoscaleInput {
            clones: vec![
                running(150.0),
                running(150.0),
                with(CloneReadiness::Running),
                with(CloneReadiness::Running),
            ],
            ..base(4, 0.0)
        },
        desired: 6,
    });
    v.push(Case {
        name: "unready clones count as 0 on scale-up: new ratio 1.0 within tolerance, keep",
        input: AutoscaleInput {
            clones: vec![
                running(100.0),
                running(100.0),
                with(CloneReadiness::NotYetRunning),
                with(CloneReadiness::NotYetRunning),
            ],
            ..base(4, 0.0)
        },
        desired: 4,
    });
    v.push(Case {
        name: "unready clones are left out on scale-down: ceil(0.2 x 2 ready) = 1",
        input: AutoscaleInput {
            clones: vec![
                running(10.0),
                running(10.0),
                with(CloneReadiness::NotYetRunning),
                with(CloneReadiness::NotYetRunning),
            ],
            ..base(4, 0.0)
        },
        desired: 1,
    });
    v.push(Case {
        name: "deleted/failed/lost clones are ignored",
        input: AutoscaleInput {
            clones: vec![
                running(50.0),
                running(50.0),
                with(CloneReadiness::Gone),
                with(CloneReadiness::Gone),
            ],
            ..base(4, 0.0)
        },
        desired: 4,
    });
    v.push(Case {
        name: "no clone has a sample: the metric is invalid, no scaling",
        input: AutoscaleInput {
            clones: vec![with(CloneReadiness::NotYetRunning); 3],
            ..base(3, 0.0)
        },
        desired: 3,
    });
    v.push(Case {
        name: "an invalid metric blocks a scale-down",
        input: AutoscaleInput {
            metrics: vec![
                cpu(50),
                MetricSpec {
                    source: MetricSource::Custom("nosuch".into()),
                    target: MetricTarget::AverageValue(1.0),
                },
            ],
            ..base(4, 1.0)
        },
        desired: 4,
    });
    v.push(Case {
        name: "an invalid metric does not block a scale-up",
        input: AutoscaleInput {
            metrics: vec![
                cpu(50),
                MetricSpec {
                    source: MetricSource::Custom("nosuch".into()),
                    target: MetricTarget::AverageValue(1.0),
                },
            ],
            ..base(4, 100.0)
        },
        desired: 8,
    });
    v.push(Case {
        name: "memory utilization: resident / VM memory, 50% used vs 25% target -> x2",
        input: AutoscaleInput {
            metrics: vec![MetricSpec {
                source: MetricSource::Memory,
                target: MetricTarget::AverageUtilization(25),
            }],
            ..base(3, 0.0)
        },
        desired: 6,
    });
    v
}

#[test]
fn hpa_behaviour_table() {
    let cases = cases();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for case in &cases {
        let got = decide(&case.input);
        if got.desired_replicas != case.desired {
            failures.push(format!(
                "{}: want {}, got {} ({:?})",
                case.name, case.desired, got.desired_replicas, got.conditions
            ));
        }
        assert_eq!(
            got.rescale,
            got.desired_replicas != case.input.spec_replicas
        );
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

fn condition_of<'a>(d: &'a AutoscaleDecision, type_: &str) -> &'a ConditionOutcome {
    d.conditions.iter().find(|c| c.type_ == type_).unwrap()
}

#[test]
fn conditions_name_the_limit() {
    let d = decide(&base(1, 1000.0));
    let limited = condition_of(&d, "ScalingLimited");
    assert!(limited.status);
    assert_eq!(limited.reason, "ScaleUpLimit");

    let d = decide(&AutoscaleInput {
        max_replicas: 6,
        ..base(4, 250.0)
    });
    assert_eq!(condition_of(&d, "ScalingLimited").reason, "TooManyReplicas");

    let d = decide(&AutoscaleInput {
        recommendations: vec![rec(100, 4)],
        ..base(5, 10.0)
    });
    assert_eq!(
        condition_of(&d, "AbleToScale").reason,
        "ScaleDownStabilized"
    );

    let d = decide(&base(0, 0.0));
    let active = condition_of(&d, "ScalingActive");
    assert!(!active.status);
    assert_eq!(active.reason, "ScalingDisabled");
}

#[test]
fn history_is_pruned_and_extended() {
    let input = AutoscaleInput {
        recommendations: vec![rec(1000, 7), rec(100, 5)],
        scale_events: vec![event(1000, 3), event(5, 1)],
        ..base(5, 100.0)
    };
    let d = decide(&input);
    // Proposal 10; the +1 five seconds ago leaves max(4 + 4, 4 x 2) = 8.
    assert_eq!(d.desired_replicas, 8);
    // 1000 s is outside both windows (0 s up, 300 s down): dropped.
    assert_eq!(d.recommendations, vec![rec(100, 5), rec(0, 10)]);
    // 1000 s is outside every policy period (15 s): dropped; +3 appended.
    assert_eq!(d.scale_events, vec![event(5, 1), event(0, 3)]);
}

#[test]
fn no_rescale_keeps_history_without_new_event() {
    let d = decide(&base(3, 50.0));
    assert!(!d.rescale);
    assert!(d.scale_events.is_empty());
    assert_eq!(d.recommendations, vec![rec(0, 3)]);
}

#[test]
fn metric_status_reports_averages() {
    let d = decide(&AutoscaleInput {
        clones: vec![running(40.0), running(80.0)],
        ..base(2, 0.0)
    });
    let m = &d.metrics[0];
    assert_eq!(m.average_utilization, Some(60));
    assert!((m.average_value - 60.0).abs() < 1e-9);
    assert_eq!(m.proposal, 3);
}
