//! The cluster-level suite, against the local cluster (default) or an
//! existing one (`VMSTREAM_E2E_KUBECONFIG`, see `vmstream_e2e::mode`): only
//! what the API server shows and what the guests answer.
//!
//! In one namespace, in order: `examples/` applied as a user would (the
//! LiveImage is captured Ready, the ClonePool's clones and the VMClone run,
//! the example VMMigration succeeds; the example VMAutoscaler is deleted
//! first so the pool holds still); a ClonePool scaled 1 → 4 → 2; the node
//! running most clones drained (they run elsewhere, keeping their state); a VMMigration of
//! a fresh clone (Running on the target, state kept). Guests answer requests
//! through `ctl` locally, through `kubectl exec` into the node daemon pods on
//! an existing cluster (skipped, with a message, where there are none).
//!
//! On an existing cluster the drain step annotates one VMNode
//! `vmstream.io/maintenance=true` for its duration: clones of other
//! namespaces on that node move too. The annotation is removed at the end,
//! also when the test fails.

use std::collections::BTreeMap;
use std::path::Path;

use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, ResourceExt};
use serde_json::json;
use vmstream_api::v1alpha1::{
    ClonePool, LiveImage, LiveImagePhase, VMClone, VMClonePhase, VMMigration, VMMigrationPhase,
    VMNode,
};
use vmstream_e2e::mode::ClusterUnderTest;
use vmstream_e2e::requests::RequestPath;
use vmstream_e2e::{ClusterOptions, apply_clone, clone_vm_id, eventually, migrate, served};
use vmstream_test_support::{Need, require};

const TEST: &str = "e2e::cluster_level_suite_on_a_local_or_existing_cluster";

/// Name → (node, phase) of the clones in the namespace matching `selector`.
async fn clones_by_name(
    api: &Api<VMClone>,
    selector: Option<&str>,
) -> BTreeMap<String, (Option<String>, VMClonePhase)> {
    let mut params = ListParams::default();
    if let Some(s) = selector {
        params = params.labels(s);
    }
    api.list(&params)
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .map(|c| {
            let node = c.status.as_ref().and_then(|s| s.node.clone());
            (c.name_any(), (node, c.phase()))
        })
        .collect()
}

/// Requests to guests, when the cluster gives a way to send them.
struct Guests {
    path: Option<RequestPath>,
    ns: String,
}

impl Guests {
    /// What the step's message adds about guests.
    fn checked(&self) -> &'static str {
        if self.path.is_some() {
            ", guests answer with their state kept"
        } else {
            " (guests not asked: no request path)"
        }
    }

    /// The served counter of clone `name` on `node` after request `n`;
    /// None when requests are not possible here.
    fn served(&self, node: &str, name: &str, n: u64) -> Option<u64> {
        let path = self.path.as_ref()?;
        let id = clone_vm_id(&self.ns, name);
        // A clone just reported Running may take a moment to be reachable.
        let mut last = None;
        for _ in 0..50 {
            match path.request(node, &id, n, 10_000) {
                Ok(answer) => return Some(served(n, answer)),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!("{id} on {node} does not answer: {last:?}");
    }
}

/// Removes the maintenance annotation from a VMNode when dropped.
struct Undrain {
    kubectl: std::process::Command,
}

impl Drop for Undrain {
    fn drop(&mut self) {
        let _ = self.kubectl.output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_level_suite_on_a_local_or_existing_cluster() {
    let existing = matches!(
        vmstream_e2e::mode::mode(),
        Ok(vmstream_e2e::mode::E2eMode::ExistingCluster { .. })
    );
    if !existing {
        if !require(
            TEST,
            &[
                Need::Kvm,
                Need::Root,
                Need::Userfaultfd,
                Need::NetworkNamespaces,
            ],
        ) {
            return;
        }
        if let Some(why) = vmstream_testenv::unavailable() {
            vmstream_testenv::record_skip(TEST, &why);
            return;
        }
    }
    let cluster = ClusterUnderTest::start(
        ClusterOptions {
            nodes: 2,
            ..ClusterOptions::default()
        },
        2,
    )
    .await
    .expect("start or reach the cluster");
    eprintln!("suite against the {}", cluster.describe());
    let cp = cluster.control_plane();
    let ns = cp.namespace("suite").await.unwrap();
    let nsname = ns.name().to_string();
    let client = ns.client();
    let images: Api<LiveImage> = Api::namespaced(client.clone(), &nsname);
    let clones: Api<VMClone> = Api::namespaced(client.clone(), &nsname);
    let pools: Api<ClonePool> = Api::namespaced(client.clone(), &nsname);
    let migrations: Api<VMMigration> = Api::namespaced(client.clone(), &nsname);
    let vmnodes: Api<VMNode> = Api::all(client.clone());
    let apply = PatchParams::apply("e2e").force();
    let guests = Guests {
        path: match cluster.request_path().await {
            Ok(path) => Some(path),
            Err(why) => {
                eprintln!("requests to guests skipped: {why}");
                None
            }
        },
        ns: nsname.clone(),
    };
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:6.1} s] {what}", t0.elapsed().as_secs_f64());

    // 1. examples/ as a user applies them.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    cp.kubectl_ok(&[
        "-n",
        &nsname,
        "apply",
        "--server-side",
        "-f",
        examples.to_str().unwrap(),
    ])
    .expect("apply examples/");
    eventually("LiveImage request-64m Ready", 300, || async {
        let i = images.get("request-64m").await.ok()?;
        assert_ne!(i.phase(), LiveImagePhase::Failed, "{:?}", i.status);
        (i.phase() == LiveImagePhase::Ready).then_some(())
    })
    .await;
    step("examples: LiveImage Ready");
    // The example VMAutoscaler resizes the pool (no load: towards 1); it is
    // removed so the pool holds still while the suite checks it.
    cp.kubectl_ok(&["-n", &nsname, "delete", "vmautoscaler", "request-pool"])
        .expect("delete the example VMAutoscaler");
    let pool_selector = vmstream_api::pool_label_selector("request-pool");
    let pool_clones = eventually("the example pool's clones Running", 180, || async {
        let want = pools.get("request-pool").await.ok()?.spec.replicas as usize;
        let c = clones_by_name(&clones, Some(&pool_selector)).await;
        (want >= 1 && c.len() == want && c.values().all(|(_, p)| *p == VMClonePhase::Running))
            .then_some(c)
    })
    .await;
    let moved = eventually("the example VMMigration Succeeded", 180, || async {
        let m = migrations.get("request-1-move").await.ok()?;
        assert_ne!(m.phase(), VMMigrationPhase::Failed, "{:?}", m.status);
        let succeeded = m.phase() == VMMigrationPhase::Succeeded;
        succeeded.then_some(())?;
        m.status?.target_node
    })
    .await;
    let request_1_node = eventually(
        "request-1 Running on the migration's target",
        60,
        || async {
            let c = clones.get("request-1").await.ok()?;
            let node = c.status.as_ref()?.node.clone()?;
            (c.phase() == VMClonePhase::Running && node == moved).then_some(node)
        },
    )
    .await;
    for (name, (node, _)) in &pool_clones {
        guests.served(node.as_deref().unwrap(), name, 7);
    }
    guests.served(&request_1_node, "request-1", 7);
    step(&format!(
        "examples: {} pool clones Running, request-1 migrated and Running{}",
        pool_clones.len(),
        guests.checked()
    ));

    // 2. Scale a pool of the example image 1 -> 4 -> 2.
    let scale_to = |n: i32| {
        let pools = pools.clone();
        let apply = apply.clone();
        async move {
            pools
                .patch(
                    "scaled",
                    &apply,
                    &Patch::Apply(json!({
                        "apiVersion": "vmstream.io/v1alpha1", "kind": "ClonePool",
                        "metadata": {"name": "scaled"},
                        "spec": {"liveImage": "request-64m", "replicas": n}
                    })),
                )
                .await
                .unwrap();
        }
    };
    let scaled_selector = vmstream_api::pool_label_selector("scaled");
    for n in [1usize, 4, 2] {
        scale_to(n as i32).await;
        eventually(
            &format!("pool scaled to {n} Running clones"),
            180,
            || async {
                let c = clones_by_name(&clones, Some(&scaled_selector)).await;
                let ready = pools.get("scaled").await.ok()?.status?.ready_replicas;
                (c.len() == n
                    && c.values().all(|(_, p)| *p == VMClonePhase::Running)
                    && ready == n as i32)
                    .then_some(())
            },
        )
        .await;
        step(&format!("scale: {n} clones Running, readyReplicas {n}"));
    }

    // 3. Drain the node running most clones of this namespace (a clone
    //    already migrated once, like request-1, is migrated again).
    let running = clones_by_name(&clones, None).await;
    let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, (node, phase)) in &running {
        if *phase == VMClonePhase::Running
            && let Some(node) = node
        {
            per_node.entry(node.clone()).or_default().push(name.clone());
        }
    }
    let (drained, on_drained) = per_node
        .iter()
        .max_by_key(|(_, names)| names.len())
        .map(|(n, names)| (n.clone(), names.clone()))
        .expect("clones run");
    let before: BTreeMap<String, Option<u64>> = on_drained
        .iter()
        .map(|name| (name.clone(), guests.served(&drained, name, 11)))
        .collect();
    let mut undo = cp.kubectl();
    undo.args([
        "annotate",
        "vmnode",
        &drained,
        &format!("{}-", vmstream_api::MAINTENANCE_ANNOTATION),
    ]);
    let undrain = Undrain { kubectl: undo };
    vmnodes
        .patch(
            &drained,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {vmstream_api::MAINTENANCE_ANNOTATION: "true"}}
            })),
        )
        .await
        .unwrap();
    for (name, served_before) in &before {
        let node = eventually(&format!("{name} Running off {drained}"), 180, || async {
            let c = clones.get(name).await.ok()?;
            assert!(!c.phase().is_terminal(), "{name} stopped: {:?}", c.status);
            let node = c.status.as_ref()?.node.clone()?;
            (node != drained && c.phase() == VMClonePhase::Running).then_some(node)
        })
        .await;
        if let (Some(b), Some(now)) = (served_before, guests.served(&node, name, 12)) {
            assert_eq!(now, b + 1, "{name} kept its state across the drain");
        }
    }
    drop(undrain);
    step(&format!(
        "drain: {} clones moved off {drained}{}",
        before.len(),
        guests.checked()
    ));

    // 4. A fresh clone migrated by a VMMigration.
    apply_clone(&clones, "mover", "request-64m", json!({})).await;
    let source = eventually("mover Running", 120, || async {
        let c = clones.get("mover").await.ok()?;
        let node = c.status.as_ref()?.node.clone()?;
        (c.phase() == VMClonePhase::Running).then_some(node)
    })
    .await;
    let served_before = guests.served(&source, "mover", 21);
    let status = migrate(&migrations, "mover-move", json!({"vmClone": "mover"}), 180).await;
    let target = status.target_node.clone().expect("target node");
    assert_ne!(target, source);
    eventually("mover Running on the target", 60, || async {
        let c = clones.get("mover").await.ok()?;
        (c.phase() == VMClonePhase::Running
            && c.status.as_ref()?.node.as_deref() == Some(target.as_str()))
        .then_some(())
    })
    .await;
    if let (Some(b), Some(now)) = (served_before, guests.served(&target, "mover", 22)) {
        assert_eq!(now, b + 1, "mover kept its state across the migration");
    }
    step(&format!(
        "migration: mover {source} -> {target}, downtime {:?} ms, total {:?} ms{}",
        status.downtime_ms,
        status.total_time_ms,
        guests.checked()
    ));
    if let Some(local) = cluster.local() {
        // Process-level extra in local mode: one VM process per clone.
        eventually("one VM process per clone", 60, || async {
            let clones_now = clones_by_name(&clones, None).await.len();
            let processes: usize = local.nodes.iter().map(|n| n.vm_pids().len()).sum();
            (processes == clones_now).then_some(())
        })
        .await;
    } else {
        eprintln!(
            "VM process count not checked: {}",
            vmstream_e2e::mode::NO_PROCESS_ACCESS
        );
    }
    drop(ns);
}
