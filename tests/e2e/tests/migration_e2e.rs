//! End to end: a VMMigration moves a running request clone between two node
//! daemons in network namespaces. The clone runs on node A and answers; the
//! VMMigration reaches Succeeded with downtime, total time and bytes in its
//! status; the clone is Running on node B, which answers requests with the
//! guest's served counter continuing from A (state preserved), and no VM
//! process for it remains on A. A second VMMigration then moves the clone
//! (now a VM received by migration) back to A in precopy mode: the served
//! counter continues exactly there too.

use kube::Api;

use serde_json::json;
use vmstream_api::v1alpha1::{LiveImage, VMClone, VMClonePhase, VMMigration};
use vmstream_e2e::{
    Cluster, ClusterOptions, apply_clone, clone_running, clone_vm_id, eventually, migrate,
    ready_request_image, served,
};
use vmstream_test_support::{Need, require};

const TEST: &str = "e2e::vmmigration_moves_a_running_clone_between_nodes";

/// Served-request count of `id` on node `node` after request `n`.
fn served_by(cluster: &Cluster, node: usize, id: &str, n: u64) -> u64 {
    let answer = cluster
        .request(node, id, n)
        .unwrap_or_else(|e| panic!("{id} on node {node} did not answer: {e}"));
    served(n, answer)
}

fn vm_ids(cluster: &Cluster, node: usize) -> Vec<String> {
    std::fs::read_dir(cluster.nodes[node].state_dir.join("vms"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("vm.json").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmmigration_moves_a_running_clone_between_nodes() {
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
    if !vmstream_e2e::mode::local_only(TEST) {
        return;
    }
    if let Some(why) = vmstream_testenv::unavailable() {
        vmstream_testenv::record_skip(TEST, &why);
        return;
    }
    let cluster = Cluster::start(ClusterOptions {
        nodes: 2,
        ..ClusterOptions::default()
    })
    .await
    .expect("start the cluster");
    let cp = cluster.control_plane();
    let ns = cp.namespace("mig").await.unwrap();
    let client = ns.client();
    let images: Api<LiveImage> = Api::namespaced(client.clone(), ns.name());
    let clones: Api<VMClone> = Api::namespaced(client.clone(), ns.name());
    let migrations: Api<VMMigration> = Api::namespaced(client.clone(), ns.name());

    ready_request_image(&images, "req", 16).await;
    apply_clone(&clones, "c", "req", json!({})).await;
    let clone = clone_running(&clones, "c", 90).await;
    let source = clone.status.unwrap().node.unwrap();
    let a = cluster.node_index(&source);
    let id = clone_vm_id(ns.name(), "c");
    // A few requests on A: the served counter grows by one each.
    let first = served_by(&cluster, a, &id, 1);
    for k in 2..=4 {
        assert_eq!(served_by(&cluster, a, &id, k), first + k - 1);
    }
    let before = first + 3;

    let status = migrate(&migrations, "move", json!({"vmClone": "c"}), 90).await;
    eprintln!("migration status: {status:?}");
    assert_eq!(status.source_node.as_deref(), Some(source.as_str()));
    let target = status.target_node.clone().expect("target node");
    assert_ne!(target, source);
    assert!(status.target_address.is_some());
    assert!(status.downtime_ms.is_some_and(|d| d > 0.0), "{status:?}");
    assert!(
        status.total_time_ms.unwrap_or(0.0) >= status.downtime_ms.unwrap(),
        "{status:?}"
    );
    assert!(status.bytes_sent.is_some_and(|b| b > 0), "{status:?}");
    assert!(status.pages_sent.is_some());
    assert!(status.completion_time.is_some());
    let b = cluster.node_index(&target);

    // The clone is handed to B and stays Running there.
    eventually("clone labelled and Running on the target", 60, || async {
        let c = clones.get("c").await.ok()?;
        let on_target = c.metadata.labels.as_ref()?.get(vmstream_api::NODE_LABEL)? == &target
            && c.status.as_ref()?.node.as_deref() == Some(target.as_str());
        (on_target && c.phase() == VMClonePhase::Running).then_some(())
    })
    .await;
    // The guest's state came along: the served counter continues.
    assert_eq!(served_by(&cluster, b, &id, 5), before + 1);
    assert_eq!(served_by(&cluster, b, &id, 6), before + 2);
    // Its process on A is gone; B runs exactly this VM.
    eventually("no VM process for the clone on the source", 60, || async {
        (!vm_ids(&cluster, a).contains(&id)).then_some(())
    })
    .await;
    assert!(vm_ids(&cluster, b).contains(&id));
    // Still Running on B a little later (no daemon reports it lost/failed).
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let c = clones.get("c").await.unwrap();
    assert_eq!(c.phase(), VMClonePhase::Running, "{:?}", c.status);
    assert_eq!(served_by(&cluster, b, &id, 7), before + 3);

    // Back to A: the VM that arrived by migration migrates again.
    let status = migrate(
        &migrations,
        "back",
        json!({"vmClone": "c", "targetNode": source, "mode": "Precopy"}),
        90,
    )
    .await;
    eprintln!("second migration status: {status:?}");
    assert_eq!(status.source_node.as_deref(), Some(target.as_str()));
    assert_eq!(status.target_node.as_deref(), Some(source.as_str()));
    eventually("clone labelled and Running on A again", 60, || async {
        let c = clones.get("c").await.ok()?;
        let on_a = c.metadata.labels.as_ref()?.get(vmstream_api::NODE_LABEL)? == &source
            && c.status.as_ref()?.node.as_deref() == Some(source.as_str());
        (on_a && c.phase() == VMClonePhase::Running).then_some(())
    })
    .await;
    assert_eq!(served_by(&cluster, a, &id, 8), before + 4);
    assert_eq!(served_by(&cluster, a, &id, 9), before + 5);
    eventually("no VM process for the clone on B", 60, || async {
        (!vm_ids(&cluster, b).contains(&id)).then_some(())
    })
    .await;
    assert!(vm_ids(&cluster, a).contains(&id));
}
