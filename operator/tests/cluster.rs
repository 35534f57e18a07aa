//! The operator binary against a real kube-apiserver: pools follow
//! `kubectl scale`, a SIGKILLed operator converges without duplicates, leader
//! election hands over, dead nodes lose their clones, and the VMAutoscaler
//! scales a pool from VMNode metrics. Nodes are simulated by writing exactly
//! what a node daemon writes (heartbeat Lease, VMNode status, phases).

mod harness;

use std::collections::BTreeSet;
use std::time::Duration;

use harness::*;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use vmstream_api::NODE_LABEL;
use vmstream_api::v1alpha1::{
    ClonePool, LiveImage, LiveImagePhase, VMAutoscaler, VMClone, VMClonePhase, VMMigration,
    VMMigrationPhase,
};
use vmstream_testenv::{ControlPlane, require_control_plane};

const LIMIT: Duration = Duration::from_secs(90);

async fn setup(cp: &ControlPlane, prefix: &str) -> (kube::Client, vmstream_testenv::TestNamespace) {
    cp.install_crds(&crds_dir()).expect("install CRDs");
    let ns = cp.namespace(prefix).await.expect("namespace");
    (cp.client().await.expect("client"), ns)
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    cp.kubectl_ok(args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_changes_clones_and_pool_deletion_deletes_them() {
    let cp = require_control_plane!(
        "operator::kubectl_scale_changes_clones_and_pool_deletion_deletes_them"
    );
    let (client, ns) = setup(cp, "op-scale").await;
    let ns = ns.name().to_owned();
    let node = FakeNode::start(&client, &ns, &format!("{ns}-a"), 64 * GIB).await;
    let _op = Operator::start(cp, &ns, "op-1", &[]);
    create_image(&client, &ns, "img").await;
    wait_image_ready(&client, &ns, "img").await;

    create_pool(&client, &ns, "web", "img", 3).await;
    wait_pool_size(&client, &ns, "web", 3).await;
    for c in pool_clones(&client, &ns, "web").await {
        assert_eq!(c.labels().get(NODE_LABEL), Some(&node.name));
        assert!(c.finalizers().iter().any(|f| f == "vmstream.io/vm-stopped"));
        let owner = &c.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("ClonePool", Some(true))
        );
    }

    for n in [1usize, 0, 2] {
        kubectl(
            cp,
            &[
                "-n",
                &ns,
                "scale",
                "clonepool/web",
                &format!("--replicas={n}"),
            ],
        );
        wait_pool_size(&client, &ns, "web", n).await;
    }
    let status = kubectl(
        cp,
        &[
            "-n",
            &ns,
            "get",
            "clonepool",
            "web",
            "-o",
            "jsonpath={.status.labelSelector}",
        ],
    );
    assert_eq!(status, "vmstream.io/pool=web");

    kubectl(
        cp,
        &["-n", &ns, "delete", "clonepool", "web", "--wait=false"],
    );
    let clones: Api<VMClone> = Api::namespaced(client.clone(), &ns);
    let pools: Api<ClonePool> = Api::namespaced(client.clone(), &ns);
    eventually("pool and clones gone", LIMIT, || async {
        let left = clones.list(&ListParams::default()).await.ok()?.items.len();
        let pool = pools.get_opt("web").await.ok()?;
        (left == 0 && pool.is_none()).then_some(())
    })
    .await;
    node.delete(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_operator_converges_without_duplicates_or_losses() {
    let cp = require_control_plane!(
        "operator::sigkilled_operator_converges_without_duplicates_or_losses"
    );
    let (client, ns) = setup(cp, "op-kill").await;
    let ns = ns.name().to_owned();
    let node = FakeNode::start(&client, &ns, &format!("{ns}-a"), 64 * GIB).await;
    let mut op = Operator::start(cp, &ns, "op-1", &["--lease-duration", "1"]);
    create_image(&client, &ns, "img").await;
    wait_image_ready(&client, &ns, "img").await;
    create_pool(&client, &ns, "batch", "img", 25).await;

    // Kill the operator while it is creating clones, several times: each
    // time after the current process has made progress of its own.
    let clones: Api<VMClone> = Api::namespaced(client.clone(), &ns);
    let mut before = 0;
    for round in 1..=3 {
        let seen = eventually("the operator to create clones", LIMIT, || async {
            let n = pool_clones(&client, &ns, "batch").await.len();
            (n > before || n == 25).then_some(n)
        })
        .await;
        op.kill();
        let after_kill = pool_clones(&client, &ns, "batch").await.len();
        assert!(
            after_kill >= seen && after_kill <= 25,
            "{after_kill} clones after kill"
        );
        eprintln!("round {round}: SIGKILL with {after_kill}/25 clones created");
        before = after_kill;
        op = Operator::start(
            cp,
            &ns,
            &format!("op-{}", round + 1),
            &["--lease-duration", "1"],
        );
    }
    wait_pool_size(&client, &ns, "batch", 25).await;
    // Let the operator run a while longer: the count must not overshoot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = clones.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(all.len(), 25, "duplicate or lost clones");
    let names: BTreeSet<String> = all.iter().map(|c| c.name_any()).collect();
    assert_eq!(names.len(), 25);

    // Scale in while killing: still converges to exactly the target.
    kubectl(cp, &["-n", &ns, "scale", "clonepool/batch", "--replicas=5"]);
    eventually("scale-in started", LIMIT, || async {
        (pool_clones(&client, &ns, "batch").await.len() < 25).then_some(())
    })
    .await;
    op.kill();
    let _op = Operator::start(cp, &ns, "op-final", &["--lease-duration", "1"]);
    wait_pool_size(&client, &ns, "batch", 5).await;
    node.delete(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_standby_takes_over() {
    let cp = require_control_plane!("operator::only_the_leader_writes_and_a_standby_takes_over");
    let (client, ns) = setup(cp, "op-lead").await;
    let ns = ns.name().to_owned();
    let node = FakeNode::start(&client, &ns, &format!("{ns}-a"), 64 * GIB).await;
    let mut a = Operator::start(cp, &ns, "op-a", &[]);
    eventually("op-a leads", LIMIT, || async {
        (leader(&client, &ns).await.as_deref() == Some("op-a")).then_some(())
    })
    .await;
    let b = Operator::start(cp, &ns, "op-b", &[]);
    eventually("op-b serving metrics", LIMIT, || async {
        b.metrics().await
    })
    .await;

    create_image(&client, &ns, "img").await;
    wait_image_ready(&client, &ns, "img").await;
    create_pool(&client, &ns, "svc", "img", 2).await;
    wait_pool_size(&client, &ns, "svc", 2).await;
    assert!(a.metric("vmstream_operator_reconciles_total").await > 0.0);
    assert_eq!(b.metric("vmstream_operator_reconciles_total").await, 0.0);
    assert_eq!(b.metric("vmstream_operator_is_leader").await, 0.0);
    assert_eq!(a.metric("vmstream_operator_is_leader").await, 1.0);
    // Every event so far was reported by the leader.
    let events = kubectl(
        cp,
        &[
            "-n",
            &ns,
            "get",
            "events.events.k8s.io",
            "-o",
            "jsonpath={.items[*].reportingInstance}",
        ],
    );
    let reporters: BTreeSet<&str> = events.split_whitespace().collect();
    assert_eq!(reporters, BTreeSet::from(["op-a"]), "events: {events}");

    a.kill();
    let killed = std::time::Instant::now();
    eventually("op-b takes over", LIMIT, || async {
        (leader(&client, &ns).await.as_deref() == Some("op-b")).then_some(())
    })
    .await;
    eprintln!(
        "standby took the Lease {:.1} s after the leader was killed (lease duration 3 s)",
        killed.elapsed().as_secs_f64()
    );
    kubectl(cp, &["-n", &ns, "scale", "clonepool/svc", "--replicas=4"]);
    wait_pool_size(&client, &ns, "svc", 4).await;
    assert_eq!(b.metric("vmstream_operator_is_leader").await, 1.0);
    assert!(b.metric("vmstream_operator_reconciles_total").await > 0.0);

    // A leader asked to stop gives the Lease up instead of letting it expire.
    let mut b = b;
    assert!(b.terminate(), "op-b did not exit cleanly on SIGTERM");
    assert_eq!(leader(&client, &ns).await, None);
    node.delete(&client).await;
}

async fn create_clone(client: &kube::Client, ns: &str, name: &str, node_name: Option<&str>) {
    let clones: Api<VMClone> = Api::namespaced(client.clone(), ns);
    let mut spec = json!({ "liveImage": "img" });
    if let Some(n) = node_name {
        spec["placement"] = json!({ "nodeName": n });
    }
    let clone: VMClone = serde_json::from_value(json!({
        "apiVersion": "vmstream.io/v1alpha1", "kind": "VMClone",
        "metadata": { "name": name }, "spec": spec,
    }))
    .unwrap();
    clones.create(&PostParams::default(), &clone).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_stale_heartbeat_gets_no_clones_and_its_clones_are_lost() {
    let cp = require_control_plane!(
        "operator::node_with_stale_heartbeat_gets_no_clones_and_its_clones_are_lost"
    );
    let (client, ns) = setup(cp, "op-lost").await;
    let ns = ns.name().to_owned();
    let a = FakeNode::start(&client, &ns, &format!("{ns}-a"), 64 * GIB).await;
    let b = FakeNode::start(&client, &ns, &format!("{ns}-b"), 64 * GIB).await;
    let _op = Operator::start(cp, &ns, "op-1", &[]);
    create_image(&client, &ns, "img").await;
    wait_image_ready(&client, &ns, "img").await;
    let clones: Api<VMClone> = Api::namespaced(client.clone(), &ns);

    create_clone(&client, &ns, "on-a", Some(&a.name)).await;
    eventually("on-a running on a", LIMIT, || async {
        let c = clones.get("on-a").await.ok()?;
        (c.phase() == VMClonePhase::Running).then_some(())
    })
    .await;

    a.stop();
    let lost = eventually("on-a Lost", LIMIT, || async {
        let c = clones.get("on-a").await.ok()?;
        (c.phase() == VMClonePhase::Lost).then_some(c)
    })
    .await;
    assert!(lost.status.unwrap().message.unwrap().contains("heartbeat"));

    for i in 0..4 {
        create_clone(&client, &ns, &format!("free-{i}"), None).await;
    }
    for i in 0..4 {
        let name = format!("free-{i}");
        let node = eventually("free clone placed", LIMIT, || async {
            clones
                .get(&name)
                .await
                .ok()?
                .labels()
                .get(NODE_LABEL)
                .cloned()
        })
        .await;
        assert_eq!(node, b.name, "{name} placed on a node without heartbeat");
    }

    create_clone(&client, &ns, "pinned-a", Some(&a.name)).await;
    let message = eventually("pinned-a reported unschedulable", LIMIT, || async {
        let c = clones.get("pinned-a").await.ok()?;
        c.status?.message.filter(|m| m.contains("heartbeat stale"))
    })
    .await;
    // Other tests' VMNodes (cluster-scoped) count as not the requested name.
    assert!(message.ends_with("1 heartbeat stale"), "{message}");
    assert!(
        !clones
            .get("pinned-a")
            .await
            .unwrap()
            .labels()
            .contains_key(NODE_LABEL)
    );

    // Deleting a clone on a dead node does not wait for that node.
    clones.delete("on-a", &Default::default()).await.unwrap();
    eventually("on-a gone", LIMIT, || async {
        clones.get_opt("on-a").await.ok()?.is_none().then_some(())
    })
    .await;
    a.delete(&client).await;
    b.delete(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmautoscaler_scales_a_pool_up_and_down_from_node_metrics() {
    let cp = require_control_plane!(
        "operator::vmautoscaler_scales_a_pool_up_and_down_from_node_metrics"
    );
    let (client, ns) = setup(cp, "op-hpa").await;
    let ns = ns.name().to_owned();
    let node = FakeNode::start(&client, &ns, &format!("{ns}-a"), 64 * GIB).await;
    node.set_cpu(30.0);
    let _op = Operator::start(cp, &ns, "op-1", &["--autoscale-interval", "1"]);
    create_image(&client, &ns, "img").await;
    wait_image_ready(&client, &ns, "img").await;
    create_pool(&client, &ns, "api", "img", 1).await;
    wait_pool_size(&client, &ns, "api", 1).await;

    let vmas: Api<VMAutoscaler> = Api::namespaced(client.clone(), &ns);
    let autoscaler: VMAutoscaler = serde_json::from_value(json!({
        "apiVersion": "vmstream.io/v1alpha1", "kind": "VMAutoscaler",
        "metadata": { "name": "api" },
        "spec": {
            "scaleTargetRef": { "kind": "ClonePool", "name": "api" },
            "minReplicas": 1, "maxReplicas": 5,
            "metrics": [ { "type": "Cpu", "target": { "averageUtilization": 50 } } ],
            "behavior": { "scaleDown": { "stabilizationWindowSeconds": 0 } },
        },
    }))
    .unwrap();
    vmas.create(&PostParams::default(), &autoscaler)
        .await
        .unwrap();

    // 30 % against a 50 % target: ratio 0.6 but minReplicas 1 holds.
    let status = eventually("autoscaler status", LIMIT, || async {
        let s = vmas.get("api").await.ok()?.status?;
        (!s.current_metrics.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(status.current_metrics[0].average_utilization, Some(30));
    assert_eq!(status.desired_replicas, 1);

    // Load: 100 % against 50 % doubles the pool each pass, up to max 5.
    node.set_cpu(100.0);
    wait_pool_size(&client, &ns, "api", 5).await;
    let s = vmas.get("api").await.unwrap().status.unwrap();
    assert!(s.last_scale_time.is_some());
    assert!(
        s.scale_events.iter().any(|e| e.change > 0),
        "{:?}",
        s.scale_events
    );

    // Idle: 10 % against 50 % → ceil(0.2 × 5) = 1.
    node.set_cpu(10.0);
    wait_pool_size(&client, &ns, "api", 1).await;
    let s = vmas.get("api").await.unwrap().status.unwrap();
    assert!(
        s.scale_events.iter().any(|e| e.change < 0),
        "{:?}",
        s.scale_events
    );
    let events = kubectl(
        cp,
        &[
            "-n",
            &ns,
            "get",
            "events.events.k8s.io",
            "-o",
            "jsonpath={.items[*].reason}",
        ],
    );
    assert!(events.contains("SuccessfulRescale"), "{events}");
    node.delete(&client).await;
}

async fn create_migration(client: &kube::Client, ns: &str, name: &str, spec: serde_json::Value) {
    let migrations: Api<VMMigration> = Api::namespaced(client.clone(), ns);
    let mig: VMMigration = serde_json::from_value(json!({
        "apiVersion": "vmstream.io/v1alpha1", "kind": "VMMigration",
        "metadata": { "name": name }, "spec": spec,
    }))
    .unwrap();
    migrations
        .create(&PostParams::default(), &mig)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_is_scheduled_validated_and_times_out() {
    let cp = require_control_plane!("operator::migration_is_scheduled_validated_and_times_out");
    let (client, ns) = setup(cp, "op-mig").await;
    let ns = ns.name().to_owned();
    let a = FakeNode::start(&client, &ns, &format!("{ns}-a"), 64 * GIB).await;
    let b = FakeNode::start(&client, &ns, &format!("{ns}-b"), 64 * GIB).await;
    let _op = Operator::start(cp, &ns, "op-1", &[]);
    create_image(&client, &ns, "img").await;
    wait_image_ready(&client, &ns, "img").await;
    create_clone(&client, &ns, "vm", Some(&a.name)).await;
    let clones: Api<VMClone> = Api::namespaced(client.clone(), &ns);
    eventually("vm running", LIMIT, || async {
        (clones.get("vm").await.ok()?.phase() == VMClonePhase::Running).then_some(())
    })
    .await;
    let migrations: Api<VMMigration> = Api::namespaced(client.clone(), &ns);
    let settled = |name: &'static str| {
        let migrations = migrations.clone();
        async move {
            eventually(name, LIMIT, || async {
                let m = migrations.get(name).await.ok()?;
                let s = m.status.clone()?;
                matches!(
                    s.phase,
                    Some(VMMigrationPhase::Scheduled | VMMigrationPhase::Failed)
                )
                .then_some(m)
            })
            .await
        }
    };

    // No target given: placement picks the other live node.
    create_migration(&client, &ns, "auto", json!({ "vmClone": "vm" })).await;
    let m = settled("auto").await;
    let s = m.status.clone().unwrap();
    assert_eq!(
        s.phase,
        Some(VMMigrationPhase::Scheduled),
        "{:?}",
        s.message
    );
    assert_eq!(s.source_node.as_deref(), Some(a.name.as_str()));
    assert_eq!(s.target_node.as_deref(), Some(b.name.as_str()));
    assert_eq!(m.labels().get(NODE_LABEL), Some(&b.name));

    // The daemons report success: the clone is handed to the target node.
    let done = json!({ "status": { "phase": "Succeeded", "downtimeMs": 1.5 } });
    migrations
        .patch_status("auto", &Default::default(), &kube::api::Patch::Merge(&done))
        .await
        .unwrap();
    eventually("clone relabelled to the target", LIMIT, || async {
        let c = clones.get("vm").await.ok()?;
        (c.labels().get(NODE_LABEL) == Some(&b.name)).then_some(())
    })
    .await;

    // Target equal to the clone's (new) node: refused.
    create_migration(
        &client,
        &ns,
        "same",
        json!({ "vmClone": "vm", "targetNode": b.name }),
    )
    .await;
    let s = settled("same").await.status.unwrap();
    assert_eq!(s.phase, Some(VMMigrationPhase::Failed));
    assert!(s.message.unwrap().contains("current node"));

    // Unknown clone: waits for it (it may be applied later), then fails at its timeout.
    create_migration(
        &client,
        &ns,
        "ghost",
        json!({ "vmClone": "nope", "timeoutSeconds": 2 }),
    )
    .await;
    let s = settled("ghost").await.status.unwrap();
    assert_eq!(s.phase, Some(VMMigrationPhase::Failed));
    assert!(s.message.unwrap().contains("timed out"));

    // Scheduled but no daemon ever reports: fails at its timeout.
    create_migration(
        &client,
        &ns,
        "slow",
        json!({ "vmClone": "vm", "timeoutSeconds": 2 }),
    )
    .await;
    let s = eventually("slow fails", LIMIT, || async {
        let s = migrations.get("slow").await.ok()?.status?;
        (s.phase == Some(VMMigrationPhase::Failed)).then_some(s)
    })
    .await;
    assert!(s.message.unwrap().contains("timed out after 2s"));
    a.delete(&client).await;
    b.delete(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_image_deletion_waits_for_its_clones() {
    let cp = require_control_plane!("operator::live_image_deletion_waits_for_its_clones");
    let (client, ns) = setup(cp, "op-img").await;
    let ns = ns.name().to_owned();
    let node = FakeNode::start(&client, &ns, &format!("{ns}-a"), 64 * GIB).await;
    let _op = Operator::start(cp, &ns, "op-1", &[]);
    create_image(&client, &ns, "img").await;
    wait_image_ready(&client, &ns, "img").await;
    let images: Api<LiveImage> = Api::namespaced(client.clone(), &ns);
    assert_eq!(
        images.get("img").await.unwrap().labels().get(NODE_LABEL),
        Some(&node.name)
    );
    create_clone(&client, &ns, "user", None).await;
    let clones: Api<VMClone> = Api::namespaced(client.clone(), &ns);
    eventually("user running", LIMIT, || async {
        (clones.get("user").await.ok()?.phase() == VMClonePhase::Running).then_some(())
    })
    .await;

    images.delete("img", &Default::default()).await.unwrap();
    let blocked = eventually("image Deleting", LIMIT, || async {
        let i = images.get("img").await.ok()?;
        (i.phase() == LiveImagePhase::Deleting).then_some(i)
    })
    .await;
    assert!(
        blocked
            .status
            .unwrap()
            .message
            .unwrap()
            .contains("1 VMClone")
    );

    clones.delete("user", &Default::default()).await.unwrap();
    eventually("image gone after its clone", LIMIT, || async {
        images.get_opt("img").await.ok()?.is_none().then_some(())
    })
    .await;
    node.delete(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_placements_never_overcommit_a_node() {
    let cp = require_control_plane!("operator::concurrent_placements_never_overcommit_a_node");
    let (client, ns) = setup(cp, "op-full").await;
    let ns = ns.name().to_owned();
    // Room for exactly three 64 MiB clones (overcommit ratio 1.0).
    let node = FakeNode::start(&client, &ns, &format!("{ns}-a"), 3 * (64 << 20)).await;
    let _op = Operator::start(cp, &ns, "op-1", &[]);
    let images: Api<LiveImage> = Api::namespaced(client.clone(), &ns);
    // The image is built elsewhere: Ready without occupying this node.
    let image: LiveImage = serde_json::from_value(json!({
        "apiVersion": "vmstream.io/v1alpha1", "kind": "LiveImage",
        "metadata": { "name": "img" },
        "spec": { "source": { "boot": { "guest": "Counter", "memoryMiB": 64 } },
                  "placement": { "nodeName": "elsewhere" } },
    }))
    .unwrap();
    images.create(&PostParams::default(), &image).await.unwrap();
    let ready = json!({ "status": { "phase": "Ready", "memoryBytes": 64u64 << 20 } });
    eventually("image status written", LIMIT, || async {
        images
            .patch_status("img", &Default::default(), &kube::api::Patch::Merge(&ready))
            .await
            .ok()
    })
    .await;

    create_pool(&client, &ns, "many", "img", 6).await;
    let clones: Api<VMClone> = Api::namespaced(client.clone(), &ns);
    let (placed, pending) = eventually("3 placed, 3 refused for memory", LIMIT, || async {
        let all = clones.list(&ListParams::default()).await.ok()?.items;
        let placed = all
            .iter()
            .filter(|c| c.labels().contains_key(NODE_LABEL))
            .count();
        let refused = all
            .iter()
            .filter(|c| {
                c.status
                    .as_ref()
                    .and_then(|s| s.message.as_deref())
                    .is_some_and(|m| m.contains("1 insufficient memory"))
            })
            .count();
        (all.len() == 6 && placed + refused == 6).then_some((placed, refused))
    })
    .await;
    assert_eq!((placed, pending), (3, 3));
    // And it stays that way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = clones.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(
        all.iter()
            .filter(|c| c.labels().contains_key(NODE_LABEL))
            .count(),
        3
    );
    node.delete(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_replaces_clones_lost_with_their_node() {
    let cp = require_control_plane!("operator::pool_replaces_clones_lost_with_their_node");
    let (client, ns) = setup(cp, "op-heal").await;
    let ns = ns.name().to_owned();
    let a = FakeNode::start(&client, &ns, &format!("{ns}-a"), 64 * GIB).await;
    let b = FakeNode::start(&client, &ns, &format!("{ns}-b"), 64 * GIB).await;
    let _op = Operator::start(cp, &ns, "op-1", &[]);
    create_image(&client, &ns, "img").await;
    wait_image_ready(&client, &ns, "img").await;
    create_pool(&client, &ns, "ha", "img", 4).await;
    wait_pool_size(&client, &ns, "ha", 4).await;
    let on_a: BTreeSet<String> = pool_clones(&client, &ns, "ha")
        .await
        .iter()
        .filter(|c| c.labels().get(NODE_LABEL) == Some(&a.name))
        .map(|c| c.name_any())
        .collect();
    assert!(
        !on_a.is_empty(),
        "least-loaded placement spreads over both nodes"
    );

    a.stop();
    eventually("the pool to run 4 clones, all on b", LIMIT, || async {
        let clones = pool_clones(&client, &ns, "ha").await;
        let all_on_b = clones
            .iter()
            .all(|c| c.labels().get(NODE_LABEL) == Some(&b.name));
        let none_of_old = clones.iter().all(|c| !on_a.contains(&c.name_any()));
        (clones.len() == 4 && all_on_b && none_of_old).then_some(())
    })
    .await;
    let events = kubectl(
        cp,
        &[
            "-n",
            &ns,
            "get",
            "events.events.k8s.io",
            "-o",
            "jsonpath={.items[*].reason}",
        ],
    );
    assert!(
        events.contains("Lost") && events.contains("ReplacingClone"),
        "{events}"
    );
    a.delete(&client).await;
    b.delete(&client).await;
}
