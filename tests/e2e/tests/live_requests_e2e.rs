//! End to end: a clone keeps answering while it is migrated. A driver thread
//! sends an unbroken stream of requests to a request-guest clone through its
//! node's supervisor (`ctl request`), routed to the node in the VMClone's
//! `status.node` and retried when an attempt fails; a VMMigration moves the
//! clone to the other node in the middle of the stream. Every request must
//! get exactly one answer and the guest's served counter must rise by
//! exactly one per answered request across the migration: no request lost,
//! none applied twice.
//!
//! The second test drives three concurrent streams straight at the daemons'
//! supervisor sockets (no `ctl` process per request), so a request is almost
//! always inside the VM process when the migration pauses it: it checks the
//! same guarantee where the race between an admitted request and the pause
//! is hit.
//!
//! Exactly-once holds because a migrating VM process refuses new mailbox
//! requests (`mailbox refused: the VM is migrating`: nothing applied, the
//! driver retries, at the clone's new node once `status.node` says so) and
//! lets the admitted ones be answered before the migration pauses the VM
//! (`node-daemon/src/vm_process/migration.rs`).

use std::time::Duration;

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use vmstream_api::v1alpha1::{LiveImage, VMClone, VMClonePhase, VMMigration, VMMigrationPhase};
use vmstream_e2e::requests::{
    DriverOptions, DriverReport, RequestDriver, RequestPath, Route, check_concurrent_exactly_once,
};
use vmstream_e2e::{
    Cluster, ClusterOptions, apply_clone, clone_running, clone_vm_id, eventually,
    ready_request_image, served,
};
use vmstream_test_support::{Need, require};

const NEEDS: &[Need] = &[
    Need::Kvm,
    Need::Root,
    Need::Userfaultfd,
    Need::NetworkNamespaces,
];

/// The two tests each run a 2-node cluster: one at a time on two cores
/// (`make test` runs a file's tests in parallel).
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A 2-node cluster with a Running request clone `c` in a fresh namespace.
struct Scene {
    cluster: Cluster,
    ns: vmstream_testenv::TestNamespace,
    clones: Api<VMClone>,
    migrations: Api<VMMigration>,
    id: String,
    source: String,
}

async fn scene(test: &str) -> Option<Scene> {
    if !vmstream_e2e::mode::local_only(test) || !require(test, NEEDS) {
        return None;
    }
    if let Some(why) = vmstream_testenv::unavailable() {
        vmstream_testenv::record_skip(test, &why);
        return None;
    }
    let cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        ..ClusterOptions::default()
    })
    .await
    .expect("start the cluster");
    let ns = cluster.control_plane().namespace("live").await.unwrap();
    let client = ns.client();
    let images: Api<LiveImage> = Api::namespaced(client.clone(), ns.name());
    let clones: Api<VMClone> = Api::namespaced(client.clone(), ns.name());
    let migrations: Api<VMMigration> = Api::namespaced(client.clone(), ns.name());
    ready_request_image(&images, "req", 16).await;
    apply_clone(&clones, "c", "req", json!({})).await;
    let clone = clone_running(&clones, "c", 90).await;
    let source = clone.status.unwrap().node.unwrap();
    let id = clone_vm_id(ns.name(), "c");
    Some(Scene {
        cluster,
        ns,
        clones,
        migrations,
        id,
        source,
    })
}

impl Scene {
    /// The guest's served counter after one more request on `node`.
    fn served_now(&self, node: &str, n: u64) -> u64 {
        let answer = self
            .cluster
            .request(self.cluster.node_index(node), &self.id, n)
            .unwrap_or_else(|e| panic!("{} on {node} did not answer: {e}", self.id));
        served(n, answer)
    }

    /// Starts `streams` drivers on `path` at the clone, lets them run, applies
    /// a VMMigration while they run and routes them by the VMClone's
    /// `status.node`; stops them a while after the clone runs on the target.
    /// Returns the reports and the target node.
    async fn migrate_under_load(
        &self,
        path: RequestPath,
        streams: usize,
    ) -> (Vec<DriverReport>, String) {
        let route = Route::new(&self.source);
        let drivers: Vec<RequestDriver> = (0..streams)
            .map(|s| {
                RequestDriver::start(
                    path.clone(),
                    vec![(self.id.clone(), route.clone())],
                    DriverOptions {
                        first_n: 1_000_000 * (s as u64 + 1),
                        ..DriverOptions::default()
                    },
                )
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        self.migrations
            .patch(
                "move",
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(json!({
                    "apiVersion": "vmstream.io/v1alpha1", "kind": "VMMigration",
                    "metadata": {"name": "move"},
                    "spec": {"vmClone": "c"}
                })),
            )
            .await
            .unwrap();
        // Route the streams by the VMClone's status.node, as a client would.
        let target = eventually(
            "VMMigration Succeeded (routing by status.node)",
            90,
            || async {
                if let Some(node) = self.clones.get("c").await.ok().and_then(|c| c.status?.node) {
                    route.set(&node);
                }
                let m = self.migrations.get("move").await.ok()?;
                assert_ne!(
                    m.phase(),
                    VMMigrationPhase::Failed,
                    "migration failed: {:?}",
                    m.status
                );
                let succeeded = m.phase() == VMMigrationPhase::Succeeded;
                succeeded.then_some(())?;
                m.status?.target_node
            },
        )
        .await;
        eventually("clone Running on the target", 60, || async {
            let c = self.clones.get("c").await.ok()?;
            let node = c.status.as_ref()?.node.clone()?;
            route.set(&node);
            (node == target && c.phase() == VMClonePhase::Running).then_some(())
        })
        .await;
        // Keep the streams on the target a little longer, then stop them.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let reports = tokio::task::spawn_blocking(move || {
            drivers.into_iter().map(RequestDriver::stop).collect()
        })
        .await
        .unwrap();
        (reports, target)
    }

    async fn print_migration(&self) {
        let m = self.migrations.get("move").await.unwrap().status.unwrap();
        eprintln!(
            "  migration downtime {:?} ms, total {:?} ms",
            m.downtime_ms, m.total_time_ms
        );
    }
}

fn print_report(what: &str, report: &DriverReport, source: &str, target: &str) -> (usize, usize) {
    let f = report.figures();
    let on = |node: &str| {
        report
            .of(0)
            .filter(|r| r.answered_by.as_deref() == Some(node))
            .count()
    };
    let (on_source, on_target) = (on(source), on(target));
    eprintln!(
        "{what}: {} requests ({on_source} answered on {source}, {on_target} on {target}), \
         {} retried ({} refused attempts, {} unknown-outcome attempts), \
         longest request {:.1} ms, longest gap between answers {:.1} ms",
        f.requests,
        f.retried,
        f.refused_attempts,
        f.unknown_attempts,
        f.longest_request.as_secs_f64() * 1e3,
        f.longest_gap.as_secs_f64() * 1e3,
    );
    // Refusals repeat every retry pause until the route moves: show the
    // first few and the last.
    let lines = report.failed_attempts();
    for (i, line) in lines.iter().enumerate() {
        if i < 4 || i + 1 == lines.len() {
            eprintln!("  failed attempt: {line}");
        } else if i == 4 {
            eprintln!("  ... {} more failed attempts", lines.len() - 5);
        }
    }
    (on_source, on_target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_migrated_under_load_answers_every_request_exactly_once() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let Some(scene) =
        scene("e2e::a_clone_migrated_under_load_answers_every_request_exactly_once").await
    else {
        return;
    };
    let before = scene.served_now(&scene.source, 1);
    let path = scene.cluster.request_path().unwrap();
    let (reports, target) = scene.migrate_under_load(path, 1).await;
    let report = &reports[0];
    let after = scene.served_now(&target, 2);
    let (on_source, on_target) = print_report(
        "ctl requests across a migration",
        report,
        &scene.source,
        &target,
    );
    scene.print_migration().await;
    assert!(
        on_source > 0 && on_target > 0,
        "the stream spans the migration"
    );
    let violations = report.violations(0, before);
    assert!(
        violations.is_empty(),
        "requests lost or applied twice: {violations:?}"
    );
    let f = report.figures();
    assert_eq!(f.answered, f.requests, "every request answered");
    assert_eq!(
        after,
        before + f.answered as u64 + 1,
        "served counter after the stream: one per answered request"
    );
    drop(scene.ns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_request_streams_across_a_migration_are_applied_exactly_once() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let Some(scene) =
        scene("e2e::concurrent_request_streams_across_a_migration_are_applied_exactly_once").await
    else {
        return;
    };
    let before = scene.served_now(&scene.source, 1);
    let path = scene.cluster.supervisor_path();
    let (reports, target) = scene.migrate_under_load(path, 3).await;
    let after = scene.served_now(&target, 2);
    let mut served_values = Vec::new();
    let mut requests = 0;
    let mut answered = 0;
    for (i, report) in reports.iter().enumerate() {
        print_report(
            &format!("supervisor stream {i} across a migration"),
            report,
            &scene.source,
            &target,
        );
        let f = report.figures();
        requests += f.requests;
        answered += f.answered;
        served_values.extend(report.requests.iter().filter_map(|r| r.served));
    }
    scene.print_migration().await;
    let (missing, twice) = check_concurrent_exactly_once(before, &served_values, after);
    eprintln!(
        "{requests} requests, {answered} answered; served {before} -> {after}; \
         applied without an answer received: {missing:?}; answered twice: {twice:?}"
    );
    assert_eq!(answered, requests, "every request answered");
    assert!(twice.is_empty(), "served values answered twice: {twice:?}");
    assert!(
        missing.is_empty(),
        "requests applied whose answer was lost (their retry was applied again): {missing:?}"
    );
    assert_eq!(after, before + answered as u64 + 1);
    drop(scene.ns);
}
