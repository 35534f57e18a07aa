//! The local control plane itself: it starts, serves the API with the
//! admin kubeconfig, hands out namespaces, and leaves no process behind.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use vmstream_testenv::{ControlPlane, require_control_plane};

#[tokio::test]
async fn serves_the_api_in_a_private_namespace() {
    let cp = require_control_plane!("testenv::serves_the_api_in_a_private_namespace");
    let ns = cp.namespace("smoke").await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(ns.client(), ns.name());
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hello"}, "data": {"k": "v"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let got = cms.get("hello").await.unwrap();
    assert_eq!(got.data.unwrap()["k"], "v");
    let out = cp
        .kubectl_ok(&["get", "configmap", "hello", "-n", ns.name(), "-o", "name"])
        .unwrap();
    assert_eq!(out.trim(), "configmap/hello");
    let version = cp.kubectl_ok(&["version", "-o", "json"]).unwrap();
    assert!(
        version.contains(vmstream_testenv::KUBERNETES_VERSION),
        "{version}"
    );
}

#[test]
fn a_stopped_control_plane_leaves_no_process_or_directory() {
    if let Some(why) = vmstream_testenv::unavailable() {
        vmstream_testenv::record_skip(
            "testenv::a_stopped_control_plane_leaves_no_process_or_directory",
            &why,
        );
        return;
    }
    if std::env::var_os("VMSTREAM_KUBECONFIG").is_some() {
        return;
    }
    let cp = ControlPlane::start().unwrap();
    let dir = cp.state_dir().unwrap().to_path_buf();
    let pids = pids_with_arg(&dir.display().to_string());
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver run: {pids:?}");
    drop(cp);
    assert!(!dir.exists(), "state directory {} removed", dir.display());
    let left = pids_with_arg(&dir.display().to_string());
    assert!(left.is_empty(), "processes left: {left:?}");
}

/// Pids of processes whose command line mentions `needle`.
fn pids_with_arg(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        // zombies have an empty cmdline; only live processes count
        if cmdline.contains(needle) && pid != std::process::id() {
            pids.push(pid);
        }
    }
    pids
}
