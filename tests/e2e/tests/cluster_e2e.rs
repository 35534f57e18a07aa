//! End to end on this machine: a real control plane, the operator, and three
//! node daemons in network namespaces. Custom resources drive real KVM
//! micro-VMs: a LiveImage is captured, a ClonePool's clones run and answer
//! requests, scale up and down, survive a SIGKILLed node daemon (re-adopted)
//! and a SIGKILLed operator (it converges), and deleting everything leaves
//! no VM process behind.

use std::collections::BTreeSet;
use std::path::Path;

use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, ResourceExt};
use serde_json::json;
use vmstream_api::v1alpha1::{ClonePool, LiveImage, LiveImagePhase, VMClone, VMClonePhase, VMNode};
use vmstream_e2e::{Cluster, ClusterOptions, apply_clone, clone_running, clone_vm_id, eventually};
use vmstream_test_support::{Need, require};

const TEST: &str = "e2e::custom_resources_drive_real_vms_across_nodes";

async fn running_clones(api: &Api<VMClone>) -> Vec<VMClone> {
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.phase() == VMClonePhase::Running && c.metadata.deletion_timestamp.is_none())
        .collect()
}

/// Every running clone answers a request through its node's supervisor.
fn all_answer(cluster: &Cluster, ns: &str, clones: &[VMClone]) {
    for c in clones {
        let node = c
            .status
            .as_ref()
            .and_then(|s| s.node.clone())
            .expect("clone has a node");
        let id = clone_vm_id(ns, &c.name_any());
        if let Err(e) = cluster.request(cluster.node_index(&node), &id, 7) {
            panic!("clone {id} on {node} did not answer: {e}");
        }
    }
}

/// With `VMSTREAM_E2E_KEEP_LOGS=<dir>`, copies the operator's and daemons'
/// logs there when dropped (for the breakdown of the scale-up, or a failure).
struct KeepLogs(std::path::PathBuf);

impl Drop for KeepLogs {
    fn drop(&mut self) {
        let Some(keep) = std::env::var_os("VMSTREAM_E2E_KEEP_LOGS") else {
            return;
        };
        let keep = std::path::PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = std::fs::copy(entry.path(), keep.join(entry.file_name()));
        }
    }
}

/// The pid recorded for VM `id` on node `index` (its `vm.json`).
fn vm_pid(cluster: &Cluster, index: usize, id: &str) -> Option<u32> {
    let path = cluster.nodes[index]
        .state_dir
        .join("vms")
        .join(id)
        .join("vm.json");
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    record["pid"].as_u64().map(|p| p as u32)
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Drops a VMClone's finalizers (already gone is fine).
async fn strip_finalizers(api: &Api<VMClone>, name: &str) {
    let patch = Patch::Merge(json!({ "metadata": { "finalizers": null } }));
    match api.patch(name, &PatchParams::default(), &patch).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("dropping the finalizers of {name}: {e}"),
    }
}

/// Reasons of the Events about VMNodes (cluster-scoped: namespace default).
async fn node_event_notes(client: &kube::Client, reason: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    events
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}

fn vm_process_count(cluster: &Cluster) -> usize {
    cluster
        .nodes
        .iter()
        .flat_map(|n| n.vm_pids())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_resources_drive_real_vms_across_nodes() {
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
    // Dropped before the cluster (declared after it, dropped explicitly at
    // the end): the logs are copied while they exist, pass or panic.
    let keep_logs = KeepLogs(cluster.log_dir());
    let cp = cluster.control_plane();
    let ns = cp.namespace("e2e").await.unwrap();
    let client = ns.client();

    // Three node daemons publish their VMNodes from their own addresses.
    let vmnodes: Api<VMNode> = Api::all(client.clone());
    eventually("3 VMNodes with addresses on the bridge", 60, || async {
        let list = vmnodes.list(&ListParams::default()).await.ok()?;
        let addrs: BTreeSet<String> = list
            .items
            .iter()
            .filter_map(|n| n.status.as_ref()?.address.clone())
            .filter(|a| a.starts_with("10.213."))
            .collect();
        (addrs.len() == 3).then_some(())
    })
    .await;

    // A LiveImage captured from the request guest, and a ClonePool of 6.
    let images: Api<LiveImage> = Api::namespaced(client.clone(), ns.name());
    let pools: Api<ClonePool> = Api::namespaced(client.clone(), ns.name());
    let clones: Api<VMClone> = Api::namespaced(client.clone(), ns.name());
    let apply = PatchParams::apply("e2e").force();
    images
        .patch(
            "req",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "vmstream.io/v1alpha1", "kind": "LiveImage",
                "metadata": {"name": "req"},
                "spec": {"source": {"boot": {"guest": "Request", "vcpus": 1, "memoryMiB": 16}}}
            })),
        )
        .await
        .unwrap();
    let set_replicas = |n: i32| {
        let pools = pools.clone();
        let apply = apply.clone();
        async move {
            pools
                .patch(
                    "pool",
                    &apply,
                    &Patch::Apply(json!({
                        "apiVersion": "vmstream.io/v1alpha1", "kind": "ClonePool",
                        "metadata": {"name": "pool"},
                        "spec": {"liveImage": "req", "replicas": n}
                    })),
                )
                .await
                .unwrap();
        }
    };
    set_replicas(6).await;
    let image = eventually("LiveImage Ready", 90, || async {
        let i = images.get("req").await.ok()?;
        assert_ne!(
            i.phase(),
            LiveImagePhase::Failed,
            "image failed: {:?}",
            i.status
        );
        (i.phase() == LiveImagePhase::Ready).then_some(i)
    })
    .await;
    let status = image.status.unwrap();
    assert!(status.size_bytes.unwrap_or(0) > 0 && status.source_pause_ms.is_some());

    let running = eventually("6 clones Running", 90, || async {
        let r = running_clones(&clones).await;
        (r.len() == 6).then_some(r)
    })
    .await;
    all_answer(&cluster, ns.name(), &running);
    assert_eq!(vm_process_count(&cluster), 6);

    // Scale 3 → 30 (timed: `scale_3_to_30_s`) and back to 3: VM processes follow.
    set_replicas(3).await;
    eventually("3 clones left and 3 VM processes", 60, || async {
        let all = clones.list(&ListParams::default()).await.ok()?.items;
        (all.len() == 3 && vm_process_count(&cluster) == 3).then_some(())
    })
    .await;
    let scale_started = std::time::Instant::now();
    let scale_started_at = std::time::SystemTime::now();
    set_replicas(30).await;
    let running = eventually("30 clones Running", 180, || async {
        let r = running_clones(&clones).await;
        (r.len() == 30).then_some(r)
    })
    .await;
    let scale_3_to_30_s = scale_started.elapsed().as_secs_f64();
    // Wall-clock bounds, to line the scale-up up with the daemons' and the
    // operator's logs (UTC timestamps).
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    };
    eprintln!(
        "scale 3 -> 30: {scale_3_to_30_s:.2} s (unix {:.3} .. {:.3})",
        unix(scale_started_at),
        unix(std::time::SystemTime::now())
    );
    if let Some(path) = std::env::var_os("VMSTREAM_E2E_FIGURES") {
        let figures = json!({ "scale_3_to_30_s": (scale_3_to_30_s * 1000.0).round() / 1000.0 });
        std::fs::write(path, figures.to_string()).expect("write e2e figures");
    }
    all_answer(&cluster, ns.name(), &running);
    assert_eq!(vm_process_count(&cluster), 30);
    set_replicas(3).await;
    eventually("3 clones left and 3 VM processes", 90, || async {
        let all = clones.list(&ListParams::default()).await.ok()?.items;
        (all.len() == 3 && vm_process_count(&cluster) == 3).then_some(())
    })
    .await;

    // SIGKILL the node daemon that runs clones: the VMs keep running and the
    // restarted daemon re-adopts them.
    let running = running_clones(&clones).await;
    let busy = cluster.node_index(running[0].status.as_ref().unwrap().node.as_deref().unwrap());
    let pids_before = cluster.nodes[busy].vm_pids();
    assert!(!pids_before.is_empty());
    cluster.kill_node_daemon(busy);
    for pid in &pids_before {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "VM {pid} survived its daemon"
        );
    }
    // While the daemon is down one of its clones is force-deleted: the
    // restarted daemon re-adopts the VM, finds no VMClone for it, stops it.
    let orphan = running[0].name_any();
    let orphan_id = clone_vm_id(ns.name(), &orphan);
    let orphan_pid = vm_pid(&cluster, busy, &orphan_id).expect("the orphan's vm.json");
    // Deleted first (the operator, running, adds no finalizer to an object
    // being deleted), then its finalizer dropped: gone before any daemon
    // of its node could see the deletion.
    clones
        .delete(&orphan, &DeleteParams::default())
        .await
        .unwrap();
    strip_finalizers(&clones, &orphan).await;
    let pids_before: BTreeSet<u32> = pids_before
        .into_iter()
        .filter(|&p| p != orphan_pid)
        .collect();
    cluster.restart_node(busy).unwrap();
    eventually("the restarted daemon stops the orphaned VM", 30, || async {
        (!alive(orphan_pid)).then_some(())
    })
    .await;
    let listed = eventually("restarted daemon lists its VMs", 30, || async {
        let list = cluster.ctl(busy, &["list"]).ok()?;
        let pids: BTreeSet<u64> = list["vms"]
            .as_array()?
            .iter()
            .filter_map(|v| v["record"]["pid"].as_u64())
            .collect();
        // The pool's replacement of the orphan may start here too.
        let adopted = pids_before.iter().all(|&p| pids.contains(&u64::from(p)));
        (adopted && !pids.contains(&u64::from(orphan_pid))).then_some(pids)
    })
    .await;
    assert!(!listed.contains(&u64::from(orphan_pid)));
    // The pool replaces the deleted clone.
    let running = eventually("3 clones Running again", 60, || async {
        let r = running_clones(&clones).await;
        (r.len() == 3 && vm_process_count(&cluster) == 3).then_some(r)
    })
    .await;
    all_answer(&cluster, ns.name(), &running);

    // With the operator down (so nothing re-adds the finalizer), a clone is
    // force-deleted while its daemon runs: the daemon's resync stops the
    // VM whose VMClone vanished.
    cluster.kill_operator();
    let victim = running[1].name_any();
    let victim_node =
        cluster.node_index(running[1].status.as_ref().unwrap().node.as_deref().unwrap());
    let victim_pid = vm_pid(&cluster, victim_node, &clone_vm_id(ns.name(), &victim))
        .expect("the victim's vm.json");
    // Finalizer dropped first (no operator runs to put it back), then
    // deleted: the object vanishes at once; the watching daemon sees no
    // deletionTimestamp, only the object gone.
    strip_finalizers(&clones, &victim).await;
    clones
        .delete(&victim, &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the daemon stops the VM of the vanished clone",
        30,
        || async { (!alive(victim_pid)).then_some(()) },
    )
    .await;
    cluster.restart_operator().unwrap();
    // The daemons say why: an OrphanVMStopped event per VM (published once
    // the stop is complete, so it may trail the process's end).
    let named = |notes: &[String], name: &str| {
        notes
            .iter()
            .any(|n| n.contains(&format!("{}/{name} no longer exists", ns.name())))
    };
    eventually(
        "an OrphanVMStopped event for each stopped VM",
        30,
        || async {
            let notes = node_event_notes(&client, "OrphanVMStopped").await;
            (named(&notes, &orphan) && named(&notes, &victim)).then_some(())
        },
    )
    .await;

    // SIGKILL the operator during a scale-up: the restarted operator converges
    // with no duplicate and no lost clone.
    set_replicas(8).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    cluster.kill_operator();
    cluster.restart_operator().unwrap();
    eventually(
        "8 clones Running after the operator restart",
        90,
        || async {
            let all = clones.list(&ListParams::default()).await.ok()?.items;
            let running = running_clones(&clones).await;
            (all.len() == 8 && running.len() == 8 && vm_process_count(&cluster) == 8).then_some(())
        },
    )
    .await;

    // A LiveImage captured from a running clone: its node's daemon captures
    // the clone (which runs on), reports it Ready, and a clone of it resumes
    // with the source's request counter.
    let source = running_clones(&clones).await.remove(0);
    let source_node = source.status.as_ref().unwrap().node.clone().unwrap();
    let source_index = cluster.node_index(&source_node);
    let source_id = clone_vm_id(ns.name(), &source.name_any());
    let answer = cluster.request(source_index, &source_id, 7).unwrap();
    let served_before = vmstream_e2e::served(7, answer);
    images
        .patch(
            "snap",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "vmstream.io/v1alpha1", "kind": "LiveImage",
                "metadata": {"name": "snap"},
                "spec": {"source": {"fromClone": {"vmClone": source.name_any()}}}
            })),
        )
        .await
        .unwrap();
    let snap = eventually("the fromClone LiveImage Ready", 60, || async {
        let i = images.get("snap").await.ok()?;
        assert_ne!(
            i.phase(),
            LiveImagePhase::Failed,
            "snap failed: {:?}",
            i.status
        );
        (i.phase() == LiveImagePhase::Ready).then_some(i)
    })
    .await;
    let status = snap.status.unwrap();
    assert_eq!(status.node.as_deref(), Some(source_node.as_str()));
    assert!(status.size_bytes.unwrap_or(0) > 0 && status.memory_bytes.unwrap_or(0) > 0);
    assert!(status.source_pause_ms.is_some() && status.capture_time_ms.is_some());
    eprintln!(
        "fromClone capture: {:.1} ms, source paused {:.1} ms, {} bytes",
        status.capture_time_ms.unwrap_or_default(),
        status.source_pause_ms.unwrap_or_default(),
        status.size_bytes.unwrap_or_default()
    );
    // The source runs on after the capture.
    let after = cluster.request(source_index, &source_id, 7).unwrap();
    assert_eq!(vmstream_e2e::served(7, after), served_before + 1);
    apply_clone(&clones, "from-snap", "snap", json!({})).await;
    let child = clone_running(&clones, "from-snap", 60).await;
    let child_node = cluster.node_index(child.status.as_ref().unwrap().node.as_deref().unwrap());
    let answer = cluster
        .request(child_node, &clone_vm_id(ns.name(), "from-snap"), 7)
        .unwrap();
    assert_eq!(
        vmstream_e2e::served(7, answer),
        served_before + 1,
        "the clone resumes from the captured counter"
    );
    clones
        .delete("from-snap", &DeleteParams::default())
        .await
        .unwrap();
    images
        .delete("snap", &DeleteParams::default())
        .await
        .unwrap();

    // Delete everything: every VM process stops.
    pools
        .delete("pool", &DeleteParams::default())
        .await
        .unwrap();
    images
        .delete("req", &DeleteParams::default())
        .await
        .unwrap();
    eventually("no clone, no image, no VM process", 60, || async {
        let c = clones.list(&ListParams::default()).await.ok()?.items.len();
        let i = images.list(&ListParams::default()).await.ok()?.items.len();
        (c == 0 && i == 0 && vm_process_count(&cluster) == 0).then_some(())
    })
    .await;
    let netns: Vec<String> = cluster.nodes.iter().map(|n| n.netns.clone()).collect();
    let vm_cgroups = |ns: &str| -> Vec<String> {
        ["/sys/fs/cgroup/unified/vmstream", "/sys/fs/cgroup/vmstream"]
            .iter()
            .filter_map(|root| std::fs::read_dir(root).ok())
            .flat_map(|d| d.flatten())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(&format!(".{ns}.")))
            .collect()
    };
    let ns_name = ns.name().to_string();
    assert!(
        vm_cgroups(&ns_name).is_empty(),
        "cgroups left: {:?}",
        vm_cgroups(&ns_name)
    );
    drop(keep_logs);
    drop(ns);
    drop(cluster);
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    for n in netns {
        assert!(!listed.contains(&n), "namespace {n} removed");
    }
}
