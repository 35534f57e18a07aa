//! The node daemon acting on objects placed on its node, against the real
//! local API server and real KVM: a LiveImage labelled for the node is
//! booted, captured and reported Ready; a VMClone of it starts in its own
//! VM process, is reported Running and answers a request through `ctl`; the
//! node's VMNode lists the image and the clone's usage; deleting the clone
//! stops its VM and reports it Stopped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use vmstream_api::v1alpha1::{LiveImage, LiveImagePhase, VMClone, VMClonePhase, VMNode};
use vmstream_test_support::{Need, require};
use vmstream_testenv::require_control_plane;
use vmstream_vmm::guests::request_answer;

const EXE: &str = env!("CARGO_BIN_EXE_vmstream-node");

/// The daemon, and on drop every VM process it left under its state dir.
struct Daemon {
    child: Child,
    state: std::path::PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let Ok(entries) = std::fs::read_dir(self.state.join("vms")) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(text) = std::fs::read(entry.path().join("vm.json")) else {
                continue;
            };
            let pid = serde_json::from_slice::<Value>(&text)
                .ok()
                .and_then(|v| v["pid"].as_u64());
            let Some(pid) = pid else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*self.state.to_string_lossy()) {
                // SAFETY: kill(2) of a VM process this test's daemon started
                // (its command line names the test's state directory).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn eventually<T, F, Fut>(what: &str, seconds: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ctl(state: &Path, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(EXE)
        .args(["ctl", "--state-dir"])
        .arg(state)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ctl");
    if out.status.success() {
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {out:?}"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn placed_live_image_is_built_and_its_clone_runs() {
    if !require(
        "node::placed_live_image_is_built_and_its_clone_runs",
        &[Need::Kvm, Need::Root, Need::Userfaultfd],
    ) {
        return;
    }
    let cp = require_control_plane!("node::placed_live_image_is_built_and_its_clone_runs");
    cp.install_crds(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crds"))
        .unwrap();
    let ns = cp.namespace("placed").await.unwrap();
    let node = format!("node-{}", ns.name());
    let state = tempfile::tempdir().unwrap();
    let _daemon = Daemon {
        child: Command::new(EXE)
            .env("KUBECONFIG", cp.kubeconfig())
            .env("RUST_LOG", "warn")
            .args(["--node-name", &node, "--namespace", ns.name()])
            .args(["--heartbeat-interval", "1", "--sync-interval-ms", "200"])
            .arg("--state-dir")
            .arg(state.path())
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
        state: state.path().to_path_buf(),
    };
    let client = ns.client();

    // As the operator would: labelled for the node.
    let images: Api<LiveImage> = Api::namespaced(client.clone(), ns.name());
    let image: LiveImage = serde_json::from_value(json!({
        "apiVersion": "vmstream.io/v1alpha1", "kind": "LiveImage",
        "metadata": {"name": "img", "labels": {vmstream_api::NODE_LABEL: node}},
        "spec": {"source": {"boot": {
            "guest": "Request", "memoryMiB": 16,
            "fill": {"seed": 7, "randomPercent": 30, "duplicatePercent": 10}
        }}}
    }))
    .unwrap();
    images.create(&PostParams::default(), &image).await.unwrap();
    let ready = eventually("LiveImage Ready", 90, || async {
        let i = images.get("img").await.ok()?;
        match i.phase() {
            LiveImagePhase::Ready => Some(i),
            LiveImagePhase::Failed => panic!("LiveImage failed: {:?}", i.status),
            _ => None,
        }
    })
    .await;
    let status = ready.status.unwrap();
    eprintln!("LiveImage status: {status:?}");
    assert_eq!(status.node.as_deref(), Some(node.as_str()));
    assert_eq!(status.memory_bytes, Some(16 << 20));
    let nonzero = status.non_zero_pages.unwrap();
    // 30 % random and 10 % duplicated pages of the 14 MiB data area, plus
    // the guest's own pages.
    assert!(nonzero > 1000 && nonzero < 4096, "{nonzero} non-zero pages");
    assert!(status.size_bytes.unwrap() >= nonzero * 4096);
    assert!(status.capture_time_ms.unwrap() > 0.0);
    assert!(status.source_pause_ms.unwrap() > 0.0);
    assert!(
        state
            .path()
            .join("images")
            .join(ns.name())
            .join("img")
            .join("state.bin")
            .is_file()
    );

    let clones: Api<VMClone> = Api::namespaced(client.clone(), ns.name());
    let clone: VMClone = serde_json::from_value(json!({
        "apiVersion": "vmstream.io/v1alpha1", "kind": "VMClone",
        "metadata": {
            "name": "c1",
            "labels": {vmstream_api::NODE_LABEL: node},
            "finalizers": [vmstream_api::VM_STOPPED_FINALIZER],
        },
        "spec": {"liveImage": "img", "memoryBackend": "Lazy"}
    }))
    .unwrap();
    clones.create(&PostParams::default(), &clone).await.unwrap();
    let running = eventually("VMClone Running", 60, || async {
        let c = clones.get("c1").await.ok()?;
        match c.phase() {
            VMClonePhase::Running => Some(c),
            VMClonePhase::Failed => panic!("VMClone failed: {:?}", c.status),
            _ => None,
        }
    })
    .await;
    let status = running.status.unwrap();
    eprintln!("VMClone status: {status:?}");
    assert!(status.start_latency_ms.unwrap() > 0.0);
    assert!(status.resident_bytes.is_some() && status.started_at.is_some());

    let vm_id = format!("vmc.{}.c1", ns.name());
    let reply = ctl(state.path(), &["request", &vm_id, "41"]).unwrap();
    assert_eq!(reply["reply"]["answer"], request_answer(41, 1));

    let nodes: Api<VMNode> = Api::all(client.clone());
    let image_key = format!("{}/img", ns.name());
    eventually("VMNode lists the image and the clone", 30, || async {
        let s = nodes.get(&node).await.ok()?.status?;
        let vm = s.vms.iter().find(|v| v.name == "c1")?;
        (s.images.contains(&image_key) && vm.memory_bytes == 16 << 20).then_some(())
    })
    .await;

    let pid = ctl(state.path(), &["list"]).unwrap()["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["record"]["id"] == vm_id.as_str())
        .and_then(|v| v["record"]["pid"].as_u64())
        .expect("the clone's VM process is listed");
    clones.delete("c1", &DeleteParams::default()).await.unwrap();
    eventually("VMClone Stopped", 30, || async {
        let c = clones.get("c1").await.ok()?;
        (c.phase() == VMClonePhase::Stopped).then_some(())
    })
    .await;
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "the clone's VM process {pid} still runs"
    );
    assert!(!state.path().join("vms").join(&vm_id).exists());
    // Release the object as the operator would.
    clones
        .patch(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
}
