//! End to end: a rolling upgrade of the node daemons loses no VM. A ClonePool
//! runs clones on the image's node and one VMClone is pinned to each other
//! node (streamed from there, so the image's node also serves pages), while a driver thread keeps requests flowing
//! to every clone; each node daemon in turn is stopped the way an upgrade
//! stops it (SIGTERM, wait for it to exit) and started again, and the next
//! one waits until it is back (heartbeat Lease renewed, its VMs listed). Every
//! VM process keeps running (same pids), every clone keeps answering with its
//! served counter continuing exactly, no VMClone leaves Running (never Lost)
//! and the pool keeps its clones.
//!
//! The second test drives three concurrent streams straight at the daemons'
//! supervisor sockets, so requests are inside a daemon when it gets SIGTERM:
//! the stopping daemon answers them before it exits and refuses new ones as
//! not done, so each is still applied exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, ResourceExt};
use serde_json::json;
use vmstream_api::v1alpha1::{ClonePool, LiveImage, VMClone, VMClonePhase};
use vmstream_e2e::requests::{
    DriverOptions, DriverReport, RequestDriver, Route, check_concurrent_exactly_once,
};
use vmstream_e2e::{Cluster, ClusterOptions, clone_vm_id, eventually, ready_request_image, served};
use vmstream_test_support::{Need, require};

const TEST: &str = "e2e::rolling_restart_of_node_daemons_loses_no_vm";
const POOL: usize = 3;

/// Name → (node, phase) of every clone in the namespace.
async fn all_clones(api: &Api<VMClone>) -> BTreeMap<String, (String, VMClonePhase)> {
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| {
            let node = c.status.as_ref()?.node.clone()?;
            Some((c.name_any(), (node, c.phase())))
        })
        .collect()
}

async fn renew_time(leases: &Api<Lease>, node: &str) -> Option<String> {
    let lease = leases
        .get(&vmstream_api::heartbeat_lease_name(node))
        .await
        .ok()?;
    serde_json::to_value(lease.spec?.renew_time?)
        .ok()?
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_node_daemons_loses_no_vm() {
    roll_under_requests(TEST, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_across_a_rolling_restart_are_applied_exactly_once() {
    roll_under_requests(
        "e2e::concurrent_requests_across_a_rolling_restart_are_applied_exactly_once",
        Some(3),
    )
    .await;
}

/// The two tests each run three daemons: one at a time on two cores.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The roll, with requests from one `ctl` driver (`streams: None`) or from
/// `streams` concurrent drivers on the daemons' supervisor sockets.
async fn roll_under_requests(test: &str, streams: Option<usize>) {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    if !require(
        test,
        &[
            Need::Kvm,
            Need::Root,
            Need::Userfaultfd,
            Need::NetworkNamespaces,
        ],
    ) {
        return;
    }
    if !vmstream_e2e::mode::local_only(test) {
        return;
    }
    if let Some(why) = vmstream_testenv::unavailable() {
        vmstream_testenv::record_skip(test, &why);
        return;
    }
    let mut cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("start the cluster");
    let ns = cluster.control_plane().namespace("roll").await.unwrap();
    let nsname = ns.name().to_string();
    let client = ns.client();
    let images: Api<LiveImage> = Api::namespaced(client.clone(), &nsname);
    let clones: Api<VMClone> = Api::namespaced(client.clone(), &nsname);
    let pools: Api<ClonePool> = Api::namespaced(client.clone(), &nsname);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &cluster.system_namespace);

    let image = ready_request_image(&images, "req", 16).await;
    let home = image.status.unwrap().node.unwrap();
    // The home node serves the image to other nodes once it lists it in its
    // VMNode (a clone streamed before that fails: see docs/E2E.md).
    let vmnodes: Api<vmstream_api::v1alpha1::VMNode> = Api::all(client.clone());
    let key = format!("{nsname}/req");
    eventually("the image's node lists the image", 30, || async {
        let n = vmnodes.get(&home).await.ok()?;
        n.status?.images.contains(&key).then_some(())
    })
    .await;
    let others: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| *n != home)
        .collect();
    for (k, node) in others.iter().enumerate() {
        clones
            .patch(
                &format!("far-{k}"),
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(json!({
                    "apiVersion": "vmstream.io/v1alpha1", "kind": "VMClone",
                    "metadata": {"name": format!("far-{k}")},
                    "spec": {"liveImage": "req", "placement": {"nodeName": node}}
                })),
            )
            .await
            .unwrap();
    }
    let wanted = POOL + others.len();
    pools
        .patch(
            "pool",
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(json!({
                "apiVersion": "vmstream.io/v1alpha1", "kind": "ClonePool",
                "metadata": {"name": "pool"},
                "spec": {"liveImage": "req", "replicas": POOL}
            })),
        )
        .await
        .unwrap();
    let placed = eventually("every clone Running", 120, || async {
        let all = all_clones(&clones).await;
        let running = all
            .values()
            .filter(|(_, p)| *p == VMClonePhase::Running)
            .count();
        (running == wanted).then_some(all)
    })
    .await;
    let nodes_used: BTreeSet<&String> = placed.values().map(|(n, _)| n).collect();
    eprintln!("clones and their nodes: {placed:?}");
    assert_eq!(
        nodes_used.len(),
        cluster.nodes.len(),
        "clones on every node"
    );

    // Each clone's VM process and served counter before the roll.
    let pids_before: BTreeMap<String, u32> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.vm_pids_by_id())
        .collect();
    let mut targets = Vec::new();
    let mut served_before = Vec::new();
    for (name, (node, _)) in &placed {
        let id = clone_vm_id(&nsname, name);
        assert!(pids_before.contains_key(&id), "{id} has a VM process");
        let answer = cluster
            .request(cluster.node_index(node), &id, 1)
            .unwrap_or_else(|e| panic!("{id} on {node} answers: {e}"));
        served_before.push(served(1, answer));
        targets.push((id, Route::new(node)));
    }

    // Watch every clone's phase throughout the roll.
    let seen_phases: Arc<Mutex<BTreeSet<(String, String)>>> = Arc::default();
    let watcher = {
        let clones = clones.clone();
        let seen = Arc::clone(&seen_phases);
        tokio::spawn(async move {
            loop {
                for (name, (_, phase)) in all_clones(&clones).await {
                    if phase != VMClonePhase::Running {
                        seen.lock().unwrap().insert((name, format!("{phase:?}")));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let drivers: Vec<RequestDriver> = match streams {
        None => vec![RequestDriver::start(
            cluster.request_path().unwrap(),
            targets.clone(),
            DriverOptions::default(),
        )],
        Some(k) => (0..k)
            .map(|s| {
                RequestDriver::start(
                    cluster.supervisor_path(),
                    targets.clone(),
                    DriverOptions {
                        first_n: 1_000_000 * (s as u64 + 1),
                        ..DriverOptions::default()
                    },
                )
            })
            .collect(),
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut back_after = Vec::new();
    for i in 0..cluster.nodes.len() {
        let node = cluster.nodes[i].name.clone();
        let vms_here = cluster.nodes[i].vm_pids_by_id();
        let stopped_at = Instant::now();
        let exited = cluster.stop_node_daemon(i, Duration::from_secs(20));
        assert!(exited, "{node}'s daemon exits on SIGTERM");
        let stopped_in = stopped_at.elapsed();
        for (id, pid) in &vms_here {
            assert!(
                Path::new(&format!("/proc/{pid}")).exists(),
                "VM {id} (pid {pid}) survives the stop of {node}'s daemon"
            );
        }
        let lease_when_stopped = renew_time(&leases, &node).await;
        cluster.restart_node(i).unwrap();
        eventually(&format!("{node}'s daemon back"), 30, || async {
            let renewed = renew_time(&leases, &node).await;
            let listed: BTreeSet<u64> = cluster.ctl(i, &["list"]).ok()?["vms"]
                .as_array()?
                .iter()
                .filter_map(|v| v["record"]["pid"].as_u64())
                .collect();
            let wanted: BTreeSet<u64> = vms_here.values().map(|&p| u64::from(p)).collect();
            (renewed.is_some() && renewed != lease_when_stopped && listed == wanted).then_some(())
        })
        .await;
        back_after.push((node, stopped_in, stopped_at.elapsed()));
        // A beat more with the new daemon before the next node goes down.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let reports: Vec<DriverReport> =
        tokio::task::spawn_blocking(move || drivers.into_iter().map(RequestDriver::stop).collect())
            .await
            .unwrap();
    watcher.abort();

    for (i, report) in reports.iter().enumerate() {
        let f = report.figures();
        eprintln!(
            "rolling restart of {} node daemons, request stream {i} ({}): {} requests to {} \
             clones, {} retried ({} refused attempts, {} unknown-outcome attempts), \
             longest request {:.1} ms, longest gap between answers to one clone {:.1} ms",
            cluster.nodes.len(),
            if streams.is_some() {
                "supervisor socket"
            } else {
                "ctl"
            },
            f.requests,
            targets.len(),
            f.retried,
            f.refused_attempts,
            f.unknown_attempts,
            f.longest_request.as_secs_f64() * 1e3,
            f.longest_gap.as_secs_f64() * 1e3,
        );
        for line in report.failed_attempts() {
            eprintln!("  failed attempt: {line}");
        }
    }
    for (node, stopped_in, back) in &back_after {
        eprintln!(
            "  {node}: SIGTERM to exit {:.0} ms, SIGTERM to back (Lease renewed, VMs listed) {:.0} ms",
            stopped_in.as_secs_f64() * 1e3,
            back.as_secs_f64() * 1e3
        );
    }

    // Same VM processes, none restarted.
    let pids_after: BTreeMap<String, u32> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.vm_pids_by_id())
        .collect();
    assert_eq!(pids_after, pids_before, "same VM processes after the roll");
    for (id, pid) in &pids_after {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "VM {id} (pid {pid}) runs"
        );
    }
    // Never anything but Running; same clones on the same nodes.
    let seen = seen_phases.lock().unwrap().clone();
    assert!(
        seen.is_empty(),
        "clones left Running during the roll: {seen:?}"
    );
    let after = all_clones(&clones).await;
    assert_eq!(after, placed, "the same clones, on the same nodes, Running");
    let pool = pools.get("pool").await.unwrap();
    assert_eq!(pool.spec.replicas, POOL as i32);
    assert_eq!(pool.status.map(|s| s.replicas), Some(POOL as i32));
    // Every request answered, each applied exactly once, counters continue.
    for report in &reports {
        let f = report.figures();
        assert_eq!(f.answered, f.requests, "every request answered");
    }
    for (t, ((id, route), before)) in targets.iter().zip(&served_before).enumerate() {
        if let [report] = reports.as_slice() {
            let violations = report.violations(t, *before);
            assert!(violations.is_empty(), "{id}: {violations:?}");
        }
        let served_values: Vec<u64> = reports
            .iter()
            .flat_map(|r| r.of(t).filter_map(|q| q.served))
            .collect();
        let node = route.get();
        let now = served(
            2,
            cluster
                .request(cluster.node_index(&node), id, 2)
                .unwrap_or_else(|e| panic!("{id} answers after the roll: {e}")),
        );
        let (missing, twice) = check_concurrent_exactly_once(*before, &served_values, now);
        assert!(
            missing.is_empty() && twice.is_empty(),
            "{id}: applied without an answer received {missing:?}, answered twice {twice:?}"
        );
        assert_eq!(
            now,
            before + served_values.len() as u64 + 1,
            "{id}'s served counter continues"
        );
    }
    drop(ns);
}
