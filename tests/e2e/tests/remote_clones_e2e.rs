//! End to end across nodes: a clone placed on a node that does not hold the
//! LiveImage starts at once with its memory streamed from the image's home
//! node (and answers requests); that node ends up with the whole image
//! cached; then the home node dies entirely — its clones become Lost and the
//! ClonePool replaces them on the nodes that are still alive, from their
//! cached copy of the image.

use std::collections::BTreeMap;

use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, ResourceExt};
use serde_json::json;
use vmstream_api::v1alpha1::{LiveImage, VMClone, VMClonePhase, VMNode};
use vmstream_e2e::{Cluster, ClusterOptions, clone_vm_id, eventually, ready_request_image};
use vmstream_test_support::{Need, require};

const TEST: &str = "e2e::clones_stream_from_other_nodes_and_survive_a_dead_home_node";

fn answers(cluster: &Cluster, node: usize, id: &str) -> bool {
    cluster.request(node, id, 11).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_stream_from_other_nodes_and_survive_a_dead_home_node() {
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
    let mut cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("start the cluster");
    let cp = cluster.control_plane();
    let ns = cp.namespace("remote").await.unwrap();
    let nsname = ns.name().to_string();
    let client = ns.client();
    let images: Api<LiveImage> = Api::namespaced(client.clone(), &nsname);
    let clones: Api<VMClone> = Api::namespaced(client.clone(), &nsname);
    let vmnodes: Api<VMNode> = Api::all(client.clone());
    let apply = PatchParams::apply("e2e").force();
    let image = ready_request_image(&images, "req", 16).await;
    let home = image.status.unwrap().node.unwrap();
    let far = cluster
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| *n != home)
        .unwrap();

    // A clone pinned to a node without the image: streamed from the home node.
    clones
        .patch(
            "far",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "vmstream.io/v1alpha1", "kind": "VMClone",
                "metadata": {"name": "far"},
                "spec": {"liveImage": "req", "placement": {"nodeName": far}}
            })),
        )
        .await
        .unwrap();
    eventually("the far clone Running", 90, || async {
        let c = clones.get("far").await.ok()?;
        assert!(!c.phase().is_terminal(), "far clone ended: {:?}", c.status);
        (c.phase() == VMClonePhase::Running).then_some(())
    })
    .await;
    let f = cluster.node_index(&far);
    assert!(
        answers(&cluster, f, &clone_vm_id(&nsname, "far")),
        "far clone answers"
    );
    // Background prefetch completes: the far node now holds the image too.
    let key = format!("{nsname}/req");
    eventually("the far node lists the image", 60, || async {
        let n = vmnodes.get(&far).await.ok()?;
        n.status?.images.contains(&key).then_some(())
    })
    .await;

    // A pool of 4, then the home node dies entirely.
    Api::<vmstream_api::v1alpha1::ClonePool>::namespaced(client.clone(), &nsname)
        .patch(
            "pool",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "vmstream.io/v1alpha1", "kind": "ClonePool",
                "metadata": {"name": "pool"},
                "spec": {"liveImage": "req", "replicas": 4}
            })),
        )
        .await
        .unwrap();
    let pool_running = || async {
        let list = clones
            .list(&ListParams::default().labels(&vmstream_api::pool_label_selector("pool")))
            .await
            .ok()?;
        Some(
            list.items
                .into_iter()
                .filter(|c| c.phase() == VMClonePhase::Running)
                .filter_map(|c| Some((c.name_any(), c.status?.node?)))
                .collect::<BTreeMap<String, String>>(),
        )
    };
    eventually("4 pool clones Running", 90, || async {
        let r = pool_running().await?;
        (r.len() == 4).then_some(())
    })
    .await;
    let h = cluster.node_index(&home);
    cluster.stop_node(h);
    let survivors = eventually("4 pool clones Running off the dead node", 120, || async {
        let r = pool_running().await?;
        (r.len() == 4 && r.values().all(|n| *n != home)).then_some(r)
    })
    .await;
    for (name, node) in &survivors {
        let i = cluster.node_index(node);
        assert!(
            answers(&cluster, i, &clone_vm_id(&nsname, name)),
            "{name} on {node} answers"
        );
    }
    // Clones that were on the dead node are reported Lost (or already replaced).
    let all = clones.list(&ListParams::default()).await.unwrap().items;
    for c in all
        .iter()
        .filter(|c| c.status.as_ref().and_then(|s| s.node.as_deref()) == Some(home.as_str()))
    {
        assert!(
            matches!(c.phase(), VMClonePhase::Lost | VMClonePhase::Stopped),
            "{} on the dead node is {:?}",
            c.name_any(),
            c.phase()
        );
    }
}
