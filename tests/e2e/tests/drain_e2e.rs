//! End to end: draining a node. Marking a node's VMNode with the
//! `vmstream.io/maintenance` annotation makes the operator migrate every
//! Running clone off it; none is stopped, each keeps its state (the request
//! guest's served counter continues) and answers from its new node.

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use vmstream_api::v1alpha1::{LiveImage, VMClone, VMClonePhase, VMNode};
use vmstream_e2e::{Cluster, ClusterOptions, clone_vm_id, eventually, ready_request_image, served};
use vmstream_test_support::{Need, require};

const TEST: &str = "e2e::draining_a_node_moves_its_clones_with_their_state";

/// Served-request count of `id` on node `node` after request `n`.
fn served_by(cluster: &Cluster, node: usize, id: &str, n: u64) -> u64 {
    let answer = cluster
        .request(node, id, n)
        .unwrap_or_else(|e| panic!("{id} on node {node} did not answer: {e}"));
    served(n, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_node_moves_its_clones_with_their_state() {
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
    let ns = cp.namespace("drain").await.unwrap();
    let client = ns.client();
    let images: Api<LiveImage> = Api::namespaced(client.clone(), ns.name());
    let clones: Api<VMClone> = Api::namespaced(client.clone(), ns.name());
    let apply = PatchParams::apply("e2e").force();
    let image = ready_request_image(&images, "req", 16).await;
    // Two clones on the image's node.
    let home = image.status.unwrap().node.unwrap();
    for name in ["c1", "c2", "c3", "c4", "c5"] {
        clones
            .patch(
                name,
                &apply,
                &Patch::Apply(json!({
                    "apiVersion": "vmstream.io/v1alpha1", "kind": "VMClone",
                    "metadata": {"name": name},
                    "spec": {"liveImage": "req", "placement": {"nodeName": home}}
                })),
            )
            .await
            .unwrap();
    }
    let a = cluster.node_index(&home);
    let mut before = Vec::new();
    for name in ["c1", "c2", "c3", "c4", "c5"] {
        eventually(&format!("{name} Running on {home}"), 90, || async {
            let c = clones.get(name).await.ok()?;
            (c.phase() == VMClonePhase::Running).then_some(())
        })
        .await;
        let id = clone_vm_id(ns.name(), name);
        served_by(&cluster, a, &id, 1);
        before.push(served_by(&cluster, a, &id, 2));
    }

    // Maintenance: the operator migrates every clone away; none stops.
    let nodes: Api<VMNode> = Api::all(client.clone());
    nodes
        .patch(
            &home,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"annotations": {vmstream_api::MAINTENANCE_ANNOTATION: "true"}}
            })),
        )
        .await
        .unwrap();
    for (name, served_before) in ["c1", "c2", "c3", "c4", "c5"].into_iter().zip(before) {
        let moved = eventually(&format!("{name} Running on another node"), 120, || async {
            let c = clones.get(name).await.ok()?;
            assert!(!c.phase().is_terminal(), "{name} stopped: {:?}", c.status);
            let node = c.status.as_ref()?.node.clone()?;
            (node != home && c.phase() == VMClonePhase::Running).then_some(node)
        })
        .await;
        let id = clone_vm_id(ns.name(), name);
        let b = cluster.node_index(&moved);
        let now = eventually(&format!("{name} answers on {moved}"), 30, || async {
            cluster.request(b, &id, 3).ok()
        })
        .await;
        assert_eq!(served(3, now), served_before + 1, "{name} kept its state");
    }
}
