//! The node daemon's Kubernetes side against the real local API server: it
//! renews its heartbeat Lease, publishes its VMNode, sees only the objects
//! labelled for its node, and its Lease goes stale once it is killed.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::PostParams;
use vmstream_api::v1alpha1::{VMClone, VMNode};
use vmstream_testenv::require_control_plane;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn heartbeat_node_status_and_label_filtered_watch() {
    let cp = require_control_plane!("node::heartbeat_node_status_and_label_filtered_watch");
    cp.install_crds(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds"))
        .unwrap();
    let ns = cp.namespace("node").await.unwrap();
    let node = format!("node-{}", ns.name());
    let state = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_vmstream-node"))
            .env("KUBECONFIG", cp.kubeconfig())
            .env("RUST_LOG", "warn")
            .args([
                "--node-name",
                &node,
                "--namespace",
                ns.name(),
                "--heartbeat-interval",
                "1",
            ])
            .arg("--state-dir")
            .arg(state.path())
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(["--stream-addr", "127.0.0.1:7480"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = ns.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns.name());
    let lease_name = vmstream_api::heartbeat_lease_name(&node);
    let renew_time = |lease: &Lease| {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.renew_time.clone())
            .map(|t| t.0)
    };
    let first = eventually("heartbeat Lease", || async {
        leases.get_opt(&lease_name).await.ok().flatten()
    })
    .await;
    assert_eq!(
        first.spec.as_ref().unwrap().holder_identity.as_deref(),
        Some(node.as_str())
    );
    let t0 = renew_time(&first).unwrap();
    eventually("a renewal", || async {
        let l = leases.get(&lease_name).await.ok()?;
        (renew_time(&l)? > t0).then_some(())
    })
    .await;

    let nodes: Api<VMNode> = Api::all(client.clone());
    let vmnode = eventually("VMNode status", || async {
        let n = nodes.get_opt(&node).await.ok().flatten()?;
        n.status.as_ref()?.capacity.as_ref()?;
        Some(n)
    })
    .await;
    let status = vmnode.status.unwrap();
    assert!(status.capacity.unwrap().memory_bytes > 0);
    assert_eq!(status.address.as_deref(), Some("127.0.0.1:7480"));

    // One clone placed on this node, one on another: the daemon sees only its own.
    let clones: Api<VMClone> = Api::namespaced(client.clone(), ns.name());
    for (name, on) in [("mine", node.as_str()), ("theirs", "some-other-node")] {
        let c: VMClone = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmstream.io/v1alpha1", "kind": "VMClone",
            "metadata": {"name": name, "labels": {vmstream_api::NODE_LABEL: on}},
            "spec": {"liveImage": "img"}
        }))
        .unwrap();
        clones.create(&PostParams::default(), &c).await.unwrap();
    }
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    eventually("placed-objects gauge = 1", || async {
        let out = Command::new("curl")
            .args(["-sf", &metrics_url])
            .output()
            .ok()?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        body.lines()
            .any(|l| l == "vmstream_node_placed_objects 1")
            .then_some(())
    })
    .await;

    // Killed, the daemon stops renewing: the Lease ages.
    drop(daemon);
    let last = renew_time(&leases.get(&lease_name).await.unwrap()).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = renew_time(&leases.get(&lease_name).await.unwrap()).unwrap();
    assert_eq!(last, after, "a dead daemon renews nothing");
}
